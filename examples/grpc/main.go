// Command grpc serves a gRPC service over a sockfsm.Listener: every HTTP/2
// connection gRPC accepts is a *sockfsm.NetConn, which the engine drives. The
// service, Counter (service.go), has a unary method, Echo, and a
// server-streaming one, Count; it needs no protoc: its messages are Go
// structs marshaled as JSON by a codec registered with gRPC, and its
// grpc.ServiceDesc is written by hand.
//
// Usage:
//
//	go run . -addr 127.0.0.1:50051
//
// SIGINT or SIGTERM shuts the server down in two steps:
//
//  1. grpc.Server.GracefulStop: no new connections or streams; the streams
//     in flight run to their end (for at most -grace, after which
//     grpc.Server.Stop cancels them), and gRPC closes each connection.
//  2. sockfsm.Listener.Shutdown: each connection gRPC closed flushes what
//     was written, sends our FIN and lingers until the client's FIN, so
//     that the client's last frames are never answered with an RST that
//     would destroy the server's last ones; connections still open after
//     -shutdown-timeout are aborted. It returns only when every socket is
//     closed.
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

	"google.golang.org/grpc"

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
	fs := flag.NewFlagSet("grpc", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:50051", "`host:port` to listen on")
	grace := fs.Duration("grace", 30*time.Second, "on SIGINT or SIGTERM, how long streams in flight may run before they are cancelled")
	shutdownTimeout := fs.Duration("shutdown-timeout", 10*time.Second, "then how long connections may linger before they are aborted")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *grace <= 0 || *shutdownTimeout <= 0 {
		fmt.Fprintln(stderr, "grpc: bad arguments")
		fs.Usage()
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))

	ln, err := sockfsm.Listen("tcp", *addr, sockfsm.Config{Logger: log})
	if err != nil {
		fmt.Fprintf(stderr, "grpc: %v\n", err)
		return 1
	}
	srv := grpc.NewServer()
	srv.RegisterService(&CounterServiceDesc, &Counter{})
	log.Info("listening", "addr", ln.Addr().String())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	if ready != nil {
		ready <- ln.Addr()
	}

	code := 0
	select {
	case err := <-served:
		log.Error("serve failed", "err", err)
		served <- nil // for shutdown
		code = 1
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String())
	}
	if err := shutdown(srv, ln, *grace, *shutdownTimeout); err != nil {
		log.Warn("shutdown deadline passed: connections still open were aborted", "err", err)
	}
	if err := <-served; err != nil {
		log.Error("serve failed", "err", err)
		code = 1
	}
	log.Info("stopped")
	return code
}

// shutdown stops srv, which serves ln, gracefully: GracefulStop lets the
// streams in flight finish (Stop cancels those still running after grace),
// then ln.Shutdown waits for the connections' lingers, aborting those still
// open after timeout. It returns when every socket is closed: nil if every
// connection closed gracefully, context.DeadlineExceeded if some were
// aborted.
func shutdown(srv *grpc.Server, ln *sockfsm.Listener, grace, timeout time.Duration) error {
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		srv.Stop() // cancels the streams still running; GracefulStop then returns
		<-stopped
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return ln.Shutdown(ctx)
}
