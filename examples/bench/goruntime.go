//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// goStats is the balancer's Go runtime after a garbage collection, read
// from Caddy's admin API: the heap it really holds, which its RSS does not
// show (Go keeps freed heap for reuse), and its goroutines.
type goStats struct {
	HeapInuseKB int64 `json:"heap_inuse_kb"`
	Goroutines  int64 `json:"goroutines"`
}

// readGoStats reads the balancer's Go heap in use after garbage collection
// (readGoMem) and its goroutines (go_goroutines, from its /metrics). The
// balancer needs its admin API on (b.admin).
func (b *balancer) readGoStats(ctx context.Context) (goStats, error) {
	g, err := readGoMem(ctx, b.admin)
	if err != nil {
		return goStats{}, err
	}
	text, err := adminGet(ctx, b.admin, "/metrics")
	if err != nil {
		return goStats{}, err
	}
	n, err := promValue(string(text), "go_goroutines")
	if err != nil {
		return goStats{}, err
	}
	return goStats{HeapInuseKB: g.HeapInuse / 1024, Goroutines: int64(n)}, nil
}

// cpuProfile writes the balancer's CPU profile of the next d (whole
// seconds, at least one) to file.
func (b *balancer) cpuProfile(ctx context.Context, d time.Duration, file string) error {
	secs := max(1, int(math.Ceil(d.Seconds())))
	prof, err := adminGet(ctx, b.admin, fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs))
	if err != nil {
		return err
	}
	return os.WriteFile(file, prof, 0o644)
}

// adminGet is the body of a GET of path on the Caddy admin API at admin
// (host:port).
func adminGet(ctx context.Context, admin, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("admin API: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("admin API: GET %s: %s", path, resp.Status)
	}
	return body, err
}

// promValue is the value of the metric name, without labels, in the
// Prometheus text format.
func promValue(text, name string) (float64, error) {
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(line, name+" ")
		if ok {
			return strconv.ParseFloat(strings.TrimSpace(rest), 64)
		}
	}
	return 0, fmt.Errorf("metric %s: not found", name)
}

// freeTCPPort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freeTCPPort() (int, error) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
