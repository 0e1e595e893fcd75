package amqp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
)

// Users, virtual hosts and permissions live in a definitions file in RabbitMQ's format, as
// "rabbitmqctl export_definitions" writes it. Three top-level sections are modelled; the
// others (queues, exchanges, policies, ...) are kept verbatim and written back on Save, and
// two of those are read as well: topic_permissions, and the vhost-limits entries of
// parameters. A user's "limits" field is read too.
//
//	{
//	  "users":       [{"name": "alice", "password_hash": "<base64>",
//	                   "hashing_algorithm": "rabbit_password_hashing_sha256",
//	                   "tags": ["administrator"],
//	                   "limits": {"max-connections": 10, "max-channels": 50}}],
//	  "vhosts":      [{"name": "/", "metadata": {...}, "limits": []}],
//	  "permissions": [{"user": "alice", "vhost": "/",
//	                   "configure": "^alice-.*", "write": ".*", "read": ".*"}],
//	  "topic_permissions": [{"user": "alice", "vhost": "/", "exchange": "amq.topic",
//	                   "write": "^{username}\\.", "read": ".*"}],     (verbatim, read)
//	  "parameters":  [{"vhost": "/", "component": "vhost-limits", "name": "limits",
//	                   "value": {"max-connections": 100, "max-queues": 20}}, ...],
//	                                                 (verbatim, vhost-limits read)
//	  "queues": [...], ...                           (verbatim)
//	}
//
// Fields of a user, vhost or permission other than the ones above ("limits", "metadata")
// are kept verbatim too. Older RabbitMQ releases (3.6, for one) write tags as one
// comma-separated string; both forms are read, the list form is written. A vhost's own
// "limits" field mirrors its vhost-limits parameter; RabbitMQ's import ignores it, and so
// does the broker (it is named in the load warning when no parameter backs it). Whatever
// else the file holds that the broker does not enforce is named in one warning per load.

// Definitions is the users, virtual hosts and permissions of a broker, in RabbitMQ's
// definitions JSON format. Its methods keep it consistent: deleting a user drops their
// permissions and topic permissions, deleting a virtual host drops everything the file
// holds for it (permissions, and the entries of the verbatim sections naming it, such as
// its parameters, policies and queues). A Definitions is not safe for concurrent use.
type Definitions struct {
	Users       []User
	Vhosts      []VirtualHost
	Permissions []Permission

	sections map[string]json.RawMessage // other top-level sections, verbatim
}

// User is a user of the internal authentication backend. PasswordHash is base64 of a
// 4-byte salt followed by the hash of salt and password, computed with HashingAlgorithm
// (see [Definitions.AddUser]); an empty PasswordHash means the user cannot log in with a
// password. Tags, such as "administrator", are kept but grant nothing here.
type User struct {
	Name             string
	PasswordHash     string
	HashingAlgorithm string
	Tags             []string

	extra string // other fields, such as limits, as a JSON object; "" if none
}

// VirtualHost is a virtual host.
type VirtualHost struct {
	Name string

	extra string // other fields, such as metadata, as a JSON object; "" if none
}

// Permission grants User access to resources in Vhost. Configure, Write and Read are
// regular expressions (Go's RE2 syntax, nearly always the same as RabbitMQ's PCRE for
// permission patterns) matched, unanchored, against queue and exchange names; the
// default exchange is matched as "amq.default". An empty expression grants nothing.
type Permission struct {
	User, Vhost            string
	Configure, Write, Read string

	extra string // other fields as a JSON object; "" if none
}

// DefaultDefinitions returns what RabbitMQ creates on first start: virtual host "/" and
// user guest, password guest, tagged administrator, with all permissions on "/".
func DefaultDefinitions() *Definitions {
	return &Definitions{
		Users: []User{{
			Name:             guestUser,
			PasswordHash:     hashPassword(guestPassword),
			HashingAlgorithm: hashingSHA256,
			Tags:             []string{"administrator"},
		}},
		Vhosts:      []VirtualHost{{Name: "/"}},
		Permissions: []Permission{{User: guestUser, Vhost: "/", Configure: ".*", Write: ".*", Read: ".*"}},
	}
}

// LoadDefinitions reads a definitions file. A missing file is an error that satisfies
// errors.Is(err, fs.ErrNotExist). Duplicate names, and permissions for users or virtual
// hosts the file does not define, are errors; regular expressions are checked only when
// the broker loads the definitions.
func LoadDefinitions(path string) (*Definitions, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("amqp: load definitions: %w", err)
	}
	d, err := decodeDefinitions(b)
	if err != nil {
		return nil, fmt.Errorf("amqp: load definitions %s: %w", path, err)
	}
	return d, nil
}

// clone returns a deep copy of d.
func (d *Definitions) clone() *Definitions {
	b, err := d.encode()
	if err == nil {
		if c, err := decodeDefinitions(b); err == nil {
			return c
		}
	}
	c := *d // unreachable: d encodes and decodes
	return &c
}

