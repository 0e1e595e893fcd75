package amqp

import (
	"bufio"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// What a definitions file enforces beyond users, vhosts and permissions, end to end:
// topic permissions, vhost limits from parameters, user limits, and the warning naming
// what is not enforced. (The definitions code lives in auth.go; security_test.go, whose
// helpers these tests use, has no room left.)

// defsWrite writes a definitions document to path; users may give a clear-text
// "password", as RabbitMQ's import allows.
func defsWrite(t testing.TB, path, doc string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
}

// defsReload reloads srv, failing the test on error.
func defsReload(t testing.TB, srv *Server) {
	t.Helper()
	if err := srv.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
}

// topicDenied is RabbitMQ's text for a refused topic permission check.
func topicDenied(perm, key, exchange, vhost, user string) string {
	return "ACCESS_REFUSED - " + perm + " access to topic '" + key + "' in exchange '" + exchange + "' in vhost '" + vhost + "' refused for user '" + user + "'"
}

// TestTopicPermissions checks topic_permissions as RabbitMQ applies them: write on the
// routing key of a publish and read on the binding key of queue.bind, queue.unbind and
// exchange.bind from a topic exchange, with {username} expanded per user; no check at
// other exchange types or at topic exchanges without a topic permission; Reload applies
// new rules to open channels, and a bad rule does not load.
func TestTopicPermissions(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "definitions.json")
	defs := func(tpWrite string) {
		t.Helper()
		defsWrite(t, path, `{"users":[{"name":"tp","password":"tp-pw"},{"name":"tq","password":"tq-pw"}],
			"vhosts":[{"name":"/"}],
			"permissions":[{"user":"tp","vhost":"/","configure":".*","write":".*","read":".*"},
				{"user":"tq","vhost":"/","configure":".*","write":".*","read":".*"}],
			"topic_permissions":[
				{"user":"tp","vhost":"/","exchange":"amq.topic","write":`+tpWrite+`,"read":"^{username}\\.|^shared$"},
				{"user":"tq","vhost":"/","exchange":"amq.topic","write":"^{username}\\.","read":"^{username}\\."},
				{"user":"tp","vhost":"/","exchange":"amq.direct","write":"^$","read":"^$"}]}`)
	}
	defs(`"^{username}\\."`)
	srv := secServe(t, Config{Definitions: path}, false)
	addr := srv.Addr().String()
	tp := secConnect(t, addr, "tp", "tp-pw", "/")
	tq := secConnect(t, addr, "tq", "tq-pw", "/")
	publish := func(c *amqp091.Connection, exchange, key string) *amqp091.Error {
		return secTry(t, c, func(ch *amqp091.Channel) error {
			return ch.Publish(exchange, key, false, false, amqp091.Publishing{Body: []byte(key)})
		})
	}
	bind := func(c *amqp091.Connection, queue, exchange, key string) *amqp091.Error {
		return secTry(t, c, func(ch *amqp091.Channel) error { return ch.QueueBind(queue, key, exchange, false, nil) })
	}

	// Write: {username} expands to each user's own name.
	secAllowed(t, "declare tp-q", secTry(t, tp, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclare("tp-q", false, false, false, false, nil)
		return err
	}))
	secAllowed(t, "bind tp-q with tp.#", bind(tp, "tp-q", "amq.topic", "tp.#"))
	secAllowed(t, "tp publishes tp.a", publish(tp, "amq.topic", "tp.a"))
	secRefused(t, "tp publishes tq.a", publish(tp, "amq.topic", "tq.a"), 403, topicDenied("write", "tq.a", "amq.topic", "/", "tp"))
	secRefused(t, "tp publishes x.tp.a", publish(tp, "amq.topic", "x.tp.a"), 403, topicDenied("write", "x.tp.a", "amq.topic", "/", "tp"))
	secAllowed(t, "tq publishes tq.a", publish(tq, "amq.topic", "tq.a"))
	secRefused(t, "tq publishes tp.a", publish(tq, "amq.topic", "tp.a"), 403, topicDenied("write", "tp.a", "amq.topic", "/", "tq"))
	secRefused(t, "tp publishes tq.a in a transaction", secTry(t, tp, func(ch *amqp091.Channel) error {
		if err := ch.Tx(); err != nil {
			return err
		}
		if err := ch.Publish("amq.topic", "tq.a", false, false, amqp091.Publishing{}); err != nil {
			return err
		}
		return ch.TxCommit()
	}), 403, topicDenied("write", "tq.a", "amq.topic", "/", "tp"))
	ch := openChannel(t, tp)
	if got := secCount(t, ch, "tp-q"); got != 1 {
		t.Errorf("tp-q holds %d messages, want the one allowed publish", got)
	}

	// Read: binding keys at a topic source, for queue.bind, queue.unbind and exchange.bind.
	secAllowed(t, "bind tp-q with shared", bind(tp, "tp-q", "amq.topic", "shared"))
	secRefused(t, "bind tp-q with #", bind(tp, "tp-q", "amq.topic", "#"), 403, topicDenied("read", "#", "amq.topic", "/", "tp"))
	secRefused(t, "unbind tp-q with #", secTry(t, tp, func(ch *amqp091.Channel) error {
		return ch.QueueUnbind("tp-q", "#", "amq.topic", nil)
	}), 403, topicDenied("read", "#", "amq.topic", "/", "tp"))
	secAllowed(t, "unbind tp-q with shared", secTry(t, tp, func(ch *amqp091.Channel) error {
		return ch.QueueUnbind("tp-q", "shared", "amq.topic", nil)
	}))
	secAllowed(t, "declare tp-fan", secTry(t, tp, func(ch *amqp091.Channel) error {
		return ch.ExchangeDeclare("tp-fan", "fanout", false, false, false, false, nil)
	}))
	xbind := func(c *amqp091.Connection, dst, key, src string) *amqp091.Error {
		return secTry(t, c, func(ch *amqp091.Channel) error { return ch.ExchangeBind(dst, key, src, false, nil) })
	}
	secRefused(t, "exchange.bind from amq.topic with #", xbind(tp, "tp-fan", "#", "amq.topic"), 403, topicDenied("read", "#", "amq.topic", "/", "tp"))
	secAllowed(t, "exchange.bind from amq.topic with tp.x", xbind(tp, "tp-fan", "tp.x", "amq.topic"))
	secRefused(t, "tq binds tp-q with tp.#", bind(tq, "tp-q", "amq.topic", "tp.#"), 403, topicDenied("read", "tp.#", "amq.topic", "/", "tq"))

	// Only topic exchanges are checked (tp's rule on amq.direct never applies), and only
	// those the user has a topic permission for.
	secAllowed(t, "tp publishes to amq.direct", publish(tp, "amq.direct", "anything"))
	secAllowed(t, "tp binds tp-q to amq.direct", bind(tp, "tp-q", "amq.direct", "anything"))
	secAllowed(t, "exchange.bind from amq.direct", xbind(tp, "tp-fan", "anything", "amq.direct"))
	secAllowed(t, "declare tp-topic", secTry(t, tp, func(ch *amqp091.Channel) error {
		return ch.ExchangeDeclare("tp-topic", "topic", false, false, false, false, nil)
	}))
	secAllowed(t, "tp publishes to tp-topic", publish(tp, "tp-topic", "anything"))
	secAllowed(t, "tp binds to tp-topic", bind(tp, "tp-q", "tp-topic", "#"))

	// Reload: a channel that has published applies the new rule to its next publish.
	pub := openChannel(t, tp)
	if err := pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := pub.NotifyPublish(make(chan amqp091.Confirmation, 1))
	pubClosed := pub.NotifyClose(make(chan *amqp091.Error, 1))
	if err := pub.Publish("amq.topic", "tp.b", false, false, amqp091.Publishing{}); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-confirms:
		if !c.Ack {
			t.Fatal("publish of tp.b nacked")
		}
	case e := <-pubClosed:
		t.Fatalf("publish of tp.b refused: %v", e)
	case <-time.After(secWait):
		t.Fatal("no confirm for tp.b")
	}
	defs(`"^zz\\."`)
	defsReload(t, srv)
	if err := pub.Publish("amq.topic", "tp.b", false, false, amqp091.Publishing{}); err != nil {
		t.Fatal(err)
	}
	awaitCloseCode(t, pubClosed, 403)
	secAllowed(t, "tp publishes zz.1 after reload", publish(tp, "amq.topic", "zz.1"))

	// A rule that is not a regular expression fails the reload and changes nothing.
	defs(`"("`)
	if err := srv.Reload(); err == nil || !strings.Contains(err.Error(), `topic permissions on exchange "amq.topic" in virtual host "/" for user "tp": invalid write regular expression "("`) {
		t.Errorf("Reload with a bad topic permission: %v", err)
	}
	secAllowed(t, "tp publishes zz.1 after a failed reload", publish(tp, "amq.topic", "zz.1"))
	secRefused(t, "tp publishes tp.a after a failed reload", publish(tp, "amq.topic", "tp.a"), 403, topicDenied("write", "tp.a", "amq.topic", "/", "tp"))
}

