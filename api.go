package amqp

import (
	"bytes"
	"cmp"
	"encoding/base64"
	"encoding/json"
	"errors"
	"hash/fnv"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// The management API's resources: vhosts, users, permissions and policies (kept in the
// definitions), exchanges, queues and bindings (through sessions), and the definitions
// export and import. http.go has the server, routing, authentication and helpers.

// --- virtual hosts ---

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

func (s *Server) vhostInfo(vh *vhost) map[string]any {
	var ready, unacked int64
	vh.mu.RLock()
	qs := make([]*queue, 0, len(vh.queues))
	for _, q := range vh.queues {
		qs = append(qs, q)
	}
	vh.mu.RUnlock()
	for _, q := range qs {
		q.mu.Lock()
		ready += int64(q.messageCountLocked())
		unacked += q.unackedLocked()
		q.mu.Unlock()
	}
	return map[string]any{"name": vh.name, "description": "", "tags": []string{}, "default_queue_type": "classic",
		"metadata": map[string]any{"description": "", "tags": []string{}}, "tracing": false,
		"cluster_state": map[string]string{s.node(): "running"},
		"messages":      ready + unacked, "messages_ready": ready, "messages_unacknowledged": unacked}
}

func (s *Server) apiVhosts(r *http.Request, u *apiUser) (any, error) {
	vhs, _ := s.visibleVhosts(r, u)
	items := make([]map[string]any, 0, len(vhs))
	for _, vh := range vhs {
		items = append(items, s.vhostInfo(vh))
	}
	return listAnswer(r, items)
}

func (s *Server) apiVhost(r *http.Request, u *apiUser) (any, error) {
	vh, err := s.pathVhost(r, u)
	if err != nil {
		return nil, err
	}
	return s.vhostInfo(vh), nil
}

func (s *Server) apiPutVhost(r *http.Request, u *apiUser) (any, error) {
	name := r.PathValue("vhost")
	if _, err := readJSON(r); err != nil {
		return nil, err
	}
	created := false
	err := s.editDefinitions(func(d *Definitions) error {
		if d.vhost(name) >= 0 {
			return nil
		}
		created = true
		return d.AddVhost(name)
	})
	if err != nil {
		return nil, badRequest(strings.TrimPrefix(err.Error(), "amqp: "))
	}
	if created {
		return apiStatus(http.StatusCreated), nil
	}
	return apiStatus(http.StatusNoContent), nil
}

func (s *Server) apiDeleteVhost(r *http.Request, u *apiUser) (any, error) {
	name := r.PathValue("vhost")
	return s.editOrNotFound(func(d *Definitions) (bool, error) {
		if d.vhost(name) < 0 {
			return false, nil
		}
		return true, d.DeleteVhost(name)
	})
}

// editOrNotFound runs editDefinitions with an edit that reports whether its object exists:
// 404 when it does not, 204 when the change is made.
func (s *Server) editOrNotFound(edit func(d *Definitions) (bool, error)) (any, error) {
	found := true
	err := s.editDefinitions(func(d *Definitions) error {
		var err error
		found, err = edit(d)
		if !found && err == nil {
			return errNoChange
		}
		return err
	})
	switch {
	case !found:
		return nil, notFoundAPI()
	case err != nil:
		return nil, badRequest(strings.TrimPrefix(err.Error(), "amqp: "))
	}
	return apiStatus(http.StatusNoContent), nil
}

// errNoChange stops editDefinitions without saving.
var errNoChange = errors.New("amqp: nothing to change")

// --- users and permissions ---

func userInfo(du User) map[string]any {
	tags := du.Tags
	if tags == nil {
		tags = []string{}
	}
	return map[string]any{"name": du.Name, "password_hash": du.PasswordHash, "hashing_algorithm": du.HashingAlgorithm,
		"tags": tags, "limits": map[string]any{}}
}

func (s *Server) apiUsers(r *http.Request, u *apiUser) (any, error) {
	d := s.definitions()
	items := make([]map[string]any, 0, len(d.Users))
	for _, du := range d.Users {
		items = append(items, userInfo(du))
	}
	return listAnswer(r, items)
}

func (s *Server) apiUser(r *http.Request, u *apiUser) (any, error) {
	d := s.definitions()
	if i := d.user(r.PathValue("user")); i >= 0 {
		return userInfo(d.Users[i]), nil
	}
	return nil, notFoundAPI()
}

// apiPutUser creates or updates a user: password (hashed here) or password_hash (with
// hashing_algorithm), and tags, a list or a comma-separated string.
func (s *Server) apiPutUser(r *http.Request, u *apiUser) (any, error) {
	name := r.PathValue("user")
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	password, err1 := jsonString(body, "password", "")
	hash, err2 := jsonString(body, "password_hash", "")
	algorithm, err3 := jsonString(body, "hashing_algorithm", hashingSHA256)
	if err := cmp.Or(err1, err2, err3); err != nil {
		return nil, err
	}
	_, hasPassword := body["password"]
	_, hasHash := body["password_hash"]
	if !hasPassword && !hasHash {
		return nil, badRequest("user needs a password or a password_hash")
	}
	var tags []string
	switch t := body["tags"].(type) {
	case string:
		for _, tag := range strings.Split(t, ",") {
			if tag = strings.TrimSpace(tag); tag != "" {
				tags = append(tags, tag)
			}
		}
	case []any:
		for _, e := range t {
			tag, ok := e.(string)
			if !ok {
				return nil, badRequest("tags must be strings")
			}
			tags = append(tags, tag)
		}
	case nil:
	default:
		return nil, badRequest("tags must be a list or a comma-separated string")
	}
	if hasHash {
		if hashFunc(algorithm) == nil {
			return nil, badRequest("unknown hashing_algorithm " + strconv.Quote(algorithm))
		}
		if hash != "" {
			if b, err := base64.StdEncoding.DecodeString(hash); err != nil || len(b) <= saltLen {
				return nil, badRequest("password_hash must be base64 of a salt and a hash")
			}
		}
	}
	created := false
	err = s.editDefinitions(func(d *Definitions) error {
		i := d.user(name)
		if i < 0 {
			created = true
			if err := d.AddUser(name, ""); err != nil {
				return err
			}
			i = d.user(name)
		}
		du := &d.Users[i]
		if hasHash {
			du.PasswordHash, du.HashingAlgorithm = hash, algorithm
		} else if password != "" {
			du.PasswordHash, du.HashingAlgorithm = hashPassword(password), hashingSHA256
		} else {
			du.PasswordHash = ""
		}
		du.Tags = tags
		return nil
	})
	if err != nil {
		return nil, badRequest(strings.TrimPrefix(err.Error(), "amqp: "))
	}
	if created {
		return apiStatus(http.StatusCreated), nil
	}
	return apiStatus(http.StatusNoContent), nil
}

func (s *Server) apiDeleteUser(r *http.Request, u *apiUser) (any, error) {
	name := r.PathValue("user")
	return s.editOrNotFound(func(d *Definitions) (bool, error) {
		if d.user(name) < 0 {
			return false, nil
		}
		return true, d.DeleteUser(name)
	})
}

func permissionInfo(p Permission) map[string]any {
	return map[string]any{"user": p.User, "vhost": p.Vhost, "configure": p.Configure, "write": p.Write, "read": p.Read}
}

func (s *Server) apiPermissions(r *http.Request, u *apiUser) (any, error) {
	d := s.definitions()
	vhost, user := r.PathValue("vhost"), r.PathValue("user")
	if vhost != "" && d.vhost(vhost) < 0 || user != "" && d.user(user) < 0 {
		return nil, notFoundAPI()
	}
	var items []map[string]any
	for _, p := range d.Permissions {
		if (vhost == "" || p.Vhost == vhost) && (user == "" || p.User == user) {
			items = append(items, permissionInfo(p))
		}
	}
	return listAnswer(r, items)
}

func (s *Server) apiPermission(r *http.Request, u *apiUser) (any, error) {
	d := s.definitions()
	if i := d.permission(r.PathValue("user"), r.PathValue("vhost")); i >= 0 {
		return permissionInfo(d.Permissions[i]), nil
	}
	return nil, notFoundAPI()
}

func (s *Server) apiPutPermission(r *http.Request, u *apiUser) (any, error) {
	vhost, user := r.PathValue("vhost"), r.PathValue("user")
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	conf, err1 := jsonString(body, "configure", "")
	write, err2 := jsonString(body, "write", "")
	read, err3 := jsonString(body, "read", "")
	if err := cmp.Or(err1, err2, err3); err != nil {
		return nil, err
	}
	created := false
	err = s.editDefinitions(func(d *Definitions) error {
		if d.vhost(vhost) < 0 || d.user(user) < 0 {
			return errNoChange
		}
		created = d.permission(user, vhost) < 0
		return d.SetPermissions(user, vhost, conf, write, read)
	})
	switch {
	case err == errNoChange:
		return nil, notFoundAPI()
	case err != nil:
		return nil, badRequest(strings.TrimPrefix(err.Error(), "amqp: "))
	case created:
		return apiStatus(http.StatusCreated), nil
	}
	return apiStatus(http.StatusNoContent), nil
}

func (s *Server) apiDeletePermission(r *http.Request, u *apiUser) (any, error) {
	vhost, user := r.PathValue("vhost"), r.PathValue("user")
	return s.editOrNotFound(func(d *Definitions) (bool, error) {
		if d.permission(user, vhost) < 0 {
			return false, nil
		}
		return true, d.ClearPermissions(user, vhost)
	})
}

// --- policies ---

func policyInfo(p Policy) map[string]any {
	var def any = map[string]any{}
	json.Unmarshal(p.Definition, &def)
	return map[string]any{"vhost": p.Vhost, "name": p.Name, "pattern": p.Pattern, "apply-to": p.ApplyTo,
		"definition": def, "priority": p.Priority}
}

func policiesOf(d *Definitions, operator bool) ([]Policy, error) {
	if operator {
		return d.OperatorPolicies()
	}
	return d.Policies()
}

func (s *Server) apiPolicies(r *http.Request, u *apiUser, operator bool) (any, error) {
	vhost := r.PathValue("vhost")
	if vhost != "" && !s.canSee(u, vhost) {
		return nil, notFoundAPI()
	}
	ps, err := policiesOf(s.definitions(), operator)
	if err != nil {
		return nil, err
	}
	var items []map[string]any
	for _, p := range ps {
		if (vhost == "" || p.Vhost == vhost) && s.canSee(u, p.Vhost) {
			items = append(items, policyInfo(p))
		}
	}
	return listAnswer(r, items)
}

func (s *Server) apiPolicy(r *http.Request, u *apiUser, operator bool) (any, error) {
	vhost, name := r.PathValue("vhost"), r.PathValue("name")
	if !s.canSee(u, vhost) {
		return nil, notFoundAPI()
	}
	ps, err := policiesOf(s.definitions(), operator)
	if err != nil {
		return nil, err
	}
	for _, p := range ps {
		if p.Vhost == vhost && p.Name == name {
			return policyInfo(p), nil
		}
	}
	return nil, notFoundAPI()
}

func (s *Server) apiPutPolicy(r *http.Request, u *apiUser, operator bool) (any, error) {
	vhost, name := r.PathValue("vhost"), r.PathValue("name")
	if !s.canSee(u, vhost) {
		return nil, notFoundAPI()
	}
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	pattern, err1 := jsonString(body, "pattern", "")
	applyTo, err2 := jsonString(body, "apply-to", "all")
	priority, err3 := jsonInt(body, "priority", 0)
	if err := cmp.Or(err1, err2, err3); err != nil {
		return nil, err
	}
	def, err := json.Marshal(body["definition"])
	if err != nil || body["definition"] == nil {
		return nil, badRequest("definition must be an object")
	}
	p := Policy{Vhost: vhost, Name: name, Pattern: pattern, ApplyTo: applyTo, Priority: int(priority), Definition: def}
	created := false
	err = s.editDefinitions(func(d *Definitions) error {
		ps, err := policiesOf(d, operator)
		if err != nil {
			return err
		}
		created = !slices.ContainsFunc(ps, func(o Policy) bool { return o.Vhost == vhost && o.Name == name })
		if operator {
			return d.SetOperatorPolicy(p)
		}
		return d.SetPolicy(p)
	})
	if err != nil {
		return nil, badRequest(strings.TrimPrefix(err.Error(), "amqp: "))
	}
	if created {
		return apiStatus(http.StatusCreated), nil
	}
	return apiStatus(http.StatusNoContent), nil
}

func (s *Server) apiDeletePolicy(r *http.Request, u *apiUser, operator bool) (any, error) {
	vhost, name := r.PathValue("vhost"), r.PathValue("name")
	if !s.canSee(u, vhost) {
		return nil, notFoundAPI()
	}
	return s.editOrNotFound(func(d *Definitions) (bool, error) {
		var err error
		if operator {
			err = d.ClearOperatorPolicy(vhost, name)
		} else {
			err = d.ClearPolicy(vhost, name)
		}
		return err == nil, nil
	})
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
	if existed {
		return apiStatus(http.StatusNoContent), nil
	}
	return apiStatus(http.StatusCreated), nil
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
	sm := &q.counts.sample
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
	policy, opPolicy := q.policy, q.operatorPolicy
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
	if existed {
		return apiStatus(http.StatusNoContent), nil
	}
	return apiStatus(http.StatusCreated), nil
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
		return strings.ReplaceAll(urlEscape(key), "%7E", "~")
	}
	h := fnv.New64a()
	h.Write(appendTable(nil, args))
	return urlEscape(key) + "~" + base64.RawURLEncoding.EncodeToString(h.Sum(nil))
}

