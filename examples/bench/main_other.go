//go:build !linux

package main

import (
	"fmt"
	"os"
)

// main says why there is nothing to run: the benchmark reads /proc and
// uses Linux-only socket and process options.
func main() {
	fmt.Fprintln(os.Stderr, "bench: this benchmark needs Linux (/proc, SO_RCVBUFFORCE, Pdeathsig)")
	os.Exit(1)
}
