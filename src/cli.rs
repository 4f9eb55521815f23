//! The command line: `serve` (default), `migrate [status|revert]` and
//! `create-superuser`. Nothing here asks for confirmation; logs go to stderr,
//! command output to stdout.

use std::io::BufRead as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{
    auth::{PasswordHasher, accounts::create_account},
    config::Config,
    domain::NewAccount,
    error::AppError,
    startup::{Application, connect_database, shutdown_signal},
};

#[derive(Debug, Parser)]
#[command(
    name = "ai-message",
    version,
    about = "Accounts, sessions and messages over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then serve (the default).
    Serve,
    /// Apply pending migrations, or show or revert them.
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateAction>,
    },
    /// Create a superuser; the password is read from standard input (one line).
    CreateSuperuser {
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: String,
    },
    /// Write the binary FileDescriptorSet of every served file (imports and
    /// custom options such as google.api.http included), for gateways,
    /// `grpcurl -protoset` and buf.
    Descriptor {
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
}

/// `ai-message descriptor`: needs no configuration and no database.
pub fn write_descriptor(output: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let bytes = crate::proto::FILE_DESCRIPTOR_SET;
    match output {
        Some(path) => {
            std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(bytes)?;
            Ok(stdout.flush()?)
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// List every migration as `<version> <description> applied|pending`.
    Status,
    /// Undo the latest applied migration.
    Revert,
}

pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Descriptor { output } => write_descriptor(output.as_deref()),
        Command::Serve => {
            let app = Application::build(config).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Migrate { action } => {
            let db = connect_database(&config.database).await?;
            let result = migrate(db.as_ref(), action).await;
            db.close().await;
            result
        }
        Command::CreateSuperuser { username, email } => {
            let mut password = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut password)
                .context("cannot read the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                anyhow::bail!("password: empty; write it on standard input");
            }
            create_superuser(config, &username, &email, password).await
        }
    }
}

async fn migrate(
    db: &dyn crate::storage::Database,
    action: Option<MigrateAction>,
) -> anyhow::Result<()> {
    match action {
        None => {
            db.migrate()
                .await
                .context("DATABASE_URL: applying migrations failed")?;
            let states = db.migration_status().await?;
            let current = states.iter().filter(|m| m.applied).map(|m| m.version).max();
            tracing::info!(current_version = ?current, "migrations applied");
        }
        Some(MigrateAction::Status) => {
            let states = db.migration_status().await?;
            for state in &states {
                let mark = if state.applied { "applied" } else { "pending" };
                println!("{} {} {}", state.version, state.description, mark);
            }
            let current = states.iter().filter(|m| m.applied).map(|m| m.version).max();
            match current {
                Some(version) => println!("current version: {version}"),
                None => println!("current version: none"),
            }
        }
        Some(MigrateAction::Revert) => match db.revert_latest().await? {
            Some(version) => println!("reverted {version}"),
            None => println!("nothing to revert"),
        },
    }
    Ok(())
}

async fn create_superuser(
    config: Config,
    username: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<()> {
    let account = NewAccount::parse(username, email, password, None).map_err(|violations| {
        anyhow::anyhow!(
            "{}",
            violations
                .into_inner()
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let db = connect_database(&config.database).await?;
    db.migrate()
        .await
        .context("DATABASE_URL: applying migrations failed")?;
    let hasher = PasswordHasher::new(config.bcrypt_cost, 1);
    let created = create_account(
        db.as_ref(),
        &hasher,
        account,
        true,
        crate::domain::Clock::now(&crate::domain::SystemClock),
    )
    .await;
    db.close().await;
    match created {
        Ok(user) => {
            println!("created superuser {} (id {})", user.username, user.id);
            Ok(())
        }
        Err(AppError::AlreadyExists(field)) => anyhow::bail!("{field}: already exists"),
        Err(error) => Err(error.into()),
    }
}
