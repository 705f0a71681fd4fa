package stabilize

import (
	"encoding/json"
	"errors"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/caddyserver/certmagic"
)

// terminatesQUIC tells whether the flags ask for QUIC termination: a
// certificate, from files or for a domain.
func (opts commandOptions) terminatesQUIC() bool {
	return opts.Cert != "" || opts.Key != "" || opts.Domain != ""
}

// commandQUIC sets up QUIC termination for `caddy stabilize` when its
// flags ask for it (a certificate, a domain, or quic/ upstreams), and
// returns the tls app's config for --domain, or nil. Like the rest of the
// command, it only parses; loading the config checks the values.
func commandQUIC(opts commandOptions, h *Handler) (json.RawMessage, error) {
	quicUpstreams := false
	for _, u := range h.Upstreams {
		quicUpstreams = quicUpstreams || strings.HasPrefix(u.Dial, "quic/")
	}
	wanted := opts.terminatesQUIC()
	switch {
	case !wanted && (quicUpstreams || len(opts.ALPN) > 0 || opts.KeyLog != "" || opts.StatelessRetry || opts.Insecure || opts.InternalCerts):
		return nil, errors.New("QUIC termination needs a certificate: --cert and --key, or --domain")
	case !wanted:
		return nil, nil
	case opts.Domain != "" && (opts.Cert != "" || opts.Key != ""):
		return nil, errors.New("--domain and --cert/--key exclude each other")
	case opts.InternalCerts && opts.Domain == "":
		return nil, errors.New("--internal-certs applies to --domain")
	}
	h.QUIC = &QUIC{
		ALPN:                  opts.ALPN,
		Certificate:           opts.Cert,
		Key:                   opts.Key,
		KeyLog:                opts.KeyLog,
		StatelessRetry:        opts.StatelessRetry,
		TLSInsecureSkipVerify: opts.Insecure,
	}
	if opts.Domain == "" {
		return nil, nil
	}
	// As `caddy reverse-proxy` does: Caddy manages the domain's
	// certificate, with the internal issuer when asked or when no public CA
	// would issue one.
	app := &caddytls.TLS{CertificatesRaw: caddy.ModuleMap{
		"automate": caddyconfig.JSON([]string{opts.Domain}, nil),
	}}
	if opts.InternalCerts || !certmagic.SubjectQualifiesForPublicCert(opts.Domain) {
		app.Automation = &caddytls.AutomationConfig{Policies: []*caddytls.AutomationPolicy{{
			SubjectsRaw: []string{opts.Domain},
			IssuersRaw:  []json.RawMessage{json.RawMessage(`{"module":"internal"}`)},
		}}}
	}
	return caddyconfig.JSON(app, nil), nil
}
