package amqp

import (
	"context"
	"net"
	"regexp"
	"runtime"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

func TestPublishConsumeSmoke(t *testing.T) {
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	q, err := ch.QueueDeclare("", false, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	const n = 100
	for i := 0; i < n; i++ {
		if err := ch.Publish("", q.Name, false, false, amqp091.Publishing{Body: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	msgs, err := ch.Consume(q.Name, "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		select {
		case m := <-msgs:
			if len(m.Body) != 1 || m.Body[0] != byte(i) {
				t.Fatalf("message %d: body %v", i, m.Body)
			}
			if err := m.Ack(false); err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("timed out waiting for message %d", i)
		}
	}
}

// TestListenOnlyWhenLoaded: ListenAndServe loads the data directory before it listens, so
// no client is accepted to wait in its handshake during a long load, and the load time it
// logs covers reading the log (here: waiting for the directory another broker holds).
func TestListenOnlyWhenLoaded(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" {
		t.Skip("the data directory lock is a flock on Linux only")
	}
	dir := t.TempDir()
	first := NewServer(Config{DataDir: dir, Logger: wireDiscardLogger()})
	if err := first.load(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var logs lockedBuffer
	second := NewServer(Config{Addr: addr, DataDir: dir, Logger: logs.logger()})
	done := make(chan error, 1)
	go func() { done <- second.ListenAndServe() }()
	time.Sleep(300 * time.Millisecond)
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("a connection was accepted before the data directory was loaded")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	first.Shutdown(ctx)
	up := make(chan struct{})
	go func() { second.Addr(); close(up) }()
	select {
	case <-up:
	case err := <-done:
		t.Fatalf("ListenAndServe: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the second broker did not start listening")
	}
	c := dial(t, "amqp://guest:guest@"+addr+"/")
	c.Close()
	if err := second.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != ErrServerClosed {
		t.Fatalf("ListenAndServe returned %v", err)
	}
	m := regexp.MustCompile(`data directory loaded.*took=(\S+)`).FindStringSubmatch(logs.String())
	if m == nil {
		t.Fatalf("no load line in:\n%s", logs.String())
	}
	if took, err := time.ParseDuration(m[1]); err != nil || took < 250*time.Millisecond {
		t.Fatalf("logged load time %s (%v), want it to cover the ~300ms spent opening the log", m[1], err)
	}
}
