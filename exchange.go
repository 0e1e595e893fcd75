package amqp

import (
	"bytes"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Exchange types.
const (
	kindDirect  = "direct"
	kindFanout  = "fanout"
	kindTopic   = "topic"
	kindHeaders = "headers"
)

// vhost holds one virtual host's exchanges, queues and bindings. mu guards the topology:
// the two maps and every exchange's bindings. Publishers hold it for reading while routing.
type vhost struct {
	name  string
	wal   *wal         // nil when nothing is durable
	conns atomic.Int64 // open connections, for Config.MaxConnectionsPerVhost

	mu        sync.RWMutex
	exchanges map[string]*exchange // guarded by mu
	queues    map[string]*queue    // guarded by mu
}

func newVhost(name string) *vhost {
	vh := &vhost{name: name, exchanges: make(map[string]*exchange), queues: make(map[string]*queue)}
	// Every vhost has these, as in RabbitMQ.
	for _, x := range []struct{ name, kind string }{
		{"", kindDirect},
		{"amq.direct", kindDirect},
		{"amq.fanout", kindFanout},
		{"amq.topic", kindTopic},
		{"amq.headers", kindHeaders},
		{"amq.match", kindHeaders},
	} {
		vh.exchanges[x.name] = newExchange(x.name, x.kind, true, false, false, nil)
	}
	return vh
}

// exchange routes messages to queues and other exchanges by its bindings.
type exchange struct {
	name                          string
	kind                          string
	durable, autoDelete, internal bool
	args                          table

	// Bindings with this exchange as source; guarded by vh.mu.
	bindings []*binding
	incoming []*binding            // exchange-to-exchange bindings with this exchange as destination
	direct   map[string][]*binding // direct: by routing key
	topic    *topicNode            // topic: a trie of binding keys
	deleted  bool
}

// binding routes from an exchange to a queue or, for exchange.bind, to an exchange.
type binding struct {
	source *exchange
	queue  *queue    // destination queue, or nil
	dest   *exchange // destination exchange, or nil
	key    string
	args   table
	match  headersMatch // headers exchanges only
}

func newExchange(name, kind string, durable, autoDelete, internal bool, args table) *exchange {
	x := &exchange{name: name, kind: kind, durable: durable, autoDelete: autoDelete, internal: internal, args: args}
	switch kind {
	case kindDirect:
		x.direct = make(map[string][]*binding)
	case kindTopic:
		x.topic = &topicNode{}
	}
	return x
}

// validKind reports whether kind is an exchange type this broker has.
func validKind(kind string) bool {
	switch kind {
	case kindDirect, kindFanout, kindTopic, kindHeaders:
		return true
	}
	return false
}

// findBinding returns the binding equal to b (same destination, key and arguments).
// vh.mu must be held.
func (x *exchange) findBindingLocked(b *binding) int {
	for i, o := range x.bindings {
		if o.queue == b.queue && o.dest == b.dest && o.key == b.key && tableEqual(o.args, b.args) {
			return i
		}
	}
	return -1
}

// addBindingLocked adds b unless an equal binding exists; it reports whether it did.
// vh.mu must be held.
func (x *exchange) addBindingLocked(b *binding) bool {
	if x.findBindingLocked(b) >= 0 {
		return false
	}
	if x.kind == kindHeaders {
		b.match = parseHeadersMatch(b.args)
	}
	x.bindings = append(x.bindings, b)
	switch x.kind {
	case kindDirect:
		x.direct[b.key] = append(x.direct[b.key], b)
	case kindTopic:
		x.topic.add(b)
	}
	if b.queue != nil {
		b.queue.bindings = append(b.queue.bindings, b)
	} else {
		b.dest.incoming = append(b.dest.incoming, b)
	}
	return true
}

// removeBindingLocked removes the binding at index i of x.bindings. vh.mu must be held.
func (x *exchange) removeBindingLocked(i int) *binding {
	b := x.bindings[i]
	x.bindings = slices.Delete(x.bindings, i, i+1)
	switch x.kind {
	case kindDirect:
		list := removeItem(x.direct[b.key], b)
		if len(list) == 0 {
			delete(x.direct, b.key)
		} else {
			x.direct[b.key] = list
		}
	case kindTopic:
		x.topic.remove(b)
	}
	if b.queue != nil {
		b.queue.bindings = removeItem(b.queue.bindings, b)
	} else {
		b.dest.incoming = removeItem(b.dest.incoming, b)
	}
	return b
}

// removeItem deletes the first v from s.
func removeItem[T comparable](s []T, v T) []T {
	if i := slices.Index(s, v); i >= 0 {
		return slices.Delete(s, i, i+1)
	}
	return s
}

// routeSet collects the distinct queues a message goes to. It is reused per channel.
type routeSet struct {
	queues  []*queue
	seen    map[*queue]struct{} // the queues, once there are many of them
	visited []*exchange         // exchanges already routed through, against binding loops
	words   [][]byte            // topic key split into words
	headers table               // the message's headers, decoded once when a headers exchange needs them
	parsed  bool
}

func (rs *routeSet) reset() {
	clear(rs.queues)
	rs.queues = rs.queues[:0]
	clear(rs.seen)
	clear(rs.visited)
	rs.visited = rs.visited[:0]
	rs.headers, rs.parsed = nil, false
}

// addQueue adds q unless it is there already: a scan of a short list, a set for a fanout
// to many queues, so routing stays linear in the number of bindings.
func (rs *routeSet) addQueue(q *queue) {
	if len(rs.queues) < 16 {
		if slices.Contains(rs.queues, q) {
			return
		}
	} else {
		if rs.seen == nil {
			rs.seen = make(map[*queue]struct{})
		}
		if len(rs.seen) == 0 {
			for _, o := range rs.queues {
				rs.seen[o] = struct{}{}
			}
		}
		if _, ok := rs.seen[q]; ok {
			return
		}
		rs.seen[q] = struct{}{}
	}
	rs.queues = append(rs.queues, q)
}

func (rs *routeSet) addBindings(bs []*binding, m *message) {
	for _, b := range bs {
		rs.addBinding(b, m)
	}
}

func (rs *routeSet) addBinding(b *binding, m *message) {
	if b.queue != nil {
		rs.addQueue(b.queue)
		return
	}
	b.dest.route(m, rs)
}

// route adds the queues m goes to through x and the exchanges bound to it.
// vh.mu must be held for reading.
func (x *exchange) route(m *message, rs *routeSet) {
	for _, v := range rs.visited {
		if v == x {
			return
		}
	}
	rs.visited = append(rs.visited, x)
	key := m.routingKey()
	switch x.kind {
	case kindDirect:
		rs.addBindings(x.direct[string(key)], m)
	case kindFanout:
		rs.addBindings(x.bindings, m)
	case kindTopic:
		rs.words = splitWords(rs.words[:0], key)
		x.topic.match(rs.words, rs, m)
	case kindHeaders:
		if !rs.parsed {
			rs.headers, rs.parsed = m.headers(), true
		}
		for _, b := range x.bindings {
			if b.match.matches(rs.headers) {
				rs.addBinding(b, m)
			}
		}
	}
}

// splitWords splits a topic routing key at dots; the empty key has no words, as in RabbitMQ.
func splitWords(words [][]byte, key []byte) [][]byte {
	if len(key) == 0 {
		return words
	}
	for {
		i := bytes.IndexByte(key, '.')
		if i < 0 {
			return append(words, key)
		}
		words = append(words, key[:i])
		key = key[i+1:]
	}
}

// topicNode is a trie node over the words of topic binding keys.
type topicNode struct {
	children map[string]*topicNode
	star     *topicNode // "*": exactly one word
	hash     *topicNode // "#": zero or more words
	bindings []*binding // bindings whose key ends here
}

func (n *topicNode) add(b *binding) {
	for _, w := range strings.Split(b.key, ".") {
		if b.key == "" {
			break
		}
		n = n.child(w)
	}
	n.bindings = append(n.bindings, b)
}

func (n *topicNode) child(w string) *topicNode {
	switch w {
	case "*":
		if n.star == nil {
			n.star = &topicNode{}
		}
		return n.star
	case "#":
		if n.hash == nil {
			n.hash = &topicNode{}
		}
		return n.hash
	}
	if n.children == nil {
		n.children = make(map[string]*topicNode)
	}
	c := n.children[w]
	if c == nil {
		c = &topicNode{}
		n.children[w] = c
	}
	return c
}

// remove drops b and prunes the nodes left empty.
func (n *topicNode) remove(b *binding) {
	var words []string
	if b.key != "" {
		words = strings.Split(b.key, ".")
	}
	n.removePath(words, b)
}

func (n *topicNode) removePath(words []string, b *binding) {
	if len(words) == 0 {
		n.bindings = removeItem(n.bindings, b)
		return
	}
	var c *topicNode
	switch words[0] {
	case "*":
		c = n.star
	case "#":
		c = n.hash
	default:
		c = n.children[words[0]]
	}
	if c == nil {
		return
	}
	c.removePath(words[1:], b)
	if c.empty() {
		switch words[0] {
		case "*":
			n.star = nil
		case "#":
			n.hash = nil
		default:
			delete(n.children, words[0])
		}
	}
}

func (n *topicNode) empty() bool {
	return len(n.bindings) == 0 && len(n.children) == 0 && n.star == nil && n.hash == nil
}

// match adds the bindings whose keys match words.
func (n *topicNode) match(words [][]byte, rs *routeSet, m *message) {
	if n.hash != nil {
		// "#" takes zero or more words.
		for i := 0; i <= len(words); i++ {
			n.hash.match(words[i:], rs, m)
		}
	}
	if len(words) == 0 {
		rs.addBindings(n.bindings, m)
		return
	}
	if c := n.children[string(words[0])]; c != nil {
		c.match(words[1:], rs, m)
	}
	if n.star != nil {
		n.star.match(words[1:], rs, m)
	}
}

// headersMatch is a headers-exchange binding's arguments, parsed once.
type headersMatch struct {
	any    bool // x-match any (or any-with-x)
	withX  bool // x-match all-with-x or any-with-x: x- keys take part too
	fields table
}

func parseHeadersMatch(args table) headersMatch {
	hm := headersMatch{fields: table{}}
	switch args["x-match"] {
	case "any":
		hm.any = true
	case "any-with-x":
		hm.any, hm.withX = true, true
	case "all-with-x":
		hm.withX = true
	}
	for k, v := range args {
		if k == "x-match" || (!hm.withX && strings.HasPrefix(k, "x-")) {
			continue
		}
		hm.fields[k] = v
	}
	return hm
}

// matches compares the binding's fields with the message headers as RabbitMQ does: a void
// binding value asks only for the header's presence; otherwise the types and the values
// must be equal. "all" with no fields matches everything, "any" with no fields nothing.
func (hm headersMatch) matches(headers table) bool {
	for k, want := range hm.fields {
		got, ok := headers[k]
		hit := ok && (want == nil || valueEqual(want, got))
		if hm.any && hit {
			return true
		}
		if !hm.any && !hit {
			return false
		}
	}
	return !hm.any
}

// valueEqual compares two field values as RabbitMQ does: integers of any width by value,
// floats by value, everything else only with the same type.
func valueEqual(a, b any) bool {
	if x, ok := intValue(a); ok {
		y, ok := intValue(b)
		return ok && x == y
	}
	switch a := a.(type) {
	case []byte:
		b, ok := b.([]byte)
		return ok && bytes.Equal(a, b)
	case table:
		b, ok := b.(table)
		return ok && tableEqual(a, b)
	case []any:
		b, ok := b.([]any)
		if !ok || len(a) != len(b) {
			return false
		}
		for i := range a {
			if !valueEqual(a[i], b[i]) {
				return false
			}
		}
		return true
	case float32:
		return floatEqual(float64(a), b)
	case float64:
		return floatEqual(a, b)
	}
	switch b.(type) {
	case []byte, table, []any:
		return false
	}
	return a == b
}

// tableEqual compares two tables key by key; nil equals empty.
func tableEqual(a, b table) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok || !valueEqual(v, w) {
			return false
		}
	}
	return true
}

