package amqp

import (
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Security end to end: users, virtual hosts and permissions from a definitions file,
// SASL mechanisms, loopback-only users, TLS client certificates, Reload, and the
// connection, channel, frame, queue and message limits. Every server listens on
// 127.0.0.1; secRemoteListener makes clients look remote without leaving the machine.

// Raw clients, for what amqp091-go hides: exact close codes and texts during the
// handshake, the mechanism list, unusual mechanisms.

// secAnonymous is SASL ANONYMOUS for amqp091-go, which has no such mechanism built in.
type secAnonymous struct{}

func (secAnonymous) Mechanism() string { return "ANONYMOUS" }
func (secAnonymous) Response() string  { return "" }

// TestSecurityDefinitionsLogin logs in with users and virtual hosts from a definitions
// file built with the Definitions API, and checks every refusal with its exact close.
func TestSecurityDefinitionsLogin(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(
			d.AddUser("dora", "D0ra pass: with spaces & ünïcode"),
			d.AddUser("nopw", ""),
			d.AddVhost("dora-vh"),
			d.AddVhost("empty-vh"),
			d.SetPermissions("dora", "dora-vh", ".*", ".*", ".*"),
			d.SetPermissions("nopw", "/", ".*", ".*", ".*"),
		)
	})
	const pass = "D0ra pass: with spaces & ünïcode"
	srv := secServe(t, Config{Definitions: path}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")

	t.Run("new user logs in", func(t *testing.T) {
		c := secConnect(t, addr, "dora", pass, "dora-vh")
		secRoundTrip(t, c, "dora-q")
		w := wireConnect(t, addr, wireOpts{mechanism: "AMQPLAIN", response: wireAMQPlain("dora", pass), vhost: "dora-vh"})
		w.openChannel(1)
		w.sendMethod(1, &queueDeclare{Queue: "dora-amqplain", Exclusive: true})
		wireExpect[*queueDeclareOk](w, 1)
	})
	t.Run("wrong password", func(t *testing.T) {
		secDialRefused(t, addr, "dora", "d0ra", "dora-vh", amqp091.ErrCredentials)
		w := wireHandshake(t, addr, wireOpts{response: "\x00dora\x00d0ra", vhost: "dora-vh"}, 1)
		secRefusedClose(w, replyAccessRefused, secLoginRefused("PLAIN"), 10, 11)
		w = wireHandshake(t, addr, wireOpts{mechanism: "AMQPLAIN", response: wireAMQPlain("dora", pass+" "), vhost: "dora-vh"}, 1)
		secRefusedClose(w, replyAccessRefused, secLoginRefused("AMQPLAIN"), 10, 11)
		// Without authentication_failure_close the socket is just closed, as in RabbitMQ.
		w = wireHandshake(t, addr, wireOpts{response: "\x00dora\x00d0ra", noAuthFailureClose: true}, 1)
		w.expectClosed(secWait)
	})
	t.Run("blank or no password", func(t *testing.T) {
		secDialRefused(t, addr, "dora", "", "dora-vh", amqp091.ErrCredentials)
		secDialRefused(t, addr, "nopw", "", "/", amqp091.ErrCredentials)
		w := wireHandshake(t, addr, wireOpts{response: "\x00nopw\x00anything"}, 1)
		secRefusedClose(w, replyAccessRefused, secLoginRefused("PLAIN"), 10, 11)
	})
	t.Run("unknown user", func(t *testing.T) {
		secDialRefused(t, addr, "nobody", pass, "/", amqp091.ErrCredentials)
		// The same text as a wrong password: refusals do not tell which users exist.
		w := wireHandshake(t, addr, wireOpts{response: "\x00nobody\x00" + pass}, 1)
		secRefusedClose(w, replyAccessRefused, secLoginRefused("PLAIN"), 10, 11)
	})
	t.Run("unknown vhost", func(t *testing.T) {
		secDialRefused(t, addr, "dora", pass, "nope", amqp091.ErrVhost)
		w := wireHandshake(t, addr, wireOpts{response: "\x00dora\x00" + pass, vhost: "nope"}, 3)
		secRefusedClose(w, replyNotAllowed, "NOT_ALLOWED - vhost nope not found", 10, 40)
	})
	t.Run("vhost without permissions", func(t *testing.T) {
		secDialRefused(t, addr, "dora", pass, "empty-vh", amqp091.ErrVhost)
		secDialRefused(t, addr, "dora", pass, "/", amqp091.ErrVhost)
		secDialRefused(t, addr, "guest", "guest", "dora-vh", amqp091.ErrVhost)
		w := wireHandshake(t, addr, wireOpts{response: "\x00dora\x00" + pass, vhost: "empty-vh"}, 3)
		secRefusedClose(w, replyNotAllowed, "NOT_ALLOWED - access to vhost 'empty-vh' refused for user 'dora'", 10, 40)
		w = wireHandshake(t, addr, wireOpts{vhost: "dora-vh"}, 3)
		secRefusedClose(w, replyNotAllowed, "NOT_ALLOWED - access to vhost 'dora-vh' refused for user 'guest'", 10, 40)
	})
	wireCheckClient(t, other)
}

