package amqp

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// channel is one AMQP channel of a connection. The connection's reader goroutine owns the
// fields above mu; mu guards the delivery state that queues touch from other goroutines.
type channel struct {
	c         *conn
	id        uint16
	closing   bool   // channel.close sent by the server; waiting for close-ok
	lastQueue string // the last queue declared, for methods naming the queue ""

	// Content assembly of the basic.publish in progress.
	pubArgs       basicPublish
	pubKey        []byte // the routing key of the publish in progress; reused
	pubWait       bool   // a basic.publish waits for its content header
	pubMsg        *message
	pubFill       int         // body octets received so far
	pubSize       int         // body size from the content header
	pubHead       []byte      // key and properties of the publish in progress until its body comes
	scratch       *pubScratch // allocated at the first publish
	settled       []unacked   // reused by settle
	redispatchBuf []*queue
	exCache       *exchange // the last exchange published to
	exCacheN      string
	permN         string     // the last exchange name write permission was granted on
	permDB        *authDB    // by this user database
	permTopic     *topicPerm // the user's topic permission on permN; nil if none

	confirm    bool
	inConfirms bool          // listed in c.confirms for the next flush
	modes      atomic.Uint32 // modeConfirm, modeTx: confirm and tx, readable by other goroutines
	published  bool          // has published: counts among the publishers (metrics.go)
	tx         bool
	txPubs     []txPublish
	txAcks     []txAck

	// Publisher confirms. The reader confirms at each drain of its input; the log's writer
	// confirms persistent messages after their fsync.
	cmu           sync.Mutex
	confirmSeq    uint64                // guarded by cmu: tag of the last publish in confirm mode
	confirmSent   uint64                // guarded by cmu: highest tag confirmed to the client
	parkedFrom    uint64                // guarded by cmu: tag of the first publish not yet enqueued (conn.addRouted); 0: none
	durableWait   deque[durableConfirm] // guarded by cmu: persistent publishes waiting for fsync
	confirmClosed bool                  // guarded by cmu: the channel is gone
	walListening  bool                  // guarded by the store's mu

	killed atomic.Pointer[Error] // set by killLocked: the reader closes the channel with it

	mu               sync.Mutex
	dead             bool                 // guarded by mu: closed; no more deliveries
	nextTag          uint64               // guarded by mu: the last delivery tag used
	unacked          deque[unacked]       // guarded by mu: in tag order
	inflight         int                  // guarded by mu: unacked deliveries to consumers
	prefetchGlobal   uint16               // guarded by mu: basic.qos global=true
	prefetchConsumer uint16               // guarded by mu: basic.qos global=false, for new consumers
	consumers        map[string]*consumer // guarded by mu; nil until the first consumer
	replyTo          *replyConsumer       // guarded by mu (written only by the reader): the amq.rabbitmq.reply-to consumer
}

// checkConsumerTimeouts closes, with RabbitMQ's 406, every channel whose oldest unacked
// delivery waited longer than its queue's x-consumer-timeout, or Config.ConsumerTimeout;
// closing it requeues its deliveries. It runs every second, with the sweeps' scratch.
func (s *Server) checkConsumerTimeouts(now int64, sc *sweepScratch) {
	def := s.cfg.ConsumerTimeout.Milliseconds()
	s.mu.Lock()
	for c := range s.active {
		sc.conns = append(sc.conns, c)
	}
	s.mu.Unlock()
	defer sc.clear()
	for _, c := range sc.conns {
		if !c.opened.Load() || c.closing.Load() {
			continue
		}
		sc.chans = c.appendOpenChannels(sc.chans[:0])
		for _, ch := range sc.chans {
			ch.mu.Lock()
			if !ch.dead && ch.unacked.len() > 0 {
				u := ch.unacked.front()
				limit := u.q.settings().consumerTimeout
				if limit == 0 {
					limit = def
				}
				if u.at != 0 && limit > 0 && now-u.at > limit {
					ch.killLocked(preconditionFailed("delivery acknowledgement on channel " + strconv.Itoa(int(ch.id)) +
						" timed out. Timeout value used: " + strconv.FormatInt(limit, 10) +
						" ms. This timeout value can be configured, see consumers doc guide to learn more"))
					c.logger().Warn("consumer timeout: closing the channel; its unacked messages are requeued",
						"channel", ch.id, "queue", u.q.name, "timeout_ms", limit)
				}
			}
			ch.mu.Unlock()
		}
	}
}

// The modes of a channel, in channel.modes.
const (
	modeConfirm = 1 << iota
	modeTx
)

// durableConfirm is a confirm that waits for the log: ticket covers the message, and nack
// is set when the log refused it.
type durableConfirm struct {
	tag    uint64
	ticket uint64
	nack   bool
}

// txPublish is a publish held until tx.commit.
type txPublish struct {
	x         *exchange
	msg       *message
	mandatory bool
}

// txAck is an ack, nack or reject; in a transaction it is held until tx.commit.
type txAck struct {
	id       uint32 // idBasicAck, idBasicNack or idBasicReject
	tag      uint64
	multiple bool
	requeue  bool
	done     []unacked // in a transaction: the deliveries it took
}

// errChannelClosed tells the connection the channel is gone after a client channel.close.
var errChannelClosed = errors.New("amqp: channel closed")

func newChannel(c *conn, id uint16) *channel {
	return &channel{c: c, id: id}
}

// killLocked closes the channel from any goroutine, for an error met while delivering to
// it (a message body the log cannot give back): no more deliveries, channel.close goes
// out at once, and the reader releases what the channel holds when it next sees it.
// ch.mu must be held.
func (ch *channel) killLocked(e *Error) {
	if ch.dead {
		return
	}
	ch.dead = true
	ch.cmu.Lock()
	ch.confirmClosed = true // no confirm may follow the close
	ch.cmu.Unlock()
	ch.killed.Store(e) // before the close is queued: ch.send drops what would follow it
	ch.c.sendOn(ch.id, &channelClose{ReplyCode: e.Code, ReplyText: e.Text, ClassID: e.ClassID, MethodID: e.MethodID})
}

