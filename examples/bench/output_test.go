//go:build linux

package main

import (
	"encoding/xml"
	"os"
	"path/filepath"
	"testing"
)

// TestRenderDir redraws the committed results: the Markdown must come out
// as committed, and the SVG well-formed.
func TestRenderDir(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"results.json", "sweep.json"} {
		b, err := os.ReadFile(filepath.Join("results", name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := renderDir(dir); err != nil {
		t.Fatal(err)
	}
	for _, base := range []string{"results", "sweep"} {
		got, err := os.ReadFile(filepath.Join(dir, base+".md"))
		if err != nil {
			t.Fatal(err)
		}
		want, err := os.ReadFile(filepath.Join("results", base+".md"))
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Errorf("%s.md rendered from JSON differs from results/%s.md:\n%s", base, base, got)
		}
		svg, err := os.ReadFile(filepath.Join(dir, base+".svg"))
		if err != nil {
			t.Fatal(err)
		}
		if err := xml.Unmarshal(svg, new(struct{})); err != nil {
			t.Errorf("%s.svg: %v", base, err)
		}
	}
	if err := renderDir(t.TempDir()); err == nil {
		t.Error("an empty folder: want an error")
	}
}