// Save writes d to path atomically: a temporary file in the same directory is written,
// synced and renamed over path, and the directory is synced. The file has mode 0600.
func (d *Definitions) Save(path string) error {
	b, err := d.encode()
	if err != nil {
		return fmt.Errorf("amqp: save definitions: %w", err)
	}
	if err := writeFileAtomic(path, b); err != nil {
		return fmt.Errorf("amqp: save definitions: %w", err)
	}
	return nil
}

// AddUser adds a user with no tags and no permissions. The password is hashed with
// SHA-256 and a random salt, as RabbitMQ does by default; an empty password leaves the
// user unable to log in with a password.
func (d *Definitions) AddUser(name, password string) error {
	if name == "" {
		return errors.New("amqp: user name is empty")
	}
	if d.user(name) >= 0 {
		return fmt.Errorf("amqp: user %q already exists", name)
	}
	u := User{Name: name, HashingAlgorithm: hashingSHA256}
	if password != "" {
		u.PasswordHash = hashPassword(password)
	}
	d.Users = append(d.Users, u)
	return nil
}

// DeleteUser deletes a user and their permissions.
func (d *Definitions) DeleteUser(name string) error {
	i := d.user(name)
	if i < 0 {
		return fmt.Errorf("amqp: user %q does not exist", name)
	}
	d.Users = slices.Delete(d.Users, i, i+1)
	d.Permissions = slices.DeleteFunc(d.Permissions, func(p Permission) bool { return p.User == name })
	d.pruneSection("topic_permissions", "user", name)
	return nil
}

// ChangePassword replaces a user's password hash with a new SHA-256 one. An empty
// password clears it, as "rabbitmqctl clear_password" does.
func (d *Definitions) ChangePassword(name, password string) error {
	i := d.user(name)
	if i < 0 {
		return fmt.Errorf("amqp: user %q does not exist", name)
	}
	u := &d.Users[i]
	u.HashingAlgorithm = hashingSHA256
	u.PasswordHash = ""
	if password != "" {
		u.PasswordHash = hashPassword(password)
	}
	return nil
}

// SetUserTags replaces a user's tags; no tags clears them.
func (d *Definitions) SetUserTags(name string, tags ...string) error {
	i := d.user(name)
	if i < 0 {
		return fmt.Errorf("amqp: user %q does not exist", name)
	}
	var t []string
	for _, tag := range tags {
		if tag = strings.TrimSpace(tag); tag != "" && !slices.Contains(t, tag) {
			t = append(t, tag)
		}
	}
	d.Users[i].Tags = t
	return nil
}

// AddVhost adds a virtual host.
func (d *Definitions) AddVhost(name string) error {
	if name == "" {
		return errors.New("amqp: virtual host name is empty")
	}
	if d.vhost(name) >= 0 {
		return fmt.Errorf("amqp: virtual host %q already exists", name)
	}
	d.Vhosts = append(d.Vhosts, VirtualHost{Name: name})
	return nil
}

// DeleteVhost deletes a virtual host and the permissions on it. A broker reloading the
// file deletes the virtual host's queues, exchanges, bindings and messages too.
func (d *Definitions) DeleteVhost(name string) error {
	i := d.vhost(name)
	if i < 0 {
		return fmt.Errorf("amqp: virtual host %q does not exist", name)
	}
	d.Vhosts = slices.Delete(d.Vhosts, i, i+1)
	d.Permissions = slices.DeleteFunc(d.Permissions, func(p Permission) bool { return p.Vhost == name })
	for key := range d.sections {
		d.pruneSection(key, "vhost", name)
	}
	return nil
}

// pruneSection drops the objects of the verbatim section key whose field is the string
// value, as RabbitMQ drops a deleted user's topic permissions and everything of a deleted
// virtual host. A section that is not a list of objects is left alone.
func (d *Definitions) pruneSection(key, field, value string) {
	d.editSection(key, func(obj map[string]json.RawMessage) bool {
		var s string
		return json.Unmarshal(obj[field], &s) == nil && s == value
	}, nil)
}

// SetPermissions sets, or replaces, a user's permissions on a virtual host. Both must
// exist, and each non-empty expression must compile.
func (d *Definitions) SetPermissions(user, vhost, configure, write, read string) error {
	if d.user(user) < 0 {
		return fmt.Errorf("amqp: user %q does not exist", user)
	}
	if d.vhost(vhost) < 0 {
		return fmt.Errorf("amqp: virtual host %q does not exist", vhost)
	}
	for i, re := range [...]string{configure, write, read} {
		if _, err := compilePermission(re); err != nil {
			return fmt.Errorf("amqp: invalid %s regular expression %q: %w", permKind(i), re, err)
		}
	}
	p := Permission{User: user, Vhost: vhost, Configure: configure, Write: write, Read: read}
	if i := d.permission(user, vhost); i >= 0 {
		p.extra = d.Permissions[i].extra
		d.Permissions[i] = p
	} else {
		d.Permissions = append(d.Permissions, p)
	}
	return nil
}

