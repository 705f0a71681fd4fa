package stabilize

import (
	"fmt"
	"math"
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
//		<option> [<arguments...>]
//		...
//	}
//
// The options are those of the table caddyfileOptions, which
// caddyfileSyntax prints and README.md documents. Same-line arguments are
// upstreams, as for `to`; a plain host:port is written to the JSON config
// as udp/host:port.
//
// The parser checks syntax only: unknown and repeated options, argument
// counts, blocks, and that numbers, durations and sizes parse. Provision
// checks the values, naming the field and the value. A zero number,
// duration or size means the default, as it does in JSON. Parse errors
// name the option and the value, with the Caddyfile's file and line.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the handler name

	p := &caddyfileParser{h: h, d: d, seen: make(map[string]int)}
	if err := p.to(d.RemainingArgs()); err != nil {
		return err
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := p.option(nesting); err != nil {
			return err
		}
	}
	return nil
}

// caddyfileOption is one option of the stabilize block.
type caddyfileOption struct {
	group    string // starts a group of options in the syntax, with this comment
	name     string
	args     string   // the argument syntax; "" for none
	variadic bool     // takes one or more arguments, not exactly one
	block    []string // the syntax of its block's lines; nil for no block
	many     bool     // may be given more than once
	doc      string   // one line
	parse    func(p *caddyfileParser, args []string) error
}