// send queues a method on the channel, unless another goroutine killed it: nothing may
// follow its channel.close.
func (ch *channel) send(m method) { ch.c.sendUnlessKilled(ch.id, m, &ch.killed) }

// canDeliverLocked reports whether consumer c may take one more message. ch.mu must be held.
func (ch *channel) canDeliverLocked(c *consumer) bool {
	if ch.dead {
		return false
	}
	if c.noAck {
		return true
	}
	return (c.prefetch == 0 || c.inflight < int(c.prefetch)) &&
		(ch.prefetchGlobal == 0 || ch.inflight < int(ch.prefetchGlobal))
}

// shutdown releases what the channel holds: its consumers are cancelled and its unacked
// messages go back to their queues, redelivered. It runs on channel.close, on a channel
// exception, and when the connection ends.
func (ch *channel) shutdown() {
	ch.pubWait, ch.pubMsg = false, nil
	var uncommitted []unacked // settled in a transaction that never committed
	for _, a := range ch.txAcks {
		uncommitted = append(uncommitted, a.done...)
	}
	ch.txPubs, ch.txAcks = nil, nil
	ch.cmu.Lock()
	ch.confirmClosed = true
	ch.cmu.Unlock()
	ch.mu.Lock()
	ch.dead = true
	consumers := make([]*consumer, 0, len(ch.consumers))
	for _, c := range ch.consumers {
		consumers = append(consumers, c)
	}
	clear(ch.consumers)
	ch.restoreLocked(uncommitted)
	pending := ch.takeUnackedLocked()
	ch.mu.Unlock()
	// Requeue while the consumers are still attached (they take nothing: the channel is
	// dead), so that a single active consumer's successor, promoted by detach, gets these
	// before anything newer, as in RabbitMQ.
	requeueAll(pending)
	for _, c := range consumers {
		ch.detach(c)
	}
	ch.endReply()
}

// takeUnackedLocked removes every unsettled delivery. ch.mu must be held.
func (ch *channel) takeUnackedLocked() []unacked {
	pending := make([]unacked, 0, ch.unacked.len())
	for ch.unacked.len() > 0 {
		if u := ch.unacked.pop(); !u.done {
			pending = append(pending, u)
		}
	}
	for _, u := range pending {
		if u.c != nil {
			u.c.inflight--
		}
	}
	ch.inflight = 0
	uncountUnacked(pending)
	return pending
}

// requeueAll puts deliveries back in their queues, one lock round per queue.
func requeueAll(pending []unacked) {
	// Group each queue's entries (by name: the requeue heap restores order within a queue).
	slices.SortStableFunc(pending, func(a, b unacked) int { return strings.Compare(a.q.name, b.q.name) })
	es := make([]qentry, 0, len(pending))
	for i := 0; i < len(pending); {
		q := pending[i].q
		es = es[:0]
		for ; i < len(pending) && pending[i].q == q; i++ {
			es = append(es, pending[i].e)
		}
		q.requeue(es)
	}
}

// detach removes a consumer from its queue and deletes the queue if it is auto-delete and
// this was its last consumer.
func (ch *channel) detach(c *consumer) {
	if c.q.removeConsumer(c) {
		c.q.vh.deleteQueue(c.q)
	}
}

// handleMethod runs one method frame's method on this channel.
func (ch *channel) handleMethod(id uint32, d decoder) error {
	if ch.pubWait || ch.pubMsg != nil {
		return withMethod(unexpectedFrame("expected content header for class 60, got non content header frame instead"), id)
	}
	var err error
	switch id {
	case idBasicPublish:
		err = ch.basicPublish(&d)
	case idBasicAck, idBasicNack, idBasicReject:
		err = ch.basicSettle(id, &d)
	case idBasicQos:
		err = ch.basicQos(&d)
	case idBasicConsume:
		err = ch.basicConsume(&d)
	case idBasicCancel:
		err = ch.basicCancel(&d)
	case idBasicGet:
		err = ch.basicGet(&d)
	case idBasicRecover, idBasicRecoverAsync:
		err = ch.basicRecover(id, &d)
	case idExchangeDeclare:
		err = ch.exchangeDeclare(&d)
	case idExchangeDelete:
		err = ch.exchangeDelete(&d)
	case idExchangeBind, idExchangeUnbind:
		err = ch.exchangeBind(id, &d)
	case idQueueDeclare:
		if declaresReplyQueue(d) {
			err = ch.replyDeclare(&d)
		} else {
			err = ch.queueDeclare(&d)
		}
	case idQueueBind:
		err = ch.queueBind(&d)
	case idQueueUnbind:
		err = ch.queueUnbind(&d)
	case idQueuePurge:
		err = ch.queuePurge(&d)
	case idQueueDelete:
		err = ch.queueDelete(&d)
	case idConfirmSelect:
		err = ch.confirmSelect(&d)
	case idTxSelect, idTxCommit, idTxRollback:
		err = ch.txMethod(id)
	case idChannelClose:
		m := channelClose{}
		if m.decode(&d); d.err != nil {
			break
		}
		ch.shutdown()
		ch.send(&channelCloseOk{})
		return errChannelClosed
	case idChannelCloseOk:
		// We sent no channel.close that this answers; RabbitMQ ignores it too.
	case idChannelFlow:
		m := channelFlow{}
		if m.decode(&d); d.err != nil {
			break
		}
		if !m.Active {
			// As RabbitMQ: a client may not stop its deliveries this way (540, which closes
			// the connection); basic.qos and basic.cancel do that.
			return withMethod(notImplemented("active=false"), id)
		}
		ch.send(&channelFlowOk{Active: true})
	case idChannelFlowOk:
	default:
		if newMethod(id) == nil {
			return withMethod(notImplemented("unknown method "+strconv.Itoa(int(id>>16))+"."+strconv.Itoa(int(id&0xffff))), id)
		}
		return withMethod(commandInvalid(methodName(id)+" is not allowed on channel "+strconv.Itoa(int(ch.id))), id)
	}
	if d.err != nil {
		return withMethod(syntaxError("malformed "+methodName(id)), id)
	}
	if e, ok := err.(*Error); ok && e.ClassID == 0 {
		withMethod(e, id)
	}
	return err
}