// ClearPermissions removes a user's permissions on a virtual host; both must exist. It
// is not an error if there were none.
func (d *Definitions) ClearPermissions(user, vhost string) error {
	if d.user(user) < 0 {
		return fmt.Errorf("amqp: user %q does not exist", user)
	}
	if d.vhost(vhost) < 0 {
		return fmt.Errorf("amqp: virtual host %q does not exist", vhost)
	}
	if i := d.permission(user, vhost); i >= 0 {
		d.Permissions = slices.Delete(d.Permissions, i, i+1)
	}
	return nil
}

// user returns the index of the named user, or -1.
func (d *Definitions) user(name string) int {
	return slices.IndexFunc(d.Users, func(u User) bool { return u.Name == name })
}

// vhost returns the index of the named virtual host, or -1.
func (d *Definitions) vhost(name string) int {
	return slices.IndexFunc(d.Vhosts, func(v VirtualHost) bool { return v.Name == name })
}

// permission returns the index of a user's permissions on a virtual host, or -1.
func (d *Definitions) permission(user, vhost string) int {
	return slices.IndexFunc(d.Permissions, func(p Permission) bool { return p.User == user && p.Vhost == vhost })
}

// check reports duplicate or empty names, and permissions and topic permissions that name
// an unknown user or virtual host.
func (d *Definitions) check() error {
	users := make(map[string]bool, len(d.Users))
	for _, u := range d.Users {
		if u.Name == "" {
			return errors.New("a user has an empty name")
		}
		if users[u.Name] {
			return fmt.Errorf("user %q is defined twice", u.Name)
		}
		users[u.Name] = true
	}
	vhosts := make(map[string]bool, len(d.Vhosts))
	for _, v := range d.Vhosts {
		if v.Name == "" {
			return errors.New("a virtual host has an empty name")
		}
		if vhosts[v.Name] {
			return fmt.Errorf("virtual host %q is defined twice", v.Name)
		}
		vhosts[v.Name] = true
	}
	type key struct{ user, vhost string }
	perms := make(map[key]bool, len(d.Permissions))
	for _, p := range d.Permissions {
		switch k := (key{p.User, p.Vhost}); {
		case !users[p.User]:
			return fmt.Errorf("permissions in virtual host %q for user %q: no such user", p.Vhost, p.User)
		case !vhosts[p.Vhost]:
			return fmt.Errorf("permissions in virtual host %q for user %q: no such virtual host", p.Vhost, p.User)
		case perms[k]:
			return fmt.Errorf("permissions in virtual host %q for user %q are defined twice", p.Vhost, p.User)
		default:
			perms[k] = true
		}
	}
	_, err := d.topicPermissions()
	return err
}

// decodeDefinitions parses a definitions document. A user given a clear-text "password"
// instead of a "password_hash", as RabbitMQ accepts on import, gets it hashed here, so
// the clear text is never written back.
func decodeDefinitions(b []byte) (*Definitions, error) {
	d, err := decodeUnchecked(b)
	if err != nil {
		return nil, err
	}
	if err := d.check(); err != nil {
		return nil, err
	}
	return d, nil
}

// decodeUnchecked is decodeDefinitions without the checks across sections: for an import,
// whose permissions may name users and vhosts the broker already has.
func decodeUnchecked(b []byte) (*Definitions, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return nil, err
	}
	if top == nil {
		return nil, errors.New("not a JSON object")
	}
	d := &Definitions{}
	users, err := decodeObjects(top, "users")
	if err != nil {
		return nil, err
	}
	for i, m := range users {
		u, err := decodeUser(m)
		if err != nil {
			return nil, fmt.Errorf("users[%d]: %w", i, err)
		}
		d.Users = append(d.Users, u)
	}
	vhosts, err := decodeObjects(top, "vhosts")
	if err != nil {
		return nil, err
	}
	for i, m := range vhosts {
		var v VirtualHost
		if err := takeStrings(m, map[string]*string{"name": &v.Name}); err != nil {
			return nil, fmt.Errorf("vhosts[%d]: %w", i, err)
		}
		v.extra = extraFields(m)
		d.Vhosts = append(d.Vhosts, v)
	}
	perms, err := decodeObjects(top, "permissions")
	if err != nil {
		return nil, err
	}
	for i, m := range perms {
		var p Permission
		if err := takeStrings(m, map[string]*string{"user": &p.User, "vhost": &p.Vhost,
			"configure": &p.Configure, "write": &p.Write, "read": &p.Read}); err != nil {
			return nil, fmt.Errorf("permissions[%d]: %w", i, err)
		}
		p.extra = extraFields(m)
		d.Permissions = append(d.Permissions, p)
	}
	d.sections = nonEmpty(top)
	return d, nil
}

