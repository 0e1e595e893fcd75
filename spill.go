package amqp

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
)

// Paging: a queue past its memory share keeps its newest ready messages wholly on disk and
// holds only a reference for each (refQueue: 16 octets with no pointers, plus a log id
// for a log record, or one for a run of paging file records of one size). A persistent
// message of a durable queue is in the log already; a transient one is written to a
// paging file. The front of the paged tail is read back into memory, a window at a time,
// when the messages before it are gone.
//
// Paging files are appended through a write buffer to files of spillSegment octets in
// <data>/paging; a file goes when nothing in it is queued any more, and no file number is
// used twice. Nothing here needs to survive a crash, so nothing is fsynced, and the
// directory is emptied at start. A paging file record is
//
//	publisher u64, exchange shortstr, key-len u8, props-len u32, data (key | props | body)
//
// the tail of a log publish record (store.go) with the publishing connection in front.

const (
	spillSegment = 16 << 20 // the size at which a paging file is closed to new records
	spillBuffer  = 64 << 10 // what is gathered before a write
)

// diskRef is a ready message kept on disk: a publish record in the log, or a record in a
// paging file. A queue stores it in 16 octets without pointers (refEntry), plus 8 for its
// log record's id in a chunk that holds log records, and 8 for its expiry in a chunk where
// some message expires; a run of paging file records of one size stores as one.
type diskRef struct {
	id uint64 // the log record's message id; 0: a paging file's record
	refEntry
	expires int64 // as qentry.expires
}

// refRedelivered marks a diskRef's message as delivered before (recovered after a restart).
const refRedelivered = 1 << 31

func (r *diskRef) inLog() bool       { return r.id != 0 }
func (r *diskRef) offset() uint32    { return r.off &^ refRedelivered }
func (r *diskRef) redelivered() bool { return r.off&refRedelivered != 0 }

// appendMessageRecord appends what the log and the paging files both keep of m after
// their own fields: exchange, key and properties lengths, routing key, properties, body.
func (m *message) appendMessageRecord(b []byte) []byte {
	b = appendShortstr(b, m.exchange)
	b = append(b, m.keyLen)
	b = binary.BigEndian.AppendUint32(b, m.propsLen)
	return append(b, m.data...)
}

// decodeMessageRecord reads what appendMessageRecord wrote; data is copied.
func decodeMessageRecord(p []byte) (*message, bool) {
	d := decoder{b: p}
	ex := d.shortstr()
	keyLen := d.octet()
	propsLen := d.long()
	if d.err != nil || uint64(keyLen)+uint64(propsLen) > uint64(len(d.b)) {
		return nil, false
	}
	head := uint32(keyLen) + propsLen
	// Read back, a message needs none of what its properties say: its queue has its expiry,
	// and only a publish looks at its delivery mode (a priority queue reads its priority).
	m := newMessage(len(d.b)) // with its data in the same allocation when small
	m.exchange, m.keyLen, m.propsLen, m.size = ex, keyLen, propsLen, uint32(len(d.b))-head
	m.data = append(m.data[:0], d.b...)
	return m, true
}

// spill is the set of paging files.
type spill struct {
	dir     string
	failing atomic.Bool // the last write failed: logged once until one succeeds

	mu   sync.Mutex
	segs map[uint32]*spillSeg // guarded by mu
	head *spillSeg            // guarded by mu: the file records are appended to
	shut bool                 // guarded by mu: closed; nothing more is written
	wbuf []byte               // guarded by mu: the head's octets from head.flushed on
	next uint32               // guarded by mu: the number of the next file
}

// spillSeg is one paging file.
type spillSeg struct {
	n       uint32
	f       *os.File
	size    int64 // octets appended, buffered ones included
	flushed int64 // octets written to the file
	live    int   // records still queued
}

// openSpill empties and opens the paging directory.
func openSpill(dir string) (*spill, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	return &spill{dir: dir, segs: make(map[uint32]*spillSeg), next: 1}, nil
}

func (sp *spill) path(n uint32) string {
	return filepath.Join(sp.dir, strconv.FormatUint(uint64(n), 10)+".page")
}

