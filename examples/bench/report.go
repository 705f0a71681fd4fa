package main

import (
	"encoding/json"
	"fmt"
	"html"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// meta describes the machine and the parameters of a run.
type meta struct {
	Date       string   `json:"date"`
	CPUs       int      `json:"cpus"`
	CPUModel   string   `json:"cpu_model"`
	Kernel     string   `json:"kernel"`
	GoVersion  string   `json:"go_version"`
	Versions   []string `json:"versions"` // caddy, caddy-l4, nginx
	Command    string   `json:"command"`
	Parameters []string `json:"parameters"`
	Targets    []string `json:"targets"`
	Skipped    []string `json:"skipped,omitempty"`
	Elapsed    string   `json:"elapsed"`
}

func collectMeta(e *benchEnv, o *options) *meta {
	m := &meta{
		Date:      time.Now().UTC().Format("2006-01-02 15:04 MST"),
		CPUs:      runtime.NumCPU(),
		CPUModel:  cpuModel(),
		Kernel:    kernelRelease(),
		GoVersion: e.goVersion,
		Command:   "go run ./examples/bench " + strings.Join(os.Args[1:], " "),
		Targets:   e.targets,
	}
	m.Command = strings.TrimSpace(m.Command)
	if e.root != "" {
		if b, err := os.ReadFile(filepath.Join(e.root, "go.mod")); err == nil {
			m.Versions = moduleVersions(string(b))
		}
	}
	if e.nginx != nil {
		m.Versions = append(m.Versions, e.nginx.version+", worker_processes "+o.nginxWorkers)
	}
	if e.nginxSkip != "" {
		m.Skipped = append(m.Skipped, "nginx: "+e.nginxSkip)
	}
	switch o.mode {
	case "compare":
		m.Parameters = []string{
			fmt.Sprintf("%d flows × %d datagrams outstanding (closed loop)", o.flows, o.window),
			fmt.Sprintf("payloads %s bytes", joinInts(o.payloads, ", ")),
			fmt.Sprintf("%v measured after %v warm-up, per target per round; %d interleaved rounds, medians reported", o.duration, o.warmup, o.rounds),
			fmt.Sprintf("loss timeout %v", o.timeout),
		}
	case "sweep":
		m.Parameters = []string{
			fmt.Sprintf("flows %s, each with %d datagram(s) outstanding (closed loop)", joinInts(o.sweepFlows, ", "), o.sweepWindow),
			fmt.Sprintf("payload %d bytes", o.sweepPayload),
			fmt.Sprintf("%v measured after a warm-up of max(%v, ramp + 500ms) (flows start spread over min(N × 100µs, 1s)); %d interleaved round(s), medians reported", o.duration, o.warmup, o.rounds),
			fmt.Sprintf("loss timeout %v", o.timeout),
		}
	}
	m.Parameters = append(m.Parameters,
		fmt.Sprintf("%d in-process udpecho upstreams (their CPU, and the load generator's, compete with the balancer's on the same cores); upstream and load-generator sockets: %s", numUpstreams, e.upBuf))
	for _, t := range e.targets {
		if gomaxprocsOne(t) {
			m.Parameters = append(m.Parameters, "targets \"…, GOMAXPROCS=1\": the same balancer with GOMAXPROCS=1 in its environment (the benchmark itself keeps every core)")
			break
		}
	}
	return m
}

var modVersionRe = regexp.MustCompile(`(?m)^\s*(github\.com/caddyserver/caddy/v2|github\.com/mholt/caddy-l4|github\.com/quic-go/quic-go)\s+(\S+)`)

// moduleVersions picks the pinned Caddy, caddy-l4 and quic-go from go.mod.
func moduleVersions(gomod string) []string {
	var out []string
	for _, m := range modVersionRe.FindAllStringSubmatch(gomod, -1) {
		name := m[1][strings.LastIndex(m[1], "/")+1:]
		if name == "v2" {
			name = "caddy"
		}
		out = append(out, name+" "+m[2])
	}
	return out
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func kernelRelease() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return "unknown"
	}
	var sb strings.Builder
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		sb.WriteByte(byte(c))
	}
	return "Linux " + sb.String()
}

