//! Moving rows: reading captured keys, fetching the rows' current state, and applying them
//! to the other side in one transaction that also writes the checkpoint and checks the lease,
//! so a crash at any point neither loses nor double-applies a change. Conflicts of a
//! bidirectional pair are decided here and logged in the same transaction.

use sqlx::AssertSqlSafe;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use sqlx::AnyConnection;
use sqlx::{Acquire, Row};

use crate::config::Conflict;

use super::SyncError;
use super::canon::{Kind, Purpose};
use super::engine::Engine;
use super::plan::{Direction, Plan, Side};
use super::write::{Refused, write_rows};

/// Canonical text of a row's key columns.
pub type Key = Vec<String>;
/// Canonical text of a row's mapped columns, key columns first.
pub type Values = Vec<Option<String>>;

/// Captured changes read from one side, not yet applied.
#[derive(Debug, Default)]
pub struct ChangeBatch {
    pub seqs: Vec<i64>,
    /// The key of each change, beside `seqs`.
    pub seq_keys: Vec<Key>,
    /// Distinct keys, in the order first seen.
    pub keys: Vec<Key>,
    /// Write time of each change, microseconds since the epoch.
    pub changed_at: Vec<i64>,
}

/// What the checkpoint of an apply records.
pub enum Progress {
    /// Every change read, as (sequence number, key); a change whose row the receiving side
    /// refused is not consumed, so it is read and tried again.
    Stream { changes: Vec<(i64, Key)> },
    Backfill {
        after: String,
        /// Rows copied before this chunk; the rows this chunk writes are added.
        copied: u64,
        total: u64,
        done: bool,
    },
}

#[derive(Debug, Default)]
pub struct Applied {
    pub rows: u64,
    pub conflicts: u64,
    /// Rows the receiving side would not hold (kept for a later try: their changes stay in the
    /// change table; a backfill re-queues them there).
    pub refused: Vec<Refused>,
    /// Sequence numbers consumed, as `encode_seqs` writes them (streaming only).
    pub consumed: String,
    /// Changes consumed (streaming only).
    pub changes: u64,
}

