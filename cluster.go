package amqp

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Leader election for a cluster of brokers, through etcd's HTTP gateway (etcd.go), and the
// clusterNode that drives a Server by it (at the end of this file). The data directory's
// replication to followers is in replication.go.
//
// Each node runs an election and holds an etcd lease of the cluster's TTL (default 5 s),
// renewed every TTL/3. Its keys, under /amqp-go/<cluster>/, are attached to that lease, so
// they vanish when the node stops renewing:
//
//	leader             {"name", "addr", "repl"}         the leader, created by a transaction
//	candidates/<name>  {"name", "addr", "repl", "pos"}  a node that stands while no one leads
//
// and one key is not, so that it outlives its leader:
//
//	insync             {"term", "members"}              the leader and its followers in sync
//
// Term. The leader key is created only if it does not exist (create revision 0); its create
// revision is the leader's term, which grows with every new leader. Replication carries the
// term, and a follower refuses a term older than one it has seen.
//
// Fencing by time. A keepalive that etcd answers renewed the lease after the request was
// sent, so the lease lives at least until sent + TTL by etcd's clock, and no other node can
// take the leader key before then. The node counts itself leader only until
// sent + TTL - TTL/4 for the last keepalive answered: leading checks the clock and does not
// wait for an error, so a leader cut off from etcd stops a quarter TTL before another can
// win. The margin covers the time between asking leading and acting on the answer, and
// clock rates that differ slightly; etcd only ever lengthens a lease (on restart or a
// change of etcd leader), never shortens it. A term lost is never resumed: the node gives up
// the lease and starts again with a new one. Each attempt at an etcd endpoint may take
// TTL/4, so a keepalive that hangs on one endpoint reaches the next before the deadline.
//
// Stopping. When run's context is done the node ends its term first, then deletes the
// leader key if it is still that term's (compare and delete) and revokes its lease, so
// another node stands at once. A lease given up while etcd was unreachable is revoked when
// it answers again: etcd renews every lease when it restarts, and the old leader key would
// otherwise hold up the next election for a TTL.
//
// Who stands. The leader writes the in-sync key (publishISR, a transaction on its term)
// whenever its set of followers in sync changes, and its log completes nothing, so
// confirms nothing, until the key says what it counts on (replication.go): every
// confirmed record is on the leader and on -min-insync of the nodes the key names. Only
// these nodes may stand; without a record (a new cluster), only nodes whose log never
// followed a leader, and not while a node whose log did is a candidate. A node eligible publishes its log position under its candidate key
// while no one leads (never under a leader, so a busy cluster writes nothing to etcd). A
// candidate stands TTL/3 after it first published, so that the others have published
// too, unless another candidate's key shows a position newer than its own
// (logPosition.less); equal positions all stand and the transaction picks one. The
// transaction also requires that no candidate key changed since the candidates were read,
// so a candidate that appears or advances meanwhile makes it fail and the decision is
// taken again. A node left out of the key (it fell behind, or its link died) never
// stands, even with a newer log: it may lack records confirmed without it. If every node
// the key names is gone for good, the cluster waits for an operator, who may put a record
// naming survivors (and lose what only the others held).
//
// Watching. A watch on the cluster's prefix wakes the node on any change, and it also looks
// again TTL/3 after its last look; each decision is made from fresh reads, never from the
// watch's events. The watch only makes reaction fast (a resigned leader is replaced within
// TTL/3); if it stalls silently, nodes still react within TTL/3 more. A watch is set up
// again when it ends, and when a call fails on its endpoint.

// logPosition is how far a node's log reaches: the term of its last record, then that
// record's sequence.
type logPosition struct {
	Term uint64 `json:"term"`
	Seq  uint64 `json:"seq"`
}

// less reports whether p is older than q: an older term, or the same term and a lower seq.
func (p logPosition) less(q logPosition) bool {
	return p.Term < q.Term || p.Term == q.Term && p.Seq < q.Seq
}

// leaderInfo is who leads the cluster, as one node last saw it.
type leaderInfo struct {
	name, addr string // the leader's node name and advertise address; empty if none is known
	repl       string // the leader's replication address; empty if none is known
	term       int64  // the leader key's create revision; 0 if none is known
	self       bool   // this node leads
}

// member is what a node publishes about itself under the leader and candidate keys.
type member struct {
	Name string      `json:"name"`
	Addr string      `json:"addr"`
	Repl string      `json:"repl,omitempty"` // replication address, for followers
	Pos  logPosition `json:"pos"`
}

