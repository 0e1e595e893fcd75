package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	amqp "github.com/maxpert/amqp-go"
)

// The subcommands here talk to a running broker through its management HTTP API, as
// rabbitmqctl talks to a running RabbitMQ: -node is the API's URL (default
// http://127.0.0.1:15672), and the credentials come from -username and -password, else
// AMQPD_USERNAME and AMQPD_PASSWORD, else guest/guest. List verbs take rabbitmqctl's
// column names and print a header and tab-separated rows.

// apiCommand is a subcommand that calls the management API.
type apiCommand struct {
	args     string // positional arguments, for messages
	min, max int
	vhost    bool // takes -p VHOST
	run      func(c *apiClient, vhost string, pos []string, stdout io.Writer) error
}

var apiCommands = map[string]apiCommand{
	"list_queues": {args: "[COLUMN...]", max: -1, vhost: true, run: listVerb("queues",
		[]string{"name", "messages"}, nil)},
	"list_exchanges": {args: "[COLUMN...]", max: -1, vhost: true, run: listVerb("exchanges",
		[]string{"name", "type"}, nil)},
	"list_bindings": {args: "[COLUMN...]", max: -1, vhost: true, run: listVerb("bindings",
		[]string{"source_name", "source_kind", "destination_name", "destination_kind", "routing_key", "arguments"},
		map[string]string{"source_name": "source", "destination_name": "destination", "destination_kind": "destination_type"})},
	"list_connections": {args: "[COLUMN...]", max: -1, run: listVerb("connections",
		[]string{"user", "peer_host", "peer_port", "state"}, nil)},
	"list_consumers": {args: "[COLUMN...]", max: -1, vhost: true, run: listVerb("consumers",
		[]string{"queue_name", "channel_pid", "consumer_tag", "ack_required", "prefetch_count", "active", "arguments"},
		map[string]string{"queue_name": "queue.name", "channel_pid": "channel_details.name"})},
	"close_connection": {args: "NAME [EXPLANATION]", min: 1, max: 2, run: func(c *apiClient, _ string, pos []string, _ io.Writer) error {
		reason := "Closed via amqpd close_connection"
		if len(pos) > 1 {
			reason = pos[1]
		}
		_, err := c.do("DELETE", "/api/connections/"+url.PathEscape(pos[0]), nil, "X-Reason", reason)
		return err
	}},
	"cluster_status": {run: func(c *apiClient, _ string, _ []string, stdout io.Writer) error {
		b, err := c.do("GET", "/api/cluster", nil)
		if err != nil {
			return err
		}
		var st struct {
			Clustered     bool
			Cluster, Node string
			Leading       bool
			MinInSync     int `json:"min_insync"`
			Leader        struct {
				Name, Addr string
				Term       int64
			}
			Followers []struct {
				Name         string
				AckedSegment uint64 `json:"acked_segment"`
				AckedOffset  uint64 `json:"acked_offset"`
				LagBytes     int64  `json:"lag_bytes"`
				InSync       bool   `json:"in_sync"`
			}
			Position struct{ Segment, Offset uint64 }
			Record   *struct {
				Term    int64
				Members []string
			} `json:"in_sync_record"`
		}
		if err := json.Unmarshal(b, &st); err != nil {
			return err
		}
		if !st.Clustered {
			fmt.Fprintf(stdout, "node %s: a single node, not clustered\n", st.Node)
			return nil
		}
		minInSync := strconv.Itoa(st.MinInSync)
		if st.MinInSync == amqp.MinInSyncAuto {
			minInSync = "auto (1 while a follower that was in sync is alive)"
		}
		fmt.Fprintf(stdout, "cluster %s, node %s, leading %v\nleader %s (%s), term %d, min in sync %s\n",
			st.Cluster, st.Node, st.Leading, st.Leader.Name, st.Leader.Addr, st.Leader.Term, minInSync)
		fmt.Fprintf(stdout, "log position %d:%d\n", st.Position.Segment, st.Position.Offset)
		if st.Record != nil {
			fmt.Fprintf(stdout, "in sync as of term %d (may stand): %s\n", st.Record.Term, strings.Join(st.Record.Members, ", "))
		}
		for _, f := range st.Followers {
			fmt.Fprintf(stdout, "follower %s\tin sync %v\tlag %d bytes\tacked %d:%d\n", f.Name, f.InSync, f.LagBytes, f.AckedSegment, f.AckedOffset)
		}
		return nil
	}},
	"purge_queue": {args: "QUEUE", min: 1, max: 1, vhost: true, run: func(c *apiClient, vhost string, pos []string, _ io.Writer) error {
		_, err := c.do("DELETE", "/api/queues/"+url.PathEscape(vhost)+"/"+url.PathEscape(pos[0])+"/contents", nil)
		return err
	}},
	"delete_queue": {args: "QUEUE", min: 1, max: 1, vhost: true, run: func(c *apiClient, vhost string, pos []string, _ io.Writer) error {
		_, err := c.do("DELETE", "/api/queues/"+url.PathEscape(vhost)+"/"+url.PathEscape(pos[0]), nil)
		return err
	}},
	"redrive": {args: "QUEUE", min: 1, max: 1, vhost: true, run: func(c *apiClient, vhost string, pos []string, stdout io.Writer) error {
		b, err := c.do("POST", "/api/queues/"+url.PathEscape(vhost)+"/"+url.PathEscape(pos[0])+"/actions", map[string]string{"action": "redrive"})
		if err != nil {
			return err
		}
		var r struct{ Redriven int }
		json.Unmarshal(b, &r)
		fmt.Fprintf(stdout, "moved %d messages back from %s\n", r.Redriven, pos[0])
		return nil
	}},
	"export_definitions": {args: "FILE|-", min: 1, max: 1, run: func(c *apiClient, _ string, pos []string, stdout io.Writer) error {
		b, err := c.do("GET", "/api/definitions", nil)
		if err != nil {
			return err
		}
		var pretty bytes.Buffer
		if json.Indent(&pretty, b, "", "  ") == nil {
			b = append(pretty.Bytes(), '\n')
		}
		if pos[0] == "-" {
			_, err = stdout.Write(b)
			return err
		}
		return os.WriteFile(pos[0], b, 0o600)
	}},
	"import_definitions": {args: "FILE|-", min: 1, max: 1, run: func(c *apiClient, _ string, pos []string, _ io.Writer) error {
		var b []byte
		var err error
		if pos[0] == "-" {
			b, err = io.ReadAll(io.LimitReader(os.Stdin, 20<<20+1))
		} else {
			b, err = os.ReadFile(pos[0])
		}
		if err != nil {
			return err
		}
		_, err = c.do("POST", "/api/definitions", json.RawMessage(b))
		return err
	}},
	"set_vm_memory_high_watermark": {args: "FRACTION|BYTES", min: 1, max: 1, run: func(c *apiClient, _ string, pos []string, _ io.Writer) error {
		v, err := strconv.ParseFloat(pos[0], 64)
		if err != nil || v < 0 {
			return errors.New("want a fraction of RAM (at most 1) or a number of bytes")
		}
		node, err := c.nodeName()
		if err != nil {
			return err
		}
		_, err = c.do("PUT", "/api/nodes/"+url.PathEscape(node)+"/vm_memory_high_watermark", map[string]uint64{"value": watermark(v)})
		return err
	}},
	"set_disk_free_limit": {args: "BYTES", min: 1, max: 1, run: func(c *apiClient, _ string, pos []string, _ io.Writer) error {
		n, err := strconv.ParseInt(pos[0], 10, 64)
		if err != nil || n < 0 {
			return errors.New("want a number of bytes")
		}
		node, err := c.nodeName()
		if err != nil {
			return err
		}
		_, err = c.do("PUT", "/api/nodes/"+url.PathEscape(node)+"/disk_free_limit", map[string]int64{"value": n})
		return err
	}},
}

