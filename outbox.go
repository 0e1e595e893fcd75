package amqp

import (
	"encoding/binary"
	"net"
	"runtime"
	"slices"
	"sync/atomic"
	"time"
)

// A connection's outbox and its writer: frames any goroutine queues for the socket,
// deliveries queued by reference and encoded by the writer, large bodies sent by
// reference with writev, heartbeats for an idle connection, and the bound on what a slow
// consumer's outbox may hold.

// outboxHighWater is the outbox size past which queues stop delivering to this connection
// until the writer has drained it: a slow consumer holds a bounded amount of memory.
const outboxHighWater = 1 << 20

// waitForDrain asks the writer to let q deliver again once the outbox is written.
func (c *conn) waitForDrain(q *queue) {
	c.outMu.Lock()
	if !c.outClosed && !slices.Contains(c.drainWait, q) {
		c.drainWait = append(c.drainWait, q)
		// The writer may have swapped the outbox just before q registered, and ended:
		// it must run again, to call q back either way.
		c.startWriterLocked()
	}
	c.outMu.Unlock()
}

// send queues a method on channel 0.
func (c *conn) send(m method) { c.sendOn(0, m) }

// sendFrame queues frames already encoded.
func (c *conn) sendFrame(b []byte) {
	c.outMu.Lock()
	if !c.outClosed {
		c.encodePendingLocked()
		c.out = append(c.out, b...)
		c.storeOutLenLocked()
		c.startWriterLocked()
	}
	c.outMu.Unlock()
}

// sendOn queues a method frame on a channel.
func (c *conn) sendOn(channel uint16, m method) { c.sendUnlessKilled(channel, m, nil) }

// sendUnlessKilled is sendOn that drops the frame once killed (a channel's, when not nil)
// is set: it is checked under the outbox lock, so nothing queued after a kill's
// channel.close can follow it.
func (c *conn) sendUnlessKilled(channel uint16, m method, killed *atomic.Pointer[Error]) {
	c.outMu.Lock()
	if !c.outClosed && (killed == nil || killed.Load() == nil) {
		c.encodePendingLocked()
		c.out = appendMethodFrame(c.out, channel, m)
		c.storeOutLenLocked()
		c.startWriterLocked()
	}
	c.outMu.Unlock()
}

// startWriterLocked starts the writer unless one runs: the outbox has frames, or queues
// wait for it. Only the writer clears c.writing, under c.outMu and when it finds nothing
// to do, so nothing queued is ever left without a writer. c.outMu must be held.
func (c *conn) startWriterLocked() {
	if !c.writing {
		c.writing = true
		go c.writeLoop()
	}
}

// closeOutboxLocked closes the outbox: later appends are dropped, and writerDone closes
// once what is queued is written (at once when no writer runs). c.outMu must be held.
func (c *conn) closeOutboxLocked() {
	if c.outClosed {
		return
	}
	c.outClosed = true
	if !c.writing {
		close(c.writerDone)
	}
}

// heartbeatDue reports whether c has written nothing for half its heartbeat interval.
func (c *conn) heartbeatDue(now int64) bool {
	hb := c.heartbeat.Load()
	return hb > 0 && now-c.wroteAt.Load() >= hb/2
}

// heartbeatIfIdle queues a heartbeat, starting the writer, when one is due and no write
// is under way; it reports whether it did. The server's sweep calls it (sweepHeartbeats):
// an idle connection has no writer goroutine to keep time.
func (c *conn) heartbeatIfIdle(now int64) bool {
	if !c.heartbeatDue(now) {
		return false
	}
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.writing || c.outClosed {
		return false
	}
	c.encodePendingLocked()
	c.out = appendHeartbeat(c.out)
	c.storeOutLenLocked()
	c.startWriterLocked()
	return true
}

// zeroCopyBody is the body size from which deliveries point at the message's body
// instead of copying it into the outbox; the writer sends it with writev.
const zeroCopyBody = 8 << 10

