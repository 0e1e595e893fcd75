package amqp

// A queue's paged messages are a refQueue of diskRefs (spill.go): where each one's record is,
// in chunks, with runs of paging file records of one size stored as one reference.

// refEntry is where a diskRef's record is, as a refQueue stores it: without the id and
// expiry. It is one field of diskRef so that a diskRef has three fields and 32 octets and
// stays in registers: with six, each copy went through memory, with wide moves after
// narrow stores that stall (publish 16 B: 3 % of the broker's CPU in extend and pageOut).
type refEntry struct {
	file uint32 // the log segment or paging file
	off  uint32 // the record's offset in file; the top bit is refRedelivered
	size uint32 // the record's octets (a log record's header included)
	body uint32 // the body's octets
}

// refChunk is up to refChunkLen refs of a refQueue.
type refChunk struct {
	refs    []refEntry
	ids     []uint64 // nil while every ref here is a paging file's (id 0); else parallel to refs
	expires []int64  // nil while no ref here expires; else parallel to refs
	more    []uint32 // nil while no ref here is a run; else parallel to refs: the records after its own
}

// moreAt is how many records of its run follow the j-th ref of c.
func (c *refChunk) moreAt(j int) uint32 {
	if c.more == nil {
		return 0
	}
	return c.more[j]
}

// get returns the j-th ref of c (the first of its run).
func (c *refChunk) get(j int) diskRef {
	v := diskRef{refEntry: c.refs[j]}
	if c.ids != nil {
		v.id = c.ids[j]
	}
	if c.expires != nil {
		v.expires = c.expires[j]
	}
	return v
}

// refQueue is a FIFO of diskRefs in chunks of refChunkLen: growing never copies what it
// holds, a chunk is freed as soon as its last ref leaves, and log ids and expiry times take
// room only in chunks that have them. A queue paging a backlog grows its refQueue, in
// memory the process touches for the first time: the less each message takes, the fewer
// page faults (publish 16 B to a paging queue: 16 octets a ref rather than 24, +22 %). So
// a paging file's record that follows the last one pushed in the same file, with the same
// size and body and no expiry, is not a new ref but one more of the last one's run: a
// stream of messages of one size pages at no memory per message.
type refQueue struct {
	chunks []*refChunk // all full but the last
	head   int         // the front's index in chunks[0]
	n      int         // messages, runs counted whole
}

const refChunkLen = 2048

func (r *refQueue) len() int {
	if r == nil {
		return 0
	}
	return r.n
}

func (r *refQueue) push(v diskRef) {
	r.n++
	if r.extend(v) {
		return
	}
	if k := len(r.chunks); k == 0 || len(r.chunks[k-1].refs) == refChunkLen {
		r.chunks = append(r.chunks, &refChunk{refs: make([]refEntry, 0, refChunkLen)})
	}
	c := r.chunks[len(r.chunks)-1]
	c.refs = append(c.refs, v.refEntry)
	n := len(c.refs)
	c.ids = putColumn(c.ids, n, n-1, v.id)
	c.expires = putColumn(c.expires, n, n-1, v.expires)
	c.more = putColumn(c.more, n, n-1, 0)
}

// extend counts v into the last ref's run when v is a paging file's record that
// follows the run's last one in its file, of the same size and body, with no expiry.
func (r *refQueue) extend(v diskRef) bool {
	k := len(r.chunks)
	if k == 0 || v.id != 0 || v.expires != 0 {
		return false
	}
	c := r.chunks[k-1]
	j := len(c.refs) - 1
	last := c.get(j)
	if last.id != 0 || last.expires != 0 || last.file != v.file || last.size != v.size || last.body != v.body {
		return false
	}
	more := c.moreAt(j)
	if more == ^uint32(0) || uint64(last.off)+uint64(more+1)*uint64(last.size) != uint64(v.off) {
		return false
	}
	c.more = putColumn(c.more, len(c.refs), j, more+1)
	return true
}

// putColumn stores v at index j of col, a chunk's optional column parallel to its n refs:
// a nil col stays nil while v is zero, and is made (all zeros) for the first v that is not.
func putColumn[T comparable](col []T, n, j int, v T) []T {
	var zero T
	if col == nil {
		if v == zero {
			return nil
		}
		col = make([]T, n, refChunkLen)
	}
	col = col[:n] // push adds a ref: the column's room was made for refChunkLen
	col[j] = v
	return col
}

// locate returns the chunk and index of the i-th ref from the front, in a queue without
// runs (they form of paging files' records only; replay, which indexes, has log refs).
func (r *refQueue) locate(i int) (*refChunk, int) {
	i += r.head
	return r.chunks[i/refChunkLen], i % refChunkLen
}

// at returns the i-th ref from the front of a queue without runs.
func (r *refQueue) at(i int) diskRef {
	c, j := r.locate(i)
	return c.get(j)
}

// set replaces the i-th ref from the front of a queue without runs.
func (r *refQueue) set(i int, v diskRef) {
	c, j := r.locate(i)
	c.refs[j] = v.refEntry
	c.ids = putColumn(c.ids, len(c.refs), j, v.id)
	c.expires = putColumn(c.expires, len(c.refs), j, v.expires)
}

// front returns the first ref; r must not be empty.
func (r *refQueue) front() diskRef { return r.chunks[0].get(r.head) }

func (r *refQueue) pop() diskRef {
	c := r.chunks[0]
	v := c.get(r.head)
	r.n--
	if c.more != nil && c.more[r.head] > 0 {
		c.more[r.head]--
		c.refs[r.head].off += v.size // the run's next record
		return v
	}
	r.head++
	if r.head == len(c.refs) {
		r.chunks[0] = nil
		r.chunks = r.chunks[1:]
		r.head = 0
	}
	if r.n == 0 {
		*r = refQueue{}
	}
	return v
}

// each calls fn with every ref and its index, front first, a run's records one by one.
func (r *refQueue) each(fn func(i int, v diskRef)) {
	i := 0
	r.eachRef(func(c *refChunk, j int) bool {
		v := c.get(j)
		for k := 0; k <= int(c.moreAt(j)); k++ {
			fn(i, v)
			i++
			v.off += v.size
		}
		return true
	})
}

// eachRef calls fn with the chunk and index of every ref (a run's first record), front
// first, until fn returns false.
func (r *refQueue) eachRef(fn func(c *refChunk, j int) bool) {
	if r == nil {
		return
	}
	for k, c := range r.chunks {
		j := 0
		if k == 0 {
			j = r.head
		}
		for ; j < len(c.refs); j++ {
			if !fn(c, j) {
				return
			}
		}
	}
}

// replaceLogged calls fn with every log record's ref, front first, and keeps the file,
// offset and size it returns in its place, until fn says to stop.
func (r *refQueue) replaceLogged(fn func(v diskRef) (diskRef, bool)) {
	r.eachRef(func(c *refChunk, j int) bool {
		v := c.get(j)
		if !v.inLog() {
			return true // a log ref is never part of a run
		}
		v, more := fn(v)
		c.refs[j] = v.refEntry
		return more
	})
}
