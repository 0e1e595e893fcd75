package amqp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Security end to end: users, virtual hosts and permissions from a definitions file,
// SASL mechanisms, loopback-only users, TLS client certificates, Reload, and the
// connection, channel, frame, queue and message limits. Every server listens on
// 127.0.0.1; secRemoteListener makes clients look remote without leaving the machine.

// secWait bounds every wait in this file.
const secWait = 5 * time.Second

// secRemote is the address every client of a secRemoteListener appears to come from.
var secRemote = &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 5555}

// secRemoteListener accepts real loopback sockets but reports secRemote as their remote
// address, so loopback-only users can be tested without a second machine.
type secRemoteListener struct{ net.Listener }

func (l secRemoteListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return secRemoteConn{nc}, nil
}

type secRemoteConn struct{ net.Conn }

func (secRemoteConn) RemoteAddr() net.Addr { return secRemote }

// secLog collects a server's log as JSON lines; it is safe for concurrent use.
type secLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *secLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *secLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *secLog) logger() *slog.Logger {
	return slog.New(slog.NewJSONHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// has reports whether some record holds every one of values among its attributes.
func (l *secLog) has(values ...string) bool {
	return l.find(func(map[string]any) bool { return true }, values...)
}

// find reports whether some record satisfying cond holds every one of values among its
// attributes.
func (l *secLog) find(cond func(rec map[string]any) bool, values ...string) bool {
	return l.count(cond, values...) > 0
}

// count returns the number of records satisfying cond that hold every one of values among
// their attributes.
func (l *secLog) count(cond func(rec map[string]any) bool, values ...string) int {
	n := 0
	sc := bufio.NewScanner(strings.NewReader(l.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec map[string]any
		if json.Unmarshal(sc.Bytes(), &rec) != nil || !cond(rec) {
			continue
		}
		all := true
		for _, v := range values {
			found := false
			for _, got := range rec {
				if s, ok := got.(string); ok && s == v {
					found = true
					break
				}
			}
			all = all && found
		}
		if all {
			n++
		}
	}
	return n
}

// secServe serves cfg on 127.0.0.1:0 (amqps when cfg.TLS is set) until the test ends.
// With remote, every client appears to connect from secRemote.
func secServe(t testing.TB, cfg Config, remote bool) *Server {
	t.Helper()
	return secServeTuned(t, cfg, remote, nil)
}

// secServeTuned is secServe that lets tune, if not nil, change the server before it serves.
func secServeTuned(t testing.TB, cfg Config, remote bool, tune func(s *Server)) *Server {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = wireDiscardLogger()
		if os.Getenv("AMQP_TEST_LOG") != "" {
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
		}
	}
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	srv := NewServer(cfg)
	if tune != nil {
		tune(srv)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var l net.Listener = ln
	if remote {
		l = secRemoteListener{ln}
	}
	done := make(chan error, 1)
	go func() {
		if cfg.TLS != nil {
			done <- srv.ServeTLS(l)
		} else {
			done <- srv.Serve(l)
		}
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != ErrServerClosed {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	up := make(chan struct{})
	go func() {
		srv.Addr() // blocks until the listener is up, forever if Serve fails first
		close(up)
	}()
	select {
	case <-up:
	case err := <-done:
		done <- err // for the cleanup
		t.Fatalf("Serve: %v", err)
	case <-time.After(secWait):
		t.Fatal("the server did not start listening")
	}
	return srv
}

// secDefsFile saves DefaultDefinitions, changed by edit, in a new file and returns its path.
func secDefsFile(t testing.TB, edit func(d *Definitions) error) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "definitions.json")
	secSaveDefs(t, path, edit)
	return path
}

// secSaveDefs replaces the definitions file at path with DefaultDefinitions changed by edit.
func secSaveDefs(t testing.TB, path string, edit func(d *Definitions) error) {
	t.Helper()
	d := DefaultDefinitions()
	if edit != nil {
		if err := edit(d); err != nil {
			t.Fatalf("building definitions: %v", err)
		}
	}
	if err := d.Save(path); err != nil {
		t.Fatal(err)
	}
}

// secDial logs in to vhost over amqp091-go with PLAIN.
func secDial(addr, user, pass, vhost string) (*amqp091.Connection, error) {
	return amqp091.DialConfig("amqp://"+addr+"/", amqp091.Config{
		SASL:  []amqp091.Authentication{&amqp091.PlainAuth{Username: user, Password: pass}},
		Vhost: vhost,
	})
}

// secConnect is secDial that fails the test on error and closes the connection at the end.
func secConnect(t testing.TB, addr, user, pass, vhost string) *amqp091.Connection {
	t.Helper()
	c, err := secDial(addr, user, pass, vhost)
	if err != nil {
		t.Fatalf("%s on vhost %q: %v", user, vhost, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// secDialRefused checks that a login fails with want, one of amqp091-go's handshake
// errors: it reports a refused login as ErrCredentials and a refused connection.open as
// ErrVhost (code 403 too), whatever the server's reply code; the wire tests check that.
func secDialRefused(t testing.TB, addr, user, pass, vhost string, want *amqp091.Error) {
	t.Helper()
	c, err := secDial(addr, user, pass, vhost)
	if err == nil {
		c.Close()
		t.Fatalf("%s/%s on vhost %q logged in, want %v", user, pass, vhost, want)
	}
	if err != want {
		t.Fatalf("%s/%s on vhost %q: %v, want %v", user, pass, vhost, err, want)
	}
}

// secTry runs op on a fresh channel of c, then a passive declare of amq.direct (which
// needs no permission) so that a refusal of an asynchronous method such as basic.publish
// has arrived. It returns nil if the channel is still open, else the error that closed it.
func secTry(t testing.TB, c *amqp091.Connection, op func(ch *amqp091.Channel) error) *amqp091.Error {
	t.Helper()
	ch, err := c.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	closed := ch.NotifyClose(make(chan *amqp091.Error, 1))
	err = op(ch)
	if err == nil {
		err = ch.ExchangeDeclarePassive("amq.direct", "direct", false, false, false, false, nil)
	}
	if err == nil {
		ch.Close()
		return nil
	}
	select {
	case e := <-closed:
		if e == nil {
			t.Fatalf("%v, and the channel closed without an error", err)
		}
		return e
	case <-time.After(secWait):
		t.Fatalf("%v, but the channel is still open", err)
	}
	return nil
}

// secAllowed fails the test if e, from secTry, is a refusal.
func secAllowed(t testing.TB, what string, e *amqp091.Error) {
	t.Helper()
	if e != nil {
		t.Errorf("%s: refused with %d %q, want it allowed", what, e.Code, e.Reason)
	}
}

// secRefused checks that e, from secTry, is a channel close with code and text; a text
// ending in "*" is a prefix.
func secRefused(t testing.TB, what string, e *amqp091.Error, code int, text string) {
	t.Helper()
	switch {
	case e == nil:
		t.Errorf("%s: allowed, want %d %q", what, code, text)
	case e.Code != code || !secTextMatches(e.Reason, text):
		t.Errorf("%s: %d %q, want %d %q", what, e.Code, e.Reason, code, text)
	case !e.Server || e.Recover != (code < 500):
		t.Errorf("%s: %+v, want a soft error from the server", what, e)
	}
}

func secTextMatches(got, want string) bool {
	if p, ok := strings.CutSuffix(want, "*"); ok {
		return strings.HasPrefix(got, p)
	}
	return got == want
}

// secDenied is RabbitMQ's text for a refused permission check.
func secDenied(kind, name, vhost, user string) string {
	return "ACCESS_REFUSED - access to " + kind + " '" + name + "' in vhost '" + vhost + "' refused for user '" + user + "'"
}

// secLoginRefused is RabbitMQ's text for a refused login, the same for an unknown user and
// a wrong password.
func secLoginRefused(mechanism string) string {
	return "ACCESS_REFUSED - Login was refused using authentication mechanism " + mechanism + ". For details see the broker logfile."
}

// secCount returns a queue's ready messages, from a passive declare on ch.
func secCount(t testing.TB, ch *amqp091.Channel, queue string) int {
	t.Helper()
	q, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	if err != nil {
		t.Fatalf("passive declare %s: %v", queue, err)
	}
	return q.Messages
}

// secRoundTrip declares queue on c (which must be allowed), publishes a message to it
// through the default exchange and gets it back.
func secRoundTrip(t testing.TB, c *amqp091.Connection, queue string) {
	t.Helper()
	ch, err := c.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	defer ch.Close()
	if _, err := ch.QueueDeclare(queue, false, false, false, false, nil); err != nil {
		t.Fatalf("declare %s: %v", queue, err)
	}
	body := "round trip " + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := ch.Publish("", queue, false, false, amqp091.Publishing{Body: []byte(body)}); err != nil {
		t.Fatalf("publish: %v", err)
	}
	d, ok, err := ch.Get(queue, true)
	if err != nil || !ok || string(d.Body) != body {
		t.Fatalf("get %s = %q, %v, %v; want %q", queue, d.Body, ok, err, body)
	}
}

// Raw clients, for what amqp091-go hides: exact close codes and texts during the
// handshake, the mechanism list, unusual mechanisms.

// secWireOn wraps an open socket, closed when the test ends, in a wireClient.
func secWireOn(t testing.TB, nc net.Conn) *wireClient {
	t.Cleanup(func() { nc.Close() })
	return &wireClient{t: t, nc: nc, fr: frameReader{r: bufio.NewReader(nc), frameMax: 1 << 24}}
}

// secWireTLS dials addr with TLS.
func secWireTLS(t testing.TB, addr string, conf *tls.Config) *wireClient {
	t.Helper()
	d := &net.Dialer{Timeout: secWait}
	nc, err := tls.DialWithDialer(d, "tcp", addr, conf)
	if err != nil {
		t.Fatalf("TLS dial: %v", err)
	}
	return secWireOn(t, nc)
}

// secStart sends the protocol header and returns the mechanisms connection.start offers.
func secStart(c *wireClient) string {
	c.t.Helper()
	c.send(protocolHeader[:])
	return wireExpect[*connectionStart](c, 0).Mechanisms
}

// secStartOk answers connection.start, advertising authentication_failure_close.
func secStartOk(c *wireClient, mechanism, response string) {
	c.t.Helper()
	c.sendMethod(0, &connectionStartOk{
		ClientProperties: table{"product": "amqp-go security test", "capabilities": table{"authentication_failure_close": true}},
		Mechanism:        mechanism,
		Response:         response,
		Locale:           "en_US",
	})
}

// secOpen reads connection.tune, accepts the server's limits and opens vhost.
func secOpen(c *wireClient, vhost string) {
	c.t.Helper()
	wireExpect[*connectionTune](c, 0)
	c.sendMethod(0, &connectionTuneOk{})
	c.sendMethod(0, &connectionOpen{VirtualHost: vhost})
}

// secWireLogin logs in with PLAIN and opens vhost, returning the client with open-ok read.
func secWireLogin(t testing.TB, addr, user, pass, vhost string) *wireClient {
	t.Helper()
	return wireConnect(t, addr, wireOpts{response: "\x00" + user + "\x00" + pass, vhost: vhost})
}

// secRefusedClose reads the connection.close that ends a handshake and checks code, text
// and failing method.
func secRefusedClose(c *wireClient, code uint16, text string, classID, methodID uint16) {
	c.t.Helper()
	cl := c.expectConnClose(code, classID, methodID)
	if !secTextMatches(cl.ReplyText, text) {
		c.t.Errorf("connection.close %d %q, want text %q", cl.ReplyCode, cl.ReplyText, text)
	}
}

// secMechanisms splits a connection.start mechanism list.
func secMechanisms(list string) []string { return strings.Fields(list) }

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
	if n := secCount(t, admin, "bob-q"); n != 2 {
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
		if n := secCount(t, admin, queue); n != want {
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
	if n := secCount(t, admin, "e-q"); n != 1 {
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
	if got := secCount(t, ch, "rel-q"); got != n {
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

// TestExternalLogin checks SASL EXTERNAL over TLS: the verified client certificate's CN
// names the user.
func TestExternalLogin(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	tlsCfg := func(verify string) *TLSConfig {
		return &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile, CAFile: p.caFile, Verify: verify}
	}
	withCert := func() *tls.Config { return &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{p.client}} }
	external := func(addr string, conf *tls.Config) (*amqp091.Connection, error) {
		return amqp091.DialConfig("amqps://"+addr+"/", amqp091.Config{
			SASL:            []amqp091.Authentication{&amqp091.ExternalAuth{}},
			TLSClientConfig: conf,
		})
	}
	// guest may configure only guest-*, so that refusals show who logged in.
	path := secDefsFile(t, func(d *Definitions) error { return d.SetPermissions("guest", "/", "^guest-|^amq\\.gen-", ".*", ".*") })

	t.Run("certificate names a user", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{Definitions: path, TLS: tlsCfg("required")}, false).Addr().String()
		conn, err := external(addr, withCert())
		if err != nil {
			t.Fatalf("EXTERNAL login: %v", err)
		}
		defer conn.Close()
		checkBrokerWorksTLS(t, conn)
		secRefused(t, "declare other-q", secTry(t, conn, func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("other-q", false, false, false, false, nil)
			return err
		}), 403, secDenied("queue", "other-q", "/", "guest"))

		c := secWireTLS(t, addr, withCert())
		if mechs := secMechanisms(secStart(c)); !slices.Contains(mechs, "EXTERNAL") {
			t.Fatalf("mechanisms %q lack EXTERNAL", mechs)
		}
		secStartOk(c, "EXTERNAL", "")
		secOpen(c, "/")
		wireExpect[*connectionOpenOk](c, 0)
		// PLAIN still works on the same listener.
		conn2, err := amqp091.DialConfig("amqps://guest:guest@"+addr+"/", amqp091.Config{TLSClientConfig: withCert()})
		if err != nil {
			t.Fatalf("PLAIN beside EXTERNAL: %v", err)
		}
		conn2.Close()
	})
	t.Run("certificate names an unknown user", func(t *testing.T) {
		t.Parallel()
		noGuest := secDefsFile(t, func(d *Definitions) error {
			return errors.Join(d.DeleteUser("guest"), d.AddUser("admin", "admin-pw"), d.SetPermissions("admin", "/", ".*", ".*", ".*"))
		})
		addr := secServe(t, Config{Definitions: noGuest, TLS: tlsCfg("required")}, false).Addr().String()
		if conn, err := external(addr, withCert()); err != amqp091.ErrCredentials {
			if err == nil {
				conn.Close()
			}
			t.Errorf("EXTERNAL as unknown guest: %v, want ErrCredentials", err)
		}
		c := secWireTLS(t, addr, withCert())
		secStart(c)
		secStartOk(c, "EXTERNAL", "")
		secRefusedClose(c, replyAccessRefused, secLoginRefused("EXTERNAL"), 10, 11)
		conn, err := amqp091.DialConfig("amqps://admin:admin-pw@"+addr+"/", amqp091.Config{TLSClientConfig: withCert()})
		if err != nil {
			t.Fatalf("PLAIN as admin: %v", err)
		}
		conn.Close()
	})
	t.Run("no client certificate", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{Definitions: path, TLS: tlsCfg("optional")}, false).Addr().String()
		noCert := func() *tls.Config { return &tls.Config{RootCAs: p.pool} }
		if conn, err := external(addr, noCert()); err != amqp091.ErrSASL {
			if err == nil {
				conn.Close()
			}
			t.Errorf("EXTERNAL without a certificate: %v, want ErrSASL (not offered)", err)
		}
		c := secWireTLS(t, addr, noCert())
		if got := secStart(c); slices.Contains(secMechanisms(got), "EXTERNAL") {
			t.Errorf("mechanisms %q offer EXTERNAL without a client certificate", got)
		}
		secStartOk(c, "EXTERNAL", "")
		secRefusedClose(c, replyCommandInvalid, "COMMAND_INVALID - *", 10, 11)
		// Nor over plain TCP.
		plain := secServe(t, Config{Definitions: path}, false).Addr().String()
		w := wireDial(t, plain)
		secStart(w)
		secStartOk(w, "EXTERNAL", "")
		secRefusedClose(w, replyCommandInvalid, "COMMAND_INVALID - *", 10, 11)
	})
	t.Run("loopback-only user from a remote address", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{TLS: tlsCfg("required")}, true).Addr().String()
		c := secWireTLS(t, addr, withCert())
		secStart(c)
		secStartOk(c, "EXTERNAL", "")
		secRefusedClose(c, replyAccessRefused, secLoginRefused("EXTERNAL"), 10, 11)
	})
}

// TestExternalTLSBadCertificates checks TLS handshakes that must fail, beyond those of
// TestTLSClientCertificates: a client certificate from another CA when certificates are
// optional or required, and a server certificate the client does not trust.
func TestExternalTLSBadCertificates(t *testing.T) {
	t.Parallel()
	p, other := newTestPKI(t), newTestPKI(t)
	log := &secLog{}
	serve := func(verify string, lg *slog.Logger) string {
		cfg := Config{TLS: &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile, CAFile: p.caFile, Verify: verify}, Logger: lg}
		return secServe(t, cfg, false).Addr().String()
	}
	optional, required := serve("optional", log.logger()), serve("required", nil)
	good := func(addr string) {
		t.Helper()
		conn, err := amqp091.DialTLS("amqps://guest:guest@"+addr+"/", &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{p.client}})
		if err != nil {
			t.Fatalf("a good client was refused: %v", err)
		}
		defer conn.Close()
		checkBrokerWorksTLS(t, conn)
	}
	for _, tc := range []struct {
		name string
		addr string
		conf *tls.Config
	}{
		{"optional, self-signed client certificate", optional, p.forcing(p.stranger)},
		{"optional, client certificate from another CA", optional, p.forcing(other.client)},
		{"required, client certificate from another CA", required, p.forcing(other.client)},
		{"server certificate from an unknown CA", optional, &tls.Config{RootCAs: other.pool}},
		{"server certificate for another name", optional, &tls.Config{RootCAs: p.pool, ServerName: "amqp.example.com"}},
	} {
		conn, err := amqp091.DialTLS("amqps://guest:guest@"+tc.addr+"/", tc.conf)
		if err == nil {
			conn.Close()
			t.Errorf("%s: connected", tc.name)
		}
	}
	good(optional)
	good(required)
	pollFor(t, "the refused handshakes in the log", func() bool { return strings.Contains(log.String(), "TLS handshake failed") })
}

