//! `dmr-server dlq list|show|replay|purge`: what is in the dead-letter queue and why, and
//! getting it out again. Only metadata is shown: the content is sealed for its recipient.

use std::time::Duration;

use serde_json::json;

use super::CommandResult;
use crate::broker::{Broker, BrokerOptions, DeadLetter, DlqSnapshot, Topology};
use crate::config::{DlqCommand, DlqReplayArgs};
use crate::wait::with_timeout;

/// How long to wait for RabbitMQ at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long without a new message means the snapshot has everything.
const IDLE: Duration = Duration::from_secs(2);

/// Runs `dmr-server dlq …`.
pub fn dlq_command(command: &DlqCommand) -> CommandResult {
    let (amqp_url, prefix, ca_file) = match command {
        DlqCommand::List(a) => (&a.amqp_url, &a.queue_prefix, &a.amqp_ca_file),
        DlqCommand::Show(a) => (&a.amqp_url, &a.queue_prefix, &a.amqp_ca_file),
        DlqCommand::Replay(a) => (&a.amqp_url, &a.queue_prefix, &a.amqp_ca_file),
        DlqCommand::Purge(a) => (&a.amqp_url, &a.queue_prefix, &a.amqp_ca_file),
    };
    if let DlqCommand::Purge(a) = command {
        if !a.yes {
            return Err(
                "dlq purge deletes every message in the dead-letter queue for good: \
                        add --yes to confirm (read them first with dmr-server dlq list)"
                    .into(),
            );
        }
    }
    let topology = Topology {
        prefix: prefix.clone(),
        ..Topology::default()
    };
    let options = BrokerOptions {
        connection_name: Some(format!("dmr-server dlq pid {}", std::process::id())),
        ca_file: ca_file.clone(),
    };
    let broker = Broker::start_with(vec![amqp_url.clone()], topology, options)?;
    smol::block_on(async {
        if with_timeout(CONNECT_TIMEOUT, broker.connected())
            .await
            .is_none()
        {
            broker.close().await;
            return Err(format!(
                "could not connect to RabbitMQ within {} s (see the log above); check --amqp-url",
                CONNECT_TIMEOUT.as_secs()
            )
            .into());
        }
        let result = run(&broker, command).await;
        broker.close().await;
        result
    })
}

async fn run(broker: &Broker, command: &DlqCommand) -> CommandResult {
    if let DlqCommand::Purge(_) = command {
        let purged = broker.dlq_purge().await?;
        println!("purged {purged} messages from the dead-letter queue");
        return Ok(());
    }
    let snapshot = broker.dlq_snapshot(IDLE).await?;
    let result = match command {
        DlqCommand::List(a) => {
            list(snapshot.messages(), a.json);
            Ok(())
        }
        DlqCommand::Show(a) => show(snapshot.messages(), &a.id, a.json),
        DlqCommand::Replay(a) => replay(broker, &snapshot, a).await,
        DlqCommand::Purge(_) => Ok(()),
    };
    // Everything not replayed goes back to the DLQ.
    snapshot.close().await;
    result
}

/// RFC 3339 for Unix seconds.
fn when(secs: Option<u64>) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs?).ok()?).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// The `list --json` object of one message (DESIGN §7 keys).
fn summary(m: &DeadLetter) -> serde_json::Value {
    json!({
        "id": m.id, "sender": m.sender, "recipient": m.recipient, "type": m.kind,
        "bytes": m.bytes, "reason": m.reason, "deaths": m.deaths,
        "firstDeathAt": when(m.first_death_at),
    })
}

