//! The full check of a sync pair: checksum bisection. Each side sums a 32-bit hash of every
//! row's canonical text per key range, in SQL where the engine can hash (PostgreSQL, MariaDB;
//! SQLite, which cannot, is read once into memory — it is local). Ranges that differ are split
//! until they are small, then their rows are read and diffed in Rust. Integer keys are split
//! by value (index ranges); any other key by a hash of its canonical text, so that collation
//! differences between engines cannot mislead.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};

use crate::sync::canon::{Kind, Purpose};
use crate::sync::engine::Engine;
use crate::sync::plan::{Plan, Side};

use crate::sync::canon::encode_row_sql;

use super::{ConsistencyError, query_err, row_hash};

type Values = Vec<Option<String>>;

/// Ranges with at most this many rows on either side are diffed row by row.
const LEAF_ROWS: i64 = 2000;
const FANOUT: i64 = 16;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    pub key: Vec<String>,
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub sync: String,
    pub equal: bool,
    pub rows_compared: u64,
    pub missing_in_target: Vec<Vec<String>>,
    pub extra_in_target: Vec<Vec<String>>,
    pub different: Vec<Difference>,
    pub seconds: f64,
    /// Keys re-queued through the sync worker, with `--repair`.
    pub requeued: Option<usize>,
}

/// How a range is addressed: by the integer key itself, or by the hash of the key's text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Partition {
    IntKey,
    KeyHash,
}

/// A side that answers range summaries.
enum Summer<'a> {
    Sql(&'a Side),
    /// SQLite: every row's position, key and values, sorted by position.
    Memory(Vec<(i64, Values)>),
}

/// The 60-bit row hash of `row_hash`, in SQL: the first 15 hex digits of SHA-256 of the row
/// encoding (60 bits stay non-negative in a signed 64-bit integer on every engine).
fn hash_sql(e: Engine, exprs: &[String]) -> String {
    let text = encode_row_sql(e, exprs);
    match e {
        Engine::Postgres => format!(
            "('x' || substr(encode(sha256(convert_to({text}, 'UTF8')), 'hex'), 1, 15))::bit(60)::bigint"
        ),
        _ => format!("CAST(CONV(SUBSTR(SHA2({text}, 256), 1, 15), 16, 10) AS UNSIGNED)"),
    }
}

/// Canonical expressions per column (a joined select list cannot be split back: the
/// expressions themselves contain commas).
fn column_exprs(plan: &Plan, side: &Side, purpose: Purpose) -> Vec<String> {
    side.cols
        .iter()
        .zip(&plan.kinds)
        .map(|(c, k)| {
            crate::sync::canon::canon_sql(side.engine(), &side.db.q(&c.name), c.kind, *k, purpose)
        })
        .collect()
}

fn position_sql(plan: &Plan, side: &Side, part: Partition) -> String {
    match part {
        Partition::IntKey => side.db.q(&side.cols[0].name),
        Partition::KeyHash => {
            let keys = &column_exprs(plan, side, Purpose::Compare)[..plan.key_len];
            hash_sql(side.engine(), keys)
        }
    }
}

fn position_of(part: Partition, key: &[Option<String>]) -> i64 {
    match part {
        Partition::IntKey => key[0]
            .as_deref()
            .and_then(|k| k.parse().ok())
            .unwrap_or_default(),
        Partition::KeyHash => row_hash(key),
    }
}

