package stabilize

import (
	"context"
	"fmt"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

func init() {
	caddy.RegisterModule(App{})
	httpcaddyfile.RegisterGlobalOption("stabilize", parseAppCaddyfile)
}

// App is the stabilize app, `apps.stabilize`: settings of the `fastudp`
// network, which belong to a listen address rather than to one handler.
// It is optional; without it every setting has its default.
type App struct {
	// FastUDPReaders is how many sockets, each with its own reader, every
	// `fastudp/` address opens on the same port (SO_REUSEPORT): the kernel
	// spreads clients over them by a hash of their address and port, so
	// each client stays on one. More readers use more CPUs for the
	// datagrams of established flows. 1 to 64; default 1, which measures
	// best on two CPUs. Linux only; elsewhere 1. A reload that changes it
	// adds or closes readers of open addresses, and their flows go on; a
	// config that fails to start leaves the running one's readers.
	FastUDPReaders int `json:"fastudp_readers,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "stabilize",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision checks the settings.
func (a *App) Provision(ctx caddy.Context) error {
	if a.FastUDPReaders < 0 || a.FastUDPReaders > fastudp.MaxReaders {
		return fmt.Errorf("fastudp_readers %d: want 1 to %d, or 0 for the default", a.FastUDPReaders, fastudp.MaxReaders)
	}
	if a.FastUDPReaders > 1 && !udpio.HasReusePort {
		ctx.Logger().Warn("fastudp_readers applies on Linux only: each fastudp address has one reader",
			zap.Int("fastudp_readers", a.FastUDPReaders))
	}
	return nil
}

// Start does nothing: fastudp addresses read the settings when they open.
func (*App) Start() error { return nil }

// Stop does nothing.
func (*App) Stop() error { return nil }

// fastUDPReaders is the reader count for fastudp addresses opened with
// ctx: the stabilize app's, or 1.
func fastUDPReaders(ctx context.Context) int {
	cctx, ok := ctx.(caddy.Context)
	if !ok {
		return 1
	}
	app, err := cctx.AppIfConfigured("stabilize")
	if err != nil {
		return 1
	}
	return max(app.(*App).FastUDPReaders, 1)
}

// parseAppCaddyfile parses the stabilize global option:
//
//	stabilize {
//		fastudp_readers <n>
//	}
func parseAppCaddyfile(d *caddyfile.Dispenser, _ any) (any, error) {
	a := new(App)
	d.Next() // the option's name
	if d.NextArg() {
		return nil, d.Errf("stabilize: unexpected argument %q", d.Val())
	}
	seen := make(map[string]int) // line of each option
	for d.NextBlock(0) {
		name := d.Val()
		if line, ok := seen[name]; ok {
			return nil, d.Errf("stabilize: duplicate option %q (first set on line %d)", name, line)
		}
		seen[name] = d.Line()
		switch name {
		case "fastudp_readers":
			args := d.RemainingArgs()
			if len(args) != 1 {
				return nil, d.Errf("stabilize: fastudp_readers %q: want one number", args)
			}
			n, err := strconv.Atoi(args[0])
			if err != nil {
				return nil, d.Errf("stabilize: fastudp_readers: invalid integer %q", args[0])
			}
			a.FastUDPReaders = n
		default:
			return nil, d.Errf("stabilize: unknown option %q", name)
		}
	}
	return httpcaddyfile.App{Name: "stabilize", Value: caddyconfig.JSON(a, nil)}, nil
}

// Interface guards
var (
	_ caddy.App         = (*App)(nil)
	_ caddy.Provisioner = (*App)(nil)
)
