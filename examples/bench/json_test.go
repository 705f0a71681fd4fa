//go:build linux

package main

import (
	"encoding/json"
	"math"
	"strings"
	"testing"
)

func TestNumJSON(t *testing.T) {
	in := struct {
		A, B, C, D num
		M          map[string]num
	}{A: 1.5, B: nan, C: num(math.Inf(1)), D: 0, M: map[string]num{"x": nan, "y": 2}}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"A":1.5,"B":null,"C":null,"D":0,"M":{"x":null,"y":2}}`
	if string(b) != want {
		t.Errorf("Marshal = %s, want %s", b, want)
	}
	var out struct {
		A, B, C, D num
		M          map[string]num
	}
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if out.A != 1.5 || out.B.known() || out.C.known() || out.D != 0 || out.M["x"].known() || out.M["y"] != 2 {
		t.Errorf("Unmarshal = %+v", out)
	}
	if err := json.Unmarshal([]byte(`{"A":"x"}`), &out); err == nil {
		t.Error("a string: want an error")
	}
}

func TestReportJSON(t *testing.T) {
	r := sampleReport()
	path := t.TempDir()
	files, err := r.write(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 {
		t.Fatalf("wrote %v", files)
	}
	back, err := readReport(files[2])
	if err != nil {
		t.Fatal(err)
	}
	// direct has no CPU time: null in JSON, NaN again when read.
	if back.Runs[0].Target != "direct" || back.Runs[0].CPUPerDgramUS.known() || back.Summary[0].CPUPerDgramUS.known() {
		t.Errorf("direct's CPU: %v, %v", back.Runs[0].CPUPerDgramUS, back.Summary[0].CPUPerDgramUS)
	}
	if back.markdown() != r.markdown() {
		t.Errorf("the report read back renders differently:\n%s\nwant:\n%s", back.markdown(), r.markdown())
	}
}

// TestReportJSONBeforeIdleMemory reads a sweep report written before the Go
// and kernel memory per idle flow were measured: they are unknown, not 0.
func TestReportJSONBeforeIdleMemory(t *testing.T) {
	const old = `{"mode":"sweep","summary":[{"target":"fastflow","flows":10000,"rounds":1,"throughput":100,"mem_per_idle_flow_bytes":13926}],
	"runs":[{"target":"fastflow","round":1,"flows":10000,"throughput":100,"mem_per_idle_flow_bytes":13926}]}`
	var r report
	if err := json.Unmarshal([]byte(old), &r); err != nil {
		t.Fatal(err)
	}
	s, m := r.Summary[0], r.Runs[0]
	if s.GoPerIdleB.known() || s.KernelPerIdleB.known() || s.SocketsPerIdle.known() || s.MemPerIdleB != 13926 {
		t.Errorf("summary: Go %v, kernel %v, sockets %v, RSS %v per idle flow", s.GoPerIdleB, s.KernelPerIdleB, s.SocketsPerIdle, s.MemPerIdleB)
	}
	if m.GoPerIdleFlowB.known() || m.KernelPerIdleFlowB.known() || m.Throughput != 100 || m.MemPerIdleFlowB != 13926 {
		t.Errorf("run: %+v", m)
	}
	if md := r.markdown(); !strings.Contains(md, "| 13.6 KiB | – | – | – | – |") {
		t.Errorf("markdown:\n%s", md)
	}
}
