//go:build linux

package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/quicecho"
)

// QUIC termination (-mode quic): relaying to a quic/ upstream against a
// direct quic-go connection to the same server, in the same run. Targets:
// quic-direct (no balancer), quic-relay (udp/ listener) and quic-relay-fast
// (fastudp/ listener). First the balancer's memory (RSS, and its Go heap
// after a garbage collection) and goroutines before 1000 idle connections,
// with them, and after they have closed; then, in -rounds interleaved
// rounds, for each target: handshakes per second (concurrent connections,
// each with one stream exchange), bulk stream throughput (one stream
// uploaded to the server), and the CPU per handshake and per MB of the
// balancer and of this process, which runs the load generator and the
// server: from them, the machine-CPU bound of each ratio to direct
// (quiccpu.go).

// quicBenchALPN is the ALPN of the bench's QUIC server.
const quicBenchALPN = "stabilize-bench"

// Idle connections (-quic-idle, 1000 by default) each send a keep-alive
// every quicIdleKeepAlive; the balancer's layer4 server ends a client's
// caddy-l4 flow after quicIdleTimeout without a datagram.
const (
	quicIdleTimeout   = 5 * time.Second
	quicIdleKeepAlive = 2 * time.Second
)

// quicResult is one target's figures; zero where they do not apply.
type quicResult struct {
	Target           string  `json:"target"`
	HandshakesPerSec float64 `json:"handshakes_per_sec"`
	ThroughputMBps   float64 `json:"throughput_mb_per_sec"`
	// Medians over the rounds of each round's ratio to quic-direct.
	HandshakesXDirect float64 `json:"handshakes_x_direct,omitempty"`
	ThroughputXDirect float64 `json:"throughput_x_direct,omitempty"`
	Rounds            int     `json:"rounds,omitempty"`
	CPUPerHandshakeMs float64 `json:"cpu_ms_per_handshake,omitempty"`
	CPUPerMBms        float64 `json:"cpu_ms_per_mb,omitempty"`
	KBPerIdleConn     float64 `json:"kb_per_idle_connection,omitempty"`
	RSSBaseKB         int64   `json:"rss_base_kb,omitempty"`
	RSSAfterCloseKB   int64   `json:"rss_after_close_kb,omitempty"`
	IdleConns         int     `json:"idle_connections,omitempty"`
	// The balancer's Go heap in use and goroutines, after a garbage
	// collection: before the idle connections, with them, after they
	// closed.
	GoBase       *goStats `json:"go_base,omitempty"`
	GoIdle       *goStats `json:"go_idle,omitempty"`
	GoAfterClose *goStats `json:"go_after_close,omitempty"`
	quicMachine
	// Each round's figures, in order (in the medians only).
	PerRound []quicResult `json:"per_round,omitempty"`
}

