package amqp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Tests of the Server as a whole: the limits of Config, and Reload deleting virtual hosts.

// TestLimitMaxConnections checks Config.MaxConnections: sockets beyond it are closed at
// once, and the connections already open keep working.
func TestLimitMaxConnections(t *testing.T) {
	t.Parallel()
	log := &secLog{}
	srv := secServe(t, Config{MaxConnections: 3, Logger: log.logger()}, false)
	addr := srv.Addr().String()
	conns := make([]*amqp091.Connection, 3)
	for i := range conns {
		conns[i] = secConnect(t, addr, "guest", "guest", "/")
	}
	nc, err := net.DialTimeout("tcp", addr, secWait)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetReadDeadline(time.Now().Add(secWait))
	if n, err := nc.Read(make([]byte, 8)); n != 0 || !wireIsClosed(err) {
		t.Fatalf("a socket beyond the limit read %d octets, %v; want it closed at once", n, err)
	}
	if c, err := secDial(addr, "guest", "guest", "/"); err == nil {
		c.Close()
		t.Fatal("amqp091-go connected beyond the limit")
	}
	for _, c := range conns {
		wireCheckClient(t, c)
	}
	if !log.has("refusing connection: connection limit reached") {
		t.Errorf("no log of the refusal:\n%s", log)
	}
	conns[0].Close()
	var next *amqp091.Connection
	pollFor(t, "a free connection slot", func() bool {
		next, err = secDial(addr, "guest", "guest", "/")
		return err == nil
	})
	defer next.Close()
	wireCheckClient(t, next)
}

// TestLimitMaxConnectionsPerVhost checks Config.MaxConnectionsPerVhost: connection.open
// beyond it is 530, other vhosts and open connections are unaffected, and a burst of
// concurrent logins gets exactly the limit.
func TestLimitMaxConnectionsPerVhost(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddVhost("v2"), d.AddVhost("burst"),
			d.SetPermissions("guest", "v2", ".*", ".*", ".*"), d.SetPermissions("guest", "burst", ".*", ".*", ".*"))
	})
	srv := secServe(t, Config{Definitions: path, MaxConnectionsPerVhost: 2}, false)
	addr := srv.Addr().String()
	a1 := secConnect(t, addr, "guest", "guest", "/")
	a2 := secConnect(t, addr, "guest", "guest", "/")
	secRefusedClose(wireHandshake(t, addr, wireOpts{}, 3), replyNotAllowed,
		"NOT_ALLOWED - access to vhost '/' refused for user 'guest': connection limit (2) is reached", 10, 40)
	secDialRefused(t, addr, "guest", "guest", "/", amqp091.ErrVhost)
	b1 := secConnect(t, addr, "guest", "guest", "v2")
	secConnect(t, addr, "guest", "guest", "v2")
	secDialRefused(t, addr, "guest", "guest", "v2", amqp091.ErrVhost)
	for _, c := range []*amqp091.Connection{a1, a2, b1} {
		wireCheckClient(t, c)
	}
	a1.Close()
	var next *amqp091.Connection
	pollFor(t, "a free slot on /", func() bool {
		c, err := secDial(addr, "guest", "guest", "/")
		next = c
		return err == nil
	})
	defer next.Close()
	wireCheckClient(t, next)

	const tries = 8
	results := make(chan error, tries)
	var wg sync.WaitGroup
	for i := 0; i < tries; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := secDial(addr, "guest", "guest", "burst")
			if err == nil {
				t.Cleanup(func() { c.Close() })
			}
			results <- err
		}()
	}
	wg.Wait()
	close(results)
	ok := 0
	for err := range results {
		switch err {
		case nil:
			ok++
		case amqp091.ErrVhost:
		default:
			t.Errorf("burst login: %v", err)
		}
	}
	if ok != 2 {
		t.Errorf("%d of %d concurrent logins to vhost burst succeeded, want 2", ok, tries)
	}
}

