package stabilize

import (
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
)

// quicCaddyfileOptions is the table of the quic block's options, parsed
// like the stabilize block's (see caddyfileOptions).
var quicCaddyfileOptions = []caddyfileOption{
	{name: "alpn", args: "<protocols...>", variadic: true,
		doc: "the application protocols offered to clients (default h3); the backend is offered the one negotiated",
		parse: func(p *caddyfileParser, args []string) error {
			quicOf(p.h).ALPN = append(quicOf(p.h).ALPN, args...)
			return nil
		}},
	{name: "certificate", args: "<cert_file> <key_file>", variadic: true,
		doc:   "a PEM certificate and key to serve, instead of the tls app's certificates",
		parse: (*caddyfileParser).quicCertificate},
	{name: "connection_policy", block: []string{"<Caddy's TLS connection policy options>"}, many: true,
		doc:   "a TLS connection policy choosing the certificate from the tls app, as in Caddy's tls directive",
		parse: (*caddyfileParser).quicConnectionPolicy},
	{name: "keylog", args: "<file>",
		doc:   "append the TLS secrets of every connection to this file (NSS key log format), for debugging",
		parse: setText(func(h *Handler) *string { return &quicOf(h).KeyLog })},
	{name: "stateless_retry",
		doc: "make every new client prove its address with a Retry packet",
		parse: func(p *caddyfileParser, _ []string) error {
			quicOf(p.h).StatelessRetry = true
			return nil
		}},
	{name: "max_idle_timeout", args: "<duration>",
		doc:   "how long a connection may be idle (default 30s)",
		parse: setDuration(func(h *Handler) *caddy.Duration { return &quicOf(h).MaxIdleTimeout })},
	{name: "allow_0rtt",
		doc: "accept 0-RTT data from resuming clients; it can be replayed (default off)",
		parse: func(p *caddyfileParser, _ []string) error {
			quicOf(p.h).Allow0RTT = true
			return nil
		}},
	{name: "reply_timeout", args: "<duration>",
		doc:   "udp/ upstreams: how long a request stream waits for its reply (default 5s)",
		parse: setDuration(func(h *Handler) *caddy.Duration { return &quicOf(h).ReplyTimeout })},
	{name: "qlog_dir", args: "<directory>",
		doc:   "write a qlog file per connection, both legs of the relay, into this directory",
		parse: setText(func(h *Handler) *string { return &quicOf(h).QlogDir })},
	{name: "tls_insecure_skip_verify",
		doc: "quic/ upstreams: do not verify their certificates (insecure)",
		parse: func(p *caddyfileParser, _ []string) error {
			quicOf(p.h).TLSInsecureSkipVerify = true
			return nil
		}},
	{name: "tls_server_name", args: "<name>",
		doc:   "quic/ upstreams: the server name to send and verify (default: the upstream's host)",
		parse: setText(func(h *Handler) *string { return &quicOf(h).TLSServerName })},
	{name: "tls_trust_pool", args: "<module> [<arguments...>]", block: []string{"[<the module's options>]"}, variadic: true,
		doc:   "quic/ upstreams: the CAs to trust, a tls.ca_pool.source module such as file <pem_files...> or inline { trust_der <base64> }",
		parse: (*caddyfileParser).quicTrustPool},
}

// The quic block parses its options with the stabilize block's parser,
// which reaches the table: set here to break the initialization cycle.
func init() { caddyfileOptionByName["quic"].parse = (*caddyfileParser).quic }

// quicCaddyfileOptionByName indexes quicCaddyfileOptions.
var quicCaddyfileOptionByName = func() map[string]*caddyfileOption {
	m := make(map[string]*caddyfileOption, len(quicCaddyfileOptions))
	for i := range quicCaddyfileOptions {
		m[quicCaddyfileOptions[i].name] = &quicCaddyfileOptions[i]
	}
	return m
}()

// quicCaddyfileBlock is the syntax of the quic block's lines.
func quicCaddyfileBlock() []string {
	lines := make([]string, 0, len(quicCaddyfileOptions))
	for _, o := range quicCaddyfileOptions {
		line := strings.TrimSpace(o.name + " " + o.args)
		if o.block != nil {
			line += " { " + strings.Join(o.block, "; ") + " }"
		}
		lines = append(lines, line)
	}
	return lines
}

// quic parses the quic block; the dispenser is on "quic".
func (p *caddyfileParser) quic(_ []string) error {
	quicOf(p.h)
	p.sub, p.subName = quicCaddyfileOptionByName, "quic"
	defer func() { p.sub, p.subName = nil, "" }()
	for nesting := p.d.Nesting(); p.d.NextBlock(nesting); {
		if err := p.option(nesting); err != nil {
			return err
		}
	}
	return nil
}

// quicCertificate parses `certificate <cert_file> <key_file>`.
func (p *caddyfileParser) quicCertificate(args []string) error {
	switch len(args) {
	case 1:
		return p.d.Errf("stabilize: %s: missing argument <key_file> after %q", p.opt.name, args[0])
	case 2:
	default:
		return p.d.Errf("stabilize: %s: too many arguments: unexpected %q after %q", p.opt.name, args[2], args[1])
	}
	q := quicOf(p.h)
	q.Certificate, q.Key = args[0], args[1]
	return nil
}

// quicConnectionPolicy parses a connection_policy block with Caddy's own
// parser; the dispenser is on "connection_policy".
func (p *caddyfileParser) quicConnectionPolicy(_ []string) error {
	cp := new(caddytls.ConnectionPolicy)
	if err := cp.UnmarshalCaddyfile(p.d.NewFromNextSegment()); err != nil {
		return p.d.Errf("stabilize: %s: %v", p.opt.name, err)
	}
	q := quicOf(p.h)
	q.ConnectionPolicies = append(q.ConnectionPolicies, cp)
	return nil
}

// quicTrustPool parses `tls_trust_pool <module> [<arguments...>] [{ … }]`,
// as reverse_proxy does: the module parses its arguments and its block.
// The dispenser is on the last argument.
func (p *caddyfileParser) quicTrustPool(args []string) error {
	id := "tls.ca_pool.source." + args[0]
	for range len(args) - 1 {
		p.d.Prev() // back to the module's name, as UnmarshalModule wants
	}
	unm, err := caddyfile.UnmarshalModule(p.d, id)
	if err != nil {
		return fmt.Errorf("stabilize: %s %q: %w", p.opt.name, args[0], err) // err names the line
	}
	if _, ok := unm.(caddytls.CA); !ok {
		return p.d.Errf("stabilize: %s: module %s is not a CA pool", p.opt.name, id)
	}
	quicOf(p.h).TLSTrustPoolRaw = caddyconfig.JSONModuleObject(unm, "provider", args[0], nil)
	return nil
}

func quicOf(h *Handler) *QUIC {
	if h.QUIC == nil {
		h.QUIC = new(QUIC)
	}
	return h.QUIC
}
