//! Command-line flags of both binaries, each also readable from `DMR_<FLAG_IN_CAPS>`.
//!
//! The flag structs are parsed by argh; [`parse`] first appends `--flag value` for every
//! `DMR_*` variable whose flag is not on the command line, so a flag always wins over the
//! environment. Values are checked here, at the edge, so the rest of the code gets types
//! that are already valid.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use argh::FromArgs;

use crate::logging::LogFormat;
use crate::protocol::{AgentId, ProtocolError};

/// `dmr-server`: the stateless relay between DMR agents, backed by RabbitMQ.
#[derive(FromArgs, Debug)]
pub struct ServerCli {
    #[argh(subcommand)]
    pub command: ServerCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
// Parsed once at start: the size difference between subcommands costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum ServerCommand {
    Run(ServerArgs),
    Directory(DirectoryArgs),
    Rabbitmq(RabbitmqArgs),
    Dlq(DlqArgs),
    Health(HealthArgs),
}

/// Relay agents' encrypted messages through RabbitMQ. Every flag can also be set with the
/// environment variable shown in brackets; a flag on the command line wins.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "run")]
pub struct ServerArgs {
    /// address for the agent WebSocket (/v1/ws), /healthz, /readyz and /metrics
    /// [env DMR_LISTEN] [default 127.0.0.1:8075]
    #[argh(option, default = "\"127.0.0.1:8075\".parse().unwrap()")]
    pub listen: SocketAddr,

    /// the RabbitMQ URL; several comma-separated URLs (cluster nodes) are tried in turn
    /// [env DMR_AMQP_URL] [default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[argh(option, default = "\"amqp://guest:guest@127.0.0.1:5672/%2f\".into()")]
    pub amqp_url: UrlWithPassword,

    /// PEM CA certificates to trust for amqps:// RabbitMQ nodes instead of the built-in web
    /// roots [env DMR_AMQP_CA_FILE]
    #[argh(option)]
    pub amqp_ca_file: Option<PathBuf>,

    /// agent directory file (CentOps JSON), re-read when it changes and on SIGHUP
    /// [env DMR_AGENTS_FILE]
    #[argh(option)]
    pub agents_file: Option<PathBuf>,

    /// the CentOps URL serving the agent directory, polled every --centops-interval seconds
    /// [env DMR_CENTOPS_URL]
    #[argh(option)]
    pub centops_url: Option<String>,

    /// URL of the base64 Ed25519 signature over the CentOps document's exact bytes, fetched
    /// with each poll and forwarded to agents with the document [env DMR_CENTOPS_SIGNATURE_URL]
    #[argh(option)]
    pub centops_signature_url: Option<String>,

    /// seconds between CentOps polls [env DMR_CENTOPS_INTERVAL] [default 60]
    #[argh(option, default = "60")]
    pub centops_interval: u64,

    /// PEM certificate chain; with --tls-key the server speaks wss:// and https://
    /// [env DMR_TLS_CERT]
    #[argh(option)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert [env DMR_TLS_KEY]
    #[argh(option)]
    pub tls_key: Option<PathBuf>,

    /// prefix for every RabbitMQ exchange and queue name, e.g. "test1." [env DMR_QUEUE_PREFIX]
    /// [default none]
    #[argh(option, default = "String::new()")]
    pub queue_prefix: String,

    /// seconds a message may wait in an agent's queue before it is dead-lettered
    /// [env DMR_MESSAGE_TTL] [default 86400]
    #[argh(option, default = "86400")]
    pub message_ttl: u64,

    /// deliveries of one message before it goes to the dead-letter queue; the queues get
    /// it from the policy of `dmr-server rabbitmq setup`, this value is only compared with it
    /// [env DMR_DELIVERY_LIMIT] [default 10]
    #[argh(option, default = "10")]
    pub delivery_limit: u32,

    /// largest accepted envelope in bytes [env DMR_MAX_MESSAGE_BYTES] [default 1048576]
    #[argh(option, default = "1_048_576")]
    pub max_message_bytes: u32,

    /// unacknowledged deliveries in flight per connected agent [env DMR_PREFETCH] [default 64]
    #[argh(option, default = "64")]
    pub prefetch: u16,

