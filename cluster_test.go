package amqp

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// testTTL is the lease TTL of the election tests: the shortest that keeps a loaded machine
// running -race from missing keepalives (each etcd attempt may take TTL/4).
const testTTL = 2 * time.Second

// testNode is one node's election, run until the test ends or stop.
type testNode struct {
	name string
	e    *election
	stop func() // resigns and waits for run to return

	mu     sync.Mutex
	pos    logPosition
	inSync bool
}

// startNode runs an election for name in cluster through endpoints, in sync at pos.
func startNode(t *testing.T, endpoints, cluster, name string, pos logPosition) *testNode {
	t.Helper()
	return startNodeWith(t, endpoints, cluster, name, pos, nil)
}

// startNodeWith is startNode with the election changed by adjust before it runs.
func startNodeWith(t *testing.T, endpoints, cluster, name string, pos logPosition, adjust func(*election)) *testNode {
	t.Helper()
	e, err := newElection(endpoints, cluster, name, name+".test:5672", testTTL)
	if err != nil {
		t.Fatal(err)
	}
	if adjust != nil {
		adjust(e)
	}
	n := &testNode{name: name, e: e, pos: pos, inSync: true}
	e.position = func() (logPosition, bool) {
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.pos, n.inSync
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.run(ctx)
	}()
	n.stop = sync.OnceFunc(func() {
		cancel()
		<-done
	})
	t.Cleanup(n.stop)
	return n
}

func (n *testNode) setInSync(v bool) {
	n.mu.Lock()
	n.inSync = v
	n.mu.Unlock()
}

// putISR writes cluster's in-sync record naming members, as a leader of term would.
func putISR(t *testing.T, url, cluster string, term int64, members ...string) {
	t.Helper()
	rec, _ := json.Marshal(isrRecord{Term: term, Members: members})
	if _, err := newTestEtcdClient(t, url, time.Second).put(context.Background(), "/amqp-go/"+cluster+"/insync", rec, 0); err != nil {
		t.Fatal(err)
	}
}

// waitLeader waits until exactly one of nodes leads and every other node that runs follows
// it in the same term, and returns the leader.
func waitLeader(t *testing.T, nodes ...*testNode) (*testNode, int64) {
	t.Helper()
	deadline := time.Now().Add(5 * testTTL)
	for {
		var leader *testNode
		var term int64
		count := 0
		for _, n := range nodes {
			if tm, ok := n.e.leading(); ok {
				leader, term = n, tm
				count++
			}
		}
		if count == 1 {
			agreed := true
			for _, n := range nodes {
				l := n.e.leaderNow()
				if l.name != leader.name || l.term != term || l.self != (n == leader) {
					agreed = false
				}
			}
			if agreed {
				return leader, term
			}
		}
		if count > 1 {
			t.Fatalf("%d nodes lead at once", count)
		}
		if time.Now().After(deadline) {
			var b strings.Builder
			for _, n := range nodes {
				tm, ok := n.e.leading()
				fmt.Fprintf(&b, " %s: leading=%v term=%d sees %+v;", n.name, ok, tm, n.e.leaderNow())
			}
			t.Fatalf("no single leader:%s", b.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// leadSpan is a time during which a node's leading answered true in one term: the answers
// were asked for no earlier than first and returned no later than last.
type leadSpan struct {
	node        string
	term        int64
	first, last time.Time
}

// leadMonitor asks each node's leading every millisecond and records its spans.
type leadMonitor struct {
	stop chan struct{}
	wg   sync.WaitGroup

	mu    sync.Mutex
	spans []leadSpan // guarded by mu
}

// monitorLeading samples nodes until the test ends, then checks that no two nodes led at
// overlapping times.
func monitorLeading(t *testing.T, nodes ...*testNode) *leadMonitor {
	m := &leadMonitor{stop: make(chan struct{})}
	for _, n := range nodes {
		m.wg.Go(func() {
			cur := -1
			for {
				select {
				case <-m.stop:
					return
				default:
				}
				before := time.Now()
				term, ok := n.e.leading()
				after := time.Now()
				m.mu.Lock()
				switch {
				case !ok:
					cur = -1
				case cur >= 0 && m.spans[cur].term == term:
					m.spans[cur].last = after
				default:
					m.spans = append(m.spans, leadSpan{n.name, term, before, after})
					cur = len(m.spans) - 1
				}
				m.mu.Unlock()
				time.Sleep(time.Millisecond)
			}
		})
	}
	t.Cleanup(func() {
		m.close()
		for i, a := range m.spans {
			for _, b := range m.spans[i+1:] {
				if a.node != b.node && a.first.Before(b.last) && b.first.Before(a.last) {
					t.Errorf("%s (term %d, %v to %v) and %s (term %d, %v to %v) led at once",
						a.node, a.term, a.first.Format("05.000"), a.last.Format("05.000"),
						b.node, b.term, b.first.Format("05.000"), b.last.Format("05.000"))
				}
			}
		}
	})
	return m
}

func (m *leadMonitor) close() {
	select {
	case <-m.stop:
	default:
		close(m.stop)
	}
	m.wg.Wait()
}

// spansOf returns the spans recorded for node so far.
func (m *leadMonitor) spansOf(node string) []leadSpan {
	m.mu.Lock()
	defer m.mu.Unlock()
	var s []leadSpan
	for _, sp := range m.spans {
		if sp.node == node {
			s = append(s, sp)
		}
	}
	return s
}

// pollUntil polls cond every 5 ms for up to d.
func pollUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// holdsFor fails unless cond holds at every poll for d.
func holdsFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if !cond() {
			t.Fatalf("%s stopped holding", what)
		}
	}
}

func TestAdvertisedRepl(t *testing.T) {
	for _, c := range []struct{ advertise, repl, want string }{
		{"10.0.0.1:5672", "10.0.0.1:25672", "10.0.0.1:25672"},
		{"10.0.0.1:5672", ":25672", "10.0.0.1:25672"},
		{"node1.example:5672", "0.0.0.0:25672", "node1.example:25672"},
		{"[fd00::1]:5672", "[::]:25672", "[fd00::1]:25672"},
		{"10.0.0.1:5672", "10.0.0.2:25672", "10.0.0.2:25672"},
		{"10.0.0.1:5672", "repl.example:25672", "repl.example:25672"},
	} {
		if got := advertisedRepl(c.advertise, c.repl); got != c.want {
			t.Errorf("advertisedRepl(%q, %q) = %q, want %q", c.advertise, c.repl, got, c.want)
		}
	}
}

func TestElectionConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		endpoints, cluster, name string
		ttl                      time.Duration
	}{
		{"http://127.0.0.1:1", "", "a", 0},
		{"http://127.0.0.1:1", "c", "", 0},
		{"http://127.0.0.1:1", "c", "a", 500 * time.Millisecond},
		{"", "c", "a", 0},
	} {
		if _, err := newElection(tc.endpoints, tc.cluster, tc.name, "", tc.ttl); err == nil {
			t.Errorf("newElection(%q, %q, %q, %v): no error", tc.endpoints, tc.cluster, tc.name, tc.ttl)
		}
	}
	e, err := newElection("http://127.0.0.1:1", "c", "a", "", 0)
	if err != nil || e.ttl != 5*time.Second || e.leaderKey != "/amqp-go/c/leader" {
		t.Fatalf("defaults: %+v %v", e, err)
	}
	if !(logPosition{1, 9}).less(logPosition{2, 0}) || !(logPosition{2, 1}).less(logPosition{2, 2}) ||
		(logPosition{2, 2}).less(logPosition{2, 2}) || (logPosition{3, 0}).less(logPosition{2, 9}) {
		t.Fatal("logPosition.less")
	}
}

