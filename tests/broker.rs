//! The broker module against the real RabbitMQ on 127.0.0.1:5672 (or `DMR_TEST_AMQP_URL`).
//!
//! Each test works under its own queue prefix and connection name and deletes what it
//! declared, even when it fails. RabbitMQ is part of the test environment: when it is not
//! reachable the tests fail and say so.

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use dmr::broker::{Broker, BrokerError, Consumer, Delivery, Topology};
use dmr::protocol::{AgentId, Header, Kind, MessageId};

const MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";

fn amqp_url() -> String {
    std::env::var("DMR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `fut`, or `None` after `secs` seconds.
async fn timeout<T>(secs: f64, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        async_io::Timer::after(Duration::from_secs_f64(secs)).await;
        None
    })
    .await
}

fn agent(name: &str) -> AgentId {
    AgentId::new(name).unwrap()
}

fn header(sender: &AgentId, recipient: &AgentId) -> Header {
    Header {
        id: MessageId::random(),
        sender: sender.clone(),
        recipient: recipient.clone(),
        created_at_ms: 1_700_000_000_000,
        kind: Kind::chat_message(),
        seq: 0,
    }
}

/// A connected broker under a fresh prefix; dropping it deletes the prefix's topology.
struct Fixture {
    broker: Broker,
    agents: Vec<AgentId>,
    name: String,
}

impl Fixture {
    async fn new(delivery_limit: u32) -> Fixture {
        let _ = env_logger::builder().is_test(true).try_init();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let topology = Topology {
            prefix: format!("test-broker-{tag}."),
            message_ttl_ms: 60_000,
            delivery_limit,
        };
        let name = format!("test-broker-{tag}");
        // Queue settings come from the policy `dmr-server rabbitmq setup` applies.
        let admin = dmr::rabbitmq_admin::Admin::new(MANAGEMENT_URL).unwrap();
        admin
            .put_policy("/", &topology.agent_policy_name(), &topology.agent_policy())
            .await
            .expect("the RabbitMQ management API (scripts/ensure-rabbitmq.sh enables it)");
        let broker = Broker::start_named(vec![amqp_url()], topology, &name).unwrap();
        if timeout(10.0, broker.connected()).await.is_none() {
            panic!(
                "RabbitMQ is not reachable at {} within 10 s: start it (scripts/rabbitmq-setup.sh) \
                 or point DMR_TEST_AMQP_URL at one",
                amqp_url().replace("guest:guest", "guest:***")
            );
        }
        Fixture {
            broker,
            agents: Vec::new(),
            name,
        }
    }

    async fn declare(&mut self, names: &[&str]) -> Vec<AgentId> {
        let agents: Vec<AgentId> = names.iter().map(|n| agent(n)).collect();
        self.agents.extend(agents.iter().cloned());
        self.broker.declare_agents(&agents).await.unwrap();
        agents
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let broker = self.broker.clone();
        let agents = std::mem::take(&mut self.agents);
        smol::block_on(async move {
            if let Ok(admin) = dmr::rabbitmq_admin::Admin::new(MANAGEMENT_URL) {
                let name = broker.topology().agent_policy_name();
                let _ = admin.delete_policy("/", &name).await;
            }
            if timeout(10.0, broker.connected()).await.is_some() {
                if let Err(e) = broker.delete_topology(&agents).await {
                    eprintln!("cleanup failed: {e}");
                }
            }
            broker.close().await;
        });
    }
}

async fn next(consumer: &Consumer, secs: f64) -> Option<Delivery> {
    timeout(secs, consumer.next()).await.flatten()
}

