package amqp

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"regexp"
	"slices"
	"strconv"
)

// What a queue's x-arguments make of it (queueArgs, at the end of this file) and what
// policies change of that.
//
// Policies set queue and exchange arguments from outside the application, as RabbitMQ's
// do: each names a regular expression matched against the object's name (unanchored, Go's
// RE2 syntax), what it applies to, a priority and a definition. Of the policies of a vhost
// that match an object, the one with the highest priority applies (on a tie, the first by
// name); operator policies are matched the same way and apply to queues too. Where both, and
// the queue's own x-arguments, set a key:
//
//   - message-ttl, expires, max-length, max-length-bytes, delivery-limit: the smallest
//     value wins (operator policies exist to cap what users set);
//   - dead-letter-exchange, dead-letter-routing-key, overflow, alternate-exchange: the
//     x-argument wins over the policy.
//
// Operator policies may set only the first group. Policies come from the definitions file
// (the "policies" section, and "parameters" of component "operator_policy") and apply to
// existing objects on every reload and to new ones as they are declared. Keys RabbitMQ has
// that the broker does not act on (ha-mode, queue-mode, federation-upstream, ...) are
// named in the load warning.

// policyKeys are the definition keys the broker acts on, with the argument each sets.
var policyKeys = map[string]string{
	"alternate-exchange":      "alternate-exchange",
	"dead-letter-exchange":    "x-dead-letter-exchange",
	"dead-letter-routing-key": "x-dead-letter-routing-key",
	"message-ttl":             "x-message-ttl",
	"expires":                 "x-expires",
	"max-length":              "x-max-length",
	"max-length-bytes":        "x-max-length-bytes",
	"overflow":                "x-overflow",
	"delivery-limit":          "x-delivery-limit",
	"consumer-timeout":        "x-consumer-timeout",
}

// operatorPolicyKeys are the keys an operator policy may set; for each the smallest value
// wins.
var operatorPolicyKeys = []string{"message-ttl", "expires", "max-length", "max-length-bytes", "delivery-limit"}

// policy is one policy or operator policy of a vhost, ready to match.
type policy struct {
	name     string
	pattern  *regexp.Regexp
	applyTo  string // "all", "queues", "exchanges", "classic_queues", "quorum_queues" or "streams"
	priority int
	args     table // the keys acted on, as arguments: int64 or string values
}

// forQueues reports whether p applies to this broker's queues (all of them classic).
func (p *policy) forQueues() bool {
	return p.applyTo == "all" || p.applyTo == "queues" || p.applyTo == "classic_queues"
}

// forExchanges reports whether p applies to exchanges.
func (p *policy) forExchanges() bool { return p.applyTo == "all" || p.applyTo == "exchanges" }

// policySet is the policies of one vhost, each list highest priority first.
type policySet struct {
	user, operator []*policy
}

// match returns the first policy in list that applies to the object, or nil.
func match(list []*policy, name string, queue bool) *policy {
	for _, p := range list {
		if (queue && p.forQueues() || !queue && p.forExchanges()) && p.pattern.MatchString(name) {
			return p
		}
	}
	return nil
}

// queueArgs returns what the policies make of queue name, given its arguments args and
// what they alone make of it (qa): qa itself when no policy matches. The names of the
// policies applied are returned too ("" for none).
func (ps *policySet) queueArgs(name string, args table, qa queueArgs) (eff queueArgs, pol, op string) {
	if ps == nil {
		return qa, "", ""
	}
	p, o := match(ps.user, name, true), match(ps.operator, name, true)
	if p == nil && o == nil {
		return qa, "", ""
	}
	merged := maps.Clone(args)
	if merged == nil {
		merged = table{}
	}
	for _, arg := range policyKeys {
		var v any
		var set bool
		for _, pp := range []*policy{p, o} {
			if pp == nil {
				continue
			}
			if pv, ok := pp.args[arg]; ok {
				if set {
					v = min(v.(int64), pv.(int64)) // both set: an operator key, merged by min
				} else {
					v, set = pv, true
				}
			}
		}
		if !set {
			continue
		}
		if av, ok := args[arg]; ok {
			n, isInt := intValue(av)
			pv, isMin := v.(int64)
			if !isInt || !isMin {
				continue // the argument wins
			}
			v = min(n, pv)
		}
		merged[arg] = v
	}
	eff, _, _ = parseQueueArgs(merged) // policies and arguments were checked when set
	eff.single, eff.priorities, eff.maxPriority = qa.single, qa.priorities, qa.maxPriority
	if p != nil {
		pol = p.name
	}
	if o != nil {
		op = o.name
	}
	return eff, pol, op
}

