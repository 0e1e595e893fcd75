package amqp

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// TestConnOutboxOrder: deliveries the writer encodes (small bodies), deliveries queued by
// reference (large bodies) and other frames reach the socket in the order they were sent,
// each delivery byte for byte as basic.deliver and its content encode.
func TestConnOutboxOrder(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	server, client := net.Pipe()
	t.Cleanup(func() { server.Close(); client.Close() })
	c := newConn(srv, server)
	c.frameMax = 4096
	msg := func(key, body string) *message {
		return &message{exchange: "ex", keyLen: uint8(len(key)), propsLen: 2, size: uint32(len(body)),
			data: []byte(key + "\x00\x00" + body)}
	}
	small, large := msg("k1", "small body"), msg("k2", strings.Repeat("L", zeroCopyBody+5000))
	var want []byte
	deliver := func(tag uint64, m *message, redelivered bool) {
		c.sendDelivery(7, "ctag", tag, qentry{msg: m, redelivered: redelivered})
		want = appendMethodFrame(want, 7, &basicDeliver{ConsumerTag: "ctag", DeliveryTag: tag,
			Redelivered: redelivered, Exchange: "ex", RoutingKey: string(m.routingKey())})
		want = appendContent(want, 7, m.props(), m.body(), c.frameMax)
	}
	deliver(1, small, false)
	deliver(2, large, true)
	deliver(3, small, true)
	c.sendOn(7, &basicCancelOk{ConsumerTag: "ctag"})
	want = appendMethodFrame(want, 7, &basicCancelOk{ConsumerTag: "ctag"})
	deliver(4, small, false)
	c.send(&connectionCloseOk{})
	want = appendMethodFrame(want, 0, &connectionCloseOk{})

	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(client, got); err != nil {
		t.Fatalf("reading the outbox: %v", err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("the socket got %d octets differing from what was sent at octet %d", len(got), i)
	}
}