// TestLimitMaxConnections checks Config.MaxConnections: sockets beyond it are closed at
// once, and the connections already open keep working.
func TestLimitMaxConnections(t *testing.T) {
	t.Parallel()
	log := &secLog{}
	srv := secServe(t, Config{MaxConnections: 3, Logger: log.logger()}, false)
	addr := srv.Addr().String()
	conns := make([]*amqp091.Connection, 3)
	for i := range conns {
		conns[i] = secConnect(t, addr, "guest", "guest", "/")
	}
	nc, err := net.DialTimeout("tcp", addr, secWait)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetReadDeadline(time.Now().Add(secWait))
	if n, err := nc.Read(make([]byte, 8)); n != 0 || !wireIsClosed(err) {
		t.Fatalf("a socket beyond the limit read %d octets, %v; want it closed at once", n, err)
	}
	if c, err := secDial(addr, "guest", "guest", "/"); err == nil {
		c.Close()
		t.Fatal("amqp091-go connected beyond the limit")
	}
	for _, c := range conns {
		wireCheckClient(t, c)
	}
	if !log.has("refusing connection: connection limit reached") {
		t.Errorf("no log of the refusal:\n%s", log)
	}
	conns[0].Close()
	var next *amqp091.Connection
	pollFor(t, "a free connection slot", func() bool {
		next, err = secDial(addr, "guest", "guest", "/")
		return err == nil
	})
	defer next.Close()
	wireCheckClient(t, next)
}

