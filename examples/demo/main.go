// Command demo runs the example load balancer in one process and shows it
// working; it needs nothing but Go. From the repository root:
//
//	go run ./examples/demo          # check, print a report, exit (1 on failure)
//	go run ./examples/demo -serve   # then keep serving until Ctrl-C
//	go run ./examples/demo -config path/to/Caddyfile   # default examples/Caddyfile
//	go run ./examples/demo -quic    # QUIC termination instead; see quic.go
//
// It starts the example's UDP echo servers (each names itself in its replies)
// on 127.0.0.1:6001-6003, loads examples/Caddyfile into an in-process Caddy
// through the caddyfile adapter, and sends through the balancer on port 5000:
// one flow of 9 datagrams (`per flow` keeps a flow, one client address:port,
// on the upstream picked for its first datagram: one server answers all 9),
// then 9 flows of one datagram (a round robin pick each: 3 per server). Last
// it reads the upstreams back through the admin API on localhost:2019.
package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile" // the caddyfile adapter
	_ "github.com/mholt/caddy-l4/layer4"                          // the layer4 app and its Caddyfile option
	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpclient"
	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
	_ "github.com/stabilize-lb/caddy-stabilize/stabilize"
)

// options say what run does.
type options struct {
	config string // path of the Caddyfile
	serve  bool   // after the checks, serve until ctx is done
	out    io.Writer

	quic          bool     // run the QUIC demo instead
	quicListen    string   // its balancer's address
	quicUpstreams []string // its QUIC echo servers' addresses
}

// example is what the demo reads from the adapted Caddyfile.
type example struct {
	Admin struct{ Listen string }
	Apps  struct {
		Layer4 struct {
			Servers map[string]struct {
				Listen []string
				Routes []struct {
					Handle []struct {
						Handler   string
						Upstreams []struct{ Dial string }
					}
				}
			}
		}
	}
}