#[test]
fn publish_consume_ack_round_trip() {
    smol::block_on(async {
        let mut f = Fixture::new(10).await;
        let ids = f.declare(&["alice", "bob"]).await;
        let (alice, bob) = (&ids[0], &ids[1]);
        let h = header(alice, bob);
        f.broker
            .publish(&h, b"sealed envelope".to_vec())
            .await
            .unwrap();
        assert_eq!(f.broker.queue_depth(bob).await.unwrap(), 1);

        let consumer = f.broker.consume(bob, 10).await.unwrap();
        let d = next(&consumer, 5.0).await.expect("no delivery within 5 s");
        assert_eq!(d.body, b"sealed envelope");
        assert_eq!(d.message_id.as_deref(), Some(h.id.0.to_string().as_str()));
        assert_eq!(d.sender.as_deref(), Some("alice"));
        assert_eq!(d.recipient.as_deref(), Some("bob"));
        assert!(!d.redelivered);
        consumer.ack(d.tag).await.unwrap();
        consumer.close().await;
        assert_eq!(f.broker.queue_depth(bob).await.unwrap(), 0);
        assert_eq!(f.broker.queue_depth(alice).await.unwrap(), 0);
        assert!(matches!(
            f.broker.queue_depth(&agent("nobody")).await,
            Err(BrokerError::NoQueue(_))
        ));
        // A failed passive declare must not spoil later operations.
        assert_eq!(f.broker.dlq_depth().await.unwrap(), 0);

        // Many concurrent publishes each get their own confirm.
        let sends = (0..50).map(|i| {
            let broker = f.broker.clone();
            let h = header(alice, bob);
            smol::spawn(async move { broker.publish(&h, vec![i]).await })
        });
        for send in sends.collect::<Vec<_>>() {
            send.await.unwrap();
        }
        assert_eq!(f.broker.queue_depth(bob).await.unwrap(), 50);
    });
}

#[test]
fn publish_to_undeclared_recipient_is_refused() {
    smol::block_on(async {
        let mut f = Fixture::new(10).await;
        let ids = f.declare(&["alice"]).await;
        let started = Instant::now();
        let err = f
            .broker
            .publish(&header(&ids[0], &agent("nobody")), vec![1])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BrokerError::Refused(r) if r.contains("nobody")),
            "{err}"
        );
        assert!(!err.is_retryable());
        assert!(started.elapsed() < Duration::from_secs(5));
        // The channel still works after a return.
        f.broker
            .publish(&header(&ids[0], &ids[0]), vec![2])
            .await
            .unwrap();
    });
}

#[test]
fn nacked_message_ends_in_the_dlq_after_the_delivery_limit() {
    smol::block_on(async {
        let mut f = Fixture::new(2).await;
        let ids = f.declare(&["alice", "bob"]).await;
        let h = header(&ids[0], &ids[1]);
        f.broker
            .publish(&h, b"undeliverable".to_vec())
            .await
            .unwrap();

        let consumer = f.broker.consume(&ids[1], 1).await.unwrap();
        let mut deliveries = 0;
        while let Some(d) = next(&consumer, 2.0).await {
            deliveries += 1;
            if deliveries > 1 {
                assert!(d.redelivered);
                assert!(
                    d.delivery_count.is_some(),
                    "x-delivery-count missing on redelivery"
                );
            }
            consumer.nack(d.tag).await.unwrap();
            assert!(
                deliveries <= 5,
                "still redelivered after {deliveries} nacks"
            );
        }
        assert!(
            deliveries >= 2,
            "only {deliveries} deliveries before dead-lettering"
        );
        consumer.close().await;

        let dlq = f.broker.consume_dlq(10).await.unwrap();
        let d = next(&dlq, 5.0)
            .await
            .expect("nothing in the DLQ within 5 s");
        assert_eq!(d.body, b"undeliverable");
        assert_eq!(d.message_id.as_deref(), Some(h.id.0.to_string().as_str()));
        dlq.ack(d.tag).await.unwrap();
        dlq.close().await;
        assert_eq!(f.broker.queue_depth(&ids[1]).await.unwrap(), 0);
    });
}

#[test]
fn closing_or_dropping_a_consumer_returns_its_unacked_messages() {
    smol::block_on(async {
        let mut f = Fixture::new(10).await;
        let ids = f.declare(&["alice", "bob"]).await;
        for i in 0..2u8 {
            f.broker
                .publish(&header(&ids[0], &ids[1]), vec![i])
                .await
                .unwrap();
        }
        let receive_both = |consumer: Consumer, redelivered: bool| async move {
            for expected in [0u8, 1] {
                let d = next(&consumer, 5.0)
                    .await
                    .expect("unacked message did not come back");
                assert_eq!(d.body, vec![expected]);
                assert_eq!(d.redelivered, redelivered);
            }
            consumer
        };
        // Closed: both messages come back.
        let first = receive_both(f.broker.consume(&ids[1], 10).await.unwrap(), false).await;
        first.close().await;
        // Dropped (outside any tokio context): they come back too.
        let second = receive_both(f.broker.consume(&ids[1], 10).await.unwrap(), true).await;
        drop(second);
        let third = f.broker.consume(&ids[1], 10).await.unwrap();
        for expected in [0u8, 1] {
            let d = next(&third, 5.0).await.expect("message lost after drop");
            assert_eq!(d.body, vec![expected]);
            assert!(d.redelivered);
            assert!(d.delivery_count.is_some());
            third.ack(d.tag).await.unwrap();
        }
        third.close().await;
    });
}

