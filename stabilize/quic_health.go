package stabilize

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
)

// probeTLS is the TLS config of the active checks of quic/ upstreams: the
// backend TLS config, offering the quic block's ALPN.
func (q *QUIC) probeTLS() *tls.Config {
	c := q.backendTLS.Clone()
	c.NextProtos = q.ALPN
	return c
}

// quicKey sets QUIC handshake checks apart from UDP probes in prober keys.
func (c *activeCheck) quicKey() string {
	if c.quic == nil {
		return ""
	}
	return " quic alpn=" + strings.Join(c.quic.NextProtos, ",") + " sni=" + c.quic.ServerName
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