func joinInts(xs []int, sep string) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprint(x)
	}
	return strings.Join(s, sep)
}

// report is the result of a run: every measurement and their medians.
type report struct {
	Mode    string         `json:"mode"`
	Meta    *meta          `json:"meta"`
	Summary []*summary     `json:"summary"`
	Runs    []*measurement `json:"runs"`
}

// summary is the medians over the rounds of one target at one payload
// (compare) or flow count (sweep), with ratios against caddy-l4 proxy in
// the same run.
type summary struct {
	Target        string  `json:"target"`
	Payload       int     `json:"payload"`
	Flows         int     `json:"flows"`
	Rounds        int     `json:"rounds"` // measurements without error
	Throughput    float64 `json:"throughput"`
	ThroughputMin float64 `json:"throughput_min"`
	ThroughputMax float64 `json:"throughput_max"`
	P50US         float64 `json:"p50_us"`
	P99US         float64 `json:"p99_us"`
	P999US        float64 `json:"p999_us"`
	LossPct       float64 `json:"loss_pct"`
	CPUPerDgramUS float64 `json:"cpu_us_per_datagram"`
	PeakRSSKB     float64 `json:"peak_rss_kb"`
	RSSBaseKB     float64 `json:"rss_base_kb"`
	RSSLiveKB     float64 `json:"rss_live_kb"`
	RSSIdleKB     float64 `json:"rss_idle_kb"`
	MemPerFlowB   float64 `json:"mem_per_flow_bytes"`
	MemPerIdleB   float64 `json:"mem_per_idle_flow_bytes"`
	// Median kernel drops per socket role, over the rounds.
	KernelDrops map[string]uint64 `json:"kernel_drops,omitempty"`
	Errors      []string          `json:"errors,omitempty"`
	// Ratios of this row's medians to caddy-l4 proxy's (NaN when proxy was
	// not measured): throughput, p50, p99, p99.9, CPU per datagram, peak
	// RSS, memory per flow, memory per idle flow.
	VsProxy map[string]float64 `json:"vs_proxy,omitempty"`
}

// key is what a summary row groups by: the payload in compare mode, the
// flow count in sweep mode.
func (r *report) key(m *measurement) int {
	if r.Mode == "sweep" {
		return m.Flows
	}
	return m.Payload
}

// summarize computes the medians and ratios, ordered by key, then target.
func (r *report) summarize() {
	type gk struct {
		key    int
		target string
	}
	groups := map[gk][]*measurement{}
	var keys []int
	seenKey := map[int]bool{}
	seenTarget := map[string]bool{}
	for _, m := range r.Runs {
		k := r.key(m)
		groups[gk{k, m.Target}] = append(groups[gk{k, m.Target}], m)
		if !seenKey[k] {
			seenKey[k] = true
			keys = append(keys, k)
		}
		seenTarget[m.Target] = true
	}
	r.Summary = nil
	for _, k := range keys {
		var proxy *summary
		var rows []*summary
		for _, t := range targetOrder {
			ms := groups[gk{k, t}]
			if len(ms) == 0 {
				continue
			}
			s := summarizeRuns(ms)
			rows = append(rows, s)
			if t == "proxy" {
				proxy = s
			}
		}
		if proxy != nil {
			for _, s := range rows {
				s.VsProxy = map[string]float64{
					"throughput":        ratio(s.Throughput, proxy.Throughput),
					"p50":               ratio(s.P50US, proxy.P50US),
					"p99":               ratio(s.P99US, proxy.P99US),
					"p99.9":             ratio(s.P999US, proxy.P999US),
					"loss":              ratio(s.LossPct, proxy.LossPct),
					"cpu_per_datagram":  ratio(s.CPUPerDgramUS, proxy.CPUPerDgramUS),
					"peak_rss":          ratio(s.PeakRSSKB, proxy.PeakRSSKB),
					"mem_per_flow":      ratio(s.MemPerFlowB, proxy.MemPerFlowB),
					"mem_per_idle_flow": ratio(s.MemPerIdleB, proxy.MemPerIdleB),
				}
			}
		}
		r.Summary = append(r.Summary, rows...)
	}
}

