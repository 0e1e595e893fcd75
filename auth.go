package amqp

import (
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// authenticate checks a start-ok response for a mechanism against the user database and
// returns the user name. A refusal is a *loginError, 403 ACCESS_REFUSED (the name is
// returned for the log); an unknown or disabled mechanism is 503 COMMAND_INVALID, as in
// RabbitMQ. EXTERNAL is handled by the connection, which holds the client certificate.
func (s *Server) authenticate(mechanism, response string, remote net.Addr) (string, error) {
	var user, pass string
	ok := true
	switch mechanism {
	case "PLAIN":
		user, pass, ok = parsePlain(response)
	case "AMQPLAIN":
		user, pass, ok = parseAMQPlain(response)
	case "ANONYMOUS":
		if u := s.cfg.AnonymousUser; u != "" {
			return u, s.auth.Load().loginTrusted(mechanism, u, remote)
		}
		fallthrough
	default:
		e := commandInvalid("unknown authentication mechanism '" + mechanism + "'")
		e.ClassID, e.MethodID = classConnection, 11
		return "", e
	}
	if !ok {
		// A malformed response logs in no one, whatever it held; the hash is still
		// computed, so it is answered no sooner than a wrong password.
		s.auth.Load().loginMechanism(mechanism, "", "", remote)
		return "", refuseLogin(mechanism, "malformed response")
	}
	return user, s.auth.Load().loginMechanism(mechanism, user, pass, remote)
}

// mechanisms lists the SASL mechanisms offered to a client: EXTERNAL only over TLS with a
// verified client certificate, ANONYMOUS only when Config.AnonymousUser is set.
func (s *Server) mechanisms(peerCN string) string {
	m := "PLAIN AMQPLAIN"
	if peerCN != "" {
		m = "EXTERNAL " + m
	}
	if s.cfg.AnonymousUser != "" {
		m += " ANONYMOUS"
	}
	return m
}

// loadAuth reads Config.Definitions into the user database and creates its virtual hosts,
// logging one warning that names what the file holds and the broker does not enforce. A
// missing file means RabbitMQ's defaults: vhost "/" and guest/guest. Virtual hosts no
// longer defined are deleted with everything in them (see deleteVhosts), and the
// connections of deleted users and virtual hosts are closed.
func (s *Server) loadAuth() error {
	s.defsMu.Lock()
	defer s.defsMu.Unlock()
	defs, err := s.readDefinitions()
	if err != nil {
		return err
	}
	return s.applyDefinitions(defs)
}

// readDefinitions reads Config.Definitions; without a file, the definitions the API last
// set, or RabbitMQ's defaults. s.defsMu must be held.
func (s *Server) readDefinitions() (*Definitions, error) {
	path := s.cfg.Definitions
	if path == "" {
		if s.defs != nil {
			return s.defs.clone(), nil
		}
		return DefaultDefinitions(), nil
	}
	d, err := LoadDefinitions(path)
	if errors.Is(err, os.ErrNotExist) {
		s.log.Warn("definitions file not found; using the default guest user and vhost /", "file", path)
		return DefaultDefinitions(), nil
	}
	return d, err
}

// editDefinitions changes the definitions with edit, saves them (atomically, when there is
// a file) and applies them, as a reload does. Nothing changes if edit, the save or the
// checks fail.
func (s *Server) editDefinitions(edit func(d *Definitions) error) error {
	s.defsMu.Lock()
	defer s.defsMu.Unlock()
	d, err := s.readDefinitions()
	if err != nil {
		return err
	}
	if err := edit(d); err != nil {
		return err
	}
	if err := d.check(); err != nil {
		return errors.New("amqp: " + err.Error())
	}
	if _, err := newAuthDB(d, s.cfg.LoopbackUsers); err != nil {
		return err
	}
	if _, _, err := d.policySets(); err != nil {
		return errors.New("amqp: " + err.Error())
	}
	if path := s.cfg.Definitions; path != "" {
		if err := d.Save(path); err != nil {
			return err
		}
	}
	return s.applyDefinitions(d)
}

// definitions returns a copy of the definitions in force.
func (s *Server) definitions() *Definitions {
	s.defsMu.Lock()
	defer s.defsMu.Unlock()
	if s.defs == nil {
		return DefaultDefinitions()
	}
	return s.defs.clone()
}

// applyDefinitions makes defs the users, vhosts, permissions and policies in force, and
// has a cluster's followers copy the definitions file. s.defsMu must be held.
func (s *Server) applyDefinitions(defs *Definitions) error {
	db, err := newAuthDB(defs, s.cfg.LoopbackUsers)
	if err != nil {
		return err
	}
	policies, ignored, err := defs.policySets()
	if err != nil {
		return err
	}
	db.ignored = append(db.ignored, ignored...)
	s.defs = defs.clone()
	if len(db.ignored) > 0 {
		// One warning per load: a migration from RabbitMQ should not lose a rule silently.
		s.log.Warn("definitions: not enforced, ignored", "file", s.cfg.Definitions, "ignored", strings.Join(db.ignored, "; "))
	}
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.mu.Lock()
	for _, v := range defs.Vhosts {
		if s.vhosts[v.Name] == nil {
			s.vhosts[v.Name] = s.newVhost(v.Name)
		}
	}
	var gone []*vhost
	for name, vh := range s.vhosts {
		if !db.vhosts[name] {
			gone = append(gone, vh)
		}
	}
	s.mu.Unlock()
	s.auth.Store(db)
	if st := s.store; st != nil && s.cfg.Definitions != "" {
		st.w.changed("definitions") // a cluster's followers copy the file again
	}
	for _, vh := range gone {
		vh.markDeleted()
	}
	for _, vh := range s.vhostList() {
		if db.vhosts[vh.name] {
			vh.setPolicies(policies[vh.name])
		}
	}
	s.closeRemoved()
	return s.deleteVhosts(gone)
}

// Failed logins are limited per source address, on top of Config.AuthFailureDelay (which
// only paces one connection), so that many connections in parallel cannot try passwords
// faster either. Each source has a token bucket of Config.AuthFailureLimit tokens, refilled
// at one a second:
//
//   - A login takes a token before its credentials are checked and gives it back if it
//     succeeds, so only failures use the bucket up and logins stay free while it has tokens.
//   - Once the bucket is empty, a login reserves the next token and waits for it: a right
//     password is answered no sooner than a wrong one while the source is over its limit, so
//     it cannot be told apart by timing, and reserved turns keep parallel connections from
//     sharing one token. If its turn comes after the handshake deadline, it reserves nothing
//     and its socket is closed at the deadline, unanswered.
//   - Sources are IPv4 addresses and IPv6 /64 networks (what one host is usually given).
//   - A bucket that has filled up again is forgotten; at most maxLoginSources are kept.

// maxLoginSources caps the sources a loginLimiter remembers (about 100 bytes each).
const maxLoginSources = 16384

// defaultAuthFailureLimit is the burst of failed logins a source gets: room for a few
// mistyped passwords, or a misconfigured client's retries, before any wait.
const defaultAuthFailureLimit = 10

// loginLimiter is the per-source limit of failed logins. It is safe for concurrent use.
type loginLimiter struct {
	burst  float64
	refill time.Duration // time to refill one token; a second, shorter in tests

	mu      sync.Mutex
	sources map[netip.Addr]*loginBucket // guarded by mu
	swept   time.Time                   // guarded by mu: when full buckets were last dropped
}

// loginBucket is one source's bucket.
type loginBucket struct {
	tokens    float64   // below zero when turns are reserved ahead
	at        time.Time // when tokens was last brought up to date
	throttled bool      // a login of this source has had to wait since the bucket was last full
}

func newLoginLimiter(burst int) *loginLimiter {
	return &loginLimiter{burst: float64(burst), refill: time.Second, sources: make(map[netip.Addr]*loginBucket)}
}

// loginSource returns the source a client's failed logins are counted against: its IPv4
// address, or its IPv6 /64. Addresses that are not IP (Unix sockets) share the zero Addr.
func loginSource(remote net.Addr) netip.Addr {
	var ip netip.Addr
	if a, ok := remote.(*net.TCPAddr); ok {
		ip, _ = netip.AddrFromSlice(a.IP)
	} else if ap, err := netip.ParseAddrPort(remote.String()); err == nil {
		ip = ap.Addr()
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is6() {
		ip = netip.PrefixFrom(ip, 64).Masked().Addr()
	}
	return ip
}

// take takes a token of src for a login at now and returns when the login may be checked:
// now, or the time of the reserved turn. If that is after deadline, no token is taken and
// ok is false. first reports that src has had to wait for the first time since its bucket
// was last full.
func (l *loginLimiter) take(src netip.Addr, now, deadline time.Time) (at time.Time, first, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.sources[src]
	if b == nil {
		if len(l.sources) >= maxLoginSources {
			l.evictLocked(now)
		}
		b = &loginBucket{tokens: l.burst, at: now}
		l.sources[src] = b
	}
	l.refillLocked(b, now)
	if b.tokens -= 1; b.tokens >= 0 {
		return now, false, true
	}
	first, b.throttled = !b.throttled, true
	at = now.Add(time.Duration(-b.tokens * float64(l.refill)))
	if at.After(deadline) {
		b.tokens += 1
		return at, first, false
	}
	return at, first, true
}

// give returns a token taken for a login that succeeded or was given up.
func (l *loginLimiter) give(src netip.Addr, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.sources[src]
	if b == nil {
		return
	}
	l.refillLocked(b, now)
	b.tokens = min(b.tokens+1, l.burst)
	if b.tokens >= l.burst {
		delete(l.sources, src)
	}
}

// refillLocked brings b's tokens up to now. l.mu must be held.
func (l *loginLimiter) refillLocked(b *loginBucket, now time.Time) {
	if d := now.Sub(b.at); d > 0 {
		b.tokens = min(b.tokens+float64(d)/float64(l.refill), l.burst)
		b.at = now
	}
	if b.tokens >= l.burst {
		b.throttled = false
	}
}

// evictLocked makes room for a source: it drops the buckets that have filled up again, at
// most once per refill period, and else one bucket at random (map order), which gives that
// source a fresh burst: a client with this many addresses gets as much from them anyway.
// l.mu must be held.
func (l *loginLimiter) evictLocked(now time.Time) {
	if now.Sub(l.swept) >= l.refill {
		l.swept = now
		for src, b := range l.sources {
			if l.refillLocked(b, now); b.tokens >= l.burst {
				delete(l.sources, src)
			}
		}
	}
	for src := range l.sources {
		if len(l.sources) < maxLoginSources {
			break
		}
		delete(l.sources, src)
	}
}

// parsePlain reads a SASL PLAIN response: [authzid] NUL authcid NUL passwd (RFC 4616).
func parsePlain(resp string) (user, pass string, ok bool) {
	parts := strings.Split(resp, "\x00")
	if len(parts) != 3 || parts[1] == "" {
		return "", "", false
	}
	return parts[1], parts[2], true
}

// parseAMQPlain reads an AMQPLAIN response: the content of a field table (without its
// length prefix) holding LOGIN and PASSWORD as long strings.
func parseAMQPlain(resp string) (user, pass string, ok bool) {
	d := decoder{b: []byte(resp)}
	for len(d.b) > 0 && d.err == nil {
		key := d.shortstr()
		v := d.value(0)
		s, isString := v.(string)
		switch {
		case key == "LOGIN" && isString:
			user = s
		case key == "PASSWORD" && isString:
			pass = s
		}
	}
	return user, pass, d.err == nil && user != ""
}

// isLoopback reports whether addr is a loopback address (127.0.0.0/8 or ::1).
func isLoopback(addr net.Addr) bool {
	switch a := addr.(type) {
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	case *net.UnixAddr:
		return true
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Names of RabbitMQ's password hashing modules, as hashing_algorithm holds them.
const (
	hashingSHA256 = "rabbit_password_hashing_sha256"
	hashingSHA512 = "rabbit_password_hashing_sha512"
	hashingMD5    = "rabbit_password_hashing_md5"
	saltLen       = 4 // bytes of salt before the digest
)

// The user RabbitMQ creates on first start, allowed from loopback addresses only.
const (
	guestUser     = "guest"
	guestPassword = "guest"
)

// informationalSections are top-level keys RabbitMQ writes and ignores on import.
var informationalSections = []string{"rabbit_version", "rabbitmq_version", "product_name", "product_version"}

// A password hash, as RabbitMQ's internal backend stores it (H is the algorithm's hash:
// SHA-256 by default, SHA-512, or MD5 for users from before RabbitMQ 3.6, whose
// definitions have no hashing_algorithm):
//
//	password_hash = base64( salt ‖ H(salt ‖ UTF-8 password) )
//	                        +--------+-------------------------+
//	                        | salt 4 | digest (32, 64 or 16)   |
//	                        +--------+-------------------------+

// hashPassword returns a new SHA-256 password hash with a random salt.
func hashPassword(password string) string {
	var salt [saltLen]byte
	rand.Read(salt[:]) // never fails; see crypto/rand.Read
	return base64.StdEncoding.EncodeToString(saltedHash(sha256.New, salt[:], password))
}

// saltedHash returns salt ‖ H(salt ‖ password).
func saltedHash(newHash func() hash.Hash, salt []byte, password string) []byte {
	h := newHash()
	h.Write(salt)
	io.WriteString(h, password)
	return h.Sum(append(make([]byte, 0, len(salt)+h.Size()), salt...))
}

// hashFunc returns the hash of a hashing_algorithm, or nil if it is unknown.
func hashFunc(algorithm string) func() hash.Hash {
	switch algorithm {
	case hashingSHA256:
		return sha256.New
	case hashingSHA512:
		return sha512.New
	case hashingMD5, "":
		return md5.New
	}
	return nil
}

// decodePasswordHash returns a user's hash and salted digest, or nil, nil if no password
// can match: an empty hash, an unknown algorithm, or a hash that is not base64 of a salt
// and a digest of the algorithm's size.
func decodePasswordHash(algorithm, passwordHash string) (func() hash.Hash, []byte) {
	newHash := hashFunc(algorithm)
	if newHash == nil || passwordHash == "" {
		return nil, nil
	}
	b, err := base64.StdEncoding.DecodeString(passwordHash)
	if err != nil || len(b) != saltLen+newHash().Size() {
		return nil, nil
	}
	return newHash, b
}

// permKind is the kind of access an operation needs on a resource.
type permKind int

const (
	permConfigure permKind = iota // create, delete or change a resource
	permWrite                     // inject messages: publish, bind from an exchange
	permRead                      // retrieve messages: get, consume, purge, bind to a queue
	permNone                      // no permission needed
)

func (p permKind) String() string {
	switch p {
	case permConfigure:
		return "configure"
	case permWrite:
		return "write"
	case permRead:
		return "read"
	}
	return "unknown"
}

// resourceKind is the kind of resource a permission applies to.
type resourceKind int

const (
	resQueue resourceKind = iota
	resExchange
)

func (r resourceKind) String() string {
	if r == resExchange {
		return "exchange"
	}
	return "queue"
}

// defaultExchangeName is the name permissions match the default exchange ("") under.
const defaultExchangeName = "amq.default"

// authDB is the runtime form of Definitions: hashes decoded and regular expressions
// compiled. It is immutable once built; the server swaps whole databases on reload.
type authDB struct {
	users       map[string]*authUser
	vhosts      map[string]bool
	vhostLimits map[string]limits // only vhosts the file sets limits for
	loopback    map[string]bool   // users who may log in only from loopback addresses
	ignored     []string          // what the definitions hold that is not enforced, for the load warning
}

// authUser is a user of an authDB.
type authUser struct {
	newHash func() hash.Hash // nil: cannot log in with a password
	hash    []byte           // salt ‖ digest
	tags    []string
	perms   map[string]*[3]*regexp.Regexp    // by vhost, then permKind; a nil expression grants nothing
	topics  map[string]map[string]*topicPerm // by vhost, then exchange; nil when the user has none
	limits  limits
}

// topicPerm is a user's topic permission on one exchange of a vhost, with {username} and
// {vhost} expanded. It applies only while the exchange is a topic exchange.
type topicPerm struct {
	write, read *regexp.Regexp // matched, unanchored, against routing keys and binding keys
}

// newAuthDB builds a database from d. Users in loopbackUsers (["guest"] when nil, as
// RabbitMQ's loopback_users) may log in only from loopback addresses. A regular
// expression that does not compile is an error, as are the mistakes Definitions.check
// finds. Users whose hash cannot match (unknown algorithm, malformed) are kept but
// refused at login.
func newAuthDB(d *Definitions, loopbackUsers []string) (*authDB, error) {
	if err := d.check(); err != nil {
		return nil, fmt.Errorf("amqp: definitions: %w", err)
	}
	if loopbackUsers == nil {
		loopbackUsers = []string{guestUser}
	}
	vls, ignored, err := d.vhostLimits()
	if err != nil {
		return nil, fmt.Errorf("amqp: definitions: %w", err)
	}
	db := &authDB{
		users:       make(map[string]*authUser, len(d.Users)),
		vhosts:      make(map[string]bool, len(d.Vhosts)),
		vhostLimits: vls,
		loopback:    make(map[string]bool, len(loopbackUsers)),
		ignored:     append(d.ignoredSections(vls), ignored...),
	}
	for _, name := range loopbackUsers {
		db.loopback[name] = true
	}
	for _, v := range d.Vhosts {
		db.vhosts[v.Name] = true
	}
	for _, u := range d.Users {
		au := &authUser{tags: slices.Clone(u.Tags), perms: make(map[string]*[3]*regexp.Regexp)}
		au.newHash, au.hash = decodePasswordHash(u.HashingAlgorithm, u.PasswordHash)
		l, ignored, err := userLimits(u)
		if err != nil {
			return nil, fmt.Errorf("amqp: definitions: %w", err)
		}
		au.limits = l
		db.ignored = append(db.ignored, ignored...)
		db.users[u.Name] = au
	}
	tps, err := d.topicPermissions()
	if err != nil {
		return nil, fmt.Errorf("amqp: definitions: %w", err)
	}
	for _, p := range tps {
		tp, err := compileTopicPermission(p)
		if err != nil {
			return nil, fmt.Errorf("amqp: definitions: topic permissions on exchange %q in virtual host %q for user %q: %w",
				p.exchange, p.vhost, p.user, err)
		}
		au := db.users[p.user]
		if au.topics == nil {
			au.topics = make(map[string]map[string]*topicPerm)
		}
		if au.topics[p.vhost] == nil {
			au.topics[p.vhost] = make(map[string]*topicPerm)
		}
		au.topics[p.vhost][p.exchange] = tp
	}
	for _, p := range d.Permissions {
		var res [3]*regexp.Regexp
		for i, expr := range [...]string{p.Configure, p.Write, p.Read} {
			re, err := compilePermission(expr)
			if err != nil {
				return nil, fmt.Errorf("amqp: definitions: permissions in virtual host %q for user %q: invalid %s regular expression %q: %w",
					p.Vhost, p.User, permKind(i), expr, err)
			}
			res[i] = re
		}
		db.users[p.User].perms[p.Vhost] = &res
	}
	return db, nil
}

// compilePermission compiles a permission expression; "" grants nothing and is nil.
func compilePermission(expr string) (*regexp.Regexp, error) {
	if expr == "" {
		return nil, nil
	}
	return regexp.Compile(expr)
}

// compileTopicPermission compiles a topic permission as RabbitMQ applies it: an empty
// expression is "^$" (only the empty key), and {username} and {vhost} are replaced, as
// they are, by the entry's user and vhost before compiling. RabbitMQ also knows
// {client_id}, but fills it only for MQTT and other plugin connections, never for AMQP
// 0-9-1; here, as there, it stays literal.
func compileTopicPermission(p topicPermission) (*topicPerm, error) {
	expand := strings.NewReplacer("{username}", p.user, "{vhost}", p.vhost)
	var res [2]*regexp.Regexp
	for i, expr := range [...]string{p.write, p.read} {
		if expr == "" {
			expr = "^$"
		}
		re, err := regexp.Compile(expand.Replace(expr))
		if err != nil {
			return nil, fmt.Errorf("invalid %s regular expression %q: %w", [...]string{"write", "read"}[i], expr, err)
		}
		res[i] = re
	}
	return &topicPerm{write: res[0], read: res[1]}, nil
}

// dummyHash is what a login for a user without a usable hash is compared against, so
// refusals take as long as a wrong password and do not reveal which users exist.
var dummyHash = saltedHash(sha256.New, make([]byte, saltLen), "")

// login is loginMechanism for the PLAIN mechanism.
func (db *authDB) login(user, password string, remote net.Addr) error {
	return db.loginMechanism("PLAIN", user, password, remote)
}

// loginError is a refused login: 403 ACCESS_REFUSED at connection.start-ok with RabbitMQ's
// one text, naming the SASL mechanism, whatever the reason. A client is never told why, so a
// refusal does not reveal that a password was right (for a loopback-only user from a remote
// address) or that a user exists; the reason goes to the server log only.
type loginError struct {
	err    *Error // what the client is told
	reason string // for the log only: "wrong password", "unknown user", ...
}

func (e *loginError) Error() string { return e.err.Error() }
func (e *loginError) Unwrap() error { return e.err }

// refuseLogin returns the refusal of a login with mechanism, for reason.
func refuseLogin(mechanism, reason string) error {
	e := accessRefused("Login was refused using authentication mechanism " + mechanism + ". For details see the broker logfile.")
	e.ClassID, e.MethodID = classConnection, 11
	return &loginError{err: e, reason: reason}
}

// loginReason returns the reason for the log of a refused login, or "" if err is not one.
func loginReason(err error) string {
	var le *loginError
	if errors.As(err, &le) {
		return le.reason
	}
	return ""
}

// loginMechanism checks a user's password, then that a loopback-only user connects from
// a loopback address. A refusal is a *loginError.
func (db *authDB) loginMechanism(mechanism, user, password string, remote net.Addr) error {
	u := db.users[user]
	newHash, stored := sha256.New, dummyHash
	if u != nil && u.newHash != nil {
		newHash, stored = u.newHash, u.hash
	}
	match := subtle.ConstantTimeCompare(saltedHash(newHash, stored[:saltLen], password), stored) == 1
	switch {
	case u == nil:
		return refuseLogin(mechanism, "unknown user")
	case u.newHash == nil:
		return refuseLogin(mechanism, "user has no usable password hash")
	case password == "":
		// RabbitMQ's internal backend refuses blank passwords whatever the hash.
		return refuseLogin(mechanism, "empty password")
	case !match:
		return refuseLogin(mechanism, "wrong password")
	case db.loopback[user] && !isLoopback(remote):
		return refuseLogin(mechanism, "loopback-only user from a remote address")
	}
	return nil
}

// vhostAccess checks that a user may open a virtual host: it exists and the user has
// permissions on it, whatever they are. A refusal is 530 NOT_ALLOWED at connection.open.
func (db *authDB) vhostAccess(user, vhost string) error {
	var e *Error
	switch u := db.users[user]; {
	case !db.vhosts[vhost]:
		e = notAllowed("vhost " + vhost + " not found")
	case u == nil || u.perms[vhost] == nil:
		e = notAllowed("access to vhost '" + vhost + "' refused for user '" + user + "'")
	default:
		return nil
	}
	e.ClassID, e.MethodID = classConnection, 40
	return e
}

// check checks that a user may perform an operation needing perm on a queue or exchange
// in a virtual host: the user's expression for perm matches name anywhere (RabbitMQ runs
// re:run unanchored; patterns anchor themselves with ^ and $). The default exchange ""
// is checked as "amq.default". A refusal is 403 ACCESS_REFUSED; the caller sets the
// method.
func (db *authDB) check(user, vhost string, perm permKind, kind resourceKind, name string) error {
	if kind == resExchange && name == "" {
		name = defaultExchangeName
	}
	if u := db.users[user]; u != nil && perm >= permConfigure && perm <= permRead {
		if res := u.perms[vhost]; res != nil && res[perm] != nil && res[perm].MatchString(name) {
			return nil
		}
	}
	return accessRefused("access to " + kind.String() + " '" + name + "' in vhost '" + vhost + "' refused for user '" + user + "'")
}

// hasTag reports whether a user has a tag, such as "impersonator".
func (db *authDB) hasTag(user, tag string) bool {
	u := db.users[user]
	return u != nil && slices.Contains(u.tags, tag)
}

// topicPerm returns a user's topic permission on an exchange of a vhost; nil when there is
// none, and then, as in RabbitMQ, topic authorisation passes. It does not allocate.
func (db *authDB) topicPerm(user, vhost, exchange string) *topicPerm {
	if u := db.users[user]; u != nil && u.topics != nil {
		return u.topics[vhost][exchange]
	}
	return nil
}

// checkTopic checks a user's topic permission perm (permWrite or permRead) for key on an
// exchange of a vhost; the caller checks that the exchange is a topic exchange. As in
// RabbitMQ, basic.publish needs write on its routing key, and queue.bind, queue.unbind,
// exchange.bind and exchange.unbind need read on their binding key at the source
// exchange. A refusal is 403 ACCESS_REFUSED; the caller sets the method.
func (db *authDB) checkTopic(user, vhost string, perm permKind, exchange, key string) error {
	tp := db.topicPerm(user, vhost, exchange)
	if tp == nil {
		return nil
	}
	re := tp.read
	if perm == permWrite {
		re = tp.write
	}
	if re.MatchString(key) {
		return nil
	}
	return topicRefused(perm, key, exchange, vhost, user)
}

// topicRefused is RabbitMQ's 403 for a refused topic permission check.
func topicRefused(perm permKind, key, exchange, vhost, user string) *Error {
	return accessRefused(perm.String() + " access to topic '" + key + "' in exchange '" + exchange + "' in vhost '" + vhost + "' refused for user '" + user + "'")
}

// vhostLimit returns the limits the definitions set for a vhost; noLimits if none.
func (db *authDB) vhostLimit(vhost string) limits {
	if l, ok := db.vhostLimits[vhost]; ok {
		return l
	}
	return noLimits
}

// userLimit returns the limits the definitions set for a user; noLimits if none.
func (db *authDB) userLimit(user string) limits {
	if u := db.users[user]; u != nil {
		return u.limits
	}
	return noLimits
}

// userTags returns a user's tags; nil for an unknown user.
func (db *authDB) userTags(user string) []string {
	if u := db.users[user]; u != nil {
		return slices.Clone(u.tags)
	}
	return nil
}

// loginTrusted checks a login that needs no password: a user named by a verified TLS client
// certificate (EXTERNAL) or the configured ANONYMOUS user. The user must exist, and a
// loopback-only user must come from a loopback address. A refusal is a *loginError.
func (db *authDB) loginTrusted(mechanism, user string, remote net.Addr) error {
	switch {
	case db.users[user] == nil:
		return refuseLogin(mechanism, "unknown user")
	case db.loopback[user] && !isLoopback(remote):
		return refuseLogin(mechanism, "loopback-only user from a remote address")
	}
	return nil
}

// removed returns the 320 CONNECTION_FORCED a connection of user on vhost gets when a
// reload has deleted either, as RabbitMQ closes them; nil when both still exist.
func (db *authDB) removed(user, vhost string) *Error {
	switch {
	case db.users[user] == nil:
		return newError(replyConnectionForced, "user '"+user+"' is deleted")
	case !db.vhosts[vhost]:
		return vhostDeleted(vhost)
	}
	return nil
}
