package main

// The listeners production uses: a Unix socket (-addr unix:PATH), TLS
// (-tls-cert, -tls-key), and the listening sockets systemd hands over by
// socket activation (LISTEN_FDS), each of which may also be handed on to
// the next process by a zero-downtime restart (upgrade.go).

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
)

// unixPrefix marks an -addr that names a Unix socket.
const unixPrefix = "unix:"

// upgradeByDefault is -upgrade's default: SIGHUP restarts the server with
// no downtime wherever tableflip can (not on Windows). The tests that call
// run in-process set it to false in TestMain: tableflip allows one Upgrader
// per process, and they run run many times; the tests of restarts exec the
// binary, which has this default.
var upgradeByDefault = runtime.GOOS != "windows"

// deployOptions are the flags of this file and of upgrade.go.
type deployOptions struct {
	tlsCert, tlsKey string
	upgrade         bool
	pidFile         string
}

// addDeployFlags defines the flags of deployOptions on fs.
func addDeployFlags(fs *flag.FlagSet, o *deployOptions) {
	fs.StringVar(&o.tlsCert, "tls-cert", "", "serve TLS with this PEM certificate `file` (and -tls-key)")
	fs.StringVar(&o.tlsKey, "tls-key", "", "the PEM private key `file` of -tls-cert")
	fs.BoolVar(&o.upgrade, "upgrade", upgradeByDefault, "on SIGHUP, restart with no downtime: start the binary anew, hand it the listening sockets, drain and exit (default on Linux and macOS; refused on Windows); -upgrade=false makes SIGHUP a graceful shutdown")
	fs.StringVar(&o.pidFile, "pid-file", "", "write the pid of the process now serving to this `file` (with -upgrade: the new process's, once it is ready)")
}

// listenFunc opens a listener, as net.Listen does.
type listenFunc func(network, addr string) (net.Listener, error)

// systemdListeners returns the listening sockets systemd passed by socket
// activation (LISTEN_FDS, for this process: LISTEN_PID), or none. It
// unsets the variables, so that a process this one starts does not take
// them for its own. Each file is given to keep (a restart hands it on)
// before it is closed; the listener has its own descriptor.
func systemdListeners(keep func(name string, f *os.File) error) ([]net.Listener, error) {
	files := activation.Files(true)
	var lns []net.Listener
	for i, f := range files {
		ln, err := net.FileListener(f)
		if err == nil && keep != nil {
			err = keep(systemdFileName(i), f)
		}
		f.Close()
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			for _, f := range files[i+1:] {
				f.Close()
			}
			return nil, fmt.Errorf("systemd socket activation: descriptor %d (%s): %w", 3+i, f.Name(), err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// systemdFileName names the i-th descriptor systemd passed, when it is
// handed on to a restarted process.
func systemdFileName(i int) string { return fmt.Sprintf("systemd-listen-fd-%d", i) }

// listenUnix listens on the Unix socket at path. If a file is there: a
// socket nobody answers on (left by a process that died) is removed; a
// socket that answers, or a file that is not a socket, is an error, so that
// a second server never steals a live server's path. The listener removes
// the socket file when it is closed (net.UnixListener's unlink-on-close),
// unless a restart turns that off to hand the socket on.
func listenUnix(network, path string) (net.Listener, error) {
	if err := clearStaleSocket(path); err != nil {
		return nil, err
	}
	return net.Listen(network, path)
}

// errSocketInUse is why a Unix socket's path cannot be listened on.
var errSocketInUse = errors.New("a server is listening there")

// clearStaleSocket removes the socket file at path if no server answers on
// it. Linux's abstract sockets (path starting with @) have no file.
func clearStaleSocket(path string) error {
	if strings.HasPrefix(path, "@") {
		return nil
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("listen unix %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("listen unix %s: the file exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("listen unix %s: %w", path, errSocketInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("listen unix %s: the socket is there and cannot be probed: %w", path, err)
	}
	// Refused: nobody listens; the file is stale.
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("listen unix %s: removing the stale socket: %w", path, err)
	}
	return nil
}

// openListeners opens the listeners o asks for, with listen (net.Listen,
// or the restart's, which hands them on): the sockets systemd passed if
// any, otherwise -addr, a Unix socket or TCP. fromSystemd says which.
func openListeners(o options, listen listenFunc, systemd func() ([]net.Listener, error)) (lns []net.Listener, fromSystemd bool, err error) {
	lns, err = systemd()
	if err != nil || len(lns) > 0 {
		return lns, true, err
	}
	if path, ok := strings.CutPrefix(o.addr, unixPrefix); ok {
		if path == "" {
			return nil, false, errors.New("listen unix: -addr unix: needs a path")
		}
		ln, err := listen("unix", path)
		if err != nil {
			return nil, false, err
		}
		return []net.Listener{ln}, false, nil
	}
	lns, err = listenTCP(o.addr, listen)
	return lns, false, err
}

// serveTLS wraps lns in TLS with o's certificate, if o has one: the engine
// then ends each connection with close_notify and then FIN.
func serveTLS(o deployOptions, lns []net.Listener, log *slog.Logger) ([]net.Listener, error) {
	if o.tlsCert == "" && o.tlsKey == "" {
		return lns, nil
	}
	if o.tlsCert == "" || o.tlsKey == "" {
		return lns, errors.New("-tls-cert and -tls-key go together")
	}
	cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
	if err != nil {
		return lns, fmt.Errorf("-tls-cert, -tls-key: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	for i, ln := range lns {
		lns[i] = tls.NewListener(ln, cfg)
	}
	log.Info("serving TLS", "cert", o.tlsCert)
	return lns, nil
}
