package amqp

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The write-ahead log keeps durable topology and persistent messages routed to durable
// queues. Files in the data directory:
//
//	<dir>/LOCK                      held (flock) while a broker uses the directory
//	<dir>/meta.snap                 checkpoint: durable topology and the log position it covers
//	<dir>/RESERVE                   4 MiB set aside, released when the disk fills up
//	<dir>/wal/<20-digit seq>.seg    segments, appended in order, rolled at Config.SegmentSize
//
// A segment starts with a 16-octet header, then records:
//
//	+---------------------+-------------+--------------+
//	| magic "AMQPWAL\x00" | version u32 | reserved u32 |   version = 1
//	+---------------------+-------------+--------------+
//
//	+----------+----------+---------+----------------------+
//	| len  u32 | crc  u32 | type u8 |  payload (len bytes) |
//	+----------+----------+---------+----------------------+
//
// All integers are big-endian; crc is CRC-32C (Castagnoli) over type and payload; type 0 is
// invalid, so zeroed space never parses. Payloads use the wire encodings of frame.go
// (shortstr, longstr, field table):
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
// meta.snap is "AMQPSNAP", version u32, crc u32 over the rest, then the covered position
// (segment u64, offset u64), the next queue id and message id (u64 each), and the durable
// topology as a sequence of records 1, 3 and 5 in the format above (without len and crc).
//
// Recovery loads meta.snap, replays every segment in order (topology records only past the
// covered position), and rebuilds queues in message-id order. Message ids are never reused;
// a publish record may appear twice when compaction copied it forward, and the copies
// collapse. A record that fails its CRC or runs past the end of the last segment is a torn
// write from a crash and is cut off; anywhere else it stops startup unless Config.Repair.
const (
	walVersion        = 1
	walHeaderSize     = 16
	walRecordOverhead = 9 // len, crc, type
	defaultSegment    = 16 << 20

	recExchangeDeclare = 1
	recExchangeDelete  = 2
	recQueueDeclare    = 3
	recQueueDelete     = 4
	recBind            = 5
	recUnbind          = 6
	recPublish         = 7
	recAck             = 8
)

var (
	walMagic  = [8]byte{'A', 'M', 'Q', 'P', 'W', 'A', 'L', 0}
	snapMagic = [8]byte{'A', 'M', 'Q', 'P', 'S', 'N', 'A', 'P'}
	crcTable  = crc32.MakeTable(crc32.Castagnoli)
	errWAL    = errors.New("amqp: write-ahead log failed")
	// errNoSpace refuses new persistent messages while the log's disk is full.
	errNoSpace = errors.New("amqp: write-ahead log is out of disk space")
)

// walPos is a place in the log.
type walPos struct{ seg, off uint64 }

// less orders positions; a record before the checkpoint position is covered by it.
func (p walPos) less(o walPos) bool { return p.seg < o.seg || p.seg == o.seg && p.off < o.off }

// segment is one log file.
type segment struct {
	seq       uint64
	size      int64      // octets assigned, header included; guarded by w.mu
	liveBytes int64      // octets of publish records still needed; guarded by w.mu
	topology  bool       // holds topology records; guarded by w.mu
	msgs      []*message // publish records written here (some may be dead); guarded by w.mu
	relocated uint64     // ticket of the copy-forward of its messages, 0 if none
}

// walChunk is appended bytes waiting for the writer, all for one segment.
type walChunk struct {
	seg *segment
	buf []byte
}

// wal is the write-ahead log. Appenders encode records under mu; one writer goroutine
// writes each batch with one write and one fsync, then completes the batch's tickets.
type wal struct {
	dir      string
	log      *slog.Logger
	segSize  int64
	interval time.Duration // fsync policy "interval": fsync at most this often; 0 is "always"
	lock     *os.File

	mu        sync.Mutex
	synced    sync.Cond  // broadcast when done grows
	segs      []*segment // guarded by mu: oldest first, last is the head
	pend      []walChunk // guarded by mu: records not yet written
	pendSpare []walChunk // guarded by mu: the other pend slice, empty
	freeBufs  [][]byte   // guarded by mu: chunk buffers to reuse
	ackBuf    []byte     // guarded by mu: reused to encode ack records
	appended  uint64     // guarded by mu: tickets handed out (one per record)
	done      uint64     // guarded by mu: tickets written (and synced, under "always")
	failed    error      // guarded by mu: a write or fsync failed; the log is closed for good
	listeners []*channel // guarded by mu: channels waiting for confirms after a sync
	nextMsgID uint64     // guarded by mu
	nextQID   uint64     // guarded by mu
	snapPos   walPos     // guarded by mu: position meta.snap covers
	topoSince int        // guarded by mu: topology records since the last checkpoint
	closed    bool       // guarded by mu
	wake      chan struct{}
	stopped   chan struct{}

	doneAtomic   atomic.Uint64 // done, readable without mu
	failedAtomic atomic.Bool   // failed != nil, readable without mu
	noSpace      atomic.Bool   // the disk is full: the writer is waiting for room; set under mu

	// The writer's own state.
	written  uint64 // tickets written to the file
	fsynced  uint64 // tickets fsynced: only these may replace a deleted segment's records
	file     *os.File
	fileSeg  *segment
	fileOff  int64 // octets written to file
	reserved bool  // the reserve file is in place
	lastSync time.Time

	// snapshotFn encodes the durable topology as checkpoint records with every vhost
	// read-locked, and calls at while the locks are held; set by the server.
	snapshotFn func(at func()) []byte
}

