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
