package amqp

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// The virtual host: its exchanges and queues, their deletion, and the durable topology it
// logs; the server's table of virtual hosts.

// vhost holds one virtual host's exchanges, queues and bindings. mu guards the topology:
// the two maps and every exchange's bindings. Publishers hold it for reading while routing,
// except while they match a topic exchange's trie, which has a lock of its own.
type vhost struct {
	name  string
	store *store // nil when nothing is durable
	// pageOut is how much memory (message.memCost) a queue's ready messages may take before
	// it keeps new ones on disk (in the log, or the paging files); negative: no limit.
	pageOut int64
	spill   *spill         // the paging files; nil without a data directory
	alarms  *atomic.Uint32 // the server's resource alarms; nil in tests
	clock   *atomic.Int64  // the server's coarse clock; nil in tests
	dead    *deadLetters   // the server's dead-letter worker; nil in tests
	conns   atomic.Int64   // open connections, for Config.MaxConnectionsPerVhost
	metrics *serverMetrics // the server's counters; nil in tests

	mu        sync.RWMutex
	exchanges map[string]*exchange // guarded by mu
	queues    map[string]*queue    // guarded by mu
	policies  *policySet           // guarded by mu: nil when none
	deleted   bool                 // guarded by mu: a reload deleted it; nothing is declared or bound in it
}

func newVhost(name string) *vhost {
	vh := &vhost{name: name, exchanges: make(map[string]*exchange), queues: make(map[string]*queue), pageOut: defaultPageOut}
	// Every vhost has these, as in RabbitMQ.
	for _, x := range []struct{ name, kind string }{
		{"", kindDirect},
		{"amq.direct", kindDirect},
		{"amq.fanout", kindFanout},
		{"amq.topic", kindTopic},
		{"amq.headers", kindHeaders},
		{"amq.match", kindHeaders},
	} {
		vh.exchanges[x.name] = newExchange(x.name, x.kind, true, false, false, nil)
	}
	return vh
}

// memoryHigh reports whether the memory alarm is on: then every queue pages.
func (vh *vhost) memoryHigh() bool {
	return vh.alarms != nil && vh.alarms.Load()&alarmMemory != 0
}

// newVhost makes a vhost of the server: its store and paging files, its memory share,
// alarms and dead-letter worker. s.mu must be held, or s not yet serving.
func (s *Server) newVhost(name string) *vhost {
	vh := newVhost(name)
	vh.store, vh.spill, vh.pageOut, vh.alarms, vh.dead = s.store, s.spill, s.cfg.PageOutBytes, &s.alarms, s.dead
	vh.metrics = &s.metrics
	vh.clock = &s.clock
	return vh
}

// now is the server's coarse clock (Unix milliseconds, 100 ms steps), or the time.
func (vh *vhost) now() int64 {
	if vh.clock != nil {
		return vh.clock.Load()
	}
	return time.Now().UnixMilli()
}

// log is the logger for vh's queues' disk errors.
func (vh *vhost) log() *slog.Logger {
	switch {
	case vh.store != nil:
		return vh.store.log
	case vh.dead != nil:
		return vh.dead.s.log
	}
	return slog.Default()
}

// markDeleted refuses every later declare and bind in vh with vhostDeleted.
func (vh *vhost) markDeleted() {
	vh.mu.Lock()
	vh.deleted = true
	vh.mu.Unlock()
}

func (vh *vhost) isDeleted() bool {
	vh.mu.RLock()
	defer vh.mu.RUnlock()
	return vh.deleted
}

// deleteAll empties a virtual host a reload deleted, as RabbitMQ does: its queues go with
// their messages (consumers get basic.cancel), then its exchanges and every binding. The
// durable ones are logged as deleted, so a virtual host of the same name created later
// starts with only the predeclared exchanges, now and after a restart. vh must be marked
// deleted first, so that nothing new appears in it meanwhile. It returns the number of
// queues deleted.
func (vh *vhost) deleteAll() int {
	vh.mu.RLock()
	queues := make([]*queue, 0, len(vh.queues))
	for _, q := range vh.queues {
		queues = append(queues, q)
	}
	vh.mu.RUnlock()
	for _, q := range queues {
		vh.deleteQueue(q) // takes vh.mu itself
	}
	vh.mu.Lock()
	defer vh.mu.Unlock()
	for _, x := range vh.exchanges {
		// deleteExchangeLocked may also delete auto-delete exchanges further on in the map,
		// which the range then skips.
		if !predeclared(x.name) {
			vh.deleteExchangeLocked(x)
		}
	}
	// A vhost of the same name declares the predeclared exchanges again, so they are not
	// logged as deleted; only the bindings left between them are, which would come back
	// in it after a restart.
	for _, x := range vh.exchanges {
		for len(x.bindings) > 0 {
			b := x.bindings[len(x.bindings)-1]
			if x.removeBindingLocked(b); durableBinding(b) {
				vh.logLocked(recUnbind, bindRecord(vh.name, b))
			}
		}
	}
	return len(queues)
}

