//! Writing a batch of row states into the receiving table so that it ends equal to the source
//! whatever unique constraints the receiving table has. It owns the order of the writes and the
//! recovery from a unique violation; it never decides conflicts or checkpoints (`apply` does).
//!
//! The rows of a batch are the sources's state of their keys read in one query, so they are
//! consistent with each other; a unique value can only collide with (a) another row of the
//! same batch that has not been written yet (a swap, a value moved from one row to another,
//! a key changed), or (b) a row outside the batch whose own change comes in a later batch.
//! So: deletes first (they only free values); then every upsert in one statement; if the
//! receiving side refuses it, row by row, each in a savepoint, retrying refused rows while any
//! row goes through (case a, chains); then rows still blocked by each other (case a, cycles
//! such as a swap) are deleted together and re-inserted. What is left collides with a row
//! outside the batch (case b): it is returned as refused, with the database's reason, for the
//! caller to keep and retry later.
//!
//! No write ever matches a row by anything but its primary key: MariaDB's `ON DUPLICATE KEY
//! UPDATE` matches any unique key, so it is used only for rows whose key already exists (InnoDB
//! checks the primary key first), or on tables without other unique keys.

use std::collections::HashSet;

use sqlx::error::ErrorKind;
use sqlx::{AnyConnection, AssertSqlSafe, Executor};

use super::SyncError;
use super::apply::{KEYS_PER_QUERY, Key, Values, key_in, key_of, query_err, row_values, with_keys};
use super::engine::Engine;
use super::plan::{Plan, Side};

/// A row the receiving side would not hold, and the reason it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub key: Key,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Written {
    /// Rows written or deleted.
    pub rows: u64,
    pub refused: Vec<Refused>,
}

/// How a failed write is handled.
enum Failure {
    /// A unique violation: another write of the batch may clear it.
    Retry(String),
    /// The row breaks another rule of the receiving side (foreign key, NOT NULL, a CHECK, a
    /// value out of range): no order of writes helps.
    Refuse(String),
    /// Not about the row (connection lost, lock timeout): the whole apply fails and is retried.
    Fatal(sqlx::Error),
}

fn classify(e: sqlx::Error) -> Failure {
    let sqlx::Error::Database(d) = &e else {
        return Failure::Fatal(e);
    };
    let reason = match d.constraint() {
        Some(c) if !d.message().contains(c) => format!("{} (constraint `{c}`)", d.message()),
        _ => d.message().to_string(),
    };
    let code = d.code().map(|c| c.to_string()).unwrap_or_default();
    match d.kind() {
        ErrorKind::UniqueViolation => Failure::Retry(reason),
        ErrorKind::ForeignKeyViolation
        | ErrorKind::NotNullViolation
        | ErrorKind::CheckViolation => Failure::Refuse(reason),
        // SQLSTATE class 22 (data exception) and 23 (integrity) on PostgreSQL and MariaDB.
        _ if code.starts_with("22") || code.starts_with("23") => Failure::Refuse(reason),
        _ => Failure::Fatal(e),
    }
}

async fn run(c: &mut AnyConnection, sql: &str) -> Result<(), SyncError> {
    c.execute(sqlx::raw_sql(AssertSqlSafe(sql.to_string())))
        .await
        .map(|_| ())
        .map_err(query_err(format!("`{sql}`")))
}

/// Runs one write inside a savepoint: on failure the transaction is as it was before.
macro_rules! guarded {
    ($c:expr, $name:literal, $write:expr) => {{
        run($c, concat!("SAVEPOINT ", $name)).await?;
        match $write.await {
            Ok(v) => {
                run($c, concat!("RELEASE SAVEPOINT ", $name)).await?;
                Ok(v)
            }
            Err(e) => {
                run($c, concat!("ROLLBACK TO SAVEPOINT ", $name)).await?;
                run($c, concat!("RELEASE SAVEPOINT ", $name)).await?;
                Err(classify(e))
            }
        }
    }};
}

