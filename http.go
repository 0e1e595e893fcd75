package amqp

import (
	"bytes"
	"cmp"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The management HTTP API, on RabbitMQ's paths and in its JSON shapes (3.13 is the
// contract), so that rabbitmqadmin, the UI, KEDA, telegraf and scripts written for
// RabbitMQ work unchanged. Users log in with HTTP Basic against the same users and hashes
// as AMQP clients, and their tags decide what they see and may do, as in RabbitMQ:
//
//   - management: the vhosts they have permissions on, their objects, and their own
//     connections and channels;
//   - policymaker: that, and policies;
//   - monitoring: that, and every connection and channel, and the node's data;
//   - administrator: everything, users, vhosts, permissions and definitions included.
//
// Changes to queues, exchanges and bindings, publish and get, go through a session (see
// loopback.go) as the user who asked, so they are checked and answered exactly as over
// AMQP; a refusal comes back as RabbitMQ's API gives it ({"error": ..., "reason": ...}).
// Changes to users, vhosts, permissions and policies are saved to the definitions file
// (atomically) and applied at once.

// maxAPIBody bounds a request body: definitions files up to 20 MB, as the issue asks.
const maxAPIBody = 20 << 20

// node is the node name the API reports, the same as the metrics' rabbitmq_node.
func (s *Server) node() string {
	n, _, _ := s.identity()
	return n
}

// apiUser is the user of a request, logged in.
type apiUser struct {
	name, password string
	tags           []string
	remote         net.Addr
}

func (u *apiUser) has(tag string) bool { return slices.Contains(u.tags, tag) }
func (u *apiUser) admin() bool         { return u.has("administrator") }
func (u *apiUser) monitor() bool       { return u.admin() || u.has("monitoring") }
func (u *apiUser) policymaker() bool   { return u.admin() || u.has("policymaker") }

// apiError is an answer other than success: RabbitMQ's {"error": ..., "reason": ...}.
type apiError struct {
	status        int
	error, reason string
}

func (e *apiError) Error() string { return e.error + ": " + e.reason }

// leaderOnly answers 503 for fn on a cluster node that does not lead: a standby's broker
// is empty and its store is not its own until it leads. Health checks answer everywhere.
func (s *Server) leaderOnly(fn apiFunc) apiFunc {
	return func(r *http.Request, u *apiUser) (any, error) {
		if n := s.standby(); n != nil {
			return nil, &apiError{http.StatusServiceUnavailable, "not_leader", n.refusal().Text}
		}
		return fn(r, u)
	}
}

func notFoundAPI() *apiError { return &apiError{http.StatusNotFound, "Object Not Found", "Not Found"} }
func badRequest(reason string) *apiError {
	return &apiError{http.StatusBadRequest, "bad_request", reason}
}
func notAuthorised(reason string) *apiError {
	return &apiError{http.StatusUnauthorized, "not_authorized", reason}
}

// apiStatus is a handler's answer without a body: 201 Created or 204 No Content.
type apiStatus int

// apiFunc handles a request of a logged-in user and returns what to answer: a value to
// encode as JSON (200), an apiStatus, or an error.
type apiFunc func(r *http.Request, u *apiUser) (any, error)

// ManagementHandler returns the management HTTP API, as RabbitMQ's management plugin
// serves it on port 15672, and the web UI at / (ui.go). Config.HTTPAddr serves it from
// ListenAndServe; an embedding program may serve it on a listener of its own.
func (s *Server) ManagementHandler() http.Handler {
	mux := &apiRouter{}
	handle := func(pattern string, need func(*apiUser) bool, fn apiFunc) {
		if !strings.Contains(pattern, "/api/health/") {
			fn = s.leaderOnly(fn)
		}
		mux.handle(pattern, s.api(need, fn))
	}
	anyone := func(*apiUser) bool { return true }
	admin := (*apiUser).admin
	monitor := (*apiUser).monitor

	handle("GET /api/overview", anyone, s.apiOverview)
	handle("GET /api/whoami", anyone, func(r *http.Request, u *apiUser) (any, error) {
		return map[string]any{"name": u.name, "tags": u.tags}, nil
	})
	handle("GET /api/nodes", monitor, func(r *http.Request, u *apiUser) (any, error) { return []any{s.nodeInfo()}, nil })
	handle("GET /api/nodes/{node}", monitor, func(r *http.Request, u *apiUser) (any, error) {
		if r.PathValue("node") != s.node() {
			return nil, notFoundAPI()
		}
		return s.nodeInfo(), nil
	})
	handle("PUT /api/nodes/{node}/vm_memory_high_watermark", admin, s.apiSetLimit)
	handle("PUT /api/nodes/{node}/disk_free_limit", admin, s.apiSetLimit)
	handle("GET /api/extensions", anyone, func(*http.Request, *apiUser) (any, error) { return []any{}, nil })

	handle("GET /api/vhosts", anyone, s.apiVhosts)
	handle("GET /api/vhosts/{vhost}", anyone, s.apiVhost)
	handle("PUT /api/vhosts/{vhost}", admin, s.apiPutVhost)
	handle("DELETE /api/vhosts/{vhost}", admin, s.apiDeleteVhost)
	handle("GET /api/vhosts/{vhost}/permissions", admin, s.apiPermissions)
	handle("GET /api/users", admin, s.apiUsers)
	handle("GET /api/users/{user}", admin, s.apiUser)
	handle("PUT /api/users/{user}", admin, s.apiPutUser)
	handle("DELETE /api/users/{user}", admin, s.apiDeleteUser)
	handle("GET /api/users/{user}/permissions", admin, s.apiPermissions)
	handle("GET /api/permissions", admin, s.apiPermissions)
	handle("GET /api/permissions/{vhost}/{user}", admin, s.apiPermission)
	handle("PUT /api/permissions/{vhost}/{user}", admin, s.apiPutPermission)
	handle("DELETE /api/permissions/{vhost}/{user}", admin, s.apiDeletePermission)
	for _, kind := range []string{"policies", "operator-policies"} {
		operator := kind == "operator-policies"
		need := (*apiUser).policymaker
		if operator {
			need = admin
		}
		list := func(r *http.Request, u *apiUser) (any, error) { return s.apiPolicies(r, u, operator) }
		handle("GET /api/"+kind, need, list)
		handle("GET /api/"+kind+"/{vhost}", need, list)
		handle("GET /api/"+kind+"/{vhost}/{name}", need, func(r *http.Request, u *apiUser) (any, error) { return s.apiPolicy(r, u, operator) })
		handle("PUT /api/"+kind+"/{vhost}/{name}", need, func(r *http.Request, u *apiUser) (any, error) { return s.apiPutPolicy(r, u, operator) })
		handle("DELETE /api/"+kind+"/{vhost}/{name}", need, func(r *http.Request, u *apiUser) (any, error) { return s.apiDeletePolicy(r, u, operator) })
	}

	handle("GET /api/connections", anyone, s.apiConnections)
	handle("GET /api/vhosts/{vhost}/connections", anyone, s.apiConnections)
	handle("GET /api/connections/{name}", anyone, s.apiConnection)
	handle("DELETE /api/connections/{name}", anyone, s.apiCloseConnection)
	handle("GET /api/connections/{name}/channels", anyone, s.apiChannels)
	handle("GET /api/channels", anyone, s.apiChannels)
	handle("GET /api/vhosts/{vhost}/channels", anyone, s.apiChannels)
	handle("GET /api/consumers", anyone, s.apiConsumers)
	handle("GET /api/consumers/{vhost}", anyone, s.apiConsumers)

	handle("GET /api/exchanges", anyone, s.apiExchanges)
	handle("GET /api/exchanges/{vhost}", anyone, s.apiExchanges)
	handle("GET /api/exchanges/{vhost}/{name}", anyone, s.apiExchange)
	handle("PUT /api/exchanges/{vhost}/{name}", anyone, s.apiPutExchange)
	handle("DELETE /api/exchanges/{vhost}/{name}", anyone, s.apiDeleteExchange)
	handle("POST /api/exchanges/{vhost}/{name}/publish", anyone, s.apiPublish)
	handle("GET /api/exchanges/{vhost}/{name}/bindings/source", anyone, s.apiBindings)
	handle("GET /api/exchanges/{vhost}/{name}/bindings/destination", anyone, s.apiBindings)

	handle("GET /api/queues", anyone, s.apiQueues)
	handle("GET /api/queues/{vhost}", anyone, s.apiQueues)
	handle("GET /api/queues/{vhost}/{name}", anyone, s.apiQueue)
	handle("PUT /api/queues/{vhost}/{name}", anyone, s.apiPutQueue)
	handle("DELETE /api/queues/{vhost}/{name}", anyone, s.apiDeleteQueue)
	handle("DELETE /api/queues/{vhost}/{name}/contents", anyone, s.apiPurge)
	handle("POST /api/queues/{vhost}/{name}/get", anyone, s.apiGet)
	handle("GET /api/queues/{vhost}/{name}/peek", anyone, s.apiPeek)
	handle("POST /api/queues/{vhost}/{name}/actions", anyone, s.apiQueueAction)
	handle("GET /api/queues/{vhost}/{name}/bindings", anyone, s.apiBindings)

	handle("GET /api/bindings", anyone, s.apiBindings)
	handle("GET /api/bindings/{vhost}", anyone, s.apiBindings)
	for _, dk := range []string{"q", "e"} {
		handle("GET /api/bindings/{vhost}/e/{source}/"+dk+"/{dest}", anyone, s.apiBindings)
		handle("POST /api/bindings/{vhost}/e/{source}/"+dk+"/{dest}", anyone, s.apiPostBinding)
		handle("GET /api/bindings/{vhost}/e/{source}/"+dk+"/{dest}/{props}", anyone, s.apiBinding)
		handle("DELETE /api/bindings/{vhost}/e/{source}/"+dk+"/{dest}/{props}", anyone, s.apiDeleteBinding)
	}

	handle("GET /api/definitions", admin, s.apiDefinitions)
	handle("GET /api/definitions/{vhost}", admin, s.apiDefinitions)
	handle("POST /api/definitions", admin, s.apiImportDefinitions)
	handle("POST /api/definitions/{vhost}", admin, s.apiImportDefinitions)

	handle("GET /api/health/checks/alarms", anyone, s.apiHealthAlarms)
	handle("GET /api/health/checks/local-alarms", anyone, s.apiHealthAlarms)
	handle("GET /api/health/checks/virtual-hosts", anyone, s.apiHealthVhosts)
	handle("GET /api/health/checks/port-listener/{port}", anyone, s.apiHealthPort)
	handle("GET /api/health/checks/protocol-listener/{protocol}", anyone, s.apiHealthProtocol)
	handle("GET /api/health/checks/is-in-service", anyone, s.apiHealthInService)
	handle("GET /api/health/checks/is-leader", anyone, s.apiHealthIsLeader)
	mux.handle("GET /api/cluster", s.api(monitor, s.apiCluster)) // answered on every node
	handle("GET /api/health/checks/ready-to-serve-clients", anyone, s.apiHealthInService)
	handle("GET /api/health/checks/node-is-quorum-critical", anyone, okStatus)
	handle("GET /api/health/checks/node-is-mirror-sync-critical", anyone, okStatus)
	handle("GET /api/health/checks/certificate-expiration/{within}/{unit}", anyone, s.apiHealthCerts)
	handle("GET /api/aliveness-test/{vhost}", anyone, s.apiAliveness)

	mountUI(mux)
	return mux
}

// apiRouter routes requests by method and path segments, each unescaped on its own, so
// that "%2F", the default vhost, is one segment as RabbitMQ's API wants it (http.ServeMux
// unescapes the path first). Values are set as path values; a path matched by several
// patterns goes to the one with the most literal segments.
type apiRouter struct{ routes []apiRoute }

type apiRoute struct {
	method, pattern string
	segs            []string // literal segments, and "{name}" for a wildcard
	literals        int
	h               http.Handler
}

// handle adds a route for a pattern "METHOD /path/{name}/...".
func (rt *apiRouter) handle(pattern string, h http.Handler) {
	method, path, _ := strings.Cut(pattern, " ")
	r := apiRoute{method: method, pattern: pattern, segs: strings.Split(strings.Trim(path, "/"), "/"), h: h}
	for _, sg := range r.segs {
		if !strings.HasPrefix(sg, "{") {
			r.literals++
		}
	}
	rt.routes = append(rt.routes, r)
}

func (rt *apiRouter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	raw := strings.Split(strings.Trim(r.URL.EscapedPath(), "/"), "/")
	segs := make([]string, len(raw))
	for i, sg := range raw {
		u, err := url.PathUnescape(sg)
		if err != nil {
			writeAPIError(w, badRequest("bad path escape"))
			return
		}
		segs[i] = u
	}
	var best *apiRoute
	methodMismatch := false
	for i := range rt.routes {
		rr := &rt.routes[i]
		if len(rr.segs) != len(segs) || best != nil && rr.literals <= best.literals {
			continue
		}
		ok := true
		for j, sg := range rr.segs {
			if !strings.HasPrefix(sg, "{") && sg != segs[j] {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		if rr.method != r.Method && !(rr.method == "GET" && r.Method == "HEAD") {
			methodMismatch = true
			continue
		}
		best = rr
	}
	if best == nil {
		if methodMismatch {
			writeAPIError(w, &apiError{http.StatusMethodNotAllowed, "Method Not Allowed", "method not allowed"})
			return
		}
		writeAPIError(w, notFoundAPI())
		return
	}
	for j, sg := range best.segs {
		if strings.HasPrefix(sg, "{") {
			r.SetPathValue(strings.Trim(sg, "{}"), segs[j])
		}
	}
	r.Pattern = best.pattern
	best.h.ServeHTTP(w, r)
}

// listenHTTP opens the HTTP listeners Config names, for ListenAndServe: the management API
// and the metrics. Slow or hostile HTTP clients are cut off by timeouts and size limits,
// and are served by goroutines of their own, apart from AMQP traffic.
func (s *Server) listenHTTP() error {
	for _, l := range []struct {
		addr       string
		handler    func() http.Handler
		management bool
	}{{s.cfg.HTTPAddr, s.ManagementHandler, true}, {s.cfg.PrometheusAddr, s.MetricsHandler, false}} {
		if l.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			s.closeHTTP()
			return err
		}
		management := l.management
		if management && s.cfg.HTTPTLS != nil {
			if err := s.loadHTTPCert(); err != nil {
				ln.Close()
				s.closeHTTP()
				return err
			}
			ln = tls.NewListener(ln, &tls.Config{MinVersion: tls.VersionTLS12,
				GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.httpCert.Load(), nil }})
		}
		hs := &http.Server{Handler: l.handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute,
			WriteTimeout: time.Minute, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10,
			ErrorLog: slogErrorLog(s.log)}
		s.mu.Lock()
		s.httpSrvs = append(s.httpSrvs, hs)
		if management {
			s.httpAddr = ln.Addr()
		}
		s.mu.Unlock()
		s.log.Info("HTTP listening", "addr", ln.Addr().String())
		go hs.Serve(ln)
	}
	return nil
}

// loadHTTPCert reads Config.HTTPTLS's certificate and key.
func (s *Server) loadHTTPCert() error {
	cert, err := tls.LoadX509KeyPair(s.cfg.HTTPTLS.CertFile, s.cfg.HTTPTLS.KeyFile)
	if err != nil {
		return errors.New("amqp: HTTP TLS certificate: " + err.Error())
	}
	s.httpCert.Store(&cert)
	return nil
}

// HTTPAddr returns the address the management API listens on, once ListenAndServe has
// opened it; nil otherwise.
func (s *Server) HTTPAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.httpAddr
}

