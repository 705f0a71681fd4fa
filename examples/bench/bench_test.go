//go:build linux

package main

import (
	"encoding/json"
	"encoding/xml"
	"math"
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	xs := make([]int64, 1000)
	for i := range xs {
		xs[i] = int64(i + 1) // 1…1000
	}
	for _, c := range []struct {
		p    float64
		want float64
	}{{50, 500}, {99, 990}, {99.9, 999}, {100, 1000}, {0.01, 1}} {
		if got := percentile(xs, c.p); got != c.want {
			t.Errorf("percentile(1…1000, %v) = %v, want %v", c.p, got, c.want)
		}
	}
	if got := percentile([]int64{7}, 99.9); got != 7 {
		t.Errorf("one sample: %v", got)
	}
	if !math.IsNaN(percentile(nil, 50)) {
		t.Error("no samples: want NaN")
	}
}

func TestMedian(t *testing.T) {
	nan := math.NaN()
	for _, c := range []struct {
		xs   []float64
		want float64
	}{{[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}, {[]float64{nan, 5, nan}, 5}} {
		if got := median(c.xs); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.xs, got, c.want)
		}
	}
	if !math.IsNaN(median([]float64{nan})) {
		t.Error("all NaN: want NaN")
	}
}

func TestCaddyConfig(t *testing.T) {
	ups := []string{"127.0.0.1:6001", "127.0.0.1:6002", "127.0.0.1:6003"}
	for _, target := range []string{"packet", "flow", "fastflow", "proxy", "ceiling", "fastflow1", "proxy1"} {
		b, err := caddyConfig(listenNetwork(target), "127.0.0.1:5000", handlerFor(baseTarget(target), ups))
		if err != nil {
			t.Fatal(err)
		}
		var cfg struct {
			Admin   struct{ Disabled bool }
			Logging struct {
				Logs map[string]struct{ Level string }
			}
			Apps struct {
				Layer4 struct {
					Servers map[string]struct {
						Listen []string
						Routes []struct {
							Handle []map[string]any
						}
					}
				}
			}
		}
		if err := json.Unmarshal(b, &cfg); err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		if !cfg.Admin.Disabled || cfg.Logging.Logs["default"].Level != "ERROR" {
			t.Errorf("%s: admin not off or logging not ERROR:\n%s", target, b)
		}
		srv := cfg.Apps.Layer4.Servers["bench"]
		wantListen := "udp/127.0.0.1:5000"
		if strings.HasPrefix(target, "fastflow") {
			wantListen = "fastudp/127.0.0.1:5000"
		}
		if len(srv.Listen) != 1 || srv.Listen[0] != wantListen || len(srv.Routes) != 1 {
			t.Fatalf("%s: bad server:\n%s", target, b)
		}
		h := srv.Routes[0].Handle[0]
		switch baseTarget(target) {
		case "packet", "flow", "fastflow":
			if h["handler"] != "stabilize" || h["per"] != strings.TrimPrefix(baseTarget(target), "fast") || len(h["upstreams"].([]any)) != 3 {
				t.Errorf("%s: bad handler %v", target, h)
			}
			if d := h["upstreams"].([]any)[1].(map[string]any)["dial"]; d != "udp/127.0.0.1:6002" {
				t.Errorf("%s: dial %v", target, d)
			}
		case "proxy":
			d := h["upstreams"].([]any)[2].(map[string]any)["dial"].([]any)
			if h["handler"] != "proxy" || len(d) != 1 || d[0] != "udp/127.0.0.1:6003" {
				t.Errorf("proxy: bad handler %v", h)
			}
			if !strings.Contains(string(b), `"policy": "round_robin"`) {
				t.Errorf("proxy: no round_robin:\n%s", b)
			}
		case "ceiling":
			if h["handler"] != "echo" {
				t.Errorf("ceiling: bad handler %v", h)
			}
		}
	}
}

