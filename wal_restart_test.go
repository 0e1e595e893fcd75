package amqp

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Broker-level durability tests: topology and messages across clean restarts and crash
// images (copies of a running broker's data directory), compaction through the broker,
// and the recovery and persistent-confirm benchmarks.

// The topology of TestDurableTopologyRestart.
type walExchange struct {
	name, kind                    string
	durable, autoDelete, internal bool
	args                          amqp091.Table
}

type walQueue struct {
	name                           string
	durable, exclusive, autoDelete bool
	args                           amqp091.Table
}

var (
	walSurvivingExchanges = []walExchange{
		{name: "t.direct", kind: "direct", durable: true, args: amqp091.Table{"alternate-exchange": "t.ae"}},
		{name: "t.ae", kind: "fanout", durable: true},
		{name: "t.fanout", kind: "fanout", durable: true, args: amqp091.Table{"x-custom": int32(5), "note": "f"}},
		{name: "t.topic", kind: "topic", durable: true},
		{name: "t.internal", kind: "topic", durable: true, internal: true},
		{name: "t.headers", kind: "headers", durable: true, args: amqp091.Table{"note": "h"}},
		{name: "t.autodel", kind: "direct", durable: true, autoDelete: true},
	}
	walLostExchanges = []walExchange{
		{name: "t.transient", kind: "direct"},
		{name: "t.xdel", kind: "fanout", durable: true}, // deleted before the restart
	}
	walSurvivingQueues = []walQueue{
		{name: "t.q1", durable: true, args: amqp091.Table{"x-max-length": int32(1000)}},
		{name: "t.q2", durable: true, args: amqp091.Table{"x-message-ttl": int32(3600000)}},
		{name: "t.q3", durable: true},
	}
	walLostQueues = []walQueue{
		{name: "t.qtransient"},
		{name: "t.qexcl", durable: true, exclusive: true},
		{name: "t.qauto", durable: true, autoDelete: true},
		{name: "t.qdel", durable: true}, // deleted before the restart
	}
)

// buildTopology declares the test topology, including what must not survive a restart,
// then unbinds and deletes parts of it.
func buildTopology(t testing.TB, conn *amqp091.Connection) {
	t.Helper()
	ch := openChannel(t, conn)
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	for _, x := range append(slices.Clone(walSurvivingExchanges), walLostExchanges...) {
		must("declare "+x.name, ch.ExchangeDeclare(x.name, x.kind, x.durable, x.autoDelete, x.internal, false, x.args))
	}
	for _, q := range append(slices.Clone(walSurvivingQueues), walLostQueues...) {
		_, err := ch.QueueDeclare(q.name, q.durable, q.autoDelete, q.exclusive, false, q.args)
		must("declare "+q.name, err)
	}
	for _, b := range []struct {
		queue, key, exchange string
		args                 amqp091.Table
	}{
		{"t.q1", "k1", "t.direct", amqp091.Table{"b-arg": "v"}},
		{"t.q2", "k2", "t.direct", nil},
		{"t.q3", "gone", "t.direct", nil}, // unbound below
		{"t.q3", "", "t.fanout", nil},
		{"t.q2", "a.*.c", "t.topic", nil},
		{"t.q1", "", "t.headers", amqp091.Table{"x-match": "all", "h1": "v1"}},
		{"t.q3", "", "t.headers", amqp091.Table{"x-match": "any", "h2": int32(2), "h3": "v3"}},
		{"t.q2", "#", "t.internal", nil},
		{"t.q1", "ad", "t.autodel", nil},
		{"t.q1", "k1", "t.transient", nil},
		{"t.qtransient", "k1", "t.direct", nil},
		{"t.qexcl", "k1", "t.direct", nil},
		{"t.qauto", "k1", "t.direct", nil},
		{"t.qdel", "kdel", "t.direct", nil},
		{"t.q1", "", "t.xdel", nil},
	} {
		must("bind "+b.queue+" to "+b.exchange, ch.QueueBind(b.queue, b.key, b.exchange, false, b.args))
	}
	must("bind t.fanout to t.direct", ch.ExchangeBind("t.fanout", "fan", "t.direct", false, nil))
	must("bind t.internal to t.fanout", ch.ExchangeBind("t.internal", "", "t.fanout", false, amqp091.Table{"e-arg": int32(1)}))
	must("bind t.xdel to t.direct", ch.ExchangeBind("t.xdel", "xdel", "t.direct", false, nil))

	must("unbind", ch.QueueUnbind("t.q3", "gone", "t.direct", nil))
	must("delete t.xdel", ch.ExchangeDelete("t.xdel", false, false))
	_, err := ch.QueueDelete("t.qdel", false, false, false)
	must("delete t.qdel", err)
	ch.Close()
}

// walProbe is a message sent through the test topology.
type walProbe struct {
	name, exchange, key string
	headers             amqp091.Table
	want                []string // the surviving queues it reaches, or "returned"
}

var walProbes = []walProbe{
	{"p-k1", "t.direct", "k1", nil, []string{"t.q1"}},
	{"p-k2", "t.direct", "k2", nil, []string{"t.q2"}},
	{"p-unbound", "t.direct", "gone", nil, []string{"returned"}},
	{"p-deleted-queue", "t.direct", "kdel", nil, []string{"returned"}},
	{"p-deleted-exchange", "t.direct", "xdel", nil, []string{"returned"}},
	{"p-e2e", "t.direct", "fan", nil, []string{"t.q2", "t.q3"}},
	{"p-fanout", "t.fanout", "any", nil, []string{"t.q2", "t.q3"}},
	{"p-topic", "t.topic", "a.b.c", nil, []string{"t.q2"}},
	{"p-topic-miss", "t.topic", "a.b", nil, []string{"returned"}},
	{"p-h1", "t.headers", "", amqp091.Table{"h1": "v1"}, []string{"t.q1"}},
	{"p-h2", "t.headers", "", amqp091.Table{"h2": int32(2)}, []string{"t.q3"}},
	{"p-h13", "t.headers", "", amqp091.Table{"h1": "v1", "h3": "v3"}, []string{"t.q1", "t.q3"}},
	{"p-hnone", "t.headers", "", amqp091.Table{"h9": "x"}, []string{"returned"}},
	{"p-autodel", "t.autodel", "ad", nil, []string{"t.q1"}},
}

