package amqp

import (
	"encoding/binary"
	"errors"
	"slices"
	"sync"
	"time"
)

// Dead-lettering, as RabbitMQ does it: a queue with x-dead-letter-exchange republishes the
// messages it drops (rejected or nacked without requeue, expired, pushed out by a length
// limit) to that exchange, with the history of their deaths in an x-death header. The move
// runs off the queue's lock, on a worker that lives while there is work: the source queue
// only hands the message over. A persistent message that moves into a durable queue is
// written as one record that settles it in the source and publishes it to the targets, so
// a crash leaves it in one place or the other, never in both and never in neither.

// Reasons a message is dead-lettered, as x-death names them.
const (
	deathRejected = "rejected"
	deathExpired  = "expired"
	deathMaxlen   = "maxlen"
	// deathDeliveryLimit: returned unacked more often than x-delivery-limit.
	deathDeliveryLimit = "delivery_limit"
)

// deadLetterTarget is a queue's x-dead-letter-exchange and x-dead-letter-routing-key.
type deadLetterTarget struct {
	exchange string
	key      string
	hasKey   bool // the routing key replaces the message's (and its CC header goes)
}

// parseDeadLetter reads x-dead-letter-exchange and x-dead-letter-routing-key; the error
// is RabbitMQ's reason, for "invalid arg '...' for queue ...: reason".
func parseDeadLetter(args table) (*deadLetterTarget, string, error) {
	x, hasX := args["x-dead-letter-exchange"]
	k, hasK := args["x-dead-letter-routing-key"]
	if hasX {
		if _, ok := x.(string); !ok {
			return nil, "x-dead-letter-exchange", errors.New("{unacceptable_type," + fieldType(x) + "}")
		}
	}
	if hasK {
		s, ok := k.(string)
		switch {
		case !ok:
			return nil, "x-dead-letter-routing-key", errors.New("{unacceptable_type," + fieldType(k) + "}")
		case !hasX:
			return nil, "x-dead-letter-routing-key", errors.New("routing_key_but_no_dlx_defined")
		case len(s) > 255:
			return nil, "x-dead-letter-routing-key", errors.New("longer than a routing key may be (255 octets)")
		}
	}
	if !hasX {
		return nil, "", nil
	}
	t := &deadLetterTarget{exchange: x.(string)}
	if hasK {
		t.key, t.hasKey = k.(string), true
	}
	return t, "", nil
}

// deadLetterJob is a message a queue dropped, on its way to the queue's dead-letter exchange.
type deadLetterJob struct {
	q      *queue
	t      *deadLetterTarget // q's dead-letter exchange when it dropped m
	m      *message
	reason string
}

// deadLetters is the server's dead-letter worker: jobs in order, and a goroutine that runs
// while there are any.
type deadLetters struct {
	s *Server

	mu      sync.Mutex
	jobs    []deadLetterJob // guarded by mu
	running bool            // guarded by mu: a worker goroutine is draining jobs
	later   []*queue        // guarded by mu: queues that wait for the backlog to drain
	closed  bool            // guarded by mu: the server stopped; jobs are refused
	warned  map[string]bool // guarded by mu: missing exchanges and cycles logged once (bounded)
	idle    sync.Cond       // broadcast when the worker stops, for tests and shutdown
}

func newDeadLetters(s *Server) *deadLetters {
	d := &deadLetters{s: s, warned: make(map[string]bool)}
	d.idle.L = &d.mu
	return d
}

// add hands messages over for dead-lettering. It never blocks on the work itself, so a
// queue may call it with its lock held.
func (d *deadLetters) add(jobs ...deadLetterJob) {
	if d.queue(jobs) {
		go d.run()
	}
}

// addNow is add for a caller that holds no lock: when no worker is running, the caller
// becomes the worker and has moved the jobs (and any added meanwhile) when it returns;
// otherwise they queue behind the running worker's, in order.
func (d *deadLetters) addNow(jobs ...deadLetterJob) {
	if d.queue(jobs) {
		d.run()
	}
}

