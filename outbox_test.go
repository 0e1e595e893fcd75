package amqp

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// TestConnOutboxOrder: deliveries the writer encodes (small bodies), deliveries queued by
// reference (large bodies) and other frames reach the socket in the order they were sent,
// each delivery byte for byte as basic.deliver and its content encode.
func TestConnOutboxOrder(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	server, client := net.Pipe()
	t.Cleanup(func() { server.Close(); client.Close() })
	c := newConn(srv, server)
	c.frameMax = 4096
	msg := func(key, body string) *message {
		return &message{exchange: "ex", keyLen: uint8(len(key)), propsLen: 2, size: uint32(len(body)),
			data: []byte(key + "\x00\x00" + body)}
	}
	small, large := msg("k1", "small body"), msg("k2", strings.Repeat("L", zeroCopyBody+5000))
	var want []byte
	ctag := "ctag"
	deliver := func(tag uint64, m *message, redelivered bool) {
		c.sendDelivery(7, &ctag, tag, qentry{msg: m, entryMarks: entryMarks{redelivered: redelivered}})
		want = appendMethodFrame(want, 7, &basicDeliver{ConsumerTag: "ctag", DeliveryTag: tag,
			Redelivered: redelivered, Exchange: "ex", RoutingKey: string(m.routingKey())})
		want = appendContent(want, 7, m.props(), m.body(), c.frameMax)
	}
	deliver(1, small, false)
	deliver(2, large, true)
	deliver(3, small, true)
	c.sendOn(7, &basicCancelOk{ConsumerTag: "ctag"})
	want = appendMethodFrame(want, 7, &basicCancelOk{ConsumerTag: "ctag"})
	deliver(4, small, false)
	c.send(&connectionCloseOk{})
	want = appendMethodFrame(want, 0, &connectionCloseOk{})

	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(client, got); err != nil {
		t.Fatalf("reading the outbox: %v", err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("the socket got %d octets differing from what was sent at octet %d", len(got), i)
	}
}

// TestConnReaderPausesOnFullOutbox: a client that publishes mandatory, unroutable messages
// but never reads the returns gets its reading paused once its outbox is full, so it
// cannot make the server buffer without bound; TCP backpressure then stops its writes.
func TestConnReaderPausesOnFullOutbox(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	other := dial(t, url)
	c := wireConnect(t, srv.Addr().String(), wireOpts{})
	c.openChannel(1)
	var batch []byte
	body := bytes.Repeat([]byte{'r'}, 1024)
	for i := 0; i < 256; i++ {
		batch = appendMethodFrame(batch, 1, &basicPublish{RoutingKey: "nowhere", Mandatory: true})
		batch = appendContent(batch, 1, []byte{0, 0}, body, 131072)
	}
	c.nc.SetWriteDeadline(time.Now().Add(3 * time.Second))
	sent := 0
	for sent < 256<<20 { // 256 MiB, far more than the server may hold for this client
		n, err := c.nc.Write(batch)
		sent += n
		if err != nil {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("write: %v", err)
			}
			break
		}
	}
	// The outbox pauses reading at 4 MiB; socket buffers hold about as much again. Without
	// the pause the server reads on for the whole 3 s (over 100 MiB here).
	if sent >= 40<<20 {
		t.Fatalf("the server read %d MiB from a client that reads nothing", sent>>20)
	}
	wireCheckClient(t, other)
}

// goroutinesIn counts the goroutines running fn, a function as a stack trace names it,
// e.g. "(*conn).writeLoop(".
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), fn)
		}
		buf = make([]byte, 2*len(buf))
	}
}