    /// seconds an agent has to complete the handshake [env DMR_HANDSHAKE_TIMEOUT] [default 10]
    #[argh(option, default = "10")]
    pub handshake_timeout: u64,

    /// JSON policy of who may send what to whom, rates and sizes (docs/POLICY.md); re-read
    /// when it changes and on SIGHUP [env DMR_POLICY_FILE] [default none: all allowed]
    #[argh(option)]
    pub policy_file: Option<PathBuf>,

    /// write an audit line (JSON) per relay decision to this file, or - for stdout;
    /// reopened on SIGHUP [env DMR_AUDIT_LOG] [default none]
    #[argh(option)]
    pub audit_log: Option<String>,

    /// this instance's name in audit lines [env DMR_INSTANCE] [default hostname:port]
    #[argh(option)]
    pub instance: Option<String>,

    /// log format, text or json (one object per line) [env DMR_LOG_FORMAT] [default text]
    #[argh(option, default = "LogFormat::Text")]
    pub log_format: LogFormat,

    /// open connections (agent sessions, handshakes and HTTP requests together) beyond
    /// which new ones are refused [env DMR_MAX_CONNECTIONS] [default 10000]
    #[argh(option, default = "10_000")]
    pub max_connections: u32,

    /// agent WebSocket handshakes in progress (upgraded, not yet logged in) beyond which new
    /// upgrades get 503 [env DMR_MAX_HANDSHAKES] [default 256]
    #[argh(option, default = "256")]
    pub max_handshakes: u32,

    /// largest CentOps answer read, in bytes; a longer one is refused
    /// [env DMR_CENTOPS_MAX_BYTES] [default 16777216]
    #[argh(option, default = "16 * 1024 * 1024")]
    pub centops_max_bytes: u32,

    /// PEM CA certificates to trust for an https:// --centops-url instead of the built-in
    /// web roots [env DMR_CENTOPS_CA_FILE]
    #[argh(option)]
    pub centops_ca_file: Option<PathBuf>,

    /// accept an http:// --centops-url on a host other than loopback (the directory is the
    /// root of trust: anyone on the path could add agents) [env DMR_ALLOW_INSECURE_CENTOPS]
    #[argh(switch)]
    pub allow_insecure_centops: bool,

    /// accept a directory with no agents (it disconnects every agent); without this it is
    /// refused like a malformed one [env DMR_ALLOW_EMPTY_DIRECTORY]
    #[argh(switch)]
    pub allow_empty_directory: bool,
    /// serve /metrics on this address only (instead of on --listen), to keep it off a
    /// public agent-facing port [env DMR_METRICS_LISTEN] [default none: on --listen]
    #[argh(option)]
    pub metrics_listen: Option<SocketAddr>,

    /// the RabbitMQ management API URL (http://user:password@host:15672); at start the server
    /// checks that the queue policies of `dmr-server rabbitmq setup` exist
    /// [env DMR_MANAGEMENT_URL] [default none: not checked]
    #[argh(option)]
    pub management_url: Option<String>,
}

/// Administer RabbitMQ for DMR.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "rabbitmq")]
pub struct RabbitmqArgs {
    #[argh(subcommand)]
    pub command: RabbitmqCommand,
}

#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand)]
pub enum RabbitmqCommand {
    Setup(RabbitmqSetupArgs),
}

/// Apply DMR's queue policies (TTL, delivery limit, dead-lettering, overflow, DLQ
/// retention) through the management API; idempotent, re-run it to change them on live
/// queues. Needs a management user tagged policymaker or administrator.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "setup")]
pub struct RabbitmqSetupArgs {
    /// the RabbitMQ management API URL, credentials in it (default guest:guest)
    /// [env DMR_MANAGEMENT_URL] [default http://127.0.0.1:15672]
    #[argh(option, default = "\"http://127.0.0.1:15672\".into()")]
    pub management_url: String,

    /// the servers' --amqp-url, whose vhost the policies go to (unless --vhost is given)
    /// [env DMR_AMQP_URL] [default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[argh(option, default = "\"amqp://guest:guest@127.0.0.1:5672/%2f\".into()")]
    pub amqp_url: String,

    /// the vhost to apply the policies to [env DMR_VHOST] [default: --amqp-url's]
    #[argh(option)]
    pub vhost: Option<String>,

