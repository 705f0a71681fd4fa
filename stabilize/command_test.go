package stabilize

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// commandConfig is the part of the command's config JSON the tests check.
type commandConfig struct {
	Admin struct {
		Disabled bool   `json:"disabled"`
		Listen   string `json:"listen"`
		Config   struct {
			Persist *bool `json:"persist"`
		} `json:"config"`
	} `json:"admin"`
	Logging *struct {
		Logs map[string]struct {
			Level string `json:"level"`
		} `json:"logs"`
	} `json:"logging"`
	Apps struct {
		Layer4 struct {
			Servers map[string]struct {
				Listen      []string `json:"listen"`
				IdleTimeout int64    `json:"idle_timeout"`
				Routes      []struct {
					Match  []json.RawMessage `json:"match"`
					Handle []struct {
						Handler       string           `json:"handler"`
						Upstreams     []map[string]any `json:"upstreams"`
						Per           string           `json:"per"`
						MaxFlows      int              `json:"max_flows"`
						LocalAddrs    []string         `json:"local_addresses"`
						LoadBalancing struct {
							Selection map[string]any `json:"selection"`
						} `json:"load_balancing"`
					} `json:"handle"`
				} `json:"routes"`
			} `json:"servers"`
		} `json:"layer4"`
	} `json:"apps"`
}

// parseCommandArgs parses args with the registered command's flags, as
// `caddy stabilize args...` would.
func parseCommandArgs(t *testing.T, args ...string) commandOptions {
	t.Helper()
	c, ok := caddycmd.Commands()["stabilize"]
	if !ok {
		t.Fatal("the stabilize command is not registered")
	}
	cmd := &cobra.Command{Use: c.Name}
	c.CobraFunc(cmd)
	if err := cmd.Flags().Parse(args); err != nil {
		t.Fatalf("parsing %q: %v", args, err)
	}
	opts, err := commandOptionsFromFlags(caddycmd.Flags{FlagSet: cmd.Flags()})
	if err != nil {
		t.Fatal(err)
	}
	return opts
}

func buildAndDecode(t *testing.T, opts commandOptions) commandConfig {
	t.Helper()
	raw, err := buildCommandConfig(opts)
	if err != nil {
		t.Fatalf("buildCommandConfig(%+v): %v", opts, err)
	}
	var cfg commandConfig
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("unmarshaling %s: %v", raw, err)
	}
	return cfg
}

func TestCommandRegistered(t *testing.T) {
	c, ok := caddycmd.Commands()["stabilize"]
	if !ok {
		t.Fatal("the stabilize command is not registered")
	}
	for _, want := range []string{"--listen", "--to", "localhost:2019", "stabilize --listen 5000", "127.0.0.1:6003"} {
		if !strings.Contains(c.Long, want) {
			t.Errorf("help text lacks %q", want)
		}
	}
	// The Caddyfile syntax, from the table of options.
	for _, o := range caddyfileOptions {
		if !strings.Contains(c.Long, "\n    "+o.name) || !strings.Contains(c.Long, "# "+o.doc+"\n") {
			t.Errorf("help text lacks the Caddyfile option %s and its doc", o.name)
		}
	}
}

