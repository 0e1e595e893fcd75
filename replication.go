package amqp

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Physical replication of the data directory: a follower's directory becomes a
// byte-for-byte copy of the leader's durable files (log segments, their indexes, meta.snap
// and the definitions file), so that a follower is promoted by opening its directory as
// after a crash. The leader serves followers over any net.Listener (a tls.Listener for
// TLS); a follower dials and runs one session until it fails, then dials again.
//
// Session. Every message is a frame, big-endian, the CRC-32C over type and payload:
//
//	+----------+----------+---------+----------------------+
//	| len  u32 | crc  u32 | type u8 |  payload (len bytes) |
//	+----------+----------+---------+----------------------+
//
//	leader → follower  hello    version u32, term u64, nonce [32], cluster shortstr
//	follower → leader  login    nonce [32], mac [32], name shortstr
//	leader → follower  welcome  mac [32]
//	follower → leader  have     count u32, then per file: name shortstr, size u64, crc u32
//	leader → follower  data     seg u64, off u64, octets: segment seg holds them at off
//	leader → follower  part     name shortstr, off u64, octets: part of a file's new content
//	leader → follower  file     name shortstr, size u64, crc u32: the parts are whole: replace
//	leader → follower  remove   name shortstr
//	leader → follower  ping     (empty): all written is sent (or idle); answer with an ack
//	follower → leader  ack      seg u64, off u64: the log up to there is on the follower's disk
//	either             refuse   text: why the session ends
//
// Names are relative to the data directory: meta.snap, wal/<seq>.seg, wal/<seq>.idx, and
// "definitions" for the definitions file wherever each side keeps it.
//
// Authentication. The follower's mac is HMAC-SHA256 of the shared secret over "follower",
// the cluster, the term and both nonces; the leader's is the same over "leader". Neither
// side sends the secret, and each proves it knows it to the other. A follower refuses a
// leader of a term older than the newest it has seen (kept in <dir>/TERM).
//
// Full sync. The follower lists what it has, with each file's size and CRC-32C. The leader
// first registers the follower for change events, then lists its own files, so nothing
// changed after the listing is missed: an event repeated against the listing only sends
// the same file again. It removes what it does not have, replaces the small files whose
// size or CRC differ, and finds the first segment the follower does not hold whole: where
// the follower's copy is a prefix of the leader's (by CRC), copying resumes at its end,
// else at 0; later segments the follower has are removed. Streaming then starts there.
// The follower acks nothing before the data message that sets that position (its disk
// may hold a stale copy longer than the leader's log); the leader ends a session whose
// first ack is not that position, or whose ack passes what it sent.
//
// Streaming. The leader reads its own segment files (never the writer's buffers): a
// follower's cursor goes through the segments in order up to what the writer has written,
// so catching up and streaming are the same loop. The writer's tap (wal.go) wakes the
// senders when it writes and queues an event when a file is replaced or removed, with the
// position the log was written to then; a sender sends the log up to an event's position
// before the event, so the follower sees files change in the order the leader changed
// them (a checkpoint before the removal of the segment it stands in for, copies of
// messages before the removal of their old segment). The follower writes at the leader's
// offsets, fsyncs before each ack, and replaces files by writing, fsyncing and renaming.
//
// In sync. A follower is in sync while it acks within timeout and is no more than maxLag
// octets behind what the leader has written; it leaves the set (logged) when either fails,
// and joins again once it is within maxLag/2 and holds everything confirmed so far (and
// all the log held when this leader began). The log's completion is gated: a publisher
// confirm, tx.commit-ok or durable declare-ok waits for the local fsync and for every
// follower in sync to ack the batch, with at least minInSync in sync; so each holds every
// confirmed record. With fewer followers in sync, completion waits (the rule: no
// confirm without -min-insync copies); with minInSync 0 and none in sync it does not wait,
// and a follower joins only once it holds what completed meanwhile. A negative minInSync
// (MinInSyncAuto, amqpd's default) is 1 while a follower session that has been in sync
// still acks within timeout, and 0 otherwise (requiredLocked): a pair keeps two copies
// while both nodes live, and a cluster of one, or one whose followers are gone, goes on
// alone. A closing log gives them
// walCloseGrace, then fails what they never acked (the publishes are nacked). In a
// cluster the set is also published (publishISR) before completion counts on a change
// of it, and nothing completes while the term may be over. Closing the replicaServer
// removes the gate.
const (
	replVersion  = 1
	replMaxFrame = 4 << 20
	replChunk    = 256 << 10 // octets of a file or segment per message: what a cut session loses at most
	replNonce    = 32
	replHeader   = 9
)

// Replication message types.
const (
	replHello   = 1
	replLogin   = 2
	replWelcome = 3
	replHave    = 4
	replData    = 5
	replPart    = 6
	replFile    = 7
	replRemove  = 8
	replPing    = 9
	replAck     = 10
	replRefuse  = 11
)