pub(crate) fn query_err(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SyncError {
    let what = what.into();
    move |source| SyncError::Query { what, source }
}

fn opt_text(row: &sqlx::any::AnyRow, i: usize) -> Result<Option<String>, sqlx::Error> {
    row.try_get::<Option<String>, _>(i)
}

/// `lhs IN (tuples)` over `n` keys of `cols.len()` columns, parameters numbered from `first`;
/// `param(n, i)` spells the placeholder of parameter `n` for key column `i`.
fn in_list(
    cols: &[String],
    n: usize,
    first: usize,
    param: impl Fn(usize, usize) -> String,
) -> String {
    let one = cols.len() == 1;
    let lhs = if one {
        cols[0].clone()
    } else {
        format!("({})", cols.join(", "))
    };
    let mut p = first;
    let tuples: Vec<String> = (0..n)
        .map(|_| {
            let vals: Vec<String> = (0..cols.len())
                .map(|i| {
                    let s = param(p, i);
                    p += 1;
                    s
                })
                .collect();
            if one {
                vals[0].clone()
            } else {
                format!("({})", vals.join(", "))
            }
        })
        .collect();
    format!("{lhs} IN ({})", tuples.join(", "))
}

/// The key columns of a table, compared in the column's own type.
pub(crate) fn key_in(
    side: &Side,
    key_len: usize,
    cols: &[String],
    n: usize,
    first: usize,
) -> String {
    let e = side.engine();
    in_list(&cols[..key_len], n, first, |p, i| {
        e.value_param(p, &side.cols[i])
    })
}

/// The key columns of a change table: plain text, compared byte for byte.
pub fn chg_key_in(e: Engine, key_len: usize, n: usize, first: usize) -> String {
    let cols: Vec<String> = (1..=key_len).map(|i| format!("k{i}")).collect();
    in_list(&cols, n, first, |p, _| e.param(p))
}

/// A query with every column of every key bound, in order (the placeholders come from
/// `key_in` / `chg_key_in`).
pub fn with_keys<'q, K: AsRef<[String]> + 'q>(
    sql: &'q str,
    keys: impl IntoIterator<Item = K>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for k in keys {
        for v in k.as_ref() {
            q = q.bind(v.clone());
        }
    }
    q
}

pub(crate) const KEYS_PER_QUERY: usize = 1000;

/// Reads up to `limit` captured changes, oldest first.
pub async fn read_changes(
    plan: &Plan,
    from: &Side,
    conn: &mut AnyConnection,
    limit: usize,
) -> Result<ChangeBatch, SyncError> {
    let ks: Vec<String> = (1..=plan.key_len).map(|i| format!("k{i}")).collect();
    let sql = format!(
        "SELECT seq, {}, changed_at FROM {} ORDER BY seq LIMIT {limit}",
        ks.join(", "),
        plan.change_table()
    );
    let rows = sqlx::query(AssertSqlSafe(sql.as_str()))
        .fetch_all(&mut *conn)
        .await
        .map_err(query_err(format!("reading changes of `{}`", from.table)))?;
    let mut batch = ChangeBatch::default();
    let mut seen = HashSet::new();
    for r in &rows {
        let seq: i64 = r.try_get(0).map_err(query_err("reading a change"))?;
        let mut key = Vec::with_capacity(plan.key_len);
        for i in 0..plan.key_len {
            key.push(
                opt_text(r, i + 1)
                    .map_err(query_err("reading a change"))?
                    .unwrap_or_default(),
            );
        }
        let at: i64 = r
            .try_get(plan.key_len + 1)
            .map_err(query_err("reading a change"))?;
        batch.seqs.push(seq);
        batch.seq_keys.push(key.clone());
        batch.changed_at.push(at);
        if seen.insert(key.clone()) {
            batch.keys.push(key);
        }
    }
    Ok(batch)
}

/// The current state of `keys` on `side`; absent keys are deleted rows.
pub async fn fetch_rows(
    plan: &Plan,
    side: &Side,
    conn: &mut AnyConnection,
    keys: &[Key],
    purpose: Purpose,
) -> Result<HashMap<Key, Values>, SyncError> {
    let mut out = HashMap::with_capacity(keys.len());
    let key_cols: Vec<String> = side.cols[..plan.key_len]
        .iter()
        .map(|c| side.db.q(&c.name))
        .collect();
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            plan.select_list(side, purpose, ""),
            side.qtable(),
            key_in(side, plan.key_len, &key_cols, chunk.len(), 1)
        );
        let q = with_keys(&sql, chunk.iter().map(|k| k.as_slice()));
        let rows = q
            .fetch_all(&mut *conn)
            .await
            .map_err(query_err(format!("reading rows of `{}`", side.table)))?;
        for r in &rows {
            let vals = row_values(r, side.cols.len())?;
            out.insert(key_of(&vals, plan.key_len), vals);
        }
    }
    Ok(out)
}

pub fn row_values(r: &sqlx::any::AnyRow, n: usize) -> Result<Values, SyncError> {
    (0..n)
        .map(|i| opt_text(r, i).map_err(query_err("reading a row")))
        .collect()
}

pub fn key_of(vals: &Values, key_len: usize) -> Key {
    vals[..key_len]
        .iter()
        .map(|v| v.clone().unwrap_or_default())
        .collect()
}

/// Reads the next backfill chunk after `after`, in key order.
pub async fn read_chunk(
    plan: &Plan,
    conn: &mut AnyConnection,
    after: Option<&Key>,
    limit: usize,
) -> Result<Vec<Values>, SyncError> {
    let side = &plan.source;
    let e = side.engine();
    // Qualified: on Postgres an unqualified ORDER BY name would pick the canonical text
    // output column of the same name, and text order is not key order.
    let key_cols: Vec<String> = side.cols[..plan.key_len]
        .iter()
        .map(|c| format!("sy_t.{}", side.db.q(&c.name)))
        .collect();
    let lhs = if plan.key_len == 1 {
        key_cols[0].clone()
    } else {
        format!("({})", key_cols.join(", "))
    };
    let filter = match after {
        None => String::new(),
        Some(_) => {
            let ps: Vec<String> = (0..plan.key_len)
                .map(|i| e.value_param(i + 1, &side.cols[i]))
                .collect();
            let rhs = if plan.key_len == 1 {
                ps[0].clone()
            } else {
                format!("({})", ps.join(", "))
            };
            format!("WHERE {lhs} > {rhs}")
        }
    };
    let sql = format!(
        "SELECT {} FROM {} sy_t {filter} ORDER BY {} LIMIT {limit}",
        plan.select_list(side, Purpose::Copy, "sy_t."),
        side.qtable(),
        key_cols.join(", ")
    );
    let q = with_keys(&sql, after.map(|k| k.as_slice()));
    let rows = q.fetch_all(&mut *conn).await.map_err(query_err(format!(
        "reading a backfill chunk of `{}`",
        side.table
    )))?;
    rows.iter()
        .map(|r| row_values(r, side.cols.len()))
        .collect()
}