/// Writes `deletes` (keys whose rows are gone) and `upserts` (rows, key columns first) into
/// `to`. Rows whose keys are in `suspects` (refused last time) skip the one-statement path, so
/// a row that stays blocked does not slow every batch down to row-by-row writes.
pub async fn write_rows(
    plan: &Plan,
    to: &Side,
    c: &mut AnyConnection,
    deletes: &[&Key],
    upserts: &[&Values],
    suspects: &HashSet<Key>,
) -> Result<Written, SyncError> {
    let mut out = Written::default();
    let present;
    let deletes: Vec<&Key> = if loose_key(plan, to) && !deletes.is_empty() {
        // `WHERE key = 'A'` also finds a row `a` here: only rows whose key is exactly the
        // deleted one are deleted (the key is unique, so that row is the only match).
        let keys: Vec<Key> = deletes.iter().map(|k| (*k).clone()).collect();
        present = existing(plan, to, c, &keys)
            .await
            .map_err(query_err("finding rows to delete"))?;
        deletes
            .iter()
            .copied()
            .filter(|k| present.contains(*k))
            .collect()
    } else {
        deletes.to_vec()
    };
    let deletes = deletes.as_slice();
    if !deletes.is_empty() {
        match guarded!(c, "sy_batch", delete_keys(plan, to, c, deletes)) {
            Ok(()) => out.rows += deletes.len() as u64,
            Err(Failure::Fatal(e)) => return Err(fatal(e)),
            Err(_) => {
                for k in deletes {
                    match guarded!(c, "sy_row", delete_keys(plan, to, c, &[*k])) {
                        Ok(()) => out.rows += 1,
                        Err(Failure::Fatal(e)) => return Err(fatal(e)),
                        Err(Failure::Retry(reason) | Failure::Refuse(reason)) => {
                            out.refused.push(Refused {
                                key: (*k).clone(),
                                reason,
                            })
                        }
                    }
                }
            }
        }
    }
    let (mut careful, clear): (Vec<&Values>, Vec<&Values>) = upserts
        .iter()
        .partition(|v| suspects.contains(&key_of(v, plan.key_len)));
    if !clear.is_empty() {
        match guarded!(c, "sy_batch", upsert_batch(plan, to, c, &clear)) {
            Ok(()) => out.rows += clear.len() as u64,
            Err(Failure::Fatal(e)) => return Err(fatal(e)),
            Err(_) => {
                let mut all = clear;
                all.extend(careful);
                careful = all;
            }
        }
    }
    if !careful.is_empty() {
        row_by_row(plan, to, c, careful, &mut out).await?;
    }
    Ok(out)
}

fn fatal(e: sqlx::Error) -> SyncError {
    SyncError::Query {
        what: "writing rows".into(),
        source: e,
    }
}

