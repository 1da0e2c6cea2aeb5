package sockfsm_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/sockfsm/sockfsm"
	"github.com/sockfsm/sockfsm/transport"
)

// A server on loopback: one client sends, half-closes and reads the echo
// until the server's FIN; then the server shuts down gracefully.
func ExampleServer() {
	srv := &sockfsm.Server{
		Config:     sockfsm.Config{IdleTimeout: 30 * time.Second},
		NewHandler: func(sockfsm.ConnInfo) sockfsm.Handler { return sockfsm.Echo{} },
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		fmt.Println(err)
		return
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("this is a test"))
	c.(*net.TCPConn).CloseWrite() // our FIN: the server answers, then sends its own
	echo, err := io.ReadAll(c)    // until the server's FIN
	c.Close()
	fmt.Printf("%q %v\n", echo, err)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fmt.Println(srv.Shutdown(ctx)) // returns once every connection is closed
	fmt.Println(<-served)
	// Output:
	// "this is a test" <nil>
	// <nil>
	// sockfsm: server closed
}

// ServeConn runs one connection over any transport: here an in-memory pipe
// with real half-close semantics. It returns how the connection ended.
func ExampleServeConn() {
	server, client := transport.Pipe()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // at worst, an abort
	defer cancel()
	done := make(chan sockfsm.CloseInfo, 1)
	go func() {
		info, _ := sockfsm.ServeConn(ctx, server, sockfsm.Echo{}, sockfsm.Config{})
		done <- info
	}()

	client.Write([]byte("ping"))
	client.CloseWrite()
	echo, _ := io.ReadAll(client) // the echo, then the server's FIN
	info := <-done
	client.Close()
	fmt.Printf("%s\n", echo)
	fmt.Println(info.Reason, info.PeerFIN, info.Aborted(), info.BytesRead, info.BytesWritten)
	// Output:
	// ping
	// peer-closed true false 4 4
}

// ticker pushes a line to its connection every few milliseconds, from a
// goroutine of its own, until the connection is shut down. No callback is
// running when it writes: the connection's driver is waiting for input, and
// each Write wakes it.
type ticker struct{ wg *sync.WaitGroup }

// OnData ignores the client's input.
func (ticker) OnData(*sockfsm.Conn, []byte) {}

// OnOpen starts the pushing goroutine.
func (t ticker) OnOpen(c *sockfsm.Conn) {
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		for i := 1; i <= 1000; i++ {
			time.Sleep(5 * time.Millisecond)
			if _, err := c.Write(fmt.Appendf(nil, "tick %d\n", i)); err != nil {
				return // ErrShutdown: the connection is closing
			}
		}
		c.Close()
	}()
}

// Conn's methods are safe from any goroutine: a handler may hand its Conn to
// a goroutine that pushes output (a subscription, a proxy's other side).
// Here the client reads three ticks and hangs up; the server answers its FIN
// with its own, and the pusher stops at ErrShutdown.
func ExampleConn_Write_fromAnotherGoroutine() {
	var wg sync.WaitGroup
	server, client := transport.Pipe()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan sockfsm.CloseInfo, 1)
	go func() {
		info, _ := sockfsm.ServeConn(ctx, server, ticker{&wg}, sockfsm.Config{})
		done <- info
	}()

	r := bufio.NewReader(client)
	for range 3 {
		line, err := r.ReadString('\n')
		if err != nil {
			fmt.Println(err)
			break
		}
		fmt.Print(line)
	}
	client.CloseWrite()    // hang up
	io.Copy(io.Discard, r) // ticks already on their way, then the server's FIN
	info := <-done
	wg.Wait()
	client.Close()
	fmt.Println(info.Reason, info.Aborted())
	// Output:
	// tick 1
	// tick 2
	// tick 3
	// peer-closed false
}

// The Engine does no I/O: a driver performs the operation Next asks for and
// reports its result, with the time, which here is a fake clock. This is
// the Winsock tutorial's exchange: the client sends "hello" and half-closes;
// the server echoes, half-closes and closes.
func ExampleEngine() {
	cfg := sockfsm.Config{IdleTimeout: 30 * time.Second, WriteTimeout: 10 * time.Second}
	e, err := sockfsm.NewEngine(cfg, sockfsm.Echo{}, sockfsm.ConnInfo{ID: 1})
	if err != nil {
		fmt.Println(err)
		return
	}
	now := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC) // the fake clock
	show := func(a sockfsm.Action) {
		line := fmt.Sprintf("%-12s %-13s", a.Op, e.State())
		if a.Data != nil {
			line += fmt.Sprintf(" data %q", a.Data)
		}
		if !a.Deadline.IsZero() {
			line += fmt.Sprintf(" deadline +%v", a.Deadline.Sub(now))
		}
		fmt.Println(strings.TrimSpace(line))
	}

	show(e.Next(now)) // a new connection: start it
	e.Start(now)
	show(e.Next(now)) // read, within IdleTimeout

	now = now.Add(time.Second)
	// Input: Echo's OnData queues "hello"; the engine asks to write it,
	// within WriteTimeout.
	e.ReadDone(now, []byte("hello"), sockfsm.ResultOK, nil)
	a := e.Next(now)
	show(a)
	// Flushed: back to reading, and the idle timer restarts.
	e.WriteDone(now, len(a.Data), sockfsm.ResultOK, nil)
	show(e.Next(now))

	now = now.Add(time.Second)
	e.ReadDone(now, nil, sockfsm.ResultEOF, io.EOF) // the peer's FIN
	show(e.Next(now))
	e.CloseWriteDone(now, sockfsm.ResultOK, nil) // our FIN is out; the peer's came first
	show(e.Next(now))
	e.CloseDone(now) // the transport is closed; OnClose runs
	show(e.Next(now))

	info := e.CloseInfo()
	fmt.Println(info.Reason, info.BytesRead, info.BytesWritten, info.Duration)
	// Output:
	// start        accepted
	// read         receiving     deadline +30s
	// write        sending       data "hello" deadline +10s
	// read         receiving     deadline +30s
	// close-write  half-closing
	// close        closing
	// done         closed
	// peer-closed 5 5 2s
}
