package amqp

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// The web UI's tests: what the handler serves (headers, types, the files' own rules), and
// the UI driven in headless Chromium (Debian: apt-get install chromium; the test skips
// without it) through the DevTools protocol, over a WebSocket client written here.

// TestUIAssets checks the UI's responses: the page and its files with their types and
// the Content-Security-Policy, revalidation, and 404s; the API beside it is unchanged.
func TestUIAssets(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t)
	hs := httptest.NewServer(srv.ManagementHandler())
	t.Cleanup(hs.Close)
	get := func(method, path string, header ...string) (*http.Response, string) {
		t.Helper()
		req, err := http.NewRequest(method, hs.URL+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	for path, want := range map[string]string{"/": "text/html; charset=utf-8", "/ui/app.js": "text/javascript; charset=utf-8",
		"/ui/style.css": "text/css; charset=utf-8", "/ui/favicon.svg": "image/svg+xml"} {
		resp, body := get("GET", path)
		h := resp.Header
		if resp.StatusCode != 200 || h.Get("Content-Type") != want || body == "" {
			t.Errorf("GET %s: %d %q (%d bytes), want 200 %q", path, resp.StatusCode, h.Get("Content-Type"), len(body), want)
		}
		if h.Get("Content-Security-Policy") != uiCSP || h.Get("X-Frame-Options") != "DENY" ||
			h.Get("X-Content-Type-Options") != "nosniff" || h.Get("Referrer-Policy") != "no-referrer" {
			t.Errorf("GET %s: security headers %v", path, h)
		}
		etag := h.Get("ETag")
		if resp, _ := get("GET", path, "If-None-Match", etag); etag == "" || resp.StatusCode != http.StatusNotModified {
			t.Errorf("GET %s with If-None-Match %s: %d, want 304", path, etag, resp.StatusCode)
		}
	}
	for _, csp := range []string{"default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
		"require-trusted-types-for 'script'"} {
		if !strings.Contains(uiCSP, csp) {
			t.Errorf("CSP %q lacks %q", uiCSP, csp)
		}
	}
	if strings.Contains(uiCSP, "unsafe-") || strings.Contains(uiCSP, "http") {
		t.Errorf("CSP %q allows inline code or another origin", uiCSP)
	}
	if resp, body := get("HEAD", "/"); resp.StatusCode != 200 || body != "" {
		t.Errorf("HEAD /: %d with %d bytes", resp.StatusCode, len(body))
	}
	for _, path := range []string{"/ui/missing.js", "/ui/%2E%2E%2Fui.go", "/ui/", "/ui/index.html/x"} {
		if resp, _ := get("GET", path); resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", path, resp.StatusCode)
		}
	}
	if resp, _ := get("POST", "/"); resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /: %d, want 405", resp.StatusCode)
	}
	if resp, _ := get("GET", "/api/overview"); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /api/overview without credentials: %d, want 401", resp.StatusCode)
	}
}

