package stabilize

import (
	"encoding/hex"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/dustin/go-humanize"
)

// UnmarshalCaddyfile sets up the Handler from Caddyfile tokens, inside a
// route of the layer4 global option. Syntax:
//
//	stabilize [<upstreams...>] {
//		# upstreams (at least one, from any of the three forms)
//		to <upstreams...>
//		upstream <address> [{
//			weight <n>
//		}]
//
//		# load balancing
//		per packet|flow
//		lb_policy round_robin|weighted_round_robin|random|least_sessions|first|random_choose [<n>]|maglev [<key>]
//
//		# active health checks
//		health_send <text>
//		health_send_hex <hex>
//		health_expect <regexp>
//		health_expect_exact <text>
//		health_expect_prefix <text>
//		health_interval <duration>
//		health_timeout <duration>
//		health_passes <n>
//		health_fails <n>
//		health_port <port>
//
//		# passive health checks
//		reply_timeout <duration>
//		max_fails <n>
//		fail_duration <duration>
//
//		drop_when_all_down
//
//		proxy_protocol v2
//		read_buffer <size>
//		write_buffer <size>
//	}
//
// An upstream address is `udp/host:port`, `udp4/host:port`,
// `udp6/host:port` or a plain `host:port`, which is UDP and is written to
// the JSON config as `udp/host:port`. It must name one host and one port;
// any other network (such as `tcp/`) is an error. Every upstream may be
// listed once. `upstream` takes one address and an optional block; its
// `weight` (for weighted_round_robin) is a positive integer, default 1.
//
// `per` maps to `per`; `lb_policy` to `load_balancing.selection` (policy
// arguments: random_choose's number of upstreams to sample, at least 2, and
// maglev's key placeholder); the health_* options to `health_checks.active`
// (send, send_hex, expect, expect_exact, expect_prefix, interval, timeout,
// passes, fails, port); reply_timeout, max_fails and fail_duration to
// `health_checks.passive`; drop_when_all_down to
// `health_checks.drop_when_all_down`. health_send and health_send_hex are
// mutually exclusive. Durations use Caddy's duration syntax (such as 500ms,
// 5s, 1m) and must be positive; counts must be positive integers.
// read_buffer and write_buffer are byte sizes such as 4194304, 4MiB or 4MB.
//
// Every option but to and upstream may be given once. Errors name the
// option and the offending value, and carry the Caddyfile's file and line.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the handler name

	p := &caddyfileParser{
		h:     h,
		d:     d,
		seen:  make(map[string]int),
		dials: make(map[string]bool),
	}

	// Same-line arguments are upstream addresses.
	for d.NextArg() {
		if err := p.addUpstream("", d.Val(), 0); err != nil {
			return err
		}
	}

	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if err := p.option(option); err != nil {
			return err
		}
		// upstream and lb_policy consume their own blocks; no other
		// option has one.
		if option != "upstream" && option != "lb_policy" && d.NextBlock(nesting+1) {
			return d.Errf("stabilize: %s: unexpected block starting with %q: only upstream takes a block", option, d.Val())
		}
	}

	if len(h.Upstreams) == 0 {
		return d.Errf("stabilize: missing upstreams: list them after stabilize, or add them with to or upstream")
	}
	return nil
}

// caddyfileParser holds the state of parsing one stabilize block.
type caddyfileParser struct {
	h     *Handler
	d     *caddyfile.Dispenser
	seen  map[string]int  // single-valued option -> line first set
	dials map[string]bool // normalised upstream addresses so far
}

// once fails if the single-valued option was already set.
func (p *caddyfileParser) once(option string) error {
	if line, dup := p.seen[option]; dup {
		return p.d.Errf("stabilize: duplicate option %q (first set on line %d)", option, line)
	}
	p.seen[option] = p.d.Line()
	return nil
}

// arg reads the one argument of option; usage describes it in errors.
func (p *caddyfileParser) arg(option, usage string) (string, error) {
	d := p.d
	if !d.NextArg() {
		return "", d.Errf("stabilize: %s: missing argument %s", option, usage)
	}
	val := d.Val()
	if d.NextArg() {
		return "", d.Errf("stabilize: %s: too many arguments: unexpected %q after %q", option, d.Val(), val)
	}
	return val, nil
}

