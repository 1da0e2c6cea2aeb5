// Package chaos holds sockfsm's chaos tests: the echo server behind an
// in-process toxiproxy (github.com/Shopify/toxiproxy/v2) that adds latency,
// throttles bandwidth, slices segments, resets connections, delays closes
// and swallows data, while clients check every byte that comes back.
//
// It is a module of its own, so that toxiproxy and its dependencies stay
// out of sockfsm's module graph: `go test ./...` at the repository's root
// does not run it. Run it from this directory:
//
//	cd chaos && go test -race ./...
package chaos
