//! Broker URLs: parsed once ([`BrokerUrl::new`] refuses what the AMQP client cannot use), shown redacted
//! (`Display` and `Debug` never print the password), taken apart for clients that speak AMQP themselves, and
//! carrying the TLS material an `amqps://` URL is connected with; and lists of them, one per node of a cluster
//! ([`parse_broker_urls`], tried in [`random_order`]).

use crate::error::BrokerError;
use crate::tls::Tls;
use std::fmt;
use std::sync::Arc;

/// The URL the agent and `service-setup` use when neither `--broker-url` nor `AMQP_URL` says otherwise.
pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An AMQP URL (and, for `amqps://`, the CA and client certificate to connect with). `Display` never shows the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(String, Arc<Tls>);

impl BrokerUrl {
    pub fn new(url: impl Into<String>) -> Result<Self, BrokerError> {
        let url = url.into();
        let parsed: Result<lapin::uri::AMQPUri, String> = url.parse();
        match parsed {
            Ok(_) => Ok(Self(url, Arc::default())),
            Err(e) => Err(BrokerError::BadUrl(redact(&url), e)),
        }
    }

    /// This URL connected with `tls` (a private CA, a client certificate) when it is `amqps://`.
    pub fn with_tls(mut self, tls: Tls) -> BrokerUrl {
        self.1 = Arc::new(tls);
        self
    }

    /// The TLS material (the default when none was given: the system's CAs, no client certificate).
    pub fn tls(&self) -> &Tls {
        &self.1
    }

    /// Whether this is an `amqps://` URL: TLS with the server's certificate verified, never plaintext.
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("amqps://")
    }

    /// The full URL, credentials included: only for handing to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Host, port, credentials and vhost, for a client that speaks AMQP without lapin (the agent's raw reader).
    pub fn parts(&self) -> UrlParts {
        let uri: lapin::uri::AMQPUri = self
            .0
            .parse()
            .expect("a BrokerUrl was parsed when it was made");
        UrlParts {
            tls: uri.scheme == lapin::uri::AMQPScheme::AMQPS,
            external: uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External),
            host: uri.authority.host,
            port: uri.authority.port,
            user: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
            vhost: uri.vhost,
        }
    }

    /// The node this URL names, `host:port` (no credentials): what logs and status say an agent is connected to.
    pub fn node(&self) -> String {
        let parts = self.parts();
        format!("{}:{}", parts.host, parts.port)
    }

    /// This URL with `heartbeat=secs` added, unless the URL already sets a heartbeat (the operator's choice wins).
    pub fn with_heartbeat(&self, secs: u16) -> BrokerUrl {
        if self.0.contains("heartbeat=") {
            return self.clone();
        }
        let sep = if self.0.contains('?') { '&' } else { '?' };
        BrokerUrl(format!("{}{sep}heartbeat={secs}", self.0), self.1.clone())
    }
}

/// The broker URLs in `values`: each value one URL or several separated by commas (a comma inside a password
/// is written `%2C`), in the order given. At least one is required; a bad one is refused (redacted).
pub fn parse_broker_urls<S: AsRef<str>>(values: &[S]) -> Result<Vec<BrokerUrl>, BrokerError> {
    let urls = values
        .iter()
        .flat_map(|v| v.as_ref().split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(BrokerUrl::new)
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(BrokerError::BadUrl(
            String::new(),
            "no broker URL given: pass at least one amqp:// or amqps:// URL".into(),
        ));
    }
    Ok(urls)
}

/// `urls` shuffled (a fresh random order at every call), so that many clients given the same list of a
/// cluster's nodes spread over them instead of all connecting to the first.
pub fn random_order(urls: &[BrokerUrl]) -> Vec<BrokerUrl> {
    use std::hash::{BuildHasher, Hasher};
    let mut out = urls.to_vec();
    let state = std::collections::hash_map::RandomState::new();
    for i in (1..out.len()).rev() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        let j = (h.finish() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

/// The pieces of a [`BrokerUrl`]; `password` is secret (never log it).
pub struct UrlParts {
    /// `amqps://`: TLS, always verified.
    pub tls: bool,
    /// `auth_mechanism=external`: the client certificate identifies the user (no password is sent).
    pub external: bool,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

/// `amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;
    fn check(url: &str, expected: &str) {
        assert_eq!(redact(url), expected);
    }

    #[test]
    fn redacts_passwords() {
        check(
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://guest:***@127.0.0.1:5672/%2f",
        );
        check(
            "amqps://u:p%40ss@h/v?heartbeat=5",
            "amqps://u:***@h/v?heartbeat=5",
        );
        check("amqp://127.0.0.1:5672/%2f", "amqp://127.0.0.1:5672/%2f");
        check("amqp://user@h/", "amqp://user:***@h/");
        let url = BrokerUrl::new("amqp://a:secret@h:5672/%2f").unwrap();
        assert!(!format!("{url} {url:?}").contains("secret"));
    }

    #[test]
    fn heartbeat_is_added_once() {
        let url = BrokerUrl::new("amqp://h:5672/%2f").unwrap();
        assert_eq!(
            url.with_heartbeat(5).expose(),
            "amqp://h:5672/%2f?heartbeat=5"
        );
        let url = BrokerUrl::new("amqp://h/%2f?frame_max=8192").unwrap();
        assert_eq!(
            url.with_heartbeat(5).expose(),
            "amqp://h/%2f?frame_max=8192&heartbeat=5"
        );
        let url = BrokerUrl::new("amqp://h/%2f?heartbeat=9").unwrap();
        assert_eq!(url.with_heartbeat(5).expose(), "amqp://h/%2f?heartbeat=9");
    }

    #[test]
    fn url_lists() {
        let urls = parse_broker_urls(&[
            "amqp://a:1@h1:5681/%2f, amqp://a:1@h2:5682/%2f",
            "amqp://h3/%2f",
        ])
        .unwrap();
        let nodes: Vec<_> = urls.iter().map(BrokerUrl::node).collect();
        assert_eq!(nodes, ["h1:5681", "h2:5682", "h3:5672"]);
        assert!(parse_broker_urls(&[" , "]).is_err());
        let err = parse_broker_urls(&["amqp://h/%2f,http://u:secret@h"]).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        // Every order is a permutation, and more than one order turns up.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let order: Vec<_> = random_order(&urls).iter().map(BrokerUrl::node).collect();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, ["h1:5681", "h2:5682", "h3:5672"]);
            seen.insert(order);
        }
        assert!(seen.len() > 1, "{seen:?}");
    }

    #[test]
    fn bad_url_is_refused_without_leaking() {
        let err = BrokerUrl::new("http://u:secret@h").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
