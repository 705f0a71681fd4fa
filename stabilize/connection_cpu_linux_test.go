package stabilize

import (
	"syscall"
	"testing"
	"time"
)

// processCPUPerOp starts measuring the process's CPU time; the returned
// function reports it per op as cpu-ns/op. Unlike ns/op, it leaves out the
// time spent waiting for a CPU on a loaded machine.
func processCPUPerOp(b *testing.B) func() {
	start := processCPU(b)
	return func() {
		if b.N > 0 {
			b.ReportMetric(float64(processCPU(b)-start)/float64(b.N), "cpu-ns/op")
		}
	}
}

func processCPU(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