async fn row_by_row(
    plan: &Plan,
    to: &Side,
    c: &mut AnyConnection,
    mut pending: Vec<&Values>,
    out: &mut Written,
) -> Result<(), SyncError> {
    let mut reasons: std::collections::HashMap<Key, String> = Default::default();
    // Chains: a row blocked by a row written later in the pass goes through on the next pass.
    loop {
        let mut blocked = Vec::new();
        let before = pending.len();
        for row in pending {
            match guarded!(c, "sy_row", write_one(plan, to, c, row)) {
                Ok(()) => out.rows += 1,
                Err(Failure::Fatal(e)) => return Err(fatal(e)),
                Err(Failure::Retry(reason)) => {
                    reasons.insert(key_of(row, plan.key_len), reason);
                    blocked.push(row);
                }
                Err(Failure::Refuse(reason)) => out.refused.push(Refused {
                    key: key_of(row, plan.key_len),
                    reason,
                }),
            }
        }
        pending = blocked;
        if pending.is_empty() || pending.len() == before {
            break;
        }
    }
    if loose_key(plan, to) {
        // Deleting by a key that compares loosely could delete another row: no cycle step.
        for row in pending {
            let key = key_of(row, plan.key_len);
            let reason = reasons.remove(&key).unwrap_or_default();
            out.refused.push(Refused { key, reason });
        }
        return Ok(());
    }
    // Cycles: every row still blocked is deleted, then all are inserted again. Rows that still
    // collide do so with a row outside the batch; they are refused and the rest tried again.
    while !pending.is_empty() {
        run(c, "SAVEPOINT sy_cycle").await?;
        let keys: Vec<Key> = pending.iter().map(|r| key_of(r, plan.key_len)).collect();
        let key_refs: Vec<&Key> = keys.iter().collect();
        if let Err(e) = delete_keys(plan, to, c, &key_refs).await {
            run(c, "ROLLBACK TO SAVEPOINT sy_cycle").await?;
            run(c, "RELEASE SAVEPOINT sy_cycle").await?;
            return match classify(e) {
                Failure::Fatal(e) => Err(fatal(e)),
                Failure::Retry(reason) | Failure::Refuse(reason) => {
                    out.refused.extend(keys.into_iter().map(|key| Refused {
                        key,
                        reason: reason.clone(),
                    }));
                    Ok(())
                }
            };
        }
        let mut failed: Vec<(usize, String)> = Vec::new();
        for (i, row) in pending.iter().enumerate() {
            match guarded!(c, "sy_row", insert_rows(plan, to, c, &[*row])) {
                Ok(()) => {}
                Err(Failure::Fatal(e)) => return Err(fatal(e)),
                Err(Failure::Retry(reason) | Failure::Refuse(reason)) => failed.push((i, reason)),
            }
        }
        if failed.is_empty() {
            run(c, "RELEASE SAVEPOINT sy_cycle").await?;
            out.rows += pending.len() as u64;
            break;
        }
        run(c, "ROLLBACK TO SAVEPOINT sy_cycle").await?;
        run(c, "RELEASE SAVEPOINT sy_cycle").await?;
        for (i, reason) in failed.iter().rev() {
            let row = pending.remove(*i);
            out.refused.push(Refused {
                key: key_of(row, plan.key_len),
                reason: reason.clone(),
            });
        }
    }
    Ok(())
}

/// Whether a key column of `to` compares more loosely than byte for byte (accepted with
/// `accept_looser_collation`).
fn loose_key(plan: &Plan, to: &Side) -> bool {
    to.cols[..plan.key_len]
        .iter()
        .any(|c| c.collation != super::engine::Collation::Exact)
}

fn key_cols(plan: &Plan, to: &Side) -> Vec<String> {
    to.cols[..plan.key_len]
        .iter()
        .map(|c| to.db.q(&c.name))
        .collect()
}

async fn delete_keys(
    plan: &Plan,
    to: &Side,
    c: &mut AnyConnection,
    keys: &[&Key],
) -> Result<(), sqlx::Error> {
    let cols = key_cols(plan, to);
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let sql = format!(
            "DELETE FROM {} WHERE {}",
            to.qtable(),
            key_in(to, plan.key_len, &cols, chunk.len(), 1)
        );
        with_keys(&sql, chunk.iter().map(|k| k.as_slice()))
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// Of `keys`, those whose rows exist in `to`, compared by canonical text (byte for byte), and
/// locked until the transaction ends.
async fn existing(
    plan: &Plan,
    to: &Side,
    c: &mut AnyConnection,
    keys: &[Key],
) -> Result<HashSet<Key>, sqlx::Error> {
    let cols = key_cols(plan, to);
    let exprs = plan.key_exprs(to, "");
    let lock = if to.engine() == Engine::Sqlite {
        ""
    } else {
        " FOR UPDATE"
    };
    let mut out = HashSet::new();
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let sql = format!(
            "SELECT {} FROM {} WHERE {}{lock}",
            exprs.join(", "),
            to.qtable(),
            key_in(to, plan.key_len, &cols, chunk.len(), 1)
        );
        let rows = with_keys(&sql, chunk.iter().map(|k| k.as_slice()))
            .fetch_all(&mut *c)
            .await?;
        for r in &rows {
            let v = row_values(r, plan.key_len).map_err(|e| match e {
                SyncError::Query { source, .. } => source,
                other => sqlx::Error::Protocol(other.to_string()),
            })?;
            out.insert(key_of(&v, plan.key_len));
        }
    }
    Ok(out)
}

