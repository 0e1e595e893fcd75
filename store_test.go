package amqp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The tests here and in wal_restart_test.go check the broker's use of the write-ahead log
// at two levels: the store alone (openStoreDir, logPublish, settle, close, reopen, and the
// files on disk), and the broker over amqp091-go across restarts; wal_test.go checks the
// log itself, with no broker types. A "crash image" is a copy of a running broker's data
// directory: every write the broker made is in it (the page cache survives a process
// crash) and nothing a clean shutdown adds (the last checkpoint), so starting a broker on
// it is starting after kill -9. crash_test.go does the same with a real SIGKILL.

// openTestWAL opens the log in dir and closes it when the test ends (close is idempotent).
func openTestWAL(t testing.TB, dir string, opts storeOptions) (*store, *testRecovered) {
	t.Helper()
	if opts.log == nil {
		opts.log = walQuietLogger()
	}
	w, rec, err := openStoreRetry(dir, opts)
	if err != nil {
		t.Fatalf("openWAL: %v", err)
	}
	t.Cleanup(w.close)
	return w, rec
}

// walTestQueue is the part of a durable queue the log looks at.
func walTestQueue(id uint64) *queue {
	return &queue{name: "q" + strconv.FormatUint(id, 10), durable: true, walID: id}
}

// walTestMessage builds a persistent message as publishComplete would: routing key,
// raw properties and body in one slice. The body names n, so every message differs.
func walTestMessage(n int, exchange, key string, bodyLen int) *message {
	p := properties{DeliveryMode: 2, MessageID: "m" + strconv.Itoa(n)}
	props := p.encode(nil)
	body := make([]byte, bodyLen)
	for i := range body {
		body[i] = byte(n + i)
	}
	if bodyLen >= 8 {
		binary.BigEndian.PutUint64(body, uint64(n))
	}
	data := append([]byte(key), props...)
	data = append(data, body...)
	return &message{exchange: exchange, keyLen: uint8(len(key)), propsLen: uint32(len(props)), data: data, size: uint32(bodyLen), persistent: true}
}

// logTestPublish writes m for these queues and fails the test if the log refuses it.
func logTestPublish(t testing.TB, w *store, m *message, qs ...*queue) uint64 {
	t.Helper()
	ticket, _, err := w.logPublish(m, qs, nil, nil)
	if err != nil {
		t.Fatalf("logPublish: %v", err)
	}
	return ticket
}

// sameMessage reports how a recovered message differs from the one logged, or "".
func sameMessage(got, want *message) string {
	switch {
	case got.wal == nil:
		return "no log place"
	case got.wal.id != want.wal.id:
		return fmt.Sprintf("id %d, want %d", got.wal.id, want.wal.id)
	case got.exchange != want.exchange:
		return fmt.Sprintf("exchange %q, want %q", got.exchange, want.exchange)
	case got.keyLen != want.keyLen || got.propsLen != want.propsLen:
		return fmt.Sprintf("keyLen/propsLen %d/%d, want %d/%d", got.keyLen, got.propsLen, want.keyLen, want.propsLen)
	case !bytes.Equal(got.data, want.data):
		return fmt.Sprintf("data differs (%d octets, want %d)", len(got.data), len(want.data))
	}
	return ""
}

// checkRecovered compares one queue's recovered messages with the expected ones, in order.
func checkRecovered(t testing.TB, rec *testRecovered, qid uint64, want []*message) {
	t.Helper()
	got := rec.messages[qid]
	if len(got) != len(want) {
		t.Errorf("queue %d: recovered %d messages %v, want %d %v", qid, len(got), walIDs(got), len(want), walIDs(want))
		return
	}
	for i := range want {
		if d := sameMessage(got[i], want[i]); d != "" {
			t.Errorf("queue %d message %d: %s", qid, i, d)
		}
	}
}

func walIDs(ms []*message) []uint64 {
	ids := make([]uint64, len(ms))
	for i, m := range ms {
		if m.wal != nil {
			ids[i] = m.wal.id
		}
	}
	return ids
}

