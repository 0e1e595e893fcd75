package amqp

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// apiBroker is a broker with its management API served on 127.0.0.1.
type apiBroker struct {
	t    *testing.T
	srv  *Server
	url  string // AMQP
	http string // base URL of the API
	defs string // the definitions file
}

// startAPIBroker starts a broker whose definitions file holds, besides guest, the users
// edit adds.
func startAPIBroker(t *testing.T, edit func(d *Definitions) error) *apiBroker {
	t.Helper()
	path := filepath.Join(t.TempDir(), "definitions.json")
	secSaveDefs(t, path, edit)
	srv, url := newTestServer(t, Config{Definitions: path})
	hs := httptest.NewServer(srv.ManagementHandler())
	t.Cleanup(hs.Close)
	return &apiBroker{t: t, srv: srv, url: url, http: hs.URL, defs: path}
}

// do sends a request as user (password "pw", or guest's) and returns the status and the
// decoded JSON answer (nil if none).
func (b *apiBroker) do(method, path, user string, body any, header ...string) (int, any) {
	b.t.Helper()
	var rd io.Reader
	switch v := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(v)
	default:
		j, _ := json.Marshal(v)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, b.http+path, rd)
	if err != nil {
		b.t.Fatal(err)
	}
	if user != "" {
		pw := "pw"
		if user == "guest" {
			pw = "guest"
		}
		req.SetBasicAuth(user, pw)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		b.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var v any
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &v); err != nil {
			b.t.Fatalf("%s %s: %d, not JSON: %q", method, path, resp.StatusCode, raw)
		}
	}
	return resp.StatusCode, v
}

// must is do that requires the status want.
func (b *apiBroker) must(want int, method, path, user string, body any) any {
	b.t.Helper()
	st, v := b.do(method, path, user, body)
	if st != want {
		b.t.Fatalf("%s %s as %s: %d %v, want %d", method, path, user, st, v, want)
	}
	return v
}

func field(v any, path string) any {
	m, _ := v.(map[string]any)
	return pick(m, path)
}

func addUser(name string, tags ...string) func(d *Definitions) error {
	return func(d *Definitions) error {
		if err := d.AddUser(name, "pw"); err != nil {
			return err
		}
		return d.SetUserTags(name, tags...)
	}
}

func allEdits(edits ...func(d *Definitions) error) func(d *Definitions) error {
	return func(d *Definitions) error {
		for _, e := range edits {
			if err := e(d); err != nil {
				return err
			}
		}
		return nil
	}
}

// TestAPIQueuesAndOverview checks a queue made over AMQP in the API: its depth, unacked
// count, consumers and message stats, and the overview's totals and fixed fields.
func TestAPIQueuesAndOverview(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	ch := openChannel(t, dial(t, b.url))
	declareTransientQueue(t, ch, "work")
	publishN(t, ch, "work", 3)
	pollFor(t, "three messages", func() bool { return queueReady(t, ch, "work") == 3 })
	d, ok, err := ch.Get("work", false)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	q := b.must(200, "GET", "/api/queues/%2F/work", "guest", nil)
	for k, want := range map[string]any{"name": "work", "vhost": "/", "messages_ready": 2.0, "messages_unacknowledged": 1.0,
		"messages": 3.0, "consumers": 0.0, "durable": false, "message_stats.publish": 3.0, "message_stats.deliver_get": 1.0,
		"message_bytes_ready": 5.0, "type": "classic", "state": "running"} {
		if got := field(q, k); got != want {
			t.Errorf("queue %s = %v, want %v", k, got, want)
		}
	}
	if field(q, "idle_since") == nil {
		t.Error("a queue without consumers has no idle_since")
	}
	d.Ack(false)
	list := b.must(200, "GET", "/api/queues?page=1&page_size=10&name=wor", "guest", nil)
	if field(list, "total_count") != 1.0 || field(list, "filtered_count") != 1.0 || len(field(list, "items").([]any)) != 1 {
		t.Errorf("paged list %v", list)
	}
	cols := b.must(200, "GET", "/api/queues/%2F?columns=name,message_stats.publish", "guest", nil).([]any)
	if len(cols) != 1 || len(cols[0].(map[string]any)) != 2 || field(cols[0], "message_stats.publish") != 3.0 {
		t.Errorf("columns %v", cols)
	}
	o := b.must(200, "GET", "/api/overview", "guest", nil)
	for _, k := range []string{"rabbitmq_version", "product_name", "cluster_name", "node", "listeners", "exchange_types",
		"message_stats.publish_details.rate", "queue_totals.messages", "object_totals.queues", "object_totals.connections"} {
		if field(o, k) == nil {
			t.Errorf("overview lacks %s: %v", k, o)
		}
	}
	if field(o, "object_totals.queues") != 1.0 || field(o, "queue_totals.messages_ready") != 2.0 {
		t.Errorf("overview totals %v %v", field(o, "object_totals"), field(o, "queue_totals"))
	}
}

