package quiclb_test

import (
	"fmt"
	"net"

	"github.com/quic-go/quic-go"

	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

func ExampleNewGenerator() {
	key := []byte("0123456789abcdef")
	cfg := quiclb.Config{ID: 1, ServerIDLen: 2, NonceLen: 8, Key: key}
	gen, err := quiclb.NewGenerator(cfg, []byte{0x00, 0x07})
	if err != nil {
		panic(err)
	}
	udpConn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		panic(err)
	}
	tr := &quic.Transport{Conn: udpConn, ConnectionIDGenerator: gen}
	defer tr.Close() // tr.Listen(tlsConf, quicConf) accepts connections

	// The load balancer's side.
	dec, err := quiclb.NewDecoder(cfg)
	if err != nil {
		panic(err)
	}
	cid, err := gen.GenerateConnectionID()
	if err != nil {
		panic(err)
	}
	serverID, err := dec.Decode(cid.Bytes())
	fmt.Println(cid.Len(), serverID, err)
	// Output: 11 0007 <nil>
}
