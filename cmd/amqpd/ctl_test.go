package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	amqp "github.com/maxpert/amqp-go"
)

// ctl runs a subcommand with stdin and returns its exit code, stdout and stderr.
func ctl(t *testing.T, stdin string, verb string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := runCtl(verb, args, strings.NewReader(stdin), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// mustCtl runs a subcommand that must succeed and returns its stdout.
func mustCtl(t *testing.T, stdin string, verb string, args ...string) string {
	t.Helper()
	code, out, errOut := ctl(t, stdin, verb, args...)
	if code != 0 || errOut != "" {
		t.Fatalf("amqpd %s %q: exit %d, stderr %q", verb, args, code, errOut)
	}
	return out
}

// checkRabbitHash reports whether hash is RabbitMQ's SHA-256 password hash of password:
// base64(salt ‖ SHA-256(salt ‖ password)) with a 4-byte salt.
func checkRabbitHash(hash, password string) bool {
	b, err := base64.StdEncoding.DecodeString(hash)
	if err != nil || len(b) != 4+sha256.Size {
		return false
	}
	sum := sha256.Sum256(append(b[:4:4], password...))
	return subtle.ConstantTimeCompare(b[4:], sum[:]) == 1
}

func TestCtlEndToEnd(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "definitions.json")
	def := "-definitions=" + file
	const password = "s3cret Alice: ünïcode & <html>"

	// A missing file lists RabbitMQ's defaults and is not created by listing.
	if out := mustCtl(t, "", "list_users", def); out != "user\ttags\nguest\t[administrator]\n" {
		t.Errorf("list_users on a missing file: %q", out)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("list_users created the file: %v", err)
	}

	mustCtl(t, password+"\n", "add_user", def, "alice")
	mustCtl(t, "", "add_vhost", "prod", "-definitions", file) // flag after the argument
	mustCtl(t, "", "set_permissions", "-p", "prod", def, "alice", "^alice-", "", `^(alice-.*|amq\.default)$`)
	mustCtl(t, "", "set_permissions", def, "alice", ".*", ".*", ".*") // default vhost "/"
	mustCtl(t, "", "set_user_tags", "alice", "management", "monitoring", def)

	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range []string{password, "s3cret", "Alice:"} {
		if bytes.Contains(raw, []byte(part)) {
			t.Errorf("the password is in the file in clear (%q):\n%s", part, raw)
		}
	}
	if runtime.GOOS != "windows" {
		if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("file mode %v, %v; want 0600", fi.Mode().Perm(), err)
		}
	}
	d, err := amqp.LoadDefinitions(file)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(d.Users, func(u amqp.User) bool { return u.Name == "alice" })
	if i < 0 {
		t.Fatalf("alice not in %+v", d.Users)
	}
	alice := d.Users[i]
	if alice.HashingAlgorithm != "rabbit_password_hashing_sha256" || !checkRabbitHash(alice.PasswordHash, password) {
		t.Errorf("alice's hash %q (%s) is not a RabbitMQ SHA-256 hash of the password", alice.PasswordHash, alice.HashingAlgorithm)
	}
	if checkRabbitHash(alice.PasswordHash, password+"\n") {
		t.Errorf("the trailing newline was hashed")
	}
	if !slices.Equal(alice.Tags, []string{"management", "monitoring"}) {
		t.Errorf("alice's tags %q", alice.Tags)
	}

	if out := mustCtl(t, "", "list_users", def); out != "user\ttags\nguest\t[administrator]\nalice\t[management, monitoring]\n" {
		t.Errorf("list_users: %q", out)
	}
	if out := mustCtl(t, "", "list_vhosts", def); out != "name\n/\nprod\n" {
		t.Errorf("list_vhosts: %q", out)
	}
	if out := mustCtl(t, "", "list_permissions", "-p", "prod", def); out != "user\tconfigure\twrite\tread\nalice\t^alice-\t\t^(alice-.*|amq\\.default)$\n" {
		t.Errorf("list_permissions -p prod: %q", out)
	}
	if out := mustCtl(t, "", "list_permissions", def); out != "user\tconfigure\twrite\tread\nguest\t.*\t.*\t.*\nalice\t.*\t.*\t.*\n" {
		t.Errorf("list_permissions: %q", out)
	}

	// change_password: a CRLF line ending is stripped; the old password stops working.
	old := alice.PasswordHash
	mustCtl(t, "n3w-pass\r\nignored second line\n", "change_password", def, "alice")
	d, _ = amqp.LoadDefinitions(file)
	alice = d.Users[slices.IndexFunc(d.Users, func(u amqp.User) bool { return u.Name == "alice" })]
	if alice.PasswordHash == old || !checkRabbitHash(alice.PasswordHash, "n3w-pass") {
		t.Errorf("change_password: hash %q", alice.PasswordHash)
	}

	mustCtl(t, "", "clear_permissions", "-p", "prod", "alice", def)
	if out := mustCtl(t, "", "list_permissions", def, "-p", "prod"); out != "user\tconfigure\twrite\tread\n" {
		t.Errorf("after clear_permissions: %q", out)
	}
	mustCtl(t, "", "set_user_tags", def, "alice")
	mustCtl(t, "", "delete_vhost", def, "prod")
	mustCtl(t, "", "delete_user", def, "guest")
	if out := mustCtl(t, "", "list_users", def); out != "user\ttags\nalice\t[]\n" {
		t.Errorf("after delete_user guest: %q", out)
	}
	if out := mustCtl(t, "", "list_permissions", def); out != "user\tconfigure\twrite\tread\nalice\t.*\t.*\t.*\n" {
		t.Errorf("delete_user left permissions: %q", out)
	}
	if out := mustCtl(t, "", "list_vhosts", def); out != "name\n/\n" {
		t.Errorf("after delete_vhost: %q", out)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory holds %d files, want only the definitions", len(entries))
	}
}

