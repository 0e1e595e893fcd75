package amqp

// Prometheus text output: the counters the broker keeps for it, and MetricsHandler, which
// serves them with rabbitmq_prometheus's metric names, types, help texts and labels
// (RabbitMQ 3.13), so that RabbitMQ's Grafana dashboards and alerts work unchanged.

import (
	"crypto/sha256"
	"encoding/base64"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// # Counters
//
// Counting costs the publish → route → deliver → ack path no atomic operation and no lock
// of its own, per message:
//
//   - A connection's reader counts what it does (publishes by size, routing, acks, channel
//     and queue churn) in plain fields only it touches (connStats.pend), and moves them
//     into the connection's atomic counters (connStats.n) each time it has read all its
//     input, before it can block: a burst of frames costs one flush. Confirms, which the
//     log's writer also sends, are added to the atomic counters directly, once per
//     basic.ack.
//   - A queue counts the messages it delivers and hands out by basic.get (queue.stats),
//     under its own lock, which the delivery holds anyway. The one atomic add is on the
//     way out of the unacked list: once per queue per basic.ack, however many it covers
//     (queueStats.settled).
//
// Nothing is shared by all connections or all queues. A reader of the counts (a scrape,
// /api/overview) sums the open connections' atomic counters and the queues' counts; what
// ended is folded into the server's totals on its way out: a connection's counters by
// Server.untrack under Server.mu, where the reader takes them together with the list of
// open connections; a deleted queue's under serverMetrics.scanMu, which a reader holds
// while it goes through the queues. So a count is never read twice and the sums never go
// down. A connection's counts since its reader last ran out of input are not seen until it
// does (in practice at once: it does before every blocking read).

// Counter indexes.
const (
	cntReceivedConfirm    = iota // publishes on a channel in confirm mode
	cntRouted                    // publishes routed to at least one queue
	cntQueuePublished            // messages enqueued: one per queue a publish was routed to
	cntUnroutableDropped         // publishes routed nowhere, not mandatory
	cntUnroutableReturned        // publishes routed nowhere, mandatory: basic.return
	cntConfirmed                 // publishes confirmed with basic.ack (added atomically, never pending)
	cntAcknowledged              // deliveries acknowledged with basic.ack
	cntChannelsOpened
	cntChannelsClosed
	cntQueuesDeclared // queue.declare, not passive, that succeeded
	cntQueuesCreated
	cntQueuesDeleted
	cntSize0   // received messages by body size: one counter per bucket of sizeBounds, then +Inf
	cntSizeSum = cntSize0 + len(sizeBounds) + 1
	cntQueue0  = cntSizeSum + 1 // the queues' counters, as queueStats.n holds them
)

// The counters a queue keeps, from cntQueue0.
const (
	qcConsumeManual = iota // basic.deliver to a consumer with no-ack=false
	qcConsumeAuto          // basic.deliver to a no-ack consumer
	qcGetManual            // basic.get-ok, no-ack=false
	qcGetAuto              // basic.get-ok, no-ack=true
	qcGetEmpty             // basic.get-empty
	qcRedelivered          // deliveries and get-oks with redelivered set
	numQueueCounters

	numCounters = cntQueue0 + numQueueCounters
)

// sizeBounds are the upper bounds of rabbitmq_message_size_bytes's buckets, RabbitMQ's
// (rabbit_msg_size_metrics); one more bucket takes what is larger.
var sizeBounds = [...]uint64{100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000, 100_000_000}

// counters is a set of counts that other goroutines read, added to atomically.
type counters [numCounters]atomic.Uint64

// counts is a set of counts in plain fields, or a sum of counters.
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

// connStats are a connection's counts. The counts of messages, acks and declares take
// 456 octets, allocated at the first of them: a connection that only holds channels open
// has none.
type connStats struct {
	counts     atomic.Pointer[connCounts] // nil until the first count (get)
	opened     atomic.Uint64              // channels opened
	closed     atomic.Uint64              // channels closed
	publishers atomic.Int64               // the connection's channels that have published
}

// connCounts are the counts of a connection but its channels'.
type connCounts struct {
	pend counts   // owned by the reader: counted, not yet in n
	n    counters // what the reader has flushed, and confirms
}

// get returns the connection's counts, allocating them at the first call, from any
// goroutine.
func (st *connStats) get() *connCounts {
	if p := st.counts.Load(); p != nil {
		return p
	}
	p := new(connCounts)
	if !st.counts.CompareAndSwap(nil, p) {
		p = st.counts.Load()
	}
	return p
}

// addTo adds the connection's flushed counts to t.
func (st *connStats) addTo(t *counts) {
	if p := st.counts.Load(); p != nil {
		t.add(&p.n)
	}
	t[cntChannelsOpened] += st.opened.Load()
	t[cntChannelsClosed] += st.closed.Load()
}

// flushCounts moves the reader's pending counts where readers of the counts see them.
// It runs on the reader, whenever the reader has consumed its input or is about to wait.
func (c *conn) flushCounts() {
	p := c.stats.counts.Load()
	if p == nil {
		return
	}
	for i, v := range p.pend {
		if v != 0 {
			p.n[i].Add(v)
			p.pend[i] = 0
		}
	}
}

// flushCountsIfDrained flushes the reader's counts when it has no input left to handle.
func (c *conn) flushCountsIfDrained() {
	if c.fr.r.Buffered() == 0 {
		c.flushCounts()
	}
}

// queueStats are a queue's counts.
type queueStats struct {
	n       [numQueueCounters]uint64 // guarded by queue.mu
	settled atomic.Uint64            // deliveries that left a channel's unacked list: acked, rejected or requeued
}

// serverMetrics are the counts no open connection or queue holds, and the broker's
// identity.
type serverMetrics struct {
	closed      counts   // guarded by Server.mu: the sum of the counters of every connection that ended
	connsOpened uint64   // guarded by Server.mu: connections past connection.open
	connsClosed uint64   // guarded by Server.mu: of those, the ones that ended
	other       counters // the queue deletions

	// scanMu is held by readers of the queues' counts while they go through the queues,
	// and by a queue's deletion, which moves its counts into gone: a queue's counts are read
	// either from it or from gone. It comes before Server.mu in the lock order.
	scanMu sync.Mutex
	gone   [numQueueCounters]uint64 // guarded by scanMu: what the deleted queues counted

	identOnce                  sync.Once
	node, cluster, permanentID string // set by identOnce
}

// The increments, one line where each event happens.

// countReceived counts a publish whose content is complete, before it is routed, as
// RabbitMQ counts messages_received: its size, confirm mode, and the channel as a
// publisher the first time. It runs on the reader.
func (ch *channel) countReceived(size int) {
	st := &ch.c.stats.get().pend
	st[cntSize0+sizeBucket(uint64(size))]++
	st[cntSizeSum] += uint64(size)
	if ch.confirm {
		st[cntReceivedConfirm]++
	}
	if !ch.published {
		ch.published = true
		ch.c.stats.publishers.Add(1)
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
// (mandatory) or nowhere. It runs on the reader.
func (ch *channel) countRouted(queues int, mandatory bool) {
	st := &ch.c.stats.get().pend
	switch {
	case queues > 0:
		st[cntRouted]++
		st[cntQueuePublished] += uint64(queues)
	case mandatory:
		st[cntUnroutableReturned]++
	default:
		st[cntUnroutableDropped]++
	}
}

// countDeliveryLocked counts a message q sends by basic.deliver or (get) basic.get-ok.
// q.mu must be held.
func (q *queue) countDeliveryLocked(get, noAck, redelivered bool) {
	switch {
	case get && noAck:
		q.stats.n[qcGetAuto]++
	case get:
		q.stats.n[qcGetManual]++
	case noAck:
		q.stats.n[qcConsumeAuto]++
	default:
		q.stats.n[qcConsumeManual]++
	}
	if redelivered {
		q.stats.n[qcRedelivered]++
	}
}

// unackedLocked is the number of q's deliveries waiting for an ack. q.mu must be held.
func (q *queue) unackedLocked() int64 {
	settled := q.stats.settled.Load() // first: a settle follows its delivery's count
	return max(int64(q.stats.n[qcConsumeManual]+q.stats.n[qcGetManual]-settled), 0)
}

// sendGetEmpty answers basic.get on the empty q. q.mu must be held.
func (ch *channel) sendGetEmpty(q *queue) {
	q.stats.n[qcGetEmpty]++
	ch.send(&basicGetEmpty{})
}

// countSettled counts deliveries that leave the channel's unacked list by basic.ack
// (acknowledged), or by nack or reject (id). It runs on the reader.
func (ch *channel) countSettled(id uint32, done []unacked) {
	if id == idBasicAck {
		ch.c.stats.get().pend[cntAcknowledged] += uint64(len(done))
	}
	uncountUnacked(done)
}

// uncountUnacked counts deliveries out of their queues' unacked messages: one atomic add
// per run of one queue.
func uncountUnacked(done []unacked) {
	for i := 0; i < len(done); {
		q, n := done[i].q, uint64(0)
		for ; i < len(done) && done[i].q == q; i++ {
			n++
		}
		q.stats.settled.Add(n)
	}
}

// countChannelClosed counts a channel leaving the connection's table; nil is none. It
// runs on the reader.
func (c *conn) countChannelClosed(ch *channel) {
	if ch == nil {
		return
	}
	c.stats.closed.Add(1)
	if ch.published {
		c.stats.publishers.Add(-1)
	}
}

// countDeclared counts a successful queue.declare, which created the queue or not. It
// runs on the reader.
func (ch *channel) countDeclared(created bool) {
	st := &ch.c.stats.get().pend
	st[cntQueuesDeclared]++
	if created {
		st[cntQueuesCreated]++
	}
}

// lockScans keeps readers of the queues' counts out while a queue is deleted, so that
// they read its counts either from it or from the server's totals, never both or neither;
// it returns the unlock. A deletion may wait for a scrape to end.
func (vh *vhost) lockScans() (unlock func()) {
	if vh.metrics == nil {
		return func() {}
	}
	vh.metrics.scanMu.Lock()
	return vh.metrics.scanMu.Unlock
}

// countQueueDeletedLocked counts a queue deleted by any path (queue.delete, auto-delete,
// x-expires, an exclusive owner's close, a vhost's deletion), and keeps what it counted,
// as it is marked deleted: it counts nothing more. q.mu and the lock of lockScans must be
// held.
func (vh *vhost) countQueueDeletedLocked(q *queue) {
	if m := vh.metrics; m != nil {
		m.other[cntQueuesDeleted].Add(1)
		for i, v := range q.stats.n {
			m.gone[i] += v
		}
	}
}

// foldConnLocked adds an ending connection's counts to the server's. It runs on the
// connection's reader. s.mu must be held.
func (s *Server) foldConnLocked(c *conn) {
	c.flushCounts()
	c.stats.addTo(&s.metrics.closed)
	if c.counted {
		s.metrics.connsClosed++
	}
}

// Reading the counts.

// liveTotals are the counts of the whole broker at one moment.
type liveTotals struct {
	n                        counts // every connection's and queue's, live or gone
	connections              int64  // open connections (past connection.open)
	channels                 int64  // open channels
	publishers               int64  // open channels that have published
	connsOpened, connsClosed uint64
}

// totals sums the counters of every connection, open or ended, and those of deleted
// queues; scanQueues adds the live queues'. A connection that ends meanwhile is counted
// once: either its counters are read here, or they were folded into the closed sum taken
// under the same lock as the list of open connections.
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
		c.stats.addTo(&t.n)
		t.channels += int64(c.stats.opened.Load()) - int64(c.stats.closed.Load())
		t.publishers += c.stats.publishers.Load()
	}
	t.n.add(&s.metrics.other)
	t.channels = max(t.channels, 0)
	t.publishers = max(t.publishers, 0)
	return t
}

// unconfirmed returns the publishes that the open channels in confirm mode have received
// and neither confirmed (basic.ack) nor refused (basic.nack): the sum of the management
// API's messages_unconfirmed over channels, as rabbitmq_prometheus sums it. It takes each
// channel's confirm lock for a moment: call it per scrape, not per message.
func (s *Server) unconfirmed() uint64 {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.active))
	for c := range s.active {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	var n uint64
	for _, c := range conns {
		for _, ch := range c.openChannelList() {
			ch.cmu.Lock()
			if !ch.confirmClosed {
				n += ch.confirmSeq - ch.confirmSent
			}
			ch.cmu.Unlock()
		}
	}
	return n
}

