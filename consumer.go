package amqp

import "slices"

// A queue's consumers: their order by priority, single active consumer, round-robin
// offering, no-local look-ahead, and delivery to a consumer's channel, a run of deliveries
// to one channel at a time.

// consumer is a basic.consume subscription.
type consumer struct {
	tag       string
	ch        *channel
	q         *queue
	noAck     bool
	exclusive bool
	noLocal   bool
	prefetch  uint16 // per-consumer limit from basic.qos global=false; 0 is none
	priority  int64  // x-priority: higher goes first; 0 by default
	inflight  int    // guarded by ch.mu: delivered, unacked
}

// consumerGroup is a run of consumers of one priority in queue.consumers: it ends before
// index end, and rr is its round-robin position, counted from the run's start.
type consumerGroup struct {
	priority int64
	end      int
	rr       int
}

// offerLocked gives e to the consumer whose turn it is: with x-single-active-consumer the
// active one; otherwise, as in RabbitMQ, the next in round-robin order among those of the
// highest priority that have credit, a lower priority only when no higher one has. It
// reports whether e was delivered, and whether a no-local consumer refused it. q.mu must
// be held.
func (q *queue) offerLocked(e qentry, run *deliveryRun) (delivered, local bool) {
	if q.single {
		c := q.active
		if c.refuses(e.msg) {
			return false, true
		}
		return c.deliverLocked(e, run), false
	}
	start := 0
	for g := range q.groups {
		grp := &q.groups[g]
		n := grp.end - start
		for i := 0; i < n; i++ {
			c := q.consumers[start+(grp.rr+i)%n]
			if c.refuses(e.msg) {
				local = true
				continue
			}
			if c.deliverLocked(e, run) {
				grp.rr = (grp.rr + i + 1) % n
				return true, local
			}
		}
		start = grp.end
	}
	return false, local
}

// nextConsumerLocked returns the consumer the next message is offered to first. There
// must be one. q.mu must be held.
func (q *queue) nextConsumerLocked() *consumer {
	if q.single {
		return q.active
	}
	return q.consumers[q.groups[0].rr]
}

// maxLookahead bounds how far past the head a no-local consumer looks for a message it
// may take, so one that refuses the head does not stall the queue.
const maxLookahead = 64

// deliverAheadLocked gives a no-local consumer the first of the next few ready messages
// that it accepts; it reports whether it delivered one. q.mu must be held.
func (q *queue) deliverAheadLocked(run *deliveryRun) bool {
	for _, c := range q.consumers {
		if !c.noLocal || q.single && c != q.active {
			continue
		}
		if q.ready.len() == 0 {
			return false
		}
		h := q.ready.head() // a priority queue looks ahead within its highest priority
		for i := 0; i < h.len() && i < maxLookahead; i++ {
			e := *h.at(i)
			if c.refuses(e.msg) {
				continue
			}
			if !c.deliverLocked(e, run) {
				break
			}
			for j := i; j > 0; j-- {
				*h.at(j) = *h.at(j - 1)
			}
			q.ready.pop()
			q.took(e)
			return true
		}
	}
	return false
}

// refuses reports whether a no-local consumer must skip m, published on its own connection.
func (c *consumer) refuses(m *message) bool {
	return c.noLocal && m.publisher == c.ch.c.id
}

// addConsumer attaches c and sends ok (basic.consume-ok, unless nil) before the first
// delivery. An exclusive consumer needs the queue to itself, and no one attaches beside
// one: both refusals are 403 ACCESS_REFUSED. As in RabbitMQ, a queue with
// x-single-active-consumer refuses every exclusive consumer, and its first consumer
// becomes the active one, whatever its priority.
func (q *queue) addConsumer(c *consumer, ok method) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.deleted {
		return notFound("no queue '" + q.name + "' in vhost '" + q.vh.name + "'")
	}
	inUse := c.exclusive && (q.single || len(q.consumers) > 0)
	for _, o := range q.consumers {
		inUse = inUse || o.exclusive
	}
	if inUse {
		return accessRefused("queue '" + q.name + "' in vhost '" + q.vh.name + "' in exclusive use")
	}
	if ok != nil {
		c.ch.c.sendOn(c.ch.id, ok)
	}
	q.insertConsumerLocked(c)
	if q.single && q.active == nil {
		q.active = c
	}
	q.hadConsumer = true
	q.dispatchLocked()
	return nil
}

