package amqp

import (
	"bufio"
	"bytes"
	"container/list"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var errTooManyFiles = syscall.EMFILE

const (
	// readBufferSize is an active connection's read buffer. A connection starts with
	// firstReadBufferSize (the handshake's frames fit it), and again when it wakes from
	// idle, and gets readBufferSize after growReadAfter frames; one whose client keeps
	// more than half of that waiting (a busy publisher) gets busyReadBufferSize, so a
	// connection that only trickles does not hold 64 KiB.
	readBufferSize      = 16 << 10
	busyReadBufferSize  = 64 << 10
	firstReadBufferSize = 1 << 10
	growReadAfter       = 32
	// idleAfter is how long a reader waits for the next frame with its buffers: a
	// connection quiet for longer is idle, and its reader holds none (awaitInput). Short,
	// so that connections opened in a burst are soon idle; a client that sends a frame
	// every few hundred milliseconds costs a new read buffer per frame.
	idleAfter = 250 * time.Millisecond
)

// conn is one client connection. The reader goroutine (serve) owns every field not marked
// otherwise; the writer goroutine (writeLoop), which runs only while the outbox has frames,
// owns the write side of nc.
type conn struct {
	s      *Server
	id     uint64
	nc     net.Conn
	remote string

	fr          frameReader
	peek        [8]byte    // an idle reader reads here: a heartbeat, or the start of a frame
	pending     []byte     // octets of peek that the read buffer has yet to take
	probing     bool       // the next socket read waits at most idleAfter
	channels    []*channel // indexed by channel id; nil when not open
	channelMax  uint16
	frameMax    uint32
	heartbeat   atomic.Int64 // nanoseconds; set by the reader at tune-ok, read by the heartbeat sweep
	vh          *vhost
	user        string
	usage       *userUsage  // the user's open connections and channels, from connection.open
	exclusive   []*queue    // exclusive queues declared here, deleted when the connection ends
	confirms    []*channel  // channels with publishes to confirm at the next flush
	routed      []routedMsg // publishes routed and not yet enqueued (addRouted)
	routedBytes int         // the data of routed's messages (maxRoutedBytes)
	spareMsgs   []*message  // paged publishes' messages, for the next publishes (newMessage)
	spareBytes  int         // the room of spareMsgs
	parked      []*channel  // channels with confirms waiting for routed to be enqueued
	caps        clientCaps
	closing     atomic.Bool   // connection.close sent by the server; only close/close-ok count now
	opened      atomic.Bool   // the handshake finished
	shutdown    atomic.Bool   // the server is shutting down
	stop        chan struct{} // closed by closeWith: wakes a reader blocked by the memory alarm
	stopOnce    sync.Once
	readIdle    time.Duration
	peerCN      string // the verified TLS client certificate's subject CN, for EXTERNAL
	isTLS       bool   // writes go through TLS, where writev buys nothing
	preAuth     int    // octets read before login, against Config.MaxPreAuthBytes
	authed      bool
	panicked    bool          // the reader recovered from a panic: shared state may be locked
	hsEnd       time.Time     // the handshake deadline
	hsElem      *list.Element // guarded by s.mu: c in s.handshakes; nil once open or dropped
	counted     bool          // guarded by s.mu: c counts in s.open
	internal    bool          // a session of the HTTP API: not listed, not counted
	superuser   bool          // an internal session importing definitions: no permission checks
	started     time.Time     // when the socket was accepted
	clientInfo  []byte        // start-ok's client-properties, encoded (clientProperties); read by others once opened
	chMu        sync.Mutex    // guards writes to channels, and reads of it by other goroutines
	closeOkSent bool          // the reader answered the client's connection.close
	stats       connStats     // message and channel counts, summed when read (metrics.go)

	outMu      sync.Mutex
	out        []byte        // guarded by outMu: encoded frames waiting for the writer
	outv       [][]byte      // guarded by outMu: pieces before out[cut:]: cut parts of out and large bodies
	cut        int           // guarded by outMu: out[:cut] is already in outv
	outvBytes  int           // guarded by outMu: octets in outv
	pend       []delivery    // guarded by outMu: deliveries after out, for the writer to encode
	pendBytes  int           // guarded by outMu: about what pend will take encoded
	sparePend  []delivery    // guarded by outMu: the writer's second pend, kept between its runs
	outClosed  bool          // guarded by outMu: the writer is stopping; appends are dropped
	writing    bool          // guarded by outMu: a writer runs; set whenever the outbox has frames
	spare      []byte        // guarded by outMu: the writer's second buffer, kept between its runs
	outHeld    atomic.Bool   // out, outv or spare hold memory while no writer runs (releaseIdleOutbox)
	outLen     atomic.Int64  // len(out), readable without outMu
	drainWait  []*queue      // guarded by outMu: queues that stopped delivering on a full outbox
	drained    chan struct{} // one slot: the writer wrote a batch (for a reader paused on a full outbox)
	writerDone chan struct{} // closed once the outbox is closed and the last writer has ended
	wroteAt    atomic.Int64  // unix nanos of the writer's last write, for heartbeats
}

// clientProperties decodes the client-properties the client sent in start-ok.
func (c *conn) clientProperties() table {
	d := decoder{b: c.clientInfo}
	return d.table()
}

// clientCaps are the capabilities a client advertised in start-ok.
type clientCaps struct {
	authFailureClose     bool
	consumerCancelNotify bool
	connectionBlocked    bool
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		s:          s,
		id:         s.connID.Add(1),
		nc:         nc,
		remote:     nc.RemoteAddr().String(),
		channelMax: s.cfg.ChannelMax,
		frameMax:   frameMinSize,
		drained:    make(chan struct{}, 1),
		stop:       make(chan struct{}),
		writerDone: make(chan struct{}),
		started:    time.Now(),
	}
	c.fr = frameReader{r: bufio.NewReaderSize(deadlineReader{c}, firstReadBufferSize), frameMax: frameMinSize}
	c.fr.bodyDst = c.bodyDst
	c.fr.beforeLongRead = c.flushBeforeLongRead
	return c
}

// logger returns a logger that names the connection; it is made when needed, as an idle
// connection logs nothing.
func (c *conn) logger() *slog.Logger { return c.s.log.With("conn", c.id, "remote", c.remote) }