// TestElectionSingle: a lone node becomes leader; its term is the leader key's create
// revision, and it reports itself on the changes channel.
func TestElectionSingle(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	n := startNode(t, etcd.url, "single", "a", logPosition{})
	leader, term := waitLeader(t, n)
	if leader != n || term <= 0 {
		t.Fatalf("leader %s term %d", leader.name, term)
	}
	select {
	case l := <-n.e.changes:
		if l != (leaderInfo{name: "a", addr: "a.test:5672", term: term, self: true}) {
			t.Fatalf("reported %+v", l)
		}
	case <-time.After(time.Second):
		t.Fatal("nothing reported")
	}
	c := newTestEtcdClient(t, etcd.url, time.Second)
	kv, _, err := c.get(context.Background(), "/amqp-go/single/leader")
	if err != nil || kv == nil || kv.CreateRevision != term || string(kv.Value) != `{"name":"a","addr":"a.test:5672","pos":{"term":0,"seq":0}}` {
		t.Fatalf("leader key %+v %v", kv, err)
	}
	// It stays leader across keepalives.
	holdsFor(t, testTTL, "leadership", func() bool { tm, ok := n.e.leading(); return ok && tm == term })
	n.stop()
	if _, ok := n.e.leading(); ok {
		t.Fatal("leading after run returned")
	}
	if kv, _, _ := c.get(context.Background(), "/amqp-go/single/leader"); kv != nil {
		t.Fatalf("leader key left after resigning: %+v", kv)
	}
}

// TestElectionOneLeader: of three candidates exactly one leads, the others follow it, and
// when it resigns another takes over at once, in a later term.
func TestElectionOneLeader(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	nodes := []*testNode{
		startNode(t, etcd.url, "three", "a", logPosition{}),
		startNode(t, etcd.url, "three", "b", logPosition{}),
		startNode(t, etcd.url, "three", "c", logPosition{}),
	}
	monitorLeading(t, nodes...)
	leader, term := waitLeader(t, nodes...)
	leader.stop()
	resigned := time.Now()
	var rest []*testNode
	for _, n := range nodes {
		if n != leader {
			rest = append(rest, n)
		}
	}
	next, term2 := waitLeader(t, rest...)
	if d := time.Since(resigned); d > testTTL/2 {
		t.Errorf("takeover took %v after the leader resigned", d)
	}
	if term2 <= term {
		t.Fatalf("term %d after term %d", term2, term)
	}
	t.Logf("%s led in term %d, then %s in term %d", leader.name, term, next.name, term2)
}