// TestAPIDeclarePublishGet declares, binds, publishes, gets and deletes through the API,
// and checks RabbitMQ's answers: 201 then 204, routed, the four ackmodes, 404 after delete.
func TestAPIDeclarePublishGet(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	b.must(201, "PUT", "/api/queues/%2F/api-q", "guest", map[string]any{"durable": "false", "arguments": map[string]any{"x-max-length": 10}})
	b.must(204, "PUT", "/api/queues/%2F/api-q", "guest", map[string]any{"durable": false, "arguments": map[string]any{"x-max-length": 10}})
	st, v := b.do("PUT", "/api/queues/%2F/api-q", "guest", map[string]any{"durable": true})
	if st != 400 || !strings.Contains(field(v, "reason").(string), "inequivalent arg 'durable'") {
		t.Errorf("inequivalent redeclare: %d %v", st, v)
	}
	b.must(201, "PUT", "/api/exchanges/%2F/api-x", "guest", map[string]any{"type": "direct", "durable": false})
	b.must(201, "POST", "/api/bindings/%2F/e/api-x/q/api-q", "guest", map[string]any{"routing_key": "k"})
	bs := b.must(200, "GET", "/api/bindings/%2F/e/api-x/q/api-q", "guest", nil).([]any)
	if len(bs) != 1 || field(bs[0], "properties_key") != "k" {
		t.Fatalf("bindings %v", bs)
	}
	pub := func(key, payload string) any {
		return b.must(200, "POST", "/api/exchanges/%2F/api-x/publish", "guest", map[string]any{
			"routing_key": key, "payload": payload, "payload_encoding": "string",
			"properties": map[string]any{"delivery_mode": 2, "headers": map[string]any{"h": "v"}}})
	}
	if r := pub("k", "one"); field(r, "routed") != true {
		t.Errorf("publish to k: %v", r)
	}
	if r := pub("nowhere", "lost"); field(r, "routed") != false {
		t.Errorf("unroutable publish: %v", r)
	}
	pub("k", "two")
	msgs := b.must(200, "POST", "/api/queues/%2F/api-q/get", "guest", map[string]any{"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto"}).([]any)
	if len(msgs) != 2 || field(msgs[0], "payload") != "one" || field(msgs[0], "properties.headers.h") != "v" ||
		field(msgs[0], "routing_key") != "k" || field(msgs[0], "properties.delivery_mode") != 2.0 {
		t.Fatalf("get requeue: %v", msgs)
	}
	msgs = b.must(200, "POST", "/api/queues/%2F/api-q/get", "guest", map[string]any{"count": 1, "ackmode": "ack_requeue_false", "encoding": "base64"}).([]any)
	if len(msgs) != 1 || field(msgs[0], "payload") != "b25l" || field(msgs[0], "redelivered") != true {
		t.Fatalf("get ack: %v", msgs)
	}
	peek := b.must(200, "GET", "/api/queues/%2F/api-q/peek?count=5", "guest", nil).([]any)
	if len(peek) != 1 || field(peek[0], "payload") != "two" {
		t.Errorf("peek: %v", peek)
	}
	if q := b.must(200, "GET", "/api/queues/%2F/api-q", "guest", nil); field(q, "messages") != 1.0 {
		t.Errorf("after get: %v messages, want 1 (peek takes nothing)", field(q, "messages"))
	}
	b.must(204, "DELETE", "/api/bindings/%2F/e/api-x/q/api-q/k", "guest", nil)
	if r := pub("k", "three"); field(r, "routed") != false {
		t.Errorf("publish after unbind: %v", r)
	}
	b.must(204, "DELETE", "/api/queues/%2F/api-q/contents", "guest", nil)
	b.must(204, "DELETE", "/api/queues/%2F/api-q", "guest", nil)
	b.must(404, "GET", "/api/queues/%2F/api-q", "guest", nil)
	b.must(204, "DELETE", "/api/exchanges/%2F/api-x", "guest", nil)
	b.must(404, "GET", "/api/exchanges/%2F/api-x", "guest", nil)
	if x := b.must(200, "GET", "/api/exchanges/%2F/amq.default", "guest", nil); field(x, "type") != "direct" {
		t.Errorf("amq.default: %v", x)
	}
}

