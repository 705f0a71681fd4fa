package quiclb

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	key := make([]byte, KeyLen)
	for _, tc := range []struct {
		cfg  Config
		want string // substring of the error; "" for valid
	}{
		{Config{ID: 0, ServerIDLen: 1, NonceLen: 4}, ""},
		{Config{ID: 6, ServerIDLen: 15, NonceLen: 4, Key: key}, ""},
		{Config{ID: 6, ServerIDLen: 1, NonceLen: 18, Key: key}, ""},
		{Config{ID: 7, ServerIDLen: 1, NonceLen: 4}, "ID 7"},
		{Config{ID: 200, ServerIDLen: 1, NonceLen: 4}, "ID 200"},
		{Config{ServerIDLen: 0, NonceLen: 4}, "ServerIDLen 0"},
		{Config{ServerIDLen: 16, NonceLen: 4}, "ServerIDLen 16"},
		{Config{ServerIDLen: 1, NonceLen: 3}, "NonceLen 3"},
		{Config{ServerIDLen: 1, NonceLen: 19}, "NonceLen 19"},
		{Config{ServerIDLen: 10, NonceLen: 10}, "ServerIDLen 10 + NonceLen 10 = 20"},
		{Config{ServerIDLen: 1, NonceLen: 4, Key: make([]byte, 15)}, "Key length 15"},
		{Config{ServerIDLen: 1, NonceLen: 4, Key: make([]byte, 32)}, "Key length 32"},
	} {
		err := tc.cfg.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: unexpected error %v", tc.cfg, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: got error %v, want one naming %q", tc.cfg, err, tc.want)
		}
		if _, cerr := NewCodec(tc.cfg); (cerr == nil) != (err == nil) {
			t.Errorf("%+v: NewCodec error %v, Validate error %v", tc.cfg, cerr, err)
		}
	}
}

func TestAppendEncodeLengths(t *testing.T) {
	c, err := NewCodec(Config{ID: 1, ServerIDLen: 2, NonceLen: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.AppendEncode(nil, []byte{1}, make([]byte, 4)); err == nil || !strings.Contains(err.Error(), "server ID length 1") {
		t.Errorf("short server ID: got %v", err)
	}
	if _, err := c.AppendEncode(nil, []byte{1, 2}, make([]byte, 5)); err == nil || !strings.Contains(err.Error(), "nonce length 5") {
		t.Errorf("long nonce: got %v", err)
	}
	got, err := c.AppendEncode([]byte("prefix"), []byte{1, 2}, []byte{3, 4, 5, 6})
	if err != nil || !bytes.Equal(got, []byte("prefix\x26\x01\x02\x03\x04\x05\x06")) {
		t.Errorf("append: got %x, %v", got, err)
	}
}

// TestRoundTrip encodes and decodes random server IDs and nonces under every
// valid pair of lengths, with and without a key.
func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for sidLen := MinServerIDLen; sidLen <= MaxServerIDLen; sidLen++ {
		for nonceLen := MinNonceLen; sidLen+nonceLen <= maxPlaintextLen; nonceLen++ {
			for _, keyed := range []bool{false, true} {
				cfg := Config{ID: uint8(rng.IntN(MaxConfigID + 1)), ServerIDLen: sidLen, NonceLen: nonceLen}
				if keyed {
					cfg.Key = randBytes(rng, KeyLen)
				}
				c, err := NewCodec(cfg)
				if err != nil {
					t.Fatal(err)
				}
				for range 20 {
					sid, nonce := randBytes(rng, sidLen), randBytes(rng, nonceLen)
					cid, err := c.AppendEncode(nil, sid, nonce)
					if err != nil {
						t.Fatal(err)
					}
					if len(cid) != c.CIDLen() {
						t.Fatalf("%+v: CID length %d, want %d", cfg, len(cid), c.CIDLen())
					}
					plain := append([]byte{cid[0]}, append(sid, nonce...)...)
					if keyed == bytes.Equal(cid, plain) {
						t.Fatalf("%+v: CID %x, plaintext %x: encrypted=%v", cfg, cid, plain, keyed)
					}
					// Trailing octets, as in a short-header packet, are ignored.
					got, err := c.Decode(append(cid, 0xff, 0xee))
					if err != nil || !bytes.Equal(got.Bytes(), sid) {
						t.Fatalf("%+v: decode %x: got %v, %v; want %x", cfg, cid, got, err, sid)
					}
					var scratch Scratch
					if got, err := c.DecodeWith(cid, &scratch); err != nil || !bytes.Equal(got.Bytes(), sid) {
						t.Fatalf("%+v: DecodeWith %x: got %v, %v; want %x", cfg, cid, got, err, sid)
					}
				}
			}
		}
	}
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestCodecDecodeUnroutable(t *testing.T) {
	c, err := NewCodec(Config{ID: 2, ServerIDLen: 3, NonceLen: 5, Key: make([]byte, KeyLen)})
	if err != nil {
		t.Fatal(err)
	}
	cid, err := c.AppendEncode(nil, []byte{1, 2, 3}, make([]byte, 5))
	if err != nil {
		t.Fatal(err)
	}
	other := bytes.Clone(cid)
	other[0] ^= 1 << 5
	for name, b := range map[string][]byte{
		"empty":        nil,
		"short":        cid[:len(cid)-1],
		"other config": other,
	} {
		if _, err := c.Decode(b); !errors.Is(err, ErrUnroutable) {
			t.Errorf("%s: got %v, want ErrUnroutable", name, err)
		}
	}
}

// TestDecodeAllocs fails if Decode or DecodeWith allocates, for each
// algorithm.
func TestDecodeAllocs(t *testing.T) {
	for _, v := range vectors {
		d, err := NewDecoder(v.config(t))
		if err != nil {
			t.Fatal(err)
		}
		cid := unhex(t, v.cid)
		if n := testing.AllocsPerRun(100, func() { _, _ = d.Decode(cid) }); n != 0 {
			t.Errorf("%s: %v allocations per Decode", v.name, n)
		}
		var scratch Scratch
		if n := testing.AllocsPerRun(100, func() { _, _ = d.DecodeWith(cid, &scratch) }); n != 0 {
			t.Errorf("%s: %v allocations per DecodeWith", v.name, n)
		}
	}
}

func TestServerID(t *testing.T) {
	s, err := ParseServerID("0a0b0c")
	if err != nil || s.Len() != 3 || !bytes.Equal(s.Bytes(), []byte{10, 11, 12}) || s.String() != "0a0b0c" {
		t.Errorf("ParseServerID: got %v (%d octets), %v", s, s.Len(), err)
	}
	if s2, _ := ServerIDFromBytes([]byte{10, 11, 12}); s2 != s {
		t.Errorf("ServerIDFromBytes: %v != %v", s2, s)
	}
	if s3, _ := ServerIDFromBytes([]byte{10, 11, 12, 0}); s3 == s {
		t.Errorf("a trailing zero octet must make a different server ID")
	}
	for _, bad := range []string{"", "zz", "00112233445566778899aabbccddeeff"} {
		if _, err := ParseServerID(bad); err == nil {
			t.Errorf("ParseServerID(%q): no error", bad)
		}
	}
}