// TestElectionPartitionedLeader: a leader cut off from etcd stops leading before its TTL is
// up, and before another node takes over; once the partition heals it follows.
func TestElectionPartitionedLeader(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	to := etcd.url[len("http://"):]
	proxies := map[string]*testProxy{}
	var nodes []*testNode
	for _, name := range []string{"a", "b", "c"} {
		proxies[name] = startProxy(t, to)
		nodes = append(nodes, startNode(t, proxies[name].url(), "part", name, logPosition{}))
	}
	mon := monitorLeading(t, nodes...)
	leader, term := waitLeader(t, nodes...)
	cut := time.Now()
	proxies[leader.name].cut.Store(true)
	pollUntil(t, testTTL, "the cut-off leader to stop leading", func() bool { _, ok := leader.e.leading(); return !ok })
	var rest []*testNode
	for _, n := range nodes {
		if n != leader {
			rest = append(rest, n)
		}
	}
	_, term2 := waitLeader(t, rest...)
	if term2 <= term {
		t.Fatalf("term %d after term %d", term2, term)
	}
	spans := mon.spansOf(leader.name)
	last := spans[len(spans)-1].last
	if d := last.Sub(cut); d >= testTTL {
		t.Fatalf("cut-off leader still led %v after the cut", d)
	}
	t.Logf("cut-off leader stopped %v after the cut", last.Sub(cut).Round(time.Millisecond))
	proxies[leader.name].cut.Store(false)
	waitLeader(t, nodes...)
}

// TestElectionEtcdPaused: with etcd stopped (SIGSTOP) nobody can renew; the leader stops
// leading within its TTL and nobody leads until etcd continues, when a leader is elected in
// a later term.
func TestElectionEtcdPaused(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	nodes := []*testNode{
		startNode(t, etcd.url, "pause", "a", logPosition{}),
		startNode(t, etcd.url, "pause", "b", logPosition{}),
	}
	monitorLeading(t, nodes...)
	leader, term := waitLeader(t, nodes...)
	etcd.signal("STOP")
	paused := time.Now()
	pollUntil(t, testTTL, "the leader to stop leading", func() bool { _, ok := leader.e.leading(); return !ok })
	t.Logf("leader stopped %v after etcd did", time.Since(paused).Round(time.Millisecond))
	holdsFor(t, testTTL/2, "no leader while etcd is stopped", func() bool {
		for _, n := range nodes {
			if _, ok := n.e.leading(); ok {
				return false
			}
		}
		return true
	})
	etcd.signal("CONT")
	if _, term2 := waitLeader(t, nodes...); term2 <= term {
		t.Fatalf("term %d after term %d", term2, term)
	}
}

// TestElectionEtcdRestart: etcd killed and restarted on the same data: a leader is elected
// again, in a later term, without waiting for the old leader's lease to expire.
func TestElectionEtcdRestart(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	nodes := []*testNode{
		startNode(t, etcd.url, "restart", "a", logPosition{}),
		startNode(t, etcd.url, "restart", "b", logPosition{}),
	}
	monitorLeading(t, nodes...)
	_, term := waitLeader(t, nodes...)
	etcd.kill()
	// Down for longer than the leader's deadline, so that it must step down.
	pollUntil(t, testTTL, "no leader while etcd is down", func() bool {
		for _, n := range nodes {
			if _, ok := n.e.leading(); ok {
				return false
			}
		}
		return true
	})
	etcd.start()
	restarted := time.Now()
	if _, term2 := waitLeader(t, nodes...); term2 <= term {
		t.Fatalf("term %d after term %d", term2, term)
	}
	// etcd renewed the old leader's lease when it restarted; the old leader revoked it
	// rather than leave the others to wait until it expired.
	if d := time.Since(restarted); d >= testTTL {
		t.Errorf("a leader only %v after etcd restarted", d)
	}
	t.Logf("a leader %v after etcd restarted", time.Since(restarted).Round(time.Millisecond))
}

// TestElectionEndpointFailover: with two endpoints, cutting the one in use moves the leader
// to the other without a break in its leadership.
func TestElectionEndpointFailover(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	to := etcd.url[len("http://"):]
	p1, p2 := startProxy(t, to), startProxy(t, to)
	n := startNode(t, p1.url()+","+p2.url(), "failover", "a", logPosition{})
	mon := monitorLeading(t, n)
	_, term := waitLeader(t, n)
	p1.cut.Store(true)
	holdsFor(t, testTTL+testTTL/2, "leadership through the failover", func() bool { tm, ok := n.e.leading(); return ok && tm == term })
	mon.close()
	if spans := mon.spansOf("a"); len(spans) != 1 {
		t.Fatalf("leadership broke: %+v", spans)
	}
}