// caddyfileOptions is the table of the stabilize block's options. It drives
// UnmarshalCaddyfile and caddyfileSyntax, and a test checks that README.md
// documents every option.
var caddyfileOptions = []caddyfileOption{
	{group: "upstreams: at least one, in any of the three forms", name: "to", args: "<upstreams...>", variadic: true, many: true,
		doc:   "UDP upstreams: udp/host:port, udp4/..., udp6/... or a plain host:port; quic/host:port with the quic block",
		parse: (*caddyfileParser).to},
	{name: "upstream", args: "<address>", block: []string{"weight <n>", "server_id <hex>"}, many: true,
		doc:   "one upstream, with an optional weight for weighted policies (1-10000, default 1) and QUIC-LB server ID",
		parse: (*caddyfileParser).upstream},

	{group: "load balancing", name: "per", args: "packet|flow|connection",
		doc:   "when the policy picks an upstream: for a flow's first datagram (default), for every datagram, or for each QUIC connection",
		parse: setText(func(h *Handler) *string { return &h.Per })},
	{name: "lb_policy", args: "<policy> [<arguments...>]", variadic: true,
		doc:   "the selection policy and its arguments (default round_robin)",
		parse: (*caddyfileParser).policy},
	{name: "quic_lb", block: []string{"config_id <0-6>", "server_id_length <n>", "nonce_length <n>", "key <hex>"}, many: true,
		doc:   "per connection: a QUIC-LB configuration the servers share; repeat for key rotation",
		parse: (*caddyfileParser).quicLB},

	{group: "limits", name: "max_flows", args: "<n>",
		doc:   "the most client flows at once; -1 for no limit (default: derived from the open-file limit)",
		parse: setInt(func(h *Handler) *int { return &h.MaxFlows })},
	{name: "max_flows_per_ip", args: "<n>",
		doc:   "the most client flows from one IP address (default 0, no limit)",
		parse: setInt(func(h *Handler) *int { return &h.MaxFlowsPerIP })},

	{group: "active health checks", name: "health_send", args: "<text>",
		doc:   "the active health check's probe datagram, as text (default: an empty datagram)",
		parse: setText(func(h *Handler) *string { return &activeOf(h).Send })},
	{name: "health_send_hex", args: "<hex>",
		doc:   "the probe datagram in hexadecimal, instead of health_send",
		parse: setText(func(h *Handler) *string { return &activeOf(h).SendHex })},
	{name: "health_expect", args: "<regexp>",
		doc:   "a regular expression the reply to the probe must match",
		parse: setText(func(h *Handler) *string { return &activeOf(h).Expect })},
	{name: "health_expect_exact", args: "<text>",
		doc:   "the exact reply expected",
		parse: setText(func(h *Handler) *string { return &activeOf(h).ExpectExact })},
	{name: "health_expect_prefix", args: "<text>",
		doc:   "a prefix the reply must start with",
		parse: setText(func(h *Handler) *string { return &activeOf(h).ExpectPrefix })},
	{name: "health_interval", args: "<duration>",
		doc:   "how often to probe each upstream (default 5s)",
		parse: setDuration(func(h *Handler) *caddy.Duration { return &activeOf(h).Interval })},
	{name: "health_timeout", args: "<duration>",
		doc:   "how long to wait for a reply (default 2s)",
		parse: setDuration(func(h *Handler) *caddy.Duration { return &activeOf(h).Timeout })},
	{name: "health_passes", args: "<n>",
		doc:   "consecutive passing checks that mark an upstream up (default 1)",
		parse: setInt(func(h *Handler) *int { return &activeOf(h).Passes })},
	{name: "health_fails", args: "<n>",
		doc:   "consecutive failing checks that mark an upstream down (default 1)",
		parse: setInt(func(h *Handler) *int { return &activeOf(h).Fails })},
	{name: "health_port", args: "<port>",
		doc:   "the port to probe, if not the upstream's",
		parse: setInt(func(h *Handler) *int { return &activeOf(h).Port })},

	{group: "passive health checks", name: "reply_timeout", args: "<duration>",
		doc:   "passive checks: a datagram without a reply within this time is a failure (default: off)",
		parse: setDuration(func(h *Handler) *caddy.Duration { return &passiveOf(h).ReplyTimeout })},
	{name: "max_fails", args: "<n>",
		doc:   "failures within fail_duration that mark an upstream down (default 1)",
		parse: setInt(func(h *Handler) *int { return &passiveOf(h).MaxFails })},
	{name: "fail_duration", args: "<duration>",
		doc:   "how long a failure counts, and an upstream stays down (default 10s)",
		parse: setDuration(func(h *Handler) *caddy.Duration { return &passiveOf(h).FailDuration })},

	{group: "when every upstream is down", name: "drop_when_all_down",
		doc: "when every upstream is down, drop datagrams instead of failing open",
		parse: func(p *caddyfileParser, _ []string) error {
			healthChecksOf(p.h).DropWhenAllDown = true
			return nil
		}},

	{group: "metrics and logs", name: "name", args: "<text>",
		doc:   "the handler's name: its metrics' handler label and a field of its logs (default: its ordinal)",
		parse: setText(func(h *Handler) *string { return &h.Name })},

	{group: "upstream-facing sockets", name: "proxy_protocol", args: "v2",
		doc:   "prepend a PROXY protocol v2 header with the client's address to every datagram",
		parse: setText(func(h *Handler) *string { return &h.ProxyProtocol })},
	{name: "local_address", args: "<ips...>", variadic: true,
		doc:   "the source addresses of the upstream-facing sockets, flows spread over them in turn (default: the routing's)",
		parse: func(p *caddyfileParser, args []string) error { p.h.LocalAddresses = args; return nil }},
	{name: "read_buffer", args: "<size>",
		doc:   "the receive buffer size of each upstream-facing socket, such as 4MiB (default: the system's)",
		parse: setSize(func(h *Handler) *int { return &h.ReadBuffer })},
	{name: "write_buffer", args: "<size>",
		doc:   "the send buffer size of each upstream-facing socket, such as 4MiB (default: the system's)",
		parse: setSize(func(h *Handler) *int { return &h.WriteBuffer })},

	{group: "QUIC termination: end the clients' QUIC connections, relay to quic/ or udp/ upstreams", name: "quic",
		block: quicCaddyfileBlock(),
		doc:   "terminate QUIC; its block's options are in the README's QUIC section"}, // parse: see quic_caddyfile.go
}

// caddyfileOptionByName indexes caddyfileOptions.
var caddyfileOptionByName = func() map[string]*caddyfileOption {
	m := make(map[string]*caddyfileOption, len(caddyfileOptions))
	for i := range caddyfileOptions {
		m[caddyfileOptions[i].name] = &caddyfileOptions[i]
	}
	return m
}()

// caddyfileSyntax returns the syntax of the stabilize Caddyfile directive,
// from the table of options: with a comment naming each group of options,
// or, withDocs, with each option's doc as a comment above it.
func caddyfileSyntax(withDocs bool) string {
	var sb strings.Builder
	sb.WriteString("stabilize [<upstreams...>] {\n")
	for i, o := range caddyfileOptions {
		if o.group != "" && i > 0 {
			sb.WriteString("\n")
		}
		switch {
		case withDocs:
			sb.WriteString("\t# " + o.doc + "\n")
		case o.group != "":
			sb.WriteString("\t# " + o.group + "\n")
		}
		sb.WriteString("\t" + strings.TrimSpace(o.name+" "+o.args))
		if o.block != nil {
			sb.WriteString(" {\n")
			for _, line := range o.block {
				sb.WriteString("\t\t" + line + "\n")
			}
			sb.WriteString("\t}")
		}
		sb.WriteString("\n")
	}
	sb.WriteString("}\n")
	return sb.String()
}

