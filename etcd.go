package amqp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A minimal client of etcd's v3 API through its gRPC gateway (HTTP/1.1 and JSON, served on
// the client port of etcd 3.4 and later), enough for cluster.go's election: leases, put,
// range, delete, transactions and a watch on a prefix.
//
// Every call is a POST of one JSON object to /v3/<service>/<method>. Keys and values are
// base64 in JSON ([]byte fields do that), int64 fields are decimal strings (the ",string"
// tags), and fields at their zero value are left out of answers. An error is an HTTP status
// other than 200 with {"error": ..., "code": <gRPC code>, "message": ...}. Streaming methods
// (lease keepalive, watch) answer newline-separated {"result": {...}} objects instead; a
// keepalive that sends one request gets one result, and the stream ends.
//
// Each attempt has its own timeout. A call that fails to reach an endpoint (a transport
// error, a timeout or a 5xx answer) tries the next one, up to once each; the endpoint that
// last answered is tried first. Puts and transactions may have been applied when their
// answer is lost, so a caller retrying them must expect to find its own write.

// errLeaseExpired reports that etcd no longer knows a lease: it expired or was revoked.
var errLeaseExpired = errors.New("etcd: lease expired")

// etcdClient talks to one etcd cluster through the endpoints it is given.
type etcdClient struct {
	endpoints []string      // base URLs, e.g. http://127.0.0.1:2379
	timeout   time.Duration // per attempt
	hc        *http.Client

	mu    sync.Mutex
	cur   int           // guarded by mu: the endpoint tried first
	moved chan struct{} // guarded by mu: closed and replaced when a call fails on cur
}

// newEtcdClient returns a client of the comma-separated endpoint URLs (http or https).
func newEtcdClient(endpoints string, timeout time.Duration) (*etcdClient, error) {
	c := &etcdClient{
		timeout: timeout,
		hc: &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: 4,
			IdleConnTimeout:     time.Minute,
		}},
		moved: make(chan struct{}),
	}
	for _, ep := range strings.Split(endpoints, ",") {
		ep = strings.TrimRight(strings.TrimSpace(ep), "/")
		if ep == "" {
			continue
		}
		if !strings.HasPrefix(ep, "http://") && !strings.HasPrefix(ep, "https://") {
			return nil, fmt.Errorf("etcd: endpoint %q: want an http:// or https:// URL", ep)
		}
		c.endpoints = append(c.endpoints, ep)
	}
	if len(c.endpoints) == 0 {
		return nil, errors.New("etcd: no endpoints")
	}
	if timeout <= 0 {
		return nil, errors.New("etcd: timeout must be positive")
	}
	return c, nil
}

// close drops the client's idle connections.
func (c *etcdClient) close() { c.hc.CloseIdleConnections() }

// current returns the endpoint tried first and a channel closed when a call fails on it
// (and the client moves on, if it has another endpoint).
func (c *etcdClient) current() (int, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur, c.moved
}

// failed moves on from endpoint i, unless another call already did.
func (c *etcdClient) failed(i int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == i {
		c.cur = (i + 1) % len(c.endpoints)
		close(c.moved)
		c.moved = make(chan struct{})
	}
}

// etcdError is an error answered by etcd.
type etcdError struct {
	Message string `json:"message"`
	status  int    // HTTP status; 200 for an error in a stream
}

func (e *etcdError) Error() string { return "etcd: " + e.Message }

// Is makes a lease that etcd does not know match errLeaseExpired.
func (e *etcdError) Is(target error) bool {
	return target == errLeaseExpired && strings.HasSuffix(e.Message, "requested lease not found")
}

// call posts req to path and decodes the answer (the first result of a stream) into resp,
// trying each endpoint in turn.
func (c *etcdClient) call(ctx context.Context, path string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("etcd: %s: %w", path, err)
	}
	var last error
	for range c.endpoints {
		i, _ := c.current()
		err := c.attempt(ctx, c.endpoints[i]+path, body, resp)
		var ee *etcdError
		if err == nil || errors.As(err, &ee) && ee.status < 500 {
			return err
		}
		last = err
		if ctx.Err() != nil {
			break
		}
		c.failed(i)
	}
	return last
}

// attempt makes one request to url with the client's timeout.
func (c *etcdClient) attempt(ctx context.Context, url string, body []byte, resp any) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	r, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer r.Body.Close()
	data, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
	if err != nil {
		return fmt.Errorf("etcd: %s: %w", url, err)
	}
	if r.StatusCode != http.StatusOK {
		e := &etcdError{status: r.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Message == "" {
			e.Message = fmt.Sprintf("%s: %s", url, r.Status)
		}
		return e
	}
	// A streamed answer (keepalive) may hold more than one object; the first is the answer.
	if err := json.NewDecoder(bytes.NewReader(data)).Decode(resp); err != nil {
		return fmt.Errorf("etcd: %s: %w", url, err)
	}
	return nil
}

