// Package metrics exports a sockfsm server's connections as Prometheus
// metrics: the connections open in each lifecycle state, the transitions
// they take, how they closed and lingered, the bytes they carried, how long
// they lived, and the accept loop's errors and waits at MaxConns.
//
// It attaches to a [sockfsm.Config] through the Config's hooks, so the core
// package does not import Prometheus:
//
//	m := metrics.New(metrics.Opts{})
//	reg := prometheus.NewRegistry()
//	reg.MustRegister(m)
//	srv := &sockfsm.Server{Config: cfg, NewHandler: newHandler}
//	m.Instrument(&srv.Config) // before Serve; keeps the hooks already set
//	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
//
// The hook called on every transition allocates nothing: the series of
// every state, edge and close reason exist from New on (at zero, so that
// rate() and absent() work from the first scrape) and are picked by index.
//
// The metrics, with the default namespace "sockfsm":
//
//   - sockfsm_connections{state}: gauge of the connections open in each
//     state (every state but closed).
//   - sockfsm_connections_accepted_total: counter of the connections that
//     entered Accepted.
//   - sockfsm_transitions_total{from,event,to}: counter of the transitions,
//     one series per edge of the lifecycle's table.
//   - sockfsm_connections_closed_total{reason}: counter of closed
//     connections by CloseInfo.Reason.
//   - sockfsm_linger_endings_total{ending}: counter of closed connections by
//     how the linger after our FIN ended (CloseInfo.Linger).
//   - sockfsm_received_bytes_total, sockfsm_sent_bytes_total,
//     sockfsm_linger_discarded_bytes_total: counters of bytes, added when
//     each connection closes.
//   - sockfsm_connection_duration_seconds: histogram of how long closed
//     connections lived.
//   - sockfsm_accept_errors_total: counter of errors from Accept.
//   - sockfsm_max_conns_wait_seconds: histogram of the accept loop's waits
//     at MaxConns.
//   - sockfsm_refused_total{reason}: counter of connections refused before
//     an engine ran them, fed by [Metrics.Refused].
package metrics

import (
	"net"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/fsm"
)

// Opts configures the metrics. The zero value is ready to use.
type Opts struct {
	// Namespace prefixes every metric's name. Default "sockfsm".
	Namespace string
	// Subsystem, if set, comes between the namespace and the name.
	Subsystem string
	// ConstLabels are added to every series: set them to tell apart two
	// servers registered with the same registry.
	ConstLabels prometheus.Labels
	// DurationBuckets are the upper bounds, in seconds, of the connection
	// duration histogram. Default 1 ms to about 70 minutes, ×4 each.
	DurationBuckets []float64
	// WaitBuckets are the upper bounds, in seconds, of the MaxConns wait
	// histogram. Default 100 µs to 100 s, ×10 each.
	WaitBuckets []float64
	// RefuseReasons are reasons for Refused whose series exist, at zero,
	// from the start, beside those of sockfsm.RefusalReason (which
	// Instrument's OnRefuse gives). Others are created by their first
	// Refused.
	RefuseReasons []string
}

// DefaultDurationBuckets are the connection duration histogram's default
// upper bounds, in seconds: 1 ms to about 70 minutes.
var DefaultDurationBuckets = prometheus.ExponentialBuckets(0.001, 4, 12)

// DefaultWaitBuckets are the MaxConns wait histogram's default upper
// bounds, in seconds: 100 µs to 100 s.
var DefaultWaitBuckets = prometheus.ExponentialBuckets(0.0001, 10, 7)

