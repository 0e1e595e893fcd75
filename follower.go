package amqp

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// The follower's side of replication: a replica dials the leader, runs one session at a
// time, and keeps its data directory a copy of the leader's. replication.go describes the
// protocol and holds the leader's side.

// followerOptions configure a follower.
type followerOptions struct {
	cluster, name string
	secret        []byte
	defs          string // where the leader's definitions file is kept; "" ignores it
	log           *slog.Logger
}

// replica is a follower's copy of the leader's data directory.
type replica struct {
	dir  string
	opt  followerOptions
	lock *os.File

	// The session's own state.
	f        *os.File // the segment being written
	fseq     uint64
	fsize    int64
	dirty    bool // f was written since its last fsync
	dirDirty bool // a segment was created since wal/ was last fsynced
	part     *os.File
	partName string
	partCRC  uint32
	partSize int64

	term atomic.Uint64 // the newest term seen
	pos  atomic.Uint64 // the log position on disk, packed
}

// openReplica locks dir for a follower and tidies what a killed session left.
func openReplica(dir string, opt followerOptions) (*replica, error) {
	if opt.log == nil {
		opt.log = slog.New(slog.DiscardHandler)
	}
	if err := prepareDir(dir, opt.log); err != nil {
		return nil, err
	}
	lock, err := lockDir(filepath.Join(dir, "LOCK"))
	if err != nil {
		return nil, err
	}
	r := &replica{dir: dir, opt: opt, lock: lock}
	tmps, _ := filepath.Glob(filepath.Join(dir, "*.repl-tmp"))
	more, _ := filepath.Glob(filepath.Join(dir, "wal", "*.repl-tmp"))
	if opt.defs != "" {
		tmps = append(tmps, opt.defs+".repl-tmp")
	}
	for _, t := range append(tmps, more...) {
		os.Remove(t)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "TERM")); err == nil {
		t, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			lock.Close()
			return nil, errors.New("amqp: " + filepath.Join(dir, "TERM") + ": not a term")
		}
		r.term.Store(t)
	}
	if segs, _ := filepath.Glob(filepath.Join(dir, "wal", "*.seg")); len(segs) > 0 {
		last := segs[len(segs)-1] // 20-digit names sort by number
		seq, err := strconv.ParseUint(strings.TrimSuffix(filepath.Base(last), ".seg"), 10, 64)
		if fi, err2 := os.Stat(last); err == nil && err2 == nil {
			r.pos.Store(pack(walPos{seq, uint64(fi.Size())}))
		}
	}
	return r, nil
}

// close releases the directory; no session may run.
func (r *replica) close() {
	r.closeFiles()
	r.lock.Close()
}

func (r *replica) closeFiles() {
	if r.f != nil {
		r.f.Close() // unsynced: the next session syncs what it lists
		r.f, r.dirty = nil, false
	}
	if r.part != nil {
		r.part.Close()
		os.Remove(r.part.Name())
		r.part = nil
	}
}

// position is where the follower's copy of the log ends, on disk.
func (r *replica) position() walPos { return unpack(r.pos.Load()) }

// run follows the leader that dial reaches, session after session, until ctx is done,
// waiting between failed sessions from 50 ms, doubling, up to 2 s. A failed
// authentication or an older term ends it: dialing the same again would not change that.
func (r *replica) run(ctx context.Context, dial func(context.Context) (net.Conn, error)) error {
	wait := 50 * time.Millisecond
	for {
		c, err := dial(ctx)
		if err == nil {
			start := time.Now()
			err = r.follow(ctx, c)
			if time.Since(start) > 2*time.Second {
				wait = 50 * time.Millisecond
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, errReplAuth) || errors.Is(err, errReplOlderTerm) {
			return err
		}
		r.opt.log.Warn("replication: session with the leader ended; dialing again", "err", err, "in", wait.String())
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 2*time.Second)
	}
}

