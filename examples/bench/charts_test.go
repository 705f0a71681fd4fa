//go:build linux

package main

import (
	"path/filepath"
	"strings"
	"testing"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/recorder"
)

// textBox is where a string was drawn.
type textBox struct {
	s string
	r vg.Rectangle
}

// drawnText draws f on a recorder and returns the box of every string on
// it; it fails the test on rotated text, which it cannot place.
func drawnText(t *testing.T, f *figure) []textBox {
	t.Helper()
	rec := &recorder.Canvas{}
	f.draw(draw.NewCanvas(rec, f.width, f.height))
	var boxes []textBox
	for _, a := range rec.Actions {
		switch a := a.(type) {
		case *recorder.Rotate, *recorder.Translate, *recorder.Scale:
			t.Fatalf("%s: the check places only upright text", a.Call())
		case *recorder.FillString:
			face := font.DefaultCache.Lookup(a.Font, a.Size)
			e := face.Extents()
			boxes = append(boxes, textBox{a.String, vg.Rectangle{
				Min: vg.Point{X: a.Point.X, Y: a.Point.Y - e.Descent},
				Max: vg.Point{X: a.Point.X + face.Width(a.String), Y: a.Point.Y + e.Ascent},
			}})
		}
	}
	return boxes
}

// checkNoOverlap fails when two strings of r's chart overlap or one leaves
// the canvas.
func checkNoOverlap(t *testing.T, r *report) {
	t.Helper()
	f, err := r.figure()
	if err != nil {
		t.Fatal(err)
	}
	boxes := drawnText(t, f)
	if len(boxes) < 20 {
		t.Fatalf("only %d strings drawn", len(boxes))
	}
	const slack = 0.5 // pt
	for i, a := range boxes {
		if a.r.Min.X < 0 || a.r.Min.Y < 0 || a.r.Max.X > f.width || a.r.Max.Y > f.height {
			t.Errorf("%q at %v leaves the %v × %v canvas", a.s, a.r, f.width, f.height)
		}
		for _, b := range boxes[i+1:] {
			if a.r.Min.X < b.r.Max.X-slack && b.r.Min.X < a.r.Max.X-slack &&
				a.r.Min.Y < b.r.Max.Y-slack && b.r.Min.Y < a.r.Max.Y-slack {
				t.Errorf("%q at %v overlaps %q at %v", a.s, a.r, b.s, b.r)
			}
		}
	}
}

func TestChartTextDoesNotOverlap(t *testing.T) {
	t.Run("sample", func(t *testing.T) { checkNoOverlap(t, sampleReport()) })
	t.Run("sweep sample", func(t *testing.T) { checkNoOverlap(t, sampleSweep()) })
	for _, name := range []string{"results.json", "sweep.json"} {
		t.Run(name, func(t *testing.T) {
			r, err := readReport(filepath.Join("results", name))
			if err != nil {
				t.Fatal(err)
			}
			checkNoOverlap(t, r)
		})
	}
}

// sampleSweep is a sweep of two targets whose memory per flow at one flow
// is ≤ 0, as it can be (RSS noise).
func sampleSweep() *report {
	r := &report{Mode: "sweep", Meta: &meta{Date: "2026-01-01 00:00 UTC", CPUs: 2, Kernel: "Linux 6.0", GoVersion: "go1.26"}}
	for _, n := range []int{1, 10, 100, 1000, 10000} {
		for i, tg := range []string{"flow", "proxy"} {
			m := &measurement{Target: tg, Round: 1, Payload: 64, Flows: n, Window: 1, Sent: 10, Received: 10}
			m.setNaN()
			m.Throughput, m.CPUPerDgramUS = num(1000*n), 20
			m.MemPerFlowB = num(100000/n + 2000*i)
			m.MemPerIdleFlowB = m.MemPerFlowB
			if n == 1 {
				m.MemPerFlowB, m.MemPerIdleFlowB = -4096, 0
			}
			r.Runs = append(r.Runs, m)
		}
	}
	r.summarize()
	return r
}

func TestSweepChartLogScale(t *testing.T) {
	f, err := sampleSweep().figure()
	if err != nil {
		t.Fatal(err)
	}
	if len(f.panels) != 2 || len(f.panels[0]) != 2 || f.entries != 2 {
		t.Fatalf("%d×%d panels, %d legend entries", len(f.panels), len(f.panels[0]), f.entries)
	}
	for i, row := range f.panels {
		for j, p := range row {
			if _, ok := p.X.Scale.(plot.LogScale); !ok || p.X.Min != 1 || p.X.Max != 10000 {
				t.Errorf("panel %d,%d: x axis %T [%v, %v], want log [1, 10000]", i, j, p.X.Scale, p.X.Min, p.X.Max)
			}
			_, logY := p.Y.Scale.(plot.LogScale)
			if logY != (i == 1) {
				t.Errorf("panel %d,%d (%s): log y axis %v", i, j, p.Title.Text, logY)
			}
		}
	}
	// Memory per flow runs from 10 B (flow at 10000 flows) to 12 000 B
	// (proxy at 10 flows), 0.0098 to 11.7 KiB; 1 flow (≤ 0) is left out.
	mem := f.panels[1][0]
	if mem.Y.Min != 0.001 || mem.Y.Max != 100 {
		t.Errorf("memory axis [%v, %v], want [0.001, 100] KiB", mem.Y.Min, mem.Y.Max)
	}
	// Drawing must not panic on a log axis.
	checkNoOverlap(t, sampleSweep())
}

func TestCompactTicks(t *testing.T) {
	for _, c := range []struct {
		lo, hi float64
		want   string
	}{
		{0, 195329, "0 50k 100k 150k"},
		{0, 16, "0 5 10 15"},
		{0, 0.7, "0 0.2 0.4 0.6"},
		{3, 3, "3"},
	} {
		var got []string
		for _, tk := range (compactTicks{}).Ticks(c.lo, c.hi) {
			got = append(got, tk.Label)
		}
		if strings.Join(got, " ") != c.want {
			t.Errorf("Ticks(%v, %v) = %q, want %q", c.lo, c.hi, got, c.want)
		}
	}
}