// appendContentLocked appends a content header and body frames to the outbox; large
// bodies are not copied but queued by reference. c.outMu must be held.
func (c *conn) appendContentLocked(channel uint16, props, body []byte) {
	if len(body) < zeroCopyBody || c.isTLS {
		c.out = appendContent(c.out, channel, props, body, c.frameMax)
		return
	}
	hdr := len(c.out)
	c.out = appendContent(c.out, channel, props, nil, c.frameMax)
	// appendContent wrote a zero body size after the frame header, class and weight; patch
	// in the real one.
	binary.BigEndian.PutUint64(c.out[hdr+7+4:], uint64(len(body)))
	chunk := int(c.frameMax) - frameOverhead
	for len(body) > 0 {
		n := min(len(body), chunk)
		c.out = append(c.out, frameBody, byte(channel>>8), byte(channel))
		c.out = binary.BigEndian.AppendUint32(c.out, uint32(n))
		c.outv = append(c.outv, c.out[c.cut:len(c.out):len(c.out)], body[:n:n])
		c.outvBytes += len(c.out) - c.cut + n
		c.cut = len(c.out)
		c.out = append(c.out, frameEnd)
		body = body[n:]
	}
}

// storeOutLenLocked publishes the outbox size. c.outMu must be held.
func (c *conn) storeOutLenLocked() {
	c.outLen.Store(int64(len(c.out) - c.cut + c.outvBytes + c.pendBytes))
}

// writeLoop writes the outbox in batches until it finds it empty, then ends: an idle
// connection has no writer. A batch is one write, or one writev when it holds large bodies
// by reference. After each batch it calls back the queues that waited for the outbox to
// drain. The writer that finds the outbox closed and empty closes writerDone.
func (c *conn) writeLoop() {
	var buf []byte
	var vec, spareVec [][]byte
	var pend, sparePend []delivery
	yielded, first := false, true
	for {
		c.outMu.Lock()
		if first {
			buf, c.spare = c.spare, nil
			sparePend, c.sparePend = c.sparePend, nil
			first = false
		}
		if len(c.out) == 0 && len(c.outv) == 0 && len(c.pend) == 0 && (len(c.drainWait) == 0 || c.outClosed) {
			if !yielded && !c.outClosed {
				// Let the goroutines producing a burst add to it before ending: a busy
				// connection keeps its writer rather than starting one per batch.
				c.outMu.Unlock()
				runtime.Gosched()
				yielded = true
				continue
			}
			// Decided under outMu: an append from now on starts a new writer. The buffers
			// stay for it until the connection is idle (releaseIdleOutbox).
			c.writing = false
			c.spare, c.sparePend, c.drainWait = buf[:0], sparePend[:0], nil
			if c.outClosed {
				c.out, c.outv, c.spare, c.pend, c.sparePend = nil, nil, nil, nil, nil
				close(c.writerDone)
			} else if c.out != nil || c.outv != nil || c.spare != nil || c.pend != nil {
				c.outHeld.Store(true)
			}
			c.outMu.Unlock()
			return
		}
		yielded = false
		buf, c.out = c.out, buf[:0]
		vec, c.outv = c.outv, spareVec[:0]
		pend, c.pend = c.pend, sparePend[:0]
		cut := c.cut
		c.cut, c.outvBytes, c.pendBytes = 0, 0, 0
		c.outLen.Store(0)
		stop := c.outClosed
		waiting := c.drainWait
		c.drainWait = nil
		c.outMu.Unlock()
		if len(pend) > 0 {
			buf = c.appendDeliveries(buf, pend)
			clear(pend)
		}
		sparePend = pend[:0]
		if len(buf) > 0 || len(vec) > 0 {
			c.nc.SetWriteDeadline(time.Now().Add(writeTimeout(c.heartbeatInterval())))
			var err error
			if len(vec) == 0 {
				_, err = c.nc.Write(buf)
			} else {
				if cut < len(buf) {
					vec = append(vec, buf[cut:])
				}
				bufs := net.Buffers(vec)
				_, err = bufs.WriteTo(c.nc)
			}
			if err != nil {
				c.writeFailed()
				return
			}
			c.wroteAt.Store(time.Now().UnixNano())
			select {
			case c.drained <- struct{}{}:
			default:
			}
		}
		clear(vec)
		spareVec = vec[:0]
		if !stop {
			for _, q := range waiting {
				q.dispatch()
			}
		}
	}
}

