package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
)

// The targets, in report order, and what they are.
var targetOrder = []string{"direct", "packet", "flow", "fastpacket", "fastflow", "proxy", "nginx", "ceiling", "fastflow1", "proxy1"}

var targetLabels = map[string]string{
	"direct": "direct (floor)",
	"packet": "stabilize per packet",
	"flow":   "stabilize per flow",
	// The same handlers behind stabilize's own listener network, fastudp
	// (batched reads; established flows bypass caddy-l4's dispatch).
	"fastpacket": "stabilize per packet, fastudp",
	"fastflow":   "stabilize per flow, fastudp",
	"proxy":      "caddy-l4 proxy",
	"nginx":      "nginx stream",
	"ceiling":    "caddy-l4 echo (ceiling)",
	// A target name ending in "1" is the target without it, with
	// GOMAXPROCS=1 in the balancer's environment (see gomaxprocsOne).
	"fastflow1": "stabilize per flow, fastudp, GOMAXPROCS=1",
	"proxy1":    "caddy-l4 proxy, GOMAXPROCS=1",
}

// gomaxprocsOne reports whether target t runs its balancer with
// GOMAXPROCS=1 (only the balancer process: the benchmark keeps every core),
// and baseTarget is the target it is otherwise the same as.
func gomaxprocsOne(t string) bool { return strings.HasSuffix(t, "1") }

func baseTarget(t string) string { return strings.TrimSuffix(t, "1") }

// numUpstreams is the number of echo upstreams behind every balancer.
const numUpstreams = 3

// idleTimeout is the caddy-l4 server's idle timeout: longer than any
// measurement, so that no flow ends during one, nor before the sweep's idle
// memory reading (idleAfter).
const idleTimeout = 60 * time.Second

// idleAfter is how long after the load generator stops (every request
// answered or given up on) the sweep reads the balancer's idle RSS, with
// every flow still live (idleAfter < idleTimeout).
const idleAfter = 3 * time.Second

// sockBuf is the receive and send buffer size of the benchmark's own
// sockets (the echo upstreams and the load generator's flows), so that
// they do not drop what the balancer sends them; see setSockBuf.
const sockBuf = 4 << 20

// benchEnv is what every measurement shares: the upstreams, the binaries.
type benchEnv struct {
	tmp       string
	opts      *options
	root      string
	caddy     string
	goVersion string
	nginx     *nginxInfo
	nginxSkip string // why the nginx target is skipped, if it is
	targets   []string
	upstreams []*udpecho.Server
	upBuf     sockBufInfo // the upstreams' socket buffers
}

// prepare builds Caddy, looks for nginx and starts the upstreams.
func (e *benchEnv) prepare(ctx context.Context) error {
	o := e.opts
	e.goVersion = goVersion(ctx)
	for _, t := range o.targets {
		if t == "nginx" {
			info, err := detectNginx(ctx, o.nginxBin)
			if err != nil {
				e.nginxSkip = err.Error()
				fmt.Printf("nginx target skipped: %v\n", err)
				continue
			}
			e.nginx = info
		}
		e.targets = append(e.targets, t)
	}
	if len(e.targets) == 0 {
		return errors.New("no target left to measure")
	}
	if root, err := moduleRoot(ctx, o.root); err == nil {
		e.root = root
	} else if o.caddyBin == "" {
		return err
	}
	if o.caddyBin != "" {
		e.caddy = o.caddyBin
	} else {
		e.caddy = filepath.Join(e.tmp, "caddy")
		fmt.Printf("building %s/examples/caddy (the first build on a fresh machine takes a few minutes)…\n", e.root)
		started := time.Now()
		cmd := exec.CommandContext(ctx, "go", "build", "-o", e.caddy, "./examples/caddy")
		cmd.Dir = e.root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build ./examples/caddy: %w\n%s", err, out)
		}
		fmt.Printf("built in %s\n", time.Since(started).Round(100*time.Millisecond))
	}
	for range numUpstreams {
		s, err := udpecho.Start("127.0.0.1:0")
		if err != nil {
			return err
		}
		e.upstreams = append(e.upstreams, s)
		rc, err := s.SyscallConn()
		if err != nil {
			return err
		}
		if e.upBuf, err = setSockBuf(rc, sockBuf); err != nil {
			return fmt.Errorf("upstream socket buffers: %w", err)
		}
	}
	return nil
}

