// Command server is an RFC 862 echo server on the sockfsm engine: the server
// of Microsoft's Winsock tutorial, which echoes every chunk it receives and,
// when the client shuts down its side, shuts down its own (our FIN) and
// closes. It serves many connections at once, with every timeout of the
// engine as a flag.
//
// Usage:
//
//	server [flags]
//
// With -v it tells each connection's story the way the tutorial prints it:
//
//	conn 1 127.0.0.1:50412: Bytes received: 14
//	conn 1 127.0.0.1:50412: Bytes sent: 14
//	conn 1 127.0.0.1:50412: Connection closing...
//
// plus each state change. SIGINT or SIGTERM shuts the server down
// gracefully within -shutdown-timeout, aborting what is left at the
// deadline, and exits 0; a second signal closes every connection at once.
// With -metrics-addr it serves Prometheus metrics on /metrics, and /healthz
// and /readyz, which fails from the first signal on (see metrics.go).
//
// It listens on -addr (host:port, or unix:PATH for a Unix socket), or on
// the sockets systemd passes by socket activation (LISTEN_FDS); with
// -tls-cert and -tls-key it serves TLS. SIGHUP restarts it with no downtime
// (-upgrade, on by default except on Windows): the binary starts anew with
// the listening sockets, and this process drains and exits
// (docs/deploy.md).
//
// -driver chooses how connections are driven: loop serves them on event
// loops (package github.com/sockfsm/sockfsm/loop: epoll on Linux; about
// 0.6 KiB per idle connection), goroutine on a goroutine each. The default,
// auto, is loop on Linux, except with TLS, which the loop does not serve:
// then, and on other systems, goroutine. -proxy-protocol runs on either
// (the loop reads each header on a goroutine of its own, then serves the
// socket). An explicit -driver loop with TLS fails at start with the
// loop's error; elsewhere than Linux it logs that it serves with the
// goroutine driver, and does.
//
// Durations and byte limits follow the engine's scheme: 0 means the
// engine's default, a negative value turns the bound off (not allowed for
// -write-timeout and -linger-time).
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
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
	"github.com/sockfsm/sockfsm/loop"
	"github.com/sockfsm/sockfsm/proxy"
)

// DefaultAddr is the tutorial's address.
const DefaultAddr = "localhost:27015"

func main() {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, upgradeSignal)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, sigs, nil))
}

// options are the parsed flags.
type options struct {
	addr            string
	cfg             sockfsm.Config
	shutdownTimeout time.Duration
	logLevel        slog.Level
	verbose         bool
	driver          string
	deployOptions
	ops   opsOptions // -metrics-addr, -shutdown-delay: see metrics.go
	proxy proxy.Mode
}