// TestWALRoundTripEveryRecordType writes every record type, closes, reopens, and checks
// that replay returns the topology records in order with the same payloads, and each
// queue's live messages; acked messages and those of deleted queues are gone.
func TestWALRoundTripEveryRecordType(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, rec := openTestWAL(t, dir, storeOptions{segmentSize: 1 << 20})
	if len(rec.topology) != 0 || len(rec.messages) != 0 {
		t.Fatalf("fresh directory recovered %d records and %d queues", len(rec.topology), len(rec.messages))
	}

	var want []walRecord
	topo := func(typ uint8, payload []byte) {
		t.Helper()
		logTestTopology(t, w, typ, payload)
		want = append(want, walRecord{typ, payload})
	}
	x1 := newExchange("x1", kindDirect, true, false, false, table{"alternate-exchange": "ae", "n": int32(7)})
	x2 := newExchange("x2", kindTopic, true, true, true, nil)
	x3 := newExchange("x3", kindHeaders, true, false, false, table{"x-match": "any"})
	topo(recExchangeDeclare, exchangeRecord("/", x1))
	topo(recExchangeDeclare, exchangeRecord("/", x2))
	topo(recExchangeDeclare, exchangeRecord("/", x3))
	q1, q2, q3 := walTestQueue(w.newQueueID()), walTestQueue(w.newQueueID()), walTestQueue(w.newQueueID())
	q1.args = table{"x-max-length": int32(10), "x-queue-type": "classic"}
	for _, q := range []*queue{q1, q2, q3} {
		topo(recQueueDeclare, queueRecord("/", q))
	}
	topo(recBind, bindRecord("/", &binding{source: x1, queue: q1, key: "k1", args: table{"a": "b"}}))
	topo(recBind, bindRecord("/", &binding{source: x1, dest: x2, key: "#"}))
	topo(recBind, bindRecord("/", &binding{source: x3, queue: q2, args: table{"x-match": "all", "h": int64(1)}}))

	m1 := walTestMessage(1, "x1", "k1", 10)
	m2 := walTestMessage(2, "", "q2", 0)                         // empty body, to two queues
	m3 := walTestMessage(3, "x3", strings.Repeat("k", 255), 300) // longest key
	m4 := walTestMessage(4, "x1", "k1", 5)                       // acked
	m5 := walTestMessage(5, "x1", "k3", 7)                       // its queue is deleted
	m6 := walTestMessage(6, "x1", "k1", 200<<10)                 // larger than a frame
	logTestPublish(t, w, m1, q1)
	logTestPublish(t, w, m2, q1, q2)
	logTestPublish(t, w, m3, q2)
	logTestPublish(t, w, m4, q1)
	logTestPublish(t, w, m5, q3)
	logTestPublish(t, w, m6, q1, q3)
	// A transient queue in the route is not logged.
	m7 := walTestMessage(7, "x1", "k1", 3)
	logTestPublish(t, w, m7, q2, &queue{name: "transient"})
	w.settle(q1, []*message{m4, m2}) // m2 stays in q2

	topo(recUnbind, bindRecord("/", &binding{source: x1, queue: q1, key: "k1", args: table{"a": "b"}}))
	topo(recExchangeDelete, append(appendShortstr(nil, "/"), appendShortstr(nil, "x2")...))
	topo(recQueueDelete, binary.BigEndian.AppendUint64(nil, q3.walID))
	w.dropQueue(q3, []*message{m5, m6})
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	w.close()

	w, rec = openTestWAL(t, dir, storeOptions{segmentSize: 1 << 20})
	if len(rec.topology) != len(want) {
		t.Fatalf("recovered %d topology records, want %d", len(rec.topology), len(want))
	}
	for i, r := range rec.topology {
		if r.typ != want[i].typ || !bytes.Equal(r.payload, want[i].payload) {
			t.Errorf("topology record %d: type %d %q, want type %d %q", i, r.typ, r.payload, want[i].typ, want[i].payload)
		}
	}
	checkRecovered(t, rec, q1.walID, []*message{m1, m6})
	checkRecovered(t, rec, q2.walID, []*message{m2, m3, m7})
	if ms := rec.messages[q3.walID]; len(ms) != 0 {
		t.Errorf("deleted queue recovered messages %v", walIDs(ms))
	}
	if len(rec.messages) != 2 {
		t.Errorf("recovered messages for %d queues, want 2", len(rec.messages))
	}
	// Recovered messages know which queues still hold them.
	for _, m := range rec.messages[q1.walID] {
		if m.wal.id == m6.wal.id && (m.wal.refs != 1 || !slices.Equal(m.wal.queues, []uint64{q1.walID})) {
			t.Errorf("m6 recovered with refs %d queues %v, want 1 [%d]", m.wal.refs, m.wal.queues, q1.walID)
		}
	}

	// Ids are never reused after a restart.
	if id := w.newQueueID(); id <= q3.walID {
		t.Errorf("queue id %d after reopen, want > %d", id, q3.walID)
	}
	m8 := walTestMessage(8, "", "q1", 1)
	logTestPublish(t, w, m8, q1)
	if m8.wal.id <= m7.wal.id {
		t.Errorf("message id %d after reopen, want > %d", m8.wal.id, m7.wal.id)
	}
}