// messageTotals are the broker's message counts since it started, over every connection
// and queue, live or gone, as the global counters of rabbitmq_prometheus count them. The
// names in brackets are the management API's message_stats fields they answer.
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
// Server.mu for a moment, reads every connection's counters and takes every queue's lock
// in turn: call it per request, not per message.
func (s *Server) messageTotals() messageTotals {
	t := s.totals()
	s.scanQueues(false, &t)
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
		consumeManualAck:   t[cntQueue0+qcConsumeManual],
		consumeAutoAck:     t[cntQueue0+qcConsumeAuto],
		getManualAck:       t[cntQueue0+qcGetManual],
		getAutoAck:         t[cntQueue0+qcGetAuto],
		getEmpty:           t[cntQueue0+qcGetEmpty],
		redelivered:        t[cntQueue0+qcRedelivered],
		acknowledged:       t[cntAcknowledged],
	}
}

// queueStat is what a scrape reads of one queue, or the sum over all of them.
type queueStat struct {
	ready, unacked, consumers, readyBytes, pagedOut int64
	headAge                                         int64  // milliseconds since the next ready message was enqueued; 0 if none
	labels                                          [2]int // the queue's {vhost,queue} labels in queueScan.labels
}

// queueScan is one reading of every queue.
type queueScan struct {
	sum    queueStat
	queues int64
	each   []queueStat // per queue, by vhost and name; only for per-object output
	labels []byte      // the label sets each[i].labels point into
}