// isAPIVerb reports whether s names a subcommand that calls the management API.
func isAPIVerb(s string) bool {
	_, ok := apiCommands[s]
	return ok
}

// runAPI runs a subcommand that calls the management API and returns the exit code: 0 on
// success, 1 when the broker refuses or cannot be reached, 2 for bad usage.
func runAPI(verb string, args []string, stdout, stderr io.Writer) int {
	cmd := apiCommands[verb]
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "amqpd %s: %s\n", verb, fmt.Sprintf(format, a...))
		return code
	}
	flags := flag.NewFlagSet(verb, flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	c := &apiClient{}
	flags.StringVar(&c.node, "node", "http://127.0.0.1:15672", "URL of the broker's management API")
	flags.StringVar(&c.user, "username", envOr("AMQPD_USERNAME", "guest"), "user (or AMQPD_USERNAME)")
	flags.StringVar(&c.password, "password", envOr("AMQPD_PASSWORD", "guest"), "password (or AMQPD_PASSWORD, which keeps it out of the process list)")
	vhost := "/"
	usage := "usage: amqpd " + verb + " [-node URL] [-username USER] [-password PASSWORD]"
	if cmd.vhost {
		flags.StringVar(&vhost, "p", "/", "virtual host")
		flags.StringVar(&vhost, "vhost", "/", "virtual host")
		usage += " [-p VHOST]"
	}
	usage += " " + cmd.args
	pos, err := parseInterspersed(flags, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(stdout, usage)
		return 0
	}
	if err != nil {
		return fail(2, "%v", err)
	}
	if n := len(pos); n < cmd.min || cmd.max >= 0 && n > cmd.max {
		return fail(2, "got %d arguments; %s", n, usage)
	}
	if err := cmd.run(c, vhost, pos, stdout); err != nil {
		return fail(1, "%v", err)
	}
	return 0
}

