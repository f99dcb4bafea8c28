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
            let mut seen = HashSet::new();
            keys.retain(|k| seen.insert(k.clone()));
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

/// `n` keys of `side` at random: a seek to a random point for integer keys, a random offset
/// otherwise.
async fn draw(
    plan: &Plan,
    side: &Side,
    b: &Bounds,
    n: usize,
) -> Result<Vec<Key>, ConsistencyError> {
    if n == 0 || b.count == 0 {
        return Ok(vec![]);
    }
    let keys = plan.key_exprs(side, "").join(", ");
    let order: Vec<String> = side.cols[..plan.key_len]
        .iter()
        .map(|c| side.db.q(&c.name))
        .collect();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let sql = match b.range {
            Some((lo, hi)) => {
                let at = rand::rng().random_range(lo..=hi);
                format!(
                    "SELECT {keys} FROM {} sy_t WHERE sy_t.{} >= {at} ORDER BY sy_t.{} LIMIT 1",
                    side.qtable(),
                    order[0],
                    order[0]
                )
            }
            None => {
                let at = rand::rng().random_range(0..b.count);
                format!(
                    "SELECT {keys} FROM {} sy_t ORDER BY {} LIMIT 1 OFFSET {at}",
                    side.qtable(),
                    order
                        .iter()
                        .map(|o| format!("sy_t.{o}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        };
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_optional(&side.db.pool)
            .await
            .map_err(query_err(format!("drawing keys of `{}`", side.table)))?;
        if let Some(r) = row {
            let k: Key = (0..plan.key_len)
                .map(|i| {
                    r.try_get::<Option<String>, _>(i)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                })
                .collect();
            out.push(k);
        }
    }
    Ok(out)
}
