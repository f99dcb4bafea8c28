//! The sync worker of one pair: holds the pair's lease, backfills, then streams captured
//! changes in both configured directions, and reports its figures. Phases and transitions are
//! in LIFECYCLE.md. A database that fails makes it retry with backoff; it never stops the
//! process, and it keeps its last figures (which go stale for the gates).

use sqlx::AssertSqlSafe;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::AnyConnection;
use sqlx::Row;

use crate::config::SyncSpec;
use crate::lifecycle::Shutdown;
use crate::telemetry::feeds::SyncReport;
use crate::telemetry::metrics::{SyncDirectionLabels, SyncLabels};
use crate::telemetry::{Feeds, Metrics};

use super::SyncError;
use super::apply::{self, Key, Progress};
use super::capture;
use super::engine::Session;
use super::plan::{self, Direction, Plan};
use super::write::Refused;

const LEASE_TTL: Duration = Duration::from_secs(5);
const LEASE_RENEW: Duration = Duration::from_secs(1);
const BATCH: usize = 5000;
const BACKFILL_CHUNK: usize = 5000;
/// How long an idle worker waits before looking for changes again: bounds the lag of a
/// quiet pair.
const IDLE_POLL: Duration = Duration::from_millis(20);
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// Recent lag samples and applied counts, for p50/p95 and changes/s.
struct Figures {
    lags: VecDeque<Duration>,
    applied: VecDeque<(Instant, u64)>,
}

impl Figures {
    fn new() -> Figures {
        Figures {
            lags: VecDeque::with_capacity(4096),
            applied: VecDeque::new(),
        }
    }

