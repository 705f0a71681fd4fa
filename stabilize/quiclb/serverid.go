package quiclb

import (
	"encoding/hex"
	"fmt"
)

// ServerID is a server ID of up to MaxServerIDLen octets. It is a
// comparable value, usable as a map key.
type ServerID struct {
	b [MaxServerIDLen]byte
	n uint8
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
	var s ServerID
	s.n = uint8(copy(s.b[:], b))
	return s
}

// Len returns the length of s in octets.
func (s ServerID) Len() int { return int(s.n) }

// Bytes returns the octets of s.
func (s ServerID) Bytes() []byte { return s.b[:s.n] }

// String returns s in hexadecimal.
func (s ServerID) String() string { return hex.EncodeToString(s.b[:s.n]) }
