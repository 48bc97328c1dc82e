//! Process set-up shared by both binaries: logging and the size of smol's thread pool.

/// [`init_with`] the default (text) log format.
pub fn init() {
    init_with(crate::logging::LogFormat::Text)
}

/// Call first thing in `main` after the flags are parsed, before any task is spawned.
///
/// Logs go to stderr in `format`, filtered by `RUST_LOG` (`info` by default). smol's global executor
/// runs one thread unless `SMOL_THREADS` says otherwise, so it is sized to the machine's
/// cores here when the operator has not chosen.
pub fn init_with(format: crate::logging::LogFormat) {
    crate::logging::init(format);
    if std::env::var_os("SMOL_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Safe here: called before any other thread exists.
        std::env::set_var("SMOL_THREADS", cores.to_string());
    }
}
