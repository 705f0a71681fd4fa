//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
)

// numUpstreams is the number of echo upstreams behind every balancer.
const numUpstreams = 3

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
	// clients is the load generator's namespace (-clients netns), or nil.
	clients *clientNet
	// why RLIMIT_NOFILE could not be raised for the largest load, or ""
	fileLimitErr string
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
		s, err := udpecho.Start(e.host() + ":0")
		if err != nil {
			return fmt.Errorf("upstream: %w", err)
		}
		e.upstreams = append(e.upstreams, s)
		rc, err := s.SyscallConn()
		if err != nil {
			return fmt.Errorf("upstream socket: %w", err)
		}
		if e.upBuf, err = setSockBuf(rc, sockBuf); err != nil {
			return fmt.Errorf("upstream socket buffers: %w", err)
		}
	}
	return nil
}

// host is the address the balancers and upstreams listen on: 127.0.0.1, or
// with -clients netns the root side of the veth pair (a local address:
// the balancer's traffic to the upstreams still goes over loopback).
func (e *benchEnv) host() string {
	if e.clients != nil {
		return e.clients.hostIP().String()
	}
	return "127.0.0.1"
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

// raiseFileLimit lifts RLIMIT_NOFILE to what want flows need (see
// fileLimitFor), or at least to its hard limit: the sweep opens one socket
// per flow here and the balancer (which inherits the limit) opens one or
// more per flow too. It returns why the limit could not be raised further,
// or "".
func raiseFileLimit(want int) string {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err.Error()
	}
	need := uint64(fileLimitFor(want))
	why := ""
	if lim.Max < need {
		// Raising the hard limit needs CAP_SYS_RESOURCE.
		up := syscall.Rlimit{Cur: need, Max: need}
		err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up)
		if err == nil {
			return ""
		}
		why = fmt.Sprintf("raising the hard limit to %d: %v", need, err)
	}
	if lim.Cur < min(need, lim.Max) {
		lim.Cur = min(need, lim.Max)
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	return why
}

// fileLimitFor is the RLIMIT_NOFILE that a load of flows needs, in the
// load generator (a socket per flow) and in the balancer (a socket per
// flow, within stabilize's default max_flows, three quarters of the limit).
func fileLimitFor(flows int) int { return flows*4/3 + 1024 }

// fileLimitShortfall says why flows cannot run under the current
// RLIMIT_NOFILE, or "" when they can.
func (e *benchEnv) fileLimitShortfall(flows int) string {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return ""
	}
	need := fileLimitFor(flows)
	if uint64(need) <= lim.Cur {
		return ""
	}
	why := fmt.Sprintf("not run: %d flows need RLIMIT_NOFILE ≥ %d (a socket per flow in the load generator; in the balancer a socket per flow, within stabilize's default max_flows of three quarters of the limit), but it is %d (hard %d)",
		flows, need, lim.Cur, lim.Max)
	if e.fileLimitErr != "" {
		why += "; " + e.fileLimitErr
	}
	return why
}

// moduleRoot finds the caddy-stabilize module root: -root, or the module of
// the current directory.
func moduleRoot(ctx context.Context, flagRoot string) (string, error) {
	root := flagRoot
	if root == "" {
		out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
		if err != nil {
			return "", fmt.Errorf("go env GOMOD: %w (or pass -root)", err)
		}
		gomod := strings.TrimSpace(string(out))
		if gomod == "" || gomod == os.DevNull {
			return "", fmt.Errorf("not inside a Go module: run from the caddy-stabilize repository or pass -root")
		}
		root = filepath.Dir(gomod)
	}
	b, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		return "", fmt.Errorf("-root %q: %w", root, err)
	}
	if !strings.Contains(string(b), "module github.com/stabilize-lb/caddy-stabilize") {
		return "", fmt.Errorf("-root %q is not the caddy-stabilize module", root)
	}
	return root, nil
}

// goVersion is the toolchain that builds Caddy, or this binary's runtime.
func goVersion(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, "go", "version").Output()
	if err != nil {
		return runtime.Version()
	}
	return strings.TrimSpace(string(out))
}
