package amqp

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Clusters of amqpd processes on loopback, driven as an operator would drive them: kill -9,
// restart, a node cut off from etcd. A publisher with confirms runs throughout, and at the
// end every message it saw confirmed must be on the last leader, byte for byte, once.

// daemonTTL is the daemons' lease TTL: short, so that twenty failovers fit in a test, but
// as long as the in-process tests' (testTTL), so that a machine loaded by the rest of the
// suite does not make a leader miss its keepalives. -daemon-ttl 5s measures failover with
// amqpd's default.
var daemonTTL time.Duration

func init() {
	flag.DurationVar(&daemonTTL, "daemon-ttl", testTTL, "lease TTL of the amqpd cluster tests")
}

// amqpdNode is one node of a cluster, an amqpd process that can be killed and started
// again on the same data directory. Each start takes fresh ports.
type amqpdNode struct {
	t    *testing.T
	bin  string
	name string
	dir  string
	etcd string // the etcd URL this node is given

	addr, repl, http string                 // this run's AMQP, replication and management addresses
	published        atomic.Pointer[string] // addr, for the publisher's goroutine
	cmd              *exec.Cmd
	exited           chan error // this run's Wait
	out              *lockedBuffer
}

// startAmqpdNodes starts one node per name, each with its own data directory, all in one
// cluster through the etcd URL given for it.
func startAmqpdNodes(t *testing.T, etcdURLs []string, names ...string) []*amqpdNode {
	t.Helper()
	bin := amqpdBinary(t)
	var nodes []*amqpdNode
	for i, name := range names {
		n := &amqpdNode{t: t, bin: bin, name: name, dir: t.TempDir(), etcd: etcdURLs[i], out: &lockedBuffer{}}
		t.Cleanup(func() {
			n.kill()
			if t.Failed() {
				t.Logf("node %s:\n%s", n.name, n.out.String())
			}
		})
		n.start()
		nodes = append(nodes, n)
	}
	return nodes
}

// start runs the node's amqpd on fresh ports.
func (n *amqpdNode) start() {
	n.t.Helper()
	n.addr, n.repl, n.http = freeAddr(n.t), freeAddr(n.t), freeAddr(n.t)
	addr := n.addr
	n.published.Store(&addr)
	n.cmd = exec.Command(n.bin, "-addr", n.addr, "-http-addr", n.http, "-prometheus-addr=",
		"-data-dir", n.dir, "-log-format", "json", "-segment-size", "1048576",
		"-cluster-etcd", n.etcd, "-cluster-name", "daemons", "-node-name", n.name,
		"-advertise-addr", n.addr, "-replication-addr", n.repl, "-cluster-ttl", daemonTTL.String(), "-min-insync", "1")
	n.cmd.Env = append(os.Environ(), "AMQPD_CLUSTER_SECRET=s3cret")
	fmt.Fprintf(n.out, "--- start at %s: amqp %s, replication %s, http %s\n", time.Now().Format(time.StampMilli), n.addr, n.repl, n.http)
	n.cmd.Stderr = n.out
	if err := n.cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.exited = make(chan error, 1)
	go func(cmd *exec.Cmd, exited chan error) { exited <- cmd.Wait() }(n.cmd, n.exited)
}

// kill ends the node with SIGKILL, if it runs, and waits for it.
func (n *amqpdNode) kill() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.exited
	n.cmd = nil
}

// waitExitNotLeader waits up to 5 TTLs for the node, a leader that lost its term, to exit
// with status 1 saying it is no longer the leader.
func (n *amqpdNode) waitExitNotLeader(t *testing.T, what string) {
	t.Helper()
	select {
	case err := <-n.exited:
		n.exited <- err
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(n.out.String(), "no longer the leader") {
			t.Fatalf("%s exited with %v, want status 1 saying it is no longer the leader", what, err)
		}
	case <-time.After(5 * daemonTTL):
		t.Fatalf("the %s still runs", what)
	}
}

// running reports whether the node's process has not exited.
func (n *amqpdNode) running() bool {
	if n.cmd == nil {
		return false
	}
	select {
	case err := <-n.exited:
		n.exited <- err
		return false
	default:
		return true
	}
}

func (n *amqpdNode) url() string { return "amqp://guest:guest@" + n.addr + "/" }