// probeRoutes publishes every probe (mandatory, confirmed) and reports where each went.
func probeRoutes(t testing.TB, conn *amqp091.Connection) map[string][]string {
	t.Helper()
	c := newConfirmChannel(t, conn)
	got := make(map[string][]string)
	for _, p := range walProbes {
		c.publish(p.exchange, p.key, true, amqp091.Publishing{Headers: p.headers, Body: []byte(p.name)})
		c.wait()
		// basic.return comes before the confirm; amqp091 hands them over in that order.
		select {
		case r := <-c.returns:
			got[string(r.Body)] = append(got[string(r.Body)], "returned")
		default:
		}
	}
	for _, q := range walSurvivingQueues {
		for _, body := range walBodies(getAll(t, c.ch, q.name)) {
			got[body] = append(got[body], q.name)
		}
	}
	for _, v := range got {
		sort.Strings(v)
	}
	c.ch.Close()
	return got
}

// checkTopology checks with passive and equal declares that exactly the durable topology
// came back, with its flags and arguments.
func checkTopology(t testing.TB, conn *amqp091.Connection) {
	t.Helper()
	for _, x := range walSurvivingExchanges {
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			if err := ch.ExchangeDeclarePassive(x.name, x.kind, x.durable, x.autoDelete, x.internal, false, nil); err != nil {
				return err
			}
			// An equivalent declare succeeds only if type, flags and arguments match.
			return ch.ExchangeDeclare(x.name, x.kind, x.durable, x.autoDelete, x.internal, false, x.args)
		})
		if err != nil {
			t.Errorf("exchange %s after restart: %v", x.name, err)
		}
	}
	for _, x := range walLostExchanges {
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclarePassive(x.name, x.kind, x.durable, x.autoDelete, x.internal, false, nil)
		})
		if amqpErrCode(err) != 404 {
			t.Errorf("exchange %s after restart: %v, want 404", x.name, err)
		}
	}
	for _, q := range walSurvivingQueues {
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(q.name, q.durable, q.autoDelete, q.exclusive, false, q.args)
			return err
		})
		if err != nil {
			t.Errorf("queue %s after restart: %v", q.name, err)
		}
		if len(q.args) > 0 {
			err = onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
				_, err := ch.QueueDeclare(q.name, q.durable, q.autoDelete, q.exclusive, false, amqp091.Table{"x-max-priority": int32(3)})
				return err
			})
			if amqpErrCode(err) != 406 {
				t.Errorf("queue %s redeclared with other x- arguments: %v, want 406", q.name, err)
			}
		}
	}
	for _, q := range walLostQueues {
		if n := queueDepth(t, conn, q.name); n != -1 {
			t.Errorf("queue %s came back with %d messages; it must not survive a restart", q.name, n)
		}
	}
}

// durableTopology describes, one sorted line each, the exchanges, queues and bindings of
// the default vhost that must survive a restart, with their flags and arguments.
func durableTopology(srv *Server) []string {
	vh := srv.vhost("/")
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	queueSurvives := func(q *queue) bool { return q.durable && !q.exclusive && !q.autoDelete }
	var lines []string
	for _, x := range vh.exchanges {
		if !x.durable {
			continue
		}
		lines = append(lines, fmt.Sprintf("exchange %q %s auto-delete=%v internal=%v args=%v", x.name, x.kind, x.autoDelete, x.internal, x.args))
		for _, b := range x.bindings {
			switch {
			case b.queue != nil && queueSurvives(b.queue):
				lines = append(lines, fmt.Sprintf("bind %q -> queue %q key %q args=%v", x.name, b.queue.name, b.key, b.args))
			case b.dest != nil && b.dest.durable:
				lines = append(lines, fmt.Sprintf("bind %q -> exchange %q key %q args=%v", x.name, b.dest.name, b.key, b.args))
			}
		}
	}
	for _, q := range vh.queues {
		if queueSurvives(q) {
			lines = append(lines, fmt.Sprintf("queue %q args=%v", q.name, q.args))
		}
	}
	sort.Strings(lines)
	return lines
}

// TestDurableTopologyRestart declares exchanges of every type, durable queues with
// arguments, queue and exchange-to-exchange bindings, and things that must not survive;
// after a clean restart and after a crash, the durable topology is the same and routes the
// same way, and the unbind and deletes made before stick.
func TestDurableTopologyRestart(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"clean", "crash"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			b := startDurable(t, Config{})
			conn := dial(t, b.url)
			buildTopology(t, conn)
			before := probeRoutes(t, conn)
			for _, p := range walProbes {
				if !slices.Equal(before[p.name], p.want) {
					t.Errorf("before restart, probe %s went to %v, want %v", p.name, before[p.name], p.want)
				}
			}
			if t.Failed() {
				t.FailNow()
			}
			want := durableTopology(b.srv)

			b2 := b.restart(mode, Config{})
			conn2 := dial(t, b2.url)
			got := durableTopology(b2.srv)
			zombie := slices.ContainsFunc(got, func(l string) bool { return strings.Contains(l, `queue "t.qdel"`) })
			got = slices.DeleteFunc(got, func(l string) bool { return strings.Contains(l, `queue "t.qdel"`) })
			if !slices.Equal(got, want) {
				t.Errorf("durable topology after restart:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			checkTopology(t, conn2)
			after := probeRoutes(t, conn2)
			for _, p := range walProbes {
				if p.name != "p-deleted-queue" && !slices.Equal(after[p.name], p.want) {
					t.Errorf("after restart, probe %s went to %v, want %v", p.name, after[p.name], p.want)
				}
			}
			if zombie || !slices.Equal(after["p-deleted-queue"], []string{"returned"}) {
				t.Errorf("after restart, the deleted queue t.qdel is still bound (in topology: %v), probe went to %v", zombie, after["p-deleted-queue"])
			}
		})
	}
}