// TestCaddyConfigAdmin checks the sweep's config: the admin API on the
// given address, for the Go memory readings, and never saved.
func TestCaddyConfigAdmin(t *testing.T) {
	b, err := caddyConfigAdmin("fastudp", "127.0.0.1:5000", "127.0.0.1:2999", handlerFor("fastflow", []string{"127.0.0.1:6001"}))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Admin struct {
			Disabled bool
			Listen   string
			Config   struct{ Persist *bool }
		}
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	if a := cfg.Admin; a.Disabled || a.Listen != "127.0.0.1:2999" || a.Config.Persist == nil || *a.Config.Persist {
		t.Errorf("admin %+v, want on 127.0.0.1:2999, not persisted:\n%s", a, b)
	}
	off, err := caddyConfig("fastudp", "127.0.0.1:5000", handlerFor("fastflow", []string{"127.0.0.1:6001"}))
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := caddyConfigAdmin("fastudp", "127.0.0.1:5000", "", handlerFor("fastflow", []string{"127.0.0.1:6001"})); string(again) != string(off) {
		t.Errorf("no admin address: %s, want caddyConfig's %s", again, off)
	}
}

func TestNginx(t *testing.T) {
	v := `nginx version: nginx/1.22.1
configure arguments: --prefix=/usr/share/nginx --modules-path=/usr/lib/nginx/modules --with-stream=dynamic --with-stream_ssl_module`
	info, err := parseNginxV(v, func(p string) bool { return p == "/usr/lib/nginx/modules/ngx_stream_module.so" })
	if err != nil || info.version != "nginx/1.22.1" || info.module != "/usr/lib/nginx/modules/ngx_stream_module.so" {
		t.Errorf("dynamic: %+v, %v", info, err)
	}
	if _, err := parseNginxV(v, func(string) bool { return false }); err == nil {
		t.Error("dynamic module missing: want an error")
	}
	info, err = parseNginxV("nginx version: nginx/1.25.0\nconfigure arguments: --with-stream --with-http_ssl_module", nil)
	if err != nil || info.module != "" {
		t.Errorf("static: %+v, %v", info, err)
	}
	if _, err := parseNginxV("nginx version: nginx/1.25.0\nconfigure arguments: --with-stream_ssl_module", nil); err == nil {
		t.Error("no stream module: want an error")
	}

	conf := nginxConfig("/tmp/x", "127.0.0.1:5000", []string{"127.0.0.1:6001", "127.0.0.1:6002"}, "auto", "/m/ngx_stream_module.so")
	for _, want := range []string{
		"load_module /m/ngx_stream_module.so;", "daemon off;", "worker_processes auto;",
		"server 127.0.0.1:6002;", "listen 127.0.0.1:5000 udp reuseport;",
		"proxy_responses 1;", "proxy_timeout 10s;", "pid /tmp/x/nginx.pid;",
	} {
		if !strings.Contains(conf, want) {
			t.Errorf("nginx.conf lacks %q:\n%s", want, conf)
		}
	}
	if strings.Count(conf, "{") != strings.Count(conf, "}") {
		t.Errorf("unbalanced braces:\n%s", conf)
	}
}

func TestProcParsing(t *testing.T) {
	stat := "1234 (cad dy) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 100 0 0"
	u, s, ppid, err := parseStat(stat)
	if err != nil || u != 250 || s != 75 || ppid != 1 {
		t.Errorf("parseStat = %d %d %d %v", u, s, ppid, err)
	}
	status := "Name:\tcaddy\nVmHWM:\t   55432 kB\nVmRSS:\t   40000 kB\n"
	if got := statusField(status, "VmHWM"); got != 55432 {
		t.Errorf("VmHWM = %d", got)
	}
	if got := statusField(status, "VmSwap"); got != 0 {
		t.Errorf("missing field = %d", got)
	}

	udp := `   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1: 0100007F:1388 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 100 2 0000000000000000 10
 2: 0100007F:1771 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 101 2 0000000000000000 5
 3: 0100007F:9C40 0100007F:1388 01 00000000:00000000 00:00000000 00000000     0        0 102 2 0000000000000000 0
 4: 0100007F:9C41 0100007F:1771 01 00000000:00000000 00:00000000 00000000     0        0 103 2 0000000000000000 0
 5: 0100007F:9C42 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 104 2 0000000000000000 0
`
	before := parseProcNetUDP(udp)
	if len(before) != 5 || before[0].localPort != 5000 || before[2].remotePort != 5000 || before[1].drops != 5 {
		t.Fatalf("parseProcNetUDP = %+v", before)
	}
	after := parseProcNetUDP(strings.NewReplacer(
		"100 2 0000000000000000 10", "100 2 0000000000000000 17", // listener +7
		"101 2 0000000000000000 5", "101 2 0000000000000000 6", // upstream +1
		"102 2 0000000000000000 0", "102 2 0000000000000000 2", // client +2
		"103 2 0000000000000000 0", "103 2 0000000000000000 3", // balancer up-side +3
		"104 2 0000000000000000 0", "104 2 0000000000000000 9", // another process: ignored
	).Replace(udp))
	got := dropDelta(before, after, 5000, map[int]bool{6001: true}, map[uint64]bool{103: true})
	want := map[string]uint64{dropListener: 7, dropUpstreams: 1, dropClients: 2, dropBalUp: 3}
	if len(got) != len(want) {
		t.Errorf("dropDelta = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("dropDelta[%s] = %d, want %d", k, got[k], v)
		}
	}
}

