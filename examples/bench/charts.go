//go:build linux

package main

import (
	"bytes"
	"fmt"
	"image/color"
	"math"
	"slices"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

func init() {
	// Sans-serif text, like the pages around the charts.
	plot.DefaultFont = font.Font{Typeface: "Liberation", Variant: "Sans"}
	plotter.DefaultFont = plot.DefaultFont
}

const (
	chartWidth = 720 // pt: 960 px
	chartPad   = 10  // pt around the figure and between panels
	barWidth   = 10  // pt: one bar of a horizontal bar chart
	valueSize  = 8   // pt: the value labels at the bars' ends
	legendPad  = 3   // pt between legend entries
)

// palette colours the series, in order; glyphs mark them in line charts.
var (
	palette = []color.RGBA{
		{0x4e, 0x79, 0xa7, 0xff}, {0xf2, 0x8e, 0x2b, 0xff}, {0x59, 0xa1, 0x4f, 0xff}, {0xe1, 0x57, 0x59, 0xff},
		{0x76, 0xb7, 0xb2, 0xff}, {0xed, 0xc9, 0x48, 0xff}, {0xb0, 0x7a, 0xa1, 0xff},
	}
	glyphs = []draw.GlyphDrawer{draw.CircleGlyph{}, draw.BoxGlyph{}, draw.PyramidGlyph{}, draw.RingGlyph{}, draw.SquareGlyph{}, draw.TriangleGlyph{}, draw.CrossGlyph{}}
	gray   = color.Gray{Y: 0x55}
)

func seriesColor(i int) color.Color { return palette[i%len(palette)] }

// figure is a chart ready to draw: a title, a subtitle, a legend shared by
// its panels, and the panels, in rows.
type figure struct {
	width, height   vg.Length
	title, subtitle string
	legend          plot.Legend
	entries         int // in the legend
	panels          [][]*plot.Plot
}

// addLegend adds an entry to the figure's legend.
func (f *figure) addLegend(name string, thumbs ...plot.Thumbnailer) {
	f.legend.Add(name, thumbs...)
	f.entries++
}

// svg renders the report's chart.
func (r *report) svg() ([]byte, error) {
	f, err := r.figure()
	if err != nil {
		return nil, err
	}
	c := vgsvg.New(f.width, f.height)
	f.draw(draw.New(c))
	var buf bytes.Buffer
	if _, err := c.WriteTo(&buf); err != nil {
		return nil, fmt.Errorf("SVG: %w", err)
	}
	// Fonts are not embedded (that would add hundreds of kB): name the
	// ones with Liberation's metrics, then any sans-serif.
	return bytes.ReplaceAll(buf.Bytes(), []byte("font-family:Liberation Sans;"),
		[]byte("font-family:Liberation Sans,Arimo,Arial,Helvetica,sans-serif;")), nil
}

// figure is the report's chart: grouped horizontal bars per target
// (compare), or lines over the number of flows (sweep).
func (r *report) figure() (*figure, error) {
	f := &figure{width: chartWidth, legend: plot.NewLegend()}
	f.legend.Top = true
	f.legend.TextStyle.Font.Size = 10
	f.legend.Padding = legendPad
	if r.Meta != nil {
		f.subtitle = fmt.Sprintf("%s · %d CPUs · %s · %s", r.Meta.Date, r.Meta.CPUs, r.Meta.Kernel, r.Meta.GoVersion)
	}
	var targets []string
	for _, s := range r.Summary {
		if !slices.Contains(targets, s.Target) {
			targets = append(targets, s.Target)
		}
	}
	targets = ordered(targets)
	if r.Mode == "sweep" {
		return f, r.sweepFigure(f, targets)
	}
	return f, r.compareFigure(f, targets)
}

// find is the summary row of target t at key k, or nil.
func (r *report) find(t string, k int) *summary {
	for _, s := range r.Summary {
		if s.Target == t && r.rowKey(s) == k {
			return s
		}
	}
	return nil
}

// compareFigure is two panels of horizontal bars, throughput and CPU per
// datagram: one group per target, one bar per payload.
func (r *report) compareFigure(f *figure, targets []string) error {
	f.title = "caddy-stabilize: UDP balancers on 127.0.0.1 (medians)"
	payloads := r.rowKeys()
	var series []string
	tp := make([][]num, len(payloads))
	cpu := make([][]num, len(payloads))
	for j, p := range payloads {
		series = append(series, fmt.Sprintf("%d B", p))
		for _, t := range targets {
			v, c := nan, nan
			if s := r.find(t, p); s != nil {
				v, c = s.Throughput, s.CPUPerDgramUS
			}
			tp[j] = append(tp[j], v)
			cpu[j] = append(cpu[j], c)
		}
		f.addLegend(series[j], &plotter.BarChart{Color: seriesColor(j)})
	}
	var groups []string
	for _, t := range targets {
		groups = append(groups, targetLabels[t])
	}
	p1, err := barPanel("Throughput (datagrams/s, higher is better)", groups, tp)
	if err != nil {
		return err
	}
	p2, err := barPanel("Balancer CPU per datagram (µs, lower is better; direct has no balancer)", groups, cpu)
	if err != nil {
		return err
	}
	f.panels = [][]*plot.Plot{{p1}, {p2}}
	// Each group is as tall as its bars and a gap; 70 pt for the panel's
	// title and x axis.
	panelH := vg.Length(len(groups))*(vg.Length(len(series))*barWidth+8) + 70
	f.height = f.headerHeight() + 2*panelH + chartPad
	return nil
}

// barPanel is a chart of horizontal bars, groups top to bottom, one bar per
// series in each, with its value at its end ("n/a" for unknown).
func barPanel(title string, groups []string, values [][]num) (*plot.Plot, error) {
	p := newPanel(title)
	p.X.Min = 0
	p.X.Tick.Marker = compactTicks{}
	grid := plotter.NewGrid()
	grid.Horizontal.Color = nil
	p.Add(grid)
	n := len(groups)
	for j, vs := range values {
		bars := make(plotter.Values, n)
		labels := plotter.XYLabels{XYs: make(plotter.XYs, n), Labels: make([]string, n)}
		for i, v := range vs {
			// The first group is drawn at the top: y = n-1.
			y := n - 1 - i
			label := compact(float64(v))
			if !v.known() {
				v, label = 0, "n/a"
			}
			bars[y] = float64(v)
			labels.XYs[y] = plotter.XY{X: float64(v), Y: float64(y)}
			labels.Labels[y] = label
		}
		b, err := plotter.NewBarChart(bars, barWidth)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", title, err)
		}
		b.Horizontal = true
		b.Color = seriesColor(j)
		b.LineStyle.Color = b.Color
		// The first series on top within a group.
		b.Offset = (vg.Length(len(values)-1)/2 - vg.Length(j)) * barWidth
		l, err := plotter.NewLabels(labels)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", title, err)
		}
		l.Offset = vg.Point{X: 3, Y: b.Offset}
		for i := range l.TextStyle {
			l.TextStyle[i].Font.Size = valueSize
			l.TextStyle[i].XAlign = draw.XLeft
			l.TextStyle[i].YAlign = draw.YCenter
			if labels.Labels[i] == "n/a" {
				l.TextStyle[i].Color = gray
			}
		}
		p.Add(b, l)
	}
	names := slices.Clone(groups)
	slices.Reverse(names)
	p.NominalY(names...)
	return p, nil
}

