package stabilize

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "stabilize",
		Usage: `--listen <addr> --to <addr> [--to <addr>...] [--per packet|flow|connection] [--lb-policy <policy>] [--max-flows <n>] [--idle-timeout <duration>] [--local-address <ip>...] [--fastudp-readers <n>] [--cert <file> --key <file> | --domain <name> [--internal-certs]] [--alpn <protocol>...] [--keylog <file>] [--stateless-retry] [--insecure] [--admin <addr>|off] [--debug]`,
		Short: "A quick UDP load balancer",
		Long: `
A quick UDP load balancer: receives datagrams on the --listen address and
spreads them over the --to upstreams, relaying each upstream's replies back
to the client that sent the datagram. It runs the layer4 app with one server
and the stabilize handler (layer4.handlers.stabilize); no config file is
needed.

  --listen is the UDP address to receive on: a port alone (5000), :5000,
    127.0.0.1:5000, [::1]:5000, or a network address such as udp/:5000,
    udp4/:5000 or udp6/[::1]:5000. fastudp/:5000 listens on stabilize's
    own fast network instead: batched reads, and established flows bypass
    caddy-l4's per-datagram dispatch (recommended).
  --to is an upstream UDP server, host:port (UDP is assumed) or
    udp/host:port. Repeat the flag or separate addresses with commas. A port
    range (127.0.0.1:6001-6003) stands for one upstream per port.
  --per says when the policy picks an upstream: "flow" (default) picks on
    a client's first datagram and keeps that client address:port on the same
    upstream until it has been idle for --idle-timeout; "packet" picks for
    every datagram; "connection" picks for each QUIC connection and routes
    its packets by connection ID, through client address changes.
  --lb-policy is the selection policy, by name: round_robin (default) or
    another of those listed with the flag below.
  --max-flows is the most client flows held at once; a new flow over it is
    dropped. 0 (default) derives it from the open-file limit; -1 means no
    limit.
  --idle-timeout is how long a client flow may be idle before it ends.
  --local-address is a source IP address of the upstream-facing sockets,
    as nginx's proxy_bind and HAProxy's source: the Caddyfile's
    local_address (below). Repeat the flag or separate addresses with
    commas.
  --fastudp-readers is how many sockets, each with its own reader, a
    fastudp/ --listen address has (SO_REUSEPORT; the stabilize app's
    fastudp_readers): 1 (default) to 64.

Loading the config checks the values, as for a config file.

For example, to balance port 5000 over three local upstreams, datagram by
datagram in turn:

  caddy stabilize --listen :5000 \
    --to 127.0.0.1:6001 --to 127.0.0.1:6002 --to 127.0.0.1:6003 \
    --per packet

This is the original stand-alone "stabilize --listen 5000" as a Caddy
command: its round robin of every datagram is --per packet with the default
round_robin policy. A port range is short for consecutive upstreams:
--to 127.0.0.1:6001-6003 is the same as the three --to flags above.

Caddy's admin API stays on, at its default address (localhost:2019, or
$CADDY_ADMIN), so the upstreams can be inspected and changed while the
balancer runs, e.g.:

  curl localhost:2019/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams

and "caddy stop" stops it. Use --admin <addr> to serve the admin API
elsewhere, or --admin off to turn it off. The config is not saved.

--debug turns on debug logging.

QUIC termination, the original Stabilize's own job: with --cert and --key,
or --domain, the balancer ends the clients' QUIC connections itself and
relays each one to a quic/ upstream (one backend connection per client
connection, every stream and datagram relayed), or each stream as one
request datagram to udp/ upstreams:

  caddy stabilize --listen :4433 --cert signed.pem --key signed.key \
    --to quic/10.0.0.1:4433 --to quic/10.0.0.2:4433 [--alpn h3] \
    [--keylog keys.log] [--stateless-retry]

  --cert, --key load a PEM certificate pair.
  --domain <name> has Caddy manage the certificate instead: ACME for public
    names, the internal issuer for localhost and IP addresses, as
    "caddy reverse-proxy" does; --internal-certs forces the internal issuer.
  --alpn is an application protocol offered to clients (repeatable;
    default h3); the backend is offered the one the client negotiated.
  --keylog appends the TLS secrets to a file, for debugging.
  --stateless-retry makes every new client prove its address first.
  --insecure skips verification of the quic/ upstreams' certificates, as in
    "caddy reverse-proxy --insecure".

The original's flags, side by side:

  stabilize (Rust)          caddy stabilize
  -c, --cert <cert>         -c, --cert <file>
  -k, --key <key>           -k, --key <file>
      --listen <listen>     -l, --listen <addr>   (required; a port alone works)
      --keylog              --keylog <file>       (a file name, not a switch)
      --stateless-retry     --stateless-retry     (off unless given)
  (servers built in)        -t, --to <addr>...    quic/host:port or udp/host:port
  (none)                    --alpn, --domain, --internal-certs, --insecure

In a config file, the stabilize handler goes in a route of caddy-l4's layer4
global option. Its Caddyfile syntax:

` + commandCaddyfileHelp(),
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Flags().StringP("listen", "l", "", "UDP address to receive datagrams on (required)")
			cmd.Flags().StringSliceP("to", "t", []string{}, "Upstream UDP address(es); repeatable, comma-separated (required)")
			cmd.Flags().String("per", PerFlow, "When to pick an upstream: \"flow\", \"packet\" or \"connection\"")
			cmd.Flags().String("lb-policy", "round_robin", "Load balancing selection policy: "+strings.Join(selectionPolicyNames(), ", "))
			cmd.Flags().Int("max-flows", 0, "The most client flows at once (0: from the open-file limit, -1: no limit)")
			cmd.Flags().String("idle-timeout", "30s", "How long a client flow may be idle before it ends")
			cmd.Flags().StringSlice(optionFlag("local_address"))
			cmd.Flags().Int("fastudp-readers", 0, "fastudp/ --listen: sockets, each with its own reader (default 1)")
			cmd.Flags().StringP("cert", "c", "", "QUIC: TLS certificate file in PEM format")
			cmd.Flags().StringP("key", "k", "", "QUIC: TLS private key file in PEM format")
			cmd.Flags().String("domain", "", "QUIC: a name Caddy manages the certificate of, instead of --cert/--key")
			cmd.Flags().Bool("internal-certs", false, "QUIC: use Caddy's internal issuer for --domain")
			cmd.Flags().StringSlice("alpn", nil, "QUIC: application protocol(s) offered to clients; repeatable (default h3)")
			cmd.Flags().String("keylog", "", "QUIC: file to append TLS secrets to, for debugging")
			cmd.Flags().Bool("stateless-retry", false, "QUIC: send a Retry to every new client")
			cmd.Flags().Bool("insecure", false, "QUIC: skip verification of the quic/ upstreams' certificates")
			cmd.Flags().String("admin", "", "Admin API address, or \"off\" (default localhost:2019 or $CADDY_ADMIN)")
			cmd.Flags().BoolP("debug", "v", false, "Enable verbose debug logs")
			cmd.RunE = caddycmd.WrapCommandFuncForCobra(cmdStabilize)
		},
	})
}