#[test]
fn a_queue_declared_with_first_round_arguments_is_used_as_it_is() {
    smol::block_on(async {
        let mut f = Fixture::new(2).await;
        // What a first-round server declared: TTL and delivery limit as queue arguments.
        let topology = f.broker.topology().clone();
        let queue = format!("{}dmr.agent.carol", topology.prefix);
        let mut old = amqprs::FieldTable::new();
        for (k, v) in [
            ("x-queue-type", amqprs::FieldValue::from("quorum")),
            ("x-single-active-consumer", amqprs::FieldValue::t(true)),
            ("x-delivery-limit", amqprs::FieldValue::l(7)),
            ("x-message-ttl", amqprs::FieldValue::l(60_000)),
        ] {
            old.insert(k.try_into().unwrap(), v);
        }
        async_compat::Compat::new(async {
            let args = amqprs::connection::OpenConnectionArguments::new(
                "127.0.0.1",
                5672,
                "guest",
                "guest",
            );
            let conn = amqprs::connection::Connection::open(&args).await.unwrap();
            let ch = conn.open_channel(None).await.unwrap();
            let declare = amqprs::channel::QueueDeclareArguments::durable_client_named(&queue)
                .arguments(old)
                .finish();
            ch.queue_declare(declare).await.unwrap();
            let _ = ch.close().await;
            let _ = conn.close().await;
        })
        .await;
        // Declaring it without those arguments is refused (406) by RabbitMQ 3.10; the
        // broker falls back to the queue as it is, binds it, and relays through it.
        let ids = f.declare(&["carol"]).await;
        assert!(f.broker.is_connected());
        f.broker
            .publish(&header(&ids[0], &ids[0]), vec![1])
            .await
            .unwrap();
        assert_eq!(f.broker.queue_depth(&ids[0]).await.unwrap(), 1);
    });
}

#[test]
fn publishing_while_not_connected_fails_at_once() {
    let _ = env_logger::builder().is_test(true).try_init();
    smol::block_on(async {
        let topology = Topology {
            prefix: "test-broker-unreachable.".into(),
            ..Topology::default()
        };
        let broker =
            Broker::start(vec!["amqp://guest:guest@127.0.0.1:1/%2f".into()], topology).unwrap();
        async_io::Timer::after(Duration::from_millis(200)).await;
        assert!(!broker.is_connected());
        assert_eq!(broker.generation(), 0);
        let started = Instant::now();
        let err = broker
            .publish(&header(&agent("a"), &agent("b")), vec![1])
            .await
            .unwrap_err();
        assert_eq!(err, BrokerError::NotConnected);
        assert!(err.is_retryable());
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(matches!(
            broker.consume(&agent("a"), 1).await,
            Err(BrokerError::NotConnected)
        ));
        assert_eq!(
            broker.declare_agents(&[agent("a")]).await,
            Err(BrokerError::NotConnected)
        );
        timeout(5.0, broker.close())
            .await
            .expect("close() hung while disconnected");
    });
}

#[test]
fn falls_over_to_the_next_url() {
    let _ = env_logger::builder().is_test(true).try_init();
    smol::block_on(async {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let topology = Topology {
            prefix: format!("test-broker-{tag}."),
            ..Topology::default()
        };
        let urls = vec![format!(
            "amqp://guest:guest@127.0.0.1:1/%2f, {}",
            amqp_url()
        )];
        let broker = Broker::start_named(urls, topology, &format!("test-broker-{tag}")).unwrap();
        timeout(10.0, broker.connected())
            .await
            .expect("did not fail over to the second URL");
        broker.delete_topology(&[]).await.unwrap();
        broker.close().await;
    });
}

