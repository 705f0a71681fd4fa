package caddyfile_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	// The layer4 app and its global Caddyfile option, and the handler.
	_ "github.com/mholt/caddy-l4/layer4"
	_ "github.com/stabilize-lb/caddy-stabilize/stabilize"
)

var update = flag.Bool("update", false, "rewrite the golden expectations from the adapter's output")

// separator splits a test file into its Caddyfile and its expectation.
const separator = "----------"

// errorPrefix starts an expectation that adapting fails: the parser
// rejects the syntax.
const errorPrefix = "error: "

// invalidPrefix starts an expectation that adapting succeeds but the
// adapted config does not validate: the handler's Provision rejects a value.
const invalidPrefix = "invalid: "

// globalOptionPrefix is how httpcaddyfile wraps a global option's error:
// layer4's, around the handler's, or the stabilize app's.
var globalOptionPrefix = regexp.MustCompile(`^parsing caddyfile tokens for '(layer4|stabilize)': `)

// provisionPrefix ends how Caddy wraps the Provision error of the handler
// or of the stabilize app.
var provisionPrefix = regexp.MustCompile(`provision (layer4\.handlers\.stabilize|stabilize): `)

// adapt runs the caddyfile adapter on body.
func adapt(t *testing.T, body []byte) ([]byte, error) {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("no caddyfile adapter registered")
	}
	out, warnings, err := adapter.Adapt(body, map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return nil, err
	}
	for _, w := range warnings {
		t.Errorf("adapter warning: %s", w.String())
	}
	return out, nil
}

// errorShape is what every parse error must look like: it comes from the
// handler, and carries the Caddyfile's file and line.
var errorShape = regexp.MustCompile(`^stabilize: .+, at Caddyfile:\d+$`)

// invalidShape is what every Provision error must look like: it starts with
// the JSON field and names the value, quoted or as a number, or says what
// is required.
var invalidShape = regexp.MustCompile(`^[a-z_]+(\[\d+\])?(\.[a-z_]+)*[: ].*(["\d]|required)`)

func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.caddyfiletest"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/*.caddyfiletest files")
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".caddyfiletest"), func(t *testing.T) {
			testAdaptFile(t, file)
		})
	}
}

func testAdaptFile(t *testing.T, file string) {
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(data), "\r\n", "\n")
	before, after, found := strings.Cut(text, "\n"+separator+"\n")
	if !found {
		t.Fatalf("%s: no %q separator line", file, separator)
	}
	caddyfileText := strings.TrimSpace(before) + "\n"
	want := strings.TrimSpace(after)

	out, adaptErr := adapt(t, []byte(caddyfileText))

	if expectErr, isErr := strings.CutPrefix(want, errorPrefix); isErr {
		if adaptErr == nil {
			t.Fatalf("adapted without error, want error containing %q; got:\n%s", expectErr, out)
		}
		got := globalOptionPrefix.ReplaceAllString(adaptErr.Error(), "")
		if *update {
			if !errorShape.MatchString(got) {
				t.Errorf("error %q does not come from the handler with a file and line", got)
			}
			rewrite(t, file, caddyfileText, errorPrefix+got)
			return
		}
		if !errorShape.MatchString(expectErr) {
			t.Errorf("expected error %q must start with %q and end with the file and line", expectErr, "stabilize: ")
		}
		// An error names the offending value in quotes, or says what is
		// missing.
		if !strings.Contains(expectErr, `"`) && !strings.Contains(expectErr, "missing") {
			t.Errorf("expected error %q names no value", expectErr)
		}
		if !strings.Contains(got, expectErr) {
			t.Errorf("wrong error\n got: %s\nwant: %s", got, expectErr)
		}
		return
	}

	if adaptErr != nil {
		t.Fatalf("adapting: %v", adaptErr)
	}

	// The adapted config must load as Caddy would load it: provision the
	// layer4 app and the handler (this resolves the upstreams) without
	// starting it.
	validErr := caddy.Validate(mustConfig(t, out))

	if expectErr, isInvalid := strings.CutPrefix(want, invalidPrefix); isInvalid {
		if validErr == nil {
			t.Fatalf("validated without error, want error containing %q; adapted:\n%s", expectErr, out)
		}
		loc := provisionPrefix.FindStringIndex(validErr.Error())
		if loc == nil {
			t.Fatalf("error %q does not come from a Provision of stabilize's", validErr)
		}
		got := validErr.Error()[loc[1]:]
		if *update {
			rewrite(t, file, caddyfileText, invalidPrefix+got)
			expectErr = got
		}
		if !invalidShape.MatchString(expectErr) {
			t.Errorf("expected error %q must start with the field and name the value", expectErr)
		}
		if !strings.Contains(got, expectErr) {
			t.Errorf("wrong error\n got: %s\nwant: %s", got, expectErr)
		}
		return
	}

	var indented bytes.Buffer
	if err := json.Indent(&indented, out, "", "\t"); err != nil {
		t.Fatalf("indenting adapted JSON: %v", err)
	}
	got := indented.String()
	if got != want {
		if *update {
			rewrite(t, file, caddyfileText, got)
		} else {
			t.Errorf("adapted JSON differs (run with -update to accept)\n got:\n%s\nwant:\n%s", got, want)
		}
	}
	if validErr != nil {
		t.Errorf("adapted config does not validate: %v", validErr)
	}
}

