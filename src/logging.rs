//! Log set-up shared by both binaries: `RUST_LOG` filters, `info` by default.

/// Initialises `env_logger` once; later calls are ignored.
pub fn init() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}
