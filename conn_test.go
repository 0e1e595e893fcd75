package amqp

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

func TestConnBadProtocolHeader(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	other := dial(t, url)
	for _, tc := range []struct{ name, header string }{
		{"amqp-0-9-0", "AMQP\x00\x00\x09\x00"},
		{"amqp-0-9-old-style", "AMQP\x01\x01\x00\x09"},
		{"http", "HTTP/1.1"},
	} {
		c := wireDial(t, srv.Addr().String())
		c.send([]byte(tc.header))
		c.nc.SetReadDeadline(time.Now().Add(wireTimeout))
		got, err := io.ReadAll(c.nc)
		if err != nil {
			t.Errorf("%s: read: %v, want the header and then EOF", tc.name, err)
		}
		if string(got) != "AMQP\x00\x00\x09\x01" {
			t.Errorf("%s: server wrote %q, want %q and close", tc.name, got, "AMQP\x00\x00\x09\x01")
		}
	}
	wireCheckClient(t, other)
}

// TestConnHardErrors provokes each connection exception over a raw socket and checks the
// reply code and method of connection.close, that the socket closes after close-ok, and
// that another client of the same server is unaffected.
func TestConnHardErrors(t *testing.T) {
	t.Parallel()
	connected := func(o wireOpts, send func(c *wireClient)) func(t *testing.T, addr string) *wireClient {
		return func(t *testing.T, addr string) *wireClient {
			c := wireConnect(t, addr, o)
			send(c)
			return c
		}
	}
	onChannel1 := func(send func(c *wireClient)) func(t *testing.T, addr string) *wireClient {
		return connected(wireOpts{}, func(c *wireClient) {
			c.openChannel(1)
			send(c)
		})
	}
	handshake := func(o wireOpts, steps int) func(t *testing.T, addr string) *wireClient {
		return func(t *testing.T, addr string) *wireClient { return wireHandshake(t, addr, o, steps) }
	}
	publish := func(c *wireClient) { c.sendMethod(1, &basicPublish{RoutingKey: "q"}) }
	header := wireContentHeader

	cases := []struct {
		name    string
		provoke func(t *testing.T, addr string) *wireClient
		code    uint16   // 0: the socket is closed without connection.close
		ids     []uint16 // class and method of connection.close; nil: not checked
	}{
		// 501 FRAME_ERROR
		{"frame-end octet", connected(wireOpts{}, func(c *wireClient) {
			f := appendMethodFrame(nil, 1, &channelOpen{})
			f[len(f)-1] = 0
			c.send(f)
		}), replyFrameError, []uint16{0, 0}},
		{"frame over frame-max", connected(wireOpts{frameMax: 4096}, func(c *wireClient) {
			// A frame of exactly frame-max is fine: one body frame of 4088 octets.
			c.openChannel(1)
			c.sendMethod(1, &queueDeclare{Queue: "fm", Exclusive: true})
			wireExpect[*queueDeclareOk](c, 1)
			body := bytes.Repeat([]byte{'x'}, 4096-frameOverhead)
			c.sendMethod(1, &basicPublish{RoutingKey: "fm"})
			c.send(appendContent(nil, 1, nil, body, 4096))
			c.sendMethod(1, &basicGet{Queue: "fm", NoAck: true})
			wireExpect[*basicGetOk](c, 1)
			if f, err := c.readFrame(wireTimeout); err != nil || f.typ != frameHeader {
				c.t.Fatalf("after get-ok: frame type %d, %v; want a content header", f.typ, err)
			}
			if f, err := c.readFrame(wireTimeout); err != nil || f.typ != frameBody || !bytes.Equal(f.payload, body) {
				c.t.Fatalf("after the content header: frame type %d of %d octets, %v; want the body", f.typ, len(f.payload), err)
			}
			// Past frame-max (RabbitMQ tolerates payloads up to frame-max itself): only the
			// frame header goes out, the size alone is the error.
			c.send([]byte{frameMethod, 0, 1, 0, 0, 0x10, 0x01})
		}), replyFrameError, []uint16{0, 0}},
		{"unknown frame type", connected(wireOpts{}, func(c *wireClient) {
			c.send(wireFrame(7, 0, nil))
		}), replyFrameError, []uint16{0, 0}},
		{"method frame under 4 octets on channel 0", connected(wireOpts{}, func(c *wireClient) {
			c.send(wireFrame(frameMethod, 0, []byte{0, 10}))
		}), replyFrameError, []uint16{0, 0}},
		{"method frame under 4 octets on channel 1", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameMethod, 1, []byte{0, 50, 0}))
		}), replyFrameError, []uint16{0, 0}},

		// 502 SYNTAX_ERROR
		{"queue.declare truncated", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameMethod, 1, []byte{0, 50, 0, 10, 0, 0, 1, 'q'}))
		}), replySyntaxError, []uint16{50, 10}},
		{"queue.declare shortstr past the end", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameMethod, 1, []byte{0, 50, 0, 10, 0, 0, 200, 'a', 'b', 'c'}))
		}), replySyntaxError, []uint16{50, 10}},
		{"queue.declare table value of unknown type", onChannel1(func(c *wireClient) {
			p := []byte{0, 50, 0, 10, 0, 0, 1, 'q', 0}
			p = append(p, 0, 0, 0, 3, 1, 'k', 'Z')
			c.send(wireFrame(frameMethod, 1, p))
		}), replySyntaxError, []uint16{50, 10}},
		{"basic.publish truncated", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameMethod, 1, []byte{0, 60, 0, 40, 0, 0, 5, 'a'}))
		}), replySyntaxError, []uint16{60, 40}},

		// 504 CHANNEL_ERROR
		{"method on a channel not open", connected(wireOpts{}, func(c *wireClient) {
			c.sendMethod(3, &queueDeclare{Queue: "q"})
		}), replyChannelError, []uint16{50, 10}},
		{"second channel.open", onChannel1(func(c *wireClient) {
			c.sendMethod(1, &channelOpen{})
		}), replyChannelError, []uint16{20, 10}},
		{"channel above channel-max", connected(wireOpts{channelMax: 10}, func(c *wireClient) {
			c.openChannel(10)
			c.sendMethod(11, &channelOpen{})
		}), replyNotAllowed, []uint16{0, 0}},
		{"channel.open on channel 0", connected(wireOpts{}, func(c *wireClient) {
			c.sendMethod(0, &channelOpen{})
		}), replyChannelError, []uint16{20, 10}},
		{"content header on a channel not open", connected(wireOpts{}, func(c *wireClient) {
			c.send(wireFrame(frameHeader, 2, header(1)))
		}), replyChannelError, nil},

		// 505 UNEXPECTED_FRAME
		{"content header without publish", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameHeader, 1, header(1)))
		}), replyUnexpectedFrame, nil},
		{"content body without publish", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameBody, 1, []byte("x")))
		}), replyUnexpectedFrame, nil},
		{"method between publish and its header", onChannel1(func(c *wireClient) {
			publish(c)
			c.sendMethod(1, &basicQos{PrefetchCount: 1})
		}), replyUnexpectedFrame, nil},
		{"method between header and body", onChannel1(func(c *wireClient) {
			publish(c)
			c.send(wireFrame(frameHeader, 1, header(5)))
			c.sendMethod(1, &basicQos{PrefetchCount: 1})
		}), replyUnexpectedFrame, nil},
		{"body larger than its header says", onChannel1(func(c *wireClient) {
			publish(c)
			c.send(wireFrame(frameHeader, 1, header(3)))
			c.send(wireFrame(frameBody, 1, []byte("12345")))
		}), replyUnexpectedFrame, nil},
		{"heartbeat on channel 1", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameHeartbeat, 1, nil))
		}), replyUnexpectedFrame, nil},
		{"content header on channel 0", connected(wireOpts{}, func(c *wireClient) {
			c.send(wireFrame(frameHeader, 0, header(1)))
		}), replyUnexpectedFrame, nil},

		// 540 NOT_IMPLEMENTED
		{"unknown class on channel 1", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameMethod, 1, []byte{0, 99, 0, 1}))
		}), replyNotImplemented, []uint16{99, 1}},
		{"unknown basic method on channel 1", onChannel1(func(c *wireClient) {
			c.send(wireFrame(frameMethod, 1, []byte{0, 60, 999 >> 8, 999 & 0xff}))
		}), replyNotImplemented, []uint16{60, 999}},
		{"unknown class on channel 0", connected(wireOpts{}, func(c *wireClient) {
			c.send(wireFrame(frameMethod, 0, []byte{0, 99, 0, 1}))
		}), replyNotImplemented, []uint16{99, 1}},

		// The handshake.
		{"unknown vhost", handshake(wireOpts{vhost: "/other"}, 3), replyNotAllowed, []uint16{10, 40}},
		{"tune-ok frame-max under 4096", handshake(wireOpts{frameMax: 1000}, 2), replyNotAllowed, []uint16{10, 31}},
		{"tune-ok frame-max over the server's", handshake(wireOpts{frameMax: defaultFrameMax + 1}, 2), replyNotAllowed, []uint16{10, 31}},
		{"tune-ok channel-max over the server's", handshake(wireOpts{channelMax: defaultChannelMax + 1}, 2), replyNotAllowed, []uint16{10, 31}},
		{"wrong password", handshake(wireOpts{response: "\x00guest\x00nope"}, 1), replyAccessRefused, []uint16{10, 11}},
		{"wrong AMQPLAIN password", handshake(wireOpts{mechanism: "AMQPLAIN", response: wireAMQPlain("guest", "nope")}, 1), replyAccessRefused, []uint16{10, 11}},
		{"wrong password without authentication_failure_close", handshake(wireOpts{response: "\x00guest\x00nope", noAuthFailureClose: true}, 1), 0, nil},
		{"unknown SASL mechanism", handshake(wireOpts{mechanism: "EXTERNAL", response: "x"}, 1), replyCommandInvalid, []uint16{10, 11}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, url := newTestServer(t)
			other := dial(t, url)
			c := tc.provoke(t, srv.Addr().String())
			if tc.code == 0 {
				c.expectClosed(wireTimeout)
			} else {
				c.expectConnClose(tc.code, tc.ids...)
			}
			wireCheckClient(t, other)
		})
	}
}

