// Command http serves net/http on a sockfsm.Listener: the same http.Server,
// given a net.Listener whose connections the engine drives. A handler that
// refuses an upload without reading it (413) no longer has its response
// destroyed by the kernel's RST (golang/go#51109): the engine lingers,
// reading and discarding the rest of the body, before it closes.
//
// Usage:
//
//	go run ./examples/http -addr 127.0.0.1:8080
//	curl http://127.0.0.1:8080/
//	head -c 3000000 /dev/zero | curl -s -o /dev/null -w '%{http_code}\n' --data-binary @- http://127.0.0.1:8080/upload
//
// SIGINT or SIGTERM shuts the server down gracefully within
// -shutdown-timeout: http.Server.Shutdown lets the responses in flight
// finish, then Listener.Shutdown waits for every socket to close (its
// linger included), aborting what is left at the deadline.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm"
)

// MaxUpload is the largest body /upload accepts. A larger one is refused
// with 413 before any of it is read.
const MaxUpload = 1 << 20

// Config is the engine's configuration for the server's connections.
func Config(logger *slog.Logger) sockfsm.Config {
	return sockfsm.Config{
		// The linger after our FIN reads and discards the body of a
		// refused upload until the client's FIN. Its byte bound (1 MiB
		// by default) must be above the largest upload a client may
		// still be sending when it is refused, or the kernel answers the
		// rest with RST; beyond it, the bound stops a client that streams
		// forever.
		LingerBytes: 64 << 20,
		Logger:      logger,
	}
}

// NewServer returns the http.Server: GET / says hello; POST /upload reads
// a body of at most MaxUpload bytes and answers 413, without reading it,
// to a larger one.
func NewServer(logger *slog.Logger) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from net/http on sockfsm\n")
	})
	mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > MaxUpload {
			http.Error(w, "request body too large", http.StatusRequestEntityTooLarge)
			return
		}
		n, err := io.Copy(io.Discard, http.MaxBytesReader(w, r.Body, MaxUpload))
		if err != nil {
			http.Error(w, "request body too large", http.StatusRequestEntityTooLarge)
			return
		}
		fmt.Fprintf(w, "received %d bytes\n", n)
	})
	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
}

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], os.Stderr, sigs, nil))
}

// run is the whole program; it returns the exit code. ready, if not nil,
// receives the listening address.
func run(args []string, stderr io.Writer, sigs <-chan os.Signal, ready chan<- net.Addr) int {
	fs := flag.NewFlagSet("http", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "`host:port` to listen on")
	shutdownTimeout := fs.Duration("shutdown-timeout", 10*time.Second, "on SIGINT or SIGTERM, abort connections still open after this long")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *shutdownTimeout <= 0 {
		fmt.Fprintln(stderr, "http: bad arguments")
		fs.Usage()
		return 2
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))

	ln, err := sockfsm.Listen("tcp", *addr, Config(logger))
	if err != nil {
		fmt.Fprintf(stderr, "http: %v\n", err)
		return 1
	}
	srv := NewServer(logger)
	logger.Info("listening", "addr", ln.Addr().String())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	if ready != nil {
		ready <- ln.Addr()
	}

	select {
	case err := <-served:
		logger.Error("serve failed", "err", err)
		ln.Shutdown(context.Background())
		return 1
	case sig := <-sigs:
		logger.Info("shutting down", "signal", sig.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
	defer cancel()
	// First net/http's: it closes the listener and the idle keep-alive
	// connections, and waits for the responses in flight.
	if err := srv.Shutdown(ctx); err != nil {
		logger.Warn("http.Server.Shutdown", "err", err)
	}
	// Then the Listener's: it closes what is left gracefully and returns
	// once every socket is closed, lingers included, aborting (RST) what
	// is still open at the deadline.
	if err := ln.Shutdown(ctx); err != nil {
		logger.Warn("shutdown deadline passed: connections still open were aborted", "err", err)
	}
	<-served
	logger.Info("stopped")
	return 0
}