// scanQueues reads every queue's counts, each under its own lock for a moment, adding
// its message counters to t; with perObject it keeps them per queue, in vhost and name
// order, with their labels.
func (s *Server) scanQueues(perObject bool, t *liveTotals) queueScan {
	var sc queueScan
	var qs []*queue
	now := time.Now().UnixMilli()
	m := &s.metrics
	m.scanMu.Lock()
	defer m.scanMu.Unlock()
	for i, v := range m.gone {
		t.n[cntQueue0+i] += v
	}
	for _, vh := range s.vhostList() {
		vh.mu.RLock()
		qs = qs[:0]
		for _, q := range vh.queues {
			qs = append(qs, q)
		}
		vh.mu.RUnlock()
		if perObject {
			slices.SortFunc(qs, func(a, b *queue) int { return strings.Compare(a.name, b.name) })
			sc.each = slices.Grow(sc.each, len(qs))
			sc.labels = slices.Grow(sc.labels, len(qs)*(len(`{vhost="",queue=""}`)+len(vh.name)+32))
		}
		for i, q := range qs {
			q.mu.Lock()
			if q.deleted {
				q.mu.Unlock()
				continue // its counts are in gone
			}
			for j, v := range q.stats.n {
				t.n[cntQueue0+j] += v
			}
			st := queueStat{
				ready:      int64(q.messageCountLocked()),
				unacked:    q.unackedLocked(),
				consumers:  int64(len(q.consumers)),
				readyBytes: q.readyBytes,
				pagedOut:   int64(q.tail.len()),
			}
			if at, ok := q.headEnqueuedLocked(); ok {
				st.headAge = max(now-at, 0)
			}
			q.mu.Unlock()
			qs[i] = nil
			sc.queues++
			sc.sum.ready += st.ready
			sc.sum.unacked += st.unacked
			sc.sum.consumers += st.consumers
			sc.sum.readyBytes += st.readyBytes
			sc.sum.pagedOut += st.pagedOut
			sc.sum.headAge = max(sc.sum.headAge, st.headAge) // the oldest, not a sum
			if perObject {
				start := len(sc.labels)
				sc.labels = append(sc.labels, `{vhost="`...)
				sc.labels = appendLabelValue(sc.labels, vh.name)
				sc.labels = append(sc.labels, `",queue="`...)
				sc.labels = appendLabelValue(sc.labels, q.name)
				sc.labels = append(sc.labels, `"}`...)
				st.labels = [2]int{start, len(sc.labels)}
				sc.each = append(sc.each, st)
			}
		}
	}
	return sc
}

