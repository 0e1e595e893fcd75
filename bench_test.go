package amqp

import (
	"bufio"
	"encoding/binary"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// The benchmarks drive a broker with amqp091-go (and, where the client is the bottleneck,
// with the lean raw client below) and report msgs/s. Set AMQP_BENCH_URL to measure another
// broker, for example RabbitMQ, with the very same code:
//
//	go test -run '^$' -bench . -benchtime 200000x
//	AMQP_BENCH_URL=amqp://guest:guest@127.0.0.1:5672/ go test -run '^$' -bench . -benchtime 200000x

// benchURL returns the broker under test: AMQP_BENCH_URL, or an in-process server.
func benchURL(b *testing.B) string {
	if u := os.Getenv("AMQP_BENCH_URL"); u != "" {
		return u
	}
	_, u := newTestServer(b)
	return u
}

func reportRate(b *testing.B, n int, unit string) {
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), unit)
}

// reportLatency reports the median and the 99th percentile of lat, in microseconds.
func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// benchQueue declares a fresh exclusive queue for a benchmark.
func benchQueue(b *testing.B, ch *amqp091.Channel) string {
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		b.Fatal(err)
	}
	return q.Name
}

// waitDepth polls until the queue reports n messages ready.
func waitDepth(b *testing.B, ch *amqp091.Channel, queue string, n int) {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		q, err := ch.QueueDeclarePassive(queue, false, true, true, false, nil)
		if err != nil {
			b.Fatal(err)
		}
		if q.Messages >= n {
			return
		}
		time.Sleep(time.Millisecond)
	}
	b.Fatalf("queue %s never reached %d messages", queue, n)
}

// BenchmarkPublish: one publisher, 16-byte bodies, no consumer; done when the broker has
// queued every message.
func BenchmarkPublish(b *testing.B) {
	u := benchURL(b)
	conn := dial(b, u)
	ch := openChannel(b, conn)
	admin := openChannel(b, conn)
	queue := benchQueue(b, ch)
	body := make([]byte, 16)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := ch.Publish("", queue, false, false, amqp091.Publishing{Body: body}); err != nil {
			b.Fatal(err)
		}
	}
	waitDepth(b, admin, queue, b.N)
	b.StopTimer()
	reportRate(b, b.N, "msgs/s")
}

// BenchmarkEndToEnd: one publisher and one consumer connection, manual ack (multiple, every
// 100), prefetch 1000. Every message is checked to arrive once and in order.
func BenchmarkEndToEnd(b *testing.B) {
	for _, size := range []int{16, 1024} {
		b.Run(strconv.Itoa(size)+"B", func(b *testing.B) { benchEndToEnd(b, size) })
	}
}

func benchEndToEnd(b *testing.B, size int) {
	u := benchURL(b)
	pconn, cconn := dial(b, u), dial(b, u)
	pch, cch := openChannel(b, pconn), openChannel(b, cconn)
	queue := benchQueue(b, cch)
	if err := cch.Qos(1000, 0, false); err != nil {
		b.Fatal(err)
	}
	deliveries, err := cch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		for i := 0; i < b.N; i++ {
			d, ok := <-deliveries
			if !ok {
				done <- errString("consumer closed after " + strconv.Itoa(i))
				return
			}
			if seq := binary.BigEndian.Uint64(d.Body); seq != uint64(i) {
				done <- errString("got message " + strconv.FormatUint(seq, 10) + ", want " + strconv.Itoa(i))
				return
			}
			if i%100 == 99 || i == b.N-1 {
				if err := d.Ack(true); err != nil {
					done <- err
					return
				}
			}
		}
		done <- nil
	}()
	body := make([]byte, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		binary.BigEndian.PutUint64(body, uint64(i))
		if err := pch.Publish("", queue, false, false, amqp091.Publishing{Body: body}); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	reportRate(b, b.N, "msgs/s")
}

type errString string

func (e errString) Error() string { return string(e) }