var (
	errReplAuth      = errors.New("amqp: replication: authentication failed")
	errReplOlderTerm = errors.New("amqp: replication: leader's term is older than one seen")
	errReplProtocol  = errors.New("amqp: replication: protocol error")
	errReplClosed    = errors.New("amqp: replication: the leader closed")
)

// replConn frames replication messages on a connection: one goroutine receives, one sends.
type replConn struct {
	c   net.Conn
	r   *bufio.Reader
	w   *bufio.Writer
	buf []byte // the last payload received
}

func newReplConn(c net.Conn) *replConn {
	return &replConn{c: c, r: bufio.NewReaderSize(c, 256<<10), w: bufio.NewWriterSize(c, 256<<10)}
}

// send writes one message of parts, buffered.
func (rc *replConn) send(typ uint8, parts ...[]byte) error {
	var hdr [replHeader]byte
	n := 0
	crc := crc32.Update(0, crcTable, []byte{typ})
	for _, p := range parts {
		n += len(p)
		crc = crc32.Update(crc, crcTable, p)
	}
	binary.BigEndian.PutUint32(hdr[:], uint32(n))
	binary.BigEndian.PutUint32(hdr[4:], crc)
	hdr[8] = typ
	if _, err := rc.w.Write(hdr[:]); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := rc.w.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// recv reads one message; its payload is valid until the next recv.
func (rc *replConn) recv() (uint8, []byte, error) {
	var hdr [replHeader]byte
	if _, err := io.ReadFull(rc.r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > replMaxFrame {
		return 0, nil, errReplProtocol
	}
	rc.buf = slices.Grow(rc.buf[:0], int(n))[:n]
	if _, err := io.ReadFull(rc.r, rc.buf); err != nil {
		return 0, nil, err
	}
	if crc32.Update(crc32.Update(0, crcTable, hdr[8:]), crcTable, rc.buf) != binary.BigEndian.Uint32(hdr[4:]) {
		return 0, nil, errors.New("amqp: replication: message fails its checksum")
	}
	return hdr[8], rc.buf, nil
}

// refuse tells the peer why the session ends.
func (rc *replConn) refuse(why string) {
	rc.c.SetWriteDeadline(time.Now().Add(time.Second))
	if rc.send(replRefuse, []byte(why)) == nil {
		rc.w.Flush()
	}
}

// replMAC proves knowledge of secret to the peer, for one side of one session.
func replMAC(secret []byte, side, cluster string, term uint64, nonceL, nonceF []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write(appendShortstr(appendShortstr(nil, side), cluster))
	m.Write(binary.BigEndian.AppendUint64(nil, term))
	m.Write(nonceL)
	m.Write(nonceF)
	return m.Sum(nil)
}

// replFileInfo is a file's size and CRC-32C.
type replFileInfo struct {
	size int64
	crc  uint32
}

// fileCRC returns the size of the file and the CRC-32C of its first limit octets (all of
// it when limit is negative).
func fileCRC(path string, limit int64) (replFileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return replFileInfo{}, err
	}
	defer f.Close()
	var r io.Reader = f
	if limit >= 0 {
		r = io.LimitReader(f, limit)
	}
	h := crc32.New(crcTable)
	n, err := io.Copy(h, r)
	return replFileInfo{n, h.Sum32()}, err
}

// replName checks a file name from the peer and returns its segment number when it
// names a segment; ok is false for a name replication never uses.
func replName(name string) (seq uint64, seg, ok bool) {
	if name == "meta.snap" || name == "definitions" {
		return 0, false, true
	}
	base, found := strings.CutPrefix(name, "wal/")
	if !found || len(base) != 24 || !strings.HasSuffix(base, ".seg") && !strings.HasSuffix(base, ".idx") {
		return 0, false, false
	}
	seq, err := strconv.ParseUint(base[:20], 10, 64)
	if err != nil {
		return 0, false, false
	}
	return seq, strings.HasSuffix(base, ".seg"), true
}

// localPath maps a replicated name to a file of dir (defs for "definitions"); "" when
// there is none.
func localPath(dir, defs, name string) string {
	if name == "definitions" {
		return defs
	}
	return filepath.Join(dir, filepath.FromSlash(name))
}

// listFiles returns the replicated files of dir (and defs), by name.
func listFiles(dir, defs string) (map[string]string, error) {
	files := make(map[string]string)
	for _, pat := range []string{"*.seg", "*.idx"} {
		names, err := filepath.Glob(filepath.Join(dir, "wal", pat))
		if err != nil {
			return nil, err
		}
		for _, p := range names {
			if name := "wal/" + filepath.Base(p); validName(name) {
				files[name] = p
			}
		}
	}
	for _, name := range []string{"meta.snap", "definitions"} {
		if p := localPath(dir, defs, name); p != "" {
			if _, err := os.Stat(p); err == nil {
				files[name] = p
			}
		}
	}
	return files, nil
}

func validName(name string) bool { _, _, ok := replName(name); return ok }

// pack is a position as the log's writtenTo holds it: segment<<32 | offset.
func pack(p walPos) uint64 { return p.seg<<32 | p.off }

func unpack(v uint64) walPos { return walPos{v >> 32, v & (1<<32 - 1)} }

// replicaOptions configure the leader's side of replication.
type replicaOptions struct {
	cluster string
	term    uint64 // the leader's term: its etcd leader key's create revision
	secret  []byte
	defs    string // the definitions file, replicated as "definitions"; "" for none
	// minInSync is how many followers in sync a batch's tickets need: they are done only
	// once every follower in sync holds it, and at least minInSync are in sync (with 0
	// and none in sync, at once); negative is MinInSyncAuto (requiredLocked).
	minInSync int
	// leading, when set, gates the log too: while it reports false (the term may be over)
	// nothing more is done, so nothing more is confirmed.
	leading func() bool
	// publishISR, when set, is given the names of the followers in sync (sorted) whenever
	// that set changes, and at the start; until it has returned nil for the current set,
	// nothing more is done. A cluster keeps the set in etcd, where it says who may stand.
	publishISR func(followers []string) error
	maxLag     int64         // octets a follower may be behind and stay in sync; 0: 4 segments
	timeout    time.Duration // a follower silent this long leaves the in-sync set; 0: 5 s
	log        *slog.Logger
}

// replicaServer is the leader's side: it serves followers the log's directory.
type replicaServer struct {
	w    *wal
	opt  replicaOptions
	tap  *walTap // what it set on w
	stop chan struct{}
	wg   sync.WaitGroup
	// start is where the log stood when this server began: a follower joins the in-sync
	// set only once it holds that much (all an earlier leader may have confirmed).
	start uint64

	isrDone atomic.Uint64 // the last version of the in-sync set published (publishISR)
	isrWake chan struct{} // 1 slot: the set changed

	mu           sync.Mutex
	isrPublished chan struct{}              // guarded by mu: closed, and replaced, each time isrDone grows
	events       []replEvent                // guarded by mu: files changed, oldest first
	evBase       int                        // guarded by mu: events trimmed off the front
	followers    map[*replFollower]struct{} // guarded by mu
	sessions     uint64                     // guarded by mu: sessions begun
	conns        map[net.Conn]struct{}      // guarded by mu
	lns          []net.Listener             // guarded by mu
	closed       bool                       // guarded by mu
	// The followers in sync and what they all hold. held is the lowest ack among them
	// when they are minInSync or more, else 0; floor is the highest held ever, which
	// holds everything confirmed. version counts the set's changes; a held is used only
	// once its version is published, so every record confirmed is on each node named.
	isrNames []string // guarded by mu: sorted
	names    []string // guarded by mu: recomputeLocked's scratch, so an ack allocates nothing
	version  uint64   // guarded by mu
	held     uint64   // guarded by mu
	heldAt   uint64   // guarded by mu: the version held was computed for
	floor    uint64   // guarded by mu
}

// replEvent is a file replaced or removed when the log was written up to at.
type replEvent struct {
	name string
	at   uint64
}

// replMaxEvents bounds the events kept for a slow follower; one further behind resyncs.
const replMaxEvents = 1 << 16

// replFollower is the leader's view of one follower's session.
type replFollower struct {
	name, addr string
	wake       chan struct{} // 1 slot: the log was written or a file changed
	next       int           // guarded by rs.mu: the next event it is sent (counted from the first ever)
	acked      uint64        // guarded by rs.mu: the log position its disk holds (packed)
	lastAck    time.Time     // guarded by rs.mu
	inSync     bool          // guarded by rs.mu
	wasInSync  bool          // guarded by rs.mu: it was in sync in this session (requiredLocked)
	replaced   bool          // guarded by rs.mu: a newer session of the same follower began; never in sync again
	mustReach  uint64        // guarded by rs.mu: it joins the in-sync set only once acked this far (sendLog)
	catchingUp bool          // guarded by rs.mu: close behind, not yet holding all that was confirmed
	session    uint64        // guarded by rs.mu: sessions are numbered in the order they began
	// sentTo is as far as this session may have sent the log: an ack beyond it reports a
	// copy the session did not make (a stale one), and ends the session.
	sentTo atomic.Uint64
}

// replStatus is one follower as the leader sees it.
type replStatus struct {
	name   string
	acked  walPos
	lag    int64
	inSync bool
}

// newReplicaServer taps w: from now on the writer tells it what it writes and changes,
// and completion waits for the followers in sync (at least minInSync of them).
func newReplicaServer(w *wal, opt replicaOptions) *replicaServer {
	if opt.maxLag <= 0 {
		opt.maxLag = 4 * w.segSize
	}
	if opt.timeout <= 0 {
		opt.timeout = 5 * time.Second
	}
	if opt.log == nil {
		opt.log = w.log
	}
	rs := &replicaServer{w: w, opt: opt, stop: make(chan struct{}), followers: make(map[*replFollower]struct{}),
		conns: make(map[net.Conn]struct{}), isrWake: make(chan struct{}, 1), isrPublished: make(chan struct{}), isrNames: []string{},
		start: w.writtenTo.Load()}
	rs.floor = rs.start
	rs.recomputeLocked() // not shared yet
	tap := &walTap{written: rs.wakeAll, changed: rs.changed, held: rs.gate}
	rs.tap = tap
	w.tap.Store(tap)
	rs.wg.Add(1)
	go rs.watch()
	if opt.publishISR != nil { // the empty set counts as published: the caller did
		rs.wg.Add(1)
		go rs.publishMembers()
	}
	return rs
}

// gate is the log's tap.held: how far the log may complete. Nothing while the term may be
// over, or while what the followers hold is not yet published with their names; else
// what every follower in sync holds (nothing with fewer than minInSync), or all when
// none is in sync and none is needed.
func (rs *replicaServer) gate() uint64 {
	if rs.opt.leading != nil && !rs.opt.leading() {
		return 0
	}
	rs.mu.Lock()
	held, at := rs.held, rs.heldAt
	if held == math.MaxUint64 {
		// No follower in sync, and none needed: what completes now is on this node
		// alone, so a follower joins the set only once it holds it (the writer asks
		// after writing, so this covers what it completes).
		rs.floor = max(rs.floor, rs.w.writtenTo.Load())
	}
	rs.mu.Unlock()
	if rs.opt.publishISR != nil && at > rs.isrDone.Load() {
		return 0
	}
	return held
}

// recomputeLocked notes the followers in sync, counting a change of the set (which
// publishMembers then publishes), and what they all hold; it wakes the log's writer when
// that grew. rs.mu must be held.
func (rs *replicaServer) recomputeLocked() {
	names := rs.names[:0]
	var low uint64
	for f := range rs.followers {
		if f.inSync {
			if len(names) == 0 || f.acked < low {
				low = f.acked
			}
			names = append(names, f.name)
		}
	}
	rs.names = names
	slices.Sort(names)
	if !slices.Equal(names, rs.isrNames) {
		rs.isrNames = append([]string{}, names...)
		rs.version++
		select {
		case rs.isrWake <- struct{}{}:
		default:
		}
	}
	switch {
	case len(names) < rs.requiredLocked():
		low = 0
	case len(names) == 0:
		// -min-insync 0 and none in sync: the leader alone, but for a follower catching
		// up, whose acks then hold confirms so that the floor stops running ahead of it
		// (under steady publishing it would never reach a floor at the leader's head).
		low = math.MaxUint64
		for f := range rs.followers {
			if f.catchingUp && !f.replaced {
				low = min(low, f.acked)
			}
		}
		if low != math.MaxUint64 {
			rs.floor = max(rs.floor, low)
		}
	default:
		rs.floor = max(rs.floor, low)
	}
	if low > rs.held {
		rs.w.kick()
	}
	rs.held, rs.heldAt = low, rs.version
}

// requiredLocked is how many followers in sync completion needs: minInSync, or with
// MinInSyncAuto 1 while a follower session that has been in sync acks within timeout: it
// may have fallen behind since, and completion then waits until it is back. One that
// stops acking stops counting after timeout, as it leaves the set; one that comes back in
// a new session counts again only once it is in sync, so a node returning far behind
// does not hold confirms while it copies. rs.mu must be held.
func (rs *replicaServer) requiredLocked() int {
	if rs.opt.minInSync >= 0 {
		return rs.opt.minInSync
	}
	now := time.Now()
	for f := range rs.followers {
		if f.wasInSync && !f.replaced && now.Sub(f.lastAck) <= rs.opt.timeout {
			return 1
		}
	}
	return 0
}

// required is requiredLocked for other goroutines.
func (rs *replicaServer) required() int {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.requiredLocked()
}

// publishMembers publishes the in-sync set whenever it changed, retrying until it is
// published or the server closes, and wakes the log's writer after each.
func (rs *replicaServer) publishMembers() {
	defer rs.wg.Done()
	failing := false
	for {
		rs.mu.Lock()
		want, names := rs.version, slices.Clone(rs.isrNames)
		rs.mu.Unlock()
		if want != rs.isrDone.Load() {
			if err := rs.opt.publishISR(names); err != nil {
				if !failing {
					rs.opt.log.Warn("replication: cannot record the in-sync set; confirms wait", "err", err)
				}
				failing = true
				select {
				case <-rs.stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
				continue
			}
			failing = false
			rs.isrDone.Store(want)
			rs.mu.Lock()
			close(rs.isrPublished)
			rs.isrPublished = make(chan struct{})
			rs.mu.Unlock()
			rs.w.kick()
			continue
		}
		select {
		case <-rs.stop:
			return
		case <-rs.isrWake:
		}
	}
}

// serve accepts followers on ln until close.
func (rs *replicaServer) serve(ln net.Listener) error {
	rs.mu.Lock()
	if rs.closed {
		rs.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	rs.lns = append(rs.lns, ln)
	rs.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			rs.mu.Lock()
			closed := rs.closed
			rs.mu.Unlock()
			if closed {
				return nil
			}
			return err
		}
		rs.mu.Lock()
		if rs.closed {
			rs.mu.Unlock()
			c.Close()
			return nil
		}
		rs.conns[c] = struct{}{}
		rs.wg.Add(1)
		rs.mu.Unlock()
		go rs.handle(c)
	}
}

// close stops serving, ends every session and removes the tap: the log completes on its
// own fsync again. A leader that loses its term must stop confirming before this.
func (rs *replicaServer) close() {
	rs.mu.Lock()
	if rs.closed {
		rs.mu.Unlock()
		return
	}
	rs.closed = true
	close(rs.stop)
	for _, ln := range rs.lns {
		ln.Close()
	}
	for c := range rs.conns {
		c.Close()
	}
	rs.mu.Unlock()
	rs.wg.Wait()
	rs.w.tap.CompareAndSwap(rs.tap, nil) // unless another took its place
	rs.w.kick()
}

// status returns each follower's state.
func (rs *replicaServer) status() []replStatus {
	written := rs.w.writtenTo.Load()
	rs.mu.Lock()
	defer rs.mu.Unlock()
	var st []replStatus
	for f := range rs.followers {
		st = append(st, replStatus{f.name, unpack(f.acked), rs.lag(f.acked, written), f.inSync})
	}
	slices.SortFunc(st, func(a, b replStatus) int { return strings.Compare(a.name, b.name) })
	return st
}

// wakeAll wakes every sender: the log was written further. It runs on the log's writer.
func (rs *replicaServer) wakeAll() {
	rs.mu.Lock()
	for f := range rs.followers {
		select {
		case f.wake <- struct{}{}:
		default:
		}
	}
	rs.mu.Unlock()
}

// changed queues a file event for every follower. It runs where the log changes the file.
func (rs *replicaServer) changed(name string, at uint64) {
	rs.mu.Lock()
	rs.events = append(rs.events, replEvent{name, at})
	if len(rs.events) > 256 {
		// Keep the events some follower has yet to be sent, up to replMaxEvents.
		base := rs.evBase + len(rs.events)
		for f := range rs.followers {
			base = min(base, f.next)
		}
		base = max(base, rs.evBase+len(rs.events)-replMaxEvents, rs.evBase)
		rs.events = slices.Delete(rs.events, 0, base-rs.evBase)
		rs.evBase = base
	}
	rs.mu.Unlock()
	rs.wakeAll()
}

// lag is how many octets from is behind to, counting whole segments between at the log's
// segment size.
func (rs *replicaServer) lag(from, to uint64) int64 {
	if from >= to {
		return 0
	}
	f, t := unpack(from), unpack(to)
	return max(0, int64(t.seg-f.seg)*rs.w.segSize+int64(t.off)-int64(f.off))
}

// watch leaves out of the in-sync set the followers that stopped acking.
func (rs *replicaServer) watch() {
	defer rs.wg.Done()
	t := time.NewTicker(rs.opt.timeout / 4)
	defer t.Stop()
	for {
		select {
		case <-rs.stop:
			return
		case <-t.C:
		}
		rs.update(nil, 0)
	}
}

// update notes an ack of pos from f (when f is set), decides who is in sync, and
// recomputes what the followers hold; it wakes the writer when that grows.
func (rs *replicaServer) update(f *replFollower, pos uint64) {
	written := rs.w.writtenTo.Load()
	now := time.Now()
	rs.mu.Lock()
	if f != nil {
		f.acked = max(f.acked, pos)
		f.lastAck = now
	}
	for g := range rs.followers {
		lag, silent := rs.lag(g.acked, written), now.Sub(g.lastAck)
		switch {
		case g.inSync && lag > rs.opt.maxLag:
			g.inSync = false
			rs.opt.log.Warn("replication: follower fell behind; it left the in-sync set", "follower", g.name, "addr", g.addr, "lag", lag)
		case g.inSync && silent > rs.opt.timeout:
			g.inSync = false
			rs.opt.log.Warn("replication: follower stopped acknowledging; it left the in-sync set", "follower", g.name, "addr", g.addr, "silent", silent.String())
		case !g.inSync && !g.replaced && lag <= rs.opt.maxLag/2 && silent <= rs.opt.timeout && !g.lastAck.IsZero() && g.acked >= g.mustReach:
			// Close behind. Once it holds everything confirmed it is named, and may stand;
			// until then it is catching up, which with -min-insync 0 and none in sync
			// keeps the leader from confirming alone past it (recomputeLocked).
			g.catchingUp = g.acked < rs.floor
			if !g.catchingUp {
				g.inSync, g.wasInSync = true, true
				rs.opt.log.Info("replication: follower is in sync", "follower", g.name, "addr", g.addr)
			}
		default:
			g.catchingUp = false
		}
	}
	rs.recomputeLocked()
	rs.mu.Unlock()
}

// unname takes any earlier session of f's follower out of the in-sync set, for good, and
// waits until a set without its name is published: f's plan may remove files from its
// disk before sending what replaces them, and a node the record names may stand. It
// fails when the server closes.
func (rs *replicaServer) unname(f *replFollower) error {
	rs.mu.Lock()
	for g := range rs.followers {
		if g.name == f.name && g.session < f.session { // not a later one: it replaces f
			g.replaced = true
			if g.inSync {
				g.inSync = false
				rs.opt.log.Warn("replication: follower reconnected; its earlier session left the in-sync set", "follower", g.name, "addr", g.addr)
			}
		}
	}
	rs.recomputeLocked()
	v := rs.version
	rs.mu.Unlock()
	if rs.opt.publishISR == nil {
		return nil
	}
	for {
		rs.mu.Lock()
		published := rs.isrPublished
		rs.mu.Unlock()
		if rs.isrDone.Load() >= v {
			return nil
		}
		select {
		case <-rs.stop:
			return errReplClosed
		case <-published:
		}
	}
}

// handle runs one follower's session.
func (rs *replicaServer) handle(c net.Conn) {
	defer rs.wg.Done()
	defer func() {
		c.Close()
		rs.mu.Lock()
		delete(rs.conns, c)
		rs.mu.Unlock()
	}()
	addr := c.RemoteAddr().String()
	rc := newReplConn(c)
	name, have, err := rs.handshake(rc)
	if err != nil {
		rs.opt.log.Warn("replication: follower refused", "addr", addr, "err", err)
		return
	}
	f := &replFollower{name: name, addr: addr, wake: make(chan struct{}, 1)}
	// Registered before the listing: every change after it reaches f as an event.
	rs.mu.Lock()
	f.next = rs.evBase + len(rs.events)
	rs.sessions++
	f.session = rs.sessions
	rs.followers[f] = struct{}{}
	rs.mu.Unlock()
	defer func() {
		rs.mu.Lock()
		delete(rs.followers, f)
		rs.recomputeLocked()
		rs.mu.Unlock()
		if f.inSync {
			rs.opt.log.Warn("replication: in-sync follower disconnected", "follower", name, "addr", addr, "err", err)
		}
	}()
	rs.opt.log.Info("replication: follower connected", "follower", name, "addr", addr)
	if err = rs.unname(f); err != nil {
		return
	}
	cur, err := rs.plan(rc, have)
	if err != nil {
		return
	}
	f.sentTo.Store(pack(cur))
	acks := make(chan struct{}) // closed when the follower's acks end, with ackErr
	var ackErr error
	go func() {
		defer close(acks)
		for first := true; ; first = false {
			typ, p, err := rc.recv()
			if err == nil && (typ != replAck || len(p) != 16) {
				err = errReplProtocol
			}
			var pos uint64
			if err == nil {
				// The first ack is of the position the plan set, the truncation done; none
				// may pass what the session sent. Else the follower reports a copy this
				// session did not make, and counting it could confirm what it lacks.
				pos = pack(walPos{binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])})
				if first && pos != pack(cur) || pos > f.sentTo.Load() {
					err = errors.New("amqp: replication: follower acked a position this session did not send")
				}
			}
			if err != nil {
				ackErr = err
				c.Close()
				return
			}
			rs.update(f, pos)
		}
	}()
	err = rs.stream(rc, f, cur, acks)
	c.Close()
	<-acks
	if err == nil {
		err = ackErr
	}
}