// releaseIdleOutbox drops the outbox buffers of a connection that has written nothing for
// a second (releaseOutbox). The heartbeat sweep calls it.
func (c *conn) releaseIdleOutbox(now int64) {
	if c.outHeld.Load() && now-c.wroteAt.Load() >= int64(time.Second) {
		c.releaseOutbox()
	}
}

// releaseOutbox drops the outbox buffers kept between writer runs, unless a writer runs:
// an idle connection holds none.
func (c *conn) releaseOutbox() {
	c.outMu.Lock()
	if !c.writing && len(c.out) == 0 && len(c.outv) == 0 {
		c.out, c.outv, c.spare, c.pend, c.sparePend = nil, nil, nil, nil, nil
		c.outHeld.Store(false)
	}
	c.outMu.Unlock()
}

// writeFailed ends the writing of a connection whose socket failed a write: the socket
// closes (so the reader ends too) and the outbox is closed and emptied.
func (c *conn) writeFailed() {
	c.nc.Close()
	c.outMu.Lock()
	c.outClosed, c.writing = true, false
	c.out, c.outv, c.spare, c.cut, c.outvBytes, c.drainWait = nil, nil, nil, 0, 0, nil
	c.pend, c.sparePend, c.pendBytes = nil, nil, 0
	c.outLen.Store(0)
	close(c.writerDone)
	c.outMu.Unlock()
}

// heartbeatInterval is the negotiated heartbeat interval, 0 when off.
func (c *conn) heartbeatInterval() time.Duration { return time.Duration(c.heartbeat.Load()) }

// writeTimeout bounds one write: a client that reads nothing for this long is dropped.
func writeTimeout(heartbeat time.Duration) time.Duration {
	if heartbeat > 0 {
		return max(2*heartbeat, 10*time.Second)
	}
	return 60 * time.Second
}

// sendReturn appends basic.return and the message's content to the outbox.
func (c *conn) sendReturn(channel uint16, code uint16, text string, m *message) {
	c.outMu.Lock()
	if b, start, ok := c.startMethodLocked(channel, idBasicReturn); ok {
		b = appendShort(b, code)
		b = appendShortstr(b, text)
		b = appendExchangeKey(b, m)
		c.finishContentLocked(b, start, channel, m)
	}
	c.outMu.Unlock()
}

// startMethodLocked starts a method frame in the outbox unless it is closed: the outbox,
// where the frame starts, and whether it may be written. c.outMu must be held.
func (c *conn) startMethodLocked(channel uint16, id uint32) ([]byte, int, bool) {
	if c.outClosed {
		return nil, 0, false
	}
	c.encodePendingLocked()
	b := c.out
	start := len(b)
	b = appendFrameStart(b, frameMethod, channel)
	return binary.BigEndian.AppendUint32(b, id), start, true
}

// sendGetOk appends basic.get-ok and the content to the outbox.
func (c *conn) sendGetOk(channel uint16, tag uint64, e qentry, count uint32) {
	c.outMu.Lock()
	if b, start, ok := c.startMethodLocked(channel, idBasicGetOk); ok {
		b = appendLonglong(b, tag)
		b = appendBit(b, e.redelivered)
		b = appendExchangeKey(b, e.msg)
		b = appendLong(b, count)
		c.finishContentLocked(b, start, channel, e.msg)
	}
	c.outMu.Unlock()
}

// sendDelivery queues basic.deliver and the content (queueDeliveries).
func (c *conn) sendDelivery(channel uint16, consumerTag *string, tag uint64, e qentry) {
	d := [1]delivery{{msg: e.msg, consumerTag: consumerTag, tag: tag, deliveryMarks: deliveryMarks{channel, e.redelivered}}}
	c.queueDeliveries(d[:])
}