// TestAPIAuthorisation checks the tags: no credentials, a wrong password and a user
// without a management tag get 401; management users see only the vhosts they have
// permissions on and their own connections; administrator-only paths refuse others.
func TestAPIAuthorisation(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, allEdits(addUser("mgmt", "management"), addUser("mon", "monitoring"), addUser("plain"),
		func(d *Definitions) error { return d.AddVhost("private") },
		func(d *Definitions) error { return d.SetPermissions("mgmt", "/", ".*", ".*", ".*") },
		func(d *Definitions) error { return d.SetPermissions("guest", "private", ".*", ".*", ".*") }))
	if st, v := b.do("GET", "/api/overview", "", nil); st != 401 || field(v, "error") != "not_authorized" {
		t.Errorf("no credentials: %d %v", st, v)
	}
	req, _ := http.NewRequest("GET", b.http+"/api/overview", nil)
	req.SetBasicAuth("guest", "wrong")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("wrong password: %v %v", resp, err)
	}
	if st, v := b.do("GET", "/api/overview", "plain", nil); st != 401 || field(v, "reason") != "Not management user" {
		t.Errorf("no tags: %d %v", st, v)
	}
	if st, v := b.do("GET", "/api/users", "mgmt", nil); st != 401 || field(v, "reason") != "Not administrator user" {
		t.Errorf("users as management: %d %v", st, v)
	}
	b.must(200, "GET", "/api/users", "guest", nil)
	vhosts := b.must(200, "GET", "/api/vhosts", "mgmt", nil).([]any)
	if len(vhosts) != 1 || field(vhosts[0], "name") != "/" {
		t.Errorf("management user's vhosts: %v", vhosts)
	}
	b.must(404, "GET", "/api/queues/private", "mgmt", nil)
	if vs := b.must(200, "GET", "/api/vhosts", "mon", nil).([]any); len(vs) != 2 {
		t.Errorf("monitoring user's vhosts: %v", vs)
	}
	// Connections: guest's is seen by guest and mon, not by mgmt; mgmt may not close it.
	conn := dial(t, b.url)
	pollFor(t, "guest's connection listed", func() bool {
		return len(b.must(200, "GET", "/api/connections", "guest", nil).([]any)) == 1
	})
	if cs := b.must(200, "GET", "/api/connections", "mgmt", nil).([]any); len(cs) != 0 {
		t.Errorf("management user sees others' connections: %v", cs)
	}
	cs := b.must(200, "GET", "/api/connections", "mon", nil).([]any)
	if len(cs) != 1 || field(cs[0], "user") != "guest" || !strings.Contains(field(cs[0], "name").(string), " -> ") {
		t.Fatalf("monitoring user's connections: %v", cs)
	}
	// client_properties are what the client sent in start-ok (kept as received).
	props, _ := field(cs[0], "client_properties").(map[string]any)
	caps, _ := props["capabilities"].(map[string]any)
	if product, _ := props["product"].(string); product != "AMQP 0.9.1 Client" || props["platform"] != "golang" || caps["consumer_cancel_notify"] != true {
		t.Errorf("client_properties %v, want what amqp091-go sent (product \"AMQP 0.9.1 Client\", platform, capabilities)", props)
	}
	name := url.PathEscape(field(cs[0], "name").(string))
	b.must(404, "DELETE", "/api/connections/"+name, "mgmt", nil)
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))
	if st, _ := b.do("DELETE", "/api/connections/"+name, "guest", nil, "X-Reason", "maintenance"); st != 204 {
		t.Fatalf("close connection: %d", st)
	}
	select {
	case e := <-closed:
		if e == nil || e.Code != 320 || e.Reason != "CONNECTION_FORCED - maintenance" {
			t.Errorf("closed with %v, want 320 and the X-Reason", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the connection was not closed")
	}
}

// TestAPIDefinitionsEdits creates a user, a vhost, permissions and a policy through the
// API, and checks each takes effect at once and is saved in the definitions file.
func TestAPIDefinitionsEdits(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	b.must(201, "PUT", "/api/vhosts/staging", "guest", nil)
	b.must(204, "PUT", "/api/vhosts/staging", "guest", nil)
	b.must(201, "PUT", "/api/users/alice", "guest", map[string]any{"password": "s3cret", "tags": "management"})
	b.must(201, "PUT", "/api/permissions/staging/alice", "guest", map[string]any{"configure": ".*", "write": ".*", "read": ".*"})
	b.must(201, "PUT", "/api/policies/staging/cap", "guest", map[string]any{"pattern": "^capped$", "apply-to": "queues",
		"definition": map[string]any{"max-length": 1}, "priority": 0})
	st, v := b.do("PUT", "/api/policies/staging/bad", "guest", map[string]any{"pattern": ".*", "definition": map[string]any{"max-length": -1}})
	if st != 400 || !strings.Contains(field(v, "reason").(string), "not a valid maximum length") {
		t.Errorf("bad policy: %d %v", st, v)
	}

	conn, err := amqp091.Dial(strings.Replace(b.url, "guest:guest@", "alice:s3cret@", 1) + "staging")
	if err != nil {
		t.Fatalf("alice cannot log in to staging: %v", err)
	}
	defer conn.Close()
	ch := openChannel(t, conn)
	declareTransientQueue(t, ch, "capped")
	publishN(t, ch, "capped", 3)
	if n := queueReady(t, ch, "capped"); n != 1 {
		t.Errorf("capped holds %d, want the API's policy max-length 1", n)
	}
	d, err := LoadDefinitions(b.defs)
	if err != nil {
		t.Fatal(err)
	}
	ps, _ := d.Policies()
	if d.vhost("staging") < 0 || d.user("alice") < 0 || d.permission("alice", "staging") < 0 || len(ps) != 1 {
		t.Errorf("the file lacks the API's changes: %+v %+v", d, ps)
	}
	if u := b.must(200, "GET", "/api/users/alice", "guest", nil); field(u, "tags").([]any)[0] != "management" {
		t.Errorf("alice: %v", u)
	}
	b.must(204, "DELETE", "/api/policies/staging/cap", "guest", nil)
	b.must(404, "DELETE", "/api/policies/staging/cap", "guest", nil)
	b.must(204, "DELETE", "/api/users/alice", "guest", nil)
	b.must(404, "GET", "/api/users/alice", "guest", nil)
	b.must(204, "DELETE", "/api/vhosts/staging", "guest", nil)
	b.must(404, "GET", "/api/vhosts/staging", "guest", nil)
}

// TestAPIBadRequests checks that a body that is not JSON is 400 and one over 20 MB is 413,
// with nothing changed, and that an unknown path is 404 in RabbitMQ's shape.
func TestAPIBadRequests(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	if st, v := b.do("PUT", "/api/queues/%2F/q", "guest", "{not json"); st != 400 || field(v, "error") != "bad_request" {
		t.Errorf("bad JSON: %d %v", st, v)
	}
	big := `{"arguments":{"x":"` + strings.Repeat("a", maxAPIBody) + `"}}`
	if st, _ := b.do("PUT", "/api/queues/%2F/q", "guest", big); st != 413 {
		t.Errorf("oversize body: %d", st)
	}
	b.must(404, "GET", "/api/queues/%2F/q", "guest", nil)
	if st, v := b.do("GET", "/api/nothing-here", "guest", nil); st != 404 || field(v, "error") == nil {
		t.Errorf("unknown path: %d %v", st, v)
	}
	b.must(404, "GET", "/api/queues/no-such-vhost", "guest", nil)
}

// TestAPIHealthChecks checks the health checks in both states.
func TestAPIHealthChecks(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	if v := b.must(200, "GET", "/api/health/checks/alarms", "guest", nil); field(v, "status") != "ok" {
		t.Errorf("alarms: %v", v)
	}
	b.srv.alarms.Store(alarmMemory)
	if v := b.must(503, "GET", "/api/health/checks/alarms", "guest", nil); field(v, "status") != "failed" {
		t.Errorf("alarms with the memory alarm on: %v", v)
	}
	b.srv.alarms.Store(0)
	_, port := splitHostPort(b.srv.Addr().String())
	b.must(200, "GET", "/api/health/checks/port-listener/"+strconv.Itoa(port), "guest", nil)
	b.must(503, "GET", "/api/health/checks/port-listener/1", "guest", nil)
	b.must(200, "GET", "/api/health/checks/protocol-listener/amqp", "guest", nil)
	b.must(503, "GET", "/api/health/checks/protocol-listener/mqtt", "guest", nil)
	b.must(200, "GET", "/api/health/checks/virtual-hosts", "guest", nil)
	b.must(200, "GET", "/api/health/checks/is-in-service", "guest", nil)
	b.must(200, "GET", "/api/health/checks/certificate-expiration/1/months", "guest", nil)
	if v := b.must(200, "GET", "/api/aliveness-test/%2F", "guest", nil); field(v, "status") != "ok" {
		t.Errorf("aliveness: %v", v)
	}
	b.srv.setUnhealthy("test")
	b.must(503, "GET", "/api/health/checks/virtual-hosts", "guest", nil)
	b.must(503, "GET", "/api/health/checks/is-in-service", "guest", nil)

	// A certificate that expires within the hour (the test CA's) fails a check for a day.
	p := newTestPKI(t)
	srv := NewServer(Config{TLS: &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile}, Logger: wireDiscardLogger()})
	if err := srv.loadTLS(); err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.ManagementHandler())
	defer hs.Close()
	tb := &apiBroker{t: t, srv: srv, http: hs.URL}
	if v := tb.must(503, "GET", "/api/health/checks/certificate-expiration/1/days", "guest", nil); field(v, "status") != "failed" {
		t.Errorf("certificate expiring within a day: %v", v)
	}
	tb.must(200, "GET", "/api/health/checks/certificate-expiration/10/seconds", "guest", nil)
}

