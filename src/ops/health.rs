//! `dmr-server health`: `GET /healthz` on the server's `--listen`, exit 0 or 1 — the
//! container `HEALTHCHECK` (a scratch image has no curl).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hyper::{Request, StatusCode};

use super::CommandResult;
use crate::config::HealthArgs;
use crate::http::Body;

/// How long the check may take (the Dockerfile gives it 5 s).
const TIMEOUT: Duration = Duration::from_secs(4);

/// The URL asked: `--url`, else `http://{listen}/healthz` with a wildcard address replaced
/// by loopback.
pub(crate) fn health_url(args: &HealthArgs) -> String {
    if let Some(url) = &args.url {
        return url.clone();
    }
    let mut addr: SocketAddr = args.listen;
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
        _ => {}
    }
    format!("http://{addr}/healthz")
}

/// Exits the process with 0 when healthy, 1 otherwise (and says why on stderr).
pub fn health_command(args: &HealthArgs) -> CommandResult {
    let url = health_url(args);
    let request = Request::get(&url)
        .body(Body::default())
        .map_err(|e| format!("--url {url}: {e}"))?;
    let answer = smol::block_on(crate::http::request(request, None, TIMEOUT));
    match answer {
        Ok((StatusCode::OK, _)) => {
            println!("healthy: {url} answered 200");
            Ok(())
        }
        Ok((status, _)) => Err(format!("unhealthy: {url} answered {status}").into()),
        Err(e) => Err(format!("unhealthy: {url}: {e}").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_asked_on_loopback() {
        let args = |listen: &str| HealthArgs {
            listen: listen.parse().unwrap(),
            url: None,
        };
        assert_eq!(
            health_url(&args("0.0.0.0:9000")),
            "http://127.0.0.1:9000/healthz"
        );
        assert_eq!(health_url(&args("[::]:9000")), "http://[::1]:9000/healthz");
        assert_eq!(
            health_url(&args("10.1.2.3:8075")),
            "http://10.1.2.3:8075/healthz"
        );
    }
}
