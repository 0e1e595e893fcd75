package amqp

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
)

// The paging files: where a long queue keeps the bodies of its transient messages (the
// persistent ones are in the write-ahead log already). Bodies are appended, unframed, to
// files of spillSegment octets in <data>/paging, through a write buffer, so paging costs
// a copy per message and a write per spillBuffer; a file goes when nothing in it is queued
// any more, and no file number is used twice. Nothing here needs to survive a crash, so
// nothing is fsynced, and the directory is emptied at start.

const (
	spillSegment = 16 << 20 // the size at which a paging file is closed to new bodies
	spillBuffer  = 64 << 10 // what is gathered before a write
)

// spillRef is where a paged transient body is: a paging file and an offset in it (the
// length is the message's size). The zero value is no place.
type spillRef struct {
	seg uint32
	off uint32
}

// spill is the set of paging files.
type spill struct {
	dir string

	mu   sync.Mutex
	segs map[uint32]*spillSeg // guarded by mu
	head *spillSeg            // guarded by mu: the file bodies are appended to
	wbuf []byte               // guarded by mu: the head's octets from head.flushed on
	next uint32               // guarded by mu: the number of the next file
}

// spillSeg is one paging file.
type spillSeg struct {
	n       uint32
	f       *os.File
	size    int64 // octets appended, buffered ones included
	flushed int64 // octets written to the file
	live    int   // bodies still queued
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

// put appends a body and returns its place.
func (sp *spill) put(body []byte) (spillRef, error) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	h := sp.head
	if h == nil || h.size+int64(len(body)) > spillSegment && h.size > 0 {
		if err := sp.flushLocked(); err != nil {
			return spillRef{}, err
		}
		f, err := os.OpenFile(sp.path(sp.next), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
		if err != nil {
			return spillRef{}, err
		}
		h = &spillSeg{n: sp.next, f: f}
		sp.next++
		sp.segs[h.n] = h
		sp.head = h
	}
	if len(sp.wbuf)+len(body) > spillBuffer {
		if err := sp.flushLocked(); err != nil {
			return spillRef{}, err
		}
	}
	ref := spillRef{seg: h.n, off: uint32(h.size)}
	if len(body) > spillBuffer {
		if _, err := h.f.WriteAt(body, h.size); err != nil {
			return spillRef{}, err
		}
		h.flushed += int64(len(body))
	} else {
		sp.wbuf = append(sp.wbuf, body...)
	}
	h.size += int64(len(body))
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

// getAhead reads back a body of size octets, through a queue's read-ahead window: from
// the window when it holds the body, from the write buffer when the body is still there,
// else by reading a new window that starts at the body.
func (sp *spill) getAhead(r spillRef, size uint32, ra *readAhead) ([]byte, error) {
	if b := ra.window(true, uint64(r.seg), uint64(r.off), int64(size)); b != nil {
		return b, nil
	}
	sp.mu.Lock()
	s := sp.segs[r.seg]
	if s == nil {
		sp.mu.Unlock()
		return nil, errors.New("amqp: no paging file " + strconv.FormatUint(uint64(r.seg), 10))
	}
	if int64(r.off) >= s.flushed {
		// Still in the write buffer.
		i := int64(r.off) - s.flushed
		b := append([]byte(nil), sp.wbuf[i:i+int64(size)]...)
		sp.mu.Unlock()
		return b, nil
	}
	written := s.flushed // every octet below is in the file; a flush may be writing past it
	sp.mu.Unlock()
	b := make([]byte, min(max(int64(size), readAheadWindow), written-int64(r.off)))
	n, err := s.f.ReadAt(b, int64(r.off))
	if n < int(size) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	*ra = readAhead{spill: true, seg: uint64(r.seg), off: uint64(r.off), buf: b[:n]}
	return b[:size:size], nil
}

// release says a body is no longer queued anywhere; a file with none left goes (and is
// never reused, so a read-ahead window can never hold stale octets).
func (sp *spill) release(r spillRef) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	s := sp.segs[r.seg]
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
	for _, s := range sp.segs {
		sp.removeLocked(s)
	}
	sp.head = nil
	sp.wbuf = nil
}
