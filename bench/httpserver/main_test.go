package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestServe: both listeners serve the handler, keep-alive, and shut down
// gracefully when the context ends.
func TestServe(t *testing.T) {
	for _, kind := range []string{"plain", "sockfsm"} {
		t.Run(kind, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			addrs := make(chan net.Addr, 1)
			done := make(chan error, 1)
			go func() {
				done <- serve(ctx, kind, "127.0.0.1:0", slog.New(slog.DiscardHandler), func(a net.Addr) { addrs <- a })
			}()
			addr := <-addrs
			client := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
			for range 3 { // one keep-alive connection
				resp, err := client.Get("http://" + addr.String() + "/")
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || string(got) != string(body) {
					t.Fatalf("got %q, %v", got, err)
				}
			}
			client.CloseIdleConnections()
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(15 * time.Second):
				t.Fatal("serve did not return after its context ended")
			}
		})
	}
	if err := serve(context.Background(), "bogus", "127.0.0.1:0", slog.New(slog.DiscardHandler), func(net.Addr) {}); err == nil {
		t.Fatal("an unknown -listener was accepted")
	}
}
