package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/quicecho"
)

// runQUIC is the QUIC demo: three QUIC echo servers, and Caddy terminating
// QUIC in front of them with a self-signed certificate. Nine client
// connections, each sending "Hello, world!" on a stream as the original
// Stabilize's client did, go round the servers: 3 each.
func runQUIC(ctx context.Context, o options) error {
	certFile, keyFile, cert, err := quicecho.SelfSigned()
	defer quicecho.RemoveSelfSigned()
	if err != nil {
		return err
	}
	var dials []string
	for _, addr := range o.quicUpstreams {
		s, err := quicecho.Start(addr, &tls.Config{Certificates: []tls.Certificate{cert}})
		if err != nil {
			return err
		}
		defer s.Close()
		dials = append(dials, "quic/"+addr)
	}
	handler := map[string]any{
		"handler":   "stabilize",
		"upstreams": upstreamList(dials),
		"quic": map[string]any{
			"certificate":    certFile,
			"key":            keyFile,
			"alpn":           []string{quicecho.ALPN},
			"tls_trust_pool": map[string]any{"provider": "file", "pem_files": []string{certFile}},
		},
	}
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{"srv0": map[string]any{
			"listen": []string{"udp/" + o.quicListen},
			"routes": []any{map[string]any{"handle": []any{handler}}},
		}}}},
	}
	cfgJSON, _ := json.Marshal(cfg)
	if err := caddy.Load(cfgJSON, true); err != nil {
		return fmt.Errorf("starting Caddy: %w", err)
	}
	defer caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}},"logging":{"logs":{"default":{"level":"ERROR"}}}}`), true)
	fmt.Fprintf(o.out, "QUIC servers (ALPN %s): %s\nCaddy: terminating QUIC on udp/%s with the self-signed %s\n",
		quicecho.ALPN, strings.Join(o.quicUpstreams, ", "), o.quicListen, certFile)

	fmt.Fprintf(o.out, "\n9 connections each send \"Hello, world!\" on a stream. Each connection is\n"+
		"relayed to the next QUIC server in turn: 3 each.\n")
	client, err := quicecho.TrustFile(certFile)
	if err != nil {
		return err
	}
	client.ServerName = "localhost"
	res := quicecho.Run(ctx, o.quicListen, client, 9, []byte("Hello, world!"), 5*time.Second, func(i int, server string, err error) {
		if err != nil {
			fmt.Fprintf(o.out, "   connection %d: %v\n", i, err)
			return
		}
		fmt.Fprintf(o.out, "   connection %d: %s|Hello, world!\n", i, server)
	})
	fmt.Fprint(o.out, "   per server:")
	for _, s := range slices.Sorted(maps.Keys(res.PerServer)) {
		fmt.Fprintf(o.out, " %s=%d", s, res.PerServer[s])
	}
	fmt.Fprintln(o.out)
	for _, addr := range o.quicUpstreams {
		if res.PerServer[addr] != 9/len(o.quicUpstreams) {
			return fmt.Errorf("connections not spread as expected: %v (errors: %v)", res.PerServer, res.Errors)
		}
	}
	fmt.Fprintln(o.out, "\nAll checks passed.")
	if o.serve {
		fmt.Fprintf(o.out, "Serving until Ctrl-C. In another terminal, try:\n"+
			"  go run ./examples/client -quic -to %s -n 9 -ca %s\n", o.quicListen, certFile)
		<-ctx.Done()
	}
	return nil
}

func upstreamList(dials []string) []any {
	list := make([]any, len(dials))
	for i, d := range dials {
		list[i] = map[string]any{"dial": d}
	}
	return list
}
