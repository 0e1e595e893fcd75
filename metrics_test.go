package amqp

import (
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// A strict parser of the Prometheus text format (0.0.4), for reading the output back:
// every sample belongs to the family announced just before it by HELP then TYPE, names
// and labels are well formed, label values are escaped UTF-8, no series repeats, and a
// histogram's buckets are cumulative and end at +Inf, equal to its _count.

type promSample struct {
	name   string
	labels map[string]string
	value  float64
}

type promFamily struct {
	name, typ, help string
	samples         []promSample
}

type promText struct {
	families map[string]*promFamily
	order    []string
}

func parseProm(text string) (*promText, error) {
	p := &promText{families: map[string]*promFamily{}}
	if text == "" || !strings.HasSuffix(text, "\n") {
		return nil, errors.New("output is empty or does not end in a line feed")
	}
	seen := map[string]bool{}
	var cur *promFamily
	for i, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		fail := func(why string) error {
			return errors.New("line " + strconv.Itoa(i+1) + ": " + why + ": " + strconv.Quote(line))
		}
		switch {
		case strings.HasPrefix(line, "# HELP "):
			name, help, ok := strings.Cut(line[len("# HELP "):], " ")
			if !ok || !validMetricName(name) || help == "" || !validHelp(help) {
				return nil, fail("bad HELP")
			}
			if cur != nil && len(cur.samples) == 0 {
				return nil, fail("family " + cur.name + " has no samples")
			}
			if p.families[name] != nil {
				return nil, fail("family announced twice")
			}
			cur = &promFamily{name: name, help: help}
			p.families[name] = cur
			p.order = append(p.order, name)
		case strings.HasPrefix(line, "# TYPE "):
			name, typ, ok := strings.Cut(line[len("# TYPE "):], " ")
			if !ok || cur == nil || name != cur.name || cur.typ != "" {
				return nil, fail("TYPE not right after its family's HELP")
			}
			switch typ {
			case "counter", "gauge", "histogram", "untyped":
			default:
				return nil, fail("unknown type")
			}
			cur.typ = typ
		case strings.HasPrefix(line, "#") || line == "":
			return nil, fail("unexpected line")
		default:
			if cur == nil || cur.typ == "" {
				return nil, fail("sample before its family's HELP and TYPE")
			}
			s, err := parseSample(line)
			if err != nil {
				return nil, fail(err.Error())
			}
			if !sampleOf(cur, s) {
				return nil, fail("sample not of family " + cur.name)
			}
			key := seriesKey(s)
			if seen[key] {
				return nil, fail("series repeated")
			}
			seen[key] = true
			switch cur.typ {
			case "counter":
				if s.value < 0 || math.IsInf(s.value, 0) || math.IsNaN(s.value) {
					return nil, fail("counter not a finite non-negative number")
				}
			case "gauge", "untyped":
				if math.IsInf(s.value, 0) || math.IsNaN(s.value) {
					return nil, fail("gauge not finite")
				}
			}
			cur.samples = append(cur.samples, s)
		}
	}
	if cur != nil && len(cur.samples) == 0 {
		return nil, errors.New("family " + cur.name + " has no samples")
	}
	for _, name := range p.order {
		if f := p.families[name]; f.typ == "histogram" {
			if err := checkHistogram(f); err != nil {
				return nil, errors.New("histogram " + name + ": " + err.Error())
			}
		}
	}
	return p, nil
}

func validMetricName(s string) bool {
	for i, c := range s {
		if !(c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return s != ""
}

func validLabelName(s string) bool {
	return validMetricName(s) && !strings.Contains(s, ":") && !strings.HasPrefix(s, "__")
}

// validHelp accepts only the escapes HELP may have: \\ and \n.
func validHelp(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' {
			if i+1 == len(s) || s[i+1] != '\\' && s[i+1] != 'n' {
				return false
			}
			i++
		}
	}
	return utf8.ValidString(s)
}

// parseSample reads name{labels} value, with no timestamp.
func parseSample(line string) (promSample, error) {
	s := promSample{labels: map[string]string{}}
	i := strings.IndexAny(line, "{ ")
	if i < 0 {
		return s, errors.New("no value")
	}
	s.name = line[:i]
	if !validMetricName(s.name) {
		return s, errors.New("bad metric name")
	}
	rest := line[i:]
	if rest[0] == '{' {
		rest = rest[1:]
		for {
			eq := strings.IndexByte(rest, '=')
			if eq < 0 {
				return s, errors.New("label without =")
			}
			name := rest[:eq]
			if !validLabelName(name) {
				return s, errors.New("bad label name " + strconv.Quote(name))
			}
			if _, dup := s.labels[name]; dup {
				return s, errors.New("label repeated")
			}
			rest = rest[eq+1:]
			if rest == "" || rest[0] != '"' {
				return s, errors.New("label value not quoted")
			}
			var v []byte
			j := 1
			for ; j < len(rest) && rest[j] != '"'; j++ {
				if rest[j] == '\\' {
					j++
					if j == len(rest) {
						return s, errors.New("escape at the end")
					}
					switch rest[j] {
					case '\\', '"':
						v = append(v, rest[j])
					case 'n':
						v = append(v, '\n')
					default:
						return s, errors.New("bad escape in label value")
					}
					continue
				}
				if rest[j] == '\n' {
					return s, errors.New("raw line feed in label value")
				}
				v = append(v, rest[j])
			}
			if j == len(rest) {
				return s, errors.New("unterminated label value")
			}
			if !utf8.Valid(v) {
				return s, errors.New("label value not UTF-8")
			}
			s.labels[name] = string(v)
			rest = rest[j+1:]
			if strings.HasPrefix(rest, ",") {
				rest = rest[1:]
				continue
			}
			if !strings.HasPrefix(rest, "}") {
				return s, errors.New("label set not closed")
			}
			rest = rest[1:]
			break
		}
	}
	if !strings.HasPrefix(rest, " ") {
		return s, errors.New("no space before the value")
	}
	val := rest[1:]
	if strings.ContainsAny(val, " \t") {
		return s, errors.New("a timestamp or trailing text")
	}
	switch val {
	case "+Inf":
		s.value = math.Inf(1)
	case "-Inf":
		s.value = math.Inf(-1)
	case "NaN":
		s.value = math.NaN()
	default:
		f, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return s, errors.New("bad value")
		}
		s.value = f
	}
	return s, nil
}

