package amqp

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// testPKI is a throwaway certificate authority with a server and a client certificate,
// made at run time: no keys are committed.
type testPKI struct {
	dir               string
	caFile            string
	certFile, keyFile string // server, for 127.0.0.1
	pool              *x509.CertPool
	client            tls.Certificate // CN "guest", signed by the CA
	stranger          tls.Certificate // CN "guest", self-signed
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	p := &testPKI{dir: t.TempDir(), pool: x509.NewCertPool()}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "amqp-go test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	p.pool.AddCert(ca)
	p.caFile = p.write("ca.pem", "CERTIFICATE", caDER)

	leaf := func(serial int64, cn string, usage []x509.ExtKeyUsage, signer *x509.Certificate, signerKey *ecdsa.PrivateKey) ([]byte, *ecdsa.PrivateKey) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  usage,
			IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		}
		if signer == nil {
			signer, signerKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, key
	}
	// The server's certificate is also a client's: a cluster node presents it to the leader.
	der, key := leaf(2, "127.0.0.1", []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, ca, caKey)
	p.certFile = p.write("server.pem", "CERTIFICATE", der)
	kb, _ := x509.MarshalECPrivateKey(key)
	p.keyFile = p.write("server.key", "EC PRIVATE KEY", kb)

	der, key = leaf(3, "guest", []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, ca, caKey)
	p.client = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	der, key = leaf(4, "guest", []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil, nil)
	p.stranger = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return p
}

// forcing is a client configuration that presents cert whatever CAs the server names.
func (p *testPKI) forcing(cert tls.Certificate) *tls.Config {
	return &tls.Config{RootCAs: p.pool, GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return &cert, nil
	}}
}

func (p *testPKI) write(name, typ string, der []byte) string {
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		panic(err)
	}
	return path
}

// newTLSServer serves amqps on 127.0.0.1:0 with the PKI's server certificate.
func newTLSServer(t testing.TB, p *testPKI, verify string, cfg Config) string {
	t.Helper()
	cfg.TLS = &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile, CAFile: p.caFile, Verify: verify}
	if cfg.Logger == nil {
		cfg.Logger = wireDiscardLogger()
	}
	cfg.DataDir = t.TempDir()
	srv := NewServer(cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-done; err != ErrServerClosed {
			t.Errorf("ServeTLS returned %v", err)
		}
	})
	return "amqps://guest:guest@" + srv.Addr().String() + "/"
}

func TestTLSPlainLogin(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	url := newTLSServer(t, p, "none", Config{})
	conn, err := amqp091.DialTLS(url, &tls.Config{RootCAs: p.pool})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if st := conn.ConnectionState(); st.Version < tls.VersionTLS12 {
		t.Fatalf("TLS version %x, want at least 1.2", st.Version)
	}
	checkBrokerWorksTLS(t, conn)
}

// TestTLSIdleHeartbeats: an idle amqps connection, whose writer ends between writes, gets
// its heartbeats through the TLS session and works after the idle time.
func TestTLSIdleHeartbeats(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	url := newTLSServer(t, p, "none", Config{})
	conn, err := amqp091.DialConfig(url, amqp091.Config{Heartbeat: time.Second, TLSClientConfig: &tls.Config{RootCAs: p.pool}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))
	select {
	case err := <-closed:
		t.Fatalf("idle amqps connection closed: %v", err)
	case <-time.After(4 * time.Second): // past the client's 3 s without a frame
	}
	checkBrokerWorksTLS(t, conn)
}

func TestTLSRefusesOldVersions(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	url := newTLSServer(t, p, "none", Config{})
	_, err := amqp091.DialTLS(url, &tls.Config{RootCAs: p.pool, MaxVersion: tls.VersionTLS11})
	if err == nil {
		t.Fatal("a TLS 1.1 client was accepted")
	}
}

func TestTLSClientCertificates(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	required := newTLSServer(t, p, "required", Config{})
	if _, err := amqp091.DialTLS(required, &tls.Config{RootCAs: p.pool}); err == nil {
		t.Fatal("verify=required accepted a client without a certificate")
	}
	if _, err := amqp091.DialTLS(required, p.forcing(p.stranger)); err == nil {
		t.Fatal("verify=required accepted a self-signed client certificate")
	}
	conn, err := amqp091.DialTLS(required, &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{p.client}})
	if err != nil {
		t.Fatalf("verify=required refused a good client certificate: %v", err)
	}
	checkBrokerWorksTLS(t, conn)
	conn.Close()

	optional := newTLSServer(t, p, "optional", Config{})
	conn, err = amqp091.DialTLS(optional, &tls.Config{RootCAs: p.pool})
	if err != nil {
		t.Fatalf("verify=optional refused a client without a certificate: %v", err)
	}
	conn.Close()
	if _, err := amqp091.DialTLS(optional, p.forcing(p.stranger)); err == nil {
		t.Fatal("verify=optional accepted a self-signed client certificate")
	}
}

