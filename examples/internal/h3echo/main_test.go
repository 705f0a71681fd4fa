package h3echo

import (
	"os"
	"testing"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/quicecho"
)

func TestMain(m *testing.M) {
	code := m.Run()
	quicecho.RemoveSelfSigned() // the servers' certificate
	os.Exit(code)
}
