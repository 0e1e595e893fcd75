package main

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDaemonUsesMadvFree: the daemon runs with GODEBUG=madvdontneed=0 added to what
// GODEBUG held, under its own process name, and leaves a GODEBUG that already sets
// madvdontneed as it is.
func TestDaemonUsesMadvFree(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ env, want string }{
		{"GODEBUG=", "madvdontneed=0"},
		{"GODEBUG=gctrace=0", "gctrace=0,madvdontneed=0"},
		{"GODEBUG=madvdontneed=1", "madvdontneed=1"},
	} {
		addr := freeAddr(t)
		d := startDaemon(t, []string{c.env}, "-addr", addr, "-data-dir", filepath.Join(t.TempDir(), "data"))
		pollFor(t, 10*time.Second, "amqpd to come up on "+addr, func() bool {
			nc, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				nc.Close()
			}
			return err == nil
		})
		environ, err := os.ReadFile("/proc/" + strconv.Itoa(d.cmd.Process.Pid) + "/environ")
		if err != nil {
			t.Fatal(err)
		}
		var got string
		for _, kv := range strings.Split(string(environ), "\x00") {
			if v, ok := strings.CutPrefix(kv, "GODEBUG="); ok {
				got = v
			}
		}
		if got != c.want {
			t.Errorf("started with %s: the daemon runs with GODEBUG=%s, want %s", c.env, got, c.want)
		}
		// Run again by its path, it keeps its name (ps -C, pkill -x, the pidfile check).
		comm, err := os.ReadFile("/proc/" + strconv.Itoa(d.cmd.Process.Pid) + "/comm")
		if err != nil {
			t.Fatal(err)
		}
		if name := strings.TrimSpace(string(comm)); name != "amqpd" {
			t.Errorf("started with %s: the daemon's process name is %q, want amqpd", c.env, name)
		}
		d.stop(t)
	}
}
