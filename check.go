package amqp

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// The read-only check of a stopped broker's data directory (amqpd check): the broker's own
// replay (store.go, wal.go) with every write turned off, which checks each segment header,
// each record's framing and CRC, the checkpoint and each segment index, then restores the
// topology and messages into vhosts that serve nothing, to say what a start would recover.

// CheckReport is what CheckDataDir found in a data directory.
type CheckReport struct {
	Segments     int            // log segment files
	SegmentBytes int64          // their total size
	Indexes      int            // segment indexes that match their segments
	Records      map[string]int // records read, by type: "publish-at", "ack", "queue.declare", ...
	// Vhosts is what a start would restore, for each vhost with anything durable, by name;
	// nil when the checkpoint or the topology cannot be read.
	Vhosts []CheckVhost
	// Corrupt lists what a start refuses (or, with -repair, loses), each with its file
	// and, for a record, its offset. Counts past a problem leave out what could not be read.
	Corrupt  []string
	Warnings []string // broken segment indexes, which a start ignores
	Notes    []string // what the next start tidies: a torn tail of the log, files a crash left

	checkpoint string // what meta.snap covers, for the text
	noSummary  bool   // the checkpoint or the topology cannot be read: Vhosts is nil
}

// CheckVhost is one vhost's durable topology and messages, as a start would restore them.
type CheckVhost struct {
	Name      string
	Exchanges []CheckExchange // declared by clients (not amq.*), by name
	Queues    []CheckQueue    // by name
	Bindings  int
}

// CheckExchange is a durable exchange.
type CheckExchange struct{ Name, Type string }

// CheckQueue is a durable queue and the messages a start would restore to it.
type CheckQueue struct {
	Name     string
	Messages int
	Bytes    int64 // the messages' body octets
}

// Sound reports whether the check found no corruption.
func (r *CheckReport) Sound() bool { return len(r.Corrupt) == 0 }

// recordNames names the record types of store.go.
var recordNames = map[uint8]string{
	recExchangeDeclare: "exchange.declare", recExchangeDelete: "exchange.delete",
	recQueueDeclare: "queue.declare", recQueueDelete: "queue.delete",
	recBind: "bind", recUnbind: "unbind", recPublish: "publish", recAck: "ack",
	recDeadLetter: "dead-letter", recPublishAt: "publish-at",
}

// CheckDataDir checks the data directory of a stopped broker without changing anything in
// it, writes a human-readable report to out, and returns it. The error is for a directory
// it cannot check: not a data directory, unreadable, or in use by a running broker (on
// Linux, its LOCK file is flocked: the check takes a shared flock on it, which also keeps
// a broker from starting there until the check is done). Corruption is in the report.
func CheckDataDir(dir string, out io.Writer) (CheckReport, error) {
	var rep CheckReport
	if fi, err := os.Stat(filepath.Join(dir, "wal")); err != nil || !fi.IsDir() {
		return rep, errors.New("amqp: " + dir + " is not a data directory (it has no wal directory)")
	}
	lock, err := lockDirShared(filepath.Join(dir, "LOCK"))
	if err != nil {
		return rep, err
	}
	if lock != nil {
		defer lock.Close()
	}
	quiet := slog.New(slog.DiscardHandler)
	check := &walCheck{}
	st := &store{w: &wal{dir: dir, log: quiet, check: check}, log: quiet, segs: make(map[uint64]*segState),
		tails: make(map[*queue]bool), nextMsgID: 1, nextQID: 1}
	rec := &recovered{messages: make(map[uint64]refQueue)}
	snap := filepath.Join(dir, "meta.snap")
	snapErr := st.loadCheckpoint(rec)
	if snapErr != nil {
		text := strings.TrimPrefix(snapErr.Error(), "amqp: ")
		text = strings.TrimPrefix(strings.TrimPrefix(text, snap+": "), "meta.snap: ")
		check.add(checkCorrupt, snap, -1, text+": a start stops here")
	}
	if err := st.replayLog(rec, false, nil); err != nil {
		return rep, err
	}
	tmp, _ := filepath.Glob(filepath.Join(dir, ".meta.snap.tmp-*"))
	for _, name := range tmp {
		check.add(checkNote, name, -1, "a checkpoint a crash left half written: the next start removes it")
	}
	rep.noSummary = true
	if snapErr == nil {
		vhosts, err := restoreForCheck(st, rec)
		if err != nil {
			check.add(checkCorrupt, dir, -1, strings.TrimPrefix(err.Error(), "amqp: ")+" (in meta.snap or the log): a start stops here")
		}
		rep.Vhosts, rep.noSummary = vhosts, err != nil
	}

	rep.Segments, rep.SegmentBytes, rep.Indexes = check.segments, check.bytes, check.indexes
	rep.Records = make(map[string]int)
	for typ, n := range check.records {
		if n > 0 {
			rep.Records[recordName(uint8(typ))] = n
		}
	}
	for _, p := range check.problems {
		s := p.file + ": " + p.text
		if p.off >= 0 {
			s = p.file + " offset " + strconv.Itoa(p.off) + ": " + p.text
		}
		switch p.level {
		case checkCorrupt:
			rep.Corrupt = append(rep.Corrupt, s)
		case checkWarning:
			rep.Warnings = append(rep.Warnings, s)
		default:
			rep.Notes = append(rep.Notes, s)
		}
	}
	switch _, err := os.Stat(snap); {
	case snapErr != nil:
		rep.checkpoint = "unreadable"
	case err != nil:
		rep.checkpoint = "none"
	default:
		rep.checkpoint = "meta.snap, covering the log up to " + filepath.Base(st.w.segPath(st.snapPos.seg)) +
			" offset " + strconv.FormatUint(st.snapPos.off, 10)
	}
	return rep, rep.write(out, dir)
}

