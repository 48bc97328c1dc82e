//! The local services' webhook for the agent scenarios: notes when each message id arrives
//! and keeps nothing else, so 64 KiB bodies cost the bench only one parse each and the
//! latency is taken at arrival, not when someone next looks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The one field of a delivered body the bench needs (the payload is skipped unread).
#[derive(serde::Deserialize)]
struct Delivered {
    id: String,
}

/// A running webhook; stops when dropped.
pub struct Webhook {
    pub addr: SocketAddr,
    arrived: Arc<Mutex<HashMap<String, Instant>>>,
    _stop: async_channel::Sender<()>,
}

impl Webhook {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let a = arrived.clone();
        std::thread::spawn(move || {
            let listener = smol::net::TcpListener::try_from(listener).unwrap();
            let handler = move |req: hyper::Request<hyper::body::Incoming>, _| {
                let a = a.clone();
                async move {
                    let body = dmr::http::read_body(req.into_body(), 8 << 20)
                        .await
                        .unwrap_or_default();
                    if let Ok(d) = serde_json::from_slice::<Delivered>(&body) {
                        a.lock().unwrap().insert(d.id, Instant::now());
                    }
                    dmr::http::json(hyper::StatusCode::OK, &serde_json::json!({"ok": true}))
                }
            };
            smol::block_on(dmr::http::serve(listener, None, handler, async move {
                let _ = stopped.recv().await;
            }));
        });
        Self {
            addr,
            arrived,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/deliver", self.addr)
    }

    /// Waits until `n` messages have arrived in all or `limit` has passed; returns how many.
    pub fn wait_for(&self, n: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        loop {
            let got = self.arrived.lock().unwrap().len();
            if got >= n || Instant::now() >= end {
                return got;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes the arrival times noted so far (the webhook starts afresh).
    pub fn take_arrivals(&self) -> HashMap<String, Instant> {
        std::mem::take(&mut *self.arrived.lock().unwrap())
    }
}