impl Summer<'_> {
    async fn new<'a>(
        plan: &Plan,
        side: &'a Side,
        part: Partition,
    ) -> Result<Summer<'a>, ConsistencyError> {
        if side.engine() != Engine::Sqlite {
            return Ok(Summer::Sql(side));
        }
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM {}",
            column_exprs(plan, side, Purpose::Compare).join(", "),
            side.qtable()
        )))
        .fetch_all(&side.db.pool)
        .await
        .map_err(query_err(format!("reading `{}`", side.table)))?;
        let mut all = Vec::with_capacity(rows.len());
        for r in &rows {
            let vals = crate::sync::apply::row_values(r, side.cols.len())?;
            all.push((position_of(part, &vals[..plan.key_len]), vals));
        }
        all.sort_by_key(|(p, _)| *p);
        Ok(Summer::Memory(all))
    }

    async fn bounds(
        &self,
        plan: &Plan,
        part: Partition,
    ) -> Result<Option<(i64, i64)>, ConsistencyError> {
        match self {
            Summer::Memory(rows) => Ok(rows.first().zip(rows.last()).map(|(a, b)| (a.0, b.0))),
            Summer::Sql(side) => {
                let pos = position_sql(plan, side, part);
                let r = sqlx::query(AssertSqlSafe(format!(
                    "SELECT CAST(MIN({pos}) AS {t}), CAST(MAX({pos}) AS {t}) FROM {}",
                    side.qtable(),
                    t = int_text(side.engine())
                )))
                .fetch_one(&side.db.pool)
                .await
                .map_err(query_err("reading key bounds"))?;
                let lo: Option<String> = r.try_get(0).unwrap_or(None);
                let hi: Option<String> = r.try_get(1).unwrap_or(None);
                Ok(lo
                    .and_then(|l| l.parse().ok())
                    .zip(hi.and_then(|h| h.parse().ok())))
            }
        }
    }

    /// Row count and checksum sum of `[lo, hi]`.
    async fn summary(
        &self,
        plan: &Plan,
        part: Partition,
        lo: i64,
        hi: i64,
    ) -> Result<(i64, i128), ConsistencyError> {
        match self {
            Summer::Memory(rows) => {
                let (a, b) = slice_range(rows, lo, hi);
                let sum = rows[a..b].iter().map(|(_, v)| row_hash(v) as i128).sum();
                Ok(((b - a) as i64, sum))
            }
            Summer::Sql(side) => {
                let e = side.engine();
                let h = hash_sql(e, &column_exprs(plan, side, Purpose::Compare));
                let pos = position_sql(plan, side, part);
                let r = sqlx::query(AssertSqlSafe(format!(
                    "SELECT COUNT(*), CAST(COALESCE(SUM({h}), 0) AS {t}) FROM {} WHERE {pos} BETWEEN {lo} AND {hi}",
                    side.qtable(),
                    t = int_text(e)
                )))
                .fetch_one(&side.db.pool)
                .await
                .map_err(query_err(format!("summing a range of `{}`", side.table)))?;
                let n: i64 = r.try_get(0).map_err(query_err("reading a range count"))?;
                let s: Option<String> = r.try_get(1).unwrap_or(None);
                Ok((n, s.and_then(|s| s.parse().ok()).unwrap_or_default()))
            }
        }
    }

    async fn rows(
        &self,
        plan: &Plan,
        part: Partition,
        lo: i64,
        hi: i64,
    ) -> Result<BTreeMap<Vec<String>, Values>, ConsistencyError> {
        let mut out = BTreeMap::new();
        match self {
            Summer::Memory(rows) => {
                let (a, b) = slice_range(rows, lo, hi);
                for (_, v) in &rows[a..b] {
                    out.insert(crate::sync::apply::key_of(v, plan.key_len), v.clone());
                }
            }
            Summer::Sql(side) => {
                let pos = position_sql(plan, side, part);
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {} FROM {} WHERE {pos} BETWEEN {lo} AND {hi}",
                    column_exprs(plan, side, Purpose::Compare).join(", "),
                    side.qtable()
                )))
                .fetch_all(&side.db.pool)
                .await
                .map_err(query_err(format!("reading a range of `{}`", side.table)))?;
                for r in &rows {
                    let v = crate::sync::apply::row_values(r, side.cols.len())?;
                    out.insert(crate::sync::apply::key_of(&v, plan.key_len), v);
                }
            }
        }
        Ok(out)
    }
}

fn int_text(e: Engine) -> &'static str {
    match e {
        Engine::Postgres => "text",
        _ => "CHAR",
    }
}

