package main

// Helpers for more than one test file: the amqpd binary, daemons in subprocesses, a free
// address, a clean environment.

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	buildDir  string // holds the amqpd binary; removed by TestMain
	buildErr  error
	buildOut  []byte
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// amqpdBinary builds amqpd once per test run and returns its path.
func amqpdBinary(t *testing.T) string {
	t.Helper()
	if runtime.GOOS == "windows" {
		t.Skip("needs SIGTERM")
	}
	goTool, err := exec.LookPath(filepath.Join(runtime.GOROOT(), "bin", "go"))
	if err != nil {
		if goTool, err = exec.LookPath("go"); err != nil {
			t.Skip("go command not found")
		}
	}
	buildOnce.Do(func() {
		if buildDir, buildErr = os.MkdirTemp("", "amqpd-test-bin"); buildErr != nil {
			return
		}
		buildOut, buildErr = exec.Command(goTool, "build", "-o", filepath.Join(buildDir, "amqpd"), ".").CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("go build: %v\n%s", buildErr, buildOut)
	}
	return filepath.Join(buildDir, "amqpd")
}

// daemon is an amqpd subprocess.
type daemon struct {
	cmd    *exec.Cmd
	exited chan error    // Wait's result, once
	logs   *bytes.Buffer // read only after it exited
}

// startDaemon starts amqpd with args, and with the test's environment less NOTIFY_SOCKET
// and AMQPD_* variables, plus env. The cleanup kills it if it still runs.
func startDaemon(t *testing.T, env []string, args ...string) *daemon {
	t.Helper()
	// The HTTP listeners are off unless a test turns them on: daemons run in parallel.
	args = append([]string{"-http-addr=", "-prometheus-addr="}, args...)
	d := &daemon{cmd: exec.Command(amqpdBinary(t), args...), exited: make(chan error, 1), logs: new(bytes.Buffer)}
	d.cmd.Env = append(cleanEnviron(), env...)
	d.cmd.Stderr = d.logs
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.exited <- d.cmd.Wait() }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		d.wait(t)
	})
	return d
}

// wait waits for the daemon to exit and returns Wait's result; it may be called again.
func (d *daemon) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-d.exited:
		d.exited <- err
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("amqpd still running after 20s")
		return nil
	}
}

// stop sends SIGTERM and checks the daemon exits with status 0.
func (d *daemon) stop(t *testing.T) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.wait(t); err != nil {
		t.Fatalf("amqpd exited with %v, want status 0; log:\n%s", err, d.logs)
	}
}

// cleanEnviron is os.Environ without NOTIFY_SOCKET and AMQPD_* variables, so a test run
// under systemd or in a shell that sets them is not affected by them.
func cleanEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envPrefix) && !strings.HasPrefix(kv, "NOTIFY_SOCKET=") {
			env = append(env, kv)
		}
	}
	return env
}

// unsetDaemonEnv unsets NOTIFY_SOCKET and the AMQPD_* variables for the test, for an
// in-process run.
func unsetDaemonEnv(t *testing.T) {
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, envPrefix) || k == "NOTIFY_SOCKET" {
			t.Setenv(k, "") // restored after the test
			os.Unsetenv(k)
		}
	}
}

// freeAddr returns a loopback address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// pollFor polls cond every 10ms until it holds, or fails the test after timeout.
func pollFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}