func parse(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: server [flags]\n\nAn RFC 862 echo server on the sockfsm engine (the Winsock tutorial's server).\n"+
			"Durations and byte limits: 0 means the engine's default, negative means off.\n"+
			"Under systemd socket activation (LISTEN_FDS set) it serves the sockets systemd passed instead of -addr.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&o.addr, "addr", DefaultAddr, "`host:port` to listen on, or unix:PATH for a Unix socket")
	fs.DurationVar(&o.cfg.IdleTimeout, "idle-timeout", sockfsm.DefaultIdleTimeout, "half-close a connection that sends nothing for this long")
	fs.DurationVar(&o.cfg.WriteTimeout, "write-timeout", sockfsm.DefaultWriteTimeout, "abort a connection whose peer does not read our output within this long")
	fs.DurationVar(&o.cfg.LingerTimeout, "linger-timeout", sockfsm.DefaultLingerTimeout, "after our FIN, close if a read waits this long")
	fs.DurationVar(&o.cfg.LingerTime, "linger-time", sockfsm.DefaultLingerTime, "after our FIN, close after lingering this long in total")
	fs.Int64Var(&o.cfg.LingerBytes, "linger-bytes", sockfsm.DefaultLingerBytes, "after our FIN, close after reading this many bytes")
	fs.DurationVar(&o.cfg.MaxLifetime, "max-lifetime", 0, "gracefully close connections open this long (0: the default, off)")
	fs.Int64Var(&o.cfg.MinRate, "min-rate", sockfsm.DefaultMinRate, "gracefully close a peer whose input over a window stays below this many `bytes` per second (negative: off; see sockfsm.Config.MinRate)")
	fs.DurationVar(&o.cfg.MinRateWindow, "min-rate-window", sockfsm.DefaultMinRateWindow, "the window over which -min-rate is judged")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 10*time.Second, "on SIGINT or SIGTERM, abort connections still open after this long")
	fs.IntVar(&o.cfg.MaxConns, "max-conns", 0, "stop accepting at this many open connections (0: unlimited)")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&o.verbose, "v", false, "tell each connection's story on stdout, as the tutorial does")
	fs.StringVar(&o.driver, "driver", "auto", "`auto` (loop on Linux, except with TLS; goroutine otherwise), loop (event loops; on systems other than Linux it serves with the goroutine driver and logs so) or goroutine (a goroutine per connection)")
	addDeployFlags(fs, &o.deployOptions)
	o.ops.register(fs)
	admissionFlags(fs, &o)
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	fail := func(format string, a ...any) error {
		fmt.Fprintf(stderr, "server: "+format+"\n", a...)
		fs.Usage()
		return flag.ErrHelp
	}
	if fs.NArg() > 0 {
		return o, fail("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if err := o.logLevel.UnmarshalText([]byte(*level)); err != nil {
		return o, fail("bad -log-level %q", *level)
	}
	if o.shutdownTimeout <= 0 {
		return o, fail("-shutdown-timeout must be positive")
	}
	applyAdmission(&o)
	if o.driver != "auto" && o.driver != "goroutine" && o.driver != "loop" {
		return o, fail("bad -driver %q: auto, goroutine or loop", o.driver)
	}
	if err := o.cfg.Validate(); err != nil {
		return o, fail("%v", err)
	}
	if msg := o.ops.check(); msg != "" {
		return o, fail("%s", msg)
	}
	return o, nil
}

// run is the whole program. It returns the exit code: 2 for bad flags, 1 if
// the server cannot listen or fails, 0 after a signal-driven shutdown. ready,
// if not nil, receives the listening address.
func run(args []string, stdout, stderr io.Writer, sigs <-chan os.Signal, ready chan<- net.Addr) int {
	o, err := parse(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
			return 0
		}
		return 2
	}
	if err != nil {
		return 2
	}
	cfgSrv := newServer(o, stdout, stderr)
	log := cfgSrv.Config.Logger
	ops, err := startOps(o.ops, &cfgSrv.Config, log)
	if err != nil {
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	defer ops.shutdown() // after the echo server has drained

	sup, err := newSupervision(o.deployOptions, log)
	if err != nil {
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	defer sup.stop()
	lns, err := sup.listen(o)
	if err == nil {
		lns, err = serveTLS(o.deployOptions, lns, log)
	}
	if err == nil {
		err = sup.ready()
	}
	if err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	sigs = sup.signals(sigs)
	driver := chooseDriver(o)
	log.Info("driver", "driver", driver)
	srv := withDriver(driver, cfgSrv)

	served := make(chan error, len(lns))
	for _, ln := range lns {
		log.Info("listening", "addr", ln.Addr().String())
		go func() { served <- srv.Serve(ln) }()
	}
	ops.setReady(true)
	if ready != nil {
		ready <- lns[0].Addr()
	}

	pending := len(lns)
	select {
	case err := <-served:
		pending--
		log.Error("serve failed", "err", err)
		srv.Close()
		for ; pending > 0; pending-- {
			<-served
		}
		return 1
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String(), "timeout", o.shutdownTimeout)
	}
	ops.setReady(false) // /readyz fails from here on, before the listeners close
	sigs = shutdownDelay(o.ops.shutdownDelay, sigs, log)

	ctx, cancel := context.WithTimeout(context.Background(), o.shutdownTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	select {
	case err = <-done:
	case sig := <-sigs:
		log.Info("closing every connection", "signal", sig.String())
		srv.Close()
		err = <-done
	}
	if err != nil {
		log.Warn("shutdown deadline passed: connections still open were aborted", "err", err)
	}
	code := 0
	for ; pending > 0; pending-- {
		if err := <-served; !errors.Is(err, sockfsm.ErrServerClosed) {
			log.Error("serve failed", "err", err)
			code = 1
		}
	}
	log.Info("server stopped")
	return code
}

// newServer returns the server o describes (not yet serving). Its
// Config.Logger, which run logs to as well, writes to stderr at o's level;
// with -v, the connections' stories go to stdout.
func newServer(o options, stdout, stderr io.Writer) *sockfsm.Server {
	o.cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: o.logLevel}))
	out := &storyWriter{w: stdout}
	if o.verbose {
		o.cfg.OnStateChange = func(c sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
			out.printf(c, "%s -> %s (%s)", from, to, ev)
		}
	}
	return &sockfsm.Server{
		Config: o.cfg,
		NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler {
			if o.verbose {
				return &tutorialEcho{out: out}
			}
			return sockfsm.Echo{}
		},
	}
}