// decodeObjects removes section key from top and returns its objects; absent or null is
// none.
func decodeObjects(top map[string]json.RawMessage, key string) ([]map[string]json.RawMessage, error) {
	raw, ok := top[key]
	delete(top, key)
	if !ok {
		return nil, nil
	}
	var objs []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &objs); err != nil {
		return nil, fmt.Errorf("%s: want a list of objects", key)
	}
	for i, m := range objs {
		if m == nil {
			return nil, fmt.Errorf("%s[%d]: want an object", key, i)
		}
	}
	return objs, nil
}

// decodeUser reads a user object, leaving unknown fields in m.
func decodeUser(m map[string]json.RawMessage) (User, error) {
	var u User
	var password string
	_, hasPassword := m["password"]
	_, hasHash := m["password_hash"]
	if err := takeStrings(m, map[string]*string{"name": &u.Name, "password_hash": &u.PasswordHash,
		"hashing_algorithm": &u.HashingAlgorithm, "password": &password}); err != nil {
		return u, err
	}
	if hasPassword {
		if hasHash {
			return u, errors.New("both password and password_hash are set")
		}
		u.HashingAlgorithm, u.PasswordHash = hashingSHA256, ""
		if password != "" {
			u.PasswordHash = hashPassword(password)
		}
	}
	tags, err := decodeTags(m["tags"])
	if err != nil {
		return u, err
	}
	delete(m, "tags")
	u.Tags = tags
	u.extra = extraFields(m)
	return u, nil
}

// decodeTags reads tags as a list of strings or as one comma-separated string.
func decodeTags(raw json.RawMessage) ([]string, error) {
	var list []string
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &list); err != nil {
			var s string
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, errors.New("tags: want a list of strings or a comma-separated string")
			}
			list = strings.Split(s, ",")
		}
	}
	var tags []string
	for _, t := range list {
		if t = strings.TrimSpace(t); t != "" && !slices.Contains(tags, t) {
			tags = append(tags, t)
		}
	}
	return tags, nil
}

// takeStrings removes each key from m and stores its value; absent or null is "".
func takeStrings(m map[string]json.RawMessage, fields map[string]*string) error {
	for key, dst := range fields {
		raw, ok := m[key]
		if !ok {
			continue
		}
		delete(m, key)
		var s *string
		if err := json.Unmarshal(raw, &s); err != nil {
			return fmt.Errorf("%s: want a string", key)
		}
		if s != nil {
			*dst = *s
		}
	}
	return nil
}

// nonEmpty returns m, or nil if it is empty.
func nonEmpty(m map[string]json.RawMessage) map[string]json.RawMessage {
	if len(m) == 0 {
		return nil
	}
	return m
}

// extraFields returns the fields left in m as a JSON object, or "" if none are. A string
// keeps User, VirtualHost and Permission comparable with ==.
func extraFields(m map[string]json.RawMessage) string {
	if len(m) == 0 {
		return ""
	}
	var buf strings.Builder
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.Encode(m) // cannot fail: every value is valid JSON
	return strings.TrimSuffix(buf.String(), "\n")
}

// sectionObjects returns the objects of the verbatim section key; absent or null is none.
func (d *Definitions) sectionObjects(key string) ([]map[string]json.RawMessage, error) {
	raw, ok := d.sections[key]
	if !ok {
		return nil, nil
	}
	return decodeObjects(map[string]json.RawMessage{key: raw}, key)
}

// topicPermission is an entry of the topic_permissions section: the routing keys user may
// publish with (write) and bind with (read) at the topic exchange exchange of vhost.
type topicPermission struct {
	user, vhost, exchange, write, read string
}

// topicPermissions reads the topic_permissions section, kept verbatim, and checks that each
// entry names a defined user and virtual host, and each exchange once per user and vhost.
func (d *Definitions) topicPermissions() ([]topicPermission, error) {
	objs, err := d.sectionObjects("topic_permissions")
	if err != nil || len(objs) == 0 {
		return nil, err
	}
	users := make(map[string]bool, len(d.Users))
	for _, u := range d.Users {
		users[u.Name] = true
	}
	vhosts := make(map[string]bool, len(d.Vhosts))
	for _, v := range d.Vhosts {
		vhosts[v.Name] = true
	}
	seen := make(map[topicPermission]bool, len(objs))
	tps := make([]topicPermission, 0, len(objs))
	for i, m := range objs {
		var p topicPermission
		if err := takeStrings(m, map[string]*string{"user": &p.user, "vhost": &p.vhost, "exchange": &p.exchange,
			"write": &p.write, "read": &p.read}); err != nil {
			return nil, fmt.Errorf("topic_permissions[%d]: %w", i, err)
		}
		k := topicPermission{user: p.user, vhost: p.vhost, exchange: p.exchange}
		switch what := fmt.Sprintf("topic permissions on exchange %q in virtual host %q for user %q", p.exchange, p.vhost, p.user); {
		case !users[p.user]:
			return nil, errors.New(what + ": no such user")
		case !vhosts[p.vhost]:
			return nil, errors.New(what + ": no such virtual host")
		case seen[k]:
			return nil, errors.New(what + " are defined twice")
		}
		seen[k] = true
		tps = append(tps, p)
	}
	return tps, nil
}

