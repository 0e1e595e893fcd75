package amqp

import (
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// replyServe consumes the request queue rpcQueue on its own connection and answers each
// request with "re:" and its body, to its reply_to and with its correlation id. It hands
// the requests it saw to seen when seen is not nil.
func replyServe(t *testing.T, url, rpcQueue string, seen chan<- amqp091.Delivery) {
	t.Helper()
	ch := openChannel(t, dial(t, url))
	declareTransientQueue(t, ch, rpcQueue)
	reqs, err := ch.Consume(rpcQueue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", rpcQueue, err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { close(done) })
	go func() {
		for d := range reqs {
			if seen != nil {
				select {
				case seen <- d:
				case <-done:
					return
				}
			}
			// Errors end the loop with the connection, when the test ends.
			ch.Publish("", d.ReplyTo, false, false, amqp091.Publishing{
				CorrelationId: d.CorrelationId,
				Body:          append([]byte("re:"), d.Body...),
			})
		}
	}()
}

// replyRequester returns a channel consuming amq.rabbitmq.reply-to, and its deliveries.
func replyRequester(t *testing.T, conn *amqp091.Connection) (*amqp091.Channel, <-chan amqp091.Delivery) {
	t.Helper()
	ch := openChannel(t, conn)
	replies, err := ch.Consume(replyToQueue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", replyToQueue, err)
	}
	return ch, replies
}

// replyRequest publishes body to queue on ch with reply_to amq.rabbitmq.reply-to.
func replyRequest(t *testing.T, ch *amqp091.Channel, queue, corrID, body string) {
	t.Helper()
	err := ch.Publish("", queue, false, false, amqp091.Publishing{
		ReplyTo: replyToQueue, CorrelationId: corrID, Body: []byte(body),
	})
	if err != nil {
		t.Fatalf("publish request %s: %v", corrID, err)
	}
}

// replyCloseError waits for the close of a channel and returns its error.
func replyCloseError(t *testing.T, c <-chan *amqp091.Error) *amqp091.Error {
	t.Helper()
	select {
	case e := <-c:
		if e == nil {
			t.Fatal("channel closed without an error")
		}
		return e
	case <-time.After(recvWait):
		t.Fatalf("channel not closed within %v", recvWait)
	}
	panic("unreachable")
}

// wantReplyError fails unless err is an AMQP exception with this code and text.
func wantReplyError(t *testing.T, err error, code int, text string) {
	t.Helper()
	e, ok := err.(*amqp091.Error)
	if !ok || e.Code != code || e.Reason != text {
		t.Fatalf("got %v, want %d %q", err, code, text)
	}
}

// replyExists reports what a passive declare of name on a fresh channel says: whether it
// exists, with its message and consumer counts.
func replyExists(t *testing.T, conn *amqp091.Connection, name string) (bool, amqp091.Queue) {
	t.Helper()
	var q amqp091.Queue
	err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
		var err error
		q, err = ch.QueueDeclarePassive(name, false, false, false, false, nil)
		return err
	})
	if err != nil {
		wantReplyError(t, err, 404, "NOT_FOUND - no queue '"+name+"' in vhost '/'")
		return false, q
	}
	return true, q
}

func TestReplyToRoundTrip(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	seen := make(chan amqp091.Delivery, 4)
	replyServe(t, url, "rpc", seen)
	ch, replies := replyRequester(t, dial(t, url))

	// Properties on both sides of reply_to come through the rewrite unchanged.
	req := amqp091.Publishing{
		ContentType: "text/plain", Headers: amqp091.Table{"k": "v"}, Priority: 3,
		CorrelationId: "c-1", ReplyTo: replyToQueue, Expiration: "60000", MessageId: "m-1",
		Type: "ping", AppId: "app", Body: []byte("ping"),
	}
	if err := ch.Publish("", "rpc", false, false, req); err != nil {
		t.Fatal(err)
	}
	got := takeDelivery(t, seen)
	name := got.ReplyTo
	if !strings.HasPrefix(name, replyToPrefix) || len(name) < len(replyToPrefix)+16 {
		t.Fatalf("reply_to %q, want %s<opaque>", name, replyToPrefix)
	}
	if got.ContentType != "text/plain" || got.Headers["k"] != "v" || got.Priority != 3 || got.CorrelationId != "c-1" ||
		got.Expiration != "60000" || got.MessageId != "m-1" || got.Type != "ping" || got.AppId != "app" || string(got.Body) != "ping" {
		t.Fatalf("request arrived as %+v", got)
	}

	d := takeDelivery(t, replies)
	if string(d.Body) != "re:ping" || d.CorrelationId != "c-1" {
		t.Fatalf("reply %q correlation %q, want re:ping c-1", d.Body, d.CorrelationId)
	}
	if d.Exchange != "" || d.RoutingKey != name || d.Redelivered || d.DeliveryTag == 0 {
		t.Fatalf("reply delivered with exchange %q key %q redelivered %v tag %d, want \"\" %q false >0",
			d.Exchange, d.RoutingKey, d.Redelivered, d.DeliveryTag, name)
	}

	// The same channel's next request carries the same name; another reply_to is untouched.
	replyRequest(t, ch, "rpc", "c-2", "again")
	if n := takeDelivery(t, seen).ReplyTo; n != name {
		t.Fatalf("second request's reply_to %q, want %q", n, name)
	}
	if d := takeDelivery(t, replies); string(d.Body) != "re:again" || d.CorrelationId != "c-2" {
		t.Fatalf("second reply %q %q", d.Body, d.CorrelationId)
	}
	if err := ch.Publish("", "rpc", false, false, amqp091.Publishing{ReplyTo: "amq.rabbitmq.reply-tox"}); err != nil {
		t.Fatal(err)
	}
	if n := takeDelivery(t, seen).ReplyTo; n != "amq.rabbitmq.reply-tox" {
		t.Fatalf("reply_to rewritten to %q", n)
	}
}