// TestWALReopenTwiceKeepsEverything reopens a log several times, adding and settling
// messages in each session; each replay sees exactly what the sessions before left.
func TestWALReopenTwiceKeepsEverything(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	q := walTestQueue(1)
	var live []*message
	for session := 0; session < 4; session++ {
		w, rec := openTestWAL(t, dir, storeOptions{segmentSize: 1 << 20})
		// Order aside (TestWALCompactionCopiesForwardInOrder): older segments are
		// compacted here, and copied messages come back out of order.
		got := slices.Clone(rec.messages[q.walID])
		slices.SortFunc(got, func(a, b *message) int { return int(a.wal.id) - int(b.wal.id) })
		checkRecovered(t, &testRecovered{messages: map[uint64][]*message{q.walID: got}}, q.walID, live)
		live = got
		for i := 0; i < 30; i++ {
			m := walTestMessage(session*100+i, "", "q1", 100)
			logTestPublish(t, w, m, q)
			live = append(live, m)
		}
		// Settle every third message, the recovered ones included.
		var acked []*message
		kept := live[:0:0]
		for i, m := range live {
			if i%3 == session%3 {
				acked = append(acked, m)
			} else {
				kept = append(kept, m)
			}
		}
		w.settle(q, acked)
		live = kept
		w.close()
	}
}

// walTornFixture writes publish records over several small segments and returns the
// directory and the messages in order. Every message stays live, so nothing is compacted.
func walTornFixture(t testing.TB, n int) (string, *queue, []*message) {
	t.Helper()
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, storeOptions{segmentSize: 1024})
	q := walTestQueue(1)
	var msgs []*message
	for i := 0; i < n; i++ {
		m := walTestMessage(i, "x", "key-"+strconv.Itoa(i), 20+i*7%90)
		logTestPublish(t, w, m, q)
		msgs = append(msgs, m)
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	w.close()
	if segs := segmentFiles(t, dir); len(segs) < 4 {
		t.Fatalf("fixture has %d segments, want at least 4", len(segs))
	}
	return dir, q, msgs
}

// messagesPerSegment counts the records of each segment file; with one publish record per
// message, in log order, it says which messages each segment holds.
func messagesPerSegment(t testing.TB, segs []string) []int {
	t.Helper()
	counts := make([]int, len(segs))
	for i, name := range segs {
		starts, _ := recordStarts(t, name)
		counts[i] = len(starts)
	}
	return counts
}

// TestWALTornWriteEveryOffset cuts the last record of the last segment at every offset
// inside it: replay recovers every complete record and nothing else, cuts the file back to
// the last complete record, and the log keeps working after it.
func TestWALTornWriteEveryOffset(t *testing.T) {
	t.Parallel()
	dir, q, msgs := walTornFixture(t, 40)
	segs := segmentFiles(t, dir)
	last := segs[len(segs)-1]
	starts, end := recordStarts(t, last)
	if len(starts) == 0 {
		t.Fatalf("last segment %s has no records", last)
	}
	lastStart := starts[len(starts)-1]
	complete := msgs[:len(msgs)-1]
	for cut := lastStart; cut < end; cut++ {
		img := copyDataDir(t, dir, func(name string, data []byte) []byte {
			if name == filepath.Base(last) {
				return data[:cut]
			}
			return data
		})
		w, rec, err := openStoreRetry(img, storeOptions{segmentSize: 1024, log: walQuietLogger()})
		if err != nil {
			t.Fatalf("cut at %d: openWAL: %v", cut, err)
		}
		checkRecovered(t, rec, q.walID, complete)
		// The log still works: a new message follows the complete ones.
		m := walTestMessage(1000, "x", "after", 10)
		if _, _, err := w.logPublish(m, []*queue{q}, nil, nil); err != nil {
			t.Fatalf("cut at %d: logPublish after recovery: %v", cut, err)
		}
		w.close()
		if fi, err := os.Stat(filepath.Join(img, "wal", filepath.Base(last))); err != nil {
			t.Fatal(err)
		} else if fi.Size() != int64(lastStart) {
			t.Fatalf("cut at %d: segment is %d octets, want cut back to %d", cut, fi.Size(), lastStart)
		}
		w, rec, err = openStoreRetry(img, storeOptions{segmentSize: 1024, log: walQuietLogger()})
		if err != nil {
			t.Fatalf("cut at %d: second openWAL: %v", cut, err)
		}
		checkRecovered(t, rec, q.walID, append(complete[:len(complete):len(complete)], m))
		w.close()
		if t.Failed() {
			t.Fatalf("cut at %d of the record at %d..%d failed", cut, lastStart, end)
		}
	}
}