// redispatch lets every queue this channel consumes from deliver again, after credit grew.
// It runs on the connection's reader, which owns redispatchBuf.
func (ch *channel) redispatch() {
	ch.mu.Lock()
	qs := ch.redispatchBuf[:0]
	for _, c := range ch.consumers {
		qs = append(qs, c.q) // a queue with two consumers here is dispatched twice: harmless
	}
	ch.mu.Unlock()
	for i, q := range qs {
		q.dispatch()
		qs[i] = nil
	}
	ch.redispatchBuf = qs[:0]
}

func (ch *channel) vh() *vhost { return ch.c.vh }

// basicPublish starts a publish; its content follows in header and body frames. It decodes
// the arguments by hand so that the exchange and key need no allocation.
func (ch *channel) basicPublish(d *decoder) error {
	m := &ch.pubArgs
	m.Reserved1 = d.short()
	ex := d.shortstrBytes()
	key := d.shortstrBytes()
	bits := d.octet()
	if d.err != nil {
		return nil
	}
	if bits&2 != 0 {
		return notImplemented("immediate=true")
	}
	m.Mandatory = bits&1 != 0
	if ch.exCacheN != string(ex) {
		m.Exchange = string(ex)
	} else {
		m.Exchange = ch.exCacheN
	}
	if db := ch.c.s.auth.Load(); ch.permDB != db || ch.permN != m.Exchange {
		// Write permission comes first, as in RabbitMQ, and before the content: a client
		// may not make the broker hold content it could never publish. It is checked once
		// per exchange name and user database.
		if err := db.check(ch.c.user, ch.vh().name, permWrite, resExchange, m.Exchange); err != nil {
			return err
		}
		ch.permDB, ch.permN = db, m.Exchange
		ch.permTopic = db.topicPerm(ch.c.user, ch.vh().name, m.Exchange)
	}
	ch.pubKey = append(ch.pubKey[:0], key...)
	ch.pubWait = true
	return nil
}

// handleHeader takes the content header of the publish in progress.
func (ch *channel) handleHeader(p []byte) error {
	if !ch.pubWait {
		return unexpectedFrame("content header on channel " + strconv.Itoa(int(ch.id)) + " with no content expected")
	}
	if len(p) < 14 {
		return frameError("content header too short")
	}
	if class := binary.BigEndian.Uint16(p); class != classBasic {
		return unexpectedFrame("content header for class " + strconv.Itoa(int(class)) + ", expected 60")
	}
	size := binary.BigEndian.Uint64(p[4:12])
	raw := p[12:]
	var props propsSummary
	err := props.scan(raw)
	if err != nil {
		return withMethod(syntaxError("malformed content properties"), idBasicPublish)
	}
	ch.pubWait = false
	if limit := ch.c.s.cfg.MaxMessageSize; size > uint64(limit) {
		return withMethod(preconditionFailed("message size "+strconv.FormatUint(size, 10)+" is larger than configured max size "+strconv.Itoa(limit)), idBasicPublish)
	}
	// As in RabbitMQ, a request's reply_to amq.rabbitmq.reply-to becomes the name of the
	// channel's reply consumer, and is 406 without one.
	replyTo := ""
	if props.replyTo != nil && string(props.replyTo) == replyToQueue {
		if replyTo, err = ch.requestReplyTo(); err != nil {
			return err
		}
	}
	if props.userID != nil && string(props.userID) != ch.c.user && !ch.c.s.auth.Load().hasTag(ch.c.user, "impersonator") {
		// As in RabbitMQ: consumers may trust user-id to name the publisher.
		return withMethod(preconditionFailed("user_id property set to '"+string(props.userID)+"' but authenticated user was '"+ch.c.user+"'"), idBasicPublish)
	}
	ttl, bad := parseExpiration(props.expiration)
	if bad != "" {
		return withMethod(preconditionFailed("invalid expiration '"+string(props.expiration)+"': "+bad), idBasicPublish)
	}
	if cap(ch.pubHead) > maxIdleHead {
		ch.pubHead = nil
	}
	if replyTo == "" {
		ch.pubHead = append(append(ch.pubHead[:0], ch.pubKey...), raw...)
	} else {
		ch.pubHead = appendReplyTo(append(ch.pubHead[:0], ch.pubKey...), raw, props.replyToAt, replyTo)
	}
	// A small message comes with room for its data in its own allocation, and takes the
	// key and properties now. A larger one gets its buffer as its body arrives (bodyRoom),
	// so a header announcing a large body commits no memory the client has not sent.
	m := ch.c.newMessage(len(ch.pubHead) + int(size))
	m.keyLen, m.propsLen = uint8(len(ch.pubKey)), uint32(len(ch.pubHead)-len(ch.pubKey))
	m.publisher, m.persistent, m.priority, m.ttl = ch.c.id, props.deliveryMode == 2, props.priority, ttl
	if m.data != nil {
		m.data = append(m.data, ch.pubHead...)
	}
	ch.pubMsg, ch.pubFill, ch.pubSize = m, 0, int(size)
	if size == 0 {
		if m.data == nil {
			m.data = slices.Clone(ch.pubHead)
		}
		return ch.publishComplete()
	}
	return nil
}

