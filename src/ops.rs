//! Operator commands beside `run`: `dmr-server dlq …`, `dmr-server rabbitmq setup`,
//! `dmr-server health`, and what both binaries say about their build (`--version`,
//! `dmr_build_info`).

mod dlq;
mod health;
mod setup;

pub use dlq::dlq_command;
pub use health::health_command;
pub use setup::{check_policies, setup_command};

/// The package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit built from, when known at build time (see `build.rs`).
pub const GIT_SHA: Option<&str> = option_env!("DMR_GIT_SHA");

/// `dmr-server 0.1.0 (git 1a2b3c4d5e6f)`, or without the parenthesis when unknown.
pub fn version_line(program: &str) -> String {
    match GIT_SHA {
        Some(sha) => format!("{program} {VERSION} (git {sha})"),
        None => format!("{program} {VERSION}"),
    }
}

/// Prints the version and exits when `--version` (or `-V`) comes before any subcommand,
/// as argh has no such flag of its own.
pub fn exit_on_version(program: &str, args: &[String]) {
    if matches!(
        args.first().map(String::as_str),
        Some("--version" | "-V" | "version")
    ) {
        println!("{}", version_line(program));
        std::process::exit(0);
    }
}

/// Errors of the operator commands are shown as they are and exit 1.
pub type CommandResult = Result<(), Box<dyn std::error::Error>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_line_names_program_and_version() {
        let line = version_line("dmr-server");
        assert!(line.starts_with(&format!("dmr-server {VERSION}")), "{line}");
    }
}
