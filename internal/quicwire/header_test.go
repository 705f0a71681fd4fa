package quicwire

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

// Packets of RFC 9001 Appendix A (QUIC v1) and RFC 9369 Appendix A (QUIC v2),
// truncated after a few octets of payload unless noted.
const (
	rfc9001ClientInitial = "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11"
	rfc9001ServerInitial = "cf000000010008f067a5502a4262b5004075c0d95a482cd0991cd25b0aac406a"
	rfc9001Retry         = "ff000000010008f067a5502a4262b5746f6b656e04a265ba2eff4d829058fb3f0f2496ba" // whole
	rfc9001ChaChaShort   = "4cfe4189655e5cd55c41f69080575d7999c25a5bfb"                               // whole, empty DCID
	rfc9369ClientInitial = "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485"
	rfc9369ServerInitial = "dc6b3343cf0008f067a5502a4262b5004075d92faaf16f05d8a4398c47089698"
	rfc9369Retry         = "cf6b3343cf0008f067a5502a4262b5746f6b656ec8646ce8bfe33952d955543665dcc7b6" // whole
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name     string
		packet   string
		shortLen int
		long     bool
		version  uint32
		dcid     string
		scid     string
		rest     string // prefix of Rest
		typ      PacketType
		typeErr  error
	}{
		{"v1 client Initial", rfc9001ClientInitial, 0, true, Version1, "8394c8f03e515708", "", "00449e", PacketTypeInitial, nil},
		{"v1 server Initial", rfc9001ServerInitial, 0, true, Version1, "", "f067a5502a4262b5", "004075", PacketTypeInitial, nil},
		{"v1 Retry", rfc9001Retry, 0, true, Version1, "", "f067a5502a4262b5", "746f6b656e", PacketTypeRetry, nil},
		{"v1 short, empty DCID", rfc9001ChaChaShort, 0, false, 0, "", "", "fe4189", 0, ErrShortHeader},
		{"v1 short, 8-octet DCID", rfc9001ChaChaShort, 8, false, 0, "fe4189655e5cd55c", "", "41f690", 0, ErrShortHeader},
		{"v2 client Initial", rfc9369ClientInitial, 0, true, Version2, "8394c8f03e515708", "", "00449e", PacketTypeInitial, nil},
		{"v2 server Initial", rfc9369ServerInitial, 0, true, Version2, "", "f067a5502a4262b5", "004075", PacketTypeInitial, nil},
		{"v2 Retry", rfc9369Retry, 0, true, Version2, "", "f067a5502a4262b5", "746f6b656e", PacketTypeRetry, nil},
		// v1 0-RTT (type 1) and Handshake (type 2); v2 0-RTT (2) and Handshake (3).
		{"v1 0-RTT", "d00000000104a1a2a3a404b1b2b3b4ff", 0, true, Version1, "a1a2a3a4", "b1b2b3b4", "ff", PacketType0RTT, nil},
		{"v1 Handshake", "e00000000104a1a2a3a40000", 0, true, Version1, "a1a2a3a4", "", "00", PacketTypeHandshake, nil},
		{"v2 0-RTT", "e06b3343cf0000", 0, true, Version2, "", "", "", PacketType0RTT, nil},
		{"v2 Handshake", "f06b3343cf0000", 0, true, Version2, "", "", "", PacketTypeHandshake, nil},
		// Version Negotiation: version 0, then the supported versions.
		{"Version Negotiation", "80000000000401020304040506070800000001", 0, true, VersionNegotiation, "01020304", "05060708", "00000001", PacketTypeVersionNegotiation, nil},
		// Invariants allow 255-octet connection IDs; v1 and v2 do not.
		{"unknown version, 21-octet DCID", "c0ff00001d15" + repeat("aa", 21) + "00", 0, true, 0xff00001d, repeat("aa", 21), "", "", 0, ErrUnknownVersion},
		{"v1, 21-octet SCID", "c00000000100" + "15" + repeat("bb", 21), 0, true, Version1, "", repeat("bb", 21), "", 0, ErrConnIDTooLong},
		{"v2, 255-octet DCID", "c06b3343cfff" + repeat("cc", 255) + "00", 0, true, Version2, repeat("cc", 255), "", "", 0, ErrConnIDTooLong},
		{"minimal long header", "8012345678" + "0000", 0, true, 0x12345678, "", "", "", 0, ErrUnknownVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := unhex(t, tc.packet)
			h, err := Parse(b, tc.shortLen)
			if err != nil {
				t.Fatal(err)
			}
			if h.IsLong() != tc.long || IsLongHeader(b) != tc.long || h.First != b[0] || h.Version != tc.version {
				t.Errorf("got long %v, first %#x, version %#x", h.IsLong(), h.First, h.Version)
			}
			if hex.EncodeToString(h.DCID) != tc.dcid || hex.EncodeToString(h.SCID) != tc.scid {
				t.Errorf("got DCID %x, SCID %x; want %s, %s", h.DCID, h.SCID, tc.dcid, tc.scid)
			}
			if !bytes.HasPrefix(h.Rest, unhex(t, tc.rest)) {
				t.Errorf("Rest %x, want prefix %s", h.Rest, tc.rest)
			}
			if !tc.long && h.SCID != nil {
				t.Errorf("short header SCID %x", h.SCID)
			}
			// Connection IDs and Rest are sub-slices of the packet.
			if len(h.Rest) > 0 && &h.Rest[len(h.Rest)-1] != &b[len(b)-1] {
				t.Errorf("Rest is not the tail of the packet")
			}
			if len(h.DCID) > 0 && &h.DCID[0] != &b[1+5*boolInt(tc.long)] {
				t.Errorf("DCID is not a sub-slice of the packet")
			}
			typ, err := h.Type()
			if !errors.Is(err, tc.typeErr) || (err == nil && typ != tc.typ) {
				t.Errorf("Type: got %v, %v; want %v, %v", typ, err, tc.typ, tc.typeErr)
			}
		})
	}
}

