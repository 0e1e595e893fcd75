package amqp

import (
	"encoding/binary"
	"errors"
	"math"
	"strconv"
	"sync"
	"time"
)

// Delayed messages: the exchange type x-delayed-message of RabbitMQ's
// rabbitmq_delayed_message_exchange plugin. Such an exchange routes as its x-delayed-type
// (direct, fanout, topic or headers), but a message that reaches it with a positive x-delay
// header is held for that many milliseconds and routed through the exchange's bindings as
// they are when it falls due. Held messages wait in one min-heap per server, by due time
// and then arrival, with one timer for the earliest: a million of them cost no timer and no
// goroutine each.
//
// A persistent message held by a durable delayed exchange is logged as a message of the
// exchange's log queue id (store.go), so it survives a crash with its due time: the record's
// time plus its x-delay. When it falls due, its move into the queues it routes to is one
// record that settles it there and publishes it to them, as a dead-letter move is.

// kindDelayed is the exchange type of the delayed-message plugin.
const kindDelayed = "x-delayed-message"

// delayHold is what makes an exchange an x-delayed-message exchange.
type delayHold struct {
	sched *delays
	vh    *vhost
	// id is the log queue id of its held messages: set for a durable exchange of a broker
	// with a data directory, 0 when nothing it holds is logged.
	id   uint64
	gone bool // guarded by sched.mu: the exchange is deleted; what it held is dropped
}

// typeName is the exchange's type as declared.
func (x *exchange) typeName() string {
	if x.delay != nil {
		return kindDelayed
	}
	return x.kind
}

// checkDelayedType checks a new x-delayed-message exchange's x-delayed-type argument: a
// string naming another exchange type, 406 otherwise (the plugin's texts; an unknown type
// as RabbitMQ 4 says it).
func checkDelayedType(args table) error {
	t, ok := args["x-delayed-type"].(string)
	switch {
	case !ok:
		return preconditionFailed("Invalid argument, 'x-delayed-type' must be an existing exchange type")
	case t == kindDelayed:
		return preconditionFailed("Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'")
	case !validKind(t):
		return preconditionFailed("unknown exchange type '" + t + "'")
	}
	return nil
}

// attachDelayedLocked makes x, new in vh, hold its delayed messages in the server's
// scheduler, and gives a durable one its log queue id. vh.mu must be held.
func (s *Server) attachDelayedLocked(x *exchange, vh *vhost) {
	x.delay.sched, x.delay.vh = s.delays, vh
	if x.durable && vh.store != nil {
		x.delay.id = vh.store.newQueueID()
	}
}

// holdIDs appends the log queue ids of the exchanges in holds that log what they hold.
func holdIDs(qids []uint64, holds []*exchange) []uint64 {
	for _, x := range holds {
		if x.delay.id != 0 {
			qids = append(qids, x.delay.id)
		}
	}
	return qids
}

// anyHoldLogged reports whether one of holds logs what it holds.
func anyHoldLogged(holds []*exchange) bool {
	for _, x := range holds {
		if x.delay.id != 0 {
			return true
		}
	}
	return false
}

// messageDelay reads a message's x-delay header as the plugin does: an integer of any
// width and sign, a float or decimal truncated toward zero, a string holding a decimal
// integer. Anything else (a string that is not an integer, a boolean, no header) is 0:
// the message is routed at once, as is one whose delay is 0 or negative. (For a string
// that is not an integer the plugin fails the publish with an internal error.) It reads
// the raw properties, so a message with other headers costs no table decode. at is the
// offset of the header's type octet in the properties, -1 when there is none.
func messageDelay(props []byte) (delay int64, at int) {
	s, err := scanProperties(props)
	if err != nil || len(s.headers) < 4 {
		return 0, -1
	}
	d := decoder{b: s.headers[4:]}
	for len(d.b) > 0 && d.err == nil {
		// The first field of the name counts, as in RabbitMQ's table_lookup.
		if string(d.shortstrBytes()) == "x-delay" {
			at = s.headersAt + len(s.headers) - len(d.b)
			return delayValue(&d), at
		}
		d.skipValue(0)
	}
	return 0, -1
}

