//go:build linux

package main

import (
	"encoding/json"
	"strings"
	"time"
)

// idleTimeout is the caddy-l4 server's idle timeout: longer than any
// measurement, so that no flow ends during one, nor before the sweep's idle
// memory reading (idleAfter).
const idleTimeout = 60 * time.Second

// handlerFor is the layer4 handler (JSON object) of a Caddy target.
func handlerFor(t string, upstreams []string) map[string]any {
	switch t {
	case "packet", "flow", "fastpacket", "fastflow":
		var ups []any
		for _, u := range upstreams {
			ups = append(ups, map[string]any{"dial": "udp/" + u})
		}
		return map[string]any{
			"handler":        "stabilize",
			"upstreams":      ups,
			"per":            strings.TrimPrefix(t, "fast"),
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		}
	case "proxy":
		var ups []any
		for _, u := range upstreams {
			ups = append(ups, map[string]any{"dial": []string{"udp/" + u}})
		}
		return map[string]any{
			"handler":        "proxy",
			"upstreams":      ups,
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		}
	case "ceiling":
		// caddy-l4's echo handler writes back what it reads: one reply per
		// datagram, with no upstream hop.
		return map[string]any{"handler": "echo"}
	}
	panic("no Caddy handler for target " + t)
}

// listenNetwork is the caddy-l4 listener network of target t (or of its
// base target).
func listenNetwork(t string) string {
	if strings.HasPrefix(t, "fast") {
		return "fastudp"
	}
	return "udp"
}

// caddyConfig is the JSON config of a Caddy with the admin API off, logging
// at ERROR and one layer4 server on network/listen (network udp or
// fastudp) that hands every flow to handler.
func caddyConfig(network, listen string, handler map[string]any) ([]byte, error) {
	return caddyConfigAdmin(network, listen, "", handler)
}

// caddyConfigAdmin is caddyConfig with the admin API on admin (host:port;
// "" for off), which serves the Go memory readings (/debug/pprof/heap,
// /metrics). The config is not saved.
func caddyConfigAdmin(network, listen, admin string, handler map[string]any) ([]byte, error) {
	return json.MarshalIndent(caddyConfigMap(network, listen, admin, handler), "", "\t")
}

// caddyConfigMap is caddyConfigAdmin before it is encoded.
func caddyConfigMap(network, listen, admin string, handler map[string]any) map[string]any {
	adminCfg := map[string]any{"disabled": true}
	if admin != "" {
		adminCfg = map[string]any{"listen": admin, "config": map[string]any{"persist": false}}
	}
	return map[string]any{
		"admin":   adminCfg,
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{
			"layer4": map[string]any{
				"servers": map[string]any{
					benchServer: map[string]any{
						"listen":       []string{network + "/" + listen},
						"idle_timeout": idleTimeout.String(),
						"routes":       []any{map[string]any{"handle": []any{handler}}},
					},
				},
			},
		},
	}
}

// benchServer is the name of the layer4 server in caddyConfig.
const benchServer = "bench"