// follow runs one session with the leader on c until it fails or ctx is done.
func (r *replica) follow(ctx context.Context, c net.Conn) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer r.closeFiles()
	rc := newReplConn(c)
	if err := r.handshake(rc); err != nil {
		return err
	}
	var unacked int64
	// Nothing is acked before the plan's first data message sets the position (truncating
	// what the leader does not have): until then the position on disk may be a stale
	// copy's, longer than the leader's. That message is acked at once.
	positioned, ackNow := false, false
	for {
		typ, p, err := rc.recv()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		d := decoder{b: p}
		switch typ {
		case replData:
			seg, off := d.longlong(), d.longlong()
			if d.err != nil {
				return errReplProtocol
			}
			if err := r.write(seg, off, d.b); err != nil {
				return err
			}
			unacked += int64(len(d.b))
			ackNow = ackNow || len(d.b) == 0
			positioned = true
		case replPart:
			name, off := d.shortstr(), d.longlong()
			if d.err != nil {
				return errReplProtocol
			}
			if err := r.writePart(name, int64(off), d.b); err != nil {
				return err
			}
		case replFile:
			name, size, crc := d.shortstr(), d.longlong(), d.long()
			if d.err != nil {
				return errReplProtocol
			}
			if err := r.replace(name, int64(size), crc); err != nil {
				return err
			}
		case replRemove:
			if err := r.remove(d.shortstr()); err != nil {
				return err
			}
		case replPing:
			ackNow = true
		case replRefuse:
			return errors.New("amqp: replication: leader ended the session: " + string(p))
		default:
			return errReplProtocol
		}
		// Ack when the leader has nothing more in flight to us, or every 4 MiB.
		if positioned && (ackNow || unacked > 0 && (rc.r.Buffered() == 0 || unacked >= 4<<20)) {
			if err := r.sync(); err != nil {
				return err
			}
			pos := r.position()
			ack := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, pos.seg), pos.off)
			if err := rc.send(replAck, ack); err != nil {
				return err
			}
			if err := rc.w.Flush(); err != nil {
				return err
			}
			unacked, ackNow = 0, false
		}
	}
}

// handshake checks the leader's cluster, term and proof of the secret, proves its own,
// and lists the follower's files.
func (r *replica) handshake(rc *replConn) error {
	rc.c.SetDeadline(time.Now().Add(10 * time.Second))
	defer rc.c.SetDeadline(time.Time{})
	typ, p, err := rc.recv()
	if err != nil {
		return err
	}
	d := decoder{b: p}
	version, term, nonce := d.long(), d.longlong(), d.bytes(replNonce)
	cluster := d.shortstr()
	if typ != replHello || d.err != nil {
		return errReplProtocol
	}
	if version != replVersion {
		rc.refuse("version " + strconv.Itoa(int(version)) + " is not supported")
		return errors.New("amqp: replication: leader speaks version " + strconv.Itoa(int(version)))
	}
	if cluster != r.opt.cluster {
		rc.refuse("not of cluster " + cluster)
		return errors.New("amqp: replication: leader of cluster " + cluster + ", not " + r.opt.cluster)
	}
	if seen := r.term.Load(); term < seen {
		rc.refuse("term " + strconv.FormatUint(term, 10) + " is older than term " + strconv.FormatUint(seen, 10))
		return errReplOlderTerm
	}
	nonce = slices.Clone(nonce)
	fnonce := make([]byte, replNonce)
	rand.Read(fnonce)
	login := append(fnonce, replMAC(r.opt.secret, "follower", cluster, term, nonce, fnonce)...)
	if err := rc.send(replLogin, appendShortstr(login, r.opt.name)); err != nil {
		return err
	}
	if err := rc.w.Flush(); err != nil {
		return err
	}
	typ, p, err = rc.recv()
	if err != nil {
		return err
	}
	if typ == replRefuse {
		if string(p) == "authentication failed" {
			return errReplAuth
		}
		return errors.New("amqp: replication: leader refused: " + string(p))
	}
	if typ != replWelcome || !hmac.Equal(p, replMAC(r.opt.secret, "leader", cluster, term, nonce, fnonce)) {
		rc.refuse("authentication failed")
		return errReplAuth
	}
	if term > r.term.Load() {
		if err := writeFileAtomic(filepath.Join(r.dir, "TERM"), []byte(strconv.FormatUint(term, 10)+"\n")); err != nil {
			return err
		}
		r.term.Store(term)
	}
	files, err := listFiles(r.dir, r.opt.defs)
	if err != nil {
		return err
	}
	have := binary.BigEndian.AppendUint32(nil, uint32(len(files)))
	for name, path := range files {
		info, err := fileCRC(path, -1)
		if err != nil {
			return err
		}
		// A session cut off may have left a segment written but not synced; what the
		// leader takes as held must be on disk.
		if _, seg, _ := replName(name); seg {
			if err := syncFile(path); err != nil {
				return err
			}
		}
		have = appendShortstr(have, name)
		have = binary.BigEndian.AppendUint64(have, uint64(info.size))
		have = binary.BigEndian.AppendUint32(have, info.crc)
	}
	if err := rc.send(replHave, have); err != nil {
		return err
	}
	return rc.w.Flush()
}

