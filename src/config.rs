//! Typed configuration from environment variables (and an optional `.env`),
//! with every default in one place. The variable names are the contract's
//! (`docs/api.md`); a bad value stops startup with one line naming it.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;

/// A configuration problem, always naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

fn bad(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        message: message.into(),
    }
}

pub use crate::storage::{DatabaseTarget, redact_password};

/// `DATABASE_URL`, parsed; an error names the variable.
pub fn parse_database_url(url: &str) -> Result<DatabaseTarget, ConfigError> {
    DatabaseTarget::parse(url).map_err(|message| bad("DATABASE_URL", message))
}

/// TLS certificate and key file paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A signing key: its `Debug` never shows the bytes, so `Config` can derive it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Browser origins allowed to call (CORS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No origin: no `Access-Control-*` header is ever sent.
    #[default]
    None,
    /// `*`: every origin.
    Any,
    /// Exactly these origins (`https://app.example`).
    List(Vec<String>),
}

impl CorsOrigins {
    fn parse(text: &str) -> Result<Self, String> {
        let origins: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .collect();
        if origins == ["*"] {
            return Ok(Self::Any);
        }
        for origin in &origins {
            let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.ends_with('/')
                && origin.parse::<http::HeaderValue>().is_ok();
            if !valid {
                return Err(format!(
                    "{origin:?} is not an origin such as https://app.example (or use * alone)"
                ));
            }
        }
        Ok(if origins.is_empty() {
            Self::None
        } else {
            Self::List(origins.into_iter().map(str::to_owned).collect())
        })
    }

    /// Whether a request from `origin` may be answered with CORS headers.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Self::None => false,
            Self::Any => true,
            Self::List(origins) => origins.iter().any(|allowed| allowed == origin),
        }
    }
}

/// Everything the server is configured with. Each field's variable and
/// default are named in its doc; the defaults themselves live in one place,
/// `Config::defaults`, which the parser and the tests both start from.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`; default `sqlite://backend.db`.
    pub database: DatabaseTarget,
    /// `AI_MESSAGE_HOST`; default `0.0.0.0`.
    pub host: IpAddr,
    /// `AI_MESSAGE_PORT`; default 8000 (0 lets the OS pick one, for tests).
    pub port: u16,
    /// `AI_MESSAGE_DOMAIN`: public name, the `iss` of every access token; default `localhost`.
    pub domain: String,
    /// `AI_MESSAGE_SSL_CERT` / `AI_MESSAGE_SSL_KEY`; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// `AI_MESSAGE_SECRET_KEY`: the HS256 key. `None` (the default) means
    /// "generate and keep beside the SQLite file".
    pub secret_key: Option<Secret>,
    /// `AI_MESSAGE_ACCESS_TOKEN_TTL`; default 30 minutes.
    pub access_token_ttl: Duration,
    /// `AI_MESSAGE_REFRESH_TOKEN_TTL`; default 7 days.
    pub refresh_token_ttl: Duration,
    /// `AI_MESSAGE_BCRYPT_COST`; default 12.
    pub bcrypt_cost: u32,
    /// `AI_MESSAGE_LOGIN_ACCOUNT_FAILURES`; default 10.
    pub login_account_failures: u32,
    /// `AI_MESSAGE_LOGIN_ADDRESS_FAILURES`; default 50.
    pub login_address_failures: u32,
    /// `AI_MESSAGE_TRUSTED_PROXIES`; default none.
    pub trusted_proxies: Vec<IpNet>,
    /// `AI_MESSAGE_MAX_CONCURRENT_CALLS`; default 1024.
    pub max_concurrent_calls: usize,
    /// `AI_MESSAGE_MAX_PENDING_HASHES`; default 64.
    pub max_pending_hashes: usize,
    /// `AI_MESSAGE_REFLECTION`; default true.
    pub reflection: bool,
    /// `AI_MESSAGE_CORS_ORIGINS`: origins allowed to call from a browser
    /// (comma-separated, or `*`); default none.
    pub cors_origins: CorsOrigins,
    /// `AI_MESSAGE_SIGNING_KEY_FILE`: a PEM Ed25519 private key; access
    /// tokens are then EdDSA with a `kid`, and HS256 is refused. Default none.
    pub signing_key_file: Option<PathBuf>,
    /// `AI_MESSAGE_VERIFY_KEY_FILES`: further Ed25519 keys (PEM, public or
    /// private, comma-separated) whose tokens are still accepted. Default none.
    pub verify_key_files: Vec<PathBuf>,
    /// `AI_MESSAGE_VALIDATION_CACHE_TTL`: ValidateToken's `cache_until` is at
    /// most this far ahead; default 1 s.
    pub validation_cache_ttl: Duration,
    /// `AI_MESSAGE_EVENT_RETENTION`: how long message events stay
    /// replayable by StreamMessages' `after_event_id`; default 7 days.
    pub event_retention: Duration,
    /// `AI_MESSAGE_METRICS_ADDR`: where `GET /metrics` listens; default none (off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `AI_MESSAGE_NATS_URL`: the NATS server (`nats://host:port`) that
    /// carries events between instances instead of the database's own
    /// channel; default none.
    pub nats_url: Option<NatsUrl>,
    /// HTTP/2 and gRPC limits (additions to the contract's variables).
    pub transport: TransportLimits,
}

