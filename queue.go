package amqp

import (
	"errors"
	"math/bits"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// message is one published message, shared by every queue it was routed to; it never
// changes after publish. data holds the routing key, the raw properties (flags first) and
// the body in one allocation. A queue that pages keeps a diskRef instead, and reads the
// message back into a new one when its turn comes.
type message struct {
	exchange   string // the exchange's own (interned) name
	data       []byte // routing key | properties | body
	keyLen     uint8
	propsLen   uint32
	size       uint32  // body octets
	publisher  uint64  // the publishing connection's id, for no-local consumers; 0 if unknown
	persistent bool    // delivery-mode 2
	priority   uint8   // the priority property
	ttl        ttl     // the expiration property
	wal        *msgWAL // its place in the log, when it went to a durable queue
}

func (m *message) routingKey() []byte { return m.data[:m.keyLen] }
func (m *message) props() []byte      { return m.data[m.keyLen : uint32(m.keyLen)+m.propsLen] }

func (m *message) body() []byte { return m.data[uint32(m.keyLen)+m.propsLen:] }

// memCost is about what m costs a queue that holds it in memory: its data and the
// structures around it.
func (m *message) memCost() int64 { return int64(len(m.data)) + messageOverhead }

// messageOverhead is what a message in memory costs besides its data: the message, its
// log place, its queue entry, and their allocation slack.
const messageOverhead = 256

// headers decodes the message's headers table, or returns nil.
func (m *message) headers() table {
	s, err := scanProperties(m.props())
	if err != nil || s.headers == nil {
		return nil
	}
	d := decoder{b: s.headers}
	return d.table()
}

// newMessage returns an empty message. One whose data (routing key, properties and body)
// takes at most size octets, when that is small, has its buffer in the same allocation:
// one object per message on the publish path instead of two. Larger ones get nil data.
func newMessage(size int) *message {
	if i := inlineClass(size); i >= 0 {
		return inlineMessages[i].alloc()
	}
	return new(message)
}

// inlineClass is the index in inlineMessages of the room newMessage gives a message of
// size octets, or -1 when it has none.
func inlineClass(size int) int {
	for i := range inlineMessages {
		if size <= inlineMessages[i].room {
			return i
		}
	}
	return -1
}

// inlineMessages are the rooms a message can have inline, each making the allocation
// fill a Go size class: a message is 88 octets, and an object of more than 512 that holds
// pointers carries an 8-octet header.
var inlineMessages = [...]struct {
	room  int
	alloc func() *message
}{
	{40, allocInline[room40]},
	{72, allocInline[room72]},
	{104, allocInline[room104]},
	{168, allocInline[room168]},
	{296, allocInline[room296]},
	{424, allocInline[room424]},
	{672, allocInline[room672]},
	{928, allocInline[room928]},
	{1184, allocInline[room1184]},
	{1440, allocInline[room1440]},
	{1952, allocInline[room1952]},
}

// inlineMessage is a message with its data buffer in the same allocation.
type inlineMessage[R any, P interface {
	*R
	bytes() []byte
}] struct {
	m message
	r R
}

// allocInline returns an empty message whose data is the room R beside it.
func allocInline[R any, P interface {
	*R
	bytes() []byte
}]() *message {
	x := new(inlineMessage[R, P])
	x.m.data = P(&x.r).bytes()
	return &x.m
}

type (
	room40   [40]byte
	room72   [72]byte
	room104  [104]byte
	room168  [168]byte
	room296  [296]byte
	room424  [424]byte
	room672  [672]byte
	room928  [928]byte
	room1184 [1184]byte
	room1440 [1440]byte
	room1952 [1952]byte
)

func (r *room40) bytes() []byte   { return r[:0] }
func (r *room72) bytes() []byte   { return r[:0] }
func (r *room104) bytes() []byte  { return r[:0] }
func (r *room168) bytes() []byte  { return r[:0] }
func (r *room296) bytes() []byte  { return r[:0] }
func (r *room424) bytes() []byte  { return r[:0] }
func (r *room672) bytes() []byte  { return r[:0] }
func (r *room928) bytes() []byte  { return r[:0] }
func (r *room1184) bytes() []byte { return r[:0] }
func (r *room1440) bytes() []byte { return r[:0] }
func (r *room1952) bytes() []byte { return r[:0] }

// deque is a ring buffer. It grows by doubling, and shrinks when a window of len(buf) pops
// never saw it an eighth full: a queue whose depth swings keeps its buffer rather than
// shrinking and regrowing it on every swing.
type deque[T any] struct {
	buf  []T
	head int
	n    int
	peak int // the most elements held in this window
	pops int // pops in this window
}

// maxIdleDeque is the largest buffer a deque keeps once empty: a queue that drained a
// large backlog gives its buffer back at once.
const maxIdleDeque = 1 << 18

func (d *deque[T]) len() int { return d.n }

func (d *deque[T]) push(v T) { *d.pushBack() = v }

// pushBack adds a zero element at the back and returns it, to be filled in place: an
// element too large for registers (unacked) is then not built elsewhere and copied, which
// stalls after narrow stores.
func (d *deque[T]) pushBack() *T {
	if d.n == len(d.buf) {
		d.resize(max(16, 2*len(d.buf)))
	}
	p := &d.buf[(d.head+d.n)&(len(d.buf)-1)]
	d.n++
	d.peak = max(d.peak, d.n)
	return p
}

func (d *deque[T]) front() *T { return &d.buf[d.head] }

// at returns the i-th element from the front.
func (d *deque[T]) at(i int) *T { return &d.buf[(d.head+i)&(len(d.buf)-1)] }

func (d *deque[T]) pop() T {
	var zero T
	v := d.buf[d.head]
	d.buf[d.head] = zero
	d.head = (d.head + 1) & (len(d.buf) - 1)
	d.n--
	if d.n == 0 && len(d.buf) >= maxIdleDeque {
		*d = deque[T]{}
		return v
	}
	if d.pops++; len(d.buf) > 1024 && d.pops >= len(d.buf) {
		if d.peak < len(d.buf)/8 {
			d.resize(max(16, 1<<bits.Len(uint(2*d.peak))))
		}
		d.pops, d.peak = 0, d.n
	}
	return v
}

func (d *deque[T]) resize(size int) {
	buf := make([]T, size)
	for i := 0; i < d.n; i++ {
		buf[i] = d.buf[(d.head+i)&(len(d.buf)-1)]
	}
	d.buf, d.head = buf, 0
}

func (d *deque[T]) clear() { *d = deque[T]{} }

// readyList is a queue's ready messages in memory: one deque, or for a priority queue one
// per priority, highest first out. A queue without x-max-priority pays a nil check.
type readyList struct {
	d   deque[qentry] // the messages of a queue without priorities
	pri *levels       // a priority queue's; nil without priorities
}

// levels are a priority queue's ready messages.
type levels struct {
	by  []deque[qentry] // by[p] holds priority p
	n   int             // messages in all
	top int             // no level above top holds a message
}

// newPriorityReady makes the ready list of a queue with priorities 0 to max.
func newPriorityReady(max uint8) readyList {
	return readyList{pri: &levels{by: make([]deque[qentry], int(max)+1)}}
}

func (r *readyList) len() int {
	if r.pri == nil {
		return r.d.len()
	}
	return r.pri.n
}

// head is the deque the next message comes from. r must not be empty.
func (r *readyList) head() *deque[qentry] {
	l := r.pri
	if l == nil {
		return &r.d
	}
	for l.by[l.top].len() == 0 {
		l.top--
	}
	return &l.by[l.top]
}

// priorityOf is the level a message goes to: its priority, at most the highest.
func (r *readyList) priorityOf(m *message) int { return min(int(m.priority), len(r.pri.by)-1) }

func (r *readyList) push(e qentry) {
	l := r.pri
	if l == nil {
		r.d.push(e)
		return
	}
	p := r.priorityOf(e.msg)
	l.by[p].push(e)
	l.n++
	l.top = max(l.top, p)
}

func (r *readyList) front() *qentry { return r.head().front() }

func (r *readyList) pop() qentry {
	e := r.head().pop()
	if r.pri != nil {
		r.pri.n--
	}
	return e
}

// each calls fn with every ready message, in no particular order.
func (r *readyList) each(fn func(e *qentry)) {
	if r.pri == nil {
		for i := range r.d.len() {
			fn(r.d.at(i))
		}
		return
	}
	for p := range r.pri.by {
		for i := range r.pri.by[p].len() {
			fn(r.pri.by[p].at(i))
		}
	}
}

func (r *readyList) clear() {
	if r.pri == nil {
		r.d.clear()
		return
	}
	for p := range r.pri.by {
		r.pri.by[p].clear()
	}
	r.pri.n, r.pri.top = 0, 0
}

// qentry is a message's place in one queue.
type qentry struct {
	msg     *message
	seq     uint64 // the queue's sequence number: its order
	expires int64  // Unix milliseconds after which it is dropped at the head; 0: never
	entryMarks
}

// entryMarks are a queue entry's small fields, one field of qentry: with four fields and
// 32 octets a qentry stays in registers when passed and stored. With six, the compiler
// copied each through memory with wide moves after narrow stores, which stall (fanout:
// a deque push was 2.5 % of the broker's CPU on one such instruction).
type entryMarks struct {
	redelivered bool
	atOnce      bool   // a time to live of 0: delivered at once or dropped (dropUntakenLocked)
	returns     uint32 // times it came back unacked, for x-delivery-limit
}

// queue holds messages for its consumers. Its critical sections are O(1) (O(log n) for a
// requeue) and do no blocking I/O: deliveries are appended to connection outboxes.
type queue struct {
	name string
	vh   *vhost
	// The flags sit together, which keeps the struct small.
	durable, exclusive, autoDelete bool
	single                         bool  // x-single-active-consumer: only q.active receives
	hadConsumer                    bool  // guarded by mu: for auto-delete
	deleted                        bool  // guarded by mu
	mayExpire                      bool  // guarded by mu: a ready message may have an expiry; false once none can
	owner                          *conn // exclusive queues: the declaring connection
	args                           table
	walID                          uint64                        // durable queues: the id log records use; 0 if not logged
	set                            atomic.Pointer[queueSettings] // what arguments and policies make of q; read with settings
	bindings                       []*binding                    // guarded by vh.mu; b.dslot is b's index

	mu         sync.Mutex
	wanted     atomic.Bool           // a dispatch is due: set by dispatch, cleared under mu by whoever does it
	stats      queueStats            // guarded by mu, except stats.settled: messages delivered, got, acked (metrics.go)
	ready      readyList             // guarded by mu: never delivered, in seq order (per priority)
	requeued   []qentry              // guarded by mu: a min-heap by seq; all older than ready
	nextSeq    uint64                // guarded by mu
	consumers  []*consumer           // guarded by mu: by x-priority, highest first; in arrival order within one
	groups     []consumerGroup       // guarded by mu: consumers' runs of equal priority, highest first
	active     *consumer             // guarded by mu: x-single-active-consumer: the one consumer that receives
	readyBytes int64                 // guarded by mu: body octets of the ready messages
	ramBytes   int64                 // guarded by mu: memCost of the ready messages in memory
	tail       *refQueue             // guarded by mu: ready messages paged out, after all of ready; nil until the first
	tailSeq    uint64                // guarded by mu: the seq of tail's front
	ahead      *readAhead            // guarded by mu: the window paged messages are read from; nil: none
	expiry     *time.Timer           // guarded by mu: drops expired messages at the head, when set
	expiryAt   int64                 // guarded by mu: when expiry fires, in Unix milliseconds
	lease      *time.Timer           // guarded by mu: deletes a queue with x-expires once unused that long
	lastUsed   atomic.Int64          // Unix milliseconds of the last basic.get, redeclare or consumer leaving
	counts     queueCounts           // guarded by mu
	enqueued   *deque[enqueueSample] // guarded by mu: when messages were enqueued, sampled; nil until the first
}

// enqueueSample says that the messages of a queue from seq on were enqueued at or after
// at (Unix milliseconds).
type enqueueSample struct {
	seq uint64
	at  int64
}

// maxEnqueueSamples bounds a queue's samples: one per 100 ms while it is enqueued to, so
// this many cover about seven minutes of a backlog that does not drain; past it the oldest
// go, and the head's age reads as that of the oldest sample kept.
const maxEnqueueSamples = 4096

// noteEnqueueLocked records, at most once per step of the server's clock, that seq was
// enqueued now. q.mu must be held.
func (q *queue) noteEnqueueLocked(seq uint64) {
	now := q.vh.now()
	if q.enqueued == nil {
		q.enqueued = &deque[enqueueSample]{}
	}
	if n := q.enqueued.len(); n > 0 && q.enqueued.at(n-1).at == now {
		return
	}
	// Samples no ready message needs go here too, not only when the age is read: an empty
	// queue keeps none, and in a queue without priorities none before its head.
	if q.messageCountLocked() == 0 {
		q.enqueued.clear()
	} else {
		q.trimEnqueuedLocked()
	}
	if q.enqueued.len() == maxEnqueueSamples {
		q.enqueued.pop()
	}
	q.enqueued.push(enqueueSample{seq: seq, at: now})
}

// headSeqLocked is the seq of the next ready message; q must not be empty. q.mu must be
// held.
func (q *queue) headSeqLocked() uint64 {
	if q.ready.len() > 0 || len(q.requeued) > 0 {
		return q.peekLocked().seq
	}
	return q.tailSeq
}

// trimEnqueuedLocked drops the samples before the head of a queue without priorities (its
// head has the lowest seq). q must not be empty; q.mu must be held.
func (q *queue) trimEnqueuedLocked() {
	if q.ready.pri != nil || q.enqueued == nil {
		return
	}
	seq, d := q.headSeqLocked(), q.enqueued
	for d.len() > 1 && d.at(1).seq <= seq {
		d.pop()
	}
}

// headEnqueuedLocked returns when the next ready message was enqueued (Unix milliseconds,
// within the clock's 100 ms step), as the broker saw it: not a publisher's timestamp
// property. Messages recovered at a start count from the start, and a message requeued
// after its queue emptied from the next enqueue. ok is false when the queue is empty. q.mu
// must be held.
func (q *queue) headEnqueuedLocked() (at int64, ok bool) {
	if q.messageCountLocked() == 0 || q.enqueued == nil {
		return 0, false
	}
	q.trimEnqueuedLocked()
	seq, d := q.headSeqLocked(), q.enqueued
	// The last sample at or before seq; samples are in seq order.
	lo, hi := 0, d.len()
	for lo < hi {
		if mid := (lo + hi) / 2; d.at(mid).seq <= seq {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == 0 {
		if d.len() == 0 {
			return 0, false
		}
		return d.at(0).at, true // older than every sample kept
	}
	return d.at(lo - 1).at, true
}

// queueCounts count what went into a queue, for the management API's message_stats (the
// deliveries are in stats).
type queueCounts struct {
	published uint64      // messages enqueued
	sample    *rateSample // the last sample of the rates; nil until the API asks for them
}

// messageCountLocked is the number of ready messages. q.mu must be held.
func (q *queue) messageCountLocked() int { return q.ready.len() + len(q.requeued) + q.tail.len() }

// messageCount is the number of ready messages.
func (q *queue) messageCount() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.expireLocked()
	return q.messageCountLocked()
}

func (q *queue) consumerCount() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.consumers)
}

