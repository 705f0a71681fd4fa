//go:build linux

package main

import (
	"fmt"
	"math"
	"slices"
)

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
	Target        string `json:"target"`
	Payload       int    `json:"payload"`
	Flows         int    `json:"flows"`
	Rounds        int    `json:"rounds"` // measurements without error
	Throughput    num    `json:"throughput"`
	ThroughputMin num    `json:"throughput_min"`
	ThroughputMax num    `json:"throughput_max"`
	P50US         num    `json:"p50_us"`
	P99US         num    `json:"p99_us"`
	P999US        num    `json:"p999_us"`
	LossPct       num    `json:"loss_pct"`
	CPUPerDgramUS num    `json:"cpu_us_per_datagram"`
	// The benchmark process's (load generator and upstreams) CPU per
	// datagram.
	LoadCPUPerDgramUS num `json:"load_cpu_us_per_datagram"`
	PeakRSSKB         num `json:"peak_rss_kb"`
	RSSBaseKB         num `json:"rss_base_kb"`
	RSSLiveKB         num `json:"rss_live_kb"`
	RSSIdleKB         num `json:"rss_idle_kb"`
	MemPerFlowB       num `json:"mem_per_flow_bytes"`
	MemPerIdleB       num `json:"mem_per_idle_flow_bytes"`
	// Go memory (heap and stacks in use), kernel socket memory and the
	// balancer's sockets, per idle flow (see measurement).
	GoPerIdleB     num `json:"go_per_idle_flow_bytes"`
	KernelPerIdleB num `json:"kernel_per_idle_flow_bytes"`
	SocketsPerIdle num `json:"sockets_per_idle_flow"`
	// The warm-up (see measurement): the fewest flows answered at a
	// window's start over the rounds, and the medians of the warm-up, the
	// set-up time and rate.
	EstablishedMin      num `json:"flows_established_min"`
	BusyMin             num `json:"flows_busy_min"`
	WarmupSeconds       num `json:"warmup_seconds"`
	SetupSeconds        num `json:"setup_seconds"`
	SetupFlowsPerSecond num `json:"setup_flows_per_second"`
	// Median kernel drops per socket role, over the rounds.
	KernelDrops map[string]uint64 `json:"kernel_drops,omitempty"`
	Errors      []string          `json:"errors,omitempty"`
	// Ratios of this row's medians to caddy-l4 proxy's (absent when proxy
	// was not measured, null when unknown): throughput, p50, p99, p99.9,
	// loss, CPU per datagram, peak RSS, memory per flow, memory per idle
	// flow, Go and kernel memory per idle flow.
	VsProxy map[string]num `json:"vs_proxy,omitempty"`
}

// key is what a summary row groups by: the payload in compare mode, the
// flow count in sweep mode.
func (r *report) key(m *measurement) int {
	if r.Mode == "sweep" {
		return m.Flows
	}
	return m.Payload
}

// rowKey is the key of a summary row.
func (r *report) rowKey(s *summary) int {
	if r.Mode == "sweep" {
		return s.Flows
	}
	return s.Payload
}

// rowKeys are the distinct keys of the summary rows, in order.
func (r *report) rowKeys() []int {
	var keys []int
	for _, s := range r.Summary {
		if k := r.rowKey(s); !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	return keys
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
	for _, m := range r.Runs {
		k := r.key(m)
		groups[gk{k, m.Target}] = append(groups[gk{k, m.Target}], m)
		if !seenKey[k] {
			seenKey[k] = true
			keys = append(keys, k)
		}
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
				s.VsProxy = map[string]num{
					"throughput":           ratio(s.Throughput, proxy.Throughput),
					"p50":                  ratio(s.P50US, proxy.P50US),
					"p99":                  ratio(s.P99US, proxy.P99US),
					"p99.9":                ratio(s.P999US, proxy.P999US),
					"loss":                 ratio(s.LossPct, proxy.LossPct),
					"cpu_per_datagram":     ratio(s.CPUPerDgramUS, proxy.CPUPerDgramUS),
					"peak_rss":             ratio(s.PeakRSSKB, proxy.PeakRSSKB),
					"mem_per_flow":         ratio(s.MemPerFlowB, proxy.MemPerFlowB),
					"mem_per_idle_flow":    ratio(s.MemPerIdleB, proxy.MemPerIdleB),
					"go_per_idle_flow":     ratio(s.GoPerIdleB, proxy.GoPerIdleB),
					"kernel_per_idle_flow": ratio(s.KernelPerIdleB, proxy.KernelPerIdleB),
				}
			}
		}
		r.Summary = append(r.Summary, rows...)
	}
}

// summarizeRuns is the medians of one target's measurements at one key.
func summarizeRuns(ms []*measurement) *summary {
	s := &summary{Target: ms[0].Target, Payload: ms[0].Payload, Flows: ms[0].Flows}
	var tp, p50, p99, p999, loss, cpu, loadCPU, rss, base, live, idle, perFlow, perIdle, goIdle, kernelIdle, socketsIdle []num
	var warmup, setup, setupRate []num
	s.ThroughputMin, s.ThroughputMax, s.EstablishedMin, s.BusyMin = nan, nan, nan, nan
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
		loadCPU = append(loadCPU, m.LoadCPUPerDgramUS)
		rss = append(rss, kbOrNaN(m.PeakRSSKB))
		base = append(base, kbOrNaN(m.RSSBaseKB))
		live = append(live, kbOrNaN(m.RSSLiveKB))
		idle = append(idle, kbOrNaN(m.RSSIdleKB))
		perFlow = append(perFlow, m.MemPerFlowB)
		perIdle = append(perIdle, m.MemPerIdleFlowB)
		goIdle = append(goIdle, m.GoPerIdleFlowB)
		kernelIdle = append(kernelIdle, m.KernelPerIdleFlowB)
		socketsIdle = append(socketsIdle, m.SocketsPerIdleFlow)
		warmup = append(warmup, m.WarmupSeconds)
		setup = append(setup, m.SetupSeconds)
		setupRate = append(setupRate, m.SetupFlowsPerSecond)
		s.EstablishedMin = fewest(s.EstablishedMin, m.Established)
		s.BusyMin = fewest(s.BusyMin, m.Busy)
		if !s.ThroughputMin.known() || m.Throughput < s.ThroughputMin {
			s.ThroughputMin = m.Throughput
		}
		if !s.ThroughputMax.known() || m.Throughput > s.ThroughputMax {
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
	s.LoadCPUPerDgramUS = median(loadCPU)
	s.RSSBaseKB, s.RSSLiveKB, s.MemPerFlowB = median(base), median(live), median(perFlow)
	s.RSSIdleKB, s.MemPerIdleB = median(idle), median(perIdle)
	s.GoPerIdleB, s.KernelPerIdleB, s.SocketsPerIdle = median(goIdle), median(kernelIdle), median(socketsIdle)
	s.WarmupSeconds, s.SetupSeconds, s.SetupFlowsPerSecond = median(warmup), median(setup), median(setupRate)
	return s
}

// fewest is the smaller of a and b, ignoring unknown ones.
func fewest(a, b num) num {
	if !a.known() || b.known() && b < a {
		return b
	}
	return a
}

// kbOrNaN is a kB reading, unknown when it was not taken.
func kbOrNaN(kb int64) num {
	if kb <= 0 {
		return nan
	}
	return num(kb)
}
