package amqp

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

func newTestEtcdClient(t *testing.T, endpoints string, timeout time.Duration) *etcdClient {
	t.Helper()
	c, err := newEtcdClient(endpoints, timeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.close)
	return c
}

func TestEtcdEndpoints(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		want []string
		err  bool
	}{
		{in: "http://a:2379", want: []string{"http://a:2379"}},
		{in: " http://a:2379/, https://b:2379 ,", want: []string{"http://a:2379", "https://b:2379"}},
		{in: "", err: true},
		{in: " , ", err: true},
		{in: "a:2379", err: true},
	} {
		c, err := newEtcdClient(tc.in, time.Second)
		if tc.err {
			if err == nil {
				t.Errorf("%q: no error", tc.in)
			}
			continue
		}
		if err != nil || len(c.endpoints) != len(tc.want) {
			t.Errorf("%q: %v, %v", tc.in, c, err)
			continue
		}
		for i := range tc.want {
			if c.endpoints[i] != tc.want[i] {
				t.Errorf("%q: endpoints %q, want %q", tc.in, c.endpoints, tc.want)
			}
		}
	}
	if got := prefixEnd("/a/"); got != "/a0" {
		t.Errorf("prefixEnd(/a/) = %q", got)
	}
	if got := prefixEnd("a\xff"); got != "b" {
		t.Errorf("prefixEnd(a\\xff) = %q", got)
	}
}

// TestEtcdErrors, without etcd: an endpoint that answers 5xx is passed over for the next,
// one that answers 4xx is not, and etcd's "lease not found" is errLeaseExpired.
func TestEtcdErrors(t *testing.T) {
	t.Parallel()
	answer := func(status int, body string, hits *atomic.Int32) *httptest.Server {
		s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			w.WriteHeader(status)
			w.Write([]byte(body))
		}))
		t.Cleanup(s.Close)
		return s
	}
	var unavailable, notFound, bad atomic.Int32
	u := answer(503, `{"error":"etcdserver: request timed out","message":"etcdserver: request timed out","code":14}`, &unavailable)
	n := answer(404, `{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}`, &notFound)
	b := answer(400, `{"error":"bad","message":"bad","code":3}`, &bad)
	ctx := context.Background()

	c := newTestEtcdClient(t, u.URL+","+n.URL, time.Second)
	if _, err := c.keepAlive(ctx, 1); !errors.Is(err, errLeaseExpired) {
		t.Fatalf("keepAlive: %v, want errLeaseExpired", err)
	}
	if unavailable.Load() != 1 || notFound.Load() != 1 {
		t.Fatalf("hits %d, %d", unavailable.Load(), notFound.Load())
	}
	c = newTestEtcdClient(t, b.URL+","+n.URL, time.Second)
	var ee *etcdError
	if err := c.revoke(ctx, 1); !errors.As(err, &ee) || ee.Message != "bad" || errors.Is(err, errLeaseExpired) {
		t.Fatalf("revoke: %v", err)
	}
	if bad.Load() != 1 || notFound.Load() != 1 {
		t.Fatalf("a 4xx answer was retried elsewhere: hits %d, %d", bad.Load(), notFound.Load())
	}
}