// TestUIFilesKeepTheRules checks the UI's files for what the CSP and the house rules
// forbid: inline script, style or event handlers, HTML built from strings, eval, and
// anything fetched from another origin. Every file the page names is embedded.
func TestUIFilesKeepTheRules(t *testing.T) {
	t.Parallel()
	files := map[string]string{}
	err := fs.WalkDir(uiFiles, "ui", func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			b, err := fs.ReadFile(uiFiles, path)
			files[strings.TrimPrefix(path, "ui/")] = string(b)
			return err
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	page := files["index.html"]
	for _, m := range regexp.MustCompile(`(?is)<script([^>]*)>(.*?)</script>`).FindAllStringSubmatch(page, -1) {
		if !strings.Contains(m[1], " src=") || strings.TrimSpace(m[2]) != "" {
			t.Errorf("index.html has an inline script: %q", m[0])
		}
	}
	if m := regexp.MustCompile(`(?i)<style|\sstyle=|\son[a-z]+=|javascript:`).FindString(page); m != "" {
		t.Errorf("index.html has %q", m)
	}
	for _, m := range regexp.MustCompile(`(?:src|href)="([^"]*)"`).FindAllStringSubmatch(page, -1) {
		ref := m[1]
		if strings.HasPrefix(ref, "#") {
			continue
		}
		if _, ok := files[strings.TrimPrefix(ref, "ui/")]; !strings.HasPrefix(ref, "ui/") || !ok {
			t.Errorf("index.html names %q, not an embedded file", ref)
		}
	}
	for name, text := range files {
		if m := regexp.MustCompile(`https?://[^\s"')]+`).FindString(text); m != "" && m != "http://www.w3.org/2000/svg" {
			t.Errorf("%s names another origin: %s", name, m)
		}
		if !strings.HasSuffix(name, ".js") {
			continue
		}
		if m := regexp.MustCompile(`innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|\.style\b|setAttribute\('style`).FindString(text); m != "" {
			t.Errorf("%s uses %s: data must reach the page as text, styles from style.css", name, m)
		}
	}
}

// TestUIBrowser drives the UI in headless Chromium against a broker with real data: it
// logs in through the form, finds a queue made over AMQP with its depth on the queues
// page, peeks, gets, publishes, purges and deletes from the queue's page, publishes from
// an exchange's page to an AMQP consumer, binds and unbinds, declares and deletes
// exchanges and queues, closes a connection, lists channels, adds and deletes a vhost, a
// user and permissions, checks that a non-administrator sees no admin pages, that a
// refused password returns to the login form and a page opened meanwhile follows the
// login, and that the page ran without a script error or a CSP violation.
//
// Not parallel: Chromium is heavy, so it runs before the parallel tests start, and its
// load does not stretch their timed waits.
func TestUIBrowser(t *testing.T) {
	chromium := uiChromium(t)
	b := startAPIBroker(t, allEdits(addUser("viewer", "management"),
		func(d *Definitions) error { return d.SetPermissions("viewer", "/", ".*", ".*", ".*") }))
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	declareTransientQueue(t, ch, "ui-depth")
	for _, body := range []string{"m1", "m2", "m3"} {
		publishText(t, ch, "", "ui-depth", body)
	}
	if err := ch.ExchangeDeclare("ui-fan", "fanout", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	declareTransientQueue(t, ch, "ui-in")
	if err := ch.QueueBind("ui-in", "", "ui-fan", false, nil); err != nil {
		t.Fatal(err)
	}
	msgs := consumeTagged(t, ch, "ui-in", "ui-consumer")
	depth := func(queue string) int { return queueDepth(t, conn, queue) }

	br := startBrowser(t, chromium)
	br.open(b.http + "/")

	// A wrong password stays on the login form; the right one opens the overview.
	br.typeInto(jsField("Log in", "username"), "guest")
	br.typeInto(jsField("Log in", "password"), "wrong")
	br.click(jsSubmit("Log in"))
	br.waitText("the refused login", jsStatus, "Login failed: Not_Authorized")
	br.typeInto(jsField("Log in", "password"), "guest")
	br.click(jsSubmit("Log in"))
	br.waitText("the overview", "location.hash", "#/overview")
	br.waitText("the user", `document.getElementById('user').textContent`, "guest (administrator)")
	br.waitText("the queue count", jsFact("Totals", "Queues"), "2")
	br.waitText("the ready messages", jsFact("Queued messages", "Ready"), "3")
	br.waitFor("the rates chart drawn", `(() => { const c = document.querySelector('canvas');
		const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
		for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false })()`)
	br.waitFor("the chart's legend", `document.querySelector('.legend li')?.textContent.startsWith('Publish: ')`)

	// The queues page shows the depth of a queue made over AMQP, and follows it.
	br.navigate("#/queues")
	br.waitText("ui-depth's depth", jsCell("Queues", "ui-depth", "Ready"), "3")
	br.waitText("ui-in's consumer", jsCell("Queues", "ui-in", "Consumers"), "1")
	publishText(t, ch, "", "ui-depth", "m4")
	br.waitText("ui-depth's depth after a publish over AMQP", jsCell("Queues", "ui-depth", "Ready"), "4")

	// The queue's page: peek leaves the messages, get takes one, publish adds one, purge.
	br.click(jsLink("Queues", "ui-depth"))
	br.waitText("the queue page", "location.hash", "#/queues/%2F/ui-depth")
	br.waitText("the queue page's depth", jsFact("Messages", "Ready"), "4")
	br.typeInto(jsField("Peek at messages", "count"), "2")
	br.click(jsSubmit("Peek at messages"))
	br.waitText("the peeked messages", `[...document.querySelectorAll('.message pre')].map(p => p.textContent).join(',')`, "m1,m2")
	if n := depth("ui-depth"); n != 4 {
		t.Fatalf("after a peek, ui-depth holds %d messages, want 4", n)
	}
	br.choose(jsField("Get messages", "ackmode"), "ack_requeue_false")
	br.click(jsSubmit("Get messages"))
	br.waitText("the message got", `[...document.querySelectorAll('.message pre')].map(p => p.textContent).join(',')`, "m1")
	if n := depth("ui-depth"); n != 3 {
		t.Fatalf("after a get with ack_requeue_false, ui-depth holds %d messages, want 3", n)
	}
	br.typeInto(jsField("Publish message", "payload"), "from the queue page")
	br.click(jsSubmit("Publish message"))
	br.waitText("the publish", jsStatus, "Message published and routed.")
	if n := depth("ui-depth"); n != 4 {
		t.Fatalf("after a publish from the UI, ui-depth holds %d messages, want 4", n)
	}
	br.click(jsButton("Purge"))
	br.waitText("the purge", jsStatus, "Queue ui-depth purged.")
	if n := depth("ui-depth"); n != 0 {
		t.Fatalf("after a purge from the UI, ui-depth holds %d messages, want 0", n)
	}

	// An exchange's page: a publish reaches an AMQP consumer; a binding is added and removed.
	br.navigate("#/exchanges")
	br.waitText("ui-fan's type", jsCell("Exchanges", "ui-fan", "Type"), "fanout")
	br.click(jsLink("Exchanges", "ui-fan"))
	br.waitText("the exchange page", "location.hash", "#/exchanges/%2F/ui-fan")
	br.typeInto(jsField("Publish message", "payload"), "hello from the browser")
	br.typeInto(jsField("Publish message", "headers"), `{"x-from": "ui"}`)
	br.click(jsSubmit("Publish message"))
	br.waitText("the publish", jsStatus, "Message published and routed.")
	d := takeDelivery(t, msgs)
	if string(d.Body) != "hello from the browser" || d.Exchange != "ui-fan" || d.Headers["x-from"] != "ui" {
		t.Fatalf("the consumer got %q from %q with headers %v", d.Body, d.Exchange, d.Headers)
	}
	d.Ack(false)
	br.waitText("the binding to ui-in", jsCell("Bindings from this exchange", "ui-in", "Type"), "queue")
	br.typeInto(jsField("Add binding from this exchange", "destination"), "ui-depth")
	br.typeInto(jsField("Add binding from this exchange", "routing_key"), "k/1")
	br.click(jsSubmit("Add binding from this exchange"))
	br.waitText("the new binding", jsCell("Bindings from this exchange", "ui-depth", "Routing key"), "k/1")
	if v := b.must(200, "GET", "/api/bindings/%2F/e/ui-fan/q/ui-depth", "guest", nil); len(v.([]any)) != 1 {
		t.Fatalf("bindings from ui-fan to ui-depth: %v", v)
	}
	br.click(jsRowButton("Bindings from this exchange", "ui-depth", "Unbind"))
	br.waitText("the unbinding", jsStatus, "Binding from ui-fan to ui-depth removed.")
	if v := b.must(200, "GET", "/api/bindings/%2F/e/ui-fan/q/ui-depth", "guest", nil); len(v.([]any)) != 0 {
		t.Fatalf("bindings from ui-fan to ui-depth after unbind: %v", v)
	}

	// Declare an exchange and a queue with the forms, delete them from their pages.
	br.navigate("#/exchanges")
	br.typeInto(jsField("Add an exchange", "name"), "ui-made")
	br.choose(jsField("Add an exchange", "type"), "topic")
	br.click(jsSubmit("Add an exchange"))
	br.waitText("the declare", jsStatus, "Exchange ui-made added.")
	br.waitText("ui-made's type", jsCell("Exchanges", "ui-made", "Type"), "topic")
	if err := onFreshChannel(t, conn, func(c *amqp091.Channel) error {
		return c.ExchangeDeclarePassive("ui-made", "topic", true, false, false, false, nil)
	}); err != nil {
		t.Fatalf("the exchange declared from the UI: %v", err)
	}
	br.click(jsLink("Exchanges", "ui-made"))
	br.click(jsButton("Delete exchange"))
	br.waitText("the exchange's deletion", jsStatus, "Exchange ui-made deleted.")
	if err := onFreshChannel(t, conn, func(c *amqp091.Channel) error {
		return c.ExchangeDeclarePassive("ui-made", "topic", true, false, false, false, nil)
	}); amqpCode(err) != 404 {
		t.Fatalf("the exchange deleted from the UI: %v, want 404", err)
	}
	br.navigate("#/queues")
	br.typeInto(jsField("Add a queue", "name"), "ui-made-q")
	br.typeInto(jsField("Add a queue", "arguments"), `{"x-max-length": 10}`)
	br.click(jsSubmit("Add a queue"))
	br.waitText("the queue's declare", jsStatus, "Queue ui-made-q added.")
	br.waitFor("ui-made-q's argument", "("+jsCell("Queues", "ui-made-q", "Features")+` ?? "").includes("x-max-length")`) // null until the row is drawn
	if n := depth("ui-made-q"); n != 0 {
		t.Fatalf("ui-made-q holds %d messages", n)
	}
	br.click(jsLink("Queues", "ui-depth"))
	br.click(jsButton("Delete queue"))
	br.waitText("the queue's deletion", jsStatus, "Queue ui-depth deleted.")
	if err := onFreshChannel(t, conn, func(c *amqp091.Channel) error {
		_, err := c.QueueDeclarePassive("ui-depth", false, false, false, false, nil)
		return err
	}); amqpCode(err) != 404 {
		t.Fatalf("the queue deleted from the UI: %v, want 404", err)
	}

	// Connections: close one; channels: the consumer's channel.
	victim := dial(t, b.url)
	closed := victim.NotifyClose(make(chan *amqp091.Error, 1))
	name := victim.LocalAddr().String() + " -> " + b.srv.Addr().String()
	br.navigate("#/connections")
	br.waitText("the connection's user", jsCell("Connections", name, "User"), "guest")
	br.click(jsRowButton("Connections", name, "Close"))
	select {
	case e := <-closed:
		if e == nil || e.Code != 320 {
			t.Fatalf("connection closed from the UI with %v, want 320", e)
		}
	case <-time.After(uiWait):
		t.Fatal("the connection closed from the UI is still open")
	}
	br.navigate("#/channels")
	chName := conn.LocalAddr().String() + " -> " + b.srv.Addr().String() + " (1)"
	br.waitText("the consumer's channel", jsCell("Channels", chName, "Consumers"), "1")

	// Administrators: vhosts, users and permissions.
	br.navigate("#/vhosts")
	br.typeInto(jsField("Add a virtual host", "name"), "ui-vh")
	br.click(jsSubmit("Add a virtual host"))
	br.waitText("the new vhost", jsCell("Virtual hosts", "ui-vh", "Total"), "0")
	b.must(200, "GET", "/api/vhosts/ui-vh", "guest", nil)
	br.click(jsRowButton("Virtual hosts", "ui-vh", "Delete"))
	br.waitText("the vhost's deletion", jsStatus, "Virtual host ui-vh deleted.")
	b.must(404, "GET", "/api/vhosts/ui-vh", "guest", nil)
	br.navigate("#/users")
	br.typeInto(jsField("Add a user", "name"), "ui-user")
	br.typeInto(jsField("Add a user", "password"), "ui-pw")
	br.typeInto(jsField("Add a user", "tags"), "management, monitoring")
	br.click(jsSubmit("Add a user"))
	br.waitText("the new user's tags", jsCell("Users", "ui-user", "Tags"), "management monitoring")
	br.typeInto(jsField("Set permissions", "user"), "ui-user")
	br.typeInto(jsField("Set permissions", "write"), "^ui-")
	br.click(jsSubmit("Set permissions"))
	br.waitText("the new permissions", jsCell("Permissions", "ui-user", "Write"), "^ui-")
	if v := b.must(200, "GET", "/api/permissions/%2F/ui-user", "guest", nil); field(v, "write") != "^ui-" || field(v, "read") != ".*" {
		t.Fatalf("permissions set from the UI: %v", v)
	}
	br.click(jsRowButton("Users", "ui-user", "Delete"))
	br.waitText("the user's deletion", jsStatus, "User ui-user deleted.")
	b.must(404, "GET", "/api/users/ui-user", "guest", nil)

	// The page ran under its CSP: nothing was refused while the UI worked, and Trusted
	// Types refuse HTML from a string (a violation the page's listener sees).
	if v := br.evalString(`window.uiViolations.join('; ')`); v != "" {
		t.Errorf("CSP violations: %s", v)
	}
	br.checkProblems()
	if got := br.evalString(`(() => { try { document.createElement('div').innerHTML = '<b>x</b>'; return 'allowed' } catch (e) { return e.name } })()`); got != "TypeError" {
		t.Errorf("innerHTML from a string: %s, want a TypeError from Trusted Types", got)
	}
	br.waitText("the violation reported", `window.uiViolations.join('; ')`, "require-trusted-types-for trusted-types-sink")
	br.eval(`window.uiViolations = []`)
	var logged []string
	for deadline := time.Now().Add(uiWait); len(logged) == 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		logged = br.takeProblems()
	}
	if len(logged) != 1 || !strings.Contains(logged[0], "TrustedHTML") {
		t.Errorf("after an innerHTML refused, the page logged %q", logged)
	}

	// A user without the administrator tag sees no admin pages.
	br.click(jsButton("Log out"))
	br.typeInto(jsField("Log in", "username"), "viewer")
	br.typeInto(jsField("Log in", "password"), "pw")
	br.click(jsSubmit("Log in"))
	br.waitText("the viewer", `document.getElementById('user').textContent`, "viewer (management)")
	br.waitText("the admin links", `getComputedStyle(document.querySelector('nav .admin')).display`, "none")
	br.navigate("#/users")
	br.waitText("the users page", `document.querySelector('h1').textContent`, "Not allowed")

	// Credentials the broker no longer takes return the page to the login form.
	b.must(204, "PUT", "/api/users/viewer", "guest", map[string]any{"password": "changed", "tags": "management"})
	br.navigate("#/overview")
	br.waitText("the login form after a refused password", jsStatus, "The broker refused your credentials: log in again.")
	br.waitFor("the login form", jsField("Log in", "username"))
	if got := br.evalString(`String(sessionStorage.getItem('amqp-go.auth'))`); got != "null" {
		t.Errorf("credentials kept after logout: %s", got)
	}

	// A page opened while logged out is the one shown after the login.
	br.navigate("#/queues")
	br.typeInto(jsField("Log in", "username"), "viewer")
	br.typeInto(jsField("Log in", "password"), "changed")
	br.click(jsSubmit("Log in"))
	br.waitText("the queues page after the login", `document.querySelector('main h1').textContent`, "Queues")
	br.waitText("ui-in's consumer, seen by the viewer", jsCell("Queues", "ui-in", "Consumers"), "1")
	br.checkProblems()
}

// TestUIScreenshot takes the README's screenshots when AMQP_UI_SCREENSHOT names a PNG
// file (docs/ui.png): the overview after a minute of traffic, so that the charts have
// something to show, and the queues page next to it (docs/ui-queues.png).
func TestUIScreenshot(t *testing.T) {
	out := os.Getenv("AMQP_UI_SCREENSHOT")
	if out == "" {
		t.Skip("set AMQP_UI_SCREENSHOT=docs/ui.png to take the README's screenshots")
	}
	chromium := uiChromium(t)
	b := startAPIBroker(t, nil)
	conn := dial(t, b.url)
	ch := openChannel(t, conn)
	for _, q := range []struct {
		name string
		args amqp091.Table
	}{{"orders", nil}, {"invoices", nil}, {"emails", amqp091.Table{"x-message-ttl": int32(600000)}}, {"audit", amqp091.Table{"x-max-length": int32(5000)}}} {
		if _, err := ch.QueueDeclare(q.name, true, false, false, false, q.args); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.ExchangeDeclare("events", "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, bind := range [][2]string{{"orders", "order.*"}, {"invoices", "order.paid"}, {"audit", "#"}, {"emails", "*.email"}} {
		if err := ch.QueueBind(bind[0], bind[1], "events", false, nil); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(stop); wg.Wait() })
	wg.Add(2)
	go func() { // publishers: a rate that swings between about 40 and 200 messages a second
		defer wg.Done()
		pub, _ := conn.Channel()
		start := time.Now()
		keys := []string{"order.created", "order.paid", "user.email", "order.shipped"}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			n := 1 + int(1.2+math.Sin(time.Since(start).Seconds()/9))
			for j := 0; j < n; j++ {
				pub.Publish("events", keys[(i+j)%len(keys)], false, false, amqp091.Publishing{Body: []byte("{\"id\": 1}")})
			}
		}
	}()
	go func() { // a consumer of orders that keeps up only part of the time
		defer wg.Done()
		sub, _ := conn.Channel()
		sub.Qos(20, 0, false)
		msgs, err := sub.Consume("orders", "orders-worker", false, false, false, false, nil)
		if err != nil {
			return
		}
		for {
			select {
			case <-stop:
				return
			case d := <-msgs:
				d.Ack(false)
				time.Sleep(9 * time.Millisecond)
			}
		}
	}()

	br := startBrowser(t, chromium)
	br.open(b.http + "/")
	br.typeInto(jsField("Log in", "username"), "guest")
	br.typeInto(jsField("Log in", "password"), "guest")
	br.click(jsSubmit("Log in"))
	br.waitText("the overview", "location.hash", "#/overview")
	deadline := time.Now().Add(2 * time.Minute)
	for br.evalString(`String(samples.length >= 13)`) != "true" {
		if time.Now().After(deadline) {
			t.Fatal("the chart has too few samples")
		}
		time.Sleep(time.Second)
	}
	br.eval(`document.activeElement.blur()`)
	br.screenshot(out)
	br.navigate("#/queues")
	br.waitFor("the queues", jsCell("Queues", "orders", "Consumers")+` === '1'`)
	br.screenshot(strings.TrimSuffix(out, ".png") + "-queues.png")
	br.checkProblems()
}