// deadlineReader pushes the read deadline forward before every read of the socket, so a
// client that stays silent for two heartbeat intervals (or the handshake timeout) is dropped.
// It costs one timer update per system call, not per frame.
type deadlineReader struct{ c *conn }

func (r deadlineReader) Read(p []byte) (int, error) {
	c := r.c
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	d := c.readIdle
	if c.probing {
		d = idleAfter
	}
	if d > 0 && !c.closing.Load() {
		c.nc.SetReadDeadline(time.Now().Add(d))
	}
	if !c.authed {
		// Never hand on an octet past the cap: the bytes before it are all that a client
		// that has not logged in gets processed.
		room := c.s.cfg.MaxPreAuthBytes - c.preAuth
		if room <= 0 {
			return 0, errPreAuthLimit
		}
		p = p[:min(len(p), room+1)]
		n, err := c.nc.Read(p)
		if n > room {
			c.preAuth += room
			return room, errPreAuthLimit
		}
		c.preAuth += n
		return n, err
	}
	return c.nc.Read(p)
}

// errPreAuthLimit ends a connection that sends too much before logging in.
var errPreAuthLimit = errors.New("amqp: too much data before authentication")

// serve runs the connection: its handshake here, then its frames on a goroutine of their
// own (readFrames). The handshake grows a goroutine's stack to 8 KiB, which it would keep
// until a collection shrinks it.
func (c *conn) serve() {
	opened := false
	defer func() {
		if !opened {
			c.end()
		}
	}()
	defer c.recoverPanic()
	if opened = c.open(); opened {
		go c.readFrames(false)
	}
}

// end tears the connection down and forgets it, after its last goroutine's work.
func (c *conn) end() {
	c.teardown()
	c.s.untrack(c)
}

// recoverPanic, deferred by the connection's goroutines, turns a panic into the end of the
// connection.
func (c *conn) recoverPanic() {
	if p := recover(); p != nil {
		// The panic may have left a lock held or a change half made, so the broker
		// carries on only as far as it safely can: it drops this connection without
		// touching shared state, and says loudly that it must be restarted.
		buf := make([]byte, 16<<10)
		buf = buf[:runtime.Stack(buf, false)]
		c.panicked = true
		// Queues must stop delivering here: closing is an atomic they check first
		// (a delivery to this connection would be lost, and a no-ack one settled).
		c.closing.Store(true)
		if c.outMu.TryLock() {
			c.closeOutboxLocked()
			c.outMu.Unlock()
		}
		c.s.setUnhealthy("connection " + strconv.FormatUint(c.id, 10) + " panicked: " + panicText(p))
		c.logger().Error("panic in connection: the broker's state is in doubt; restart it (the log replays a consistent state)",
			"panic", p, "stack", string(buf))
	}
}

// open runs the TLS and AMQP handshakes; it reports whether the connection opened.
func (c *conn) open() bool {
	c.hsEnd = time.Now().Add(c.s.cfg.HandshakeTimeout)
	c.nc.SetReadDeadline(c.hsEnd)
	if tc, ok := c.nc.(*tls.Conn); ok {
		c.isTLS = true
		tc.SetWriteDeadline(c.hsEnd)
		if err := tc.Handshake(); err != nil {
			if c.shutdown.Load() {
				c.logger().Debug("connection ended in the TLS handshake", "err", err)
			} else {
				c.logger().Warn("closing connection: TLS handshake failed", "err", err)
			}
			return false
		}
		tc.SetWriteDeadline(time.Time{})
		if st := tc.ConnectionState(); len(st.VerifiedChains) > 0 {
			c.peerCN = st.PeerCertificates[0].Subject.CommonName
		}
	}
	if err := c.handshake(); err != nil {
		c.fail(err)
		return false
	}
	c.nc.SetReadDeadline(time.Time{})
	c.readIdle = 2 * time.Duration(c.heartbeat.Load())
	c.opened.Store(true)
	// A reload removed the user or the vhost during the handshake; or, with another reload
	// since, created a vhost of the same name: c.vh is then the deleted one.
	if e := c.s.auth.Load().removed(c.user, c.vh.name); e != nil {
		c.closeWith(e)
	} else if c.vh.isDeleted() {
		c.closeWith(vhostDeleted(c.vh.name))
	}
	if c.shutdown.Load() {
		// Shutdown began during the handshake.
		c.closeWith(errShutdown)
	}
	return true
}

// readFrames reads and handles frames until the connection ends, or falls idle: then a
// fresh goroutine takes over, with the smallest stack (2 KiB, where the busy reader's has
// grown to 4 or more), to wait idle for the next input (awaitIdle) and read on.
func (c *conn) readFrames(idle bool) {
	handedOver := false
	defer func() {
		if !handedOver {
			c.end()
		}
	}()
	defer c.recoverPanic()
	var err error
	if idle {
		err = c.awaitIdle()
	}
	for err == nil {
		err = c.nextFrame()
	}
	c.flushRouted() // what the client published before it went
	switch err {
	case errIdle:
		handedOver = true
		go c.readFrames(true)
	case errConnectionClosed:
	default:
		c.fail(err)
	}
}

// errIdle hands the reading over to an idle reader.
var errIdle = errors.New("amqp: connection idle")

// nextFrame waits for the next frame, reads it and handles it.
func (c *conn) nextFrame() error {
	if err := c.awaitInput(); err != nil {
		return err
	}
	var f frame
	if err := c.fr.readInto(&f); err != nil {
		return err
	}
	if c.fr.frames < growReadAfter {
		if c.fr.frames++; c.fr.frames == growReadAfter {
			c.fr.grow(readBufferSize, deadlineReader{c})
		}
	} else if size := c.fr.r.Size(); size < busyReadBufferSize && c.fr.r.Buffered() > size/2 {
		c.fr.grow(busyReadBufferSize, deadlineReader{c})
	}
	if c.s.alarms.Load() != 0 && isPublishFrame(f) && !c.closing.Load() {
		c.blockWhileAlarm()
	}
	err := c.handleFrame(f)
	if c.fr.r.Buffered() == 0 {
		// The client has nothing more queued: enqueue what it published, and confirm the
		// batch in one ack.
		c.flushConfirms()
	}
	c.flushCountsIfDrained()
	c.pauseWhileFull()
	return err
}