// election campaigns for the leadership of one cluster and tracks who leads it.
type election struct {
	etcd       *etcdClient
	prefix     string // /amqp-go/<cluster>/
	leaderKey  string // prefix + "leader"
	candidates string // prefix + "candidates/"
	isrKey     string // prefix + "insync"
	self       member // name and advertise address
	ttl        time.Duration

	// position returns this node's log position and whether it may stand as far as it
	// knows (a standby whose log is not open may not); nil means the zero position and
	// yes. The in-sync record decides the rest (eligible). It is asked on each look at
	// etcd without a leader, so it must be quick. Set before run.
	position func() (logPosition, bool)
	// logger gets leadership changes and lost leases; nil logs nothing. Set before run.
	logger *slog.Logger

	// changes holds the latest leaderInfo not yet received. A receiver sees the latest
	// state and may miss ones in between: it tells a lost term by the term.
	changes chan leaderInfo
	wake    chan struct{} // 1 slot: look again now
	orphans []int64       // leases given up but not revoked (etcd was unreachable); run's own
	// warnedNoRecord: the missing in-sync record was logged; run's own.
	warnedNoRecord bool

	mu     sync.Mutex
	term   int64      // guarded by mu: the term this node leads in; 0 if it does not lead
	until  time.Time  // guarded by mu: the current lease is proven alive until then
	leader leaderInfo // guarded by mu: last reported
}

// newElection returns an election for node name, reachable by other nodes at addr, in
// cluster through the comma-separated etcd endpoint URLs, with leases of ttl (0: 5 s;
// etcd counts whole seconds).
func newElection(endpoints, cluster, name, addr string, ttl time.Duration) (*election, error) {
	if ttl == 0 {
		ttl = 5 * time.Second
	}
	if ttl < time.Second {
		return nil, fmt.Errorf("cluster: TTL %v: want at least 1s", ttl)
	}
	if cluster == "" || name == "" || strings.Contains(cluster, "/") || strings.Contains(name, "/") {
		return nil, fmt.Errorf("cluster: cluster %q, node %q: names must be non-empty, without '/'", cluster, name)
	}
	// An attempt that takes a quarter TTL leaves time to try another endpoint before the
	// lease's deadline.
	c, err := newEtcdClient(endpoints, ttl/4)
	if err != nil {
		return nil, err
	}
	prefix := "/amqp-go/" + cluster + "/"
	return &election{
		etcd:       c,
		prefix:     prefix,
		leaderKey:  prefix + "leader",
		candidates: prefix + "candidates/",
		isrKey:     prefix + "insync",
		self:       member{Name: name, Addr: addr},
		ttl:        ttl,
		changes:    make(chan leaderInfo, 1),
		wake:       make(chan struct{}, 1),
	}, nil
}

// leading returns this node's term and true while it leads and its lease is proven alive.
func (e *election) leading() (int64, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.term == 0 || !time.Now().Before(e.until) {
		return 0, false
	}
	return e.term, true
}

// leaderNow returns who leads, as last seen. It can lag: leading, not this, says whether
// this node may act as the leader.
func (e *election) leaderNow() leaderInfo {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.leader
}

// reportLocked makes l the latest leaderInfo, for leaderNow and the changes channel.
// e.mu must be held.
func (e *election) reportLocked(l leaderInfo) {
	if l == e.leader {
		return
	}
	e.leader = l
	select {
	case <-e.changes:
	default:
	}
	e.changes <- l
}

// poke makes the campaign look again now.
func (e *election) poke() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// run campaigns until ctx is done, then resigns: it deletes the leader key if it holds it
// and revokes its lease, so another node can take over at once.
func (e *election) run(ctx context.Context) {
	var wg sync.WaitGroup
	wctx, stopWatch := context.WithCancel(ctx)
	wg.Go(func() { e.watch(wctx) })
	defer e.etcd.close()
	defer wg.Wait()
	defer stopWatch()
	failing := false // log the first failure in a row, and the recovery
	for ctx.Err() == nil {
		sent := time.Now()
		id, ttl, err := e.etcd.grant(ctx, e.ttl)
		if err != nil {
			if !failing && ctx.Err() == nil {
				e.log(slog.LevelWarn, "cluster: cannot get a lease from etcd", "err", err)
			}
			failing = true
			sleepCtx(ctx, e.ttl/10)
			continue
		}
		if failing {
			e.log(slog.LevelInfo, "cluster: etcd granted a lease again")
			failing = false
		}
		e.hold(ctx, id, ttl, sent)
	}
}

// watch pokes the campaign on every change under the cluster's prefix, watching again
// whenever a watch ends.
func (e *election) watch(ctx context.Context) {
	for ctx.Err() == nil {
		e.etcd.watch(ctx, e.prefix, e.poke)
		sleepCtx(ctx, e.ttl/10)
	}
}