    /// the servers' --queue-prefix [env DMR_QUEUE_PREFIX] [default none]
    #[argh(option, default = "String::new()")]
    pub queue_prefix: String,

    /// seconds a message may wait in an agent's queue before it is dead-lettered
    /// [env DMR_MESSAGE_TTL] [default 86400]
    #[argh(option, default = "86400")]
    pub message_ttl: u64,

    /// deliveries of one message before it goes to the dead-letter queue
    /// [env DMR_DELIVERY_LIMIT] [default 10]
    #[argh(option, default = "10")]
    pub delivery_limit: u32,

    /// seconds a message is kept in the dead-letter queue before RabbitMQ drops it
    /// [env DMR_DLQ_RETENTION] [default 1209600 (14 days)]
    #[argh(option, default = "1_209_600")]
    pub dlq_retention: u64,
}

/// Read, replay and purge the dead-letter queue.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "dlq")]
pub struct DlqArgs {
    #[argh(subcommand)]
    pub command: DlqCommand,
}

#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand)]
pub enum DlqCommand {
    List(DlqListArgs),
    Show(DlqShowArgs),
    Replay(DlqReplayArgs),
    Purge(DlqPurgeArgs),
}

/// Where the dead-letter queue is: the same flags (and env) as `run`.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "list")]
pub struct DlqListArgs {
    /// the RabbitMQ URL(s), as for run [env DMR_AMQP_URL]
    /// [default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[argh(option, default = "\"amqp://guest:guest@127.0.0.1:5672/%2f\".into()")]
    pub amqp_url: String,

    /// the servers' --queue-prefix [env DMR_QUEUE_PREFIX] [default none]
    #[argh(option, default = "String::new()")]
    pub queue_prefix: String,

    /// PEM CA certificates to trust for amqps:// nodes, as for run [env DMR_AMQP_CA_FILE]
    #[argh(option)]
    pub amqp_ca_file: Option<PathBuf>,

    /// print a JSON array instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Show one dead-lettered message's metadata and headers (never its sealed content).
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "show")]
pub struct DlqShowArgs {
    /// the RabbitMQ URL(s), as for run [env DMR_AMQP_URL]
    /// [default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[argh(option, default = "\"amqp://guest:guest@127.0.0.1:5672/%2f\".into()")]
    pub amqp_url: String,

    /// the servers' --queue-prefix [env DMR_QUEUE_PREFIX] [default none]
    #[argh(option, default = "String::new()")]
    pub queue_prefix: String,

    /// PEM CA certificates to trust for amqps:// nodes, as for run [env DMR_AMQP_CA_FILE]
    #[argh(option)]
    pub amqp_ca_file: Option<PathBuf>,

    /// print JSON
    #[argh(switch)]
    pub json: bool,

    /// the message id
    #[argh(positional)]
    pub id: String,
}

/// Publish dead-lettered messages again to their recipients' queues; each leaves the DLQ
/// only once RabbitMQ confirmed the new copy.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "replay")]
pub struct DlqReplayArgs {
    /// the RabbitMQ URL(s), as for run [env DMR_AMQP_URL]
    /// [default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[argh(option, default = "\"amqp://guest:guest@127.0.0.1:5672/%2f\".into()")]
    pub amqp_url: String,

    /// the servers' --queue-prefix [env DMR_QUEUE_PREFIX] [default none]
    #[argh(option, default = "String::new()")]
    pub queue_prefix: String,

    /// PEM CA certificates to trust for amqps:// nodes, as for run [env DMR_AMQP_CA_FILE]
    #[argh(option)]
    pub amqp_ca_file: Option<PathBuf>,

    /// replay this message (repeatable; ids may also be given as arguments)
    #[argh(option)]
    pub id: Vec<String>,

    /// replay every message for this recipient agent
    #[argh(option)]
    pub recipient: Option<String>,

    /// replay every message
    #[argh(switch)]
    pub all: bool,

    /// only say what would be replayed
    #[argh(switch)]
    pub dry_run: bool,

    /// message ids to replay
    #[argh(positional)]
    pub ids: Vec<String>,
}

