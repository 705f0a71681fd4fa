//go:build linux

package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// quicMachine is the CPU of the machine's share of one QUIC target: this
// process, which runs the load generator and the server (all of
// quic-direct), and the target's balancer; zero where it does not apply.
type quicMachine struct {
	// This process's CPU per handshake and per MB.
	LoadCPUPerHandshakeMs float64 `json:"load_cpu_ms_per_handshake,omitempty"`
	LoadCPUPerMBms        float64 `json:"load_cpu_ms_per_mb,omitempty"`
	// This process's plus the balancer's.
	TotalCPUPerHandshakeMs float64 `json:"total_cpu_ms_per_handshake,omitempty"`
	TotalCPUPerMBms        float64 `json:"total_cpu_ms_per_mb,omitempty"`
	// Cores busy (CPU seconds per second) during the handshakes and the
	// bulk upload: this process's and the balancer's.
	HandshakeLoadCores     float64 `json:"handshake_load_cores,omitempty"`
	HandshakeBalancerCores float64 `json:"handshake_balancer_cores,omitempty"`
	BulkLoadCores          float64 `json:"bulk_load_cores,omitempty"`
	BulkBalancerCores      float64 `json:"bulk_balancer_cores,omitempty"`
	// The machine's cores busy in the same spans (/proc/stat), other work
	// on the machine included: a check that the two processes' CPU is all
	// of the measurement's.
	HandshakeMachineCores float64 `json:"handshake_machine_cores,omitempty"`
	BulkMachineCores      float64 `json:"bulk_machine_cores,omitempty"`
	// The machine-CPU bounds: quic-direct's total CPU per handshake (per
	// MB) ÷ this target's, the ratio to direct that the target would reach
	// with as many cores busy as direct had. Over rounds, the medians of
	// each round's.
	HandshakesBoundXDirect float64 `json:"handshakes_bound_x_direct,omitempty"`
	ThroughputBoundXDirect float64 `json:"throughput_bound_x_direct,omitempty"`
}

// machineCPU is a reading of the wall clock and of the CPU seconds of this
// process, of a balancer and of every CPU of the machine (/proc/stat, other
// work included), or the difference of two.
type machineCPU struct {
	wall, load, balancer, all float64
}

// readMachineCPU reads this process's CPU, b's (none for nil) and the
// machine's.
func readMachineCPU(b *balancer) machineCPU {
	c := machineCPU{wall: float64(time.Now().UnixNano()) / 1e9, load: selfCPUSeconds(), all: busyCPUSeconds()}
	if b != nil {
		c.balancer = b.cpuSeconds()
	}
	return c
}

// since is what was spent from c0 to c.
func (c machineCPU) since(c0 machineCPU) machineCPU {
	return machineCPU{wall: c.wall - c0.wall, load: c.load - c0.load, balancer: c.balancer - c0.balancer, all: c.all - c0.all}
}

// cores are the cores busy over a span from since: this process's, the
// balancer's and the machine's.
func (c machineCPU) cores() (load, balancer, all float64) {
	if c.wall <= 0 {
		return 0, 0, 0
	}
	return c.load / c.wall, c.balancer / c.wall, c.all / c.wall
}

// busyCPUSeconds is the time every CPU of the machine has spent busy
// (/proc/stat: all but idle and iowait), or 0.
func busyCPUSeconds() float64 {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0
	}
	var busy int64
	for i, v := range f[1:] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0
		}
		// user nice system idle iowait irq softirq steal; guest time is
		// in user already.
		if i < 8 && i != 3 && i != 4 {
			busy += n
		}
	}
	return float64(busy) / clockTicks
}

// othersCPU is the CPU seconds of every balancer but target t's.
func othersCPU(bals map[string]*balancer, t string) float64 {
	var s float64
	for name, b := range bals {
		if name != t {
			s += b.cpuSeconds()
		}
	}
	return s
}

// machineMedians is the medians of rs's machine figures and of each
// round's bounds (rs[i] and direct[i] are the same round's).
func machineMedians(rs, direct []quicResult) quicMachine {
	var f [12][]float64
	for i, x := range rs {
		for j, v := range []float64{x.LoadCPUPerHandshakeMs, x.LoadCPUPerMBms, x.TotalCPUPerHandshakeMs, x.TotalCPUPerMBms,
			x.HandshakeLoadCores, x.HandshakeBalancerCores, x.BulkLoadCores, x.BulkBalancerCores,
			x.HandshakeMachineCores, x.BulkMachineCores,
			bound(direct[i].TotalCPUPerHandshakeMs, x.TotalCPUPerHandshakeMs), bound(direct[i].TotalCPUPerMBms, x.TotalCPUPerMBms)} {
			f[j] = append(f[j], v)
		}
	}
	return quicMachine{median(f[0]), median(f[1]), median(f[2]), median(f[3]),
		median(f[4]), median(f[5]), median(f[6]), median(f[7]), median(f[8]), median(f[9]), median(f[10]), median(f[11])}
}

