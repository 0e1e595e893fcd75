//go:build !linux

package amqp

import (
	"errors"
	"os"
	"syscall"
)

// lockDir opens the lock file; other systems get no flock, so do not share a data directory.
func lockDir(name string) (*os.File, error) {
	return os.OpenFile(name, os.O_CREATE|os.O_RDWR, 0o600)
}

// lockDirShared opens an existing lock file read-only; other systems get no flock, so a
// running broker is not detected. A missing file is nil and no error.
func lockDirShared(name string) (*os.File, error) {
	f, err := os.Open(name)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return f, err
}

// diskFree is not implemented here: the disk alarm stays off.
func diskFree(string) (uint64, error) {
	return 0, errors.New("amqp: free disk space is not known on this system")
}

// fill gives f size octets of zeros.
func fill(f *os.File, size int64) error { return writeZeros(f, size) }

// isNoSpace reports whether err says the disk is full.
func isNoSpace(err error) bool { return errors.Is(err, syscall.ENOSPC) }

// syncData makes f's written data durable (f.Sync).
func syncData(f *os.File) error { return f.Sync() }
