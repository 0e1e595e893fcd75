package amqp

// Prometheus text output: the counters the broker keeps for it.

import (
	"sync/atomic"
)

// # Counters
//
// Message counts are kept per connection, in a connStats embedded in the conn, and summed
// only when they are read (a scrape, /api/overview). Each event is one atomic add on its
// connection's own counters, with no lock and no allocation: the connection's reader
// counts publishes, gets, acks and confirms; whichever goroutine delivers to one of its
// consumers counts the delivery, under the consumer's channel lock, on a cache line of its
// own. No counter is shared by all connections, so counting adds no contended cache line to
// the hot path. When a connection ends, Server.untrack folds its counts into
// serverMetrics.closed under Server.mu, where a reader takes them together with the list
// of open connections: a count is never lost nor read twice, and the sums never go down.
//
// Each queue counts its deliveries waiting for an ack (queue.pendingAcks, next to its
// lock, which both ends of a delivery take anyway); ready messages, consumers and the
// rest are read from the queues at scrape time.

// Counter indexes. The reader's counters come first; the deliverers' start on another
// cache line (8 unused slots apart).
const (
	cntReceivedConfirm    = iota // publishes on a channel in confirm mode
	cntRouted                    // publishes routed to at least one queue
	cntQueuePublished            // messages enqueued: one per queue a publish was routed to
	cntUnroutableDropped         // publishes routed nowhere, not mandatory
	cntUnroutableReturned        // publishes routed nowhere, mandatory: basic.return
	cntConfirmed                 // publishes confirmed with basic.ack
	cntGetManual                 // basic.get-ok, no-ack=false
	cntGetAuto                   // basic.get-ok, no-ack=true
	cntGetEmpty                  // basic.get-empty
	cntAcknowledged              // deliveries acknowledged with basic.ack
	cntChannelsOpened
	cntChannelsClosed
	cntQueuesDeclared // queue.declare, not passive, that succeeded
	cntQueuesCreated
	cntQueuesDeleted
	cntSize0    // received messages by body size: one counter per bucket of sizeBounds, then +Inf
	cntSizeSum  = cntSize0 + len(sizeBounds) + 1
	cntDeliver0 = cntSizeSum + 1 + 8 // the deliverers' counters, a cache line further on
)

const (
	cntConsumeManual = cntDeliver0 + iota // basic.deliver to a consumer with no-ack=false
	cntConsumeAuto                        // basic.deliver to a no-ack consumer
	cntRedelivered                        // deliveries and get-oks with redelivered set
	numCounters
)

// sizeBounds are the upper bounds of rabbitmq_message_size_bytes's buckets, RabbitMQ's
// (rabbit_msg_size_metrics); one more bucket takes what is larger.
var sizeBounds = [...]uint64{100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000, 100_000_000}

// counters is a set of message counts, added to atomically.
type counters [numCounters]atomic.Uint64

// counts is a sum of counters.
type counts [numCounters]uint64

// add adds what c holds to t.
func (t *counts) add(c *counters) {
	for i := range c {
		t[i] += c[i].Load()
	}
}

// received is the number of messages received from publishers: every one is counted once
// in the size histogram.
func (t *counts) received() uint64 {
	var n uint64
	for _, v := range t[cntSize0:cntSizeSum] {
		n += v
	}
	return n
}

// connStats are a connection's counters and gauges.
type connStats struct {
	n          counters
	publishers atomic.Int64 // the connection's channels that have published
}

// serverMetrics are the counts no open connection holds.
type serverMetrics struct {
	closed      counts   // guarded by Server.mu: the sum of the counters of every connection that ended
	connsOpened uint64   // guarded by Server.mu: connections past connection.open
	connsClosed uint64   // guarded by Server.mu: of those, the ones that ended
	other       counters // counted off any connection: queues deleted by any path
}

// The hot-path increments, one line where each event happens.

