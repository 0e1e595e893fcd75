package amqp

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// The definitions file: its format (round trips, edits, errors, fuzzing), and what it
// enforces beyond users, vhosts and permissions, end to end: topic permissions, vhost
// limits from parameters, user limits, and the warning naming what is not enforced. (The
// definitions code lives in auth.go until it gets a file of its own.)

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
	if got := queueReady(t, ch, "tp-q"); got != 1 {
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
		"policies":[{"vhost":"/","name":"ttl","pattern":".*","apply-to":"queues","definition":{"message-ttl":1000,"ha-mode":"all"},"priority":0},
			{"vhost":"/","name":"ha","pattern":"^(?!amq\\.).*","apply-to":"all","definition":{"ha-mode":"all"},"priority":0}],
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
	want := "exchanges (1); feature_flags; global_parameters mqtt_port_to_vhost_mapping; queues (2); " +
		"limits of vhost 'v2' in vhosts (vhost limits are read from parameters, component vhost-limits); " +
		"limit max-sessions of vhost 'v3'; parameters of component federation-upstream (1); parameters of component shovel (2); " +
		"limit max-bananas of user 'guest'; key ha-mode of policy 'ttl' in vhost '/'; key ha-mode of policy 'ha' in vhost '/'; " +
		"key pattern \"^(?!amq\\\\.).*\" (not RE2) of policy 'ha' in vhost '/'"
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

func TestDefinitionsRoundTrip(t *testing.T) {
	for _, name := range []string{"rabbitmq-export.json", "rabbitmq-3.5-legacy.json"} {
		t.Run(name, func(t *testing.T) {
			src := filepath.Join("testdata", "definitions", name)
			orig, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			d, err := LoadDefinitions(src)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			path := filepath.Join(dir, "definitions.json")
			if err := d.Save(path); err != nil {
				t.Fatal(err)
			}
			saved, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			want, got := jsonValue(t, orig), jsonValue(t, saved)
			// Only tags change form: a comma-separated string becomes a list.
			for _, u := range want["users"].([]any) {
				u := u.(map[string]any)
				if s, ok := u["tags"].(string); ok {
					tags := []any{}
					for _, t := range strings.Split(s, ",") {
						if t = strings.TrimSpace(t); t != "" {
							tags = append(tags, t)
						}
					}
					u["tags"] = tags
				}
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("saved definitions differ from the original\n got: %v\nwant: %v", got, want)
			}
			// Saving what was loaded again gives the same bytes.
			d2, err := LoadDefinitions(path)
			if err != nil {
				t.Fatal(err)
			}
			b1, _ := d.encode()
			b2, _ := d2.encode()
			if !bytes.Equal(b1, b2) {
				t.Errorf("encode is not stable:\n%s\n%s", b1, b2)
			}
			if runtime.GOOS != "windows" {
				if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
					t.Errorf("mode %v, %v; want 0600", fi.Mode().Perm(), err)
				}
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 1 {
				t.Errorf("directory holds %d files after Save, want 1", len(entries))
			}
		})
	}
}

func TestDefinitionsSaveReplaces(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "defs.json")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := DefaultDefinitions()
	if err := d.Save(path); err != nil {
		t.Fatal(err)
	}
	got, err := LoadDefinitions(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Users) != 1 || got.Users[0].Name != "guest" || got.Users[0].PasswordHash != d.Users[0].PasswordHash {
		t.Errorf("reloaded %+v", got.Users)
	}
	if runtime.GOOS != "windows" {
		if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
			t.Errorf("mode %v after replacing a 0644 file, want 0600", fi.Mode().Perm())
		}
	}
	err = d.Save(filepath.Join(dir, "no-such-dir", "defs.json"))
	if err == nil || !strings.HasPrefix(err.Error(), "amqp: save definitions: ") {
		t.Errorf("Save into a missing directory: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory holds %d files, want 1", len(entries))
	}
}

