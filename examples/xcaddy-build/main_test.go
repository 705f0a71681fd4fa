package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/xcaddy"
	"golang.org/x/mod/modfile"
)

// TestManifestMatchesGoMod fails when the repository's xcaddy.json drifts
// from its go.mod.
func TestManifestMatchesGoMod(t *testing.T) {
	b, err := loadManifest("../../xcaddy.json")
	if err != nil {
		t.Fatal(err)
	}
	mf, err := loadGoMod("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	if err := checkDrift(b, mf); err != nil {
		t.Fatalf("xcaddy.json drifted from go.mod:\n%v", err)
	}

	// The plugin must be built from this checkout, not fetched.
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	var replaced bool
	for _, r := range b.Replacements {
		if r.Old.String() == mf.Module.Mod.Path && r.New.String() == root {
			replaced = true
		}
	}
	if !replaced {
		t.Errorf("xcaddy.json does not replace %s with the repository root %s", mf.Module.Mod.Path, root)
	}
}

const testGoMod = `module example.com/plugin

go 1.26.0

require (
	github.com/caddyserver/caddy/v2 v2.11.9
	github.com/mholt/caddy-l4 v0.1.2
	github.com/quic-go/quic-go v0.64.1
)
`

// testBuilder returns a manifest that matches testGoMod.
func testBuilder() xcaddy.Builder {
	return xcaddy.Builder{
		CaddyVersion: "v2.11.9",
		Plugins: []xcaddy.Dependency{
			{PackagePath: "github.com/mholt/caddy-l4", Version: "v0.1.2"},
			{PackagePath: "example.com/plugin/sub"},
		},
		Replacements: []xcaddy.Replace{
			xcaddy.NewReplace("example.com/plugin", "/src/plugin"),
			xcaddy.NewReplace("github.com/quic-go/quic-go", "github.com/quic-go/quic-go@v0.64.1"),
		},
	}
}

func TestCheckDrift(t *testing.T) {
	mf, err := modfile.Parse("go.mod", []byte(testGoMod), nil)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		modify  func(*xcaddy.Builder)
		wantErr string // "" means no drift
	}{
		{"matching", func(*xcaddy.Builder) {}, ""},
		{"caddy drift", func(b *xcaddy.Builder) { b.CaddyVersion = "v2.11.8" }, "caddy_version"},
		{"caddy unpinned", func(b *xcaddy.Builder) { b.CaddyVersion = "" }, "caddy_version"},
		{"plugin drift", func(b *xcaddy.Builder) { b.Plugins[0].Version = "v0.1.1" }, "github.com/mholt/caddy-l4 is at v0.1.1"},
		{"plugin subpackage drift", func(b *xcaddy.Builder) {
			b.Plugins[0] = xcaddy.Dependency{PackagePath: "github.com/mholt/caddy-l4/modules/l4proxy", Version: "v0.2.0"}
		}, "go.mod requires github.com/mholt/caddy-l4 v0.1.2"},
		{"plugin unpinned", func(b *xcaddy.Builder) { b.Plugins[0].Version = "" }, "has no version"},
		{"plugin unknown", func(b *xcaddy.Builder) {
			b.Plugins = append(b.Plugins, xcaddy.Dependency{PackagePath: "example.org/other", Version: "v1.0.0"})
		}, "no module in go.mod provides it"},
		{"local plugin not replaced", func(b *xcaddy.Builder) { b.Replacements = b.Replacements[1:] }, "example.com/plugin/sub"},
		{"quic-go drift", func(b *xcaddy.Builder) {
			b.Replacements[1] = xcaddy.NewReplace("github.com/quic-go/quic-go", "github.com/quic-go/quic-go@v0.65.0")
		}, "go.mod requires github.com/quic-go/quic-go v0.64.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := testBuilder()
			tt.modify(&b)
			err := checkDrift(b, mf)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("unexpected drift: %v", err)
			case tt.wantErr != "" && err == nil:
				t.Fatalf("drift not detected, want error containing %q", tt.wantErr)
			case tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("error %q does not contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestLoadManifestResolvesLocalPaths(t *testing.T) {
	b, err := loadManifest("../../xcaddy.json")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range b.Replacements {
		if p := r.New.String(); modfile.IsDirectoryPath(p) && !filepath.IsAbs(p) {
			t.Errorf("replacement %s => %s is not absolute", r.Old, p)
		}
	}
}