// caddyfileParser holds the state of parsing one stabilize block.
type caddyfileParser struct {
	h    *Handler
	d    *caddyfile.Dispenser
	seen map[string]int    // option -> line first given
	opt  *caddyfileOption  // the option being parsed
	toks []caddyfile.Token // its arguments

	// The options of a block inside the stabilize block, such as quic's,
	// and that block's name; nil for the stabilize block's own.
	sub     map[string]*caddyfileOption
	subName string
}

// option parses one option of the stabilize block, at nesting; the
// dispenser is on the option's name.
func (p *caddyfileParser) option(nesting int) error {
	d := p.d
	name := d.Val()
	o, known := caddyfileOptionByName[name]
	if p.sub != nil {
		o, known = p.sub[name]
		if known {
			c := *o
			c.name = p.subName + " " + name // in errors
			o, name = &c, c.name
		}
	}
	if !known {
		return d.Errf("stabilize: unknown option %q", strings.TrimSpace(p.subName+" "+name))
	}
	if line, dup := p.seen[name]; dup && !o.many {
		return d.Errf("stabilize: duplicate option %q (first set on line %d)", name, line)
	}
	p.seen[name] = d.Line()
	p.opt = o

	p.toks = d.RemainingArgsAsTokens()
	args := make([]string, len(p.toks))
	for i, t := range p.toks {
		args[i] = t.Text
	}
	switch {
	case o.args == "" && len(args) > 0:
		return d.Errf("stabilize: %s: takes no arguments, got %q", name, args[0])
	case o.args != "" && len(args) == 0:
		return d.Errf("stabilize: %s: missing argument %s", name, o.args)
	case o.args != "" && !o.variadic && len(args) > 1:
		return d.Errf("stabilize: %s: too many arguments: unexpected %q after %q", name, args[1], args[0])
	}
	if err := o.parse(p, args); err != nil {
		return err
	}
	if o.block == nil && d.NextBlock(nesting+1) {
		return d.Errf("stabilize: %s: unexpected block starting with %q", name, d.Val())
	}
	return nil
}

// to adds upstreams, one per address.
func (p *caddyfileParser) to(addrs []string) error {
	for _, a := range addrs {
		p.addUpstream(a, 0)
	}
	return nil
}

// upstream parses `upstream <address> [{ weight <n>; server_id <hex> }]`;
// the dispenser is on the address.
func (p *caddyfileParser) upstream(args []string) error {
	addr := args[0]
	u := &Upstream{Dial: udpDial(addr)}
	err := p.subOptions(fmt.Sprintf("upstream %q", addr), map[string]func(string) error{
		"weight": atoi(&u.Weight),
		"server_id": func(v string) error {
			u.ServerID = v
			return nil
		},
	})
	if err != nil {
		return err
	}
	if u.Weight == 1 {
		u.Weight = 0
	}
	p.h.Upstreams = append(p.h.Upstreams, u)
	return nil
}

// subOptions parses the block of the option being parsed, named what in
// errors: each line is a sub-option of set, given at most once, with one
// argument that set's function parses; a function's error means an
// invalid integer.
func (p *caddyfileParser) subOptions(what string, set map[string]func(string) error) error {
	d := p.d
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		parse := set[sub]
		if parse == nil {
			return d.Errf("stabilize: %s: unknown option %q", what, sub)
		}
		if seen[sub] {
			return d.Errf("stabilize: %s: duplicate option %q", what, sub)
		}
		seen[sub] = true
		vals := d.RemainingArgs()
		switch len(vals) {
		case 0:
			return d.Errf("stabilize: %s: %s: missing argument %s", what, sub, p.blockArg(sub))
		case 1:
		default:
			return d.Errf("stabilize: %s: %s: too many arguments: unexpected %q after %q", what, sub, vals[1], vals[0])
		}
		if err := parse(vals[0]); err != nil {
			return d.Errf("stabilize: %s: %s: invalid integer %q", what, sub, vals[0])
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("stabilize: %s: %s: unexpected block starting with %q", what, sub, d.Val())
		}
	}
	return nil
}

// blockArg is the argument syntax of sub-option sub of the option being
// parsed, from its block syntax.
func (p *caddyfileParser) blockArg(sub string) string {
	for _, line := range p.opt.block {
		if name, arg, _ := strings.Cut(line, " "); name == sub {
			return arg
		}
	}
	return ""
}