// optionFlag returns the name, default and usage of the flag of the
// Caddyfile option name, from the table of options: a repeatable flag
// named after the option, with its doc. Provision checks the values.
func optionFlag(name string) (flag string, value []string, usage string) {
	o := caddyfileOptionByName[name]
	return strings.ReplaceAll(o.name, "_", "-"), nil, upperFirst(o.doc) + "; repeatable, comma-separated"
}

// upperFirst is s with its first letter in upper case.
func upperFirst(s string) string {
	return strings.ToUpper(s[:1]) + s[1:]
}

// commandCaddyfileHelp is the handler's Caddyfile syntax, with each
// option's doc, indented for the help text.
func commandCaddyfileHelp() string {
	var sb strings.Builder
	for line := range strings.Lines(caddyfileSyntax(true)) {
		if line != "\n" {
			sb.WriteString("  ")
		}
		sb.WriteString(strings.ReplaceAll(line, "\t", "  "))
	}
	return sb.String()
}

// commandOptions are the flags of `caddy stabilize`.
type commandOptions struct {
	Listen      string
	To          []string
	Per         string
	LBPolicy    string
	MaxFlows    int
	IdleTimeout string
	// LocalAddresses are the handler's local_addresses.
	LocalAddresses []string
	// FastUDPReaders is the stabilize app's fastudp_readers; 0 for none.
	FastUDPReaders int
	Admin          string // "" for the default address, "off" to disable
	Debug          bool

	// QUIC termination; see commandQUIC.
	Cert, Key      string
	Domain         string
	InternalCerts  bool
	ALPN           []string
	KeyLog         string
	StatelessRetry bool
	Insecure       bool
}

// commandServerName names the layer4 server the command configures.
const commandServerName = "srv0"

func cmdStabilize(fs caddycmd.Flags) (int, error) {
	caddy.TrapSignals()

	opts, err := commandOptionsFromFlags(fs)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if err := startCommand(opts); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	select {}
}

