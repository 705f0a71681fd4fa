package stabilize

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
	"go.uber.org/zap"
)

// QUIC termination
//
// With a `quic` block the handler ends the clients' QUIC connections
// itself: every flow of the handler on a listener feeds one quic.Transport
// (quic_transport.go) through a PacketConn of its own (quic_conn.go), and
// each accepted connection is relayed (quic_relay.go) to one backend QUIC
// connection on a `quic/` upstream, or request by request to `udp/`
// upstreams.

// DefaultALPN is the ALPN offered to clients when the quic block names
// none.
var DefaultALPN = []string{"h3"}

// Defaults of the quic block.
const (
	defaultQUICReplyTimeout = 5 * time.Second
	defaultQUICDialTimeout  = 5 * time.Second  // or half the idle timeout
	quicKeepAlive           = 15 * time.Second // of backend legs, or half the idle timeout
)

// QUIC configures QUIC termination. Its certificate comes from Caddy's tls
// app (loaded files, or names Caddy manages) through the connection
// policies, or from a certificate pair named here.
type QUIC struct {
	// The application protocols offered to clients, in order of preference.
	// The backend is offered the one the client negotiated. Default: h3.
	ALPN []string `json:"alpn,omitempty"`

	// A PEM certificate file to serve, with key. Without it, the
	// certificate comes from Caddy's tls app.
	Certificate string `json:"certificate,omitempty"`

	// The PEM private key file of certificate.
	Key string `json:"key,omitempty"`

	// TLS connection policies, with Caddy's syntax and semantics, picking
	// the certificate from the tls app. Default: one policy that matches
	// every client. Their ALPN is replaced by alpn.
	ConnectionPolicies caddytls.ConnectionPolicies `json:"connection_policies,omitempty"`

	// A file that TLS secrets are appended to, in NSS key log format, for
	// debugging with tools such as Wireshark. Default: none.
	KeyLog string `json:"keylog,omitempty"`

	// Makes every new client prove its address with a Retry packet before
	// the handshake goes on. Default: off.
	StatelessRetry bool `json:"stateless_retry,omitempty"`

	// How long a connection may be idle before it is closed. Default: 30s
	// (quic-go's). The client's leg idles out unless the client keeps it
	// alive; the backend's leg is kept alive by the relay, so a relayed
	// connection lives as long as its client's leg. A backend dial gives
	// up after 5s, or half this if shorter.
	MaxIdleTimeout caddy.Duration `json:"max_idle_timeout,omitempty"`

	// Accepts 0-RTT data from resuming clients. 0-RTT data can be
	// replayed. Default: off.
	Allow0RTT bool `json:"allow_0rtt,omitempty"`

	// With udp/ upstreams: how long a request stream waits for its reply
	// datagram; without one the stream is reset with error code 0x5354.
	// With passive health checks, a request without a reply within their
	// reply_timeout, or within this one if shorter, is a failure.
	// Default: 5s.
	ReplyTimeout caddy.Duration `json:"reply_timeout,omitempty"`

	// With quic/ upstreams: skip verification of the upstreams'
	// certificates. Insecure; for testing only.
	TLSInsecureSkipVerify bool `json:"tls_insecure_skip_verify,omitempty"`

	// With quic/ upstreams: the server name sent to, and verified against
	// the certificate of, the upstreams. Default: the upstream's host.
	TLSServerName string `json:"tls_server_name,omitempty"`

	// With quic/ upstreams: the pool of CAs that the upstreams'
	// certificates must chain to, a tls.ca_pool.source module (such as
	// `file` with `pem_files`). Default: the system's roots.
	TLSTrustPoolRaw json.RawMessage `json:"tls_trust_pool,omitempty" caddy:"namespace=tls.ca_pool.source inline_key=provider"`

	// A directory that a qlog file is written to for each connection, on
	// both sides of the relay. Default: none.
	QlogDir string `json:"qlog_dir,omitempty"`

	udp           bool        // the upstreams are udp/: a stream is one request
	tls           *tls.Config // the server's, before ALPN and key log
	backendTLS    *tls.Config // before server name, ALPN and sessions
	keylog        *keyLog
	config        *quic.Config // for clients
	backendConfig *quic.Config // for backend connections
	// for backend connections of clients that take no DATAGRAM frames
	backendConfigNoDatagrams *quic.Config
	dialTimeout              time.Duration // of backend connections
	holdsBackend             bool          // a reference to the backend transport
	processTicketKeys        bool          // session tickets: the process's keys (certificate pair), not the tls app's
	stats                    *quicStats
}

