//! The continuous sampler of one pair: at `sample_rate`, random keys drawn from both sides
//! (so rows missing on either side are found), both rows read in canonical form and compared.
//! A key still waiting in a capture table is in flight: it is rechecked later and never counted
//! as a mismatch while it waits. A difference is counted only when it is seen again on a
//! recheck, so the few milliseconds between reading one side and the other cannot fake one.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngExt;
use sqlx::{AssertSqlSafe, Row};

use crate::config::{ConsistencySpec, SyncSpec};
use crate::lifecycle::Shutdown;
use crate::sync::apply::{Key, Values, fetch_rows};
use crate::sync::canon::{Kind, Purpose};
use crate::sync::engine::Session;
use crate::sync::plan::{self, Plan, Side};
use crate::telemetry::feeds::{ConsistencyReport, Mismatch};
use crate::telemetry::metrics::SyncLabels;
use crate::telemetry::{Feeds, Metrics};

use super::{ConsistencyError, query_err, wilson_lower};

const TICK: Duration = Duration::from_millis(250);
const RECHECK_AFTER: Duration = Duration::from_millis(750);
const MAX_RECHECKS: u32 = 40;
const LATEST_MISMATCHES: usize = 20;

struct Pending {
    key: Key,
    due: Instant,
    tries: u32,
}

pub struct Sampler {
    sync: SyncSpec,
    spec: ConsistencySpec,
    feeds: Feeds,
    metrics: Arc<Metrics>,
    outcomes: VecDeque<(Instant, bool)>,
    rechecks: VecDeque<Pending>,
    mismatches: VecDeque<Mismatch>,
    empty: bool,
}

impl Sampler {
    pub fn new(
        sync: SyncSpec,
        spec: ConsistencySpec,
        feeds: Feeds,
        metrics: Arc<Metrics>,
    ) -> Sampler {
        Sampler {
            sync,
            spec,
            feeds,
            metrics,
            outcomes: VecDeque::new(),
            rechecks: VecDeque::new(),
            mismatches: VecDeque::new(),
            empty: false,
        }
    }