// enqueue adds a message and delivers what it can. It reports false when the queue is
// full and its x-overflow is reject-publish: the message is refused.
func (q *queue) enqueue(m *message) bool {
	q.mu.Lock()
	defer q.unlockAndDispatch()
	accepted, _ := q.enqueueLocked(m, 0)
	return accepted
}

// enqueueLocked is enqueue with q.mu held. batchAt, when not 0, is the clock reading
// (Unix milliseconds) of the batch m is part of (conn.flushRouted): m's expiry counts from
// it, one reading for the whole batch; a queue with x-overflow reject-publish refuses
// nothing, as the batch comes from publishes routed when it did not reject, and whose
// confirms are counted; and a queue with consumers does not dispatch: the caller does,
// once for the batch. It reports whether the queue accepted m, and whether it paged it:
// the queue then keeps its record on disk, not m itself. q.mu must be held.
func (q *queue) enqueueLocked(m *message, batchAt int64) (accepted, paged bool) {
	batch, arrived := batchAt != 0, batchAt
	if qttl := q.settings().ttl; !batch && (qttl != 0 || m.ttl != 0) {
		arrived = time.Now().UnixMilli() // read only for a message that may expire
	}
	e := qentry{msg: m, expires: expiresAtFrom(arrived, q.settings().ttl, m.ttl)}
	e.atOnce = e.expires != 0 && e.expires == arrived // a time to live of 0
	if e.expires != 0 {
		q.mayExpire = true
	}
	if q.deleted {
		// Routed before the delete: release the hold logPublish gave q on m.
		if m.wal != nil && q.walID != 0 && q.vh.store != nil {
			one := [1]*message{m}
			q.vh.store.dropQueue(q, one[:])
		}
		return true, false
	}
	size := int64(m.size)
	if l := &q.settings().limits; !batch && l.rejectPublish && l.full(q.messageCountLocked()+1, q.readyBytes+size) {
		if !l.dlx || !q.deadLetterLocked(m, deathMaxlen) {
			q.settleOne(m)
		}
		return false, false
	}
	q.nextSeq++
	e.seq = q.nextSeq
	q.noteEnqueueLocked(e.seq)
	cost := m.memCost()
	// A priority queue keeps its messages in memory: a paged tail cannot be ordered by priority.
	paged = q.ready.pri == nil && (q.tail.len() > 0 || q.overShareLocked(cost) || q.vh.memoryHigh()) && q.pageOutLocked(e)
	if !paged {
		if q.tail.len() > 0 {
			// Paging failed: the message stays in memory, ahead of the paged ones, and
			// gives its number back so theirs stay consecutive.
			q.nextSeq--
			e.seq = q.tailSeq - 1
		}
		q.ready.push(e)
		q.ramBytes += cost
	}
	q.readyBytes += size
	q.counts.published++
	if len(q.consumers) > 0 {
		// Delivers first: what a consumer takes is not dropped. A batch dispatches once at
		// its end (flushRouted), but not in a priority queue (a burst delivered as it came,
		// not sorted by priority first).
		if !batch || q.ready.pri != nil {
			// A message alone in q, and so at its head, is judged by its arrival: one that
			// may expire meets a consumer that can take it however long the enqueueing
			// took, with x-message-ttl 0 too, as in RabbitMQ.
			var judge int64
			if q.messageCountLocked() == 1 {
				judge = arrived
			}
			q.dispatchWantedLocked(judge)
		}
	} else {
		q.dropUntakenLocked()
		q.dropOverLimitLocked()
	}
	if len(q.consumers) == 0 && e.expires != 0 {
		q.scheduleExpiryLocked()
	}
	return true, paged
}