// queue appends jobs; it reports whether no worker runs, the caller then being the one
// to start it. After the server stopped (a timer fired late) it drops them: the messages
// stay where the log has them, in their source queue, and come back there at the next start.
func (d *deadLetters) queue(jobs []deadLetterJob) (start bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return false
	}
	d.jobs = append(d.jobs, jobs...)
	start = !d.running
	d.running = true
	return start
}

// run moves jobs until none are left.
func (d *deadLetters) run() {
	for {
		d.mu.Lock()
		jobs := d.jobs
		d.jobs = nil
		if len(jobs) == 0 {
			later := d.later
			d.later = nil
			if len(later) > 0 {
				d.mu.Unlock()
				for _, q := range later {
					q.dispatch() // they dead-letter their next paged messages now
				}
				continue
			}
			d.running = false
			d.idle.Broadcast()
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
		for _, j := range jobs {
			d.move(j)
		}
	}
}

// deadLetterBacklog bounds the jobs waiting for the worker that a queue adds by reading
// paged messages back: an expiring paged backlog must not come back into memory at once.
const deadLetterBacklog = 256

// busy reports whether the worker's backlog is full; if so, q is dispatched again once it
// has drained. A queue calls it with its lock held.
func (d *deadLetters) busy(q *queue) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.jobs) < deadLetterBacklog {
		return false
	}
	if !slices.Contains(d.later, q) {
		d.later = append(d.later, q)
	}
	return true
}

// close drains the jobs handed over so far and refuses later ones.
func (d *deadLetters) close() {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	d.wait()
}

// wait returns once every job handed over so far is done.
func (d *deadLetters) wait() {
	d.mu.Lock()
	for d.running {
		d.idle.Wait()
	}
	d.mu.Unlock()
}

// warnOnce logs a warning the first time key is seen; at most maxWarned keys are kept.
func (d *deadLetters) warnOnce(key, msg string, args ...any) {
	d.mu.Lock()
	seen := d.warned[key]
	if !seen && len(d.warned) < maxWarned {
		d.warned[key] = true
	}
	d.mu.Unlock()
	if !seen {
		d.s.log.Warn(msg, args...)
	}
}

const maxWarned = 1024

// move dead-letters one message: it builds the message the dead-letter exchange receives,
// routes it, drops the targets that would close a cycle without a rejection in it, logs
// the move, and enqueues it.
func (d *deadLetters) move(j deadLetterJob) {
	q, t, vh := j.q, j.t, j.q.vh
	nm := deadLetterMessage(j.m, q.name, j.reason, t, time.Now())
	var rs routeSet
	vh.mu.RLock()
	x := vh.exchanges[t.exchange]
	switch {
	case x != nil && x.name == "":
		if tq := vh.queues[string(nm.routingKey())]; tq != nil {
			rs.queues = append(rs.queues, tq)
		}
	case x != nil:
		vh.routeLocked(x, nm, &rs)
	}
	vh.mu.RUnlock()
	if x == nil {
		d.warnOnce("x\x00"+vh.name+"\x00"+q.name+"\x00"+t.exchange,
			"dead-letter exchange does not exist; messages dead-lettered from the queue are dropped (logged once)",
			"vhost", vh.name, "queue", q.name, "exchange", t.exchange)
	}
	targets := rs.queues
	if j.reason != deathRejected {
		deaths, _ := nm.headers()["x-death"].([]any)
		n := 0
		for _, tq := range targets {
			if isDeathCycle(tq.name, deaths) {
				d.warnOnce("c\x00"+vh.name+"\x00"+tq.name+"\x00"+q.name,
					"message dropped: dead-lettering it would close a cycle of queues without a rejection in it (logged once per cycle)",
					"vhost", vh.name, "queue", tq.name, "from", q.name)
				continue
			}
			targets[n] = tq
			n++
		}
		targets = targets[:n]
	}
	// A delayed exchange may hold it (its x-delay is positive): one record still, with the
	// exchange's hold id among the targets.
	at := time.Now().UnixMilli()
	if st := vh.store; st != nil {
		st.logMove(q.walID, j.m, nm, holdIDs(loggedIDs(targets), rs.holds), at)
	}
	for _, tq := range targets {
		tq.enqueue(nm)
	}
	if len(rs.holds) > 0 {
		d.s.delays.hold(rs.holds, nm, at, rs.delay)
	}
}