// identity returns the node name, cluster name and permanent cluster id that
// rabbitmq_identity_info carries: amqp-go@<short host name>, "amqp-go" (the cluster_name
// of connection.start), and an id derived from the host name, the data directory and the
// listen addresses, so that it stays the same across restarts of one deployment.
func (s *Server) identity() (node, cluster, permanentID string) {
	m := &s.metrics
	m.identOnce.Do(func() {
		host, err := os.Hostname()
		if err != nil || host == "" {
			host = "localhost"
		}
		short, _, _ := strings.Cut(host, ".")
		dir := s.cfg.DataDir
		if abs, err := filepath.Abs(dir); dir != "" && err == nil {
			dir = abs
		}
		sum := sha256.Sum256([]byte(host + "\x00" + dir + "\x00" + s.cfg.Addr + "\x00" + s.cfg.TLSAddr))
		m.node = "amqp-go@" + short
		m.cluster = "amqp-go"
		m.permanentID = "amqp-go-cluster-id-" + base64.RawURLEncoding.EncodeToString(sum[:16])
	})
	return m.node, m.cluster, m.permanentID
}

// # Output

// metricsContentType is the Prometheus text exposition format, version 0.0.4.
const metricsContentType = "text/plain; version=0.0.4; charset=utf-8"

// MetricsHandler returns a handler that serves the broker's metrics in Prometheus's text
// format, as RabbitMQ's rabbitmq_prometheus plugin does (RabbitMQ 3.13's metric names,
// types, help texts and labels): /metrics with queue metrics summed over all queues, and
// /metrics/per-object with them per queue (labels vhost and queue). It asks for no
// authentication, as the plugin does not; serve it where only the scraper can reach it.
func (s *Server) MetricsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var perObject bool
		switch r.URL.Path {
		case "/metrics":
		case "/metrics/per-object":
			perObject = true
		default:
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "405 method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", metricsContentType)
		if r.Method == http.MethodHead {
			return
		}
		s.writeMetrics(w, perObject)
	})
}