// TestAPIDefinitionsExport checks that the export holds the users, vhosts and policies in
// force and the broker's durable queues, exchanges and bindings, in RabbitMQ's format.
func TestAPIDefinitionsExport(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	ch := openChannel(t, dial(t, b.url))
	if err := ch.ExchangeDeclare("orders", "topic", true, false, false, false, amqp091.Table{"alternate-exchange": "ae"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("orders.q", true, false, false, false, amqp091.Table{"x-max-length": int32(5)}); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("orders.q", "orders.#", "orders", false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "transient")
	d := b.must(200, "GET", "/api/definitions", "guest", nil)
	qs := field(d, "queues").([]any)
	if len(qs) != 1 || field(qs[0], "name") != "orders.q" || field(qs[0], "arguments.x-max-length") != 5.0 {
		t.Errorf("queues %v", qs)
	}
	xs := field(d, "exchanges").([]any)
	if len(xs) != 1 || field(xs[0], "name") != "orders" || field(xs[0], "internal") != false {
		t.Errorf("exchanges %v", xs)
	}
	bs := field(d, "bindings").([]any)
	if len(bs) != 1 || field(bs[0], "routing_key") != "orders.#" || field(bs[0], "destination_type") != "queue" {
		t.Errorf("bindings %v", bs)
	}
	if us := field(d, "users").([]any); len(us) != 1 || field(us[0], "name") != "guest" || field(us[0], "password_hash") == "" {
		t.Errorf("users %v", us)
	}
	if v := b.must(200, "GET", "/api/definitions/%2F", "guest", nil); field(v, "users") != nil || len(field(v, "queues").([]any)) != 1 {
		t.Errorf("vhost export %v", v)
	}
}

// TestAPIDefinitionsImport imports users, a vhost, permissions, a policy, exchanges,
// queues and bindings, and checks each; an import with one bad object changes nothing; an
// export imported again gives the same topology back.
func TestAPIDefinitionsImport(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	doc := map[string]any{
		"users":  []any{map[string]any{"name": "bob", "password": "bobpw", "tags": []any{"management"}}},
		"vhosts": []any{map[string]any{"name": "imp"}},
		"permissions": []any{map[string]any{"user": "bob", "vhost": "imp", "configure": ".*", "write": ".*", "read": ".*"},
			map[string]any{"user": "guest", "vhost": "imp", "configure": ".*", "write": ".*", "read": ".*"}},
		"policies": []any{map[string]any{"vhost": "imp", "name": "cap", "pattern": "^capped$", "apply-to": "queues",
			"definition": map[string]any{"max-length": 2}, "priority": 0}},
		"exchanges": []any{map[string]any{"name": "ix", "vhost": "imp", "type": "direct", "durable": true, "auto_delete": false, "internal": false, "arguments": map[string]any{}},
			map[string]any{"name": "ix2", "vhost": "imp", "type": "fanout", "durable": true, "arguments": map[string]any{}}},
		"queues": []any{map[string]any{"name": "capped", "vhost": "imp", "durable": true, "auto_delete": false, "arguments": map[string]any{"x-message-ttl": 60000}}},
		"bindings": []any{map[string]any{"source": "ix", "vhost": "imp", "destination": "ix2", "destination_type": "exchange", "routing_key": "k", "arguments": map[string]any{}},
			map[string]any{"source": "ix2", "vhost": "imp", "destination": "capped", "destination_type": "queue", "routing_key": "", "arguments": map[string]any{}}},
	}
	// One bad queue argument: nothing is imported.
	bad := map[string]any{}
	for k, v := range doc {
		bad[k] = v
	}
	bad["queues"] = []any{map[string]any{"name": "capped", "vhost": "imp", "durable": true, "arguments": map[string]any{"x-max-length": "many"}}}
	if st, v := b.do("POST", "/api/definitions", "guest", bad); st != 400 || !strings.Contains(field(v, "reason").(string), "x-max-length") {
		t.Fatalf("bad import: %d %v", st, v)
	}
	b.must(404, "GET", "/api/vhosts/imp", "guest", nil)
	b.must(404, "GET", "/api/users/bob", "guest", nil)

	b.must(204, "POST", "/api/definitions", "guest", doc)
	conn, err := amqp091.Dial(strings.Replace(b.url, "guest:guest@", "bob:bobpw@", 1) + "imp")
	if err != nil {
		t.Fatalf("bob cannot log in to imp: %v", err)
	}
	defer conn.Close()
	ch := openChannel(t, conn)
	for i := range 3 {
		publishText(t, ch, "ix", "k", strconv.Itoa(i))
	}
	pollFor(t, "two messages (the imported policy's max-length) through the imported bindings", func() bool {
		return queueReady(t, ch, "capped") == 2
	})
	q := b.must(200, "GET", "/api/queues/imp/capped", "guest", nil)
	if field(q, "policy") != "cap" || field(q, "durable") != true || field(q, "arguments.x-message-ttl") != 60000.0 {
		t.Errorf("imported queue %v", q)
	}

	// Round trip: export, delete, import the export.
	exported := b.must(200, "GET", "/api/definitions", "guest", nil)
	b.must(204, "DELETE", "/api/queues/imp/capped", "guest", nil)
	b.must(204, "DELETE", "/api/exchanges/imp/ix", "guest", nil)
	b.must(204, "POST", "/api/definitions", "guest", exported)
	bs := b.must(200, "GET", "/api/bindings/imp", "guest", nil).([]any)
	var kinds []string
	for _, bb := range bs {
		kinds = append(kinds, field(bb, "source").(string)+">"+field(bb, "destination").(string))
	}
	if strings.Join(kinds, " ") != ">capped ix>ix2 ix2>capped" {
		t.Errorf("bindings after the round trip: %v", kinds)
	}
	// An existing queue with other arguments is inequivalent: 400, nothing changes.
	b.must(201, "PUT", "/api/queues/imp/other", "guest", map[string]any{"durable": true})
	clash := map[string]any{"vhosts": []any{map[string]any{"name": "imp2"}},
		"queues": []any{map[string]any{"name": "other", "vhost": "imp", "durable": false}}}
	if st, v := b.do("POST", "/api/definitions", "guest", clash); st != 400 || !strings.Contains(field(v, "reason").(string), "inequivalent") {
		t.Errorf("inequivalent import: %d %v", st, v)
	}
	b.must(404, "GET", "/api/vhosts/imp2", "guest", nil)
}

// notProvided are the fields of RabbitMQ's API answers amqp-go leaves out, per answer:
// Erlang runtime data (garbage collection, reductions, processes), rates of things it does
// not sample, and message store internals. The README's API section lists them.
var notProvided = map[string][]string{
	"overview": {"churn_rates", "disable_stats", "enable_queue_totals", "erlang_full_version", "release_series_support_status",
		"sample_retention_policies", "statistics_db_event_queue"},
	"queue": {"backing_queue_status", "consumer_capacity", "consumer_utilisation", "deliveries", "garbage_collection", "incoming",
		"message_bytes_paged_out", "message_bytes_persistent", "messages_details", "messages_persistent", "messages_ready_details",
		"messages_unacknowledged_details", "messages_unacknowledged_ram", "recoverable_slaves", "reductions", "reductions_details"},
	"exchange": {"incoming", "outgoing"},
	"vhost":    {"messages_details", "messages_ready_details", "messages_unacknowledged_details"},
	"connection": {"garbage_collection", "peer_cert_issuer", "peer_cert_subject", "peer_cert_validity", "recv_cnt", "recv_oct",
		"recv_oct_details", "reductions", "reductions_details", "send_cnt", "send_oct", "send_oct_details", "send_pend",
		"ssl_cipher", "ssl_hash", "ssl_key_exchange", "ssl_protocol"},
	"channel": {"acks_uncommitted", "garbage_collection", "idle_since", "messages_uncommitted", "pending_raft_commands",
		"reductions", "reductions_details"},
}

// TestAPIMatchesRabbitMQ imports a definitions file RabbitMQ 3.10.8 exported (topology,
// policies, an operator policy) and checks that amqp-go's answers for the same objects
// carry every field RabbitMQ's answers (captured from it, in testdata/api) carry, but
// those in notProvided; and for the node, the fields tools read.
func TestAPIMatchesRabbitMQ(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	raw, err := os.ReadFile(filepath.Join("testdata", "definitions", "rabbitmq-3.10-topology.json"))
	if err != nil {
		t.Fatal(err)
	}
	b.must(204, "POST", "/api/definitions", "guest", json.RawMessage(raw))
	ch := openChannel(t, dial(t, b.url))
	if err := ch.Qos(10, 0, false); err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.Consume(q.Name, "ctag", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ path, file, kind string }{
		{"/api/overview", "overview", "overview"},
		{"/api/queues/orders/orders.created", "queues_orders_orders.created", "queue"},
		{"/api/exchanges/orders/orders.topic", "exchanges_orders_orders.topic", "exchange"},
		{"/api/bindings/orders", "bindings_orders", ""},
		{"/api/vhosts/orders", "vhosts_orders", "vhost"},
		{"/api/users/alice", "users_alice", ""},
		{"/api/permissions/orders/alice", "permissions_orders_alice", ""},
		{"/api/policies/orders/ttl", "policies_orders_ttl", ""},
		{"/api/whoami", "whoami", ""},
		{"/api/connections", "connections", "connection"},
		{"/api/channels", "channels", "channel"},
		{"/api/consumers", "consumers", ""},
	} {
		var want any
		raw, err := os.ReadFile(filepath.Join("testdata", "api", c.file+".json"))
		if err != nil {
			t.Fatal(err)
		}
		json.Unmarshal(raw, &want)
		got := b.must(200, "GET", c.path, "guest", nil)
		if l, ok := want.([]any); ok {
			gl, _ := got.([]any)
			if len(gl) == 0 {
				t.Errorf("%s: empty list", c.path)
				continue
			}
			want, got = l[0], gl[0]
		}
		for k := range want.(map[string]any) {
			if _, ok := got.(map[string]any)[k]; !ok && !slices.Contains(notProvided[c.kind], k) {
				t.Errorf("%s lacks %q", c.path, k)
			}
		}
	}
	n := b.must(200, "GET", "/api/nodes", "guest", nil).([]any)
	for _, k := range []string{"name", "type", "running", "uptime", "mem_used", "mem_limit", "mem_alarm", "disk_free",
		"disk_free_limit", "disk_free_alarm", "partitions", "os_pid"} {
		if _, ok := n[0].(map[string]any)[k]; !ok {
			t.Errorf("/api/nodes lacks %q", k)
		}
	}
	if q := b.must(200, "GET", "/api/queues/orders/orders.created", "guest", nil); field(q, "policy") != "ttl" ||
		field(q, "operator_policy") != "cap" || field(q, "effective_policy_definition.max-length") != 100000.0 {
		t.Errorf("the imported policies do not apply: %v %v %v", field(q, "policy"), field(q, "operator_policy"), field(q, "effective_policy_definition"))
	}
}

// TestRabbitmqadmin drives the API with the Python rabbitmqadmin from Debian's
// rabbitmq-server package: declare, list, publish, get, delete.
func TestRabbitmqadmin(t *testing.T) {
	t.Parallel()
	bin, err := exec.LookPath("rabbitmqadmin")
	if err != nil {
		t.Skip("rabbitmqadmin not installed (apt-get install rabbitmq-server); .ci/run installs it")
	}
	b := startAPIBroker(t, nil)
	u, _ := url.Parse(b.http)
	admin := func(args ...string) string {
		t.Helper()
		full := append([]string{"-H", u.Hostname(), "-P", u.Port(), "-u", "guest", "-p", "guest", "-f", "tsv"}, args...)
		out, err := exec.Command(bin, full...).CombinedOutput()
		if err != nil {
			t.Fatalf("rabbitmqadmin %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	admin("declare", "queue", "name=adm", "durable=false", `arguments={"x-max-length":5}`)
	admin("declare", "exchange", "name=admx", "type=topic")
	admin("declare", "binding", "source=admx", "destination=adm", "routing_key=a.#")
	if out := admin("publish", "exchange=admx", "routing_key=a.b", "payload=hello"); !strings.Contains(out, "Message published") {
		t.Errorf("publish: %q", out)
	}
	if out := admin("list", "queues", "name", "messages"); !strings.Contains(out, "adm\t1") {
		t.Errorf("list queues: %q", out)
	}
	if out := admin("list", "bindings", "source", "destination", "routing_key"); !strings.Contains(out, "admx\tadm\ta.#") {
		t.Errorf("list bindings: %q", out)
	}
	if out := admin("get", "queue=adm", "ackmode=ack_requeue_false"); !strings.Contains(out, "hello") {
		t.Errorf("get: %q", out)
	}
	if out := admin("list", "queues", "name", "messages"); !strings.Contains(out, "adm\t0") {
		t.Errorf("after get: %q", out)
	}
	admin("declare", "user", "name=carol", "password=pw", "tags=monitoring")
	if out := admin("list", "users", "name", "tags"); !strings.Contains(out, "carol\tmonitoring") {
		t.Errorf("list users: %q", out)
	}
	admin("delete", "queue", "name=adm")
	admin("delete", "exchange", "name=admx")
	if out := admin("list", "queues", "name"); strings.Contains(out, "adm") {
		t.Errorf("after delete: %q", out)
	}
	if out := admin("show", "overview"); !strings.Contains(out, Version) {
		t.Errorf("overview: %q", out)
	}
}

// TestAPIListeners checks the listeners ListenAndServe opens from Config: the management
// API over HTTPS with Config.HTTPTLS, and that Shutdown closes it.
func TestAPIListeners(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	free, err := net.Listen("tcp", "127.0.0.1:0") // a port for the metrics, free a moment ago
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := free.Addr().String()
	free.Close()
	srv := NewServer(Config{Addr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", HTTPTLS: &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile},
		PrometheusAddr: metricsAddr, Logger: wireDiscardLogger()})
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe() }()
	var addr net.Addr
	pollFor(t, "the HTTPS listener", func() bool { addr = srv.HTTPAddr(); return addr != nil })
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: p.pool}}, Timeout: 10 * time.Second}
	req, _ := http.NewRequest("GET", "https://"+addr.String()+"/api/overview", nil)
	req.SetBasicAuth("guest", "guest")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("HTTPS: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Errorf("HTTPS overview: %d, TLS %v", resp.StatusCode, resp.TLS != nil)
	}
	if resp, err := http.Get("http://" + metricsAddr + "/metrics"); err != nil || resp.StatusCode != 200 {
		t.Errorf("Prometheus on %s: %v %v", metricsAddr, resp, err)
	} else {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), "rabbitmq_identity_info") {
			t.Errorf("metrics lack rabbitmq_identity_info: %.200s", b)
		}
	}
	if resp, err := http.Get("http://" + addr.String() + "/api/overview"); err == nil {
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("plain HTTP on the HTTPS listener: %d, want 400", resp.StatusCode)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
	if err := <-done; err != ErrServerClosed {
		t.Errorf("ListenAndServe: %v", err)
	}
	if c, err := net.DialTimeout("tcp", addr.String(), time.Second); err == nil {
		c.Close()
		t.Error("the HTTPS listener is still open after Shutdown")
	}
}

