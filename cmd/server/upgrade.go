package main

// The process's dealings with its supervisor: zero-downtime restarts with
// tableflip (-upgrade: SIGHUP starts the binary anew, which inherits the
// listening sockets; this process then drains and exits), the pid file
// (-pid-file), and systemd's notifications (READY=1 and MAINPID= when
// serving, STOPPING=1 when shutting down), sent only when systemd set
// NOTIFY_SOCKET.

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/cloudflare/tableflip"
	"github.com/coreos/go-systemd/v22/daemon"
)

// upgradeSignal is the signal that starts a restart.
var upgradeSignal os.Signal = syscall.SIGHUP

// upgraded is the signal the process gives itself once a restarted
// process serves: this one then shuts down gracefully.
type upgraded struct{}

func (upgraded) String() string { return "upgraded (the new process serves)" }
func (upgraded) Signal()        {}

// supervision is the process's part in a restart, its pid file and its
// notifications to systemd.
type supervision struct {
	o        deployOptions
	log      *slog.Logger
	upg      *tableflip.Upgrader // nil without -upgrade
	quit     chan struct{}       // closed by stop: ends the signal filter
	wg       sync.WaitGroup      // the signal filter and the restarts it started
	mu       sync.Mutex
	upgraded bool // a restarted process serves: leave the pid file and sockets to it
}

// newSupervision returns the supervision o asks for.
func newSupervision(o deployOptions, log *slog.Logger) (*supervision, error) {
	s := &supervision{o: o, log: log, quit: make(chan struct{})}
	if !o.upgrade {
		return s, nil
	}
	pidFile := o.pidFile
	if pidFile != "" {
		abs, err := filepath.Abs(pidFile)
		if err != nil {
			return nil, fmt.Errorf("-pid-file: %w", err)
		}
		pidFile = abs
	}
	upg, err := tableflip.New(tableflip.Options{PIDFile: pidFile})
	if errors.Is(err, tableflip.ErrNotSupported) {
		return nil, fmt.Errorf("-upgrade is not supported on %s", runtime.GOOS)
	}
	if err != nil {
		return nil, fmt.Errorf("-upgrade: %w", err)
	}
	s.upg = upg
	if upg.HasParent() {
		log.Info("restarted: inheriting the listening sockets", "pid", os.Getpid())
	}
	return s, nil
}

// listen opens the listeners o asks for (see openListeners); with -upgrade,
// through tableflip, which hands them on to a restarted process, and a
// restarted process gets its parent's. The systemd descriptors a restarted
// process inherits are its parent's, handed on by name.
func (s *supervision) listen(o options) ([]net.Listener, error) {
	listen := listenUnixOrNet
	systemd := func() ([]net.Listener, error) { return systemdListeners(nil) }
	if s.upg != nil {
		listen = func(network, addr string) (net.Listener, error) {
			return s.upg.Fds.ListenWithCallback(network, addr, listenUnixOrNet)
		}
		systemd = func() ([]net.Listener, error) {
			if lns, err := s.inheritedSystemd(); err != nil || len(lns) > 0 {
				return lns, err
			}
			return systemdListeners(s.upg.Fds.AddFile)
		}
	}
	lns, fromSystemd, err := openListeners(o, listen, systemd)
	if err != nil {
		return nil, err
	}
	if fromSystemd {
		s.log.Info("serving the sockets systemd passed (socket activation); -addr is ignored", "count", len(lns))
	}
	return lns, nil
}

// listenUnixOrNet is net.Listen, with listenUnix's care for Unix sockets.
func listenUnixOrNet(network, addr string) (net.Listener, error) {
	if network == "unix" {
		return listenUnix(network, addr)
	}
	return net.Listen(network, addr)
}