// TestConnIdleHasNoWriter: an idle connection has its reader and no writer goroutine, yet
// the server's heartbeats keep amqp091-go clients with a 1 s heartbeat (which give up after
// 3 s without a frame) connected for 4 s, and after that idle time they publish and
// consume messages larger than a first read buffer. Not parallel: it counts the process's
// goroutines.
func TestConnIdleHasNoWriter(t *testing.T) {
	_, url := newTestServer(t)
	const n = 20
	var conns []*amqp091.Connection
	var closed []chan *amqp091.Error
	for range n {
		c, err := amqp091.DialConfig(url, amqp091.Config{Heartbeat: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Channel(); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		closed = append(closed, c.NotifyClose(make(chan *amqp091.Error, 1)))
	}
	pollFor(t, "the idle connections' writers to end", func() bool { return goroutinesIn("(*conn).writeLoop(") == 0 })
	if r := goroutinesIn("(*conn).readFrames("); r != n {
		t.Fatalf("%d readers, want %d", r, n)
	}
	// Sample the writers over four heartbeat intervals: one runs only for the instant it
	// writes a heartbeat.
	samples, none := 0, 0
	for end := time.Now().Add(4 * time.Second); time.Now().Before(end); samples++ {
		if goroutinesIn("(*conn).writeLoop(") == 0 {
			none++
		}
		time.Sleep(20 * time.Millisecond)
	}
	if none < samples*3/4 {
		t.Errorf("writers ran in %d of %d samples of idle connections", samples-none, samples)
	}
	for i, ch := range closed {
		select {
		case err := <-ch:
			t.Fatalf("connection %d closed while idle: %v", i, err)
		default:
		}
	}
	body := bytes.Repeat([]byte("after idle "), 6000) // 66 KB: past the first read buffer
	for i, c := range conns {
		ch, err := c.Channel()
		if err != nil {
			t.Fatalf("connection %d: channel after idle: %v", i, err)
		}
		q, err := ch.QueueDeclare("", false, true, true, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		msgs, err := ch.Consume(q.Name, "", true, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := ch.PublishWithContext(context.Background(), "", q.Name, false, false, amqp091.Publishing{Body: body}); err != nil {
			t.Fatal(err)
		}
		if d := takeDelivery(t, msgs); !bytes.Equal(d.Body, body) {
			t.Fatalf("connection %d: got %d octets after idle, want the %d published", i, len(d.Body), len(body))
		}
	}
}

// TestConnIdleHeartbeats: on a raw socket with a 1 s heartbeat, whose client sends its own
// heartbeat only every 1.5 s (so that the server's reader waits idle, without buffers), the
// server's heartbeats come at least once a second, the connection stays open, and the
// methods sent after the idle time are read whole.
func TestConnIdleHeartbeats(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	c := wireConnect(t, srv.Addr().String(), wireOpts{heartbeat: 1})
	c.openChannel(1)
	opened := time.Now()
	watched := c.watch(opened.Add(4500 * time.Millisecond))
	beat := time.NewTicker(1500 * time.Millisecond)
	for range 2 {
		<-beat.C
		if _, err := c.nc.Write(wireFrame(frameHeartbeat, 0, nil)); err != nil {
			t.Fatalf("client heartbeat: %v", err)
		}
	}
	beat.Stop()
	w := <-watched
	if !errors.Is(w.err, os.ErrDeadlineExceeded) {
		t.Fatalf("the socket ended after %v: %v", w.end.Sub(opened), w.err)
	}
	if len(w.frames) < 4 {
		t.Fatalf("%d frames in 4.5 s, want a heartbeat at least every second", len(w.frames))
	}
	prev := opened
	for i, f := range w.frames {
		if f.typ != frameHeartbeat || f.channel != 0 || len(f.payload) != 0 {
			t.Fatalf("got %s, want only heartbeats", wireDescribe(f))
		}
		if gap := w.times[i].Sub(prev); gap > 1500*time.Millisecond {
			t.Errorf("heartbeat %d came %v after the frame before it", i, gap)
		}
		prev = w.times[i]
	}
	c.openChannel(2)
	c.sendMethod(2, &channelClose{ReplyCode: replySuccess})
	wireExpect[*channelCloseOk](c, 2)
}
