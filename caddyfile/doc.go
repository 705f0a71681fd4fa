// Package caddyfile holds the golden Caddyfile adapt tests of the stabilize
// handler: testdata/*.caddyfiletest, each a Caddyfile, a line of ten dashes,
// and one of: the JSON the caddyfile adapter must produce (which must also
// validate); `error: ` and a substring of the parse error adapting must
// fail with (err_*); or `invalid: ` and a substring of the Provision error
// that validating the adapted config, as Caddy does, must fail with
// (invalid_*). Run `go test ./caddyfile/ -update` to rewrite the
// expectations from the adapter's and Provision's output.
package caddyfile