// candidacy is a node's candidate key on one lease.
type candidacy struct {
	published bool
	pos       logPosition // published
	since     time.Time   // first published
}

// hold campaigns on lease id, granted with ttl by a request sent at sent, until the lease is
// lost, leadership on it is lost, or ctx is done; then it gives the lease up.
func (e *election) hold(ctx context.Context, id int64, ttl time.Duration, sent time.Time) {
	e.mu.Lock()
	e.until = sent.Add(ttl - ttl/4)
	e.mu.Unlock()
	lost := make(chan struct{})
	kctx, stopKeepAlive := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { e.keepAlive(kctx, id, ttl, sent, lost) })
	defer func() {
		stopKeepAlive()
		wg.Wait()
		why := "lease lost"
		if ctx.Err() != nil {
			why = "stopping"
		}
		e.release(id, why)
	}()
	next := time.NewTimer(ttl / 3)
	defer next.Stop()
	var c candidacy
	for e.step(ctx, id, ttl, &c) {
		// Look again in TTL/3, or when the candidacy may first stand.
		wait := ttl / 3
		if settled := time.Until(c.since.Add(ttl / 3)); c.published && settled > 0 {
			wait = min(wait, settled)
		}
		next.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-lost:
			return
		case <-e.wake:
		case <-next.C:
		}
	}
}

// keepAlive renews lease id every ttl/3 from the last renewal's request, moving the
// deadline leading checks, and closes lost once the lease is gone or the deadline passes.
func (e *election) keepAlive(ctx context.Context, id int64, ttl time.Duration, sent time.Time, lost chan<- struct{}) {
	defer close(lost)
	until := sent.Add(ttl - ttl/4)
	for {
		if !sleepCtx(ctx, time.Until(sent.Add(ttl/3))) {
			return
		}
		for {
			now := time.Now()
			rctx, cancel := context.WithDeadline(ctx, until)
			got, err := e.etcd.keepAlive(rctx, id)
			cancel()
			if err == nil {
				sent, until = now, now.Add(got-got/4)
				e.mu.Lock()
				e.until = until
				e.mu.Unlock()
				break
			}
			if ctx.Err() != nil {
				return
			}
			if errors.Is(err, errLeaseExpired) || !time.Now().Before(until) {
				e.log(slog.LevelWarn, "cluster: lease lost", "lease", id, "err", err)
				return
			}
			if !sleepCtx(ctx, min(ttl/20, time.Until(until))) {
				return
			}
		}
	}
}

// step looks at the cluster once and acts on lease id: it follows the leader it finds;
// with none, it publishes its candidacy if it is eligible, and stands once the candidacy
// has settled if no candidate is newer. It returns false when the lease must be given up.
func (e *election) step(ctx context.Context, id int64, ttl time.Duration, c *candidacy) bool {
	e.mu.Lock()
	until, term := e.until, e.term
	e.mu.Unlock()
	ctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	// A lease this node gave up outlives it when etcd could not be told, and longer if
	// etcd restarts (which renews every lease); its keys, perhaps the leader key of a lost
	// term, would hold up the next election until it expires.
	e.orphans = slices.DeleteFunc(e.orphans, func(o int64) bool {
		err := e.etcd.revoke(ctx, o)
		return err == nil || errors.Is(err, errLeaseExpired)
	})
	kv, _, err := e.etcd.get(ctx, e.leaderKey)
	if err != nil {
		return true
	}
	if kv != nil {
		var m member
		json.Unmarshal(kv.Value, &m) // a value not ours leaves the name empty
		if kv.Lease == id {
			// Won just now, or by a transaction whose answer was lost.
			return e.lead(kv.CreateRevision)
		}
		if term != 0 {
			e.stepDown("another node holds the leader key")
			return false
		}
		e.follow(leaderInfo{name: m.Name, addr: m.Addr, repl: m.Repl, term: kv.CreateRevision})
		// Under a leader, a candidacy's position goes stale at once: withdraw it.
		return e.withdraw(ctx, c)
	}
	if term != 0 {
		e.stepDown("the leader key was deleted")
		return false
	}
	e.follow(leaderInfo{})
	pos, may := logPosition{}, true
	if e.position != nil {
		pos, may = e.position()
	}
	stand, isrRev := false, int64(0)
	if may {
		if may, stand, isrRev, err = e.eligible(ctx, pos); err != nil {
			return true
		}
	}
	switch {
	case !may:
		return e.withdraw(ctx, c)
	case !c.published || pos != c.pos:
		m := e.self
		m.Pos = pos
		if _, err := e.etcd.put(ctx, e.candidates+e.self.Name, marshalMember(m), id); err != nil {
			return !errors.Is(err, errLeaseExpired)
		}
		if !c.published {
			c.since = time.Now()
		}
		c.published, c.pos = true, pos
	}
	if !stand || time.Since(c.since) < ttl/3 {
		return true
	}
	kvs, rev, err := e.etcd.getPrefix(ctx, e.candidates)
	if err != nil {
		return true
	}
	for _, kv := range kvs {
		var m member
		if json.Unmarshal(kv.Value, &m) == nil && m.Name != e.self.Name && c.pos.less(m.Pos) {
			return true // defer to a newer candidate
		}
	}
	// The in-sync record must be as eligible read it: a leader elected and gone meanwhile
	// may have confirmed records without this node.
	won, rev, err := e.etcd.txn(ctx, []etcdCompare{createdAt(e.leaderKey, 0), unchangedSince(e.candidates, rev), modifiedAt(e.isrKey, isrRev)},
		etcdOp{Put: &etcdPut{Key: []byte(e.leaderKey), Value: marshalMember(e.self), Lease: id}})
	switch {
	case err != nil:
		return !errors.Is(err, errLeaseExpired)
	case won:
		return e.lead(rev)
	}
	return true
}

