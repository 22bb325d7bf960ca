//! Throw-away PostgreSQL databases for tests (feature `testkit`), and the
//! rule for machines without PostgreSQL.
//!
//! Tests find the server at `KEEL_PG_URL` (default
//! [`DEFAULT_PG_URL`]). Tests that need PostgreSQL or NATS are marked
//! `#[ignore = "needs PostgreSQL ..."]`, so the test runner reports them as
//! ignored where nobody asked for them; run with `--include-ignored` (as CI
//! does), they need the engines: [`TestDatabase::create`] and
//! [`nats_available`] then fail the test with what to start, never pass it
//! silently.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::NoTls;

/// Where tests look for PostgreSQL when `KEEL_PG_URL` is not set: the
/// standard local port, trust authentication.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server tests use: `KEEL_PG_URL` or [`DEFAULT_PG_URL`].
pub fn admin_url() -> String {
    std::env::var("KEEL_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_owned())
}

/// `url` naming database `db` instead of its own (URL form only).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_end..]
        .find('/')
        .map_or(base.len(), |i| authority_end + i);
    let mut out = format!("{}/{db}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A database created for one test and dropped (connections and all)
/// when this is dropped, even when the test panicked.
#[derive(Debug)]
pub struct TestDatabase {
    /// The URL of the new database.
    pub url: String,
    name: String,
    admin: String,
}

impl TestDatabase {
    /// Creates an empty database on the server at [`admin_url`]; panics,
    /// saying what to start, when the server cannot be reached (the tests
    /// calling it are ignored unless asked for: a missing engine is then a
    /// failure, not a pass). Always `Some`: the `Option` keeps callers'
    /// `let Some(db) = ... else` shape.
    pub async fn create() -> Option<TestDatabase> {
        match TestDatabase::create_at(&admin_url()).await {
            Ok(db) => Some(db),
            Err(why) => panic!("{why} (this test needs PostgreSQL)"),
        }
    }

    /// Creates an empty database on the server at `admin` (a URL whose
    /// user may `CREATE DATABASE`); the error says what to start.
    pub async fn create_at(admin: &str) -> Result<TestDatabase, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let admin = admin.to_owned();
        let client = connect(&admin).await.map_err(|e| {
            let e = match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            };
            format!(
                "PostgreSQL is not reachable at {admin} ({e}). Start it (on Debian: \
                 `pg_ctlcluster 15 main start`) or point KEEL_PG_URL at a server whose \
                 user may CREATE DATABASE"
            )
        })?;
        drop_leftovers(&client).await;
        let name = format!(
            "keel_test_{}_{}_{:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| format!("cannot create database {name} at {admin}: {e}"))?;
        Ok(TestDatabase {
            url: with_database(&admin, &name),
            name,
            admin,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Dropped inside a runtime (a test's end): run on a thread of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = connect(&admin).await.ok()?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(done, Ok(Some(()))) {
            eprintln!("warning: test database {} was not dropped", self.name);
        }
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(std::time::Duration::from_secs(3));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Drops test databases left by test processes that are gone (killed
/// before their drop ran).
async fn drop_leftovers(client: &tokio_postgres::Client) {
    let Ok(rows) = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'keel\\_test\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// The DDL that takes the schema from version `version - 1` to `version`
/// (for tests of migrating a database an older build left).
pub fn migration_ddl(version: u32) -> Option<&'static str> {
    let i = usize::try_from(version).ok()?.checked_sub(1)?;
    crate::schema::MIGRATIONS.get(i).copied()
}

/// Where cluster tests look for NATS when `KEEL_NATS_URL` is not set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The NATS server cluster tests use: `KEEL_NATS_URL` or
/// [`DEFAULT_NATS_URL`].
pub fn nats_url() -> String {
    std::env::var("KEEL_NATS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned())
}

/// Whether a NATS server answers at [`nats_url`] (it greets a new
/// connection with `INFO`); panics, saying what to start, when it does
/// not (see [`TestDatabase::create`]).
pub async fn nats_available() -> bool {
    match nats_check(&nats_url()).await {
        Ok(()) => true,
        Err(why) => panic!("{why} (this test needs NATS)"),
    }
}

/// Whether a NATS server greets a connection at `url`; the error says
/// what to start.
pub async fn nats_check(url: &str) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let hostport = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .rsplit('@')
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_owned();
    let greeting = async {
        let mut s = tokio::net::TcpStream::connect(&hostport).await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf == *b"INFO")
    };
    let why = match tokio::time::timeout(std::time::Duration::from_secs(3), greeting).await {
        Ok(Ok(true)) => return Ok(()),
        Ok(Ok(false)) => format!("{hostport} answered, but not as a NATS server"),
        Ok(Err(e)) => format!("{hostport}: {e}"),
        Err(_) => format!("{hostport}: no greeting within 3 s"),
    };
    Err(format!(
        "NATS is not reachable at {url} ({why}). Start it (`nats-server -js`) or set KEEL_NATS_URL"
    ))
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_url_names_another_database() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
