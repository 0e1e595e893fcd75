package amqp

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"math"
	"strconv"
)

// Frames on the wire (spec section 4.2.3), all integers big-endian:
//
//	+------+---------+---------+-------------------+-----------+
//	| type | channel |  size   |      payload      | frame-end |
//	|  u8  |   u16   |   u32   |    size octets    | u8 = 0xCE |
//	+------+---------+---------+-------------------+-----------+
//
//	method payload:  | class-id u16 | method-id u16 | arguments ... |
//	header payload:  | class-id u16 | weight u16 = 0 | body-size u64 | flags u16 ... | properties |
//	body payload:    | body octets |
//	heartbeat:       channel 0, size 0
//
// frame-max counts the whole frame, so a payload holds at most frameMax-8 octets; like
// RabbitMQ, the reader tolerates payloads up to frameMax from clients off by the framing.
const (
	frameMethod    = 1
	frameHeader    = 2
	frameBody      = 3
	frameHeartbeat = 8
	frameEnd       = 0xCE
	frameMinSize   = 4096
	maxFrameMax    = 16 << 20 // the largest frame-max the server accepts or offers
	frameOverhead  = 8
)

// protocolHeader is the only header this server speaks; it is also the answer to any other.
var protocolHeader = [8]byte{'A', 'M', 'Q', 'P', 0, 0, 9, 1}

// frame is one frame read from the peer; payload is valid until the next read.
type frame struct {
	typ     uint8
	channel uint16
	payload []byte
	inPlace bool // a body read straight into its message by frameReader.bodyDst
}

// frameReader reads frames from a buffered connection, reusing one payload buffer.
type frameReader struct {
	r        *bufio.Reader
	buf      []byte
	frameMax uint32 // largest whole frame accepted, including the 8 octets of overhead
	// bodyDst, when set, may return where a body frame's payload of size octets on a
	// channel goes (exactly size long), so it is read there without a copy; nil otherwise.
	bodyDst func(channel uint16, size int) []byte
	// beforeLongRead, when set, is called before a frame too large for the buffer is read
	// from the socket: its octets may take a while to come.
	beforeLongRead func()
	frames         int // frames read after the handshake, counted until the buffer grows
}

// grow gives the reader a buffer of size octets reading src, keeping what the old one
// holds: it is read first.
func (fr *frameReader) grow(size int, src io.Reader) {
	n := fr.r.Buffered()
	if n == 0 {
		fr.r = bufio.NewReaderSize(src, size)
		return
	}
	held, _ := fr.r.Peek(n)
	fr.r = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(held)), src), size)
}

// read returns the next frame. A frame over frameMax or without its frame-end octet is a
// 501 FRAME_ERROR; I/O errors are returned as they are.
func (fr *frameReader) read() (frame, error) {
	var f frame
	err := fr.readInto(&f)
	return f, err
}

// readInto is read into f, which must be zero. The connection's reader reads this way: a
// frame returned is kept in a variable with narrow stores (its type, its channel) and
// then copied with wide moves, which stalled the hot path (publish 16 B: 310 ms of
// 5.7 s on one instruction); fields stored and loaded one by one do not.
func (fr *frameReader) readInto(f *frame) error {
	h, err := fr.r.Peek(7)
	if err != nil {
		if len(h) == 0 {
			return err
		}
		return unexpectedEOF(err)
	}
	f.typ, f.channel = h[0], binary.BigEndian.Uint16(h[1:3])
	size := binary.BigEndian.Uint32(h[3:7])
	// Like RabbitMQ, allow payloads up to frame-max itself, for clients off by the 8
	// octets of framing.
	if size > fr.frameMax || size > maxFrameMax {
		return frameError("frame size " + strconv.Itoa(int(size)+frameOverhead) + " exceeds frame_max " + strconv.Itoa(int(fr.frameMax)))
	}
	n := int(size) + frameOverhead
	if n > fr.r.Size() {
		return fr.readLong(f, size)
	}
	// The buffer can hold the whole frame: its payload is returned in place, valid until
	// the next read (as one read into fr.buf is).
	b, err := fr.r.Peek(n)
	if err != nil {
		return unexpectedEOF(err)
	}
	if b[n-1] != frameEnd {
		return frameError("bad frame end marker")
	}
	fr.r.Discard(n)
	f.payload = b[7 : n-1 : n-1]
	return nil
}

