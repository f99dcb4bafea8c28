//! `RolloutController`: the background job that walks rollouts. Every tick it gathers each
//! route's gate figures (health windows, sync feeds, webhook gates), asks the pure core what
//! to do, and makes transitions only through `ControlPlane::change` (audited, stored,
//! published) or, for data integrity, through the rollback path. It never touches the
//! snapshot itself. With a shared store only the replica holding the lease acts; the others
//! evaluate for their own admin API and follow the leader's weights through the store sync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Evaluation, GateFigures, HookAnswer, Phase, SyncFigures, Tick};
use crate::control::plane::{Change, ControlPlane, ROLLOUT_ACTOR, RolloutAction, RolloutSubject};
use crate::control::webhook;
use crate::health::monitor::Breach;
use crate::lifecycle::Shutdown;
use crate::snapshot::SnapshotHandle;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::GateFigure;

/// Often enough that a rollback is recorded well within a second of the route's rollback.
pub const TICK: Duration = Duration::from_millis(100);
/// How long a lease lasts without renewal: the longest a dead leader's rollouts stand still.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// How often the bake time is saved: a restart re-bakes at most this much.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A webhook gate is asked again this often while its step bakes.
const HOOK_EVERY: Duration = Duration::from_millis(500);
const HOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// A tick that came late (a stalled runtime, a slow store) counts for at most this much bake.
const MAX_TICK_CREDIT: Duration = Duration::from_secs(1);
/// The health window gates read when the route has no `rollback.window`.
const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// The controller's latest view of each route, read by the admin API and webhooks.
#[derive(Clone, Default)]
pub struct Board {
    inner: Arc<RwLock<HashMap<String, LiveEntry>>>,
}

#[derive(Debug, Clone)]
pub struct LiveEntry {
    /// The record revision these figures were taken on.
    pub revision: u64,
    pub baked: Duration,
    pub evaluation: Evaluation,
    pub leader: bool,
}

impl Board {
    pub fn get(&self, route: &str) -> Option<LiveEntry> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
            .cloned()
    }

    pub fn gates_json(&self, route: &str) -> Value {
        self.get(route)
            .map_or(json!([]), |e| e.evaluation.figures_json())
    }

    fn set(&self, route: &str, entry: LiveEntry) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route.to_string(), entry);
    }
}

struct Live {
    revision: u64,
    baked: Duration,
    saved: Duration,
    saved_at: Instant,
}

/// The last answer of each webhook gate, asked in the background so a slow receiver never
/// stalls the tick (and with it the recording of a rollback).
#[derive(Clone, Default)]
struct HookGates {
    inner: Arc<Mutex<HashMap<(String, String), HookState>>>,
}

struct HookState {
    revision: u64,
    answer: HookAnswer,
    asked: Instant,
    in_flight: bool,
}

impl HookGates {
    /// The answers for this revision of the record, asking again where one is due.
    fn answers(&self, subject: &RolloutSubject, payload: &Value) -> Vec<(String, HookAnswer)> {
        let urls: Vec<&str> = subject
            .spec
            .webhooks
            .iter()
            .filter(|w| w.on.iter().any(|e| e == "gate"))
            .map(|w| w.url.as_str())
            .collect();
        let revision = subject.record.revision;
        let asking = subject.record.phase == Phase::Progressing;
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for url in urls {
            let key = (subject.route.clone(), url.to_string());
            let state = map.entry(key.clone()).or_insert(HookState {
                revision,
                answer: HookAnswer::Pending,
                asked: Instant::now(),
                in_flight: false,
            });
            // An answer about another step (or before a pause) says nothing about this one.
            let current = state.revision == revision;
            if asking && !state.in_flight && (!current || state.asked.elapsed() >= HOOK_EVERY) {
                if !current {
                    state.answer = HookAnswer::Pending;
                }
                state.revision = revision;
                state.in_flight = true;
                state.asked = Instant::now();
                let (gates, url, payload) = (self.clone(), url.to_string(), payload.clone());
                tokio::spawn(async move {
                    let answer = match webhook::ask(&url, &payload, HOOK_TIMEOUT).await {
                        Ok(code) => HookAnswer::Status(code),
                        Err(e) => HookAnswer::Failed(e),
                    };
                    let mut map = gates.inner.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(s) = map.get_mut(&key) {
                        s.in_flight = false;
                        if s.revision == revision {
                            s.answer = answer;
                        }
                    }
                });
            }
            let answer = if state.revision == revision {
                state.answer.clone()
            } else {
                HookAnswer::Pending
            };
            out.push((url.to_string(), answer));
        }
        out
    }
}

