package quiclb

import (
	"runtime"
	"syscall"
	"testing"
	"time"
)

// threadCPU starts measuring the CPU time of the benchmark's thread; the
// returned function reports it per op as cpu-ns/op. Unlike ns/op, it leaves
// out the time the thread waits for a CPU on a loaded machine.
func threadCPU(b *testing.B) func() {
	runtime.LockOSThread()
	start := threadCPUTime(b)
	return func() {
		if b.N > 0 {
			b.ReportMetric(float64(threadCPUTime(b)-start)/float64(b.N), "cpu-ns/op")
		}
		runtime.UnlockOSThread()
	}
}

func threadCPUTime(b *testing.B) time.Duration {
	const rusageThread = 1 // RUSAGE_THREAD
	var ru syscall.Rusage
	if err := syscall.Getrusage(rusageThread, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
