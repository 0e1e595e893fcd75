package main

// -pidfile: the daemon's process id in a file, written once the broker listens and removed
// when it stops.
//
// Unlike RabbitMQ, which just writes the file, amqpd refuses to start when the file names
// another running amqpd (on Linux, a running process whose /proc/PID/comm is amqpd's own;
// elsewhere, any running process). A file left by a crash, naming a process that is gone,
// this process itself (a container restarted as PID 1 again) or, on Linux, a process
// running another program (the PID was reused), is replaced. A file that does not hold a
// process id is left alone and amqpd refuses to start: -pidfile never overwrites a file
// that is not a pidfile.

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// maxPidfile bounds what is read of an existing pidfile.
const maxPidfile = 64

// pidfile is the file -pidfile names; a nil *pidfile does nothing.
type pidfile struct {
	path    string
	written bool
}

// claimPidfile checks that path may be written as this process's pidfile, and returns
// it; it returns nil for an empty path.
func claimPidfile(path string) (*pidfile, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &pidfile{path: path}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("pidfile: %v", err)
	}
	defer f.Close()
	b := make([]byte, maxPidfile+1)
	n, _ := f.Read(b)
	s := strings.TrimSpace(string(b[:n]))
	if s == "" {
		return &pidfile{path: path}, nil
	}
	pid, err := strconv.Atoi(s)
	if err != nil || pid <= 0 || n > maxPidfile {
		return nil, fmt.Errorf("pidfile %s exists and does not hold a process id; not overwriting it", path)
	}
	if pid != os.Getpid() && sameProgramRunning(pid) {
		return nil, fmt.Errorf("pidfile %s names process %d, which is running: is amqpd already running? (remove the file if not)", path, pid)
	}
	return &pidfile{path: path}, nil
}

// write writes this process's id and a newline to the file, atomically: readers see the
// old file or the whole new one.
func (p *pidfile) write() error {
	if p == nil {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(p.path), "."+filepath.Base(p.path)+".tmp*")
	if err != nil {
		return fmt.Errorf("pidfile: %v", err)
	}
	_, err = tmp.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	if err == nil {
		err = tmp.Chmod(0o644) // CreateTemp makes it 0600; a pidfile is for everyone to read
	}
	if err == nil {
		err = tmp.Sync()
	}
	if err2 := tmp.Close(); err == nil {
		err = err2
	}
	if err == nil {
		err = os.Rename(tmp.Name(), p.path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("pidfile: %v", err)
	}
	p.written = true
	return nil
}

// remove removes the file if this process wrote it and it still holds this process's id.
func (p *pidfile) remove() error {
	if p == nil || !p.written {
		return nil
	}
	b, err := os.ReadFile(p.path)
	if err != nil || !bytes.Equal(b, []byte(strconv.Itoa(os.Getpid())+"\n")) {
		return nil // gone, or another process's now
	}
	return os.Remove(p.path)
}

// sameProgramRunning reports whether process pid exists and, where /proc tells, runs the
// same program as this process.
func sameProgramRunning(pid int) bool {
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	defer p.Release()
	// Signal 0 checks the process exists without signalling it; EPERM means it exists
	// and belongs to another user.
	if err := p.Signal(syscall.Signal(0)); errors.Is(err, os.ErrProcessDone) {
		return false
	}
	theirs, err1 := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	ours, err2 := os.ReadFile("/proc/self/comm")
	if err1 == nil && err2 == nil && !bytes.Equal(theirs, ours) {
		return false
	}
	return true
}
