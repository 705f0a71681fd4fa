package quiclb

import (
	"bytes"
	"errors"
	"testing"
)

// fuzzConfigs cover the three algorithms and odd and even Feistel lengths.
var fuzzConfigs = []Config{
	{ID: 0, ServerIDLen: 3, NonceLen: 4},
	{ID: 1, ServerIDLen: 8, NonceLen: 8, Key: []byte(draftKeyBytes)},
	{ID: 2, ServerIDLen: 3, NonceLen: 4, Key: []byte(draftKeyBytes)},
	{ID: 3, ServerIDLen: 10, NonceLen: 5, Key: []byte(draftKeyBytes)},
	{ID: 4, ServerIDLen: 9, NonceLen: 9, Key: []byte(draftKeyBytes)},
	{ID: 5, ServerIDLen: 15, NonceLen: 4, Key: []byte(draftKeyBytes)},
	{ID: 6, ServerIDLen: 1, NonceLen: 18, Key: []byte(draftKeyBytes)},
}

const draftKeyBytes = "\x8f\x95\xf0\x92\x45\x76\x5f\x80\x25\x69\x34\xe5\x0c\x66\x20\x7f"

// FuzzDecode decodes arbitrary octets. Decode must not panic, must fail
// exactly when the CID is unroutable, and encoding the octets as a server ID
// and nonce must decode back to that server ID.
func FuzzDecode(f *testing.F) {
	for _, v := range vectors {
		f.Add(unhex(f, v.cid))
	}
	f.Add([]byte{})
	f.Add([]byte{0xff, 1, 2, 3, 4, 5, 6, 7, 8})
	f.Add([]byte{0x1f})
	d, err := NewDecoder(fuzzConfigs...)
	if err != nil {
		f.Fatal(err)
	}
	var scratch Scratch
	f.Fuzz(func(t *testing.T, b []byte) {
		sid, err := d.Decode(b)
		if sid2, err2 := d.DecodeWith(b, &scratch); sid2 != sid || err2 != err {
			t.Fatalf("DecodeWith(%x) = %v, %v; Decode %v, %v", b, sid2, err2, sid, err)
		}
		var c *Codec
		if len(b) > 0 {
			c = d.Codec(ConfigID(b[0]))
		}
		if routable := c != nil && len(b) >= c.CIDLen(); routable != (err == nil) {
			t.Fatalf("Decode(%x) = %v, %v; routable %v", b, sid, err, routable)
		}
		if err != nil {
			if !errors.Is(err, ErrUnroutable) {
				t.Fatalf("Decode(%x): error %v is not ErrUnroutable", b, err)
			}
			return
		}
		if sid.Len() != c.serverIDLen {
			t.Fatalf("Decode(%x): server ID %v, want %d octets", b, sid, c.serverIDLen)
		}
		wantSID, nonce := b[1:1+c.serverIDLen], b[1+c.serverIDLen:c.CIDLen()]
		cid, err := c.AppendEncode(nil, wantSID, nonce)
		if err != nil {
			t.Fatal(err)
		}
		got, err := d.Decode(cid)
		if err != nil || !bytes.Equal(got.Bytes(), wantSID) {
			t.Fatalf("round trip of %x via %x: got %v, %v", wantSID, cid, got, err)
		}
	})
}