    pub fn start(self, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    async fn run(mut self, mut shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(500);
        self.feeds
            .note_consistency_error(&self.sync.name, "not sampled yet".into());
        while !shutdown.is_triggered() {
            let r = tokio::select! {
                r = self.session() => r,
                _ = shutdown.wait() => break,
            };
            if let Err(e) = r {
                tracing::warn!(sync = %self.sync.name, error = %e, "consistency sampler");
                self.feeds
                    .note_consistency_error(&self.sync.name, e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    async fn session(&mut self) -> Result<(), ConsistencyError> {
        let plan = plan::resolve(&self.sync, Session::Reader).await?;
        let mut bounds_at: Option<Instant> = None;
        let mut bounds = (Bounds::default(), Bounds::default());
        let mut carry = 0.0_f64;
        loop {
            if bounds_at.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                bounds = (
                    Bounds::read(&plan, &plan.source).await?,
                    Bounds::read(&plan, &plan.target).await?,
                );
                self.empty = bounds.0.count == 0 && bounds.1.count == 0;
                bounds_at = Some(Instant::now());
            }
            carry += self.spec.sample_rate * TICK.as_secs_f64();
            let n = carry.floor() as usize;
            carry -= n as f64;
            let mut keys: Vec<Key> = Vec::new();
            keys.extend(draw(&plan, &plan.source, &bounds.0, n.div_ceil(2)).await?);
            keys.extend(draw(&plan, &plan.target, &bounds.1, n / 2).await?);
            let now = Instant::now();
            while self.rechecks.front().is_some_and(|p| p.due <= now) {
                let p = self.rechecks.pop_front().unwrap_or_else(|| unreachable!());
                self.compare(&plan, vec![p.key], p.tries).await?;
            }
            // Drawn with replacement: a key drawn twice is two draws, each with its outcome.
            self.compare(&plan, keys, 0).await?;
            self.publish();
            tokio::time::sleep(TICK).await;
        }
    }

    async fn compare(
        &mut self,
        plan: &Plan,
        keys: Vec<Key>,
        tries: u32,
    ) -> Result<(), ConsistencyError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut tc = plan
            .target
            .db
            .pool
            .acquire()
            .await
            .map_err(query_err("connecting to the target"))?;
        let mut sc = plan
            .source
            .db
            .pool
            .acquire()
            .await
            .map_err(query_err("connecting to the source"))?;
        // Target first: a change in flight reaches the source before the target, so reading in
        // this order never sees a target newer than its source.
        let theirs = fetch_rows(plan, &plan.target, &mut tc, &keys, Purpose::Compare).await?;
        let ours = fetch_rows(plan, &plan.source, &mut sc, &keys, Purpose::Compare).await?;
        let differing: Vec<&Key> = keys
            .iter()
            .filter(|k| ours.get(*k) != theirs.get(*k))
            .collect();
        let in_flight = pending(plan, &differing).await?;
        let now = Instant::now();
        for k in &keys {
            let (a, b) = (ours.get(k), theirs.get(k));
            if a == b {
                self.outcomes.push_back((now, true));
                continue;
            }
            if in_flight.contains(k) || tries == 0 {
                // Seen once, or still on its way: look again later before judging.
                if tries < MAX_RECHECKS {
                    self.rechecks.push_back(Pending {
                        key: k.clone(),
                        due: now + RECHECK_AFTER,
                        tries: tries + 1,
                    });
                }
                continue;
            }
            self.outcomes.push_back((now, false));
            let m = describe(plan, k, a, b);
            self.mismatches.retain(|x| x.key != m.key);
            self.mismatches.push_back(m);
            if self.mismatches.len() > LATEST_MISMATCHES {
                self.mismatches.pop_front();
            }
        }
        Ok(())
    }

    fn publish(&mut self) {
        while self
            .outcomes
            .front()
            .is_some_and(|(t, _)| t.elapsed() > self.spec.window)
        {
            self.outcomes.pop_front();
        }
        let sampled = self.outcomes.len() as u64;
        let matched = self.outcomes.iter().filter(|(_, ok)| *ok).count() as u64;
        let (ratio, lower) = if sampled == 0 && self.empty {
            // Two empty tables agree.
            (1.0, 1.0)
        } else if sampled == 0 {
            (0.0, 0.0)
        } else {
            (
                matched as f64 / sampled as f64,
                wilson_lower(matched, sampled),
            )
        };
        self.metrics
            .consistency_ratio
            .get_or_create(&SyncLabels {
                sync: self.sync.name.clone(),
            })
            .set(lower);
        self.feeds.publish_consistency(
            &self.sync.name,
            ConsistencyReport {
                sampled,
                matched,
                mismatched: sampled - matched,
                in_flight: self.rechecks.len() as u64,
                ratio,
                lower_bound: lower,
                mismatches: self.mismatches.iter().rev().cloned().collect(),
                last_error: None,
            },
        );
    }
}

fn describe(plan: &Plan, key: &Key, source: Option<&Values>, target: Option<&Values>) -> Mismatch {
    let (kind, columns) = match (source, target) {
        (Some(_), None) => ("missing_in_target", vec![]),
        (None, Some(_)) => ("missing_in_source", vec![]),
        (Some(a), Some(b)) => (
            "different",
            plan.source
                .cols
                .iter()
                .zip(a.iter().zip(b))
                .filter(|(_, (x, y))| x != y)
                .map(|(c, _)| c.name.clone())
                .collect(),
        ),
        (None, None) => ("equal", vec![]),
    };
    Mismatch {
        key: key.iter().map(|k| Some(k.clone())).collect(),
        kind: kind.into(),
        columns,
    }
}

/// Keys waiting in a capture table on either side.
async fn pending(plan: &Plan, keys: &[&Key]) -> Result<HashSet<Key>, ConsistencyError> {
    let mut out = HashSet::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let mut sides = vec![&plan.source];
    if plan.bidirectional {
        sides.push(&plan.target);
    }
    for side in sides {
        let e = side.engine();
        let ks: Vec<String> = (1..=plan.key_len).map(|i| format!("k{i}")).collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            ks.join(", "),
            plan.change_table(),
            crate::sync::apply::chg_key_in(e, plan.key_len, keys.len(), 1)
        );
        let q = crate::sync::apply::with_keys(&sql, keys.iter().map(|k| k.as_slice()));
        // No capture table (not installed yet) means nothing is known to be in flight.
        let Ok(rows) = q.fetch_all(&side.db.pool).await else {
            continue;
        };
        for r in &rows {
            let k: Key = (0..plan.key_len)
                .map(|i| {
                    r.try_get::<Option<String>, _>(i)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                })
                .collect();
            out.insert(k);
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Bounds {
    count: i64,
    /// Integer keys: smallest and largest key, for seeks to a random point.
    range: Option<(i64, i64)>,
}

impl Bounds {
    async fn read(plan: &Plan, side: &Side) -> Result<Bounds, ConsistencyError> {
        let int_key = plan.key_len == 1 && plan.kinds[0] == Kind::Int;
        let k = side.db.q(&side.cols[0].name);
        let t = if side.engine() == crate::sync::engine::Engine::Postgres {
            "text"
        } else if side.engine() == crate::sync::engine::Engine::MySql {
            "CHAR"
        } else {
            "TEXT"
        };
        let sql = if int_key {
            format!(
                "SELECT COUNT(*), CAST(MIN({k}) AS {t}), CAST(MAX({k}) AS {t}) FROM {}",
                side.qtable()
            )
        } else {
            format!("SELECT COUNT(*), NULL, NULL FROM {}", side.qtable())
        };
        let r = sqlx::query(AssertSqlSafe(sql))
            .fetch_one(&side.db.pool)
            .await
            .map_err(query_err(format!("counting `{}`", side.table)))?;
        let count: i64 = r.try_get(0).map_err(query_err("counting"))?;
        let lo: Option<String> = r.try_get(1).unwrap_or(None);
        let hi: Option<String> = r.try_get(2).unwrap_or(None);
        Ok(Bounds {
            count,
            range: lo
                .and_then(|l| l.parse().ok())
                .zip(hi.and_then(|h| h.parse().ok())),
        })
    }
}

/// Below this share of occupied key values, a rejection draw wastes too many candidates and
/// draws by offset instead.
const MIN_DENSITY: f64 = 0.02;

/// `n` keys of `side`, each drawn uniformly over the side's rows (so the share of differing
/// draws estimates the share of differing rows, whatever the key distribution).
///
/// Integer keys: rejection sampling. Candidates are drawn uniformly from [min, max] and kept
/// when a row has exactly that key, so every row is equally likely however the keys are
/// spread (a seek to the next key after a random point is not: a key after a gap would be
/// drawn in proportion to the gap). Other keys, and integer keys too sparse for rejection:
/// a uniformly random offset in key order.
async fn draw(
    plan: &Plan,
    side: &Side,
    b: &Bounds,
    n: usize,
) -> Result<Vec<Key>, ConsistencyError> {
    if n == 0 || b.count == 0 {
        return Ok(vec![]);
    }
    if let Some((lo, hi)) = b.range {
        let width = (hi as i128 - lo as i128 + 1) as f64;
        let density = b.count as f64 / width;
        if density >= MIN_DENSITY {
            return draw_by_rejection(plan, side, (lo, hi), density, n).await;
        }
    }
    draw_by_offset(plan, side, b.count, n).await
}

fn read_key(plan: &Plan, r: &sqlx::any::AnyRow) -> Key {
    (0..plan.key_len)
        .map(|i| {
            r.try_get::<Option<String>, _>(i)
                .ok()
                .flatten()
                .unwrap_or_default()
        })
        .collect()
}

async fn draw_by_rejection(
    plan: &Plan,
    side: &Side,
    (lo, hi): (i64, i64),
    density: f64,
    n: usize,
) -> Result<Vec<Key>, ConsistencyError> {
    let keys = plan.key_exprs(side, "sy_t.").join(", ");
    let col = side.db.q(&side.cols[0].name);
    let mut out = Vec::with_capacity(n);
    // A few rounds at most: each round expects 1.5 × the hits still needed.
    for _ in 0..8 {
        let need = n - out.len();
        let m = ((need as f64 / density.min(1.0)) * 1.5).ceil() as usize + 4;
        let candidates: Vec<i64> = {
            let mut rng = rand::rng();
            (0..m).map(|_| rng.random_range(lo..=hi)).collect()
        };
        let list = candidates
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {keys}, sy_t.{col} FROM {} sy_t WHERE sy_t.{col} IN ({list})",
            side.qtable()
        )))
        .fetch_all(&side.db.pool)
        .await
        .map_err(query_err(format!("drawing keys of `{}`", side.table)))?;
        let mut hit: std::collections::HashMap<i64, Key> = std::collections::HashMap::new();
        for r in &rows {
            let k = read_key(plan, r);
            if let Some(v) = k.first().and_then(|v| v.parse::<i64>().ok()) {
                hit.insert(v, k);
            }
        }
        // Hits in the order their candidates were drawn: each is one uniform draw.
        for c in &candidates {
            if out.len() == n {
                break;
            }
            if let Some(k) = hit.get(c) {
                out.push(k.clone());
            }
        }
        if out.len() == n {
            break;
        }
    }
    Ok(out)
}

async fn draw_by_offset(
    plan: &Plan,
    side: &Side,
    count: i64,
    n: usize,
) -> Result<Vec<Key>, ConsistencyError> {
    let keys = plan.key_exprs(side, "sy_t.").join(", ");
    let order = side.cols[..plan.key_len]
        .iter()
        .map(|c| format!("sy_t.{}", side.db.q(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let at = rand::rng().random_range(0..count);
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {keys} FROM {} sy_t ORDER BY {order} LIMIT 1 OFFSET {at}",
            side.qtable()
        )))
        .fetch_optional(&side.db.pool)
        .await
        .map_err(query_err(format!("drawing keys of `{}`", side.table)))?;
        if let Some(r) = row {
            out.push(read_key(plan, &r));
        }
    }
    Ok(out)
}
