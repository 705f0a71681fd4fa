package quiclb

import "testing"

func benchmarkDecode(b *testing.B, v vector) {
	d, err := NewDecoder(v.config(b))
	if err != nil {
		b.Fatal(err)
	}
	cid := unhex(b, v.cid)
	b.ReportAllocs()
	defer threadCPU(b)()
	for b.Loop() {
		if _, err := d.Decode(cid); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeWithFeistelFourPass is BenchmarkDecodeFeistelFourPass
// with the caller's Scratch.
func BenchmarkDecodeWithFeistelFourPass(b *testing.B) {
	v := vectors[3]
	d, err := NewDecoder(v.config(b))
	if err != nil {
		b.Fatal(err)
	}
	cid := unhex(b, v.cid)
	var scratch Scratch
	b.ReportAllocs()
	defer threadCPU(b)()
	for b.Loop() {
		if _, err := d.DecodeWith(cid, &scratch); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodePlaintext(b *testing.B) { benchmarkDecode(b, vectors[0]) }

func BenchmarkDecodeSinglePass(b *testing.B) { benchmarkDecode(b, vectors[4]) }

// BenchmarkDecodeFeistel needs three passes: the server ID fits the left
// half.
func BenchmarkDecodeFeistel(b *testing.B) { benchmarkDecode(b, vectors[2]) }

// BenchmarkDecodeFeistelFourPass needs four: the server ID is longer than
// the nonce.
func BenchmarkDecodeFeistelFourPass(b *testing.B) { benchmarkDecode(b, vectors[3]) }

func BenchmarkGenerateConnectionID(b *testing.B) {
	v := vectors[2]
	g, err := NewGenerator(v.config(b), unhex(b, v.serverID))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := g.GenerateConnectionID(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAESBlock is the floor under the encrypted decoders: one
// AES-128 block through crypto/aes, as each pass uses. Single-pass decoding
// needs one, four-pass decoding three or four in sequence.
func BenchmarkAESBlock(b *testing.B) {
	c, err := NewCodec(vectors[2].config(b))
	if err != nil {
		b.Fatal(err)
	}
	buf := c.scratch()
	defer threadCPU(b)()
	for b.Loop() {
		c.block.Encrypt(buf[:], buf[:])
	}
}