// handshake authenticates the follower both ways and returns its name and files.
func (rs *replicaServer) handshake(rc *replConn) (string, map[string]replFileInfo, error) {
	rc.c.SetDeadline(time.Now().Add(10 * time.Second))
	defer rc.c.SetDeadline(time.Time{})
	nonce := make([]byte, replNonce)
	rand.Read(nonce)
	hello := binary.BigEndian.AppendUint32(nil, replVersion)
	hello = binary.BigEndian.AppendUint64(hello, rs.opt.term)
	hello = appendShortstr(append(hello, nonce...), rs.opt.cluster)
	if err := rc.send(replHello, hello); err != nil {
		return "", nil, err
	}
	if err := rc.w.Flush(); err != nil {
		return "", nil, err
	}
	typ, p, err := rc.recv()
	if err != nil {
		return "", nil, err
	}
	if typ == replRefuse {
		return "", nil, errors.New("amqp: replication: follower refused: " + string(p))
	}
	d := decoder{b: p}
	fnonce, mac := d.bytes(replNonce), d.bytes(sha256.Size)
	name := d.shortstr()
	if typ != replLogin || d.err != nil {
		return "", nil, errReplProtocol
	}
	if !hmac.Equal(mac, replMAC(rs.opt.secret, "follower", rs.opt.cluster, rs.opt.term, nonce, fnonce)) {
		rc.refuse("authentication failed")
		return "", nil, errReplAuth
	}
	if err := rc.send(replWelcome, replMAC(rs.opt.secret, "leader", rs.opt.cluster, rs.opt.term, nonce, fnonce)); err != nil {
		return "", nil, err
	}
	if err := rc.w.Flush(); err != nil {
		return "", nil, err
	}
	typ, p, err = rc.recv()
	if err != nil {
		return "", nil, err
	}
	if typ == replRefuse {
		return "", nil, errors.New("amqp: replication: follower refused: " + string(p))
	}
	d = decoder{b: p}
	n := d.long()
	have := make(map[string]replFileInfo, min(n, 1<<16))
	for i := uint32(0); i < n && d.err == nil; i++ {
		name := d.shortstr()
		have[name] = replFileInfo{int64(d.longlong()), d.long()}
	}
	if typ != replHave || d.err != nil {
		return "", nil, errReplProtocol
	}
	return name, have, nil
}

