package stabilize

import (
	"testing"
	"unsafe"
)

// The fields each datagram reads stay in the cache lines that Flow.Warm
// (forward) and readyFlows (replies) load, whether the object starts at a
// line or half-way (as in the allocator's 416- and 480-byte classes).
func TestFlowLayout(t *testing.T) {
	var fl Flow
	conn := unsafe.Offsetof(fl.connection)
	lastActive, health := unsafe.Offsetof(fl.lastActive), unsafe.Offsetof(fl.health)
	for _, tt := range []struct {
		name  string
		read  [][2]uintptr // byte ranges read per datagram
		loads []uintptr
	}{
		{"forward", [][2]uintptr{{0, conn + unsafe.Offsetof(fl.connection.connects) + 1}},
			[]uintptr{lastActive, unsafe.Offsetof(fl.closed), health}},
		{"reply", [][2]uintptr{{unsafe.Offsetof(fl.h), unsafe.Offsetof(fl.h) + 8}, {health, unsafe.Offsetof(fl.out) + 8}},
			[]uintptr{lastActive, health, unsafe.Offsetof(fl.fd), unsafe.Offsetof(fl.outFamily), unsafe.Offsetof(fl.client) + unsafe.Sizeof(fl.client) - 8, unsafe.Offsetof(fl.out)}}, // client.Port()
	} {
		for _, start := range []uintptr{0, 32} {
			loaded := make(map[uintptr]bool)
			for _, o := range tt.loads {
				loaded[(start+o)/64] = true
			}
			for _, r := range tt.read {
				for line := (start + r[0]) / 64; line <= (start+r[1]-1)/64; line++ {
					if !loaded[line] {
						t.Errorf("%s, object at byte %d of a line: bytes %d-%d read, but nothing loads their line %d (loads at %v)",
							tt.name, start, r[0], r[1], line, tt.loads)
					}
				}
			}
		}
	}
}