// BenchmarkConfirm: one publisher in confirm mode with at most 1000 unconfirmed messages.
func BenchmarkConfirm(b *testing.B) {
	u := benchURL(b)
	conn := dial(b, u)
	ch := openChannel(b, conn)
	queue := benchQueue(b, ch)
	if err := ch.Confirm(false); err != nil {
		b.Fatal(err)
	}
	const window = 1000
	confirms := ch.NotifyPublish(make(chan amqp091.Confirmation, window+1))
	body := make([]byte, 16)
	inflight, acked := 0, 0
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for inflight >= window {
			c := <-confirms
			if !c.Ack {
				b.Fatalf("nack for %d", c.DeliveryTag)
			}
			inflight--
			acked++
		}
		if err := ch.Publish("", queue, false, false, amqp091.Publishing{Body: body}); err != nil {
			b.Fatal(err)
		}
		inflight++
	}
	for ; inflight > 0; inflight-- {
		if c := <-confirms; !c.Ack {
			b.Fatalf("nack for %d", c.DeliveryTag)
		}
		acked++
	}
	b.StopTimer()
	if acked != b.N {
		b.Fatalf("%d confirms for %d publishes", acked, b.N)
	}
	reportRate(b, b.N, "msgs/s")
}

// BenchmarkFanout: one publisher to a fanout exchange bound to 10 queues, each with an
// auto-ack consumer on its own connection. Reports published msgs/s and deliveries/s.
func BenchmarkFanout(b *testing.B) {
	const queues = 10
	u := benchURL(b)
	pconn := dial(b, u)
	pch := openChannel(b, pconn)
	exchange := "bench-fanout-" + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(b.N)
	if err := pch.ExchangeDeclare(exchange, "fanout", false, true, false, false, nil); err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := 0; i < queues; i++ {
		cch := openChannel(b, dial(b, u))
		q := benchQueue(b, cch)
		if err := cch.QueueBind(q, "", exchange, false, nil); err != nil {
			b.Fatal(err)
		}
		deliveries, err := cch.Consume(q, "", true, false, false, false, nil)
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < b.N; n++ {
				if _, ok := <-deliveries; !ok {
					return
				}
			}
		}()
	}
	body := make([]byte, 16)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := pch.Publish(exchange, "", false, false, amqp091.Publishing{Body: body}); err != nil {
			b.Fatal(err)
		}
	}
	wg.Wait()
	b.StopTimer()
	reportRate(b, b.N, "msgs/s")
	reportRate(b, b.N*queues, "deliveries/s")
}

// BenchmarkRawEndToEnd is BenchmarkEndToEnd with a lean client that writes pre-encoded
// frames in large batches and parses deliveries without allocating, because amqp091-go
// (one write and flush per publish) is the bottleneck of the benchmarks above.
func BenchmarkRawEndToEnd(b *testing.B) {
	for _, size := range []int{16, 1024, 65536} {
		b.Run(strconv.Itoa(size)+"B", func(b *testing.B) { benchRawEndToEnd(b, size) })
	}
}

func benchRawEndToEnd(b *testing.B, size int) {
	u := benchURL(b)
	admin := openChannel(b, dial(b, u))
	queue := "bench-raw-" + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(b.N) + "-" + strconv.Itoa(size)
	if _, err := admin.QueueDeclare(queue, false, true, false, false, nil); err != nil {
		b.Fatal(err)
	}
	pub, cons := rawDial(b, u), rawDial(b, u)
	cons.writeMethod(1, &basicQos{PrefetchCount: 1000})
	cons.writeMethod(1, &basicConsume{Queue: queue, ConsumerTag: "bench"})
	cons.flush(b)
	cons.expect(b, idBasicQosOk)
	cons.expect(b, idBasicConsumeOk)

	done := make(chan error, 1)
	go func() { done <- cons.consume(b.N) }()

	props := (&properties{}).encode(nil)
	body := make([]byte, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		binary.BigEndian.PutUint64(body, uint64(i))
		pub.buf = appendMethodFrame(pub.buf, 1, &basicPublish{RoutingKey: queue})
		pub.buf = appendContent(pub.buf, 1, props, body, 131072)
		if len(pub.buf) > 64<<10 {
			pub.flush(b)
		}
	}
	pub.flush(b)
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	reportRate(b, b.N, "msgs/s")
	admin.QueueDelete(queue, false, false, false)
}

// rawClient is a minimal AMQP client for benchmarks: channel 1 open, frames written in
// batches.
type rawClient struct {
	nc  net.Conn
	fr  frameReader
	buf []byte
}

