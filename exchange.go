package amqp

import (
	"bytes"
	"hash/maphash"
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

// vhostDeleted is the 320 CONNECTION_FORCED of a connection to a virtual host that a reload
// deleted, as RabbitMQ words it.
func vhostDeleted(name string) *Error {
	return newError(replyConnectionForced, "vhost '"+name+"' is deleted")
}

// exchange routes messages to queues and other exchanges by its bindings.
type exchange struct {
	name                          string
	kind                          string
	durable, autoDelete, internal bool
	args                          table

	// Bindings with this exchange as source; guarded by vh.mu. Each list is in no order:
	// a binding knows its index in each, and a removal moves the last one into its place.
	bindings []*binding             // every one; b.slot is b's index
	index    map[bindingID]*binding // every one by its ends, key and arguments; equal ids chain through twin
	incoming []*binding             // exchange-to-exchange bindings with this exchange as destination; b.dslot is the index
	direct   map[string][]*binding  // direct: by routing key; b.kslot is the index
	topic    *topicIndex            // topic: a trie of binding keys, with a lock of its own
	deleted  bool

	// ae is the alternate exchange, from the alternate-exchange argument or a policy: the
	// exchange, looked up by name when routing, that takes the messages this one cannot
	// route. "" is none: the default exchange routes only as the exchange published to.
	// Guarded by vh.mu.
	ae       string
	aeWarned atomic.Bool // the missing alternate exchange has been logged

	// delay makes an x-delayed-message exchange (delayed.go); kind is then its
	// x-delayed-type. nil for the other types.
	delay *delayHold
}

// binding routes from an exchange to a queue or, for exchange.bind, to an exchange.
type binding struct {
	source *exchange
	queue  *queue    // destination queue, or nil
	dest   *exchange // destination exchange, or nil
	key    string
	args   table
	match  *headersMatch // headers exchanges only

	twin  *binding // guarded by vh.mu: the next binding of source.index with the same id
	slot  int32    // guarded by vh.mu: the index in source.bindings
	dslot int32    // guarded by vh.mu: the index in queue.bindings or dest.incoming
	kslot int32    // the index in source.direct[key] (guarded by vh.mu) or in its topic trie node (by the index's mu)
}

// bindingID tells a binding from the others of its exchange: equal bindings have equal
// ids. Unequal ones share an id only when the hashes of their keys and arguments collide.
type bindingID struct {
	queue *queue
	dest  *exchange
	hash  uint64 // of the key and the arguments
}

// destName is the name of the queue or exchange b routes to.
func (b *binding) destName() string {
	if b.queue != nil {
		return b.queue.name
	}
	return b.dest.name
}

// id is b's key in its exchange's index.
func (b *binding) id() bindingID { return bindingID{b.queue, b.dest, bindingHash(b.key, b.args)} }

// bindingHash hashes a binding's key and arguments. A variable: a test makes every hash
// collide.
var bindingHash = func(key string, args table) uint64 {
	return maphash.String(hashSeed, key) ^ mix(tableHash(args))
}

// same reports whether b and o have the same key and arguments.
func (b *binding) same(o *binding) bool { return b.key == o.key && tableEqual(b.args, o.args) }

// newExchange makes an exchange of a valid kind, with no bindings.
func newExchange(name, kind string, durable, autoDelete, internal bool, args table) *exchange {
	x := &exchange{name: name, kind: kind, durable: durable, autoDelete: autoDelete, internal: internal, args: args}
	if kind == kindDelayed {
		// It routes as its x-delayed-type, which declare has checked.
		kind, _ = args["x-delayed-type"].(string)
		x.kind, x.delay = kind, &delayHold{}
	}
	switch kind {
	case kindDirect:
		x.direct = make(map[string][]*binding)
	case kindTopic:
		x.topic = &topicIndex{}
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

// findBindingLocked returns x's binding equal to b (same destination, key and
// arguments), or nil. vh.mu must be held.
func (x *exchange) findBindingLocked(b *binding) *binding {
	for o := x.index[b.id()]; o != nil; o = o.twin {
		if o.same(b) {
			return o
		}
	}
	return nil
}

// addBindingLocked adds b unless an equal binding exists; it reports whether it did.
// vh.mu must be held.
func (x *exchange) addBindingLocked(b *binding) bool {
	id := b.id()
	for o := x.index[id]; o != nil; o = o.twin {
		if o.same(b) {
			return false
		}
	}
	if x.index == nil {
		x.index = make(map[bindingID]*binding)
	}
	b.twin = x.index[id]
	x.index[id] = b
	if x.kind == kindHeaders {
		b.match = parseHeadersMatch(b.args)
	}
	x.bindings = appendSlot(x.bindings, b, slotOf)
	switch x.kind {
	case kindDirect:
		x.direct[b.key] = appendSlot(x.direct[b.key], b, kslotOf)
	case kindTopic:
		x.topic.add(b)
	}
	if b.queue != nil {
		b.queue.bindings = appendSlot(b.queue.bindings, b, dslotOf)
	} else {
		b.dest.incoming = appendSlot(b.dest.incoming, b, dslotOf)
	}
	return true
}

// removeBindingLocked removes b, one of x's bindings. vh.mu must be held.
func (x *exchange) removeBindingLocked(b *binding) {
	id := b.id()
	if o := x.index[id]; o == b {
		if b.twin == nil {
			delete(x.index, id)
		} else {
			x.index[id] = b.twin
		}
	} else {
		for o.twin != b {
			o = o.twin
		}
		o.twin = b.twin
	}
	b.twin = nil
	x.bindings = cutSlot(x.bindings, b, slotOf)
	switch x.kind {
	case kindDirect:
		if list := cutSlot(x.direct[b.key], b, kslotOf); len(list) == 0 {
			delete(x.direct, b.key)
		} else {
			x.direct[b.key] = list
		}
	case kindTopic:
		x.topic.remove(b)
	}
	if b.queue != nil {
		b.queue.bindings = cutSlot(b.queue.bindings, b, dslotOf)
	} else {
		b.dest.incoming = cutSlot(b.dest.incoming, b, dslotOf)
	}
}

// The index a binding keeps of its place in each list it is in.
func slotOf(b *binding) *int32  { return &b.slot }
func dslotOf(b *binding) *int32 { return &b.dslot }
func kslotOf(b *binding) *int32 { return &b.kslot }

// appendSlot appends b to s, noting its index in the slot at.
func appendSlot(s []*binding, b *binding, at func(*binding) *int32) []*binding {
	*at(b) = int32(len(s))
	return append(s, b)
}

// cutSlot removes b from s in O(1), moving the last binding into its place: s is in no
// order. A list left mostly empty is copied to a smaller array.
func cutSlot(s []*binding, b *binding, at func(*binding) *int32) []*binding {
	i, last := *at(b), len(s)-1
	if s[last] != b {
		s[i] = s[last]
		*at(s[i]) = i
	}
	s[last] = nil
	s = s[:last]
	if cap(s) > 64 && len(s) < cap(s)/4 {
		s = slices.Clone(s)
	}
	return s
}

// routeSet collects the distinct queues a message goes to. It is reused per channel.
type routeSet struct {
	queues    []*queue
	seen      map[*queue]struct{} // the queues, once there are many of them
	visited   []*exchange         // exchanges already routed through, against binding loops
	next      []*exchange         // exchanges bound to the ones routed through, still to route
	hits      []*binding          // the topic bindings a match found
	words     [][]byte            // topic key split into words
	headers   table               // the message's headers, decoded once when a headers exchange needs them
	parsed    bool
	holds     []*exchange // delayed exchanges that hold the message for delay ms instead of routing it
	delay     int64       // the message's x-delay, when delayRead
	delayRead bool
	now       bool // route through delayed exchanges at once: the message fell due, or is redriven

	hashFrom    map[*topicNode]int // per "#" trie node reached, the lowest word position matched from; for one message
	topicVisits int                // topic trie nodes visited while routing the message, for tests

	missingAE *exchange // an exchange whose alternate exchange was missing, to log once
}

// reset empties rs for the next message, keeping its buffers.
func (rs *routeSet) reset() {
	clear(rs.queues)
	rs.queues = rs.queues[:0]
	clear(rs.seen)
	clear(rs.visited)
	rs.visited = rs.visited[:0]
	clear(rs.next)
	rs.next = rs.next[:0]
	clear(rs.hits)
	rs.hits = rs.hits[:0]
	rs.headers, rs.parsed = nil, false
	clear(rs.holds)
	rs.holds = rs.holds[:0]
	rs.delay, rs.delayRead, rs.now = 0, false, false
	clear(rs.hashFrom)
	rs.topicVisits = 0
	rs.missingAE = nil
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

// addBindings adds the destinations of bs.
func (rs *routeSet) addBindings(bs []*binding, m *message) {
	for _, b := range bs {
		rs.addBinding(b, m)
	}
}

// addBinding adds a binding's queue, or its exchange to those still to route.
func (rs *routeSet) addBinding(b *binding, m *message) {
	if b.queue != nil {
		rs.addQueue(b.queue)
		return
	}
	rs.next = append(rs.next, b.dest)
}

// route adds the queues m goes to through x's own bindings, and the exchanges bound to x
// to rs.next. It reports whether any binding matched. vh.mu must be held for reading.
func (x *exchange) route(m *message, rs *routeSet) (matched bool) {
	key := m.routingKey()
	switch x.kind {
	case kindDirect:
		bs := x.direct[string(key)]
		rs.addBindings(bs, m)
		return len(bs) > 0
	case kindFanout:
		rs.addBindings(x.bindings, m)
		return len(x.bindings) > 0
	case kindTopic:
		x.topic.match(key, rs)
		rs.addBindings(rs.hits, m)
		return len(rs.hits) > 0
	case kindHeaders:
		if !rs.parsed {
			rs.headers, rs.parsed = m.headers(), true
		}
		for _, b := range x.bindings {
			if b.match.matches(rs.headers) {
				rs.addBinding(b, m)
				matched = true
			}
		}
	}
	return matched
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

// topicIndex is a topic exchange's trie of binding keys. A match runs under the index's
// read lock, not the vhost's. Binds and unbinds, which hold the vhost's lock, do not wait
// for a match in progress: they queue their change, and the next match applies it first.
type topicIndex struct {
	mu   sync.RWMutex
	root topicNode // guarded by mu

	opsMu   sync.Mutex
	ops     []topicOp    // guarded by opsMu: changes not yet applied to root, in order
	pending atomic.Int32 // len(ops), readable without opsMu
}

// topicOp is a binding added to or removed from a topic index.
type topicOp struct {
	b   *binding
	add bool
}

func (t *topicIndex) add(b *binding)    { t.queue(topicOp{b, true}) }
func (t *topicIndex) remove(b *binding) { t.queue(topicOp{b, false}) }

func (t *topicIndex) queue(op topicOp) {
	t.opsMu.Lock()
	t.ops = append(t.ops, op)
	n := len(t.ops)
	t.pending.Store(int32(n))
	t.opsMu.Unlock()
	// An exchange nobody publishes to would hold its changes, and the bindings they
	// name, for ever: apply them now when no match is in the way.
	if n >= 1024 && t.mu.TryLock() {
		t.applyLocked()
		t.mu.Unlock()
	}
}

// match sets rs.hits to the bindings whose keys match key.
func (t *topicIndex) match(key []byte, rs *routeSet) {
	if t.pending.Load() > 0 {
		t.mu.Lock()
		t.applyLocked()
		t.mu.Unlock()
	}
	rs.hits = rs.hits[:0]
	rs.words = splitWords(rs.words[:0], key)
	t.mu.RLock()
	t.root.match(rs.words, 0, rs)
	t.mu.RUnlock()
}

// applyLocked brings the queued binding changes into the trie. t.mu must be held.
func (t *topicIndex) applyLocked() {
	t.opsMu.Lock()
	ops := t.ops
	t.ops = nil
	t.pending.Store(0)
	t.opsMu.Unlock()
	for _, op := range ops {
		if op.add {
			t.root.add(op.b)
		} else {
			t.root.remove(op.b)
		}
	}
}

// topicNode is a trie node over the words of topic binding keys.
type topicNode struct {
	children map[string]*topicNode
	star     *topicNode // "*": exactly one word
	hash     *topicNode // "#": zero or more words
	bindings []*binding // bindings whose key ends here
}

// topicWords splits a binding key into the words of its trie path. A run of "#" becomes
// one "#": "a.#.#.b" matches exactly what "a.#.b" matches, and is stored at the same node.
func topicWords(key string) []string {
	if key == "" {
		return nil
	}
	return slices.CompactFunc(strings.Split(key, "."), func(a, b string) bool { return a == "#" && b == "#" })
}

func (n *topicNode) add(b *binding) {
	for _, w := range topicWords(b.key) {
		n = n.child(w)
	}
	n.bindings = appendSlot(n.bindings, b, kslotOf)
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
	n.removePath(topicWords(b.key), b)
}

func (n *topicNode) removePath(words []string, b *binding) {
	if len(words) == 0 {
		n.bindings = cutSlot(n.bindings, b, kslotOf)
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

// match appends to rs.hits the bindings below n whose rest of key matches words[i:]. It visits no node
// twice at one position, so it costs O(trie nodes × (len(words)+1)) whatever the keys.
func (n *topicNode) match(words [][]byte, i int, rs *routeSet) {
	rs.topicVisits++
	if h := n.hash; h != nil {
		// "#" takes zero or more words: match h from i, i+1, ... len(words), except from the
		// positions it was matched from already, which are all those from some point on.
		// Any other node has one parent and takes one word, so it too sees each position once.
		end := len(words)
		if from, ok := rs.hashFrom[h]; ok {
			end = from - 1
		}
		if i <= end {
			if rs.hashFrom == nil {
				rs.hashFrom = make(map[*topicNode]int)
			}
			rs.hashFrom[h] = i
		}
		for j := i; j <= end; j++ {
			h.match(words, j, rs)
		}
	}
	if i == len(words) {
		rs.hits = append(rs.hits, n.bindings...)
		return
	}
	if c := n.children[string(words[i])]; c != nil {
		c.match(words, i+1, rs)
	}
	if n.star != nil {
		n.star.match(words, i+1, rs)
	}
}

// headersMatch is a headers-exchange binding's arguments, parsed once.
type headersMatch struct {
	any    bool // x-match any (or any-with-x)
	withX  bool // x-match all-with-x or any-with-x: x- keys take part too
	fields []headerField
}

// headerField is a header a headers binding asks for, and its value; nil: any value.
type headerField struct {
	key  string
	want any
}

func parseHeadersMatch(args table) *headersMatch {
	hm := &headersMatch{fields: make([]headerField, 0, len(args))}
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
		hm.fields = append(hm.fields, headerField{k, v})
	}
	return hm
}

// matches compares the binding's fields with the message headers as RabbitMQ does: a void
// binding value asks only for the header's presence; otherwise the types and the values
// must be equal. "all" with no fields matches everything, "any" with no fields nothing.
func (hm *headersMatch) matches(headers table) bool {
	for _, f := range hm.fields {
		got, ok := headers[f.key]
		hit := ok && (f.want == nil || valueEqual(f.want, got))
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

// tableHash hashes a table so that equal tables (tableEqual) hash alike.
func tableHash(t table) uint64 {
	var h uint64
	for k, v := range t {
		h += mix(maphash.String(hashSeed, k) ^ valueHash(v)) // in any order
	}
	return h
}

// valueHash hashes a field value so that equal values (valueEqual) hash alike: integers by
// value whatever their width, floats likewise, and each kind apart.
func valueHash(v any) uint64 {
	if n, ok := intValue(v); ok {
		return mix(uint64(n)) + 1
	}
	switch v := v.(type) {
	case float32:
		return floatHash(float64(v))
	case float64:
		return floatHash(v)
	case string:
		return maphash.String(hashSeed, v) + 3
	case []byte:
		return maphash.Bytes(hashSeed, v) + 4
	case table:
		return tableHash(v) + 5
	case []any:
		h := uint64(6)
		for _, e := range v {
			h = mix(h ^ valueHash(e))
		}
		return h
	}
	return maphash.Comparable(hashSeed, v)
}

// floatHash hashes a float by value, every NaN alike.
func floatHash(f float64) uint64 {
	switch {
	case f != f:
		return 2 // NaN equals NaN
	case f == 0:
		f = 0 // -0 equals 0
	}
	return mix(math.Float64bits(f)) + 2
}

// mix scrambles the bits of h (the finalizer of MurmurHash3).
func mix(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	return h ^ h>>33
}

// hashSeed seeds the hashes of binding keys and arguments, anew at each start.
var hashSeed = maphash.MakeSeed()

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
	if !validKind(m.Type) && m.Type != kindDelayed {
		return commandInvalid("unknown exchange type '" + m.Type + "'")
	}
	if m.Exchange == "" {
		return accessRefused("operation not permitted on the default exchange")
	}
	if err := ch.allowed(permConfigure, resExchange, m.Exchange); err != nil {
		return err
	}
	vh.mu.Lock()
	if vh.deleted {
		vh.mu.Unlock()
		return vhostDeleted(vh.name)
	}
	x := vh.exchanges[m.Exchange]
	if x == nil && reservedName(m.Exchange) {
		vh.mu.Unlock()
		return accessRefused("exchange name '" + m.Exchange + "' contains reserved prefix 'amq.*'")
	}
	if x == nil {
		if err := ch.checkAlternate(m.Exchange, m.Arguments); err != nil {
			vh.mu.Unlock()
			return err
		}
		if m.Type == kindDelayed {
			if err := checkDelayedType(m.Arguments); err != nil {
				vh.mu.Unlock()
				return err
			}
		}
		nx := newExchange(m.Exchange, m.Type, m.Durable, m.AutoDelete, m.Internal, m.Arguments)
		nx.ae = vh.policies.alternate(nx.name, nx.args)
		if nx.delay != nil {
			ch.c.s.attachDelayedLocked(nx, vh)
		}
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
	case m.Type != x.typeName():
		return diff("type", m.Type, x.typeName())
	case m.Durable != x.durable:
		return diff("durable", strconv.FormatBool(m.Durable), strconv.FormatBool(x.durable))
	case m.AutoDelete != x.autoDelete:
		return diff("auto_delete", strconv.FormatBool(m.AutoDelete), strconv.FormatBool(x.autoDelete))
	case m.Internal != x.internal:
		return diff("internal", strconv.FormatBool(m.Internal), strconv.FormatBool(x.internal))
	}
	// Of the arguments, RabbitMQ compares only alternate-exchange: absent and absent, or
	// equal values of compatible types.
	if a, b := m.Arguments["alternate-exchange"], x.args["alternate-exchange"]; !argEqual(a, b) {
		return preconditionFailed("inequivalent arg 'alternate-exchange' for " + describeExchange(x.name, vhost) +
			": received " + argText(a) + " but current is " + argText(b))
	}
	// And, unlike the plugin (which lets a redeclare change nothing silently), x-delayed-type.
	if a, b := m.Arguments["x-delayed-type"], x.args["x-delayed-type"]; x.delay != nil && !argEqual(a, b) {
		return preconditionFailed("inequivalent arg 'x-delayed-type' for " + describeExchange(x.name, vhost) +
			": received " + argText(a) + " but current is " + argText(b))
	}
	return nil
}

// checkAlternate checks a new exchange's alternate-exchange argument as RabbitMQ does: it
// must be a longstr (406 otherwise), and the user needs read on the exchange and write on
// the alternate, which need not exist yet.
func (ch *channel) checkAlternate(name string, args table) error {
	v, ok := args["alternate-exchange"]
	if !ok {
		return nil
	}
	ae, ok := v.(string)
	if !ok {
		return preconditionFailed("invalid type '" + fieldType(v) + "' for arg 'alternate-exchange' in " +
			describeExchange(name, ch.vh().name))
	}
	if err := ch.allowed(permRead, resExchange, name); err != nil {
		return err
	}
	return ch.allowed(permWrite, resExchange, ae)
}

// argText writes an argument value as RabbitMQ does in an inequivalence error: none when
// absent, a string as it is, an integer in decimal, anything else by its type.
func argText(v any) string {
	switch v := v.(type) {
	case nil:
		return "none"
	case string:
		return v
	case []byte:
		return string(v)
	}
	if n, ok := intValue(v); ok {
		return strconv.FormatInt(n, 10)
	}
	return fieldType(v)
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
		ch.send(ok)
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
	if vh.deleted {
		vh.mu.Unlock()
		return vhostDeleted(vh.name)
	}
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
	} else if b = sx.findBindingLocked(b); b != nil {
		if sx.removeBindingLocked(b); durableBinding(b) {
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

// routeLocked collects in rs the queues m goes to through x and, through exchange-to-
// exchange bindings and alternate exchanges, the exchanges bound to it. vh.mu must be held
// for reading; it is released for each topic match, which may take long and runs under the
// exchange's own lock, so that no writer of the vhost waits for a match.
//
// An exchange none of whose bindings match hands the message, with its routing key and
// headers, to its alternate exchange, as RabbitMQ's rabbit_exchange:route1 does. That holds
// for every exchange the message reaches: the one published to, one reached through an
// exchange-to-exchange binding, and an alternate exchange itself, so alternates chain. A
// matching binding to an exchange counts as routed even if that exchange routes nowhere.
// Each exchange routes a message at most once, which ends loops of bindings and cycles of
// alternates. A missing alternate exchange leaves the message unrouted there.
func (vh *vhost) routeLocked(x *exchange, m *message, rs *routeSet) {
	rs.next = append(rs.next, x)
	for len(rs.next) > 0 {
		x := rs.next[len(rs.next)-1]
		rs.next = rs.next[:len(rs.next)-1]
		if x.deleted || slices.Contains(rs.visited, x) {
			continue // visited: a loop of exchange bindings delivers once
		}
		rs.visited = append(rs.visited, x)
		if x.delay != nil && !rs.now && rs.holdLocked(x, m) {
			continue // held: routed when it falls due, then to the alternate if unroutable
		}
		var matched bool
		if x.kind != kindTopic {
			matched = x.route(m, rs)
		} else {
			vh.mu.RUnlock()
			x.topic.match(m.routingKey(), rs)
			vh.mu.RLock()
			if x.deleted {
				continue
			}
			rs.addBindings(rs.hits, m)
			matched = len(rs.hits) > 0
		}
		if !matched && x.ae != "" {
			vh.alternateLocked(x, rs)
		}
	}
}

// holdLocked reports whether the delayed exchange x holds m: its x-delay is positive. The
// exchange is noted in rs.holds. vh.mu must be held for reading.
func (rs *routeSet) holdLocked(x *exchange, m *message) bool {
	if !rs.delayRead {
		rs.delay, _ = messageDelay(m.props())
		rs.delayRead = true
	}
	if rs.delay <= 0 {
		return false
	}
	rs.holds = append(rs.holds, x)
	return true
}

// alternateLocked adds x's alternate exchange to those still to route, or notes in rs that
// it is missing the first time that happens for x. vh.mu must be held for reading.
func (vh *vhost) alternateLocked(x *exchange, rs *routeSet) {
	if ae := vh.exchanges[x.ae]; ae != nil {
		rs.next = append(rs.next, ae)
	} else if rs.missingAE == nil && !x.aeWarned.Load() && x.aeWarned.CompareAndSwap(false, true) {
		rs.missingAE = x
	}
}