// overShareLocked reports whether a message of cost more takes q's messages in memory past
// its share (vhost.pageOut). A queue with consumers may hold consumedShare times as much:
// its messages are on their way out, and paging what is delivered moments later costs
// more than it saves (the memory alarm still pages every queue). q.mu must be held.
func (q *queue) overShareLocked(cost int64) bool {
	limit := q.vh.pageOut
	if limit < 0 {
		return false
	}
	if len(q.consumers) > 0 {
		limit *= consumedShare
	}
	return q.ramBytes+cost > limit
}

// consumedShare is how many times its share of memory a queue with consumers may hold.
const consumedShare = 64

// newQueue makes a queue of vh with these arguments (qa is what they make of it) and
// vh's policies, not yet in vh. vh.mu must be held, or vh not yet serving.
func newQueue(name string, vh *vhost, durable, autoDelete bool, args table, qa queueArgs) *queue {
	q := &queue{name: name, vh: vh, durable: durable, autoDelete: autoDelete, args: args, single: qa.single}
	if qa.priorities {
		q.ready = newPriorityReady(qa.maxPriority)
	}
	q.setArgsLocked(vh.policies.queueArgs(name, args, qa))
	return q
}

// queueSettings is what a queue's arguments and policies make of it: x-message-ttl (ttl),
// x-expires (expires, milliseconds unused before it is deleted; 0: never), the dead-letter
// target (dead; nil: none), x-delivery-limit plus one (deliveryLimit; 0: none),
// x-consumer-timeout (consumerTimeout, milliseconds; 0: the server's), the length limits,
// and the names of the policies applied ("": none). A change replaces it whole, so it is
// read without q.mu. Queues with none of these share plainSettings.
type queueSettings struct {
	queueArgs
	policy, operatorPolicy string
}

