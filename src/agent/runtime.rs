//! Where the agent's tasks run: one executor, driven by the thread that calls [`block_on`]
//! (the agent's main thread), which also polls the I/O reactor while it has nothing to run.
//!
//! Why not smol's global executor: its worker threads hand every wake-up across threads
//! (the reactor on one, the woken task on another, each hop a futex wake and a context
//! switch), which cost an idle agent far more CPU per message than the work itself. An
//! agent's work per message is a few microseconds of sealing, opening and JSON, so one
//! thread carries thousands of messages a second; disk commits still run on smol's
//! blocking pool (`smol::unblock`), off this thread.

use std::future::Future;

use crate::http::Spawner;

/// The agent's executor.
static EXECUTOR: smol::Executor<'static> = smol::Executor::new();

/// Spawns onto [`EXECUTOR`], for the HTTP server and client the agent uses.
pub(super) const SPAWNER: Spawner = Spawner::On(&EXECUTOR);

/// Spawns `future` onto the agent's executor.
pub(super) fn spawn<T: Send + 'static>(
    future: impl Future<Output = T> + Send + 'static,
) -> smol::Task<T> {
    EXECUTOR.spawn(future)
}

/// Runs `future` to completion on this thread, running the agent's tasks meanwhile.
pub(super) fn block_on<T>(future: impl Future<Output = T>) -> T {
    smol::block_on(EXECUTOR.run(future))
}