// TestQueueHeadAge checks the age of a queue's oldest ready message, from when the broker
// enqueued it: in the API's head_message_timestamp and the Prometheus gauge, moving on
// to the next message when the head goes, and none for an empty queue.
func TestQueueHeadAge(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	ch := openChannel(t, dial(t, b.url))
	declareTransientQueue(t, ch, "aging")
	first := time.Now()
	publishText(t, ch, "", "aging", "old")
	time.Sleep(1200 * time.Millisecond)
	second := time.Now()
	publishText(t, ch, "", "aging", "new")
	pollFor(t, "two messages", func() bool { return queueReady(t, ch, "aging") == 2 })
	head := func() (int64, bool) {
		q := testQueue(b.srv, "aging")
		q.mu.Lock()
		defer q.mu.Unlock()
		return q.headEnqueuedLocked()
	}
	if at, ok := head(); !ok || at < first.UnixMilli()-250 || at > first.UnixMilli()+250 {
		t.Errorf("head enqueued at %d (%v), want about %d", at, ok, first.UnixMilli())
	}
	if v := field(b.must(200, "GET", "/api/queues/%2F/aging", "guest", nil), "head_message_timestamp"); v != float64(first.Unix()) && v != float64(first.Unix()-1) {
		t.Errorf("head_message_timestamp %v, want %d", v, first.Unix())
	}
	ms := httptest.NewServer(b.srv.MetricsHandler())
	defer ms.Close()
	resp, err := http.Get(ms.URL + "/metrics/per-object")
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(raw), `amqpgo_queue_head_message_age_seconds{vhost="/",queue="aging"} 1`) {
		t.Errorf("no age gauge of 1 s for aging in:\n%s", raw)
	}
	if d, ok, err := ch.Get("aging", true); err != nil || !ok || string(d.Body) != "old" {
		t.Fatalf("get: %v %v", ok, err)
	}
	if at, ok := head(); !ok || at < second.UnixMilli()-250 || at > second.UnixMilli()+250 {
		t.Errorf("after the first went, head enqueued at %d, want about %d", at, second.UnixMilli())
	}
	ch.Get("aging", true)
	if _, ok := head(); ok {
		t.Error("an empty queue has a head")
	}
}

