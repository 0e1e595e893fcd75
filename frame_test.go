package amqp

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// fieldValuesEqual compares decoded field values: tables as maps (key order is random on
// the wire), arrays element by element, floats by their bits so that NaN equals itself.
// A nil table or array differs from an empty one, and types must match exactly.
func fieldValuesEqual(a, b any) bool {
	switch a := a.(type) {
	case table:
		b, ok := b.(table)
		if !ok || (a == nil) != (b == nil) || len(a) != len(b) {
			return false
		}
		for k, av := range a {
			bv, ok := b[k]
			if !ok || !fieldValuesEqual(av, bv) {
				return false
			}
		}
		return true
	case []any:
		b, ok := b.([]any)
		if !ok || (a == nil) != (b == nil) || len(a) != len(b) {
			return false
		}
		for i := range a {
			if !fieldValuesEqual(a[i], b[i]) {
				return false
			}
		}
		return true
	case []byte:
		b, ok := b.([]byte)
		return ok && (a == nil) == (b == nil) && bytes.Equal(a, b)
	case float32:
		b, ok := b.(float32)
		return ok && math.Float32bits(a) == math.Float32bits(b)
	case float64:
		b, ok := b.(float64)
		return ok && math.Float64bits(a) == math.Float64bits(b)
	}
	return reflect.DeepEqual(a, b)
}

// propertiesEqual compares decoded properties, headers with fieldValuesEqual. The flags
// are compared only when withFlags is set: encode drops present-but-empty fields.
func propertiesEqual(a, b *properties, withFlags bool) bool {
	if !fieldValuesEqual(a.Headers, b.Headers) {
		return false
	}
	x, y := *a, *b
	x.Headers, y.Headers = nil, nil
	if !withFlags {
		x.flags, y.flags = 0, 0
	}
	return reflect.DeepEqual(x, y)
}

// methodsEqual compares two decoded methods field by field, tables with fieldValuesEqual.
func methodsEqual(a, b method) bool {
	va, vb := reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem()
	if va.Type() != vb.Type() {
		return false
	}
	for i := range va.NumField() {
		fa, fb := va.Field(i).Interface(), vb.Field(i).Interface()
		if ta, ok := fa.(table); ok {
			if !fieldValuesEqual(ta, fb) {
				return false
			}
			continue
		}
		if !reflect.DeepEqual(fa, fb) {
			return false
		}
	}
	return true
}

// appendSortedTable encodes a table with its keys in sorted order, at every level, so
// tests and seeds get the same bytes on every run.
func appendSortedTable(b []byte, t table) []byte {
	start := len(b)
	b = append(b, 0, 0, 0, 0)
	keys := make([]string, 0, len(t))
	for k := range t {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		b = appendShortstr(b, k)
		b = appendSortedValue(b, t[k])
	}
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4))
	return b
}

func appendSortedValue(b []byte, v any) []byte {
	switch v := v.(type) {
	case table:
		return appendSortedTable(append(b, 'F'), v)
	case []any:
		b = append(b, 'A')
		start := len(b)
		b = append(b, 0, 0, 0, 0)
		for _, e := range v {
			b = appendSortedValue(b, e)
		}
		binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4))
		return b
	}
	return appendValue(b, v)
}

// bytesPerRun reports the bytes allocated per call of f, averaged over runs calls.
func bytesPerRun(runs int, f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / uint64(runs)
}

// be32 is a big-endian u32, for building wire bytes by hand.
func be32(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }

// cat concatenates byte slices and strings.
func cat(parts ...any) []byte {
	var b []byte
	for _, p := range parts {
		switch p := p.(type) {
		case []byte:
			b = append(b, p...)
		case string:
			b = append(b, p...)
		case byte:
			b = append(b, p)
		case int:
			b = append(b, byte(p))
		case rune:
			b = append(b, byte(p))
		default:
			panic("cat: unexpected part")
		}
	}
	return b
}