// closeHTTP closes the HTTP listeners and their connections.
func (s *Server) closeHTTP() {
	s.mu.Lock()
	srvs := s.httpSrvs
	s.httpSrvs = nil
	s.mu.Unlock()
	for _, hs := range srvs {
		hs.Close()
	}
}

// slogErrorLog makes net/http's error log write to the broker's log, at debug level:
// what it reports is a client's fault (a bad TLS handshake, a reset).
func slogErrorLog(l *slog.Logger) *log.Logger {
	return slog.NewLogLogger(l.Handler(), slog.LevelDebug)
}

// okStatus is a health check that always passes here (a single node has no quorum or
// mirrors to lose).
func okStatus(*http.Request, *apiUser) (any, error) { return map[string]any{"status": "ok"}, nil }

// api wraps a handler: it logs the user in, checks need, and writes the answer.
func (s *Server) api(need func(*apiUser) bool, fn apiFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		u, err := s.apiLogin(r)
		if err == nil && !need(u) {
			err = notAuthorised("Not administrator user")
			if !u.admin() && !u.monitor() && !u.policymaker() && !u.has("management") {
				err = notAuthorised("Not management user")
			}
		}
		if err != nil {
			if e, ok := err.(*apiError); ok && e.status == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Basic realm="RabbitMQ Management"`)
			}
			writeAPIError(w, err)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxAPIBody)
		v, err := fn(r, u)
		switch {
		case err != nil:
			writeAPIError(w, err)
		case v == nil:
			w.WriteHeader(http.StatusNoContent)
		default:
			if st, ok := v.(apiStatus); ok {
				w.WriteHeader(int(st))
				return
			}
			writeJSON(w, http.StatusOK, v)
		}
	})
}

// apiLogin checks the request's HTTP Basic credentials as an AMQP login is checked,
// failures throttled per source address, and requires a management tag.
func (s *Server) apiLogin(r *http.Request) (*apiUser, error) {
	name, password, ok := r.BasicAuth()
	if !ok {
		return nil, notAuthorised("Not_Authorized")
	}
	remote := httpRemote(r)
	var src netip.Addr
	if s.logins != nil {
		src = loginSource(remote)
		now := time.Now()
		at, _, ok := s.logins.take(src, now, now.Add(5*time.Second))
		if !ok {
			return nil, &apiError{http.StatusTooManyRequests, "too_many_requests", "too many failed logins from this address"}
		}
		if wait := at.Sub(now); wait > 0 {
			select {
			case <-time.After(wait):
			case <-r.Context().Done():
				return nil, r.Context().Err()
			}
		}
	}
	db := s.auth.Load()
	if err := db.login(name, password, remote); err != nil {
		s.log.Warn("HTTP API login refused", "user", name, "remote", remote.String(), "reason", loginReason(err))
		return nil, notAuthorised("Not_Authorized")
	}
	if s.logins != nil {
		s.logins.give(src, time.Now())
	}
	u := &apiUser{name: name, password: password, tags: db.userTags(name), remote: remote}
	if !u.admin() && !u.monitor() && !u.policymaker() && !u.has("management") {
		return nil, notAuthorised("Not management user")
	}
	return u, nil
}

// httpRemote returns the address of the HTTP client.
func httpRemote(r *http.Request) net.Addr {
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		return net.TCPAddrFromAddrPort(ap)
	}
	return &net.TCPAddr{}
}

// writeJSON writes v as JSON with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		writeAPIError(w, &apiError{http.StatusInternalServerError, "internal_error", err.Error()})
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// writeAPIError writes err as RabbitMQ's API does: an *apiError as it is, an AMQP
// exception with the HTTP status RabbitMQ's management plugin gives it.
func writeAPIError(w http.ResponseWriter, err error) {
	var ae *apiError
	var amqpErr *Error
	var tooBig *http.MaxBytesError
	var health *apiHealth
	switch {
	case errors.As(err, &health):
		writeJSON(w, http.StatusServiceUnavailable, health.body)
		return
	case errors.As(err, &ae):
	case errors.As(err, &tooBig):
		ae = &apiError{http.StatusRequestEntityTooLarge, "bad_request", "request body larger than " + strconv.Itoa(maxAPIBody) + " bytes"}
	case errors.As(err, &amqpErr):
		switch amqpErr.Code {
		case replyNotFound:
			ae = &apiError{http.StatusNotFound, "Object Not Found", "Not Found"}
		case replyAccessRefused, replyNotAllowed:
			ae = notAuthorised(amqpErr.Text)
		case replyPreconditionFailed, replyResourceLocked, replyCommandInvalid, replySyntaxError:
			ae = badRequest(amqpErr.Text)
		default:
			ae = &apiError{http.StatusInternalServerError, "internal_error", amqpErr.Text}
		}
	default:
		ae = &apiError{http.StatusInternalServerError, "internal_error", err.Error()}
	}
	writeJSON(w, ae.status, map[string]string{"error": ae.error, "reason": ae.reason})
}

// readJSON decodes the request body, a JSON object, with numbers kept exact.
func readJSON(r *http.Request) (map[string]any, error) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return nil, err
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return map[string]any{}, nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil || m == nil {
		return nil, badRequest("the body is not a JSON object")
	}
	return m, nil
}

// jsonBool reads a boolean field, also given as a string ("true"), as rabbitmqadmin sends.
func jsonBool(m map[string]any, key string, def bool) (bool, error) {
	switch v := m[key].(type) {
	case nil:
		return def, nil
	case bool:
		return v, nil
	case string:
		if b, err := strconv.ParseBool(v); err == nil {
			return b, nil
		}
	}
	return false, badRequest(key + " must be a boolean")
}

// jsonInt reads an integer field, also given as a string.
func jsonInt(m map[string]any, key string, def int64) (int64, error) {
	switch v := m[key].(type) {
	case nil:
		return def, nil
	case json.Number:
		if n, err := v.Int64(); err == nil {
			return n, nil
		}
	case string:
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			return n, nil
		}
	}
	return 0, badRequest(key + " must be an integer")
}

// jsonString reads a string field.
func jsonString(m map[string]any, key, def string) (string, error) {
	switch v := m[key].(type) {
	case nil:
		return def, nil
	case string:
		return v, nil
	}
	return "", badRequest(key + " must be a string")
}

// jsonTable turns a JSON "arguments" object into a field table: integers as signed 64-bit,
// other numbers as doubles, objects as tables.
func jsonTable(v any) (table, error) {
	switch v := v.(type) {
	case nil:
		return nil, nil
	case map[string]any:
		t := make(table, len(v))
		for k, e := range v {
			t[k] = jsonField(e)
		}
		return t, nil
	}
	return nil, badRequest("arguments must be an object")
}

func jsonField(v any) any {
	switch v := v.(type) {
	case json.Number:
		if n, err := v.Int64(); err == nil {
			return n
		}
		f, _ := v.Float64()
		return f
	case map[string]any:
		t, _ := jsonTable(v)
		return t
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = jsonField(e)
		}
		return out
	}
	return v // string, bool, nil
}

// tableJSON turns a field table into what RabbitMQ's API shows: {} for none.
func tableJSON(t table) map[string]any {
	m := make(map[string]any, len(t))
	for k, v := range t {
		m[k] = fieldJSON(v)
	}
	return m
}

func fieldJSON(v any) any {
	switch v := v.(type) {
	case table:
		return tableJSON(v)
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = fieldJSON(e)
		}
		return out
	case []byte:
		return string(v)
	case decimal:
		return float64(v.Value) / math.Pow10(int(v.Scale))
	case timestamp:
		return uint64(v)
	case float32:
		return float64(v)
	}
	return v
}

// listAnswer filters, sorts, pages and trims a list as RabbitMQ's API does with the
// query parameters name and use_regex, sort and sort_reverse, page and page_size, and
// columns. Without page, the whole list is the answer.
func listAnswer(r *http.Request, items []map[string]any) (any, error) {
	q := r.URL.Query()
	total := len(items)
	if name := q.Get("name"); name != "" {
		match := func(s string) bool { return strings.Contains(s, name) }
		if q.Get("use_regex") == "true" {
			re, err := regexp.Compile(name)
			if err != nil {
				return nil, badRequest("invalid regular expression in name: " + err.Error())
			}
			match = re.MatchString
		}
		items = slices.DeleteFunc(items, func(m map[string]any) bool {
			s, _ := m["name"].(string)
			return !match(s)
		})
	}
	if key := q.Get("sort"); key != "" {
		slices.SortStableFunc(items, func(a, b map[string]any) int { return compareJSON(pick(a, key), pick(b, key)) })
		if q.Get("sort_reverse") == "true" {
			slices.Reverse(items)
		}
	}
	var out []any
	paged := q.Get("page") != ""
	page, size := 1, 100
	if paged {
		var err1, err2 error
		page, err1 = strconv.Atoi(q.Get("page"))
		if ps := q.Get("page_size"); ps != "" {
			size, err2 = strconv.Atoi(ps)
		}
		if err1 != nil || err2 != nil || page < 1 || size < 1 || size > 500 {
			return nil, badRequest("page and page_size must be positive integers, page_size at most 500")
		}
	}
	filtered := len(items)
	if paged {
		start := min((page-1)*size, len(items))
		items = items[start:min(start+size, len(items))]
	}
	cols := q.Get("columns")
	for _, m := range items {
		if cols != "" {
			out = append(out, columns(m, strings.Split(cols, ",")))
		} else {
			out = append(out, m)
		}
	}
	if out == nil {
		out = []any{}
	}
	if !paged {
		return out, nil
	}
	return map[string]any{"filtered_count": filtered, "item_count": len(out), "items": out, "page": page,
		"page_count": max(1, (filtered+size-1)/size), "page_size": size, "total_count": total}, nil
}

// pick returns the value at a dotted path ("message_stats.publish") of m, or nil.
func pick(m map[string]any, path string) any {
	var v any = m
	for _, k := range strings.Split(path, ".") {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[k]
	}
	return v
}

// columns keeps only the dotted paths cols of m.
func columns(m map[string]any, cols []string) map[string]any {
	out := map[string]any{}
	for _, c := range cols {
		v := pick(m, c)
		if v == nil {
			continue
		}
		dst := out
		keys := strings.Split(c, ".")
		for _, k := range keys[:len(keys)-1] {
			next, ok := dst[k].(map[string]any)
			if !ok {
				next = map[string]any{}
				dst[k] = next
			}
			dst = next
		}
		dst[keys[len(keys)-1]] = v
	}
	return out
}

// compareJSON orders two JSON values: numbers by value, the rest as strings.
func compareJSON(a, b any) int {
	num := func(v any) (float64, bool) {
		switch v := v.(type) {
		case int:
			return float64(v), true
		case int64:
			return float64(v), true
		case uint64:
			return float64(v), true
		case float64:
			return v, true
		}
		return 0, false
	}
	x, xok := num(a)
	y, yok := num(b)
	if xok && yok {
		return cmp.Compare(x, y)
	}
	as, _ := json.Marshal(a)
	bs, _ := json.Marshal(b)
	return bytes.Compare(as, bs)
}

// --- connections, channels, consumers ---

// connectionName is RabbitMQ's name of a connection: "client -> server".
func connectionName(c *conn) string {
	return c.remote + " -> " + c.nc.LocalAddr().String()
}

// openConnList returns the open client connections u may see: all for monitoring users,
// their own for others.
func (s *Server) openConnList(u *apiUser) []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	var cs []*conn
	for c := range s.active {
		if !c.internal && c.opened.Load() && (u.monitor() || c.user == u.name) {
			cs = append(cs, c)
		}
	}
	slices.SortFunc(cs, func(a, b *conn) int { return cmp.Compare(a.id, b.id) })
	return cs
}

func connInfo(c *conn) map[string]any {
	host, port := splitHostPort(c.remote)
	lhost, lport := splitHostPort(c.nc.LocalAddr().String())
	props := tableJSON(c.clientProperties())
	protocol := "AMQP 0-9-1"
	return map[string]any{"name": connectionName(c), "node": c.s.node(), "vhost": c.vh.name, "user": c.user,
		"state": "running", "type": "network", "protocol": protocol, "ssl": c.isTLS, "auth_mechanism": "PLAIN",
		"peer_host": host, "peer_port": port, "host": lhost, "port": lport,
		"channels": len(c.openChannelList()), "channel_max": c.channelMax, "frame_max": c.frameMax,
		"timeout": c.heartbeat.Load() / int64(time.Second), "connected_at": c.started.UnixMilli(),
		"client_properties": props, "user_who_performed_action": c.user}
}

func splitHostPort(addr string) (string, int) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr, 0
	}
	n, _ := strconv.Atoi(port)
	return host, n
}

func (s *Server) apiConnections(r *http.Request, u *apiUser) (any, error) {
	vhost := r.PathValue("vhost")
	if vhost != "" && !s.canSee(u, vhost) {
		return nil, notFoundAPI()
	}
	var items []map[string]any
	for _, c := range s.openConnList(u) {
		if vhost == "" || c.vh.name == vhost {
			items = append(items, connInfo(c))
		}
	}
	return listAnswer(r, items)
}

// pathConn returns the connection the request names, if u may see it.
func (s *Server) pathConn(r *http.Request, u *apiUser) (*conn, error) {
	name := r.PathValue("name")
	for _, c := range s.openConnList(u) {
		if connectionName(c) == name {
			return c, nil
		}
	}
	return nil, notFoundAPI()
}

func (s *Server) apiConnection(r *http.Request, u *apiUser) (any, error) {
	c, err := s.pathConn(r, u)
	if err != nil {
		return nil, err
	}
	return connInfo(c), nil
}

// apiCloseConnection closes a connection with 320 CONNECTION_FORCED and the X-Reason
// header's text, as RabbitMQ does. Closing another user's connection needs administrator.
func (s *Server) apiCloseConnection(r *http.Request, u *apiUser) (any, error) {
	c, err := s.pathConn(r, u)
	if err != nil {
		return nil, err
	}
	if c.user != u.name && !u.admin() {
		return nil, notAuthorised("Not administrator user")
	}
	reason := r.Header.Get("X-Reason")
	if reason == "" {
		reason = "Closed via management plugin"
	}
	c.closeWith(newError(replyConnectionForced, reason))
	return nil, nil
}

func channelInfo(c *conn, ch *channel) map[string]any {
	ch.mu.Lock()
	unacked := ch.unacked.len()
	prefetch, global := ch.prefetchConsumer, ch.prefetchGlobal
	consumers := len(ch.consumers)
	ch.mu.Unlock()
	modes := ch.modes.Load()
	ch.cmu.Lock()
	unconfirmed := ch.confirmSeq - ch.confirmSent
	ch.cmu.Unlock()
	name := connectionName(c) + " (" + strconv.Itoa(int(ch.id)) + ")"
	return map[string]any{"name": name, "number": ch.id, "node": c.s.node(), "vhost": c.vh.name, "user": c.user,
		"connection_details": map[string]any{"name": connectionName(c)}, "state": "running",
		"confirm": modes&modeConfirm != 0, "transactional": modes&modeTx != 0,
		"prefetch_count": prefetch, "global_prefetch_count": global, "messages_unacknowledged": unacked,
		"consumer_count": consumers, "messages_unconfirmed": unconfirmed, "user_who_performed_action": c.user}
}

func (s *Server) apiChannels(r *http.Request, u *apiUser) (any, error) {
	vhost := r.PathValue("vhost")
	if vhost != "" && !s.canSee(u, vhost) {
		return nil, notFoundAPI()
	}
	conns := s.openConnList(u)
	if r.PathValue("name") != "" {
		c, err := s.pathConn(r, u)
		if err != nil {
			return nil, err
		}
		conns = []*conn{c}
	}
	var items []map[string]any
	for _, c := range conns {
		if vhost != "" && c.vh.name != vhost {
			continue
		}
		for _, ch := range c.openChannelList() {
			items = append(items, channelInfo(c, ch))
		}
	}
	return listAnswer(r, items)
}

// consumerInfo is a consumer as RabbitMQ's API shows it. q.mu must be held.
func consumerInfo(vh *vhost, q *queue, c *consumer) map[string]any {
	active := !q.single || q.active == c
	status := "up"
	if !active {
		status = "waiting"
	}
	args := map[string]any{}
	if c.priority != 0 {
		args["x-priority"] = c.priority
	}
	return map[string]any{"consumer_tag": c.tag, "exclusive": c.exclusive, "ack_required": !c.noAck,
		"prefetch_count": c.prefetch, "active": active, "activity_status": status, "arguments": args,
		"queue": map[string]any{"name": q.name, "vhost": vh.name},
		"channel_details": map[string]any{"name": connectionName(c.ch.c) + " (" + strconv.Itoa(int(c.ch.id)) + ")",
			"number": c.ch.id, "connection_name": connectionName(c.ch.c), "user": c.ch.c.user, "node": c.ch.c.s.node(),
			"peer_host": hostOf(c.ch.c.remote), "peer_port": portOf(c.ch.c.remote)}}
}

func hostOf(addr string) string { h, _ := splitHostPort(addr); return h }
func portOf(addr string) int    { _, p := splitHostPort(addr); return p }

// effectivePolicy is the definition keys a queue's policies set, as RabbitMQ's
// effective_policy_definition shows them.
func (vh *vhost) effectivePolicy(userPolicy, operatorPolicy string) map[string]any {
	out := map[string]any{}
	vh.mu.RLock()
	ps := vh.policies
	vh.mu.RUnlock()
	if ps == nil {
		return out
	}
	add := func(list []*policy, name string) {
		for _, p := range list {
			if p.name != name {
				continue
			}
			for key, arg := range policyKeys {
				if v, ok := p.args[arg]; ok {
					if old, ok := out[key].(int64); ok {
						v = min(old, v.(int64))
					}
					out[key] = v
				}
			}
		}
	}
	add(ps.user, userPolicy)
	add(ps.operator, operatorPolicy)
	return out
}

func (s *Server) apiConsumers(r *http.Request, u *apiUser) (any, error) {
	vhs, err := s.visibleVhosts(r, u)
	if err != nil {
		return nil, err
	}
	var items []map[string]any
	for _, vh := range vhs {
		for _, q := range vh.queueList() {
			q.mu.Lock()
			for _, c := range q.consumers {
				if !u.monitor() && c.ch.c.user != u.name {
					continue
				}
				items = append(items, consumerInfo(vh, q, c))
			}
			q.mu.Unlock()
		}
	}
	return listAnswer(r, items)
}

// --- overview and node ---

func (s *Server) apiOverview(r *http.Request, u *apiUser) (any, error) {
	_, cluster, _ := s.identity()
	vhs, _ := s.visibleVhosts(r, u)
	var ready, unacked, queues, exchanges, consumers int64
	for _, vh := range vhs {
		vh.mu.RLock()
		exchanges += int64(len(vh.exchanges))
		vh.mu.RUnlock()
		for _, q := range vh.queueList() {
			queues++
			q.mu.Lock()
			ready += int64(q.messageCountLocked())
			consumers += int64(len(q.consumers))
			unacked += q.unackedLocked()
			q.mu.Unlock()
		}
	}
	conns := s.openConnList(u)
	var channels int
	for _, c := range conns {
		channels += len(c.openChannelList())
	}
	listeners := []any{}
	s.mu.Lock()
	for ln := range s.listeners {
		_, port := splitHostPort(ln.Addr().String())
		listeners = append(listeners, map[string]any{"node": s.node(), "protocol": "amqp", "port": port, "ip_address": ln.Addr().String()})
	}
	s.mu.Unlock()
	return map[string]any{
		"management_version": Version, "rabbitmq_version": Version, "product_name": "amqp-go", "product_version": Version,
		"erlang_version": "none (Go)", "cluster_name": cluster, "node": s.node(),
		"rates_mode": "basic", "exchange_types": exchangeTypes(),
		"message_stats": s.overviewStats(),
		"queue_totals": map[string]any{"messages": ready + unacked, "messages_ready": ready, "messages_unacknowledged": unacked,
			"messages_details": map[string]any{"rate": 0.0}},
		"object_totals": map[string]any{"connections": len(conns), "channels": channels, "exchanges": exchanges,
			"queues": queues, "consumers": consumers},
		"listeners": listeners, "contexts": []any{},
	}, nil
}

// overviewRates is the last sample of the node's message counts, for their rates.
type overviewRates struct {
	mu    sync.Mutex
	at    time.Time
	last  map[string]uint64
	rates map[string]float64
}

// overviewStats is the overview's message_stats: the node's counts (Prometheus's
// counters) under RabbitMQ's names, each with a rate over the time since the previous
// sample at least five seconds older.
func (s *Server) overviewStats() map[string]any {
	m := s.messageTotals()
	counts := map[string]uint64{"publish": m.received, "confirm": m.confirmed, "return_unroutable": m.unroutableReturned,
		"drop_unroutable": m.unroutableDropped, "deliver_get": m.delivered(), "deliver": m.consumeManualAck,
		"deliver_no_ack": m.consumeAutoAck, "get": m.getManualAck, "get_no_ack": m.getAutoAck, "get_empty": m.getEmpty,
		"redeliver": m.redelivered, "ack": m.acknowledged}
	o := &s.overview
	o.mu.Lock()
	defer o.mu.Unlock()
	now := time.Now()
	if d := now.Sub(o.at); o.at.IsZero() || d >= 5*time.Second {
		rates := make(map[string]float64, len(counts))
		for k, v := range counts {
			if !o.at.IsZero() {
				rates[k] = float64(v-min(v, o.last[k])) / d.Seconds()
			}
		}
		o.at, o.last, o.rates = now, counts, rates
	}
	out := make(map[string]any, 2*len(counts))
	for k, v := range counts {
		out[k] = v
		out[k+"_details"] = map[string]any{"rate": o.rates[k]}
	}
	return out
}

// exchangeType is the type an exchange was declared with.
func exchangeType(x *exchange) string {
	if x.delay != nil {
		return kindDelayed
	}
	return x.kind
}

func exchangeTypes() []any {
	var out []any
	for _, k := range []string{kindDirect, kindFanout, kindHeaders, kindTopic, kindDelayed} {
		out = append(out, map[string]any{"name": k, "description": "AMQP " + k + " exchange", "enabled": true})
	}
	return out
}

func (s *Server) nodeInfo() map[string]any {
	alarms := s.alarms.Load()
	var free uint64
	if s.diskFree != nil {
		free, _ = s.diskFree()
	}
	var heap uint64
	if s.liveHeap != nil {
		heap = s.liveHeap()
	}
	info := map[string]any{"name": s.node(), "type": "disc", "running": true, "uptime": time.Since(s.startedAt).Milliseconds(),
		"mem_used": heap, "mem_limit": s.memLimit.Load(), "mem_alarm": alarms&alarmMemory != 0,
		"disk_free": free, "disk_free_limit": s.diskLimit.Load(), "disk_free_alarm": alarms&alarmDisk != 0,
		"partitions": []any{}, "os_pid": strconv.Itoa(os.Getpid()), "exchange_types": exchangeTypes()}
	if open, limit, ok := openFDs(); ok {
		info["fd_used"], info["fd_total"] = open, limit
	}
	return info
}

// apiSetLimit changes the memory watermark or the disk free limit, {"value": bytes}: what
// rabbitmqctl set_vm_memory_high_watermark and set_disk_free_limit do (not in RabbitMQ's
// HTTP API; amqpd's verbs of those names call it).
func (s *Server) apiSetLimit(r *http.Request, u *apiUser) (any, error) {
	if r.PathValue("node") != s.node() {
		return nil, notFoundAPI()
	}
	body, err := readJSON(r)
	if err != nil {
		return nil, err
	}
	n, err := jsonInt(body, "value", -1)
	if err != nil || n < 0 {
		return nil, badRequest("value must be a non-negative integer of bytes")
	}
	if strings.HasSuffix(r.URL.Path, "/disk_free_limit") {
		s.SetDiskFreeLimit(n)
	} else {
		s.SetMemoryHighWatermark(uint64(n))
	}
	return apiStatus(http.StatusNoContent), nil
}

// --- health checks ---

// healthFailed is a failed health check: 503 with RabbitMQ's shape.
func healthFailed(reason string, extra map[string]any) *apiHealth {
	m := map[string]any{"status": "failed", "reason": reason}
	for k, v := range extra {
		m[k] = v
	}
	return &apiHealth{m}
}

// apiHealth is a failed health check's answer.
type apiHealth struct{ body map[string]any }

func (h *apiHealth) Error() string { return h.body["reason"].(string) }

func (s *Server) apiHealthAlarms(r *http.Request, u *apiUser) (any, error) {
	a := s.alarms.Load()
	if a == 0 {
		return map[string]any{"status": "ok"}, nil
	}
	var alarms []any
	if a&alarmMemory != 0 {
		alarms = append(alarms, map[string]any{"node": s.node(), "resource": "memory"})
	}
	if a&alarmDisk != 0 {
		alarms = append(alarms, map[string]any{"node": s.node(), "resource": "disk"})
	}
	return nil, healthFailed("resource alarm(s) in effect", map[string]any{"alarms": alarms})
}

func (s *Server) apiHealthVhosts(r *http.Request, u *apiUser) (any, error) {
	if err := s.Healthy(); err != nil {
		return nil, healthFailed(err.Error(), nil)
	}
	return map[string]any{"status": "ok"}, nil
}

func (s *Server) apiHealthInService(r *http.Request, u *apiUser) (any, error) {
	if err := s.Healthy(); err != nil {
		return nil, healthFailed(err.Error(), nil)
	}
	if s.isClosed() {
		return nil, healthFailed("the broker is shutting down", nil)
	}
	if n := s.standby(); n != nil {
		return nil, healthFailed(n.refusal().Text, nil) // a standby serves no client
	}
	return map[string]any{"status": "ok"}, nil
}

// apiHealthIsLeader answers 200 on a cluster's leader and on a single node, 503 on a
// node that does not lead.
func (s *Server) apiHealthIsLeader(r *http.Request, u *apiUser) (any, error) {
	if n := s.standby(); n != nil {
		return nil, healthFailed(n.refusal().Text, nil)
	}
	return map[string]any{"status": "ok"}, nil
}

func (s *Server) apiHealthPort(r *http.Request, u *apiUser) (any, error) {
	port, err := strconv.Atoi(r.PathValue("port"))
	if err != nil {
		return nil, badRequest("port must be a number")
	}
	s.mu.Lock()
	var ports []any
	found := false
	for ln := range s.listeners {
		_, p := splitHostPort(ln.Addr().String())
		ports = append(ports, p)
		found = found || p == port
	}
	s.mu.Unlock()
	if !found {
		return nil, healthFailed("No active listener", map[string]any{"missing": port, "ports": ports})
	}
	return map[string]any{"status": "ok", "port": port}, nil
}

func (s *Server) apiHealthProtocol(r *http.Request, u *apiUser) (any, error) {
	protocol := r.PathValue("protocol")
	s.mu.Lock()
	n := len(s.listeners)
	s.mu.Unlock()
	if (protocol == "amqp" || protocol == "amqp091" || protocol == "amqp0-9-1") && n > 0 {
		return map[string]any{"status": "ok", "protocol": protocol}, nil
	}
	return nil, healthFailed("No active listener", map[string]any{"missing": protocol, "protocols": []string{"amqp"}})
}

func (s *Server) apiHealthCerts(r *http.Request, u *apiUser) (any, error) {
	within, err := strconv.Atoi(r.PathValue("within"))
	unit := map[string]time.Duration{"seconds": time.Second, "minutes": time.Minute, "hours": time.Hour, "days": 24 * time.Hour, "weeks": 7 * 24 * time.Hour, "months": 30 * 24 * time.Hour, "years": 365 * 24 * time.Hour}[r.PathValue("unit")]
	if err != nil || within < 0 || unit == 0 {
		return nil, badRequest("want /certificate-expiration/N/seconds|minutes|hours|days|weeks|months|years")
	}
	conf := s.tlsConf.Load()
	if conf == nil {
		return map[string]any{"status": "ok"}, nil
	}
	deadline := time.Now().Add(time.Duration(within) * unit)
	for _, c := range conf.Certificates {
		if c.Leaf != nil && c.Leaf.NotAfter.Before(deadline) {
			return nil, healthFailed("Certificates expiring", map[string]any{"expired": []any{map[string]any{"node": s.node(), "expires": c.Leaf.NotAfter.Format(time.RFC3339)}}})
		}
	}
	return map[string]any{"status": "ok"}, nil
}

// apiAliveness declares aliveness-test in the vhost, publishes a message to it and gets
// it back, as the user, as RabbitMQ's aliveness test does.
func (s *Server) apiAliveness(r *http.Request, u *apiUser) (any, error) {
	v, err := s.withSession(r, u, func(ss *session) (any, error) {
		const q = "aliveness-test"
		if _, err := ss.call(&queueDeclare{Queue: q}, idQueueDeclareOk); err != nil {
			return nil, err
		}
		if _, err := ss.publish("", q, &properties{}, []byte("test_message")); err != nil {
			return nil, err
		}
		g, err := ss.get(q, true)
		if err != nil {
			return nil, err
		}
		if g == nil || string(g.body) != "test_message" {
			return nil, healthFailed("the test message did not come back", nil)
		}
		return map[string]any{"status": "ok"}, nil
	})
	var e *Error
	if errors.As(err, &e) && e.Code != replyAccessRefused && e.Code != replyNotAllowed {
		return nil, healthFailed(e.Text, nil)
	}
	return v, err
}