/// Which side of a conflicting key keeps its state.
fn conflict_winner(
    plan: &Plan,
    dir: Direction,
    from_row: Option<&Values>,
    to_row: Option<&Values>,
) -> Direction {
    // The returned direction names the side that wins: SourceToTarget = the configured
    // source, TargetToSource = the configured target.
    let source_is_from = dir == Direction::SourceToTarget;
    let (source_row, target_row) = if source_is_from {
        (from_row, to_row)
    } else {
        (to_row, from_row)
    };
    match &plan.conflict {
        Conflict::SourceWins => Direction::SourceToTarget,
        Conflict::TargetWins => Direction::TargetToSource,
        Conflict::LastWriteWins { .. } => {
            let i = plan.lww.unwrap_or(0);
            let kind = plan.kinds.get(i).copied().unwrap_or(Kind::Text);
            let s = source_row.and_then(|r| r[i].as_deref());
            let t = target_row.and_then(|r| r[i].as_deref());
            match compare_canonical(kind, s, t) {
                Ordering::Less => Direction::TargetToSource,
                // Ties go to the source, so both replicas of a decision agree.
                _ => Direction::SourceToTarget,
            }
        }
    }
}

/// Orders canonical values; NULL (or a deleted row) is older than any value.
pub fn compare_canonical(kind: Kind, a: Option<&str>, b: Option<&str>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(a), Some(b)) => match kind {
            Kind::Int | Kind::Bool | Kind::Decimal(_) | Kind::Float => {
                match (a.parse::<f64>(), b.parse::<f64>()) {
                    (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
                    _ => a.cmp(b),
                }
            }
            // Canonical timestamps and dates sort as text.
            _ => a.cmp(b),
        },
    }
}

fn rule_name(c: &Conflict) -> String {
    match c {
        Conflict::SourceWins => "source_wins".into(),
        Conflict::TargetWins => "target_wins".into(),
        Conflict::LastWriteWins { column } => format!("last_write_wins:{column}"),
    }
}

