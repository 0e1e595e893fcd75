package amqp

import (
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
)

// fuzzFrames turns fuzz input into frames: each record is a kind octet (its low two bits
// the frame type: method, header, body or heartbeat; the next two the channel, 0 to 3; the
// next two how many times the frame is sent, less one; the top two are ignored), a length
// octet, and that many
// octets of payload, which the frame carries whole, with a correct size and frame end. The
// broker then sees frames in any order, repeated, and with any contents, rather than the
// framing errors raw mutated bytes mostly make.
func fuzzFrames(data []byte) []byte {
	types := [4]uint8{frameMethod, frameHeader, frameBody, frameHeartbeat}
	var out []byte
	for len(data) >= 2 {
		kind, n := data[0], int(data[1])
		data = data[2:]
		n = min(n, len(data))
		frame := wireFrame(types[kind&3], uint16(kind>>2&3), data[:n])
		for range 1 + kind>>4&3 {
			out = append(out, frame...)
		}
		data = data[n:]
	}
	return out
}

// fuzzRecord is the record fuzzFrames makes into a frame of type typ on channel with payload.
func fuzzRecord(typ uint8, channel uint16, payload []byte) []byte {
	kinds := map[uint8]byte{frameMethod: 0, frameHeader: 1, frameBody: 2, frameHeartbeat: 3}
	if len(payload) > 255 {
		panic("fuzzRecord: payload over 255 octets")
	}
	return append([]byte{kinds[typ] | byte(channel)<<2, byte(len(payload))}, payload...)
}

// fuzzMethod is fuzzRecord of a method frame.
func fuzzMethod(channel uint16, m method) []byte {
	return fuzzRecord(frameMethod, channel, m.encode(nil))
}

// fuzzPublish is the records of a publish on channel 1 to the default exchange.
func fuzzPublish(key, body string, props []byte) []byte {
	header := appendLonglong([]byte{0, classBasic, 0, 0}, uint64(len(body)))
	if props == nil {
		props = []byte{0, 0}
	}
	b := fuzzMethod(1, &basicPublish{RoutingKey: key})
	b = append(b, fuzzRecord(frameHeader, 1, append(header, props...))...)
	if body != "" {
		b = append(b, fuzzRecord(frameBody, 1, []byte(body))...)
	}
	return b
}

// fuzzSeeds are sessions a client could run, and some it should not: the fuzzer starts
// from them.
func fuzzSeeds() [][]byte {
	open := fuzzMethod(1, &channelOpen{})
	declare := fuzzMethod(1, &queueDeclare{Queue: "q"})
	ttl := fuzzMethod(1, &queueDeclare{Queue: "t", Arguments: table{"x-message-ttl": int32(0), "x-dead-letter-exchange": ""}})
	prio := fuzzMethod(1, &queueDeclare{Queue: "p", Arguments: table{"x-max-priority": int32(5), "x-max-length": int32(2), "x-overflow": "reject-publish"}})
	// delivery-mode 2, priority 3, expiration "0", headers {a: 1}
	props := []byte{0b0011_1001, 0b0000_0000}
	props = appendSortedTable(props, table{"a": int32(1)})
	props = append(props, 2, 3)
	props = appendShortstr(props, "0")
	var seeds [][]byte
	add := func(parts ...[]byte) {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		seeds = append(seeds, b)
	}
	add(open, declare, fuzzPublish("q", "hello", nil), fuzzMethod(1, &basicGet{Queue: "q"}), fuzzMethod(1, &basicAck{DeliveryTag: 1}))
	add(open, declare, fuzzMethod(1, &basicQos{PrefetchCount: 1}), fuzzMethod(1, &basicConsume{Queue: "q", ConsumerTag: "c"}),
		fuzzPublish("q", "a", nil), fuzzPublish("q", "b", props), fuzzMethod(1, &basicNack{DeliveryTag: 1, Multiple: true, Requeue: true}),
		fuzzMethod(1, &basicCancel{ConsumerTag: "c"}), fuzzMethod(1, &basicRecover{Requeue: true}))
	add(open, fuzzMethod(1, &confirmSelect{}), ttl, fuzzPublish("t", "x", props), fuzzMethod(1, &queuePurge{Queue: "t"}))
	add(open, fuzzMethod(1, &txSelect{}), prio, fuzzPublish("p", "1", props), fuzzPublish("p", "2", nil), fuzzPublish("p", "3", nil),
		fuzzMethod(1, &txCommit{}), fuzzMethod(1, &txRollback{}))
	add(open, fuzzMethod(1, &exchangeDeclare{Exchange: "x", Type: "topic"}), declare,
		fuzzMethod(1, &queueBind{Queue: "q", Exchange: "x", RoutingKey: "a.#"}), fuzzMethod(1, &exchangeBind{Destination: "x", Source: "amq.fanout"}),
		fuzzMethod(1, &queueDelete{Queue: "q", IfUnused: true}), fuzzMethod(1, &exchangeDelete{Exchange: "x"}))
	add(open, fuzzMethod(2, &channelOpen{}), fuzzMethod(1, &channelFlow{Active: false}), fuzzMethod(2, &channelClose{ReplyCode: 200}),
		fuzzRecord(frameHeartbeat, 0, nil), fuzzMethod(1, &queueDeclare{Queue: "amq.rabbitmq.reply-to"}))
	// A content frame out of place, a body longer than its header said, and a publish
	// interrupted by another method.
	add(open, fuzzRecord(frameBody, 1, []byte("stray")))
	add(open, declare, fuzzMethod(1, &basicPublish{RoutingKey: "q"}), fuzzRecord(frameHeader, 1, wireContentHeader(2)),
		fuzzRecord(frameBody, 1, []byte("too long")))
	add(open, fuzzMethod(1, &basicPublish{RoutingKey: "q"}), fuzzMethod(1, &queueDeclare{Queue: "q"}))
	return seeds
}