// TestAPITags checks every kind of endpoint against each user tag, allowed and refused,
// as RabbitMQ's management plugin decides: no tag is refused everywhere; management sees
// its vhosts' objects; policymaker adds policies; monitoring adds the node; administrator
// has users, vhosts, permissions, operator policies and definitions.
func TestAPITags(t *testing.T) {
	t.Parallel()
	tags := []string{"none", "management", "policymaker", "monitoring", "administrator"}
	edits := []func(d *Definitions) error{}
	for _, tag := range tags {
		tagList := []string{tag}
		if tag == "none" {
			tagList = nil
		}
		edits = append(edits, addUser("u-"+tag, tagList...))
		user := "u-" + tag
		edits = append(edits, func(d *Definitions) error { return d.SetPermissions(user, "/", ".*", ".*", ".*") })
	}
	b := startAPIBroker(t, allEdits(edits...))
	const (
		all    = "management policymaker monitoring administrator"
		policy = "policymaker administrator"
		mon    = "monitoring administrator"
		admin  = "administrator"
	)
	for _, c := range []struct {
		method, path string
		body         any
		allowed      string // the tags allowed
		ok           int    // the status when allowed
	}{
		{"GET", "/api/overview", nil, all, 200},
		{"GET", "/api/whoami", nil, all, 200},
		{"GET", "/api/vhosts", nil, all, 200},
		{"GET", "/api/queues", nil, all, 200},
		{"GET", "/api/exchanges/%2F", nil, all, 200},
		{"GET", "/api/bindings", nil, all, 200},
		{"GET", "/api/connections", nil, all, 200},
		{"GET", "/api/channels", nil, all, 200},
		{"GET", "/api/consumers", nil, all, 200},
		{"GET", "/api/health/checks/alarms", nil, all, 200},
		{"GET", "/api/aliveness-test/%2F", nil, all, 200},
		{"GET", "/api/policies", nil, policy, 200},
		{"GET", "/api/nodes", nil, mon, 200},
		{"GET", "/api/users", nil, admin, 200},
		{"GET", "/api/permissions", nil, admin, 200},
		{"GET", "/api/operator-policies", nil, admin, 200},
		{"GET", "/api/definitions", nil, admin, 200},
		{"PUT", "/api/policies/%2F/p-{tag}", map[string]any{"pattern": "^nothing$", "definition": map[string]any{"max-length": 1}}, policy, 201},
		{"PUT", "/api/queues/%2F/q-{tag}", map[string]any{"durable": false}, all, 201},
		{"PUT", "/api/vhosts/v-{tag}", nil, admin, 201},
		{"PUT", "/api/users/n-{tag}", map[string]any{"password": "x", "tags": ""}, admin, 201},
		{"PUT", "/api/nodes/" + b.srv.node() + "/disk_free_limit", map[string]any{"value": 50000000}, admin, 204},
	} {
		for _, tag := range tags {
			path := strings.ReplaceAll(c.path, "{tag}", tag)
			st, v := b.do(c.method, path, "u-"+tag, c.body)
			want := 401
			if strings.Contains(c.allowed, tag) {
				want = c.ok
			}
			if st != want {
				t.Errorf("%s %s as %s: %d %v, want %d", c.method, path, tag, st, v, want)
			}
		}
	}
}