// TestVhostLimitsFromDefinitions checks vhost limits from the parameters section
// (component vhost-limits, as RabbitMQ exports them): max-connections at connection.open
// (530) and max-queues at queue.declare (406), the stricter of them and Config's applying,
// 0 allowing none and a negative value none at all; Reload applies new limits.
func TestVhostLimitsFromDefinitions(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "definitions.json")
	defs := func(rootLimits string) {
		t.Helper()
		defsWrite(t, path, `{"users":[{"name":"guest","password":"guest"}],
			"vhosts":[{"name":"/"},{"name":"none"},{"name":"loose"}],
			"permissions":[{"user":"guest","vhost":"/","configure":".*","write":".*","read":".*"},
				{"user":"guest","vhost":"none","configure":".*","write":".*","read":".*"},
				{"user":"guest","vhost":"loose","configure":".*","write":".*","read":".*"}],
			"parameters":[
				{"vhost":"/","component":"vhost-limits","name":"limits","value":`+rootLimits+`},
				{"vhost":"none","component":"vhost-limits","name":"limits","value":{"max-connections":0}},
				{"vhost":"loose","component":"vhost-limits","name":"limits","value":{"max-connections":-1,"max-queues":-1}}]}`)
	}
	defs(`{"max-connections":2,"max-queues":2}`)
	srv := secServe(t, Config{Definitions: path, MaxConnectionsPerVhost: 3, MaxQueuesPerVhost: 3}, false)
	addr := srv.Addr().String()
	connRefused := func(vhost string, limit string) {
		t.Helper()
		secRefusedClose(wireHandshake(t, addr, wireOpts{vhost: vhost}, 3), replyNotAllowed,
			"NOT_ALLOWED - access to vhost '"+vhost+"' refused for user 'guest': connection limit ("+limit+") is reached", 10, 40)
	}
	declare := func(c *amqp091.Connection, name string) *amqp091.Error {
		return secTry(t, c, func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(name, false, false, false, false, nil)
			return err
		})
	}

	root := secConnect(t, addr, "guest", "guest", "/")
	secConnect(t, addr, "guest", "guest", "/")
	connRefused("/", "2") // the file's 2, stricter than Config's 3
	connRefused("none", "0")
	var loose *amqp091.Connection
	for range 3 {
		loose = secConnect(t, addr, "guest", "guest", "loose") // no limit in the file: Config's 3
	}
	connRefused("loose", "3")

	for _, q := range []string{"q1", "q2"} {
		secAllowed(t, "declare "+q, declare(root, q))
	}
	secRefused(t, "declare q3", declare(root, "q3"), 406, "PRECONDITION_FAILED - cannot declare queue 'q3': queue limit in vhost '/' (2) is reached")
	secAllowed(t, "redeclare q1", declare(root, "q1"))
	for _, q := range []string{"q1", "q2", "q3"} {
		secAllowed(t, "declare "+q+" in loose", declare(loose, q))
	}
	secRefused(t, "declare q4 in loose", declare(loose, "q4"), 406, "PRECONDITION_FAILED - cannot declare queue 'q4': queue limit in vhost 'loose' (3) is reached")

	// Reload: higher limits in the file; Config's 3 is now the stricter.
	defs(`{"max-connections":10,"max-queues":10}`)
	defsReload(t, srv)
	secConnect(t, addr, "guest", "guest", "/")
	connRefused("/", "3")
	secAllowed(t, "declare q3 after reload", declare(root, "q3"))
	secRefused(t, "declare q4 after reload", declare(root, "q4"), 406, "PRECONDITION_FAILED - cannot declare queue 'q4': queue limit in vhost '/' (3) is reached")
	// And lower ones: what is open stays open, as in RabbitMQ; nothing new gets in.
	defs(`{"max-connections":1,"max-queues":0}`)
	defsReload(t, srv)
	connRefused("/", "1")
	secRefused(t, "declare q5 with max-queues 0", declare(root, "q5"), 406, "PRECONDITION_FAILED - cannot declare queue 'q5': queue limit in vhost '/' (0) is reached")
	secAllowed(t, "redeclare q1 with max-queues 0", declare(root, "q1"))
}

