package quiclb

import "fmt"

// Decoder decodes connection IDs under up to seven configurations at once,
// as a load balancer does while a new configuration rolls out. The config
// rotation bits of a CID's first octet choose the configuration. It is safe
// for concurrent use.
type Decoder struct {
	codecs [UnroutableConfigID + 1]*Codec // index UnroutableConfigID stays nil
}

// NewDecoder returns a decoder for configs, which must have distinct IDs.
func NewDecoder(configs ...Config) (*Decoder, error) {
	d := new(Decoder)
	var index [UnroutableConfigID]int
	for i, cfg := range configs {
		c, err := NewCodec(cfg)
		if err != nil {
			return nil, fmt.Errorf("configs[%d]: %w", i, err)
		}
		if d.codecs[c.id] != nil {
			return nil, fmt.Errorf("configs[%d]: quiclb: ID %d: already used by configs[%d]", i, c.id, index[c.id])
		}
		d.codecs[c.id], index[c.id] = c, i
	}
	return d, nil
}

// Codec returns the codec of configuration id, or nil if there is none.
func (d *Decoder) Codec(id uint8) *Codec {
	return d.codecs[id&UnroutableConfigID]
}

// CIDLen returns the length of the connection ID that starts with
// firstOctet, as its configuration defines it, or 0 if no configuration
// matches. Short-header packets do not carry the DCID length; this does.
func (d *Decoder) CIDLen(firstOctet byte) int {
	if c := d.codecs[ConfigID(firstOctet)]; c != nil {
		return c.CIDLen()
	}
	return 0
}

// Decode extracts the server ID from cid with the configuration its first
// octet names. It returns ErrUnroutable for an empty CID, for config ID 7
// or one the decoder does not know, and for a CID too short for its
// configuration. Octets past the configuration's CID length are ignored.
// Decode allocates nothing.
func (d *Decoder) Decode(cid []byte) (ServerID, error) {
	c := d.codecOf(cid)
	if c == nil {
		return ServerID{}, ErrUnroutable
	}
	return c.Decode(cid)
}

// DecodeWith is Decode with the caller's scratch memory, which saves
// Decode's pool round trip: a goroutine that decodes many CIDs keeps one
// Scratch.
func (d *Decoder) DecodeWith(cid []byte, s *Scratch) (ServerID, error) {
	c := d.codecOf(cid)
	if c == nil {
		return ServerID{}, ErrUnroutable
	}
	return c.DecodeWith(cid, s)
}

// codecOf returns the codec that cid's first octet names, or nil.
func (d *Decoder) codecOf(cid []byte) *Codec {
	if len(cid) == 0 {
		return nil
	}
	return d.codecs[ConfigID(cid[0])]
}
