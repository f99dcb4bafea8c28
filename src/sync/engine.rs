//! The three database engines a sync pair can sit on: connecting, quoting, placeholders and
//! table introspection. Every value crosses this boundary as canonical text (see `canon`), so
//! the rest of the sync code never depends on a driver's type mapping.

use sqlx::AssertSqlSafe;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use super::SyncError;
use super::canon::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    MySql,
    Sqlite,
}

impl Engine {
    pub fn of_url(url: &str) -> Result<Engine, SyncError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" => Ok(Engine::Postgres),
            "mysql" | "mariadb" => Ok(Engine::MySql),
            "sqlite" => Ok(Engine::Sqlite),
            _ => Err(SyncError::Url(format!(
                "`{}` is not a postgres://, mysql:// or sqlite:// URL",
                redact(url)
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::MySql => "mysql",
            Engine::Sqlite => "sqlite",
        }
    }

    pub fn quote(self, ident: &str) -> String {
        match self {
            Engine::MySql => format!("`{}`", ident.replace('`', "``")),
            _ => format!("\"{}\"", ident.replace('"', "\"\"")),
        }
    }

    /// A possibly schema-qualified table name, each part quoted.
    pub fn quote_table(self, table: &str) -> String {
        table
            .split('.')
            .map(|p| self.quote(p))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The placeholder for the `n`th (1-based) bind parameter.
    pub fn param(self, n: usize) -> String {
        match self {
            Engine::Postgres => format!("${n}"),
            _ => "?".to_string(),
        }
    }

    /// A bind parameter carrying canonical text, converted to the column's declared type.
    /// MySQL and SQLite convert text on assignment and comparison; Postgres needs the cast.
    pub fn typed_param(self, n: usize, decl: &str) -> String {
        match self {
            Engine::Postgres => format!("CAST(${n} AS {decl})"),
            _ => "?".to_string(),
        }
    }

    /// The bind parameter of a value of `col` in canonical text: bytes travel as hex.
    pub fn value_param(self, n: usize, col: &ColumnInfo) -> String {
        if col.kind != Kind::Bytes {
            return self.typed_param(n, &col.decl);
        }
        match self {
            Engine::Postgres => format!("decode(${n}, 'hex')"),
            Engine::MySql => "UNHEX(?)".to_string(),
            Engine::Sqlite => "unhex(?)".to_string(),
        }
    }

    /// The database's clock as microseconds since the epoch: change times and lag use one
    /// clock per side, so replicas with skewed clocks agree.
    pub fn now_micros_sql(self) -> &'static str {
        match self {
            Engine::Postgres => "(extract(epoch from clock_timestamp()) * 1000000)::bigint",
            Engine::MySql => "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)",
            Engine::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)",
        }
    }

    /// The column type of bookkeeping text columns that must compare byte for byte.
    pub fn key_text_type(self) -> &'static str {
        match self {
            // NO PAD: `a` and `a ` are different keys.
            Engine::MySql => "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin",
            _ => "TEXT",
        }
    }
}

/// Hides the password of a database URL in logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A pool on one side of a pair.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub engine: Engine,
    pub url: String,
}

/// What the sessions of a pool are for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// The sync worker's own sessions: tagged so that capture triggers ignore their writes,
    /// and in UTC so that timestamps read the same on every engine.
    Applier,
    /// Reading only (consistency checks), in UTC.
    Reader,
}

