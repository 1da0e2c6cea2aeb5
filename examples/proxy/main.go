// Command proxy is a TCP proxy on sockfsm.Server: each client connection is
// relayed to a connection of its own to the upstream, in both directions,
// with bounded memory (backpressure both ways) and half-closes carried
// through (proxy.go).
//
// Usage:
//
//	go run ./examples/proxy -listen 127.0.0.1:27017 -upstream 127.0.0.1:27015
//
// With the repository's echo server as the upstream (go run ./cmd/server),
// the tutorial's exchange works through the proxy:
//
//	echo "this is a test" | socat - TCP:127.0.0.1:27017
//
// SIGINT or SIGTERM shuts the proxy down gracefully within
// -shutdown-timeout: it stops accepting, lets exchanges in flight finish,
// and aborts what is left at the deadline.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], os.Stderr, sigs, nil))
}

// run is the whole program; it returns the exit code. ready, if not nil,
// receives the listening address.
func run(args []string, stderr io.Writer, sigs <-chan os.Signal, ready chan<- net.Addr) int {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:27017", "`host:port` to listen on")
	upstream := fs.String("upstream", "", "`host:port` to relay to (required)")
	maxBuffer := fs.Int("max-buffer", DefaultMaxBuffer, "client input held for the upstream before the client is paused")
	maxPending := fs.Int("max-pending", 64<<10, "upstream output queued for a client before the upstream is paused (Config.MaxPendingOutput)")
	idle := fs.Duration("idle-timeout", 5*time.Minute, "close a connection silent both ways for this long, also while waiting for the upstream's answer after the client's FIN (negative: never)")
	upWrite := fs.Duration("upstream-write-timeout", DefaultWriteTimeout, "abort a client whose upstream takes none of its input for this long")
	shutdownTimeout := fs.Duration("shutdown-timeout", 10*time.Second, "on SIGINT or SIGTERM, abort connections still open after this long")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *upstream == "" || *maxBuffer <= 0 || *maxPending <= 0 || *upWrite <= 0 || *shutdownTimeout <= 0 {
		fmt.Fprintln(stderr, "proxy: bad arguments (-upstream is required)")
		fs.Usage()
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))

	px := &Proxy{Upstream: *upstream, MaxBuffer: *maxBuffer, WriteTimeout: *upWrite, Logger: log}
	srv := &sockfsm.Server{
		Config: sockfsm.Config{
			MaxPendingOutput: *maxPending,
			IdleTimeout:      *idle,
			// After the upstream's FIN the engine lingers: the client may
			// still be sending, and its input still goes to the upstream.
			// Bound that by time (LingerTime), not by bytes.
			LingerBytes: -1,
			// The proxy does not know the protocol it carries: a small
			// request whose answer the upstream takes long to send, or
			// a one-way stream with pauses, is input below MinRate.
			MinRate: -1,
			Logger:  log,
		},
		NewHandler: px.NewHandler,
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(stderr, "proxy: %v\n", err)
		return 1
	}
	log.Info("listening", "addr", ln.Addr().String(), "upstream", *upstream)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	if ready != nil {
		ready <- ln.Addr()
	}

	select {
	case err := <-served:
		log.Error("serve failed", "err", err)
		srv.Close()
		return 1
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("shutdown deadline passed: connections still open were aborted", "err", err)
	}
	<-served
	log.Info("stopped")
	return 0
}
