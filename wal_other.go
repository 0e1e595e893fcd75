//go:build !linux

package amqp

import "os"

// lockDir opens the lock file; other systems get no flock, so do not share a data directory.
func lockDir(name string) (*os.File, error) {
	return os.OpenFile(name, os.O_CREATE|os.O_RDWR, 0o600)
}