// maxIdleHead is the largest key-and-properties scratch a channel keeps between publishes.
const maxIdleHead = 4 << 10

// handleBody takes one body frame of the publish in progress.
// inPlace says the frame reader already put p where it belongs in the message.
func (ch *channel) handleBody(p []byte, inPlace bool) error {
	if ch.pubMsg == nil {
		return unexpectedFrame("content body on channel " + strconv.Itoa(int(ch.id)) + " with no content expected")
	}
	if !inPlace {
		room := ch.bodyRoom(len(p))
		if room == nil {
			return unexpectedFrame("content body larger than the size in its header")
		}
		copy(room, p)
	}
	ch.pubFill += len(p)
	if ch.pubFill == ch.pubSize {
		return ch.publishComplete()
	}
	return nil
}

// bodyRoom returns where the next n body octets of the message being assembled go,
// growing its buffer as needed; nil when they would run past the size in the content
// header.
func (ch *channel) bodyRoom(n int) []byte {
	m := ch.pubMsg
	if n > ch.pubSize-ch.pubFill {
		return nil
	}
	head := int(m.keyLen) + int(m.propsLen)
	need := head + ch.pubFill + n
	if need > cap(m.data) {
		// The first body frame allocates what it brings (the whole message when the body
		// fits one frame); later ones double the room, up to the announced size.
		grown := make([]byte, need, head+min(ch.pubSize, max(2*(cap(m.data)-head), need-head)))
		if m.data == nil {
			copy(grown, ch.pubHead)
		} else {
			copy(grown, m.data[:head+ch.pubFill])
		}
		m.data = grown
	}
	m.data = m.data[:need]
	return m.data[head+ch.pubFill : need]
}

// publishComplete routes a fully assembled message, or holds it for tx.commit.
func (ch *channel) publishComplete() error {
	msg := ch.pubMsg
	ch.pubMsg = nil
	msg.size = uint32(ch.pubSize)
	ch.countReceived(ch.pubSize)
	vh := ch.vh()
	vh.mu.RLock()
	x := ch.exCache
	if x == nil || x.deleted || ch.exCacheN != ch.pubArgs.Exchange {
		x = vh.exchanges[ch.pubArgs.Exchange]
		ch.exCache, ch.exCacheN = x, ch.pubArgs.Exchange
	}
	if x == nil {
		vh.mu.RUnlock()
		return withMethod(notFound("no "+describeExchange(ch.pubArgs.Exchange, vh.name)), idBasicPublish)
	}
	if x.internal {
		vh.mu.RUnlock()
		return withMethod(accessRefused("cannot publish to internal "+describeExchange(x.name, vh.name)), idBasicPublish)
	}
	// Then, as RabbitMQ, the topic permission: write on the routing key, at a topic
	// exchange the user has one for. A user without topic permissions pays a nil check.
	if tp := ch.permTopic; tp != nil && x.kind == kindTopic && !tp.write.Match(msg.routingKey()) {
		vh.mu.RUnlock()
		return withMethod(topicRefused(permWrite, string(msg.routingKey()), x.name, vh.name, ch.c.user), idBasicPublish)
	}
	msg.exchange = x.name
	if ch.tx {
		vh.mu.RUnlock()
		ch.txPubs = append(ch.txPubs, txPublish{x: x, msg: msg, mandatory: ch.pubArgs.Mandatory})
		return nil
	}
	ch.routeLocked(x, msg)
	vh.mu.RUnlock()
	ticket, err := ch.deliver(msg, ch.pubArgs.Mandatory, true)
	if ch.confirm {
		r := ch.c.routed
		ch.addConfirm(ticket, err != nil, len(r) > 0 && r[len(r)-1].m == msg)
		return nil
	}
	if err != nil && err != errRefused {
		return withMethod(internalError("write-ahead log failed"), idBasicPublish)
	}
	return nil
}

// addConfirm counts a publish in confirm mode; a persistent one waits for its ticket, and
// one parked (still in conn.routed) for its enqueueing.
func (ch *channel) addConfirm(ticket uint64, nack, parked bool) {
	ch.cmu.Lock()
	ch.confirmSeq++
	if ticket > 0 || nack {
		ch.durableWait.push(durableConfirm{tag: ch.confirmSeq, ticket: ticket, nack: nack})
	}
	if parked && ch.parkedFrom == 0 {
		ch.parkedFrom = ch.confirmSeq
		ch.c.parked = append(ch.c.parked, ch)
	}
	ch.cmu.Unlock()
	ch.c.confirmPending(ch)
}

// unpark lets the publishes conn.flushRouted has enqueued be confirmed.
func (ch *channel) unpark() {
	ch.cmu.Lock()
	ch.parkedFrom = 0
	ch.cmu.Unlock()
}

// route delivers msg through x to its queues; an unroutable mandatory message comes back
// in basic.return 312 NO_ROUTE. It returns the log ticket covering a persistent message.
func (ch *channel) route(x *exchange, msg *message, mandatory bool) (uint64, error) {
	vh := ch.vh()
	vh.mu.RLock()
	ch.routeLocked(x, msg)
	vh.mu.RUnlock()
	return ch.deliver(msg, mandatory, false)
}

// pubScratch is what a channel reuses from one publish to the next. A channel that never
// publishes does without it.
type pubScratch struct {
	routes routeSet
	walBuf []byte // reused to encode publish records
}