// urlEscape escapes s as a path segment.
func urlEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-_.", c) >= 0 {
			b.WriteByte(c)
		} else {
			b.WriteString("%" + strings.ToUpper(strconv.FormatUint(uint64(c)>>4, 16)+strconv.FormatUint(uint64(c)&15, 16)))
		}
	}
	return b.String()
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
		for _, b := range vh.exchanges[name].bindings {
			if b.queue != nil {
				items = append(items, bindingInfo(vh.name, name, b.queue.name, "queue", b.key, b.args))
			} else if b.dest != nil {
				items = append(items, bindingInfo(vh.name, name, b.dest.name, "exchange", b.key, b.args))
			}
		}
	}
	return items
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
	for _, b := range vhostBindings(vhs[0]) {
		if b["source"] == src && b["destination"] == dest && b["destination_type"] == destType && b["properties_key"] == r.PathValue("props") {
			return b, nil
		}
	}
	return nil, notFoundAPI()
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
	vh.mu.RLock()
	for _, x := range vh.exchanges {
		for _, bb := range x.bindings {
			if x.name == src && bb.key == key && (bb.queue != nil && bb.queue.name == dest || bb.dest != nil && bb.dest.name == dest) {
				args = bb.args // the binding's own arguments, types and all
			}
		}
	}
	vh.mu.RUnlock()
	_, err = s.withSession(r, u, func(ss *session) (any, error) {
		if destType == "queue" {
			return ss.call(&queueUnbind{Queue: dest, Exchange: src, RoutingKey: key, Arguments: args}, idQueueUnbindOk)
		}
		return ss.call(&exchangeUnbind{Destination: dest, Source: src, RoutingKey: key, Arguments: args}, idExchangeUnbindOk)
	})
	return nil, err
}

