// Command xcaddy-build builds a Caddy binary with the plugins listed in the
// repository's xcaddy.json manifest, using xcaddy's Go package.
//
// The manifest is an xcaddy Builder in its own JSON form (caddy_version,
// plugins, replacements, ...). Local replacement paths in it are relative to
// the manifest's directory. Before building, the versions in the manifest are
// checked against go.mod so the binary is built from the same versions that
// the module is tested with.
//
// Usage, from the repository root:
//
//	go run ./examples/xcaddy-build -o /tmp/caddy
//	go run ./examples/xcaddy-build -check
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/caddyserver/xcaddy"
	"golang.org/x/mod/modfile"
)

// caddyModule is the module path of Caddy v2 as required in go.mod.
const caddyModule = "github.com/caddyserver/caddy/v2"

func main() {
	manifest := flag.String("manifest", "xcaddy.json", "xcaddy Builder JSON manifest")
	goMod := flag.String("gomod", "", "go.mod to check the manifest against (default: go.mod beside the manifest)")
	output := flag.String("o", "caddy", "path of the Caddy binary to write")
	checkOnly := flag.Bool("check", false, "only check the manifest against go.mod; do not build")
	flag.Parse()

	if *goMod == "" {
		*goMod = filepath.Join(filepath.Dir(*manifest), "go.mod")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := run(ctx, *manifest, *goMod, *output, *checkOnly)
	stop()
	if err != nil {
		log.Fatal(err)
	}
}

// run loads the manifest, checks it against go.mod and, unless checkOnly is
// set, builds Caddy to output.
func run(ctx context.Context, manifestPath, goModPath, output string, checkOnly bool) error {
	b, err := loadManifest(manifestPath)
	if err != nil {
		return err
	}
	mf, err := loadGoMod(goModPath)
	if err != nil {
		return err
	}
	if err := checkDrift(b, mf); err != nil {
		return fmt.Errorf("%s does not match %s:\n%w", manifestPath, goModPath, err)
	}
	if checkOnly {
		log.Printf("%s matches %s", manifestPath, goModPath)
		return nil
	}
	if err := isolateLocalModules(ctx, b); err != nil {
		return err
	}
	if err := b.Build(ctx, output); err != nil {
		return fmt.Errorf("building caddy: %w", err)
	}
	return nil
}

// loadManifest reads an xcaddy Builder from a JSON file and makes its local
// replacement paths absolute, relative to the file's directory, because
// xcaddy builds in a temporary directory.
func loadManifest(path string) (xcaddy.Builder, error) {
	var b xcaddy.Builder
	data, err := os.ReadFile(path)
	if err != nil {
		return b, fmt.Errorf("reading manifest: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return b, fmt.Errorf("parsing manifest %s: %w", path, err)
	}

	base, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return b, fmt.Errorf("resolving manifest directory: %w", err)
	}
	for i, r := range b.Replacements {
		dir := r.New.String()
		if modfile.IsDirectoryPath(dir) && !filepath.IsAbs(dir) {
			b.Replacements[i].New = xcaddy.ReplacementPath(filepath.Join(base, dir))
		}
	}
	return b, nil
}

// isolateLocalModules adds the modules that b replaces with a local
// directory to GONOPROXY, and turns version control off for them in GOVCS.
// xcaddy's final "go get" resolves the plugin's import before the module is
// required; without this, go asks the module proxy about the unpublished
// module, and any answer other than 404/410 (such as 403) fails the build
// instead of falling back to the replace directive. The go commands that
// xcaddy runs inherit this process's environment.
func isolateLocalModules(ctx context.Context, b xcaddy.Builder) error {
	var noProxy, vcs []string
	for _, r := range b.Replacements {
		if modfile.IsDirectoryPath(r.New.String()) {
			mod, _, _ := strings.Cut(r.Old.String(), "@")
			noProxy = append(noProxy, mod)
			vcs = append(vcs, mod+":off")
		}
	}
	if len(noProxy) == 0 {
		return nil
	}

	// Keep the settings already in force, including those from "go env -w".
	out, err := exec.CommandContext(ctx, "go", "env", "GONOPROXY", "GOVCS").Output()
	if err != nil {
		return fmt.Errorf("reading go env: %w", err)
	}
	current := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
	if len(current) != 2 {
		return fmt.Errorf("unexpected go env output %q", out)
	}
	for i, kv := range []struct {
		key   string
		value []string
	}{{"GONOPROXY", noProxy}, {"GOVCS", vcs}} {
		if current[i] != "" {
			kv.value = append(kv.value, current[i])
		}
		if err := os.Setenv(kv.key, strings.Join(kv.value, ",")); err != nil {
			return fmt.Errorf("setting %s: %w", kv.key, err)
		}
	}
	return nil
}

// loadGoMod parses the go.mod file at path.
func loadGoMod(path string) (*modfile.File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading go.mod: %w", err)
	}
	mf, err := modfile.Parse(path, data, nil)
	if err != nil {
		return nil, fmt.Errorf("parsing go.mod: %w", err)
	}
	return mf, nil
}

