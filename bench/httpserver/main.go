// Command httpserver is the HTTP server bench/http.sh measures: net/http
// with a small response, over a plain net.Listener or over sockfsm's
// Listener (the net.Conn face), so that the two are compared with the same
// handler in the same run. It is a measurement tool, not a command a user
// installs.
//
//	httpserver -listener sockfsm -addr 127.0.0.1:0
//
// It logs "listening addr=HOST:PORT" on stderr, and shuts down gracefully
// on SIGINT or SIGTERM: http.Server.Shutdown, then, for sockfsm,
// Listener.Shutdown.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "httpserver:", err)
		os.Exit(1)
	}
}

// body is the response: small, as the benchmark asks.
var body = []byte("hello, world\n")

// handler answers every request with body.
func handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})
}

func run(args []string) error {
	fs := flag.NewFlagSet("httpserver", flag.ContinueOnError)
	kind := fs.String("listener", "sockfsm", "the listener: plain or sockfsm")
	addr := fs.String("addr", "127.0.0.1:0", "the address to listen on (loopback)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return serve(ctx, *kind, *addr, log, func(a net.Addr) { log.Info("listening", "addr", a.String()) })
}

// serve serves on addr until ctx ends, then shuts down gracefully. ready is
// called with the address once it listens.
func serve(ctx context.Context, kind, addr string, log *slog.Logger, ready func(net.Addr)) error {
	var ln net.Listener
	var sl *sockfsm.Listener
	var err error
	switch kind {
	case "plain":
		ln, err = net.Listen("tcp", addr)
	case "sockfsm":
		sl, err = sockfsm.Listen("tcp", addr, sockfsm.Config{Logger: log})
		ln = sl
	default:
		return fmt.Errorf("-listener %q: want plain or sockfsm", kind)
	}
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: handler(), ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelError)}
	ready(ln.Addr())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
	case err := <-served:
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return err
	}
	if sl != nil {
		if err := sl.Shutdown(sctx); err != nil {
			return err
		}
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
