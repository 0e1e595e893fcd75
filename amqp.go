// Package amqp implements an AMQP 0.9.1 message broker that RabbitMQ clients use unchanged.
//
// It speaks the RabbitMQ-extended 0-9-1 protocol and imports only the standard library.
//
// # Embedding
//
// A Server listens on one or more addresses and serves until Shutdown:
//
//	srv := amqp.NewServer(amqp.Config{Addr: "127.0.0.1:5672"})
//	go func() {
//		if err := srv.ListenAndServe(); err != nil && err != amqp.ErrServerClosed {
//			log.Fatal(err)
//		}
//	}()
//	// ... clients dial amqp://guest:guest@127.0.0.1:5672/ ...
//	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
//	defer cancel()
//	srv.Shutdown(ctx) // every client gets connection.close 320 CONNECTION_FORCED
//
// # Durability
//
// With Config.DataDir set, durable exchanges, queues and bindings, and persistent messages
// (delivery-mode 2) routed to durable queues or held by durable delayed exchanges (type
// x-delayed-message), are written to a write-ahead log there and survive a crash and a
// restart. A publisher confirm or tx.commit-ok for such a message is sent only after the
// fsync that covers it (unless Config.FsyncInterval relaxes that).
// Without DataDir everything is in memory. wal.go draws the log's format, store.go what the
// broker writes in it. With Config.Cluster the server is one node of a cluster: only the
// leader elected through etcd opens DataDir and serves; the others copy its directory, and
// a confirm also waits for the followers in sync (cluster.go, replication.go).
//
// # Concurrency
//
// Each connection has a reader goroutine, and a writer goroutine while it has frames to
// send. The reader owns the socket's bufio.Reader and every channel's state, and runs
// channel methods inline: there is no goroutine per channel or per message. It routes each
// publish as it completes and enqueues what it routed at the end of the client's burst of
// frames (or every 1,024 message-queue pairs or 4 MiB of their data, and before a frame too
// large for the read buffer), before any other method, taking each queue's lock once per
// burst; a queue that may refuse a publish (x-overflow reject-publish) gets it at once. The
// writer owns the socket's write side: any goroutine appends encoded frames, or deliveries
// still to encode, to the connection's outbox (mutex-guarded), starting the writer if none
// runs; the writer swaps the outbox for its spare buffers, encodes the deliveries and
// writes the whole batch with one system call, so frames produced in a burst share one
// write, and ends when it finds the outbox empty. (A delivery with a large body is encoded
// when it is queued, its body written from the message; one queued behind a method frame is
// encoded with it.) One sweep for the whole server, every resourceCheckInterval, queues a
// heartbeat on each connection that has written nothing for half its heartbeat interval;
// the reader gives up after two intervals of silence. A reader without input for a moment
// drops its buffers and hands over to a fresh goroutine, whose stack is the smallest, to
// wait: an idle connection holds about 2 KiB of stack and 3 KiB of heap.
//
// Lock order: Server.defsMu → Server.reloadMu → Server.metrics.scanMu → Server.mu → vhost.mu →
// queue.mu → channel.mu → channel.cmu → conn.outMu; wal.mu, loginLimiter.mu,
// replyRegistry.mu and delays.mu are leaves, and code that holds several vhost locks takes
// them in name order.
//
// A clustered server runs its election and its node's loop (standing by, then leading)
// in goroutines of their own, which Shutdown stops: the loop before the log closes, the
// replica server and the election after, so followers get the last records first.
//
// Messages held by x-delayed-message exchanges wait in one heap per server with one timer
// (delayed.go); when it fires, the timer's goroutine routes what is due, enqueueing (and
// so dispatching) as a publisher does.
//
// # Files
//
// For a reader auditing the package, what each file owns:
//
//   - amqp.go: Server, Config and the public API; resource alarms and the health state.
//   - frame.go: frames, field tables and the frame reader; methods.go: every method's
//     struct and codec, generated from the spec by gen_methods.go; errors.go: reply codes.
//   - conn.go: a connection's handshake, reader and routed bursts; outbox.go: its outbox
//     and writer, and the encoding of deliveries.
//   - channel.go: channel methods (publish, consume, get, ack, qos, tx, confirms);
//     consumer.go: a queue's consumers and the delivery of runs to a channel.
//   - vhost.go: virtual hosts; exchange.go: exchanges, routing and the exchange methods;
//     policy.go: policies and the x- arguments of queues.
//   - queue.go: queues, their ready messages and the queue methods; spill.go: paging;
//     refqueue.go: a paging queue's index of references to its records.
//   - deadletter.go, delayed.go, replyto.go: dead-lettering, delayed exchanges, direct
//     reply-to.
//   - wal.go (with wal_linux.go and wal_other.go): the log's format, writer and segments;
//     store.go: what the broker logs, compaction and recovery; check.go: the offline check.
//   - auth.go: users, password hashes, permissions and login.
//   - http.go, api.go, apidefs.go: the management HTTP API; loopback.go: the AMQP sessions
//     it acts through; definitions.go: definitions; ui.go: the web UI; metrics.go (with
//     metrics_linux.go and metrics_other.go): Prometheus metrics.
//   - cluster.go, etcd.go: election and a node's roles; replication.go: the leader's side
//     of log replication, follower.go the follower's.
package amqp