// runQUICBench measures the QUIC targets and writes quic.md and quic.json.
func runQUICBench(ctx context.Context, env *benchEnv, o *options) error {
	certFile, keyFile, cert, err := quicecho.SelfSigned()
	defer quicecho.RemoveSelfSigned()
	if err != nil {
		return err
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{quicBenchALPN}},
		&quic.Config{MaxIncomingStreams: 1000})
	if err != nil {
		return err
	}
	defer ln.Close()
	go serveQUICSink(ln)
	clientTLS, err := quicecho.TrustFile(certFile)
	if err != nil {
		return err
	}
	clientTLS.NextProtos, clientTLS.ServerName = []string{quicBenchALPN}, "localhost"

	bulk := int64(256 << 20)
	if o.quick {
		bulk = 32 << 20
	}
	if o.quicProfile != "" {
		if err := os.MkdirAll(o.quicProfile, 0o755); err != nil {
			return err
		}
	}
	// The balancers run through every round, pinned once; each round
	// measures every target, direct first, so that its ratios compare
	// figures taken moments apart.
	targets := []string{"quic-direct", "quic-relay", "quic-relay-fast"}
	if o.quicCaddyB != "" {
		targets = append(targets, "quic-relay-b", "quic-relay-fast-b")
	}
	bals := map[string]*balancer{}
	defer func() {
		for _, b := range bals {
			stopIf(b)
		}
	}()
	for _, t := range targets[1:] {
		network, binary := "udp", env.caddy
		if strings.HasPrefix(t, "quic-relay-fast") {
			network = "fastudp"
		}
		if strings.HasSuffix(t, "-b") {
			binary = o.quicCaddyB
		}
		b, err := env.startQUICBalancer(ctx, t, network, binary, ln.Addr().String(), certFile, keyFile, clientTLS)
		if err != nil {
			return err
		}
		bals[t] = b
	}
	// Memory first, on fresh balancers: a bulk upload leaves heap that the
	// runtime returns to the system only later, during the readings.
	idle := map[string]quicResult{}
	for _, t := range targets[1:] {
		r := quicResult{Target: t}
		if o.quicIdle > 0 {
			fmt.Printf("%-16s %d idle connections… ", t, o.quicIdle)
			if err := measureQUICIdle(ctx, bals[t], bals[t].addr, clientTLS, o.quicIdle, &r, o.quicProfile); err != nil {
				return fmt.Errorf("%s: idle connections: %w", t, err)
			}
			fmt.Printf("%.1f kB each; heap %d → %d → %d kB, goroutines %d → %d → %d\n",
				r.KBPerIdleConn, r.GoBase.HeapInuseKB, r.GoIdle.HeapInuseKB, r.GoAfterClose.HeapInuseKB,
				r.GoBase.Goroutines, r.GoIdle.Goroutines, r.GoAfterClose.Goroutines)
		}
		idle[t] = r
	}
	rounds := make(map[string][]quicResult, len(targets))
	for round := range o.rounds {
		order := targets
		if o.quicCaddyB != "" && round%2 == 1 { // B's targets first
			order = []string{targets[0], targets[3], targets[4], targets[1], targets[2]}
		}
		for _, t := range order {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			others0 := othersCPU(bals, t)
			r, err := measureQUICRound(ctx, o, t, bals[t], ln.Addr().String(), clientTLS, bulk, round == 0)
			if err != nil {
				return err
			}
			// Left out of the machine's CPU: check that it is negligible.
			fmt.Printf("; the other balancers meanwhile %.0f ms CPU\n", 1000*(othersCPU(bals, t)-others0))
			rounds[t] = append(rounds[t], r)
		}
	}
	var results []quicResult
	for _, t := range targets {
		r, m := idle[t], quicMedians(rounds[t], rounds[targets[0]])
		r.Target = t
		r.Rounds, r.HandshakesPerSec, r.ThroughputMBps = m.Rounds, m.HandshakesPerSec, m.ThroughputMBps
		r.HandshakesXDirect, r.ThroughputXDirect = m.HandshakesXDirect, m.ThroughputXDirect
		r.CPUPerHandshakeMs, r.CPUPerMBms = m.CPUPerHandshakeMs, m.CPUPerMBms
		r.quicMachine, r.PerRound = m.quicMachine, rounds[t]
		results = append(results, r)
	}
	md := coresNote[o.cores] + "\n\n" + quicMarkdown(results) + "\nPeak RSS (VmHWM) after the rounds:"
	for _, t := range targets[1:] {
		md += fmt.Sprintf(" %s %.1f MB;", t, float64(bals[t].rssKB("VmHWM"))/1024)
	}
	md = strings.TrimSuffix(md, ";") + ".\n\n" + quicMachineMarkdown(results)
	fmt.Print("\n" + md)
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(results, "", "\t")
	if err != nil {
		return err
	}
	return errors.Join(os.WriteFile(filepath.Join(o.out, "quic.json"), js, 0o644),
		os.WriteFile(filepath.Join(o.out, "quic.md"), []byte(md), 0o644))
}