    fn record(&mut self, lags: impl Iterator<Item = Duration>, n: u64) {
        for l in lags {
            if self.lags.len() == 4096 {
                self.lags.pop_front();
            }
            self.lags.push_back(l);
        }
        self.applied.push_back((Instant::now(), n));
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.lags.is_empty() {
            return Duration::ZERO;
        }
        let mut v: Vec<Duration> = self.lags.iter().copied().collect();
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    fn rate(&mut self) -> f64 {
        let window = Duration::from_secs(10);
        while let Some((t, _)) = self.applied.front() {
            if t.elapsed() > window {
                self.applied.pop_front();
            } else {
                break;
            }
        }
        self.applied.iter().map(|(_, n)| *n).sum::<u64>() as f64 / window.as_secs_f64()
    }
}

pub struct SyncWorker {
    spec: SyncSpec,
    feeds: Feeds,
    metrics: Arc<Metrics>,
    holder: String,
    report: SyncReport,
    figures: Figures,
    last_report: Instant,
    /// Keys the receiving side refused in the last apply, per direction (forward, reverse):
    /// written row by row next time.
    suspects: [HashSet<Key>; 2],
    /// What was refused in the last apply of each direction, for `last_error`.
    refused: [Option<String>; 2],
}

/// `last_error` text for rows the receiving side refused.
fn describe_refused(dir: Direction, refused: &[Refused]) -> Option<String> {
    let first = refused.first()?;
    Some(format!(
        "{} row(s) refused by the {} and kept for retry (everything else is applied): key [{}]: {}{}",
        refused.len(),
        match dir {
            Direction::SourceToTarget => "target",
            Direction::TargetToSource => "source",
        },
        first.key.join(", "),
        first.reason,
        if refused.len() > 1 {
            format!(
                "; also keys {}",
                refused[1..]
                    .iter()
                    .take(5)
                    .map(|r| format!("[{}]", r.key.join(", ")))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        } else {
            String::new()
        }
    ))
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

impl SyncWorker {
    pub fn new(spec: SyncSpec, feeds: Feeds, metrics: Arc<Metrics>) -> SyncWorker {
        let holder = format!(
            "{}:{}:{}",
            hostname(),
            std::process::id(),
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .simple()
        );
        SyncWorker {
            report: SyncReport {
                phase: "connecting".into(),
                direction: if spec.bidirectional {
                    "bidirectional".into()
                } else {
                    "one_way".into()
                },
                ..Default::default()
            },
            spec,
            feeds,
            metrics,
            holder,
            figures: Figures::new(),
            last_report: Instant::now() - REPORT_EVERY,
            suspects: Default::default(),
            refused: Default::default(),
        }
    }

    /// Runs until shutdown. Errors are reported and retried with backoff.
    pub fn start(self, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    async fn run(mut self, mut shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(200);
        self.feeds
            .note_sync_error(&self.spec.name, "connecting", "not connected yet".into());
        while !shutdown.is_triggered() {
            let result = tokio::select! {
                r = self.session() => r,
                _ = shutdown.wait() => break,
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(sync = %self.spec.name, error = %e, retry_in = ?backoff, "sync worker");
                    self.report.last_error = Some(e.to_string());
                    self.report.leader = false;
                    if matches!(e, SyncError::NotInstalled(_)) {
                        self.report.phase = "not_installed".into();
                    }
                    self.feeds
                        .note_sync_error(&self.spec.name, &self.report.phase, e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if matches!(e, SyncError::LostLease(_)) {
                        backoff = Duration::from_millis(200);
                    }
                }
            }
        }
        tracing::info!(sync = %self.spec.name, "sync worker stopped");
    }

    fn publish(&mut self, force: bool) {
        if !force && self.last_report.elapsed() < REPORT_EVERY {
            return;
        }
        self.last_report = Instant::now();
        self.report.lag_p50_seconds = self.figures.percentile(0.5).as_secs_f64();
        self.report.lag_p95_seconds = self.figures.percentile(0.95).as_secs_f64();
        self.report.changes_per_second = self.figures.rate();
        let lag = self.report.current_lag(SystemTime::now());
        self.metrics
            .sync_lag
            .get_or_create(&SyncLabels {
                sync: self.spec.name.clone(),
            })
            .set(lag.as_secs_f64());
        self.feeds
            .publish_sync(&self.spec.name, self.report.clone());
    }

    /// One connected session: returns only on error (or never).
    async fn session(&mut self) -> Result<(), SyncError> {
        self.report.phase = "connecting".into();
        let plan = plan::resolve(&self.spec, Session::Applier).await?;
        if !capture::installed(&plan).await {
            return Err(SyncError::NotInstalled(self.spec.name.clone()));
        }
        let mut to_conn = plan
            .target
            .db
            .pool
            .acquire()
            .await
            .map_err(|e| SyncError::Query {
                what: "connecting to the target".into(),
                source: e,
            })?;
        let mut from_conn = plan
            .source
            .db
            .pool
            .acquire()
            .await
            .map_err(|e| SyncError::Query {
                what: "connecting to the source".into(),
                source: e,
            })?;
        let mut last_renew: Option<Instant> = None;
        loop {
            if last_renew.is_none_or(|t| t.elapsed() >= LEASE_RENEW) {
                let was_leader = self.report.leader;
                self.report.leader = self
                    .acquire_lease(&plan, &mut to_conn, &mut from_conn)
                    .await?;
                last_renew = Some(Instant::now());
                if self.report.leader && !was_leader {
                    tracing::info!(sync = %plan.name, holder = %self.holder, "sync lease acquired");
                    self.recover(&plan, &mut to_conn, &mut from_conn).await?;
                }
                if !self.report.leader {
                    self.report.phase = "standby".into();
                    // A standby measures lag from the change table itself, so a replica that
                    // leads rollouts but not this pair still gates on real figures.
                    let oldest = sqlx::query(AssertSqlSafe(format!(
                        "SELECT changed_at FROM {} ORDER BY seq LIMIT 1",
                        plan.change_table()
                    )))
                    .fetch_optional(&mut *from_conn)
                    .await
                    .map_err(|e| SyncError::Query {
                        what: "reading the oldest pending change".into(),
                        source: e,
                    })?;
                    self.report.oldest_pending = oldest
                        .and_then(|r| r.try_get::<i64, _>(0).ok())
                        .map(|at| UNIX_EPOCH + Duration::from_micros(at.max(0) as u64));
                    self.report.last_lag = Duration::ZERO;
                    self.publish(true);
                    tokio::time::sleep(LEASE_RENEW).await;
                    continue;
                }
            }
            let mut busy = false;
            if self.report.phase != "stream" {
                let (phase, after, copied, total) = read_state(&plan, &mut to_conn).await?;
                if phase == "backfill" {
                    self.report.phase = "backfill".into();
                    busy |= self
                        .backfill_chunk(&plan, &mut from_conn, &mut to_conn, after, copied, total)
                        .await?;
                } else {
                    self.report.phase = "stream".into();
                }
            }
            busy |= self
                .stream_batch(
                    &plan,
                    Direction::SourceToTarget,
                    &mut from_conn,
                    &mut to_conn,
                )
                .await?;
            if plan.bidirectional {
                busy |= self
                    .stream_batch(
                        &plan,
                        Direction::TargetToSource,
                        &mut to_conn,
                        &mut from_conn,
                    )
                    .await?;
            }
            self.report.last_error = self.refused.iter().flatten().next().cloned();
            self.publish(false);
            if !busy {
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }

    async fn acquire_lease(
        &self,
        plan: &Plan,
        to_conn: &mut AnyConnection,
        from_conn: &mut AnyConnection,
    ) -> Result<bool, SyncError> {
        let ttl = LEASE_TTL.as_micros() as i64;
        let e = plan.target.engine();
        let now = e.now_micros_sql();
        let p = |n| e.param(n);
        let sql = format!(
            "UPDATE switchyard_sync_state SET holder = {}, lease_until = {now} + {ttl} \
             WHERE name = {} AND (holder = {} OR holder IS NULL OR lease_until < {now})",
            p(1),
            p(2),
            p(3)
        );
        let got = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(self.holder.as_str())
            .bind(plan.state_row(Direction::SourceToTarget))
            .bind(self.holder.as_str())
            .execute(&mut *to_conn)
            .await
            .map_err(|e| SyncError::Query {
                what: "renewing the lease".into(),
                source: e,
            })?
            .rows_affected()
            == 1;
        if got && plan.bidirectional {
            // The forward row is the lease; the reverse row follows it so that an old holder's
            // reverse applies are fenced off too.
            let e = plan.source.engine();
            let now = e.now_micros_sql();
            let sql = format!(
                "UPDATE switchyard_sync_state SET holder = {}, lease_until = {now} + {ttl} WHERE name = {}",
                e.param(1),
                e.param(2)
            );
            sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(self.holder.as_str())
                .bind(plan.state_row(Direction::TargetToSource))
                .execute(&mut *from_conn)
                .await
                .map_err(|e| SyncError::Query {
                    what: "renewing the reverse lease".into(),
                    source: e,
                })?;
        }
        Ok(got)
    }

    /// A previous holder may have committed an apply and died before deleting what it
    /// consumed: the checkpoint says what that was.
    async fn recover(
        &self,
        plan: &Plan,
        to_conn: &mut AnyConnection,
        from_conn: &mut AnyConnection,
    ) -> Result<(), SyncError> {
        let mut dirs = vec![Direction::SourceToTarget];
        if plan.bidirectional {
            dirs.push(Direction::TargetToSource);
        }
        for d in dirs {
            let (state_conn, chg_conn, e) = match d {
                Direction::SourceToTarget => (&mut *to_conn, &mut *from_conn, plan.target.engine()),
                Direction::TargetToSource => (&mut *from_conn, &mut *to_conn, plan.source.engine()),
            };
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT consumed FROM switchyard_sync_state WHERE name = {}",
                e.param(1)
            )))
            .bind(plan.state_row(d))
            .fetch_optional(&mut *state_conn)
            .await
            .map_err(|e| SyncError::Query {
                what: "reading the checkpoint".into(),
                source: e,
            })?;
            if let Some(row) = row
                && let Ok(Some(consumed)) = row.try_get::<Option<String>, _>(0)
            {
                let runs = apply::decode_seqs(&consumed);
                apply::delete_consumed(plan, chg_conn, &runs).await?;
            }
        }
        Ok(())
    }

    async fn backfill_chunk(
        &mut self,
        plan: &Plan,
        from_conn: &mut AnyConnection,
        to_conn: &mut AnyConnection,
        after: Option<Key>,
        copied: u64,
        mut total: u64,
    ) -> Result<bool, SyncError> {
        if total == 0 || after.is_none() {
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {}",
                plan.source.qtable()
            )))
            .fetch_one(&mut *from_conn)
            .await
            .map_err(|e| SyncError::Query {
                what: "counting source rows".into(),
                source: e,
            })?;
            total = row.try_get::<i64, _>(0).unwrap_or_default().max(0) as u64;
        }
        let rows = apply::read_chunk(plan, from_conn, after.as_ref(), BACKFILL_CHUNK).await?;
        let done = rows.len() < BACKFILL_CHUNK;
        let last = rows
            .last()
            .map(|r| apply::key_of(r, plan.key_len))
            .or(after);
        let n = rows.len() as u64;
        let items: Vec<(Key, Option<apply::Values>)> = rows
            .into_iter()
            .map(|r| (apply::key_of(&r, plan.key_len), Some(r)))
            .collect();
        // Rows deleted or added while copying make the first count approximate.
        let total = if done {
            copied + n
        } else {
            total.max(copied + n)
        };
        let applied = apply::apply(
            plan,
            Direction::SourceToTarget,
            to_conn,
            &items,
            Progress::Backfill {
                after: serde_json::to_string(&last).unwrap_or_default(),
                copied,
                total,
                done,
            },
            &self.holder,
            &HashSet::new(),
        )
        .await?;
        // Only rows the target holds count as copied; refused ones wait in the change table.
        let copied = copied + applied.rows;
        self.refused[0] = describe_refused(Direction::SourceToTarget, &applied.refused);
        if let Some(why) = &self.refused[0] {
            tracing::warn!(sync = %plan.name, "{why}");
        }
        self.report.conflicts += applied.conflicts;
        self.report.backfill_rows_copied = copied;
        self.report.backfill_rows_total = total.max(copied);
        self.metrics
            .sync_backfill(&plan.name, copied, total.max(copied));
        if n > 0 {
            tracing::info!(sync = %plan.name, copied, total = total.max(copied), "backfill progress");
        }
        if done {
            tracing::info!(sync = %plan.name, copied, "backfill done; streaming");
            self.report.phase = "stream".into();
        }
        Ok(!done)
    }

