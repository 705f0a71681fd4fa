//go:build linux

package main

import (
	"encoding/json"
	"math"
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