// delayValue decodes an x-delay field value (its type octet first) as a delay.
func delayValue(d *decoder) int64 {
	switch d.octet() {
	case 'b':
		return int64(int8(d.octet()))
	case 'B':
		return int64(d.octet())
	case 's':
		return int64(int16(d.short()))
	case 'u':
		return int64(d.short())
	case 'I':
		return int64(int32(d.long()))
	case 'i':
		return int64(d.long())
	case 'l':
		return int64(d.longlong())
	case 'f':
		return truncDelay(float64(math.Float32frombits(d.long())))
	case 'd':
		return truncDelay(math.Float64frombits(d.longlong()))
	case 'D':
		scale, v := d.octet(), int64(int32(d.long()))
		if scale > 9 {
			return 0 // |value| < 10^10: less than a millisecond
		}
		return v / int64(math.Pow10(int(scale)))
	case 'S':
		n, err := strconv.ParseInt(d.longstr(), 10, 64)
		if err != nil {
			return 0
		}
		return n
	}
	return 0
}

// truncDelay truncates a float delay toward zero; one beyond the int64 range is as long
// as the longest, and NaN is no delay.
func truncDelay(f float64) int64 {
	switch {
	case f != f:
		return 0
	case f >= math.MaxInt64:
		return math.MaxInt64
	case f <= math.MinInt64:
		return math.MinInt64
	}
	return int64(f)
}

// dueAt is when a message held at at (Unix milliseconds) for delay milliseconds falls
// due; there is no cap, short of the end of int64 time.
func dueAt(at, delay int64) int64 {
	if delay > math.MaxInt64-at {
		return math.MaxInt64
	}
	return at + delay
}

// dueMessage is the message a held one becomes when it falls due: its x-delay negated as
// a signed int (a long when it does not fit), as the plugin marks a message it has delayed.
// A signed int is negated in a copy of the data; another type makes the properties be
// encoded again.
func dueMessage(m *message) *message {
	nm := *m
	nm.wal = nil
	props := m.props()
	delay, at := messageDelay(props)
	if at >= 0 && props[at] == 'I' {
		nm.data = append([]byte(nil), m.data...)
		binary.BigEndian.PutUint32(nm.data[int(m.keyLen)+at+1:], uint32(int32(-delay)))
		return &nm
	}
	p, h := m.propertiesToEdit(1)
	if -delay >= math.MinInt32 {
		h["x-delay"] = int32(-delay)
	} else {
		h["x-delay"] = -delay
	}
	p.Headers = h
	props = p.encode(nil)
	nm.data = append(append(append(make([]byte, 0, int(m.keyLen)+len(props)+int(m.size)), m.routingKey()...), props...), m.body()...)
	nm.propsLen = uint32(len(props))
	return &nm
}

// heldMsg is a message held by a delayed exchange. 32 octets, in the heap by value.
type heldMsg struct {
	due int64  // Unix milliseconds
	seq uint64 // arrival order, among messages due at the same millisecond
	x   *exchange
	m   *message
}

// before orders the heap: by due time, then arrival.
func (a *heldMsg) before(b *heldMsg) bool {
	return a.due < b.due || a.due == b.due && a.seq < b.seq
}

// delays is the server's scheduler of delayed messages: a min-heap of every held message
// and one timer set for the earliest. When it fires, a goroutine of the timer routes what
// is due and sets the timer again; there is never more than one at a time.
type delays struct {
	s *Server

	mu      sync.Mutex
	heap    []heldMsg   // guarded by mu: a min-heap by due, then seq
	seq     uint64      // guarded by mu: arrivals so far
	timer   *time.Timer // guarded by mu: fires at armedAt; nil until first needed
	armedAt int64       // guarded by mu: the due time the timer is set for; 0 when stopped
	running bool        // guarded by mu: a goroutine is routing due messages
	started bool        // guarded by mu: the server's log is open; messages may be routed
	offset  int64       // guarded by mu: added to the clock; tests move time ahead with it
	closed  bool        // guarded by mu: the server stopped
	idle    sync.Cond   // broadcast when the router stops
}

func newDelays(s *Server) *delays {
	d := &delays{s: s}
	d.idle.L = &d.mu
	return d
}

// maxTimerWait bounds one timer wait: a due time far away is approached in steps.
const maxTimerWait = 24 * time.Hour

// start lets the scheduler route due messages, once the messages the log held are in it
// and the log takes new records.
func (d *delays) start() {
	d.mu.Lock()
	d.started = true
	d.armLocked()
	d.mu.Unlock()
}

// close stops the timer and waits for due messages being routed. What is still held stays
// in the log, if it was logged.
func (d *delays) close() {
	d.mu.Lock()
	d.closed = true
	if d.timer != nil {
		d.timer.Stop()
	}
	for d.running {
		d.idle.Wait()
	}
	d.mu.Unlock()
}

