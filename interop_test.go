package amqp

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The interop tests drive the broker with other languages' RabbitMQ clients when they are
// installed: Python's pika (Debian: apt-get install python3-pika) and Node's amqplib (npm
// install amqplib, found through NODE_PATH). Each script declares, binds, publishes with
// confirms and every property, consumes in order, and checks a 404 and a transaction.

func TestInteropPika(t *testing.T) {
	t.Parallel()
	python, err := exec.LookPath("python3")
	if err != nil || exec.Command(python, "-c", "import pika").Run() != nil {
		// The system Python may have pika when a version manager's python3 does not.
		python = "/usr/bin/python3"
		if exec.Command(python, "-c", "import pika").Run() != nil {
			t.Skip("python3 with pika is not installed")
		}
	}
	_, url := newTestServer(t)
	runInterop(t, exec.Command(python, filepath.Join("testdata", "interop", "pika_check.py"), url), "pika OK")
}

func TestInteropAmqplib(t *testing.T) {
	t.Parallel()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed")
	}
	script, err := filepath.Abs(filepath.Join("testdata", "interop", "amqplib_check.js"))
	if err != nil {
		t.Fatal(err)
	}
	check := exec.Command(node, "-e", "require('amqplib')")
	if check.Run() != nil {
		t.Skip("amqplib is not installed (set NODE_PATH to a node_modules holding it)")
	}
	_, url := newTestServer(t)
	runInterop(t, exec.Command(node, script, url), "amqplib OK")
}

func runInterop(t *testing.T, cmd *exec.Cmd, want string) {
	t.Helper()
	cmd.Env = os.Environ()
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), want) {
		t.Fatalf("%v\n%s", err, out)
	}
}
