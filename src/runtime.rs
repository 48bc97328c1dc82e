//! Where a process's tasks run: one executor, driven by the thread that calls [`block_on`]
//! (each binary's main thread), inside a single-threaded tokio runtime whose reactor that
//! thread polls while it has nothing to run.
//!
//! Why not smol's global executor: its worker threads hand every wake-up across threads
//! (the reactor on one, the woken task on another, each hop a futex wake and a context
//! switch). Per message a server or an agent does a few microseconds of work around four
//! to eight socket events, so those hops cost more CPU than the work (issue 15 measured
//! 21–26 context switches per message in the agent, and a third of the server's CPU). One
//! thread carries tens of thousands of relayed messages a second, far beyond what RabbitMQ
//! behind it takes; disk work goes to smol's blocking pool (`smol::unblock`).
//!
//! Why tokio's reactor under smol's executor: the server relays between WebSockets and
//! amqprs, which is tokio's, so with its sockets on tokio too ([`crate::net`]) a message
//! wakes that one thread once per socket event. The agent speaks no AMQP, but tokio
//! registers a socket with epoll once, edge-triggered, where async-io re-arms it
//! (`epoll_ctl`) before every wait and reads until `EAGAIN`: each agent makes about ten
//! system calls per message fewer (issue 15). Short timers follow the same rule
//! ([`crate::wait::sleep`]).
//!
//! Code that uses the library without [`block_on`] (tests, the benchmark, operator commands
//! under `smol::block_on`) still gets its tasks run: the first [`spawn`] outside `block_on`
//! starts background threads that drive the same executor on async-io.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// The process's executor.
static EXECUTOR: smol::Executor<'static> = smol::Executor::new();

/// Set once a thread drives [`EXECUTOR`] through [`block_on`].
static DRIVEN: AtomicBool = AtomicBool::new(false);

/// Starts the background threads at most once.
static BACKGROUND: Once = Once::new();

/// Whether this thread is inside a tokio runtime, so sockets and timers made now can use
/// its reactor ([`crate::net`], [`crate::wait::sleep_until`]).
pub(crate) fn on_tokio() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

/// Spawns `future` onto the process's executor.
pub fn spawn<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> smol::Task<T> {
    if !DRIVEN.load(Ordering::Acquire) {
        drive_in_background();
    }
    EXECUTOR.spawn(future)
}

/// Runs `future` to completion on this thread, running the process's tasks meanwhile,
/// inside a single-threaded tokio runtime: the process's sockets ([`crate::net`]) and its
/// tokio tasks (the AMQP client's) then share this thread's reactor, so relaying a message
/// between them wakes no other thread. async-io's reactor keeps a thread of its own for
/// the long timers that still use it (none per message).
///
/// Call it once, from `main`, before anything is spawned: tasks spawned earlier start the
/// background threads, which then share the work (and its hops) with this one.
pub fn block_on<T>(future: impl Future<Output = T>) -> std::io::Result<T> {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    DRIVEN.store(true, Ordering::Release);
    Ok(tokio.block_on(async {
        // The executor runs as a tokio task rather than inside `block_on`'s future: a task
        // woken by another (a delivery handed over by amqprs) is then simply queued, where
        // waking `block_on`'s future makes tokio poll its reactor first, one more
        // `epoll_wait` per message.
        //
        // Unconstrained: tokio's per-task budget (128 socket operations per poll) would
        // count every smol task's I/O against this one task and make sockets answer
        // "not ready" to whichever tasks ran last; the executor yields on its own.
        let run = EXECUTOR.run(std::future::pending::<()>());
        let executor = tokio::spawn(tokio::task::coop::unconstrained(run));
        let out = future.await;
        executor.abort();
        out
    }))
}

/// Drives [`EXECUTOR`] from as many threads as the machine has cores, for the library's
/// users that never call [`block_on`].
fn drive_in_background() {
    BACKGROUND.call_once(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for i in 1..=threads {
            let started = std::thread::Builder::new()
                .name(format!("dmr-rt-{i}"))
                .spawn(|| smol::block_on(EXECUTOR.run(std::future::pending::<()>())));
            if let Err(e) = started {
                // Without a driver nothing spawned would ever run: fail loudly, now.
                panic!("cannot start the task runtime's thread: {e}");
            }
        }
    });
}
