//! DMR — Distributed Message Rooms.
//!
//! Agents (one per agency) pass end-to-end encrypted envelopes to each other through a
//! stateless relay server backed by RabbitMQ. The modules, from the wire inwards:
//!
//! - [`protocol`]: ids, the envelope and the frames agents and servers exchange.
//! - [`crypto`]: keys, PEM files, HPKE sealing and the handshake proof.
//! - [`directory`]: the list of agents and their public keys, as CentOps serves it.
//! - [`config`]: command-line flags and their `DMR_*` environment variables.

pub mod config;
pub mod crypto;
pub mod directory;
pub mod logging;
pub mod protocol;
