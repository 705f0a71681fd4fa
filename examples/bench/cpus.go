//go:build linux

package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// CPU placement (-cores), for every mode. shared: every process on every
// CPU; split: this process (the load generator, the upstreams, the QUIC
// server) on loadCPU and every balancer on balancerCPU, as when the
// balancer has a machine of its own; one: every process on loadCPU, taking
// turns, as on a machine of one CPU.
const (
	coresShared = "shared"
	coresSplit  = "split"
	coresOne    = "one"
	loadCPU     = 0
	balancerCPU = 1
)

// coresNote says where each process ran, by -cores.
var coresNote = map[string]string{
	coresShared: "Cores: shared (the load generator, the upstreams or server, and the balancer on every CPU).",
	coresSplit:  "Cores: split (the load generator and the upstreams or server on CPU 0 with GOMAXPROCS 1, the balancer on CPU 1, which its Go runtime sees as its only CPU).",
	coresOne:    "Cores: one (the load generator, the upstreams or server and the balancer all on CPU 0, each with GOMAXPROCS 1).",
}

// placeSelf pins this process to loadCPU unless cores is shared, and
// updates its GOMAXPROCS to the CPUs it may use. The returned function
// undoes it.
func placeSelf(cores string) (undo func(), err error) {
	if cores == coresShared {
		return func() {}, nil
	}
	if cores == coresSplit && runtime.NumCPU() < 2 {
		return nil, fmt.Errorf("-cores split: needs 2 CPUs, have %d", runtime.NumCPU())
	}
	if err := pinProcess(os.Getpid(), loadCPU); err != nil {
		return nil, err
	}
	runtime.SetDefaultGOMAXPROCS()
	return func() {
		_ = unpinProcess(os.Getpid())
		runtime.SetDefaultGOMAXPROCS()
	}, nil
}

// balancerCPUFor is the CPU a balancer is started on, by cores; -1: any.
func balancerCPUFor(cores string) int {
	switch cores {
	case coresSplit:
		return balancerCPU
	case coresOne:
		return loadCPU
	}
	return -1
}

// startOn starts cmd restricted to CPU cpu (any CPU if cpu < 0): the child is
// forked from a thread with that affinity and inherits it, so that each of
// its threads, and its Go runtime's GOMAXPROCS, sees only that CPU from the
// start.
func startOn(cmd *exec.Cmd, cpu int) error {
	if cpu < 0 {
		return cmd.Start()
	}
	runtime.LockOSThread()
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("reading this thread's CPU affinity: %w", err)
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("starting %s on CPU %d: %w", cmd.Path, cpu, err)
	}
	err := cmd.Start()
	if rerr := unix.SchedSetaffinity(0, &old); rerr != nil {
		// The goroutine stays locked to the thread, so that no other
		// goroutine runs on the wrong CPU.
		return fmt.Errorf("restoring this thread's CPU affinity: %w", rerr)
	}
	runtime.UnlockOSThread()
	return err
}

// pinProcess restricts every thread of process pid to CPU cpu. Threads it
// starts later inherit the restriction from the thread that starts them; a
// thread started during a pass is caught by the next one.
func pinProcess(pid, cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	for pass := 0; pass < 10; pass++ {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return fmt.Errorf("pinning process %d: %w", pid, err)
		}
		changed := false
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			var cur unix.CPUSet
			if unix.SchedGetaffinity(tid, &cur) == nil && cur == set {
				continue
			}
			changed = true
			if err := unix.SchedSetaffinity(tid, &set); err != nil && err != unix.ESRCH {
				return fmt.Errorf("pinning thread %d of process %d to CPU %d: %w", tid, pid, cpu, err)
			}
		}
		if !changed {
			return nil
		}
	}
	return fmt.Errorf("pinning process %d to CPU %d: it keeps starting threads", pid, cpu)
}

// unpinProcess lets every thread of process pid run on every CPU again.
func unpinProcess(pid int) error {
	var set unix.CPUSet
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return err
	}
	for i := range 1024 {
		set.Set(i)
	}
	for _, t := range tasks {
		if tid, err := strconv.Atoi(t.Name()); err == nil {
			_ = unix.SchedSetaffinity(tid, &set)
		}
	}
	return nil
}
