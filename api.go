package amqp

import (
	"cmp"
	"encoding/base64"
	"hash/fnv"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// The management API's objects: exchanges, queues and bindings, changed through sessions
// (loopback.go), and what a vhost's visibility decides. apidefs.go has the resources kept in
// the definitions; http.go the server, routing, authentication and helpers.

// --- visibility ---

// canSee reports whether u may see the objects of vhost: monitoring and administrator
// users see every vhost, others those they have permissions on.
func (s *Server) canSee(u *apiUser, vhost string) bool {
	db := s.auth.Load()
	if !db.vhosts[vhost] {
		return false
	}
	if u.monitor() {
		return true
	}
	du := db.users[u.name]
	return du != nil && du.perms[vhost] != nil
}

// pathVhost returns the vhost the request names and u may see, or 404.
func (s *Server) pathVhost(r *http.Request, u *apiUser) (*vhost, error) {
	name := r.PathValue("vhost")
	if !s.canSee(u, name) {
		return nil, notFoundAPI()
	}
	vh := s.vhost(name)
	if vh == nil {
		return nil, notFoundAPI()
	}
	return vh, nil
}

// visibleVhosts returns the vhosts a list covers: the one in the path, or all u may see.
func (s *Server) visibleVhosts(r *http.Request, u *apiUser) ([]*vhost, error) {
	if r.PathValue("vhost") != "" {
		vh, err := s.pathVhost(r, u)
		if err != nil {
			return nil, err
		}
		return []*vhost{vh}, nil
	}
	var vhs []*vhost
	for _, vh := range s.vhostList() {
		if s.canSee(u, vh.name) {
			vhs = append(vhs, vh)
		}
	}
	return vhs, nil
}

// --- sessions: what goes through the AMQP code ---

// withSession runs fn in a session of u on the request's vhost.
func (s *Server) withSession(r *http.Request, u *apiUser, fn func(ss *session) (any, error)) (any, error) {
	vh, err := s.pathVhost(r, u)
	if err != nil {
		return nil, err
	}
	ss, err := s.openSession(u.name, u.password, vh.name, u.remote, false)
	if err != nil {
		return nil, err
	}
	defer ss.close()
	return fn(ss)
}

// exchangeName maps the API's name of the default exchange, amq.default, to "".
func exchangeName(name string) string {
	if name == defaultExchangeName {
		return ""
	}
	return name
}

// --- exchanges ---

func exchangeInfo(vh *vhost, x *exchange) map[string]any {
	name := x.name
	args := tableJSON(x.args)
	return map[string]any{"name": name, "vhost": vh.name, "type": exchangeType(x), "durable": x.durable, "auto_delete": x.autoDelete,
		"internal": x.internal, "arguments": args, "user_who_performed_action": "rmq-internal", "policy": nil}
}

func (s *Server) apiExchanges(r *http.Request, u *apiUser) (any, error) {
	vhs, err := s.visibleVhosts(r, u)
	if err != nil {
		return nil, err
	}
	var items []map[string]any
	for _, vh := range vhs {
		vh.mu.RLock()
		for _, x := range vh.exchanges {
			items = append(items, exchangeInfo(vh, x))
		}
		vh.mu.RUnlock()
	}
	sortByVhostName(items)
	return listAnswer(r, items)
}

// sortByVhostName orders API items by vhost, then name, as RabbitMQ lists them.
func sortByVhostName(items []map[string]any) {
	slices.SortFunc(items, func(a, b map[string]any) int {
		av, _ := a["vhost"].(string)
		bv, _ := b["vhost"].(string)
		an, _ := a["name"].(string)
		bn, _ := b["name"].(string)
		return cmp.Or(cmp.Compare(av, bv), cmp.Compare(an, bn))
	})
}

func (s *Server) apiExchange(r *http.Request, u *apiUser) (any, error) {
	vh, err := s.pathVhost(r, u)
	if err != nil {
		return nil, err
	}
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	x := vh.exchanges[exchangeName(r.PathValue("name"))]
	if x == nil {
		return nil, notFoundAPI()
	}
	return exchangeInfo(vh, x), nil
}

func (s *Server) apiPutExchange(r *http.Request, u *apiUser) (any, error) {
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	kind, err1 := jsonString(body, "type", "")
	durable, err2 := jsonBool(body, "durable", true)
	autoDelete, err3 := jsonBool(body, "auto_delete", false)
	internal, err4 := jsonBool(body, "internal", false)
	args, err5 := jsonTable(body["arguments"])
	if err := cmp.Or(err1, err2, err3, err4, err5); err != nil {
		return nil, err
	}
	if kind == "" {
		return nil, badRequest("type must be given")
	}
	name := r.PathValue("name")
	existed := false
	if vh := s.vhost(r.PathValue("vhost")); vh != nil {
		vh.mu.RLock()
		existed = vh.exchanges[name] != nil
		vh.mu.RUnlock()
	}
	_, err = s.withSession(r, u, func(ss *session) (any, error) {
		return ss.call(&exchangeDeclare{Exchange: name, Type: kind, Durable: durable, AutoDelete: autoDelete, Internal: internal, Arguments: args}, idExchangeDeclareOk)
	})
	if err != nil {
		return nil, err
	}
	return putStatus(!existed), nil
}

func (s *Server) apiDeleteExchange(r *http.Request, u *apiUser) (any, error) {
	name := exchangeName(r.PathValue("name"))
	ifUnused := r.URL.Query().Get("if-unused") == "true"
	if _, err := s.apiExchange(r, u); err != nil {
		return nil, err
	}
	_, err := s.withSession(r, u, func(ss *session) (any, error) {
		return ss.call(&exchangeDelete{Exchange: name, IfUnused: ifUnused}, idExchangeDeleteOk)
	})
	return nil, err
}

// apiPublish publishes a message, as RabbitMQ's API does: routing_key, payload,
// payload_encoding (string or base64) and properties; the answer says whether it routed.
func (s *Server) apiPublish(r *http.Request, u *apiUser) (any, error) {
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	key, err1 := jsonString(body, "routing_key", "")
	payload, err2 := jsonString(body, "payload", "")
	encoding, err3 := jsonString(body, "payload_encoding", "string")
	if err := cmp.Or(err1, err2, err3); err != nil {
		return nil, err
	}
	data := []byte(payload)
	switch encoding {
	case "string":
	case "base64":
		if data, err = base64.StdEncoding.DecodeString(payload); err != nil {
			return nil, badRequest("payload is not base64")
		}
	default:
		return nil, badRequest("payload_encoding must be string or base64")
	}
	props, err := apiProperties(body["properties"])
	if err != nil {
		return nil, err
	}
	name := exchangeName(r.PathValue("name"))
	return s.withSession(r, u, func(ss *session) (any, error) {
		routed, err := ss.publish(name, key, props, data)
		if err != nil {
			return nil, err
		}
		return map[string]bool{"routed": routed}, nil
	})
}

// apiProperties reads the properties object of a publish: RabbitMQ's names, headers as a
// table, delivery_mode and priority as numbers.
func apiProperties(v any) (*properties, error) {
	p := &properties{}
	m, _ := v.(map[string]any)
	if v != nil && m == nil {
		return nil, badRequest("properties must be an object")
	}
	for k, raw := range m {
		str, _ := raw.(string)
		num := func() (int64, error) { return jsonInt(m, k, 0) }
		var err error
		switch k {
		case "content_type":
			p.ContentType = str
		case "content_encoding":
			p.ContentEncoding = str
		case "correlation_id":
			p.CorrelationID = str
		case "reply_to":
			p.ReplyTo = str
		case "expiration":
			p.Expiration = str
		case "message_id":
			p.MessageID = str
		case "type":
			p.Type = str
		case "user_id":
			p.UserID = str
		case "app_id":
			p.AppID = str
		case "headers":
			p.Headers, err = jsonTable(raw)
		case "delivery_mode":
			var n int64
			n, err = num()
			p.DeliveryMode = uint8(n)
		case "priority":
			var n int64
			n, err = num()
			p.Priority = uint8(n)
		case "timestamp":
			var n int64
			n, err = num()
			p.Timestamp = uint64(n)
		}
		if err != nil {
			return nil, err
		}
	}
	return p, nil
}

// --- queues ---

// rateSample is the last look at a counter, for a rate: RabbitMQ's *_details.rate, here
// the rate since the previous sample at least five seconds older.
type rateSample struct {
	at                   time.Time
	published, delivered uint64
	pubRate, delRate     float64
}

// deliveredLocked is the number of messages q delivered and basic.get took. q.mu must be
// held.
func (q *queue) deliveredLocked() uint64 {
	return q.stats.n[qcConsumeManual] + q.stats.n[qcConsumeAuto] + q.stats.n[qcGetManual] + q.stats.n[qcGetAuto]
}

// rates returns q's publish and deliver rates, taking a new sample when the last is five
// seconds old. q.mu must be held.
func (q *queue) ratesLocked(now time.Time) (pub, del float64) {
	if q.counts.sample == nil {
		q.counts.sample = &rateSample{}
	}
	sm := q.counts.sample
	if d := now.Sub(sm.at); sm.at.IsZero() || d >= 5*time.Second {
		if !sm.at.IsZero() {
			sm.pubRate = float64(q.counts.published-sm.published) / d.Seconds()
			sm.delRate = float64(q.deliveredLocked()-sm.delivered) / d.Seconds()
		}
		sm.at, sm.published, sm.delivered = now, q.counts.published, q.deliveredLocked()
	}
	return sm.pubRate, sm.delRate
}

func queueInfo(vh *vhost, q *queue, now time.Time, node string) map[string]any {
	q.mu.Lock()
	q.expireLocked()
	ready := q.messageCountLocked()
	readyBytes := q.readyBytes
	consumers := len(q.consumers)
	published, delivered, redelivered := q.counts.published, q.deliveredLocked(), q.stats.n[qcRedelivered]
	unacked := q.unackedLocked()
	pubRate, delRate := q.ratesLocked(now)
	policy, opPolicy := q.settings().policy, q.settings().operatorPolicy
	var single, exclusiveTag any
	if q.single && q.active != nil {
		single = q.active.tag
	}
	for _, c := range q.consumers {
		if c.exclusive {
			exclusiveTag = c.tag
		}
	}
	paged, ram, ramBytes := q.tail.len(), q.ready.len()+len(q.requeued), q.ramBytes
	consumerDetails := make([]any, 0, len(q.consumers))
	for _, c := range q.consumers {
		consumerDetails = append(consumerDetails, consumerInfo(vh, q, c))
	}
	var head any
	if at, ok := q.headEnqueuedLocked(); ok {
		head = at / 1000 // seconds, RabbitMQ's unit
	}
	q.mu.Unlock()
	info := map[string]any{
		"name": q.name, "vhost": vh.name, "durable": q.durable, "auto_delete": q.autoDelete, "exclusive": q.exclusive,
		"arguments": tableJSON(q.args), "node": node, "state": "running", "type": "classic",
		"messages": int64(ready) + unacked, "messages_ready": ready, "messages_unacknowledged": unacked,
		"message_bytes": readyBytes, "message_bytes_ready": readyBytes, "message_bytes_unacknowledged": 0,
		"consumers": consumers, "policy": nilIfEmpty(policy), "operator_policy": nilIfEmpty(opPolicy),
		"exclusive_consumer_tag": exclusiveTag, "single_active_consumer_tag": single,
		"head_message_timestamp": head, "consumer_details": consumerDetails,
		"messages_paged_out": paged, "messages_ram": ram, "messages_ready_ram": ram, "memory": ramBytes,
		"message_bytes_ram": ramBytes, "effective_policy_definition": vh.effectivePolicy(policy, opPolicy),
		"message_stats": map[string]any{
			"publish": published, "publish_details": map[string]any{"rate": pubRate},
			"deliver_get": delivered, "deliver_get_details": map[string]any{"rate": delRate},
			"redeliver": redelivered,
		},
	}
	if consumers == 0 {
		idle := q.lastUsed.Load()
		if idle == 0 {
			idle = now.UnixMilli()
		}
		info["idle_since"] = time.UnixMilli(idle).UTC().Format("2006-01-02T15:04:05.000+00:00")
	}
	if q.exclusive && q.owner != nil {
		info["owner_pid_details"] = map[string]any{"name": connectionName(q.owner)}
	}
	return info
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func (s *Server) apiQueues(r *http.Request, u *apiUser) (any, error) {
	vhs, err := s.visibleVhosts(r, u)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	var items []map[string]any
	for _, vh := range vhs {
		for _, q := range vh.queueList() {
			items = append(items, queueInfo(vh, q, now, s.node()))
		}
	}
	sortByVhostName(items)
	return listAnswer(r, items)
}

// queueList returns vh's queues.
func (vh *vhost) queueList() []*queue {
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	qs := make([]*queue, 0, len(vh.queues))
	for _, q := range vh.queues {
		qs = append(qs, q)
	}
	return qs
}

// pathQueue returns the queue the request names, or 404.
func (s *Server) pathQueue(r *http.Request, u *apiUser) (*vhost, *queue, error) {
	vh, err := s.pathVhost(r, u)
	if err != nil {
		return nil, nil, err
	}
	vh.mu.RLock()
	q := vh.queues[r.PathValue("name")]
	vh.mu.RUnlock()
	if q == nil {
		return nil, nil, notFoundAPI()
	}
	return vh, q, nil
}

func (s *Server) apiQueue(r *http.Request, u *apiUser) (any, error) {
	vh, q, err := s.pathQueue(r, u)
	if err != nil {
		return nil, err
	}
	return queueInfo(vh, q, time.Now(), s.node()), nil
}

func (s *Server) apiPutQueue(r *http.Request, u *apiUser) (any, error) {
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	durable, err1 := jsonBool(body, "durable", true)
	autoDelete, err2 := jsonBool(body, "auto_delete", false)
	args, err3 := jsonTable(body["arguments"])
	if err := cmp.Or(err1, err2, err3); err != nil {
		return nil, err
	}
	if t, _ := jsonString(body, "type", ""); t != "" && t != "classic" {
		if args == nil {
			args = table{}
		}
		args["x-queue-type"] = t
	}
	name := r.PathValue("name")
	existed := false
	if vh := s.vhost(r.PathValue("vhost")); vh != nil {
		vh.mu.RLock()
		existed = vh.queues[name] != nil
		vh.mu.RUnlock()
	}
	_, err = s.withSession(r, u, func(ss *session) (any, error) {
		return ss.call(&queueDeclare{Queue: name, Durable: durable, AutoDelete: autoDelete, Arguments: args}, idQueueDeclareOk)
	})
	if err != nil {
		return nil, err
	}
	return putStatus(!existed), nil
}

func (s *Server) apiDeleteQueue(r *http.Request, u *apiUser) (any, error) {
	if _, _, err := s.pathQueue(r, u); err != nil {
		return nil, err
	}
	q := r.URL.Query()
	_, err := s.withSession(r, u, func(ss *session) (any, error) {
		return ss.call(&queueDelete{Queue: r.PathValue("name"), IfUnused: q.Get("if-unused") == "true", IfEmpty: q.Get("if-empty") == "true"}, idQueueDeleteOk)
	})
	return nil, err
}

func (s *Server) apiPurge(r *http.Request, u *apiUser) (any, error) {
	if _, _, err := s.pathQueue(r, u); err != nil {
		return nil, err
	}
	_, err := s.withSession(r, u, func(ss *session) (any, error) {
		return ss.call(&queuePurge{Queue: r.PathValue("name")}, idQueuePurgeOk)
	})
	return nil, err
}

// apiGet takes up to count messages, as RabbitMQ's API does: ackmode ack_requeue_true or
// reject_requeue_true puts them back (redelivered), ack_requeue_false acks them,
// reject_requeue_false rejects them (to the dead-letter exchange, if any); encoding auto
// (a UTF-8 body as a string, else base64) or base64; truncate cuts payloads.
func (s *Server) apiGet(r *http.Request, u *apiUser) (any, error) {
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	count, err1 := jsonInt(body, "count", 1)
	ackmode, err2 := jsonString(body, "ackmode", "")
	encoding, err3 := jsonString(body, "encoding", "auto")
	truncate, err4 := jsonInt(body, "truncate", -1)
	if err := cmp.Or(err1, err2, err3, err4); err != nil {
		return nil, err
	}
	switch {
	case ackmode != "ack_requeue_true" && ackmode != "ack_requeue_false" && ackmode != "reject_requeue_true" && ackmode != "reject_requeue_false":
		return nil, badRequest("ackmode must be ack_requeue_true, ack_requeue_false, reject_requeue_true or reject_requeue_false")
	case encoding != "auto" && encoding != "base64":
		return nil, badRequest("encoding must be auto or base64")
	case count < 1 || count > 10000:
		return nil, badRequest("count must be between 1 and 10000")
	}
	if _, _, err := s.pathQueue(r, u); err != nil {
		return nil, err
	}
	name := r.PathValue("name")
	return s.withSession(r, u, func(ss *session) (any, error) {
		out := []any{}
		var last uint64
		for range count {
			g, err := ss.get(name, false)
			if err != nil {
				return nil, err
			}
			if g == nil {
				break
			}
			last = g.ok.DeliveryTag
			out = append(out, messageJSON(g.ok.Exchange, g.ok.RoutingKey, g.ok.Redelivered, int(g.ok.MessageCount), &g.props, g.body, encoding, truncate))
		}
		if last != 0 {
			switch ackmode {
			case "ack_requeue_false":
				ss.send(1, &basicAck{DeliveryTag: last, Multiple: true})
			default:
				ss.send(1, &basicNack{DeliveryTag: last, Multiple: true, Requeue: ackmode != "reject_requeue_false"})
			}
			// A round trip after the settlement: it is done when the answer is sent.
			if _, err := ss.call(&basicQos{}, idBasicQosOk); err != nil {
				return nil, err
			}
		}
		return out, nil
	})
}

// messageJSON is a message as RabbitMQ's get answers it.
func messageJSON(exchange, key string, redelivered bool, left int, p *properties, body []byte, encoding string, truncate int64) map[string]any {
	size := len(body)
	if truncate >= 0 && int64(len(body)) > truncate {
		body = body[:truncate]
	}
	payload, enc := string(body), "string"
	if encoding == "base64" || !utf8.Valid(body) {
		payload, enc = base64.StdEncoding.EncodeToString(body), "base64"
	}
	return map[string]any{"payload_bytes": size, "redelivered": redelivered, "exchange": exchange, "routing_key": key,
		"message_count": left, "properties": propertiesJSON(p), "payload": payload, "payload_encoding": enc}
}

// propertiesJSON is a message's properties as RabbitMQ's API shows them: only those set.
func propertiesJSON(p *properties) map[string]any {
	m := map[string]any{}
	for k, v := range map[string]string{"content_type": p.ContentType, "content_encoding": p.ContentEncoding,
		"correlation_id": p.CorrelationID, "reply_to": p.ReplyTo, "expiration": p.Expiration, "message_id": p.MessageID,
		"type": p.Type, "user_id": p.UserID, "app_id": p.AppID} {
		if v != "" {
			m[k] = v
		}
	}
	if p.Headers != nil {
		m["headers"] = tableJSON(p.Headers)
	}
	if p.DeliveryMode != 0 {
		m["delivery_mode"] = p.DeliveryMode
	}
	if p.Priority != 0 {
		m["priority"] = p.Priority
	}
	if p.Timestamp != 0 {
		m["timestamp"] = uint64(p.Timestamp)
	}
	return m
}

// apiPeek shows the first count (default 1, at most 1000) ready messages without taking,
// requeueing or marking them: beyond RabbitMQ. It needs read permission on the queue, as
// basic.get does. Messages paged out to disk are shown only once read back, so a peek of
// a long queue shows those in memory.
func (s *Server) apiPeek(r *http.Request, u *apiUser) (any, error) {
	vh, q, err := s.pathQueue(r, u)
	if err != nil {
		return nil, err
	}
	if err := s.auth.Load().check(u.name, vh.name, permRead, resQueue, q.name); err != nil {
		return nil, err
	}
	count := 1
	if c := r.URL.Query().Get("count"); c != "" {
		if count, err = strconv.Atoi(c); err != nil || count < 1 || count > 1000 {
			return nil, badRequest("count must be between 1 and 1000")
		}
	}
	out := []any{}
	q.mu.Lock()
	q.expireLocked()
	left := q.messageCountLocked()
	for _, e := range q.firstLocked(count) {
		var p properties
		d := decoder{b: e.msg.props()}
		p.decode(&d)
		left--
		out = append(out, messageJSON(e.msg.exchange, string(e.msg.routingKey()), e.redelivered, left, &p, e.msg.body(), "auto", -1))
	}
	q.mu.Unlock()
	return out, nil
}

// apiQueueAction runs an action on a queue: "redrive" moves a dead-letter queue's messages
// back to where their first death says they came from (see Server.Redrive); RabbitMQ's
// "sync" and "cancel_sync" do nothing here (there are no mirrors).
func (s *Server) apiQueueAction(r *http.Request, u *apiUser) (any, error) {
	vh, q, err := s.pathQueue(r, u)
	if err != nil {
		return nil, err
	}
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	action, err := jsonString(body, "action", "")
	if err != nil {
		return nil, err
	}
	switch action {
	case "sync", "cancel_sync":
		return apiStatus(http.StatusNoContent), nil
	case "redrive":
		db := s.auth.Load()
		if err := db.check(u.name, vh.name, permRead, resQueue, q.name); err != nil {
			return nil, err
		}
		n, err := s.Redrive(vh.name, q.name)
		if err != nil {
			return nil, badRequest(strings.TrimPrefix(err.Error(), "amqp: "))
		}
		return map[string]int{"redriven": n}, nil
	}
	return nil, badRequest("unknown action " + strconv.Quote(action))
}

// --- bindings ---

func bindingInfo(vhost, source, dest, destType, key string, args table) map[string]any {
	return map[string]any{"source": source, "vhost": vhost, "destination": dest, "destination_type": destType,
		"routing_key": key, "arguments": tableJSON(args), "properties_key": propertiesKey(key, args)}
}

// propertiesKey is RabbitMQ's name of a binding in the API: "~" for an empty key without
// arguments, the key URL-escaped, and "~" and a hash of the arguments when it has some.
func propertiesKey(key string, args table) string {
	if len(args) == 0 {
		if key == "" {
			return "~"
		}
		return url.PathEscape(key)
	}
	h := fnv.New64a()
	h.Write(appendTable(nil, args))
	return url.PathEscape(key) + "~" + base64.RawURLEncoding.EncodeToString(h.Sum(nil))
}

// vhostBindings lists vh's bindings, the default exchange's implicit ones first, as
// RabbitMQ lists them.
func vhostBindings(vh *vhost) []map[string]any {
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	var items []map[string]any
	names := make([]string, 0, len(vh.queues))
	for name := range vh.queues {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		items = append(items, bindingInfo(vh.name, "", name, "queue", name, nil))
	}
	xnames := make([]string, 0, len(vh.exchanges))
	for name := range vh.exchanges {
		xnames = append(xnames, name)
	}
	slices.Sort(xnames)
	for _, name := range xnames {
		for _, b := range sortedBindings(vh.exchanges[name].bindings) {
			if b.queue != nil {
				items = append(items, bindingInfo(vh.name, name, b.queue.name, "queue", b.key, b.args))
			} else if b.dest != nil {
				items = append(items, bindingInfo(vh.name, name, b.dest.name, "exchange", b.key, b.args))
			}
		}
	}
	return items
}

// sortedBindings returns a copy of bs (an exchange's, in no order) sorted as RabbitMQ's
// route table orders them: by routing key, then destination, exchanges before queues.
func sortedBindings(bs []*binding) []*binding {
	bs = slices.Clone(bs)
	slices.SortStableFunc(bs, func(a, b *binding) int {
		if c := strings.Compare(a.key, b.key); c != 0 {
			return c
		}
		if (a.queue == nil) != (b.queue == nil) {
			if a.queue == nil {
				return -1
			}
			return 1
		}
		return strings.Compare(a.destName(), b.destName())
	})
	return bs
}

// apiBindings lists bindings: all, a vhost's, an exchange's as source or destination, a
// queue's, or those between a source and a destination.
func (s *Server) apiBindings(r *http.Request, u *apiUser) (any, error) {
	vhs, err := s.visibleVhosts(r, u)
	if err != nil {
		return nil, err
	}
	path := r.URL.Path
	var keep func(b map[string]any) bool
	name := r.PathValue("name")
	switch {
	case strings.HasSuffix(path, "/bindings/source"):
		keep = func(b map[string]any) bool { return b["source"] == exchangeName(name) }
	case strings.HasSuffix(path, "/bindings/destination"):
		keep = func(b map[string]any) bool { return b["destination"] == name && b["destination_type"] == "exchange" }
	case strings.HasPrefix(path, "/api/queues/"):
		keep = func(b map[string]any) bool { return b["destination"] == name && b["destination_type"] == "queue" }
	case r.PathValue("source") != "":
		src, dest, destType := bindingEnds(r)
		keep = func(b map[string]any) bool {
			return b["source"] == src && b["destination"] == dest && b["destination_type"] == destType
		}
	}
	var items []map[string]any
	for _, vh := range vhs {
		for _, b := range vhostBindings(vh) {
			if keep == nil || keep(b) {
				items = append(items, b)
			}
		}
	}
	return listAnswer(r, items)
}

// bindingEnds returns the source, destination and destination type a bindings path names.
func bindingEnds(r *http.Request) (source, dest, destType string) {
	destType = "queue"
	if strings.Contains(r.Pattern, "/e/{dest}") {
		destType = "exchange"
	}
	return exchangeName(r.PathValue("source")), r.PathValue("dest"), destType
}

func (s *Server) apiBinding(r *http.Request, u *apiUser) (any, error) {
	vhs, err := s.visibleVhosts(r, u)
	if err != nil {
		return nil, err
	}
	src, dest, destType := bindingEnds(r)
	for _, b := range bindingsBetween(vhs[0], src, dest, destType) {
		if info := bindingInfo(vhs[0].name, src, dest, destType, b.key, b.args); info["properties_key"] == r.PathValue("props") {
			return info, nil
		}
	}
	return nil, notFoundAPI()
}

// bindingsBetween returns the bindings from the exchange src to the queue or exchange dest,
// found through the destination's own list, not a scan of the vhost's. The default
// exchange's binding to a queue is implicit: it is made up here.
func bindingsBetween(vh *vhost, src, dest, destType string) []*binding {
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	var to []*binding
	switch {
	case destType == "queue" && vh.queues[dest] != nil && src == "":
		return []*binding{{key: dest}}
	case destType == "queue" && vh.queues[dest] != nil:
		to = vh.queues[dest].bindings
	case destType == "exchange" && vh.exchanges[dest] != nil:
		to = vh.exchanges[dest].incoming
	}
	var bs []*binding
	for _, b := range to {
		if b.source.name == src {
			bs = append(bs, b)
		}
	}
	return bs
}

func (s *Server) apiPostBinding(r *http.Request, u *apiUser) (any, error) {
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	key, err1 := jsonString(body, "routing_key", "")
	args, err2 := jsonTable(body["arguments"])
	if err := cmp.Or(err1, err2); err != nil {
		return nil, err
	}
	src, dest, destType := bindingEnds(r)
	_, err = s.withSession(r, u, func(ss *session) (any, error) {
		if destType == "queue" {
			return ss.call(&queueBind{Queue: dest, Exchange: src, RoutingKey: key, Arguments: args}, idQueueBindOk)
		}
		return ss.call(&exchangeBind{Destination: dest, Source: src, RoutingKey: key, Arguments: args}, idExchangeBindOk)
	})
	if err != nil {
		return nil, err
	}
	return apiStatus(http.StatusCreated), nil
}

func (s *Server) apiDeleteBinding(r *http.Request, u *apiUser) (any, error) {
	b, err := s.apiBinding(r, u)
	if err != nil {
		return nil, err
	}
	info := b.(map[string]any)
	key := info["routing_key"].(string)
	args, _ := jsonTable(info["arguments"])
	src, dest, destType := bindingEnds(r)
	vh, _ := s.pathVhost(r, u)
	for _, bb := range bindingsBetween(vh, src, dest, destType) {
		if bb.key == key && bindingInfo(vh.name, src, dest, destType, bb.key, bb.args)["properties_key"] == info["properties_key"] {
			args = bb.args // the binding's own arguments, types and all
		}
	}
	_, err = s.withSession(r, u, func(ss *session) (any, error) {
		if destType == "queue" {
			return ss.call(&queueUnbind{Queue: dest, Exchange: src, RoutingKey: key, Arguments: args}, idQueueUnbindOk)
		}
		return ss.call(&exchangeUnbind{Destination: dest, Source: src, RoutingKey: key, Arguments: args}, idExchangeUnbindOk)
	})
	return nil, err
}
