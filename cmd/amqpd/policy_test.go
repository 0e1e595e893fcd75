package main

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/maxpert/amqp-go"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// TestCtlPolicies sets, lists and clears policies and operator policies with rabbitmqctl's
// arguments, and checks that a running broker applies them on reload.
func TestCtlPolicies(t *testing.T) {
	file := filepath.Join(t.TempDir(), "definitions.json")
	def := "-definitions=" + file
	mustCtl(t, "", "add_vhost", def, "prod")
	mustCtl(t, "", "set_policy", def, "--priority", "1", "--apply-to", "queues", "cap", `^capped\.`, `{"max-length": 2}`)
	mustCtl(t, "", "set_policy", def, "--vhost", "prod", "ae", "^orders$", `{"alternate-exchange":"unrouted"}`)
	mustCtl(t, "", "set_operator_policy", def, "-p", "prod", "limit", ".*", `{"message-ttl":60000}`)

	if out := mustCtl(t, "", "list_policies", def); out != "vhost\tname\tpattern\tapply-to\tdefinition\tpriority\n"+
		"/\tcap\t^capped\\.\tqueues\t{\"max-length\":2}\t1\n" {
		t.Errorf("list_policies: %q", out)
	}
	if out := mustCtl(t, "", "list_policies", def, "-p", "prod"); out != "vhost\tname\tpattern\tapply-to\tdefinition\tpriority\n"+
		"prod\tae\t^orders$\tall\t{\"alternate-exchange\":\"unrouted\"}\t0\n" {
		t.Errorf("list_policies -p prod: %q", out)
	}
	if out := mustCtl(t, "", "list_operator_policies", def, "-p", "prod"); out != "vhost\tname\tpattern\tapply-to\tdefinition\tpriority\n"+
		"prod\tlimit\t.*\tall\t{\"message-ttl\":60000}\t0\n" {
		t.Errorf("list_operator_policies: %q", out)
	}
	for _, c := range []struct {
		verb string
		args []string
		want string
	}{
		{"set_policy", []string{def, "x", ".*", `{"max-length":-1}`}, "amqpd set_policy: policy \"x\": -1 is not a valid maximum length\n"},
		{"set_policy", []string{def, "x", ".*", `{"max-length":1}`, "--apply-to", "bindings"}, "amqpd set_policy: policy \"x\": apply-to \"bindings\": want all, queues, exchanges, classic_queues, quorum_queues or streams\n"},
		{"set_policy", []string{def, "x", ".*"}, "amqpd set_policy: got 2 arguments; usage: amqpd set_policy [-definitions FILE] [-p VHOST] [--priority N] [--apply-to all|queues|exchanges] NAME PATTERN DEFINITION\n"},
		{"set_operator_policy", []string{def, "x", ".*", `{"dead-letter-exchange":"d"}`}, "amqpd set_operator_policy: operator policy \"x\": dead-letter-exchange cannot be set by an operator policy\n"},
		{"clear_policy", []string{def, "nope"}, "amqpd clear_policy: policy \"nope\" in virtual host \"/\" does not exist\n"},
	} {
		if code, out, errOut := ctl(t, "", c.verb, c.args...); code != 1 && code != 2 || out != "" || errOut != c.want {
			t.Errorf("%s %q: exit %d, %q, %q; want %q", c.verb, c.args, code, out, errOut, c.want)
		}
	}

	// A broker started on the file applies "cap"; after clear_policy and a reload it does not.
	srv := amqp.NewServer(amqp.Config{Definitions: file})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	conn, err := amqp091.Dial("amqp://guest:guest@" + srv.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	depth := func(q string, publish int) int {
		t.Helper()
		for range publish {
			if err := ch.Publish("", q, false, false, amqp091.Publishing{Body: []byte("m")}); err != nil {
				t.Fatal(err)
			}
		}
		got, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		return got.Messages
	}
	if _, err := ch.QueueDeclare("capped.a", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if n := depth("capped.a", 5); n != 2 {
		t.Errorf("capped.a holds %d, want the policy's max-length 2", n)
	}
	mustCtl(t, "", "clear_policy", def, "cap")
	if err := srv.Reload(); err != nil {
		t.Fatal(err)
	}
	if n := depth("capped.a", 5); n != 7 {
		t.Errorf("capped.a holds %d after clear_policy and a reload, want 7", n)
	}
	if out := mustCtl(t, "", "list_policies", def); strings.Count(out, "\n") != 1 {
		t.Errorf("list_policies after clear_policy: %q", out)
	}
}