// sampleOf reports whether s may be a sample of f: its name, or for a histogram the name
// with _bucket (and an le label), _sum or _count.
func sampleOf(f *promFamily, s promSample) bool {
	_, le := s.labels["le"]
	if f.typ != "histogram" {
		return s.name == f.name
	}
	switch s.name {
	case f.name + "_bucket":
		return le
	case f.name + "_sum", f.name + "_count":
		return !le
	}
	return false
}

func seriesKey(s promSample) string {
	keys := make([]string, 0, len(s.labels))
	for k, v := range s.labels {
		keys = append(keys, k+"="+strconv.Quote(v))
	}
	sort.Strings(keys)
	return s.name + "{" + strings.Join(keys, ",") + "}"
}

// checkHistogram checks each of f's label sets: buckets in ascending le, cumulative,
// the last +Inf and equal to _count, and a _sum.
func checkHistogram(f *promFamily) error {
	type series struct {
		les, counts      []float64
		count, sum       float64
		hasCount, hasSum bool
	}
	groups := map[string]*series{}
	for _, s := range f.samples {
		rest := promSample{name: "", labels: map[string]string{}}
		for k, v := range s.labels {
			if k != "le" {
				rest.labels[k] = v
			}
		}
		key := seriesKey(rest)
		g := groups[key]
		if g == nil {
			g = &series{}
			groups[key] = g
		}
		switch s.name {
		case f.name + "_bucket":
			le, err := strconv.ParseFloat(s.labels["le"], 64)
			if err != nil {
				return errors.New("bad le " + strconv.Quote(s.labels["le"]))
			}
			if n := len(g.les); n > 0 && (le <= g.les[n-1] || s.value < g.counts[n-1]) {
				return errors.New("buckets not ascending and cumulative")
			}
			g.les, g.counts = append(g.les, le), append(g.counts, s.value)
		case f.name + "_count":
			g.count, g.hasCount = s.value, true
		case f.name + "_sum":
			g.sum, g.hasSum = s.value, true
		}
	}
	for key, g := range groups {
		n := len(g.les)
		switch {
		case n == 0 || !math.IsInf(g.les[n-1], 1):
			return errors.New(key + ": no +Inf bucket")
		case !g.hasCount || g.count != g.counts[n-1]:
			return errors.New(key + ": _count is not the +Inf bucket")
		case !g.hasSum:
			return errors.New(key + ": no _sum")
		}
	}
	return nil
}

// value returns the sample of family name with exactly these labels (name, value pairs).
func (p *promText) value(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	v, ok := p.lookup(name, labels...)
	if !ok {
		t.Fatalf("no sample %s%v", name, labels)
	}
	return v
}