// checkDrift reports every version in b that differs from the version that
// mf requires: the Caddy version, each plugin's version and the version of
// each module replaced by another module version. A plugin without a version
// must live in a module that is replaced with a local directory.
func checkDrift(b xcaddy.Builder, mf *modfile.File) error {
	required := make(map[string]string, len(mf.Require))
	for _, r := range mf.Require {
		required[r.Mod.Path] = r.Mod.Version
	}

	// Modules replaced by a local directory (such as this repository).
	local := make(map[string]bool)
	for _, r := range b.Replacements {
		if modfile.IsDirectoryPath(r.New.String()) {
			old, _, _ := strings.Cut(r.Old.String(), "@")
			local[old] = true
		}
	}

	var errs []error
	switch want := required[caddyModule]; {
	case want == "":
		errs = append(errs, fmt.Errorf("go.mod does not require %s", caddyModule))
	case b.CaddyVersion != want:
		errs = append(errs, fmt.Errorf("caddy_version is %q, go.mod requires %s %s", b.CaddyVersion, caddyModule, want))
	}

	for _, p := range b.Plugins {
		mod := moduleOf(p.PackagePath, required, local)
		switch {
		case local[mod]:
			// Built from the local directory; go.mod has no version for it.
		case mod == "":
			errs = append(errs, fmt.Errorf("plugin %s: no module in go.mod provides it", p.PackagePath))
		case p.Version == "":
			errs = append(errs, fmt.Errorf("plugin %s has no version, go.mod requires %s %s", p.PackagePath, mod, required[mod]))
		case p.Version != required[mod]:
			errs = append(errs, fmt.Errorf("plugin %s is at %s, go.mod requires %s %s", p.PackagePath, p.Version, mod, required[mod]))
		}
	}

	for _, r := range b.Replacements {
		newPath, version, ok := strings.Cut(r.New.String(), "@")
		if !ok || modfile.IsDirectoryPath(newPath) {
			continue
		}
		if want, found := required[newPath]; found && version != want {
			errs = append(errs, fmt.Errorf("replacement %s => %s, go.mod requires %s %s", r.Old, r.New, newPath, want))
		}
	}
	return errors.Join(errs...)
}

// moduleOf returns the longest module path in required or local that
// contains the package pkg, or "" if there is none.
func moduleOf(pkg string, required map[string]string, local map[string]bool) string {
	best := ""
	consider := func(mod string) {
		if (pkg == mod || strings.HasPrefix(pkg, mod+"/")) && len(mod) > len(best) {
			best = mod
		}
	}
	for mod := range required {
		consider(mod)
	}
	for mod := range local {
		consider(mod)
	}
	return best
}