// awaitInput waits for the client's next frame when none is buffered. After idleAfter
// without one the connection is idle: the reader drops its read and payload buffers, sets
// the read deadline for the idle wait, and returns errIdle. The outbox's buffers go too,
// unless a writer runs.
func (c *conn) awaitInput() error {
	if c.fr.r.Buffered() > 0 || c.closing.Load() {
		return nil
	}
	c.probing = true
	_, err := c.fr.r.Peek(1)
	c.probing = false
	if err == nil && c.readIdle == 0 && !c.closing.Load() {
		c.nc.SetReadDeadline(time.Time{}) // the probe's deadline is not the connection's
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) || c.closing.Load() {
		return err
	}
	c.fr.r, c.fr.buf = nil, nil
	c.spareMsgs, c.spareBytes = nil, 0
	if len(c.routed) == 0 {
		c.routed = nil // flushed before the reader waited; a busy reader's list is 24 KiB
	}
	if c.outHeld.Load() {
		c.releaseOutbox()
	}
	if c.readIdle > 0 { // then at least 2 s: over idleAfter
		c.nc.SetReadDeadline(time.Now().Add(c.readIdle - idleAfter))
	} else {
		c.nc.SetReadDeadline(time.Time{})
	}
	return errIdle
}

// awaitIdle is the idle reader's wait, with the deadline set and no buffers: it reads into
// c.peek. A client heartbeat is taken there (errIdle: another idle reader waits for the
// next input); other octets go first to a new read buffer (deadlineReader).
func (c *conn) awaitIdle() error {
	n, err := c.nc.Read(c.peek[:])
	if n == len(c.peek) && c.peek == heartbeatFrame && !c.closing.Load() {
		if c.readIdle > 0 {
			c.nc.SetReadDeadline(time.Now().Add(c.readIdle))
		}
		return errIdle
	}
	c.pending = c.peek[:n]
	c.fr.r = bufio.NewReaderSize(deadlineReader{c}, firstReadBufferSize)
	c.fr.frames = 0
	if n > 0 {
		return nil
	}
	return err
}

// heartbeatFrame is a whole heartbeat frame.
var heartbeatFrame = [8]byte{frameHeartbeat, 0, 0, 0, 0, 0, 0, frameEnd}

// errConnectionClosed ends the reader after a clean connection.close exchange.
var errConnectionClosed = errors.New("amqp: connection closed")

// fail ends the connection on err: an AMQP exception is sent as connection.close and the
// reader waits a little for close-ok; I/O errors end it quietly.
func (c *conn) fail(err error) {
	if err == errBadHeader || err == errAuthClosed || err == errConnectionClosed {
		return
	}
	if err == errLoginThrottled || err == errHandshakeDropped || c.shutdown.Load() && !c.opened.Load() {
		// Not checked in time, or dropped in the handshake (too many handshakes, or
		// Shutdown): no connection.close, and no wait for close-ok.
		c.logger().Debug("connection ended in its handshake", "err", err)
		return
	}
	if errors.Is(err, errPreAuthLimit) {
		c.logger().Warn("closing connection: too much data before authentication", "limit", c.s.cfg.MaxPreAuthBytes)
		return
	}
	var e *Error
	if !errors.As(err, &e) {
		if isPeerGone(err) || c.closing.Load() || c.shutdown.Load() {
			c.logger().Debug("connection ended", "err", err)
			return
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			c.logger().Warn("closing connection: no data from client", "timeout", c.readIdle.String())
			return
		}
		c.logger().Error("closing connection", "err", err)
		e = internalError(err.Error())
	}
	if c.closing.Load() {
		return
	}
	c.logger().Warn("closing connection", "code", e.Code, "text", e.Text,
		"method", methodName(uint32(e.ClassID)<<16|uint32(e.MethodID)))
	c.sendClose(e)
	c.awaitCloseOk()
}

func isPeerGone(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE)
}

// closeWith starts a server-initiated close from any goroutine: connection.close goes out,
// and the reader gives the client defaultCloseTimeout to answer close-ok.
// A connection still in its handshake is simply dropped.
func (c *conn) closeWith(e *Error) {
	if !c.opened.Load() {
		c.abandon()
		return
	}
	c.shutdown.Store(true)
	c.stopOnce.Do(func() { close(c.stop) })
	if c.sendClose(e) {
		c.nc.SetReadDeadline(time.Now().Add(defaultCloseTimeout))
	}
}

// abandon drops a connection that will not open (Server.establish refuses it) from any
// goroutine, without a word: its reader wakes from a read or from waiting its login turn,
// and ends quietly.
func (c *conn) abandon() {
	c.shutdown.Store(true)
	c.stopOnce.Do(func() { close(c.stop) })
	c.nc.SetReadDeadline(time.Now())
}

// sendClose queues connection.close once; it reports whether this call sent it.
func (c *conn) sendClose(e *Error) bool {
	if !c.closing.CompareAndSwap(false, true) {
		return false
	}
	c.send(&connectionClose{ReplyCode: e.Code, ReplyText: e.Text, ClassID: e.ClassID, MethodID: e.MethodID})
	return true
}

// awaitCloseOk reads until the client's close-ok (or close), an error, or the close timeout.
func (c *conn) awaitCloseOk() {
	c.nc.SetReadDeadline(time.Now().Add(defaultCloseTimeout))
	for {
		f, err := c.fr.read()
		if err != nil {
			return
		}
		if c.handleFrame(f) == errConnectionClosed {
			return
		}
	}
}

// teardown stops the writer after it has flushed what is queued, then closes the socket
// and every channel.
func (c *conn) teardown() {
	if c.panicked {
		// Channels, queues and the outbox may be locked by the frames of the panic:
		// close the socket (which ends the writer, unless it waits on such a lock) and
		// leave the rest as it is. Unacked messages go back at the restart.
		c.nc.Close()
		if c.vh != nil {
			c.vh.conns.Add(-1)
		}
		c.s.closeUser(c)
		return
	}
	c.outMu.Lock()
	c.closeOutboxLocked()
	c.outMu.Unlock()
	select {
	case <-c.writerDone:
		if c.closeOkSent {
			lingerClose(c.nc)
		} else {
			c.nc.Close()
		}
	case <-time.After(defaultCloseTimeout):
		c.nc.Close()
	}
	<-c.writerDone
	c.release()
	if c.vh != nil {
		c.vh.conns.Add(-1)
	}
	c.s.closeUser(c)
}