// TestUserLimitsFromDefinitions checks a user's limits ("limits" in the user object, as
// RabbitMQ exports them): max-connections at connection.open (530) and max-channels, which
// counts channels across all the user's connections, at channel.open (530, closing the
// connection); a closed channel or connection frees its slot; Reload applies new limits.
func TestUserLimitsFromDefinitions(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "definitions.json")
	defs := func(limLimits string) {
		t.Helper()
		defsWrite(t, path, `{"users":[{"name":"lim","password":"lim-pw","limits":`+limLimits+`},
				{"name":"zero","password":"zero-pw","limits":{"max-connections":0}},
				{"name":"free","password":"free-pw","limits":{"max-connections":-1,"max-channels":-1}}],
			"vhosts":[{"name":"/"}],
			"permissions":[{"user":"lim","vhost":"/","configure":".*","write":".*","read":".*"},
				{"user":"zero","vhost":"/","configure":".*","write":".*","read":".*"},
				{"user":"free","vhost":"/","configure":".*","write":".*","read":".*"}]}`)
	}
	defs(`{"max-connections":2,"max-channels":3}`)
	srv := secServe(t, Config{Definitions: path}, false)
	addr := srv.Addr().String()
	connRefused := func(user, limit string) {
		t.Helper()
		secRefusedClose(wireHandshake(t, addr, wireOpts{response: "\x00" + user + "\x00" + user + "-pw"}, 3), replyNotAllowed,
			"NOT_ALLOWED - Connection refused for user '"+user+"': user connection limit ("+limit+") is reached", 10, 40)
	}
	channel := func(c *amqp091.Connection) *amqp091.Channel {
		t.Helper()
		ch, err := c.Channel()
		if err != nil {
			t.Fatalf("channel: %v", err)
		}
		return ch
	}

	c1 := secConnect(t, addr, "lim", "lim-pw", "/")
	c2 := secConnect(t, addr, "lim", "lim-pw", "/")
	connRefused("lim", "2")
	connRefused("zero", "0")
	for range 3 {
		secConnect(t, addr, "free", "free-pw", "/")
	}

	// Three channels in all, whatever the connection.
	channel(c1)
	ch2 := channel(c1)
	channel(c2)
	c2Closed := c2.NotifyClose(make(chan *amqp091.Error, 1))
	_, err := c2.Channel()
	var e *amqp091.Error
	if !errors.As(err, &e) || e.Code != replyNotAllowed ||
		e.Reason != "NOT_ALLOWED - number of channels opened for user 'lim' has reached the maximum allowed user limit of (3)" {
		t.Fatalf("a fourth channel of lim: %v, want 530 and RabbitMQ's text", err)
	}
	awaitCloseCode(t, c2Closed, replyNotAllowed)
	// A closed channel frees its slot; so does a closed connection, for channels and logins.
	if err := ch2.Close(); err != nil {
		t.Fatal(err)
	}
	last := channel(c1)
	var c3 *amqp091.Connection
	pollFor(t, "lim's second connection slot", func() bool {
		c, err := secDial(addr, "lim", "lim-pw", "/")
		c3 = c
		return err == nil
	})
	t.Cleanup(func() { c3.Close() })
	channel(c3)
	if err := last.ExchangeDeclarePassive("amq.direct", "direct", false, false, false, false, nil); err != nil {
		t.Fatalf("lim's first connection after the refusal on the second: %v", err)
	}

	// Reload: a third connection is allowed, and no more channels at all.
	defs(`{"max-connections":3,"max-channels":0}`)
	defsReload(t, srv)
	c4 := secConnect(t, addr, "lim", "lim-pw", "/")
	connRefused("lim", "3")
	c4Closed := c4.NotifyClose(make(chan *amqp091.Error, 1))
	if _, err := c4.Channel(); !errors.As(err, &e) || e.Code != replyNotAllowed ||
		e.Reason != "NOT_ALLOWED - number of channels opened for user 'lim' has reached the maximum allowed user limit of (0)" {
		t.Fatalf("a channel of lim with max-channels 0: %v", err)
	}
	awaitCloseCode(t, c4Closed, replyNotAllowed)
}

