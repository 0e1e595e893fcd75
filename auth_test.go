package amqp

import (
	"errors"
	"net"
	"strings"
	"testing"
)

// amqplainResponse builds an AMQPLAIN response as clients send it: the content of a field
// table without its length prefix, LOGIN and PASSWORD as long strings.
func amqplainResponse(login, password string) string {
	b := appendShortstr(nil, "LOGIN")
	b = appendValue(b, login)
	b = appendShortstr(b, "PASSWORD")
	b = appendValue(b, password)
	return string(b)
}

// amqplainEntries encodes key/value pairs in order, as the content of a table.
func amqplainEntries(kv ...any) string {
	var b []byte
	for i := 0; i < len(kv); i += 2 {
		b = appendShortstr(b, kv[i].(string))
		b = appendValue(b, kv[i+1])
	}
	return string(b)
}

func TestParsePlain(t *testing.T) {
	tests := []struct {
		name       string
		resp       string
		user, pass string
		ok         bool
	}{
		{"valid", "\x00guest\x00guest", "guest", "guest", true},
		{"with authzid", "admin\x00guest\x00secret", "guest", "secret", true},
		{"authzid equal to user", "guest\x00guest\x00guest", "guest", "guest", true},
		{"empty password", "\x00guest\x00", "guest", "", true},
		{"password with spaces and UTF-8", "\x00u\x00p ä ss", "u", "p ä ss", true},
		{"empty", "", "", "", false},
		{"one NUL", "\x00guest", "", "", false},
		{"no leading NUL", "guest\x00guest", "", "", false},
		{"user and password only", "guestguest", "", "", false},
		{"empty user", "\x00\x00guest", "", "", false},
		{"empty user with authzid", "guest\x00\x00guest", "", "", false},
		{"two NULs only", "\x00\x00", "", "", false},
		{"extra NUL", "\x00guest\x00guest\x00", "", "", false},
		{"NUL in password", "\x00guest\x00gu\x00est", "", "", false},
	}
	for _, tt := range tests {
		user, pass, ok := parsePlain(tt.resp)
		if user != tt.user || pass != tt.pass || ok != tt.ok {
			t.Errorf("%s: parsePlain(%q) = %q, %q, %v; want %q, %q, %v", tt.name, tt.resp, user, pass, ok, tt.user, tt.pass, tt.ok)
		}
	}
}

func TestParseAMQPlain(t *testing.T) {
	valid := amqplainResponse("guest", "guest")
	tests := []struct {
		name       string
		resp       string
		user, pass string
		ok         bool
	}{
		{"valid", valid, "guest", "guest", true},
		{"as amqp091-go sends it", "\x05LOGIN\x53\x00\x00\x00\x05guest\x08PASSWORD\x53\x00\x00\x00\x05guest", "guest", "guest", true},
		{"password first", amqplainEntries("PASSWORD", "pw", "LOGIN", "bob"), "bob", "pw", true},
		{"extra keys", amqplainEntries("x", int32(1), "LOGIN", "bob", "nested", table{"a": []any{true}}, "PASSWORD", "pw", "z", nil), "bob", "pw", true},
		{"empty password", amqplainResponse("bob", ""), "bob", "", true},
		{"no password", amqplainEntries("LOGIN", "bob"), "bob", "", true},
		{"later LOGIN wins", amqplainEntries("LOGIN", "a", "LOGIN", "b", "PASSWORD", "p"), "b", "p", true},
		{"empty", "", "", "", false},
		{"empty login", amqplainResponse("", "pw"), "", "pw", false},
		{"no login", amqplainEntries("PASSWORD", "pw"), "", "pw", false},
		{"login as bytes", amqplainEntries("LOGIN", []byte("bob"), "PASSWORD", "pw"), "", "pw", false},
		{"login as int", amqplainEntries("LOGIN", int32(7), "PASSWORD", "pw"), "", "pw", false},
		{"login as table", amqplainEntries("LOGIN", table{"a": "bob"}, "PASSWORD", "pw"), "", "pw", false},
		{"password as int", amqplainEntries("LOGIN", "bob", "PASSWORD", int64(1)), "bob", "", true},
		{"lower-case keys", amqplainEntries("login", "bob", "password", "pw"), "", "", false},
		{"with the table length prefix", string(appendTable(nil, table{"LOGIN": "bob"})), "", "", false},
		{"unknown type tag", "\x05LOGIN\x53\x00\x00\x00\x03bob\x01kZ", "", "", false},
		{"longstr past the end", "\x05LOGIN\x53\x00\x00\x01\x00bob", "", "", false},
		{"longstr 0xffffffff", "\x05LOGIN\x53\xff\xff\xff\xffbob", "", "", false},
	}
	for _, tt := range tests {
		user, pass, ok := parseAMQPlain(tt.resp)
		if ok != tt.ok || ok && (user != tt.user || pass != tt.pass) {
			t.Errorf("%s: parseAMQPlain(%q) = %q, %q, %v; want %q, %q, %v", tt.name, tt.resp, user, pass, ok, tt.user, tt.pass, tt.ok)
		}
	}

	// A cut response is refused unless the cut falls between entries; a cut never yields
	// the full password.
	login := len(amqplainEntries("LOGIN", "guest"))
	for n := range len(valid) {
		user, pass, ok := parseAMQPlain(valid[:n])
		switch {
		case n == login:
			if !ok || user != "guest" || pass != "" {
				t.Errorf("cut after LOGIN: %q, %q, %v", user, pass, ok)
			}
		case ok:
			t.Errorf("cut to %d of %d bytes: %q, %q, ok", n, len(valid), user, pass)
		}
	}
}

