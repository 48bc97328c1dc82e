//! The raw-RabbitMQ baseline: what the broker alone costs for the relay's kind of traffic,
//! measured in the same run as the relay rows (these machines are shared and noisy).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dmr::broker::{Broker, Topology};
use dmr::protocol::{AgentId, Header, Kind, MessageId};

use crate::cpu::{CpuMeter, Watched};
use crate::report::Report;
use crate::support::{self, World, AMQP_URL};

/// Publish with confirms (`window` in flight) into the same kind of quorum queue, consume
/// with manual acks, through the project's broker module (same client, same topology).
/// Measures RabbitMQ's CPU; the client side is this process.
pub fn run(world: &World, n: usize, window: usize) -> Report {
    let topology = Topology {
        prefix: world.prefix.clone(),
        ..Topology::default()
    };
    let broker = Broker::start(vec![AMQP_URL.into()], topology).unwrap();
    let b = AgentId::new("b").unwrap();
    smol::block_on(async {
        broker.connected().await;
        broker
            .declare_agents(&[AgentId::new("a").unwrap(), b.clone()])
            .await
            .unwrap();
        let sent_at: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
        let consumer = broker.consume(&b, 256).await.unwrap();
        let body =
            support::envelope(world.agent("a"), world.agent("b"), &crate::payload()).to_bytes();
        let meter = CpuMeter::start([Watched::rabbitmq()]);
        let started = Instant::now();
        let receiver = {
            let sent_at = sent_at.clone();
            smol::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                while lat.len() < n {
                    let d = consumer.next().await.expect("consumer ended");
                    let id = MessageId(d.message_id.as_deref().unwrap().parse().unwrap());
                    if let Some(t) = sent_at.lock().unwrap().remove(&id) {
                        lat.push(t.elapsed());
                    }
                    consumer.ack(d.tag).await.unwrap();
                }
                lat
            })
        };
        let next = Arc::new(AtomicUsize::new(0));
        let publishers: Vec<_> = (0..window)
            .map(|_| {
                let (broker, next, sent_at, body) =
                    (broker.clone(), next.clone(), sent_at.clone(), body.clone());
                smol::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let header = Header {
                            id: MessageId::random(),
                            sender: AgentId::new("a").unwrap(),
                            recipient: AgentId::new("b").unwrap(),
                            created_at_ms: crate::now_ms(),
                            kind: Kind::chat_message(),
                            seq: 0,
                        };
                        sent_at.lock().unwrap().insert(header.id, Instant::now());
                        broker.publish(&header, body.clone()).await.unwrap();
                    }
                })
            })
            .collect();
        for p in publishers {
            p.await;
        }
        let latencies = receiver.await;
        let elapsed = started.elapsed();
        let cpu = meter.stop(n);
        broker.close().await;
        Report {
            name: if window == 1 {
                "raw RabbitMQ, one at a time".into()
            } else {
                "raw RabbitMQ (confirm + ack)".into()
            },
            messages: n,
            elapsed,
            latencies,
            cpu: Some(cpu),
        }
    })
}