// readLong reads the payload of f, a frame too large for the buffer, of size octets; its
// header is parsed (into f) but still buffered.
func (fr *frameReader) readLong(f *frame, size uint32) error {
	fr.r.Discard(7)
	if fr.beforeLongRead != nil {
		fr.beforeLongRead()
	}
	if f.typ == frameBody && fr.bodyDst != nil {
		if dst := fr.bodyDst(f.channel, int(size)); dst != nil {
			// Read the body straight into the message it belongs to.
			if _, err := io.ReadFull(fr.r, dst); err != nil {
				return unexpectedEOF(err)
			}
			end, err := fr.r.ReadByte()
			if err != nil {
				return unexpectedEOF(err)
			}
			if end != frameEnd {
				return frameError("bad frame end marker")
			}
			f.payload, f.inPlace = dst, true
			return nil
		}
	}
	if cap(fr.buf) < int(size)+1 {
		fr.buf = make([]byte, int(size)+1, max(int(size)+1, 512))
	}
	b := fr.buf[:size+1]
	if _, err := io.ReadFull(fr.r, b); err != nil {
		return unexpectedEOF(err)
	}
	if b[size] != frameEnd {
		return frameError("bad frame end marker")
	}
	f.payload = b[:size]
	return nil
}

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// appendFrameStart appends a frame header with a zero size; appendFrameEnd patches the size
// and appends the end octet. Between them the caller appends the payload.
func appendFrameStart(b []byte, typ uint8, channel uint16) []byte {
	return append(b, typ, byte(channel>>8), byte(channel), 0, 0, 0, 0)
}

// appendFrameEnd finishes a frame started at offset start.
func appendFrameEnd(b []byte, start int) []byte {
	binary.BigEndian.PutUint32(b[start+3:], uint32(len(b)-start-7))
	return append(b, frameEnd)
}

// appendMethodFrame appends a complete method frame.
func appendMethodFrame(b []byte, channel uint16, m method) []byte {
	start := len(b)
	b = appendFrameStart(b, frameMethod, channel)
	b = m.encode(b)
	return appendFrameEnd(b, start)
}

// appendHeartbeat appends a heartbeat frame.
func appendHeartbeat(b []byte) []byte {
	return append(b, frameHeartbeat, 0, 0, 0, 0, 0, 0, frameEnd)
}

// appendContent appends a content header frame carrying raw properties (flags included)
// and the body split into body frames of at most frameMax-8 octets.
func appendContent(b []byte, channel uint16, props []byte, body []byte, frameMax uint32) []byte {
	start := len(b)
	b = appendFrameStart(b, frameHeader, channel)
	b = append(b, 0, classBasic, 0, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(len(body)))
	if len(props) == 0 {
		b = append(b, 0, 0)
	} else {
		b = append(b, props...)
	}
	b = appendFrameEnd(b, start)
	chunk := int(frameMax) - frameOverhead
	for len(body) > 0 {
		n := min(len(body), chunk)
		b = append(b, frameBody, byte(channel>>8), byte(channel))
		b = binary.BigEndian.AppendUint32(b, uint32(n))
		b = append(b, body[:n]...)
		b = append(b, frameEnd)
		body = body[n:]
	}
	return b
}

// method is the arguments of one AMQP method; methods.go has a type for each method of the
// spec, generated from the spec XML by gen_methods.go.
type method interface {
	// id is class-id<<16 | method-id.
	id() uint32
	// decode reads the arguments; a short or malformed payload leaves d.err set.
	decode(d *decoder)
	// encode appends class-id, method-id and the arguments.
	encode(b []byte) []byte
}

// decoder reads method arguments and field values from a payload. The first error sticks:
// every later read returns a zero value, and err says what went wrong.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = errSyntax
	}
	d.b = nil
}

