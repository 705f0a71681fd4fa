//go:build linux

package main

import (
	"reflect"
	"strings"
	"testing"
)

func TestPromValue(t *testing.T) {
	text := `# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 14018
go_memstats_heap_inuse_bytes 1.4536704e+08
go_memstats_heap_inuse_bytes_total{x="y"} 3
`
	if v, err := promValue(text, "go_goroutines"); err != nil || v != 14018 {
		t.Errorf("go_goroutines: %v, %v", v, err)
	}
	if v, err := promValue(text, "go_memstats_heap_inuse_bytes"); err != nil || v != 145367040 {
		t.Errorf("go_memstats_heap_inuse_bytes: %v, %v", v, err)
	}
	if _, err := promValue(text, "go_threads"); err == nil {
		t.Error("a missing metric: no error")
	}
}

func TestQUICMarkdown(t *testing.T) {
	rs := []quicResult{
		{Target: "quic-direct", HandshakesPerSec: 1000, ThroughputMBps: 400},
		{Target: "quic-relay", HandshakesPerSec: 500, ThroughputMBps: 100, IdleConns: 1000, RSSBaseKB: 2048, RSSAfterCloseKB: 4096,
			GoBase: &goStats{HeapInuseKB: 1024, Goroutines: 20}, GoIdle: &goStats{HeapInuseKB: 10240, Goroutines: 10020},
			GoAfterClose: &goStats{HeapInuseKB: 2048, Goroutines: 20}},
	}
	md := quicMarkdown(rs)
	for _, want := range []string{"| quic-relay | 500 | 0.50 | 100 | 0.25 |", "| 2.0 → 4.0 | 1.0 → 10.0 → 2.0 | 20 → 10020 → 20 |",
		"| quic-direct | 1000 | 1.00 | 400 | 1.00 | | | | | | | |"} {
		if !strings.Contains(md, want) {
			t.Errorf("the table lacks %q:\n%s", want, md)
		}
	}
	if rows := strings.Count(md, "\n"); rows != 4 {
		t.Errorf("%d lines, want 4:\n%s", rows, md)
	}
	// Over rounds, the ratios are the medians of each round's, not the
	// ratios of the medians.
	rs[1].HandshakesXDirect, rs[1].ThroughputXDirect = 0.6, 0.3
	if md := quicMarkdown(rs); !strings.Contains(md, "| quic-relay | 500 | 0.60 | 100 | 0.30 |") {
		t.Errorf("the round ratios are not shown:\n%s", md)
	}
}

func TestQUICMedians(t *testing.T) {
	direct := []quicResult{{Target: "quic-direct", HandshakesPerSec: 100, ThroughputMBps: 100},
		{Target: "quic-direct", HandshakesPerSec: 200, ThroughputMBps: 400}, {Target: "quic-direct", HandshakesPerSec: 100, ThroughputMBps: 200}}
	relay := []quicResult{{Target: "quic-relay", HandshakesPerSec: 50, ThroughputMBps: 60, CPUPerMBms: 5},
		{Target: "quic-relay", HandshakesPerSec: 60, ThroughputMBps: 100, CPUPerMBms: 4}, {Target: "quic-relay", HandshakesPerSec: 70, ThroughputMBps: 80, CPUPerMBms: 6}}
	// Total CPU per MB: direct 3, 4, 3; the relay 6, 10, 5. Bounds 0.5, 0.4, 0.6.
	for i, x := range []float64{3, 4, 3} {
		direct[i].LoadCPUPerMBms, direct[i].TotalCPUPerMBms, direct[i].BulkLoadCores = x, x, 1.5
	}
	for i, x := range []float64{6, 10, 5} {
		relay[i].LoadCPUPerMBms, relay[i].TotalCPUPerMBms = x-relay[i].CPUPerMBms, x
		relay[i].BulkLoadCores, relay[i].BulkBalancerCores = 1, float64(i)
	}
	r := quicMedians(relay, direct)
	// Ratios by round: handshakes 0.5, 0.3, 0.7; throughput 0.6, 0.25, 0.4.
	want := quicResult{Target: "quic-relay", Rounds: 3, HandshakesPerSec: 60, ThroughputMBps: 80, CPUPerMBms: 5,
		HandshakesXDirect: 0.5, ThroughputXDirect: 0.4,
		quicMachine: quicMachine{LoadCPUPerMBms: 1, TotalCPUPerMBms: 6, BulkLoadCores: 1, BulkBalancerCores: 1, ThroughputBoundXDirect: 0.5}}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("quicMedians = %+v, want %+v", r, want)
	}
	if d := quicMedians(direct, direct); d.HandshakesXDirect != 1 || d.ThroughputXDirect != 1 || d.ThroughputBoundXDirect != 1 {
		t.Errorf("direct's own ratios: %+v", d)
	}
	// No handshake counted: no bound, and JSON can carry it.
	if d := quicMedians(direct, direct); d.HandshakesBoundXDirect != 0 {
		t.Errorf("handshakes' bound without CPU figures: %v", d.HandshakesBoundXDirect)
	}
}

func TestQUICMachineMarkdown(t *testing.T) {
	direct := quicResult{Target: "quic-direct", HandshakesPerSec: 1000, ThroughputMBps: 400,
		quicMachine: quicMachine{LoadCPUPerMBms: 4, TotalCPUPerMBms: 4, BulkLoadCores: 1.6, HandshakesBoundXDirect: 1, ThroughputBoundXDirect: 1}}
	relay := quicResult{Target: "quic-relay", HandshakesPerSec: 500, ThroughputMBps: 100, CPUPerMBms: 5,
		quicMachine: quicMachine{LoadCPUPerMBms: 3, TotalCPUPerMBms: 8, BulkLoadCores: 0.3, BulkBalancerCores: 0.5, BulkMachineCores: 0.9}}
	md := quicMachineMarkdown([]quicResult{direct, relay})
	// No rounds: the ratios from the figures; the bound 4 ÷ 8.
	for _, want := range []string{"| quic-relay | bulk, CPU ms/MB | 0.25 | 0.50 | 3.00 | 5.00 | 8.00 | 0.30, 0.50 (0.90) |  |",
		"| quic-direct | bulk, CPU ms/MB | 1.00 | 1.00 | 4.00 | 0.00 | 4.00 | 1.60, 0.00 (0.00) |"} {
		if !strings.Contains(md, want) {
			t.Errorf("the table lacks %q:\n%s", want, md)
		}
	}
	// Rounds: each round's ratio and bound, against direct's same round.
	d1, d2 := direct, direct
	d2.ThroughputMBps, d2.TotalCPUPerMBms = 200, 2
	r1, r2 := relay, relay
	r2.TotalCPUPerMBms = 5
	// The first round's relay measurement had other work on 0.1 core,
	// direct's in the second on 0.4 (1.6 of 2.0).
	d2.BulkMachineCores = 2
	direct.PerRound, relay.PerRound = []quicResult{d1, d2}, []quicResult{r1, r2}
	relay.ThroughputXDirect, relay.ThroughputBoundXDirect = 0.375, 0.45
	md = quicMachineMarkdown([]quicResult{direct, relay})
	if want := "| quic-relay | bulk, CPU ms/MB | 0.38 | 0.45 | 3.00 | 5.00 | 8.00 | 0.30, 0.50 (0.90) | 0.25 / 0.50; 0.50 / 0.40* |"; !strings.Contains(md, want) {
		t.Errorf("the table lacks %q:\n%s", want, md)
	}
}
