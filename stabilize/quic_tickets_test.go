package stabilize

import (
	"testing"
	"time"
)

// Session ticket keys rotate: the key of one period is accepted for
// ticketKeysKept periods, then dropped; within a period they stay the same.
func TestSessionTicketKeysRotate(t *testing.T) {
	now := time.Now()
	first := sessionTicketKeys(now)
	if len(first) != ticketKeysKept {
		t.Fatalf("%d keys, want %d", len(first), ticketKeysKept)
	}
	if again := sessionTicketKeys(now); again[0] != first[0] {
		t.Fatal("the current key changed within its period")
	}
	for i := 1; i <= ticketKeysKept; i++ {
		later := sessionTicketKeys(now.Add(time.Duration(i) * ticketKeyRotation))
		if later[0] == first[0] {
			t.Fatalf("%d rotations later the current key is the same", i)
		}
		kept := i < ticketKeysKept
		if got := later[min(i, ticketKeysKept-1)] == first[0]; got != kept {
			t.Fatalf("%d rotations later the first key is accepted: %t, want %t", i, got, kept)
		}
	}
}
