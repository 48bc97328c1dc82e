//! `dmr-agent`: parse flags, then hand over to the library.

use dmr::config::{self, AgentCli, AgentCommand};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    dmr::ops::exit_on_version("dmr-agent", &args);
    let cli: AgentCli = config::parse("dmr-agent", args, config::AGENT_ENV_FLAGS, |k| {
        std::env::var(k).ok()
    });
    let format = match &cli.command {
        AgentCommand::Run(args) => args.log_format,
        AgentCommand::Keygen(_) | AgentCommand::Trust(_) => Default::default(),
    };
    dmr::process::init_with(format);
    let result = match cli.command {
        AgentCommand::Keygen(args) => dmr::agent::keygen(&args),
        AgentCommand::Run(args) => dmr::agent::run(args),
        AgentCommand::Trust(args) => dmr::state::trust_command(&args).map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("dmr-agent: {e}");
        std::process::exit(1);
    }
}