// uiWait bounds each wait for the page: more than a refresh period (5 s).
const uiWait = 20 * time.Second

// uiChromium returns the Chromium binary, or skips the test.
func uiChromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("chromium is not installed (Debian: apt-get install chromium)")
	return ""
}

// --- the page's elements, as JavaScript expressions ---

// jsq quotes s as a JavaScript string.
func jsq(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

const jsStatus = `(document.getElementById('status').hidden ? '' : document.getElementById('status').textContent)`

func jsForm(legend string) string {
	return `[...document.forms].find(f => f.querySelector('legend')?.textContent === ` + jsq(legend) + `)`
}

func jsField(legend, name string) string { return jsForm(legend) + `?.elements[` + jsq(name) + `]` }
func jsSubmit(legend string) string {
	return jsForm(legend) + `?.querySelector('button[type=submit]')`
}

func jsButton(text string) string {
	return `[...document.querySelectorAll('button')].find(b => b.textContent === ` + jsq(text) + `)`
}

func jsTable(caption string) string {
	return `[...document.querySelectorAll('table')].find(t => t.caption?.textContent === ` + jsq(caption) + `)`
}

// jsRow is the row of a table with a cell that reads text.
func jsRow(caption, text string) string {
	return `[...(` + jsTable(caption) + `)?.tBodies[0].rows ?? []].find(r => [...r.cells].some(c => c.textContent === ` + jsq(text) + `))`
}

// jsCell is the text of a row's cell in the named column, or null.
func jsCell(caption, row, column string) string {
	return `(() => { const t = ` + jsTable(caption) + `; const r = ` + jsRow(caption, row) + `;
		const i = t ? [...t.tHead.rows[0].cells].findIndex(c => c.textContent === ` + jsq(column) + `) : -1;
		return r && i >= 0 ? r.cells[i].textContent : null })()`
}

func jsRowButton(caption, row, text string) string {
	return `[...(` + jsRow(caption, row) + `)?.querySelectorAll('button') ?? []].find(b => b.textContent === ` + jsq(text) + `)`
}

func jsLink(caption, text string) string {
	return `[...(` + jsTable(caption) + `)?.querySelectorAll('a') ?? []].find(a => a.textContent === ` + jsq(text) + `)`
}

// jsFact is the value of a name in the facts of the card with the heading.
func jsFact(heading, name string) string {
	return `(() => { const c = [...document.querySelectorAll('.card')].find(c => c.querySelector('h2')?.textContent === ` + jsq(heading) + `);
		const dt = c && [...c.querySelectorAll('dt')].find(d => d.textContent === ` + jsq(name) + `);
		return dt ? dt.nextElementSibling.textContent : null })()`
}

// --- Chromium, driven through the DevTools protocol ---

// uiBrowser is a headless Chromium with one page, driven over the DevTools protocol.
type uiBrowser struct {
	t       *testing.T
	ws      *uiWebSocket
	session string // the page's session

	mu       sync.Mutex
	nextID   int64
	waiting  map[int64]chan cdpReply
	problems []string // script errors and console errors
	closed   error    // set when the socket ends
}

type cdpReply struct {
	Result json.RawMessage
	Error  *struct {
		Code    int
		Message string
	}
}

// cdpIn is a message from the browser: an answer (ID) or an event (Method).
type cdpIn struct {
	ID        int64           `json:"id"`
	SessionID string          `json:"sessionId"`
	Method    string          `json:"method"`
	Params    json.RawMessage `json:"params"`
	cdpReply
}

// startBrowser starts Chromium on a fresh profile, with a page of 1200x800 that reports
// CSP violations into window.uiViolations. Chromium goes at the end of the test: closed
// through the protocol, killed if it lingers, and its profile removed. It reaches only
// 127.0.0.1: no proxy, no host names resolve, no background services.
func startBrowser(t *testing.T, chromium string) *uiBrowser {
	t.Helper()
	dir, err := os.MkdirTemp("", "amqp-ui-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Chromium's helpers may outlive the browser by a moment.
		deadline := time.Now().Add(10 * time.Second)
		for os.RemoveAll(dir) != nil && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("could not remove Chromium's profile %s", dir)
		}
	})
	cmd := exec.Command(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--user-data-dir="+dir,
		"--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
		"--disable-background-networking", "--disable-component-update", "--disable-default-apps",
		"--disable-domain-reliability", "--disable-client-side-phishing-detection", "--metrics-recording-only",
		"--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
		"--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
		"--password-store=basic", "--use-mock-keychain", "--hide-scrollbars", "--window-size=1200,800",
		"about:blank")
	cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"), "XDG_CACHE_HOME="+filepath.Join(dir, "cache"))
	var stderr uiTail
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", chromium, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	br := &uiBrowser{t: t, waiting: map[int64]chan cdpReply{}}
	t.Cleanup(func() {
		if br.ws != nil {
			br.send("", "Browser.close", nil)
		}
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if br.ws != nil {
			br.ws.c.Close()
		}
		if t.Failed() {
			t.Logf("chromium's output, the end:\n%s", stderr.String())
		}
	})

	// Chromium writes its port and the browser's WebSocket path to DevToolsActivePort.
	var port, path string
	deadline := time.Now().Add(uiWait)
	for {
		b, err := os.ReadFile(filepath.Join(dir, "DevToolsActivePort"))
		if lines := strings.Fields(string(b)); err == nil && len(lines) == 2 {
			port, path = lines[0], lines[1]
			break
		}
		select {
		case <-exited:
			t.Fatalf("chromium exited: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromium wrote no DevToolsActivePort: %s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	ws, err := uiDialWebSocket("ws://127.0.0.1:" + port + path)
	if err != nil {
		t.Fatal(err)
	}
	br.ws = ws
	go br.read()

	var target struct{ TargetID string }
	br.call("", "Target.createTarget", map[string]any{"url": "about:blank"}, &target)
	var attached struct{ SessionID string }
	br.call("", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached)
	br.session = attached.SessionID
	for _, domain := range []string{"Page.enable", "Runtime.enable", "Log.enable"} {
		br.call(br.session, domain, nil, nil)
	}
	br.call(br.session, "Emulation.setDeviceMetricsOverride", map[string]any{"width": 1200, "height": 800,
		"deviceScaleFactor": 1, "mobile": false}, nil)
	br.call(br.session, "Page.addScriptToEvaluateOnNewDocument", map[string]any{"source": `
		window.uiViolations = [];
		document.addEventListener('securitypolicyviolation', e => window.uiViolations.push(e.violatedDirective + ' ' + e.blockedURI));`}, nil)
	return br
}

// read takes the browser's messages: answers go to their callers; a dialog (confirm) is
// accepted; script exceptions and console errors are kept as problems, except the
// failed API requests the page reports itself.
func (br *uiBrowser) read() {
	for {
		data, err := br.ws.read()
		if err != nil {
			br.mu.Lock()
			br.closed = err
			for id, ch := range br.waiting {
				close(ch)
				delete(br.waiting, id)
			}
			br.mu.Unlock()
			return
		}
		var m cdpIn
		if err := json.Unmarshal(data, &m); err != nil {
			continue
		}
		if m.ID != 0 {
			br.mu.Lock()
			ch := br.waiting[m.ID]
			delete(br.waiting, m.ID)
			br.mu.Unlock()
			if ch != nil {
				ch <- m.cdpReply
			}
			continue
		}
		var p struct {
			ExceptionDetails struct {
				Text      string
				Exception struct{ Description string }
			}
			Type  string
			Args  []struct{ Value any }
			Entry struct{ Source, Level, Text, URL string }
		}
		json.Unmarshal(m.Params, &p)
		var problem string
		switch m.Method {
		case "Page.javascriptDialogOpening":
			br.send(m.SessionID, "Page.handleJavaScriptDialog", map[string]any{"accept": true})
		case "Runtime.exceptionThrown":
			problem = "exception: " + p.ExceptionDetails.Text + " " + p.ExceptionDetails.Exception.Description
		case "Runtime.consoleAPICalled":
			if p.Type == "error" || p.Type == "assert" {
				problem = fmt.Sprintf("console.%s: %v", p.Type, p.Args)
			}
		case "Log.entryAdded":
			if p.Entry.Level == "error" && !(p.Entry.Source == "network" && strings.Contains(p.Entry.URL, "/api/")) {
				problem = fmt.Sprintf("log (%s): %s %s", p.Entry.Source, p.Entry.Text, p.Entry.URL)
			}
		}
		if problem != "" {
			br.mu.Lock()
			br.problems = append(br.problems, problem)
			br.mu.Unlock()
		}
	}
}

// send sends a command without waiting for its answer, and returns its channel.
func (br *uiBrowser) send(session, method string, params any) (chan cdpReply, error) {
	br.mu.Lock()
	if br.closed != nil {
		br.mu.Unlock()
		return nil, br.closed
	}
	br.nextID++
	id := br.nextID
	ch := make(chan cdpReply, 1)
	br.waiting[id] = ch
	br.mu.Unlock()
	msg := map[string]any{"id": id, "method": method}
	if params != nil {
		msg["params"] = params
	}
	if session != "" {
		msg["sessionId"] = session
	}
	b, _ := json.Marshal(msg)
	return ch, br.ws.write(b)
}

// call sends a command and decodes its result into result (if not nil).
func (br *uiBrowser) call(session, method string, params, result any) {
	br.t.Helper()
	ch, err := br.send(session, method, params)
	if err != nil {
		br.t.Fatalf("%s: %v", method, err)
	}
	select {
	case r, ok := <-ch:
		switch {
		case !ok:
			br.t.Fatalf("%s: the DevTools connection ended", method)
		case r.Error != nil:
			br.t.Fatalf("%s: %d %s", method, r.Error.Code, r.Error.Message)
		case result != nil:
			if err := json.Unmarshal(r.Result, result); err != nil {
				br.t.Fatalf("%s: %v", method, err)
			}
		}
	case <-time.After(uiWait):
		br.t.Fatalf("%s: no answer in %v", method, uiWait)
	}
}

// eval evaluates a JavaScript expression in the page and returns its value as JSON.
func (br *uiBrowser) eval(expr string) json.RawMessage {
	br.t.Helper()
	var r struct {
		Result           struct{ Value json.RawMessage }
		ExceptionDetails *struct {
			Text      string
			Exception struct{ Description string }
		}
	}
	br.call(br.session, "Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true}, &r)
	if r.ExceptionDetails != nil {
		br.t.Fatalf("evaluating %s: %s %s", expr, r.ExceptionDetails.Text, r.ExceptionDetails.Exception.Description)
	}
	return r.Result.Value
}

func (br *uiBrowser) evalString(expr string) string {
	br.t.Helper()
	v := br.eval(expr)
	var s string
	if json.Unmarshal(v, &s) != nil {
		return string(v)
	}
	return s
}

// waitText waits until expr is want, and shows what the page says when it does not come.
func (br *uiBrowser) waitText(what, expr, want string) {
	br.t.Helper()
	deadline := time.Now().Add(uiWait)
	for {
		got := br.evalString(expr)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			br.checkProblems()
			br.t.Fatalf("waiting for %s: got %s, want %q\nstatus: %s\npage: %s", what, got, want,
				br.evalString(jsStatus), br.evalString(`document.getElementById('main').innerText`))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFor waits until expr is truthy.
func (br *uiBrowser) waitFor(what, expr string) {
	br.t.Helper()
	br.waitText(what, "!!("+expr+")", "true")
}

// open loads url in the page and waits for the app to draw.
func (br *uiBrowser) open(url string) {
	br.t.Helper()
	br.call(br.session, "Page.navigate", map[string]any{"url": url}, nil)
	br.waitFor("the page", `document.readyState === 'complete' && document.querySelector('main form, main h1')`)
}

// navigate follows a hash route, as a link would.
func (br *uiBrowser) navigate(hash string) {
	br.t.Helper()
	br.eval(`location.hash = ` + jsq(hash))
	br.waitFor(hash, `document.querySelector('main h1')`)
}

// click clicks an element with the mouse, once it is there and has stopped moving (the
// page fills in as its API calls answer).
func (br *uiBrowser) click(expr string) {
	br.t.Helper()
	at := `new Promise(done => { const e = ` + expr + `; if (!e || e.disabled) return done(null);
		e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();
		setTimeout(() => { const s = e.getBoundingClientRect();
			done(s.x === r.x && s.y === r.y && e.isConnected ? {x: r.x + r.width / 2, y: r.y + r.height / 2} : null) }, 100) })`
	var p *struct{ X, Y float64 }
	for deadline := time.Now().Add(uiWait); p == nil; {
		if err := json.Unmarshal(br.eval(at), &p); err != nil {
			br.t.Fatal(err)
		}
		if p == nil && time.Now().After(deadline) {
			br.t.Fatalf("no element to click: %s", expr)
		}
	}
	for _, typ := range []string{"mouseMoved", "mousePressed", "mouseReleased"} {
		br.call(br.session, "Input.dispatchMouseEvent", map[string]any{"type": typ, "x": p.X, "y": p.Y,
			"button": "left", "clickCount": 1}, nil)
	}
}

// typeInto replaces the text of an input or a textarea by typing text.
func (br *uiBrowser) typeInto(expr, text string) {
	br.t.Helper()
	br.waitFor("a field: "+expr, expr)
	br.eval(`(() => { const e = ` + expr + `; e.focus(); e.select(); })()`)
	br.call(br.session, "Input.insertText", map[string]any{"text": text}, nil)
	if got := br.evalString(expr + `.value`); got != text {
		br.t.Fatalf("typed %q into %s, it holds %q", text, expr, got)
	}
}

// choose picks an option of a select.
func (br *uiBrowser) choose(expr, value string) {
	br.t.Helper()
	br.waitFor("a select: "+expr, expr)
	br.eval(`(() => { const e = ` + expr + `; e.value = ` + jsq(value) + `; e.dispatchEvent(new Event('change')); })()`)
	if got := br.evalString(expr + `.value`); got != value {
		br.t.Fatalf("chose %q in %s, it holds %q", value, expr, got)
	}
}

// screenshot saves the page as a PNG.
func (br *uiBrowser) screenshot(path string) {
	br.t.Helper()
	var r struct{ Data []byte }
	br.call(br.session, "Page.captureScreenshot", map[string]any{"format": "png"}, &r)
	if err := os.WriteFile(path, r.Data, 0o644); err != nil {
		br.t.Fatal(err)
	}
}

// checkProblems fails the test for the script errors the page had since the last look.
func (br *uiBrowser) checkProblems() {
	br.t.Helper()
	for _, p := range br.takeProblems() {
		br.t.Errorf("in the page: %s", p)
	}
}

func (br *uiBrowser) takeProblems() []string {
	br.mu.Lock()
	defer br.mu.Unlock()
	p := br.problems
	br.problems = nil
	return p
}

// uiTail keeps the end of a process's output.
type uiTail struct {
	mu  sync.Mutex
	buf []byte
}

func (w *uiTail) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	if len(w.buf) > 16<<10 {
		w.buf = w.buf[len(w.buf)-8<<10:]
	}
	return len(p), nil
}

func (w *uiTail) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.buf)
}

// --- a minimal WebSocket client (RFC 6455), for the DevTools protocol ---

// uiWebSocket is a client WebSocket connection: text messages out, masked, and messages
// in, with pings answered and fragments joined.
type uiWebSocket struct {
	c   net.Conn
	r   *bufio.Reader
	wmu sync.Mutex
}

// uiDialWebSocket opens a WebSocket to a ws:// URL on 127.0.0.1.
func uiDialWebSocket(rawURL string) (*uiWebSocket, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	if h, _, _ := net.SplitHostPort(u.Host); h != "127.0.0.1" {
		return nil, fmt.Errorf("websocket: %s is not on 127.0.0.1", rawURL)
	}
	c, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		return nil, err
	}
	var nonce [16]byte
	rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", u.RequestURI(), u.Host, key)
	r := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("websocket handshake: %w", err)
	}
	c.SetReadDeadline(time.Time{})
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		c.Close()
		return nil, fmt.Errorf("websocket handshake: %s, accept %q", resp.Status, resp.Header.Get("Sec-WebSocket-Accept"))
	}
	return &uiWebSocket{c: c, r: r}, nil
}