// TestDefinitionsLoadWarning checks that what a definitions file holds and the broker does
// not enforce is named in one warning at each load, and that a RabbitMQ export with
// nothing but users, vhosts and permissions (its other sections empty) gets none.
func TestDefinitionsLoadWarning(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "definitions.json")
	defsWrite(t, path, `{"rabbit_version":"3.13.7","rabbitmq_version":"3.13.7",
		"users":[{"name":"guest","password":"guest","tags":["administrator"],"limits":{"max-connections":5,"max-bananas":1}}],
		"vhosts":[{"name":"/","limits":[],"metadata":{"description":"Default virtual host","tags":[]}},
			{"name":"v2","limits":{"max-queues":1}},{"name":"v3","limits":{"max-queues":1}}],
		"permissions":[{"user":"guest","vhost":"/","configure":".*","write":".*","read":".*"}],
		"topic_permissions":[{"user":"guest","vhost":"/","exchange":"amq.topic","write":".*","read":".*"}],
		"parameters":[{"vhost":"/","component":"federation-upstream","name":"up","value":{"uri":"amqp://x"}},
			{"vhost":"v2","component":"shovel","name":"s1","value":{}},
			{"vhost":"/","component":"shovel","name":"s2","value":{}},
			{"vhost":"v3","component":"vhost-limits","name":"limits","value":{"max-queues":1,"max-sessions":2}}],
		"global_parameters":[{"name":"cluster_name","value":"rabbit@old"},{"name":"internal_cluster_id","value":"x"},
			{"name":"mqtt_port_to_vhost_mapping","value":{}}],
		"policies":[{"vhost":"/","name":"ttl","pattern":".*","apply-to":"queues","definition":{"message-ttl":1000},"priority":0}],
		"queues":[{"name":"a","vhost":"/","durable":true},{"name":"b","vhost":"/","durable":true}],
		"exchanges":[{"name":"x","vhost":"/","type":"topic"}],
		"bindings":[],
		"feature_flags":{"quorum_queue":"enabled"}}`)
	log := &secLog{}
	srv := secServe(t, Config{Definitions: path, Logger: log.logger()}, false)
	warnings := func() []string {
		var got []string
		sc := bufio.NewScanner(strings.NewReader(log.String()))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			var rec map[string]any
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec["msg"] == "definitions: not enforced, ignored" {
				if rec["level"] != "WARN" || rec["file"] != path {
					t.Errorf("warning record %v", rec)
				}
				s, _ := rec["ignored"].(string)
				got = append(got, s)
			}
		}
		return got
	}
	got := warnings()
	if len(got) != 1 {
		t.Fatalf("%d warnings at load, want 1:\n%s", len(got), log)
	}
	want := "exchanges (1); feature_flags; global_parameters mqtt_port_to_vhost_mapping; policies (1); queues (2); " +
		"limits of vhost 'v2' in vhosts (vhost limits are read from parameters, component vhost-limits); " +
		"limit max-sessions of vhost 'v3'; parameters of component federation-upstream (1); parameters of component shovel (2); " +
		"limit max-bananas of user 'guest'"
	if got[0] != want {
		t.Errorf("warning lists\n %q\nwant\n %q", got[0], want)
	}
	defsReload(t, srv)
	if got := warnings(); len(got) != 2 {
		t.Errorf("%d warnings after a reload, want 2", len(got))
	}

	// A RabbitMQ export whose other sections are empty: nothing to warn about.
	quiet := &secLog{}
	secServe(t, Config{Definitions: filepath.Join("testdata", "definitions", "rabbitmq-export.json"), Logger: quiet.logger()}, false)
	if strings.Contains(quiet.String(), "not enforced") {
		t.Errorf("a warning for an export with nothing ignored:\n%s", quiet)
	}
}
