package amqp

import (
	"bytes"
	"errors"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Paging: queues past their memory share keep messages on disk (spill.go, store.go), and
// read them back in order, byte-exact, across restarts and compaction.

// pagedBody is the n-th paging test message's body: its number, then filler of a length
// that varies every four messages, so a body read back from the wrong place shows, and
// paged messages form runs of one size (refQueue) as well as stand alone.
func pagedBody(n int) []byte {
	b := []byte(strconv.Itoa(n) + ":")
	for len(b) < 512+(n/4*397)%2500 {
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
	var last diskRef
	q.tail.each(func(_ int, r diskRef) { last = r })
	return last
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
	// Transient messages first, paged to paging files in runs: the persistent ones after
	// them are found by compaction behind those runs.
	for i := range 40 {
		pub.publish("", "old", false, amqp091.Publishing{Body: pagedBody(1000 + i%8)})
	}
	for i := range 40 {
		pub.publish("", "old", false, amqp091.Publishing{DeliveryMode: 2, Body: pagedBody(i)})
	}
	pub.wait()
	if paged, _, _ := queuePaged(b.srv, "/", "old"); paged < 70 {
		t.Fatalf("%d messages of 'old' paged, want nearly all 80", paged)
	}
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
	var logs lockedBuffer
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
	requeued := false
	for i := 0; i < n; i++ {
		d := takeDelivery(t, msgs)
		if d.MessageId != strconv.Itoa(i) || !bytes.Equal(d.Body, pagedBody(i)) {
			t.Fatalf("delivery %d: message %s with a %d-octet body, want message %d byte-exact", i, d.MessageId, len(d.Body), i)
		}
		if i == n-10 && !requeued {
			d.Nack(false, true) // comes back next, from its paging file
			requeued = true
			i--
			continue
		}
		if i == n-10 && !d.Redelivered {
			t.Fatal("the requeued message came back without redelivered")
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
	q.tail.each(func(_ int, r diskRef) {
		if r.inLog() {
			n += int64(r.size)
		}
	})
	q.ready.each(func(e *qentry) {
		if mw := e.msg.wal; mw != nil {
			n += int64(mw.recLen)
		}
	})
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
	const n = 500
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

// TestRecoveredMessagesExpireIntoTheLog: messages that expire as soon as a restart brings
// them back (x-message-ttl 0; the time to live starts again at the restart) are settled in
// the log like any others, so the next restart does not bring them back. Their expiry
// timers start only once the queues can write to the log.
func TestRecoveredMessagesExpireIntoTheLog(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("ttl0", true, false, false, false, amqp091.Table{"x-message-ttl": int32(0)}); err != nil {
		t.Fatal(err)
	}
	cons := openChannel(t, conn)
	msgs, err := cons.Consume("ttl0", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	for i := range 5 {
		pub.publish("", "ttl0", false, amqp091.Publishing{DeliveryMode: 2, Body: []byte{byte(i)}})
	}
	pub.wait()
	for range 5 {
		takeDelivery(t, msgs) // held unacked: they are in the log, and come back at a restart
	}
	b2 := b.restart("crash", Config{})
	q := b2.srv.vhost("/").queues["ttl0"]
	pollFor(t, "the recovered messages to expire", func() bool { return q.messageCount() == 0 })
	pollFor(t, "the log to settle them", func() bool { return storeLive(b2.srv.store) == 0 })
	_, rec := openTestWAL(t, b2.crashImage(), storeOptions{})
	if n := len(rec.messages[q.walID]); n != 0 {
		t.Fatalf("the log still holds %d expired messages", n)
	}
}

// TestPagingStress: random publishes (persistent and transient), gets, consumes with
// acks, requeues and rejects, purges, expiry, max-length and delivery limits, dead-letters,
// paging and compaction; once everything is drained, nothing may be live in the log or the
// paging files, and the queues' byte counts must be zero; a crash restart brings nothing back.
func TestPagingStress(t *testing.T) {
	t.Parallel()
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	cfg := Config{PageOutBytes: 2 << 10, SegmentSize: 32 << 10}
	b := startDurable(t, cfg)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	mustOK(t, ch.ExchangeDeclare("fan", "fanout", true, false, false, false, nil))
	mustOK(t, ch.ExchangeDeclare("dlx", "fanout", true, false, false, false, nil))
	queues := map[string]amqp091.Table{
		"ttl":   {"x-dead-letter-exchange": "dlx", "x-message-ttl": int32(30)},
		"max":   {"x-dead-letter-exchange": "dlx", "x-max-length": int32(40)},
		"limit": {"x-dead-letter-exchange": "dlx", "x-delivery-limit": int32(1)},
		"plain": nil,
		"rpdlx": {"x-dead-letter-exchange": "dlx", "x-max-length": int32(25), "x-overflow": "reject-publish-dlx"},
	}
	names := []string{"ttl", "max", "limit", "plain", "rpdlx", "dlq", "tr"}
	for name, args := range queues {
		_, err := ch.QueueDeclare(name, true, false, false, false, args)
		mustOK(t, err)
		mustOK(t, ch.QueueBind(name, "", "fan", false, nil))
	}
	_, err := ch.QueueDeclare("dlq", true, false, false, false, nil)
	mustOK(t, err)
	mustOK(t, ch.QueueBind("dlq", "", "dlx", false, nil))
	_, err = ch.QueueDeclare("tr", false, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx"})
	mustOK(t, err)
	mustOK(t, ch.QueueBind("tr", "", "fan", false, nil))

	cons := openChannel(t, conn)
	mustOK(t, cons.Qos(20, 0, false))
	var deliveries []<-chan amqp091.Delivery
	for _, q := range []string{"limit", "plain", "tr"} {
		d, err := cons.Consume(q, "", false, false, false, false, nil)
		mustOK(t, err)
		deliveries = append(deliveries, d)
	}
	pub := openChannel(t, conn)
	deadline := time.Now().Add(4 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		switch op := rng.Intn(100); {
		case op < 60:
			mode := uint8(2)
			if rng.Intn(3) == 0 {
				mode = 1
			}
			body := make([]byte, 100+rng.Intn(3000))
			mustOK(t, pub.Publish("fan", "", false, false, amqp091.Publishing{DeliveryMode: mode, MessageId: strconv.Itoa(i), Body: body}))
		case op < 75:
			q := names[rng.Intn(len(names))]
			d, ok, err := ch.Get(q, false)
			mustOK(t, err)
			if ok {
				switch rng.Intn(3) {
				case 0:
					d.Ack(false)
				case 1:
					d.Nack(false, true)
				default:
					d.Reject(false)
				}
			}
		case op < 98:
			for _, c := range deliveries {
				select {
				case d := <-c:
					switch rng.Intn(4) {
					case 0:
						d.Nack(false, true)
					case 1:
						d.Reject(false)
					default:
						d.Ack(false)
					}
				default:
				}
			}
		default:
			_, err := ch.QueuePurge(names[rng.Intn(len(names))], false)
			mustOK(t, err)
		}
	}
	mustOK(t, cons.Close())
	// Drain: everything, dead-letters included, until all is quiet.
	for round := 0; ; round++ {
		b.srv.dead.wait()
		n := 0
		for _, q := range names {
			n += len(getAll(t, ch, q))
		}
		b.srv.dead.wait()
		if n == 0 {
			total := 0
			for _, q := range names {
				total += queueReady(t, ch, q)
			}
			if total == 0 {
				break
			}
		}
		if round > 100 {
			t.Fatal("never drained")
		}
		time.Sleep(50 * time.Millisecond)
	}
	mustOK(t, b.srv.store.sync())
	for _, q := range names {
		qq := testQueue(b.srv, q)
		qq.mu.Lock()
		rb, rm, tl := qq.readyBytes, qq.ramBytes, qq.tail.len()
		qq.mu.Unlock()
		if rb != 0 || rm != 0 || tl != 0 {
			t.Errorf("%s: readyBytes %d ramBytes %d tail %d after draining", q, rb, rm, tl)
		}
	}
	if live := storeLive(b.srv.store); live != 0 {
		b.srv.store.mu.Lock()
		for seq, s := range b.srv.store.segs {
			if s.live != 0 {
				t.Logf("segment %d live %d", seq, s.live)
			}
		}
		b.srv.store.mu.Unlock()
		t.Errorf("the log still counts %d octets live", live)
	}
	if k := b.srv.spill.files(); k != 0 {
		t.Errorf("%d paging files left", k)
	}
	b2 := b.restart("crash", cfg)
	conn2 := dial(t, b2.url)
	for _, q := range names {
		if q == "tr" {
			continue
		}
		if k := queueDepth(t, conn2, q); k != 0 {
			t.Errorf("crash restart: %s holds %d", q, k)
		}
	}
}

// TestQueueWithConsumersPagesLater: a queue with a consumer holds up to consumedShare
// times its share in memory before it pages (what it holds is on its way out); one
// without pages past its share.
func TestQueueWithConsumersPagesLater(t *testing.T) {
	t.Parallel()
	const share = 8 << 10
	b := startDurable(t, Config{PageOutBytes: share})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	for _, q := range []string{"consumed", "idle"} {
		declareTransientQueue(t, ch, q)
	}
	cons := openChannel(t, conn)
	cons.Qos(1, 0, false) // takes one message and holds it: the rest wait in the queue
	msgs, err := cons.Consume("consumed", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	pub := newConfirmChannel(t, conn)
	body := make([]byte, 1024)
	const n = 100 // about 130 KiB of memCost: over the share, under consumedShare times it
	for range n {
		pub.publish("", "consumed", false, amqp091.Publishing{Body: body})
		pub.publish("", "idle", false, amqp091.Publishing{Body: body})
	}
	pub.wait()
	takeDelivery(t, msgs)
	if paged, ready, _ := queuePaged(b.srv, "/", "consumed"); paged != 0 || ready != n-1 {
		t.Fatalf("the consumed queue: %d paged of %d ready, want none paged", paged, ready)
	}
	if paged, _, ram := queuePaged(b.srv, "/", "idle"); paged == 0 || ram > share {
		t.Fatalf("the idle queue: %d paged, %d octets in memory; want paging past %d", paged, ram, share)
	}
}

// publishBurst encodes n publishes to exchange with key, their bodies made by body.
func publishBurst(exchange, key string, n int, body func(i int) []byte) []byte {
	var b []byte
	for i := range n {
		b = appendMethodFrame(b, 1, &basicPublish{Exchange: exchange, RoutingKey: key})
		b = appendContent(b, 1, []byte{0, 0}, body(i), defaultFrameMax)
	}
	return b
}

// TestPagedPublishAllocatesNothing: a publish that its queue pages at once leaves its
// message to the connection for the next publish (conn.spareMessage), so paging a burst
// allocates next to nothing per message. Not parallel: it counts the process's mallocs.
func TestPagedPublishAllocatesNothing(t *testing.T) {
	b := startDurable(t, Config{PageOutBytes: 1 << 10})
	w := dialFrameClient(t, b.srv)
	w.send(1, &queueDeclare{Queue: "paged"})
	w.expect(1, idQueueDeclareOk)
	roundTrip := func() { // the reader handles it after every publish before it
		w.send(1, &queueDeclare{Queue: "paged", Passive: true})
		w.expect(1, idQueueDeclareOk)
	}
	body := func(i int) []byte { return []byte("message " + strconv.Itoa(1e6+i)) }
	w.write(publishBurst("", "paged", 1000, body))
	roundTrip()
	const n, tries = 20000, 3
	burst := publishBurst("", "paged", n, body)
	least := math.Inf(1) // the fewest of a few tries: other goroutines of the process count too
	for range tries {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		w.write(burst)
		roundTrip()
		runtime.ReadMemStats(&after)
		least = min(least, float64(after.Mallocs-before.Mallocs)/n)
	}
	if paged, ready, _ := queuePaged(b.srv, "/", "paged"); ready != tries*n+1000 || paged < tries*n {
		t.Fatalf("%d ready, %d paged; want %d ready, at least %d paged", ready, paged, tries*n+1000, tries*n)
	}
	if least > 0.1 {
		t.Fatalf("%.2f allocations per paged publish, want next to none", least)
	}
}

// TestPagedPublishReuseSparesSharedMessages: a message is reused only when the queue that
// paged it was its only holder. Fanout copies paged by one queue while another holds them
// in memory, and messages published alone to a paging queue between them, all come back
// byte-exact and in order.
func TestPagedPublishReuseSparesSharedMessages(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 1 << 10})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	for _, q := range []string{"alone", "paged", "live"} {
		declareTransientQueue(t, ch, q)
	}
	if err := ch.ExchangeDeclare("fan", "fanout", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"paged", "live"} {
		if err := ch.QueueBind(q, "", "fan", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	// A consumer that takes one message and holds it: "live" keeps the rest in memory,
	// up to consumedShare times its share, while "paged" pages its copies at once.
	cons := openChannel(t, conn)
	cons.Qos(1, 0, false)
	live, err := cons.Consume("live", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	fanBody := func(i int) []byte { return []byte("fan " + strconv.Itoa(1e5+i)) }
	aloneBody := func(i int) []byte { return []byte("one " + strconv.Itoa(1e5+i)) }
	const n = 100
	w := dialFrameClient(t, b.srv)
	var burst []byte
	for i := range n {
		burst = append(burst, publishBurst("fan", "", 1, func(int) []byte { return fanBody(i) })...)
		burst = append(burst, publishBurst("", "alone", 1, func(int) []byte { return aloneBody(i) })...)
	}
	for range 3 { // more rounds, past what "live" holds in memory
		w.write(burst)
	}
	w.send(1, &queueDeclare{Queue: "alone", Passive: true})
	w.expect(1, idQueueDeclareOk)
	if paged, _, _ := queuePaged(b.srv, "/", "alone"); paged < n {
		t.Fatalf("%d of queue alone's messages paged, want most", paged)
	}
	for i := range 3 * n {
		d := takeDelivery(t, live)
		if want := fanBody(i % n); !bytes.Equal(d.Body, want) {
			t.Fatalf("live delivery %d: %q, want %q", i, d.Body, want)
		}
		d.Ack(false)
	}
	for _, q := range []struct {
		name string
		body func(int) []byte
	}{{"paged", fanBody}, {"alone", aloneBody}} {
		for i := range 3 * n {
			d, ok, err := ch.Get(q.name, true)
			if err != nil || !ok {
				t.Fatalf("get %d from %s: ok %v, %v", i, q.name, ok, err)
			}
			if want := q.body(i % n); !bytes.Equal(d.Body, want) {
				t.Fatalf("%s message %d: %q, want %q", q.name, i, d.Body, want)
			}
		}
	}
}

// TestPagingWindowNotKeptLarge: reading back reuses a queue's paging window, but not one
// made for a record larger than the usual window: after a 1 MiB message the messages
// behind it are read through a window of the usual size again, byte-exact.
func TestPagingWindowNotKeptLarge(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{PageOutBytes: 8 << 10})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	declareTransientQueue(t, ch, "big")
	pub := newConfirmChannel(t, conn)
	large := bytes.Repeat([]byte("L"), 1<<20)
	const n = 600
	for i := range n {
		body := pagedBody(i)
		if i == 100 {
			body = large
		}
		pub.publish("", "big", false, amqp091.Publishing{Body: body})
	}
	pub.wait()
	if paged, _, _ := queuePaged(b.srv, "/", "big"); paged < n-20 {
		t.Fatalf("%d of %d paged, want nearly all", paged, n)
	}
	windowCap := func() int {
		q := testQueue(b.srv, "big")
		q.mu.Lock()
		defer q.mu.Unlock()
		if q.ahead == nil {
			return 0
		}
		return cap(q.ahead.buf)
	}
	grew := false
	for i := range n {
		d := getN(t, ch, "big", 1, true)[0]
		want := pagedBody(i)
		if i == 100 {
			want = large
		}
		if !bytes.Equal(d.Body, want) {
			t.Fatalf("message %d: a %d-octet body, want byte-exact", i, len(d.Body))
		}
		c := windowCap()
		if c > readAheadWindow {
			grew = true
		}
		if i > 300 && c > readAheadWindow {
			t.Fatalf("after message %d the queue still holds a %d-octet window", i, c)
		}
	}
	if !grew {
		t.Fatal("the 1 MiB message was not read through a window of its size")
	}
}
