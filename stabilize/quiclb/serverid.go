package quiclb

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
)

// ServerID is a server ID of up to MaxServerIDLen octets. It is a
// comparable value, usable as a map key. Two words hold the octets and the
// length, so that it is returned in registers.
type ServerID struct {
	hi uint64 // octets 0 to 7, big-endian
	lo uint64 // octets 8 to 14, big-endian, then the length
}

// ServerIDFromBytes copies b into a ServerID.
func ServerIDFromBytes(b []byte) (ServerID, error) {
	if len(b) < MinServerIDLen || len(b) > MaxServerIDLen {
		return ServerID{}, fmt.Errorf("quiclb: server ID length %d: must be %d to %d octets",
			len(b), MinServerIDLen, MaxServerIDLen)
	}
	return serverIDFrom(b), nil
}

// ParseServerID parses a server ID written in hexadecimal.
func ParseServerID(s string) (ServerID, error) {
	b, err := hex.DecodeString(s)
	if err != nil {
		return ServerID{}, fmt.Errorf("quiclb: server ID %q: %w", s, err)
	}
	return ServerIDFromBytes(b)
}

// serverIDFrom copies b, which the caller has checked, into a ServerID.
func serverIDFrom(b []byte) ServerID {
	var p [16]byte
	copy(p[:], b)
	return serverIDFromBlock(&p, len(b))
}

// serverIDFromBlock returns the server ID in the first n octets of p.
func serverIDFromBlock(p *[16]byte, n int) ServerID {
	return serverIDFromWords(binary.BigEndian.Uint64(p[:8]), binary.BigEndian.Uint64(p[8:]), n)
}

// serverIDFromWords returns the server ID in the first n octets of the
// 128-bit big-endian number hi, lo.
func serverIDFromWords(hi, lo uint64, n int) ServerID {
	if n <= 8 {
		return ServerID{hi: hi &^ (1<<(64-8*n) - 1), lo: uint64(n)}
	}
	return ServerID{hi: hi, lo: lo&^(1<<(128-8*n)-1) | uint64(n)}
}

// Len returns the length of s in octets.
func (s ServerID) Len() int { return int(byte(s.lo)) }

// Bytes returns the octets of s.
func (s ServerID) Bytes() []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 16), s.hi)
	return binary.BigEndian.AppendUint64(b, s.lo)[:s.Len()]
}

// String returns s in hexadecimal.
func (s ServerID) String() string { return hex.EncodeToString(s.Bytes()) }
