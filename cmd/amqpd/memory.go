package main

// How much memory the broker may use, for -memory-high-watermark.

import (
	"os"
	"strconv"
	"strings"
)

// watermark turns -memory-high-watermark into bytes: a fraction of the memory the broker
// may use (the machine's, from /proc/meminfo, or a smaller cgroup limit; no alarm where
// neither is known), or a byte count.
func watermark(v float64) uint64 {
	if v > 1 {
		return uint64(v)
	}
	if v <= 0 {
		return 0
	}
	total := memTotal()
	for _, f := range []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"} {
		if b, err := os.ReadFile(f); err == nil {
			if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n > 0 && (total == 0 || n < total) {
				total = n // a container's limit ("max" or a huge number means none)
			}
		}
	}
	return uint64(float64(total) * v)
}

// memTotal reads the machine's memory from /proc/meminfo; 0 when unknown.
func memTotal() uint64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			if kb, err := strconv.ParseUint(f[1], 10, 64); err == nil {
				return kb << 10
			}
		}
	}
	return 0
}
