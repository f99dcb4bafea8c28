//! Passive health: per route and side, a sliding window of outcomes and latencies from live
//! traffic, recorded on the request path with atomics only.
//!
//! The window is a ring of one-second slots. A writer that finds a slot holding an older
//! second claims and clears it; a writer racing that clear may lose its increment, which
//! skews a figure by one request at a second boundary and is the price of taking no lock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Slots in the ring; a window may span at most `SLOTS - 2` seconds so the slot being
/// written is never one being read as complete history.
const SLOTS: usize = 32;
pub const MAX_WINDOW: Duration = Duration::from_secs(SLOTS as u64 - 2);

/// Latency buckets: upper bounds growing by 30% from 50 µs; the last one is unbounded.
const LATENCY_BUCKETS: usize = 48;

fn latency_bounds() -> &'static [u64; LATENCY_BUCKETS - 1] {
    static BOUNDS: OnceLock<[u64; LATENCY_BUCKETS - 1]> = OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut bounds = [0u64; LATENCY_BUCKETS - 1];
        let mut b = 50_000.0f64;
        for slot in &mut bounds {
            *slot = b as u64;
            b *= 1.3;
        }
        bounds
    })
}

/// The process's clock for windows: whole seconds since the first use.
pub fn now_second(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_secs() + 1
}

/// How one attempt at a backend ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    ConnectError,
    Timeout,
    /// Reset or broken exchange after connecting.
    Failed,
}

struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    five_xx: AtomicU64,
    connect_errors: AtomicU64,
    timeouts: AtomicU64,
    replays: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            second: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            five_xx: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Slot {
    /// Makes this slot the one for `second`, clearing what an older second left.
    /// False when the slot already holds a newer second: the sample is too old for any
    /// window and must not wipe recent data.
    fn claim(&self, second: u64) -> bool {
        let seen = self.second.load(Ordering::Acquire);
        if seen > second {
            return false;
        }
        if seen != second
            && self
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for counter in [
                &self.requests,
                &self.five_xx,
                &self.connect_errors,
                &self.timeouts,
                &self.replays,
            ] {
                counter.store(0, Ordering::Relaxed);
            }
            for bucket in &self.latency {
                bucket.store(0, Ordering::Relaxed);
            }
        }
        true
    }
}

pub struct OutcomeWindow {
    slots: Box<[Slot]>,
}

impl Default for OutcomeWindow {
    fn default() -> Self {
        OutcomeWindow {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }
}

impl std::fmt::Debug for OutcomeWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeWindow").finish_non_exhaustive()
    }
}

impl OutcomeWindow {
    fn slot(&self, second: u64) -> Option<&Slot> {
        let slot = &self.slots[(second % SLOTS as u64) as usize];
        slot.claim(second).then_some(slot)
    }