import (
	"container/list"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Version is the broker version reported to clients.
const Version = "0.1.0"

// Defaults, as in RabbitMQ.
const (
	defaultAddr             = ":5672"
	defaultChannelMax       = 2047
	defaultFrameMax         = 131072
	defaultHeartbeat        = 60 * time.Second
	defaultHandshakeTimeout = 10 * time.Second
	defaultCloseTimeout     = 5 * time.Second
	defaultMaxMessageSize   = 16 << 20
	maxMessageSizeLimit     = 512 << 20
	defaultDiskFreeLimit    = 50_000_000
	defaultPageOut          = 4 << 20

	// defaultMaxHandshakes: a client finishes its handshake in a few round trips, so 1024 is
	// room for a reconnect storm of TLS clients waiting on the CPU, while what idle sockets
	// can hold stays bounded (about 27 KiB each before TLS: 1024 take under 30 MiB), and an
	// attacker must open 1024 sockets within a client's handshake to push that client out.
	defaultMaxHandshakes = 1024
)

// Config configures a Server. The zero value serves on :5672 with RabbitMQ's defaults.
type Config struct {
	// Addr is the TCP address ListenAndServe listens on; default ":5672". When TLS is set
	// and Addr is empty, there is no plain listener.
	Addr string
	// TLSAddr is the address of the amqps listener ListenAndServe opens when TLS is set;
	// default ":5671".
	TLSAddr string
	// HTTPAddr is the address ListenAndServe serves the management HTTP API on (RabbitMQ's
	// port is 15672); "" is none. See ManagementHandler.
	HTTPAddr string
	// HTTPTLS, when set, serves HTTPAddr over HTTPS with this certificate and key (CAFile
	// and Verify are not used); Reload reads them again.
	HTTPTLS *TLSConfig
	// PrometheusAddr is the address ListenAndServe serves Prometheus metrics on (RabbitMQ's
	// port is 15692); "" is none. See MetricsHandler.
	PrometheusAddr string
	// TLS configures amqps: certificate and key files, and client certificate checks.
	TLS *TLSConfig
	// MaxConnections caps the open client connections (past connection.open); 0 is no
	// limit. Sockets accepted beyond it are closed at once, with a log line, and a handshake
	// that reaches it is refused 530 NOT_ALLOWED at connection.open. Sockets still in their
	// handshake count against MaxHandshakes instead, so they cannot lock clients out.
	MaxConnections int
	// MaxHandshakes caps the sockets in their handshake (accepted, not yet open); past it the
	// oldest is dropped. Default 1024; negative is no limit.
	MaxHandshakes int
	// MaxConnectionsPerVhost caps the connections open on one virtual host; 0 is no limit.
	// Beyond it connection.open is refused with 530 NOT_ALLOWED. A vhost's max-connections
	// in the definitions file applies too; the stricter wins.
	MaxConnectionsPerVhost int
	// MaxQueuesPerVhost caps the queues of one virtual host; 0 is no limit. Beyond it
	// queue.declare is refused with 406 PRECONDITION_FAILED. A vhost's max-queues in the
	// definitions file applies too; the stricter wins.
	MaxQueuesPerVhost int
	// Definitions is a RabbitMQ definitions JSON file holding the users, virtual hosts,
	// permissions, topic permissions and vhost and user limits (as rabbitmqctl
	// export_definitions writes it); Reload reads it again. What else it holds is named in
	// a warning at each load. Empty, or a missing file, means RabbitMQ's defaults: vhost
	// "/" and guest/guest.
	Definitions string
	// LoopbackUsers may log in only from loopback addresses; default ["guest"].
	LoopbackUsers []string
	// AnonymousUser, when set, offers SASL ANONYMOUS and logs such clients in as this user.
	AnonymousUser string
	// MemoryHighWatermark sets off the memory alarm when the memory in use (the live Go
	// heap and the runtime's own memory, not garbage) passes it (in bytes; 0: no alarm). As in RabbitMQ, connections that publish are then blocked (sent
	// connection.blocked when they advertise it, and no longer read) until the heap falls
	// below it again; consumers keep flowing, so queues drain.
	MemoryHighWatermark uint64
	// AuthFailureDelay is how long a refused login waits before its answer; default 200ms.
	AuthFailureDelay time.Duration
	// AuthFailureLimit is the burst of failed logins a source address (IPv4, or IPv6 /64)
	// may make; beyond it its logins wait their turn, one a second. Default 10; negative is
	// no limit.
	AuthFailureLimit int
	// MaxPreAuthBytes caps what a client may send before it has logged in; default 64 KiB.
	MaxPreAuthBytes int
	// DataDir holds the write-ahead log; empty keeps everything in memory.
	DataDir string
	// Logger receives the server's logs; default slog.Default().
	Logger *slog.Logger
	// ChannelMax is the highest channel number a client may use; default 2047.
	ChannelMax uint16
	// FrameMax is the largest frame, in octets, the server accepts and offers; default 131072.
	FrameMax uint32
	// Heartbeat is the heartbeat interval the server proposes; default 60s. A negative
	// value proposes 0, that is no heartbeats unless the client asks for them.
	Heartbeat time.Duration
	// MaxMessageSize is the largest message body accepted, in octets; default 16 MiB as in
	// RabbitMQ 4, at most 512 MiB. A larger publish is 406 PRECONDITION_FAILED.
	MaxMessageSize int
	// PageOutBytes is how much memory a queue's ready messages may take (each its data plus
	// 256 octets; 64 times as much for a queue with consumers) before it keeps new ones on
	// disk, 24 octets of index each in memory (16 for a transient one, none for one that
	// follows the last in its paging file at the same size): persistent ones of a durable
	// queue in the write-ahead log, others in paging files. Default 4 MiB; negative pages
	// only while the memory alarm is on (recovered messages are always read back from the
	// log).
	PageOutBytes int64
	// SegmentSize is the size at which the write-ahead log starts a new segment file;
	// default 16 MiB, at most 1 GiB.
	SegmentSize int64
	// FsyncInterval selects the fsync policy. Zero (the default) is "always": every batch
	// of log records is fsynced before the confirms and tx.commit-oks it covers are sent.
	// A positive value is "interval": batches are written at once but fsynced at most this
	// often, and confirms are sent after the write, so a machine crash (not a broker
	// crash) can lose up to this much confirmed work.
	FsyncInterval time.Duration
	// Repair lets startup skip corrupt records in the middle of the log, logging what was
	// lost, instead of refusing to start.
	Repair bool
	// DiskFreeLimit sets off the disk alarm when the data directory's disk has fewer free
	// octets than this: as with the memory alarm, publishing connections are blocked
	// (connection.blocked "low on disk") until there is room again. Zero means 50 MB, as
	// in RabbitMQ; a negative value turns the alarm off. It applies only with DataDir.
	DiskFreeLimit int64
	// HandshakeTimeout bounds the time from accepting a socket to connection.open; default 10s.
	HandshakeTimeout time.Duration
	// ConsumerTimeout is how long a delivery may wait for its ack before its channel is
	// closed with 406 and its messages requeued, as RabbitMQ's consumer_timeout; default
	// 30 minutes, negative for none. A queue's x-consumer-timeout overrides it.
	ConsumerTimeout time.Duration
	// Cluster, when set, makes the server one node of a cluster (see ClusterConfig); nil
	// is a single node.
	Cluster *ClusterConfig
}

// MinInSyncAuto as ClusterConfig.MinInSync needs one follower in sync while a follower
// session that has been in sync keeps acknowledging, and none otherwise.
const MinInSyncAuto = -1

// ClusterConfig makes a server a node of a cluster with one leader, elected through etcd,
// and followers that copy its data directory. Only the leader serves clients; the others
// answer a client's protocol header with connection.close 320 CONNECTION_FORCED naming
// the leader. A leader that loses
// its term stops confirming and shuts down: Serve returns an error, and the process is
// meant to be restarted (by its supervisor) as a follower.
type ClusterConfig struct {
	// Etcd is etcd's client URLs, comma-separated, e.g. "http://10.0.0.1:2379".
	Etcd string
	// Name is the cluster's name: its keys in etcd are under /amqp-go/<Name>/.
	Name string
	// NodeName is this node's name, unique in the cluster.
	NodeName string
	// AdvertiseAddr is the AMQP address (host:port) clients are told when this node leads.
	AdvertiseAddr string
	// ReplicationAddr is the address this node serves followers on while it leads, and
	// that followers dial; it must be reachable from the other nodes. For one without a
	// host (":25672") or with an unspecified one, followers dial AdvertiseAddr's host.
	ReplicationAddr string
	// Secret is the shared secret nodes prove to each other when they replicate.
	Secret string
	// MinInSync is how many followers in sync a confirm needs: it waits for every follower
	// in sync, and for at least MinInSync of them; with 0 and none in sync, for none.
	// MinInSyncAuto (amqpd's default) needs 1 while a follower that has been in sync acks.
	MinInSync int
	// TTL is the etcd lease of each node: a dead leader is replaced within about this; default 5s.
	TTL time.Duration
}

// TLSConfig names the files of the amqps listener; Reload reads them again.
type TLSConfig struct {
	CertFile, KeyFile string
	// CAFile holds the certificate authorities client certificates are checked against.
	CAFile string
	// Verify is "none" (the default: no client certificate asked), "optional" (checked
	// when given) or "required".
	Verify string
}

func (c *Config) setDefaults() {
	if c.ConsumerTimeout == 0 {
		c.ConsumerTimeout = 30 * time.Minute
	}
	if c.Addr == "" && c.TLS == nil {
		c.Addr = defaultAddr
	}
	if c.TLS != nil && c.TLSAddr == "" {
		c.TLSAddr = ":5671"
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.ChannelMax == 0 {
		c.ChannelMax = defaultChannelMax
	}
	if c.FrameMax == 0 {
		c.FrameMax = defaultFrameMax
	}
	c.FrameMax = min(max(c.FrameMax, frameMinSize), maxFrameMax)
	if c.Heartbeat == 0 {
		c.Heartbeat = defaultHeartbeat
	}
	if c.Heartbeat < 0 {
		c.Heartbeat = 0
	}
	if c.AuthFailureDelay <= 0 {
		c.AuthFailureDelay = 200 * time.Millisecond
	}
	if c.AuthFailureLimit == 0 {
		c.AuthFailureLimit = defaultAuthFailureLimit
	}
	if c.MaxHandshakes == 0 {
		c.MaxHandshakes = defaultMaxHandshakes
	}
	if c.MaxPreAuthBytes <= 0 {
		c.MaxPreAuthBytes = 64 << 10
	}
	if c.MaxMessageSize <= 0 {
		c.MaxMessageSize = defaultMaxMessageSize
	}
	c.MaxMessageSize = min(c.MaxMessageSize, maxMessageSizeLimit)
	if c.PageOutBytes == 0 {
		c.PageOutBytes = defaultPageOut
	}
	if c.DiskFreeLimit == 0 {
		c.DiskFreeLimit = defaultDiskFreeLimit
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = defaultHandshakeTimeout
	}
}

// errShutdown is what every client gets from Shutdown.
var errShutdown = newError(replyConnectionForced, "broker forced connection closure with reason 'shutdown'")

// Server is an AMQP 0.9.1 broker.
type Server struct {
	cfg    Config
	log    *slog.Logger
	connID atomic.Uint64
	conns  sync.WaitGroup // one count per connection goroutine pair

	// reloadMu serializes loadAuth, so a reload deletes a virtual host before the next one
	// may create it again.
	reloadMu sync.Mutex
	// defsMu serializes reading, editing and applying the definitions; defs is the copy in
	// force (guarded by defsMu).
	defsMu sync.Mutex
	defs   *Definitions

	mu         sync.Mutex
	listeners  map[net.Listener]struct{} // guarded by mu
	active     map[*conn]struct{}        // guarded by mu: every connection, open or not
	handshakes list.List                 // guarded by mu: connections in their handshake, oldest first
	open       int                       // guarded by mu: connections past connection.open
	hsDropped  int                       // guarded by mu: handshakes dropped since the last log of it
	hsLogged   time.Time                 // guarded by mu: when hsDropped was last logged
	closed     bool                      // guarded by mu
	addr       net.Addr                  // guarded by mu: the first listener's address
	vhosts     map[string]*vhost         // guarded by mu
	users      map[string]*userUsage     // guarded by mu: users with open connections
	tlsConf    atomic.Pointer[tls.Config]
	auth       atomic.Pointer[authDB]
	logins     *loginLimiter // nil when Config.AuthFailureLimit is negative

	unhealthy  atomic.Pointer[string]    // why the broker must be restarted; nil while sound
	startFrame [2]atomic.Pointer[[]byte] // connection.start as sent, without and with EXTERNAL (conn.startFrame)
	alarms     atomic.Uint32             // the resource alarms that are on: alarmMemory, alarmDisk
	dead       *deadLetters              // moves dropped messages to dead-letter exchanges
	delays     *delays                   // holds the messages of x-delayed-message exchanges until due
	alarmMu    sync.Mutex                // guards alarmClear
	alarmClear chan struct{}             // closed when the last alarm goes off
	liveHeap   func() uint64             // the memory in use in bytes (readLiveHeap); a test may replace it
	diskFree   func() (uint64, error)    // free octets for the data directory; a test may replace it
	stopWatch  chan struct{}             // closed by Shutdown
	store      *store                    // nil without a data directory; set before serving
	replies    replyRegistry             // direct reply-to consumers by name, across vhosts as in RabbitMQ
	spill      *spill                    // the paging files; nil without a data directory
	openOnce   sync.Once
	openErr    error
	ready      chan struct{}  // closed when the first listener is up
	overview   overviewRates  // the management API's overview rates
	metrics    serverMetrics  // what ended connections and deleted queues counted, the node's identity (metrics.go)
	startedAt  time.Time      // when NewServer made the server
	httpSrvs   []*http.Server // guarded by mu: the HTTP listeners ListenAndServe opened
	httpAddr   net.Addr       // guarded by mu: the management API's listener, once open
	httpCert   atomic.Pointer[tls.Certificate]
	clock      atomic.Int64  // Unix milliseconds, updated every resourceCheckInterval: stamps deliveries
	cluster    *clusterNode  // nil for a single node; set before serving
	memLimit   atomic.Uint64 // the memory alarm's watermark in bytes; 0: none
	diskLimit  atomic.Int64  // the disk alarm's limit in free bytes; <= 0: none
}

// SetMemoryHighWatermark changes the memory alarm's watermark (Config.MemoryHighWatermark)
// on a running broker; 0 turns the alarm off. The alarms look again within 100 ms.
func (s *Server) SetMemoryHighWatermark(bytes uint64) {
	s.memLimit.Store(bytes)
	s.log.Info("memory high watermark set", "bytes", bytes)
	// As in RabbitMQ, the alarm is evaluated at once: a publish right after sees it.
	live := s.liveHeap()
	s.setAlarm(alarmMemory, bytes > 0 && live > bytes, "memory alarm", "live_heap", live, "watermark", bytes)
}

// SetDiskFreeLimit changes the disk alarm's limit (Config.DiskFreeLimit) on a running
// broker; 0 or less turns the alarm off.
func (s *Server) SetDiskFreeLimit(bytes int64) {
	s.diskLimit.Store(bytes)
	s.log.Info("disk free limit set", "bytes", bytes)
	if s.store == nil {
		return
	}
	if free, err := s.diskFree(); err == nil {
		s.setAlarm(alarmDisk, bytes > 0 && free < uint64(bytes), "disk alarm", "free", free, "limit", bytes)
	}
}

// NewServer returns a server configured by cfg; it does not listen until Serve or
// ListenAndServe.
func NewServer(cfg Config) *Server {
	cfg.setDefaults()
	s := &Server{
		cfg:       cfg,
		startedAt: time.Now(),
		log:       cfg.Logger,
		listeners: make(map[net.Listener]struct{}),
		active:    make(map[*conn]struct{}),
		ready:     make(chan struct{}),
		vhosts:    map[string]*vhost{},
		users:     make(map[string]*userUsage),
	}
	db, _ := newAuthDB(DefaultDefinitions(), cfg.LoopbackUsers)
	s.auth.Store(db)
	if cfg.AuthFailureLimit > 0 {
		s.logins = newLoginLimiter(cfg.AuthFailureLimit)
	}
	s.dead = newDeadLetters(s)
	s.clock.Store(time.Now().UnixMilli())
	s.memLimit.Store(cfg.MemoryHighWatermark)
	s.diskLimit.Store(cfg.DiskFreeLimit)
	s.delays = newDelays(s)
	s.vhosts["/"] = s.newVhost("/")
	s.liveHeap = readLiveHeap
	s.diskFree = func() (uint64, error) { return diskFree(s.cfg.DataDir) }
	s.stopWatch = make(chan struct{})
	return s
}

// ListenAndServe listens on Config.Addr, and on Config.TLSAddr when TLS is configured,
// and serves connections until Shutdown, when it returns ErrServerClosed.
func (s *Server) ListenAndServe() error {
	// Load the data first: a client must not be accepted, and then wait in its
	// handshake, while a long log is replayed.
	if err := s.load(); err != nil {
		return err
	}
	var plain, secure net.Listener
	var err error
	if err := s.listenHTTP(); err != nil {
		return err
	}
	if s.cfg.TLS != nil {
		if err := s.loadTLS(); err != nil {
			return err
		}
		if secure, err = net.Listen("tcp", s.cfg.TLSAddr); err != nil {
			return err
		}
	}
	if s.cfg.Addr != "" {
		if plain, err = net.Listen("tcp", s.cfg.Addr); err != nil {
			if secure != nil {
				secure.Close()
			}
			return err
		}
	}
	if secure == nil {
		return s.Serve(plain)
	}
	if plain == nil {
		return s.ServeTLS(secure)
	}
	errc := make(chan error, 1)
	go func() { errc <- s.ServeTLS(secure) }()
	err = s.Serve(plain)
	if err2 := <-errc; err == ErrServerClosed {
		err = err2
	}
	return err
}

// ServeTLS accepts amqps connections on ln, using the files of Config.TLS, until Shutdown.
func (s *Server) ServeTLS(ln net.Listener) error {
	if s.tlsConf.Load() == nil {
		if err := s.loadTLS(); err != nil {
			ln.Close()
			return err
		}
	}
	return s.Serve(tls.NewListener(ln, &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return s.tlsConf.Load(), nil
		},
	}))
}