// TestLimitMaxConnectionsPerVhost checks Config.MaxConnectionsPerVhost: connection.open
// beyond it is 530, other vhosts and open connections are unaffected, and a burst of
// concurrent logins gets exactly the limit.
func TestLimitMaxConnectionsPerVhost(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddVhost("v2"), d.AddVhost("burst"),
			d.SetPermissions("guest", "v2", ".*", ".*", ".*"), d.SetPermissions("guest", "burst", ".*", ".*", ".*"))
	})
	srv := secServe(t, Config{Definitions: path, MaxConnectionsPerVhost: 2}, false)
	addr := srv.Addr().String()
	a1 := secConnect(t, addr, "guest", "guest", "/")
	a2 := secConnect(t, addr, "guest", "guest", "/")
	secRefusedClose(wireHandshake(t, addr, wireOpts{}, 3), replyNotAllowed,
		"NOT_ALLOWED - access to vhost '/' refused for user 'guest': connection limit (2) is reached", 10, 40)
	secDialRefused(t, addr, "guest", "guest", "/", amqp091.ErrVhost)
	b1 := secConnect(t, addr, "guest", "guest", "v2")
	secConnect(t, addr, "guest", "guest", "v2")
	secDialRefused(t, addr, "guest", "guest", "v2", amqp091.ErrVhost)
	for _, c := range []*amqp091.Connection{a1, a2, b1} {
		wireCheckClient(t, c)
	}
	a1.Close()
	var next *amqp091.Connection
	pollFor(t, "a free slot on /", func() bool {
		c, err := secDial(addr, "guest", "guest", "/")
		next = c
		return err == nil
	})
	defer next.Close()
	wireCheckClient(t, next)

	const tries = 8
	results := make(chan error, tries)
	var wg sync.WaitGroup
	for i := 0; i < tries; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := secDial(addr, "guest", "guest", "burst")
			if err == nil {
				t.Cleanup(func() { c.Close() })
			}
			results <- err
		}()
	}
	wg.Wait()
	close(results)
	ok := 0
	for err := range results {
		switch err {
		case nil:
			ok++
		case amqp091.ErrVhost:
		default:
			t.Errorf("burst login: %v", err)
		}
	}
	if ok != 2 {
		t.Errorf("%d of %d concurrent logins to vhost burst succeeded, want 2", ok, tries)
	}
}

