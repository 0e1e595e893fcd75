package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/maxpert/amqp-go"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// apiDaemon is an in-process broker with its management API, for the API verbs.
type apiDaemon struct {
	srv  *amqp.Server
	node string // -node flag
	url  string // AMQP URL
}

func startAPIDaemon(t *testing.T) *apiDaemon {
	t.Helper()
	srv := amqp.NewServer(amqp.Config{Definitions: filepath.Join(t.TempDir(), "defs.json"), DataDir: t.TempDir(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	hs := httptest.NewServer(srv.ManagementHandler())
	t.Cleanup(func() {
		hs.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return &apiDaemon{srv: srv, node: "-node=" + hs.URL, url: "amqp://guest:guest@" + srv.Addr().String() + "/"}
}

// apiVerb runs an API verb and returns its exit code, stdout and stderr.
func apiVerb(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func mustAPIVerb(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errOut := apiVerb(args...)
	if code != 0 {
		t.Fatalf("amqpd %s: exit %d, %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// TestAPIVerbs drives a broker with the verbs that call its API: lists with rabbitmqctl's
// columns, purge, delete, close_connection, export and import, redrive, and the alarms'
// limits.
func TestAPIVerbs(t *testing.T) {
	unsetDaemonEnv(t)
	d := startAPIDaemon(t)
	conn, err := amqp091.Dial(d.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"work", "dlq"} {
		if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.ExchangeDeclare("dlx", "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind("dlq", "", "dlx", false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare("src", true, false, false, false, amqp091.Table{"x-dead-letter-exchange": "dlx"}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		ch.Publish("", "work", false, false, amqp091.Publishing{Body: []byte("m")})
	}
	ch.Publish("", "src", false, false, amqp091.Publishing{Body: []byte("poison")})
	if _, err := ch.Consume("work", "tag1", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		g, ok, err := ch.Get("src", false)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			g.Reject(false)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the message for src never arrived")
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for end := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatal(what)
			}
		}
	}
	waitFor("the rejected message in dlq", func() bool {
		return strings.Contains(mustAPIVerb(t, "list_queues", d.node, "name", "messages"), "dlq\t1")
	})
	out := mustAPIVerb(t, "list_queues", d.node, "name", "messages_unacknowledged", "consumers")
	if !strings.HasPrefix(out, "name\tmessages_unacknowledged\tconsumers\n") || !strings.Contains(out, "work\t3\t1\n") {
		t.Errorf("list_queues: %q", out)
	}
	if out := mustAPIVerb(t, "list_bindings", d.node, "source_name", "source_kind", "destination_name", "routing_key"); !strings.Contains(out, "dlx\texchange\tdlq\t\n") {
		t.Errorf("list_bindings: %q", out)
	}
	if out := mustAPIVerb(t, "list_exchanges", "-p", "/", d.node); !strings.Contains(out, "dlx\tfanout\n") {
		t.Errorf("list_exchanges: %q", out)
	}
	if out := mustAPIVerb(t, "list_consumers", d.node, "queue_name", "consumer_tag", "ack_required"); !strings.Contains(out, "work\ttag1\ttrue\n") {
		t.Errorf("list_consumers: %q", out)
	}
	out = mustAPIVerb(t, "redrive", d.node, "dlq")
	if out != "moved 1 messages back from dlq\n" {
		t.Errorf("redrive: %q", out)
	}
	if out := mustAPIVerb(t, "list_queues", d.node); !strings.Contains(out, "src\t1\n") || !strings.Contains(out, "dlq\t0\n") {
		t.Errorf("after redrive: %q", out)
	}
	mustAPIVerb(t, "purge_queue", d.node, "src")
	mustAPIVerb(t, "delete_queue", d.node, "dlq")

	file := filepath.Join(t.TempDir(), "export.json")
	mustAPIVerb(t, "export_definitions", d.node, file)
	var exported struct{ Queues []struct{ Name string } }
	raw, _ := os.ReadFile(file)
	if err := json.Unmarshal(raw, &exported); err != nil || len(exported.Queues) != 2 {
		t.Errorf("export: %v %s", err, raw)
	}
	if out := mustAPIVerb(t, "cluster_status", d.node); !strings.Contains(out, "a single node, not clustered") {
		t.Errorf("cluster_status of a single node: %q", out)
	}
	mustAPIVerb(t, "delete_queue", d.node, "src")
	mustAPIVerb(t, "import_definitions", d.node, file)
	if out := mustAPIVerb(t, "list_queues", d.node, "name"); !strings.Contains(out, "src\n") {
		t.Errorf("after import: %q", out)
	}

	mustAPIVerb(t, "set_vm_memory_high_watermark", d.node, "1")
	// amqp091-go stops reading while a notification waits for room: room for them all.
	closed := conn.NotifyBlocked(make(chan amqp091.Blocking, 64))
	mustAPIVerb(t, "set_vm_memory_high_watermark", d.node, "0.0000001")
	// The alarm is set within 100 ms; a connection is blocked when it publishes then.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for blocked, end := false, time.After(10*time.Second); !blocked; {
		select {
		case b := <-closed:
			if !b.Active {
				t.Errorf("blocked %+v", b)
			}
			blocked = true
		case <-tick.C:
			ch.Publish("", "work", false, false, amqp091.Publishing{Body: []byte("x")})
		case <-end:
			t.Fatal("no connection.blocked after set_vm_memory_high_watermark 0.0000001")
		}
	}
	mustAPIVerb(t, "set_vm_memory_high_watermark", d.node, "0.4")

	cs := mustAPIVerb(t, "list_connections", d.node, "name", "user")
	lines := strings.Split(strings.TrimSpace(cs), "\n")
	if len(lines) != 2 || !strings.HasSuffix(lines[1], "\tguest") {
		t.Fatalf("list_connections: %q", cs)
	}
	gone := conn.NotifyClose(make(chan *amqp091.Error, 1))
	mustAPIVerb(t, "close_connection", d.node, strings.TrimSuffix(lines[1], "\tguest"), "go away")
	select {
	case e := <-gone:
		if e == nil || e.Code != 320 || !strings.Contains(e.Reason, "go away") {
			t.Errorf("closed with %v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("close_connection did not close the connection")
	}

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"purge_queue", d.node, "nope"}, 1, "amqpd purge_queue: Not Found (404 Object Not Found)\n"},
		{[]string{"list_queues", d.node, "-password", "wrong"}, 1, "amqpd list_queues: Not_Authorized (401 not_authorized)\n"},
		{[]string{"redrive", d.node}, 2, "amqpd redrive: got 0 arguments; usage: amqpd redrive [-node URL] [-username USER] [-password PASSWORD] [-p VHOST] QUEUE\n"},
		{[]string{"set_disk_free_limit", d.node, "lots"}, 1, "amqpd set_disk_free_limit: want a number of bytes\n"},
	} {
		if code, out, errOut := apiVerb(c.args...); code != c.code || out != "" || errOut != c.want {
			t.Errorf("amqpd %q: exit %d, %q, %q; want %d, %q", c.args, code, out, errOut, c.code, c.want)
		}
	}
}
