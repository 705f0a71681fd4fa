package stabilize

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestCaddyfileProvision checks that what UnmarshalCaddyfile produces,
// through its JSON encoding, provisions into the intended handler. The
// golden adapt tests in ../caddyfile cover the syntax and every error.
func TestCaddyfileProvision(t *testing.T) {
	input := `stabilize 127.0.0.1:6001 {
		upstream udp4/127.0.0.1:6002 {
			weight 3
		}
		per packet
		lb_policy random_choose 3
	}`
	var parsed Handler
	if err := parsed.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(&parsed)
	if err != nil {
		t.Fatal(err)
	}
	var h Handler
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("provisioning %s: %v", raw, err)
	}
	defer h.Cleanup()

	if _, ok := h.router.(perPacketRouter); !ok {
		t.Error("per packet: handler is per flow")
	}
	sel, ok := h.selector.(*RandomChoiceSelection)
	if !ok || sel.Choose != 3 {
		t.Errorf("selector = %#v, want random_choose with 3 choices", h.selector)
	}
	if len(h.Upstreams) != 2 {
		t.Fatalf("got %d upstreams, want 2", len(h.Upstreams))
	}
	for i, want := range []struct {
		dial, addr string
		weight     int
	}{
		{"udp/127.0.0.1:6001", "127.0.0.1:6001", 1},
		{"udp4/127.0.0.1:6002", "127.0.0.1:6002", 3},
	} {
		u := h.Upstreams[i]
		if u.Dial != want.dial || u.Addr().String() != want.addr || u.Weight != want.weight {
			t.Errorf("upstream %d = %q %s weight %d, want %q %s weight %d", i, u.Dial, u.Addr(), u.Weight, want.dial, want.addr, want.weight)
		}
	}
}

// TestCaddyfileOptionREADME checks that README.md shows the syntax that the
// table of options generates, and documents every option in its table of
// options.
func TestCaddyfileOptionREADME(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(readme)
	if syntax := caddyfileSyntax(false); !strings.Contains(text, "```caddyfile\n"+syntax+"```\n") {
		t.Errorf("README.md lacks the Caddyfile syntax block:\n%s", syntax)
	}
	for _, o := range caddyfileOptions {
		if !strings.Contains(text, "\n| `"+o.name) && !strings.Contains(text, ", `"+o.name) && !strings.Contains(text, "/ `"+o.name) {
			t.Errorf("README.md's table of options does not document %s", o.name)
		}
	}
}

// TestCaddyfileOptionGolden checks that every option of the table has a
// golden test that adapts it and, if it takes arguments, one that leaves
// them out.
func TestCaddyfileOptionGolden(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "caddyfile", "testdata", "ok_*.caddyfiletest"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden tests: %v", err)
	}
	used := make(map[string]bool)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.Lines(string(data)) {
			if name, _, _ := strings.Cut(strings.TrimSpace(line), " "); name != "" {
				used[name] = true
			}
		}
	}
	for _, o := range caddyfileOptions {
		if !used[o.name] {
			t.Errorf("option %s has no ok_*.caddyfiletest", o.name)
		}
		missing := filepath.Join("..", "caddyfile", "testdata", "err_missing_"+o.name+".caddyfiletest")
		if _, err := os.Stat(missing); o.args != "" && err != nil {
			t.Errorf("option %s has no golden test without its argument: %v", o.name, err)
		}
	}
}

// TestCaddyfileOptionParseOnly checks that the parser leaves values to
// Provision: out-of-range values parse, and Provision rejects them naming
// the field and the value.
func TestCaddyfileOptionParseOnly(t *testing.T) {
	var h Handler
	input := `stabilize tcp/127.0.0.1:80 {
		per stream
		max_flows -5
	}`
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		t.Fatalf("parsing: %v", err)
	}
	if h.Per != "stream" || h.MaxFlows != -5 || h.Upstreams[0].Dial != "tcp/127.0.0.1:80" {
		t.Errorf("parsed per %q, max_flows %d, upstreams %v: want the values as written", h.Per, h.MaxFlows, h.Upstreams)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	err := h.Provision(ctx)
	if err == nil || !strings.Contains(err.Error(), `per "stream"`) {
		t.Errorf("Provision: %v, want the per error", err)
	}
}