// TestLimitMaxQueuesPerVhost checks Config.MaxQueuesPerVhost: queue.declare of a new queue
// beyond it is 406 on the channel, redeclaring an existing queue is fine, other vhosts
// have their own count, and concurrent declares get exactly the limit.
func TestLimitMaxQueuesPerVhost(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddVhost("v2"), d.AddVhost("burst"),
			d.SetPermissions("guest", "v2", ".*", ".*", ".*"), d.SetPermissions("guest", "burst", ".*", ".*", ".*"))
	})
	srv := secServe(t, Config{Definitions: path, MaxQueuesPerVhost: 3}, false)
	addr := srv.Addr().String()
	c := secConnect(t, addr, "guest", "guest", "/")
	declare := func(c *amqp091.Connection, name string) *amqp091.Error {
		return secTry(t, c, func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(name, false, false, false, false, nil)
			return err
		})
	}
	for _, q := range []string{"q1", "q2", "q3"} {
		secAllowed(t, "declare "+q, declare(c, q))
	}
	secRefused(t, "declare q4", declare(c, "q4"), 406, "PRECONDITION_FAILED - cannot declare queue 'q4': queue limit in vhost '/' (3) is reached")
	secRefused(t, "declare a server-named queue", declare(c, ""), 406, "PRECONDITION_FAILED - cannot declare queue 'amq.gen-*")
	secAllowed(t, "redeclare q1", declare(c, "q1"))
	secRefused(t, "passive declare q4", secTry(t, c, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclarePassive("q4", false, false, false, false, nil)
		return err
	}), 404, "NOT_FOUND - no queue 'q4' in vhost '/'")
	v2 := secConnect(t, addr, "guest", "guest", "v2")
	for _, q := range []string{"q1", "q2", "q3"} {
		secAllowed(t, "declare "+q+" in v2", declare(v2, q))
	}
	secRefused(t, "declare q4 in v2", declare(v2, "q4"), 406, "PRECONDITION_FAILED - cannot declare queue 'q4': queue limit in vhost 'v2' (3) is reached")
	secAllowed(t, "delete q1", secTry(t, c, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDelete("q1", false, false, false)
		return err
	}))
	secAllowed(t, "declare q4 after a delete", declare(c, "q4"))
	secRoundTrip(t, c, "q2")

	burst := secConnect(t, addr, "guest", "guest", "burst")
	const tries = 10
	codes := make(chan int, tries)
	var wg sync.WaitGroup
	for i := 0; i < tries; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ch, err := burst.Channel()
			if err != nil {
				codes <- -1
				return
			}
			defer ch.Close()
			_, err = ch.QueueDeclare("b"+strconv.Itoa(i), false, false, false, false, nil)
			var e *amqp091.Error
			switch {
			case err == nil:
				codes <- 0
			case errors.As(err, &e):
				codes <- e.Code
			default:
				codes <- -1
			}
		}()
	}
	wg.Wait()
	close(codes)
	ok := 0
	for code := range codes {
		switch code {
		case 0:
			ok++
		case 406:
		default:
			t.Errorf("concurrent declare: code %d", code)
		}
	}
	if ok != 3 {
		t.Errorf("%d of %d concurrent declares succeeded, want 3", ok, tries)
	}
}