// exchangeDeclare handles exchange.declare as RabbitMQ does: the default exchange and
// amq.* names are 403, an unknown type 503, an inequivalent redeclare 406.
func (ch *channel) exchangeDeclare(d *decoder) error {
	m := exchangeDeclare{}
	if m.decode(d); d.err != nil {
		return nil
	}
	vh := ch.vh()
	if m.Passive {
		if m.Exchange == "" {
			return accessRefused("operation not permitted on the default exchange")
		}
		if _, err := ch.findExchange(m.Exchange); err != nil {
			return err
		}
		return ch.reply(m.NoWait, &exchangeDeclareOk{})
	}
	// RabbitMQ's order: the type, the default exchange, then amq.* only for a new name.
	if !validKind(m.Type) {
		return commandInvalid("unknown exchange type '" + m.Type + "'")
	}
	if m.Exchange == "" {
		return accessRefused("operation not permitted on the default exchange")
	}
	if err := ch.allowed(permConfigure, resExchange, m.Exchange); err != nil {
		return err
	}
	vh.mu.Lock()
	x := vh.exchanges[m.Exchange]
	if x == nil && reservedName(m.Exchange) {
		vh.mu.Unlock()
		return accessRefused("exchange name '" + m.Exchange + "' contains reserved prefix 'amq.*'")
	}
	if x == nil {
		nx := newExchange(m.Exchange, m.Type, m.Durable, m.AutoDelete, m.Internal, m.Arguments)
		vh.exchanges[m.Exchange] = nx
		if nx.durable {
			vh.logLocked(recExchangeDeclare, exchangeRecord(vh.name, nx))
		}
	}
	vh.mu.Unlock()
	if x == nil && m.Durable {
		if err := vh.syncTopology(); err != nil {
			return err
		}
	}
	if x != nil {
		if err := x.equivalent(&m, vh.name); err != nil {
			return err
		}
	}
	return ch.reply(m.NoWait, &exchangeDeclareOk{})
}