// measureQUICRound measures target t once: handshakes for -duration, then
// the bulk upload, and the CPU of this process (the load generator and the
// server) and of the balancer b for each (b is nil for quic-direct). With
// profile, it writes b's CPU profile of the handshakes.
func measureQUICRound(ctx context.Context, o *options, t string, b *balancer, server string, clientTLS *tls.Config, bulk int64, profile bool) (quicResult, error) {
	target := server
	if b != nil {
		target = b.addr
	}
	r := quicResult{Target: t}
	fmt.Printf("%-16s handshakes… ", t)
	cpu0 := readMachineCPU(b)
	var prof chan error
	if b != nil && profile && o.quicProfile != "" {
		prof = make(chan error, 1)
		go func() { prof <- b.cpuProfile(ctx, o.duration, filepath.Join(o.quicProfile, t+"-handshakes.pprof")) }()
	}
	n := quicHandshakes(ctx, target, clientTLS, o.duration)
	r.HandshakesPerSec = float64(n) / o.duration.Seconds()
	hs := readMachineCPU(b).since(cpu0)
	if n > 0 {
		r.CPUPerHandshakeMs = 1000 * hs.balancer / float64(n)
		r.LoadCPUPerHandshakeMs = 1000 * hs.load / float64(n)
		r.TotalCPUPerHandshakeMs = r.LoadCPUPerHandshakeMs + r.CPUPerHandshakeMs
		r.HandshakeLoadCores, r.HandshakeBalancerCores, r.HandshakeMachineCores = hs.cores()
	}
	if prof != nil {
		if err := <-prof; err != nil {
			return r, fmt.Errorf("%s: CPU profile: %w", t, err)
		}
	}
	fmt.Printf("%.0f/s (CPU ms each: balancer %.2f, load+server %.2f); bulk… ", r.HandshakesPerSec, r.CPUPerHandshakeMs, r.LoadCPUPerHandshakeMs)
	cpu0 = readMachineCPU(b)
	elapsed, err := quicBulk(ctx, target, clientTLS, bulk)
	if err != nil {
		return r, fmt.Errorf("%s: bulk: %w", t, err)
	}
	up := readMachineCPU(b).since(cpu0)
	mb := float64(bulk) / 1e6
	r.ThroughputMBps = mb / elapsed.Seconds()
	r.CPUPerMBms, r.LoadCPUPerMBms = 1000*up.balancer/mb, 1000*up.load/mb
	r.TotalCPUPerMBms = r.LoadCPUPerMBms + r.CPUPerMBms
	r.BulkLoadCores, r.BulkBalancerCores, r.BulkMachineCores = up.cores()
	fmt.Printf("%.0f MB/s (CPU ms/MB: balancer %.2f, load+server %.2f; cores %.2f + %.2f, machine %.2f)",
		r.ThroughputMBps, r.CPUPerMBms, r.LoadCPUPerMBms, r.BulkLoadCores, r.BulkBalancerCores, r.BulkMachineCores)
	return r, nil
}

// quicMedians is a target's figures over its rounds: medians, and the
// medians of each round's ratios to direct (rs[i] and direct[i] are the
// same round's).
func quicMedians(rs, direct []quicResult) quicResult {
	r := quicResult{Target: rs[0].Target, Rounds: len(rs)}
	var hs, mbps, cpuHS, cpuMB, hsX, mbpsX []float64
	for i, x := range rs {
		hs, mbps = append(hs, x.HandshakesPerSec), append(mbps, x.ThroughputMBps)
		cpuHS, cpuMB = append(cpuHS, x.CPUPerHandshakeMs), append(cpuMB, x.CPUPerMBms)
		hsX = append(hsX, x.HandshakesPerSec/direct[i].HandshakesPerSec)
		mbpsX = append(mbpsX, x.ThroughputMBps/direct[i].ThroughputMBps)
	}
	r.HandshakesPerSec, r.ThroughputMBps = median(hs), median(mbps)
	r.CPUPerHandshakeMs, r.CPUPerMBms = median(cpuHS), median(cpuMB)
	r.HandshakesXDirect, r.ThroughputXDirect = median(hsX), median(mbpsX)
	r.quicMachine = machineMedians(rs, direct)
	return r
}

