//! `ControlPlane`: the one path by which routing changes. The file's config and the runtime
//! overrides together are the desired state; every operator change goes plan (under the
//! in-memory state lock) → write the store (lock released) → publish (lock re-taken), and a
//! change the store did not take is not published. A health rollback is the one exception:
//! published at once, recorded in the store after. No store I/O ever runs under the state lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::model::{self, FlagView, RolloutView, RouteView};
use super::overrides::{self, FlagOverride, Overrides, RollbackMark, RouteOverride};
use super::rollout::{self, RolloutError, RolloutRecord, Routing, Transition, Walk};
use super::store::{AuditEntry, Engine, StateStore, StateWrite, StoreError, now_rfc3339};
use super::webhook;
use crate::config::Config;
use crate::dataplane::route::Route;
use crate::dataplane::split::{Side, Split, Weight};
use crate::health::monitor::Breach;
use crate::lifecycle::Shutdown;
use crate::snapshot::Publisher;
use crate::telemetry::metrics::RollbackLabels;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("route `{0}` does not exist")]
    UnknownRoute(String),
    #[error("flag `{0}` does not exist")]
    UnknownFlag(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the resource changed since you read it (ETag {current}); read it again and retry")]
    Stale { current: String },
    #[error("the state store is unavailable, nothing was changed: {0}")]
    StoreUnavailable(String),
    #[error("another replica changed the state at the same moment; retry")]
    Conflict,
    #[error(
        "route `{route}` has a rollout progressing (step {step} of {steps}), which sets its routing; pause it (`switchyard ctl rollout pause {route}`) or abort it (`switchyard ctl rollout abort {route}`) first"
    )]
    RolloutInProgress {
        route: String,
        step: usize,
        steps: usize,
    },
    #[error(transparent)]
    Rollout(#[from] RolloutError),
}

/// Who moves a rollout: an operator's command, or the controller's decision taken on the
/// record with `revision` (refused as a conflict if the record changed since).
#[derive(Debug, Clone)]
pub enum RolloutAction {
    Command(rollout::Command),
    Controller {
        revision: u64,
        transition: Transition,
    },
}

/// An operator's change, before it is checked.
#[derive(Debug, Clone)]
pub enum Change {
    SetWeight {
        route: String,
        percent: f64,
    },
    /// `active` as the client wrote it, so a wrong side is refused (and audited) here.
    Switch {
        route: String,
        active: String,
    },
    Rollback {
        route: String,
        reason: String,
    },
    Reset {
        route: String,
    },
    SetFlag {
        flag: String,
        percent: f64,
    },
    Rollout {
        route: String,
        action: RolloutAction,
    },
}

impl Change {
    fn action(&self) -> &'static str {
        match self {
            Change::SetWeight { .. } => "set_weight",
            Change::Switch { .. } => "switch",
            Change::Rollback { .. } => "rollback",
            Change::Reset { .. } => "reset",
            Change::SetFlag { .. } => "set_flag",
            Change::Rollout { action, .. } => match action {
                RolloutAction::Command(c) => match c {
                    rollout::Command::Start => "rollout_start",
                    rollout::Command::Pause => "rollout_pause",
                    rollout::Command::Resume => "rollout_resume",
                    rollout::Command::Promote { .. } => "rollout_promote",
                    rollout::Command::Abort => "rollout_abort",
                },
                RolloutAction::Controller { transition, .. } => match transition {
                    Transition::Advance { .. } => "rollout_step",
                    Transition::Promote => "rollout_promote",
                    Transition::RolledBack { .. } => "rollout_rolled_back",
                    Transition::Start => "rollout_start",
                    Transition::Pause => "rollout_pause",
                    Transition::Resume => "rollout_resume",
                    Transition::Abort => "rollout_abort",
                },
            },
        }
    }

    fn target(&self) -> &str {
        match self {
            Change::SetWeight { route, .. }
            | Change::Switch { route, .. }
            | Change::Rollback { route, .. }
            | Change::Reset { route }
            | Change::Rollout { route, .. } => route,
            Change::SetFlag { flag, .. } => flag,
        }
    }
}

/// The actor health rollbacks are audited under.
pub const HEALTH_ACTOR: &str = "health";

/// The actor the rollout controller's transitions are audited under.
pub const ROLLOUT_ACTOR: &str = "rollout";

/// What the rollout controller needs of one route with a `rollout:` block, read in one go.
#[derive(Debug, Clone)]
pub struct RolloutSubject {
    pub route: String,
    pub spec: crate::config::RolloutSpec,
    pub rollback: Option<crate::config::RollbackSpec>,
    pub walk: Walk,
    pub record: RolloutRecord,
    /// The reason of the route's rollback mark, when it is rolled back.
    pub rolled_back: Option<String>,
    /// Sync pairs whose `routes` name this route.
    pub syncs: Vec<String>,
}