// withdraw deletes this node's candidate key if it published one. It returns false when
// the lease must be given up.
func (e *election) withdraw(ctx context.Context, c *candidacy) bool {
	if !c.published {
		return true
	}
	if err := e.etcd.delete(ctx, e.candidates+e.self.Name); err != nil {
		return !errors.Is(err, errLeaseExpired)
	}
	c.published = false
	return true
}

// isrRecord is what a leader keeps under the in-sync key, without a lease so that it
// outlives the leader: itself and its followers in sync, the nodes that hold everything
// it confirmed (with -min-insync of them at least), and so the nodes that may stand once
// it is gone.
type isrRecord struct {
	Term    int64    `json:"term"`
	Members []string `json:"members"`
}

// eligible reports whether this node, at pos, publishes a candidacy and whether it may
// stand, and the in-sync record's mod revision (0: none), which the election's
// transaction requires unchanged. A node the record names does both; one it does not name
// neither. Without a record (a new cluster, or etcd lost its data, or an operator
// deleted it), a node whose log never followed a leader stands, while one whose log did
// only publishes, so that empty nodes defer to its newer position and cannot win and
// wipe what it holds; it waits for an operator to name the nodes that may stand. A
// record naming only nodes that are gone for good holds the cluster up the same way.
func (e *election) eligible(ctx context.Context, pos logPosition) (publish, stand bool, rev int64, err error) {
	kv, _, err := e.etcd.get(ctx, e.isrKey)
	if err != nil {
		return false, false, 0, err
	}
	if kv == nil {
		if pos.Term != 0 && !e.warnedNoRecord {
			e.warnedNoRecord = true
			if e.logger != nil {
				e.logger.Error("cluster: no in-sync record in etcd, and this node's log followed a leader: it will not stand until an operator names the nodes that may, with etcdctl put "+e.isrKey+" '{\"term\":0,\"members\":[\"<node>\"]}'", "term", pos.Term)
			}
		}
		return true, pos.Term == 0, 0, nil
	}
	e.warnedNoRecord = false
	var rec isrRecord
	if err := json.Unmarshal(kv.Value, &rec); err != nil {
		return false, false, kv.ModRevision, nil
	}
	named := slices.Contains(rec.Members, e.self.Name)
	return named, named, kv.ModRevision, nil
}

// publishISR records this leader and its followers in sync as of term, if the leader key
// is still term's; errNotLeader if it is not. The write also requires the record unchanged
// since it was read, so an earlier attempt that timed out here but reaches etcd late
// cannot overwrite a newer set; the caller tries again with the latest.
func (e *election) publishISR(ctx context.Context, term int64, followers []string) error {
	rec, _ := json.Marshal(isrRecord{Term: term, Members: append([]string{e.self.Name}, followers...)})
	for {
		kv, _, err := e.etcd.get(ctx, e.isrKey)
		if err != nil {
			return err
		}
		var rev int64
		if kv != nil {
			rev = kv.ModRevision
		}
		won, _, err := e.etcd.txn(ctx, []etcdCompare{createdAt(e.leaderKey, term), modifiedAt(e.isrKey, rev)}, etcdOp{Put: &etcdPut{Key: []byte(e.isrKey), Value: rec}})
		if err != nil || won {
			return err
		}
		if kv, _, err := e.etcd.get(ctx, e.leaderKey); err != nil {
			return err
		} else if kv == nil || kv.CreateRevision != term {
			return errNotLeader
		}
		// Still the leader: the record changed between the read and the write. Again.
	}
}

