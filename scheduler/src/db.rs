//! PostgreSQL: connecting, creating the database, migrating.

use std::time::Duration;

use anyhow::{Context, bail};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};
use sieve_migrations::{Migrator, MigratorTrait};
use sieve_shared::Unreachable;
use sieve_shared::settings::DatabaseSettings;

/// A pooled connection idle this long is pinged before it is handed out.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, Unreachable> {
    connect_url(&settings.url, settings.max_connections).await
}

/// The pool review claims use (`database.claim_connections`). A claim
/// commits without waiting for the WAL flush and reads only through
/// indexes, so a few connections serve hundreds of reviewers; what would
/// make it slow is waiting for a connection that a submit holds while its
/// commit waits for the disk. With its own pool it never does.
pub async fn connect_claims(
    settings: &DatabaseSettings,
) -> Result<DatabaseConnection, Unreachable> {
    connect_url(&settings.url, settings.claim_connections.max(1)).await
}

async fn connect_url(url: &str, max_connections: u32) -> Result<DatabaseConnection, Unreachable> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max_connections)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        // By default every checkout pings the connection first: a round trip
        // as long as a claim's own statement. A connection in use moments
        // ago is alive (the pool also pings each one as it is returned, and
        // drops it if that fails); one idle longer, e.g. through a database
        // restart, is still checked.
        .test_before_acquire_if_idle_for(IDLE_BEFORE_PING)
        .sqlx_logging(false);
    Database::connect(options).await.map_err(|e| {
        let reason = e.to_string();
        if reason.contains("does not exist") {
            Unreachable::new(
                "PostgreSQL",
                url,
                format!("{reason} (run `sieve migrate` to create it)"),
            )
        } else {
            Unreachable::new("PostgreSQL", url, reason)
        }
    })
}

/// Split `postgres://host/db?opts` into the server URL (pointing at the
/// `postgres` maintenance database) and the database name.
fn split_database(url: &str) -> anyhow::Result<(String, String)> {
    let (base, rest) = url
        .rsplit_once('/')
        .with_context(|| format!("database URL {url:?} names no database"))?;
    let (name, query) = match rest.split_once('?') {
        Some((name, query)) => (name, format!("?{query}")),
        None => (rest, String::new()),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        bail!("database name {name:?} must be letters, digits, '_' or '-'");
    }
    Ok((format!("{base}/postgres{query}"), name.to_owned()))
}

/// Create the database named in `url` if it does not exist yet.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let (server, name) = split_database(url)?;
    let admin = connect_url(&server, 1).await?;
    let exists = admin
        .query_one_raw(Statement::from_sql_and_values(
            admin.get_database_backend(),
            "SELECT 1 FROM pg_database WHERE datname = $1",
            [name.clone().into()],
        ))
        .await?
        .is_some();
    if !exists {
        // Identifiers cannot be bound parameters; `split_database` allowed
        // only a safe character set, and the name is quoted.
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"))?;
        tracing::info!(database = %name, "created database");
    }
    admin.close().await.ok();
    Ok(())
}

/// Drop a database (tests clean up after themselves with this).
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let (server, name) = split_database(url)?;
    let admin = connect_url(&server, 1).await?;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    admin.close().await.ok();
    Ok(())
}

/// Apply every pending migration; running it again changes nothing.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<usize> {
    let pending = Migrator::get_pending_migrations(db).await?.len();
    Migrator::up(db, None)
        .await
        .context("applying migrations")?;
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_database_from_server() {
        let (server, name) =
            split_database("postgres://postgres@127.0.0.1:5432/sieve_t1?sslmode=disable")
                .expect("split");
        assert_eq!(
            server,
            "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
        );
        assert_eq!(name, "sieve_t1");
        assert!(split_database("postgres://h/bad\"name").is_err());
    }
}
