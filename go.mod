module github.com/sockfsm/sockfsm

go 1.26.8

require (
	github.com/looplab/fsm v1.0.3
	go.uber.org/goleak v1.3.0
	golang.org/x/net v0.62.0
)

require pgregory.net/rapid v1.3.0 // indirect
