package amqp

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

func TestExchangeDeclareKinds(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	for _, kind := range []string{"direct", "fanout", "topic", "headers"} {
		name := "x-" + kind
		if err := ch.ExchangeDeclare(name, kind, true, false, false, false, nil); err != nil {
			t.Fatalf("declare %s: %v", kind, err)
		}
		// An equivalent redeclare and a passive declare both succeed.
		if err := ch.ExchangeDeclare(name, kind, true, false, false, false, nil); err != nil {
			t.Fatalf("redeclare %s: %v", kind, err)
		}
		if err := ch.ExchangeDeclarePassive(name, kind, true, false, false, false, nil); err != nil {
			t.Fatalf("passive %s: %v", kind, err)
		}
	}
}

func TestExchangeDeclareErrors(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	setup := openChannel(t, c)
	if err := setup.ExchangeDeclare("x", "direct", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		run  func(ch *amqp091.Channel) error
		code int
	}{
		{"passive missing", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclarePassive("missing", "direct", false, false, false, false, nil)
		}, 404},
		{"different type", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("x", "fanout", false, false, false, false, nil)
		}, 406},
		{"different durable", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("x", "direct", true, false, false, false, nil)
		}, 406},
		{"different auto-delete", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("x", "direct", false, true, false, false, nil)
		}, 406},
		{"different internal", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("x", "direct", false, false, true, false, nil)
		}, 406},
		{"different alternate-exchange", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("x", "direct", false, false, false, false, amqp091.Table{"alternate-exchange": "ae"})
		}, 406},
		{"reserved amq. prefix", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("amq.foo", "direct", false, false, false, false, nil)
		}, 403},
		{"declare default exchange", func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare("", "direct", true, false, false, false, nil)
		}, 403},
		{"delete default exchange", func(ch *amqp091.Channel) error {
			return ch.ExchangeDelete("", false, false)
		}, 403},
		{"delete amq.direct", func(ch *amqp091.Channel) error {
			return ch.ExchangeDelete("amq.direct", false, false)
		}, 403},
		{"bind queue to default exchange", func(ch *amqp091.Channel) error {
			if _, err := ch.QueueDeclare("q", false, false, false, false, nil); err != nil {
				return err
			}
			return ch.QueueBind("q", "q", "", false, nil)
		}, 403},
		{"bind default exchange as source", func(ch *amqp091.Channel) error {
			return ch.ExchangeBind("x", "k", "", false, nil)
		}, 403},
		{"bind default exchange as destination", func(ch *amqp091.Channel) error {
			return ch.ExchangeBind("", "k", "x", false, nil)
		}, 403},
		{"exchange.bind missing source", func(ch *amqp091.Channel) error {
			return ch.ExchangeBind("x", "k", "missing", false, nil)
		}, 404},
		{"exchange.bind missing destination", func(ch *amqp091.Channel) error {
			return ch.ExchangeBind("missing", "k", "x", false, nil)
		}, 404},
	}
	for _, tc := range cases {
		ch := openChannel(t, c)
		if err := tc.run(ch); amqpCode(err) != tc.code {
			t.Errorf("%s: %v, want reply code %d", tc.name, err, tc.code)
		}
	}
	// All of those were channel errors.
	if c.IsClosed() {
		t.Fatal("a channel error closed the connection")
	}
}

func TestExchangeDeclareUnknownType(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	wantReplyCode(t, ch.ExchangeDeclare("x", "no-such-type", false, false, false, false, nil), 503)
	// 503 COMMAND_INVALID is a connection exception.
	pollFor(t, "connection closed after 503", c.IsClosed)
}

func TestExchangeRedeclarePredeclared(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if err := ch.ExchangeDeclare("amq.topic", "topic", true, false, false, false, nil); err != nil {
		t.Fatalf("equivalent redeclare of amq.topic: %v", err)
	}
	ch = openChannel(t, c)
	wantReplyCode(t, ch.ExchangeDeclare("amq.topic", "direct", true, false, false, false, nil), 406)
}

func TestExchangeRedeclareIgnoresOtherArguments(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("x", "direct", false, false, false, false, amqp091.Table{"x-custom": "a"}); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("x", "direct", false, false, false, false, amqp091.Table{"x-custom": "b"}); err != nil {
		t.Fatalf("redeclare with another custom argument: %v", err)
	}
}

func TestPredeclaredExchanges(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	for name, kind := range map[string]string{
		"amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic",
		"amq.headers": "headers", "amq.match": "headers",
	} {
		if err := ch.ExchangeDeclarePassive(name, kind, true, false, false, false, nil); err != nil {
			t.Fatalf("passive declare %s: %v", name, err)
		}
	}
	// And they route.
	declareTransientQueue(t, ch, "q")
	if err := ch.QueueBind("q", "k", "amq.direct", false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "amq.direct", "k", "via amq.direct")
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"via amq.direct"}) {
		t.Fatalf("got %q", got)
	}
}

