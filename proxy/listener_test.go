package proxy_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/proxy"
)

// TestNetHTTPBehindProxy: net/http over a sockfsm.Listener with the PROXY
// prelude sees the client's address from the header in r.RemoteAddr, and
// a connection without a header is refused without reaching net/http.
func TestNetHTTPBehindProxy(t *testing.T) {
	refused := make(chan error, 4)
	ln, err := sockfsm.Listen("tcp", "127.0.0.1:0", sockfsm.Config{
		Prelude:  proxy.Prelude(proxy.Required),
		OnRefuse: func(_ net.Addr, reason error) { refused <- reason },
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.RemoteAddr)
	}), ReadHeaderTimeout: deadline}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		hs.Shutdown(ctx)
		ln.Shutdown(ctx)
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	}()

	// A peer that never sends its header does not hold up the others.
	dial(t, ln.Addr().String())

	const client = "203.0.113.77:51000"
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if _, err := c.Write(header(t, 2, client, addr)); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: deadline}
	resp, err := hc.Get("http://" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != client {
		t.Fatalf("r.RemoteAddr %q (%v), want the header's %s", body, err, client)
	}

	direct, err := http.Get("http://" + ln.Addr().String() + "/")
	if err == nil {
		direct.Body.Close()
		t.Fatalf("a request without a PROXY header was answered: %s", direct.Status)
	}
	select {
	case reason := <-refused:
		if !errors.Is(reason, sockfsm.ErrProxyHeader) {
			t.Errorf("refused with %v, want ErrProxyHeader", reason)
		}
	case <-time.After(deadline):
		t.Error("the direct request was not refused")
	}
	http.DefaultClient.CloseIdleConnections()
}
