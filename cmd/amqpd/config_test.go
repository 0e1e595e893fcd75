package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// printConfig runs amqpd -print-config with args and returns the exit code, the
// configuration it printed as a map, its raw output and its standard error.
func printConfig(t *testing.T, args ...string) (code int, conf map[string]string, out, errOut string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code = run(append(args, "-print-config"), &stdout, &stderr)
	conf = map[string]string{}
	for _, line := range strings.Split(stdout.String(), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, " = ")
		if !ok {
			t.Fatalf("-print-config line %q is not key = value", line)
		}
		if strings.HasPrefix(v, `"`) {
			var err error
			if v, err = strconv.Unquote(v); err != nil {
				t.Fatalf("-print-config line %q: %v", line, err)
			}
		}
		if _, dup := conf[k]; dup {
			t.Fatalf("-print-config prints %s twice", k)
		}
		conf[k] = v
	}
	return code, conf, stdout.String(), stderr.String()
}

// writeFile writes a file in the test's temporary directory and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestConfigFile(t *testing.T) {
	unsetDaemonEnv(t)
	for _, tc := range []struct {
		name, file string
		want       map[string]string // the values that differ from the defaults
	}{
		{"key = value", "addr = 127.0.0.1:5672\npage-out-bytes = 1048576\n",
			map[string]string{"addr": "127.0.0.1:5672", "page-out-bytes": "1048576"}},
		{"comments, blank lines, spaces, CRLF, no final newline",
			"# amqpd\n\n   # indented comment\r\n\theartbeat=30s  # trailing comment\r\nrepair = true\t#\nsegment-size =1048576",
			map[string]string{"heartbeat": "30s", "repair": "true", "segment-size": "1048576"}},
		{"# inside a word is kept", "data-dir = /srv/amqp#1\n",
			map[string]string{"data-dir": "/srv/amqp#1"}},
		{"quoted values", "addr = \"\"\nlog-file = \"/var/log/a b/#1.log\" # where\ndefinitions = \"C:\\\\defs.json\"\n",
			map[string]string{"addr": "", "log-file": "/var/log/a b/#1.log", "definitions": `C:\defs.json`}},
		{"empty value", "tls-addr =\n", map[string]string{"tls-addr": ""}},
		{"byte order mark", "\uFEFFmax-connections = 7\n", map[string]string{"max-connections": "7"}},
		{"the new flags", "pidfile = /run/amqpd.pid\n", map[string]string{"pidfile": "/run/amqpd.pid"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, defaults, _, _ := printConfig(t)
			code, got, _, errOut := printConfig(t, "-config", writeFile(t, "amqpd.conf", tc.file))
			if code != 0 || errOut != "" {
				t.Fatalf("exit %d, stderr %q", code, errOut)
			}
			want := defaults
			for k, v := range tc.want {
				want[k] = v
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got  %v\nwant %v", got, want)
			}
		})
	}
}

