//go:build linux

package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	rpprof "runtime/pprof"
	"strings"
	"sync"
	"testing"
)

func TestParseHeapMemStats(t *testing.T) {
	const tail = `heap profile: 1: 64 [2: 128] @ heap/1048576
# runtime.MemStats
# Alloc = 1000
# HeapInuse = 7340032
# HeapObjects = 12
# Stack = 557056 / 557056
# MSpan = 100 / 200
`
	g, err := parseHeapMemStats(strings.NewReader(tail))
	if err != nil || g.HeapInuse != 7340032 || g.StackInuse != 557056 || g.total() != 7340032+557056 {
		t.Errorf("parseHeapMemStats = %+v, %v", g, err)
	}
	if _, err := parseHeapMemStats(strings.NewReader("# HeapInuse = 5\n")); err == nil {
		t.Error("no Stack line: want an error")
	}

	// The runtime's own text, as Caddy's admin API serves it.
	var buf bytes.Buffer
	if err := rpprof.Lookup("heap").WriteTo(&buf, 1); err != nil {
		t.Fatal(err)
	}
	if g, err := parseHeapMemStats(&buf); err != nil || g.HeapInuse <= 0 || g.StackInuse <= 0 {
		t.Errorf("this process's heap profile: %+v, %v", g, err)
	}
}

// TestReadGoMem reads the Go memory from a real HTTP server with
// net/http/pprof's heap handler, as Caddy's admin API has it.
func TestReadGoMem(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	var mu sync.Mutex
	var gcs []string
	mux.HandleFunc("/debug/pprof/heap", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		gcs = append(gcs, r.FormValue("gc")+"/"+r.FormValue("debug"))
		mu.Unlock()
		pprof.Handler("heap").ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	g, err := readGoMem(context.Background(), ln.Addr().String())
	if err != nil || g.HeapInuse <= 0 || g.StackInuse <= 0 {
		t.Errorf("readGoMem = %+v, %v", g, err)
	}
	mu.Lock()
	got := strings.Join(gcs, " ")
	mu.Unlock()
	if got != "1/1 1/1" {
		t.Errorf("requests (gc/debug) %q, want two forced collections in text form", got)
	}

	if _, err := readGoMem(context.Background(), ln.Addr().String()+"/nowhere"); err == nil {
		t.Error("a missing profile: want an error")
	}

	// The profile itself, for go tool pprof: gzipped protobuf.
	path := filepath.Join(t.TempDir(), "heap.pb.gz")
	if err := saveHeapProfile(context.Background(), ln.Addr().String(), path); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(path); err != nil || !bytes.HasPrefix(b, []byte{0x1f, 0x8b}) {
		t.Errorf("saved profile: %.20q, %v; want gzip", b, err)
	}
	if err := saveHeapProfile(context.Background(), ln.Addr().String()+"/nowhere", path); err == nil {
		t.Error("a missing profile: want an error")
	}
}

func TestKernelMem(t *testing.T) {
	const slab = `slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>
UDPv6                154    242   1472   22    8 : tunables    0    0    0 : slabdata     11     11      0
UDP                   85    132   1344   12    4 : tunables    0    0    0 : slabdata     11     11      0
sock_inode_cache     187    190    832   19    4 : tunables    0    0    0 : slabdata     10     10      0
kmalloc-64          2112   2624     64   64    1 : tunables    0    0    0 : slabdata     41     41      0
`
	before := parseSlabinfo(slab, kernelCaches)
	if len(before) != 3 || before["UDP"] != 85*1344 || before["UDPv6"] != 154*1472 || before["sock_inode_cache"] != 187*832 {
		t.Errorf("parseSlabinfo = %v", before)
	}
	if km := parseSlabinfo(slab, []string{"TCP"}); km != nil {
		t.Errorf("no such cache: %v, want nil", km)
	}

	pages, ok := parseSockstatUDPMem("sockets: used 18\nTCP: inuse 1 orphan 0 tw 0 alloc 1 mem 104\nUDP: inuse 2 mem 259\nUDPLITE: inuse 0\n")
	if !ok || pages != 259 {
		t.Errorf("parseSockstatUDPMem = %d, %v, want 259", pages, ok)
	}
	if _, ok := parseSockstatUDPMem("UDP: inuse 2\n"); ok {
		t.Error("no mem: want none")
	}

	before[udpMem] = 4096
	after := kernelMem{"UDP": 10085 * 1344, "sock_inode_cache": 10187 * 832, "filp": 192, udpMem: 1 << 20}
	byKey, total := after.delta(before)
	if want := int64(10000*1344 - 154*1472 + 10000*832 + 192); total != want {
		t.Errorf("total %d, want %d (slab caches only)", total, want)
	}
	if byKey["UDPv6"] != -154*1472 || byKey["filp"] != 192 || byKey[udpMem] != 1<<20-4096 {
		t.Errorf("by key %v", byKey)
	}

	// This machine's, where it can be read.
	km, err := readKernelMem()
	if _, statErr := os.Stat("/proc/slabinfo"); err != nil && statErr == nil && os.Geteuid() == 0 {
		t.Errorf("readKernelMem as root: %v", err)
	}
	if err == nil && km["UDP"] <= 0 {
		t.Errorf("readKernelMem = %v: no UDP cache", km)
	}
}

func TestPerIdleFlow(t *testing.T) {
	base := idleMem{goMem: &goMem{HeapInuse: 1000, StackInuse: 500}, kernel: kernelMem{"UDP": 1344, udpMem: 8192}, sockets: 3}
	idle := idleMem{goMem: &goMem{HeapInuse: 61000, StackInuse: 500}, kernel: kernelMem{"UDP": 1344 * 11, "filp": 1920, udpMem: 0}, sockets: 13}
	m := &measurement{}
	m.setNaN()
	m.perIdleFlow(base, idle, 10)
	if m.GoPerIdleFlowB != 6000 || m.KernelPerIdleFlowB != 1344+192 || m.SocketsPerIdleFlow != 1 || m.Err != "" {
		t.Errorf("Go %v, kernel %v, sockets %v per flow, error %q; want 6000, 1536, 1, none", m.GoPerIdleFlowB, m.KernelPerIdleFlowB, m.SocketsPerIdleFlow, m.Err)
	}
	if m.KernelIdleDelta[udpMem] != -8192 || m.GoIdle.HeapInuse != 61000 {
		t.Errorf("kept %v, %+v", m.KernelIdleDelta, m.GoIdle)
	}

	// nginx: no Go memory; an unreadable slabinfo is an error of the
	// measurement, and leaves the figure unknown.
	m = &measurement{Err: "late"}
	m.setNaN()
	m.perIdleFlow(idleMem{sockets: 1}, idleMem{sockets: 1, err: []string{"kernel memory: denied"}}, 10)
	if m.GoPerIdleFlowB.known() || m.KernelPerIdleFlowB.known() || m.SocketsPerIdleFlow != 0 || m.Err != "late; kernel memory: denied" {
		t.Errorf("Go %v, kernel %v, sockets %v, error %q", m.GoPerIdleFlowB, m.KernelPerIdleFlowB, m.SocketsPerIdleFlow, m.Err)
	}
}
