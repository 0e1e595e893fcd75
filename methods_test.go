package amqp

import (
	"bytes"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
)

// Bool patterns for fillMethod.
const (
	bitsRandom = iota
	bitsAllFalse
	bitsAllTrue
)

// fillMethod sets every field of m to a non-zero pseudo-random value, except bools,
// which follow pattern.
func fillMethod(r *rand.Rand, m method, pattern int) {
	v := reflect.ValueOf(m).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		switch f.Kind() {
		case reflect.Bool:
			f.SetBool(pattern == bitsAllTrue || pattern == bitsRandom && r.IntN(2) == 1)
		case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			x := r.Uint64() >> (64 - f.Type().Bits())
			if x == 0 {
				x = 1
			}
			f.SetUint(x)
		case reflect.String:
			n := 1 + r.IntN(255)
			if r.IntN(4) == 0 {
				n = 255
			}
			s := make([]byte, n)
			for j := range s {
				s[j] = byte(r.Uint32())
			}
			f.SetString(string(s))
		case reflect.Map:
			f.Set(reflect.ValueOf(table{"k": int32(r.Uint32()), "s": strings.Repeat("v", 1+r.IntN(20))}))
		default:
			panic("fillMethod: unexpected field kind " + f.Kind().String())
		}
	}
}

// typeName is the Go type name the generator gives a method: "basic.recover-async" →
// "basicRecoverAsync".
func typeName(spec string) string {
	var sb strings.Builder
	for i, w := range strings.FieldsFunc(spec, func(r rune) bool { return r == '.' || r == '-' }) {
		if i > 0 {
			w = strings.ToUpper(w[:1]) + w[1:]
		}
		sb.WriteString(w)
	}
	return sb.String()
}

var classNames = map[uint32]string{
	classConnection: "connection", classChannel: "channel", classExchange: "exchange",
	classQueue: "queue", classBasic: "basic", classTx: "tx", classConfirm: "confirm",
}

func TestMethodRoundTrip(t *testing.T) {
	if len(allMethodIDs) != 64 {
		t.Errorf("allMethodIDs has %d methods, want 64", len(allMethodIDs))
	}
	r := rand.New(rand.NewPCG(1, 2))
	seen := map[uint32]bool{}
	for _, id := range allMethodIDs {
		if seen[id] {
			t.Errorf("duplicate id %d<<16|%d", id>>16, id&0xffff)
		}
		seen[id] = true
		name := methodName(id)
		m := newMethod(id)
		if m == nil || name == "unknown" {
			t.Errorf("id %d<<16|%d: newMethod = %v, methodName = %q", id>>16, id&0xffff, m, name)
			continue
		}
		if m.id() != id {
			t.Errorf("%s: id() = %#x, want %#x", name, m.id(), id)
		}
		if cls, _, _ := strings.Cut(name, "."); classNames[id>>16] != cls {
			t.Errorf("%s: class id %d is %q", name, id>>16, classNames[id>>16])
		}
		if got := reflect.TypeOf(m).Elem().Name(); got != typeName(name) {
			t.Errorf("%s: type %s, want %s", name, got, typeName(name))
		}
		for fill := range 8 {
			pattern := bitsRandom
			switch fill {
			case 0:
				pattern = bitsAllFalse
			case 1:
				pattern = bitsAllTrue
			}
			fillMethod(r, m, pattern)
			enc := m.encode(nil)
			want := []byte{byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)}
			if len(enc) < 4 || !bytes.Equal(enc[:4], want) {
				t.Fatalf("%s: encoding starts % x, want % x", name, enc[:min(4, len(enc))], want)
			}
			// encode appends: a prefix is kept. (Table keys go out in random order, so only
			// the length of the rest can be compared.)
			if enc2 := m.encode([]byte("pre")); string(enc2[:3]) != "pre" || len(enc2)-3 != len(enc) {
				t.Fatalf("%s: encode does not append", name)
			}
			got := newMethod(id)
			d := decoder{b: enc[4:]}
			got.decode(&d)
			if d.err != nil {
				t.Fatalf("%s fill %d: decode: %v\n% x", name, fill, d.err, enc)
			}
			if len(d.b) != 0 {
				t.Fatalf("%s fill %d: %d bytes left after decode", name, fill, len(d.b))
			}
			if !reflect.DeepEqual(got, m) {
				t.Fatalf("%s fill %d: round trip\n got %+v\nwant %+v", name, fill, got, m)
			}
		}
	}
}

func TestMethodTruncated(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, id := range allMethodIDs {
		name := methodName(id)
		m := newMethod(id)
		fillMethod(r, m, bitsAllTrue)
		args := m.encode(nil)[4:]
		hasFields := reflect.TypeOf(m).Elem().NumField() > 0
		if hasFields != (len(args) > 0) {
			t.Errorf("%s: %d argument bytes for a method with fields=%v", name, len(args), hasFields)
		}
		// Every field reads at least one octet and nothing is optional, so every strict
		// prefix of the arguments is short somewhere.
		for n := range len(args) {
			d := decoder{b: args[:n:n]}
			newMethod(id).decode(&d)
			if d.err == nil {
				t.Errorf("%s: decoding %d of %d argument bytes: no error", name, n, len(args))
			}
		}
		// Garbage of any length may fail but must not panic.
		for range 50 {
			junk := make([]byte, r.IntN(len(args)+8))
			for i := range junk {
				junk[i] = byte(r.Uint32())
			}
			d := decoder{b: junk}
			newMethod(id).decode(&d)
		}
	}
}