func TestConfigFileErrors(t *testing.T) {
	unsetDaemonEnv(t)
	for _, tc := range []struct {
		name, file string
		line       int
		want       string // in the message
		secret     string // from the file, must not be in the message
	}{
		{"unknown key", "addr = :5672\n\ncolour = blue\n", 3, "unknown key", "blue"},
		{"unknown key with a secret", "password = hunter2\n", 1, "unknown key", "hunter2"},
		{"a key as the environment spells it", "AMQPD_DATA_DIR = /x\n", 1, "did you mean data-dir?", "/x"},
		{"a key with an underscore", "# c\ndata_dir = /x\n", 2, "did you mean data-dir?", "/x"},
		{"no =", "addr = :5672\nroot:$6$salt$hash:19000:0:99999:7:::\n", 2, "want key = value", "$hash"},
		{"no key", " = s3cret\n", 1, "want key = value", "s3cret"},
		{"bad duration", "heartbeat = soon\n", 1, "bad value for heartbeat, want a duration", ""},
		{"bad number", "page-out-bytes = lots\n", 1, "bad value for page-out-bytes", ""},
		{"bad bool", "repair = maybe\n", 1, "bad value for repair, want true or false", ""},
		{"negative unsigned", "channel-max = -1\n", 1, "bad value for channel-max", ""},
		{"set twice", "addr = :1\n# again\naddr = :2\n", 3, "addr is already set on line 1", ""},
		{"config in a config file", "config = /etc/other.conf\n", 1, "config cannot be set in a config file", "/etc/other"},
		{"print-config in a config file", "print-config = true\n", 1, "print-config cannot be set in a config file", ""},
		{"unterminated quote", "addr = \"127.0.0.1:5672\n", 1, "bad quoted value", "127.0.0.1"},
		{"text after the quotes", "addr = \":1\" junk\n", 1, "text after the quoted value", "junk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := writeFile(t, "amqpd.conf", tc.file)
			code, _, out, errOut := printConfig(t, "-config", file)
			if code != 2 || out != "" {
				t.Errorf("exit %d, stdout %q; want 2 and nothing printed", code, out)
			}
			prefix := "amqpd: " + file + ":" + strconv.Itoa(tc.line) + ": "
			if !strings.HasPrefix(errOut, prefix) || !strings.Contains(errOut, tc.want) || strings.Count(errOut, "\n") != 1 {
				t.Errorf("stderr %q, want one line starting %q containing %q", errOut, prefix, tc.want)
			}
			if tc.secret != "" && strings.Contains(errOut, tc.secret) {
				t.Errorf("stderr %q shows %q from the file", errOut, tc.secret)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "none.conf")
		code, _, _, errOut := printConfig(t, "-config", missing)
		if code != 2 || !strings.Contains(errOut, missing) || !strings.Contains(errOut, "no such file") {
			t.Errorf("exit %d, stderr %q; want 2 naming the missing file", code, errOut)
		}
	})
}

// TestConfigFileRefusesBeforeServing: a bad config file stops amqpd before it serves,
// with exit code 2.
func TestConfigFileRefusesBeforeServing(t *testing.T) {
	unsetDaemonEnv(t)
	file := writeFile(t, "amqpd.conf", "max-conections = 5\n")
	var stderr bytes.Buffer
	code := run([]string{"-config", file, "-addr", "127.0.0.1:0", "-data-dir", filepath.Join(t.TempDir(), "data")}, &bytes.Buffer{}, &stderr)
	if code != 2 || !strings.Contains(stderr.String(), file+":1: unknown key") {
		t.Errorf("exit %d, stderr %q; want 2 and the file's line", code, stderr.String())
	}
}