func rawDial(b testing.TB, u string) *rawClient {
	pu, err := url.Parse(u)
	if err != nil {
		b.Fatal(err)
	}
	nc, err := net.Dial("tcp", pu.Host)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { nc.Close() })
	user := pu.User.Username()
	pass, _ := pu.User.Password()
	c := &rawClient{nc: nc, fr: frameReader{r: bufio.NewReaderSize(nc, 256<<10), frameMax: 131072}}
	c.buf = append(c.buf, protocolHeader[:]...)
	c.flush(b)
	c.expect(b, idConnectionStart)
	c.writeMethod(0, &connectionStartOk{Mechanism: "PLAIN", Response: "\x00" + user + "\x00" + pass, Locale: "en_US"})
	c.flush(b)
	c.expect(b, idConnectionTune)
	c.writeMethod(0, &connectionTuneOk{ChannelMax: 16, FrameMax: 131072})
	c.writeMethod(0, &connectionOpen{VirtualHost: "/"})
	c.writeMethod(1, &channelOpen{})
	c.flush(b)
	c.expect(b, idConnectionOpenOk)
	c.expect(b, idChannelOpenOk)
	return c
}

func (c *rawClient) writeMethod(ch uint16, m method) { c.buf = appendMethodFrame(c.buf, ch, m) }

func (c *rawClient) flush(b testing.TB) {
	if _, err := c.nc.Write(c.buf); err != nil {
		b.Fatal(err)
	}
	c.buf = c.buf[:0]
}

// expect reads frames until a method frame, which must be id.
func (c *rawClient) expect(b testing.TB, id uint32) {
	for {
		f, err := c.fr.read()
		if err != nil {
			b.Fatal(err)
		}
		if f.typ != frameMethod {
			continue
		}
		got, _, err := methodHeader(f.payload)
		if err != nil || got != id {
			b.Fatalf("got %s, want %s", methodName(got), methodName(id))
		}
		return
	}
}

// consume reads n deliveries, checks their sequence numbers, and acks every 100.
func (c *rawClient) consume(n int) error {
	var tag uint64
	next := 0
	var ack []byte
	for next < n {
		f, err := c.fr.read()
		if err != nil {
			return err
		}
		switch f.typ {
		case frameMethod:
			id, d, _ := methodHeader(f.payload)
			if id != idBasicDeliver {
				return errString("unexpected " + methodName(id))
			}
			d.shortstrBytes()
			tag = d.longlong()
		case frameBody:
			if seq := binary.BigEndian.Uint64(f.payload); seq != uint64(next) {
				return errString("got message " + strconv.FormatUint(seq, 10) + ", want " + strconv.Itoa(next))
			}
			next++
			if next%100 == 0 || next == n {
				ack = appendMethodFrame(ack[:0], 1, &basicAck{DeliveryTag: tag, Multiple: true})
				if _, err := c.nc.Write(ack); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// BenchmarkDataDirShrinks publishes 1 GiB of persistent 1 KiB messages with confirms to a
// durable queue while a consumer acks them, then reports how long compaction takes to bring
// the data directory back to one segment plus the checkpoint, and what is left. Run it
// alone: go test -run '^$' -bench DataDirShrinks -benchtime 1x
func BenchmarkDataDirShrinks(b *testing.B) {
	const body, total = 1024, 1 << 30
	dir := b.TempDir()
	_, u := newTestServer(b, Config{DataDir: dir})
	pconn, cconn := dial(b, u), dial(b, u)
	pch, cch := openChannel(b, pconn), openChannel(b, cconn)
	if _, err := pch.QueueDeclare("shrink", true, false, false, false, nil); err != nil {
		b.Fatal(err)
	}
	if err := pch.Confirm(false); err != nil {
		b.Fatal(err)
	}
	confirms := pch.NotifyPublish(make(chan amqp091.Confirmation, 1001))
	if err := cch.Qos(1000, 0, false); err != nil {
		b.Fatal(err)
	}
	deliveries, err := cch.Consume("shrink", "", false, false, false, false, nil)
	if err != nil {
		b.Fatal(err)
	}
	n := total / body
	consumed := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			d, ok := <-deliveries
			if !ok {
				consumed <- errString("consumer closed")
				return
			}
			if i%100 == 99 || i == n-1 {
				if err := d.Ack(true); err != nil {
					consumed <- err
					return
				}
			}
		}
		consumed <- nil
	}()
	msg := amqp091.Publishing{DeliveryMode: amqp091.Persistent, Body: make([]byte, body)}
	inflight := 0
	b.ResetTimer()
	for i := 0; i < n; i++ {
		for ; inflight >= 1000; inflight-- {
			<-confirms
		}
		if err := pch.Publish("", "shrink", false, false, msg); err != nil {
			b.Fatal(err)
		}
		inflight++
	}
	for ; inflight > 0; inflight-- {
		<-confirms
	}
	if err := <-consumed; err != nil {
		b.Fatal(err)
	}
	drained := time.Now()
	var segs []string
	deadline := time.Now().Add(time.Minute)
	for {
		segs, _ = filepath.Glob(filepath.Join(dir, "wal", "*.seg"))
		if len(segs) <= 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.StopTimer()
	var size int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			size += fi.Size()
		}
		return nil
	})
	if len(segs) > 1 {
		b.Errorf("%d segments left a minute after the last ack", len(segs))
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "msgs/s")
	b.ReportMetric(float64(len(segs)), "segments")
	b.ReportMetric(float64(size)/(1<<20), "dir-MiB")
	b.ReportMetric(time.Since(drained).Seconds(), "shrink-s")
}

