//go:build linux

package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
)

// TestClientsNetns runs a load from a namespace of its own (-clients netns)
// against an echo server on the root side of the veth pair: every request
// is answered, from each of the namespace's client addresses, and the
// namespace and the veth pair are gone afterwards.
func TestClientsNetns(t *testing.T) {
	ctx, c := testClientNet(t, coresSplit)
	if _, err := os.Stat("/run/netns/" + c.name); err != nil {
		t.Fatalf("namespace: %v", err)
	}
	srv, err := udpecho.Start(c.hostIP().String() + ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	bigBuffers(t, srv)

	// Every client address answers from within the namespace.
	for j := range maxSources {
		lc := loadConfig{flows: 1, clients: c}
		src := lc.source(j * flowsPerSource)
		if got, want := net.IP(src.Addr[:]).String(), c.source(j*flowsPerSource).String(); got != want {
			t.Errorf("flow %d: source %s, want %s", j*flowsPerSource, got, want)
		}
	}
	err = c.inNamespace(func() error {
		for j := range maxSources {
			conn, err := net.DialUDP("udp4", &net.UDPAddr{IP: c.source(j * flowsPerSource)}, srv.Addr())
			if err != nil {
				return err
			}
			defer conn.Close()
			if _, err := conn.Write([]byte("ping")); err != nil {
				return err
			}
			_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := conn.Read(make([]byte, 256)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("a client address in the namespace: %v", err)
	}

	lc := loadConfig{
		flows: 300, window: 1, payload: 64, warmup: 100 * time.Millisecond, duration: 400 * time.Millisecond,
		timeout: time.Second, ramp: 50 * time.Millisecond, clients: c,
	}
	res, err := runLoad(ctx, srv.Addr().String(), lc, loadHooks{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Received == 0 || res.Received+res.Lost != res.Sent || res.Busy != lc.flows {
		t.Errorf("sent %d, received %d, lost %d, busy flows %d of %d", res.Sent, res.Received, res.Lost, res.Busy, lc.flows)
	}
	if _, err := runLoad(ctx, "127.0.0.1:9", lc, loadHooks{}); err == nil {
		t.Error("a target other than the namespace's peer was accepted")
	}

	if err := c.close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/run/netns/" + c.name); !os.IsNotExist(err) {
		t.Errorf("namespace %s still there: %v", c.name, err)
	}
	if _, err := net.InterfaceByName(c.host); err == nil {
		t.Errorf("veth %s still there", c.host)
	}
}

// TestFreeSubnetAvoidsRoutes: the client namespace's subnet is none that a
// route of the host reaches, so that its veth takes no traffic of the
// host's other networks (here: a route of 10.255.0.0/17 in a namespace).
func TestFreeSubnetAvoidsRoutes(t *testing.T) {
	ctx, c := testClientNet(t, coresShared)
	if err := ipCmd(ctx, "-n", c.name, "route", "add", "10.255.0.0/17", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	var got byte
	if err := c.inNamespace(func() (err error) { got, err = freeSubnet(); return err }); err != nil {
		t.Fatal(err)
	}
	if got < 128 || got == c.subnet {
		t.Errorf("subnet 10.255.%d.0/24, routed in the namespace", got)
	}
}

// testClientNet makes a client namespace placed for cores, closed when the
// test ends, and a context bounding the test; it skips without root or ip.
func testClientNet(t *testing.T, cores string) (context.Context, *clientNet) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	c, err := newClientNet(ctx, cores)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.close() })
	return ctx, c
}