// plainSettings are those of a queue without arguments or policies.
var plainSettings = func() *queueSettings {
	qa, _, _ := parseQueueArgs(nil)
	return &queueSettings{queueArgs: qa}
}()

// settings returns what q's arguments and policies make of it.
func (q *queue) settings() *queueSettings {
	if s := q.set.Load(); s != nil {
		return s
	}
	return plainSettings // a queue made in a test without newQueue
}

// setArgsLocked sets what arguments and policies make of q, and reports whether its
// x-expires changed. q.mu must be held, or q not yet shared.
func (q *queue) setArgsLocked(qa queueArgs, policy, operatorPolicy string) (expiresChanged bool) {
	s := &queueSettings{qa, policy, operatorPolicy}
	if *s == *plainSettings {
		s = plainSettings
	}
	var was int64
	if old := q.set.Swap(s); old != nil {
		was = old.expires
	}
	return was != s.expires
}

// ttl is a time to live in milliseconds, kept plus one so that the zero value means none.
type ttl int64

func newTTL(ms int64) ttl { return ttl(ms + 1) }

// expiresAtFrom returns when a message enqueued at now (Unix milliseconds) expires under
// the queue's and its own time to live (the shorter), or 0 when neither is set.
func expiresAtFrom(now int64, queue, msg ttl) int64 {
	t := queue
	if t == 0 || msg != 0 && msg < t {
		t = msg
	}
	if t == 0 {
		return 0
	}
	return now + int64(t) - 1 // t ≤ maxTTL+1: no overflow
}

// expireLocked drops the expired messages at the head of the queue, as RabbitMQ does: a
// message with a later expiry ahead of them keeps them until it goes. They go to the
// queue's dead-letter exchange, if it has one (dropHeadLocked). q.mu must be held.
func (q *queue) expireLocked() { q.expireAtLocked(0) }

// expireAtLocked is expireLocked judging expiry by now, in Unix milliseconds, or by the
// clock when now is 0. q.mu must be held.
func (q *queue) expireAtLocked(now int64) {
	if !q.mayExpire {
		return
	}
	if q.messageCountLocked() == 0 {
		q.mayExpire = false // until a message with an expiry comes (enqueue, requeue)
		return
	}
	for q.messageCountLocked() > 0 {
		at := q.headExpiresLocked()
		if at == 0 {
			return
		}
		if now == 0 {
			now = time.Now().UnixMilli()
		}
		if now <= at || !q.dropHeadLocked(deathExpired) {
			return
		}
	}
}

// scheduleExpiryLocked arms the timer for the head's expiry, so expired messages leave
// a queue nobody consumes. q.mu must be held.
func (q *queue) scheduleExpiryLocked() {
	if q.deleted || q.messageCountLocked() == 0 {
		return
	}
	at := q.headExpiresLocked()
	if at == 0 || q.expiry != nil && q.expiryAt <= at {
		return
	}
	if q.expiry != nil {
		q.expiry.Stop()
	}
	q.expiryAt = at
	// at is at most maxTTL past the enqueue time, so the wait is bounded; clamp it anyway
	// so that no value, however it came about, makes the timer fire at once forever.
	wait := int64(1)
	if now := time.Now().UnixMilli(); at > now {
		wait = min(at-now, maxTTL) + 1
	}
	q.expiry = time.AfterFunc(time.Duration(wait)*time.Millisecond, q.onExpiry)
}

// onExpiry runs on the expiry timer.
func (q *queue) onExpiry() {
	q.mu.Lock()
	q.expiry = nil
	q.dispatchLocked() // drops what expired, delivers, and arms the timer again
	q.mu.Unlock()
}