// len is the number of held messages.
func (d *delays) len() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.heap)
}

// hold holds m in each of the delayed exchanges xs until at+delay. An exchange deleted
// since it routed m does not take it.
func (d *delays) hold(xs []*exchange, m *message, at, delay int64) {
	due := dueAt(at, delay)
	var gone []*exchange
	d.mu.Lock()
	for _, x := range xs {
		if x.delay.gone {
			gone = append(gone, x)
			continue
		}
		d.seq++
		d.pushLocked(heldMsg{due: due, seq: d.seq, x: x, m: m})
	}
	d.armLocked()
	d.mu.Unlock()
	for _, x := range gone {
		x.delay.release([]*message{m})
	}
}

// dropLocked removes what the deleted exchange x held. vh.mu must be held: x is being
// deleted.
func (d *delays) dropLocked(x *exchange) {
	d.mu.Lock()
	x.delay.gone = true
	var msgs []*message
	n := 0
	for _, e := range d.heap {
		if e.x == x {
			msgs = append(msgs, e.m)
			continue
		}
		d.heap[n] = e
		n++
	}
	if len(msgs) > 0 {
		clear(d.heap[n:])
		d.heap = d.heap[:n]
		for i := n/2 - 1; i >= 0; i-- {
			d.downLocked(i)
		}
		d.armLocked()
	}
	d.mu.Unlock()
	x.delay.release(msgs)
}

// release lets go of the log's hold on messages the exchange no longer holds (no record:
// the exchange's deletion implies it).
func (h *delayHold) release(msgs []*message) {
	st := h.vh.store
	if h.id == 0 || st == nil || len(msgs) == 0 {
		return
	}
	st.mu.Lock()
	for _, m := range msgs {
		st.unrefLocked(m, h.id)
	}
	st.mu.Unlock()
}

// armLocked sets the timer for the earliest held message, unless the router is running
// (it sets the timer when it stops). d.mu must be held.
func (d *delays) armLocked() {
	if !d.started || d.closed || d.running {
		return
	}
	if len(d.heap) == 0 {
		if d.timer != nil && d.armedAt != 0 {
			d.timer.Stop()
		}
		d.armedAt = 0
		return
	}
	due := d.heap[0].due
	if d.armedAt == due {
		return
	}
	wait := min(time.Until(time.UnixMilli(due-d.offset)), maxTimerWait)
	if due == math.MaxInt64 {
		wait = maxTimerWait
	}
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.fire)
	} else {
		d.timer.Reset(wait)
	}
	d.armedAt = due
}

// dueBatch bounds the messages the router takes from the heap at once.
const dueBatch = 256

// fire routes every message that is due, then sets the timer for the next one. It runs
// on the timer's goroutine.
func (d *delays) fire() {
	d.mu.Lock()
	if d.running || d.closed || !d.started {
		d.mu.Unlock()
		return
	}
	d.running = true
	d.armedAt = 0
	var batch []heldMsg
	var rs routeSet
	for !d.closed {
		now := time.Now().UnixMilli() + d.offset
		batch = batch[:0]
		for len(d.heap) > 0 && d.heap[0].due <= now && len(batch) < dueBatch {
			batch = append(batch, d.popLocked())
		}
		if len(batch) == 0 {
			break
		}
		d.mu.Unlock()
		for i := range batch {
			d.route(&batch[i], &rs, now)
			batch[i] = heldMsg{}
		}
		d.mu.Lock()
	}
	d.running = false
	d.armLocked()
	d.idle.Broadcast()
	d.mu.Unlock()
}

// route moves a message that fell due into the queues its exchange routes it to now (Unix
// milliseconds): one log record when it was logged, or goes to durable queues persistent.
func (d *delays) route(e *heldMsg, rs *routeSet, now int64) {
	x, vh := e.x, e.x.delay.vh
	nm := dueMessage(e.m)
	rs.reset()
	rs.now = true
	vh.mu.RLock()
	vh.routeLocked(x, nm, rs)
	vh.mu.RUnlock()
	if ae := rs.missingAE; ae != nil {
		d.s.log.Warn("alternate exchange not found; messages the exchange cannot route are not rerouted",
			"vhost", vh.name, "exchange", ae.name, "alternate_exchange", ae.ae)
	}
	if st := vh.store; st != nil {
		st.logMove(x.delay.id, e.m, nm, loggedIDs(rs.queues), now)
	}
	for _, q := range rs.queues {
		q.enqueue(nm)
	}
}