// walOptions configure openWAL.
type walOptions struct {
	segmentSize int64
	interval    time.Duration
	repair      bool
	log         *slog.Logger
	snapshot    func(at func()) []byte // see wal.snapshotFn
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

// openWAL locks the directory, replays it, and starts the writer on a fresh segment.
func openWAL(dir string, opts walOptions) (*wal, *recovered, error) {
	if opts.segmentSize <= 0 {
		opts.segmentSize = defaultSegment
	}
	if err := prepareDir(dir, opts.log); err != nil {
		return nil, nil, err
	}
	lock, err := lockDir(filepath.Join(dir, "LOCK"))
	if err != nil {
		return nil, nil, err
	}
	w := &wal{
		dir: dir, log: opts.log, segSize: opts.segmentSize, interval: opts.interval, lock: lock,
		wake: make(chan struct{}, 1), stopped: make(chan struct{}), nextMsgID: 1, nextQID: 1,
		snapshotFn: opts.snapshot,
	}
	w.synced.L = &w.mu
	rec, err := w.replay(opts.repair)
	if err != nil {
		lock.Close()
		return nil, nil, err
	}
	err = w.startSegment()
	if isNoSpace(err) && w.releaseReserve() {
		err = w.startSegment()
	}
	if err != nil {
		lock.Close()
		return nil, nil, err
	}
	if !w.reserved {
		w.makeReserve()
	}
	go w.run()
	return w, rec, nil
}

// prepareDir creates the data directory and its wal/ directory readable by the broker's
// user alone (message bodies are stored in clear), tightens an existing one that others
// may read, syncs what it created, and removes checkpoint files a crash left half written.
func prepareDir(dir string, log *slog.Logger) error {
	for _, d := range []string{dir, filepath.Join(dir, "wal")} {
		fi, err := os.Stat(d)
		if errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(d, 0o700); err != nil {
				return err
			}
			if err := syncDir(filepath.Dir(d)); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return errors.New("amqp: " + d + " is not a directory")
		}
		if fi.Mode().Perm()&0o077 != 0 && runtime.GOOS != "windows" {
			log.Warn("data directory was open to other users; restricting it to the broker's user", "dir", d, "mode", fi.Mode().Perm().String())
			if err := os.Chmod(d, 0o700); err != nil {
				return err
			}
		}
	}
	files, err := filepath.Glob(filepath.Join(dir, "wal", "*.seg"))
	if err != nil {
		return err
	}
	files = append(files, filepath.Join(dir, "LOCK"), filepath.Join(dir, "meta.snap"), filepath.Join(dir, "RESERVE"))
	loose := 0
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil && fi.Mode().Perm()&0o077 != 0 && runtime.GOOS != "windows" {
			if err := os.Chmod(f, 0o600); err != nil {
				return err
			}
			loose++
		}
	}
	if loose > 0 {
		log.Warn("data files were readable by other users; restricted them to the broker's user", "dir", dir, "files", loose)
	}
	stale, _ := filepath.Glob(filepath.Join(dir, ".meta.snap.tmp-*"))
	for _, f := range stale {
		if err := os.Remove(f); err != nil {
			return err
		}
		log.Info("removed a checkpoint file a crash left half written", "file", f)
	}
	return nil
}

func (w *wal) segPath(seq uint64) string {
	s := strconv.FormatUint(seq, 10)
	return filepath.Join(w.dir, "wal", strings.Repeat("0", 20-len(s))+s+".seg")
}

// startSegment opens a new head segment for the writer. Called before the writer runs.
func (w *wal) startSegment() error {
	// Past the last file and past the checkpoint, which may name a segment that never
	// reached the disk.
	seq := w.snapPos.seg + 1
	if n := len(w.segs); n > 0 {
		seq = max(seq, w.segs[n-1].seq+1)
	}
	seg := &segment{seq: seq, size: walHeaderSize}
	w.segs = append(w.segs, seg)
	return w.openFile(seg)
}

