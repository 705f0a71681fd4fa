//go:build !linux

package quiclb

import "testing"

// threadCPU reports nothing where thread CPU time is not measured.
func threadCPU(*testing.B) func() { return func() {} }