#[test]
fn handles_are_shareable_between_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Broker>();
    send_sync::<Consumer>();
    send_sync::<BrokerError>();
    let broker = Broker::start(vec!["amqp://127.0.0.1:1".into()], Topology::default()).unwrap();
    let (a, h) = (agent("a"), header(&agent("a"), &agent("b")));
    send(&broker.publish(&h, vec![]));
    send(&broker.consume(&a, 1));
    send(&broker.declare_agents(&[]));
    send(&broker.queue_depth(&a));
    send(&broker.connected());
    send(&broker.close());
}

/// Closes our connection from the broker side, as an operator or a node restart would.
fn force_close(connection_name: &str) {
    // RabbitMQ 3.10 has no user_provided_name column; the name is in client_properties.
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl must be installed for this test");
    let listing = String::from_utf8_lossy(&out.stdout);
    let quoted = format!("\"{connection_name}\"");
    let pid = listing
        .lines()
        .find(|l| l.contains(&quoted))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("connection {connection_name:?} not listed:\n{listing}"));
    let status = Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &pid, "test: forced close"])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn reconnects_after_the_broker_closes_the_connection() {
    smol::block_on(async {
        let mut f = Fixture::new(10).await;
        let ids = f.declare(&["alice", "bob"]).await;
        let before = f.broker.generation();
        assert!(before >= 1);
        let consumer = f.broker.consume(&ids[1], 10).await.unwrap();
        f.broker
            .publish(&header(&ids[0], &ids[1]), vec![1])
            .await
            .unwrap();
        let d = next(&consumer, 5.0).await.unwrap();

        // Publish continuously (to alice, whom nobody consumes) while the connection is
        // forced closed: every Ok must be in the queue afterwards.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publisher = {
            let (broker, stop) = (f.broker.clone(), stop.clone());
            let h = header(&ids[1], &ids[0]);
            smol::spawn(async move {
                let (mut ok, mut unsure) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match broker.publish(&h, vec![9]).await {
                        Ok(()) => {
                            ok += 1;
                            continue;
                        }
                        Err(BrokerError::Closed(_) | BrokerError::Timeout) => unsure += 1,
                        Err(BrokerError::NotConnected) => {}
                        Err(e) => panic!("unexpected publish error: {e}"),
                    }
                    // Failures come back at once: do not starve the executor's other tasks.
                    async_io::Timer::after(Duration::from_millis(2)).await;
                }
                (ok, unsure)
            })
        };
        async_io::Timer::after(Duration::from_millis(100)).await;
        force_close(&f.name);
        // The consumer ends; its unacked message stays in the queue.
        let started = Instant::now();
        while next(&consumer, 5.0).await.is_some() {}
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "consumer did not end"
        );
        assert!(consumer.ack(d.tag).await.is_err());
        consumer.close().await;

        let started = Instant::now();
        while f.broker.generation() == before {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no reconnection within 15 s"
            );
            async_io::Timer::after(Duration::from_millis(50)).await;
        }
        timeout(5.0, f.broker.connected()).await.unwrap();
        async_io::Timer::after(Duration::from_millis(100)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ok, unsure) = publisher.await;
        let stored = f.broker.queue_depth(&ids[0]).await.unwrap();
        assert!(
            ok <= stored && stored <= ok + unsure,
            "{ok} confirmed and {unsure} unsure publishes, but {stored} stored"
        );
        eprintln!("{ok} confirmed, {unsure} unsure, {stored} stored across the forced close");
        // Queues were re-declared and publishing works again.
        f.broker
            .publish(&header(&ids[0], &ids[1]), vec![2])
            .await
            .unwrap();
        let consumer = f.broker.consume(&ids[1], 10).await.unwrap();
        assert_eq!(consumer.generation(), f.broker.generation());
        let mut bodies = Vec::new();
        while let Some(d) = next(&consumer, 2.0).await {
            bodies.push(d.body.clone());
            consumer.ack(d.tag).await.unwrap();
            if bodies.len() == 2 {
                break;
            }
        }
        bodies.sort();
        assert_eq!(bodies, vec![vec![1], vec![2]]);
        consumer.close().await;
    });
}
