package stabilize

import (
	"cmp"
	"encoding/hex"
	"fmt"
	"strconv"

	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

// QUICLBConfig is one QUIC-LB configuration (draft-ietf-quic-load-balancers):
// how the servers encode their server ID in the connection IDs they issue.
// The balancer and every server share it. Several, with distinct config IDs,
// may be listed while a new one rolls out.
type QUICLBConfig struct {
	// The config rotation codepoint, 0 to 6, carried in the top three bits
	// of every connection ID.
	ConfigID int `json:"config_id"`

	// The length of each server ID, in octets, from 1 to 15. Every upstream
	// with a `server_id` must have one of this length.
	ServerIDLength int `json:"server_id_length"`

	// The length of the nonce, in octets, at least 4; server ID plus nonce
	// are at most 19 octets.
	NonceLength int `json:"nonce_length"`

	// The AES-128 key, 32 hexadecimal digits. Without one, server IDs are
	// in plaintext in the connection IDs.
	Key string `json:"key,omitempty"`
}

// config converts c to a quiclb.Config, naming the field and the value of
// the first error.
func (c *QUICLBConfig) config() (quiclb.Config, error) {
	switch {
	case c.ConfigID < 0 || c.ConfigID > quiclb.MaxConfigID:
		return quiclb.Config{}, fmt.Errorf("config_id %d: must be 0 to %d", c.ConfigID, quiclb.MaxConfigID)
	case c.ServerIDLength < quiclb.MinServerIDLen || c.ServerIDLength > quiclb.MaxServerIDLen:
		return quiclb.Config{}, fmt.Errorf("server_id_length %d: must be %d to %d", c.ServerIDLength, quiclb.MinServerIDLen, quiclb.MaxServerIDLen)
	case c.NonceLength < quiclb.MinNonceLen || c.NonceLength > quiclb.MaxNonceLen:
		return quiclb.Config{}, fmt.Errorf("nonce_length %d: must be %d to %d", c.NonceLength, quiclb.MinNonceLen, quiclb.MaxNonceLen)
	case c.ServerIDLength+c.NonceLength > quiclb.MaxCIDLen-1:
		return quiclb.Config{}, fmt.Errorf("server_id_length %d + nonce_length %d: must be at most %d",
			c.ServerIDLength, c.NonceLength, quiclb.MaxCIDLen-1)
	}
	key, err := hex.DecodeString(c.Key)
	if err != nil {
		return quiclb.Config{}, fmt.Errorf("key %q: not hexadecimal: %w", c.Key, err)
	}
	if len(key) != 0 && len(key) != quiclb.KeyLen {
		return quiclb.Config{}, fmt.Errorf("key %q: length %d, must be %d octets (%d hexadecimal digits)",
			c.Key, len(key), quiclb.KeyLen, 2*quiclb.KeyLen)
	}
	return quiclb.Config{ID: uint8(c.ConfigID), ServerIDLen: c.ServerIDLength, NonceLen: c.NonceLength, Key: key}, nil
}

// provisionQUICLB checks quic_lb and the upstreams' server_id, and sets up
// r's decoder and indexes of the upstreams. Only `per connection` uses
// them; r is nil for the other granularities.
func (h *Handler) provisionQUICLB(r *perConnectionRouter) error {
	if r == nil {
		per := cmp.Or(h.Per, PerFlow)
		if len(h.QUICLB) > 0 {
			return fmt.Errorf("quic_lb: needs per %q, not %q", PerConnection, per)
		}
		for i, u := range h.Upstreams {
			if u.ServerID != "" {
				return fmt.Errorf("upstreams[%d]: server_id %q: needs per %q, not %q", i, u.ServerID, PerConnection, per)
			}
		}
		return nil
	}
	configs := make([]quiclb.Config, len(h.QUICLB))
	for i, c := range h.QUICLB {
		cfg, err := c.config()
		if err != nil {
			return fmt.Errorf("quic_lb[%d]: %w", i, err)
		}
		for j := range i {
			if configs[j].ID == cfg.ID {
				return fmt.Errorf("quic_lb[%d]: config_id %d: already used by quic_lb[%d]", i, cfg.ID, j)
			}
		}
		configs[i] = cfg
	}
	r.byKey = make(map[addrKey]*Upstream, len(h.Upstreams))
	for _, u := range h.Upstreams {
		r.byKey[keyOf(u.addr)] = u
	}
	r.bySID = make(map[quiclb.ServerID]*Upstream)
	for i, u := range h.Upstreams {
		if u.ServerID == "" {
			continue
		}
		if len(configs) == 0 {
			return fmt.Errorf("upstreams[%d]: server_id %q: needs quic_lb", i, u.ServerID)
		}
		b, err := hex.DecodeString(u.ServerID)
		if err != nil {
			return fmt.Errorf("upstreams[%d]: server_id %q: not hexadecimal: %w", i, u.ServerID, err)
		}
		for j, cfg := range configs {
			if len(b) != cfg.ServerIDLen {
				return fmt.Errorf("upstreams[%d]: server_id %q: length %d, but quic_lb[%d].server_id_length is %d",
					i, u.ServerID, len(b), j, cfg.ServerIDLen)
			}
		}
		sid, err := quiclb.ServerIDFromBytes(b)
		if err != nil {
			return fmt.Errorf("upstreams[%d]: server_id %q: %w", i, u.ServerID, err)
		}
		if other := r.bySID[sid]; other != nil {
			return fmt.Errorf("upstreams[%d]: server_id %q: already the server ID of upstream %q", i, u.ServerID, other.Dial)
		}
		r.bySID[sid] = u
	}
	if len(configs) > 0 {
		d, err := quiclb.NewDecoder(configs...)
		if err != nil {
			return fmt.Errorf("quic_lb: %w", err)
		}
		r.lb = d
	}
	return nil
}

// quicLB parses `quic_lb { config_id <0-6>; server_id_length <n>;
// nonce_length <n>; key <hex> }`.
func (p *caddyfileParser) quicLB([]string) error {
	c := new(QUICLBConfig)
	err := p.subOptions("quic_lb", map[string]func(string) error{
		"config_id":        atoi(&c.ConfigID),
		"server_id_length": atoi(&c.ServerIDLength),
		"nonce_length":     atoi(&c.NonceLength),
		"key": func(v string) error {
			c.Key = v
			return nil
		},
	})
	if err != nil {
		return err
	}
	p.h.QUICLB = append(p.h.QUICLB, c)
	return nil
}

// atoi returns a function that parses an integer into n.
func atoi(n *int) func(string) error {
	return func(v string) (err error) {
		*n, err = strconv.Atoi(v)
		return err
	}
}