// sweepFigure is four panels of lines over the number of flows, one line
// per target: throughput, CPU per datagram, and memory per live and per
// idle flow on a log scale.
func (r *report) sweepFigure(f *figure, targets []string) error {
	f.title = "caddy-stabilize: concurrent flows sweep (medians)"
	for j, t := range targets {
		line, points := seriesStyle(j)
		f.addLegend(targetLabels[t], line, points)
	}
	type panel struct {
		title string
		get   func(*summary) num
		log   bool
	}
	panels := []panel{
		{"Throughput (datagrams/s, higher is better)", func(s *summary) num { return s.Throughput }, false},
		{"Balancer CPU per datagram (µs, lower is better)", func(s *summary) num { return s.CPUPerDgramUS }, false},
		{"Memory per live flow under load (KiB, log scale)", func(s *summary) num { return s.MemPerFlowB / 1024 }, true},
		{"Memory per idle flow, 3 s after the load (KiB, log scale)", func(s *summary) num { return s.MemPerIdleB / 1024 }, true},
	}
	var plots []*plot.Plot
	for _, pn := range panels {
		p, err := r.linePanel(pn.title, targets, pn.get, pn.log)
		if err != nil {
			return err
		}
		plots = append(plots, p)
	}
	f.panels = [][]*plot.Plot{plots[:2], plots[2:]}
	f.height = f.headerHeight() + 2*300 + chartPad
	return nil
}

// linePanel is one line per target of get over the number of flows, on a
// log x axis; on a log y axis when logY, where values ≤ 0 (noise at few
// flows) are left out.
func (r *report) linePanel(title string, targets []string, get func(*summary) num, logY bool) (*plot.Plot, error) {
	p := newPanel(title)
	p.Add(plotter.NewGrid())
	p.X.Label.Text = "concurrent flows"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Y.Tick.Marker = compactTicks{}
	p.Y.Min = 0
	var flows, ys []float64
	for _, s := range r.Summary {
		flows = append(flows, float64(s.Flows))
	}
	for j, t := range targets {
		var xys plotter.XYs
		for _, s := range r.Summary {
			if v := get(s); s.Target == t && v.known() && (!logY || v > 0) {
				xys = append(xys, plotter.XY{X: float64(s.Flows), Y: float64(v)})
				ys = append(ys, float64(v))
			}
		}
		if len(xys) == 0 {
			continue
		}
		line, points, err := plotter.NewLinePoints(xys)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", title, err)
		}
		sl, sp := seriesStyle(j)
		line.LineStyle, points.GlyphStyle = sl.LineStyle, sp.GlyphStyle
		p.Add(line, points)
	}
	if len(flows) > 0 {
		// Every panel spans every flow count, in whole decades, so that
		// a log axis has a label at each end.
		p.X.Min, p.X.Max = decades(slices.Min(flows), slices.Max(flows))
	}
	if logY && len(ys) > 0 {
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		p.Y.Min, p.Y.Max = decades(slices.Min(ys), slices.Max(ys))
	}
	return p, nil
}