// Metrics holds the metrics of the connections of the Configs it
// instruments. It is a prometheus.Collector: register it once. One Metrics
// may instrument several Configs; their connections are then counted
// together.
type Metrics struct {
	nEvents int

	// The series the hooks update, picked by index.
	open        []prometheus.Gauge   // by fsm.State; nil for closed
	transitions []prometheus.Counter // by from*nEvents+event; nil off the table
	closes      []prometheus.Counter // by sockfsm.Reason
	lingers     []prometheus.Counter // by sockfsm.LingerEnd
	closeOther  prometheus.Counter   // a Reason New did not know
	lingerOther prometheus.Counter   // a LingerEnd New did not know

	accepted                     prometheus.Counter
	bytesIn, bytesOut, discarded prometheus.Counter
	duration, maxConnsWait       prometheus.Histogram
	acceptErrors                 prometheus.Counter

	openVec                      *prometheus.GaugeVec
	transCounters, closeCounters *prometheus.CounterVec
	lingerCounters, refusedVec   *prometheus.CounterVec
	collectors                   []prometheus.Collector

	refusedMu sync.RWMutex
	refused   map[string]prometheus.Counter // refusedVec's children, by reason
}

// New returns the metrics o describes, every series at zero.
func New(o Opts) *Metrics {
	if o.Namespace == "" {
		o.Namespace = "sockfsm"
	}
	if o.DurationBuckets == nil {
		o.DurationBuckets = DefaultDurationBuckets
	}
	if o.WaitBuckets == nil {
		o.WaitBuckets = DefaultWaitBuckets
	}
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: o.Namespace, Subsystem: o.Subsystem, Name: name, Help: help, ConstLabels: o.ConstLabels}
	}
	m := &Metrics{nEvents: len(fsm.Events()), refused: map[string]prometheus.Counter{}}

	m.openVec = prometheus.NewGaugeVec(prometheus.GaugeOpts(opts("connections",
		"Connections open, by lifecycle state: accepted (not started yet: a TLS handshake in progress), receiving, sending, half-closing, half-closed (our FIN is out: lingering), closing, aborting.")),
		[]string{"state"})
	states := fsm.States()
	m.open = make([]prometheus.Gauge, len(states))
	for _, s := range states {
		if !s.Terminal() {
			m.open[s] = m.openVec.WithLabelValues(s.String())
		}
	}

	m.transCounters = prometheus.NewCounterVec(prometheus.CounterOpts(opts("transitions_total",
		"Lifecycle transitions taken, by edge of the state table (docs/state-diagram.md). Self-loops count too: input and peer-fin in receiving and half-closed.")),
		[]string{"from", "event", "to"})
	m.transitions = make([]prometheus.Counter, len(states)*m.nEvents)
	for _, tr := range fsm.Transitions() {
		m.transitions[int(tr.From)*m.nEvents+int(tr.Event)] = m.transCounters.WithLabelValues(tr.From.String(), tr.Event.String(), tr.To.String())
	}

	m.accepted = prometheus.NewCounter(prometheus.CounterOpts(opts("connections_accepted_total",
		"Connections that entered the accepted state: accepted by a Server or Listener, or run by ServeConn.")))

	m.closeCounters = prometheus.NewCounterVec(prometheus.CounterOpts(opts("connections_closed_total",
		"Connections closed, by reason. Reasons from peer-reset on (peer-reset, read-error, write-error, write-timeout, handler-abort, handler-panic, shutdown-deadline, handshake, aborted, internal) closed with RST; the others gracefully, with our FIN.")),
		[]string{"reason"})
	for r := sockfsm.Reason(0); !strings.HasPrefix(r.String(), "Reason("); r++ {
		m.closes = append(m.closes, m.closeCounters.WithLabelValues(r.String()))
	}
	m.closeOther = m.closeCounters.WithLabelValues("unknown")

	m.lingerCounters = prometheus.NewCounterVec(prometheus.CounterOpts(opts("linger_endings_total",
		"Closed connections, by how the linger after our FIN ended: none (no linger: the peer's FIN came first, or an abort), peer-fin, timeout (LingerTimeout), time (LingerTime), bytes (LingerBytes).")),
		[]string{"ending"})
	for l := sockfsm.LingerEnd(0); !strings.HasPrefix(l.String(), "LingerEnd("); l++ {
		m.lingers = append(m.lingers, m.lingerCounters.WithLabelValues(l.String()))
	}
	m.lingerOther = m.lingerCounters.WithLabelValues("unknown")

	m.bytesIn = prometheus.NewCounter(prometheus.CounterOpts(opts("received_bytes_total",
		"Bytes read from peers, including those discarded while lingering. Added when each connection closes: a connection still open is not counted yet.")))
	m.bytesOut = prometheus.NewCounter(prometheus.CounterOpts(opts("sent_bytes_total",
		"Bytes written to peers (handed to the transport). Added when each connection closes: a connection still open is not counted yet.")))
	m.discarded = prometheus.NewCounter(prometheus.CounterOpts(opts("linger_discarded_bytes_total",
		"Bytes read and discarded while lingering after our FIN. Added when each connection closes.")))

	m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: o.Namespace, Subsystem: o.Subsystem, ConstLabels: o.ConstLabels,
		Name:    "connection_duration_seconds",
		Help:    "How long closed connections lived, from their start (after a TLS handshake) to their close.",
		Buckets: o.DurationBuckets,
	})
	m.acceptErrors = prometheus.NewCounter(prometheus.CounterOpts(opts("accept_errors_total",
		"Errors returned by the listener's Accept (EMFILE, ECONNABORTED, ...), retried or not; a listener closed by a shutdown is not counted.")))
	m.maxConnsWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: o.Namespace, Subsystem: o.Subsystem, ConstLabels: o.ConstLabels,
		Name:    "max_conns_wait_seconds",
		Help:    "Time an accept loop waited at MaxConns open connections, observed when the wait ends; its _sum is the total time spent not accepting. A wait in progress shows as connections summed over states at MaxConns.",
		Buckets: o.WaitBuckets,
	})
	m.refusedVec = prometheus.NewCounterVec(prometheus.CounterOpts(opts("refused_total",
		"Connections refused before an engine ran them, by reason (a PROXY protocol header missing or malformed, a per-address limit, ...).")),
		[]string{"reason"})
	for _, r := range append(refusalReasons[:len(refusalReasons):len(refusalReasons)], o.RefuseReasons...) {
		m.refused[r] = m.refusedVec.WithLabelValues(r)
	}

	m.collectors = []prometheus.Collector{m.openVec, m.transCounters, m.accepted, m.closeCounters, m.lingerCounters,
		m.bytesIn, m.bytesOut, m.discarded, m.duration, m.acceptErrors, m.maxConnsWait, m.refusedVec}
	return m
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors {
		c.Collect(ch)
	}
}