// accepts reports whether the node accepts an AMQP connection: whether it leads.
func (n *amqpdNode) accepts() bool {
	c, err := amqp091.DialConfig(n.url(), amqp091.Config{Dial: amqp091.DefaultDial(time.Second)})
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// cluster returns the node's GET /api/cluster, or nil when it does not answer.
func (n *amqpdNode) cluster() map[string]any {
	req, _ := http.NewRequest("GET", "http://"+n.http+"/api/cluster", nil)
	req.SetBasicAuth("guest", "guest")
	c := http.Client{Timeout: time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var st map[string]any
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&st) != nil {
		return nil
	}
	return st
}

// inSync returns how many followers the node, leading, counts in sync.
func (n *amqpdNode) inSync() int {
	followers, _ := n.cluster()["followers"].([]any)
	count := 0
	for _, f := range followers {
		if m, _ := f.(map[string]any); m["in_sync"] == true {
			count++
		}
	}
	return count
}

// ledAt returns when the node's log last said it started leading, or the zero time.
func (n *amqpdNode) ledAt() time.Time {
	var at time.Time
	sc := bufio.NewScanner(strings.NewReader(n.out.String()))
	for sc.Scan() {
		var line struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
		}
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "cluster: leading" {
			at = line.Time
		}
	}
	return at
}

// waitAmqpdLeader waits until one of the running nodes accepts clients, and returns it.
func waitAmqpdLeader(t *testing.T, nodes ...*amqpdNode) *amqpdNode {
	t.Helper()
	var leader *amqpdNode
	pollUntil(t, 30*time.Second, "a node to lead", func() bool {
		i := slices.IndexFunc(nodes, func(n *amqpdNode) bool { return n.running() && n.accepts() })
		if i >= 0 {
			leader = nodes[i]
		}
		return i >= 0
	})
	return leader
}

// clusterBody is the body of message i: its number and up to 2 KiB of pseudo-random
// octets.
func clusterBody(i int) []byte {
	r := rand.New(rand.NewPCG(uint64(i), 2))
	b := binary.BigEndian.AppendUint32(nil, uint32(i))
	for n := r.IntN(2 << 10); n > 0; n-- {
		b = append(b, byte(r.Uint32()))
	}
	return b
}

// nodeClient runs sessions on whichever node accepts a connection, one after another,
// until halted: the common part of the publisher and the consumer.
type nodeClient struct {
	stop, done chan struct{}
}

func newNodeClient() nodeClient {
	return nodeClient{stop: make(chan struct{}), done: make(chan struct{})}
}

// loop calls session with a connection to the first of nodes that accepts one (the
// leader), again whenever a session returns, until halted. Addresses are read on every
// connect: a restarted node has new ports.
func (r nodeClient) loop(nodes []*amqpdNode, session func(*amqp091.Connection)) {
	defer close(r.done)
	for !r.stopped() {
		var conn *amqp091.Connection
		for _, n := range nodes {
			c, err := amqp091.DialConfig("amqp://guest:guest@"+*n.published.Load()+"/", amqp091.Config{Dial: amqp091.DefaultDial(time.Second)})
			if err == nil {
				conn = c
				break
			}
		}
		if conn == nil {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		session(conn)
		conn.Close()
	}
}

func (r nodeClient) stopped() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

// halt stops the loop and waits for its last session; it may be called again, from the
// test's goroutine.
func (r nodeClient) halt() {
	if !r.stopped() {
		close(r.stop)
	}
	<-r.done
}

// confirmingPublisher publishes clusterBody(0), clusterBody(1), ... persistently to the
// durable queue "q" of whichever node accepts it, with confirms and up to 64 unconfirmed,
// at most about 2,000 a second. When its connection fails it connects again, to whichever
// node leads then, and goes on with the next number: it never publishes a number twice.
type confirmingPublisher struct {
	nodeClient

	mu          sync.Mutex
	confirmed   []int                // numbers confirmed, in order
	last        map[string]time.Time // by node address, when its last confirm arrived
	unconfirmed int                  // nacked, or left without a confirm by a failed connection
	published   int
	conns       int
	errs        []string // what should not happen
}

// startPublisher starts a publisher to nodes; the test ends it.
func startPublisher(t *testing.T, nodes []*amqpdNode) *confirmingPublisher {
	p := &confirmingPublisher{nodeClient: newNodeClient(), last: map[string]time.Time{}}
	next := 0
	go p.loop(nodes, func(conn *amqp091.Connection) {
		p.mu.Lock()
		p.conns++
		p.mu.Unlock()
		next = p.session(conn, next)
	})
	t.Cleanup(p.end)
	return p
}

// end stops the publisher and waits for its last confirms; it may be called again.
func (p *confirmingPublisher) end() { p.halt() }

// session publishes on conn from number next until the connection fails or the publisher
// stops, and returns the next number not yet published.
func (p *confirmingPublisher) session(conn *amqp091.Connection, next int) int {
	ch, err := conn.Channel()
	if err != nil {
		return next
	}
	if ch.Confirm(false) != nil {
		return next
	}
	if _, err := ch.QueueDeclare("q", true, false, false, false, nil); err != nil {
		return next
	}
	type pending struct {
		n  int
		dc *amqp091.DeferredConfirmation
	}
	var window []pending
	// settle takes the window's oldest confirm, waiting for it; false when none arrives.
	settle := func() bool {
		w := window[0]
		window = window[1:]
		select {
		case <-w.dc.Done():
		case <-time.After(30 * time.Second):
			p.mu.Lock()
			p.errs = append(p.errs, fmt.Sprintf("no confirm nor channel close for message %d after 30s", w.n))
			p.mu.Unlock()
			return false
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if w.dc.Acked() {
			p.confirmed = append(p.confirmed, w.n)
			p.last[conn.RemoteAddr().String()] = time.Now()
		} else {
			p.unconfirmed++
		}
		return true
	}
	pace := time.NewTicker(time.Millisecond)
	defer pace.Stop()
	for !p.stopped() && !conn.IsClosed() {
		<-pace.C
		for range 2 {
			dc, err := ch.PublishWithDeferredConfirm("", "q", false, false,
				amqp091.Publishing{DeliveryMode: amqp091.Persistent, Body: clusterBody(next)})
			if err != nil {
				break
			}
			window = append(window, pending{next, dc})
			next++
			p.mu.Lock()
			p.published++
			p.mu.Unlock()
		}
		for len(window) > 64 || len(window) > 0 && isDone(window[0].dc) {
			if !settle() {
				return next
			}
		}
	}
	// Stopped, or the connection failed: every confirm arrives or the channel's close
	// settles it unconfirmed.
	for len(window) > 0 && settle() {
	}
	return next
}

func isDone(dc *amqp091.DeferredConfirmation) bool {
	select {
	case <-dc.Done():
		return true
	default:
		return false
	}
}

// confirmedCount returns how many messages were confirmed so far.
func (p *confirmingPublisher) confirmedCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.confirmed)
}