// fieldValueCases are field values as RabbitMQ encodes them: the Go value and its wire
// bytes, type tag first.
var fieldValueCases = []struct {
	name string
	v    any
	wire []byte
}{
	{"t true", true, []byte{'t', 1}},
	{"t false", false, []byte{'t', 0}},
	{"b negative", int8(-2), []byte{'b', 0xfe}},
	{"b min", int8(math.MinInt8), []byte{'b', 0x80}},
	{"b max", int8(math.MaxInt8), []byte{'b', 0x7f}},
	{"B", uint8(0xff), []byte{'B', 0xff}},
	{"B zero", uint8(0), []byte{'B', 0}},
	{"s negative", int16(-2), []byte{'s', 0xff, 0xfe}},
	{"s min", int16(math.MinInt16), []byte{'s', 0x80, 0x00}},
	{"s positive", int16(0x0102), []byte{'s', 0x01, 0x02}},
	{"u", uint16(0xfffe), []byte{'u', 0xff, 0xfe}},
	{"I negative", int32(-1), []byte{'I', 0xff, 0xff, 0xff, 0xff}},
	{"I min", int32(math.MinInt32), []byte{'I', 0x80, 0, 0, 0}},
	{"I positive", int32(0x01020304), []byte{'I', 1, 2, 3, 4}},
	{"i", uint32(0xdeadbeef), []byte{'i', 0xde, 0xad, 0xbe, 0xef}},
	{"l negative", int64(-2), []byte{'l', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe}},
	{"l min", int64(math.MinInt64), []byte{'l', 0x80, 0, 0, 0, 0, 0, 0, 0}},
	{"l positive", int64(0x0102030405060708), []byte{'l', 1, 2, 3, 4, 5, 6, 7, 8}},
	{"f", float32(1.5), []byte{'f', 0x3f, 0xc0, 0, 0}},
	{"f negative", float32(-0.25), []byte{'f', 0xbe, 0x80, 0, 0}},
	{"d negative", float64(-2.5), []byte{'d', 0xc0, 0x04, 0, 0, 0, 0, 0, 0}},
	{"d +Inf", math.Inf(1), []byte{'d', 0x7f, 0xf0, 0, 0, 0, 0, 0, 0}},
	{"d negative zero", math.Copysign(0, -1), []byte{'d', 0x80, 0, 0, 0, 0, 0, 0, 0}},
	{"D", decimal{Scale: 2, Value: 12345}, []byte{'D', 2, 0, 0, 0x30, 0x39}},
	{"D negative", decimal{Scale: 255, Value: -12345}, []byte{'D', 0xff, 0xff, 0xff, 0xcf, 0xc7}},
	{"S", "héllo", []byte{'S', 0, 0, 0, 6, 'h', 0xc3, 0xa9, 'l', 'l', 'o'}},
	{"S empty", "", []byte{'S', 0, 0, 0, 0}},
	{"S with NUL", "a\x00b", []byte{'S', 0, 0, 0, 3, 'a', 0, 'b'}},
	{"A empty", []any{}, []byte{'A', 0, 0, 0, 0}},
	{"A nested", []any{int32(1), "a", []any{true}, table{"k": nil}}, []byte{'A', 0, 0, 0, 26,
		'I', 0, 0, 0, 1,
		'S', 0, 0, 0, 1, 'a',
		'A', 0, 0, 0, 2, 't', 1,
		'F', 0, 0, 0, 3, 1, 'k', 'V'}},
	{"A of empties", []any{[]any{}, table{}, "", []byte{}}, []byte{'A', 0, 0, 0, 20,
		'A', 0, 0, 0, 0, 'F', 0, 0, 0, 0, 'S', 0, 0, 0, 0, 'x', 0, 0, 0, 0}},
	{"T", timestamp(1700000000), []byte{'T', 0, 0, 0, 0, 0x65, 0x53, 0xf1, 0x00}},
	{"T max", timestamp(math.MaxUint64), []byte{'T', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
	{"F empty", table{}, []byte{'F', 0, 0, 0, 0}},
	{"F nested", table{"a": table{"b": int8(-1)}}, []byte{'F', 0, 0, 0, 11,
		1, 'a', 'F', 0, 0, 0, 4, 1, 'b', 'b', 0xff}},
	{"F empty key and string", table{"": ""}, []byte{'F', 0, 0, 0, 6, 0, 'S', 0, 0, 0, 0}},
	{"V", nil, []byte{'V'}},
	{"x", []byte{0, 1, 0xff}, []byte{'x', 0, 0, 0, 3, 0, 1, 0xff}},
	{"x empty", []byte{}, []byte{'x', 0, 0, 0, 0}},
}

func TestTableValueEncode(t *testing.T) {
	for _, tt := range fieldValueCases {
		if got := appendValue(nil, tt.v); !bytes.Equal(got, tt.wire) {
			t.Errorf("%s: appendValue(%#v)\n got % x\nwant % x", tt.name, tt.v, got, tt.wire)
		}
		if got := appendValue([]byte("pre"), tt.v); string(got[:3]) != "pre" || !bytes.Equal(got[3:], tt.wire) {
			t.Errorf("%s: appendValue does not append: % x", tt.name, got)
		}
	}
}

func TestTableValueDecode(t *testing.T) {
	for _, tt := range fieldValueCases {
		d := decoder{b: append(slices.Clip(tt.wire), "rest"...)}
		got := d.value(0)
		if d.err != nil {
			t.Errorf("%s: decode % x: %v", tt.name, tt.wire, d.err)
			continue
		}
		if !reflect.DeepEqual(got, tt.v) || !fieldValuesEqual(got, tt.v) {
			t.Errorf("%s: decode % x = %#v (%T), want %#v (%T)", tt.name, tt.wire, got, got, tt.v, tt.v)
		}
		if string(d.b) != "rest" {
			t.Errorf("%s: decode left %q, want \"rest\"", tt.name, d.b)
		}
		// skipValue walks the same bytes.
		s := decoder{b: append(slices.Clip(tt.wire), "rest"...)}
		s.skipValue(0)
		if s.err != nil || string(s.b) != "rest" {
			t.Errorf("%s: skipValue: err %v, left %q", tt.name, s.err, s.b)
		}
	}
}

func TestTableValueDecodeOnly(t *testing.T) {
	tests := []struct {
		name string
		wire []byte
		want any
	}{
		{"t 2 is true", []byte{'t', 2}, true},
		{"t 0xff is true", []byte{'t', 0xff}, true},
		{"x one byte", []byte{'x', 0, 0, 0, 1, 7}, []byte{7}},
	}
	for _, tt := range tests {
		d := decoder{b: tt.wire}
		got := d.value(0)
		if d.err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: decode % x = %#v, %v; want %#v", tt.name, tt.wire, got, d.err, tt.want)
		}
	}
	// A decoded byte array is a copy: changing the payload afterwards does not change it.
	wire := []byte{'x', 0, 0, 0, 2, 'a', 'b'}
	d := decoder{b: wire}
	v := d.value(0).([]byte)
	wire[5] = 'z'
	if string(v) != "ab" {
		t.Errorf("decoded x aliases the payload: %q", v)
	}
}

func TestTableValueEncodeMapped(t *testing.T) {
	// Go types with no wire type of their own.
	tests := []struct {
		name string
		v    any
		want []byte
	}{
		{"int", int(-3), []byte{'l', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfd}},
		{"uint64", uint64(math.MaxUint64), []byte{'l', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		{"struct", struct{}{}, []byte{'V'}},
		{"map[string]any", map[string]any{"a": 1}, []byte{'V'}},
	}
	for _, tt := range tests {
		if got := appendValue(nil, tt.v); !bytes.Equal(got, tt.want) {
			t.Errorf("%s: appendValue(%#v) = % x, want % x", tt.name, tt.v, got, tt.want)
		}
	}
}

func TestTableValueNaN(t *testing.T) {
	// Floats keep their bits, NaN payloads included.
	for _, bits := range []uint64{0x7ff8000000000001, 0xfff0000000000abc, 0x7ff0000000000001} {
		v := math.Float64frombits(bits)
		d := decoder{b: appendValue(nil, v)}
		got, ok := d.value(0).(float64)
		if !ok || d.err != nil || math.Float64bits(got) != bits {
			t.Errorf("d %#x: decoded %#x, %v", bits, math.Float64bits(got), d.err)
		}
	}
	for _, bits := range []uint32{0x7fc00001, 0xffc00000} {
		v := math.Float32frombits(bits)
		d := decoder{b: appendValue(nil, v)}
		got, ok := d.value(0).(float32)
		if !ok || d.err != nil || math.Float32bits(got) != bits {
			t.Errorf("f %#x: decoded %#x, %v", bits, math.Float32bits(got), d.err)
		}
	}
	if !fieldValuesEqual(table{"n": math.NaN()}, table{"n": math.NaN()}) {
		t.Error("fieldValuesEqual: NaN differs from itself")
	}
	if fieldValuesEqual(table{"n": float64(1)}, table{"n": float32(1)}) {
		t.Error("fieldValuesEqual: float64 equals float32")
	}
}

func TestTableEncodeDecode(t *testing.T) {
	key255 := strings.Repeat("k", 255)
	tests := []struct {
		name string
		t    table
		wire []byte // sorted by key; only checked against appendTable for tables of ≤1 key
		want table  // decoded; nil means tt.t
	}{
		{"nil", nil, []byte{0, 0, 0, 0}, nil},
		{"empty", table{}, []byte{0, 0, 0, 0}, nil},
		{"one", table{"a": int32(1)}, []byte{0, 0, 0, 7, 1, 'a', 'I', 0, 0, 0, 1}, nil},
		{"empty key", table{"": nil}, []byte{0, 0, 0, 2, 0, 'V'}, nil},
		{"255-byte key", table{key255: true}, cat(be32(258), 255, key255, 't', 1), nil},
		{"every type", table{
			"bool": true, "int8": int8(-8), "uint8": uint8(8), "int16": int16(-16),
			"uint16": uint16(16), "int32": int32(-32), "uint32": uint32(32), "int64": int64(-64),
			"float32": float32(-3.5), "float64": 6.25, "decimal": decimal{Scale: 3, Value: -1},
			"string": "s", "array": []any{int64(1), table{"x": []any{}}}, "time": timestamp(99),
			"table": table{"deep": table{"deeper": "v"}}, "void": nil, "bytes": []byte("raw"),
		}, nil, nil},
	}
	for _, tt := range tests {
		enc := appendTable(nil, tt.t)
		if len(tt.t) <= 1 && !bytes.Equal(enc, tt.wire) {
			t.Errorf("%s: appendTable\n got % x\nwant % x", tt.name, enc, tt.wire)
		}
		if sorted := appendSortedTable(nil, tt.t); len(sorted) != len(enc) {
			t.Errorf("%s: appendTable wrote %d bytes, sorted encoding %d", tt.name, len(enc), len(sorted))
		}
		want := tt.want
		if want == nil && len(tt.t) > 0 {
			want = tt.t
		}
		d := decoder{b: enc}
		got := d.table()
		if d.err != nil || len(d.b) != 0 || !fieldValuesEqual(got, want) {
			t.Errorf("%s: decode = %#v, err %v, %d left; want %#v", tt.name, got, d.err, len(d.b), want)
		}
		s := decoder{b: enc}
		s.skipTable(0)
		if s.err != nil || len(s.b) != 0 {
			t.Errorf("%s: skipTable: err %v, %d left", tt.name, s.err, len(s.b))
		}
	}
}

func TestTableLongKeyCut(t *testing.T) {
	// appendShortstr cuts to 255 octets, so a longer key still gives a valid table.
	long := strings.Repeat("k", 300)
	enc := appendTable(nil, table{long: int8(1)})
	d := decoder{b: enc}
	got := d.table()
	if d.err != nil || !fieldValuesEqual(got, table{long[:255]: int8(1)}) {
		t.Errorf("300-byte key: decoded %d keys, err %v", len(got), d.err)
	}
	if got := appendShortstr(nil, long); len(got) != 256 || got[0] != 255 {
		t.Errorf("appendShortstr(300 bytes): %d bytes, length octet %d", len(got), got[0])
	}
	if got := appendLongstr(nil, "ab"); !bytes.Equal(got, []byte{0, 0, 0, 2, 'a', 'b'}) {
		t.Errorf("appendLongstr = % x", got)
	}
}

func TestFrameDecoderPrimitives(t *testing.T) {
	d := decoder{b: []byte{1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4, 2, 'h', 'i', 0, 0, 0, 1, 'x', 'y', 'z'}}
	if v := d.octet(); v != 1 {
		t.Errorf("octet = %d", v)
	}
	if v := d.short(); v != 2 {
		t.Errorf("short = %d", v)
	}
	if v := d.long(); v != 3 {
		t.Errorf("long = %d", v)
	}
	if v := d.longlong(); v != 4 {
		t.Errorf("longlong = %d", v)
	}
	sb := d.shortstrBytes()
	if string(sb) != "hi" || cap(sb) != 2 {
		t.Errorf("shortstrBytes = %q, cap %d; want \"hi\", cap 2", sb, cap(sb))
	}
	if v := d.longstr(); v != "x" {
		t.Errorf("longstr = %q", v)
	}
	if v := d.bytes(2); string(v) != "yz" || cap(v) != 2 || d.err != nil {
		t.Errorf("bytes(2) = %q, cap %d, err %v", v, cap(v), d.err)
	}
	if len(d.b) != 0 || d.err != nil {
		t.Fatalf("left %d, err %v", len(d.b), d.err)
	}

	// Each read on too few bytes fails, and the error sticks: later reads return zero
	// values even where bytes would have sufficed.
	short := []struct {
		name string
		b    []byte
		read func(d *decoder) any
	}{
		{"octet", nil, func(d *decoder) any { return d.octet() }},
		{"short", []byte{1}, func(d *decoder) any { return d.short() }},
		{"long", []byte{1, 2, 3}, func(d *decoder) any { return d.long() }},
		{"longlong", []byte{1, 2, 3, 4, 5, 6, 7}, func(d *decoder) any { return d.longlong() }},
		{"bytes", []byte{1, 2}, func(d *decoder) any { return d.bytes(3) }},
		{"bytes negative", []byte{1, 2}, func(d *decoder) any { return d.bytes(-1) }},
		{"shortstrBytes", []byte{3, 'a', 'b'}, func(d *decoder) any { return d.shortstrBytes() }},
		{"shortstr", []byte{3, 'a', 'b'}, func(d *decoder) any { return d.shortstr() }},
		{"shortstr no length", nil, func(d *decoder) any { return d.shortstr() }},
		{"longstr", []byte{0, 0, 0, 3, 'a', 'b'}, func(d *decoder) any { return d.longstr() }},
		{"longstr huge", []byte{0xff, 0xff, 0xff, 0xff, 'a'}, func(d *decoder) any { return d.longstr() }},
		{"longstr no length", []byte{0, 0, 0}, func(d *decoder) any { return d.longstr() }},
		{"table", []byte{0, 0, 0, 3, 0, 'V'}, func(d *decoder) any { return d.table() }},
	}
	for _, tt := range short {
		d := decoder{b: slices.Clip(tt.b)}
		v := tt.read(&d)
		if d.err != errSyntax {
			t.Errorf("%s on % x: err %v, want errSyntax", tt.name, tt.b, d.err)
		}
		if !reflect.ValueOf(v).IsZero() {
			t.Errorf("%s on % x: returned %#v, want zero", tt.name, tt.b, v)
		}
		// The rest of the payload is dropped: later reads return zero values.
		if v := d.octet(); d.err != errSyntax || v != 0 || d.b != nil {
			t.Errorf("%s: after the error, octet = %d, err %v, %d left", tt.name, v, d.err, len(d.b))
		}
	}
	// The first error sticks, and reads after an error return zero values even when the
	// payload had bytes left.
	d = decoder{b: []byte{0, 0, 0, 5, 'a', 'b', 1, 2}}
	if v := d.longstr(); v != "" || d.err != errSyntax {
		t.Errorf("longstr past the end = %q, %v", v, d.err)
	}
	if v, s, n := d.octet(), d.shortstr(), d.long(); v != 0 || s != "" || n != 0 || d.err != errSyntax {
		t.Errorf("reads after an error: %d %q %d, err %v", v, s, n, d.err)
	}
	first := syntaxError("first")
	d = decoder{b: nil, err: first}
	d.octet()
	if d.err != first {
		t.Errorf("a later failure replaced the first error with %v", d.err)
	}
	var e *Error
	if !errors.As(errSyntax, &e) || e.Code != 502 || !e.Hard() {
		t.Errorf("errSyntax = %#v, want a hard 502", errSyntax)
	}
}

// decodeOutcome decodes b as a table both ways and checks that they agree on failure and
// on the bytes used. It returns the decoded table and the error.
func decodeOutcome(t testing.TB, b []byte) (table, error) {
	t.Helper()
	d := decoder{b: b}
	got := d.table()
	s := decoder{b: b}
	s.skipTable(0)
	if (d.err == nil) != (s.err == nil) {
		t.Fatalf("decoder.table err %v, skipTable err %v on % x", d.err, s.err, b[:min(len(b), 64)])
	}
	if d.err == nil && len(d.b) != len(s.b) {
		t.Fatalf("decoder.table left %d bytes, skipTable %d", len(d.b), len(s.b))
	}
	if d.err != nil {
		if d.err != errSyntax || s.err != errSyntax {
			t.Fatalf("errors %v, %v; want errSyntax", d.err, s.err)
		}
		if got != nil || d.b != nil {
			t.Fatalf("after an error: table %v, %d bytes left", got, len(d.b))
		}
	}
	return got, d.err
}

func TestTableValueTruncated(t *testing.T) {
	for _, tt := range fieldValueCases {
		for n := range len(tt.wire) {
			cut := slices.Clip(tt.wire[:n])
			d := decoder{b: cut}
			d.value(0)
			if d.err != errSyntax {
				t.Errorf("%s cut to %d bytes: value err %v", tt.name, n, d.err)
			}
			s := decoder{b: cut}
			s.skipValue(0)
			if s.err != errSyntax {
				t.Errorf("%s cut to %d bytes: skipValue err %v", tt.name, n, s.err)
			}
			// The same value cut short inside a table whose length covers only the cut.
			tb := cat(be32(uint32(2+n)), 1, "k", cut)
			if _, err := decodeOutcome(t, tb); err == nil {
				t.Errorf("%s cut to %d bytes inside a table: no error", tt.name, n)
			}
			// And with the table's length claiming the whole value.
			tb = cat(be32(uint32(2+len(tt.wire))), 1, "k", cut)
			if _, err := decodeOutcome(t, tb); err == nil {
				t.Errorf("%s cut to %d bytes, table length past the end: no error", tt.name, n)
			}
		}
	}
}

func TestFieldTableMalformed(t *testing.T) {
	tests := []struct {
		name string
		wire []byte
	}{
		{"no length", []byte{0, 0, 0}},
		{"length past end", []byte{0, 0, 0, 10, 1, 'k', 'V'}},
		{"length 0xffffffff", []byte{0xff, 0xff, 0xff, 0xff, 1, 'k', 'V'}},
		{"key past table", []byte{0, 0, 0, 2, 5, 'k', 'V', 'V', 'V', 'V'}},
		{"key without value", []byte{0, 0, 0, 2, 1, 'k'}},
		{"unknown tag Z", []byte{0, 0, 0, 3, 1, 'k', 'Z'}},
		{"unknown tag U", []byte{0, 0, 0, 7, 1, 'k', 'U', 0, 0, 0, 0}},
		{"unknown tag L", []byte{0, 0, 0, 11, 1, 'k', 'L', 0, 0, 0, 0, 0, 0, 0, 0}},
		{"unknown tag 0", []byte{0, 0, 0, 3, 1, 'k', 0}},
		{"unknown tag 0xff", []byte{0, 0, 0, 3, 1, 'k', 0xff}},
		{"unknown tag in array", []byte{0, 0, 0, 8, 1, 'k', 'A', 0, 0, 0, 1, 'Z'}},
		{"unknown tag in nested table", []byte{0, 0, 0, 10, 1, 'k', 'F', 0, 0, 0, 3, 1, 'j', '?'}},
		{"S past table", cat(be32(8), 1, "k", 'S', be32(4), "abcd")},
		{"S 0xffffffff", cat(be32(10), 1, "k", 'S', be32(0xffffffff), "abc")},
		{"x past table", cat(be32(8), 1, "k", 'x', be32(4), "abcd")},
		{"x 0xffffffff", cat(be32(10), 1, "k", 'x', be32(0xffffffff), "abc")},
		{"x 0x7fffffff", cat(be32(10), 1, "k", 'x', be32(0x7fffffff), "abc")},
		{"A past table", cat(be32(8), 1, "k", 'A', be32(2), 'V', 'V')},
		{"A 0xffffffff", cat(be32(10), 1, "k", 'A', be32(0xffffffff), "VVV")},
		{"F past table", cat(be32(8), 1, "k", 'F', be32(2), 0, 'V')},
		{"F 0xffffffff", cat(be32(10), 1, "k", 'F', be32(0xffffffff), 0, 'V', 'V')},
		{"value past table", cat(be32(4), 1, "k", 'I', 0, 0, 0, 1)},
		{"array element past array", cat(be32(9), 1, "k", 'A', be32(2), 'I', 0, 0, 0, 1)},
	}
	for _, tt := range tests {
		n := bytesPerRun(20, func() { decodeOutcome(t, tt.wire) })
		if _, err := decodeOutcome(t, tt.wire); err == nil {
			t.Errorf("%s: no error", tt.name)
		}
		if n > 64<<10 {
			t.Errorf("%s: %d bytes allocated per decode", tt.name, n)
		}
	}
}

func TestTableValueHugeLength(t *testing.T) {
	// A length of 0xffffffff with a tiny payload must not allocate the length.
	for _, tag := range []byte{'S', 'x', 'A', 'F'} {
		for _, n := range []uint32{0xffffffff, 0x80000000, 0x7fffffff, 1 << 20} {
			wire := cat(tag, be32(n), "abc")
			var err error
			alloc := bytesPerRun(20, func() {
				d := decoder{b: wire}
				d.value(0)
				err = d.err
			})
			if err != errSyntax {
				t.Errorf("%c length %#x: value err %v", tag, n, err)
			}
			if alloc > 64<<10 {
				t.Errorf("%c length %#x: %d bytes allocated per decode", tag, n, alloc)
			}
			s := decoder{b: wire}
			if s.skipValue(0); s.err != errSyntax {
				t.Errorf("%c length %#x: skipValue err %v", tag, n, s.err)
			}
			if a := testing.AllocsPerRun(20, func() { s := decoder{b: wire}; s.skipValue(0) }); a != 0 {
				t.Errorf("%c length %#x: skipValue allocates %v", tag, n, a)
			}
		}
	}
	d := decoder{b: cat(be32(0xffffffff), "abc")}
	if alloc := bytesPerRun(20, func() { d := decoder{b: cat(be32(0xffffffff), "abc")}; d.longstr() }); alloc > 1024 {
		t.Errorf("longstr 0xffffffff: %d bytes allocated", alloc)
	}
	if d.longstr(); d.err != errSyntax {
		t.Errorf("longstr 0xffffffff: err %v", d.err)
	}
}

// nestLevels builds nested values without quadratic copying: inner is the innermost
// bytes, and wrap(n) returns the prefix that wraps n bytes in one more level. Nesting adds
// only prefixes, so the prefixes are built inside out and then written outside in.
func nestLevels(levels int, inner []byte, wrap func(i, n int) []byte) []byte {
	prefixes := make([][]byte, levels)
	n := len(inner)
	for i := range levels {
		prefixes[i] = wrap(i, n)
		n += len(prefixes[i])
	}
	b := make([]byte, 0, n)
	for i := levels - 1; i >= 0; i-- {
		b = append(b, prefixes[i]...)
	}
	return append(b, inner...)
}

// nestedTables is a table holding a table holding a table ... levels deep (0 is a table
// with one void value), as the wire has it.
func nestedTables(levels int) []byte {
	in := nestLevels(levels, []byte{1, 'k', 'V'}, func(_, n int) []byte {
		return cat(1, "k", 'F', be32(uint32(n)))
	})
	return cat(be32(uint32(len(in))), in)
}

// nestedArrays is a table holding an array holding an array ... levels deep.
func nestedArrays(levels int) []byte {
	in := nestLevels(levels, []byte{'V'}, func(_, n int) []byte {
		return cat('A', be32(uint32(n)))
	})
	in = cat(1, "k", in)
	return cat(be32(uint32(len(in))), in)
}

// nestedMixed alternates arrays and tables: table → array → table → array ...
func nestedMixed(levels int) []byte {
	in := nestLevels(levels, []byte{'V'}, func(i, n int) []byte {
		if i%2 == 0 {
			return cat('A', be32(uint32(n)))
		}
		return cat('F', be32(uint32(n+2)), 1, "k")
	})
	in = cat(1, "k", in)
	return cat(be32(uint32(len(in))), in)
}

func TestTableDepth(t *testing.T) {
	if maxTableDepth != 16 {
		t.Fatalf("maxTableDepth = %d, want 16", maxTableDepth)
	}
	for name, build := range map[string]func(int) []byte{
		"tables": nestedTables, "arrays": nestedArrays, "mixed": nestedMixed,
	} {
		for levels := 0; levels <= 20; levels++ {
			b := build(levels)
			got, err := decodeOutcome(t, b)
			if levels <= maxTableDepth {
				if err != nil {
					t.Errorf("%s nested %d deep: %v", name, levels, err)
					continue
				}
				// Count the levels decoded.
				depth := 0
				for v := any(got["k"]); ; depth++ {
					if tv, ok := v.(table); ok {
						v = tv["k"]
					} else if av, ok := v.([]any); ok && len(av) == 1 {
						v = av[0]
					} else {
						break
					}
				}
				if depth != levels {
					t.Errorf("%s nested %d deep: decoded %d levels", name, levels, depth)
				}
				// Re-encoding gives the same bytes (one key per table).
				if enc := appendTable(nil, got); !bytes.Equal(enc, b) {
					t.Errorf("%s nested %d deep: re-encoded\n% x\nwant\n% x", name, levels, enc, b)
				}
			} else if err == nil {
				t.Errorf("%s nested %d deep (> maxTableDepth): no error", name, levels)
			}
		}
	}
	// Very deep nesting is refused early, without deep recursion or large allocations.
	for _, b := range [][]byte{nestedTables(10000), nestedArrays(10000), nestedMixed(10000)} {
		if _, err := decodeOutcome(t, b); err == nil {
			t.Error("10000 levels: no error")
		}
		if n := bytesPerRun(5, func() { d := decoder{b: b}; d.table() }); n > 64<<10 {
			t.Errorf("10000 levels: %d bytes allocated per decode", n)
		}
	}
}

func TestSkipTableNoAlloc(t *testing.T) {
	p := allProperties()
	enc := appendSortedTable(nil, p.Headers)
	if a := testing.AllocsPerRun(100, func() {
		d := decoder{b: enc}
		d.skipTable(0)
		if d.err != nil || len(d.b) != 0 {
			panic("skipTable failed")
		}
	}); a != 0 {
		t.Errorf("skipTable allocates %v per run", a)
	}
}

// allProperties has every basic property set, headers of several types.
func allProperties() properties {
	return properties{
		ContentType:     "application/json",
		ContentEncoding: "gzip",
		Headers: table{
			"x-int": int32(-5), "x-string": "str", "x-bool": true, "x-long": int64(1) << 40,
			"x-nested": table{"a": []any{int64(1), "b", decimal{Scale: 1, Value: 5}}},
			"x-time":   timestamp(1700000000), "x-float": 1.5, "x-bytes": []byte("b"), "x-void": nil,
		},
		DeliveryMode:  2,
		Priority:      9,
		CorrelationID: "corr-1",
		ReplyTo:       "amq.rabbitmq.reply-to",
		Expiration:    "60000",
		MessageID:     "msg-1",
		Timestamp:     1700000000,
		Type:          "order.created",
		UserID:        "guest",
		AppID:         "billing",
		Reserved:      "cluster-a",
	}
}

// encodeSortedProperties is properties.encode with the headers in sorted key order.
func encodeSortedProperties(p *properties) []byte {
	enc := p.encode(nil)
	if p.Headers == nil {
		return enc
	}
	off := 2
	if p.ContentType != "" {
		off += 1 + len(p.ContentType)
	}
	if p.ContentEncoding != "" {
		off += 1 + len(p.ContentEncoding)
	}
	n := 4 + int(binary.BigEndian.Uint32(enc[off:]))
	return cat(enc[:off], appendSortedTable(nil, p.Headers), enc[off+n:])
}

func TestPropertiesRoundTrip(t *testing.T) {
	p := allProperties()
	enc := p.encode(nil)
	if f := binary.BigEndian.Uint16(enc); f != 0xfffc {
		t.Errorf("flags = %#04x, want 0xfffc", f)
	}
	if sorted := encodeSortedProperties(&p); len(sorted) != len(enc) {
		t.Errorf("encoding is %d bytes, sorted %d", len(enc), len(sorted))
	}
	var got properties
	d := decoder{b: enc}
	got.decode(&d)
	want := p
	want.flags = 0xfffc
	if d.err != nil || len(d.b) != 0 || !propertiesEqual(&got, &want, true) {
		t.Errorf("decode: err %v, %d left\n got %+v\nwant %+v", d.err, len(d.b), got, want)
	}
	// encode appends.
	if enc2 := p.encode([]byte("pre")); string(enc2[:3]) != "pre" || len(enc2) != len(enc)+3 {
		t.Error("encode does not append")
	}
	// No properties at all.
	var none properties
	if enc := none.encode(nil); !bytes.Equal(enc, []byte{0, 0}) {
		t.Errorf("no properties: % x", enc)
	}
	d = decoder{b: []byte{0, 0}}
	got.ContentType = "stale"
	got.decode(&d)
	if d.err != nil || !propertiesEqual(&got, &properties{}, true) {
		t.Errorf("no properties: decoded %+v, %v", got, d.err)
	}
}

func TestPropertiesEachFlag(t *testing.T) {
	tests := []struct {
		name string
		p    properties
		flag uint16
		wire []byte
	}{
		{"content-type", properties{ContentType: "text/plain"}, flagContentType, cat(0x80, 0, 10, "text/plain")},
		{"content-encoding", properties{ContentEncoding: "gzip"}, flagContentEncoding, cat(0x40, 0, 4, "gzip")},
		{"headers", properties{Headers: table{"k": int32(7)}}, flagHeaders, cat(0x20, 0, be32(7), 1, "k", 'I', be32(7))},
		{"headers empty", properties{Headers: table{}}, flagHeaders, cat(0x20, 0, be32(0))},
		{"delivery-mode", properties{DeliveryMode: 2}, flagDeliveryMode, []byte{0x10, 0, 2}},
		{"priority", properties{Priority: 9}, flagPriority, []byte{0x08, 0, 9}},
		{"correlation-id", properties{CorrelationID: "c"}, flagCorrelationID, cat(0x04, 0, 1, "c")},
		{"reply-to", properties{ReplyTo: "r"}, flagReplyTo, cat(0x02, 0, 1, "r")},
		{"expiration", properties{Expiration: "60000"}, flagExpiration, cat(0x01, 0, 5, "60000")},
		{"message-id", properties{MessageID: "m"}, flagMessageID, cat(0, 0x80, 1, "m")},
		{"timestamp", properties{Timestamp: 0x0102030405060708}, flagTimestamp, []byte{0, 0x40, 1, 2, 3, 4, 5, 6, 7, 8}},
		{"type", properties{Type: "t"}, flagType, cat(0, 0x20, 1, "t")},
		{"user-id", properties{UserID: "u"}, flagUserID, cat(0, 0x10, 1, "u")},
		{"app-id", properties{AppID: "a"}, flagAppID, cat(0, 0x08, 1, "a")},
		{"cluster-id", properties{Reserved: "x"}, flagReserved, cat(0, 0x04, 1, "x")},
	}
	seen := uint16(0)
	for _, tt := range tests {
		seen |= tt.flag
		enc := tt.p.encode(nil)
		if !bytes.Equal(enc, tt.wire) {
			t.Errorf("%s: encode\n got % x\nwant % x", tt.name, enc, tt.wire)
		}
		var got properties
		d := decoder{b: tt.wire}
		got.decode(&d)
		want := tt.p
		want.flags = tt.flag
		if d.err != nil || len(d.b) != 0 || !propertiesEqual(&got, &want, true) {
			t.Errorf("%s: decode = %+v, err %v; want %+v", tt.name, got, d.err, want)
		}
		s, err := scanProperties(tt.wire)
		if err != nil || s.deliveryMode != tt.p.DeliveryMode || s.priority != tt.p.Priority ||
			string(s.expiration) != tt.p.Expiration || (s.headers != nil) != (tt.p.Headers != nil) {
			t.Errorf("%s: scanProperties = %+v, %v", tt.name, s, err)
		}
		if s.headers != nil {
			hd := decoder{b: s.headers}
			h := hd.table()
			if h == nil {
				h = table{}
			}
			if hd.err != nil || len(hd.b) != 0 || !fieldValuesEqual(h, tt.p.Headers) {
				t.Errorf("%s: raw headers decode to %v, %v", tt.name, h, hd.err)
			}
		}
	}
	if seen != 0xfffc {
		t.Errorf("flags covered %#04x, want 0xfffc", seen)
	}
}

func TestScanProperties(t *testing.T) {
	p := allProperties()
	enc := p.encode(nil)
	s, err := scanProperties(enc)
	if err != nil {
		t.Fatal(err)
	}
	if s.deliveryMode != 2 || s.priority != 9 || string(s.expiration) != "60000" {
		t.Errorf("scanProperties = mode %d, priority %d, expiration %q", s.deliveryMode, s.priority, s.expiration)
	}
	// The raw headers are the whole table, length included, aliasing the input.
	off := 2 + 1 + len(p.ContentType) + 1 + len(p.ContentEncoding)
	n := 4 + int(binary.BigEndian.Uint32(enc[off:]))
	if !bytes.Equal(s.headers, enc[off:off+n]) || &s.headers[0] != &enc[off] {
		t.Errorf("headers = % x\nwant % x", s.headers, enc[off:off+n])
	}
	d := decoder{b: s.headers}
	if h := d.table(); d.err != nil || len(d.b) != 0 || !fieldValuesEqual(h, p.Headers) {
		t.Errorf("raw headers decode to %v, %v", h, d.err)
	}
	if cap(s.expiration) != len(s.expiration) {
		t.Errorf("expiration has spare capacity %d", cap(s.expiration)-len(s.expiration))
	}

	if a := testing.AllocsPerRun(100, func() {
		if _, err := scanProperties(enc); err != nil {
			panic(err)
		}
	}); a != 0 {
		t.Errorf("scanProperties allocates %v per run", a)
	}
	bad := cat(enc[:1], enc[1]|1, enc[2:])
	if a := testing.AllocsPerRun(100, func() { scanProperties(bad) }); a != 0 {
		t.Errorf("scanProperties on bad flags allocates %v per run", a)
	}
}

func TestScanPropertiesRejects(t *testing.T) {
	p := allProperties()
	enc := p.encode(nil)
	check := func(name string, raw []byte) {
		t.Helper()
		s, err := scanProperties(raw)
		if err != errSyntax {
			t.Errorf("%s: scanProperties err %v, want errSyntax", name, err)
		}
		if s.deliveryMode != 0 || s.priority != 0 || s.expiration != nil || s.headers != nil {
			t.Errorf("%s: scanProperties returned %+v with an error", name, s)
		}
		var got properties
		d := decoder{b: raw}
		got.decode(&d)
		if d.err != errSyntax {
			t.Errorf("%s: decode err %v, want errSyntax", name, d.err)
		}
	}
	for _, low := range []byte{1, 2, 3} {
		check("flags | "+string('0'+low), cat(enc[:1], enc[1]|low, enc[2:]))
		check("only flag bit "+string('0'+low), []byte{0, low})
		check("only flag bit with continuation "+string('0'+low), []byte{0, low, 0, 0})
	}
	for n := range len(enc) {
		if _, err := scanProperties(enc[:n:n]); err != errSyntax {
			t.Errorf("cut to %d of %d bytes: err %v", n, len(enc), err)
		}
		var got properties
		d := decoder{b: enc[:n:n]}
		if got.decode(&d); d.err != errSyntax {
			t.Errorf("decode cut to %d of %d bytes: err %v", n, len(enc), d.err)
		}
	}
	check("empty", nil)
	check("one byte", []byte{0})
	check("headers past end", cat(0x20, 0, be32(100), 1, "k", 'V'))
	check("headers bad tag", cat(0x20, 0, be32(3), 1, "k", 'Z'))
	check("headers too deep", cat(0x20, 0, nestedTables(maxTableDepth+1)))
	check("expiration past end", cat(0x01, 0, 5, "600"))
	check("timestamp short", []byte{0, 0x40, 1, 2, 3})
	check("cluster-id past end", cat(0, 0x04, 2, "x"))
	// The deepest allowed headers pass both.
	raw := cat(0x20, 0, nestedTables(maxTableDepth))
	if _, err := scanProperties(raw); err != nil {
		t.Errorf("headers %d deep: %v", maxTableDepth, err)
	}
}

// newTestFrameReader reads frames from b.
func newTestFrameReader(b []byte, frameMax uint32) *frameReader {
	return &frameReader{r: bufio.NewReader(bytes.NewReader(b)), frameMax: frameMax}
}

// repeatReader returns its bytes over and over, without allocating.
type repeatReader struct {
	b   []byte
	off int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	n := copy(p, r.b[r.off:])
	r.off = (r.off + n) % len(r.b)
	return n, nil
}

// testPublishStream is a basic.publish on channel 1 with its content: a method frame, a
// header frame with properties, and one body frame of bodySize bytes.
func testPublishStream(bodySize int) []byte {
	b := appendMethodFrame(nil, 1, &basicPublish{Exchange: "amq.topic", RoutingKey: "orders.eu.created"})
	props := properties{ContentType: "application/json", DeliveryMode: 2, Headers: table{"x-id": int64(7)}}
	return appendContent(b, 1, props.encode(nil), bytes.Repeat([]byte{'b'}, bodySize), defaultFrameMax)
}

func TestFrameEncode(t *testing.T) {
	got := appendMethodFrame([]byte("pre"), 1, &basicPublish{Exchange: "x", RoutingKey: "rk", Mandatory: true})
	want := cat("pre", frameMethod, 0, 1, be32(12), 0, 60, 0, 40, 0, 0, 1, "x", 2, "rk", 1, frameEnd)
	if !bytes.Equal(got, want) {
		t.Errorf("appendMethodFrame\n got % x\nwant % x", got, want)
	}
	if got := appendHeartbeat([]byte{9}); !bytes.Equal(got, []byte{9, 8, 0, 0, 0, 0, 0, 0, 0xce}) {
		t.Errorf("appendHeartbeat = % x", got)
	}
	b := appendFrameStart([]byte{7}, frameBody, 0xabcd)
	b = append(b, "xyz"...)
	b = appendFrameEnd(b, 1)
	if want := cat(7, frameBody, 0xab, 0xcd, be32(3), "xyz", frameEnd); !bytes.Equal(b, want) {
		t.Errorf("appendFrameStart/End\n got % x\nwant % x", b, want)
	}
	if protocolHeader != [8]byte{'A', 'M', 'Q', 'P', 0, 0, 9, 1} {
		t.Errorf("protocolHeader = % x", protocolHeader)
	}
}

func TestFrameReaderReads(t *testing.T) {
	body := []byte("hello")
	props := properties{ContentType: "text/plain", DeliveryMode: 1}
	rawProps := props.encode(nil)
	pub := &basicPublish{Exchange: "e", RoutingKey: "k"}
	stream := appendMethodFrame(nil, 1, pub)
	stream = appendContent(stream, 1, rawProps, body, 4096)
	stream = appendHeartbeat(stream)
	stream = appendMethodFrame(stream, 0xffff, &channelCloseOk{})

	fr := newTestFrameReader(stream, 4096)
	want := []frame{
		{typ: frameMethod, channel: 1, payload: pub.encode(nil)},
		{typ: frameHeader, channel: 1, payload: cat(0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, rawProps)},
		{typ: frameBody, channel: 1, payload: body},
		{typ: frameHeartbeat, channel: 0, payload: []byte{}},
		{typ: frameMethod, channel: 0xffff, payload: []byte{0, 20, 0, 41}},
	}
	for i, w := range want {
		f, err := fr.read()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if f.typ != w.typ || f.channel != w.channel || !bytes.Equal(f.payload, w.payload) {
			t.Errorf("frame %d = {%d %d % x}, want {%d %d % x}", i, f.typ, f.channel, f.payload, w.typ, w.channel, w.payload)
		}
	}
	if _, err := fr.read(); err != io.EOF {
		t.Errorf("after the last frame: %v, want io.EOF", err)
	}
}

// Reading frames allocates nothing: a frame the read buffer holds whole is returned in
// place, and one larger than the buffer is read into a payload buffer reused from frame to
// frame.
func TestFrameReaderPayloadReuse(t *testing.T) {
	stream := appendFrameStart(nil, frameBody, 1)
	stream = appendFrameEnd(append(stream, "the first payload"...), 0)
	start := len(stream)
	stream = appendFrameStart(stream, frameBody, 1)
	stream = appendFrameEnd(append(stream, "and then another"...), start)
	for _, size := range []int{16, 4096} { // smaller than a frame, and larger
		src := bytes.NewReader(stream)
		fr := &frameReader{r: bufio.NewReaderSize(src, size), frameMax: 4096}
		allocs := testing.AllocsPerRun(100, func() {
			src.Reset(stream)
			fr.r.Reset(src)
			f1, err1 := fr.read()
			ok := err1 == nil && string(f1.payload) == "the first payload"
			f2, err2 := fr.read()
			if !ok || err2 != nil || string(f2.payload) != "and then another" {
				t.Fatalf("buffer %d: frames %q, %q: %v, %v", size, f1.payload, f2.payload, err1, err2)
			}
		})
		if allocs != 0 {
			t.Errorf("buffer %d: %v allocations per two frames", size, allocs)
		}
	}
}

func TestFrameReaderBadEnd(t *testing.T) {
	for _, end := range []byte{0, 0xcd, 0xcf, 0xff} {
		b := appendHeartbeat(nil)
		b[len(b)-1] = end
		_, err := newTestFrameReader(b, 4096).read()
		var e *Error
		if !errors.As(err, &e) || e.Code != replyFrameError || !e.Hard() {
			t.Errorf("frame end %#x: err %v, want 501", end, err)
		}
		b = appendMethodFrame(nil, 1, &basicQos{PrefetchCount: 1})
		b[len(b)-1] = end
		if _, err := newTestFrameReader(b, 4096).read(); !errors.As(err, &e) || e.Code != replyFrameError {
			t.Errorf("method frame end %#x: err %v, want 501", end, err)
		}
	}
}

func TestFrameReaderTooLarge(t *testing.T) {
	tests := []struct {
		frameMax, size uint32
		ok             bool
	}{
		{4096, 4088, true},
		{4096, 4096, true}, // RabbitMQ's fudge: clients off by the 8 octets of framing
		{4096, 4097, false},
		{131072, 131072, true},
		{131072, 131073, false},
		{131072, 0xffffffff, false},
		{131072, 0xfffffff8, false},
		{0xffffffff, 0xffffffff, false},
		{0xffffffff, 0xfffffff8, false},
	}
	for _, tt := range tests {
		hdr := cat(frameBody, 0, 1, be32(tt.size))
		var in []byte
		if tt.ok {
			in = cat(hdr, make([]byte, tt.size), frameEnd)
		} else {
			in = cat(hdr, "tiny", frameEnd)
		}
		fr := newTestFrameReader(in, tt.frameMax)
		var err error
		alloc := bytesPerRun(1, func() { _, err = fr.read() })
		if tt.ok {
			if err != nil {
				t.Errorf("frameMax %d, size %d: %v", tt.frameMax, tt.size, err)
			}
			continue
		}
		var e *Error
		if !errors.As(err, &e) || e.Code != replyFrameError {
			t.Errorf("frameMax %d, size %d: err %v, want 501", tt.frameMax, tt.size, err)
		}
		if alloc > 64<<10 || cap(fr.buf) > 64<<10 {
			t.Errorf("frameMax %d, size %d: %d bytes allocated, buffer cap %d", tt.frameMax, tt.size, alloc, cap(fr.buf))
		}
	}
}

func TestFrameReaderTruncated(t *testing.T) {
	stream := testPublishStream(100)
	stream = appendHeartbeat(stream)
	// Frame boundaries, to know what a cut stream should yield.
	var ends []int
	for off := 0; off < len(stream); {
		off += 8 + int(binary.BigEndian.Uint32(stream[off+3:]))
		ends = append(ends, off)
	}
	if len(ends) != 4 {
		t.Fatalf("%d frames in the stream, want 4", len(ends))
	}
	for n := 0; n <= len(stream); n++ {
		fr := newTestFrameReader(stream[:n], defaultFrameMax)
		complete := 0
		for _, e := range ends {
			if e <= n {
				complete++
			}
		}
		for i := range complete {
			if _, err := fr.read(); err != nil {
				t.Fatalf("cut at %d: frame %d: %v", n, i, err)
			}
		}
		_, err := fr.read()
		atBoundary := n == 0 || slices.Contains(ends, n)
		if atBoundary && err != io.EOF {
			t.Errorf("cut at %d (a frame boundary): err %v, want io.EOF", n, err)
		}
		if !atBoundary && err != io.ErrUnexpectedEOF {
			t.Errorf("cut at %d: err %v, want io.ErrUnexpectedEOF", n, err)
		}
	}
}

func TestFrameReaderNoAlloc(t *testing.T) {
	stream := testPublishStream(1024)
	fr := &frameReader{r: bufio.NewReaderSize(&repeatReader{b: stream}, 64<<10), frameMax: defaultFrameMax}
	for range 10 {
		if _, err := fr.read(); err != nil {
			t.Fatal(err)
		}
	}
	if a := testing.AllocsPerRun(1000, func() {
		if _, err := fr.read(); err != nil {
			panic(err)
		}
	}); a != 0 {
		t.Errorf("steady-state read allocates %v per frame", a)
	}
	// A larger frame grows the buffer once; smaller ones after it reuse it.
	big := appendContent(nil, 1, nil, make([]byte, 20000), defaultFrameMax)
	fr = &frameReader{r: bufio.NewReaderSize(&repeatReader{b: cat(big, stream)}, 64<<10), frameMax: defaultFrameMax}
	for range 10 {
		fr.read()
	}
	if a := testing.AllocsPerRun(1000, func() { fr.read() }); a != 0 {
		t.Errorf("mixed-size reads allocate %v per frame", a)
	}
}

func TestFrameAppendContent(t *testing.T) {
	const frameMax = 4096
	chunk := frameMax - frameOverhead
	body := make([]byte, 3*chunk+5)
	for i := range body {
		body[i] = byte(i * 7)
	}
	props := allProperties()
	raw := props.encode(nil)
	out := appendContent([]byte("pre"), 0x0102, raw, body, frameMax)
	if string(out[:3]) != "pre" {
		t.Fatal("appendContent does not append")
	}
	fr := newTestFrameReader(out[3:], frameMax)
	h, err := fr.read()
	if err != nil || h.typ != frameHeader || h.channel != 0x0102 {
		t.Fatalf("header frame: %+v, %v", h, err)
	}
	if want := cat(0, 60, 0, 0, binary.BigEndian.AppendUint64(nil, uint64(len(body))), raw); !bytes.Equal(h.payload, want) {
		t.Errorf("header payload\n got % x\nwant % x", h.payload, want)
	}
	var got []byte
	var sizes []int
	for {
		f, err := fr.read()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if f.typ != frameBody || f.channel != 0x0102 {
			t.Errorf("body frame type %d channel %#x", f.typ, f.channel)
		}
		sizes = append(sizes, len(f.payload))
		got = append(got, f.payload...)
	}
	if !slices.Equal(sizes, []int{chunk, chunk, chunk, 5}) {
		t.Errorf("body frame sizes %v, want [%d %d %d 5]", sizes, chunk, chunk, chunk)
	}
	if !bytes.Equal(got, body) {
		t.Error("body frames do not carry the body")
	}
	wantLen := 3 + 8 + 12 + len(raw) + 4*8 + len(body)
	if len(out) != wantLen {
		t.Errorf("output is %d bytes, want %d", len(out), wantLen)
	}

	// Exactly one frame's worth is one body frame.
	out = appendContent(nil, 1, raw, body[:chunk], frameMax)
	if n := len(out) - (8 + 12 + len(raw)); n != chunk+8 {
		t.Errorf("a body of frameMax-8 takes %d bytes of frames, want %d", n, chunk+8)
	}

	// An empty body is the header frame alone; nil properties are the two flag octets.
	for _, b := range [][]byte{nil, {}} {
		out = appendContent(nil, 5, nil, b, frameMax)
		want := cat(frameHeader, 0, 5, be32(14), 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, frameEnd)
		if !bytes.Equal(out, want) {
			t.Errorf("empty body\n got % x\nwant % x", out, want)
		}
	}
	out = appendContent(nil, 5, raw, nil, frameMax)
	if len(out) != 8+12+len(raw) {
		t.Errorf("empty body with properties: %d bytes, want %d", len(out), 8+12+len(raw))
	}
}

func TestFrameEncodeNoAlloc(t *testing.T) {
	body := make([]byte, 1024)
	p := allProperties()
	raw := p.encode(nil)
	buf := make([]byte, 0, 64<<10)
	deliver := &basicDeliver{ConsumerTag: "ctag", DeliveryTag: 1, Exchange: "amq.topic", RoutingKey: "a.b"}
	var m method = deliver
	tests := []struct {
		name string
		f    func()
	}{
		{"appendContent", func() { buf = appendContent(buf[:0], 1, raw, body, defaultFrameMax) }},
		{"appendMethodFrame", func() { buf = appendMethodFrame(buf[:0], 1, m) }},
		{"appendHeartbeat", func() { buf = appendHeartbeat(buf[:0]) }},
		{"properties.encode", func() { buf = p.encode(buf[:0]) }},
		{"appendTable", func() { buf = appendTable(buf[:0], p.Headers) }},
	}
	for _, tt := range tests {
		if a := testing.AllocsPerRun(100, tt.f); a != 0 {
			t.Errorf("%s allocates %v per run", tt.name, a)
		}
	}
}

func BenchmarkReadFrame(b *testing.B) {
	stream := testPublishStream(1024)
	fr := &frameReader{r: bufio.NewReaderSize(&repeatReader{b: stream}, 64<<10), frameMax: defaultFrameMax}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := fr.read(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendContent(b *testing.B) {
	body := make([]byte, 1024)
	props := properties{ContentType: "application/json", DeliveryMode: 2, MessageID: "m-1", Headers: table{"x-id": int64(7)}}
	raw := props.encode(nil)
	buf := make([]byte, 0, 4096)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		buf = appendContent(buf[:0], 1, raw, body, defaultFrameMax)
	}
}

func BenchmarkEncodeProperties(b *testing.B) {
	p := allProperties()
	buf := make([]byte, 0, 4096)
	b.ReportAllocs()
	for b.Loop() {
		buf = p.encode(buf[:0])
	}
}

func BenchmarkScanProperties(b *testing.B) {
	p := allProperties()
	raw := p.encode(nil)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := scanProperties(raw); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeTable(b *testing.B) {
	raw := appendSortedTable(nil, table{"x-trace-id": "4bf92f3577b34da6", "x-retry": int32(3), "x-first-death-reason": "rejected"})
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		d := decoder{b: raw}
		if d.table(); d.err != nil {
			b.Fatal(d.err)
		}
	}
}

// Fuzz seeds: real frames and payloads.

// seedClientProperties is what amqp091-go sends in connection.start-ok.
func seedClientProperties() table {
	return table{
		"product": "AMQP 0.9.1 Client", "version": "β", "platform": "golang",
		"connection_name": "orders-service",
		"capabilities": table{
			"connection.blocked": true, "consumer_cancel_notify": true, "basic.nack": true,
			"publisher_confirms": true, "authentication_failure_close": true,
			"exchange_exchange_bindings": true, "per_consumer_qos": true,
		},
		"x-numbers": []any{int8(-1), uint8(2), int16(-3), uint16(4), int32(-5), uint32(6), int64(-7),
			float32(8.5), 9.25, decimal{Scale: 2, Value: 1000}, timestamp(1700000000), nil, []byte{0xff}},
	}
}

// seedStartOk is a connection.start-ok payload with a client-properties table.
func seedStartOk() []byte {
	b := []byte{0, 10, 0, 11}
	b = appendSortedTable(b, seedClientProperties())
	b = appendShortstr(b, "PLAIN")
	b = appendLongstr(b, "\x00guest\x00guest")
	return appendShortstr(b, "en_US")
}

// seedFrames are whole frames: a basic.publish, a header with all properties, a body, a
// heartbeat and a connection.start-ok.
func seedFrames() [][]byte {
	p := allProperties()
	raw := encodeSortedProperties(&p)
	header := appendContent(nil, 1, raw, make([]byte, 3), defaultFrameMax)
	headerOnly := header[:8+12+len(raw)]
	startOk := appendFrameStart(nil, frameMethod, 0)
	startOk = appendFrameEnd(append(startOk, seedStartOk()...), 0)
	return [][]byte{
		appendMethodFrame(nil, 1, &basicPublish{Exchange: "amq.topic", RoutingKey: "orders.eu.created", Mandatory: true}),
		headerOnly,
		header[len(headerOnly):],
		appendHeartbeat(nil),
		startOk,
	}
}

// addCuts adds b and every prefix of it.
func addCuts(f *testing.F, b []byte) {
	for n := 0; n <= len(b); n++ {
		f.Add(slices.Clone(b[:n]))
	}
}

func FuzzReadFrame(f *testing.F) {
	frames := seedFrames()
	for _, fb := range frames {
		addCuts(f, fb)
	}
	f.Add(slices.Concat(frames...))
	f.Add(cat(frameBody, 0, 1, be32(0xffffffff), "x"))
	f.Add(cat(protocolHeader[:]))
	const frameMax = 131072
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := newTestFrameReader(data, frameMax)
		off := 0
		for {
			fm, err := fr.read()
			if err != nil {
				var e *Error
				if err != io.EOF && err != io.ErrUnexpectedEOF && !(errors.As(err, &e) && e.Code == replyFrameError) {
					t.Fatalf("unexpected error %v", err)
				}
				if err == io.EOF && off != len(data) {
					t.Fatalf("io.EOF with %d bytes unread", len(data)-off)
				}
				break
			}
			if len(fm.payload) > frameMax {
				t.Fatalf("payload of %d bytes > frameMax", len(fm.payload))
			}
			// The frame is exactly the bytes at off.
			want := cat(fm.typ, byte(fm.channel>>8), byte(fm.channel), be32(uint32(len(fm.payload))), fm.payload, frameEnd)
			if !bytes.Equal(data[off:off+len(want)], want) {
				t.Fatalf("frame at %d does not match the input", off)
			}
			off += len(want)
		}
		if cap(fr.buf) > frameMax+1 { // payload and frame-end octet
			t.Fatalf("buffer of %d bytes for frameMax %d", cap(fr.buf), frameMax)
		}
	})
}

func FuzzFieldTable(f *testing.F) {
	for _, tt := range fieldValueCases {
		f.Add(cat(be32(uint32(2+len(tt.wire))), 1, "k", tt.wire))
	}
	addCuts(f, appendSortedTable(nil, seedClientProperties()))
	p := allProperties()
	addCuts(f, appendSortedTable(nil, p.Headers))
	f.Add(nestedTables(maxTableDepth))
	f.Add(nestedTables(maxTableDepth + 1))
	f.Add(nestedMixed(maxTableDepth))
	f.Fuzz(func(t *testing.T, data []byte) {
		t1, err := decodeOutcome(t, data)
		if err != nil {
			return
		}
		enc := appendTable(nil, t1)
		d := decoder{b: enc}
		t2 := d.table()
		if d.err != nil || len(d.b) != 0 {
			t.Fatalf("re-encoded table: err %v, %d left", d.err, len(d.b))
		}
		if !fieldValuesEqual(t1, t2) {
			t.Fatalf("round trip\n got %#v\nwant %#v", t2, t1)
		}
		// Re-encoding never grows: duplicate keys collapse, everything else keeps its size.
		if n := 4 + int(binary.BigEndian.Uint32(data)); len(enc) > n {
			t.Fatalf("re-encoded table is %d bytes, input %d", len(enc), n)
		}
	})
}

func FuzzMethod(f *testing.F) {
	seeds := [][]byte{
		seedStartOk(),
		(&basicPublish{Exchange: "amq.topic", RoutingKey: "orders.eu.created", Mandatory: true}).encode(nil),
		(&basicDeliver{ConsumerTag: "ctag", DeliveryTag: 42, Redelivered: true, Exchange: "x", RoutingKey: "k"}).encode(nil),
		(&connectionTune{ChannelMax: 2047, FrameMax: 131072, Heartbeat: 60}).encode(nil),
		(&connectionClose{ReplyCode: 320, ReplyText: "CONNECTION_FORCED - bye", ClassID: 60, MethodID: 40}).encode(nil),
		(&basicAck{DeliveryTag: 7, Multiple: true}).encode(nil),
	}
	qd := []byte{0, 50, 0, 10, 0, 0, 1, 'q', 0b00010}
	seeds = append(seeds, appendSortedTable(qd, table{"x-queue-type": "quorum", "x-max-length": int64(1000), "x-message-ttl": int32(60000)}))
	for _, s := range seeds {
		addCuts(f, s)
	}
	for _, id := range allMethodIDs {
		f.Add(newMethod(id).encode(nil))
	}
	f.Add([]byte{0, 60, 0, 41})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 4 {
			return
		}
		id := binary.BigEndian.Uint32(data)
		m := newMethod(id)
		if m == nil {
			return
		}
		d := decoder{b: data[4:]}
		m.decode(&d)
		if d.err != nil {
			if d.err != errSyntax {
				t.Fatalf("decode error %v, want errSyntax", d.err)
			}
			return
		}
		enc := m.encode(nil)
		if len(enc) < 4 || binary.BigEndian.Uint32(enc) != id {
			t.Fatalf("encoding starts % x, want id %#x", enc[:min(4, len(enc))], id)
		}
		if len(enc) > len(data)-len(d.b) {
			t.Fatalf("re-encoded method is %d bytes, read %d", len(enc), len(data)-len(d.b))
		}
		m2 := newMethod(id)
		d2 := decoder{b: enc[4:]}
		m2.decode(&d2)
		if d2.err != nil || len(d2.b) != 0 {
			t.Fatalf("re-decode: err %v, %d left", d2.err, len(d2.b))
		}
		if !methodsEqual(m, m2) {
			t.Fatalf("round trip\n got %+v\nwant %+v", m2, m)
		}
	})
}

