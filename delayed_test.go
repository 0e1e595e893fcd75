package amqp

import (
	"encoding/binary"
	"math"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// delayedDeclare declares an x-delayed-message exchange routing as typ.
func delayedDeclare(t *testing.T, ch *amqp091.Channel, name, typ string, durable bool) {
	t.Helper()
	if err := ch.ExchangeDeclare(name, kindDelayed, durable, false, false, false, amqp091.Table{"x-delayed-type": typ}); err != nil {
		t.Fatalf("declare %s: %v", name, err)
	}
}

// delayedQueue declares queue name bound to exchange with key.
func delayedQueue(t *testing.T, ch *amqp091.Channel, name, exchange, key string, durable bool) {
	t.Helper()
	if _, err := ch.QueueDeclare(name, durable, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(name, key, exchange, false, nil); err != nil {
		t.Fatal(err)
	}
}

// publishDelayed publishes body with an x-delay header of delay (nil: none).
func publishDelayed(t *testing.T, ch *amqp091.Channel, exchange, key, body string, delay any, mode uint8) {
	t.Helper()
	p := amqp091.Publishing{Body: []byte(body), DeliveryMode: mode}
	if delay != nil {
		p.Headers = amqp091.Table{"x-delay": delay}
	}
	if err := ch.Publish(exchange, key, false, false, p); err != nil {
		t.Fatalf("publish %s: %v", body, err)
	}
}

// delayedHeld is the number of messages the server holds for delayed exchanges.
func delayedHeld(srv *Server) int { return srv.delays.len() }

// advance moves the scheduler's clock ahead, as if that much time had passed: what falls
// due by then is routed.
func (d *delays) advance(by time.Duration) {
	d.mu.Lock()
	d.offset += by.Milliseconds()
	d.armedAt = 0
	d.armLocked()
	d.mu.Unlock()
}

// TestDelayedDelivery: messages published with x-delay arrive after their delay, in the
// order of their due times (not of publishing), with x-delay negated as a signed int, as
// the plugin marks a message it delayed (whatever type it had: int, long, string); until
// then they are held, not in the queue.
func TestDelayedDelivery(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	delayedDeclare(t, ch, "dx", "direct", false)
	delayedQueue(t, ch, "q", "dx", "k", false)
	msgs, err := ch.Consume("q", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	bodies := []string{"a", "b", "c", "d", "e"}
	delays := map[string]int{"a": 600, "b": 200, "c": 400, "d": 200, "e": 500}
	header := map[string]any{"a": int32(600), "b": int32(200), "c": int64(400), "d": int32(200), "e": "500"}
	for _, body := range bodies {
		publishDelayed(t, ch, "dx", "k", body, header[body], 0)
	}
	pollFor(t, "5 held messages", func() bool { return delayedHeld(srv) == 5 })
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("the queue holds %d messages before their delay, want 0", n)
	}
	var got []string
	for range bodies {
		d := takeDelivery(t, msgs)
		body := string(d.Body)
		got = append(got, body)
		if since := time.Since(start); since < time.Duration(delays[body])*time.Millisecond {
			t.Errorf("%s arrived after %v, before its delay of %d ms", body, since, delays[body])
		}
		if v := d.Headers["x-delay"]; v != int32(-delays[body]) {
			t.Errorf("%s arrived with x-delay %v (%T), want int32 %d", body, v, v, -delays[body])
		}
	}
	if want := []string{"b", "d", "c", "e", "a"}; !slices.Equal(got, want) {
		t.Fatalf("arrived in order %v, want %v (due time, then publish order)", got, want)
	}
	if n := delayedHeld(srv); n != 0 {
		t.Fatalf("%d messages still held", n)
	}
}

// TestDelayedExact: a delay of 200 ms (and one of 50) arrives that long after the publish,
// never earlier, and at most 60 ms later: the broker fires its timer at the due
// millisecond. On a loaded machine the host can hold any goroutine up for longer than
// that, so a late arrival is tried again, up to three times; an early one fails at once.
// Not parallel, so the rest of the suite does not share the CPU with it.
func TestDelayedExact(t *testing.T) {
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	delayedDeclare(t, ch, "dx", "fanout", false)
	delayedQueue(t, ch, "q", "dx", "", false)
	msgs, err := ch.Consume("q", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	const late = 60 * time.Millisecond
	for _, delay := range []int{200, 50} {
		want := time.Duration(delay) * time.Millisecond
		var took []time.Duration
		for len(took) < 3 && (len(took) == 0 || took[len(took)-1] > want+late) {
			start := time.Now()
			publishDelayed(t, ch, "dx", "", "m", delay, 0)
			takeDelivery(t, msgs)
			took = append(took, time.Since(start))
			if d := took[len(took)-1]; d < want-2*time.Millisecond {
				t.Fatalf("a %v delay took %v: early", want, d)
			}
		}
		if d := took[len(took)-1]; d > want+late {
			t.Fatalf("a %v delay took %v, more than %v late, in each of 3 tries", want, took, late)
		}
	}
}

// TestDelayedNoDelay: without x-delay, with 0, a negative one, or one that is not a number
// (a boolean, a string that is no integer) a message is routed at once, as in the plugin;
// a string holding an integer, a float and a decimal (truncated) delay it, as in the plugin.
func TestDelayedNoDelay(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	delayedDeclare(t, ch, "dx", "direct", false)
	delayedQueue(t, ch, "q", "dx", "k", false)
	for i, delay := range []any{nil, int32(0), int32(-5000), int64(-1), true, "soon", []byte("100")} {
		publishDelayed(t, ch, "dx", "k", strconv.Itoa(i), delay, 0)
	}
	publishDelayed(t, ch, "dx", "k", "string", "60000", 0)
	publishDelayed(t, ch, "dx", "k", "float", 60000.9, 0)
	publishDelayed(t, ch, "dx", "k", "decimal", amqp091.Decimal{Scale: 1, Value: 600009}, 0)
	pollFor(t, "the undelayed messages", func() bool { return queueReady(t, ch, "q") == 7 })
	if got := drainText(t, ch, "q"); !slices.Equal(got, []string{"0", "1", "2", "3", "4", "5", "6"}) {
		t.Fatalf("routed at once: %v", got)
	}
	if n := delayedHeld(srv); n != 3 {
		t.Fatalf("%d messages held, want 3 (string, float, decimal delays)", n)
	}
	srv.delays.mu.Lock()
	for _, e := range srv.delays.heap {
		if want := int64(60000); dueGap(e) != want {
			t.Errorf("%s is due %d ms after its publish, want %d", e.m.body(), dueGap(e), want)
		}
	}
	srv.delays.mu.Unlock()
}

// dueGap is how long after now a held message falls due, rounded to seconds, in ms.
func dueGap(e heldMsg) int64 {
	return (e.due - time.Now().UnixMilli() + 500) / 1000 * 1000
}

// TestDelayedDeclareArguments: x-delayed-type is required and must name another exchange
// type (406 with the plugin's texts), and a redeclare must name the same one.
func TestDelayedDeclareArguments(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	for _, c := range []struct {
		args amqp091.Table
		text string
	}{
		{nil, "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type"},
		{amqp091.Table{"x-delayed-type": int32(1)}, "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type"},
		{amqp091.Table{"x-delayed-type": kindDelayed}, "PRECONDITION_FAILED - Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'"},
		{amqp091.Table{"x-delayed-type": "x-consistent-hash"}, "PRECONDITION_FAILED - unknown exchange type 'x-consistent-hash'"},
	} {
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("bad", kindDelayed, false, false, false, false, c.args)
		})
		var e *amqp091.Error
		if amqpCode(err) != 406 || !asError(err, &e) || e.Reason != c.text {
			t.Errorf("declare with %v: %v, want 406 %q", c.args, err, c.text)
		}
	}
	ch := openChannel(t, conn)
	for _, typ := range []string{"direct", "fanout", "topic", "headers"} {
		delayedDeclare(t, ch, "d-"+typ, typ, false)
		delayedDeclare(t, ch, "d-"+typ, typ, false) // an equal redeclare
	}
	for _, c := range []struct {
		typ  string
		args amqp091.Table
		text string
	}{
		{kindDelayed, amqp091.Table{"x-delayed-type": "topic"}, "PRECONDITION_FAILED - inequivalent arg 'x-delayed-type' for exchange 'd-direct' in vhost '/': received topic but current is direct"},
		{kindDelayed, nil, "PRECONDITION_FAILED - inequivalent arg 'x-delayed-type' for exchange 'd-direct' in vhost '/': received none but current is direct"},
		{"direct", nil, "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'd-direct' in vhost '/': received 'direct' but current is 'x-delayed-message'"},
	} {
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("d-direct", c.typ, false, false, false, false, c.args)
		})
		var e *amqp091.Error
		if amqpCode(err) != 406 || !asError(err, &e) || e.Reason != c.text {
			t.Errorf("redeclare as %s %v: %v, want 406 %q", c.typ, c.args, err, c.text)
		}
	}
	if err := ch.ExchangeDeclarePassive("d-direct", kindDelayed, false, false, false, false, nil); err != nil {
		t.Fatalf("passive declare: %v", err)
	}
}