func summarizeRuns(ms []*measurement) *summary {
	s := &summary{Target: ms[0].Target, Payload: ms[0].Payload, Flows: ms[0].Flows}
	var tp, p50, p99, p999, loss, cpu, rss, base, live, idle, perFlow, perIdle []float64
	s.ThroughputMin, s.ThroughputMax = math.NaN(), math.NaN()
	for _, m := range ms {
		if m.Err != "" {
			s.Errors = append(s.Errors, fmt.Sprintf("round %d: %s", m.Round, m.Err))
			if m.Sent == 0 {
				continue
			}
		}
		s.Rounds++
		tp = append(tp, m.Throughput)
		p50 = append(p50, m.P50US)
		p99 = append(p99, m.P99US)
		p999 = append(p999, m.P999US)
		loss = append(loss, m.LossPct)
		cpu = append(cpu, m.CPUPerDgramUS)
		rss = append(rss, kbOrNaN(m.PeakRSSKB))
		base = append(base, kbOrNaN(m.RSSBaseKB))
		live = append(live, kbOrNaN(m.RSSLiveKB))
		idle = append(idle, kbOrNaN(m.RSSIdleKB))
		perFlow = append(perFlow, m.MemPerFlowB)
		perIdle = append(perIdle, m.MemPerIdleFlowB)
		if math.IsNaN(s.ThroughputMin) || m.Throughput < s.ThroughputMin {
			s.ThroughputMin = m.Throughput
		}
		if math.IsNaN(s.ThroughputMax) || m.Throughput > s.ThroughputMax {
			s.ThroughputMax = m.Throughput
		}
	}
	for _, role := range dropRoles {
		var v []float64
		for _, m := range ms {
			if m.Err == "" || m.Sent > 0 {
				v = append(v, float64(m.KernelDrops[role]))
			}
		}
		if d := median(v); d > 0 {
			if s.KernelDrops == nil {
				s.KernelDrops = map[string]uint64{}
			}
			s.KernelDrops[role] = uint64(math.Round(d))
		}
	}
	s.Throughput, s.P50US, s.P99US, s.P999US = median(tp), median(p50), median(p99), median(p999)
	s.LossPct, s.CPUPerDgramUS, s.PeakRSSKB = median(loss), median(cpu), median(rss)
	s.RSSBaseKB, s.RSSLiveKB, s.MemPerFlowB = median(base), median(live), median(perFlow)
	s.RSSIdleKB, s.MemPerIdleB = median(idle), median(perIdle)
	return s
}

var dropRoles = []string{dropListener, dropBalUp, dropUpstreams, dropClients}

// fmtDrops formats kernel drops by role: "listener 12, clients 3".
func fmtDrops(d map[string]uint64) string {
	var parts []string
	for _, role := range dropRoles {
		if d[role] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", role, d[role]))
		}
	}
	return strings.Join(parts, ", ")
}

func kbOrNaN(kb int64) float64 {
	if kb <= 0 {
		return math.NaN()
	}
	return float64(kb)
}

func ratio(a, b float64) float64 {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return math.NaN()
	}
	return a / b
}

