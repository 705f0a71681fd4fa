package stabilize

import (
	"crypto/tls"
	"crypto/x509"
	"slices"
	"sync"
)

// Backend TLS session resumption
//
// A backend connection resumes the TLS session of an earlier one to the
// same upstream (RFC 8446 §2.2): the backend sends no certificate and signs
// nothing, and stabilize verifies no chain; the key exchange still runs
// (psk_dhe_ke). Sessions are kept in the upstream's shared Host state, so
// they outlive config reloads, by the TLS settings they were verified
// under: a config whose settings differ in any way never offers a session
// of another. crypto/tls also checks, when it resumes, that the session's
// certificate is still valid for the server name and chains to the roots.

// maxSessionCaches bounds the TLS settings that a host keeps sessions for.
const maxSessionCaches = 4

// backendSessions is a host's TLS session caches, one per TLS settings.
type backendSessions struct {
	mu     sync.Mutex
	caches []*sessionCache // the most recently asked for first
}

// sessionCache holds the sessions verified under one TLS settings.
type sessionCache struct {
	serverName string
	insecure   bool
	roots      *x509.CertPool // nil: the system's roots
	tls.ClientSessionCache
}

// cache returns the session cache of the TLS settings of conf (server
// name, verification and roots), making one if there is none: the same
// cache for equal settings, across configs.
func (s *backendSessions) cache(conf *tls.Config) tls.ClientSessionCache {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := slices.IndexFunc(s.caches, func(c *sessionCache) bool {
		return c.serverName == conf.ServerName && c.insecure == conf.InsecureSkipVerify && c.roots.Equal(conf.RootCAs)
	})
	var c *sessionCache
	if i >= 0 {
		c = s.caches[i]
		s.caches = slices.Delete(s.caches, i, i+1)
	} else {
		// Sessions are cached by server name, the one name a host's
		// connections of these settings use: one session is enough.
		c = &sessionCache{
			serverName:         conf.ServerName,
			insecure:           conf.InsecureSkipVerify,
			roots:              conf.RootCAs,
			ClientSessionCache: tls.NewLRUClientSessionCache(1),
		}
	}
	s.caches = slices.Insert(s.caches, 0, c)
	if len(s.caches) > maxSessionCaches {
		s.caches = slices.Delete(s.caches, maxSessionCaches, len(s.caches))
	}
	return c.ClientSessionCache
}
