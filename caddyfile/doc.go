// Package caddyfile holds the golden Caddyfile adapt tests of the stabilize
// handler: testdata/*.caddyfiletest, each a Caddyfile, a line of ten dashes,
// and either the JSON the caddyfile adapter must produce or `error: ` and a
// substring of the error it must fail with. Run `go test ./caddyfile/
// -update` to rewrite the expectations from the adapter's output.
package caddyfile