// startCommand runs the config of opts, once its listen and admin
// addresses are known to be free.
func startCommand(opts commandOptions) error {
	cfgJSON, err := buildCommandConfig(opts)
	if err != nil {
		return err
	}
	listen, _ := parseListenAddr(opts.Listen) // buildCommandConfig parsed it
	admin := opts.Admin
	if admin == "" {
		admin = caddy.DefaultAdminListen
	}
	if err := checkAddrsFree(listen, admin); err != nil {
		return err
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		return err
	}
	var dials []string
	for _, u := range expandUpstreams(opts.To) {
		dials = append(dials, u.Dial)
	}
	msg := "caddy stabilize balancing UDP"
	if opts.terminatesQUIC() {
		msg = "caddy stabilize terminating QUIC"
	}
	caddy.Log().Info(msg,
		zap.String("listen", listen),
		zap.Strings("to", dials),
		zap.String("per", opts.Per),
		zap.String("lb_policy", opts.LBPolicy),
		zap.String("admin", admin))
	return nil
}

// commandOptionsFromFlags reads the command's parsed flags.
func commandOptionsFromFlags(fs caddycmd.Flags) (commandOptions, error) {
	to, err := fs.GetStringSlice("to")
	if err != nil {
		return commandOptions{}, fmt.Errorf("invalid --to flag: %v", err)
	}
	maxFlows, err := fs.GetInt("max-flows")
	if err != nil {
		return commandOptions{}, fmt.Errorf("invalid --max-flows flag: %v", err)
	}
	alpn, err := fs.GetStringSlice("alpn")
	if err != nil {
		return commandOptions{}, fmt.Errorf("invalid --alpn flag: %v", err)
	}
	readers, err := fs.GetInt("fastudp-readers")
	if err != nil {
		return commandOptions{}, fmt.Errorf("invalid --fastudp-readers flag: %v", err)
	}
	localFlag, _, _ := optionFlag("local_address")
	locals, err := fs.GetStringSlice(localFlag)
	if err != nil {
		return commandOptions{}, fmt.Errorf("invalid --%s flag: %v", localFlag, err)
	}
	return commandOptions{
		Listen:         fs.String("listen"),
		To:             to,
		Per:            fs.String("per"),
		LBPolicy:       fs.String("lb-policy"),
		MaxFlows:       maxFlows,
		IdleTimeout:    fs.String("idle-timeout"),
		LocalAddresses: locals,
		FastUDPReaders: readers,
		Admin:          fs.String("admin"),
		Debug:          fs.Bool("debug"),

		Cert:           fs.String("cert"),
		Key:            fs.String("key"),
		Domain:         fs.String("domain"),
		InternalCerts:  fs.Bool("internal-certs"),
		ALPN:           alpn,
		KeyLog:         fs.String("keylog"),
		StatelessRetry: fs.Bool("stateless-retry"),
		Insecure:       fs.Bool("insecure"),
	}, nil
}

// buildCommandConfig returns the config JSON that `caddy stabilize` runs. It
// only parses its options; loading the config checks the values. It
// resolves no names and opens no sockets.
func buildCommandConfig(opts commandOptions) ([]byte, error) {
	if opts.Listen == "" {
		return nil, errors.New("--listen is required (e.g. --listen :5000)")
	}
	listen, err := parseListenAddr(opts.Listen)
	if err != nil {
		return nil, err
	}
	if len(opts.To) == 0 {
		return nil, errors.New("--to is required: at least one upstream (e.g. --to 127.0.0.1:6001)")
	}

	var idle caddy.Duration
	if opts.IdleTimeout != "" {
		d, err := caddy.ParseDuration(opts.IdleTimeout)
		if err != nil {
			return nil, fmt.Errorf("--idle-timeout %q: %v", opts.IdleTimeout, err)
		}
		idle = caddy.Duration(d)
	}

	handler := &Handler{
		Upstreams: expandUpstreams(opts.To),
		Per:       opts.Per,
		MaxFlows:  opts.MaxFlows,
	}
	for _, a := range opts.LocalAddresses {
		handler.LocalAddresses = append(handler.LocalAddresses, strings.TrimSpace(a)) // Provision checks them
	}
	if opts.LBPolicy != "" {
		handler.LoadBalancing = &LoadBalancing{
			SelectionPolicyRaw: caddyconfig.JSONModuleObject(struct{}{}, "policy", opts.LBPolicy, nil),
		}
	}
	tlsApp, err := commandQUIC(opts, handler) // quic_command.go
	if err != nil {
		return nil, err
	}
	server := &layer4.Server{
		Listen: []string{listen},
		Routes: layer4.RouteList{{
			HandlersRaw: []json.RawMessage{
				caddyconfig.JSONModuleObject(handler, "handler", "stabilize", nil),
			},
		}},
		IdleTimeout: idle,
	}
	app := layer4.App{Servers: map[string]*layer4.Server{commandServerName: server}}

	cfg := &caddy.Config{
		Admin:   adminConfig(opts.Admin),
		AppsRaw: caddy.ModuleMap{"layer4": caddyconfig.JSON(app, nil)},
	}
	if tlsApp != nil {
		cfg.AppsRaw["tls"] = tlsApp
	}
	if opts.FastUDPReaders != 0 {
		cfg.AppsRaw["stabilize"] = caddyconfig.JSON(App{FastUDPReaders: opts.FastUDPReaders}, nil) // Provision checks it
	}
	if opts.Debug {
		cfg.Logging = &caddy.Logging{
			Logs: map[string]*caddy.CustomLog{
				"default": {BaseLog: caddy.BaseLog{Level: zap.DebugLevel.CapitalString()}},
			},
		}
	}
	return json.Marshal(cfg)
}