    async fn stream_batch(
        &mut self,
        plan: &Plan,
        dir: Direction,
        from_conn: &mut AnyConnection,
        to_conn: &mut AnyConnection,
    ) -> Result<bool, SyncError> {
        let (from, _) = plan.sides(dir);
        let batch = apply::read_changes(plan, from, from_conn, BATCH).await?;
        if batch.seqs.is_empty() {
            if dir == Direction::SourceToTarget {
                // Caught up: nothing waits, so the pair's lag is zero until the next change.
                self.report.oldest_pending = None;
                self.report.last_lag = Duration::ZERO;
            }
            return Ok(false);
        }
        let oldest = batch.changed_at.iter().copied().min().unwrap_or_default();
        let was_idle = self.report.oldest_pending.is_none();
        self.report.oldest_pending = Some(UNIX_EPOCH + Duration::from_micros(oldest.max(0) as u64));
        // Published before applying: if the apply blocks, readers see the pending change age.
        self.publish(was_idle);
        let mut rows = apply::fetch_rows(
            plan,
            from,
            from_conn,
            &batch.keys,
            super::canon::Purpose::Copy,
        )
        .await?;
        let items: Vec<(Key, Option<apply::Values>)> = batch
            .keys
            .iter()
            .map(|k| (k.clone(), rows.remove(k)))
            .collect();
        let holder = self.holder.clone();
        let slot = usize::from(dir == Direction::TargetToSource);
        let suspects = std::mem::take(&mut self.suspects[slot]);
        let apply = apply::apply(
            plan,
            dir,
            to_conn,
            &items,
            Progress::Stream {
                changes: batch
                    .seqs
                    .iter()
                    .copied()
                    .zip(batch.seq_keys.iter().cloned())
                    .collect(),
            },
            &holder,
            &suspects,
        );
        tokio::pin!(apply);
        // A blocked apply (a lock on the target, a slow database) keeps reporting: the lag
        // it causes is what the gates must see, fresh.
        let applied = loop {
            tokio::select! {
                r = &mut apply => break r?,
                _ = tokio::time::sleep(REPORT_EVERY) => self.publish(true),
            }
        };
        let committed = now_micros();
        apply::delete_consumed(plan, from_conn, &apply::decode_seqs(&applied.consumed)).await?;
        self.suspects[slot] = applied.refused.iter().map(|r| r.key.clone()).collect();
        self.refused[slot] = describe_refused(dir, &applied.refused);
        if let Some(why) = &self.refused[slot] {
            tracing::warn!(sync = %plan.name, "{why}");
        }
        let changes = applied.changes;
        let lags: Vec<Duration> = batch
            .changed_at
            .iter()
            .zip(&batch.seq_keys)
            .filter(|(_, k)| !self.suspects[slot].contains(*k))
            .map(|(at, _)| Duration::from_micros((committed - at).max(0) as u64))
            .collect();
        self.report.last_lag = lags.iter().copied().max().unwrap_or_default();
        self.report.oldest_pending = None;
        self.figures.record(lags.into_iter(), changes);
        self.report.changes_applied += changes;
        self.report.conflicts += applied.conflicts;
        self.metrics
            .sync_changes
            .get_or_create(&SyncDirectionLabels {
                sync: plan.name.clone(),
                direction: dir.label(),
            })
            .inc_by(changes);
        // Anything read means more may be waiting: look again at once, sleep only when idle.
        Ok(true)
    }
}

type StateRow = (String, Option<Key>, u64, u64);

async fn read_state(plan: &Plan, conn: &mut AnyConnection) -> Result<StateRow, SyncError> {
    let e = plan.target.engine();
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT phase, backfill_after, backfill_copied, backfill_total FROM switchyard_sync_state WHERE name = {}",
        e.param(1)
    )))
    .bind(plan.state_row(Direction::SourceToTarget))
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| SyncError::Query {
        what: "reading the sync state".into(),
        source: e,
    })?
    .ok_or_else(|| SyncError::NotInstalled(plan.name.clone()))?;
    let phase: String = row.try_get(0).unwrap_or_else(|_| "backfill".into());
    let after: Option<String> = row.try_get(1).unwrap_or(None);
    let after: Option<Key> = after
        .and_then(|a| serde_json::from_str::<Option<Key>>(&a).ok())
        .flatten();
    let copied: i64 = row.try_get(2).unwrap_or_default();
    let total: i64 = row.try_get(3).unwrap_or_default();
    Ok((phase, after, copied.max(0) as u64, total.max(0) as u64))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
