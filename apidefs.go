package amqp

import (
	"bytes"
	"cmp"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// The management API's resources kept in the definitions: vhosts, users, permissions and
// policies (edited through editDefinitions, saved and applied at once), and the definitions
// export and import. api.go has the objects that go through sessions.

// --- virtual hosts ---

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
	return putStatus(created), nil
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

// putStatus is a PUT's answer, as RabbitMQ's: 201 Created for a new object, 204 No
// Content for one that existed.
func putStatus(created bool) apiStatus {
	if created {
		return http.StatusCreated
	}
	return http.StatusNoContent
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
	return putStatus(created), nil
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
	}
	return putStatus(created), nil
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
	return putStatus(created), nil
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
