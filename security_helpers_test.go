package amqp

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Helpers of the security tests (security_test.go, auth_test.go, tls_test.go): servers
// whose clients appear remote, a log to search, and logins over amqp091-go and raw frames.

// secWait bounds every wait of the security tests.
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
type secLog struct{ lockedBuffer }

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
	shutDownOnCleanup(t, srv, done)
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