// sockBufInfo is what setSockBuf got: the receive and send buffer sizes the
// kernel reports (twice what was asked, for its bookkeeping), and whether
// the limits net.core.rmem_max/wmem_max were bypassed (SO_RCVBUFFORCE,
// root only).
type sockBufInfo struct {
	rcv, snd int
	forced   bool
}

func (i sockBufInfo) String() string {
	s := fmt.Sprintf("SO_RCVBUF %d KiB, SO_SNDBUF %d KiB", i.rcv>>10, i.snd>>10)
	if i.forced {
		s += " (forced)"
	}
	return s
}

// setSockBuf sets a socket's receive and send buffers to size: with
// SO_RCVBUFFORCE/SO_SNDBUFFORCE where allowed (as root), otherwise
// SO_RCVBUF/SO_SNDBUF, which the kernel caps at net.core.rmem_max/wmem_max.
func setSockBuf(rc syscall.RawConn, size int) (sockBufInfo, error) {
	var info sockBufInfo
	var serr error
	err := rc.Control(func(fd uintptr) {
		f := int(fd)
		info.forced = true
		if unix.SetsockoptInt(f, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size) != nil {
			info.forced = false
			if serr = unix.SetsockoptInt(f, unix.SOL_SOCKET, unix.SO_RCVBUF, size); serr != nil {
				return
			}
		}
		if unix.SetsockoptInt(f, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, size) != nil {
			info.forced = false
			if serr = unix.SetsockoptInt(f, unix.SOL_SOCKET, unix.SO_SNDBUF, size); serr != nil {
				return
			}
		}
		info.rcv, _ = unix.GetsockoptInt(f, unix.SOL_SOCKET, unix.SO_RCVBUF)
		info.snd, _ = unix.GetsockoptInt(f, unix.SOL_SOCKET, unix.SO_SNDBUF)
	})
	if err == nil {
		err = serr
	}
	return info, err
}

func (e *benchEnv) closeUpstreams() {
	for _, s := range e.upstreams {
		_ = s.Close()
	}
}

func (e *benchEnv) upstreamAddrs() []string {
	var out []string
	for _, s := range e.upstreams {
		out = append(out, s.Addr().String())
	}
	return out
}

