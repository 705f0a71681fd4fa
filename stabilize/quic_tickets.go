package stabilize

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"sync"
	"time"
)

// Session ticket keys of the quic blocks with a certificate pair, as the
// tls app's default (12 hours, 4 keys): a new key every rotation, and
// tickets of the last ticketKeysKept keys still accepted.
const (
	ticketKeyRotation = 12 * time.Hour
	ticketKeysKept    = 4
)

// ticketKeys are the session ticket keys of quic blocks with a certificate
// pair. They belong to the process, not to a config, so that a client
// resumes, and sends 0-RTT data, across reloads. Each key is derived from a
// random secret and its rotation period.
var ticketKeys struct {
	mu     sync.Mutex
	secret [32]byte
	period int64 // of keys; 0 before the first call
	keys   [][32]byte
}

// sessionTicketKeys returns the keys at now, the current one first. The
// slice is shared: callers must not change it.
func sessionTicketKeys(now time.Time) [][32]byte {
	t := &ticketKeys
	t.mu.Lock()
	defer t.mu.Unlock()
	period := now.UnixNano() / int64(ticketKeyRotation)
	if t.period == period {
		return t.keys
	}
	if t.period == 0 {
		if _, err := rand.Read(t.secret[:]); err != nil {
			panic(err) // crypto/rand never fails on supported platforms
		}
	}
	keys := make([][32]byte, ticketKeysKept)
	for i := range keys {
		mac := hmac.New(sha256.New, t.secret[:])
		_ = binary.Write(mac, binary.BigEndian, period-int64(i))
		copy(keys[i][:], mac.Sum(nil))
	}
	t.period, t.keys = period, keys
	return keys
}