// provisionQUIC checks the quic block against the upstreams and sets up
// TLS. Upstreams are provisioned.
func (h *Handler) provisionQUIC(ctx caddy.Context) error {
	var first *Upstream // the first quic/ or udp/ upstream
	for i, u := range h.Upstreams {
		switch {
		case u.quic && h.QUIC == nil:
			return fmt.Errorf("upstreams[%d]: quic/ upstream %q requires the quic block (QUIC termination)", i, u.Dial)
		case first == nil:
			first = u
		case u.quic != first.quic:
			return fmt.Errorf("upstreams[%d]: %q and upstreams[0] %q: one handler's upstreams are all quic/ or all udp/", i, u.Dial, first.Dial)
		}
	}
	q := h.QUIC
	if q == nil {
		return nil
	}
	if h.Per == PerConnection {
		return fmt.Errorf("per %q: routes QUIC packets without terminating them, which the quic block does", h.Per)
	}
	if h.ProxyProtocol != "" {
		return fmt.Errorf("proxy_protocol %q: not available with the quic block", h.ProxyProtocol)
	}
	nquic := 0
	if first.quic {
		nquic = len(h.Upstreams)
	}
	q.udp = nquic == 0
	if !q.udp && h.Per == PerPacket {
		return fmt.Errorf("per %q: quic/ upstreams are picked once per client connection", h.Per)
	}
	if !q.udp {
		// udp/ upstreams honour them (quic_udp.go).
		switch {
		case len(h.LocalAddresses) > 0:
			return fmt.Errorf("local_addresses %v: backend QUIC connections leave from one socket of their own", h.LocalAddresses)
		case h.ReadBuffer > 0:
			return fmt.Errorf("read_buffer %d: backend QUIC connections leave from one socket of their own, which quic-go sizes", h.ReadBuffer)
		case h.WriteBuffer > 0:
			return fmt.Errorf("write_buffer %d: backend QUIC connections leave from one socket of their own, which quic-go sizes", h.WriteBuffer)
		}
	}
	if len(q.ALPN) == 0 {
		q.ALPN = DefaultALPN
	}
	for _, p := range q.ALPN {
		if p == "" || len(p) > 255 {
			return fmt.Errorf("quic.alpn %q: must be 1 to 255 bytes", p)
		}
	}
	if q.MaxIdleTimeout < 0 {
		return fmt.Errorf("quic.max_idle_timeout %v: must not be negative", time.Duration(q.MaxIdleTimeout))
	}
	if q.ReplyTimeout < 0 {
		return fmt.Errorf("quic.reply_timeout %v: must not be negative", time.Duration(q.ReplyTimeout))
	}
	if q.ReplyTimeout == 0 {
		q.ReplyTimeout = caddy.Duration(defaultQUICReplyTimeout)
	}
	switch {
	case q.udp && q.TLSInsecureSkipVerify:
		return fmt.Errorf("quic.tls_insecure_skip_verify: applies to quic/ upstreams only, not to %q", first.Dial)
	case q.udp && q.TLSServerName != "":
		return fmt.Errorf("quic.tls_server_name %q: applies to quic/ upstreams only, not to %q", q.TLSServerName, first.Dial)
	case q.udp && q.TLSTrustPoolRaw != nil:
		return fmt.Errorf("quic.tls_trust_pool: applies to quic/ upstreams only, not to %q", first.Dial)
	case q.TLSInsecureSkipVerify && q.TLSTrustPoolRaw != nil:
		return fmt.Errorf("quic.tls_insecure_skip_verify: excludes tls_trust_pool %s", q.TLSTrustPoolRaw)
	}
	if err := q.provisionServerTLS(ctx); err != nil {
		return err
	}
	q.backendTLS = &tls.Config{
		MinVersion:         tls.VersionTLS13,
		ServerName:         q.TLSServerName,
		InsecureSkipVerify: q.TLSInsecureSkipVerify,
	}
	if q.TLSTrustPoolRaw != nil {
		mod, err := ctx.LoadModule(q, "TLSTrustPoolRaw")
		if err != nil {
			return fmt.Errorf("quic.tls_trust_pool: %w", err)
		}
		ca, ok := mod.(caddytls.CA)
		if !ok {
			return fmt.Errorf("quic.tls_trust_pool: module %T is not a CA pool", mod)
		}
		q.backendTLS.RootCAs = ca.CertPool()
	}
	for _, u := range h.Upstreams {
		if u.quic {
			u.quicTLS = q.backendTLSFor(u)
		}
	}
	if q.KeyLog != "" {
		f, err := os.OpenFile(q.KeyLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("quic.keylog %q: %w", q.KeyLog, err)
		}
		q.keylog = &keyLog{f: f}
		h.logger.Warn("TLS secrets of QUIC connections are logged", zap.String("keylog", q.KeyLog))
	}
	if q.QlogDir != "" {
		if err := os.MkdirAll(q.QlogDir, 0o755); err != nil {
			q.cleanup()
			return fmt.Errorf("quic.qlog_dir %q: %w", q.QlogDir, err)
		}
	}
	tracer := q.tracer()
	q.config = &quic.Config{
		MaxIdleTimeout:  time.Duration(q.MaxIdleTimeout),
		Allow0RTT:       q.Allow0RTT,
		EnableDatagrams: true,
		Tracer:          tracer,
	}
	clientIdle := time.Duration(q.MaxIdleTimeout)
	if clientIdle == 0 {
		clientIdle = quicDefaultIdleTimeout
	}
	q.backendConfig = &quic.Config{
		// A relayed connection lives as long as the client's leg, which
		// idles out unless the client keeps it alive; the relay keeps the
		// backend's leg alive, so that it idles out only when the backend
		// is gone, and sooner than the client's: the client hears why
		// (QUICErrUpstreamGone) before it would idle out itself.
		KeepAlivePeriod: quicKeepAlive,
		EnableDatagrams: true,
		MaxIdleTimeout:  clientIdle * 3 / 4,
		Tracer:          tracer,
	}
	// The client's leg is idle while its backend's is dialed: the dial
	// gives up in time for the client to hear why.
	q.dialTimeout = defaultQUICDialTimeout
	if idle := time.Duration(q.MaxIdleTimeout); idle > 0 {
		q.dialTimeout = min(q.dialTimeout, idle/2)
	}
	q.backendConfigNoDatagrams = q.backendConfig.Clone()
	q.backendConfigNoDatagrams.EnableDatagrams = false
	q.stats = new(quicStats)
	if !q.udp {
		if _, err := acquireBackendTransport(); err != nil {
			q.cleanup()
			return err
		}
		q.holdsBackend = true
	}
	return nil
}