// TestAPIEscaping checks names that need escaping in paths: a vhost with a slash, a queue
// with spaces, a percent sign and a slash, and an exchange with a hash.
func TestAPIEscaping(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, allEdits(func(d *Definitions) error { return d.AddVhost("a/b") },
		func(d *Definitions) error { return d.SetPermissions("guest", "a/b", ".*", ".*", ".*") }))
	vh, q, x := url.PathEscape("a/b"), url.PathEscape("my queue/100%"), url.PathEscape("x#1")
	b.must(201, "PUT", "/api/queues/"+vh+"/"+q, "guest", map[string]any{"durable": false})
	b.must(201, "PUT", "/api/exchanges/"+vh+"/"+x, "guest", map[string]any{"type": "fanout", "durable": false})
	b.must(201, "POST", "/api/bindings/"+vh+"/e/"+x+"/q/"+q, "guest", map[string]any{"routing_key": "k y"})
	got := b.must(200, "GET", "/api/queues/"+vh+"/"+q, "guest", nil)
	if field(got, "name") != "my queue/100%" || field(got, "vhost") != "a/b" {
		t.Errorf("queue %v", got)
	}
	bs := b.must(200, "GET", "/api/queues/"+vh+"/"+q+"/bindings", "guest", nil).([]any)
	if len(bs) != 2 || field(bs[1], "source") != "x#1" || field(bs[1], "properties_key") != "k%20y" {
		t.Fatalf("bindings %v", bs)
	}
	b.must(204, "DELETE", "/api/bindings/"+vh+"/e/"+x+"/q/"+q+"/k%2520y", "guest", nil)
	if r := b.must(200, "POST", "/api/exchanges/"+vh+"/"+x+"/publish", "guest", map[string]any{"routing_key": "", "payload": "p", "payload_encoding": "string"}); field(r, "routed") != false {
		t.Errorf("publish after the unbind: %v", r)
	}
	b.must(404, "GET", "/api/queues/a/b/"+q, "guest", nil)
}

