package amqp

import (
	"errors"
	"os"
	"syscall"
	"time"
)

// lockDir takes an exclusive flock on name, so two brokers never share a data directory.
func lockDir(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	// A child process forked by this one holds the descriptor for a moment before its
	// exec closes it, so a busy lock gets a few tries.
	for try := 0; ; try++ {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || try == 20 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	f.Close()
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return nil, errors.New("amqp: data directory is in use by another broker (" + name + " is locked)")
	}
	return nil, err
}

// lockDirShared takes a shared flock on an existing lock file, for a reader of a stopped
// broker's directory: it fails while a broker holds the lock, and keeps one from starting
// until the reader closes the file. It opens the file read-only and never creates it: a
// missing file (no broker ever ran there) is no lock, nil and no error.
func lockDirShared(name string) (*os.File, error) {
	f, err := os.Open(name)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	for try := 0; ; try++ { // a busy lock gets a few tries, as in lockDir
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || try == 20 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	f.Close()
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return nil, errors.New("amqp: data directory is in use by a running broker (" + name + " is locked)")
	}
	return nil, err
}

// diskFree returns the octets an unprivileged writer may still use on dir's filesystem.
func diskFree(dir string) (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize), nil
}

// fill gives f size octets that are really allocated on disk.
func fill(f *os.File, size int64) error {
	err := syscall.Fallocate(int(f.Fd()), 0, 0, size)
	if err == nil || isNoSpace(err) {
		return err
	}
	return writeZeros(f, size) // a filesystem without fallocate
}

// isNoSpace reports whether err says the disk or the user's quota is full.
func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// syncData makes f's written data durable with fdatasync: the data, and the file's size
// that reading it back needs, without the timestamps fsync also writes. Appending to a log
// segment, that skips part of a journal commit (about 10-25 % of each sync here).
func syncData(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		for serr = syscall.Fdatasync(int(fd)); serr == syscall.EINTR; serr = syscall.Fdatasync(int(fd)) {
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: serr}
	}
	return nil
}
