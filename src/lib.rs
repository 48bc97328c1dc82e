//! DMR — Distributed Message Rooms.
//!
//! Agents (one per agency) pass end-to-end encrypted envelopes to each other through a
//! stateless relay server backed by RabbitMQ. The modules, from the wire inwards:
//!
//! - [`protocol`]: ids, the envelope and the frames agents and servers exchange.
//! - [`crypto`]: keys, PEM files, HPKE sealing and the handshake proof.
//! - [`directory`]: the list of agents and their public keys, as CentOps serves it.
//! - [`signing`]: the operator's Ed25519 signature over the directory (`directory keygen|sign`).
//! - [`state`]: the agent's embedded, crash-safe store (pinned keys, the replay guard).
//! - [`broker`]: RabbitMQ topology, confirmed publishing, consuming and reconnection.
//! - [`net`]: TCP on the reactor of the thread using it (tokio's in the server, async-io's
//!   elsewhere), so the server's sockets share one thread with its AMQP client.
//! - [`transport`]: plain and TLS byte streams, WebSocket limits.
//! - [`http`]: hyper on smol — the accept loop, response helpers, a small client.
//! - [`server`]: `dmr-server run` — authenticated sessions relaying through the broker.
//! - [`agent`]: `dmr-agent run` — local API, sealing, delivery to the local service.
//! - [`config`]: command-line flags and their `DMR_*` environment variables.
//! - `metrics`: Prometheus metrics of both binaries.
//! - [`runtime`]: the one executor a process's tasks run on, driven by its main thread.
//! - `signals`, [`process`]: process plumbing shared by both binaries.
//! - [`wait`], [`sync`]: deadlines, backoff and the lock policy every module shares.
//! - [`policy`], [`audit`], [`logging`]: the relay's rules and limits, its audit log, and
//!   the log format of both binaries.
//! - [`ops`], [`rabbitmq_admin`]: operator commands (`dlq`, `rabbitmq setup`, `health`,
//!   `--version`) and the RabbitMQ management API client they use.

#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod broker;
pub mod config;
pub mod crypto;
pub mod directory;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod policy;
pub mod process;
pub mod protocol;
pub mod rabbitmq_admin;
pub mod runtime;
pub mod server;
pub(crate) mod signals;
pub mod signing;
pub mod state;
pub mod sync;
pub mod transport;
pub mod wait;
