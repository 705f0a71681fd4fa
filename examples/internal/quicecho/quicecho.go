// Package quicecho is the QUIC counterpart of udpecho: a QUIC server that
// names itself in every reply, and the original Stabilize's client, which
// sends "Hello, world!" on a stream of each of its connections and counts
// the replies per server.
//
// # Wire format
//
// For each bidirectional stream the server reads the request to its FIN and
// writes back
//
//	reply = identity + "|" + request
//
// then FIN. The identity is the server's listen address, e.g.
// "127.0.0.1:7001". The ALPN is ALPN.
package quicecho

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// ALPN is the application protocol of the example QUIC servers and client.
const ALPN = "stabilize-echo"

// Sep separates the identity from the echoed request in a reply.
const Sep = '|'

// Server is one QUIC echo server.
type Server struct {
	name  string
	tr    *quic.Transport
	ln    *quic.Listener
	conns atomic.Int64
	done  chan struct{}
}

// Start serves on addr with the certificate of tlsConf.
func Start(addr string, tlsConf *tls.Config) (*Server, error) {
	return StartWith(addr, tlsConf, nil)
}

// StartWith is Start with the server's connection IDs from gen, such as a
// QUIC-LB generator (package quiclb); nil is quic-go's default.
func StartWith(addr string, tlsConf *tls.Config, gen quic.ConnectionIDGenerator) (*Server, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	conn, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	tlsConf = tlsConf.Clone()
	tlsConf.NextProtos = []string{ALPN}
	tr := &quic.Transport{Conn: conn, ConnectionIDGenerator: gen}
	ln, err := tr.Listen(tlsConf, &quic.Config{EnableDatagrams: true})
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	s := &Server{name: ln.Addr().String(), tr: tr, ln: ln, done: make(chan struct{})}
	go s.serve()
	return s, nil
}

// Name is the server's identity: its listen address.
func (s *Server) Name() string { return s.name }

// Connections is how many connections the server accepted.
func (s *Server) Connections() int64 { return s.conns.Load() }

// Close stops the server.
func (s *Server) Close() {
	_ = s.ln.Close()
	<-s.done
	_ = s.tr.Close()
	_ = s.tr.Conn.Close()
}

func (s *Server) serve() {
	defer close(s.done)
	for {
		c, err := s.ln.Accept(context.Background())
		if err != nil {
			return
		}
		s.conns.Add(1)
		go s.serveConn(c)
	}
}

func (s *Server) serveConn(c *quic.Conn) {
	for {
		st, err := c.AcceptStream(context.Background())
		if err != nil {
			return
		}
		go func() {
			req, err := io.ReadAll(io.LimitReader(st, 1<<20))
			if err != nil {
				st.CancelWrite(1)
				return
			}
			_, _ = st.Write(append([]byte(s.name+string(Sep)), req...))
			_ = st.Close()
		}()
	}
}

// Ask opens a connection to target, sends msg on a stream and returns the
// identity of the server that answered.
func Ask(ctx context.Context, target string, tlsConf *tls.Config, msg []byte) (string, error) {
	tlsConf = tlsConf.Clone()
	if len(tlsConf.NextProtos) == 0 {
		tlsConf.NextProtos = []string{ALPN}
	}
	c, err := quic.DialAddr(ctx, target, tlsConf, &quic.Config{EnableDatagrams: true})
	if err != nil {
		return "", err
	}
	defer c.CloseWithError(0, "")
	st, err := c.OpenStreamSync(ctx)
	if err != nil {
		return "", err
	}
	if deadline, ok := ctx.Deadline(); ok {
		_ = st.SetDeadline(deadline)
	}
	if _, err := st.Write(msg); err != nil {
		return "", err
	}
	_ = st.Close()
	reply, err := io.ReadAll(st)
	if err != nil {
		return "", err
	}
	name, echo, ok := bytes.Cut(reply, []byte{Sep})
	if !ok || !bytes.Equal(echo, msg) {
		return "", fmt.Errorf("malformed reply %q", reply)
	}
	return string(name), nil
}

// Result is what Run saw.
type Result struct {
	Sent, Received int
	PerServer      map[string]int
	Errors         []error
}

// Run opens n connections to target in turn, each asking msg once, and
// counts the replies per server. onReply, if not nil, sees each.
func Run(ctx context.Context, target string, tlsConf *tls.Config, n int, msg []byte, timeout time.Duration, onReply func(i int, server string, err error)) Result {
	res := Result{PerServer: make(map[string]int)}
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		res.Sent++
		actx, cancel := context.WithTimeout(ctx, timeout)
		server, err := Ask(actx, target, tlsConf, msg)
		cancel()
		if err == nil {
			res.Received++
			res.PerServer[server]++
		} else {
			res.Errors = append(res.Errors, err)
		}
		if onReply != nil {
			onReply(i, server, err)
		}
	}
	return res
}

var (
	certOnce sync.Once
	certDir  string
	certErr  error
)

// SelfSigned returns the files of a self-signed certificate for localhost
// and 127.0.0.1, made once per process in a temporary directory, and the
// certificate loaded. Trusting the certificate file verifies it.
func SelfSigned() (certFile, keyFile string, cert tls.Certificate, err error) {
	certOnce.Do(func() { certDir, certErr = writeSelfSigned() })
	if certErr != nil {
		return "", "", tls.Certificate{}, certErr
	}
	certFile, keyFile = filepath.Join(certDir, "cert.pem"), filepath.Join(certDir, "key.pem")
	cert, err = tls.LoadX509KeyPair(certFile, keyFile)
	return certFile, keyFile, cert, err
}

// RemoveSelfSigned removes the files SelfSigned wrote, if it did: programs
// call it on their way out, so no certificate is left in the temporary
// directory.
func RemoveSelfSigned() {
	if certDir != "" {
		_ = os.RemoveAll(certDir)
	}
}

func writeSelfSigned() (string, error) {
	dir, err := os.MkdirTemp("", "stabilize-quic-example")
	if err != nil {
		return "", err
	}
	return dir, WriteSelfSigned(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
}

// WriteSelfSigned writes a new self-signed certificate for localhost,
// 127.0.0.1 and ::1 to certFile and its key to keyFile, in PEM.
func WriteSelfSigned(certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return errors.Join(
		os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600),
		os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600))
}

// TrustFile returns a client TLS config trusting the PEM certificates of
// file.
func TrustFile(file string) (*tls.Config, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate", file)
	}
	return &tls.Config{RootCAs: pool}, nil
}