// provisionServerTLS sets up the server's TLS config: from the certificate
// pair, or from the connection policies and the tls app.
func (q *QUIC) provisionServerTLS(ctx caddy.Context) error {
	if (q.Certificate == "") != (q.Key == "") {
		return fmt.Errorf("quic.certificate %q, key %q: both or neither are required", q.Certificate, q.Key)
	}
	if q.Certificate != "" {
		if len(q.ConnectionPolicies) > 0 {
			return fmt.Errorf("quic.certificate %q: excludes connection_policies", q.Certificate)
		}
		cert, err := tls.LoadX509KeyPair(q.Certificate, q.Key)
		if err != nil {
			return fmt.Errorf("quic.certificate %q, key %q: %w", q.Certificate, q.Key, err)
		}
		q.tls = &tls.Config{Certificates: []tls.Certificate{cert}}
		q.processTicketKeys = true
		return nil
	}
	if len(q.ConnectionPolicies) == 0 {
		q.ConnectionPolicies = caddytls.ConnectionPolicies{new(caddytls.ConnectionPolicy)}
	}
	if err := q.ConnectionPolicies.Provision(ctx); err != nil {
		return fmt.Errorf("quic.connection_policies: %w", err)
	}
	q.tls = q.ConnectionPolicies.TLSConfig(ctx)
	return nil
}