// FuzzConnection feeds a logged-in connection the frames fuzzFrames makes of the input,
// then connection.close, and checks what the broker owes any input: every method frame it
// sends decodes, it answers the close (connection.close-ok, or a connection.close of its
// own) and closes the socket within a bound, it does not panic (Healthy), and it shuts
// down cleanly. Each input gets a fresh in-memory broker, so a failure reproduces from its
// input alone.
func FuzzConnection(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		srv := serveOnLoopback(t, Config{Logger: wireDiscardLogger()}) // in memory: no DataDir
		c := wireConnect(t, srv.Addr().String(), wireOpts{})
		// Written while the replies are read: a broker whose outbox is full stops reading
		// until its client reads. It may close the socket before it has read all of this,
		// so a write error is no failure.
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			c.nc.SetWriteDeadline(time.Now().Add(wireTimeout))
			c.nc.Write(append(fuzzFrames(data), appendMethodFrame(nil, 0, &connectionClose{ReplyCode: 200})...))
		}()
		answered, reset := false, false
		deadline := time.Now().Add(2 * wireTimeout)
		for {
			fr, err := c.readFrame(time.Until(deadline))
			if errors.Is(err, syscall.ECONNRESET) {
				reset = true // the broker closed with input unread: what it sent last may be lost
				break
			}
			if wireIsClosed(err) {
				break
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				<-wrote
				t.Fatalf("the broker did not close the connection within %v", 2*wireTimeout)
			}
			if err != nil {
				<-wrote
				t.Fatalf("reading the broker's frames: %v", err)
			}
			if fr.typ != frameMethod {
				continue
			}
			id, d, err := methodHeader(fr.payload)
			m := newMethod(id)
			if err != nil || m == nil {
				<-wrote
				t.Fatalf("the broker sent a method frame of unknown method %#x", id)
			}
			if m.decode(&d); d.err != nil {
				<-wrote
				t.Fatalf("the broker sent a malformed %s", methodName(id))
			}
			if fr.channel == 0 && (id == idConnectionCloseOk || id == idConnectionClose) {
				answered = true
			}
		}
		<-wrote
		c.nc.Close()
		if !answered && !reset {
			t.Fatal("the broker closed the socket without answering connection.close")
		}
		pollFor(t, "the connection to end", func() bool { return openConns(srv) == 0 })
		if err := srv.Healthy(); err != nil {
			t.Fatal(err)
		}
	})
}