// lead makes this node the leader in term, unless its lease's deadline has passed.
func (e *election) lead(term int64) bool {
	e.mu.Lock()
	alive, was := time.Now().Before(e.until), e.term
	if alive {
		e.term = term
		e.reportLocked(leaderInfo{name: e.self.Name, addr: e.self.Addr, repl: e.self.Repl, term: term, self: true})
	}
	e.mu.Unlock()
	if alive && was != term {
		e.log(slog.LevelInfo, "cluster: leading", "term", term)
	}
	return alive
}

// follow records l as the leader, when this node does not lead.
func (e *election) follow(l leaderInfo) {
	e.mu.Lock()
	changed := l != e.leader
	e.reportLocked(l)
	e.mu.Unlock()
	if changed && l.term != 0 {
		e.log(slog.LevelInfo, "cluster: following", "leader", l.name, "addr", l.addr, "term", l.term)
	}
}

// stepDown ends this node's term, if it has one, and returns it.
func (e *election) stepDown(why string) int64 {
	e.mu.Lock()
	term := e.term
	if term != 0 {
		e.term = 0
		e.reportLocked(leaderInfo{})
	}
	e.mu.Unlock()
	if term != 0 {
		e.log(slog.LevelInfo, "cluster: no longer leading", "term", term, "why", why)
	}
	return term
}

// release gives lease id up: it ends this node's term, deletes the leader key if it is
// still this term's, and revokes the lease, which deletes the candidate key. A lease not
// revoked is an orphan, revoked by later steps.
func (e *election) release(id int64, why string) {
	term := e.stepDown(why)
	ctx, cancel := context.WithTimeout(context.Background(), e.etcd.timeout)
	defer cancel()
	if term != 0 {
		e.etcd.txn(ctx, []etcdCompare{createdAt(e.leaderKey, term)}, etcdOp{Delete: &etcdRange{Key: []byte(e.leaderKey)}})
	}
	if err := e.etcd.revoke(ctx, id); err != nil && !errors.Is(err, errLeaseExpired) {
		e.orphans = append(e.orphans, id)
	}
}

func (e *election) log(level slog.Level, msg string, args ...any) {
	if e.logger != nil {
		e.logger.Log(context.Background(), level, msg, append(args, "node", e.self.Name)...)
	}
}

func marshalMember(m member) []byte {
	b, _ := json.Marshal(m) // cannot fail: strings and integers
	return b
}

// sleepCtx waits for d or until ctx is done, and reports whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// A clustered Server (Config.Cluster) runs a clusterNode. The node starts as a standby: it
// does not open its data directory as a store, but as a replica that follows whoever
// leads, and it stands for election as the in-sync key allows. Its listeners accept, but
// answer the protocol header with connection.close 320 CONNECTION_FORCED naming the
// leader's address. Once it leads, it records its term in the directory's TERM file,
// stops following, opens the directory as after a crash, serves followers on
// ReplicationAddr with the gate of MinInSync and the in-sync key, and serves clients. A leader that loses its
// term fails its log (nothing more is confirmed) and shuts the server down; Serve returns
// errNotLeader and the process is meant to be restarted as a follower, as LavinMQ does.

// errNotLeader is what Serve returns after the node lost its leadership.
var errNotLeader = errors.New("amqp: cluster: no longer the leader; restart to follow the new one")

// clusterNode drives a clustered server through standing by, leading and stepping down.
type clusterNode struct {
	s       *Server
	cfg     ClusterConfig
	e       *election
	replica atomic.Pointer[replica] // the follower's copy while standing by; nil otherwise
	leader  atomic.Bool             // the store is open and the node serves clients
	err     atomic.Pointer[error]   // why the node stopped by itself

	stopLoop     context.CancelFunc
	loopDone     chan struct{}
	stopElection context.CancelFunc
	electionDone chan struct{}
	rs           *replicaServer // the loop's own; Shutdown's once loopDone is closed
}

