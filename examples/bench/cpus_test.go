//go:build linux

package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// allowedCPUs is Cpus_allowed_list of process pid.
func allowedCPUs(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatal("no Cpus_allowed_list")
	return ""
}

// sleeper starts a child process that sleeps, on CPU cpu (any if < 0).
func sleeper(t *testing.T, cpu int) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "30")
	if err := startOn(cmd, cpu); err != nil {
		t.Skip("no sleep command:", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd
}

// TestPinProcess pins a child process to CPU 0 and lets it go again.
func TestPinProcess(t *testing.T) {
	cmd := sleeper(t, -1)
	if err := pinProcess(cmd.Process.Pid, 0); err != nil {
		t.Fatal(err)
	}
	if got := allowedCPUs(t, cmd.Process.Pid); got != "0" {
		t.Fatalf("pinned to CPU 0: Cpus_allowed_list %q", got)
	}
	if err := unpinProcess(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if got := allowedCPUs(t, cmd.Process.Pid); runtime.NumCPU() > 1 && got == "0" {
		t.Fatalf("unpinned: Cpus_allowed_list %q", got)
	}
}

// TestCores checks -cores split and one, as every mode uses them: a
// balancer starts on its one CPU (inherited from the thread that starts it,
// which keeps its own CPUs), and this process moves to CPU 0 with
// GOMAXPROCS 1 until it is undone; shared changes nothing.
func TestCores(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("needs 2 CPUs")
	}
	if balancerCPUFor(coresShared) != -1 || balancerCPUFor(coresSplit) != 1 || balancerCPUFor(coresOne) != 0 {
		t.Fatalf("balancer CPU: shared %d, split %d, one %d", balancerCPUFor(coresShared), balancerCPUFor(coresSplit), balancerCPUFor(coresOne))
	}
	self := allowedCPUs(t, os.Getpid())
	procs := runtime.GOMAXPROCS(0)

	runtime.LockOSThread()
	var before unix.CPUSet
	if err := unix.SchedGetaffinity(0, &before); err != nil {
		t.Fatal(err)
	}
	cmd := sleeper(t, balancerCPUFor(coresSplit))
	var after unix.CPUSet
	if err := unix.SchedGetaffinity(0, &after); err != nil {
		t.Fatal(err)
	}
	runtime.UnlockOSThread()
	if got := allowedCPUs(t, cmd.Process.Pid); got != "1" {
		t.Errorf("a balancer started split: Cpus_allowed_list %q, want 1", got)
	}
	if after != before {
		t.Errorf("the starting thread's CPUs changed: %d → %d CPUs", before.Count(), after.Count())
	}
	if got := allowedCPUs(t, sleeper(t, balancerCPUFor(coresShared)).Process.Pid); got != self {
		t.Errorf("a balancer started shared: Cpus_allowed_list %q, want this process's %q", got, self)
	}

	for _, cores := range []string{coresSplit, coresOne} {
		undo, err := placeSelf(cores)
		if err != nil {
			t.Fatal(err)
		}
		gotCPUs, gotProcs := allowedCPUs(t, os.Getpid()), runtime.GOMAXPROCS(0)
		undo()
		if gotCPUs != "0" || gotProcs != 1 {
			t.Errorf("%s: this process on CPUs %q with GOMAXPROCS %d, want 0 and 1", cores, gotCPUs, gotProcs)
		}
		if got := allowedCPUs(t, os.Getpid()); got != self || runtime.GOMAXPROCS(0) != procs {
			t.Errorf("%s undone: CPUs %q, GOMAXPROCS %d; want %q, %d", cores, got, runtime.GOMAXPROCS(0), self, procs)
		}
	}
	undo, err := placeSelf(coresShared)
	if err != nil {
		t.Fatal(err)
	}
	undo()
	if got := allowedCPUs(t, os.Getpid()); got != self {
		t.Errorf("shared: CPUs %q, want %q", got, self)
	}
}