// sendCloseOk answers the client's connection.close. As in RabbitMQ, the connection's
// channels are closed first (consumers cancelled, unacked messages requeued) and its
// exclusive queues deleted, so that a client that reconnects once it has close-ok finds
// them gone. The socket then closes gently (lingerClose): the client may still be sending.
func (c *conn) sendCloseOk() {
	c.release()
	c.closeOkSent = true
	c.send(&connectionCloseOk{})
}

// release closes every channel and deletes the exclusive queues; it runs on the reader,
// at close-ok or at the end, once.
func (c *conn) release() {
	for id, ch := range c.channels {
		if ch != nil {
			ch.shutdown()
			c.dropChannel(uint16(id))
		}
	}
	for _, q := range c.exclusive {
		q.vh.deleteQueue(q)
	}
	c.exclusive = nil
}

// lingerClose closes a socket whose last frames are written without resetting it: it shuts
// its sending side, then reads what the client still sends (a heartbeat, a second close)
// until the client closes, for at most a second and 64 KiB. Closing a socket with unread
// data sends a TCP reset, which can make the client lose the close-ok it was sent.
func lingerClose(nc net.Conn) {
	if cw, ok := nc.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		nc.SetReadDeadline(time.Now().Add(time.Second))
		io.Copy(io.Discard, io.LimitReader(nc, 64<<10))
	}
	nc.Close()
}

// userUsage counts a user's open connections and channels, for the user limits of the
// definitions file (max-connections, max-channels).
type userUsage struct {
	conns    int          // guarded by Server.mu
	channels atomic.Int64 // channels open across the user's connections
}

// openUser counts a new connection of c.user against the user's max-connections (negative:
// no limit) and sets c.usage. A refusal is 530 NOT_ALLOWED with RabbitMQ's text; the caller
// sets the method.
func (s *Server) openUser(c *conn, limit int) *Error {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.users[c.user]
	if u == nil {
		u = &userUsage{}
	}
	if limit >= 0 && u.conns >= limit {
		return notAllowed("Connection refused for user '" + c.user + "': user connection limit (" + strconv.Itoa(limit) + ") is reached")
	}
	u.conns++
	s.users[c.user] = u
	c.usage = u
	return nil
}

// closeUser uncounts a connection that openUser counted; its channels are closed already.
func (s *Server) closeUser(c *conn) {
	if c.usage == nil {
		return
	}
	s.mu.Lock()
	if c.usage.conns--; c.usage.conns == 0 {
		delete(s.users, c.user)
	}
	s.mu.Unlock()
	c.usage = nil
}

// dropChannel forgets a channel that is closed, uncounting it from the user's channels.
func (c *conn) dropChannel(id uint16) {
	c.countChannelClosed(c.channels[id])
	if c.channels[id] != nil && c.usage != nil {
		c.usage.channels.Add(-1)
	}
	c.chMu.Lock()
	c.channels[id] = nil
	c.chMu.Unlock()
}

// confirmPending notes that ch has publishes to confirm at the next flush.
func (c *conn) confirmPending(ch *channel) {
	if !ch.inConfirms {
		ch.inConfirms = true
		c.confirms = append(c.confirms, ch)
	}
}

// flushConfirms confirms what the channels have routed since the last flush, once it is
// enqueued.
func (c *conn) flushConfirms() {
	c.flushRouted()
	for i, ch := range c.confirms {
		ch.inConfirms = false
		ch.flushConfirms()
		c.confirms[i] = nil
	}
	c.confirms = c.confirms[:0]
}

// flushBeforeLongRead enqueues and confirms what the client published before a frame too
// large for the read buffer (a body frame of a large message): its octets may take a
// while to come over a slow link, and the messages before it are not held back meanwhile.
// A frame that fits the buffer is not waited for this way; at most a buffer's worth of
// octets can hold a burst back.
func (c *conn) flushBeforeLongRead() {
	if c.closing.Load() {
		return // after connection.close, no confirm goes out (readFrames enqueues the rest)
	}
	if len(c.routed) > 0 || len(c.confirms) > 0 {
		c.flushConfirms()
	}
}

// readPauseWater is the outbox size past which the reader stops reading until the writer
// catches up: a client that publishes (and so earns confirms, returns or replies) but does
// not read cannot grow the outbox without bound. TCP backpressure does the rest.
const readPauseWater = 4 * outboxHighWater

// routedMsg is a message routed to a queue and not yet enqueued there.
type routedMsg struct {
	q *queue
	m *message
	// sole says the queue is all m was routed to, and nothing else holds it: not the log,
	// a delayed exchange or a direct reply. Once paged there, m is free for reuse.
	sole bool
}

// maxRouted bounds the messages a connection routes before it enqueues them: about what
// a 64 KiB read brings of small publishes, so a busy publisher's queue is locked, and its
// consumers served, once per read (e2e 16 B: +12 % against 256, and a shallower queue).
const maxRouted = 1024

// addRouted keeps m for q until the end of the client's burst of frames, or the next
// frame that is not a publish, when flushRouted enqueues it: a burst takes each queue's
// lock once, where a lock per message had the publisher's reader and the consumers'
// acks contending for it all the time.
func (c *conn) addRouted(q *queue, m *message, sole bool) {
	c.routed = append(c.routed, routedMsg{q, m, sole})
	c.routedBytes += len(m.data)
	if len(c.routed) >= maxRouted || c.routedBytes >= maxRoutedBytes {
		c.flushRouted()
	}
}

// maxRoutedBytes bounds the data a connection routes before it enqueues it, as maxRouted
// bounds the messages: a client streaming messages of several KiB, whose reads seldom end
// on a frame's end, is not held back for a thousand of them (a message's data counts once
// per queue). Messages under 4 KiB meet maxRouted first (e2e 1 KiB was 5 % slower with a
// bound of 1 MiB).
const maxRoutedBytes = 4 << 20