func TestConnAMQPlainLogin(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	c := wireConnect(t, srv.Addr().String(), wireOpts{mechanism: "AMQPLAIN", response: wireAMQPlain("guest", "guest")})
	c.openChannel(1)
	c.sendMethod(1, &queueDeclare{Queue: "amqplain", Exclusive: true})
	if ok := wireExpect[*queueDeclareOk](c, 1); ok.Queue != "amqplain" {
		t.Errorf("declare-ok names queue %q", ok.Queue)
	}
	c.sendMethod(0, &connectionClose{ReplyCode: replySuccess, ReplyText: "bye"})
	wireExpect[*connectionCloseOk](c, 0)
	c.expectClosed(wireTimeout)
}

// TestConnChannelError checks a soft error: channel.close 404 naming queue.declare, then
// everything on that channel but close-ok is dropped, and after close-ok the channel
// number can be opened again.
func TestConnChannelError(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	other := dial(t, url)
	c := wireConnect(t, srv.Addr().String(), wireOpts{})
	c.openChannel(1)
	c.openChannel(2)
	c.sendMethod(2, &queueDeclare{Queue: "soft-target", Exclusive: true})
	wireExpect[*queueDeclareOk](c, 2)

	c.sendMethod(1, &queueDeclare{Queue: "no-such-queue", Passive: true})
	cl := wireExpect[*channelClose](c, 1)
	if cl.ReplyCode != replyNotFound || cl.ClassID != 50 || cl.MethodID != 10 {
		t.Errorf("channel.close %d %q for %d.%d, want 404 for 50.10", cl.ReplyCode, cl.ReplyText, cl.ClassID, cl.MethodID)
	}
	if want := "NOT_FOUND - no queue 'no-such-queue' in vhost '/'"; cl.ReplyText != want {
		t.Errorf("reply text %q, want %q", cl.ReplyText, want)
	}

	// Until close-ok, channel 1 drops methods (even malformed or unknown ones) and content.
	c.sendMethod(1, &queueDeclare{Queue: "declared-while-closing"})
	c.sendMethod(1, &basicQos{PrefetchCount: 1})
	c.send(wireFrame(frameMethod, 1, []byte{0, 50, 0, 10, 0, 0, 200}))
	c.send(wireFrame(frameMethod, 1, []byte{0, 99, 0, 1}))
	c.sendMethod(1, &basicPublish{RoutingKey: "soft-target"})
	c.send(appendContent(nil, 1, nil, []byte("dropped"), defaultFrameMax))
	c.send(wireFrame(frameBody, 1, []byte("stray body")))
	// Nothing came back on channel 1 and nothing was routed: the next frame is get-empty.
	c.sendMethod(2, &basicGet{Queue: "soft-target", NoAck: true})
	wireExpect[*basicGetEmpty](c, 2)

	c.sendMethod(1, &channelCloseOk{})
	c.openChannel(1)
	c.sendMethod(1, &queueDeclare{Queue: "declared-while-closing", Passive: true})
	if cl := wireExpect[*channelClose](c, 1); cl.ReplyCode != replyNotFound {
		t.Errorf("the declare sent while closing was not dropped: passive declare got %d %q", cl.ReplyCode, cl.ReplyText)
	}
	c.sendMethod(1, &channelCloseOk{})
	c.openChannel(1)
	c.sendMethod(1, &channelClose{ReplyCode: replySuccess, ReplyText: "done"})
	wireExpect[*channelCloseOk](c, 1)
	c.sendMethod(0, &connectionClose{ReplyCode: replySuccess, ReplyText: "bye"})
	wireExpect[*connectionCloseOk](c, 0)
	c.expectClosed(wireTimeout)
	wireCheckClient(t, other)
}

