//go:build linux

package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Where datagrams were dropped by the kernel for a full socket receive
// buffer, from the drops column of /proc/net/udp, by the role of the socket.
const (
	dropListener  = "listener"    // the balancer's client-facing socket
	dropBalUp     = "balancer_up" // the balancer's upstream-facing sockets
	dropUpstreams = "upstreams"   // the echo servers
	dropClients   = "clients"     // the load generator's sockets
)

// dropRoles are the socket roles in report order.
var dropRoles = []string{dropListener, dropBalUp, dropUpstreams, dropClients}

// udpSocket is one line of /proc/net/udp.
type udpSocket struct {
	localPort, remotePort int
	inode                 uint64
	drops                 uint64
}

// readUDPSockets parses /proc/net/udp (IPv4 sockets; every socket of the
// benchmark is IPv4).
func readUDPSockets() []udpSocket {
	b, err := os.ReadFile("/proc/net/udp")
	if err != nil {
		return nil
	}
	return parseProcNetUDP(string(b))
}

func parseProcNetUDP(s string) []udpSocket {
	var out []udpSocket
	for i, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 13 {
			continue
		}
		lp, err1 := hexPort(f[1])
		rp, err2 := hexPort(f[2])
		inode, err3 := strconv.ParseUint(f[9], 10, 64)
		drops, err4 := strconv.ParseUint(f[len(f)-1], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || err4 != nil {
			continue
		}
		out = append(out, udpSocket{localPort: lp, remotePort: rp, inode: inode, drops: drops})
	}
	return out
}

// hexPort returns the port of a /proc/net/udp address, "0100007F:C226".
func hexPort(addr string) (int, error) {
	_, p, ok := strings.Cut(addr, ":")
	if !ok {
		return 0, errors.New("no port")
	}
	n, err := strconv.ParseUint(p, 16, 16)
	return int(n), err
}

// dropDelta attributes the drops between two snapshots (matched by inode)
// to socket roles: listenPort is the target's port, upstreamPorts the echo
// servers'. For the direct target listenPort is an upstream's port.
// balancerInodes are the sockets the balancer's processes hold; drops on
// sockets of other processes of the machine are ignored.
func dropDelta(before, after []udpSocket, listenPort int, upstreamPorts map[int]bool, balancerInodes map[uint64]bool) map[string]uint64 {
	prev := make(map[uint64]uint64, len(before))
	for _, sk := range before {
		prev[sk.inode] = sk.drops
	}
	out := map[string]uint64{}
	for _, sk := range after {
		d := sk.drops - min(prev[sk.inode], sk.drops)
		if d == 0 {
			continue
		}
		switch {
		case upstreamPorts[sk.localPort]:
			out[dropUpstreams] += d
		case sk.localPort == listenPort:
			out[dropListener] += d
		case sk.remotePort == listenPort:
			out[dropClients] += d
		case balancerInodes[sk.inode]:
			out[dropBalUp] += d
		}
	}
	return out
}

// socketInodes returns the inodes of the sockets the processes hold open.
func socketInodes(pids []int) map[uint64]bool {
	out := map[uint64]bool{}
	for _, pid := range pids {
		dir := fmt.Sprintf("/proc/%d/fd", pid)
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, ent := range ents {
			link, err := os.Readlink(filepath.Join(dir, ent.Name()))
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			if n, err := strconv.ParseUint(strings.TrimSuffix(link[len("socket:["):], "]"), 10, 64); err == nil {
				out[n] = true
			}
		}
	}
	return out
}

// fmtDrops formats kernel drops by role: "listener 12, clients 3".
func fmtDrops(d map[string]uint64) string {
	var parts []string
	for _, role := range dropRoles {
		if d[role] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", role, d[role]))
		}
	}
	return strings.Join(parts, ", ")
}
