//go:build !race

package stabilize

// raceEnabled: the tests run under the race detector.
const raceEnabled = false
