package quicwire

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// FuzzParse parses arbitrary packets. Parse must not panic, and on success
// the fields it returns must lay end to end in the packet.
func FuzzParse(f *testing.F) {
	for _, p := range []string{
		rfc9001ClientInitial, rfc9001ServerInitial, rfc9001Retry, rfc9001ChaChaShort,
		rfc9369ClientInitial, rfc9369ServerInitial, rfc9369Retry,
		"80000000000401020304040506070800000001", "c000000001ff", "",
	} {
		f.Add(unhex(f, p), uint8(8))
	}
	f.Fuzz(func(t *testing.T, b []byte, shortLen uint8) {
		h, err := Parse(b, int(shortLen))
		if err != nil {
			return
		}
		_, _ = h.Type()
		if h.First != b[0] || h.IsLong() != IsLongHeader(b) {
			t.Fatalf("first octet %#x, long %v", h.First, h.IsLong())
		}
		var want []byte
		if h.IsLong() {
			want = binary.BigEndian.AppendUint32([]byte{h.First}, h.Version)
			want = append(append(want, byte(len(h.DCID))), h.DCID...)
			want = append(append(want, byte(len(h.SCID))), h.SCID...)
		} else {
			if len(h.DCID) != int(shortLen) || h.SCID != nil || h.Version != 0 {
				t.Fatalf("short header: DCID %x (want %d octets), SCID %x, version %#x", h.DCID, shortLen, h.SCID, h.Version)
			}
			want = append([]byte{h.First}, h.DCID...)
		}
		if !bytes.Equal(append(want, h.Rest...), b) {
			t.Fatalf("fields %x + %x do not make up packet %x", want, h.Rest, b)
		}
	})
}