/// Connection-level limits, each from its own `AI_MESSAGE_*` variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// `AI_MESSAGE_REQUEST_TIMEOUT`: deadline of a unary call (streams are not cut); 30 s.
    pub request_timeout: Duration,
    /// `AI_MESSAGE_MAX_STREAMS_PER_CONNECTION`: concurrent HTTP/2 streams per connection; 256.
    pub max_streams_per_connection: u32,
    /// `AI_MESSAGE_MAX_HEADER_LIST_BYTES`: largest request header block; 16384.
    pub max_header_list_bytes: u32,
    /// `AI_MESSAGE_KEEPALIVE_INTERVAL` / `AI_MESSAGE_KEEPALIVE_TIMEOUT`: HTTP/2
    /// PINGs that find dead peers (also TCP keepalive); 30 s / 10 s.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// `AI_MESSAGE_HANDSHAKE_TIMEOUT` (formerly `AI_MESSAGE_TLS_HANDSHAKE_TIMEOUT`,
    /// still read): from accept, a connection must finish TLS and send its
    /// first request within this, or it is closed; 10 s.
    pub handshake_timeout: Duration,
    /// `AI_MESSAGE_CONNECTION_IDLE_TIMEOUT`: a connection with no call in
    /// progress for this long is closed (GOAWAY); 5 minutes.
    pub idle_timeout: Duration,
    /// `AI_MESSAGE_MAX_CONNECTIONS`: open connections at most; one more is closed at once; 10,000.
    pub max_connections: usize,
    /// `AI_MESSAGE_SHUTDOWN_GRACE`: the longest a shutdown waits for running calls; 30 s.
    pub shutdown_grace: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_streams_per_connection: 256,
            max_header_list_bytes: 16 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

pub const DEFAULT_DATABASE_URL: &str = "sqlite://backend.db";
pub const MIN_SECRET_KEY_BYTES: usize = 32;

impl Config {
    /// Reads the process environment (after loading `.env`, if present).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Every default, for the given database: what an unset variable means.
    pub fn defaults(database: DatabaseTarget) -> Self {
        Self {
            database,
            host: IpAddr::from([0, 0, 0, 0]),
            port: 8000,
            domain: "localhost".to_owned(),
            tls: None,
            secret_key: None,
            access_token_ttl: Duration::from_secs(30 * 60),
            refresh_token_ttl: Duration::from_secs(7 * 24 * 3600),
            bcrypt_cost: 12,
            login_account_failures: 10,
            login_address_failures: 50,
            trusted_proxies: Vec::new(),
            max_concurrent_calls: 1024,
            max_pending_hashes: 64,
            reflection: true,
            cors_origins: CorsOrigins::None,
            signing_key_file: None,
            verify_key_files: Vec::new(),
            validation_cache_ttl: Duration::from_secs(1),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            metrics_addr: None,
            nats_url: None,
            transport: TransportLimits::default(),
        }
    }