// deleteExchangeLocked removes x and its bindings both ways. vh.mu must be held.
func (vh *vhost) deleteExchangeLocked(x *exchange) {
	if x.deleted {
		return
	}
	x.deleted = true
	delete(vh.exchanges, x.name)
	if x.durable {
		vh.logLocked(recExchangeDelete, append(appendShortstr(nil, vh.name), appendShortstr(nil, x.name)...))
	}
	if x.delay != nil {
		vh.dropHeldLocked(x)
	}
	for len(x.bindings) > 0 {
		x.removeBindingLocked(x.bindings[len(x.bindings)-1])
	}
	for len(x.incoming) > 0 {
		b := x.incoming[len(x.incoming)-1]
		b.source.removeBindingLocked(b)
		vh.autoDeleteLocked(b.source)
	}
}

// autoDeleteLocked deletes an auto-delete exchange that has lost its last binding.
// vh.mu must be held.
func (vh *vhost) autoDeleteLocked(x *exchange) {
	if x.autoDelete && len(x.bindings) == 0 {
		vh.deleteExchangeLocked(x)
	}
}

// deleteQueue removes q with its bindings (and auto-delete exchanges left unbound), drops
// its messages, and cancels its consumers. It returns the number of ready messages dropped.
func (vh *vhost) deleteQueue(q *queue) int { return vh.deleteQueueIf(q, nil) }

// deleteQueueIf is deleteQueue when unused (q.mu held) still says so, checked with vh.mu
// held, so that nothing can find and use the queue in between.
func (vh *vhost) deleteQueueIf(q *queue, unused func() bool) int {
	defer vh.lockScans()()
	vh.mu.Lock()
	if vh.queues[q.name] != q {
		vh.mu.Unlock()
		return 0
	}
	if unused != nil {
		q.mu.Lock()
		ok := unused()
		q.mu.Unlock()
		if !ok {
			vh.mu.Unlock()
			return 0
		}
	}
	delete(vh.queues, q.name)
	if q.walID != 0 {
		vh.logLocked(recQueueDelete, binary.BigEndian.AppendUint64(nil, q.walID))
	}
	for len(q.bindings) > 0 {
		b := q.bindings[len(q.bindings)-1]
		b.source.removeBindingLocked(b)
		vh.autoDeleteLocked(b.source)
	}
	vh.mu.Unlock()

	q.mu.Lock()
	q.deleted = true
	vh.countQueueDeletedLocked(q)
	if q.expiry != nil {
		q.expiry.Stop()
		q.expiry = nil
	}
	n := q.messageCountLocked()
	if q.walID != 0 && vh.store != nil {
		vh.store.dropQueue(q, q.readyLoggedLocked())
	}
	q.dropTailLocked(false)
	q.ready.clear()
	q.requeued = nil
	q.readyBytes, q.ramBytes = 0, 0
	consumers := q.consumers
	q.consumers = nil
	q.mu.Unlock()
	for _, c := range consumers {
		c.ch.cancelByServer(c)
	}
	return n
}

// logLocked appends a topology record if the vhost is durable-backed. vh.mu must be held.
func (vh *vhost) logLocked(typ uint8, payload []byte) {
	if vh.store != nil {
		vh.store.appendTopology(typ, payload)
	}
}

// syncTopology waits until the topology records appended so far are on disk.
func (vh *vhost) syncTopology() error {
	if vh.store == nil {
		return nil
	}
	if vh.store.w.noSpace.Load() {
		// The disk is full: the record waits with the others for room, whether or not the
		// reserve would take it, so the answer does not depend on the writer's timing.
		return logUnwritable(errNoSpace)
	}
	if err := vh.store.sync(); err != nil {
		return logUnwritable(err)
	}
	return nil
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

// vhost returns the virtual host with this name, or nil.
func (s *Server) vhost(name string) *vhost {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.vhosts[name]
}

// deleteVhosts deletes what the virtual hosts in gone hold, which loadAuth has marked
// deleted and whose connections it has closed, then forgets them. The deletions are on
// disk when it returns, so a restart does not bring the data back.
func (s *Server) deleteVhosts(gone []*vhost) error {
	if len(gone) == 0 {
		return nil
	}
	names := make([]string, 0, len(gone))
	for _, vh := range gone {
		n := vh.deleteAll()
		s.mu.Lock()
		if s.vhosts[vh.name] == vh {
			delete(s.vhosts, vh.name)
		}
		s.mu.Unlock()
		names = append(names, vh.name)
		s.log.Info("vhost deleted with its queues, exchanges and messages", "vhost", vh.name, "queues", n)
	}
	s.mu.Lock()
	w := s.store
	s.mu.Unlock()
	if w != nil {
		if err := w.sync(); err != nil {
			return fmt.Errorf("amqp: logging the deletion of vhosts %q: %w", names, err)
		}
	}
	return nil
}