// seriesStyle is the line and glyph of series j, as legend thumbnails.
func seriesStyle(j int) (*plotter.Line, *plotter.Scatter) {
	l := &plotter.Line{LineStyle: plotter.DefaultLineStyle}
	l.LineStyle.Color = seriesColor(j)
	l.LineStyle.Width = vg.Points(1.5)
	s := &plotter.Scatter{GlyphStyle: draw.GlyphStyle{Color: seriesColor(j), Radius: vg.Points(3), Shape: glyphs[j%len(glyphs)]}}
	return l, s
}

// decades widens [lo, hi] (both > 0) to powers of ten.
func decades(lo, hi float64) (float64, float64) {
	lo = math.Pow(10, math.Floor(math.Log10(lo)))
	hi = math.Pow(10, math.Ceil(math.Log10(hi)))
	if hi <= lo {
		hi = lo * 10
	}
	return lo, hi
}

// newPanel is a plot with a title.
func newPanel(title string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.Title.TextStyle.Font.Size = 11
	p.Title.Padding = 6
	return p
}

// headerHeight is the height of the title, the subtitle and the legend.
func (f *figure) headerHeight() vg.Length {
	legend := vg.Length(f.entries) * (f.legend.TextStyle.Height("M") + legendPad)
	return max(44, legend) + 2*chartPad
}

// draw draws the figure on c: the title and subtitle top left, the legend
// top right, and the panels below, their axes aligned.
func (f *figure) draw(c draw.Canvas) {
	c.FillPolygon(color.White, []vg.Point{c.Min, {X: c.Min.X, Y: c.Max.Y}, c.Max, {X: c.Max.X, Y: c.Min.Y}})
	head := draw.Crop(c, chartPad, -chartPad, 0, -chartPad)
	sty := text.Style{Color: color.Black, Font: font.From(plot.DefaultFont, 15), Handler: plot.DefaultTextHandler, YAlign: draw.YTop}
	c.FillText(sty, vg.Point{X: head.Min.X, Y: head.Max.Y}, f.title)
	sty.Font.Size, sty.Color = 9, gray
	c.FillText(sty, vg.Point{X: head.Min.X, Y: head.Max.Y - 24}, f.subtitle)
	f.legend.Draw(head)
	body := draw.Crop(c, 0, 0, 0, -f.headerHeight())
	tiles := draw.Tiles{
		Rows: len(f.panels), Cols: len(f.panels[0]),
		PadX: 2 * chartPad, PadY: 2 * chartPad,
		PadLeft: chartPad, PadRight: chartPad, PadBottom: chartPad,
	}
	for i, row := range plot.Align(f.panels, tiles, body) {
		for j, pc := range row {
			f.panels[i][j].Draw(pc)
		}
	}
}

// compactTicks are about five ticks at 1, 2, 2.5 or 5 × 10^k, labelled
// briefly: 50k, not 50000.
type compactTicks struct{}

// Ticks implements plot.Ticker.
func (compactTicks) Ticks(lo, hi float64) []plot.Tick {
	if !(hi > lo) {
		return []plot.Tick{{Value: lo, Label: compact(lo)}}
	}
	raw := (hi - lo) / 5
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := 10 * mag
	for _, m := range []float64{1, 2, 2.5, 5} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	var ticks []plot.Tick
	for i := math.Ceil(lo / step); i*step <= hi*(1+1e-9); i++ {
		ticks = append(ticks, plot.Tick{Value: i * step, Label: compact(i * step)})
	}
	return ticks
}

// compact formats v briefly: 123456 → 123k, 1.5e6 → 1.5M, 3.14159 → 3.14.
func compact(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e6:
		return trimZeros(fmt.Sprintf("%.2f", v/1e6)) + "M"
	case a >= 1e4:
		return fmt.Sprintf("%.0fk", v/1e3)
	case a >= 1e3:
		return trimZeros(fmt.Sprintf("%.1f", v/1e3)) + "k"
	case a >= 100 || a == 0:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return trimZeros(fmt.Sprintf("%.1f", v))
	default:
		return trimZeros(fmt.Sprintf("%.2f", v))
	}
}

func trimZeros(s string) string {
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

// Interface guards.
var _ plot.Ticker = compactTicks{}
