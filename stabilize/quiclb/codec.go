package quiclb

import (
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"sync"
)

// ErrUnroutable is returned by Decode for a connection ID that carries no
// server ID it can extract: an unknown or reserved config ID, or a CID too
// short for its configuration.
var ErrUnroutable = errors.New("quiclb: unroutable connection ID")

// Codec encodes and decodes the connection IDs of one Config. It is safe for
// concurrent use.
type Codec struct {
	id          uint8
	alg         algorithm
	first       byte // first octet of every CID
	serverIDLen int
	nonceLen    int
	plen        int // server ID + nonce octets

	// Four-pass encryption splits the plaintext into halves of halfLen octets;
	// with an odd plen the halves share the middle octet, and the masks
	// clear the nibble each does not own.
	halfLen             int
	leftMask, rightMask half

	block cipher.Block // AES-128, created once; nil for plaintext
	// blocks holds *[aes.BlockSize]byte scratch for block: a buffer passed
	// to an interface method escapes, so a local one would be allocated on
	// every call.
	blocks sync.Pool
}

// NewCodec validates cfg and returns its codec.
func NewCodec(cfg Config) (*Codec, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := &Codec{
		id:          cfg.ID,
		alg:         cfg.algorithm(),
		first:       cfg.firstOctet(),
		serverIDLen: cfg.ServerIDLen,
		nonceLen:    cfg.NonceLen,
		plen:        cfg.ServerIDLen + cfg.NonceLen,
	}
	c.halfLen = (c.plen + 1) / 2
	c.leftMask, c.rightMask = halfMasks(c.plen)
	if c.alg != plaintext {
		block, err := aes.NewCipher(cfg.Key)
		if err != nil {
			return nil, fmt.Errorf("quiclb: Key: %w", err)
		}
		c.block = block
		c.blocks.New = func() any { return new([aes.BlockSize]byte) }
	}
	return c, nil
}

// ID returns the config rotation codepoint of the codec's configuration.
func (c *Codec) ID() uint8 { return c.id }

// CIDLen returns the length of the connection IDs the codec encodes.
func (c *Codec) CIDLen() int { return 1 + c.plen }

// AppendEncode appends to dst the connection ID that carries serverID and
// nonce: the first octet (config ID and length), then the server ID and
// nonce, encrypted if the configuration has a key.
func (c *Codec) AppendEncode(dst, serverID, nonce []byte) ([]byte, error) {
	if len(serverID) != c.serverIDLen {
		return dst, fmt.Errorf("quiclb: server ID length %d: configuration %d needs %d octets",
			len(serverID), c.id, c.serverIDLen)
	}
	if len(nonce) != c.nonceLen {
		return dst, fmt.Errorf("quiclb: nonce length %d: configuration %d needs %d octets",
			len(nonce), c.id, c.nonceLen)
	}
	dst = appendPlaintext(dst, c.first, serverID, nonce)
	b := dst[len(dst)-c.plen:]
	switch c.alg {
	case singlePass:
		c.block.Encrypt(b, b)
	case fourPass:
		c.encryptFeistel(b)
	}
	return dst, nil
}

// Decode extracts the server ID from cid. Octets past the codec's CID
// length are ignored, so cid may be the rest of a short-header packet.
// Decode allocates nothing.
func (c *Codec) Decode(cid []byte) (ServerID, error) {
	b := c.payload(cid)
	if b == nil {
		return ServerID{}, ErrUnroutable
	}
	if c.alg == plaintext {
		return plaintextServerID(b, c.serverIDLen), nil
	}
	buf := c.scratch()
	sid := c.encryptedServerID(b, buf)
	c.blocks.Put(buf)
	return sid, nil
}

// DecodeWith is Decode with the caller's scratch memory, which saves
// Decode's pool round trip.
func (c *Codec) DecodeWith(cid []byte, s *Scratch) (ServerID, error) {
	b := c.payload(cid)
	if b == nil {
		return ServerID{}, ErrUnroutable
	}
	if c.alg == plaintext {
		return plaintextServerID(b, c.serverIDLen), nil
	}
	return c.encryptedServerID(b, &s.block), nil
}

// Scratch is working memory for DecodeWith: a goroutine that decodes many
// CIDs keeps one. The zero value is ready to use; a Scratch serves one
// decode at a time.
type Scratch struct {
	block [aes.BlockSize]byte
}

// payload returns the server ID and nonce octets of cid, or nil if cid is
// not the codec's: a CID carries at least MinServerIDLen+MinNonceLen.
func (c *Codec) payload(cid []byte) []byte {
	if len(cid) < 1+c.plen || ConfigID(cid[0]) != c.id {
		return nil
	}
	return cid[1 : 1+c.plen]
}

// encryptedServerID decrypts b, the payload of a CID with a key, with buf
// as scratch.
func (c *Codec) encryptedServerID(b []byte, buf *[aes.BlockSize]byte) ServerID {
	if c.alg == singlePass {
		return c.singlePassServerID(b, buf)
	}
	return c.feistelServerID(b, buf)
}

// scratch returns a block-sized buffer from the pool; release it with
// c.blocks.Put.
func (c *Codec) scratch() *[aes.BlockSize]byte {
	return c.blocks.Get().(*[aes.BlockSize]byte)
}