// alternate returns the alternate exchange of exchange name with arguments args: its
// argument, else its policy's, else "". The default exchange has none.
func (ps *policySet) alternate(name string, args table) string {
	if ae, ok := args["alternate-exchange"].(string); ok || name == "" || ps == nil {
		return ae
	}
	if p := match(ps.user, name, false); p != nil {
		ae, _ := p.args["alternate-exchange"].(string)
		return ae
	}
	return ""
}

// Policy is a policy or an operator policy of a virtual host: Definition (a JSON object,
// such as {"message-ttl": 60000}) applies to the queues and exchanges whose name Pattern
// matches, as ApplyTo says ("all", "queues" or "exchanges"; "classic_queues" too); of the
// policies matching an object, the one with the highest Priority applies.
type Policy struct {
	Vhost, Name, Pattern, ApplyTo string
	Priority                      int
	Definition                    json.RawMessage
}

// compilePolicy checks p, as RabbitMQ validates a policy, and returns it ready to match,
// with the keys of its definition the broker does not act on. A policy with no such key
// whose pattern Go cannot compile (a PCRE look-around, say, in an ha-mode policy exported
// from RabbitMQ) comes back nil, named in ignored, rather than failing the load.
func compilePolicy(p Policy, operator bool) (c *policy, ignored []string, err error) {
	if p.Name == "" {
		return nil, nil, errors.New("a policy has an empty name")
	}
	switch p.ApplyTo {
	case "all", "queues", "exchanges", "classic_queues", "quorum_queues", "streams":
	default:
		return nil, nil, fmt.Errorf("policy %q: apply-to %q: want all, queues, exchanges, classic_queues, quorum_queues or streams", p.Name, p.ApplyTo)
	}
	var def map[string]json.RawMessage
	if err := json.Unmarshal(p.Definition, &def); err != nil || def == nil {
		return nil, nil, fmt.Errorf("policy %q: the definition must be a JSON object", p.Name)
	}
	if len(def) == 0 {
		return nil, nil, fmt.Errorf("policy %q: the definition is empty", p.Name)
	}
	c = &policy{name: p.Name, applyTo: p.ApplyTo, priority: p.Priority, args: table{}}
	for _, key := range slices.Sorted(maps.Keys(def)) {
		arg, known := policyKeys[key]
		if !known || operator && !slices.Contains(operatorPolicyKeys, key) {
			if operator && known {
				return nil, nil, fmt.Errorf("operator policy %q: %s cannot be set by an operator policy", p.Name, key)
			}
			ignored = append(ignored, key)
			continue
		}
		v, err := policyValue(key, def[key])
		if err != nil {
			return nil, nil, fmt.Errorf("policy %q: %s", p.Name, err)
		}
		c.args[arg] = v
	}
	if c.pattern, err = regexp.Compile(p.Pattern); err != nil {
		if len(c.args) == 0 {
			return nil, append(ignored, "pattern "+strconv.Quote(p.Pattern)+" (not RE2)"), nil
		}
		return nil, nil, fmt.Errorf("policy %q: pattern %q: %v", p.Name, p.Pattern, err)
	}
	return c, ignored, nil
}

// policyValue checks the value of a definition key the broker acts on, with RabbitMQ's
// rules and message, and returns it as an int64 or a string.
func policyValue(key string, raw json.RawMessage) (any, error) {
	var s string
	switch key {
	case "alternate-exchange", "dead-letter-exchange", "dead-letter-routing-key":
		if json.Unmarshal(raw, &s) != nil || key == "dead-letter-routing-key" && len(s) > 255 {
			return nil, fmt.Errorf("%s is not a valid %s", raw, map[string]string{
				"alternate-exchange": "alternate exchange name", "dead-letter-exchange": "dead letter exchange name",
				"dead-letter-routing-key": "dead letter routing key"}[key])
		}
		return s, nil
	case "overflow":
		if json.Unmarshal(raw, &s) != nil || s != "drop-head" && s != "reject-publish" && s != "reject-publish-dlx" {
			return nil, fmt.Errorf("%s is not a valid overflow value", raw)
		}
		return s, nil
	}
	least, most := int64(0), int64(1)<<62
	switch key {
	case "expires", "consumer-timeout":
		least, most = 1, maxTTL
	case "message-ttl":
		most = maxTTL
	}
	n, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil || n < least || n > most {
		return nil, fmt.Errorf("%s is not a valid %s", raw, map[string]string{"message-ttl": "message TTL",
			"expires": "queue expiry", "max-length": "maximum length", "max-length-bytes": "maximum length in bytes",
			"delivery-limit": "delivery limit", "consumer-timeout": "consumer timeout"}[key])
	}
	return n, nil
}