// measureQUICIdle reads the balancer's memory and goroutines before n
// idle connections, with them, and after they closed. The readings before
// and after wait for the caddy-l4 flows of earlier connections to idle out
// (quicIdleTimeout). With profiles (a folder), it also writes the
// balancer's heap profile and goroutines with the connections and after
// they closed.
func measureQUICIdle(ctx context.Context, b *balancer, target string, clientTLS *tls.Config, n int, r *quicResult, profiles string) error {
	settle := func(d time.Duration) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
			return nil
		}
	}
	// stats reads the Go runtime figures (after garbage collection) and
	// the profiles of stage.
	stats := func(stage string) (*goStats, error) {
		s, err := b.readGoStats(ctx)
		if err != nil || profiles == "" || stage == "" {
			return &s, err
		}
		for file, path := range map[string]string{
			stage + ".heap.pprof":     "/debug/pprof/heap",
			stage + ".goroutines.txt": "/debug/pprof/goroutine?debug=1",
		} {
			body, err := adminGet(ctx, b.admin, path)
			if err == nil {
				err = os.WriteFile(filepath.Join(profiles, r.Target+"-"+file), body, 0o644)
			}
			if err != nil {
				return &s, err
			}
		}
		return &s, nil
	}
	if err := settle(quicIdleTimeout + time.Second); err != nil {
		return err
	}
	var err error
	r.RSSBaseKB = b.rssKB("VmRSS")
	if r.GoBase, err = stats("base"); err != nil {
		return err
	}
	conns, err := quicIdle(ctx, target, clientTLS, n)
	r.IdleConns = len(conns)
	if err == nil {
		err = settle(500 * time.Millisecond)
	}
	if err == nil {
		r.KBPerIdleConn = float64(b.rssKB("VmRSS")-r.RSSBaseKB) / float64(len(conns))
		r.GoIdle, err = stats("idle")
	}
	// Closed 50 at a time, so that the balancer's listener socket, at its
	// default receive buffer on udp/, drops no CONNECTION_CLOSE: a
	// connection whose close is lost lives on until its idle timeout.
	for i, c := range conns {
		_ = c.CloseWithError(0, "")
		if i%50 == 49 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err != nil {
		return err
	}
	if err := settle(quicIdleTimeout + 3*time.Second); err != nil {
		return err
	}
	r.RSSAfterCloseKB = b.rssKB("VmRSS")
	r.GoAfterClose, err = stats("after-close")
	return err
}

func stopIf(b *balancer) {
	if b != nil {
		b.stop()
	}
}

// quicMarkdown is the results table, with ratios to quic-direct.
func quicMarkdown(rs []quicResult) string {
	var sb strings.Builder
	sb.WriteString("| target | handshakes/s | × direct | bulk MB/s | × direct | CPU ms/handshake | CPU ms/MB | idle conns | RSS kB/idle conn | RSS MB base → after close | Go heap MB base → idle → closed | goroutines base → idle → closed |\n")
	sb.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|\n")
	direct := rs[0]
	mbs := func(kb ...int64) string {
		var parts []string
		for _, k := range kb {
			parts = append(parts, fmt.Sprintf("%.1f", float64(k)/1024))
		}
		return strings.Join(parts, " → ")
	}
	for i, r := range rs {
		hsX, mbpsX := r.HandshakesXDirect, r.ThroughputXDirect
		if hsX == 0 || mbpsX == 0 { // one round, or figures from before rounds
			hsX, mbpsX = r.HandshakesPerSec/direct.HandshakesPerSec, r.ThroughputMBps/direct.ThroughputMBps
		}
		fmt.Fprintf(&sb, "| %s | %.0f | %.2f | %.0f | %.2f |", r.Target, r.HandshakesPerSec, hsX, r.ThroughputMBps, mbpsX)
		if i == 0 { // direct: no balancer
			sb.WriteString(" | | | | | | |\n")
			continue
		}
		fmt.Fprintf(&sb, " %.2f | %.2f |", r.CPUPerHandshakeMs, r.CPUPerMBms)
		if r.IdleConns == 0 {
			sb.WriteString(" 0 | | | | |\n")
			continue
		}
		fmt.Fprintf(&sb, " %d | %.1f | %s |", r.IdleConns, r.KBPerIdleConn, mbs(r.RSSBaseKB, r.RSSAfterCloseKB))
		if r.GoBase != nil && r.GoIdle != nil && r.GoAfterClose != nil {
			fmt.Fprintf(&sb, " %s | %d → %d → %d |\n", mbs(r.GoBase.HeapInuseKB, r.GoIdle.HeapInuseKB, r.GoAfterClose.HeapInuseKB),
				r.GoBase.Goroutines, r.GoIdle.Goroutines, r.GoAfterClose.Goroutines)
		} else {
			sb.WriteString(" | |\n")
		}
	}
	return sb.String()
}

// serveQUICSink answers each stream, read to its FIN, with the number of
// bytes it carried.
func serveQUICSink(ln *quic.Listener) {
	for {
		c, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		go func() {
			for {
				s, err := c.AcceptStream(context.Background())
				if err != nil {
					return
				}
				go func() {
					n, err := io.Copy(io.Discard, s)
					if err != nil {
						s.CancelWrite(1)
						return
					}
					_, _ = s.Write([]byte(strconv.FormatInt(n, 10)))
					_ = s.Close()
				}()
			}
		}()
	}
}

