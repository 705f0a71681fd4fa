//go:build linux

package main

import (
	"testing"
	"time"
)

func TestMachineCPU(t *testing.T) {
	c0 := readMachineCPU(nil)
	if c0.load <= 0 || c0.all <= 0 {
		t.Fatalf("no CPU read: %+v", c0)
	}
	// Spin for 100 ms: this process is busy for part of it at least (the
	// machine is shared), and the machine's busy time includes this
	// process's, within /proc/stat's 10 ms ticks (one per CPU).
	x := 0
	for start := time.Now(); time.Since(start) < 100*time.Millisecond; {
		x++
	}
	c := readMachineCPU(nil).since(c0)
	if c.wall < 0.1 || c.load < 0.01 || c.balancer != 0 || c.all < c.load-0.03 {
		t.Errorf("after 100 ms of spinning (%d): %+v", x, c)
	}
	if load, _, all := c.cores(); load != c.load/c.wall || all != c.all/c.wall {
		t.Errorf("cores %.2f, %.2f of %+v", load, all, c)
	}
}
