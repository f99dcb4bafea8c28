//! The admin API's state model: the typed views of a route, a flag and a rollout, computed
//! in one place from the one desired state (file config + runtime overrides). The handlers,
//! the audit log, webhooks, `ctl`, the demo and the tests all read these types, so a route
//! cannot say one thing in one place and another elsewhere.
//!
//! Pure: no I/O, no clock. Two rules are fixed here and nowhere else (contract §10):
//! `in_force` is what the data plane applies (0, or `legacy`, while rolled back), and rollout
//! steps are numbered from 1 wherever they are read (0 only for a rollout never started).

use serde::{Deserialize, Serialize};

use super::overrides::{Overrides, RollbackMark};
use super::rollout::{self, HistoryEntry, Phase, RolloutRecord, Walk};
use crate::config::Config;
use crate::dataplane::split::{Side, Split, StickyKey, Weight};

/// A setting as the file has it, as an operator overrode it, and as it is in force. One
/// concrete type per setting (rather than a generic) so the OpenAPI schema says exactly
/// what each field holds, `runtime` being null when the file's value is in use.
macro_rules! layered {
    ($(#[$doc:meta])* $name:ident, $t:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
        pub struct $name {
            /// What the data plane applies now.
            pub in_force: $t,
            pub file: $t,
            /// An operator's override; null when the file's value is in use.
            pub runtime: Option<$t>,
            /// What decides `in_force`: `file`, `runtime`, or `rollback` while the route
            /// is rolled back.
            pub source: String,
        }

        impl $name {
            fn of(file: $t, runtime: Option<$t>, rolled_back: Option<$t>) -> $name {
                let (in_force, source) = match (rolled_back, &runtime) {
                    (Some(v), _) => (v, "rollback"),
                    (None, Some(v)) => (v.clone(), "runtime"),
                    (None, None) => (file.clone(), "file"),
                };
                $name {
                    in_force,
                    file,
                    runtime,
                    source: source.to_string(),
                }
            }
        }
    };
}

layered!(
    /// A route's target share in percent, or a flag's percentage.
    LayeredPercent,
    f64
);
layered!(
    /// A blue-green route's active side: `legacy` or `target`.
    LayeredSide,
    String
);

/// Why and by whom a route was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackView {
    pub at: String,
    pub by: String,
    pub reason: String,
}

impl From<&RollbackMark> for RollbackView {
    fn from(m: &RollbackMark) -> RollbackView {
        RollbackView {
            at: m.at.clone(),
            by: m.by.clone(),
            reason: m.reason.clone(),
        }
    }
}

/// A route's rollout as the route view shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutSummary {
    pub state: Phase,
    /// 1-based; 0 only while idle.
    pub step: usize,
    pub steps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /v1/routes/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteView {
    pub name: String,
    pub legacy: String,
    pub target: String,
    /// `percentage`, `canary`, `blue_green` or `feature_flag`.
    pub split: String,
    /// Target share in percent (percentage and canary splits).
    pub weight: Option<LayeredPercent>,
    /// `legacy` or `target` (blue-green splits).
    pub active: Option<LayeredSide>,
    /// The flag deciding the route (feature-flag splits).
    pub flag: Option<String>,
    /// `active` or `rolled_back`.
    pub state: String,
    pub rollback: Option<RollbackView>,
    pub sticky: Option<String>,
    /// Only on routes that have had a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSummary>,
    /// Live window figures (`window_s`, and `legacy` and `target` figures); outside the ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub health: Option<serde_json::Value>,
    /// A quoted tag over everything above but `health`.
    #[serde(default)]
    pub etag: String,
}

/// `GET /v1/flags/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlagView {
    pub name: String,
    pub percentage: LayeredPercent,
    pub rules: usize,
    pub sticky: Option<String>,
    #[serde(default)]
    pub etag: String,
}