impl Db {
    pub async fn connect(url: &str, session: Session) -> Result<Db, SyncError> {
        sqlx::any::install_default_drivers();
        let engine = Engine::of_url(url)?;
        let connect_url = match engine {
            // `mariadb://` is ours; the driver only knows `mysql://`.
            Engine::MySql if url.starts_with("mariadb:") => format!("mysql:{}", &url[8..]),
            _ => url.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(3))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    match (engine, session) {
                        (Engine::Postgres, Session::Applier) => {
                            conn.execute(sqlx::raw_sql(AssertSqlSafe(
                                "SET switchyard.applying = 'on'; SET TIME ZONE 'UTC'",
                            )))
                            .await?;
                        }
                        (Engine::Postgres, Session::Reader) => {
                            conn.execute(sqlx::raw_sql("SET TIME ZONE 'UTC'")).await?;
                        }
                        (Engine::MySql, Session::Applier) => {
                            conn.execute(sqlx::raw_sql(AssertSqlSafe(
                                "SET @switchyard_applying = 1, time_zone = '+00:00'",
                            )))
                            .await?;
                        }
                        (Engine::MySql, Session::Reader) => {
                            conn.execute(sqlx::raw_sql("SET time_zone = '+00:00'"))
                                .await?;
                        }
                        (Engine::Sqlite, _) => {}
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(e) => {
                return Err(SyncError::Connect {
                    url: redact(url),
                    reason: crate::dberror::connect_failure(&connect_url, e).await,
                });
            }
        };
        Ok(Db {
            pool,
            engine,
            url: url.to_string(),
        })
    }

    pub fn q(&self, ident: &str) -> String {
        self.engine.quote(ident)
    }
}

/// One column of a table as the database declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// The declared type, usable in a CAST on Postgres.
    pub decl: String,
    pub kind: Kind,
    /// How the database compares the column's values, for text columns that have a collation.
    pub collation: Collation,
}

/// How loosely a column's values compare, from exact to case-insensitive. A column whose
/// comparison on the target is looser than on the source can merge rows the source keeps apart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Collation {
    /// Equal exactly when the bytes are equal (PostgreSQL deterministic collations, MariaDB
    /// `*_nopad_bin` and binary strings, SQLite BINARY, non-text types).
    Exact,
    /// Trailing spaces ignored: MariaDB PAD SPACE collations such as `utf8mb4_bin`.
    PadSpace(String),
    /// Case, accents or more ignored: MariaDB `*_ci`, PostgreSQL nondeterministic collations.
    Insensitive(String),
}