// startClusterNode starts s's election and its standby.
func startClusterNode(s *Server) (*clusterNode, error) {
	cfg := *s.cfg.Cluster
	if s.cfg.DataDir == "" {
		return nil, errors.New("amqp: cluster: a node needs a data directory")
	}
	if cfg.AdvertiseAddr == "" || cfg.ReplicationAddr == "" {
		return nil, errors.New("amqp: cluster: a node needs an advertise address and a replication address")
	}
	if cfg.MinInSync < MinInSyncAuto {
		return nil, errors.New("amqp: cluster: the followers a confirm needs (-min-insync) must be -1 (auto) or more")
	}
	if cfg.Secret == "" && (s.cfg.TLS == nil || s.cfg.TLS.Verify != "required") {
		return nil, errors.New("amqp: cluster: a node needs a shared secret, or TLS that requires client certificates")
	}
	if s.cfg.TLS != nil && s.tlsConf.Load() == nil {
		if err := s.loadTLS(); err != nil { // for the replication links
			return nil, err
		}
	}
	e, err := newElection(cfg.Etcd, cfg.Name, cfg.NodeName, cfg.AdvertiseAddr, cfg.TTL)
	if err != nil {
		return nil, err
	}
	e.self.Repl = advertisedRepl(cfg.AdvertiseAddr, cfg.ReplicationAddr)
	e.logger = s.log
	n := &clusterNode{s: s, cfg: cfg, e: e, loopDone: make(chan struct{}), electionDone: make(chan struct{})}
	e.position = n.position
	ectx, stopElection := context.WithCancel(context.Background())
	lctx, stopLoop := context.WithCancel(context.Background())
	n.stopElection, n.stopLoop = stopElection, stopLoop
	go func() {
		defer close(n.electionDone)
		e.run(ectx)
	}()
	go n.run(lctx)
	return n, nil
}

// advertisedRepl is the replication address followers are told: repl, or, when repl
// listens on every interface (":25672", "0.0.0.0:25672", "[::]:25672"), the advertise
// address's host with repl's port.
func advertisedRepl(advertise, repl string) string {
	host, port, err := net.SplitHostPort(repl)
	if err != nil {
		return repl
	}
	if ip := net.ParseIP(host); host != "" && (ip == nil || !ip.IsUnspecified()) {
		return repl
	}
	if ahost, _, err := net.SplitHostPort(advertise); err == nil && ahost != "" {
		return net.JoinHostPort(ahost, port)
	}
	return repl
}

// position is the election's position callback: the replica's term (the newest it
// followed or led in) and log end; the node may not stand while it has no replica open.
func (n *clusterNode) position() (logPosition, bool) {
	r := n.replica.Load()
	if r == nil {
		return logPosition{}, false
	}
	return logPosition{Term: r.term.Load(), Seq: pack(r.position())}, true
}

// serving reports whether the node leads and serves clients.
func (n *clusterNode) serving() bool { return n.leader.Load() }

// apiCluster answers GET /api/cluster: this node, the leader it knows and its term, and on
// the leader each follower's acknowledged position, lag and in-sync state.
func (s *Server) apiCluster(r *http.Request, u *apiUser) (any, error) {
	s.mu.Lock()
	n := s.cluster
	s.mu.Unlock()
	if n == nil {
		return map[string]any{"clustered": false, "node": s.node(), "leading": true}, nil
	}
	l := n.e.leaderNow()
	info := map[string]any{
		"clustered": true, "cluster": n.cfg.Name, "node": n.cfg.NodeName, "leading": n.serving(),
		"leader":     map[string]any{"name": l.name, "addr": l.addr, "term": l.term},
		"min_insync": n.cfg.MinInSync,
	}
	followers := []any{}
	if n.serving() { // n.rs is set before the node serves
		for _, f := range n.rs.status() {
			followers = append(followers, map[string]any{"name": f.name, "acked_segment": f.acked.seg,
				"acked_offset": f.acked.off, "lag_bytes": f.lag, "in_sync": f.inSync})
		}
	}
	info["followers"] = followers
	// This node's log end, and the in-sync record: who may stand when no one leads.
	var pos walPos
	if n.serving() {
		pos = unpack(s.store.w.writtenTo.Load())
	} else if r := n.replica.Load(); r != nil {
		pos = r.position()
	}
	info["position"] = map[string]any{"segment": pos.seg, "offset": pos.off}
	ctx, cancel := context.WithTimeout(r.Context(), n.e.ttl/4)
	defer cancel()
	if kv, _, err := n.e.etcd.get(ctx, n.e.isrKey); err == nil && kv != nil {
		var rec isrRecord
		if json.Unmarshal(kv.Value, &rec) == nil {
			info["in_sync_record"] = map[string]any{"term": rec.Term, "members": rec.Members}
		}
	}
	return info, nil
}

// clusterMetrics writes a clustered node's state (not in RabbitMQ): whether it leads, the
// term it knows, and on the leader its followers in sync and their largest lag.
func (s *Server) clusterMetrics(p *promWriter) {
	s.mu.Lock()
	n := s.cluster
	s.mu.Unlock()
	if n == nil {
		return
	}
	leading, inSync, lag := uint64(0), uint64(0), uint64(0)
	if n.serving() { // n.rs is set before the node serves
		leading = 1
		for _, f := range n.rs.status() {
			if f.inSync {
				inSync++
			}
			lag = max(lag, uint64(f.lag))
		}
	}
	p.one("amqpgo_cluster_leading", "gauge", "1 if this node leads its cluster and serves clients", "", leading)
	p.one("amqpgo_cluster_term", "gauge", "The leader's term this node knows (the leader key's etcd revision)", "", uint64(max(n.e.leaderNow().term, 0)))
	p.one("amqpgo_cluster_followers_in_sync", "gauge", "Followers in sync with this leader", "", inSync)
	p.one("amqpgo_cluster_follower_lag_bytes", "gauge", "The largest follower lag behind this leader's log, in bytes", "", lag)
}