func TestConfigEnvironment(t *testing.T) {
	unsetDaemonEnv(t)
	t.Setenv("AMQPD_DATA_DIR", "/env/data")
	t.Setenv("AMQPD_PAGE_OUT_BYTES", "123")
	t.Setenv("AMQPD_REPAIR", "true")
	t.Setenv("AMQPD_ADDR", "") // set and empty is a value: the plain listener off
	t.Setenv("AMQPD_NO_SUCH_FLAG", "x")
	code, got, _, errOut := printConfig(t)
	if code != 0 || errOut != "" {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	for k, want := range map[string]string{"data-dir": "/env/data", "page-out-bytes": "123", "repair": "true", "addr": "", "heartbeat": "1m0s"} {
		if got[k] != want {
			t.Errorf("%s = %q, want %q", k, got[k], want)
		}
	}

	t.Setenv("AMQPD_HEARTBEAT", "soon")
	code, _, _, errOut = printConfig(t)
	if code != 2 || !strings.Contains(errOut, "environment variable AMQPD_HEARTBEAT: bad value for heartbeat") {
		t.Errorf("exit %d, stderr %q; want 2 naming AMQPD_HEARTBEAT", code, errOut)
	}
}

// TestLoadConfigUnknownEnvironment: AMQPD_ variables that set no flag are returned for a
// warning, not refused (they may be another tool's); the names must be exact.
func TestLoadConfigUnknownEnvironment(t *testing.T) {
	fs := flag.NewFlagSet("amqpd", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "d", "")
	fs.String("config", "", "")
	fs.Bool("print-config", false, "")
	unknown, err := loadConfig(fs, []string{
		"HOME=/root", "AMQPD_DATA_DIR=/first", "AMQPD_DATA_DIR=/second", "AMQPD_data_dir=/lower",
		"AMQPD_DATA-DIR=/dash", "AMQPD_PRINT_CONFIG=true", "AMQPD_USER=alice", "AMQPD_=x",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"AMQPD_data_dir", "AMQPD_DATA-DIR", "AMQPD_PRINT_CONFIG", "AMQPD_USER", "AMQPD_"}
	if !reflect.DeepEqual(unknown, want) {
		t.Errorf("unknown = %q, want %q", unknown, want)
	}
	if *dataDir != "/first" {
		t.Errorf("data-dir = %q, want the first AMQPD_DATA_DIR, as os.Getenv", *dataDir)
	}
}

// TestConfigPrecedence: command line > environment > file > default, for each flag.
func TestConfigPrecedence(t *testing.T) {
	unsetDaemonEnv(t)
	file := writeFile(t, "amqpd.conf", `
addr = file:1
data-dir = /file/data
heartbeat = 11s
page-out-bytes = 1000
`)
	t.Setenv("AMQPD_ADDR", "env:1")
	t.Setenv("AMQPD_DATA_DIR", "/env/data")
	t.Setenv("AMQPD_MAX_CONNECTIONS", "5")
	code, got, _, errOut := printConfig(t, "-config", file, "-addr", "flag:1", "-max-connections", "6")
	if code != 0 || errOut != "" {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	for k, want := range map[string]string{
		"addr":            "flag:1",    // flag > env > file
		"max-connections": "6",         // flag > env
		"data-dir":        "/env/data", // env > file
		"heartbeat":       "11s",       // file > default
		"page-out-bytes":  "1000",      // file > default
		"frame-max":       "131072",    // default
		"tls-verify":      "none",      // default
		"log-level":       "info",      // default
		"pidfile":         "",          // default
		"segment-size":    "16777216",  // default
		"definitions":     "",          // default
		"tls-addr":        ":5671",     // default
		"fsync-interval":  "0s",        // default
		"channel-max":     "2047",      // default
		"repair":          "false",     // default
		"log-format":      "text",      // default
		"max-handshakes":  "1024",      // default
		"disk-free-limit": "50000000",  // default
	} {
		if got[k] != want {
			t.Errorf("%s = %q, want %q", k, got[k], want)
		}
	}

	// The file can come from AMQPD_CONFIG; -config overrides it.
	other := writeFile(t, "other.conf", "heartbeat = 22s\n")
	t.Setenv("AMQPD_CONFIG", other)
	if _, got, _, _ := printConfig(t); got["heartbeat"] != "22s" {
		t.Errorf("with AMQPD_CONFIG heartbeat = %q, want 22s from its file", got["heartbeat"])
	}
	if _, got, _, _ := printConfig(t, "-config", file); got["heartbeat"] != "11s" {
		t.Errorf("with AMQPD_CONFIG and -config heartbeat = %q, want 11s from -config's file", got["heartbeat"])
	}
}

// TestPrintConfigRoundTrip: -print-config prints every flag a config file may set, once,
// and its output read back as a config file gives the same configuration.
func TestPrintConfigRoundTrip(t *testing.T) {
	unsetDaemonEnv(t)
	code, defaults, defaultOut, _ := printConfig(t)
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	var fs flag.FlagSet // the flags run defines, from its -h output
	var help bytes.Buffer
	if code := run([]string{"-h"}, &bytes.Buffer{}, &help); code != 0 {
		t.Fatalf("-h: exit %d", code)
	}
	for _, line := range strings.Split(help.String(), "\n") {
		if strings.HasPrefix(line, "  -") {
			fs.String(strings.Fields(line)[0][1:], "", "")
		}
	}
	fs.VisitAll(func(f *flag.Flag) {
		if _, ok := defaults[f.Name]; ok == notInFile[f.Name] {
			t.Errorf("flag -%s printed: %v, want %v", f.Name, ok, !notInFile[f.Name])
		}
	})
	if len(defaults) < 25 || defaults["addr"] != ":5672" || defaults["data-dir"] != "amqp-data" {
		t.Errorf("defaults printed: %v", defaults)
	}
	if !strings.HasPrefix(defaultOut, "#") {
		t.Errorf("output does not start with a comment line:\n%s", defaultOut)
	}

	// Odd values from all three sources: empty, spaces, #, quotes, backslashes, tabs.
	file := writeFile(t, "in.conf", "log-file = \"/var/log/amqpd #1/a \\\"b\\\".log\"\nmemory-high-watermark = 0.25\nfsync-interval = 1.5s\n")
	t.Setenv("AMQPD_DEFINITIONS", `C:\amqp\defs.json`)
	t.Setenv("AMQPD_TLS_CA", " \tleading space")
	code, first, out, errOut := printConfig(t, "-config", file, "-addr", "", "-repair", "-pidfile", "/run/amqpd/pid")
	if code != 0 || errOut != "" {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	for k, want := range map[string]string{"log-file": `/var/log/amqpd #1/a "b".log`, "memory-high-watermark": "0.25",
		"fsync-interval": "1.5s", "definitions": `C:\amqp\defs.json`, "tls-ca": " \tleading space", "addr": "",
		"repair": "true", "pidfile": "/run/amqpd/pid"} {
		if first[k] != want {
			t.Errorf("%s = %q, want %q", k, first[k], want)
		}
	}

	unsetDaemonEnv(t)
	again := writeFile(t, "printed.conf", out)
	code, second, out2, errOut := printConfig(t, "-config", again)
	if code != 0 || errOut != "" {
		t.Fatalf("reading the printed config back: exit %d, stderr %q\n%s", code, errOut, out)
	}
	if !reflect.DeepEqual(first, second) || out != out2 {
		t.Errorf("printed config read back differs:\nfirst:\n%s\nsecond:\n%s", out, out2)
	}
}

// TestPrintConfigHidesSecret: -print-config says the cluster secret is set, not what it is.
func TestPrintConfigHidesSecret(t *testing.T) {
	unsetDaemonEnv(t)
	t.Setenv("AMQPD_CLUSTER_SECRET", "hunter2-cluster")
	code, conf, out, _ := printConfig(t)
	if code != 0 || strings.Contains(out, "hunter2") || !strings.Contains(out, "# cluster-secret is set; not printed\n") {
		t.Errorf("exit %d, output:\n%s", code, out)
	}
	if _, printed := conf["cluster-secret"]; printed {
		t.Error("cluster-secret printed as a setting")
	}
}

// TestCtlIgnoresDaemonConfig: the definitions verbs take their own flags only; a config
// file or AMQPD_ variables, even bad ones, do not reach them.
func TestCtlIgnoresDaemonConfig(t *testing.T) {
	unsetDaemonEnv(t)
	t.Setenv("AMQPD_CONFIG", writeFile(t, "bad.conf", "not a config file\n"))
	t.Setenv("AMQPD_DEFINITIONS", filepath.Join(t.TempDir(), "elsewhere.json"))
	defs := filepath.Join(t.TempDir(), "defs.json")
	var stdout, stderr bytes.Buffer
	if code := run([]string{"add_vhost", "-definitions", defs, "staging"}, &stdout, &stderr); code != 0 {
		t.Fatalf("add_vhost: exit %d, stderr %q", code, stderr.String())
	}
	stdout.Reset()
	if code := run([]string{"list_vhosts", "-definitions", defs}, &stdout, &stderr); code != 0 || stdout.String() != "name\n/\nstaging\n" {
		t.Errorf("list_vhosts: exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
}