// openFile creates seg's file with its header and makes it the writer's file once the
// previous one is synced. When the disk is full it removes what it created and leaves
// the previous file as it was.
func (w *wal) openFile(seg *segment) error {
	name := w.segPath(seg.seq)
	f, err := os.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	var hdr [walHeaderSize]byte
	copy(hdr[:], walMagic[:])
	binary.BigEndian.PutUint32(hdr[8:], walVersion)
	if _, err := f.Write(hdr[:]); err != nil {
		f.Close()
		os.Remove(name)
		return err
	}
	if w.file != nil {
		if err := w.file.Sync(); err != nil {
			f.Close()
			return err
		}
		w.file.Close()
	}
	w.file, w.fileSeg, w.fileOff = f, seg, walHeaderSize
	return syncDir(filepath.Join(w.dir, "wal"))
}

// appendLocked adds one record and returns its ticket and place. w.mu must be held.
func (w *wal) appendLocked(typ uint8, payload []byte) (uint64, *segment, error) {
	if w.failed != nil {
		return 0, nil, w.failed
	}
	if typ == recPublish && w.noSpace.Load() {
		// New messages wait for room; settlements and topology are kept for the writer.
		return 0, nil, errNoSpace
	}
	if w.closed {
		return 0, nil, errWAL
	}
	n := int64(walRecordOverhead + len(payload))
	head := w.segs[len(w.segs)-1]
	if head.size > walHeaderSize && head.size+n > w.segSize {
		head = &segment{seq: head.seq + 1, size: walHeaderSize}
		w.segs = append(w.segs, head)
	}
	head.size += n
	var c *walChunk
	if k := len(w.pend); k > 0 && w.pend[k-1].seg == head {
		c = &w.pend[k-1]
	} else {
		var buf []byte
		if k := len(w.freeBufs); k > 0 {
			buf = w.freeBufs[k-1]
			w.freeBufs = w.freeBufs[:k-1]
		}
		w.pend = append(w.pend, walChunk{seg: head, buf: buf})
		c = &w.pend[len(w.pend)-1]
	}
	b := binary.BigEndian.AppendUint32(c.buf, uint32(len(payload)))
	crc := crc32.Update(crc32.Update(0, crcTable, []byte{typ}), crcTable, payload)
	b = binary.BigEndian.AppendUint32(b, crc)
	b = append(b, typ)
	c.buf = append(b, payload...)
	if typ != recPublish && typ != recAck {
		head.topology = true
		w.topoSince++
	}
	w.appended++
	return w.appended, head, nil
}

// append adds one record and wakes the writer.
func (w *wal) append(typ uint8, payload []byte) (uint64, error) {
	w.mu.Lock()
	t, _, err := w.appendLocked(typ, payload)
	w.mu.Unlock()
	w.kick()
	return t, err
}

func (w *wal) kick() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// wait blocks until ticket is written (and synced under the "always" policy).
func (w *wal) wait(ticket uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.done < ticket && w.failed == nil && !w.noSpace.Load() {
		w.synced.Wait()
	}
	if w.failed == nil && w.done < ticket {
		return errNoSpace
	}
	return w.failed
}

// listen asks for ch.walSynced after the next batch is written. w.mu must be held.
func (w *wal) listenLocked(ch *channel) {
	if !ch.walListening {
		ch.walListening = true
		w.listeners = append(w.listeners, ch)
	}
}

// run is the writer: one write and one fsync per batch, then compaction.
func (w *wal) run() {
	defer close(w.stopped)
	var tick <-chan time.Time
	if w.interval > 0 {
		t := time.NewTicker(w.interval)
		defer t.Stop()
		tick = t.C
	}
	idle := time.NewTicker(time.Second)
	defer idle.Stop()
	for {
		select {
		case <-w.wake:
		case <-tick:
		case <-idle.C:
		}
		w.mu.Lock()
		chunks, ticket, closed := w.pend, w.appended, w.closed
		w.pend, w.pendSpare = w.pendSpare, nil
		w.mu.Unlock()

		err := w.write(chunks)
		if len(chunks) > 0 {
			w.written = ticket
		}
		if err == nil && w.fsynced < w.written &&
			(w.interval == 0 || time.Since(w.lastSync) >= w.interval || closed) {
			if err = w.file.Sync(); err == nil {
				w.fsynced = w.written
			}
			w.lastSync = time.Now()
		}

		w.mu.Lock()
		for i := range chunks {
			if cap(chunks[i].buf) <= 1<<20 && len(w.freeBufs) < 4 {
				w.freeBufs = append(w.freeBufs, chunks[i].buf[:0])
			}
			chunks[i] = walChunk{}
		}
		w.pendSpare = chunks[:0]
		if err != nil && w.failed == nil {
			w.failed = errWAL
			w.failedAtomic.Store(true)
			if isNoSpace(err) { // write gives up on a full disk only when the log closes
				w.log.Error("shutting down with log records unwritten: the disk is full", "err", err)
			} else {
				w.log.Error("write-ahead log failed; persistent publishes are refused until restart", "err", err)
			}
		}
		if w.failed == nil {
			// Never past a failed batch: what it held is not on disk.
			w.done = ticket
			w.doneAtomic.Store(ticket)
		}
		listeners := w.listeners
		w.listeners = nil
		for _, ch := range listeners {
			ch.walListening = false
		}
		w.synced.Broadcast()
		w.mu.Unlock()
		for _, ch := range listeners {
			ch.walSynced(ticket)
		}
		if closed {
			return
		}
		if err == nil {
			w.compact()
		}
	}
}

