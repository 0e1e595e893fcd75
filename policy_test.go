package amqp

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// pol is a policy of vhost "/" for tests.
func pol(name, pattern, applyTo string, priority int, def string) Policy {
	return Policy{Vhost: "/", Name: name, Pattern: pattern, ApplyTo: applyTo, Priority: priority, Definition: json.RawMessage(def)}
}

// policyDefs saves the default definitions with these policies and operator policies (ops)
// at path.
func policyDefs(t *testing.T, path string, pols, ops []Policy) {
	t.Helper()
	secSaveDefs(t, path, func(d *Definitions) error {
		for _, p := range pols {
			if err := d.SetPolicy(p); err != nil {
				return err
			}
		}
		for _, p := range ops {
			if err := d.SetOperatorPolicy(p); err != nil {
				return err
			}
		}
		return nil
	})
}

// policyServer starts a broker whose definitions file, returned, has these policies.
func policyServer(t *testing.T, pols, ops []Policy) (*Server, *amqp091.Channel, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "definitions.json")
	policyDefs(t, path, pols, ops)
	srv, url := newTestServer(t, Config{Definitions: path})
	return srv, openChannel(t, dial(t, url)), path
}

// queuePolicies returns the names of q's policy and operator policy.
func queuePolicies(q *queue) [2]string {
	q.mu.Lock()
	defer q.mu.Unlock()
	s := q.settings()
	return [2]string{s.policy, s.operatorPolicy}
}

// publishN publishes n messages to queue, of 1 to n octets.
func publishN(t *testing.T, ch *amqp091.Channel, queue string, n int) {
	t.Helper()
	for i := range n {
		publishText(t, ch, "", queue, strings.Repeat("m", i+1))
	}
}

// TestPolicyAppliesToNewAndExistingQueues checks that a policy sets the arguments of the
// queues it matches, new ones at declare and existing ones at a reload: a shorter length
// limit drops (and dead-letters) at once, and a queue no policy matches any more loses them.
func TestPolicyAppliesToNewAndExistingQueues(t *testing.T) {
	t.Parallel()
	srv, ch, path := policyServer(t, []Policy{pol("cap", `^capped\.`, "queues", 0, `{"max-length":3,"dead-letter-exchange":"dlx"}`)}, nil)
	dlxDeclare(t, ch, false)
	declareTransientQueue(t, ch, "capped.a")
	declareTransientQueue(t, ch, "other")
	publishN(t, ch, "capped.a", 5)
	publishN(t, ch, "other", 5)
	pollFor(t, "two messages dead-lettered by the policy's limit", func() bool { return queueReady(t, ch, "dlq") == 2 })
	if n := queueReady(t, ch, "capped.a"); n != 3 {
		t.Fatalf("capped.a holds %d, want the policy's max-length 3", n)
	}
	if n := queueReady(t, ch, "other"); n != 5 {
		t.Fatalf("other holds %d, want 5: the policy does not match it", n)
	}
	d, ok, err := ch.Get("dlq", true)
	if err != nil || !ok {
		t.Fatalf("get dlq: %v %v", ok, err)
	}
	if deaths, _ := d.Headers["x-death"].([]any); len(deaths) != 1 || deaths[0].(amqp091.Table)["reason"] != "maxlen" {
		t.Errorf("x-death %v, want one maxlen death", d.Headers["x-death"])
	}
	if got := queuePolicies(testQueue(srv, "capped.a")); got != [2]string{"cap", ""} {
		t.Errorf("capped.a's policies are %q", got)
	}

	// The policy moves to "other", with a smaller limit and no dead-letter exchange.
	policyDefs(t, path, []Policy{pol("cap", `^other$`, "queues", 0, `{"max-length":1}`)}, nil)
	defsReload(t, srv)
	if n := queueReady(t, ch, "other"); n != 1 {
		t.Fatalf("other holds %d after the reload, want 1", n)
	}
	if got := drainText(t, ch, "other"); len(got) != 1 || got[0] != "mmmmm" {
		t.Errorf("other kept %q, want the newest message (drop-head)", got)
	}
	publishN(t, ch, "capped.a", 5)
	if n := queueReady(t, ch, "capped.a"); n != 8 {
		t.Errorf("capped.a holds %d, want 8: no policy limits it now", n)
	}
	if n := queueReady(t, ch, "dlq"); n != 1 {
		t.Errorf("dlq holds %d, want the one left: nothing more is dead-lettered", n)
	}
	if got := queuePolicies(testQueue(srv, "capped.a")); got != [2]string{} {
		t.Errorf("capped.a's policies are %q after the reload", got)
	}
}