// TestLimitMaxQueuesPerVhost checks Config.MaxQueuesPerVhost: queue.declare of a new queue
// beyond it is 406 on the channel, redeclaring an existing queue is fine, other vhosts
// have their own count, and concurrent declares get exactly the limit.
func TestLimitMaxQueuesPerVhost(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddVhost("v2"), d.AddVhost("burst"),
			d.SetPermissions("guest", "v2", ".*", ".*", ".*"), d.SetPermissions("guest", "burst", ".*", ".*", ".*"))
	})
	srv := secServe(t, Config{Definitions: path, MaxQueuesPerVhost: 3}, false)
	addr := srv.Addr().String()
	c := secConnect(t, addr, "guest", "guest", "/")
	declare := func(c *amqp091.Connection, name string) *amqp091.Error {
		return secTry(t, c, func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(name, false, false, false, false, nil)
			return err
		})
	}
	for _, q := range []string{"q1", "q2", "q3"} {
		secAllowed(t, "declare "+q, declare(c, q))
	}
	secRefused(t, "declare q4", declare(c, "q4"), 406, "PRECONDITION_FAILED - cannot declare queue 'q4': queue limit in vhost '/' (3) is reached")
	secRefused(t, "declare a server-named queue", declare(c, ""), 406, "PRECONDITION_FAILED - cannot declare queue 'amq.gen-*")
	secAllowed(t, "redeclare q1", declare(c, "q1"))
	secRefused(t, "passive declare q4", secTry(t, c, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclarePassive("q4", false, false, false, false, nil)
		return err
	}), 404, "NOT_FOUND - no queue 'q4' in vhost '/'")
	v2 := secConnect(t, addr, "guest", "guest", "v2")
	for _, q := range []string{"q1", "q2", "q3"} {
		secAllowed(t, "declare "+q+" in v2", declare(v2, q))
	}
	secRefused(t, "declare q4 in v2", declare(v2, "q4"), 406, "PRECONDITION_FAILED - cannot declare queue 'q4': queue limit in vhost 'v2' (3) is reached")
	secAllowed(t, "delete q1", secTry(t, c, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDelete("q1", false, false, false)
		return err
	}))
	secAllowed(t, "declare q4 after a delete", declare(c, "q4"))
	secRoundTrip(t, c, "q2")

	burst := secConnect(t, addr, "guest", "guest", "burst")
	const tries = 10
	codes := make(chan int, tries)
	var wg sync.WaitGroup
	for i := 0; i < tries; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ch, err := burst.Channel()
			if err != nil {
				codes <- -1
				return
			}
			defer ch.Close()
			_, err = ch.QueueDeclare("b"+strconv.Itoa(i), false, false, false, false, nil)
			var e *amqp091.Error
			switch {
			case err == nil:
				codes <- 0
			case errors.As(err, &e):
				codes <- e.Code
			default:
				codes <- -1
			}
		}()
	}
	wg.Wait()
	close(codes)
	ok := 0
	for code := range codes {
		switch code {
		case 0:
			ok++
		case 406:
		default:
			t.Errorf("concurrent declare: code %d", code)
		}
	}
	if ok != 3 {
		t.Errorf("%d of %d concurrent declares succeeded, want 3", ok, tries)
	}
}