// TestElectionNewestPositionWins: among candidates in sync the one with the newest log
// position wins, a later term before a higher sequence; when it resigns, the next newest.
func TestElectionNewestPositionWins(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	putISR(t, etcd.url, "pos", 2, "a", "b", "c")
	nodes := []*testNode{
		startNode(t, etcd.url, "pos", "a", logPosition{Term: 1, Seq: 5}),
		startNode(t, etcd.url, "pos", "b", logPosition{Term: 2, Seq: 1}),
		startNode(t, etcd.url, "pos", "c", logPosition{Term: 1, Seq: 9}),
	}
	monitorLeading(t, nodes...)
	leader, _ := waitLeader(t, nodes...)
	if leader.name != "b" {
		t.Fatalf("%s leads, want b (position 2/1)", leader.name)
	}
	leader.stop()
	if leader, _ = waitLeader(t, nodes[0], nodes[2]); leader.name != "c" {
		t.Fatalf("%s leads, want c (position 1/9)", leader.name)
	}
}

// TestElectionOutOfSync: a node out of sync never stands, however new its position, and
// withdraws its candidate key; back in sync, it stands.
func TestElectionOutOfSync(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	putISR(t, etcd.url, "sync", 9, "a", "b")
	a := startNode(t, etcd.url, "sync", "a", logPosition{Term: 1, Seq: 1})
	b := startNode(t, etcd.url, "sync", "b", logPosition{Term: 9, Seq: 9})
	c := newTestEtcdClient(t, etcd.url, time.Second)
	bKey := "/amqp-go/sync/candidates/b"
	pollUntil(t, testTTL, "b's candidate key", func() bool { kv, _, _ := c.get(context.Background(), bKey); return kv != nil })
	b.setInSync(false)
	pollUntil(t, testTTL, "b to withdraw", func() bool { kv, _, _ := c.get(context.Background(), bKey); return kv == nil })
	monitorLeading(t, a, b)
	if leader, _ := waitLeader(t, a, b); leader != a {
		t.Fatalf("%s leads, want a", leader.name)
	}
	a.stop()
	noLeader := func() bool { _, ok := b.e.leading(); return !ok && b.e.leaderNow() == leaderInfo{} }
	pollUntil(t, testTTL, "b to see a resign", noLeader)
	holdsFor(t, testTTL, "b not standing while out of sync", noLeader)
	b.setInSync(true)
	waitLeader(t, b)
}

// Once a cluster has an in-sync record, only the nodes it names stand, whatever their
// positions: one left out (it fell behind, or never caught up) never leads, and a node
// whose log never followed anyone no longer counts as a new cluster's.
func TestElectionInSyncRecord(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	putISR(t, etcd.url, "isr", 7, "a", "c")
	nodes := []*testNode{
		startNode(t, etcd.url, "isr", "a", logPosition{Term: 7, Seq: 5}),
		startNode(t, etcd.url, "isr", "b", logPosition{Term: 7, Seq: 9}), // newer, left out
		startNode(t, etcd.url, "isr", "c", logPosition{Term: 7, Seq: 3}),
		startNode(t, etcd.url, "isr", "d", logPosition{}), // a new node
	}
	monitorLeading(t, nodes...)
	if leader, _ := waitLeader(t, nodes...); leader.name != "a" {
		t.Fatalf("%s leads, want a (named, newest of those named)", leader.name)
	}
	nodes[0].stop()
	if leader, _ := waitLeader(t, nodes[1:]...); leader.name != "c" {
		t.Fatalf("%s leads, want c", leader.name)
	}
	nodes[2].stop()
	noLeader := func() bool {
		for _, n := range []*testNode{nodes[1], nodes[3]} {
			if _, ok := n.e.leading(); ok || n.e.leaderNow() != (leaderInfo{}) {
				return false
			}
		}
		return true
	}
	pollUntil(t, testTTL, "b and d to see c resign", noLeader)
	holdsFor(t, 2*testTTL, "no node the record leaves out standing", noLeader)
}

// TestElectionNoRecord: without an in-sync record (etcd lost its data, or an operator
// deleted it), neither a node whose log followed a leader nor a node with an empty log
// stands, the empty one deferring to the other's newer position; once an operator names
// the first, it leads.
func TestElectionNoRecord(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	nodes := []*testNode{
		startNode(t, etcd.url, "norec", "a", logPosition{Term: 7, Seq: 5}),
		startNode(t, etcd.url, "norec", "d", logPosition{}), // a new node, which would wipe a's log
	}
	monitorLeading(t, nodes...)
	holdsFor(t, 2*testTTL, "no node standing without a record", func() bool {
		for _, n := range nodes {
			if _, ok := n.e.leading(); ok {
				return false
			}
		}
		return true
	})
	putISR(t, etcd.url, "norec", 0, "a")
	if leader, _ := waitLeader(t, nodes...); leader.name != "a" {
		t.Fatalf("%s leads, want a (named by the operator)", leader.name)
	}
}

