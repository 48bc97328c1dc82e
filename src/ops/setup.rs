//! `dmr-server rabbitmq setup`: applies DMR's queue policies through the management API,
//! and the check `run --management-url` makes at start that they are there.
//!
//! Two policies per queue prefix and vhost (names and definitions in
//! [`Topology::agent_policy`] and [`Topology::dlq_policy`]): the agent queues' (TTL,
//! delivery limit, dead-lettering, overflow) and the DLQ's (retention). A `PUT` replaces a
//! policy, so running setup again is harmless and is how the values change on live queues.

use serde_json::Value;

use super::CommandResult;
use crate::broker::{vhost_of, Topology};
use crate::config::{ConfigError, RabbitmqCommand, RabbitmqSetupArgs};
use crate::rabbitmq_admin::{Admin, Policy};

/// The two policies setup applies: (name, policy, what it is for).
fn policies(topology: &Topology, dlq_retention_ms: u64) -> [(String, Policy, &'static str); 2] {
    [
        (
            topology.agent_policy_name(),
            topology.agent_policy(),
            "agent queues: TTL, delivery limit, dead-lettering",
        ),
        (
            topology.dlq_policy_name(),
            topology.dlq_policy(dlq_retention_ms),
            "dead-letter queue: retention",
        ),
    ]
}

/// Runs `dmr-server rabbitmq …`.
pub fn setup_command(command: &RabbitmqCommand) -> CommandResult {
    let RabbitmqCommand::Setup(args) = command;
    smol::block_on(setup(args))
}

async fn setup(args: &RabbitmqSetupArgs) -> CommandResult {
    for (flag, value) in [
        ("--message-ttl", args.message_ttl),
        ("--delivery-limit", args.delivery_limit.into()),
        ("--dlq-retention", args.dlq_retention),
    ] {
        if value == 0 {
            return Err(ConfigError::TooSmall { flag, min: "1" }.into());
        }
    }
    let vhost = match &args.vhost {
        Some(v) => v.clone(),
        None => vhost_of(std::slice::from_ref(&args.amqp_url))?,
    };
    let topology = Topology {
        prefix: args.queue_prefix.clone(),
        message_ttl_ms: args.message_ttl.saturating_mul(1000),
        delivery_limit: args.delivery_limit,
    };
    let admin = Admin::new(&args.management_url)?;
    let retention_ms = args.dlq_retention.saturating_mul(1000);
    for (name, policy, what) in policies(&topology, retention_ms) {
        admin.put_policy(&vhost, &name, &policy).await?;
        let definition = Value::Object(policy.definition.clone());
        println!(
            "policy {name:?} on vhost {vhost:?} ({what}): pattern {} {definition}",
            policy.pattern
        );
    }
    println!(
        "done; check with: rabbitmqctl -p {vhost} list_policies (applies to live queues at once)"
    );
    Ok(())
}

/// At start of `run --management-url`: logs an ERROR for each missing policy (queues then
/// have no TTL, no delivery limit and no dead-lettering) and a WARN where the policy and
/// `run`'s own `--message-ttl`/`--delivery-limit` disagree. Never fails the start.
pub async fn check_policies(management_url: &str, amqp_urls: &[String], topology: &Topology) {
    let checked = async {
        let admin = Admin::new(management_url)?;
        let vhost = vhost_of(amqp_urls)?;
        // The DLQ's retention is the operator's choice: only its presence is checked.
        for (name, expected, what) in policies(topology, 0) {
            match admin.policy(&vhost, &name).await? {
                None => log::error!(
                    "RabbitMQ has no policy {name:?} on vhost {vhost:?} ({what}): those queues \
                     run without it. Apply it: dmr-server rabbitmq setup --management-url URL \
                     --queue-prefix {:?} (docs/OPERATIONS.md, \"Queue settings by policy\")",
                    topology.prefix
                ),
                Some(found) => compare(&name, &found, &expected, name.ends_with("dmr-agents")),
            }
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    if let Err(e) = checked.await {
        log::warn!("could not check the RabbitMQ policies (--management-url): {e}");
    }
}

/// Warns about a policy whose settings differ from what `run` was told.
fn compare(name: &str, found: &Value, expected: &Policy, check_values: bool) {
    if found["pattern"].as_str() != Some(expected.pattern.as_str()) {
        log::warn!(
            "policy {name:?} has pattern {} instead of {:?}: it may not apply to this server's \
             queues; re-run dmr-server rabbitmq setup",
            found["pattern"],
            expected.pattern
        );
    }
    if !check_values {
        return;
    }
    for (key, flag) in [
        ("message-ttl", "--message-ttl (ms)"),
        ("delivery-limit", "--delivery-limit"),
    ] {
        let live = &found["definition"][key];
        let mine = &expected.definition[key];
        if live != mine {
            log::warn!(
                "policy {name:?} sets {key} {live} but this server has {flag} {mine}; the \
                 policy is what the queues use"
            );
        }
    }
}