// flushRouted enqueues the routed messages, in order, each queue's under one hold of its
// lock.
func (c *conn) flushRouted() {
	r := c.routed
	var now int64 // the batch's clock reading (enqueueLocked), once for all of it
	if len(r) > 0 {
		now = time.Now().UnixMilli()
	}
	for i := range r {
		q := r[i].q
		if q == nil {
			continue
		}
		q.mu.Lock()
		// The dispatch judges expiry by the batch's time: a message of it that may expire
		// meets a consumer that can take it however long the batch took, with
		// x-message-ttl 0 too, as in RabbitMQ. A priority queue dispatched each message as
		// it came (enqueueLocked): what is left of them is judged by the clock.
		judge := now
		if q.ready.pri != nil {
			judge = 0
		}
		for j := i; j < len(r); j++ {
			if r[j].q == q {
				if _, paged := q.enqueueLocked(r[j].m, now); paged && r[j].sole {
					c.spareMessage(r[j].m) // its paging record is all that is left of it
				}
				r[j] = routedMsg{}
			}
		}
		if len(q.consumers) > 0 {
			q.dispatchWantedLocked(judge) // first: what a consumer takes is not dropped
		}
		q.unlockAndDispatch()
	}
	c.routed, c.routedBytes = r[:0], 0
	for i, ch := range c.parked {
		ch.unpark()
		c.parked[i] = nil
	}
	c.parked = c.parked[:0]
}

// maxSpareBytes bounds the room of the messages a connection keeps for reuse: enough for a
// batch (maxRouted) of small ones, allocations of up to 256 octets.
const maxSpareBytes = maxRouted * 256

// spareMessage keeps m, which nothing holds any more, for a later publish on c. A queue
// with no consumer pages what a publisher sends moments after it is made; reusing its
// messages, still in the processor's cache, spares a fresh allocation for each (publish
// 16 B to a paging queue: +15 %). Only a message with its data inline is kept, up to
// maxSpareBytes, until the connection falls idle; newMessage looks at the last one kept
// only, so a publisher mixing sizes reuses less.
func (c *conn) spareMessage(m *message) {
	room, i := cap(m.data), inlineClass(len(m.data))
	if i < 0 || room != inlineMessages[i].room || c.spareBytes+room > maxSpareBytes {
		return
	}
	*m = message{data: m.data[:0]}
	c.spareMsgs = append(c.spareMsgs, m)
	c.spareBytes += room
}

// newMessage is newMessage(size), reusing a spare message of the same room when the last
// one kept has it.
func (c *conn) newMessage(size int) *message {
	i := inlineClass(size)
	if i < 0 {
		return new(message)
	}
	if k := len(c.spareMsgs); k > 0 {
		if m := c.spareMsgs[k-1]; cap(m.data) == inlineMessages[i].room {
			c.spareMsgs[k-1] = nil
			c.spareMsgs = c.spareMsgs[:k-1]
			c.spareBytes -= cap(m.data)
			return m
		}
	}
	return inlineMessages[i].alloc()
}

// isPublishFrame reports whether f is part of a publish: what the memory alarm blocks.
func isPublishFrame(f frame) bool {
	switch f.typ {
	case frameHeader, frameBody:
		return true
	case frameMethod:
		id, _, err := methodHeader(f.payload)
		return err == nil && id == idBasicPublish
	}
	return false
}

// blockWhileAlarm stops reading from a client that publishes while the memory alarm is on,
// as RabbitMQ does, telling it with connection.blocked and connection.unblocked when it
// advertised them. Its other frames (acks, consumes) go on being read until it publishes.
func (c *conn) blockWhileAlarm() {
	c.s.alarmMu.Lock()
	clear, on := c.s.alarmClear, c.s.alarms.Load()
	c.s.alarmMu.Unlock()
	if on == 0 || c.closing.Load() {
		return
	}
	// Confirm what was published before the block, or clients wait out the whole alarm.
	c.flushConfirms()
	c.flushCounts()
	if c.caps.connectionBlocked {
		c.send(&connectionBlocked{Reason: blockedReason(on)})
	}
	select {
	case <-clear:
		if c.caps.connectionBlocked {
			c.send(&connectionUnblocked{})
		}
	case <-c.stop:
	case <-c.writerDone:
	}
}

// pauseWhileFull waits while the outbox is over readPauseWater.
func (c *conn) pauseWhileFull() {
	if c.outLen.Load() > readPauseWater && len(c.confirms) > 0 {
		c.flushConfirms()
	}
	for c.outLen.Load() > readPauseWater {
		c.flushRouted() // enqueued while the reader waits
		c.flushCounts()
		select {
		case <-c.drained:
		case <-c.writerDone:
			return
		}
	}
}