func (p *promText) lookup(name string, labels ...string) (float64, bool) {
	fam := p.families[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")]
	if fam == nil {
		fam = p.families[name]
	}
	if fam == nil {
		return 0, false
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
next:
	for _, s := range fam.samples {
		if s.name != name || len(s.labels) != len(want) {
			continue
		}
		for k, v := range want {
			if s.labels[k] != v {
				continue next
			}
		}
		return s.value, true
	}
	return 0, false
}

// scrape fetches path from h, checks status and content type, and parses the body.
func scrape(t testing.TB, base, path string) *promText {
	t.Helper()
	resp, err := http.Get(base + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", path, resp.Status)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Fatalf("GET %s: Content-Type %q", path, ct)
	}
	p, err := parseProm(string(body))
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return p
}

// metricsServer serves srv's MetricsHandler on 127.0.0.1 until the test ends.
func metricsServer(t testing.TB, srv *Server) string {
	hs := httptest.NewServer(srv.MetricsHandler())
	t.Cleanup(hs.Close)
	return hs.URL
}

// wantMetric is one expected sample.
type wantMetric struct {
	name   string
	labels []string
	value  float64
}

// awaitMetrics scrapes /metrics until every sample in want has its value (acks and
// unroutable publishes have no answer to wait for) and returns the last scrape.
func awaitMetrics(t testing.TB, base string, want []wantMetric) *promText {
	t.Helper()
	deadline := time.Now().Add(recvWait)
	for {
		p := scrape(t, base, "/metrics")
		var diff []string
		for _, w := range want {
			got, ok := p.lookup(w.name, w.labels...)
			if !ok || got != w.value {
				diff = append(diff, w.name+strings.Join(w.labels, ",")+": got "+strconv.FormatFloat(got, 'g', -1, 64)+", want "+strconv.FormatFloat(w.value, 'g', -1, 64))
			}
		}
		if len(diff) == 0 {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never reached the expected values:\n%s", strings.Join(diff, "\n"))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestMetricsParserIsStrict: the parser the other tests rely on refuses what Prometheus's
// text format forbids, and accepts a well-formed histogram.
func TestMetricsParserIsStrict(t *testing.T) {
	t.Parallel()
	good := "# HELP h_bytes Sizes\n# TYPE h_bytes histogram\n" +
		"h_bytes_bucket{p=\"a\",le=\"1\"} 1\nh_bytes_bucket{p=\"a\",le=\"+Inf\"} 3\nh_bytes_sum{p=\"a\"} 7\nh_bytes_count{p=\"a\"} 3\n"
	if _, err := parseProm(good); err != nil {
		t.Fatalf("good histogram refused: %v", err)
	}
	for name, text := range map[string]string{
		"no final line feed":     "# HELP a x\n# TYPE a gauge\na 1",
		"sample before TYPE":     "# HELP a x\na 1\n# TYPE a gauge\n",
		"TYPE without HELP":      "# TYPE a gauge\na 1\n",
		"sample of other family": "# HELP a x\n# TYPE a gauge\nb 1\n",
		"family twice":           "# HELP a x\n# TYPE a gauge\na 1\n# HELP a x\n# TYPE a gauge\na 2\n",
		"family without samples": "# HELP a x\n# TYPE a gauge\n# HELP b x\n# TYPE b gauge\nb 1\n",
		"repeated series":        "# HELP a x\n# TYPE a gauge\na{l=\"1\"} 1\na{l=\"1\"} 2\n",
		"bad escape":             "# HELP a x\n# TYPE a gauge\na{l=\"\\t\"} 1\n",
		"unquoted label":         "# HELP a x\n# TYPE a gauge\na{l=1} 1\n",
		"bad label name":         "# HELP a x\n# TYPE a gauge\na{1l=\"1\"} 1\n",
		"negative counter":       "# HELP a_total x\n# TYPE a_total counter\na_total -1\n",
		"timestamp":              "# HELP a x\n# TYPE a gauge\na 1 1700000000\n",
		"bad value":              "# HELP a x\n# TYPE a gauge\na one\n",
		"not cumulative":         strings.Replace(good, "} 3\nh_bytes_sum", "} 0\nh_bytes_sum", 1),
		"count is not +Inf":      strings.Replace(good, "h_bytes_count{p=\"a\"} 3", "h_bytes_count{p=\"a\"} 4", 1),
		"no +Inf":                strings.Replace(good, "le=\"+Inf\"", "le=\"2\"", 1),
		"invalid UTF-8":          "# HELP a x\n# TYPE a gauge\na{l=\"\xff\"} 1\n",
	} {
		if _, err := parseProm(text); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestMetricsAppendLabelValue: label values are escaped as the text format wants, and a
// queue name that is not UTF-8 still gives valid output.
func TestMetricsAppendLabelValue(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"orders":           "orders",
		`a"b`:              `a\"b`,
		`back\slash`:       `back\\slash`,
		"two\nlines":       `two\nlines`,
		"caf\u00e9 \u2603": "caf\u00e9 \u2603",
		"bad\xffbyte":      "bad\ufffdbyte",
		"cut\xe2\x98":      "cut\ufffd\ufffd",
		"":                 "",
	} {
		if got := string(appendLabelValue(nil, in)); got != want {
			t.Errorf("appendLabelValue(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestMetricsExposition: both endpoints serve the text format that parses strictly, with
// every family rabbitmq_prometheus has that this broker keeps, under its type; the
// identity and build info; the node's memory, disk and file descriptors; and HTTP as a
// scraper expects it.
func TestMetricsExposition(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	base := metricsServer(t, srv)
	p := scrape(t, base, "/metrics")
	types := map[string]string{
		"rabbitmq_identity_info": "untyped", "rabbitmq_build_info": "untyped",
		"rabbitmq_process_resident_memory_bytes": "gauge",
		"rabbitmq_disk_space_available_bytes":    "gauge", "rabbitmq_disk_space_available_limit_bytes": "gauge",
		"rabbitmq_alarms_file_descriptor_limit": "untyped", "rabbitmq_alarms_free_disk_space_watermark": "untyped",
		"rabbitmq_alarms_memory_used_watermark": "untyped",
		"rabbitmq_connections":                  "gauge", "rabbitmq_channels": "gauge", "rabbitmq_consumers": "gauge", "rabbitmq_queues": "gauge",
		"rabbitmq_global_publishers": "gauge", "rabbitmq_global_consumers": "gauge",
		"rabbitmq_connections_opened_total": "counter", "rabbitmq_connections_closed_total": "counter",
		"rabbitmq_channels_opened_total": "counter", "rabbitmq_channels_closed_total": "counter",
		"rabbitmq_queues_declared_total": "counter", "rabbitmq_queues_created_total": "counter", "rabbitmq_queues_deleted_total": "counter",
		"rabbitmq_queue_messages_ready": "gauge", "rabbitmq_queue_messages_unacked": "gauge", "rabbitmq_queue_messages": "gauge",
		"rabbitmq_queue_consumers":              "gauge",
		"rabbitmq_message_size_bytes":           "histogram",
		"rabbitmq_channel_messages_unconfirmed": "gauge", "rabbitmq_process_open_tcp_sockets": "gauge",
	}
	for _, kind := range []string{"received", "received_confirm", "routed", "unroutable_dropped", "unroutable_returned", "confirmed"} {
		name := "rabbitmq_global_messages_" + kind + "_total"
		types[name] = "counter"
		p.value(t, name, "protocol", "amqp091")
	}
	for _, kind := range []string{"delivered", "delivered_consume_manual_ack", "delivered_consume_auto_ack", "delivered_get_manual_ack",
		"delivered_get_auto_ack", "get_empty", "redelivered", "acknowledged"} {
		name := "rabbitmq_global_messages_" + kind + "_total"
		types[name] = "counter"
		p.value(t, name, "protocol", "amqp091", "queue_type", "rabbit_classic_queue")
	}
	if runtime.GOOS == "linux" {
		types["rabbitmq_process_open_fds"], types["rabbitmq_process_max_fds"] = "gauge", "gauge"
	}
	for name, typ := range types {
		f := p.families[name]
		if f == nil {
			t.Errorf("family %s missing", name)
			continue
		}
		if f.typ != typ {
			t.Errorf("family %s has type %s, want %s", name, f.typ, typ)
		}
	}

	id := p.families["rabbitmq_identity_info"]
	if id == nil || len(id.samples) != 1 || id.samples[0].value != 1 {
		t.Fatalf("rabbitmq_identity_info: %+v", id)
	}
	for _, l := range []string{"rabbitmq_node", "rabbitmq_cluster", "rabbitmq_cluster_permanent_id"} {
		if id.samples[0].labels[l] == "" {
			t.Errorf("rabbitmq_identity_info has no %s label", l)
		}
	}
	if node := id.samples[0].labels["rabbitmq_node"]; !strings.HasPrefix(node, "amqp-go@") {
		t.Errorf("rabbitmq_node = %q", node)
	}
	if p.value(t, "rabbitmq_build_info", "rabbitmq_version", Version, "prometheus_plugin_version", Version,
		"product_name", "amqp-go", "product_version", Version, "erlang_version", runtime.Version()) != 1 {
		t.Error("rabbitmq_build_info is not 1")
	}
	if p.value(t, "rabbitmq_disk_space_available_limit_bytes") != defaultDiskFreeLimit {
		t.Error("the disk free limit is not the default")
	}
	if p.value(t, "rabbitmq_disk_space_available_bytes") <= 0 {
		t.Error("no free disk space reported for the data directory")
	}
	if _, ok := p.families["rabbitmq_resident_memory_limit_bytes"]; ok {
		t.Error("a memory limit reported with no MemoryHighWatermark")
	}
	if _, ok := p.families["rabbitmq_process_max_tcp_sockets"]; ok {
		t.Error("a TCP socket limit reported with no MaxConnections")
	}
	if runtime.GOOS == "linux" {
		open, limit := p.value(t, "rabbitmq_process_open_fds"), p.value(t, "rabbitmq_process_max_fds")
		if open < 3 || open > limit {
			t.Errorf("open fds %v, limit %v", open, limit)
		}
	}
	var les []string
	for _, s := range p.families["rabbitmq_message_size_bytes"].samples {
		if le, ok := s.labels["le"]; ok {
			les = append(les, le)
		}
		if s.labels["protocol"] != "amqp091" {
			t.Errorf("%s has no protocol label", s.name)
		}
	}
	if want := []string{"100", "1000", "10000", "100000", "1000000", "10000000", "50000000", "100000000", "+Inf"}; !slices.Equal(les, want) {
		t.Errorf("message size buckets %v, want RabbitMQ's %v", les, want)
	}
	// With no queue, /metrics/per-object leaves out the queue families, which would have
	// no samples; with one, it has the same families as /metrics.
	po := scrape(t, base, "/metrics/per-object")
	if f := po.families["rabbitmq_queue_messages_ready"]; f != nil {
		t.Errorf("per-object queue family with no queues: %+v", f)
	}
	declareTransientQueue(t, openChannel(t, dial(t, url)), "one")
	po = scrape(t, base, "/metrics/per-object")
	if !slices.Equal(po.order, p.order) {
		t.Errorf("per-object families %v differ from /metrics's %v", po.order, p.order)
	}

	for _, c := range []struct {
		method, path string
		code         int
	}{
		{"HEAD", "/metrics", 200}, {"POST", "/metrics", 405}, {"GET", "/", 404}, {"GET", "/metrics/detailed", 404},
	} {
		req, _ := http.NewRequest(c.method, base+c.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.code {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, resp.StatusCode, c.code)
		}
		if c.method == "HEAD" && (len(body) != 0 || resp.Header.Get("Content-Type") != metricsContentType) {
			t.Errorf("HEAD: body %d octets, Content-Type %q", len(body), resp.Header.Get("Content-Type"))
		}
	}
}

// TestMetricsCountTraffic drives publishes (confirmed, unroutable, mandatory), gets,
// consumes with and without acks, a requeue and an empty get through amqp091-go, and
// checks every global counter, the size histogram and the churn counters against what was
// done, exactly, on /metrics and in messageTotals.
func TestMetricsCountTraffic(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	base := metricsServer(t, srv)
	conn := dial(t, url)

	pub := openChannel(t, conn)
	declareTransientQueue(t, pub, "m.q")
	if err := pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	confirms := pub.NotifyPublish(make(chan amqp091.Confirmation, 8))
	for _, size := range []int{10, 500, 5000} {
		if err := pub.Publish("", "m.q", false, false, amqp091.Publishing{Body: make([]byte, size)}); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		select {
		case c := <-confirms:
			if !c.Ack {
				t.Fatal("nack")
			}
		case <-time.After(recvWait):
			t.Fatal("no confirm")
		}
	}

	other := openChannel(t, conn)
	returns := other.NotifyReturn(make(chan amqp091.Return, 1))
	publish := func(exchange, key string, mandatory bool, size int) {
		t.Helper()
		if err := other.Publish(exchange, key, mandatory, false, amqp091.Publishing{Body: make([]byte, size)}); err != nil {
			t.Fatal(err)
		}
	}
	publish("amq.direct", "nowhere", false, 100) // dropped
	publish("amq.direct", "nowhere", true, 101)  // returned
	select {
	case <-returns:
	case <-time.After(recvWait):
		t.Fatal("no basic.return")
	}
	if _, err := other.QueueDeclare("m.q", false, false, false, false, nil); err != nil { // declared again
		t.Fatal(err)
	}
	if _, err := other.QueueDeclarePassive("m.q", false, false, false, false, nil); err != nil { // not counted
		t.Fatal(err)
	}

	d, ok, err := other.Get("m.q", false) // get, manual ack
	if err != nil || !ok || len(d.Body) != 10 {
		t.Fatalf("get: %v %v %d", err, ok, len(d.Body))
	}
	if err := d.Nack(false, true); err != nil { // back to the queue, redelivered
		t.Fatal(err)
	}
	d, ok, err = other.Get("m.q", true) // get, no ack: the requeued one, redelivered
	if err != nil || !ok || !d.Redelivered || len(d.Body) != 10 {
		t.Fatalf("get after requeue: %v %v %v %d", err, ok, d.Redelivered, len(d.Body))
	}

	cons := openChannel(t, conn)
	if err := cons.Qos(10, 0, false); err != nil {
		t.Fatal(err)
	}
	msgs, err := cons.Consume("m.q", "manual", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	takeDelivery(t, msgs)
	last := takeDelivery(t, msgs)
	// Two deliveries wait for their ack.
	awaitMetrics(t, base, []wantMetric{{"rabbitmq_queue_messages_unacked", nil, 2}, {"rabbitmq_queue_messages_ready", nil, 0}})
	if err := last.Ack(true); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := other.Get("m.q", false); err != nil || ok { // empty
		t.Fatalf("get on an empty queue: %v %v", err, ok)
	}

	declareTransientQueue(t, other, "m.auto")
	auto, err := cons.Consume("m.auto", "auto", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	publish("", "m.auto", false, 200_000)
	publish("", "m.auto", false, 0)
	takeDelivery(t, auto)
	takeDelivery(t, auto)

	proto := []string{"protocol", "amqp091"}
	qt := []string{"protocol", "amqp091", "queue_type", "rabbit_classic_queue"}
	p := awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_global_messages_received_total", proto, 7},
		{"rabbitmq_global_messages_received_confirm_total", proto, 3},
		{"rabbitmq_global_messages_routed_total", proto, 5},
		{"rabbitmq_global_messages_unroutable_dropped_total", proto, 1},
		{"rabbitmq_global_messages_unroutable_returned_total", proto, 1},
		{"rabbitmq_global_messages_confirmed_total", proto, 3},
		{"rabbitmq_global_messages_delivered_total", qt, 6},
		{"rabbitmq_global_messages_delivered_consume_manual_ack_total", qt, 2},
		{"rabbitmq_global_messages_delivered_consume_auto_ack_total", qt, 2},
		{"rabbitmq_global_messages_delivered_get_manual_ack_total", qt, 1},
		{"rabbitmq_global_messages_delivered_get_auto_ack_total", qt, 1},
		{"rabbitmq_global_messages_get_empty_total", qt, 1},
		{"rabbitmq_global_messages_redelivered_total", qt, 1},
		{"rabbitmq_global_messages_acknowledged_total", qt, 2},
		{"rabbitmq_global_publishers", proto, 2},
		{"rabbitmq_global_consumers", proto, 2},
		{"rabbitmq_consumers", nil, 2},
		{"rabbitmq_queues", nil, 2},
		{"rabbitmq_queue_messages_unacked", nil, 0},
		{"rabbitmq_queue_messages_published_total", nil, 5},
		{"rabbitmq_channel_messages_published_total", nil, 7},
		{"rabbitmq_channel_messages_delivered_ack_total", nil, 2},
		{"rabbitmq_queues_declared_total", nil, 3},
		{"rabbitmq_queues_created_total", nil, 2},
		{"rabbitmq_queues_deleted_total", nil, 0},
		{"rabbitmq_connections", nil, 1},
		{"rabbitmq_connections_opened_total", nil, 1},
		{"rabbitmq_channels", nil, 3},
		{"rabbitmq_channels_opened_total", nil, 3},
		{"rabbitmq_message_size_bytes_count", proto, 7},
		{"rabbitmq_message_size_bytes_sum", proto, 10 + 500 + 5000 + 100 + 101 + 200_000},
		{"rabbitmq_message_size_bytes_bucket", []string{"protocol", "amqp091", "le", "100"}, 3},
		{"rabbitmq_message_size_bytes_bucket", []string{"protocol", "amqp091", "le", "1000"}, 5},
		{"rabbitmq_message_size_bytes_bucket", []string{"protocol", "amqp091", "le", "10000"}, 6},
		{"rabbitmq_message_size_bytes_bucket", []string{"protocol", "amqp091", "le", "100000"}, 6},
		{"rabbitmq_message_size_bytes_bucket", []string{"protocol", "amqp091", "le", "1000000"}, 7},
	})
	m := srv.messageTotals()
	if m.received != 7 || m.routed != 5 || m.confirmed != 3 || m.delivered() != 6 || m.acknowledged != 2 ||
		m.getEmpty != 1 || m.redelivered != 1 || m.unroutableDropped != 1 || m.unroutableReturned != 1 {
		t.Errorf("messageTotals %+v disagrees with the scrape", m)
	}
	if got := p.value(t, "rabbitmq_channel_messages_acked_total"); got != 2 {
		t.Errorf("rabbitmq_channel_messages_acked_total = %v", got)
	}

	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := cons.QueueDelete("m.auto", false, false, false); err != nil {
		t.Fatal(err)
	}
	awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_channels", nil, 2},
		{"rabbitmq_channels_closed_total", nil, 1},
		{"rabbitmq_global_publishers", proto, 1},
		{"rabbitmq_queues_deleted_total", nil, 1},
		{"rabbitmq_queues", nil, 1},
	})
}

// TestMetricsClosedConnectionKeepsCounts: what a connection counted stays counted after it
// closes, and the connection and channel churn counters see it go.
func TestMetricsClosedConnectionKeepsCounts(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	base := metricsServer(t, srv)
	keep := openChannel(t, dial(t, url))
	declareTransientQueue(t, keep, "kept")

	gone, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	ch := openChannel(t, gone)
	for range 4 {
		publishText(t, ch, "", "kept", "x")
	}
	if d, ok, err := ch.Get("kept", true); err != nil || !ok || string(d.Body) != "x" {
		t.Fatalf("get: %v %v", err, ok)
	}
	proto := []string{"protocol", "amqp091"}
	awaitMetrics(t, base, []wantMetric{{"rabbitmq_global_messages_received_total", proto, 4}, {"rabbitmq_connections", nil, 2}})
	if err := gone.Close(); err != nil {
		t.Fatal(err)
	}
	qt := []string{"protocol", "amqp091", "queue_type", "rabbit_classic_queue"}
	awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_connections", nil, 1},
		{"rabbitmq_connections_opened_total", nil, 2},
		{"rabbitmq_connections_closed_total", nil, 1},
		{"rabbitmq_channels", nil, 1},
		{"rabbitmq_channels_opened_total", nil, 2},
		{"rabbitmq_channels_closed_total", nil, 1},
		{"rabbitmq_global_messages_received_total", proto, 4},
		{"rabbitmq_global_messages_routed_total", proto, 4},
		{"rabbitmq_global_messages_delivered_get_auto_ack_total", qt, 1},
		{"rabbitmq_global_publishers", proto, 0},
		{"rabbitmq_queue_messages_ready", nil, 3},
	})
	if m := srv.messageTotals(); m.received != 4 || m.getAutoAck != 1 {
		t.Errorf("messageTotals after the close: %+v", m)
	}
}

// TestMetricsPerObject: /metrics/per-object lists every queue of every vhost, labelled
// vhost and queue (escaped), with its ready, unacked, consumers and depth; /metrics has
// one unlabelled sample each, their sum. Deliveries held by an uncommitted ack, then by a
// rollback, stay unacked; a channel's close returns them.
func TestMetricsPerObject(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t, Config{Definitions: secDefsFile(t, withGuestVhosts("v2"))})
	base := metricsServer(t, srv)
	ch := openChannel(t, dial(t, url))
	weird := "we\"ird\\name\n\xff"
	for _, q := range []string{"po.ready", "po.unacked", weird} {
		declareTransientQueue(t, ch, q)
	}
	for range 3 {
		publishText(t, ch, "", "po.ready", "12345")
	}
	publishText(t, ch, "", weird, "1")
	for range 3 {
		publishText(t, ch, "", "po.unacked", "1")
	}
	cons := openChannel(t, dial(t, url))
	if err := cons.Qos(2, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := cons.Tx(); err != nil {
		t.Fatal(err)
	}
	msgs, err := cons.Consume("po.unacked", "c", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := takeDelivery(t, msgs)
	takeDelivery(t, msgs)
	v2 := openChannel(t, secConnect(t, srv.Addr().String(), "guest", "guest", "v2"))
	declareTransientQueue(t, v2, "other")
	publishText(t, v2, "", "other", "1")

	type row struct{ ready, unacked, consumers, readyBytes float64 }
	want := map[[2]string]row{
		{"/", "po.ready"}:   {3, 0, 0, 15},
		{"/", "po.unacked"}: {1, 2, 1, 1},
		{"/", weird}:        {1, 0, 0, 1},
		{"v2", "other"}:     {1, 0, 0, 1},
	}
	check := func(want map[[2]string]row) {
		t.Helper()
		var p *promText
		deadline := time.Now().Add(recvWait)
		for {
			p = scrape(t, base, "/metrics/per-object")
			got := map[[2]string]row{}
			for _, s := range p.families["rabbitmq_queue_messages_ready"].samples {
				k := [2]string{s.labels["vhost"], s.labels["queue"]}
				v := func(name string) float64 { return p.value(t, name, "vhost", k[0], "queue", k[1]) }
				got[k] = row{s.value, v("rabbitmq_queue_messages_unacked"), v("rabbitmq_queue_consumers"), v("rabbitmq_queue_messages_ready_bytes")}
				if depth := v("rabbitmq_queue_messages"); depth != got[k].ready+got[k].unacked {
					t.Fatalf("queue %q: depth %v is not ready + unacked", k, depth)
				}
			}
			wantFixed := map[[2]string]row{}
			for k, r := range want {
				if k[1] == weird {
					k[1] = strings.ToValidUTF8(k[1], "\ufffd")
				}
				wantFixed[k] = r
			}
			if len(got) == len(wantFixed) && func() bool {
				for k, r := range wantFixed {
					if got[k] != r {
						return false
					}
				}
				return true
			}() {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("per-object queues %v, want %v", got, wantFixed)
			}
			time.Sleep(5 * time.Millisecond)
		}
		agg := scrape(t, base, "/metrics")
		var sum row
		for _, r := range want {
			sum.ready, sum.unacked, sum.consumers = sum.ready+r.ready, sum.unacked+r.unacked, sum.consumers+r.consumers
		}
		if agg.value(t, "rabbitmq_queue_messages_ready") != sum.ready || agg.value(t, "rabbitmq_queue_messages_unacked") != sum.unacked ||
			agg.value(t, "rabbitmq_queue_consumers") != sum.consumers || agg.value(t, "rabbitmq_queues") != float64(len(want)) {
			t.Fatalf("/metrics does not sum the queues to %+v", sum)
		}
	}
	check(want)

	if err := first.Ack(false); err != nil { // in the transaction: still unacked
		t.Fatal(err)
	}
	if err := cons.TxRollback(); err != nil {
		t.Fatal(err)
	}
	check(want)
	if err := first.Ack(false); err != nil {
		t.Fatal(err)
	}
	if err := cons.TxCommit(); err != nil {
		t.Fatal(err)
	}
	// The credit freed takes the last ready one.
	want[[2]string{"/", "po.unacked"}] = row{0, 2, 1, 0}
	check(want)
	if err := cons.Close(); err != nil {
		t.Fatal(err)
	}
	want[[2]string{"/", "po.unacked"}] = row{2, 0, 0, 2}
	check(want)
}

// TestMetricsAlarmsAndMemory: the memory and disk figures are the ones the alarms watch,
// with their limits, and each alarm shows while it is on.
func TestMetricsAlarmsAndMemory(t *testing.T) {
	t.Parallel()
	var heap, free atomic.Uint64
	heap.Store(1 << 20)
	free.Store(1 << 30)
	srv := secServeTuned(t, Config{MemoryHighWatermark: 64 << 20, DiskFreeLimit: 50 << 20}, false, func(s *Server) {
		s.liveHeap = heap.Load
		s.diskFree = func() (uint64, error) { return free.Load(), nil }
	})
	base := metricsServer(t, srv)
	awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_process_resident_memory_bytes", nil, 1 << 20},
		{"rabbitmq_resident_memory_limit_bytes", nil, 64 << 20},
		{"rabbitmq_disk_space_available_bytes", nil, 1 << 30},
		{"rabbitmq_disk_space_available_limit_bytes", nil, 50 << 20},
		{"rabbitmq_alarms_memory_used_watermark", nil, 0},
		{"rabbitmq_alarms_free_disk_space_watermark", nil, 0},
		{"rabbitmq_alarms_file_descriptor_limit", nil, 0},
	})
	heap.Store(100 << 20)
	awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_process_resident_memory_bytes", nil, 100 << 20},
		{"rabbitmq_alarms_memory_used_watermark", nil, 1},
		{"rabbitmq_alarms_free_disk_space_watermark", nil, 0},
	})
	heap.Store(1 << 20)
	free.Store(1 << 20)
	awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_disk_space_available_bytes", nil, 1 << 20},
		{"rabbitmq_alarms_memory_used_watermark", nil, 0},
		{"rabbitmq_alarms_free_disk_space_watermark", nil, 1},
	})
}

// TestMetricsChannelUnconfirmed: rabbitmq_channel_messages_unconfirmed counts a publish in
// confirm mode from the moment it is received until its basic.ack. The server confirms
// transient publishes when it has read all the client's input, so the client holds back
// the end of a heartbeat frame to keep one publish unconfirmed.
func TestMetricsChannelUnconfirmed(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	base := metricsServer(t, srv)
	w := dialFrameClient(t, srv)
	w.send(1, &confirmSelect{})
	w.expect(1, idConfirmSelectOk)
	unconfirmed := func(want float64) {
		t.Helper()
		awaitMetrics(t, base, []wantMetric{{"rabbitmq_channel_messages_unconfirmed", nil, want}})
	}
	unconfirmed(0)

	heartbeat := wireFrame(frameHeartbeat, 0, nil)
	b := appendMethodFrame(nil, 1, &basicPublish{RoutingKey: "nowhere"})
	b = appendContent(b, 1, nil, []byte("body"), defaultFrameMax)
	w.write(append(b, heartbeat[:3]...))
	unconfirmed(1)

	w.write(heartbeat[3:])
	if ack := w.expect(1, idBasicAck).(*basicAck); ack.DeliveryTag != 1 || ack.Multiple {
		t.Fatalf("basic.ack %+v, want tag 1", ack)
	}
	p := awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_channel_messages_unconfirmed", nil, 0},
		{"rabbitmq_channel_messages_confirmed_total", nil, 1},
	})
	if f := p.families["rabbitmq_channel_messages_unconfirmed"]; f.typ != "gauge" || f.help != "Published but not yet confirmed messages" {
		t.Errorf("rabbitmq_channel_messages_unconfirmed: type %s, help %q", f.typ, f.help)
	}
}