// TestLimitMaxPreAuthBytes checks Config.MaxPreAuthBytes: a client that sends more than it
// before logging in loses its socket without connection.close; one under it logs in and is
// then free to send more.
func TestLimitMaxPreAuthBytes(t *testing.T) {
	t.Parallel()
	log := &secLog{}
	srv := secServe(t, Config{MaxPreAuthBytes: 1024, Logger: log.logger()}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	heartbeats := func(n int) []byte { return bytes.Repeat(wireFrame(frameHeartbeat, 0, nil), n) }

	// Heartbeats are skipped during the handshake, but they count.
	c := wireDial(t, addr)
	secStart(c)
	c.send(heartbeats(200)) // 1600 octets
	c.expectClosed(secWait)
	pollFor(t, "the log of the pre-authentication limit", func() bool {
		return log.has("closing connection: too much data before authentication")
	})

	// A start-ok that takes the total over the cap, with tune-ok and connection.open
	// pipelined behind it in the same write.
	overCap := func(t *testing.T) *wireClient {
		c := wireDial(t, addr)
		secStart(c)
		b := appendMethodFrame(nil, 0, &connectionStartOk{
			ClientProperties: table{"padding": strings.Repeat("p", 2000)},
			Mechanism:        "PLAIN", Response: "\x00guest\x00guest", Locale: "en_US",
		})
		b = appendMethodFrame(b, 0, &connectionTuneOk{})
		c.send(appendMethodFrame(b, 0, &connectionOpen{VirtualHost: "/"}))
		return c
	}
	// The socket is closed, whatever was answered first.
	c = overCap(t)
	for deadline := time.Now().Add(secWait); ; {
		if _, err := c.readFrame(time.Until(deadline)); err != nil {
			if !wireIsClosed(err) {
				t.Fatalf("read: %v, want the socket closed", err)
			}
			break
		}
	}
	t.Run("nothing past the cap is acted on", func(t *testing.T) {
		overCap(t).expectClosed(secWait)
	})

	// Under the cap: 8 + 400 + start-ok octets. After login, the cap no longer applies.
	c = wireDial(t, addr)
	secStart(c)
	c.send(heartbeats(50))
	secStartOk(c, "PLAIN", "\x00guest\x00guest")
	secOpen(c, "/")
	wireExpect[*connectionOpenOk](c, 0)
	c.openChannel(1)
	c.sendMethod(1, &queueDeclare{Queue: "preauth", Exclusive: true})
	wireExpect[*queueDeclareOk](c, 1)
	body := bytes.Repeat([]byte("b"), 64<<10)
	c.sendMethod(1, &basicPublish{RoutingKey: "preauth"})
	c.send(appendContent(nil, 1, nil, body, defaultFrameMax))
	c.sendMethod(1, &basicGet{Queue: "preauth", NoAck: true})
	if ok := wireExpect[*basicGetOk](c, 1); ok.DeliveryTag != 1 {
		t.Errorf("get-ok delivery tag %d", ok.DeliveryTag)
	}
	wireCheckClient(t, other)
}

// TestLimitChannelMax checks Config.ChannelMax: offered in connection.tune, a tune-ok
// above it is 530, and opening more channels than it is a connection error.
func TestLimitChannelMax(t *testing.T) {
	t.Parallel()
	srv := secServe(t, Config{ChannelMax: 4}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	if got := other.Config.ChannelMax; got != 4 {
		t.Errorf("amqp091-go negotiated channel-max %d, want 4", got)
	}
	var chans []*amqp091.Channel
	for i := 0; i < 4; i++ {
		ch, err := other.Channel()
		if err != nil {
			t.Fatalf("channel %d of 4: %v", i+1, err)
		}
		chans = append(chans, ch)
	}
	if _, err := other.Channel(); err != amqp091.ErrChannelMax {
		t.Errorf("a fifth channel: %v, want amqp091.ErrChannelMax", err)
	}
	for _, ch := range chans {
		ch.Close()
	}

	c := wireDial(t, addr)
	secStart(c)
	secStartOk(c, "PLAIN", "\x00guest\x00guest")
	if tune := wireExpect[*connectionTune](c, 0); tune.ChannelMax != 4 {
		t.Errorf("connection.tune channel-max %d, want 4", tune.ChannelMax)
	}
	c.sendMethod(0, &connectionTuneOk{ChannelMax: 5})
	secRefusedClose(c, replyNotAllowed, "NOT_ALLOWED - negotiated channel_max = 5 is higher than the maximum allowed value (4)", 10, 31)

	open4 := func(t *testing.T) *wireClient {
		c := wireConnect(t, addr, wireOpts{})
		for id := uint16(1); id <= 4; id++ {
			c.openChannel(id)
		}
		// A closed channel frees its place.
		c.sendMethod(2, &channelClose{ReplyCode: replySuccess})
		wireExpect[*channelCloseOk](c, 2)
		c.openChannel(2)
		return c
	}
	c = open4(t)
	c.sendMethod(5, &channelOpen{})
	if cl := wireExpect[*connectionClose](c, 0); cl.ReplyCode < 500 {
		t.Errorf("a fifth channel: connection.close %d %q, want a hard error", cl.ReplyCode, cl.ReplyText)
	}
	t.Run("reply code", func(t *testing.T) {
		c := open4(t)
		c.sendMethod(5, &channelOpen{})
		secRefusedClose(c, replyNotAllowed, "NOT_ALLOWED - number of channels opened (4) has reached the negotiated channel_max (4)", 0, 0)
	})
	wireCheckClient(t, other)
}

// TestLimitFrameMax checks Config.FrameMax: offered in connection.tune, a tune-ok outside
// 4096..FrameMax is 530, a frame over the negotiated size is 501, and messages larger
// than a frame travel in frames of the negotiated size.
func TestLimitFrameMax(t *testing.T) {
	t.Parallel()
	const frameMax = 8192
	srv := secServe(t, Config{FrameMax: frameMax}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	if got := other.Config.FrameSize; got != frameMax {
		t.Errorf("amqp091-go negotiated frame-max %d, want %d", got, frameMax)
	}
	ch := openChannel(t, other)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 10000)
	if err := ch.Publish("", q.Name, false, false, amqp091.Publishing{Body: big}); err != nil {
		t.Fatal(err)
	}
	if d, ok, err := ch.Get(q.Name, true); err != nil || !ok || !bytes.Equal(d.Body, big) {
		t.Fatalf("a %d-octet message: got %d octets, %v, %v", len(big), len(d.Body), ok, err)
	}

	for _, tc := range []struct {
		frameMax uint32
		text     string
	}{
		{frameMax + 1, "NOT_ALLOWED - negotiated frame_max = 8193 is higher than the maximum allowed value (8192)"},
		{4095, "NOT_ALLOWED - negotiated frame_max = 4095 is lower than the minimum allowed value (4096)"},
	} {
		c := wireDial(t, addr)
		secStart(c)
		secStartOk(c, "PLAIN", "\x00guest\x00guest")
		if tune := wireExpect[*connectionTune](c, 0); tune.FrameMax != frameMax {
			t.Errorf("connection.tune frame-max %d, want %d", tune.FrameMax, frameMax)
		}
		c.sendMethod(0, &connectionTuneOk{FrameMax: tc.frameMax})
		secRefusedClose(c, replyNotAllowed, tc.text, 10, 31)
	}

	// connect opens channel 1 with an exclusive queue on a frame-max of 8192. Each client
	// has its own queue: an exclusive queue goes only when its connection has ended.
	connect := func(t *testing.T, queue string) *wireClient {
		c := wireConnect(t, addr, wireOpts{frameMax: frameMax})
		c.openChannel(1)
		c.sendMethod(1, &queueDeclare{Queue: queue, Exclusive: true})
		wireExpect[*queueDeclareOk](c, 1)
		return c
	}
	// getBody gets one message of fm and returns its body.
	getBody := func(t *testing.T, c *wireClient, queue string) []byte {
		c.sendMethod(1, &basicGet{Queue: queue, NoAck: true})
		wireExpect[*basicGetOk](c, 1)
		var body []byte
		f, err := c.readFrame(secWait)
		if err != nil || f.typ != frameHeader {
			t.Fatalf("after get-ok: frame type %d, %v; want a content header", f.typ, err)
		}
		size := int(binary.BigEndian.Uint64(f.payload[4:12]))
		for len(body) < size {
			f, err := c.readFrame(secWait)
			if err != nil || f.typ != frameBody {
				t.Fatalf("frame type %d, %v; want a body frame", f.typ, err)
			}
			if len(f.payload)+frameOverhead > frameMax {
				t.Fatalf("a body frame of %d octets over frame-max %d", len(f.payload)+frameOverhead, frameMax)
			}
			body = append(body, f.payload...)
		}
		return body
	}
	c := connect(t, "fm")
	body := bytes.Repeat([]byte("f"), frameMax-frameOverhead)
	c.sendMethod(1, &basicPublish{RoutingKey: "fm"})
	c.send(appendContent(nil, 1, nil, body, frameMax))
	if got := getBody(t, c, "fm"); !bytes.Equal(got, body) {
		t.Errorf("a body of exactly one frame came back as %d octets", len(got))
	}
	// A frame over the fudge RabbitMQ allows: only the frame header goes out.
	c.send([]byte{frameBody, 0, 1, 0, 0, (frameMax + 1) >> 8, (frameMax + 1) & 0xff})
	c.expectConnClose(replyFrameError, 0, 0)

	t.Run("frames up to 8 octets over frame-max", func(t *testing.T) {
		c := connect(t, "fm-fudge")
		body := bytes.Repeat([]byte("g"), frameMax)
		c.sendMethod(1, &basicPublish{RoutingKey: "fm-fudge"})
		c.send(wireFrame(frameHeader, 1, wireContentHeader(uint64(len(body)))))
		c.send(wireFrame(frameBody, 1, body))
		if got := getBody(t, c, "fm-fudge"); !bytes.Equal(got, body) {
			t.Errorf("a body frame of frame-max octets came back as %d octets", len(got))
		}
	})
	wireCheckClient(t, other)
}

// TestLimitMaxMessageSize checks Config.MaxMessageSize: a larger publish closes the channel
// with 406 and nothing else.
func TestLimitMaxMessageSize(t *testing.T) {
	t.Parallel()
	srv := secServe(t, Config{MaxMessageSize: 1000}, false)
	addr := srv.Addr().String()
	c := secConnect(t, addr, "guest", "guest", "/")
	other := secConnect(t, addr, "guest", "guest", "/")
	ch := openChannel(t, c)
	q, err := ch.QueueDeclare("sized", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	publish := func(n int) func(ch *amqp091.Channel) error {
		return func(ch *amqp091.Channel) error {
			return ch.Publish("", q.Name, false, false, amqp091.Publishing{Body: bytes.Repeat([]byte("m"), n)})
		}
	}
	secAllowed(t, "1000 octets", secTry(t, c, publish(1000)))
	secRefused(t, "1001 octets", secTry(t, c, publish(1001)), 406, "PRECONDITION_FAILED - message size 1001 is larger than configured max size 1000")
	secRefused(t, "1 MiB", secTry(t, c, publish(1<<20)), 406, "PRECONDITION_FAILED - message size 1048576 is larger than configured max size 1000")
	if n := queueReady(t, ch, q.Name); n != 1 {
		t.Errorf("%d messages queued, want 1", n)
	}
	if c.IsClosed() {
		t.Error("the connection closed")
	}
	wireCheckClient(t, c)
	wireCheckClient(t, other)
}

// TestLimitHandshakeTimeout checks Config.HandshakeTimeout: a client that has not opened
// its connection in time loses its socket, at whatever step it stalls; open connections
// are not timed.
func TestLimitHandshakeTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 500 * time.Millisecond
	srv := secServe(t, Config{HandshakeTimeout: timeout}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	start := time.Now()
	silent := wireDial(t, addr)
	afterHeader := wireDial(t, addr)
	secStart(afterHeader)
	afterStartOk := wireHandshake(t, addr, wireOpts{}, 1)
	wireExpect[*connectionTune](afterStartOk, 0)
	afterTuneOk := wireHandshake(t, addr, wireOpts{}, 2)
	for name, c := range map[string]*wireClient{"silent": silent, "after the header": afterHeader,
		"after start-ok": afterStartOk, "after tune-ok": afterTuneOk} {
		c.expectClosed(secWait)
		if d := time.Since(start); d < timeout-50*time.Millisecond {
			t.Errorf("%s: closed after %v, before the %v timeout", name, d, timeout)
		}
	}
	// other has been open for longer than the timeout.
	wireCheckClient(t, other)
}

// withGuestVhosts is a definitions edit that adds virtual hosts on which guest may do
// anything.
func withGuestVhosts(names ...string) func(d *Definitions) error {
	return func(d *Definitions) error {
		var err error
		for _, name := range names {
			err = errors.Join(err, d.AddVhost(name), d.SetPermissions("guest", name, ".*", ".*", ".*"))
		}
		return err
	}
}

// describeVhost lists a virtual host's exchanges, queues with their ready counts, and
// bindings, one sorted line each. With durableOnly, only what a restart keeps.
func describeVhost(vh *vhost, durableOnly bool) []string {
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	var lines []string
	for _, x := range vh.exchanges {
		if durableOnly && !x.durable {
			continue
		}
		lines = append(lines, fmt.Sprintf("exchange %q %s durable=%v", x.name, x.kind, x.durable))
		for _, b := range x.bindings {
			if durableOnly && !durableBinding(b) {
				continue
			}
			if b.queue != nil {
				lines = append(lines, fmt.Sprintf("bind %q -> queue %q key %q", x.name, b.queue.name, b.key))
			} else {
				lines = append(lines, fmt.Sprintf("bind %q -> exchange %q key %q", x.name, b.dest.name, b.key))
			}
		}
	}
	for _, q := range vh.queues {
		if durableOnly && q.walID == 0 {
			continue
		}
		lines = append(lines, fmt.Sprintf("queue %q durable=%v ready=%d", q.name, q.durable, q.messageCount()))
	}
	sort.Strings(lines)
	return lines
}

// fillVhost declares, on conn, durable and transient exchanges and queues bound every way
// (exchange to queue, exchange to exchange, predeclared exchanges on either end), and
// publishes persistent and transient messages; vd.dq gets 4 persistent messages, vd.dq2 3,
// vd.tq 6 of either kind. A consumer on vd.dq takes 2 and does not ack them: they are
// returned.
func fillVhost(t testing.TB, conn *amqp091.Connection) []amqp091.Delivery {
	t.Helper()
	ch := openChannel(t, conn)
	for _, x := range []struct {
		name, kind string
		durable    bool
	}{{"vd.x", "direct", true}, {"vd.xt", "fanout", false}} {
		if err := ch.ExchangeDeclare(x.name, x.kind, x.durable, false, false, false, nil); err != nil {
			t.Fatalf("declare %s: %v", x.name, err)
		}
	}
	for _, q := range []struct {
		name    string
		durable bool
	}{{"vd.dq", true}, {"vd.dq2", true}, {"vd.tq", false}} {
		if _, err := ch.QueueDeclare(q.name, q.durable, false, false, false, nil); err != nil {
			t.Fatalf("declare %s: %v", q.name, err)
		}
	}
	for _, b := range []struct{ queue, key, exchange string }{
		{"vd.dq", "k", "vd.x"}, {"vd.dq", "t.#", "amq.topic"}, {"vd.tq", "", "vd.xt"}, {"vd.dq2", "", "amq.fanout"},
	} {
		if err := ch.QueueBind(b.queue, b.key, b.exchange, false, nil); err != nil {
			t.Fatalf("bind %v: %v", b, err)
		}
	}
	for _, b := range []struct{ dest, key, source string }{
		{"amq.fanout", "e2e", "amq.direct"}, {"vd.xt", "k", "vd.x"}, {"amq.fanout", "k2", "vd.x"},
	} {
		if err := ch.ExchangeBind(b.dest, b.key, b.source, false, nil); err != nil {
			t.Fatalf("exchange bind %v: %v", b, err)
		}
	}
	p := newPersistentPublisher(t, conn)
	for i := range 4 {
		p.publish("vd.x", "k", persistentMsg("dq-"+strconv.Itoa(i))) // vd.dq, and vd.tq through vd.xt
	}
	for i := range 3 {
		p.publish("", "vd.dq2", persistentMsg("dq2-"+strconv.Itoa(i)))
	}
	for i := range 2 {
		p.publish("vd.xt", "", transientMsg("tq-"+strconv.Itoa(i)))
	}
	p.wait()
	if err := ch.Qos(2, 0, false); err != nil {
		t.Fatal(err)
	}
	msgs, err := ch.Consume("vd.dq", "holder", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return []amqp091.Delivery{takeDelivery(t, msgs), takeDelivery(t, msgs)}
}

// checkFreshVhost checks that the virtual host name of srv holds only the predeclared
// exchanges, unbound, and that nothing fillVhost declared is there, in memory and seen by
// a client.
func checkFreshVhost(t testing.TB, srv *Server, name string) {
	t.Helper()
	vh := srv.vhost(name)
	if vh == nil {
		t.Fatalf("no vhost %q", name)
	}
	if got, want := describeVhost(vh, false), describeVhost(newVhost(name), false); !slices.Equal(got, want) {
		t.Errorf("vhost %q holds:\n%s\nwant only:\n%s", name, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	conn := secConnect(t, srv.Addr().String(), "guest", "guest", name)
	for _, q := range []string{"vd.dq", "vd.dq2", "vd.tq"} {
		if n := queueDepth(t, conn, q); n != -1 {
			t.Errorf("queue %s is back in vhost %q with %d messages", q, name, n)
		}
	}
	for _, x := range []string{"vd.x", "vd.xt"} {
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclarePassive(x, "direct", true, false, false, false, nil)
		})
		if amqpErrCode(err) != 404 {
			t.Errorf("passive declare of exchange %s in vhost %q: %v, want 404", x, name, err)
		}
	}
	// The predeclared exchanges route nowhere: their old bindings are gone.
	c := newConfirmChannel(t, conn)
	for _, x := range []struct{ exchange, key string }{{"amq.direct", "e2e"}, {"amq.topic", "t.x"}, {"amq.fanout", ""}} {
		c.publish(x.exchange, x.key, true, transientMsg("probe"))
	}
	c.wait()
	if n := len(c.returns); n != 3 {
		t.Errorf("%d of 3 probes through the predeclared exchanges of vhost %q returned unroutable", n, name)
	}
}

// TestReloadDeleteVhost deletes a virtual host holding queues, exchanges, bindings, and
// persistent messages, some unacked, from the definitions file and reloads, as
// `amqpd delete_vhost` and SIGHUP do: its connection is closed with 320, its messages are
// released in the log, and a virtual host of the same name created later is empty: at once,
// after a clean restart, and after a crash right after Reload returned.
func TestReloadDeleteVhost(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, withGuestVhosts("prod"))
	b := startDurable(t, Config{Definitions: path})
	prod := secConnect(t, b.srv.Addr().String(), "guest", "guest", "prod")
	closed := prod.NotifyClose(make(chan *amqp091.Error, 1))
	fillVhost(t, prod)
	if n := len(describeVhost(b.srv.vhost("prod"), true)); n < 10 {
		t.Fatalf("vhost prod has %d durable entities after fillVhost", n)
	}

	secSaveDefs(t, path, nil)
	if err := b.srv.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	crashed := copyDataDir(t, b.dir, nil) // what is on disk when Reload returns
	awaitCloseCode(t, closed, replyConnectionForced)
	if b.srv.vhost("prod") != nil {
		t.Error("vhost prod is still in memory")
	}
	// The unacked messages are released too, when the closed connection requeues them.
	pollFor(t, "prod's messages released in the log", func() bool { return storeLive(b.srv.store) == 0 })

	secSaveDefs(t, path, withGuestVhosts("prod"))
	if err := b.srv.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	checkFreshVhost(t, b.srv, "prod")

	b2 := b.restart("clean", Config{Definitions: path})
	checkFreshVhost(t, b2.srv, "prod")
	b3 := startDurable(t, Config{DataDir: crashed, Definitions: path})
	checkFreshVhost(t, b3.srv, "prod")
	if n := storeLive(b3.srv.store); n != 0 {
		t.Errorf("after the crash, the log holds %d live octets of the deleted vhost's messages", n)
	}
}

// TestReloadDeleteVhostLeavesOthers deletes one of three virtual hosts holding the same
// names: the other two keep their connections, consumers, unacked messages, entities and
// messages, also after a restart.
func TestReloadDeleteVhostLeavesOthers(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, withGuestVhosts("prod", "other"))
	b := startDurable(t, Config{Definitions: path})
	addr := b.srv.Addr().String()
	fillVhost(t, secConnect(t, addr, "guest", "guest", "prod"))
	kept := map[string]*amqp091.Connection{}
	held := map[string][]amqp091.Delivery{}
	closed := map[string]chan *amqp091.Error{}
	before, durable := map[string][]string{}, map[string][]string{}
	for _, name := range []string{"/", "other"} {
		kept[name] = secConnect(t, addr, "guest", "guest", name)
		closed[name] = kept[name].NotifyClose(make(chan *amqp091.Error, 1))
		held[name] = fillVhost(t, kept[name])
		before[name] = describeVhost(b.srv.vhost(name), false)
		durable[name] = describeVhost(b.srv.vhost(name), true)
	}

	secSaveDefs(t, path, withGuestVhosts("other"))
	if err := b.srv.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	for _, name := range []string{"/", "other"} {
		if got := describeVhost(b.srv.vhost(name), false); !slices.Equal(got, before[name]) {
			t.Errorf("vhost %q after deleting prod:\n%s\nwant:\n%s", name, strings.Join(got, "\n"), strings.Join(before[name], "\n"))
		}
		for _, d := range held[name] {
			if err := d.Ack(false); err != nil {
				t.Errorf("vhost %q: ack: %v", name, err)
			}
		}
		// The consumer takes the next two; the queue's two ready messages are delivered.
		pollFor(t, "vd.dq of "+name+" delivered to its consumer", func() bool {
			return slices.Contains(describeVhost(b.srv.vhost(name), false), `queue "vd.dq" durable=true ready=0`)
		})
		select {
		case e := <-closed[name]:
			t.Fatalf("the connection to vhost %q closed: %v", name, e)
		default:
		}
	}
	// The consumers' unacked messages are ready again after the restart: vd.dq holds the
	// 2 of its 4 messages that were not acked, as before the reload.
	for _, name := range []string{"/", "other"} {
		kept[name].Close()
	}
	b2 := b.restart("clean", Config{Definitions: path})
	for _, name := range []string{"/", "other"} {
		if got := describeVhost(b2.srv.vhost(name), true); !slices.Equal(got, durable[name]) {
			t.Errorf("vhost %q after a restart:\n%s\nwant:\n%s", name, strings.Join(got, "\n"), strings.Join(durable[name], "\n"))
		}
	}
	if b2.srv.vhost("prod") != nil {
		t.Error("the deleted vhost prod is back after a restart")
	}
}