// TestElectionRecordChangedWhileStanding: the in-sync record changes between a candidate's
// reading it and its transaction (another leader came and went meanwhile, without it):
// the transaction fails, and the candidate, no longer named, does not lead.
func TestElectionRecordChangedWhileStanding(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	putISR(t, etcd.url, "toctou", 7, "b")
	other := newTestEtcdClient(t, etcd.url, time.Second)
	candidates := base64.StdEncoding.EncodeToString([]byte("/amqp-go/toctou/candidates/"))
	var changed atomic.Bool
	b := startNodeWith(t, etcd.url, "toctou", "b", logPosition{Term: 7, Seq: 5}, func(e *election) {
		next := e.etcd.hc.Transport
		e.etcd.hc.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
			// The candidates are read after the record, just before the transaction.
			if r.URL.Path == "/v3/kv/range" && !changed.Load() {
				body, _ := io.ReadAll(r.Body)
				r.Body = io.NopCloser(bytes.NewReader(body))
				if strings.Contains(string(body), candidates) {
					rec, _ := json.Marshal(isrRecord{Term: 9, Members: []string{"x"}})
					if _, err := other.put(r.Context(), "/amqp-go/toctou/insync", rec, 0); err != nil {
						t.Error(err)
					}
					changed.Store(true)
				}
			}
			return next.RoundTrip(r)
		})
	})
	pollUntil(t, 3*testTTL, "b to stand", changed.Load)
	holdsFor(t, 2*testTTL, "b, no longer named, not leading", func() bool {
		_, ok := b.e.leading()
		return !ok
	})
}

// TestElectionPublishISRCompareAndSwap: a write of the in-sync record that reaches etcd
// late (an attempt that timed out at the leader, which went on and wrote a newer set)
// fails its comparison instead of putting the older set back.
func TestElectionPublishISRCompareAndSwap(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	var capture atomic.Bool
	var captured []byte
	a := startNodeWith(t, etcd.url, "cas", "a", logPosition{}, func(e *election) {
		next := e.etcd.hc.Transport
		e.etcd.hc.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
			if r.URL.Path == "/v3/kv/txn" && capture.CompareAndSwap(true, false) {
				captured, _ = io.ReadAll(r.Body)
				r.Body = io.NopCloser(bytes.NewReader(captured))
			}
			return next.RoundTrip(r)
		})
	})
	_, term := waitLeader(t, a)
	ctx := context.Background()
	capture.Store(true)
	if err := a.e.publishISR(ctx, term, []string{"old"}); err != nil || captured == nil {
		t.Fatalf("publish: %v (captured %d octets)", err, len(captured))
	}
	if err := a.e.publishISR(ctx, term, []string{"new"}); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(etcd.url+"/v3/kv/txn", "application/json", bytes.NewReader(captured)) // the late one
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	kv, _, err := newTestEtcdClient(t, etcd.url, time.Second).get(ctx, "/amqp-go/cas/insync")
	if err != nil || kv == nil {
		t.Fatalf("record: %v, %v", kv, err)
	}
	var rec isrRecord
	if err := json.Unmarshal(kv.Value, &rec); err != nil || !slices.Equal(rec.Members, []string{"a", "new"}) {
		t.Fatalf("record %s (%v) after the late write, want it naming a and new", kv.Value, err)
	}
}

// roundTripFunc is an http.RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestElectionFlappingPartitions cuts and heals the nodes' links to etcd at random for a
// while: at no time do two nodes lead, and once every link is healed one leads again.
func TestElectionFlappingPartitions(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	to := etcd.url[len("http://"):]
	var nodes []*testNode
	var proxies []*testProxy
	for _, name := range []string{"a", "b", "c"} {
		p := startProxy(t, to)
		proxies = append(proxies, p)
		nodes = append(nodes, startNode(t, p.url(), "flap", name, logPosition{}))
	}
	mon := monitorLeading(t, nodes...)
	waitLeader(t, nodes...)
	rng := rand.New(rand.NewPCG(13, 13))
	for end := time.Now().Add(3 * testTTL); time.Now().Before(end); {
		p := proxies[rng.IntN(len(proxies))]
		p.cut.Store(!p.cut.Load())
		time.Sleep(time.Duration(100+rng.IntN(400)) * time.Millisecond)
	}
	for _, p := range proxies {
		p.cut.Store(false)
	}
	waitLeader(t, nodes...)
	mon.mu.Lock()
	terms := map[int64]bool{}
	for _, s := range mon.spans {
		terms[s.term] = true
	}
	mon.mu.Unlock()
	t.Logf("%d terms", len(terms))
}

// clusterServer is a clustered Server serving on 127.0.0.1 in a test.
type clusterServer struct {
	srv  *Server
	addr string     // AMQP address, advertised
	done chan error // Serve's result
}

// startClusterServer starts node name of cluster through etcd at url, with secret, on its
// own data directory; it shuts down when the test ends.
func startClusterServer(t *testing.T, url, name, secret string) *clusterServer {
	t.Helper()
	return startClusterServerWith(t, url, name, secret, nil)
}

// startClusterServerWith is startClusterServer with the configuration changed by adjust.
func startClusterServerWith(t *testing.T, url, name, secret string, adjust func(*Config)) *clusterServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cs := &clusterServer{addr: ln.Addr().String(), done: make(chan error, 1)}
	cfg := Config{DataDir: t.TempDir(), Logger: walQuietLogger(), Cluster: &ClusterConfig{
		Etcd: url, Name: "wire", NodeName: name, AdvertiseAddr: cs.addr, ReplicationAddr: freeAddr(t),
		Secret: secret, MinInSync: 1, TTL: testTTL,
	}}
	if adjust != nil {
		adjust(&cfg)
	}
	cs.srv = NewServer(cfg)
	go func() { cs.done <- cs.srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cs.srv.Shutdown(ctx)
		<-cs.done
	})
	return cs
}

