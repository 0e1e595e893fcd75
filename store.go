package amqp

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// The broker's use of the write-ahead log (wal.go): what it logs for a publish, a
// settlement and a topology change; recovery into vhosts and queues; the checkpoint; which
// segments are still needed, and the compaction policy. Record payloads use the wire
// encodings of frame.go (shortstr, longstr, field table):
//
//	1 exchange.declare  vhost shortstr, name shortstr, type shortstr, flags u8, args table
//	2 exchange.delete   vhost shortstr, name shortstr
//	3 queue.declare     vhost shortstr, id u64, name shortstr, flags u8, args table
//	4 queue.delete      id u64
//	5 bind, 6 unbind    vhost shortstr, source shortstr, dest-is-exchange u8, dest shortstr,
//	                    key shortstr, args table
//	7 publish           msg id u64, n u16, n × queue id u64, exchange shortstr, key-len u8,
//	                    props-len u32, data (routing key | properties | body)
//	8 ack               queue id u64, n u32, n × msg id u64 (ack, reject, purge, no-ack)
//
// The checkpoint's payload is the next queue id and message id (u64 each) and the durable
// topology as a sequence of records 1, 3 and 5, each as type u8, len u32, payload.
//
// Recovery loads the checkpoint, replays every segment in order (topology records only
// past the covered position), and rebuilds queues in message-id order. Message ids are
// never reused; a publish record may appear twice when compaction copied it forward, and
// the copies collapse.
const (
	recExchangeDeclare = 1
	recExchangeDelete  = 2
	recQueueDeclare    = 3
	recQueueDelete     = 4
	recBind            = 5
	recUnbind          = 6
	recPublish         = 7
	recAck             = 8
)

// store is the broker's side of the write-ahead log.
type store struct {
	w   *wal
	log *slog.Logger

	mu        sync.Mutex
	segs      map[uint64]*segState // guarded by mu: what the broker needs of each segment
	listeners []*channel           // guarded by mu: channels waiting for confirms after a batch
	waiting   []*queue             // guarded by mu: queues to dispatch after a batch (bodies not written yet)
	nextMsgID uint64               // guarded by mu
	nextQID   uint64               // guarded by mu
	snapPos   walPos               // guarded by mu: the position meta.snap covers
	topoSince int                  // guarded by mu: topology records since the last checkpoint
	ackBuf    []byte               // guarded by mu: reused to encode ack records

	// snapshotFn encodes the durable topology as checkpoint records with every vhost
	// read-locked, and calls at while the locks are held; nil writes no checkpoint.
	snapshotFn func(at func()) []byte
	// noCheckpoint stops all checkpoints: the broker is unhealthy (a lock the snapshot
	// needs may be held for good) or its state half restored. The log alone replays.
	noCheckpoint atomic.Bool
}

// segState is what the broker still needs of one segment.
type segState struct {
	live      int64     // octets of publish records still held by a queue
	topology  bool      // holds topology records
	msgs      []*msgWAL // publish records written here (some may be dead), for copy-forward
	relocated uint64    // ticket of the copy-forward of its messages, 0 if none
}

// msgWAL is a persistent message's place in the log; guarded by store.mu.
type msgWAL struct {
	id     uint64
	ticket uint64 // the log ticket of its record: readable back once it is done
	seg    uint32 // the segment of its record, or of the copy compaction made
	off    uint32 // the record's offset in seg (segments are at most maxSegment)
	recLen uint32 // the record's size, header included
	refs   int32  // durable queues still holding the message
	// prev is where the record was before compaction copied it, readable until the copy
	// is: the old segment goes only once the copy is fsynced. nil if never copied.
	prev   *walPlace
	queues []uint64 // the queues' ids, for copy-forward
}

// pos is the place of m's record in the log.
func (mw *msgWAL) pos() walPos { return walPos{uint64(mw.seg), uint64(mw.off)} }

// place records where m's record is.
func (mw *msgWAL) place(pos walPos, size int64) {
	mw.seg, mw.off, mw.recLen = uint32(pos.seg), uint32(pos.off), uint32(size)
}

// walPlace is a record's position and size, header included.
type walPlace struct {
	pos  walPos
	size int64
}

// recovered is what replay found: topology records in order and each queue's messages.
type recovered struct {
	topology []walRecord           // records 1-6 past the checkpoint, after the checkpoint's own
	messages map[uint64][]*message // queue id → messages in id order
}

type walRecord struct {
	typ     uint8
	payload []byte
}