func TestTLSUntrustedServer(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	url := newTLSServer(t, p, "none", Config{})
	if _, err := amqp091.DialTLS(url, &tls.Config{RootCAs: x509.NewCertPool()}); err == nil {
		t.Fatal("client accepted a server certificate from an unknown CA")
	}
}

func checkBrokerWorksTLS(t *testing.T, conn *amqp091.Connection) {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Publish("", q.Name, false, false, amqp091.Publishing{Body: []byte("tls")}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		d, ok, err := ch.Get(q.Name, true)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			if string(d.Body) != "tls" {
				t.Fatalf("body %q", d.Body)
			}
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("message never arrived")
}

// TestTLSVerifyNeedsCA: client certificates checked against the system's roots would let
// any publicly trusted certificate whose CN names a user log in with EXTERNAL, so
// optional and required verification refuse to start without a CA file.
func TestTLSVerifyNeedsCA(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	for _, verify := range []string{"optional", "required"} {
		srv := NewServer(Config{
			Addr: "127.0.0.1:0", TLSAddr: "127.0.0.1:0", Logger: wireDiscardLogger(),
			TLS: &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile, Verify: verify},
		})
		err := srv.ListenAndServe()
		if err == nil || !strings.Contains(err.Error(), "-tls-ca") {
			t.Errorf("verify %s without a CA: %v, want an error naming -tls-ca", verify, err)
		}
	}
}

// TestExternalLogin checks SASL EXTERNAL over TLS: the verified client certificate's CN
// names the user.
func TestExternalLogin(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	tlsCfg := func(verify string) *TLSConfig {
		return &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile, CAFile: p.caFile, Verify: verify}
	}
	withCert := func() *tls.Config { return &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{p.client}} }
	external := func(addr string, conf *tls.Config) (*amqp091.Connection, error) {
		return amqp091.DialConfig("amqps://"+addr+"/", amqp091.Config{
			SASL:            []amqp091.Authentication{&amqp091.ExternalAuth{}},
			TLSClientConfig: conf,
		})
	}
	// guest may configure only guest-*, so that refusals show who logged in.
	path := secDefsFile(t, func(d *Definitions) error { return d.SetPermissions("guest", "/", "^guest-|^amq\\.gen-", ".*", ".*") })

	t.Run("certificate names a user", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{Definitions: path, TLS: tlsCfg("required")}, false).Addr().String()
		conn, err := external(addr, withCert())
		if err != nil {
			t.Fatalf("EXTERNAL login: %v", err)
		}
		defer conn.Close()
		checkBrokerWorksTLS(t, conn)
		secRefused(t, "declare other-q", secTry(t, conn, func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("other-q", false, false, false, false, nil)
			return err
		}), 403, secDenied("queue", "other-q", "/", "guest"))

		c := secWireTLS(t, addr, withCert())
		if mechs := secMechanisms(secStart(c)); !slices.Contains(mechs, "EXTERNAL") {
			t.Fatalf("mechanisms %q lack EXTERNAL", mechs)
		}
		secStartOk(c, "EXTERNAL", "")
		secOpen(c, "/")
		wireExpect[*connectionOpenOk](c, 0)
		// PLAIN still works on the same listener.
		conn2, err := amqp091.DialConfig("amqps://guest:guest@"+addr+"/", amqp091.Config{TLSClientConfig: withCert()})
		if err != nil {
			t.Fatalf("PLAIN beside EXTERNAL: %v", err)
		}
		conn2.Close()
	})
	t.Run("certificate names an unknown user", func(t *testing.T) {
		t.Parallel()
		noGuest := secDefsFile(t, func(d *Definitions) error {
			return errors.Join(d.DeleteUser("guest"), d.AddUser("admin", "admin-pw"), d.SetPermissions("admin", "/", ".*", ".*", ".*"))
		})
		addr := secServe(t, Config{Definitions: noGuest, TLS: tlsCfg("required")}, false).Addr().String()
		if conn, err := external(addr, withCert()); err != amqp091.ErrCredentials {
			if err == nil {
				conn.Close()
			}
			t.Errorf("EXTERNAL as unknown guest: %v, want ErrCredentials", err)
		}
		c := secWireTLS(t, addr, withCert())
		secStart(c)
		secStartOk(c, "EXTERNAL", "")
		secRefusedClose(c, replyAccessRefused, secLoginRefused("EXTERNAL"), 10, 11)
		conn, err := amqp091.DialConfig("amqps://admin:admin-pw@"+addr+"/", amqp091.Config{TLSClientConfig: withCert()})
		if err != nil {
			t.Fatalf("PLAIN as admin: %v", err)
		}
		conn.Close()
	})
	t.Run("no client certificate", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{Definitions: path, TLS: tlsCfg("optional")}, false).Addr().String()
		noCert := func() *tls.Config { return &tls.Config{RootCAs: p.pool} }
		if conn, err := external(addr, noCert()); err != amqp091.ErrSASL {
			if err == nil {
				conn.Close()
			}
			t.Errorf("EXTERNAL without a certificate: %v, want ErrSASL (not offered)", err)
		}
		c := secWireTLS(t, addr, noCert())
		if got := secStart(c); slices.Contains(secMechanisms(got), "EXTERNAL") {
			t.Errorf("mechanisms %q offer EXTERNAL without a client certificate", got)
		}
		secStartOk(c, "EXTERNAL", "")
		secRefusedClose(c, replyCommandInvalid, "COMMAND_INVALID - *", 10, 11)
		// Nor over plain TCP.
		plain := secServe(t, Config{Definitions: path}, false).Addr().String()
		w := wireDial(t, plain)
		secStart(w)
		secStartOk(w, "EXTERNAL", "")
		secRefusedClose(w, replyCommandInvalid, "COMMAND_INVALID - *", 10, 11)
	})
	t.Run("loopback-only user from a remote address", func(t *testing.T) {
		t.Parallel()
		addr := secServe(t, Config{TLS: tlsCfg("required")}, true).Addr().String()
		c := secWireTLS(t, addr, withCert())
		secStart(c)
		secStartOk(c, "EXTERNAL", "")
		secRefusedClose(c, replyAccessRefused, secLoginRefused("EXTERNAL"), 10, 11)
	})
}

