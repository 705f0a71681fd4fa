//go:build linux

package main

import (
	"fmt"
	"math"
	"strings"
)

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

// compareTables is one table per payload, the legend and the rounds.
func (r *report) compareTables(sb *strings.Builder) {
	for _, k := range r.rowKeys() {
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

// roundsTable lists throughput per round, to show the noise, and in a sweep
// the CPU per datagram of the balancer and of the load generator too.
func (r *report) roundsTable(sb *strings.Builder) {
	r.roundsOf(sb, "Throughput per round (datagrams/s)", func(m *measurement) num { return m.Throughput }, fmtInt)
	r.roundsOf(sb, "Other work per round, cores busy (the machine's, less the balancer's and this process's, in the window)", func(m *measurement) num { return m.OthersCores }, fmtTwo)
	if r.Mode == "sweep" {
		r.roundsOf(sb, "CPU µs per datagram per round, the balancer's", func(m *measurement) num { return m.CPUPerDgramUS }, fmtNum)
		r.roundsOf(sb, "CPU µs per datagram per round, the load generator's and upstreams'", func(m *measurement) num { return m.LoadCPUPerDgramUS }, fmtNum)
		r.roundsOf(sb, "Flows answered at the window's start, per round", func(m *measurement) num { return m.Established }, fmtInt)
		r.roundsOf(sb, "Flows busy in the window, per round", func(m *measurement) num { return m.Busy }, fmtInt)
		r.roundsOf(sb, "Set-up s per round (first datagram → last flow's first reply)", func(m *measurement) num { return m.SetupSeconds }, fmtNum)
	}
}

// roundsOf is one table of a figure per round, left out when there is only
// one round or the figure was never measured.
func (r *report) roundsOf(sb *strings.Builder, title string, value func(*measurement) num, format func(num) string) {
	rounds, known := 0, false
	for _, m := range r.Runs {
		rounds = max(rounds, m.Round)
		known = known || value(m).known()
	}
	if rounds < 2 || !known {
		return
	}
	fmt.Fprintf(sb, "<details><summary>%s</summary>\n\n| target | key |", title)
	for i := 1; i <= rounds; i++ {
		fmt.Fprintf(sb, " round %d |", i)
	}
	sb.WriteString("\n|---|--:|" + strings.Repeat("--:|", rounds) + "\n")
	for _, s := range r.Summary {
		fmt.Fprintf(sb, "| %s | %s |", targetLabels[s.Target], r.rowLabel(s))
		for i := 1; i <= rounds; i++ {
			v := "–"
			for _, m := range r.Runs {
				if m.Round == i && m.Target == s.Target && r.key(m) == r.rowKey(s) {
					v = format(value(m))
				}
			}
			fmt.Fprintf(sb, " %s |", v)
		}
		sb.WriteString("\n")
	}
	sb.WriteString("\n</details>\n\n")
}

// sweepTables is one table of every flow count, the legend and the rounds.
func (r *report) sweepTables(sb *strings.Builder) {
	sb.WriteString("| flows | target | datagrams/s | p50 µs | p99 µs | loss | CPU µs/datagram | load CPU µs/datagram | RSS before MiB | RSS live MiB | memory per flow | RSS idle MiB | memory per idle flow | Go per idle flow | kernel per idle flow | sockets per idle flow | kernel drops |\n")
	sb.WriteString("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n")
	for _, s := range r.Summary {
		fmt.Fprintf(sb, "| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			s.Flows, targetLabels[s.Target],
			withRatio(fmtInt(s.Throughput), s, "throughput"),
			withRatio(fmtNum(s.P50US), s, "p50"),
			withRatio(fmtNum(s.P99US), s, "p99"),
			fmtPct(s.LossPct),
			withRatio(fmtNum(s.CPUPerDgramUS), s, "cpu_per_datagram"),
			fmtNum(s.LoadCPUPerDgramUS),
			fmtMiB(s.RSSBaseKB), fmtMiB(s.RSSLiveKB),
			withRatio(fmtBytes(s.MemPerFlowB), s, "mem_per_flow"),
			fmtMiB(s.RSSIdleKB),
			withRatio(fmtBytes(s.MemPerIdleB), s, "mem_per_idle_flow"),
			withRatio(fmtBytes(s.GoPerIdleB), s, "go_per_idle_flow"),
			withRatio(fmtBytes(s.KernelPerIdleB), s, "kernel_per_idle_flow"),
			fmtTwo(s.SocketsPerIdle),
			orDash(fmtDrops(s.KernelDrops)))
	}
	sb.WriteString("\n")
	sb.WriteString(legendSweep)
	r.setupTable(sb)
	r.roundsTable(sb)
}

// setupTable is the sweep's warm-up by flow count and target; left out for
// a report from before it was measured.
func (r *report) setupTable(sb *strings.Builder) {
	known := false
	for _, s := range r.Summary {
		known = known || s.EstablishedMin.known()
	}
	if !known {
		return
	}
	sb.WriteString("| flows | target | flows answered | flows busy | warm-up s | set-up s | set-up flows/s |\n")
	sb.WriteString("|--:|---|--:|--:|--:|--:|--:|\n")
	for _, s := range r.Summary {
		fmt.Fprintf(sb, "| %d | %s | %s | %s | %s | %s | %s |\n", s.Flows, targetLabels[s.Target],
			fmtInt(s.EstablishedMin), fmtInt(s.BusyMin), fmtNum(s.WarmupSeconds), fmtNum(s.SetupSeconds), fmtInt(s.SetupFlowsPerSecond))
	}
	sb.WriteString("\n")
	sb.WriteString(legendSetup)
}

const legendSetup = `Before the load, a set-up: each flow sends one datagram (spread over the ramp), and again after each
loss timeout, until every flow has had a reply (at most -establish; a round that gave up is listed
under errors). Then the load starts as without it (the flows' windows spread over the ramp, the
window max(-warmup, ramp + 500 ms) later), so every flow is set up in the balancer and busy in the
window. Flows answered: by the window's start; busy: with a reply to a datagram of the window.
Set-up: from the first flow's first datagram to the last flow's first reply (– if some flow had
none), and flows ÷ that time. Warm-up: from the first datagram to the window's start. Medians over
the rounds, but for the flows answered and busy (the fewest).

`

const legendSweep = `Medians over the rounds; (×n) is the ratio to caddy-l4 proxy at the same flow count.
Each flow is one client socket with the given window of datagrams outstanding (closed loop).
Load CPU µs/datagram: the benchmark process's own user+system CPU time (getrusage) during the window
÷ the replies received: the load generator and the in-process upstreams, which share the cores with
the balancer (– in reports from before it was measured).
RSS before: the balancer's VmRSS after start-up, before the load; RSS live: its VmRSS at the end of the
measured window, with every flow live. Memory per flow = (RSS live − RSS before) / flows: it includes
the Go heap's slack, so small flow counts are noise. RSS idle: its VmRSS 3 s after the load generator
stopped (last request answered or given up on), every flow still live (the idle timeout is 60 s);
memory per idle flow = (RSS idle − RSS before) / flows. Go per idle flow: the change in the balancer's
Go heap and goroutine stacks in use (runtime.MemStats HeapInuse + StackInuse, read through Caddy's
admin API after two forced garbage collections, GET /debug/pprof/heap?gc=1&debug=1) between before the
load and 3 s after it, / flows; Caddy targets only. Kernel per idle flow: the change, over the same two
instants, in the whole machine's kernel memory of a socket's slab caches (/proc/slabinfo active objects
× object size of UDP, UDPv6, sock_inode_cache, filp, dentry, eventpoll_epi and eventpoll_pwq), / flows
(the JSON has the change by cache, and that of /proc/net/sockstat's UDP mem, charged accounting that
is not in the figure). The load generator has closed its sockets by then, so it is the balancer's
flows' sockets, plus what the rest of the machine allocated or freed meanwhile. Sockets per idle
flow: the change in the balancer's open sockets, / flows. Kernel drops: as in the compare report
(full receive buffers during the window, by socket: listener, balancer_up, upstreams, clients).

`

// errorList lists the failed measurements.
func (r *report) errorList(sb *strings.Builder) {
	first := true
	for _, s := range r.Summary {
		for _, e := range s.Errors {
			if first {
				sb.WriteString("## Errors\n\n")
				first = false
			}
			fmt.Fprintf(sb, "- %s, %s: %s\n", targetLabels[s.Target], r.rowLabel(s), oneLineErr(e))
		}
	}
	if !first {
		sb.WriteString("\n")
	}
}

// rowLabel names a summary row's key: "64 B" or "100 flows".
func (r *report) rowLabel(s *summary) string {
	if r.Mode == "sweep" {
		return fmt.Sprintf("%d flows", s.Flows)
	}
	return fmt.Sprintf("%d B", s.Payload)
}

// oneLineErr shortens an error to one line of at most 300 bytes.
func oneLineErr(e string) string {
	e = strings.Join(strings.Fields(e), " ")
	if len(e) > 300 {
		e = e[:300] + "…"
	}
	return e
}

// withRatio appends the row's ratio to proxy, if known, to v.
func withRatio(v string, s *summary, key string) string {
	if s.VsProxy == nil || s.Target == "proxy" {
		return v
	}
	x, ok := s.VsProxy[key]
	if !ok || !x.known() {
		return v
	}
	return fmt.Sprintf("%s (×%.2f)", v, x)
}

// orDash is s, or a dash for nothing.
func orDash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

// fmtInt formats x as an integer with thin groups of three digits.
func fmtInt(x num) string {
	if !x.known() {
		return "–"
	}
	s := fmt.Sprintf("%.0f", x)
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 && s[i-1] != '-' {
			out = append(out, ' ')
		}
		out = append(out, s[i])
	}
	return string(out)
}

// fmtNum formats x with three significant digits or more.
func fmtNum(x num) string {
	switch {
	case !x.known():
		return "–"
	case x >= 100:
		return fmtInt(x)
	case x >= 10:
		return fmt.Sprintf("%.1f", x)
	default:
		return fmt.Sprintf("%.2f", x)
	}
}

// fmtPct formats a percentage.
func fmtPct(x num) string {
	if !x.known() {
		return "–"
	}
	if x == 0 {
		return "0"
	}
	return fmt.Sprintf("%.3f%%", x)
}

// fmtMiB formats a kB reading in MiB.
func fmtMiB(kb num) string {
	if !kb.known() || kb <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f", kb/1024)
}

// fmtTwo formats x with two decimals: sockets per flow, cores.
func fmtTwo(x num) string {
	if !x.known() {
		return "–"
	}
	return fmt.Sprintf("%.2f", x)
}

// fmtBytes formats a byte count in B or KiB.
func fmtBytes(b num) string {
	switch {
	case !b.known():
		return "–"
	case math.Abs(float64(b)) >= 10*1024:
		return fmt.Sprintf("%.1f KiB", b/1024)
	default:
		return fmt.Sprintf("%.0f B", b)
	}
}