    /// Builds the configuration from any variable source; `lookup` returns
    /// `None` for an unset variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let database = parse_database_url(
            get("DATABASE_URL")
                .as_deref()
                .unwrap_or(DEFAULT_DATABASE_URL),
        )?;
        let defaults = Self::defaults(database.clone());
        let duration = |variable: &'static str, default: Duration| match get(variable) {
            Some(text) => parse_ttl(&text).map_err(|m| bad(variable, m)),
            None => Ok(default),
        };
        let number = |variable: &'static str, default: u32| {
            parse_number(get(variable), variable, default, 1..=1_000_000)
        };
        let count = |variable: &'static str, default: usize| {
            parse_number(get(variable), variable, default, 1..=1_000_000)
        };

        let host = match get("AI_MESSAGE_HOST") {
            Some(host) => host
                .trim()
                .parse()
                .map_err(|_| bad("AI_MESSAGE_HOST", format!("{host:?} is not an IP address")))?,
            None => defaults.host,
        };
        let secret_key = match lookup("AI_MESSAGE_SECRET_KEY") {
            Some(key) if key.len() >= MIN_SECRET_KEY_BYTES => Some(Secret(key.into_bytes())),
            Some(_) => {
                return Err(bad(
                    "AI_MESSAGE_SECRET_KEY",
                    format!("must be at least {MIN_SECRET_KEY_BYTES} bytes"),
                ));
            }
            // With a signing key file the HS256 secret is not used.
            None if matches!(database, DatabaseTarget::Postgres(_))
                && get("AI_MESSAGE_SIGNING_KEY_FILE").is_none() =>
            {
                return Err(bad(
                    "AI_MESSAGE_SECRET_KEY",
                    "must be set when DATABASE_URL is PostgreSQL",
                ));
            }
            None => defaults.secret_key,
        };
        let transport_defaults = &defaults.transport;
        let transport = TransportLimits {
            request_timeout: duration(
                "AI_MESSAGE_REQUEST_TIMEOUT",
                transport_defaults.request_timeout,
            )?,
            max_streams_per_connection: number(
                "AI_MESSAGE_MAX_STREAMS_PER_CONNECTION",
                transport_defaults.max_streams_per_connection,
            )?,
            max_header_list_bytes: parse_number(
                get("AI_MESSAGE_MAX_HEADER_LIST_BYTES"),
                "AI_MESSAGE_MAX_HEADER_LIST_BYTES",
                transport_defaults.max_header_list_bytes,
                1024..=1024 * 1024,
            )?,
            keepalive_interval: duration(
                "AI_MESSAGE_KEEPALIVE_INTERVAL",
                transport_defaults.keepalive_interval,
            )?,
            keepalive_timeout: duration(
                "AI_MESSAGE_KEEPALIVE_TIMEOUT",
                transport_defaults.keepalive_timeout,
            )?,
            handshake_timeout: duration(
                "AI_MESSAGE_HANDSHAKE_TIMEOUT",
                duration(
                    "AI_MESSAGE_TLS_HANDSHAKE_TIMEOUT",
                    transport_defaults.handshake_timeout,
                )?,
            )?,
            idle_timeout: duration(
                "AI_MESSAGE_CONNECTION_IDLE_TIMEOUT",
                transport_defaults.idle_timeout,
            )?,
            max_connections: parse_number(
                get("AI_MESSAGE_MAX_CONNECTIONS"),
                "AI_MESSAGE_MAX_CONNECTIONS",
                transport_defaults.max_connections,
                1..=10_000_000,
            )?,
            shutdown_grace: duration(
                "AI_MESSAGE_SHUTDOWN_GRACE",
                transport_defaults.shutdown_grace,
            )?,
        };
        Ok(Self {
            host,
            port: parse_number(
                get("AI_MESSAGE_PORT"),
                "AI_MESSAGE_PORT",
                defaults.port,
                0..=65535,
            )?,
            domain: get("AI_MESSAGE_DOMAIN").unwrap_or_else(|| defaults.domain.clone()),
            tls: tls_files(get("AI_MESSAGE_SSL_CERT"), get("AI_MESSAGE_SSL_KEY"))?,
            secret_key,
            access_token_ttl: duration("AI_MESSAGE_ACCESS_TOKEN_TTL", defaults.access_token_ttl)?,
            refresh_token_ttl: duration(
                "AI_MESSAGE_REFRESH_TOKEN_TTL",
                defaults.refresh_token_ttl,
            )?,
            bcrypt_cost: parse_number(
                get("AI_MESSAGE_BCRYPT_COST"),
                "AI_MESSAGE_BCRYPT_COST",
                defaults.bcrypt_cost,
                4..=31,
            )?,
            login_account_failures: number(
                "AI_MESSAGE_LOGIN_ACCOUNT_FAILURES",
                defaults.login_account_failures,
            )?,
            login_address_failures: number(
                "AI_MESSAGE_LOGIN_ADDRESS_FAILURES",
                defaults.login_address_failures,
            )?,
            trusted_proxies: match get("AI_MESSAGE_TRUSTED_PROXIES") {
                Some(list) => {
                    parse_networks(&list).map_err(|m| bad("AI_MESSAGE_TRUSTED_PROXIES", m))?
                }
                None => defaults.trusted_proxies.clone(),
            },
            max_concurrent_calls: count(
                "AI_MESSAGE_MAX_CONCURRENT_CALLS",
                defaults.max_concurrent_calls,
            )?,
            max_pending_hashes: count(
                "AI_MESSAGE_MAX_PENDING_HASHES",
                defaults.max_pending_hashes,
            )?,
            reflection: match get("AI_MESSAGE_REFLECTION") {
                Some(text) => parse_bool(&text).map_err(|m| bad("AI_MESSAGE_REFLECTION", m))?,
                None => defaults.reflection,
            },
            cors_origins: match get("AI_MESSAGE_CORS_ORIGINS") {
                Some(text) => {
                    CorsOrigins::parse(&text).map_err(|m| bad("AI_MESSAGE_CORS_ORIGINS", m))?
                }
                None => defaults.cors_origins.clone(),
            },
            signing_key_file: get("AI_MESSAGE_SIGNING_KEY_FILE")
                .map(|path| PathBuf::from(path.trim())),
            verify_key_files: get("AI_MESSAGE_VERIFY_KEY_FILES")
                .map(|list| {
                    list.split(',')
                        .map(str::trim)
                        .filter(|path| !path.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
            validation_cache_ttl: duration(
                "AI_MESSAGE_VALIDATION_CACHE_TTL",
                defaults.validation_cache_ttl,
            )?,
            event_retention: duration("AI_MESSAGE_EVENT_RETENTION", defaults.event_retention)?,
            metrics_addr: match get("AI_MESSAGE_METRICS_ADDR") {
                Some(text) => Some(text.trim().parse().map_err(|_| {
                    bad(
                        "AI_MESSAGE_METRICS_ADDR",
                        format!("{text:?} is not an address such as 127.0.0.1:9090"),
                    )
                })?),
                None => defaults.metrics_addr,
            },
            nats_url: match get("AI_MESSAGE_NATS_URL") {
                Some(text) => {
                    Some(NatsUrl::parse(text.trim()).map_err(|m| bad("AI_MESSAGE_NATS_URL", m))?)
                }
                None => defaults.nats_url,
            },
            transport,
            database,
        })
    }

    /// A configuration for tests and tools: the defaults, with the given
    /// database, port 0 on loopback, a fixed key and the cheapest bcrypt cost.
    pub fn for_tests(database: DatabaseTarget) -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            secret_key: Some(Secret(b"test-secret-key-of-at-least-32-bytes!".to_vec())),
            bcrypt_cost: 4,
            ..Self::defaults(database)
        }
    }
}

