//go:build linux

package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// idleAfter is how long after the load generator stops (every request
// answered or given up on) the sweep reads the balancer's idle RSS, with
// every flow still live (idleAfter < idleTimeout).
const idleAfter = 3 * time.Second

// measurement is one target measured once.
type measurement struct {
	Target     string  `json:"target"`
	Round      int     `json:"round"`
	Payload    int     `json:"payload"`
	Flows      int     `json:"flows"`
	Window     int     `json:"window"`
	Sent       int64   `json:"sent"`
	Received   int64   `json:"received"`
	Lost       int64   `json:"lost"`
	Late       int64   `json:"late"`
	Corrupt    int64   `json:"corrupt"`
	SendErrors int64   `json:"send_errors"`
	Seconds    float64 `json:"seconds"`
	// The warm-up: how long after the load began the window started; the
	// flows that had had a reply by then (of Flows); and the set-up, from
	// the first flow's first datagram to the last flow's first reply (null
	// if some flow had none), as seconds and as flows per second.
	WarmupSeconds num `json:"warmup_seconds"`
	Established   num `json:"flows_established"`
	// Flows with a reply to a datagram of the window.
	Busy                num `json:"flows_busy"`
	SetupSeconds        num `json:"setup_seconds"`
	SetupFlowsPerSecond num `json:"setup_flows_per_second"`
	Throughput          num `json:"throughput"` // replies/s
	LossPct             num `json:"loss_pct"`
	P50US               num `json:"p50_us"`
	P99US               num `json:"p99_us"`
	P999US              num `json:"p999_us"`
	// The balancer's (for nginx: master + workers) CPU time during the
	// window, and per answered request (request forwarded + reply relayed).
	CPUSeconds    num `json:"cpu_seconds"`
	CPUPerDgramUS num `json:"cpu_us_per_datagram"`
	// The benchmark's own process (the load generator and the upstreams)
	// likewise: what the rest of a closed loop costs, on the same cores.
	LoadCPUSeconds    num `json:"load_cpu_seconds"`
	LoadCPUPerDgramUS num `json:"load_cpu_us_per_datagram"`
	// Other work during the window, in cores busy: the machine's busy CPU
	// time (/proc/stat) less the balancer's and the benchmark's, ÷ the
	// window. It includes kernel work charged to no process.
	OthersCores num   `json:"others_cores"`
	PeakRSSKB   int64 `json:"peak_rss_kb"`
	// Sweep only: VmRSS before the load, at the end of the window with all
	// flows live and busy, and idleAfter after the load stopped with all
	// flows still live but idle.
	RSSBaseKB       int64 `json:"rss_base_kb,omitempty"`
	RSSLiveKB       int64 `json:"rss_live_kb,omitempty"`
	RSSIdleKB       int64 `json:"rss_idle_kb,omitempty"`
	MemPerFlowB     num   `json:"mem_per_flow_bytes"`
	MemPerIdleFlowB num   `json:"mem_per_idle_flow_bytes"`
	// Sweep only, before the load and idleAfter after it: the balancer's Go
	// memory (Caddy targets: heap and goroutine stacks in use after forced
	// garbage collections), the change in the whole system's kernel memory
	// of a socket's slab caches (kernelCaches) and in udpMem, by key, and
	// the balancer's open sockets. Per idle flow: (idle − before) / flows;
	// the kernel's is that of the slab caches.
	GoBase             *goMem           `json:"go_base,omitempty"`
	GoIdle             *goMem           `json:"go_idle,omitempty"`
	GoPerIdleFlowB     num              `json:"go_per_idle_flow_bytes"`
	KernelIdleDelta    map[string]int64 `json:"kernel_idle_delta_bytes,omitempty"`
	KernelPerIdleFlowB num              `json:"kernel_per_idle_flow_bytes"`
	SocketsPerIdleFlow num              `json:"sockets_per_idle_flow"`
	// Datagrams the kernel dropped during the window for a full receive
	// buffer, by socket role (see dropListener…).
	KernelDrops map[string]uint64 `json:"kernel_drops,omitempty"`
	Err         string            `json:"error,omitempty"`
}

