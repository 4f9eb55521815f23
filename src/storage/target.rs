//! Which database to open, parsed from a URL in the sqlx or SQLAlchemy forms.

use std::{fmt, path::PathBuf};

/// Which database, decided once from `DATABASE_URL`.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// An SQLite file (created if missing), or `None` for a private in-memory database.
    Sqlite(Option<PathBuf>),
    /// A PostgreSQL connection URL in sqlx form (`postgres://…`).
    Postgres(String),
}

impl fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "Sqlite({path:?})"),
            Self::Postgres(url) => write!(f, "Postgres({})", redact_password(url)),
        }
    }
}

impl DatabaseTarget {
    /// Parses the sqlx forms and the seed's SQLAlchemy forms of `DATABASE_URL`.
    ///
    /// `sqlite://rel` and `sqlite:///rel` are relative to the working directory
    /// (the latter is SQLAlchemy's relative form), `sqlite:////abs` is absolute;
    /// `postgresql://`, `postgresql+<driver>://` and `postgres://` are PostgreSQL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let (scheme, rest) = url
            .split_once(':')
            .ok_or_else(|| "expected a URL such as sqlite://backend.db".to_owned())?;
        let scheme = scheme.to_ascii_lowercase();
        let base_scheme = scheme.split('+').next().unwrap_or_default();
        match base_scheme {
            "sqlite" => {
                if rest == ":memory:" || rest == "//:memory:" {
                    return Ok(Self::Sqlite(None));
                }
                let path = rest
                    .strip_prefix("//")
                    .ok_or_else(|| "expected sqlite://<path>".to_owned())?;
                let path = path.split('?').next().unwrap_or_default();
                // SQLAlchemy: three slashes then a relative path, four for an absolute one.
                let path = match path.strip_prefix('/') {
                    Some(after_root) if after_root.starts_with('/') => after_root,
                    Some(relative) => relative,
                    None => path,
                };
                if path.is_empty() {
                    return Err("the SQLite file path is empty".to_owned());
                }
                if path == ":memory:" {
                    return Ok(Self::Sqlite(None));
                }
                Ok(Self::Sqlite(Some(PathBuf::from(path))))
            }
            "postgres" | "postgresql" => {
                let authority = rest
                    .strip_prefix("//")
                    .ok_or_else(|| "expected postgres://user@host/database".to_owned())?;
                if authority.is_empty() {
                    return Err("the PostgreSQL URL names no host".to_owned());
                }
                Ok(Self::Postgres(format!("postgres://{authority}")))
            }
            "" => Err("expected a URL such as sqlite://backend.db".to_owned()),
            other => Err(format!(
                "unsupported scheme {other:?}; use sqlite:// or postgres://"
            )),
        }
    }

    /// The path of the file that keeps the generated signing key, for SQLite files.
    pub fn secret_file(&self) -> Option<PathBuf> {
        match self {
            Self::Sqlite(Some(path)) => {
                let mut name = path.as_os_str().to_owned();
                name.push(".secret");
                Some(PathBuf::from(name))
            }
            _ => None,
        }
    }
}

/// `postgres://user:secret@host` as `postgres://user:***@host`, for logs.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}
