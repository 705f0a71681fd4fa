// Command bench measures the stabilize UDP load balancer against a direct
// connection, caddy-l4's own `proxy` handler, nginx's stream proxy and a
// caddy-l4 echo ceiling, on this machine, over 127.0.0.1 only.
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
//	go run ./examples/bench -targets flow,proxy -payloads 1200 -duration 5s
//
// See README.md in this folder for what each number means.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
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
	out          string
	root         string
	caddyBin     string
	nginxBin     string
	nginxWorkers string
	quick        bool
}

const (
	defaultCompareTargets = "direct,packet,flow,fastpacket,fastflow,proxy,nginx,ceiling,fastflow1,proxy1"
	defaultSweepTargets   = "flow,packet,proxy"
)

func parseFlags(args []string) (*options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	o := &options{}
	var targets, payloads, sweepFlows string
	fs.StringVar(&o.mode, "mode", "compare", "`compare` targets at fixed load, or `sweep` the number of concurrent flows")
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
	fs.StringVar(&o.out, "out", "bench-out", "output folder for the Markdown, SVG and JSON")
	fs.StringVar(&o.root, "root", "", "module root of caddy-stabilize (default: from `go env GOMOD`)")
	fs.StringVar(&o.caddyBin, "caddy", "", "use this Caddy binary instead of building ./examples/caddy")
	fs.StringVar(&o.nginxBin, "nginx", "nginx", "nginx binary for the nginx target; skipped when missing or without the stream module")
	fs.StringVar(&o.nginxWorkers, "nginx-workers", "auto", "nginx worker_processes")
	fs.BoolVar(&o.quick, "quick", false, "smoke run (~20 s): duration 1s, warmup 300ms, 2 rounds, payload 64; sweep: flows 1,10,100,1000, 1 round. Explicit flags win")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
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
		return nil, err
	}
	if o.payloads, err = parseInts(payloads, 8, 60000); err != nil {
		return nil, fmt.Errorf("-payloads: %w", err)
	}
	if o.sweepFlows, err = parseInts(sweepFlows, 1, 15000); err != nil {
		return nil, fmt.Errorf("-sweep-flows: %w", err)
	}
	switch {
	case o.mode != "compare" && o.mode != "sweep":
		return nil, fmt.Errorf("-mode %q: want compare or sweep", o.mode)
	case o.duration <= 0 || o.duration > 10*time.Minute:
		return nil, fmt.Errorf("-duration %v: want (0, 10m]", o.duration)
	case o.warmup < 0 || o.timeout <= 0:
		return nil, fmt.Errorf("-warmup and -timeout must be positive")
	case o.rounds < 1 || o.rounds > 100:
		return nil, fmt.Errorf("-rounds %d: want 1…100", o.rounds)
	case o.flows < 1 || o.flows > 15000 || o.window < 1 || o.window > 1024:
		return nil, fmt.Errorf("-flows want 1…15000, -window want 1…1024")
	case o.sweepWindow < 1 || o.sweepWindow > 1024:
		return nil, fmt.Errorf("-sweep-window want 1…1024")
	case o.sweepPayload < 8 || o.sweepPayload > 60000:
		return nil, fmt.Errorf("-sweep-payload want 8…60000")
	}
	return o, nil
}

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

func main() {
	o, err := parseFlags(os.Args[1:])
	if err == flag.ErrHelp {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	// Whatever happens, children are killed: on return, on a signal (below),
	// and by the kernel if this process dies (Pdeathsig, see targets.go).
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "\nbench: %v: stopping\n", s)
		cancel()
		// Give the main goroutine a moment to stop and clean up by
		// itself (every loop is bounded), then make sure.
		time.Sleep(3 * time.Second)
		killAllChildren()
		os.Exit(130)
	}()
	err = run(ctx, o)
	cancel()
	killAllChildren()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// run does the whole benchmark: set-up, measurements, reports.
