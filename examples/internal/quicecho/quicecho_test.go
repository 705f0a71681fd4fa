package quicecho

import (
	"context"
	"crypto/tls"
	"testing"
	"time"
)

func TestEcho(t *testing.T) {
	certFile, _, cert, err := SelfSigned()
	if err != nil {
		t.Fatal(err)
	}
	s, err := Start("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tlsConf, err := TrustFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	res := Run(context.Background(), s.Name(), tlsConf, 3, []byte("Hello, world!"), 5*time.Second, nil)
	if res.Received != 3 || res.PerServer[s.Name()] != 3 || s.Connections() != 3 {
		t.Fatalf("%+v, %d connections", res, s.Connections())
	}
}