func repeat(s string, n int) string {
	return string(bytes.Repeat([]byte(s), n))
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		packet   string
		shortLen int
		want     error
	}{
		{"empty", "", 0, ErrTruncated},
		{"long, no version", "c0000000", 0, ErrTruncated},
		{"long, no SCID length", "c00000000100", 0, ErrTruncated},
		{"long, DCID past the end", "c0000000010801020304050607", 0, ErrTruncated},
		{"long, SCID past the end", "c000000001000401", 0, ErrTruncated},
		{"long, 255-octet DCID cut short", "c000000001ff" + repeat("aa", 254), 0, ErrTruncated},
		{"short, DCID past the end", "40010203", 4, ErrTruncated},
		{"short, negative DCID length", "40010203", -1, ErrDCIDLen},
		{"short, DCID length over 255", "40", 256, ErrDCIDLen},
	} {
		if _, err := Parse(unhex(t, tc.packet), tc.shortLen); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, err := ParseLong(unhex(t, "40010203040506")); !errors.Is(err, ErrHeaderForm) {
		t.Errorf("ParseLong of a short header: got %v", err)
	}
	if _, err := ParseShort(unhex(t, rfc9001ClientInitial), 8); !errors.Is(err, ErrHeaderForm) {
		t.Errorf("ParseShort of a long header: got %v", err)
	}
}

func TestPacketTypeString(t *testing.T) {
	for typ, want := range map[PacketType]string{
		PacketTypeInitial: "Initial", PacketType0RTT: "0-RTT", PacketTypeHandshake: "Handshake",
		PacketTypeRetry: "Retry", PacketTypeVersionNegotiation: "Version Negotiation", 99: "unknown",
	} {
		if got := typ.String(); got != want {
			t.Errorf("%d: got %q, want %q", typ, got, want)
		}
	}
}

// TestParseAllocs fails if parsing allocates, including on errors.
func TestParseAllocs(t *testing.T) {
	long, short := unhex(t, rfc9369ClientInitial), unhex(t, rfc9001ChaChaShort)
	n := testing.AllocsPerRun(100, func() {
		h, _ := Parse(long, 0)
		_, _ = h.Type()
		h, _ = Parse(short, 8)
		_, _ = h.Type()
		_, _ = Parse(long[:10], 0)
		_, _ = ParseShort(long, 8)
		_, _ = ParseShort(short, -1)
	})
	if n != 0 {
		t.Errorf("%v allocations", n)
	}
}

func BenchmarkParseLong(b *testing.B) {
	p := unhex(b, rfc9001ClientInitial)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse(p, 0); err != nil {
			b.Fatal(err)
		}
	}
}
