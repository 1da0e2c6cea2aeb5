// Command pubsub is a line-based chat room on sockfsm.Server: each line a
// client sends is pushed to every other client. The pushing happens on one
// goroutine, the hub's (hub.go), with Conn.Write, from outside the
// connections' callbacks.
//
// Usage:
//
//	go run ./examples/pubsub -addr 127.0.0.1:27016
//
// then, in two or more terminals:
//
//	socat - TCP:127.0.0.1:27016
//
// A subscriber that does not read cannot make the server's memory grow:
// once its output reaches -max-pending, the hub pauses it (it misses the
// messages that follow) until its queue drains, and closes it gracefully
// (what was queued, then FIN) after more than -max-full messages missed in a
// row. SIGINT or SIGTERM shuts the server down gracefully: every client gets
// what was queued for it, then FIN.
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
	fs := flag.NewFlagSet("pubsub", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:27016", "`host:port` to listen on")
	maxFull := fs.Int("max-full", DefaultMaxFull, "close a subscriber that missed more than this many messages in a row because it did not read")
	maxLine := fs.Int("max-line", DefaultMaxLine, "longest line accepted, in bytes, newline included")
	maxPending := fs.Int("max-pending", 64<<10, "output queued per subscriber before it is paused (Config.MaxPendingOutput)")
	idle := fs.Duration("idle-timeout", 10*time.Minute, "close a connection silent both ways for this long (negative: never)")
	shutdownTimeout := fs.Duration("shutdown-timeout", 10*time.Second, "on SIGINT or SIGTERM, abort connections still open after this long")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *maxLine <= 0 || *maxPending <= 0 || *shutdownTimeout <= 0 {
		fmt.Fprintln(stderr, "pubsub: bad arguments")
		fs.Usage()
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))

	hub := NewHub(Options{MaxFull: *maxFull, MaxLine: *maxLine, Logger: log})
	defer hub.Close()
	srv := &sockfsm.Server{
		Config: sockfsm.Config{MaxPendingOutput: *maxPending, IdleTimeout: *idle, Logger: log,
			// A chat line is not answered to its sender: a user who types a
			// line a minute sends far below any MinRate. IdleTimeout bounds
			// silence.
			MinRate: -1},
		NewHandler: hub.NewHandler,
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(stderr, "pubsub: %v\n", err)
		return 1
	}
	log.Info("listening", "addr", ln.Addr().String())
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
	st := hub.Stats()
	log.Info("stopped", "published", st.Published, "delivered", st.Delivered, "dropped", st.Dropped, "evicted", st.Evicted)
	return 0
}