func TestBuildCommandConfigTypical(t *testing.T) {
	opts := parseCommandArgs(t,
		"--listen", ":5000",
		"--to", "127.0.0.1:6001",
		"--to", "127.0.0.1:6002,udp/127.0.0.1:6003",
		"--per", "packet",
		"--lb-policy", "least_sessions",
		"--max-flows", "500",
		"--idle-timeout", "1m",
		"--debug")
	cfg := buildAndDecode(t, opts)

	if cfg.Admin.Disabled || cfg.Admin.Listen != "" {
		t.Errorf("admin = %+v, want enabled on the default address", cfg.Admin)
	}
	if p := cfg.Admin.Config.Persist; p == nil || *p {
		t.Errorf("admin.config.persist = %v, want false", p)
	}
	if cfg.Logging == nil || cfg.Logging.Logs["default"].Level != "DEBUG" {
		t.Errorf("logging = %+v, want default log at DEBUG", cfg.Logging)
	}

	servers := cfg.Apps.Layer4.Servers
	srv, ok := servers["srv0"]
	if len(servers) != 1 || !ok {
		t.Fatalf("servers = %v, want only srv0", servers)
	}
	if want := []string{"udp/:5000"}; fmt.Sprint(srv.Listen) != fmt.Sprint(want) {
		t.Errorf("listen = %q, want %q", srv.Listen, want)
	}
	if srv.IdleTimeout != int64(time.Minute) {
		t.Errorf("idle_timeout = %d, want %d", srv.IdleTimeout, time.Minute)
	}
	if len(srv.Routes) != 1 || len(srv.Routes[0].Match) != 0 || len(srv.Routes[0].Handle) != 1 {
		t.Fatalf("routes = %+v, want one route with no matchers and one handler", srv.Routes)
	}
	h := srv.Routes[0].Handle[0]
	if h.Handler != "stabilize" {
		t.Errorf("handler = %q, want stabilize", h.Handler)
	}
	var dials []string
	for _, u := range h.Upstreams {
		if len(u) != 1 {
			t.Errorf("upstream %v has fields besides dial", u)
		}
		dials = append(dials, fmt.Sprint(u["dial"]))
	}
	want := []string{"udp/127.0.0.1:6001", "udp/127.0.0.1:6002", "udp/127.0.0.1:6003"}
	if fmt.Sprint(dials) != fmt.Sprint(want) {
		t.Errorf("upstreams = %q, want %q", dials, want)
	}
	if h.Per != "packet" {
		t.Errorf("per = %q, want packet", h.Per)
	}
	if h.MaxFlows != 500 {
		t.Errorf("max_flows = %d, want 500", h.MaxFlows)
	}
	if sel := h.LoadBalancing.Selection; len(sel) != 1 || sel["policy"] != "least_sessions" {
		t.Errorf("load_balancing.selection = %v, want {policy: least_sessions}", sel)
	}
}

func TestBuildCommandConfigDefaults(t *testing.T) {
	cfg := buildAndDecode(t, parseCommandArgs(t, "--listen", "5000", "--to", "127.0.0.1:6001"))
	srv := cfg.Apps.Layer4.Servers["srv0"]
	h := srv.Routes[0].Handle[0]
	if h.Per != "flow" {
		t.Errorf("per = %q, want flow", h.Per)
	}
	if h.LoadBalancing.Selection["policy"] != "round_robin" {
		t.Errorf("policy = %v, want round_robin", h.LoadBalancing.Selection["policy"])
	}
	if h.MaxFlows != 0 {
		t.Errorf("max_flows = %d, want 0 (the handler's default)", h.MaxFlows)
	}
	if srv.IdleTimeout != int64(30*time.Second) {
		t.Errorf("idle_timeout = %d, want 30s", srv.IdleTimeout)
	}
	if cfg.Logging != nil {
		t.Errorf("logging = %+v, want none without --debug", cfg.Logging)
	}
	if cfg.Admin.Disabled || cfg.Admin.Listen != "" {
		t.Errorf("admin = %+v, want enabled on the default address", cfg.Admin)
	}
}

func TestBuildCommandConfigListenForms(t *testing.T) {
	for in, want := range map[string]string{
		"5000":                   "udp/:5000",
		":5000":                  "udp/:5000",
		"127.0.0.1:5000":         "udp/127.0.0.1:5000",
		"[::1]:5000":             "udp/[::1]:5000",
		"localhost:5000":         "udp/localhost:5000",
		"udp/5000":               "udp/:5000",
		"udp/:5000":              "udp/:5000",
		"udp/127.0.0.1:5000":     "udp/127.0.0.1:5000",
		"udp4/0.0.0.0:5000":      "udp4/0.0.0.0:5000",
		"udp6/[::]:5000":         "udp6/[::]:5000",
		" UDP/127.0.0.1:5000 ":   "udp/127.0.0.1:5000",
		"fastudp/5000":           "fastudp/:5000",
		"fastudp/127.0.0.1:5000": "fastudp/127.0.0.1:5000",
	} {
		cfg := buildAndDecode(t, commandOptions{Listen: in, To: []string{"127.0.0.1:6001"}})
		got := cfg.Apps.Layer4.Servers["srv0"].Listen
		if len(got) != 1 || got[0] != want {
			t.Errorf("--listen %q: listen = %q, want [%q]", in, got, want)
		}
	}
}