func rewrite(t *testing.T, file, caddyfileText, expectation string) {
	t.Helper()
	content := caddyfileText + separator + "\n" + expectation + "\n"
	if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("updated %s", file)
}

func mustConfig(t *testing.T, raw []byte) *caddy.Config {
	t.Helper()
	cfg := new(caddy.Config)
	if err := json.Unmarshal(raw, cfg); err != nil {
		t.Fatalf("decoding config: %v", err)
	}
	return cfg
}

// TestCaddyfileAdaptExamples checks that the documented examples agree:
// examples/Caddyfile must adapt to the layer4 app of examples/stabilize.json.
func TestCaddyfileAdaptExamples(t *testing.T) {
	caddyfileText, err := os.ReadFile(filepath.Join("..", "examples", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	jsonText, err := os.ReadFile(filepath.Join("..", "examples", "stabilize.json"))
	if err != nil {
		t.Fatal(err)
	}

	out, err := adapt(t, caddyfileText)
	if err != nil {
		t.Fatalf("adapting examples/Caddyfile: %v", err)
	}

	got := layer4App(t, "examples/Caddyfile (adapted)", out)
	want := layer4App(t, "examples/stabilize.json", jsonText)
	if !reflect.DeepEqual(got, want) {
		g, _ := json.MarshalIndent(got, "", "\t")
		w, _ := json.MarshalIndent(want, "", "\t")
		t.Errorf("examples/Caddyfile adapts to a different layer4 app than examples/stabilize.json has\nCaddyfile:\n%s\nstabilize.json:\n%s", g, w)
	}

	var doc struct {
		Admin struct {
			Listen string `json:"listen"`
		} `json:"admin"`
	}
	if err := json.Unmarshal(jsonText, &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Admin.Listen != "localhost:2019" {
		t.Errorf("examples/stabilize.json: admin.listen = %q, want localhost:2019", doc.Admin.Listen)
	}

	if err := caddy.Validate(mustConfig(t, jsonText)); err != nil {
		t.Errorf("examples/stabilize.json does not validate: %v", err)
	}
}

// layer4App decodes the apps.layer4 object of a config, generically.
func layer4App(t *testing.T, name string, raw []byte) any {
	t.Helper()
	var doc struct {
		Apps map[string]any `json:"apps"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	app, ok := doc.Apps["layer4"]
	if !ok {
		t.Fatalf("%s: no apps.layer4", name)
	}
	return app
}