fn list(messages: &[DeadLetter], as_json: bool) {
    if as_json {
        let all: Vec<_> = messages.iter().map(summary).collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    if messages.is_empty() {
        println!("the dead-letter queue is empty");
        return;
    }
    let dash = || "-".to_owned();
    println!(
        "{:<36}  {:<16}  {:<16}  {:<14}  {:>8}  {:>6}  {:<20}  REASON",
        "ID", "SENDER", "RECIPIENT", "TYPE", "BYTES", "DEATHS", "FIRST DEATH"
    );
    for m in messages {
        println!(
            "{:<36}  {:<16}  {:<16}  {:<14}  {:>8}  {:>6}  {:<20}  {}",
            m.id,
            m.sender.clone().unwrap_or_else(dash),
            m.recipient,
            m.kind.clone().unwrap_or_else(dash),
            m.bytes,
            m.deaths,
            when(m.first_death_at).unwrap_or_else(dash),
            m.reason.clone().unwrap_or_else(dash),
        );
    }
    println!("{} messages", messages.len());
}

fn show(messages: &[DeadLetter], id: &str, as_json: bool) -> CommandResult {
    let m = messages
        .iter()
        .find(|m| m.id == id)
        .ok_or_else(|| format!("no message {id} in the dead-letter queue"))?;
    if as_json {
        let mut value = summary(m);
        value["createdAt"] = json!(when(m.created_at));
        value["headers"] = m
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        println!("{value}");
        return Ok(());
    }
    let dash = || "-".to_owned();
    for (key, value) in [
        ("id", m.id.clone()),
        ("sender", m.sender.clone().unwrap_or_else(dash)),
        ("recipient", m.recipient.clone()),
        ("type", m.kind.clone().unwrap_or_else(dash)),
        ("created at", when(m.created_at).unwrap_or_else(dash)),
        ("bytes", format!("{} (sealed, not shown)", m.bytes)),
        ("reason", m.reason.clone().unwrap_or_else(dash)),
        ("deaths", m.deaths.to_string()),
        ("first death", when(m.first_death_at).unwrap_or_else(dash)),
    ] {
        println!("{key:<12} {value}");
    }
    println!("headers:");
    for (k, v) in &m.headers {
        println!("  {k}: {v}");
    }
    Ok(())
}

/// The messages `replay` selected, and the ids asked for that are not in the DLQ.
fn select<'a>(
    messages: &'a [DeadLetter],
    a: &DlqReplayArgs,
) -> Result<(Vec<&'a DeadLetter>, Vec<String>), String> {
    let ids: Vec<&String> = a.id.iter().chain(&a.ids).collect();
    if ids.is_empty() && a.recipient.is_none() && !a.all {
        return Err("say what to replay: message ids, --recipient AGENT or --all".to_owned());
    }
    let chosen = messages
        .iter()
        .filter(|m| {
            a.all
                || ids.iter().any(|id| **id == m.id)
                || a.recipient.as_deref() == Some(m.recipient.as_str())
        })
        .collect();
    let missing = ids
        .into_iter()
        .filter(|id| !messages.iter().any(|m| &m.id == *id))
        .cloned()
        .collect();
    Ok((chosen, missing))
}

async fn replay(broker: &Broker, snapshot: &DlqSnapshot, a: &DlqReplayArgs) -> CommandResult {
    let (chosen, missing) = select(snapshot.messages(), a)?;
    let mut failed = 0;
    for id in &missing {
        eprintln!("{id}: not in the dead-letter queue");
    }
    for m in &chosen {
        if a.dry_run {
            println!("would replay {} to {}", m.id, m.recipient);
            continue;
        }
        match snapshot.replay(broker, m).await {
            Ok(()) => println!("replayed {} to {}", m.id, m.recipient),
            Err(e) => {
                failed += 1;
                eprintln!("{}: not replayed, it stays in the DLQ: {e}", m.id);
            }
        }
    }
    let verb = if a.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    println!(
        "{verb} {} of {} messages",
        chosen.len() - failed,
        chosen.len()
    );
    if failed > 0 || !missing.is_empty() {
        return Err(format!("{failed} failed, {} not found", missing.len()).into());
    }
    Ok(())
}