// standby returns s's cluster node when s is a node that does not lead, else nil. Once it
// returns nil, s.store is the leader's own (set before the node serves).
func (s *Server) standby() *clusterNode {
	s.mu.Lock()
	n := s.cluster
	s.mu.Unlock()
	if n != nil && !n.serving() {
		return n
	}
	return nil
}

// refusal is what a node that does not lead answers a client's protocol header with.
func (n *clusterNode) refusal() *Error {
	text := "not the leader; leader unknown"
	if l := n.e.leaderNow(); l.addr != "" && !l.self {
		text = "not the leader; leader is " + l.addr
	}
	return newError(replyConnectionForced, text)
}

// failure returns why the node stopped the server, or nil.
func (n *clusterNode) failure() error {
	if p := n.err.Load(); p != nil {
		return *p
	}
	return nil
}

// fail records err and shuts the server down; the loop must return after.
func (n *clusterNode) fail(err error) {
	n.err.CompareAndSwap(nil, &err)
	n.s.log.Error("cluster: shutting down", "err", err)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		n.s.Shutdown(ctx)
	}()
}

// stop ends the loop; the store and the replica server stay for Shutdown to close.
func (n *clusterNode) stop() {
	n.stopLoop()
	<-n.loopDone
}

// resign stops serving followers and ends the election, giving the leader key up.
func (n *clusterNode) resign() {
	if n.rs != nil {
		n.rs.close()
	}
	n.stopElection()
	<-n.electionDone
}

// run stands by until the node leads, then leads until its term ends or ctx is done.
func (n *clusterNode) run(ctx context.Context) {
	defer close(n.loopDone)
	term, err := n.standBy(ctx)
	if err == nil {
		err = n.lead(ctx, term)
	}
	if err != nil && ctx.Err() == nil {
		n.fail(err)
	}
}

// standBy follows whoever leads until this node leads, and returns its term.
func (n *clusterNode) standBy(ctx context.Context) (int64, error) {
	s := n.s
	r, err := openReplica(s.cfg.DataDir, followerOptions{cluster: n.cfg.Name, name: n.cfg.NodeName,
		secret: []byte(n.cfg.Secret), defs: s.cfg.Definitions, log: s.log})
	if err != nil {
		return 0, err
	}
	n.replica.Store(r)
	defer func() {
		n.replica.Store(nil)
		r.close()
	}()
	var following leaderInfo // the leader the session follows, or last failed to
	var stopFollow context.CancelFunc
	var followErr chan error
	stopFollowing := func() {
		if stopFollow != nil {
			stopFollow()
			<-followErr
			stopFollow, followErr = nil, nil
		}
	}
	defer stopFollowing()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if term, ok := n.e.leading(); ok {
			return term, nil
		}
		if l := n.e.leaderNow(); !l.self && (l.repl != following.repl || l.term != following.term) {
			stopFollowing()
			if following = l; l.repl != "" {
				fctx, cancel := context.WithCancel(ctx)
				stopFollow, followErr = cancel, make(chan error, 1)
				addr := l.repl
				dial := func(ctx context.Context) (net.Conn, error) { return n.dialLeader(ctx, addr) }
				go func() { followErr <- r.run(fctx, dial) }()
			}
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-n.e.changes:
		case <-tick.C:
		case err := <-followErr:
			// Following this leader again would not change the answer.
			stopFollow()
			stopFollow, followErr = nil, nil
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			if errors.Is(err, errReplAuth) {
				return 0, err // a wrong secret is the operator's to fix
			}
			s.log.Warn("cluster: cannot follow the leader; waiting for the next", "leader", following.name, "term", following.term, "err", err)
		}
	}
}