// handshake runs the protocol header, start/start-ok, tune/tune-ok and open/open-ok.
func (c *conn) handshake() error {
	var hdr [8]byte
	if _, err := io.ReadFull(c.fr.r, hdr[:]); err != nil {
		return err
	}
	if hdr != protocolHeader {
		// spec: answer a header we do not speak with ours, then close.
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.nc.Write(protocolHeader[:])
		c.logger().Warn("closing connection: bad protocol header", "header", strconv.Quote(string(hdr[:])))
		return errBadHeader
	}
	if n := c.s.cluster; n != nil && !n.serving() {
		// A cluster node that does not lead answers the header with connection.close 320
		// naming the leader: clients (amqp091-go) report it as is, where a refusal at
		// connection.open would be reported as a vhost error.
		return n.refusal()
	}
	c.sendFrame(c.startFrame())

	startOk := &connectionStartOk{}
	args, err := c.expectArgs(startOk)
	if err != nil {
		return err
	}
	c.caps = parseCaps(startOk.ClientProperties)
	// Kept encoded, in a third of the memory of the decoded table, for the few reads: as
	// received (the table is start-ok's first argument), not encoded again, which left its
	// growing buffer as garbage.
	c.clientInfo = bytes.Clone(args[:4+binary.BigEndian.Uint32(args)])
	src, err := c.awaitLoginTurn()
	if err != nil {
		return err
	}
	var user string
	if startOk.Mechanism == "EXTERNAL" && c.peerCN != "" {
		// The verified client certificate names the user; no password.
		user = c.peerCN
		err = c.s.auth.Load().loginTrusted("EXTERNAL", user, c.nc.RemoteAddr())
	} else {
		user, err = c.s.authenticate(startOk.Mechanism, startOk.Response, c.nc.RemoteAddr())
	}
	if reason := loginReason(err); reason != "" {
		// The failure keeps its token of the source's limit.
		c.logger().Warn("login refused", "user", user, "mechanism", startOk.Mechanism, "reason", reason)
		// A fixed pause before the answer: guessing passwords goes no faster than
		// one try per AuthFailureDelay per connection.
		time.Sleep(c.s.cfg.AuthFailureDelay)
		if !c.caps.authFailureClose {
			return errAuthClosed
		}
		return err
	}
	if c.s.logins != nil {
		c.s.logins.give(src, time.Now())
	}
	if err != nil {
		return err
	}
	c.user = user
	c.authed = true

	c.send(&connectionTune{
		ChannelMax: c.s.cfg.ChannelMax,
		FrameMax:   c.s.cfg.FrameMax,
		Heartbeat:  uint16(c.s.cfg.Heartbeat / time.Second),
	})
	tuneOk := &connectionTuneOk{}
	if err := c.expect(tuneOk); err != nil {
		return err
	}
	if err := c.tune(tuneOk); err != nil {
		return err
	}

	open := &connectionOpen{}
	if err := c.expect(open); err != nil {
		return err
	}
	db := c.s.auth.Load()
	if err := db.vhostAccess(c.user, open.VirtualHost); err != nil && !c.superuser {
		return err
	}
	c.vh = c.s.vhost(open.VirtualHost)
	if c.vh == nil {
		e := notAllowed("vhost " + open.VirtualHost + " not found")
		e.ClassID, e.MethodID = classConnection, 40
		return e
	}
	// The vhost's connection limit, then the user's, as RabbitMQ checks them. The vhost
	// limit is the stricter of Config.MaxConnectionsPerVhost and the vhost's max-connections.
	limit := stricterLimit(c.s.cfg.MaxConnectionsPerVhost, db.vhostLimit(open.VirtualHost).maxConnections)
	userLimit := db.userLimit(c.user).maxConnections
	if c.internal {
		limit, userLimit = -1, -1 // an API session: the limits are for clients
	}
	var e *Error
	if n := c.vh.conns.Add(1); limit >= 0 && n > int64(limit) {
		e = notAllowed("access to vhost '" + open.VirtualHost + "' refused for user '" + c.user + "': connection limit (" + strconv.Itoa(limit) + ") is reached")
	} else {
		e = c.s.openUser(c, userLimit)
	}
	if e != nil {
		c.vh.conns.Add(-1)
		c.vh = nil
		e.ClassID, e.MethodID = classConnection, 40
		return e
	}
	if err := c.s.establish(c); err != nil {
		c.vh.conns.Add(-1)
		c.vh = nil
		return err
	}
	c.send(&connectionOpenOk{})
	if c.s.log.Enabled(context.Background(), slog.LevelDebug) { // logger() allocates: not for every connection
		c.logger().Debug("connection open", "user", c.user, "vhost", c.vh.name,
			"frame_max", c.frameMax, "channel_max", c.channelMax, "heartbeat", time.Duration(c.heartbeat.Load()).String())
	}
	return nil
}

// startFrame returns connection.start as the server sends it, encoded once per server for
// each set of mechanisms: encoding its server properties for every connection left about
// 1.4 KB of garbage per connection, which an idle connection's RSS counted.
func (c *conn) startFrame() []byte {
	i := 0
	if c.peerCN != "" {
		i = 1 // EXTERNAL is offered
	}
	if b := c.s.startFrame[i].Load(); b != nil {
		return *b
	}
	b := appendMethodFrame(nil, 0, &connectionStart{
		VersionMajor:     0,
		VersionMinor:     9,
		ServerProperties: serverProps,
		Mechanisms:       c.s.mechanisms(c.peerCN),
		Locales:          "en_US",
	})
	c.s.startFrame[i].Store(&b)
	return b
}

var (
	errBadHeader        = errors.New("amqp: bad protocol header")
	errAuthClosed       = errors.New("amqp: login refused") // closes the socket without connection.close
	errLoginThrottled   = errors.New("amqp: login not checked: too many failed logins from the address")
	errHandshakeDropped = errors.New("amqp: handshake dropped for a newer one: too many handshakes")
)

// awaitLoginTurn takes a token of the client's source address for its login (see
// loginLimiter), waiting for its turn if the source is over Config.AuthFailureLimit. It
// fails quietly if the turn would come after the handshake deadline, which it then waits
// for, or if the connection is dropped or the server shuts down first.
func (c *conn) awaitLoginTurn() (netip.Addr, error) {
	l := c.s.logins
	if l == nil {
		return netip.Addr{}, nil
	}
	src := loginSource(c.nc.RemoteAddr())
	now := time.Now()
	at, first, ok := l.take(src, now, c.hsEnd)
	if first {
		source := src.String()
		if src.Is6() {
			source += "/64"
		}
		c.logger().Warn("throttling logins: too many failed logins from the address",
			"source", source, "limit", c.s.cfg.AuthFailureLimit)
	}
	if !ok {
		at = c.hsEnd
	}
	if wait := at.Sub(now); wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-t.C:
		case <-c.stop:
			if ok {
				l.give(src, time.Now())
			}
			return src, errLoginThrottled
		}
	}
	if !ok {
		return src, errLoginThrottled
	}
	return src, nil
}

