package amqp

import (
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Tests of how a queue chooses among its consumers: consumer priorities (x-priority) and
// single active consumer (x-single-active-consumer), with RabbitMQ 3.13's rules and texts.

// consumeArgs starts a manual-ack consumer with these basic.consume arguments.
func consumeArgs(t testing.TB, ch *amqp091.Channel, queue, tag string, args amqp091.Table) <-chan amqp091.Delivery {
	t.Helper()
	msgs, err := ch.Consume(queue, tag, false, false, false, false, args)
	if err != nil {
		t.Fatalf("consume %s as %s: %v", queue, tag, err)
	}
	return msgs
}

// takeBody receives one delivery and checks its body.
func takeBody(t testing.TB, msgs <-chan amqp091.Delivery, want string) amqp091.Delivery {
	t.Helper()
	d := takeDelivery(t, msgs)
	if string(d.Body) != want {
		t.Fatalf("got %q, want %q", d.Body, want)
	}
	return d
}

// ackOne acknowledges d alone.
func ackOne(t testing.TB, d amqp091.Delivery) {
	t.Helper()
	if err := d.Ack(false); err != nil {
		t.Fatalf("ack %q: %v", d.Body, err)
	}
}

// TestConsumerPriority: the consumer of higher x-priority gets every message while it has
// credit; the lower one gets a message only when the higher is out of credit, its prefetch
// full.
func TestConsumerPriority(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	pub := openChannel(t, conn)
	declareTransientQueue(t, pub, "prio")
	consume := func(tag string, priority any) (*amqp091.Channel, <-chan amqp091.Delivery) {
		ch := openChannel(t, conn)
		if err := ch.Qos(1, 0, false); err != nil {
			t.Fatal(err)
		}
		return ch, consumeArgs(t, ch, "prio", tag, amqp091.Table{"x-priority": priority})
	}
	// The low one comes first: arrival order does not outrank priority.
	_, low := consume("low", int32(0))
	_, high := consume("high", int64(10))

	for i := range 5 {
		ackOne(t, takeBody(t, high, publishNumbered(t, pub, "prio", "a", i)))
	}
	expectNoDelivery(t, low)

	// high's one unacked message fills it: the next goes to low, the one after waits.
	h := takeBody(t, high, publishNumbered(t, pub, "prio", "b", 0))
	l := takeBody(t, low, publishNumbered(t, pub, "prio", "b", 1))
	b2 := publishNumbered(t, pub, "prio", "b", 2)
	expectNoDelivery(t, high)
	expectNoDelivery(t, low)
	ackOne(t, h)
	h = takeBody(t, high, b2)
	ackOne(t, l)
	l = takeBody(t, low, publishNumbered(t, pub, "prio", "b", 3)) // high is still full
	ackOne(t, h)
	ackOne(t, l)

}

// publishNumbered publishes prefix+i to queue and returns the body.
func publishNumbered(t testing.TB, ch *amqp091.Channel, queue, prefix string, i int) string {
	t.Helper()
	body := prefix + strconv.Itoa(i)
	publishText(t, ch, "", queue, body)
	return body
}

// TestConsumerPriorityRoundRobin: consumers of equal priority share the messages round-robin
// while a lower one (a negative priority) waits; the lower one receives when no higher one
// can, and once the higher ones have gone. Integers of every width are priorities.
func TestConsumerPriorityRoundRobin(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	pub := openChannel(t, conn)
	declareTransientQueue(t, pub, "prio")
	ch := openChannel(t, conn)
	low := consumeArgs(t, ch, "prio", "low", amqp091.Table{"x-priority": int64(-3)})
	tags := []string{"a", "b", "c"}
	equal := []<-chan amqp091.Delivery{
		consumeArgs(t, ch, "prio", "a", amqp091.Table{"x-priority": int8(5)}),
		consumeArgs(t, ch, "prio", "b", amqp091.Table{"x-priority": int16(5)}),
		consumeArgs(t, ch, "prio", "c", amqp091.Table{"x-priority": byte(5)}),
	}
	for i := range 9 {
		publishNumbered(t, pub, "prio", "m", i)
	}
	for i := range 9 {
		ackOne(t, takeBody(t, equal[i%3], "m"+strconv.Itoa(i)))
	}
	expectNoDelivery(t, low)

	for _, tag := range tags {
		if err := ch.Cancel(tag, false); err != nil {
			t.Fatal(err)
		}
	}
	ackOne(t, takeBody(t, low, publishNumbered(t, pub, "prio", "m", 9)))

	// Two of priority 1 with prefetch 1 each, over low: low gets the third.
	ch2 := openChannel(t, conn)
	if err := ch2.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	x := consumeArgs(t, ch2, "prio", "x", amqp091.Table{"x-priority": int32(1)})
	y := consumeArgs(t, ch2, "prio", "y", amqp091.Table{"x-priority": int32(1)})
	takeBody(t, x, publishNumbered(t, pub, "prio", "n", 0))
	takeBody(t, y, publishNumbered(t, pub, "prio", "n", 1))
	takeBody(t, low, publishNumbered(t, pub, "prio", "n", 2))
}

// TestConsumerPriorityArgument: x-priority must be an integer; anything else is 406 with
// RabbitMQ 3.13's text, and the consumer is not created.
func TestConsumerPriorityArgument(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	pub := openChannel(t, conn)
	declareTransientQueue(t, pub, "prio")
	// A consumer that existed, however briefly, would take this one, and its channel's
	// close would requeue it redelivered.
	if err := pub.Publish("", "prio", false, false, amqp091.Publishing{Body: []byte("bait")}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct {
		v    any
		kind string
	}{{"high", "longstr"}, {1.5, "double"}, {true, "bool"}, {amqp091.Table{}, "table"}} {
		_, err := openChannel(t, conn).Consume("prio", "", false, false, false, false, amqp091.Table{"x-priority": bad.v})
		want := `PRECONDITION_FAILED - invalid arg 'x-priority' for queue 'prio' in vhost '/': "expected integer, got ` + bad.kind + `"`
		if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || e.Reason != want {
			t.Errorf("x-priority %v: %v, want 406 %q", bad.v, err, want)
		}
	}
	if n := queueConsumers(t, conn, "prio"); n != 0 {
		t.Fatalf("%d consumers after refused consumes, want 0", n)
	}
	if d, ok, err := pub.Get("prio", true); err != nil || !ok || d.Redelivered {
		t.Fatalf("the bait after refused consumes: ok %v, redelivered %v, %v; want never delivered", ok, d.Redelivered, err)
	}
	ch := openChannel(t, conn)
	for _, v := range []any{int8(-128), byte(255), int32(-1 << 31), int64(1 << 40)} {
		if _, err := ch.Consume("prio", "", false, false, false, false, amqp091.Table{"x-priority": v}); err != nil {
			t.Fatalf("x-priority %v: %v", v, err)
		}
	}
}

// queueConsumers returns a queue's consumer count from a passive declare.
func queueConsumers(t testing.TB, conn *amqp091.Connection, queue string) int {
	t.Helper()
	q, err := openChannel(t, conn).QueueDeclarePassive(queue, false, false, false, false, nil)
	if err != nil {
		t.Fatalf("passive declare %s: %v", queue, err)
	}
	return q.Consumers
}

// sacArgs declares a queue with single active consumer.
var sacArgs = amqp091.Table{"x-single-active-consumer": true}

// TestSingleActiveConsumer: of three consumers, only the first receives; when its channel
// closes holding 1,000 unacked messages, the second gets all of them, redelivered and in
// their order, and when the second's connection goes, the third. The waiting ones get
// nothing meanwhile.
func TestSingleActiveConsumer(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	pubConn := dial(t, url)
	if _, err := openChannel(t, pubConn).QueueDeclare("sac", false, false, false, false, sacArgs); err != nil {
		t.Fatal(err)
	}
	var conns [3]*amqp091.Connection
	var chans [3]*amqp091.Channel
	var msgs [3]<-chan amqp091.Delivery
	for i := range 3 {
		conns[i] = dial(t, url)
		chans[i] = openChannel(t, conns[i])
		msgs[i] = consumeTagged(t, chans[i], "sac", "c"+strconv.Itoa(i))
	}
	const n = 1000
	pub := newConfirmChannel(t, pubConn)
	for i := range n {
		pub.publish("", "sac", false, amqp091.Publishing{Body: []byte(strconv.Itoa(i))})
	}
	pub.wait()

	takeAll := func(c <-chan amqp091.Delivery, redelivered bool) {
		t.Helper()
		for i := range n {
			d := takeDelivery(t, c)
			if string(d.Body) != strconv.Itoa(i) || d.Redelivered != redelivered {
				t.Fatalf("delivery %d: %q redelivered=%v, want %d redelivered=%v", i, d.Body, d.Redelivered, i, redelivered)
			}
		}
	}
	takeAll(msgs[0], false)
	expectNoDelivery(t, msgs[1])
	expectNoDelivery(t, msgs[2])
	if got := queueReady(t, openChannel(t, pubConn), "sac"); got != 0 {
		t.Fatalf("%d ready while the active consumer holds every message, want 0", got)
	}

	if err := chans[0].Close(); err != nil {
		t.Fatal(err)
	}
	takeAll(msgs[1], true)
	expectNoDelivery(t, msgs[2])

	if err := conns[1].Close(); err != nil {
		t.Fatal(err)
	}
	takeAll(msgs[2], true)
	for i := range n {
		pub.publish("", "sac", false, amqp091.Publishing{Body: []byte(strconv.Itoa(n + i))})
	}
	pub.wait()
	for i := range n {
		takeBody(t, msgs[2], strconv.Itoa(n+i))
	}
}

// TestSingleActiveConsumerHandover: when the active consumer's channel closes while it holds
// the head of the queue, its successor gets that message before the ready ones behind it.
func TestSingleActiveConsumerHandover(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	pub := openChannel(t, conn)
	if _, err := pub.QueueDeclare("sac", false, false, false, false, sacArgs); err != nil {
		t.Fatal(err)
	}
	chA := openChannel(t, conn)
	if err := chA.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	a := consumeTagged(t, chA, "sac", "a")
	b := consumeTagged(t, openChannel(t, conn), "sac", "b")
	for i := range 10 {
		publishNumbered(t, pub, "sac", "m", i)
	}
	takeBody(t, a, "m0")
	pollFor(t, "the rest to be ready", func() bool { return queueReady(t, pub, "sac") == 9 })
	if err := chA.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		d := takeBody(t, b, "m"+strconv.Itoa(i))
		if d.Redelivered != (i == 0) {
			t.Fatalf("m%d redelivered=%v", i, d.Redelivered)
		}
	}
}

// TestSingleActiveConsumerCancel: the first consumer is active whatever the priorities (as
// in RabbitMQ's classic queues); when it is cancelled the next is the one of highest
// priority, then the earliest. A cancelled consumer's unacked messages stay with its
// channel: acked there, or requeued to whoever is active then.
func TestSingleActiveConsumerCancel(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	pub := openChannel(t, conn)
	if _, err := pub.QueueDeclare("sac", false, false, false, false, sacArgs); err != nil {
		t.Fatal(err)
	}
	chA, chB, chC := openChannel(t, conn), openChannel(t, conn), openChannel(t, conn)
	a := consumeArgs(t, chA, "sac", "a", nil)
	b := consumeArgs(t, chB, "sac", "b", amqp091.Table{"x-priority": int32(0)})
	c := consumeArgs(t, chC, "sac", "c", amqp091.Table{"x-priority": int32(10)})

	m0 := takeBody(t, a, publishNumbered(t, pub, "sac", "m", 0))
	expectNoDelivery(t, b)
	expectNoDelivery(t, c)

	if err := chA.Cancel("a", false); err != nil {
		t.Fatal(err)
	}
	m1 := takeBody(t, c, publishNumbered(t, pub, "sac", "m", 1))
	ackOne(t, m0) // after its consumer's cancel
	if _, err := chA.QueueDeclarePassive("sac", false, false, false, false, nil); err != nil {
		t.Fatalf("channel after acking a cancelled consumer's message: %v", err)
	}

	if err := chC.Cancel("c", false); err != nil {
		t.Fatal(err)
	}
	ackOne(t, takeBody(t, b, publishNumbered(t, pub, "sac", "m", 2)))
	if err := m1.Nack(false, true); err != nil {
		t.Fatal(err)
	}
	if d := takeBody(t, b, "m1"); !d.Redelivered {
		t.Fatal("requeued m1 came back not redelivered")
	}
}

// TestSingleActiveConsumerArguments: x-single-active-consumer must be a boolean (406 with
// RabbitMQ's text), takes part in equivalence, and a queue with it refuses exclusive
// consumers with 403 even when it has none.
func TestSingleActiveConsumerArguments(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	for _, bad := range []struct {
		v    any
		kind string
	}{{"yes", "longstr"}, {int32(1), "signedint"}, {int64(1), "long"}} {
		_, err := openChannel(t, conn).QueueDeclare("sac", false, false, false, false, amqp091.Table{"x-single-active-consumer": bad.v})
		want := "PRECONDITION_FAILED - invalid arg 'x-single-active-consumer' for queue 'sac' in vhost '/': {unacceptable_type," + bad.kind + "}"
		if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || e.Reason != want {
			t.Errorf("x-single-active-consumer %v: %v, want 406 %q", bad.v, err, want)
		}
	}
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("sac", false, false, false, false, sacArgs); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("sac", false, false, false, false, sacArgs); err != nil {
		t.Fatalf("equivalent redeclare: %v", err)
	}
	for _, args := range []amqp091.Table{nil, {"x-single-active-consumer": false}} {
		_, err := openChannel(t, conn).QueueDeclare("sac", false, false, false, false, args)
		want := "PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue 'sac' in vhost '/'"
		if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || e.Reason != want {
			t.Errorf("redeclare with %v: %v, want 406 %q", args, err, want)
		}
	}
	_, err := openChannel(t, conn).Consume("sac", "", false, true, false, false, nil)
	want := "ACCESS_REFUSED - queue 'sac' in vhost '/' in exclusive use"
	if e, ok := err.(*amqp091.Error); !ok || e.Code != 403 || e.Reason != want {
		t.Fatalf("exclusive consume: %v, want 403 %q", err, want)
	}
	if _, err := openChannel(t, conn).QueueDeclare("plain", false, false, false, false, amqp091.Table{"x-single-active-consumer": false}); err != nil {
		t.Fatal(err)
	}
	if _, err := openChannel(t, conn).Consume("plain", "", false, true, false, false, nil); err != nil {
		t.Fatalf("exclusive consume where x-single-active-consumer is false: %v", err)
	}
}

// TestSingleActiveConsumerDurable: a durable queue keeps x-single-active-consumer across a
// crash and a clean restart, both for equivalence and for delivery.
func TestSingleActiveConsumerDurable(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	if _, err := openChannel(t, dial(t, b.url)).QueueDeclare("sac", true, false, false, false, sacArgs); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"crash", "clean"} {
		b = b.restart(mode, Config{})
		conn := dial(t, b.url)
		_, err := openChannel(t, conn).QueueDeclare("sac", true, false, false, false, nil)
		if amqpCode(err) != 406 {
			t.Fatalf("%s restart: redeclare without the argument: %v, want 406", mode, err)
		}
		firstCh, secondCh := openChannel(t, conn), openChannel(t, conn)
		first := consumeTagged(t, firstCh, "sac", "first")
		second := consumeTagged(t, secondCh, "sac", "second")
		pub := newConfirmChannel(t, conn)
		for i := range 10 {
			pub.publish("", "sac", false, amqp091.Publishing{DeliveryMode: 2, Body: []byte(strconv.Itoa(i))})
		}
		pub.wait()
		for i := range 10 {
			ackOne(t, takeBody(t, first, strconv.Itoa(i)))
		}
		expectNoDelivery(t, second)
		for _, ch := range []*amqp091.Channel{firstCh, secondCh} {
			if err := ch.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestConsumerTimeout checks RabbitMQ's consumer timeout: a channel whose oldest delivery
// waits for its ack longer than the queue's x-consumer-timeout (or Config.ConsumerTimeout)
// is closed with 406 and RabbitMQ's text, and its message goes to another consumer.
func TestConsumerTimeout(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t, Config{ConsumerTimeout: 300 * time.Millisecond})
	conn := dial(t, url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("slow", false, false, false, false, amqp091.Table{"x-consumer-timeout": int64(200)}); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "default")
	if _, err := ch.QueueDeclare("bad", false, false, false, false, amqp091.Table{"x-consumer-timeout": "soon"}); amqpCode(err) != 406 {
		t.Errorf("x-consumer-timeout \"soon\": %v, want 406", err)
	}
	for _, q := range []string{"slow", "default"} {
		ch = openChannel(t, conn)
		publishText(t, ch, "", q, "job-"+q)
		closed := notifyChannelClose(ch)
		msgs, err := ch.Consume(q, "", false, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		takeDelivery(t, msgs) // and never ack it
		start := time.Now()
		select {
		case e := <-closed:
			want := " timed out. Timeout value used: 200 ms. This timeout value can be configured, see consumers doc guide to learn more"
			if q == "default" {
				want = " timed out. Timeout value used: 300 ms. This timeout value can be configured, see consumers doc guide to learn more"
			}
			if e == nil || e.Code != 406 || !strings.HasPrefix(e.Reason, "PRECONDITION_FAILED - delivery acknowledgement on channel ") || !strings.HasSuffix(e.Reason, want) {
				t.Errorf("%s: closed with %v", q, e)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the channel was not closed after its consumer timeout", q)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s: closed after %v", q, d)
		}
		other := openChannel(t, dial(t, url))
		d := takeDelivery(t, consumeTagged(t, other, q, "next"))
		if string(d.Body) != "job-"+q || !d.Redelivered {
			t.Errorf("%s: the next consumer got %q (redelivered %v), want the timed-out message again", q, d.Body, d.Redelivered)
		}
		d.Ack(false)
	}
}

// TestNoDeliveryAfterCancelOk: basic.cancel-ok is the last frame for its consumer tag,
// while a publisher floods the queue: no basic.deliver with the tag follows it (a client
// drops those, and their messages would stay unacked or, with no-ack, be lost).
func TestNoDeliveryAfterCancelOk(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("cq", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	floodQueue(t, srv, "cq")
	w := dialFrameClient(t, srv)
	w.wait = 5 * time.Second
	for round := 0; round < 20; round++ {
		tag := "c" + string(rune('a'+round%26)) + string(rune('a'+round/26))
		w.send(1, &basicConsume{Queue: "cq", ConsumerTag: tag, NoAck: true})
		cancelled := false
		deliveries := 0
		for {
			f := w.readFrame()
			if f.typ != frameMethod {
				continue
			}
			id, d, _ := methodHeader(f.payload)
			switch id {
			case idBasicConsumeOk:
			case idBasicDeliver:
				m := basicDeliver{}
				m.decode(&d)
				if m.ConsumerTag != tag {
					continue
				}
				if cancelled {
					t.Fatalf("round %d: basic.deliver for %q after its basic.cancel-ok", round, tag)
				}
				deliveries++
				if deliveries == 50 {
					w.send(1, &basicCancel{ConsumerTag: tag})
				}
			case idBasicCancelOk:
				cancelled = true
			}
			if cancelled && deliveries >= 50 {
				// read on a little for stragglers
				w.nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
				for {
					f, err := w.fr.read()
					if err != nil {
						break
					}
					if f.typ == frameMethod {
						if id, d, _ := methodHeader(f.payload); id == idBasicDeliver {
							m := basicDeliver{}
							m.decode(&d)
							if m.ConsumerTag == tag {
								t.Fatalf("round %d: basic.deliver for %q after its basic.cancel-ok", round, tag)
							}
						}
					}
				}
				break
			}
		}
	}
}

// TestNoDeliveryAfterConnectionClose: nothing follows a server's connection.close (the
// management API's force close, a definitions change, a vhost delete), even while a
// publisher's bursts are being dispatched to the connection's no-ack consumer.
func TestNoDeliveryAfterConnectionClose(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("kq", false, false, false, false, amqp091.Table{}); err != nil {
		t.Fatal(err)
	}
	floodQueue(t, srv, "kq")
	after := 0
	for round := 0; round < 100; round++ {
		w := dialFrameClient(t, srv)
		w.wait = 5 * time.Second
		var sc *conn
		srv.mu.Lock()
		for x := range srv.active {
			if x.nc.RemoteAddr().String() == w.nc.LocalAddr().String() {
				sc = x
			}
		}
		srv.mu.Unlock()
		w.send(1, &basicConsume{Queue: "kq", ConsumerTag: "k", NoAck: true})
		n, closed := 0, false
		for {
			w.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
			f, err := w.fr.read()
			if err != nil {
				break
			}
			if f.typ != frameMethod {
				continue
			}
			id, _, _ := methodHeader(f.payload)
			switch id {
			case idBasicDeliver:
				if closed {
					after++
				}
				n++
				if n == 200 {
					go sc.closeWith(newError(replyConnectionForced, "probe"))
				}
			case idConnectionClose:
				closed = true
				w.send(0, &connectionCloseOk{})
			}
		}
		w.nc.Close()
	}
	if after > 0 {
		t.Fatalf("%d basic.deliver frames followed connection.close", after)
	}
}

func TestConsumeServerGeneratedTag(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	w := dialFrameClient(t, srv)
	w.send(1, &queueDeclare{Queue: "q"})
	w.expect(1, idQueueDeclareOk)
	w.send(1, &basicConsume{Queue: "q", NoAck: true})
	tag := w.expect(1, idBasicConsumeOk).(*basicConsumeOk).ConsumerTag
	if !strings.HasPrefix(tag, "amq.ctag-") || len(tag) <= len("amq.ctag-") {
		t.Fatalf("server-generated consumer tag %q, want amq.ctag-…", tag)
	}
	w.publish(1, "", "q", nil, []byte("hello"))
	d := w.expect(1, idBasicDeliver).(*basicDeliver)
	if d.ConsumerTag != tag || d.RoutingKey != "q" || d.Exchange != "" || d.Redelivered {
		t.Fatalf("deliver %+v, want tag %q key q", d, tag)
	}
	if _, body := w.content(); string(body) != "hello" {
		t.Fatalf("body %q, want hello", body)
	}
	// A second consumer gets a different generated tag.
	w.send(1, &basicConsume{Queue: "q", NoAck: true})
	if tag2 := w.expect(1, idBasicConsumeOk).(*basicConsumeOk).ConsumerTag; tag2 == tag || !strings.HasPrefix(tag2, "amq.ctag-") {
		t.Fatalf("second generated tag %q (first %q)", tag2, tag)
	}
}

func TestConsumeDuplicateTag(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q1")
	declareTransientQueue(t, ch, "q2")
	consumeTagged(t, ch, "q1", "same")
	_, err := ch.Consume("q2", "same", false, false, false, false, nil)
	wantReplyCode(t, err, 530)
}

func TestConsumeExclusive(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "shared")
	declareTransientQueue(t, ch, "owned")

	// An exclusive consumer cannot join a queue that has a consumer...
	consumeTagged(t, ch, "shared", "plain")
	ch2 := openChannel(t, c)
	_, err := ch2.Consume("shared", "excl", false, true, false, false, nil)
	wantReplyCode(t, err, 403)

	// ...and nobody joins beside an exclusive consumer, on any connection.
	if _, err := ch.Consume("owned", "excl", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	ch3 := openChannel(t, c)
	_, err = ch3.Consume("owned", "second", false, false, false, false, nil)
	wantReplyCode(t, err, 403)
	other := openChannel(t, dial(t, url))
	_, err = other.Consume("owned", "third", false, true, false, false, nil)
	wantReplyCode(t, err, 403)

	// Once the exclusive consumer is gone, others can attach.
	if err := ch.Cancel("excl", false); err != nil {
		t.Fatal(err)
	}
	ch4 := openChannel(t, c)
	consumeTagged(t, ch4, "owned", "after")
}

func TestConsumeNoAck(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	if err := ch.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	msgs, err := ch.Consume("q", "c", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	// No-ack consumers ignore prefetch and need no ack.
	for i := range 5 {
		if d := takeDelivery(t, msgs); string(d.Body) != strconv.Itoa(i) || d.Redelivered {
			t.Fatalf("delivery %d: %q redelivered=%v", i, d.Body, d.Redelivered)
		}
	}
	// Nothing is held for them: closing the channel requeues nothing.
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	if n := queueReady(t, openChannel(t, c), "q"); n != 0 {
		t.Fatalf("%d messages back in the queue after a no-ack consumer closed, want 0", n)
	}
}

func TestConsumeNoLocal(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	local := dial(t, url)
	ch := openChannel(t, local)
	declareTransientQueue(t, ch, "q")
	msgs, err := ch.Consume("q", "c", true, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	remote := openChannel(t, dial(t, url))
	publishText(t, remote, "", "q", "remote-1")
	if d := takeDelivery(t, msgs); string(d.Body) != "remote-1" {
		t.Fatalf("got %q, want remote-1", d.Body)
	}
	pub := openChannel(t, local)
	publishText(t, pub, "", "q", "local-1")
	// The publish is handled before the declare on the same connection.
	if n := queueReady(t, pub, "q"); n != 1 {
		t.Fatalf("%d ready messages, want the local message kept (1)", n)
	}
	expectNoDelivery(t, msgs)
}

func TestConsumeNoLocalDoesNotBlockLaterMessages(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	local := dial(t, url)
	ch := openChannel(t, local)
	declareTransientQueue(t, ch, "q")
	msgs, err := ch.Consume("q", "c", true, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	publishText(t, openChannel(t, local), "", "q", "local-1")
	publishText(t, openChannel(t, dial(t, url)), "", "q", "remote-1")
	if d := takeDelivery(t, msgs); string(d.Body) != "remote-1" {
		t.Fatalf("got %q, want remote-1", d.Body)
	}
}

func TestBasicCancel(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	msgs := consumeTagged(t, ch, "q", "c")
	publishText(t, ch, "", "q", "one")
	d := takeDelivery(t, msgs)
	if err := ch.Cancel("c", false); err != nil {
		t.Fatal(err)
	}
	select {
	case _, ok := <-msgs:
		if ok {
			t.Fatal("delivery after cancel")
		}
	case <-time.After(recvWait):
		t.Fatal("delivery channel not closed after cancel")
	}
	publishText(t, ch, "", "q", "two")
	if n := queueReady(t, ch, "q"); n != 1 {
		t.Fatalf("%d ready after cancel, want 1", n)
	}
	// A delivery of a cancelled consumer can still be acked.
	if err := d.Ack(false); err != nil {
		t.Fatal(err)
	}
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"two"}) {
		t.Fatalf("queue holds %q, want [two]", got)
	}
}

func TestRoundRobinBetweenConsumers(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	a := consumeTagged(t, ch, "q", "a")
	b := consumeTagged(t, ch, "q", "b")
	const n = 20
	for i := range n {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	var got [2][]int
	for range n {
		select {
		case d := <-a:
			v, _ := strconv.Atoi(string(d.Body))
			got[0] = append(got[0], v)
		case d := <-b:
			v, _ := strconv.Atoi(string(d.Body))
			got[1] = append(got[1], v)
		case <-time.After(recvWait):
			t.Fatalf("timed out; consumers got %v", got)
		}
	}
	for k := range got {
		if len(got[k]) != n/2 {
			t.Fatalf("consumer %d got %v, want every other message", k, got[k])
		}
		for i, v := range got[k] {
			if v != got[k][0]+2*i {
				t.Fatalf("consumer %d got %v, want every other message", k, got[k])
			}
		}
	}
	if got[0][0]+got[1][0] != 1 {
		t.Fatalf("consumers got %v and %v, want one the evens and one the odds", got[0], got[1])
	}
}

// twoConsumersWithPrefetch starts consumers a and b of queue q on one channel with
// basic.qos prefetch (global or per consumer), then publishes ten messages to q on
// another channel, which it returns.
func twoConsumersWithPrefetch(t *testing.T, prefetch int, global bool) (pub *amqp091.Channel, a, b <-chan amqp091.Delivery) {
	t.Helper()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	if err := ch.Qos(prefetch, 0, global); err != nil {
		t.Fatal(err)
	}
	a = consumeTagged(t, ch, "q", "a")
	b = consumeTagged(t, ch, "q", "b")
	pub = openChannel(t, c)
	for i := range 10 {
		publishText(t, pub, "", "q", strconv.Itoa(i))
	}
	return pub, a, b
}

func TestPrefetchPerConsumer(t *testing.T) {
	t.Parallel()
	pub, a, b := twoConsumersWithPrefetch(t, 2, false)
	if n := queueReady(t, pub, "q"); n != 6 {
		t.Fatalf("%d ready, want 6 (two consumers, prefetch 2 each)", n)
	}
	da := []amqp091.Delivery{takeDelivery(t, a), takeDelivery(t, a)}
	takeDelivery(t, b)
	takeDelivery(t, b)
	expectNoDelivery(t, a)
	expectNoDelivery(t, b)

	// One ack gives that consumer, and only it, one more message.
	if err := da[0].Ack(false); err != nil {
		t.Fatal(err)
	}
	takeDelivery(t, a)
	if n := queueReady(t, pub, "q"); n != 5 {
		t.Fatalf("%d ready after one ack, want 5", n)
	}
	expectNoDelivery(t, a)
	expectNoDelivery(t, b)
}

func TestPrefetchGlobal(t *testing.T) {
	t.Parallel()
	pub, a, b := twoConsumersWithPrefetch(t, 3, true)
	if n := queueReady(t, pub, "q"); n != 7 {
		t.Fatalf("%d ready, want 7 (prefetch 3 for the whole channel)", n)
	}
	var got []amqp091.Delivery
	for len(got) < 3 {
		select {
		case d := <-a:
			got = append(got, d)
		case d := <-b:
			got = append(got, d)
		case <-time.After(recvWait):
			t.Fatalf("got %d deliveries, want 3", len(got))
		}
	}
	expectNoDelivery(t, a)
	expectNoDelivery(t, b)
	if err := got[0].Ack(false); err != nil {
		t.Fatal(err)
	}
	if n := queueReady(t, pub, "q"); n != 6 {
		t.Fatalf("%d ready after one ack, want 6", n)
	}
}

func TestQosPrefetchSizeNotImplemented(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	wantReplyCode(t, ch.Qos(1, 4096, false), 540)
	// 540 NOT_IMPLEMENTED is a connection exception.
	pollFor(t, "connection closed after 540", c.IsClosed)
}

// TestGlobalPrefetchAcrossQueues: with a channel-wide prefetch shared by consumers of two
// queues, an ack of queue A's delivery lets queue B's waiting message go out.
func TestGlobalPrefetchAcrossQueues(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "ra")
	declareTransientQueue(t, ch, "rb")
	if err := ch.Qos(1, 0, true); err != nil {
		t.Fatal(err)
	}
	da := consumeTagged(t, ch, "ra", "ca")
	db := consumeTagged(t, ch, "rb", "cb")
	pub := openChannel(t, c)
	publishText(t, pub, "", "ra", "a")
	m := takeDelivery(t, da)
	publishText(t, pub, "", "rb", "b")
	if n := queueReady(t, pub, "rb"); n != 1 {
		t.Fatalf("rb holds %d ready, want 1 (the channel's one credit is taken)", n)
	}
	if err := m.Ack(false); err != nil {
		t.Fatal(err)
	}
	if d := takeDelivery(t, db); string(d.Body) != "b" {
		t.Fatalf("got %q from rb", d.Body)
	}
}

// TestNoDeliveriesAfterConnectionClose: once the server has sent connection.close, its
// queues deliver nothing more to that connection; a no-ack consumer's messages stay queued.
func TestNoDeliveriesAfterConnectionClose(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	w := dialFrameClient(t, srv)
	w.send(1, &queueDeclare{Queue: "dac"})
	w.expect(1, idQueueDeclareOk)
	w.send(1, &basicConsume{Queue: "dac", ConsumerTag: "t", NoAck: true})
	w.expect(1, idBasicConsumeOk)
	w.send(0, &basicQos{}) // a hard error: class basic on channel 0
	w.expect(0, idConnectionClose)

	ch := openChannel(t, dial(t, url))
	for i := 0; i < 5; i++ {
		publishText(t, ch, "", "dac", strconv.Itoa(i))
	}
	if n := queueReady(t, ch, "dac"); n != 5 {
		t.Fatalf("%d messages left of 5: the closing connection's consumer took them", n)
	}
	w.nc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	for {
		f, err := w.fr.read()
		if err != nil {
			break
		}
		if f.typ == frameMethod {
			t.Fatal("a method frame arrived after connection.close")
		}
	}
}

// floodQueue publishes bursts of 256 one-octet messages to queue over a raw connection, as
// fast as the server reads them, until the test ends or 30 s pass.
func floodQueue(t *testing.T, srv *Server, queue string) {
	pub := dialFrameClient(t, srv)
	var burst []byte
	for range 256 {
		burst = appendMethodFrame(burst, 1, &basicPublish{RoutingKey: queue})
		burst = appendContent(burst, 1, []byte{0, 0}, []byte("x"), defaultFrameMax)
	}
	stop, done := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() {
		close(stop)
		pub.nc.Close()
		<-done
	})
	go func() {
		defer close(done)
		for end := time.Now().Add(30 * time.Second); time.Now().Before(end); {
			select {
			case <-stop:
				return
			default:
			}
			pub.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := pub.nc.Write(burst); err != nil {
				return
			}
		}
	}()
}