// isDeathCycle reports whether dead-lettering a message into queue closes a cycle that
// RabbitMQ breaks: the message died in that queue before, and no death since (newest
// first, that one included) was a rejection. A cycle with a rejection is a retry loop.
func isDeathCycle(queue string, deaths []any) bool {
	for _, v := range deaths {
		e, _ := v.(table)
		if e["reason"] == deathRejected {
			return false
		}
		if e["queue"] == queue {
			return true
		}
	}
	return false
}

// deadLetterMessage is the message a dead-letter exchange receives for m, dead in queue for
// reason: its x-death history updated as RabbitMQ does (one entry per queue and reason,
// newest first, count incremented on a repeat), x-first-death-* set once, x-last-death-*
// each time, the expiration property moved into the entry, and the routing key replaced
// by x-dead-letter-routing-key when there is one (which drops CC).
func deadLetterMessage(m *message, queue, reason string, t *deadLetterTarget, now time.Time) *message {
	p, h := m.propertiesToEdit(6)
	keys := []any{string(m.routingKey())}
	if cc, ok := h["CC"].([]any); ok {
		for _, k := range cc {
			if s, ok := k.(string); ok {
				keys = append(keys, s)
			}
		}
	}
	entry := table{"count": int64(1), "reason": reason, "queue": queue, "time": timestamp(now.Unix()),
		"exchange": m.exchange, "routing-keys": keys}
	if p.Expiration != "" {
		entry["original-expiration"] = p.Expiration
	}
	deaths, had := h["x-death"].([]any)
	rest := make([]any, 0, len(deaths)+1)
	rest = append(rest, entry)
	for _, v := range deaths {
		if e, ok := v.(table); ok && e["queue"] == queue && e["reason"] == reason {
			again := make(table, len(e))
			for k, v := range e {
				again[k] = v
			}
			n, _ := intValue(e["count"])
			again["count"] = n + 1
			rest[0] = again
			continue
		}
		rest = append(rest, v)
	}
	h["x-death"] = rest
	if !had {
		h["x-first-death-reason"], h["x-first-death-queue"], h["x-first-death-exchange"] = reason, queue, m.exchange
	}
	h["x-last-death-reason"], h["x-last-death-queue"], h["x-last-death-exchange"] = reason, queue, m.exchange
	p.Expiration = ""
	key := m.routingKey()
	if t.hasKey {
		key = []byte(t.key)
		delete(h, "CC")
	}
	p.Headers = h
	props := p.encode(nil)
	body := m.body()
	data := make([]byte, 0, len(key)+len(props)+len(body))
	data = append(append(append(data, key...), props...), body...)
	return &message{exchange: t.exchange, data: data, keyLen: uint8(len(key)), propsLen: uint32(len(props)),
		size: uint32(len(body)), publisher: m.publisher, persistent: p.DeliveryMode == 2, priority: p.Priority}
}

// deadLetterLocked hands a message q drops over to its dead-letter exchange, and reports
// whether it did: false when q has none (or runs without a server, in tests), and the
// caller settles the message itself. q.mu must be held.
func (q *queue) deadLetterLocked(m *message, reason string) bool {
	t := q.settings().dead
	if t == nil || q.vh.dead == nil {
		return false
	}
	q.vh.dead.add(deadLetterJob{q: q, t: t, m: m, reason: reason})
	return true
}