// TestPermissionRabbitMQExport logs in as alice, exported from RabbitMQ 3.10 with her
// password hash, through the broker, and checks that her permissions apply exactly:
// configure '^alice-.*', write '.*', read '^(alice-.*|amq\.default)$' on "/".
func TestPermissionRabbitMQExport(t *testing.T) {
	t.Parallel()
	srv := secServe(t, Config{Definitions: filepath.Join("testdata", "definitions", "rabbitmq-export.json")}, false)
	addr := srv.Addr().String()
	secDialRefused(t, addr, "alice", "s3cret-alice", "/", amqp091.ErrCredentials)
	alice := secConnect(t, addr, "alice", "s3cret-Alice", "/")
	admin := openChannel(t, secConnect(t, addr, "guest", "guest", "/"))
	if _, err := admin.QueueDeclare("bob-q", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, admin, "", "bob-q", "for bob")
	deny := func(kind, name string) string { return secDenied(kind, name, "/", "alice") }
	try := func(op func(ch *amqp091.Channel) error) *amqp091.Error { return secTry(t, alice, op) }

	// configure '^alice-.*'
	secAllowed(t, "declare alice-q", try(func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclare("alice-q", false, false, false, false, nil)
		return err
	}))
	secAllowed(t, "declare exchange alice-x", try(func(ch *amqp091.Channel) error {
		return ch.ExchangeDeclare("alice-x", "direct", false, false, false, false, nil)
	}))
	secRefused(t, "declare bob-q2", try(func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclare("bob-q2", false, false, false, false, nil)
		return err
	}), 403, deny("queue", "bob-q2"))
	secRefused(t, "declare a server-named queue", try(func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclare("", false, false, true, false, nil)
		return err
	}), 403, "ACCESS_REFUSED - access to queue 'amq.gen-*")
	secRefused(t, "declare exchange bob-x", try(func(ch *amqp091.Channel) error {
		return ch.ExchangeDeclare("bob-x", "direct", false, false, false, false, nil)
	}), 403, deny("exchange", "bob-x"))
	secRefused(t, "delete bob-q", try(func(ch *amqp091.Channel) error {
		_, err := ch.QueueDelete("bob-q", false, false, false)
		return err
	}), 403, deny("queue", "bob-q"))

	// write '.*': any exchange, the default one included; binding to any queue.
	secAllowed(t, "publish to the default exchange", try(func(ch *amqp091.Channel) error {
		return ch.Publish("", "alice-q", false, false, amqp091.Publishing{Body: []byte("for alice")})
	}))
	secAllowed(t, "publish to bob-q through the default exchange", try(func(ch *amqp091.Channel) error {
		return ch.Publish("", "bob-q", false, false, amqp091.Publishing{Body: []byte("from alice")})
	}))
	secAllowed(t, "publish to amq.fanout", try(func(ch *amqp091.Channel) error {
		return ch.Publish("amq.fanout", "", false, false, amqp091.Publishing{Body: []byte("fanout")})
	}))
	secAllowed(t, "bind alice-q to alice-x", try(func(ch *amqp091.Channel) error {
		return ch.QueueBind("alice-q", "k", "alice-x", false, nil)
	}))
	secAllowed(t, "bind amq.direct to alice-x", try(func(ch *amqp091.Channel) error {
		return ch.ExchangeBind("amq.direct", "k", "alice-x", false, nil)
	}))

	// read '^(alice-.*|amq\.default)$'
	secRefused(t, "bind alice-q to amq.direct", try(func(ch *amqp091.Channel) error {
		return ch.QueueBind("alice-q", "k", "amq.direct", false, nil)
	}), 403, deny("exchange", "amq.direct"))
	secRefused(t, "bind alice-x to amq.fanout", try(func(ch *amqp091.Channel) error {
		return ch.ExchangeBind("alice-x", "k", "amq.fanout", false, nil)
	}), 403, deny("exchange", "amq.fanout"))
	secRefused(t, "get bob-q", try(func(ch *amqp091.Channel) error {
		_, _, err := ch.Get("bob-q", true)
		return err
	}), 403, deny("queue", "bob-q"))
	secRefused(t, "consume bob-q", try(func(ch *amqp091.Channel) error {
		_, err := ch.Consume("bob-q", "", true, false, false, false, nil)
		return err
	}), 403, deny("queue", "bob-q"))
	secRefused(t, "purge bob-q", try(func(ch *amqp091.Channel) error {
		_, err := ch.QueuePurge("bob-q", false)
		return err
	}), 403, deny("queue", "bob-q"))
	secAllowed(t, "consume alice-q", try(func(ch *amqp091.Channel) error {
		_, err := ch.Consume("alice-q", "", false, false, false, false, nil)
		return err
	}))
	ch := openChannel(t, alice)
	if d, ok, err := ch.Get("alice-q", true); err != nil || !ok || string(d.Body) != "for alice" {
		t.Errorf("alice gets alice-q: %q, %v, %v; want %q", d.Body, ok, err, "for alice")
	}
	if _, err := ch.QueueDelete("alice-q", false, false, false); err != nil {
		t.Errorf("alice deletes alice-q: %v", err)
	}
	if n := queueReady(t, admin, "bob-q"); n != 2 {
		t.Errorf("bob-q holds %d messages, want 2: guest's and alice's", n)
	}
}

