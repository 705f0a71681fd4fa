package quiclb

import (
	"crypto/aes"
	"fmt"
)

// Limits from the draft's "Configuration Agent Actions" section.
const (
	// MaxConfigID is the largest config rotation codepoint a configuration
	// may use; UnroutableConfigID is reserved.
	MaxConfigID = 6
	// UnroutableConfigID (0b111) marks connection IDs that carry no routing
	// information.
	UnroutableConfigID = 7
	// MinServerIDLen is the shortest server ID, in octets.
	MinServerIDLen = 1
	// MaxServerIDLen is the longest server ID, in octets.
	MaxServerIDLen = maxPlaintextLen - MinNonceLen
	// MinNonceLen is the shortest nonce, in octets.
	MinNonceLen = 4
	// MaxNonceLen is the longest nonce, in octets.
	MaxNonceLen = maxPlaintextLen - MinServerIDLen
	// MaxCIDLen is the QUIC v1 connection ID limit: the first octet and at
	// most 19 octets of server ID and nonce.
	MaxCIDLen = 20
	// KeyLen is the length of an AES-128 key.
	KeyLen = 16

	maxPlaintextLen = MaxCIDLen - 1
)

// Config is one QUIC-LB configuration: the parameters a load balancer and
// its servers share to encode and decode server IDs in connection IDs.
type Config struct {
	// ID is the config rotation codepoint written in the top three bits of
	// every connection ID, from 0 to 6. 7 is reserved for unroutable CIDs.
	ID uint8
	// ServerIDLen is the server ID length in octets, at least 1.
	ServerIDLen int
	// NonceLen is the nonce length in octets, at least 4. ServerIDLen plus
	// NonceLen is at most 19, so that CIDs fit QUIC v1's 20 octets.
	NonceLen int
	// Key is an optional 16-octet AES-128 key. Without one, the server ID
	// is visible to any observer (the draft's plaintext algorithm).
	Key []byte
}

// Validate reports the first field of c that the draft does not allow.
func (c Config) Validate() error {
	switch {
	case c.ID > MaxConfigID:
		return fmt.Errorf("quiclb: ID %d: must be 0 to %d (%d marks unroutable connection IDs)",
			c.ID, MaxConfigID, UnroutableConfigID)
	case c.ServerIDLen < MinServerIDLen || c.ServerIDLen > MaxServerIDLen:
		return fmt.Errorf("quiclb: ServerIDLen %d: must be %d to %d octets",
			c.ServerIDLen, MinServerIDLen, MaxServerIDLen)
	case c.NonceLen < MinNonceLen || c.NonceLen > MaxNonceLen:
		return fmt.Errorf("quiclb: NonceLen %d: must be %d to %d octets",
			c.NonceLen, MinNonceLen, MaxNonceLen)
	case c.ServerIDLen+c.NonceLen > maxPlaintextLen:
		return fmt.Errorf("quiclb: ServerIDLen %d + NonceLen %d = %d: must be at most %d, for a %d-octet connection ID",
			c.ServerIDLen, c.NonceLen, c.ServerIDLen+c.NonceLen, maxPlaintextLen, MaxCIDLen)
	case len(c.Key) != 0 && len(c.Key) != KeyLen:
		return fmt.Errorf("quiclb: Key length %d: must be %d octets, or empty for plaintext", len(c.Key), KeyLen)
	}
	return nil
}

// CIDLen is the length of the connection IDs c produces: the first octet,
// the server ID and the nonce.
func (c Config) CIDLen() int { return 1 + c.ServerIDLen + c.NonceLen }

// ConfigID returns the config rotation codepoint in a connection ID's first
// octet.
func ConfigID(firstOctet byte) uint8 { return firstOctet >> 5 }

// firstOctet returns the first octet of a CID: the config rotation bits and
// the length self-description (the CID length without the first octet).
func (c Config) firstOctet() byte {
	return c.ID<<5 | byte(c.ServerIDLen+c.NonceLen)
}

// algorithm names the draft's three encodings of a configuration.
type algorithm uint8

const (
	plaintext  algorithm = iota // no key
	singlePass                  // key, server ID + nonce == 16 octets
	fourPass                    // key, any other length
)

func (c Config) algorithm() algorithm {
	switch {
	case len(c.Key) == 0:
		return plaintext
	case c.ServerIDLen+c.NonceLen == aes.BlockSize:
		return singlePass
	}
	return fourPass
}