// plan brings the follower's files in line with the leader's listing and returns where
// its log copy resumes.
func (rs *replicaServer) plan(rc *replConn, have map[string]replFileInfo) (walPos, error) {
	files, err := listFiles(rs.w.dir, rs.opt.defs)
	if err != nil {
		return walPos{}, err
	}
	var segs []uint64
	for name := range files {
		if seq, seg, _ := replName(name); seg {
			segs = append(segs, seq)
		}
	}
	slices.Sort(segs)
	if len(segs) == 0 {
		return walPos{}, errors.New("amqp: replication: the log has no segments")
	}
	for name := range have {
		if _, ok := files[name]; !ok && validName(name) && (name != "definitions" || rs.opt.defs != "") {
			if err := rc.send(replRemove, appendShortstr(nil, name)); err != nil {
				return walPos{}, err
			}
		}
	}
	for name, path := range files {
		if _, seg, _ := replName(name); seg {
			continue
		}
		if h, ok := have[name]; ok {
			if mine, err := fileCRC(path, -1); err == nil && mine == h {
				continue
			}
		}
		if err := rs.sendFile(rc, name); err != nil {
			return walPos{}, err
		}
	}
	written := unpack(rs.w.writtenTo.Load())
	var cur walPos
	for i, seq := range segs {
		name := segName(seq)
		h, ok := have[name]
		if !ok {
			cur = walPos{seq, 0}
			break
		}
		mine, err := fileCRC(files[name], h.size)
		if err != nil || mine != h {
			cur = walPos{seq, 0}
			break
		}
		cur = walPos{seq, uint64(h.size)}
		if seq >= written.seg || i == len(segs)-1 {
			break
		}
		if full, err := os.Stat(files[name]); err != nil || full.Size() != h.size {
			break
		}
	}
	// A follower's segment after the one it resumes in would sit after a gap: it goes.
	for name := range have {
		if seq, seg, _ := replName(name); seg && seq > cur.seg {
			if err := rc.send(replRemove, appendShortstr(nil, name)); err != nil {
				return walPos{}, err
			}
		}
	}
	// An empty data message tells the follower where it stands.
	return cur, rc.send(replData, binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, cur.seg), cur.off))
}

