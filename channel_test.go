package amqp

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

func TestPublishToMissingExchange(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	closed := notifyChannelClose(ch)
	publishText(t, ch, "no-such-exchange", "k", "x")
	awaitCloseCode(t, closed, 404)

	// A channel error leaves the connection open.
	ch2 := openChannel(t, c)
	declareTransientQueue(t, ch2, "after")
}

func TestMandatoryUnroutableIsReturned(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if err := ch.ExchangeDeclare("x", "direct", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	returns := ch.NotifyReturn(make(chan amqp091.Return, 1))
	pub := amqp091.Publishing{
		ContentType: "text/plain",
		MessageId:   "m-1",
		Headers:     amqp091.Table{"h": "v"},
		Body:        []byte("unroutable body"),
	}
	if err := ch.Publish("x", "nowhere", true, false, pub); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-returns:
		if r.ReplyCode != 312 || r.ReplyText != "NO_ROUTE" {
			t.Errorf("return %d %q, want 312 NO_ROUTE", r.ReplyCode, r.ReplyText)
		}
		if r.Exchange != "x" || r.RoutingKey != "nowhere" {
			t.Errorf("return exchange %q key %q, want x nowhere", r.Exchange, r.RoutingKey)
		}
		if string(r.Body) != "unroutable body" || r.ContentType != "text/plain" || r.MessageId != "m-1" ||
			!reflect.DeepEqual(r.Headers, amqp091.Table{"h": "v"}) {
			t.Errorf("returned content %+v differs from what was published", r)
		}
	case <-time.After(recvWait):
		t.Fatal("no basic.return")
	}

	// Not mandatory: dropped silently, and the channel stays open.
	publishText(t, ch, "x", "nowhere", "dropped")
	declareTransientQueue(t, ch, "still-open")
	select {
	case r := <-returns:
		t.Fatalf("unexpected return of %q", r.Body)
	default:
	}
}