// --- definitions ---

// apiDefinitions exports the definitions in RabbitMQ's format: users, vhosts,
// permissions, policies and parameters from the definitions in force, and the durable
// queues, exchanges and bindings of the broker; for one vhost, its part.
func (s *Server) apiDefinitions(r *http.Request, u *apiUser) (any, error) {
	vhost := r.PathValue("vhost")
	if vhost != "" && s.vhost(vhost) == nil {
		return nil, notFoundAPI()
	}
	d := s.definitions()
	b, err := d.encode()
	if err != nil {
		return nil, err
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, err
	}
	out["rabbit_version"], out["rabbitmq_version"], out["product_name"], out["product_version"] = Version, Version, "amqp-go", Version
	var queues, exchanges, bindings []any
	for _, vh := range s.vhostList() {
		if vhost != "" && vh.name != vhost {
			continue
		}
		vh.mu.RLock()
		for _, q := range vh.queues {
			if q.durable && !q.exclusive {
				queues = append(queues, map[string]any{"name": q.name, "vhost": vh.name, "durable": true,
					"auto_delete": q.autoDelete, "arguments": tableJSON(q.args), "type": "classic"})
			}
		}
		for _, x := range vh.exchanges {
			if x.durable && !predeclared(x.name) && !strings.HasPrefix(x.name, "amq.") {
				exchanges = append(exchanges, map[string]any{"name": x.name, "vhost": vh.name, "type": exchangeType(x), "durable": true,
					"auto_delete": x.autoDelete, "internal": x.internal, "arguments": tableJSON(x.args)})
			}
			for _, b := range x.bindings {
				switch {
				case b.queue != nil && b.queue.durable && !b.queue.exclusive && x.durable:
					bindings = append(bindings, map[string]any{"source": x.name, "vhost": vh.name, "destination": b.queue.name,
						"destination_type": "queue", "routing_key": b.key, "arguments": tableJSON(b.args)})
				case b.dest != nil && b.dest.durable && x.durable:
					bindings = append(bindings, map[string]any{"source": x.name, "vhost": vh.name, "destination": b.dest.name,
						"destination_type": "exchange", "routing_key": b.key, "arguments": tableJSON(b.args)})
				}
			}
		}
		vh.mu.RUnlock()
	}
	byName := func(items []any, keys ...string) []any {
		if items == nil {
			return []any{}
		}
		slices.SortFunc(items, func(a, b any) int {
			for _, k := range keys {
				x, _ := a.(map[string]any)[k].(string)
				y, _ := b.(map[string]any)[k].(string)
				if c := cmp.Compare(x, y); c != 0 {
					return c
				}
			}
			return 0
		})
		return items
	}
	out["queues"] = byName(queues, "vhost", "name")
	out["exchanges"] = byName(exchanges, "vhost", "name")
	out["bindings"] = byName(bindings, "vhost", "source", "destination", "routing_key")
	for _, k := range []string{"policies", "parameters", "global_parameters", "topic_permissions"} {
		if out[k] == nil {
			out[k] = []any{}
		}
	}
	if vhost != "" {
		for _, k := range []string{"users", "vhosts", "permissions", "topic_permissions", "global_parameters"} {
			delete(out, k)
		}
		for _, k := range []string{"policies", "parameters"} {
			list, _ := out[k].([]any)
			out[k] = slices.DeleteFunc(slices.Clone(list), func(e any) bool {
				m, _ := e.(map[string]any)
				return m["vhost"] != vhost
			})
		}
	}
	return out, nil
}