// etcdHeader is the header of every answer; revision is the store's revision when it was
// served.
type etcdHeader struct {
	Revision int64 `json:"revision,string"`
}

// etcdKV is a key, its value and its history.
type etcdKV struct {
	Key            []byte `json:"key"`
	Value          []byte `json:"value"`
	CreateRevision int64  `json:"create_revision,string"` // revision that created the key
	ModRevision    int64  `json:"mod_revision,string"`    // revision of the last change
	Lease          int64  `json:"lease,string"`           // lease the key is attached to; 0 if none
}

// grant creates a lease of ttl (rounded up to whole seconds) and returns its id and the TTL
// etcd granted, which may be longer (etcd has a minimum).
func (c *etcdClient) grant(ctx context.Context, ttl time.Duration) (int64, time.Duration, error) {
	req := struct {
		TTL int64 `json:"TTL,string"`
	}{int64((ttl + time.Second - 1) / time.Second)}
	var resp struct {
		ID  int64  `json:"ID,string"`
		TTL int64  `json:"TTL,string"`
		Err string `json:"error"`
	}
	if err := c.call(ctx, "/v3/lease/grant", req, &resp); err != nil {
		return 0, 0, err
	}
	if resp.Err != "" || resp.ID == 0 || resp.TTL <= 0 {
		return 0, 0, fmt.Errorf("etcd: lease grant: %q", resp.Err)
	}
	return resp.ID, time.Duration(resp.TTL) * time.Second, nil
}

// keepAlive renews lease id and returns its TTL from the moment etcd renewed it, which is
// after the request was sent. A lease etcd no longer has gives errLeaseExpired.
func (c *etcdClient) keepAlive(ctx context.Context, id int64) (time.Duration, error) {
	req := struct {
		ID int64 `json:"ID,string"`
	}{id}
	var resp struct {
		Result struct {
			TTL int64 `json:"TTL,string"`
		} `json:"result"`
		Error *struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := c.call(ctx, "/v3/lease/keepalive", req, &resp); err != nil {
		return 0, err
	}
	if resp.Error != nil {
		return 0, &etcdError{Message: resp.Error.Message, status: http.StatusOK}
	}
	if resp.Result.TTL <= 0 {
		return 0, errLeaseExpired
	}
	return time.Duration(resp.Result.TTL) * time.Second, nil
}

// revoke ends lease id and deletes the keys attached to it.
func (c *etcdClient) revoke(ctx context.Context, id int64) error {
	req := struct {
		ID int64 `json:"ID,string"`
	}{id}
	return c.call(ctx, "/v3/lease/revoke", req, &struct{}{})
}

// etcdPut is a put request; lease 0 attaches none.
type etcdPut struct {
	Key   []byte `json:"key"`
	Value []byte `json:"value"`
	Lease int64  `json:"lease,omitempty,string"`
}

// put sets key to value, attached to lease (if not 0), and returns the revision it made.
func (c *etcdClient) put(ctx context.Context, key string, value []byte, lease int64) (int64, error) {
	var resp struct {
		Header etcdHeader `json:"header"`
	}
	if err := c.call(ctx, "/v3/kv/put", etcdPut{[]byte(key), value, lease}, &resp); err != nil {
		return 0, err
	}
	return resp.Header.Revision, nil
}

// etcdRange names key, or with end the keys in [key, end).
type etcdRange struct {
	Key      []byte `json:"key"`
	RangeEnd []byte `json:"range_end,omitempty"`
}

// prefixEnd returns the end of the range of keys that start with prefix.
func prefixEnd(prefix string) string {
	b := []byte(prefix)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < 0xff {
			b[i]++
			return string(b[:i+1])
		}
	}
	return "\x00" // every key
}

// get returns key's value and history (nil if it does not exist) and the store's revision.
func (c *etcdClient) get(ctx context.Context, key string) (*etcdKV, int64, error) {
	kvs, rev, err := c.rangeKeys(ctx, etcdRange{Key: []byte(key)})
	if err != nil || len(kvs) == 0 {
		return nil, rev, err
	}
	return &kvs[0], rev, nil
}

// getPrefix returns the keys that start with prefix, in key order, and the store's revision.
func (c *etcdClient) getPrefix(ctx context.Context, prefix string) ([]etcdKV, int64, error) {
	return c.rangeKeys(ctx, etcdRange{[]byte(prefix), []byte(prefixEnd(prefix))})
}

func (c *etcdClient) rangeKeys(ctx context.Context, r etcdRange) ([]etcdKV, int64, error) {
	var resp struct {
		Header etcdHeader `json:"header"`
		KVs    []etcdKV   `json:"kvs"`
	}
	if err := c.call(ctx, "/v3/kv/range", r, &resp); err != nil {
		return nil, 0, err
	}
	return resp.KVs, resp.Header.Revision, nil
}

// delete removes key, if it exists.
func (c *etcdClient) delete(ctx context.Context, key string) error {
	return c.call(ctx, "/v3/kv/deleterange", etcdRange{Key: []byte(key)}, &struct{}{})
}