func TestBuildCommandConfigUpstreamForms(t *testing.T) {
	for _, tc := range []struct {
		to   []string
		want []string
	}{
		{[]string{"127.0.0.1:6001"}, []string{"udp/127.0.0.1:6001"}},
		{[]string{"udp4/127.0.0.1:6001", "udp6/[::1]:6001"}, []string{"udp4/127.0.0.1:6001", "udp6/[::1]:6001"}},
		{[]string{"localhost:6001"}, []string{"udp/localhost:6001"}},
		{[]string{" 127.0.0.1:6001 "}, []string{"udp/127.0.0.1:6001"}},
		{[]string{"127.0.0.1:6001-6003"}, []string{"udp/127.0.0.1:6001", "udp/127.0.0.1:6002", "udp/127.0.0.1:6003"}},
	} {
		cfg := buildAndDecode(t, commandOptions{Listen: ":5000", To: tc.to})
		var got []string
		for _, u := range cfg.Apps.Layer4.Servers["srv0"].Routes[0].Handle[0].Upstreams {
			got = append(got, fmt.Sprint(u["dial"]))
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("--to %q: upstreams = %q, want %q", tc.to, got, tc.want)
		}
	}
}

func TestBuildCommandConfigAdmin(t *testing.T) {
	cfg := buildAndDecode(t, commandOptions{Listen: ":5000", To: []string{"127.0.0.1:6001"}, Admin: "off"})
	if !cfg.Admin.Disabled {
		t.Errorf("--admin off: admin = %+v, want disabled", cfg.Admin)
	}
	for _, addr := range []string{"localhost:2020", "unix//run/caddy-admin.sock"} {
		cfg = buildAndDecode(t, commandOptions{Listen: ":5000", To: []string{"127.0.0.1:6001"}, Admin: addr})
		if cfg.Admin.Disabled || cfg.Admin.Listen != addr {
			t.Errorf("--admin %s: admin = %+v, want enabled on %s", addr, cfg.Admin, addr)
		}
	}
}

// TestCommandOptionErrors checks where each error comes from. Parsing the
// flags fails for missing flags, for the listener, which is the command's
// own, and for values that do not parse. Other values are left to
// Provision: the config built for them fails when Caddy validates it, with
// an error naming the field and the value.
func TestCommandOptionErrors(t *testing.T) {
	good := commandOptions{Listen: ":5000", To: []string{"127.0.0.1:6001"}}
	for _, tc := range []struct {
		name      string
		edit      func(*commandOptions)
		provision bool
		want      string
	}{
		{"no listen", func(o *commandOptions) { o.Listen = "" }, false, "--listen is required"},
		{"listen tcp", func(o *commandOptions) { o.Listen = "tcp/:5000" }, false, `--listen "tcp/:5000": network "tcp" is not UDP`},
		{"listen no port", func(o *commandOptions) { o.Listen = "localhost" }, false, `--listen "localhost": a port (1-65535) is required`},
		{"listen port 0", func(o *commandOptions) { o.Listen = ":0" }, false, `--listen ":0": a port (1-65535) is required`},
		{"listen bad port", func(o *commandOptions) { o.Listen = ":99999" }, false, `--listen ":99999": invalid start port`},
		{"listen range", func(o *commandOptions) { o.Listen = ":5000-5001" }, false, `--listen ":5000-5001": exactly one port is required`},
		{"no upstreams", func(o *commandOptions) { o.To = nil }, false, "--to is required"},
		{"idle timeout", func(o *commandOptions) { o.IdleTimeout = "soon" }, false, `--idle-timeout "soon": `},

		{"empty upstream", func(o *commandOptions) { o.To = []string{"127.0.0.1:6001", ""} }, true, `upstreams[1]: upstream "udp/": `},
		{"tcp upstream", func(o *commandOptions) { o.To = []string{"tcp/x:1"} }, true, `upstreams[0]: upstream "tcp/x:1": network "tcp" is not UDP`},
		{"unix upstream", func(o *commandOptions) { o.To = []string{"unix//tmp/s"} }, true, `upstreams[0]: upstream "unix//tmp/s": network "unix" is not UDP`},
		{"upstream no port", func(o *commandOptions) { o.To = []string{"127.0.0.1"} }, true, `upstreams[0]: upstream "udp/127.0.0.1": a port (1-65535) is required`},
		{"upstream no host", func(o *commandOptions) { o.To = []string{":6001"} }, true, `upstreams[0]: upstream "udp/:6001": a host is required`},
		{"upstream bad port", func(o *commandOptions) { o.To = []string{"127.0.0.1:x"} }, true, `upstreams[0]: upstream "udp/127.0.0.1:x": invalid start port`},
		{"upstream twice", func(o *commandOptions) { o.To = []string{"127.0.0.1:6001", "udp/127.0.0.1:6001"} }, true, `upstreams[1]: upstream "udp/127.0.0.1:6001" is listed twice`},
		{"per", func(o *commandOptions) { o.Per = "bytes" }, true, `per "bytes": must be "flow", "packet" or "connection"`},
		{"policy", func(o *commandOptions) { o.LBPolicy = "fastest" }, true, `load_balancing.selection: `},
		{"max flows", func(o *commandOptions) { o.MaxFlows = -2 }, true, `max_flows -2: must be -1`},
		{"local address", func(o *commandOptions) { o.LocalAddresses = []string{"127.0.0.2", "nowhere"} }, true, `local_addresses[1] "nowhere": not an IP address`},
		{"local address family", func(o *commandOptions) { o.LocalAddresses = []string{"::1"} }, true, `local_addresses[0] "::1": no upstream of its address family`},
		{"local address twice", func(o *commandOptions) { o.LocalAddresses = []string{"127.0.0.2", "127.0.0.2"} }, true, `local_addresses[1] "127.0.0.2": listed twice`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := good
			tc.edit(&opts)
			parseErr, provisionErr := commandErrors(t, opts)
			switch {
			case !tc.provision && (parseErr == nil || !strings.Contains(parseErr.Error(), tc.want)):
				t.Errorf("parsing: %v, want an error containing %q", parseErr, tc.want)
			case tc.provision && parseErr != nil:
				t.Errorf("parsing: %v, want only Provision to check the value", parseErr)
			case tc.provision && (provisionErr == nil || !strings.Contains(provisionErr.Error(), "provision layer4.handlers.stabilize: "+tc.want)):
				t.Errorf("validating: %v, want a Provision error starting %q", provisionErr, tc.want)
			}
		})
	}

	// With good values, the config validates.
	parseErr, provisionErr := commandErrors(t, commandOptions{Listen: ":5000", To: []string{"127.0.0.1:6001"}, MaxFlows: -1, LBPolicy: "maglev", LocalAddresses: []string{"127.0.0.2"}})
	if parseErr != nil || provisionErr != nil {
		t.Errorf("good options: %v, %v", parseErr, provisionErr)
	}
}