// dispatch delivers ready messages to consumers with credit. It does not queue up behind
// the goroutine holding q.mu when that is enqueue or another dispatch, which dispatch for
// it on unlocking: a consumer's acks and a publisher contending for q.mu in turn would put
// the mutex in starvation mode, where every unlock hands the lock over and yields, and
// the publisher's reader spends a quarter of its time runnable but not running. A holder
// that does not look gets a few turns to finish; then dispatch waits for the lock.
func (q *queue) dispatch() {
	q.wanted.Store(true)
	for tries := 0; q.wanted.Load(); tries++ {
		if tries >= dispatchTries {
			q.mu.Lock()
		} else if !q.mu.TryLock() {
			runtime.Gosched()
			continue
		}
		if q.wanted.Swap(false) {
			q.dispatchLocked()
		}
		q.mu.Unlock()
	}
}

// dispatchTries is how many times dispatch finds q.mu held and yields before it waits.
const dispatchTries = 4

// unlockAndDispatch unlocks q.mu and does the dispatch another goroutine asked for while
// it was held.
func (q *queue) unlockAndDispatch() {
	q.mu.Unlock()
	if q.wanted.Load() {
		q.dispatch()
	}
}

// dispatchWantedLocked clears q.wanted before a dispatchAtLocked(now) that serves it.
// q.mu must be held.
func (q *queue) dispatchWantedLocked(now int64) {
	q.wanted.Store(false)
	q.dispatchAtLocked(now)
}

// dropUntakenLocked drops the messages at the head with a time to live of 0 that no
// consumer took: as in RabbitMQ, such a message is delivered at once or expires (to the
// dead-letter exchange, if any), rather than wait for a consumer's credit, even for the
// millisecond before its expiry falls due. q.mu must be held.
func (q *queue) dropUntakenLocked() {
	if !q.mayExpire {
		return // no entry has an expiry: none is marked
	}
	for (q.ready.len() > 0 || len(q.requeued) > 0) && q.peekLocked().atOnce {
		if !q.dropHeadLocked(deathExpired) {
			return
		}
	}
}

// dropOverLimitLocked makes room as drop-head does: the oldest ready messages go (to the
// dead-letter exchange, if any) while the queue is over x-max-length or -bytes. A head that
// cannot go yet stops it; dispatch comes back. q.mu must be held.
func (q *queue) dropOverLimitLocked() {
	l := &q.settings().limits
	for l.full(q.messageCountLocked(), q.readyBytes) && q.messageCountLocked() > 0 {
		if !q.dropHeadLocked(deathMaxlen) {
			return
		}
	}
}

// dispatchLocked delivers ready messages round-robin to consumers with credit, until
// either runs out. q.mu must be held.
func (q *queue) dispatchLocked() { q.dispatchAtLocked(0) }

// dispatchAtLocked is dispatchLocked judging expiry by now, in Unix milliseconds, or by
// the clock when now is 0. q.mu must be held.
func (q *queue) dispatchAtLocked(now int64) {
	q.expireAtLocked(now)
	q.deliverLocked(now)
	q.dropUntakenLocked()
	q.dropOverLimitLocked()
	q.scheduleExpiryLocked()
}

// deliverLocked is dispatchAtLocked's delivery loop. q.mu must be held.
func (q *queue) deliverLocked(now int64) {
	var run deliveryRun
	defer run.end()
	for len(q.consumers) > 0 && q.messageCountLocked() > 0 {
		if at := q.headExpiresLocked(); at != 0 {
			if now == 0 {
				now = time.Now().UnixMilli() // once per run, and after each read from disk
			}
			if now > at {
				run.end() // expiry may dead-letter: route, and lock other queues
				n := q.messageCountLocked()
				q.expireAtLocked(now)
				if q.messageCountLocked() == n {
					return // the head cannot be dropped before the log's next batch (dispatchAfterBatch)
				}
				continue
			}
		}
		if q.ready.len() == 0 && len(q.requeued) == 0 {
			run.end() // fillLocked reads from disk
			now = 0   // which takes a while: the clock is read again
		}
		if notYet, err := q.fillLocked(); notYet {
			q.vh.store.dispatchAfterBatch(q)
			return
		} else if err != nil {
			// The message would have gone to the next consumer: its channel closes.
			ch := q.nextConsumerLocked().ch
			ch.mu.Lock()
			ch.killLocked(err)
			ch.mu.Unlock()
			return
		}
		delivered, local := q.offerLocked(q.peekLocked(), &run)
		if delivered {
			q.popLocked()
			continue
		}
		if !local || !q.deliverAheadLocked(&run) {
			return
		}
	}
}

// peekLocked returns the next ready message. q.mu must be held.
func (q *queue) peekLocked() qentry {
	if q.requeuedFirstLocked() {
		return q.requeued[0]
	}
	return *q.ready.front()
}

// popLocked removes and returns the next ready message. q.mu must be held.
func (q *queue) popLocked() qentry {
	var e qentry
	if q.requeuedFirstLocked() {
		e = q.heapPopLocked()
	} else {
		e = q.ready.pop()
	}
	q.took(e)
	return e
}

// requeuedFirstLocked reports whether the next message is a requeued one: they are older
// than every other ready one, so first, but in a priority queue only within their
// priority. q.mu must be held.
func (q *queue) requeuedFirstLocked() bool {
	if len(q.requeued) == 0 {
		return false
	}
	if q.ready.pri == nil || q.ready.len() == 0 {
		return true
	}
	return q.ready.priorityOf(q.requeued[0].msg) >= q.ready.priorityOf(q.ready.front().msg)
}

// requeuedBefore orders the requeued heap: by seq, and in a priority queue by priority
// first, highest first.
func (q *queue) requeuedBefore(a, b qentry) bool {
	if q.ready.pri != nil {
		if pa, pb := q.ready.priorityOf(a.msg), q.ready.priorityOf(b.msg); pa != pb {
			return pa > pb
		}
	}
	return a.seq < b.seq
}

