//! The job supervisor: every background loop (store sync, config reload, rollout controller,
//! rollback monitor, prober, sync workers, samplers) runs as a named job it starts with the
//! shutdown token, watches, and restarts with exponential backoff and jitter when it ends
//! before shutdown or panics. Its view (running, restarts, last error) is `GET /v1/jobs`
//! and the `jobs` detail of `/readyz`. A job that ends is never silent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::lifecycle::Shutdown;

/// First restart delay; doubled per consecutive failure up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A job that ran this long before failing starts its backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// One job as `GET /v1/jobs` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub name: String,
    /// `running`, `restarting` (waiting out its backoff), `stopped` (after shutdown), or
    /// `watched` for a group the supervisor reports on but does not restart.
    pub state: String,
    /// True while it runs.
    pub ready: bool,
    pub restarts: u64,
    /// Why it last ended before shutdown (a panic's message, or that it returned).
    pub last_error: Option<String>,
    /// RFC 3339 time of the last failure.
    pub last_error_at: Option<String>,
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

#[derive(Clone, Default)]
pub struct Supervisor {
    jobs: Arc<Mutex<BTreeMap<String, JobView>>>,
}

impl Supervisor {
    fn update(&self, name: &str, f: impl FnOnce(&mut JobView)) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let job = jobs.entry(name.to_string()).or_insert_with(|| JobView {
            name: name.to_string(),
            state: "running".into(),
            ready: false,
            restarts: 0,
            last_error: None,
            last_error_at: None,
        });
        f(job);
    }

    /// Runs `start(shutdown)` as job `name`; whenever the task it returns ends before
    /// shutdown (returns or panics), records why and starts it again after the backoff.
    pub fn supervise<F>(&self, name: &str, shutdown: Shutdown, start: F) -> JoinHandle<()>
    where
        F: Fn(Shutdown) -> JoinHandle<()> + Send + 'static,
    {
        let (this, name) = (self.clone(), name.to_string());
        self.update(&name, |_| {});
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                this.update(&name, |j| {
                    j.state = "running".into();
                    j.ready = true;
                });
                let started = tokio::time::Instant::now();
                let ended = start(shutdown.clone()).await;
                if shutdown.is_triggered() {
                    this.update(&name, |j| {
                        j.state = "stopped".into();
                        j.ready = false;
                    });
                    return;
                }
                let why = match ended {
                    Ok(()) => "the job returned before shutdown".to_string(),
                    Err(e) => panic_text(e),
                };
                if started.elapsed() >= HEALTHY_RUN {
                    failures = 0;
                }
                let delay = backoff(failures, rand::random::<f64>());
                failures = failures.saturating_add(1);
                tracing::error!(job = %name, error = %why, retry_in = ?delay, "background job ended; restarting");
                this.update(&name, |j| {
                    j.state = "restarting".into();
                    j.ready = false;
                    j.restarts += 1;
                    j.last_error = Some(why);
                    j.last_error_at = Some(super::store::now_rfc3339());
                });
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait() => {
                        this.update(&name, |j| j.state = "stopped".into());
                        return;
                    }
                }
            }
        })
    }

    /// Reports on tasks started as a group by their own module (sync workers, samplers):
    /// shown as `watched`, and an end before shutdown is recorded, not restarted.
    pub fn watch(
        &self,
        name: &str,
        shutdown: Shutdown,
        tasks: Vec<JoinHandle<()>>,
    ) -> JoinHandle<()> {
        let (this, name) = (self.clone(), name.to_string());
        self.update(&name, |j| {
            j.state = "watched".into();
            j.ready = true;
        });
        tokio::spawn(async move {
            if tasks.is_empty() {
                // Nothing configured in this group: nothing can fail until shutdown.
                let mut stop = shutdown.clone();
                stop.wait().await;
            }
            for task in tasks {
                let ended = task.await;
                if shutdown.is_triggered() {
                    continue;
                }
                let why = match ended {
                    Ok(()) => "a task of the group returned before shutdown".to_string(),
                    Err(e) => panic_text(e),
                };
                tracing::error!(job = %name, error = %why, "background task ended");
                this.update(&name, |j| {
                    j.ready = false;
                    j.last_error = Some(why);
                    j.last_error_at = Some(super::store::now_rfc3339());
                });
            }
            this.update(&name, |j| {
                j.state = "stopped".into();
                j.ready = false;
            });
        })
    }

    pub fn jobs(&self) -> Vec<JobView> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.values().cloned().collect()
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            format!("panicked: {text}")
        }
        Err(e) => e.to_string(),
    }
}

/// The delay before restart number `failures + 1`: `FIRST_BACKOFF · 2^failures`, capped at
/// `MAX_BACKOFF`, then scaled by a jitter factor in [0.5, 1.0) (`unit` in [0, 1)), so jobs
/// that failed together do not retry in lockstep ("equal jitter").
fn backoff(failures: u32, unit: f64) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF);
    base.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        assert_eq!(backoff(0, 0.0), Duration::from_millis(125));
        assert_eq!(backoff(0, 0.999_999).as_millis(), 249);
        assert_eq!(backoff(3, 0.0), Duration::from_millis(1000));
        for n in [8, 20, 1000] {
            assert_eq!(backoff(n, 0.0), Duration::from_secs(15));
            assert!(backoff(n, 0.99) < MAX_BACKOFF);
        }
    }

    #[tokio::test]
    async fn a_job_that_panics_is_restarted_and_its_error_shown() {
        let (stop, shutdown) = crate::lifecycle::shutdown_pair();
        let supervisor = Supervisor::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let task = supervisor.supervise("flaky", shutdown, move |mut sd| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                assert!(n > 0, "first run fails");
                sd.wait().await;
            })
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let job = supervisor.jobs().pop().unwrap();
        assert_eq!((job.name.as_str(), job.restarts), ("flaky", 1));
        assert!(
            job.last_error
                .as_deref()
                .unwrap()
                .contains("first run fails"),
            "{job:?}"
        );
        stop.trigger();
        task.await.unwrap();
        assert_eq!(supervisor.jobs()[0].state, "stopped");
    }
}