// url is the server's AMQP URL, as guest.
func (cs *clusterServer) url() string { return "amqp://guest:guest@" + cs.addr + "/" }

// stop shuts the server down and returns what Serve returned; the cleanup stops it again.
func (cs *clusterServer) stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cs.srv.Shutdown(ctx)
	err := <-cs.done
	cs.done <- err
	return err
}

// fillQueue declares the durable queue "q" on cs and publishes replBody(0) to
// replBody(n-1) to it, each confirmed.
func fillQueue(t *testing.T, cs *clusterServer, n int) {
	t.Helper()
	conn := dial(t, cs.url())
	declareQueues(t, conn, true, "q")
	conn.Close()
	publishBodies(t, cs.url(), "q", 0, n)
}

// leads reports whether the server leads and serves clients.
func (cs *clusterServer) leads() bool {
	cs.srv.mu.Lock()
	n := cs.srv.cluster
	cs.srv.mu.Unlock()
	return n != nil && n.serving()
}

// waitClusterLeader waits until exactly one of servers leads, and returns it.
func waitClusterLeader(t *testing.T, servers ...*clusterServer) *clusterServer {
	t.Helper()
	var leader *clusterServer
	pollUntil(t, 15*time.Second, "a leader", func() bool {
		leader = nil
		for _, cs := range servers {
			if cs.leads() {
				if leader != nil {
					return false
				}
				leader = cs
			}
		}
		return leader != nil
	})
	return leader
}

// Three clustered servers: one leads; the others refuse clients with 320 naming it;
// messages confirmed by the leader (with one in-sync follower holding each) survive its
// stop, on the follower that takes over.
func TestClusterFailover(t *testing.T) {
	e := startEtcd(t)
	servers := []*clusterServer{
		startClusterServer(t, e.url, "n1", "s3cret"),
		startClusterServer(t, e.url, "n2", "s3cret"),
		startClusterServer(t, e.url, "n3", "s3cret"),
	}
	leader := waitClusterLeader(t, servers...)
	var followers []*clusterServer
	for _, cs := range servers {
		if cs != leader {
			followers = append(followers, cs)
		}
	}
	// amqp091-go reports the close as such, or, when its reader has already ended as it
	// looks, as 503 "unexpected command received": never a connection.
	want := "CONNECTION_FORCED - not the leader; leader is " + leader.addr
	refused, other := 0, 0
	pollUntil(t, 10*time.Second, "a follower refusing with the leader's address", func() bool {
		c, err := amqp091.Dial("amqp://guest:guest@" + followers[0].addr + "/")
		var ae *amqp091.Error
		if !errors.As(err, &ae) {
			if c != nil {
				c.Close()
			}
			t.Fatalf("dial a follower: %v, want a connection error", err)
		}
		switch {
		case ae.Code == replyConnectionForced && ae.Reason == want:
			refused++
		case ae.Code == replyConnectionForced || ae.Code == amqp091.CommandInvalid:
			other++
		default:
			t.Fatalf("dial a follower: %v, want %d", ae, replyConnectionForced)
		}
		return refused >= 3
	})
	t.Logf("follower refused %d times naming the leader, %d times otherwise", refused, other)

	// A standby's management API answers 503 naming the leader, but for health checks;
	// is-in-service and is-leader say it serves no client.
	for _, c := range []struct {
		srv        *Server
		path       string
		wantStatus int
	}{
		{followers[0].srv, "/api/queues", http.StatusServiceUnavailable},
		{followers[0].srv, "/api/overview", http.StatusServiceUnavailable},
		{followers[0].srv, "/api/health/checks/is-in-service", http.StatusServiceUnavailable},
		{followers[0].srv, "/api/health/checks/is-leader", http.StatusServiceUnavailable},
		{followers[0].srv, "/api/health/checks/alarms", http.StatusOK},
		{leader.srv, "/api/queues", http.StatusOK},
		{leader.srv, "/api/health/checks/is-in-service", http.StatusOK},
		{leader.srv, "/api/health/checks/is-leader", http.StatusOK},
	} {
		req := httptest.NewRequest("GET", c.path, nil)
		req.RemoteAddr = "127.0.0.1:1" // guest logs in from loopback only
		req.SetBasicAuth("guest", "guest")
		rec := httptest.NewRecorder()
		c.srv.ManagementHandler().ServeHTTP(rec, req)
		if rec.Code != c.wantStatus {
			t.Errorf("GET %s on %s: %d %s, want %d", c.path, map[bool]string{true: "the leader", false: "a follower"}[c.srv == leader.srv], rec.Code, rec.Body, c.wantStatus)
		}
		if c.wantStatus == http.StatusServiceUnavailable && !strings.Contains(rec.Body.String(), leader.addr) {
			t.Errorf("GET %s on a follower: %s, want the leader's address %s", c.path, rec.Body, leader.addr)
		}
	}

	const n = 200
	ec := newTestEtcdClient(t, e.url, time.Second)
	_, rev0, err := ec.get(context.Background(), "probe")
	if err != nil {
		t.Fatal(err)
	}
	fillQueue(t, leader, n)
	// Publishing writes nothing to etcd: positions are published only when no one leads.
	if _, rev, err := ec.get(context.Background(), "probe"); err != nil || rev-rev0 > 2 {
		t.Errorf("etcd went from revision %d to %d while publishing (%v)", rev0, rev, err)
	}

	// /api/cluster: the leader lists both followers, at least one in sync after the
	// confirms; a follower names the leader and its term.
	status := func(srv *Server) map[string]any {
		req := httptest.NewRequest("GET", "/api/cluster", nil)
		req.RemoteAddr = "127.0.0.1:1"
		req.SetBasicAuth("guest", "guest")
		rec := httptest.NewRecorder()
		srv.ManagementHandler().ServeHTTP(rec, req)
		var st map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &st); rec.Code != http.StatusOK || err != nil {
			t.Fatalf("GET /api/cluster: %d %s", rec.Code, rec.Body)
		}
		return st
	}
	st := status(leader.srv)
	followerList, _ := st["followers"].([]any)
	inSync := 0
	for _, f := range followerList {
		if f.(map[string]any)["in_sync"] == true {
			inSync++
		}
	}
	if st["leading"] != true || len(followerList) != 2 || inSync < 1 {
		t.Errorf("the leader's /api/cluster: %v, want leading with 2 followers, one in sync at least", st)
	}
	isr, _ := st["in_sync_record"].(map[string]any)
	members, _ := isr["members"].([]any)
	if len(members) < 2 || members[0] != st["node"] || st["position"] == nil {
		t.Errorf("the leader's /api/cluster: %v, want its position and an in-sync record naming it and a follower", st)
	}
	// The same in the leader's metrics.
	rec := httptest.NewRecorder()
	leader.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, want := range []string{"amqpgo_cluster_leading 1\n", "amqpgo_cluster_followers_in_sync "} {
		if !strings.Contains(rec.Body.String(), want) {
			t.Errorf("the leader's metrics lack %q", want)
		}
	}
	// A follower's metrics: the node and the cluster, not its empty broker.
	rec = httptest.NewRecorder()
	followers[0].srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if m := rec.Body.String(); !strings.Contains(m, "amqpgo_cluster_leading 0\n") || !strings.Contains(m, "rabbitmq_identity_info{") || strings.Contains(m, "rabbitmq_queues ") {
		t.Errorf("a follower's metrics: want the node's and the cluster's only, got\n%s", m)
	}
	st = status(followers[0].srv)
	if l, _ := st["leader"].(map[string]any); st["leading"] != false || l["addr"] != leader.addr || l["term"].(float64) <= 0 {
		t.Errorf("a follower's /api/cluster: %v, want not leading, the leader at %s with a term", st, leader.addr)
	}

	if err := leader.stop(); err != ErrServerClosed {
		t.Fatalf("leader's Serve: %v", err)
	}
	start := time.Now()
	next := waitClusterLeader(t, followers...)
	t.Logf("new leader %s after %v", next.addr, time.Since(start))

	expectReplBodies(t, next.url(), "q", n)
}