// firstLocked returns up to n of the ready messages in memory, in the order they are
// delivered, without taking them. q.mu must be held.
func (q *queue) firstLocked(n int) []qentry {
	requeued := slices.Clone(q.requeued)
	slices.SortFunc(requeued, func(a, b qentry) int {
		if q.requeuedBefore(a, b) {
			return -1
		}
		return 1
	})
	var ready []qentry
	if q.ready.pri == nil {
		for i := 0; i < q.ready.d.len() && i < n; i++ {
			ready = append(ready, *q.ready.d.at(i))
		}
	} else {
		for p := len(q.ready.pri.by) - 1; p >= 0 && len(ready) < n; p-- {
			for i := 0; i < q.ready.pri.by[p].len() && len(ready) < n; i++ {
				ready = append(ready, *q.ready.pri.by[p].at(i))
			}
		}
	}
	out := make([]qentry, 0, n)
	for len(out) < n && (len(requeued) > 0 || len(ready) > 0) {
		if len(requeued) > 0 && (len(ready) == 0 || q.ready.pri == nil ||
			q.ready.priorityOf(requeued[0].msg) >= q.ready.priorityOf(ready[0].msg)) {
			out, requeued = append(out, requeued[0]), requeued[1:]
		} else {
			out, ready = append(out, ready[0]), ready[1:]
		}
	}
	return out
}

// took accounts for e leaving the ready messages. q.mu must be held.
func (q *queue) took(e qentry) {
	q.readyBytes -= int64(e.msg.size)
	q.ramBytes -= e.msg.memCost()
	if q.ahead != nil && q.tail.len() == 0 && q.ready.len() == 0 && len(q.requeued) == 0 {
		q.ahead = nil // an empty queue keeps no window of the disk in memory
	}
}

// requeueLocked puts a delivered message back in its original place, marked redelivered.
// q.mu must be held.
func (q *queue) requeueLocked(e qentry) {
	if q.deleted {
		return
	}
	if limit := q.settings().deliveryLimit; limit != 0 {
		// A message returned more often than x-delivery-limit is a poison message: it is
		// dead-lettered (or dropped), and the others carry their count in x-delivery-count.
		e.returns++
		if int64(e.returns) >= limit {
			if !q.deadLetterLocked(e.msg, deathDeliveryLimit) {
				q.settleOne(e.msg)
			}
			return
		}
		e.msg = e.msg.withHeader("x-delivery-count", int64(e.returns))
	}
	e.redelivered = true
	if e.expires != 0 {
		q.mayExpire = true
	}
	q.readyBytes += int64(e.msg.size)
	q.ramBytes += e.msg.memCost()
	h := append(q.requeued, e)
	for i := len(h) - 1; i > 0; {
		p := (i - 1) / 2
		if !q.requeuedBefore(h[i], h[p]) {
			break
		}
		h[p], h[i] = h[i], h[p]
		i = p
	}
	q.requeued = h
}

func (q *queue) heapPopLocked() qentry {
	h := q.requeued
	top := h[0]
	last := len(h) - 1
	h[0] = h[last]
	h[last] = qentry{}
	h = h[:last]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(h) && q.requeuedBefore(h[l], h[m]) {
			m = l
		}
		if r < len(h) && q.requeuedBefore(h[r], h[m]) {
			m = r
		}
		if m == i {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	if len(h) == 0 {
		h = nil
	}
	q.requeued = h
	return top
}

// requeue puts delivered messages back and redelivers what it can.
func (q *queue) requeue(es []qentry) {
	q.mu.Lock()
	if q.deleted {
		var logged []*message
		for _, e := range es {
			if e.msg.wal != nil {
				logged = append(logged, e.msg)
			}
		}
		if q.walID != 0 && q.vh.store != nil {
			q.vh.store.dropQueue(q, logged)
		}
	}
	for _, e := range es {
		q.requeueLocked(e)
	}
	q.dispatchLocked()
	q.mu.Unlock()
}

// purge drops every ready message and returns how many there were. Unacked messages stay.
func (q *queue) purge() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := q.messageCountLocked()
	if q.walID != 0 && q.vh.store != nil {
		q.vh.store.settle(q, q.readyLoggedLocked())
	}
	q.dropTailLocked(true)
	q.ready.clear()
	q.requeued = nil
	q.readyBytes, q.ramBytes = 0, 0
	return n
}

// readyLoggedLocked lists the ready messages that are in the log. q.mu must be held.
func (q *queue) readyLoggedLocked() []*message {
	var msgs []*message
	for _, e := range q.requeued {
		if e.msg.wal != nil {
			msgs = append(msgs, e.msg)
		}
	}
	q.ready.each(func(e *qentry) {
		if e.msg.wal != nil {
			msgs = append(msgs, e.msg)
		}
	})
	return msgs
}

// propertiesToEdit decodes m's properties and returns them with a copy of their headers
// that has room for extra more.
func (m *message) propertiesToEdit(extra int) (properties, table) {
	var p properties
	d := decoder{b: m.props()}
	p.decode(&d)
	h := make(table, len(p.Headers)+extra)
	for k, v := range p.Headers {
		h[k] = v
	}
	return p, h
}

// withHeader returns a copy of m with one header set; the copy shares m's log place.
func (m *message) withHeader(name string, v any) *message {
	p, h := m.propertiesToEdit(1)
	h[name] = v
	p.Headers = h
	props := p.encode(nil)
	c := *m
	c.data = append(append(append(make([]byte, 0, int(m.keyLen)+len(props)+int(m.size)), m.routingKey()...), props...), m.body()...)
	c.propsLen = uint32(len(props))
	return &c
}

// renewLease starts q's x-expires period again: it was used (basic.get, redeclare, its last
// consumer left, or the broker started). A queue without x-expires pays one comparison.
func (q *queue) renewLease() {
	if q.settings().expires == 0 {
		return
	}
	q.mu.Lock()
	q.renewLeaseLocked()
	q.mu.Unlock()
}

// renewLeaseLocked is renewLease with q.mu held.
func (q *queue) renewLeaseLocked() {
	expires := q.settings().expires
	if expires == 0 || q.deleted {
		return
	}
	q.lastUsed.Store(time.Now().UnixMilli())
	if q.lease == nil {
		q.lease = time.AfterFunc(time.Duration(expires)*time.Millisecond, q.onLease)
	}
}