// storeOptions configure openStoreDir.
type storeOptions struct {
	segmentSize int64
	interval    time.Duration
	repair      bool
	log         *slog.Logger
	snapshot    func(at func()) []byte // see store.snapshotFn
}

// openStoreDir opens the log in dir, reads the checkpoint, replays the segments, and
// starts the writer; it returns what the log holds for the caller to restore.
func openStoreDir(dir string, opts storeOptions) (*store, *recovered, error) {
	w, err := openWAL(dir, walOptions{segmentSize: opts.segmentSize, interval: opts.interval, log: opts.log})
	if err != nil {
		return nil, nil, err
	}
	st := &store{w: w, log: opts.log, segs: make(map[uint64]*segState), nextMsgID: 1, nextQID: 1, snapshotFn: opts.snapshot}
	rec, err := st.replay(opts.repair)
	if err == nil {
		w.onBatch, w.maintain = st.batchDone, st.compact
		err = w.start(st.snapPos.seg)
	}
	if err != nil {
		w.unlock()
		return nil, nil, err
	}
	return st, rec, nil
}

// seg returns the state of segment seq, making it. st.mu must be held.
func (st *store) segLocked(seq uint64) *segState {
	s := st.segs[seq]
	if s == nil {
		s = &segState{}
		st.segs[seq] = s
	}
	return s
}