func (d *decoder) octet() uint8 {
	if len(d.b) < 1 {
		d.fail()
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) short() uint16 {
	if len(d.b) < 2 {
		d.fail()
		return 0
	}
	v := binary.BigEndian.Uint16(d.b)
	d.b = d.b[2:]
	return v
}

func (d *decoder) long() uint32 {
	if len(d.b) < 4 {
		d.fail()
		return 0
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

func (d *decoder) longlong() uint64 {
	if len(d.b) < 8 {
		d.fail()
		return 0
	}
	v := binary.BigEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

// bytes returns the next n octets without copying.
func (d *decoder) bytes(n int) []byte {
	if n < 0 || len(d.b) < n {
		d.fail()
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

// shortstrBytes returns a short string without copying; it aliases the payload.
func (d *decoder) shortstrBytes() []byte {
	return d.bytes(int(d.octet()))
}

func (d *decoder) shortstr() string {
	b := d.shortstrBytes()
	if len(b) == 0 {
		return ""
	}
	return string(b)
}

func (d *decoder) longstr() string {
	n := d.long()
	if uint64(n) > uint64(len(d.b)) {
		d.fail()
		return ""
	}
	return string(d.bytes(int(n)))
}

// table decodes a field table. A nil table and an empty one both decode as nil.
func (d *decoder) table() table {
	return d.tableDepth(0)
}

func (d *decoder) tableDepth(depth int) table {
	n := d.long()
	if uint64(n) > uint64(len(d.b)) || depth > maxTableDepth {
		d.fail()
		return nil
	}
	if n == 0 {
		return nil
	}
	sub := decoder{b: d.bytes(int(n))}
	t := make(table)
	for len(sub.b) > 0 && sub.err == nil {
		key := sub.shortstr()
		v := sub.value(depth)
		if sub.err != nil {
			break
		}
		t[key] = v
	}
	if sub.err != nil {
		d.err = sub.err
		d.b = nil
		return nil
	}
	return t
}

func (d *decoder) array(depth int) []any {
	n := d.long()
	if uint64(n) > uint64(len(d.b)) || depth > maxTableDepth {
		d.fail()
		return nil
	}
	sub := decoder{b: d.bytes(int(n))}
	a := []any{}
	for len(sub.b) > 0 && sub.err == nil {
		v := sub.value(depth)
		if sub.err != nil {
			break
		}
		a = append(a, v)
	}
	if sub.err != nil {
		d.err = sub.err
		d.b = nil
		return nil
	}
	return a
}

// value decodes one typed field value as RabbitMQ encodes it.
func (d *decoder) value(depth int) any {
	switch t := d.octet(); t {
	case 't':
		return d.octet() != 0
	case 'b':
		return int8(d.octet())
	case 'B':
		return d.octet()
	case 's':
		return int16(d.short())
	case 'u':
		return d.short()
	case 'I':
		return int32(d.long())
	case 'i':
		return d.long()
	case 'l':
		return int64(d.longlong())
	case 'f':
		return math.Float32frombits(d.long())
	case 'd':
		return math.Float64frombits(d.longlong())
	case 'D':
		scale := d.octet()
		return decimal{Scale: scale, Value: int32(d.long())}
	case 'S':
		return d.longstr()
	case 'x':
		n := d.long()
		return append([]byte{}, d.bytes(int(min(n, math.MaxInt32)))...)
	case 'A':
		return d.array(depth + 1)
	case 'T':
		return timestamp(d.longlong())
	case 'F':
		t := d.tableDepth(depth + 1)
		if t == nil {
			t = table{}
		}
		return t
	case 'V':
		return nil
	default:
		d.fail()
		return nil
	}
}

// fieldType names a decoded field value's type as RabbitMQ does in its error texts
// (rabbit_binary_parser): longstr, bool, signedint, and so on.
func fieldType(v any) string {
	switch v.(type) {
	case bool:
		return "bool"
	case int8:
		return "byte"
	case uint8:
		return "unsignedbyte"
	case int16:
		return "short"
	case uint16:
		return "unsignedshort"
	case int32:
		return "signedint"
	case uint32:
		return "unsignedint"
	case int64:
		return "long"
	case float32:
		return "float"
	case float64:
		return "double"
	case decimal:
		return "decimal"
	case string:
		return "longstr"
	case []byte:
		return "binary"
	case []any:
		return "array"
	case timestamp:
		return "timestamp"
	case table:
		return "table"
	case nil:
		return "void"
	}
	return "unknown"
}

// maxTableDepth bounds nesting of tables and arrays so a hostile frame cannot recurse deeply.
const maxTableDepth = 16

// table is an AMQP field table. Values have the Go type of their wire type:
//
//	t bool      b int8    B uint8   s int16   u uint16   I int32    i uint32
//	l int64     f float32 d float64 D decimal S string   x []byte   A []any
//	T timestamp F table   V nil
type table map[string]any

// decimal is a field value of type D: Value / 10^Scale.
type decimal struct {
	Scale uint8
	Value int32
}

// timestamp is a field value of type T: seconds since the Unix epoch.
type timestamp uint64

func appendShort(b []byte, v uint16) []byte    { return binary.BigEndian.AppendUint16(b, v) }
func appendLong(b []byte, v uint32) []byte     { return binary.BigEndian.AppendUint32(b, v) }
func appendLonglong(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

// appendShortstr appends a short string, cut to 255 octets.
func appendShortstr(b []byte, s string) []byte {
	if len(s) > 255 {
		s = s[:255]
	}
	b = append(b, byte(len(s)))
	return append(b, s...)
}

func appendLongstr(b []byte, s string) []byte {
	b = appendLong(b, uint32(len(s)))
	return append(b, s...)
}

// appendTable appends a field table; its keys go out in no particular order.
func appendTable(b []byte, t table) []byte {
	start := len(b)
	b = append(b, 0, 0, 0, 0)
	for k, v := range t {
		b = appendShortstr(b, k)
		b = appendValue(b, v)
	}
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4))
	return b
}

// appendValue appends a typed field value. Go types with no wire type of their own are
// mapped to the nearest one (int to l, uint64 to l); anything else encodes as void.
func appendValue(b []byte, v any) []byte {
	switch v := v.(type) {
	case bool:
		if v {
			return append(b, 't', 1)
		}
		return append(b, 't', 0)
	case int8:
		return append(b, 'b', byte(v))
	case uint8:
		return append(b, 'B', v)
	case int16:
		return appendShort(append(b, 's'), uint16(v))
	case uint16:
		return appendShort(append(b, 'u'), v)
	case int32:
		return appendLong(append(b, 'I'), uint32(v))
	case uint32:
		return appendLong(append(b, 'i'), v)
	case int64:
		return appendLonglong(append(b, 'l'), uint64(v))
	case int:
		return appendLonglong(append(b, 'l'), uint64(v))
	case uint64:
		return appendLonglong(append(b, 'l'), v)
	case float32:
		return appendLong(append(b, 'f'), math.Float32bits(v))
	case float64:
		return appendLonglong(append(b, 'd'), math.Float64bits(v))
	case decimal:
		return appendLong(append(b, 'D', v.Scale), uint32(v.Value))
	case string:
		return appendLongstr(append(b, 'S'), v)
	case []byte:
		b = appendLong(append(b, 'x'), uint32(len(v)))
		return append(b, v...)
	case []any:
		b = append(b, 'A')
		start := len(b)
		b = append(b, 0, 0, 0, 0)
		for _, e := range v {
			b = appendValue(b, e)
		}
		binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4))
		return b
	case timestamp:
		return appendLonglong(append(b, 'T'), uint64(v))
	case table:
		return appendTable(append(b, 'F'), v)
	}
	return append(b, 'V')
}

// Basic content properties: the flag bits in the content header, in wire order.
const (
	flagContentType     = 1 << 15
	flagContentEncoding = 1 << 14
	flagHeaders         = 1 << 13
	flagDeliveryMode    = 1 << 12
	flagPriority        = 1 << 11
	flagCorrelationID   = 1 << 10
	flagReplyTo         = 1 << 9
	flagExpiration      = 1 << 8
	flagMessageID       = 1 << 7
	flagTimestamp       = 1 << 6
	flagType            = 1 << 5
	flagUserID          = 1 << 4
	flagAppID           = 1 << 3
	flagReserved        = 1 << 2
)

// properties are the 14 basic properties, decoded. The hot path keeps them as raw bytes
// (see scanProperties); this form is for building messages and for tests.
type properties struct {
	ContentType     string
	ContentEncoding string
	Headers         table
	DeliveryMode    uint8
	Priority        uint8
	CorrelationID   string
	ReplyTo         string
	Expiration      string
	MessageID       string
	Timestamp       uint64
	Type            string
	UserID          string
	AppID           string
	Reserved        string
	flags           uint16 // which fields are present; set by decode, or computed by encode
}

// encode appends the property flags and the present properties. A string property is
// present when non-empty, a number when non-zero, headers when non-nil.
func (p *properties) encode(b []byte) []byte {
	var f uint16
	set := func(ok bool, bit uint16) {
		if ok {
			f |= bit
		}
	}
	set(p.ContentType != "", flagContentType)
	set(p.ContentEncoding != "", flagContentEncoding)
	set(p.Headers != nil, flagHeaders)
	set(p.DeliveryMode != 0, flagDeliveryMode)
	set(p.Priority != 0, flagPriority)
	set(p.CorrelationID != "", flagCorrelationID)
	set(p.ReplyTo != "", flagReplyTo)
	set(p.Expiration != "", flagExpiration)
	set(p.MessageID != "", flagMessageID)
	set(p.Timestamp != 0, flagTimestamp)
	set(p.Type != "", flagType)
	set(p.UserID != "", flagUserID)
	set(p.AppID != "", flagAppID)
	set(p.Reserved != "", flagReserved)
	b = appendShort(b, f)
	if f&flagContentType != 0 {
		b = appendShortstr(b, p.ContentType)
	}
	if f&flagContentEncoding != 0 {
		b = appendShortstr(b, p.ContentEncoding)
	}
	if f&flagHeaders != 0 {
		b = appendTable(b, p.Headers)
	}
	if f&flagDeliveryMode != 0 {
		b = append(b, p.DeliveryMode)
	}
	if f&flagPriority != 0 {
		b = append(b, p.Priority)
	}
	if f&flagCorrelationID != 0 {
		b = appendShortstr(b, p.CorrelationID)
	}
	if f&flagReplyTo != 0 {
		b = appendShortstr(b, p.ReplyTo)
	}
	if f&flagExpiration != 0 {
		b = appendShortstr(b, p.Expiration)
	}
	if f&flagMessageID != 0 {
		b = appendShortstr(b, p.MessageID)
	}
	if f&flagTimestamp != 0 {
		b = appendLonglong(b, p.Timestamp)
	}
	if f&flagType != 0 {
		b = appendShortstr(b, p.Type)
	}
	if f&flagUserID != 0 {
		b = appendShortstr(b, p.UserID)
	}
	if f&flagAppID != 0 {
		b = appendShortstr(b, p.AppID)
	}
	if f&flagReserved != 0 {
		b = appendShortstr(b, p.Reserved)
	}
	return b
}

// decode reads property flags and properties. A continuation flag (bit 0) is a syntax error:
// basic has only 14 properties.
func (p *properties) decode(d *decoder) {
	f := d.short()
	if f&0b11 != 0 {
		d.fail()
		return
	}
	*p = properties{flags: f}
	if f&flagContentType != 0 {
		p.ContentType = d.shortstr()
	}
	if f&flagContentEncoding != 0 {
		p.ContentEncoding = d.shortstr()
	}
	if f&flagHeaders != 0 {
		p.Headers = d.table()
		if p.Headers == nil && d.err == nil {
			p.Headers = table{}
		}
	}
	if f&flagDeliveryMode != 0 {
		p.DeliveryMode = d.octet()
	}
	if f&flagPriority != 0 {
		p.Priority = d.octet()
	}
	if f&flagCorrelationID != 0 {
		p.CorrelationID = d.shortstr()
	}
	if f&flagReplyTo != 0 {
		p.ReplyTo = d.shortstr()
	}
	if f&flagExpiration != 0 {
		p.Expiration = d.shortstr()
	}
	if f&flagMessageID != 0 {
		p.MessageID = d.shortstr()
	}
	if f&flagTimestamp != 0 {
		p.Timestamp = d.longlong()
	}
	if f&flagType != 0 {
		p.Type = d.shortstr()
	}
	if f&flagUserID != 0 {
		p.UserID = d.shortstr()
	}
	if f&flagAppID != 0 {
		p.AppID = d.shortstr()
	}
	if f&flagReserved != 0 {
		p.Reserved = d.shortstr()
	}
}

// propsSummary is what routing and queues need of a message's properties.
type propsSummary struct {
	deliveryMode uint8
	priority     uint8
	expiration   []byte // aliases the raw properties
	headers      []byte // the raw headers table (with its length prefix), nil when absent
	headersAt    int    // the offset of headers in the raw properties
	userID       []byte // aliases the raw properties; nil when absent
	replyTo      []byte // aliases the raw properties; nil when absent
	replyToAt    int    // the offset of reply-to's length octet in the raw properties
}

// scanProperties validates raw properties (flags first) without allocating and returns
// the fields the broker acts on. Unknown flag bits or a malformed field are a syntax error.
func scanProperties(raw []byte) (propsSummary, error) {
	var s propsSummary
	err := s.scan(raw)
	return s, err
}

// scan is scanProperties into s, which must be zero: the publish path's header scans
// into its own variable, as a copy of the returned summary stalled on its narrow stores.
func (s *propsSummary) scan(raw []byte) error {
	d := decoder{b: raw}
	f := d.short()
	if f&0b11 != 0 {
		return errSyntax
	}
	if f&flagContentType != 0 {
		d.shortstrBytes()
	}
	if f&flagContentEncoding != 0 {
		d.shortstrBytes()
	}
	if f&flagHeaders != 0 {
		before := d.b
		d.skipTable(0)
		if d.err == nil {
			s.headers, s.headersAt = before[:len(before)-len(d.b)], len(raw)-len(before)
		}
	}
	if f&flagDeliveryMode != 0 {
		s.deliveryMode = d.octet()
	}
	if f&flagPriority != 0 {
		s.priority = d.octet()
	}
	if f&flagCorrelationID != 0 {
		d.shortstrBytes()
	}
	if f&flagReplyTo != 0 {
		s.replyToAt = len(raw) - len(d.b)
		s.replyTo = d.shortstrBytes()
	}
	if f&flagExpiration != 0 {
		s.expiration = d.shortstrBytes()
	}
	if f&flagMessageID != 0 {
		d.shortstrBytes()
	}
	if f&flagTimestamp != 0 {
		d.longlong()
	}
	if f&flagType != 0 {
		d.shortstrBytes()
	}
	if f&flagUserID != 0 {
		s.userID = d.shortstrBytes()
	}
	for _, bit := range [...]uint16{flagAppID, flagReserved} {
		if f&bit != 0 {
			d.shortstrBytes()
		}
	}
	if d.err != nil {
		*s = propsSummary{}
		return d.err
	}
	return nil
}

// skipTable checks a field table's structure without allocating.
func (d *decoder) skipTable(depth int) {
	n := d.long()
	if depth > maxTableDepth {
		d.fail()
		return
	}
	sub := decoder{b: d.bytes(int(min(n, math.MaxInt32)))}
	for len(sub.b) > 0 && sub.err == nil {
		sub.shortstrBytes()
		sub.skipValue(depth)
	}
	if sub.err != nil {
		d.fail()
	}
}

func (d *decoder) skipValue(depth int) {
	switch d.octet() {
	case 't', 'b', 'B':
		d.bytes(1)
	case 's', 'u':
		d.bytes(2)
	case 'I', 'i', 'f':
		d.bytes(4)
	case 'l', 'd', 'T':
		d.bytes(8)
	case 'D':
		d.bytes(5)
	case 'S', 'x':
		d.bytes(int(min(d.long(), math.MaxInt32)))
	case 'A':
		n := d.long()
		if depth+1 > maxTableDepth {
			d.fail()
			return
		}
		sub := decoder{b: d.bytes(int(min(n, math.MaxInt32)))}
		for len(sub.b) > 0 && sub.err == nil {
			sub.skipValue(depth + 1)
		}
		if sub.err != nil {
			d.fail()
		}
	case 'F':
		d.skipTable(depth + 1)
	case 'V':
	default:
		d.fail()
	}
}