// write saves the Markdown, SVG and JSON into dir and returns their paths.
func (r *report) write(dir string) ([]string, error) {
	base := "results"
	if r.Mode == "sweep" {
		base = "sweep"
	}
	js, err := json.MarshalIndent(jsonSafe(r), "", "  ")
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{
		base + ".md":   []byte(r.markdown()),
		base + ".svg":  []byte(r.svg()),
		base + ".json": append(js, '\n'),
	}
	var paths []string
	for _, name := range []string{base + ".md", base + ".svg", base + ".json"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, files[name], 0o644); err != nil {
			return nil, err
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// jsonSafe turns v into plain maps, slices and values, with NaN and ±Inf
// as null, which encoding/json cannot encode.
func jsonSafe(v any) any {
	return jsonValue(reflect.ValueOf(v))
}

func jsonValue(v reflect.Value) any {
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if v.IsNil() {
			return nil
		}
		return jsonValue(v.Elem())
	case reflect.Float32, reflect.Float64:
		f := v.Float()
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return nil
		}
		return f
	case reflect.Slice, reflect.Array:
		if v.Kind() == reflect.Slice && v.IsNil() {
			return nil
		}
		out := make([]any, v.Len())
		for i := range out {
			out[i] = jsonValue(v.Index(i))
		}
		return out
	case reflect.Map:
		out := map[string]any{}
		for _, k := range v.MapKeys() {
			out[fmt.Sprint(k.Interface())] = jsonValue(v.MapIndex(k))
		}
		return out
	case reflect.Struct:
		out := map[string]any{}
		t := v.Type()
		for i := range t.NumField() {
			f := t.Field(i)
			if !f.IsExported() {
				continue
			}
			name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "-" {
				continue
			}
			if name == "" {
				name = f.Name
			}
			fv := v.Field(i)
			if strings.Contains(opts, "omitempty") && fv.IsZero() {
				continue
			}
			out[name] = jsonValue(fv)
		}
		return out
	default:
		return v.Interface()
	}
}

// markdown renders the report.
func (r *report) markdown() string {
	var sb strings.Builder
	m := r.Meta
	if r.Mode == "sweep" {
		sb.WriteString("# caddy-stabilize benchmark: concurrent flows sweep\n\n")
	} else {
		sb.WriteString("# caddy-stabilize benchmark\n\n")
	}
	if m != nil {
		fmt.Fprintf(&sb, "- Date: %s\n", m.Date)
		fmt.Fprintf(&sb, "- Machine: %d CPUs (%s), %s\n", m.CPUs, m.CPUModel, m.Kernel)
		fmt.Fprintf(&sb, "- Go: %s\n", m.GoVersion)
		if len(m.Versions) > 0 {
			fmt.Fprintf(&sb, "- Versions: %s\n", strings.Join(m.Versions, ", "))
		}
		fmt.Fprintf(&sb, "- Command: `%s` (took %s)\n", m.Command, m.Elapsed)
		for _, p := range m.Parameters {
			fmt.Fprintf(&sb, "- %s\n", p)
		}
		for _, s := range m.Skipped {
			fmt.Fprintf(&sb, "- Skipped: %s\n", s)
		}
		sb.WriteString("\n")
	}
	if r.Mode == "sweep" {
		r.sweepTables(&sb)
	} else {
		r.compareTables(&sb)
	}
	r.errorList(&sb)
	return sb.String()
}

func (r *report) compareTables(sb *strings.Builder) {
	var keys []int
	for _, s := range r.Summary {
		if len(keys) == 0 || keys[len(keys)-1] != s.Payload {
			keys = append(keys, s.Payload)
		}
	}
	for _, k := range keys {
		fmt.Fprintf(sb, "## Payload %d bytes\n\n", k)
		sb.WriteString("| target | datagrams/s | p50 µs | p99 µs | p99.9 µs | loss | CPU µs/datagram | peak RSS MiB | kernel drops |\n")
		sb.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|---|\n")
		for _, s := range r.Summary {
			if s.Payload != k {
				continue
			}
			fmt.Fprintf(sb, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
				targetLabels[s.Target],
				withRatio(fmtInt(s.Throughput), s, "throughput"),
				withRatio(fmtNum(s.P50US), s, "p50"),
				withRatio(fmtNum(s.P99US), s, "p99"),
				withRatio(fmtNum(s.P999US), s, "p99.9"),
				fmtPct(s.LossPct),
				withRatio(fmtNum(s.CPUPerDgramUS), s, "cpu_per_datagram"),
				withRatio(fmtMiB(s.PeakRSSKB), s, "peak_rss"),
				orDash(fmtDrops(s.KernelDrops)))
		}
		sb.WriteString("\n")
	}
	sb.WriteString(legendCompare)
	r.roundsTable(sb)
}

