package probe

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// ErrNoProc is returned (wrapped) when a /proc file lacks what is asked of
// it.
var ErrNoProc = errors.New("probe: not in /proc")

// userHZ is the unit of the times in /proc/PID/stat: USER_HZ, which Linux
// fixes at 100 for user space whatever the kernel's own tick.
const userHZ = 100

// Status is what /proc/PID/status says of a process's memory and threads.
type Status struct {
	RSSKiB  int64 // VmRSS: resident memory now
	HWMKiB  int64 // VmHWM: the kernel's peak of the resident memory
	Threads int64 // Threads
}

// ReadStatus reads /proc/PID/status. It fails if VmRSS is missing.
func ReadStatus(pid int) (Status, error) {
	s := Status{RSSKiB: -1, HWMKiB: -1, Threads: -1}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return s, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(val)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		switch key {
		case "VmRSS":
			s.RSSKiB = n
		case "VmHWM":
			s.HWMKiB = n
		case "Threads":
			s.Threads = n
		}
	}
	if s.RSSKiB < 0 {
		return s, fmt.Errorf("VmRSS of process %d: %w", pid, ErrNoProc)
	}
	return s, nil
}

// RSS returns the resident memory of process pid (VmRSS), in KiB.
func RSS(pid int) (int64, error) {
	s, err := ReadStatus(pid)
	if err != nil {
		return -1, fmt.Errorf("reading the RSS of process %d: %w", pid, err)
	}
	return s.RSSKiB, nil
}

// FDs returns how many file descriptors process pid has open.
func FDs(pid int) (int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return -1, err
	}
	return len(ents), nil
}

// CPUTime returns the CPU time process pid has used so far, user and
// system (utime+stime in /proc/PID/stat), to the clock tick (10 ms).
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStatCPU(pid, b)
}

// parseStatCPU returns utime+stime from the contents of /proc/PID/stat.
func parseStatCPU(pid int, b []byte) (time.Duration, error) {
	// The command name, field 2, is in parentheses and may hold spaces:
	// count the fields after its last ')'. utime and stime are fields 14
	// and 15, so the 12th and 13th after it.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, ErrNoProc)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields after the name: %w", pid, len(f), ErrNoProc)
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}