// waitConfirms waits until n more messages are confirmed than now.
func (p *confirmingPublisher) waitConfirms(t *testing.T, n int, what string) {
	t.Helper()
	want := p.confirmedCount() + n
	pollUntil(t, 30*time.Second, fmt.Sprintf("%s: %d confirmed", what, want), func() bool { return p.confirmedCount() >= want })
}

// check ends the publisher and checks that queue q at url holds every confirmed message,
// byte for byte, and no message twice or unlike any published.
func (p *confirmingPublisher) check(t *testing.T, url string, c *ackingConsumer) {
	t.Helper()
	p.end()
	consumed := map[int]bool{}
	if c != nil {
		consumed = c.end(t)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.errs {
		t.Error(e)
	}
	got := getAll(t, openChannel(t, dial(t, url)), "q")
	seen := map[int]bool{}
	for _, d := range got {
		if len(d.Body) < 4 {
			t.Fatalf("a message of %d octets", len(d.Body))
		}
		i := int(binary.BigEndian.Uint32(d.Body))
		if !slices.Equal(d.Body, clusterBody(i)) {
			t.Fatalf("message %d: %d octets unlike those published", i, len(d.Body))
		}
		if seen[i] {
			t.Fatalf("message %d delivered twice", i)
		}
		seen[i] = true
	}
	lost := 0
	for _, i := range p.confirmed {
		if !seen[i] && !consumed[i] {
			if lost < 10 {
				t.Errorf("confirmed message %d lost", i)
			}
			lost++
		}
	}
	again := 0 // consumed and acked, yet back after a failover: acks are not confirmed
	for i := range consumed {
		if seen[i] {
			again++
		}
	}
	t.Logf("%d published on %d connections, %d confirmed, %d not (nacked or cut off), %d consumed and acked, %d on the last leader (%d of them consumed before); %d confirmed lost",
		p.published, p.conns, len(p.confirmed), p.unconfirmed, len(consumed), len(got), again, lost)
}

// ackingConsumer consumes queue "q" of whichever node accepts it, checking each body
// and acking it, about 500 a second, until ended; it connects again when its connection
// fails.
type ackingConsumer struct {
	nodeClient

	mu   sync.Mutex
	seen map[int]bool // numbers consumed and acked
	errs []string
}

// startConsumer starts a consumer of nodes; the test ends it.
func startConsumer(t *testing.T, nodes []*amqpdNode) *ackingConsumer {
	c := &ackingConsumer{nodeClient: newNodeClient(), seen: map[int]bool{}}
	go c.loop(nodes, c.session)
	t.Cleanup(func() { c.end(t) })
	return c
}

// session consumes on conn until it fails or the consumer ends.
func (c *ackingConsumer) session(conn *amqp091.Connection) {
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	if _, err := ch.QueueDeclare("q", true, false, false, false, nil); err != nil {
		return
	}
	if ch.Qos(10, 0, false) != nil {
		return
	}
	deliveries, err := ch.Consume("q", "", false, false, false, false, nil)
	if err != nil {
		return
	}
	pace := time.NewTicker(2 * time.Millisecond)
	defer pace.Stop()
	for {
		select {
		case <-c.stop:
			return
		case d, ok := <-deliveries:
			if !ok {
				return
			}
			i := -1
			if len(d.Body) >= 4 {
				i = int(binary.BigEndian.Uint32(d.Body))
			}
			if i < 0 || !slices.Equal(d.Body, clusterBody(i)) {
				c.mu.Lock()
				c.errs = append(c.errs, fmt.Sprintf("consumed a message of %d octets unlike those published", len(d.Body)))
				c.mu.Unlock()
			}
			if d.Ack(false) == nil {
				c.mu.Lock()
				c.seen[i] = true
				c.mu.Unlock()
			}
			<-pace.C
		}
	}
}

// end stops the consumer and returns the numbers it consumed and acked.
func (c *ackingConsumer) end(t *testing.T) map[int]bool {
	c.halt()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.errs {
		t.Error(e)
	}
	c.errs = nil
	return c.seen
}

// durations returns the smallest, median and largest of ds.
func durations(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	return fmt.Sprintf("min %v, median %v, max %v", s[0].Round(time.Millisecond), s[len(s)/2].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
}

// Three amqpd processes; the leader is killed with SIGKILL twenty times in a row while a
// publisher with confirms runs, and each time started again, to rejoin as a follower. Each
// time another node takes over, and at the end the last leader has every confirmed
// message, byte for byte.
func TestClusterDaemonsLeaderKilled(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	urls := []string{e.url, e.url, e.url}
	nodes := startAmqpdNodes(t, urls, "a", "b", "c")
	leader := waitAmqpdLeader(t, nodes...)
	pub := startPublisher(t, nodes)
	con := startConsumer(t, nodes)
	var takeovers, resumed []time.Duration
	for kill := range 20 {
		pub.waitConfirms(t, 100, fmt.Sprintf("before kill %d, leader %s", kill+1, leader.name))
		leader.kill()
		killed := time.Now()
		next := waitAmqpdLeader(t, nodes...)
		// The bound: serving within 5 s of the lease running out (at most a TTL
		// after the kill).
		if took := time.Since(killed); took > daemonTTL+5*time.Second {
			t.Errorf("kill %d: %s served %v after the kill, more than TTL + 5 s", kill+1, next.name, took)
		}
		takeovers = append(takeovers, time.Since(killed))
		leader.start() // rejoins as a follower
		pub.waitConfirms(t, 1, fmt.Sprintf("after kill %d", kill+1))
		resumed = append(resumed, time.Since(killed))
		leader = next
	}
	pub.waitConfirms(t, 100, "after the last kill")
	t.Logf("20 kills with TTL %v; from kill to a new leader accepting clients: %s; to the publisher's next confirm: %s",
		daemonTTL, durations(takeovers), durations(resumed))
	pub.check(t, leader.url(), con)
}

// A node that joins late gets a full copy, then streams; a follower killed and restarted
// catches up while confirms go on through the other; and a follower back in sync carries
// the confirms alone, then takes over with every confirmed message.
func TestClusterDaemonsFollowerRestarted(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	nodes := startAmqpdNodes(t, []string{e.url, e.url}, "a", "b")
	leader := waitAmqpdLeader(t, nodes...)
	first := nodes[1-slices.Index(nodes, leader)]
	pub := startPublisher(t, nodes)                // the leader stays
	pub.waitConfirms(t, 1500, "with one follower") // about two segments

	late := startAmqpdNodes(t, []string{e.url}, "c")[0] // a full copy of what is there
	waitInSyncCount(t, leader, 2)
	out, err := exec.Command(leader.bin, "cluster_status", "-node", "http://"+leader.http).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "leading true") || !strings.Contains(string(out), "follower c\tin sync true") ||
		!strings.Contains(string(out), "(may stand): "+leader.name+", ") {
		t.Errorf("amqpd cluster_status: %v\n%s", err, out)
	}

	first.kill()
	pub.waitConfirms(t, 500, "with the late follower only")
	first.start()
	waitInSyncCount(t, leader, 2)
	late.kill()
	pub.waitConfirms(t, 500, "with the restarted follower only")
	late.start()
	waitInSyncCount(t, leader, 2)
	pub.waitConfirms(t, 200, "with both followers")

	// Alone, the follower promoted would confirm nothing more (-min-insync 1).
	pub.end()
	leader.kill()
	first.kill()
	if next := waitAmqpdLeader(t, late); next != late {
		t.Fatalf("%s leads, want %s", next.name, late.name)
	}
	pub.check(t, late.url(), nil)
}

// waitInSyncCount waits until leader counts n followers in sync.
func waitInSyncCount(t *testing.T, leader *amqpdNode, n int) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); leader.inSync() < n; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s has %d followers in sync after 30s, want %d: %v", leader.name, leader.inSync(), n, leader.cluster())
		}
	}
}