func TestCtlKeepsOtherSections(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "..", "testdata", "definitions", "rabbitmq-export.json"))
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "defs.json")
	if err := os.WriteFile(file, src, 0o600); err != nil {
		t.Fatal(err)
	}
	mustCtl(t, "pw\n", "add_user", "-definitions", file, "bob")
	var before, after map[string]json.RawMessage
	b, _ := os.ReadFile(file)
	if err := json.Unmarshal(src, &before); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &after); err != nil {
		t.Fatal(err)
	}
	for k, v := range before {
		if k == "users" {
			continue
		}
		var x, y any
		json.Unmarshal(v, &x)
		json.Unmarshal(after[k], &y)
		if !jsonEqual(x, y) {
			t.Errorf("section %q changed: %s -> %s", k, v, after[k])
		}
	}
	if !bytes.Contains(b, []byte("5+LP528+x+aHNVM2F2f582cp1iSqgHpx8IcCzkrxa2nRYPby")) {
		t.Errorf("alice's RabbitMQ hash was not kept")
	}
}

// jsonEqual compares decoded JSON values.
func jsonEqual(x, y any) bool {
	a, _ := json.Marshal(x)
	b, _ := json.Marshal(y)
	return bytes.Equal(a, b)
}

func TestCtlErrors(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "definitions.json")
	def := "-definitions=" + file
	mustCtl(t, "pw\n", "add_user", def, "alice")
	saved, _ := os.ReadFile(file)

	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"users": 1}`), 0o600)

	for _, tc := range []struct {
		name  string
		stdin string
		verb  string
		args  []string
		code  int
		want  string // the whole stderr
	}{
		{"no name", "pw\n", "add_user", []string{def}, 2, "amqpd add_user: got 0 arguments; usage: amqpd add_user [-definitions FILE] NAME < PASSWORD-FILE\n"},
		{"password as an argument", "", "add_user", []string{def, "bob", "pw"}, 2, "amqpd add_user: got 2 arguments; usage: amqpd add_user [-definitions FILE] NAME < PASSWORD-FILE\n"},
		{"no password", "", "add_user", []string{def, "bob"}, 1, "amqpd add_user: no password on standard input: give it as the first line\n"},
		{"empty password line", "\nsecond\n", "add_user", []string{def, "bob"}, 1, "amqpd add_user: no password on standard input: give it as the first line\n"},
		{"password too long", strings.Repeat("x", maxPasswordLine+1), "add_user", []string{def, "bob"}, 1, "amqpd add_user: the password on standard input is too long\n"},
		{"existing user", "pw\n", "add_user", []string{def, "alice"}, 1, "amqpd add_user: user \"alice\" already exists\n"},
		{"unknown flag", "", "list_users", []string{"-x"}, 2, "amqpd list_users: flag provided but not defined: -x\n"},
		{"-p where not taken", "", "delete_user", []string{"-p", "/", def, "alice"}, 2, "amqpd delete_user: flag provided but not defined: -p\n"},
		{"flag without value", "", "list_users", []string{"-definitions"}, 2, "amqpd list_users: flag needs an argument: -definitions\n"},
		{"unknown user", "", "delete_user", []string{def, "bob"}, 1, "amqpd delete_user: user \"bob\" does not exist\n"},
		{"unknown user for password", "pw\n", "change_password", []string{def, "bob"}, 1, "amqpd change_password: user \"bob\" does not exist\n"},
		{"unknown vhost", "", "set_permissions", []string{def, "-p", "nope", "alice", ".*", ".*", ".*"}, 1, "amqpd set_permissions: virtual host \"nope\" does not exist\n"},
		{"three patterns", "", "set_permissions", []string{def, "alice", ".*", ".*"}, 2,
			"amqpd set_permissions: got 3 arguments; usage: amqpd set_permissions [-definitions FILE] [-p VHOST] USER CONF WRITE READ\n"},
		{"bad regexp", "", "set_permissions", []string{def, "alice", "(", ".*", ".*"}, 1,
			"amqpd set_permissions: invalid configure regular expression \"(\": error parsing regexp: missing closing ): `(`\n"},
		{"existing vhost", "", "add_vhost", []string{def, "/"}, 1, "amqpd add_vhost: virtual host \"/\" already exists\n"},
		{"delete unknown vhost", "", "delete_vhost", []string{def, "x"}, 1, "amqpd delete_vhost: virtual host \"x\" does not exist\n"},
		{"list with an argument", "", "list_vhosts", []string{def, "x"}, 2, "amqpd list_vhosts: got 1 arguments; usage: amqpd list_vhosts [-definitions FILE]\n"},
		{"tags for nobody", "", "set_user_tags", []string{def}, 2, "amqpd set_user_tags: got 0 arguments; usage: amqpd set_user_tags [-definitions FILE] NAME [TAG...]\n"},
		{"broken file", "", "list_users", []string{"-definitions", bad}, 1, "amqpd list_users: load definitions " + bad + ": users: want a list of objects\n"},
		{"unknown command", "", "add_queue", nil, 2, "amqpd: unknown command \"add_queue\"\n"},
	} {
		code, out, errOut := ctl(t, tc.stdin, tc.verb, tc.args...)
		if code != tc.code || errOut != tc.want || out != "" {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want %d, %q", tc.name, code, out, errOut, tc.code, tc.want)
		}
	}
	if now, _ := os.ReadFile(file); !bytes.Equal(now, saved) {
		t.Errorf("a failed command changed the file")
	}
	if b, _ := os.ReadFile(bad); string(b) != `{"users": 1}` {
		t.Errorf("a broken file was overwritten")
	}

	// A directory that cannot be written to.
	if runtime.GOOS != "windows" && os.Getuid() != 0 {
		ro := filepath.Join(dir, "ro")
		os.Mkdir(ro, 0o500)
		code, _, errOut := ctl(t, "", "add_vhost", "-definitions", filepath.Join(ro, "d.json"), "v")
		if code != 1 || !strings.HasPrefix(errOut, "amqpd add_vhost: save definitions: ") || strings.Count(errOut, "\n") != 1 {
			t.Errorf("read-only directory: exit %d, %q", code, errOut)
		}
	}
}

func TestCtlFlagsAnywhere(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "d.json")
	mustCtl(t, "", "add_vhost", "-definitions", file, "v")
	// "--" ends the flags, so a pattern may start with "-".
	mustCtl(t, "", "set_permissions", "-p", "v", "guest", "-definitions", file, "--", "-x", "-y", "-z")
	if out := mustCtl(t, "", "list_permissions", "-definitions", file, "-p", "v"); out != "user\tconfigure\twrite\tread\nguest\t-x\t-y\t-z\n" {
		t.Errorf("list_permissions: %q", out)
	}
	// A flag's value may be "--"; a name "--" comes after the "--" that ends the flags.
	mustCtl(t, "", "add_vhost", "-definitions", file, "--", "--")
	mustCtl(t, "", "set_permissions", "-definitions", file, "-p", "--", "guest", "a", "b", "c")
	if out := mustCtl(t, "", "list_permissions", "-definitions", file, "-p=--"); out != "user\tconfigure\twrite\tread\nguest\ta\tb\tc\n" {
		t.Errorf("list_permissions -p --: %q", out)
	}

	// The default file is definitions.json in the working directory.
	t.Chdir(dir)
	mustCtl(t, "", "add_vhost", "here")
	if _, err := os.Stat(filepath.Join(dir, "definitions.json")); err != nil {
		t.Errorf("default file: %v", err)
	}

	code, out, errOut := ctl(t, "", "set_permissions", "-h")
	if code != 0 || errOut != "" || out != "usage: amqpd set_permissions [-definitions FILE] [-p VHOST] USER CONF WRITE READ\n" {
		t.Errorf("-h: %d %q %q", code, out, errOut)
	}
}

func TestReadPassword(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"pw\n", "pw", true},
		{"pw", "pw", true},
		{"pw\r\n", "pw", true},
		{"p w \n", "p w ", true},
		{"pw\r\r\n", "pw\r", true},
		{"a\nb\n", "a", true},
		{"\n", "", false},
		{"", "", false},
		{strings.Repeat("x", maxPasswordLine) + "\n", strings.Repeat("x", maxPasswordLine), true},
		{strings.Repeat("x", maxPasswordLine+1) + "\n", "", false},
	} {
		got, err := readPassword(strings.NewReader(tc.in))
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("readPassword(%.20q) = %.20q, %v", tc.in, got, err)
		}
	}
	if _, err := readPassword(nil); err == nil {
		t.Error("readPassword(nil) succeeded")
	}
	if _, err := readPassword(io.MultiReader(strings.NewReader("p"), errReader{})); err == nil {
		t.Error("a read error was ignored")
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, os.ErrClosed }

func TestRunDispatchesCtl(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"delete_user", "-definitions", filepath.Join(t.TempDir(), "d.json"), "nobody"}, io.Discard, &stderr); code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if stderr.String() != "amqpd delete_user: user \"nobody\" does not exist\n" {
		t.Errorf("stderr %q", stderr.String())
	}
}
