package amqp

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"
)

// walTestRecord encodes one log record the way appendLocked does.
func walTestRecord(typ uint8, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(payload)))
	crc := crc32.Update(crc32.Update(0, crcTable, []byte{typ}), crcTable, payload)
	b = binary.BigEndian.AppendUint32(b, crc)
	b = append(b, typ)
	return append(b, payload...)
}

// FuzzWALRecord: parseRecord never panics or reads past its input, accepts what the writer
// encodes, and rejects any single flipped bit; a publish record splits and decodes without
// panicking, into parts that agree.
func FuzzWALRecord(f *testing.F) {
	m := &message{exchange: "x", keyLen: 2, propsLen: 3, data: []byte("rk\x10\x00\x02body"), wal: &msgWAL{id: 7}}
	pub := m.appendPublishRecord(nil, []uint64{1, 2})
	f.Add(uint8(recPublish), pub, uint16(0))
	f.Add(uint8(recAck), binary.BigEndian.AppendUint64([]byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1}, 7), uint16(3))
	f.Add(uint8(recQueueDeclare), queueRecord("/", &queue{name: "q", durable: true, walID: 3}), uint16(40))
	f.Add(uint8(0), []byte{}, uint16(1))
	f.Fuzz(func(t *testing.T, typ uint8, payload []byte, flip uint16) {
		rec := walTestRecord(typ, payload)
		gotTyp, got, n, ok := parseRecord(rec)
		if typ == 0 {
			if ok {
				t.Fatal("accepted a record of type 0")
			}
		} else if !ok || gotTyp != typ || !bytes.Equal(got, payload) || n != len(rec) {
			t.Fatalf("round trip: ok=%v type %d len %d n %d", ok, gotTyp, len(got), n)
		}
		// Any one flipped bit is caught (a flip in the length may only make it short).
		bit := int(flip) % (len(rec) * 8)
		bad := bytes.Clone(rec)
		bad[bit/8] ^= 1 << (bit % 8)
		if _, p, n2, ok := parseRecord(bad); ok && n2 == len(rec) && bytes.Equal(p, payload) && bit/8 >= 4 {
			t.Fatalf("flipped bit %d went unnoticed", bit)
		}
		// Arbitrary bytes as a record, and as a publish payload.
		if _, p, n, ok := parseRecord(payload); ok && (n > len(payload) || len(p) > len(payload)) {
			t.Fatal("parseRecord read past its input")
		}
		if p, ok := splitPublishRecord(payload, len(payload)); ok {
			if len(p.qids) != 8*p.n || len(p.props)+int(p.body) > len(p.rest) {
				t.Fatal("splitPublishRecord returned an impossible record")
			}
			if msg, ok := decodeMessageRecord(p.rest); ok && (int(msg.keyLen)+int(msg.propsLen) > len(msg.data) || msg.size != p.body) {
				t.Fatal("decodeMessageRecord returned an impossible message")
			}
		}
	})
}