const legendCompare = `Medians over the rounds; (×n) is the ratio to caddy-l4 proxy in the same run.
datagrams/s: replies received per second (each is one request forwarded and one reply relayed).
Latency: send → reply, per datagram. Loss: requests with no reply within the loss timeout.
CPU µs/datagram: the balancer process's user+system CPU time (/proc/<pid>/stat; nginx: master + workers)
during the measured window, divided by the replies received. Peak RSS: VmHWM of a fresh balancer process
(nginx: master + workers summed). direct has no balancer. The ceiling is caddy-l4's echo handler: a
layer4 UDP server that writes each datagram back, with no upstream hop. Kernel drops: datagrams the
kernel dropped during the window because a socket's receive buffer was full (/proc/net/udp), by socket:
listener (the balancer's client-facing socket), balancer_up (its upstream-facing sockets), upstreams
(the echo servers), clients (the load generator's); medians over the rounds. "…, GOMAXPROCS=1": the
same balancer with GOMAXPROCS=1 in its environment only; its ratios are still to caddy-l4 proxy with
the default GOMAXPROCS (every core).

`

// roundsTable lists throughput per round, to show the noise.
func (r *report) roundsTable(sb *strings.Builder) {
	rounds := 0
	for _, m := range r.Runs {
		rounds = max(rounds, m.Round)
	}
	if rounds < 2 {
		return
	}
	sb.WriteString("<details><summary>Throughput per round (datagrams/s)</summary>\n\n| target | key |")
	for i := 1; i <= rounds; i++ {
		fmt.Fprintf(sb, " round %d |", i)
	}
	sb.WriteString("\n|---|--:|" + strings.Repeat("--:|", rounds) + "\n")
	for _, s := range r.Summary {
		key := fmt.Sprintf("%d B", s.Payload)
		if r.Mode == "sweep" {
			key = fmt.Sprintf("%d flows", s.Flows)
		}
		fmt.Fprintf(sb, "| %s | %s |", targetLabels[s.Target], key)
		for i := 1; i <= rounds; i++ {
			v := "–"
			for _, m := range r.Runs {
				if m.Round == i && m.Target == s.Target && r.key(m) == r.key(&measurement{Payload: s.Payload, Flows: s.Flows}) {
					v = fmtInt(m.Throughput)
				}
			}
			fmt.Fprintf(sb, " %s |", v)
		}
		sb.WriteString("\n")
	}
	sb.WriteString("\n</details>\n\n")
}

func (r *report) sweepTables(sb *strings.Builder) {
	sb.WriteString("| flows | target | datagrams/s | p50 µs | p99 µs | loss | CPU µs/datagram | RSS before MiB | RSS live MiB | memory per flow | RSS idle MiB | memory per idle flow | kernel drops |\n")
	sb.WriteString("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n")
	for _, s := range r.Summary {
		fmt.Fprintf(sb, "| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			s.Flows, targetLabels[s.Target],
			withRatio(fmtInt(s.Throughput), s, "throughput"),
			withRatio(fmtNum(s.P50US), s, "p50"),
			withRatio(fmtNum(s.P99US), s, "p99"),
			fmtPct(s.LossPct),
			withRatio(fmtNum(s.CPUPerDgramUS), s, "cpu_per_datagram"),
			fmtMiB(s.RSSBaseKB), fmtMiB(s.RSSLiveKB),
			withRatio(fmtBytes(s.MemPerFlowB), s, "mem_per_flow"),
			fmtMiB(s.RSSIdleKB),
			withRatio(fmtBytes(s.MemPerIdleB), s, "mem_per_idle_flow"),
			orDash(fmtDrops(s.KernelDrops)))
	}
	sb.WriteString("\n")
	sb.WriteString(legendSweep)
	r.roundsTable(sb)
}

