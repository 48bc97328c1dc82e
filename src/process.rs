//! Process set-up shared by both binaries: logging.

/// [`init_with`] the default (text) log format.
pub fn init() {
    init_with(crate::logging::LogFormat::Text)
}

/// Call first thing in `main`, after the flags are parsed.
///
/// Logs go to stderr in `format`, filtered by `RUST_LOG` (`info` by default). Tasks run on
/// [`crate::runtime`], on the main thread, so there is no thread pool to size.
pub fn init_with(format: crate::logging::LogFormat) {
    crate::logging::init(format);
}