// promWriter writes the text format into one buffer, handing it to w whenever it holds
// promFlushSize octets, so that output of any size takes a bounded amount of memory. It
// uses strconv only: no fmt, no allocation per sample.
type promWriter struct {
	w   io.Writer
	b   []byte
	err error
}

const promFlushSize = 64 << 10

// family starts a metric family: its HELP and TYPE lines.
func (p *promWriter) family(name, typ, help string) {
	p.b = append(p.b, "# HELP "...)
	p.b = append(p.b, name...)
	p.b = append(p.b, ' ')
	p.b = append(p.b, help...)
	p.b = append(p.b, "\n# TYPE "...)
	p.b = append(p.b, name...)
	p.b = append(p.b, ' ')
	p.b = append(p.b, typ...)
	p.b = append(p.b, '\n')
}

// sample writes one sample; labels is "" or a whole label set, braces included.
func (p *promWriter) sample(name, labels string, v uint64) {
	p.b = append(p.b, name...)
	p.b = append(p.b, labels...)
	p.b = append(p.b, ' ')
	p.b = strconv.AppendUint(p.b, v, 10)
	p.b = append(p.b, '\n')
	p.flushIfFull()
}

// one writes a family of one sample.
func (p *promWriter) one(name, typ, help, labels string, v uint64) {
	p.family(name, typ, help)
	p.sample(name, labels, v)
}

func (p *promWriter) flushIfFull() {
	if len(p.b) >= promFlushSize {
		p.flush()
	}
}

func (p *promWriter) flush() {
	if p.err == nil && len(p.b) > 0 {
		_, p.err = p.w.Write(p.b)
	}
	p.b = p.b[:0]
}