// limits are resource limits of a virtual host or a user from the definitions file. As in
// RabbitMQ a negative value is no limit and 0 allows none.
type limits struct {
	maxConnections int // vhosts and users
	maxQueues      int // vhosts
	maxChannels    int // users: channels open across all the user's connections
}

// noLimits is the limits of a vhost or user the file sets none for.
var noLimits = limits{maxConnections: -1, maxQueues: -1, maxChannels: -1}

// stricterLimit combines a Config limit, where 0 is none, with a definitions limit, where a
// negative value is none, into the stricter, negative when neither limits anything.
func stricterLimit(config, defs int) int {
	if config > 0 && (defs < 0 || config < defs) {
		return config
	}
	return defs
}

// decodeLimits reads a limits object, {"max-connections": 10, ...}, into l. Names other than
// known are returned, for the load warning. Null, {} and [] (RabbitMQ's export of no
// limits) set nothing; values must be integers, as RabbitMQ validates them.
func decodeLimits(raw json.RawMessage, l *limits, known ...string) (ignored []string, err error) {
	var m map[string]json.RawMessage
	if len(raw) == 0 || string(raw) == "null" || isEmptyList(raw) {
		return nil, nil
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, errors.New("limits: want an object")
	}
	for _, name := range slices.Sorted(maps.Keys(m)) {
		if !slices.Contains(known, name) {
			ignored = append(ignored, name)
			continue
		}
		n, err := strconv.Atoi(string(m[name]))
		if err != nil {
			return nil, fmt.Errorf("limits: %s: want an integer, not %s", name, m[name])
		}
		switch name {
		case "max-connections":
			l.maxConnections = max(n, -1)
		case "max-queues":
			l.maxQueues = max(n, -1)
		case "max-channels":
			l.maxChannels = max(n, -1)
		}
	}
	return ignored, nil
}

// isEmptyList reports whether raw is the JSON list [].
func isEmptyList(raw json.RawMessage) bool {
	var list []json.RawMessage
	return json.Unmarshal(raw, &list) == nil && list != nil && len(list) == 0
}

// vhostLimits reads the vhost limits from the parameters section, kept verbatim: entries of
// component "vhost-limits" named "limits", as "rabbitmqctl set_vhost_limits" stores them,
// export_definitions writes them and import reads them. It also names, for the load
// warning, the parameters of other components and the limits it does not know.
func (d *Definitions) vhostLimits() (map[string]limits, []string, error) {
	objs, err := d.sectionObjects("parameters")
	if err != nil {
		return nil, nil, err
	}
	vls := make(map[string]limits)
	other := make(map[string]int) // ignored components, counted
	var ignored []string
	for i, m := range objs {
		var vhost, component, name string
		if err := takeStrings(m, map[string]*string{"vhost": &vhost, "component": &component, "name": &name}); err != nil {
			return nil, nil, fmt.Errorf("parameters[%d]: %w", i, err)
		}
		if component == operatorPolicyComponent {
			continue // see OperatorPolicies
		}
		if component != "vhost-limits" || name != "limits" {
			other[component]++
			continue
		}
		if d.vhost(vhost) < 0 {
			return nil, nil, fmt.Errorf("parameters[%d]: vhost-limits of virtual host %q: no such virtual host", i, vhost)
		}
		if _, dup := vls[vhost]; dup {
			return nil, nil, fmt.Errorf("parameters[%d]: vhost-limits of virtual host %q are defined twice", i, vhost)
		}
		l := noLimits
		names, err := decodeLimits(m["value"], &l, "max-connections", "max-queues")
		if err != nil {
			return nil, nil, fmt.Errorf("parameters[%d]: vhost-limits of virtual host %q: %w", i, vhost, err)
		}
		for _, n := range names {
			ignored = append(ignored, "limit "+n+" of vhost '"+vhost+"'")
		}
		vls[vhost] = l
	}
	for _, c := range slices.Sorted(maps.Keys(other)) {
		ignored = append(ignored, "parameters of component "+c+" ("+strconv.Itoa(other[c])+")")
	}
	return vls, ignored, nil
}