// TestAPISessionsEnd checks that the sessions API requests run in end with them: after
// declares, publishes, gets, a refused declare and deletes, the broker serves no
// connection, and a session's refusal leaves no channel or consumer behind.
func TestAPISessionsEnd(t *testing.T) {
	t.Parallel()
	b := startAPIBroker(t, nil)
	for i := range 10 {
		q := "s" + strconv.Itoa(i)
		b.must(201, "PUT", "/api/queues/%2F/"+q, "guest", map[string]any{"durable": false})
		b.must(400, "PUT", "/api/queues/%2F/"+q, "guest", map[string]any{"durable": true})
		b.must(200, "POST", "/api/exchanges/%2F/amq.default/publish", "guest", map[string]any{"routing_key": q, "payload": "x", "payload_encoding": "string"})
		b.must(200, "POST", "/api/queues/%2F/"+q+"/get", "guest", map[string]any{"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"})
		b.must(204, "DELETE", "/api/queues/%2F/"+q, "guest", nil)
	}
	pollFor(t, "every session closed", func() bool { return openConns(b.srv) == 0 })
	if cs := b.must(200, "GET", "/api/connections", "guest", nil).([]any); len(cs) != 0 {
		t.Errorf("connections listed: %v", cs)
	}
}

// TestAPISlowClients: HTTP clients that open connections and send half a request hold
// nothing AMQP needs: with 100 of them stalled, a message still goes through and the API
// still answers a well-behaved client.
func TestAPISlowClients(t *testing.T) {
	t.Parallel()
	srv := NewServer(Config{Addr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", Logger: wireDiscardLogger()})
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe() }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	}()
	var addr net.Addr
	pollFor(t, "the HTTP listener", func() bool { addr = srv.HTTPAddr(); return addr != nil })
	for range 100 {
		c, err := net.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("GET /api/overview HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "))
	}
	ch := openChannel(t, dial(t, "amqp://guest:guest@"+srv.Addr().String()+"/"))
	declareTransientQueue(t, ch, "through")
	publishText(t, ch, "", "through", "ok")
	if got := drainText(t, ch, "through"); len(got) != 1 || got[0] != "ok" {
		t.Fatalf("with stalled HTTP clients, the queue gave %q", got)
	}
	req, _ := http.NewRequest("GET", "http://"+addr.String()+"/api/queues", nil)
	req.SetBasicAuth("guest", "guest")
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("a good API client beside the stalled ones: %v %v", resp, err)
	}
	resp.Body.Close()
}