// sortPolicies orders policies highest priority first, then by name.
func sortPolicies(list []*policy) {
	slices.SortStableFunc(list, func(a, b *policy) int {
		if c := cmp.Compare(b.priority, a.priority); c != 0 {
			return c
		}
		return cmp.Compare(a.name, b.name)
	})
}

// setPolicies makes ps the policies of vh and applies them to its queues and exchanges:
// a queue takes its new arguments at once (a shorter length limit drops, or dead-letters,
// what is over it; a new x-expires period starts now), a new message TTL applies to
// messages enqueued from now on, as in RabbitMQ.
func (vh *vhost) setPolicies(ps *policySet) {
	type change struct {
		q       *queue
		qa      queueArgs
		pol, op string
	}
	vh.mu.Lock()
	vh.policies = ps
	for _, x := range vh.exchanges {
		x.ae = ps.alternate(x.name, x.args)
	}
	changes := make([]change, 0, len(vh.queues))
	for _, q := range vh.queues {
		qa, _, _ := parseQueueArgs(q.args) // checked at declare
		qa, pol, op := ps.queueArgs(q.name, q.args, qa)
		changes = append(changes, change{q, qa, pol, op})
	}
	vh.mu.Unlock()
	for _, c := range changes {
		c.q.mu.Lock()
		if c.q.setArgsLocked(c.qa, c.pol, c.op) && !c.q.deleted {
			// A new period starts now, as RabbitMQ restarts its expiry timer.
			if c.q.lease != nil {
				c.q.lease.Stop()
				c.q.lease = nil
			}
			if len(c.q.consumers) == 0 {
				c.q.renewLeaseLocked()
			}
		}
		c.q.dispatchLocked()
		c.q.mu.Unlock()
	}
}

// --- what a queue's x-arguments make of it ---

// queueLimits are a queue's x-max-length, x-max-length-bytes and x-overflow. The zero
// value is no limit.
type queueLimits struct {
	maxLen, maxBytes int64 // -1: none
	limited          bool  // a limit is set
	rejectPublish    bool  // x-overflow reject-publish: refuse new messages instead of dropping old
	dlx              bool  // x-overflow reject-publish-dlx: and dead-letter the refused ones
}

// full reports whether n ready messages of size octets break a limit.
func (l queueLimits) full(n int, size int64) bool {
	return l.limited && (l.maxLen >= 0 && int64(n) > l.maxLen || l.maxBytes >= 0 && size > l.maxBytes)
}

// parseQueueLimits reads x-max-length, x-max-length-bytes and x-overflow.
func parseQueueLimits(args table) (queueLimits, string, error) {
	l := queueLimits{maxLen: -1, maxBytes: -1}
	for _, a := range []struct {
		name string
		dst  *int64
	}{{"x-max-length", &l.maxLen}, {"x-max-length-bytes", &l.maxBytes}} {
		v, ok := args[a.name]
		if !ok {
			continue
		}
		n, ok := intValue(v)
		if !ok {
			return l, a.name, errors.New("{unacceptable_type," + fieldType(v) + "}")
		}
		if n < 0 {
			return l, a.name, errors.New("{value_negative," + strconv.FormatInt(n, 10) + "}")
		}
		*a.dst = n
		l.limited = true
	}
	switch v := args["x-overflow"]; v {
	case nil, "drop-head":
	case "reject-publish", "reject-publish-dlx":
		l.rejectPublish, l.dlx = true, v == "reject-publish-dlx"
	default:
		return l, "x-overflow", errors.New("invalid_overflow")
	}
	return l, "", nil
}

// queueArgs are what a queue's x-arguments make of it.
type queueArgs struct {
	ttl             ttl
	limits          queueLimits
	expires         int64
	deliveryLimit   int64
	dead            *deadLetterTarget
	single          bool
	priorities      bool
	maxPriority     uint8
	consumerTimeout int64
}