// loadTLS reads the certificate, key and CA files of Config.TLS.
func (s *Server) loadTLS() error {
	c := s.cfg.TLS
	if c == nil {
		return errors.New("amqp: no TLS configuration")
	}
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return errors.New("amqp: loading TLS certificate: " + err.Error())
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return errors.New("amqp: loading TLS CA: " + err.Error())
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return errors.New("amqp: no certificates in " + c.CAFile)
		}
		conf.ClientCAs = pool
	}
	if (c.Verify == "optional" || c.Verify == "required") && c.CAFile == "" {
		// Without a CA of its own the TLS stack trusts the system's roots: any publicly
		// trusted certificate whose CN names a user would log in with EXTERNAL.
		return errors.New("amqp: TLS verify " + c.Verify + " needs a CA file for client certificates (-tls-ca)")
	}
	switch c.Verify {
	case "", "none":
	case "optional":
		conf.ClientAuth = tls.VerifyClientCertIfGiven
	case "required":
		conf.ClientAuth = tls.RequireAndVerifyClientCert
	default:
		return errors.New("amqp: TLS verify must be none, optional or required, not " + strconv.Quote(c.Verify))
	}
	s.tlsConf.Store(conf)
	return nil
}

// Reload reads the definitions file and the TLS files again. New logins and permission
// checks use the new users and permissions at once; open TLS sessions are kept. As in
// RabbitMQ, connections of a deleted user or to a deleted virtual host are closed with 320
// CONNECTION_FORCED, and a deleted virtual host's queues, exchanges, bindings and messages
// are deleted, in memory and in the write-ahead log, before Reload returns: a virtual host
// created again under the same name starts empty, also after a restart.
func (s *Server) Reload() error {
	if err := s.loadAuth(); err != nil {
		return err
	}
	if s.cfg.TLS != nil {
		if err := s.loadTLS(); err != nil {
			return err
		}
	}
	if s.cfg.HTTPTLS != nil {
		return s.loadHTTPCert()
	}
	return nil
}

