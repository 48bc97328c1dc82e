//! `dmr-server`: parse flags, then hand over to the library.

use dmr::config::{self, ServerCli, ServerCommand};

fn main() {
    let cli: ServerCli = config::parse(
        "dmr-server",
        std::env::args().skip(1).collect(),
        config::SERVER_ENV_FLAGS,
        |k| std::env::var(k).ok(),
    );
    let result = match cli.command {
        ServerCommand::Run(args) => {
            dmr::process::init_with(args.log_format);
            dmr::server::run(args).map_err(|e| e.to_string())
        }
        ServerCommand::Directory(args) => {
            dmr::process::init();
            dmr::signing::directory_command(&args).map_err(|e| e.to_string())
        }
    };
    if let Err(e) = result {
        eprintln!("dmr-server: {e}");
        std::process::exit(1);
    }
}