// TestLimitMaxPreAuthBytes checks Config.MaxPreAuthBytes: a client that sends more than it
// before logging in loses its socket without connection.close; one under it logs in and is
// then free to send more.
func TestLimitMaxPreAuthBytes(t *testing.T) {
	t.Parallel()
	log := &secLog{}
	srv := secServe(t, Config{MaxPreAuthBytes: 1024, Logger: log.logger()}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	heartbeats := func(n int) []byte { return bytes.Repeat(wireFrame(frameHeartbeat, 0, nil), n) }

	// Heartbeats are skipped during the handshake, but they count.
	c := wireDial(t, addr)
	secStart(c)
	c.send(heartbeats(200)) // 1600 octets
	c.expectClosed(secWait)
	pollFor(t, "the log of the pre-authentication limit", func() bool {
		return log.has("closing connection: too much data before authentication")
	})

	// A start-ok that takes the total over the cap, with tune-ok and connection.open
	// pipelined behind it in the same write.
	overCap := func(t *testing.T) *wireClient {
		c := wireDial(t, addr)
		secStart(c)
		b := appendMethodFrame(nil, 0, &connectionStartOk{
			ClientProperties: table{"padding": strings.Repeat("p", 2000)},
			Mechanism:        "PLAIN", Response: "\x00guest\x00guest", Locale: "en_US",
		})
		b = appendMethodFrame(b, 0, &connectionTuneOk{})
		c.send(appendMethodFrame(b, 0, &connectionOpen{VirtualHost: "/"}))
		return c
	}
	// The socket is closed, whatever was answered first.
	c = overCap(t)
	for deadline := time.Now().Add(secWait); ; {
		if _, err := c.readFrame(time.Until(deadline)); err != nil {
			if !wireIsClosed(err) {
				t.Fatalf("read: %v, want the socket closed", err)
			}
			break
		}
	}
	t.Run("nothing past the cap is acted on", func(t *testing.T) {
		overCap(t).expectClosed(secWait)
	})

	// Under the cap: 8 + 400 + start-ok octets. After login, the cap no longer applies.
	c = wireDial(t, addr)
	secStart(c)
	c.send(heartbeats(50))
	secStartOk(c, "PLAIN", "\x00guest\x00guest")
	secOpen(c, "/")
	wireExpect[*connectionOpenOk](c, 0)
	c.openChannel(1)
	c.sendMethod(1, &queueDeclare{Queue: "preauth", Exclusive: true})
	wireExpect[*queueDeclareOk](c, 1)
	body := bytes.Repeat([]byte("b"), 64<<10)
	c.sendMethod(1, &basicPublish{RoutingKey: "preauth"})
	c.send(appendContent(nil, 1, nil, body, defaultFrameMax))
	c.sendMethod(1, &basicGet{Queue: "preauth", NoAck: true})
	if ok := wireExpect[*basicGetOk](c, 1); ok.DeliveryTag != 1 {
		t.Errorf("get-ok delivery tag %d", ok.DeliveryTag)
	}
	wireCheckClient(t, other)
}

// TestLimitChannelMax checks Config.ChannelMax: offered in connection.tune, a tune-ok
// above it is 530, and opening more channels than it is a connection error.
func TestLimitChannelMax(t *testing.T) {
	t.Parallel()
	srv := secServe(t, Config{ChannelMax: 4}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	if got := other.Config.ChannelMax; got != 4 {
		t.Errorf("amqp091-go negotiated channel-max %d, want 4", got)
	}
	var chans []*amqp091.Channel
	for i := 0; i < 4; i++ {
		ch, err := other.Channel()
		if err != nil {
			t.Fatalf("channel %d of 4: %v", i+1, err)
		}
		chans = append(chans, ch)
	}
	if _, err := other.Channel(); err != amqp091.ErrChannelMax {
		t.Errorf("a fifth channel: %v, want amqp091.ErrChannelMax", err)
	}
	for _, ch := range chans {
		ch.Close()
	}

	c := wireDial(t, addr)
	secStart(c)
	secStartOk(c, "PLAIN", "\x00guest\x00guest")
	if tune := wireExpect[*connectionTune](c, 0); tune.ChannelMax != 4 {
		t.Errorf("connection.tune channel-max %d, want 4", tune.ChannelMax)
	}
	c.sendMethod(0, &connectionTuneOk{ChannelMax: 5})
	secRefusedClose(c, replyNotAllowed, "NOT_ALLOWED - negotiated channel_max = 5 is higher than the maximum allowed value (4)", 10, 31)

	open4 := func(t *testing.T) *wireClient {
		c := wireConnect(t, addr, wireOpts{})
		for id := uint16(1); id <= 4; id++ {
			c.openChannel(id)
		}
		// A closed channel frees its place.
		c.sendMethod(2, &channelClose{ReplyCode: replySuccess})
		wireExpect[*channelCloseOk](c, 2)
		c.openChannel(2)
		return c
	}
	c = open4(t)
	c.sendMethod(5, &channelOpen{})
	if cl := wireExpect[*connectionClose](c, 0); cl.ReplyCode < 500 {
		t.Errorf("a fifth channel: connection.close %d %q, want a hard error", cl.ReplyCode, cl.ReplyText)
	}
	t.Run("reply code", func(t *testing.T) {
		c := open4(t)
		c.sendMethod(5, &channelOpen{})
		secRefusedClose(c, replyNotAllowed, "NOT_ALLOWED - number of channels opened (4) has reached the negotiated channel_max (4)", 0, 0)
	})
	wireCheckClient(t, other)
}

// TestLimitFrameMax checks Config.FrameMax: offered in connection.tune, a tune-ok outside
// 4096..FrameMax is 530, a frame over the negotiated size is 501, and messages larger
// than a frame travel in frames of the negotiated size.
func TestLimitFrameMax(t *testing.T) {
	t.Parallel()
	const frameMax = 8192
	srv := secServe(t, Config{FrameMax: frameMax}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	if got := other.Config.FrameSize; got != frameMax {
		t.Errorf("amqp091-go negotiated frame-max %d, want %d", got, frameMax)
	}
	ch := openChannel(t, other)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 10000)
	if err := ch.Publish("", q.Name, false, false, amqp091.Publishing{Body: big}); err != nil {
		t.Fatal(err)
	}
	if d, ok, err := ch.Get(q.Name, true); err != nil || !ok || !bytes.Equal(d.Body, big) {
		t.Fatalf("a %d-octet message: got %d octets, %v, %v", len(big), len(d.Body), ok, err)
	}

	for _, tc := range []struct {
		frameMax uint32
		text     string
	}{
		{frameMax + 1, "NOT_ALLOWED - negotiated frame_max = 8193 is higher than the maximum allowed value (8192)"},
		{4095, "NOT_ALLOWED - negotiated frame_max = 4095 is lower than the minimum allowed value (4096)"},
	} {
		c := wireDial(t, addr)
		secStart(c)
		secStartOk(c, "PLAIN", "\x00guest\x00guest")
		if tune := wireExpect[*connectionTune](c, 0); tune.FrameMax != frameMax {
			t.Errorf("connection.tune frame-max %d, want %d", tune.FrameMax, frameMax)
		}
		c.sendMethod(0, &connectionTuneOk{FrameMax: tc.frameMax})
		secRefusedClose(c, replyNotAllowed, tc.text, 10, 31)
	}

	// connect opens channel 1 with an exclusive queue on a frame-max of 8192. Each client
	// has its own queue: an exclusive queue goes only when its connection has ended.
	connect := func(t *testing.T, queue string) *wireClient {
		c := wireConnect(t, addr, wireOpts{frameMax: frameMax})
		c.openChannel(1)
		c.sendMethod(1, &queueDeclare{Queue: queue, Exclusive: true})
		wireExpect[*queueDeclareOk](c, 1)
		return c
	}
	// getBody gets one message of fm and returns its body.
	getBody := func(t *testing.T, c *wireClient, queue string) []byte {
		c.sendMethod(1, &basicGet{Queue: queue, NoAck: true})
		wireExpect[*basicGetOk](c, 1)
		var body []byte
		f, err := c.readFrame(secWait)
		if err != nil || f.typ != frameHeader {
			t.Fatalf("after get-ok: frame type %d, %v; want a content header", f.typ, err)
		}
		size := int(binary.BigEndian.Uint64(f.payload[4:12]))
		for len(body) < size {
			f, err := c.readFrame(secWait)
			if err != nil || f.typ != frameBody {
				t.Fatalf("frame type %d, %v; want a body frame", f.typ, err)
			}
			if len(f.payload)+frameOverhead > frameMax {
				t.Fatalf("a body frame of %d octets over frame-max %d", len(f.payload)+frameOverhead, frameMax)
			}
			body = append(body, f.payload...)
		}
		return body
	}
	c := connect(t, "fm")
	body := bytes.Repeat([]byte("f"), frameMax-frameOverhead)
	c.sendMethod(1, &basicPublish{RoutingKey: "fm"})
	c.send(appendContent(nil, 1, nil, body, frameMax))
	if got := getBody(t, c, "fm"); !bytes.Equal(got, body) {
		t.Errorf("a body of exactly one frame came back as %d octets", len(got))
	}
	// A frame over the fudge RabbitMQ allows: only the frame header goes out.
	c.send([]byte{frameBody, 0, 1, 0, 0, (frameMax + 1) >> 8, (frameMax + 1) & 0xff})
	c.expectConnClose(replyFrameError, 0, 0)

	t.Run("frames up to 8 octets over frame-max", func(t *testing.T) {
		c := connect(t, "fm-fudge")
		body := bytes.Repeat([]byte("g"), frameMax)
		c.sendMethod(1, &basicPublish{RoutingKey: "fm-fudge"})
		c.send(wireFrame(frameHeader, 1, wireContentHeader(uint64(len(body)))))
		c.send(wireFrame(frameBody, 1, body))
		if got := getBody(t, c, "fm-fudge"); !bytes.Equal(got, body) {
			t.Errorf("a body frame of frame-max octets came back as %d octets", len(got))
		}
	})
	wireCheckClient(t, other)
}

// TestLimitMaxMessageSize checks Config.MaxMessageSize: a larger publish closes the channel
// with 406 and nothing else.
func TestLimitMaxMessageSize(t *testing.T) {
	t.Parallel()
	srv := secServe(t, Config{MaxMessageSize: 1000}, false)
	addr := srv.Addr().String()
	c := secConnect(t, addr, "guest", "guest", "/")
	other := secConnect(t, addr, "guest", "guest", "/")
	ch := openChannel(t, c)
	q, err := ch.QueueDeclare("sized", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	publish := func(n int) func(ch *amqp091.Channel) error {
		return func(ch *amqp091.Channel) error {
			return ch.Publish("", q.Name, false, false, amqp091.Publishing{Body: bytes.Repeat([]byte("m"), n)})
		}
	}
	secAllowed(t, "1000 octets", secTry(t, c, publish(1000)))
	secRefused(t, "1001 octets", secTry(t, c, publish(1001)), 406, "PRECONDITION_FAILED - message size 1001 is larger than configured max size 1000")
	secRefused(t, "1 MiB", secTry(t, c, publish(1<<20)), 406, "PRECONDITION_FAILED - message size 1048576 is larger than configured max size 1000")
	if n := secCount(t, ch, q.Name); n != 1 {
		t.Errorf("%d messages queued, want 1", n)
	}
	if c.IsClosed() {
		t.Error("the connection closed")
	}
	wireCheckClient(t, c)
	wireCheckClient(t, other)
}

// TestLimitHandshakeTimeout checks Config.HandshakeTimeout: a client that has not opened
// its connection in time loses its socket, at whatever step it stalls; open connections
// are not timed.
func TestLimitHandshakeTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 500 * time.Millisecond
	srv := secServe(t, Config{HandshakeTimeout: timeout}, false)
	addr := srv.Addr().String()
	other := secConnect(t, addr, "guest", "guest", "/")
	start := time.Now()
	silent := wireDial(t, addr)
	afterHeader := wireDial(t, addr)
	secStart(afterHeader)
	afterStartOk := wireHandshake(t, addr, wireOpts{}, 1)
	wireExpect[*connectionTune](afterStartOk, 0)
	afterTuneOk := wireHandshake(t, addr, wireOpts{}, 2)
	for name, c := range map[string]*wireClient{"silent": silent, "after the header": afterHeader,
		"after start-ok": afterStartOk, "after tune-ok": afterTuneOk} {
		c.expectClosed(secWait)
		if d := time.Since(start); d < timeout-50*time.Millisecond {
			t.Errorf("%s: closed after %v, before the %v timeout", name, d, timeout)
		}
	}
	// other has been open for longer than the timeout.
	wireCheckClient(t, other)
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