// importTopology is the queues, exchanges and bindings of a definitions import.
type importTopology struct {
	queues    []importQueue
	exchanges []importExchange
	bindings  []importBinding
}

type importQueue struct {
	vhost, name         string
	durable, autoDelete bool
	args                table
}

type importExchange struct {
	vhost, name, kind             string
	durable, autoDelete, internal bool
	args                          table
}

type importBinding struct {
	vhost, source, dest, destType, key string
	args                               table
}

// apiImportDefinitions imports a definitions document, as RabbitMQ's POST
// /api/definitions does: users, vhosts, permissions, topic permissions, policies and
// parameters are merged into the definitions file, then exchanges, queues and bindings are
// declared, in that order. Everything is checked first (formats, arguments, equivalence with
// what exists, binding ends), so an import that fails changes nothing. For one vhost
// (/api/definitions/{vhost}), objects without a vhost go to it and users, vhosts and
// permissions are ignored.
func (s *Server) apiImportDefinitions(r *http.Request, u *apiUser) (any, error) {
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		return nil, err
	}
	vhost := r.PathValue("vhost")
	var top map[string]json.RawMessage
	if err := json.Unmarshal(raw, &top); err != nil || top == nil {
		return nil, badRequest("the body is not a JSON object")
	}
	if vhost != "" {
		if s.vhost(vhost) == nil {
			return nil, notFoundAPI()
		}
		for _, k := range []string{"users", "vhosts", "permissions", "topic_permissions", "global_parameters"} {
			delete(top, k)
		}
		for _, k := range []string{"policies", "parameters", "queues", "exchanges", "bindings"} {
			if list, ok := top[k]; ok {
				top[k] = setVhost(list, vhost)
			}
		}
		raw, _ = json.Marshal(top)
	}
	in, err := decodeUnchecked(raw)
	if err != nil {
		return nil, badRequest("definitions: " + err.Error())
	}
	merged := s.definitions()
	merged.merge(in)
	if err := merged.check(); err != nil {
		return nil, badRequest(err.Error())
	}
	if _, _, err := merged.policySets(); err != nil {
		return nil, badRequest(err.Error())
	}
	topo, err := readImportTopology(in)
	if err != nil {
		return nil, badRequest(err.Error())
	}
	if err := s.checkImport(merged, topo); err != nil {
		return nil, badRequest(err.Error())
	}
	if err := s.editDefinitions(func(d *Definitions) error { d.merge(in); return nil }); err != nil {
		return nil, badRequest(strings.TrimPrefix(err.Error(), "amqp: "))
	}
	if err := s.declareImport(u, topo); err != nil {
		return nil, err
	}
	return apiStatus(http.StatusNoContent), nil
}

