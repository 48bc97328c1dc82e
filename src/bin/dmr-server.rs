//! `dmr-server`: parse flags, then hand over to the library.

use dmr::config::{self, ServerCli, ServerCommand};

fn main() {
    let cli: ServerCli = config::parse(
        "dmr-server",
        std::env::args().skip(1).collect(),
        config::SERVER_ENV_FLAGS,
        |k| std::env::var(k).ok(),
    );
    let ServerCommand::Run(args) = cli.command;
    dmr::process::init_with(args.log_format);
    if let Err(e) = dmr::server::run(args) {
        eprintln!("dmr-server: {e}");
        std::process::exit(1);
    }
}
