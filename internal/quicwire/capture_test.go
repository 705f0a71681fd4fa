package quicwire

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// TestParseQuicGoInitial parses the first datagram a real quic-go client
// sends: a v1 or v2 Initial.
func TestParseQuicGoInitial(t *testing.T) {
	for _, tc := range []struct {
		version quic.Version
		want    uint32
	}{
		{quic.Version1, Version1},
		{quic.Version2, Version2},
	} {
		t.Run(tc.version.String(), func(t *testing.T) {
			b := captureInitial(t, tc.version)
			h, err := Parse(b, 0)
			if err != nil {
				t.Fatal(err)
			}
			typ, err := h.Type()
			if err != nil || typ != PacketTypeInitial || h.Version != tc.want {
				t.Fatalf("got %v, %v, version %#x; want Initial, version %#x", typ, err, h.Version, tc.want)
			}
			// RFC 9000 section 7.2: a client's first DCID has 8 or more
			// octets; quic-go sends no SCID length above 20 either.
			if len(h.DCID) < 8 || len(h.DCID) > MaxConnIDLenV1 || len(h.SCID) > MaxConnIDLenV1 {
				t.Errorf("DCID %x, SCID %x", h.DCID, h.SCID)
			}
			if len(b) < 1200 {
				t.Errorf("Initial datagram of %d octets, want at least 1200", len(b))
			}
		})
	}
}

// captureInitial dials a UDP socket that never answers with a quic-go
// client of version v, and returns the first datagram it receives.
func captureInitial(t *testing.T, v quic.Version) []byte {
	t.Helper()
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"quicwire-test"}}
		_, _ = quic.DialAddr(ctx, ln.LocalAddr().String(), tlsConf, &quic.Config{Versions: []quic.Version{v}})
	}()
	defer func() { cancel(); <-done }()
	if err := ln.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	n, _, err := ln.ReadFromUDP(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}
