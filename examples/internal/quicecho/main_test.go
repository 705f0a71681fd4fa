package quicecho

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	code := m.Run()
	RemoveSelfSigned()
	os.Exit(code)
}
