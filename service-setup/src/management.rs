//! One broker identity per endpoint, through the RabbitMQ management HTTP API: the user `endpoint-<EP>` with a
//! generated password and exactly the permissions its agent needs (consume its tasks, read its registration,
//! publish its results and heartbeats under its own routing keys, nothing else), the URL its agent logs in
//! with, written to a file only its owner can read, and the user's removal. The HTTP client is blocking
//! (ureq), so every call runs on a blocking thread.

use crate::error::SetupError;
use endpoint_wire::{
    BrokerUrl, EndpointId, HANDBACK_EXCHANGE, HEARTBEATS_EXCHANGE, RESULTS_EXCHANGE,
};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// Where the management API listens unless `--management-url` says otherwise.
pub const DEFAULT_MANAGEMENT_URL: &str = "http://127.0.0.1:15672";

/// How long one management API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The broker user of endpoint `ep`.
pub fn endpoint_user(ep: &EndpointId) -> String {
    format!("endpoint-{ep}")
}

/// What an endpoint's user may do, as RabbitMQ permission patterns: configure nothing; write only to the
/// `results` and `heartbeats` exchanges, and there only with its own routing keys (topic permissions:
/// `<EP>.results`, `<EP>.results.<SERVICE>`, `<EP>.heartbeat`); read only its tasks queue and its registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPermissions {
    /// Which resources it may declare or delete.
    pub configure: String,
    /// Which exchanges (and queues) it may publish to.
    pub write: String,
    /// Which queues it may consume or get from (and exchanges bind from).
    pub read: String,
    /// (exchange, write pattern, read pattern) per topic exchange.
    pub topic: Vec<(String, String, String)>,
}

impl EndpointPermissions {
    /// The permissions of endpoint `ep`'s user.
    pub fn of(ep: &EndpointId) -> EndpointPermissions {
        // Endpoint ids hold only letters, digits, '_' and '-': the dots are the only characters to escape.
        let re = |name: String| name.replace('.', "\\.");
        EndpointPermissions {
            configure: "^$".into(),
            write: format!("^({RESULTS_EXCHANGE}|{HEARTBEATS_EXCHANGE}|{HANDBACK_EXCHANGE})$"),
            read: format!(
                "^({}|{})$",
                re(ep.tasks_queue()),
                re(ep.registration_queue())
            ),
            topic: vec![
                (
                    RESULTS_EXCHANGE.into(),
                    // Its shared-queue key, or its key for any service (`<EP>.results.<SERVICE>`).
                    format!("^{}(\\.[A-Za-z0-9_-]+)?$", re(ep.results_routing_key())),
                    "^$".into(),
                ),
                (
                    HEARTBEATS_EXCHANGE.into(),
                    // Its active key, or its standby key (`<EP>.heartbeat.standby`).
                    format!("^{}(\\.standby)?$", re(ep.heartbeat_routing_key())),
                    "^$".into(),
                ),
                (
                    HANDBACK_EXCHANGE.into(),
                    // A hand-back puts its own tasks back, into its own queue only.
                    format!("^{}$", re(ep.tasks_queue())),
                    "^$".into(),
                ),
            ],
        }
    }
}

/// A client of the management API, logging in as the service's broker user.
#[derive(Clone)]
pub struct Management {
    base: String,
    vhost: String,
    authorization: String,
    agent: ureq::Agent,
}