/// Applies the state of `items` (key → row, `None` = deleted) read on the `dir` source side
/// to the other side, with the checkpoint, in one transaction. Fails with `LostLease` when
/// another process holds the pair.
#[allow(clippy::too_many_arguments)]
pub async fn apply(
    plan: &Plan,
    dir: Direction,
    conn: &mut AnyConnection,
    items: &[(Key, Option<Values>)],
    progress: Progress,
    holder: &str,
    suspects: &HashSet<Key>,
) -> Result<Applied, SyncError> {
    let (_, to) = plan.sides(dir);
    let e = to.engine();
    let mut tx = conn
        .begin()
        .await
        .map_err(query_err("starting the apply transaction"))?;
    if e == Engine::Sqlite {
        sqlx::query("UPDATE switchyard_session SET applying = 1")
            .execute(&mut *tx)
            .await
            .map_err(query_err("tagging the applying session"))?;
    }
    let mut skip: HashSet<&Key> = HashSet::new();
    let mut conflicts = 0u64;
    if plan.bidirectional && !items.is_empty() {
        // Keys changed on the receiving side since it was last read are in conflict.
        let keys: Vec<&Key> = items.iter().map(|(k, _)| k).collect();
        let mut pending: Vec<Key> = Vec::new();
        for chunk in keys.chunks(KEYS_PER_QUERY) {
            let ks: Vec<String> = (1..=plan.key_len).map(|i| format!("k{i}")).collect();
            let sql = format!(
                "SELECT DISTINCT {} FROM {} WHERE {}",
                ks.join(", "),
                plan.change_table(),
                chg_key_in(e, plan.key_len, chunk.len(), 1)
            );
            let q = with_keys(&sql, chunk.iter().map(|k| k.as_slice()));
            let rows = q
                .fetch_all(&mut *tx)
                .await
                .map_err(query_err("looking for conflicting changes"))?;
            for r in &rows {
                pending.push(
                    row_values(r, plan.key_len)?
                        .into_iter()
                        .map(|v| v.unwrap_or_default())
                        .collect(),
                );
            }
        }
        if !pending.is_empty() {
            let theirs = fetch_rows(plan, to, &mut tx, &pending, Purpose::Copy).await?;
            let pending: HashSet<Key> = pending.into_iter().collect();
            let now = {
                let r = sqlx::query(AssertSqlSafe(format!("SELECT {}", e.now_micros_sql())))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(query_err("reading the clock"))?;
                r.try_get::<i64, _>(0).unwrap_or_default()
            };
            let mut drop_theirs: Vec<&Key> = Vec::new();
            for (k, ours) in items {
                if !pending.contains(k) {
                    continue;
                }
                conflicts += 1;
                let their_row = theirs.get(k);
                let winner = conflict_winner(plan, dir, ours.as_ref(), their_row);
                let from_wins =
                    (winner == Direction::SourceToTarget) == (dir == Direction::SourceToTarget);
                if from_wins {
                    drop_theirs.push(k);
                } else {
                    skip.insert(k);
                }
                let (source_row, target_row) = if dir == Direction::SourceToTarget {
                    (ours.as_ref(), their_row)
                } else {
                    (their_row, ours.as_ref())
                };
                let json =
                    |r: Option<&Values>| r.map(|v| serde_json::to_string(v).unwrap_or_default());
                let sql = format!(
                    "INSERT INTO switchyard_sync_conflicts (sync, row_key, winner, rule, source_row, target_row, at_micros) VALUES ({}, {}, {}, {}, {}, {}, {})",
                    e.param(1),
                    e.param(2),
                    e.param(3),
                    e.param(4),
                    e.param(5),
                    e.param(6),
                    e.param(7)
                );
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(plan.name.as_str())
                    .bind(serde_json::to_string(k).unwrap_or_default())
                    .bind(if winner == Direction::SourceToTarget {
                        "source"
                    } else {
                        "target"
                    })
                    .bind(rule_name(&plan.conflict))
                    .bind(json(source_row))
                    .bind(json(target_row))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err("logging a conflict"))?;
            }
            for chunk in drop_theirs.chunks(KEYS_PER_QUERY) {
                let sql = format!(
                    "DELETE FROM {} WHERE {}",
                    plan.change_table(),
                    chg_key_in(e, plan.key_len, chunk.len(), 1)
                );
                let q = with_keys(&sql, chunk.iter().map(|k| k.as_slice()));
                q.execute(&mut *tx)
                    .await
                    .map_err(query_err("dropping overridden changes"))?;
            }
        }
    }
    let mut upserts: Vec<&Values> = Vec::new();
    let mut deletes: Vec<&Key> = Vec::new();
    for (k, v) in items {
        if skip.contains(k) {
            continue;
        }
        match v {
            Some(v) => upserts.push(v),
            None => deletes.push(k),
        }
    }
    let written = write_rows(plan, to, &mut tx, &deletes, &upserts, suspects).await?;
    let refused: HashSet<&Key> = written.refused.iter().map(|r| &r.key).collect();
    let (consumed, changes) = match &progress {
        Progress::Stream { changes } => {
            let seqs: Vec<i64> = changes
                .iter()
                .filter(|(_, k)| !refused.contains(k))
                .map(|(s, _)| *s)
                .collect();
            (encode_seqs(&seqs), seqs.len() as u64)
        }
        Progress::Backfill { .. } => (String::new(), 0),
    };
    if let Progress::Backfill { .. } = &progress
        && !written.refused.is_empty()
    {
        // Written before the target commits: if the commit fails, the keys are only tried once
        // more, which is harmless; the other order could lose them.
        let keys: Vec<Key> = written.refused.iter().map(|r| r.key.clone()).collect();
        requeue(plan, &keys).await?;
    }
    super::failpoint("mid_apply");
    let p = |n| e.param(n);
    let now = e.now_micros_sql();
    let result = match &progress {
        Progress::Stream { .. } => {
            let sql = format!(
                "UPDATE switchyard_sync_state SET consumed = {}, applied = applied + {}, conflicts = conflicts + {}, updated_at = {now} WHERE name = {} AND holder = {}",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5)
            );
            sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(consumed.as_str())
                .bind(changes as i64)
                .bind(conflicts as i64)
                .bind(plan.state_row(dir))
                .bind(holder)
                .execute(&mut *tx)
                .await
        }
        Progress::Backfill {
            after,
            copied,
            total,
            done,
        } => {
            let sql = format!(
                "UPDATE switchyard_sync_state SET backfill_after = {}, backfill_copied = {}, backfill_total = {}, phase = {}, conflicts = conflicts + {}, updated_at = {now} WHERE name = {} AND holder = {}",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5),
                p(6),
                p(7)
            );
            sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(after.as_str())
                .bind((*copied + written.rows) as i64)
                .bind((*total).max(*copied + written.rows) as i64)
                .bind(if *done { "stream" } else { "backfill" })
                .bind(conflicts as i64)
                .bind(plan.state_row(dir))
                .bind(holder)
                .execute(&mut *tx)
                .await
        }
    }
    .map_err(query_err("writing the checkpoint"))?;
    if result.rows_affected() != 1 {
        return Err(SyncError::LostLease(plan.name.clone()));
    }
    if e == Engine::Sqlite {
        sqlx::query("UPDATE switchyard_session SET applying = 0")
            .execute(&mut *tx)
            .await
            .map_err(query_err("untagging the applying session"))?;
    }
    super::failpoint("before_target_commit");
    tx.commit()
        .await
        .map_err(query_err("committing the apply transaction"))?;
    super::failpoint("after_target_commit");
    Ok(Applied {
        rows: written.rows,
        conflicts,
        refused: written.refused,
        consumed,
        changes,
    })
}