struct Desired {
    config: Config,
    overrides: Overrides,
    /// Routes rolled back by health whose rollback is not in the store yet.
    unrecorded_rollbacks: std::collections::BTreeSet<String>,
}

/// What a change reads back: the view of the route or flag it changed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Changed {
    Route(Box<RouteView>),
    Flag(FlagView),
}

impl Changed {
    pub fn etag(&self) -> &str {
        match self {
            Changed::Route(v) => &v.etag,
            Changed::Flag(v) => &v.etag,
        }
    }

    /// The view as the audit log keeps it: without the ETag and the live figures.
    fn audited(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.remove("etag");
            map.remove("health");
        }
        value
    }
}

/// A change planned under the state lock, to be written to the store with the lock released.
struct Planned {
    before: Changed,
    after: Changed,
    write: StateWrite,
    overrides: Overrides,
    /// The route's rollback mark when the change was planned: a different one found when it
    /// is published came from a health rollback in between, which stays in force.
    mark: Option<RollbackMark>,
}

pub struct ControlPlane {
    publisher: Arc<Publisher>,
    /// Desired state and publishing. A std mutex on purpose: it cannot be held across an
    /// `.await`, so no store call, webhook or other I/O ever runs under it, and a health
    /// rollback (which takes only this lock) never waits on the database.
    desired: std::sync::Mutex<Desired>,
    /// Orders this replica's store writes (operator changes, rollback persistence, reads of
    /// the store's state). Held across store I/O; the rollback path never takes it.
    writer: Mutex<()>,
    /// `None` until the store has been reached once.
    store: std::sync::Mutex<Option<StateStore>>,
    store_url: String,
    store_ok: AtomicBool,
    feeds: crate::telemetry::Feeds,
    board: rollout::controller::Board,
    jobs: super::jobs::Supervisor,
}

impl ControlPlane {
    pub fn new(publisher: Arc<Publisher>, config: Config) -> ControlPlane {
        ControlPlane {
            publisher,
            store_url: config.state_url.clone(),
            desired: std::sync::Mutex::new(Desired {
                config,
                overrides: Overrides::default(),
                unrecorded_rollbacks: Default::default(),
            }),
            writer: Mutex::new(()),
            store: std::sync::Mutex::new(None),
            store_ok: AtomicBool::new(false),
            feeds: crate::telemetry::Feeds::default(),
            board: Default::default(),
            jobs: Default::default(),
        }
    }

    /// The supervisor every background job runs under.
    pub fn jobs(&self) -> &super::jobs::Supervisor {
        &self.jobs
    }

    fn desired(&self) -> std::sync::MutexGuard<'_, Desired> {
        self.desired.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rollout controller's latest gate figures per route, for the API and webhooks.
    pub fn rollout_board(&self) -> &rollout::controller::Board {
        &self.board
    }

    /// Figures of the sync workers and samplers: written by those jobs, read by gates and
    /// the admin API.
    pub fn feeds(&self) -> &crate::telemetry::Feeds {
        &self.feeds
    }

    pub fn store_ok(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
    }