// otherAddr is a net.Addr of no standard type.
type otherAddr string

func (a otherAddr) Network() string { return "other" }
func (a otherAddr) String() string  { return string(a) }

func TestIsLoopback(t *testing.T) {
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	tests := []struct {
		addr net.Addr
		want bool
	}{
		{&net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 5672}, true},
		{&net.TCPAddr{IP: net.ParseIP("127.5.5.5"), Port: 1}, true},
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1).To4()}, true},
		{&net.TCPAddr{IP: net.ParseIP("::1"), Port: 5672}, true},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:127.0.0.1"), Port: 5672}, true},
		{&net.TCPAddr{IP: net.ParseIP("10.0.0.1"), Port: 5672}, false},
		{&net.TCPAddr{IP: net.ParseIP("192.168.1.1"), Port: 5672}, false},
		{&net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 5672}, false},
		{&net.TCPAddr{IP: net.ParseIP("128.0.0.1"), Port: 5672}, false},
		{&net.TCPAddr{IP: net.ParseIP("::"), Port: 5672}, false},
		{&net.TCPAddr{IP: net.ParseIP("::2"), Port: 5672}, false},
		{&net.TCPAddr{IP: net.ParseIP("0.0.0.0"), Port: 5672}, false},
		{&net.TCPAddr{}, false},
		{&net.UnixAddr{Name: "/run/amqp.sock", Net: "unix"}, true},
		{&net.UDPAddr{IP: net.ParseIP("127.0.0.1"), Port: 5672}, true},
		{&net.UDPAddr{IP: net.ParseIP("10.0.0.1"), Port: 5672}, false},
		{p1.RemoteAddr(), false},
		{otherAddr("127.0.0.1:5672"), true},
		{otherAddr("[::1]:5672"), true},
		{otherAddr("localhost:5672"), false},
		{otherAddr("127.0.0.1"), false},
		{otherAddr(""), false},
	}
	for _, tt := range tests {
		if got := isLoopback(tt.addr); got != tt.want {
			t.Errorf("isLoopback(%T %v) = %v, want %v", tt.addr, tt.addr, got, tt.want)
		}
	}
}