// measure runs one measurement of target t with a fresh balancer process.
// Errors are recorded in the measurement, so that one failing target does
// not end the benchmark.
func (e *benchEnv) measure(ctx context.Context, t string, lc loadConfig, sweep bool) *measurement {
	m := &measurement{Target: t, Payload: lc.payload, Flows: lc.flows, Window: lc.window}
	m.setNaN()
	if why := e.fileLimitShortfall(lc.flows); why != "" {
		m.Err = why
		return m
	}
	var bal *balancer
	addr := e.upstreams[0].Addr().String()
	if t != "direct" {
		var err error
		bal, err = e.start(ctx, t)
		if err != nil {
			m.Err = err.Error()
			return m
		}
		defer bal.stop()
		addr = bal.addr
	}

	var cpu0, cpu1, self0, self1, all0, all1 float64
	var rssBase, rssLive int64
	var memBase idleMem
	if bal != nil && sweep {
		// Let the process settle after start-up before the baseline.
		time.Sleep(300 * time.Millisecond)
		rssBase = bal.rssKB("VmRSS")
		memBase = bal.readIdleMem(ctx)
	}
	var socks0, socks1 []udpSocket
	var balInodes map[uint64]bool
	hooks := loadHooks{
		start: func() {
			all0 = busyCPUSeconds()
			self0 = selfCPUSeconds()
			if bal != nil {
				cpu0 = bal.cpuSeconds()
			}
			socks0 = readUDPSockets()
		},
		end: func() {
			all1 = busyCPUSeconds()
			self1 = selfCPUSeconds()
			if bal != nil {
				cpu1 = bal.cpuSeconds()
				if sweep {
					rssLive = bal.rssKB("VmRSS")
				}
			}
			socks1 = readUDPSockets()
			if bal != nil {
				balInodes = socketInodes(bal.pids)
			}
		},
	}
	lc.clients = e.clients
	res, err := runLoad(ctx, addr, lc, hooks)
	if err != nil {
		m.Err = err.Error()
		if res == nil {
			return m
		}
	}
	m.fromLoad(res)
	m.LoadCPUSeconds = num(self1 - self0)
	if all0 > 0 && all1 > 0 {
		m.OthersCores = num((all1 - all0 - (self1 - self0) - (cpu1 - cpu0)) / lc.duration.Seconds())
	}
	if m.Received > 0 {
		m.LoadCPUPerDgramUS = m.LoadCPUSeconds / num(m.Received) * 1e6
	}
	var rssIdle int64
	var memIdle idleMem
	if bal != nil && sweep && ctx.Err() == nil {
		// The load generator has stopped and closed its sockets; the
		// balancer's flows stay live until its idle timeout (idleTimeout ≫
		// idleAfter).
		sleepUntil(ctx, time.Now().Add(idleAfter))
		rssIdle = bal.rssKB("VmRSS")
		memIdle = bal.readIdleMem(ctx)
		if e.opts.heapProfiles && bal.admin != "" {
			path := filepath.Join(e.opts.out, fmt.Sprintf("heap-%s-%d.pb.gz", t, lc.flows))
			if err := saveHeapProfile(ctx, bal.admin, path); err != nil {
				memIdle.err = append(memIdle.err, err.Error())
			}
		}
	}
	listenPort := e.upstreams[0].Addr().Port
	if bal != nil {
		listenPort = bal.port
	}
	upPorts := map[int]bool{}
	for _, u := range e.upstreams {
		upPorts[u.Addr().Port] = true
	}
	m.KernelDrops = dropDelta(socks0, socks1, listenPort, upPorts, balInodes)
	if bal == nil {
		return m
	}
	if !bal.alive() {
		m.Err = "balancer exited during the measurement: " + bal.logTail()
	}
	m.CPUSeconds = num(cpu1 - cpu0)
	if m.Received > 0 {
		m.CPUPerDgramUS = m.CPUSeconds / num(m.Received) * 1e6
	}
	m.PeakRSSKB = bal.rssKB("VmHWM")
	if sweep {
		m.RSSBaseKB, m.RSSLiveKB, m.RSSIdleKB = rssBase, rssLive, rssIdle
		m.MemPerFlowB = num(rssLive-rssBase) * 1024 / num(lc.flows)
		if rssIdle > 0 {
			m.MemPerIdleFlowB = num(rssIdle-rssBase) * 1024 / num(lc.flows)
			m.perIdleFlow(memBase, memIdle, lc.flows)
		}
	}
	return m
}

// idleMem is what the sweep reads of the balancer's memory besides its RSS,
// before the load and when its flows are idle.
type idleMem struct {
	goMem   *goMem    // nil: not a Caddy target, or not read (err)
	kernel  kernelMem // nil: /proc/slabinfo unreadable (err)
	sockets int
	err     []string
}

// readIdleMem reads the balancer's Go memory (through Caddy's admin API),
// the kernel's socket memory and the balancer's open sockets.
func (b *balancer) readIdleMem(ctx context.Context) idleMem {
	var im idleMem
	if b.admin != "" {
		if g, err := readGoMem(ctx, b.admin); err == nil {
			im.goMem = &g
		} else {
			im.err = append(im.err, "Go memory: "+err.Error())
		}
	}
	km, err := readKernelMem()
	if err != nil {
		im.err = append(im.err, "kernel memory: "+err.Error())
	}
	im.kernel = km
	im.sockets = len(socketInodes(b.pids))
	return im
}