const legendSweep = `Medians over the rounds; (×n) is the ratio to caddy-l4 proxy at the same flow count.
Each flow is one client socket with the given window of datagrams outstanding (closed loop).
RSS before: the balancer's VmRSS after start-up, before the load; RSS live: its VmRSS at the end of the
measured window, with every flow live. Memory per flow = (RSS live − RSS before) / flows: it includes
the Go heap's slack, so small flow counts are noise. RSS idle: its VmRSS 3 s after the load generator
stopped (last request answered or given up on), every flow still live (the idle timeout is 60 s);
memory per idle flow = (RSS idle − RSS before) / flows. Kernel drops: as in the compare report (full
receive buffers during the window, by socket: listener, balancer_up, upstreams, clients).

`

func (r *report) errorList(sb *strings.Builder) {
	first := true
	for _, s := range r.Summary {
		for _, e := range s.Errors {
			if first {
				sb.WriteString("## Errors\n\n")
				first = false
			}
			fmt.Fprintf(sb, "- %s, %s: %s\n", targetLabels[s.Target], r.rowKey(s), oneLineErr(e))
		}
	}
	if !first {
		sb.WriteString("\n")
	}
}

func (r *report) rowKey(s *summary) string {
	if r.Mode == "sweep" {
		return fmt.Sprintf("%d flows", s.Flows)
	}
	return fmt.Sprintf("%d B", s.Payload)
}

func oneLineErr(e string) string {
	e = strings.Join(strings.Fields(e), " ")
	if len(e) > 300 {
		e = e[:300] + "…"
	}
	return e
}

func withRatio(v string, s *summary, key string) string {
	if s.VsProxy == nil || s.Target == "proxy" {
		return v
	}
	x, ok := s.VsProxy[key]
	if !ok || math.IsNaN(x) || math.IsInf(x, 0) {
		return v
	}
	return fmt.Sprintf("%s (×%.2f)", v, x)
}

func orDash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