// Serve accepts connections on ln until Shutdown, when it returns ErrServerClosed.
// Serve closes ln when it returns.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.load(); err != nil {
		ln.Close()
		return err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	if s.addr == nil {
		s.addr = ln.Addr()
		close(s.ready)
	}
	s.mu.Unlock()
	s.log.Info("listening", "addr", ln.Addr().String())

	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return s.closedErr()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, errTooManyFiles) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "err", err, "delay", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		if max := s.cfg.MaxConnections; max > 0 && s.openCount() >= max {
			s.log.Warn("refusing connection: connection limit reached", "remote", nc.RemoteAddr().String(), "limit", max)
			nc.Close()
			continue
		}
		c := newConn(s, nc)
		oldest, dropped, ok := s.track(c)
		if !ok {
			nc.Close()
			return ErrServerClosed
		}
		if oldest != nil {
			if dropped > 0 {
				s.log.Warn("dropping the oldest connections in their handshake: too many handshakes",
					"limit", s.cfg.MaxHandshakes, "dropped", dropped, "remote", oldest.remote)
			}
			oldest.abandon()
		}
		go c.serve()
	}
}

// load loads the users and the data directory, once, before the first connection is
// accepted.
func (s *Server) load() error {
	s.openOnce.Do(func() {
		if s.openErr = s.loadAuth(); s.openErr != nil {
			return
		}
		if s.cfg.Cluster != nil {
			// The node opens the store, and starts the rest, once it leads.
			var n *clusterNode
			n, s.openErr = startClusterNode(s)
			s.mu.Lock()
			s.cluster = n
			s.mu.Unlock()
			return
		}
		if s.openErr = s.openStore(); s.openErr == nil {
			s.startServices()
		}
	})
	return s.openErr
}