// TestBuildCommandConfigLocalAddress checks that --local-address, repeated
// or comma-separated, becomes the handler's local_addresses as given, and
// that the flag is the table's local_address: its name and its doc.
func TestBuildCommandConfigLocalAddress(t *testing.T) {
	opts := parseCommandArgs(t, "--listen", ":5000", "--to", "127.0.0.1:6001",
		"--local-address", "127.0.0.2", "--local-address", "127.0.0.3, 127.0.0.4")
	h := buildAndDecode(t, opts).Apps.Layer4.Servers["srv0"].Routes[0].Handle[0]
	if want := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}; fmt.Sprint(h.LocalAddrs) != fmt.Sprint(want) {
		t.Errorf("local_addresses = %q, want %q", h.LocalAddrs, want)
	}

	raw, err := buildCommandConfig(parseCommandArgs(t, "--listen", ":5000", "--to", "127.0.0.1:6001"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), "local_addresses") {
		t.Errorf("without --local-address: config %s, want no local_addresses", raw)
	}

	c := caddycmd.Commands()["stabilize"]
	cmd := &cobra.Command{Use: c.Name}
	c.CobraFunc(cmd)
	f := cmd.Flags().Lookup("local-address")
	if f == nil {
		t.Fatal("no --local-address flag")
	}
	if doc := caddyfileOptionByName["local_address"].doc; !strings.Contains(f.Usage, doc[1:]) {
		t.Errorf("--local-address usage %q, want the table's doc %q", f.Usage, doc)
	}
	for _, help := range []string{c.Usage, c.Long} {
		if !strings.Contains(help, "--local-address") {
			t.Errorf("help text %q lacks --local-address", help)
		}
	}
}