// appendLabelValue appends v as the text format wants a label value: backslash, double
// quote and line feed escaped, and octets that are not UTF-8 (a queue name may hold any)
// replaced by U+FFFD.
func appendLabelValue(b []byte, v string) []byte {
	for i := 0; i < len(v); {
		c := v[i]
		if c < utf8.RuneSelf {
			switch c {
			case '\\':
				b = append(b, `\\`...)
			case '"':
				b = append(b, `\"`...)
			case '\n':
				b = append(b, `\n`...)
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(v[i:])
		if r == utf8.RuneError && size == 1 {
			b = utf8.AppendRune(b, utf8.RuneError)
		} else {
			b = append(b, v[i:i+size]...)
		}
		i += size
	}
	return b
}

// The label sets of the global counters, as rabbitmq_prometheus writes them.
const (
	labelsProtocol  = `{protocol="amqp091"}`
	labelsQueueType = `{protocol="amqp091",queue_type="rabbit_classic_queue"}`
)

// counterFamilies are the families read from the summed counters: RabbitMQ's global
// counters, the churn counters, and the aggregated channel counters of /metrics that the
// RabbitMQ-Overview dashboard plots.
var counterFamilies = [...]struct {
	name, help, labels string
	value              func(t *liveTotals) uint64
}{
	{"rabbitmq_global_messages_received_total", "Total number of messages received from publishers", labelsProtocol,
		func(t *liveTotals) uint64 { return t.n.received() }},
	{"rabbitmq_global_messages_received_confirm_total", "Total number of messages received from publishers expecting confirmations", labelsProtocol,
		func(t *liveTotals) uint64 { return t.n[cntReceivedConfirm] }},
	{"rabbitmq_global_messages_routed_total", "Total number of messages routed to queues or streams", labelsProtocol,
		func(t *liveTotals) uint64 { return t.n[cntRouted] }},
	{"rabbitmq_global_messages_unroutable_dropped_total", "Total number of messages published as non-mandatory into an exchange and dropped as unroutable", labelsProtocol,
		func(t *liveTotals) uint64 { return t.n[cntUnroutableDropped] }},
	{"rabbitmq_global_messages_unroutable_returned_total", "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable", labelsProtocol,
		func(t *liveTotals) uint64 { return t.n[cntUnroutableReturned] }},
	{"rabbitmq_global_messages_confirmed_total", "Total number of messages confirmed to publishers", labelsProtocol,
		func(t *liveTotals) uint64 { return t.n[cntConfirmed] }},
	{"rabbitmq_global_messages_delivered_total", "Total number of messages delivered to consumers", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n.messages().delivered() }},
	{"rabbitmq_global_messages_delivered_consume_manual_ack_total", "Total number of messages delivered to consumers using basic.consume with manual acknowledgment", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcConsumeManual] }},
	{"rabbitmq_global_messages_delivered_consume_auto_ack_total", "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcConsumeAuto] }},
	{"rabbitmq_global_messages_delivered_get_manual_ack_total", "Total number of messages delivered to consumers using basic.get with manual acknowledgment", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcGetManual] }},
	{"rabbitmq_global_messages_delivered_get_auto_ack_total", "Total number of messages delivered to consumers using basic.get with automatic acknowledgment", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcGetAuto] }},
	{"rabbitmq_global_messages_get_empty_total", "Total number of times basic.get operations fetched no message", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcGetEmpty] }},
	{"rabbitmq_global_messages_redelivered_total", "Total number of messages redelivered to consumers", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcRedelivered] }},
	{"rabbitmq_global_messages_acknowledged_total", "Total number of messages acknowledged by consumers", labelsQueueType,
		func(t *liveTotals) uint64 { return t.n[cntAcknowledged] }},

	{"rabbitmq_connections_opened_total", "Total number of connections opened", "",
		func(t *liveTotals) uint64 { return t.connsOpened }},
	{"rabbitmq_connections_closed_total", "Total number of connections closed or terminated", "",
		func(t *liveTotals) uint64 { return t.connsClosed }},
	{"rabbitmq_channels_opened_total", "Total number of channels opened", "",
		func(t *liveTotals) uint64 { return t.n[cntChannelsOpened] }},
	{"rabbitmq_channels_closed_total", "Total number of channels closed", "",
		func(t *liveTotals) uint64 { return t.n[cntChannelsClosed] }},
	{"rabbitmq_queues_declared_total", "Total number of queues declared", "",
		func(t *liveTotals) uint64 { return t.n[cntQueuesDeclared] }},
	{"rabbitmq_queues_created_total", "Total number of queues created", "",
		func(t *liveTotals) uint64 { return t.n[cntQueuesCreated] }},
	{"rabbitmq_queues_deleted_total", "Total number of queues deleted", "",
		func(t *liveTotals) uint64 { return t.n[cntQueuesDeleted] }},

	{"rabbitmq_channel_messages_published_total", "Total number of messages published into an exchange on a channel", "",
		func(t *liveTotals) uint64 { return t.n.received() }},
	{"rabbitmq_channel_messages_confirmed_total", "Total number of messages published into an exchange and confirmed on the channel", "",
		func(t *liveTotals) uint64 { return t.n[cntConfirmed] }},
	{"rabbitmq_channel_messages_unroutable_returned_total", "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable", "",
		func(t *liveTotals) uint64 { return t.n[cntUnroutableReturned] }},
	{"rabbitmq_channel_messages_unroutable_dropped_total", "Total number of messages published as non-mandatory into an exchange and dropped as unroutable", "",
		func(t *liveTotals) uint64 { return t.n[cntUnroutableDropped] }},
	{"rabbitmq_channel_get_ack_total", "Total number of messages fetched with basic.get in manual acknowledgement mode", "",
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcGetManual] }},
	{"rabbitmq_channel_get_total", "Total number of messages fetched with basic.get in automatic acknowledgement mode", "",
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcGetAuto] }},
	{"rabbitmq_channel_messages_delivered_ack_total", "Total number of messages delivered to consumers in manual acknowledgement mode", "",
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcConsumeManual] }},
	{"rabbitmq_channel_messages_delivered_total", "Total number of messages delivered to consumers in automatic acknowledgement mode", "",
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcConsumeAuto] }},
	{"rabbitmq_channel_messages_redelivered_total", "Total number of messages redelivered to consumers", "",
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcRedelivered] }},
	{"rabbitmq_channel_messages_acked_total", "Total number of messages acknowledged by consumers", "",
		func(t *liveTotals) uint64 { return t.n[cntAcknowledged] }},
	{"rabbitmq_channel_get_empty_total", "Total number of times basic.get operations fetched no message", "",
		func(t *liveTotals) uint64 { return t.n[cntQueue0+qcGetEmpty] }},
	{"rabbitmq_queue_messages_published_total", "Total number of messages published to queues", "",
		func(t *liveTotals) uint64 { return t.n[cntQueuePublished] }},
}