func FuzzProperties(f *testing.F) {
	p := allProperties()
	addCuts(f, encodeSortedProperties(&p))
	for _, flag := range []uint16{flagContentType, flagHeaders, flagDeliveryMode, flagExpiration, flagTimestamp, 1, 2} {
		f.Add(cat(byte(flag>>8), byte(flag), 1, "abcdefgh"))
	}
	f.Add(cat(0x20, 0, nestedTables(maxTableDepth+1)))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, serr := scanProperties(data)
		var pr properties
		d := decoder{b: data}
		pr.decode(&d)
		if (serr == nil) != (d.err == nil) {
			t.Fatalf("scanProperties err %v, decode err %v", serr, d.err)
		}
		if serr != nil {
			if serr != errSyntax || d.err != errSyntax {
				t.Fatalf("errors %v, %v; want errSyntax", serr, d.err)
			}
			return
		}
		if s.deliveryMode != pr.DeliveryMode || s.priority != pr.Priority || string(s.expiration) != pr.Expiration {
			t.Fatalf("scanProperties %+v disagrees with decode %+v", s, pr)
		}
		if (s.headers != nil) != (pr.flags&flagHeaders != 0) {
			t.Fatalf("raw headers %v with flags %#04x", s.headers != nil, pr.flags)
		}
		if s.headers != nil {
			hd := decoder{b: s.headers}
			h := hd.table()
			if h == nil && hd.err == nil {
				h = table{}
			}
			if hd.err != nil || len(hd.b) != 0 || !fieldValuesEqual(h, pr.Headers) {
				t.Fatalf("raw headers decode to %v (%v), decode gave %v", h, hd.err, pr.Headers)
			}
		}
		// Round trip: present-but-empty fields are dropped by encode, nothing else changes.
		enc := pr.encode(nil)
		var pr2 properties
		d2 := decoder{b: enc}
		pr2.decode(&d2)
		if d2.err != nil || len(d2.b) != 0 || !propertiesEqual(&pr, &pr2, false) {
			t.Fatalf("round trip: err %v\n got %+v\nwant %+v", d2.err, pr2, pr)
		}
		if _, err := scanProperties(enc); err != nil {
			t.Fatalf("scanProperties on re-encoded properties: %v", err)
		}
	})
}

// TestFrameReaderGrow: a reader that grows its buffer between frames keeps what the old
// buffer held, so no octet is lost or repeated.
func TestFrameReaderGrow(t *testing.T) {
	var wire []byte
	for i := range 50 {
		wire = appendMethodFrame(wire, uint16(i), &queueDeclare{Queue: strings.Repeat("q", i)})
	}
	under := bytes.NewReader(wire)
	fr := frameReader{r: bufio.NewReaderSize(under, 16), frameMax: defaultFrameMax}
	for i := range 50 {
		f, err := fr.read()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if f.channel != uint16(i) {
			t.Fatalf("frame %d arrived as channel %d", i, f.channel)
		}
		if i == 2 {
			if fr.r.Buffered() == 0 {
				t.Fatal("the small buffer holds nothing of the next frame: the test proves nothing")
			}
			fr.grow(4096, under)
			if fr.r.Size() != 4096 {
				t.Fatalf("buffer of %d octets after grow", fr.r.Size())
			}
		}
	}
	if _, err := fr.read(); err != io.EOF {
		t.Errorf("after the last frame: %v, want EOF", err)
	}
}
