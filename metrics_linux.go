package amqp

import (
	"os"
	"syscall"
)

// openFDs returns the process's open file descriptors, counted in /proc/self/fd, and their
// limit, RLIMIT_NOFILE's soft limit.
func openFDs() (open, limit uint64, ok bool) {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return 0, 0, false
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return 0, 0, false
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, 0, false
	}
	// One of the names is the descriptor that read the directory.
	return uint64(max(len(names)-1, 0)), rl.Cur, true
}