// parseQueueArgs reads a queue's x-arguments. The first wrong one is named in bad, with
// RabbitMQ's reason, for "invalid arg 'bad' for queue ...: reason"; the others are read
// all the same (recovery uses what it can of arguments an older version accepted).
func parseQueueArgs(args table) (qa queueArgs, bad string, err error) {
	note := func(name string, e error) {
		if e != nil && err == nil {
			bad, err = name, e
		}
	}
	var e error
	var name string
	qa.ttl, e = queueTTL(args)
	note("x-message-ttl", e)
	qa.limits, name, e = parseQueueLimits(args)
	note(name, e)
	qa.expires, e = queueExpires(args)
	note("x-expires", e)
	qa.deliveryLimit, e = queueDeliveryLimit(args)
	note("x-delivery-limit", e)
	qa.dead, name, e = parseDeadLetter(args)
	note(name, e)
	qa.single, e = queueSingleActive(args)
	note("x-single-active-consumer", e)
	qa.maxPriority, qa.priorities, e = queueMaxPriority(args)
	note("x-max-priority", e)
	qa.consumerTimeout, _, e = millisArg(args, "x-consumer-timeout", false)
	note("x-consumer-timeout", e)
	return qa, bad, err
}

// queueExpires reads x-expires from queue arguments: an integer of milliseconds from 1 to
// maxTTL. The error text is RabbitMQ's.
func queueExpires(args table) (int64, error) {
	n, _, err := millisArg(args, "x-expires", false)
	return n, err
}

// queueDeliveryLimit reads x-delivery-limit, a non-negative integer, and returns it plus
// one (0: none).
func queueDeliveryLimit(args table) (int64, error) {
	v, ok := args["x-delivery-limit"]
	if !ok {
		return 0, nil
	}
	n, ok := intValue(v)
	switch {
	case !ok:
		return 0, errors.New("{unacceptable_type," + fieldType(v) + "}")
	case n < 0:
		return 0, errors.New("{value_negative," + strconv.FormatInt(n, 10) + "}")
	}
	return min(n, math.MaxUint32) + 1, nil
}

// queueMaxPriority reads x-max-priority: an integer from 0 to 255 (0 acts as 1), as
// RabbitMQ's check_max_priority_arg; ok is false when the queue has no priorities.
func queueMaxPriority(args table) (highest uint8, ok bool, err error) {
	v, has := args["x-max-priority"]
	if !has {
		return 0, false, nil
	}
	n, isInt := intValue(v)
	switch {
	case !isInt:
		return 0, false, errors.New("{unacceptable_type," + fieldType(v) + "}")
	case n < 0:
		return 0, false, errors.New("{value_negative," + strconv.FormatInt(n, 10) + "}")
	case n > 255:
		return 0, false, errors.New("{max_value_exceeded," + strconv.FormatInt(n, 10) + "}")
	}
	return uint8(max(n, 1)), true, nil
}

// queueSingleActive reads x-single-active-consumer from queue arguments: a boolean, as
// RabbitMQ requires; its error text is RabbitMQ's.
func queueSingleActive(args table) (bool, error) {
	v, ok := args["x-single-active-consumer"]
	if !ok {
		return false, nil
	}
	b, ok := v.(bool)
	if !ok {
		return false, errors.New("{unacceptable_type," + fieldType(v) + "}")
	}
	return b, nil
}

// maxTTL is the largest time to live RabbitMQ accepts, in milliseconds (its
// MAX_EXPIRY_TIMER); larger values of expiration and x-message-ttl are 406, so no expiry
// time can overflow.
const maxTTL = 1<<32 - 1

// queueTTL reads x-message-ttl from queue arguments: an integer of milliseconds from 0 to
// maxTTL. The error text is RabbitMQ's.
func queueTTL(args table) (ttl, error) {
	n, ok, err := millisArg(args, "x-message-ttl", true)
	if !ok || err != nil {
		return 0, err
	}
	return newTTL(n), nil
}

// millisArg reads a queue argument of milliseconds, at most maxTTL (0 allowed when
// zeroOK), as RabbitMQ checks x-message-ttl and x-expires; ok says it is present.
func millisArg(args table, name string, zeroOK bool) (n int64, ok bool, err error) {
	v, ok := args[name]
	if !ok {
		return 0, false, nil
	}
	n, isInt := intValue(v)
	switch {
	case !isInt:
		return 0, true, errors.New("{unacceptable_type," + fieldType(v) + "}")
	case n == 0 && !zeroOK:
		return 0, true, errors.New("{value_zero,0}")
	case n < 0:
		return 0, true, errors.New("{value_negative," + strconv.FormatInt(n, 10) + "}")
	case n > maxTTL:
		return 0, true, errors.New("{value_too_large," + strconv.FormatInt(n, 10) + "}")
	}
	return n, true, nil
}