// countReceived counts a publish whose content is complete, before it is routed, as
// RabbitMQ counts messages_received: its size, confirm mode, and the channel as a
// publisher the first time.
func (ch *channel) countReceived(size int) {
	st := &ch.c.stats
	st.n[cntSize0+sizeBucket(uint64(size))].Add(1)
	st.n[cntSizeSum].Add(uint64(size))
	if ch.confirm {
		st.n[cntReceivedConfirm].Add(1)
	}
	if !ch.published {
		ch.published = true
		st.publishers.Add(1)
	}
}

// sizeBucket returns the index of the histogram bucket a message of size octets is in.
func sizeBucket(size uint64) int {
	for i, b := range sizeBounds {
		if size <= b {
			return i
		}
	}
	return len(sizeBounds)
}

// countRouted counts where a publish went: to queues (how many), back to its publisher
// (mandatory) or nowhere.
func (ch *channel) countRouted(queues int, mandatory bool) {
	st := &ch.c.stats.n
	switch {
	case queues > 0:
		st[cntRouted].Add(1)
		st[cntQueuePublished].Add(uint64(queues))
	case mandatory:
		st[cntUnroutableReturned].Add(1)
	default:
		st[cntUnroutableDropped].Add(1)
	}
}

// countDelivery counts a message of q sent on ch by basic.deliver or (get) basic.get-ok;
// one with an ack to come counts in q's unacked until it is settled. q.mu and ch.mu must
// be held.
func (ch *channel) countDelivery(q *queue, get, noAck, redelivered bool) {
	st := &ch.c.stats.n
	switch {
	case get && noAck:
		st[cntGetAuto].Add(1)
	case get:
		st[cntGetManual].Add(1)
	case noAck:
		st[cntConsumeAuto].Add(1)
	default:
		st[cntConsumeManual].Add(1)
	}
	if !noAck {
		q.pendingAcks.Add(1)
	}
	if redelivered {
		st[cntRedelivered].Add(1)
	}
}

// sendGetEmpty answers basic.get on an empty queue.
func (ch *channel) sendGetEmpty() {
	ch.c.stats.n[cntGetEmpty].Add(1)
	ch.send(&basicGetEmpty{})
}

// countSettled counts deliveries that leave the channel's unacked list by basic.ack
// (acknowledged), or by nack or reject (id).
func (ch *channel) countSettled(id uint32, done []unacked) {
	if id == idBasicAck {
		ch.c.stats.n[cntAcknowledged].Add(uint64(len(done)))
	}
	uncountUnacked(done)
}

// uncountUnacked takes settled or requeued deliveries out of their queues' unacked counts,
// with one atomic add per run of one queue.
func uncountUnacked(done []unacked) {
	for i := 0; i < len(done); {
		q, n := done[i].q, int64(0)
		for ; i < len(done) && done[i].q == q; i++ {
			n++
		}
		q.pendingAcks.Add(-n)
	}
}

// countChannelClosed counts a channel leaving the connection's table; nil is none.
func (c *conn) countChannelClosed(ch *channel) {
	if ch == nil {
		return
	}
	c.stats.n[cntChannelsClosed].Add(1)
	if ch.published {
		c.stats.publishers.Add(-1)
	}
}

// countDeclared counts a successful queue.declare, which created the queue or not.
func (ch *channel) countDeclared(created bool) {
	ch.c.stats.n[cntQueuesDeclared].Add(1)
	if created {
		ch.c.stats.n[cntQueuesCreated].Add(1)
	}
}

// countQueueDeleted counts a queue deleted by any path (queue.delete, auto-delete,
// x-expires, an exclusive owner's close, a vhost's deletion).
func (vh *vhost) countQueueDeleted() {
	if vh.metrics != nil {
		vh.metrics.other[cntQueuesDeleted].Add(1)
	}
}