// A leader cut off from etcd (no resign: its lease runs out) fails its log and stops
// itself, Serve returning errNotLeader; the follower takes over with every confirmed
// message.
func TestClusterLeaderCutOff(t *testing.T) {
	e := startEtcd(t)
	to := e.url[len("http://"):]
	proxies := []*testProxy{startProxy(t, to), startProxy(t, to)}
	servers := []*clusterServer{
		startClusterServer(t, proxies[0].url(), "n1", "s3cret"),
		startClusterServer(t, proxies[1].url(), "n2", "s3cret"),
	}
	leader := waitClusterLeader(t, servers...)
	i := slices.Index(servers, leader)
	follower := servers[1-i]
	const n = 100
	fillQueue(t, leader, n)

	proxies[i].cut.Store(true)
	select {
	case err := <-leader.done:
		if !errors.Is(err, errNotLeader) {
			t.Fatalf("cut-off leader's Serve: %v, want errNotLeader", err)
		}
		leader.done <- err // for the cleanup
	case <-time.After(2 * testTTL):
		t.Fatal("cut-off leader still serves")
	}
	waitClusterLeader(t, follower)

	expectReplBodies(t, follower.url(), "q", n)
}

// A node whose secret is not the leader's cannot follow it: it stops, Serve returning
// the authentication error, and the leader serves on.
func TestClusterWrongSecret(t *testing.T) {
	e := startEtcd(t)
	leader := startClusterServer(t, e.url, "n1", "s3cret")
	waitClusterLeader(t, leader)
	other := startClusterServer(t, e.url, "n2", "wrong")
	select {
	case err := <-other.done:
		if !errors.Is(err, errReplAuth) {
			t.Fatalf("Serve: %v, want errReplAuth", err)
		}
		other.done <- err // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("a node with a wrong secret still runs")
	}
	if !leader.leads() {
		t.Fatal("the leader stopped leading")
	}
}