// tune applies the client's tune-ok: zero means "the server's value", as RabbitMQ treats it,
// and anything beyond the server's limits, or a frame-max under 4096, is 530 NOT_ALLOWED.
func (c *conn) tune(t *connectionTuneOk) error {
	refuse := func(text string) error {
		e := notAllowed(text)
		e.ClassID, e.MethodID = classConnection, 31
		return e
	}
	frameMax := t.FrameMax
	if frameMax == 0 {
		frameMax = c.s.cfg.FrameMax
	}
	if frameMax < frameMinSize {
		return refuse("negotiated frame_max = " + strconv.Itoa(int(frameMax)) + " is lower than the minimum allowed value (4096)")
	}
	if frameMax > c.s.cfg.FrameMax {
		return refuse("negotiated frame_max = " + strconv.Itoa(int(frameMax)) + " is higher than the maximum allowed value (" + strconv.Itoa(int(c.s.cfg.FrameMax)) + ")")
	}
	channelMax := t.ChannelMax
	if channelMax == 0 {
		channelMax = c.s.cfg.ChannelMax
	}
	if channelMax > c.s.cfg.ChannelMax {
		return refuse("negotiated channel_max = " + strconv.Itoa(int(channelMax)) + " is higher than the maximum allowed value (" + strconv.Itoa(int(c.s.cfg.ChannelMax)) + ")")
	}
	c.frameMax, c.fr.frameMax = frameMax, frameMax
	c.channelMax = channelMax
	c.heartbeat.Store(int64(time.Duration(t.Heartbeat) * time.Second))
	return nil
}

// expect reads the next frame, which must be the method m on channel 0.
func (c *conn) expect(m method) error {
	_, err := c.expectArgs(m)
	return err
}

// expectArgs is expect that also returns m's arguments as received, valid until the next
// read.
func (c *conn) expectArgs(m method) ([]byte, error) {
	f, err := c.fr.read()
	for err == nil && f.typ == frameHeartbeat && f.channel == 0 {
		f, err = c.fr.read()
	}
	if err != nil {
		return nil, err
	}
	if f.typ != frameMethod || f.channel != 0 {
		return nil, unexpectedFrame("expected " + methodName(m.id()) + ", got a frame of type " + strconv.Itoa(int(f.typ)) + " on channel " + strconv.Itoa(int(f.channel)))
	}
	id, d, err := methodHeader(f.payload)
	if err != nil {
		return nil, err
	}
	if id == idConnectionClose {
		c.sendCloseOk()
		return nil, errConnectionClosed
	}
	if id != m.id() {
		return nil, withMethod(commandInvalid("expected "+methodName(m.id())+", got "+methodName(id)), id)
	}
	args := d.b
	m.decode(&d)
	if d.err != nil {
		return nil, withMethod(syntaxError("malformed "+methodName(id)), id)
	}
	return args, nil
}

// methodHeader splits a method frame's payload into its id and a decoder of its arguments.
func methodHeader(p []byte) (uint32, decoder, error) {
	if len(p) < 4 {
		return 0, decoder{}, frameError("method frame too short")
	}
	id := uint32(p[0])<<24 | uint32(p[1])<<16 | uint32(p[2])<<8 | uint32(p[3])
	return id, decoder{b: p[4:]}, nil
}

// withMethod sets the failing method of e.
func withMethod(e *Error, id uint32) *Error {
	e.ClassID, e.MethodID = uint16(id>>16), uint16(id)
	return e
}

// handleFrame dispatches one frame after the handshake.
func (c *conn) handleFrame(f frame) error {
	if c.closing.Load() {
		return c.handleWhileClosing(f)
	}
	switch f.typ {
	case frameHeartbeat:
		if f.channel != 0 {
			return unexpectedFrame("heartbeat frame on channel " + strconv.Itoa(int(f.channel)))
		}
		return nil
	case frameMethod:
		id, d, err := methodHeader(f.payload)
		if err != nil {
			return err
		}
		if id != idBasicPublish && len(c.routed) > 0 {
			c.flushRouted() // a method sees what was published before it
		}
		if f.channel == 0 {
			return c.connectionMethod(id, d)
		}
		ch, err := c.channelFor(f.channel, id)
		if ch == nil || err != nil {
			return err
		}
		return c.channelResult(ch, ch.handleMethod(id, d))
	case frameHeader, frameBody:
		if f.channel == 0 {
			return unexpectedFrame("content frame on channel 0")
		}
		ch := c.channel(f.channel)
		if ch == nil {
			return channelError("content frame on channel " + strconv.Itoa(int(f.channel)) + ", which is not open")
		}
		c.reapKilled(ch)
		if ch.closing {
			return nil
		}
		if f.typ == frameHeader {
			return c.channelResult(ch, ch.handleHeader(f.payload))
		}
		return c.channelResult(ch, ch.handleBody(f.payload, f.inPlace))
	}
	return frameError("unknown frame type " + strconv.Itoa(int(f.typ)))
}

// handleWhileClosing drops everything but connection.close and close-ok, as the spec asks
// of a peer that has sent connection.close.
func (c *conn) handleWhileClosing(f frame) error {
	if f.typ != frameMethod || f.channel != 0 {
		return nil
	}
	id, _, err := methodHeader(f.payload)
	if err != nil {
		return nil
	}
	switch id {
	case idConnectionCloseOk:
		return errConnectionClosed
	case idConnectionClose:
		c.sendCloseOk()
		return errConnectionClosed
	}
	return nil
}

// connectionMethod handles a method on channel 0 after the handshake.
func (c *conn) connectionMethod(id uint32, d decoder) error {
	switch id {
	case idConnectionClose:
		m := connectionClose{}
		m.decode(&d)
		c.logger().Debug("client closed connection", "code", m.ReplyCode, "text", m.ReplyText)
		c.closing.Store(true)
		c.sendCloseOk()
		return errConnectionClosed
	case idConnectionCloseOk:
		// A close-ok we did not ask for: RabbitMQ ends the connection.
		return errConnectionClosed
	case idConnectionBlocked, idConnectionUnblocked, idConnectionUpdateSecret:
		if id == idConnectionUpdateSecret {
			m := connectionUpdateSecret{}
			if m.decode(&d); d.err != nil {
				return withMethod(syntaxError("malformed connection.update-secret"), id)
			}
			c.send(&connectionUpdateSecretOk{})
			return nil
		}
		return withMethod(commandInvalid("unexpected "+methodName(id)), id)
	}
	if newMethod(id) == nil {
		return withMethod(notImplemented("unknown method "+strconv.Itoa(int(id>>16))+"."+strconv.Itoa(int(id&0xffff))), id)
	}
	if id>>16 == classConnection {
		return withMethod(commandInvalid("unexpected "+methodName(id)+" after the handshake"), id)
	}
	return withMethod(channelError("unexpected "+methodName(id)+" on channel 0"), id)
}