// quicExchange sends data on a new stream and reads the sink's count.
func quicExchange(ctx context.Context, c *quic.Conn, data io.Reader, want int64) error {
	s, err := c.OpenStreamSync(ctx)
	if err != nil {
		return err
	}
	if _, err := io.Copy(s, data); err != nil {
		return err
	}
	_ = s.Close()
	reply, err := io.ReadAll(s)
	if err != nil {
		return err
	}
	if got, _ := strconv.ParseInt(string(reply), 10, 64); got != want {
		return fmt.Errorf("the server counted %q bytes, want %d", reply, want)
	}
	return nil
}

// quicHandshakes counts the connections (handshake, one exchange, close)
// that 8 concurrent clients complete in d.
func quicHandshakes(ctx context.Context, target string, tlsConf *tls.Config, d time.Duration) int64 {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var n atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for ctx.Err() == nil {
				c, err := quic.DialAddr(ctx, target, tlsConf, nil)
				if err != nil {
					continue
				}
				if quicExchange(ctx, c, strings.NewReader("hi"), 2) == nil {
					n.Add(1)
				}
				_ = c.CloseWithError(0, "")
			}
		})
	}
	wg.Wait()
	return n.Load()
}

// quicBulk uploads size bytes on one stream and times it to the server's
// count.
func quicBulk(ctx context.Context, target string, tlsConf *tls.Config, size int64) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	c, err := quic.DialAddr(ctx, target, tlsConf, nil)
	if err != nil {
		return 0, err
	}
	defer c.CloseWithError(0, "")
	start := time.Now()
	err = quicExchange(ctx, c, io.LimitReader(zeroReader{}, size), size)
	return time.Since(start), err
}

type zeroReader struct{}

func (zeroReader) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}

// quicIdle opens n connections, each after one exchange, and leaves them
// open.
func quicIdle(ctx context.Context, target string, tlsConf *tls.Config, n int) ([]*quic.Conn, error) {
	var conns []*quic.Conn
	for range n {
		c, err := quic.DialAddr(ctx, target, tlsConf, &quic.Config{KeepAlivePeriod: quicIdleKeepAlive})
		if err != nil {
			return conns, err
		}
		conns = append(conns, c)
		if err := quicExchange(ctx, c, strings.NewReader("hi"), 2); err != nil {
			return conns, err
		}
	}
	return conns, nil
}

// startQUICBalancer starts the Caddy binary terminating QUIC on network in
// front of the server at upstream, and waits until a handshake through it
// works.
func (e *benchEnv) startQUICBalancer(ctx context.Context, t, network, binary, upstream, certFile, keyFile string, clientTLS *tls.Config) (*balancer, error) {
	port, err := freeUDPPort()
	if err != nil {
		return nil, err
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	adminPort, err := freeTCPPort()
	if err != nil {
		return nil, err
	}
	admin := fmt.Sprintf("127.0.0.1:%d", adminPort)
	dir, err := os.MkdirTemp(e.tmp, t+"-")
	if err != nil {
		return nil, err
	}
	cfg := caddyConfigMap(network, listen, admin, map[string]any{
		"handler":   "stabilize",
		"upstreams": []any{map[string]any{"dial": "quic/" + upstream}},
		"quic": map[string]any{
			"certificate":    certFile,
			"key":            keyFile,
			"alpn":           []string{quicBenchALPN},
			"tls_trust_pool": map[string]any{"provider": "file", "pem_files": []string{certFile}},
		},
	})
	// A short idle timeout, so that the flows of closed connections end
	// within the measurement.
	server := cfg["apps"].(map[string]any)["layer4"].(map[string]any)["servers"].(map[string]any)[benchServer].(map[string]any)
	server["idle_timeout"] = quicIdleTimeout.String()
	js, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(cfgPath, js, 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(binary, "run", "--config", cfgPath)
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	b, err := launch(cmd, listen, port, dir, balancerCPUFor(e.opts.cores))
	if err != nil {
		return nil, err
	}
	b.admin = admin
	deadline := time.Now().Add(15 * time.Second)
	for {
		dctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		c, err := quic.DialAddr(dctx, listen, clientTLS, nil)
		if err == nil {
			err = quicExchange(dctx, c, strings.NewReader("hi"), 2)
			_ = c.CloseWithError(0, "")
		}
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			b.stop()
			return nil, fmt.Errorf("%s: not ready: %v: %s", t, err, b.logTail())
		}
	}
	b.pids = processTree(cmd.Process.Pid)
	return b, nil
}
