package amqp

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// The broker on a full disk: the disk alarm that blocks publishers ahead of it, and the
// log that waits for room instead of failing, so that consumers draining their queues
// free the space publishing needs, without a restart.

// mountTmpfs mounts a tmpfs of size octets for the test, or skips it where that needs
// privileges the test does not have.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		t.Skip("filling a disk needs a small tmpfs, which only root can mount (Linux)")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// TestDiskFullRecoversWithoutRestart fills a small filesystem with persistent messages
// (the disk alarm off, so the log meets ENOSPC itself): new persistent publishes are then
// nacked, a durable declare fails only its channel, draining the queue frees the space,
// and publishing is confirmed again without a restart. After a restart only what was
// not consumed is there.
func TestDiskFullRecoversWithoutRestart(t *testing.T) {
	data := filepath.Join(mountTmpfs(t, "16m"), "data")
	var logs lockedBuffer
	cfg := Config{DataDir: data, SegmentSize: 256 << 10, DiskFreeLimit: -1, Logger: logs.logger()}
	b := startDurable(t, cfg)
	srv := b.srv
	conn, err := amqp091.Dial(b.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pub := openChannel(t, conn)
	if _, err := pub.QueueDeclare("full", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := pub.NotifyPublish(make(chan amqp091.Confirmation, 4096))
	body := make([]byte, 16<<10)
	reserve := filepath.Join(data, "RESERVE")
	if _, err := os.Stat(reserve); err != nil {
		t.Fatalf("no disk reserve at start: %v", err)
	}
	full := func() bool {
		_, err := os.Stat(reserve)
		return srv.store.w.noSpace.Load() && errors.Is(err, os.ErrNotExist)
	}
	published := 0
	for ; published < 3000 && !full(); published++ {
		if err := pub.Publish("", "full", false, false, amqp091.Publishing{DeliveryMode: 2, Body: body}); err != nil {
			t.Fatal(err)
		}
		if published%16 == 0 {
			time.Sleep(time.Millisecond) // let the writer keep up, so the fill is gradual
		}
	}
	pollFor(t, "the log to run out of space, its reserve released", full)
	for range 3 { // refused while the disk is full
		if err := pub.Publish("", "full", false, false, amqp091.Publishing{DeliveryMode: 2, Body: body}); err != nil {
			t.Fatal(err)
		}
		published++
	}

	// A durable declare fails its channel, not the connection.
	side := openChannel(t, conn)
	_, err = side.QueueDeclare("durable-while-full", true, false, false, false, nil)
	if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || !strings.Contains(e.Reason, "disk is full") {
		t.Fatalf("durable declare on a full disk: %v, want 406 saying the disk is full", err)
	}
	if conn.IsClosed() {
		t.Fatal("the connection closed; only the channel should have")
	}
	count := openChannel(t, conn)
	q, err := count.QueueDeclarePassive("full", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if q.Messages == 0 || q.Messages >= published {
		t.Fatalf("%d messages queued of %d published, want some refused", q.Messages, published)
	}

	// Drain and ack: the log frees segments and writes again.
	cons := openChannel(t, conn)
	msgs, err := cons.Consume("full", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < q.Messages; i++ {
		d := takeDelivery(t, msgs)
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
	pollFor(t, "the log to have room again", func() bool { return !srv.store.w.noSpace.Load() })

	acks, nacks := 0, 0
	for acks+nacks < published {
		select {
		case c := <-confirms:
			if c.Ack {
				acks++
			} else {
				nacks++
			}
		case <-time.After(walWait):
			t.Fatalf("%d acks and %d nacks of %d publishes", acks, nacks, published)
		}
	}
	if acks != q.Messages {
		t.Fatalf("%d publishes acked, want the %d queued", acks, q.Messages)
	}
	if err := pub.Publish("", "full", false, false, amqp091.Publishing{DeliveryMode: 2, Body: []byte("after")}); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-confirms:
		if !c.Ack {
			t.Fatal("a publish after the disk was freed was nacked")
		}
	case <-time.After(walWait):
		t.Fatal("no confirm after the disk was freed")
	}
	if _, err := openChannel(t, conn).QueueDeclare("durable-after", true, false, false, false, nil); err != nil {
		t.Fatalf("durable declare after the disk was freed: %v", err)
	}
	pollFor(t, "the disk reserve to be made again", func() bool { _, err := os.Stat(reserve); return err == nil })
	if out := logs.String(); !strings.Contains(out, "out of disk space") || !strings.Contains(out, "room again") {
		t.Fatalf("the log does not say the disk filled and was freed:\n%s", out)
	}
	conn.Close()

	b = b.restart("clean", Config{DataDir: data, SegmentSize: 256 << 10, DiskFreeLimit: -1})
	ch := openChannel(t, dial(t, b.url))
	if got := walBodies(getAll(t, ch, "full")); len(got) != 1 || got[0] != "after" {
		t.Fatalf("after a restart the queue holds %d messages, want only the one published after the drain", len(got))
	}
}

// TestDiskAlarmBlocksPublishers: with less free disk than DiskFreeLimit, a publishing
// connection gets connection.blocked "low on disk" and is not read until there is room
// again; a consumer on another connection keeps draining.
func TestDiskAlarmBlocksPublishers(t *testing.T) {
	t.Parallel()
	var free atomic.Uint64
	free.Store(1 << 30)
	srv := NewServer(Config{DataDir: t.TempDir(), DiskFreeLimit: 50 << 20, Logger: walQuietLogger()})
	srv.diskFree = func() (uint64, error) { return free.Load(), nil }
	b := serveDurable(t, srv)
	pubConn := dial(t, b.url)
	blocked := pubConn.NotifyBlocked(make(chan amqp091.Blocking, 4))
	pub := openChannel(t, pubConn)
	declareTransientQueue(t, pub, "disk")
	cons := openChannel(t, dial(t, b.url))
	msgs, err := cons.Consume("disk", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	publishText(t, pub, "", "disk", "before")
	if d := takeDelivery(t, msgs); string(d.Body) != "before" {
		t.Fatalf("got %q", d.Body)
	}

	free.Store(10 << 20)
	pollFor(t, "the disk alarm", func() bool { return srv.alarms.Load()&alarmDisk != 0 })
	publishText(t, pub, "", "disk", "during")
	select {
	case bl := <-blocked:
		if !bl.Active || bl.Reason != "low on disk" {
			t.Fatalf("blocking %+v, want active 'low on disk'", bl)
		}
	case <-time.After(walWait):
		t.Fatal("no connection.blocked")
	}
	expectNoDelivery(t, msgs)

	free.Store(1 << 30)
	select {
	case bl := <-blocked:
		if bl.Active {
			t.Fatalf("blocking %+v, want unblocked", bl)
		}
	case <-time.After(walWait):
		t.Fatal("no connection.unblocked")
	}
	if d := takeDelivery(t, msgs); string(d.Body) != "during" {
		t.Fatalf("got %q, want the message published during the alarm", d.Body)
	}
}