// TestCommandLocalAddress runs the command with two --local-address
// values, on both networks: the upstream sees its datagrams come from
// those addresses only, flows taking them in turn. It uses Caddy's global
// state, so it must not run in parallel.
func TestCommandLocalAddress(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		up := startUpstream(t, "A")
		listen := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		startCommandArgs(t,
			"--listen", network+"/"+listen,
			"--to", up.addr.String(),
			"--local-address", "127.0.0.2",
			"--local-address", "127.0.0.3",
			"--admin", "off")
		for i := range 4 {
			if got := newClient(t, listen).mustRoundTrip(fmt.Sprint("flow ", i)); got != "A" {
				t.Fatalf("flow %d: reply from %q, want A", i, got)
			}
		}
		perAddr := map[string]int{}
		up.mu.Lock()
		for src, n := range up.sources {
			perAddr[src.Addr().String()] += n
		}
		up.mu.Unlock()
		if len(perAddr) != 2 || perAddr["127.0.0.2"] != 2 || perAddr["127.0.0.3"] != 2 {
			t.Errorf("datagrams by source address %v, want 2 from each of 127.0.0.2 and 127.0.0.3", perAddr)
		}
	})
}

// --fastudp-readers gives a fastudp/ listen address that many readers, and
// an invalid count is refused, naming the field and the value.
func TestCommandFastUDPReaders(t *testing.T) {
	up := startUpstream(t, "A")
	listen := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
	startCommandArgs(t,
		"--listen", FastNetwork+"/"+listen,
		"--to", up.addr.String(),
		"--fastudp-readers", "3",
		"--admin", "off")
	if n := fastSocketAt(t, listen).Readers(); n != 3 {
		t.Fatalf("%d readers, want 3", n)
	}
	for i := range 4 {
		if got := newClient(t, listen).mustRoundTrip(fmt.Sprint("flow ", i)); got != "A" {
			t.Fatalf("flow %d: reply from %q, want A", i, got)
		}
	}
	_, err := commandErrors(t, commandOptions{Listen: ":5000", To: []string{"127.0.0.1:6001"}, FastUDPReaders: 65})
	if err == nil || !strings.Contains(err.Error(), "fastudp_readers 65") {
		t.Errorf("65 readers: got %v, want an error naming fastudp_readers and the value", err)
	}
}

// commandErrors builds the command's config for opts and validates it as
// Caddy does, returning the error of each stage.
func commandErrors(t *testing.T, opts commandOptions) (parseErr, provisionErr error) {
	t.Helper()
	raw, err := buildCommandConfig(opts)
	if err != nil {
		return err, nil
	}
	var cfg caddy.Config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	return nil, caddy.Validate(&cfg)
}

// TestCommandPolicyNames checks that the --lb-policy flag lists the
// registered policies.
func TestCommandPolicyNames(t *testing.T) {
	cmd := &cobra.Command{Use: "stabilize"}
	caddycmd.Commands()["stabilize"].CobraFunc(cmd)
	usage := cmd.Flags().Lookup("lb-policy").Usage
	for _, p := range []string{"round_robin", "weighted_round_robin", "random", "random_choose", "least_sessions", "first", "maglev"} {
		if !strings.Contains(usage, p) {
			t.Errorf("--lb-policy usage %q does not list %s", usage, p)
		}
	}
}

// TestCommandFastUDP runs the command's start-up path with the fast
// network, as its help recommends, and sends a datagram through it to a
// real upstream. It uses Caddy's global state, so it must not run in
// parallel.
func TestCommandFastUDP(t *testing.T) {
	up := startUpstream(t, "A")
	listen := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
	startCommandArgs(t,
		"--listen", FastNetwork+"/"+listen,
		"--to", up.addr.String(),
		"--max-flows", "100",
		"--admin", "off")
	if got := newClient(t, listen).mustRoundTrip("hello"); got != "A" {
		t.Errorf("reply from %q, want A", got)
	}
}

// startCommandArgs runs the command's start-up path with args, as
// `caddy stabilize args...` would, and stops Caddy when the test ends.
func startCommandArgs(t *testing.T, args ...string) {
	t.Helper()
	if err := startCommand(parseCommandArgs(t, args...)); err != nil {
		t.Fatalf("starting: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping: %v", err)
		}
	})
}

// TestCommandListenInUse checks that the command refuses a listen address
// that another socket holds, on both networks: Caddy's own UDP listener
// would share it quietly (SO_REUSEPORT).
func TestCommandListenInUse(t *testing.T) {
	held, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	for _, network := range []string{"udp", FastNetwork} {
		listen := network + "/" + held.LocalAddr().String()
		err := startCommand(commandOptions{Listen: listen, To: []string{"127.0.0.1:6001"}, Admin: "off"})
		if err == nil || !strings.Contains(err.Error(), "is another balancer running on it?") {
			t.Errorf("--listen %s: error %v, want the address in use", listen, err)
		}
	}
}

