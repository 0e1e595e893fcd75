package main

import (
	"bytes"
	"net"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

func TestRunBadArguments(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string // in the message
	}{
		{"bad -log-level", []string{"-log-level", "loud"}, `bad -log-level "loud"`},
		{"bad -log-format", []string{"-log-format", "xml"}, `bad -log-format "xml"`},
		{"extra argument", []string{"serve"}, `unexpected argument "serve"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			args := append([]string{"-addr", "127.0.0.1:0", "-data-dir", t.TempDir()}, tc.args...)
			if code := run(args, &stderr); code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			if msg := stderr.String(); !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 {
				t.Errorf("stderr %q, want one line containing %q", msg, tc.want)
			}
		})
	}
}

func TestRunUnknownFlag(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"-no-such-flag"}, &stderr); code != 2 {
		t.Errorf("exit code %d, want 2", code)
	}
	if msg := stderr.String(); !strings.Contains(msg, "-no-such-flag") || strings.Count(msg, "\n") != 1 {
		t.Errorf("stderr %q, want one line naming the flag", msg)
	}
}

func TestRunAddressInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var stderr bytes.Buffer
	if code := run([]string{"-addr", ln.Addr().String(), "-data-dir", t.TempDir()}, &stderr); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	if !strings.Contains(stderr.String(), "already in use") {
		t.Errorf("stderr %q, want it to say the address is already in use", stderr.String())
	}
}

// TestDaemonServesUntilSIGTERM builds amqpd, serves a client, and stops it with SIGTERM.
func TestDaemonServesUntilSIGTERM(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("needs SIGTERM")
	}
	goTool, err := exec.LookPath(filepath.Join(runtime.GOROOT(), "bin", "go"))
	if err != nil {
		if goTool, err = exec.LookPath("go"); err != nil {
			t.Skip("go command not found")
		}
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "amqpd")
	if out, err := exec.Command(goTool, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	var logs bytes.Buffer // read only after Wait
	cmd := exec.Command(bin, "-addr", addr, "-data-dir", filepath.Join(dir, "data"))
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})

	var conn *amqp091.Connection
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if conn, err = amqp091.Dial("amqp://guest:guest@" + addr + "/"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("amqpd did not come up on %s: %v", addr, err)
		}
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("", false, true, true, false, nil); err != nil {
		t.Fatal(err)
	}
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Errorf("amqpd exited with %v, want status 0; log:\n%s", err, logs.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("amqpd still running 10s after SIGTERM")
	}
	if !strings.Contains(logs.String(), "shutting down") {
		t.Errorf("log does not mention shutting down:\n%s", logs.String())
	}
	select {
	case e := <-closed:
		if e == nil || e.Code != 320 {
			t.Errorf("client got close %v, want 320 CONNECTION_FORCED", e)
		}
	case <-time.After(5 * time.Second):
		t.Error("client was not told the connection closed")
	}
}

func TestWatermark(t *testing.T) {
	if got := watermark(0); got != 0 {
		t.Errorf("watermark(0) = %d, want 0 (off)", got)
	}
	if got := watermark(5e9); got != 5e9 {
		t.Errorf("watermark(5e9) = %d, want the byte count", got)
	}
	total := memTotal()
	if total == 0 {
		t.Skip("no /proc/meminfo")
	}
	if got := watermark(0.4); got == 0 || got > total/2 {
		t.Errorf("watermark(0.4) = %d of %d bytes", got, total)
	}
}
