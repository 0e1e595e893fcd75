package amqp

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"sort"
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
//	                    [, hold id u64: an x-delayed-message exchange's log queue id]
//	2 exchange.delete   vhost shortstr, name shortstr
//	3 queue.declare     vhost shortstr, id u64, name shortstr, flags u8, args table
//	4 queue.delete      id u64
//	5 bind, 6 unbind    vhost shortstr, source shortstr, dest-is-exchange u8, dest shortstr,
//	                    key shortstr, args table
//	7 publish           msg id u64, n u16, n × queue id u64, exchange shortstr, key-len u8,
//	                    props-len u32, data (routing key | properties | body)
//	8 ack               queue id u64, n u32, n × msg id u64 (ack, reject, purge, no-ack)
//	9 dead-letter       source queue id u64, msg id u64 (settled there; 0, 0: none), time
//	                    u64, then a publish record's payload (the message as dead-lettered)
//	10 publish at       time u64, then a publish record's payload
//
// A time is Unix milliseconds: when the message was published (or dead-lettered), so that
// its time to live runs on across a restart. Records of type 7 (written before there was
// a time) restart theirs.
//
// A durable x-delayed-message exchange has a log queue id of its own, from the queue ids
// (never reused), at the end of its declare record. The messages it holds are messages of
// that id, published with records 10 (or 9, dead-lettered into it): one falls due at the
// record's time plus its x-delay header, exactly, across any restart. Its move into the
// queues it routes to when due is one record 9 with the hold id as source (an ack 8 when
// no durable queue takes it), so after a crash it is held or in its queues, never both and
// never neither. Deleting the exchange writes queue.delete 4 of its hold id after
// exchange.delete 2: its messages go with it.
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
	recDeadLetter      = 9
	recPublishAt       = 10
)

// publishPart returns the publish payload a publish, publish-at or dead-letter record holds.
func publishPart(typ uint8, payload []byte) ([]byte, bool) {
	switch {
	case typ == recPublish:
		return payload, true
	case typ == recPublishAt && len(payload) >= 8:
		return payload[8:], true
	case typ == recDeadLetter && len(payload) >= 24:
		return payload[24:], true
	}
	return nil, false
}

// publishTime returns when the message of a publish-at or dead-letter record was published,
// in Unix milliseconds.
func publishTime(typ uint8, payload []byte) (int64, bool) {
	switch {
	case typ == recPublishAt && len(payload) >= 8:
		return int64(binary.BigEndian.Uint64(payload)), true
	case typ == recDeadLetter && len(payload) >= 24:
		return int64(binary.BigEndian.Uint64(payload[16:])), true
	}
	return 0, false
}

// copyRecord appends the payload of a copy of a publish-kind record for queues qids, with
// its publish time, and returns the copy's type.
func copyRecord(b []byte, typ uint8, payload []byte, qids []uint64) (uint8, []byte) {
	pub, _ := publishPart(typ, payload)
	if at, ok := publishTime(typ, payload); ok {
		b = binary.BigEndian.AppendUint64(b, uint64(at))
		return recPublishAt, reencodePublish(b, pub, qids)
	}
	return recPublish, reencodePublish(b, pub, qids)
}

// recordKeep is how much of a publish-kind record's payload the segment index keeps: all
// but the body.
func recordKeep(typ uint8, payload []byte) int {
	pub, _ := publishPart(typ, payload)
	p, _ := splitPublishRecord(pub, len(pub))
	return len(payload) - int(p.body)
}

// store is the broker's side of the write-ahead log.
type store struct {
	w   *wal
	log *slog.Logger

	mu        sync.Mutex
	segs      map[uint64]*segState // guarded by mu: what the broker needs of each segment
	tails     map[*queue]bool      // guarded by mu: queues that may page log records, for copy-forward
	listeners []*channel           // guarded by mu: channels waiting for confirms after a batch
	waiting   []*queue             // guarded by mu: queues to dispatch after a batch (records not written yet)
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
	// live is the octets of its publish records, counted once for every queue that holds
	// the message (in memory or paged): the segment is needed while it is above zero.
	live      int64
	topology  bool    // holds topology records
	loaded    *msgWAL // the messages of its records that some queue holds in memory, linked
	relocated uint64  // ticket of the last copy-forward of its messages, 0 if none
}

// link adds mw to the segment's in-memory messages.
func (s *segState) link(mw *msgWAL) {
	mw.prev, mw.next = nil, s.loaded
	if s.loaded != nil {
		s.loaded.prev = mw
	}
	s.loaded = mw
}

