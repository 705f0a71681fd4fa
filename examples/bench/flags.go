//go:build linux

package main

import (
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// options are the command-line settings.
type options struct {
	mode         string
	targets      []string
	duration     time.Duration
	warmup       time.Duration
	timeout      time.Duration
	rounds       int
	flows        int
	window       int
	payloads     []int
	sweepFlows   []int
	sweepWindow  int
	sweepPayload int
	sweepRate    int
	establish    time.Duration
	heapProfiles bool
	out          string
	render       string
	root         string
	caddyBin     string
	nginxBin     string
	nginxWorkers string
	quick        bool
	quicProfile  string
	quicIdle     int
	cores        string
	clients      string
	quicCaddyB   string
}

// maxFlows is the most flows a load may have: the sweep goes to 100,000.
const maxFlows = 100_000

const (
	defaultCompareTargets = "direct,packet,flow,fastpacket,fastflow,proxy,nginx,ceiling,fastflow1,proxy1"
	defaultSweepTargets   = "flow,packet,proxy"
)

func parseFlags(args []string) (*options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	o := &options{}
	var targets, payloads, sweepFlows, quicCores string
	fs.StringVar(&o.mode, "mode", "compare", "`compare` targets at fixed load, `sweep` the number of concurrent flows, or `quic` termination against direct QUIC")
	fs.StringVar(&targets, "targets", "", "comma-separated targets: direct,packet,flow,fastpacket,fastflow,proxy,nginx,ceiling,fastflow1,proxy1 (default: "+defaultCompareTargets+"; sweep: "+defaultSweepTargets+")")
	fs.DurationVar(&o.duration, "duration", 3*time.Second, "measured time per target per round")
	fs.DurationVar(&o.warmup, "warmup", 500*time.Millisecond, "unmeasured load before each measurement (sweep: at least the flow ramp-up + 500ms)")
	fs.DurationVar(&o.timeout, "timeout", 500*time.Millisecond, "a datagram with no reply after this long is lost and its window slot refilled")
	fs.IntVar(&o.rounds, "rounds", 3, "interleaved rounds; medians over the rounds are reported")
	fs.IntVar(&o.flows, "flows", 16, "concurrent client flows (source ports)")
	fs.IntVar(&o.window, "window", 4, "datagrams outstanding per flow")
	fs.StringVar(&payloads, "payloads", "64,1200", "comma-separated datagram sizes in bytes (at least 8)")
	fs.StringVar(&sweepFlows, "sweep-flows", "1,10,100,1000,10000", "sweep: comma-separated flow counts")
	fs.IntVar(&o.sweepWindow, "sweep-window", 1, "sweep: datagrams outstanding per flow")
	fs.IntVar(&o.sweepPayload, "sweep-payload", 64, "sweep: datagram size in bytes")
	fs.IntVar(&o.sweepRate, "sweep-rate", 0, "sweep: offer this many datagrams/s in total, spread evenly over the flows (each paced, one outstanding), instead of a closed loop; 0: closed loop")
	fs.DurationVar(&o.establish, "establish", 10*time.Second, "sweep: before the load, set up the flows: each sends one datagram (over the ramp), and again after each -timeout, until every flow has had a reply, but at most this long (the report says so); 0: no set-up")
	fs.BoolVar(&o.heapProfiles, "heap-profiles", false, "sweep: save each Caddy balancer's heap profile at the idle reading into -out, as heap-<target>-<flows>.pb.gz (the last round's)")
	fs.StringVar(&o.out, "out", "bench-out", "output folder for the Markdown, SVG and JSON")
	fs.StringVar(&o.render, "render", "", "measure nothing: redraw the Markdown and SVG in this `folder` from its results.json and sweep.json")
	fs.StringVar(&o.root, "root", "", "module root of caddy-stabilize (default: from `go env GOMOD`)")
	fs.StringVar(&o.caddyBin, "caddy", "", "use this Caddy binary instead of building ./examples/caddy")
	fs.StringVar(&o.nginxBin, "nginx", "nginx", "nginx binary for the nginx target; skipped when missing or without the stream module")
	fs.StringVar(&o.nginxWorkers, "nginx-workers", "auto", "nginx worker_processes")
	fs.StringVar(&o.cores, "cores", coresShared, "`shared`: every process on every CPU; split: the load generator and the upstreams (quic: the server) on CPU 0, every balancer on CPU 1, as when the balancer has a machine of its own; one: all of them on CPU 0, as on a machine of one CPU")
	fs.StringVar(&o.clients, "clients", clientsLoopback, "`loopback`: the load generator's sockets talk to the balancer over 127.0.0.1; netns (Linux, root, iproute2): they are in a network namespace of their own behind a veth pair, with each side's receive work steered to its own CPU by -cores, as on two hosts (compare and sweep)")
	fs.StringVar(&quicCores, "quic-cores", "", "the old name of -cores, still accepted")
	fs.StringVar(&o.quicCaddyB, "quic-caddy-b", "", "quic: A/B: also measure this second Caddy `binary`'s relay targets, as <target>-b, in the same rounds (the two builds' order alternating by round)")
	fs.IntVar(&o.quicIdle, "quic-idle", 1000, "quic: idle connections for the memory and goroutine readings; 0: none")
	fs.StringVar(&o.quicProfile, "quic-profile", "", "quic: write the balancer's CPU profile of the first round's handshakes, and its heap profile and goroutines before the idle connections, with them and after they closed, to `folder`/<target>-*")
	fs.BoolVar(&o.quick, "quick", false, "smoke run (~20 s): duration 1s, warmup 300ms, 2 rounds, payload 64; sweep: flows 1,10,100,1000, 1 round. Explicit flags win")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["quic-cores"] && !set["cores"] {
		o.cores = quicCores
	}
	if o.quick {
		if !set["duration"] {
			o.duration = time.Second
		}
		if !set["warmup"] {
			o.warmup = 300 * time.Millisecond
		}
		if !set["rounds"] {
			o.rounds = 2
			if o.mode == "sweep" {
				o.rounds = 1
			}
		}
		if !set["payloads"] {
			payloads = "64"
		}
		if !set["sweep-flows"] {
			sweepFlows = "1,10,100,1000"
		}
	}
	if targets == "" {
		targets = defaultCompareTargets
		if o.mode == "sweep" {
			targets = defaultSweepTargets
		}
	}
	var err error
	if o.targets, err = parseTargets(targets); err != nil {
		return nil, fmt.Errorf("-targets: %w", err)
	}
	if o.payloads, err = parseInts(payloads, 8, 60000); err != nil {
		return nil, fmt.Errorf("-payloads: %w", err)
	}
	if o.sweepFlows, err = parseInts(sweepFlows, 1, maxFlows); err != nil {
		return nil, fmt.Errorf("-sweep-flows: %w", err)
	}
	switch {
	case o.mode != "compare" && o.mode != "sweep" && o.mode != "quic":
		return nil, fmt.Errorf("-mode %q: want compare, sweep or quic", o.mode)
	case o.duration <= 0 || o.duration > 10*time.Minute:
		return nil, fmt.Errorf("-duration %v: want (0, 10m]", o.duration)
	case o.warmup < 0 || o.timeout <= 0:
		return nil, fmt.Errorf("-warmup %v, -timeout %v: want warmup ≥ 0 and timeout > 0", o.warmup, o.timeout)
	case o.establish < 0 || o.establish > 10*time.Minute:
		return nil, fmt.Errorf("-establish %v: want [0, 10m]", o.establish)
	case o.rounds < 1 || o.rounds > 100:
		return nil, fmt.Errorf("-rounds %d: want 1…100", o.rounds)
	case o.flows < 1 || o.flows > maxFlows:
		return nil, fmt.Errorf("-flows %d: want 1…%d", o.flows, maxFlows)
	case o.sweepRate < 0 || o.sweepRate > 10_000_000:
		return nil, fmt.Errorf("-sweep-rate %d: want 0…10000000", o.sweepRate)
	case o.window < 1 || o.window > 1024:
		return nil, fmt.Errorf("-window %d: want 1…1024", o.window)
	case o.sweepWindow < 1 || o.sweepWindow > 1024:
		return nil, fmt.Errorf("-sweep-window %d: want 1…1024", o.sweepWindow)
	case set["cores"] && set["quic-cores"] && o.cores != quicCores:
		return nil, fmt.Errorf("-cores %q and -quic-cores %q: -quic-cores is the old name of -cores; give one", o.cores, quicCores)
	case coresNote[o.cores] == "":
		return nil, fmt.Errorf("-cores %q: want shared, split or one", o.cores)
	case clientsNote[o.clients] == "":
		return nil, fmt.Errorf("-clients %q: want loopback or netns", o.clients)
	case o.clients == clientsNetns && o.mode == "quic":
		return nil, fmt.Errorf("-clients netns: not for -mode quic")
	case o.quicIdle < 0 || o.quicIdle > 100_000:
		return nil, fmt.Errorf("-quic-idle %d: want 0…100000", o.quicIdle)
	case o.sweepPayload < 8 || o.sweepPayload > 60000:
		return nil, fmt.Errorf("-sweep-payload %d: want 8…60000", o.sweepPayload)
	}
	return o, nil
}

// parseTargets splits a comma-separated target list, dropping repeats.
func parseTargets(s string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, t := range strings.Split(s, ",") {
		t = strings.TrimSpace(t)
		if t == "" {
			continue
		}
		if _, ok := targetLabels[t]; !ok {
			return nil, fmt.Errorf("unknown target %q (want %s)", t, strings.Join(targetOrder, ", "))
		}
		if !seen[t] {
			seen[t] = true
			out = append(out, t)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no targets")
	}
	return out, nil
}

// parseInts splits a comma-separated list of integers in [lo, hi].
func parseInts(s string, lo, hi int) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, err
		}
		if n < lo || n > hi {
			return nil, fmt.Errorf("%d: want %d…%d", n, lo, hi)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty list")
	}
	return out, nil
}
