//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"
)

// run does the whole benchmark: set-up, measurements, reports.
func run(ctx context.Context, o *options) error {
	began := time.Now()
	unplace, err := placeSelf(o.cores)
	if err != nil {
		return err
	}
	defer unplace()
	most := o.flows
	if o.mode == "sweep" {
		most = slices.Max(o.sweepFlows)
	}
	limitErr := raiseFileLimit(most)

	tmp, err := os.MkdirTemp("", "stabilize-bench-")
	if err != nil {
		return fmt.Errorf("temporary folder: %w", err)
	}
	defer os.RemoveAll(tmp)

	env := &benchEnv{tmp: tmp, opts: o, fileLimitErr: limitErr}
	if o.clients == clientsNetns {
		if env.clients, err = newClientNet(ctx, o.cores); err != nil {
			return err
		}
		defer env.clients.close()
	}
	if err := env.prepare(ctx); err != nil {
		return err
	}
	defer env.closeUpstreams()

	if o.mode == "quic" {
		return runQUICBench(ctx, env, o) // quic.go
	}
	meta := collectMeta(env, o)
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return fmt.Errorf("-out %q: %w", o.out, err)
	}
	rep := measureRounds(ctx, env, o)
	// An interrupted measurement is not a result: write nothing.
	if err := ctx.Err(); err != nil {
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

// measureRounds measures every target at every payload (compare) or flow
// count (sweep), interleaving the targets, for o.rounds rounds. It stops
// early when ctx is done.
func measureRounds(ctx context.Context, env *benchEnv, o *options) *report {
	rep := &report{Mode: o.mode}
	keys := o.payloads
	if o.mode == "sweep" {
		keys = o.sweepFlows
	}
	total := o.rounds * len(keys) * len(env.targets)
	i := 0
	for round := 1; round <= o.rounds; round++ {
		for _, k := range keys {
			lc := loadFor(o, k)
			for _, t := range env.targets {
				if ctx.Err() != nil {
					return rep
				}
				i++
				if o.mode == "sweep" {
					fmt.Printf("[%d/%d] round %d, %5d flows, %-10s ", i, total, round, k, t)
				} else {
					fmt.Printf("[%d/%d] round %d, payload %d B, %-10s ", i, total, round, k, t)
				}
				m := env.measure(ctx, t, lc, o.mode == "sweep")
				m.Round = round
				fmt.Println(m.oneLine())
				rep.Runs = append(rep.Runs, m)
			}
		}
	}
	rep.summarize()
	return rep
}

// loadFor is the load of one measurement: key is the payload in compare
// mode, the number of flows in sweep mode. A sweep's flows start spread
// over a ramp so that their first datagrams do not overflow the balancer's
// socket buffer at once, and the measurement starts after the ramp. Before
// that load, a set-up has every flow send one datagram (over the same
// ramp) until each has had a reply, for at most -establish.
func loadFor(o *options, key int) loadConfig {
	if o.mode != "sweep" {
		return loadConfig{
			flows: o.flows, window: o.window, payload: key,
			warmup: o.warmup, duration: o.duration, timeout: o.timeout,
		}
	}
	ramp := min(time.Duration(key)*100*time.Microsecond, time.Second)
	lc := loadConfig{
		flows: key, window: o.sweepWindow, payload: o.sweepPayload,
		warmup: max(o.warmup, ramp+500*time.Millisecond), duration: o.duration, timeout: o.timeout, ramp: ramp,
		establish: o.establish,
	}
	if o.sweepRate > 0 {
		// Each flow sends one datagram every interval, one outstanding.
		lc.window = 1
		lc.interval = time.Duration(int64(time.Second) * int64(key) / int64(o.sweepRate))
	}
	return lc
}