func run(ctx context.Context, o *options) error {
	began := time.Now()
	raiseFileLimit()

	tmp, err := os.MkdirTemp("", "stabilize-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	env := &benchEnv{tmp: tmp, opts: o}
	if err := env.prepare(ctx); err != nil {
		return err
	}
	defer env.closeUpstreams()

	meta := collectMeta(env, o)
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}

	var rep *report
	switch o.mode {
	case "compare":
		rep, err = runCompare(ctx, env, o)
	case "sweep":
		rep, err = runSweep(ctx, env, o)
	}
	if err == nil {
		// An interrupted measurement is not a result: write nothing.
		err = ctx.Err()
	}
	if err != nil {
		return err
	}
	meta.Elapsed = time.Since(began).Round(time.Second).String()
	rep.Meta = meta
	files, err := rep.write(o.out)
	if err != nil {
		return err
	}
	fmt.Println()
	fmt.Print(rep.markdown())
	fmt.Printf("\nwrote %s (took %s)\n", strings.Join(files, ", "), meta.Elapsed)
	return nil
}

// runCompare measures every target at the fixed load, per payload, in
// interleaved rounds.
func runCompare(ctx context.Context, env *benchEnv, o *options) (*report, error) {
	rep := &report{Mode: "compare"}
	total := o.rounds * len(o.payloads) * len(env.targets)
	i := 0
	for round := 1; round <= o.rounds; round++ {
		for _, size := range o.payloads {
			for _, t := range env.targets {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				i++
				fmt.Printf("[%d/%d] round %d, payload %d B, %-10s ", i, total, round, size, t)
				lc := loadConfig{
					flows: o.flows, window: o.window, payload: size,
					warmup: o.warmup, duration: o.duration, timeout: o.timeout,
				}
				m := env.measure(ctx, t, lc, false)
				m.Round = round
				fmt.Println(m.oneLine())
				rep.Runs = append(rep.Runs, m)
			}
		}
	}
	rep.summarize()
	return rep, nil
}

// runSweep measures each target at each flow count, interleaving targets
// within a flow count.
func runSweep(ctx context.Context, env *benchEnv, o *options) (*report, error) {
	rep := &report{Mode: "sweep"}
	total := o.rounds * len(o.sweepFlows) * len(env.targets)
	i := 0
	for round := 1; round <= o.rounds; round++ {
		for _, n := range o.sweepFlows {
			for _, t := range env.targets {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				i++
				fmt.Printf("[%d/%d] round %d, %5d flows, %-10s ", i, total, round, n, t)
				lc := sweepLoad(o, n)
				m := env.measure(ctx, t, lc, true)
				m.Round = round
				fmt.Println(m.oneLine())
				rep.Runs = append(rep.Runs, m)
			}
		}
	}
	rep.summarize()
	return rep, nil
}

// sweepLoad is the load for n flows in sweep mode: flows start spread over a
// ramp so that the first datagrams do not overflow the balancer's socket
// buffer at once, and the measurement starts after the ramp.
func sweepLoad(o *options, n int) loadConfig {
	ramp := time.Duration(n) * 100 * time.Microsecond
	ramp = min(ramp, time.Second)
	warmup := max(o.warmup, ramp+500*time.Millisecond)
	return loadConfig{
		flows: n, window: o.sweepWindow, payload: o.sweepPayload,
		warmup: warmup, duration: o.duration, timeout: o.timeout, ramp: ramp,
	}
}

// raiseFileLimit lifts RLIMIT_NOFILE to its hard limit: the sweep opens one
// socket per flow here and the balancer (which inherits the limit) opens
// one or more per flow too.
func raiseFileLimit() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

// moduleRoot finds the caddy-stabilize module root: -root, or the module of
// the current directory.
func moduleRoot(ctx context.Context, flagRoot string) (string, error) {
	root := flagRoot
	if root == "" {
		out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
		if err != nil {
			return "", fmt.Errorf("go env GOMOD: %w (or pass -root)", err)
		}
		gomod := strings.TrimSpace(string(out))
		if gomod == "" || gomod == os.DevNull {
			return "", fmt.Errorf("not inside a Go module: run from the caddy-stabilize repository or pass -root")
		}
		root = filepath.Dir(gomod)
	}
	b, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		return "", err
	}
	if !strings.Contains(string(b), "module github.com/stabilize-lb/caddy-stabilize") {
		return "", fmt.Errorf("%s is not the caddy-stabilize module: pass -root", root)
	}
	return root, nil
}

// goVersion is the toolchain that builds Caddy, or this binary's runtime.
func goVersion(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, "go", "version").Output()
	if err != nil {
		return runtime.Version()
	}
	return strings.TrimSpace(string(out))
}