// queueFamilies are the per-queue gauges: per queue in /metrics/per-object, summed in
// /metrics.
var queueFamilies = [...]struct {
	name, help string
	value      func(q *queueStat) int64
}{
	{"rabbitmq_queue_messages_ready", "Messages ready to be delivered to consumers",
		func(q *queueStat) int64 { return q.ready }},
	{"rabbitmq_queue_messages_unacked", "Messages delivered to consumers but not yet acknowledged",
		func(q *queueStat) int64 { return q.unacked }},
	{"rabbitmq_queue_messages", "Sum of ready and unacknowledged messages - total queue depth",
		func(q *queueStat) int64 { return q.ready + q.unacked }},
	{"rabbitmq_queue_consumers", "Consumers on a queue",
		func(q *queueStat) int64 { return q.consumers }},
	{"rabbitmq_queue_messages_ready_bytes", "Size in bytes of ready messages",
		func(q *queueStat) int64 { return q.readyBytes }},
	{"rabbitmq_queue_messages_paged_out", "Messages paged out to disk",
		func(q *queueStat) int64 { return q.pagedOut }},
	{"amqpgo_queue_head_message_age_seconds", "Seconds since the broker enqueued the next ready message (not in RabbitMQ); the largest over queues in /metrics",
		func(q *queueStat) int64 { return q.headAge / 1000 }},
}

