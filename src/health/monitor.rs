//! Rollback decisions: every 100 ms, each route with `rollback` limits is checked against
//! its target's window; a breach is handed to the control plane, which rolls the route back
//! with one snapshot publish. A rolled-back route is not evaluated again: recovery is an
//! operator's (or a rollout's) call, never the monitor's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::WindowFigures;
use crate::config::RollbackSpec;
use crate::control::plane::ControlPlane;
use crate::lifecycle::Shutdown;
use crate::snapshot::SnapshotHandle;

pub const EVALUATION_INTERVAL: Duration = Duration::from_millis(100);

/// Why a route must go back to legacy, with the figures that showed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    /// `error_rate`, `latency` or `target_down`: the `reason` label of the rollback metric.
    pub reason: &'static str,
    pub detail: String,
    pub figures: serde_json::Value,
}

/// The pure decision. `target_down` is true when active probes hold every target endpoint
/// down.
pub fn evaluate(
    spec: &RollbackSpec,
    legacy: &WindowFigures,
    target: &WindowFigures,
    target_down: bool,
) -> Option<Breach> {
    let figures = serde_json::json!({ "legacy": legacy.to_json(), "target": target.to_json(), "window_s": spec.window.as_secs() });
    if target_down {
        return Some(Breach {
            reason: "target_down",
            detail: "every target endpoint fails its health probe".to_string(),
            figures,
        });
    }
    if target.requests < spec.min_requests {
        return None;
    }
    if let Some(max) = spec.max_error_rate
        && target.error_rate() > max
    {
        return Some(Breach {
            reason: "error_rate",
            detail: format!(
                "target error rate {:.3} > {max} ({} of {} requests in {}s)",
                target.error_rate(),
                target.errors(),
                target.requests,
                spec.window.as_secs()
            ),
            figures,
        });
    }
    if let Some(ratio) = spec.max_latency_ratio
        && legacy.requests >= spec.min_requests
        && let (Some(t), Some(l)) = (target.p99, legacy.p99)
        && t.as_secs_f64() > ratio * l.as_secs_f64()
    {
        return Some(Breach {
            reason: "latency",
            detail: format!(
                "target p99 {:.1} ms > {ratio} × legacy p99 {:.1} ms",
                t.as_secs_f64() * 1000.0,
                l.as_secs_f64() * 1000.0
            ),
            figures,
        });
    }
    None
}

pub struct RollbackMonitor {
    snapshots: SnapshotHandle,
    control: Arc<ControlPlane>,
    /// Routes rolled back at the last evaluation.
    rolled_back: std::collections::HashSet<String>,
    /// When a rollback was last cleared, per route: older figures do not count.
    cleared: std::collections::HashMap<String, Instant>,
}

impl RollbackMonitor {
    pub fn new(snapshots: SnapshotHandle, control: Arc<ControlPlane>) -> RollbackMonitor {
        RollbackMonitor {
            snapshots,
            control,
            rolled_back: Default::default(),
            cleared: Default::default(),
        }
    }

    pub fn start(mut self, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVALUATION_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.evaluate_all().await,
                    _ = shutdown.wait() => return,
                }
            }
        })
    }

    /// `rollback.min_consistency`: a fresh sampled figure, on enough samples, below the
    /// limit rolls the route back with reason `data_integrity`, rollout or not.
    async fn integrity_breaches(&mut self) -> Vec<(String, Breach)> {
        let mut out = Vec::new();
        for (route, min, syncs) in self.control.integrity_limits().await {
            if self.rolled_back.contains(&route) {
                continue;
            }
            let feeds = self.control.feeds();
            for sync in syncs {
                let samples = feeds.consistency_samples(&sync);
                if let crate::telemetry::feeds::Reading::Fresh(c) = feeds.consistency(&sync)
                    && c < min
                    && crate::consistency::enough_to_judge(samples, min)
                {
                    self.rolled_back.insert(route.clone());
                    out.push((
                        route.clone(),
                        Breach {
                            reason: "data_integrity",
                            detail: format!(
                                "sync `{sync}` consistency {c:.5} < rollback.min_consistency {min}"
                            ),
                            figures: serde_json::json!({
                                "sync": sync, "consistency_lower_bound": c, "samples": samples, "limit": min
                            }),
                        },
                    ));
                    break;
                }
            }
        }
        out
    }

    async fn evaluate_all(&mut self) {
        let breaches: Vec<(String, Breach)> = {
            let snapshot = self.snapshots.load();
            let now = Instant::now();
            let mut breaches = Vec::new();
            for (i, route) in snapshot.routes.iter().enumerate() {
                let name = &*route.name;
                if route.rolled_back {
                    self.rolled_back.insert(name.to_string());
                    continue;
                }
                if self.rolled_back.remove(name) {
                    self.cleared.insert(name.to_string(), now);
                }
                let Some(spec) = snapshot.policies[i].rollback.as_ref() else {
                    continue;
                };
                let after = self.cleared.get(name).copied();
                let health = &snapshot.health[i];
                let target = health.target.figures_after(now, spec.window, after);
                let legacy = health.legacy.figures_after(now, spec.window, after);
                let target_down = snapshot.backend(route.target).all_down();
                if let Some(b) = evaluate(spec, &legacy, &target, target_down) {
                    // Known now, not only from the next snapshot: an operator may clear the
                    // rollback before the next evaluation sees it.
                    self.rolled_back.insert(name.to_string());
                    breaches.push((name.to_string(), b));
                }
            }
            breaches
        };
        let mut breaches = breaches;
        breaches.extend(self.integrity_breaches().await);
        for (route, breach) in breaches {
            self.control.auto_rollback(&route, breach).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RollbackSpec {
        RollbackSpec {
            max_error_rate: Some(0.05),
            max_latency_ratio: Some(1.2),
            window: Duration::from_secs(10),
            min_requests: 20,
            min_consistency: None,
        }
    }

    fn figures(requests: u64, five_xx: u64, p99_ms: u64) -> WindowFigures {
        WindowFigures {
            requests,
            five_xx,
            p99: Some(Duration::from_millis(p99_ms)),
            ..Default::default()
        }
    }

    #[test]
    fn error_rate_over_the_limit_with_enough_requests_breaches() {
        let b = evaluate(&spec(), &figures(100, 0, 10), &figures(40, 3, 10), false).unwrap();
        assert_eq!(b.reason, "error_rate");
        assert!(
            evaluate(&spec(), &figures(100, 0, 10), &figures(40, 2, 10), false).is_none(),
            "5% is not over 5%"
        );
        assert!(
            evaluate(&spec(), &figures(100, 0, 10), &figures(19, 19, 10), false).is_none(),
            "below min_requests"
        );
    }

    #[test]
    fn latency_compares_p99s_when_both_sides_have_traffic() {
        let b = evaluate(&spec(), &figures(50, 0, 10), &figures(50, 0, 30), false).unwrap();
        assert_eq!(b.reason, "latency");
        assert!(evaluate(&spec(), &figures(50, 0, 10), &figures(50, 0, 12), false).is_none());
        assert!(
            evaluate(&spec(), &figures(5, 0, 10), &figures(50, 0, 30), false).is_none(),
            "legacy too quiet to compare"
        );
    }

    #[test]
    fn a_dead_target_breaches_without_traffic() {
        let b = evaluate(
            &spec(),
            &WindowFigures::default(),
            &WindowFigures::default(),
            true,
        )
        .unwrap();
        assert_eq!(b.reason, "target_down");
    }
}