// bodyDst returns where a body frame goes when a channel is assembling a message with room
// for it; nil lets the frame go through the normal checks.
func (c *conn) bodyDst(id uint16, size int) []byte {
	ch := c.channel(id)
	if ch == nil || ch.closing || ch.pubMsg == nil || size == 0 {
		return nil
	}
	return ch.bodyRoom(size)
}

// openChannels counts the channels open or closing.
func (c *conn) openChannels() int {
	n := 0
	for _, ch := range c.channels {
		if ch != nil {
			n++
		}
	}
	return n
}

// openChannelList returns c's open channels, from any goroutine.
func (c *conn) openChannelList() []*channel { return c.appendOpenChannels(nil) }

// appendOpenChannels appends c's open channels to chs, from any goroutine.
func (c *conn) appendOpenChannels(chs []*channel) []*channel {
	c.chMu.Lock()
	defer c.chMu.Unlock()
	for _, ch := range c.channels {
		if ch != nil {
			chs = append(chs, ch)
		}
	}
	return chs
}

// channel returns the open channel with this id, or nil.
func (c *conn) channel(id uint16) *channel {
	if int(id) < len(c.channels) {
		return c.channels[id]
	}
	return nil
}

// reapKilled finishes the close of a channel another goroutine killed (it sent the
// channel.close): the channel's consumers and unacked messages are released, and only
// close and close-ok are taken on it from now on.
func (c *conn) reapKilled(ch *channel) {
	if ch == nil || ch.closing {
		return
	}
	if e := ch.killed.Load(); e != nil {
		c.logger().Warn("closing channel", "channel", ch.id, "code", e.Code, "text", e.Text)
		ch.shutdown()
		ch.closing = true
	}
}

// channelFor finds the channel a method is for, opening it on channel.open. It returns a nil
// channel and nil error when the frame is to be dropped.
func (c *conn) channelFor(id uint16, mid uint32) (*channel, error) {
	ch := c.channel(id)
	c.reapKilled(ch)
	if mid == idChannelOpen {
		if ch != nil {
			return nil, withMethod(channelError("second 'channel.open' seen"), mid)
		}
		// RabbitMQ counts open channels against channel-max; the spec also makes it the
		// highest channel number, so both are refused with RabbitMQ's 530.
		if n := c.openChannels(); n >= int(c.channelMax) || id > c.channelMax {
			return nil, notAllowed("number of channels opened (" + strconv.Itoa(n) + ") has reached the negotiated channel_max (" + strconv.Itoa(int(c.channelMax)) + ")")
		}
		// Then the user's max-channels, counted across all the user's connections as
		// RabbitMQ counts it, and refused with its 530 (which closes the connection).
		if u := c.usage; u != nil {
			limit := c.s.auth.Load().userLimit(c.user).maxChannels
			if n := u.channels.Add(1); limit >= 0 && n > int64(limit) {
				u.channels.Add(-1)
				return nil, notAllowed("number of channels opened for user '" + c.user + "' has reached the maximum allowed user limit of (" + strconv.Itoa(limit) + ")")
			}
		}
		c.chMu.Lock()
		if int(id) >= len(c.channels) {
			grown := make([]*channel, max(int(id)+1, 2*len(c.channels), 8))
			copy(grown, c.channels)
			c.channels = grown
		}
		c.channels[id] = newChannel(c, id)
		c.chMu.Unlock()
		c.stats.opened.Add(1)
		c.sendOn(id, &channelOpenOk{})
		return nil, nil
	}
	if ch == nil {
		if newMethod(mid) == nil {
			return nil, withMethod(notImplemented("unknown method "+strconv.Itoa(int(mid>>16))+"."+strconv.Itoa(int(mid&0xffff))), mid)
		}
		return nil, withMethod(channelError("expected 'channel.open' on channel "+strconv.Itoa(int(id))+", got "+methodName(mid)), mid)
	}
	if ch.closing {
		// spec: after channel.close, drop everything but close and close-ok.
		switch mid {
		case idChannelCloseOk:
			c.dropChannel(id)
		case idChannelClose:
			c.sendOn(id, &channelCloseOk{})
		}
		return nil, nil
	}
	return ch, nil
}

// channelResult turns a channel method's error into the right close: a soft error closes
// the channel, a hard one (returned) the connection.
func (c *conn) channelResult(ch *channel, err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) && !e.Hard() {
		c.logger().Warn("closing channel", "channel", ch.id, "code", e.Code, "text", e.Text,
			"method", methodName(uint32(e.ClassID)<<16|uint32(e.MethodID)))
		ch.shutdown()
		ch.closing = true
		c.sendOn(ch.id, &channelClose{ReplyCode: e.Code, ReplyText: e.Text, ClassID: e.ClassID, MethodID: e.MethodID})
		return nil
	}
	if err == errChannelClosed {
		c.dropChannel(ch.id)
		return nil
	}
	return err
}

// serverProps is the server-properties table of connection.start, built once: it is
// never changed.
var serverProps = serverProperties()

// serverProperties builds the server-properties table of connection.start.
func serverProperties() table {
	return table{
		"product":     "amqp-go",
		"version":     Version,
		"platform":    "Go " + runtime.Version(),
		"copyright":   "Copyright (c) the amqp-go authors",
		"information": "Licensed under the MIT license; see https://github.com/maxpert/amqp-go",
		"capabilities": table{
			"publisher_confirms":           true,
			"exchange_exchange_bindings":   true,
			"basic.nack":                   true,
			"consumer_cancel_notify":       true,
			"connection.blocked":           true,
			"authentication_failure_close": true,
			"per_consumer_qos":             true,
			"direct_reply_to":              true,
		},
		"cluster_name": "amqp-go",
	}
}

// parseCaps reads the capabilities table of the client's properties.
func parseCaps(props table) clientCaps {
	caps, _ := props["capabilities"].(table)
	return clientCaps{
		authFailureClose:     caps["authentication_failure_close"] == true,
		consumerCancelNotify: caps["consumer_cancel_notify"] == true,
		connectionBlocked:    caps["connection.blocked"] == true,
	}
}

// The outbox encoders of content-carrying methods: the method frame is written in place,
// then the message's raw properties and body, with no allocation.
