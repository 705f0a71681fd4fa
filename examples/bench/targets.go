//go:build linux

package main

import "strings"

// The targets, in report order, and what they are.
var targetOrder = []string{"direct", "packet", "flow", "fastpacket", "fastflow", "proxy", "nginx", "ceiling", "fastflow1", "proxy1"}

var targetLabels = map[string]string{
	"direct": "direct (floor)",
	"packet": "stabilize per packet",
	"flow":   "stabilize per flow",
	// The same handlers behind stabilize's own listener network, fastudp
	// (batched reads; established flows bypass caddy-l4's dispatch).
	"fastpacket": "stabilize per packet, fastudp",
	"fastflow":   "stabilize per flow, fastudp",
	"proxy":      "caddy-l4 proxy",
	"nginx":      "nginx stream",
	"ceiling":    "caddy-l4 echo (ceiling)",
	// A target name ending in "1" is the target without it, with
	// GOMAXPROCS=1 in the balancer's environment (see gomaxprocsOne).
	"fastflow1": "stabilize per flow, fastudp, GOMAXPROCS=1",
	"proxy1":    "caddy-l4 proxy, GOMAXPROCS=1",
}

// gomaxprocsOne reports whether target t runs its balancer with
// GOMAXPROCS=1 (only the balancer process: the benchmark keeps every core).
func gomaxprocsOne(t string) bool { return strings.HasSuffix(t, "1") }

// baseTarget is the target that t is otherwise the same as.
func baseTarget(t string) string { return strings.TrimSuffix(t, "1") }

// ordered returns the targets in report order.
func ordered(targets []string) []string {
	var out []string
	for _, t := range targetOrder {
		for _, u := range targets {
			if t == u {
				out = append(out, t)
			}
		}
	}
	return out
}