// userLimits reads the "limits" field of a user, kept in its extra fields.
func userLimits(u User) (limits, []string, error) {
	l := noLimits
	if u.extra == "" {
		return l, nil, nil
	}
	var m map[string]json.RawMessage
	json.Unmarshal([]byte(u.extra), &m) // extra is an object extraFields wrote
	names, err := decodeLimits(m["limits"], &l, "max-connections", "max-channels")
	if err != nil {
		return l, nil, fmt.Errorf("user %q: %w", u.Name, err)
	}
	var ignored []string
	for _, n := range names {
		ignored = append(ignored, "limit "+n+" of user '"+u.Name+"'")
	}
	return l, ignored, nil
}

// ignoredSections names, for the load warning, the verbatim top-level sections that hold
// something the broker does not act on: queues, exchanges, bindings, policies, global
// parameters other than the cluster's name and id, sections it does not know. Empty
// sections, the version fields, topic_permissions and parameters (see vhostLimits) are not
// named; a vhost's own "limits" field is when no vhost-limits parameter backs it.
func (d *Definitions) ignoredSections(vls map[string]limits) []string {
	var ignored []string
	for _, key := range slices.Sorted(maps.Keys(d.sections)) {
		raw := d.sections[key]
		if key == "topic_permissions" || key == "parameters" || key == "policies" || slices.Contains(informationalSections, key) {
			continue
		}
		var list []json.RawMessage
		var obj map[string]json.RawMessage
		switch {
		case key == "global_parameters":
			var names []string
			objs, _ := d.sectionObjects(key)
			for _, m := range objs {
				var name string
				takeStrings(m, map[string]*string{"name": &name})
				if name != "cluster_name" && name != "internal_cluster_id" {
					names = append(names, name)
				}
			}
			if len(names) > 0 {
				ignored = append(ignored, "global_parameters "+strings.Join(names, " "))
			}
		case json.Unmarshal(raw, &list) == nil:
			if len(list) > 0 {
				ignored = append(ignored, key+" ("+strconv.Itoa(len(list))+")")
			}
		case json.Unmarshal(raw, &obj) == nil:
			if len(obj) > 0 {
				ignored = append(ignored, key)
			}
		case string(raw) != "null" && string(raw) != `""`:
			ignored = append(ignored, key)
		}
	}
	for _, v := range d.Vhosts {
		if _, ok := vls[v.Name]; ok || v.extra == "" {
			continue
		}
		var m map[string]json.RawMessage
		json.Unmarshal([]byte(v.extra), &m) // extra is an object extraFields wrote
		if raw := m["limits"]; len(raw) > 0 && string(raw) != "null" && string(raw) != "{}" && !isEmptyList(raw) {
			ignored = append(ignored, "limits of vhost '"+v.Name+"' in vhosts (vhost limits are read from parameters, component vhost-limits)")
		}
	}
	return ignored
}