// BenchmarkTopicWorstCase matches routing keys of one-letter words against binding keys
// full of "#", the patterns that make a backtracking matcher exponential. Routing runs
// under the vhost's read lock, so a slow match stalls every declare and bind in the vhost.
func BenchmarkTopicWorstCase(b *testing.B) {
	key128 := strings.Repeat("a.", 127) + "a" // 255 bytes, the longest routing key
	for _, bc := range []struct {
		name, pattern, key string
		match              bool
	}{
		{"hash12-words24", strings.Repeat("#.", 11) + "#", strings.Repeat("a.", 23) + "a", true},
		{"hash128-words128", strings.Repeat("#.", 127) + "#", key128, true},
		{"hash-a-words128", strings.Repeat("#.a.", 63) + "#.a", key128, true},
		{"hash-a-b-words128", strings.Repeat("#.a.", 63) + "#.b", key128, false},
		{"hash-b-words128", "#.b", key128, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var root topicNode
			root.add(&binding{queue: &queue{name: "q"}, key: bc.pattern})
			key := []byte(bc.key)
			var rs routeSet
			b.ReportAllocs()
			for b.Loop() {
				rs.reset()
				rs.words = splitWords(rs.words[:0], key)
				root.match(rs.words, 0, &rs)
				if (len(rs.hits) == 1) != bc.match {
					b.Fatalf("pattern %q key %q: matched %d bindings", bc.pattern, bc.key, len(rs.hits))
				}
			}
			reportRate(b, b.N, "msgs/s")
		})
	}
}

// BenchmarkBacklogMemory measures the heap a queued message costs in a durable queue
// (heap growth after a collection ÷ messages), persistent and transient, with bodies paged
// out past the default PageOutBytes and with every body kept in memory. b.N is the number of messages:
//
//	go test -run '^$' -bench BacklogMemory -benchtime 200000x
func BenchmarkBacklogMemory(b *testing.B) {
	for _, bc := range []struct {
		name      string
		pageOut   int64
		size      int
		transient bool
	}{
		{"paged-100B", 0, 100, false}, {"inmemory-100B", -1, 100, false},
		{"paged-1KiB", 0, 1024, false}, {"inmemory-1KiB", -1, 1024, false},
		{"transient-paged-100B", 0, 100, true}, {"transient-paged-1KiB", 0, 1024, true}, {"transient-inmemory-1KiB", -1, 1024, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			srv, _ := newTestServer(b, Config{PageOutBytes: bc.pageOut})
			w := dialFrameClient(b, srv)
			w.send(1, &queueDeclare{Queue: "backlog", Durable: true})
			w.expect(1, idQueueDeclareOk)
			mode := uint8(2)
			if bc.transient {
				mode = 1
			}
			props := (&properties{DeliveryMode: mode}).encode(nil)
			body := make([]byte, bc.size)
			runtime.GC()
			var before runtime.MemStats
			runtime.ReadMemStats(&before)
			var batch []byte
			for i := range b.N {
				binary.BigEndian.PutUint32(body, uint32(i))
				batch = appendMethodFrame(batch, 1, &basicPublish{RoutingKey: "backlog"})
				batch = appendContent(batch, 1, props, body, defaultFrameMax)
				if len(batch) > 256<<10 || i == b.N-1 {
					w.write(batch)
					batch = batch[:0]
				}
			}
			w.send(1, &queueDeclare{Queue: "backlog", Durable: true, Passive: true})
			ok := w.expect(1, idQueueDeclareOk).(*queueDeclareOk)
			if int(ok.MessageCount) != b.N {
				b.Fatalf("%d messages queued, want %d", ok.MessageCount, b.N)
			}
			if err := srv.store.sync(); err != nil {
				b.Fatal(err)
			}
			runtime.GC()
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(b.N), "heap-B/msg")
			reportRate(b, b.N, "msgs/s")
		})
	}
}

