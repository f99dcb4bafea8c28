//! Real databases for tests: a uniquely named PostgreSQL or MariaDB database per test (dropped
//! when the test ends, also when it fails) or a SQLite file in a temporary directory.
//! Addresses come from SWITCHYARD_TEST_PG and SWITCHYARD_TEST_MYSQL.

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Connection, Executor, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pg,
    My,
    Lite,
}

pub struct TestDb {
    pub kind: Kind,
    base: String,
    name: String,
    _dir: Option<tempfile::TempDir>,
    pub pool: AnyPool,
}

pub fn pg_base() -> String {
    std::env::var("SWITCHYARD_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
        .trim_end_matches('/')
        .to_string()
}

pub fn mysql_base() -> String {
    std::env::var("SWITCHYARD_TEST_MYSQL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_string())
        .trim_end_matches('/')
        .to_string()
}

fn unique_name() -> String {
    format!(
        "sy_{}_{}",
        std::process::id(),
        uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .simple()
    )
}

async fn admin_exec(kind: Kind, base: &str, sql: &str) -> Result<(), sqlx::Error> {
    match kind {
        Kind::Pg => {
            let mut c = sqlx::PgConnection::connect(&format!("{base}/postgres")).await?;
            c.execute(AssertSqlSafe(sql.to_string())).await?;
            c.close().await
        }
        Kind::My => {
            let mut c = sqlx::MySqlConnection::connect(base).await?;
            c.execute(AssertSqlSafe(sql.to_string())).await?;
            c.close().await
        }
        Kind::Lite => Ok(()),
    }
}

impl TestDb {
    pub async fn new(kind: Kind) -> TestDb {
        sqlx::any::install_default_drivers();
        let name = unique_name();
        let (base, dir) = match kind {
            Kind::Pg => {
                let base = pg_base();
                admin_exec(kind, &base, &format!("CREATE DATABASE \"{name}\""))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("cannot reach PostgreSQL at {base} (set SWITCHYARD_TEST_PG): {e}")
                    });
                (base, None)
            }
            Kind::My => {
                let base = mysql_base();
                admin_exec(
                    kind,
                    &base,
                    &format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"),
                )
                .await
                .unwrap_or_else(|e| {
                    panic!("cannot reach MariaDB at {base} (set SWITCHYARD_TEST_MYSQL): {e}")
                });
                (base, None)
            }
            Kind::Lite => {
                let dir = tempfile::tempdir().unwrap();
                (dir.path().display().to_string(), Some(dir))
            }
        };
        let mut db = TestDb {
            kind,
            base,
            name,
            _dir: dir,
            pool: AnyPoolOptions::new()
                .max_connections(1)
                .connect_lazy("sqlite::memory:")
                .unwrap(),
        };
        let url = match kind {
            Kind::Lite => format!("{}?mode=rwc", db.url()),
            _ => db.url(),
        };
        db.pool = AnyPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap();
        db
    }

    pub fn url(&self) -> String {
        match self.kind {
            Kind::Pg | Kind::My => format!("{}/{}", self.base, self.name),
            Kind::Lite => format!("sqlite://{}/{}.db", self.base, self.name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn exec(&self, sql: &str) {
        self.pool
            .execute(AssertSqlSafe(sql.to_string()))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn try_exec(&self, sql: &str) -> Result<(), sqlx::Error> {
        self.pool
            .execute(AssertSqlSafe(sql.to_string()))
            .await
            .map(|_| ())
    }

    /// Every row of `sql`, each column read as optional text (cast in SQL as needed).
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let rows: Vec<AnyRow> = sqlx::query(AssertSqlSafe(sql.to_string()))
            .fetch_all(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.try_get::<Option<String>, _>(i).unwrap())
                    .collect()
            })
            .collect()
    }

    pub async fn count(&self, table: &str) -> i64 {
        let r = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .unwrap();
        r.try_get::<i64, _>(0).unwrap()
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let r = sqlx::query(AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        r.try_get::<i64, _>(0).unwrap()
    }

    /// PostgreSQL only: refuses new connections and ends the open ones, as if the server
    /// had stopped (for this database only, so other tests are undisturbed).
    pub async fn pg_stop(&self) {
        assert_eq!(self.kind, Kind::Pg);
        admin_exec(
            Kind::Pg,
            &self.base,
            &format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false", self.name),
        )
        .await
        .unwrap();
        admin_exec(
            Kind::Pg,
            &self.base,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                self.name
            ),
        )
        .await
        .unwrap();
    }

    /// Runs `sql` on the server's maintenance database (roles, database settings).
    pub async fn admin(&self, sql: &str) {
        admin_exec(self.kind, &self.base, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// This database's URL as another user (PostgreSQL trust auth, MariaDB without password).
    pub fn url_as(&self, user: &str) -> String {
        let url = self.url();
        match url.split_once("://") {
            Some((scheme, rest)) => {
                let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
                format!("{scheme}://{user}@{rest}")
            }
            None => url,
        }
    }

    pub async fn pg_start(&self) {
        admin_exec(
            Kind::Pg,
            &self.base,
            &format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", self.name),
        )
        .await
        .unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.kind == Kind::Lite {
            return;
        }
        let (kind, base, name) = (self.kind, self.base.clone(), self.name.clone());
        let pool = self.pool.clone();
        // A fresh runtime on a thread of its own: this may run inside the test's runtime.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                pool.close().await;
                match kind {
                    Kind::Pg => {
                        let _ = admin_exec(
                            kind,
                            &base,
                            &format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"),
                        )
                        .await;
                        admin_exec(
                            kind,
                            &base,
                            &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                        )
                        .await
                    }
                    _ => {
                        admin_exec(kind, &base, &format!("DROP DATABASE IF EXISTS `{name}`")).await
                    }
                }
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}