// TestPermissionPaths checks every operation RabbitMQ checks a permission for, allowed and
// refused, with the resource it checks. User pat has configure, write and read on names
// "p-<letters>-..." whose letters include c, w and r respectively, configure on
// server-named queues and write on the default exchange.
func TestPermissionPaths(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddUser("pat", "pat-pw"), d.SetPermissions("pat", "/",
			`^p-[a-z]*c[a-z]*-|^amq\.gen-`, `^p-[a-z]*w[a-z]*-|^amq\.default$`, `^p-[a-z]*r[a-z]*-`))
	})
	srv := secServe(t, Config{Definitions: path}, false)
	addr := srv.Addr().String()
	adminConn := secConnect(t, addr, "guest", "guest", "/")
	admin := openChannel(t, adminConn)
	for _, x := range []string{"p-n-x", "p-c-x", "p-r-x", "p-w-x", "p-rw-x", "p-c-gone"} {
		if err := admin.ExchangeDeclare(x, "direct", false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, q := range []string{"p-n-q", "p-c-q", "p-r-q", "p-w-q", "p-rw-q", "p-c-gone"} {
		if _, err := admin.QueueDeclare(q, false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Bindings pat will fail to remove, with keys of their own so that routing checks
	// below are not confused by them.
	for _, b := range [][3]string{{"p-r-q", "qg", "p-rw-x"}, {"p-w-q", "qg", "p-w-x"}, {"p-n-q", "xg", "p-r-x"}} {
		if err := admin.QueueBind(b[0], b[1], b[2], false, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range [][3]string{{"p-r-x", "xg", "p-rw-x"}, {"p-rw-x", "xg", "p-w-x"}} {
		if err := admin.ExchangeBind(b[0], b[1], b[2], false, nil); err != nil {
			t.Fatal(err)
		}
	}
	publishText(t, admin, "", "p-r-q", "to purge")
	publishText(t, admin, "", "p-w-q", "to keep")

	pat := secConnect(t, addr, "pat", "pat-pw", "/")
	q := func(name string) string { return secDenied("queue", name, "/", "pat") }
	x := func(name string) string { return secDenied("exchange", name, "/", "pat") }
	type op = func(ch *amqp091.Channel) error
	declareX := func(name string) op {
		return func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare(name, "direct", false, false, false, false, nil)
		}
	}
	deleteX := func(name string) op {
		return func(ch *amqp091.Channel) error { return ch.ExchangeDelete(name, false, false) }
	}
	declareQ := func(name string) op {
		return func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(name, false, false, false, false, nil)
			return err
		}
	}
	deleteQ := func(name string) op {
		return func(ch *amqp091.Channel) error {
			_, err := ch.QueueDelete(name, false, false, false)
			return err
		}
	}
	purge := func(name string) op {
		return func(ch *amqp091.Channel) error {
			_, err := ch.QueuePurge(name, false)
			return err
		}
	}
	bindQ := func(queue, key, exchange string) op {
		return func(ch *amqp091.Channel) error { return ch.QueueBind(queue, key, exchange, false, nil) }
	}
	unbindQ := func(queue, key, exchange string) op {
		return func(ch *amqp091.Channel) error { return ch.QueueUnbind(queue, key, exchange, nil) }
	}
	bindX := func(dst, key, src string) op {
		return func(ch *amqp091.Channel) error { return ch.ExchangeBind(dst, key, src, false, nil) }
	}
	unbindX := func(dst, key, src string) op {
		return func(ch *amqp091.Channel) error { return ch.ExchangeUnbind(dst, key, src, false, nil) }
	}
	publish := func(exchange, key string) op {
		return func(ch *amqp091.Channel) error {
			return ch.Publish(exchange, key, false, false, amqp091.Publishing{Body: []byte("from pat")})
		}
	}
	consume := func(queue string) op {
		return func(ch *amqp091.Channel) error {
			_, err := ch.Consume(queue, "", false, false, false, false, nil)
			return err
		}
	}
	get := func(queue string) op {
		return func(ch *amqp091.Channel) error {
			_, _, err := ch.Get(queue, true)
			return err
		}
	}
	passiveQ := func(name string) op {
		return func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclarePassive(name, false, false, false, false, nil)
			return err
		}
	}
	passiveX := func(name string) op {
		return func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclarePassive(name, "direct", false, false, false, false, nil)
		}
	}

	// In order: later cases rely on what earlier ones did or failed to do.
	for _, tc := range []struct {
		what string
		op   op
		code int // 0: allowed
		text string
	}{
		// exchange.declare and exchange.delete: configure on the exchange.
		{"exchange.declare p-c-new", declareX("p-c-new"), 0, ""},
		{"exchange.declare existing p-c-x", declareX("p-c-x"), 0, ""},
		{"exchange.declare p-rw-new", declareX("p-rw-new"), 403, x("p-rw-new")},
		{"exchange.declare existing p-rw-x", declareX("p-rw-x"), 403, x("p-rw-x")},
		{"exchange.declare amq.direct", declareX("amq.direct"), 403, x("amq.direct")},
		{"exchange.delete p-c-gone", deleteX("p-c-gone"), 0, ""},
		{"exchange.delete p-rw-x", deleteX("p-rw-x"), 403, x("p-rw-x")},
		{"exchange.delete missing p-c-nope", deleteX("p-c-nope"), 0, ""},
		{"exchange.delete missing p-n-nope", deleteX("p-n-nope"), 403, x("p-n-nope")},

		// queue.declare and queue.delete: configure on the queue, server-named ones too.
		{"queue.declare p-c-new", declareQ("p-c-new"), 0, ""},
		{"queue.declare existing p-c-q", declareQ("p-c-q"), 0, ""},
		{"queue.declare server-named", declareQ(""), 0, ""},
		{"queue.declare p-rw-new", declareQ("p-rw-new"), 403, q("p-rw-new")},
		{"queue.declare existing p-rw-q", declareQ("p-rw-q"), 403, q("p-rw-q")},
		{"queue.delete p-c-gone", deleteQ("p-c-gone"), 0, ""},
		{"queue.delete p-rw-q", deleteQ("p-rw-q"), 403, q("p-rw-q")},
		{"queue.delete missing p-c-nope", deleteQ("p-c-nope"), 0, ""},
		{"queue.delete missing p-n-nope", deleteQ("p-n-nope"), 403, q("p-n-nope")},

		// queue.purge: read on the queue, checked before the queue's existence.
		{"queue.purge p-r-q", purge("p-r-q"), 0, ""},
		{"queue.purge p-w-q", purge("p-w-q"), 403, q("p-w-q")},
		{"queue.purge p-c-q", purge("p-c-q"), 403, q("p-c-q")},
		{"queue.purge missing p-n-nope", purge("p-n-nope"), 403, q("p-n-nope")},
		{"queue.purge missing p-r-nope", purge("p-r-nope"), 404, "NOT_FOUND - no queue 'p-r-nope' in vhost '/'"},

		// queue.bind and queue.unbind: write on the queue, read on the exchange.
		{"queue.bind p-w-q to p-r-x", bindQ("p-w-q", "k", "p-r-x"), 0, ""},
		{"queue.bind p-rw-q to p-rw-x", bindQ("p-rw-q", "k", "p-rw-x"), 0, ""},
		{"queue.bind p-r-q (no write) to p-r-x", bindQ("p-r-q", "k", "p-r-x"), 403, q("p-r-q")},
		{"queue.bind p-c-q (no write) to p-w-x (no read)", bindQ("p-c-q", "k", "p-w-x"), 403, q("p-c-q")},
		{"queue.bind p-w-q to p-w-x (no read)", bindQ("p-w-q", "k", "p-w-x"), 403, x("p-w-x")},
		{"queue.bind missing p-n-nope", bindQ("p-n-nope", "k", "p-r-x"), 403, q("p-n-nope")},
		{"queue.unbind p-w-q from p-r-x", unbindQ("p-w-q", "k", "p-r-x"), 0, ""},
		{"queue.unbind p-r-q (no write) from p-rw-x", unbindQ("p-r-q", "qg", "p-rw-x"), 403, q("p-r-q")},
		{"queue.unbind p-w-q from p-w-x (no read)", unbindQ("p-w-q", "qg", "p-w-x"), 403, x("p-w-x")},

		// exchange.bind and exchange.unbind: write on the destination, read on the source.
		{"exchange.bind p-w-x <- p-r-x", bindX("p-w-x", "e", "p-r-x"), 0, ""},
		{"exchange.bind p-r-x (no write) <- p-rw-x", bindX("p-r-x", "e", "p-rw-x"), 403, x("p-r-x")},
		{"exchange.bind p-rw-x <- p-w-x (no read)", bindX("p-rw-x", "e", "p-w-x"), 403, x("p-w-x")},
		{"exchange.unbind p-w-x <- p-r-x", unbindX("p-w-x", "e", "p-r-x"), 0, ""},
		{"exchange.unbind p-r-x (no write) <- p-rw-x", unbindX("p-r-x", "xg", "p-rw-x"), 403, x("p-r-x")},
		{"exchange.unbind p-rw-x <- p-w-x (no read)", unbindX("p-rw-x", "xg", "p-w-x"), 403, x("p-w-x")},

		// basic.publish: write on the exchange; the default exchange is amq.default.
		{"basic.publish to p-w-x", publish("p-w-x", "qg"), 0, ""},
		{"basic.publish to the default exchange", publish("", "p-rw-q"), 0, ""},
		{"basic.publish to p-r-x", publish("p-r-x", "k"), 403, x("p-r-x")},
		{"basic.publish to amq.direct", publish("amq.direct", "k"), 403, x("amq.direct")},
		{"basic.publish to missing p-w-nope", publish("p-w-nope", "k"), 404, "NOT_FOUND - no exchange 'p-w-nope' in vhost '/'"},

		// basic.consume and basic.get: read on the queue.
		{"basic.consume p-r-q", consume("p-r-q"), 0, ""},
		{"basic.consume p-w-q", consume("p-w-q"), 403, q("p-w-q")},
		{"basic.consume missing p-n-nope", consume("p-n-nope"), 403, q("p-n-nope")},
		{"basic.get p-rw-q", get("p-rw-q"), 0, ""},
		{"basic.get p-w-q", get("p-w-q"), 403, q("p-w-q")},
		{"basic.get p-c-q", get("p-c-q"), 403, q("p-c-q")},

		// Passive declares need no permission.
		{"passive queue.declare p-n-q", passiveQ("p-n-q"), 0, ""},
		{"passive exchange.declare p-n-x", passiveX("p-n-x"), 0, ""},
		{"passive exchange.declare amq.topic", passiveX("amq.topic"), 0, ""},
		{"passive queue.declare missing", passiveQ("p-n-nope"), 404, "NOT_FOUND - no queue 'p-n-nope' in vhost '/'"},
		{"passive exchange.declare missing", passiveX("p-n-nope"), 404, "NOT_FOUND - no exchange 'p-n-nope' in vhost '/'"},
	} {
		e := secTry(t, pat, tc.op)
		if tc.code == 0 {
			secAllowed(t, tc.what, e)
		} else {
			secRefused(t, tc.what, e, tc.code, tc.text)
		}
	}

	// What was allowed happened; what was refused did not.
	exists := func(kind, name string) bool {
		e := secTry(t, adminConn, func(ch *amqp091.Channel) error {
			if kind == "queue" {
				return passiveQ(name)(ch)
			}
			return passiveX(name)(ch)
		})
		if e != nil && e.Code != 404 {
			t.Fatalf("passive declare of %s %s: %v", kind, name, e)
		}
		return e == nil
	}
	for _, c := range []struct {
		kind, name string
		want       bool
	}{
		{"exchange", "p-c-new", true}, {"exchange", "p-rw-new", false}, {"exchange", "p-c-gone", false},
		{"exchange", "p-rw-x", true}, {"queue", "p-c-new", true}, {"queue", "p-rw-new", false},
		{"queue", "p-c-gone", false}, {"queue", "p-rw-q", true},
	} {
		if got := exists(c.kind, c.name); got != c.want {
			t.Errorf("%s %s exists: %v, want %v", c.kind, c.name, got, c.want)
		}
	}
	publishText(t, admin, "p-rw-x", "qg", "through a binding pat could not remove")
	publishText(t, admin, "p-rw-x", "k", "through pat's binding")
	publishText(t, admin, "p-w-x", "xg", "through exchange bindings pat could not remove")
	for queue, want := range map[string]int{
		"p-r-q":  1, // purged by pat, then one through guest's binding
		"p-w-q":  2, // guest's message, which pat could not purge, and pat's publish
		"p-rw-q": 1, // pat's publish through the default exchange was got; one through pat's binding
		"p-n-q":  1, // through p-w-x -> p-rw-x -> p-r-x -> p-n-q
	} {
		if n := queueReady(t, admin, queue); n != want {
			t.Errorf("%s holds %d messages, want %d", queue, n, want)
		}
	}

	t.Run("publish to a missing exchange without write permission", func(t *testing.T) {
		secRefused(t, "basic.publish to missing p-r-nope", secTry(t, pat, publish("p-r-nope", "k")), 403, x("p-r-nope"))
	})
	t.Run("bind a missing queue to an exchange without read permission", func(t *testing.T) {
		secRefused(t, "queue.bind missing p-w-nope to p-w-x", secTry(t, pat, bindQ("p-w-nope", "k", "p-w-x")), 403, x("p-w-x"))
	})
}

// TestPermissionEmptyRegexp checks that "" grants nothing: the user may open the vhost but
// every checked operation is refused; passive declares still work.
func TestPermissionEmptyRegexp(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddUser("empty", "empty-pw"), d.SetPermissions("empty", "/", "", "", ""))
	})
	srv := secServe(t, Config{Definitions: path}, false)
	addr := srv.Addr().String()
	admin := openChannel(t, secConnect(t, addr, "guest", "guest", "/"))
	if _, err := admin.QueueDeclare("e-q", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := admin.ExchangeDeclare("e-x", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, admin, "", "e-q", "kept")
	c := secConnect(t, addr, "empty", "empty-pw", "/")
	q := func(name string) string { return secDenied("queue", name, "/", "empty") }
	x := func(name string) string { return secDenied("exchange", name, "/", "empty") }
	for _, tc := range []struct {
		what string
		op   func(ch *amqp091.Channel) error
		text string // "": allowed
	}{
		{"queue.declare", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("e-q2", false, false, false, false, nil)
			return err
		}, q("e-q2")},
		{"queue.declare server-named", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("", false, true, true, false, nil)
			return err
		}, "ACCESS_REFUSED - access to queue 'amq.gen-*"},
		{"exchange.declare", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("e-x2", "fanout", false, false, false, false, nil)
		}, x("e-x2")},
		{"queue.delete", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDelete("e-q", false, false, false)
			return err
		}, q("e-q")},
		{"exchange.delete", func(ch *amqp091.Channel) error { return ch.ExchangeDelete("e-x", false, false) }, x("e-x")},
		{"queue.purge", func(ch *amqp091.Channel) error {
			_, err := ch.QueuePurge("e-q", false)
			return err
		}, q("e-q")},
		{"queue.bind", func(ch *amqp091.Channel) error { return ch.QueueBind("e-q", "", "e-x", false, nil) }, q("e-q")},
		{"exchange.bind", func(ch *amqp091.Channel) error { return ch.ExchangeBind("e-x", "", "amq.fanout", false, nil) }, x("e-x")},
		{"basic.publish to the default exchange", func(ch *amqp091.Channel) error {
			return ch.Publish("", "e-q", false, false, amqp091.Publishing{Body: []byte("no")})
		}, x("amq.default")},
		{"basic.publish", func(ch *amqp091.Channel) error {
			return ch.Publish("e-x", "", false, false, amqp091.Publishing{Body: []byte("no")})
		}, x("e-x")},
		{"basic.consume", func(ch *amqp091.Channel) error {
			_, err := ch.Consume("e-q", "", true, false, false, false, nil)
			return err
		}, q("e-q")},
		{"basic.get", func(ch *amqp091.Channel) error {
			_, _, err := ch.Get("e-q", true)
			return err
		}, q("e-q")},
		{"passive queue.declare", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclarePassive("e-q", false, false, false, false, nil)
			return err
		}, ""},
		{"passive exchange.declare", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclarePassive("e-x", "fanout", false, false, false, false, nil)
		}, ""},
	} {
		e := secTry(t, c, tc.op)
		if tc.text == "" {
			secAllowed(t, tc.what, e)
		} else {
			secRefused(t, tc.what, e, 403, tc.text)
		}
	}
	if n := queueReady(t, admin, "e-q"); n != 1 {
		t.Errorf("e-q holds %d messages, want 1", n)
	}
}

