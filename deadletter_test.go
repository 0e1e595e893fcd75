package amqp

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// dlxDeclare declares a fanout dead-letter exchange "dlx" bound to queue "dlq".
func dlxDeclare(t *testing.T, ch *amqp091.Channel, durable bool) {
	t.Helper()
	if err := ch.ExchangeDeclare("dlx", "fanout", durable, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("dlq", durable, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("dlq", "", "dlx", false, nil); err != nil {
		t.Fatal(err)
	}
}

// dlxSetup declares what dlxDeclare does, and returns a consumer on dlq.
func dlxSetup(t *testing.T, ch *amqp091.Channel, durable bool) <-chan amqp091.Delivery {
	t.Helper()
	dlxDeclare(t, ch, durable)
	msgs, err := ch.Consume("dlq", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

// deaths returns a delivery's x-death entries, newest first.
func deaths(t *testing.T, d amqp091.Delivery) []amqp091.Table {
	t.Helper()
	raw, ok := d.Headers["x-death"].([]any)
	if !ok {
		t.Fatalf("no x-death array in %v", d.Headers)
	}
	var out []amqp091.Table
	for _, v := range raw {
		e, ok := v.(amqp091.Table)
		if !ok {
			t.Fatalf("x-death entry %T, want a table", v)
		}
		out = append(out, e)
	}
	return out
}

// checkDeath checks one x-death entry's queue, reason, count and exchange.
func checkDeath(t *testing.T, e amqp091.Table, queue, reason string, count int64, exchange string) {
	t.Helper()
	if e["queue"] != queue || e["reason"] != reason || e["count"] != count || e["exchange"] != exchange {
		t.Fatalf("x-death entry %v, want queue %q reason %q count %d exchange %q", e, queue, reason, count, exchange)
	}
	if _, ok := e["time"].(time.Time); !ok {
		t.Fatalf("x-death time %T, want a timestamp", e["time"])
	}
}

// TestDeadLetterRejected: a message rejected without requeue goes to the queue's
// dead-letter exchange with RabbitMQ's headers: x-death with one entry, the first- and
// last-death headers; its body and properties otherwise unchanged. A requeue does not
// dead-letter, and a nack without requeue does.
func TestDeadLetterRejected(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	dead := dlxSetup(t, ch, false)
	if _, err := ch.QueueDeclare("work", false, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx"}); err != nil {
		t.Fatal(err)
	}
	cons := openChannel(t, c)
	msgs, err := cons.Consume("work", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Publish("", "work", false, false, amqp091.Publishing{Body: []byte("one"), MessageId: "m1", Headers: amqp091.Table{"app": "x"}}); err != nil {
		t.Fatal(err)
	}
	d := takeDelivery(t, msgs)
	d.Reject(true) // requeued: not dead
	d = takeDelivery(t, msgs)
	d.Reject(false)
	got := takeDelivery(t, dead)
	if string(got.Body) != "one" || got.MessageId != "m1" || got.Headers["app"] != "x" {
		t.Fatalf("dead-lettered %q id %q headers %v, want the message unchanged", got.Body, got.MessageId, got.Headers)
	}
	if got.Exchange != "dlx" || got.RoutingKey != "work" {
		t.Fatalf("delivered from exchange %q key %q, want dlx and the original key", got.Exchange, got.RoutingKey)
	}
	ds := deaths(t, got)
	if len(ds) != 1 {
		t.Fatalf("%d x-death entries, want 1", len(ds))
	}
	checkDeath(t, ds[0], "work", "rejected", 1, "")
	if keys, _ := ds[0]["routing-keys"].([]any); len(keys) != 1 || keys[0] != "work" {
		t.Fatalf("routing-keys %v, want [work]", ds[0]["routing-keys"])
	}
	for k, want := range map[string]string{"x-first-death-reason": "rejected", "x-first-death-queue": "work", "x-first-death-exchange": "",
		"x-last-death-reason": "rejected", "x-last-death-queue": "work", "x-last-death-exchange": ""} {
		if got.Headers[k] != want {
			t.Errorf("%s = %v, want %q", k, got.Headers[k], want)
		}
	}

	if err := ch.Publish("", "work", false, false, amqp091.Publishing{Body: []byte("two")}); err != nil {
		t.Fatal(err)
	}
	takeDelivery(t, msgs).Nack(false, false)
	if got := takeDelivery(t, dead); string(got.Body) != "two" {
		t.Fatalf("nacked message: got %q", got.Body)
	}
}

// TestDeadLetterExpired: expired messages are dead-lettered (reason expired) from a queue
// nobody consumes, with the per-message expiration moved into original-expiration and the
// expiration property removed; x-dead-letter-routing-key replaces the routing key.
func TestDeadLetterExpired(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("dlx", "direct", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("dlq", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("dlq", "dead", "dlx", false, nil); err != nil {
		t.Fatal(err)
	}
	dead, err := ch.Consume("dlq", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	args := amqp091.Table{"x-dead-letter-exchange": "dlx", "x-dead-letter-routing-key": "dead", "x-message-ttl": int32(30)}
	if _, err := ch.QueueDeclare("short", false, false, false, false, args); err != nil {
		t.Fatal(err)
	}
	if err := ch.Publish("", "short", false, false, amqp091.Publishing{Body: []byte("a"), Expiration: "10", Headers: amqp091.Table{"CC": []any{"elsewhere"}}}); err != nil {
		t.Fatal(err)
	}
	got := takeDelivery(t, dead)
	if got.Expiration != "" || got.RoutingKey != "dead" {
		t.Fatalf("expiration %q routing key %q, want none and the dead-letter key", got.Expiration, got.RoutingKey)
	}
	if _, ok := got.Headers["CC"]; ok {
		t.Fatal("CC kept though x-dead-letter-routing-key is set")
	}
	ds := deaths(t, got)
	checkDeath(t, ds[0], "short", "expired", 1, "")
	if ds[0]["original-expiration"] != "10" {
		t.Fatalf("original-expiration %v, want \"10\"", ds[0]["original-expiration"])
	}
	if keys, _ := ds[0]["routing-keys"].([]any); len(keys) != 2 || keys[0] != "short" || keys[1] != "elsewhere" {
		t.Fatalf("routing-keys %v, want [short elsewhere] (CC included)", ds[0]["routing-keys"])
	}
}

// TestDeadLetterRetryLoop: the usual delayed-retry loop, a work queue dead-lettering to a
// delay queue whose TTL dead-letters back: three rejections give x-death counts of 3 for
// each (queue, reason), newest first, and the consumer then parks the message.
func TestDeadLetterRetryLoop(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	for _, x := range []string{"work.x", "retry.x"} {
		if err := ch.ExchangeDeclare(x, "fanout", false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, q := range []struct {
		name, bind string
		args       amqp091.Table
	}{
		{"work", "work.x", amqp091.Table{"x-dead-letter-exchange": "retry.x"}},
		{"delay", "retry.x", amqp091.Table{"x-dead-letter-exchange": "work.x", "x-message-ttl": int32(20)}},
		{"parking", "", nil},
	} {
		if _, err := ch.QueueDeclare(q.name, false, false, false, false, q.args); err != nil {
			t.Fatal(err)
		}
		if q.bind != "" {
			if err := ch.QueueBind(q.name, "", q.bind, false, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	msgs, err := openChannel(t, dial(t, url)).Consume("work", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Publish("work.x", "job", false, false, amqp091.Publishing{Body: []byte("job")}); err != nil {
		t.Fatal(err)
	}
	for round := 0; ; round++ {
		d := takeDelivery(t, msgs)
		if round == 3 {
			ds := deaths(t, d)
			if len(ds) != 2 {
				t.Fatalf("%d x-death entries after 3 rounds, want 2", len(ds))
			}
			checkDeath(t, ds[0], "delay", "expired", 3, "retry.x")
			checkDeath(t, ds[1], "work", "rejected", 3, "work.x")
			if d.Headers["x-first-death-queue"] != "work" || d.Headers["x-last-death-queue"] != "delay" {
				t.Fatalf("first/last death queues %v/%v, want work/delay", d.Headers["x-first-death-queue"], d.Headers["x-last-death-queue"])
			}
			if err := ch.Publish("", "parking", false, false, amqp091.Publishing{Body: d.Body, Headers: d.Headers}); err != nil {
				t.Fatal(err)
			}
			d.Ack(false)
			break
		}
		d.Reject(false)
	}
	pollFor(t, "the parked message", func() bool { return queueReady(t, ch, "parking") == 1 })
}

// TestDeadLetterExpiryCycle: two queues whose TTLs dead-letter into each other do not
// spin: the message is dropped when it would return to a queue it expired in with no
// rejection since, and that is logged once.
func TestDeadLetterExpiryCycle(t *testing.T) {
	t.Parallel()
	var logs lockedBuffer
	srv, url := newTestServer(t, Config{Logger: logs.logger()})
	ch := openChannel(t, dial(t, url))
	for _, q := range []struct{ name, next string }{{"a", "b"}, {"b", "a"}} {
		// The default exchange routes by queue name: the routing key picks the next queue.
		args := amqp091.Table{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": q.next, "x-message-ttl": int32(10)}
		if _, err := ch.QueueDeclare(q.name, false, false, false, false, args); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		if err := ch.Publish("", "a", false, false, amqp091.Publishing{Body: []byte("spin")}); err != nil {
			t.Fatal(err)
		}
	}
	pollFor(t, "the cycle to drop the messages", func() bool {
		srv.dead.wait()
		return queueReady(t, ch, "a") == 0 && queueReady(t, ch, "b") == 0 && strings.Contains(logs.String(), "cycle")
	})
	if n := strings.Count(logs.String(), "close a cycle"); n != 1 {
		t.Fatalf("the cycle was logged %d times, want once:\n%s", n, logs.String())
	}
}

// TestDeadLetterMaxLength: drop-head dead-letters the oldest (reason maxlen);
// reject-publish-dlx nacks the new message and dead-letters it.
func TestDeadLetterMaxLength(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	dead := dlxSetup(t, ch, false)
	if _, err := ch.QueueDeclare("head", false, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx", "x-max-length": int32(2)}); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"1", "2", "3"} {
		if err := ch.Publish("", "head", false, false, amqp091.Publishing{Body: []byte(b)}); err != nil {
			t.Fatal(err)
		}
	}
	got := takeDelivery(t, dead)
	if string(got.Body) != "1" {
		t.Fatalf("drop-head dead-lettered %q, want the oldest", got.Body)
	}
	checkDeath(t, deaths(t, got)[0], "head", "maxlen", 1, "")

	args := amqp091.Table{"x-dead-letter-exchange": "dlx", "x-max-length": int32(1), "x-overflow": "reject-publish-dlx"}
	if _, err := ch.QueueDeclare("tail", false, false, false, false, args); err != nil {
		t.Fatal(err)
	}
	pub := openChannel(t, c)
	if err := pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := pub.NotifyPublish(make(chan amqp091.Confirmation, 2))
	for _, b := range []string{"kept", "refused"} {
		if err := pub.Publish("", "tail", false, false, amqp091.Publishing{Body: []byte(b)}); err != nil {
			t.Fatal(err)
		}
	}
	if first, second := <-confirms, <-confirms; !first.Ack || second.Ack {
		t.Fatalf("confirms %v %v, want ack then nack", first, second)
	}
	got = takeDelivery(t, dead)
	if string(got.Body) != "refused" {
		t.Fatalf("reject-publish-dlx dead-lettered %q, want the refused one", got.Body)
	}
	checkDeath(t, deaths(t, got)[0], "tail", "maxlen", 1, "")
}

// TestDeadLetterArguments: RabbitMQ's 406s for malformed dead-letter arguments, and a
// dead-letter exchange that does not exist drops messages with one log line.
func TestDeadLetterArguments(t *testing.T) {
	t.Parallel()
	var logs lockedBuffer
	srv, url := newTestServer(t, Config{Logger: logs.logger()})
	c := dial(t, url)
	for _, bad := range []struct {
		args amqp091.Table
		want string
	}{
		{amqp091.Table{"x-dead-letter-exchange": int32(5)}, "invalid arg 'x-dead-letter-exchange' for queue 'bad' in vhost '/': {unacceptable_type,signedint}"},
		{amqp091.Table{"x-dead-letter-routing-key": "k"}, "invalid arg 'x-dead-letter-routing-key' for queue 'bad' in vhost '/': routing_key_but_no_dlx_defined"},
	} {
		_, err := openChannel(t, c).QueueDeclare("bad", false, false, false, false, bad.args)
		if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || e.Reason != "PRECONDITION_FAILED - "+bad.want {
			t.Errorf("%v: %v, want 406 %q", bad.args, err, bad.want)
		}
	}
	ch := openChannel(t, c)
	if _, err := ch.QueueDeclare("lost", false, false, false, false, amqp091.Table{"x-dead-letter-exchange": "nowhere", "x-message-ttl": int32(1)}); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if err := ch.Publish("", "lost", false, false, amqp091.Publishing{Body: []byte("x")}); err != nil {
			t.Fatal(err)
		}
	}
	pollFor(t, "the messages to expire", func() bool { srv.dead.wait(); return queueReady(t, ch, "lost") == 0 })
	srv.dead.wait()
	if n := strings.Count(logs.String(), "dead-letter exchange does not exist"); n != 1 {
		t.Fatalf("a missing dead-letter exchange logged %d times, want once", n)
	}
}

// TestDeadLetterDurableAcrossCrash: a persistent message dead-lettered from a durable queue
// into a durable one is, after a crash, in the dead-letter queue only, with its headers;
// so are paged messages that expire (PageOutBytes 1: every message is on disk).
func TestDeadLetterDurableAcrossCrash(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	dlxDeclare(t, ch, true)
	for _, q := range []struct {
		name string
		args amqp091.Table
	}{{"work", amqp091.Table{"x-dead-letter-exchange": "dlx"}}, {"ttl", amqp091.Table{"x-dead-letter-exchange": "dlx", "x-message-ttl": int32(20)}}} {
		if _, err := ch.QueueDeclare(q.name, true, false, false, false, q.args); err != nil {
			t.Fatal(err)
		}
	}
	pub := newConfirmChannel(t, conn)
	pub.publish("", "work", false, amqp091.Publishing{DeliveryMode: 2, Body: []byte("rejected")})
	for range 10 {
		pub.publish("", "ttl", false, amqp091.Publishing{DeliveryMode: 2, Body: bytes.Repeat([]byte("e"), 100)})
	}
	pub.wait()
	d, ok, err := ch.Get("work", false)
	if err != nil || !ok {
		t.Fatalf("get: %v %v", ok, err)
	}
	d.Reject(false)
	pollFor(t, "the dead-letter queue to hold all 11", func() bool {
		b.srv.dead.wait()
		return queueReady(t, ch, "dlq") == 11
	})
	b2 := b.restart("crash", Config{})
	ch2 := openChannel(t, dial(t, b2.url))
	if n := queueReady(t, ch2, "work"); n != 0 {
		t.Fatalf("work holds %d messages after the crash, want 0", n)
	}
	if n := queueReady(t, ch2, "ttl"); n != 0 {
		t.Fatalf("ttl holds %d messages after the crash, want 0", n)
	}
	got := getAll(t, ch2, "dlq")
	if len(got) != 11 {
		t.Fatalf("dlq holds %d messages after the crash, want 11", len(got))
	}
	reasons := map[string]int{}
	for _, d := range got {
		reasons[deaths(t, d)[0]["reason"].(string)]++
	}
	if reasons["rejected"] != 1 || reasons["expired"] != 10 {
		t.Fatalf("reasons %v, want 1 rejected and 10 expired", reasons)
	}
}

// TestDeliveryLimit: a message returned unacked more often than x-delivery-limit is
// dead-lettered with reason delivery_limit (dropped without a dead-letter exchange); until
// then each redelivery carries its count in x-delivery-count. A negative limit is 406.
func TestDeliveryLimit(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	dead := dlxSetup(t, ch, false)
	for _, q := range []struct {
		name string
		args amqp091.Table
	}{{"poison", amqp091.Table{"x-delivery-limit": int32(2), "x-dead-letter-exchange": "dlx"}}, {"dropped", amqp091.Table{"x-delivery-limit": int64(0)}}} {
		if _, err := ch.QueueDeclare(q.name, false, false, false, false, q.args); err != nil {
			t.Fatal(err)
		}
		if err := ch.Publish("", q.name, false, false, amqp091.Publishing{Body: []byte(q.name)}); err != nil {
			t.Fatal(err)
		}
	}
	msgs, err := openChannel(t, c).Consume("poison", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for want := int64(0); want <= 2; want++ {
		d := takeDelivery(t, msgs)
		if got, _ := d.Headers["x-delivery-count"].(int64); got != want || d.Redelivered != (want > 0) {
			t.Fatalf("delivery %d: x-delivery-count %v redelivered %v", want, d.Headers["x-delivery-count"], d.Redelivered)
		}
		d.Nack(false, true)
	}
	got := takeDelivery(t, dead)
	checkDeath(t, deaths(t, got)[0], "poison", "delivery_limit", 1, "")

	d, ok, err := ch.Get("dropped", false)
	if err != nil || !ok {
		t.Fatalf("get: %v %v", ok, err)
	}
	d.Nack(false, true)
	if n := queueReady(t, ch, "dropped"); n != 0 {
		t.Fatalf("%d messages left after a return past x-delivery-limit 0, want 0", n)
	}
	_, err = openChannel(t, c).QueueDeclare("bad", false, false, false, false, amqp091.Table{"x-delivery-limit": int32(-1)})
	if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || !strings.Contains(e.Reason, "{value_negative,-1}") {
		t.Fatalf("x-delivery-limit -1: %v, want 406", err)
	}
}

// TestDeadLetterExpiredUnwrittenHeadDoesNotSpin: a durable queue with a dead-letter exchange and a
// consumer, every message paged (PageOutBytes 1), messages expiring at once
// (x-message-ttl 0). When the head of the paged tail has expired but its log record is
// still in the writer's next batch, deliverLocked loops on expireLocked+continue forever.
// On the log's writer (batchDone -> q.dispatch) that record is never written: the log
// stops for good.
func TestDeadLetterExpiredUnwrittenHeadDoesNotSpin(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	dlxDeclare(t, ch, true)
	if _, err := ch.QueueDeclare("src", true, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx", "x-message-ttl": int32(0)}); err != nil {
		t.Fatal(err)
	}
	cons := openChannel(t, conn)
	cons.Qos(1, 0, false)
	if _, err := cons.Consume("src", "", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	pubConn := dial(t, b.url)
	pub := openChannel(t, pubConn)
	body := bytes.Repeat([]byte("x"), 200)
	stop := make(chan struct{})
	go func() {
		for range 10_000 {
			select {
			case <-stop:
				return
			default:
			}
			if pub.Publish("", "src", false, false, amqp091.Publishing{DeliveryMode: 2, Body: body}) != nil {
				return
			}
		}
	}()
	defer close(stop)
	for i := 0; i < 5; i++ {
		time.Sleep(100 * time.Millisecond)
		done := make(chan error, 1)
		go func() { done <- b.srv.store.sync() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			// Not t.Fatalf: the deadlocked broker would hang the test's cleanup.
			panic("the log's writer no longer completes batches (round " + strconv.Itoa(i) + ")")
		}
	}
}

// TestDeadLetterExpiringPagedBacklogStaysOnDisk: a paged backlog that expires into a
// dead-letter exchange is read back a bounded number of messages at a time, not whole:
// paging's memory bound holds while it is dead-lettered.
func TestDeadLetterExpiringPagedBacklogStaysOnDisk(t *testing.T) {
	t.Parallel()
	const pageOut = 64 << 10
	b := startDurable(t, Config{PageOutBytes: pageOut})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	dlxDeclare(t, ch, true)
	if _, err := ch.QueueDeclare("src", true, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx", "x-message-ttl": int32(3000)}); err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	const n = 20000
	body := bytes.Repeat([]byte("b"), 2048)
	for i := range n {
		pub.publish("", "src", false, amqp091.Publishing{DeliveryMode: 2, MessageId: strconv.Itoa(i), Body: body})
	}
	pub.wait()
	// On a slow machine the first messages expire before the last are published: those
	// were paged too, and count with the ones still paged.
	d := b.srv.dead
	d.mu.Lock()
	jobs := len(d.jobs)
	d.mu.Unlock()
	if p, _, _ := queuePaged(b.srv, "/", "src"); p+jobs+queueReady(t, ch, "dlq") < n*9/10 {
		t.Fatalf("only %d of %d paged (%d more expired)", p, n, jobs+queueReady(t, ch, "dlq"))
	}
	var peak atomic.Int64
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			d.mu.Lock()
			k := int64(len(d.jobs))
			d.mu.Unlock()
			if k > peak.Load() {
				peak.Store(k)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}()
	pollFor(t, "dlq to hold every message", func() bool { d.wait(); return queueReady(t, ch, "dlq") == n })
	close(stop)
	t.Logf("peak dead-letter jobs held in memory: %d messages (%d KiB of bodies; PageOutBytes %d KiB)",
		peak.Load(), peak.Load()*int64(len(body))>>10, pageOut>>10)
	// Read back paged messages wait for the worker once deadLetterBacklog are waiting: the
	// memory they take is bounded, not the backlog's size (20,000 here).
	if peak.Load() > deadLetterBacklog+64 {
		t.Errorf("dead-lettering the expired backlog held %d messages in memory at once, want at most about %d", peak.Load(), deadLetterBacklog)
	}
}

// TestDeadLetterUnreadablePagedMessageReleasedOnce: a paged transient message to dead-letter whose paging file
// record cannot be read is released twice (readRefLocked, then settleRefsLocked): the
// paging file goes while a queued message is still in it, and that message is lost.
func TestDeadLetterUnreadablePagedMessageReleasedOnce(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	dlxSetup(t, ch, false)
	if _, err := ch.QueueDeclare("src", false, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx"}); err != nil {
		t.Fatal(err)
	}
	// The first message is larger than the write buffer: it is written at once, at offset
	// 0 of paging file 1. The others stay in the write buffer.
	publish := func(body []byte, exp string) {
		if err := ch.Publish("", "src", false, false, amqp091.Publishing{Body: body, Expiration: exp}); err != nil {
			t.Fatal(err)
		}
	}
	publish(bytes.Repeat([]byte("0"), spillBuffer+1000), "300")
	for _, s := range []string{"one", "two", "three"} {
		publish([]byte(s), "")
	}
	pollFor(t, "4 paged", func() bool { p, _, _ := queuePaged(b.srv, "/", "src"); return p == 4 })
	// A read error on the first record (a bad sector, say).
	if err := os.Truncate(filepath.Join(b.dir, "paging", "1.page"), 0); err != nil {
		t.Fatal(err)
	}
	pollFor(t, "the expired one gone", func() bool { return queueReady(t, ch, "src") == 3 })
	var got []string
	for range 3 {
		d, ok, err := ch.Get("src", true)
		if err != nil || !ok {
			t.Fatalf("after %v: get: ok %v err %v; paging files left %d", got, ok, err, b.srv.spill.files())
		}
		got = append(got, string(d.Body))
	}
	if !slices.Equal(got, []string{"one", "two", "three"}) {
		t.Fatalf("got %q, want the three messages behind the unreadable one, in order", got)
	}
}

// TestDeadLetterDeclarePermissions: as in RabbitMQ, declaring a queue with a dead-letter
// exchange needs read on the queue and write on the exchange, besides configure.
func TestDeadLetterDeclarePermissions(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddUser("dlu", "p"), d.SetPermissions("dlu", "/", ".*", "^dlx-ok$", "^(qa|qc)$"))
	})
	addr := secServe(t, Config{Definitions: path}, false).Addr().String()
	c := secConnect(t, addr, "dlu", "p", "/")
	declare := func(queue, dlx string) func(ch *amqp091.Channel) error {
		return func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(queue, false, false, false, false, amqp091.Table{"x-dead-letter-exchange": dlx})
			return err
		}
	}
	secAllowed(t, "read on the queue, write on the exchange", secTry(t, c, declare("qa", "dlx-ok")))
	secRefused(t, "no read on the queue", secTry(t, c, declare("qb", "dlx-ok")), 403, secDenied("queue", "qb", "/", "dlu"))
	secRefused(t, "no write on the exchange", secTry(t, c, declare("qc", "dlx-no")), 403, secDenied("exchange", "dlx-no", "/", "dlu"))
}

// TestRedrive: Server.Redrive publishes a dead-letter queue's messages again where they
// first died, in order, with their x-death headers; persistent messages moved are in
// their new queue only after a crash.
func TestRedrive(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if err := ch.ExchangeDeclare("dlx", "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("jobs", "direct", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		name string
		args amqp091.Table
	}{{"dlq", nil}, {"work", amqp091.Table{"x-dead-letter-exchange": "dlx"}}} {
		if _, err := ch.QueueDeclare(q.name, true, false, false, false, q.args); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.QueueBind("dlq", "", "dlx", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("work", "job", "jobs", false, nil); err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	for i := range 5 {
		pub.publish("jobs", "job", false, amqp091.Publishing{DeliveryMode: 2, Body: []byte{byte('0' + i)}})
	}
	pub.wait()
	for range 5 {
		d, ok, err := ch.Get("work", false)
		if err != nil || !ok {
			t.Fatalf("get: %v %v", ok, err)
		}
		d.Reject(false)
	}
	pollFor(t, "the dead-letter queue to hold all five", func() bool { b.srv.dead.wait(); return queueReady(t, ch, "dlq") == 5 })

	if n, err := b.srv.Redrive("/", "dlq"); n != 5 || err != nil {
		t.Fatalf("Redrive: %d moved, %v; want 5", n, err)
	}
	if n := queueReady(t, ch, "dlq"); n != 0 {
		t.Fatalf("%d messages left in the dead-letter queue, want 0", n)
	}
	b2 := b.restart("crash", Config{})
	ch2 := openChannel(t, dial(t, b2.url))
	if n := queueReady(t, ch2, "dlq"); n != 0 {
		t.Fatalf("after a crash the dead-letter queue holds %d, want 0", n)
	}
	got := getAll(t, ch2, "work")
	if len(got) != 5 {
		t.Fatalf("after a crash work holds %d messages, want 5", len(got))
	}
	for i, d := range got {
		if d.Body[0] != byte('0'+i) || d.Exchange != "jobs" || d.RoutingKey != "job" {
			t.Fatalf("message %d: body %q via %q/%q, want %d via jobs/job", i, d.Body, d.Exchange, d.RoutingKey, i)
		}
		checkDeath(t, deaths(t, d)[0], "work", "rejected", 1, "jobs")
	}
}

// TestRedriveStopsAtUnroutable: a message whose first death's exchange no longer routes
// it stays first in the dead-letter queue, and Redrive says why.
func TestRedriveStopsAtUnroutable(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	dlxSetup(t, ch, false)
	ch.Close()
	ch = openChannel(t, dial(t, url))
	if _, err := ch.QueueDeclare("gone", false, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx", "x-message-ttl": int32(0)}); err != nil {
		t.Fatal(err)
	}
	if err := ch.Publish("", "gone", false, false, amqp091.Publishing{Body: []byte("lost")}); err != nil {
		t.Fatal(err)
	}
	pollFor(t, "the message to be dead-lettered", func() bool { srv.dead.wait(); return queueReady(t, ch, "dlq") == 1 })
	if _, err := ch.QueueDelete("gone", false, false, false); err != nil {
		t.Fatal(err)
	}
	n, err := srv.Redrive("/", "dlq")
	if n != 0 || err == nil || !strings.Contains(err.Error(), "routes it nowhere") {
		t.Fatalf("Redrive: %d moved, %v; want none moved and why", n, err)
	}
	if n := queueReady(t, ch, "dlq"); n != 1 {
		t.Fatalf("the dead-letter queue holds %d, want the message still there", n)
	}
}