    /// Connects to the store and applies its overrides. On failure the file's config keeps
    /// serving and `run_store_sync` keeps trying.
    pub async fn connect_store(&self) -> Result<(), StoreError> {
        let store = StateStore::connect(&self.store_url).await?;
        self.adopt_from(&store).await?;
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
        self.store_ok.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// A new file config (reload): published with the overrides still on top.
    pub async fn set_config(&self, config: Config) -> u64 {
        let mut desired = self.desired();
        desired.config = config;
        self.publish(&desired)
    }

    fn publish(&self, desired: &Desired) -> u64 {
        let effective = overrides::apply(&desired.config, &desired.overrides);
        self.publisher.publish(&effective)
    }

    /// Reads the store's overrides (at start, or another replica's change) and applies them.
    /// The read happens under the writer lock: a change of this process commits under the
    /// same lock, so a read can never return a state older than one this process published.
    async fn adopt_from(&self, store: &StateStore) -> Result<(), StoreError> {
        let _writing = self.writer.lock().await;
        let mut overrides = store.load().await?;
        let mut desired = self.desired();
        // A health rollback is in force before it is recorded; until it is, the store does
        // not know it, and must not undo it.
        for route in &desired.unrecorded_rollbacks {
            if let Some(mark) = desired
                .overrides
                .routes
                .get(route)
                .and_then(|o| o.rollback.clone())
            {
                overrides.routes.entry(route.clone()).or_default().rollback = Some(mark);
            }
        }
        if desired.overrides != overrides {
            desired.overrides = overrides;
            let version = self.publish(&desired);
            tracing::info!(version, "runtime state from the store applied");
        }
        Ok(())
    }

    fn current_store(&self) -> Option<StateStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Keeps this replica in step with the store: reconnects with backoff while it is down,
    /// then follows changes (Postgres NOTIFY, and a 1 s poll of the version row, which also
    /// serves SQLite and covers a lost notification).
    pub async fn run_store_sync(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(250);
        let mut last_version = None;
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        loop {
            if self.current_store().is_none() {
                match self.connect_store().await {
                    Ok(()) => backoff = Duration::from_millis(250),
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "state store unavailable; routing continues on the last config");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.wait() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            let Some(store) = self.current_store() else {
                continue;
            };
            if listener.is_none() && store.engine() == Engine::Postgres {
                listener = listen(store.url()).await;
            }
            match store.version().await {
                Ok(version) => {
                    if !self.store_ok.swap(true, Ordering::Relaxed) {
                        tracing::info!("state store reachable again");
                    }
                    if last_version != Some(version) {
                        match self.adopt_from(&store).await {
                            Ok(()) => last_version = Some(version),
                            Err(e) => tracing::warn!(error = %e, "cannot read runtime state"),
                        }
                    }
                }
                Err(e) => {
                    if self.store_ok.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "state store unreachable; routing continues on the last snapshot");
                    }
                    listener = None;
                }
            }
            let poll = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                _ = poll => {}
                notified = wait_notify(&mut listener) => {
                    if !notified {
                        listener = None;
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    }

    /// A health rollback. Unlike an operator's change it is published first and persisted
    /// after: sending users back to the monolith must not wait for, or depend on, the store.
    /// It takes only the in-memory state lock, which no store call is ever made under.
    pub async fn auto_rollback(self: &Arc<Self>, route: &str, breach: Breach) {
        let reason = format!("{}: {}", breach.reason, breach.detail);
        let (mark, entry) = {
            let mut desired = self.desired();
            if desired
                .overrides
                .routes
                .get(route)
                .is_some_and(|o| o.rollback.is_some())
            {
                return;
            }
            let Some(before) = view_of(&desired, &Target::Route(route)) else {
                return;
            };
            let mark = RollbackMark {
                at: now_rfc3339(),
                by: HEALTH_ACTOR.to_string(),
                reason: reason.clone(),
            };
            desired
                .overrides
                .routes
                .entry(route.to_string())
                .or_default()
                .rollback = Some(mark.clone());
            desired.unrecorded_rollbacks.insert(route.to_string());
            let version = self.publish(&desired);
            tracing::error!(version, route, reason = %reason, figures = %breach.figures, "route rolled back to legacy");
            self.announce_rollback(
                &desired,
                route,
                breach.reason,
                &reason,
                Some(breach.figures.clone()),
            );
            let after = view_of(&desired, &Target::Route(route)).unwrap_or(before.clone());
            let entry = audit_entry(
                HEALTH_ACTOR,
                &Change::Rollback {
                    route: route.to_string(),
                    reason: reason.clone(),
                },
                Some(before.audited()),
                Some(after.audited()),
                "applied",
                Some(format!("{reason}; figures: {}", breach.figures)),
            );
            (mark, entry)
        };
        let this = self.clone();
        let route = route.to_string();
        // Persisting is retried in the background until it succeeds; the rollback is already
        // in force.
        tokio::spawn(async move { this.record_rollback(&route, &mark, entry).await });
    }

    /// Writes a health rollback to the store, retrying while the store is down. Each try
    /// holds the writer lock and writes only while this rollback is still the route's
    /// state, so an operator's later change is never overwritten.
    async fn record_rollback(&self, route: &str, mark: &RollbackMark, mut entry: AuditEntry) {
        let mut delay = Duration::ZERO;
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
            let _writing = self.writer.lock().await;
            let current = {
                let desired = self.desired();
                let current = desired.overrides.routes.get(route).cloned();
                if !desired.unrecorded_rollbacks.contains(route)
                    || current.as_ref().and_then(|o| o.rollback.as_ref()) != Some(mark)
                {
                    return;
                }
                current.unwrap_or_default()
            };
            let Some(store) = self.current_store() else {
                continue;
            };
            let write = StateWrite::Route {
                name: route.to_string(),
                value: current,
            };
            entry.at = now_rfc3339();
            match store.commit(&write, &entry).await {
                Ok(_) => {
                    let mut desired = self.desired();
                    let still = desired
                        .overrides
                        .routes
                        .get(route)
                        .and_then(|o| o.rollback.as_ref())
                        == Some(mark);
                    if still {
                        desired.unrecorded_rollbacks.remove(route);
                    }
                    tracing::info!(route, "rollback recorded in the state store");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, route, "cannot record the rollback yet; retrying")
                }
            }
        }
    }

    fn announce_rollback(
        &self,
        desired: &Desired,
        route: &str,
        reason: &'static str,
        detail: &str,
        figures: Option<Value>,
    ) {
        self.publisher
            .metrics()
            .rollbacks
            .get_or_create(&RollbackLabels {
                route: Arc::from(route),
                reason,
            })
            .inc();
        let webhooks = desired
            .config
            .routes
            .iter()
            .position(|r| &*r.name == route)
            .and_then(|i| desired.config.policies[i].rollout.as_ref())
            .map(|r| r.webhooks.clone())
            .unwrap_or_default();
        let mut payload = json!({ "event": "rollback", "route": route, "reason": reason, "detail": detail, "figures": figures, "at": now_rfc3339() });
        // A rollback in the middle of a rollout says where the rollout was.
        if let Ok((_, _, walk)) = rollout_parts(desired, route)
            && let Some(record) = desired.overrides.rollouts.get(route)
            && record.phase.is_running()
        {
            payload["step"] = json!(model::shown_step(record));
            payload["steps"] = json!(walk.len());
            payload["weight"] = json!(walk.weight(record.step).percent());
            payload["gates"] = self.board.gates_json(route);
        }
        webhook::announce(&webhooks, "rollback", payload);
    }

    /// Announces the rollout's last transition to the route's webhooks subscribed to it.
    fn announce_rollout(&self, desired: &Desired, route: &str) {
        let Ok((_, spec, walk)) = rollout_parts(desired, route) else {
            return;
        };
        let Some(record) = desired.overrides.rollouts.get(route) else {
            return;
        };
        let Some(last) = record.history.last() else {
            return;
        };
        let event = match last.event.as_str() {
            "start" | "step" => "step",
            "pause" => "paused",
            "promote" if record.phase == rollout::Phase::Promoted => "promoted",
            "promote" => "step",
            "abort" => "aborted",
            _ => return,
        };
        webhook::announce(
            &spec.webhooks,
            event,
            json!({
                "event": event,
                "route": route,
                "state": record.phase.as_str(),
                "step": model::shown_step(record),
                "steps": walk.len(),
                "weight": rollout::shown_weight(&walk, record),
                "by": last.by,
                "reason": record.reason,
                "gates": self.board.gates_json(route),
                "at": last.at,
            }),
        );
    }

    /// Routes with `rollback.min_consistency`, with the sync pairs that serve them.
    pub async fn integrity_limits(&self) -> Vec<(String, f64, Vec<String>)> {
        let desired = self.desired();
        let config = &desired.config;
        config
            .routes
            .iter()
            .zip(&config.policies)
            .filter_map(|(route, policy)| {
                let min = policy.rollback.as_ref()?.min_consistency?;
                let name = route.name.to_string();
                let syncs: Vec<String> = config
                    .sync
                    .iter()
                    .filter(|s| s.routes.contains(&name))
                    .map(|s| s.name.clone())
                    .collect();
                (!syncs.is_empty()).then_some((name, min, syncs))
            })
            .collect()
    }

    /// What the rollout controller needs, for every route with a `rollout:` block.
    pub async fn rollout_subjects(&self) -> Vec<RolloutSubject> {
        let desired = self.desired();
        let config = &desired.config;
        config
            .routes
            .iter()
            .zip(&config.policies)
            .filter_map(|(route, policy)| {
                let spec = policy.rollout.clone()?;
                let walk = Walk::of(&route.name, &route.split, &spec.steps).ok()?;
                let name = route.name.to_string();
                Some(RolloutSubject {
                    record: desired
                        .overrides
                        .rollouts
                        .get(&name)
                        .cloned()
                        .unwrap_or_default(),
                    rolled_back: desired
                        .overrides
                        .routes
                        .get(&name)
                        .and_then(|o| o.rollback.as_ref())
                        .map(|m| m.reason.clone()),
                    syncs: config
                        .sync
                        .iter()
                        .filter(|s| s.routes.contains(&name))
                        .map(|s| s.name.clone())
                        .collect(),
                    rollback: policy.rollback.clone(),
                    route: name,
                    spec,
                    walk,
                })
            })
            .collect()
    }

    /// Saves how long a step has baked (see `StateStore::save_bake`); kept in memory too,
    /// so the admin API shows it.
    pub async fn save_bake(&self, route: &str, revision: u64, baked: Duration) -> bool {
        let Some(store) = self.current_store() else {
            return false;
        };
        match store.save_bake(route, revision, baked).await {
            Ok(true) => {
                if let Some(r) = self.desired().overrides.rollouts.get_mut(route)
                    && r.revision == revision
                {
                    r.baked = baked;
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, route, "cannot save the rollout's bake time");
                false
            }
        }
    }

    /// Takes or renews the rollout lease; `false` when another replica holds it or the
    /// store cannot be reached.
    pub async fn rollout_lease(&self, holder: &str, ttl: Duration) -> bool {
        let Some(store) = self.current_store().filter(|_| self.store_ok()) else {
            return false;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
        store
            .lease(holder, now_ms, ttl)
            .await
            .map_err(|e| tracing::warn!(error = %e, "cannot renew the rollout lease"))
            .unwrap_or(false)
    }

    pub async fn release_rollout_lease(&self, holder: &str) {
        if let Some(store) = self.current_store()
            && let Err(e) = store.release_lease(holder).await
        {
            tracing::warn!(error = %e, "cannot release the rollout lease");
        }
    }

    /// Re-reads every rollout record, with the bake times the previous leader saved (those
    /// do not bump the store's version, so the store sync does not bring them).
    pub async fn refresh_rollouts(&self) {
        let Some(store) = self.current_store() else {
            return;
        };
        let _writing = self.writer.lock().await;
        match store.rollouts().await {
            Ok(records) => self.desired().overrides.rollouts = records,
            Err(e) => tracing::warn!(error = %e, "cannot read the rollout records"),
        }
    }

    /// `GET /v1/rollouts/{route}`: state, step, weight, gates, bake time left, history.
    pub async fn rollout_view(&self, route: &str) -> Result<RolloutView, ControlError> {
        let desired = self.desired();
        let (_, spec, walk) = rollout_parts(&desired, route)?;
        let mut record = desired
            .overrides
            .rollouts
            .get(route)
            .cloned()
            .unwrap_or_default();
        let mark = desired
            .overrides
            .routes
            .get(route)
            .and_then(|o| o.rollback.as_ref());
        (record.phase, record.reason) =
            model::rollout_phase(&record, mark.map(|m| m.reason.as_str()));
        let live = self.board.get(route);
        let baked = live
            .as_ref()
            .filter(|l| l.revision == record.revision)
            .map_or(record.baked, |l| l.baked);
        let running = record.phase == rollout::Phase::Progressing;
        let bake = spec.bake_at(record.step);
        Ok(RolloutView {
            route: route.to_string(),
            kind: if matches!(walk, Walk::BlueGreen) {
                "blue_green"
            } else {
                "weights"
            }
            .to_string(),
            state: record.phase,
            step: model::shown_step(&record),
            steps: (0..walk.len()).map(|i| walk.weight(i).percent()).collect(),
            weight: rollout::shown_weight(&walk, &record),
            bake_s: bake.as_secs_f64(),
            baked_s: baked.as_secs_f64(),
            bake_left_s: if running {
                bake.saturating_sub(baked).as_secs_f64()
            } else {
                0.0
            },
            reason: record.reason.clone(),
            revision: record.revision,
            gates: live.map(|l| l.evaluation.gates).unwrap_or_default(),
            leader: self.board.get(route).is_some_and(|l| l.leader),
            history: model::shown_history(&record),
        })
    }

    /// The live window figures of a route, added to its view (outside the ETag: they
    /// change with every request, the route's settings do not).
    fn with_health(&self, desired: &Desired, mut view: RouteView) -> RouteView {
        let Some(i) = desired
            .config
            .routes
            .iter()
            .position(|r| *r.name == *view.name)
        else {
            return view;
        };
        let window = desired.config.policies[i]
            .rollback
            .as_ref()
            .map_or(Duration::from_secs(10), |r| r.window);
        let health = self
            .publisher
            .health()
            .route(&desired.config.routes[i].name);
        let now = std::time::Instant::now();
        view.health = Some(json!({
            "window_s": window.as_secs(),
            "legacy": health.legacy.figures(now, window).to_json(),
            "target": health.target.figures(now, window).to_json(),
        }));
        view
    }

    /// Plans the change under the state lock: its views before and after, the store write
    /// and the overrides it leads to, or why it is refused (with the view before, if any).
    fn plan_change(
        &self,
        actor: &str,
        change: &Change,
        if_match: Option<&str>,
    ) -> Result<Planned, (Option<Value>, ControlError)> {
        let desired = self.desired();
        let target = Target::of(change);
        let before = view_of(&desired, &target).ok_or_else(|| (None, target.unknown()))?;
        // An invalid change is refused as such whatever its `If-Match` says: preconditions
        // are judged only for a request that would otherwise succeed (RFC 9110 §13.2.1).
        let (write, overrides) = match plan(&desired, change, actor) {
            Ok(ok) => ok,
            Err(e) => return Err((Some(before.audited()), e)),
        };
        let etag = before.etag().to_string();
        if let Some(want) = if_match
            && want.trim() != "*"
            && want.trim() != etag
        {
            return Err((
                Some(before.audited()),
                ControlError::Stale { current: etag },
            ));
        }
        let next = Desired {
            config: desired.config.clone(),
            overrides,
            unrecorded_rollbacks: Default::default(),
        };
        let after = view_of(&next, &target).ok_or_else(|| (None, target.unknown()))?;
        Ok(Planned {
            mark: desired
                .overrides
                .routes
                .get(change.target())
                .and_then(|o| o.rollback.clone()),
            before,
            after,
            write,
            overrides: next.overrides,
        })
    }

    /// Validates, writes store and audit in one transaction, then publishes. The state lock
    /// is held to plan and to publish, never while the store is written.
    pub async fn change(
        &self,
        actor: &str,
        change: Change,
        if_match: Option<&str>,
    ) -> Result<Changed, ControlError> {
        let store = self
            .current_store()
            .filter(|_| self.store_ok())
            .ok_or_else(|| ControlError::StoreUnavailable(super::store::redact(&self.store_url)))?;
        let _writing = self.writer.lock().await;
        let planned = match self.plan_change(actor, &change, if_match) {
            Ok(planned) => planned,
            Err((before, e)) => {
                refuse(&store, actor, &change, before, &e).await;
                return Err(e);
            }
        };
        let entry = audit_entry(
            actor,
            &change,
            Some(planned.before.audited()),
            Some(planned.after.audited()),
            "applied",
            None,
        );
        store
            .commit(&planned.write, &entry)
            .await
            .map_err(|e| match e {
                StoreError::Unavailable { source, .. } if is_unique_violation(&source) => {
                    ControlError::Conflict
                }
                other => {
                    self.store_ok.store(false, Ordering::Relaxed);
                    ControlError::StoreUnavailable(other.to_string())
                }
            })?;
        let mut desired = self.desired();
        adopt_planned(&mut desired, &change, planned);
        let version = self.publish(&desired);
        if let Change::Rollback { route, reason } = &change {
            self.announce_rollback(&desired, route, "manual", reason, None);
        }
        if let Change::Rollout { route, .. } = &change {
            self.announce_rollout(&desired, route);
        }
        tracing::info!(
            version,
            actor,
            action = change.action(),
            name = change.target(),
            "change applied"
        );
        let target = Target::of(&change);
        match view_of(&desired, &target).ok_or_else(|| target.unknown())? {
            Changed::Route(v) => Ok(Changed::Route(Box::new(self.with_health(&desired, *v)))),
            flag => Ok(flag),
        }
    }

    pub async fn routes(&self) -> Vec<RouteView> {
        let desired = self.desired();
        desired
            .config
            .routes
            .iter()
            .filter_map(|r| model::route_view(&desired.config, &desired.overrides, &r.name))
            .map(|v| self.with_health(&desired, v))
            .collect()
    }

    pub async fn route(&self, name: &str) -> Option<RouteView> {
        let desired = self.desired();
        model::route_view(&desired.config, &desired.overrides, name)
            .map(|v| self.with_health(&desired, v))
    }

    pub async fn flags(&self) -> Vec<FlagView> {
        let desired = self.desired();
        desired
            .config
            .flags
            .iter()
            .filter_map(|f| model::flag_view(&desired.config, &desired.overrides, &f.name))
            .collect()
    }

    pub async fn flag(&self, name: &str) -> Option<FlagView> {
        let desired = self.desired();
        model::flag_view(&desired.config, &desired.overrides, name)
    }

    pub async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, ControlError> {
        let store = self
            .current_store()
            .ok_or_else(|| ControlError::StoreUnavailable(super::store::redact(&self.store_url)))?;
        store
            .audit(limit)
            .await
            .map_err(|e| ControlError::StoreUnavailable(e.to_string()))
    }
}

/// What a change names.
enum Target<'a> {
    Route(&'a str),
    Flag(&'a str),
}

impl<'a> Target<'a> {
    fn of(change: &'a Change) -> Target<'a> {
        match change {
            Change::SetFlag { flag, .. } => Target::Flag(flag),
            other => Target::Route(other.target()),
        }
    }

    fn unknown(&self) -> ControlError {
        match self {
            Target::Route(n) => ControlError::UnknownRoute(n.to_string()),
            Target::Flag(n) => ControlError::UnknownFlag(n.to_string()),
        }
    }
}

fn view_of(desired: &Desired, target: &Target) -> Option<Changed> {
    match target {
        Target::Route(n) => model::route_view(&desired.config, &desired.overrides, n)
            .map(|v| Changed::Route(Box::new(v))),
        Target::Flag(n) => {
            model::flag_view(&desired.config, &desired.overrides, n).map(Changed::Flag)
        }
    }
}

/// Lays a committed change over the current state. Only the entries the change wrote are
/// replaced: anything else that moved while the store was written (a health rollback of
/// another route, a saved bake time) stays. A health rollback of this same route that came
/// in meanwhile also stays in force, and stays unrecorded so its writer records it.
fn adopt_planned(desired: &mut Desired, change: &Change, planned: Planned) {
    let name = change.target();
    let mut next = planned.overrides;
    if let Change::SetFlag { .. } = change {
        match next.flags.remove(name) {
            Some(f) => desired.overrides.flags.insert(name.to_string(), f),
            None => desired.overrides.flags.remove(name),
        };
        return;
    }
    let current_mark = desired
        .overrides
        .routes
        .get(name)
        .and_then(|o| o.rollback.clone());
    let mut route = next.routes.remove(name);
    let rolled_back_meanwhile = current_mark.is_some()
        && current_mark != planned.mark
        && desired.unrecorded_rollbacks.contains(name);
    if rolled_back_meanwhile {
        route.get_or_insert_with(RouteOverride::default).rollback = current_mark;
    } else {
        // A rollout transition that keeps the route's rollback mark (recording a health
        // rollback as the rollout's end) leaves the rollback's own audit record to its
        // writer; any other write carries the route's whole state, so a pending health
        // rollback is recorded or superseded by it.
        let keeps_mark = matches!(change, Change::Rollout { .. })
            && current_mark.is_some()
            && route.as_ref().and_then(|o| o.rollback.clone()) == current_mark;
        if !keeps_mark {
            desired.unrecorded_rollbacks.remove(name);
        }
    }
    match route {
        Some(o) if !o.is_empty() => desired.overrides.routes.insert(name.to_string(), o),
        _ => desired.overrides.routes.remove(name),
    };
    if let Change::Rollout { .. } = change {
        match next.rollouts.remove(name) {
            Some(r) => desired.overrides.rollouts.insert(name.to_string(), r),
            None => desired.overrides.rollouts.remove(name),
        };
    }
}

async fn listen(url: &str) -> Option<sqlx::postgres::PgListener> {
    let mut listener = sqlx::postgres::PgListener::connect(url)
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot LISTEN for state changes; polling only"))
        .ok()?;
    listener.listen(super::store::NOTIFY_CHANNEL).await.ok()?;
    Some(listener)
}

/// True when a notification arrived; false when the listener broke. Pends forever without
/// a listener, leaving the poll to wake the loop.
async fn wait_notify(listener: &mut Option<sqlx::postgres::PgListener>) -> bool {
    match listener {
        Some(l) => l.recv().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// A refusal leaves no trace but its audit record.
async fn refuse(
    store: &StateStore,
    actor: &str,
    change: &Change,
    before: Option<Value>,
    error: &ControlError,
) {
    let refusal = audit_entry(
        actor,
        change,
        before,
        None,
        "refused",
        Some(error.to_string()),
    );
    if let Err(e) = store.commit(&StateWrite::Nothing, &refusal).await {
        tracing::warn!(error = %e, "could not record a refused change in the audit log");
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

fn audit_entry(
    actor: &str,
    change: &Change,
    before: Option<Value>,
    after: Option<Value>,
    outcome: &str,
    detail: Option<String>,
) -> AuditEntry {
    AuditEntry {
        id: 0,
        at: now_rfc3339(),
        actor: actor.to_string(),
        action: change.action().to_string(),
        target: change.target().to_string(),
        before,
        after,
        outcome: outcome.to_string(),
        detail,
    }
}

/// The store write and the overrides a change leads to, or why it is refused.
fn plan(
    desired: &Desired,
    change: &Change,
    actor: &str,
) -> Result<(StateWrite, Overrides), ControlError> {
    if let Change::SetWeight { route, .. }
    | Change::Switch { route, .. }
    | Change::Reset { route } = change
    {
        refuse_during_rollout(desired, route)?;
    }
    let mut overrides = desired.overrides.clone();
    let write = match change {
        Change::SetWeight { route, percent } => {
            let r = find_route(desired, route)?;
            if !matches!(r.split, Split::Percentage { .. } | Split::Canary { .. }) {
                return Err(ControlError::Invalid(format!(
                    "route `{route}` has a {} split; a weight applies to percentage and canary splits",
                    r.split.kind()
                )));
            }
            let weight =
                Weight::from_percent(*percent).map_err(|e| ControlError::Invalid(e.to_string()))?;
            let o = overrides.routes.entry(route.clone()).or_default();
            o.weight = Some(weight);
            // Setting a weight is the operator saying how the route should run again.
            o.rollback = None;
            StateWrite::Route {
                name: route.clone(),
                value: o.clone(),
            }
        }
        Change::Switch { route, active } => {
            let r = find_route(desired, route)?;
            if !matches!(r.split, Split::BlueGreen { .. }) {
                return Err(ControlError::Invalid(format!(
                    "route `{route}` has a {} split; only blue_green routes switch",
                    r.split.kind()
                )));
            }
            let active = match active.as_str() {
                "legacy" => Side::Legacy,
                "target" => Side::Target,
                other => {
                    return Err(ControlError::Invalid(format!(
                        "`{other}` is not a side; use `legacy` or `target`"
                    )));
                }
            };
            let o = overrides.routes.entry(route.clone()).or_default();
            o.active = Some(active);
            o.rollback = None;
            StateWrite::Route {
                name: route.clone(),
                value: o.clone(),
            }
        }
        Change::Rollback { route, reason } => {
            find_route(desired, route)?;
            let o = overrides.routes.entry(route.clone()).or_default();
            o.rollback = Some(RollbackMark {
                at: now_rfc3339(),
                by: actor.to_string(),
                reason: reason.clone(),
            });
            StateWrite::Route {
                name: route.clone(),
                value: o.clone(),
            }
        }
        Change::Reset { route } => {
            find_route(desired, route)?;
            overrides.routes.remove(route);
            StateWrite::Route {
                name: route.clone(),
                value: RouteOverride::default(),
            }
        }
        Change::Rollout { route, action } => {
            let (_, _, walk) = rollout_parts(desired, route)?;
            let record = overrides.rollouts.get(route).cloned().unwrap_or_default();
            let transition = match action {
                // Judged on the phase readers see: a rollout whose route was rolled back
                // is rolled back, even before the controller has recorded it.
                RolloutAction::Command(c) => {
                    let mark = overrides
                        .routes
                        .get(route)
                        .and_then(|o| o.rollback.as_ref());
                    let judged = RolloutRecord {
                        phase: model::rollout_phase(&record, mark.map(|m| m.reason.as_str())).0,
                        ..record.clone()
                    };
                    rollout::command(&judged, &walk, *c)?
                }
                RolloutAction::Controller {
                    revision,
                    transition,
                } => {
                    if *revision != record.revision {
                        return Err(ControlError::Conflict);
                    }
                    transition.clone()
                }
            };
            let next = rollout::apply(&record, &walk, &transition, actor, &now_rfc3339());
            let o = overrides.routes.entry(route.clone()).or_default();
            match rollout::routing(&walk, &next) {
                Routing::Weight(w) => {
                    o.weight = Some(w);
                    o.rollback = None;
                }
                Routing::Active(side) => {
                    o.active = Some(side);
                    o.rollback = None;
                }
                Routing::Unchanged => {}
            }
            let value = o.clone();
            overrides.rollouts.insert(route.clone(), next.clone());
            StateWrite::Rollout {
                name: route.clone(),
                value,
                rollout: next,
            }
        }
        Change::SetFlag { flag, percent } => {
            if !desired.config.flags.iter().any(|f| &f.name == flag) {
                return Err(ControlError::UnknownFlag(flag.clone()));
            }
            let weight =
                Weight::from_percent(*percent).map_err(|e| ControlError::Invalid(e.to_string()))?;
            let o = overrides.flags.entry(flag.clone()).or_default();
            o.percentage = Some(weight);
            StateWrite::Flag {
                name: flag.clone(),
                value: FlagOverride {
                    percentage: Some(weight),
                },
            }
        }
    };
    Ok((write, overrides))
}

/// A manual weight, switch or reset would be overwritten at the rollout's next step, so it
/// is refused while the rollout progresses; the error names the way out. A paused rollout
/// leaves routing to operators until it resumes (which re-applies its step's weight).
fn refuse_during_rollout(desired: &Desired, route: &str) -> Result<(), ControlError> {
    let Some(record) = desired.overrides.rollouts.get(route) else {
        return Ok(());
    };
    let mark = desired
        .overrides
        .routes
        .get(route)
        .and_then(|o| o.rollback.as_ref());
    if model::rollout_phase(record, mark.map(|m| m.reason.as_str())).0
        != rollout::Phase::Progressing
    {
        return Ok(());
    }
    let steps = rollout_parts(desired, route).map_or(0, |(_, _, walk)| walk.len());
    Err(ControlError::RolloutInProgress {
        route: route.to_string(),
        step: model::shown_step(record),
        steps,
    })
}

/// A route's rollout spec and walk, or why it has none.
fn rollout_parts<'a>(
    desired: &'a Desired,
    name: &str,
) -> Result<(&'a Route, &'a crate::config::RolloutSpec, Walk), ControlError> {
    let i = desired
        .config
        .routes
        .iter()
        .position(|r| &*r.name == name)
        .ok_or_else(|| ControlError::UnknownRoute(name.to_string()))?;
    let route = &desired.config.routes[i];
    let spec = desired.config.policies[i]
        .rollout
        .as_ref()
        .ok_or_else(|| RolloutError::NoRollout(name.to_string()))?;
    let walk = Walk::of(name, &route.split, &spec.steps)?;
    Ok((route, spec, walk))
}

fn find_route<'a>(desired: &'a Desired, name: &str) -> Result<&'a Route, ControlError> {
    desired
        .config
        .routes
        .iter()
        .find(|r| &*r.name == name)
        .ok_or_else(|| ControlError::UnknownRoute(name.to_string()))
}