// replay reads the checkpoint and every record, and returns what they hold.
func (st *store) replay(repair bool) (*recovered, error) {
	rec := &recovered{messages: make(map[uint64][]*message)}
	pos, payload, ok, err := st.w.readCheckpoint()
	if err != nil {
		return nil, err
	}
	if ok {
		if len(payload) < 16 {
			return nil, errors.New("amqp: meta.snap: truncated checkpoint")
		}
		st.snapPos = pos
		st.nextQID = binary.BigEndian.Uint64(payload)
		st.nextMsgID = binary.BigEndian.Uint64(payload[8:])
		for rest := payload[16:]; len(rest) > 0; {
			if len(rest) < 5 {
				return nil, errors.New("amqp: meta.snap: truncated checkpoint")
			}
			size := binary.BigEndian.Uint32(rest[1:])
			if uint64(size) > uint64(len(rest)-5) {
				return nil, errors.New("amqp: meta.snap: truncated checkpoint")
			}
			rec.topology = append(rec.topology, walRecord{rest[0], rest[5 : 5+size]})
			rest = rest[5+size:]
		}
	}
	// Every message seen, found by id; its msgWAL.queues are the queues that still hold
	// it, as the records replayed so far say. Publish records come in id order but for the
	// copies compaction made, so the messages are a list in id order, searched, and the
	// few that come out of order (copies whose original is gone) a map.
	var inOrder []*message
	late := make(map[uint64]*message)
	find := func(id uint64) *message {
		if i, ok := slices.BinarySearchFunc(inOrder, id, func(m *message, id uint64) int { return cmp.Compare(m.wal.id, id) }); ok {
			return inOrder[i]
		}
		return late[id]
	}
	deleted := make(map[uint64]bool) // queue ids deleted
	err = st.w.replay(repair, func(pos walPos, typ uint8, payload []byte, size int64) error {
		switch typ {
		case recPublish:
			d, qids, ok := decodePublishRecord(payload)
			if !ok {
				return errors.New("bad publish record")
			}
			m := find(d.wal.id)
			if m == nil {
				m = d.message
				if n := len(inOrder); n == 0 || inOrder[n-1].wal.id < m.wal.id {
					inOrder = append(inOrder, m)
				} else {
					late[m.wal.id] = m
				}
				m.wal.queues = slices.DeleteFunc(qids, func(q uint64) bool { return deleted[q] })
			}
			// A copy moves the message: this record is now its place in the log.
			m.wal.place(pos, size)
			st.nextMsgID = max(st.nextMsgID, m.wal.id+1)
		case recAck:
			d := decoder{b: payload}
			qid := d.longlong()
			cnt := d.long()
			for j := uint32(0); j < cnt && d.err == nil; j++ {
				if m := find(d.longlong()); m != nil {
					m.wal.queues = removeItem(m.wal.queues, qid)
				}
			}
		case recQueueDelete:
			d := decoder{b: payload}
			qid := d.longlong()
			deleted[qid] = true
			for _, m := range inOrder {
				m.wal.queues = removeItem(m.wal.queues, qid)
			}
			for _, m := range late {
				m.wal.queues = removeItem(m.wal.queues, qid)
			}
			st.segLocked(pos.seg).topology = true
			if !pos.less(st.snapPos) {
				rec.topology = append(rec.topology, walRecord{typ, bytes.Clone(payload)})
			}
		case recQueueDeclare:
			d := decoder{b: payload}
			d.shortstr()
			st.nextQID = max(st.nextQID, d.longlong()+1)
			st.segLocked(pos.seg).topology = true
			if !pos.less(st.snapPos) {
				rec.topology = append(rec.topology, walRecord{typ, bytes.Clone(payload)})
			}
		case recExchangeDeclare, recExchangeDelete, recBind, recUnbind:
			st.segLocked(pos.seg).topology = true
			if !pos.less(st.snapPos) {
				rec.topology = append(rec.topology, walRecord{typ, bytes.Clone(payload)})
			}
		default:
			return errors.New("unknown record type " + strconv.Itoa(int(typ)))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// Queue order is message-id order, never file order: compaction copies old messages
	// forward past newer ones.
	all := inOrder
	if len(late) > 0 {
		all = slices.AppendSeq(slices.Clone(inOrder), maps.Values(late))
		slices.SortFunc(all, func(a, b *message) int { return cmp.Compare(a.wal.id, b.wal.id) })
	}
	for _, m := range all {
		mw := m.wal
		if len(mw.queues) == 0 {
			continue
		}
		slices.Sort(mw.queues)
		mw.queues = slices.Compact(mw.queues)
		for _, q := range mw.queues {
			rec.messages[q] = append(rec.messages[q], m)
		}
		mw.refs = int32(len(mw.queues))
		s := st.segLocked(uint64(mw.seg))
		s.live += int64(mw.recLen)
		s.msgs = append(s.msgs, mw)
	}
	return rec, nil
}

// batchDone runs on the log's writer after each batch: the channels waiting for it
// confirm what is now on disk.
func (st *store) batchDone(done uint64) {
	st.mu.Lock()
	listeners, waiting := st.listeners, st.waiting
	st.listeners, st.waiting = nil, nil
	for _, ch := range listeners {
		ch.walListening = false
	}
	st.mu.Unlock()
	for _, ch := range listeners {
		ch.walSynced(done)
	}
	for _, q := range waiting {
		q.dispatch()
	}
}

// dispatchAfterBatch asks for q.dispatch after the log's next batch: q's next message is
// paged and its record not written yet.
func (st *store) dispatchAfterBatch(q *queue) {
	st.mu.Lock()
	if !slices.Contains(st.waiting, q) {
		st.waiting = append(st.waiting, q)
	}
	st.mu.Unlock()
	st.w.kick()
}

// listen asks for ch.walSynced after the next batch is written.
func (st *store) listen(ch *channel) {
	st.mu.Lock()
	st.listenLocked(ch)
	st.mu.Unlock()
	st.w.kick()
}

// listenLocked is listen with st.mu held.
func (st *store) listenLocked(ch *channel) {
	if !ch.walListening {
		ch.walListening = true
		st.listeners = append(st.listeners, ch)
	}
}

// appendPublishRecord encodes a publish record's payload for these queue ids.
func (m *message) appendPublishRecord(b []byte, qids []uint64) []byte {
	b = binary.BigEndian.AppendUint64(b, m.wal.id)
	b = binary.BigEndian.AppendUint16(b, uint16(len(qids)))
	for _, id := range qids {
		b = binary.BigEndian.AppendUint64(b, id)
	}
	b = appendShortstr(b, m.exchange)
	b = append(b, m.keyLen)
	b = binary.BigEndian.AppendUint32(b, m.propsLen)
	return append(b, m.data...)
}

// logPublish writes a persistent message routed to durable queues and returns the ticket
// that covers it. A confirm-mode channel (ch non-nil) is registered for walSynced first,
// so the batch that writes the record confirms it. While the disk is full, new messages
// are refused with errNoSpace.
func (st *store) logPublish(m *message, queues []*queue, scratch []byte, ch *channel) (uint64, []byte, error) {
	if st.w.noSpace.Load() {
		return 0, scratch, errNoSpace
	}
	qids := make([]uint64, 0, len(queues))
	for _, q := range queues {
		if q.walID != 0 {
			qids = append(qids, q.walID)
		}
	}
	st.mu.Lock()
	m.wal = &msgWAL{id: st.nextMsgID, refs: int32(len(qids)), queues: qids}
	st.nextMsgID++
	scratch = m.appendPublishRecord(scratch[:0], qids)
	if ch != nil {
		st.listenLocked(ch)
	}
	t, pos, err := st.w.append(recPublish, scratch)
	if err == nil {
		m.wal.place(pos, int64(walRecordOverhead+len(scratch)))
		m.wal.ticket = t
		s := st.segLocked(pos.seg)
		s.live += int64(m.wal.recLen)
		s.msgs = append(s.msgs, m.wal)
	} else {
		m.wal = nil
	}
	st.mu.Unlock()
	return t, scratch, err
}

// settle records that queue q is done with these persistent messages (acked, rejected,
// purged, or delivered to a no-ack consumer).
func (st *store) settle(q *queue, msgs []*message) uint64 {
	if len(msgs) == 0 {
		return 0
	}
	st.mu.Lock()
	b := binary.BigEndian.AppendUint64(st.ackBuf[:0], q.walID)
	b = binary.BigEndian.AppendUint32(b, uint32(len(msgs)))
	for _, m := range msgs {
		b = binary.BigEndian.AppendUint64(b, m.wal.id)
		st.unrefLocked(m, q.walID)
	}
	st.ackBuf = b
	t, _, _ := st.w.append(recAck, b)
	st.mu.Unlock()
	return t
}

// unrefLocked drops one queue's hold on m. st.mu must be held.
func (st *store) unrefLocked(m *message, qid uint64) {
	mw := m.wal
	if mw == nil || mw.refs == 0 {
		return
	}
	for i, id := range mw.queues {
		if id == qid {
			mw.queues = slices.Delete(mw.queues, i, i+1)
			mw.refs--
			break
		}
	}
	if mw.refs == 0 {
		if s := st.segs[uint64(mw.seg)]; s != nil {
			s.live -= int64(mw.recLen)
		}
	}
}

// dropQueue releases a deleted durable queue's hold on its messages (no record: the
// queue.delete record implies it).
func (st *store) dropQueue(q *queue, msgs []*message) {
	st.mu.Lock()
	for _, m := range msgs {
		st.unrefLocked(m, q.walID)
	}
	st.mu.Unlock()
}

// appendTopology logs a topology record; a checkpoint follows every checkpointEvery.
func (st *store) appendTopology(typ uint8, payload []byte) {
	st.mu.Lock()
	_, pos, err := st.w.append(typ, payload)
	if err == nil {
		st.segLocked(pos.seg).topology = true
		st.topoSince++
	}
	st.mu.Unlock()
}

// sync waits until everything logged so far is on disk.
func (st *store) sync() error { return st.w.sync() }

// newQueueID hands out a durable queue id; ids are never reused.
func (st *store) newQueueID() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	id := st.nextQID
	st.nextQID++
	return id
}

// close writes what is pending, checkpoints (unless the log failed or there is no
// snapshot to take), and releases the directory.
func (st *store) close() {
	st.w.close()
	if !st.w.failedAtomic.Load() && st.snapshotFn != nil && !st.noCheckpoint.Load() {
		if err := st.checkpoint(); err != nil {
			st.log.Error("checkpoint at shutdown failed", "err", err)
		}
	}
	st.w.unlock()
}

// checkpoint writes meta.snap: the durable topology and the log position it covers. It
// runs on the log's writer (or at close), never concurrently with itself.
func (st *store) checkpoint() error {
	if st.noCheckpoint.Load() {
		return nil
	}
	// The snapshot is taken with the vhosts read-locked, and topology changes append their
	// record while holding their vhost's lock, so the head position read inside covers
	// exactly the records the snapshot reflects.
	var pos walPos
	var nextQ, nextM uint64
	at := func() {
		st.mu.Lock()
		pos = st.w.head()
		nextQ, nextM = st.nextQID, st.nextMsgID
		st.mu.Unlock()
	}
	var topo []byte
	if st.snapshotFn != nil {
		topo = st.snapshotFn(at)
	} else {
		at()
	}
	b := make([]byte, 0, 16+len(topo))
	b = binary.BigEndian.AppendUint64(b, nextQ)
	b = binary.BigEndian.AppendUint64(b, nextM)
	b = append(b, topo...)
	if err := st.w.writeCheckpoint(pos, b); err != nil {
		return err
	}
	st.mu.Lock()
	st.snapPos = pos
	st.topoSince = 0
	st.mu.Unlock()
	return nil
}

// appendSnapRecord appends a checkpoint record: type u8, len u32, payload.
func appendSnapRecord(b []byte, typ uint8, payload []byte) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// checkpointEvery is the number of topology records after which a checkpoint is written.
const checkpointEvery = 8192

// compact runs on the log's writer after each batch. It deletes the oldest segments while
// nothing in them is needed, and copies forward the live messages of an oldest segment
// that is less than half alive, or of any oldest segment when the whole log is.
func (st *store) compact() {
	w := st.w
	st.mu.Lock()
	many := st.topoSince >= checkpointEvery
	st.mu.Unlock()
	if many && !w.failedAtomic.Load() {
		// Keep the checkpoint near the head when topology churns, so replay stays short.
		if err := st.checkpoint(); err != nil && !w.noSpace.Load() {
			st.log.Error("checkpoint failed", "err", err)
		}
	}
	for {
		old, n, size := w.oldest()
		if n < 2 || w.failedAtomic.Load() {
			return
		}
		st.mu.Lock()
		s := st.segLocked(old.seq)
		if s.live > 0 {
			if s.relocated != 0 {
				st.mu.Unlock()
				return // its copies are on their way; it goes once they are fsynced
			}
			// A long-lived backlog at the tail must not keep every dead segment after it:
			// disk stays about twice the live data plus a segment.
			var live int64
			for _, o := range st.segs {
				live += o.live
			}
			mostlyDead := s.live*2 < old.size || live*2 < size && size > 1<<20
			relocate := s.relocated == 0 && mostlyDead && !w.noSpace.Load()
			st.mu.Unlock()
			if relocate {
				st.relocate(old.seq, s)
			}
			return
		}
		if s.relocated > w.fsyncedAtomic.Load() {
			st.mu.Unlock()
			return
		}
		needSnap := s.topology && !(walPos{old.seq, uint64(old.size)}).less(st.snapPos)
		st.mu.Unlock()
		if needSnap {
			if err := st.checkpoint(); err != nil {
				if !w.noSpace.Load() {
					st.log.Error("checkpoint failed", "err", err)
				}
				return
			}
		}
		if err := w.removeSegment(old.seq); err != nil {
			if err != errSegmentBusy { // the writer's own file: its turn comes later
				st.log.Error("removing segment failed", "seg", old.seq, "err", err)
			}
			return
		}
		st.mu.Lock()
		delete(st.segs, old.seq)
		st.mu.Unlock()
	}
}

// relocate appends a copy of every live message of segment seq at the head, so the
// segment can go once the copies are fsynced. The records are read back from the log, as
// queues may hold their messages paged; it runs on the log's writer.
func (st *store) relocate(seq uint64, old *segState) {
	st.mu.Lock()
	var live []*msgWAL
	var at []walPos
	for _, mw := range old.msgs {
		if uint64(mw.seg) == seq && mw.refs > 0 {
			live = append(live, mw)
			at = append(at, mw.pos())
		}
	}
	st.mu.Unlock()
	var buf []byte
	var last uint64
	for i, mw := range live {
		_, payload, err := st.w.readRecord(at[i])
		if err != nil {
			st.log.Error("compaction cannot read back a message; its segment stays", "seg", seq, "err", err)
			return
		}
		st.mu.Lock()
		if mw.refs == 0 || uint64(mw.seg) != seq {
			st.mu.Unlock()
			continue // settled meanwhile
		}
		buf = reencodePublish(buf[:0], payload, mw.queues)
		t, pos, err := st.w.append(recPublish, buf)
		if err != nil {
			st.mu.Unlock()
			return
		}
		old.live -= int64(mw.recLen)
		mw.prev = &walPlace{mw.pos(), int64(mw.recLen)}
		mw.place(pos, int64(walRecordOverhead+len(buf)))
		mw.ticket = t
		s := st.segLocked(pos.seg)
		s.live += int64(mw.recLen)
		s.msgs = append(s.msgs, mw)
		last = t
		// Set as each copy is made: a relocation that stops part-way must still keep the
		// old segment until the copies made are fsynced.
		old.relocated = max(old.relocated, t)
		st.mu.Unlock()
	}
	st.mu.Lock()
	old.msgs = nil
	old.relocated = max(last, st.w.appendedTicket())
	st.mu.Unlock()
	st.w.kick()
}

// reencodePublish appends a publish record's payload with its queue ids replaced by qids.
func reencodePublish(b, payload []byte, qids []uint64) []byte {
	n := int(binary.BigEndian.Uint16(payload[8:]))
	b = append(b, payload[:8]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(qids)))
	for _, id := range qids {
		b = binary.BigEndian.AppendUint64(b, id)
	}
	return append(b, payload[10+8*n:]...)
}

// readAhead is a window of the log (or of a paging file) a queue reads its paged messages
// from, so that draining a backlog costs one read per window, not one per message.
type readAhead struct {
	spill bool   // a paging file's window, not the log's
	seg   uint64 // the file
	off   uint64 // where buf starts in it
	buf   []byte
}

// readAheadWindow is how much a queue reads at once for its paged messages.
const readAheadWindow = 256 << 10

// window returns the octets [off, off+size) of file seg when ra holds them.
func (ra *readAhead) window(spill bool, seg, off uint64, size int64) []byte {
	if ra.buf == nil || ra.spill != spill || ra.seg != seg || off < ra.off || off+uint64(size) > ra.off+uint64(len(ra.buf)) {
		return nil
	}
	return ra.buf[off-ra.off : off-ra.off+uint64(size)]
}

// errNotWritten says a paged body cannot be read back yet: its record is still on its
// way to the file (with the disk full, perhaps for long). The delivery waits for a batch.
var errNotWritten = errors.New("amqp: the message's log record is not written yet")

// bodyPlace returns where m's record can be read back now: its place, or while a copy
// compaction made is not yet written, the place it was copied from. errNotWritten when
// neither is.
func (st *store) bodyPlace(m *message) (walPos, int64, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	mw := m.wal
	if mw.ticket <= st.w.doneAtomic.Load() {
		mw.prev = nil
		return mw.pos(), int64(mw.recLen), nil
	}
	if mw.prev != nil {
		return mw.prev.pos, mw.prev.size, nil
	}
	return walPos{}, 0, errNotWritten
}

// readBodyAhead reads a paged message's body back from the log through ra: from the
// window when it holds the record, else by reading a new window that starts there. It
// never waits: a record not yet written is errNotWritten.
func (st *store) readBodyAhead(m *message, ra *readAhead) ([]byte, error) {
	pos, size, err := st.bodyPlace(m)
	if err != nil {
		return nil, err
	}
	// A window read while later records were being written may hold them only in part:
	// their CRC tells, and a fresh read follows.
	if body, ok := recordBody(ra.window(false, pos.seg, pos.off, size), m.wal.id); ok {
		return body, nil
	}
	buf := make([]byte, max(size, readAheadWindow))
	n, err := st.w.readAt(pos, buf)
	if err == nil && int64(n) >= size {
		*ra = readAhead{seg: pos.seg, off: pos.off, buf: buf[:n]}
		if body, ok := recordBody(buf[:size], m.wal.id); ok {
			return body, nil
		}
	}
	return st.readBody(m) // moved by compaction meanwhile, or unreadable: the full path says
}

// recordBody returns the body of message id from rec, one whole publish record with its
// header, when rec is that.
func recordBody(rec []byte, id uint64) ([]byte, bool) {
	typ, payload, n, ok := parseRecord(rec)
	if !ok || n != len(rec) || typ != recPublish {
		return nil, false
	}
	return publishBody(payload, id)
}

// readBody reads a paged message's body back from the log, one record, without waiting:
// a record not yet written is errNotWritten.
func (st *store) readBody(m *message) ([]byte, error) {
	for try := 0; ; try++ {
		pos, size, err := st.bodyPlace(m)
		if err != nil {
			return nil, err
		}
		typ, payload, err := st.w.readRecordSized(pos, size)
		if err != nil {
			if p, _, _ := st.bodyPlace(m); p != pos && try < 3 {
				continue // compaction copied it forward and removed the old segment
			}
			return nil, err
		}
		body, ok := publishBody(payload, m.wal.id)
		if typ != recPublish || !ok {
			return nil, errors.New("amqp: the log holds another record where a message should be")
		}
		return body, nil
	}
}

// publishBody returns the body of a publish record for message id, without allocating.
func publishBody(p []byte, id uint64) ([]byte, bool) {
	if len(p) < 10 || binary.BigEndian.Uint64(p) != id {
		return nil, false
	}
	i := 10 + 8*int(binary.BigEndian.Uint16(p[8:]))
	if len(p) < i+1 {
		return nil, false
	}
	i += 1 + int(p[i]) // exchange
	if len(p) < i+5 {
		return nil, false
	}
	i += 5 + int(p[i]) + int(binary.BigEndian.Uint32(p[i+1:])) // key-len, props-len, key, props
	if i > len(p) {
		return nil, false
	}
	return p[i:], true
}

// decodedPublish is a publish record read back: the message as queues keep it (paged:
// routing key and properties, no body), its queue ids, and its body, which aliases the
// record.
type decodedPublish struct {
	*message
	body []byte
}

// decodePublishRecord reads a publish record.
func decodePublishRecord(p []byte) (decodedPublish, []uint64, bool) {
	d := decoder{b: p}
	id := d.longlong()
	n := d.short()
	qids := make([]uint64, 0, n)
	for i := 0; i < int(n); i++ {
		qids = append(qids, d.longlong())
	}
	ex := d.shortstr()
	keyLen := d.octet()
	propsLen := d.long()
	if d.err != nil || uint64(keyLen)+uint64(propsLen) > uint64(len(d.b)) {
		return decodedPublish{}, nil, false
	}
	head := int(keyLen) + int(propsLen)
	m := &message{exchange: ex, keyLen: keyLen, propsLen: propsLen, data: append([]byte(nil), d.b[:head]...),
		size: uint32(len(d.b) - head), paged: true, persistent: true}
	m.wal = &msgWAL{id: id}
	return decodedPublish{m, d.b[head:]}, qids, true
}

// Topology records, shared by the log and the checkpoint.

func exchangeRecord(vh string, x *exchange) []byte {
	b := appendShortstr(nil, vh)
	b = appendShortstr(b, x.name)
	b = appendShortstr(b, x.kind)
	b = append(b, flagByte(x.durable, x.autoDelete, x.internal))
	return appendTable(b, x.args)
}

func queueRecord(vh string, q *queue) []byte {
	b := appendShortstr(nil, vh)
	b = binary.BigEndian.AppendUint64(b, q.walID)
	b = appendShortstr(b, q.name)
	b = append(b, flagByte(q.durable, q.autoDelete, false))
	return appendTable(b, q.args)
}

func bindRecord(vh string, b *binding) []byte {
	p := appendShortstr(nil, vh)
	p = appendShortstr(p, b.source.name)
	if b.queue != nil {
		p = append(p, 0)
		p = appendShortstr(p, b.queue.name)
	} else {
		p = append(p, 1)
		p = appendShortstr(p, b.dest.name)
	}
	p = appendShortstr(p, b.key)
	return appendTable(p, b.args)
}

func flagByte(a, b, c bool) uint8 {
	var f uint8
	if a {
		f |= 1
	}
	if b {
		f |= 2
	}
	if c {
		f |= 4
	}
	return f
}

// durableBinding reports whether a binding survives restarts: both ends do.
func durableBinding(b *binding) bool {
	if !b.source.durable {
		return false
	}
	if b.queue != nil {
		return b.queue.walID != 0
	}
	return b.dest.durable
}

// logUnwritable is the channel error for a durable change the log cannot write: only the
// channel closes, and the text says why.
func logUnwritable(err error) *Error {
	if err == errNoSpace {
		return preconditionFailed("cannot write to the write-ahead log: the disk is full; the change is not yet on disk")
	}
	return preconditionFailed("cannot write to the write-ahead log: it failed and the broker must be restarted")
}

// openStore opens the data directory, replays it into the vhosts, and starts logging.
func (s *Server) openStore() error {
	if s.cfg.DataDir == "" {
		return nil
	}
	start := time.Now()
	st, rec, err := openStoreDir(s.cfg.DataDir, storeOptions{
		segmentSize: s.cfg.SegmentSize,
		interval:    s.cfg.FsyncInterval,
		repair:      s.cfg.Repair,
		log:         s.log,
		snapshot:    s.snapshotTopology,
	})
	if err != nil {
		return err
	}
	n, err := s.restore(st, rec)
	var sp *spill
	if err == nil {
		sp, err = openSpill(filepath.Join(s.cfg.DataDir, "paging"))
	}
	if err != nil {
		st.noCheckpoint.Store(true) // a checkpoint of half-restored topology would lose the rest
		st.close()
		return err
	}
	s.mu.Lock()
	s.store, s.spill = st, sp
	for _, vh := range s.vhosts {
		vh.store, vh.spill = st, sp
	}
	s.mu.Unlock()
	s.log.Info("data directory loaded", "dir", s.cfg.DataDir, "messages", n, "took", time.Since(start).String())
	return nil
}

// restore applies recovered topology and messages; it returns the number of messages.
func (s *Server) restore(st *store, rec *recovered) (int, error) {
	// The log's writer may already take a checkpoint: hold every vhost until done.
	for _, vh := range s.vhostList() {
		vh.mu.Lock()
		defer vh.mu.Unlock()
	}
	queues := make(map[uint64]*queue)
	for _, r := range rec.topology {
		d := decoder{b: r.payload}
		if r.typ == recQueueDelete {
			id := d.longlong()
			if q := queues[id]; q != nil {
				delete(q.vh.queues, q.name)
				delete(queues, id)
				for len(q.bindings) > 0 {
					b := q.bindings[len(q.bindings)-1]
					b.source.removeBindingLocked(b.source.findBindingLocked(b))
				}
			}
			continue
		}
		vh := s.vhosts[d.shortstr()]
		if vh == nil {
			continue
		}
		switch r.typ {
		case recExchangeDeclare:
			name, kind := d.shortstr(), d.shortstr()
			f := d.octet()
			args := d.table()
			if d.err == nil && validKind(kind) {
				vh.exchanges[name] = newExchange(name, kind, f&1 != 0, f&2 != 0, f&4 != 0, args)
			}
		case recExchangeDelete:
			if x := vh.exchanges[d.shortstr()]; x != nil && d.err == nil {
				vh.deleteExchangeLocked(x)
			}
		case recQueueDeclare:
			id := d.longlong()
			name := d.shortstr()
			f := d.octet()
			args := d.table()
			if d.err == nil {
				qttl, _ := queueTTL(args)
				limits, _ := parseQueueLimits(args)
				q := &queue{name: name, vh: vh, durable: f&1 != 0, autoDelete: f&2 != 0, args: args, walID: id, ttl: qttl, limits: limits}
				vh.queues[name] = q
				queues[id] = q
			}
		case recBind, recUnbind:
			src := vh.exchanges[d.shortstr()]
			toExchange := d.octet() == 1
			dest := d.shortstr()
			key := d.shortstr()
			args := d.table()
			if d.err != nil || src == nil {
				continue
			}
			b := &binding{source: src, key: key, args: args}
			if toExchange {
				b.dest = vh.exchanges[dest]
			} else {
				b.queue = vh.queues[dest]
			}
			if b.dest == nil && b.queue == nil {
				continue
			}
			if r.typ == recBind {
				src.addBindingLocked(b)
			} else if i := src.findBindingLocked(b); i >= 0 {
				src.removeBindingLocked(i)
			}
		}
		if d.err != nil {
			return 0, errors.New("amqp: malformed topology record of type " + strconv.Itoa(int(r.typ)))
		}
	}
	n := 0
	for id, msgs := range rec.messages {
		q := queues[id]
		if q == nil {
			st.mu.Lock()
			for _, m := range msgs {
				st.unrefLocked(m, id)
			}
			st.mu.Unlock()
			continue
		}
		for _, m := range msgs {
			m.persistent = true
			if s, err := scanProperties(m.props()); err == nil {
				m.ttl, _ = parseExpiration(s.expiration) // a refused value was never logged
			}
			q.nextSeq++
			// A time to live starts again at the restart: the log keeps no clock.
			q.ready.push(qentry{msg: m, seq: q.nextSeq, redelivered: true, expires: expiresAt(q.ttl, m.ttl)})
			q.readyBytes += int64(m.size) // paged: bodies are read back as they are delivered
			n++
		}
		q.mu.Lock()
		q.scheduleExpiryLocked()
		q.mu.Unlock()
	}
	return n, nil
}

// snapshotTopology encodes every vhost's durable topology as checkpoint records, calling
// at while all vhosts are read-locked.
func (s *Server) snapshotTopology(at func()) []byte {
	vhs := s.vhostList()
	for _, vh := range vhs {
		vh.mu.RLock()
		defer vh.mu.RUnlock()
	}
	var b []byte
	for _, vh := range vhs {
		for _, x := range vh.exchanges {
			if x.durable && !predeclared(x.name) {
				b = appendSnapRecord(b, recExchangeDeclare, exchangeRecord(vh.name, x))
			}
		}
		for _, q := range vh.queues {
			if q.walID != 0 {
				b = appendSnapRecord(b, recQueueDeclare, queueRecord(vh.name, q))
			}
		}
		for _, x := range vh.exchanges {
			for _, bd := range x.bindings {
				if durableBinding(bd) {
					b = appendSnapRecord(b, recBind, bindRecord(vh.name, bd))
				}
			}
		}
	}
	at()
	return b
}

// logSettled records settled persistent messages of durable queues, one record per queue.
func (s *Server) logSettled(done []unacked) {
	for _, u := range done {
		u.q.unspill(u.e.msg)
	}
	st := s.store
	if st == nil {
		return
	}
	var msgs []*message
	for i := 0; i < len(done); {
		q := done[i].q
		msgs = msgs[:0]
		for ; i < len(done) && done[i].q == q; i++ {
			if m := done[i].e.msg; m.wal != nil && q.walID != 0 {
				msgs = append(msgs, m)
			}
		}
		st.settle(q, msgs)
	}
}

// settleOne records that q is done with m, if both are logged, and gives back its paging
// file space if q paged it.
func (q *queue) settleOne(m *message) {
	q.unspill(m)
	if m.wal != nil && q.walID != 0 && q.vh.store != nil {
		one := [1]*message{m}
		q.vh.store.settle(q, one[:])
	}
}
