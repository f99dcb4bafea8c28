//! Live figures of the sync workers and consistency samplers, published by those jobs and read
//! by the rollout gates, the rollback monitor and the admin API. Owns freshness: a figure that
//! has not been refreshed within `STALE_AFTER` is reported stale, and gates must not pass on it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// A job that is alive refreshes its figures at least once a second.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// What a gate sees of one figure.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading<T> {
    Fresh(T),
    /// The job stopped reporting (database down, worker stuck): the last value and its age.
    Stale {
        last: Option<T>,
        age: Duration,
    },
    /// No job reports this name (not configured, or not started yet).
    Unknown,
}

impl<T> Reading<T> {
    pub fn fresh(&self) -> Option<&T> {
        match self {
            Reading::Fresh(v) => Some(v),
            _ => None,
        }
    }
}

/// What a sync worker reports about one pair.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SyncReport {
    pub phase: String,
    pub direction: String,
    /// Whether this process holds the pair's lease (only the holder moves data).
    pub leader: bool,
    pub backfill_rows_copied: u64,
    pub backfill_rows_total: u64,
    /// Lag measured on the last applied changes, in seconds.
    pub lag_p50_seconds: f64,
    pub lag_p95_seconds: f64,
    pub changes_per_second: f64,
    pub changes_applied: u64,
    pub conflicts: u64,
    pub last_error: Option<String>,
    /// Write time of the oldest change read but not yet applied; `None` when caught up.
    #[serde(skip)]
    pub oldest_pending: Option<SystemTime>,
    /// Lag of the last applied batch; zero once a poll finds nothing waiting.
    #[serde(skip)]
    pub last_lag: Duration,
}

impl SyncReport {
    /// Lag as of now: a change waiting to be applied ages while the worker is blocked.
    pub fn current_lag(&self, now: SystemTime) -> Duration {
        match self.oldest_pending {
            Some(t) => now.duration_since(t).unwrap_or_default().max(self.last_lag),
            None => self.last_lag,
        }
    }
}

/// What a consistency sampler reports about one pair.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ConsistencyReport {
    pub sampled: u64,
    pub matched: u64,
    pub mismatched: u64,
    pub in_flight: u64,
    pub ratio: f64,
    /// Wilson lower bound (95%) of the ratio: what gates and rollback compare.
    pub lower_bound: f64,
    pub mismatches: Vec<Mismatch>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mismatch {
    pub key: Vec<Option<String>>,
    /// `missing_in_target`, `missing_in_source` or `different`.
    pub kind: String,
    pub columns: Vec<String>,
}

struct Entry<T> {
    report: T,
    updated: Instant,
}

/// Shared by every job in one process; cheap to clone.
#[derive(Clone, Default)]
pub struct Feeds {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    sync: RwLock<HashMap<String, Entry<SyncReport>>>,
    consistency: RwLock<HashMap<String, Entry<ConsistencyReport>>>,
}

/// A report with its age, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Aged<T> {
    pub name: String,
    pub stale: bool,
    pub age_seconds: f64,
    #[serde(flatten)]
    pub report: T,
}

fn read<T: Clone, V>(
    map: &RwLock<HashMap<String, Entry<T>>>,
    name: &str,
    pick: impl Fn(&T) -> V,
) -> Reading<V> {
    let map = map.read().unwrap_or_else(|e| e.into_inner());
    match map.get(name) {
        None => Reading::Unknown,
        Some(e) => {
            let age = e.updated.elapsed();
            if age > STALE_AFTER {
                Reading::Stale {
                    last: Some(pick(&e.report)),
                    age,
                }
            } else {
                Reading::Fresh(pick(&e.report))
            }
        }
    }
}

fn all<T: Clone>(map: &RwLock<HashMap<String, Entry<T>>>) -> Vec<Aged<T>> {
    let map = map.read().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<Aged<T>> = map
        .iter()
        .map(|(name, e)| {
            let age = e.updated.elapsed();
            Aged {
                name: name.clone(),
                stale: age > STALE_AFTER,
                age_seconds: age.as_secs_f64(),
                report: e.report.clone(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

impl Feeds {
    pub fn publish_sync(&self, name: &str, report: SyncReport) {
        let mut map = self.inner.sync.write().unwrap_or_else(|e| e.into_inner());
        map.insert(
            name.to_string(),
            Entry {
                report,
                updated: Instant::now(),
            },
        );
    }

    pub fn publish_consistency(&self, name: &str, report: ConsistencyReport) {
        let mut map = self
            .inner
            .consistency
            .write()
            .unwrap_or_else(|e| e.into_inner());
        map.insert(
            name.to_string(),
            Entry {
                report,
                updated: Instant::now(),
            },
        );
    }

    /// Records a job's error without refreshing its figures: they keep ageing, so gates see
    /// them go stale while the job cannot measure.
    pub fn note_sync_error(&self, name: &str, phase: &str, error: String) {
        let mut map = self.inner.sync.write().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(name) {
            Some(e) => {
                e.report.last_error = Some(error);
                e.report.phase = phase.to_string();
                e.report.leader = false;
            }
            None => {
                map.insert(
                    name.to_string(),
                    Entry {
                        report: SyncReport {
                            phase: phase.to_string(),
                            last_error: Some(error),
                            ..Default::default()
                        },
                        // Never fresh: nothing was measured.
                        updated: Instant::now() - STALE_AFTER * 2,
                    },
                );
            }
        }
    }

    /// See [`Feeds::note_sync_error`].
    pub fn note_consistency_error(&self, name: &str, error: String) {
        let mut map = self
            .inner
            .consistency
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match map.get_mut(name) {
            Some(e) => e.report.last_error = Some(error),
            None => {
                map.insert(
                    name.to_string(),
                    Entry {
                        report: ConsistencyReport {
                            last_error: Some(error),
                            ..Default::default()
                        },
                        updated: Instant::now() - STALE_AFTER * 2,
                    },
                );
            }
        }
    }

    /// Current lag of a pair (see [`SyncReport::current_lag`]).
    pub fn sync_lag(&self, name: &str) -> Reading<Duration> {
        let now = SystemTime::now();
        read(&self.inner.sync, name, |r| r.current_lag(now))
    }

    /// Lower confidence bound of a pair's sampled consistency.
    pub fn consistency(&self, name: &str) -> Reading<f64> {
        read(&self.inner.consistency, name, |r| r.lower_bound)
    }

    /// Samples behind the current consistency figure (0 when unknown).
    pub fn consistency_samples(&self, name: &str) -> u64 {
        match read(&self.inner.consistency, name, |r| r.sampled) {
            Reading::Fresh(n) => n,
            _ => 0,
        }
    }

    pub fn sync_reports(&self) -> Vec<Aged<SyncReport>> {
        all(&self.inner.sync)
    }

    pub fn consistency_reports(&self) -> Vec<Aged<ConsistencyReport>> {
        all(&self.inner.consistency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_then_fresh() {
        let f = Feeds::default();
        assert_eq!(f.sync_lag("users"), Reading::Unknown);
        f.publish_sync(
            "users",
            SyncReport {
                last_lag: Duration::from_millis(40),
                ..Default::default()
            },
        );
        assert_eq!(
            f.sync_lag("users"),
            Reading::Fresh(Duration::from_millis(40))
        );
    }

    #[test]
    fn pending_change_ages() {
        let r = SyncReport {
            oldest_pending: Some(SystemTime::now() - Duration::from_secs(3)),
            last_lag: Duration::from_millis(10),
            ..Default::default()
        };
        assert!(r.current_lag(SystemTime::now()) >= Duration::from_secs(3));
    }
}