// deadLetterRejected hands the messages of queues with a dead-letter exchange, rejected
// or nacked without requeue, over to it, and returns the others, to be settled.
// done is left as it was (the caller dispatches its queues); a new list is made only when
// some message goes to a dead-letter exchange.
//
// The caller holds no lock, so the moves are made before it returns when the worker is
// idle: a client that rejects, then looks in the dead-letter queue, finds the message there,
// as in RabbitMQ.
func deadLetterRejected(done []unacked) []unacked {
	var rest []unacked
	var jobs []deadLetterJob
	for i, u := range done {
		t := u.q.settings().dead
		if t == nil || u.q.vh.dead == nil {
			if rest != nil {
				rest = append(rest, u)
			}
			continue
		}
		if rest == nil {
			rest = append(make([]unacked, 0, len(done)), done[:i]...)
		}
		jobs = append(jobs, deadLetterJob{q: u.q, t: t, m: u.e.msg, reason: deathRejected})
	}
	if rest == nil {
		return done
	}
	jobs[0].q.vh.dead.addNow(jobs...)
	return rest
}

// logDeadLetter writes the move of a dead-lettered message: one record that settles old in
// src and publishes nm to the durable targets when nm is persistent and one is durable,
// else just the settlement of old (when it was logged).
func (st *store) logDeadLetter(src *queue, old, nm *message, targets []*queue) {
	st.logMove(src.walID, old, nm, loggedIDs(targets), time.Now().UnixMilli())
}

// logMove is logDeadLetter from the log queue srcID (0: none) to the log queues qids (durable
// queues, and delayed exchanges that hold nm), at at (Unix milliseconds).
func (st *store) logMove(srcID uint64, old, nm *message, qids []uint64, at int64) {
	srcLogged := old.wal != nil && srcID != 0
	if nm.persistent && len(qids) > 0 && st.w.noSpace.Load() {
		// The disk is full: the move cannot be written, and the reserve is for settlements.
		// The message goes on in memory; the source keeps its hold, so a restart brings it
		// back there.
		return
	}
	if !nm.persistent || len(qids) == 0 {
		if srcLogged {
			st.settleID(srcID, []*message{old})
		}
		return
	}
	var oldID uint64
	if srcLogged {
		oldID = old.wal.id
	} else {
		srcID = 0
	}
	st.w.waitRoom() // the worker waits for the log like a publisher
	st.mu.Lock()
	defer st.mu.Unlock()
	b := binary.BigEndian.AppendUint64(nil, srcID)
	b = binary.BigEndian.AppendUint64(b, oldID)
	b = binary.BigEndian.AppendUint64(b, uint64(at))
	if _, _, err := st.logMessageLocked(recDeadLetter, nm, b, qids); err != nil {
		// The message goes on in memory; the source's hold stays in the log.
		st.log.Error("cannot log a moved message (dead-lettered, redriven or fallen due); it is not durable in its new queues", "err", err)
		return
	}
	if srcLogged {
		st.unrefLocked(old, srcID)
	}
}

// Redrive moves the messages of a dead-letter queue back to where they first died: each is
// published again, headers and all, to the exchange of its first x-death entry with that
// entry's routing keys, oldest first. A message leaves the queue only once it is routed (in
// one log record with its new place when it is persistent); Redrive stops at the first one
// it cannot place: one without x-death, or that routes nowhere, which stays first in the
// queue. It returns how many messages moved.
func (s *Server) Redrive(vhost, name string) (int, error) {
	vh := s.vhost(vhost)
	if vh == nil {
		return 0, errors.New("amqp: no vhost '" + vhost + "'")
	}
	vh.mu.RLock()
	q := vh.queues[name]
	vh.mu.RUnlock()
	if q == nil {
		return 0, errors.New("amqp: no queue '" + name + "' in vhost '" + vhost + "'")
	}
	for moved := 0; ; {
		e, ok, err := q.peekForRedrive()
		if err != nil || !ok {
			return moved, err
		}
		nm, targets, err := vh.routeFirstDeath(e.msg)
		if err != nil {
			return moved, err
		}
		// Never back into the queue being drained: the redrive would take it again.
		targets = slices.DeleteFunc(targets, func(tq *queue) bool { return tq == q })
		if len(targets) == 0 {
			return moved, errors.New("amqp: the message's first death routes it only back to '" + name + "'")
		}
		q.mu.Lock()
		// In memory still (peeked), unless a consumer took it meanwhile.
		still := q.ready.len()+len(q.requeued) > 0 && q.peekLocked().seq == e.seq
		if still {
			q.popLocked()
		}
		q.mu.Unlock()
		if !still {
			continue
		}
		if vh.store != nil {
			vh.store.logDeadLetter(q, e.msg, nm, targets) // settled here, published there
		}
		for _, tq := range targets {
			tq.enqueue(nm)
		}
		moved++
	}
}