// asError is errors.As for *amqp091.Error.
func asError(err error, e **amqp091.Error) bool {
	v, ok := err.(*amqp091.Error)
	*e = v
	return ok
}

// TestDelayedRoutesAtDueTime: a delayed exchange routes as its x-delayed-type (topic and
// headers here) through the bindings it has when the message falls due: a queue bound
// after the publish gets it, one unbound meanwhile does not; an exchange-to-exchange
// binding and the alternate exchange work then, not at the publish. The messages are held
// for an hour, and the scheduler's clock moved ahead.
func TestDelayedRoutesAtDueTime(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("ae", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	delayedQueue(t, ch, "unrouted", "ae", "", false)
	if err := ch.ExchangeDeclare("dt", kindDelayed, false, false, false, false,
		amqp091.Table{"x-delayed-type": "topic", "alternate-exchange": "ae"}); err != nil {
		t.Fatal(err)
	}
	delayedQueue(t, ch, "early", "dt", "a.*", false)
	delayedDeclare(t, ch, "dh", "headers", false)
	if err := ch.ExchangeBind("dh", "to.h", "dt", false, nil); err != nil {
		t.Fatal(err)
	}
	publishDelayed(t, ch, "dt", "a.b", "topic", int32(3_600_000), 0)
	publishDelayed(t, ch, "dt", "x.y", "nowhere", int32(3_600_000), 0)
	for _, x := range []string{"dh", "dt"} {
		if err := ch.Publish(x, "to.h", false, false, amqp091.Publishing{Body: []byte(x),
			Headers: amqp091.Table{"x-delay": int32(3_600_000), "kind": "h"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Bound and unbound after the publish, before the due time.
	delayedQueue(t, ch, "late", "dt", "#.b", false)
	if _, err := ch.QueueDeclare("hq", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("hq", "", "dh", false, amqp091.Table{"x-match": "all", "kind": "h"}); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueUnbind("early", "a.*", "dt", nil); err != nil {
		t.Fatal(err)
	}
	if n := queueReady(t, ch, "unrouted"); n != 0 {
		t.Fatalf("the alternate exchange took %d messages at the publish, want 0", n)
	}
	if n := delayedHeld(srv); n != 4 {
		t.Fatalf("%d messages held, want 4", n)
	}
	srv.delays.advance(time.Hour)
	pollFor(t, "the due messages", func() bool {
		return queueReady(t, ch, "late") == 1 && queueReady(t, ch, "unrouted") == 1 && queueReady(t, ch, "hq") == 2
	})
	for q, want := range map[string][]string{"late": {"topic"}, "unrouted": {"nowhere"}, "early": nil} {
		if got := drainText(t, ch, q); !slices.Equal(got, want) {
			t.Errorf("queue %s holds %v, want %v", q, got, want)
		}
	}
	// hq: one published to dh, and one through dt → dh (held once, by dt: when it falls due
	// its x-delay is negative, so dh routes it at once).
	if got := drainText(t, ch, "hq"); !slices.Equal(got, []string{"dh", "dt"}) {
		t.Errorf("hq holds %v, want dh and dt", got)
	}
}

// TestDelayedDeadLettered: a message dead-lettered into a delayed exchange with a positive
// x-delay is held as well (a retry with a delay), then arrives with its death recorded.
func TestDelayedDeadLettered(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	delayedDeclare(t, ch, "retry", "direct", false)
	delayedQueue(t, ch, "again", "retry", "work", false)
	if _, err := ch.QueueDeclare("work", false, false, false, false, amqp091.Table{"x-dead-letter-exchange": "retry"}); err != nil {
		t.Fatal(err)
	}
	publishDelayed(t, ch, "", "work", "retried", int32(100), 0)
	d, ok, err := ch.Get("work", false)
	if err != nil || !ok {
		t.Fatalf("get: %v %v", ok, err)
	}
	rejected := time.Now()
	d.Reject(false)
	msgs, err := ch.Consume("again", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	d = takeDelivery(t, msgs)
	if since := time.Since(rejected); since < 90*time.Millisecond {
		t.Fatalf("the dead-lettered message arrived %v after the reject, before its delay", since)
	}
	if d.Headers["x-delay"] != int32(-100) || d.Headers["x-first-death-reason"] != "rejected" {
		t.Fatalf("headers %v, want x-delay -100 and the death", d.Headers)
	}
}

// TestDelayedBeyond32Bits: a delay above 2^32-1 ms (the plugin's limit, beyond which it
// routes at once) is held for that long.
func TestDelayedBeyond32Bits(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	delayedDeclare(t, ch, "dx", "fanout", false)
	delayedQueue(t, ch, "q", "dx", "", false)
	delay := int64(1)<<32 + 1000
	before := time.Now().UnixMilli()
	publishDelayed(t, ch, "dx", "", "later", delay, 0)
	publishDelayed(t, ch, "dx", "", "never", int64(math.MaxInt64), 0)
	pollFor(t, "two held messages", func() bool { return delayedHeld(srv) == 2 })
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("the queue holds %d messages, want 0", n)
	}
	srv.delays.mu.Lock()
	first := srv.delays.heap[0]
	srv.delays.mu.Unlock()
	if string(first.m.body()) != "later" || first.due < before+delay || first.due > time.Now().UnixMilli()+delay+1 { // +1: publish times round up
		t.Fatalf("first held %q due %d, want later due %d+", first.m.body(), first.due, before+delay)
	}
}

// TestDelayedManyHeld: 100,000 held messages start no goroutine (nor timer) each, and
// deleting their exchange drops them. Not parallel: it counts the process's goroutines.
func TestDelayedManyHeld(t *testing.T) {
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	delayedDeclare(t, ch, "dx", "direct", false)
	delayedQueue(t, ch, "q", "dx", "k", false)
	w := dialFrameClient(t, srv)
	before := runtime.NumGoroutine()
	const n = 100_000
	var buf []byte
	var props [1000][]byte // an hour, and up to a second more
	for i := range props {
		props[i] = (&properties{Headers: table{"x-delay": int32(3_600_000 + i)}}).encode(nil)
	}
	publish := appendMethodFrame(nil, 1, &basicPublish{Exchange: "dx", RoutingKey: "k"})
	var body [4]byte
	for i := range n {
		binary.BigEndian.PutUint32(body[:], uint32(i))
		buf = appendContent(append(buf, publish...), 1, props[i%len(props)], body[:], defaultFrameMax)
		if len(buf) > 256<<10 || i == n-1 {
			w.write(buf)
			buf = buf[:0]
		}
	}
	pollFor(t, "every message held", func() bool { return delayedHeld(srv) == n })
	if after := runtime.NumGoroutine(); after > before+20 {
		t.Fatalf("%d goroutines with %d messages held, %d before", after, n, before)
	}
	srv.delays.mu.Lock()
	armed := srv.delays.timer != nil && srv.delays.armedAt == srv.delays.heap[0].due
	srv.delays.mu.Unlock()
	if !armed {
		t.Fatal("the one timer is not set for the earliest message")
	}
	if err := ch.ExchangeDelete("dx", false, false); err != nil {
		t.Fatal(err)
	}
	if h := delayedHeld(srv); h != 0 {
		t.Fatalf("%d messages held after the exchange was deleted", h)
	}
}

// TestDelayedConfirmsAndMandatory: a held message is confirmed once it is held (a
// persistent one to a durable exchange once it is on disk), and a mandatory one is not
// returned even when nothing is bound (whether it routes is known only when it falls due;
// the plugin returns every one 312 at once, even those it delivers later). A message routed
// at once is returned as from any exchange.
func TestDelayedConfirmsAndMandatory(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	conn := dial(t, url)
	ch := openChannel(t, conn)
	delayedDeclare(t, ch, "dx", "direct", true)
	pub := newConfirmChannel(t, conn)
	for _, mode := range []uint8{amqp091.Transient, amqp091.Persistent} {
		pub.publish("dx", "nobody", true, amqp091.Publishing{DeliveryMode: mode, Headers: amqp091.Table{"x-delay": int32(60_000)}, Body: []byte("held")})
	}
	pub.wait()
	if n := delayedHeld(srv); n != 2 {
		t.Fatalf("%d messages held after their confirms, want 2", n)
	}
	select {
	case r := <-pub.returns:
		t.Fatalf("a held message was returned: %d %s", r.ReplyCode, r.ReplyText)
	case <-time.After(100 * time.Millisecond):
	}
	pub.publish("dx", "nobody", true, amqp091.Publishing{Body: []byte("now")})
	pub.wait()
	select {
	case r := <-pub.returns:
		if r.ReplyCode != 312 || string(r.Body) != "now" {
			t.Fatalf("returned %d %q, want 312 now", r.ReplyCode, r.Body)
		}
	case <-time.After(recvWait):
		t.Fatal("an unroutable message without delay was not returned")
	}
}

// TestDelayedAcrossCrash: a persistent message held by a durable delayed exchange survives
// a crash and falls due at its original time; one due while the broker was down is routed
// right after the start. A transient message, and a persistent one held by a transient
// exchange, are memory only. Deleting the exchange drops its held messages from the log.
func TestDelayedAcrossCrash(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	delayedDeclare(t, ch, "dx", "direct", true)
	delayedDeclare(t, ch, "tx", "direct", false)
	delayedDeclare(t, ch, "gone", "direct", true)
	delayedQueue(t, ch, "dq", "dx", "k", true)
	delayedQueue(t, ch, "dq", "tx", "k", true)
	delayedQueue(t, ch, "dq", "gone", "k", true)
	pub := newConfirmChannel(t, conn)
	msg := func(body string, delay int32, mode uint8) amqp091.Publishing {
		return amqp091.Publishing{DeliveryMode: mode, Headers: amqp091.Table{"x-delay": delay}, Body: []byte(body)}
	}
	published := time.Now()
	pub.publish("dx", "k", false, msg("exact", 1500, amqp091.Persistent))
	pub.publish("dx", "k", false, msg("overdue", 200, amqp091.Persistent))
	pub.publish("dx", "k", false, msg("transient", 200, amqp091.Transient))
	pub.publish("tx", "k", false, msg("transient exchange", 200, amqp091.Persistent))
	pub.publish("gone", "k", false, msg("deleted", 200, amqp091.Persistent))
	pub.wait()
	if err := ch.ExchangeDelete("gone", false, false); err != nil {
		t.Fatal(err)
	}
	img := b.crashImage()
	// Start again once "overdue" is due, and late enough that a delay started again at the
	// restart would show.
	time.Sleep(time.Until(published.Add(time.Second)))
	b2 := startDurable(t, Config{DataDir: img})
	ch2 := openChannel(t, dial(t, b2.url))
	msgs, err := ch2.Consume("dq", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := takeDelivery(t, msgs); string(d.Body) != "overdue" || d.Headers["x-delay"] != int32(-200) {
		t.Fatalf("first after the restart: %q %v, want overdue with x-delay -200", d.Body, d.Headers)
	}
	d := takeDelivery(t, msgs)
	took := time.Since(published)
	if string(d.Body) != "exact" {
		t.Fatalf("second after the restart: %q, want exact", d.Body)
	}
	if took < 1490*time.Millisecond || took > 2200*time.Millisecond { // started again: 2500+
		t.Fatalf("a 1500 ms delay across a crash took %v", took)
	}
	expectNoDelivery(t, msgs)
	if n := delayedHeld(b2.srv); n != 0 {
		t.Fatalf("%d messages still held", n)
	}
}

// TestDelayedCrashAroundDue: crash images taken while persistent held messages fall due
// into a durable queue hold each message exactly once after a restart: held (and routed
// then) or in the queue, never both and never neither.
func TestDelayedCrashAroundDue(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	delayedDeclare(t, ch, "dx", "direct", true)
	delayedQueue(t, ch, "dq", "dx", "k", true)
	pub := newConfirmChannel(t, conn)
	const n = 300
	start := time.Now()
	for i := range n {
		pub.publish("dx", "k", false, amqp091.Publishing{DeliveryMode: amqp091.Persistent,
			Headers: amqp091.Table{"x-delay": int32(100 + i)}, Body: []byte(strconv.Itoa(i))})
	}
	pub.wait()
	var images []string
	for _, at := range []time.Duration{150, 250, 350} {
		time.Sleep(time.Until(start.Add(at * time.Millisecond)))
		images = append(images, b.crashImage())
	}
	for k, img := range images {
		b2 := startDurable(t, Config{DataDir: img})
		pollFor(t, "every held message to fall due", func() bool { return delayedHeld(b2.srv) == 0 })
		got := walBodies(getAll(t, openChannel(t, dial(t, b2.url)), "dq"))
		slices.SortFunc(got, func(a, b string) int { x, _ := strconv.Atoi(a); y, _ := strconv.Atoi(b); return x - y })
		if len(got) != n || len(slices.Compact(slices.Clone(got))) != n {
			t.Fatalf("image %d: the queue holds %d messages (%d distinct), want each of %d once", k, len(got), len(slices.Compact(got)), n)
		}
		b2.stop()
	}
}