// TestExternalTLSBadCertificates checks TLS handshakes that must fail, beyond those of
// TestTLSClientCertificates: a client certificate from another CA when certificates are
// optional or required, and a server certificate the client does not trust.
func TestExternalTLSBadCertificates(t *testing.T) {
	t.Parallel()
	p, other := newTestPKI(t), newTestPKI(t)
	log := &secLog{}
	serve := func(verify string, lg *slog.Logger) string {
		cfg := Config{TLS: &TLSConfig{CertFile: p.certFile, KeyFile: p.keyFile, CAFile: p.caFile, Verify: verify}, Logger: lg}
		return secServe(t, cfg, false).Addr().String()
	}
	optional, required := serve("optional", log.logger()), serve("required", nil)
	good := func(addr string) {
		t.Helper()
		conn, err := amqp091.DialTLS("amqps://guest:guest@"+addr+"/", &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{p.client}})
		if err != nil {
			t.Fatalf("a good client was refused: %v", err)
		}
		defer conn.Close()
		checkBrokerWorksTLS(t, conn)
	}
	for _, tc := range []struct {
		name string
		addr string
		conf *tls.Config
	}{
		{"optional, self-signed client certificate", optional, p.forcing(p.stranger)},
		{"optional, client certificate from another CA", optional, p.forcing(other.client)},
		{"required, client certificate from another CA", required, p.forcing(other.client)},
		{"server certificate from an unknown CA", optional, &tls.Config{RootCAs: other.pool}},
		{"server certificate for another name", optional, &tls.Config{RootCAs: p.pool, ServerName: "amqp.example.com"}},
	} {
		conn, err := amqp091.DialTLS("amqps://guest:guest@"+tc.addr+"/", tc.conf)
		if err == nil {
			conn.Close()
			t.Errorf("%s: connected", tc.name)
		}
	}
	good(optional)
	good(required)
	pollFor(t, "the refused handshakes in the log", func() bool { return strings.Contains(log.String(), "TLS handshake failed") })
}