/// `GET /v1/rollouts/{route}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutView {
    pub route: String,
    /// `weights` or `blue_green`.
    pub kind: String,
    pub state: Phase,
    /// 1-based; 0 only while idle.
    pub step: usize,
    /// The target's share at each step, in percent.
    pub steps: Vec<f64>,
    /// The target's share the rollout stands at now.
    pub weight: f64,
    pub bake_s: f64,
    pub baked_s: f64,
    pub bake_left_s: f64,
    /// Why it paused, aborted or rolled back.
    pub reason: Option<String>,
    pub revision: u64,
    pub gates: Vec<rollout::Gate>,
    /// Whether this replica drives the rollout.
    pub leader: bool,
    /// Transitions, oldest first; their `step` numbered from 1 like every step shown (the
    /// store keeps the 0-based index: see `shown_history`).
    pub history: Vec<HistoryEntry>,
}

/// A rollout's phase and reason as a reader must see them (`rolled_back`: the reason of the
/// route's rollback mark, if it has one): a route rolled back while its
/// rollout was moving it (progressing, paused, or promoted) is `rolled_back` with the
/// rollback's reason, even before the controller has recorded it.
pub fn rollout_phase(record: &RolloutRecord, rolled_back: Option<&str>) -> (Phase, Option<String>) {
    match rolled_back {
        Some(reason) if record.phase.is_running() || record.phase == Phase::Promoted => {
            (Phase::RolledBack, Some(reason.to_string()))
        }
        _ => (record.phase, record.reason.clone()),
    }
}

/// A record's history as readers see it: steps numbered from 1.
pub fn shown_history(record: &RolloutRecord) -> Vec<HistoryEntry> {
    record
        .history
        .iter()
        .map(|h| HistoryEntry {
            step: h.step + 1,
            ..h.clone()
        })
        .collect()
}

/// The 1-based step a reader sees: 0 for a rollout never started.
pub fn shown_step(record: &RolloutRecord) -> usize {
    if record.phase == Phase::Idle {
        0
    } else {
        record.step + 1
    }
}

fn sticky_text(key: Option<&StickyKey>) -> Option<String> {
    key.map(|k| match k {
        StickyKey::Cookie(n) => format!("cookie:{n}"),
        StickyKey::Header(n) => format!("header:{n}"),
        StickyKey::ClientIp => "client_ip".to_string(),
        StickyKey::Generated { cookie } => format!("generated ({cookie})"),
    })
}

/// An ETag over a view's serialised content (without `health` and `etag`): it changes
/// exactly when what a client read changes.
fn etag_of<T: Serialize>(view: &T) -> String {
    let mut value = serde_json::to_value(view).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("etag");
        map.remove("health");
    }
    format!(
        "\"{:016x}\"",
        xxhash_rust::xxh3::xxh3_64(value.to_string().as_bytes())
    )
}

/// The view of route `name`, or `None` when the file has no such route.
pub fn route_view(config: &Config, overrides: &Overrides, name: &str) -> Option<RouteView> {
    let route = config.routes.iter().find(|r| &*r.name == name)?;
    let o = overrides.routes.get(name);
    let mark = o.and_then(|o| o.rollback.as_ref());
    let backend =
        |id: crate::dataplane::route::BackendId| config.backends[id.0 as usize].name.clone();
    let (mut weight, mut active, mut flag) = (None, None, None);
    match &route.split {
        Split::Percentage { weight: w } | Split::Canary { weight: w, .. } => {
            weight = Some(LayeredPercent::of(
                w.percent(),
                o.and_then(|o| o.weight).map(Weight::percent),
                mark.map(|_| 0.0),
            ));
        }
        Split::BlueGreen { active: a, .. } => {
            active = Some(LayeredSide::of(
                a.as_str().to_string(),
                o.and_then(|o| o.active).map(|s| s.as_str().to_string()),
                mark.map(|_| Side::Legacy.as_str().to_string()),
            ));
        }
        Split::FeatureFlag { flag: f } => {
            flag = config.flags.get(f.0 as usize).map(|f| f.name.clone());
        }
    }
    let rollout = overrides.rollouts.get(name).map(|record| {
        let (state, reason) = rollout_phase(record, mark.map(|m| m.reason.as_str()));
        let steps = config
            .routes
            .iter()
            .position(|r| &*r.name == name)
            .and_then(|i| config.policies[i].rollout.as_ref())
            .and_then(|spec| Walk::of(name, &route.split, &spec.steps).ok())
            .map_or(0, |w| w.len());
        RolloutSummary {
            state,
            step: shown_step(record),
            steps,
            reason,
        }
    });
    let mut view = RouteView {
        name: name.to_string(),
        legacy: backend(route.legacy),
        target: backend(route.target),
        split: route.split.kind().to_string(),
        weight,
        active,
        flag,
        state: if mark.is_some() {
            "rolled_back"
        } else {
            "active"
        }
        .to_string(),
        rollback: mark.map(RollbackView::from),
        sticky: sticky_text(route.sticky.as_ref()),
        rollout,
        health: None,
        etag: String::new(),
    };
    view.etag = etag_of(&view);
    Some(view)
}

