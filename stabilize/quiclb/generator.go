package quiclb

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"

	"github.com/quic-go/quic-go"
)

// ErrNonceExhausted is returned by Generator.GenerateConnectionID once every
// nonce of a keyed configuration has been issued. The draft forbids reusing
// a nonce under the same key: switch to a new configuration.
var ErrNonceExhausted = errors.New("quiclb: nonces exhausted: a new configuration is needed")

// Generator is a quic-go ConnectionIDGenerator that issues routable
// connection IDs for one server ID under one configuration.
//
// Nonces follow the draft's "Connection ID Entropy" section. Without a key,
// every nonce is fresh random octets, so that plaintext nonces are not
// linkable. With a key, nonces count up from a random start, so none repeats
// until the counter comes back to its start; then GenerateConnectionID
// returns ErrNonceExhausted. Share one Generator between the transports of a
// process that use the same server ID and configuration, so that they share
// its counter. It is safe for concurrent use.
type Generator struct {
	codec    *Codec
	serverID []byte
	keyed    bool

	mu        sync.Mutex
	next      [MaxNonceLen]byte // next counter nonce (keyed)
	start     [MaxNonceLen]byte // first counter nonce (keyed)
	exhausted bool
}

// NewGenerator returns a generator of cfg's connection IDs that carry
// serverID, which must be cfg.ServerIDLen octets long.
func NewGenerator(cfg Config, serverID []byte) (*Generator, error) {
	c, err := NewCodec(cfg)
	if err != nil {
		return nil, err
	}
	if len(serverID) != cfg.ServerIDLen {
		return nil, fmt.Errorf("quiclb: server ID %x: length %d, but ServerIDLen is %d",
			serverID, len(serverID), cfg.ServerIDLen)
	}
	g := &Generator{codec: c, serverID: bytes.Clone(serverID), keyed: len(cfg.Key) != 0}
	if g.keyed {
		rand.Read(g.start[:cfg.NonceLen]) // crypto/rand.Read never fails
		g.next = g.start
	}
	return g, nil
}

// GenerateConnectionID returns a new connection ID carrying the server ID.
func (g *Generator) GenerateConnectionID() (quic.ConnectionID, error) {
	var nonce [MaxNonceLen]byte
	n := nonce[:g.codec.nonceLen]
	if err := g.nonce(n); err != nil {
		return quic.ConnectionID{}, err
	}
	var cid [MaxCIDLen]byte
	b, err := g.codec.AppendEncode(cid[:0], g.serverID, n)
	if err != nil {
		return quic.ConnectionID{}, err
	}
	return quic.ConnectionIDFromBytes(b), nil
}

// ConnectionIDLen returns the length of the generated connection IDs.
func (g *Generator) ConnectionIDLen() int { return g.codec.CIDLen() }

// nonce fills n with the next nonce.
func (g *Generator) nonce(n []byte) error {
	if !g.keyed {
		rand.Read(n) // crypto/rand.Read never fails
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.exhausted {
		return ErrNonceExhausted
	}
	next := g.next[:len(n)]
	copy(n, next)
	increment(next)
	g.exhausted = bytes.Equal(next, g.start[:len(n)])
	return nil
}

// increment adds one to the big-endian number b, wrapping to zero.
func increment(b []byte) {
	for i := len(b) - 1; i >= 0; i-- {
		b[i]++
		if b[i] != 0 {
			return
		}
	}
}

// Interface guards
var _ quic.ConnectionIDGenerator = (*Generator)(nil)