// TestClusterDaemonsLeaderFrozen stops the leader (SIGSTOP) for longer than its lease:
// to the others it is as if its network were cut whole, no keepalives, acks or replies.
// A follower takes over. Resumed, the old leader confirms nothing it had not replicated,
// exits, and restarted follows the new leader; every confirmed message is kept.
func TestClusterDaemonsLeaderFrozen(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	nodes := startAmqpdNodes(t, []string{e.url, e.url, e.url}, "a", "b", "c")
	old := waitAmqpdLeader(t, nodes...)
	pub := startPublisher(t, nodes)
	waitInSyncCount(t, old, 2)
	pub.waitConfirms(t, 200, "before the freeze")

	old.cmd.Process.Signal(syscall.SIGSTOP)
	frozeAt := time.Now()
	next := waitAmqpdLeader(t, slices.DeleteFunc(slices.Clone(nodes), func(n *amqpdNode) bool { return n == old })...)
	t.Logf("%s leads %v after the freeze", next.name, time.Since(frozeAt).Round(time.Millisecond))
	if took := time.Since(frozeAt); took > daemonTTL+5*time.Second {
		t.Errorf("%s took %v to lead, over TTL + 5 s", next.name, took)
	}
	old.cmd.Process.Signal(syscall.SIGCONT)
	old.waitExitNotLeader(t, "resumed old leader")
	pub.waitConfirms(t, 200, "after the freeze")
	old.start()
	waitInSyncCount(t, next, 2)
	pub.waitConfirms(t, 200, "with the old leader following")
	pub.check(t, next.url(), nil)
}