// encode writes d as indented JSON. Keys come out sorted, as encoding/json sorts maps.
func (d *Definitions) encode() ([]byte, error) {
	object := func(extra map[string]json.RawMessage, n int) map[string]any {
		m := make(map[string]any, len(extra)+n)
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	fields := func(extra string) map[string]json.RawMessage {
		var m map[string]json.RawMessage
		json.Unmarshal([]byte(extra), &m) // extra is "" or an object extraFields wrote
		return m
	}
	users := make([]map[string]any, 0, len(d.Users))
	for _, u := range d.Users {
		m := object(fields(u.extra), 4)
		m["name"] = u.Name
		m["password_hash"] = u.PasswordHash
		if u.HashingAlgorithm != "" {
			m["hashing_algorithm"] = u.HashingAlgorithm
		}
		m["tags"] = append([]string{}, u.Tags...)
		users = append(users, m)
	}
	vhosts := make([]map[string]any, 0, len(d.Vhosts))
	for _, v := range d.Vhosts {
		m := object(fields(v.extra), 1)
		m["name"] = v.Name
		vhosts = append(vhosts, m)
	}
	perms := make([]map[string]any, 0, len(d.Permissions))
	for _, p := range d.Permissions {
		m := object(fields(p.extra), 5)
		m["user"], m["vhost"] = p.User, p.Vhost
		m["configure"], m["write"], m["read"] = p.Configure, p.Write, p.Read
		perms = append(perms, m)
	}
	top := object(d.sections, 3)
	top["users"], top["vhosts"], top["permissions"] = users, vhosts, perms

	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(top); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeFileAtomic replaces path with b: temporary file, fsync, rename, fsync directory.
func writeFileAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // fails harmlessly after the rename
	if err := f.Chmod(0o600); err != nil && runtime.GOOS != "windows" {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if runtime.GOOS == "windows" {
		return nil // directories cannot be opened for syncing
	}
	return syncDir(dir)
}

// Policies returns the policies of the file: its "policies" section, as RabbitMQ exports
// them ({"vhost", "name", "pattern", "apply-to", "definition", "priority"}).
func (d *Definitions) Policies() ([]Policy, error) {
	objs, err := d.sectionObjects("policies")
	if err != nil {
		return nil, err
	}
	ps := make([]Policy, 0, len(objs))
	for i, m := range objs {
		p, err := decodePolicy(m)
		if err != nil {
			return nil, fmt.Errorf("policies[%d]: %w", i, err)
		}
		ps = append(ps, p)
	}
	return ps, nil
}

// OperatorPolicies returns the operator policies of the file: the entries of its
// "parameters" section of component "operator_policy", whose value holds the pattern,
// apply-to, definition and priority.
func (d *Definitions) OperatorPolicies() ([]Policy, error) {
	objs, err := d.sectionObjects("parameters")
	if err != nil {
		return nil, err
	}
	var ps []Policy
	for i, m := range objs {
		var vhost, component, name string
		if err := takeStrings(m, map[string]*string{"vhost": &vhost, "component": &component, "name": &name}); err != nil {
			return nil, fmt.Errorf("parameters[%d]: %w", i, err)
		}
		if component != operatorPolicyComponent {
			continue
		}
		var value map[string]json.RawMessage
		if json.Unmarshal(m["value"], &value) != nil || value == nil {
			return nil, fmt.Errorf("parameters[%d]: operator policy %q: the value must be an object", i, name)
		}
		p, err := decodePolicy(value)
		if err != nil {
			return nil, fmt.Errorf("parameters[%d]: operator policy %q: %w", i, name, err)
		}
		p.Vhost, p.Name = vhost, name
		ps = append(ps, p)
	}
	return ps, nil
}

// operatorPolicyComponent is the parameters component RabbitMQ keeps operator policies in.
const operatorPolicyComponent = "operator_policy"

// decodePolicy reads a policy object; a missing apply-to is "all", as in RabbitMQ.
func decodePolicy(m map[string]json.RawMessage) (Policy, error) {
	var p Policy
	if err := takeStrings(m, map[string]*string{"vhost": &p.Vhost, "name": &p.Name, "pattern": &p.Pattern, "apply-to": &p.ApplyTo}); err != nil {
		return p, err
	}
	if p.ApplyTo == "" {
		p.ApplyTo = "all"
	}
	if raw := m["priority"]; len(raw) > 0 && string(raw) != "null" {
		if err := json.Unmarshal(raw, &p.Priority); err != nil {
			return p, fmt.Errorf("priority: want an integer, not %s", raw)
		}
	}
	var def bytes.Buffer
	if raw := m["definition"]; len(raw) > 0 && json.Compact(&def, raw) == nil {
		p.Definition = def.Bytes()
	}
	return p, nil
}

// SetPolicy adds a policy, or replaces the one of the same name in its virtual host. The
// virtual host must exist; the pattern, apply-to and definition are checked as RabbitMQ
// checks them (an empty ApplyTo is "all").
func (d *Definitions) SetPolicy(p Policy) error { return d.setPolicy(p, false) }

// SetOperatorPolicy is SetPolicy for an operator policy, which may set only message-ttl,
// expires, max-length, max-length-bytes and delivery-limit.
func (d *Definitions) SetOperatorPolicy(p Policy) error { return d.setPolicy(p, true) }

// ClearPolicy removes a policy; it is an error if there is none of that name.
func (d *Definitions) ClearPolicy(vhost, name string) error { return d.clearPolicy(vhost, name, false) }

// ClearOperatorPolicy removes an operator policy; it is an error if there is none of that name.
func (d *Definitions) ClearOperatorPolicy(vhost, name string) error {
	return d.clearPolicy(vhost, name, true)
}

func (d *Definitions) setPolicy(p Policy, operator bool) error {
	if p.ApplyTo == "" {
		p.ApplyTo = "all"
	}
	if d.vhost(p.Vhost) < 0 {
		return fmt.Errorf("amqp: virtual host %q does not exist", p.Vhost)
	}
	if _, _, err := compilePolicy(p, operator); err != nil {
		return errors.New("amqp: " + err.Error())
	}
	def := json.RawMessage(bytes.TrimSpace(p.Definition))
	body := map[string]any{"pattern": p.Pattern, "apply-to": p.ApplyTo, "definition": def, "priority": p.Priority}
	if operator {
		d.editSection("parameters", policyEntry(p.Vhost, p.Name, true),
			map[string]any{"vhost": p.Vhost, "component": operatorPolicyComponent, "name": p.Name, "value": body})
		return nil
	}
	body["vhost"], body["name"] = p.Vhost, p.Name
	d.editSection("policies", policyEntry(p.Vhost, p.Name, false), body)
	return nil
}

func (d *Definitions) clearPolicy(vhost, name string, operator bool) error {
	key, what := "policies", "policy"
	if operator {
		key, what = "parameters", "operator policy"
	}
	if !d.editSection(key, policyEntry(vhost, name, operator), nil) {
		return fmt.Errorf("amqp: %s %q in virtual host %q does not exist", what, name, vhost)
	}
	return nil
}

// policyEntry matches the entry of a policy, or of an operator policy, in its section.
func policyEntry(vhost, name string, operator bool) func(map[string]json.RawMessage) bool {
	return func(obj map[string]json.RawMessage) bool {
		var v, n, c string
		json.Unmarshal(obj["vhost"], &v)
		json.Unmarshal(obj["name"], &n)
		json.Unmarshal(obj["component"], &c)
		return v == vhost && n == name && (!operator || c == operatorPolicyComponent)
	}
}

// editSection replaces the first entry of the list section key that same matches with
// entry, or appends entry if none does; a nil entry removes the matching entries instead,
// and leaves a section with none (or one that is not a list) as it is. It reports whether
// an entry matched.
func (d *Definitions) editSection(key string, same func(map[string]json.RawMessage) bool, entry any) bool {
	var list []json.RawMessage
	json.Unmarshal(d.sections[key], &list) // a section that is not a list is replaced
	found := false
	out := make([]any, 0, len(list)+1)
	for _, raw := range list {
		var obj map[string]json.RawMessage
		if json.Unmarshal(raw, &obj) == nil && same(obj) {
			if !found && entry != nil {
				out = append(out, entry)
			}
			found = true
			continue
		}
		out = append(out, raw)
	}
	if !found && entry != nil {
		out = append(out, entry)
	}
	if !found && entry == nil {
		return false // nothing to remove: the section stays as it is
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.Encode(out) // cannot fail: every element is valid JSON
	if d.sections == nil {
		d.sections = make(map[string]json.RawMessage)
	}
	d.sections[key] = bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	return found
}

// policySets reads and compiles the policies and operator policies of each virtual host,
// and names, for the load warning, the definition keys the broker does not act on.
func (d *Definitions) policySets() (map[string]*policySet, []string, error) {
	user, err := d.Policies()
	if err != nil {
		return nil, nil, err
	}
	op, err := d.OperatorPolicies()
	if err != nil {
		return nil, nil, err
	}
	sets := make(map[string]*policySet)
	var ignored []string
	for i, p := range slices.Concat(user, op) {
		operator := i >= len(user)
		what := "policy"
		if operator {
			what = "operator policy"
		}
		if d.vhost(p.Vhost) < 0 {
			return nil, nil, fmt.Errorf("%s %q of virtual host %q: no such virtual host", what, p.Name, p.Vhost)
		}
		c, keys, err := compilePolicy(p, operator)
		if err != nil {
			return nil, nil, err
		}
		for _, k := range keys {
			ignored = append(ignored, "key "+k+" of "+what+" '"+p.Name+"' in vhost '"+p.Vhost+"'")
		}
		if c == nil {
			continue
		}
		ps := sets[p.Vhost]
		if ps == nil {
			ps = &policySet{}
			sets[p.Vhost] = ps
		}
		list := &ps.user
		if operator {
			list = &ps.operator
		}
		if slices.ContainsFunc(*list, func(o *policy) bool { return o.name == p.Name }) {
			return nil, nil, fmt.Errorf("%s %q of virtual host %q is defined twice", what, p.Name, p.Vhost)
		}
		*list = append(*list, c)
	}
	for _, ps := range sets {
		sortPolicies(ps.user)
		sortPolicies(ps.operator)
	}
	return sets, ignored, nil
}

// merge adds what o defines to d, as RabbitMQ's import does: users, permissions, topic
// permissions, policies and parameters of the same name are replaced, the rest are added;
// nothing of d is removed. The queues, exchanges and bindings of o are not kept in d.
func (d *Definitions) merge(o *Definitions) {
	for _, u := range o.Users {
		if i := d.user(u.Name); i >= 0 {
			d.Users[i] = u
		} else {
			d.Users = append(d.Users, u)
		}
	}
	for _, v := range o.Vhosts {
		if d.vhost(v.Name) < 0 {
			d.Vhosts = append(d.Vhosts, v)
		}
	}
	for _, p := range o.Permissions {
		if i := d.permission(p.User, p.Vhost); i >= 0 {
			d.Permissions[i] = p
		} else {
			d.Permissions = append(d.Permissions, p)
		}
	}
	for key, fields := range map[string][]string{"topic_permissions": {"user", "vhost", "exchange"},
		"policies": {"vhost", "name"}, "parameters": {"vhost", "component", "name"}, "global_parameters": {"name"}} {
		objs, _ := o.sectionObjects(key)
		for _, obj := range objs {
			d.editSection(key, sameFields(obj, fields), obj)
		}
	}
}

// sameFields matches the objects whose fields are those of obj.
func sameFields(obj map[string]json.RawMessage, fields []string) func(map[string]json.RawMessage) bool {
	return func(other map[string]json.RawMessage) bool {
		for _, f := range fields {
			if !bytes.Equal(bytes.TrimSpace(obj[f]), bytes.TrimSpace(other[f])) {
				return false
			}
		}
		return true
	}
}