// TestMetricsTCPSockets: rabbitmq_process_open_tcp_sockets counts the open client
// connections and rabbitmq_process_max_tcp_sockets is Config.MaxConnections, so that
// their difference is the number of clients that can still connect.
func TestMetricsTCPSockets(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t, Config{MaxConnections: 3})
	base := metricsServer(t, srv)
	awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_process_open_tcp_sockets", nil, 0},
		{"rabbitmq_process_max_tcp_sockets", nil, 3},
	})
	first := dial(t, url)
	dial(t, url)
	awaitMetrics(t, base, []wantMetric{{"rabbitmq_process_open_tcp_sockets", nil, 2}})
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	p := awaitMetrics(t, base, []wantMetric{
		{"rabbitmq_process_open_tcp_sockets", nil, 1},
		{"rabbitmq_connections", nil, 1},
	})
	for name, help := range map[string]string{
		"rabbitmq_process_open_tcp_sockets": "Open TCP sockets",
		"rabbitmq_process_max_tcp_sockets":  "Open TCP sockets limit",
	} {
		if f := p.families[name]; f.typ != "gauge" || f.help != help {
			t.Errorf("%s: type %s, help %q", name, f.typ, f.help)
		}
	}
}

// TestMetricsManyQueuesPerObject: a per-object scrape of 10,000 queues parses strictly and
// lists each one once (BenchmarkMetricsPerObject times 100,000).
func TestMetricsManyQueuesPerObject(t *testing.T) {
	t.Parallel()
	srv := metricsQueues(t, 10_000)
	var b strings.Builder
	if err := srv.writeMetrics(&b, true); err != nil {
		t.Fatal(err)
	}
	p, err := parseProm(b.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range queueFamilies {
		if n := len(p.families[f.name].samples); n != 10_000 {
			t.Errorf("%s: %d samples, want 10000", f.name, n)
		}
	}
	if got := p.value(t, "rabbitmq_queue_messages_ready", "vhost", "/", "queue", "q-00007"); got != 7%3 {
		t.Errorf("q-00007 ready = %v, want %d", got, 7%3)
	}
}

// metricsQueues returns a server, not serving, whose vhost / holds n queues named q-NNNNN,
// the i-th with i%3 ready messages.
func metricsQueues(t testing.TB, n int) *Server {
	srv := NewServer(Config{Logger: wireDiscardLogger()})
	vh := srv.vhost("/")
	m := &message{data: []byte("body"), size: 4}
	for i := range n {
		name := "q-" + strconv.Itoa(100000 + i)[1:]
		q := newQueue(name, vh, false, false, nil, queueArgs{})
		vh.queues[name] = q
		for range i % 3 {
			q.enqueue(m)
		}
	}
	return srv
}

// TestMetricsNeverGoDown: while connections and queues come and go (their counts folded
// into the server's totals), the sums read concurrently never decrease, and at the end
// they are exact.
func TestMetricsNeverGoDown(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t)
	const rounds = 60
	done := make(chan struct{})
	var last messageTotals
	var reads int
	go func() {
		defer close(done)
		for {
			m := srv.messageTotals()
			reads++
			if m.received < last.received || m.getAutoAck < last.getAutoAck || m.getEmpty < last.getEmpty ||
				m.routed < last.routed || m.consumeAutoAck < last.consumeAutoAck {
				t.Errorf("counts went down: %+v after %+v", m, last)
				return
			}
			last = m
			if m.received == 2*rounds && m.getAutoAck == rounds && m.getEmpty == rounds && m.consumeAutoAck == rounds {
				return
			}
			runtime.Gosched()
		}
	}()
	for i := range rounds {
		conn := dial(t, url)
		ch := openChannel(t, conn)
		name := "churn-" + strconv.Itoa(i)
		declareTransientQueue(t, ch, name)
		publishText(t, ch, "", name, "a")
		if _, ok, err := ch.Get(name, true); err != nil || !ok {
			t.Fatalf("get: %v %v", err, ok)
		}
		if _, ok, err := ch.Get(name, true); err != nil || ok {
			t.Fatalf("get on an empty queue: %v %v", err, ok)
		}
		msgs, err := ch.Consume(name, "", true, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		publishText(t, ch, "", name, "b")
		takeDelivery(t, msgs)
		if _, err := ch.QueueDelete(name, false, false, false); err != nil {
			t.Fatal(err)
		}
		if err := conn.Close(); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(recvWait):
		t.Fatalf("final counts %+v, want %d received, %d gets, %d empty gets, %d deliveries", last, 2*rounds, rounds, rounds, rounds)
	}
	if reads < 2 {
		t.Fatalf("only %d reads of the counts", reads)
	}
	if m := srv.messageTotals(); m.routed != 2*rounds || m.delivered() != 2*rounds {
		t.Errorf("final counts %+v", m)
	}
}

// dashboardOverviewMetrics are the metric families that RabbitMQ's "RabbitMQ-Overview"
// Grafana dashboard queries: every name in its panels' PromQL and its template variables,
// in panel order, each once. Read from rabbitmq/rabbitmq-server,
// deps/rabbitmq_prometheus/docker/grafana/dashboards/RabbitMQ-Overview.json, at commit
// 008e4584cd3dd8cb3b7e82f338a9a6315c5315b1 (dashboard version 20210322, Grafana 7) and at
// 6ab75c7247c83f41929cf4f060a8df43164271b1 (version 64, Grafana 8), which query the same
// names.
//
// The variables are label_values(rabbitmq_identity_info, namespace) and
// label_values(rabbitmq_identity_info{namespace="$namespace"}, rabbitmq_cluster). The
// panels join each family to its node with
// "* on(instance) group_left(rabbitmq_cluster, rabbitmq_node) rabbitmq_identity_info{rabbitmq_cluster="$rabbitmq_cluster", namespace="$namespace"}"
// and sum by(rabbitmq_node); in the second version the top row and a few node and queue
// panels select rabbitmq_cluster and namespace on the family itself and sum by(instance).
// instance, job and namespace are labels Prometheus attaches to what it scrapes; the
// exporter serves rabbitmq_cluster and rabbitmq_node on rabbitmq_identity_info only, as
// rabbitmq_prometheus does.
var dashboardOverviewMetrics = []string{
	// Top row: Ready messages, Incoming messages / s, Publishers (channels less
	// consumers), Connections, Queues, Unacknowledged messages, Outgoing messages / s,
	// Consumers, Channels, Nodes; the variables.
	"rabbitmq_identity_info",
	"rabbitmq_queue_messages_ready",
	"rabbitmq_channel_messages_published_total",
	"rabbitmq_channels",
	"rabbitmq_channel_consumers",
	"rabbitmq_connections",
	"rabbitmq_queues",
	"rabbitmq_queue_messages_unacked",
	"rabbitmq_channel_messages_redelivered_total",
	"rabbitmq_channel_messages_delivered_total",
	"rabbitmq_channel_messages_delivered_ack_total",
	"rabbitmq_channel_get_total",
	"rabbitmq_channel_get_ack_total",
	"rabbitmq_build_info",
	// NODES: the build_info table; memory available before publishers blocked
	// (limit - used); disk space available; file descriptors available; TCP sockets
	// available.
	"rabbitmq_resident_memory_limit_bytes",
	"rabbitmq_process_resident_memory_bytes",
	"rabbitmq_disk_space_available_bytes",
	"rabbitmq_process_max_fds",
	"rabbitmq_process_open_fds",
	"rabbitmq_process_max_tcp_sockets",
	"rabbitmq_process_open_tcp_sockets",
	// INCOMING MESSAGES: published, confirmed, routed to queues, unconfirmed (a rate of
	// the gauge), unroutable dropped and returned.
	"rabbitmq_channel_messages_confirmed_total",
	"rabbitmq_queue_messages_published_total",
	"rabbitmq_channel_messages_unconfirmed",
	"rabbitmq_channel_messages_unroutable_dropped_total",
	"rabbitmq_channel_messages_unroutable_returned_total",
	// OUTGOING MESSAGES: delivered, redelivered, manual and auto ack, acknowledged, polling
	// with auto ack, empty and with manual ack.
	"rabbitmq_channel_messages_acked_total",
	"rabbitmq_channel_get_empty_total",
	// QUEUES, CHANNELS, CONNECTIONS: totals, and the churn.
	"rabbitmq_queues_declared_total",
	"rabbitmq_queues_created_total",
	"rabbitmq_queues_deleted_total",
	"rabbitmq_channels_opened_total",
	"rabbitmq_channels_closed_total",
	"rabbitmq_connections_opened_total",
	"rabbitmq_connections_closed_total",
}

// dashboardNotServed lists the names of dashboardOverviewMetrics that /metrics does not
// serve here, with the reason; their panels stay empty. Every other name must be served
// by a broker with a data directory, a memory watermark and a connection limit (without
// them rabbitmq_disk_space_available_bytes, rabbitmq_resident_memory_limit_bytes and
// rabbitmq_process_max_tcp_sockets are left out, as there is nothing to report).
func dashboardNotServed() map[string]string {
	m := map[string]string{}
	if runtime.GOOS != "linux" {
		const why = "open descriptors are counted in /proc/self/fd: Linux only (metrics_other.go)"
		m["rabbitmq_process_open_fds"] = why
		m["rabbitmq_process_max_fds"] = why
	}
	return m
}

// TestDashboardOverviewMetricsServed: both endpoints serve every family the RabbitMQ-Overview
// dashboard queries, but those listed in dashboardNotServed (which must indeed be missing),
// counters as counters; rabbitmq_identity_info is one sample with the rabbitmq_cluster and
// rabbitmq_node labels the panels join in and sum by; and no other sample carries those
// labels or the ones Prometheus attaches (instance, job, namespace), which would break the
// join or be renamed exported_*.
func TestDashboardOverviewMetricsServed(t *testing.T) {
	t.Parallel()
	srv, url := newTestServer(t, Config{MemoryHighWatermark: 1 << 40, MaxConnections: 100})
	base := metricsServer(t, srv)
	declareTransientQueue(t, openChannel(t, dial(t, url)), "dashboard")
	notServed := dashboardNotServed()
	seen := map[string]bool{}
	for _, name := range dashboardOverviewMetrics {
		if seen[name] {
			t.Errorf("%s listed twice", name)
		}
		seen[name] = true
	}
	for name := range notServed {
		if !seen[name] {
			t.Errorf("%s is listed as not served but the dashboard does not query it", name)
		}
	}
	for _, path := range []string{"/metrics", "/metrics/per-object"} {
		p := scrape(t, base, path)
		for _, name := range dashboardOverviewMetrics {
			f := p.families[name]
			why, listed := notServed[name]
			switch {
			case f == nil && !listed:
				t.Errorf("GET %s: %s is not served: the dashboard's panels on it stay empty", path, name)
			case f != nil && listed:
				t.Errorf("GET %s: %s is served, but listed as not served (%s)", path, name, why)
			case f != nil && strings.HasSuffix(name, "_total") != (f.typ == "counter"):
				t.Errorf("GET %s: %s has type %s", path, name, f.typ)
			}
		}
		id := p.families["rabbitmq_identity_info"]
		if id == nil || len(id.samples) != 1 {
			t.Fatalf("GET %s: rabbitmq_identity_info %+v, want one sample", path, id)
		}
		for _, l := range []string{"rabbitmq_cluster", "rabbitmq_node"} {
			if id.samples[0].labels[l] == "" {
				t.Errorf("GET %s: rabbitmq_identity_info has no %s label", path, l)
			}
		}
		for _, name := range p.order {
			if name == "rabbitmq_identity_info" {
				continue
			}
			for _, s := range p.families[name].samples {
				for _, l := range []string{"rabbitmq_cluster", "rabbitmq_node", "instance", "job", "namespace"} {
					if _, ok := s.labels[l]; ok {
						t.Errorf("GET %s: %s carries the label %s", path, s.name, l)
					}
				}
			}
		}
	}
}