// write writes chunks in order, opening new segment files as the log rolls. When the
// disk is full it keeps them and tries again, compacting in between, until they are
// written or the log closes: consuming and acking then frees the space it needs.
func (w *wal) write(chunks []walChunk) error {
	for {
		n, err := w.writeSome(chunks)
		chunks = chunks[n:]
		if err == nil {
			break
		}
		if !isNoSpace(err) || !w.waitForSpace(err) {
			return err
		}
	}
	if !w.reserved {
		// Out of space, the log accepts new messages again only once it has its reserve
		// back: the reserve is for the records that free space, never for publishes.
		w.makeReserve()
		if w.reserved && w.noSpace.Load() {
			w.noSpace.Store(false)
			w.log.Info("write-ahead log has room again; persistent publishes are accepted")
		}
	}
	return nil
}

// reserveSize is the disk space the log keeps in reserve for a full disk: room for the
// settlements, and the checkpoint that lets compaction delete segments, that free space.
const reserveSize = 4 << 20

func (w *wal) reservePath() string { return filepath.Join(w.dir, "RESERVE") }

// makeReserve sets reserveSize octets aside in a file of their own, where there is room.
// It runs on the writer, or before it starts.
func (w *wal) makeReserve() {
	if fi, err := os.Stat(w.reservePath()); err == nil && fi.Size() == reserveSize {
		w.reserved = true
		return
	}
	f, err := os.OpenFile(w.reservePath(), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err == nil {
		err = fill(f, reserveSize)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		os.Remove(w.reservePath())
		return // tried again after the next write
	}
	w.reserved = true
}

// releaseReserve deletes the reserve file, when there is one, so that a full disk has
// room for a checkpoint and the records that free space; it reports whether it did.
func (w *wal) releaseReserve() bool {
	if err := os.Remove(w.reservePath()); err != nil {
		return false
	}
	w.reserved = false
	w.log.Warn("released the log's disk reserve", "bytes", reserveSize)
	return true
}

// writeSome writes chunks until one fails; it returns how many were written. A write cut
// short is cut off the file, so the chunk can be written again whole.
func (w *wal) writeSome(chunks []walChunk) (int, error) {
	for i, c := range chunks {
		if c.seg != w.fileSeg {
			if err := w.openFile(c.seg); err != nil {
				return i, err
			}
		}
		if _, err := w.file.Write(c.buf); err != nil {
			if terr := w.file.Truncate(w.fileOff); terr != nil {
				return i, terr
			}
			if _, serr := w.file.Seek(w.fileOff, io.SeekStart); serr != nil {
				return i, serr
			}
			return i, err
		}
		w.fileOff += int64(len(c.buf))
	}
	return len(chunks), nil
}

// noSpaceRetry is how often a log whose disk is full tries to write again.
const noSpaceRetry = 100 * time.Millisecond

// waitForSpace marks the log out of space (new persistent publishes are refused, waiters
// told), compacts, and waits a little; it reports false when the log is closing instead.
func (w *wal) waitForSpace(cause error) bool {
	if !w.noSpace.Load() {
		w.log.Error("write-ahead log is out of disk space: persistent publishes are refused until consumers free some", "err", cause)
		w.mu.Lock()
		w.noSpace.Store(true)
		w.synced.Broadcast()
		w.mu.Unlock()
		if w.releaseReserve() {
			return true // try again at once, in the room released
		}
	}
	w.compact()
	time.Sleep(noSpaceRetry)
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.closed
}

// close writes what is pending, syncs, checkpoints, and releases the directory.
func (w *wal) close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.mu.Unlock()
	w.kick()
	<-w.stopped
	if w.failed == nil && w.snapshotFn != nil {
		if err := w.checkpoint(); err != nil {
			w.log.Error("checkpoint at shutdown failed", "err", err)
		}
	}
	w.file.Close()
	w.lock.Close()
}

