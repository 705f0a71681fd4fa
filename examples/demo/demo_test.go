package main

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDemo runs the demo on the example Caddyfile with its ports moved to free
// ones: the example's 5000, 6001-6003 and 2019 may be in use on the machine,
// or by another package's test, since go test runs packages in parallel. The
// test rewrites the Caddyfile text, not the JSON, so that run gets the config
// the way a user's -config does, and the demo needs no port options.
func TestDemo(t *testing.T) {
	example, err := os.ReadFile("../Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	text := string(example)
	udp := freePorts(t, "udp", 4)
	admin := "127.0.0.1:" + strconv.Itoa(freePorts(t, "tcp", 1)[0])
	move := map[string]string{
		"udp/:5000":          "udp/127.0.0.1:" + strconv.Itoa(udp[0]),
		"udp/127.0.0.1:6001": "udp/127.0.0.1:" + strconv.Itoa(udp[1]),
		"udp/127.0.0.1:6002": "udp/127.0.0.1:" + strconv.Itoa(udp[2]),
		"udp/127.0.0.1:6003": "udp/127.0.0.1:" + strconv.Itoa(udp[3]),
		"\n{\n":              "\n{\n\tadmin " + admin + "\n",
	}
	for old, new := range move {
		if strings.Count(text, old) != 1 {
			t.Fatalf("examples/Caddyfile has %q %d times, want once; update this test", old, strings.Count(text, old))
		}
		text = strings.Replace(text, old, new, 1)
	}
	config := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(config, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out strings.Builder
	err = run(ctx, options{config: config, out: &out})
	t.Logf("output:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"OK: all 9 replies arrived", // twice, see below
		"admin API on " + admin,
		`"dial":"udp/127.0.0.1:` + strconv.Itoa(udp[1]) + `"`,
		"All checks passed.",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if n := strings.Count(out.String(), "OK: all 9 replies arrived"); n != 2 {
		t.Errorf("%d phases OK, want 2", n)
	}

	// run stops Caddy and the upstreams: their ports are free again.
	for _, p := range udp {
		c, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Errorf("port %d/udp still in use after run: %v", p, err)
			continue
		}
		c.Close()
	}
}

// TestDemoNoCaddyfile checks that a demo run from the wrong directory says
// what to do.
func TestDemoNoCaddyfile(t *testing.T) {
	err := run(context.Background(), options{config: filepath.Join(t.TempDir(), "Caddyfile")})
	if err == nil || !strings.Contains(err.Error(), "repository root") {
		t.Fatalf("run = %v, want an error telling to run from the repository root", err)
	}
}

// freePorts returns n distinct ports on 127.0.0.1 that were free a moment ago.
func freePorts(t *testing.T, network string, n int) []int {
	t.Helper()
	var ports []int
	for range n {
		var l io.Closer
		var port int
		if network == "udp" {
			c, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			l, port = c, c.LocalAddr().(*net.UDPAddr).Port
		} else {
			c, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			l, port = c, c.Addr().(*net.TCPAddr).Port
		}
		defer l.Close() // hold each until all are picked, so they differ
		ports = append(ports, port)
	}
	return ports
}

// TestDemoQUIC runs the QUIC demo on free ports.
func TestDemoQUIC(t *testing.T) {
	udp := freePorts(t, "udp", 4)
	o := options{out: new(strings.Builder), quic: true, quicListen: "127.0.0.1:" + strconv.Itoa(udp[0])}
	for _, p := range udp[1:] {
		o.quicUpstreams = append(o.quicUpstreams, "127.0.0.1:"+strconv.Itoa(p))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := run(ctx, o)
	out := o.out.(*strings.Builder).String()
	t.Logf("output:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range o.quicUpstreams {
		if !strings.Contains(out, addr+"=3") {
			t.Errorf("output lacks %s=3", addr)
		}
	}
}