// Instrument sets cfg's hooks so that m counts its connections: OnAccept,
// OnStateChange, OnClose, OnAcceptError and OnMaxConnsWait. A hook already
// set is kept and called after m's. Call it before cfg is used (before
// Serve, NewListener or ServeConn), once per Config.
//
// The open-connection gauges are exact as long as every hook returns: a
// hook of yours that panics in OnStateChange aborts its connection and
// silences the chain (m included) for the rest of that connection.
func (m *Metrics) Instrument(cfg *sockfsm.Config) {
	if prev := cfg.OnAccept; prev != nil {
		cfg.OnAccept = func(c sockfsm.ConnInfo) { m.Accepted(c); prev(c) }
	} else {
		cfg.OnAccept = m.Accepted
	}
	if prev := cfg.OnStateChange; prev != nil {
		cfg.OnStateChange = func(c sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
			m.StateChanged(c, from, to, ev)
			prev(c, from, to, ev)
		}
	} else {
		cfg.OnStateChange = m.StateChanged
	}
	if prev := cfg.OnClose; prev != nil {
		cfg.OnClose = func(c sockfsm.ConnInfo, info sockfsm.CloseInfo) { m.Closed(c, info); prev(c, info) }
	} else {
		cfg.OnClose = m.Closed
	}
	if prev := cfg.OnAcceptError; prev != nil {
		cfg.OnAcceptError = func(err error) { m.AcceptError(err); prev(err) }
	} else {
		cfg.OnAcceptError = m.AcceptError
	}
	if prev := cfg.OnMaxConnsWait; prev != nil {
		cfg.OnMaxConnsWait = func(d time.Duration) { m.MaxConnsWaited(d); prev(d) }
	} else {
		cfg.OnMaxConnsWait = m.MaxConnsWaited
	}
	if prev := cfg.OnRefuse; prev != nil {
		cfg.OnRefuse = func(remote net.Addr, reason error) { m.Refuse(remote, reason); prev(remote, reason) }
	} else {
		cfg.OnRefuse = m.Refuse
	}
}