fn slice_range(rows: &[(i64, Values)], lo: i64, hi: i64) -> (usize, usize) {
    let a = rows.partition_point(|(p, _)| *p < lo);
    let b = rows.partition_point(|(p, _)| *p <= hi);
    (a, b.max(a))
}

/// Compares the whole pair. `rows_compared` counts source rows.
pub async fn check(plan: &Plan) -> Result<CheckReport, ConsistencyError> {
    let started = Instant::now();
    let part = if plan.key_len == 1 && plan.kinds[0] == Kind::Int {
        Partition::IntKey
    } else {
        Partition::KeyHash
    };
    let (s, t) = tokio::join!(
        Summer::new(plan, &plan.source, part),
        Summer::new(plan, &plan.target, part)
    );
    let (s, t) = (s?, t?);
    let (bs, bt) = tokio::join!(s.bounds(plan, part), t.bounds(plan, part));
    let bounds = match (bs?, bt?) {
        (None, None) => None,
        (Some(a), None) | (None, Some(a)) => Some(a),
        (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
    };
    let mut report = CheckReport {
        sync: plan.name.clone(),
        equal: true,
        rows_compared: 0,
        missing_in_target: vec![],
        extra_in_target: vec![],
        different: vec![],
        seconds: 0.0,
        requeued: None,
    };
    let mut stack: Vec<(i64, i64)> = bounds.map(|b| split(b.0, b.1)).unwrap_or_default();
    while let Some((lo, hi)) = stack.pop() {
        let (a, b) = tokio::join!(s.summary(plan, part, lo, hi), t.summary(plan, part, lo, hi));
        let ((cs, ss), (ct, st)) = (a?, b?);
        if cs == ct && ss == st {
            report.rows_compared += cs as u64;
            continue;
        }
        if cs.max(ct) > LEAF_ROWS && hi > lo {
            stack.extend(split(lo, hi));
            continue;
        }
        let (a, b) = tokio::join!(s.rows(plan, part, lo, hi), t.rows(plan, part, lo, hi));
        let (a, b) = (a?, b?);
        report.rows_compared += a.len() as u64;
        diff(plan, &a, &b, &mut report);
    }
    report.equal = report.missing_in_target.is_empty()
        && report.extra_in_target.is_empty()
        && report.different.is_empty();
    report.missing_in_target.sort();
    report.extra_in_target.sort();
    report.different.sort_by(|a, b| a.key.cmp(&b.key));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn split(lo: i64, hi: i64) -> Vec<(i64, i64)> {
    let width = (hi as i128 - lo as i128 + 1).max(1);
    let step = ((width + FANOUT as i128 - 1) / FANOUT as i128).max(1);
    let mut out = Vec::new();
    let mut a = lo as i128;
    while a <= hi as i128 {
        let b = (a + step - 1).min(hi as i128);
        out.push((a as i64, b as i64));
        a = b + 1;
    }
    out
}

fn diff(
    plan: &Plan,
    source: &BTreeMap<Vec<String>, Values>,
    target: &BTreeMap<Vec<String>, Values>,
    report: &mut CheckReport,
) {
    for (k, sv) in source {
        match target.get(k) {
            None => report.missing_in_target.push(k.clone()),
            Some(tv) if tv != sv => {
                let columns = plan
                    .source
                    .cols
                    .iter()
                    .zip(sv.iter().zip(tv))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(c, _)| c.name.clone())
                    .collect();
                report.different.push(Difference {
                    key: k.clone(),
                    columns,
                });
            }
            _ => {}
        }
    }
    for k in target.keys() {
        if !source.contains_key(k) {
            report.extra_in_target.push(k.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_and_cover() {
        let parts = split(1, 100);
        assert_eq!(parts.first().unwrap().0, 1);
        assert_eq!(parts.last().unwrap().1, 100);
        assert_eq!(parts.len(), 15);
        for w in parts.windows(2) {
            assert_eq!(w[0].1 + 1, w[1].0);
        }
        assert_eq!(split(5, 5), vec![(5, 5)]);
        let wide = split(0, u32::MAX as i64);
        assert_eq!(wide.len(), 16);
    }
}