/// The NATS servers to connect to; its `Debug` hides any password.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrl(String);

impl fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NatsUrl({})", crate::storage::redact_password(&self.0))
    }
}

impl NatsUrl {
    /// `nats://host:port` (or `tls://`), a bare `host:port`, or several of
    /// them separated by commas.
    pub fn parse(text: &str) -> Result<Self, String> {
        for server in text.split(',').map(str::trim) {
            let rest = ["nats://", "tls://"]
                .iter()
                .find_map(|scheme| server.strip_prefix(scheme))
                .unwrap_or(server);
            let authority = rest.rsplit('@').next().unwrap_or(rest);
            let valid = authority.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
            }) && !server.contains(char::is_whitespace);
            if !valid {
                return Err(format!(
                    "{server:?} is not a NATS address such as nats://127.0.0.1:4222"
                ));
            }
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn parse_number<T>(
    value: Option<String>,
    variable: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(text) = value else {
        return Ok(default);
    };
    let number: T = text.trim().parse().map_err(|_| {
        bad(
            variable,
            format!(
                "{text:?} is not a whole number between {} and {}",
                range.start(),
                range.end()
            ),
        )
    })?;
    if !range.contains(&number) {
        return Err(bad(
            variable,
            format!("{number} is outside {}..={}", range.start(), range.end()),
        ));
    }
    Ok(number)
}

/// `30m`, `7d`, `45s`, `12h`: a positive integer and one unit.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let expected = || format!("{text:?} is not a positive integer followed by s, m, h or d");
    let unit_at = text.len().checked_sub(1).ok_or_else(expected)?;
    let (number, unit) = text.split_at(unit_at);
    let seconds_per_unit: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(expected()),
    };
    let number: u64 = number.parse().map_err(|_| expected())?;
    if number == 0 {
        return Err(expected());
    }
    number
        .checked_mul(seconds_per_unit)
        .filter(|seconds| *seconds <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is longer than 100 years"))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{text:?} is not true or false")),
    }
}

