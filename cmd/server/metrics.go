package main

// The operations endpoint: -metrics-addr serves /metrics, /healthz and
// /readyz over HTTP on a listener of its own, and -shutdown-delay keeps the
// echo listeners accepting, with /readyz failing, for a while after a
// signal, so that a load balancer stops sending before they close.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/metrics"
)

// opsOptions are the flags of the operations endpoint.
type opsOptions struct {
	addr          string
	shutdownDelay time.Duration
}

// opsShutdownTimeout bounds the HTTP server's own shutdown: scrapes in
// flight get this long to finish.
const opsShutdownTimeout = 5 * time.Second

func (o *opsOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.addr, "metrics-addr", "", "`host:port` to serve /metrics (Prometheus), /healthz and /readyz on over HTTP (empty: off)")
	fs.DurationVar(&o.shutdownDelay, "shutdown-delay", 0,
		"on SIGINT or SIGTERM, fail /readyz at once but keep accepting this long before the listeners close, so load balancers stop sending first (a second signal ends it)")
}

// check returns what is wrong with o, or "".
func (o *opsOptions) check() string {
	if o.shutdownDelay < 0 {
		return "-shutdown-delay must not be negative"
	}
	return ""
}

// opsServer serves /metrics, /healthz and /readyz. Its methods do nothing
// on a nil *opsServer (no -metrics-addr).
type opsServer struct {
	hs     *http.Server
	ready  atomic.Bool
	served chan error
	log    *slog.Logger
}

// startOps instruments cfg with the metrics and serves them on o.addr. It
// returns nil, nil when o.addr is empty. /readyz fails until setReady(true).
func startOps(o opsOptions, cfg *sockfsm.Config, log *slog.Logger) (*opsServer, error) {
	if o.addr == "" {
		return nil, nil
	}
	reg := prometheus.NewRegistry()
	m := metrics.New(metrics.Opts{})
	reg.MustRegister(m, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return nil, fmt.Errorf("-metrics-addr: %w", err)
	}
	m.Instrument(cfg)

	s := &opsServer{served: make(chan error, 1), log: log}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.InstrumentMetricHandler(reg, promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelError),
	})))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok") // the process runs and answers
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !s.ready.Load() {
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	s.hs = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	log.Info("metrics listening", "addr", ln.Addr().String())
	go func() { s.served <- s.hs.Serve(ln) }()
	return s, nil
}

// setReady sets what /readyz answers: 200 if ready, 503 otherwise.
func (s *opsServer) setReady(ready bool) {
	if s != nil {
		s.ready.Store(ready)
	}
}

// shutdown stops the HTTP server, letting scrapes in flight finish within
// opsShutdownTimeout. Call it once the echo server has drained.
func (s *opsServer) shutdown() {
	if s == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), opsShutdownTimeout)
	defer cancel()
	if err := s.hs.Shutdown(ctx); err != nil {
		s.hs.Close()
	}
	if err := <-s.served; !errors.Is(err, http.ErrServerClosed) {
		s.log.Error("metrics server failed", "err", err)
	}
}

// shutdownDelay waits d, with the echo listeners still accepting, once
// /readyz fails, so that load balancers see it and stop sending before the
// listeners close. A signal ends the wait early: it is handed on, in the
// channel returned, to the shutdown that follows, which closes every
// connection at once as it does for a second signal.
func shutdownDelay(d time.Duration, sigs <-chan os.Signal, log *slog.Logger) <-chan os.Signal {
	if d <= 0 {
		return sigs
	}
	log.Info("not ready; still accepting until the shutdown delay ends", "delay", d)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return sigs
	case sig := <-sigs:
		again := make(chan os.Signal, 1)
		again <- sig
		return again
	}
}
