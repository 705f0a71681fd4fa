//go:build linux

package main

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// cpuSeconds is the user+system CPU time of the balancer's processes.
func (b *balancer) cpuSeconds() float64 {
	var ticks int64
	for _, pid := range b.pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		if u, s, _, err := parseStat(string(data)); err == nil {
			ticks += u + s
		}
	}
	return float64(ticks) / clockTicks
}

// selfCPUSeconds is the user+system CPU time of the benchmark's own
// process: the load generator and the in-process upstreams.
func selfCPUSeconds() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return math.NaN()
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// rssKB sums a /proc/<pid>/status field (VmHWM, VmRSS) over the
// balancer's processes, in kB.
func (b *balancer) rssKB(field string) int64 {
	var sum int64
	for _, pid := range b.pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		sum += statusField(string(data), field)
	}
	return sum
}

// parseStat returns utime, stime (in clock ticks) and the parent pid from
// the text of /proc/<pid>/stat.
func parseStat(s string) (utime, stime int64, ppid int, err error) {
	// The command name is in parentheses and may contain spaces.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, 0, errors.New("malformed stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return 0, 0, 0, errors.New("short stat")
	}
	if ppid, err = strconv.Atoi(f[1]); err != nil {
		return
	}
	if utime, err = strconv.ParseInt(f[11], 10, 64); err != nil {
		return
	}
	stime, err = strconv.ParseInt(f[12], 10, 64)
	return
}

// statusField returns the kB value of a /proc/<pid>/status line, or 0.
func statusField(status, field string) int64 {
	for _, line := range strings.Split(status, "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok || name != field {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		return n
	}
	return 0
}

// processTree returns pid and its children (one level is enough: nginx's
// master and workers; Caddy has no children).
func processTree(pid int) []int {
	pids := []int{pid}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return pids
	}
	for _, ent := range ents {
		child, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + ent.Name() + "/stat")
		if err != nil {
			continue
		}
		if _, _, ppid, err := parseStat(string(data)); err == nil && ppid == pid {
			pids = append(pids, child)
		}
	}
	return pids
}