// onLease runs on the lease timer: a queue unused for x-expires is deleted, as RabbitMQ
// does (its messages with it, durable ones from the log); one used meanwhile waits for the
// rest of its period, and one with consumers for its last consumer to leave.
func (q *queue) onLease() {
	q.mu.Lock()
	q.lease = nil
	if q.deleted || len(q.consumers) > 0 || q.settings().expires == 0 {
		q.mu.Unlock()
		return
	}
	if left := q.lastUsed.Load() + q.settings().expires - time.Now().UnixMilli(); left > 0 {
		q.lease = time.AfterFunc(time.Duration(left)*time.Millisecond, q.onLease)
		q.mu.Unlock()
		return
	}
	q.mu.Unlock()
	unused := func() bool {
		expires := q.settings().expires
		if q.deleted || len(q.consumers) > 0 || expires == 0 || q.lastUsed.Load()+expires > time.Now().UnixMilli() {
			if !q.deleted && q.lease == nil && len(q.consumers) == 0 && expires != 0 {
				q.lease = time.AfterFunc(time.Duration(expires)*time.Millisecond, q.onLease)
			}
			return false
		}
		return true
	}
	if q.vh.deleteQueueIf(q, unused) == 0 && !q.isDeleted() {
		return
	}
	q.vh.log().Info("queue expired (x-expires) and was deleted", "queue", q.name, "vhost", q.vh.name)
}

// unacked is a delivery waiting for its ack, in a channel's list ordered by tag.
type unacked struct {
	tag  uint64
	q    *queue
	e    qentry
	c    *consumer // nil for basic.get
	done bool      // settled out of order; dropped when it reaches the front
	at   int64     // when it was delivered, Unix milliseconds (Server.clock); 0: unknown
}

// queueDeclare handles queue.declare: "" gets a server name, amq.* is 403, an inequivalent
// redeclare 406, another connection's exclusive queue 405.
func (ch *channel) queueDeclare(d *decoder) error {
	m := queueDeclare{}
	if m.decode(d); d.err != nil {
		return nil
	}
	vh := ch.vh()
	name := m.Queue
	if m.Passive {
		q, err := ch.lookupQueue(name, permNone)
		if err != nil {
			return err
		}
		ch.lastQueue = q.name
		return ch.reply(m.NoWait, &queueDeclareOk{Queue: q.name, MessageCount: uint32(q.messageCount()), ConsumerCount: uint32(q.consumerCount())})
	}
	if name == "" {
		name = randomName("amq.gen-")
	} else if reservedName(name) {
		return accessRefused("queue name '" + name + "' contains reserved prefix 'amq.*'")
	}
	if err := ch.allowed(permConfigure, resQueue, name); err != nil {
		return err
	}
	// The stricter of Config.MaxQueuesPerVhost and the vhost's max-queues; negative is none.
	limit := stricterLimit(ch.c.s.cfg.MaxQueuesPerVhost, ch.c.s.auth.Load().vhostLimit(vh.name).maxQueues)
	vh.mu.Lock()
	if vh.deleted {
		vh.mu.Unlock()
		return vhostDeleted(vh.name)
	}
	q := vh.queues[name]
	created := q == nil
	if created && limit >= 0 && len(vh.queues) >= limit {
		vh.mu.Unlock()
		return preconditionFailed("cannot declare queue '" + name + "': queue limit in vhost '" + vh.name + "' (" + strconv.Itoa(limit) + ") is reached")
	}
	if created {
		qa, bad, err := parseQueueArgs(m.Arguments)
		if err != nil {
			vh.mu.Unlock()
			return preconditionFailed("invalid arg '" + bad + "' for " + describeQueue(name, vh.name) + ": " + err.Error())
		}
		if qa.dead != nil {
			// As in RabbitMQ: dead-lettering reads the queue and writes the exchange.
			if err := ch.allowed(permRead, resQueue, name); err != nil {
				vh.mu.Unlock()
				return err
			}
			if err := ch.allowed(permWrite, resExchange, qa.dead.exchange); err != nil {
				vh.mu.Unlock()
				return err
			}
		}
		q = newQueue(name, vh, m.Durable, m.AutoDelete, m.Arguments, qa)
		q.exclusive = m.Exclusive
		if m.Exclusive {
			q.owner = ch.c
		}
		vh.queues[name] = q
		if vh.store != nil && m.Durable && !m.Exclusive && !m.AutoDelete {
			q.walID = vh.store.newQueueID()
			vh.logLocked(recQueueDeclare, queueRecord(vh.name, q))
		}
	}
	q.renewLease() // a declare, new or again, starts x-expires' period (under vh.mu: see onLease)
	vh.mu.Unlock()
	if q.walID != 0 {
		if err := vh.syncTopology(); err != nil {
			return err
		}
	}
	if created {
		if m.Exclusive {
			ch.c.exclusive = append(ch.c.exclusive, q)
		}
	} else {
		if err := ch.checkOwner(q); err != nil {
			return err
		}
		if err := q.equivalent(&m); err != nil {
			return err
		}
	}
	ch.countDeclared(created)
	ch.lastQueue = name
	return ch.reply(m.NoWait, &queueDeclareOk{Queue: name, MessageCount: uint32(q.messageCount()), ConsumerCount: uint32(q.consumerCount())})
}

// equivalent checks a redeclare against the queue: flags and x- arguments must match.
func (q *queue) equivalent(m *queueDeclare) error {
	diff := func(arg string, got, have bool) error {
		return preconditionFailed("inequivalent arg '" + arg + "' for " + describeQueue(q.name, q.vh.name) +
			": received '" + strconv.FormatBool(got) + "' but current is '" + strconv.FormatBool(have) + "'")
	}
	switch {
	case m.Exclusive != q.exclusive:
		// RabbitMQ checks exclusive access first, and a differing exclusive flag fails it.
		return resourceLocked("cannot obtain exclusive access to locked " + describeQueue(q.name, q.vh.name) +
			". It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.")
	case m.Durable != q.durable:
		return diff("durable", m.Durable, q.durable)
	case m.AutoDelete != q.autoDelete:
		return diff("auto_delete", m.AutoDelete, q.autoDelete)
	}
	for _, k := range equivalenceArgs {
		if !argEqual(m.Arguments[k], q.args[k]) {
			return preconditionFailed("inequivalent arg '" + k + "' for " + describeQueue(q.name, q.vh.name))
		}
	}
	return nil
}

