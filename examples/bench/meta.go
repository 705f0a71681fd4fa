//go:build linux

package main

import (
	"fmt"
	"os"
	"path/filepath"
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
			sweepLoad(o),
			fmt.Sprintf("payload %d bytes", o.sweepPayload),
			sweepWarmup(o),
			fmt.Sprintf("loss timeout %v", o.timeout),
		}
	}
	m.Parameters = append(m.Parameters, fmt.Sprintf("%s This process's GOMAXPROCS: %d", coresNote[o.cores], runtime.GOMAXPROCS(0)), clientsNote[o.clients],
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

// sweepLoad describes the sweep's load.
func sweepLoad(o *options) string {
	sources := "127.0.0.1…"
	if o.clients == clientsNetns {
		sources = "10.255.x.2… in the clients' namespace"
	}
	if o.sweepRate > 0 {
		return fmt.Sprintf("flows %s; fixed rate: %d datagrams/s in total, spread evenly over the flows, each flow paced with one datagram outstanding; client source addresses %s (%d flows each)",
			joinInts(o.sweepFlows, ", "), o.sweepRate, sources, flowsPerSource)
	}
	return fmt.Sprintf("flows %s, each with %d datagram(s) outstanding (closed loop); client source addresses %s (%d flows each)",
		joinInts(o.sweepFlows, ", "), o.sweepWindow, sources, flowsPerSource)
}

// sweepWarmup describes the sweep's warm-up and rounds.
func sweepWarmup(o *options) string {
	w := fmt.Sprintf("%v measured after a warm-up of max(%v, ramp + 500ms) (flows start spread over min(N × 100µs, 1s))", o.duration, o.warmup)
	if o.establish > 0 {
		w = fmt.Sprintf("set-up first: every flow sends one datagram (over the ramp) until each has had a reply (giving up after %v); then the load: ", o.establish) + w
	}
	return fmt.Sprintf("%s; %d interleaved round(s), medians reported", w, o.rounds)
}