// startServices starts what runs beside the connections once the store is open.
func (s *Server) startServices() {
	s.delays.start() // the log takes records: held messages due may be routed
	go s.watchResources()
}

// closedErr is what Serve returns once the server is closed: why the cluster node
// stopped, if it did, else ErrServerClosed.
func (s *Server) closedErr() error {
	if s.cluster != nil {
		if err := s.cluster.failure(); err != nil {
			return err
		}
	}
	return ErrServerClosed
}

// Addr returns the address of the first listener, waiting until one is up.
func (s *Server) Addr() net.Addr {
	<-s.ready
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Shutdown stops the listeners, sends every client connection.close 320 CONNECTION_FORCED,
// and waits for the connections to end or ctx to expire; then it closes what is left and
// returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if !s.closed {
		close(s.stopWatch)
	}
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	conns := make([]*conn, 0, len(s.active))
	for c := range s.active {
		conns = append(conns, c)
	}
	s.mu.Unlock()

	for _, c := range conns {
		c.closeWith(errShutdown)
	}
	done := make(chan struct{})
	go func() {
		s.conns.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.active {
			c.nc.Close()
		}
		s.mu.Unlock()
		<-done
		err = ctx.Err()
	}
	s.closeHTTP()
	s.mu.Lock()
	node := s.cluster
	s.mu.Unlock()
	if node != nil {
		node.stop() // after this the node changes s.store no more
	}
	s.delays.close() // delayed messages falling due now are logged first
	s.dead.close()   // messages on their way to a dead-letter exchange are logged first
	if s.store != nil {
		s.store.close()
	}
	if s.spill != nil {
		s.spill.close()
	}
	if node != nil {
		node.resign() // after the store: followers get the last records first
	}
	return err
}