// TestConnTimers checks the handshake timeout, heartbeats and the close-ok timeout. Every
// clock starts at once and background readers note when each socket closes, so the test
// takes as long as its longest wait (the 5s close-ok timeout), not the sum.
func TestConnTimers(t *testing.T) {
	t.Parallel()
	slowSrv, slowURL := newTestServer(t, Config{HandshakeTimeout: 300 * time.Millisecond})
	slow := slowSrv.Addr().String()
	srv, url := newTestServer(t)
	addr := srv.Addr().String()
	other := dial(t, slowURL)

	start := time.Now()
	hsSilent := wireDial(t, slow)
	hsHeader := wireDial(t, slow)
	hsHeader.send(protocolHeader[:])
	wireExpect[*connectionStart](hsHeader, 0)
	hsNoTuneOk := wireHandshake(t, slow, wireOpts{}, 1)
	wireExpect[*connectionTune](hsNoTuneOk, 0)
	hsOpen := wireConnect(t, slow, wireOpts{})
	hb, err := amqp091.DialConfig(url, amqp091.Config{Heartbeat: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	hbClosed := hb.NotifyClose(make(chan *amqp091.Error, 1))
	hbSilent := wireConnect(t, addr, wireOpts{heartbeat: 1})
	hbOpened := time.Now()
	noCloseOk := wireConnect(t, addr, wireOpts{})
	noCloseOk.send(wireFrame(7, 0, nil))
	if cl := wireExpect[*connectionClose](noCloseOk, 0); cl.ReplyCode != replyFrameError {
		t.Fatalf("connection.close %d %q, want 501", cl.ReplyCode, cl.ReplyText)
	}
	closeSent := time.Now()
	noCloseOk.sendMethod(1, &channelOpen{}) // ignored: only close and close-ok count now

	deadline := start.Add(10 * time.Second)
	hsSilentW, hsHeaderW, hsNoTuneOkW := hsSilent.watch(deadline), hsHeader.watch(deadline), hsNoTuneOk.watch(deadline)
	hsOpenW := hsOpen.watch(start.Add(time.Second))
	hbSilentW, noCloseOkW := hbSilent.watch(deadline), noCloseOk.watch(deadline)

	// closedAfter checks that w ended with the socket closed, after about want (within
	// [min, max]) since from, with no frames but heartbeats before.
	closedAfter := func(t *testing.T, w wireWatch, from time.Time, lo, hi time.Duration) {
		t.Helper()
		for _, f := range w.frames {
			if f.typ != frameHeartbeat {
				t.Errorf("got %s before the socket closed", wireDescribe(f))
			}
		}
		if !wireIsClosed(w.err) {
			t.Fatalf("read: %v, want the socket closed", w.err)
		}
		if d := w.end.Sub(from); d < lo || d > hi {
			t.Errorf("socket closed after %v, want within [%v, %v]", d, lo, hi)
		}
	}
	t.Run("handshake timeout/silent socket", func(t *testing.T) {
		closedAfter(t, <-hsSilentW, start, 250*time.Millisecond, 1500*time.Millisecond)
	})
	t.Run("handshake timeout/header only", func(t *testing.T) {
		closedAfter(t, <-hsHeaderW, start, 250*time.Millisecond, 1500*time.Millisecond)
	})
	t.Run("handshake timeout/no tune-ok", func(t *testing.T) {
		closedAfter(t, <-hsNoTuneOkW, start, 250*time.Millisecond, 1500*time.Millisecond)
	})
	t.Run("handshake timeout/open connection stays", func(t *testing.T) {
		w := <-hsOpenW
		if len(w.frames) > 0 || !errors.Is(w.err, os.ErrDeadlineExceeded) {
			t.Fatalf("an open connection got %d frames and %v within 1s, want nothing", len(w.frames), w.err)
		}
		hsOpen.t = t
		hsOpen.openChannel(1)
	})
	t.Run("heartbeat/server sends heartbeats", func(t *testing.T) {
		w := <-hbSilentW
		hbSilentW = wireChanOf(w)
		if len(w.frames) == 0 || w.frames[0].typ != frameHeartbeat {
			t.Fatalf("got %d frames, want heartbeats", len(w.frames))
		}
		if f := w.frames[0]; f.channel != 0 || len(f.payload) != 0 {
			t.Errorf("heartbeat on channel %d with %d octets, want an empty frame on channel 0", f.channel, len(f.payload))
		}
		if d := w.times[0].Sub(hbOpened); d > 2*time.Second {
			t.Errorf("first heartbeat %v after open-ok, want within 2s", d)
		}
	})
	t.Run("heartbeat/silent client is dropped", func(t *testing.T) {
		closedAfter(t, <-hbSilentW, hbOpened, 1500*time.Millisecond, 3500*time.Millisecond)
	})
	t.Run("heartbeat/amqp091 client stays connected", func(t *testing.T) {
		if hb.Config.Heartbeat != time.Second {
			t.Fatalf("negotiated heartbeat %v, want 1s", hb.Config.Heartbeat)
		}
		select {
		case err := <-hbClosed:
			t.Fatalf("connection closed while idle: %v", err)
		case <-time.After(time.Until(start.Add(3500 * time.Millisecond))):
		}
		wireCheckClient(t, hb)
	})
	t.Run("close-ok timeout", func(t *testing.T) {
		closedAfter(t, <-noCloseOkW, closeSent, defaultCloseTimeout-500*time.Millisecond, defaultCloseTimeout+2*time.Second)
	})
	wireCheckClient(t, other)
}

func TestConnGracefulShutdown(t *testing.T) {
	t.Parallel()
	srv := NewServer(Config{Logger: wireDiscardLogger(), DataDir: t.TempDir()})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	url := "amqp://guest:guest@" + srv.Addr().String() + "/"
	conn := dial(t, url)
	ch := openChannel(t, conn)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.Consume(q.Name, "", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown = %v, want nil", err)
	}
	select {
	case e := <-closed:
		if e == nil || e.Code != replyConnectionForced {
			t.Errorf("NotifyClose got %v, want code 320", e)
		}
	case <-time.After(wireTimeout):
		t.Error("the client was not told the connection closed")
	}
	select {
	case err := <-served:
		if err != ErrServerClosed {
			t.Errorf("Serve = %v, want ErrServerClosed", err)
		}
	case <-time.After(wireTimeout):
		t.Error("Serve did not return after Shutdown")
	}
	if err := srv.Shutdown(ctx); err != nil {
		t.Errorf("second Shutdown = %v, want nil", err)
	}
	if err := srv.Serve(ln); err != ErrServerClosed {
		t.Errorf("Serve after Shutdown = %v, want ErrServerClosed", err)
	}
}

func TestConnChannelChurn(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	for i := 0; i < 1000; i++ {
		ch, err := conn.Channel()
		if err != nil {
			t.Fatalf("channel %d: open: %v", i, err)
		}
		if err := ch.Close(); err != nil {
			t.Fatalf("channel %d: close: %v", i, err)
		}
	}
	wireCheckClient(t, conn)
}

// TestConnNoGoroutineLeak runs a server through clean clients, consumers with unacked
// deliveries, a hard error, a handshake timeout and a client that vanishes mid-publish;
// after Shutdown the goroutine count must come back to where it was. Not parallel: the
// count means nothing while other tests run.
func TestConnNoGoroutineLeak(t *testing.T) {
	base := runtime.NumGoroutine()
	srv := NewServer(Config{Logger: wireDiscardLogger(), DataDir: t.TempDir(), HandshakeTimeout: 300 * time.Millisecond})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	addr := srv.Addr().String()
	url := "amqp://guest:guest@" + addr + "/"

	var conns []*amqp091.Connection
	for i := 0; i < 3; i++ {
		conn, err := amqp091.Dial(url)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		q, err := ch.QueueDeclare(fmt.Sprintf("leak-%d", i), false, false, i == 0, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		for j := 0; j < 10; j++ {
			if err := ch.PublishWithContext(context.Background(), "", q.Name, false, false, amqp091.Publishing{Body: []byte("m")}); err != nil {
				t.Fatal(err)
			}
		}
		if err := ch.Qos(2, 0, false); err != nil {
			t.Fatal(err)
		}
		msgs, err := ch.Consume(q.Name, "", false, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-msgs:
		case <-time.After(wireTimeout):
			t.Fatal("no delivery")
		}
	}
	bad := wireConnect(t, addr, wireOpts{})
	bad.send(wireFrame(7, 0, nil))
	bad.expectConnClose(replyFrameError)
	slow := wireDial(t, addr)
	slow.send(protocolHeader[:])
	wireExpect[*connectionStart](slow, 0)
	slow.expectClosed(wireTimeout)
	gone := wireConnect(t, addr, wireOpts{})
	gone.openChannel(1)
	gone.sendMethod(1, &basicPublish{RoutingKey: "leak-1"})
	gone.send(wireFrame(frameHeader, 1, wireContentHeader(100)))
	gone.nc.Close()

	// A raw client that answers the server's connection.close, from another goroutine.
	idle := wireConnect(t, addr, wireOpts{})
	idle.openChannel(1)
	idleDone := make(chan error, 1)
	go func() {
		f, err := idle.readFrame(wireTimeout)
		if err != nil {
			idleDone <- err
			return
		}
		id, d, err := methodHeader(f.payload)
		m := connectionClose{}
		if m.decode(&d); err != nil || id != idConnectionClose || m.ReplyCode != replyConnectionForced {
			idleDone <- fmt.Errorf("got frame type %d method %s code %d, want connection.close 320", f.typ, methodName(id), m.ReplyCode)
			return
		}
		idle.nc.Write(appendMethodFrame(nil, 0, &connectionCloseOk{}))
		idleDone <- nil
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown = %v", err)
	}
	if err := <-served; err != ErrServerClosed {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	if err := <-idleDone; err != nil {
		t.Errorf("idle raw client: %v", err)
	}
	for _, conn := range conns {
		conn.Close()
	}

	deadline := time.Now().Add(5 * time.Second)
	for n := runtime.NumGoroutine(); n > base; n = runtime.NumGoroutine() {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines after shutdown, %d before the server started:\n%s", n, base, buf)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestConnClientCloseDuringHandshake: a client may give up during the handshake with
// connection.close; the server answers close-ok and closes the socket, nothing more.
func TestConnClientCloseDuringHandshake(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	c := wireHandshake(t, srv.Addr().String(), wireOpts{}, 1)
	wireExpect[*connectionTune](c, 0)
	c.sendMethod(0, &connectionClose{ReplyCode: replySuccess, ReplyText: "changed my mind"})
	wireExpect[*connectionCloseOk](c, 0)
	c.expectClosed(wireTimeout)
}

// TestConnHeartbeatFloodDuringHandshake: heartbeats are allowed before connection.open,
// and any number of them must not hurt the server.
func TestConnHeartbeatFloodDuringHandshake(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t, Config{HandshakeTimeout: time.Minute})
	other := dial(t, url)

	// A few heartbeats before start-ok are fine.
	c := wireDial(t, srv.Addr().String())
	c.send(protocolHeader[:])
	wireExpect[*connectionStart](c, 0)
	c.send(bytes.Repeat(appendHeartbeat(nil), 100))
	c.sendMethod(0, &connectionStartOk{Mechanism: "PLAIN", Response: "\x00guest\x00guest", Locale: "en_US"})
	wireExpect[*connectionTune](c, 0)

	// A flood is cut off at MaxPreAuthBytes (64 KiB by default), without harm to others.
	f := wireDial(t, srv.Addr().String())
	f.send(protocolHeader[:])
	wireExpect[*connectionStart](f, 0)
	flood := bytes.Repeat(appendHeartbeat(nil), 3<<20) // 24 MiB
	f.nc.SetWriteDeadline(time.Now().Add(time.Minute))
	if _, err := f.nc.Write(flood); err == nil {
		t.Fatal("server read 24 MiB of heartbeats before login")
	}
	f.expectClosed(5 * time.Second)
	wireCheckClient(t, other)
}

// TestConnShutdownDuringHandshake: Shutdown does not wait for sockets that have not
// finished the handshake; it closes them, and sends no frame to a socket that has not even
// sent the protocol header.
func TestConnShutdownDuringHandshake(t *testing.T) {
	t.Parallel()
	srv := NewServer(Config{Logger: wireDiscardLogger(), DataDir: t.TempDir()})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	addr := srv.Addr().String()
	silent := wireDial(t, addr)
	header := wireDial(t, addr)
	header.send(protocolHeader[:])
	wireExpect[*connectionStart](header, 0)
	open := wireConnect(t, addr, wireOpts{})
	go func() {
		// The open client answers connection.close as a client library would.
		if f, err := open.readFrame(wireTimeout); err == nil && f.typ == frameMethod {
			open.nc.Write(appendMethodFrame(nil, 0, &connectionCloseOk{}))
		}
	}()

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Shutdown took %v with two sockets still in the handshake, want well under the 5s close timeout", d)
	}
	if err := <-served; err != ErrServerClosed {
		t.Errorf("Serve = %v", err)
	}
	silent.expectClosed(time.Second)
	// A socket past the header may be told why with connection.close 320.
	header.nc.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := io.Copy(io.Discard, header.nc); err != nil {
		t.Errorf("socket in the handshake: %v, want it closed", err)
	}
}

// TestConnAuthFailureDelay: a refused login is answered only after Config.AuthFailureDelay,
// so a client cannot try passwords faster than that on one connection.
func TestConnAuthFailureDelay(t *testing.T) {
	t.Parallel()
	const delay = 300 * time.Millisecond
	srv, _ := newTestServer(t, Config{AuthFailureDelay: delay})
	start := time.Now()
	c := wireHandshake(t, srv.Addr().String(), wireOpts{response: "\x00guest\x00wrong"}, 1)
	if cl := wireExpect[*connectionClose](c, 0); cl.ReplyCode != replyAccessRefused {
		t.Fatalf("connection.close %d %q, want 403", cl.ReplyCode, cl.ReplyText)
	}
	if d := time.Since(start); d < delay {
		t.Fatalf("refused after %v, want at least %v", d, delay)
	}
}

// TestMemoryAlarmBlocksPublishers: with the live heap over MemoryHighWatermark, a
// connection that publishes gets connection.blocked and is no longer read; one that only
// consumes keeps working; when the heap falls back, connection.unblocked and the publish
// goes through.
func TestMemoryAlarmBlocksPublishers(t *testing.T) {
	t.Parallel()
	var heap atomic.Uint64
	srv := NewServer(Config{Logger: wireDiscardLogger(), DataDir: t.TempDir(), MemoryHighWatermark: 1 << 20})
	srv.liveHeap = heap.Load
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	url := "amqp://guest:guest@" + srv.Addr().String() + "/"

	pubConn := dial(t, url)
	blocked := pubConn.NotifyBlocked(make(chan amqp091.Blocking, 4))
	pub := openChannel(t, pubConn)
	other := openChannel(t, dial(t, url))
	if _, err := other.QueueDeclare("alarm", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	depth := func() int {
		q, err := other.QueueDeclarePassive("alarm", false, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		return q.Messages
	}
	waitDepth := func(n int) {
		deadline := time.Now().Add(5 * time.Second)
		for depth() != n {
			if time.Now().After(deadline) {
				t.Fatalf("queue depth %d, want %d", depth(), n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if err := pub.Publish("", "alarm", false, false, amqp091.Publishing{Body: []byte("1")}); err != nil {
		t.Fatal(err)
	}
	waitDepth(1)

	heap.Store(2 << 20)
	deadline := time.Now().Add(5 * time.Second)
	for srv.alarms.Load()&alarmMemory == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the alarm never went on")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := pub.Publish("", "alarm", false, false, amqp091.Publishing{Body: []byte("2")}); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-blocked:
		if !b.Active {
			t.Fatalf("got %+v, want connection.blocked", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no connection.blocked")
	}
	// The consumer-only connection still works, and the publish has not gone through.
	if n := depth(); n != 1 {
		t.Fatalf("queue depth %d while the publisher is blocked, want 1", n)
	}

	heap.Store(0)
	select {
	case b := <-blocked:
		if b.Active {
			t.Fatalf("got %+v, want connection.unblocked", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no connection.unblocked")
	}
	waitDepth(2)
}

// TestReadLiveHeap: the memory alarm's gauge reads the runtime's live-heap metric, which a
// garbage collection sets, and the runtime's own memory; every class it names exists.
func TestReadLiveHeap(t *testing.T) {
	runtime.GC()
	known := map[string]bool{}
	for _, d := range metrics.All() {
		known[d.Name] = true
	}
	for _, name := range memoryInUse {
		if !known[name] {
			t.Errorf("runtime metric %s does not exist", name)
		}
	}
	samples := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(samples)
	if live := samples[0].Value.Uint64(); live == 0 || readLiveHeap() <= live {
		t.Fatalf("memory in use %d, live heap %d: want the live heap and more", readLiveHeap(), live)
	}
}

// TestPanicMarksBrokerUnhealthy: a panic inside a locked section (here: routing through a
// topic exchange whose trie is missing, under the vhost's read lock) ends that connection
// without touching the state it may have left locked, and Healthy reports the broker must
// be restarted, with the panic and its stack logged.
func TestPanicMarksBrokerUnhealthy(t *testing.T) {
	t.Parallel()
	var logs lockedBuffer
	srv, url := newTestServer(t, Config{Logger: logs.logger()})
	c := dial(t, url)
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("", false, false, true, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := srv.Healthy(); err != nil {
		t.Fatalf("Healthy before the panic: %v", err)
	}
	vh := srv.vhost("/")
	vh.mu.Lock()
	vh.exchanges["broken"] = &exchange{name: "broken", kind: kindTopic} // no trie: routing panics
	vh.mu.Unlock()
	closed := c.NotifyClose(make(chan *amqp091.Error, 1))
	if err := ch.Publish("broken", "k", false, false, amqp091.Publishing{Body: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-closed:
	case <-time.After(wireTimeout):
		t.Fatal("the connection that panicked was not closed")
	}
	pollFor(t, "the connection to end", func() bool { return openConns(srv) == 0 })
	err := srv.Healthy()
	if err == nil || !strings.Contains(err.Error(), "panicked") {
		t.Fatalf("Healthy after the panic: %v, want the broker unhealthy", err)
	}
	if out := logs.String(); !strings.Contains(out, "restart it") || !strings.Contains(out, "goroutine") {
		t.Fatalf("no loud log line with the stack in:\n%s", out)
	}
}

// wireTryLogin sends the protocol header and a PLAIN start-ok with response on a socket
// from dial, answers a connection.close with close-ok, and reads until the socket closes.
// It returns the reply code of the connection.close, 0 if the socket closed unanswered.
// It takes no testing.T, so it may run on any goroutine.
func wireTryLogin(addr, response string, dial func(network, addr string) (net.Conn, error)) (uint16, error) {
	nc, err := dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(wireTimeout))
	b := appendMethodFrame(append([]byte(nil), protocolHeader[:]...), 0, &connectionStartOk{
		ClientProperties: table{"capabilities": table{"authentication_failure_close": true}},
		Mechanism:        "PLAIN",
		Response:         response,
		Locale:           "en_US",
	})
	if _, err := nc.Write(b); err != nil {
		return 0, err
	}
	fr := frameReader{r: bufio.NewReader(nc), frameMax: 1 << 24}
	var code uint16
	for {
		f, err := fr.read()
		if wireIsClosed(err) {
			return code, nil
		}
		if err != nil {
			return code, err
		}
		if id, d, err := methodHeader(f.payload); f.typ == frameMethod && err == nil && id == idConnectionClose {
			var m connectionClose
			m.decode(&d)
			code = m.ReplyCode
			nc.Write(appendMethodFrame(nil, 0, &connectionCloseOk{}))
		}
	}
}

// wireDialFrom returns a dial function whose sockets come from ip, a loopback address
// other than 127.0.0.1 on Linux, so that a test has a second source address. It skips the
// test where such sockets cannot be made.
func wireDialFrom(t testing.TB, ip, addr string) func(network, addr string) (net.Conn, error) {
	t.Helper()
	d := &net.Dialer{Timeout: wireTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	nc, err := d.Dial("tcp", addr)
	if err != nil {
		t.Skipf("no socket from %s: %v", ip, err)
	}
	nc.Close()
	return d.Dial
}

func isWarn(rec map[string]any) bool { return rec["level"] == "WARN" }

// TestConnLoginLimit: however many connections try in parallel from one address, the
// failed logins checked are Config.AuthFailureLimit at once, then one per refill period
// (a second, 50ms here); the logins whose turn would come after their handshake deadline
// are not checked at all and close unanswered at the deadline.
func TestConnLoginLimit(t *testing.T) {
	t.Parallel()
	const (
		burst    = 3
		refill   = 50 * time.Millisecond
		timeout  = 500 * time.Millisecond
		parallel = 60
	)
	for _, tc := range []struct {
		name  string
		limit int
	}{{"limited", burst}, {"no limit", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			log := &secLog{}
			cfg := Config{AuthFailureLimit: tc.limit, AuthFailureDelay: time.Millisecond, HandshakeTimeout: timeout, Logger: log.logger()}
			srv := secServeTuned(t, cfg, false, func(s *Server) {
				if s.logins != nil {
					s.logins.refill = refill
				}
			})
			addr := srv.Addr().String()
			dial := (&net.Dialer{Timeout: wireTimeout}).Dial
			var answered atomic.Int32
			errs := make(chan error, parallel)
			start := time.Now()
			for range parallel {
				go func() {
					code, err := wireTryLogin(addr, "\x00guest\x00wrong", dial)
					if code == replyAccessRefused {
						answered.Add(1)
					} else if code != 0 {
						err = fmt.Errorf("connection.close %d, want 403 or none", code)
					}
					errs <- err
				}()
			}
			for range parallel {
				if err := <-errs; err != nil {
					t.Error(err)
				}
			}
			elapsed := time.Since(start)
			checked := log.count(isWarn, "login refused", "wrong password")
			throttled := log.count(isWarn, "throttling logins: too many failed logins from the address", "127.0.0.1")
			t.Logf("%d parallel failed logins in %v: %d checked and answered", parallel, elapsed, checked)
			if int(answered.Load()) != checked {
				t.Errorf("%d logins answered, %d checked", answered.Load(), checked)
			}
			if tc.limit < 0 {
				if checked != parallel || throttled != 0 {
					t.Errorf("without a limit: %d of %d logins checked, %d throttling warnings", checked, parallel, throttled)
				}
				return
			}
			// The burst, then one a refill period until the last deadline.
			if most := burst + int(elapsed/refill) + 1; checked > most || checked <= burst {
				t.Errorf("%d of %d logins checked in %v, want more than the burst of %d and at most %d", checked, parallel, elapsed, burst, most)
			}
			if throttled != 1 {
				t.Errorf("%d throttling warnings, want 1:\n%s", throttled, log)
			}
		})
	}
}

// TestConnLoginLimitSources: logins that succeed do not count against the limit; once an
// address is over it, its logins, right or wrong, wait their turn; other addresses are
// not held.
func TestConnLoginLimitSources(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	log := &secLog{}
	cfg := Config{AuthFailureLimit: 3, AuthFailureDelay: time.Millisecond, HandshakeTimeout: timeout, Logger: log.logger()}
	// With a token an hour, a turn past the limit is always after the handshake deadline.
	srv := secServeTuned(t, cfg, false, func(s *Server) { s.logins.refill = time.Hour })
	addr := srv.Addr().String()
	local, other := wireDialFrom(t, "127.0.0.1", addr), wireDialFrom(t, "127.0.0.2", addr)
	dial := func(from func(string, string) (net.Conn, error), password string) (*amqp091.Connection, error) {
		return amqp091.DialConfig("amqp://"+addr+"/", amqp091.Config{
			SASL: []amqp091.Authentication{&amqp091.PlainAuth{Username: "guest", Password: password}},
			Dial: from,
		})
	}

	// Two failures leave one token; logins that succeed take none, however many.
	for range 2 {
		if _, err := dial(local, "wrong"); err != amqp091.ErrCredentials {
			t.Fatalf("a wrong password: %v, want ErrCredentials", err)
		}
	}
	for i := range 5 {
		c, err := dial(local, "guest")
		if err != nil {
			t.Fatalf("login %d with the right password: %v", i, err)
		}
		c.Close()
	}
	if _, err := dial(local, "wrong"); err != amqp091.ErrCredentials {
		t.Fatalf("the third wrong password: %v, want ErrCredentials", err)
	}
	// The bucket is empty: the next login's turn is an hour away, so it is not checked and
	// its socket closes at the handshake deadline, unanswered, right password or wrong.
	for _, password := range []string{"guest", "wrong"} {
		start := time.Now()
		code, err := wireTryLogin(addr, "\x00guest\x00"+password, local)
		if err != nil || code != 0 {
			t.Errorf("password %q over the limit: connection.close %d, %v; want the socket closed unanswered", password, code, err)
		}
		if d := time.Since(start); d < timeout/2 {
			t.Errorf("password %q over the limit: closed after %v, before the %v handshake deadline", password, d, timeout)
		}
	}
	// Another address is not held.
	c, err := dial(other, "guest")
	if err != nil {
		t.Fatalf("from 127.0.0.2: %v", err)
	}
	defer c.Close()
	wireCheckClient(t, c)
	if code, err := wireTryLogin(addr, "\x00guest\x00wrong", other); err != nil || code != replyAccessRefused {
		t.Errorf("a wrong password from 127.0.0.2: connection.close %d, %v; want 403", code, err)
	}
	if n := log.count(isWarn, "login refused"); n != 4 {
		t.Errorf("%d logins checked and refused, want 4: the 3 of 127.0.0.1's burst and 127.0.0.2's", n)
	}
	if n := log.count(isWarn, "throttling logins: too many failed logins from the address"); n != 1 {
		t.Errorf("%d throttling warnings, want 1 (for 127.0.0.1):\n%s", n, log)
	}
}

// TestConnLoginWaitShutdown: Shutdown ends a login waiting its turn at once, not at the
// handshake deadline.
func TestConnLoginWaitShutdown(t *testing.T) {
	t.Parallel()
	log := &secLog{}
	srv := NewServer(Config{Logger: log.logger(), DataDir: t.TempDir(), AuthFailureLimit: 1,
		AuthFailureDelay: time.Millisecond, HandshakeTimeout: time.Minute})
	srv.logins.refill = time.Hour
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	addr := srv.Addr().String()
	dial := (&net.Dialer{Timeout: wireTimeout}).Dial
	if code, err := wireTryLogin(addr, "\x00guest\x00wrong", dial); err != nil || code != replyAccessRefused {
		t.Fatalf("a wrong password: connection.close %d, %v; want 403", code, err)
	}
	held := make(chan error, 1)
	go func() {
		code, err := wireTryLogin(addr, "\x00guest\x00guest", dial)
		if err == nil && code != 0 {
			err = fmt.Errorf("connection.close %d, want the socket closed unanswered", code)
		}
		held <- err
	}()
	pollFor(t, "the login held", func() bool { return log.has("throttling logins: too many failed logins from the address") })

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Shutdown took %v with a login waiting its turn", d)
	}
	if err := <-held; err != nil {
		t.Errorf("the held login: %v", err)
	}
	if err := <-served; err != ErrServerClosed {
		t.Errorf("Serve = %v", err)
	}
}

// TestConnMaxConnectionsCountsOpen: Config.MaxConnections counts connections past
// connection.open, so sockets that never log in do not lock clients out; a handshake
// begun under the limit that reaches connection.open over it is refused with 530.
func TestConnMaxConnectionsCountsOpen(t *testing.T) {
	t.Parallel()
	srv := secServe(t, Config{MaxConnections: 2}, false)
	addr := srv.Addr().String()
	idle1, idle2 := wireDial(t, addr), wireDial(t, addr) // never send the protocol header
	first := secConnect(t, addr, "guest", "guest", "/")
	late := wireHandshake(t, addr, wireOpts{}, 2)
	second := secConnect(t, addr, "guest", "guest", "/")
	late.sendMethod(0, &connectionOpen{VirtualHost: "/"})
	secRefusedClose(late, replyNotAllowed, "NOT_ALLOWED - connection refused: node connection limit (2) is reached", 10, 40)
	if c, err := secDial(addr, "guest", "guest", "/"); err == nil {
		c.Close()
		t.Fatal("amqp091-go connected beyond the limit")
	}
	wireCheckClient(t, first)
	wireCheckClient(t, second)
	for _, c := range []*wireClient{idle1, idle2} {
		c.nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		if _, err := c.nc.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("an idle socket under the handshake timeout: read %v, want it still open", err)
		}
	}
}

// TestConnMaxHandshakes: past Config.MaxHandshakes sockets in their handshake, the oldest
// is dropped, so idle sockets cannot keep a client from logging in; open connections do
// not count.
func TestConnMaxHandshakes(t *testing.T) {
	t.Parallel()
	log := &secLog{}
	srv := secServe(t, Config{MaxHandshakes: 2, Logger: log.logger()}, false)
	addr := srv.Addr().String()
	stillOpen := func(what string, c *wireClient) {
		t.Helper()
		c.nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		if _, err := c.nc.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s: read %v, want the socket still open", what, err)
		}
	}
	idle1, idle2 := wireDial(t, addr), wireDial(t, addr)
	stillOpen("two idle sockets", idle1)
	idle3 := wireDial(t, addr)
	idle1.expectClosed(secWait)
	stillOpen("the second idle socket", idle2)
	c := secConnect(t, addr, "guest", "guest", "/") // drops idle2
	idle2.expectClosed(secWait)
	wireCheckClient(t, c)
	more := secConnect(t, addr, "guest", "guest", "/")
	wireCheckClient(t, more)
	stillOpen("the third idle socket, with two open connections", idle3)
	if !log.find(isWarn, "dropping the oldest connections in their handshake: too many handshakes") {
		t.Errorf("no warning of the dropped handshakes:\n%s", log)
	}
}

// TestConnCloseUnderLoad: connections whose writers are busy with deliveries end cleanly,
// closed by their clients or by Shutdown, and leave no reader or writer behind. Not
// parallel: it counts the process's goroutines.
func TestConnCloseUnderLoad(t *testing.T) {
	srv := NewServer(Config{Logger: wireDiscardLogger(), DataDir: t.TempDir()})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	url := "amqp://guest:guest@" + srv.Addr().String() + "/"

	pub, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	pch, err := pub.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pch.QueueDeclare("load", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	var consumers []*amqp091.Connection
	var flowing []<-chan amqp091.Delivery
	for range 6 {
		c, err := amqp091.Dial(url)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ch, err := c.Channel()
		if err != nil {
			t.Fatal(err)
		}
		msgs, err := ch.Consume("load", "", true, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		consumers, flowing = append(consumers, c), append(flowing, msgs)
	}
	// Published once every consumer is there, so that each gets its turn (amqp091-go reads
	// its socket without bound: a consumer that came late could find the queue drained).
	body := make([]byte, 4<<10)
	for range 4000 {
		if err := pch.PublishWithContext(context.Background(), "", "load", false, false, amqp091.Publishing{Body: body}); err != nil {
			t.Fatal(err)
		}
	}
	for _, msgs := range flowing {
		takeDelivery(t, msgs)
	}
	// Half are closed by their clients mid-flow, the rest by Shutdown.
	for _, c := range consumers[:3] {
		if err := c.Close(); err != nil {
			t.Errorf("client close under load: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown under load = %v", err)
	}
	if err := <-served; err != ErrServerClosed {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	pollFor(t, "readers and writers to end", func() bool {
		return goroutinesIn("(*conn).writeLoop(")+goroutinesIn("(*conn).readFrames(") == 0
	})
}

// Reused messages (conn.spareMessage) under load: bursts to every kind of destination,
// with every inline room and one larger size, must all come back exact and once.

// stressBody is a self-checking body of n octets: "pub/target/seq/", then filler made
// from them.
func stressBody(pub int, target string, seq, n int) []byte {
	b := fmt.Appendf(nil, "%d/%s/%d/", pub, target, seq)
	for i := 0; len(b) < n; i++ {
		b = append(b, byte('a'+(seq*7+i*3+pub)%26))
	}
	return b
}

// checkStressBody verifies a stressBody and returns its "pub/target/seq".
func checkStressBody(body []byte) (string, error) {
	parts := strings.SplitN(string(body), "/", 4)
	var pub, seq int
	if len(parts) == 4 {
		fmt.Sscan(parts[0], &pub)
		fmt.Sscan(parts[2], &seq)
	}
	if len(parts) != 4 || !bytes.Equal(body, stressBody(pub, parts[1], seq, len(body))) {
		return "", fmt.Errorf("corrupt body %q", body)
	}
	return parts[0] + "/" + parts[1] + "/" + parts[2], nil
}

// stressSizes covers every inline room (newMessage) and one size past them.
var stressSizes = []int{20, 30, 60, 90, 150, 280, 400, 650, 900, 1150, 1400, 1900, 2500}

// TestPagedPublishReuseStress: three publishers, each on a plain and a confirm channel,
// send bursts to paging queues of every kind (durable with some persistent messages, TTL
// through a topic exchange, max-length dead-lettering, a short TTL dead-lettering, headers,
// exchange-to-exchange, an alternate exchange, priority, a slow consumer, a single active
// consumer, a queue beside a delayed exchange that holds the same message); every message
// comes back byte-exact, exactly once from each queue it went to.
func TestPagedPublishReuseStress(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1 << 10})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	declare := func(name string, durable bool, args amqp091.Table) {
		_, err := ch.QueueDeclare(name, durable, false, false, false, args)
		mustOK(t, err)
	}
	declare("plain", false, nil)
	declare("durable", true, nil)
	declare("ttl", false, amqp091.Table{"x-message-ttl": int32(600000)})
	declare("dl", false, nil)
	declare("maxlen", false, amqp091.Table{"x-max-length": int32(300), "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dl"})
	declare("shortttl", false, amqp091.Table{"x-message-ttl": int32(1), "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "ttldl"})
	declare("ttldl", false, nil)
	declare("cons", false, nil)
	declare("hq", false, nil)
	declare("e2q", false, nil)
	declare("aeq", false, nil)
	declare("pri", false, amqp091.Table{"x-max-priority": int32(5)})
	declare("sac", false, amqp091.Table{"x-single-active-consumer": true})
	mustOK(t, ch.ExchangeDeclare("top", "topic", false, false, false, false, nil))
	mustOK(t, ch.QueueBind("ttl", "a.*", "top", false, nil))
	mustOK(t, ch.ExchangeDeclare("hx", "headers", false, false, false, false, nil))
	mustOK(t, ch.QueueBind("hq", "", "hx", false, amqp091.Table{"x-match": "any", "k": "v"}))
	mustOK(t, ch.ExchangeDeclare("e1", "direct", false, false, false, false, nil))
	mustOK(t, ch.ExchangeDeclare("e2", "fanout", false, false, false, false, nil))
	mustOK(t, ch.ExchangeBind("e2", "k", "e1", false, nil))
	mustOK(t, ch.QueueBind("e2q", "", "e2", false, nil))
	mustOK(t, ch.ExchangeDeclare("aefan", "fanout", false, false, false, false, nil))
	mustOK(t, ch.QueueBind("aeq", "", "aefan", false, nil))
	mustOK(t, ch.ExchangeDeclare("aex", "direct", false, false, false, false, amqp091.Table{"alternate-exchange": "aefan"}))
	// A fanout to a queue and to a delayed exchange: the queue pages its copy at once,
	// the delayed exchange holds the same message until it falls due.
	declare("held", false, nil)
	declare("due", false, nil)
	mustOK(t, ch.ExchangeDeclare("fx", "fanout", false, false, false, false, nil))
	mustOK(t, ch.QueueBind("held", "", "fx", false, nil))
	delayedDeclare(t, ch, "dx", "fanout", false)
	mustOK(t, ch.ExchangeBind("dx", "", "fx", false, nil))
	mustOK(t, ch.QueueBind("due", "", "dx", false, nil))

	var mu sync.Mutex
	seen := map[string]string{} // message id (and for a fanout, its queue): where it was seen
	record := func(where string, body []byte) error {
		id, err := checkStressBody(body)
		if err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if where == "held" || where == "due" {
			id += "@" + where
		}
		mu.Lock()
		defer mu.Unlock()
		if prev, ok := seen[id]; ok {
			return fmt.Errorf("%s: %s seen twice (before in %s)", where, id, prev)
		}
		seen[id] = where
		return nil
	}
	// Slow consumers on "cons" and "sac".
	consCh := openChannel(t, conn)
	consCh.Qos(5, 0, false)
	var consumers sync.WaitGroup
	for _, name := range []string{"cons", "sac"} {
		ds, err := consCh.Consume(name, "", false, false, false, false, nil)
		mustOK(t, err)
		consumers.Go(func() {
			for d := range ds {
				if err := record(name, d.Body); err != nil {
					t.Error(err)
					return
				}
				time.Sleep(50 * time.Microsecond)
				d.Ack(false)
			}
		})
	}

	none := func(int) []byte { return nil }
	targets := []struct {
		name, exchange, key string
		props               func(seq int) []byte
	}{
		{"plain", "", "plain", none},
		{"durable", "", "durable", func(seq int) []byte {
			if seq%3 == 0 {
				return (&properties{DeliveryMode: 2}).encode(nil)
			}
			return nil
		}},
		{"ttl", "top", "a.b", func(seq int) []byte {
			if seq%2 == 0 {
				return (&properties{Expiration: "600000"}).encode(nil)
			}
			return nil
		}},
		{"maxlen", "", "maxlen", none},
		{"shortttl", "", "shortttl", none},
		{"cons", "", "cons", none},
		{"hq", "hx", "", func(int) []byte { return (&properties{Headers: table{"k": "v"}}).encode(nil) }},
		{"e2q", "e1", "k", none},
		{"aeq", "aex", "nomatch", none},
		{"pri", "", "pri", func(seq int) []byte { return (&properties{Priority: uint8(seq % 3)}).encode(nil) }},
		{"sac", "", "sac", none},
		{"fx", "fx", "", func(int) []byte { return (&properties{Headers: table{"x-delay": int32(20)}}).encode(nil) }},
	}
	const pubs, rounds, perRound = 3, 8, 40
	const total = pubs * rounds * perRound * 13 // one target of 12 reaches two queues
	var clients [pubs]*frameClient
	for p := range clients {
		w := dialFrameClient(t, b.srv)
		w.send(2, &channelOpen{})
		w.expect(2, idChannelOpenOk)
		w.send(2, &confirmSelect{})
		w.expect(2, idConfirmSelectOk)
		clients[p] = w
	}
	seq := [pubs]int{}
	for r := range rounds {
		for p, w := range clients { // the brokers' readers work on the bursts at once
			var burst []byte
			for i := range perRound {
				for ti, tg := range targets {
					seq[p]++
					size := stressSizes[(seq[p]+ti+r)%len(stressSizes)]
					channel := uint16(1 + (i+ti)%2)
					burst = appendMethodFrame(burst, channel, &basicPublish{Exchange: tg.exchange, RoutingKey: tg.key})
					burst = appendContent(burst, channel, tg.props(seq[p]), stressBody(p, tg.name, seq[p], size), defaultFrameMax)
				}
			}
			w.write(burst)
			w.send(1, &queueDeclare{Queue: "plain", Passive: true})
		}
		for _, w := range clients {
			for { // confirms come first
				if c, m := w.next(); c == 1 && m.id() == idQueueDeclareOk {
					break
				}
			}
		}
	}
	if paged, _, _ := queuePaged(b.srv, "/", "plain"); paged < pubs*rounds*perRound/2 {
		t.Fatalf("%d of queue plain's messages paged, want most", paged)
	}
	getAll := func(name string) {
		for {
			d, ok, err := ch.Get(name, true)
			mustOK(t, err)
			if !ok {
				return
			}
			if err := record(name, d.Body); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, name := range []string{"plain", "durable", "ttl", "maxlen", "dl", "hq", "e2q", "aeq", "pri", "held"} {
		getAll(name)
	}
	pollFor(t, "the delayed messages to fall due", func() bool { return queueReady(t, ch, "due") == pubs*rounds*perRound })
	getAll("due")
	pollFor(t, "the short-TTL messages to be dead-lettered", func() bool { return queueReady(t, ch, "shortttl") == 0 })
	getAll("ttldl")
	pollFor(t, "the consumers to take theirs", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) == total
	})
	consCh.Close()
	consumers.Wait()
}

// TestPagedPublishReuseConfirmsReturnsTx: in the same bursts as publishes a queue pages,
// mandatory unroutable publishes are returned and a transaction commits its own: every
// publish is confirmed, every return and every message is exact, each channel's in order.
func TestPagedPublishReuseConfirmsReturnsTx(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1 << 10})
	w := dialFrameClient(t, b.srv)
	w.send(1, &queueDeclare{Queue: "pq"})
	w.expect(1, idQueueDeclareOk)
	w.send(1, &confirmSelect{})
	w.expect(1, idConfirmSelectOk)
	w.send(3, &channelOpen{})
	w.expect(3, idChannelOpenOk)
	w.send(3, &txSelect{})
	w.expect(3, idTxSelectOk)
	const rounds, per = 20, 60
	seq, txSeq, returns := 0, 0, 0
	var acked uint64
	var wantConfirm, wantTx []string
	for r := range rounds {
		var burst []byte
		for i := range per {
			seq++
			size := stressSizes[(seq+r)%len(stressSizes)]
			switch i % 6 {
			case 5: // mandatory, unroutable
				burst = appendMethodFrame(burst, 1, &basicPublish{RoutingKey: "nosuch", Mandatory: true})
				burst = appendContent(burst, 1, nil, stressBody(0, "ret", seq, size), defaultFrameMax)
			case 4:
				txSeq++
				body := stressBody(1, "pq", txSeq, size)
				burst = appendMethodFrame(burst, 3, &basicPublish{RoutingKey: "pq"})
				burst = appendContent(burst, 3, nil, body, defaultFrameMax)
				wantTx = append(wantTx, string(body))
			default:
				body := stressBody(0, "pq", seq, size)
				burst = appendMethodFrame(burst, 1, &basicPublish{RoutingKey: "pq", Mandatory: i%2 == 0})
				burst = appendContent(burst, 1, nil, body, defaultFrameMax)
				wantConfirm = append(wantConfirm, string(body))
			}
		}
		burst = appendMethodFrame(burst, 3, &txCommit{})
		w.write(burst)
		for committed := false; !committed || acked < uint64(seq-seq/6); {
			c, m := w.next()
			switch m := m.(type) {
			case *basicAck:
				acked = max(acked, m.DeliveryTag)
			case *basicNack:
				t.Fatalf("nack %d", m.DeliveryTag)
			case *basicReturn:
				if _, body := w.content(); !bytes.HasPrefix(body, []byte("0/ret/")) {
					t.Fatalf("returned %q", body)
				} else if _, err := checkStressBody(body); err != nil {
					t.Fatalf("return: %v", err)
				}
				returns++
			case *txCommitOk:
				committed = true
			default:
				t.Fatalf("unexpected %s on channel %d", methodName(m.id()), c)
			}
		}
	}
	if returns != rounds*per/6 {
		t.Fatalf("%d returns, want %d", returns, rounds*per/6)
	}
	if paged, _, _ := queuePaged(b.srv, "/", "pq"); paged < 100 {
		t.Fatalf("%d of the queue's messages paged, want most", paged)
	}
	var gotConfirm, gotTx []string
	for _, s := range drainText(t, openChannel(t, dial(t, b.url)), "pq") {
		if _, err := checkStressBody([]byte(s)); err != nil {
			t.Fatal(err)
		}
		if s[0] == '0' {
			gotConfirm = append(gotConfirm, s)
		} else {
			gotTx = append(gotTx, s)
		}
	}
	if !slices.Equal(gotConfirm, wantConfirm) || !slices.Equal(gotTx, wantTx) {
		t.Fatalf("got %d and %d messages from the confirm and tx channels, want %d and %d, in order",
			len(gotConfirm), len(gotTx), len(wantConfirm), len(wantTx))
	}
}

// TestConnIdlePublisherReleasesBatch: a connection that published bursts to a paging
// queue, once idle, holds neither its routed list nor its spare messages (conn.awaitInput):
// forty such connections keep well under what those would take (a 24 KiB list and up to
// maxSpareBytes of messages each). Not parallel: it reads the process's heap.
func TestConnIdlePublisherReleasesBatch(t *testing.T) {
	b := startDurable(t, Config{PageOutBytes: 1 << 10})
	setup := dialFrameClient(t, b.srv)
	setup.send(1, &queueDeclare{Queue: "paged"})
	setup.expect(1, idQueueDeclareOk)
	burst := publishBurst("", "paged", 3000, func(i int) []byte { return []byte("message " + strconv.Itoa(1e6+i)) })
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	const conns = 40
	clients := make([]*frameClient, conns)
	for i := range clients {
		clients[i] = dialFrameClient(t, b.srv)
	}
	before := heap()
	for _, w := range clients {
		w.write(burst)
		w.send(1, &queueDeclare{Queue: "paged", Passive: true})
		w.expect(1, idQueueDeclareOk)
	}
	if paged, _, _ := queuePaged(b.srv, "/", "paged"); paged < conns*3000*9/10 {
		t.Fatalf("%d paged, want most of %d", paged, conns*3000)
	}
	// The paged refs take 16 octets a message; what each idle connection keeps besides
	// must be far less than its batch list and spares.
	refs := uint64(conns * 3000 * 16)
	var per uint64
	for range 20 {
		time.Sleep(idleAfter)
		per = 0
		if h := heap(); h > before+refs {
			per = (h - before - refs) / conns
		}
		if per < 32<<10 {
			t.Logf("%d octets of heap per idle publisher past its paged refs", per)
			return
		}
	}
	t.Fatalf("%d octets of heap per idle publisher past its paged refs, want under 32 KiB", per)
}
