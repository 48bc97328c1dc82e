//! `dmr-server`: parse flags, then hand over to the library.

use dmr::config::{self, ServerCli, ServerCommand};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    dmr::ops::exit_on_version("dmr-server", &args);
    let cli: ServerCli = config::parse("dmr-server", args, config::SERVER_ENV_FLAGS, |k| {
        std::env::var(k).ok()
    });
    let result = match cli.command {
        ServerCommand::Run(args) => {
            dmr::process::init_with(args.log_format);
            dmr::server::run(args).map_err(|e| e.to_string())
        }
        ServerCommand::Directory(args) => {
            dmr::process::init();
            dmr::signing::directory_command(&args).map_err(|e| e.to_string())
        }
        ServerCommand::Rabbitmq(args) => {
            dmr::process::init();
            dmr::ops::setup_command(&args.command).map_err(|e| e.to_string())
        }
        ServerCommand::Dlq(args) => {
            // The commands' own output is what matters; connection chatter only on request.
            if std::env::var_os("RUST_LOG").is_none() {
                std::env::set_var("RUST_LOG", "warn");
            }
            dmr::process::init();
            dmr::ops::dlq_command(&args.command).map_err(|e| e.to_string())
        }
        ServerCommand::Health(args) => dmr::ops::health_command(&args).map_err(|e| e.to_string()),
    };
    if let Err(e) = result {
        eprintln!("dmr-server: {e}");
        std::process::exit(1);
    }
}