// TestDurableDeletedQueueBindingsAfterCrash is the deleted queue's binding left behind by
// replay, seen from a client: a queue of the same name declared after the crash starts
// receiving messages for the old binding once the broker restarts cleanly.
func TestDurableDeletedQueueBindingsAfterCrash(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if err := ch.ExchangeDeclare("dq.x", "direct", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("dq.q", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("dq.q", "k", "dq.x", false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDelete("dq.q", false, false, false); err != nil {
		t.Fatal(err)
	}

	b2 := b.restart("crash", Config{})
	conn2 := dial(t, b2.url)
	ch2 := openChannel(t, conn2)
	if _, err := ch2.QueueDeclare("dq.q", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	b3 := b2.restart("clean", Config{})
	conn3 := dial(t, b3.url)
	c := newConfirmChannel(t, conn3)
	c.publish("dq.x", "k", true, transientMsg("for-the-old-binding"))
	c.wait()
	returned := false
	select {
	case <-c.returns:
		returned = true
	default:
	}
	n := queueDepth(t, conn3, "dq.q")
	if !returned || n != 0 {
		t.Errorf("publish through a binding deleted with its queue: returned=%v, new queue of the same name holds %d; want returned and 0", returned, n)
	}
}

// declareQueues declares durable (or transient) queues on a fresh channel.
func declareQueues(t testing.TB, conn *amqp091.Connection, durable bool, names ...string) {
	t.Helper()
	ch := openChannel(t, conn)
	for _, n := range names {
		if _, err := ch.QueueDeclare(n, durable, false, false, false, nil); err != nil {
			t.Fatalf("declare %s: %v", n, err)
		}
	}
	ch.Close()
}

// takeDeliveries reads n deliveries or fails.
func takeDeliveries(t testing.TB, msgs <-chan amqp091.Delivery, n int) []amqp091.Delivery {
	t.Helper()
	var ds []amqp091.Delivery
	deadline := time.After(walWait)
	for len(ds) < n {
		select {
		case d, ok := <-msgs:
			if !ok {
				t.Fatalf("consumer closed after %d of %d deliveries", len(ds), n)
			}
			ds = append(ds, d)
		case <-deadline:
			t.Fatalf("got %d of %d deliveries", len(ds), n)
		}
	}
	return ds
}

// checkRedelivered checks that deliveries after a restart are persistent, redelivered,
// and exactly want, in order.
func checkRedelivered(t testing.TB, queue string, ds []amqp091.Delivery, want []string) {
	t.Helper()
	if got := walBodies(ds); !slices.Equal(got, want) {
		t.Errorf("%s after restart: %q, want %q", queue, got, want)
	}
	for _, d := range ds {
		if !d.Redelivered || d.DeliveryMode != amqp091.Persistent || d.MessageId != string(d.Body) {
			t.Errorf("%s: %s came back redelivered=%v mode=%d id=%q; want redelivered, persistent, same id", queue, d.Body, d.Redelivered, d.DeliveryMode, d.MessageId)
		}
	}
}

// TestPersistentMessagesRestart publishes persistent and transient messages to a durable
// and a transient queue and settles them in every way; after a restart exactly the
// unsettled persistent messages of durable queues are back, in publish order, redelivered.
func TestPersistentMessagesRestart(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"clean", "crash"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			b := startDurable(t, Config{})
			conn := dial(t, b.url)
			declareQueues(t, conn, true, "p.durable", "p.get", "p.purge", "p.deleted", "p.noack")
			declareQueues(t, conn, false, "p.transient")
			pub := newPersistentPublisher(t, conn)
			var wantDurable []string
			const n = 30
			for i := 0; i < n; i++ {
				for _, q := range []string{"p.durable", "p.transient"} {
					id := fmt.Sprintf("%s-%02d", q, i)
					if i%2 == 0 {
						pub.publish("", q, persistentMsg(id))
					} else {
						pub.publish("", q, transientMsg(id))
					}
					// Settled below: i%3 == 0 acked. Nacked-requeued (1) and held (2) stay.
					if q == "p.durable" && i%2 == 0 && i%3 != 0 {
						wantDurable = append(wantDurable, id)
					}
				}
			}
			for _, q := range []string{"p.get", "p.purge", "p.deleted", "p.noack"} {
				for i := 0; i < 5; i++ {
					pub.publish("", q, persistentMsg(fmt.Sprintf("%s-%d", q, i)))
				}
			}
			pub.wait()

			// A consumer acks a third, nacks a third with requeue (they come back and are
			// held), and holds a third, until the broker goes away.
			cch := openChannel(t, conn)
			msgs, err := cch.Consume("p.durable", "", false, false, false, false, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range takeDeliveries(t, msgs, n) {
				i, _ := strconv.Atoi(strings.TrimPrefix(string(d.Body), "p.durable-"))
				switch i % 3 {
				case 0:
					err = d.Ack(false)
				case 1:
					err = d.Nack(false, true)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			for _, d := range takeDeliveries(t, msgs, n/3) {
				if !d.Redelivered {
					t.Errorf("requeued %s delivered again without redelivered", d.Body)
				}
			}

			// basic.get: no-ack, reject without requeue and ack settle; one stays unacked.
			gch := openChannel(t, conn)
			if _, ok, err := gch.Get("p.get", true); !ok || err != nil {
				t.Fatalf("get: %v %v", ok, err)
			}
			for _, settle := range []func(d amqp091.Delivery) error{
				func(d amqp091.Delivery) error { return d.Reject(false) },
				func(d amqp091.Delivery) error { return d.Ack(false) },
				func(d amqp091.Delivery) error { return nil }, // held
			} {
				d, ok, err := gch.Get("p.get", false)
				if !ok || err != nil {
					t.Fatalf("get: %v %v", ok, err)
				}
				if err := settle(d); err != nil {
					t.Fatal(err)
				}
			}

			// Purge, then one more message that must survive.
			if n, err := pub.ch.QueuePurge("p.purge", false); err != nil || n != 5 {
				t.Fatalf("purge = %d, %v; want 5", n, err)
			}
			pub.publish("", "p.purge", persistentMsg("p.purge-after"))
			pub.wait()

			// Delete a queue while two of its messages are unacked elsewhere, then let the
			// channel holding them go.
			dch := openChannel(t, conn)
			for i := 0; i < 2; i++ {
				if _, ok, err := dch.Get("p.deleted", false); !ok || err != nil {
					t.Fatalf("get: %v %v", ok, err)
				}
			}
			if _, err := pub.ch.QueueDelete("p.deleted", false, false, false); err != nil {
				t.Fatal(err)
			}
			dch.Close()

			// A no-ack consumer settles on delivery.
			nch := openChannel(t, conn)
			nmsgs, err := nch.Consume("p.noack", "", true, false, false, false, nil)
			if err != nil {
				t.Fatal(err)
			}
			takeDeliveries(t, nmsgs, 5)
			nch.Close()

			b2 := b.restart(mode, Config{})
			conn2 := dial(t, b2.url)
			ch2 := openChannel(t, conn2)
			checkRedelivered(t, "p.durable", getAll(t, ch2, "p.durable"), wantDurable)
			checkRedelivered(t, "p.get", getAll(t, ch2, "p.get"), []string{"p.get-3", "p.get-4"})
			checkRedelivered(t, "p.purge", getAll(t, ch2, "p.purge"), []string{"p.purge-after"})
			checkRedelivered(t, "p.noack", getAll(t, ch2, "p.noack"), nil)
			for _, q := range []string{"p.transient", "p.deleted"} {
				if n := queueDepth(t, conn2, q); n != -1 {
					t.Errorf("queue %s came back with %d messages", q, n)
				}
			}
			// A new queue of a deleted one's name starts empty.
			declareQueues(t, conn2, true, "p.deleted")
			if n := queueDepth(t, conn2, "p.deleted"); n != 0 {
				t.Errorf("redeclared p.deleted holds %d messages, want 0", n)
			}
		})
	}
}

// TestPersistentSurvivesSecondRestart restarts twice: recovered messages are logged
// again correctly (settling one after the first restart sticks), and none is duplicated.
func TestPersistentSurvivesSecondRestart(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	declareQueues(t, conn, true, "r.q")
	pub := newPersistentPublisher(t, conn)
	for i := 0; i < 10; i++ {
		pub.publish("", "r.q", persistentMsg("r-"+strconv.Itoa(i)))
	}
	pub.wait()

	b2 := b.restart("crash", Config{})
	conn2 := dial(t, b2.url)
	ch2 := openChannel(t, conn2)
	// Ack the first three recovered messages; publish two more.
	for i := 0; i < 3; i++ {
		d, ok, err := ch2.Get("r.q", false)
		if !ok || err != nil {
			t.Fatalf("get: %v %v", ok, err)
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
	pub2 := newPersistentPublisher(t, conn2)
	pub2.publish("", "r.q", persistentMsg("r-10"))
	pub2.publish("", "r.q", persistentMsg("r-11"))
	pub2.wait()

	for _, mode := range []string{"crash", "clean"} {
		b3 := b2.restart(mode, Config{})
		ch3 := openChannel(t, dial(t, b3.url))
		want := []string{"r-3", "r-4", "r-5", "r-6", "r-7", "r-8", "r-9", "r-10", "r-11"}
		checkRedelivered(t, "r.q ("+mode+")", getAll(t, ch3, "r.q"), want)
	}
}

// TestPersistentFanoutRestart: one persistent message routed to two durable queues and a
// transient one is logged once; settling it in one queue leaves it in the other.
func TestPersistentFanoutRestart(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	declareQueues(t, conn, true, "fan.a", "fan.b")
	declareQueues(t, conn, false, "fan.t")
	ch := openChannel(t, conn)
	if err := ch.ExchangeDeclare("fan.x", "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"fan.a", "fan.b", "fan.t"} {
		if err := ch.QueueBind(q, "", "fan.x", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	pub := newPersistentPublisher(t, conn)
	want := []string{"fan-0", "fan-1", "fan-2"}
	for _, id := range want {
		pub.publish("fan.x", "", persistentMsg(id))
	}
	pub.wait()
	getAll(t, ch, "fan.a")
	for _, mode := range []string{"crash", "clean"} {
		b2 := b.restart(mode, Config{})
		conn2 := dial(t, b2.url)
		ch2 := openChannel(t, conn2)
		checkRedelivered(t, "fan.a", getAll(t, ch2, "fan.a"), nil)
		ds := getAll(t, ch2, "fan.b")
		checkRedelivered(t, "fan.b", ds, want)
		if n := queueDepth(t, conn2, "fan.t"); n != -1 {
			t.Errorf("transient fan.t came back with %d messages", n)
		}
		b2.stop()
		if mode == "crash" {
			continue
		}
		// fan.b was emptied by the gets above: a third start finds nothing.
		b3 := startDurable(t, Config{DataDir: b.dir})
		if n := queueDepth(t, dial(t, b3.url), "fan.b"); n != 0 {
			t.Errorf("fan.b after its messages were taken: %d, want 0", n)
		}
	}
}

// TestDurableTxRestart: persistent publishes and acks committed in a transaction survive a
// restart; rolled-back and uncommitted ones do not.
func TestDurableTxRestart(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"clean", "crash"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			b := startDurable(t, Config{})
			conn := dial(t, b.url)
			declareQueues(t, conn, true, "tx.q")
			ch := openChannel(t, conn)
			if err := ch.Tx(); err != nil {
				t.Fatal(err)
			}
			pub := func(id string) {
				t.Helper()
				if err := ch.Publish("", "tx.q", false, false, persistentMsg(id)); err != nil {
					t.Fatal(err)
				}
			}
			pub("c1")
			pub("c2")
			pub("c3")
			if err := ch.TxCommit(); err != nil {
				t.Fatal(err)
			}
			pub("r1")
			pub("r2")
			if err := ch.TxRollback(); err != nil {
				t.Fatal(err)
			}
			// An ack inside a transaction takes effect at commit.
			d, ok, err := ch.Get("tx.q", false)
			if !ok || err != nil || string(d.Body) != "c1" {
				t.Fatalf("get = %q %v %v, want c1", d.Body, ok, err)
			}
			if err := d.Ack(false); err != nil {
				t.Fatal(err)
			}
			if err := ch.TxCommit(); err != nil {
				t.Fatal(err)
			}
			pub("u1") // never committed
			// A crash right after commit-ok must find the committed work on disk, so
			// the crash image here is taken without waiting for the log.
			var b2 *durableBroker
			if mode == "crash" {
				b2 = startDurable(t, Config{DataDir: copyDataDir(t, b.dir, nil)})
			} else {
				b2 = b.restart(mode, Config{})
			}
			ch2 := openChannel(t, dial(t, b2.url))
			checkRedelivered(t, "tx.q", getAll(t, ch2, "tx.q"), []string{"c2", "c3"})
		})
	}
}

// TestPersistentConfirmedInCrashImage: four publishers in confirm mode; a copy of the data
// directory taken the moment the last confirm arrives (without waiting for the log) holds
// every confirmed message exactly once.
func TestPersistentConfirmedInCrashImage(t *testing.T) {
	t.Parallel()
	for _, cfg := range []struct {
		name string
		cfg  Config
	}{
		{"fsync=always", Config{}},
		{"fsync=interval", Config{FsyncInterval: 20 * time.Millisecond}},
		{"small segments", Config{SegmentSize: 32 << 10}},
	} {
		t.Run(cfg.name, func(t *testing.T) {
			t.Parallel()
			b := startDurable(t, cfg.cfg)
			conn := dial(t, b.url)
			declareQueues(t, conn, true, "cc.q")
			const publishers, each = 4, 300
			var wg sync.WaitGroup
			errs := make(chan error, publishers)
			for p := 0; p < publishers; p++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					c, err := amqp091.Dial(b.url)
					if err != nil {
						errs <- err
						return
					}
					defer c.Close()
					ch, err := c.Channel()
					if err != nil {
						errs <- err
						return
					}
					if err := ch.Confirm(false); err != nil {
						errs <- err
						return
					}
					confirms := ch.NotifyPublish(make(chan amqp091.Confirmation, each))
					for i := 0; i < each; i++ {
						if err := ch.Publish("", "cc.q", false, false, persistentMsg(fmt.Sprintf("%d-%d", p, i))); err != nil {
							errs <- err
							return
						}
					}
					for i := 0; i < each; i++ {
						select {
						case c := <-confirms:
							if !c.Ack {
								errs <- fmt.Errorf("nack %d", c.DeliveryTag)
								return
							}
						case <-time.After(walWait):
							errs <- errors.New("confirm timeout")
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			img := copyDataDir(t, b.dir, nil)
			b2 := startDurable(t, Config{DataDir: img})
			ds := getAll(t, openChannel(t, dial(t, b2.url)), "cc.q")
			seen := make(map[string]int)
			next := make([]int, publishers) // per publisher, the order is kept
			for _, d := range ds {
				seen[string(d.Body)]++
				var p, i int
				fmt.Sscanf(string(d.Body), "%d-%d", &p, &i)
				if p < 0 || p >= publishers || i != next[p] {
					t.Errorf("message %s out of order (want %d-%d)", d.Body, p, next[max(0, min(p, publishers-1))])
				} else {
					next[p]++
				}
			}
			for p := 0; p < publishers; p++ {
				for i := 0; i < each; i++ {
					if id := fmt.Sprintf("%d-%d", p, i); seen[id] != 1 {
						t.Errorf("confirmed message %s recovered %d times", id, seen[id])
					}
				}
			}
			if len(ds) != publishers*each {
				t.Errorf("recovered %d messages, want %d", len(ds), publishers*each)
			}
		})
	}
}

// TestWALDataDirLocked: a second broker on a data directory in use refuses to start.
func TestWALDataDirLocked(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" {
		t.Skip("the data directory lock is a flock on Linux only")
	}
	b := startDurable(t, Config{})
	_, err := startDurableOnce(t, Config{DataDir: b.dir})
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second broker on %s: %v, want an error saying it is in use", b.dir, err)
	}
	// Once the first is gone, the directory is free.
	b.restart("clean", Config{})
}

// TestDurableCorruptSegmentRepair: a flipped bit in a segment that is not the last stops
// the broker from starting, with the file and offset in the error; with Config.Repair it
// starts, logs the loss, and keeps the messages before the damage.
func TestDurableCorruptSegmentRepair(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{SegmentSize: 4 << 10})
	conn := dial(t, b.url)
	declareQueues(t, conn, true, "rp.q")
	pub := newPersistentPublisher(t, conn)
	const n = 100
	for i := 0; i < n; i++ {
		pub.publish("", "rp.q", persistentMsg(fmt.Sprintf("rp-%03d-%s", i, strings.Repeat("x", 150))))
	}
	pub.wait()
	b.stop()

	segs := segmentFiles(t, b.dir)
	if len(segs) < 4 {
		t.Fatalf("%d segments, want at least 4", len(segs))
	}
	victim := segs[1]
	starts, _ := recordStarts(t, victim)
	off := starts[len(starts)/2]
	img := copyDataDir(t, b.dir, func(name string, data []byte) []byte {
		if name == filepath.Base(victim) {
			data[off+12] ^= 0x20
		}
		return data
	})
	_, err := tryStartDurable(t, Config{DataDir: img})
	if err == nil || !strings.Contains(err.Error(), filepath.Base(victim)) || !strings.Contains(err.Error(), "offset "+strconv.Itoa(off)) {
		t.Fatalf("start on a corrupt log: %v; want an error naming %s and offset %d", err, filepath.Base(victim), off)
	}
	var logs lockedBuffer
	b2 := startDurable(t, Config{DataDir: img, Repair: true, Logger: logs.logger()})
	if !strings.Contains(logs.String(), "repair") {
		t.Errorf("repair start logged nothing about the loss: %q", logs.String())
	}
	ds := getAll(t, openChannel(t, dial(t, b2.url)), "rp.q")
	if len(ds) == 0 || len(ds) >= n {
		t.Fatalf("repaired log recovered %d messages, want some but fewer than %d", len(ds), n)
	}
	if !strings.HasPrefix(string(ds[0].Body), "rp-000-") {
		t.Errorf("first recovered message is %.7s, want rp-000", ds[0].Body)
	}
}

// waitSegments polls until the data directory holds at most max segment files and
// meta.snap exists.
func waitSegments(t testing.TB, dir string, max int) {
	t.Helper()
	deadline := time.Now().Add(walWait)
	for {
		segs := segmentFiles(t, dir)
		_, err := os.Stat(filepath.Join(dir, "meta.snap"))
		if len(segs) <= max && err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %d segment files (want at most %d), meta.snap: %v", walWait, len(segs), max, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestWALCompactionThroughBroker publishes, consumes and acks enough persistent messages
// for many segments: compaction deletes them all but the head (checkpointing the queue's
// declaration first), and the durable queue survives restarts, empty.
func TestWALCompactionThroughBroker(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{SegmentSize: 64 << 10})
	conn := dial(t, b.url)
	declareQueues(t, conn, true, "c.q")
	pub := newPersistentPublisher(t, conn)
	const n = 1500
	body := strings.Repeat("c", 1024)
	for i := 0; i < n; i++ {
		pub.publish("", "c.q", persistentMsg(fmt.Sprintf("c-%04d-%s", i, body)))
	}
	pub.wait()
	if segs := segmentFiles(t, b.dir); len(segs) < 10 {
		t.Fatalf("%d segments for %d KiB of messages, want at least 10", len(segs), n)
	}
	cch := openChannel(t, conn)
	if err := cch.Qos(500, 0, false); err != nil {
		t.Fatal(err)
	}
	msgs, err := cch.Consume("c.q", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i += 100 {
		ds := takeDeliveries(t, msgs, 100)
		if err := ds[len(ds)-1].Ack(true); err != nil {
			t.Fatal(err)
		}
	}
	waitSegments(t, b.dir, 2)

	for _, mode := range []string{"crash", "clean"} {
		b2 := b.restart(mode, Config{SegmentSize: 64 << 10})
		if n := queueDepth(t, dial(t, b2.url), "c.q"); n != 0 {
			t.Errorf("%s restart: c.q holds %d messages (-1: missing), want 0", mode, n)
		}
		b2.stop()
	}
}

// TestWALCompactionPinnedMessageThroughBroker: one old unacked message keeps the oldest
// segment alive while everything around it is acked; compaction copies it forward, the
// oldest segment goes, and the message survives restarts exactly once.
func TestWALCompactionPinnedMessageThroughBroker(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{SegmentSize: 64 << 10})
	conn := dial(t, b.url)
	declareQueues(t, conn, true, "pin.q", "pin.fill")
	pub := newPersistentPublisher(t, conn)
	pub.publish("", "pin.q", persistentMsg("pinned"))
	filler := strings.Repeat("f", 1024)
	const fills = 300
	for i := 0; i < fills; i++ {
		pub.publish("", "pin.fill", persistentMsg(fmt.Sprintf("f-%03d-%s", i, filler)))
	}
	// Later messages of the pinned queue that fill whole segments, which stay.
	big := strings.Repeat("L", 20<<10)
	var want = []string{"pinned"}
	for i := 0; i < 6; i++ {
		id := fmt.Sprintf("later-%d-%s", i, big)
		pub.publish("", "pin.q", persistentMsg(id))
		want = append(want, id)
	}
	pub.wait()
	first := filepath.Base(segmentFiles(t, b.dir)[0])

	cch := openChannel(t, conn)
	msgs, err := cch.Consume("pin.fill", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	ds := takeDeliveries(t, msgs, fills)
	if err := ds[len(ds)-1].Ack(true); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(walWait)
	for filepath.Base(segmentFiles(t, b.dir)[0]) == first {
		if time.Now().After(deadline) {
			t.Fatalf("oldest segment is still %s after %v", first, walWait)
		}
		time.Sleep(10 * time.Millisecond)
	}

	for _, mode := range []string{"crash", "clean"} {
		b2 := b.restart(mode, Config{SegmentSize: 64 << 10})
		conn2 := dial(t, b2.url)
		got := getAll(t, openChannel(t, conn2), "pin.q")
		seen := make(map[string]int)
		for _, d := range got {
			seen[string(d.Body)]++
			if !d.Redelivered {
				t.Errorf("%s restart: %.10s not redelivered", mode, d.Body)
			}
		}
		for _, id := range want {
			if seen[id] != 1 {
				t.Errorf("%s restart: %.10s recovered %d times, want once", mode, id, seen[id])
			}
		}
		if len(got) != len(want) {
			t.Errorf("%s restart: %d messages, want %d", mode, len(got), len(want))
		}
		if n := queueDepth(t, conn2, "pin.fill"); n != 0 {
			t.Errorf("%s restart: pin.fill holds %d acked messages", mode, n)
		}
		if mode == "clean" {
			if bodies := walBodies(got); !slices.Equal(bodies, want) {
				t.Errorf("order after restart: first is %.10s, want pinned first", bodies[0])
			}
		}
		b2.stop()
	}
}

// TestWALIdleRestartCheckpoint restarts on a crash image whose oldest segment holds only
// settled messages and a queue declaration: with no client traffic, the writer's idle tick
// compacts it away after writing a checkpoint, and the queue survives the next crash.
func TestWALIdleRestartCheckpoint(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	declareQueues(t, conn, true, "idle.q")
	pub := newPersistentPublisher(t, conn)
	for i := 0; i < 10; i++ {
		pub.publish("", "idle.q", persistentMsg("idle-"+strconv.Itoa(i)))
	}
	pub.wait()
	getAll(t, openChannel(t, conn), "idle.q") // settles them all; the segment stays the head
	img := b.crashImage()
	if _, err := os.Stat(filepath.Join(img, "meta.snap")); err == nil {
		t.Fatal("meta.snap exists before the restart; the test needs the head segment uncompacted")
	}

	startDurable(t, Config{DataDir: img})
	first := filepath.Base(segmentFiles(t, img)[0])
	deadline := time.Now().Add(walWait)
	for filepath.Base(segmentFiles(t, img)[0]) == first {
		if time.Now().After(deadline) {
			t.Fatalf("segment %s not compacted after an idle restart", first)
		}
		time.Sleep(10 * time.Millisecond)
	}
	b3 := startDurable(t, Config{DataDir: copyDataDir(t, img, nil)})
	if n := queueDepth(t, dial(t, b3.url), "idle.q"); n != 0 {
		t.Errorf("idle.q after the second crash: %d messages (-1: missing), want 0", n)
	}
}

// BenchmarkRecovery measures a restart on a data directory holding -recovery.n persistent
// messages of -recovery.body octets (1,000,000 of 100 by default) in one durable queue:
// from NewServer to a listening broker whose queue reports them all, and the heap the
// recovered queue then takes per message. The directory is written through the log's own
// publish path (logPublish), byte for byte what the broker writes. Run it with -benchtime 1x:
//
//	go test -run '^$' -bench Recovery -benchtime 1x -recovery.n 10000000
func BenchmarkRecovery(b *testing.B) {
	n, bodySize := *recoveryN, *recoveryBody
	const name = "bench-recovery"
	dir := b.TempDir()
	w, _, err := openStoreRetry(dir, storeOptions{log: walQuietLogger()})
	if err != nil {
		b.Fatal(err)
	}
	q := &queue{name: name, durable: true, walID: w.newQueueID()}
	logTestTopology(b, w, recQueueDeclare, queueRecord("/", q))
	p := properties{DeliveryMode: 2, ContentType: "application/octet-stream"}
	props := p.encode(nil)
	qs := []*queue{q}
	var scratch []byte
	var ticket uint64
	data := make([]byte, len(name)+len(props)+bodySize)
	copy(data, name)
	copy(data[len(name):], props)
	for i := 0; i < n; i++ {
		binary.BigEndian.PutUint64(data[len(name)+len(props):], uint64(i))
		m := &message{keyLen: uint8(len(name)), propsLen: uint32(len(props)), data: data, size: uint32(bodySize), persistent: true}
		if ticket, scratch, err = w.logPublish(m, qs, scratch, nil); err != nil {
			b.Fatal(err)
		}
		if i%100_000 == 0 {
			// Keep the log's unwritten batch bounded: the writer keeps up with a waiting publisher.
			if err := w.w.wait(ticket); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := w.w.wait(ticket); err != nil {
		b.Fatal(err)
	}
	w.close()
	var size int64
	for _, f := range segmentFiles(b, dir) {
		if fi, err := os.Stat(f); err == nil {
			size += fi.Size()
		}
	}
	runtime.GC()

	var total time.Duration
	var heap float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		start := time.Now()
		d := startDurable(b, Config{DataDir: dir})
		vh := d.srv.vhost("/")
		vh.mu.RLock()
		rq := vh.queues[name]
		vh.mu.RUnlock()
		got := -1
		if rq != nil {
			got = rq.messageCount()
		}
		total += time.Since(start)
		if got != n {
			b.Fatalf("restart found %d messages, want %d", got, n)
		}
		b.StopTimer()
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		heap += float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
		d.stop()
		b.StartTimer()
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "restart-s")
	b.ReportMetric(heap/float64(b.N), "heap-B/msg")
	b.ReportMetric(float64(size)/(1<<20), "MiB")
}

var (
	recoveryN    = flag.Int("recovery.n", 1_000_000, "BenchmarkRecovery: messages in the data directory")
	recoveryBody = flag.Int("recovery.body", 100, "BenchmarkRecovery: body octets of each message")
)

// BenchmarkPublishConfirmPersistent: one publisher in confirm mode with at most 1000
// unconfirmed persistent messages to a durable queue, and a consumer acking them (multiple,
// every 100). Set AMQP_BENCH_URL to measure another broker.
func BenchmarkPublishConfirmPersistent(b *testing.B) {
	for _, size := range []int{16, 1024} {
		b.Run(strconv.Itoa(size)+"B", func(b *testing.B) { benchPublishConfirmPersistent(b, size) })
	}
}

func benchPublishConfirmPersistent(b *testing.B, size int) {
	benchConfirmPersistentAt(b, benchURL(b), size)
}

// benchConfirmPersistentAt is BenchmarkPublishConfirmPersistent against the broker at u.
func benchConfirmPersistentAt(b *testing.B, u string, size int) {
	pconn, cconn := dial(b, u), dial(b, u)
	pch, cch := openChannel(b, pconn), openChannel(b, cconn)
	queue := fmt.Sprintf("bench-persistent-%d-%d-%d", os.Getpid(), size, time.Now().UnixNano())
	if _, err := cch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ch, err := pconn.Channel()
		if err == nil {
			ch.QueueDelete(queue, false, false, false)
			ch.Close()
		}
	})
	if err := cch.Qos(1000, 0, false); err != nil {
		b.Fatal(err)
	}
	deliveries, err := cch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		for i := 0; i < b.N; i++ {
			d, ok := <-deliveries
			if !ok {
				done <- errString("consumer closed after " + strconv.Itoa(i))
				return
			}
			if i%100 == 99 || i == b.N-1 {
				if err := d.Ack(true); err != nil {
					done <- err
					return
				}
			}
		}
		done <- nil
	}()
	if err := pch.Confirm(false); err != nil {
		b.Fatal(err)
	}
	const window = 1000
	confirms := pch.NotifyPublish(make(chan amqp091.Confirmation, window+1))
	body := make([]byte, size)
	inflight, acked := 0, 0
	// Each publish's time since start, and each confirm's latency (with up to window
	// others ahead of it).
	sent, lat := make([]time.Duration, b.N), make([]time.Duration, 0, b.N)
	settle := func() {
		c := <-confirms
		if !c.Ack {
			b.Fatalf("nack for %d", c.DeliveryTag)
		}
		if c.DeliveryTag >= 1 && c.DeliveryTag <= uint64(b.N) {
			lat = append(lat, b.Elapsed()-sent[c.DeliveryTag-1])
		}
		inflight--
		acked++
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for inflight >= window {
			settle()
		}
		sent[i] = b.Elapsed()
		if err := pch.Publish("", queue, false, false, amqp091.Publishing{DeliveryMode: amqp091.Persistent, Body: body}); err != nil {
			b.Fatal(err)
		}
		inflight++
	}
	for inflight > 0 {
		settle()
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if acked != b.N {
		b.Fatalf("%d confirms for %d publishes", acked, b.N)
	}
	reportRate(b, b.N, "msgs/s")
	reportLatency(b, lat)
}

// TestWALFailureNacks: a persistent publish whose log write fails is nacked, never acked.
func TestWALFailureNacks(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if _, err := ch.QueueDeclare("wf", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confs := ch.NotifyPublish(make(chan amqp091.Confirmation, 1))
	srv.store.w.file.Close() // the next write fails
	if err := ch.Publish("", "wf", false, false, amqp091.Publishing{DeliveryMode: 2, Body: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	select {
	case cf := <-confs:
		if cf.Ack {
			t.Fatal("a publish whose log write failed was acked")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no confirm")
	}
	// A durable declare the log cannot write fails its channel only, saying why.
	conn := dial(t, url)
	_, err := openChannel(t, conn).QueueDeclare("wf2", true, false, false, false, nil)
	if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || !strings.Contains(e.Reason, "write-ahead log") {
		t.Fatalf("durable declare after the log failed: %v, want 406 naming the write-ahead log", err)
	}
	if _, err := openChannel(t, conn).QueueDeclarePassive("wf", true, false, false, false, nil); err != nil {
		t.Fatalf("the connection did not survive the channel error: %v", err)
	}
}

// TestWALUnloggedDurableQueueHoldsNothing: a persistent message routed to a logged queue and
// to a durable exclusive one (never logged) leaves the log once the logged queue acks it.
func TestWALUnloggedDurableQueueHoldsNothing(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	for _, q := range []struct {
		name      string
		exclusive bool
	}{{"dq", false}, {"xq", true}} {
		if _, err := ch.QueueDeclare(q.name, true, false, q.exclusive, false, nil); err != nil {
			t.Fatal(err)
		}
		if err := ch.QueueBind(q.name, "", "amq.fanout", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.Publish("amq.fanout", "", false, false, amqp091.Publishing{DeliveryMode: 2, Body: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"dq", "xq"} {
		deadline := time.Now().Add(5 * time.Second)
		for {
			d, ok, err := ch.Get(q, false)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				d.Ack(false)
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no message in", q)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		live := storeLive(srv.store)
		if live == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("both queues acked the message, but the log still counts %d live octets", live)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestWALCompactionPastLiveBacklog: an old backlog nobody consumes does not keep every dead
// segment after it: once the whole log is mostly dead, the backlog is copied forward.
func TestWALCompactionPastLiveBacklog(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, url := newTestServer(t, Config{DataDir: dir, SegmentSize: 16 << 10})
	conn := dial(t, url)
	declareQueues(t, conn, true, "backlog", "busy")
	pub := newPersistentPublisher(t, conn)
	body := strings.Repeat("b", 1000)
	for i := 0; i < 40; i++ {
		pub.publish("", "backlog", persistentMsg(body))
	}
	pub.wait()
	cons := openChannel(t, conn)
	for i := 0; i < 2000; i++ {
		pub.publish("", "busy", persistentMsg(body))
		if i%100 == 99 {
			pub.wait()
			getAll(t, cons, "busy")
		}
	}
	pub.wait()
	getAll(t, cons, "busy")
	// 2 MiB went through the log. Compaction may leave up to 1 MiB of a mostly dead log (and
	// a segment or two in flight), never all of it.
	deadline := time.Now().Add(15 * time.Second)
	for {
		segs, _ := filepath.Glob(filepath.Join(dir, "wal", "*.seg"))
		var size int64
		for _, s := range segs {
			if fi, err := os.Stat(s); err == nil {
				size += fi.Size()
			}
		}
		if size <= 1<<20+32<<10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d segments, %d KiB, kept for 40 KB of live messages", len(segs), size>>10)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := queueDepth(t, conn, "backlog"); n != 40 {
		t.Fatalf("backlog holds %d, want 40", n)
	}
}

// TestDurableExpiredMessagesStayGone: persistent messages that expired in a durable queue
// are settled in the log and do not come back after a crash.
func TestDurableExpiredMessagesStayGone(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("ttl.q", true, false, false, false, amqp091.Table{"x-message-ttl": int32(100)}); err != nil {
		t.Fatal(err)
	}
	pub := newPersistentPublisher(t, conn)
	for i := 0; i < 5; i++ {
		pub.publish("", "ttl.q", persistentMsg("gone-"+strconv.Itoa(i)))
	}
	pub.wait()
	pollFor(t, "the messages expired", func() bool { return queueDepth(t, conn, "ttl.q") == 0 })
	// A persistent message that has not expired survives, with the queue's TTL restarting.
	if _, err := ch.QueueDeclare("keep.q", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	pub.publish("", "keep.q", persistentMsg("kept"))
	pub.wait()
	b2 := b.restart("crash", Config{})
	conn2 := dial(t, b2.url)
	if n := queueDepth(t, conn2, "ttl.q"); n != 0 {
		t.Fatalf("%d expired messages came back after the crash", n)
	}
	if n := queueDepth(t, conn2, "keep.q"); n != 1 {
		t.Fatalf("keep.q holds %d after the crash, want 1", n)
	}
}