/// Delete every message in the dead-letter queue.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "purge")]
pub struct DlqPurgeArgs {
    /// the RabbitMQ URL(s), as for run [env DMR_AMQP_URL]
    /// [default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[argh(option, default = "\"amqp://guest:guest@127.0.0.1:5672/%2f\".into()")]
    pub amqp_url: String,

    /// the servers' --queue-prefix [env DMR_QUEUE_PREFIX] [default none]
    #[argh(option, default = "String::new()")]
    pub queue_prefix: String,

    /// PEM CA certificates to trust for amqps:// nodes, as for run [env DMR_AMQP_CA_FILE]
    #[argh(option)]
    pub amqp_ca_file: Option<PathBuf>,

    /// yes, delete them (required)
    #[argh(switch)]
    pub yes: bool,
}

/// Exit 0 if the server's GET /healthz answers 200, else 1 (for container health checks).
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "health")]
pub struct HealthArgs {
    /// the server's --listen; 0.0.0.0 and [::] are asked on loopback
    /// [env DMR_LISTEN] [default 127.0.0.1:8075]
    #[argh(option, default = "\"127.0.0.1:8075\".parse().unwrap()")]
    pub listen: SocketAddr,

    /// the full URL to ask instead, e.g. https://host:8075/healthz
    #[argh(option)]
    pub url: Option<String>,
}

/// `dmr-agent`: an agency's end of DMR — encrypts, sends, receives and delivers.
#[derive(FromArgs, Debug)]
pub struct AgentCli {
    #[argh(subcommand)]
    pub command: AgentCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
// Parsed once at start: the size difference between subcommands costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AgentCommand {
    Run(AgentArgs),
    Keygen(KeygenArgs),
    Trust(TrustArgs),
}

/// Connect to DMR servers and serve the local HTTP API. Every flag can also be set with the
/// environment variable shown in brackets; a flag on the command line wins.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "run")]
pub struct AgentArgs {
    /// this agent's id, as listed in the directory [env DMR_ID] (required)
    #[argh(option)]
    pub id: Option<String>,

    /// path of this agent's X25519 private key (PKCS#8 PEM) [env DMR_KEY] (required)
    #[argh(option)]
    pub key: Option<PathBuf>,

    /// server WebSocket URL (ws://host:port/v1/ws or wss://…); repeat or comma-separate
    /// to fail over between servers [env DMR_SERVER] (required)
    #[argh(option)]
    pub server: Vec<String>,

    /// address of the local HTTP API [env DMR_LISTEN] [default 127.0.0.1:8077]
    #[argh(option, default = "\"127.0.0.1:8077\".parse().unwrap()")]
    pub listen: SocketAddr,

    /// URL the agent POSTs incoming messages to (the local service's webhook)
    /// [env DMR_DELIVER_URL] (without it, incoming messages wait in the queue)
    #[argh(option)]
    pub deliver_url: Option<String>,

    /// bearer token the local HTTP API requires (prefer the env var) [env DMR_API_TOKEN]
    /// [default none: no token required; needed when --listen is off loopback]
    #[argh(option)]
    pub api_token: Option<Secret>,

    /// a host name the API also answers to in the Host header, besides the --listen
    /// address and localhost/127.0.0.1/[::1] on its port: NAME (any port) or NAME:PORT;
    /// repeat or comma-separate [env DMR_API_HOST]
    #[argh(option)]
    pub api_host: Vec<String>,

    /// listen off loopback without --api-token (only behind a firewall that lets just the
    /// local service in) [env DMR_ALLOW_NO_TOKEN]
    #[argh(switch)]
    pub allow_no_token: bool,

    /// PEM CA certificates to trust for wss:// instead of the built-in web roots
    /// [env DMR_CA_FILE]
    #[argh(option)]
    pub ca_file: Option<PathBuf>,

    /// webhook deliveries running at once [env DMR_MAX_CONCURRENT_DELIVERIES] [default 16]
    #[argh(option, default = "16")]
    pub max_concurrent_deliveries: usize,

    /// open connections to the local API beyond which new ones get 503 at once
    /// [env DMR_MAX_API_CONNECTIONS] [default 1024]
    #[argh(option, default = "1024")]
    pub max_api_connections: usize,