// parseListenAddr turns a --listen value into a caddy-l4 listener address
// such as udp/:5000 or fastudp/:5000. A port alone means every interface.
// The command decides what it listens on, so this is the one place that
// checks it: one port, on a UDP network or the fast network.
func parseListenAddr(s string) (string, error) {
	addr, fast := strings.CutPrefix(strings.TrimSpace(s), FastNetwork+"/")
	network, hostPort, found := strings.Cut(addr, "/")
	if !found {
		network, hostPort = "", addr
	}
	if _, err := strconv.ParseUint(hostPort, 10, 16); err == nil {
		hostPort = ":" + hostPort
	}
	if network != "" {
		hostPort = network + "/" + hostPort
	}
	na, err := parseUDPAddr(hostPort)
	if err != nil {
		return "", fmt.Errorf("--listen %q: %v", s, err)
	}
	if fast {
		na.Network = FastNetwork
	}
	return na.String(), nil
}

// expandUpstreams turns the --to values into upstreams, one per address and
// one per port of a port range. A plain host:port is UDP.
func expandUpstreams(to []string) []*Upstream {
	var ups []*Upstream
	for _, raw := range to {
		s := strings.TrimSpace(raw)
		na, err := caddy.ParseNetworkAddressWithDefaults(s, "udp", 0)
		if err != nil || na.PortRangeSize() == 1 {
			ups = append(ups, &Upstream{Dial: udpDial(s)}) // Provision checks it
			continue
		}
		for port := na.StartPort; port <= na.EndPort; port++ {
			dial := caddy.JoinNetworkAddress(na.Network, na.Host, strconv.FormatUint(uint64(port), 10))
			ups = append(ups, &Upstream{Dial: dial})
		}
	}
	return ups
}

// adminConfig returns the admin settings for an --admin value: the default
// address for "", disabled for "off", else the given address. The config is
// never persisted, so the command does not overwrite Caddy's autosave.
func adminConfig(s string) *caddy.AdminConfig {
	persist := false
	admin := &caddy.AdminConfig{Config: &caddy.ConfigSettings{Persist: &persist}}
	switch s {
	case "":
	case "off":
		admin.Disabled = true
	default:
		admin.Listen = s
	}
	return admin
}

// checkAddrsFree fails when another process holds the UDP listen address or
// the admin API's TCP address. Caddy binds both with SO_REUSEPORT, so a
// second balancer on the same port would otherwise start quietly and take
// a share of the datagrams and of the admin requests; a probe bind without
// SO_REUSEPORT fails instead. listen is a parseListenAddr address.
func checkAddrsFree(listen, admin string) error {
	na, err := caddy.ParseNetworkAddress(listen)
	if err != nil {
		return err
	}
	network := na.Network
	if network == FastNetwork {
		network = "udp" // a fast socket is a plain UDP socket
	}
	pc, err := net.ListenPacket(network, na.JoinHostPort(0))
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("--listen %s: %v (is another balancer running on it?)", listen, err)
		}
		return fmt.Errorf("--listen %s: %v", listen, err)
	}
	_ = pc.Close()

	if admin == "off" {
		return nil
	}
	na, err = caddy.ParseNetworkAddress(admin)
	if err != nil || !strings.HasPrefix(na.Network, "tcp") {
		return nil // Caddy reports what it cannot use
	}
	ln, err := net.Listen(na.Network, na.JoinHostPort(0))
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("admin API %s: %v (is another Caddy running? choose another address with --admin <addr>, or --admin off)", admin, err)
		}
		return fmt.Errorf("admin API %s: %v", admin, err)
	}
	return ln.Close()
}
