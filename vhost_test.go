package amqp

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// The deletion of queues and exchanges, and what it does to bindings: vhost.go's, and the
// binding index of exchange.go it goes through.

func TestExchangeDelete(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if err := ch.ExchangeDeclare("x", "direct", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	if err := ch.QueueBind("q", "k", "x", false, nil); err != nil {
		t.Fatal(err)
	}
	wantReplyCode(t, ch.ExchangeDelete("x", true, false), 406)

	ch = openChannel(t, c)
	if err := ch.QueueUnbind("q", "k", "x", nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDelete("x", true, false); err != nil {
		t.Fatalf("if-unused delete of an unbound exchange: %v", err)
	}
	wantReplyCode(t, ch.ExchangeDeclarePassive("x", "direct", false, false, false, false, nil), 404)

	// Deleting what does not exist succeeds, as in RabbitMQ.
	ch = openChannel(t, c)
	if err := ch.ExchangeDelete("never-declared", false, false); err != nil {
		t.Fatalf("delete of a missing exchange: %v", err)
	}

	// A plain delete removes the bindings with it: the queue no longer gets messages.
	if err := ch.ExchangeDeclare("y", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("q", "", "y", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDelete("y", false, false); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("y", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "y", "", "after recreate")
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("%d messages routed by a binding of a deleted exchange", n)
	}
}

func TestExchangeAutoDelete(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	gone := func(name string) {
		t.Helper()
		probe := openChannel(t, c)
		wantReplyCode(t, probe.ExchangeDeclarePassive(name, "direct", false, true, false, false, nil), 404)
	}

	// Never bound: it stays.
	if err := ch.ExchangeDeclare("ad", "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclarePassive("ad", "direct", false, true, false, false, nil); err != nil {
		t.Fatalf("auto-delete exchange with no bindings yet: %v", err)
	}
	for _, key := range []string{"a", "b"} {
		if err := ch.QueueBind("q", key, "ad", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.QueueUnbind("q", "a", "ad", nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclarePassive("ad", "direct", false, true, false, false, nil); err != nil {
		t.Fatalf("auto-delete exchange with one binding left: %v", err)
	}
	if err := ch.QueueUnbind("q", "b", "ad", nil); err != nil {
		t.Fatal(err)
	}
	gone("ad")

	// Losing the last binding because its queue is deleted counts too.
	declareTransientQueue(t, ch, "short-lived")
	if err := ch.ExchangeDeclare("ad2", "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("short-lived", "k", "ad2", false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDelete("short-lived", false, false, false); err != nil {
		t.Fatal(err)
	}
	gone("ad2")

	// And an exchange-to-exchange binding, unbound.
	if err := ch.ExchangeDeclare("ad3", "direct", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("dst", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeBind("dst", "k", "ad3", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeUnbind("dst", "k", "ad3", false, nil); err != nil {
		t.Fatal(err)
	}
	gone("ad3")
}

// TestBindingIndex binds, rebinds, unbinds and deletes on every kind of exchange, with the
// real hashes and with hashes that all collide. After each step every list a binding is in
// must know its place, a binding equal to one there (integers or floats of other widths)
// must be a duplicate, and routing must agree with a plain filter over the bindings left.
func TestBindingIndex(t *testing.T) {
	for _, collide := range []bool{false, true} {
		for _, kind := range []string{kindDirect, kindFanout, kindTopic, kindHeaders} {
			t.Run(fmt.Sprintf("%s/collide=%v", kind, collide), func(t *testing.T) {
				if collide {
					real := bindingHash
					bindingHash = func(string, table) uint64 { return 0 }
					t.Cleanup(func() { bindingHash = real })
				}
				testBindingIndex(t, kind)
			})
		}
	}
}

func testBindingIndex(t *testing.T, kind string) {
	vh := newVhost("/")
	x := newExchange("x", kind, false, true, false, nil)
	e2 := newExchange("e2", kindFanout, false, false, false, nil)
	vh.exchanges["x"], vh.exchanges["e2"] = x, e2
	var qs []*queue
	for _, name := range []string{"q0", "q1", "q2"} {
		q := newQueue(name, vh, false, false, nil, queueArgs{})
		vh.queues[name], qs = q, append(qs, q)
	}
	nan, negZero := math.NaN(), math.Copysign(0, -1)
	args := [][2]table{ // each with an equal table of other types
		{nil, {}},
		{{"x-match": "all", "h": int32(1)}, {"h": int8(1), "x-match": "all"}},
		{{"x-match": "any", "h": int32(1)}, {"x-match": "any", "h": int64(1)}},
		{{"x-match": "all", "h": "1"}, {"x-match": "all", "h": "1"}},
		{{"x-match": "any", "h": int16(1), "g": float64(2)}, {"x-match": "any", "h": uint8(1), "g": float32(2)}},
		{{"n": table{"i": int16(3)}, "z": negZero, "a": []any{int8(1), nan}}, {"n": table{"i": int64(3)}, "z": 0.0, "a": []any{int32(1), nan}}},
		{{"x-match": "all", "v": nil, "t": timestamp(5), "b": true, "d": decimal{1, 2}}, {"d": decimal{1, 2}, "b": true, "t": timestamp(5), "v": nil, "x-match": "all"}},
		{{"x-match": "all", "v": nil, "t": timestamp(5), "b": false, "d": decimal{1, 2}}, nil},
	}
	var all []*binding
	for _, key := range []string{"a", "a.b", "a.*", "#", ""} {
		for _, a := range args {
			for _, q := range qs {
				all = append(all, &binding{source: x, queue: q, key: key, args: a[0]})
			}
			all = append(all, &binding{source: x, dest: e2, key: key, args: a[0]})
		}
	}
	for _, b := range all {
		if !x.addBindingLocked(b) {
			t.Fatalf("%q %v to %s: refused as a duplicate", b.key, b.args, b.destName())
		}
	}
	// probe returns a binding equal to b: its arguments retyped where that keeps them equal.
	probe := func(b *binding) *binding {
		p := &binding{queue: b.queue, dest: b.dest, key: b.key, args: b.args}
		for _, a := range args {
			if a[1] != nil && tableEqual(a[0], b.args) {
				p.args = a[1]
			}
		}
		return p
	}
	live := slices.Clone(all)
	check := func(when string) {
		t.Helper()
		if len(x.bindings) != len(live) {
			t.Fatalf("%s: %d bindings, want %d", when, len(x.bindings), len(live))
		}
		inDirect := 0
		for _, bs := range x.direct {
			inDirect += len(bs)
		}
		if kind == kindDirect && inDirect != len(live) {
			t.Fatalf("%s: %d bindings by key, want %d", when, inDirect, len(live))
		}
		for i, b := range x.bindings {
			dl := e2.incoming
			if b.queue != nil {
				dl = b.queue.bindings
			}
			switch {
			case int(b.slot) != i:
				t.Fatalf("%s: binding %d has slot %d", when, i, b.slot)
			case dl[b.dslot] != b:
				t.Fatalf("%s: %q to %s not at its destination's slot", when, b.key, b.destName())
			case kind == kindDirect && x.direct[b.key][b.kslot] != b:
				t.Fatalf("%s: %q to %s not at its key's slot", when, b.key, b.destName())
			case x.findBindingLocked(probe(b)) != b:
				t.Fatalf("%s: %q %v to %s not found", when, b.key, b.args, b.destName())
			case x.addBindingLocked(probe(b)):
				t.Fatalf("%s: %q %v to %s bound twice", when, b.key, b.args, b.destName())
			}
		}
		for _, key := range []string{"a", "a.b", "a.c", "", "b"} {
			for _, h := range []table{nil, {"h": int64(1)}, {"h": "1"}, {"g": 2.0}} {
				var want []*queue
				for _, b := range live {
					hit := false
					switch kind {
					case kindDirect:
						hit = b.key == key
					case kindFanout:
						hit = true
					case kindTopic:
						hit = naiveTopicMatch(b.key, key)
					case kindHeaders:
						hit = parseHeadersMatch(b.args).matches(h)
					}
					if hit && b.queue != nil && !slices.Contains(want, b.queue) {
						want = append(want, b.queue)
					}
				}
				rs := routeSet{headers: h, parsed: true}
				x.route(&message{data: []byte(key), keyLen: uint8(len(key))}, &rs)
				if !sameQueues(rs.queues, want) {
					t.Fatalf("%s: key %q headers %v routed to %d queues, want %d", when, key, h, len(rs.queues), len(want))
				}
			}
		}
	}
	check("all bound")
	unbind := func(b *binding) {
		t.Helper()
		found := x.findBindingLocked(probe(b))
		if found != b {
			t.Fatalf("%q %v to %s: unbind found %p, want %p", b.key, b.args, b.destName(), found, b)
		}
		x.removeBindingLocked(found)
		vh.autoDeleteLocked(x)
		live = slices.DeleteFunc(live, func(o *binding) bool { return o == b })
	}
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	for _, b := range all[:len(all)/3] {
		unbind(b)
	}
	check("a third unbound")
	vh.deleteQueue(qs[0])
	live = slices.DeleteFunc(live, func(b *binding) bool { return b.queue == qs[0] })
	if len(qs[0].bindings) != 0 {
		t.Fatalf("deleted queue keeps %d bindings", len(qs[0].bindings))
	}
	check("q0 deleted")
	vh.deleteExchangeLocked(e2)
	live = slices.DeleteFunc(live, func(b *binding) bool { return b.dest == e2 })
	check("e2 deleted")
	for len(live) > 0 {
		if vh.exchanges["x"] != x {
			t.Fatalf("auto-delete exchange gone with %d bindings left", len(live))
		}
		unbind(live[len(live)/2])
	}
	if vh.exchanges["x"] != nil || !x.deleted || len(x.index) != 0 || len(x.direct) != 0 {
		t.Fatalf("auto-delete exchange left after its last binding: deleted=%v index=%d direct=%d", x.deleted, len(x.index), len(x.direct))
	}
	for _, q := range qs {
		if len(q.bindings) != 0 {
			t.Fatalf("%s keeps %d bindings of a deleted exchange", q.name, len(q.bindings))
		}
	}
}

// sameQueues reports whether a and b hold the same queues, in any order.
func sameQueues(a, b []*queue) bool {
	if len(a) != len(b) {
		return false
	}
	for _, q := range a {
		if !slices.Contains(b, q) {
			return false
		}
	}
	return true
}

// TestBindingsEveryKind: on each kind of exchange (and a delayed one of each, which
// routes a message without x-delay at once), a bind repeated with equal arguments (an
// integer of another width) is the same binding, which one unbind removes; other arguments
// make another binding; and an auto-delete exchange goes when the deletion of a queue takes
// its last binding.
func TestBindingsEveryKind(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	all := func(h any) amqp091.Table { return amqp091.Table{"x-match": "all", "h": h} }
	anyOf := amqp091.Table{"x-match": "any", "h": int32(1), "g": "no"}
	for _, kind := range []string{"direct", "fanout", "topic", "headers", "delayed direct", "delayed fanout", "delayed topic", "delayed headers"} {
		x, qa, qb := "ad-"+kind, "a-"+kind, "b-"+kind
		typ, args := kind, amqp091.Table(nil)
		if k, ok := strings.CutPrefix(kind, "delayed "); ok {
			typ, args = kindDelayed, amqp091.Table{"x-delayed-type": k}
		}
		if err := ch.ExchangeDeclare(x, typ, false, true, false, false, args); err != nil {
			t.Fatal(err)
		}
		bind := func(q string, args amqp091.Table, unbind bool) {
			t.Helper()
			err := ch.QueueBind(q, "a.b", x, false, args)
			if unbind {
				err = ch.QueueUnbind(q, "a.b", x, args)
			}
			if err != nil {
				t.Fatalf("%s %s: %v", kind, q, err)
			}
		}
		routed := func(want ...int) {
			t.Helper()
			err := ch.Publish(x, "a.b", false, false, amqp091.Publishing{Headers: amqp091.Table{"h": int64(1)}, Body: []byte("m")})
			if err != nil {
				t.Fatal(err)
			}
			if a, b := len(drainText(t, ch, qa)), len(drainText(t, ch, qb)); a != want[0] || b != want[1] {
				t.Fatalf("%s: %d and %d messages, want %v", kind, a, b, want)
			}
		}
		bindNewQueue(t, ch, qa, x, "a.b", all(int32(1)))
		bind(qa, all(int8(1)), false)
		bindNewQueue(t, ch, qb, x, "a.b", all(int32(1)))
		routed(1, 1)
		bind(qa, all(int64(1)), true)
		routed(0, 1)
		bind(qa, anyOf, false)
		bind(qa, all(int16(1)), false)
		bind(qa, all(int32(1)), true)
		routed(1, 1)
		bind(qa, anyOf, true)
		routed(0, 1)
		if _, err := ch.QueueDelete(qb, false, false, false); err != nil {
			t.Fatal(err)
		}
		probe := openChannel(t, c)
		wantReplyCode(t, probe.ExchangeDeclarePassive(x, typ, false, true, false, false, nil), 404)
	}
}