// BenchmarkBacklogDrain measures how fast a backlog that is paged out (every message on
// disk, past a PageOutBytes of 0) drains to a raw consumer acking every 100: the read back,
// delivery and settlement of each message. b.N messages are queued before the timer starts:
//
//	go test -run '^$' -bench BacklogDrain -benchtime 1000000x
func BenchmarkBacklogDrain(b *testing.B) {
	for _, bc := range []struct {
		name       string
		size       int
		persistent bool
	}{{"persistent-100B", 100, true}, {"transient-100B", 100, false}, {"persistent-1KiB", 1024, true}} {
		b.Run(bc.name, func(b *testing.B) {
			_, u := newTestServer(b, Config{PageOutBytes: 0})
			pub := rawDial(b, u)
			pub.writeMethod(1, &queueDeclare{Queue: "backlog", Durable: true})
			pub.flush(b)
			pub.expect(b, idQueueDeclareOk)
			mode := uint8(1)
			if bc.persistent {
				mode = 2
			}
			props := (&properties{DeliveryMode: mode}).encode(nil)
			body := make([]byte, bc.size)
			for i := range b.N {
				binary.BigEndian.PutUint64(body, uint64(i))
				pub.buf = appendMethodFrame(pub.buf, 1, &basicPublish{RoutingKey: "backlog"})
				pub.buf = appendContent(pub.buf, 1, props, body, 131072)
				if len(pub.buf) > 64<<10 {
					pub.flush(b)
				}
			}
			pub.writeMethod(1, &queueDeclare{Queue: "backlog", Durable: true, Passive: true})
			pub.flush(b)
			pub.expect(b, idQueueDeclareOk)
			cons := rawDial(b, u)
			cons.writeMethod(1, &basicQos{PrefetchCount: 1000})
			cons.flush(b)
			cons.expect(b, idBasicQosOk)
			b.ResetTimer()
			cons.writeMethod(1, &basicConsume{Queue: "backlog", ConsumerTag: "drain"})
			cons.flush(b)
			cons.expect(b, idBasicConsumeOk)
			if err := cons.consume(b.N); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			reportRate(b, b.N, "msgs/s")
		})
	}
}

// BenchmarkPriorityQueue: a raw publisher sends b.N 16-byte messages of priorities 0-9 to a
// queue with x-max-priority 10 while a raw consumer (prefetch 1000, acking every 100)
// takes them: end-to-end msgs/s through a priority queue.
func BenchmarkPriorityQueue(b *testing.B) {
	_, u := newTestServer(b)
	pub, cons := rawDial(b, u), rawDial(b, u)
	pub.writeMethod(1, &queueDeclare{Queue: "prio", Arguments: table{"x-max-priority": int32(10)}})
	pub.flush(b)
	pub.expect(b, idQueueDeclareOk)
	cons.writeMethod(1, &basicQos{PrefetchCount: 1000})
	cons.writeMethod(1, &basicConsume{Queue: "prio", ConsumerTag: "bench"})
	cons.flush(b)
	cons.expect(b, idBasicQosOk)
	cons.expect(b, idBasicConsumeOk)
	done := make(chan error, 1)
	go func() { done <- cons.count(b.N) }()
	var props [10][]byte
	for p := range props {
		props[p] = (&properties{Priority: uint8(p)}).encode(nil)
	}
	body := make([]byte, 16)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		pub.buf = appendMethodFrame(pub.buf, 1, &basicPublish{RoutingKey: "prio"})
		pub.buf = appendContent(pub.buf, 1, props[i%10], body, 131072)
		if len(pub.buf) > 64<<10 {
			pub.flush(b)
		}
	}
	pub.flush(b)
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	reportRate(b, b.N, "msgs/s")
}

