package amqp

import (
	"slices"
	"testing"
)

// The refQueue, a paging queue's index of references (refqueue.go): order, runs, the
// optional columns, and walks, against plain slices.

// TestRefQueue: a refQueue gives back every ref as pushed or set, in order, across chunks
// that take log ids and expiry times only once some ref has one, and empties as it pops.
func TestRefQueue(t *testing.T) {
	ref := func(i int) diskRef {
		v := diskRef{refEntry: refEntry{file: uint32(i % 7), off: uint32(i * 3), size: uint32(i + 1), body: uint32(i)}}
		if i%5000 > 3000 { // log refs from the middle of the second chunk on, for a while
			v.id = uint64(1e9 + i)
		}
		if i%3000 == 2999 {
			v.expires = int64(i)
		}
		return v
	}
	var r refQueue
	const n = 3*refChunkLen + 100
	for i := range n {
		r.push(ref(i))
	}
	r.set(10, ref(8999))           // an id and an expiry into a chunk that had neither
	r.set(refChunkLen+5, ref(n+5)) // a paging file's ref among log refs
	want := func(i int) diskRef {
		switch i {
		case 10:
			return ref(8999)
		case refChunkLen + 5:
			return ref(n + 5)
		}
		return ref(i)
	}
	if r.len() != n {
		t.Fatalf("len %d, want %d", r.len(), n)
	}
	for i := range n {
		if got := r.at(i); got != want(i) {
			t.Fatalf("at(%d) = %+v, want %+v", i, got, want(i))
		}
	}
	for i := range n {
		if got := r.pop(); got != want(i) {
			t.Fatalf("pop %d = %+v, want %+v", i, got, want(i))
		}
	}
	if r.len() != 0 || r.chunks != nil {
		t.Fatalf("after popping all: len %d, %d chunks", r.len(), len(r.chunks))
	}
}

// TestRefQueueRuns: consecutive paging file records of one size take one ref between them,
// and come back one by one as pushed; anything else (another size, file or gap, a log
// record, an expiry) starts a new ref, and a run pushed onto after partial pops goes on.
func TestRefQueueRuns(t *testing.T) {
	var r refQueue
	var pushed []diskRef
	push := func(v diskRef) {
		r.push(v)
		pushed = append(pushed, v)
	}
	entries := func() int {
		n := 0
		for i, c := range r.chunks {
			n += len(c.refs)
			if i == 0 {
				n -= r.head
			}
		}
		return n
	}
	run := func(file, off, size, count uint32) uint32 {
		for range count {
			push(diskRef{refEntry: refEntry{file: file, off: off, size: size, body: size - 20}})
			off += size
		}
		return off
	}
	off := run(1, 0, 100, 5000) // one run
	if entries() != 1 || r.len() != 5000 {
		t.Fatalf("5,000 records of one size: %d refs for %d messages, want 1 for 5,000", entries(), r.len())
	}
	off = run(1, off, 60, 3)                                                             // another size: a new run
	off = run(1, off+1, 60, 2)                                                           // a gap: a new run
	push(diskRef{refEntry: refEntry{file: 1, off: off, size: 60, body: 40}, expires: 7}) // an expiry: a ref of its own
	off += 60
	push(diskRef{id: 9, refEntry: refEntry{file: 1, off: off, size: 60, body: 40}}) // a log record
	off += 60
	run(1, off, 60, 2) // follows a log ref: a new run
	run(2, 0, 60, 3)   // another file
	if want := 7; entries() != want {
		t.Fatalf("%d refs, want %d", entries(), want)
	}
	for i := range 4990 { // into the first run; then it grows no more, the last ref does
		if got := r.pop(); got != pushed[i] {
			t.Fatalf("pop %d = %+v, want %+v", i, got, pushed[i])
		}
	}
	run(2, 180, 60, 4000) // the last run goes on, across no new chunk
	if want := 7; entries() != want || r.len() != len(pushed)-4990 {
		t.Fatalf("after popping 4,990 and pushing 4,000: %d refs for %d messages, want %d for %d", entries(), r.len(), want, len(pushed)-4990)
	}
	for i := 4990; i < len(pushed); i++ {
		if got := r.front(); got != pushed[i] {
			t.Fatalf("front %d = %+v, want %+v", i, got, pushed[i])
		}
		if got := r.pop(); got != pushed[i] {
			t.Fatalf("pop %d = %+v, want %+v", i, got, pushed[i])
		}
	}
	if r.len() != 0 || r.chunks != nil {
		t.Fatalf("after popping all: len %d, %d chunks", r.len(), len(r.chunks))
	}
}