// busyOthers is the share of the machine's cores (the machine's cores busy
// less this process's and the balancer's) above which other work marks a
// round.
const busyOthers = 0.25

// bound is direct's CPU ÷ a target's, 0 when either is unknown (0).
func bound(direct, target float64) float64 {
	if direct == 0 || target == 0 {
		return 0
	}
	return direct / target
}

// quicMachineMarkdown is the table of the machine's CPU by target, each
// measurement's ratio to direct next to its machine-CPU bound, and each
// round's.
func quicMachineMarkdown(rs []quicResult) string {
	var sb strings.Builder
	sb.WriteString("Machine CPU (this process: the load generator and the server; and the balancer), and the bound it sets:\n\n")
	sb.WriteString("| target | measurement | × direct | bound × direct | load + server CPU | balancer CPU | total CPU | cores busy: load + server, balancer (machine) | per round: × direct / bound |\n")
	sb.WriteString("|---|---|---:|---:|---:|---:|---:|---|---|\n")
	direct := rs[0]
	for _, r := range rs {
		// Each round's ratio to direct and bound, marked where other work
		// took the machine's CPU during the target's or direct's
		// measurement.
		perRound := func(rate, cpu, others func(quicResult) float64) string {
			var parts []string
			for i, p := range r.PerRound {
				if i < len(direct.PerRound) {
					d := direct.PerRound[i]
					mark := ""
					if max(others(p), others(d)) > busyOthers {
						mark = "*"
					}
					parts = append(parts, fmt.Sprintf("%.2f / %.2f%s", rate(p)/rate(d), bound(cpu(d), cpu(p)), mark))
				}
			}
			return strings.Join(parts, "; ")
		}
		hsX, mbpsX, hsB, mbpsB := r.HandshakesXDirect, r.ThroughputXDirect, r.HandshakesBoundXDirect, r.ThroughputBoundXDirect
		if len(r.PerRound) == 0 { // figures from before rounds
			hsX, mbpsX = r.HandshakesPerSec/direct.HandshakesPerSec, r.ThroughputMBps/direct.ThroughputMBps
			hsB, mbpsB = bound(direct.TotalCPUPerHandshakeMs, r.TotalCPUPerHandshakeMs), bound(direct.TotalCPUPerMBms, r.TotalCPUPerMBms)
		}
		fmt.Fprintf(&sb, "| %s | handshakes, CPU ms each | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f, %.2f (%.2f) | %s |\n",
			r.Target, hsX, hsB, r.LoadCPUPerHandshakeMs, r.CPUPerHandshakeMs, r.TotalCPUPerHandshakeMs,
			r.HandshakeLoadCores, r.HandshakeBalancerCores, r.HandshakeMachineCores,
			perRound(func(x quicResult) float64 { return x.HandshakesPerSec }, func(x quicResult) float64 { return x.TotalCPUPerHandshakeMs },
				func(x quicResult) float64 {
					return x.HandshakeMachineCores - x.HandshakeLoadCores - x.HandshakeBalancerCores
				}))
		fmt.Fprintf(&sb, "| %s | bulk, CPU ms/MB | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f, %.2f (%.2f) | %s |\n",
			r.Target, mbpsX, mbpsB, r.LoadCPUPerMBms, r.CPUPerMBms, r.TotalCPUPerMBms,
			r.BulkLoadCores, r.BulkBalancerCores, r.BulkMachineCores,
			perRound(func(x quicResult) float64 { return x.ThroughputMBps }, func(x quicResult) float64 { return x.TotalCPUPerMBms },
				func(x quicResult) float64 { return x.BulkMachineCores - x.BulkLoadCores - x.BulkBalancerCores }))
	}
	sb.WriteString("\nbound × direct = direct's total CPU per handshake (per MB) ÷ the target's: the ratio that the target would reach " +
		"with as many cores busy as direct had; × direct ≈ bound × (the target's cores busy ÷ direct's), round by round. " +
		"(machine): the cores busy of the whole machine (/proc/stat), other work included; " +
		fmt.Sprintf("a round marked * had other work on more than %.2f cores during the target's or direct's measurement.\n", busyOthers))
	return sb.String()
}