// equivalent checks a redeclare against the exchange; a difference is 406.
func (x *exchange) equivalent(m *exchangeDeclare, vhost string) error {
	diff := func(arg, got, have string) error {
		return preconditionFailed("inequivalent arg '" + arg + "' for " + describeExchange(x.name, vhost) +
			": received '" + got + "' but current is '" + have + "'")
	}
	switch {
	case m.Type != x.kind:
		return diff("type", m.Type, x.kind)
	case m.Durable != x.durable:
		return diff("durable", strconv.FormatBool(m.Durable), strconv.FormatBool(x.durable))
	case m.AutoDelete != x.autoDelete:
		return diff("auto_delete", strconv.FormatBool(m.AutoDelete), strconv.FormatBool(x.autoDelete))
	case m.Internal != x.internal:
		return diff("internal", strconv.FormatBool(m.Internal), strconv.FormatBool(x.internal))
	}
	// Of the arguments, RabbitMQ compares only alternate-exchange.
	if a, b := m.Arguments["alternate-exchange"], x.args["alternate-exchange"]; !argEqual(a, b) {
		return preconditionFailed("inequivalent arg 'alternate-exchange' for " + describeExchange(x.name, vhost))
	}
	return nil
}

// argEqual compares two argument values as RabbitMQ does when checking equivalence:
// absent equals absent, integers of any width compare by value.
func argEqual(a, b any) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return valueEqual(a, b)
}