/// Comma-separated addresses or CIDRs; a bare address is a one-host network.
pub fn parse_networks(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{item:?} is not an address or CIDR"))
        })
        .collect()
}

const DEFAULT_CERT: &str = "ssl/cert.pem";
const DEFAULT_KEY: &str = "ssl/key.pem";

/// TLS when both files exist, plaintext when neither does; anything in between,
/// or an explicitly named file that is missing, is an error.
fn tls_files(cert: Option<String>, key: Option<String>) -> Result<Option<TlsFiles>, ConfigError> {
    let check = |variable: &'static str, explicit: &Option<String>, default: &str| {
        let path = PathBuf::from(explicit.as_deref().unwrap_or(default));
        let exists = Path::new(&path).is_file();
        if explicit.is_some() && !exists {
            return Err(bad(
                variable,
                format!("file {} does not exist", path.display()),
            ));
        }
        Ok((path, exists))
    };
    let (cert_path, cert_exists) = check("AI_MESSAGE_SSL_CERT", &cert, DEFAULT_CERT)?;
    let (key_path, key_exists) = check("AI_MESSAGE_SSL_KEY", &key, DEFAULT_KEY)?;
    match (cert_exists, key_exists) {
        (true, true) => Ok(Some(TlsFiles {
            cert: cert_path,
            key: key_path,
        })),
        (false, false) => Ok(None),
        (true, false) => Err(bad(
            "AI_MESSAGE_SSL_KEY",
            format!(
                "{} does not exist but the certificate does",
                key_path.display()
            ),
        )),
        (false, true) => Err(bad(
            "AI_MESSAGE_SSL_CERT",
            format!("{} does not exist but the key does", cert_path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = config(&[]).unwrap();
        assert_eq!(
            config.database,
            DatabaseTarget::Sqlite(Some("backend.db".into()))
        );
        assert_eq!(config.host.to_string(), "0.0.0.0");
        assert_eq!(config.port, 8000);
        assert_eq!(config.domain, "localhost");
        assert_eq!(config.access_token_ttl, Duration::from_secs(1800));
        assert_eq!(config.refresh_token_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(config.bcrypt_cost, 12);
        assert_eq!(config.max_concurrent_calls, 1024);
        assert_eq!(config.max_pending_hashes, 64);
        assert!(config.reflection);
        assert!(config.secret_key.is_none());
    }

    #[test]
    fn seed_sqlalchemy_urls_mean_what_they_meant() {
        let cases = [
            (
                "sqlite:///./backend.db",
                DatabaseTarget::Sqlite(Some("./backend.db".into())),
            ),
            (
                "sqlite:///backend.db",
                DatabaseTarget::Sqlite(Some("backend.db".into())),
            ),
            (
                "sqlite:////var/lib/app.db",
                DatabaseTarget::Sqlite(Some("/var/lib/app.db".into())),
            ),
            (
                "sqlite://data/x.db",
                DatabaseTarget::Sqlite(Some("data/x.db".into())),
            ),
            ("sqlite::memory:", DatabaseTarget::Sqlite(None)),
            (
                "postgresql://u:p@db/app",
                DatabaseTarget::Postgres("postgres://u:p@db/app".into()),
            ),
            (
                "postgresql+psycopg2://u:p@db:5433/app",
                DatabaseTarget::Postgres("postgres://u:p@db:5433/app".into()),
            ),
            (
                "postgres://db/app",
                DatabaseTarget::Postgres("postgres://db/app".into()),
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(parse_database_url(url).unwrap(), expected, "{url}");
        }
    }

    #[test]
    fn bad_database_urls_name_the_variable() {
        for url in [
            "mysql://x/y",
            "backend.db",
            "sqlite:",
            "sqlite://",
            "postgres://",
        ] {
            let error = parse_database_url(url).unwrap_err();
            assert_eq!(error.variable, "DATABASE_URL", "{url}");
            assert!(error.to_string().contains("DATABASE_URL"));
        }
    }

    #[test]
    fn postgres_needs_an_explicit_secret_key() {
        let error = config(&[("DATABASE_URL", "postgres://h/db")]).unwrap_err();
        assert_eq!(error.variable, "AI_MESSAGE_SECRET_KEY");
        let key = "k".repeat(32);
        let ok = config(&[
            ("DATABASE_URL", "postgres://h/db"),
            ("AI_MESSAGE_SECRET_KEY", &key),
        ]);
        assert_eq!(ok.unwrap().secret_key.unwrap().expose(), key.as_bytes());
    }

    #[test]
    fn short_secret_keys_are_refused() {
        let error = config(&[("AI_MESSAGE_SECRET_KEY", "short")]).unwrap_err();
        assert_eq!(error.variable, "AI_MESSAGE_SECRET_KEY");
    }

    #[test]
    fn ttls_take_a_positive_integer_and_a_unit() {
        assert_eq!(parse_ttl("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        for bad_value in ["0m", "-1m", "m", "10", "1.5h", "10w", "", "99999999999999d"] {
            assert!(parse_ttl(bad_value).is_err(), "{bad_value}");
        }
        let error = config(&[("AI_MESSAGE_ACCESS_TOKEN_TTL", "soon")]).unwrap_err();
        assert_eq!(error.variable, "AI_MESSAGE_ACCESS_TOKEN_TTL");
    }

    #[test]
    fn bcrypt_cost_must_be_between_4_and_31() {
        assert_eq!(
            config(&[("AI_MESSAGE_BCRYPT_COST", "4")])
                .unwrap()
                .bcrypt_cost,
            4
        );
        for value in ["3", "32", "twelve"] {
            let error = config(&[("AI_MESSAGE_BCRYPT_COST", value)]).unwrap_err();
            assert_eq!(error.variable, "AI_MESSAGE_BCRYPT_COST");
        }
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            ("AI_MESSAGE_PORT", "http"),
            ("AI_MESSAGE_HOST", "example.com"),
            ("AI_MESSAGE_REFLECTION", "maybe"),
            ("AI_MESSAGE_TRUSTED_PROXIES", "10.0.0.0/8, nonsense"),
            ("AI_MESSAGE_MAX_CONCURRENT_CALLS", "0"),
            ("AI_MESSAGE_SSL_CERT", "/nonexistent/cert.pem"),
            ("AI_MESSAGE_REQUEST_TIMEOUT", "0s"),
            ("AI_MESSAGE_MAX_STREAMS_PER_CONNECTION", "0"),
            ("AI_MESSAGE_KEEPALIVE_INTERVAL", "often"),
        ];
        for (variable, value) in cases {
            let error = config(&[(variable, value)]).unwrap_err();
            assert_eq!(error.variable, variable, "{value}");
        }
    }

    #[test]
    fn trusted_proxies_accept_addresses_and_cidrs() {
        let nets = parse_networks("10.0.0.0/8, 192.168.1.7,::1").unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[1].contains(&"192.168.1.7".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn one_tls_file_without_the_other_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "x").unwrap();
        let cert = cert.to_str().unwrap();
        let missing_key = dir.path().join("key.pem");
        let error = config(&[
            ("AI_MESSAGE_SSL_CERT", cert),
            ("AI_MESSAGE_SSL_KEY", missing_key.to_str().unwrap()),
        ])
        .unwrap_err();
        assert_eq!(error.variable, "AI_MESSAGE_SSL_KEY");
    }

    #[test]
    fn secret_file_sits_beside_the_database_file() {
        let target = parse_database_url("sqlite://data/app.db").unwrap();
        assert_eq!(
            target.secret_file(),
            Some(PathBuf::from("data/app.db.secret"))
        );
        assert_eq!(DatabaseTarget::Sqlite(None).secret_file(), None);
    }

    /// `.env.example` lists every variable with its default: read as a
    /// configuration it must give exactly the defaults.
    #[test]
    fn the_example_env_file_states_the_defaults() {
        let example = include_str!("../.env.example");
        let values: std::collections::HashMap<&str, &str> = example
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .collect();
        let from_example =
            Config::from_lookup(|name| values.get(name).map(|v| (*v).to_owned())).unwrap();
        let defaults = Config::from_lookup(|_| None).unwrap();
        assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));
        assert_eq!(
            format!("{defaults:?}"),
            format!(
                "{:?}",
                Config::defaults(parse_database_url(DEFAULT_DATABASE_URL).unwrap())
            )
        );
        for variable in [
            "AI_MESSAGE_HANDSHAKE_TIMEOUT",
            "AI_MESSAGE_CONNECTION_IDLE_TIMEOUT",
            "AI_MESSAGE_MAX_CONNECTIONS",
            "AI_MESSAGE_SHUTDOWN_GRACE",
            "AI_MESSAGE_SIGNING_KEY_FILE",
            "AI_MESSAGE_VERIFY_KEY_FILES",
            "AI_MESSAGE_VALIDATION_CACHE_TTL",
            "AI_MESSAGE_EVENT_RETENTION",
            "AI_MESSAGE_METRICS_ADDR",
            "AI_MESSAGE_NATS_URL",
        ] {
            assert!(
                values.contains_key(variable),
                "{variable} is not in .env.example"
            );
        }
    }

    #[test]
    fn key_files_are_paths_and_a_signing_key_replaces_the_postgres_secret() {
        let c = config(&[
            ("AI_MESSAGE_SIGNING_KEY_FILE", " /keys/now.pem "),
            ("AI_MESSAGE_VERIFY_KEY_FILES", "/keys/a.pem, /keys/b.pem,"),
            ("AI_MESSAGE_VALIDATION_CACHE_TTL", "2s"),
            ("AI_MESSAGE_EVENT_RETENTION", "3d"),
        ])
        .unwrap();
        assert_eq!(c.event_retention, Duration::from_secs(3 * 24 * 3600));
        assert_eq!(c.signing_key_file, Some(PathBuf::from("/keys/now.pem")));
        assert_eq!(
            c.verify_key_files,
            [PathBuf::from("/keys/a.pem"), PathBuf::from("/keys/b.pem")]
        );
        assert_eq!(c.validation_cache_ttl, Duration::from_secs(2));
        let postgres = [("DATABASE_URL", "postgres://u@h/db")];
        assert_eq!(
            config(&postgres).unwrap_err().variable,
            "AI_MESSAGE_SECRET_KEY"
        );
        assert!(
            config(&[
                postgres[0],
                ("AI_MESSAGE_SIGNING_KEY_FILE", "/keys/now.pem")
            ])
            .is_ok(),
            "EdDSA needs no HS256 secret"
        );
    }

    #[test]
    fn cors_origins_are_none_a_list_or_any() {
        let origins =
            |text: &str| config(&[("AI_MESSAGE_CORS_ORIGINS", text)]).map(|c| c.cors_origins);
        assert_eq!(origins(" ").unwrap(), CorsOrigins::None);
        assert_eq!(origins("*").unwrap(), CorsOrigins::Any);
        let list = origins("https://a.example, http://localhost:3000").unwrap();
        assert!(list.allows("https://a.example") && list.allows("http://localhost:3000"));
        assert!(!list.allows("https://b.example"));
        assert!(!CorsOrigins::None.allows("https://a.example"));
        for bad in ["a.example", "https://a.example/", "*, https://a.example"] {
            let error = origins(bad).unwrap_err();
            assert_eq!(error.variable, "AI_MESSAGE_CORS_ORIGINS", "{bad}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let key = "s".repeat(40);
        let config = config(&[
            ("DATABASE_URL", "postgres://app:hunter2@db/app"),
            ("AI_MESSAGE_SECRET_KEY", &key),
        ])
        .unwrap();
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2"));
        let nats = NatsUrl::parse("nats://app:swordfish@bus:4222").unwrap();
        assert!(!format!("{nats:?}").contains("swordfish"));
        assert!(!text.contains(&key));
    }

    #[test]
    fn nats_urls_name_a_host_and_port() {
        let nats = |text: &str| config(&[("AI_MESSAGE_NATS_URL", text)]).map(|c| c.nats_url);
        assert_eq!(nats("").unwrap(), None);
        for good in [
            "nats://127.0.0.1:4222",
            "bus:4222",
            "tls://a:1, nats://u:p@b:2",
        ] {
            assert_eq!(nats(good).unwrap().unwrap().as_str(), good);
        }
        for bad in ["nats://bus", "http://bus:4222", "nats://:4222", "bus:port"] {
            let error = nats(bad).unwrap_err();
            assert_eq!(error.variable, "AI_MESSAGE_NATS_URL", "{bad}");
        }
    }
}