// TestReloadPermissions changes permissions, users and virtual hosts by rewriting the
// definitions file and calling Reload: new operations on existing connections and
// channels follow the new permissions at once, including publishes whose write
// permission the channel has cached.
func TestReloadPermissions(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "definitions.json")
	defs := func(write, read string, more func(d *Definitions) error) {
		t.Helper()
		secSaveDefs(t, path, func(d *Definitions) error {
			err := errors.Join(d.AddUser("rel", "rel-pw"), d.SetPermissions("rel", "/", "^rel-", write, read))
			if more != nil {
				err = errors.Join(err, more(d))
			}
			return err
		})
	}
	reload := func(srv *Server) {
		t.Helper()
		if err := srv.Reload(); err != nil {
			t.Fatalf("Reload: %v", err)
		}
	}
	defs(".*", "", nil)
	srv := secServe(t, Config{Definitions: path}, false)
	addr := srv.Addr().String()
	rel := secConnect(t, addr, "rel", "rel-pw", "/")

	// A confirmed publish caches the write permission on amq.fanout for this channel.
	pub := openChannel(t, rel)
	if err := pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := pub.NotifyPublish(make(chan amqp091.Confirmation, 4))
	pubClosed := pub.NotifyClose(make(chan *amqp091.Error, 1))
	publish := func() {
		t.Helper()
		if err := pub.Publish("amq.fanout", "", false, false, amqp091.Publishing{Body: []byte("x")}); err != nil {
			t.Fatalf("publish: %v", err)
		}
	}
	publish()
	select {
	case c := <-confirms:
		if !c.Ack {
			t.Fatalf("publish to amq.fanout nacked")
		}
	case e := <-pubClosed:
		t.Fatalf("publish to amq.fanout refused: %v", e)
	case <-time.After(secWait):
		t.Fatal("no confirm")
	}
	if e := secTry(t, rel, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclare("rel-q", false, false, false, false, nil)
		return err
	}); e != nil {
		t.Fatalf("declare rel-q: %v", e)
	}
	secRefused(t, "get before reload", secTry(t, rel, func(ch *amqp091.Channel) error {
		_, _, err := ch.Get("rel-q", true)
		return err
	}), 403, secDenied("queue", "rel-q", "/", "rel"))

	// Revoke write, grant read.
	defs("^nothing$", "^rel-", nil)
	reload(srv)
	publish()
	awaitCloseCode(t, pubClosed, 403)
	secRefused(t, "publish to the default exchange after reload", secTry(t, rel, func(ch *amqp091.Channel) error {
		return ch.Publish("", "rel-q", false, false, amqp091.Publishing{Body: []byte("x")})
	}), 403, secDenied("exchange", "amq.default", "/", "rel"))
	secAllowed(t, "get after reload", secTry(t, rel, func(ch *amqp091.Channel) error {
		_, _, err := ch.Get("rel-q", true)
		return err
	}))

	// A transactional channel checks at publish too.
	secRefused(t, "publish in a transaction after reload", secTry(t, rel, func(ch *amqp091.Channel) error {
		if err := ch.Tx(); err != nil {
			return err
		}
		if err := ch.Publish("amq.fanout", "", false, false, amqp091.Publishing{Body: []byte("x")}); err != nil {
			return err
		}
		return ch.TxCommit()
	}), 403, secDenied("exchange", "amq.fanout", "/", "rel"))

	// New users and vhosts log in; a user or vhost removed from the file is refused.
	defs(".*", "^rel-", func(d *Definitions) error {
		return errors.Join(d.AddUser("newbie", "newbie-pw"), d.SetPermissions("newbie", "/", ".*", ".*", ".*"),
			d.AddVhost("later"), d.SetPermissions("rel", "later", ".*", ".*", ".*"))
	})
	secDialRefused(t, addr, "newbie", "newbie-pw", "/", amqp091.ErrCredentials)
	reload(srv)
	newbie := secConnect(t, addr, "newbie", "newbie-pw", "/")
	secRoundTrip(t, newbie, "newbie-q")
	later := secConnect(t, addr, "rel", "rel-pw", "later")
	secRoundTrip(t, later, "rel-later-q")
	newbieClosed := newbie.NotifyClose(make(chan *amqp091.Error, 1))
	laterClosed := later.NotifyClose(make(chan *amqp091.Error, 1))
	defs(".*", "^rel-", nil)
	reload(srv)
	// As in RabbitMQ, the connections of a deleted user or vhost are closed with 320.
	for _, closed := range []chan *amqp091.Error{newbieClosed, laterClosed} {
		select {
		case e := <-closed:
			if e == nil || e.Code != replyConnectionForced {
				t.Errorf("connection closed with %v, want 320", e)
			}
		case <-time.After(5 * time.Second):
			t.Error("a connection of a deleted user or vhost stayed open")
		}
	}
	secDialRefused(t, addr, "newbie", "newbie-pw", "/", amqp091.ErrCredentials)
	secDialRefused(t, addr, "rel", "rel-pw", "later", amqp091.ErrVhost)
	w := secWireLogin(t, addr, "rel", "rel-pw", "/")
	w.sendMethod(0, &connectionClose{ReplyCode: replySuccess})
	wireExpect[*connectionCloseOk](w, 0)
	w = wireHandshake(t, addr, wireOpts{response: "\x00rel\x00rel-pw", vhost: "later"}, 3)
	secRefusedClose(w, replyNotAllowed, "NOT_ALLOWED - vhost later not found", 10, 40)

	// A file that does not load is an error and changes nothing.
	if err := os.WriteFile(path, []byte(`{"users": [`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := srv.Reload(); err == nil {
		t.Error("Reload accepted a truncated definitions file")
	}
	if err := os.WriteFile(path, []byte(`{"users":[{"name":"rel","password":"rel-pw"}],"vhosts":[{"name":"/"}],
		"permissions":[{"user":"rel","vhost":"/","configure":"(","write":".*","read":".*"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := srv.Reload(); err == nil {
		t.Error("Reload accepted a permission that is not a regular expression")
	}
	secRoundTrip(t, secConnect(t, addr, "rel", "rel-pw", "/"), "rel-after-bad-reload")
	secRoundTrip(t, secConnect(t, addr, "guest", "guest", "/"), "guest-after-bad-reload")

	// Reloads racing with publishes: the permissions do not change, nothing is refused.
	defs(".*", "^rel-", nil)
	ch := openChannel(t, rel)
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	acks := ch.NotifyPublish(make(chan amqp091.Confirmation, 256))
	const n = 200
	done := make(chan error, 1)
	go func() {
		for i := 0; i < 20; i++ {
			if err := srv.Reload(); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for i := 0; i < n; i++ {
		if err := ch.Publish("", "rel-q", false, false, amqp091.Publishing{Body: []byte(strconv.Itoa(i))}); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	for i := 0; i < n; i++ {
		select {
		case c := <-acks:
			if !c.Ack {
				t.Fatalf("publish %d nacked", c.DeliveryTag)
			}
		case <-time.After(secWait):
			t.Fatalf("%d of %d confirms", i, n)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if got := queueReady(t, ch, "rel-q"); got != n {
		t.Errorf("rel-q holds %d messages, want %d", got, n)
	}
}

// TestVhostIsolation uses the same queue and exchange names in two virtual hosts: each
// has its own entities, amq.* exchanges and exclusive queues, and messages never cross.
func TestVhostIsolation(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddVhost("v1"), d.AddVhost("v2"),
			d.SetPermissions("guest", "v1", ".*", ".*", ".*"), d.SetPermissions("guest", "v2", ".*", ".*", ".*"))
	})
	srv := secServe(t, Config{Definitions: path}, false)
	addr := srv.Addr().String()
	chs := map[string]*amqp091.Channel{}
	for _, vh := range []string{"v1", "v2"} {
		ch := openChannel(t, secConnect(t, addr, "guest", "guest", vh))
		chs[vh] = ch
		if err := ch.ExchangeDeclare("x", "direct", false, false, false, false, nil); err != nil {
			t.Fatalf("%s: %v", vh, err)
		}
		// The same name with another type: no 406, the exchanges are distinct.
		kind := map[string]string{"v1": "direct", "v2": "fanout"}[vh]
		if err := ch.ExchangeDeclare("y", kind, false, false, false, false, nil); err != nil {
			t.Fatalf("%s: declare y as %s: %v", vh, kind, err)
		}
		if _, err := ch.QueueDeclare("q", false, false, false, false, nil); err != nil {
			t.Fatalf("%s: %v", vh, err)
		}
		// An exclusive queue of the same name on another connection: no 405.
		if _, err := ch.QueueDeclare("excl", false, true, true, false, nil); err != nil {
			t.Fatalf("%s: exclusive queue: %v", vh, err)
		}
		if err := ch.QueueBind("q", "k", "x", false, nil); err != nil {
			t.Fatalf("%s: %v", vh, err)
		}
		for _, name := range []string{"amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"} {
			kind := map[string]string{"amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic"}[name]
			if kind == "" {
				kind = "headers"
			}
			if err := ch.ExchangeDeclarePassive(name, kind, true, false, false, false, nil); err != nil {
				t.Fatalf("%s has no %s: %v", vh, name, err)
			}
		}
	}
	v1, v2 := chs["v1"], chs["v2"]
	if err := v1.QueueBind("q", "t.#", "amq.topic", false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, v1, "x", "k", "v1 via x")
	publishText(t, v1, "", "q", "v1 via default")
	publishText(t, v1, "amq.topic", "t.v1", "v1 via amq.topic")
	publishText(t, v2, "x", "k", "v2 via x")
	publishText(t, v2, "amq.topic", "t.v2", "v2 via amq.topic: unbound in v2")
	publishText(t, v2, "", "excl", "v2 exclusive")
	if got, want := drainText(t, v1, "q"), []string{"v1 via x", "v1 via default", "v1 via amq.topic"}; !slices.Equal(got, want) {
		t.Errorf("v1 q: %q, want %q", got, want)
	}
	if got, want := drainText(t, v2, "q"), []string{"v2 via x"}; !slices.Equal(got, want) {
		t.Errorf("v2 q: %q, want %q", got, want)
	}
	if got := drainText(t, v1, "excl"); len(got) != 0 {
		t.Errorf("v1 excl got %q from v2", got)
	}
	// Deleting in one vhost leaves the other alone.
	if err := v1.ExchangeDelete("x", false, false); err != nil {
		t.Fatal(err)
	}
	if _, err := v1.QueueDelete("q", false, false, false); err != nil {
		t.Fatal(err)
	}
	if err := v2.ExchangeDeclarePassive("x", "direct", false, false, false, false, nil); err != nil {
		t.Fatalf("v2's x went with v1's: %v", err)
	}
	publishText(t, v2, "x", "k", "v2 after v1's delete")
	if got := drainText(t, v2, "q"); !slices.Equal(got, []string{"v2 after v1's delete"}) {
		t.Errorf("v2 q after v1's delete: %q", got)
	}
}

// TestLoopbackUsers serves on a listener whose clients appear to come from 10.1.2.3:
// guest is refused as in RabbitMQ, other users are not, and Config.LoopbackUsers
// changes who is loopback-only.
func TestLoopbackUsers(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddUser("ops", "ops-pw"), d.SetPermissions("ops", "/", ".*", ".*", ".*"))
	})
	// As in RabbitMQ, the client is told only that its login was refused, so that the right
	// password of a loopback-only user is refused just as a wrong one is; the log has why.
	t.Run("default", func(t *testing.T) {
		t.Parallel()
		log := &secLog{}
		srv := secServe(t, Config{Definitions: path, Logger: log.logger()}, true)
		addr := srv.Addr().String()
		other := secConnect(t, addr, "ops", "ops-pw", "/")
		secDialRefused(t, addr, "guest", "guest", "/", amqp091.ErrCredentials)
		right := wireHandshake(t, addr, wireOpts{}, 1).expectConnClose(replyAccessRefused, 10, 11)
		wrong := wireHandshake(t, addr, wireOpts{response: "\x00guest\x00nope"}, 1).expectConnClose(replyAccessRefused, 10, 11)
		if *right != *wrong || right.ReplyText != secLoginRefused("PLAIN") {
			t.Errorf("guest from a remote address: connection.close %+v with the right password, %+v with a wrong one; want both %q",
				*right, *wrong, secLoginRefused("PLAIN"))
		}
		secRefusedClose(wireHandshake(t, addr, wireOpts{mechanism: "AMQPLAIN", response: wireAMQPlain("guest", "guest")}, 1),
			replyAccessRefused, secLoginRefused("AMQPLAIN"), 10, 11)
		wireHandshake(t, addr, wireOpts{noAuthFailureClose: true}, 1).expectClosed(secWait)
		secRoundTrip(t, secConnect(t, addr, "ops", "ops-pw", "/"), "ops-q")
		secRoundTrip(t, other, "ops-q2")
		for _, reason := range []string{"loopback-only user from a remote address", "wrong password"} {
			if !log.find(func(rec map[string]any) bool { return rec["level"] == "WARN" }, "login refused", "guest", reason) {
				t.Errorf("no warning of guest's login refused for %q:\n%s", reason, log)
			}
		}
	})
	t.Run("from loopback", func(t *testing.T) {
		t.Parallel()
		srv := secServe(t, Config{Definitions: path}, false)
		secRoundTrip(t, secConnect(t, srv.Addr().String(), "guest", "guest", "/"), "guest-q")
	})
	t.Run("ops only", func(t *testing.T) {
		t.Parallel()
		srv := secServe(t, Config{Definitions: path, LoopbackUsers: []string{"ops"}}, true)
		addr := srv.Addr().String()
		secRoundTrip(t, secConnect(t, addr, "guest", "guest", "/"), "guest-q")
		secDialRefused(t, addr, "ops", "ops-pw", "/", amqp091.ErrCredentials)
		secRefusedClose(wireHandshake(t, addr, wireOpts{response: "\x00ops\x00ops-pw"}, 1), replyAccessRefused,
			secLoginRefused("PLAIN"), 10, 11)
	})
	t.Run("none", func(t *testing.T) {
		t.Parallel()
		srv := secServe(t, Config{Definitions: path, LoopbackUsers: []string{}}, true)
		addr := srv.Addr().String()
		secRoundTrip(t, secConnect(t, addr, "guest", "guest", "/"), "guest-q")
		secRoundTrip(t, secConnect(t, addr, "ops", "ops-pw", "/"), "ops-q")
	})
}

// TestMechanismList checks the SASL mechanisms connection.start offers.
func TestMechanismList(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	tlsCfg := func(verify string) *TLSConfig {
		return &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile, CAFile: p.caFile, Verify: verify}
	}
	withCert := &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{p.client}}
	noCert := &tls.Config{RootCAs: p.pool}
	for _, tc := range []struct {
		name   string
		cfg    Config
		client *tls.Config // nil: plain TCP
		want   []string
		exact  bool
	}{
		{"default", Config{}, nil, []string{"PLAIN", "AMQPLAIN"}, true},
		{"anonymous", Config{AnonymousUser: "guest"}, nil, []string{"PLAIN", "AMQPLAIN", "ANONYMOUS"}, false},
		{"TLS with a verified client certificate", Config{TLS: tlsCfg("required")}, withCert, []string{"EXTERNAL", "PLAIN", "AMQPLAIN"}, false},
		{"TLS optional without a certificate", Config{TLS: tlsCfg("optional")}, noCert, []string{"PLAIN", "AMQPLAIN"}, true},
		{"TLS optional with a certificate", Config{TLS: tlsCfg("optional")}, withCert, []string{"EXTERNAL", "PLAIN", "AMQPLAIN"}, false},
		{"TLS none with a certificate", Config{TLS: tlsCfg("none")}, withCert, []string{"PLAIN", "AMQPLAIN"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			addr := secServe(t, tc.cfg, false).Addr().String()
			var c *wireClient
			if tc.client == nil {
				c = wireDial(t, addr)
			} else {
				c = secWireTLS(t, addr, tc.client)
			}
			got := secStart(c)
			mechs := secMechanisms(got)
			if tc.exact && got != strings.Join(tc.want, " ") {
				t.Errorf("mechanisms %q, want %q", got, strings.Join(tc.want, " "))
			}
			for _, m := range tc.want {
				if !slices.Contains(mechs, m) {
					t.Errorf("mechanisms %q lack %s", got, m)
				}
			}
			if len(mechs) != len(tc.want) {
				t.Errorf("mechanisms %q, want just %q", got, tc.want)
			}
		})
	}
}

// TestAnonymousLogin checks SASL ANONYMOUS: offered and logging in as
// Config.AnonymousUser when set, refused with 503 when not.
func TestAnonymousLogin(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddUser("anon", ""), d.SetPermissions("anon", "/", "^anon-", ".*", ".*"))
	})

	t.Run("enabled", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{Definitions: path, AnonymousUser: "anon"}, false).Addr().String()
		c := wireDial(t, addr)
		if mechs := secMechanisms(secStart(c)); !slices.Contains(mechs, "ANONYMOUS") {
			t.Fatalf("mechanisms %q lack ANONYMOUS", mechs)
		}
		secStartOk(c, "ANONYMOUS", "")
		secOpen(c, "/")
		wireExpect[*connectionOpenOk](c, 0)
		c.openChannel(1)
		c.sendMethod(1, &queueDeclare{Queue: "anon-q", Exclusive: true})
		wireExpect[*queueDeclareOk](c, 1)
		// Only anon lacks configure on guest-q: the refusal names the user.
		c.sendMethod(1, &queueDeclare{Queue: "guest-q"})
		if cl := wireExpect[*channelClose](c, 1); cl.ReplyCode != replyAccessRefused || cl.ReplyText != secDenied("queue", "guest-q", "/", "anon") {
			t.Errorf("declare guest-q as anon: %d %q", cl.ReplyCode, cl.ReplyText)
		}

		conn, err := amqp091.DialConfig("amqp://"+addr+"/", amqp091.Config{SASL: []amqp091.Authentication{secAnonymous{}}})
		if err != nil {
			t.Fatalf("amqp091-go with ANONYMOUS: %v", err)
		}
		defer conn.Close()
		secRefused(t, "declare guest-q", secTry(t, conn, func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("guest-q", false, false, false, false, nil)
			return err
		}), 403, secDenied("queue", "guest-q", "/", "anon"))
		secRoundTrip(t, conn, "anon-rt")
		// anon has no password: PLAIN cannot log in as anon.
		secDialRefused(t, addr, "anon", "", "/", amqp091.ErrCredentials)
		secRoundTrip(t, secConnect(t, addr, "guest", "guest", "/"), "guest-q")
	})
	t.Run("disabled", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{Definitions: path}, false).Addr().String()
		other := secConnect(t, addr, "guest", "guest", "/")
		c := wireDial(t, addr)
		if mechs := secMechanisms(secStart(c)); slices.Contains(mechs, "ANONYMOUS") {
			t.Fatalf("mechanisms %q offer ANONYMOUS without Config.AnonymousUser", mechs)
		}
		secStartOk(c, "ANONYMOUS", "")
		secRefusedClose(c, replyCommandInvalid, "COMMAND_INVALID - unknown authentication mechanism 'ANONYMOUS'", 10, 11)
		if _, err := amqp091.DialConfig("amqp://"+addr+"/", amqp091.Config{SASL: []amqp091.Authentication{secAnonymous{}}}); err != amqp091.ErrSASL {
			t.Errorf("amqp091-go with only ANONYMOUS: %v, want ErrSASL", err)
		}
		wireCheckClient(t, other)
	})
	t.Run("loopback-only user from a remote address", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{AnonymousUser: "guest"}, true).Addr().String()
		c := wireDial(t, addr)
		secStart(c)
		secStartOk(c, "ANONYMOUS", "")
		secRefusedClose(c, replyAccessRefused, secLoginRefused("ANONYMOUS"), 10, 11)
	})
	t.Run("user that does not exist", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{Definitions: path, AnonymousUser: "ghost"}, false).Addr().String()
		c := wireDial(t, addr)
		secStart(c)
		secStartOk(c, "ANONYMOUS", "")
		secRefusedClose(c, replyAccessRefused, secLoginRefused("ANONYMOUS"), 10, 11)
	})
}

// TestSecurityLoginLogging checks that a refused login is logged with the user name and
// the client's address, and that no password, refused or accepted, is ever logged.
func TestSecurityLoginLogging(t *testing.T) {
	t.Parallel()
	const (
		wrong = "wr0ng-Pa55word-Zx9"
		right = "r1ght-Pa55word-Qy7"
	)
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddUser("mallory", right), d.SetPermissions("mallory", "/", ".*", ".*", ".*"))
	})
	log := &secLog{}
	srv := secServe(t, Config{Definitions: path, Logger: log.logger()}, true)
	addr := srv.Addr().String()
	remote := secRemote.String()

	secDialRefused(t, addr, "mallory", wrong, "/", amqp091.ErrCredentials)
	secRefusedClose(wireHandshake(t, addr, wireOpts{response: "\x00mallory\x00" + wrong}, 1), replyAccessRefused, secLoginRefused("PLAIN"), 10, 11)
	secRefusedClose(wireHandshake(t, addr, wireOpts{mechanism: "AMQPLAIN", response: wireAMQPlain("mallory", wrong)}, 1),
		replyAccessRefused, secLoginRefused("AMQPLAIN"), 10, 11)
	secRefusedClose(wireHandshake(t, addr, wireOpts{response: "authz\x00trudy\x00" + wrong}, 1), replyAccessRefused, secLoginRefused("PLAIN"), 10, 11)
	wireHandshake(t, addr, wireOpts{response: "\x00mallory\x00" + wrong, noAuthFailureClose: true}, 1).expectClosed(secWait)
	secRefusedClose(wireHandshake(t, addr, wireOpts{response: "\x00guest\x00guest"}, 1), replyAccessRefused, secLoginRefused("PLAIN"), 10, 11)
	secRoundTrip(t, secConnect(t, addr, "mallory", right, "/"), "mallory-q")

	// The log says why, which the client is not told.
	for _, w := range []struct{ user, reason string }{
		{"mallory", "wrong password"},
		{"trudy", "unknown user"},
		{"guest", "loopback-only user from a remote address"},
	} {
		pollFor(t, "a warning of "+w.user+"'s refused login from "+remote, func() bool {
			return log.find(func(rec map[string]any) bool { return rec["level"] == "WARN" }, "login refused", w.user, remote, w.reason)
		})
	}
	out := log.String()
	for _, secret := range []string{wrong, right} {
		if strings.Contains(out, secret) {
			t.Errorf("the log holds a password:\n%s", out)
		}
	}
	if t.Failed() {
		fmt.Fprintln(os.Stderr, out)
	}
}
