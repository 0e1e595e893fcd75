package amqp

import (
	"bytes"
	"cmp"
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

// The write-ahead log: segment files of checksummed records, appended by any goroutine and
// written by one writer with group commit, read back at a position, replayed at start, and
// a checkpoint file. It knows records, positions and completion tickets, nothing of what
// they mean: which records are still needed, when a segment may go and what a checkpoint
// holds is its caller's (store.go). Files in the data directory:
//
//	<dir>/LOCK                      held (flock) while a broker uses the directory
//	<dir>/meta.snap                 checkpoint: the caller's state and the position it covers
//	<dir>/RESERVE                   4 MiB set aside, released when the disk fills up
//	<dir>/wal/<20-digit seq>.seg    segments, appended in order, rolled at Config.SegmentSize
//	<dir>/wal/<20-digit seq>.idx    a full segment's index, for replay
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
// invalid, so zeroed space never parses. A record's position is its segment and the offset
// of its len field. The checkpoint is written whole to a temporary file, fsynced and
// renamed over meta.snap:
//
//	+---------------------+-------------+---------+-------------+-------------+-----------+
//	| magic "AMQPSNAP"    | version u32 | crc u32 | segment u64 | offset u64  |  payload  |
//	+---------------------+-------------+---------+-------------+-------------+-----------+
//
// crc covers everything after it; the position is the head of the log when the payload
// was taken, so the records before it are covered by it.
//
// Once a segment is full and fsynced, its index is written beside it: each record's place,
// size and type, and as much of its payload as the appender asked to keep (for a message,
// all but its body), so replay reads the index instead of every body. It is written
// without fsync: one that is torn, fails its CRC or names another segment size is ignored,
// and the segment is read instead.
//
//	+---------------------+-------------+---------+------------------+---------+
//	| magic "AMQPIDX\x00" | version u32 | crc u32 | segment size u64 | entries |
//	+---------------------+-------------+---------+------------------+---------+
//
//	entry: offset u32, size u32 (the record's, header included), type u8, kept u32,
//	       the first kept octets of the payload
//
// Replay reads the segments in order. A record that fails its CRC or runs past the end of
// the last segment is a torn write from a crash and is cut off; anywhere else it stops
// startup unless the caller asks for repair, which skips the rest of that segment.
const (
	walVersion        = 1
	walHeaderSize     = 16
	walRecordOverhead = 9 // len, crc, type
	walSnapHeader     = 32
	walIndexHeader    = 24
	walIndexEntry     = 13 // offset, size, type, kept
	walChunkSize      = 1 << 20
	defaultSegment    = 16 << 20
	// maxSegment bounds the segment size, so that an offset in a segment (which may
	// hold one record past it, a message of up to 512 MiB) fits 32 bits.
	maxSegment = 1 << 30
)

var (
	walMagic  = [8]byte{'A', 'M', 'Q', 'P', 'W', 'A', 'L', 0}
	snapMagic = [8]byte{'A', 'M', 'Q', 'P', 'S', 'N', 'A', 'P'}
	idxMagic  = [8]byte{'A', 'M', 'Q', 'P', 'I', 'D', 'X', 0}
	crcTable  = crc32.MakeTable(crc32.Castagnoli)
	errWAL    = errors.New("amqp: write-ahead log failed")
	// errNoSpace refuses new persistent messages while the log's disk is full.
	errNoSpace = errors.New("amqp: write-ahead log is out of disk space")
)

// walPos is a place in the log: a segment and an offset in it.
type walPos struct{ seg, off uint64 }

// less orders positions; a record before the checkpoint position is covered by it.
func (p walPos) less(o walPos) bool { return p.seg < o.seg || p.seg == o.seg && p.off < o.off }

// segment is one log file.
type segment struct {
	seq  uint64
	size int64    // octets assigned, header included; guarded by w.mu
	rf   *os.File // opened for reading back, lazily; guarded by w.mu
	used uint64   // when rf was last handed out, in w.reads; guarded by w.mu
	// index is the segment's index entries so far (see the format above), in blocks of
	// about indexBlock octets so that it never copies itself to grow; guarded by w.mu until
	// the segment is full, then the writer's.
	index      [][]byte
	indexBytes int
	noIndex    bool   // the index would be no smaller than the segment: none is kept
	last       uint64 // the ticket of its last record; guarded by w.mu
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
	synced    sync.Cond  // broadcast after each batch, when the log fails or runs out of space
	segs      []*segment // guarded by mu: oldest first, last is the head
	pend      []walChunk // guarded by mu: records not yet written
	pendSpare []walChunk // guarded by mu: the other pend slice, empty
	freeBufs  [][]byte   // guarded by mu: chunk buffers to reuse
	appended  uint64     // guarded by mu: tickets handed out (one per record)
	pendBytes int64      // guarded by mu: octets in pend
	pendLimit int64      // what waitRoom lets pend hold: maxPending
	reads     uint64     // guarded by mu: read handles handed out, a clock for closing the idlest
	readFiles int        // guarded by mu: segments with a read handle open
	done      uint64     // guarded by mu: tickets written (and synced, under "always"), and held by followers when gated
	wrote     uint64     // guarded by mu: tickets written to their files, readable
	failed    error      // guarded by mu: a write or fsync failed; the log is closed for good
	closed    bool       // guarded by mu
	wake      chan struct{}
	stopped   chan struct{}

	doneAtomic    atomic.Uint64 // done, readable without mu
	fsyncedAtomic atomic.Uint64 // tickets fsynced: only these may stand in for a removed segment
	failedAtomic  atomic.Bool   // failed != nil, readable without mu
	pendAtomic    atomic.Int64  // pendBytes, readable without mu
	writtenTo     atomic.Uint64 // segment<<32 | offset: every record before it is in its file
	noSpace       atomic.Bool   // the disk is full: the writer is waiting for room; set under mu

	// The writer's own state.
	written  uint64 // tickets written to the file
	file     *os.File
	fileSeg  *segment
	fileOff  int64 // octets written to file
	reserved bool  // the reserve file is in place
	lastSync time.Time

	// Set by the caller before start; they run on the writer goroutine, holding no lock.
	onBatch  func(done uint64) // after each batch: tickets up to done are written
	maintain func()            // after a batch that wrote, and while waiting for disk space

	check *walCheck // set: replay is a read-only check (see replay); nil in a broker

	// tap, when set, follows what the writer does to the directory and may hold back
	// completion (replication.go); it may be set and cleared while the writer runs.
	tap   atomic.Pointer[walTap]
	gated []walGated // the writer's: batches written here that wait for tap.held
}

// walTap is told about the directory's changes, on the goroutine that makes them.
type walTap struct {
	written func()                       // writtenTo grew: records up to it are in their files
	changed func(name string, at uint64) // a file of the directory (or "definitions") was replaced or removed, the log written up to at
	// held, when set, is the writtenTo position enough followers hold: a ticket is done
	// only once its batch is written here and held there.
	held func() uint64
}

// walCloseGrace is how long a closing log whose completion is gated waits for followers
// to ack what it wrote, before it fails the rest.
const walCloseGrace = 2 * time.Second

// walGated is a batch written here, waiting for tap.held to reach pos.
type walGated struct{ ticket, pos uint64 }

// errUnreplicated fails the log that closes before followers held all it wrote.
var errUnreplicated = errors.New("amqp: log closed before followers acknowledged its last records")

// walOptions configure openWAL.
type walOptions struct {
	segmentSize int64
	interval    time.Duration
	log         *slog.Logger
}

// openWAL prepares and locks the directory. The caller then reads the checkpoint,
// replays the segments, sets its hooks and starts the writer.
func openWAL(dir string, opts walOptions) (*wal, error) {
	if opts.segmentSize <= 0 {
		opts.segmentSize = defaultSegment
	}
	opts.segmentSize = min(opts.segmentSize, maxSegment)
	if err := prepareDir(dir, opts.log); err != nil {
		return nil, err
	}
	lock, err := lockDir(filepath.Join(dir, "LOCK"))
	if err != nil {
		return nil, err
	}
	w := &wal{
		dir: dir, log: opts.log, segSize: opts.segmentSize, interval: opts.interval, lock: lock,
		wake: make(chan struct{}, 1), stopped: make(chan struct{}), pendLimit: maxPending,
	}
	w.synced.L = &w.mu
	return w, nil
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

// segName is the name of segment seq relative to the data directory.
func segName(seq uint64) string {
	s := strconv.FormatUint(seq, 10)
	return "wal/" + strings.Repeat("0", 20-len(s)) + s + ".seg"
}

func (w *wal) segPath(seq uint64) string {
	return filepath.Join(w.dir, filepath.FromSlash(segName(seq)))
}

// replay reads every segment in order and calls fn for each record, with its position
// and size (header included); the payload is valid only during the call, and from a
// segment's index it is only what the appender asked the index to keep. A torn tail of
// the last segment is cut off; corruption elsewhere is an error, unless repair, which
// skips the rest of that segment. Every segment read is fsynced first: what the page cache
// held after a kill -9 may never have reached the disk, and nothing may rely on it until
// it has.
//
// With w.check set, replay is a read-only check instead: it writes, syncs and removes
// nothing, reads every segment rather than its index (and compares the index), and notes
// each problem in w.check, with the same rules, then goes on to the next segment.
func (w *wal) replay(repair bool, fn func(pos walPos, typ uint8, payload []byte, size int64) error) error {
	names, err := filepath.Glob(filepath.Join(w.dir, "wal", "*.seg"))
	if err != nil {
		return err
	}
	sort.Strings(names)
	w.removeStaleIndexes(names)
	var data []byte
	for i, name := range names {
		seq, err := strconv.ParseUint(strings.TrimSuffix(filepath.Base(name), ".seg"), 10, 64)
		if err != nil {
			if w.check.add(checkCorrupt, name, -1, "unexpected file in log directory") {
				continue
			}
			return errors.New("amqp: unexpected file in log directory: " + name)
		}
		if i < len(names)-1 && w.check == nil {
			ok, err := w.replayFromIndex(seq, name, fn)
			if err != nil {
				return errors.New("amqp: " + name + ": " + err.Error())
			}
			if ok {
				continue
			}
		}
		// One buffer serves every segment: the callback copies what it keeps.
		data, err = readFileInto(data[:0], name)
		if err != nil {
			return err
		}
		if w.check != nil {
			w.check.segments++
			w.check.bytes += int64(len(data))
		} else if err := syncFile(name); err != nil {
			return err
		}
		last := i == len(names)-1
		if last && len(data) < walHeaderSize {
			// A crash while creating the file: nothing in it.
			if w.check.add(checkNote, name, -1, "a segment cut short in its header by a crash: the next start removes it") {
				continue
			}
			w.log.Warn("removing a log segment cut short in its header", "file", name, "bytes", len(data))
			if err := os.Remove(name); err != nil {
				return err
			}
			if err := syncDir(filepath.Dir(name)); err != nil {
				return err
			}
			continue
		}
		seg := &segment{seq: seq, size: int64(len(data))}
		w.segs = append(w.segs, seg)
		if len(data) < walHeaderSize || [8]byte(data[:8]) != walMagic {
			if w.check.add(checkCorrupt, name, 0, "not a log segment (bad header)") {
				continue
			}
			return errors.New("amqp: " + name + ": not a log segment (bad header)")
		}
		if v := binary.BigEndian.Uint32(data[8:]); v != walVersion {
			if w.check.add(checkCorrupt, name, 8, "log format version "+strconv.Itoa(int(v))+" is not supported") {
				continue
			}
			return errors.New("amqp: " + name + ": log format version " + strconv.Itoa(int(v)) + " is not supported")
		}
		off := walHeaderSize
		for off < len(data) {
			typ, payload, n, ok := parseRecord(data[off:])
			if !ok {
				if last {
					if w.check.add(checkNote, name, off, "a torn write at the end of the log: the next start cuts off its "+strconv.Itoa(len(data)-off)+" octets") {
						break
					}
					w.log.Warn("cutting off a torn write at the end of the log", "file", name, "offset", off, "bytes", len(data)-off)
					if err := w.truncate(name, int64(off)); err != nil {
						return err
					}
					seg.size = int64(off)
					break
				}
				if !repair {
					if w.check.add(checkCorrupt, name, off, "corrupt record (bad length or checksum): the rest of this segment cannot be read") {
						break
					}
					return errors.New("amqp: " + name + ": corrupt record at offset " + strconv.Itoa(off) + " (start with repair to skip the rest of this segment)")
				}
				w.log.Error("repair: skipping corrupt log data; the records in it are lost", "file", name, "offset", off, "bytes", len(data)-off)
				break
			}
			if w.check != nil {
				w.check.records[typ]++
			}
			if err := fn(walPos{seq, uint64(off)}, typ, payload, int64(n)); err != nil {
				if w.check.add(checkCorrupt, name, off, err.Error()+" (a start stops here)") {
					off += n
					continue
				}
				return errors.New("amqp: " + name + ": record at offset " + strconv.Itoa(off) + ": " + err.Error())
			}
			off += n
		}
		if w.check != nil {
			w.checkIndex(seq, data, off, last)
		}
	}
	return nil
}

// walCheck is what a read-only replay found (see replay).
type walCheck struct {
	segments int
	bytes    int64
	records  [256]int // records read, by type
	indexes  int      // indexes that match their segment
	problems []walProblem
}

// walProblem is one thing a check found wrong in a file.
type walProblem struct {
	level int // checkCorrupt, checkWarning or checkNote
	file  string
	off   int // -1: the file as a whole
	text  string
}

const (
	checkCorrupt = iota // data a start refuses, or that is lost
	checkWarning        // a broken index, which a start ignores (it reads the segment)
	checkNote           // what a start tidies: a torn tail, files a crash left
)

// add notes a problem and reports true; on a nil c (no check: a broker's replay) it does
// nothing and reports false.
func (c *walCheck) add(level int, file string, off int, text string) bool {
	if c == nil {
		return false
	}
	c.problems = append(c.problems, walProblem{level, file, off, text})
	return true
}

// checkIndex compares segment seq's index, when it has one, with the segment's records in
// data up to end, where they stop parsing. An index that fails its own checks is a
// warning: replay ignores it and reads the segment. One that passes them but disagrees
// with its segment is corruption: replay would trust it. Replay reads the index of every
// segment but the last.
func (w *wal) checkIndex(seq uint64, data []byte, end int, last bool) {
	name := w.indexPath(seq)
	if _, err := os.Stat(name); errors.Is(err, os.ErrNotExist) {
		return
	}
	x, ok := w.readIndex(seq, int64(len(data)))
	if !ok {
		w.check.add(checkWarning, name, -1, "index is torn, fails its checksum or was made for another segment size: a start ignores it and reads the segment")
		return
	}
	off, bad := walHeaderSize, -1
	ok, _ = eachIndexEntry(seq, x, func(pos walPos, typ uint8, kept []byte, size int64) error {
		if off >= end {
			if end == len(data) {
				bad = off // an entry past the segment's last record
			}
			return io.EOF // past where a corrupt segment's records stop: nothing to compare
		}
		rt, payload, n, _ := parseRecord(data[off:])
		if pos.off != uint64(off) || rt != typ || int64(n) != size || !bytes.HasPrefix(payload, kept) {
			bad = off
			return io.EOF
		}
		off += n
		return nil
	})
	switch {
	case !ok:
		w.check.add(checkWarning, name, -1, "index has a malformed entry: a start ignores it and reads the segment")
	case bad >= 0:
		w.check.add(checkCorrupt, name, -1, "index passes its checksum but disagrees with its segment at offset "+strconv.Itoa(bad)+": a start would replay the index")
	case off < end:
		w.check.add(checkCorrupt, name, -1, "index passes its checksum but ends before its segment, at offset "+strconv.Itoa(off)+": a start would replay the index")
	default:
		w.check.indexes++
		if end < len(data) && !last {
			w.check.add(checkNote, name, -1, "index is sound: a start replays it instead of the damaged segment, and fails only when it reads a damaged record back")
		}
	}
}

// replayFromIndex replays segment seq from its index, when it has a sound one.
func (w *wal) replayFromIndex(seq uint64, name string, fn func(pos walPos, typ uint8, payload []byte, size int64) error) (bool, error) {
	fi, err := os.Stat(name)
	if err != nil {
		return false, nil
	}
	x, ok := w.readIndex(seq, fi.Size())
	if ok {
		ok, _ = eachIndexEntry(seq, x, func(walPos, uint8, []byte, int64) error { return nil })
	}
	if !ok {
		return false, nil
	}
	if err := syncFile(name); err != nil {
		return false, err
	}
	w.segs = append(w.segs, &segment{seq: seq, size: fi.Size()})
	_, err = eachIndexEntry(seq, x, fn)
	return true, err
}

// removeStaleIndexes removes index files left half written, or whose segment is gone.
func (w *wal) removeStaleIndexes(segs []string) {
	tmp, _ := filepath.Glob(filepath.Join(w.dir, "wal", "*.idx.tmp"))
	idx, _ := filepath.Glob(filepath.Join(w.dir, "wal", "*.idx"))
	for _, name := range idx {
		if _, found := slices.BinarySearch(segs, strings.TrimSuffix(name, ".idx")+".seg"); !found {
			tmp = append(tmp, name)
		}
	}
	for _, name := range tmp {
		if !w.check.add(checkNote, name, -1, "an index file left half written, or whose segment is gone: the next start removes it") {
			os.Remove(name)
		}
	}
}

// readFileInto reads a whole file into buf, grown as needed.
func readFileInto(buf []byte, name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	buf = slices.Grow(buf[:0], int(fi.Size()))[:fi.Size()]
	n, err := io.ReadFull(f, buf)
	if err == io.ErrUnexpectedEOF {
		err = nil // shorter than it was: read what is there
	}
	return buf[:n], err
}

// start opens a fresh head segment, numbered past every file and past after (a checkpoint
// may name a segment that never reached the disk), and starts the writer.
func (w *wal) start(after uint64) error {
	seq := after + 1
	if n := len(w.segs); n > 0 {
		seq = max(seq, w.segs[n-1].seq+1)
	}
	seg := &segment{seq: seq, size: walHeaderSize}
	err := w.openFile(seg)
	if isNoSpace(err) && w.releaseReserve() {
		err = w.openFile(seg)
	}
	if err != nil {
		w.lock.Close()
		return err
	}
	w.segs = append(w.segs, seg)
	if !w.reserved {
		w.makeReserve()
	}
	go w.run()
	return nil
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
	prev := w.fileSeg
	if w.file != nil {
		if err := w.file.Sync(); err != nil {
			f.Close()
			return err
		}
		w.file.Close()
	}
	w.file, w.fileSeg, w.fileOff = f, seg, walHeaderSize
	w.writtenTo.Store(seg.seq<<32 | walHeaderSize)
	if err := syncDir(filepath.Join(w.dir, "wal")); err != nil {
		return err
	}
	if prev != nil {
		w.writeIndex(prev)
	}
	return nil
}

// indexBlock is the size of the blocks a segment's index is kept in.
const indexBlock = 256 << 10

// addIndexEntry adds a record to the segment's index, or stops keeping one once the index
// is about half the segment (small records: replaying the segment costs as much).
func (seg *segment) addIndexEntry(off, size uint32, typ uint8, kept []byte) {
	n := walIndexEntry + len(kept)
	k := len(seg.index)
	if k == 0 || len(seg.index[k-1])+n > cap(seg.index[k-1]) {
		seg.index = append(seg.index, make([]byte, 0, max(n, indexBlock)))
		k++
	}
	x := binary.BigEndian.AppendUint32(seg.index[k-1], off)
	x = binary.BigEndian.AppendUint32(x, size)
	x = append(x, typ)
	x = binary.BigEndian.AppendUint32(x, uint32(len(kept)))
	seg.index[k-1] = append(x, kept...)
	seg.indexBytes += n
	if seg.indexBytes > indexBlock && int64(seg.indexBytes)*2 > seg.size {
		seg.index, seg.indexBytes, seg.noIndex = nil, 0, true
	}
}

func (w *wal) indexPath(seq uint64) string {
	return strings.TrimSuffix(w.segPath(seq), ".seg") + ".idx"
}

// writeIndex writes the index of a full segment, whose records are all written and
// fsynced. It is a help to replay, not a record of anything: a failure is only logged.
func (w *wal) writeIndex(seg *segment) {
	w.mu.Lock()
	blocks, size, none := seg.index, seg.size, seg.noIndex
	seg.index, seg.indexBytes = nil, 0
	w.mu.Unlock()
	if none {
		return
	}
	hdr := make([]byte, walIndexHeader)
	copy(hdr, idxMagic[:])
	binary.BigEndian.PutUint32(hdr[8:], walVersion)
	binary.BigEndian.PutUint64(hdr[16:], uint64(size))
	crc := crc32.Update(0, crcTable, hdr[16:])
	for _, b := range blocks {
		crc = crc32.Update(crc, crcTable, b)
	}
	binary.BigEndian.PutUint32(hdr[12:], crc)
	name := w.indexPath(seg.seq)
	err := writeBlocks(name+".tmp", append([][]byte{hdr}, blocks...))
	if err == nil {
		err = os.Rename(name+".tmp", name)
	}
	if err != nil {
		os.Remove(name + ".tmp")
		w.log.Warn("cannot write a log segment's index; replay will read the segment", "seg", seg.seq, "err", err)
		return
	}
	w.changed(walRel(name))
}

// writeBlocks writes a new file from blocks, without fsync.
func writeBlocks(name string, blocks [][]byte) error {
	f, err := os.OpenFile(name, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	for _, b := range blocks {
		if _, err := f.Write(b); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// readIndex returns the entries of segment seq's index when it is whole and was made for
// a segment of size octets.
func (w *wal) readIndex(seq uint64, size int64) ([]byte, bool) {
	b, err := os.ReadFile(w.indexPath(seq))
	if err != nil || len(b) < walIndexHeader || [8]byte(b[:8]) != idxMagic ||
		binary.BigEndian.Uint32(b[8:]) != walVersion || int64(binary.BigEndian.Uint64(b[16:])) != size ||
		binary.BigEndian.Uint32(b[12:]) != crc32.Checksum(b[16:], crcTable) {
		return nil, false
	}
	return b[walIndexHeader:], true
}

// eachIndexEntry calls fn for each entry of an index until fn fails; it reports false when
// an entry is malformed.
func eachIndexEntry(seq uint64, x []byte, fn func(pos walPos, typ uint8, payload []byte, size int64) error) (bool, error) {
	for len(x) > 0 {
		if len(x) < walIndexEntry {
			return false, nil
		}
		off, size, typ, kept := binary.BigEndian.Uint32(x), binary.BigEndian.Uint32(x[4:]), x[8], binary.BigEndian.Uint32(x[9:])
		if uint64(kept) > uint64(len(x)-walIndexEntry) || uint64(kept)+walRecordOverhead > uint64(size) || typ == 0 {
			return false, nil
		}
		if err := fn(walPos{seq, uint64(off)}, typ, x[walIndexEntry:walIndexEntry+kept], int64(size)); err != nil {
			return true, err
		}
		x = x[walIndexEntry+kept:]
	}
	return true, nil
}

// appendLocked adds one record and returns its ticket and position; the segment's index
// keeps the first keep octets of its payload (all when keep is negative). w.mu must be held.
func (w *wal) appendLocked(typ uint8, payload []byte, keep int) (uint64, walPos, error) {
	if w.failed != nil {
		return 0, walPos{}, w.failed
	}
	if w.closed {
		return 0, walPos{}, errWAL
	}
	n := int64(walRecordOverhead + len(payload))
	head := w.segs[len(w.segs)-1]
	if head.size > walHeaderSize && head.size+n > w.segSize {
		head = &segment{seq: head.seq + 1, size: walHeaderSize}
		w.segs = append(w.segs, head)
	}
	pos := walPos{head.seq, uint64(head.size)}
	head.size += n
	var c *walChunk
	if k := len(w.pend); k > 0 && w.pend[k-1].seg == head && len(w.pend[k-1].buf)+int(n) <= walChunkSize {
		c = &w.pend[k-1]
	} else {
		// A batch is a list of chunks of at most walChunkSize (but for one larger record),
		// so a large batch never copies what it holds to grow.
		var buf []byte
		if k := len(w.freeBufs); k > 0 {
			buf = w.freeBufs[k-1]
			w.freeBufs = w.freeBufs[:k-1]
		} else {
			buf = make([]byte, 0, max(int(n), walChunkSize))
		}
		w.pend = append(w.pend, walChunk{seg: head, buf: buf})
		c = &w.pend[len(w.pend)-1]
	}
	b := binary.BigEndian.AppendUint32(c.buf, uint32(len(payload)))
	crc := crc32.Update(crc32.Update(0, crcTable, []byte{typ}), crcTable, payload)
	b = binary.BigEndian.AppendUint32(b, crc)
	b = append(b, typ)
	c.buf = append(b, payload...)
	if keep < 0 || keep > len(payload) {
		keep = len(payload)
	}
	if !head.noIndex {
		head.addIndexEntry(uint32(pos.off), uint32(n), typ, payload[:keep])
	}
	w.pendBytes += n
	w.pendAtomic.Store(w.pendBytes)
	w.appended++
	head.last = w.appended
	return w.appended, pos, nil
}

// append adds one record and wakes the writer; it returns the record's ticket and position.
func (w *wal) append(typ uint8, payload []byte) (uint64, walPos, error) {
	return w.appendKeep(typ, payload, -1)
}

// appendKeep is append for a record whose segment index keeps only the first keep octets
// of its payload: replay from the index sees only those.
func (w *wal) appendKeep(typ uint8, payload []byte, keep int) (uint64, walPos, error) {
	w.mu.Lock()
	t, pos, err := w.appendLocked(typ, payload, keep)
	w.mu.Unlock()
	w.kick()
	return t, pos, err
}

// maxPending bounds what appenders may have waiting for the writer: a publisher that
// outruns the disk waits (waitRoom), so a backlog is never held in memory on its way to
// the log.
const maxPending = 64 << 20

// waitRoom waits while more than maxPending octets wait for the writer. It does not wait
// while the disk is full (publishes are refused then), or once the log failed or closed.
func (w *wal) waitRoom() {
	if w.pendAtomic.Load() <= w.pendLimit {
		return
	}
	w.mu.Lock()
	for w.pendBytes > w.pendLimit && w.failed == nil && !w.closed && !w.noSpace.Load() {
		w.synced.Wait()
	}
	w.mu.Unlock()
}

func (w *wal) kick() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// wait blocks until ticket is done: written, synced under the "always" policy, and held
// by followers when replication gates the log. While the disk is full it returns
// errNoSpace at once rather than wait for room.
func (w *wal) wait(ticket uint64) error { return w.await(&w.done, ticket) }

// sync waits until everything appended so far is done (wait).
func (w *wal) sync() error { return w.await(&w.done, w.kickAppended()) }

// flush waits until everything appended so far is written to its file, where a reader
// finds it, though perhaps neither fsynced nor held by followers yet.
func (w *wal) flush() error { return w.await(&w.wrote, w.kickAppended()) }

// kickAppended wakes the writer and returns the last ticket handed out.
func (w *wal) kickAppended() uint64 {
	w.mu.Lock()
	t := w.appended
	w.mu.Unlock()
	w.kick()
	return t
}

// await blocks until *reached (done or wrote, guarded by mu) is ticket or more, the log
// fails, or the disk is full (errNoSpace).
func (w *wal) await(reached *uint64, ticket uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for *reached < ticket && w.failed == nil && !w.noSpace.Load() {
		w.synced.Wait()
	}
	if w.failed == nil && *reached < ticket {
		return errNoSpace
	}
	return w.failed
}

// isWritten reports whether the record of size octets at pos is in its file, readable.
func (w *wal) isWritten(pos walPos, size int64) bool {
	at := w.writtenTo.Load()
	seg, off := at>>32, at&(1<<32-1)
	return pos.seg < seg || pos.seg == seg && pos.off+uint64(size) <= off
}

// appendedTicket is the ticket of the last record appended.
func (w *wal) appendedTicket() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.appended
}

// head is the position the next record takes, unless the head segment rolls first.
func (w *wal) head() walPos {
	w.mu.Lock()
	defer w.mu.Unlock()
	h := w.segs[len(w.segs)-1]
	return walPos{h.seq, uint64(h.size)}
}

// oldest returns the oldest segment, how many segments there are (the head included),
// and their total size.
func (w *wal) oldest() (segmentInfo, int, int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var size int64
	for _, s := range w.segs {
		size += s.size
	}
	o := w.segs[0]
	return segmentInfo{seq: o.seq, size: o.size, written: o.last <= w.done}, len(w.segs), size
}

// segmentAfter returns the oldest segment after seq.
func (w *wal) segmentAfter(seq uint64) (uint64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	i, found := slices.BinarySearchFunc(w.segs, seq, func(s *segment, seq uint64) int { return cmp.Compare(s.seq, seq) })
	if found {
		i++
	}
	if i == len(w.segs) {
		return 0, false
	}
	return w.segs[i].seq, true
}

// segmentInfo is a segment's number and size.
type segmentInfo struct {
	seq     uint64
	size    int64
	written bool // every record appended to it so far is written
}

// errSegmentBusy refuses to remove the segment the writer writes to, or the head.
var errSegmentBusy = errors.New("amqp: log segment in use")

// removeSegment deletes a segment that is not the head (nor written to), durably: the
// removal reaches the disk before anything that stands in for its records is relied on.
func (w *wal) removeSegment(seq uint64) error {
	w.mu.Lock()
	i := -1
	for j, s := range w.segs {
		if s.seq == seq {
			i = j
		}
	}
	if i < 0 || i == len(w.segs)-1 || w.segs[i] == w.fileSeg {
		w.mu.Unlock()
		return errSegmentBusy
	}
	s := w.segs[i]
	w.segs = append(w.segs[:i:i], w.segs[i+1:]...)
	if s.rf != nil {
		s.rf.Close()
		s.rf = nil
		w.readFiles--
	}
	w.mu.Unlock()
	if err := os.Remove(w.segPath(seq)); err != nil {
		return err
	}
	os.Remove(w.indexPath(seq))
	if err := syncDir(filepath.Join(w.dir, "wal")); err != nil {
		return err
	}
	w.changed(walRel(w.segPath(seq)))
	w.changed(walRel(w.indexPath(seq)))
	return nil
}

// walRel is the name of a log file relative to the data directory: wal/<name>.
func walRel(path string) string { return "wal/" + filepath.Base(path) }

// readRecord reads back the record at pos, checking its CRC. Any goroutine may call it
// while the writer appends, for a record whose ticket is done.
func (w *wal) readRecord(pos walPos) (uint8, []byte, error) {
	return w.readRecordSized(pos, 0)
}

// readRecordSized is readRecord for a record whose size, header included, the caller
// knows: one read instead of two. A size of 0 is unknown.
func (w *wal) readRecordSized(pos walPos, size int64) (uint8, []byte, error) {
	if size < walRecordOverhead {
		var hdr [walRecordOverhead]byte
		if _, err := w.readFileAt(pos.seg, hdr[:], int64(pos.off)); err != nil {
			return 0, nil, err
		}
		size = walRecordOverhead + int64(binary.BigEndian.Uint32(hdr[:]))
		if size > w.segSize+walRecordOverhead+maxMessageSizeLimit {
			return 0, nil, errors.New("amqp: log record at " + w.segPath(pos.seg) + ":" + strconv.FormatUint(pos.off, 10) + " is too long")
		}
	}
	b := make([]byte, size)
	if _, err := w.readFileAt(pos.seg, b, int64(pos.off)); err != nil {
		return 0, nil, err
	}
	typ, payload, n, ok := parseRecord(b)
	if !ok || n != len(b) {
		return 0, nil, errors.New("amqp: corrupt log record at " + w.segPath(pos.seg) + ":" + strconv.FormatUint(pos.off, 10))
	}
	return typ, payload, nil
}

// readAt reads the log from pos into buf, as far as the segment's file goes; it returns
// how many octets it read. What it reads past the records written so far may be partial,
// which their CRCs tell.
func (w *wal) readAt(pos walPos, buf []byte) (int, error) {
	n, err := w.readFileAt(pos.seg, buf, int64(pos.off))
	if err == io.EOF {
		err = nil
	}
	return n, err
}

// segFile returns the read handle of segment seq, opening it the first time.
func (w *wal) segFile(seq uint64) (*os.File, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	i, ok := slices.BinarySearchFunc(w.segs, seq, func(s *segment, seq uint64) int { return cmp.Compare(s.seq, seq) })
	if !ok {
		return nil, errors.New("amqp: no log segment " + strconv.FormatUint(seq, 10))
	}
	s := w.segs[i]
	if s.rf == nil {
		if w.readFiles >= maxReadFiles {
			// A backlog spread over many segments must not run out of descriptors: close
			// the idlest handle (a read on it in flight retries with a new one).
			var idle *segment
			for _, o := range w.segs {
				if o.rf != nil && (idle == nil || o.used < idle.used) {
					idle = o
				}
			}
			idle.rf.Close()
			idle.rf = nil
			w.readFiles--
		}
		f, err := os.Open(w.segPath(s.seq))
		if err != nil {
			return nil, err
		}
		s.rf = f
		w.readFiles++
	}
	w.reads++
	s.used = w.reads
	return s.rf, nil
}

// maxReadFiles bounds the segments kept open for reading back.
const maxReadFiles = 64

// readFileAt reads from segment seq at off into b, with one retry should the handle be
// closed under it (segFile closes the idlest when too many are open).
func (w *wal) readFileAt(seq uint64, b []byte, off int64) (int, error) {
	for try := 0; ; try++ {
		f, err := w.segFile(seq)
		if err != nil {
			return 0, err
		}
		n, err := f.ReadAt(b, off)
		if errors.Is(err, os.ErrClosed) && try < 2 {
			continue
		}
		return n, err
	}
}

// run is the writer: one write and one fsync per batch, then the caller's hooks.
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
	var closing time.Time // when a gated log began to close with records not yet held
	for {
		select {
		case <-w.wake:
		case <-tick:
		case <-idle.C:
		}
		w.mu.Lock()
		chunks, ticket, closed, failed := w.pend, w.appended, w.closed, w.failed
		w.pend, w.pendSpare = w.pendSpare, nil
		w.pendBytes = 0
		w.pendAtomic.Store(0)
		w.mu.Unlock()

		err := failed
		if err == nil {
			// Never past a failed batch, and never on the file whose write or fsync failed.
			err = w.write(chunks)
		}
		tap := w.tap.Load()
		if len(chunks) > 0 {
			w.written = ticket
			if tap != nil && tap.written != nil {
				tap.written() // followers copy while this fsyncs
			}
		}
		if err == nil && w.fsyncedAtomic.Load() < w.written &&
			(w.interval == 0 || time.Since(w.lastSync) >= w.interval || closed) {
			if err = syncData(w.file); err == nil {
				w.fsyncedAtomic.Store(w.written)
			}
			w.lastSync = time.Now()
		}
		gated := tap != nil && tap.held != nil
		var held uint64
		if gated {
			held = tap.held()
		}

		w.mu.Lock()
		prev := w.done
		for i := range chunks {
			if cap(chunks[i].buf) <= walChunkSize && len(w.freeBufs) < 4 {
				w.freeBufs = append(w.freeBufs, chunks[i].buf[:0])
			}
			chunks[i] = walChunk{}
		}
		w.pendSpare = chunks[:0]
		if err == nil {
			w.wrote = w.written
		}
		if err != nil && w.failed == nil {
			w.failed = errWAL
			w.failedAtomic.Store(true)
			if isNoSpace(err) { // write gives up on a full disk only when the log closes
				w.log.Error("shutting down with log records unwritten: the disk is full", "err", err)
			} else {
				w.log.Error("write-ahead log failed; persistent publishes are refused until restart", "err", err)
			}
		}
		report := ticket
		if w.failed == nil {
			// Never past a failed batch: what it held is not on disk.
			done := ticket
			if gated {
				done = w.holdLocked(ticket, len(chunks) > 0 && err == nil, held)
				report = done
				if closed && done < ticket && closing.IsZero() {
					closing = time.Now()
				}
				if closed && done < ticket && time.Since(closing) >= walCloseGrace {
					w.failed = errUnreplicated
					w.failedAtomic.Store(true)
					w.log.Error("closing the log before followers acknowledged its last records: their publishes are not confirmed", "unconfirmed", ticket-done)
				}
			} else {
				w.gated = w.gated[:0]
			}
			w.done = done
			w.doneAtomic.Store(done)
		}
		w.synced.Broadcast()
		w.mu.Unlock()
		// Gated, a wake-up that neither wrote nor completed anything tells no one: a
		// listener would ask again at once, and spin.
		if w.onBatch != nil && (!gated || len(chunks) > 0 || report > prev || err != nil || w.failedAtomic.Load()) {
			w.onBatch(report)
		}
		if closed {
			if !gated || report >= ticket || w.failedAtomic.Load() {
				return
			}
			continue // followers have walCloseGrace to ack what is written
		}
		if err == nil && w.maintain != nil {
			w.maintain()
		}
	}
}

// holdLocked notes a batch written up to ticket (when wrote) and returns how far
// completion may go: the last batch whose records followers hold up to held. It runs on
// the writer; w.mu must be held.
func (w *wal) holdLocked(ticket uint64, wrote bool, held uint64) uint64 {
	if n := len(w.gated); wrote && ticket > w.done && (n == 0 || w.gated[n-1].ticket < ticket) {
		w.gated = append(w.gated, walGated{ticket, w.writtenTo.Load()})
	}
	done, i := w.done, 0
	for ; i < len(w.gated) && w.gated[i].pos <= held; i++ {
		done = w.gated[i].ticket
	}
	w.gated = w.gated[:copy(w.gated, w.gated[i:])]
	return done
}

// changed tells the tap, when there is one, that the file name (relative to the data
// directory, with '/') was replaced or removed.
func (w *wal) changed(name string) {
	if t := w.tap.Load(); t != nil && t.changed != nil {
		t.changed(name, w.writtenTo.Load())
	}
}

// write writes chunks in order, opening new segment files as the log rolls. When the
// disk is full it keeps them and tries again, maintaining in between, until they are
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
		w.writtenTo.Store(w.fileSeg.seq<<32 | uint64(w.fileOff))
	}
	return len(chunks), nil
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

// noSpaceRetry is how often a log whose disk is full tries to write again.
const noSpaceRetry = 100 * time.Millisecond

// waitForSpace marks the log out of space (waiters are told, and the caller refuses new
// messages), maintains, and waits a little; it reports false when the log is closing.
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
	if w.maintain != nil {
		w.maintain()
	}
	time.Sleep(noSpaceRetry)
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.closed
}

// close writes what is pending, syncs, stops the writer, and closes the files. The
// caller's last checkpoint comes after, with unlock.
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
	w.file.Close()
	w.mu.Lock()
	for _, s := range w.segs {
		if s.rf != nil {
			s.rf.Close()
			s.rf = nil
		}
	}
	w.readFiles = 0
	w.mu.Unlock()
}

