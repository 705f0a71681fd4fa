//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Client placement (-clients). loopback: the load generator's sockets are
// in this process's network namespace and talk to the balancer over
// 127.0.0.1, so the kernel delivers each reply into its client socket in
// the sender's (the balancer's) system call. netns: they are in a network
// namespace of their own behind a veth pair, with Receive Packet Steering
// on each side, so that each side's receive work runs on its own CPU, as
// on two hosts.
const (
	clientsLoopback = "loopback"
	clientsNetns    = "netns"
)

// clientsNote says where the load generator's sockets were, by -clients.
var clientsNote = map[string]string{
	clientsLoopback: "Clients: loopback (the load generator's sockets talk to the balancer over 127.0.0.1; the kernel delivers a reply into its client socket within the sender's system call).",
	clientsNetns:    "Clients: netns (the load generator's sockets in a network namespace of their own behind a veth pair; the balancer and the upstreams listen on the root side's address; Receive Packet Steering sends each side's receive work to its own CPU by -cores).",
}

// netnsPrefix names the namespaces the benchmark makes: netnsPrefix<pid>.
const netnsPrefix = "stabilize-bench-"

// maxSources is how many client source addresses the largest load needs.
const maxSources = (maxFlows + flowsPerSource - 1) / flowsPerSource

// clientNet is the load generator's own network namespace and the veth
// pair between it and this process's namespace, on 10.255.<subnet>.0/24:
// .1 on the root side (the balancers and upstreams listen there), .2 and
// up (one per flowsPerSource flows) on the namespace side.
type clientNet struct {
	name       string // under /run/netns
	host, peer string // the root-side and the namespace-side veth
	subnet     byte
	nsFD       int // the namespace, for setns
	closeOnce  sync.Once
	closeErr   error
}

// activeClientNet is the namespace to remove on any exit (see main).
var (
	activeMu        sync.Mutex
	activeClientNet *clientNet
)

// newClientNet makes the namespace and the veth pair, and steers each
// side's receive work by cores: split: the namespace side to loadCPU, the
// root side to balancerCPU; one: both to loadCPU; shared: no steering.
func newClientNet(ctx context.Context, cores string) (*clientNet, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("-clients netns: needs root (it makes a network namespace and a veth pair)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("-clients netns: needs iproute2's ip: %w", err)
	}
	removeStaleNetns(ctx)
	subnet, err := freeSubnet()
	if err != nil {
		return nil, err
	}
	pid := strconv.Itoa(os.Getpid())
	c := &clientNet{name: netnsPrefix + pid, host: "sbh" + pid, peer: "sbc" + pid, subnet: subnet, nsFD: -1}
	activeMu.Lock()
	activeClientNet = c
	activeMu.Unlock()
	if err := c.setUp(ctx, cores); err != nil {
		return nil, errors.Join(fmt.Errorf("-clients netns: %w", err), c.close())
	}
	return c, nil
}

func (c *clientNet) setUp(ctx context.Context, cores string) error {
	host := c.hostIP().String() + "/24"
	cmds := [][]string{
		{"netns", "add", c.name},
		{"link", "add", c.host, "type", "veth", "peer", "name", c.peer, "netns", c.name},
		{"addr", "add", host, "dev", c.host},
		{"link", "set", c.host, "up"},
		{"-n", c.name, "link", "set", "lo", "up"},
		{"-n", c.name, "link", "set", c.peer, "up"},
	}
	for j := range maxSources {
		cmds = append(cmds, []string{"-n", c.name, "addr", "add", c.source(j*flowsPerSource).String() + "/24", "dev", c.peer})
	}
	for _, args := range cmds {
		if err := ipCmd(ctx, args...); err != nil {
			return err
		}
	}
	fd, err := unix.Open("/run/netns/"+c.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening the namespace: %w", err)
	}
	c.nsFD = fd
	peerCPU, hostCPU := -1, -1
	switch cores {
	case coresSplit:
		peerCPU, hostCPU = loadCPU, balancerCPU
	case coresOne:
		peerCPU, hostCPU = loadCPU, loadCPU
	}
	if hostCPU >= 0 {
		qs, _ := filepath.Glob("/sys/class/net/" + c.host + "/queues/rx-*/rps_cpus")
		if len(qs) == 0 {
			return fmt.Errorf("no rx queue of %s in /sys/class/net", c.host)
		}
		for _, q := range qs {
			if err := os.WriteFile(q, []byte(cpuMask(hostCPU)), 0o644); err != nil {
				return fmt.Errorf("receive packet steering: %w", err)
			}
		}
	}
	if peerCPU >= 0 {
		// /sys shows the devices of the namespace that mounted it: write
		// the namespace side's from within it.
		script := fmt.Sprintf(`n=0; for q in /sys/class/net/%s/queues/rx-*/rps_cpus; do echo %s > "$q" || exit 1; n=1; done; [ $n = 1 ]`, c.peer, cpuMask(peerCPU))
		if err := ipCmd(ctx, "netns", "exec", c.name, "sh", "-c", script); err != nil {
			return fmt.Errorf("receive packet steering in the namespace: %w", err)
		}
	}
	return nil
}