// setVhost sets "vhost" on the objects of a list that have none.
func setVhost(list json.RawMessage, vhost string) json.RawMessage {
	var objs []map[string]json.RawMessage
	if json.Unmarshal(list, &objs) != nil {
		return list
	}
	v, _ := json.Marshal(vhost)
	for _, o := range objs {
		if o != nil && len(o["vhost"]) == 0 {
			o["vhost"] = v
		}
	}
	b, _ := json.Marshal(objs)
	return b
}

// readImportTopology reads the queues, exchanges and bindings sections of an import.
func readImportTopology(d *Definitions) (*importTopology, error) {
	t := &importTopology{}
	read := func(key string, each func(m map[string]any) error) error {
		objs, err := d.sectionObjects(key)
		if err != nil {
			return err
		}
		for i, o := range objs {
			b, _ := json.Marshal(o)
			dec := json.NewDecoder(bytes.NewReader(b))
			dec.UseNumber()
			var m map[string]any
			dec.Decode(&m)
			if err := each(m); err != nil {
				return errors.New(key + "[" + strconv.Itoa(i) + "]: " + err.Error())
			}
		}
		return nil
	}
	str := func(m map[string]any, k string) string { v, _ := m[k].(string); return v }
	err := read("queues", func(m map[string]any) error {
		q := importQueue{vhost: str(m, "vhost"), name: str(m, "name")}
		var err1, err2, err3 error
		q.durable, err1 = jsonBool(m, "durable", true)
		q.autoDelete, err2 = jsonBool(m, "auto_delete", false)
		q.args, err3 = jsonTable(m["arguments"])
		if t, _ := m["type"].(string); t != "" && t != "classic" {
			if q.args == nil {
				q.args = table{}
			}
			q.args["x-queue-type"] = t
		}
		t.queues = append(t.queues, q)
		return cmp.Or(err1, err2, err3)
	})
	if err != nil {
		return nil, err
	}
	err = read("exchanges", func(m map[string]any) error {
		x := importExchange{vhost: str(m, "vhost"), name: str(m, "name"), kind: str(m, "type")}
		var err1, err2, err3, err4 error
		x.durable, err1 = jsonBool(m, "durable", true)
		x.autoDelete, err2 = jsonBool(m, "auto_delete", false)
		x.internal, err3 = jsonBool(m, "internal", false)
		x.args, err4 = jsonTable(m["arguments"])
		t.exchanges = append(t.exchanges, x)
		return cmp.Or(err1, err2, err3, err4)
	})
	if err != nil {
		return nil, err
	}
	err = read("bindings", func(m map[string]any) error {
		b := importBinding{vhost: str(m, "vhost"), source: str(m, "source"), dest: str(m, "destination"),
			destType: str(m, "destination_type"), key: str(m, "routing_key")}
		var err error
		b.args, err = jsonTable(m["arguments"])
		if b.destType != "queue" && b.destType != "exchange" {
			return errors.New("destination_type must be queue or exchange")
		}
		t.bindings = append(t.bindings, b)
		return err
	})
	return t, err
}

