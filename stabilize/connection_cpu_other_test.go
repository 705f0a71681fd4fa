//go:build !linux

package stabilize

import "testing"

// processCPUPerOp reports nothing where the process's CPU time is not
// measured.
func processCPUPerOp(*testing.B) func() { return func() {} }
