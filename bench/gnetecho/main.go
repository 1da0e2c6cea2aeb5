// Command gnetecho is the event-loop reference of bench/compare.sh: a TCP
// echo server on gnet v2 (github.com/panjf2000/gnet/v2), in a module of its
// own so that sockfsm's go.mod does not carry gnet.
//
// It runs -loops event loops (one by default, the setup) and writes
// back every chunk it reads, as gnet's own echo example does. It has no
// timeouts, and it cannot answer after the peer's FIN: gnet closes the
// connection when a read returns 0 (eventloop_unix.go, read → el.close), so
// a client that half-closes gets its echo (if it was written before the
// FIN was read) and then the server's FIN, never more. loadgen's three
// modes need no more than that: a half-closing churn client reads its echo
// and then EOF.
//
// Usage:
//
//	gnetecho [-addr 127.0.0.1:27018] [-loops 1] [-shutdown-timeout 10s]
//
// It listens on loopback addresses only, and logs "listening" with the
// address to stderr (with port 0 the address is the one chosen). SIGINT or
// SIGTERM stops the engine (Engine.Stop): gnet closes every connection (a
// FIN when no input is left unread, as for an idle connection), and the
// command exits 0, or 1 if the engine had not stopped within
// -shutdown-timeout.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/panjf2000/gnet/v2"
	"golang.org/x/sys/unix"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], os.Stderr, sigs))
}

// echo is the event handler.
type echo struct {
	gnet.BuiltinEventEngine
	log    *slog.Logger
	booted chan gnet.Engine
}

// OnBoot logs the address listened on and hands the engine over, for Stop.
func (e *echo) OnBoot(eng gnet.Engine) gnet.Action {
	addr, err := listenAddr(eng)
	if err != nil {
		e.log.Error("cannot read the listener's address", "err", err)
		return gnet.Shutdown
	}
	e.log.Info("listening", "addr", addr)
	e.booted <- eng
	return gnet.None
}

// OnTraffic writes back everything read.
func (e *echo) OnTraffic(c gnet.Conn) gnet.Action {
	buf, _ := c.Next(-1)
	if _, err := c.Write(buf); err != nil {
		return gnet.Close
	}
	return gnet.None
}

// gnetLog is gnet's logger on the command's slog.Logger, on stderr: gnet's
// own would print its start-up line on stdout.
type gnetLog struct{ log *slog.Logger }

func (g gnetLog) Debugf(format string, args ...any) { g.log.Debug(fmt.Sprintf(format, args...)) }
func (g gnetLog) Infof(format string, args ...any)  { g.log.Debug(fmt.Sprintf(format, args...)) }
func (g gnetLog) Warnf(format string, args ...any)  { g.log.Warn(fmt.Sprintf(format, args...)) }
func (g gnetLog) Errorf(format string, args ...any) { g.log.Error(fmt.Sprintf(format, args...)) }
func (g gnetLog) Fatalf(format string, args ...any) {
	g.log.Error(fmt.Sprintf(format, args...))
	os.Exit(1)
}

// listenAddr returns the address of eng's listener (its port, when the
// flag's was 0).
func listenAddr(eng gnet.Engine) (string, error) {
	fd, err := eng.Dup()
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return "", err
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String(), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)).String(), nil
	}
	return "", fmt.Errorf("listener address %T: not TCP", sa)
}

// errNotLoopback refuses a listening address off this machine.
var errNotLoopback = errors.New("not a loopback address (127.0.0.0/8, ::1 or localhost)")

// checkAddr accepts host:port whose host is localhost or a loopback IP.
func checkAddr(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if ip, err := netip.ParseAddr(host); host != "localhost" && (err != nil || !ip.IsLoopback()) {
		return fmt.Errorf("%q: %w", addr, errNotLoopback)
	}
	return nil
}

// run is the whole program; it returns the exit code.
func run(args []string, stderr io.Writer, sigs <-chan os.Signal) int {
	fs := flag.NewFlagSet("gnetecho", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:27018", "loopback `host:port` to listen on")
	loops := fs.Int("loops", 1, "event loops")
	shutdownTimeout := fs.Duration("shutdown-timeout", 10*time.Second, "on SIGINT or SIGTERM, how long to wait for the engine to stop")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *loops < 1 || *loops > 256 || *shutdownTimeout <= 0 {
		fmt.Fprintln(stderr, "gnetecho: unexpected arguments, -loops not within 1 to 256, or non-positive -shutdown-timeout")
		return 2
	}
	if err := checkAddr(*addr); err != nil {
		fmt.Fprintf(stderr, "gnetecho: -addr: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	h := &echo{log: log, booted: make(chan gnet.Engine, 1)}
	served := make(chan error, 1)
	go func() {
		served <- gnet.Run(h, "tcp://"+*addr,
			gnet.WithNumEventLoop(*loops),
			gnet.WithLogger(gnetLog{log}))
	}()

	var eng gnet.Engine
	select {
	case err := <-served:
		log.Error("gnet did not start", "err", err)
		return 1
	case eng = <-h.booted:
	}
	select {
	case err := <-served:
		log.Error("gnet stopped", "err", err)
		return 1
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String(), "timeout", *shutdownTimeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
	defer cancel()
	if err := eng.Stop(ctx); err != nil {
		log.Error("gnet did not stop", "err", err)
		return 1
	}
	if err := <-served; err != nil {
		log.Warn("gnet.Run", "err", err)
	}
	log.Info("server stopped")
	return 0
}