// peekForRedrive returns the queue's next ready message, read back into memory if it is
// paged; ok is false when there is none.
func (q *queue) peekForRedrive() (qentry, bool, error) {
	for try := 0; ; try++ {
		q.mu.Lock()
		q.expireLocked()
		if q.messageCountLocked() == 0 {
			q.mu.Unlock()
			return qentry{}, false, nil
		}
		notYet, err := q.fillLocked()
		if !notYet && err == nil {
			e := q.peekLocked()
			q.mu.Unlock()
			return e, true, nil
		}
		q.mu.Unlock()
		if err != nil {
			return qentry{}, false, err
		}
		if try == 3 {
			return qentry{}, false, errNotWritten
		}
		if serr := q.vh.store.flush(); serr != nil {
			return qentry{}, false, serr
		}
	}
}

// routeFirstDeath builds the copy of m to publish again where it first died, and finds its
// queues: the first x-death entry's exchange, routed by each of its routing keys.
func (vh *vhost) routeFirstDeath(m *message) (*message, []*queue, error) {
	h := m.headers()
	deaths, _ := h["x-death"].([]any)
	var first table
	for _, v := range deaths {
		if e, ok := v.(table); ok && e["queue"] == h["x-first-death-queue"] && e["reason"] == h["x-first-death-reason"] {
			first = e
		}
	}
	exchange, ok := first["exchange"].(string)
	keys, _ := first["routing-keys"].([]any)
	if !ok || len(keys) == 0 {
		return nil, nil, errors.New("amqp: a message without a first death to go back to")
	}
	key, _ := keys[0].(string)
	props := m.props()
	data := append(append(append(make([]byte, 0, len(key)+len(props)+int(m.size)), key...), props...), m.body()...)
	nm := &message{exchange: exchange, data: data, keyLen: uint8(len(key)), propsLen: uint32(len(props)),
		size: m.size, publisher: m.publisher}
	if s, err := scanProperties(props); err == nil { // read back, m does not know them
		nm.persistent, nm.priority = s.deliveryMode == 2, s.priority
	}
	var targets []*queue
	vh.mu.RLock()
	x := vh.exchanges[exchange]
	for _, k := range keys {
		k, _ := k.(string)
		var rs routeSet // one per key: a route set routes through each exchange once
		switch {
		case x == nil:
		case x.name == "":
			if tq := vh.queues[k]; tq != nil {
				rs.queues = append(rs.queues, tq)
			}
		default:
			probe := *nm
			probe.data, probe.keyLen = append([]byte(k), props...), uint8(len(k))
			rs.now = true // through delayed exchanges at once: a redrive is not held again
			vh.routeLocked(x, &probe, &rs)
		}
		for _, tq := range rs.queues {
			if !slices.Contains(targets, tq) {
				targets = append(targets, tq)
			}
		}
	}
	vh.mu.RUnlock()
	if len(targets) == 0 {
		return nil, nil, errors.New("amqp: the message's first death exchange '" + exchange + "' routes it nowhere")
	}
	return nm, targets, nil
}
