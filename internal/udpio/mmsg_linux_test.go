package udpio

import (
	"testing"
	"unsafe"
)

// struct mmsghdr is a msghdr and an unsigned int, padded to the msghdr's
// alignment: 64 bytes where pointers have 8, 32 where they have 4 (386,
// arm). A wrong size makes recvmmsg and sendmmsg walk off the array.
func TestMmsghdrSize(t *testing.T) {
	want := uintptr(64)
	if unsafe.Sizeof(uintptr(0)) == 4 {
		want = 32
	}
	if got := unsafe.Sizeof(mmsghdr{}); got != want {
		t.Fatalf("mmsghdr is %d bytes, want %d", got, want)
	}
}