// TestRefQueueRunsAmongLogRefs: across several chunks of runs and log refs, with the run
// at the front partly popped, each gives every message left in order, and replaceLogged
// sees every log ref (never a run's record) and keeps where it moved them.
func TestRefQueueRunsAmongLogRefs(t *testing.T) {
	var r refQueue
	var pushed []diskRef
	off := uint32(0)
	for i := range 3*refChunkLen + 7 { // a log ref, then a run of three paging records
		log := diskRef{id: uint64(1000 + i), refEntry: refEntry{file: 9, off: uint32(i * 50), size: 50, body: 10}}
		r.push(log)
		pushed = append(pushed, log)
		for range 3 {
			v := diskRef{refEntry: refEntry{file: 1, off: off, size: 40, body: 20}}
			off += 40
			r.push(v)
			pushed = append(pushed, v)
		}
		off += 1 // the next run does not follow this one
	}
	r.pop() // the first log ref
	r.pop() // the first record of the run after it
	pushed = pushed[2:]
	var got []diskRef
	r.each(func(i int, v diskRef) {
		if i != len(got) {
			t.Fatalf("each gave index %d after %d refs", i, len(got))
		}
		got = append(got, v)
	})
	if !slices.Equal(got, pushed) {
		t.Fatalf("each gave %d refs, want the %d left in order", len(got), len(pushed))
	}
	seen := 0
	r.replaceLogged(func(v diskRef) (diskRef, bool) {
		if !v.inLog() {
			t.Fatalf("replaceLogged gave a paging file's ref %+v", v)
		}
		seen++
		v.file, v.off = 10, v.off+1
		return v, true
	})
	if want := 3*refChunkLen + 6; seen != want {
		t.Fatalf("replaceLogged saw %d log refs, want %d", seen, want)
	}
	for i, want := range pushed {
		if want.inLog() {
			want.file, want.off = 10, want.off+1
		}
		if v := r.pop(); v != want {
			t.Fatalf("pop %d = %+v, want %+v", i, v, want)
		}
	}
	if r.len() != 0 {
		t.Fatalf("%d left after popping all", r.len())
	}
}

// FuzzRefQueue drives a refQueue with pushes (records that extend the last run, and ones
// that cannot: a gap, another file or size, a log record, an expiry), pops, and walks,
// against a plain slice of the refs pushed.
func FuzzRefQueue(f *testing.F) {
	f.Add([]byte{0, 0, 0, 4, 0, 0, 1, 4, 4, 7})
	f.Add([]byte{0, 0, 0, 0, 2, 0, 0, 3, 0, 4, 4, 4, 6, 7, 4, 4, 4})
	f.Add([]byte{5, 0, 0, 0, 1, 1, 0, 0, 4, 4, 7, 0, 0, 6})
	f.Add([]byte{48, 0, 4, 4, 4, 4, 112, 7, 41, 4, 6, 56, 7})
	f.Add([]byte{48, 48, 48, 48, 48, 4, 7, 4, 4, 6, 7}) // past a chunk
	f.Add([]byte{0, 5 * 8, 0, 0, 6, 4, 4, 7, 6, 4, 7})  // a log ref between runs
	f.Fuzz(func(t *testing.T, ops []byte) {
		var r refQueue
		var model []diskRef
		var last diskRef // the last paging file record pushed
		last.file, last.size, last.body = 1, 40, 20
		nextID := uint64(1)
		push := func(kind byte) {
			v := last
			v.off = last.off + last.size // follows the last one: extends its run
			switch kind {
			case 1:
				v.off++ // a gap
			case 2:
				v.file, v.off = v.file+1, 0 // the next paging file
			case 3:
				v.size, v.body = v.size+8, v.body+8 // another size
			case 4:
				v.expires = int64(v.off) + 1
			case 5:
				v = diskRef{id: nextID, refEntry: refEntry{file: 7, off: uint32(nextID) * 64, size: 64, body: 30}} // a log record
				nextID++
			}
			if !v.inLog() {
				last = v
			}
			r.push(v)
			model = append(model, v)
		}
		for i := 0; i < len(ops); i++ {
			op := ops[i]
			switch op % 8 {
			case 0, 1, 2, 3, 5:
				if kind := op / 8 % 8; kind < 6 {
					push(kind)
				} else if len(model) < 4*refChunkLen { // bounded: each input stays quick
					for k := range refChunkLen / 2 { // a quarter chunk or more of refs, runs among them
						push(byte(k % (int(op/64) + 2)))
					}
				}
			case 4, 6:
				if len(model) == 0 {
					continue
				}
				if got := r.front(); got != model[0] {
					t.Fatalf("op %d: front %+v, want %+v", i, got, model[0])
				}
				if op%8 == 4 {
					if got := r.pop(); got != model[0] {
						t.Fatalf("op %d: pop %+v, want %+v", i, got, model[0])
					}
					model = model[1:]
				}
			case 7:
				var got []diskRef
				r.each(func(_ int, v diskRef) { got = append(got, v) })
				if !slices.Equal(got, model) {
					t.Fatalf("op %d: each gave %v, want %v", i, got, model)
				}
				r.replaceLogged(func(v diskRef) (diskRef, bool) {
					v.off += 1 << 20 // as compaction moves a log record
					return v, true
				})
				for k := range model {
					if model[k].inLog() {
						model[k].off += 1 << 20
					}
				}
			}
			if r.len() != len(model) {
				t.Fatalf("op %d: len %d, want %d", i, r.len(), len(model))
			}
		}
		for k, want := range model {
			if got := r.pop(); got != want {
				t.Fatalf("draining, pop %d = %+v, want %+v", k, got, want)
			}
		}
		if r.len() != 0 || r.chunks != nil {
			t.Fatalf("drained: len %d, %d chunks", r.len(), len(r.chunks))
		}
	})
}