impl Management {
    /// The API at `base` (e.g. `http://127.0.0.1:15672`), for the vhost of `broker` and with its credentials.
    pub fn new(base: &str, broker: &BrokerUrl) -> Result<Management, SetupError> {
        let parts = broker.parts();
        if parts.external || parts.password.is_empty() {
            return Err(SetupError::InvalidArgument(
                "the management API needs a user and password: give them in --broker-url (or AMQP_URL)"
                    .into(),
            ));
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT));
        if let Some(ca) = broker.tls().ca_pem() {
            let certs = ureq::tls::parse_pem(ca.as_bytes())
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
                    .build(),
            );
        }
        let credentials = format!("{}:{}", parts.user, parts.password);
        Ok(Management {
            base: base.trim_end_matches('/').to_owned(),
            vhost: parts.vhost,
            authorization: format!("Basic {}", crate::base64::encode(credentials.as_bytes())),
            agent: config.build().into(),
        })
    }

    /// `method` `path` with an optional JSON body; returns the status (errors say what to check).
    async fn call(
        &self,
        method: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<u16, SetupError> {
        let this = self.clone();
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {path}");
        let shown = what.clone();
        tokio::task::spawn_blocking(move || {
            let sent = match (method, body) {
                ("PUT", Some(json)) => this
                    .agent
                    .put(&url)
                    .header("Authorization", &this.authorization)
                    .send_json(json),
                ("DELETE", _) => this
                    .agent
                    .delete(&url)
                    .header("Authorization", &this.authorization)
                    .call(),
                _ => unreachable!("only PUT with a body and DELETE are used"),
            };
            let mut response = sent.map_err(|e| SetupError::Management {
                what: shown.clone(),
                reason: format!(
                    "{e} (is the management plugin enabled? `rabbitmq-plugins enable rabbitmq_management`; else pass --management-url)"
                ),
            })?;
            let status = response.status().as_u16();
            match status {
                200..=299 | 404 => Ok(status),
                401 | 403 => Err(SetupError::Management {
                    what: shown,
                    reason: format!(
                        "the management API refused the service's user ({status}): it needs the `administrator` tag"
                    ),
                }),
                _ => {
                    let text = response.body_mut().read_to_string().unwrap_or_default();
                    Err(SetupError::Management {
                        what: shown,
                        reason: format!("HTTP {status}: {}", text.trim()),
                    })
                }
            }
        })
        .await
        .map_err(|_| SetupError::Management {
            what,
            reason: "the request's thread failed".into(),
        })?
    }

    /// Creates `ep`'s user (or sets a new password: rotation) with its permissions on the vhost, and returns
    /// the user name and the generated password.
    pub async fn create_endpoint_user(
        &self,
        ep: &EndpointId,
    ) -> Result<(String, String), SetupError> {
        let user = endpoint_user(ep);
        let password = generate_password()?;
        let perms = EndpointPermissions::of(ep);
        self.call(
            "PUT",
            format!("/api/users/{}", encode(&user)),
            Some(json!({ "password": password, "tags": "" })),
        )
        .await?;
        let vhost = encode(&self.vhost);
        self.call(
            "PUT",
            format!("/api/permissions/{vhost}/{}", encode(&user)),
            Some(json!({ "configure": perms.configure, "write": perms.write, "read": perms.read })),
        )
        .await?;
        for (exchange, write, read) in &perms.topic {
            self.call(
                "PUT",
                format!("/api/topic-permissions/{vhost}/{}", encode(&user)),
                Some(json!({ "exchange": exchange, "write": write, "read": read })),
            )
            .await?;
        }
        Ok((user, password))
    }

    /// Deletes a user; false if there was none.
    pub async fn delete_user(&self, user: &str) -> Result<bool, SetupError> {
        let status = self
            .call("DELETE", format!("/api/users/{}", encode(user)), None)
            .await?;
        Ok(status != 404)
    }
}

/// 32 random bytes from the operating system, as hex (no character a URL must escape).
fn generate_password() -> Result<String, SetupError> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| {
            SetupError::InvalidArgument(format!("cannot read /dev/urandom for a password: {e}"))
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a URL path segment or userinfo).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL an endpoint's agent logs in with: the service's scheme, host, port and vhost, the endpoint's user.
pub fn agent_url(service: &BrokerUrl, user: &str, password: &str) -> String {
    let parts = service.parts();
    let scheme = if parts.tls { "amqps" } else { "amqp" };
    let host = if parts.host.contains(':') {
        format!("[{}]", parts.host)
    } else {
        parts.host
    };
    format!(
        "{scheme}://{}:{}@{host}:{}/{}",
        encode(user),
        encode(password),
        parts.port,
        encode(&parts.vhost)
    )
}

/// Writes `url` as the only line of `path`, readable by its owner only (0600 whatever the umask), replacing
/// the file atomically.
pub fn write_credentials(path: &Path, url: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(url.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_confine_an_endpoint_to_its_names() {
        let ep = EndpointId::new("a-1").unwrap();
        let p = EndpointPermissions::of(&ep);
        assert_eq!(p.configure, "^$");
        assert_eq!(p.write, "^(results|heartbeats|handback)$");
        assert_eq!(p.read, "^(a-1\\.tasks|a-1\\.registration)$");
        assert_eq!(
            p.topic,
            vec![
                (
                    "results".into(),
                    "^a-1\\.results(\\.[A-Za-z0-9_-]+)?$".into(),
                    "^$".into()
                ),
                (
                    "heartbeats".into(),
                    "^a-1\\.heartbeat(\\.standby)?$".into(),
                    "^$".into()
                ),
                ("handback".into(), "^a-1\\.tasks$".into(), "^$".into()),
            ]
        );
    }

    #[test]
    fn agent_urls_keep_the_service_broker_and_vhost() {
        let service = BrokerUrl::new("amqps://svc:secret@broker.example:5671/prod%2Feu").unwrap();
        assert_eq!(
            agent_url(&service, "endpoint-a", "0f"),
            "amqps://endpoint-a:0f@broker.example:5671/prod%2Feu"
        );
        let service = BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        let url = agent_url(&service, "endpoint-b", "ab");
        assert_eq!(url, "amqp://endpoint-b:ab@127.0.0.1:5672/%2F");
        assert_eq!(BrokerUrl::new(url).unwrap().parts().vhost, "/");
    }

    #[test]
    fn credentials_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ea-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ep.url");
        write_credentials(&path, "amqp://u:p@h:1/v").unwrap();
        write_credentials(&path, "amqp://u:q@h:1/v").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "amqp://u:q@h:1/v\n"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(generate_password().unwrap().len(), 64);
    }
}
