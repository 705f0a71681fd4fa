//go:build linux

package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
)

// TestPinProcess pins a child process to CPU 0 and lets it go again, as
// -quic-cores split does with the balancer.
func TestPinProcess(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep command:", err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	allowed := func() string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
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
	if err := pinProcess(cmd.Process.Pid, 0); err != nil {
		t.Fatal(err)
	}
	if got := allowed(); got != "0" {
		t.Fatalf("pinned to CPU 0: Cpus_allowed_list %q", got)
	}
	if err := unpinProcess(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if got := allowed(); runtime.NumCPU() > 1 && got == "0" {
		t.Fatalf("unpinned: Cpus_allowed_list %q", got)
	}
}
