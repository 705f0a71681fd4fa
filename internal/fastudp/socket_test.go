package fastudp

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

// passingEndpoint passes every datagram on to caddy-l4, as an endpoint
// that waits for a new owner does.
type passingEndpoint struct {
	s      *Socket
	client netip.AddrPort
	got    chan struct{}
}

func (e *passingEndpoint) Deliver(d Datagram, _ int64) {
	e.s.PassOn(e.client, e, d)
	e.got <- struct{}{}
}
func (e *passingEndpoint) Expired(int64) bool { return false }
func (e *passingEndpoint) Close()             { e.s.Unregister(e.client, e) }

// TestSocketPassOn: an endpoint that passes a datagram on is unregistered,
// and the datagram, with the client's later ones, reaches the front in
// order, from the client's address.
func TestSocketPassOn(t *testing.T) {
	f, err := Listen("127.0.0.1:0", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := net.DialUDP("udp", nil, f.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	client := c.LocalAddr().(*net.UDPAddr).AddrPort()
	ep := &passingEndpoint{s: f.Socket(), client: client, got: make(chan struct{}, 1)}
	f.Socket().Register(client, ep)
	if _, err := c.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ep.got:
	case <-time.After(5 * time.Second):
		t.Fatal("the endpoint got no datagram")
	}
	if n := f.Socket().Endpoints(); n != 0 {
		t.Fatalf("%d endpoints registered after PassOn", n)
	}
	if _, err := c.Write([]byte("second")); err != nil {
		t.Fatal(err)
	}
	type read struct {
		data string
		from net.Addr
		err  error
	}
	reads := make(chan read, 2)
	go func() { // the front has no read deadline; f.Close ends the read
		buf := make([]byte, 64)
		for range 2 {
			n, from, err := f.ReadFrom(buf)
			reads <- read{string(buf[:n]), from, err}
			if err != nil {
				return
			}
		}
	}()
	for _, want := range []string{"first", "second"} {
		var r read
		select {
		case r = <-reads:
		case <-time.After(5 * time.Second):
			t.Fatalf("the front read no %q within 5 s", want)
		}
		if r.err != nil {
			t.Fatal(r.err)
		}
		if r.data != want || r.from.(*net.UDPAddr).AddrPort() != client {
			t.Fatalf("the front read %q from %v, want %q from %v", r.data, r.from, want, client)
		}
	}
}