// compact deletes the oldest segments while nothing in them is needed, copying forward
// the live messages of an oldest segment that is less than half alive.
func (w *wal) compact() {
	w.mu.Lock()
	many := w.topoSince >= checkpointEvery && w.failed == nil
	w.mu.Unlock()
	if many {
		// Keep the checkpoint near the head when topology churns, so replay stays short.
		if err := w.checkpoint(); err != nil && !w.noSpace.Load() {
			w.log.Error("checkpoint failed", "err", err)
		}
	}
	for {
		w.mu.Lock()
		if len(w.segs) < 2 || w.segs[0] == w.fileSeg || w.failed != nil {
			w.mu.Unlock()
			return
		}
		old := w.segs[0]
		if old.liveBytes > 0 {
			// Copy the oldest segment's live messages forward when it is mostly dead, or
			// when the whole log is: a long-lived backlog at the tail must not keep every
			// dead segment after it. Disk stays about twice the live data plus a segment.
			var live, size int64
			for _, s := range w.segs {
				live, size = live+s.liveBytes, size+s.size
			}
			mostlyDead := old.liveBytes*2 < old.size || live*2 < size && size > 1<<20
			if old.relocated == 0 && mostlyDead {
				w.relocateLocked(old)
				w.mu.Unlock()
				w.kick()
			} else {
				w.mu.Unlock()
			}
			return
		}
		if old.relocated > w.fsynced {
			w.mu.Unlock()
			return
		}
		needSnap := old.topology && !(walPos{old.seq, uint64(old.size)}).less(w.snapPos)
		w.mu.Unlock()
		if needSnap {
			if err := w.checkpoint(); err != nil {
				if !w.noSpace.Load() {
					w.log.Error("checkpoint failed", "err", err)
				}
				return
			}
		}
		w.mu.Lock()
		w.segs = w.segs[1:]
		w.mu.Unlock()
		if err := os.Remove(w.segPath(old.seq)); err != nil {
			w.log.Error("removing segment failed", "seg", old.seq, "err", err)
		}
		// The removal must reach the disk before a later checkpoint or copy is trusted
		// to stand in for the segment.
		if err := syncDir(filepath.Join(w.dir, "wal")); err != nil {
			w.log.Error("syncing the log directory failed", "err", err)
		}
	}
}

// checkpointEvery is the number of topology records after which a checkpoint is written.
const checkpointEvery = 8192

// relocateLocked appends a copy of every live message of old at the head, so old can go
// once the copies are written. w.mu must be held.
func (w *wal) relocateLocked(old *segment) {
	var buf []byte
	for _, m := range old.msgs {
		if m.wal == nil || m.wal.seg != old || m.wal.refs == 0 {
			continue
		}
		buf = m.appendPublishRecord(buf[:0], m.wal.queues)
		t, seg, err := w.appendLocked(recPublish, buf)
		if err != nil {
			return
		}
		old.liveBytes -= m.wal.recLen
		m.wal.seg = seg
		seg.liveBytes += m.wal.recLen
		seg.msgs = append(seg.msgs, m)
		old.relocated = t
	}
	old.msgs = nil
	if old.relocated == 0 {
		old.relocated = w.appended
	}
}

// msgWAL is a persistent message's place in the log; guarded by w.mu.
type msgWAL struct {
	id     uint64
	seg    *segment
	recLen int64
	refs   int      // durable queues still holding the message
	queues []uint64 // their ids, for copy-forward
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
// that covers it.
// A confirm-mode channel (ch non-nil) is registered for walSynced under the same lock.
func (w *wal) logPublish(m *message, queues []*queue, scratch []byte, ch *channel) (uint64, []byte, error) {
	qids := make([]uint64, 0, len(queues))
	for _, q := range queues {
		if q.walID != 0 {
			qids = append(qids, q.walID)
		}
	}
	w.mu.Lock()
	m.wal = &msgWAL{id: w.nextMsgID, refs: len(qids), queues: qids}
	w.nextMsgID++
	scratch = m.appendPublishRecord(scratch[:0], qids)
	t, seg, err := w.appendLocked(recPublish, scratch)
	if err == nil {
		m.wal.seg = seg
		m.wal.recLen = int64(walRecordOverhead + len(scratch))
		seg.liveBytes += m.wal.recLen
		seg.msgs = append(seg.msgs, m)
		if ch != nil {
			w.listenLocked(ch)
		}
	} else {
		m.wal = nil
	}
	w.mu.Unlock()
	w.kick()
	return t, scratch, err
}

// settle records that queue q is done with these persistent messages (acked, rejected,
// purged, or delivered to a no-ack consumer).
func (w *wal) settle(q *queue, msgs []*message) uint64 {
	if len(msgs) == 0 {
		return 0
	}
	w.mu.Lock()
	b := binary.BigEndian.AppendUint64(w.ackBuf[:0], q.walID)
	b = binary.BigEndian.AppendUint32(b, uint32(len(msgs)))
	for _, m := range msgs {
		b = binary.BigEndian.AppendUint64(b, m.wal.id)
		w.unrefLocked(m, q.walID)
	}
	w.ackBuf = b
	t, _, _ := w.appendLocked(recAck, b)
	w.mu.Unlock()
	w.kick()
	return t
}

// unrefLocked drops one queue's hold on m. w.mu must be held.
func (w *wal) unrefLocked(m *message, qid uint64) {
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
	if mw.refs == 0 && mw.seg != nil {
		mw.seg.liveBytes -= mw.recLen
	}
}

// dropQueue releases a deleted durable queue's hold on its messages (no record: the
// queue.delete record implies it).
func (w *wal) dropQueue(q *queue, msgs []*message) {
	w.mu.Lock()
	for _, m := range msgs {
		w.unrefLocked(m, q.walID)
	}
	w.mu.Unlock()
}

// logTopology writes a topology record and waits until it is on disk.
func (w *wal) logTopology(typ uint8, payload []byte) error {
	t, err := w.append(typ, payload)
	if err != nil {
		return err
	}
	return w.wait(t)
}

// newQueueID hands out a durable queue id; ids are never reused.
func (w *wal) newQueueID() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	id := w.nextQID
	w.nextQID++
	return id
}

