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
}