// tracer writes a qlog file per connection into the qlog directory, or is
// nil.
func (q *QUIC) tracer() func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace {
	if q.QlogDir == "" {
		return nil
	}
	dir := q.QlogDir
	return func(_ context.Context, isClient bool, id quic.ConnectionID) qlogwriter.Trace {
		side := "server"
		if isClient {
			side = "client"
		}
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s_%s.sqlog", id, side)))
		if err != nil {
			return nil
		}
		seq := qlogwriter.NewConnectionFileSeq(f, isClient, id, []string{qlog.EventSchema})
		go seq.Run()
		return seq
	}
}

// configForClient is the TLS config of one client's handshake: the
// policies' choice, with the quic block's ALPN and key log.
func (q *QUIC) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if !slices.ContainsFunc(hello.SupportedProtos, func(p string) bool { return slices.Contains(q.ALPN, p) }) {
		q.stats.failed[quicFailALPN].Add(1) // crypto/tls fails it with no_application_protocol
	}
	cfg := q.tls
	if cfg.GetConfigForClient != nil {
		c, err := cfg.GetConfigForClient(hello)
		if err != nil {
			q.stats.failed[quicFailTLS].Add(1)
			return nil, err
		}
		if c != nil {
			cfg = c
		}
	}
	cfg = cfg.Clone()
	if q.processTicketKeys {
		cfg.SetSessionTicketKeys(sessionTicketKeys(time.Now())) // quic_tickets.go
	}
	cfg.GetConfigForClient = nil
	cfg.NextProtos = q.ALPN
	if q.keylog != nil {
		cfg.KeyLogWriter = q.keylog
	}
	if get := cfg.GetCertificate; get != nil {
		stats := q.stats
		cfg.GetCertificate = func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			c, err := get(hi)
			if err != nil {
				stats.failed[quicFailCertificate].Add(1)
			}
			return c, err
		}
	}
	return cfg, nil
}

// cleanup closes the key log and lets the backend transport go.
func (q *QUIC) cleanup() {
	if q.keylog != nil {
		q.keylog.close()
	}
	if q.holdsBackend {
		releaseBackendTransport()
		q.holdsBackend = false
	}
}

// keyLog is a key log file that handshakes still under way when it closes
// can write to: crypto/tls fails a handshake whose key log write fails.
type keyLog struct {
	mu sync.Mutex
	f  *os.File // nil once closed
}

func (k *keyLog) Write(p []byte) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.f == nil {
		return len(p), nil // closed by a reload: the line is not logged
	}
	return k.f.Write(p)
}

func (k *keyLog) close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.f != nil {
		_ = k.f.Close()
		k.f = nil
	}
}

// quicFailure says why a client's connection failed before it was relayed.
type quicFailure int

const (
	quicFailALPN        quicFailure = iota // no ALPN in common
	quicFailCertificate                    // no certificate for the server name
	quicFailTLS                            // the TLS config could not be chosen
	quicFailHandshake                      // the handshake did not complete
	quicFailNoUpstream                     // no upstream to relay to
	quicFailDial                           // the backend connection failed
	numQUICFailures
)

var quicFailureNames = [numQUICFailures]string{
	quicFailALPN:        "alpn",
	quicFailCertificate: "certificate",
	quicFailTLS:         "tls",
	quicFailHandshake:   "handshake",
	quicFailNoUpstream:  "no_upstream",
	quicFailDial:        "backend_dial",
}

func (f quicFailure) String() string { return quicFailureNames[f] }

// quicStats counts the QUIC connections of a handler's identity.
type quicStats struct {
	accepted, retries, zeroRTT atomic.Uint64
	active                     atomic.Int64
	failed                     [numQUICFailures]atomic.Uint64
	dialWarned                 atomic.Bool // a failed backend dial was logged at Warn
}
