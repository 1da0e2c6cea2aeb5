//go:build sockfsm_mutate

package sockfsm

// mutating is true under the sockfsm_mutate build tag: see mutate.go.
const mutating = true