// TestPolicyPrecedence checks RabbitMQ's rules: only the highest-priority policy applies;
// an operator policy and the x-arguments are merged with it key by key, the smallest
// length limit winning, and a dead-letter exchange argument winning over the policy's.
func TestPolicyPrecedence(t *testing.T) {
	t.Parallel()
	srv, ch, _ := policyServer(t,
		[]Policy{
			pol("low", `^q`, "all", 0, `{"max-length":100,"dead-letter-exchange":"pdlx"}`),
			pol("high", `^q-high$`, "queues", 5, `{"max-length":2}`),
			pol("exchanges-only", `^q`, "exchanges", 9, `{"max-length":1}`),
		},
		[]Policy{pol("cap", `.*`, "queues", 0, `{"max-length":4}`)})
	dlxDeclare(t, ch, false)
	if err := ch.ExchangeDeclare("pdlx", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "pdlq")
	if err := ch.QueueBind("pdlq", "", "pdlx", false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("q-args", false, false, false, false,
		amqp091.Table{"x-max-length": int32(10), "x-dead-letter-exchange": "dlx"}); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q-high")
	declareTransientQueue(t, ch, "q-plain")
	for _, q := range []string{"q-args", "q-high", "q-plain"} {
		publishN(t, ch, q, 6)
	}
	pollFor(t, "q-args' two and q-plain's two dead-lettered", func() bool {
		return queueReady(t, ch, "dlq") == 2 && queueReady(t, ch, "pdlq") == 2
	})
	for q, want := range map[string]int{
		"q-args":  4, // min(argument 10, policy 100, operator policy 4); argument's dlx
		"q-high":  2, // "high" alone: "low"'s dead-letter exchange does not apply, so nothing is dead-lettered
		"q-plain": 4, // "low" and the operator policy: min(100, 4); the policy's dlx
	} {
		if n := queueReady(t, ch, q); n != want {
			t.Errorf("%s holds %d, want %d", q, n, want)
		}
	}
	for q, want := range map[string][2]string{"q-args": {"low", "cap"}, "q-high": {"high", "cap"}, "q-plain": {"low", "cap"}} {
		if got := queuePolicies(testQueue(srv, q)); got != want {
			t.Errorf("%s has policies %q, want %q", q, got, want)
		}
	}
}

// TestPolicyMessageTTLSmallerWins checks that of x-message-ttl and a policy's message-ttl
// the smaller applies, whichever sets it.
func TestPolicyMessageTTLSmallerWins(t *testing.T) {
	t.Parallel()
	_, ch, _ := policyServer(t, []Policy{
		pol("short", `^short-policy$`, "queues", 0, `{"message-ttl":20}`),
		pol("long", `^short-arg$`, "queues", 0, `{"message-ttl":3600000}`),
	}, nil)
	for q, ttl := range map[string]int64{"short-policy": 3600000, "short-arg": 20} {
		if _, err := ch.QueueDeclare(q, false, false, false, false, amqp091.Table{"x-message-ttl": ttl}); err != nil {
			t.Fatal(err)
		}
	}
	publishN(t, ch, "short-policy", 3)
	publishN(t, ch, "short-arg", 3)
	pollFor(t, "every message expired after 20 ms", func() bool {
		return queueReady(t, ch, "short-policy") == 0 && queueReady(t, ch, "short-arg") == 0
	})
}

// TestPolicyAlternateExchange checks a policy's alternate-exchange: it reroutes what its
// exchanges cannot route, an exchange's own argument wins over it, and a policy that applies
// to queues only leaves exchanges alone.
func TestPolicyAlternateExchange(t *testing.T) {
	t.Parallel()
	srv, ch, path := policyServer(t, []Policy{
		pol("ae", `^orders`, "exchanges", 0, `{"alternate-exchange":"ae"}`),
		pol("queues-only", `^plain$`, "queues", 0, `{"alternate-exchange":"ae"}`),
	}, nil)
	for _, ae := range []string{"ae", "ae2"} {
		if err := ch.ExchangeDeclare(ae, "fanout", false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		declareTransientQueue(t, ch, "unrouted-"+ae)
		if err := ch.QueueBind("unrouted-"+ae, "", ae, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	for name, args := range map[string]amqp091.Table{"orders": nil, "orders-own": {"alternate-exchange": "ae2"}, "plain": nil} {
		if err := ch.ExchangeDeclare(name, "direct", false, false, false, false, args); err != nil {
			t.Fatal(err)
		}
	}
	returns := ch.NotifyReturn(make(chan amqp091.Return, 4))
	for _, x := range []string{"orders", "orders-own"} {
		publishText(t, ch, x, "nobody", x)
	}
	if err := ch.Publish("plain", "nobody", true, false, amqp091.Publishing{Body: []byte("plain")}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-returns:
		if r.Exchange != "plain" {
			t.Errorf("returned from %q, want plain", r.Exchange)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("plain's unroutable message was not returned: a queues-only policy gave it an alternate exchange")
	}
	if got := drainText(t, ch, "unrouted-ae"); len(got) != 1 || got[0] != "orders" {
		t.Errorf("ae got %q, want orders' message", got)
	}
	if got := drainText(t, ch, "unrouted-ae2"); len(got) != 1 || got[0] != "orders-own" {
		t.Errorf("ae2 got %q, want orders-own's message: the argument wins", got)
	}

	// Without the policy, orders has no alternate exchange.
	policyDefs(t, path, nil, nil)
	defsReload(t, srv)
	if err := ch.Publish("orders", "nobody", true, false, amqp091.Publishing{Body: []byte("again")}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-returns:
		if r.Exchange != "orders" {
			t.Errorf("returned from %q, want orders", r.Exchange)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("orders still reroutes after its policy is gone")
	}
}

// TestPolicyExpiresAndDeliveryLimit checks the expires and delivery-limit keys: an unused
// queue goes, one whose policy goes at a reload stays, and a message returned more often
// than the limit is dead-lettered with reason delivery_limit.
func TestPolicyExpiresAndDeliveryLimit(t *testing.T) {
	t.Parallel()
	srv, ch, path := policyServer(t, []Policy{
		pol("tmp", `^tmp`, "queues", 0, `{"expires":50}`),
		pol("poison", `^work$`, "queues", 0, `{"delivery-limit":1,"dead-letter-exchange":"dlx"}`),
	}, nil)
	dlxDeclare(t, ch, false)
	declareTransientQueue(t, ch, "tmp-a")
	pollFor(t, "tmp-a deleted by the policy's expires", func() bool {
		vh := srv.vhostList()[0]
		vh.mu.RLock()
		defer vh.mu.RUnlock()
		return vh.queues["tmp-a"] == nil
	})

	declareTransientQueue(t, ch, "work")
	publishText(t, ch, "", "work", "poison")
	for range 2 {
		var d amqp091.Delivery
		pollFor(t, "work's message back", func() bool {
			var ok bool
			var err error
			d, ok, err = ch.Get("work", false)
			if err != nil {
				t.Fatal(err)
			}
			return ok
		})
		if err := d.Nack(false, true); err != nil {
			t.Fatal(err)
		}
	}
	pollFor(t, "the poison message dead-lettered", func() bool { return queueReady(t, ch, "dlq") == 1 })
	d, _, _ := ch.Get("dlq", true)
	if deaths, _ := d.Headers["x-death"].([]any); len(deaths) != 1 || deaths[0].(amqp091.Table)["reason"] != "delivery_limit" {
		t.Errorf("x-death %v, want one delivery_limit death", d.Headers["x-death"])
	}

	// Without the policy, a tmp queue is kept.
	policyDefs(t, path, []Policy{pol("tmp", `^tmp`, "queues", 0, `{"expires":300}`)}, nil)
	defsReload(t, srv)
	declareTransientQueue(t, ch, "tmp-b")
	policyDefs(t, path, nil, nil)
	defsReload(t, srv)
	time.Sleep(500 * time.Millisecond)
	if _, err := ch.QueueDeclarePassive("tmp-b", false, false, false, false, nil); err != nil {
		t.Fatalf("tmp-b expired after its policy was cleared: %v", err)
	}
}

// TestPolicyTTLAcrossRestart checks that a policy's message-ttl is exact after a restart:
// a recovered message expires its TTL after its publish, not after the restart.
func TestPolicyTTLAcrossRestart(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "definitions.json")
	policyDefs(t, path, []Policy{pol("ttl", `^durable$`, "queues", 0, `{"message-ttl":600000}`)}, nil)
	b := startDurable(t, Config{Definitions: path})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if _, err := ch.QueueDeclare("durable", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	p := newPersistentPublisher(t, conn)
	before := time.Now().UnixMilli()
	p.publish("", "durable", persistentMsg("a"))
	p.wait()
	after := time.Now().UnixMilli()
	time.Sleep(20 * time.Millisecond)
	b2 := b.restart("crash", Config{Definitions: path})
	q := testQueue(b2.srv, "durable")
	q.mu.Lock()
	at := q.headExpiresLocked()
	q.mu.Unlock()
	if at < before+600000-1 || at > after+600000+1 { // +1: publish times round up
		t.Errorf("recovered message expires at %d, want its publish (%d..%d) plus the policy's 600000 ms", at, before, after)
	}
}

// TestPolicyDefinitionsErrors checks that a bad policy is refused where it is set, and
// that a file holding one fails the reload and keeps the previous policies.
func TestPolicyDefinitionsErrors(t *testing.T) {
	t.Parallel()
	d := DefaultDefinitions()
	for _, c := range []struct {
		p        Policy
		operator bool
		want     string
	}{
		{pol("x", `(`, "all", 0, `{"max-length":1}`), false, "pattern"},
		{pol("x", `.*`, "bindings", 0, `{"max-length":1}`), false, "apply-to"},
		{pol("x", `.*`, "all", 0, `[1]`), false, "JSON object"},
		{pol("x", `.*`, "all", 0, `{}`), false, "empty"},
		{pol("x", `.*`, "all", 0, `{"max-length":-1}`), false, "-1 is not a valid maximum length"},
		{pol("x", `.*`, "all", 0, `{"message-ttl":"100"}`), false, `"100" is not a valid message TTL`},
		{pol("x", `.*`, "all", 0, `{"expires":0}`), false, "0 is not a valid queue expiry"},
		{pol("x", `.*`, "all", 0, `{"overflow":"drop-tail"}`), false, `"drop-tail" is not a valid overflow value`},
		{pol("x", `.*`, "all", 0, `{"dead-letter-exchange":1}`), false, "not a valid dead letter exchange name"},
		{pol("x", `.*`, "queues", 0, `{"dead-letter-exchange":"dlx"}`), true, "cannot be set by an operator policy"},
		{Policy{Vhost: "nowhere", Name: "x", Pattern: ".*", Definition: json.RawMessage(`{"max-length":1}`)}, false, "does not exist"},
	} {
		set := d.SetPolicy
		if c.operator {
			set = d.SetOperatorPolicy
		}
		if err := set(c.p); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s %s: %v, want an error with %q", c.p.Name, c.p.Definition, err, c.want)
		}
	}
	if err := d.ClearPolicy("/", "x"); err == nil {
		t.Error("clearing a policy that does not exist succeeded")
	}

	srv, ch, path := policyServer(t, []Policy{pol("cap", `^c$`, "queues", 0, `{"max-length":1}`)}, nil)
	defsWrite(t, path, `{"users":[{"name":"guest","password":"guest"}],"vhosts":[{"name":"/"}],
		"permissions":[{"user":"guest","vhost":"/","configure":".*","write":".*","read":".*"}],
		"policies":[{"vhost":"/","name":"cap","pattern":"^c$","apply-to":"queues","definition":{"max-length":"one"}}]}`)
	if err := srv.Reload(); err == nil || !strings.Contains(err.Error(), "not a valid maximum length") {
		t.Fatalf("Reload with a bad policy: %v", err)
	}
	declareTransientQueue(t, ch, "c")
	publishN(t, ch, "c", 3)
	if n := queueReady(t, ch, "c"); n != 1 {
		t.Errorf("c holds %d, want 1: the previous policy stays after a failed reload", n)
	}
}

// TestPolicyDefinitionsRoundTrip checks that policies and operator policies are saved in
// RabbitMQ's format (operator policies as parameters of component operator_policy), read
// back, replaced by name and cleared.
func TestPolicyDefinitionsRoundTrip(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "definitions.json")
	policyDefs(t, path,
		[]Policy{pol("a", `^a`, "queues", 1, `{"message-ttl":5}`), pol("b", `^b`, "", 0, `{"ha-mode":"all"}`)},
		[]Policy{pol("op", `.*`, "queues", 0, `{"max-length":7}`)})
	d, err := LoadDefinitions(path)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := d.Policies()
	if err != nil || len(ps) != 2 || ps[0].Name != "a" || ps[0].Priority != 1 || ps[0].ApplyTo != "queues" ||
		ps[1].ApplyTo != "all" || string(ps[0].Definition) != `{"message-ttl":5}` {
		t.Fatalf("policies %+v, %v", ps, err)
	}
	ops, err := d.OperatorPolicies()
	if err != nil || len(ops) != 1 || ops[0].Name != "op" || string(ops[0].Definition) != `{"max-length":7}` {
		t.Fatalf("operator policies %+v, %v", ops, err)
	}
	var file struct {
		Parameters []struct{ Vhost, Component, Name string }
	}
	b, _ := d.encode()
	if err := json.Unmarshal(b, &file); err != nil || len(file.Parameters) != 1 ||
		file.Parameters[0] != (struct{ Vhost, Component, Name string }{"/", "operator_policy", "op"}) {
		t.Errorf("parameters %+v (%v), want the operator policy", file.Parameters, err)
	}
	if err := d.SetPolicy(pol("a", `^aa`, "exchanges", 2, `{"alternate-exchange":"x"}`)); err != nil {
		t.Fatal(err)
	}
	if err := d.ClearPolicy("/", "b"); err != nil {
		t.Fatal(err)
	}
	if err := d.ClearOperatorPolicy("/", "op"); err != nil {
		t.Fatal(err)
	}
	ps, _ = d.Policies()
	ops, _ = d.OperatorPolicies()
	if len(ps) != 1 || ps[0].Pattern != `^aa` || ps[0].ApplyTo != "exchanges" || len(ops) != 0 {
		t.Errorf("after replace and clear: policies %+v, operator policies %+v", ps, ops)
	}
	if err := d.DeleteVhost("/"); err != nil {
		t.Fatal(err)
	}
	if ps, _ := d.Policies(); len(ps) != 0 {
		t.Errorf("a deleted vhost's policies remain: %+v", ps)
	}
}