// write puts b at off in segment seg, creating it, or cutting off what it has past off.
func (r *replica) write(seg, off uint64, b []byte) error {
	if r.f == nil || r.fseq != seg {
		if err := r.sync(); err != nil {
			return err
		}
		if r.f != nil {
			r.f.Close()
			r.f = nil
		}
		name := localPath(r.dir, "", segName(seg))
		f, err := os.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err == nil {
			r.dirDirty = true
		} else if errors.Is(err, os.ErrExist) {
			f, err = os.OpenFile(name, os.O_WRONLY, 0o600)
		}
		if err != nil {
			return err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return err
		}
		r.f, r.fseq, r.fsize = f, seg, fi.Size()
	}
	if int64(off) != r.fsize {
		if int64(off) > r.fsize {
			return errors.New("amqp: replication: a gap in segment " + strconv.FormatUint(seg, 10))
		}
		if err := r.f.Truncate(int64(off)); err != nil {
			return err
		}
		r.fsize, r.dirty = int64(off), true
	}
	if len(b) > 0 {
		if _, err := r.f.WriteAt(b, int64(off)); err != nil {
			return err
		}
		r.fsize += int64(len(b))
		r.dirty = true
	}
	return nil
}

// sync makes what was written durable and moves the position on.
func (r *replica) sync() error {
	if r.dirty {
		if err := syncData(r.f); err != nil {
			return err
		}
		r.dirty = false
	}
	if r.dirDirty {
		if err := syncDir(filepath.Join(r.dir, "wal")); err != nil {
			return err
		}
		r.dirDirty = false
	}
	if r.f != nil {
		r.pos.Store(pack(walPos{r.fseq, uint64(r.fsize)}))
	}
	return nil
}

// target checks a name from the leader and returns the local file; "" ignores it.
func (r *replica) target(name string) (string, error) {
	if !validName(name) {
		return "", errors.New("amqp: replication: leader sent an unexpected file name " + strconv.Quote(name))
	}
	return localPath(r.dir, r.opt.defs, name), nil
}

// writePart writes part of a file's new content into a temporary file beside it.
func (r *replica) writePart(name string, off int64, b []byte) error {
	path, err := r.target(name)
	if err != nil || path == "" {
		return err
	}
	if off == 0 {
		if r.part != nil {
			r.part.Close()
		}
		r.part, err = os.OpenFile(path+".repl-tmp", os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			r.part = nil
			return err
		}
		r.partName, r.partCRC, r.partSize = name, 0, 0
	}
	if r.part == nil || r.partName != name || off != r.partSize {
		return errReplProtocol
	}
	if _, err := r.part.Write(b); err != nil {
		return err
	}
	r.partCRC = crc32.Update(r.partCRC, crcTable, b)
	r.partSize += int64(len(b))
	return nil
}

// replace puts the file whose parts were sent in place, durably, once size and crc match.
// The log written before it is made durable first: the leader sends a file once the log
// holds what it replaces (a checkpoint covers records up to then), so a power cut must
// not leave the file without that log.
func (r *replica) replace(name string, size int64, crc uint32) error {
	path, err := r.target(name)
	if err != nil || path == "" {
		return err
	}
	if err := r.sync(); err != nil {
		return err
	}
	if size == 0 && (r.part == nil || r.partName != name) {
		return writeFileAtomic(path, nil)
	}
	if r.part == nil || r.partName != name {
		return errReplProtocol
	}
	f := r.part
	r.part = nil
	if r.partSize != size || r.partCRC != crc {
		f.Close()
		os.Remove(f.Name())
		return errors.New("amqp: replication: " + name + " arrived damaged")
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return err
	}
	return syncDir(filepath.Dir(path))
}

// remove deletes a file the leader no longer has, durably, after making the log written
// before it durable: a compacted segment goes once the copies of its live records are in
// later ones, which a power cut must not take with it.
func (r *replica) remove(name string) error {
	path, err := r.target(name)
	if err != nil || path == "" {
		return err
	}
	if err := r.sync(); err != nil {
		return err
	}
	if seq, seg, _ := replName(name); seg && r.f != nil && r.fseq == seq {
		r.f.Close()
		r.f, r.dirty = nil, false
	}
	if err := os.Remove(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return syncDir(filepath.Dir(path))
}