/// Sequence numbers as `a-b,c-d` runs: compact, and exact (a number that was not read is
/// never inside a run, so a change committed late is never deleted unread).
pub fn encode_seqs(seqs: &[i64]) -> String {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(format!("{start}-{end}"));
        i += 1;
    }
    out.join(",")
}

pub fn decode_seqs(text: &str) -> Vec<(i64, i64)> {
    text.split(',')
        .filter_map(|run| {
            let (a, b) = run.split_once('-')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Deletes consumed changes from the side they were captured on.
pub async fn delete_consumed(
    plan: &Plan,
    conn: &mut AnyConnection,
    runs: &[(i64, i64)],
) -> Result<(), SyncError> {
    for chunk in runs.chunks(200) {
        let cond = chunk
            .iter()
            .map(|(a, b)| {
                if a == b {
                    format!("seq = {a}")
                } else {
                    format!("seq BETWEEN {a} AND {b}")
                }
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE {cond}",
            plan.change_table()
        )))
        .execute(&mut *conn)
        .await
        .map_err(query_err("deleting consumed changes"))?;
    }
    Ok(())
}

/// Re-queues keys through the sync worker: they are written into the source's change table as
/// if they had just changed, and the worker copies their source state (or deletes them).
pub async fn requeue(plan: &Plan, keys: &[Key]) -> Result<usize, SyncError> {
    let e = plan.source.engine();
    let ks: Vec<String> = (1..=plan.key_len).map(|i| format!("k{i}")).collect();
    for chunk in keys.chunks(500) {
        let mut p = 0;
        let tuples: Vec<String> = chunk
            .iter()
            .map(|_| {
                let v: Vec<String> = (0..plan.key_len)
                    .map(|_| {
                        p += 1;
                        e.param(p)
                    })
                    .collect();
                format!("({}, {})", v.join(", "), e.now_micros_sql())
            })
            .collect();
        let sql = format!(
            "INSERT INTO {} ({}, changed_at) VALUES {}",
            plan.change_table(),
            ks.join(", "),
            tuples.join(", ")
        );
        with_keys(&sql, chunk.iter().map(|k| k.as_slice()))
            .execute(&plan.source.db.pool)
            .await
            .map_err(query_err("re-queueing keys into the change table"))?;
    }
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_runs_round_trip() {
        let s = encode_seqs(&[5, 1, 2, 3, 7, 8, 10]);
        assert_eq!(s, "1-3,5-5,7-8,10-10");
        assert_eq!(decode_seqs(&s), vec![(1, 3), (5, 5), (7, 8), (10, 10)]);
        assert_eq!(encode_seqs(&[]), "");
        assert!(decode_seqs("").is_empty());
    }

    #[test]
    fn canonical_order() {
        assert_eq!(
            compare_canonical(Kind::Int, Some("9"), Some("10")),
            Ordering::Less
        );
        assert_eq!(
            compare_canonical(
                Kind::Timestamp,
                Some("2024-01-02 00:00:00.000000"),
                Some("2024-01-01 23:59:59.999999")
            ),
            Ordering::Greater
        );
        assert_eq!(
            compare_canonical(Kind::Timestamp, None, Some("2024-01-01 00:00:00.000000")),
            Ordering::Less
        );
    }
}