func TestReplyToConcurrentCalls(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	replyServe(t, url, "rpc", nil)
	replyServe(t, url, "rpc", nil) // two repliers share the requests
	const conns, calls = 10, 10
	var wg sync.WaitGroup
	errs := make(chan string, conns*calls)
	for c := range conns {
		ch, replies := replyRequester(t, dial(t, url))
		wg.Add(1)
		go func() {
			defer wg.Done()
			var pub sync.WaitGroup
			for i := range calls {
				pub.Add(1)
				go func() {
					defer pub.Done()
					id := strconv.Itoa(c) + "." + strconv.Itoa(i)
					err := ch.Publish("", "rpc", false, false, amqp091.Publishing{ReplyTo: replyToQueue, CorrelationId: id, Body: []byte("body" + id)})
					if err != nil {
						errs <- "publish " + id + ": " + err.Error()
					}
				}()
			}
			pub.Wait()
			want := make(map[string]bool)
			for i := range calls {
				want[strconv.Itoa(c)+"."+strconv.Itoa(i)] = true
			}
			for range calls {
				select {
				case d := <-replies:
					if !want[d.CorrelationId] || string(d.Body) != "re:body"+d.CorrelationId {
						errs <- "connection " + strconv.Itoa(c) + " got reply " + d.CorrelationId + " " + string(d.Body)
					}
					delete(want, d.CorrelationId)
				case <-time.After(recvWait):
					errs <- "connection " + strconv.Itoa(c) + ": " + strconv.Itoa(len(want)) + " replies missing"
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func TestReplyToErrors(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)

	t.Run("consume with acks", func(t *testing.T) {
		ch := openChannel(t, conn)
		_, err := ch.Consume(replyToQueue, "", false, false, false, false, nil)
		wantReplyError(t, err, 406, "PRECONDITION_FAILED - reply consumer cannot acknowledge")
	})
	t.Run("second reply consumer", func(t *testing.T) {
		ch, _ := replyRequester(t, conn)
		_, err := ch.Consume(replyToQueue, "", true, false, false, false, nil)
		wantReplyError(t, err, 406, "PRECONDITION_FAILED - reply consumer already set")
	})
	t.Run("second reply consumer with acks", func(t *testing.T) {
		ch, _ := replyRequester(t, conn)
		_, err := ch.Consume(replyToQueue, "", false, false, false, false, nil)
		wantReplyError(t, err, 406, "PRECONDITION_FAILED - reply consumer cannot acknowledge")
	})
	t.Run("request without reply consumer", func(t *testing.T) {
		ch := openChannel(t, conn)
		closed := notifyChannelClose(ch)
		replyRequest(t, ch, "nowhere", "c", "x")
		wantReplyError(t, replyCloseError(t, closed), 406, "PRECONDITION_FAILED - fast reply consumer does not exist")
	})
	t.Run("request after cancel", func(t *testing.T) {
		ch := openChannel(t, conn)
		if _, err := ch.Consume(replyToQueue, "rc", true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		if err := ch.Cancel("rc", false); err != nil {
			t.Fatal(err)
		}
		closed := notifyChannelClose(ch)
		replyRequest(t, ch, "nowhere", "c", "x")
		wantReplyError(t, replyCloseError(t, closed), 406, "PRECONDITION_FAILED - fast reply consumer does not exist")
	})
	t.Run("request from another channel", func(t *testing.T) {
		replyRequester(t, conn)
		ch := openChannel(t, conn)
		closed := notifyChannelClose(ch)
		replyRequest(t, ch, "nowhere", "c", "x")
		wantReplyError(t, replyCloseError(t, closed), 406, "PRECONDITION_FAILED - fast reply consumer does not exist")
	})
	t.Run("declare the pseudo-queue", func(t *testing.T) {
		// It always exists, passive or not, with one consumer: no 403 for amq.*.
		ok, q := replyExists(t, conn, replyToQueue)
		if !ok || q.Name != replyToQueue || q.Messages != 0 || q.Consumers != 1 {
			t.Fatalf("passive declare: %v %+v, want ok with 0 messages and 1 consumer", ok, q)
		}
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			q, err := ch.QueueDeclare(replyToQueue, true, false, true, false, nil)
			if err == nil && (q.Name != replyToQueue || q.Consumers != 1) {
				t.Errorf("declare: %+v", q)
			}
			return err
		})
		if err != nil {
			t.Fatalf("declare %s: %v", replyToQueue, err)
		}
	})
	t.Run("declare unknown names", func(t *testing.T) {
		for _, name := range []string{replyToPrefix + "AAAAAAAAAAAAAAAAAAAAAA", replyToQueue + "x"} {
			if ok, _ := replyExists(t, conn, name); ok {
				t.Fatalf("passive declare of %s succeeded", name)
			}
			err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
				_, err := ch.QueueDeclare(name, false, false, false, false, nil)
				return err
			})
			wantReplyError(t, err, 404, "NOT_FOUND - no queue '"+name+"' in vhost '/'")
		}
	})
	t.Run("consume or get a reply name", func(t *testing.T) {
		rch, _ := replyRequester(t, conn)
		seen := make(chan amqp091.Delivery, 1)
		replyServe(t, url, "rpc-get", seen)
		replyRequest(t, rch, "rpc-get", "c", "x")
		name := takeDelivery(t, seen).ReplyTo
		err := onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			_, err := ch.Consume(name, "", true, false, false, false, nil)
			return err
		})
		wantReplyError(t, err, 404, "NOT_FOUND - no queue '"+name+"' in vhost '/'")
		err = onFreshChannel(t, conn, func(ch *amqp091.Channel) error {
			_, _, err := ch.Get(replyToQueue, true)
			return err
		})
		wantReplyError(t, err, 404, "NOT_FOUND - no queue '"+replyToQueue+"' in vhost '/'")
	})
}

