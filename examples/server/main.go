// Command server runs UDP echo servers that name themselves in each reply, to
// stand as the upstreams of a load balancer.
//
//	server -listen 127.0.0.1:6001 -n 3
//
// serves on ports 6001, 6002 and 6003. Each reply is the server's address, a
// '|' and the request (see package udpecho). On SIGINT or SIGTERM it prints
// how many datagrams each server received and exits.
//
//	server -quic -listen 127.0.0.1:7001 -n 3 [-cert cert.pem -key key.pem]
//
// runs QUIC servers instead (package quicecho, ALPN stabilize-echo): each
// stream gets the server's address, a '|' and the stream's data. They
// share a self-signed certificate for localhost and 127.0.0.1: in a
// temporary directory, whose file they print, without -cert and -key; in
// those files if neither exists; else the pair those files hold. With -h3 they are HTTP/3 servers
// (package h3echo) whose reply to every request is their address.
//
// With -quic-lb, QUIC or HTTP/3 server i (from 0) issues QUIC-LB connection
// IDs with server ID i+1, which it logs, for the upstream's server_id of a
// balancer with `per connection`:
//
//	server -listen 127.0.0.1:6001 -n 3 -quic -quic-lb config_id=0,server_id_length=1,nonce_length=6
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/quic-go/quic-go"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/h3echo"
	"github.com/stabilize-lb/caddy-stabilize/examples/internal/quicecho"
	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:6001", "`host:port` of the first server")
	n := flag.Int("n", 1, "number of servers, on consecutive ports from -listen's")
	quiet := flag.Bool("quiet", false, "receive and count datagrams but never reply (a hung upstream)")
	useQUIC := flag.Bool("quic", false, "run QUIC echo servers (ALPN "+quicecho.ALPN+") instead of UDP ones")
	useH3 := flag.Bool("h3", false, "run HTTP/3 servers that reply to every request with their address")
	quicLB := flag.String("quic-lb", "", "-quic or -h3: a QUIC-LB `config`, config_id=<0-6>,server_id_length=<n>,nonce_length=<n>[,key=<hex>]")
	certFile := flag.String("cert", "", "-quic: PEM certificate `file`; with -key, a self-signed pair is written there if neither file exists (default: a self-signed pair in a temporary directory)")
	keyFile := flag.String("key", "", "-quic: PEM key `file` of -cert")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage: %s [flags]\n\n"+
			"Runs UDP echo servers. Each replies to a datagram with \"<listen address>|<datagram>\".\n\n",
			os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	log.SetPrefix("server: ")

	addrs, err := consecutive(*listen, *n)
	if err != nil {
		log.Fatal(err)
	}
	switch {
	case *useH3:
		if err := serveH3(addrs, *quicLB); err != nil {
			log.Fatal(err)
		}
		return
	case *useQUIC:
		if err := serveQUIC(addrs, *certFile, *keyFile, *quicLB); err != nil {
			log.Fatal(err)
		}
		return
	}
	servers := make([]*udpecho.Server, 0, len(addrs))
	for _, addr := range addrs {
		s, err := udpecho.Start(addr)
		if err != nil {
			log.Fatal(err)
		}
		s.SetSilent(*quiet)
		servers = append(servers, s)
		log.Printf("serving on %s (quiet: %t)", s.Name(), *quiet)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	log.Printf("stopping on %s", <-sig)
	for _, s := range servers {
		s.Close()
		log.Printf("%s received %d, replied %d", s.Name(), s.Received(), s.Replied())
	}
}

// serveQUIC runs QUIC echo servers on addrs, with QUIC-LB connection IDs if
// quicLB is a configuration, until SIGINT or SIGTERM.
func serveQUIC(addrs []string, certFile, keyFile, quicLB string) error {
	cfg, err := parseQUICLB(quicLB)
	if err != nil {
		return err
	}
	var cert tls.Certificate
	if certFile == "" {
		certFile, _, cert, err = quicecho.SelfSigned()
		defer quicecho.RemoveSelfSigned()
		log.Printf("self-signed certificate: %s", certFile)
	} else {
		if !exists(certFile) && !exists(keyFile) {
			if err := quicecho.WriteSelfSigned(certFile, keyFile); err != nil {
				return err
			}
			log.Printf("wrote a self-signed certificate: %s, its key: %s", certFile, keyFile)
		}
		cert, err = tls.LoadX509KeyPair(certFile, keyFile)
	}
	if err != nil {
		return err
	}
	servers := make([]*quicecho.Server, 0, len(addrs))
	for i, addr := range addrs {
		var gen quic.ConnectionIDGenerator
		var id []byte
		if cfg != nil {
			id = h3echo.ServerIDFor(i, cfg.ServerIDLen)
			if gen, err = quiclb.NewGenerator(*cfg, id); err != nil {
				return err
			}
		}
		s, err := quicecho.StartWith(addr, &tls.Config{Certificates: []tls.Certificate{cert}}, gen)
		if err != nil {
			return err
		}
		servers = append(servers, s)
		if cfg != nil {
			log.Printf("serving QUIC on %s, QUIC-LB server_id %x", s.Name(), id)
		} else {
			log.Printf("serving QUIC on %s", s.Name())
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	log.Printf("stopping on %s", <-sig)
	for _, s := range servers {
		s.Close()
		log.Printf("%s accepted %d connections", s.Name(), s.Connections())
	}
	return nil
}

// consecutive returns n addresses on the host of addr, from addr's port up.
func consecutive(addr string, n int) ([]string, error) {
	if n < 1 {
		return nil, fmt.Errorf("-n must be at least 1, not %d", n)
	}
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("-listen %q: %w", addr, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < 1 || port+n-1 > 65535 {
		return nil, fmt.Errorf("-listen %q with -n %d: the ports must lie within 1-65535", addr, n)
	}
	addrs := make([]string, n)
	for i := range addrs {
		addrs[i] = net.JoinHostPort(host, strconv.Itoa(port+i))
	}
	return addrs, nil
}

// exists tells whether file exists.
func exists(file string) bool {
	_, err := os.Stat(file)
	return err == nil
}