// sendFile sends the file's current content, or its removal when it is gone.
func (rs *replicaServer) sendFile(rc *replConn, name string) error {
	if name == "definitions" && rs.opt.defs == "" {
		return nil // not replicated
	}
	var b []byte
	var err error
	if _, seg, _ := replName(name); !seg {
		b, err = os.ReadFile(localPath(rs.w.dir, rs.opt.defs, name))
	} else {
		_, err = os.Stat(localPath(rs.w.dir, rs.opt.defs, name))
		if err == nil {
			return nil // a segment's content goes as data, only its removal as an event
		}
	}
	if errors.Is(err, os.ErrNotExist) {
		return rc.send(replRemove, appendShortstr(nil, name))
	}
	if err != nil {
		return err
	}
	hdr := appendShortstr(nil, name)
	for off := 0; off < len(b); off += replChunk {
		part := b[off:min(off+replChunk, len(b))]
		if err := rc.send(replPart, binary.BigEndian.AppendUint64(hdr, uint64(off)), part); err != nil {
			return err
		}
	}
	done := binary.BigEndian.AppendUint64(hdr, uint64(len(b)))
	return rc.send(replFile, binary.BigEndian.AppendUint32(done, crc32.Checksum(b, crcTable)))
}

// stream sends f the log from cur as the writer writes it, and the file events in their
// place, until the session fails or the server closes.
func (rs *replicaServer) stream(rc *replConn, f *replFollower, cur walPos, acks <-chan struct{}) error {
	var file *os.File
	defer func() {
		if file != nil {
			file.Close()
		}
	}()
	buf := make([]byte, replChunk)
	ping := time.NewTicker(rs.opt.timeout / 4)
	defer ping.Stop()
	atHead := false // a ping was sent since the log last moved
	for {
		rs.mu.Lock()
		if f.next < rs.evBase {
			rs.mu.Unlock()
			rc.refuse("too far behind: resync")
			return errors.New("amqp: replication: follower fell too far behind")
		}
		var ev replEvent
		pending := f.next-rs.evBase < len(rs.events)
		if pending {
			ev = rs.events[f.next-rs.evBase]
		}
		rs.mu.Unlock()
		limit := rs.w.writtenTo.Load()
		if pending && ev.at <= pack(cur) {
			if err := rs.sendFile(rc, ev.name); err != nil {
				return err
			}
			rs.mu.Lock()
			f.next++
			rs.mu.Unlock()
			continue
		}
		if pending {
			limit = min(limit, ev.at)
		}
		f.sentTo.Store(max(f.sentTo.Load(), limit)) // before the follower can ack it
		moved, err := rs.sendLog(rc, f, &cur, &file, unpack(limit), buf)
		if err != nil {
			return err
		}
		if moved {
			atHead = false
			continue
		}
		if !atHead {
			// All that is written is sent: the ping asks the follower to ack where it stands.
			if err := rc.send(replPing); err != nil {
				return err
			}
			atHead = true
		}
		if err := rc.w.Flush(); err != nil {
			return err
		}
		select {
		case <-f.wake:
		case <-ping.C:
			if err := rc.send(replPing); err != nil {
				return err
			}
			if err := rc.w.Flush(); err != nil {
				return err
			}
		case <-acks:
			return nil
		case <-rs.stop:
			return nil
		}
	}
}

