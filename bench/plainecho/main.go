// Command plainecho is the baseline of bench/compare.sh: a plain
// goroutine-per-connection TCP echo server on net.TCPConn (package
// github.com/sockfsm/sockfsm/bench/plain) with the same graceful close as
// cmd/server: echo each chunk; on the peer's FIN, our FIN and close; after
// 60s without input, our FIN, then a linger bounded by 5s per read and 30s in
// total, then close; a write not done within 60s is reset.
//
// Usage:
//
//	plainecho [-addr 127.0.0.1:27016] [-shutdown-timeout 10s]
//
// It listens on loopback addresses only. It logs "listening" with the
// address to stderr (with port 0 the address is the one chosen). SIGINT or
// SIGTERM stops accepting, half-closes every connection as on its idle
// timeout, resets what is left after -shutdown-timeout, and exits 0.
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

	"github.com/sockfsm/sockfsm/bench/internal/probe"
	"github.com/sockfsm/sockfsm/bench/plain"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], os.Stderr, sigs))
}

// run is the whole program; it returns the exit code.
func run(args []string, stderr io.Writer, sigs <-chan os.Signal) int {
	fs := flag.NewFlagSet("plainecho", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:27016", "loopback `host:port` to listen on")
	shutdownTimeout := fs.Duration("shutdown-timeout", 10*time.Second, "on SIGINT or SIGTERM, reset connections still open after this long")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	if fs.NArg() > 0 || *shutdownTimeout <= 0 {
		fmt.Fprintln(stderr, "plainecho: unexpected arguments or non-positive -shutdown-timeout")
		return 2
	}
	if err := probe.CheckLoopback(*addr); err != nil {
		fmt.Fprintf(stderr, "plainecho: %v\n", err)
		return 2
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(stderr, "plainecho: %v\n", err)
		return 1
	}
	srv := &plain.Server{}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info("listening", "addr", ln.Addr().String())

	select {
	case err := <-served:
		log.Error("serve failed", "err", err)
		srv.Shutdown(context.Background())
		return 1
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String(), "timeout", *shutdownTimeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("shutdown deadline passed: connections still open were reset", "err", err)
	}
	<-served
	log.Info("server stopped")
	return 0
}