func TestAuthenticate(t *testing.T) {
	s := NewServer(Config{})
	local := &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 40000}
	local6 := &net.TCPAddr{IP: net.ParseIP("::1"), Port: 40000}
	remote := &net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 40000}
	const loginRefused = "ACCESS_REFUSED - Login was refused using authentication mechanism "
	tests := []struct {
		name      string
		mechanism string
		response  string
		addr      net.Addr
		user      string
		code      uint16 // 0 when accepted
		text      string
	}{
		{"PLAIN guest from loopback", "PLAIN", "\x00guest\x00guest", local, "guest", 0, ""},
		{"PLAIN guest with authzid", "PLAIN", "guest\x00guest\x00guest", local, "guest", 0, ""},
		{"PLAIN guest from ::1", "PLAIN", "\x00guest\x00guest", local6, "guest", 0, ""},
		{"AMQPLAIN guest from loopback", "AMQPLAIN", amqplainResponse("guest", "guest"), local, "guest", 0, ""},
		{"PLAIN guest from remote", "PLAIN", "\x00guest\x00guest", remote, "guest", 403,
			"ACCESS_REFUSED - user 'guest' can only connect via localhost"},
		{"AMQPLAIN guest from remote", "AMQPLAIN", amqplainResponse("guest", "guest"), remote, "guest", 403,
			"ACCESS_REFUSED - user 'guest' can only connect via localhost"},
		{"wrong password", "PLAIN", "\x00guest\x00wrong", local, "guest", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"wrong password from remote", "PLAIN", "\x00guest\x00wrong", remote, "guest", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"password prefix", "PLAIN", "\x00guest\x00gues", local, "guest", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"password longer", "PLAIN", "\x00guest\x00guests", local, "guest", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"empty password", "PLAIN", "\x00guest\x00", local, "guest", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"unknown user", "PLAIN", "\x00admin\x00guest", local, "admin", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"upper-case user", "PLAIN", "\x00GUEST\x00guest", local, "GUEST", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"AMQPLAIN wrong password", "AMQPLAIN", amqplainResponse("guest", "nope"), local, "guest", 403, loginRefused + "AMQPLAIN. For details see the broker logfile."},
		{"malformed PLAIN", "PLAIN", "guest", local, "", 403, loginRefused + "PLAIN. For details see the broker logfile."},
		{"malformed AMQPLAIN", "AMQPLAIN", "\x05LOGIN\x53\xff", local, "", 403, loginRefused + "AMQPLAIN. For details see the broker logfile."},
		{"unknown mechanism", "EXTERNAL", "", local, "", 503, "COMMAND_INVALID - unknown authentication mechanism 'EXTERNAL'"},
		{"mechanism is case-sensitive", "plain", "\x00guest\x00guest", local, "", 503, "COMMAND_INVALID - unknown authentication mechanism 'plain'"},
		{"empty mechanism", "", "\x00guest\x00guest", local, "", 503, "COMMAND_INVALID - unknown authentication mechanism ''"},
	}
	for _, tt := range tests {
		user, err := s.authenticate(tt.mechanism, tt.response, tt.addr)
		if tt.code == 0 {
			if err != nil || user != tt.user {
				t.Errorf("%s: authenticate = %q, %v; want %q, nil", tt.name, user, err, tt.user)
			}
			continue
		}
		var e *Error
		if !errors.As(err, &e) {
			t.Errorf("%s: authenticate = %q, %v; want *Error %d", tt.name, user, err, tt.code)
			continue
		}
		if e.Code != tt.code || e.Text != tt.text || e.ClassID != classConnection || e.MethodID != 11 {
			t.Errorf("%s: error = %+v; want code %d, text %q, method 10.11", tt.name, *e, tt.code, tt.text)
		}
		if user != tt.user {
			t.Errorf("%s: user = %q, want %q", tt.name, user, tt.user)
		}
		// 403 at connection.start-ok closes the connection (an error on channel 0), but as a
		// code it is soft; 503 is hard.
		if e.Hard() != (tt.code == 503) {
			t.Errorf("%s: Hard() = %v", tt.name, e.Hard())
		}
	}
}

func FuzzSASLPlain(f *testing.F) {
	for _, s := range []string{"\x00guest\x00guest", "admin\x00guest\x00guest", "\x00\x00", "", "\x00guest\x00",
		"\x00guest\x00guest\x00", strings.Repeat("\x00", 10), "\x00ü\x00\xff\xfe"} {
		f.Add(s)
	}
	s := NewServer(Config{})
	local := &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 40000}
	f.Fuzz(func(t *testing.T, resp string) {
		user, pass, ok := parsePlain(resp)
		if ok {
			if user == "" || strings.Contains(user, "\x00") || strings.Contains(pass, "\x00") {
				t.Fatalf("parsePlain(%q) = %q, %q, ok", resp, user, pass)
			}
			if u, p, ok := parsePlain("\x00" + user + "\x00" + pass); !ok || u != user || p != pass {
				t.Fatalf("reparse = %q, %q, %v", u, p, ok)
			}
		} else if user != "" || pass != "" {
			t.Fatalf("parsePlain(%q) failed but returned %q, %q", resp, user, pass)
		}
		u, err := s.authenticate("PLAIN", resp, local)
		if (err == nil) != (ok && user == "guest" && pass == "guest") {
			t.Fatalf("authenticate(%q) = %q, %v", resp, u, err)
		}
	})
}

func FuzzAMQPlain(f *testing.F) {
	valid := amqplainResponse("guest", "guest")
	for n := 0; n <= len(valid); n++ {
		f.Add(valid[:n])
	}
	f.Add(amqplainEntries("x", int32(1), "LOGIN", "bob", "nested", table{"a": []any{true}}, "PASSWORD", "pw"))
	f.Add(amqplainEntries("LOGIN", []byte("guest"), "PASSWORD", "guest"))
	f.Add("\x05LOGIN\x53\xff\xff\xff\xffbob")
	f.Add(string(nestedTables(maxTableDepth + 1)[4:]))
	s := NewServer(Config{})
	local := &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 40000}
	f.Fuzz(func(t *testing.T, resp string) {
		user, pass, ok := parseAMQPlain(resp)
		if ok && user == "" {
			t.Fatalf("parseAMQPlain(%q) = ok with an empty user", resp)
		}
		u, err := s.authenticate("AMQPLAIN", resp, local)
		if (err == nil) != (ok && user == "guest" && pass == "guest") {
			t.Fatalf("authenticate(%q) = %q, %v", resp, u, err)
		}
		if ok {
			// A well-formed response re-encodes to one that parses the same.
			if u, p, ok2 := parseAMQPlain(amqplainResponse(user, pass)); !ok2 || u != user || p != pass {
				t.Fatalf("re-encoded: %q, %q, %v; want %q, %q", u, p, ok2, user, pass)
			}
		}
	})
}
