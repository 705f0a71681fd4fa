//go:build unix

package stabilize

import "golang.org/x/sys/unix"

// fileLimit is the process's soft limit of open files. Go raises it to the
// hard limit at start-up.
func fileLimit() uint64 {
	var l unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &l); err != nil {
		return 1024
	}
	return uint64(max(l.Cur, 0)) // int64 on the BSDs
}