// sendLog sends the next piece of the log after cur, up to limit; it reports whether cur
// moved.
func (rs *replicaServer) sendLog(rc *replConn, f *replFollower, cur *walPos, file **os.File, limit walPos, buf []byte) (bool, error) {
	if !cur.less(limit) {
		return false, nil
	}
	if *file == nil {
		seg, err := os.Open(rs.w.segPath(cur.seg))
		if errors.Is(err, os.ErrNotExist) {
			// Removed by compaction before it was sent: its removal follows as an event,
			// once the log is sent up to where it was removed. Until then the follower
			// may hold part of it, a torn segment before later ones, which it could not
			// replay: it stays out of the in-sync set until it has acked that far.
			rs.mu.Lock()
			f.mustReach = max(f.mustReach, rs.w.writtenTo.Load())
			if f.inSync { // its first acks, before the skip was found, let it in
				f.inSync = false
				rs.opt.log.Warn("replication: follower's copy has a segment compacted away before it was sent; it left the in-sync set", "follower", f.name, "addr", f.addr)
			}
			f.catchingUp = false
			rs.recomputeLocked()
			rs.mu.Unlock()
			return rs.nextSegment(cur, file), nil
		}
		if err != nil {
			return false, err
		}
		*file = seg
	}
	want := len(buf)
	if cur.seg == limit.seg {
		want = min(want, int(limit.off-cur.off))
	}
	n, err := (*file).ReadAt(buf[:want], int64(cur.off))
	if n > 0 {
		hdr := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, cur.seg), cur.off)
		if err := rc.send(replData, hdr, buf[:n]); err != nil {
			return false, err
		}
		cur.off += uint64(n)
		return true, nil
	}
	if err != nil && err != io.EOF {
		return false, err
	}
	if cur.seg < limit.seg {
		// The writer went on to a later segment: this one is whole.
		return rs.nextSegment(cur, file), nil
	}
	return false, nil
}

// nextSegment moves cur to the start of the segment after it; it reports whether there is one.
func (rs *replicaServer) nextSegment(cur *walPos, file **os.File) bool {
	next, ok := rs.w.segmentAfter(cur.seg)
	if !ok {
		return false
	}
	if *file != nil {
		(*file).Close()
		*file = nil
	}
	*cur = walPos{next, 0}
	return true
}
