package amqp

import (
	"bufio"
	"encoding/binary"
	"errors"
	"net"
	"time"
)

// A session is an AMQP connection the broker opens to itself over an in-memory pipe, to
// carry out an HTTP API request as the user who made it: a declare, delete, bind, purge,
// publish or get goes through the same connection and channel code as a client's, with
// the same permission checks and RabbitMQ's answers, rather than a second implementation of
// each. It logs in with PLAIN, from the HTTP client's address (so guest stays on
// loopback), and is not listed among the connections. A session is used by one goroutine.
type session struct {
	nc       net.Conn
	fr       frameReader
	out      []byte
	frameMax uint32
	chOpen   bool // channel 1 is open
	confirm  bool // channel 1 is in confirm mode
	dead     error
}

// sessionWait bounds each exchange with the broker, so a stuck queue cannot hold an HTTP
// request forever.
const sessionWait = 30 * time.Second

// pipeConn is the broker's end of a session: a pipe that reports the HTTP client's address.
type pipeConn struct {
	net.Conn
	remote net.Addr
}

func (p pipeConn) RemoteAddr() net.Addr { return p.remote }

// openSession logs user in to vhost over a new pipe from remote, and opens channel 1. A
// superuser session skips the permission checks, as RabbitMQ's definitions import does.
func (s *Server) openSession(user, password, vhost string, remote net.Addr, superuser bool) (*session, error) {
	client, server := net.Pipe()
	c := newConn(s, pipeConn{server, remote})
	c.internal, c.superuser = true, superuser
	if _, _, ok := s.track(c); !ok {
		client.Close()
		server.Close()
		return nil, ErrServerClosed
	}
	go c.serve()
	ss := &session{nc: client, fr: frameReader{r: bufio.NewReaderSize(client, 64<<10), frameMax: frameMinSize}, frameMax: frameMinSize}
	if err := ss.handshake(user, password, vhost); err != nil {
		ss.close()
		return nil, err
	}
	return ss, nil
}

func (ss *session) handshake(user, password, vhost string) error {
	ss.nc.SetDeadline(time.Now().Add(sessionWait))
	if _, err := ss.nc.Write(protocolHeader[:]); err != nil {
		return err
	}
	if _, err := ss.expect(0, idConnectionStart); err != nil {
		return err
	}
	ss.send(0, &connectionStartOk{Mechanism: "PLAIN", Response: "\x00" + user + "\x00" + password, Locale: "en_US",
		ClientProperties: table{"product": "amqp-go management", "capabilities": table{"publisher_confirms": true}}})
	m, err := ss.expect(0, idConnectionTune)
	if err != nil {
		return err
	}
	tune := m.(*connectionTune)
	ss.frameMax = tune.FrameMax
	ss.fr.frameMax = tune.FrameMax
	ss.send(0, &connectionTuneOk{ChannelMax: tune.ChannelMax, FrameMax: tune.FrameMax})
	ss.send(0, &connectionOpen{VirtualHost: vhost})
	if _, err := ss.expect(0, idConnectionOpenOk); err != nil {
		return err
	}
	return ss.openChannel()
}

func (ss *session) openChannel() error {
	ss.send(1, &channelOpen{})
	if _, err := ss.expect(1, idChannelOpenOk); err != nil {
		return err
	}
	ss.chOpen, ss.confirm = true, false
	return nil
}

// close ends the session: connection.close, then the pipe.
func (ss *session) close() {
	if ss.dead == nil {
		ss.nc.SetDeadline(time.Now().Add(time.Second))
		ss.send(0, &connectionClose{ReplyCode: replySuccess, ReplyText: "done"})
		for ss.dead == nil {
			if _, _, err := ss.next(); err != nil {
				break
			}
		}
	}
	ss.nc.Close()
}

// send writes a method frame. A write error ends the session; the next read reports it.
func (ss *session) send(channel uint16, m method) {
	ss.out = appendMethodFrame(ss.out[:0], channel, m)
	if _, err := ss.nc.Write(ss.out); err != nil && ss.dead == nil {
		ss.dead = err
	}
}

// next reads the next frame that is not a heartbeat and returns it with its method, if it
// is a method frame. connection.close ends the session with its error.
func (ss *session) next() (frame, method, error) {
	if ss.dead != nil {
		return frame{}, nil, ss.dead
	}
	for {
		f, err := ss.fr.read()
		if err != nil {
			ss.dead = err
			return f, nil, err
		}
		if f.typ == frameHeartbeat {
			continue
		}
		if f.typ != frameMethod {
			return f, nil, nil
		}
		id, d, err := methodHeader(f.payload)
		if err != nil {
			ss.dead = err
			return f, nil, err
		}
		m := newMethod(id)
		if m == nil {
			ss.dead = errors.New("amqp: session: unknown method")
			return f, nil, ss.dead
		}
		if m.decode(&d); d.err != nil {
			ss.dead = d.err
			return f, nil, d.err
		}
		switch m := m.(type) {
		case *connectionClose:
			ss.out = appendMethodFrame(ss.out[:0], 0, &connectionCloseOk{})
			ss.nc.Write(ss.out)
			e := newError(m.ReplyCode, m.ReplyText)
			if m.ReplyCode == replySuccess {
				ss.dead = errors.New("amqp: session closed")
			} else {
				ss.dead = e
			}
			return f, nil, ss.dead
		case *connectionCloseOk:
			ss.dead = errors.New("amqp: session closed")
			return f, nil, ss.dead
		case *channelClose:
			ss.send(1, &channelCloseOk{})
			ss.chOpen = false
			e := newError(m.ReplyCode, m.ReplyText)
			e.ClassID, e.MethodID = m.ClassID, m.MethodID
			return f, nil, e
		}
		return f, m, nil
	}
}