// With amqps configured, replication runs over TLS with the same certificate, and with
// -tls-verify required the certificates authenticate the nodes without a shared secret:
// messages confirmed through a follower survive the leader's stop.
func TestClusterTLS(t *testing.T) {
	e := startEtcd(t)
	pki := newTestPKI(t)
	files := &TLSConfig{CertFile: pki.certFile, KeyFile: pki.keyFile, CAFile: pki.caFile, Verify: "required"}
	withTLS := func(c *Config) { c.TLS = files }
	servers := []*clusterServer{
		startClusterServerWith(t, e.url, "n1", "", withTLS),
		startClusterServerWith(t, e.url, "n2", "", withTLS),
	}
	leader := waitClusterLeader(t, servers...)
	follower := servers[1-slices.Index(servers, leader)]
	const n = 100
	fillQueue(t, leader, n) // each confirmed by the follower, over TLS
	leader.stop()
	waitClusterLeader(t, follower)
	expectReplBodies(t, follower.url(), "q", n)

	// Without client certificates required, a node needs its secret.
	plain := NewServer(Config{DataDir: t.TempDir(), TLS: &TLSConfig{CertFile: pki.certFile, KeyFile: pki.keyFile},
		Cluster: &ClusterConfig{Etcd: e.url, Name: "wire", NodeName: "n3", AdvertiseAddr: "127.0.0.1:1", ReplicationAddr: "127.0.0.1:2"}})
	if _, err := startClusterNode(plain); err == nil || !strings.Contains(err.Error(), "secret") {
		t.Fatalf("a node with TLS but no secret nor required client certificates: %v", err)
	}
}

// A leader without the followers -min-insync asks for holds its confirms and says so in
// its log after a few seconds; once a follower is in sync the confirm arrives and it says
// that too.
func TestClusterShortOfFollowers(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	logs := &lockedBuffer{}
	leader := startClusterServerWith(t, e.url, "n1", "s3cret", func(c *Config) { c.Logger = logs.logger() })
	waitClusterLeader(t, leader)
	follower := startClusterServer(t, e.url, "n2", "s3cret")
	ch := openChannel(t, dial(t, leader.url()))
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("q", true, false, false, false, nil); err != nil { // with the follower
		t.Fatal(err)
	}
	follower.stop()
	dc, err := ch.PublishWithDeferredConfirm("", "q", false, false, amqp091.Publishing{DeliveryMode: amqp091.Persistent, Body: []byte("x")})
	if err != nil {
		t.Fatal(err)
	}
	pollUntil(t, shortGrace+5*time.Second, "the warning", func() bool {
		return strings.Contains(logs.String(), "fewer followers in sync than -min-insync")
	})
	if isDone(dc) {
		t.Fatal("confirmed without a follower in sync")
	}
	startClusterServer(t, e.url, "n3", "s3cret")
	select {
	case <-dc.Done():
		if !dc.Acked() {
			t.Fatal("nacked")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no confirm once a follower joined")
	}
	pollUntil(t, 5*time.Second, "the all-clear", func() bool {
		return strings.Contains(logs.String(), "enough followers in sync again")
	})
}

// With -min-insync auto (amqpd's default) a cluster of one confirms alone; once a
// follower has been in sync, confirms wait for it, and when it stops for good the leader
// confirms alone again.
func TestClusterMinInSyncAuto(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	auto := func(c *Config) { c.Cluster.MinInSync = MinInSyncAuto }
	leader := startClusterServerWith(t, e.url, "n1", "s3cret", auto)
	waitClusterLeader(t, leader)
	conn := dial(t, leader.url())
	declareQueues(t, conn, true, "q")
	c := newConfirmChannel(t, conn)
	c.publish("", "q", false, persistentMsg("a cluster of one"))
	c.wait()

	follower := startClusterServerWith(t, e.url, "n2", "s3cret", auto)
	leader.srv.mu.Lock()
	rs := leader.srv.cluster.rs // set before the node serves
	leader.srv.mu.Unlock()
	pollUntil(t, 10*time.Second, "the follower in sync", func() bool {
		st := rs.status()
		return len(st) == 1 && st[0].inSync
	})
	c.publish("", "q", false, persistentMsg("with the follower"))
	c.wait()
	follower.stop()
	c.publish("", "q", false, persistentMsg("alone again"))
	c.wait()
}

// A cluster stopped whole and started again elects a leader among the nodes its in-sync
// record names, with every message confirmed before.
func TestClusterFullRestart(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	dirs := []string{t.TempDir(), t.TempDir()}
	start := func() []*clusterServer {
		var servers []*clusterServer
		for i, dir := range dirs {
			servers = append(servers, startClusterServerWith(t, e.url, fmt.Sprintf("n%d", i+1), "s3cret", func(c *Config) { c.DataDir = dir }))
		}
		return servers
	}
	servers := start()
	const n = 100
	fillQueue(t, waitClusterLeader(t, servers...), n)
	for _, cs := range servers {
		cs.stop()
	}

	servers = start()
	expectReplBodies(t, waitClusterLeader(t, servers...).url(), "q", n)
}