// cpuMask is the hexadecimal CPU mask of cpu, as rps_cpus reads it.
func cpuMask(cpu int) string { return strconv.FormatUint(1<<cpu, 16) }

// ipCmd runs ip with args, bounded in time.
func ipCmd(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// hostIP is the root side's address: the balancers and upstreams listen there.
func (c *clientNet) hostIP() net.IP { return net.IPv4(10, 255, c.subnet, 1).To4() }

// source is the client address of flow i, in the namespace.
func (c *clientNet) source(i int) net.IP {
	return net.IPv4(10, 255, c.subnet, byte(2+i/flowsPerSource)).To4()
}

// inNamespace runs f on a thread inside the namespace: the sockets it makes
// stay there.
func (c *clientNet) inNamespace(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("this thread's network namespace: %w", err)
			return
		}
		defer unix.Close(self)
		if err := unix.Setns(c.nsFD, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering namespace %s: %w", c.name, err)
			return
		}
		ferr := f()
		if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
			// The thread stays locked, so it ends with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("leaving namespace %s: %w", c.name, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// close removes the veth pair and the namespace.
func (c *clientNet) close() error {
	c.closeOnce.Do(func() {
		if c.nsFD >= 0 {
			_ = unix.Close(c.nsFD)
		}
		ctx := context.Background()
		// Deleting a veth deletes its peer at once; the namespace's own
		// teardown is asynchronous.
		var errs []error
		if _, err := net.InterfaceByName(c.host); err == nil {
			errs = append(errs, ipCmd(ctx, "link", "del", c.host))
		}
		if _, err := os.Stat("/run/netns/" + c.name); err == nil {
			errs = append(errs, ipCmd(ctx, "netns", "del", c.name))
		}
		c.closeErr = errors.Join(errs...)
		activeMu.Lock()
		if activeClientNet == c {
			activeClientNet = nil
		}
		activeMu.Unlock()
	})
	return c.closeErr
}

// removeClientNet removes the namespace of this process, if any.
func removeClientNet() {
	activeMu.Lock()
	c := activeClientNet
	activeMu.Unlock()
	if c != nil {
		_ = c.close()
	}
}

// removeStaleNetns removes the namespaces and veths left by benchmarks that
// died without removing them (SIGKILL).
func removeStaleNetns(ctx context.Context) {
	names, _ := filepath.Glob("/run/netns/" + netnsPrefix + "*")
	for _, n := range names {
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(n), netnsPrefix))
		if err != nil || pid == os.Getpid() || unix.Kill(pid, 0) != unix.ESRCH {
			continue
		}
		if _, err := net.InterfaceByName("sbh" + strconv.Itoa(pid)); err == nil {
			_ = ipCmd(ctx, "link", "del", "sbh"+strconv.Itoa(pid))
		}
		_ = ipCmd(ctx, "netns", "del", filepath.Base(n))
	}
}

// freeSubnet is a 10.255.x.0/24 that no address of this namespace is in
// and no route but the default reaches (a route of 10.0.0.0/8 or within
// the /24 would lose the part the veth's /24 takes).
func freeSubnet() (byte, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return 0, fmt.Errorf("-clients netns: %w", err)
	}
	routes, err := ipv4Routes()
	if err != nil {
		return 0, fmt.Errorf("-clients netns: the routes: %w", err)
	}
	used := map[byte]bool{}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip := n.IP.To4(); ip != nil && ip[0] == 10 && ip[1] == 255 {
				used[ip[2]] = true
			}
		}
	}
	for s := range 256 {
		sub := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 255, byte(s), 0}), 24)
		for _, r := range routes {
			if r.Bits() > 0 && r.Overlaps(sub) {
				used[byte(s)] = true
			}
		}
	}
	for s := range 256 {
		if !used[byte(s)] {
			return byte(s), nil
		}
	}
	return 0, errors.New("-clients netns: every 10.255.x.0/24 is in use or routed")
}

// ipv4Routes is the destination of every IPv4 route of this namespace, in
// every table.
func ipv4Routes() ([]netip.Prefix, error) {
	rib, err := syscall.NetlinkRIB(syscall.RTM_GETROUTE, syscall.AF_INET)
	if err != nil {
		return nil, err
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWROUTE || len(m.Data) < syscall.SizeofRtMsg {
			continue
		}
		bits := int(m.Data[1]) // rtmsg.rtm_dst_len
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, err
		}
		dst := netip.IPv4Unspecified()
		for _, a := range attrs {
			if a.Attr.Type == syscall.RTA_DST && len(a.Value) == 4 {
				dst = netip.AddrFrom4([4]byte(a.Value))
			}
		}
		if p, err := dst.Prefix(bits); err == nil {
			out = append(out, p)
		}
	}
	return out, nil
}
