//! `ControlPlane`: the one path by which routing changes. The file's config and the runtime
//! overrides together are the desired state; every change (admin API, config reload, another
//! replica's write) goes validate → write the store → publish the snapshot, in that order, and
//! a change the store did not take is not published.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::overrides::{self, FlagOverride, Overrides, RollbackMark, RouteOverride};
use super::rollout::{self, RolloutError, RolloutRecord, Routing, Transition, Walk};
use super::store::{AuditEntry, Engine, StateStore, StateWrite, StoreError, now_rfc3339};
use super::webhook;
use crate::config::Config;
use crate::dataplane::route::Route;
use crate::dataplane::split::{Flag, Side, Split, StickyKey, Weight};
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

pub struct ControlPlane {
    publisher: Arc<Publisher>,
    desired: Mutex<Desired>,
    /// `None` until the store has been reached once.
    store: Mutex<Option<StateStore>>,
    store_url: String,
    store_ok: AtomicBool,
    feeds: crate::telemetry::Feeds,
    board: rollout::controller::Board,
}

impl ControlPlane {
    pub fn new(publisher: Arc<Publisher>, config: Config) -> ControlPlane {
        ControlPlane {
            publisher,
            store_url: config.state_url.clone(),
            desired: Mutex::new(Desired {
                config,
                overrides: Overrides::default(),
                unrecorded_rollbacks: Default::default(),
            }),
            store: Mutex::new(None),
            store_ok: AtomicBool::new(false),
            feeds: crate::telemetry::Feeds::default(),
            board: Default::default(),
        }
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
        *self.store.lock().await = Some(store);
        self.store_ok.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// A new file config (reload): published with the overrides still on top.
    pub async fn set_config(&self, config: Config) -> u64 {
        let mut desired = self.desired.lock().await;
        desired.config = config;
        self.publish(&desired)
    }

    fn publish(&self, desired: &Desired) -> u64 {
        let effective = overrides::apply(&desired.config, &desired.overrides);
        self.publisher.publish(&effective)
    }

    /// Overrides read from the store (at start, or another replica's change).
    /// Reads the store's overrides and applies them. The read happens under the state lock:
    /// a change of this process commits under the same lock, so a read can never return a
    /// state older than one this process already published.
    async fn adopt_from(&self, store: &StateStore) -> Result<(), StoreError> {
        let mut desired = self.desired.lock().await;
        let mut overrides = store.load().await?;
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

    async fn current_store(&self) -> Option<StateStore> {
        self.store.lock().await.clone()
    }

    /// Keeps this replica in step with the store: reconnects with backoff while it is down,
    /// then follows changes (Postgres NOTIFY, and a 1 s poll of the version row, which also
    /// serves SQLite and covers a lost notification).
    pub async fn run_store_sync(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(250);
        let mut last_version = None;
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        loop {
            if self.current_store().await.is_none() {
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
            let Some(store) = self.current_store().await else {
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
    pub async fn auto_rollback(self: &Arc<Self>, route: &str, breach: Breach) {
        let mut desired = self.desired.lock().await;
        if desired
            .overrides
            .routes
            .get(route)
            .is_some_and(|o| o.rollback.is_some())
        {
            return;
        }
        let Some(before) = route_view(&desired, route) else {
            return;
        };
        let reason = format!("{}: {}", breach.reason, breach.detail);
        let o = desired
            .overrides
            .routes
            .entry(route.to_string())
            .or_default();
        o.rollback = Some(RollbackMark {
            at: now_rfc3339(),
            by: HEALTH_ACTOR.to_string(),
            reason: reason.clone(),
        });
        let value = o.clone();
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
        let after = route_view(&desired, route).unwrap_or_default();
        drop(desired);

        let mut entry = audit_entry(
            HEALTH_ACTOR,
            &Change::Rollback {
                route: route.to_string(),
                reason: reason.clone(),
            },
            Some(strip_etag(&before)),
            Some(strip_etag(&after)),
            "applied",
            Some(format!("{reason}; figures: {}", breach.figures)),
        );
        let mark = value.rollback;
        let this = self.clone();
        let route_name = route.to_string();
        // Persisting is retried in the background until it succeeds; the rollback is already
        // in force. Each try commits under the state lock and only while this rollback is
        // still the route's state, so an operator's later change is never overwritten.
        tokio::spawn(async move {
            let mut delay = Duration::ZERO;
            loop {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
                let mut desired = this.desired.lock().await;
                let current = desired.overrides.routes.get(&route_name).cloned();
                if !desired.unrecorded_rollbacks.contains(&route_name)
                    || current.as_ref().and_then(|o| o.rollback.as_ref()) != mark.as_ref()
                {
                    return;
                }
                let Some(store) = this.current_store().await else {
                    continue;
                };
                let write = StateWrite::Route {
                    name: route_name.clone(),
                    value: current.unwrap_or_default(),
                };
                entry.at = now_rfc3339();
                match store.commit(&write, &entry).await {
                    Ok(_) => {
                        desired.unrecorded_rollbacks.remove(&route_name);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, route = %route_name, "cannot record the rollback yet; retrying")
                    }
                }
            }
        });
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
            payload["step"] = json!(record.step);
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
                "step": record.step,
                "steps": walk.len(),
                "weight": rollout::shown_weight(&walk, record),
                "by": last.by,
                "reason": record.reason,
                "gates": self.board.gates_json(route),
                "at": last.at,
            }),
        );
    }

    /// What the rollout controller needs, for every route with a `rollout:` block.
    /// Routes with `rollback.min_consistency`, with the sync pairs that serve them.
    pub async fn integrity_limits(&self) -> Vec<(String, f64, Vec<String>)> {
        let desired = self.desired.lock().await;
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

    pub async fn rollout_subjects(&self) -> Vec<RolloutSubject> {
        let desired = self.desired.lock().await;
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
        let Some(store) = self.current_store().await else {
            return false;
        };
        let mut desired = self.desired.lock().await;
        match store.save_bake(route, revision, baked).await {
            Ok(true) => {
                if let Some(r) = desired.overrides.rollouts.get_mut(route)
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
        let Some(store) = self.current_store().await.filter(|_| self.store_ok()) else {
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
        if let Some(store) = self.current_store().await
            && let Err(e) = store.release_lease(holder).await
        {
            tracing::warn!(error = %e, "cannot release the rollout lease");
        }
    }

    /// Re-reads every rollout record, with the bake times the previous leader saved (those
    /// do not bump the store's version, so the store sync does not bring them).
    pub async fn refresh_rollouts(&self) {
        let Some(store) = self.current_store().await else {
            return;
        };
        let mut desired = self.desired.lock().await;
        match store.rollouts().await {
            Ok(records) => desired.overrides.rollouts = records,
            Err(e) => tracing::warn!(error = %e, "cannot read the rollout records"),
        }
    }

    /// `GET /v1/rollouts/{route}`: state, step, weight, gates, bake time left, history.
    pub async fn rollout_view(&self, route: &str) -> Result<Value, ControlError> {
        let desired = self.desired.lock().await;
        let (_, spec, walk) = rollout_parts(&desired, route)?;
        let record = desired
            .overrides
            .rollouts
            .get(route)
            .cloned()
            .unwrap_or_default();
        let live = self.board.get(route);
        let baked = live
            .as_ref()
            .filter(|l| l.revision == record.revision)
            .map_or(record.baked, |l| l.baked);
        let running = record.phase == rollout::Phase::Progressing;
        let steps: Vec<f64> = (0..walk.len()).map(|i| walk.weight(i).percent()).collect();
        Ok(json!({
            "route": route,
            "kind": if matches!(walk, Walk::BlueGreen) { "blue_green" } else { "weights" },
            "state": record.phase.as_str(),
            "step": record.step,
            "steps": steps,
            "weight": rollout::shown_weight(&walk, &record),
            "bake_s": spec.bake_at(record.step).as_secs_f64(),
            "baked_s": baked.as_secs_f64(),
            "bake_left_s": if running { spec.bake_at(record.step).saturating_sub(baked).as_secs_f64() } else { 0.0 },
            "reason": record.reason,
            "revision": record.revision,
            "gates": live.as_ref().map_or(json!([]), |l| json!(l.evaluation.gates)),
            "leader": live.as_ref().is_some_and(|l| l.leader),
            "history": record.history,
        }))
    }

    /// The live window figures of a route, added to its view (outside the ETag: they
    /// change with every request, the route's settings do not).
    fn with_health(&self, desired: &Desired, mut view: Value) -> Value {
        let Some(name) = view["name"].as_str().map(str::to_string) else {
            return view;
        };
        let Some(i) = desired.config.routes.iter().position(|r| *r.name == *name) else {
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
        view["health"] = json!({
            "window_s": window.as_secs(),
            "legacy": health.legacy.figures(now, window).to_json(),
            "target": health.target.figures(now, window).to_json(),
        });
        view
    }

    /// Validates, writes store and audit in one transaction, then publishes.
    pub async fn change(
        &self,
        actor: &str,
        change: Change,
        if_match: Option<&str>,
    ) -> Result<Value, ControlError> {
        let store = self
            .current_store()
            .await
            .filter(|_| self.store_ok())
            .ok_or_else(|| ControlError::StoreUnavailable(super::store::redact(&self.store_url)))?;
        let mut desired = self.desired.lock().await;
        let before = match self.view_of(&desired, &change) {
            Ok(view) => view,
            Err(e) => {
                refuse(&store, actor, &change, None, &e).await;
                return Err(e);
            }
        };
        let etag = before["etag"].as_str().unwrap_or_default().to_string();
        if let Some(want) = if_match
            && want.trim() != "*"
            && want.trim() != etag
        {
            let e = ControlError::Stale { current: etag };
            refuse(&store, actor, &change, Some(strip_etag(&before)), &e).await;
            return Err(e);
        }
        let planned = plan(&desired, &change, actor);
        let (write, overrides) = match planned {
            Ok(ok) => ok,
            Err(e) => {
                refuse(&store, actor, &change, Some(strip_etag(&before)), &e).await;
                return Err(e);
            }
        };
        let mut next = Desired {
            config: desired.config.clone(),
            overrides,
            unrecorded_rollbacks: desired.unrecorded_rollbacks.clone(),
        };
        // This write carries the route's whole state, so a pending health rollback is
        // either recorded by it or superseded by it.
        // A rollout transition that keeps the route's rollback mark (recording a health
        // rollback as the rollout's end) leaves the rollback's own audit record to its writer.
        let keeps_mark = matches!(change, Change::Rollout { .. })
            && desired
                .overrides
                .routes
                .get(change.target())
                .and_then(|o| o.rollback.as_ref())
                .is_some_and(|m| {
                    next.overrides
                        .routes
                        .get(change.target())
                        .and_then(|o| o.rollback.as_ref())
                        == Some(m)
                });
        if !matches!(change, Change::SetFlag { .. }) && !keeps_mark {
            next.unrecorded_rollbacks.remove(change.target());
        }
        let after = self.view_of(&next, &change)?;
        let entry = audit_entry(
            actor,
            &change,
            Some(strip_etag(&before)),
            Some(strip_etag(&after)),
            "applied",
            None,
        );
        store.commit(&write, &entry).await.map_err(|e| match e {
            StoreError::Unavailable { source, .. } if is_unique_violation(&source) => {
                ControlError::Conflict
            }
            other => {
                self.store_ok.store(false, Ordering::Relaxed);
                ControlError::StoreUnavailable(other.to_string())
            }
        })?;
        *desired = next;
        let version = self.publish(&desired);
        if let Change::Rollback { route, reason } = &change {
            self.announce_rollback(&desired, route, "manual", reason, None);
        }
        if let Change::Rollout { route, .. } = &change {
            self.announce_rollout(&desired, route);
        }
        let after = self.with_health(&desired, after);
        tracing::info!(
            version,
            actor,
            action = change.action(),
            name = change.target(),
            "change applied"
        );
        Ok(after)
    }

    fn view_of(&self, desired: &Desired, change: &Change) -> Result<Value, ControlError> {
        match change {
            Change::SetFlag { flag, .. } => {
                flag_view(desired, flag).ok_or_else(|| ControlError::UnknownFlag(flag.clone()))
            }
            _ => {
                let name = change.target();
                route_view(desired, name)
                    .ok_or_else(|| ControlError::UnknownRoute(name.to_string()))
            }
        }
    }

    pub async fn routes(&self) -> Vec<Value> {
        let desired = self.desired.lock().await;
        desired
            .config
            .routes
            .iter()
            .filter_map(|r| route_view(&desired, &r.name))
            .map(|v| self.with_health(&desired, v))
            .collect()
    }

    pub async fn route(&self, name: &str) -> Option<Value> {
        let desired = self.desired.lock().await;
        route_view(&desired, name).map(|v| self.with_health(&desired, v))
    }

    pub async fn flags(&self) -> Vec<Value> {
        let desired = self.desired.lock().await;
        desired
            .config
            .flags
            .iter()
            .filter_map(|f| flag_view(&desired, &f.name))
            .collect()
    }

    pub async fn flag(&self, name: &str) -> Option<Value> {
        flag_view(&*self.desired.lock().await, name)
    }

    pub async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, ControlError> {
        let store = self
            .current_store()
            .await
            .ok_or_else(|| ControlError::StoreUnavailable(super::store::redact(&self.store_url)))?;
        store
            .audit(limit)
            .await
            .map_err(|e| ControlError::StoreUnavailable(e.to_string()))
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

fn strip_etag(view: &Value) -> Value {
    let mut v = view.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("etag");
    }
    v
}

/// The store write and the overrides a change leads to, or why it is refused.
fn plan(
    desired: &Desired,
    change: &Change,
    actor: &str,
) -> Result<(StateWrite, Overrides), ControlError> {
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
                RolloutAction::Command(c) => rollout::command(&record, &walk, *c)?,
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

fn sticky_text(key: Option<&StickyKey>) -> Value {
    match key {
        None => Value::Null,
        Some(StickyKey::Cookie(n)) => json!(format!("cookie:{n}")),
        Some(StickyKey::Header(n)) => json!(format!("header:{n}")),
        Some(StickyKey::ClientIp) => json!("client_ip"),
        Some(StickyKey::Generated { cookie }) => json!(format!("generated ({cookie})")),
    }
}

fn layered<T: serde::Serialize + Clone>(file: T, runtime: Option<T>) -> Value {
    let source = if runtime.is_some() { "runtime" } else { "file" };
    let in_force = runtime.clone().unwrap_or_else(|| file.clone());
    json!({ "in_force": in_force, "file": file, "runtime": runtime, "source": source })
}

/// An ETag over the view's content: it changes exactly when what a client read changes.
fn with_etag(mut view: Value) -> Value {
    let tag = format!(
        "\"{:016x}\"",
        xxhash_rust::xxh3::xxh3_64(view.to_string().as_bytes())
    );
    view["etag"] = json!(tag);
    view
}

fn route_view(desired: &Desired, name: &str) -> Option<Value> {
    let route = desired.config.routes.iter().find(|r| &*r.name == name)?;
    let o = desired.overrides.routes.get(name);
    let backend = |id: crate::dataplane::route::BackendId| {
        desired.config.backends[id.0 as usize].name.clone()
    };
    let (weight, active, flag) = match &route.split {
        Split::Percentage { weight } | Split::Canary { weight, .. } => (
            layered(
                weight.percent(),
                o.and_then(|o| o.weight).map(Weight::percent),
            ),
            Value::Null,
            Value::Null,
        ),
        Split::BlueGreen { active, .. } => (
            Value::Null,
            layered(active.as_str(), o.and_then(|o| o.active).map(Side::as_str)),
            Value::Null,
        ),
        Split::FeatureFlag { flag } => (
            Value::Null,
            Value::Null,
            json!(
                desired
                    .config
                    .flags
                    .get(flag.0 as usize)
                    .map(|f: &Flag| f.name.clone())
            ),
        ),
    };
    let rollback = o.and_then(|o| o.rollback.as_ref());
    let mut view = json!({
        "name": name,
        "legacy": backend(route.legacy),
        "target": backend(route.target),
        "split": route.split.kind(),
        "weight": weight,
        "active": active,
        "flag": flag,
        "state": if rollback.is_some() { "rolled_back" } else { "active" },
        "rollback": rollback,
        "sticky": sticky_text(route.sticky.as_ref()),
    });
    // Only routes that have had a rollout show one, so other routes read (and tag) as before.
    if let Some(r) = desired.overrides.rollouts.get(name) {
        view["rollout"] = json!({ "state": r.phase.as_str(), "step": r.step });
    }
    Some(with_etag(view))
}

fn flag_view(desired: &Desired, name: &str) -> Option<Value> {
    let flag = desired.config.flags.iter().find(|f| f.name == name)?;
    let runtime = desired.overrides.flags.get(name).and_then(|o| o.percentage);
    Some(with_etag(json!({
        "name": name,
        "percentage": layered(flag.weight.percent(), runtime.map(Weight::percent)),
        "rules": flag.rules.len(),
        "sticky": sticky_text(flag.sticky.as_ref()),
    })))
}