// addUpstream appends an upstream. A plain host:port is written as
// udp/host:port; a weight of 1 is left to the default.
func (p *caddyfileParser) addUpstream(addr string, weight int) {
	if weight == 1 {
		weight = 0
	}
	p.h.Upstreams = append(p.h.Upstreams, &Upstream{Dial: udpDial(addr), Weight: weight})
}

// policy parses `lb_policy <name> [<args...>]`. The policy module parses
// its own arguments if it is a caddyfile.Unmarshaler; otherwise it takes
// none.
func (p *caddyfileParser) policy(args []string) error {
	d := p.d
	name := args[0]
	mod, err := caddy.GetModule(selectionPolicyNamespace + "." + name)
	if err != nil || strings.Contains(name, ".") {
		return d.Errf("stabilize: lb_policy: unknown policy %q (known: %s)", name, strings.Join(selectionPolicyNames(), ", "))
	}
	inst := mod.New()
	if unm, ok := inst.(caddyfile.Unmarshaler); ok {
		if err := unm.UnmarshalCaddyfile(caddyfile.NewDispenser(p.toks)); err != nil {
			quoted := []string{name}
			for _, a := range args[1:] {
				quoted = append(quoted, strconv.Quote(a))
			}
			return fmt.Errorf("stabilize: lb_policy %s: %w", strings.Join(quoted, " "), err)
		}
	} else if len(args) > 1 {
		return d.Errf("stabilize: lb_policy %s: takes no arguments, got %q", name, args[1])
	}
	if p.h.LoadBalancing == nil {
		p.h.LoadBalancing = new(LoadBalancing)
	}
	p.h.LoadBalancing.SelectionPolicyRaw = caddyconfig.JSONModuleObject(inst, "policy", name, nil)
	return nil
}

// selectionPolicyNames lists the registered selection policies.
func selectionPolicyNames() []string {
	var names []string
	for _, m := range caddy.GetModules(selectionPolicyNamespace) {
		names = append(names, m.ID.Name())
	}
	return names
}

// setText returns a parse function that sets a string field to the
// argument.
func setText(field func(*Handler) *string) func(*caddyfileParser, []string) error {
	return func(p *caddyfileParser, args []string) error {
		*field(p.h) = args[0]
		return nil
	}
}

// setInt returns a parse function that sets an int field to the argument,
// an integer.
func setInt(field func(*Handler) *int) func(*caddyfileParser, []string) error {
	return func(p *caddyfileParser, args []string) error {
		n, err := strconv.Atoi(args[0])
		if err != nil {
			return p.d.Errf("stabilize: %s: invalid integer %q", p.opt.name, args[0])
		}
		*field(p.h) = n
		return nil
	}
}

// setDuration returns a parse function that sets a duration field to the
// argument, in Caddy's duration syntax (such as 500ms, 5s, 1m).
func setDuration(field func(*Handler) *caddy.Duration) func(*caddyfileParser, []string) error {
	return func(p *caddyfileParser, args []string) error {
		dur, err := caddy.ParseDuration(args[0])
		if err != nil {
			return p.d.Errf("stabilize: %s: invalid duration %q: %v", p.opt.name, args[0], err)
		}
		*field(p.h) = caddy.Duration(dur)
		return nil
	}
}

// setSize returns a parse function that sets an int field to the argument,
// a byte size such as 4194304, 4MiB or 4MB.
func setSize(field func(*Handler) *int) func(*caddyfileParser, []string) error {
	return func(p *caddyfileParser, args []string) error {
		size, err := humanize.ParseBytes(args[0])
		if err == nil && size > math.MaxInt {
			err = fmt.Errorf("more than %d bytes", math.MaxInt)
		}
		if err != nil {
			return p.d.Errf("stabilize: %s: invalid size %q: %v", p.opt.name, args[0], err)
		}
		*field(p.h) = int(size)
		return nil
	}
}

func healthChecksOf(h *Handler) *HealthChecks {
	if h.HealthChecks == nil {
		h.HealthChecks = new(HealthChecks)
	}
	return h.HealthChecks
}

func activeOf(h *Handler) *ActiveHealthChecks {
	hc := healthChecksOf(h)
	if hc.Active == nil {
		hc.Active = new(ActiveHealthChecks)
	}
	return hc.Active
}

func passiveOf(h *Handler) *PassiveHealthChecks {
	hc := healthChecksOf(h)
	if hc.Passive == nil {
		hc.Passive = new(PassiveHealthChecks)
	}
	return hc.Passive
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