// routeLocked collects the queues msg goes to through x in ch.scratch.routes. vh.mu must be held
// for reading; a topic match releases it for a while (see vhost.routeLocked).
func (ch *channel) routeLocked(x *exchange, msg *message) {
	if ch.scratch == nil {
		ch.scratch = &pubScratch{}
	}
	rs := &ch.scratch.routes
	rs.reset()
	if x.name == "" {
		if q := ch.vh().queues[string(msg.routingKey())]; q != nil {
			rs.queues = append(rs.queues, q)
		}
	} else {
		ch.vh().routeLocked(x, msg, rs)
	}
}

// deliver enqueues msg on the queues routeLocked found, logging it first when it is
// persistent and one of them is durable. With batch, a queue that cannot refuse it gets it
// at the end of the client's burst of frames (conn.addRouted).
func (ch *channel) deliver(msg *message, mandatory, batch bool) (ticket uint64, err error) {
	if x := ch.scratch.routes.missingAE; x != nil {
		ch.warnMissingAE(x)
	}
	holds := ch.scratch.routes.holds
	var at int64 // when msg was published, for its due time and its record
	if len(holds) > 0 {
		at = nowMillisUp()
	}
	if w := ch.c.s.store; w != nil && msg.persistent && (anyLogged(ch.scratch.routes.queues) || anyHoldLogged(holds)) {
		var listener *channel
		if ch.confirm {
			listener = ch
		}
		if at == 0 {
			at = nowMillisUp()
		}
		ticket, ch.scratch.walBuf, err = w.logPublishAt(msg, holdIDs(loggedIDs(ch.scratch.routes.queues), holds), at, ch.scratch.walBuf, listener)
		if err != nil {
			return 0, err
		}
	}
	reply := msg.exchange == "" && isReplyName(msg.routingKey())
	if reply {
		// Direct reply-to. As in RabbitMQ the reply counts as routed to no queue, whether
		// its requester is there or not: confirmed, and returned 312 when mandatory.
		ch.c.s.deliverReply(msg)
	}
	refused := false
	sole := len(ch.scratch.routes.queues) == 1 && len(holds) == 0 && msg.wal == nil && !reply
	for _, q := range ch.scratch.routes.queues {
		if batch && !q.settings().limits.rejectPublish {
			ch.c.addRouted(q, msg, sole)
			continue
		}
		ch.c.flushRouted() // what was routed before msg goes first
		if !q.enqueue(msg) {
			refused = true
		}
	}
	if len(holds) > 0 {
		// Held by delayed exchanges: confirmed now (once logged), never returned, since
		// whether it routes is known only when it falls due.
		ch.c.s.delays.hold(holds, msg, at, ch.scratch.routes.delay)
	}
	ch.countRouted(len(ch.scratch.routes.queues)+len(holds), mandatory)
	if len(ch.scratch.routes.queues) == 0 && len(holds) == 0 && mandatory {
		ch.c.sendReturn(ch.id, replyNoRoute, "NO_ROUTE", msg)
	}
	if refused {
		// A full queue with x-overflow reject-publish: the publisher gets a nack.
		return ticket, errRefused
	}
	return ticket, nil
}

// nowMillisUp is the time in Unix milliseconds, rounded up: a delay or a time to live
// counted from it never ends before it would have counted from the exact time.
func nowMillisUp() int64 {
	ns := time.Now().UnixNano()
	return (ns + int64(time.Millisecond) - 1) / int64(time.Millisecond)
}

// warnMissingAE logs that x's alternate exchange does not exist. Routing reports it once
// per exchange, not per message; a redeclared exchange is a new one and is logged again.
func (ch *channel) warnMissingAE(x *exchange) {
	vh := ch.vh()
	vh.mu.RLock()
	ae := x.ae
	vh.mu.RUnlock()
	ch.c.logger().LogAttrs(context.Background(), slog.LevelWarn,
		"alternate exchange not found; messages the exchange cannot route are not rerouted",
		slog.String("vhost", vh.name), slog.String("exchange", x.name), slog.String("alternate_exchange", ae))
}

// errRefused reports a publish a full queue refused (x-overflow reject-publish).
var errRefused = errors.New("amqp: refused by a full queue")

func anyLogged(qs []*queue) bool {
	for _, q := range qs {
		if q.walID != 0 {
			return true
		}
	}
	return false
}

// flushConfirms sends one basic.ack covering every publish that can be confirmed: all up
// to the first persistent one whose log record is not yet on disk.
func (ch *channel) flushConfirms() {
	var done uint64
	failed := false
	if st := ch.c.s.store; st != nil {
		// failed first: once it is set, done no longer moves.
		failed = st.w.failedAtomic.Load()
		done = st.w.doneAtomic.Load()
	}
	ch.cmu.Lock()
	defer ch.cmu.Unlock()
	if ch.confirmClosed {
		return
	}
	for ch.durableWait.len() > 0 {
		dc := ch.durableWait.front()
		if ch.parkedFrom != 0 && dc.tag >= ch.parkedFrom {
			break // not enqueued yet: the reader confirms it once it is
		}
		if dc.nack || dc.ticket > done && failed {
			// The log refused it, or failed before it reached the disk.
			ch.ackUpToLocked(dc.tag - 1)
			ch.send(&basicNack{DeliveryTag: dc.tag})
			ch.confirmSent = dc.tag
		} else if dc.ticket > done {
			ch.ackUpToLocked(dc.tag - 1)
			// The writer may have taken its listeners before this channel's last
			// publish was logged: ask again so the next batch confirms it.
			ch.c.s.store.listen(ch)
			return
		}
		ch.durableWait.pop()
	}
	ch.ackUpToLocked(ch.confirmSeq)
}

