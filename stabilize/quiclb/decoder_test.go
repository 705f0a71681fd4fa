package quiclb

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
)

func TestDecoderRotation(t *testing.T) {
	oldCfg := Config{ID: 0, ServerIDLen: 2, NonceLen: 6, Key: []byte("0123456789abcdef")}
	newCfg := Config{ID: 1, ServerIDLen: 3, NonceLen: 8, Key: []byte("fedcba9876543210")}
	d, err := NewDecoder(oldCfg, newCfg)
	if err != nil {
		t.Fatal(err)
	}
	oldGen, err := NewGenerator(oldCfg, []byte{0xaa, 0x01})
	if err != nil {
		t.Fatal(err)
	}
	newGen, err := NewGenerator(newCfg, []byte{0xbb, 0x02, 0x03})
	if err != nil {
		t.Fatal(err)
	}
	for gen, want := range map[*Generator]string{oldGen: "aa01", newGen: "bb0203"} {
		cid, err := gen.GenerateConnectionID()
		if err != nil {
			t.Fatal(err)
		}
		sid, err := d.Decode(cid.Bytes())
		if err != nil || sid.String() != want {
			t.Errorf("CID %v: got %v, %v; want %s", cid, sid, err, want)
		}
		if n := d.CIDLen(cid.Bytes()[0]); n != cid.Len() {
			t.Errorf("CIDLen: got %d, want %d", n, cid.Len())
		}
	}
	if d.Codec(1) == nil || d.Codec(1).ID() != 1 || d.Codec(2) != nil {
		t.Errorf("Codec lookup by ID")
	}

	// Config 2 is unknown and config 7 is reserved: both unroutable.
	for _, first := range []byte{2<<5 | 10, 7<<5 | 10} {
		cid := append([]byte{first}, make([]byte, 19)...)
		if _, err := d.Decode(cid); !errors.Is(err, ErrUnroutable) {
			t.Errorf("first octet %#x: got %v, want ErrUnroutable", first, err)
		}
		if n := d.CIDLen(first); n != 0 {
			t.Errorf("first octet %#x: CIDLen %d, want 0", first, n)
		}
	}
	if _, err := d.Decode(nil); !errors.Is(err, ErrUnroutable) {
		t.Errorf("empty CID: got %v, want ErrUnroutable", err)
	}
	if _, err := d.Decode([]byte{0x20, 1, 2}); !errors.Is(err, ErrUnroutable) {
		t.Errorf("short CID: got %v, want ErrUnroutable", err)
	}
}

func TestNewDecoderErrors(t *testing.T) {
	ok := Config{ID: 3, ServerIDLen: 1, NonceLen: 4}
	if _, err := NewDecoder(ok, Config{ID: 3, ServerIDLen: 2, NonceLen: 4}); err == nil ||
		!strings.Contains(err.Error(), "configs[1]: quiclb: ID 3: already used by configs[0]") {
		t.Errorf("duplicate ID: got %v", err)
	}
	if _, err := NewDecoder(ok, Config{ID: 1, ServerIDLen: 1, NonceLen: 2}); err == nil ||
		!strings.Contains(err.Error(), "configs[1]: quiclb: NonceLen 2") {
		t.Errorf("invalid config: got %v", err)
	}
	d, err := NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Decode([]byte{0x07, 1, 2, 3, 4, 5, 6, 7}); !errors.Is(err, ErrUnroutable) {
		t.Errorf("no configs: got %v, want ErrUnroutable", err)
	}
}

// TestConcurrent generates and decodes CIDs from several goroutines at once;
// run with -race.
func TestConcurrent(t *testing.T) {
	cfgs := []Config{
		{ID: 0, ServerIDLen: 2, NonceLen: 4},
		{ID: 1, ServerIDLen: 8, NonceLen: 8, Key: []byte(draftKeyBytes)},
		{ID: 2, ServerIDLen: 3, NonceLen: 5, Key: []byte(draftKeyBytes)},
	}
	d, err := NewDecoder(cfgs...)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(cfgs))
	for _, cfg := range cfgs {
		sid := bytes.Repeat([]byte{cfg.ID + 1}, cfg.ServerIDLen)
		g, err := NewGenerator(cfg, sid)
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			wg.Go(func() {
				for range 500 {
					cid, err := g.GenerateConnectionID()
					if err != nil {
						errs <- err
						return
					}
					got, err := d.Decode(cid.Bytes())
					if err != nil || !bytes.Equal(got.Bytes(), sid) {
						errs <- fmt.Errorf("CID %v: got %v, %v; want %x", cid, got, err, sid)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