// Refuse counts a connection refused before an engine ran it, labelled
// with sockfsm.RefusalReason(reason): Config.OnRefuse.
func (m *Metrics) Refuse(_ net.Addr, reason error) { m.Refused(sockfsm.RefusalReason(reason)) }

// Accepted counts a connection entering Accepted: Config.OnAccept.
func (m *Metrics) Accepted(sockfsm.ConnInfo) {
	m.accepted.Inc()
	m.open[fsm.Accepted].Inc()
}

// StateChanged counts a transition and moves the connection between the
// open gauges: Config.OnStateChange. It allocates nothing.
func (m *Metrics) StateChanged(_ sockfsm.ConnInfo, from, to fsm.State, ev fsm.Event) {
	if i := int(from)*m.nEvents + int(ev); int(ev) < m.nEvents && i < len(m.transitions) {
		if c := m.transitions[i]; c != nil {
			c.Inc()
		}
	}
	if from == to {
		return
	}
	if int(from) < len(m.open) && m.open[from] != nil {
		m.open[from].Dec()
	}
	if int(to) < len(m.open) && m.open[to] != nil {
		m.open[to].Inc()
	}
}

// Closed counts a closed connection's reason, linger ending, bytes and
// duration: Config.OnClose. It allocates nothing.
func (m *Metrics) Closed(_ sockfsm.ConnInfo, info sockfsm.CloseInfo) {
	if int(info.Reason) < len(m.closes) {
		m.closes[info.Reason].Inc()
	} else {
		m.closeOther.Inc()
	}
	if int(info.Linger) < len(m.lingers) {
		m.lingers[info.Linger].Inc()
	} else {
		m.lingerOther.Inc()
	}
	m.bytesIn.Add(float64(info.BytesRead))
	m.bytesOut.Add(float64(info.BytesWritten))
	m.discarded.Add(float64(info.Discarded))
	m.duration.Observe(info.Duration.Seconds())
}

// AcceptError counts an error from Accept: Config.OnAcceptError.
func (m *Metrics) AcceptError(error) { m.acceptErrors.Inc() }

// MaxConnsWaited records a wait of the accept loop at MaxConns:
// Config.OnMaxConnsWait.
func (m *Metrics) MaxConnsWaited(d time.Duration) { m.maxConnsWait.Observe(d.Seconds()) }

// refusalReasons are the labels sockfsm.RefusalReason gives: their series
// exist from the start.
var refusalReasons = []string{
	sockfsm.RefusalReason(sockfsm.ErrTooManyConnsFromIP),
	sockfsm.RefusalReason(sockfsm.ErrProxyHeader),
	sockfsm.RefusalReason(sockfsm.ErrPrelude),
	sockfsm.RefusalReason(nil),
}

// Refused counts a connection refused before an engine ran it, for the
// given reason: call it from the hook that reports refusals. A reason's
// first call creates its series (the reasons in Opts.RefuseReasons exist
// from the start); later calls allocate nothing. Keep the reasons few and
// fixed: each is a series.
func (m *Metrics) Refused(reason string) {
	m.refusedMu.RLock()
	c := m.refused[reason]
	m.refusedMu.RUnlock()
	if c == nil {
		m.refusedMu.Lock()
		if c = m.refused[reason]; c == nil {
			c = m.refusedVec.WithLabelValues(reason)
			m.refused[reason] = c
		}
		m.refusedMu.Unlock()
	}
	c.Inc()
}
