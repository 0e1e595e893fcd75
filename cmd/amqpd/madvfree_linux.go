package main

import (
	"os"
	"strings"
	"syscall"
)

// useMadvFree runs the daemon again, in the same process, with GODEBUG=madvdontneed=0 unless
// GODEBUG already says how freed memory goes back to the kernel: the runtime then hands it
// back with MADV_FREE rather than MADV_DONTNEED. A broker's heap swings with its queues'
// depth, and its collector's scavenger returning pages that the next messages fault in
// again costs e2e throughput 12-18 % here. The kernel still takes those pages whenever it
// needs memory; until then they count in the process's RSS. The runtime reads the setting
// only at start, hence the exec. It executes the binary by its path, so the process keeps
// its name (ps, pkill, the pidfile check), and only if that path is still this very binary
// (not replaced since it started); otherwise, or if the exec fails, the daemon runs on as
// it is.
func useMadvFree() {
	godebug := os.Getenv("GODEBUG")
	if strings.Contains(godebug, "madvdontneed=") {
		return
	}
	exe, err := os.Executable()
	if err != nil {
		return
	}
	running, err := os.Stat("/proc/self/exe")
	if err != nil {
		return
	}
	if onDisk, err := os.Stat(exe); err != nil || !os.SameFile(running, onDisk) {
		return
	}
	with := "madvdontneed=0"
	if godebug != "" {
		with = godebug + "," + with
	}
	if os.Setenv("GODEBUG", with) != nil {
		return
	}
	syscall.Exec(exe, os.Args, os.Environ()) // returns only on failure
	if godebug == "" {
		os.Unsetenv("GODEBUG")
	} else {
		os.Setenv("GODEBUG", godebug)
	}
}
