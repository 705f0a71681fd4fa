package stabilize

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"
)

// Interoperability with ngtcp2's example HTTP/3 client and server (Debian
// packages ngtcp2-client and ngtcp2-server; .ci/run installs them), as
// clients and as backends of the relay. The tests skip without them.

// TestQUICInteropNgtcp2Client: ngtcp2's client fetches through stabilize
// from a quic-go HTTP/3 backend, plainly, through a migration to a new
// local address and through a NAT rebinding.
func TestQUICInteropNgtcp2Client(t *testing.T) {
	client := lookNgtcp2(t, "gtlsclient")
	forNetworks(t, func(t *testing.T, network string) {
		backend := startH3Backend(t, "a")
		h := quicHandler(t, "", "", nil, backend)
		delete(h["quic"].(map[string]any), "alpn")
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		host, port, _ := strings.Cut(lb.addr, ":")
		for _, tc := range []struct {
			name string
			args []string
		}{
			{"plain", nil},
			{"migration", []string{"--change-local-addr=200ms", "--delay-stream=400ms"}},
			{"nat-rebinding", []string{"--change-local-addr=200ms", "--nat-rebinding", "--delay-stream=400ms"}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				dir := t.TempDir()
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				args := append([]string{"-q", "--exit-on-all-streams-close", "--download=" + dir, "--timeout=5s"}, tc.args...)
				args = append(args, host, port, "https://localhost/hello")
				out, err := exec.CommandContext(ctx, client, args...).CombinedOutput()
				if err != nil {
					t.Fatalf("gtlsclient %q: %v\n%s", args, err, out)
				}
				got, err := os.ReadFile(filepath.Join(dir, "hello"))
				if err != nil || string(got) != "a|hello HTTP/3.0" {
					t.Fatalf("downloaded %q, %v\n%s", got, err, out)
				}
			})
		}
	})
}

// TestQUICInteropNgtcp2Server: a quic-go HTTP/3 client fetches through
// stabilize from ngtcp2's server, twice: the second backend connection
// resumes.
func TestQUICInteropNgtcp2Server(t *testing.T) {
	server := lookNgtcp2(t, "gtlsserver")
	p := newTestPKI(t)
	htdocs := t.TempDir()
	body := strings.Repeat("ngtcp2 says hello\n", 10000)
	if err := os.WriteFile(filepath.Join(htdocs, "file"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	port := freeUDPPort(t)
	cmd := exec.Command(server, "-q", "-d", htdocs, "127.0.0.1", fmt.Sprint(port), p.keyFile, p.certFile)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	forNetworks(t, func(t *testing.T, network string) {
		h := quicHandler(t, "", "", nil, fmt.Sprintf("quic/127.0.0.1:%d", port))
		delete(h["quic"].(map[string]any), "alpn")
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		// Two connections: the second's backend leg resumes the
		// first's TLS session with ngtcp2 (GnuTLS).
		for i := range 2 {
			tr := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: p.pool, ServerName: "localhost"}}
			client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			var resp *http.Response
			eventually(t, 5*time.Second, "ngtcp2's server to answer", func() bool {
				var err error
				resp, err = client.Get("https://" + lb.addr + "/file")
				return err == nil
			})
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			tr.Close()
			if err != nil || resp.StatusCode != 200 || string(got) != body {
				t.Fatalf("connection %d: GET /file: %s, %d bytes, %v", i, resp.Status, len(got), err)
			}
		}
	})
}