// checkpoint writes meta.snap: the durable topology and the log position it covers.
// It runs on the writer goroutine (or at close), never concurrently with itself.
func (w *wal) checkpoint() error {
	// The snapshot is taken with the vhosts read-locked, and topology changes append their
	// record while holding their vhost's lock, so the head position read inside covers
	// exactly the records the snapshot reflects.
	var pos walPos
	var nextQ, nextM uint64
	topo := w.snapshotWith(func() {
		w.mu.Lock()
		head := w.segs[len(w.segs)-1]
		pos = walPos{head.seq, uint64(head.size)}
		nextQ, nextM = w.nextQID, w.nextMsgID
		w.mu.Unlock()
	})
	b := make([]byte, 0, 64+len(topo))
	b = append(b, snapMagic[:]...)
	b = binary.BigEndian.AppendUint32(b, walVersion)
	b = append(b, 0, 0, 0, 0) // crc
	b = binary.BigEndian.AppendUint64(b, pos.seg)
	b = binary.BigEndian.AppendUint64(b, pos.off)
	b = binary.BigEndian.AppendUint64(b, nextQ)
	b = binary.BigEndian.AppendUint64(b, nextM)
	b = append(b, topo...)
	binary.BigEndian.PutUint32(b[12:], crc32.Checksum(b[16:], crcTable))
	if err := writeFileAtomic(filepath.Join(w.dir, "meta.snap"), b); err != nil {
		return err
	}
	w.mu.Lock()
	w.snapPos = pos
	w.topoSince = 0
	w.mu.Unlock()
	return nil
}

func (w *wal) snapshotWith(at func()) []byte {
	if w.snapshotFn == nil {
		at()
		return nil
	}
	return w.snapshotFn(at)
}

