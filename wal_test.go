package amqp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The write-ahead log alone: records in, records back, with no broker types.

// openLog opens and starts a log in dir, replaying what it holds into the returned list.
func openLog(t testing.TB, dir string, segSize int64) (*wal, []logRec) {
	t.Helper()
	w, err := openWAL(dir, walOptions{segmentSize: segSize, log: walQuietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	var recs []logRec
	err = w.replay(false, func(pos walPos, typ uint8, payload []byte, size int64) error {
		recs = append(recs, logRec{pos, typ, bytes.Clone(payload)})
		return nil
	})
	if err == nil {
		err = w.start(0)
	}
	if err != nil {
		w.unlock()
		t.Fatal(err)
	}
	t.Cleanup(func() { w.close(); w.unlock() })
	return w, recs
}

// logRec is a record as replay or append saw it.
type logRec struct {
	pos     walPos
	typ     uint8
	payload []byte
}

// logPayload is the n-th test record's payload: its number, then filler of its own.
func logPayload(n, size int) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(n))
	for len(b) < size {
		b = append(b, byte(n+len(b)))
	}
	return b
}

// TestLogAppendReadBackReplay: records appended by several goroutines get distinct
// positions in order, are read back at their positions by other goroutines while the
// writer appends more, and come back from replay, in position order, after a reopen.
func TestLogAppendReadBackReplay(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, recs := openLog(t, dir, 8<<10) // small segments: the log rolls many times
	if len(recs) != 0 {
		t.Fatalf("a new log replayed %d records", len(recs))
	}
	const writers, each = 4, 300
	var mu sync.Mutex
	var appended []logRec
	written := make(chan logRec, writers*each)
	var wg sync.WaitGroup
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				n := g*each + i
				p := logPayload(n, 20+n%200)
				ticket, pos, err := w.append(uint8(1+n%250), p)
				if err != nil {
					t.Error(err)
					return
				}
				r := logRec{pos, uint8(1 + n%250), p}
				mu.Lock()
				appended = append(appended, r)
				mu.Unlock()
				if n%7 == 0 {
					if err := w.wait(ticket); err != nil {
						t.Error(err)
						return
					}
					written <- r
				}
			}
		}()
	}
	// Readers check what is written while the writers go on.
	readErr := make(chan error, 2)
	var rg sync.WaitGroup
	for range 2 {
		rg.Add(1)
		go func() {
			defer rg.Done()
			for r := range written {
				typ, p, err := w.readRecord(r.pos)
				if err != nil || typ != r.typ || !bytes.Equal(p, r.payload) {
					readErr <- errors.New("record at " + strconv.FormatUint(r.pos.seg, 10) + ":" + strconv.FormatUint(r.pos.off, 10) + " read back wrong")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(written)
	rg.Wait()
	select {
	case err := <-readErr:
		t.Fatal(err)
	default:
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	if _, n, _ := w.oldest(); n < 10 {
		t.Fatalf("%d segments, want the log to have rolled", n)
	}
	seen := map[walPos]bool{}
	for _, r := range appended {
		if seen[r.pos] {
			t.Fatalf("two records at %v", r.pos)
		}
		seen[r.pos] = true
	}
	w.close()
	w.unlock()

	_, recs = openLog(t, dir, 8<<10)
	if len(recs) != len(appended) {
		t.Fatalf("replayed %d records, want %d", len(recs), len(appended))
	}
	byPos := map[walPos]logRec{}
	for _, r := range appended {
		byPos[r.pos] = r
	}
	for i, r := range recs {
		if i > 0 && !recs[i-1].pos.less(r.pos) {
			t.Fatalf("replay out of order: %v then %v", recs[i-1].pos, r.pos)
		}
		a, ok := byPos[r.pos]
		if !ok || a.typ != r.typ || !bytes.Equal(a.payload, r.payload) {
			t.Fatalf("replayed record at %v differs from the one appended there", r.pos)
		}
	}
}

// TestLogTornTailAndCorruption: a record cut short at the end of the last segment is cut
// off (the file shrinks to the records before it); a flipped bit in an earlier segment
// stops the replay with the file and offset, unless repair, which skips the rest of it.
func TestLogTornTailAndCorruption(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, _ := openLog(t, dir, 4<<10)
	var last walPos
	for n := range 60 {
		_, pos, err := w.append(1, logPayload(n, 300))
		if err != nil {
			t.Fatal(err)
		}
		last = pos
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	w.close()
	w.unlock()
	segs := segmentFiles(t, dir)
	lastFile := w.segPath(last.seg)
	// The head the log opened at start is empty; tear the record before it.
	for _, f := range segs {
		if fi, _ := os.Stat(f); f > lastFile && fi.Size() == walHeaderSize {
			os.Remove(f)
		}
	}
	if err := os.Truncate(lastFile, int64(last.off)+100); err != nil {
		t.Fatal(err)
	}
	w1, recs := openLog(t, dir, 4<<10)
	w1.close()
	w1.unlock()
	if len(recs) != 59 {
		t.Fatalf("replayed %d records after a torn tail, want 59", len(recs))
	}
	if fi, _ := os.Stat(lastFile); fi.Size() != int64(last.off) {
		t.Fatalf("torn segment is %d octets, want it cut to %d", fi.Size(), last.off)
	}

	// A flipped bit in the first segment. Replay would read it from its index alone
	// (bodies are checked as they are read back); without one it reads the segment.
	first := segmentFiles(t, dir)[0]
	b, _ := os.ReadFile(first)
	b[walHeaderSize+walRecordOverhead+5] ^= 1
	os.WriteFile(first, b, 0o600)
	if err := os.Remove(w.indexPath(1)); err != nil {
		t.Fatalf("the first segment has no index: %v", err)
	}
	w2, err := openWAL(dir, walOptions{segmentSize: 4 << 10, log: walQuietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	err = w2.replay(false, func(walPos, uint8, []byte, int64) error { return nil })
	if err == nil || !strings.Contains(err.Error(), filepath.Base(first)) || !strings.Contains(err.Error(), "offset 16") {
		t.Fatalf("replay of a corrupt segment: %v, want an error naming %s and offset 16", err, filepath.Base(first))
	}
	w2.unlock()
	w3, err := openWAL(dir, walOptions{segmentSize: 4 << 10, log: walQuietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer w3.unlock()
	n := 0
	if err := w3.replay(true, func(walPos, uint8, []byte, int64) error { n++; return nil }); err != nil {
		t.Fatalf("repair: %v", err)
	}
	if n == 0 || n >= 59 {
		t.Fatalf("repair replayed %d records, want those outside the corrupt segment", n)
	}
}

// TestLogRemoveSegment: a segment the caller no longer needs is removed, its file gone and
// its records no longer readable; the head cannot be removed.
func TestLogRemoveSegment(t *testing.T) {
	t.Parallel()
	w, _ := openLog(t, t.TempDir(), 2<<10)
	var first walPos
	for n := range 20 {
		_, pos, err := w.append(1, logPayload(n, 500))
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			first = pos
		}
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.readRecord(first); err != nil {
		t.Fatal(err)
	}
	if err := w.removeSegment(first.seg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(w.segPath(first.seg)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("removed segment file: %v", err)
	}
	if _, _, err := w.readRecord(first); err == nil {
		t.Fatal("a record of a removed segment was read back")
	}
	if err := w.removeSegment(w.head().seg); err == nil {
		t.Fatal("the head segment was removed")
	}
}

// TestLogCheckpoint: the checkpoint keeps its position and payload; a corrupt one is an
// error, not an empty log.
func TestLogCheckpoint(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, _ := openLog(t, dir, 0)
	if _, _, ok, err := w.readCheckpoint(); ok || err != nil {
		t.Fatalf("a new log has a checkpoint: %v %v", ok, err)
	}
	pos := walPos{3, 1234}
	if err := w.writeCheckpoint(pos, []byte("state")); err != nil {
		t.Fatal(err)
	}
	got, payload, ok, err := w.readCheckpoint()
	if err != nil || !ok || got != pos || string(payload) != "state" {
		t.Fatalf("checkpoint read back as %v %q %v %v", got, payload, ok, err)
	}
	name := filepath.Join(dir, "meta.snap")
	b, _ := os.ReadFile(name)
	b[len(b)-1] ^= 1
	os.WriteFile(name, b, 0o600)
	if _, _, _, err := w.readCheckpoint(); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("corrupt checkpoint: %v, want a checksum error", err)
	}
}

// TestLogWaitAfterClose: a ticket appended while the log closes is written by the close,
// and waiting for it once the log is closed returns at once; a closed log takes nothing.
func TestLogWaitAfterClose(t *testing.T) {
	t.Parallel()
	w, err := openWAL(t.TempDir(), walOptions{log: walQuietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.replay(false, func(walPos, uint8, []byte, int64) error { return nil }); err != nil {
		t.Fatal(err)
	}
	entered, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	w.onBatch = func(uint64) { once.Do(func() { close(entered); <-gate }) }
	if err := w.start(0); err != nil {
		t.Fatal(err)
	}
	defer w.unlock()
	if _, _, err := w.append(1, []byte("first")); err != nil {
		t.Fatal(err)
	}
	<-entered // the writer is held after its first batch
	ticket, _, err := w.append(1, []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() { w.close(); close(closed) }()
	pollFor(t, "the log to be closing", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.closed
	})
	close(gate)
	<-closed
	done := make(chan error, 1)
	go func() { done <- w.wait(ticket) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("wait for a ticket the close wrote: %v", err)
		}
	case <-time.After(walWait):
		t.Fatal("wait did not return on a closed log")
	}
	if _, _, err := w.append(1, []byte("y")); err == nil {
		t.Fatal("a closed log took a record")
	}
}

// TestLogReadBackManySegments: reading back records spread over more segments than the
// log keeps open for reading, from two goroutines in any order, gets every one right and
// holds at most maxReadFiles descriptors.
func TestLogReadBackManySegments(t *testing.T) {
	t.Parallel()
	w, _ := openLog(t, t.TempDir(), 1024)
	var recs []logRec
	for n := range 3 * maxReadFiles * 2 {
		p := logPayload(n, 600)
		_, pos, err := w.append(1, p)
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, logRec{pos, 1, p})
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range recs {
				r := recs[(i*7+g*13)%len(recs)]
				if _, p, err := w.readRecord(r.pos); err != nil || !bytes.Equal(p, r.payload) {
					errs <- errors.New("record at " + strconv.FormatUint(r.pos.seg, 10) + " read back wrong")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	open := 0
	for _, s := range w.segs {
		if s.rf != nil {
			open++
		}
	}
	w.mu.Unlock()
	if _, n, _ := w.oldest(); open > maxReadFiles || n < 2*maxReadFiles {
		t.Fatalf("%d read handles open over %d segments, want at most %d", open, n, maxReadFiles)
	}
}

// TestLogIndexReplay: a full segment gets an index, and replay from it gives every record's
// position, type and size with the kept part of its payload; an index that is corrupt,
// cut short, made for another segment size, or missing is ignored and the segment read.
func TestLogIndexReplay(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	w, _ := openLog(t, dir, 4<<10)
	type rec struct {
		typ     uint8
		payload []byte
		size    int64
	}
	want := map[walPos]rec{}
	full := map[walPos][]byte{} // what a segment read gives: the whole payload
	for n := range 80 {
		p, keep := logPayload(n, 200+n), n%7*10
		_, pos, err := w.appendKeep(uint8(1+n%3), p, keep)
		if err != nil {
			t.Fatal(err)
		}
		want[pos] = rec{uint8(1 + n%3), p[:keep], int64(walRecordOverhead + len(p))}
		full[pos] = p
	}
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	w.close()
	w.unlock()
	segs := segmentFiles(t, dir)
	indexed := 0
	for _, f := range segs[:len(segs)-1] {
		if _, err := os.Stat(strings.TrimSuffix(f, ".seg") + ".idx"); err == nil {
			indexed++
		}
	}
	if indexed < len(segs)-2 {
		t.Fatalf("%d of %d full segments have an index", indexed, len(segs)-2)
	}
	replay := func() map[walPos]rec {
		t.Helper()
		lw, err := openWAL(dir, walOptions{segmentSize: 4 << 10, log: walQuietLogger()})
		if err != nil {
			t.Fatal(err)
		}
		defer lw.unlock()
		got := map[walPos]rec{}
		if err := lw.replay(false, func(pos walPos, typ uint8, payload []byte, size int64) error {
			got[pos] = rec{typ, bytes.Clone(payload), size}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return got
	}
	check := func(what string, got map[walPos]rec, fromIndex func(walPos) bool) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: replayed %d records, want %d", what, len(got), len(want))
		}
		for pos, r := range want {
			g := got[pos]
			if g.typ != r.typ || g.size != r.size {
				t.Fatalf("%s: record at %v: type %d size %d, want %d %d", what, pos, g.typ, g.size, r.typ, r.size)
			}
			if fromIndex(pos) && !bytes.Equal(g.payload, r.payload) || !fromIndex(pos) && !bytes.Equal(g.payload, full[pos]) {
				t.Fatalf("%s: record at %v: payload of %d octets, want %d kept", what, pos, len(g.payload), len(r.payload))
			}
		}
	}
	hasIndex := func(pos walPos) bool {
		_, err := os.Stat(strings.TrimSuffix(w.segPath(pos.seg), ".seg") + ".idx")
		return err == nil
	}
	check("from the indexes", replay(), hasIndex)

	// Spoil the first segment's index three ways: each time replay reads the segment.
	idx := strings.TrimSuffix(segs[0], ".seg") + ".idx"
	good, err := os.ReadFile(idx)
	if err != nil {
		t.Fatal(err)
	}
	fromSegment := func(pos walPos) bool { return pos.seg != 1 && hasIndex(pos) }
	flipped := bytes.Clone(good)
	flipped[len(flipped)-3] ^= 1
	otherSize := bytes.Clone(good)
	otherSize[23]++
	binary.BigEndian.PutUint32(otherSize[12:], crc32.Checksum(otherSize[16:], crcTable))
	for _, bad := range []struct {
		name string
		b    []byte
	}{{"corrupt", flipped}, {"cut short", good[:len(good)-5]}, {"another size", otherSize}} {
		os.WriteFile(idx, bad.b, 0o600)
		check("index "+bad.name, replay(), fromSegment)
	}
	os.Remove(idx)
	check("index missing", replay(), fromSegment)
}

// TestLogWaitRoom: an appender waits in waitRoom while more than maxPending octets wait for
// a writer that is behind, and goes on once the writer has taken them.
func TestLogWaitRoom(t *testing.T) {
	t.Parallel()
	w, err := openWAL(t.TempDir(), walOptions{log: walQuietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.replay(false, func(walPos, uint8, []byte, int64) error { return nil }); err != nil {
		t.Fatal(err)
	}
	entered, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	w.onBatch = func(uint64) {
		once.Do(func() { close(entered); <-gate }) // the writer falls behind after its first batch
	}
	w.pendLimit = 1 << 20
	if err := w.start(0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.close(); w.unlock() })
	if _, _, err := w.append(1, []byte("first")); err != nil {
		t.Fatal(err)
	}
	<-entered
	payload := make([]byte, 64<<10)
	for w.pendAtomic.Load() <= w.pendLimit {
		if _, _, err := w.appendKeep(1, payload, 0); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan struct{})
	go func() { w.waitRoom(); close(done) }()
	select {
	case <-done:
		t.Fatalf("waitRoom returned with %d octets pending", w.pendAtomic.Load())
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	select {
	case <-done:
	case <-time.After(walWait):
		t.Fatal("waitRoom did not return once the writer took the batch")
	}
}

// TestLogIsWritten: a record is reported written once the writer has put it in its file,
// and not before: a reader tells a record still on its way from one that cannot be read.
func TestLogIsWritten(t *testing.T) {
	t.Parallel()
	w, err := openWAL(t.TempDir(), walOptions{segmentSize: 4 << 10, log: walQuietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.replay(false, func(walPos, uint8, []byte, int64) error { return nil }); err != nil {
		t.Fatal(err)
	}
	entered, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	w.onBatch = func(uint64) { once.Do(func() { close(entered); <-gate }) }
	if err := w.start(0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.close(); w.unlock() })
	first := logPayload(1, 100)
	_, p1, err := w.append(1, first)
	if err != nil {
		t.Fatal(err)
	}
	<-entered // the first batch is written; the writer now waits in onBatch
	size := int64(walRecordOverhead + len(first))
	if !w.isWritten(p1, size) {
		t.Fatal("a record in a written batch is not reported written")
	}
	var later []walPos
	for n := range 60 { // several segments' worth, none written yet
		_, p, err := w.append(1, logPayload(n, 300))
		if err != nil {
			t.Fatal(err)
		}
		later = append(later, p)
	}
	for _, p := range later {
		if w.isWritten(p, walRecordOverhead+300) {
			t.Fatalf("record at %v reported written while the writer has not written it", p)
		}
	}
	close(gate)
	if err := w.sync(); err != nil {
		t.Fatal(err)
	}
	for _, p := range later {
		if !w.isWritten(p, walRecordOverhead+300) {
			t.Fatalf("record at %v not reported written after a sync", p)
		}
		if _, _, err := w.readRecord(p); err != nil {
			t.Fatalf("record at %v reported written but unreadable: %v", p, err)
		}
	}
}

// TestLogGatedCompletion: with a tap's held set, a ticket is done only once held reaches
// its batch's written position; a closing log waits walCloseGrace for it, then fails
// what was never held.
func TestLogGatedCompletion(t *testing.T) {
	t.Parallel()
	for _, caughtUp := range []bool{true, false} {
		w, err := openWAL(t.TempDir(), walOptions{log: walQuietLogger()})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.replay(false, func(walPos, uint8, []byte, int64) error { return nil }); err != nil {
			t.Fatal(err)
		}
		var held atomic.Uint64
		w.tap.Store(&walTap{held: held.Load})
		if err := w.start(0); err != nil {
			t.Fatal(err)
		}
		ticket, _, err := w.append(1, []byte("first"))
		if err != nil {
			t.Fatal(err)
		}
		pollFor(t, "the record to be written", func() bool { return w.fsyncedAtomic.Load() >= ticket })
		time.Sleep(50 * time.Millisecond)
		if w.doneAtomic.Load() >= ticket {
			t.Fatal("done before the followers held the record")
		}
		held.Store(w.writtenTo.Load())
		w.kick()
		if err := w.wait(ticket); err != nil {
			t.Fatal(err)
		}

		ticket, _, err = w.append(1, []byte("second"))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		closed := make(chan struct{})
		go func() { w.close(); close(closed) }()
		if caughtUp {
			pollFor(t, "the record to be written", func() bool { return w.fsyncedAtomic.Load() >= ticket })
			held.Store(w.writtenTo.Load())
			w.kick()
		}
		<-closed
		err = w.wait(ticket)
		switch {
		case caughtUp && err != nil:
			t.Fatalf("followers held the last record before the close ended, yet: %v", err)
		case !caughtUp && err != errUnreplicated:
			t.Fatalf("closed with the last record not held: %v, want %v", err, errUnreplicated)
		case !caughtUp && time.Since(start) < walCloseGrace:
			t.Fatalf("close gave the followers %v, want %v", time.Since(start), walCloseGrace)
		}
		w.unlock()
	}
}

// TestSyncData: syncData makes a written file durable without error, and reports one for a
// file that can no longer be synced.
func TestSyncData(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "seg"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("record")); err != nil {
		t.Fatal(err)
	}
	if err := syncData(f); err != nil {
		t.Fatalf("syncData: %v", err)
	}
	f.Close()
	if err := syncData(f); err == nil {
		t.Fatal("syncData of a closed file reported no error")
	}
}