// foldConnLocked adds an ending connection's counts to the server's. s.mu must be held.
func (s *Server) foldConnLocked(c *conn) {
	s.metrics.closed.add(&c.stats.n)
	if c.counted {
		s.metrics.connsClosed++
	}
}

// Reading the counts.

// liveTotals are the counts of the whole broker at one moment.
type liveTotals struct {
	n                        counts // every connection's, open or ended, and those off any connection
	connections              int64  // open connections (past connection.open)
	channels                 int64  // open channels
	publishers               int64  // open channels that have published
	connsOpened, connsClosed uint64
}

// totals sums the counters of every connection, open or ended. A connection that ends
// meanwhile is counted once: either its counters are read here, or they were folded into
// the closed sum taken under the same lock as the list of open connections.
func (s *Server) totals() liveTotals {
	var t liveTotals
	s.mu.Lock()
	t.n = s.metrics.closed
	t.connections = int64(s.open)
	t.connsOpened, t.connsClosed = s.metrics.connsOpened, s.metrics.connsClosed
	conns := make([]*conn, 0, len(s.active))
	for c := range s.active {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		t.n.add(&c.stats.n)
		t.channels += int64(c.stats.n[cntChannelsOpened].Load()) - int64(c.stats.n[cntChannelsClosed].Load())
		t.publishers += c.stats.publishers.Load()
	}
	t.n.add(&s.metrics.other)
	t.channels = max(t.channels, 0)
	t.publishers = max(t.publishers, 0)
	return t
}

// messageTotals are the broker's message counts since it started, over every connection
// open or ended, as the global counters of rabbitmq_prometheus count them. The names in
// brackets are the management API's message_stats fields they answer.
type messageTotals struct {
	received           uint64 // [publish] messages received from publishers
	receivedConfirm    uint64 // of those, on channels in confirm mode
	routed             uint64 // routed to at least one queue
	unroutableDropped  uint64 // [drop_unroutable] routed nowhere, not mandatory
	unroutableReturned uint64 // [return_unroutable] routed nowhere, mandatory: returned
	confirmed          uint64 // [confirm] confirmed to the publisher (basic.ack)

	consumeManualAck uint64 // [deliver] basic.deliver to consumers that ack
	consumeAutoAck   uint64 // [deliver_no_ack] basic.deliver to no-ack consumers
	getManualAck     uint64 // [get] basic.get-ok, no-ack=false
	getAutoAck       uint64 // [get_no_ack] basic.get-ok, no-ack=true
	getEmpty         uint64 // [get_empty] basic.get-empty
	redelivered      uint64 // [redeliver] deliveries and get-oks marked redelivered
	acknowledged     uint64 // [ack] deliveries acknowledged by basic.ack
}

// delivered is every message sent to a client, by basic.deliver or basic.get-ok
// ([deliver_get]).
func (m messageTotals) delivered() uint64 {
	return m.consumeManualAck + m.consumeAutoAck + m.getManualAck + m.getAutoAck
}

// messageTotals returns the broker's message counts now; for /api/overview. It takes
// Server.mu for a moment and reads every connection's counters: call it per request, not
// per message.
func (s *Server) messageTotals() messageTotals {
	t := s.totals()
	return t.n.messages()
}

func (t *counts) messages() messageTotals {
	return messageTotals{
		received:           t.received(),
		receivedConfirm:    t[cntReceivedConfirm],
		routed:             t[cntRouted],
		unroutableDropped:  t[cntUnroutableDropped],
		unroutableReturned: t[cntUnroutableReturned],
		confirmed:          t[cntConfirmed],
		consumeManualAck:   t[cntConsumeManual],
		consumeAutoAck:     t[cntConsumeAuto],
		getManualAck:       t[cntGetManual],
		getAutoAck:         t[cntGetAuto],
		getEmpty:           t[cntGetEmpty],
		redelivered:        t[cntRedelivered],
		acknowledged:       t[cntAcknowledged],
	}
}