// unlink removes mw from the segment's in-memory messages.
func (s *segState) unlink(mw *msgWAL) {
	if mw.prev != nil {
		mw.prev.next = mw.next
	} else if s.loaded == mw {
		s.loaded = mw.next
	}
	if mw.next != nil {
		mw.next.prev = mw.prev
	}
	mw.prev, mw.next = nil, nil
}

// msgWAL is the log record of a persistent message held in memory by durable queues (a
// paged one is a diskRef instead); guarded by store.mu.
type msgWAL struct {
	id     uint64
	seg    uint32   // the segment of its record, or of the copy compaction made
	off    uint32   // the record's offset in seg (segments are at most maxSegment)
	recLen uint32   // the record's size, header included
	refs   int32    // durable queues holding the message in memory
	queues []uint64 // their ids, for copy-forward

	prev, next *msgWAL // the segment's list of in-memory messages
}

// pos is the place of m's record in the log.
func (mw *msgWAL) pos() walPos { return walPos{uint64(mw.seg), uint64(mw.off)} }

// place records where m's record is.
func (mw *msgWAL) place(pos walPos, size int64) {
	mw.seg, mw.off, mw.recLen = uint32(pos.seg), uint32(pos.off), uint32(size)
}

// recovered is what replay found: topology records in order and each queue's messages.
type recovered struct {
	topology []walRecord         // records 1-6 past the checkpoint, after the checkpoint's own
	messages map[uint64]refQueue // queue id → ready messages in id order; expires holds the expiration (a ttl)
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
	// queueTTL is the message TTL of a queue of vhost with arguments args, policies
	// applied; nil reads x-message-ttl alone.
	queueTTL func(vhost, queue string, args table) ttl
}