// option parses one option of the stabilize block; the dispenser is on
// the option's name.
func (p *caddyfileParser) option(option string) error {
	d, h := p.d, p.h
	switch option {
	case "to":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.Errf("stabilize: to: missing argument <upstreams...>")
		}
		for _, a := range args {
			if err := p.addUpstream("to", a, 0); err != nil {
				return err
			}
		}
		return nil

	case "upstream":
		return p.parseUpstream()

	case "lb_policy":
		if err := p.once(option); err != nil {
			return err
		}
		return p.parsePolicy()

	case "drop_when_all_down":
		if err := p.once(option); err != nil {
			return err
		}
		if d.NextArg() {
			return d.Errf("stabilize: drop_when_all_down: takes no arguments, got %q", d.Val())
		}
		p.healthChecks().DropWhenAllDown = true
		return nil
	}

	// The rest take exactly one argument.
	usage, known := singleArgUsage[option]
	if !known {
		return d.Errf("stabilize: unknown option %q", option)
	}
	if err := p.once(option); err != nil {
		return err
	}
	val, err := p.arg(option, usage)
	if err != nil {
		return err
	}

	switch option {
	case "per":
		switch val {
		case PerPacket, PerFlow:
			h.Per = val
		default:
			return d.Errf("stabilize: per: invalid value %q: must be %q or %q", val, PerPacket, PerFlow)
		}

	case "proxy_protocol":
		switch val {
		case "v2":
			h.ProxyProtocol = val
		case "v1":
			return d.Errf("stabilize: proxy_protocol: version %q is not supported: v1 is TCP-only; use v2, the only version that carries UDP", val)
		default:
			return d.Errf("stabilize: proxy_protocol: unknown version %q: must be v2", val)
		}

	case "read_buffer", "write_buffer":
		size, err := p.byteSize(option, val)
		if err != nil {
			return err
		}
		if option == "read_buffer" {
			h.ReadBuffer = size
		} else {
			h.WriteBuffer = size
		}

	case "health_send":
		if line, both := p.seen["health_send_hex"]; both {
			return d.Errf("stabilize: health_send %q: cannot be combined with health_send_hex (line %d): use one", val, line)
		}
		p.active().Send = val

	case "health_send_hex":
		if line, both := p.seen["health_send"]; both {
			return d.Errf("stabilize: health_send_hex %q: cannot be combined with health_send (line %d): use one", val, line)
		}
		if _, err := hex.DecodeString(val); err != nil {
			return d.Errf("stabilize: health_send_hex: invalid hex %q: %v", val, err)
		}
		p.active().SendHex = val

	case "health_expect":
		if _, err := regexp.Compile(val); err != nil {
			return d.Errf("stabilize: health_expect: invalid regexp %q: %v", val, err)
		}
		p.active().Expect = val

	case "health_expect_exact":
		p.active().ExpectExact = val

	case "health_expect_prefix":
		p.active().ExpectPrefix = val

	case "health_interval", "health_timeout", "reply_timeout", "fail_duration":
		dur, err := p.duration(option, val)
		if err != nil {
			return err
		}
		switch option {
		case "health_interval":
			p.active().Interval = dur
		case "health_timeout":
			p.active().Timeout = dur
		case "reply_timeout":
			p.passive().ReplyTimeout = dur
		case "fail_duration":
			p.passive().FailDuration = dur
		}

	case "health_passes", "health_fails", "max_fails":
		n, err := strconv.Atoi(val)
		if err != nil || n < 1 {
			return d.Errf("stabilize: %s: invalid count %q: must be a positive integer", option, val)
		}
		switch option {
		case "health_passes":
			p.active().Passes = n
		case "health_fails":
			p.active().Fails = n
		case "max_fails":
			p.passive().MaxFails = n
		}

	case "health_port":
		port, err := strconv.Atoi(val)
		if err != nil || port < 1 || port > math.MaxUint16 {
			return d.Errf("stabilize: health_port: invalid port %q: must be an integer from 1 to 65535", val)
		}
		p.active().Port = port
	}
	return nil
}

// singleArgUsage lists the options that take exactly one argument, with
// the argument's description for errors.
var singleArgUsage = map[string]string{
	"per":                  "packet|flow",
	"proxy_protocol":       "v2",
	"read_buffer":          "<size>",
	"write_buffer":         "<size>",
	"health_send":          "<text>",
	"health_send_hex":      "<hex>",
	"health_expect":        "<regexp>",
	"health_expect_exact":  "<text>",
	"health_expect_prefix": "<text>",
	"health_interval":      "<duration>",
	"health_timeout":       "<duration>",
	"health_passes":        "<n>",
	"health_fails":         "<n>",
	"health_port":          "<port>",
	"reply_timeout":        "<duration>",
	"max_fails":            "<n>",
	"fail_duration":        "<duration>",
}

// duration parses a positive Caddy duration.
func (p *caddyfileParser) duration(option, val string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(val)
	if err != nil {
		return 0, p.d.Errf("stabilize: %s: invalid duration %q: %v", option, val, err)
	}
	if dur <= 0 {
		return 0, p.d.Errf("stabilize: %s: invalid duration %q: must be positive", option, val)
	}
	return caddy.Duration(dur), nil
}

// byteSize parses a positive socket buffer size such as 4194304, 4MiB or
// 4MB.
func (p *caddyfileParser) byteSize(option, val string) (int, error) {
	size, err := humanize.ParseBytes(val)
	if err != nil {
		return 0, p.d.Errf("stabilize: %s: invalid size %q: %v", option, val, err)
	}
	if size == 0 || size > math.MaxInt32 {
		return 0, p.d.Errf("stabilize: %s: invalid size %q: must be from 1 byte to 2GiB", option, val)
	}
	return int(size), nil
}

