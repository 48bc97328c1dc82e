//! AMQP over TLS (`amqps://`): which CAs to trust, the adaptor amqprs dials with, and why a
//! handshake failed, in words an operator can act on.
//!
//! The client configuration is the project's one (`transport::client_config`: rustls with
//! ring, `--amqp-ca-file` or the web PKI roots); amqprs only wraps it in tokio-rustls. The
//! certificate must name the URL's host. When amqprs reports a network error, [`probe`]
//! repeats the handshake alone to tell a TLS refusal from a refused login, since amqprs
//! reports both as text.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use amqprs::tls::TlsAdaptor;
use futures_rustls::rustls::{self, CertificateError, ClientConfig};
use rustls_pki_types::ServerName;

use super::url::NodeUrl;
use super::BrokerError;
use crate::net::TcpStream;
use crate::wait::with_timeout;

/// The flag naming the CA file, for error messages.
pub(super) const CA_FLAG: &str = "--amqp-ca-file";

/// The TLS settings of every `amqps://` node of a broker.
#[derive(Clone)]
pub(super) struct Tls {
    config: Arc<ClientConfig>,
    /// Whether `--amqp-ca-file` replaced the web PKI roots (the hint on an unknown issuer
    /// differs).
    private_ca: bool,
}

impl Tls {
    /// Trusts the PEM certificates in `ca_file` (one or more), or the web PKI roots.
    pub(super) fn new(ca_file: Option<&Path>) -> Result<Self, BrokerError> {
        let config = crate::transport::client_config(CA_FLAG, ca_file)
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        Ok(Self {
            config,
            private_ca: ca_file.is_some(),
        })
    }

    /// What amqprs needs to open `node` over TLS, checking the certificate against its host.
    pub(super) fn adaptor(&self, node: &NodeUrl) -> TlsAdaptor {
        TlsAdaptor::new(self.config.clone().into(), node.tls_name())
    }

    /// Performs the TLS handshake alone on `tcp`: `Ok` if it succeeds, else why not.
    pub(super) async fn probe(
        &self,
        node: &NodeUrl,
        tcp: TcpStream,
        limit: Duration,
    ) -> Result<(), BrokerError> {
        let name = ServerName::try_from(node.tls_name())
            .map_err(|_| self.refused(node, "the URL's host cannot be a certificate name"))?;
        let connector = futures_rustls::TlsConnector::from(self.config.clone());
        match with_timeout(limit, connector.connect(name, tcp)).await {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(self.refused(node, &self.explain(node, &e))),
            None => Err(self.refused(
                node,
                &format!("no TLS handshake within {} s", limit.as_secs()),
            )),
        }
    }

    fn refused(&self, node: &NodeUrl, reason: &str) -> BrokerError {
        BrokerError::Tls {
            url_without_password: node.display.clone(),
            reason: reason.to_owned(),
        }
    }

    /// Why the handshake failed and what to do about it.
    fn explain(&self, node: &NodeUrl, e: &io::Error) -> String {
        let name = node.tls_name();
        let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return format!(
                "{e} (the server ended the handshake: is port {} RabbitMQ's TLS listener?)",
                node.port
            );
        };
        match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                if self.private_ca {
                    format!(
                        "certificate verification failed: the server's certificate is not \
                         signed by a CA in {CA_FLAG}; pass the PEM file of the CA that issued it"
                    )
                } else {
                    format!(
                        "certificate verification failed: the server's certificate is not \
                         signed by a public CA; pass the PEM file of your private CA with \
                         {CA_FLAG}"
                    )
                }
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "certificate verification failed: the server's certificate is not issued for \
                 {name:?}; use a host name the certificate lists (its subjectAltName) in \
                 --amqp-url"
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => "certificate verification failed: the server's certificate has expired (or \
                  this machine's clock is wrong)"
                .to_owned(),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => "certificate verification failed: the server's certificate is not valid yet \
                  (check this machine's clock)"
                .to_owned(),
            rustls::Error::InvalidCertificate(other) => {
                format!("certificate verification failed: {other:?}")
            }
            rustls::Error::InvalidMessage(_) => format!(
                "the server did not answer in TLS: is port {} RabbitMQ's TLS listener (5671 by \
                 default), not plain AMQP (5672)?",
                node.port
            ),
            rustls::Error::AlertReceived(alert) => format!(
                "the server refused the TLS handshake ({alert:?}); check the TLS versions and \
                 ciphers RabbitMQ allows"
            ),
            other => format!("TLS handshake failed: {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(url: &str) -> NodeUrl {
        NodeUrl::parse(url).unwrap()
    }

    fn tls_error(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn failures_are_explained_with_what_to_do() {
        let public = Tls::new(None).unwrap();
        let n = node("amqps://u:hunter2@rabbit.example.org:5671/");
        let unknown = tls_error(CertificateError::UnknownIssuer.into());
        assert!(public.explain(&n, &unknown).contains(CA_FLAG));
        let private = Tls {
            private_ca: true,
            ..public.clone()
        };
        assert!(private
            .explain(&n, &unknown)
            .contains("not signed by a CA in --amqp-ca-file"));
        let name = tls_error(CertificateError::NotValidForName.into());
        assert!(public
            .explain(&n, &name)
            .contains("not issued for \"rabbit.example.org\""));
        let plain = tls_error(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert!(public.explain(&n, &plain).contains("TLS listener"));
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert!(public.explain(&n, &eof).contains("port 5671"));
        let e = public.refused(&n, &public.explain(&n, &unknown));
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
        assert!(!e.is_retryable());
    }

    #[test]
    fn a_bad_ca_file_is_a_config_error_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = Tls::new(Some(&missing)).err().unwrap();
        assert!(matches!(e, BrokerError::Config(_)), "{e:?}");
        assert!(e.to_string().contains("cannot read --amqp-ca-file"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let e = Tls::new(Some(&empty)).err().unwrap();
        assert!(e.to_string().contains("--amqp-ca-file"), "{e}");
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    }
}