func TestReplyToGoneRequester(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	server := openChannel(t, conn)
	declareTransientQueue(t, server, "rpc")
	declareTransientQueue(t, server, "after")
	if err := server.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := server.NotifyPublish(make(chan amqp091.Confirmation, 16))
	returns := server.NotifyReturn(make(chan amqp091.Return, 16))
	confirmed := func() {
		t.Helper()
		select {
		case c := <-confirms:
			if !c.Ack {
				t.Fatalf("publish %d nacked", c.DeliveryTag)
			}
		case <-time.After(recvWait):
			t.Fatal("no confirm")
		}
	}
	returned := func(name string) {
		t.Helper()
		select {
		case r := <-returns:
			if r.ReplyCode != 312 || r.ReplyText != "NO_ROUTE" || r.Exchange != "" || r.RoutingKey != name {
				t.Fatalf("return %d %q %q %q, want 312 NO_ROUTE to %q", r.ReplyCode, r.ReplyText, r.Exchange, r.RoutingKey, name)
			}
		case <-time.After(recvWait):
			t.Fatal("no basic.return")
		}
	}
	reply := func(name string, mandatory bool, body string) {
		t.Helper()
		if err := server.Publish("", name, mandatory, false, amqp091.Publishing{Body: []byte(body)}); err != nil {
			t.Fatal(err)
		}
	}

	reqConn := dial(t, url)
	req, replies := replyRequester(t, reqConn)
	replyRequest(t, req, "rpc", "c", "x")
	var name string
	pollFor(t, "the request", func() bool {
		d, ok, err := server.Get("rpc", true)
		if err != nil {
			t.Fatal(err)
		}
		name = d.ReplyTo
		return ok
	})

	// Live requester: a reply is confirmed, and with mandatory it is delivered and also
	// returned, since RabbitMQ counts no queue as routed to.
	reply(name, false, "one")
	confirmed()
	if d := takeDelivery(t, replies); string(d.Body) != "one" {
		t.Fatalf("reply %q", d.Body)
	}
	reply(name, true, "two")
	returned(name)
	confirmed()
	if d := takeDelivery(t, replies); string(d.Body) != "two" {
		t.Fatalf("mandatory reply %q", d.Body)
	}

	// Gone requester: the reply is dropped, confirmed, returned when mandatory, and the
	// replier's channel goes on.
	if err := reqConn.Close(); err != nil {
		t.Fatal(err)
	}
	pollFor(t, "the reply consumer to go", func() bool { ok, _ := replyExists(t, conn, name); return !ok })
	reply(name, false, "three")
	confirmed()
	reply(name, true, "four")
	returned(name)
	confirmed()
	reply("after", false, "five")
	confirmed()
	if got := drainText(t, server, "after"); len(got) != 1 || got[0] != "five" {
		t.Fatalf("replier's channel after dropped replies: %q", got)
	}
}