impl Collation {
    /// MariaDB/MySQL: from a collation name (MariaDB's PAD SPACE collations are those without
    /// `nopad` in the name; MySQL 8's `*_0900_*` collations are NO PAD).
    pub fn of_mysql(name: Option<&str>) -> Collation {
        let Some(n) = name.map(str::to_ascii_lowercase) else {
            return Collation::Exact;
        };
        if n == "binary" {
            Collation::Exact
        } else if n.ends_with("_bin") || n.ends_with("_cs") || n.ends_with("_as_cs") {
            if n.contains("nopad") || n.contains("_0900_") {
                Collation::Exact
            } else {
                Collation::PadSpace(n)
            }
        } else {
            Collation::Insensitive(n)
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Collation::Exact => "byte-exact".into(),
            Collation::PadSpace(n) => format!("`{n}`, which ignores trailing spaces"),
            Collation::Insensitive(n) => format!("`{n}`, which ignores case (or more)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TableInfo {
    pub columns: Vec<ColumnInfo>,
    pub primary_key: Vec<String>,
    /// Unique indexes and constraints other than the primary key: (name, columns).
    pub unique: Vec<(String, Vec<String>)>,
    /// Privileges the sync needs that the connected user lacks.
    pub missing_privileges: Vec<String>,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// Columns from rows of (name, declared type, collation); PostgreSQL adds whether the
/// collation is deterministic.
fn column_infos(engine: Engine, rows: &[AnyRow]) -> Result<Vec<ColumnInfo>, sqlx::Error> {
    rows.iter()
        .map(|r| {
            let decl = text(r, 1)?;
            let coll: Option<String> = r.try_get(2)?;
            let collation = match engine {
                Engine::Postgres => {
                    let deterministic: Option<String> = r.try_get(3)?;
                    match (coll, deterministic.as_deref()) {
                        (Some(c), Some("f")) => Collation::Insensitive(c),
                        _ => Collation::Exact,
                    }
                }
                _ => Collation::of_mysql(coll.as_deref()),
            };
            Ok(ColumnInfo {
                kind: Kind::of_declared(engine, &decl),
                name: text(r, 0)?,
                decl,
                collation,
            })
        })
        .collect()
}

/// Groups rows of (index name, column name), in order, into indexes.
fn group_indexes(rows: &[AnyRow]) -> Result<Vec<(String, Vec<String>)>, sqlx::Error> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for r in rows {
        let (index, col) = (text(r, 0)?, text(r, 1)?);
        match out.last_mut() {
            Some((name, cols)) if *name == index => cols.push(col),
            _ => out.push((index, vec![col])),
        }
    }
    Ok(out)
}

fn text(row: &AnyRow, i: usize) -> Result<String, sqlx::Error> {
    row.try_get::<Option<String>, _>(i)
        .map(|v| v.unwrap_or_default())
}

/// Reads a table's columns, primary key and the privileges the sync needs. `None` when the
/// table does not exist.
pub async fn inspect(db: &Db, table: &str) -> Result<Option<TableInfo>, SyncError> {
    let err = |e| SyncError::Query {
        what: format!("inspecting table `{table}`"),
        source: e,
    };
    let mut columns = Vec::new();
    let mut primary_key = Vec::new();
    let mut missing_privileges = Vec::new();
    let unique_sql = match db.engine {
        Engine::Postgres => {
            "SELECT c.relname::text, a.attname::text FROM pg_index x \
             JOIN pg_class c ON c.oid = x.indexrelid \
             JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey) \
             WHERE x.indrelid = to_regclass($1) AND x.indisunique AND NOT x.indisprimary \
             ORDER BY c.relname, array_position(x.indkey::int[], a.attnum::int)"
        }
        Engine::MySql => {
            "SELECT CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR) FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND NON_UNIQUE = 0 AND INDEX_NAME <> 'PRIMARY' \
             ORDER BY INDEX_NAME, SEQ_IN_INDEX"
        }
        Engine::Sqlite => {
            "SELECT il.name, ii.name FROM pragma_index_list(?1) il, pragma_index_info(il.name) ii \
             WHERE il.\"unique\" = 1 AND il.origin <> 'pk' ORDER BY il.name, ii.seqno"
        }
    };
    match db.engine {
        Engine::Postgres => {
            let rows = sqlx::query(AssertSqlSafe(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)::text, \
                 co.collname::text, co.collisdeterministic::text \
                 FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
                 AND NOT a.attisdropped ORDER BY a.attnum",
            ))
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .map_err(err)?;
            columns = column_infos(Engine::Postgres, &rows).map_err(err)?;
            if columns.is_empty() {
                return Ok(None);
            }
            let rows = sqlx::query(AssertSqlSafe(
                "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
                 ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int[], a.attnum::int)",
            ))
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .map_err(err)?;
            for r in &rows {
                primary_key.push(text(r, 0).map_err(err)?);
            }
            for p in ["SELECT", "INSERT", "UPDATE", "DELETE", "TRIGGER"] {
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT CASE WHEN has_table_privilege(to_regclass($1), '{p}') THEN 1 ELSE 0 END::bigint"
                )))
                .bind(table)
                .fetch_one(&db.pool)
                .await
                .map_err(err)?;
                if row.try_get::<i64, _>(0).map_err(err)? == 0 {
                    missing_privileges.push(p.to_string());
                }
            }
        }
        Engine::MySql => {
            let rows = sqlx::query(AssertSqlSafe(
                "SELECT CAST(COLUMN_NAME AS CHAR), CAST(COLUMN_TYPE AS CHAR), CAST(COLLATION_NAME AS CHAR) \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? \
                 ORDER BY ORDINAL_POSITION",
            ))
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .map_err(err)?;
            columns = column_infos(Engine::MySql, &rows).map_err(err)?;
            if columns.is_empty() {
                return Ok(None);
            }
            let rows = sqlx::query(AssertSqlSafe(
                "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.KEY_COLUMN_USAGE \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
                 ORDER BY ORDINAL_POSITION",
            ))
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .map_err(err)?;
            for r in &rows {
                primary_key.push(text(r, 0).map_err(err)?);
            }
            missing_privileges = mysql_missing_privileges(db, table).await?;
        }
        Engine::Sqlite => {
            let rows = sqlx::query(AssertSqlSafe(
                "SELECT name, type, CAST(pk AS INTEGER) FROM pragma_table_info(?) ORDER BY cid",
            ))
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .map_err(err)?;
            let mut pk: Vec<(i64, String)> = Vec::new();
            for r in &rows {
                let name = text(r, 0).map_err(err)?;
                let decl = text(r, 1).map_err(err)?;
                let pos: i64 = r.try_get(2).map_err(err)?;
                if pos > 0 {
                    pk.push((pos, name.clone()));
                }
                columns.push(ColumnInfo {
                    kind: Kind::of_declared(Engine::Sqlite, &decl),
                    name,
                    decl,
                    collation: Collation::Exact,
                });
            }
            if columns.is_empty() {
                return Ok(None);
            }
            pk.sort();
            primary_key = pk.into_iter().map(|(_, n)| n).collect();
        }
    }
    let rows = sqlx::query(AssertSqlSafe(unique_sql))
        .bind(table)
        .fetch_all(&db.pool)
        .await
        .map_err(err)?;
    let unique = group_indexes(&rows).map_err(err)?;
    Ok(Some(TableInfo {
        columns,
        primary_key,
        unique,
        missing_privileges,
    }))
}