    /// freshness window in seconds: older messages are refused at the API and dead-lettered
    /// on arrival; keep it equal to the server's --message-ttl [env DMR_MESSAGE_TTL]
    /// [default 86400]
    #[argh(option, default = "86400")]
    pub message_ttl: u64,

    /// longest pause in seconds between delivery attempts while the local service is down;
    /// deliveries wait for it without spending RabbitMQ's delivery limit
    /// [env DMR_WEBHOOK_RETRY_MAX] [default 60]
    #[argh(option, default = "60")]
    pub webhook_retry_max: u64,

    /// URL the agent POSTs each status change of a sent message to (queued, sent,
    /// delivered, failed) [env DMR_STATUS_URL] [default none]
    #[argh(option)]
    pub status_url: Option<String>,

    /// most messages kept in the outbox while no relay can take them; when full, sends
    /// are refused with 503 [env DMR_OUTBOX_MAX_MESSAGES] [default 10000]
    #[argh(option, default = "10_000")]
    pub outbox_max_messages: u64,

    /// log format, text or json (one object per line) [env DMR_LOG_FORMAT] [default text]
    #[argh(option, default = "LogFormat::Text")]
    pub log_format: LogFormat,

    /// the private key before the last rotation (keygen --force keeps it as PREFIX.key.old):
    /// messages still sealed to it open during a rotation [env DMR_PREVIOUS_KEY]
    #[argh(option)]
    pub previous_key: Option<PathBuf>,

    /// serve /metrics on this address only (instead of on --listen)
    /// [env DMR_METRICS_LISTEN] [default none: on --listen]
    #[argh(option)]
    pub metrics_listen: Option<SocketAddr>,
    /// this agent's state (pinned keys, delivered message ids, statuses of sent messages,
    /// the outbox); one per agent, never shared
    /// [env DMR_STATE_DIR] [default $STATE_DIRECTORY/<id> under systemd's StateDirectory=,
    /// else /var/lib/dmr-agent/<id>]
    #[argh(option)]
    pub state_dir: Option<PathBuf>,

    /// operator's Ed25519 public key (SPKI PEM) that must have signed the directory;
    /// repeatable; without one, agent keys are pinned on first use
    /// [env DMR_DIRECTORY_KEY, comma-separated]
    #[argh(option)]
    pub directory_key: Vec<String>,
}

/// Write a new X25519 key pair: PREFIX.key (private, mode 0600) and PREFIX.pub.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "keygen")]
pub struct KeygenArgs {
    /// path prefix of the files to write [env DMR_OUT] (required)
    #[argh(option)]
    pub out: Option<PathBuf>,

    /// overwrite existing files [env DMR_FORCE]
    #[argh(switch)]
    pub force: bool,
}

/// Sign the agent directory: make an operator key, sign a directory file.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "directory")]
pub struct DirectoryArgs {
    #[argh(subcommand)]
    pub command: DirectoryCommand,
}

#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand)]
pub enum DirectoryCommand {
    Keygen(DirectoryKeygenArgs),
    Sign(DirectorySignArgs),
}

/// Write a new Ed25519 operator key pair: PREFIX.key (private, mode 0600; keep it offline)
/// and PREFIX.pub (give it to agents as --directory-key).
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "keygen")]
pub struct DirectoryKeygenArgs {
    /// path prefix of the files to write
    #[argh(option)]
    pub out: PathBuf,

    /// replace existing files (the old key stops working)
    #[argh(switch)]
    pub force: bool,
}

/// Sign a directory file's exact bytes; writes FILE.sig (base64) beside it.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "sign")]
pub struct DirectorySignArgs {
    /// the operator's Ed25519 private key (PKCS#8 PEM)
    #[argh(option)]
    pub key: PathBuf,

    /// the directory file to sign (the --agents-file of the servers)
    #[argh(positional)]
    pub file: PathBuf,
}

/// Inspect and confirm the agent keys pinned in a state dir. Run by the operator on the
/// agent's machine: access to the state dir is the authorization.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "trust")]
pub struct TrustArgs {
    #[argh(subcommand)]
    pub command: TrustCommand,
}

#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand)]
pub enum TrustCommand {
    List(TrustListArgs),
    Confirm(TrustConfirmArgs),
}