// replay reads meta.snap and every segment, and returns what they hold.
func (w *wal) replay(repair bool) (*recovered, error) {
	rec := &recovered{messages: make(map[uint64][]*message)}
	snapTopo, err := w.readSnapshot()
	if err != nil {
		return nil, err
	}
	rec.topology = snapTopo

	names, err := filepath.Glob(filepath.Join(w.dir, "wal", "*.seg"))
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	type pending struct {
		m      *message
		queues map[uint64]bool
	}
	msgs := make(map[uint64]*pending)
	deleted := make(map[uint64]bool) // queue ids deleted
	var order []uint64

	for i, name := range names {
		seq, err := strconv.ParseUint(strings.TrimSuffix(filepath.Base(name), ".seg"), 10, 64)
		if err != nil {
			return nil, errors.New("amqp: unexpected file in log directory: " + name)
		}
		data, err := os.ReadFile(name)
		if err != nil {
			return nil, err
		}
		// What was just read may be in the page cache only (written, then the broker was
		// killed): make it durable before anything, compaction above all, relies on it.
		if err := syncFile(name); err != nil {
			return nil, err
		}
		last := i == len(names)-1
		if last && len(data) < walHeaderSize {
			// A crash while creating the file: nothing in it.
			w.log.Warn("removing a log segment cut short in its header", "file", name, "bytes", len(data))
			if err := os.Remove(name); err != nil {
				return nil, err
			}
			if err := syncDir(filepath.Dir(name)); err != nil {
				return nil, err
			}
			continue
		}
		seg := &segment{seq: seq, size: int64(len(data))}
		w.segs = append(w.segs, seg)
		if len(data) < walHeaderSize || [8]byte(data[:8]) != walMagic {
			return nil, errors.New("amqp: " + name + ": not a log segment (bad header)")
		}
		if v := binary.BigEndian.Uint32(data[8:]); v != walVersion {
			return nil, errors.New("amqp: " + name + ": log format version " + strconv.Itoa(int(v)) + " is not supported")
		}
		off := walHeaderSize
		for off < len(data) {
			typ, payload, n, ok := parseRecord(data[off:])
			if !ok {
				if last {
					w.log.Warn("cutting off a torn write at the end of the log", "file", name, "offset", off, "bytes", len(data)-off)
					if err := w.truncate(name, int64(off)); err != nil {
						return nil, err
					}
					seg.size = int64(off)
					break
				}
				if !repair {
					return nil, errors.New("amqp: " + name + ": corrupt record at offset " + strconv.Itoa(off) + " (start with repair to skip the rest of this segment)")
				}
				w.log.Error("repair: skipping corrupt log data; the records in it are lost", "file", name, "offset", off, "bytes", len(data)-off)
				break
			}
			pos := walPos{seq, uint64(off)}
			switch typ {
			case recPublish:
				m, qids, ok := decodePublishRecord(payload)
				if !ok {
					return nil, errors.New("amqp: " + name + ": bad publish record at offset " + strconv.Itoa(off))
				}
				p := msgs[m.wal.id]
				if p == nil {
					p = &pending{m: m, queues: make(map[uint64]bool)}
					msgs[m.wal.id] = p
					order = append(order, m.wal.id)
					for _, q := range qids {
						if !deleted[q] {
							p.queues[q] = true
						}
					}
				}
				// A copy moves the message: this record is now its place in the log.
				p.m.wal.seg, p.m.wal.recLen = seg, int64(n)
				w.nextMsgID = max(w.nextMsgID, m.wal.id+1)
			case recAck:
				d := decoder{b: payload}
				qid := d.longlong()
				cnt := d.long()
				for j := uint32(0); j < cnt && d.err == nil; j++ {
					if p := msgs[d.longlong()]; p != nil {
						delete(p.queues, qid)
					}
				}
			case recQueueDelete:
				d := decoder{b: payload}
				qid := d.longlong()
				deleted[qid] = true
				for _, p := range msgs {
					delete(p.queues, qid)
				}
				if pos.less(w.snapPos) {
					break
				}
				rec.topology = append(rec.topology, walRecord{typ, payload})
			case recQueueDeclare:
				d := decoder{b: payload}
				d.shortstr()
				w.nextQID = max(w.nextQID, d.longlong()+1)
				seg.topology = true
				if !pos.less(w.snapPos) {
					rec.topology = append(rec.topology, walRecord{typ, payload})
				}
			case recExchangeDeclare, recExchangeDelete, recBind, recUnbind:
				seg.topology = true
				if !pos.less(w.snapPos) {
					rec.topology = append(rec.topology, walRecord{typ, payload})
				}
			default:
				return nil, errors.New("amqp: " + name + ": unknown record type " + strconv.Itoa(int(typ)) + " at offset " + strconv.Itoa(off))
			}
			off += n
		}
	}
	// Queue order is message-id order, never file order: compaction copies old messages
	// forward past newer ones.
	sort.Slice(order, func(i, j int) bool { return order[i] < order[j] })
	for _, id := range order {
		p := msgs[id]
		if len(p.queues) == 0 {
			continue
		}
		mw := p.m.wal
		for q := range p.queues {
			mw.queues = append(mw.queues, q)
			rec.messages[q] = append(rec.messages[q], p.m)
		}
		sort.Slice(mw.queues, func(i, j int) bool { return mw.queues[i] < mw.queues[j] })
		mw.refs = len(mw.queues)
		mw.seg.liveBytes += mw.recLen
		mw.seg.msgs = append(mw.seg.msgs, p.m)
	}
	return rec, nil
}

// truncate cuts a torn tail off the last segment, durably.
func (w *wal) truncate(name string, size int64) error {
	if err := os.Truncate(name, size); err != nil {
		return err
	}
	if err := syncFile(name); err != nil {
		return err
	}
	return syncDir(filepath.Dir(name))
}

// syncFile fsyncs a file by name.
func syncFile(name string) error {
	if f := syncObserver.Load(); f != nil {
		(*f)(name)
	}
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// parseRecord checks one record's length and CRC; n is its size with the header.
func parseRecord(b []byte) (typ uint8, payload []byte, n int, ok bool) {
	if len(b) < walRecordOverhead {
		return 0, nil, 0, false
	}
	size := binary.BigEndian.Uint32(b)
	if uint64(size) > uint64(len(b)-walRecordOverhead) {
		return 0, nil, 0, false
	}
	typ = b[8]
	payload = b[walRecordOverhead : walRecordOverhead+int(size)]
	crc := crc32.Update(crc32.Update(0, crcTable, b[8:9]), crcTable, payload)
	if typ == 0 || crc != binary.BigEndian.Uint32(b[4:]) {
		return 0, nil, 0, false
	}
	return typ, payload, walRecordOverhead + int(size), true
}

// decodePublishRecord rebuilds a message from a publish record.
func decodePublishRecord(p []byte) (*message, []uint64, bool) {
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
		return nil, nil, false
	}
	m := &message{exchange: ex, keyLen: keyLen, propsLen: propsLen, data: append([]byte(nil), d.b...)}
	m.wal = &msgWAL{id: id}
	return m, qids, true
}