// BenchmarkDeadLetter: b.N 16-byte messages published to a queue with x-message-ttl 0 and a
// dead-letter exchange, so each is dead-lettered at once into a queue a raw consumer
// drains: dead-lettered msgs/s, headers and all.
func BenchmarkDeadLetter(b *testing.B) {
	_, u := newTestServer(b)
	pub, cons := rawDial(b, u), rawDial(b, u)
	pub.writeMethod(1, &exchangeDeclare{Exchange: "dlx", Type: kindFanout})
	pub.writeMethod(1, &queueDeclare{Queue: "dlq"})
	pub.writeMethod(1, &queueBind{Queue: "dlq", Exchange: "dlx"})
	pub.writeMethod(1, &queueDeclare{Queue: "short", Arguments: table{"x-message-ttl": int32(0), "x-dead-letter-exchange": "dlx"}})
	pub.flush(b)
	pub.expect(b, idExchangeDeclareOk)
	pub.expect(b, idQueueDeclareOk)
	pub.expect(b, idQueueBindOk)
	pub.expect(b, idQueueDeclareOk)
	cons.writeMethod(1, &basicQos{PrefetchCount: 1000})
	cons.writeMethod(1, &basicConsume{Queue: "dlq", ConsumerTag: "bench"})
	cons.flush(b)
	cons.expect(b, idBasicQosOk)
	cons.expect(b, idBasicConsumeOk)
	done := make(chan error, 1)
	go func() { done <- cons.consume(b.N) }()
	props := (&properties{}).encode(nil)
	body := make([]byte, 16)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		binary.BigEndian.PutUint64(body, uint64(i))
		pub.buf = appendMethodFrame(pub.buf, 1, &basicPublish{RoutingKey: "short"})
		pub.buf = appendContent(pub.buf, 1, props, body, 131072)
		if len(pub.buf) > 64<<10 {
			pub.flush(b)
		}
	}
	pub.flush(b)
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	reportRate(b, b.N, "msgs/s")
}

