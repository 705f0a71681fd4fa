//go:build linux

package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	o, err := parseFlags(os.Args[1:])
	if err == flag.ErrHelp {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if o.render != "" {
		if err := renderDir(o.render); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	// Whatever happens, children are killed: on return, on a signal (below),
	// and by the kernel if this process dies (Pdeathsig, see balancer.go).
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
		removeClientNet()
		os.Exit(130)
	}()
	err = run(ctx, o)
	cancel()
	killAllChildren()
	removeClientNet()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}