// Healthy returns nil while the broker is sound, or why it is not: a connection's
// goroutine panicked, so a lock may be held or a change half made. Such a broker should
// be restarted; its write-ahead log replays a consistent state.
func (s *Server) Healthy() error {
	if why := s.unhealthy.Load(); why != nil {
		return errors.New("amqp: broker unhealthy: " + *why)
	}
	return nil
}

// setUnhealthy records the first reason the broker must be restarted.
func (s *Server) setUnhealthy(why string) {
	s.unhealthy.CompareAndSwap(nil, &why)
	// No s.mu here: the panic may have come while it was held. s.store is set before the
	// first connection is served.
	if st := s.store; st != nil {
		// A checkpoint reads every vhost under its lock, which a panic may hold, and may
		// be of half-changed state: from now on the log alone is what a restart replays.
		st.noCheckpoint.Store(true)
	}
}

// panicText describes a recovered panic value without fmt.
func panicText(p any) string {
	switch v := p.(type) {
	case error:
		return v.Error()
	case string:
		return v
	}
	return "a non-error value"
}

// closeRemoved closes the connections whose user or virtual host is no longer defined.
func (s *Server) closeRemoved() {
	db := s.auth.Load()
	s.mu.Lock()
	var gone []*conn
	var why []*Error
	for c := range s.active {
		if !c.opened.Load() {
			continue // user and vhost are set before opened, so they are safe to read after
		}
		if e := db.removed(c.user, c.vh.name); e != nil {
			gone, why = append(gone, c), append(why, e)
		}
	}
	s.mu.Unlock()
	for i, c := range gone {
		c.logger().Warn("closing connection: definitions changed", "reason", why[i].Text)
		c.closeWith(why[i])
	}
}