// ackUpToLocked confirms every publish up to tag, and not past one still to be enqueued
// (the log's writer confirms persistent publishes once written, while the reader may hold
// them back until its burst ends). ch.cmu must be held.
func (ch *channel) ackUpToLocked(tag uint64) {
	if ch.parkedFrom != 0 && tag >= ch.parkedFrom {
		tag = ch.parkedFrom - 1
	}
	if tag <= ch.confirmSent {
		return
	}
	multiple := tag-ch.confirmSent > 1
	ch.c.stats.get().n[cntConfirmed].Add(tag - ch.confirmSent)
	ch.confirmSent = tag
	ch.send(&basicAck{DeliveryTag: tag, Multiple: multiple})
}

// walSynced is called by the log's writer after a batch is on disk.
func (ch *channel) walSynced(uint64) { ch.flushConfirms() }

func (ch *channel) findExchange(name string) (*exchange, error) {
	vh := ch.vh()
	vh.mu.RLock()
	x := vh.exchanges[name]
	vh.mu.RUnlock()
	if x == nil {
		return nil, notFound("no " + describeExchange(name, vh.name))
	}
	return x, nil
}

func describeExchange(name, vhost string) string {
	return "exchange '" + name + "' in vhost '" + vhost + "'"
}

func describeQueue(name, vhost string) string {
	return "queue '" + name + "' in vhost '" + vhost + "'"
}

// basicSettle handles basic.ack, basic.nack and basic.reject. The deliveries leave the
// unacked list at once, so an unknown or repeated tag is 406 PRECONDITION_FAILED even in a
// transaction; there their effect waits for tx.commit, and tx.rollback puts them back.
func (ch *channel) basicSettle(id uint32, d *decoder) error {
	a := txAck{id: id}
	switch id {
	case idBasicAck:
		m := basicAck{}
		m.decode(d)
		a.tag, a.multiple = m.DeliveryTag, m.Multiple
	case idBasicNack:
		m := basicNack{}
		m.decode(d)
		a.tag, a.multiple, a.requeue = m.DeliveryTag, m.Multiple, m.Requeue
	case idBasicReject:
		m := basicReject{}
		m.decode(d)
		a.tag, a.requeue = m.DeliveryTag, m.Requeue
	}
	if d.err != nil {
		return nil
	}
	ch.mu.Lock()
	done, ok := ch.takeLocked(a.tag, a.multiple)
	if !ok {
		ch.mu.Unlock()
		return preconditionFailed("unknown delivery tag " + strconv.FormatUint(a.tag, 10))
	}
	if ch.tx {
		ch.mu.Unlock()
		a.done = append([]unacked(nil), done...)
		ch.txAcks = append(ch.txAcks, a)
		return nil
	}
	global := ch.releaseLocked(done)
	ch.mu.Unlock()
	ch.apply(a, done, global)
	return nil
}

// takeLocked removes the deliveries an ack names: tag alone, or every one up to tag with
// multiple (all of them for tag 0). The tag itself must be outstanding. ch.mu must be held.
func (ch *channel) takeLocked(tag uint64, multiple bool) ([]unacked, bool) {
	done := ch.settled[:0]
	if multiple && tag == 0 {
		for ch.unacked.len() > 0 {
			if u := ch.unacked.pop(); !u.done {
				done = append(done, u)
			}
		}
		ch.settled = done
		return done, true
	}
	n := ch.unacked.len()
	i := sort.Search(n, func(i int) bool { return ch.unacked.at(i).tag >= tag })
	if i == n || ch.unacked.at(i).tag != tag || ch.unacked.at(i).done {
		return nil, false
	}
	if multiple {
		for ch.unacked.len() > 0 && ch.unacked.front().tag <= tag {
			if u := ch.unacked.pop(); !u.done {
				done = append(done, u)
			}
		}
	} else {
		done = append(done, *ch.unacked.at(i))
		ch.unacked.at(i).done = true
		ch.unacked.at(i).e = qentry{}
		for ch.unacked.len() > 0 && ch.unacked.front().done {
			ch.unacked.pop()
		}
	}
	ch.settled = done
	return done, true
}

// releaseLocked gives back the prefetch credit of settled deliveries; it reports whether
// the channel has a channel-wide limit. ch.mu must be held.
func (ch *channel) releaseLocked(done []unacked) (global bool) {
	for _, u := range done {
		if u.c != nil {
			u.c.inflight--
			ch.inflight--
		}
	}
	return ch.prefetchGlobal != 0
}

// apply carries out a settlement: requeued messages go back to their original place,
// the others leave their queues for good; then the queues deliver on the freed credit.
// global says the channel has a channel-wide prefetch limit.
func (ch *channel) apply(a txAck, done []unacked, global bool) {
	ch.countSettled(a.id, done)
	requeue := a.id != idBasicAck && a.requeue
	if requeue {
		requeueAll(done)
	} else {
		settled := done
		if a.id != idBasicAck {
			settled = deadLetterRejected(done)
		}
		ch.c.s.logSettled(settled)
	}
	if global {
		// Channel-wide credit may belong to a consumer of another queue.
		ch.redispatch()
		return
	}
	if requeue {
		return // requeueAll dispatched those queues
	}
	var last *queue
	for _, u := range done {
		if u.c != nil && u.q != last {
			last = u.q
			u.q.dispatch()
		}
	}
}

// restoreLocked puts deliveries taken by a rolled-back transaction back in the unacked
// list, in tag order. ch.mu must be held.
func (ch *channel) restoreLocked(back []unacked) {
	all := make([]unacked, 0, ch.unacked.len()+len(back))
	for ch.unacked.len() > 0 {
		if u := ch.unacked.pop(); !u.done {
			all = append(all, u)
		}
	}
	all = append(all, back...)
	sort.Slice(all, func(i, j int) bool { return all[i].tag < all[j].tag })
	for _, u := range all {
		ch.unacked.push(u)
	}
}