// A leader cut off from etcd, with its clients and followers still connected, stops
// confirming before another node starts to lead, and exits. Started again, it follows the
// new leader, discarding what it wrote that the new leader has not; once in sync it takes
// over in turn with every confirmed message.
func TestClusterDaemonsLeaderCutOff(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	to := strings.TrimPrefix(e.url, "http://")
	proxies := []*testProxy{startProxy(t, to), startProxy(t, to), startProxy(t, to)}
	nodes := startAmqpdNodes(t, []string{proxies[0].url(), proxies[1].url(), proxies[2].url()}, "a", "b", "c")
	old := waitAmqpdLeader(t, nodes...)
	i := slices.Index(nodes, old)
	pub := startPublisher(t, nodes)
	waitInSyncCount(t, old, 2)
	pub.waitConfirms(t, 200, "before the cut")

	proxies[i].cut.Store(true)
	old.waitExitNotLeader(t, "cut-off leader")
	next := waitAmqpdLeader(t, nodes...)
	pub.mu.Lock()
	lastOld := pub.last[old.addr]
	pub.mu.Unlock()
	ledAt := next.ledAt()
	if lastOld.IsZero() || ledAt.IsZero() {
		t.Fatalf("the old leader's last confirm at %v, %s led from %v: want both", lastOld, next.name, ledAt)
	}
	if !lastOld.Before(ledAt) {
		t.Fatalf("the old leader's last confirm arrived at %s, after %s led from %s", lastOld.Format(time.StampMicro), next.name, ledAt.Format(time.StampMicro))
	}
	t.Logf("the old leader's last confirm arrived %v before %s led", ledAt.Sub(lastOld).Round(time.Millisecond), next.name)

	proxies[i].cut.Store(false)
	old.start()
	waitInSyncCount(t, next, 2)
	pub.waitConfirms(t, 200, "with the old leader following")
	for _, n := range nodes {
		if n != old && n != next {
			n.kill()
		}
	}
	pub.waitConfirms(t, 200, "with only the old leader following")
	pub.end() // alone, the old leader will confirm nothing more (-min-insync 1)
	next.kill()
	if now := waitAmqpdLeader(t, nodes...); now != old {
		t.Fatalf("%s leads, want the old leader %s", now.name, old.name)
	}
	pub.check(t, old.url(), nil)
}
