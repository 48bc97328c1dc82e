//! Process set-up shared by both binaries: logging and the size of smol's thread pool.

/// Call first thing in `main`, before any task is spawned.
///
/// Logs go to stderr, filtered by `RUST_LOG` (`info` by default). smol's global executor
/// runs one thread unless `SMOL_THREADS` says otherwise, so it is sized to the machine's
/// cores here when the operator has not chosen.
pub fn init() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
    if std::env::var_os("SMOL_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Safe here: called before any other thread exists.
        std::env::set_var("SMOL_THREADS", cores.to_string());
    }
}
