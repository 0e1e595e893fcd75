package amqp

import (
	"strings"
	"sync"
)

// Direct reply-to, as RabbitMQ has it: a requester consumes the pseudo-queue
// amq.rabbitmq.reply-to (no-ack) and publishes requests with reply_to set to that name; the
// broker rewrites it to amq.rabbitmq.reply-to.<opaque>, and a reply published to the
// default exchange with that routing key goes straight to the requester's consumer. No
// queue is declared, stored or logged, and nothing waits: a reply to a requester that is
// gone is dropped.
//
// The opaque part is 16 random octets (base64url), so a name cannot be guessed. The
// Server's replyRegistry maps names to consumers: at most one per channel, removed at
// basic.cancel, channel close and connection end.

const (
	replyToQueue  = "amq.rabbitmq.reply-to"  // the pseudo-queue requesters consume
	replyToPrefix = "amq.rabbitmq.reply-to." // the names of reply consumers
)

// replyConsumer is a channel's consumer of amq.rabbitmq.reply-to.
type replyConsumer struct {
	tag  string
	name string // amq.rabbitmq.reply-to.<opaque>: the reply_to its requests carry
	ch   *channel
}

// replyRegistry finds reply consumers by name, for any connection of the server. Its lock
// is a leaf: nothing else is locked while it is held.
type replyRegistry struct {
	mu sync.RWMutex
	m  map[string]*replyConsumer // guarded by mu
}

// add registers rc under its name.
func (r *replyRegistry) add(rc *replyConsumer) {
	r.mu.Lock()
	if r.m == nil {
		r.m = make(map[string]*replyConsumer)
	}
	r.m[rc.name] = rc
	r.mu.Unlock()
}

// remove forgets rc.
func (r *replyRegistry) remove(rc *replyConsumer) {
	r.mu.Lock()
	if r.m[rc.name] == rc {
		delete(r.m, rc.name)
	}
	r.mu.Unlock()
}

// lookup returns the reply consumer with this name, or nil; it does not allocate.
func (r *replyRegistry) lookup(name []byte) *replyConsumer {
	r.mu.RLock()
	rc := r.m[string(name)]
	r.mu.RUnlock()
	return rc
}

// isReplyName reports whether a default-exchange routing key names a reply consumer
// rather than a queue: RabbitMQ never looks such keys up as queues.
func isReplyName(key []byte) bool {
	return len(key) > len(replyToPrefix) && string(key[:len(replyToPrefix)]) == replyToPrefix
}

// replyConsume handles basic.consume of amq.rabbitmq.reply-to, with RabbitMQ's checks in
// its order: the tag of a queue's consumer on the channel is 530, then acks are 406, then a
// second reply consumer on the channel is 406 (whatever its tag). As in RabbitMQ no read
// permission is needed: the consumer only ever gets replies addressed to its own
// unguessable name.
func (ch *channel) replyConsume(m *basicConsume) error {
	tag := m.ConsumerTag
	if tag == "" {
		tag = randomName("amq.ctag-")
	}
	ch.mu.Lock()
	_, dup := ch.consumers[tag]
	ch.mu.Unlock()
	if dup {
		return notAllowed("attempt to reuse consumer tag '" + tag + "'")
	}
	if !m.NoAck {
		return preconditionFailed("reply consumer cannot acknowledge")
	}
	if ch.replyTo != nil {
		return preconditionFailed("reply consumer already set")
	}
	rc := &replyConsumer{tag: tag, name: randomName(replyToPrefix), ch: ch}
	ch.c.s.replies.add(rc)
	ch.mu.Lock()
	ch.replyTo = rc
	ch.mu.Unlock()
	return ch.reply(m.NoWait, &basicConsumeOk{ConsumerTag: tag})
}

// replyCancel ends the reply consumer if tag is its tag, and reports whether it was.
// Deliveries happen under ch.mu after a check of ch.replyTo, so none follows cancel-ok.
func (ch *channel) replyCancel(tag string, noWait bool) bool {
	rc := ch.replyTo
	if rc == nil || rc.tag != tag {
		return false
	}
	ch.endReply()
	ch.reply(noWait, &basicCancelOk{ConsumerTag: tag})
	return true
}

// endReply removes the channel's reply consumer, if it has one: replies to it are dropped
// from now on. The reader calls it, at basic.cancel and when the channel shuts down.
func (ch *channel) endReply() {
	ch.mu.Lock()
	rc := ch.replyTo
	ch.replyTo = nil
	ch.mu.Unlock()
	if rc != nil {
		ch.c.s.replies.remove(rc)
	}
}

// requestReplyTo is the reply_to a request published on this channel carries instead of
// amq.rabbitmq.reply-to; 406 without a reply consumer, in RabbitMQ's words.
func (ch *channel) requestReplyTo() (string, error) {
	if ch.replyTo == nil {
		return "", withMethod(preconditionFailed("fast reply consumer does not exist"), idBasicPublish)
	}
	return ch.replyTo.name, nil
}

// appendReplyTo appends the raw properties raw with the reply-to property, whose length
// octet is at raw[at], replaced by name.
func appendReplyTo(b, raw []byte, at int, name string) []byte {
	end := at + 1 + int(raw[at])
	b = append(b, raw[:at]...)
	b = appendShortstr(b, name)
	return append(b, raw[end:]...)
}

// deliverReply sends a reply published to the default exchange with a reply consumer's
// name as its routing key to that consumer, unless it is gone: its channel cancelled it,
// closed, or is closing, or its connection is closing. The delivery tag comes from the
// requester channel's sequence; the delivery names exchange "" and the routing key as
// published. It runs on the replier's reader, with no lock held.
func (s *Server) deliverReply(msg *message) {
	rc := s.replies.lookup(msg.routingKey())
	if rc == nil {
		return
	}
	ch := rc.ch
	if ch.c.closing.Load() {
		return // nothing may follow connection.close
	}
	ch.mu.Lock()
	if !ch.dead && ch.replyTo == rc {
		ch.nextTag++
		ch.c.sendDelivery(ch.id, &rc.tag, ch.nextTag, qentry{msg: msg})
	}
	ch.mu.Unlock()
}

// replyDeclare handles queue.declare of a name starting amq.rabbitmq.reply-to, which
// RabbitMQ treats as passive whatever the flag says, without permission checks:
// amq.rabbitmq.reply-to itself always exists, a reply consumer's name exists while the
// consumer does (0 messages, 1 consumer), and anything else is 404.
func (ch *channel) replyDeclare(d *decoder) error {
	m := queueDeclare{}
	if m.decode(d); d.err != nil {
		return nil
	}
	if m.Queue != replyToQueue && ch.c.s.replies.lookup([]byte(m.Queue)) == nil {
		return notFound("no " + describeQueue(m.Queue, ch.vh().name))
	}
	ch.lastQueue = m.Queue
	return ch.reply(m.NoWait, &queueDeclareOk{Queue: m.Queue, MessageCount: 0, ConsumerCount: 1})
}

// declaresReplyQueue reports whether a queue.declare's arguments name a queue starting
// amq.rabbitmq.reply-to. d is a copy: the caller's decoder still starts at the arguments.
func declaresReplyQueue(d decoder) bool {
	d.short() // reserved-1
	name := d.shortstrBytes()
	return d.err == nil && strings.HasPrefix(string(name), replyToQueue)
}
