package amqp

import (
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Helpers of the election, replication and cluster tests: a real etcd on 127.0.0.1, free
// addresses, and a TCP proxy that can cut its links.

// testEtcd is an etcd member run by a test on 127.0.0.1, with free ports and a temporary
// data directory; it is killed when the test ends.
type testEtcd struct {
	t      testing.TB
	url    string   // client URL
	args   []string // command line, kept for restart
	out    *lockedBuffer
	cmd    *exec.Cmd
	exited chan error // cmd's Wait
}

// startEtcd starts an etcd member and waits until it answers, or skips the test when etcd
// is not installed. Its raft timing is shortened so that it elects itself quickly and
// grants leases of 1 s (etcd's minimum TTL is 1.5 election timeouts).
func startEtcd(t testing.TB) *testEtcd {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Skip("etcd not installed: apt-get install etcd-server")
	}
	e := &testEtcd{t: t, out: &lockedBuffer{}}
	t.Cleanup(func() {
		e.kill()
		if t.Failed() {
			t.Logf("etcd output:\n%s", e.out.String())
		}
	})
	// A port found free may be taken before etcd binds it: then try other ports.
	for try := 0; ; try++ {
		client, peer := "http://"+freeAddr(t), "http://"+freeAddr(t)
		e.url = client
		e.args = []string{bin,
			"--name", "test", "--data-dir", filepath.Join(t.TempDir(), "etcd"),
			"--listen-client-urls", client, "--advertise-client-urls", client,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--initial-cluster", "test=" + peer,
			"--heartbeat-interval", "25", "--election-timeout", "250",
		}
		err := e.run()
		if err == nil {
			return e
		}
		if try == 2 {
			t.Fatalf("etcd: %v\n%s", err, e.out.String())
		}
	}
}

// start runs etcd again on its ports and data and waits until it serves reads.
func (e *testEtcd) start() {
	e.t.Helper()
	if err := e.run(); err != nil {
		e.t.Fatalf("etcd: %v\n%s", err, e.out.String())
	}
}

// run starts etcd and waits until it serves reads, or returns why it does not.
func (e *testEtcd) run() error {
	e.cmd = exec.Command(e.args[0], e.args[1:]...)
	e.cmd.Stdout, e.cmd.Stderr = e.out, e.out
	if err := e.cmd.Start(); err != nil {
		e.cmd = nil
		return err
	}
	e.exited = make(chan error, 1)
	go func(cmd *exec.Cmd) { e.exited <- cmd.Wait() }(e.cmd)
	c, err := newEtcdClient(e.url, time.Second)
	if err != nil {
		return err
	}
	defer c.close()
	for deadline := time.Now().Add(20 * time.Second); ; {
		_, _, err := c.get(context.Background(), "probe")
		if err == nil {
			return nil
		}
		select {
		case werr := <-e.exited:
			e.cmd = nil
			return fmt.Errorf("exited (%v) before answering", werr)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			e.kill()
			return fmt.Errorf("no answer: %v", err)
		}
	}
}

// kill ends etcd with SIGKILL, if it runs, and waits for it.
func (e *testEtcd) kill() {
	if e.cmd == nil {
		return
	}
	e.cmd.Process.Kill()
	<-e.exited
	e.cmd = nil
}

// signal sends etcd a signal by name (STOP, CONT) with kill(1), which keeps this file
// free of the syscall constants that only some systems define.
func (e *testEtcd) signal(name string) {
	e.t.Helper()
	if out, err := exec.Command("kill", "-"+name, strconv.Itoa(e.cmd.Process.Pid)).CombinedOutput(); err != nil {
		e.t.Fatalf("kill -%s etcd: %v %s", name, err, out)
	}
}

// freeAddr returns a 127.0.0.1 address with a port free at the time of asking.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// testProxy forwards TCP connections on 127.0.0.1 to an address until it is cut. Cut, it
// partitions rather than refuses: it accepts connections and drops every byte both ways, so
// requests hang until their timeout. A connection that dropped bytes drops them for good;
// connections made after the cut heals are forwarded again.
type testProxy struct {
	ln  net.Listener
	to  string
	cut atomic.Bool

	mu    sync.Mutex
	conns []net.Conn
}

// startProxy forwards to addr until the test ends.
func startProxy(t testing.TB, addr string) *testProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &testProxy{ln: ln, to: addr}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, c := range p.conns {
			c.Close()
		}
	})
	return p
}

// url returns the proxy's address as an http URL.
func (p *testProxy) url() string { return "http://" + p.ln.Addr().String() }

func (p *testProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, c)
	p.mu.Unlock()
}

func (p *testProxy) serve(c net.Conn) {
	p.track(c)
	var broken atomic.Bool
	if p.cut.Load() {
		broken.Store(true)
		io.Copy(io.Discard, c)
		return
	}
	up, err := net.Dial("tcp", p.to)
	if err != nil {
		c.Close()
		return
	}
	p.track(up)
	pipe := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 && p.cut.Load() {
				broken.Store(true)
			}
			if n > 0 && !broken.Load() {
				if _, err := dst.Write(buf[:n]); err != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		dst.Close()
		src.Close()
	}
	go pipe(up, c)
	pipe(c, up)
}