// queueDeliveries queues basic.deliver frames and their content for the writer. A body
// the outbox would copy is encoded by the writer, on the consumer connection's goroutine,
// not by the goroutine delivering (often a publisher's reader): a message does not change
// once routed. A large one is queued by reference at once.
func (c *conn) queueDeliveries(ds []delivery) {
	c.outMu.Lock()
	// Nothing may follow connection.close (or close-ok): closing is set before either is
	// queued, so a run that checked it earlier is dropped here. Its unacked deliveries go
	// back to their queues when the channels close; no-ack ones are lost in transit, as
	// on a connection that drops.
	if !c.outClosed && !c.closing.Load() {
		for i := range ds {
			d := &ds[i]
			if len(d.msg.body()) < zeroCopyBody || c.isTLS {
				c.pend = append(c.pend, *d)
				c.pendBytes += d.size()
			} else if b, start, ok := c.startMethodLocked(d.channel, idBasicDeliver); ok {
				c.finishContentLocked(appendDeliverArgs(b, *d.consumerTag, d.tag, d.redelivered, d.msg), start, d.channel, d.msg)
			}
		}
		c.storeOutLenLocked()
		c.startWriterLocked()
	}
	c.outMu.Unlock()
}

// delivery is a basic.deliver waiting in the outbox to be encoded (conn.pend).
type delivery struct {
	msg         *message
	consumerTag *string // the consumer's own: a string here would make delivery 40 octets
	tag         uint64
	deliveryMarks
}

// deliveryMarks are a delivery's small fields, one field of delivery: with four fields
// and 32 octets a delivery stays in registers when passed and stored. With five, each was
// copied through memory with wide moves after narrow stores, which stall (fanout: 7 % of
// the broker's CPU on two such instructions).
type deliveryMarks struct {
	channel     uint16
	redelivered bool
}

// size is about what d takes encoded: frame overheads plus the variable parts.
func (d *delivery) size() int {
	return 64 + len(*d.consumerTag) + len(d.msg.exchange) + len(d.msg.data)
}

// appendTo appends d's method, header and body frames to b.
func (d *delivery) appendTo(b []byte, frameMax uint32) []byte {
	start := len(b)
	b = appendFrameStart(b, frameMethod, d.channel)
	b = binary.BigEndian.AppendUint32(b, idBasicDeliver)
	b = appendDeliverArgs(b, *d.consumerTag, d.tag, d.redelivered, d.msg)
	b = appendFrameEnd(b, start)
	return appendContent(b, d.channel, d.msg.props(), d.msg.body(), frameMax)
}

// appendDeliverArgs appends basic.deliver's arguments.
func appendDeliverArgs(b []byte, consumerTag string, tag uint64, redelivered bool, m *message) []byte {
	b = appendShortstr(b, consumerTag)
	b = appendLonglong(b, tag)
	b = appendBit(b, redelivered)
	return appendExchangeKey(b, m)
}

// encodePendingLocked encodes the deliveries waiting in pend into out, so that a frame
// appended next follows them. c.outMu must be held.
func (c *conn) encodePendingLocked() {
	if len(c.pend) == 0 {
		return
	}
	c.out = c.appendDeliveries(c.out, c.pend)
	clear(c.pend)
	c.pend, c.pendBytes = c.pend[:0], 0
}

// appendDeliveries appends the encoded deliveries ds to b.
func (c *conn) appendDeliveries(b []byte, ds []delivery) []byte {
	for i := range ds {
		b = ds[i].appendTo(b, c.frameMax)
	}
	return b
}

// appendExchangeKey appends a message's exchange and routing key as short strings.
func appendExchangeKey(b []byte, m *message) []byte {
	b = appendShortstr(b, m.exchange)
	b = append(b, m.keyLen)
	return append(b, m.routingKey()...)
}

func appendBit(b []byte, v bool) []byte {
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

// finishContentLocked ends the method frame started at start in b, makes b the outbox, and
// appends m's properties and body after it. c.outMu must be held.
func (c *conn) finishContentLocked(b []byte, start int, channel uint16, m *message) {
	c.out = appendFrameEnd(b, start)
	c.appendContentLocked(channel, m.props(), m.body())
	c.storeOutLenLocked()
	c.startWriterLocked()
}