// reply sends ok unless the method asked for no-wait.
func (ch *channel) reply(noWait bool, ok method) error {
	if !noWait {
		ch.c.sendOn(ch.id, ok)
	}
	return nil
}

func (ch *channel) exchangeDelete(d *decoder) error {
	m := exchangeDelete{}
	if m.decode(d); d.err != nil {
		return nil
	}
	if m.Exchange == "" {
		return accessRefused("operation not permitted on the default exchange")
	}
	if reservedName(m.Exchange) {
		return accessRefused("exchange name '" + m.Exchange + "' contains reserved prefix 'amq.*'")
	}
	if err := ch.allowed(permConfigure, resExchange, m.Exchange); err != nil {
		return err
	}
	vh := ch.vh()
	vh.mu.Lock()
	x := vh.exchanges[m.Exchange]
	if x != nil && m.IfUnused && len(x.bindings) > 0 {
		vh.mu.Unlock()
		return preconditionFailed(describeExchange(x.name, vh.name) + " in use")
	}
	// As in RabbitMQ, deleting an exchange that does not exist succeeds.
	if x != nil {
		vh.deleteExchangeLocked(x)
	}
	vh.mu.Unlock()
	if x != nil && x.durable {
		if err := vh.syncTopology(); err != nil {
			return err
		}
	}
	return ch.reply(m.NoWait, &exchangeDeleteOk{})
}