func TestReplyToDeclareTracksRequester(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	seen := make(chan amqp091.Delivery, 8)
	replyServe(t, url, "rpc", seen)
	requesterName := func(ch *amqp091.Channel) string {
		replyRequest(t, ch, "rpc", "c", "x")
		return takeDelivery(t, seen).ReplyTo
	}
	exists := func(name string) bool {
		ok, q := replyExists(t, conn, name)
		if ok && (q.Name != name || q.Messages != 0 || q.Consumers != 1) {
			t.Fatalf("declare-ok %+v, want %s with 0 messages and 1 consumer", q, name)
		}
		return ok
	}

	// basic.cancel ends the consumer: its name is gone.
	ch := openChannel(t, dial(t, url))
	replies, err := ch.Consume(replyToQueue, "rc", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	name := requesterName(ch)
	if !exists(name) {
		t.Fatal("reply name does not exist while its consumer does")
	}
	takeDelivery(t, replies) // the replier's answer
	if err := ch.Cancel("rc", false); err != nil {
		t.Fatal(err)
	}
	if exists(name) {
		t.Fatal("reply name exists after basic.cancel")
	}
	// A new reply consumer on the channel has a new name; the old one's replies are dropped.
	replies2, err := ch.Consume(replyToQueue, "rc2", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	name2 := requesterName(ch)
	if name2 == name || !exists(name2) {
		t.Fatalf("second consumer's name %q (first %q)", name2, name)
	}
	if d := takeDelivery(t, replies2); d.RoutingKey != name2 || d.ConsumerTag != "rc2" {
		t.Fatalf("reply to %q for %q, want %q for rc2", d.RoutingKey, d.ConsumerTag, name2)
	}
	publishText(t, openChannel(t, conn), "", name, "stale")
	publishText(t, openChannel(t, conn), "", name2, "fresh")
	if d := takeDelivery(t, replies2); string(d.Body) != "fresh" {
		t.Fatalf("reply %q, want fresh (stale is for the cancelled consumer)", d.Body)
	}

	// channel.close ends it.
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	if exists(name2) {
		t.Fatal("reply name exists after channel.close")
	}

	// So does a channel exception, and the connection's end.
	reqConn := dial(t, url)
	ch3, _ := replyRequester(t, reqConn)
	name3 := requesterName(ch3)
	closed := notifyChannelClose(ch3)
	if _, err := ch3.QueueDeclarePassive("no-such-queue", false, false, false, false, nil); amqpCode(err) != 404 {
		t.Fatalf("passive declare: %v", err)
	}
	replyCloseError(t, closed)
	if exists(name3) {
		t.Fatal("reply name exists after a channel exception")
	}
	ch4, _ := replyRequester(t, reqConn)
	name4 := requesterName(ch4)
	if !exists(name4) {
		t.Fatal("reply name does not exist")
	}
	reqConn.Close()
	pollFor(t, "the connection's reply consumer to go", func() bool { return !exists(name4) })
}

func TestReplyToTransaction(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	server := openChannel(t, conn)
	declareTransientQueue(t, server, "rpc")
	req, replies := replyRequester(t, conn)
	replyRequest(t, req, "rpc", "c", "x")
	d, ok, err := server.Get("rpc", true)
	if err != nil || !ok {
		t.Fatalf("get request: %v %v", ok, err)
	}
	// A reply in a transaction goes out at tx.commit, like any publish.
	if err := server.Tx(); err != nil {
		t.Fatal(err)
	}
	publishText(t, server, "", d.ReplyTo, "in tx")
	expectNoDelivery(t, replies)
	if err := server.TxCommit(); err != nil {
		t.Fatal(err)
	}
	if d := takeDelivery(t, replies); string(d.Body) != "in tx" {
		t.Fatalf("reply %q", d.Body)
	}
	// A reply to oneself, on the requester's own channel, works too.
	replyRequest(t, req, "rpc", "c2", "y")
	d, ok, err = server.Get("rpc", true)
	if err != nil || !ok {
		t.Fatalf("get request: %v %v", ok, err)
	}
	publishText(t, req, "", d.ReplyTo, "to self")
	if d := takeDelivery(t, replies); string(d.Body) != "to self" {
		t.Fatalf("reply %q", d.Body)
	}
}