// fail closes the log for good with err: nothing more completes, waiters get err.
func (w *wal) fail(err error) {
	w.mu.Lock()
	if w.failed == nil {
		w.failed = err
		w.failedAtomic.Store(true)
	}
	w.synced.Broadcast()
	w.mu.Unlock()
	w.kick()
}

// unlock releases the data directory; the log must be closed.
func (w *wal) unlock() { w.lock.Close() }

// writeCheckpoint replaces meta.snap with payload and the position it covers.
func (w *wal) writeCheckpoint(pos walPos, payload []byte) error {
	b := make([]byte, 0, walSnapHeader+len(payload))
	b = append(b, snapMagic[:]...)
	b = binary.BigEndian.AppendUint32(b, walVersion)
	b = append(b, 0, 0, 0, 0) // crc
	b = binary.BigEndian.AppendUint64(b, pos.seg)
	b = binary.BigEndian.AppendUint64(b, pos.off)
	b = append(b, payload...)
	binary.BigEndian.PutUint32(b[12:], crc32.Checksum(b[16:], crcTable))
	if err := writeFileAtomic(filepath.Join(w.dir, "meta.snap"), b); err != nil {
		return err
	}
	w.changed("meta.snap")
	return nil
}

// readCheckpoint loads meta.snap: the position it covers and its payload; ok is false
// when there is none.
func (w *wal) readCheckpoint() (pos walPos, payload []byte, ok bool, err error) {
	name := filepath.Join(w.dir, "meta.snap")
	b, err := os.ReadFile(name)
	if errors.Is(err, os.ErrNotExist) {
		return walPos{}, nil, false, nil
	}
	if err != nil {
		return walPos{}, nil, false, err
	}
	if len(b) < walSnapHeader || [8]byte(b[:8]) != snapMagic {
		return walPos{}, nil, false, errors.New("amqp: " + name + ": not a checkpoint")
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != walVersion {
		return walPos{}, nil, false, errors.New("amqp: " + name + ": checkpoint version " + strconv.Itoa(int(v)) + " is not supported")
	}
	if crc32.Checksum(b[16:], crcTable) != binary.BigEndian.Uint32(b[12:]) {
		return walPos{}, nil, false, errors.New("amqp: " + name + ": checkpoint fails its checksum")
	}
	pos = walPos{binary.BigEndian.Uint64(b[16:]), binary.BigEndian.Uint64(b[24:])}
	return pos, b[walSnapHeader:], true, nil
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

// syncFile fsyncs a file or a directory by name.
func syncFile(name string) error {
	if f := syncObserver.Load(); f != nil {
		(*f)(name)
	}
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// syncDir fsyncs a directory, so that the files created or removed in it stay so.
func syncDir(dir string) error { return syncFile(dir) }