func TestFlags(t *testing.T) {
	o, err := parseFlags([]string{"-quick"})
	if err != nil {
		t.Fatal(err)
	}
	if o.duration.Seconds() != 1 || o.rounds != 2 || len(o.payloads) != 1 || len(o.targets) != len(targetOrder) {
		t.Errorf("quick: %+v", o)
	}
	o, err = parseFlags([]string{"-quick", "-rounds", "5", "-mode", "sweep"})
	if err != nil || o.rounds != 5 || strings.Join(o.targets, ",") != defaultSweepTargets || o.sweepFlows[len(o.sweepFlows)-1] != 1000 {
		t.Errorf("sweep quick with rounds: %+v, %v", o, err)
	}
	if o, err := parseFlags([]string{"-mode", "sweep", "-heap-profiles"}); err != nil || !o.heapProfiles {
		t.Errorf("-heap-profiles: %+v, %v", o, err)
	}
	// -cores is every mode's, and -quic-cores its old name.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, coresShared},
		{[]string{"-cores", "split"}, coresSplit},
		{[]string{"-mode", "sweep", "-cores", "split"}, coresSplit},
		{[]string{"-mode", "quic", "-quic-cores", "split"}, coresSplit},
		{[]string{"-cores", "split", "-quic-cores", "split"}, coresSplit},
		{[]string{"-mode", "sweep", "-cores", "one"}, coresOne},
	} {
		if o, err := parseFlags(tc.args); err != nil {
			t.Errorf("%v: %v", tc.args, err)
		} else if o.cores != tc.want {
			t.Errorf("%v: cores %q, want %q", tc.args, o.cores, tc.want)
		}
	}
	if o, err := parseFlags(nil); err != nil || o.clients != clientsLoopback {
		t.Errorf("-clients default: %+v, %v", o, err)
	}
	if o, err := parseFlags([]string{"-mode", "sweep", "-clients", "netns"}); err != nil || o.clients != clientsNetns {
		t.Errorf("-clients netns: %+v, %v", o, err)
	}
	if o, err := parseFlags(nil); err != nil || o.establish != 10*time.Second {
		t.Errorf("-establish default: %+v, %v", o, err)
	}
	for _, bad := range [][]string{
		{"-targets", "haproxy"}, {"-payloads", "4"}, {"-mode", "x"}, {"-rounds", "0"},
		{"-cores", "two"}, {"-quic-cores", "two"}, {"-cores", "split", "-quic-cores", "shared"}, {"-establish", "-1s"},
		{"-clients", "veth"}, {"-mode", "quic", "-clients", "netns"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("%v: want an error", bad)
		}
	}
}

// sampleReport is a small report with every target, two payloads, two
// rounds, one failed measurement and a NaN.
func sampleReport() *report {
	r := &report{Mode: "compare", Meta: &meta{Date: "2026-01-01 00:00 UTC", CPUs: 2, CPUModel: "Test CPU", Kernel: "Linux 6.0", GoVersion: "go1.26", Command: "go run ./examples/bench", Elapsed: "1s"}}
	for round := 1; round <= 2; round++ {
		for _, p := range []int{64, 1200} {
			for i, tg := range targetOrder {
				m := &measurement{Target: tg, Round: round, Payload: p, Flows: 16, Window: 4}
				m.setNaN()
				m.Sent, m.Received = 1000, 990
				m.Throughput = num(10000 * (i + 1 + round))
				m.P50US, m.P99US, m.P999US, m.LossPct = 100, 200, 300, 1
				if tg != "direct" {
					m.CPUPerDgramUS, m.PeakRSSKB = num(10+i), 50000
				}
				if tg == "flow" && round == 2 {
					m.KernelDrops = map[string]uint64{dropListener: 4}
				}
				if tg == "nginx" && round == 2 && p == 64 {
					m = &measurement{Target: tg, Round: round, Payload: p, Err: "balancer did not answer <&>"}
					m.setNaN()
				}
				r.Runs = append(r.Runs, m)
			}
		}
	}
	r.summarize()
	return r
}