// openStoreDir opens the log in dir, reads the checkpoint, replays the segments, and
// starts the writer; it returns what the log holds for the caller to restore.
func openStoreDir(dir string, opts storeOptions) (*store, *recovered, error) {
	w, err := openWAL(dir, walOptions{segmentSize: opts.segmentSize, interval: opts.interval, log: opts.log})
	if err != nil {
		return nil, nil, err
	}
	st := &store{w: w, log: opts.log, segs: make(map[uint64]*segState), tails: make(map[*queue]bool), nextMsgID: 1, nextQID: 1, snapshotFn: opts.snapshot}
	rec, err := st.replay(opts.repair, opts.queueTTL)
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

// replay reads the checkpoint and every record, and returns what they hold. queueTTL is as
// storeOptions.queueTTL.
func (st *store) replay(repair bool, queueTTL func(vhost, queue string, args table) ttl) (*recovered, error) {
	rec := &recovered{messages: make(map[uint64]refQueue)}
	if err := st.loadCheckpoint(rec); err != nil {
		return nil, err
	}
	if err := st.replayLog(rec, repair, queueTTL); err != nil {
		return nil, err
	}
	return rec, nil
}

// loadCheckpoint reads meta.snap, when there is one, into st and rec.topology.
func (st *store) loadCheckpoint(rec *recovered) error {
	pos, payload, ok, err := st.w.readCheckpoint()
	if err != nil || !ok {
		return err
	}
	if len(payload) < 16 {
		return errors.New("amqp: meta.snap: truncated checkpoint")
	}
	st.snapPos = pos
	st.nextQID = binary.BigEndian.Uint64(payload)
	st.nextMsgID = binary.BigEndian.Uint64(payload[8:])
	for rest := payload[16:]; len(rest) > 0; {
		if len(rest) < 5 {
			return errors.New("amqp: meta.snap: truncated checkpoint")
		}
		size := binary.BigEndian.Uint32(rest[1:])
		if uint64(size) > uint64(len(rest)-5) {
			return errors.New("amqp: meta.snap: truncated checkpoint")
		}
		rec.topology = append(rec.topology, walRecord{rest[0], rest[5 : 5+size]})
		rest = rest[5+size:]
	}
	return nil
}

// replayLog replays every segment into rec, past the checkpoint loadCheckpoint read.
func (st *store) replayLog(rec *recovered, repair bool, queueTTL func(vhost, queue string, args table) ttl) error {
	queues := make(map[uint64]*replayQueue) // queue id → its messages so far
	deleted := make(map[uint64]bool)        // queue ids deleted
	qttl := make(map[uint64]ttl)            // queue id → its x-message-ttl, for exact expiry
	for _, r := range rec.topology {
		if r.typ == recQueueDeclare {
			noteQueueTTL(qttl, r.payload, queueTTL)
		}
	}
	err := st.w.replay(repair, func(pos walPos, typ uint8, payload []byte, size int64) error {
		switch typ {
		case recPublish, recPublishAt, recDeadLetter:
			if typ == recDeadLetter && len(payload) >= 16 {
				if rq := queues[binary.BigEndian.Uint64(payload)]; rq != nil {
					rq.remove(binary.BigEndian.Uint64(payload[8:]))
				}
			}
			at, timed := publishTime(typ, payload)
			pub, ok := publishPart(typ, payload)
			if !ok {
				return errors.New("bad publish record")
			}
			p, ok := splitPublishRecord(pub, int(size)-walRecordOverhead-(len(payload)-len(pub)))
			if !ok {
				return errors.New("bad publish record")
			}
			ref := diskRef{id: p.id, refEntry: refEntry{file: uint32(pos.seg), off: uint32(pos.off), size: uint32(size), body: p.body}}
			var mttl ttl
			if s, err := scanProperties(p.props); err == nil {
				mttl, _ = parseExpiration(s.expiration) // a refused value was never logged
			}
			for i := range p.n {
				qid := binary.BigEndian.Uint64(p.qids[8*i:])
				if deleted[qid] {
					continue
				}
				rq := queues[qid]
				if rq == nil {
					rq = &replayQueue{}
					queues[qid] = rq
				}
				// A timed record's expiry is exact (Unix milliseconds); an untimed one keeps
				// its message's ttl, negated, for restore to start at the restart.
				ref.expires = -int64(mttl)
				if timed {
					ref.expires = expiresAtFrom(at, qttl[qid], mttl)
				}
				rq.put(ref)
			}
			st.nextMsgID = max(st.nextMsgID, p.id+1)
		case recAck:
			d := decoder{b: payload}
			rq := queues[d.longlong()]
			cnt := d.long()
			for j := uint32(0); j < cnt && d.err == nil; j++ {
				id := d.longlong()
				if rq != nil {
					rq.remove(id)
				}
			}
		case recQueueDelete:
			d := decoder{b: payload}
			qid := d.longlong()
			deleted[qid] = true
			delete(queues, qid)
			st.segLocked(pos.seg).topology = true
			if !pos.less(st.snapPos) {
				rec.topology = append(rec.topology, walRecord{typ, bytes.Clone(payload)})
			}
		case recQueueDeclare:
			noteQueueTTL(qttl, payload, queueTTL)
			d := decoder{b: payload}
			d.shortstr()
			st.nextQID = max(st.nextQID, d.longlong()+1)
			st.segLocked(pos.seg).topology = true
			if !pos.less(st.snapPos) {
				rec.topology = append(rec.topology, walRecord{typ, bytes.Clone(payload)})
			}
		case recExchangeDeclare, recExchangeDelete, recBind, recUnbind:
			if typ == recExchangeDeclare {
				st.nextQID = max(st.nextQID, exchangeHoldID(payload)+1)
			}
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
		return err
	}
	for qid, rq := range queues {
		refs := rq.result()
		refs.each(func(_ int, r diskRef) { st.segLocked(uint64(r.file)).live += int64(r.size) })
		if refs.len() > 0 {
			rec.messages[qid] = refs
		}
	}
	return nil
}

// noteQueueTTL records the message TTL of a queue.declare record's queue: with policies
// applied by effective, else its x-message-ttl.
func noteQueueTTL(qttl map[uint64]ttl, payload []byte, effective func(vhost, queue string, args table) ttl) {
	d := decoder{b: payload}
	vhost := d.shortstr()
	id := d.longlong()
	name := d.shortstr()
	d.octet()
	args := d.table()
	if d.err != nil {
		return
	}
	t, _ := queueTTL(args)
	if effective != nil {
		t = effective(vhost, name, args)
	}
	if t != 0 {
		qttl[id] = t
	}
}

// replayQueue is one queue's messages as replay finds them: refs in id order, and the
// copies compaction made of messages whose first record is gone (out of order) in late.
// A ref's expires is its exact expiry when its record has a publish time, else its
// expiration property's ttl negated, for restore to start it again.
type replayQueue struct {
	refs refQueue
	late map[uint64]diskRef
	gone int // refs removed (size 0)
}

// find returns the index in refs of message id, or -1.
func (rq *replayQueue) find(id uint64) int {
	n := rq.refs.len()
	i := sort.Search(n, func(i int) bool { return rq.refs.at(i).id >= id })
	if i < n && rq.refs.at(i).id == id {
		return i
	}
	return -1
}

// put adds a publish record's ref; a second record of the same message is a copy that
// compaction made, and is now its place.
func (rq *replayQueue) put(r diskRef) {
	if n := rq.refs.len(); n == 0 || rq.refs.at(n-1).id < r.id {
		rq.refs.push(r)
		return
	}
	if i := rq.find(r.id); i >= 0 {
		if p := rq.refs.at(i); p.size != 0 {
			p.file, p.off, p.size = r.file, r.off, r.size
			rq.refs.set(i, p)
		}
		return
	}
	if rq.late == nil {
		rq.late = make(map[uint64]diskRef)
	}
	rq.late[r.id] = r
}

// remove drops message id: the queue settled it.
func (rq *replayQueue) remove(id uint64) {
	if _, ok := rq.late[id]; ok {
		delete(rq.late, id)
		return
	}
	if i := rq.find(id); i >= 0 {
		if p := rq.refs.at(i); p.size != 0 {
			p.size = 0
			rq.refs.set(i, p)
			rq.gone++
		}
	}
}

// result returns the queue's messages in id order.
func (rq *replayQueue) result() refQueue {
	if rq.gone == 0 && len(rq.late) == 0 {
		return rq.refs
	}
	late := slices.SortedFunc(maps.Values(rq.late), func(a, b diskRef) int { return cmp.Compare(a.id, b.id) })
	var out refQueue
	for rq.refs.len() > 0 || len(late) > 0 {
		if len(late) > 0 && (rq.refs.len() == 0 || late[0].id < rq.refs.front().id) {
			out.push(late[0])
			late = late[1:]
			continue
		}
		if r := rq.refs.pop(); r.size != 0 {
			out.push(r)
		}
	}
	return out
}

// publishRecord is a publish record's payload, split.
type publishRecord struct {
	id    uint64
	n     int    // queue ids
	qids  []byte // n × u64
	rest  []byte // the message: see appendMessageRecord
	props []byte
	body  uint32 // body octets
}

// splitPublishRecord splits a publish record's payload without allocating. p may be only
// its first octets, up to the body, of a payload of total octets (from a segment index):
// then rest is cut short too.
func splitPublishRecord(p []byte, total int) (publishRecord, bool) {
	if len(p) < 10 {
		return publishRecord{}, false
	}
	r := publishRecord{id: binary.BigEndian.Uint64(p), n: int(binary.BigEndian.Uint16(p[8:]))}
	i := 10 + 8*r.n
	if len(p) < i+1 {
		return publishRecord{}, false
	}
	r.qids, r.rest = p[10:i], p[i:]
	i += 1 + int(p[i]) // exchange
	if len(p) < i+5 {
		return publishRecord{}, false
	}
	keyLen, propsLen := int(p[i]), int(binary.BigEndian.Uint32(p[i+1:]))
	i += 5
	if len(p)-i < keyLen || len(p)-i-keyLen < propsLen {
		return publishRecord{}, false
	}
	r.props = p[i+keyLen : i+keyLen+propsLen]
	if total < len(p) {
		return publishRecord{}, false
	}
	r.body = uint32(total - i - keyLen - propsLen)
	return r, true
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
	return m.appendMessageRecord(b)
}

// logPublish writes a persistent message routed to durable queues and returns the ticket
// that covers it. A confirm-mode channel (ch non-nil) is registered for walSynced first,
// so the batch that writes the record confirms it. While the disk is full, new messages
// are refused with errNoSpace; while the log's writer is far behind, the caller waits.
func (st *store) logPublish(m *message, queues []*queue, scratch []byte, ch *channel) (uint64, []byte, error) {
	return st.logPublishAt(m, loggedIDs(queues), time.Now().UnixMilli(), scratch, ch)
}

// logPublishAt is logPublish for the log queues qids (durable queues, and delayed
// exchanges that hold the message), of a message published at at (Unix milliseconds).
func (st *store) logPublishAt(m *message, qids []uint64, at int64, scratch []byte, ch *channel) (uint64, []byte, error) {
	if st.w.noSpace.Load() {
		return 0, scratch, errNoSpace
	}
	st.w.waitRoom()
	st.mu.Lock()
	if ch != nil {
		st.listenLocked(ch)
	}
	scratch = binary.BigEndian.AppendUint64(scratch[:0], uint64(at))
	t, scratch, err := st.logMessageLocked(recPublishAt, m, scratch, qids)
	st.mu.Unlock()
	return t, scratch, err
}

// loggedIDs lists the ids of the durable queues among queues.
func loggedIDs(queues []*queue) []uint64 {
	qids := make([]uint64, 0, len(queues))
	for _, q := range queues {
		if q.walID != 0 {
			qids = append(qids, q.walID)
		}
	}
	return qids
}

// logMessageLocked gives m its id and its place in the log: one record of type typ, b (the
// fields the type puts first) then m's publish payload for queues qids, each of which
// holds it. On failure m has no place. st.mu must be held.
func (st *store) logMessageLocked(typ uint8, m *message, b []byte, qids []uint64) (uint64, []byte, error) {
	m.wal = &msgWAL{id: st.nextMsgID, refs: int32(len(qids)), queues: qids}
	st.nextMsgID++
	b = m.appendPublishRecord(b, qids)
	t, pos, err := st.w.appendKeep(typ, b, len(b)-int(m.size))
	if err != nil {
		m.wal = nil
		return t, b, err
	}
	m.wal.place(pos, int64(walRecordOverhead+len(b)))
	s := st.segLocked(pos.seg)
	s.live += int64(m.wal.recLen) * int64(len(qids))
	s.link(m.wal)
	return t, b, nil
}

// settle records that queue q is done with these persistent messages it held in memory
// (acked, rejected, purged, or delivered to a no-ack consumer).
func (st *store) settle(q *queue, msgs []*message) uint64 { return st.settleID(q.walID, msgs) }

// settleID is settle for the log queue qid: a durable queue, or a delayed exchange.
func (st *store) settleID(qid uint64, msgs []*message) uint64 {
	if len(msgs) == 0 {
		return 0
	}
	st.mu.Lock()
	b := binary.BigEndian.AppendUint64(st.ackBuf[:0], qid)
	b = binary.BigEndian.AppendUint32(b, uint32(len(msgs)))
	for _, m := range msgs {
		b = binary.BigEndian.AppendUint64(b, m.wal.id)
		st.unrefLocked(m, qid)
	}
	st.ackBuf = b
	t, _, _ := st.w.append(recAck, b)
	st.mu.Unlock()
	return t
}

// unrefLocked drops queue qid's hold on m. st.mu must be held.
func (st *store) unrefLocked(m *message, qid uint64) {
	mw := m.wal
	if mw == nil {
		return
	}
	i := slices.Index(mw.queues, qid)
	if i < 0 {
		return
	}
	mw.queues = slices.Delete(mw.queues, i, i+1)
	mw.refs--
	s := st.segs[uint64(mw.seg)]
	if s == nil {
		return
	}
	s.live -= int64(mw.recLen)
	if mw.refs == 0 {
		s.unlink(mw)
	}
}

// pageOut turns q's hold on m, in memory, into a ref to its record: q pages it.

func (st *store) pageOut(q *queue, m *message) diskRef {
	st.mu.Lock()
	defer st.mu.Unlock()
	mw := m.wal
	if i := slices.Index(mw.queues, q.walID); i >= 0 {
		mw.queues = slices.Delete(mw.queues, i, i+1)
		if mw.refs--; mw.refs == 0 {
			if s := st.segs[uint64(mw.seg)]; s != nil {
				s.unlink(mw)
			}
		}
	}
	if !st.tails[q] {
		st.tails[q] = true
	}
	return diskRef{id: mw.id, refEntry: refEntry{file: mw.seg, off: mw.off, size: mw.recLen, body: m.size}}
}

// loaded gives q's in-memory hold on messages read back from its paged refs.
func (st *store) loaded(q *queue, msgs []*message) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, m := range msgs {
		m.wal.refs, m.wal.queues = 1, []uint64{q.walID}
		if s := st.segs[uint64(m.wal.seg)]; s != nil {
			s.link(m.wal)
		}
	}
}

// settleRefs records that q is done with these paged messages, in records of at most
// maxAckIDs ids.
func (st *store) settleRefs(q *queue, refs []diskRef) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for len(refs) > 0 {
		n := min(len(refs), maxAckIDs)
		b := binary.BigEndian.AppendUint64(st.ackBuf[:0], q.walID)
		b = binary.BigEndian.AppendUint32(b, uint32(n))
		for _, r := range refs[:n] {
			b = binary.BigEndian.AppendUint64(b, r.id)
		}
		st.ackBuf = b
		st.w.append(recAck, b)
		st.dropRefsLocked(refs[:n])
		refs = refs[n:]
	}
	if cap(st.ackBuf) > 64<<10 {
		st.ackBuf = nil
	}
}

// maxAckIDs bounds an ack record: a purge of millions of paged messages writes many.
const maxAckIDs = 8192

// dropRefsLocked releases the segments of paged refs a queue no longer holds. st.mu
// must be held.
func (st *store) dropRefsLocked(refs []diskRef) {
	for _, r := range refs {
		if s := st.segs[uint64(r.file)]; s != nil {
			s.live -= int64(r.size)
		}
	}
}

// dropQueue releases a deleted durable queue's hold on messages in memory (no record: the
// queue.delete record implies it).
func (st *store) dropQueue(q *queue, msgs []*message) {
	st.mu.Lock()
	for _, m := range msgs {
		st.unrefLocked(m, q.walID)
	}
	delete(st.tails, q)
	st.mu.Unlock()
}

// dropRefs releases a deleted durable queue's hold on paged messages (no record).
func (st *store) dropRefs(refs []diskRef) {
	st.mu.Lock()
	st.dropRefsLocked(refs)
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

// sync waits until everything logged so far is on disk (and held by followers, when
// replication gates the log).
func (st *store) sync() error { return st.w.sync() }

// flush waits until everything logged so far is in its file, where a reader finds it.
func (st *store) flush() error { return st.w.flush() }

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
// nothing in them is needed, and copies forward the live messages of the oldest segment
// when the whole log is less than half alive.
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
			if s.relocated > w.fsyncedAtomic.Load() {
				st.mu.Unlock()
				return // its copies are on their way; it goes once they are fsynced
			}
			// Copied, yet still held: a queue read a message back into memory while the copy
			// was being made. Copy what is left.
			s.relocated = 0
			// A long-lived backlog at the tail must not keep every dead segment after it:
			// disk stays about twice the live data plus a segment. A segment that is only
			// partly dead is not copied for that alone: a backlog drains from its oldest
			// segment, and copying what is about to be consumed would double the writes.
			var live int64
			for _, o := range st.segs {
				live += o.live
			}
			mostlyDead := live*2 < size && size > min(1<<20, 4*w.segSize)
			// Copies are read back from the file: only once it holds all of the segment.
			relocate := s.relocated == 0 && mostlyDead && old.written && !w.noSpace.Load()
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
// segment can go once the copies are fsynced: the paged ones of every queue, then those
// queues hold in memory. It runs on the log's writer.
func (st *store) relocate(seq uint64, old *segState) {
	st.mu.Lock()
	tails := slices.Collect(maps.Keys(st.tails))
	st.mu.Unlock()
	var buf []byte
	for _, q := range tails {
		var ok bool
		if buf, ok = st.relocateTail(q, seq, old, buf); !ok {
			return
		}
	}
	st.mu.Lock()
	var live []*msgWAL
	var at []walPos
	for mw := old.loaded; mw != nil; mw = mw.next {
		live = append(live, mw)
		at = append(at, mw.pos())
	}
	st.mu.Unlock()
	for i, mw := range live {
		typ, payload, err := st.w.readRecord(at[i])
		if _, ok := publishPart(typ, payload); err == nil && !ok {
			err = errors.New("another record where a message should be")
		}
		if err != nil {
			st.log.Error("compaction cannot read back a message; its segment stays", "seg", seq, "err", err)
			return
		}
		st.mu.Lock()
		if mw.refs == 0 || mw.pos() != at[i] {
			st.mu.Unlock()
			continue // settled or paged meanwhile
		}
		var ct uint8
		ct, buf = copyRecord(buf[:0], typ, payload, mw.queues)
		t, pos, err := st.w.appendKeep(ct, buf, recordKeep(ct, buf))
		if err != nil {
			st.mu.Unlock()
			return
		}
		old.live -= int64(mw.recLen) * int64(mw.refs)
		old.unlink(mw)
		mw.place(pos, int64(walRecordOverhead+len(buf)))
		s := st.segLocked(pos.seg)
		s.live += int64(mw.recLen) * int64(mw.refs)
		s.link(mw)
		// Set as each copy is made: a relocation that stops part-way must still keep the
		// old segment until the copies made are fsynced.
		old.relocated = max(old.relocated, t)
		st.mu.Unlock()
	}
	st.mu.Lock()
	old.relocated = max(old.relocated, st.w.appendedTicket())
	st.mu.Unlock()
	st.w.kick()
}

// relocateTail copies forward the records of segment seq that q has paged. The records
// are read with q unlocked; each copy is appended with q locked, and only while q still
// holds the ref, so no settle of it can come before the copy in the log.
func (st *store) relocateTail(q *queue, seq uint64, old *segState, buf []byte) ([]byte, bool) {
	var moves []diskRef
	q.mu.Lock()
	if q.tail.len() == 0 {
		st.mu.Lock()
		delete(st.tails, q) // it registers again when it pages
		st.mu.Unlock()
	}
	q.tail.eachRef(func(c *refChunk, j int) bool {
		if r := c.get(j); r.inLog() && uint64(r.file) == seq { // a log ref is never a run
			moves = append(moves, r)
		}
		return true
	})
	q.mu.Unlock()
	if len(moves) == 0 {
		return buf, true
	}
	recs := make([][]byte, len(moves))
	types := make([]uint8, len(moves))
	which := make(map[uint64]int, len(moves)) // message id → index in moves
	var ra readAhead
	for i := range moves {
		typ, payload, err := st.readRefRecord(&moves[i], &ra, relocateWindow)
		if err != nil {
			st.log.Error("compaction cannot read back a message; its segment stays", "seg", seq, "err", err)
			return buf, false
		}
		recs[i], types[i] = payload, typ
		which[moves[i].id] = i
	}
	// The tail is walked with q locked (the refs cannot move meanwhile), and the store
	// locked only for each copy, as relocate does: publishers to other queues need it.
	q.mu.Lock()
	defer q.mu.Unlock()
	ok, left := true, len(moves)
	q.tail.replaceLogged(func(r diskRef) (diskRef, bool) {
		if uint64(r.file) != seq {
			return r, true
		}
		k, found := which[r.id]
		if !found || r != moves[k] {
			return r, true // not read above, or settled and published again meanwhile
		}
		left--
		var ct uint8
		ct, buf = copyRecord(buf[:0], types[k], recs[k], []uint64{q.walID})
		st.mu.Lock()
		defer st.mu.Unlock()
		t, pos, err := st.w.appendKeep(ct, buf, recordKeep(ct, buf))
		if err != nil {
			ok = false
			return r, false
		}
		old.live -= int64(r.size)
		r.file, r.off = uint32(pos.seg), uint32(pos.off)|r.off&refRedelivered
		r.size = uint32(walRecordOverhead + len(buf))
		st.segLocked(pos.seg).live += int64(r.size)
		old.relocated = max(old.relocated, t)
		return r, left > 0
	})
	return buf, ok
}

// relocateWindow is how much compaction reads of a segment at once.
const relocateWindow = 1 << 20

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

// errNotWritten says a paged message cannot be read back yet: its record is still on its
// way to the file (with the disk full, perhaps for long). The delivery waits for a batch.
var errNotWritten = errors.New("amqp: the message's log record is not written yet")

// readRefRecord returns the type and payload of a paged message's record, through ra: from
// the window when it holds the record, else by reading a new window of at least window
// octets that starts there. A window read while later records were being written may
// hold them only in part: their CRC tells, and a fresh read follows.
func (st *store) readRefRecord(r *diskRef, ra *readAhead, window int) (uint8, []byte, error) {
	pos := walPos{uint64(r.file), uint64(r.offset())}
	if typ, p, ok := messageRecord(ra.window(false, pos.seg, pos.off, int64(r.size)), r.id); ok {
		return typ, p, nil
	}
	buf := make([]byte, max(int(r.size), window))
	n, err := st.w.readAt(pos, buf)
	if n >= int(r.size) {
		*ra = readAhead{seg: pos.seg, off: pos.off, buf: buf[:n]}
		if typ, p, ok := messageRecord(buf[:r.size], r.id); ok {
			return typ, p, nil
		}
		err = errors.New("amqp: the log holds another record where a message should be")
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return 0, nil, err
}

// messageRecord returns the type and payload of rec when it is one whole publish-kind
// record of message id.
func messageRecord(rec []byte, id uint64) (uint8, []byte, bool) {
	typ, payload, n, ok := parseRecord(rec)
	if !ok || n != len(rec) {
		return 0, nil, false
	}
	pub, ok := publishPart(typ, payload)
	if !ok || len(pub) < 8 || binary.BigEndian.Uint64(pub) != id {
		return 0, nil, false
	}
	return typ, payload, true
}

// readRef reads a paged message of the log back into memory through ra: errNotWritten
// when its record is not in its file yet (it may be in a batch the writer has not
// written), any other error when it was and cannot be read.
func (st *store) readRef(r *diskRef, ra *readAhead) (*message, error) {
	written := st.w.isWritten(walPos{uint64(r.file), uint64(r.offset())}, int64(r.size))
	typ, payload, err := st.readRefRecord(r, ra, readAheadWindow)
	if err != nil {
		if !written {
			return nil, errNotWritten
		}
		return nil, err
	}
	pub, _ := publishPart(typ, payload)
	p, ok := splitPublishRecord(pub, len(pub))
	var m *message
	if ok {
		m, ok = decodeMessageRecord(p.rest)
	}
	if !ok {
		return nil, errors.New("amqp: malformed publish record")
	}
	m.wal = &msgWAL{id: r.id, seg: r.file, off: r.offset(), recLen: r.size}
	return m, nil
}

// Topology records, shared by the log and the checkpoint.

func exchangeRecord(vh string, x *exchange) []byte {
	b := appendShortstr(nil, vh)
	b = appendShortstr(b, x.name)
	b = appendShortstr(b, x.typeName())
	b = append(b, flagByte(x.durable, x.autoDelete, x.internal))
	b = appendTable(b, x.args)
	if x.delay != nil && x.delay.id != 0 {
		b = binary.BigEndian.AppendUint64(b, x.delay.id)
	}
	return b
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
// queueTTL is the message TTL queue of vhost has, with arguments args and the vhost's
// policies as they are now.
func (s *Server) queueTTL(vhost, queue string, args table) ttl {
	qa, _, _ := parseQueueArgs(args)
	s.mu.Lock()
	vh := s.vhosts[vhost]
	s.mu.Unlock()
	if vh == nil {
		return qa.ttl
	}
	vh.mu.RLock()
	qa, _, _ = vh.policies.queueArgs(queue, args, qa)
	vh.mu.RUnlock()
	return qa.ttl
}

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
		queueTTL:    s.queueTTL,
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
	// Recovered messages expire, and unused queues with x-expires start their period, only
	// now that the queues can write to the log.
	for _, vh := range s.vhostList() {
		vh.mu.RLock()
		for _, q := range vh.queues {
			q.mu.Lock()
			if q.ready.pri != nil {
				q.loadTailLocked()
			}
			q.scheduleExpiryLocked()
			q.renewLeaseLocked()
			q.mu.Unlock()
		}
		vh.mu.RUnlock()
	}
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
					b.source.removeBindingLocked(b)
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
			if d.err == nil && (validKind(kind) || kind == kindDelayed && checkDelayedType(args) == nil) {
				x := newExchange(name, kind, f&1 != 0, f&2 != 0, f&4 != 0, args)
				x.ae = vh.policies.alternate(name, args)
				if x.delay != nil {
					x.delay.sched, x.delay.vh = s.delays, vh
					if len(d.b) >= 8 {
						x.delay.id = d.longlong()
					}
				}
				vh.exchanges[name] = x
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
				qa, _, _ := parseQueueArgs(args) // checked at declare
				q := newQueue(name, vh, f&1 != 0, f&2 != 0, args, qa)
				q.walID = id
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
			} else if b = src.findBindingLocked(b); b != nil {
				src.removeBindingLocked(b)
			}
		}
		if d.err != nil {
			return 0, errors.New("amqp: malformed topology record of type " + strconv.Itoa(int(r.typ)))
		}
	}
	n := 0
	now := time.Now().UnixMilli()
	holds := make(map[uint64]*exchange) // log queue id → the delayed exchange holding its messages
	for _, vh := range s.vhosts {
		for _, x := range vh.exchanges {
			if x.delay != nil && x.delay.id != 0 {
				holds[x.delay.id] = x
			}
		}
	}
	for id, refs := range rec.messages {
		if x := holds[id]; x != nil {
			s.delays.restoreHeld(st, x, refs)
			n += refs.len()
			continue
		}
		q := queues[id]
		if q == nil {
			st.mu.Lock()
			refs.each(func(_ int, r diskRef) { st.dropRefsLocked([]diskRef{r}) })
			st.mu.Unlock()
			continue
		}
		// Every recovered message stays on disk until its turn comes. A message's time to
		// live runs on from its publish time, or starts again for one logged without.
		q.mu.Lock()
		refs.each(func(i int, r diskRef) {
			r.off |= refRedelivered
			if r.expires <= 0 { // not exact: the message's ttl, negated; it starts again now
				if t := ttl(-r.expires); t != 0 || q.settings().ttl != 0 {
					r.expires = expiresAtFrom(now, q.settings().ttl, t)
				}
			}
			if r.expires != 0 {
				q.mayExpire = true
			}
			refs.set(i, r)
			q.readyBytes += int64(r.body)
		})
		q.tail, q.tailSeq = &refs, q.nextSeq+1
		q.noteEnqueueLocked(q.tailSeq) // their age counts from the start
		q.nextSeq += uint64(refs.len())
		n += refs.len()
		q.mu.Unlock()
		st.mu.Lock()
		st.tails[q] = true
		st.mu.Unlock()
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

// settleOne records that q is done with m, if both are logged.
func (q *queue) settleOne(m *message) {
	if m.wal != nil && q.walID != 0 && q.vh.store != nil {
		one := [1]*message{m}
		q.vh.store.settle(q, one[:])
	}
}