// TestEtcdClient drives each call of the client against a real etcd.
func TestEtcdClient(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newTestEtcdClient(t, e.url, 2*time.Second)
	ctx := context.Background()

	id, ttl, err := c.grant(ctx, 1500*time.Millisecond)
	if err != nil || id == 0 || ttl != 2*time.Second {
		t.Fatalf("grant: %d %v %v, want a lease of 2s (rounded up)", id, ttl, err)
	}
	if got, err := c.keepAlive(ctx, id); err != nil || got != 2*time.Second {
		t.Fatalf("keepAlive: %v %v", got, err)
	}
	rev, err := c.put(ctx, "/t/a", []byte("1"), id)
	if err != nil || rev == 0 {
		t.Fatalf("put: %d %v", rev, err)
	}
	if _, err := c.put(ctx, "/t/b", []byte("2"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.put(ctx, "/u", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
	kv, now, err := c.get(ctx, "/t/a")
	if err != nil || kv == nil || string(kv.Value) != "1" || kv.CreateRevision != rev || kv.ModRevision != rev || kv.Lease != id || now < rev+2 {
		t.Fatalf("get: %+v at %d, %v", kv, now, err)
	}
	if kv, _, err := c.get(ctx, "/t/none"); kv != nil || err != nil {
		t.Fatalf("get missing key: %+v %v", kv, err)
	}
	kvs, _, err := c.getPrefix(ctx, "/t/")
	if err != nil || len(kvs) != 2 || string(kvs[0].Key) != "/t/a" || string(kvs[1].Key) != "/t/b" {
		t.Fatalf("getPrefix: %+v %v", kvs, err)
	}

	// Create only if absent: once.
	put := etcdOp{Put: &etcdPut{Key: []byte("/t/leader"), Value: []byte("x"), Lease: id}}
	ok, rev, err := c.txn(ctx, []etcdCompare{createdAt("/t/leader", 0)}, put)
	if err != nil || !ok {
		t.Fatalf("txn create: %v %v", ok, err)
	}
	if kv, _, _ := c.get(ctx, "/t/leader"); kv == nil || kv.CreateRevision != rev {
		t.Fatalf("leader key %+v, want created at %d", kv, rev)
	}
	if ok, _, err := c.txn(ctx, []etcdCompare{createdAt("/t/leader", 0)}, put); err != nil || ok {
		t.Fatalf("second txn create: %v %v, want failed", ok, err)
	}
	// Nothing under /t/ changed since rev; then /t/b changes.
	del := etcdOp{Delete: &etcdRange{Key: []byte("/u")}}
	if ok, _, err := c.txn(ctx, []etcdCompare{unchangedSince("/t/", rev)}, del); err != nil || !ok {
		t.Fatalf("txn unchanged: %v %v", ok, err)
	}
	if _, err := c.put(ctx, "/t/b", []byte("4"), 0); err != nil {
		t.Fatal(err)
	}
	if ok, _, err := c.txn(ctx, []etcdCompare{unchangedSince("/t/", rev)}, del); err != nil || ok {
		t.Fatalf("txn after a change: %v %v, want failed", ok, err)
	}
	// Compare-and-delete: only the holder's term deletes.
	delLeader := etcdOp{Delete: &etcdRange{Key: []byte("/t/leader")}}
	if ok, _, err := c.txn(ctx, []etcdCompare{createdAt("/t/leader", rev-1)}, delLeader); err != nil || ok {
		t.Fatalf("txn delete with another term: %v %v", ok, err)
	}
	if ok, _, err := c.txn(ctx, []etcdCompare{createdAt("/t/leader", rev)}, delLeader); err != nil || !ok {
		t.Fatalf("txn delete with its term: %v %v", ok, err)
	}

	if err := c.delete(ctx, "/t/b"); err != nil {
		t.Fatal(err)
	}
	if kv, _, _ := c.get(ctx, "/t/b"); kv != nil {
		t.Fatalf("deleted key still there: %+v", kv)
	}
	if err := c.revoke(ctx, id); err != nil {
		t.Fatal(err)
	}
	if kv, _, _ := c.get(ctx, "/t/a"); kv != nil {
		t.Fatalf("key of a revoked lease still there: %+v", kv)
	}
	if _, err := c.keepAlive(ctx, id); !errors.Is(err, errLeaseExpired) {
		t.Fatalf("keepAlive of a revoked lease: %v, want errLeaseExpired", err)
	}
	if _, err := c.put(ctx, "/t/a", nil, id); !errors.Is(err, errLeaseExpired) {
		t.Fatalf("put on a revoked lease: %v, want errLeaseExpired", err)
	}
	if err := c.revoke(ctx, id); !errors.Is(err, errLeaseExpired) {
		t.Fatalf("revoke twice: %v, want errLeaseExpired", err)
	}
}

// TestEtcdLeaseExpires: a lease not kept alive expires with its keys, and not before its TTL.
func TestEtcdLeaseExpires(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newTestEtcdClient(t, e.url, 2*time.Second)
	ctx := context.Background()
	sent := time.Now()
	id, ttl, err := c.grant(ctx, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.put(ctx, "/t/a", nil, id); err != nil {
		t.Fatal(err)
	}
	for {
		kv, _, err := c.get(ctx, "/t/a")
		if err != nil {
			t.Fatal(err)
		}
		if kv == nil {
			break
		}
		if time.Since(sent) > 10*ttl {
			t.Fatal("lease never expired")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if d := time.Since(sent); d < ttl {
		t.Fatalf("lease of %v expired after %v", ttl, d)
	}
	if _, err := c.keepAlive(ctx, id); !errors.Is(err, errLeaseExpired) {
		t.Fatalf("keepAlive of an expired lease: %v", err)
	}
}

// TestEtcdWatch: the watch calls back once set up and on each put and delete under its
// prefix, and not for other keys.
func TestEtcdWatch(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newTestEtcdClient(t, e.url, 2*time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	calls := make(chan struct{}, 16)
	done := make(chan error, 1)
	go func() { done <- c.watch(ctx, "/w/", func() { calls <- struct{}{} }) }()
	expectCall := func(what string) {
		t.Helper()
		select {
		case <-calls:
		case <-time.After(5 * time.Second):
			t.Fatalf("no callback for %s", what)
		}
	}
	expectCall("setup")
	c.put(ctx, "/x", nil, 0)
	c.put(ctx, "/w/a", nil, 0)
	expectCall("put")
	c.delete(ctx, "/w/a")
	expectCall("delete")
	select {
	case <-calls:
		t.Fatal("callback for a key outside the prefix")
	default:
	}
	cancel()
	if err := <-done; err == nil {
		t.Fatal("watch returned nil")
	}
}

// TestEtcdFailover: with a dead endpoint first, and then with the endpoint in use cut off
// (requests hang), calls go to the next endpoint within the timeout, and a watch on the cut
// endpoint ends so that it can be set up again.
func TestEtcdFailover(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	ctx := context.Background()

	dead := "http://" + freeAddr(t)
	c := newTestEtcdClient(t, dead+","+e.url, time.Second)
	if _, err := c.put(ctx, "/f", []byte("1"), 0); err != nil {
		t.Fatalf("put past a dead endpoint: %v", err)
	}
	if i, _ := c.current(); i != 1 {
		t.Fatalf("current endpoint %d, want 1", i)
	}

	p1, p2 := startProxy(t, e.url[len("http://"):]), startProxy(t, e.url[len("http://"):])
	c = newTestEtcdClient(t, p1.url()+","+p2.url(), 300*time.Millisecond)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	watching := make(chan struct{}, 16)
	ended := make(chan error, 1)
	go func() { ended <- c.watch(wctx, "/f", func() { watching <- struct{}{} }) }()
	select {
	case <-watching:
	case <-time.After(5 * time.Second):
		t.Fatal("watch not set up")
	}
	p1.cut.Store(true)
	start := time.Now()
	if _, _, err := c.get(ctx, "/f"); err != nil {
		t.Fatalf("get with the first endpoint cut: %v", err)
	}
	// The bounds below are a few timeouts, loose for a machine loaded by the rest of the
	// suite: they tell a bounded failover from a hang, not a fast one from a slow one.
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("failover took %v", d)
	}
	select {
	case err := <-ended:
		if err == nil {
			t.Fatal("watch ended without an error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watch on the cut endpoint still running")
	}
	// All endpoints cut: a call fails within about one timeout per endpoint.
	p2.cut.Store(true)
	start = time.Now()
	if _, _, err := c.get(ctx, "/f"); err == nil {
		t.Fatal("get with every endpoint cut succeeded")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("failing call took %v", d)
	}
}
