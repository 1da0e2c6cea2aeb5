module github.com/sockfsm/sockfsm

go 1.26.8

require (
	github.com/cockroachdb/datadriven v1.0.3
	github.com/looplab/fsm v1.0.3
	github.com/pires/go-proxyproto v0.15.0
	go.uber.org/goleak v1.3.0
	golang.org/x/net v0.62.0
	pgregory.net/rapid v1.3.0
)

require github.com/pmezard/go-difflib v1.0.0 // indirect
