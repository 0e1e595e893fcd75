package amqp

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Test helpers shared by more than one test file: the in-process test server, amqp091-go
// dialing, the raw wire clients, polling, the security fixtures (users, remote addresses,
// captured logs) and the durable-broker fixtures.

// newTestServer serves on 127.0.0.1:0 until the test ends and returns the AMQP URL.
func newTestServer(t testing.TB, cfgs ...Config) (*Server, string) {
	t.Helper()
	var cfg Config
	if len(cfgs) > 0 {
		cfg = cfgs[0]
	}
	if cfg.Logger == nil {
		var w io.Writer = io.Discard
		if os.Getenv("AMQP_TEST_LOG") != "" {
			w = os.Stderr
		}
		cfg.Logger = slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	srv := serveOnLoopback(t, cfg)
	return srv, "amqp://guest:guest@" + srv.Addr().String() + "/"
}

// serveOnLoopback serves a server of cfg on a free port of 127.0.0.1 until the test ends
// (shutDownOnCleanup).
func serveOnLoopback(t testing.TB, cfg Config) *Server {
	t.Helper()
	srv := NewServer(cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	shutDownOnCleanup(t, srv, done)
	return srv
}

// shutDownOnCleanup shuts srv down when the test ends and checks that it stopped cleanly
// and that its Serve, whose result done receives, returned ErrServerClosed.
func shutDownOnCleanup(t testing.TB, srv *Server, done <-chan error) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != ErrServerClosed {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
}

// dial connects amqp091-go to url and closes the connection when the test ends.
func dial(t testing.TB, url string) *amqp091.Connection {
	t.Helper()
	c, err := amqp091.Dial(url)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func openChannel(t testing.TB, c *amqp091.Connection) *amqp091.Channel {
	t.Helper()
	ch, err := c.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	return ch
}

// recvWait bounds every wait for something the broker should send.
const recvWait = 5 * time.Second

// amqpCode returns the reply code an *amqp091.Error carries, or 0.
func amqpCode(err error) int {
	var e *amqp091.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// wantReplyCode fails the test unless err is an AMQP exception with this reply code.
func wantReplyCode(t testing.TB, err error, code int) {
	t.Helper()
	if got := amqpCode(err); got != code {
		t.Fatalf("got error %v (code %d), want reply code %d", err, got, code)
	}
}

// notifyChannelClose registers for the close of ch, for asynchronous methods such as basic.publish.
func notifyChannelClose(ch *amqp091.Channel) chan *amqp091.Error {
	return ch.NotifyClose(make(chan *amqp091.Error, 1))
}

// awaitCloseCode waits for the close reported on c and checks its reply code.
func awaitCloseCode(t testing.TB, c <-chan *amqp091.Error, code int) {
	t.Helper()
	select {
	case e, ok := <-c:
		if !ok || e == nil {
			t.Fatalf("closed without an error, want reply code %d", code)
		}
		if e.Code != code {
			t.Fatalf("closed with %v, want reply code %d", e, code)
		}
	case <-time.After(recvWait):
		t.Fatalf("no close within %v, want reply code %d", recvWait, code)
	}
}

// takeDelivery receives one delivery or fails after recvWait.
func takeDelivery(t testing.TB, msgs <-chan amqp091.Delivery) amqp091.Delivery {
	t.Helper()
	select {
	case d, ok := <-msgs:
		if !ok {
			t.Fatal("delivery channel closed")
		}
		return d
	case <-time.After(recvWait):
		t.Fatalf("no delivery within %v", recvWait)
	}
	panic("unreachable")
}

// expectNoDelivery checks that nothing arrives during a short quiet period. It asserts an
// absence; it never waits for state.
func expectNoDelivery(t testing.TB, msgs <-chan amqp091.Delivery) {
	t.Helper()
	select {
	case d := <-msgs:
		t.Fatalf("unexpected delivery %q (tag %d, redelivered %v)", d.Body, d.DeliveryTag, d.Redelivered)
	case <-time.After(100 * time.Millisecond):
	}
}

// publishText publishes body as a transient message.
func publishText(t testing.TB, ch *amqp091.Channel, exchange, key, body string) {
	t.Helper()
	if err := ch.Publish(exchange, key, false, false, amqp091.Publishing{Body: []byte(body)}); err != nil {
		t.Fatalf("publish %q: %v", body, err)
	}
}

// drainText takes every ready message of queue with basic.get and returns the deliveryBodies in order.
func drainText(t testing.TB, ch *amqp091.Channel, queue string) []string {
	t.Helper()
	var out []string
	for {
		d, ok, err := ch.Get(queue, true)
		if err != nil {
			t.Fatalf("get %s: %v", queue, err)
		}
		if !ok {
			return out
		}
		out = append(out, string(d.Body))
	}
}

// pollFor polls cond until it holds or recvWait passes.
func pollFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(recvWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// queueReady returns a queue's ready-message count from a passive declare.
func queueReady(t testing.TB, ch *amqp091.Channel, queue string) int {
	t.Helper()
	q, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	if err != nil {
		t.Fatalf("passive declare %s: %v", queue, err)
	}
	return q.Messages
}

// declareTransientQueue declares a transient queue with this name.
func declareTransientQueue(t testing.TB, ch *amqp091.Channel, name string) {
	t.Helper()
	if _, err := ch.QueueDeclare(name, false, false, false, false, nil); err != nil {
		t.Fatalf("declare queue %s: %v", name, err)
	}
}

// consumeTagged starts a consumer with an explicit tag and manual acks.
func consumeTagged(t testing.TB, ch *amqp091.Channel, queue, tag string) <-chan amqp091.Delivery {
	t.Helper()
	msgs, err := ch.Consume(queue, tag, false, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	return msgs
}

// deliveryBodies returns the deliveryBodies of ds as strings.
func deliveryBodies(ds []amqp091.Delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = string(d.Body)
	}
	return out
}

// frameClient speaks AMQP frames directly, for what amqp091-go cannot send or show: an empty
// consumer tag, the raw content properties, and a fast publish path.
type frameClient struct {
	t    testing.TB
	nc   net.Conn
	fr   frameReader
	wait time.Duration // how long readFrame waits; recvWait when 0
}

// dialFrameClient connects, runs the handshake and opens channel 1.
func dialFrameClient(t testing.TB, srv *Server) *frameClient {
	t.Helper()
	nc, err := net.DialTimeout("tcp", srv.Addr().String(), recvWait)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	w := &frameClient{t: t, nc: nc, fr: frameReader{r: bufio.NewReaderSize(nc, 64<<10), frameMax: defaultFrameMax}}
	w.write(protocolHeader[:])
	w.expect(0, idConnectionStart)
	w.send(0, &connectionStartOk{
		ClientProperties: table{"capabilities": table{"consumer_cancel_notify": true}},
		Mechanism:        "PLAIN",
		Response:         "\x00guest\x00guest",
		Locale:           "en_US",
	})
	w.expect(0, idConnectionTune)
	w.send(0, &connectionTuneOk{ChannelMax: defaultChannelMax, FrameMax: defaultFrameMax})
	w.send(0, &connectionOpen{VirtualHost: "/"})
	w.expect(0, idConnectionOpenOk)
	w.send(1, &channelOpen{})
	w.expect(1, idChannelOpenOk)
	return w
}

func (w *frameClient) write(b []byte) {
	w.t.Helper()
	w.nc.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := w.nc.Write(b); err != nil {
		w.t.Fatalf("wire write: %v", err)
	}
}

func (w *frameClient) send(ch uint16, m method) {
	w.t.Helper()
	w.write(appendMethodFrame(nil, ch, m))
}

// publish sends basic.publish with raw properties (flags first; nil for none) and body.
func (w *frameClient) publish(ch uint16, exchange, key string, props, body []byte) {
	w.t.Helper()
	b := appendMethodFrame(nil, ch, &basicPublish{Exchange: exchange, RoutingKey: key})
	w.write(appendContent(b, ch, props, body, defaultFrameMax))
}

// readFrame returns the next frame that is not a heartbeat, with its payload copied.
func (w *frameClient) readFrame() frame {
	w.t.Helper()
	w.nc.SetReadDeadline(time.Now().Add(cmp.Or(w.wait, recvWait)))
	for {
		f, err := w.fr.read()
		if err != nil {
			w.t.Fatalf("wire read: %v", err)
		}
		if f.typ != frameHeartbeat {
			f.payload = append([]byte(nil), f.payload...)
			return f
		}
	}
}

// next reads the next frame, which must be a method frame, and decodes it.
func (w *frameClient) next() (uint16, method) {
	w.t.Helper()
	f := w.readFrame()
	if f.typ != frameMethod {
		w.t.Fatalf("got frame type %d, want a method", f.typ)
	}
	id, d, err := methodHeader(f.payload)
	if err != nil {
		w.t.Fatal(err)
	}
	m := newMethod(id)
	if m == nil {
		w.t.Fatalf("unknown method %#x", id)
	}
	if m.decode(&d); d.err != nil {
		w.t.Fatalf("decode %s: %v", methodName(id), d.err)
	}
	return f.channel, m
}

// expect reads the next frame, which must be method id on channel ch, and decodes it.
func (w *frameClient) expect(ch uint16, id uint32) method {
	w.t.Helper()
	got, m := w.next()
	if m.id() != id || got != ch {
		w.t.Fatalf("got %s on channel %d, want %s on channel %d", methodName(m.id()), got, methodName(id), ch)
	}
	return m
}

// content reads a content header and its body frames and returns the raw properties and body.
func (w *frameClient) content() (props, body []byte) {
	w.t.Helper()
	h := w.readFrame()
	if h.typ != frameHeader || len(h.payload) < 14 {
		w.t.Fatalf("got frame type %d (%d octets), want a content header", h.typ, len(h.payload))
	}
	size := int(binary.BigEndian.Uint64(h.payload[4:12]))
	props = h.payload[12:]
	for len(body) < size {
		f := w.readFrame()
		if f.typ != frameBody {
			w.t.Fatalf("got frame type %d, want a content body", f.typ)
		}
		body = append(body, f.payload...)
	}
	return props, body
}

// openConns returns the number of connections the server is serving.
func openConns(srv *Server) int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return len(srv.active)
}

// wireTimeout bounds every read and write of a wireClient, so no test can hang on the server.
const wireTimeout = 5 * time.Second

// wireOpts are the handshake choices of a wireClient. The zero value logs in as guest with
// PLAIN, advertises authentication_failure_close, takes the server's channel-max and
// frame-max (tune-ok 0), turns heartbeats off and opens vhost "/".
type wireOpts struct {
	mechanism          string // default PLAIN
	response           string // default "\x00guest\x00guest" for PLAIN
	noAuthFailureClose bool   // leave authentication_failure_close out of the capabilities
	channelMax         uint16 // sent as is in tune-ok
	frameMax           uint32 // sent as is in tune-ok
	heartbeat          uint16 // sent as is in tune-ok
	vhost              string // default "/"
}

// wireClient speaks AMQP frames over a plain TCP socket, so a test can send what no client
// library would and see exactly what the server answers.
type wireClient struct {
	t  testing.TB
	nc net.Conn
	fr frameReader
}

// wireDial connects to addr; the socket is closed when the test ends.
func wireDial(t testing.TB, addr string) *wireClient {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, wireTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { nc.Close() })
	return &wireClient{t: t, nc: nc, fr: frameReader{r: bufio.NewReader(nc), frameMax: 1 << 24}}
}

// wireConnect runs the whole handshake and returns a client with connection.open-ok read.
func wireConnect(t testing.TB, addr string, o wireOpts) *wireClient {
	t.Helper()
	c := wireHandshake(t, addr, o, 3)
	wireExpect[*connectionOpenOk](c, 0)
	return c
}

// wireHandshake runs the first steps of the handshake: 1 sends the header and start-ok,
// 2 also answers tune with tune-ok, 3 also sends connection.open. It reads nothing after
// the last method it sends.
func wireHandshake(t testing.TB, addr string, o wireOpts, steps int) *wireClient {
	t.Helper()
	c := wireDial(t, addr)
	c.send(protocolHeader[:])
	start := wireExpect[*connectionStart](c, 0)
	if start.VersionMajor != 0 || start.VersionMinor != 9 {
		t.Fatalf("connection.start version %d-%d, want 0-9", start.VersionMajor, start.VersionMinor)
	}
	mech, resp := o.mechanism, o.response
	if mech == "" {
		mech = "PLAIN"
	}
	if resp == "" && mech == "PLAIN" {
		resp = "\x00guest\x00guest"
	}
	caps := table{"publisher_confirms": true, "basic.nack": true, "consumer_cancel_notify": true}
	if !o.noAuthFailureClose {
		caps["authentication_failure_close"] = true
	}
	c.sendMethod(0, &connectionStartOk{
		ClientProperties: table{"product": "amqp-go wire test", "capabilities": caps},
		Mechanism:        mech,
		Response:         resp,
		Locale:           "en_US",
	})
	if steps < 2 {
		return c
	}
	wireExpect[*connectionTune](c, 0)
	c.sendMethod(0, &connectionTuneOk{ChannelMax: o.channelMax, FrameMax: o.frameMax, Heartbeat: o.heartbeat})
	if steps < 3 {
		return c
	}
	vhost := o.vhost
	if vhost == "" {
		vhost = "/"
	}
	c.sendMethod(0, &connectionOpen{VirtualHost: vhost})
	return c
}

func (c *wireClient) send(b []byte) {
	c.t.Helper()
	c.nc.SetWriteDeadline(time.Now().Add(wireTimeout))
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *wireClient) sendMethod(channel uint16, m method) {
	c.t.Helper()
	c.send(appendMethodFrame(nil, channel, m))
}

// wireFrame encodes a frame of any type, channel and payload.
func wireFrame(typ uint8, channel uint16, payload []byte) []byte {
	b := appendFrameStart(nil, typ, channel)
	b = append(b, payload...)
	return appendFrameEnd(b, 0)
}

// readFrame reads one frame within timeout; the payload is the caller's.
func (c *wireClient) readFrame(timeout time.Duration) (frame, error) {
	c.nc.SetReadDeadline(time.Now().Add(timeout))
	f, err := c.fr.read()
	if err != nil {
		return f, err
	}
	f.payload = append([]byte(nil), f.payload...)
	return f, nil
}

// next returns the next method the server sends and its channel, skipping heartbeats.
func (c *wireClient) next() (uint16, method) {
	c.t.Helper()
	for {
		f, err := c.readFrame(wireTimeout)
		if err != nil {
			c.t.Fatalf("reading a method frame: %v", err)
		}
		if f.typ == frameHeartbeat {
			continue
		}
		if f.typ != frameMethod {
			c.t.Fatalf("got a frame of type %d on channel %d, want a method frame", f.typ, f.channel)
		}
		id, d, err := methodHeader(f.payload)
		if err != nil {
			c.t.Fatalf("server sent a bad method frame: %v", err)
		}
		m := newMethod(id)
		if m == nil {
			c.t.Fatalf("server sent unknown method %d.%d", id>>16, id&0xffff)
		}
		if m.decode(&d); d.err != nil {
			c.t.Fatalf("server sent a malformed %s: %v", methodName(id), d.err)
		}
		return f.channel, m
	}
}

// wireExpect reads the next method and fails the test unless it is an M on channel.
func wireExpect[M method](c *wireClient, channel uint16) M {
	c.t.Helper()
	ch, m := c.next()
	got, ok := m.(M)
	if !ok || ch != channel {
		var want M
		c.t.Fatalf("got %s %+v on channel %d, want %s on channel %d", methodName(m.id()), m, ch, methodName(want.id()), channel)
	}
	return got
}

func (c *wireClient) openChannel(id uint16) {
	c.t.Helper()
	c.sendMethod(id, &channelOpen{})
	wireExpect[*channelOpenOk](c, id)
}

// expectConnClose reads connection.close, checks its reply code and, when ids holds
// class and method, the failing method; then it answers close-ok and checks that the
// server closes the socket.
func (c *wireClient) expectConnClose(code uint16, ids ...uint16) *connectionClose {
	c.t.Helper()
	cl := wireExpect[*connectionClose](c, 0)
	if cl.ReplyCode != code {
		c.t.Errorf("connection.close %d %q, want code %d", cl.ReplyCode, cl.ReplyText, code)
	}
	if len(ids) == 2 && (cl.ClassID != ids[0] || cl.MethodID != ids[1]) {
		c.t.Errorf("connection.close %d %q names method %d.%d, want %d.%d",
			cl.ReplyCode, cl.ReplyText, cl.ClassID, cl.MethodID, ids[0], ids[1])
	}
	c.sendMethod(0, &connectionCloseOk{})
	c.expectClosed(wireTimeout)
	return cl
}

// expectClosed checks that the server closes the socket within d, sending nothing but
// heartbeats first.
func (c *wireClient) expectClosed(d time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for {
		f, err := c.readFrame(time.Until(deadline))
		switch {
		case err == nil && f.typ == frameHeartbeat:
			continue
		case err == nil:
			c.t.Fatalf("got %s, want the socket closed", wireDescribe(f))
		case !wireIsClosed(err):
			c.t.Fatalf("read: %v, want the socket closed (EOF)", err)
		}
		return
	}
}

// wireDescribe names a frame for a test failure, decoding methods.
func wireDescribe(f frame) string {
	if f.typ != frameMethod {
		return fmt.Sprintf("a frame of type %d on channel %d", f.typ, f.channel)
	}
	id, d, err := methodHeader(f.payload)
	if err != nil {
		return fmt.Sprintf("a short method frame on channel %d", f.channel)
	}
	m := newMethod(id)
	if m == nil {
		return fmt.Sprintf("unknown method %d.%d on channel %d", id>>16, id&0xffff, f.channel)
	}
	m.decode(&d)
	return fmt.Sprintf("%s %+v on channel %d", methodName(id), m, f.channel)
}

func wireIsClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
}

// wireCheckClient declares a queue, publishes to it and gets the message back on c.
func wireCheckClient(t testing.TB, c *amqp091.Connection) {
	t.Helper()
	ch, err := c.Channel()
	if err != nil {
		t.Fatalf("the other client cannot open a channel: %v", err)
	}
	defer ch.Close()
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatalf("queue.declare: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wireTimeout)
	defer cancel()
	if err := ch.PublishWithContext(ctx, "", q.Name, false, false, amqp091.Publishing{Body: []byte("still serving")}); err != nil {
		t.Fatalf("publish: %v", err)
	}
	m, ok, err := ch.Get(q.Name, true)
	if err != nil || !ok || string(m.Body) != "still serving" {
		t.Fatalf("basic.get = %q, %v, %v; want the message just published", m.Body, ok, err)
	}
}

func wireDiscardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// wireContentHeader is the payload of a basic content header for a body of size octets,
// without properties.
func wireContentHeader(size uint64) []byte {
	b := appendLonglong([]byte{0, classBasic, 0, 0}, size)
	return append(b, 0, 0)
}

// wireAMQPlain is an AMQPLAIN start-ok response: a field table's content without its
// length prefix, holding LOGIN and PASSWORD as long strings.
func wireAMQPlain(user, pass string) string {
	var b []byte
	b = appendShortstr(b, "LOGIN")
	b = appendLongstr(append(b, 'S'), user)
	b = appendShortstr(b, "PASSWORD")
	b = appendLongstr(append(b, 'S'), pass)
	return string(b)
}

// wireChanOf returns a channel holding v, to hand a received result to the next reader.
func wireChanOf[T any](v T) <-chan T {
	ch := make(chan T, 1)
	ch <- v
	return ch
}

// wireWatch is what a background reader saw: the frames, when each arrived, and the
// error that ended the watch and when.
type wireWatch struct {
	frames []frame
	times  []time.Time
	err    error
	end    time.Time
}

// watch reads frames in the background until an error (the socket closing, or deadline)
// and delivers what it saw. The client must not be read until then.
func (c *wireClient) watch(deadline time.Time) <-chan wireWatch {
	ch := make(chan wireWatch, 1)
	go func() {
		var w wireWatch
		for {
			f, err := c.readFrame(time.Until(deadline))
			if err != nil {
				w.err, w.end = err, time.Now()
				ch <- w
				return
			}
			w.frames = append(w.frames, f)
			w.times = append(w.times, time.Now())
		}
	}()
	return ch
}

// durableBroker is a broker on a data directory that a test stops and starts again.
type durableBroker struct {
	t       testing.TB
	srv     *Server
	url     string
	dir     string
	done    chan error
	stopped bool
}

// startDurable starts a broker on cfg.DataDir (a new temporary directory when empty),
// serving on 127.0.0.1:0, and stops it when the test ends.
func startDurable(t testing.TB, cfg Config) *durableBroker {
	t.Helper()
	b, err := tryStartDurable(t, cfg)
	if err != nil {
		t.Fatalf("broker on %s did not start: %v", cfg.DataDir, err)
	}
	return b
}

// tryStartDurable is startDurable that returns Serve's error when the broker cannot start.
// It retries while the data directory's lock is briefly held by a forked child.
func tryStartDurable(t testing.TB, cfg Config) (*durableBroker, error) {
	t.Helper()
	deadline := time.Now().Add(walLockRetry)
	for {
		b, err := startDurableOnce(t, cfg)
		if !isLockBusy(err) || time.Now().After(deadline) {
			return b, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startDurableOnce makes one attempt to start a broker on cfg.DataDir.
func startDurableOnce(t testing.TB, cfg Config) (*durableBroker, error) {
	t.Helper()
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = walQuietLogger()
	}
	return serveDurableOnce(t, NewServer(cfg))
}

// serveDurable serves srv, made by the test, on 127.0.0.1:0 until the test ends.
func serveDurable(t testing.TB, srv *Server) *durableBroker {
	t.Helper()
	b, err := serveDurableOnce(t, srv)
	if err != nil {
		t.Fatalf("broker did not start: %v", err)
	}
	return b
}

func serveDurableOnce(t testing.TB, srv *Server) (*durableBroker, error) {
	t.Helper()
	cfg := srv.cfg
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	// Poll rather than block in Addr, which never returns when Serve fails.
	deadline := time.Now().Add(time.Minute)
	for {
		select {
		case err := <-done:
			return nil, err
		default:
		}
		srv.mu.Lock()
		addr := srv.addr
		srv.mu.Unlock()
		if addr != nil {
			b := &durableBroker{t: t, srv: srv, dir: cfg.DataDir, done: done, url: "amqp://guest:guest@" + addr.String() + "/"}
			t.Cleanup(b.stop)
			return b, nil
		}
		if time.Now().After(deadline) {
			t.Fatalf("broker on %s not listening after a minute", cfg.DataDir)
		}
		time.Sleep(time.Millisecond)
	}
}

// stop shuts the broker down cleanly; it may be called more than once.
func (b *durableBroker) stop() {
	if b.stopped {
		return
	}
	b.stopped = true
	ctx, cancel := context.WithTimeout(context.Background(), walWait)
	defer cancel()
	if err := b.srv.Shutdown(ctx); err != nil {
		b.t.Errorf("shutdown: %v", err)
	}
	if err := <-b.done; err != ErrServerClosed {
		b.t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}
}

// crashImage waits until the log has written everything appended so far (so the image
// does not depend on the writer's timing), then copies the data directory.
func (b *durableBroker) crashImage() string {
	b.t.Helper()
	if err := b.srv.store.sync(); err != nil {
		b.t.Fatalf("log sync: %v", err)
	}
	return copyDataDir(b.t, b.dir, nil)
}

// restart starts a new broker on b's data after a clean shutdown ("clean") or on a crash
// image of it ("crash"; b keeps running until the test ends).
func (b *durableBroker) restart(mode string, cfg Config) *durableBroker {
	b.t.Helper()
	switch mode {
	case "clean":
		b.stop()
		cfg.DataDir = b.dir
	case "crash":
		cfg.DataDir = b.crashImage()
	default:
		b.t.Fatalf("restart mode %q", mode)
	}
	return startDurable(b.t, cfg)
}

// confirmChannel is a channel in confirm mode that keeps a window of unconfirmed publishes.
type confirmChannel struct {
	t        testing.TB
	ch       *amqp091.Channel
	confirms chan amqp091.Confirmation
	returns  chan amqp091.Return
	pending  int
}

func newConfirmChannel(t testing.TB, conn *amqp091.Connection) *confirmChannel {
	t.Helper()
	ch := openChannel(t, conn)
	if err := ch.Confirm(false); err != nil {
		t.Fatalf("confirm.select: %v", err)
	}
	return &confirmChannel{
		t: t, ch: ch,
		confirms: ch.NotifyPublish(make(chan amqp091.Confirmation, 1024)),
		returns:  ch.NotifyReturn(make(chan amqp091.Return, 1024)),
	}
}

func (c *confirmChannel) publish(exchange, key string, mandatory bool, p amqp091.Publishing) {
	c.t.Helper()
	if err := c.ch.Publish(exchange, key, mandatory, false, p); err != nil {
		c.t.Fatalf("publish: %v", err)
	}
	c.pending++
	for c.pending >= 256 {
		c.takeConfirm()
	}
}

func (c *confirmChannel) takeConfirm() {
	c.t.Helper()
	select {
	case cf, ok := <-c.confirms:
		if !ok {
			c.t.Fatal("channel closed while waiting for confirms")
		}
		if !cf.Ack {
			c.t.Fatalf("publish %d nacked", cf.DeliveryTag)
		}
		c.pending--
	case <-time.After(walWait):
		c.t.Fatalf("no confirm within %v (%d pending)", walWait, c.pending)
	}
}

// wait returns when every publish so far is confirmed.
func (c *confirmChannel) wait() {
	c.t.Helper()
	for c.pending > 0 {
		c.takeConfirm()
	}
}

// persistentPublisher publishes and waits, with publisher confirms, until the broker has
// the messages on disk.
type persistentPublisher struct {
	t  testing.TB
	ch *amqp091.Channel
	c  *confirmChannel
}

func newPersistentPublisher(t testing.TB, conn *amqp091.Connection) *persistentPublisher {
	t.Helper()
	c := newConfirmChannel(t, conn)
	return &persistentPublisher{t: t, ch: c.ch, c: c}
}

func (p *persistentPublisher) publish(exchange, key string, msg amqp091.Publishing) {
	p.t.Helper()
	p.c.publish(exchange, key, false, msg)
}

// wait returns when everything published so far is on disk.
func (p *persistentPublisher) wait() {
	p.t.Helper()
	p.c.wait()
}

// persistentMsg is a persistent publishing whose body and message id are id.
func persistentMsg(id string) amqp091.Publishing {
	return amqp091.Publishing{DeliveryMode: amqp091.Persistent, MessageId: id, Body: []byte(id)}
}

func transientMsg(id string) amqp091.Publishing {
	return amqp091.Publishing{DeliveryMode: amqp091.Transient, MessageId: id, Body: []byte(id)}
}

// getAll takes every ready message of a queue with basic.get no-ack, in queue order.
func getAll(t testing.TB, ch *amqp091.Channel, queue string) []amqp091.Delivery {
	t.Helper()
	var ds []amqp091.Delivery
	for i := 0; i < 1_000_000; i++ {
		d, ok, err := ch.Get(queue, true)
		if err != nil {
			t.Fatalf("basic.get %s: %v", queue, err)
		}
		if !ok {
			return ds
		}
		ds = append(ds, d)
	}
	t.Fatalf("queue %s never emptied", queue)
	return nil
}

func walBodies(ds []amqp091.Delivery) []string {
	s := make([]string, len(ds))
	for i, d := range ds {
		s[i] = string(d.Body)
	}
	return s
}

// amqpErrCode is the reply code of an amqp091 error, or 0.
func amqpErrCode(err error) int {
	var e *amqp091.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// onFreshChannel runs f on a new channel, so that a channel error does not end the test's
// other channels, and returns f's error.
func onFreshChannel(t testing.TB, conn *amqp091.Connection, f func(ch *amqp091.Channel) error) error {
	t.Helper()
	ch := openChannel(t, conn)
	err := f(ch)
	if err == nil {
		ch.Close()
	}
	return err
}

// queueDepth is the ready count from a passive declare; -1 when the queue does not exist.
func queueDepth(t testing.TB, conn *amqp091.Connection, name string) int {
	t.Helper()
	n := -1
	err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
		q, err := ch.QueueDeclarePassive(name, true, false, false, false, nil)
		n = q.Messages
		return err
	})
	if amqpErrCode(err) == 404 {
		return -1
	}
	if err != nil {
		t.Fatalf("passive declare %s: %v", name, err)
	}
	return n
}

// walWait bounds every poll in this file.
const walWait = 10 * time.Second

// lockedBuffer collects the output of a logger or a subprocess for assertions.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *lockedBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// walQuietLogger discards everything, unless AMQP_TEST_LOG is set.
func walQuietLogger() *slog.Logger {
	var out io.Writer = io.Discard
	if os.Getenv("AMQP_TEST_LOG") != "" {
		out = os.Stderr
	}
	return slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// walLockRetry bounds how long a reopen waits for the directory lock. A child process
// forked anywhere in the test binary (go build, go list, amqpd) holds a copy of the LOCK
// descriptor until it execs, so the flock can outlive close for a moment.
const walLockRetry = 5 * time.Second

func isLockBusy(err error) bool {
	return err != nil && strings.Contains(err.Error(), "in use by another broker")
}

// openStoreRetry is openStoreDir that retries while the lock is briefly held by a forked
// child; it reads every recovered message back whole.
func openStoreRetry(dir string, opts storeOptions) (*store, *testRecovered, error) {
	deadline := time.Now().Add(walLockRetry)
	for {
		w, rec, err := openStoreDir(dir, opts)
		var tr *testRecovered
		if err == nil {
			tr, err = readBackRecovered(w, rec)
		}
		if !isLockBusy(err) || time.Now().After(deadline) {
			return w, tr, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testRecovered is what replay found, with each queue's messages read back whole from the
// log, as deliveries would read them.
type testRecovered struct {
	*recovered
	messages map[uint64][]*message // queue id → messages in id order
}

// readBackRecovered reads every recovered message back from the log; each is held in
// memory by its queue, as after a delivery.
func readBackRecovered(st *store, rec *recovered) (*testRecovered, error) {
	tr := &testRecovered{recovered: rec, messages: make(map[uint64][]*message)}
	for qid, refs := range rec.messages {
		var ra readAhead
		var err error
		var ms []*message
		refs.each(func(_ int, r diskRef) {
			if err != nil {
				return
			}
			var m *message
			if m, err = st.readRef(&r, &ra); err == nil {
				ms = append(ms, m)
			}
		})
		if err != nil {
			return nil, err
		}
		st.loaded(&queue{walID: qid}, ms)
		tr.messages[qid] = ms
	}
	return tr, nil
}

// segmentFiles lists the segment files of a data directory, oldest first.
func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "wal", "*.seg"))
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(names)
	return names
}

// recordStarts parses a segment file and returns the offset of every complete record
// and the offset just past the last one.
func recordStarts(t testing.TB, name string) (starts []int, end int) {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	off := walHeaderSize
	for off < len(data) {
		_, _, n, ok := parseRecord(data[off:])
		if !ok {
			t.Fatalf("%s: bad record at %d", name, off)
		}
		starts = append(starts, off)
		off += n
	}
	return starts, off
}

// copyDataDir copies meta.snap and the segments of a data directory (not LOCK) into a
// new temporary directory; edit, if not nil, may change each segment's bytes.
func copyDataDir(t testing.TB, src string, edit func(name string, data []byte) []byte) string {
	t.Helper()
	dst := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dst, "wal"), 0o755); err != nil {
		t.Fatal(err)
	}
	for attempt := 0; ; attempt++ {
		before := segmentFiles(t, src)
		ok := true
		for _, name := range before {
			data, err := os.ReadFile(name)
			if errors.Is(err, os.ErrNotExist) {
				ok = false // compacted away while copying: copy again
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if edit != nil {
				data = edit(filepath.Base(name), data)
			}
			if err := os.WriteFile(filepath.Join(dst, "wal", filepath.Base(name)), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if snap, err := os.ReadFile(filepath.Join(src, "meta.snap")); err == nil {
			if err := os.WriteFile(filepath.Join(dst, "meta.snap"), snap, 0o644); err != nil {
				t.Fatal(err)
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if ok && slices.Equal(before, segmentFiles(t, src)) {
			return dst
		}
		if attempt == 20 {
			t.Fatalf("the segments of %s kept changing while copying", src)
		}
		os.RemoveAll(filepath.Join(dst, "wal"))
		os.Remove(filepath.Join(dst, "meta.snap"))
		if err := os.MkdirAll(filepath.Join(dst, "wal"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// storeLive is the octets of publish records the log still needs.
func storeLive(st *store) int64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	var live int64
	for _, s := range st.segs {
		live += s.live
	}
	return live
}

// logTestTopology logs a topology record and waits until it is on disk.
func logTestTopology(t testing.TB, st *store, typ uint8, payload []byte) {
	t.Helper()
	st.appendTopology(typ, payload)
	if err := st.sync(); err != nil {
		t.Fatal(err)
	}
}

var (
	amqpdOnce sync.Once
	amqpdDir  string // holds the amqpd binary; removed by TestMain
	amqpdErr  error
	amqpdOut  []byte
)

// TestMain runs the tests, then removes the amqpd binary the process tests built.
func TestMain(m *testing.M) {
	code := m.Run()
	if amqpdDir != "" {
		os.RemoveAll(amqpdDir)
	}
	os.Exit(code)
}

// amqpdBinary builds cmd/amqpd once per test run, for the tests that run it as a process
// (crash recovery, clusters), and returns its path.
func amqpdBinary(t *testing.T) string {
	t.Helper()
	if runtime.GOOS == "windows" {
		t.Skip("needs SIGKILL")
	}
	goTool := depsGoTool(t)
	amqpdOnce.Do(func() {
		if amqpdDir, amqpdErr = os.MkdirTemp("", "amqpd-test-bin"); amqpdErr != nil {
			return
		}
		amqpdOut, amqpdErr = exec.Command(goTool, "build", "-o", filepath.Join(amqpdDir, "amqpd"), "./cmd/amqpd").CombinedOutput()
	})
	if amqpdErr != nil {
		t.Fatalf("go build ./cmd/amqpd: %v\n%s", amqpdErr, amqpdOut)
	}
	return filepath.Join(amqpdDir, "amqpd")
}

// mustOK fails the test at once on err.
func mustOK(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