// inheritedSystemd returns the systemd sockets a restarted process got from
// its parent, and hands them on in turn.
func (s *supervision) inheritedSystemd() ([]net.Listener, error) {
	var lns []net.Listener
	for i := 0; ; i++ {
		f, err := s.upg.Fds.File(systemdFileName(i))
		if err == nil && f == nil {
			return lns, nil
		}
		var ln net.Listener
		if err == nil {
			ln, err = net.FileListener(f)
			if err == nil {
				err = s.upg.Fds.AddFile(systemdFileName(i), f)
			}
			f.Close()
		}
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("inheriting systemd's socket %d: %w", i, err)
		}
		lns = append(lns, ln)
	}
}

// ready says that this process serves: it writes the pid file (tableflip
// writes it with -upgrade), tells the parent of a restart to drain and
// exit, and tells systemd, if it listens, that this process is the
// service's main one now.
func (s *supervision) ready() error {
	if s.upg != nil {
		if err := s.upg.Ready(); err != nil {
			return fmt.Errorf("-upgrade: %w", err)
		}
	} else if s.o.pidFile != "" {
		if err := writePIDFile(s.o.pidFile); err != nil {
			return fmt.Errorf("-pid-file: %w", err)
		}
	}
	s.notify("READY=1\nMAINPID=" + strconv.Itoa(os.Getpid()))
	return nil
}

// notify sends state to systemd if it set NOTIFY_SOCKET, and logs a
// failure: the service works on without it.
func (s *supervision) notify(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		s.log.Warn("cannot notify systemd", "state", state, "err", err)
	}
}

// signals returns the signals run acts on. With -upgrade, SIGHUP starts a
// restart instead, and once the restarted process serves, the channel
// gets upgraded{}, on which run shuts down gracefully as on SIGTERM; the
// SIGHUPs that come after are ignored. Other signals pass; so does SIGHUP
// without -upgrade. It tells systemd STOPPING=1 when a shutdown begins,
// unless it is for a restart.
func (s *supervision) signals(in <-chan os.Signal) <-chan os.Signal {
	out := make(chan os.Signal, 2)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		stopping := false
		upgradeDone := make(chan error, 1)
		upgrading := false
		for {
			select {
			case <-s.quit:
				return
			case err := <-upgradeDone:
				upgrading = false
				if err != nil {
					s.log.Error("restart failed; this process serves on", "err", err)
					continue
				}
				s.mu.Lock()
				s.upgraded = true
				s.mu.Unlock()
				s.log.Info("restart done: the new process serves; draining this one")
				stopping = true
				select {
				case out <- upgraded{}:
				case <-s.quit:
					return
				}
			case sig := <-in:
				if s.upg == nil || sig != upgradeSignal {
					if !stopping {
						stopping = true
						s.notify("STOPPING=1")
					}
					select {
					case out <- sig:
					case <-s.quit:
						return
					}
					continue
				}
				if stopping || upgrading {
					s.log.Warn("restart ignored: one is under way, or this process is shutting down", "signal", sig.String())
					continue
				}
				upgrading = true
				s.log.Info("restarting: starting the binary anew", "signal", sig.String())
				s.wg.Add(1)
				go func() {
					defer s.wg.Done()
					upgradeDone <- s.upg.Upgrade()
				}()
			}
		}
	}()
	return out
}

// stop ends the supervision when run returns. Unless a restarted process
// serves, it removes the pid file and the Unix sockets tableflip was told
// to keep for a restart; it interrupts a restart under way.
func (s *supervision) stop() {
	if s.upg != nil {
		s.upg.Stop() // interrupts Upgrade; without a restart, unlinks the Unix sockets
		<-s.upg.Exit()
	}
	close(s.quit)
	s.wg.Wait()
	s.mu.Lock()
	upgraded := s.upgraded
	s.mu.Unlock()
	if s.o.pidFile != "" && !upgraded {
		removePIDFile(s.o.pidFile)
	}
}

// writePIDFile writes this process's pid to path, atomically: a reader
// sees the old content or the new, never a part.
func writePIDFile(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// removePIDFile removes the pid file at path if it names this process.
func removePIDFile(path string) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	if strings.TrimSpace(string(b)) == strconv.Itoa(os.Getpid()) {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return
		}
	}
}