// basicQos sets prefetch limits with RabbitMQ's meaning: global=false limits each new
// consumer on the channel, global=true the channel as a whole.
func (ch *channel) basicQos(d *decoder) error {
	m := basicQos{}
	if m.decode(d); d.err != nil {
		return nil
	}
	if m.PrefetchSize != 0 {
		return notImplemented("prefetch_size!=0 (" + strconv.Itoa(int(m.PrefetchSize)) + ")")
	}
	ch.mu.Lock()
	if m.Global {
		ch.prefetchGlobal = m.PrefetchCount
	} else {
		ch.prefetchConsumer = m.PrefetchCount
	}
	ch.mu.Unlock()
	ch.send(&basicQosOk{})
	ch.redispatch()
	return nil
}

// lookupQueue finds a queue for a method that needs perm on it (permNone for none); ""
// means the last queue declared on the channel. As in RabbitMQ the permission comes first
// (403), then existence (404), then exclusive ownership (405).
func (ch *channel) lookupQueue(name string, perm permKind) (*queue, error) {
	if name == "" {
		if ch.lastQueue == "" {
			return nil, notFound("no previously declared queue")
		}
		name = ch.lastQueue
	}
	if err := ch.allowed(perm, resQueue, name); err != nil {
		return nil, err
	}
	vh := ch.vh()
	vh.mu.RLock()
	q := vh.queues[name]
	vh.mu.RUnlock()
	if q == nil {
		return nil, notFound("no " + describeQueue(name, vh.name))
	}
	if err := ch.checkOwner(q); err != nil {
		return nil, err
	}
	return q, nil
}

// allowed checks that the connection's user has perm on a queue or exchange; a refusal
// is 403 ACCESS_REFUSED. permNone always passes.
func (ch *channel) allowed(perm permKind, kind resourceKind, name string) error {
	if perm == permNone || ch.c.superuser {
		return nil
	}
	return ch.c.s.auth.Load().check(ch.c.user, ch.c.vh.name, perm, kind, name)
}

// topicReadAllowed checks the user's topic permission to bind with key at x, when x is a
// topic exchange; a refusal is 403 ACCESS_REFUSED.
func (ch *channel) topicReadAllowed(x *exchange, key string) error {
	if x.kind != kindTopic || ch.c.superuser {
		return nil
	}
	return ch.c.s.auth.Load().checkTopic(ch.c.user, ch.c.vh.name, permRead, x.name, key)
}

// checkOwner refuses another connection's exclusive queue with 405 RESOURCE_LOCKED.
func (ch *channel) checkOwner(q *queue) error {
	if q.exclusive && q.owner != ch.c {
		return resourceLocked("cannot obtain exclusive access to locked " + describeQueue(q.name, q.vh.name) +
			". It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.")
	}
	return nil
}

func (ch *channel) basicConsume(d *decoder) error {
	m := basicConsume{}
	if m.decode(d); d.err != nil {
		return nil
	}
	if name := m.Queue; name == replyToQueue || name == "" && ch.lastQueue == replyToQueue {
		return ch.replyConsume(&m)
	}
	q, err := ch.lookupQueue(m.Queue, permRead)
	if err != nil {
		return err
	}
	tag := m.ConsumerTag
	if tag == "" {
		tag = randomName("amq.ctag-")
	}
	ch.mu.Lock()
	_, dup := ch.consumers[tag]
	prefetch := ch.prefetchConsumer
	ch.mu.Unlock()
	if dup {
		return notAllowed("attempt to reuse consumer tag '" + tag + "'")
	}
	priority, err := consumerPriority(m.Arguments)
	if err != nil {
		return preconditionFailed("invalid arg 'x-priority' for " + describeQueue(q.name, q.vh.name) + ": " + err.Error())
	}
	c := &consumer{tag: tag, ch: ch, q: q, noAck: m.NoAck, exclusive: m.Exclusive, noLocal: m.NoLocal, prefetch: prefetch, priority: priority}
	ch.mu.Lock()
	if ch.consumers == nil {
		ch.consumers = make(map[string]*consumer)
	}
	ch.consumers[tag] = c
	ch.mu.Unlock()
	var ok method
	if !m.NoWait {
		ok = &basicConsumeOk{ConsumerTag: tag}
	}
	if err := q.addConsumer(c, ok); err != nil {
		ch.mu.Lock()
		delete(ch.consumers, tag)
		ch.mu.Unlock()
		return err
	}
	return nil
}

// consumerPriority reads x-priority from basic.consume arguments: an integer of any width
// and sign, 0 when absent. The error text is RabbitMQ 3.13's.
func consumerPriority(args table) (int64, error) {
	v, ok := args["x-priority"]
	if !ok {
		return 0, nil
	}
	n, ok := intValue(v)
	if !ok {
		return 0, errors.New(`"expected integer, got ` + fieldType(v) + `"`)
	}
	return n, nil
}

func (ch *channel) basicCancel(d *decoder) error {
	m := basicCancel{}
	if m.decode(d); d.err != nil {
		return nil
	}
	if ch.replyCancel(m.ConsumerTag, m.NoWait) {
		return nil
	}
	ch.mu.Lock()
	c := ch.consumers[m.ConsumerTag]
	delete(ch.consumers, m.ConsumerTag)
	ch.mu.Unlock()
	// Out of its queue first: a dispatch under way hands its deliveries to the outbox
	// before it releases the queue, so cancel-ok follows every delivery to the consumer.
	autoDelete := c != nil && c.q.removeConsumer(c)
	if !m.NoWait {
		ch.send(&basicCancelOk{ConsumerTag: m.ConsumerTag})
	}
	if c != nil {
		if autoDelete {
			c.q.vh.deleteQueue(c.q)
		}
		// The cancelled consumer's unacked deliveries still count against a channel-wide
		// limit, but its share of credit may now go to the others.
		ch.redispatch()
	}
	return nil
}