func fmtInt(x float64) string {
	if math.IsNaN(x) {
		return "–"
	}
	s := fmt.Sprintf("%.0f", x)
	// Thin groups of three digits.
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 && s[i-1] != '-' {
			out = append(out, ' ')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func fmtNum(x float64) string {
	switch {
	case math.IsNaN(x):
		return "–"
	case x >= 100:
		return fmtInt(x)
	case x >= 10:
		return fmt.Sprintf("%.1f", x)
	default:
		return fmt.Sprintf("%.2f", x)
	}
}

func fmtPct(x float64) string {
	if math.IsNaN(x) {
		return "–"
	}
	if x == 0 {
		return "0"
	}
	return fmt.Sprintf("%.3f%%", x)
}

func fmtMiB(kb float64) string {
	if math.IsNaN(kb) || kb <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f", kb/1024)
}

func fmtBytes(b float64) string {
	switch {
	case math.IsNaN(b):
		return "–"
	case math.Abs(b) >= 10*1024:
		return fmt.Sprintf("%.1f KiB", b/1024)
	default:
		return fmt.Sprintf("%.0f B", b)
	}
}

// svg renders the report's chart.
func (r *report) svg() string {
	sub := ""
	if r.Meta != nil {
		sub = fmt.Sprintf("%s · %d CPUs · %s · %s", r.Meta.Date, r.Meta.CPUs, r.Meta.Kernel, r.Meta.GoVersion)
	}
	if r.Mode == "sweep" {
		return r.sweepSVG(sub)
	}
	var payloads []string
	var targets []string
	seenT := map[string]bool{}
	for _, s := range r.Summary {
		p := fmt.Sprintf("%d B", s.Payload)
		if len(payloads) == 0 || payloads[len(payloads)-1] != p {
			payloads = append(payloads, p)
		}
		if !seenT[s.Target] {
			seenT[s.Target] = true
			targets = append(targets, s.Target)
		}
	}
	// Order targets as in targetOrder.
	targets = ordered(targets)
	tp := make([][]float64, len(targets))
	cpu := make([][]float64, len(targets))
	var labels []string
	for i, t := range targets {
		labels = append(labels, targetLabels[t])
		tp[i] = make([]float64, len(payloads))
		cpu[i] = make([]float64, len(payloads))
		for j := range payloads {
			tp[i][j], cpu[i][j] = math.NaN(), math.NaN()
		}
		for _, s := range r.Summary {
			if s.Target != t {
				continue
			}
			for j, p := range payloads {
				if p == fmt.Sprintf("%d B", s.Payload) {
					tp[i][j] = s.Throughput
					cpu[i][j] = s.CPUPerDgramUS
				}
			}
		}
	}
	return barChartSVG("caddy-stabilize: UDP balancers on 127.0.0.1 (medians)", sub, []barPanel{
		{Title: "Throughput (datagrams/s, higher is better)", Groups: labels, Series: payloads, Values: tp},
		{Title: "Balancer CPU per datagram (µs, lower is better; direct has no balancer)", Groups: labels, Series: payloads, Values: cpu},
	})
}

func (r *report) sweepSVG(sub string) string {
	var flows []int
	var targets []string
	seenF := map[int]bool{}
	seenT := map[string]bool{}
	for _, s := range r.Summary {
		if !seenF[s.Flows] {
			seenF[s.Flows] = true
			flows = append(flows, s.Flows)
		}
		if !seenT[s.Target] {
			seenT[s.Target] = true
			targets = append(targets, s.Target)
		}
	}
	targets = ordered(targets)
	var groups, series []string
	for _, f := range flows {
		groups = append(groups, fmt.Sprintf("%d flows", f))
	}
	for _, t := range targets {
		series = append(series, targetLabels[t])
	}
	mk := func(get func(*summary) float64) [][]float64 {
		v := make([][]float64, len(flows))
		for i, f := range flows {
			v[i] = make([]float64, len(targets))
			for j, t := range targets {
				v[i][j] = math.NaN()
				for _, s := range r.Summary {
					if s.Flows == f && s.Target == t {
						v[i][j] = get(s)
					}
				}
			}
		}
		return v
	}
	return barChartSVG("caddy-stabilize: concurrent flows sweep (medians)", sub, []barPanel{
		{Title: "Throughput (datagrams/s, higher is better)", Groups: groups, Series: series, Values: mk(func(s *summary) float64 { return s.Throughput })},
		{Title: "Balancer CPU per datagram (µs, lower is better)", Groups: groups, Series: series, Values: mk(func(s *summary) float64 { return s.CPUPerDgramUS })},
		{Title: "Memory per live flow under load (KiB, lower is better)", Groups: groups, Series: series, Values: mk(func(s *summary) float64 { return s.MemPerFlowB / 1024 })},
		{Title: "Memory per idle live flow, 3 s after the load (KiB, lower is better)", Groups: groups, Series: series, Values: mk(func(s *summary) float64 { return s.MemPerIdleB / 1024 })},
	})
}

func ordered(targets []string) []string {
	var out []string
	for _, t := range targetOrder {
		for _, u := range targets {
			if t == u {
				out = append(out, t)
			}
		}
	}
	return out
}

// barPanel is one grouped bar chart: for each group (x axis), one bar per
// series. NaN values draw no bar.
type barPanel struct {
	Title  string
	Groups []string
	Series []string
	Values [][]float64 // [group][series]
}

var palette = []string{"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"}

// barChartSVG draws panels stacked vertically, with a legend per panel,
// value labels on the bars and a nice linear y axis from zero.
func barChartSVG(title, subtitle string, panels []barPanel) string {
	const (
		width   = 960.0
		left    = 70.0
		right   = 20.0
		top     = 60.0
		panelH  = 300.0
		plotTop = 50.0 // within a panel: title and legend above the plot
		plotH   = 190.0
	)
	height := top + panelH*float64(len(panels)) + 10
	var sb strings.Builder
	fmt.Fprintf(&sb, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&sb, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&sb, `<text x="%.0f" y="24" font-size="17" font-weight="bold">%s</text>`+"\n", left, esc(title))
	fmt.Fprintf(&sb, `<text x="%.0f" y="44" fill="#555">%s</text>`+"\n", left, esc(subtitle))
	for pi, p := range panels {
		y0 := top + panelH*float64(pi)
		fmt.Fprintf(&sb, `<text x="%.0f" y="%.0f" font-size="14" font-weight="bold">%s</text>`+"\n", left, y0+18, esc(p.Title))
		// Legend.
		lx := left
		for si, s := range p.Series {
			fmt.Fprintf(&sb, `<rect x="%.0f" y="%.0f" width="12" height="12" fill="%s"/>`, lx, y0+28, palette[si%len(palette)])
			fmt.Fprintf(&sb, `<text x="%.0f" y="%.0f">%s</text>`+"\n", lx+16, y0+38, esc(s))
			lx += 16 + 7.5*float64(len([]rune(s))) + 18
		}
		maxV := 0.0
		for _, g := range p.Values {
			for _, v := range g {
				if !math.IsNaN(v) && !math.IsInf(v, 0) {
					maxV = max(maxV, v)
				}
			}
		}
		step, top := niceScale(maxV, 5)
		py := y0 + plotTop
		plotW := width - left - right
		scale := func(v float64) float64 { return plotH * v / top }
		// Grid and y axis labels.
		for v := 0.0; v <= top*1.0000001; v += step {
			y := py + plotH - scale(v)
			fmt.Fprintf(&sb, `<line x1="%.0f" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#ddd"/>`, left, y, width-right, y)
			fmt.Fprintf(&sb, `<text x="%.0f" y="%.1f" text-anchor="end" fill="#555">%s</text>`+"\n", left-6, y+4, esc(compact(v)))
		}
		fmt.Fprintf(&sb, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#333"/>`+"\n", left, py+plotH, width-right, py+plotH)
		if len(p.Groups) == 0 {
			continue
		}
		groupW := plotW / float64(len(p.Groups))
		ns := max(len(p.Series), 1)
		barW := min(groupW*0.8/float64(ns), 60)
		for gi, g := range p.Groups {
			gx := left + groupW*float64(gi)
			bx := gx + (groupW-barW*float64(ns))/2
			for si := range ns {
				if gi >= len(p.Values) || si >= len(p.Values[gi]) {
					continue
				}
				v := p.Values[gi][si]
				x := bx + barW*float64(si)
				if math.IsNaN(v) || math.IsInf(v, 0) {
					fmt.Fprintf(&sb, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#999">n/a</text>`+"\n", x+barW/2, py+plotH-4)
					continue
				}
				h := scale(v)
				fmt.Fprintf(&sb, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s, %s: %s</title></rect>`,
					x, py+plotH-h, barW-2, h, palette[si%len(palette)], esc(g), esc(p.Series[si]), esc(compact(v)))
				fmt.Fprintf(&sb, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="11">%s</text>`+"\n", x+barW/2-1, py+plotH-h-4, esc(compact(v)))
			}
			for li, line := range wrap(g, 18) {
				fmt.Fprintf(&sb, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", gx+groupW/2, py+plotH+16+14*float64(li), esc(line))
			}
		}
	}
	sb.WriteString("</svg>\n")
	return sb.String()
}

func esc(s string) string { return html.EscapeString(s) }

// niceScale returns a tick step of 1, 2, 2.5 or 5 × 10^k and the axis top
// (a multiple of the step ≥ maxV) for about n ticks.
func niceScale(maxV float64, n int) (step, top float64) {
	if maxV <= 0 || math.IsNaN(maxV) {
		return 1, 1
	}
	raw := maxV / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		step = m * mag
		if step >= raw {
			break
		}
	}
	top = math.Ceil(maxV/step-1e-9) * step
	return step, top
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

// wrap splits s into lines of at most n characters at spaces.
func wrap(s string, n int) []string {
	var lines []string
	cur := ""
	for _, w := range strings.Fields(s) {
		if cur != "" && len([]rune(cur))+1+len([]rune(w)) > n {
			lines = append(lines, cur)
			cur = w
			continue
		}
		if cur != "" {
			cur += " "
		}
		cur += w
	}
	if cur != "" {
		lines = append(lines, cur)
	}
	return lines
}
