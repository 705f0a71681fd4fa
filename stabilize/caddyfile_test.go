package stabilize

import (
	"encoding/json"
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

// TestCaddyfileNoUpstreams checks that a handler without upstreams is
// rejected at parse time.
func TestCaddyfileNoUpstreams(t *testing.T) {
	var h Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("stabilize"))
	if err == nil || !strings.Contains(err.Error(), "stabilize: missing upstreams") {
		t.Fatalf("err = %v, want missing upstreams", err)
	}
}
