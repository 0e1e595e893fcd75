//go:build !linux

package main

// No CLOCK_MONOTONIC for notify.go where systemd does not run.

// monotonicUsec reports no time: MONOTONIC_USEC is omitted where systemd does not run.
func monotonicUsec() (uint64, bool) { return 0, false }
