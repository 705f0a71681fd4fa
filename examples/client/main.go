// Command client sends numbered datagrams to a UDP echo server (see
// examples/server), or to a load balancer in front of several, and reports
// which server answered each and which got no answer.
//
//	client -to 127.0.0.1:5000 -flows 3 -n 100
//
// Each flow is its own socket, so its own source port; it sends a request,
// waits for the reply or the timeout, then sends the next. The exit status is
// 1 when a reply is missing or corrupt, and 2 on a usage or network error.
//
//	client -quic -to 127.0.0.1:4433 -n 9 [-ca cert.pem]
//
// is the original Stabilize's client: each of n QUIC connections sends
// "Hello, world!" on a stream and prints the reply; then the replies per
// server. Without -ca it does not verify the certificate.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/quicecho"
	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpclient"
)

func main() {
	var cfg udpclient.Config
	flag.StringVar(&cfg.Target, "to", "127.0.0.1:5000", "`host:port` to send to")
	flag.IntVar(&cfg.Count, "n", 0, "requests per flow (default 10 unless -d is set)")
	flag.DurationVar(&cfg.Duration, "d", 0, "stop sending after this `duration`, e.g. 5s")
	flag.IntVar(&cfg.Flows, "flows", 1, "number of flows, each from its own source port")
	flag.IntVar(&cfg.Size, "size", 64, "request size in `bytes` (at least the \"<flow>/<seq>/\" header)")
	flag.DurationVar(&cfg.Timeout, "timeout", time.Second, "how long to wait for each reply")
	flag.DurationVar(&cfg.Interval, "interval", 0, "least time between two requests of a flow")
	quiet := flag.Bool("q", false, "do not print each reply, only the summary")
	useQUIC := flag.Bool("quic", false, "QUIC: -n connections, each sending \"Hello, world!\" on a stream")
	ca := flag.String("ca", "", "-quic: PEM `file` of the certificate or CA to trust (default: no verification)")
	alpn := flag.String("alpn", quicecho.ALPN, "-quic: the application `protocol` to offer")
	serverName := flag.String("sni", "localhost", "-quic: the server `name` to ask for")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage: %s [flags]\n\n"+
			"Sends numbered UDP requests and counts the replies per server, as named by\n"+
			"examples/server. Exits 1 when a reply is missing or corrupt.\n\n",
			os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if cfg.Count == 0 && cfg.Duration == 0 {
		cfg.Count = 10
	}
	if *useQUIC {
		os.Exit(runQUIC(cfg, *ca, *alpn, *serverName, *quiet))
	}
	if !*quiet {
		cfg.OnReply = func(r udpclient.Reply) {
			fmt.Printf("flow %d seq %d from %s in %v\n", r.Flow, r.Seq, r.Server, r.RTT)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := udpclient.Run(ctx, cfg)
	if res.Sent > 0 {
		report(res)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		os.Exit(2)
	}
	if res.Missing() > 0 || res.Corrupt > 0 {
		os.Exit(1)
	}
}

// runQUIC runs the original's client and returns the exit status.
func runQUIC(cfg udpclient.Config, ca, alpn, serverName string, quiet bool) int {
	tlsConf := &tls.Config{InsecureSkipVerify: true}
	if ca != "" {
		var err error
		if tlsConf, err = quicecho.TrustFile(ca); err != nil {
			fmt.Fprintln(os.Stderr, "client:", err)
			return 2
		}
	}
	tlsConf.NextProtos, tlsConf.ServerName = []string{alpn}, serverName
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	res := quicecho.Run(ctx, cfg.Target, tlsConf, cfg.Count, []byte("Hello, world!"), cfg.Timeout+5*time.Second,
		func(i int, server string, err error) {
			switch {
			case err != nil:
				fmt.Printf("connection %d: %v\n", i, err)
			case !quiet:
				fmt.Printf("connection %d: %s|Hello, world!\n", i, server)
			}
		})
	fmt.Printf("\nconnections %d, answered %d, failed %d in %v\n", res.Sent, res.Received, len(res.Errors), time.Since(start).Round(time.Millisecond))
	printShares("connections", res.PerServer, res.Received)
	if len(res.Errors) > 0 {
		return 1
	}
	return 0
}

// printShares prints a table of the count per server and its share of
// total; what names the counts.
func printShares(what string, perServer map[string]int, total int) {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(w, "server\t%s\tshare\t\n", what)
	for _, server := range slices.Sorted(maps.Keys(perServer)) {
		n := perServer[server]
		fmt.Fprintf(w, "%s\t%d\t%.1f%%\t\n", server, n, 100*float64(n)/float64(total))
	}
	w.Flush()
}

// report prints the totals, the replies per server, and, for several flows,
// the servers each flow reached.
func report(res udpclient.Result) {
	fmt.Printf("\nsent %d, received %d, missing %d", res.Sent, res.Received, res.Missing())
	if res.Stale > 0 || res.Corrupt > 0 {
		fmt.Printf(", stale %d, corrupt %d", res.Stale, res.Corrupt)
	}
	fmt.Printf(" in %v\n", res.Elapsed.Round(time.Millisecond))
	if res.Received == 0 {
		return
	}

	fmt.Println()
	printShares("replies", res.PerServer, res.Received)

	if len(res.Flows) < 2 {
		return
	}
	fmt.Println()
	for i, f := range res.Flows {
		fmt.Printf("flow %d from %s: sent %d, missing %d, servers:", i, f.Local, f.Sent, f.Missing())
		for _, server := range slices.Sorted(maps.Keys(f.PerServer)) {
			fmt.Printf(" %s=%d", server, f.PerServer[server])
		}
		fmt.Println()
	}
}