// deleteExchangeLocked removes x and its bindings both ways. vh.mu must be held.
func (vh *vhost) deleteExchangeLocked(x *exchange) {
	if x.deleted {
		return
	}
	x.deleted = true
	delete(vh.exchanges, x.name)
	if x.durable {
		vh.logLocked(recExchangeDelete, append(appendShortstr(nil, vh.name), appendShortstr(nil, x.name)...))
	}
	for len(x.bindings) > 0 {
		x.removeBindingLocked(len(x.bindings) - 1)
	}
	for len(x.incoming) > 0 {
		b := x.incoming[len(x.incoming)-1]
		src := b.source
		src.removeBindingLocked(src.findBindingLocked(b))
		vh.autoDeleteLocked(src)
	}
}

// autoDeleteLocked deletes an auto-delete exchange that has lost its last binding.
// vh.mu must be held.
func (vh *vhost) autoDeleteLocked(x *exchange) {
	if x.autoDelete && len(x.bindings) == 0 {
		vh.deleteExchangeLocked(x)
	}
}

// exchangeBind handles exchange.bind and exchange.unbind (exchange-to-exchange bindings).
// Both need write on the destination and read on the source, and at a topic source the
// topic permission to read the binding key, as in RabbitMQ.
func (ch *channel) exchangeBind(id uint32, d *decoder) error {
	var dst, src, key string
	var args table
	var noWait bool
	if id == idExchangeBind {
		m := exchangeBind{}
		m.decode(d)
		dst, src, key, args, noWait = m.Destination, m.Source, m.RoutingKey, m.Arguments, m.NoWait
	} else {
		m := exchangeUnbind{}
		m.decode(d)
		dst, src, key, args, noWait = m.Destination, m.Source, m.RoutingKey, m.Arguments, m.NoWait
	}
	if d.err != nil {
		return nil
	}
	if dst == "" || src == "" {
		return accessRefused("operation not permitted on the default exchange")
	}
	if err := ch.allowed(permWrite, resExchange, dst); err != nil {
		return err
	}
	if err := ch.allowed(permRead, resExchange, src); err != nil {
		return err
	}
	vh := ch.vh()
	vh.mu.Lock()
	sx, dx := vh.exchanges[src], vh.exchanges[dst]
	if dx == nil || sx == nil {
		vh.mu.Unlock()
		if dx == nil {
			return notFound("no " + describeExchange(dst, vh.name))
		}
		return notFound("no " + describeExchange(src, vh.name))
	}
	if err := ch.topicReadAllowed(sx, key); err != nil {
		vh.mu.Unlock()
		return err
	}
	b := &binding{source: sx, dest: dx, key: key, args: args}
	logged := false
	if id == idExchangeBind {
		if err := checkHeadersArgs(sx, args); err != nil {
			vh.mu.Unlock()
			return err
		}
		if sx.addBindingLocked(b) && durableBinding(b) {
			vh.logLocked(recBind, bindRecord(vh.name, b))
			logged = true
		}
	} else if i := sx.findBindingLocked(b); i >= 0 {
		if b = sx.removeBindingLocked(i); durableBinding(b) {
			vh.logLocked(recUnbind, bindRecord(vh.name, b))
			logged = true
		}
		vh.autoDeleteLocked(sx)
	}
	vh.mu.Unlock()
	if logged {
		if err := vh.syncTopology(); err != nil {
			return err
		}
	}
	if id == idExchangeBind {
		return ch.reply(noWait, &exchangeBindOk{})
	}
	return ch.reply(noWait, &exchangeUnbindOk{})
}

// intValue returns the value of an integer field of any width.
func intValue(v any) (int64, bool) {
	switch v := v.(type) {
	case int8:
		return int64(v), true
	case uint8:
		return int64(v), true
	case int16:
		return int64(v), true
	case uint16:
		return int64(v), true
	case int32:
		return int64(v), true
	case uint32:
		return int64(v), true
	case int64:
		return v, true
	}
	return 0, false
}

func floatEqual(a float64, b any) bool {
	switch b := b.(type) {
	case float32:
		return a == float64(b)
	case float64:
		return a == b || math.IsNaN(a) && math.IsNaN(b)
	}
	return false
}

// checkHeadersArgs refuses a headers binding whose x-match is not one RabbitMQ knows.
func checkHeadersArgs(x *exchange, args table) error {
	if x.kind != kindHeaders {
		return nil
	}
	v, ok := args["x-match"]
	if !ok {
		return nil
	}
	switch v {
	case "all", "any", "all-with-x", "any-with-x":
		return nil
	}
	return preconditionFailed("Invalid x-match field value; expected all, any, all-with-x, or any-with-x")
}
