package main

import (
	"bytes"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// listenNotify listens on a unixgram socket as systemd does for NOTIFY_SOCKET, and
// returns it with a function that reads the next message, failing the test after 20s.
func listenNotify(t *testing.T, name string) (*net.UnixConn, func() string) {
	t.Helper()
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	buf := make([]byte, 4096)
	return ln, func() string {
		t.Helper()
		ln.SetReadDeadline(time.Now().Add(20 * time.Second))
		n, err := ln.Read(buf)
		if err != nil {
			t.Fatalf("no notification: %v", err)
		}
		return string(buf[:n])
	}
}

// TestDaemonNotifySocket: with NOTIFY_SOCKET set, amqpd says READY=1 once it serves (a
// client connects at once, the pidfile is there), RELOADING=1 with MONOTONIC_USEC then
// READY=1 around a SIGHUP, and STOPPING=1 on SIGTERM.
func TestDaemonNotifySocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	_, next := listenNotify(t, sock)
	addr := freeAddr(t)
	pf := filepath.Join(t.TempDir(), "amqpd.pid")
	d := startDaemon(t, []string{"NOTIFY_SOCKET=" + sock},
		"-addr", addr, "-data-dir", filepath.Join(t.TempDir(), "data"), "-pidfile", pf)

	if got := next(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	conn, err := amqp091.Dial("amqp://guest:guest@" + addr + "/") // no retry: ready means listening
	if err != nil {
		t.Fatalf("dial after READY=1: %v", err)
	}
	defer conn.Close()
	if got, want := readPidfile(t, pf), strconv.Itoa(d.cmd.Process.Pid)+"\n"; got != want {
		t.Errorf("pidfile at READY=1 holds %q, want %q", got, want)
	}

	before, haveClock := monotonicUsec()
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	got := next()
	after, _ := monotonicUsec()
	reloading, usec, ok := strings.Cut(got, "\nMONOTONIC_USEC=")
	if reloading != "RELOADING=1" || ok != haveClock {
		t.Errorf("notification after SIGHUP %q, want RELOADING=1 and MONOTONIC_USEC", got)
	}
	if n, err := strconv.ParseUint(usec, 10, 64); haveClock && (err != nil || n < before || n > after) {
		t.Errorf("MONOTONIC_USEC=%s, want a number in [%d, %d]", usec, before, after)
	}
	if got := next(); got != "READY=1" {
		t.Errorf("notification after the reload %q, want READY=1", got)
	}

	d.stop(t)
	if got := next(); got != "STOPPING=1" {
		t.Errorf("notification at SIGTERM %q, want STOPPING=1", got)
	}
}

// TestNotifierAbstractSocket: a NOTIFY_SOCKET starting with @ is a Linux abstract socket;
// nothing is said of reloads before READY=1.
func TestNotifierAbstractSocket(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("abstract sockets are Linux's")
	}
	name := "@amqpd-test-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	_, next := listenNotify(t, name)
	var logs bytes.Buffer
	n := newNotifier(name, slog.New(slog.NewTextHandler(&logs, nil)))
	n.reloading()
	n.reloaded()
	n.isReady()
	n.stopping()
	for _, want := range []string{"READY=1", "STOPPING=1"} {
		if got := next(); got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	if logs.Len() > 0 {
		t.Errorf("logged %s", logs.String())
	}
}

// TestNotifierFailures: a NOTIFY_SOCKET that is neither a path nor @name is ignored, and
// a socket nobody listens on is logged; neither stops the daemon.
func TestNotifierFailures(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	if n := newNotifier("", log); n != nil || logs.Len() > 0 {
		t.Errorf("empty NOTIFY_SOCKET: %v, logged %q", n, logs.String())
	}
	n := newNotifier("relative/notify", log)
	if n != nil || !strings.Contains(logs.String(), "ignoring NOTIFY_SOCKET") {
		t.Errorf("relative NOTIFY_SOCKET: %v, logged %q", n, logs.String())
	}
	n.isReady() // a nil notifier does nothing
	n.reloading()
	n.reloaded()
	n.stopping()

	logs.Reset()
	newNotifier(filepath.Join(t.TempDir(), "nobody"), log).isReady()
	if !strings.Contains(logs.String(), "cannot notify the service manager") {
		t.Errorf("logged %q, want a warning", logs.String())
	}
}

func TestMonotonicUsec(t *testing.T) {
	if runtime.GOOS != "linux" {
		if _, ok := monotonicUsec(); ok {
			t.Error("a monotonic time outside Linux")
		}
		return
	}
	a, ok := monotonicUsec()
	uptime, err := os.ReadFile("/proc/uptime") // CLOCK_BOOTTIME: the monotonic clock plus time suspended
	b, _ := monotonicUsec()
	if !ok || a == 0 || b < a {
		t.Fatalf("monotonicUsec: %d then %d, %v", a, b, ok)
	}
	// Microseconds: it advances as Go's monotonic clock does, over 20ms.
	start := time.Now()
	c, _ := monotonicUsec()
	for time.Since(start) < 20*time.Millisecond {
	}
	d, _ := monotonicUsec()
	if elapsed := time.Since(start); d-c < 19_000 || d-c > uint64(elapsed.Microseconds())+1_000 {
		t.Errorf("monotonicUsec advanced %dµs in %v", d-c, elapsed)
	}
	if err != nil {
		t.Skip("no /proc/uptime")
	}
	secs, err := strconv.ParseFloat(strings.Fields(string(uptime))[0], 64)
	if err != nil {
		t.Fatal(err)
	}
	if boot := uint64(secs * 1e6); a > boot+10_000 { // /proc/uptime shows hundredths
		t.Errorf("monotonic %dµs is past the boot time %dµs", a, boot)
	}
}
