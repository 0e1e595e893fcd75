// Command amqpd runs the amqp-go AMQP 0.9.1 broker.
//
//	go run ./cmd/amqpd -addr 127.0.0.1:5672 -log-level debug
//	AMQPD_DATA_DIR=/var/lib/amqpd amqpd -config /etc/amqpd.conf -pidfile /run/amqpd.pid
//	echo "$PASSWORD" | amqpd add_user -definitions defs.json alice
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	amqp "github.com/maxpert/amqp-go"
)

func main() {
	if len(os.Args) < 2 || !isSubcommand(os.Args[1]) {
		useMadvFree() // the daemon only: a subcommand's memory does not matter
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// isSubcommand reports whether a first argument names a subcommand, not the daemon's flags.
func isSubcommand(arg string) bool { return isCtlVerb(arg) || isAPIVerb(arg) || arg == "check" }

// run reads the flags (command line, AMQPD_* variables, config file), serves until SIGINT
// or SIGTERM, and returns the exit code. A first argument naming a definitions subcommand
// (add_user, list_users, ...) runs that instead, with its own flags only.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && isCtlVerb(args[0]) {
		return runCtl(args[0], args[1:], os.Stdin, stdout, stderr)
	}
	if len(args) > 0 && isAPIVerb(args[0]) {
		return runAPI(args[0], args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "check" {
		return runCheck(args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("amqpd", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported below, in one line
	var cfg amqp.Config      // flags Config takes unchanged are bound to its fields
	fs.StringVar(&cfg.Addr, "addr", ":5672", `TCP address to listen on; "" turns the plain listener off`)
	fs.StringVar(&cfg.DataDir, "data-dir", "amqp-data", "directory for the write-ahead log")
	fs.StringVar(&cfg.Definitions, "definitions", "", "RabbitMQ definitions JSON file with users, vhosts and permissions (default: guest/guest on vhost /)")
	fs.StringVar(&cfg.HTTPAddr, "http-addr", "127.0.0.1:15672", `address of the management HTTP API; "" turns it off`)
	httpCert := fs.String("http-tls-cert", "", "PEM certificate file: serve the management API over HTTPS")
	httpKey := fs.String("http-tls-key", "", "PEM private key file for -http-tls-cert")
	fs.StringVar(&cfg.PrometheusAddr, "prometheus-addr", "127.0.0.1:15692", `address of the Prometheus metrics; "" turns them off`)
	tlsAddr := fs.String("tls-addr", ":5671", "TCP address of the amqps listener, when -tls-cert is given")
	tlsCert := fs.String("tls-cert", "", "PEM certificate file for amqps")
	tlsKey := fs.String("tls-key", "", "PEM private key file for amqps")
	tlsCA := fs.String("tls-ca", "", "PEM CA bundle for checking client certificates")
	tlsVerify := fs.String("tls-verify", "none", "client certificates: none, optional or required")
	fs.IntVar(&cfg.MaxConnections, "max-connections", 0, "most open client connections, past login (0: no limit)")
	fs.IntVar(&cfg.MaxHandshakes, "max-handshakes", 1024, "most sockets in their handshake; past it the oldest is dropped (-1: no limit)")
	fs.IntVar(&cfg.AuthFailureLimit, "auth-failure-limit", 10, "failed logins one address (IPv6: /64) may make before it is held to one a second (-1: no limit)")
	fs.IntVar(&cfg.MaxConnectionsPerVhost, "max-connections-per-vhost", 0, "most connections to one vhost (0: no limit)")
	fs.IntVar(&cfg.MaxQueuesPerVhost, "max-queues-per-vhost", 0, "most queues in one vhost (0: no limit)")
	channelMax := fs.Uint("channel-max", 2047, "channel-max offered to clients")
	frameMax := fs.Uint("frame-max", 131072, "frame-max offered to clients, 4096 to 16 MiB")
	fs.DurationVar(&cfg.Heartbeat, "heartbeat", 60*time.Second, "heartbeat interval offered to clients (0: none)")
	fs.DurationVar(&cfg.ConsumerTimeout, "consumer-timeout", 30*time.Minute, "close a channel whose oldest delivery waited this long for its ack, requeueing its messages (a queue's x-consumer-timeout overrides it; -1ns: never)")
	fs.DurationVar(&cfg.HandshakeTimeout, "handshake-timeout", 10*time.Second, "time a client has to open its connection")
	fs.Int64Var(&cfg.PageOutBytes, "page-out-bytes", 4<<20, "memory a queue's ready messages may take (64x for a queue with consumers) before new ones stay on disk and are read back on delivery (-1: only under the memory alarm)")
	fs.Int64Var(&cfg.SegmentSize, "segment-size", 16<<20, "size at which the write-ahead log starts a new segment file")
	fs.DurationVar(&cfg.FsyncInterval, "fsync-interval", 0, "0: fsync every batch before confirming (always); >0: fsync at most this often, confirming after the write (a machine crash may lose up to this much)")
	fs.Int64Var(&cfg.DiskFreeLimit, "disk-free-limit", 50_000_000, "block publishers while the data directory's disk has fewer free bytes than this; 0: never")
	memWatermark := fs.Float64("memory-high-watermark", 0.4, "block publishers when the memory in use passes this fraction of RAM (<= 1) or this many bytes (> 1); 0: never")
	fs.BoolVar(&cfg.Repair, "repair", false, "skip corrupt records in the middle of the log at startup, logging what is lost")
	cluster := clusterFlags(fs)
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	logFile := fs.String("log-file", "", "log to this file instead of standard error")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	fs.IntVar(&cfg.MaxMessageSize, "max-message-size", 16<<20, "largest message body in bytes (at most 512 MiB)")
	pidPath := fs.String("pidfile", "", "write the process id here once listening, remove it on exit; refuse to start if it names a running amqpd")
	fs.String("config", "", "file of key = value lines setting these flags; AMQPD_<FLAG> variables override it, and the command line both")
	printConfig := fs.Bool("print-config", false, "print the effective flags as a config file and exit")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			fs.SetOutput(stderr)
			fs.PrintDefaults()
			return 0
		}
		fmt.Fprintf(stderr, "amqpd: %v\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "amqpd: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	unknownEnv, err := loadConfig(fs, os.Environ())
	if err != nil {
		fmt.Fprintf(stderr, "amqpd: %v\n", err)
		return 2
	}
	if *printConfig {
		if writeConfig(stdout, fs) != nil {
			return 1
		}
		return 0
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(stderr, "amqpd: bad -log-level %q: want debug, info, warn or error\n", *logLevel)
		return 2
	}
	if *logFormat != "text" && *logFormat != "json" {
		fmt.Fprintf(stderr, "amqpd: bad -log-format %q: want text or json\n", *logFormat)
		return 2
	}
	out := stderr
	if *logFile != "" {
		f, err := os.OpenFile(*logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			fmt.Fprintf(stderr, "amqpd: cannot open log file: %v\n", err)
			return 1
		}
		defer f.Close()
		out = f
	}
	var handler slog.Handler = slog.NewTextHandler(out, &slog.HandlerOptions{Level: level})
	if *logFormat == "json" {
		handler = slog.NewJSONHandler(out, &slog.HandlerOptions{Level: level})
	}
	logger := slog.New(handler)
	for _, name := range unknownEnv {
		logger.Warn("ignoring an environment variable that names no flag", "name", name)
	}

	cfg.Logger = logger
	cfg.ChannelMax = uint16(min(*channelMax, 65535))
	cfg.FrameMax = uint32(min(*frameMax, 16<<20))
	cfg.MemoryHighWatermark = watermark(*memWatermark)
	if cfg.DiskFreeLimit <= 0 {
		cfg.DiskFreeLimit = -1 // Config's zero means the default
	}
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = -1 // Config's zero means the default
	}
	cfg.Cluster = cluster()
	if *httpCert != "" {
		cfg.HTTPTLS = &amqp.TLSConfig{CertFile: *httpCert, KeyFile: *httpKey}
	}
	if *tlsCert != "" {
		cfg.TLSAddr = *tlsAddr
		cfg.TLS = &amqp.TLSConfig{CertFile: *tlsCert, KeyFile: *tlsKey, CAFile: *tlsCA, Verify: *tlsVerify}
	} else if cfg.Addr == "" {
		fmt.Fprintln(stderr, "amqpd: -addr is empty and no -tls-cert is given: nothing to listen on")
		return 2
	}
	pid, err := claimPidfile(*pidPath)
	if err != nil {
		fmt.Fprintf(stderr, "amqpd: %v\n", err)
		return 1
	}
	defer pid.remove()
	sd := newNotifier(os.Getenv("NOTIFY_SOCKET"), logger)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	srv := amqp.NewServer(cfg)
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	// Addr returns once the data is loaded and the listeners are open. If ListenAndServe
	// fails it never returns, and this goroutine ends with the process.
	listening := make(chan struct{})
	go func() { srv.Addr(); close(listening) }()
	health := time.NewTicker(time.Second)
	defer health.Stop()
	code := 0
	for done := false; !done; {
		select {
		case <-listening:
			listening = nil
			if err := pid.write(); err != nil {
				logger.Error("exiting", "err", err)
				done, code = true, 1
			} else {
				sd.isReady()
			}
		case <-health.C:
			if err := srv.Healthy(); err != nil {
				// State may be locked or half changed: exit so a supervisor restarts the
				// broker, which replays a consistent state from its log.
				logger.Error("exiting", "err", err)
				done, code = true, 3
			}
		case err := <-errc:
			srv.Shutdown(context.Background())
			if errors.Is(err, syscall.EADDRINUSE) {
				fmt.Fprintf(stderr, "amqpd: address is already in use: %v\n", err)
			} else {
				fmt.Fprintf(stderr, "amqpd: %v\n", err)
			}
			return 1
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				sd.reloading()
				if err := srv.Reload(); err != nil {
					logger.Error("reload failed; keeping the previous users and certificates", "err", err)
				} else {
					logger.Info("reloaded definitions and certificates")
				}
				sd.reloaded()
				continue
			}
			logger.Info("shutting down", "signal", sig.String())
			done = true
		}
	}
	sd.stopping()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- srv.Shutdown(ctx) }()
	select {
	case err := <-stopped:
		if err != nil {
			logger.Warn("shutdown incomplete", "err", err)
		}
	case <-time.After(15 * time.Second): // a connection stuck on a lock a panic holds
		logger.Error("shutdown did not finish; exiting anyway")
	}
	logger.Info("stopped")
	return code
}

// clusterFlags binds the cluster flags to fs; the function it returns gives the cluster
// configuration once fs is parsed, nil without -cluster-etcd (a single node).
func clusterFlags(fs *flag.FlagSet) func() *amqp.ClusterConfig {
	var c amqp.ClusterConfig
	fs.StringVar(&c.Etcd, "cluster-etcd", "", "etcd client URLs, comma-separated: run as a node of a cluster, serving clients only while leader")
	fs.StringVar(&c.Name, "cluster-name", "amqp-go", "the cluster's name, its keys in etcd are under /amqp-go/<name>/")
	host, _ := os.Hostname()
	fs.StringVar(&c.NodeName, "node-name", host, "this node's name, unique in the cluster")
	fs.StringVar(&c.AdvertiseAddr, "advertise-addr", "", "host:port of this node's AMQP listener, told to clients while it leads")
	fs.StringVar(&c.ReplicationAddr, "replication-addr", "", "host:port the leader serves followers on and followers dial (for :port, followers are told the -advertise-addr host)")
	fs.StringVar(&c.Secret, "cluster-secret", "", "shared secret the nodes prove to each other (better set by AMQPD_CLUSTER_SECRET)")
	fs.IntVar(&c.MinInSync, "min-insync", amqp.MinInSyncAuto, "followers in sync a confirm needs: it waits for every one in sync, and for at least this many (0: none when none is in sync; -1: 1 while a follower that was in sync is alive, else 0)")
	fs.DurationVar(&c.TTL, "cluster-ttl", 5*time.Second, "etcd lease TTL: a dead leader is replaced within about this")
	return func() *amqp.ClusterConfig {
		if c.Etcd == "" {
			return nil
		}
		return &c
	}
}