func TestPublishImmediateIsNotImplemented(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	closed := c.NotifyClose(make(chan *amqp091.Error, 1))
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	if err := ch.Publish("", "q", false, true, amqp091.Publishing{Body: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	awaitCloseCode(t, closed, 540)
}

func TestLargeBodyAcrossSmallFrames(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c, err := amqp091.DialConfig(url, amqp091.Config{FrameSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "big")
	body := make([]byte, 1<<20)
	for i := range body {
		body[i] = byte(i*7 + i>>11)
	}
	if err := ch.Publish("", "big", false, false, amqp091.Publishing{Body: body}); err != nil {
		t.Fatal(err)
	}
	d := takeDelivery(t, consumeTagged(t, ch, "big", "c"))
	if !bytes.Equal(d.Body, body) {
		t.Fatalf("body of %d octets differs from the %d published", len(d.Body), len(body))
	}
}

func TestMessageLargerThanMaxSize(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t, Config{MaxMessageSize: 1024})
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	closed := notifyChannelClose(ch)
	if err := ch.Publish("", "q", false, false, amqp091.Publishing{Body: make([]byte, 1025)}); err != nil {
		t.Fatal(err)
	}
	awaitCloseCode(t, closed, 406)

	ch2 := openChannel(t, c)
	if err := ch2.Publish("", "q", false, false, amqp091.Publishing{Body: make([]byte, 1024)}); err != nil {
		t.Fatal(err)
	}
	d, ok, err := ch2.Get("q", true)
	if err != nil || !ok || len(d.Body) != 1024 {
		t.Fatalf("get after 406: ok=%v err=%v len=%d, want the 1024-octet message", ok, err, len(d.Body))
	}
}

func TestBasicGet(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	if _, ok, err := ch.Get("q", false); err != nil || ok {
		t.Fatalf("get on empty queue: ok=%v err=%v, want get-empty", ok, err)
	}
	for i := range 3 {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	for i := range 3 {
		d, ok, err := ch.Get("q", false)
		if err != nil || !ok {
			t.Fatalf("get %d: ok=%v err=%v", i, ok, err)
		}
		if string(d.Body) != strconv.Itoa(i) || d.MessageCount != uint32(2-i) || d.Redelivered || d.RoutingKey != "q" {
			t.Fatalf("get %d: body %q count %d redelivered %v key %q", i, d.Body, d.MessageCount, d.Redelivered, d.RoutingKey)
		}
		if d.DeliveryTag != uint64(i+1) {
			t.Fatalf("get %d: tag %d, want %d", i, d.DeliveryTag, i+1)
		}
	}
	if _, ok, _ := ch.Get("q", false); ok {
		t.Fatal("get-ok on an empty queue")
	}
	// Unacked gets go back on reject with requeue, redelivered.
	if err := ch.Reject(2, true); err != nil {
		t.Fatal(err)
	}
	d, ok, err := ch.Get("q", true)
	if err != nil || !ok || string(d.Body) != "1" || !d.Redelivered || d.MessageCount != 0 {
		t.Fatalf("get after reject: ok=%v err=%v body %q redelivered %v", ok, err, d.Body, d.Redelivered)
	}
	_, _, err = ch.Get("missing", false)
	wantReplyCode(t, err, 404)
}

func TestRequeueKeepsOriginalOrder(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	for i := 1; i <= 8; i++ {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	if err := ch.Qos(5, 0, false); err != nil {
		t.Fatal(err)
	}
	msgs := consumeTagged(t, ch, "q", "first")
	var ds []amqp091.Delivery
	for range 5 {
		ds = append(ds, takeDelivery(t, msgs))
	}
	if got := deliveryBodies(ds); !reflect.DeepEqual(got, []string{"1", "2", "3", "4", "5"}) {
		t.Fatalf("first deliveries %q", got)
	}
	// Cancel first so the requeued messages wait in the queue instead of going straight back.
	if err := ch.Cancel("first", false); err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{ds[1].Nack(false, true), ds[3].Nack(false, true), ds[0].Reject(true)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := queueReady(t, ch, "q"); n != 6 {
		t.Fatalf("%d ready, want 6 (3 requeued + 3 never delivered)", n)
	}
	msgs = consumeTagged(t, ch, "q", "second")
	want := []struct {
		body        string
		redelivered bool
	}{{"1", true}, {"2", true}, {"4", true}, {"6", false}, {"7", false}, {"8", false}}
	for i, w := range want {
		d := takeDelivery(t, msgs)
		if string(d.Body) != w.body || d.Redelivered != w.redelivered {
			t.Fatalf("delivery %d: %q redelivered=%v, want %q redelivered=%v", i, d.Body, d.Redelivered, w.body, w.redelivered)
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
		if i == 4 {
			// 3 and 5 are still unacked but belong to the cancelled consumer.
			if err := ds[2].Ack(false); err != nil {
				t.Fatal(err)
			}
			if err := ds[4].Ack(false); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("%d ready at the end, want 0", n)
	}
}

func TestNackMultipleRequeuesInOrder(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	for i := 1; i <= 5; i++ {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	msgs := consumeTagged(t, ch, "q", "c")
	var ds []amqp091.Delivery
	for range 5 {
		ds = append(ds, takeDelivery(t, msgs))
	}
	// Ack 1..2 with one multiple ack, nack 3..4 with requeue in one multiple nack, reject 5
	// without requeue, then publish 6.
	if err := ds[1].Ack(true); err != nil {
		t.Fatal(err)
	}
	if err := ds[3].Nack(true, true); err != nil {
		t.Fatal(err)
	}
	if err := ds[4].Reject(false); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "", "q", "6")
	var got []string
	for range 3 {
		d := takeDelivery(t, msgs)
		got = append(got, fmt.Sprintf("%s/%v", d.Body, d.Redelivered))
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
	if want := []string{"3/true", "4/true", "6/false"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("after settling got %q, want %q", got, want)
	}
	expectNoDelivery(t, msgs)
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("%d ready, want 0 (5 was rejected without requeue)", n)
	}
}

func TestSettleUnknownTag(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	setup := openChannel(t, c)
	declareTransientQueue(t, setup, "q")
	cases := []struct {
		name   string
		settle func(ch *amqp091.Channel, tag uint64) error
	}{
		{"ack-unknown", func(ch *amqp091.Channel, tag uint64) error { return ch.Ack(tag+100, false) }},
		{"nack-unknown", func(ch *amqp091.Channel, tag uint64) error { return ch.Nack(tag+100, false, true) }},
		{"reject-unknown", func(ch *amqp091.Channel, tag uint64) error { return ch.Reject(tag+100, false) }},
		{"ack-twice", func(ch *amqp091.Channel, tag uint64) error {
			if err := ch.Ack(tag, false); err != nil {
				return err
			}
			return ch.Ack(tag, false)
		}},
		{"reject-after-ack", func(ch *amqp091.Channel, tag uint64) error {
			if err := ch.Ack(tag, false); err != nil {
				return err
			}
			return ch.Reject(tag, true)
		}},
	}
	for _, tc := range cases {
		ch := openChannel(t, c)
		publishText(t, ch, "", "q", tc.name)
		d, ok, err := ch.Get("q", false)
		if err != nil || !ok {
			t.Fatalf("%s: get: ok=%v err=%v", tc.name, ok, err)
		}
		closed := notifyChannelClose(ch)
		if err := tc.settle(ch, d.DeliveryTag); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		awaitCloseCode(t, closed, 406)
	}
}

func TestSettleMultipleUnknownTag(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	setup := openChannel(t, c)
	declareTransientQueue(t, setup, "q")
	for _, name := range []string{"beyond-last", "already-acked"} {
		ch := openChannel(t, c)
		publishText(t, ch, "", "q", "1")
		publishText(t, ch, "", "q", "2")
		d1, _, _ := ch.Get("q", false)
		d2, _, err := ch.Get("q", false)
		if err != nil {
			t.Fatal(err)
		}
		tag := d2.DeliveryTag + 10
		if name == "already-acked" {
			if err := ch.Ack(d1.DeliveryTag, false); err != nil {
				t.Fatal(err)
			}
			tag = d1.DeliveryTag
		}
		closed := notifyChannelClose(ch)
		if err := ch.Ack(tag, true); err != nil {
			t.Fatal(err)
		}
		awaitCloseCode(t, closed, 406)
	}
}

func TestRecover(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	for i := range 3 {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	msgs := consumeTagged(t, ch, "q", "c")
	for i := range 3 {
		if d := takeDelivery(t, msgs); string(d.Body) != strconv.Itoa(i) || d.Redelivered {
			t.Fatalf("delivery %d: %q redelivered=%v", i, d.Body, d.Redelivered)
		}
	}
	if err := ch.Recover(true); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		d := takeDelivery(t, msgs)
		if string(d.Body) != strconv.Itoa(i) || !d.Redelivered {
			t.Fatalf("after recover %d: %q redelivered=%v, want %d redelivered", i, d.Body, d.Redelivered, i)
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("%d ready, want 0", n)
	}

	// RabbitMQ does not implement recover without requeue: 540, a connection exception.
	wantReplyCode(t, ch.Recover(false), 540)
	pollFor(t, "connection closed after 540", c.IsClosed)
}

func TestCloseRequeuesUnacked(t *testing.T) {
	t.Parallel()
	for _, closeWhat := range []string{"channel", "connection"} {
		t.Run(closeWhat, func(t *testing.T) {
			t.Parallel()
			_, url := newTestServer(t)
			c1 := dial(t, url)
			ch1 := openChannel(t, c1)
			declareTransientQueue(t, ch1, "q")
			for i := range 4 {
				publishText(t, ch1, "", "q", strconv.Itoa(i))
			}
			msgs := consumeTagged(t, ch1, "q", "c")
			ds := []amqp091.Delivery{takeDelivery(t, msgs), takeDelivery(t, msgs), takeDelivery(t, msgs), takeDelivery(t, msgs)}
			if err := ds[1].Ack(false); err != nil {
				t.Fatal(err)
			}
			if n := queueReady(t, ch1, "q"); n != 0 {
				t.Fatalf("%d ready before close, want 0", n)
			}
			var err error
			if closeWhat == "channel" {
				err = ch1.Close()
			} else {
				err = c1.Close()
			}
			if err != nil {
				t.Fatal(err)
			}
			ch2 := openChannel(t, dial(t, url))
			pollFor(t, "unacked messages back in the queue", func() bool { return queueReady(t, ch2, "q") == 3 })
			var got []string
			for {
				d, ok, err := ch2.Get("q", true)
				if err != nil {
					t.Fatal(err)
				}
				if !ok {
					break
				}
				got = append(got, fmt.Sprintf("%s/%v", d.Body, d.Redelivered))
			}
			if want := []string{"0/true", "2/true", "3/true"}; !reflect.DeepEqual(got, want) {
				t.Fatalf("after closing the %s the queue holds %q, want %q", closeWhat, got, want)
			}
		})
	}
}

func TestAllPropertiesRoundTrip(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	ts := time.Unix(1700000000, 0)
	headers := amqp091.Table{
		"bool":      true,
		"false":     false,
		"int8":      int8(-8),
		"uint8":     uint8(200),
		"int16":     int16(-16000),
		"int32":     int32(-2000000000),
		"int64":     int64(-9000000000000000000),
		"float32":   float32(1.5),
		"float64":   float64(-2.25),
		"decimal":   amqp091.Decimal{Scale: 2, Value: 12345},
		"string":    "longstr ünïcode",
		"empty":     "",
		"bytes":     []byte{0, 1, 2, 255},
		"timestamp": ts,
		"void":      nil,
		"array":     []interface{}{int32(1), "two", []interface{}{false}, amqp091.Table{"k": int64(3)}},
		"table":     amqp091.Table{"nested": amqp091.Table{"deep": "yes"}, "n": int16(7)},
	}
	pub := amqp091.Publishing{
		ContentType:     "application/json",
		ContentEncoding: "gzip",
		Headers:         headers,
		DeliveryMode:    amqp091.Persistent,
		Priority:        7,
		CorrelationId:   "corr-1",
		ReplyTo:         "reply-q",
		Expiration:      "600000",
		MessageId:       "msg-1",
		Timestamp:       ts,
		Type:            "kind",
		UserId:          "guest",
		AppId:           "app",
		Body:            []byte("payload"),
	}
	check := func(how string, d amqp091.Delivery) {
		t.Helper()
		got := amqp091.Publishing{
			ContentType: d.ContentType, ContentEncoding: d.ContentEncoding, Headers: d.Headers,
			DeliveryMode: d.DeliveryMode, Priority: d.Priority, CorrelationId: d.CorrelationId,
			ReplyTo: d.ReplyTo, Expiration: d.Expiration, MessageId: d.MessageId, Timestamp: d.Timestamp,
			Type: d.Type, UserId: d.UserId, AppId: d.AppId, Body: d.Body,
		}
		if !reflect.DeepEqual(got.Headers, pub.Headers) {
			for k, v := range pub.Headers {
				if !reflect.DeepEqual(got.Headers[k], v) {
					t.Errorf("%s: header %q = %#v, want %#v", how, k, got.Headers[k], v)
				}
			}
			t.Fatalf("%s: headers differ", how)
		}
		if !reflect.DeepEqual(got, pub) {
			t.Fatalf("%s: got %+v\nwant %+v", how, got, pub)
		}
	}
	for range 2 {
		if err := ch.Publish("", "q", false, false, pub); err != nil {
			t.Fatal(err)
		}
	}
	d, ok, err := ch.Get("q", true)
	if err != nil || !ok {
		t.Fatalf("get: ok=%v err=%v", ok, err)
	}
	check("basic.get", d)
	check("basic.deliver", takeDelivery(t, consumeTagged(t, ch, "q", "c")))
}

func TestRawPropertiesPassThrough(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	w := dialFrameClient(t, srv)
	w.send(1, &queueDeclare{Queue: "q"})
	w.expect(1, idQueueDeclareOk)
	p := properties{
		ContentType: "text/plain", ContentEncoding: "utf-8",
		Headers:      table{"u16": uint16(65535), "u32": uint32(4000000000), "ts": timestamp(42), "d": decimal{Scale: 1, Value: -5}},
		DeliveryMode: 1, Priority: 9, CorrelationID: "c", ReplyTo: "r", Expiration: "1000000",
		MessageID: "m", Timestamp: 1234567890, Type: "t", UserID: "guest", AppID: "a", Reserved: "cluster",
	}
	raw := p.encode(nil)
	if flags := binary.BigEndian.Uint16(raw); flags != 0xfffc {
		t.Fatalf("property flags %#04x, want all 14 set (0xfffc)", flags)
	}
	w.publish(1, "", "q", raw, []byte("body"))
	w.send(1, &basicConsume{Queue: "q", ConsumerTag: "c", NoAck: true})
	w.expect(1, idBasicConsumeOk)
	w.expect(1, idBasicDeliver)
	props, body := w.content()
	if !bytes.Equal(props, raw) || string(body) != "body" {
		t.Fatalf("delivered properties %x body %q, want %x body", props, body, raw)
	}
}

func TestPublisherConfirms(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "q")
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	const n = 200
	confirms := ch.NotifyPublish(make(chan amqp091.Confirmation, n))
	for i := range n {
		publishText(t, ch, "", "q", strconv.Itoa(i))
	}
	for i := 1; i <= n; i++ {
		select {
		case cf := <-confirms:
			if !cf.Ack || cf.DeliveryTag != uint64(i) {
				t.Fatalf("confirmation %d: %+v, want ack of tag %d", i, cf, i)
			}
		case <-time.After(recvWait):
			t.Fatalf("no confirmation for tag %d", i)
		}
	}
	select {
	case cf := <-confirms:
		t.Fatalf("extra confirmation %+v", cf)
	case <-time.After(50 * time.Millisecond):
	}
	if got := queueReady(t, ch, "q"); got != n {
		t.Fatalf("%d ready, want %d", got, n)
	}
}

func TestConfirmAfterMandatoryReturn(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	w := dialFrameClient(t, srv)
	w.send(1, &confirmSelect{})
	w.expect(1, idConfirmSelectOk)
	w.send(1, &queueDeclare{Queue: "q"})
	w.expect(1, idQueueDeclareOk)
	// Routable, unroutable mandatory, routable: tags 1, 2, 3.
	for _, key := range []string{"q", "nowhere", "q"} {
		b := appendMethodFrame(nil, 1, &basicPublish{RoutingKey: key, Mandatory: true})
		w.write(appendContent(b, 1, nil, []byte(key), defaultFrameMax))
	}
	var acked uint64
	returned := false
	for acked < 3 {
		_, m := w.next()
		switch m := m.(type) {
		case *basicReturn:
			if returned || m.ReplyCode != 312 || m.ReplyText != "NO_ROUTE" || m.RoutingKey != "nowhere" {
				t.Fatalf("unexpected %+v", m)
			}
			if acked >= 2 {
				t.Fatalf("basic.return after the confirm of its publish (acked up to %d)", acked)
			}
			if _, body := w.content(); string(body) != "nowhere" {
				t.Fatalf("returned body %q", body)
			}
			returned = true
		case *basicAck:
			if m.DeliveryTag <= acked || (!m.Multiple && m.DeliveryTag != acked+1) {
				t.Fatalf("basic.ack %+v after acks up to %d", m, acked)
			}
			acked = m.DeliveryTag
		default:
			t.Fatalf("unexpected %s", methodName(m.id()))
		}
	}
	if !returned {
		t.Fatal("no basic.return")
	}
}

func TestTxCommitAndRollback(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	obs := openChannel(t, c)
	declareTransientQueue(t, obs, "q")
	ch := openChannel(t, c)
	if err := ch.Tx(); err != nil {
		t.Fatal(err)
	}

	// Publishes wait for the commit.
	publishText(t, ch, "", "q", "a")
	publishText(t, ch, "", "q", "b")
	if n := queueReady(t, ch, "q"); n != 0 {
		t.Fatalf("%d ready before commit, want 0", n)
	}
	if err := ch.TxCommit(); err != nil {
		t.Fatal(err)
	}
	if n := queueReady(t, ch, "q"); n != 2 {
		t.Fatalf("%d ready after commit, want 2", n)
	}

	// Rollback drops publishes.
	publishText(t, ch, "", "q", "dropped")
	if err := ch.TxRollback(); err != nil {
		t.Fatal(err)
	}
	if err := ch.TxCommit(); err != nil {
		t.Fatal(err)
	}
	if n := queueReady(t, ch, "q"); n != 2 {
		t.Fatalf("%d ready after rollback, want 2", n)
	}

	// Acks wait for the commit too; a rolled-back ack leaves the message unacked.
	d1, _, err := ch.Get("q", false)
	if err != nil {
		t.Fatal(err)
	}
	d2, _, err := ch.Get("q", false)
	if err != nil {
		t.Fatal(err)
	}
	if err := d1.Ack(false); err != nil {
		t.Fatal(err)
	}
	if err := ch.TxRollback(); err != nil {
		t.Fatal(err)
	}
	if err := d2.Ack(false); err != nil {
		t.Fatal(err)
	}
	if err := ch.TxCommit(); err != nil {
		t.Fatal(err)
	}
	// Only d2's ack took effect: closing the channel requeues d1 alone.
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	d, ok, err := obs.Get("q", true)
	if err != nil || !ok || string(d.Body) != string(d1.Body) || !d.Redelivered || d.MessageCount != 0 {
		t.Fatalf("after close: ok=%v err=%v body %q redelivered %v count %d, want %q redelivered alone",
			ok, err, d.Body, d.Redelivered, d.MessageCount, d1.Body)
	}
}

func TestTxModeErrors(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	cases := []struct {
		name string
		run  func(ch *amqp091.Channel) error
	}{
		{"tx.select on confirm channel", func(ch *amqp091.Channel) error {
			if err := ch.Confirm(false); err != nil {
				return err
			}
			return ch.Tx()
		}},
		{"confirm.select on tx channel", func(ch *amqp091.Channel) error {
			if err := ch.Tx(); err != nil {
				return err
			}
			return ch.Confirm(false)
		}},
		{"tx.commit without select", func(ch *amqp091.Channel) error { return ch.TxCommit() }},
		{"tx.rollback without select", func(ch *amqp091.Channel) error { return ch.TxRollback() }},
	}
	for _, tc := range cases {
		ch := openChannel(t, c)
		if err := tc.run(ch); amqpCode(err) != 406 {
			t.Errorf("%s: %v, want 406", tc.name, err)
		}
	}
}

func TestTxUnknownTagFailsAtAck(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if err := ch.Tx(); err != nil {
		t.Fatal(err)
	}
	closed := ch.NotifyClose(make(chan *amqp091.Error, 1))
	if err := ch.Ack(999, false); err != nil {
		t.Fatal(err)
	}
	// The channel is closed by the ack itself, before the rollback could hide it; the
	// rollback may or may not get there first.
	ch.TxRollback()
	select {
	case e := <-closed:
		if e == nil || e.Code != 406 {
			t.Fatalf("channel closed with %v, want 406", e)
		}
	case <-time.After(recvWait):
		t.Fatal("the channel was not closed")
	}
}

func TestConcurrentPublishConsumeExactlyOnce(t *testing.T) {
	t.Parallel()
	const publishers, consumers, queues, conns = 20, 20, 4, 4
	total := 100_000
	if testing.Short() {
		total = 20_000
	}
	srv, url := newTestServer(t)
	setup := openChannel(t, dial(t, url))
	for q := range queues {
		declareTransientQueue(t, setup, "cq"+strconv.Itoa(q))
	}

	var (
		mu       sync.Mutex
		seen     = make(map[string]int, total)
		problems []string
		acked    int
	)
	done := make(chan struct{})
	errs := make(chan error, publishers+consumers)
	consumerConns := make([]*amqp091.Connection, conns)
	for i := range consumerConns {
		c, err := amqp091.Dial(url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		consumerConns[i] = c
	}
	var consumersDone sync.WaitGroup
	for i := range consumers {
		ch := openChannel(t, consumerConns[i%conns])
		if err := ch.Qos(100, 0, false); err != nil {
			t.Fatal(err)
		}
		msgs := consumeTagged(t, ch, "cq"+strconv.Itoa(i%queues), "c"+strconv.Itoa(i))
		consumersDone.Add(1)
		go func() {
			defer consumersDone.Done()
			for d := range msgs {
				mu.Lock()
				seen[d.MessageId]++
				if n := seen[d.MessageId]; n > 1 || d.Redelivered {
					problems = append(problems, fmt.Sprintf("%s delivered %d times (redelivered=%v)", d.MessageId, n, d.Redelivered))
				}
				mu.Unlock()
				if err := d.Ack(false); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				acked++
				if acked == total {
					close(done)
				}
				mu.Unlock()
			}
		}()
	}

	publisherConns := make([]*amqp091.Connection, conns)
	for i := range publisherConns {
		publisherConns[i] = dial(t, url)
	}
	var wg sync.WaitGroup
	per := total / publishers
	for p := range publishers {
		ch := openChannel(t, publisherConns[p%conns])
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range per {
				id := "p" + strconv.Itoa(p) + "-" + strconv.Itoa(j)
				q := "cq" + strconv.Itoa((p+j)%queues)
				if err := ch.Publish("", q, false, false, amqp091.Publishing{MessageId: id, Body: []byte(id)}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	published := make(chan struct{})
	go func() {
		wg.Wait()
		close(published)
	}()
	timeout := time.After(45 * time.Second)
	select {
	case <-published:
	case err := <-errs:
		t.Fatal(err)
	case <-timeout:
		t.Fatal("timed out publishing")
	}
	select {
	case <-done:
	case err := <-errs:
		t.Fatal(err)
	case <-timeout:
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("timed out: %d distinct of %d delivered, %d acked", len(seen), total, acked)
	}
	mu.Lock()
	if len(seen) != total || len(problems) > 0 {
		t.Fatalf("%d distinct of %d delivered; problems: %v", len(seen), total, problems[:min(len(problems), 10)])
	}
	mu.Unlock()

	// Every ack took effect: once the consumers' connections are gone, nothing is requeued.
	before := openConns(srv)
	for _, c := range consumerConns {
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	consumersDone.Wait()
	pollFor(t, "consumer connections torn down", func() bool { return openConns(srv) == before-conns })
	for q := range queues {
		if n := queueReady(t, setup, "cq"+strconv.Itoa(q)); n != 0 {
			t.Errorf("queue cq%d holds %d messages after every delivery was acked", q, n)
		}
	}
}

func TestAbruptDisconnectRequeuesUnacked(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	var (
		mu  sync.Mutex
		raw net.Conn
	)
	c1, err := amqp091.DialConfig(url, amqp091.Config{Dial: func(network, addr string) (net.Conn, error) {
		nc, err := net.DialTimeout(network, addr, recvWait)
		mu.Lock()
		raw = nc
		mu.Unlock()
		return nc, err
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c1.Close() })
	ch1 := openChannel(t, c1)
	declareTransientQueue(t, ch1, "q")
	const n = 50
	pub := openChannel(t, dial(t, url))
	for i := range n {
		if err := pub.Publish("", "q", false, false, amqp091.Publishing{MessageId: strconv.Itoa(i), Body: []byte(strconv.Itoa(i))}); err != nil {
			t.Fatal(err)
		}
	}
	if got := queueReady(t, pub, "q"); got != n {
		t.Fatalf("%d ready, want %d", got, n)
	}
	if err := ch1.Qos(10, 0, false); err != nil {
		t.Fatal(err)
	}
	msgs1 := consumeTagged(t, ch1, "q", "doomed")
	// Ack the first 4 deliveries; each ack lets 1 more in, so 10 stay unacked out of 14.
	acked := map[string]bool{}
	var held []string
	for i := range 14 {
		d := takeDelivery(t, msgs1)
		if i < 4 {
			if err := d.Ack(false); err != nil {
				t.Fatal(err)
			}
			acked[d.MessageId] = true
		} else {
			held = append(held, d.MessageId)
		}
	}
	expectNoDelivery(t, msgs1)
	// A synchronous method on the same connection: the acks above have been handled.
	if got := queueReady(t, ch1, "q"); got != n-14 {
		t.Fatalf("%d ready, want %d", got, n-14)
	}

	ch2 := openChannel(t, dial(t, url))
	msgs2 := consumeTagged(t, ch2, "q", "survivor")
	mu.Lock()
	raw.Close()
	mu.Unlock()

	got := map[string]int{}
	for len(got) < n-len(acked) {
		d := takeDelivery(t, msgs2)
		got[d.MessageId]++
		if acked[d.MessageId] {
			t.Fatalf("acked message %s delivered again", d.MessageId)
		}
		if got[d.MessageId] > 1 && !d.Redelivered {
			t.Fatalf("message %s delivered twice without redelivered", d.MessageId)
		}
		wasHeld := false
		for _, h := range held {
			wasHeld = wasHeld || h == d.MessageId
		}
		if wasHeld != d.Redelivered {
			t.Fatalf("message %s redelivered=%v, want %v", d.MessageId, d.Redelivered, wasHeld)
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		id := strconv.Itoa(i)
		if !acked[id] && got[id] == 0 {
			t.Errorf("message %s lost", id)
		}
	}
	expectNoDelivery(t, msgs2)
}

// TestPendingHeadersCommitNoBodyMemory: a content header announcing a large body costs the
// broker about what the header itself is until the body arrives, so headers alone cannot
// grow the heap (they used to allocate 16 KiB each, on every channel of a connection).
func TestPendingHeadersCommitNoBodyMemory(t *testing.T) {
	srv, _ := newTestServer(t)
	w := dialFrameClient(t, srv)
	const channels = 1000
	var b []byte
	for id := uint16(2); id < channels+2; id++ {
		b = appendMethodFrame(b, id, &channelOpen{})
	}
	w.write(b)
	for id := uint16(2); id < channels+2; id++ {
		w.expect(id, idChannelOpenOk)
	}
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	b = b[:0]
	for id := uint16(2); id < channels+2; id++ {
		b = appendMethodFrame(b, id, &basicPublish{Exchange: "amq.direct", RoutingKey: "k"})
		b = append(b, wireFrame(frameHeader, id, wireContentHeader(1<<20))...)
	}
	w.write(b)
	// Frames are handled in order: once this is answered, every header was taken.
	w.send(1, &queueDeclare{Queue: "sync", Exclusive: true})
	w.expect(1, idQueueDeclareOk)
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 4<<20 {
		t.Fatalf("%d pending content headers grew the heap by %d bytes", channels, grown)
	}
	// The bodies still arrive and complete their messages.
	w.send(1, &queueBind{Queue: "sync", Exchange: "amq.direct", RoutingKey: "k"})
	w.expect(1, idQueueBindOk)
	body := bytes.Repeat([]byte("b"), 1<<20)
	b = b[:0]
	for off := 0; off < len(body); off += 100 << 10 {
		b = append(b, wireFrame(frameBody, 2, body[off:min(off+100<<10, len(body))])...)
	}
	w.write(b)
	w.send(1, &basicGet{Queue: "sync", NoAck: true})
	w.expect(1, idBasicGetOk)
	if _, got := w.content(); !bytes.Equal(got, body) {
		t.Fatalf("got a body of %d octets, want the %d sent", len(got), len(body))
	}
}

// TestPublishRefusedBeforeContent: write permission is checked at basic.publish, as in
// RabbitMQ, so the channel closes before the client sends the content.
func TestPublishRefusedBeforeContent(t *testing.T) {
	t.Parallel()
	defs := secDefsFile(t, func(d *Definitions) error {
		if err := d.AddUser("reader", "pw"); err != nil {
			return err
		}
		return d.SetPermissions("reader", "/", ".*", "", ".*")
	})
	srv := secServe(t, Config{Definitions: defs}, false)
	c := secWireLogin(t, srv.Addr().String(), "reader", "pw", "/")
	c.openChannel(1)
	c.sendMethod(1, &basicPublish{Exchange: "amq.direct", RoutingKey: "k"})
	cl := wireExpect[*channelClose](c, 1)
	if want := secDenied("exchange", "amq.direct", "/", "reader"); cl.ReplyCode != 403 || cl.ReplyText != want || cl.ClassID != classBasic || cl.MethodID != 40 {
		t.Fatalf("channel.close %d %q (%d.%d), want 403 %q for basic.publish", cl.ReplyCode, cl.ReplyText, cl.ClassID, cl.MethodID, want)
	}
}

// TestUserIDValidated: as in RabbitMQ, a user-id property must name the publishing user,
// unless the user has the impersonator tag.
func TestUserIDValidated(t *testing.T) {
	t.Parallel()
	defs := secDefsFile(t, func(d *Definitions) error {
		for _, u := range []string{"alice", "proxy"} {
			if err := d.AddUser(u, "pw"); err != nil {
				return err
			}
			if err := d.SetPermissions(u, "/", ".*", ".*", ".*"); err != nil {
				return err
			}
		}
		return d.SetUserTags("proxy", "impersonator")
	})
	srv := secServe(t, Config{Definitions: defs}, false)
	addr := srv.Addr().String()
	alice := secConnect(t, addr, "alice", "pw", "/")
	ch, err := alice.Channel()
	if err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "uid")
	publish := func(user string) func(ch *amqp091.Channel) error {
		return func(ch *amqp091.Channel) error {
			return ch.Publish("", "uid", false, false, amqp091.Publishing{UserId: user, Body: []byte(user)})
		}
	}
	secRefused(t, "alice as bob", secTry(t, alice, publish("bob")), 406,
		"PRECONDITION_FAILED - user_id property set to 'bob' but authenticated user was 'alice'")
	secAllowed(t, "alice as alice", secTry(t, alice, publish("alice")))
	proxy := secConnect(t, addr, "proxy", "pw", "/")
	secAllowed(t, "impersonator as bob", secTry(t, proxy, publish("bob")))
	var got []string
	for range 2 {
		d, ok, err := ch.Get("uid", true)
		if err != nil || !ok {
			t.Fatalf("get: %v %v", ok, err)
		}
		got = append(got, d.UserId)
	}
	if !slices.Equal(got, []string{"alice", "bob"}) {
		t.Fatalf("user-ids %q, want alice then bob", got)
	}
}

// TestChannelFlow: channel.flow active=true is answered, active=false is RabbitMQ's 540
// NOT_IMPLEMENTED "active=false", which closes the connection.
func TestChannelFlow(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	conn := dial(t, url)
	ch := openChannel(t, conn)
	if err := ch.Flow(true); err != nil {
		t.Fatalf("flow active=true: %v", err)
	}
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))
	err := ch.Flow(false)
	if e, ok := err.(*amqp091.Error); !ok || e.Code != 540 || e.Reason != "NOT_IMPLEMENTED - active=false" {
		t.Fatalf("flow active=false: %v, want 540 NOT_IMPLEMENTED - active=false", err)
	}
	awaitCloseCode(t, closed, 540)
	// As in RabbitMQ, the connection.close names the method that failed: channel.flow.
	w := wireConnect(t, srv.Addr().String(), wireOpts{})
	w.openChannel(1)
	w.sendMethod(1, &channelFlow{Active: false})
	w.expectConnClose(replyNotImplemented, classChannel, 20) // channel.flow
}

// A frame too large for the read buffer may take a while to come over a slow link: what
// the client published before it is enqueued and confirmed before the reader waits for the
// frame's octets, not held back until the frame is whole.
func TestPublishesBeforeALargeFrameAreNotHeldBack(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := rawDial(t, url)
	c.writeMethod(1, &confirmSelect{})
	c.writeMethod(1, &queueDeclare{Queue: "q"})
	c.flush(t)
	c.expect(t, idConfirmSelectOk)
	c.expect(t, idQueueDeclareOk)
	publish := func(b []byte, body []byte) []byte {
		return appendContent(appendMethodFrame(b, 1, &basicPublish{RoutingKey: "q"}), 1, []byte{0, 0}, body, 131072)
	}
	big := publish(nil, bytes.Repeat([]byte("b"), 100_000)) // one body frame of 100,000 octets
	// The small message whole, then the big one but for the end of its body frame, in one
	// write: the small one is not at the end of a burst.
	c.buf = append(publish(c.buf, []byte("small")), big[:len(big)-1000]...)
	c.flush(t)
	ackedUpTo := func() uint64 {
		t.Helper()
		c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		defer c.nc.SetReadDeadline(time.Time{})
		f, err := c.fr.read()
		if err != nil {
			t.Fatalf("waiting for a confirm: %v", err)
		}
		id, d, err := methodHeader(f.payload)
		if err != nil || id != idBasicAck {
			t.Fatalf("got %s, want basic.ack", methodName(id))
		}
		m := basicAck{}
		m.decode(&d)
		return m.DeliveryTag
	}
	if tag := ackedUpTo(); tag != 1 {
		t.Fatalf("confirmed up to %d while the large frame is incomplete, want 1", tag)
	}
	ch := openChannel(t, dial(t, url))
	if d, ok, err := ch.Get("q", true); err != nil || !ok || string(d.Body) != "small" {
		t.Fatalf("basic.get: %q, %v, %v; want the small message while the large frame is incomplete", d.Body, ok, err)
	}
	c.buf = append(c.buf, big[len(big)-1000:]...)
	c.flush(t)
	if tag := ackedUpTo(); tag != 2 {
		t.Fatalf("confirmed up to %d, want 2", tag)
	}
	if d, ok, err := ch.Get("q", true); err != nil || !ok || len(d.Body) != 100_000 {
		t.Fatalf("basic.get: %d octets, %v, %v; want the large message", len(d.Body), ok, err)
	}
}

// A burst of messages of several KiB each is enqueued 4 MiB at a time: a client whose
// frames keep the read buffer from running empty does not hold back a thousand of them.
func TestBurstOfLargerMessagesIsEnqueued4MiBAtATime(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := rawDial(t, url)
	c.writeMethod(1, &queueDeclare{Queue: "q"})
	c.flush(t)
	c.expect(t, idQueueDeclareOk)
	// Bodies of 12 KiB fit the read buffer once it has grown (readBufferSize): from then on
	// no frame is too large for it, and only the 4 MiB bound ends a batch.
	body := bytes.Repeat([]byte("m"), 12<<10)
	var one []byte
	one = appendContent(appendMethodFrame(one, 1, &basicPublish{RoutingKey: "q"}), 1, []byte{0, 0}, body, 131072)
	// 450 messages (5.3 MiB), then the first octets of the next frame: the burst never ends.
	const n = 450
	for range n {
		c.buf = append(c.buf, one...)
	}
	c.buf = append(c.buf, one[:5]...)
	c.flush(t)
	ch := openChannel(t, dial(t, url))
	// Once the reader waits for the unfinished frame, what it holds back is under 4 MiB:
	// at most perBatch messages. (Where a batch starts depends on when the reader found its
	// buffer empty on the way, which a loaded machine changes; what it may hold does not.)
	// Without the bound only the first frames, read while the buffer was too small for
	// them, would be ready (flushBeforeLongRead): at most growReadAfter.
	perBatch := maxRoutedBytes / (len(body) + 3) // a message's data: key "q", flags, body
	pollFor(t, "all but the last 4 MiB of the burst enqueued", func() bool { return queueReady(t, ch, "q") >= n-perBatch })
}

// A publisher confirm goes out only once its message is in the queue: the reader holds a
// burst's messages back until the burst ends, and the log's writer, which confirms a
// persistent message once it is written, must not confirm one still held back.
func TestConfirmWaitsForEnqueue(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	c := rawDial(t, b.url)
	c.writeMethod(1, &confirmSelect{})
	c.writeMethod(1, &queueDeclare{Queue: "q", Durable: true})
	c.flush(t)
	c.expect(t, idConfirmSelectOk)
	c.expect(t, idQueueDeclareOk)
	persistent := []byte{0x10, 0x00, 2} // property flags: delivery-mode; 2
	publish := func(b []byte) []byte {
		b = appendMethodFrame(b, 1, &basicPublish{RoutingKey: "q"})
		return appendContent(b, 1, persistent, []byte("body"), 131072)
	}
	second := publish(nil)
	// The first message whole, then five octets of the next frame: the reader waits in
	// the middle of the burst, with the first message logged and held back.
	c.buf = append(publish(c.buf), second[:5]...)
	c.flush(t)
	c.nc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if f, err := c.fr.read(); err == nil {
		id, _, _ := methodHeader(f.payload)
		t.Fatalf("%s before the message was enqueued", methodName(id))
	}
	c.nc.SetReadDeadline(time.Time{})
	c.buf = append(c.buf, second[5:]...)
	c.flush(t)
	for confirmed := uint64(0); confirmed < 2; {
		f, err := c.fr.read()
		if err != nil {
			t.Fatal(err)
		}
		id, d, err := methodHeader(f.payload)
		if err != nil || id != idBasicAck {
			t.Fatalf("got %s, want basic.ack", methodName(id))
		}
		m := basicAck{}
		m.decode(&d)
		confirmed = m.DeliveryTag
	}
	conn := dial(t, b.url)
	if q, err := openChannel(t, conn).QueueDeclarePassive("q", true, false, false, false, nil); err != nil || q.Messages != 2 {
		t.Fatalf("queue q: %+v, %v; want the 2 confirmed messages", q, err)
	}
}

// TestConfirmNeverBeforeEnqueueMixed: under mixed traffic on two confirm channels
// (persistent and transient, to a queue, through a fanout, to a reject-publish queue,
// unroutable with and without mandatory) with frames split at random points, so the
// reader often waits mid-burst with publishes held back, every basic.ack comes after the
// publishes it covers are in their queues, and no ack is repeated, skipped or missing.
func TestConfirmNeverBeforeEnqueueMixed(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	admin := openChannel(t, dial(t, b.url))
	if _, err := admin.QueueDeclare("q1", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.QueueDeclare("q2", true, false, false, false, amqp091.Table{"x-overflow": "reject-publish", "x-max-length": int32(1 << 30)}); err != nil {
		t.Fatal(err)
	}
	if err := admin.ExchangeDeclare("fx", "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"q1", "q2"} {
		if err := admin.QueueBind(q, "", "fx", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	q1, q2 := testQueue(b.srv, "q1"), testQueue(b.srv, "q2")

	c := rawDial(t, b.url)
	c.writeMethod(2, &channelOpen{})
	c.writeMethod(1, &confirmSelect{})
	c.writeMethod(2, &confirmSelect{})
	c.flush(t)
	c.expect(t, idChannelOpenOk)
	c.expect(t, idConfirmSelectOk)
	c.expect(t, idConfirmSelectOk)

	const n = 6000
	// per channel: cumulative count of messages routed to q1 / q2 up to each tag
	type plan struct{ toQ1, toQ2 []int }
	plans := [3]plan{{}, {[]int{0}, []int{0}}, {[]int{0}, []int{0}}}
	r := rand.New(rand.NewPCG(1, 2))
	var out []byte
	for range n {
		ch := uint16(1 + r.IntN(2))
		props := []byte{0, 0}
		if r.IntN(2) == 0 {
			props = []byte{0x10, 0x00, 2}
		}
		var a, bq int
		var m basicPublish
		switch r.IntN(5) {
		case 0:
			m = basicPublish{RoutingKey: "q1"}
			a = 1
		case 1:
			m = basicPublish{Exchange: "fx"}
			a, bq = 1, 1
		case 2:
			m = basicPublish{RoutingKey: "nowhere", Mandatory: true}
		case 3:
			m = basicPublish{RoutingKey: "q2"}
			bq = 1
		case 4:
			m = basicPublish{RoutingKey: "nowhere"}
		}
		p := &plans[ch]
		p.toQ1 = append(p.toQ1, p.toQ1[len(p.toQ1)-1]+a)
		p.toQ2 = append(p.toQ2, p.toQ2[len(p.toQ2)-1]+bq)
		out = appendMethodFrame(out, ch, &m)
		out = appendContent(out, ch, props, []byte("body"), 131072)
	}

	var mu sync.Mutex
	confirmed := [3]uint64{}
	errc := make(chan string, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for confirmed[1] < uint64(len(plans[1].toQ1)-1) || confirmed[2] < uint64(len(plans[2].toQ1)-1) {
			f, err := c.fr.read()
			if err != nil {
				errc <- err.Error()
				return
			}
			if f.typ != frameMethod {
				continue
			}
			id, d, _ := methodHeader(f.payload)
			switch id {
			case idBasicAck:
				var m basicAck
				m.decode(&d)
				mu.Lock()
				if m.DeliveryTag <= confirmed[f.channel] {
					errc <- "duplicate or backwards ack"
					mu.Unlock()
					return
				}
				if !m.Multiple && m.DeliveryTag != confirmed[f.channel]+1 {
					errc <- "single ack skipping tags"
					mu.Unlock()
					return
				}
				confirmed[f.channel] = m.DeliveryTag
				want1 := plans[1].toQ1[confirmed[1]] + plans[2].toQ1[confirmed[2]]
				want2 := plans[1].toQ2[confirmed[1]] + plans[2].toQ2[confirmed[2]]
				mu.Unlock()
				if got := q1.messageCount(); got < want1 {
					errc <- "q1 has fewer messages than confirmed"
					return
				}
				if got := q2.messageCount(); got < want2 {
					errc <- "q2 has fewer messages than confirmed"
					return
				}
			case idBasicNack:
				errc <- "nack"
				return
			case idBasicReturn:
			}
		}
	}()
	for len(out) > 0 {
		k := min(len(out), 1+r.IntN(3000))
		if _, err := c.nc.Write(out[:k]); err != nil {
			t.Fatal(err)
		}
		out = out[k:]
		if r.IntN(4) == 0 {
			time.Sleep(time.Duration(r.IntN(300)) * time.Microsecond)
		}
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		mu.Lock()
		t.Fatalf("hang: confirmed %v of %d/%d", confirmed, len(plans[1].toQ1)-1, len(plans[2].toQ1)-1)
	}
	select {
	case e := <-errc:
		t.Fatal(e)
	default:
	}
}