/// List pinned agent keys and the changed keys waiting for confirmation.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "list")]
pub struct TrustListArgs {
    /// the agent's state directory (its --state-dir)
    #[argh(option)]
    pub state_dir: PathBuf,

    /// print JSON lines instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Accept an agent's new key: the key in --key, or else the changed key the directory
/// offered (check its fingerprint with the other agency first).
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "confirm")]
pub struct TrustConfirmArgs {
    /// the agent's state directory (its --state-dir)
    #[argh(option)]
    pub state_dir: PathBuf,

    /// the agent whose key changed
    #[argh(option)]
    pub id: String,

    /// the new public key (SPKI PEM) as obtained from the other agency
    #[argh(option)]
    pub key: Option<PathBuf>,
}

/// Flags each binary's subcommands accept from `DMR_*` variables.
pub const SERVER_ENV_FLAGS: &[(&str, &[(&str, bool)])] = &[
    ("directory keygen", &[("out", false), ("force", true)]),
    ("directory sign", &[("key", false)]),
    (
        "run",
        &[
            ("listen", false),
            ("amqp-url", false),
            ("amqp-ca-file", false),
            ("agents-file", false),
            ("centops-url", false),
            ("centops-signature-url", false),
            ("centops-interval", false),
            ("tls-cert", false),
            ("tls-key", false),
            ("queue-prefix", false),
            ("message-ttl", false),
            ("delivery-limit", false),
            ("max-message-bytes", false),
            ("prefetch", false),
            ("handshake-timeout", false),
            ("policy-file", false),
            ("audit-log", false),
            ("instance", false),
            ("log-format", false),
            ("max-connections", false),
            ("max-handshakes", false),
            ("centops-max-bytes", false),
            ("centops-ca-file", false),
            ("allow-insecure-centops", true),
            ("allow-empty-directory", true),
            ("metrics-listen", false),
            ("management-url", false),
        ],
    ),
    (
        "rabbitmq setup",
        &[
            ("management-url", false),
            ("amqp-url", false),
            ("vhost", false),
            ("queue-prefix", false),
            ("message-ttl", false),
            ("delivery-limit", false),
            ("dlq-retention", false),
        ],
    ),
    // Never --yes, --all or --json from the environment: a leftover variable must not
    // purge or replay anything.
    (
        "dlq list",
        &[
            ("amqp-url", false),
            ("amqp-ca-file", false),
            ("queue-prefix", false),
        ],
    ),
    (
        "dlq show",
        &[
            ("amqp-url", false),
            ("amqp-ca-file", false),
            ("queue-prefix", false),
        ],
    ),
    (
        "dlq replay",
        &[
            ("amqp-url", false),
            ("amqp-ca-file", false),
            ("queue-prefix", false),
        ],
    ),
    (
        "dlq purge",
        &[
            ("amqp-url", false),
            ("amqp-ca-file", false),
            ("queue-prefix", false),
        ],
    ),
    ("health", &[("listen", false)]),
];

pub const AGENT_ENV_FLAGS: &[(&str, &[(&str, bool)])] = &[
    (
        "run",
        &[
            ("id", false),
            ("key", false),
            ("server", false),
            ("listen", false),
            ("deliver-url", false),
            ("api-token", false),
            ("ca-file", false),
            ("max-concurrent-deliveries", false),
            ("max-api-connections", false),
            ("state-dir", false),
            ("status-url", false),
            ("outbox-max-messages", false),
            ("log-format", false),
            ("message-ttl", false),
            ("webhook-retry-max", false),
            ("api-host", false),
            ("allow-no-token", true),
            ("previous-key", false),
            ("metrics-listen", false),
            ("directory-key", false),
        ],
    ),
    ("keygen", &[("out", false), ("force", true)]),
    // Not --id or --key: DMR_ID and DMR_KEY name this agent, never the peer being confirmed.
    ("trust list", &[("state-dir", false), ("json", true)]),
    ("trust confirm", &[("state-dir", false)]),
];