// count reads n deliveries in any order and acks every 100.
func (c *rawClient) count(n int) error {
	var tag uint64
	var ack []byte
	for got := 0; got < n; {
		f, err := c.fr.read()
		if err != nil {
			return err
		}
		switch f.typ {
		case frameMethod:
			id, d, _ := methodHeader(f.payload)
			if id != idBasicDeliver {
				return errString("unexpected " + methodName(id))
			}
			d.shortstrBytes()
			tag = d.longlong()
		case frameBody:
			got++
			if got%100 == 0 || got == n {
				ack = appendMethodFrame(ack[:0], 1, &basicAck{DeliveryTag: tag, Multiple: true})
				if _, err := c.nc.Write(ack); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// BenchmarkDelayed: one raw publisher sends b.N messages through an x-delayed-message
// exchange with delays of 1 to 100 ms, one raw consumer takes them from the bound queue;
// msgs/s from the first publish to the last delivery (scheduling, holding, routing when
// due, delivering). Transient messages, and persistent ones to a durable exchange and queue
// (each logged when held and its move to the queue logged when due):
//
//	go test -run '^$' -bench Delayed -benchtime 200000x
func BenchmarkDelayed(b *testing.B) {
	for _, bc := range []struct {
		name    string
		durable bool
	}{{"transient", false}, {"persistent", true}} {
		b.Run(bc.name, func(b *testing.B) {
			_, u := newTestServer(b)
			pub, cons := rawDial(b, u), rawDial(b, u)
			pub.writeMethod(1, &exchangeDeclare{Exchange: "dx", Type: kindDelayed, Durable: bc.durable, Arguments: table{"x-delayed-type": "direct"}})
			pub.writeMethod(1, &queueDeclare{Queue: "dq", Durable: bc.durable})
			pub.writeMethod(1, &queueBind{Queue: "dq", Exchange: "dx", RoutingKey: "k"})
			pub.flush(b)
			pub.expect(b, idExchangeDeclareOk)
			pub.expect(b, idQueueDeclareOk)
			pub.expect(b, idQueueBindOk)
			cons.writeMethod(1, &basicQos{PrefetchCount: 1000})
			cons.writeMethod(1, &basicConsume{Queue: "dq", ConsumerTag: "bench"})
			cons.flush(b)
			cons.expect(b, idBasicQosOk)
			cons.expect(b, idBasicConsumeOk)
			mode := uint8(1)
			if bc.durable {
				mode = 2
			}
			var props [100][]byte
			for i := range props {
				props[i] = (&properties{DeliveryMode: mode, Headers: table{"x-delay": int32(i + 1)}}).encode(nil)
			}
			done := make(chan error, 1)
			go func() { done <- cons.count(b.N) }()
			body := make([]byte, 16)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				binary.BigEndian.PutUint64(body, uint64(i))
				pub.buf = appendMethodFrame(pub.buf, 1, &basicPublish{Exchange: "dx", RoutingKey: "k"})
				pub.buf = appendContent(pub.buf, 1, props[i%len(props)], body, 131072)
				if len(pub.buf) > 64<<10 {
					pub.flush(b)
				}
			}
			pub.flush(b)
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			reportRate(b, b.N, "msgs/s")
		})
	}
}

// BenchmarkDelayedHeldMemory measures the heap a held delayed message costs (heap growth
// after a collection ÷ messages), 16-byte bodies held for an hour, transient ones by a
// transient exchange and persistent ones by a durable exchange:
//
//	go test -run '^$' -bench DelayedHeldMemory -benchtime 1000000x
func BenchmarkDelayedHeldMemory(b *testing.B) {
	for _, bc := range []struct {
		name    string
		durable bool
	}{{"transient", false}, {"persistent", true}} {
		b.Run(bc.name, func(b *testing.B) {
			srv, _ := newTestServer(b)
			w := dialFrameClient(b, srv)
			w.send(1, &exchangeDeclare{Exchange: "dx", Type: kindDelayed, Durable: bc.durable, Arguments: table{"x-delayed-type": "direct"}})
			w.expect(1, idExchangeDeclareOk)
			mode := uint8(1)
			if bc.durable {
				mode = 2
			}
			props := (&properties{DeliveryMode: mode, Headers: table{"x-delay": int32(3_600_000)}}).encode(nil)
			publish := appendMethodFrame(nil, 1, &basicPublish{Exchange: "dx", RoutingKey: "k"})
			body := make([]byte, 16)
			runtime.GC()
			var before runtime.MemStats
			runtime.ReadMemStats(&before)
			var batch []byte
			for i := range b.N {
				binary.BigEndian.PutUint64(body, uint64(i))
				batch = appendContent(append(batch, publish...), 1, props, body, defaultFrameMax)
				if len(batch) > 256<<10 || i == b.N-1 {
					w.write(batch)
					batch = batch[:0]
				}
			}
			deadline := time.Now().Add(time.Minute)
			for srv.delays.len() < b.N {
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d messages held", srv.delays.len(), b.N)
				}
				time.Sleep(time.Millisecond)
			}
			if err := srv.store.sync(); err != nil {
				b.Fatal(err)
			}
			runtime.GC()
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(b.N), "heap-B/msg")
			reportRate(b, b.N, "msgs/s")
		})
	}
}

// BenchmarkMetricsPerObject times a /metrics/per-object scrape of 100,000 queues (the
// issue asks for well under a second), written as the handler writes it.
func BenchmarkMetricsPerObject(b *testing.B) {
	const queues = 100_000
	srv := metricsQueues(b, queues)
	var out countingWriter
	b.ReportAllocs()
	for b.Loop() {
		if err := srv.writeMetrics(&out, true); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(out.n)/float64(b.N), "bytes/scrape")
	reportRate(b, b.N*queues, "queues/s")
}

// countingWriter discards what is written to it, counting the octets.
type countingWriter struct{ n int }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	return len(p), nil
}

// BenchmarkCountingHotPath is what counting adds to one message of BenchmarkRawEndToEnd's
// path, alone: received (size histogram) and routed to one queue, counted by the reader;
// delivered to a consumer that acks, counted by the queue; its share of an ack of 100
// (multiple); and of the reader's flush of its counts, here once per 100 messages (a
// 16 KiB read holds about 200 such publishes).
func BenchmarkCountingHotPath(b *testing.B) {
	c := &conn{}
	ch := newChannel(c, 1)
	q := &queue{}
	done := make([]unacked, 100)
	for i := range done {
		done[i].q = q
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		ch.countReceived(16)
		ch.countRouted(1, false)
		q.countDeliveryLocked(false, false, false)
		if i++; i == len(done) {
			ch.countSettled(idBasicAck, done)
			c.flushCounts()
			i = 0
		}
	}
	c.flushCounts()
	if got := c.stats.get().n[cntAcknowledged].Load() + uint64(i); got != uint64(b.N) || q.unackedLocked() != int64(i) {
		b.Fatalf("counted %d acks (%d unacked) for %d messages", got, q.unackedLocked(), b.N)
	}
}

