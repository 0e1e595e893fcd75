package main

import (
	"bytes"
	"io"
	"net"
	"path/filepath"
	"strings"
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
			if code := run(args, io.Discard, &stderr); code != 2 {
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
	if code := run([]string{"-no-such-flag"}, io.Discard, &stderr); code != 2 {
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
	if code := run([]string{"-http-addr=", "-prometheus-addr=", "-addr", ln.Addr().String(), "-data-dir", t.TempDir()}, io.Discard, &stderr); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	if !strings.Contains(stderr.String(), "already in use") {
		t.Errorf("stderr %q, want it to say the address is already in use", stderr.String())
	}
}

// TestDaemonServesUntilSIGTERM builds amqpd, serves a client, and stops it with SIGTERM.
func TestDaemonServesUntilSIGTERM(t *testing.T) {
	addr := freeAddr(t)
	d := startDaemon(t, nil, "-addr", addr, "-data-dir", filepath.Join(t.TempDir(), "data"))

	var conn *amqp091.Connection
	var err error
	pollFor(t, 10*time.Second, "amqpd to come up on "+addr, func() bool {
		conn, err = amqp091.Dial("amqp://guest:guest@" + addr + "/")
		return err == nil
	})
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("", false, true, true, false, nil); err != nil {
		t.Fatal(err)
	}
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))

	d.stop(t)
	if !strings.Contains(d.logs.String(), "shutting down") {
		t.Errorf("log does not mention shutting down:\n%s", d.logs)
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
