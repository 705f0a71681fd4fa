// Command caddy is a plain Caddy main with the standard modules, all of
// caddy-l4's modules and the stabilize load balancer
// (layer4.handlers.stabilize) plugged in, like the binary xcaddy builds
// from xcaddy.json.
//
// Usage, from the repository root:
//
//	go run ./examples/caddy list-modules
//	go run ./examples/caddy run --config caddy.json
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// Plug in Caddy's standard modules, the layer4 app with all of
	// caddy-l4's modules, and this repository's plugin.
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"
	_ "github.com/stabilize-lb/caddy-stabilize/stabilize"
)

func main() {
	caddycmd.Main()
}
