//! Unix signals as an async stream: SIGHUP asks for a reload, SIGTERM/SIGINT for a
//! graceful stop. A second SIGTERM/SIGINT while stopping exits at once.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    Reload,
    Terminate,
}

/// Starts a thread that turns signals into [`Signal`]s on the returned channel.
pub(crate) fn listen() -> std::io::Result<async_channel::Receiver<Signal>> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    let (tx, rx) = async_channel::unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut terminating = false;
            for sig in signals.forever() {
                let s = if sig == SIGHUP {
                    Signal::Reload
                } else {
                    Signal::Terminate
                };
                if s == Signal::Terminate {
                    if terminating {
                        log::warn!("second stop signal: exiting now");
                        std::process::exit(130);
                    }
                    terminating = true;
                }
                if tx.send_blocking(s).is_err() {
                    return;
                }
            }
        })?;
    Ok(rx)
}
