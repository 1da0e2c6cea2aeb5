package testutil

import (
	"bytes"
	"strings"
	"sync"
	"testing"
)

// LogWriter is the io.Writer behind a server's logger in a test. It logs
// each write through t (shown for failed tests and with -v) and keeps a
// copy for the tests that check what was logged. Output after the test has
// ended is kept but not passed to t, which would panic.
type LogWriter struct {
	t testing.TB

	mu   sync.Mutex
	buf  bytes.Buffer
	done bool
}

// NewLogWriter returns a LogWriter that logs through t until t ends.
func NewLogWriter(t testing.TB) *LogWriter {
	w := &LogWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return w
}

// Write logs p through t, while the test runs, and keeps it.
func (w *LogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// String returns everything written.
func (w *LogWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