// BenchmarkQueueScale declares 100,000 transient queues, each bound once to one exchange
// of each type, then unbinds every other one and deletes them all, the last first: the
// heap a queue with its binding costs (heap growth after a collection ÷ queues), and the
// binds, unbinds and deletes a second, which stay flat only if none of them scans the
// exchange's bindings. Frames are pipelined, with no-wait, over one raw connection:
//
//	go test -run '^$' -bench QueueScale -benchtime 1x
func BenchmarkQueueScale(b *testing.B) {
	const n = 100_000
	for _, kind := range []string{kindDirect, kindFanout, kindTopic, kindHeaders} {
		b.Run(kind, func(b *testing.B) {
			var binds, unbinds, deletes time.Duration
			var heap float64
			for b.Loop() {
				srv, _ := newTestServer(b)
				w := dialFrameClient(b, srv)
				w.send(1, &exchangeDeclare{Exchange: "scale", Type: kind})
				w.expect(1, idExchangeDeclareOk)
				names := make([]string, n)
				args := make([]table, n)
				for i := range names {
					names[i] = "q-" + strconv.Itoa(n + i)[1:]
					if kind == kindHeaders {
						args[i] = table{"x-match": "any", "q": names[i]}
					}
				}
				sync := func() {
					// The broker may take longer than recvWait over a phase's backlog.
					w.send(1, &exchangeDeclare{Exchange: "scale", Passive: true})
					w.nc.SetReadDeadline(time.Now().Add(10 * time.Minute))
					if _, err := w.fr.r.Peek(1); err != nil {
						b.Fatal(err)
					}
					w.expect(1, idExchangeDeclareOk)
				}
				// pipeline writes what each appends, n times, in batches, then reads the
				// replies to the batch (reply: what each method answers; 0 for no-wait).
				pipeline := func(reply uint32, each func(buf []byte, i int) []byte) time.Duration {
					start := time.Now()
					var buf []byte
					pending := 0
					for i := range n {
						if l := len(buf); reply != 0 {
							if buf = each(buf, i); len(buf) > l {
								pending++
							}
						} else {
							buf = each(buf, i)
						}
						if len(buf) > 64<<10 || i == n-1 {
							w.write(buf)
							buf = buf[:0]
							for ; pending > 0; pending-- {
								w.expect(1, reply)
							}
						}
					}
					sync()
					return time.Since(start)
				}
				runtime.GC()
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				binds += pipeline(0, func(buf []byte, i int) []byte {
					buf = appendMethodFrame(buf, 1, &queueDeclare{Queue: names[i], NoWait: true})
					return appendMethodFrame(buf, 1, &queueBind{Queue: names[i], Exchange: "scale", RoutingKey: names[i], NoWait: true, Arguments: args[i]})
				})
				runtime.GC()
				runtime.ReadMemStats(&after)
				heap += float64(int64(after.HeapAlloc) - int64(before.HeapAlloc))
				unbinds += pipeline(idQueueUnbindOk, func(buf []byte, i int) []byte {
					if i%2 != 0 {
						return buf
					}
					return appendMethodFrame(buf, 1, &queueUnbind{Queue: names[i], Exchange: "scale", RoutingKey: names[i], Arguments: args[i]})
				})
				deletes += pipeline(0, func(buf []byte, i int) []byte {
					return appendMethodFrame(buf, 1, &queueDelete{Queue: names[n-1-i], NoWait: true})
				})
				srv.vhost("/").mu.RLock()
				left := len(srv.vhost("/").queues)
				srv.vhost("/").mu.RUnlock()
				if left != 0 {
					b.Fatalf("%d queues left", left)
				}
			}
			b.ReportMetric(heap/float64(b.N*n), "heap-B/queue")
			b.ReportMetric(float64(b.N*n)/binds.Seconds(), "binds/s")
			b.ReportMetric(float64(b.N*n/2)/unbinds.Seconds(), "unbinds/s")
			b.ReportMetric(float64(b.N*n)/deletes.Seconds(), "deletes/s")
		})
	}
}