func (d *delays) pushLocked(e heldMsg) {
	d.heap = append(d.heap, e)
	for i := len(d.heap) - 1; i > 0; {
		p := (i - 1) / 2
		if !d.heap[i].before(&d.heap[p]) {
			break
		}
		d.heap[i], d.heap[p] = d.heap[p], d.heap[i]
		i = p
	}
}

func (d *delays) popLocked() heldMsg {
	e := d.heap[0]
	last := len(d.heap) - 1
	d.heap[0] = d.heap[last]
	d.heap[last] = heldMsg{}
	d.heap = d.heap[:last]
	if last > 0 {
		d.downLocked(0)
	}
	if cap(d.heap) > 1024 && len(d.heap) < cap(d.heap)/4 {
		d.heap = append(make([]heldMsg, 0, cap(d.heap)/2), d.heap...)
	}
	return e
}

func (d *delays) downLocked(i int) {
	n := len(d.heap)
	for {
		c := 2*i + 1
		if c >= n {
			return
		}
		if c+1 < n && d.heap[c+1].before(&d.heap[c]) {
			c++
		}
		if !d.heap[c].before(&d.heap[i]) {
			return
		}
		d.heap[i], d.heap[c] = d.heap[c], d.heap[i]
		i = c
	}
}

// restoreHeld reads back the messages a delayed exchange held when the log was written and
// holds them again until their due time: the record's time plus their x-delay. Those due
// while the broker was down are routed as soon as the scheduler starts. A message that
// cannot be read back is logged and dropped.
func (d *delays) restoreHeld(st *store, x *exchange, refs refQueue) {
	var ra readAhead
	refs.each(func(_ int, r diskRef) {
		m, at, err := st.readHeld(&r, &ra)
		if err != nil {
			st.log.Error("cannot read back a delayed message; it is dropped", "exchange", x.name, "id", r.id, "err", err)
			st.mu.Lock()
			st.dropRefsLocked([]diskRef{r})
			st.mu.Unlock()
			return
		}
		st.mu.Lock()
		m.wal.refs, m.wal.queues = 1, []uint64{x.delay.id}
		if s := st.segs[uint64(m.wal.seg)]; s != nil {
			s.link(m.wal)
		}
		st.mu.Unlock()
		d.mu.Lock()
		d.seq++
		delay, _ := messageDelay(m.props())
		d.pushLocked(heldMsg{due: dueAt(at, delay), seq: d.seq, x: x, m: m})
		d.mu.Unlock()
	})
}

// readHeld reads a held message back from its record, with the record's time.
func (st *store) readHeld(r *diskRef, ra *readAhead) (*message, int64, error) {
	typ, payload, err := st.readRefRecord(r, ra, readAheadWindow)
	if err != nil {
		return nil, 0, err
	}
	at, ok := publishTime(typ, payload)
	pub, _ := publishPart(typ, payload)
	p, ok2 := splitPublishRecord(pub, len(pub))
	var m *message
	if ok && ok2 {
		m, ok = decodeMessageRecord(p.rest)
	}
	if !ok || !ok2 {
		return nil, 0, errors.New("amqp: malformed delayed message record")
	}
	if s, err := scanProperties(m.props()); err == nil {
		m.persistent, m.priority = s.deliveryMode == 2, s.priority
		m.ttl, _ = parseExpiration(s.expiration) // a refused value was never logged
	}
	m.wal = &msgWAL{id: r.id, seg: r.file, off: r.offset(), recLen: r.size}
	return m, at, nil
}

// exchangeHoldID returns the log queue id an exchange.declare record gives a delayed
// exchange, or 0.
func exchangeHoldID(payload []byte) uint64 {
	d := decoder{b: payload}
	d.shortstr()
	d.shortstr()
	kind := d.shortstr()
	d.octet()
	d.table()
	if d.err != nil || kind != kindDelayed || len(d.b) < 8 {
		return 0
	}
	return d.longlong()
}

// dropHeldLocked drops what the delayed exchange x, being deleted, holds: in memory, and
// in the log with a queue.delete of its hold id. vh.mu must be held.
func (vh *vhost) dropHeldLocked(x *exchange) {
	if x.delay.id != 0 {
		vh.logLocked(recQueueDelete, binary.BigEndian.AppendUint64(nil, x.delay.id))
	}
	if x.delay.sched != nil {
		x.delay.sched.dropLocked(x)
	}
}
