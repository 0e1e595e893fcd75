package amqp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

func TestQueueDeclareServerNamed(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	q1, err := ch.QueueDeclare("", false, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	q2, err := ch.QueueDeclare("", false, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []amqp091.Queue{q1, q2} {
		if !strings.HasPrefix(q.Name, "amq.gen-") || len(q.Name) != len("amq.gen-")+22 {
			t.Fatalf("server-named queue %q, want amq.gen- and 22 characters", q.Name)
		}
	}
	if q1.Name == q2.Name {
		t.Fatalf("two server-named queues share the name %q", q1.Name)
	}
	publishText(t, ch, "", q2.Name, "m")
	if got := drainText(t, ch, q2.Name); !slices.Equal(got, []string{"m"}) {
		t.Fatalf("got %q", got)
	}
}

func TestQueueDeclareErrors(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	setup := openChannel(t, c)
	if _, err := setup.QueueDeclare("plain", false, false, false, false, amqp091.Table{"x-max-length": int32(10)}); err != nil {
		t.Fatal(err)
	}
	if _, err := setup.QueueDeclare("durable", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := setup.QueueDeclare("auto", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := setup.ExchangeDeclare("x", "direct", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declare := func(name string, durable, autoDelete bool, args amqp091.Table) func(*amqp091.Channel) error {
		return func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(name, durable, autoDelete, false, false, args)
			return err
		}
	}
	maxLen := func(v any) amqp091.Table { return amqp091.Table{"x-max-length": v} }
	cases := []struct {
		name string
		run  func(ch *amqp091.Channel) error
		code int
	}{
		{"equivalent redeclare", declare("plain", false, false, maxLen(int32(10))), 0},
		{"equivalent durable", declare("durable", true, false, nil), 0},
		{"equivalent auto-delete", declare("auto", false, true, nil), 0},
		{"passive missing", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclarePassive("missing", false, false, false, false, nil)
			return err
		}, 404},
		{"reserved amq. prefix", declare("amq.x", false, false, nil), 403},
		{"durable differs", declare("plain", true, false, maxLen(int32(10))), 406},
		{"durable dropped", declare("durable", false, false, nil), 406},
		{"auto-delete differs", declare("plain", false, true, maxLen(int32(10))), 406},
		{"auto-delete dropped", declare("auto", false, false, nil), 406},
		{"x-argument value differs", declare("plain", false, false, maxLen(int32(20))), 406},
		{"x-argument missing", declare("plain", false, false, nil), 406},
		{"x-argument added", declare("durable", true, false, maxLen(int32(5))), 406},
		{"bind missing queue", func(ch *amqp091.Channel) error { return ch.QueueBind("missing", "k", "x", false, nil) }, 404},
		{"bind missing exchange", func(ch *amqp091.Channel) error { return ch.QueueBind("plain", "k", "missing", false, nil) }, 404},
		{"unbind missing queue", func(ch *amqp091.Channel) error { return ch.QueueUnbind("missing", "k", "x", nil) }, 404},
		{"unbind missing exchange", func(ch *amqp091.Channel) error { return ch.QueueUnbind("plain", "k", "missing", nil) }, 404},
		{"unbind what was never bound", func(ch *amqp091.Channel) error { return ch.QueueUnbind("plain", "k", "x", nil) }, 0},
		{"purge missing", func(ch *amqp091.Channel) error { _, err := ch.QueuePurge("missing", false); return err }, 404},
		{"get missing", func(ch *amqp091.Channel) error { _, _, err := ch.Get("missing", false); return err }, 404},
		{"consume missing", func(ch *amqp091.Channel) error {
			_, err := ch.Consume("missing", "c", false, false, false, false, nil)
			return err
		}, 404},
		{"delete missing", func(ch *amqp091.Channel) error { _, err := ch.QueueDelete("missing", false, false, false); return err }, 0},
	}
	for _, tc := range cases {
		ch := openChannel(t, c)
		if err := tc.run(ch); amqpCode(err) != tc.code || (tc.code == 0 && err != nil) {
			t.Errorf("%s: %v, want reply code %d", tc.name, err, tc.code)
		}
	}
	if c.IsClosed() {
		t.Fatal("a channel error closed the connection")
	}
}

func TestQueueRedeclareExclusiveMismatch(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "shared")
	if _, err := ch.QueueDeclare("mine", false, false, true, false, nil); err != nil {
		t.Fatal(err)
	}
	_, err := openChannel(t, c).QueueDeclare("shared", false, false, true, false, nil)
	wantReplyCode(t, err, 405)
	_, err = openChannel(t, c).QueueDeclare("mine", false, false, false, false, nil)
	wantReplyCode(t, err, 405)
}

func TestQueueArgumentEquivalenceLikeRabbitMQ(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("q", false, false, false, false, amqp091.Table{"x-max-length": int32(10), "x-custom": "a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("q", false, false, false, false, amqp091.Table{"x-max-length": int64(10), "x-custom": "a"}); err != nil {
		t.Fatalf("x-max-length as int64: %v", err)
	}
	if _, err := ch.QueueDeclare("q", false, false, false, false, amqp091.Table{"x-max-length": int32(10), "x-custom": "b"}); err != nil {
		t.Fatalf("different unknown argument: %v", err)
	}
}

func TestQueueDeclareOkCounts(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	q, err := ch.QueueDeclare("q", false, false, false, false, nil)
	if err != nil || q.Messages != 0 || q.Consumers != 0 {
		t.Fatalf("fresh declare: %+v %v", q, err)
	}
	for i := range 3 {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	cons := openChannel(t, c)
	if err := cons.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	consumeTagged(t, cons, "q", "c")
	// One message is out with the consumer: declare-ok counts ready messages only.
	q, err = ch.QueueDeclare("q", false, false, false, false, nil)
	if err != nil || q.Messages != 2 || q.Consumers != 1 {
		t.Fatalf("redeclare: %+v %v, want 2 messages 1 consumer", q, err)
	}
	q, err = ch.QueueDeclarePassive("q", false, false, false, false, nil)
	if err != nil || q.Messages != 2 || q.Consumers != 1 {
		t.Fatalf("passive: %+v %v, want 2 messages 1 consumer", q, err)
	}
}

func TestExclusiveQueueOtherConnection(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	owner := openChannel(t, dial(t, url))
	if _, err := owner.QueueDeclare("ex", false, false, true, false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, owner, "", "ex", "m")
	// A synchronous method on the same channel: "m" is queued before the other connection
	// publishes (publishes on different connections have no order between them).
	if n := queueReady(t, owner, "ex"); n != 1 {
		t.Fatalf("%d ready, want 1", n)
	}
	other := dial(t, url)
	cases := []struct {
		name string
		run  func(ch *amqp091.Channel) error
	}{
		{"declare", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("ex", false, false, true, false, nil)
			return err
		}},
		{"passive declare", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclarePassive("ex", false, false, true, false, nil)
			return err
		}},
		{"consume", func(ch *amqp091.Channel) error {
			_, err := ch.Consume("ex", "c", false, false, false, false, nil)
			return err
		}},
		{"bind", func(ch *amqp091.Channel) error { return ch.QueueBind("ex", "k", "amq.direct", false, nil) }},
		{"unbind", func(ch *amqp091.Channel) error { return ch.QueueUnbind("ex", "k", "amq.direct", nil) }},
		{"purge", func(ch *amqp091.Channel) error { _, err := ch.QueuePurge("ex", false); return err }},
		{"delete", func(ch *amqp091.Channel) error { _, err := ch.QueueDelete("ex", false, false, false); return err }},
		{"get", func(ch *amqp091.Channel) error { _, _, err := ch.Get("ex", false); return err }},
	}
	for _, tc := range cases {
		if err := tc.run(openChannel(t, other)); amqpCode(err) != 405 {
			t.Errorf("%s from another connection: %v, want 405", tc.name, err)
		}
	}
	// Publishing to it from elsewhere is allowed, and the owner still has everything.
	publishText(t, openChannel(t, other), "", "ex", "from other")
	pollFor(t, "the other connection's message queued", func() bool { return queueReady(t, owner, "ex") == 2 })
	if got := drainText(t, owner, "ex"); !slices.Equal(got, []string{"m", "from other"}) {
		t.Fatalf("owner got %q", got)
	}
}

func TestExclusiveQueueDeletedWithConnection(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ownerConn := dial(t, url)
	owner := openChannel(t, ownerConn)
	if _, err := owner.QueueDeclare("ex", false, false, true, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := owner.QueueBind("ex", "k", "amq.direct", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ownerConn.Close(); err != nil {
		t.Fatal(err)
	}
	other := dial(t, url)
	pollFor(t, "exclusive queue deleted", func() bool {
		_, err := openChannel(t, other).QueueDeclarePassive("ex", false, false, false, false, nil)
		return amqpCode(err) == 404
	})
	// The name is free again, for anyone.
	ch := openChannel(t, other)
	if _, err := ch.QueueDeclare("ex", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "amq.direct", "k", "old binding")
	if n := queueReady(t, ch, "ex"); n != 0 {
		t.Fatalf("the deleted queue's binding routed %d messages to its successor", n)
	}
}

func TestAutoDeleteQueue(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("ad", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "", "ad", "m")
	// No consumer yet: it stays, even through a basic.get.
	if _, _, err := ch.Get("ad", true); err != nil {
		t.Fatal(err)
	}
	if n := queueReady(t, ch, "ad"); n != 0 {
		t.Fatalf("%d ready, want 0", n)
	}
	cons := openChannel(t, c)
	consumeTagged(t, cons, "ad", "c1")
	consumeTagged(t, cons, "ad", "c2")
	if err := cons.Cancel("c1", false); err != nil {
		t.Fatal(err)
	}
	queueReady(t, ch, "ad") // one consumer left: still there
	if err := cons.Cancel("c2", false); err != nil {
		t.Fatal(err)
	}
	_, err := openChannel(t, c).QueueDeclarePassive("ad", false, true, false, false, nil)
	wantReplyCode(t, err, 404)

	// Closing the last consumer's channel counts as cancelling it.
	if _, err := ch.QueueDeclare("ad2", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	cons2 := openChannel(t, c)
	consumeTagged(t, cons2, "ad2", "c")
	if err := cons2.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = openChannel(t, c).QueueDeclarePassive("ad2", false, true, false, false, nil)
	wantReplyCode(t, err, 404)
}

func TestQueuePurge(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	for i := range 5 {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	holder := openChannel(t, c)
	for range 2 {
		if _, ok, err := holder.Get("q", false); err != nil || !ok {
			t.Fatalf("get: %v %v", ok, err)
		}
	}
	n, err := ch.QueuePurge("q", false)
	if err != nil || n != 3 {
		t.Fatalf("purge = %d, %v; want 3 (the unacked two stay)", n, err)
	}
	if n, err := ch.QueuePurge("q", false); err != nil || n != 0 {
		t.Fatalf("second purge = %d, %v; want 0", n, err)
	}
	if err := holder.Close(); err != nil {
		t.Fatal(err)
	}
	got := drainText(t, ch, "q")
	if !slices.Equal(got, []string{"0", "1"}) {
		t.Fatalf("after the holder closed the queue has %q, want the two unacked back", got)
	}
}

func TestQueueDelete(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	for i := range 4 {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	_, err := ch.QueueDelete("q", false, true, false)
	wantReplyCode(t, err, 406) // if-empty with 4 messages

	ch = openChannel(t, c)
	cons := openChannel(t, c)
	if err := cons.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	msgs := consumeTagged(t, cons, "q", "c")
	_, err = ch.QueueDelete("q", true, false, false)
	wantReplyCode(t, err, 406) // if-unused with a consumer

	ch = openChannel(t, c)
	takeDelivery(t, msgs)
	if err := cons.Cancel("c", false); err != nil {
		t.Fatal(err)
	}
	n, err := ch.QueueDelete("q", true, false, false)
	if err != nil || n != 3 {
		t.Fatalf("delete = %d, %v; want 3 ready messages", n, err)
	}
	_, err = ch.QueueDeclarePassive("q", false, false, false, false, nil)
	wantReplyCode(t, err, 404)

	// if-empty counts ready messages, not unacked ones.
	ch = openChannel(t, c)
	declareTransientQueue(t, ch, "q2")
	publishText(t, ch, "", "q2", "m")
	if _, ok, err := ch.Get("q2", false); err != nil || !ok {
		t.Fatalf("get: %v %v", ok, err)
	}
	if n, err := ch.QueueDelete("q2", false, true, false); err != nil || n != 0 {
		t.Fatalf("if-empty delete with only an unacked message = %d, %v; want 0, nil", n, err)
	}
}

func TestQueueDeleteCancelsConsumers(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	declareTransientQueue(t, ch, "q")
	cancels := ch.NotifyCancel(make(chan string, 2))
	msgs := consumeTagged(t, ch, "q", "victim")
	publishText(t, ch, "", "q", "in flight")
	inFlight := takeDelivery(t, msgs)
	other := openChannel(t, dial(t, url))
	if _, err := other.QueueDelete("q", false, false, false); err != nil {
		t.Fatal(err)
	}
	select {
	case tag := <-cancels:
		if tag != "victim" {
			t.Fatalf("basic.cancel for %q, want victim", tag)
		}
	case <-time.After(recvWait):
		t.Fatal("no basic.cancel after the queue was deleted")
	}
	select {
	case _, ok := <-msgs:
		if ok {
			t.Fatal("delivery after cancel")
		}
	case <-time.After(recvWait):
		t.Fatal("delivery channel not closed after basic.cancel")
	}
	// A delivery from the deleted queue can still be acked, and the channel stays usable.
	if err := inFlight.Ack(false); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("the new queue q holds %d messages, want 0", n)
	}
}

// builtWithRace reports whether the test binary was built with -race.
func builtWithRace() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// TestQueueMillionSmallMessages publishes a million 16-octet messages to one queue and
// reports the heap they take. It is not parallel, so the heap is this test's alone.
func TestQueueMillionSmallMessages(t *testing.T) {
	// The publishes go out as pre-encoded frames, fast enough for a million even under -race.
	n := 1_000_000
	if testing.Short() {
		n = 200_000
	}
	srv, _ := newTestServer(t)
	w := dialFrameClient(t, srv)
	w.send(1, &queueDeclare{Queue: "million"})
	w.expect(1, idQueueDeclareOk)

	// One publish, body last: method, header, 16-octet body frame.
	one := appendContent(appendMethodFrame(nil, 1, &basicPublish{RoutingKey: "million"}), 1, nil, make([]byte, 16), defaultFrameMax)
	const batch = 4096
	buf := make([]byte, 0, batch*len(one))

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	for i := 0; i < n; i += batch {
		buf = buf[:0]
		for j := i; j < min(i+batch, n); j++ {
			buf = append(buf, one...)
			binary.BigEndian.PutUint64(buf[len(buf)-1-16:], uint64(j))
		}
		w.write(buf)
	}
	// A synchronous method after the publishes: they have all been handled.
	w.send(1, &queueDeclare{Queue: "million", Passive: true})
	ok := w.expect(1, idQueueDeclareOk).(*queueDeclareOk)
	elapsed := time.Since(start)
	if ok.MessageCount != uint32(n) {
		t.Fatalf("message count %d, want %d", ok.MessageCount, n)
	}
	buf, one = nil, nil
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	perMsg := (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / float64(n)
	t.Logf("%d messages of 16 octets queued in %v (%.0f msgs/s); heap %.1f bytes per message (race=%v)",
		n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), perMsg, builtWithRace())
	if perMsg > 512 {
		t.Errorf("%.0f bytes of heap per queued 16-octet message, want at most 512", perMsg)
	}

	// The head comes out first, in order.
	const sample = 1000
	w.send(1, &basicQos{PrefetchCount: sample})
	w.expect(1, idBasicQosOk)
	w.send(1, &basicConsume{Queue: "million", ConsumerTag: "head"})
	w.expect(1, idBasicConsumeOk)
	var last uint64
	for i := range sample {
		d := w.expect(1, idBasicDeliver).(*basicDeliver)
		_, body := w.content()
		if len(body) != 16 || binary.BigEndian.Uint64(body) != uint64(i) {
			t.Fatalf("delivery %d: body %x, want message %d", i, body, i)
		}
		last = d.DeliveryTag
	}
	w.send(1, &basicAck{DeliveryTag: last, Multiple: true})
	w.send(1, &queuePurge{Queue: "million"})
	// The ack gives the consumer its next window before the purge; the purge takes the rest.
	for deliveries := 0; ; deliveries++ {
		ch, m := w.next()
		if d, ok := m.(*basicDeliver); ok && ch == 1 {
			if _, body := w.content(); binary.BigEndian.Uint64(body) != uint64(sample+deliveries) || d.Redelivered {
				t.Fatalf("delivery %d after the ack: body %x redelivered %v", sample+deliveries, body, d.Redelivered)
			}
			continue
		}
		p, ok := m.(*queuePurgeOk)
		if !ok || ch != 1 {
			t.Fatalf("got %s on channel %d, want queue.purge-ok", methodName(m.id()), ch)
		}
		if deliveries != sample || p.MessageCount != uint32(n-2*sample) {
			t.Fatalf("purged %d after %d more deliveries, want %d after %d", p.MessageCount, deliveries, n-2*sample, sample)
		}
		break
	}
}

func TestDeque(t *testing.T) {
	var d deque[int]
	if d.len() != 0 {
		t.Fatal("zero deque not empty")
	}
	// Growth: capacity starts at 16 and doubles, order kept.
	for i := range 100 {
		d.push(i)
	}
	if d.len() != 100 || len(d.buf) != 128 {
		t.Fatalf("len %d cap %d after 100 pushes, want 100 and 128", d.len(), len(d.buf))
	}
	for i := range 100 {
		if *d.at(i) != i {
			t.Fatalf("at(%d) = %d", i, *d.at(i))
		}
	}
	for i := range 100 {
		if *d.front() != i {
			t.Fatalf("front = %d, want %d", *d.front(), i)
		}
		if v := d.pop(); v != i {
			t.Fatalf("pop = %d, want %d", v, i)
		}
	}

	// Wraparound: the ring reuses the slots freed at the front.
	var r deque[int]
	for i := range 10 {
		r.push(i)
	}
	for range 8 {
		r.pop()
	}
	for i := 10; i < 22; i++ {
		r.push(i)
	}
	if len(r.buf) != 16 || r.head+r.len() <= len(r.buf) {
		t.Fatalf("cap %d head %d len %d: expected a wrapped ring of 16", len(r.buf), r.head, r.len())
	}
	for i := 8; i < 22; i++ {
		if v := r.pop(); v != i {
			t.Fatalf("pop = %d, want %d", v, i)
		}
	}
	// Growing a wrapped ring keeps the order.
	for i := range 40 {
		r.push(i)
	}
	for i := range 40 {
		if v := r.pop(); v != i {
			t.Fatalf("after growth pop = %d, want %d", v, i)
		}
	}

	// Shrink: a big ring that empties gives its memory back, order kept.
	var s deque[int]
	for i := range 5000 {
		s.push(i)
	}
	if len(s.buf) != 8192 {
		t.Fatalf("cap %d after 5000 pushes, want 8192", len(s.buf))
	}
	for i := range 4990 {
		if v := s.pop(); v != i {
			t.Fatalf("pop = %d, want %d", v, i)
		}
	}
	if len(s.buf) > 1024 {
		t.Fatalf("cap %d with 10 elements left, want it shrunk to at most 1024", len(s.buf))
	}
	for i := 4990; i < 5000; i++ {
		if v := s.pop(); v != i {
			t.Fatalf("after shrink pop = %d, want %d", v, i)
		}
	}

	// clear empties and frees.
	s.push(1)
	s.clear()
	if s.len() != 0 || s.buf != nil {
		t.Fatalf("after clear: len %d buf %v", s.len(), s.buf)
	}
}

func TestDequeMatchesSlice(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var d deque[int]
	var model []int
	next := 0
	for range 200_000 {
		if len(model) == 0 || r.IntN(100) < 55-len(model)/200 {
			d.push(next)
			model = append(model, next)
			next++
		} else {
			if v := d.pop(); v != model[0] {
				t.Fatalf("pop = %d, want %d", v, model[0])
			}
			model = model[1:]
		}
		if d.len() != len(model) {
			t.Fatalf("len %d, want %d", d.len(), len(model))
		}
		if len(d.buf)&(len(d.buf)-1) != 0 {
			t.Fatalf("capacity %d is not a power of two", len(d.buf))
		}
	}
	for i, v := range model {
		if *d.at(i) != v {
			t.Fatalf("at(%d) = %d, want %d", i, *d.at(i), v)
		}
	}
}

// newUnitQueue returns a queue with no vhost traffic, holding n messages whose bodies are
// their numbers 1..n.
func newUnitQueue(n int) *queue {
	q := &queue{name: "unit", vh: newVhost("/")}
	for i := 1; i <= n; i++ {
		q.enqueue(&message{data: []byte(strconv.Itoa(i))})
	}
	return q
}

func TestRequeueRestoresOrder(t *testing.T) {
	q := newUnitQueue(10)
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []qentry
	for range 6 {
		out = append(out, q.popLocked())
	}
	for i, e := range out {
		if e.seq != uint64(i+1) || e.redelivered {
			t.Fatalf("pop %d: seq %d redelivered %v", i, e.seq, e.redelivered)
		}
	}
	// Back in a scrambled order: 5, 2, 6, 1 (3 and 4 stay out).
	for _, i := range []int{4, 1, 5, 0} {
		q.requeueLocked(out[i])
	}
	if q.messageCountLocked() != 8 {
		t.Fatalf("count %d, want 8", q.messageCountLocked())
	}
	if e := q.peekLocked(); e.seq != 1 {
		t.Fatalf("peek seq %d, want 1", e.seq)
	}
	var got []string
	for q.messageCountLocked() > 0 {
		e := q.popLocked()
		got = append(got, string(e.msg.body())+"/"+strconv.FormatBool(e.redelivered))
	}
	want := []string{"1/true", "2/true", "5/true", "6/true", "7/false", "8/false", "9/false", "10/false"}
	if !slices.Equal(got, want) {
		t.Fatalf("order %q, want %q", got, want)
	}
}

func TestRequeueHeapRandomized(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for round := range 200 {
		n := 1 + r.IntN(60)
		q := newUnitQueue(n)
		q.mu.Lock()
		var out []qentry
		for range 1 + r.IntN(n) {
			out = append(out, q.popLocked())
		}
		r.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
		back := out[:r.IntN(len(out)+1)]
		for _, e := range back {
			q.requeueLocked(e)
		}
		var seqs []uint64
		for q.messageCountLocked() > 0 {
			seqs = append(seqs, q.popLocked().seq)
		}
		q.mu.Unlock()
		if !slices.IsSorted(seqs) || len(seqs) != n-len(out)+len(back) {
			t.Fatalf("round %d: %d messages, %d out, %d back: popped %v", round, n, len(out), len(back), seqs)
		}
	}
}

func TestRequeueToDeletedQueueDrops(t *testing.T) {
	q := newUnitQueue(2)
	q.mu.Lock()
	e := q.popLocked()
	q.deleted = true
	q.requeueLocked(e)
	n := q.messageCountLocked()
	q.mu.Unlock()
	if n != 1 {
		t.Fatalf("count %d after requeue to a deleted queue, want 1", n)
	}
}

// TestQueueMessageTTL: with x-message-ttl, messages nobody takes in time leave the queue
// by themselves; those consumed in time arrive.
func TestQueueMessageTTL(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if _, err := ch.QueueDeclare("ttl", false, false, false, false, amqp091.Table{"x-message-ttl": int32(1000)}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		publishText(t, ch, "", "ttl", strconv.Itoa(i))
	}
	if n := queueReady(t, ch, "ttl"); n != 3 {
		t.Fatalf("%d ready right after publishing, want 3", n)
	}
	pollFor(t, "messages expired", func() bool { return queueReady(t, ch, "ttl") == 0 })

	// A consumer that is there takes them before they expire.
	msgs := consumeTagged(t, ch, "ttl", "c")
	publishText(t, ch, "", "ttl", "in time")
	if d := takeDelivery(t, msgs); string(d.Body) != "in time" {
		t.Fatalf("got %q", d.Body)
	}
}

// TestMessageExpiration: the expiration property expires a message at the head; an
// invalid one is 406.
func TestMessageExpiration(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "exp")
	if err := ch.Publish("", "exp", false, false, amqp091.Publishing{Body: []byte("short"), Expiration: "30"}); err != nil {
		t.Fatal(err)
	}
	if err := ch.Publish("", "exp", false, false, amqp091.Publishing{Body: []byte("long")}); err != nil {
		t.Fatal(err)
	}
	pollFor(t, "the short-lived message expired", func() bool { return queueReady(t, ch, "exp") == 1 })
	if d, ok, err := ch.Get("exp", true); err != nil || !ok || string(d.Body) != "long" {
		t.Fatalf("get: %q %v %v, want the long-lived message", d.Body, ok, err)
	}

	bad := openChannel(t, c)
	closed := bad.NotifyClose(make(chan *amqp091.Error, 1))
	if err := bad.Publish("", "exp", false, false, amqp091.Publishing{Body: []byte("x"), Expiration: "soon"}); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-closed:
		if e == nil || e.Code != 406 {
			t.Fatalf("closed with %v, want 406", e)
		}
	case <-time.After(recvWait):
		t.Fatal("an invalid expiration was accepted")
	}
}

// TestQueueTTLInvalid: x-message-ttl must be a non-negative integer.
func TestQueueTTLInvalid(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	for _, v := range []any{int32(-1), "10"} {
		_, err := openChannel(t, c).QueueDeclare("bad-ttl", false, false, false, false, amqp091.Table{"x-message-ttl": v})
		if amqpCode(err) != 406 {
			t.Errorf("x-message-ttl %v: %v, want 406", v, err)
		}
	}
}

// TestQueueMaxLength: x-max-length drops the oldest ready messages (drop-head), or with
// x-overflow reject-publish refuses new ones, nacking them in confirm mode.
func TestQueueMaxLength(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("maxlen", false, false, false, false, amqp091.Table{"x-max-length": int32(3)}); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		publishText(t, ch, "", "maxlen", strconv.Itoa(i))
	}
	if got := drainText(t, ch, "maxlen"); !slices.Equal(got, []string{"3", "4", "5"}) {
		t.Fatalf("drop-head kept %q, want 3 4 5", got)
	}

	if _, err := ch.QueueDeclare("maxbytes", false, false, false, false, amqp091.Table{"x-max-length-bytes": int32(10)}); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"aaaa", "bbbb", "cccc"} { // 12 octets: "aaaa" must go
		publishText(t, ch, "", "maxbytes", b)
	}
	if got := drainText(t, ch, "maxbytes"); !slices.Equal(got, []string{"bbbb", "cccc"}) {
		t.Fatalf("max-length-bytes kept %q, want bbbb cccc", got)
	}

	pub := openChannel(t, c)
	if _, err := pub.QueueDeclare("reject", false, false, false, false, amqp091.Table{"x-max-length": int32(2), "x-overflow": "reject-publish"}); err != nil {
		t.Fatal(err)
	}
	if err := pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := pub.NotifyPublish(make(chan amqp091.Confirmation, 4))
	for i := 1; i <= 3; i++ {
		if err := pub.Publish("", "reject", false, false, amqp091.Publishing{Body: []byte(strconv.Itoa(i))}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 1; i <= 3; i++ {
		select {
		case cf := <-confirms:
			if cf.Ack != (i <= 2) {
				t.Fatalf("publish %d: ack=%v, want %v", i, cf.Ack, i <= 2)
			}
		case <-time.After(recvWait):
			t.Fatal("missing confirm")
		}
	}
	if got := drainText(t, ch, "reject"); !slices.Equal(got, []string{"1", "2"}) {
		t.Fatalf("reject-publish kept %q, want 1 2", got)
	}

	for _, args := range []amqp091.Table{{"x-max-length": int32(-1)}, {"x-max-length-bytes": "big"}, {"x-overflow": "sometimes"}} {
		if _, err := openChannel(t, c).QueueDeclare("bad-limits", false, false, false, false, args); amqpCode(err) != 406 {
			t.Errorf("%v: %v, want 406", args, err)
		}
	}
}

// TestQueueTTLTooLarge: as in RabbitMQ, a time to live above 4,294,967,295 ms is 406, for
// the expiration property and for x-message-ttl; the largest allowed one neither overflows
// nor makes the expiry timer fire at once.
func TestQueueTTLTooLarge(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	c := dial(t, url)
	for _, v := range []any{int64(maxTTL + 1), int64(math.MaxInt64), int64(9223372036855)} {
		_, err := openChannel(t, c).QueueDeclare("big-ttl", false, false, false, false, amqp091.Table{"x-message-ttl": v})
		want := fmt.Sprintf("PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'big-ttl' in vhost '/': {value_too_large,%d}", v)
		if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || e.Reason != want {
			t.Errorf("x-message-ttl %v: %v, want 406 %q", v, err, want)
		}
	}
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("max-ttl", false, false, false, false, amqp091.Table{"x-message-ttl": int64(maxTTL)}); err != nil {
		t.Fatalf("x-message-ttl %d: %v", maxTTL, err)
	}
	for _, exp := range []string{"4294967296", "9223372036854775807", "99999999999999999999999"} {
		bad := openChannel(t, c)
		closed := bad.NotifyClose(make(chan *amqp091.Error, 1))
		if err := bad.Publish("", "max-ttl", false, false, amqp091.Publishing{Body: []byte("x"), Expiration: exp}); err != nil {
			t.Fatal(err)
		}
		want := "PRECONDITION_FAILED - invalid expiration '" + exp + "': {value_too_large," + exp + "}"
		select {
		case e := <-closed:
			if e == nil || e.Code != 406 || e.Reason != want {
				t.Fatalf("expiration %s: closed with %v, want 406 %q", exp, e, want)
			}
		case <-time.After(recvWait):
			t.Fatalf("expiration %s was accepted", exp)
		}
	}
	if err := ch.Publish("", "max-ttl", false, false, amqp091.Publishing{Body: []byte("kept"), Expiration: "4294967295"}); err != nil {
		t.Fatal(err)
	}
	pollFor(t, "the message arrived", func() bool { return queueReady(t, ch, "max-ttl") == 1 })
	q := srv.vhost("/").queues["max-ttl"]
	q.mu.Lock()
	timer, at := q.expiry, q.expiryAt
	q.mu.Unlock()
	if timer == nil {
		t.Fatal("no expiry timer for a message with a time to live")
	}
	if now := time.Now().UnixMilli(); at < now+maxTTL-60_000 || at > now+maxTTL+1 {
		t.Fatalf("expiry at %d, want about %d ms from now", at-now, int64(maxTTL))
	}
	time.Sleep(20 * time.Millisecond)
	// The same timer is still pending: it did not fire at once (and re-arm itself).
	if !timer.Stop() {
		t.Fatal("the expiry timer fired at once")
	}
	if n := queueReady(t, ch, "max-ttl"); n != 1 {
		t.Fatalf("%d messages ready, want 1", n)
	}
}

// TestExpiryTimerNeverSpins: whatever expiry time a queue's head carries, the timer waits
// at least a millisecond and at most maxTTL, so no arithmetic overflows into "now".
func TestExpiryTimerNeverSpins(t *testing.T) {
	for _, at := range []int64{math.MaxInt64, math.MinInt64 + 1, 1} {
		q := &queue{name: "q", vh: newVhost("/")}
		q.ready.push(qentry{msg: &message{}, seq: 1, expires: at})
		q.mu.Lock()
		q.scheduleExpiryLocked()
		timer := q.expiry
		q.mu.Unlock()
		if at == math.MaxInt64 {
			time.Sleep(20 * time.Millisecond)
			if !timer.Stop() {
				t.Fatalf("expires %d: the timer fired at once", at)
			}
			continue
		}
		// Past expiry times fire soon, once, and leave an empty queue.
		pollFor(t, "the expired message left", func() bool {
			q.mu.Lock()
			defer q.mu.Unlock()
			return q.messageCountLocked() == 0
		})
	}
	if got := expiresAt(newTTL(maxTTL), 0); got < time.Now().UnixMilli() {
		t.Fatalf("expiresAt(maxTTL) = %d overflowed", got)
	}
}

// pagedBody is the n-th paging test message's body: its number, then filler of a length
// that varies with n, so a body read back from the wrong place shows.
func pagedBody(n int) []byte {
	b := []byte(strconv.Itoa(n) + ":")
	for len(b) < 512+(n*397)%2500 {
		b = append(b, byte('a'+(n+len(b))%26))
	}
	return b
}

// queuePaged counts the ready messages of a queue that are on disk only, and says what
// the ones in memory cost.
func queuePaged(srv *Server, vhost, name string) (paged, ready int, ram int64) {
	q := srv.vhost(vhost).queues[name]
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.tail.len(), q.messageCountLocked(), q.ramBytes
}

// lastPaged returns the newest paged message of a queue.
func lastPaged(t *testing.T, srv *Server, name string) diskRef {
	t.Helper()
	q := srv.vhost("/").queues[name]
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.tail.len() == 0 {
		t.Fatal("no message is paged")
	}
	return q.tail.at(q.tail.len() - 1)
}

// TestQueuePaging: past PageOutBytes of bodies, a durable queue keeps new persistent
// messages in the log only; every message is still delivered, in order and byte-exact, by
// consume and by get, before and after a restart; requeued paged messages come back in
// their place, and paged messages expire.
func TestQueuePaging(t *testing.T) {
	t.Parallel()
	cfg := Config{PageOutBytes: 8 << 10, SegmentSize: 64 << 10}
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("paged", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	const n = 400
	for i := range n {
		pub.publish("", "paged", false, amqp091.Publishing{DeliveryMode: 2, MessageId: strconv.Itoa(i), Body: pagedBody(i)})
	}
	pub.wait()
	paged, ready, ram := queuePaged(b.srv, "/", "paged")
	if ready != n || paged < n*3/4 || ram > cfg.PageOutBytes {
		t.Fatalf("%d ready, %d paged, %d body octets in memory; want %d ready, most paged, at most %d in memory", ready, paged, ram, n, cfg.PageOutBytes)
	}

	// Get the first two, consume the rest with a requeue in the middle.
	for i := range 2 {
		d, ok, err := ch.Get("paged", false)
		if err != nil || !ok || !bytes.Equal(d.Body, pagedBody(i)) {
			t.Fatalf("get %d: %v %v, body %q", i, ok, err, d.Body)
		}
		d.Ack(false)
	}
	cons := openChannel(t, conn)
	cons.Qos(1, 0, false) // one at a time: the requeued message is next
	msgs, err := cons.Consume("paged", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := takeDelivery(t, msgs)
	if !bytes.Equal(first.Body, pagedBody(2)) {
		t.Fatalf("first delivery %q, want message 2", first.MessageId)
	}
	first.Nack(false, true) // back in its place
	for i := 2; i < n/2; i++ {
		d := takeDelivery(t, msgs)
		if d.MessageId != strconv.Itoa(i) || !bytes.Equal(d.Body, pagedBody(i)) {
			t.Fatalf("delivery %d: message %s with a %d-octet body, want message %d byte-exact", i, d.MessageId, len(d.Body), i)
		}
		if i == 2 && !d.Redelivered {
			t.Fatal("the requeued message is not marked redelivered")
		}
		d.Ack(false)
	}
	cons.Close()
	conn.Close()

	// The other half comes back after a restart, still in order and byte-exact.
	b = b.restart("clean", cfg)
	ch = openChannel(t, dial(t, b.url))
	got := getAll(t, ch, "paged")
	if len(got) != n-n/2 {
		t.Fatalf("after a restart %d messages, want %d", len(got), n-n/2)
	}
	for k, d := range got {
		if i := n/2 + k; d.MessageId != strconv.Itoa(i) || !bytes.Equal(d.Body, pagedBody(i)) {
			t.Fatalf("after a restart, message %d: got message %s", i, d.MessageId)
		}
	}

	// Paged messages expire like the others.
	if _, err := ch.QueueDeclare("paged-ttl", true, false, false, false, amqp091.Table{"x-message-ttl": int32(100)}); err != nil {
		t.Fatal(err)
	}
	pub = newConfirmChannel(t, dial(t, b.url))
	for i := range 50 {
		pub.publish("", "paged-ttl", false, amqp091.Publishing{DeliveryMode: 2, Body: pagedBody(1000 + i)})
	}
	pub.wait()
	if paged, _, _ := queuePaged(b.srv, "/", "paged-ttl"); paged == 0 {
		t.Fatal("no message of paged-ttl was paged")
	}
	pollFor(t, "the paged messages to expire", func() bool { return queueReady(t, ch, "paged-ttl") == 0 })
	pollFor(t, "the log to settle the expired messages", func() bool { return storeLive(b.srv.store) == 0 })
}

// TestQueuePagingCompaction: paged messages that stay queued while the log moves past
// them are copied forward by compaction (read back from disk), and still arrive
// byte-exact, after a restart too.
func TestQueuePagingCompaction(t *testing.T) {
	t.Parallel()
	cfg := Config{PageOutBytes: 4 << 10, SegmentSize: 32 << 10}
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	for _, q := range []string{"old", "churn"} {
		if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	pub := newConfirmChannel(t, conn)
	for i := range 40 {
		pub.publish("", "old", false, amqp091.Publishing{DeliveryMode: 2, Body: pagedBody(i)})
	}
	pub.wait()
	firstSeg := segmentFiles(t, b.dir)[0]
	// Churn through many segments, consuming as it goes: "old" is then most of what lives.
	for round := range 20 {
		for i := range 40 {
			pub.publish("", "churn", false, amqp091.Publishing{DeliveryMode: 2, Body: pagedBody(round*40 + i)})
		}
		pub.wait()
		for range getAll(t, ch, "churn") {
		}
	}
	pollFor(t, "compaction to remove the first segment", func() bool {
		_, err := os.Stat(firstSeg)
		return errors.Is(err, os.ErrNotExist)
	})
	b = b.restart("clean", cfg)
	got := getAll(t, openChannel(t, dial(t, b.url)), "old")
	if len(got) != 40 {
		t.Fatalf("%d messages of 'old' after compaction and a restart, want 40", len(got))
	}
	for i, d := range got {
		if !bytes.Equal(d.Body, pagedBody(i)) {
			t.Fatalf("message %d came back with a %d-octet body, want byte-exact", i, len(d.Body))
		}
	}
}

// TestQueuePagedReadError: a paged body the log cannot give back (here: its record
// corrupted on disk) closes the consumer's channel with 541, is logged, and leaves the
// connection and the other channels working.
func TestQueuePagedReadError(t *testing.T) {
	t.Parallel()
	var logs walLogBuffer
	b := startDurable(t, Config{PageOutBytes: 1 << 10, Logger: logs.logger()})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("broken", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	for i := range 10 {
		pub.publish("", "broken", false, amqp091.Publishing{DeliveryMode: 2, Body: bytes.Repeat([]byte{byte('a' + i)}, 600)})
	}
	pub.wait()
	last := lastPaged(t, b.srv, "broken")
	// Flip an octet of its record's body on disk.
	f, err := os.OpenFile(b.srv.store.w.segPath(uint64(last.file)), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	at := int64(last.offset()) + int64(last.size) - 10
	one := []byte{0}
	f.ReadAt(one, at)
	one[0] ^= 0xff
	f.WriteAt(one, at)
	f.Close()

	cons := openChannel(t, conn)
	closed := cons.NotifyClose(make(chan *amqp091.Error, 1))
	msgs, err := cons.Consume("broken", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The nine readable messages go out before the channel closes (the client may drop
	// some it had not handed over yet); none of them is the broken one.
	for i := 0; ; i++ {
		d, ok := <-msgs
		if !ok {
			break
		}
		if i >= 9 || d.Body[0] != byte('a'+i) {
			t.Fatalf("delivery %d: body starts %q", i, d.Body[0])
		}
	}
	select {
	case e := <-closed:
		if e == nil || e.Code != 541 {
			t.Fatalf("consumer channel closed with %v, want 541", e)
		}
	case <-time.After(walWait):
		t.Fatal("the consumer's channel was not closed")
	}
	if conn.IsClosed() {
		t.Fatal("the connection closed; only the channel should have")
	}
	if n := queueReady(t, openChannel(t, conn), "broken"); n != 10 {
		t.Fatalf("%d messages ready after the consumer's channel closed, want its 9 unacked back and the broken one", n)
	}
	if !strings.Contains(logs.String(), "reading a paged message back failed") {
		t.Fatalf("no log line for the read error:\n%s", logs.String())
	}
}

// TestQueuePagingTransient: past PageOutBytes, a queue keeps the bodies of transient
// messages in paging files: they are delivered in order and byte-exact, requeued in
// place, and the files go as the queue drains; after a restart the paging directory is
// empty.
func TestQueuePagingTransient(t *testing.T) {
	t.Parallel()
	cfg := Config{PageOutBytes: 8 << 10}
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	declareTransientQueue(t, ch, "spilled")
	pub := newConfirmChannel(t, conn)
	const n = 300
	for i := range n {
		pub.publish("", "spilled", false, amqp091.Publishing{MessageId: strconv.Itoa(i), Body: pagedBody(i)})
	}
	pub.wait()
	paged, ready, ram := queuePaged(b.srv, "/", "spilled")
	if ready != n || paged < n*3/4 || ram > cfg.PageOutBytes {
		t.Fatalf("%d ready, %d paged, %d body octets in memory; want %d ready, most paged, at most %d in memory", ready, paged, ram, n, cfg.PageOutBytes)
	}
	if b.srv.spill.files() == 0 {
		t.Fatal("no paging file")
	}
	cons := openChannel(t, conn)
	cons.Qos(1, 0, false)
	msgs, err := cons.Consume("spilled", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		d := takeDelivery(t, msgs)
		if d.MessageId != strconv.Itoa(i) || !bytes.Equal(d.Body, pagedBody(i)) {
			t.Fatalf("delivery %d: message %s with a %d-octet body, want message %d byte-exact", i, d.MessageId, len(d.Body), i)
		}
		if i == n-10 && !d.Redelivered {
			d.Nack(false, true) // comes back next, from its paging file
			i--
			continue
		}
		d.Ack(false)
	}
	pollFor(t, "the paging files to go", func() bool {
		b.srv.spill.mu.Lock()
		defer b.srv.spill.mu.Unlock()
		for _, s := range b.srv.spill.segs {
			if s.size > 0 {
				return false
			}
		}
		return true
	})

	// Transient messages left queued in a durable queue across a restart.
	if _, err := ch.QueueDeclare("paged", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		pub.publish("", "paged", false, amqp091.Publishing{Body: pagedBody(i)})
	}
	pub.wait()
	conn.Close()
	b = b.restart("clean", cfg)
	left, err := os.ReadDir(filepath.Join(b.dir, "paging"))
	if err != nil || len(left) != 0 {
		t.Fatalf("paging directory after a restart: %d files, %v; want it empty", len(left), err)
	}
	if n := queueReady(t, openChannel(t, dial(t, b.url)), "paged"); n != 0 {
		t.Fatalf("%d transient messages survived a restart", n)
	}
}

// TestQueuePagedBeforeWritten: with everything paged at once, a consumer waiting on the
// queue is handed messages whose log records are not written yet: they go out after the
// log's next batch, in order, and the channel stays open.
func TestQueuePagedBeforeWritten(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("eager", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	cons := openChannel(t, conn)
	closed := cons.NotifyClose(make(chan *amqp091.Error, 1))
	msgs, err := cons.Consume("eager", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		if err := ch.Publish("", "eager", false, false, amqp091.Publishing{DeliveryMode: 2, Body: pagedBody(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 200 {
		if d := takeDelivery(t, msgs); !bytes.Equal(d.Body, pagedBody(i)) {
			t.Fatalf("delivery %d: a %d-octet body, want message %d", i, len(d.Body), i)
		}
	}
	select {
	case e := <-closed:
		t.Fatalf("the consumer's channel closed: %v", e)
	default:
	}
}

// TestQueuePagedReadErrorWithConfirms: a channel in confirm mode that is closed by a body
// the log cannot give back gets nothing after its channel.close, no confirm above all,
// though its persistent publishes were on their way to the log.
func TestQueuePagedReadErrorWithConfirms(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1 << 10})
	w := dialFrameClient(t, b.srv)
	for _, q := range []string{"broken2", "sink"} {
		w.send(1, &queueDeclare{Queue: q, Durable: true})
		w.expect(1, idQueueDeclareOk)
	}
	persistent := (&properties{DeliveryMode: 2}).encode(nil)
	for i := range 4 {
		w.publish(1, "", "broken2", persistent, bytes.Repeat([]byte{byte('a' + i)}, 700))
	}
	w.send(1, &queueDeclare{Queue: "broken2", Passive: true})
	w.expect(1, idQueueDeclareOk)
	if err := b.srv.store.sync(); err != nil {
		t.Fatal(err)
	}
	last := lastPaged(t, b.srv, "broken2")
	f, err := os.OpenFile(b.srv.store.w.segPath(uint64(last.file)), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0xff, 0x00, 0xff}, int64(last.offset())+int64(last.size)-10)
	f.Close()

	w.send(2, &channelOpen{})
	w.expect(2, idChannelOpenOk)
	w.send(2, &confirmSelect{})
	w.expect(2, idConfirmSelectOk)
	// Publishes and the consume go out in one write: the confirms of the publishes and
	// the close for the broken body race on the server.
	var batch []byte
	for range 200 {
		batch = appendMethodFrame(batch, 2, &basicPublish{RoutingKey: "sink"})
		batch = appendContent(batch, 2, persistent, []byte("x"), defaultFrameMax)
	}
	batch = appendMethodFrame(batch, 2, &basicConsume{Queue: "broken2", NoAck: true})
	for range 200 {
		batch = appendMethodFrame(batch, 2, &basicPublish{RoutingKey: "sink"})
		batch = appendContent(batch, 2, persistent, []byte("x"), defaultFrameMax)
	}
	w.write(batch)
	closedAt := -1
	for i := 0; ; i++ {
		f := w.readFrame()
		if f.channel != 2 {
			if f.typ == frameMethod {
				if id, _, _ := methodHeader(f.payload); id == idQueueDeclareOk {
					break
				}
			}
			continue
		}
		if closedAt >= 0 {
			t.Fatalf("frame type %d on channel 2 after its channel.close", f.typ)
		}
		if f.typ != frameMethod {
			continue
		}
		id, d, _ := methodHeader(f.payload)
		if id == idChannelClose {
			m := channelClose{}
			m.decode(&d)
			if m.ReplyCode != 541 {
				t.Fatalf("channel closed with %d %q, want 541", m.ReplyCode, m.ReplyText)
			}
			closedAt = i
			// Whatever was queued before the close has arrived by now; ask the
			// connection something, and check nothing for channel 2 comes first.
			w.send(1, &queueDeclare{Queue: "sink", Passive: true})
		}
	}
	if closedAt < 0 {
		t.Fatal("channel 2 was not closed")
	}
}

// TestQueuePagesWhileMemoryHigh: while the memory alarm is on, even a short queue keeps
// the bodies of new messages out of memory (here a transient one, in a paging file), and
// reads them back.
func TestQueuePagesWhileMemoryHigh(t *testing.T) {
	t.Parallel()
	sp, err := openSpill(filepath.Join(t.TempDir(), "paging"))
	if err != nil {
		t.Fatal(err)
	}
	defer sp.close()
	var alarms atomic.Uint32
	vh := newVhost("/")
	vh.spill, vh.alarms = sp, &alarms
	q := &queue{name: "short", vh: vh}
	body := bytes.Repeat([]byte("m"), 1000)
	msg := func() *message {
		return &message{data: append([]byte("k"), body...), keyLen: 1, size: uint32(len(body))}
	}
	q.enqueue(msg())
	alarms.Store(alarmMemory)
	q.enqueue(msg())
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ready.len() != 1 || q.tail.len() != 1 {
		t.Fatalf("%d in memory and %d paged, want only the message enqueued during the alarm paged", q.ready.len(), q.tail.len())
	}
	if want := msg().memCost(); q.ramBytes != want {
		t.Fatalf("%d octets counted in memory, want %d", q.ramBytes, want)
	}
	q.popLocked()
	if notYet, e := q.fillLocked(); notYet || e != nil || q.ready.len() != 1 {
		t.Fatalf("reading the paged message back: not yet %v, %v, %d in memory", notYet, e, q.ready.len())
	}
	if got := q.ready.front().msg.body(); !bytes.Equal(got, body) {
		t.Fatalf("read back %d octets; want the body", len(got))
	}
}

// pagedMsg is paging test message n: its number as the message id, pagedBody(n) as the body.
func pagedMsg(n int, persistent bool) amqp091.Publishing {
	p := amqp091.Publishing{MessageId: strconv.Itoa(n), Body: pagedBody(n)}
	if persistent {
		p.DeliveryMode = amqp091.Persistent
	}
	return p
}

// pagedRange is the message numbers from, from+step, … below to.
func pagedRange(from, to, step int) []int {
	var ns []int
	for n := from; n < to; n += step {
		ns = append(ns, n)
	}
	return ns
}

// checkPagedMessages checks that ds are exactly the paging test messages want, in order
// and byte-exact, and marked redelivered as said.
func checkPagedMessages(t testing.TB, what string, ds []amqp091.Delivery, want []int, redelivered bool) {
	t.Helper()
	got := make([]string, len(ds))
	for i, d := range ds {
		got[i] = d.MessageId
	}
	wantIDs := make([]string, len(want))
	for i, n := range want {
		wantIDs[i] = strconv.Itoa(n)
	}
	if !slices.Equal(got, wantIDs) {
		t.Fatalf("%s: messages %v, want %v", what, got, wantIDs)
	}
	for i, d := range ds {
		if !bytes.Equal(d.Body, pagedBody(want[i])) {
			t.Fatalf("%s: message %d has a %d-octet body, want its own byte-exact", what, want[i], len(d.Body))
		}
		if d.Redelivered != redelivered {
			t.Fatalf("%s: message %d redelivered=%v, want %v", what, want[i], d.Redelivered, redelivered)
		}
	}
}

// getN takes n messages from a queue with basic.get.
func getN(t testing.TB, ch *amqp091.Channel, queue string, n int, noAck bool) []amqp091.Delivery {
	t.Helper()
	var ds []amqp091.Delivery
	for range n {
		d, ok, err := ch.Get(queue, noAck)
		if err != nil || !ok {
			t.Fatalf("basic.get %s after %d of %d: ok=%v, %v", queue, len(ds), n, ok, err)
		}
		ds = append(ds, d)
	}
	return ds
}

// testQueue returns a queue of the default vhost, or nil.
func testQueue(srv *Server, name string) *queue {
	vh := srv.vhost("/")
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	return vh.queues[name]
}

// queueParts says where a queue's ready messages are: in memory (never delivered, and
// requeued) and paged.
func queueParts(srv *Server, name string) (ready, requeued, paged int) {
	q := testQueue(srv, name)
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.ready.len(), len(q.requeued), q.tail.len()
}

// queueLogHolds is the octets of log records a durable queue holds for its ready
// messages: paged refs to the log, and logged messages in memory. While no other queue
// holds messages, storeLive must come to it.
func queueLogHolds(srv *Server, name string) int64 {
	q := testQueue(srv, name)
	q.mu.Lock()
	defer q.mu.Unlock()
	st := srv.store
	st.mu.Lock()
	defer st.mu.Unlock()
	var n int64
	q.tail.each(func(r *diskRef) {
		if r.inLog() {
			n += int64(r.size)
		}
	})
	for i := range q.ready.len() {
		if mw := q.ready.at(i).msg.wal; mw != nil {
			n += int64(mw.recLen)
		}
	}
	for _, e := range q.requeued {
		if mw := e.msg.wal; mw != nil {
			n += int64(mw.recLen)
		}
	}
	return n
}

// loggedPaged replays a crash image of b's log as a restart would, without a broker (so
// no clock runs), and returns the paging test messages it holds for each named queue, in
// order. Every body must be byte-exact.
func loggedPaged(t *testing.T, b *durableBroker, names ...string) map[string][]int {
	t.Helper()
	qids := make(map[string]uint64)
	for _, name := range names {
		qids[name] = testQueue(b.srv, name).walID
	}
	_, rec := openTestWAL(t, b.crashImage(), storeOptions{})
	out := make(map[string][]int)
	for _, name := range names {
		for _, m := range rec.messages[qids[name]] {
			body := m.body()
			n, err := strconv.Atoi(string(body[:max(bytes.IndexByte(body, ':'), 0)]))
			if err != nil || !bytes.Equal(body, pagedBody(n)) {
				t.Fatalf("the log holds a %d-octet body for %s that is no paging test message", len(body), name)
			}
			out[name] = append(out[name], n)
		}
	}
	return out
}

// TestQueuePagingSharedCompaction: a persistent message routed to four durable queues
// that hold it four ways (delivered and unacked, in memory, paged, read back from its
// page) is copied forward for every hold, and for no queue that settled it, when
// compaction removes the segments of the original records; after more acks and gets, a
// crash and a clean restart give each queue exactly its own messages, byte-exact and in
// order, none lost and none twice.
func TestQueuePagingSharedCompaction(t *testing.T) {
	t.Parallel()
	cfg := Config{PageOutBytes: 16 << 10, SegmentSize: 32 << 10}
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if err := ch.ExchangeDeclare("fan", "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	names := []string{"held", "front", "paged", "loaded", "churn"}
	for _, q := range names {
		if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		if q != "churn" {
			if err := ch.QueueBind(q, "", "fan", false, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	cons := openChannel(t, conn)
	if err := cons.Qos(100, 0, false); err != nil {
		t.Fatal(err)
	}
	held := consumeTagged(t, cons, "held", "held")
	pub := newConfirmChannel(t, conn)
	// Fillers put "paged" and "loaded" past their memory share, so they page every
	// fanned-out message; "front" keeps the first of them in memory.
	const fillers, n = 20, 30
	for i := range fillers {
		pub.publish("", "paged", false, pagedMsg(1000+i, true))
		pub.publish("", "loaded", false, pagedMsg(2000+i, true))
	}
	for i := range n {
		pub.publish("fan", "", false, pagedMsg(i, true))
	}
	pub.wait()
	heldDs := takeDeliveries(t, held, n)
	checkPagedMessages(t, "held", heldDs, pagedRange(0, n, 1), false)
	// Taking the fillers of "loaded" reads its fanned-out messages back into memory.
	checkPagedMessages(t, "loaded", getN(t, ch, "loaded", fillers, true), pagedRange(2000, 2000+fillers, 1), false)
	if r, rq, p := queueParts(b.srv, "held"); r+rq+p != 0 {
		t.Fatalf("held: %d ready, want every message delivered", r+rq+p)
	}
	if r, _, p := queueParts(b.srv, "front"); r < 5 || p < 5 || r+p != n {
		t.Fatalf("front: %d in memory and %d paged, want %d with some of each", r, p, n)
	}
	if r, _, p := queueParts(b.srv, "paged"); p < n || r+p != fillers+n {
		t.Fatalf("paged: %d in memory and %d paged, want %d with every fanned-out one paged", r, p, fillers+n)
	}
	if r, _, p := queueParts(b.srv, "loaded"); r != n || p != 0 {
		t.Fatalf("loaded: %d in memory and %d paged, want all %d read back", r, p, n)
	}
	// Some are settled before any copy is made: no copy may bring them back.
	for _, d := range heldDs[:4] {
		d.Ack(false)
	}
	checkPagedMessages(t, "front", getN(t, ch, "front", 2, true), pagedRange(0, 2, 1), false)
	checkPagedMessages(t, "loaded", getN(t, ch, "loaded", 1, true), []int{0}, false)

	// Churn the log until compaction has removed every segment of the original records.
	orig := segmentFiles(t, b.dir)
	left := func() int {
		k := 0
		for _, s := range orig {
			if _, err := os.Stat(s); err == nil {
				k++
			}
		}
		return k
	}
	for round := 0; left() > 0; round++ {
		if round == 200 {
			t.Fatalf("%d of the %d original segments still there after %d rounds of churn", left(), len(orig), round)
		}
		for i := range 40 {
			pub.publish("", "churn", false, pagedMsg(5000+i, true))
		}
		pub.wait()
		if k := len(getAll(t, ch, "churn")); k != 40 {
			t.Fatalf("churn gave back %d of 40", k)
		}
	}
	// A crash now, with only the copies left, would bring back each queue's own.
	logged := loggedPaged(t, b, "held", "front", "paged", "loaded")
	for name, want := range map[string][]int{
		"held":   pagedRange(4, n, 1),
		"front":  pagedRange(2, n, 1),
		"paged":  append(pagedRange(1000, 1000+fillers, 1), pagedRange(0, n, 1)...),
		"loaded": pagedRange(1, n, 1),
	} {
		if !slices.Equal(logged[name], want) {
			t.Fatalf("after compaction the log holds %v for %s, want %v", logged[name], name, want)
		}
	}

	// Ack every other held message left; take a few of each other queue, with and
	// without acks.
	for i, d := range heldDs[4:] {
		if i%2 == 0 {
			d.Ack(false)
		}
	}
	checkPagedMessages(t, "front", getN(t, ch, "front", 1, true), []int{2}, false)
	checkPagedMessages(t, "paged", getN(t, ch, "paged", fillers+5, true),
		append(pagedRange(1000, 1000+fillers, 1), pagedRange(0, 5, 1)...), false)
	lch := openChannel(t, conn)
	lds := getN(t, lch, "loaded", 9, false)
	checkPagedMessages(t, "loaded", lds, pagedRange(1, 10, 1), false)
	for _, d := range lds[:4] {
		d.Ack(false) // 5 to 9 stay unacked
	}
	queueReady(t, ch, "held") // the acks before it are done

	want := map[string][]int{
		"held":   pagedRange(5, n, 2),
		"front":  pagedRange(3, n, 1),
		"paged":  pagedRange(5, n, 1),
		"loaded": pagedRange(5, n, 1),
	}
	for _, mode := range []string{"crash", "clean"} {
		b2 := b.restart(mode, cfg)
		ch2 := openChannel(t, dial(t, b2.url))
		for _, name := range names {
			checkPagedMessages(t, mode+" restart, "+name, getAll(t, ch2, name), want[name], true)
		}
		b2.stop()
	}
}

// TestQueuePagingPurgeDelete: purging or deleting queues with long paged backlogs
// (persistent messages in the log, transient ones in paging files; durable queues and
// transient ones), part of each read back into memory and one message out unacked,
// releases every hold: nothing in the log is live, so its segments go, the paging files
// are deleted, and after a crash or a clean restart nothing comes back.
func TestQueuePagingPurgeDelete(t *testing.T) {
	t.Parallel()
	cfg := Config{PageOutBytes: 4 << 10, SegmentSize: 64 << 10}
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if err := ch.ExchangeDeclare("pd", "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	names := []string{"purge.d", "delete.d", "purge.t", "delete.t"}
	for _, q := range names {
		if _, err := ch.QueueDeclare(q, strings.HasSuffix(q, ".d"), false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		if err := ch.QueueBind(q, "", "pd", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	pub := newConfirmChannel(t, conn)
	const n = 400
	for i := range n {
		pub.publish("pd", "", false, pagedMsg(i, i%3 != 0)) // two in three persistent
	}
	pub.wait()
	for _, q := range names {
		if r, _, p := queueParts(b.srv, q); r+p != n || p < n*3/4 {
			t.Fatalf("%s: %d in memory and %d paged, want %d, most paged", q, r, p, n)
		}
	}
	if storeLive(b.srv.store) == 0 || b.srv.spill.files() == 0 {
		t.Fatal("nothing in the log or in paging files")
	}
	// Nine taken from each queue (reading a window of the tail back into memory), and a
	// tenth left unacked.
	uch := openChannel(t, conn)
	unacked := make(map[string]amqp091.Delivery)
	for _, q := range names {
		checkPagedMessages(t, q, getN(t, ch, q, 9, true), pagedRange(0, 9, 1), false)
		d := getN(t, uch, q, 1, false)
		checkPagedMessages(t, q, d, []int{9}, false)
		unacked[q] = d[0]
		if r, _, p := queueParts(b.srv, q); r == 0 || p == 0 {
			t.Fatalf("%s: %d in memory and %d paged, want some of each", q, r, p)
		}
	}
	for _, q := range []string{"purge.d", "purge.t"} {
		if k, err := ch.QueuePurge(q, false); err != nil || k != n-10 {
			t.Fatalf("purge %s: %d, %v; want %d purged", q, k, err, n-10)
		}
	}
	for _, q := range []string{"delete.d", "delete.t"} {
		if k, err := ch.QueueDelete(q, false, false, false); err != nil || k != n-10 {
			t.Fatalf("delete %s: %d, %v; want %d deleted", q, k, err, n-10)
		}
	}
	// The unacked ones: acked after the purge, requeued into the deleted queues.
	unacked["purge.d"].Ack(false)
	unacked["purge.t"].Ack(false)
	unacked["delete.d"].Nack(false, true)
	unacked["delete.t"].Nack(false, true)
	if k := queueReady(t, ch, "purge.d"); k != 0 { // the acks before it are done
		t.Fatalf("purge.d holds %d after the purge", k)
	}
	if live := storeLive(b.srv.store); live != 0 {
		t.Fatalf("the log still counts %d octets live", live)
	}
	if k := b.srv.spill.files(); k != 0 {
		t.Fatalf("%d paging files left", k)
	}
	waitSegments(t, b.dir, 2)

	for _, mode := range []string{"crash", "clean"} {
		b2 := b.restart(mode, cfg)
		conn2 := dial(t, b2.url)
		for _, q := range names {
			want := -1
			if q == "purge.d" {
				want = 0
			}
			if k := queueDepth(t, conn2, q); k != want {
				t.Errorf("%s restart: %s holds %d (-1: none), want %d", mode, q, k, want)
			}
		}
		if live := storeLive(b2.srv.store); live != 0 {
			t.Errorf("%s restart: the log counts %d octets live", mode, live)
		}
		b2.stop()
	}
}

// TestQueuePagingMaxLength: a durable queue at x-max-length whose older messages are
// paged drops its head straight from the paged tail, reading nothing back: the count stays
// at the limit, the log lets the dropped messages go, and the newest messages survive a
// crash and a clean restart.
func TestQueuePagingMaxLength(t *testing.T) {
	t.Parallel()
	cfg := Config{PageOutBytes: 8 << 10}
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	const n, limit = 300, 50
	if _, err := ch.QueueDeclare("capped", true, false, false, false, amqp091.Table{"x-max-length": int32(limit)}); err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	for i := range n {
		pub.publish("", "capped", false, pagedMsg(i, true))
	}
	pub.wait()
	if r, rq, p := queueParts(b.srv, "capped"); r+rq != 0 || p != limit {
		t.Fatalf("%d in memory and %d paged, want the %d newest paged and none read back", r+rq, p, limit)
	}
	if k := queueReady(t, ch, "capped"); k != limit {
		t.Fatalf("%d ready, want %d", k, limit)
	}
	if live, held := storeLive(b.srv.store), queueLogHolds(b.srv, "capped"); live != held {
		t.Fatalf("the log counts %d octets live; the queue holds %d", live, held)
	}
	for _, mode := range []string{"crash", "clean"} {
		b2 := b.restart(mode, cfg)
		got := getAll(t, openChannel(t, dial(t, b2.url)), "capped")
		checkPagedMessages(t, mode+" restart", got, pagedRange(n-limit, n, 1), true)
		b2.stop()
	}
}

// TestQueuePagingExpiry: paged messages that expire at the head of durable queues with no
// consumer (under x-message-ttl, or by their own shorter expiration ahead of messages that
// do not expire yet) are dropped by the expiry timer straight from the paged tail: the
// counts are right, the log lets them go, and exactly the unexpired messages remain after
// a crash and a clean restart.
func TestQueuePagingExpiry(t *testing.T) {
	t.Parallel()
	cfg := Config{PageOutBytes: 1} // every message is paged
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("ttl.all", true, false, false, false, amqp091.Table{"x-message-ttl": int32(30)}); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("ttl.head", true, false, false, false, amqp091.Table{"x-message-ttl": int32(600_000)}); err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	const expiring, kept = 40, 30
	for i := range expiring {
		pub.publish("", "ttl.all", false, pagedMsg(i, true))
		m := pagedMsg(100+i, true)
		m.Expiration = "30"
		pub.publish("", "ttl.head", false, m)
	}
	for i := range kept {
		pub.publish("", "ttl.head", false, pagedMsg(200+i, true))
	}
	pub.wait()
	// Only the timer drops them: nothing here takes from the queues or counts them.
	pollFor(t, "the expired messages to go", func() bool {
		r1, rq1, p1 := queueParts(b.srv, "ttl.all")
		r2, rq2, p2 := queueParts(b.srv, "ttl.head")
		return r1+rq1+p1 == 0 && r2+rq2 == 0 && p2 == kept
	})
	if k := queueReady(t, ch, "ttl.head"); k != kept {
		t.Fatalf("ttl.head: %d ready, want %d", k, kept)
	}
	if live, held := storeLive(b.srv.store), queueLogHolds(b.srv, "ttl.head"); live != held {
		t.Fatalf("the log counts %d octets live; ttl.head holds %d", live, held)
	}
	logged := loggedPaged(t, b, "ttl.all", "ttl.head")
	if !slices.Equal(logged["ttl.head"], pagedRange(200, 200+kept, 1)) || len(logged["ttl.all"]) != 0 {
		t.Fatalf("the log holds %v for ttl.head and %v for ttl.all; want messages 200 to %d, and none", logged["ttl.head"], logged["ttl.all"], 200+kept-1)
	}
	for _, mode := range []string{"crash", "clean"} {
		b2 := b.restart(mode, cfg)
		ch2 := openChannel(t, dial(t, b2.url))
		checkPagedMessages(t, mode+" restart, ttl.head", getAll(t, ch2, "ttl.head"), pagedRange(200, 200+kept, 1), true)
		checkPagedMessages(t, mode+" restart, ttl.all", getAll(t, ch2, "ttl.all"), nil, true)
		b2.stop()
	}
}

// TestQueuePagingGetConsumeRequeue: basic.get without ack and consumers take turns across
// the boundaries between a queue's messages in memory and its paged ones (the in-memory
// front, and each window read back from the tail), each of them reading windows back, and
// get every message in order, marked redelivered only when requeued. A message requeued
// after it was read back from the tail (the last of its window while the next is still
// paged, by a consumer still there or gone, or three at once) comes back next.
func TestQueuePagingGetConsumeRequeue(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 8 << 10})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("turns", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	const n = 400
	for i := range n {
		pub.publish("", "turns", false, pagedMsg(i, true))
	}
	pub.wait()
	inMem, _, paged := queueParts(b.srv, "turns")
	if inMem < 2 || paged != n-inMem {
		t.Fatalf("%d in memory and %d paged, want a few in memory and the rest paged", inMem, paged)
	}
	c1, c3 := openChannel(t, conn), openChannel(t, conn)
	if err := c1.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c3.Qos(3, 0, false); err != nil {
		t.Fatal(err)
	}

	next := 0       // the next message to come
	requeuedTo := 0 // the messages below it were requeued: they come back redelivered
	want := func(k int) []int { return pagedRange(next, next+k, 1) }
	lastReads, fills := 0, 0
	reads := make(map[string]int) // windows read back from the tail, by basic.get and by consumers
	for step := 0; next < n; step++ {
		r, rq, p := queueParts(b.srv, "turns")
		redelivered := next < requeuedTo
		how := "get"
		switch {
		case r == 1 && rq == 0 && p > 0: // the last message read back is next
			how = []string{"get", "get-requeue", "consume-requeue"}[lastReads%3]
			lastReads++
		case r == 0 && rq == 0 && p > 0: // the next taker reads a window back
			how = []string{"get", "consume"}[fills%2]
			fills++
		case !redelivered && next >= inMem && next%11 == 0 && next+3 <= n:
			how = "consume-three"
		case !redelivered && (next == inMem-1 || next >= inMem && next%7 == 0):
			how = "consume-requeue"
		case step%2 == 1:
			how = "consume"
		}
		switch how {
		case "get":
			checkPagedMessages(t, "get", getN(t, ch, "turns", 1, true), want(1), redelivered)
			next++
		case "get-requeue":
			d := getN(t, ch, "turns", 1, false)
			checkPagedMessages(t, "get to requeue", d, want(1), redelivered)
			d[0].Nack(false, true)
			requeuedTo = next + 1
		case "consume-three":
			// Three out at once, requeued together once the consumer is gone.
			msgs, err := c3.Consume("turns", "c3", false, false, false, false, nil)
			if err != nil {
				t.Fatal(err)
			}
			ds := takeDeliveries(t, msgs, 3)
			checkPagedMessages(t, "consume three", ds, want(3), false)
			if err := c3.Cancel("c3", false); err != nil {
				t.Fatal(err)
			}
			ds[2].Nack(true, true)
			requeuedTo = next + 3
		default:
			msgs, err := c1.Consume("turns", "c1", false, false, false, false, nil)
			if err != nil {
				t.Fatal(err)
			}
			d := takeDelivery(t, msgs)
			checkPagedMessages(t, how, []amqp091.Delivery{d}, want(1), redelivered)
			requeue := how == "consume-requeue"
			if requeue && next%2 == 0 {
				// Requeued with the consumer there: it comes straight back to it.
				d.Nack(false, true)
				d = takeDelivery(t, msgs)
				checkPagedMessages(t, "consume again", []amqp091.Delivery{d}, want(1), true)
			}
			if err := c1.Cancel("c1", false); err != nil {
				t.Fatal(err)
			}
			if requeue && next%2 == 1 {
				d.Nack(false, true) // for whoever takes next
				requeuedTo = next + 1
			} else {
				d.Ack(false)
				next++
			}
		}
		if k := queueReady(t, ch, "turns"); k != n-next { // the settlements before it are done
			t.Fatalf("%d ready with %d taken, want %d", k, next, n-next)
		}
		if _, _, p2 := queueParts(b.srv, "turns"); p2 < p {
			reads[strings.SplitN(how, "-", 2)[0]]++
		}
	}
	if reads["get"] == 0 || reads["consume"] == 0 || lastReads < 3 {
		t.Fatalf("windows read back: %d by basic.get, %d by consumers; %d times the last one read back was next; want at least 1, 1 and 3",
			reads["get"], reads["consume"], lastReads)
	}
	if live := storeLive(b.srv.store); live != 0 {
		t.Fatalf("the log counts %d octets live with the queue empty", live)
	}
}
