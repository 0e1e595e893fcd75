package amqp

import (
	"errors"
	"os"
	"syscall"
)

// lockDir takes an exclusive flock on name, so two brokers never share a data directory.
func lockDir(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errors.New("amqp: data directory is in use by another broker (" + name + " is locked)")
		}
		return nil, err
	}
	return f, nil
}
