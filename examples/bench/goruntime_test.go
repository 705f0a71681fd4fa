//go:build linux

package main

import (
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
	r := quicMedians(relay, direct)
	// Ratios by round: handshakes 0.5, 0.3, 0.7; throughput 0.6, 0.25, 0.4.
	want := quicResult{Target: "quic-relay", Rounds: 3, HandshakesPerSec: 60, ThroughputMBps: 80, CPUPerMBms: 5,
		HandshakesXDirect: 0.5, ThroughputXDirect: 0.4}
	if r != want {
		t.Errorf("quicMedians = %+v, want %+v", r, want)
	}
	if d := quicMedians(direct, direct); d.HandshakesXDirect != 1 || d.ThroughputXDirect != 1 {
		t.Errorf("direct's own ratios: %+v", d)
	}
}