// expect reads the next method, which must be id on channel.
func (ss *session) expect(channel uint16, id uint32) (method, error) {
	f, m, err := ss.next()
	if err != nil {
		return nil, err
	}
	if m == nil || m.id() != id || f.channel != channel {
		ss.dead = errors.New("amqp: session: unexpected frame")
		return nil, ss.dead
	}
	return m, nil
}

// call sends a synchronous method on channel 1, reopening it after an exception, and
// returns the reply, or the channel or connection exception as an *Error.
func (ss *session) call(m method, reply uint32) (method, error) {
	if err := ss.ready(); err != nil {
		return nil, err
	}
	ss.send(1, m)
	return ss.expect(1, reply)
}

// ready reopens channel 1 if an exception closed it, and pushes the deadline on.
func (ss *session) ready() error {
	if ss.dead != nil {
		return ss.dead
	}
	ss.nc.SetDeadline(time.Now().Add(sessionWait))
	if !ss.chOpen {
		return ss.openChannel()
	}
	return nil
}

// publish publishes a message, mandatory, in confirm mode, and reports whether it was
// routed to a queue.
func (ss *session) publish(exchange, key string, props *properties, body []byte) (routed bool, err error) {
	if err := ss.ready(); err != nil {
		return false, err
	}
	if !ss.confirm {
		if _, err := ss.call(&confirmSelect{}, idConfirmSelectOk); err != nil {
			return false, err
		}
		ss.confirm = true
	}
	b := appendMethodFrame(ss.out[:0], 1, &basicPublish{Exchange: exchange, RoutingKey: key, Mandatory: true})
	ss.out = appendContent(b, 1, props.encode(nil), body, ss.frameMax)
	if _, err := ss.nc.Write(ss.out); err != nil {
		ss.dead = err
		return false, err
	}
	routed = true
	for {
		_, m, err := ss.next()
		if err != nil {
			return false, err
		}
		switch m := m.(type) {
		case *basicReturn:
			routed = false
			if _, _, err := ss.content(); err != nil {
				return false, err
			}
		case *basicAck:
			return routed, nil
		case *basicNack:
			return false, internalError("the message was not accepted (nack)")
		case nil:
		default:
			_ = m
		}
	}
}

// content reads a content header and its body frames.
func (ss *session) content() (props properties, body []byte, err error) {
	f, m, err := ss.next()
	if err != nil {
		return props, nil, err
	}
	if m != nil || f.typ != frameHeader || len(f.payload) < 14 {
		ss.dead = errors.New("amqp: session: want a content header")
		return props, nil, ss.dead
	}
	size := binary.BigEndian.Uint64(f.payload[4:12])
	d := decoder{b: f.payload[12:]}
	props.decode(&d)
	body = make([]byte, 0, size)
	for uint64(len(body)) < size {
		f, m, err := ss.next()
		if err != nil {
			return props, nil, err
		}
		if m != nil || f.typ != frameBody {
			ss.dead = errors.New("amqp: session: want a content body")
			return props, nil, ss.dead
		}
		body = append(body, f.payload...)
	}
	return props, body, nil
}

// gotMessage is a message basic.get took.
type gotMessage struct {
	ok    *basicGetOk
	props properties
	body  []byte
}

// get takes one message from queue, with acks (settle acks, rejects or requeues it) or
// without; ok is false when the queue is empty.
func (ss *session) get(queue string, noAck bool) (*gotMessage, error) {
	m, err := ss.callAny(&basicGet{Queue: queue, NoAck: noAck}, idBasicGetOk, idBasicGetEmpty)
	if err != nil || m.id() == idBasicGetEmpty {
		return nil, err
	}
	g := &gotMessage{ok: m.(*basicGetOk)}
	g.props, g.body, err = ss.content()
	return g, err
}

// callAny is call with two possible replies.
func (ss *session) callAny(m method, reply1, reply2 uint32) (method, error) {
	if err := ss.ready(); err != nil {
		return nil, err
	}
	ss.send(1, m)
	f, r, err := ss.next()
	if err != nil {
		return nil, err
	}
	if r == nil || f.channel != 1 || r.id() != reply1 && r.id() != reply2 {
		ss.dead = errors.New("amqp: session: unexpected frame")
		return nil, ss.dead
	}
	return r, nil
}