// perIdleFlow sets the per idle flow figures from the readings before the
// load and after it, over flows.
func (m *measurement) perIdleFlow(base, idle idleMem, flows int) {
	if errs := append(base.err, idle.err...); len(errs) > 0 {
		m.Err = strings.TrimPrefix(m.Err+"; "+strings.Join(errs, "; "), "; ")
	}
	m.GoBase, m.GoIdle = base.goMem, idle.goMem
	if base.goMem != nil && idle.goMem != nil {
		m.GoPerIdleFlowB = num(idle.goMem.total()-base.goMem.total()) / num(flows)
	}
	if base.kernel != nil && idle.kernel != nil {
		var total int64
		m.KernelIdleDelta, total = idle.kernel.delta(base.kernel)
		m.KernelPerIdleFlowB = num(total) / num(flows)
	}
	m.SocketsPerIdleFlow = num(idle.sockets-base.sockets) / num(flows)
}

// setNaN marks the derived numbers unknown until measured.
func (m *measurement) setNaN() {
	m.Throughput, m.LossPct, m.P50US, m.P99US, m.P999US = nan, nan, nan, nan, nan
	m.CPUSeconds, m.CPUPerDgramUS, m.MemPerFlowB, m.MemPerIdleFlowB = nan, nan, nan, nan
	m.LoadCPUSeconds, m.LoadCPUPerDgramUS, m.OthersCores = nan, nan, nan
	m.GoPerIdleFlowB, m.KernelPerIdleFlowB, m.SocketsPerIdleFlow = nan, nan, nan
	m.WarmupSeconds, m.Established, m.SetupSeconds, m.SetupFlowsPerSecond, m.Busy = nan, nan, nan, nan, nan
}

func (m *measurement) fromLoad(r *loadResult) {
	m.Sent, m.Received, m.Lost, m.Late, m.Corrupt, m.SendErrors = r.Sent, r.Received, r.Lost, r.Late, r.Corrupt, r.SendErrors
	m.Seconds = r.Window.Seconds()
	m.Throughput = num(float64(r.Received) / m.Seconds)
	if r.Sent > 0 {
		m.LossPct = num(float64(r.Lost) / float64(r.Sent) * 100)
	}
	m.P50US = num(percentile(r.latencies, 50) / 1e3)
	m.P99US = num(percentile(r.latencies, 99) / 1e3)
	m.P999US = num(percentile(r.latencies, 99.9) / 1e3)
	m.WarmupSeconds, m.Established, m.Busy = num(r.Warmup.Seconds()), num(r.Established), num(r.Busy)
	if r.Setup > 0 {
		m.SetupSeconds = num(r.Setup.Seconds())
		m.SetupFlowsPerSecond = num(float64(m.Flows) / r.Setup.Seconds())
	}
	if r.GaveUp {
		m.Err = strings.TrimPrefix(fmt.Sprintf("%s; the set-up gave up: %d of %d flows had had a reply %.1f s after the first datagram", m.Err, r.Established, m.Flows, r.Warmup.Seconds()), "; ")
	}
}

// oneLine is the measurement's progress line.
func (m *measurement) oneLine() string {
	if m.Err != "" && m.Sent == 0 {
		return "ERROR: " + m.Err
	}
	s := fmt.Sprintf("%9.0f dgram/s  p50 %6.0fµs  p99 %7.0fµs  loss %5.2f%%", m.Throughput, m.P50US, m.P99US, m.LossPct)
	if m.CPUPerDgramUS.known() {
		s += fmt.Sprintf("  cpu %5.1fµs/dgram  rss %5.1fMiB", m.CPUPerDgramUS, float64(m.PeakRSSKB)/1024)
	}
	if m.LoadCPUPerDgramUS.known() {
		s += fmt.Sprintf("  load cpu %5.1fµs/dgram", m.LoadCPUPerDgramUS)
	}
	if m.Established.known() {
		s += fmt.Sprintf("  answered %.0f/%d at %.1fs, busy %.0f", m.Established, m.Flows, m.WarmupSeconds, m.Busy)
	}
	if m.SetupSeconds.known() {
		s += fmt.Sprintf(" (set-up %.2fs, %.0f flows/s)", m.SetupSeconds, m.SetupFlowsPerSecond)
	}
	if m.OthersCores.known() {
		s += fmt.Sprintf("  others %.2f cores", m.OthersCores)
	}
	if d := fmtDrops(m.KernelDrops); d != "" {
		s += "  drops " + d
	}
	if m.MemPerFlowB.known() {
		s += fmt.Sprintf("  %6.0f B/flow", m.MemPerFlowB)
	}
	if m.MemPerIdleFlowB.known() {
		s += fmt.Sprintf(" (idle %6.0f B/flow)", m.MemPerIdleFlowB)
	}
	if m.GoPerIdleFlowB.known() {
		s += fmt.Sprintf("  idle Go %6.0f B/flow", m.GoPerIdleFlowB)
	}
	if m.KernelPerIdleFlowB.known() {
		s += fmt.Sprintf("  idle kernel %6.0f B/flow (%.2f sockets/flow)", m.KernelPerIdleFlowB, m.SocketsPerIdleFlow)
	}
	if m.Err != "" {
		s += "  ERROR: " + m.Err
	}
	return s
}