// lead opens the store, serves followers and clients, and returns when the term ends
// (errNotLeader) or ctx is done.
func (n *clusterNode) lead(ctx context.Context, term int64) error {
	s := n.s
	if s.cfg.Definitions != "" {
		if err := s.loadAuth(); err != nil { // as replicated from the last leader
			return err
		}
	}
	// The term it leads in is its log's from now on: a follower refuses older leaders,
	// and it stands later with a position of this term.
	if err := writeFileAtomic(filepath.Join(s.cfg.DataDir, "TERM"), []byte(strconv.FormatInt(term, 10)+"\n")); err != nil {
		return err
	}
	if err := s.openStore(); err != nil {
		return err
	}
	if _, ok := n.e.leading(); !ok {
		return errNotLeader
	}
	ln, err := net.Listen("tcp", n.cfg.ReplicationAddr)
	if err != nil {
		return err
	}
	// Confirms stop the moment the term may be over, not at the loop's next look.
	leading := func() bool { t, ok := n.e.leading(); return ok && t == term }
	// The in-sync set is in etcd before a confirm counts on it: the nodes it names may
	// stand. It names this node alone before any follower can start a session in this
	// term (and so take this term's number into its position). Publishing goes on while
	// the server closes, so the last records can still be confirmed.
	publish := func(followers []string) error {
		ctx, cancel := context.WithTimeout(context.Background(), n.e.ttl/4)
		defer cancel()
		return n.e.publishISR(ctx, term, followers)
	}
	if err := publish(nil); err != nil {
		return err
	}
	n.rs = newReplicaServer(s.store.w, replicaOptions{cluster: n.cfg.Name, term: uint64(term),
		secret: []byte(n.cfg.Secret), defs: s.cfg.Definitions, minInSync: n.cfg.MinInSync,
		leading: leading, publishISR: publish, log: s.log})
	go n.rs.serve(n.replListener(ln))
	s.startServices()
	n.leader.Store(true)
	s.log.Info("cluster: serving as the leader", "term", term, "replication", ln.Addr().String())
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	short := shortOfFollowers{since: time.Now()}
	for {
		short.check(n, s.log)
		if t, ok := n.e.leading(); !ok || t != term {
			n.leader.Store(false)
			s.store.noCheckpoint.Store(true)
			s.store.w.fail(errNotLeader) // confirm nothing more
			return errNotLeader
		}
		select {
		case <-ctx.Done():
			return nil
		case <-n.e.changes:
		case <-tick.C:
		}
	}
}

// replListener returns ln, or ln over TLS when the node serves amqps: replication then
// uses the amqps certificate, and checks followers' certificates as Config.TLS.Verify
// says, against Config.TLS.CAFile.
func (n *clusterNode) replListener(ln net.Listener) net.Listener {
	if n.s.cfg.TLS == nil {
		return ln
	}
	return tls.NewListener(ln, &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return n.s.tlsConf.Load(), nil
		},
	})
}

// dialLeader connects to the leader's replication address, over TLS when the node serves
// amqps: it checks the leader's certificate against Config.TLS.CAFile (or the system's
// roots without one) and presents its own amqps certificate.
func (n *clusterNode) dialLeader(ctx context.Context, addr string) (net.Conn, error) {
	d := &net.Dialer{}
	if n.s.cfg.TLS == nil {
		return d.DialContext(ctx, "tcp", addr)
	}
	conf := n.s.tlsConf.Load() // loaded by startClusterNode
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	td := &tls.Dialer{NetDialer: d, Config: &tls.Config{MinVersion: tls.VersionTLS12,
		RootCAs: conf.ClientCAs, Certificates: conf.Certificates, ServerName: host}}
	return td.DialContext(ctx, "tcp", addr)
}

// shortOfFollowers logs when a leader has had fewer followers in sync than MinInSync for
// a few seconds, so that its confirms wait, and when it has enough again.
type shortOfFollowers struct {
	since  time.Time // when the leader was last seen with enough, or began to lead
	logged bool
	next   time.Time // when to count again
}

// shortGrace is how long a leader may lack followers in sync before it says so: a new
// leader's followers need a moment to connect and catch up.
const shortGrace = 5 * time.Second

func (sh *shortOfFollowers) check(n *clusterNode, log *slog.Logger) {
	now := time.Now()
	if n.cfg.MinInSync == 0 || now.Before(sh.next) {
		return
	}
	sh.next = now.Add(time.Second)
	need := n.rs.required() // under auto: 1 while a follower that was in sync is alive
	inSync := 0
	for _, f := range n.rs.status() {
		if f.inSync {
			inSync++
		}
	}
	switch {
	case inSync >= need:
		if sh.logged {
			log.Info("cluster: enough followers in sync again; confirms go on", "in_sync", inSync, "min_insync", n.cfg.MinInSync)
		}
		sh.since, sh.logged = now, false
	case !sh.logged && now.Sub(sh.since) >= shortGrace:
		log.Warn("cluster: fewer followers in sync than -min-insync; publisher confirms, tx.commit-ok and durable declare-ok wait",
			"in_sync", inSync, "need", need, "min_insync", n.cfg.MinInSync)
		sh.logged = true
	}
}