// cancelByServer ends a consumer whose queue was deleted, telling the client with
// basic.cancel when it advertised consumer_cancel_notify.
func (ch *channel) cancelByServer(c *consumer) {
	ch.mu.Lock()
	_, ok := ch.consumers[c.tag]
	if ok && ch.consumers[c.tag] == c {
		delete(ch.consumers, c.tag)
	}
	dead := ch.dead
	ch.mu.Unlock()
	// Nothing may follow connection.close, as when a reload deletes the vhost.
	if ok && !dead && ch.c.caps.consumerCancelNotify && !ch.c.closing.Load() {
		ch.send(&basicCancel{ConsumerTag: c.tag, NoWait: true})
	}
}

func (ch *channel) basicGet(d *decoder) error {
	m := basicGet{}
	if m.decode(d); d.err != nil {
		return nil
	}
	q, err := ch.lookupQueue(m.Queue, permRead)
	if err != nil {
		return err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.renewLeaseLocked()
	q.expireLocked()
	if q.messageCountLocked() == 0 {
		ch.sendGetEmpty(q)
		return nil
	}
	notYet, rerr := q.fillLocked()
	if notYet {
		// Wait for the log's writer, off the queue's lock, then look again once.
		q.mu.Unlock()
		q.vh.store.flush()
		q.mu.Lock()
		q.expireLocked()
		if q.messageCountLocked() == 0 {
			ch.sendGetEmpty(q)
			return nil
		}
		notYet, rerr = q.fillLocked()
	}
	if notYet {
		// The disk is full and the head message's record is still waiting for room: it
		// is not to be had now.
		ch.sendGetEmpty(q)
		return nil
	}
	if rerr != nil {
		ch.mu.Lock()
		ch.killLocked(rerr)
		ch.mu.Unlock()
		return nil
	}
	e := q.popLocked()
	ch.mu.Lock()
	ch.nextTag++
	tag := ch.nextTag
	q.countDeliveryLocked(true, m.NoAck, e.redelivered)
	if !m.NoAck {
		ch.unacked.push(unacked{tag: tag, q: q, e: e, at: ch.c.s.clock.Load()})
	} else {
		q.settleOne(e.msg)
	}
	ch.c.sendGetOk(ch.id, tag, e, uint32(q.messageCountLocked()))
	ch.mu.Unlock()
	return nil
}

// basicRecover requeues every unacked message of the channel. RabbitMQ has no
// requeue=false (redeliver to the same consumer): it answers 540, and so do we.
func (ch *channel) basicRecover(id uint32, d *decoder) error {
	var requeue bool
	if id == idBasicRecover {
		m := basicRecover{}
		m.decode(d)
		requeue = m.Requeue
	} else {
		m := basicRecoverAsync{}
		m.decode(d)
		requeue = m.Requeue
	}
	if d.err != nil {
		return nil
	}
	if !requeue {
		return notImplemented("requeue=false")
	}
	ch.mu.Lock()
	pending := ch.takeUnackedLocked()
	ch.mu.Unlock()
	if id == idBasicRecover {
		ch.send(&basicRecoverOk{})
	}
	requeueAll(pending)
	ch.redispatch()
	return nil
}

func (ch *channel) confirmSelect(d *decoder) error {
	m := confirmSelect{}
	if m.decode(d); d.err != nil {
		return nil
	}
	if ch.tx {
		return preconditionFailed("cannot switch from tx to confirm mode")
	}
	ch.confirm = true
	ch.modes.Or(modeConfirm)
	if !m.NoWait {
		ch.send(&confirmSelectOk{})
	}
	return nil
}

func (ch *channel) txMethod(id uint32) error {
	switch id {
	case idTxSelect:
		if ch.confirm {
			return preconditionFailed("cannot switch from confirm to tx mode")
		}
		ch.tx = true
		ch.modes.Or(modeTx)
		ch.send(&txSelectOk{})
		return nil
	case idTxCommit:
		if !ch.tx {
			return preconditionFailed("channel is not transactional")
		}
		pubs, acks := ch.txPubs, ch.txAcks
		ch.txPubs = nil
		var last uint64
		for _, p := range pubs {
			t, err := ch.route(p.x, p.msg, p.mandatory)
			if err != nil && err != errRefused {
				// The acks stay pending, so closing the channel requeues their messages.
				return logUnwritable(err)
			}
			last = max(last, t)
		}
		ch.txAcks = nil
		for _, a := range acks {
			ch.mu.Lock()
			global := ch.releaseLocked(a.done)
			ch.mu.Unlock()
			ch.apply(a, a.done, global)
		}
		if w := ch.c.s.store; w != nil && (last > 0 || len(acks) > 0) {
			// tx.commit-ok means on disk: wait for the fsync covering this work.
			if err := w.sync(); err != nil {
				return logUnwritable(err)
			}
		}
		ch.send(&txCommitOk{})
		return nil
	default:
		if !ch.tx {
			return preconditionFailed("channel is not transactional")
		}
		var back []unacked
		for _, a := range ch.txAcks {
			back = append(back, a.done...)
		}
		ch.txPubs, ch.txAcks = nil, nil
		if len(back) > 0 {
			ch.mu.Lock()
			ch.restoreLocked(back)
			ch.mu.Unlock()
		}
		ch.send(&txRollbackOk{})
		return nil
	}
}

// randomName returns prefix followed by 22 random URL-safe characters, like RabbitMQ's
// amq.gen- queue names and amq.ctag- consumer tags.
func randomName(prefix string) string {
	var b [16]byte
	rand.Read(b[:])
	return prefix + base64.RawURLEncoding.EncodeToString(b[:])
}

// reservedName reports whether a name starts with amq., which clients may not declare.
func reservedName(name string) bool { return strings.HasPrefix(name, "amq.") }