func TestPublishToInternalExchange(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	if err := ch.ExchangeDeclare("inner", "fanout", false, false, true, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("outer", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	if err := ch.QueueBind("q", "", "inner", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeBind("inner", "", "outer", false, nil); err != nil {
		t.Fatal(err)
	}
	// Messages reach an internal exchange only through another exchange.
	publishText(t, ch, "outer", "", "through outer")
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"through outer"}) {
		t.Fatalf("got %q", got)
	}
	closed := notifyChannelClose(ch)
	publishText(t, ch, "inner", "", "direct to internal")
	awaitCloseCode(t, closed, 403)
}

func TestExchangeToExchangeBinding(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("src", "direct", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("dst", "topic", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	if err := ch.QueueBind("q", "a.*", "dst", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeBind("dst", "a.b", "src", false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "src", "a.b", "1") // src binding and dst binding both match
	publishText(t, ch, "src", "a.c", "2") // src binding does not match
	publishText(t, ch, "dst", "a.c", "3") // straight to dst
	publishText(t, ch, "src", "x.y", "4") // nothing matches
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"1", "3"}) {
		t.Fatalf("got %q, want [1 3]", got)
	}
	if err := ch.ExchangeUnbind("dst", "a.b", "src", false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "src", "a.b", "5")
	if got := drainText(t, ch, "q"); len(got) != 0 {
		t.Fatalf("got %q after exchange.unbind, want nothing", got)
	}
}

func TestExchangeBindingLoopDeliversOnce(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	for _, x := range []string{"x1", "x2"} {
		if err := ch.ExchangeDeclare(x, "fanout", false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.ExchangeBind("x2", "", "x1", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeBind("x1", "", "x2", false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	for _, x := range []string{"x1", "x2"} {
		if err := ch.QueueBind("q", "", x, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	publishText(t, ch, "x1", "", "from x1")
	publishText(t, ch, "x2", "", "from x2")
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"from x1", "from x2"}) {
		t.Fatalf("got %q, want each message once", got)
	}
}

func TestDirectAndFanoutRouting(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("d", "direct", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("f", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"q1", "q2", "q3"} {
		declareTransientQueue(t, ch, q)
		if err := ch.QueueBind(q, "ignored-"+q, "f", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range [][2]string{{"q1", "red"}, {"q2", "red"}, {"q2", "green"}, {"q3", ""}} {
		if err := ch.QueueBind(b[0], b[1], "d", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	publishText(t, ch, "d", "red", "red")
	publishText(t, ch, "d", "green", "green")
	publishText(t, ch, "d", "", "empty")
	publishText(t, ch, "d", "blue", "blue")
	publishText(t, ch, "f", "anything", "fan")
	publishText(t, ch, "", "q3", "default")
	want := map[string][]string{
		"q1": {"red", "fan"},
		"q2": {"red", "green", "fan"},
		"q3": {"empty", "fan", "default"},
	}
	for q, w := range want {
		if got := drainText(t, ch, q); !reflect.DeepEqual(got, w) {
			t.Errorf("%s got %q, want %q", q, got, w)
		}
	}
}

// topicCases are binding keys and routing keys with whether they match, as RabbitMQ
// decides: words split at dots, "*" is exactly one word, "#" zero or more, and an empty
// routing key has no words.
var topicCases = []struct {
	pattern, key string
	match        bool
}{
	{"a.b.c", "a.b.c", true},
	{"a.b.c", "a.b", false},
	{"a.b", "a.b.c", false},
	{"a.*.c", "a.b.c", true},
	{"a.*.c", "a.c", false},
	{"a.*.c", "a.b.b.c", false},
	{"a.*.c", "a..c", true},
	{"a.#", "a", true},
	{"a.#", "a.b", true},
	{"a.#", "a.b.c", true},
	{"a.#", "ab", false},
	{"a.#", "b.a", false},
	{"#", "", true},
	{"#", "a", true},
	{"#", "a.b.c", true},
	{"#", ".", true},
	{"*", "", false},
	{"*", "a", true},
	{"*", "a.b", false},
	{"*", ".", false},
	{"#.c", "c", true},
	{"#.c", "a.b.c", true},
	{"#.c", "a.b.c.d", false},
	{"#.c", "", false},
	{"a.#.c", "a.c", true},
	{"a.#.c", "a.b.c", true},
	{"a.#.c", "a.b.b.c", true},
	{"a.#.c", "a.b.b.d", false},
	{"a.#.c", "a.c.c", true},
	{"a..c", "a..c", true},
	{"a..c", "a.b.c", false},
	{"a..c", "a.c", false},
	{"a.", "a.", true},
	{"a.", "a", false},
	{".a", ".a", true},
	{"*.*", ".", true},
	{"*.*", "a", false},
	{"", "", true},
	{"", "a", false},
	{"a.*", "a.", true},
	{"a.*.#", "a", false},
	{"a.*.#", "a.b", true},
	{"a.*.#", "a.b.c.d", true},
	{"#.*", "", false},
	{"#.*", "a.b", true},
	{"*.#", "a", true},
	{"#.#", "", true},
	{"#.#", "a.b", true},
	{"*.*.*", "a.b.c", true},
	{"*.*.*", "a.b", false},
	{"a.b", "a.B", false},
	{"a*", "ab", false},
	{"a*", "a*", true},
	{"a#", "a", false},
}

func TestTopicRouting(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	for i, tc := range topicCases {
		x, q := fmt.Sprintf("t%d", i), fmt.Sprintf("tq%d", i)
		if err := ch.ExchangeDeclare(x, "topic", false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		declareTransientQueue(t, ch, q)
		if err := ch.QueueBind(q, tc.pattern, x, false, nil); err != nil {
			t.Fatal(err)
		}
		publishText(t, ch, x, tc.key, "m")
		if got := len(drainText(t, ch, q)) == 1; got != tc.match {
			t.Errorf("binding %q, key %q: routed=%v, want %v", tc.pattern, tc.key, got, tc.match)
		}
	}
}

func TestTopicRoutingEnqueuesOncePerQueue(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("t", "topic", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	declareTransientQueue(t, ch, "other")
	for _, p := range []string{"a.*", "a.#", "#", "*.b", "a.b"} {
		if err := ch.QueueBind("q", p, "t", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.QueueBind("other", "#", "t", false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "t", "a.b", "m")
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"m"}) {
		t.Fatalf("q got %q, want one copy", got)
	}
	if got := drainText(t, ch, "other"); !reflect.DeepEqual(got, []string{"m"}) {
		t.Fatalf("other got %q, want one copy", got)
	}
}

func TestTopicUnbindCollapsedKey(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("t", "topic", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	for _, p := range []string{"a.#.#.b", "a.#.b"} {
		if err := ch.QueueBind("q", p, "t", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	publishText(t, ch, "t", "a.x.b", "both")
	if err := ch.QueueUnbind("q", "a.#.#.b", "t", nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "t", "a.x.b", "a.#.b")
	if err := ch.QueueUnbind("q", "a.#.b", "t", nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ch, "t", "a.x.b", "none")
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"both", "a.#.b"}) {
		t.Fatalf("q got %q, want both then a.#.b", got)
	}
}

func TestHeadersRouting(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("h", "headers", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	bindings := map[string]amqp091.Table{
		"all":        {"x-match": "all", "a": int32(1), "b": "x"},
		"default":    {"a": int32(1), "b": "x"},
		"any":        {"x-match": "any", "a": int32(1), "b": "x"},
		"all-with-x": {"x-match": "all-with-x", "x-k": "v", "b": "x"},
		"all-no-x":   {"x-match": "all", "x-k": "v"},
		"any-with-x": {"x-match": "any-with-x", "x-k": "v", "c": "z"},
		"any-no-x":   {"x-match": "any", "x-k": "v"},
		"int":        {"n": int32(5)},
		"string":     {"n": "5"},
		"present":    {"p": nil},
	}
	for q, args := range bindings {
		declareTransientQueue(t, ch, q)
		if err := ch.QueueBind(q, "", "h", false, args); err != nil {
			t.Fatalf("bind %s: %v", q, err)
		}
	}
	msgs := []struct {
		body    string
		headers amqp091.Table
		want    []string
	}{
		{"a1-bx", amqp091.Table{"a": int32(1), "b": "x"}, []string{"all", "default", "any", "all-no-x"}},
		{"a1-bx-extra", amqp091.Table{"a": int32(1), "b": "x", "zz": true}, []string{"all", "default", "any", "all-no-x"}},
		{"a1", amqp091.Table{"a": int32(1)}, []string{"any", "all-no-x"}},
		{"a2-bx", amqp091.Table{"a": int32(2), "b": "x"}, []string{"any", "all-no-x"}},
		{"xk-bx", amqp091.Table{"x-k": "v", "b": "x"}, []string{"any", "all-with-x", "all-no-x", "any-with-x"}},
		{"xk-wrong", amqp091.Table{"x-k": "w", "b": "x"}, []string{"any", "all-no-x"}},
		{"cz", amqp091.Table{"c": "z"}, []string{"all-no-x", "any-with-x"}},
		{"n-int", amqp091.Table{"n": int32(5)}, []string{"all-no-x", "int"}},
		{"n-string", amqp091.Table{"n": "5"}, []string{"all-no-x", "string"}},
		{"n-6", amqp091.Table{"n": int32(6)}, []string{"all-no-x"}},
		{"p-string", amqp091.Table{"p": "anything"}, []string{"all-no-x", "present"}},
		{"p-void", amqp091.Table{"p": nil}, []string{"all-no-x", "present"}},
		{"none", nil, []string{"all-no-x"}},
	}
	for _, m := range msgs {
		if err := ch.Publish("h", "ignored", false, false, amqp091.Publishing{Headers: m.headers, Body: []byte(m.body)}); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string][]string{}
	for _, m := range msgs {
		for _, q := range m.want {
			want[q] = append(want[q], m.body)
		}
	}
	for q := range bindings {
		got := drainText(t, ch, q)
		if !slices.Equal(got, want[q]) {
			t.Errorf("queue %s got %q, want %q", q, got, want[q])
		}
	}
}

func TestHeadersMatchComparesIntegersByValue(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	if err := ch.ExchangeDeclare("h", "headers", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "q")
	if err := ch.QueueBind("q", "", "h", false, amqp091.Table{"n": int32(5)}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []any{int64(5), int16(5), int8(5), uint8(5)} {
		if err := ch.Publish("h", "", false, false, amqp091.Publishing{Headers: amqp091.Table{"n": v}, Body: []byte(fmt.Sprintf("%T", v))}); err != nil {
			t.Fatal(err)
		}
	}
	if got := drainText(t, ch, "q"); !reflect.DeepEqual(got, []string{"int64", "int16", "int8", "uint8"}) {
		t.Fatalf("got %q, want every integer width to match", got)
	}
}

func TestHeadersBindInvalidXMatch(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	declareTransientQueue(t, ch, "q")
	wantReplyCode(t, ch.QueueBind("q", "", "amq.headers", false, amqp091.Table{"x-match": "some"}), 406)
}

func TestSplitWords(t *testing.T) {
	for _, tc := range []struct {
		key  string
		want []string
	}{
		{"", nil},
		{"a", []string{"a"}},
		{"a.b.c", []string{"a", "b", "c"}},
		{".", []string{"", ""}},
		{"a.", []string{"a", ""}},
		{".a", []string{"", "a"}},
		{"a..b", []string{"a", "", "b"}},
	} {
		var got []string
		for _, w := range splitWords(nil, []byte(tc.key)) {
			got = append(got, string(w))
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("splitWords(%q) = %q, want %q", tc.key, got, tc.want)
		}
	}
}

// topicTrie is a topicNode with one queue per binding, for tests.
type topicTrie struct {
	root     topicNode
	bindings map[string]*binding // by queue name
	visits   int                 // nodes the last match visited
}

func newTopicTrie() *topicTrie { return &topicTrie{bindings: map[string]*binding{}} }

// add binds a queue named name with pattern.
func (tt *topicTrie) add(name, pattern string) {
	b := &binding{queue: &queue{name: name}, key: pattern}
	tt.bindings[name] = b
	tt.root.add(b)
}

func (tt *topicTrie) remove(name string) {
	tt.root.remove(tt.bindings[name])
	delete(tt.bindings, name)
}

// match returns the sorted names of the queues key is routed to.
func (tt *topicTrie) match(key string) []string {
	var rs routeSet
	rs.words = splitWords(rs.words[:0], []byte(key))
	tt.root.match(rs.words, 0, &rs)
	tt.visits = rs.topicVisits
	var names []string
	for _, b := range rs.hits {
		if !slices.Contains(names, b.queue.name) {
			names = append(names, b.queue.name)
		}
	}
	sort.Strings(names)
	return names
}

func TestTopicTrie(t *testing.T) {
	tt := newTopicTrie()
	for i, tc := range topicCases {
		tt.add(fmt.Sprint(i), tc.pattern)
	}
	for i, tc := range topicCases {
		got := slices.Contains(tt.match(tc.key), fmt.Sprint(i))
		if got != tc.match {
			t.Errorf("pattern %q key %q: matched=%v, want %v", tc.pattern, tc.key, got, tc.match)
		}
	}
	// Every match agrees with the naive matcher over all patterns at once.
	for _, tc := range topicCases {
		var want []string
		for i, p := range topicCases {
			if naiveTopicMatch(p.pattern, tc.key) {
				want = append(want, fmt.Sprint(i))
			}
		}
		sort.Strings(want)
		if got := tt.match(tc.key); !slices.Equal(got, want) {
			t.Errorf("key %q: trie %v, naive %v", tc.key, got, want)
		}
	}
	// Removing bindings prunes the trie down to an empty root.
	for i := range topicCases {
		tt.remove(fmt.Sprint(i))
		if got := tt.match("a.b.c"); slices.Contains(got, fmt.Sprint(i)) {
			t.Fatalf("removed binding %d still matches", i)
		}
	}
	if !tt.root.empty() {
		t.Fatalf("trie not empty after removing every binding: %+v", tt.root)
	}
}

func TestTopicTrieSharedPrefixes(t *testing.T) {
	tt := newTopicTrie()
	tt.add("q1", "a.b")
	tt.add("q2", "a.b.c")
	tt.add("q3", "a.#")
	tt.add("q4", "a.b")
	if got := tt.match("a.b"); !slices.Equal(got, []string{"q1", "q3", "q4"}) {
		t.Fatalf("a.b matched %v", got)
	}
	tt.remove("q1")
	if got := tt.match("a.b"); !slices.Equal(got, []string{"q3", "q4"}) {
		t.Fatalf("after removing q1, a.b matched %v", got)
	}
	tt.remove("q4")
	if got := tt.match("a.b.c"); !slices.Equal(got, []string{"q2", "q3"}) {
		t.Fatalf("a.b.c matched %v", got)
	}
	tt.remove("q3")
	if got := tt.match("a.b"); len(got) != 0 {
		t.Fatalf("a.b matched %v after its bindings went", got)
	}
	if tt.root.hash != nil || tt.root.star != nil || len(tt.root.children) != 1 {
		t.Fatalf("root not pruned: %+v", tt.root)
	}
	tt.remove("q2")
	if !tt.root.empty() {
		t.Fatalf("trie not empty: %+v", tt.root)
	}
}

// topicNodes counts the nodes of the trie rooted at n.
func topicNodes(n *topicNode) int {
	if n == nil {
		return 0
	}
	count := 1 + topicNodes(n.star) + topicNodes(n.hash)
	for _, c := range n.children {
		count += topicNodes(c)
	}
	return count
}

// repeatWords is n copies of w joined with dots.
func repeatWords(w string, n int) string {
	return strings.TrimSuffix(strings.Repeat(w+".", n), ".")
}

// TestTopicMatchPolynomial binds keys full of "#", on which a backtracking matcher takes
// exponential time, and checks by counting visits that no trie node is visited twice at one
// word position. The cases grow, so a backtracking matcher fails on the small ones first.
func TestTopicMatchPolynomial(t *testing.T) {
	key128 := repeatWords("a", 128) // 255 bytes, the longest routing key
	for _, tc := range []struct {
		patterns []string
		key      string
		want     []string // names (indexes) of the patterns that match
	}{
		{[]string{"#.#.#.#"}, repeatWords("a", 8), []string{"0"}},
		{[]string{"#.a.#.a.#.a.#.a", "#.b", "*.#.*.#.*", "a.#.#.a", "#.a.#.b"}, repeatWords("a", 12), []string{"0", "2", "3"}},
		{[]string{repeatWords("#", 12), repeatWords("#.a", 6) + ".#"}, repeatWords("a", 24), []string{"0", "1"}},
		{[]string{repeatWords("#", 127)}, key128, []string{"0"}},
		{[]string{
			repeatWords("#.a", 64),
			repeatWords("#.a", 63) + ".#.b",
			"#.b",
			repeatWords("#.*", 64),
			repeatWords("*.#", 65),
			repeatWords("a", 127) + ".#.#.a.#",
			repeatWords("#", 64) + "." + repeatWords("a.#", 32),
		}, key128, []string{"0", "3", "4", "5", "6"}},
	} {
		tt := newTopicTrie()
		for i, p := range tc.patterns {
			tt.add(fmt.Sprint(i), p)
		}
		got := tt.match(tc.key)
		bound := topicNodes(&tt.root) * (len(splitWords(nil, []byte(tc.key))) + 1)
		if tt.visits > bound {
			t.Fatalf("patterns %q key %q: %d visits, more than nodes × (words+1) = %d", tc.patterns, tc.key, tt.visits, bound)
		}
		if !slices.Equal(got, tc.want) {
			t.Fatalf("patterns %q key %q: matched %v, want %v", tc.patterns, tc.key, got, tc.want)
		}
	}
}

// TestTopicCollapsedKeys checks that keys equal up to runs of "#" share a trie node but stay
// distinct bindings, each found and removed by its own key.
func TestTopicCollapsedKeys(t *testing.T) {
	x := newExchange("t", kindTopic, false, false, false, nil)
	q := &queue{name: "q"}
	long := &binding{source: x, queue: q, key: "a.#.#.#.b"}
	short := &binding{source: x, queue: q, key: "a.#.b"}
	if !x.addBindingLocked(long) || !x.addBindingLocked(short) {
		t.Fatal("a.#.#.#.b and a.#.b are distinct bindings")
	}
	if x.addBindingLocked(&binding{source: x, queue: q, key: "a.#.#.#.b"}) {
		t.Fatal("a.#.#.#.b bound twice")
	}
	x.topic.mu.Lock()
	x.topic.applyLocked()
	x.topic.mu.Unlock()
	if n := topicNodes(&x.topic.root); n != 4 {
		t.Fatalf("trie has %d nodes, want 4 (root a # b)", n)
	}
	route := func(key string) []*queue {
		var rs routeSet
		x.route(&message{data: []byte(key), keyLen: uint8(len(key))}, &rs)
		return rs.queues
	}
	if got := route("a.x.y.b"); len(got) != 1 {
		t.Fatalf("a.x.y.b routed to %d queues, want 1", len(got))
	}
	if b := x.findBindingLocked(&binding{queue: q, key: "a.#.#.#.b"}); b != long {
		t.Fatal("unbind a.#.#.#.b did not find its binding")
	}
	x.removeBindingLocked(long)
	if got := route("a.b"); len(got) != 1 {
		t.Fatalf("after unbinding a.#.#.#.b, a.b routed to %d queues, want 1 through a.#.b", len(got))
	}
	if x.findBindingLocked(&binding{queue: q, key: "a.#.#.#.b"}) != nil {
		t.Fatal("a.#.#.#.b found after its unbind")
	}
	x.removeBindingLocked(x.findBindingLocked(&binding{queue: q, key: "a.#.b"}))
	x.topic.mu.Lock()
	x.topic.applyLocked()
	x.topic.mu.Unlock()
	if !x.topic.root.empty() {
		t.Fatalf("trie not empty after both unbinds: %+v", x.topic.root)
	}
}

// TestTopicRoutingThroughTopics routes through two topic exchanges, which share the
// routeSet's record of where their "#" nodes were matched from.
func TestTopicRoutingThroughTopics(t *testing.T) {
	x1 := newExchange("x1", kindTopic, false, false, false, nil)
	x2 := newExchange("x2", kindTopic, false, false, false, nil)
	q1, q2 := &queue{name: "q1"}, &queue{name: "q2"}
	x1.addBindingLocked(&binding{source: x1, queue: q1, key: "#.c.#"})
	x1.addBindingLocked(&binding{source: x1, dest: x2, key: "a.#"})
	x2.addBindingLocked(&binding{source: x2, queue: q2, key: "#.b.#.c"})
	x2.addBindingLocked(&binding{source: x2, dest: x1, key: "#"}) // a loop back
	for _, tc := range []struct {
		key  string
		want []*queue
	}{
		{"a.b.c", []*queue{q1, q2}},
		{"a.b.b.c", []*queue{q1, q2}},
		{"a.c.b", []*queue{q1}},
		{"b.c", []*queue{q1}},
		{"a.b", nil},
	} {
		var rs routeSet
		vh := newVhost("/")
		vh.mu.RLock()
		vh.routeLocked(x1, &message{data: []byte(tc.key), keyLen: uint8(len(tc.key))}, &rs)
		vh.mu.RUnlock()
		slices.SortFunc(rs.queues, func(a, b *queue) int { return strings.Compare(a.name, b.name) })
		if !slices.Equal(rs.queues, tc.want) {
			t.Errorf("key %q routed to %v, want %v", tc.key, rs.queues, tc.want)
		}
	}
}

// naiveTopicMatch is the topic matching rule written as plainly as possible, to check
// the trie against.
func naiveTopicMatch(pattern, key string) bool {
	var p, k []string
	if pattern != "" {
		p = strings.Split(pattern, ".")
	}
	if key != "" {
		k = strings.Split(key, ".")
	}
	return naiveWordsMatch(p, k)
}

func naiveWordsMatch(p, k []string) bool {
	if len(p) == 0 {
		return len(k) == 0
	}
	switch p[0] {
	case "#":
		for i := 0; i <= len(k); i++ {
			if naiveWordsMatch(p[1:], k[i:]) {
				return true
			}
		}
		return false
	case "*":
		return len(k) > 0 && naiveWordsMatch(p[1:], k[1:])
	}
	return len(k) > 0 && p[0] == k[0] && naiveWordsMatch(p[1:], k[1:])
}

// fuzzTopicText maps arbitrary fuzz input onto a small alphabet, so that patterns and keys
// share words often; "|" separates patterns. Bytes of the alphabet stay as they are, so
// the seeds read as written.
func fuzzTopicText(b []byte, alphabet string, maxLen int) string {
	var s strings.Builder
	for i, c := range b {
		if i == maxLen {
			break
		}
		if strings.IndexByte(alphabet, c) < 0 {
			c = alphabet[int(c)%len(alphabet)]
		}
		s.WriteByte(c)
	}
	return s.String()
}

func FuzzTopicMatch(f *testing.F) {
	for _, tc := range topicCases {
		f.Add([]byte(tc.pattern), []byte(tc.key))
	}
	f.Add([]byte("a.*.c|a.#|#|*|#.c|a.#.c|a..c"), []byte("a.b.c"))
	f.Add([]byte("#.#.#|*.#.*|#.a.#"), []byte("a"))
	f.Add([]byte("||"), []byte(""))
	// Runs of "#", which the trie collapses, next to keys that differ only in them.
	f.Add([]byte("a.#.#.b|a.#.b|#.#.#.#|#.#.a.#.#|*.#.#.*|#.#"), []byte("a.b.a.b"))
	f.Add([]byte("#.a.#.a.#.a.#.a|#.#.#.#.#.#.#.#.b|a.#.#.#.a"), []byte("a.a.a.a.a.a.a.a"))
	f.Add([]byte("#.#.*.#.#.*.#.#|*.#.#.*|.#.#.|#.#."), []byte("a..b."))
	f.Fuzz(func(t *testing.T, patterns, key []byte) {
		ps := strings.Split(fuzzTopicText(patterns, "ab.*#|", 48), "|")
		k := fuzzTopicText(key, "ab.*#", 16)
		tt := newTopicTrie()
		for i, p := range ps {
			tt.add(fmt.Sprint(i), p)
		}
		check := func(when string) {
			var want []string
			for name, b := range tt.bindings {
				if naiveTopicMatch(b.key, k) {
					want = append(want, name)
				}
			}
			sort.Strings(want)
			if got := tt.match(k); !slices.Equal(got, want) {
				t.Fatalf("%s: patterns %q key %q: trie %v, naive %v", when, ps, k, got, want)
			}
			if bound := topicNodes(&tt.root) * (len(splitWords(nil, []byte(k))) + 1); tt.visits > bound {
				t.Fatalf("%s: patterns %q key %q: %d visits, more than nodes × (words+1) = %d", when, ps, k, tt.visits, bound)
			}
		}
		check("all bound")
		for i := 0; i < len(ps); i += 2 {
			tt.remove(fmt.Sprint(i))
		}
		check("half removed")
		for i := 1; i < len(ps); i += 2 {
			tt.remove(fmt.Sprint(i))
		}
		if !tt.root.empty() {
			t.Fatalf("patterns %q: trie not empty after removing all", ps)
		}
	})
}

// TestTopicMatchHoldsNoVhostLock: a topic match runs under its exchange's own read lock,
// not the vhost's, and binds queue their change instead of waiting for it. Here a match
// that never ends is simulated by holding that read lock: while it is held, and a publish
// to the exchange waits on it, other clients of the vhost declare, bind to the same
// exchange, and publish elsewhere without waiting.
func TestTopicMatchHoldsNoVhostLock(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	c := dial(t, url)
	ch := openChannel(t, c)
	declareTransientQueue(t, ch, "t.first")
	if err := ch.QueueBind("t.first", "a.#", "amq.topic", false, nil); err != nil {
		t.Fatal(err)
	}
	x := srv.vhost("/").exchanges["amq.topic"]
	x.topic.mu.RLock() // a match in progress
	released := false
	defer func() {
		if !released {
			x.topic.mu.RUnlock()
		}
	}()

	other := openChannel(t, dial(t, url))
	done := make(chan error, 1)
	go func() {
		// Waits on the held lock: the bind above is applied at this match.
		done <- other.Publish("amq.topic", "a.b", false, false, amqp091.Publishing{Body: []byte("late")})
	}()
	ops := openChannel(t, c)
	declareTransientQueue(t, ops, "t.second")
	if err := ops.QueueBind("t.second", "#.b", "amq.topic", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ops.ExchangeDeclare("t.x", "fanout", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishText(t, ops, "", "t.second", "direct")
	if got := drainText(t, ops, "t.second"); !slices.Equal(got, []string{"direct"}) {
		t.Fatalf("t.second holds %q, want the message published while the match was held", got)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	released = true
	x.topic.mu.RUnlock()
	pollFor(t, "the held publish to route", func() bool { return queueReady(t, ops, "t.first") == 1 })
	pollFor(t, "the held publish to reach the queue bound meanwhile", func() bool { return queueReady(t, ops, "t.second") == 1 })
}

// declareWithAE declares a transient exchange whose alternate exchange is ae ("" for none).
func declareWithAE(t testing.TB, ch *amqp091.Channel, name, kind, ae string) {
	t.Helper()
	var args amqp091.Table
	if ae != "" {
		args = amqp091.Table{"alternate-exchange": ae}
	}
	if err := ch.ExchangeDeclare(name, kind, false, false, false, false, args); err != nil {
		t.Fatalf("declare exchange %s: %v", name, err)
	}
}

// bindNewQueue declares a transient queue and binds it to exchange.
func bindNewQueue(t testing.TB, ch *amqp091.Channel, queue, exchange, key string, args amqp091.Table) {
	t.Helper()
	declareTransientQueue(t, ch, queue)
	if err := ch.QueueBind(queue, key, exchange, false, args); err != nil {
		t.Fatalf("bind %s to %s: %v", queue, exchange, err)
	}
}

// takeReturn receives one basic.return or fails after recvWait.
func (c *confirmChannel) takeReturn() amqp091.Return {
	c.t.Helper()
	select {
	case r := <-c.returns:
		return r
	case <-time.After(recvWait):
		c.t.Fatal("no basic.return within the wait")
	}
	panic("unreachable")
}

// noReturns checks that no basic.return came; after wait(), any return for the messages
// confirmed has arrived, as a return precedes its message's confirm.
func (c *confirmChannel) noReturns() {
	c.t.Helper()
	if n := len(c.returns); n > 0 {
		r := <-c.returns
		c.t.Fatalf("%d basic.return(s), the first %d %s for %q", n, r.ReplyCode, r.ReplyText, r.Body)
	}
}

// TestAlternateExchangeTakesUnroutable: of the messages published to an exchange of each
// kind, those that match a binding go there and not to the alternate exchange; those that
// match none go to it, with their exchange and routing key, and mandatory ones are not
// returned. Each is confirmed.
func TestAlternateExchangeTakesUnroutable(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	ch := openChannel(t, conn)
	declareWithAE(t, ch, "ae", "fanout", "")
	bindNewQueue(t, ch, "caught", "ae", "", nil)
	declareWithAE(t, ch, "x.direct", "direct", "ae")
	bindNewQueue(t, ch, "q.direct", "x.direct", "k", nil)
	declareWithAE(t, ch, "x.topic", "topic", "ae")
	bindNewQueue(t, ch, "q.topic", "x.topic", "k.*", nil)
	declareWithAE(t, ch, "x.headers", "headers", "ae")
	bindNewQueue(t, ch, "q.headers", "x.headers", "", amqp091.Table{"h": "v"})
	declareWithAE(t, ch, "x.fanout", "fanout", "ae")
	bindNewQueue(t, ch, "q.fanout", "x.fanout", "", nil)
	declareWithAE(t, ch, "x.empty", "fanout", "ae") // no bindings: routes nothing

	cc := newConfirmChannel(t, conn)
	routed := amqp091.Publishing{Headers: amqp091.Table{"h": "v"}, Body: []byte("routed")}
	unrouted := amqp091.Publishing{Headers: amqp091.Table{"h": "w"}}
	for _, x := range []string{"x.direct", "x.topic", "x.headers", "x.fanout"} {
		cc.publish(x, "k.k", true, routed) // x.direct matches with key k
		if x == "x.direct" {
			cc.publish(x, "k", true, routed)
		}
		if x != "x.fanout" {
			unrouted.Body = []byte("from " + x)
			cc.publish(x, "nomatch", true, unrouted)
		}
	}
	unrouted.Body = []byte("from x.empty")
	cc.publish("x.empty", "nomatch", true, unrouted)
	cc.wait()
	cc.noReturns()

	for _, q := range []string{"q.direct", "q.topic", "q.headers", "q.fanout"} {
		if got := drainText(t, ch, q); !slices.Equal(got, []string{"routed"}) {
			t.Errorf("%s holds %q, want one routed message", q, got)
		}
	}
	// x.direct's message with key k.k matched nothing and was caught too.
	var got []string
	for _, d := range getAll(t, ch, "caught") {
		got = append(got, string(d.Body)+" "+d.Exchange+" "+d.RoutingKey)
	}
	want := []string{"routed x.direct k.k", "from x.direct x.direct nomatch", "from x.topic x.topic nomatch",
		"from x.headers x.headers nomatch", "from x.empty x.empty nomatch"}
	if !slices.Equal(got, want) {
		t.Fatalf("the alternate exchange's queue holds %q (body, exchange, key), want %q", got, want)
	}
}

// TestAlternateExchangeChain: a message the first alternate cannot route goes on to its
// alternate, with the routing key and headers it was published with.
func TestAlternateExchangeChain(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	ch := openChannel(t, dial(t, url))
	declareWithAE(t, ch, "ae2", "headers", "")
	bindNewQueue(t, ch, "q2", "ae2", "", amqp091.Table{"x-match": "all", "h": "v"})
	declareWithAE(t, ch, "ae1", "topic", "ae2")
	bindNewQueue(t, ch, "q1", "ae1", "caught.#", nil)
	declareWithAE(t, ch, "x", "direct", "ae1")

	pub := func(key, h, body string) {
		t.Helper()
		p := amqp091.Publishing{Headers: amqp091.Table{"h": h}, Body: []byte(body)}
		if err := ch.Publish("x", key, false, false, p); err != nil {
			t.Fatal(err)
		}
	}
	pub("caught.one", "v", "first alternate")
	pub("a.b", "v", "second alternate")
	pub("a.b", "w", "nowhere")
	if got := drainText(t, ch, "q1"); !slices.Equal(got, []string{"first alternate"}) {
		t.Errorf("q1 holds %q, want the message the first alternate routes", got)
	}
	ds := getAll(t, ch, "q2")
	if len(ds) != 1 || string(ds[0].Body) != "second alternate" {
		t.Fatalf("q2 holds %q, want only the message the second alternate routes", deliveryBodies(ds))
	}
	if d := ds[0]; d.Exchange != "x" || d.RoutingKey != "a.b" || d.Headers["h"] != "v" {
		t.Fatalf("delivered from %q with key %q and headers %v, want those it was published with", d.Exchange, d.RoutingKey, d.Headers)
	}
}

// TestAlternateExchangeCycle: alternates that lead back to an exchange already tried, or
// to itself, end the chain: the message is unroutable, and a mandatory one is returned and
// confirmed. A queue bound later to one of them catches the next message once.
func TestAlternateExchangeCycle(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	ch := openChannel(t, conn)
	declareWithAE(t, ch, "a", "direct", "b")
	declareWithAE(t, ch, "b", "fanout", "c")
	declareWithAE(t, ch, "c", "topic", "a")
	declareWithAE(t, ch, "self", "direct", "self")

	cc := newConfirmChannel(t, conn)
	for _, x := range []string{"a", "b", "c", "self"} {
		cc.publish(x, "k", true, amqp091.Publishing{Body: []byte(x)})
		if r := cc.takeReturn(); r.ReplyCode != 312 || r.Exchange != x || string(r.Body) != x {
			t.Fatalf("basic.return %d from %q of %q, want 312 NO_ROUTE of the message published to %q", r.ReplyCode, r.Exchange, r.Body, x)
		}
	}
	cc.wait()

	bindNewQueue(t, ch, "q", "b", "", nil)
	for _, x := range []string{"a", "b", "c"} {
		cc.publish(x, "k", true, amqp091.Publishing{Body: []byte(x)})
	}
	cc.wait()
	cc.noReturns()
	if got := drainText(t, ch, "q"); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("q holds %q, want each message once", got)
	}
}

// TestAlternateExchangeMissing: an alternate exchange that does not exist leaves the
// message unroutable, and is logged once per exchange, not per message. It is looked up
// when routing, so declaring it later puts it to use.
func TestAlternateExchangeMissing(t *testing.T) {
	t.Parallel()
	var logs lockedBuffer
	_, url := newTestServer(t, Config{Logger: logs.logger()})
	conn := dial(t, url)
	ch := openChannel(t, conn)
	declareWithAE(t, ch, "x", "direct", "nope")
	declareWithAE(t, ch, "y", "topic", "nope")

	cc := newConfirmChannel(t, conn)
	const n = 50
	for i := range n {
		cc.publish("x", "k", true, amqp091.Publishing{Body: []byte(fmt.Sprint(i))})
		cc.publish("y", "k", false, amqp091.Publishing{Body: []byte(fmt.Sprint(i))})
	}
	cc.wait()
	for i := range n {
		if r := cc.takeReturn(); r.ReplyCode != 312 || string(r.Body) != fmt.Sprint(i) {
			t.Fatalf("return %d: %d %q, want 312 of message %d", i, r.ReplyCode, r.Body, i)
		}
	}
	cc.noReturns()
	const warning = "alternate exchange not found"
	out := logs.String()
	if got := strings.Count(out, warning); got != 2 {
		t.Fatalf("logged %q %d times for %d publishes to two exchanges, want 2:\n%s", warning, got, 2*n, out)
	}
	for _, x := range []string{"x", "y"} {
		if !strings.Contains(out, "exchange="+x+" alternate_exchange=nope") {
			t.Errorf("no warning names exchange %s and its alternate:\n%s", x, out)
		}
	}

	declareWithAE(t, ch, "nope", "fanout", "")
	bindNewQueue(t, ch, "caught", "nope", "", nil)
	cc.publish("x", "k", true, amqp091.Publishing{Body: []byte("now routed")})
	cc.wait()
	cc.noReturns()
	if got := drainText(t, ch, "caught"); !slices.Equal(got, []string{"now routed"}) {
		t.Fatalf("caught holds %q, want the message published after the alternate was declared", got)
	}
}

// TestAlternateExchangeWithExchangeBindings follows RabbitMQ's route1: each exchange a
// message reaches uses its own alternate when none of its own bindings match. A binding
// to another exchange counts as a match, even if that exchange then routes nowhere.
func TestAlternateExchangeWithExchangeBindings(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	conn := dial(t, url)
	ch := openChannel(t, conn)
	declareWithAE(t, ch, "src-ae", "fanout", "")
	bindNewQueue(t, ch, "src-caught", "src-ae", "", nil)
	declareWithAE(t, ch, "dst-ae", "fanout", "")
	bindNewQueue(t, ch, "dst-caught", "dst-ae", "", nil)
	declareWithAE(t, ch, "src", "direct", "src-ae")
	declareWithAE(t, ch, "dst", "direct", "dst-ae")
	bindNewQueue(t, ch, "dq", "dst", "d", nil)
	declareWithAE(t, ch, "plain", "direct", "")
	for _, b := range []struct{ dst, key string }{{"dst", "d"}, {"dst", "k"}, {"plain", "p"}} {
		if err := ch.ExchangeBind(b.dst, b.key, "src", false, nil); err != nil {
			t.Fatal(err)
		}
	}

	cc := newConfirmChannel(t, conn)
	cc.publish("src", "d", true, amqp091.Publishing{Body: []byte("d")}) // src → dst → dq
	cc.publish("src", "k", true, amqp091.Publishing{Body: []byte("k")}) // src → dst, which matches nothing → dst-ae
	cc.publish("src", "z", true, amqp091.Publishing{Body: []byte("z")}) // src matches nothing → src-ae
	cc.publish("src", "p", true, amqp091.Publishing{Body: []byte("p")}) // src → plain, which matches nothing and has no alternate
	if r := cc.takeReturn(); string(r.Body) != "p" {
		t.Fatalf("returned %q, want only p", r.Body)
	}
	cc.wait()
	cc.noReturns()
	for q, want := range map[string]string{"dq": "d", "dst-caught": "k", "src-caught": "z"} {
		if got := drainText(t, ch, q); !slices.Equal(got, []string{want}) {
			t.Errorf("%s holds %q, want [%s]", q, got, want)
		}
	}
}

// TestAlternateExchangeEquivalence: a redeclare must name the same alternate exchange, or
// none if there was none, as in RabbitMQ; a new exchange's alternate must be a longstr.
func TestAlternateExchangeEquivalence(t *testing.T) {
	t.Parallel()
	_, url := newTestServer(t)
	c := dial(t, url)
	declareWithAE(t, openChannel(t, c), "x", "direct", "ae1")
	declareWithAE(t, openChannel(t, c), "x", "direct", "ae1")
	const prefix = "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'x' in vhost '/': "
	for _, tc := range []struct {
		args amqp091.Table
		text string
	}{
		{nil, prefix + "received none but current is ae1"},
		{amqp091.Table{"alternate-exchange": "ae2"}, prefix + "received ae2 but current is ae1"},
		{amqp091.Table{"alternate-exchange": int32(7)}, prefix + "received 7 but current is ae1"},
	} {
		err := openChannel(t, c).ExchangeDeclare("x", "direct", false, false, false, false, tc.args)
		if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || e.Reason != tc.text {
			t.Errorf("redeclare with %v: %v, want 406 %q", tc.args, err, tc.text)
		}
	}
	err := openChannel(t, c).ExchangeDeclare("y", "direct", false, false, false, false, amqp091.Table{"alternate-exchange": int32(7)})
	const text = "PRECONDITION_FAILED - invalid type 'signedint' for arg 'alternate-exchange' in exchange 'y' in vhost '/'"
	if e, ok := err.(*amqp091.Error); !ok || e.Code != 406 || e.Reason != text {
		t.Fatalf("declare with an integer alternate: %v, want 406 %q", err, text)
	}
	wantReplyCode(t, openChannel(t, c).ExchangeDeclarePassive("y", "direct", false, false, false, false, nil), 404)
}

// TestAlternateExchangePermissions: declaring an exchange with an alternate needs, besides
// configure, read on the exchange and write on the alternate, as in RabbitMQ; only when
// the exchange is new.
func TestAlternateExchangePermissions(t *testing.T) {
	t.Parallel()
	path := secDefsFile(t, func(d *Definitions) error {
		return errors.Join(d.AddUser("aeu", "p"), d.SetPermissions("aeu", "/", ".*", "^ae-ok$", "^(ax|az)$"))
	})
	addr := secServe(t, Config{Definitions: path}, false).Addr().String()
	declareWithAE(t, openChannel(t, secConnect(t, addr, "guest", "guest", "/")), "aw", "direct", "ae-no")
	c := secConnect(t, addr, "aeu", "p", "/")
	declare := func(name, ae string) func(ch *amqp091.Channel) error {
		return func(ch *amqp091.Channel) error {
			return ch.ExchangeDeclare(name, "direct", false, false, false, false, amqp091.Table{"alternate-exchange": ae})
		}
	}
	secAllowed(t, "read on the exchange, write on the alternate", secTry(t, c, declare("ax", "ae-ok")))
	secRefused(t, "no read on the exchange", secTry(t, c, declare("ay", "ae-ok")), 403, secDenied("exchange", "ay", "/", "aeu"))
	secRefused(t, "no write on the alternate", secTry(t, c, declare("az", "ae-no")), 403, secDenied("exchange", "ae-no", "/", "aeu"))
	secAllowed(t, "redeclare of an existing exchange", secTry(t, c, declare("aw", "ae-no")))
}

// TestAlternateExchangeDurable: a persistent message routed through the alternate
// exchange to a durable queue is confirmed once logged, and kept; the alternate of a
// durable exchange still works after a restart.
func TestAlternateExchangeDurable(t *testing.T) {
	t.Parallel()
	b := startDurable(t, Config{})
	setup := func(b *durableBroker) (*amqp091.Channel, *confirmChannel) {
		conn := dial(t, b.url)
		return openChannel(t, conn), newConfirmChannel(t, conn)
	}
	ch, cc := setup(b)
	if err := ch.ExchangeDeclare("ae", "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare("x", "direct", true, false, false, false, amqp091.Table{"alternate-exchange": "ae"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("kept", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("kept", "", "ae", false, nil); err != nil {
		t.Fatal(err)
	}
	cc.publish("x", "k", true, amqp091.Publishing{DeliveryMode: amqp091.Persistent, Body: []byte("before")})
	cc.wait()
	cc.noReturns()

	b = b.restart("clean", Config{})
	ch, cc = setup(b)
	cc.publish("x", "k", true, amqp091.Publishing{DeliveryMode: amqp091.Persistent, Body: []byte("after")})
	cc.wait()
	cc.noReturns()
	if got := drainText(t, ch, "kept"); !slices.Equal(got, []string{"before", "after"}) {
		t.Fatalf("kept holds %q, want the messages routed through the alternate before and after the restart", got)
	}
}