// checkImport checks an import's topology before anything changes: vhosts that exist,
// names, exchange types, arguments, equivalence with what is declared, and binding ends.
func (s *Server) checkImport(d *Definitions, t *importTopology) error {
	exists := func(vhost, name string, queue bool) bool {
		vh := s.vhost(vhost)
		if vh == nil {
			return false
		}
		vh.mu.RLock()
		defer vh.mu.RUnlock()
		if queue {
			return vh.queues[name] != nil
		}
		return vh.exchanges[name] != nil
	}
	xs := map[[2]string]bool{}
	qs := map[[2]string]bool{}
	for _, x := range t.exchanges {
		what := describeExchange(x.name, x.vhost)
		switch {
		case d.vhost(x.vhost) < 0:
			return errors.New(what + ": no such vhost")
		case x.name == "" || predeclared(x.name):
			continue
		case x.kind == kindDelayed:
			if err := checkDelayedType(x.args); err != nil {
				return errors.New(what + ": " + err.Error())
			}
		case !validKind(x.kind):
			return errors.New(what + ": unknown exchange type '" + x.kind + "'")
		}
		if ae, ok := x.args["alternate-exchange"]; ok {
			if _, isStr := ae.(string); !isStr {
				return errors.New(what + ": alternate-exchange must be a string")
			}
		}
		if vh := s.vhost(x.vhost); vh != nil {
			vh.mu.RLock()
			old := vh.exchanges[x.name]
			vh.mu.RUnlock()
			if old != nil {
				if err := old.equivalent(&exchangeDeclare{Exchange: x.name, Type: x.kind, Durable: x.durable, AutoDelete: x.autoDelete, Internal: x.internal, Arguments: x.args}, x.vhost); err != nil {
					return err
				}
			}
		}
		xs[[2]string{x.vhost, x.name}] = true
	}
	for _, q := range t.queues {
		what := describeQueue(q.name, q.vhost)
		if d.vhost(q.vhost) < 0 {
			return errors.New(what + ": no such vhost")
		}
		if q.name == "" || reservedName(q.name) {
			return errors.New(what + ": a queue needs a name, not starting amq.")
		}
		if _, bad, err := parseQueueArgs(q.args); err != nil {
			return errors.New("invalid arg '" + bad + "' for " + what + ": " + err.Error())
		}
		if vh := s.vhost(q.vhost); vh != nil {
			vh.mu.RLock()
			old := vh.queues[q.name]
			vh.mu.RUnlock()
			if old != nil {
				if err := old.equivalent(&queueDeclare{Queue: q.name, Durable: q.durable, AutoDelete: q.autoDelete, Exclusive: old.exclusive, Arguments: q.args}); err != nil {
					return err
				}
			}
		}
		qs[[2]string{q.vhost, q.name}] = true
	}
	for _, b := range t.bindings {
		k := [2]string{b.vhost, b.source}
		if b.source != "" && !xs[k] && !exists(b.vhost, b.source, false) {
			return errors.New("binding from " + describeExchange(b.source, b.vhost) + ": no such exchange")
		}
		if b.source == "" {
			return errors.New("binding to '" + b.dest + "': the default exchange cannot be bound")
		}
		k = [2]string{b.vhost, b.dest}
		if b.destType == "queue" && !qs[k] && !exists(b.vhost, b.dest, true) ||
			b.destType == "exchange" && !xs[k] && !exists(b.vhost, b.dest, false) {
			return errors.New("binding to " + b.destType + " '" + b.dest + "' in vhost '" + b.vhost + "': no such " + b.destType)
		}
	}
	return nil
}

