package main

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestPidfileHelperProcess is not a test: it is the process TestClaimPidfile starts to
// have a live process running the same program. It runs until its stdin closes.
func TestPidfileHelperProcess(t *testing.T) {
	if os.Getenv("PIDFILE_TEST_HELPER") != "1" {
		t.Skip("a helper process for TestClaimPidfile")
	}
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

func readPidfile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestClaimPidfile(t *testing.T) {
	if p, err := claimPidfile(""); p != nil || err != nil {
		t.Errorf(`claimPidfile("") = %v, %v; want nil, nil`, p, err)
	}
	if err := (*pidfile)(nil).write(); err != nil {
		t.Errorf("nil pidfile write: %v", err)
	}

	ours := strconv.Itoa(os.Getpid()) + "\n"
	dead := exec.Command(os.Args[0], "-test.run=^$")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	live := exec.Command(os.Args[0], "-test.run=^TestPidfileHelperProcess$")
	live.Env = append(os.Environ(), "PIDFILE_TEST_HELPER=1")
	stdin, err := live.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		live.Wait()
	}()

	for _, tc := range []struct {
		name    string
		content string // "" for no file
		refused string // in the error, or "" when the file may be claimed
	}{
		{"no file", "", ""},
		{"empty file", "\n", ""},
		{"this process (a container restarted as the same PID)", ours, ""},
		{"a process that is gone", strconv.Itoa(dead.Process.Pid) + "\n", ""},
		{"a running process of the same program", strconv.Itoa(live.Process.Pid) + "\n",
			"names process " + strconv.Itoa(live.Process.Pid) + ", which is running"},
		{"not a process id", "secret stuff\n", "does not hold a process id; not overwriting it"},
		{"a negative number", "-1\n", "does not hold a process id"},
		{"a long file that starts with digits", "1" + strings.Repeat(" ", 100) + "x", "does not hold a process id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "amqpd.pid")
			if tc.content != "" {
				if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			p, err := claimPidfile(path)
			if tc.refused != "" {
				if err == nil || !strings.Contains(err.Error(), tc.refused) || !strings.Contains(err.Error(), path) {
					t.Fatalf("err = %v, want one naming %s and saying %q", err, path, tc.refused)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Errorf("the error shows the file: %v", err)
				}
				if got := readPidfile(t, path); got != tc.content {
					t.Errorf("the file changed to %q", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := p.write(); err != nil {
				t.Fatal(err)
			}
			if got := readPidfile(t, path); got != ours {
				t.Errorf("pidfile holds %q, want %q", got, ours)
			}
			if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o644 {
				t.Errorf("mode %v, %v; want 0644", fi.Mode().Perm(), err)
			}
			if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".*")); len(left) > 0 {
				t.Errorf("temporary files left: %v", left)
			}
			if err := p.remove(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("after remove: %v, want the file gone", err)
			}
		})
	}

	t.Run("a running process of another program (a reused PID)", func(t *testing.T) {
		ppid := os.Getppid()
		theirs, err1 := os.ReadFile("/proc/" + strconv.Itoa(ppid) + "/comm")
		mine, err2 := os.ReadFile("/proc/self/comm")
		if err1 != nil || err2 != nil || string(theirs) == string(mine) {
			t.Skip("needs /proc and a parent running another program")
		}
		path := filepath.Join(t.TempDir(), "amqpd.pid")
		if err := os.WriteFile(path, []byte(strconv.Itoa(ppid)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := claimPidfile(path); err != nil {
			t.Errorf("claimPidfile refused a file naming %s (%d): %v", strings.TrimSpace(string(theirs)), ppid, err)
		}
	})

	t.Run("remove leaves another process's file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "amqpd.pid")
		p, err := claimPidfile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.write(); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte("999999\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := p.remove(); err != nil {
			t.Fatal(err)
		}
		if got := readPidfile(t, path); got != "999999\n" {
			t.Errorf("pidfile holds %q, want the other process's id kept", got)
		}
	})
}

// TestDaemonPidfile: amqpd writes its pidfile once it listens and removes it when it
// stops; a second amqpd given the same file refuses to start while the first runs; a file
// naming a process of another program is replaced.
func TestDaemonPidfile(t *testing.T) {
	pf := filepath.Join(t.TempDir(), "amqpd.pid")
	hasPid := func(pid int) func() bool {
		return func() bool {
			b, err := os.ReadFile(pf)
			return err == nil && string(b) == strconv.Itoa(pid)+"\n"
		}
	}
	first := startDaemon(t, nil, "-addr", "127.0.0.1:0", "-data-dir", filepath.Join(t.TempDir(), "data"), "-pidfile", pf)
	pollFor(t, 20*time.Second, "the pidfile to name the first amqpd", hasPid(first.cmd.Process.Pid))

	second := startDaemon(t, nil, "-addr", "127.0.0.1:0", "-data-dir", filepath.Join(t.TempDir(), "data"), "-pidfile", pf)
	var exit *exec.ExitError
	if err := second.wait(t); !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("second amqpd: %v, want exit status 1", err)
	}
	if want := "names process " + strconv.Itoa(first.cmd.Process.Pid) + ", which is running"; !strings.Contains(second.logs.String(), want) {
		t.Errorf("second amqpd said %q, want %q", second.logs.String(), want)
	}
	if !hasPid(first.cmd.Process.Pid)() {
		t.Errorf("the pidfile changed to %q", readPidfile(t, pf))
	}

	first.stop(t)
	if _, err := os.Stat(pf); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after a clean stop: %v, want the pidfile gone", err)
	}

	// A file left behind naming a live process of another program: this test.
	if err := os.WriteFile(pf, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/proc/self/comm"); err != nil {
		t.Skip("without /proc any live process blocks the pidfile")
	}
	third := startDaemon(t, nil, "-addr", "127.0.0.1:0", "-data-dir", filepath.Join(t.TempDir(), "data"), "-pidfile", pf)
	pollFor(t, 20*time.Second, "the pidfile to name the third amqpd", hasPid(third.cmd.Process.Pid))
	third.stop(t)
	if _, err := os.Stat(pf); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after a clean stop: %v, want the pidfile gone", err)
	}
}