// TestWALTornSegmentHeader covers a crash while a new segment was being created: the last
// segment is empty, has a partial header, or only the header. Replay recovers every
// earlier record, and so does every later restart.
func TestWALTornSegmentHeader(t *testing.T) {
	t.Parallel()
	dir, q, msgs := walTornFixture(t, 40)
	segs := segmentFiles(t, dir)
	counts := messagesPerSegment(t, segs)
	lastName := filepath.Base(segs[len(segs)-1])
	before := msgs[:len(msgs)-counts[len(counts)-1]]
	for _, size := range []int{0, 7, walHeaderSize} {
		t.Run("size="+strconv.Itoa(size), func(t *testing.T) {
			t.Parallel()
			img := copyDataDir(t, dir, func(name string, data []byte) []byte {
				if name == lastName {
					return data[:size]
				}
				return data
			})
			w, rec, err := openStoreRetry(img, storeOptions{segmentSize: 1024, log: walQuietLogger()})
			if err != nil {
				t.Fatalf("openWAL: %v", err)
			}
			checkRecovered(t, rec, q.walID, before)
			w.close()

			// The next start must work too: the short file is no longer the last one.
			w, rec, err = openStoreRetry(img, storeOptions{segmentSize: 1024, log: walQuietLogger()})
			if err == nil {
				defer w.close()
			}
			if err != nil {
				t.Fatalf("second openWAL: %v", err)
			}
			checkRecovered(t, rec, q.walID, before)
		})
	}
}

// TestWALFlippedBit flips single bits inside a record of a segment that is not the last:
// startup fails naming the file and the record's offset; with repair it starts, logs what
// it skipped, and recovers the records before the damage and the later segments. A
// flipped bit in the last record of the last segment is a torn tail.
func TestWALFlippedBit(t *testing.T) {
	t.Parallel()
	dir, q, msgs := walTornFixture(t, 40)
	segs := segmentFiles(t, dir)
	counts := messagesPerSegment(t, segs)

	for _, segIdx := range []int{0, 1, len(segs) - 2} {
		name := segs[segIdx]
		starts, end := recordStarts(t, name)
		recIdx := len(starts) / 2
		recStart := starts[recIdx]
		recEnd := end
		if recIdx+1 < len(starts) {
			recEnd = starts[recIdx+1]
		}
		first := 0 // index in msgs of the segment's first record
		for _, c := range counts[:segIdx] {
			first += c
		}
		// With repair, the damaged record and the rest of its segment are lost.
		var want []*message
		want = append(want, msgs[:first+recIdx]...)
		want = append(want, msgs[first+counts[segIdx]:]...)
		for _, bit := range []struct {
			what string
			off  int // from the record's start
			mask byte
		}{
			{"len high bit", 0, 0x80},
			{"len low bit", 3, 0x01},
			{"crc", 5, 0x10},
			{"type", 8, 0x02},
			{"payload first octet", 9, 0x01},
			{"payload last octet", recEnd - recStart - 1, 0x40},
		} {
			t.Run(fmt.Sprintf("seg%d/%s", segIdx, bit.what), func(t *testing.T) {
				t.Parallel()
				edit := func(n string, data []byte) []byte {
					if n == filepath.Base(name) {
						data[recStart+bit.off] ^= bit.mask
					}
					return data
				}
				img := copyDataDir(t, dir, edit)
				_, _, err := openStoreRetry(img, storeOptions{segmentSize: 1024, log: walQuietLogger()})
				if err == nil {
					t.Fatal("openWAL succeeded on a corrupt segment that is not the last")
				}
				bad := filepath.Join(img, "wal", filepath.Base(name))
				if msg := err.Error(); !strings.Contains(msg, bad) || !strings.Contains(msg, "offset "+strconv.Itoa(recStart)) {
					t.Errorf("error %q does not name %s and offset %d", msg, bad, recStart)
				}
				// The failed start left nothing behind that stops a repair.
				var logs lockedBuffer
				w, rec, err := openStoreRetry(img, storeOptions{segmentSize: 1024, repair: true, log: logs.logger()})
				if err != nil {
					t.Fatalf("openWAL with repair: %v", err)
				}
				defer w.close()
				checkRecovered(t, rec, q.walID, want)
				if out := logs.String(); !strings.Contains(out, "repair") || !strings.Contains(out, bad) || !strings.Contains(out, "offset="+strconv.Itoa(recStart)) {
					t.Errorf("repair logged %q; want the file and offset it skipped", out)
				}
			})
		}
	}

	t.Run("last record of last segment", func(t *testing.T) {
		t.Parallel()
		last := segs[len(segs)-1]
		starts, end := recordStarts(t, last)
		lastStart := starts[len(starts)-1]
		for off := lastStart; off < end; off += 7 {
			img := copyDataDir(t, dir, func(n string, data []byte) []byte {
				if n == filepath.Base(last) {
					data[off] ^= 0x08
				}
				return data
			})
			var logs lockedBuffer
			w, rec, err := openStoreRetry(img, storeOptions{segmentSize: 1024, log: logs.logger()})
			if err != nil {
				t.Fatalf("flip at %d: openWAL: %v", off, err)
			}
			checkRecovered(t, rec, q.walID, msgs[:len(msgs)-1])
			w.close()
			if fi, err := os.Stat(filepath.Join(img, "wal", filepath.Base(last))); err != nil {
				t.Fatal(err)
			} else if fi.Size() != int64(lastStart) {
				t.Fatalf("flip at %d: segment is %d octets, want cut back to %d", off, fi.Size(), lastStart)
			}
			if !strings.Contains(logs.String(), "torn") {
				t.Errorf("flip at %d: no warning about the cut: %q", off, logs.String())
			}
		}
	})

	t.Run("bad segment header", func(t *testing.T) {
		t.Parallel()
		name := segs[1]
		img := copyDataDir(t, dir, func(n string, data []byte) []byte {
			if n == filepath.Base(name) {
				data[2] ^= 1
			}
			return data
		})
		_, _, err := openStoreRetry(img, storeOptions{segmentSize: 1024, repair: true, log: walQuietLogger()})
		if err == nil || !strings.Contains(err.Error(), filepath.Base(name)) {
			t.Fatalf("openWAL = %v, want an error naming %s", err, filepath.Base(name))
		}
	})
}