// put appends m's record and returns its place: a ref with file, off and size set.
func (sp *spill) put(m *message) (diskRef, error) {
	size := 8 + 1 + len(m.exchange) + 1 + 4 + len(m.data)
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.shut {
		return diskRef{}, errors.New("amqp: paging files closed")
	}
	h := sp.head
	if h == nil || h.size+int64(size) > spillSegment && h.size > 0 {
		if err := sp.flushLocked(); err != nil {
			return diskRef{}, err
		}
		f, err := os.OpenFile(sp.path(sp.next), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
		if err != nil {
			return diskRef{}, err
		}
		h = &spillSeg{n: sp.next, f: f}
		sp.next++
		sp.segs[h.n] = h
		sp.head = h
	}
	if len(sp.wbuf)+size > spillBuffer {
		if err := sp.flushLocked(); err != nil {
			return diskRef{}, err
		}
	}
	ref := diskRef{refEntry: refEntry{file: h.n, off: uint32(h.size), size: uint32(size), body: m.size}}
	b := binary.BigEndian.AppendUint64(sp.wbuf, m.publisher)
	b = m.appendMessageRecord(b)
	if size > spillBuffer {
		_, err := h.f.WriteAt(b[len(sp.wbuf):], h.size)
		if err != nil {
			return diskRef{}, err
		}
		h.flushed += int64(size)
	} else {
		sp.wbuf = b
	}
	h.size += int64(size)
	h.live++
	return ref, nil
}

// flushLocked writes the buffer to the head file. sp.mu must be held.
func (sp *spill) flushLocked() error {
	h := sp.head
	if h == nil || len(sp.wbuf) == 0 {
		return nil
	}
	if _, err := h.f.WriteAt(sp.wbuf, h.flushed); err != nil {
		return err
	}
	h.flushed += int64(len(sp.wbuf))
	sp.wbuf = sp.wbuf[:0]
	return nil
}

// get reads back the message of a paging file ref, through a queue's read-ahead window:
// from the window when it holds the record, from the write buffer when the record is
// still there, else by reading a new window that starts at the record.
func (sp *spill) get(r *diskRef, ra *readAhead) (*message, error) {
	rec := ra.window(true, uint64(r.file), uint64(r.offset()), int64(r.size))
	if rec == nil {
		var err error
		if rec, err = sp.read(r, ra); err != nil {
			return nil, err
		}
	}
	if len(rec) < 8 {
		return nil, errors.New("amqp: paging file record too short")
	}
	m, ok := decodeMessageRecord(rec[8:])
	if !ok || m.size != r.body {
		return nil, errors.New("amqp: malformed paging file record")
	}
	m.publisher = binary.BigEndian.Uint64(rec)
	return m, nil
}

// read reads a record from its file, or the write buffer, into a new window.
func (sp *spill) read(r *diskRef, ra *readAhead) ([]byte, error) {
	off, size := int64(r.offset()), int64(r.size)
	sp.mu.Lock()
	s := sp.segs[r.file]
	if s == nil {
		sp.mu.Unlock()
		return nil, errors.New("amqp: no paging file " + strconv.FormatUint(uint64(r.file), 10))
	}
	if off >= s.flushed {
		// Still in the write buffer.
		i := off - s.flushed
		b := append([]byte(nil), sp.wbuf[i:i+size]...)
		sp.mu.Unlock()
		return b, nil
	}
	written := s.flushed // every octet below is in the file; a flush may be writing past it
	sp.mu.Unlock()
	n := min(max(size, readAheadWindow), written-off)
	b := ra.buf[:0]
	if !ra.spill || int64(cap(b)) < n || cap(b) > readAheadWindow {
		// Only a paging window of the usual size is reused: get copies out of it and nothing
		// else sees it, and one made for a larger record is not kept.
		b = make([]byte, n)
	}
	b = b[:n]
	*ra = readAhead{} // until the read below succeeds, it holds no window
	k, err := s.f.ReadAt(b, off)
	if int64(k) < size {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	*ra = readAhead{spill: true, seg: uint64(r.file), off: uint64(off), buf: b[:k]}
	return b[:size:size], nil
}

// release says a record is no longer queued anywhere; a file with none left goes (and is
// never reused, so a read-ahead window can never hold stale octets).
func (sp *spill) release(file uint32) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	s := sp.segs[file]
	if s == nil {
		return
	}
	if s.live--; s.live > 0 {
		return
	}
	sp.removeLocked(s)
	if s == sp.head {
		sp.head = nil
		sp.wbuf = sp.wbuf[:0]
	}
}

// removeLocked closes and deletes a paging file. sp.mu must be held.
func (sp *spill) removeLocked(s *spillSeg) {
	delete(sp.segs, s.n)
	s.f.Close()
	os.Remove(sp.path(s.n))
}

// files is the number of paging files, for tests.
func (sp *spill) files() int {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return len(sp.segs)
}

// close deletes every paging file.
func (sp *spill) close() {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.shut = true
	for _, s := range sp.segs {
		sp.removeLocked(s)
	}
	sp.head = nil
	sp.wbuf = nil
}

// pageOutLocked keeps e's message on disk and only a ref to it in q. It reports false
// when it cannot (a paging file cannot be written): the message stays in memory, ahead
// of older paged ones. q.mu must be held.
func (q *queue) pageOutLocked(e qentry) bool {
	m := e.msg
	var ref diskRef
	if m.wal != nil && q.walID != 0 && q.vh.store != nil {
		ref = q.vh.store.pageOut(q, m)
	} else if sp := q.vh.spill; sp != nil {
		var err error
		if ref, err = sp.put(m); err != nil {
			if !sp.failing.Swap(true) {
				q.vh.log().Error("cannot write a paging file; transient messages stay in memory, ahead of older paged ones", "queue", q.name, "vhost", q.vh.name, "err", err)
			}
			return false
		}
		if sp.failing.Load() {
			sp.failing.Store(false)
		}
	} else {
		return false
	}
	ref.expires = e.expires
	if q.tail == nil {
		q.tail = &refQueue{}
	}
	if q.tail.len() == 0 {
		q.tailSeq = e.seq
	}
	q.tail.push(ref)
	return true
}

// aheadLocked returns q's read-ahead window, made on first use. q.mu must be held.
func (q *queue) aheadLocked() *readAhead {
	if q.ahead == nil {
		q.ahead = &readAhead{}
	}
	return q.ahead
}

// fillLocked reads messages at the front of the tail back into memory, about a window's
// worth, once nothing is ready ahead of them. notYet says the front's log record is not
// written yet (the caller retries after the log's next batch); a read that fails is
// logged and returned as the 541 that closes the channel the message was for. q.mu must
// be held.
func (q *queue) fillLocked() (notYet bool, e *Error) {
	if q.ready.len() > 0 || len(q.requeued) > 0 || q.tail.len() == 0 {
		return false, nil
	}
	var logged []*message
	for read := 0; q.tail.len() > 0 && read < readAheadWindow; {
		r := q.tail.front()
		var m *message
		var err error
		if r.inLog() {
			m, err = q.vh.store.readRef(&r, q.aheadLocked())
		} else {
			m, err = q.vh.spill.get(&r, q.aheadLocked())
		}
		if err != nil {
			if q.ready.len() > 0 {
				break // deliver what was read; the next fill says what went wrong
			}
			if err == errNotWritten {
				return true, nil
			}
			q.vh.log().Error("reading a paged message back failed", "queue", q.name, "vhost", q.vh.name, "err", err)
			return false, internalError("cannot read a paged message back from disk: " + err.Error())
		}
		ref := q.tail.pop()
		q.ready.push(qentry{msg: m, seq: q.tailSeq, expires: ref.expires, entryMarks: entryMarks{redelivered: ref.redelivered()}})
		q.tailSeq++
		q.ramBytes += m.memCost()
		read += int(ref.size)
		if ref.inLog() {
			logged = append(logged, m)
		} else {
			q.vh.spill.release(ref.file)
		}
	}
	if len(logged) > 0 {
		q.vh.store.loaded(q, logged)
	}
	return false, nil
}

// settleRefsLocked drops paged messages q is done with: an ack record for those in the
// log (or none, for a deleted queue) and their paging file space. q.mu must be held.
func (q *queue) settleRefsLocked(refs []diskRef, record bool) {
	n := 0
	for _, r := range refs {
		if r.inLog() {
			refs[n] = r
			n++
		} else {
			q.vh.spill.release(r.file)
		}
	}
	if n == 0 || q.walID == 0 || q.vh.store == nil {
		return
	}
	if record {
		q.vh.store.settleRefs(q, refs[:n])
	} else {
		q.vh.store.dropRefs(refs[:n])
	}
}

// dropTailLocked drops every paged message (purge, delete). q.mu must be held.
func (q *queue) dropTailLocked(record bool) {
	batch := make([]diskRef, 0, min(q.tail.len(), maxAckIDs))
	for q.tail.len() > 0 {
		batch = append(batch, q.tail.pop())
		if len(batch) == cap(batch) || q.tail.len() == 0 {
			q.settleRefsLocked(batch, record)
			batch = batch[:0]
		}
	}
	q.ahead = nil
}

// loadTailLocked reads every paged message back into memory: a priority queue orders its
// messages by priority, which a paged tail cannot (it holds only what a restart recovered;
// a priority queue never pages). q.mu must be held.
func (q *queue) loadTailLocked() {
	for q.tail.len() > 0 {
		r := q.tail.front()
		m, err := q.readRefLocked(&r)
		seq := q.tailSeq
		q.popRefLocked()
		if err != nil {
			q.vh.log().Error("cannot read a recovered message of a priority queue back; it is dropped", "queue", q.name, "vhost", q.vh.name, "err", err)
			q.settleRefsLocked([]diskRef{r}, true)
			continue
		}
		if s, err := scanProperties(m.props()); err == nil {
			m.priority = s.priority
		}
		q.ready.push(qentry{msg: m, seq: seq, expires: r.expires, entryMarks: entryMarks{redelivered: r.redelivered()}})
		q.readyBytes += int64(m.size)
		q.ramBytes += m.memCost()
	}
}

// headExpiresLocked is when the next ready message expires (0: never). q must not be
// empty, and q.mu must be held.
func (q *queue) headExpiresLocked() int64 {
	if !q.mayExpire {
		return 0 // no message in q has an expiry: a queue without TTLs pays one test
	}
	if q.ready.len() > 0 || len(q.requeued) > 0 {
		return q.peekLocked().expires // the message popLocked takes next
	}
	return q.tail.front().expires
}

// dropHeadLocked drops the next ready message, in memory or paged, for reason (it expired
// or makes room): to the queue's dead-letter exchange when it has one, else settled. It
// reports false when it cannot yet: a paged message to dead-letter whose log record is
// not written (it is retried after the log's next batch). q must not be empty, and q.mu
// must be held.
func (q *queue) dropHeadLocked(reason string) bool {
	if q.ready.len() > 0 || len(q.requeued) > 0 {
		m := q.popLocked().msg
		if !q.deadLetterLocked(m, reason) {
			q.settleOne(m)
		}
		return true
	}
	r := [1]diskRef{q.tail.front()}
	if q.settings().dead != nil && q.vh.dead != nil {
		if q.vh.dead.busy(q) {
			return false // read back once the worker has room: q is dispatched then
		}
		// Dead-lettered, a paged message is read back first: its new copy needs it whole.
		m, err := q.readRefLocked(&r[0])
		if err == errNotWritten {
			q.vh.store.dispatchAfterBatch(q)
			return false
		}
		q.popRefLocked()
		if err == nil {
			q.deadLetterLocked(m, reason)
			return true
		}
		q.vh.log().Error("cannot read a paged message back to dead-letter it; it is dropped", "queue", q.name, "vhost", q.vh.name, "err", err)
		if !r[0].inLog() {
			return true // readRefLocked gave its paging file space back already
		}
	} else {
		q.popRefLocked()
	}
	q.settleRefsLocked(r[:], true)
	return true
}

// popRefLocked removes the front of the tail. q.mu must be held.
func (q *queue) popRefLocked() {
	r := q.tail.pop()
	q.tailSeq++
	q.readyBytes -= int64(r.body)
	if q.tail.len() == 0 {
		q.ahead = nil
	}
}

// readRefLocked reads the paged message at the tail's front back into memory, as q's: a
// log one takes over the ref's hold on its record, a paging file one gives its space back
// (errNotWritten: not yet; the ref stays). q.mu must be held.
func (q *queue) readRefLocked(r *diskRef) (*message, error) {
	if !r.inLog() {
		m, err := q.vh.spill.get(r, q.aheadLocked())
		q.vh.spill.release(r.file)
		return m, err
	}
	m, err := q.vh.store.readRef(r, q.aheadLocked())
	if err != nil {
		return nil, err
	}
	q.vh.store.loaded(q, []*message{m})
	return m, nil
}