/// The view of flag `name`, or `None` when the file has no such flag.
pub fn flag_view(config: &Config, overrides: &Overrides, name: &str) -> Option<FlagView> {
    let flag = config.flags.iter().find(|f| f.name == name)?;
    let runtime = overrides.flags.get(name).and_then(|o| o.percentage);
    let mut view = FlagView {
        name: name.to_string(),
        percentage: LayeredPercent::of(flag.weight.percent(), runtime.map(Weight::percent), None),
        rules: flag.rules.len(),
        sticky: sticky_text(flag.sticky.as_ref()),
        etag: String::new(),
    };
    view.etag = etag_of(&view);
    Some(view)
}

// ---- request and envelope types of the `/v1` API, shared by the server, `ctl` and tests ----

/// `PUT /v1/routes/{name}/weight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightBody {
    /// The target's share in percent, 0..100 with at most two decimals.
    #[schema(minimum = 0, maximum = 100)]
    pub weight: f64,
}

/// `POST /v1/routes/{name}/switch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    /// `legacy` or `target`; anything else is refused (422) and audited.
    #[schema(pattern = "^(legacy|target)$")]
    pub active: String,
}

/// `POST /v1/routes/{name}/rollback`; the body is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// Recorded with the rollback; `manual` when absent.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `PUT /v1/flags/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlagBody {
    /// Percent of the flag's population, 0..100 with at most two decimals.
    #[schema(minimum = 0, maximum = 100)]
    pub percentage: f64,
}

/// `POST /v1/rollouts/{route}/promote`; the body is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteBody {
    /// Straight to promoted (weight 100) rather than the next step.
    #[serde(default)]
    pub full: bool,
}

/// The body of the other rollout commands: optional, and empty when given.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// `GET /v1/routes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteList {
    pub routes: Vec<RouteView>,
}

/// `GET /v1/flags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlagList {
    pub flags: Vec<FlagView>,
}

/// `GET /v1/audit`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditList {
    pub entries: Vec<super::store::AuditEntry>,
}

/// `GET /v1/sync`: every sync pair's latest report (lag, throughput, phase), `stale` when
/// its worker stopped reporting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SyncList {
    #[schema(value_type = Vec<Object>)]
    pub sync: Vec<serde_json::Value>,
}

/// `GET /v1/consistency`: every sampled pair's latest report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsistencyList {
    #[schema(value_type = Vec<Object>)]
    pub consistency: Vec<serde_json::Value>,
}

/// Every error (contract §6): `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, for scripts: `bad_request`, `unauthorized`, `not_found`, `invalid`,
    /// `precondition_failed`, `conflict`, `invalid_transition`, `rollout_in_progress`,
    /// `no_rollout`, `state_store_unavailable`, `internal`.
    pub code: String,
    /// For people.
    pub message: String,
}