// TestWALCompactionCopiesForwardInOrder pins the oldest segment with one old message while
// the rest of it dies: compaction copies the message forward and deletes the segment, and
// replay still returns the queue in publish order.
func TestWALCompactionCopiesForwardInOrder(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, storeOptions{segmentSize: 2048})
	q1, q2 := walTestQueue(1), walTestQueue(2)

	pinned := walTestMessage(0, "", "q1", 10)
	logTestPublish(t, w, pinned, q1)
	var filler []*message
	for i := 0; i < 40; i++ { // several segments of filler for q2
		m := walTestMessage(100+i, "", "q2", 200)
		logTestPublish(t, w, m, q2)
		filler = append(filler, m)
	}
	// Later messages for q1 that fill whole segments: those segments stay (all live).
	var later []*message
	for i := 0; i < 6; i++ {
		m := walTestMessage(1+i, "", "q1", 900)
		logTestPublish(t, w, m, q1)
		later = append(later, m)
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	pinnedSeg := uint64(pinned.wal.seg)
	w.mu.Unlock()
	w.settle(q2, filler)

	deadline := time.Now().Add(walWait)
	for {
		first, _, _ := w.w.oldest()
		oldest := first.seq
		w.mu.Lock()
		moved := uint64(pinned.wal.seg)
		w.mu.Unlock()
		_, err := os.Stat(w.w.segPath(pinnedSeg))
		if oldest > pinnedSeg && moved > pinnedSeg && errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("oldest segment %d, pinned message in %d, segment file: %v; want both past %d and the file gone", oldest, moved, err, pinnedSeg)
		}
		time.Sleep(5 * time.Millisecond)
	}
	w.close()

	_, rec := openTestWAL(t, dir, storeOptions{segmentSize: 2048})
	if n := len(rec.messages[q2.walID]); n != 0 {
		t.Errorf("q2 recovered %d settled messages", n)
	}
	got := rec.messages[q1.walID]
	wantAll := append([]*message{pinned}, later...)
	gotIDs, wantIDs := walIDs(got), walIDs(wantAll)
	slices.Sort(gotIDs)
	if !slices.Equal(gotIDs, wantIDs) {
		t.Fatalf("q1 recovered ids %v, want each of %v once", walIDs(got), wantIDs)
	}
	checkRecovered(t, rec, q1.walID, wantAll)
}