// etcdCompare is one condition of a transaction: Target's revision of Key (or of every key
// in [Key, RangeEnd)) compared by Result with the one revision field set.
type etcdCompare struct {
	Key            []byte `json:"key"`
	RangeEnd       []byte `json:"range_end,omitempty"`
	Target         string `json:"target"` // "CREATE" or "MOD"
	Result         string `json:"result"` // "EQUAL", "NOT_EQUAL", "GREATER" or "LESS"
	CreateRevision *int64 `json:"create_revision,omitempty,string"`
	ModRevision    *int64 `json:"mod_revision,omitempty,string"`
}

// createdAt holds when key's create revision is rev; rev 0 holds when key does not exist.
func createdAt(key string, rev int64) etcdCompare {
	return etcdCompare{Key: []byte(key), Target: "CREATE", Result: "EQUAL", CreateRevision: &rev}
}

// modifiedAt holds when key's mod revision is rev; rev 0 holds when key does not exist.
func modifiedAt(key string, rev int64) etcdCompare {
	return etcdCompare{Key: []byte(key), Target: "MOD", Result: "EQUAL", ModRevision: &rev}
}

// unchangedSince holds when no key that starts with prefix was put after revision rev.
// Deletions do not count: a deleted key is not compared.
func unchangedSince(prefix string, rev int64) etcdCompare {
	rev++
	return etcdCompare{Key: []byte(prefix), RangeEnd: []byte(prefixEnd(prefix)), Target: "MOD", Result: "LESS", ModRevision: &rev}
}

// etcdOp is one request of a transaction: a put or a delete.
type etcdOp struct {
	Put    *etcdPut   `json:"request_put,omitempty"`
	Delete *etcdRange `json:"request_delete_range,omitempty"`
}

// txn applies then if every condition in when holds, and reports whether they did and the
// store's revision after it; a successful transaction with writes made that revision.
func (c *etcdClient) txn(ctx context.Context, when []etcdCompare, then ...etcdOp) (bool, int64, error) {
	req := struct {
		Compare []etcdCompare `json:"compare"`
		Success []etcdOp      `json:"success"`
	}{when, then}
	var resp struct {
		Header    etcdHeader `json:"header"`
		Succeeded bool       `json:"succeeded"`
	}
	if err := c.call(ctx, "/v3/kv/txn", req, &resp); err != nil {
		return false, 0, err
	}
	return resp.Succeeded, resp.Header.Revision, nil
}

// watch calls changed once the watch on keys that start with prefix is set up and again
// after each revision that puts or deletes any of them, until ctx is done, the stream
// breaks, or another call fails on the watch's endpoint (a stream on a dead connection can
// stay silent forever); it returns why it stopped. The caller reads the keys again on each call rather than trusting events, so a
// change while no watch runs is caught by the call that starts the next.
func (c *etcdClient) watch(ctx context.Context, prefix string, changed func()) error {
	i, moved := c.current()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-moved:
			cancel()
		case <-ctx.Done():
		}
	}()
	body, err := json.Marshal(struct {
		Create etcdRange `json:"create_request"`
	}{etcdRange{[]byte(prefix), []byte(prefixEnd(prefix))}})
	if err != nil {
		return fmt.Errorf("etcd: watch: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.endpoints[i]+"/v3/watch", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("etcd: watch: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	// The first answer (created) must come within the timeout; after that the stream is
	// quiet for as long as nothing changes.
	var timedOut atomic.Bool
	setup := time.AfterFunc(c.timeout, func() { timedOut.Store(true); cancel() })
	defer setup.Stop()
	// broken moves the client on when the endpoint failed rather than the caller or
	// another call ending the watch.
	broken := func(err error) error {
		if timedOut.Load() || ctx.Err() == nil {
			c.failed(i)
		}
		return fmt.Errorf("etcd: watch: %w", err)
	}
	r, err := c.hc.Do(req)
	if err != nil {
		return broken(err)
	}
	defer r.Body.Close()
	if r.StatusCode != http.StatusOK {
		return broken(errors.New(r.Status))
	}
	dec := json.NewDecoder(r.Body)
	for {
		var m struct {
			Result struct {
				Created  bool            `json:"created"`
				Canceled bool            `json:"canceled"`
				Reason   string          `json:"cancel_reason"`
				Events   json.RawMessage `json:"events"`
			} `json:"result"`
			Error json.RawMessage `json:"error"`
		}
		if err := dec.Decode(&m); err != nil {
			return broken(err)
		}
		switch {
		case m.Error != nil:
			return fmt.Errorf("etcd: watch: %s", m.Error)
		case m.Result.Canceled:
			return fmt.Errorf("etcd: watch canceled: %s", m.Result.Reason)
		case m.Result.Created:
			setup.Stop()
			changed()
		case len(m.Result.Events) > 0:
			changed()
		}
	}
}