// equivalenceArgs are the queue arguments RabbitMQ compares on redeclare; others may differ.
var equivalenceArgs = []string{
	"x-expires", "x-message-ttl", "x-dead-letter-exchange", "x-dead-letter-routing-key",
	"x-max-length", "x-max-length-bytes", "x-max-in-memory-length", "x-max-in-memory-bytes",
	"x-max-priority", "x-overflow", "x-queue-mode", "x-queue-type", "x-single-active-consumer",
	"x-queue-master-locator", "x-quorum-initial-group-size", "x-delivery-limit",
}

func (ch *channel) queueBind(d *decoder) error {
	m := queueBind{}
	if m.decode(d); d.err != nil {
		return nil
	}
	q, x, err := ch.bindEnds(m.Queue, m.Exchange, m.RoutingKey)
	if err != nil {
		return err
	}
	if err := checkHeadersArgs(x, m.Arguments); err != nil {
		return err
	}
	vh := ch.vh()
	vh.mu.Lock()
	if vh.deleted {
		vh.mu.Unlock()
		return vhostDeleted(vh.name)
	}
	logged := false
	if !x.deleted && !q.isDeleted() {
		key := m.RoutingKey
		if key == q.name {
			key = q.name // a key that names its queue, as many do, shares the queue's copy
		}
		b := &binding{source: x, queue: q, key: key, args: m.Arguments}
		if x.addBindingLocked(b) && durableBinding(b) {
			vh.logLocked(recBind, bindRecord(vh.name, b))
			logged = true
		}
	}
	vh.mu.Unlock()
	if logged {
		if err := vh.syncTopology(); err != nil {
			return err
		}
	}
	return ch.reply(m.NoWait, &queueBindOk{})
}

func (ch *channel) queueUnbind(d *decoder) error {
	m := queueUnbind{}
	if m.decode(d); d.err != nil {
		return nil
	}
	q, x, err := ch.bindEnds(m.Queue, m.Exchange, m.RoutingKey)
	if err != nil {
		return err
	}
	vh := ch.vh()
	vh.mu.Lock()
	logged := false
	if b := x.findBindingLocked(&binding{queue: q, key: m.RoutingKey, args: m.Arguments}); b != nil {
		if x.removeBindingLocked(b); durableBinding(b) {
			vh.logLocked(recUnbind, bindRecord(vh.name, b))
			logged = true
		}
		vh.autoDeleteLocked(x)
	}
	vh.mu.Unlock()
	if logged {
		if err := vh.syncTopology(); err != nil {
			return err
		}
	}
	return ch.reply(false, &queueUnbindOk{}) // queue.unbind has no no-wait
}

// bindEnds finds the queue and exchange of queue.bind or queue.unbind with key.
// Binding needs write on the queue and read on the exchange, and at a topic exchange the
// topic permission to read key. As in RabbitMQ, both permissions are checked before
// either end's existence; the topic permission needs the exchange, so it comes last
// (RabbitMQ checks it before the queue's existence: for a missing queue it answers 403
// where this answers 404).
func (ch *channel) bindEnds(qname, xname, key string) (*queue, *exchange, error) {
	if qname == "" {
		qname = ch.lastQueue
	}
	if xname == "" {
		return nil, nil, accessRefused("operation not permitted on the default exchange")
	}
	if err := ch.allowed(permWrite, resQueue, qname); err != nil {
		return nil, nil, err
	}
	if err := ch.allowed(permRead, resExchange, xname); err != nil {
		return nil, nil, err
	}
	q, err := ch.lookupQueue(qname, permNone)
	if err != nil {
		return nil, nil, err
	}
	x, err := ch.findExchange(xname)
	if err != nil {
		return nil, nil, err
	}
	if err := ch.topicReadAllowed(x, key); err != nil {
		return nil, nil, err
	}
	return q, x, nil
}

func (q *queue) isDeleted() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.deleted
}

func (ch *channel) queuePurge(d *decoder) error {
	m := queuePurge{}
	if m.decode(d); d.err != nil {
		return nil
	}
	q, err := ch.lookupQueue(m.Queue, permRead)
	if err != nil {
		return err
	}
	n := q.purge()
	if q.walID != 0 {
		if err := q.vh.syncTopology(); err != nil {
			return err
		}
	}
	return ch.reply(m.NoWait, &queuePurgeOk{MessageCount: uint32(n)})
}

func (ch *channel) queueDelete(d *decoder) error {
	m := queueDelete{}
	if m.decode(d); d.err != nil {
		return nil
	}
	q, err := ch.lookupQueue(m.Queue, permConfigure)
	if err != nil {
		var e *Error
		if errors.As(err, &e) && e.Code == replyNotFound && m.Queue != "" {
			// As in RabbitMQ, deleting a queue that does not exist succeeds.
			return ch.reply(m.NoWait, &queueDeleteOk{})
		}
		return err
	}
	q.mu.Lock()
	inUse, notEmpty := len(q.consumers) > 0, q.messageCountLocked() > 0
	q.mu.Unlock()
	if m.IfUnused && inUse {
		return preconditionFailed(describeQueue(q.name, q.vh.name) + " in use")
	}
	if m.IfEmpty && notEmpty {
		return preconditionFailed(describeQueue(q.name, q.vh.name) + " is not empty")
	}
	n := q.vh.deleteQueue(q)
	if q.walID != 0 {
		if err := q.vh.syncTopology(); err != nil {
			return err
		}
	}
	return ch.reply(m.NoWait, &queueDeleteOk{MessageCount: uint32(n)})
}

// parseExpiration reads the expiration property: milliseconds as a decimal string, as
// RabbitMQ requires, at most maxTTL. It returns the reason a value is refused, or "".
func parseExpiration(b []byte) (ttl, string) {
	if b == nil {
		return 0, ""
	}
	if len(b) == 0 {
		return 0, "not an integer"
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, "not an integer"
		}
		if n <= maxTTL {
			n = n*10 + int64(c-'0')
		}
	}
	if n > maxTTL {
		return 0, "{value_too_large," + string(b) + "}"
	}
	return newTTL(n), ""
}
