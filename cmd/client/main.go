// Command client plays the client of Microsoft's Winsock tutorial
// ("Getting started with Winsock"): it connects to an echo server, sends a
// message, half-closes its side of the connection (the tutorial's
// shutdown(SD_SEND), which sends our FIN), receives until the server closes
// (recv returns 0), and then closes the socket (closesocket).
//
// Usage:
//
//	client [-addr host:port] [-timeout d] [-q] [message]
//
// The flags are:
//
//	-addr host:port
//		server to connect to (default localhost:27015, the tutorial's port)
//	-timeout d
//		bound on the whole exchange: dial, send and receive (default 10s)
//	-q
//		quiet: print nothing on success
//
// The message defaults to "this is a test"; several arguments are joined
// with single spaces. Against a correct echo server (RFC 862) the output is
// the tutorial's:
//
//	Bytes Sent: 14
//	Bytes received: 14
//	Connection closed
//
// with one "Bytes received" line per chunk read. The exit status is 0 only
// if the bytes received equal the message exactly. Otherwise it is 1, with a
// one-line reason on standard error: the connection was reset by the server
// ("connection reset by server after N bytes"), the timeout expired, the echo
// differed from what was sent ("echo mismatch: ..."), or the dial failed.
// A bad command line exits with status 2.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

const (
	defaultAddr    = "localhost:27015"
	defaultTimeout = 10 * time.Second
	defaultMessage = "this is a test"

	// bufLen is the tutorial's DEFAULT_BUFLEN: the size of each recv.
	bufLen = 512
	// excerptLen bounds the quoted excerpts in an echo mismatch report.
	excerptLen = 16

	usageLine = "Usage: client [-addr host:port] [-timeout d] [-q] [message]"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the client with the given command-line arguments (without the
// program name) and returns the process exit status.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", defaultAddr, "server `host:port` to connect to")
	timeout := fs.Duration("timeout", defaultTimeout, "bound on the whole exchange (dial + send + receive)")
	quiet := fs.Bool("q", false, "quiet: print nothing on success")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), usageLine)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *timeout <= 0 {
		fmt.Fprintf(stderr, "invalid -timeout %v: must be positive\n", *timeout)
		fs.Usage()
		return 2
	}
	msg := defaultMessage
	if fs.NArg() > 0 {
		msg = strings.Join(fs.Args(), " ")
	}
	if *quiet {
		stdout = io.Discard
	}
	c := &client{addr: *addr, timeout: *timeout, stdout: stdout, stderr: stderr}
	return c.exchange([]byte(msg))
}

type client struct {
	addr    string
	timeout time.Duration
	stdout  io.Writer
	stderr  io.Writer
}

// fail prints a one-line reason to stderr and returns exit status 1.
func (c *client) fail(format string, a ...any) int {
	fmt.Fprintf(c.stderr, format+"\n", a...)
	return 1
}

// exchange runs the tutorial's client sequence: connect, send, shutdown
// (SD_SEND), receive until the server closes, closesocket.
func (c *client) exchange(msg []byte) int {
	deadline := time.Now().Add(c.timeout)

	d := net.Dialer{Deadline: deadline}
	conn, err := d.Dial("tcp", c.addr)
	if err != nil {
		if isTimeout(err) {
			return c.fail("timed out after %v connecting to %s: %v", c.timeout, c.addr, err)
		}
		return c.fail("%v", err)
	}
	defer conn.Close() // closesocket
	if err := conn.SetDeadline(deadline); err != nil {
		return c.fail("set deadline: %v", err)
	}

	// send
	n, err := conn.Write(msg)
	if err != nil {
		switch {
		case isReset(err):
			return c.fail("connection reset by server while sending (sent %d of %d bytes)", n, len(msg))
		case isTimeout(err):
			return c.fail("timed out after %v sending (sent %d of %d bytes)", c.timeout, n, len(msg))
		}
		return c.fail("send failed after %d of %d bytes: %v", n, len(msg), err)
	}
	fmt.Fprintf(c.stdout, "Bytes Sent: %d\n", n)

	// shutdown(SD_SEND): half-close, so the server's recv returns 0.
	//
	// If the server has already reset the connection, shutdown can fail
	// (ENOTCONN on Linux) while the reset itself is only reported by the
	// next read; so a failure here is kept and reported only if the reads
	// below do not explain it.
	var shutdownErr error
	if tc, ok := conn.(*net.TCPConn); ok {
		shutdownErr = tc.CloseWrite()
		if shutdownErr != nil && isReset(shutdownErr) {
			return c.fail("connection reset by server after 0 bytes")
		}
	}

	// Receive until the server closes the connection. Only as much of the
	// echo as is needed for the comparison and the mismatch excerpt is kept;
	// total counts everything.
	var (
		got   []byte
		total int
		buf   = make([]byte, bufLen)
	)
	keep := len(msg) + excerptLen
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			fmt.Fprintf(c.stdout, "Bytes received: %d\n", n)
			total += n
			if room := keep - len(got); room > 0 {
				got = append(got, buf[:min(n, room)]...)
			}
		}
		if err == nil {
			continue
		}
		switch {
		case errors.Is(err, io.EOF):
			if shutdownErr != nil {
				return c.fail("shutdown failed: %v", shutdownErr)
			}
			fmt.Fprintln(c.stdout, "Connection closed")
		case isReset(err):
			return c.fail("connection reset by server after %d bytes", total)
		case isTimeout(err):
			return c.fail("timed out after %v waiting for the echo (sent %d bytes, received %d)", c.timeout, len(msg), total)
		default:
			return c.fail("recv failed after %d bytes: %v", total, err)
		}
		break
	}

	if total != len(msg) || !bytes.Equal(got, msg) {
		return c.fail("echo mismatch: sent %d bytes, received %d bytes%s", len(msg), total, diffExcerpt(msg, got))
	}
	return 0
}

// diffExcerpt describes where got first differs from sent, with short quoted
// excerpts of both from that offset.
func diffExcerpt(sent, got []byte) string {
	i := 0
	for i < len(sent) && i < len(got) && sent[i] == got[i] {
		i++
	}
	excerpt := func(b []byte) string {
		if i >= len(b) {
			return "(end)"
		}
		e := b[i:]
		if len(e) > excerptLen {
			return fmt.Sprintf("%q...", e[:excerptLen])
		}
		return fmt.Sprintf("%q", e)
	}
	return fmt.Sprintf("; first difference at byte %d: sent %s, received %s", i, excerpt(sent), excerpt(got))
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET)
}

func isTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
