package amqp

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

var crashRounds = flag.Int("crash.rounds", 3, "rounds of TestCrashRecovery (1 with -short)")

// crashSegment is small so that segments roll and compaction runs while the broker is
// killed: a crash during compaction must lose nothing either.
var crashSegment = flag.Int("crash.segment", 64<<10, "amqpd -segment-size in TestCrashRecovery")

// TestCrashRecovery runs amqpd as a child process, publishes persistent messages with
// confirms from four connections while a consumer holds some deliveries unacked, kills the
// broker with SIGKILL at a random moment, restarts it on the same data directory, and
// checks that every confirmed message that was not acked is there exactly once, nothing is
// there twice, and the deliveries that were unacked come back redelivered.
//
// It does not run in parallel: a child being forked holds copies of the test binary's file
// descriptors until it execs, among them the LOCK files of in-process brokers restarting.
func TestCrashRecovery(t *testing.T) {
	if runtime.GOOS == "windows" || runtime.GOOS == "plan9" {
		t.Skip("needs SIGKILL")
	}
	bin := amqpdBinary(t)

	rounds := *crashRounds
	if testing.Short() {
		rounds = 1
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	for r := 0; r < rounds; r++ {
		load := time.Duration(100+rng.IntN(501)) * time.Millisecond
		// Odd rounds keep almost every body in the log only (paged), as a long queue does.
		pageOut := "4194304"
		if r%2 == 1 {
			pageOut = "1024"
		}
		t.Run(fmt.Sprintf("round%d-load%v-pageout%s", r, load, pageOut), func(t *testing.T) {
			crashRound(t, bin, load, "-page-out-bytes", pageOut)
		})
	}
}

// amqpdProcess is a broker child process.
type amqpdProcess struct {
	t      testing.TB
	cmd    *exec.Cmd
	url    string
	output *lockedBuffer
	exited chan error
	done   bool
}

// startAmqpd starts amqpd on dir and a free loopback port, and waits until it accepts
// AMQP connections.
func startAmqpd(t testing.TB, bin, dir string, extra ...string) *amqpdProcess {
	t.Helper()
	var last string
	for attempt := 0; attempt < 3; attempt++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		p := &amqpdProcess{t: t, output: &lockedBuffer{}, exited: make(chan error, 1), url: "amqp://guest:guest@" + addr + "/"}
		args := []string{"-addr", addr, "-data-dir", dir, "-log-level", "warn", "-segment-size", strconv.Itoa(*crashSegment)}
		p.cmd = exec.Command(bin, append(args, extra...)...)
		p.cmd.Stdout, p.cmd.Stderr = p.output, p.output
		if err := p.cmd.Start(); err != nil {
			t.Fatalf("start amqpd: %v", err)
		}
		go func() { p.exited <- p.cmd.Wait() }()
		t.Cleanup(p.kill)
		deadline := time.Now().Add(30 * time.Second)
		for {
			select {
			case err := <-p.exited:
				p.done = true
				last = fmt.Sprintf("amqpd exited: %v\n%s", err, p.output.String())
			default:
			}
			if p.done {
				break // the port was taken in between, perhaps: try another
			}
			c, err := amqp091.DialConfig(p.url, amqp091.Config{Dial: amqp091.DefaultDial(time.Second)})
			if err == nil {
				c.Close()
				return p
			}
			if time.Now().After(deadline) {
				t.Fatalf("amqpd on %s not ready after 30s: %v\n%s", addr, err, p.output.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	t.Fatalf("amqpd did not start: %s", last)
	return nil
}

// kill sends SIGKILL and waits for the process; it may be called more than once.
func (p *amqpdProcess) kill() {
	if p.done {
		return
	}
	p.done = true
	p.cmd.Process.Kill()
	select {
	case <-p.exited:
	case <-time.After(walWait):
		p.t.Errorf("amqpd did not exit after SIGKILL")
	}
}

// crashLedger records what clients saw before the crash.
type crashLedger struct {
	mu        sync.Mutex
	published map[string]bool // publish sent
	confirmed map[string]bool // basic.ack received
	acked     map[string]bool // delivered and acked by the consumer
	held      map[string]bool // delivered and never acked
}

func (l *crashLedger) mark(m map[string]bool, id string) {
	l.mu.Lock()
	m[id] = true
	l.mu.Unlock()
}

// crashPublisher publishes persistent messages with confirms, at most 64 unconfirmed, until
// stop or until the connection dies.
func crashPublisher(url string, g int, stop <-chan struct{}, l *crashLedger) error {
	conn, err := amqp091.Dial(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.Confirm(false); err != nil {
		return err
	}
	confirms := ch.NotifyPublish(make(chan amqp091.Confirmation, 128))
	var ids []string // by delivery tag - 1
	take := func(c amqp091.Confirmation) error {
		if !c.Ack {
			return fmt.Errorf("publisher %d: nack for %s", g, ids[c.DeliveryTag-1])
		}
		l.mark(l.confirmed, ids[c.DeliveryTag-1])
		return nil
	}
	outstanding := 0
	for n := 0; ; n++ {
		select {
		case <-stop:
			return nil
		default:
		}
		for outstanding >= 64 {
			c, ok := <-confirms
			if !ok {
				return nil // the broker is gone
			}
			if err := take(c); err != nil {
				return err
			}
			outstanding--
		}
		id := fmt.Sprintf("g%d-%06d", g, n)
		ids = append(ids, id)
		l.mark(l.published, id)
		if ch.Publish("", "crash.q", false, false, amqp091.Publishing{DeliveryMode: amqp091.Persistent, MessageId: id, Body: []byte(id)}) != nil {
			return nil
		}
		outstanding++
		for drained := false; !drained; {
			select {
			case c, ok := <-confirms:
				if !ok {
					return nil
				}
				if err := take(c); err != nil {
					return err
				}
				outstanding--
			default:
				drained = true
			}
		}
	}
}

// crashConsumer acks every other delivery and holds the rest; prefetch bounds what it holds.
func crashConsumer(url string, ready chan<- error, l *crashLedger) {
	conn, err := amqp091.Dial(url)
	if err != nil {
		ready <- err
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err == nil {
		err = ch.Qos(100, 0, false)
	}
	var msgs <-chan amqp091.Delivery
	if err == nil {
		msgs, err = ch.Consume("crash.q", "", false, false, false, false, nil)
	}
	ready <- err
	if err != nil {
		return
	}
	n := 0
	for d := range msgs { // closed when the broker dies
		if n++; n%2 == 0 && d.Ack(false) == nil {
			l.mark(l.acked, d.MessageId)
		} else {
			l.mark(l.held, d.MessageId)
		}
	}
}

func crashRound(t *testing.T, bin string, load time.Duration, extra ...string) {
	dir := t.TempDir()
	p := startAmqpd(t, bin, dir, extra...)
	setup := dial(t, p.url)
	if _, err := openChannel(t, setup).QueueDeclare("crash.q", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}

	l := &crashLedger{published: map[string]bool{}, confirmed: map[string]bool{}, acked: map[string]bool{}, held: map[string]bool{}}
	consumerReady := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		crashConsumer(p.url, consumerReady, l)
	}()
	if err := <-consumerReady; err != nil {
		t.Fatalf("consumer: %v", err)
	}
	stop := make(chan struct{})
	errs := make(chan error, 4)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- crashPublisher(p.url, g, stop, l)
		}()
	}
	timer := time.NewTimer(load) // the random moment of the crash, not a wait for state
	<-timer.C
	p.kill()
	close(stop)
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		close(finished)
	}()
	select {
	case <-finished:
	case <-time.After(walWait):
		t.Fatal("clients did not notice the broker's death")
	}
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("publisher: %v", err)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.confirmed) == 0 || len(l.held) == 0 {
		t.Fatalf("only %d confirmed and %d held deliveries before the crash; the load did not get going", len(l.confirmed), len(l.held))
	}

	p2 := startAmqpd(t, bin, dir, extra...)
	conn := dial(t, p2.url)
	ch := openChannel(t, conn)
	q, err := ch.QueueDeclarePassive("crash.q", true, false, false, false, nil)
	if err != nil {
		t.Fatalf("durable queue lost in the crash: %v", err)
	}
	msgs, err := ch.Consume("crash.q", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := make(map[string]int)
	redelivered := make(map[string]bool)
	for i := 0; i < q.Messages; i++ {
		select {
		case d := <-msgs:
			got[d.MessageId]++
			redelivered[d.MessageId] = d.Redelivered
			if !l.published[d.MessageId] {
				t.Errorf("recovered %q, which was never published", d.MessageId)
			}
		case <-time.After(walWait):
			t.Fatalf("consumed %d of %d recovered messages", i, q.Messages)
		}
	}
	if n := queueDepth(t, conn, "crash.q"); n != 0 {
		t.Errorf("%d messages beyond the %d the passive declare reported", n, q.Messages)
	}

	var missing, twice, notRedelivered []string
	for id, n := range got {
		if n > 1 {
			twice = append(twice, id)
		}
	}
	for id := range l.confirmed {
		if !l.acked[id] && got[id] == 0 {
			missing = append(missing, id)
		}
	}
	for id := range l.held {
		if got[id] > 0 && !redelivered[id] {
			notRedelivered = append(notRedelivered, id)
		}
	}
	report := func(what string, ids []string) {
		if len(ids) > 0 {
			sort.Strings(ids)
			t.Errorf("%d %s, e.g. %s", len(ids), what, strings.Join(ids[:min(len(ids), 10)], " "))
		}
	}
	report("confirmed, unacked messages missing after the crash", missing)
	report("messages recovered more than once", twice)
	report("delivered-but-unacked messages recovered without redelivered", notRedelivered)
	heldBack := 0
	for id := range l.held {
		if got[id] > 0 {
			heldBack++
		}
	}
	t.Logf("published %d, confirmed %d, acked %d, held %d (%d back); recovered %d",
		len(l.published), len(l.confirmed), len(l.acked), len(l.held), heldBack, q.Messages)
	if t.Failed() {
		t.Logf("data directory %s; amqpd output:\n%s%s", dir, p.output.String(), p2.output.String())
	}
}