// parseUpstream parses `upstream <address> [{ weight <n> }]`.
func (p *caddyfileParser) parseUpstream() error {
	d := p.d
	if !d.NextArg() {
		return d.Errf("stabilize: upstream: missing argument <address>")
	}
	addr := d.Val()
	if d.NextArg() {
		return d.Errf("stabilize: upstream: too many arguments: unexpected %q after %q (one address per upstream; use to for several)", d.Val(), addr)
	}
	weight := 0
	hasWeight := false
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		switch sub {
		case "weight":
			if hasWeight {
				return d.Errf("stabilize: upstream %q: duplicate option \"weight\"", addr)
			}
			hasWeight = true
			val, err := p.arg("weight", "<n>")
			if err != nil {
				return err
			}
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 || n > MaxWeight {
				return d.Errf("stabilize: weight: invalid weight %q: must be an integer from 1 to %d", val, MaxWeight)
			}
			weight = n
		default:
			return d.Errf("stabilize: upstream %q: unknown option %q", addr, sub)
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("stabilize: upstream %q: %s: unexpected block starting with %q", addr, sub, d.Val())
		}
	}
	return p.addUpstream("upstream", addr, weight)
}

// addUpstream validates addr and appends it to the handler's upstreams. A
// plain host:port is written as udp/host:port; a weight of 1 is left to
// the default.
func (p *caddyfileParser) addUpstream(option, addr string, weight int) error {
	d := p.d
	prefix := "stabilize: "
	if option != "" && option != "upstream" {
		prefix += option + ": "
	}
	if _, err := checkUpstreamAddr(addr); err != nil {
		return d.Errf("%s%v", prefix, err)
	}
	dial := addr
	if network, _, _, err := caddy.SplitNetworkAddress(addr); err == nil && network == "" {
		dial = "udp/" + addr
	}
	if p.dials[dial] {
		return d.Errf("%supstream %q is listed twice", prefix, addr)
	}
	p.dials[dial] = true
	if weight == 1 {
		weight = 0
	}
	p.h.Upstreams = append(p.h.Upstreams, &Upstream{Dial: dial, Weight: weight})
	return nil
}

// parsePolicy parses `lb_policy <name> [<args...>]`. The policy module
// parses its own arguments if it is a caddyfile.Unmarshaler; otherwise it
// takes none.
func (p *caddyfileParser) parsePolicy() error {
	d := p.d
	if !d.NextArg() {
		return d.Errf("stabilize: lb_policy: missing argument <policy> (one of %s)", strings.Join(caddyfilePolicyNames(), ", "))
	}
	name := d.Val()
	mod, err := caddy.GetModule(selectionPolicyNamespace + "." + name)
	if err != nil || name == "" || strings.Contains(name, ".") {
		return d.Errf("stabilize: lb_policy: unknown policy %q (known: %s)", name, strings.Join(caddyfilePolicyNames(), ", "))
	}

	segment := d.NextSegment() // the policy name, its arguments and any block
	check := caddyfile.NewDispenser(segment)
	check.Next()
	args := check.RemainingArgs()
	if check.Next() && check.Next() && check.Val() != "}" {
		return check.Errf("stabilize: lb_policy %s: unexpected block starting with %q: policies take no block", name, check.Val())
	}

	inst := mod.New()
	if unm, ok := inst.(caddyfile.Unmarshaler); ok {
		if err := unm.UnmarshalCaddyfile(caddyfile.NewDispenser(segment)); err != nil {
			if strings.HasPrefix(err.Error(), "lb_policy ") {
				return fmt.Errorf("stabilize: %w", err)
			}
			quoted := make([]string, len(args))
			for i, a := range args {
				quoted[i] = strconv.Quote(a)
			}
			return fmt.Errorf("stabilize: lb_policy %s: %w", strings.Join(append([]string{name}, quoted...), " "), err)
		}
	} else if len(args) > 0 {
		return d.Errf("stabilize: lb_policy %s: takes no arguments, got %q", name, args[0])
	}
	sel, ok := inst.(Selector)
	if !ok {
		return d.Errf("stabilize: lb_policy: module %q (%T) is not a stabilize Selector", mod.ID, inst)
	}

	if p.h.LoadBalancing == nil {
		p.h.LoadBalancing = new(LoadBalancing)
	}
	p.h.LoadBalancing.SelectionPolicyRaw = caddyconfig.JSONModuleObject(sel, "policy", name, nil)
	return nil
}

// caddyfilePolicyNames lists the registered selection policies.
func caddyfilePolicyNames() []string {
	var names []string
	for _, mi := range caddy.GetModules(selectionPolicyNamespace) {
		names = append(names, mi.ID.Name())
	}
	return names
}

func (p *caddyfileParser) healthChecks() *HealthChecks {
	if p.h.HealthChecks == nil {
		p.h.HealthChecks = new(HealthChecks)
	}
	return p.h.HealthChecks
}

func (p *caddyfileParser) active() *ActiveHealthChecks {
	hc := p.healthChecks()
	if hc.Active == nil {
		hc.Active = new(ActiveHealthChecks)
	}
	return hc.Active
}

func (p *caddyfileParser) passive() *PassiveHealthChecks {
	hc := p.healthChecks()
	if hc.Passive == nil {
		hc.Passive = new(PassiveHealthChecks)
	}
	return hc.Passive
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