// openCount returns the number of connections past connection.open.
func (s *Server) openCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// track registers a new connection, in its handshake; it reports false when the server is
// shutting down. Past Config.MaxHandshakes it returns the oldest handshake for the caller to
// drop (a slow client, more likely than not, or one that never meant to log in), with the
// number of handshakes dropped to log when a second has passed since the last log of it.
func (s *Server) track(c *conn) (oldest *conn, dropped int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, 0, false
	}
	s.active[c] = struct{}{}
	s.conns.Add(1)
	c.hsElem = s.handshakes.PushBack(c)
	if max := s.cfg.MaxHandshakes; max > 0 && s.handshakes.Len() > max {
		oldest = s.handshakes.Remove(s.handshakes.Front()).(*conn)
		oldest.hsElem = nil
		s.hsDropped++
		if now := time.Now(); now.Sub(s.hsLogged) >= time.Second {
			dropped, s.hsDropped, s.hsLogged = s.hsDropped, 0, now
		}
	}
	return oldest, dropped, true
}

// establish moves c from the handshakes to the open connections at connection.open. It
// fails if c has been dropped for a newer handshake, or with 530 NOT_ALLOWED at
// Config.MaxConnections.
func (s *Server) establish(c *conn) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.hsElem == nil {
		return errHandshakeDropped
	}
	if c.internal {
		// An API session is not a client connection: no limit, not counted.
		s.handshakes.Remove(c.hsElem)
		c.hsElem = nil
		return nil
	}
	if max := s.cfg.MaxConnections; max > 0 && s.open >= max {
		e := notAllowed("connection refused: node connection limit (" + strconv.Itoa(max) + ") is reached")
		e.ClassID, e.MethodID = classConnection, 40
		return e
	}
	s.handshakes.Remove(c.hsElem)
	c.hsElem = nil
	c.counted = true
	s.open++
	s.metrics.connsOpened++
	return nil
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	delete(s.active, c)
	if c.hsElem != nil {
		s.handshakes.Remove(c.hsElem)
		c.hsElem = nil
	}
	if c.counted {
		s.open--
	}
	s.foldConnLocked(c)
	s.mu.Unlock()
	s.conns.Done()
}

// resourceCheckInterval is how often the alarms look at the heap and the disk.
const resourceCheckInterval = 100 * time.Millisecond

// Resource alarms; as in RabbitMQ, while any is on, publishing connections are blocked.
const (
	alarmMemory = 1 << iota // the live heap is over Config.MemoryHighWatermark
	alarmDisk               // the data directory's disk has less than Config.DiskFreeLimit free
)

