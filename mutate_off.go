//go:build !sockfsm_mutate

package sockfsm

// mutating is false in every normal build: see mutate.go.
const mutating = false