// readSnapshot loads meta.snap, if there is one, and returns its topology records.
func (w *wal) readSnapshot() ([]walRecord, error) {
	name := filepath.Join(w.dir, "meta.snap")
	b, err := os.ReadFile(name)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if len(b) < 48 || [8]byte(b[:8]) != snapMagic {
		return nil, errors.New("amqp: " + name + ": not a checkpoint")
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != walVersion {
		return nil, errors.New("amqp: " + name + ": checkpoint version " + strconv.Itoa(int(v)) + " is not supported")
	}
	if crc32.Checksum(b[16:], crcTable) != binary.BigEndian.Uint32(b[12:]) {
		return nil, errors.New("amqp: " + name + ": checkpoint fails its checksum")
	}
	w.snapPos = walPos{binary.BigEndian.Uint64(b[16:]), binary.BigEndian.Uint64(b[24:])}
	w.nextQID = binary.BigEndian.Uint64(b[32:])
	w.nextMsgID = binary.BigEndian.Uint64(b[40:])
	var recs []walRecord
	rest := b[48:]
	for len(rest) > 0 {
		if len(rest) < 5 {
			return nil, errors.New("amqp: " + name + ": truncated checkpoint")
		}
		size := binary.BigEndian.Uint32(rest[1:])
		if uint64(size) > uint64(len(rest)-5) {
			return nil, errors.New("amqp: " + name + ": truncated checkpoint")
		}
		recs = append(recs, walRecord{rest[0], rest[5 : 5+size]})
		rest = rest[5+size:]
	}
	return recs, nil
}

// appendSnapRecord appends a checkpoint record: type u8, len u32, payload.
func appendSnapRecord(b []byte, typ uint8, payload []byte) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// writeZeros writes size zero octets to f.
func writeZeros(f *os.File, size int64) error {
	zeros := make([]byte, 64<<10)
	for size > 0 {
		n, err := f.Write(zeros[:min(size, int64(len(zeros)))])
		if err != nil {
			return err
		}
		size -= int64(n)
	}
	return nil
}

// syncObserver, when a test sets it, is told the name of every file and directory the
// log fsyncs by name.
var syncObserver atomic.Pointer[func(name string)]

func syncDir(dir string) error {
	if f := syncObserver.Load(); f != nil {
		(*f)(dir)
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// sync waits until everything appended so far is on disk.
func (w *wal) sync() error {
	w.mu.Lock()
	t := w.appended
	w.mu.Unlock()
	w.kick()
	return w.wait(t)
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

// logLocked appends a topology record if the vhost is durable-backed. vh.mu must be held.
func (vh *vhost) logLocked(typ uint8, payload []byte) {
	if vh.wal != nil {
		vh.wal.append(typ, payload)
	}
}

// syncTopology waits until the topology records appended so far are on disk.
func (vh *vhost) syncTopology() error {
	if vh.wal == nil {
		return nil
	}
	if err := vh.wal.sync(); err != nil {
		return logUnwritable(err)
	}
	return nil
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
	w, rec, err := openWAL(s.cfg.DataDir, walOptions{
		segmentSize: s.cfg.SegmentSize,
		interval:    s.cfg.FsyncInterval,
		repair:      s.cfg.Repair,
		log:         s.log,
		snapshot:    s.snapshotTopology,
	})
	if err != nil {
		return err
	}
	n, err := s.restore(w, rec)
	if err != nil {
		w.snapshotFn = nil // a checkpoint of half-restored topology would lose the rest
		w.close()
		return err
	}
	s.mu.Lock()
	s.wal = w
	for _, vh := range s.vhosts {
		vh.wal = w
	}
	s.mu.Unlock()
	s.log.Info("data directory loaded", "dir", s.cfg.DataDir, "messages", n, "took", time.Since(start).String())
	return nil
}

// restore applies recovered topology and messages; it returns the number of messages.
func (s *Server) restore(w *wal, rec *recovered) (int, error) {
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
			w.mu.Lock()
			for _, m := range msgs {
				w.unrefLocked(m, id)
			}
			w.mu.Unlock()
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
			q.readyBytes += int64(len(m.body()))
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

// vhostList returns the virtual hosts in name order, the order in which code that holds
// several vhost locks at once takes them.
func (s *Server) vhostList() []*vhost {
	s.mu.Lock()
	vhs := make([]*vhost, 0, len(s.vhosts))
	for _, vh := range s.vhosts {
		vhs = append(vhs, vh)
	}
	s.mu.Unlock()
	sort.Slice(vhs, func(i, j int) bool { return vhs[i].name < vhs[j].name })
	return vhs
}

// predeclared reports whether every vhost creates this exchange itself.
func predeclared(name string) bool {
	switch name {
	case "", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match":
		return true
	}
	return false
}

// logSettled records settled persistent messages of durable queues, one record per queue.
func (s *Server) logSettled(done []unacked) {
	w := s.wal
	if w == nil {
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
		w.settle(q, msgs)
	}
}

// settleOne records that q is done with m, if both are logged.
func (q *queue) settleOne(m *message) {
	if m.wal != nil && q.walID != 0 && q.vh.wal != nil {
		one := [1]*message{m}
		q.vh.wal.settle(q, one[:])
	}
}