    /// Records an outcome under the second it completed (`at`), so a slow request or a
    /// timeout counts now, when it tells something about the backend.
    pub fn record(&self, outcome: Outcome, at: Instant, elapsed: Duration) {
        let Some(slot) = self.slot(now_second(at)) else {
            return;
        };
        slot.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Status(code) if code >= 500 => {
                slot.five_xx.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Status(_) => {}
            Outcome::ConnectError => {
                slot.connect_errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Timeout => {
                slot.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed => {
                slot.five_xx.fetch_add(1, Ordering::Relaxed);
            }
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = latency_bounds().partition_point(|&bound| bound < nanos);
        slot.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_replay(&self, at: Instant) {
        if let Some(slot) = self.slot(now_second(at)) {
            slot.replays.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests and replays over the window: the cheap sums a failover budget needs.
    pub fn requests_and_replays(&self, now: Instant, window: Duration) -> (u64, u64) {
        let current = now_second(now);
        let oldest = current.saturating_sub(window.as_secs().clamp(1, MAX_WINDOW.as_secs()) - 1);
        self.slots
            .iter()
            .filter(|slot| {
                let second = slot.second.load(Ordering::Acquire);
                second != 0 && second >= oldest && second <= current
            })
            .fold((0, 0), |(r, p), slot| {
                (
                    r + slot.requests.load(Ordering::Relaxed),
                    p + slot.replays.load(Ordering::Relaxed),
                )
            })
    }

    /// Sums the last `window` seconds up to and including the current one.
    pub fn figures(&self, now: Instant, window: Duration) -> WindowFigures {
        self.figures_after(now, window, None)
    }

    /// Like `figures`, leaving out every second up to and including `after`'s: what
    /// happened before an operator cleared a rollback must not roll the route back again.
    pub fn figures_after(
        &self,
        now: Instant,
        window: Duration,
        after: Option<Instant>,
    ) -> WindowFigures {
        let current = now_second(now);
        let span = window.as_secs().clamp(1, MAX_WINDOW.as_secs());
        let oldest = current
            .saturating_sub(span - 1)
            .max(after.map_or(0, |a| now_second(a) + 1));
        let mut f = WindowFigures::default();
        let mut latency = [0u64; LATENCY_BUCKETS];
        for slot in self.slots.iter() {
            let second = slot.second.load(Ordering::Acquire);
            if second < oldest || second > current || second == 0 {
                continue;
            }
            f.requests += slot.requests.load(Ordering::Relaxed);
            f.five_xx += slot.five_xx.load(Ordering::Relaxed);
            f.connect_errors += slot.connect_errors.load(Ordering::Relaxed);
            f.timeouts += slot.timeouts.load(Ordering::Relaxed);
            f.replays += slot.replays.load(Ordering::Relaxed);
            for (sum, bucket) in latency.iter_mut().zip(&slot.latency) {
                *sum += bucket.load(Ordering::Relaxed);
            }
        }
        f.p50 = quantile(&latency, 0.50);
        f.p99 = quantile(&latency, 0.99);
        f
    }
}

/// The upper bound of the bucket holding quantile `q`: an over-estimate by at most 30%.
fn quantile(latency: &[u64; LATENCY_BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let bounds = latency_bounds();
            let nanos = bounds
                .get(i)
                .copied()
                .unwrap_or_else(|| bounds[bounds.len() - 1] * 2);
            return Some(Duration::from_nanos(nanos));
        }
    }
    None
}

/// A window's sums.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowFigures {
    pub requests: u64,
    pub five_xx: u64,
    pub connect_errors: u64,
    pub timeouts: u64,
    pub replays: u64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl WindowFigures {
    /// 5xx, connect errors and timeouts: what a user of the target would have seen fail.
    pub fn errors(&self) -> u64 {
        self.five_xx + self.connect_errors + self.timeouts
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors() as f64 / self.requests as f64
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "errors": self.errors(),
            "five_xx": self.five_xx,
            "connect_errors": self.connect_errors,
            "timeouts": self.timeouts,
            "replays": self.replays,
            "error_rate": self.error_rate(),
            "p50_ms": self.p50.map(|d| d.as_secs_f64() * 1000.0),
            "p99_ms": self.p99.map(|d| d.as_secs_f64() * 1000.0),
        })
    }
}

/// Both sides of one route. Lives as long as the route's name does, across snapshots.
#[derive(Debug, Default)]
pub struct RouteHealth {
    pub legacy: OutcomeWindow,
    pub target: OutcomeWindow,
}

impl RouteHealth {
    pub fn side(&self, side: crate::dataplane::split::Side) -> &OutcomeWindow {
        match side {
            crate::dataplane::split::Side::Legacy => &self.legacy,
            crate::dataplane::split::Side::Target => &self.target,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_and_latency_in_the_window() {
        let w = OutcomeWindow::default();
        let now = Instant::now();
        for _ in 0..90 {
            w.record(Outcome::Status(200), now, Duration::from_millis(2));
        }
        for _ in 0..5 {
            w.record(Outcome::Status(503), now, Duration::from_millis(2));
        }
        w.record(Outcome::ConnectError, now, Duration::from_millis(1));
        for _ in 0..4 {
            w.record(Outcome::Timeout, now, Duration::from_millis(900));
        }
        let f = w.figures(now, Duration::from_secs(10));
        assert_eq!(f.requests, 100);
        assert_eq!(f.errors(), 10);
        assert!((f.error_rate() - 0.10).abs() < 1e-9);
        let p50 = f.p50.unwrap();
        assert!(
            p50 >= Duration::from_millis(2) && p50 < Duration::from_micros(2600),
            "{p50:?}"
        );
        let p99 = f.p99.unwrap();
        assert!(
            p99 >= Duration::from_millis(900) && p99 < Duration::from_millis(1170),
            "{p99:?}"
        );
    }

    #[test]
    fn a_sample_older_than_its_slot_is_dropped_and_wipes_nothing() {
        let w = OutcomeWindow::default();
        let start = Instant::now();
        let now = start + Duration::from_secs(SLOTS as u64 + 3);
        w.record(Outcome::Status(200), now, Duration::from_millis(1));
        // Same slot index, a full ring earlier.
        w.record(
            Outcome::Timeout,
            start + Duration::from_secs(3),
            Duration::from_secs(30),
        );
        let f = w.figures(now, Duration::from_secs(10));
        assert_eq!((f.requests, f.errors()), (1, 0));
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let w = OutcomeWindow::default();
        let start = Instant::now();
        w.record(Outcome::Status(500), start, Duration::from_millis(1));
        let later = start + Duration::from_secs(5);
        w.record(Outcome::Status(200), later, Duration::from_millis(1));
        assert_eq!(w.figures(later, Duration::from_secs(10)).requests, 2);
        let f = w.figures(later, Duration::from_secs(3));
        assert_eq!((f.requests, f.errors()), (1, 0));
        // A slot reused a full ring later starts from zero.
        let much_later = start + Duration::from_secs(SLOTS as u64);
        w.record(Outcome::Status(200), much_later, Duration::from_millis(1));
        assert_eq!(w.figures(much_later, Duration::from_secs(1)).requests, 1);
    }
}
