//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// balancer is a running balancer process (Caddy or nginx).
type balancer struct {
	cmd     *exec.Cmd
	addr    string
	port    int
	admin   string // Caddy's admin API (host:port), or "" for none
	logPath string
	done    chan struct{}
	pids    []int // the process and its children (nginx workers)
}

// startAttempts is how often start tries: a port found free can be taken by
// another process before the balancer binds it.
const startAttempts = 3

// start starts a fresh balancer for target t on a free port and waits until
// it answers; on a port taken meanwhile, it tries again on another.
func (e *benchEnv) start(ctx context.Context, t string) (*balancer, error) {
	var b *balancer
	var err error
	for range startAttempts {
		if b, err = e.startOnce(ctx, t); err == nil || !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	return b, err
}

// startOnce starts a fresh balancer for target t on a port that was free a
// moment ago, and waits until it answers.
func (e *benchEnv) startOnce(ctx context.Context, t string) (*balancer, error) {
	port, err := freeUDPPort()
	if err != nil {
		return nil, fmt.Errorf("free port: %w", err)
	}
	listen := net.JoinHostPort(e.host(), strconv.Itoa(port))
	dir, err := os.MkdirTemp(e.tmp, t+"-")
	if err != nil {
		return nil, err
	}
	var cmd *exec.Cmd
	var admin string
	switch t {
	case "nginx":
		conf := nginxConfig(dir, listen, e.upstreamAddrs(), e.opts.nginxWorkers, e.nginx.module)
		confPath := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		cmd = exec.Command(e.nginx.path, "-p", dir, "-c", confPath, "-e", filepath.Join(dir, "error.log"))
	default:
		if e.opts.mode == "sweep" {
			if admin, err = freeTCPAddr(); err != nil {
				return nil, fmt.Errorf("free admin port: %w", err)
			}
		}
		cfg, err := caddyConfigAdmin(listenNetwork(t), listen, admin, handlerFor(baseTarget(t), e.upstreamAddrs()))
		if err != nil {
			return nil, fmt.Errorf("caddy config for %s: %w", t, err)
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
	b, err := launch(cmd, listen, port, dir, balancerCPUFor(e.opts.cores))
	if err != nil {
		return nil, err
	}
	if err := b.waitReady(ctx, 15*time.Second); err != nil {
		b.stop()
		return nil, err
	}
	b.pids = processTree(cmd.Process.Pid)
	b.admin = admin
	return b, nil
}

// launch starts cmd as the balancer listening on listen, with its output in
// dir, on CPU cpu (any if cpu < 0).
func launch(cmd *exec.Cmd, listen string, port int, dir string, cpu int) (*balancer, error) {
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
	if err := startChild(cmd, cpu); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	go func() {
		_ = cmd.Wait()
		forgetChild(cmd)
		close(b.done)
	}()
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

// freeUDPPort returns a UDP port on 127.0.0.1 that was free a moment ago.
func freeUDPPort() (int, error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port, nil
}

// freeTCPAddr returns a 127.0.0.1 address with a TCP port that was free a
// moment ago.
func freeTCPAddr() (string, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// children are the running child processes, killed on any exit.
var (
	childMu  sync.Mutex
	children = map[*exec.Cmd]struct{}{}
)

// startChild starts cmd on CPU cpu (any if cpu < 0) and remembers it.
func startChild(cmd *exec.Cmd, cpu int) error {
	childMu.Lock()
	defer childMu.Unlock()
	if err := startOn(cmd, cpu); err != nil {
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
