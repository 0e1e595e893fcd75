package amqp

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// checkFixture is a stopped broker's data directory and what its queues hold.
type checkFixture struct {
	dir  string
	want []CheckQueue // by name
}

// newCheckFixture runs a broker on small segments: a durable topic exchange, two durable
// queues bound to it and one bound to amq.fanout, a queue declared and deleted, a
// transient queue, persistent messages (some acked), transient ones; then stops it.
func newCheckFixture(t *testing.T) checkFixture {
	t.Helper()
	b := startDurable(t, Config{SegmentSize: 8 << 10})
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	if err := ch.ExchangeDeclare("ck.logs", "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareQueues(t, conn, true, "ck.a", "ck.b", "ck.gone")
	declareQueues(t, conn, false, "ck.transient")
	for _, bd := range [][3]string{{"ck.a", "a.#", "ck.logs"}, {"ck.b", "b.#", "ck.logs"}, {"ck.b", "", "amq.fanout"}} {
		if err := ch.QueueBind(bd[0], bd[1], bd[2], false, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ch.QueueDelete("ck.gone", false, false, false); err != nil {
		t.Fatal(err)
	}
	pub := newPersistentPublisher(t, conn)
	var aBodies []string
	var bBytes int64
	for i := range 160 {
		body := fmt.Sprintf("ck-%03d-%s", i, strings.Repeat("x", 100+i%97))
		if i%4 == 3 {
			pub.publish("ck.logs", "b.x", persistentMsg(body))
			bBytes += int64(len(body))
		} else {
			pub.publish("ck.logs", "a.x", persistentMsg(body))
			aBodies = append(aBodies, body)
		}
		pub.publish("ck.logs", "a.x", transientMsg("transient")) // not logged
	}
	pub.wait()
	// Take 20 persistent messages of ck.a (and every transient one) with acks.
	taken := 0
	for taken < 20 {
		d, ok, err := ch.Get("ck.a", false)
		if err != nil || !ok {
			t.Fatalf("get ck.a: %v %v", ok, err)
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
		if d.DeliveryMode == amqp091.Persistent {
			taken++
		}
	}
	if _, err := ch.QueueDeclarePassive("ck.a", true, false, false, false, nil); err != nil {
		t.Fatal(err) // a round trip after the acks: the broker has them
	}
	b.stop()
	var aBytes int64
	for _, s := range aBodies[20:] {
		aBytes += int64(len(s))
	}
	if n := len(segmentFiles(t, b.dir)); n < 3 {
		t.Fatalf("%d segments, want at least 3", n)
	}
	return checkFixture{dir: b.dir, want: []CheckQueue{{"ck.a", len(aBodies) - 20, aBytes}, {"ck.b", 40, bBytes}}}
}

// dirState describes every file and directory under dir: name, mode, size, mtime and,
// for a file, a hash of its contents.
func dirState(t testing.TB, dir string) map[string]string {
	t.Helper()
	state := make(map[string]string)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		s := fmt.Sprintf("%v %d %d", fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			s += " " + hex.EncodeToString(sum[:])
		}
		state[path] = s
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return state
}

// checkUnchanged runs CheckDataDir and fails the test if it changed anything in dir.
func checkUnchanged(t *testing.T, dir string) (CheckReport, string) {
	t.Helper()
	before := dirState(t, dir)
	var out bytes.Buffer
	rep, err := CheckDataDir(dir, &out)
	if err != nil {
		t.Fatalf("CheckDataDir: %v", err)
	}
	after := dirState(t, dir)
	for name, s := range before {
		if after[name] != s {
			t.Errorf("check changed %s: %q, now %q", name, s, after[name])
		}
	}
	for name := range after {
		if _, ok := before[name]; !ok {
			t.Errorf("check created %s", name)
		}
	}
	return rep, out.String()
}

// recoveredQueues starts a broker on a copy of dir and returns what its queues hold.
func recoveredQueues(t *testing.T, dir string, names ...string) []CheckQueue {
	t.Helper()
	b := startDurable(t, Config{DataDir: copyDataDir(t, dir, nil)})
	ch := openChannel(t, dial(t, b.url))
	var qs []CheckQueue
	for _, name := range names {
		q := CheckQueue{Name: name}
		for _, d := range getAll(t, ch, name) {
			q.Messages++
			q.Bytes += int64(len(d.Body))
		}
		qs = append(qs, q)
	}
	return qs
}

// queuesOf returns the queues the report has in vhost "/".
func queuesOf(t *testing.T, rep CheckReport) []CheckQueue {
	t.Helper()
	if len(rep.Vhosts) != 1 || rep.Vhosts[0].Name != "/" {
		t.Fatalf("vhosts %+v, want only /", rep.Vhosts)
	}
	return rep.Vhosts[0].Queues
}

func TestCheckSoundDataDir(t *testing.T) {
	t.Parallel()
	fx := newCheckFixture(t)
	rep, out := checkUnchanged(t, fx.dir)
	if !rep.Sound() || len(rep.Warnings) > 0 || len(rep.Notes) > 0 {
		t.Fatalf("a cleanly stopped broker's directory: corrupt %q, warnings %q, notes %q\n%s", rep.Corrupt, rep.Warnings, rep.Notes, out)
	}
	vh := rep.Vhosts
	if len(vh) != 1 || !slices.Equal(vh[0].Exchanges, []CheckExchange{{"ck.logs", "topic"}}) || vh[0].Bindings != 3 {
		t.Errorf("vhosts %+v, want / with exchange ck.logs (topic) and 3 bindings", vh)
	}
	if got := queuesOf(t, rep); !slices.Equal(got, fx.want) {
		t.Errorf("queues %+v, want %+v", got, fx.want)
	}
	if got := recoveredQueues(t, fx.dir, "ck.a", "ck.b"); !slices.Equal(got, fx.want) {
		t.Errorf("a restart recovers %+v, the check says %+v", got, fx.want)
	}
	segs := segmentFiles(t, fx.dir)
	var size int64
	for _, s := range segs {
		fi, err := os.Stat(s)
		if err != nil {
			t.Fatal(err)
		}
		size += fi.Size()
	}
	if rep.Segments != len(segs) || rep.SegmentBytes != size {
		t.Errorf("segments %d, %d bytes; the directory has %d, %d bytes", rep.Segments, rep.SegmentBytes, len(segs), size)
	}
	idx, _ := filepath.Glob(filepath.Join(fx.dir, "wal", "*.idx"))
	if len(idx) == 0 || rep.Indexes != len(idx) {
		t.Errorf("%d indexes match, the directory has %d", rep.Indexes, len(idx))
	}
	if rep.Records["publish-at"] != 160 || rep.Records["ack"] == 0 {
		t.Errorf("records %v, want 160 publish-at and some acks", rep.Records)
	}
	for _, line := range []string{
		"vhost /: 1 exchange, 2 queues, 3 bindings\n",
		"  exchange ck.logs (topic)\n",
		fmt.Sprintf("  queue ck.a: %d messages, %d body bytes\n", fx.want[0].Messages, fx.want[0].Bytes),
		fmt.Sprintf("  queue ck.b: %d messages, %d body bytes\n", fx.want[1].Messages, fx.want[1].Bytes),
		"  publish-at         160\n",
		"checkpoint: meta.snap, covering the log up to ",
		"\nsound\n",
	} {
		if !strings.Contains(out, line) {
			t.Errorf("report lacks %q:\n%s", line, out)
		}
	}
	// The same report again: the order is stable.
	if _, again := checkUnchanged(t, fx.dir); again != out {
		t.Errorf("a second check printed\n%s\nthe first\n%s", again, out)
	}
}

// TestCheckCorruptMiddleSegment: a flipped byte in a segment that is not the last is
// corruption, named by file and offset, as the broker names it when it refuses to start;
// the broker's copy of that segment's index does not hide it.
func TestCheckCorruptMiddleSegment(t *testing.T) {
	t.Parallel()
	fx := newCheckFixture(t)
	segs := segmentFiles(t, fx.dir)
	victim := segs[1]
	starts, _ := recordStarts(t, victim)
	off := starts[len(starts)/2]
	flip := func(name string, data []byte) []byte {
		if name == filepath.Base(victim) {
			data[off+12] ^= 0x20
		}
		return data
	}
	where := filepath.Base(victim) + " offset " + strconv.Itoa(off) + ": "

	// Without indexes (a copy has none), as the broker reads it.
	img := copyDataDir(t, fx.dir, flip)
	rep, out := checkUnchanged(t, img)
	if rep.Sound() || len(rep.Corrupt) != 1 || !strings.Contains(rep.Corrupt[0], where) {
		t.Fatalf("corrupt %q, want one problem at %s\n%s", rep.Corrupt, where, out)
	}
	if !strings.Contains(out, "corrupt: "+filepath.Join(img, "wal", where)) || !strings.Contains(out, "CORRUPT: 1 problem;") {
		t.Errorf("report does not name the problem:\n%s", out)
	}
	_, err := tryStartDurable(t, Config{DataDir: copyDataDir(t, img, nil)})
	if err == nil || !strings.Contains(err.Error(), "offset "+strconv.Itoa(off)) {
		t.Errorf("the broker started on it (%v); the check calls it corrupt", err)
	}

	// In place, beside the segment's sound index.
	data, err := os.ReadFile(victim)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(victim, flip(filepath.Base(victim), data), 0o600); err != nil {
		t.Fatal(err)
	}
	rep, out = checkUnchanged(t, fx.dir)
	if rep.Sound() || !strings.Contains(rep.Corrupt[0], where) {
		t.Errorf("corrupt %q, want a problem at %s\n%s", rep.Corrupt, where, out)
	}
	if len(rep.Notes) != 1 || !strings.Contains(rep.Notes[0], strings.TrimSuffix(filepath.Base(victim), ".seg")+".idx: index is sound") {
		t.Errorf("notes %q, want one saying a start would replay the sound index", rep.Notes)
	}
}

func TestCheckCorruptCheckpoint(t *testing.T) {
	t.Parallel()
	fx := newCheckFixture(t)
	img := copyDataDir(t, fx.dir, nil)
	snap := filepath.Join(img, "meta.snap")
	b, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-3] ^= 1
	if err := os.WriteFile(snap, b, 0o600); err != nil {
		t.Fatal(err)
	}
	rep, out := checkUnchanged(t, img)
	if rep.Sound() || !strings.Contains(rep.Corrupt[0], snap+": checkpoint fails its checksum") || rep.Vhosts != nil {
		t.Errorf("corrupt %q, vhosts %+v: want the checkpoint named and no summary\n%s", rep.Corrupt, rep.Vhosts, out)
	}
	if rep.Records["publish-at"] != 160 {
		t.Errorf("records %v: the segments are still read", rep.Records)
	}
	if !strings.Contains(out, "checkpoint: unreadable\nsegments: ") || !strings.Contains(out, "no summary of vhosts and queues") {
		t.Errorf("report does not say the checkpoint is unreadable and the summary missing:\n%s", out)
	}
}

// TestCheckTornTail: a record cut short at the end of the last segment is what a crash
// leaves; it is a note, the check does not cut it off, and the counts are what a start,
// which cuts it off, recovers.
func TestCheckTornTail(t *testing.T) {
	t.Parallel()
	fx := newCheckFixture(t)
	segs := segmentFiles(t, fx.dir)
	last := segs[len(segs)-1]
	starts, _ := recordStarts(t, last)
	if len(starts) == 0 {
		t.Fatal("the last segment has no records")
	}
	cut := starts[len(starts)-1]
	img := copyDataDir(t, fx.dir, func(name string, data []byte) []byte {
		if name == filepath.Base(last) {
			return data[:cut+walRecordOverhead+3]
		}
		return data
	})
	rep, out := checkUnchanged(t, img)
	where := filepath.Join(img, "wal", filepath.Base(last)) + " offset " + strconv.Itoa(cut) + ": a torn write"
	if !rep.Sound() || len(rep.Notes) != 1 || !strings.HasPrefix(rep.Notes[0], where) {
		t.Fatalf("corrupt %q, notes %q: want sound, with a note at %s\n%s", rep.Corrupt, rep.Notes, where, out)
	}
	if got, want := queuesOf(t, rep), recoveredQueues(t, img, "ck.a", "ck.b"); !slices.Equal(got, want) {
		t.Errorf("the check says %+v, a restart recovers %+v", got, want)
	}
}

// TestCheckBrokenIndex: an index that fails its checksum is ignored by the broker, so it
// is a warning; one that passes it but disagrees with its segment would be trusted, so it
// is corruption.
func TestCheckBrokenIndex(t *testing.T) {
	t.Parallel()
	fx := newCheckFixture(t)
	idx, _ := filepath.Glob(filepath.Join(fx.dir, "wal", "*.idx"))
	if len(idx) == 0 {
		t.Fatal("no index files")
	}
	orig, err := os.ReadFile(idx[0])
	if err != nil {
		t.Fatal(err)
	}
	b := bytes.Clone(orig)
	b[len(b)/2] ^= 0x10
	if err := os.WriteFile(idx[0], b, 0o600); err != nil {
		t.Fatal(err)
	}
	rep, out := checkUnchanged(t, fx.dir)
	if !rep.Sound() || len(rep.Warnings) != 1 || !strings.HasPrefix(rep.Warnings[0], idx[0]+": index is torn") {
		t.Fatalf("corrupt %q, warnings %q: want sound with a warning naming %s\n%s", rep.Corrupt, rep.Warnings, idx[0], out)
	}
	if !slices.Equal(queuesOf(t, rep), fx.want) {
		t.Errorf("queues %+v, want %+v", queuesOf(t, rep), fx.want)
	}

	// The first entry's type changed, and the checksum made again.
	b = bytes.Clone(orig)
	b[walIndexHeader+8] ^= 0x40
	binary.BigEndian.PutUint32(b[12:], crc32.Checksum(b[16:], crcTable))
	if err := os.WriteFile(idx[0], b, 0o600); err != nil {
		t.Fatal(err)
	}
	rep, out = checkUnchanged(t, fx.dir)
	if rep.Sound() || !strings.Contains(rep.Corrupt[0], idx[0]+": index passes its checksum but disagrees with its segment at offset 16") {
		t.Errorf("corrupt %q: want the index named\n%s", rep.Corrupt, out)
	}
}

// TestCheckReplaysAsBroker: the records must also replay as the broker's replay does: a
// record of an unknown type stops a start, so it is corruption; an ack of a message the
// log does not hold does not.
func TestCheckReplaysAsBroker(t *testing.T) {
	t.Parallel()
	fx := newCheckFixture(t)
	segs := segmentFiles(t, fx.dir)
	last := filepath.Base(segs[len(segs)-1])
	for _, tc := range []struct {
		name    string
		typ     uint8
		payload []byte
		corrupt string
	}{
		{"unknown type", 99, []byte("?"), "unknown record type 99"},
		{"ack of nothing", recAck, binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, 1), 1), 1<<40), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var at int
			img := copyDataDir(t, fx.dir, func(name string, data []byte) []byte {
				if name != last {
					return data
				}
				at = len(data)
				rec := binary.BigEndian.AppendUint32(nil, uint32(len(tc.payload)))
				rec = binary.BigEndian.AppendUint32(rec, crc32.Update(crc32.Update(0, crcTable, []byte{tc.typ}), crcTable, tc.payload))
				rec = append(append(rec, tc.typ), tc.payload...)
				return append(data, rec...)
			})
			rep, out := checkUnchanged(t, img)
			_, startErr := tryStartDurable(t, Config{DataDir: copyDataDir(t, img, nil)})
			if tc.corrupt == "" {
				if !rep.Sound() || startErr != nil {
					t.Errorf("check: %q; start: %v; want both to accept it\n%s", rep.Corrupt, startErr, out)
				}
				return
			}
			where := last + " offset " + strconv.Itoa(at) + ": " + tc.corrupt
			if len(rep.Corrupt) != 1 || !strings.Contains(rep.Corrupt[0], where) {
				t.Errorf("corrupt %q, want %q\n%s", rep.Corrupt, where, out)
			}
			if startErr == nil || !strings.Contains(startErr.Error(), tc.corrupt) {
				t.Errorf("start: %v, want it refused with %q", startErr, tc.corrupt)
			}
		})
	}
}

// TestCheckRunningBroker: the directory of a running broker is refused, not read.
func TestCheckRunningBroker(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" {
		t.Skip("the data directory lock is a flock on Linux only")
	}
	b := startDurable(t, Config{})
	var out bytes.Buffer
	_, err := CheckDataDir(b.dir, &out)
	if err == nil || !strings.Contains(err.Error(), "in use by a running broker") {
		t.Fatalf("check of a running broker's directory: %v, want it refused", err)
	}
	if out.Len() != 0 {
		t.Errorf("it printed a report:\n%s", out.String())
	}
	b.stop()
	if rep, out := checkUnchanged(t, b.dir); !rep.Sound() {
		t.Errorf("once stopped: %q\n%s", rep.Corrupt, out)
	}
}

func TestCheckNotADataDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	before := dirState(t, dir)
	if _, err := CheckDataDir(dir, new(bytes.Buffer)); err == nil || !strings.Contains(err.Error(), "not a data directory") {
		t.Errorf("check of an empty directory: %v", err)
	}
	if after := dirState(t, dir); len(after) != len(before) {
		t.Errorf("check created files: %v", after)
	}
}