/// Parses `args` (without the program name) after merging `DMR_*` variables from `env`.
/// On `--help` or a bad flag, prints argh's message and exits, as a CLI should.
pub fn parse<T: FromArgs>(
    program: &str,
    args: Vec<String>,
    env_flags: &[(&str, &[(&str, bool)])],
    env: impl Fn(&str) -> Option<String>,
) -> T {
    let args = with_env(args, env_flags, env);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    match T::from_args(&[program], &refs) {
        Ok(t) => t,
        Err(early) => {
            let ok = early.status.is_ok();
            if ok {
                // `--help | head` closes stdout early; that is not an error worth a panic.
                use std::io::Write;
                let _ = writeln!(std::io::stdout(), "{}", early.output);
            } else {
                eprintln!(
                    "{}\nRun `{program} --help` for usage.",
                    early.output.trim_end()
                );
            }
            std::process::exit(if ok { 0 } else { 2 });
        }
    }
}

/// Appends `--flag value` for each `DMR_FLAG` set in `env` whose flag is not already given.
pub(crate) fn with_env(
    mut args: Vec<String>,
    env_flags: &[(&str, &[(&str, bool)])],
    env: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    // A name may be nested ("directory sign"): it matches the leading words of `args`.
    let Some((_, flags)) = env_flags.iter().find(|(name, _)| {
        let words: Vec<&str> = name.split(' ').collect();
        args.len() >= words.len() && args.iter().zip(&words).all(|(a, w)| a == w)
    }) else {
        return args;
    };
    if args.iter().any(|a| a == "--help" || a == "help") {
        return args;
    }
    for (flag, is_switch) in *flags {
        let dashed = format!("--{flag}");
        if args
            .iter()
            .any(|a| a == &dashed || a.starts_with(&format!("{dashed}=")))
        {
            continue;
        }
        match env(&env_var(flag)) {
            Some(v) if *is_switch => {
                if matches!(v.as_str(), "1" | "true" | "yes") {
                    args.push(dashed);
                }
            }
            Some(v) if !v.is_empty() => args.extend([dashed, v]),
            _ => {}
        }
    }
    args
}

/// A flag value that must never be printed (the API token): `Debug` shows `***`, so a
/// config struct can derive `Debug` and still be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call it only where the value is used, never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A flag holding URLs that may carry a password (`--amqp-url`, several comma-separated):
/// `Debug` masks every password (`amqp://user:***@host`).
#[derive(Clone, PartialEq, Eq)]
pub struct UrlWithPassword(String);

impl UrlWithPassword {
    /// The URLs as given, password included; never print this.
    pub fn expose(&self) -> &String {
        &self.0
    }