pub struct RolloutController {
    control: Arc<ControlPlane>,
    snapshots: SnapshotHandle,
    metrics: Arc<Metrics>,
    /// This process's name in the lease.
    holder: String,
    leader: bool,
    lease_checked: Option<Instant>,
    live: HashMap<String, Live>,
    hooks: HookGates,
    last_tick: Instant,
}

impl RolloutController {
    pub fn new(
        control: Arc<ControlPlane>,
        snapshots: SnapshotHandle,
        metrics: Arc<Metrics>,
    ) -> RolloutController {
        use rand::RngExt;
        RolloutController {
            control,
            snapshots,
            metrics,
            holder: format!(
                "{}-{:016x}",
                std::process::id(),
                rand::rng().random::<u64>()
            ),
            leader: false,
            lease_checked: None,
            live: HashMap::new(),
            hooks: HookGates::default(),
            last_tick: Instant::now(),
        }
    }

    pub fn start(mut self, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.tick_all().await,
                    _ = shutdown.wait() => break,
                }
            }
            // Leave the bake time and the lease for whoever runs next.
            if self.leader {
                for (route, live) in &self.live {
                    self.control
                        .save_bake(route, live.revision, live.baked)
                        .await;
                }
                self.control.release_rollout_lease(&self.holder).await;
            }
        })
    }

    async fn renew_lease(&mut self) {
        let due = self
            .lease_checked
            .is_none_or(|at| at.elapsed() >= LEASE_RENEW);
        if !due {
            return;
        }
        let leads = self.control.rollout_lease(&self.holder, LEASE_TTL).await;
        self.lease_checked = Some(Instant::now());
        if leads && !self.leader {
            // The previous leader saved its bake times without telling the store sync.
            self.control.refresh_rollouts().await;
            self.live.clear();
            tracing::info!(holder = %self.holder, "this replica now drives rollouts");
        } else if !leads && self.leader {
            tracing::warn!(holder = %self.holder, "rollout lease lost; following another replica");
        }
        self.leader = leads;
    }

    async fn tick_all(&mut self) {
        self.renew_lease().await;
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_tick).min(MAX_TICK_CREDIT);
        self.last_tick = now;
        let subjects = self.control.rollout_subjects().await;
        for subject in subjects {
            self.tick_route(subject, now, elapsed).await;
        }
    }

    fn figures(&self, subject: &RolloutSubject, now: Instant, payload: &Value) -> GateFigures {
        let window = subject
            .rollback
            .as_ref()
            .map_or(DEFAULT_WINDOW, |r| r.window);
        let snapshot = self.snapshots.load();
        let (legacy, target) = match snapshot
            .routes
            .iter()
            .position(|r| *r.name == *subject.route)
        {
            Some(i) => (
                snapshot.health[i].legacy.figures(now, window),
                snapshot.health[i].target.figures(now, window),
            ),
            None => Default::default(),
        };
        let feeds = self.control.feeds();
        GateFigures {
            window,
            legacy,
            target,
            syncs: subject
                .syncs
                .iter()
                .map(|name| SyncFigures {
                    name: name.clone(),
                    lag: feeds.sync_lag(name),
                    consistency: feeds.consistency(name),
                    samples: feeds.consistency_samples(name),
                })
                .collect(),
            hooks: self.hooks.answers(subject, payload),
        }
    }

    async fn tick_route(&mut self, subject: RolloutSubject, now: Instant, elapsed: Duration) {
        let record = &subject.record;
        let live = self
            .live
            .entry(subject.route.clone())
            .or_insert_with(|| Live {
                revision: record.revision,
                baked: record.baked,
                saved: record.baked,
                saved_at: now,
            });
        // A transition (here, by an operator or by another replica) starts from its record.
        if live.revision != record.revision {
            *live = Live {
                revision: record.revision,
                baked: record.baked,
                saved: record.baked,
                saved_at: now,
            };
        }
        let baked = live.baked;
        let payload = json!({
            "event": "gate",
            "route": subject.route,
            "step": crate::control::model::shown_step(record),
            "weight": super::shown_weight(&subject.walk, record),
            "gates": self.control.rollout_board().gates_json(&subject.route),
        });
        let figures = self.figures(&subject, now, &payload);
        let evaluation = super::evaluate(&subject.spec.gates, subject.rollback.as_ref(), &figures);
        let mut current = record.clone();
        current.baked = baked;
        let decision = super::tick(
            &current,
            &subject.walk,
            subject.spec.bake_at(record.step),
            &evaluation,
            subject.rolled_back.as_deref(),
            elapsed,
        );
        self.export(&subject, &evaluation);
        let live = self.live.get_mut(&subject.route).expect("inserted above");
        match &decision {
            Tick::Bake { baked } => live.baked = *baked,
            Tick::Hold { .. } => live.baked = Duration::ZERO,
            _ => {}
        }
        self.control.rollout_board().set(
            &subject.route,
            LiveEntry {
                revision: record.revision,
                baked: live.baked,
                evaluation: evaluation.clone(),
                leader: self.leader,
            },
        );
        if !self.leader {
            return;
        }
        match decision {
            Tick::Still => {}
            Tick::Bake { .. } | Tick::Hold { .. } => {
                let reset = live.baked.is_zero() && !live.saved.is_zero();
                if reset || (live.baked != live.saved && live.saved_at.elapsed() >= SAVE_EVERY) {
                    let (revision, baked) = (live.revision, live.baked);
                    live.saved = baked;
                    live.saved_at = now;
                    self.control
                        .save_bake(&subject.route, revision, baked)
                        .await;
                }
            }
            Tick::Transition(transition) => {
                let change = Change::Rollout {
                    route: subject.route.clone(),
                    action: RolloutAction::Controller {
                        revision: record.revision,
                        transition: transition.clone(),
                    },
                };
                match self.control.change(ROLLOUT_ACTOR, change, None).await {
                    Ok(_) => tracing::info!(
                        route = %subject.route,
                        event = transition.event(),
                        "rollout transition"
                    ),
                    Err(e) => tracing::warn!(
                        route = %subject.route,
                        error = %e,
                        "rollout transition not made; trying again next tick"
                    ),
                }
            }
            Tick::RollBack { detail } => {
                tracing::error!(route = %subject.route, %detail, "data integrity breach during a rollout");
                self.control
                    .auto_rollback(
                        &subject.route,
                        Breach {
                            reason: "data_integrity",
                            detail,
                            figures: evaluation.figures_json(),
                        },
                    )
                    .await;
            }
        }
    }

    fn export(&self, subject: &RolloutSubject, evaluation: &Evaluation) {
        let route: Arc<str> = Arc::from(subject.route.as_str());
        // The same step and phase the API shows (`control::model`).
        let step =
            i64::try_from(crate::control::model::shown_step(&subject.record)).unwrap_or(i64::MAX);
        let (phase, _) =
            crate::control::model::rollout_phase(&subject.record, subject.rolled_back.as_deref());
        self.metrics.export_rollout(
            &route,
            step,
            phase.as_str(),
            evaluation.gates.iter().map(|g| GateFigure {
                name: &g.name,
                figure: g.figure,
                pass: g.pass,
            }),
        );
    }
}