func envOr(key, def string) string {
	if v, ok := os.LookupEnv(key); ok {
		return v
	}
	return def
}

// apiClient calls a broker's management API.
type apiClient struct {
	node, user, password string
}

// do sends a request with a JSON body (nil for none) and returns the answer's body; an
// answer other than 2xx is an error with RabbitMQ's reason.
func (c *apiClient) do(method, path string, body any, header ...string) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, strings.TrimSuffix(c.node, "/")+path, rd)
	if err != nil {
		return nil, err
	}
	req.SetBasicAuth(c.user, c.password)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	client := &http.Client{Timeout: time.Minute}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		var e struct{ Error, Reason string }
		if json.Unmarshal(b, &e) == nil && e.Reason != "" {
			return nil, fmt.Errorf("%s (%d %s)", e.Reason, resp.StatusCode, e.Error)
		}
		return nil, fmt.Errorf("%s", resp.Status)
	}
	return b, nil
}

// nodeName asks the broker for its node name.
func (c *apiClient) nodeName() (string, error) {
	b, err := c.do("GET", "/api/overview", nil)
	if err != nil {
		return "", err
	}
	var o struct{ Node string }
	if err := json.Unmarshal(b, &o); err != nil || o.Node == "" {
		return "", errors.New("no node name in the broker's overview")
	}
	return o.Node, nil
}

// listVerb makes a list subcommand: GET /api/{what}[/{vhost}], printing the columns asked
// for (default when none), each a field of the API's objects (rename maps rabbitmqctl's
// column names to the API's dotted paths).
func listVerb(what string, def []string, rename map[string]string) func(c *apiClient, vhost string, pos []string, stdout io.Writer) error {
	return func(c *apiClient, vhost string, pos []string, stdout io.Writer) error {
		path := "/api/" + what
		if what != "connections" {
			path += "/" + url.PathEscape(vhost)
		}
		b, err := c.do("GET", path, nil)
		if err != nil {
			return err
		}
		var items []map[string]any
		if err := json.Unmarshal(b, &items); err != nil {
			return fmt.Errorf("unexpected answer: %v", err)
		}
		cols := pos
		if len(cols) == 0 {
			cols = def
		}
		fmt.Fprintln(stdout, strings.Join(cols, "\t"))
		for _, it := range items {
			row := make([]string, len(cols))
			for i, col := range cols {
				if col == "source_kind" {
					row[i] = "exchange"
					continue
				}
				p := col
				if r, ok := rename[col]; ok {
					p = r
				}
				row[i] = cell(dig(it, p))
			}
			fmt.Fprintln(stdout, strings.Join(row, "\t"))
		}
		return nil
	}
}

// dig returns the value at a dotted path of m.
func dig(m map[string]any, path string) any {
	var v any = m
	for _, k := range strings.Split(path, ".") {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[k]
	}
	return v
}

// cell prints a value as rabbitmqctl does: strings bare, tables as [{k,v}, ...], nothing
// for none.
func cell(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return v
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64)
	case bool:
		return strconv.FormatBool(v)
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = "{" + k + "," + cell(v[k]) + "}"
		}
		return "[" + strings.Join(parts, ", ") + "]"
	}
	b, _ := json.Marshal(v)
	return string(b)
}