func main() {
	o := options{out: os.Stdout}
	flag.StringVar(&o.config, "config", "examples/Caddyfile", "the Caddyfile to load, relative to the working directory")
	flag.BoolVar(&o.serve, "serve", false, "keep serving after the checks until Ctrl-C")
	flag.BoolVar(&o.quic, "quic", false, "show QUIC termination: connections relayed to QUIC servers in turn")
	flag.Parse()
	o.quicListen, o.quicUpstreams = "127.0.0.1:4433", []string{"127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		if errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use") {
			fmt.Fprintln(os.Stderr, "demo: a port of the example is busy: is another demo or Caddy running?")
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	if o.quic {
		return runQUIC(ctx, o)
	}
	caddyfile, err := os.ReadFile(o.config)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s not found: run the demo from the repository root, or give -config", o.config)
	} else if err != nil {
		return err
	}
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(caddyfile, map[string]any{"filename": o.config})
	if err != nil {
		return fmt.Errorf("adapting %s: %w", o.config, err)
	}

	// Read the addresses to use from the config.
	var ex example
	if err := json.Unmarshal(adapted, &ex); err != nil {
		return err
	}
	srv := ex.Apps.Layer4.Servers["srv0"]
	if len(srv.Listen) == 0 || len(srv.Routes) == 0 || len(srv.Routes[0].Handle) == 0 ||
		srv.Routes[0].Handle[0].Handler != "stabilize" || len(srv.Routes[0].Handle[0].Upstreams) == 0 {
		return fmt.Errorf("%s: want layer4 server srv0 to start with a stabilize handler, like the example", o.config)
	}
	listen := strings.TrimPrefix(srv.Listen[0], "udp/")
	var names []string
	for _, u := range srv.Routes[0].Handle[0].Upstreams {
		names = append(names, strings.TrimPrefix(u.Dial, "udp/"))
	}
	admin := cmp.Or(ex.Admin.Listen, caddy.DefaultAdminListen)

	// Keep Caddy's log quiet and write no autosave.json.
	var cfg map[string]any
	json.Unmarshal(adapted, &cfg) // it decoded into ex
	if cfg["admin"] == nil {
		cfg["admin"] = map[string]any{}
	}
	cfg["admin"].(map[string]any)["config"] = map[string]any{"persist": false}
	cfg["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}}

	// Start the upstreams and Caddy. A busy port fails here, named in err.
	for _, name := range names {
		s, err := udpecho.Start(name)
		if err != nil {
			return err
		}
		defer s.Close()
	}
	cfgJSON, _ := json.Marshal(cfg)
	if err := caddy.Load(cfgJSON, true); err != nil {
		return fmt.Errorf("starting Caddy: %w", err)
	}
	// A config without apps and with the admin API disabled stops both.
	defer caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}},"logging":{"logs":{"default":{"level":"ERROR"}}}}`), true)
	fmt.Fprintf(o.out, "Upstreams (UDP echo servers): %s\nCaddy: loaded %s, balancer on udp/%s, admin API on %s\n",
		strings.Join(names, ", "), o.config, listen, admin)

	_, port, _ := net.SplitHostPort(listen)
	target := net.JoinHostPort("127.0.0.1", port)
	fmt.Fprintf(o.out, "\n1. One flow sends 9 datagrams. `per flow` keeps a flow on the upstream\n"+
		"   picked for its first datagram, so one server should answer all 9.\n")
	err1 := phase(ctx, o.out, target, names, 1, 9, func(c []int) bool { return slices.Max(c) == 9 })
	fmt.Fprintf(o.out, "\n2. 9 flows send one datagram each. Each new flow is a new round robin\n"+
		"   pick, so the servers should answer %d each.\n", 9/len(names))
	err2 := phase(ctx, o.out, target, names, 9, 1, func(c []int) bool { return slices.Max(c)-slices.Min(c) <= 1 })
	url := "http://" + admin + "/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams"
	fmt.Fprintf(o.out, "\n3. The admin API: GET %s\n", url)
	resp, err3 := http.Get(url)
	if err3 == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Fprintf(o.out, "   %s\n", bytes.TrimSpace(body))
		if resp.StatusCode != http.StatusOK {
			err3 = fmt.Errorf("admin API: GET %s: %s", url, resp.Status)
		}
	}
	if err := errors.Join(err1, err2, err3); err != nil {
		return err
	}
	fmt.Fprintln(o.out, "\nAll checks passed.")
	if o.serve {
		fmt.Fprintf(o.out, "Serving until Ctrl-C. In another terminal, try:\n"+
			"  go run ./examples/client -to %s -n 9\n  go run ./examples/client -to %s -flows 9 -n 1 -q\n"+
			"  curl %s\n  curl http://%s/stabilize/upstreams\n", target, target, url, admin)
		<-ctx.Done()
	}
	return nil
}

// phase sends count datagrams on each of flows flows to target, prints who
// answered, and checks the counts per server (in the order of servers) with ok.
func phase(ctx context.Context, out io.Writer, target string, servers []string, flows, count int, ok func([]int) bool) error {
	res, err := udpclient.Run(ctx, udpclient.Config{Target: target, Flows: flows, Count: count})
	if err != nil {
		return err
	}
	for i, f := range res.Flows {
		fmt.Fprintf(out, "   flow %d from %s: %d/%d answered, by %s\n", i, f.Local, f.Received, f.Sent,
			strings.Join(slices.Sorted(maps.Keys(f.PerServer)), ", "))
	}
	counts := make([]int, len(servers))
	fmt.Fprint(out, "   per server:")
	for i, s := range servers {
		counts[i] = res.PerServer[s]
		fmt.Fprintf(out, " %s=%d", s, counts[i])
	}
	if res.Missing() > 0 || res.Corrupt > 0 {
		err = fmt.Errorf("%d of %d replies missing, %d corrupt", res.Missing(), res.Sent, res.Corrupt)
	} else if !ok(counts) {
		err = fmt.Errorf("replies not spread as expected: %v", counts)
	} else {
		fmt.Fprintf(out, "\n   OK: all %d replies arrived, spread as expected\n", res.Received)
		return nil
	}
	fmt.Fprintf(out, "\n   FAIL: %v\n", err)
	return err
}
