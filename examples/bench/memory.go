//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
)

// goMem is a Caddy balancer's Go memory in use after a forced garbage
// collection, from the runtime.MemStats its admin API's heap profile
// prints (GET /debug/pprof/heap?gc=1&debug=1).
type goMem struct {
	HeapInuse  int64 `json:"heap_inuse"`
	StackInuse int64 `json:"stack_inuse"`
}

// total is the heap and the goroutine stacks in use.
func (g goMem) total() int64 { return g.HeapInuse + g.StackInuse }

// readGoMem asks the Caddy admin API at admin (host:port) for its Go
// memory in use. It collects garbage twice, as the stabilize package's
// BenchmarkIdleFlowMemory does: the second collection frees what
// sync.Pools kept through the first.
func readGoMem(ctx context.Context, admin string) (goMem, error) {
	var g goMem
	for range 2 {
		body, err := adminGet(ctx, admin, "/debug/pprof/heap?gc=1&debug=1")
		if err != nil {
			return goMem{}, fmt.Errorf("heap profile: %w", err)
		}
		if g, err = parseHeapMemStats(bytes.NewReader(body)); err != nil {
			return goMem{}, err
		}
	}
	return g, nil
}

// saveHeapProfile writes the heap profile of the Caddy whose admin API is
// at admin, taken after a forced garbage collection, to path: gzipped
// protobuf, for `go tool pprof`.
func saveHeapProfile(ctx context.Context, admin, path string) error {
	b, err := adminGet(ctx, admin, "/debug/pprof/heap?gc=1")
	if err != nil {
		return fmt.Errorf("heap profile: %w", err)
	}
	return os.WriteFile(path, b, 0o644)
}

// parseHeapMemStats reads HeapInuse and StackInuse from the runtime.MemStats
// lines at the end of a heap profile in text form (debug=1):
// "# HeapInuse = 123" and "# Stack = <inuse> / <sys>".
func parseHeapMemStats(r io.Reader) (goMem, error) {
	var g goMem
	var heap, stack bool
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(strings.TrimPrefix(sc.Text(), "# "), " = ")
		if !ok {
			continue
		}
		var err error
		switch name {
		case "HeapInuse":
			g.HeapInuse, err = strconv.ParseInt(val, 10, 64)
			heap = err == nil
		case "Stack":
			inuse, _, _ := strings.Cut(val, " / ")
			g.StackInuse, err = strconv.ParseInt(inuse, 10, 64)
			stack = err == nil
		}
	}
	if err := sc.Err(); err != nil {
		return goMem{}, err
	}
	if !heap || !stack {
		return goMem{}, fmt.Errorf("heap profile without HeapInuse and Stack lines")
	}
	return g, nil
}

// kernelCaches are the slab caches of a socket's kernel objects, counted
// for the kernel memory per flow: the UDP sock (UDP, UDPv6), the socket
// and its inode (sock_inode_cache), its open file (filp) and dentry, and
// its epoll registration (eventpoll_epi, eventpoll_pwq).
var kernelCaches = []string{"UDP", "UDPv6", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq"}

// udpMem is the key, in a kernelMem, of /proc/net/sockstat's "UDP: mem":
// the memory charged to UDP sockets, in bytes. It is accounting, not
// allocation: the datagrams queued on them, and what each socket keeps
// charged ahead (sk_forward_alloc) after it has received. So it is
// reported but not in a kernelMem's total.
const udpMem = "udp_mem"

// kernelMem is a snapshot of the whole system's kernel memory of the
// kernelCaches (active objects × object size, from /proc/slabinfo), and
// udpMem, in bytes, by key.
type kernelMem map[string]int64

// readKernelMem takes a kernelMem snapshot. /proc/slabinfo is readable by
// root only; without it the snapshot is nil.
func readKernelMem() (kernelMem, error) {
	slab, err := os.ReadFile("/proc/slabinfo")
	if err != nil {
		return nil, err
	}
	km := parseSlabinfo(string(slab), kernelCaches)
	if km == nil {
		return nil, fmt.Errorf("/proc/slabinfo has none of %v", kernelCaches)
	}
	if stat, err := os.ReadFile("/proc/net/sockstat"); err == nil {
		if pages, ok := parseSockstatUDPMem(string(stat)); ok {
			km[udpMem] = pages * int64(os.Getpagesize())
		}
	}
	return km, nil
}

// parseSlabinfo returns active_objs × objsize of each of caches found in
// the text of /proc/slabinfo (version 2.1), or nil when none is.
func parseSlabinfo(s string, caches []string) kernelMem {
	var km kernelMem
	for line := range strings.Lines(s) {
		f := strings.Fields(line)
		if len(f) < 4 || !slices.Contains(caches, f[0]) {
			continue
		}
		active, err1 := strconv.ParseInt(f[1], 10, 64)
		size, err2 := strconv.ParseInt(f[3], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		if km == nil {
			km = kernelMem{}
		}
		km[f[0]] = active * size
	}
	return km
}

// parseSockstatUDPMem returns the pages of "UDP: inuse <n> mem <pages>" in
// the text of /proc/net/sockstat.
func parseSockstatUDPMem(s string) (int64, bool) {
	for line := range strings.Lines(s) {
		rest, ok := strings.CutPrefix(line, "UDP:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		for i := 0; i+1 < len(f); i += 2 {
			if f[i] == "mem" {
				n, err := strconv.ParseInt(f[i+1], 10, 64)
				return n, err == nil
			}
		}
	}
	return 0, false
}

// delta is after − before, by key; total is that of the kernelCaches.
// Keys missing from either count as 0 there.
func (after kernelMem) delta(before kernelMem) (byKey map[string]int64, total int64) {
	byKey = map[string]int64{}
	for k, v := range before {
		byKey[k] = -v
	}
	for k, v := range after {
		byKey[k] += v
	}
	for _, c := range kernelCaches {
		total += byKey[c]
	}
	return byKey, total
}