func TestReport(t *testing.T) {
	r := sampleReport()
	if len(r.Summary) != 2*len(targetOrder) {
		t.Fatalf("%d summary rows, want %d", len(r.Summary), 2*len(targetOrder))
	}
	flow := r.Summary[2]
	if flow.Target != "flow" || flow.Payload != 64 || flow.Throughput != 45000 || flow.Rounds != 2 {
		t.Errorf("flow row: %+v", flow)
	}
	if got := float64(flow.VsProxy["throughput"]); math.Abs(got-45000.0/75000) > 1e-9 {
		t.Errorf("flow vs proxy throughput = %v", got)
	}
	nginx := r.Summary[6]
	if nginx.Rounds != 1 || len(nginx.Errors) != 1 || nginx.Throughput != 80000 {
		t.Errorf("nginx row with a failed round: %+v", nginx)
	}

	md := r.markdown()
	for _, want := range []string{
		"## Payload 64 bytes", "## Payload 1200 bytes", "| stabilize per flow | 45 000 (×0.60) |",
		"Test CPU", "Linux 6.0", "go1.26", "listener 2", "## Errors", "balancer did not answer",
		"Throughput per round",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}

	svg, err := r.svg()
	if err != nil {
		t.Fatal(err)
	}
	if err := xml.Unmarshal(svg, new(struct{})); err != nil {
		t.Errorf("SVG is not well-formed XML: %v", err)
	}
	for _, want := range []string{"caddy-l4 proxy", "64 B", "1200 B", "Throughput", "CPU per datagram", "n/a", "sans-serif"} {
		if !strings.Contains(string(svg), want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
}

func TestSweepReport(t *testing.T) {
	r := &report{Mode: "sweep"}
	for _, n := range []int{1, 10, 100} {
		for _, tg := range []string{"flow", "proxy"} {
			m := &measurement{Target: tg, Round: 1, Payload: 64, Flows: n, Window: 1, Sent: 10, Received: 10}
			m.setNaN()
			m.Throughput, m.CPUPerDgramUS = num(1000*n), 20
			m.RSSBaseKB, m.RSSLiveKB = 50000, 50000+int64(n)*10
			m.MemPerFlowB = 10240
			m.RSSIdleKB, m.MemPerIdleFlowB = 50000+int64(n)*5, 5120
			m.GoPerIdleFlowB, m.KernelPerIdleFlowB, m.SocketsPerIdleFlow = 6000, 2816, 1
			if tg == "proxy" {
				m.GoPerIdleFlowB = 12000
			}
			r.Runs = append(r.Runs, m)
		}
	}
	r.summarize()
	md := r.markdown()
	if !strings.Contains(md, "| 100 | stabilize per flow | 100 000 (×1.00) |") || !strings.Contains(md, "10.0 KiB") || !strings.Contains(md, "| 5120 B |") || !strings.Contains(md, "memory per idle flow") {
		t.Errorf("sweep markdown:\n%s", md)
	}
	// Go and kernel memory per idle flow, with their ratios to proxy, and
	// the sockets per idle flow.
	for _, want := range []string{
		"| memory per idle flow | Go per idle flow | kernel per idle flow | sockets per idle flow | kernel drops |",
		"| 5120 B (×1.00) | 6000 B (×0.50) | 2816 B (×1.00) | 1.00 | – |",
		"| 5120 B | 11.7 KiB | 2816 B | 1.00 | – |",
		"HeapInuse + StackInuse", "/proc/slabinfo",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("sweep markdown lacks %q:\n%s", want, md)
		}
	}
	if s := r.Summary[0]; s.GoPerIdleB != 6000 || s.KernelPerIdleB != 2816 || s.SocketsPerIdle != 1 || s.VsProxy["go_per_idle_flow"] != 0.5 {
		t.Errorf("summary %+v", s)
	}
	svg, err := r.svg()
	if err != nil {
		t.Fatal(err)
	}
	if err := xml.Unmarshal(svg, new(struct{})); err != nil {
		t.Errorf("sweep SVG: %v", err)
	}
}

func TestGomaxprocsTargets(t *testing.T) {
	for t0, want := range map[string]bool{"fastflow1": true, "proxy1": true, "fastflow": false, "proxy": false} {
		if gomaxprocsOne(t0) != want {
			t.Errorf("gomaxprocsOne(%q) != %v", t0, want)
		}
		if _, ok := targetLabels[baseTarget(t0)]; !ok {
			t.Errorf("baseTarget(%q) = %q, unknown", t0, baseTarget(t0))
		}
	}
	if listenNetwork("fastflow1") != "fastudp" || listenNetwork("proxy1") != "udp" {
		t.Error("listenNetwork of the GOMAXPROCS=1 targets")
	}
}

func TestFormatting(t *testing.T) {
	for v, want := range map[float64]string{162003: "162k", 1.5e6: "1.5M", 3.14159: "3.14", 1200: "1.2k", 0: "0", 25: "25"} {
		if got := compact(v); got != want {
			t.Errorf("compact(%v) = %q, want %q", v, got, want)
		}
	}
	if got := fmtInt(1234567); got != "1 234 567" {
		t.Errorf("fmtInt = %q", got)
	}
	if got := fmtInt(nan); got != "–" {
		t.Errorf("fmtInt(NaN) = %q", got)
	}
}

// TestSetupReport checks the sweep's set-up figures: the fewest flows
// answered and busy over the rounds, the medians of the set-up, in their
// table and per round, and each round's other work; a report without them
// (from before they were measured) has none of these tables.
func TestSetupReport(t *testing.T) {
	r := &report{Mode: "sweep"}
	for round := 1; round <= 3; round++ {
		m := &measurement{Target: "fastflow", Round: round, Payload: 64, Flows: 10000, Window: 1, Sent: 10, Received: 10}
		m.setNaN()
		m.Throughput, m.CPUPerDgramUS = 50000, 12
		m.Established, m.Busy = 10000, num(10000-round)
		m.SetupSeconds, m.SetupFlowsPerSecond, m.WarmupSeconds = num(round), num(10000/round), num(round)+1.5
		m.OthersCores = num(round) / 10
		if round == 3 {
			m.Established, m.SetupSeconds, m.SetupFlowsPerSecond = 9990, nan, nan
			m.Err = "the set-up gave up: 9990 of 10000 flows had had a reply 10.1 s after the first datagram"
		}
		r.Runs = append(r.Runs, m)
	}
	r.summarize()
	s := r.Summary[0]
	if s.EstablishedMin != 9990 || s.BusyMin != 9997 || s.SetupSeconds != 1.5 || s.WarmupSeconds != 3.5 || s.Rounds != 3 {
		t.Errorf("summary: answered %v, busy %v, set-up %v s, warm-up %v s, %d rounds", s.EstablishedMin, s.BusyMin, s.SetupSeconds, s.WarmupSeconds, s.Rounds)
	}
	md := r.markdown()
	for _, want := range []string{
		"| flows | target | flows answered | flows busy | warm-up s | set-up s | set-up flows/s |",
		"| 10000 | stabilize per flow, fastudp | 9 990 | 9 997 | 3.50 | 1.50 | 7 500 |",
		"Flows answered at the window's start, per round", "| 10 000 | 10 000 | 9 990 |",
		"Flows busy in the window, per round", "| 9 999 | 9 998 | 9 997 |",
		"Set-up s per round", "| 1.00 | 2.00 | – |",
		"Other work per round", "| 0.10 | 0.20 | 0.30 |",
		"the set-up gave up: 9990 of 10000",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	for _, m := range r.Runs {
		m.Established, m.Busy, m.SetupSeconds, m.SetupFlowsPerSecond, m.WarmupSeconds, m.OthersCores = nan, nan, nan, nan, nan, nan
	}
	r.summarize()
	if md := r.markdown(); strings.Contains(md, "flows busy") || strings.Contains(md, "Set-up s per round") || strings.Contains(md, "Other work") {
		t.Errorf("a report without set-up figures shows them:\n%s", md)
	}
}