// writeMetrics writes every metric family to w; perObject gives the queue families one
// sample per queue instead of one sum. It returns the first write error.
func (s *Server) writeMetrics(w io.Writer, perObject bool) error {
	t := s.totals()
	sc := s.scanQueues(perObject, &t)
	p := &promWriter{w: w, b: make([]byte, 0, promFlushSize+4<<10)}

	node, cluster, id := s.identity()
	p.family("rabbitmq_identity_info", "untyped", "RabbitMQ node & cluster identity info")
	p.b = append(p.b, `rabbitmq_identity_info{rabbitmq_node="`...)
	p.b = appendLabelValue(p.b, node)
	p.b = append(p.b, `",rabbitmq_cluster="`...)
	p.b = appendLabelValue(p.b, cluster)
	p.b = append(p.b, `",rabbitmq_cluster_permanent_id="`...)
	p.b = appendLabelValue(p.b, id)
	p.b = append(p.b, "\"} 1\n"...)
	p.family("rabbitmq_build_info", "untyped", "RabbitMQ & Erlang/OTP version info")
	// prometheus_plugin_version is the version of this output, which is amqp-go's;
	// prometheus_client_version (of the prometheus.erl library) is left out: there is none.
	p.b = append(p.b, `rabbitmq_build_info{rabbitmq_version="`+Version+`",prometheus_plugin_version="`+Version+
		`",product_name="amqp-go",product_version="`+Version+`",erlang_version="`...)
	p.b = appendLabelValue(p.b, runtime.Version())
	p.b = append(p.b, "\"} 1\n"...)

	// The node: memory, disk and file descriptors, each where it is known.
	p.one("rabbitmq_process_resident_memory_bytes", "gauge", "Memory used in bytes", "", s.liveHeap())
	if limit := s.memLimit.Load(); limit > 0 {
		p.one("rabbitmq_resident_memory_limit_bytes", "gauge", "Memory high watermark in bytes", "", limit)
	}
	if s.standby() == nil && s.store != nil { // a standby's store is not its own yet
		if free, err := s.diskFree(); err == nil {
			p.one("rabbitmq_disk_space_available_bytes", "gauge", "Disk space available in bytes", "", free)
		}
		if limit := s.diskLimit.Load(); limit > 0 {
			p.one("rabbitmq_disk_space_available_limit_bytes", "gauge", "Free disk space low watermark in bytes", "", uint64(limit))
		}
	}
	if open, limit, ok := openFDs(); ok {
		p.one("rabbitmq_process_open_fds", "gauge", "Open file descriptors", "", open)
		p.one("rabbitmq_process_max_fds", "gauge", "Open file descriptors limit", "", limit)
	}
	// Client sockets: those of the open connections, which Config.MaxConnections counts, and
	// that limit, past which new sockets are closed at once (left out when there is none).
	// A socket still in its handshake counts against MaxHandshakes instead; API sessions
	// have no socket.
	p.one("rabbitmq_process_open_tcp_sockets", "gauge", "Open TCP sockets", "", uint64(t.connections))
	if limit := s.cfg.MaxConnections; limit > 0 {
		p.one("rabbitmq_process_max_tcp_sockets", "gauge", "Open TCP sockets limit", "", uint64(limit))
	}
	s.clusterMetrics(p)
	alarms := s.alarms.Load()
	p.one("rabbitmq_alarms_file_descriptor_limit", "untyped", "is 1 if file descriptor limit alarm is in effect", "", 0)
	p.one("rabbitmq_alarms_free_disk_space_watermark", "untyped", "is 1 if free disk space watermark alarm is in effect", "", uint64(alarms&alarmDisk)/alarmDisk)
	p.one("rabbitmq_alarms_memory_used_watermark", "untyped", "is 1 if VM memory watermark alarm is in effect", "", uint64(alarms&alarmMemory)/alarmMemory)
	if s.standby() != nil {
		// A standby serves no client and its broker is empty: its connections, queues and
		// messages would only add zeros to a dashboard's sums over nodes.
		p.flush()
		return p.err
	}

	p.one("rabbitmq_connections", "gauge", "Connections currently open", "", uint64(t.connections))
	p.one("rabbitmq_channels", "gauge", "Channels currently open", "", uint64(t.channels))
	p.one("rabbitmq_consumers", "gauge", "Consumers currently connected", "", uint64(sc.sum.consumers))
	p.one("rabbitmq_queues", "gauge", "Queues available", "", uint64(sc.queues))
	p.one("rabbitmq_channel_consumers", "gauge", "Consumers on a channel", "", uint64(sc.sum.consumers))
	p.one("rabbitmq_channel_messages_unacked", "gauge", "Delivered but not yet acknowledged messages", "", uint64(sc.sum.unacked))
	p.one("rabbitmq_channel_messages_unconfirmed", "gauge", "Published but not yet confirmed messages", "", s.unconfirmed())
	p.one("rabbitmq_global_publishers", "gauge", "Current number of publishers", labelsProtocol, uint64(t.publishers))
	p.one("rabbitmq_global_consumers", "gauge", "Current number of consumers", labelsProtocol, uint64(sc.sum.consumers))

	for _, f := range counterFamilies {
		p.one(f.name, "counter", f.help, f.labels, f.value(&t))
	}

	const size = "rabbitmq_message_size_bytes"
	p.family(size, "histogram", "Size of messages received from publishers")
	var cum uint64
	for i := range len(sizeBounds) + 1 {
		cum += t.n[cntSize0+i]
		p.b = append(p.b, size+`_bucket{protocol="amqp091",le="`...)
		if i < len(sizeBounds) {
			p.b = strconv.AppendUint(p.b, sizeBounds[i], 10)
		} else {
			p.b = append(p.b, "+Inf"...)
		}
		p.b = append(p.b, `"} `...)
		p.b = strconv.AppendUint(p.b, cum, 10)
		p.b = append(p.b, '\n')
	}
	p.sample(size+"_sum", labelsProtocol, t.n[cntSizeSum])
	p.sample(size+"_count", labelsProtocol, cum)

	for _, f := range queueFamilies {
		if perObject && len(sc.each) == 0 {
			break // a family with no samples: left out
		}
		p.family(f.name, "gauge", f.help)
		if !perObject {
			p.sample(f.name, "", uint64(f.value(&sc.sum)))
			continue
		}
		for i := range sc.each {
			q := &sc.each[i]
			p.b = append(p.b, f.name...)
			p.b = append(p.b, sc.labels[q.labels[0]:q.labels[1]]...)
			p.b = append(p.b, ' ')
			p.b = strconv.AppendInt(p.b, f.value(q), 10)
			p.b = append(p.b, '\n')
			p.flushIfFull()
		}
	}
	p.flush()
	return p.err
}
