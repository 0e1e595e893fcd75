package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	amqp "github.com/maxpert/amqp-go"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// checkBroker serves a broker on dir with small log segments, declares the durable queue
// "ck" and publishes n persistent messages to it with confirms. stop shuts it down.
func checkBroker(t *testing.T, dir string, n int) (stop func()) {
	t.Helper()
	srv := amqp.NewServer(amqp.Config{DataDir: dir, SegmentSize: 8 << 10, Logger: slog.New(slog.DiscardHandler)})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	}
	t.Cleanup(stop)
	conn, err := amqp091.Dial("amqp://guest:guest@" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("ck", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := ch.NotifyPublish(make(chan amqp091.Confirmation, n))
	for i := range n {
		body := fmt.Sprintf("check-%04d-%s", i, strings.Repeat("b", 200))
		if err := ch.Publish("", "ck", false, false, amqp091.Publishing{DeliveryMode: amqp091.Persistent, Body: []byte(body)}); err != nil {
			t.Fatal(err)
		}
	}
	for range n {
		select {
		case c := <-confirms:
			if !c.Ack {
				t.Fatal("publish nacked")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no confirm")
		}
	}
	return stop
}

// treeHash hashes every name, mode, size, mtime and file content under dir.
func treeHash(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%s %v %d %d", path, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// check runs "amqpd check" on args and returns the exit code, stdout and stderr.
func check(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := runCheck(args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestCheckVerb(t *testing.T) {
	dir := t.TempDir()
	const n = 120
	stop := checkBroker(t, dir, n)
	if runtime.GOOS == "linux" {
		code, out, errOut := check(dir)
		if code != 2 || !strings.Contains(errOut, "in use by a running broker") || out != "" {
			t.Errorf("check of a running broker's directory: exit %d, stdout %q, stderr %q; want 2 and a refusal", code, out, errOut)
		}
	}
	stop()

	before := treeHash(t, dir)
	code, out, errOut := check(dir)
	if code != 0 || errOut != "" {
		t.Fatalf("sound directory: exit %d, stderr %q\n%s", code, errOut, out)
	}
	want := fmt.Sprintf("  queue ck: %d messages, %d body bytes\n", n, n*len(fmt.Sprintf("check-%04d-%s", 0, strings.Repeat("b", 200))))
	if !strings.Contains(out, want) || !strings.HasSuffix(out, "\nsound\n") {
		t.Errorf("report lacks %q or the verdict:\n%s", want, out)
	}
	if after := treeHash(t, dir); after != before {
		t.Errorf("check changed the directory:\n%s\nnow\n%s", before, after)
	}

	// A flipped byte in a message body in the middle of the log.
	segs, _ := filepath.Glob(filepath.Join(dir, "wal", "*.seg"))
	sort.Strings(segs)
	if len(segs) < 3 {
		t.Fatalf("%d segments, want at least 3", len(segs))
	}
	data, err := os.ReadFile(segs[1])
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(data, []byte("bbbbbbbb"))
	if i < 0 {
		t.Fatal("no body in the middle segment")
	}
	data[i] ^= 1
	if err := os.WriteFile(segs[1], data, 0o600); err != nil {
		t.Fatal(err)
	}
	before = treeHash(t, dir)
	code, out, _ = check(dir)
	if code != 1 || !strings.Contains(out, "corrupt: "+segs[1]+" offset ") || !strings.Contains(out, "\nCORRUPT: 1 problem") {
		t.Errorf("corrupt directory: exit %d, want 1 and the segment named with an offset:\n%s", code, out)
	}
	if after := treeHash(t, dir); after != before {
		t.Errorf("check changed the corrupt directory")
	}
}

func TestCheckVerbUsage(t *testing.T) {
	for _, args := range [][]string{{"check"}, {"check", "a", "b"}, {"check", "-x"}} {
		var stderr bytes.Buffer
		if code := run(args, io.Discard, &stderr); code != 2 || !strings.Contains(stderr.String(), "usage: amqpd check DIR") {
			t.Errorf("amqpd %q: exit %d, stderr %q; want 2 and the usage", args, code, stderr.String())
		}
	}
	dir := t.TempDir()
	code, out, errOut := check(dir)
	if code != 2 || !strings.Contains(errOut, "not a data directory") || out != "" {
		t.Errorf("check of an empty directory: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("check created %v in an empty directory", entries)
	}
	if code, out, _ := check("-h"); code != 0 || !strings.HasPrefix(out, "usage:") {
		t.Errorf("check -h: exit %d, %q", code, out)
	}
}