func TestBitPacking(t *testing.T) {
	// Each want is class-id, method-id, then the arguments; bit fields pack from bit 0.
	tests := []struct {
		name string
		m    method
		want []byte
	}{
		{"basic.publish mandatory", &basicPublish{Exchange: "x", RoutingKey: "rk", Mandatory: true},
			[]byte{0, 60, 0, 40, 0, 0, 1, 'x', 2, 'r', 'k', 0b01}},
		{"basic.publish immediate", &basicPublish{Exchange: "x", RoutingKey: "rk", Immediate: true},
			[]byte{0, 60, 0, 40, 0, 0, 1, 'x', 2, 'r', 'k', 0b10}},
		{"queue.declare passive", &queueDeclare{Queue: "q", Passive: true},
			[]byte{0, 50, 0, 10, 0, 0, 1, 'q', 0b00001, 0, 0, 0, 0}},
		{"queue.declare durable", &queueDeclare{Queue: "q", Durable: true},
			[]byte{0, 50, 0, 10, 0, 0, 1, 'q', 0b00010, 0, 0, 0, 0}},
		{"queue.declare exclusive", &queueDeclare{Queue: "q", Exclusive: true},
			[]byte{0, 50, 0, 10, 0, 0, 1, 'q', 0b00100, 0, 0, 0, 0}},
		{"queue.declare auto-delete", &queueDeclare{Queue: "q", AutoDelete: true},
			[]byte{0, 50, 0, 10, 0, 0, 1, 'q', 0b01000, 0, 0, 0, 0}},
		{"queue.declare no-wait", &queueDeclare{Queue: "q", NoWait: true},
			[]byte{0, 50, 0, 10, 0, 0, 1, 'q', 0b10000, 0, 0, 0, 0}},
		{"queue.declare all", &queueDeclare{Reserved1: 0x0102, Queue: "q", Passive: true, Durable: true,
			Exclusive: true, AutoDelete: true, NoWait: true},
			[]byte{0, 50, 0, 10, 1, 2, 1, 'q', 0b11111, 0, 0, 0, 0}},
		{"basic.deliver redelivered", &basicDeliver{ConsumerTag: "c", DeliveryTag: 0x0102030405060708,
			Redelivered: true, Exchange: "e", RoutingKey: "r"},
			[]byte{0, 60, 0, 60, 1, 'c', 1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 'e', 1, 'r'}},
		{"basic.deliver not redelivered", &basicDeliver{ConsumerTag: "c", DeliveryTag: 9, Exchange: "e", RoutingKey: "r"},
			[]byte{0, 60, 0, 60, 1, 'c', 0, 0, 0, 0, 0, 0, 0, 9, 0, 1, 'e', 1, 'r'}},
		{"connection.open", &connectionOpen{VirtualHost: "/", Reserved1: "ab", Reserved2: true},
			[]byte{0, 10, 0, 40, 1, '/', 2, 'a', 'b', 1}},
		{"basic.nack", &basicNack{DeliveryTag: 1, Requeue: true},
			[]byte{0, 60, 0, 120, 0, 0, 0, 0, 0, 0, 0, 1, 0b10}},
	}
	for _, tt := range tests {
		got := tt.m.encode(nil)
		if !bytes.Equal(got, tt.want) {
			t.Errorf("%s: encode\n got % x\nwant % x", tt.name, got, tt.want)
		}
		back := newMethod(tt.m.id())
		d := decoder{b: tt.want[4:]}
		back.decode(&d)
		if d.err != nil || len(d.b) != 0 || !reflect.DeepEqual(back, tt.m) {
			t.Errorf("%s: decode = %+v, err %v, %d left; want %+v", tt.name, back, d.err, len(d.b), tt.m)
		}
	}

	// Bits beyond the method's own are ignored on decode.
	var m basicPublish
	d := decoder{b: []byte{0, 0, 0, 0, 0b11111110}}
	m.decode(&d)
	if d.err != nil || m.Mandatory || !m.Immediate {
		t.Errorf("basic.publish with bits 0xfe: %+v, err %v", m, d.err)
	}
}

func TestNewMethodUnknown(t *testing.T) {
	for _, id := range []uint32{0, 10, 10 << 16, 10<<16 | 12, 60<<16 | 41, 60<<16 | 101, 40<<16 | 41,
		70<<16 | 10, 85<<16 | 20, 90<<16 | 40, 11<<16 | 10, 0xffffffff} {
		if m := newMethod(id); m != nil {
			t.Errorf("newMethod(%d<<16|%d) = %T, want nil", id>>16, id&0xffff, m)
		}
		if name := methodName(id); name != "unknown" {
			t.Errorf("methodName(%d<<16|%d) = %q, want unknown", id>>16, id&0xffff, name)
		}
	}
}

func BenchmarkDecodeBasicPublish(b *testing.B) {
	args := (&basicPublish{Exchange: "amq.topic", RoutingKey: "orders.eu.created", Mandatory: true}).encode(nil)[4:]
	var m basicPublish
	b.SetBytes(int64(len(args)))
	b.ReportAllocs()
	for b.Loop() {
		d := decoder{b: args}
		m.decode(&d)
		if d.err != nil {
			b.Fatal(d.err)
		}
	}
}

func BenchmarkEncodeBasicDeliver(b *testing.B) {
	m := basicDeliver{ConsumerTag: "amq.ctag-4Ki3Ocr9Zr5YXG1qh5TeAw", DeliveryTag: 123456,
		Redelivered: true, Exchange: "amq.topic", RoutingKey: "orders.eu.created"}
	buf := make([]byte, 0, 256)
	b.SetBytes(int64(len(m.encode(nil))))
	b.ReportAllocs()
	for b.Loop() {
		buf = m.encode(buf[:0])
	}
}
