//go:build !race

package sockfsm

// raceEnabled reports whether the race detector is on.
const raceEnabled = false
