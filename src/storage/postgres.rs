//! The PostgreSQL backend, for production and for several instances sharing
//! one database.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    PgPool, Postgres, Transaction,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{Database, MigrationState, Result, migrations};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(4);
const MAX_CONNECTIONS: u32 = 16;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }
}

impl_repositories!(PostgresStore, Postgres);

#[async_trait]
impl Database for PostgresStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    async fn migration_status(&self) -> anyhow::Result<Vec<MigrationState>> {
        migrations::status(&self.pool, &MIGRATOR).await
    }

    async fn revert_latest(&self) -> anyhow::Result<Option<i64>> {
        migrations::revert_latest(&self.pool, &MIGRATOR).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