fn values_list(to: &Side, rows: usize) -> String {
    let e = to.engine();
    let mut p = 1;
    let tuples: Vec<String> = (0..rows)
        .map(|_| {
            let v: Vec<String> = to
                .cols
                .iter()
                .map(|c| {
                    let s = e.value_param(p, c);
                    p += 1;
                    s
                })
                .collect();
            format!("({})", v.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) VALUES {}",
        to.qtable(),
        to.cols
            .iter()
            .map(|c| to.db.q(&c.name))
            .collect::<Vec<_>>()
            .join(", "),
        tuples.join(", ")
    )
}

/// The clause after `INSERT … VALUES` that turns it into an update of the row with the same
/// primary key.
fn upsert_clause(plan: &Plan, to: &Side) -> String {
    let cols: Vec<String> = to.cols.iter().map(|c| to.db.q(&c.name)).collect();
    let (keys, rest) = cols.split_at(plan.key_len);
    match to.engine() {
        Engine::MySql => {
            let set = if rest.is_empty() {
                format!("{0} = {0}", keys[0])
            } else {
                rest.iter()
                    .map(|c| format!("{c} = VALUES({c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(" ON DUPLICATE KEY UPDATE {set}")
        }
        _ if rest.is_empty() => format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", ")),
        _ => format!(
            " ON CONFLICT ({}) DO UPDATE SET {}",
            keys.join(", "),
            rest.iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

async fn write_statements(
    to: &Side,
    c: &mut AnyConnection,
    rows: &[&Values],
    clause: &str,
) -> Result<(), sqlx::Error> {
    let per_stmt = (30_000 / to.cols.len().max(1)).clamp(1, 1000);
    for chunk in rows.chunks(per_stmt) {
        let sql = format!("{}{clause}", values_list(to, chunk.len()));
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for row in chunk {
            for v in row.iter() {
                q = q.bind(v.clone());
            }
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

async fn insert_rows(
    _plan: &Plan,
    to: &Side,
    c: &mut AnyConnection,
    rows: &[&Values],
) -> Result<(), sqlx::Error> {
    write_statements(to, c, rows, "").await
}

/// Every row in as few statements as possible; fails as a whole.
async fn upsert_batch(
    plan: &Plan,
    to: &Side,
    c: &mut AnyConnection,
    rows: &[&Values],
) -> Result<(), sqlx::Error> {
    if to.engine() != Engine::MySql || (to.unique.is_empty() && !loose_key(plan, to)) {
        // PostgreSQL's and SQLite's ON CONFLICT names the primary key: any other unique
        // violation is an error, never a merge.
        return write_statements(to, c, rows, &upsert_clause(plan, to)).await;
    }
    let keys: Vec<Key> = rows.iter().map(|r| key_of(r, plan.key_len)).collect();
    let present = existing(plan, to, c, &keys).await?;
    let (update, insert): (Vec<&Values>, Vec<&Values>) = rows
        .iter()
        .partition(|r| present.contains(&key_of(r, plan.key_len)));
    insert_rows(plan, to, c, &insert).await?;
    write_statements(to, c, &update, &upsert_clause(plan, to)).await
}

/// One row: an update of the row with its key when that exists, an insert otherwise.
async fn write_one(
    plan: &Plan,
    to: &Side,
    c: &mut AnyConnection,
    row: &Values,
) -> Result<(), sqlx::Error> {
    let key = key_of(row, plan.key_len);
    let present = existing(plan, to, c, std::slice::from_ref(&key)).await?;
    if !present.contains(&key) {
        return insert_rows(plan, to, c, &[row]).await;
    }
    if to.cols.len() == plan.key_len {
        return Ok(());
    }
    let e = to.engine();
    let n = to.cols.len();
    let set: Vec<String> = to.cols[plan.key_len..]
        .iter()
        .enumerate()
        .map(|(i, col)| format!("{} = {}", to.db.q(&col.name), e.value_param(i + 1, col)))
        .collect();
    let sql = format!(
        "UPDATE {} SET {} WHERE {}",
        to.qtable(),
        set.join(", "),
        key_in(
            to,
            plan.key_len,
            &key_cols(plan, to),
            1,
            n - plan.key_len + 1
        )
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for v in &row[plan.key_len..] {
        q = q.bind(v.clone());
    }
    for k in &key {
        q = q.bind(k.clone());
    }
    q.execute(&mut *c).await.map(|_| ())
}
