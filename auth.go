package amqp

import (
	"crypto/subtle"
	"net"
	"strings"
)

// The built-in user until the security issue brings users from a definitions file: guest,
// password guest, accepted from loopback addresses only, as RabbitMQ does by default.
const (
	guestUser     = "guest"
	guestPassword = "guest"
)

// authenticate checks a start-ok response for a mechanism and returns the user name. A
// refusal is 403 ACCESS_REFUSED (the name is returned for the log); an unknown mechanism
// is 503 COMMAND_INVALID, as in RabbitMQ.
func (s *Server) authenticate(mechanism, response string, remote net.Addr) (string, error) {
	var user, pass string
	var ok bool
	switch mechanism {
	case "PLAIN":
		user, pass, ok = parsePlain(response)
	case "AMQPLAIN":
		user, pass, ok = parseAMQPlain(response)
	default:
		e := commandInvalid("unknown authentication mechanism '" + mechanism + "'")
		e.ClassID, e.MethodID = classConnection, 11
		return "", e
	}
	refused := func(text string) (string, error) {
		e := accessRefused(text)
		e.ClassID, e.MethodID = classConnection, 11
		return user, e
	}
	if !ok || !checkPassword(user, pass) {
		return refused("Login was refused using authentication mechanism " + mechanism + ". For details see the broker logfile.")
	}
	if user == guestUser && !isLoopback(remote) {
		return refused("user '" + user + "' can only connect via localhost")
	}
	return user, nil
}

// checkPassword compares in constant time.
func checkPassword(user, pass string) bool {
	u := subtle.ConstantTimeCompare([]byte(user), []byte(guestUser))
	p := subtle.ConstantTimeCompare([]byte(pass), []byte(guestPassword))
	return u&p == 1
}

// parsePlain reads a SASL PLAIN response: [authzid] NUL authcid NUL passwd (RFC 4616).
func parsePlain(resp string) (user, pass string, ok bool) {
	parts := strings.Split(resp, "\x00")
	if len(parts) != 3 || parts[1] == "" {
		return "", "", false
	}
	return parts[1], parts[2], true
}

// parseAMQPlain reads an AMQPLAIN response: the content of a field table (without its
// length prefix) holding LOGIN and PASSWORD as long strings.
func parseAMQPlain(resp string) (user, pass string, ok bool) {
	d := decoder{b: []byte(resp)}
	for len(d.b) > 0 && d.err == nil {
		key := d.shortstr()
		v := d.value(0)
		s, isString := v.(string)
		switch {
		case key == "LOGIN" && isString:
			user = s
		case key == "PASSWORD" && isString:
			pass = s
		}
	}
	return user, pass, d.err == nil && user != ""
}

// isLoopback reports whether addr is a loopback address (127.0.0.0/8 or ::1).
func isLoopback(addr net.Addr) bool {
	switch a := addr.(type) {
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	case *net.UnixAddr:
		return true
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