async fn mysql_missing_privileges(db: &Db, table: &str) -> Result<Vec<String>, SyncError> {
    let err = |e| SyncError::Query {
        what: format!("reading privileges on `{table}`"),
        source: e,
    };
    let user: String = sqlx::query("SELECT CAST(CURRENT_USER() AS CHAR)")
        .fetch_one(&db.pool)
        .await
        .and_then(|r| text(&r, 0))
        .map_err(err)?;
    let grantee = match user.rsplit_once('@') {
        Some((u, h)) => format!("'{u}'@'{h}'"),
        None => format!("'{user}'@'%'"),
    };
    let rows = sqlx::query(AssertSqlSafe(
        "SELECT CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = ? \
         UNION SELECT CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.SCHEMA_PRIVILEGES \
           WHERE GRANTEE = ? AND TABLE_SCHEMA = DATABASE() \
         UNION SELECT CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.TABLE_PRIVILEGES \
           WHERE GRANTEE = ? AND TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    ))
    .bind(&grantee)
    .bind(&grantee)
    .bind(&grantee)
    .bind(table)
    .fetch_all(&db.pool)
    .await
    .map_err(err)?;
    let have: Vec<String> = rows.iter().filter_map(|r| text(r, 0).ok()).collect();
    Ok(["SELECT", "INSERT", "UPDATE", "DELETE", "TRIGGER"]
        .iter()
        .filter(|p| !have.iter().any(|h| h.eq_ignore_ascii_case(p)))
        .map(|p| p.to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_from_urls() {
        assert_eq!(
            Engine::of_url("postgres://u@h/db").unwrap(),
            Engine::Postgres
        );
        assert_eq!(Engine::of_url("mysql://root@h/db").unwrap(), Engine::MySql);
        assert_eq!(Engine::of_url("sqlite://x.db").unwrap(), Engine::Sqlite);
        assert!(Engine::of_url("redis://h").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(Engine::MySql.quote("a`b"), "`a``b`");
        assert_eq!(Engine::Postgres.quote_table("s.t"), "\"s\".\"t\"");
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }
}