// write sends a text message, as one masked frame.
func (ws *uiWebSocket) write(payload []byte) error { return ws.writeFrame(0x1, payload) }

func (ws *uiWebSocket) writeFrame(opcode byte, payload []byte) error {
	hdr := []byte{0x80 | opcode}
	switch n := len(payload); {
	case n < 126:
		hdr = append(hdr, 0x80|byte(n))
	case n <= 0xffff:
		hdr = binary.BigEndian.AppendUint16(append(hdr, 0x80|126), uint16(n))
	default:
		hdr = binary.BigEndian.AppendUint64(append(hdr, 0x80|127), uint64(n))
	}
	var mask [4]byte
	rand.Read(mask[:])
	frame := append(hdr, mask[:]...)
	for i, b := range payload {
		frame = append(frame, b^mask[i%4])
	}
	ws.wmu.Lock()
	defer ws.wmu.Unlock()
	_, err := ws.c.Write(frame)
	return err
}

// read returns the next message; a close frame ends the connection with io.EOF.
func (ws *uiWebSocket) read() ([]byte, error) {
	var msg []byte
	for {
		var h [2]byte
		if _, err := io.ReadFull(ws.r, h[:]); err != nil {
			return nil, err
		}
		fin, opcode, n := h[0]&0x80 != 0, h[0]&0x0f, uint64(h[1]&0x7f)
		switch n {
		case 126:
			var b [2]byte
			if _, err := io.ReadFull(ws.r, b[:]); err != nil {
				return nil, err
			}
			n = uint64(binary.BigEndian.Uint16(b[:]))
		case 127:
			var b [8]byte
			if _, err := io.ReadFull(ws.r, b[:]); err != nil {
				return nil, err
			}
			n = binary.BigEndian.Uint64(b[:])
		}
		if n > 64<<20 || uint64(len(msg))+n > 64<<20 {
			return nil, errors.New("websocket: message over 64 MiB")
		}
		var mask [4]byte
		if h[1]&0x80 != 0 {
			if _, err := io.ReadFull(ws.r, mask[:]); err != nil {
				return nil, err
			}
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(ws.r, p); err != nil {
			return nil, err
		}
		if h[1]&0x80 != 0 {
			for i := range p {
				p[i] ^= mask[i%4]
			}
		}
		switch opcode {
		case 0x8: // close
			return nil, io.EOF
		case 0x9: // ping
			if err := ws.writeFrame(0xA, p); err != nil {
				return nil, err
			}
			continue
		case 0xA: // pong
			continue
		}
		msg = append(msg, p...)
		if fin {
			return msg, nil
		}
	}
}
