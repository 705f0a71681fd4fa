package stabilize

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"weak"

	"github.com/quic-go/quic-go"
)

// probeTLS is the TLS config of the active checks of quic/ upstreams: the
// backend TLS config, offering the quic block's ALPN.
func (q *QUIC) probeTLS() *tls.Config {
	c := q.backendTLS.Clone()
	c.NextProtos = q.ALPN
	return c
}

// quicString describes what decides a QUIC handshake check's verdict for
// an upstream of server name name, beyond the probe's timing: the ALPN
// offered, the server name verified, and the verification (insecure, or
// the roots: the system's or a pool's name), so that checks differing in
// any of them are told apart in prober keys and in their String.
func (c *activeCheck) quicString(name string) string {
	if c.quic == nil {
		return ""
	}
	if c.quic.ServerName != "" {
		name = c.quic.ServerName
	}
	verify := " roots=" + rootsName(c.quic.RootCAs)
	if c.quic.InsecureSkipVerify {
		verify = " insecure"
	}
	return " quic alpn=" + strings.Join(c.quic.NextProtos, ",") + " sni=" + name + verify
}

// rootPools names the distinct pools of roots that checks verify
// against: pools of the same certificates share a name, wherever they were
// loaded from, and a pool whose certificates change (a new file at the same
// path, say) gets a new one. Pools no check holds are forgotten.
var rootPools struct {
	sync.Mutex
	last  uint64
	known []namedRoots
}

type namedRoots struct {
	pool weak.Pointer[x509.CertPool]
	name string
}

// rootsName is the name of pool's certificates: "system" for nil (the
// system's roots), else "pool-<n>".
func rootsName(pool *x509.CertPool) string {
	if pool == nil {
		return "system"
	}
	rootPools.Lock()
	defer rootPools.Unlock()
	rootPools.known = slices.DeleteFunc(rootPools.known, func(r namedRoots) bool { return r.pool.Value() == nil })
	for _, r := range rootPools.known {
		if p := r.pool.Value(); p == pool {
			return r.name
		}
	}
	var name string
	if i := slices.IndexFunc(rootPools.known, func(r namedRoots) bool { return r.pool.Value().Equal(pool) }); i >= 0 {
		name = rootPools.known[i].name
	} else {
		rootPools.last++
		name = "pool-" + strconv.FormatUint(rootPools.last, 10)
	}
	// Every pool is kept, so that a name lasts while any of its pools does.
	rootPools.known = append(rootPools.known, namedRoots{pool: weak.Make(pool), name: name})
	return name
}

// probeQUIC checks a quic/ upstream with a QUIC handshake, within the
// check's timeout; the probe's expectations do not apply.
func (c *activeCheck) probeQUIC(ctx context.Context, target netip.AddrPort, serverName string) (res CheckResult, replied bool) {
	res.Time = time.Now()
	ctx, cancel := context.WithTimeout(ctx, time.Duration(c.Timeout))
	defer cancel()
	tlsConf := c.quic.Clone()
	if tlsConf.ServerName == "" {
		tlsConf.ServerName = serverName
	}
	conn, err := quic.DialAddr(ctx, target.String(), tlsConf, &quic.Config{HandshakeIdleTimeout: time.Duration(c.Timeout)})
	if err != nil {
		res.Reason = "QUIC handshake: " + err.Error()
		var ne net.Error
		return res, !(errors.As(err, &ne) && ne.Timeout())
	}
	res.Latency = time.Since(res.Time)
	res.Passed = true
	_ = conn.CloseWithError(0, "health check")
	return res, true
}