// TestWALCheckpointPastLastFile covers a checkpoint taken while the head segment existed
// only in memory (appenders rolled the log, the writer had not created the file yet) and
// a crash right after: the next start must not treat records it writes in a new segment of
// that number as covered by the checkpoint.
func TestWALCheckpointPastLastFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, storeOptions{segmentSize: 1024})
	x := newExchange("before", kindFanout, true, false, false, nil)
	logTestTopology(t, w, recExchangeDeclare, exchangeRecord("/", x))
	snapTopo := appendSnapRecord(nil, recExchangeDeclare, exchangeRecord("/", x))
	// Roll the head in memory with records the writer has not seen (no kick).
	lw := w.w
	lw.mu.Lock()
	head := lw.segs[len(lw.segs)-1].seq
	for lw.segs[len(lw.segs)-1].seq == head {
		if _, _, err := lw.appendLocked(recPublish, publishRecordFor(walTestMessage(1, "", "q", 300), 1, 7), -1); err != nil {
			lw.mu.Unlock()
			t.Fatal(err)
		}
	}
	lw.mu.Unlock()
	w.snapshotFn = func(at func()) []byte { at(); return snapTopo }
	if err := w.checkpoint(); err != nil {
		t.Fatal(err)
	}
	// Crash now: the image has meta.snap but not the rolled segment.
	img := copyDataDir(t, dir, nil)
	if _, err := os.Stat(filepath.Join(img, "wal", filepath.Base(w.w.segPath(head+1)))); err == nil {
		t.Skip("the writer created the rolled segment before the crash image; nothing to test")
	}
	w.close()

	w2, rec := openTestWAL(t, img, storeOptions{segmentSize: 1024})
	if len(rec.topology) != 1 {
		t.Fatalf("recovered %d topology records, want the checkpoint's 1", len(rec.topology))
	}
	y := newExchange("after", kindFanout, true, false, false, nil)
	logTestTopology(t, w2, recExchangeDeclare, exchangeRecord("/", y))
	// Crash again, before any checkpoint.
	img2 := copyDataDir(t, img, nil)
	w2.close()
	_, rec2 := openTestWAL(t, img2, storeOptions{segmentSize: 1024})
	if len(rec2.topology) != 2 {
		t.Fatalf("recovered %d topology records after the second crash, want 2 (the checkpoint's and 'after')", len(rec2.topology))
	}
	if r := rec2.topology[1]; r.typ != recExchangeDeclare || !bytes.Equal(r.payload, exchangeRecord("/", y)) {
		t.Errorf("second record is type %d %q, want the declare of 'after'", r.typ, r.payload)
	}
}

// publishRecordFor encodes m as a publish record with this id for one queue, without
// touching the log's bookkeeping.
func publishRecordFor(m *message, id, qid uint64) []byte {
	saved := m.wal
	m.wal = &msgWAL{id: id}
	b := m.appendPublishRecord(nil, []uint64{qid})
	m.wal = saved
	return b
}