func TestLoadDefinitionsErrors(t *testing.T) {
	_, err := LoadDefinitions(filepath.Join(t.TempDir(), "missing.json"))
	if !errors.Is(err, fs.ErrNotExist) || !strings.HasPrefix(err.Error(), "amqp: ") {
		t.Errorf("missing file: %v, want fs.ErrNotExist", err)
	}
	const user = `{"name":"u","password_hash":"","tags":[]}`
	const vhost = `{"name":"/"}`
	for _, tc := range []struct{ name, doc, want string }{
		{"not JSON", `{`, "unexpected end of JSON input"},
		{"null", `null`, "not a JSON object"},
		{"a list", `[]`, "cannot unmarshal array"},
		{"users not a list", `{"users":{}}`, "users: want a list of objects"},
		{"user not an object", `{"users":[1]}`, "users: want a list of objects"},
		{"user null", `{"users":[null]}`, "users[0]: want an object"},
		{"name not a string", `{"users":[{"name":1}]}`, "users[0]: name: want a string"},
		{"hash not a string", `{"users":[{"name":"u","password_hash":[]}]}`, "users[0]: password_hash: want a string"},
		{"tags a number", `{"users":[{"name":"u","tags":1}]}`, "users[0]: tags: want a list of strings or a comma-separated string"},
		{"tags with a number", `{"users":[{"name":"u","tags":["a",1]}]}`, "users[0]: tags: want"},
		{"password and hash", `{"users":[{"name":"u","password":"p","password_hash":"h"}]}`, "users[0]: both password and password_hash are set"},
		{"empty user name", `{"users":[{"password_hash":""}]}`, "a user has an empty name"},
		{"duplicate user", `{"users":[` + user + `,` + user + `]}`, `user "u" is defined twice`},
		{"vhost name not a string", `{"vhosts":[{"name":true}]}`, "vhosts[0]: name: want a string"},
		{"empty vhost name", `{"vhosts":[{"name":""}]}`, "a virtual host has an empty name"},
		{"duplicate vhost", `{"vhosts":[` + vhost + `,` + vhost + `]}`, `virtual host "/" is defined twice`},
		{"permission field not a string", `{"permissions":[{"user":"u","vhost":"/","read":1}]}`, "permissions[0]: read: want a string"},
		{"permission for unknown user", `{"vhosts":[` + vhost + `],"permissions":[{"user":"x","vhost":"/"}]}`,
			`permissions in virtual host "/" for user "x": no such user`},
		{"permission on unknown vhost", `{"users":[` + user + `],"permissions":[{"user":"u","vhost":"v"}]}`,
			`permissions in virtual host "v" for user "u": no such virtual host`},
		{"duplicate permission", `{"users":[` + user + `],"vhosts":[` + vhost + `],"permissions":[{"user":"u","vhost":"/"},{"user":"u","vhost":"/"}]}`,
			`permissions in virtual host "/" for user "u" are defined twice`},
		{"topic_permissions not a list", `{"topic_permissions":{}}`, "topic_permissions: want a list of objects"},
		{"topic permission field not a string", `{"topic_permissions":[{"write":1}]}`, "topic_permissions[0]: write: want a string"},
		{"topic permission for unknown user", `{"vhosts":[` + vhost + `],"topic_permissions":[{"user":"x","vhost":"/","exchange":"amq.topic"}]}`,
			`topic permissions on exchange "amq.topic" in virtual host "/" for user "x": no such user`},
		{"topic permission on unknown vhost", `{"users":[` + user + `],"topic_permissions":[{"user":"u","vhost":"v","exchange":"amq.topic"}]}`,
			`topic permissions on exchange "amq.topic" in virtual host "v" for user "u": no such virtual host`},
		{"duplicate topic permission", `{"users":[` + user + `],"vhosts":[` + vhost + `],"topic_permissions":[{"user":"u","vhost":"/","exchange":"t","write":"a"},{"user":"u","vhost":"/","exchange":"t","read":"b"}]}`,
			`topic permissions on exchange "t" in virtual host "/" for user "u" are defined twice`},
	} {
		path := filepath.Join(t.TempDir(), "defs.json")
		if err := os.WriteFile(path, []byte(tc.doc), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadDefinitions(path)
		if err == nil || !strings.HasPrefix(err.Error(), "amqp: load definitions "+path+": ") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

func TestDefinitionsDecodeLenient(t *testing.T) {
	// What RabbitMQ's import accepts: missing sections, nulls, a clear-text password.
	d, err := decodeDefinitions([]byte(`{"users":[{"name":"kolla","password":"clear-Text","tags":null},
		{"name":"nopw","password":"","tags":"a,,a, b"}],"vhosts":null,"rabbit_version":"3.12.0"}`))
	if err != nil {
		t.Fatal(err)
	}
	if u := d.Users[0]; u.HashingAlgorithm != hashingSHA256 || u.PasswordHash == "" || u.Tags != nil || u.extra != "" {
		t.Errorf("user with a clear password: %+v", u)
	}
	if u := d.Users[1]; u.PasswordHash != "" || !slices.Equal(u.Tags, []string{"a", "b"}) {
		t.Errorf("user with an empty password: %+v", u)
	}
	b, err := d.encode()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("clear-Text")) || bytes.Contains(b, []byte(`"password"`)) {
		t.Errorf("the clear-text password is written back:\n%s", b)
	}
	if !bytes.Contains(b, []byte(`"rabbit_version": "3.12.0"`)) || !bytes.Contains(b, []byte(`"vhosts": []`)) {
		t.Errorf("encoded:\n%s", b)
	}
	d.Vhosts = []VirtualHost{{Name: "/"}}
	d.Permissions = []Permission{{User: "kolla", Vhost: "/", Configure: ".*", Write: ".*", Read: ".*"}}
	db, err := newAuthDB(d, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.login("kolla", "clear-Text", remoteAddr); err != nil {
		t.Errorf("login with the imported clear-text password: %v", err)
	}
}

func TestDefinitionsEdit(t *testing.T) {
	d := DefaultDefinitions()
	mustErr := func(what string, err error, want string) {
		t.Helper()
		if err == nil || err.Error() != want {
			t.Errorf("%s: %v, want %q", what, err, want)
		}
	}
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	must("AddUser", d.AddUser("alice", "pw-a"))
	mustErr("AddUser again", d.AddUser("alice", "x"), `amqp: user "alice" already exists`)
	mustErr("AddUser guest", d.AddUser("guest", "x"), `amqp: user "guest" already exists`)
	mustErr("AddUser empty", d.AddUser("", "x"), "amqp: user name is empty")
	must("AddUser without password", d.AddUser("nopw", ""))
	must("AddVhost", d.AddVhost("prod"))
	mustErr("AddVhost again", d.AddVhost("prod"), `amqp: virtual host "prod" already exists`)
	mustErr("AddVhost empty", d.AddVhost(""), "amqp: virtual host name is empty")

	must("SetPermissions", d.SetPermissions("alice", "prod", "^alice-", "", ".*"))
	must("SetPermissions /", d.SetPermissions("alice", "/", ".*", ".*", ".*"))
	must("SetPermissions replace", d.SetPermissions("alice", "prod", "^a-", "^a-", "^a-"))
	mustErr("SetPermissions unknown user", d.SetPermissions("bob", "prod", ".*", ".*", ".*"), `amqp: user "bob" does not exist`)
	mustErr("SetPermissions unknown vhost", d.SetPermissions("alice", "dev", ".*", ".*", ".*"), `amqp: virtual host "dev" does not exist`)
	err := d.SetPermissions("alice", "prod", ".*", "(", ".*")
	if err == nil || !strings.HasPrefix(err.Error(), `amqp: invalid write regular expression "(": error parsing regexp: missing closing )`) {
		t.Errorf("bad regexp: %v", err)
	}
	// PCRE lookahead is not RE2: refused here, rather than failing when the broker loads it.
	if err := d.SetPermissions("alice", "prod", `^(?!amq\.).*`, ".*", ".*"); err == nil {
		t.Errorf("lookahead accepted")
	}
	if p := d.Permissions[d.permission("alice", "prod")]; p != (Permission{User: "alice", Vhost: "prod", Configure: "^a-", Write: "^a-", Read: "^a-"}) {
		t.Errorf("permissions after replace and failed sets: %+v", p)
	}
	if n := len(d.Permissions); n != 3 {
		t.Errorf("%d permissions, want 3", n)
	}

	must("SetUserTags", d.SetUserTags("alice", "management", " policymaker ", "management", ""))
	if got := d.Users[d.user("alice")].Tags; !slices.Equal(got, []string{"management", "policymaker"}) {
		t.Errorf("tags %q", got)
	}
	must("SetUserTags none", d.SetUserTags("alice"))
	if got := d.Users[d.user("alice")].Tags; got != nil {
		t.Errorf("tags after clearing %q", got)
	}
	mustErr("SetUserTags unknown", d.SetUserTags("bob", "x"), `amqp: user "bob" does not exist`)

	old := d.Users[d.user("alice")].PasswordHash
	must("ChangePassword", d.ChangePassword("alice", "pw-b"))
	mustErr("ChangePassword unknown", d.ChangePassword("bob", "x"), `amqp: user "bob" does not exist`)
	db, err := newAuthDB(d, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.Users[d.user("alice")].PasswordHash == old {
		t.Errorf("ChangePassword kept the hash")
	}
	if err := db.login("alice", "pw-b", remoteAddr); err != nil {
		t.Errorf("login with the new password: %v", err)
	}
	wantAMQPError(t, "old password", db.login("alice", "pw-a", remoteAddr), 403, plainRefused)
	wantAMQPError(t, "user added without a password", db.login("nopw", "", loopbackAddr), 403, plainRefused)
	must("ChangePassword to empty", d.ChangePassword("alice", ""))
	if h := d.Users[d.user("alice")].PasswordHash; h != "" {
		t.Errorf("hash after clearing the password: %q", h)
	}

	must("ClearPermissions", d.ClearPermissions("alice", "/"))
	must("ClearPermissions again", d.ClearPermissions("alice", "/"))
	mustErr("ClearPermissions unknown user", d.ClearPermissions("bob", "/"), `amqp: user "bob" does not exist`)
	mustErr("ClearPermissions unknown vhost", d.ClearPermissions("alice", "dev"), `amqp: virtual host "dev" does not exist`)
	if d.permission("alice", "/") >= 0 || d.permission("alice", "prod") < 0 {
		t.Errorf("permissions after ClearPermissions: %+v", d.Permissions)
	}

	must("SetPermissions guest prod", d.SetPermissions("guest", "prod", ".*", ".*", ".*"))
	must("DeleteVhost", d.DeleteVhost("prod"))
	mustErr("DeleteVhost again", d.DeleteVhost("prod"), `amqp: virtual host "prod" does not exist`)
	if len(d.Permissions) != 1 || d.Permissions[0].User != "guest" || d.Permissions[0].Vhost != "/" {
		t.Errorf("permissions after DeleteVhost: %+v", d.Permissions)
	}
	must("DeleteUser", d.DeleteUser("guest"))
	mustErr("DeleteUser again", d.DeleteUser("guest"), `amqp: user "guest" does not exist`)
	if len(d.Permissions) != 0 || d.user("alice") < 0 || d.user("guest") >= 0 {
		t.Errorf("after DeleteUser: users %+v, permissions %+v", d.Users, d.Permissions)
	}
	if err := d.check(); err != nil {
		t.Errorf("edited definitions are inconsistent: %v", err)
	}
}

func TestDefinitionsLimits(t *testing.T) {
	d, err := decodeDefinitions([]byte(`{"users":[{"name":"a","password":"p","limits":{"max-connections":3,"max-channels":-7}},
			{"name":"b","password":"p","limits":{}},{"name":"c","password":"p"}],
		"vhosts":[{"name":"/","limits":[]},{"name":"v","limits":{"max-connections":1}}],
		"parameters":[{"vhost":"v","component":"vhost-limits","name":"limits","value":{"max-connections":2,"max-queues":0}},
			{"vhost":"/","component":"vhost-limits","name":"other","value":{"max-queues":1}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	db, err := newAuthDB(d, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		what      string
		got, want limits
	}{
		{"user a", db.userLimit("a"), limits{maxConnections: 3, maxQueues: -1, maxChannels: -1}},
		{"user b", db.userLimit("b"), noLimits},
		{"user c", db.userLimit("c"), noLimits},
		{"unknown user", db.userLimit("x"), noLimits},
		{"vhost v (the parameter, not the vhost's own limits)", db.vhostLimit("v"), limits{maxConnections: 2, maxQueues: 0, maxChannels: -1}},
		{"vhost / (a vhost-limits parameter not named limits)", db.vhostLimit("/"), noLimits},
		{"unknown vhost", db.vhostLimit("x"), noLimits},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %+v, want %+v", tc.what, tc.got, tc.want)
		}
	}
	if want := []string{"parameters of component vhost-limits (1)"}; !slices.Equal(db.ignored, want) {
		t.Errorf("ignored %q, want %q", db.ignored, want)
	}
	for _, tc := range []struct{ config, defs, want int }{
		{0, -1, -1}, {0, 0, 0}, {0, 5, 5}, {3, -1, 3}, {3, 5, 3}, {5, 3, 3}, {5, 0, 0}, {-2, 4, 4},
	} {
		if got := stricterLimit(tc.config, tc.defs); got != tc.want {
			t.Errorf("stricterLimit(%d, %d) = %d, want %d", tc.config, tc.defs, got, tc.want)
		}
	}
}

// TestDefinitionsDeletePrunes checks that deleting a user drops their topic permissions and
// deleting a vhost drops every entry of the verbatim sections naming it, leaving the others
// as they were, so the file still loads.
func TestDefinitionsDeletePrunes(t *testing.T) {
	d, err := decodeDefinitions([]byte(`{"users":[{"name":"u","password":"p"},{"name":"w","password":"p"}],
		"vhosts":[{"name":"/"},{"name":"v"}],
		"topic_permissions":[{"user":"u","vhost":"/","exchange":"t"},{"user":"w","vhost":"/","exchange":"t","write":"<&>"},
			{"user":"w","vhost":"v","exchange":"t"}],
		"parameters":[{"vhost":"v","component":"vhost-limits","name":"limits","value":{"max-queues":1}},
			{"vhost":"/","component":"shovel","name":"s","value":{"n":12345678901234567890}}],
		"policies":[{"vhost":"v","name":"p"}],
		"queues":[{"vhost":"v","name":"q"},{"vhost":"/","name":"q"}],
		"global_parameters":[{"name":"cluster_name","value":"v"}],
		"rabbit_version":"v"}`))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteUser("u"); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteVhost("v"); err != nil {
		t.Fatal(err)
	}
	b, err := d.encode()
	if err != nil {
		t.Fatal(err)
	}
	d2, err := decodeDefinitions(b)
	if err != nil {
		t.Fatalf("%v\n%s", err, b)
	}
	if _, err := newAuthDB(d2, nil); err != nil {
		t.Fatalf("after the deletes: %v", err)
	}
	want := map[string]string{
		"topic_permissions": `[{"user":"w","vhost":"/","exchange":"t","write":"<&>"}]`,
		"parameters":        `[{"vhost":"/","component":"shovel","name":"s","value":{"n":12345678901234567890}}]`,
		"policies":          `[]`,
		"queues":            `[{"vhost":"/","name":"q"}]`,
		"global_parameters": `[{"name":"cluster_name","value":"v"}]`,
		"rabbit_version":    `"v"`,
	}
	for key, w := range want {
		var got, exp any
		json.Unmarshal(d2.sections[key], &got)
		json.Unmarshal([]byte(w), &exp)
		if !reflect.DeepEqual(got, exp) {
			t.Errorf("%s: %s, want %s", key, d2.sections[key], w)
		}
	}
	if !bytes.Contains(b, []byte("12345678901234567890")) || bytes.Contains(b, []byte(`\u003c`)) {
		t.Errorf("a kept entry changed:\n%s", b)
	}
}

func FuzzDefinitions(f *testing.F) {
	for _, name := range []string{"rabbitmq-export.json", "rabbitmq-3.5-legacy.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", "definitions", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"users":[{"name":"u","tags":"a,b"}],"vhosts":[{"name":"/"}],"permissions":[{"user":"u","vhost":"/","read":"("}]}`))
	f.Add([]byte(`{"users":[{"name":"u","password":"p"}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := decodeDefinitions(b)
		if err != nil {
			return
		}
		enc, err := d.encode()
		if err != nil {
			t.Fatalf("encode: %v", err)
		}
		d2, err := decodeDefinitions(enc)
		if err != nil {
			t.Fatalf("re-decode: %v\n%s", err, enc)
		}
		enc2, err := d2.encode()
		if err != nil || !bytes.Equal(enc, enc2) {
			t.Fatalf("encode not stable: %v\n%s\n%s", err, enc, enc2)
		}
		if db, err := newAuthDB(d, nil); err == nil {
			for _, u := range d.Users {
				db.login(u.Name, "guest", loopbackAddr)
				for _, v := range d.Vhosts {
					db.vhostAccess(u.Name, v.Name)
					db.check(u.Name, v.Name, permRead, resExchange, "")
				}
			}
		}
	})
}
