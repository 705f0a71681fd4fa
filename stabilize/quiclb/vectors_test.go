package quiclb

import (
	"bytes"
	"encoding/hex"
	"testing"
)

// draftKey is the key of the draft's encrypted test vectors.
const draftKey = "8f95f09245765f80256934e50c66207f"

// vector is one row of the draft's "Load Balancer Test Vectors" appendix,
// or its worked four-pass encryption example.
type vector struct {
	name     string
	id       uint8
	key      string
	serverID string
	nonce    string
	cid      string
}

// vectors lists every test vector of the editor's copy after -21. Two rows
// are printed with typos; the corrections keep every printed octet:
//   - unencrypted cr_bits 1 prints nonce "3487d970b" (nine hex digits) and
//     CID "20a350d28b4203487d970b": the first octet 0x2a (config 1, length
//     10) is split around the nonce's leading zero. The five-octet nonce is
//     03487d970b.
//   - encrypted cr_bits 3 prints first octet 0x12, the length 18 without the
//     config bits; config 3 makes it 0x72. The ciphertext is as printed.
var vectors = []vector{
	{"unencrypted/0", 0, "", "c4605e", "4504cc4f", "07c4605e4504cc4f"},
	{"unencrypted/1", 1, "", "350d28b420", "03487d970b", "2a350d28b42003487d970b"},
	{"encrypted/0", 0, draftKey, "ed793a", "ee080dbf", "0720b1d07b359d3c"},
	{"encrypted/1_four_decrypt_passes", 1, draftKey, "ed793a51d49b8f5fab65", "ee080dbf48", "2fcc381bc74cb4fbad2823a3d1f8fed2"},
	{"encrypted/2_single_pass", 2, draftKey, "ed793a51d49b8f5f", "ee080dbf48c0d1e5", "504dd2d05a7b0de9b2b9907afb5ecf8cc3"},
	{"encrypted/3", 3, draftKey, "ed793a51d49b8f5fab", "ee080dbf48c0d1e55d", "725779c9cc86beb3a3a4a3ca96fce4bfe0cdbc"},
	{"encryption_example", 0, "fdf726a9893ec05c0632d3956680baf0", "31441a", "9c69c275", "0767947d29be054a"},
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func (v vector) config(t testing.TB) Config {
	return Config{
		ID:          v.id,
		ServerIDLen: len(v.serverID) / 2,
		NonceLen:    len(v.nonce) / 2,
		Key:         unhex(t, v.key),
	}
}

func TestDraftVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			c, err := NewCodec(v.config(t))
			if err != nil {
				t.Fatal(err)
			}
			sid, nonce, want := unhex(t, v.serverID), unhex(t, v.nonce), unhex(t, v.cid)
			got, err := c.AppendEncode(nil, sid, nonce)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("encode: got %x, want %x", got, want)
			}
			if c.CIDLen() != len(want) {
				t.Errorf("CIDLen %d, want %d", c.CIDLen(), len(want))
			}
			if ConfigID(got[0]) != v.id || int(got[0]&0x1f) != len(want)-1 {
				t.Errorf("first octet %#x: want config %d, length %d", got[0], v.id, len(want)-1)
			}
			dec, err := c.Decode(want)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(dec.Bytes(), sid) {
				t.Errorf("decode: got %x, want %s", dec.Bytes(), v.serverID)
			}
		})
	}
}

// TestDraftVectorsDecoder decodes all vectors that share the draft's key
// with one Decoder holding their four configurations, as during rotation.
func TestDraftVectorsDecoder(t *testing.T) {
	var cfgs []Config
	var keyed []vector
	for _, v := range vectors {
		if v.key == draftKey {
			cfgs = append(cfgs, v.config(t))
			keyed = append(keyed, v)
		}
	}
	d, err := NewDecoder(cfgs...)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range keyed {
		sid, err := d.Decode(unhex(t, v.cid))
		if err != nil || sid.String() != v.serverID {
			t.Errorf("%s: got %v, %v; want %s", v.name, sid, err, v.serverID)
		}
	}
}

// TestFeistelExampleSteps checks the intermediate halves of the draft's
// worked four-pass example.
func TestFeistelExampleSteps(t *testing.T) {
	v := vectors[len(vectors)-1]
	c, err := NewCodec(v.config(t))
	if err != nil {
		t.Fatal(err)
	}
	var l, r half
	c.split(&l, &r, unhex(t, v.serverID+v.nonce))
	check := func(step string, h *half, want string) {
		t.Helper()
		if got := hex.EncodeToString(h[:c.halfLen]); got != want {
			t.Errorf("%s: got %s, want %s", step, got, want)
		}
	}
	check("left_0", &l, "31441a90")
	check("right_0", &r, "0c69c275")
	buf := c.scratch()
	defer c.blocks.Put(buf)
	c.round(buf, 1, &l, &r, &c.rightMask)
	check("right_1", &r, "0e3c1ff9")
	c.round(buf, 2, &r, &l, &c.leftMask)
	check("left_1", &l, "d4a04850")
	c.round(buf, 3, &l, &r, &c.rightMask)
	check("right_2", &r, "09be054a")
	c.round(buf, 4, &r, &l, &c.leftMask)
	check("left_2", &l, "67947d20")
}

// TestExpandExample checks the draft's example of the expand function.
func TestExpandExample(t *testing.T) {
	var buf [16]byte
	var in half
	copy(in[:], unhex(t, "aaba3c"))
	expand(&buf, 0x06, 0x02, &in)
	if got, want := hex.EncodeToString(buf[:]), "aaba3c00000000000000000000000602"; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}
