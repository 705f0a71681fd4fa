package udpecho

import (
	"bytes"
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

// start starts a server on a free loopback port and closes it at the end of
// the test.
func start(t *testing.T) *Server {
	t.Helper()
	s, err := Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// dial returns a socket connected to s.
func dial(t *testing.T, s *Server) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip sends req on c and returns the reply, or an error after wait.
func roundTrip(c *net.UDPConn, req []byte, wait time.Duration) ([]byte, error) {
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, MaxDatagram)
	n, err := c.Read(buf)
	return buf[:n], err
}

func TestEchoWithIdentity(t *testing.T) {
	s := start(t)
	c := dial(t, s)
	for _, req := range [][]byte{[]byte("PING"), {}, bytes.Repeat([]byte("x|"), 4000)} {
		reply, err := roundTrip(c, req, 2*time.Second)
		if err != nil {
			t.Fatalf("request of %d bytes: %v", len(req), err)
		}
		id, payload, ok := Split(reply)
		if !ok || string(id) != s.Name() || !bytes.Equal(payload, req) {
			t.Fatalf("reply of %d bytes to %d bytes: Split = %q, %d bytes, %t; want %q and the request",
				len(reply), len(req), id, len(payload), ok, s.Name())
		}
	}
	if s.Name() != s.Addr().String() {
		t.Errorf("Name() = %q, want %q", s.Name(), s.Addr())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s.Received() != 3 || s.Replied() != 3 {
		t.Errorf("Received, Replied = %d, %d; want 3, 3", s.Received(), s.Replied())
	}
}

func TestLargestReply(t *testing.T) {
	s := start(t)
	c := dial(t, s)
	const maxIPv4Payload = 65507
	req := bytes.Repeat([]byte{'z'}, maxIPv4Payload-len(s.Name())-1)
	reply, err := roundTrip(c, req, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, payload, _ := Split(reply); !bytes.Equal(payload, req) {
		t.Fatalf("echo of %d bytes came back as %d bytes", len(req), len(payload))
	}

	// One byte more and the reply cannot be sent: counted, not answered.
	if _, err := roundTrip(c, append(req, 'z'), 200*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("oversized reply: err = %v, want a timeout", err)
	}
	if s.Received() != 2 || s.Replied() != 1 {
		t.Errorf("Received, Replied = %d, %d; want 2, 1", s.Received(), s.Replied())
	}
}

func TestSilent(t *testing.T) {
	s := start(t)
	c := dial(t, s)
	s.SetSilent(true)
	if _, err := roundTrip(c, []byte("hello?"), 200*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("silent server: err = %v, want a timeout", err)
	}
	s.SetSilent(false)
	if reply, err := roundTrip(c, []byte("hello"), 2*time.Second); err != nil || !bytes.HasSuffix(reply, []byte("|hello")) {
		t.Fatalf("after SetSilent(false): reply %q, err %v", reply, err)
	}
	if s.Received() != 2 || s.Replied() != 1 {
		t.Errorf("Received, Replied = %d, %d; want 2, 1", s.Received(), s.Replied())
	}
}

func TestRestartOnSameAddress(t *testing.T) {
	s := start(t)
	c := dial(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err == nil {
		t.Error("second Close returned no error")
	}
	if _, err := roundTrip(c, []byte("anyone?"), 200*time.Millisecond); err == nil {
		t.Fatal("closed server replied")
	}

	s2, err := Start(s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	reply, err := roundTrip(c, []byte("back"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if want := s.Name() + "|back"; string(reply) != want {
		t.Fatalf("reply %q, want %q", reply, want)
	}
}

func TestSplit(t *testing.T) {
	for _, tc := range []struct {
		reply, id, payload string
		ok                 bool
	}{
		{"127.0.0.1:6001|PING", "127.0.0.1:6001", "PING", true},
		{"[::1]:6001|a|b", "[::1]:6001", "a|b", true},
		{"127.0.0.1:6001|", "127.0.0.1:6001", "", true},
		{"no separator", "no separator", "", false},
	} {
		id, payload, ok := Split([]byte(tc.reply))
		if string(id) != tc.id || string(payload) != tc.payload || ok != tc.ok {
			t.Errorf("Split(%q) = %q, %q, %t; want %q, %q, %t", tc.reply, id, payload, ok, tc.id, tc.payload, tc.ok)
		}
	}
}

func TestSyscallConn(t *testing.T) {
	s := start(t)
	rc, err := s.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Control(func(fd uintptr) {}); err != nil {
		t.Fatal(err)
	}
}