// declareImport declares an import's exchanges, queues and bindings, vhost by vhost, in a
// session of u that skips permission checks.
func (s *Server) declareImport(u *apiUser, t *importTopology) error {
	sessions := map[string]*session{}
	defer func() {
		for _, ss := range sessions {
			ss.close()
		}
	}()
	in := func(vhost string) (*session, error) {
		if ss := sessions[vhost]; ss != nil {
			return ss, nil
		}
		ss, err := s.openSession(u.name, u.password, vhost, u.remote, true)
		if err == nil {
			sessions[vhost] = ss
		}
		return ss, err
	}
	for _, x := range t.exchanges {
		if x.name == "" || predeclared(x.name) {
			continue
		}
		ss, err := in(x.vhost)
		if err == nil {
			_, err = ss.call(&exchangeDeclare{Exchange: x.name, Type: x.kind, Durable: x.durable, AutoDelete: x.autoDelete, Internal: x.internal, Arguments: x.args}, idExchangeDeclareOk)
		}
		if err != nil {
			return err
		}
	}
	for _, q := range t.queues {
		ss, err := in(q.vhost)
		if err == nil {
			_, err = ss.call(&queueDeclare{Queue: q.name, Durable: q.durable, AutoDelete: q.autoDelete, Arguments: q.args}, idQueueDeclareOk)
		}
		if err != nil {
			return err
		}
	}
	for _, b := range t.bindings {
		ss, err := in(b.vhost)
		if err == nil {
			if b.destType == "queue" {
				_, err = ss.call(&queueBind{Queue: b.dest, Exchange: b.source, RoutingKey: b.key, Arguments: b.args}, idQueueBindOk)
			} else {
				_, err = ss.call(&exchangeBind{Destination: b.dest, Source: b.source, RoutingKey: b.key, Arguments: b.args}, idExchangeBindOk)
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}