// TestCommandEndToEnd runs the command's config in-process and sends
// datagrams through it to echo upstreams. It uses Caddy's global state, so
// it must not run in parallel.
func TestCommandEndToEnd(t *testing.T) {
	// Three echo upstreams that prefix each reply with their name.
	var upstreams []string
	for _, name := range []string{"A", "B", "C"} {
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFromUDP(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteToUDP(append([]byte(name+"|"), buf[:n]...), from)
			}
		}()
		upstreams = append(upstreams, pc.LocalAddr().String())
	}

	listen := freeUDPAddr(t)
	admin := freeTCPAddr(t)
	opts := parseCommandArgs(t,
		"--listen", listen,
		"--to", strings.Join(upstreams, ","),
		"--per", "packet",
		"--admin", admin)
	if err := startCommand(opts); err != nil {
		t.Fatalf("starting: %v", err)
	}
	t.Cleanup(func() {
		// Stopping the apps leaves the admin server up; a config with the
		// admin API disabled shuts it down.
		if err := caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true); err != nil {
			t.Errorf("unloading: %v", err)
		}
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping: %v", err)
		}
	})

	// Per packet: one client's datagrams go round the upstreams in turn.
	client := dialUDP(t, listen)
	got := exchange(t, client, 6)
	if got[0] == got[1] || got[1] == got[2] || got[0] == got[2] || fmt.Sprint(got[:3]) != fmt.Sprint(got[3:]) {
		t.Errorf("per packet: replies came from %q, want a rotation over A, B and C", got)
	}

	// The admin API is up at --admin and shows the upstreams ...
	upstreamsURL := "http://" + admin + "/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams"
	body := httpDo(t, http.MethodGet, upstreamsURL, "")
	for _, u := range upstreams {
		if !strings.Contains(body, `"udp/`+u+`"`) {
			t.Errorf("GET upstreams = %s, want it to list udp/%s", body, u)
		}
	}

	// ... and changes them: with A and C only, a new client's datagrams
	// alternate between those two.
	httpDo(t, http.MethodPatch, upstreamsURL,
		fmt.Sprintf(`[{"dial":"udp/%s"},{"dial":"udp/%s"}]`, upstreams[0], upstreams[2]))
	client2 := dialUDP(t, listen)
	got = exchange(t, client2, 4)
	if got[0] == got[1] || got[0] != got[2] || got[1] != got[3] || strings.Contains(strings.Join(got, ""), "B") {
		t.Errorf("after PATCH: replies came from %q, want an alternation of A and C", got)
	}

	// Per flow: each client stays on one upstream, and new clients take the
	// upstreams in turn.
	opts.Per = "flow"
	cfgJSON, err := buildCommandConfig(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("loading %s: %v", cfgJSON, err)
	}
	seen := make(map[string]bool)
	for range 3 {
		c := dialUDP(t, listen)
		got := exchange(t, c, 3)
		if got[0] != got[1] || got[1] != got[2] {
			t.Errorf("per flow: one client's replies came from %q, want one upstream", got)
		}
		seen[got[0]] = true
	}
	if len(seen) != 3 {
		t.Errorf("per flow: three clients went to %v, want A, B and C", seen)
	}
}

// exchange sends n datagrams on c, one at a time, and returns the name of
// the upstream that answered each.
func exchange(t *testing.T, c *net.UDPConn, n int) []string {
	t.Helper()
	var names []string
	buf := make([]byte, 2048)
	for i := range n {
		msg := fmt.Sprintf("ping %d", i)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		m, err := c.Read(buf)
		if err != nil {
			t.Fatalf("datagram %d: no reply: %v", i, err)
		}
		name, echoed, ok := strings.Cut(string(buf[:m]), "|")
		if !ok || echoed != msg {
			t.Fatalf("datagram %d: reply %q, want \"<upstream>|%s\"", i, buf[:m], msg)
		}
		names = append(names, name)
	}
	return names
}

func dialUDP(t *testing.T, addr string) *net.UDPConn {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.DialUDP("udp4", nil, raddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// freeUDPAddr returns a 127.0.0.1 address with a UDP port that was free.
func freeUDPAddr(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().String()
}

// freeTCPAddr returns a 127.0.0.1 address with a TCP port that was free.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// httpDo sends a request to the admin API and returns the response body.
func httpDo(t *testing.T, method, url, body string) string {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewBufferString(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	client := &http.Client{Timeout: 3 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %s: %s", method, url, resp.Status, b)
	}
	return string(b)
}
