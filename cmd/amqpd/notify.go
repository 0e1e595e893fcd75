package main

// systemd's readiness protocol (sd_notify(3)) for Type=notify and Type=notify-reload
// units: datagrams to the unix socket NOTIFY_SOCKET names.

import (
	"log/slog"
	"net"
	"strconv"
)

// notifier tells the service manager the daemon's state; a nil *notifier does nothing.
type notifier struct {
	addr  *net.UnixAddr
	log   *slog.Logger
	ready bool // READY=1 was sent
}

// newNotifier returns a notifier for the socket NOTIFY_SOCKET names: a path, or a Linux
// abstract socket name starting with @. It returns nil when socket is empty, and logs and
// returns nil when it names neither.
func newNotifier(socket string, log *slog.Logger) *notifier {
	if socket == "" {
		return nil
	}
	if socket[0] != '/' && socket[0] != '@' {
		log.Warn("ignoring NOTIFY_SOCKET: want an absolute path or an abstract socket name starting with @")
		return nil
	}
	// The net package turns a leading @ into the abstract namespace's NUL.
	return &notifier{addr: &net.UnixAddr{Name: socket, Net: "unixgram"}, log: log}
}

// send sends one message of newline-separated VAR=value assignments. A failure is logged;
// the broker serves on without its manager.
func (n *notifier) send(state string) {
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err == nil {
		_, err = c.Write([]byte(state))
		c.Close()
	}
	if err != nil {
		n.log.Warn("cannot notify the service manager", "socket", n.addr.Name, "err", err)
	}
}

// isReady tells the manager the data is loaded and the listeners are open.
func (n *notifier) isReady() {
	if n != nil {
		n.ready = true
		n.send("READY=1")
	}
}

// reloading tells the manager a reload began, with the time systemd 253 and later want to
// match the reload to their request. Before the broker is ready it says nothing.
func (n *notifier) reloading() {
	if n == nil || !n.ready {
		return
	}
	msg := "RELOADING=1"
	if usec, ok := monotonicUsec(); ok {
		msg += "\nMONOTONIC_USEC=" + strconv.FormatUint(usec, 10)
	}
	n.send(msg)
}

// reloaded tells the manager the reload ended (whether or not it worked: the broker
// serves on, with the previous settings if it failed).
func (n *notifier) reloaded() {
	if n != nil && n.ready {
		n.send("READY=1")
	}
}

// stopping tells the manager the daemon is shutting down.
func (n *notifier) stopping() {
	if n != nil {
		n.send("STOPPING=1")
	}
}