// insertConsumerLocked puts c after every consumer of its priority or higher, in a group
// of its priority. q.mu must be held.
func (q *queue) insertConsumerLocked(c *consumer) {
	g, start := 0, 0
	for ; g < len(q.groups) && q.groups[g].priority > c.priority; g++ {
		start = q.groups[g].end
	}
	if g < len(q.groups) && q.groups[g].priority == c.priority {
		q.consumers = slices.Insert(q.consumers, q.groups[g].end, c)
	} else {
		q.consumers = slices.Insert(q.consumers, start, c)
		q.groups = slices.Insert(q.groups, g, consumerGroup{priority: c.priority, end: start})
	}
	for ; g < len(q.groups); g++ {
		q.groups[g].end++
	}
}

// deleteConsumerLocked takes c out of the consumers and its group, keeping the group's
// round-robin turn; it reports whether c was there. q.mu must be held.
func (q *queue) deleteConsumerLocked(c *consumer) bool {
	i := slices.Index(q.consumers, c)
	if i < 0 {
		return false
	}
	q.consumers = slices.Delete(q.consumers, i, i+1)
	g, start := 0, 0
	for q.groups[g].end <= i {
		start = q.groups[g].end
		g++
	}
	for k := g; k < len(q.groups); k++ {
		q.groups[k].end--
	}
	grp := &q.groups[g]
	if grp.end == start {
		q.groups = slices.Delete(q.groups, g, g+1)
		return true
	}
	if grp.rr > i-start {
		grp.rr--
	}
	grp.rr %= grp.end - start
	return true
}

// removeConsumer detaches c; it reports whether the queue is auto-delete and now unused,
// so the caller deletes it. When c was a single active consumer, the next takes over as
// in RabbitMQ: the one of highest priority that came first.
func (q *queue) removeConsumer(c *consumer) (autoDelete bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.deleteConsumerLocked(c) && q.active == c {
		q.active = nil
		if len(q.consumers) > 0 {
			q.active = q.consumers[0]
			q.dispatchLocked()
		}
	}
	if len(q.consumers) == 0 {
		q.renewLeaseLocked()
	}
	return q.autoDelete && q.hadConsumer && len(q.consumers) == 0 && !q.deleted
}

// deliverLocked sends e to this consumer if it has credit, recording it as unacked unless
// the consumer is no-ack. It reports whether it did. run holds the channel's lock from
// one delivery to the next of the same dispatch. q.mu must be held.
func (c *consumer) deliverLocked(e qentry, run *deliveryRun) bool {
	ch := c.ch
	if ch.c.closing.Load() {
		// Nothing may follow connection.close; the messages stay for other consumers.
		return false
	}
	run.lock(ch)
	if !ch.canDeliverLocked(c) {
		return false
	}
	if ch.c.outLen.Load()+int64(run.bytes) > outboxHighWater {
		run.end()
		ch.c.waitForDrain(c.q)
		return false
	}
	ch.nextTag++
	if !c.noAck {
		u := ch.unacked.pushBack()
		u.tag, u.q, u.e, u.c, u.at = ch.nextTag, c.q, e, c, ch.c.s.clock.Load()
		c.inflight++
		ch.inflight++
	} else {
		c.q.settleOne(e.msg)
	}
	c.q.countDeliveryLocked(false, c.noAck, e.redelivered)
	run.add(delivery{msg: e.msg, consumerTag: &c.tag, tag: ch.nextTag, deliveryMarks: deliveryMarks{ch.id, e.redelivered}})
	return true
}

// deliveryRun is one dispatch's deliveries to the channel whose lock it holds: they go to
// its connection's outbox together (conn.queueDeliveries), so a run of deliveries to one
// consumer takes the channel's and the outbox's locks once, not once each. It is flushed
// and the lock released before anything that may take other locks, and at the end of the
// dispatch: frames that must follow a delivery on its channel need the channel's lock
// (channel.close) or come after the consumer is removed under the queue's (cancel-ok),
// and none may follow connection.close (queueDeliveries drops them), so order holds.
type deliveryRun struct {
	ch    *channel // locked; nil when none is
	n     int
	bytes int
	ds    [32]delivery
}

// lock makes ch the run's channel, ending the run of another.
func (r *deliveryRun) lock(ch *channel) {
	if r.ch == ch {
		return
	}
	r.end()
	ch.mu.Lock()
	r.ch = ch
}

// add queues d for the run's channel.
func (r *deliveryRun) add(d delivery) {
	r.ds[r.n] = d
	r.n++
	r.bytes += d.size()
	if r.n == len(r.ds) {
		r.flush()
	}
}

// flush hands the queued deliveries to the outbox.
func (r *deliveryRun) flush() {
	if r.n > 0 {
		r.ch.c.queueDeliveries(r.ds[:r.n])
		clear(r.ds[:r.n])
		r.n, r.bytes = 0, 0
	}
}

// end flushes the run and releases its channel's lock.
func (r *deliveryRun) end() {
	if r.ch != nil {
		r.flush()
		r.ch.mu.Unlock()
		r.ch = nil
	}
}
