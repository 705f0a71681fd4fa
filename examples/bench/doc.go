// Command bench measures the stabilize UDP load balancer against a direct
// connection, caddy-l4's own `proxy` handler, nginx's stream proxy and a
// caddy-l4 echo ceiling, on this machine, over 127.0.0.1 only (or, with
// -clients netns, a veth pair to a network namespace of its own for the load
// generator). It needs Linux: it reads /proc and uses Linux socket options.
//
// It builds the repository's Caddy (./examples/caddy) once, then for every
// measurement starts a fresh balancer process (so that its CPU time and peak
// RSS can be read from /proc), drives closed-loop load through it to three
// in-process UDP echo upstreams, and stops it again. Targets are measured in
// interleaved rounds (A B C … A B C …) and the medians over the rounds are
// reported, as a Markdown table, an SVG chart and JSON, in the output folder.
//
// Usage, from anywhere inside the repository:
//
//	go run ./examples/bench                  # compare targets, ~4 min on 2 cores
//	go run ./examples/bench -quick           # smoke run, ~20 s
//	go run ./examples/bench -mode sweep      # 1…10000 concurrent flows
//	go run ./examples/bench -mode sweep -cores split  # the balancer on a CPU of its own
//	go run ./examples/bench -mode sweep -cores split -clients netns  # clients as on another host
//	go run ./examples/bench -targets flow,proxy -payloads 1200 -duration 5s
//	go run ./examples/bench -render examples/bench/results  # redraw reports from their JSON
//
// See README.md in this folder for what each number means.
package main