// watchResources sets and clears the memory and disk alarms until Shutdown.
func (s *Server) watchResources() {
	t := time.NewTicker(resourceCheckInterval)
	defer t.Stop()
	var forced, timeouts time.Time
	var sc sweepScratch
	diskErr := false
	for {
		select {
		case <-s.stopWatch:
			return
		case <-t.C:
		}
		now := time.Now()
		s.clock.Store(now.UnixMilli())
		s.sweepHeartbeats(now.UnixNano(), &sc)
		if now.Sub(timeouts) >= time.Second {
			timeouts = now
			s.checkConsumerTimeouts(now.UnixMilli(), &sc)
		}
		if limit := s.memLimit.Load(); limit > 0 {
			if s.alarms.Load()&alarmMemory != 0 && time.Since(forced) >= time.Second {
				// The live heap only changes when the collector runs, and a broker whose
				// publishers are blocked allocates too little to start it: collect, or
				// the alarm outlives the memory it was about.
				runtime.GC()
				forced = time.Now()
			}
			live := s.liveHeap()
			if s.memLimit.Load() == limit { // not changed meanwhile by SetMemoryHighWatermark
				s.setAlarm(alarmMemory, live > limit, "memory alarm", "live_heap", live, "watermark", limit)
			}
		}
		if limit := s.diskLimit.Load(); limit > 0 && s.store != nil {
			free, err := s.diskFree()
			if err != nil {
				if !diskErr {
					s.log.Error("cannot read the data directory's free space; the disk alarm is off", "err", err)
				}
				diskErr = true
				s.setAlarm(alarmDisk, false, "disk alarm")
				continue
			}
			diskErr = false
			s.setAlarm(alarmDisk, free < uint64(limit), "disk alarm", "free", free, "limit", limit)
		}
	}
}

// sweepScratch holds the lists the sweeps of watchResources reuse from one to the next, so
// that they allocate nothing per connection.
type sweepScratch struct {
	conns []*conn
	chans []*channel
}

// clear empties the lists, keeping their memory but no connection or channel.
func (sc *sweepScratch) clear() {
	clear(sc.conns)
	clear(sc.chans)
	sc.conns, sc.chans = sc.conns[:0], sc.chans[:0]
}

// sweepHeartbeats sends a heartbeat on every connection that has written nothing for half
// its heartbeat interval, and releases the outbox buffers of idle ones. It runs every resourceCheckInterval, which is under half the
// shortest interval (1 s): connections need no timer or goroutine of their own to keep time.
func (s *Server) sweepHeartbeats(now int64, sc *sweepScratch) {
	s.mu.Lock()
	for c := range s.active {
		if c.heartbeatDue(now) {
			sc.conns = append(sc.conns, c)
		}
		c.releaseIdleOutbox(now)
	}
	s.mu.Unlock()
	defer sc.clear()
	for _, c := range sc.conns {
		if c.heartbeatIfIdle(now) {
			// Let its writer run before the next starts: a burst of heartbeats reuses one
			// goroutine and stack rather than leaving one per connection to the collector.
			runtime.Gosched()
		}
	}
}

// setAlarm turns one alarm on or off, logging the change; publishers stay blocked until
// no alarm is on.
func (s *Server) setAlarm(bit uint32, on bool, name string, attrs ...any) {
	was := s.alarms.Load()
	if (was&bit != 0) == on {
		return
	}
	s.alarmMu.Lock()
	defer s.alarmMu.Unlock()
	now := was &^ bit
	if on {
		now |= bit
		s.log.Warn(name+": blocking publishers", attrs...)
	} else {
		s.log.Info(name+" cleared", attrs...)
	}
	switch {
	case was == 0 && now != 0:
		s.alarmClear = make(chan struct{})
	case was != 0 && now == 0:
		close(s.alarmClear)
	}
	s.alarms.Store(now)
}

// blockedReason is RabbitMQ's connection.blocked reason for the alarms that are on.
func blockedReason(alarms uint32) string {
	switch alarms {
	case alarmMemory:
		return "low on memory"
	case alarmDisk:
		return "low on disk"
	}
	return "low on memory and disk"
}

// readLiveHeap reads the heap that survived the last garbage collection.
func readLiveHeap() uint64 {
	samples := make([]metrics.Sample, len(memoryInUse))
	for i, name := range memoryInUse {
		samples[i].Name = name
	}
	metrics.Read(samples)
	var total uint64
	for _, sm := range samples {
		if sm.Value.Kind() == metrics.KindUint64 {
			total += sm.Value.Uint64()
		}
	}
	return total
}

// memoryInUse are the runtime's memory classes the memory alarm counts: the live heap (what
// the last collection kept, not garbage waiting for the next) and the runtime's own memory
// (goroutine stacks, heap metadata, profiling buckets, other), as RabbitMQ counts the whole
// process and not only message data.
var memoryInUse = []string{"/gc/heap/live:bytes", "/memory/classes/heap/stacks:bytes", "/memory/classes/os-stacks:bytes",
	"/memory/classes/metadata/other:bytes", "/memory/classes/metadata/mspan/inuse:bytes",
	"/memory/classes/metadata/mcache/inuse:bytes", "/memory/classes/other:bytes", "/memory/classes/profiling/buckets:bytes"}