// measure runs one measurement of target t with a fresh balancer process.
// Errors are recorded in the measurement, so that one failing target does
// not end the benchmark.
func (e *benchEnv) measure(ctx context.Context, t string, lc loadConfig, sweep bool) *measurement {
	m := &measurement{Target: t, Payload: lc.payload, Flows: lc.flows, Window: lc.window}
	m.setNaN()
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

	var cpu0, cpu1 float64
	var rssBase, rssLive int64
	if bal != nil && sweep {
		// Let the process settle after start-up before the baseline.
		time.Sleep(300 * time.Millisecond)
		rssBase = bal.rssKB("VmRSS")
	}
	var socks0, socks1 []udpSocket
	var balInodes map[uint64]bool
	hooks := loadHooks{
		start: func() {
			if bal != nil {
				cpu0 = bal.cpuSeconds()
			}
			socks0 = readUDPSockets()
		},
		end: func() {
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
	res, err := runLoad(ctx, addr, lc, hooks)
	if err != nil {
		m.Err = err.Error()
		if res == nil {
			return m
		}
	}
	m.fromLoad(res)
	var rssIdle int64
	if bal != nil && sweep && ctx.Err() == nil {
		// The load generator has stopped; the balancer's flows stay live
		// until its idle timeout (idleTimeout ≫ idleAfter).
		sleepUntil(ctx, time.Now().Add(idleAfter))
		rssIdle = bal.rssKB("VmRSS")
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
	if bal != nil {
		if !bal.alive() {
			m.Err = "balancer exited during the measurement: " + bal.logTail()
		}
		m.CPUSeconds = cpu1 - cpu0
		if m.Received > 0 {
			m.CPUPerDgramUS = m.CPUSeconds / float64(m.Received) * 1e6
		}
		m.PeakRSSKB = bal.rssKB("VmHWM")
		if sweep {
			m.RSSBaseKB, m.RSSLiveKB, m.RSSIdleKB = rssBase, rssLive, rssIdle
			m.MemPerFlowB = float64(rssLive-rssBase) * 1024 / float64(lc.flows)
			if rssIdle > 0 {
				m.MemPerIdleFlowB = float64(rssIdle-rssBase) * 1024 / float64(lc.flows)
			}
		}
	}
	return m
}

// balancer is a running balancer process (Caddy or nginx).
type balancer struct {
	cmd     *exec.Cmd
	addr    string
	port    int
	logPath string
	done    chan struct{}
	pids    []int // the process and its children (nginx workers)
}

// start starts a fresh balancer for target t on a free port and waits until
// it answers.
func (e *benchEnv) start(ctx context.Context, t string) (*balancer, error) {
	port, err := freeUDPPort()
	if err != nil {
		return nil, err
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	dir, err := os.MkdirTemp(e.tmp, t+"-")
	if err != nil {
		return nil, err
	}
	var cmd *exec.Cmd
	switch t {
	case "nginx":
		conf := nginxConfig(dir, listen, e.upstreamAddrs(), e.opts.nginxWorkers, e.nginx.module)
		confPath := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		cmd = exec.Command(e.nginx.path, "-p", dir, "-c", confPath, "-e", filepath.Join(dir, "error.log"))
	default:
		cfg, err := caddyConfig(listenNetwork(t), listen, handlerFor(baseTarget(t), e.upstreamAddrs()))
		if err != nil {
			return nil, err
		}
		cfgPath := filepath.Join(dir, "caddy.json")
		if err := os.WriteFile(cfgPath, cfg, 0o644); err != nil {
			return nil, err
		}
		cmd = exec.Command(e.caddy, "run", "--config", cfgPath)
		// Keep Caddy's storage out of the user's home.
		cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
		if gomaxprocsOne(t) {
			// Caddy's automaxprocs leaves an explicit GOMAXPROCS alone.
			cmd.Env = append(cmd.Env, "GOMAXPROCS=1")
		}
	}
	b := &balancer{cmd: cmd, addr: listen, port: port, logPath: filepath.Join(dir, "output.log"), done: make(chan struct{})}
	logf, err := os.Create(b.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group, so that stop reaches nginx's workers too; and
	// killed by the kernel should this process die.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := startChild(cmd); err != nil {
		return nil, err
	}
	go func() {
		_ = cmd.Wait()
		forgetChild(cmd)
		close(b.done)
	}()
	if err := b.waitReady(ctx, 15*time.Second); err != nil {
		b.stop()
		return nil, err
	}
	b.pids = processTree(cmd.Process.Pid)
	return b, nil
}

// waitReady sends probes until one is answered.
func (b *balancer) waitReady(ctx context.Context, limit time.Duration) error {
	raddr, err := net.ResolveUDPAddr("udp4", b.addr)
	if err != nil {
		return err
	}
	c, err := net.DialUDP("udp4", nil, raddr)
	if err != nil {
		return err
	}
	defer c.Close()
	probe := make([]byte, 16)
	copy(probe, "probe")
	buf := make([]byte, 256)
	deadline := time.Now().Add(limit)
	for i := uint64(1); time.Now().Before(deadline); i++ {
		select {
		case <-b.done:
			return fmt.Errorf("balancer exited before answering: %s", b.logTail())
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		binary.LittleEndian.PutUint64(probe[8:], i)
		_, _ = c.Write(probe)
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && n >= seqLen {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("balancer did not answer within %v: %s", limit, b.logTail())
}

func (b *balancer) alive() bool {
	select {
	case <-b.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM to the process group, waits up to 5 s, then kills it.
func (b *balancer) stop() {
	pgid := b.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-b.done
	}
	// nginx workers may outlive the master by a moment.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}

// logTail is the end of the balancer's output, for error messages.
func (b *balancer) logTail() string {
	out, _ := os.ReadFile(b.logPath)
	out = bytes.TrimSpace(out)
	if len(out) > 1500 {
		out = out[len(out)-1500:]
	}
	if len(out) == 0 {
		return "(no output)"
	}
	return string(out)
}

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

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

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

// freeUDPPort returns a UDP port on 127.0.0.1 that was free a moment ago.
func freeUDPPort() (int, error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port, nil
}

// children are the running child processes, killed on any exit.
var (
	childMu  sync.Mutex
	children = map[*exec.Cmd]struct{}{}
)

func startChild(cmd *exec.Cmd) error {
	childMu.Lock()
	defer childMu.Unlock()
	if err := cmd.Start(); err != nil {
		return err
	}
	children[cmd] = struct{}{}
	return nil
}

func forgetChild(cmd *exec.Cmd) {
	childMu.Lock()
	delete(children, cmd)
	childMu.Unlock()
}

// killAllChildren kills every child's process group.
func killAllChildren() {
	childMu.Lock()
	defer childMu.Unlock()
	for cmd := range children {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
}

// handlerFor is the layer4 handler (JSON object) of a Caddy target.
func handlerFor(t string, upstreams []string) map[string]any {
	switch t {
	case "packet", "flow", "fastpacket", "fastflow":
		var ups []any
		for _, u := range upstreams {
			ups = append(ups, map[string]any{"dial": "udp/" + u})
		}
		return map[string]any{
			"handler":        "stabilize",
			"upstreams":      ups,
			"per":            strings.TrimPrefix(t, "fast"),
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		}
	case "proxy":
		var ups []any
		for _, u := range upstreams {
			ups = append(ups, map[string]any{"dial": []string{"udp/" + u}})
		}
		return map[string]any{
			"handler":        "proxy",
			"upstreams":      ups,
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		}
	case "ceiling":
		// caddy-l4's echo handler writes back what it reads: one reply per
		// datagram, with no upstream hop.
		return map[string]any{"handler": "echo"}
	}
	panic("no Caddy handler for target " + t)
}

// listenNetwork is the caddy-l4 listener network of target t (or of its
// base target).
func listenNetwork(t string) string {
	if strings.HasPrefix(t, "fast") {
		return "fastudp"
	}
	return "udp"
}

// caddyConfig is the JSON config of a Caddy with the admin API off, logging
// at ERROR and one layer4 server on network/listen (network udp or
// fastudp) that hands every flow to handler.
func caddyConfig(network, listen string, handler map[string]any) ([]byte, error) {
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{
			"layer4": map[string]any{
				"servers": map[string]any{
					"bench": map[string]any{
						"listen":       []string{network + "/" + listen},
						"idle_timeout": idleTimeout.String(),
						"routes":       []any{map[string]any{"handle": []any{handler}}},
					},
				},
			},
		},
	}
	return json.MarshalIndent(cfg, "", "\t")
}

// nginxInfo is an nginx binary with the stream module.
type nginxInfo struct {
	path    string
	version string
	module  string // the dynamic stream module to load, or "" when built in
}

var (
	nginxVersionRe = regexp.MustCompile(`nginx version: (\S+)`)
	streamRe       = regexp.MustCompile(`--with-stream(=dynamic)?(\s|$)`)
	modulesPathRe  = regexp.MustCompile(`--modules-path=(\S+)`)
	prefixRe       = regexp.MustCompile(`--prefix=(\S+)`)
)

// detectNginx finds bin and its stream module.
func detectNginx(ctx context.Context, bin string) (*nginxInfo, error) {
	if bin == "" || bin == "off" {
		return nil, errors.New("disabled by -nginx")
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("no nginx binary (Debian/Ubuntu: apt-get install -y nginx libnginx-mod-stream)")
	}
	out, _ := exec.CommandContext(ctx, path, "-V").CombinedOutput()
	info, err := parseNginxV(string(out), fileExists)
	if err != nil {
		return nil, err
	}
	info.path = path
	return info, nil
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// parseNginxV reads the output of `nginx -V`: the version and where the
// stream module is.
func parseNginxV(v string, exists func(string) bool) (*nginxInfo, error) {
	info := &nginxInfo{version: "nginx"}
	if m := nginxVersionRe.FindStringSubmatch(v); m != nil {
		info.version = m[1]
	}
	m := streamRe.FindStringSubmatch(v)
	if m == nil {
		return nil, fmt.Errorf("%s has no stream module (--with-stream)", info.version)
	}
	if m[1] == "" {
		return info, nil // built in
	}
	var dirs []string
	if p := modulesPathRe.FindStringSubmatch(v); p != nil {
		dirs = append(dirs, p[1])
	}
	if p := prefixRe.FindStringSubmatch(v); p != nil {
		dirs = append(dirs, filepath.Join(p[1], "modules"))
	}
	dirs = append(dirs, "/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/share/nginx/modules", "/usr/local/nginx/modules")
	for _, d := range dirs {
		if p := filepath.Join(d, "ngx_stream_module.so"); exists(p) {
			info.module = p
			return info, nil
		}
	}
	return nil, fmt.Errorf("%s has a dynamic stream module but ngx_stream_module.so is not installed (Debian/Ubuntu: apt-get install -y libnginx-mod-stream)", info.version)
}

// nginxConfig is a minimal nginx.conf: in the foreground, with its files
// in dir, one UDP stream server on listen that round-robins over upstreams
// and expects one reply per datagram.
func nginxConfig(dir, listen string, upstreams []string, workers, module string) string {
	var sb strings.Builder
	if module != "" {
		fmt.Fprintf(&sb, "load_module %s;\n", module)
	}
	fmt.Fprintf(&sb, "daemon off;\nmaster_process on;\nworker_processes %s;\n", workers)
	fmt.Fprintf(&sb, "pid %s;\nerror_log %s error;\n", filepath.Join(dir, "nginx.pid"), filepath.Join(dir, "error.log"))
	sb.WriteString("worker_rlimit_nofile 65536;\nevents {\n\tworker_connections 16384;\n}\n")
	sb.WriteString("stream {\n\tupstream bench {\n")
	for _, u := range upstreams {
		fmt.Fprintf(&sb, "\t\tserver %s;\n", u)
	}
	sb.WriteString("\t}\n\tserver {\n")
	fmt.Fprintf(&sb, "\t\tlisten %s udp reuseport;\n", listen)
	sb.WriteString("\t\tproxy_pass bench;\n\t\tproxy_responses 1;\n\t\tproxy_timeout 10s;\n\t}\n}\n")
	return sb.String()
}

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
	Throughput float64 `json:"throughput"` // replies/s
	LossPct    float64 `json:"loss_pct"`
	P50US      float64 `json:"p50_us"`
	P99US      float64 `json:"p99_us"`
	P999US     float64 `json:"p999_us"`
	// The balancer's (for nginx: master + workers) CPU time during the
	// window, and per answered request (request forwarded + reply relayed).
	CPUSeconds    float64 `json:"cpu_seconds"`
	CPUPerDgramUS float64 `json:"cpu_us_per_datagram"`
	PeakRSSKB     int64   `json:"peak_rss_kb"`
	// Sweep only: VmRSS before the load, at the end of the window with all
	// flows live and busy, and idleAfter after the load stopped with all
	// flows still live but idle.
	RSSBaseKB       int64   `json:"rss_base_kb,omitempty"`
	RSSLiveKB       int64   `json:"rss_live_kb,omitempty"`
	RSSIdleKB       int64   `json:"rss_idle_kb,omitempty"`
	MemPerFlowB     float64 `json:"mem_per_flow_bytes"`
	MemPerIdleFlowB float64 `json:"mem_per_idle_flow_bytes"`
	// Datagrams the kernel dropped during the window for a full receive
	// buffer, by socket role (see dropListener…).
	KernelDrops map[string]uint64 `json:"kernel_drops,omitempty"`
	Err         string            `json:"error,omitempty"`
}

// setNaN marks the derived numbers unknown until measured.
func (m *measurement) setNaN() {
	nan := math.NaN()
	m.Throughput, m.LossPct, m.P50US, m.P99US, m.P999US = nan, nan, nan, nan, nan
	m.CPUSeconds, m.CPUPerDgramUS, m.MemPerFlowB, m.MemPerIdleFlowB = nan, nan, nan, nan
}

func (m *measurement) fromLoad(r *loadResult) {
	m.Sent, m.Received, m.Lost, m.Late, m.Corrupt, m.SendErrors = r.Sent, r.Received, r.Lost, r.Late, r.Corrupt, r.SendErrors
	m.Seconds = r.Window.Seconds()
	m.Throughput = float64(r.Received) / m.Seconds
	if r.Sent > 0 {
		m.LossPct = float64(r.Lost) / float64(r.Sent) * 100
	}
	m.P50US = percentile(r.latencies, 50) / 1e3
	m.P99US = percentile(r.latencies, 99) / 1e3
	m.P999US = percentile(r.latencies, 99.9) / 1e3
}

func (m *measurement) oneLine() string {
	if m.Err != "" && m.Sent == 0 {
		return "ERROR: " + m.Err
	}
	s := fmt.Sprintf("%9.0f dgram/s  p50 %6.0fµs  p99 %7.0fµs  loss %5.2f%%", m.Throughput, m.P50US, m.P99US, m.LossPct)
	if !math.IsNaN(m.CPUPerDgramUS) {
		s += fmt.Sprintf("  cpu %5.1fµs/dgram  rss %5.1fMiB", m.CPUPerDgramUS, float64(m.PeakRSSKB)/1024)
	}
	if d := fmtDrops(m.KernelDrops); d != "" {
		s += "  drops " + d
	}
	if !math.IsNaN(m.MemPerFlowB) {
		s += fmt.Sprintf("  %6.0f B/flow", m.MemPerFlowB)
	}
	if !math.IsNaN(m.MemPerIdleFlowB) {
		s += fmt.Sprintf(" (idle %6.0f B/flow)", m.MemPerIdleFlowB)
	}
	if m.Err != "" {
		s += "  ERROR: " + m.Err
	}
	return s
}

// Where datagrams were dropped by the kernel for a full socket receive
// buffer, from the drops column of /proc/net/udp, by the role of the socket.
const (
	dropListener  = "listener"    // the balancer's client-facing socket
	dropBalUp     = "balancer_up" // the balancer's upstream-facing sockets
	dropUpstreams = "upstreams"   // the echo servers
	dropClients   = "clients"     // the load generator's sockets
)

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
		var sk udpSocket
		lp, err1 := hexPort(f[1])
		rp, err2 := hexPort(f[2])
		inode, err3 := strconv.ParseUint(f[9], 10, 64)
		drops, err4 := strconv.ParseUint(f[len(f)-1], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || err4 != nil {
			continue
		}
		sk.localPort, sk.remotePort, sk.inode, sk.drops = lp, rp, inode, drops
		out = append(out, sk)
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
