package stabilize

import (
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestQUICActiveHealthBackendTLS: the active checks of quic/ upstreams
// share a prober, and its verdict, only under the same backend TLS
// settings. A reload that makes the backend's CA trusted brings the
// upstream up; handlers that verify it differently (system roots, the
// test CA, none) each get their own verdict, told apart in the admin
// API's checks; and a trust pool with other certificates is another.
func TestQUICActiveHealthBackendTLS(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		handler := func(quicExtra map[string]any, dropPool bool) map[string]any {
			h := quicHandler(t, "", "", quicExtra, b.dial())
			if dropPool {
				delete(h["quic"].(map[string]any), "tls_trust_pool") // the system's roots: the test CA is unknown
			}
			h["health_checks"] = map[string]any{"active": map[string]any{"interval": "200ms", "timeout": "150ms"}}
			return h
		}
		startServers(t, network, "", handler(nil, true))
		eventually(t, 5*time.Second, "the upstream down (unknown CA)", func() bool { return !hostOf(t, b.addr).Healthy() })

		// The reload trusts the CA.
		startServers(t, network, "", handler(nil, false))
		eventually(t, 3*time.Second, "the upstream up after a reload that trusts its CA", func() bool {
			return hostOf(t, b.addr).Healthy()
		})

		// Four handlers, four verifications, four verdicts.
		otherPKI, err := makeTestPKI() // another CA
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(filepath.Dir(otherPKI.caFile)) })
		other := otherPKI.caFile
		startServers(t, network, "",
			handler(nil, false),
			handler(nil, true),
			handler(map[string]any{"tls_insecure_skip_verify": true}, true),
			handler(map[string]any{"tls_trust_pool": map[string]any{"provider": "file", "pem_files": []string{other}}}, false),
		)
		want := []string{"insecure: true", "roots=pool-: false", "roots=pool-: true", "roots=system: false"} // sorted
		var got []string
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("verdicts %q, want %q", got, want)
			}
		})
		eventually(t, 5*time.Second, "four verdicts", func() bool {
			got = got[:0]
			for _, s := range hostOf(t, b.addr).ActiveChecks() {
				verify := s.Checks[strings.LastIndexByte(s.Checks, ' ')+1:]
				verify = strings.TrimRight(verify, "0123456789")
				got = append(got, fmt.Sprintf("%s: %v", verify, s.Healthy))
			}
			slices.Sort(got)
			return slices.Equal(got, want)
		})
		for _, s := range hostOf(t, b.addr).ActiveChecks() {
			if !strings.Contains(s.Checks, " quic alpn="+testALPN+" sni=127.0.0.1 ") {
				t.Errorf("checks %q: no ALPN or server name", s.Checks)
			}
		}
	})
}

// TestQUICProberKeyServerName: upstreams of one address with different
// host names are verified against different names, so their checks are
// not shared.
func TestQUICProberKeyServerName(t *testing.T) {
	c, err := compileActive(&ActiveHealthChecks{})
	if err != nil {
		t.Fatal(err)
	}
	c.quic = (&QUIC{backendTLS: &tls.Config{}, ALPN: []string{"h3"}}).probeTLS()
	a := &Upstream{serverName: "a.example"}
	b := &Upstream{serverName: "b.example"}
	if c.key(a) == c.key(b) {
		t.Fatalf("one key for two server names: %q", c.key(a))
	}
	c.quic.ServerName = "fixed.example"
	if c.key(a) != c.key(b) {
		t.Fatalf("tls_server_name set, two keys: %q, %q", c.key(a), c.key(b))
	}
}