    /// The URLs with each password replaced by `***`: safe for logs.
    pub fn masked(&self) -> String {
        self.0
            .split(',')
            .map(mask_password)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl From<&str> for UrlWithPassword {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl FromStr for UrlWithPassword {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for UrlWithPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

/// `scheme://user:password@rest` → `scheme://user:***@rest`; anything without a password
/// in its authority is returned as is.
fn mask_password(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    // The authority ends at the first '/', '?' or '#'; a password is before its last '@'.
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..start],
        &authority[..colon],
        &url[start + at..]
    )
}

/// What a flag combination lacks or gets wrong, in words an operator can act on. Flags
/// are named as typed (`--id`); a missing one also names its `DMR_*` variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A required flag was given neither on the command line nor in the environment.
    Missing {
        flag: &'static str,
        /// An example value, shown after the message.
        example: Option<&'static str>,
    },
    /// Neither of two flags was given, but at least one is needed, for reason `why`.
    MissingEither {
        first: &'static str,
        second: &'static str,
        why: &'static str,
    },
    /// Only one of two flags that only work together was given.
    Together {
        first: &'static str,
        second: &'static str,
    },
    /// A flag was given an empty value.
    Empty { flag: &'static str },
    /// A flag's value cannot be used, for reason `why`.
    Invalid {
        flag: &'static str,
        value: String,
        why: String,
    },
    /// `--id` is not a valid agent id (the error quotes the value).
    AgentId(ProtocolError),
    /// A number below the smallest value that works (`min` says it with its unit).
    TooSmall {
        flag: &'static str,
        min: &'static str,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { flag, example } => {
                let var = env_var(flag.trim_start_matches('-'));
                write!(f, "{flag} (or {var}) is required")?;
                match example {
                    Some(example) => write!(f, ", e.g. {example}"),
                    None => Ok(()),
                }
            }
            Self::MissingEither { first, second, why } => {
                write!(f, "give {first} or {second} (or both): {why}")
            }
            Self::Together { first, second } => write!(f, "{first} and {second} go together"),
            Self::Empty { flag } => write!(f, "{flag} is empty"),
            Self::Invalid { flag, value, why } => write!(f, "{flag} {value:?}: {why}"),
            Self::AgentId(e) => write!(f, "--id: {e}"),
            Self::TooSmall { flag, min } => write!(f, "{flag} must be at least {min}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::AgentId(e) => Some(e),
            _ => None,
        }
    }
}

/// The environment variable of `flag` (given without dashes): `agents-file` → `DMR_AGENTS_FILE`.
fn env_var(flag: &str) -> String {
    format!("DMR_{}", flag.replace('-', "_").to_ascii_uppercase())
}

/// Splits repeated and comma-separated values, dropping empty pieces.
pub(crate) fn split_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Checks a required agent id flag.
pub(crate) fn require_agent_id(id: &Option<String>) -> Result<AgentId, ConfigError> {
    let id = id.as_deref().ok_or(ConfigError::Missing {
        flag: "--id",
        example: None,
    })?;
    AgentId::new(id).map_err(ConfigError::AgentId)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn env_fills_missing_flags_and_flags_win() {
        let args = vec!["run".into(), "--listen".into(), "1.2.3.4:5".into()];
        let env = env_of(&[("DMR_LISTEN", "9.9.9.9:9"), ("DMR_AMQP_URL", "amqp://x")]);
        let merged = with_env(args, SERVER_ENV_FLAGS, env);
        assert_eq!(
            merged,
            ["run", "--listen", "1.2.3.4:5", "--amqp-url", "amqp://x"]
        );
        let cli: ServerCli = parse("dmr-server", merged, &[], |_| None);
        let ServerCommand::Run(a) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(a.listen.to_string(), "1.2.3.4:5");
        assert_eq!(a.amqp_url.expose(), "amqp://x");
        assert_eq!(a.delivery_limit, 10);
    }

    #[test]
    fn switches_come_from_truthy_env_values() {
        let merged = with_env(
            vec!["keygen".into()],
            AGENT_ENV_FLAGS,
            env_of(&[("DMR_FORCE", "1"), ("DMR_OUT", "/tmp/x")]),
        );
        assert_eq!(merged, ["keygen", "--out", "/tmp/x", "--force"]);
        let merged = with_env(
            vec!["keygen".into()],
            AGENT_ENV_FLAGS,
            env_of(&[("DMR_FORCE", "0")]),
        );
        assert_eq!(merged, ["keygen"]);
    }

    #[test]
    fn nested_subcommands_take_their_own_env_flags() {
        let env = env_of(&[("DMR_KEY", "/op.key"), ("DMR_OUT", "/tmp/op")]);
        let merged = with_env(
            vec!["directory".into(), "sign".into(), "agents.json".into()],
            SERVER_ENV_FLAGS,
            &env,
        );
        assert_eq!(
            merged,
            ["directory", "sign", "agents.json", "--key", "/op.key"]
        );
        let cli: ServerCli = parse("dmr-server", merged, &[], |_| None);
        let ServerCommand::Directory(DirectoryArgs {
            command: DirectoryCommand::Sign(a),
        }) = cli.command
        else {
            panic!("expected directory sign");
        };
        assert_eq!(a.key, PathBuf::from("/op.key"));
        // The agent's own DMR_KEY / DMR_ID never fill in the peer being confirmed.
        let merged = with_env(
            vec!["trust".into(), "confirm".into()],
            AGENT_ENV_FLAGS,
            env_of(&[
                ("DMR_KEY", "/me.key"),
                ("DMR_ID", "me"),
                ("DMR_STATE_DIR", "/s"),
            ]),
        );
        assert_eq!(merged, ["trust", "confirm", "--state-dir", "/s"]);
    }

    #[test]
    fn lists_split_on_commas_and_repeats() {
        let v = split_list(&[
            "ws://a/v1/ws, ws://b/v1/ws".into(),
            "ws://c/v1/ws".into(),
            ",".into(),
        ]);
        assert_eq!(v, ["ws://a/v1/ws", "ws://b/v1/ws", "ws://c/v1/ws"]);
    }
}
