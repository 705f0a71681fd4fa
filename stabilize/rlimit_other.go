//go:build !unix

package stabilize

// fileLimit is a conservative stand-in where the process has no open-file
// limit to read.
func fileLimit() uint64 { return 1 << 16 }