// restoreForCheck restores rec, as a start would, into vhosts of a server that serves
// nothing (every vhost the records name: which exist is the definitions file's) and
// summarizes those with anything durable.
func restoreForCheck(st *store, rec *recovered) ([]CheckVhost, error) {
	s := NewServer(Config{Logger: st.log})
	for _, r := range rec.topology {
		if r.typ == recQueueDelete {
			continue
		}
		d := decoder{b: r.payload}
		if name := d.shortstr(); d.err == nil && s.vhosts[name] == nil {
			s.vhosts[name] = s.newVhost(name)
		}
	}
	if _, err := s.restore(st, rec); err != nil {
		return nil, err
	}
	var out []CheckVhost
	for _, vh := range s.vhostList() {
		cv := CheckVhost{Name: vh.name}
		for name, x := range vh.exchanges {
			if !predeclared(name) {
				cv.Exchanges = append(cv.Exchanges, CheckExchange{name, x.kind})
			}
			cv.Bindings += len(x.bindings)
		}
		for name, q := range vh.queues {
			cv.Queues = append(cv.Queues, CheckQueue{name, q.tail.len(), q.readyBytes})
		}
		if len(cv.Exchanges)+len(cv.Queues)+cv.Bindings == 0 {
			continue
		}
		slices.SortFunc(cv.Exchanges, func(a, b CheckExchange) int { return cmp.Compare(a.Name, b.Name) })
		slices.SortFunc(cv.Queues, func(a, b CheckQueue) int { return cmp.Compare(a.Name, b.Name) })
		out = append(out, cv)
	}
	return out, nil
}

func recordName(typ uint8) string {
	if n, ok := recordNames[typ]; ok {
		return n
	}
	return "type " + strconv.Itoa(int(typ))
}

// write prints the report: the checkpoint, the segments, records by type, each vhost,
// then each problem and the verdict.
func (r *CheckReport) write(out io.Writer, dir string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "data directory %s\n", dir)
	fmt.Fprintf(&b, "checkpoint: %s\n", r.checkpoint)
	fmt.Fprintf(&b, "segments: %d, %d bytes; %d indexes match their segments\n", r.Segments, r.SegmentBytes, r.Indexes)
	total := 0
	for _, n := range r.Records {
		total += n
	}
	fmt.Fprintf(&b, "records: %d\n", total)
	for typ := range 256 {
		if n := r.Records[recordName(uint8(typ))]; n > 0 {
			fmt.Fprintf(&b, "  %-18s %d\n", recordName(uint8(typ)), n)
		}
	}
	switch {
	case r.noSummary:
		fmt.Fprintf(&b, "no summary of vhosts and queues: the topology cannot be read\n")
	case len(r.Vhosts) == 0:
		fmt.Fprintf(&b, "no durable exchanges, queues or bindings\n")
	}
	for _, vh := range r.Vhosts {
		fmt.Fprintf(&b, "vhost %s: %s, %s, %s\n", vh.Name, plural(len(vh.Exchanges), "exchange"), plural(len(vh.Queues), "queue"), plural(vh.Bindings, "binding"))
		for _, x := range vh.Exchanges {
			fmt.Fprintf(&b, "  exchange %s (%s)\n", x.Name, x.Type)
		}
		for _, q := range vh.Queues {
			fmt.Fprintf(&b, "  queue %s: %s, %d body bytes\n", q.Name, plural(q.Messages, "message"), q.Bytes)
		}
	}
	for _, s := range r.Corrupt {
		fmt.Fprintf(&b, "corrupt: %s\n", s)
	}
	for _, s := range r.Warnings {
		fmt.Fprintf(&b, "warning: %s\n", s)
	}
	for _, s := range r.Notes {
		fmt.Fprintf(&b, "note: %s\n", s)
	}
	if r.Sound() {
		fmt.Fprintf(&b, "sound\n")
	} else {
		fmt.Fprintf(&b, "CORRUPT: %s; the counts above leave out what cannot be read\n", plural(len(r.Corrupt), "problem"))
	}
	_, err := io.WriteString(out, b.String())
	return err
}

// plural is "1 queue", "2 queues".
func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return strconv.Itoa(n) + " " + word + "s"
}