// TestDataDirPermissions: message bodies are stored in clear, so the data directory and
// its files are the broker user's alone; an existing directory open to others is tightened
// at start, with a log line, and checkpoint files a crash left half written are removed.
func TestDataDirPermissions(t *testing.T) {
	t.Parallel()
	if runtime.GOOS == "windows" {
		t.Skip("Unix permissions")
	}
	perm := func(name string) os.FileMode {
		fi, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode().Perm()
	}
	dir := filepath.Join(t.TempDir(), "data")
	w, _ := openTestWAL(t, dir, storeOptions{})
	kept := walTestMessage(1, "", "q", 10)
	logTestPublish(t, w, kept, walTestQueue(1))
	if err := w.checkpoint(); err != nil {
		t.Fatal(err)
	}
	w.close()
	files := append(segmentFiles(t, dir), filepath.Join(dir, "LOCK"), filepath.Join(dir, "meta.snap"))
	for _, d := range []string{dir, filepath.Join(dir, "wal")} {
		if p := perm(d); p != 0o700 {
			t.Errorf("%s created with mode %v, want 0700", d, p)
		}
	}
	for _, f := range files {
		if p := perm(f); p != 0o600 {
			t.Errorf("%s created with mode %v, want 0600", f, p)
		}
	}

	// An older broker's directory: open to everyone, and a stale checkpoint temporary.
	for _, d := range []string{dir, filepath.Join(dir, "wal")} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range files {
		if err := os.Chmod(f, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stale := filepath.Join(dir, ".meta.snap.tmp-12345")
	if err := os.WriteFile(stale, []byte("half"), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs lockedBuffer
	w, rec := openTestWAL(t, dir, storeOptions{log: logs.logger()})
	checkRecovered(t, rec, 1, []*message{kept})
	w.close()
	for _, d := range []string{dir, filepath.Join(dir, "wal")} {
		if p := perm(d); p != 0o700 {
			t.Errorf("existing %s left with mode %v, want 0700", d, p)
		}
	}
	for _, f := range files {
		if p := perm(f); p != 0o600 {
			t.Errorf("existing %s left with mode %v, want 0600", f, p)
		}
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale checkpoint temporary: %v, want it removed", err)
	}
	if out := logs.String(); !strings.Contains(out, "restricting it to the broker's user") || !strings.Contains(out, "restricted them to the broker's user") {
		t.Errorf("no log line about tightened permissions in:\n%s", out)
	}
}

// TestWALSyncsWhatItReliesOn: new directories, segments replayed from a possibly unsynced
// page cache, a torn tail cut off, and segments removed by compaction reach the disk
// before anything depends on them. Not parallel: it watches every fsync of the package.
func TestWALSyncsWhatItReliesOn(t *testing.T) {
	var mu sync.Mutex
	synced := map[string]int{}
	observe := func(name string) {
		mu.Lock()
		synced[filepath.Clean(name)]++
		mu.Unlock()
	}
	syncObserver.Store(&observe)
	defer syncObserver.Store(nil)
	count := func(name string) int {
		mu.Lock()
		defer mu.Unlock()
		return synced[filepath.Clean(name)]
	}
	reset := func() {
		mu.Lock()
		clear(synced)
		mu.Unlock()
	}

	parent := t.TempDir()
	dir := filepath.Join(parent, "data")
	walDir := filepath.Join(dir, "wal")
	w, _ := openTestWAL(t, dir, storeOptions{segmentSize: 2048})
	if count(parent) == 0 || count(dir) == 0 {
		t.Errorf("creating %s and %s synced their parents %d and %d times, want both", dir, walDir, count(parent), count(dir))
	}
	q := walTestQueue(1)
	var msgs []*message
	for i := range 30 {
		m := walTestMessage(i, "", "q", 200)
		logTestPublish(t, w, m, q)
		msgs = append(msgs, m)
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	// Compaction removes the dead segments, and syncs the directory after.
	reset()
	first := segmentFiles(t, dir)[0]
	w.settle(q, msgs[:20])
	deadline := time.Now().Add(walWait)
	for _, err := os.Stat(first); !errors.Is(err, os.ErrNotExist) || count(walDir) == 0; _, err = os.Stat(first) {
		if time.Now().After(deadline) {
			t.Fatalf("segment %s: %v, log directory synced %d times; want it removed and the directory synced", first, err, count(walDir))
		}
		time.Sleep(5 * time.Millisecond)
	}
	w.close()

	// A torn tail: the last segment ends in half a record.
	segs := segmentFiles(t, dir)
	last := segs[len(segs)-1]
	f, err := os.OpenFile(last, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte{0, 0, 1, 0, 9, 9})
	f.Close()
	reset()
	w, _ = openTestWAL(t, dir, storeOptions{segmentSize: 2048})
	w.close()
	for _, s := range segs {
		if count(s) == 0 {
			t.Errorf("replayed segment %s was not synced", s)
		}
	}
	if count(last) < 2 || count(walDir) == 0 {
		t.Errorf("cutting the torn tail of %s synced it %d times and the directory %d times, want after the cut too", last, count(last), count(walDir))
	}
}

// TestReplayKeepsTopologyAcrossSegments: topology records replayed from an early segment
// survive the reading of the later ones (replay reuses its read buffer).
func TestReplayKeepsTopologyAcrossSegments(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, storeOptions{segmentSize: 2048})
	q := walTestQueue(1)
	decl := queueRecord("/", q)
	logTestTopology(t, w, recQueueDeclare, decl)
	for i := range 40 {
		logTestPublish(t, w, walTestMessage(i, "", "q1", 300), q)
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	w.close() // no snapshot function: no checkpoint, the log alone holds the topology
	if n := len(segmentFiles(t, dir)); n < 4 {
		t.Fatalf("%d segments, want several", n)
	}
	// Replay from the segments themselves, through its one reused buffer: an index would
	// give each segment a fresh one.
	idx, _ := filepath.Glob(filepath.Join(dir, "wal", "*.idx"))
	for _, f := range idx {
		os.Remove(f)
	}
	_, rec := openTestWAL(t, dir, storeOptions{segmentSize: 2048})
	if len(rec.topology) != 1 || rec.topology[0].typ != recQueueDeclare || !bytes.Equal(rec.topology[0].payload, decl) {
		t.Fatalf("recovered topology %v, want the queue.declare as logged", rec.topology)
	}
	if n := len(rec.messages[q.walID]); n != 40 {
		t.Fatalf("recovered %d messages, want 40", n)
	}
}

// TestWALReplayUnionOfCopies: a message routed to four queues that hold it in different
// ways (in memory, paged, settled before or after compaction's copies) is copied forward
// once per paged hold and once for the holds in memory, each copy naming only its own
// queues; replay with the original and the copies all in the log (a crash before the old
// segment goes) gives each queue each of its messages exactly once, in order, whatever
// records name it, and none it settled.
func TestWALReplayUnionOfCopies(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, storeOptions{segmentSize: 1 << 20})
	q1, q2, q3, q4 := walTestQueue(1), walTestQueue(2), walTestQueue(3), walTestQueue(4)
	var msgs []*message
	for i := range 6 {
		m := walTestMessage(i, "fan", "", 200)
		logTestPublish(t, w, m, q1, q2, q3, q4)
		msgs = append(msgs, m)
	}
	// q2 and q4 page every message; q1 and q3 hold them in memory. q3 settles the first
	// before any copy is made.
	refs := make(map[*queue][]diskRef)
	for _, q := range []*queue{q2, q4} {
		q.tail, q.tailSeq = &refQueue{}, 1
		for _, m := range msgs {
			r := w.pageOut(q, m)
			q.tail.push(r)
			refs[q] = append(refs[q], r)
		}
	}
	w.settle(q3, msgs[:1])
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	seq := uint64(msgs[0].wal.seg)
	old := w.segs[seq]
	w.mu.Unlock()
	// Copy forward twice (copies of copies), then settle more: q1 a message in memory,
	// q2 a paged one.
	for range 2 {
		w.relocate(seq, old)
		if err := w.sync(); err != nil {
			t.Fatal(err)
		}
		w.mu.Lock()
		seq = uint64(msgs[0].wal.seg)
		old = w.segs[seq]
		w.mu.Unlock()
	}
	if got := q2.tail.front().file; got == refs[q2][0].file && q2.tail.front().off == refs[q2][0].off {
		t.Fatal("compaction did not copy the paged messages forward")
	}
	w.settle(q1, msgs[1:2])
	q2.mu.Lock()
	w.settleRefs(q2, []diskRef{q2.tail.at(2)})
	q2.mu.Unlock()
	w.close()

	_, rec := openTestWAL(t, dir, storeOptions{segmentSize: 1 << 20})
	without := func(skip int) []*message {
		return slices.Concat(msgs[:skip], msgs[skip+1:])
	}
	checkRecovered(t, rec, q1.walID, without(1))
	checkRecovered(t, rec, q2.walID, without(2))
	checkRecovered(t, rec, q3.walID, without(0))
	checkRecovered(t, rec, q4.walID, msgs)
}

// TestCopyRecordKeepsPublishTime: compaction's copy of a record with a publish time (a
// publish-at or a dead-letter record) keeps that time and names only the new queues; a
// copy of an untimed publish stays untimed.
func TestCopyRecordKeepsPublishTime(t *testing.T) {
	m := walTestMessage(3, "x", "k", 20)
	m.wal = &msgWAL{id: 42}
	pub := m.appendPublishRecord(nil, []uint64{1, 2})
	at := binary.BigEndian.AppendUint64(nil, 1_700_000_000_123)
	dead := append(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, 5), 41), at...)
	for _, c := range []struct {
		typ     uint8
		payload []byte
		timed   bool
	}{{recPublish, pub, false}, {recPublishAt, append(slices.Clone(at), pub...), true}, {recDeadLetter, append(slices.Clone(dead), pub...), true}} {
		typ, b := copyRecord(nil, c.typ, c.payload, []uint64{9})
		when, timed := publishTime(typ, b)
		if timed != c.timed || timed && when != 1_700_000_000_123 {
			t.Errorf("copy of type %d: type %d, time %d %v; want the time kept: %v", c.typ, typ, when, timed, c.timed)
		}
		p, ok := publishPart(typ, b)
		sp, ok2 := splitPublishRecord(p, len(p))
		if !ok || !ok2 || sp.id != 42 || sp.n != 1 || binary.BigEndian.Uint64(sp.qids) != 9 {
			t.Errorf("copy of type %d: id %d, %d queues, want message 42 for queue 9 alone", c.typ, sp.id, sp.n)
		}
		if keep := recordKeep(typ, b); keep != len(b)-20 {
			t.Errorf("copy of type %d: index keeps %d octets, want all but the 20-octet body (%d)", c.typ, keep, len(b)-20)
		}
	}
}