// server is what run needs of a server: sockfsm.Server and loop.Server
// both are one.
type server interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
	Close() error
}

// chooseDriver resolves -driver auto: the loop on Linux, unless TLS is on
// (the loop does not serve it); the goroutine driver otherwise.
func chooseDriver(o options) string {
	if o.driver != "auto" {
		return o.driver
	}
	if runtime.GOOS != "linux" || o.tlsCert != "" || o.tlsKey != "" {
		return "goroutine"
	}
	return "loop"
}

// withDriver returns srv itself for the goroutine driver, or a loop.Server
// with srv's Config (hooks and metrics included) and handlers for the loop
// driver.
func withDriver(driver string, srv *sockfsm.Server) server {
	if driver == "loop" {
		return &loop.Server{Config: srv.Config, NewHandler: srv.NewHandler}
	}
	return srv
}

// listenTCP listens on addr with listen. For the host name "localhost" it
// listens on every loopback address the name resolves to (127.0.0.1 and
// ::1, usually), on the same port, so that clients that try IPv6 first find
// the server too.
func listenTCP(addr string, listen listenFunc) ([]net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if host != "localhost" {
		ln, err := listen("tcp", addr)
		if err != nil {
			return nil, err
		}
		return []net.Listener{ln}, nil
	}
	ips, err := net.DefaultResolver.LookupIPAddr(context.Background(), host)
	if err != nil {
		return nil, fmt.Errorf("listen tcp %s: %w", addr, err)
	}
	var lns []net.Listener
	for _, ip := range ips {
		if !ip.IP.IsLoopback() {
			continue
		}
		ln, err := listen("tcp", net.JoinHostPort(ip.String(), port))
		if err != nil {
			if len(lns) > 0 && !ip.IP.Equal(net.IPv4(127, 0, 0, 1)) {
				continue // the first address is served; this one may be unavailable (no IPv6)
			}
			for _, l := range lns {
				l.Close()
			}
			return nil, err
		}
		lns = append(lns, ln)
		if port == "0" || port == "" {
			_, port, _ = net.SplitHostPort(ln.Addr().String())
		}
	}
	if len(lns) == 0 {
		return nil, fmt.Errorf("listen tcp %s: no loopback address", addr)
	}
	return lns, nil
}

// storyWriter prints the connections' stories, one whole line at a time.
type storyWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *storyWriter) printf(c sockfsm.ConnInfo, format string, a ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Fprintf(s.w, "conn %d %s: %s\n", c.ID, c.RemoteAddr, fmt.Sprintf(format, a...))
}

// tutorialEcho is the echo handler that tells its story as the tutorial's
// server does.
type tutorialEcho struct{ out *storyWriter }

func (t *tutorialEcho) OnData(c *sockfsm.Conn, p []byte) {
	t.out.printf(c.Info(), "Bytes received: %d", len(p))
	n, err := c.Write(p)
	if err != nil {
		t.out.printf(c.Info(), "send failed: %v", err)
		return
	}
	t.out.printf(c.Info(), "Bytes sent: %d", n)
}

func (t *tutorialEcho) OnPeerClose(c *sockfsm.Conn) {
	t.out.printf(c.Info(), "Connection closing...")
}

func (t *tutorialEcho) OnClose(c *sockfsm.Conn, info sockfsm.CloseInfo) {
	how := "closed"
	if info.Aborted() {
		how = "aborted (RST)"
	}
	line := fmt.Sprintf("Connection %s: reason %s, linger %s, %d bytes received, %d bytes sent",
		how, info.Reason, info.Linger, info.BytesRead, info.BytesWritten)
	if info.Err != nil {
		line += ": " + info.Err.Error()
	}
	t.out.printf(c.Info(), "%s", line)
}
