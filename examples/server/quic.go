package main

import (
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/h3echo"
	"github.com/stabilize-lb/caddy-stabilize/examples/internal/quicecho"
	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

// parseQUICLB parses a -quic-lb configuration, or returns nil for none.
func parseQUICLB(quicLB string) (*quiclb.Config, error) {
	if quicLB == "" {
		return nil, nil
	}
	c, err := h3echo.ParseQUICLB(quicLB)
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// serveH3 runs HTTP/3 servers on addrs, with QUIC-LB connection IDs if
// quicLB is a configuration, until SIGINT or SIGTERM.
func serveH3(addrs []string, quicLB string) error {
	defer quicecho.RemoveSelfSigned() // the servers' certificate
	cfg, err := parseQUICLB(quicLB)
	if err != nil {
		return err
	}
	servers := make([]*h3echo.Server, 0, len(addrs))
	for i, addr := range addrs {
		var id []byte
		if cfg != nil {
			id = h3echo.ServerIDFor(i, cfg.ServerIDLen)
		}
		s, err := h3echo.Start(addr, cfg, id)
		if err != nil {
			return err
		}
		servers = append(servers, s)
		if cfg != nil {
			log.Printf("serving HTTP/3 on %s, QUIC-LB server_id %s", s.Name(), s.ServerID())
		} else {
			log.Printf("serving HTTP/3 on %s", s.Name())
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	log.Printf("stopping on %s", <-sig)
	for _, s := range servers {
		_ = s.Close()
		log.Printf("%s answered %d requests", s.Name(), s.Requests())
	}
	return nil
}
