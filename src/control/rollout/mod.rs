//! Rollouts, the pure core: given a route's rollout record, its walk, the gate figures and
//! the time that passed, decide whether to bake on, hold, advance, promote or roll back; and
//! which transitions an operator's command may make. No I/O, no clock: the controller
//! (`controller.rs`) gathers the figures and changes routing only through the `ControlPlane`.
//! The states and transitions are written down in `LIFECYCLE.md` beside this file.

pub mod controller;

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{Gates, RollbackSpec};
use crate::dataplane::split::{Side, Split, Weight};
use crate::health::WindowFigures;
use crate::telemetry::feeds::Reading;

/// Transitions kept per route; older ones are in the audit log.
const HISTORY_LIMIT: usize = 50;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RolloutError {
    #[error("route `{0}` has no `rollout:` block in the config")]
    NoRollout(String),
    #[error(
        "route `{route}` has a {kind} split; rollouts walk percentage, canary and blue_green routes"
    )]
    UnsupportedSplit { route: String, kind: &'static str },
    #[error("cannot {action} a rollout that is {state}")]
    NotAllowed { action: &'static str, state: Phase },
    #[error("the rollout store holds an unknown state `{0}`")]
    UnknownPhase(String),
}

/// The states of contract §5.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Idle,
    Progressing,
    Paused,
    Promoted,
    RolledBack,
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }

    pub fn parse(text: &str) -> Result<Phase, RolloutError> {
        Ok(match text {
            "idle" => Phase::Idle,
            "progressing" => Phase::Progressing,
            "paused" => Phase::Paused,
            "promoted" => Phase::Promoted,
            "rolled_back" => Phase::RolledBack,
            "aborted" => Phase::Aborted,
            other => return Err(RolloutError::UnknownPhase(other.to_string())),
        })
    }

    /// A rollout in these states moves routing; the others leave it to operators.
    pub fn is_running(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub at: String,
    /// `start`, `pause`, `resume`, `step`, `promote`, `abort` or `rolled_back`.
    pub event: String,
    pub state: String,
    pub step: usize,
    pub weight: f64,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What the state store keeps of a route's rollout.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RolloutRecord {
    pub phase: Phase,
    pub step: usize,
    /// How long every gate has held in this step. Saved about once a second, so a restart
    /// resumes with the bake time that was left (at most a second more to bake).
    pub baked: Duration,
    /// Bumped by every transition.
    pub revision: u64,
    pub reason: Option<String>,
    pub history: Vec<HistoryEntry>,
}

/// The steps a route walks. Percentage and canary routes walk their `rollout.steps`;
/// blue-green routes walk two: preview (legacy active, target reached by the preview rule)
/// and switched (target active).
#[derive(Debug, Clone, PartialEq)]
pub enum Walk {
    Weights(Vec<Weight>),
    BlueGreen,
}

impl Walk {
    pub fn of(route: &str, split: &Split, steps: &[Weight]) -> Result<Walk, RolloutError> {
        match split {
            Split::Percentage { .. } | Split::Canary { .. } => Ok(Walk::Weights(steps.to_vec())),
            Split::BlueGreen { .. } => Ok(Walk::BlueGreen),
            Split::FeatureFlag { .. } => Err(RolloutError::UnsupportedSplit {
                route: route.to_string(),
                kind: split.kind(),
            }),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Walk::Weights(steps) => steps.len(),
            Walk::BlueGreen => 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The target's share at a step; for blue-green, 0 while previewing and 100 switched.
    pub fn weight(&self, step: usize) -> Weight {
        match self {
            Walk::Weights(steps) => steps
                .get(step)
                .or(steps.last())
                .copied()
                .unwrap_or(Weight::ZERO),
            Walk::BlueGreen if step == 0 => Weight::ZERO,
            Walk::BlueGreen => Weight::FULL,
        }
    }
}

/// What routing a record asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    Weight(Weight),
    Active(Side),
    /// Idle and rolled back rollouts leave the route as operators (or the rollback) left it.
    Unchanged,
}

pub fn routing(walk: &Walk, record: &RolloutRecord) -> Routing {
    let weight = match record.phase {
        Phase::Progressing | Phase::Paused => walk.weight(record.step),
        Phase::Promoted => Weight::FULL,
        Phase::Aborted => Weight::ZERO,
        Phase::Idle | Phase::RolledBack => return Routing::Unchanged,
    };
    match walk {
        Walk::Weights(_) => Routing::Weight(weight),
        Walk::BlueGreen if weight == Weight::FULL => Routing::Active(Side::Target),
        Walk::BlueGreen => Routing::Active(Side::Legacy),
    }
}

/// The weight a record shows: what it routes, or for idle and rolled back rollouts the
/// step's weight it stopped at.
pub fn shown_weight(walk: &Walk, record: &RolloutRecord) -> f64 {
    match record.phase {
        Phase::Promoted => 100.0,
        Phase::Aborted | Phase::RolledBack | Phase::Idle => 0.0,
        _ => walk.weight(record.step).percent(),
    }
}

/// An operator's command (admin API, `switchyard ctl rollout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Start,
    Pause,
    Resume,
    /// The next step now; `full`: straight to promoted.
    Promote {
        full: bool,
    },
    Abort,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Start => "start",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Promote { .. } => "promote",
            Command::Abort => "abort",
        }
    }
}

/// A change of a rollout's state.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Start,
    Pause,
    Resume,
    Advance {
        step: usize,
    },
    Promote,
    Abort,
    /// The route was rolled back (health, data integrity or an operator).
    RolledBack {
        reason: String,
    },
}

impl Transition {
    pub fn event(&self) -> &'static str {
        match self {
            Transition::Start => "start",
            Transition::Pause => "pause",
            Transition::Resume => "resume",
            Transition::Advance { .. } => "step",
            Transition::Promote => "promote",
            Transition::Abort => "abort",
            Transition::RolledBack { .. } => "rolled_back",
        }
    }

    /// The webhook event it is announced as (`on:` in the config). A rollback is announced
    /// by the rollback path itself, so it is not announced twice.
    pub fn webhook_event(&self) -> Option<&'static str> {
        match self {
            Transition::Start | Transition::Advance { .. } => Some("step"),
            Transition::Pause => Some("paused"),
            Transition::Promote => Some("promoted"),
            Transition::Abort => Some("aborted"),
            Transition::Resume | Transition::RolledBack { .. } => None,
        }
    }
}

/// Which transition an operator's command makes, or why it may not.
pub fn command(
    record: &RolloutRecord,
    walk: &Walk,
    cmd: Command,
) -> Result<Transition, RolloutError> {
    let not_allowed = || RolloutError::NotAllowed {
        action: cmd.name(),
        state: record.phase,
    };
    match (cmd, record.phase) {
        (Command::Start, p) if !p.is_running() => Ok(Transition::Start),
        (Command::Pause, Phase::Progressing) => Ok(Transition::Pause),
        (Command::Resume, Phase::Paused) => Ok(Transition::Resume),
        (Command::Promote { full }, p) if p.is_running() => {
            if full || record.step + 1 >= walk.len() {
                Ok(Transition::Promote)
            } else {
                Ok(Transition::Advance {
                    step: record.step + 1,
                })
            }
        }
        (Command::Abort, p) if p.is_running() => Ok(Transition::Abort),
        _ => Err(not_allowed()),
    }
}

/// The record after a transition. `at` is the wall-clock time for the history.
pub fn apply(
    record: &RolloutRecord,
    walk: &Walk,
    transition: &Transition,
    by: &str,
    at: &str,
) -> RolloutRecord {
    let mut next = record.clone();
    next.revision += 1;
    match transition {
        Transition::Start => {
            next.phase = Phase::Progressing;
            next.step = 0;
            next.baked = Duration::ZERO;
            next.reason = None;
        }
        Transition::Pause => {
            // The bake so far is kept: resuming continues it.
            next.phase = Phase::Paused;
            next.reason = Some(format!("paused by {by}"));
        }
        Transition::Resume => {
            next.phase = Phase::Progressing;
            next.reason = None;
        }
        Transition::Advance { step } => {
            next.step = *step;
            next.baked = Duration::ZERO;
        }
        Transition::Promote => {
            next.phase = Phase::Promoted;
            next.step = walk.len().saturating_sub(1);
            next.baked = Duration::ZERO;
            next.reason = None;
        }
        Transition::Abort => {
            next.phase = Phase::Aborted;
            next.baked = Duration::ZERO;
            next.reason = Some(format!("aborted by {by}"));
        }
        Transition::RolledBack { reason } => {
            next.phase = Phase::RolledBack;
            next.baked = Duration::ZERO;
            next.reason = Some(reason.clone());
        }
    }
    let detail = match transition {
        Transition::RolledBack { reason } => Some(reason.clone()),
        _ => None,
    };
    next.history.push(HistoryEntry {
        at: at.to_string(),
        event: transition.event().to_string(),
        state: next.phase.as_str().to_string(),
        step: next.step,
        weight: shown_weight(walk, &next),
        by: by.to_string(),
        detail,
    });
    if next.history.len() > HISTORY_LIMIT {
        let extra = next.history.len() - HISTORY_LIMIT;
        next.history.drain(..extra);
    }
    next
}

/// One gate as evaluated: its figure, its limit, whether it passes and why.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Gate {
    /// `max_error_rate`, `max_latency_ratio`, `max_sync_lag:PAIR`, `min_consistency:PAIR`,
    /// `webhook:URL`.
    pub name: String,
    /// A number, or text such as `2xx`.
    #[schema(value_type = Object)]
    pub limit: Value,
    pub figure: Option<f64>,
    pub pass: bool,
    pub reason: String,
}

/// What a webhook gate last answered.
#[derive(Debug, Clone, PartialEq)]
pub enum HookAnswer {
    /// No answer for this step yet.
    Pending,
    Status(u16),
    /// Refused connection, timeout, bad URL.
    Failed(String),
}

/// The figures gates are judged on, gathered by the controller.
#[derive(Debug, Clone, Default)]
pub struct GateFigures {
    pub window: Duration,
    pub legacy: WindowFigures,
    pub target: WindowFigures,
    /// Every sync pair whose `routes` name the route: its lag and consistency readings.
    pub syncs: Vec<SyncFigures>,
    pub hooks: Vec<(String, HookAnswer)>,
}

#[derive(Debug, Clone)]
pub struct SyncFigures {
    pub name: String,
    pub lag: Reading<Duration>,
    pub consistency: Reading<f64>,
    /// Samples behind `consistency`: a lower bound from few samples holds a gate but
    /// cannot prove the data wrong.
    pub samples: u64,
}

/// The gates of one evaluation, and a data-integrity breach if there is one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    pub gates: Vec<Gate>,
    /// Consistency of a pair below `rollback.min_consistency`: roll back (`data_integrity`).
    pub integrity: Option<String>,
}

impl Evaluation {
    pub fn failing(&self) -> Vec<&Gate> {
        self.gates.iter().filter(|g| !g.pass).collect()
    }

    pub fn figures_json(&self) -> Value {
        json!(self.gates)
    }
}

fn reading_text<T>(reading: &Reading<T>, pair: &str, what: &str) -> Option<String> {
    match reading {
        Reading::Fresh(_) => None,
        Reading::Stale { age, .. } => Some(format!(
            "sync pair `{pair}` has not reported its {what} for {:.1}s (stale); the gate holds until it does",
            age.as_secs_f64()
        )),
        Reading::Unknown => Some(format!(
            "no figure for sync pair `{pair}` ({what}): its worker is not running; the gate holds"
        )),
    }
}

/// Judges every configured gate. Pure: the figures come in, nothing is read.
pub fn evaluate(gates: &Gates, rollback: Option<&RollbackSpec>, f: &GateFigures) -> Evaluation {
    let mut out = Evaluation::default();
    let window = f.window.as_secs();
    if let Some(max) = gates.max_error_rate {
        let rate = f.target.error_rate();
        let (pass, reason) = if f.target.requests == 0 {
            (
                true,
                format!("no target requests in the last {window}s; nothing failed"),
            )
        } else if rate <= max {
            (
                true,
                format!(
                    "target error rate {rate:.4} ≤ {max} ({} of {} in {window}s)",
                    f.target.errors(),
                    f.target.requests
                ),
            )
        } else {
            (
                false,
                format!(
                    "target error rate {rate:.4} > {max} ({} of {} in {window}s)",
                    f.target.errors(),
                    f.target.requests
                ),
            )
        };
        out.gates.push(Gate {
            name: "max_error_rate".into(),
            limit: json!(max),
            figure: Some(rate),
            pass,
            reason,
        });
    }
    if let Some(max) = gates.max_latency_ratio {
        let gate = match (f.target.p99, f.legacy.p99) {
            (Some(t), Some(l)) if !l.is_zero() => {
                let ratio = t.as_secs_f64() / l.as_secs_f64();
                let pass = ratio <= max;
                Gate {
                    name: "max_latency_ratio".into(),
                    limit: json!(max),
                    figure: Some(ratio),
                    pass,
                    reason: format!(
                        "target p99 {:.1} ms is {ratio:.2}× legacy p99 {:.1} ms ({} {max})",
                        t.as_secs_f64() * 1000.0,
                        l.as_secs_f64() * 1000.0,
                        if pass { "≤" } else { ">" }
                    ),
                }
            }
            _ => Gate {
                name: "max_latency_ratio".into(),
                limit: json!(max),
                figure: None,
                pass: true,
                reason: format!(
                    "not enough traffic on both sides in the last {window}s to compare p99s"
                ),
            },
        };
        out.gates.push(gate);
    }
    let needs_sync = gates.max_sync_lag.is_some() || gates.min_consistency.is_some();
    if needs_sync && f.syncs.is_empty() {
        out.gates.push(Gate {
            name: "sync".into(),
            limit: Value::Null,
            figure: None,
            pass: false,
            reason: "the rollout gates on sync lag or consistency, but no sync pair lists this route in `sync[].routes`".into(),
        });
    }
    for s in &f.syncs {
        if let Some(max) = gates.max_sync_lag {
            let name = format!("max_sync_lag:{}", s.name);
            let limit = json!(max.as_secs_f64());
            let gate = match &s.lag {
                Reading::Fresh(lag) => Gate {
                    name,
                    limit,
                    figure: Some(lag.as_secs_f64()),
                    pass: *lag <= max,
                    reason: format!(
                        "sync `{}` lag {:.3}s {} {:.3}s",
                        s.name,
                        lag.as_secs_f64(),
                        if *lag <= max { "≤" } else { ">" },
                        max.as_secs_f64()
                    ),
                },
                other => Gate {
                    name,
                    limit,
                    figure: match other {
                        Reading::Stale { last, .. } => last.map(|l| l.as_secs_f64()),
                        _ => None,
                    },
                    pass: false,
                    reason: reading_text(other, &s.name, "lag").unwrap_or_default(),
                },
            };
            out.gates.push(gate);
        }
        if let Some(min) = gates.min_consistency {
            let name = format!("min_consistency:{}", s.name);
            let gate = match &s.consistency {
                Reading::Fresh(c) => Gate {
                    name,
                    limit: json!(min),
                    figure: Some(*c),
                    pass: *c >= min,
                    reason: format!(
                        "sync `{}` consistency {c:.5} {} {min}",
                        s.name,
                        if *c >= min { "≥" } else { "<" }
                    ),
                },
                other => Gate {
                    name,
                    limit: json!(min),
                    figure: match other {
                        Reading::Stale { last, .. } => *last,
                        _ => None,
                    },
                    pass: false,
                    reason: reading_text(other, &s.name, "consistency").unwrap_or_default(),
                },
            };
            out.gates.push(gate);
        }
        // Only a fresh figure can prove the data wrong; a stale one only holds the gates.
        if let (Some(min), Reading::Fresh(c)) =
            (rollback.and_then(|r| r.min_consistency), &s.consistency)
            && *c < min
            && crate::consistency::enough_to_judge(s.samples, min)
            && out.integrity.is_none()
        {
            out.integrity = Some(format!(
                "sync `{}` consistency {c:.5} < rollback.min_consistency {min}",
                s.name
            ));
        }
    }
    for (url, answer) in &f.hooks {
        let name = format!("webhook:{url}");
        let gate = match answer {
            HookAnswer::Status(code) if (200..300).contains(code) => Gate {
                name,
                limit: json!("2xx"),
                figure: Some(f64::from(*code)),
                pass: true,
                reason: format!("answered {code}"),
            },
            HookAnswer::Status(code) => Gate {
                name,
                limit: json!("2xx"),
                figure: Some(f64::from(*code)),
                pass: false,
                reason: format!("answered {code}; the step holds until it answers 2xx"),
            },
            HookAnswer::Failed(e) => Gate {
                name,
                limit: json!("2xx"),
                figure: None,
                pass: false,
                reason: format!("no answer: {e}"),
            },
            HookAnswer::Pending => Gate {
                name,
                limit: json!("2xx"),
                figure: None,
                pass: false,
                reason: "waiting for its first answer at this step".into(),
            },
        };
        out.gates.push(gate);
    }
    out
}

/// What one controller tick decides for a route.
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    /// Not running, or paused: nothing moves.
    Still,
    /// Every gate holds: the bake goes on.
    Bake { baked: Duration },
    /// A gate does not hold: the bake of this step starts over.
    Hold { failing: Vec<String> },
    /// A transition to make through the control plane.
    Transition(Transition),
    /// Consistency below `rollback.min_consistency`: roll back through the rollback path
    /// with reason `data_integrity`.
    RollBack { detail: String },
}

/// The controller's decision. `rolled_back` is the reason of the route's rollback mark, if
/// it has one; `elapsed` the time since the previous tick.
pub fn tick(
    record: &RolloutRecord,
    walk: &Walk,
    bake: Duration,
    evaluation: &Evaluation,
    rolled_back: Option<&str>,
    elapsed: Duration,
) -> Tick {
    // A rollback after promotion ends the rollout too: the route no longer runs at 100%.
    if let Some(reason) = rolled_back
        && (record.phase.is_running() || record.phase == Phase::Promoted)
    {
        return Tick::Transition(Transition::RolledBack {
            reason: reason.to_string(),
        });
    }
    if !record.phase.is_running() {
        return Tick::Still;
    }
    if let Some(detail) = &evaluation.integrity {
        return Tick::RollBack {
            detail: detail.clone(),
        };
    }
    if record.phase == Phase::Paused {
        return Tick::Still;
    }
    let failing: Vec<String> = evaluation
        .failing()
        .iter()
        .map(|g| g.name.clone())
        .collect();
    if !failing.is_empty() {
        return Tick::Hold { failing };
    }
    let baked = record.baked + elapsed;
    if baked < bake {
        return Tick::Bake { baked };
    }
    if record.step + 1 < walk.len() {
        Tick::Transition(Transition::Advance {
            step: record.step + 1,
        })
    } else {
        Tick::Transition(Transition::Promote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk() -> Walk {
        Walk::Weights(
            [1.0, 5.0, 25.0, 50.0, 100.0]
                .iter()
                .map(|p| Weight::from_percent(*p).unwrap())
                .collect(),
        )
    }

    fn running(step: usize, baked_ms: u64) -> RolloutRecord {
        RolloutRecord {
            phase: Phase::Progressing,
            step,
            baked: Duration::from_millis(baked_ms),
            ..Default::default()
        }
    }

    fn all_gates() -> Gates {
        Gates {
            max_error_rate: Some(0.01),
            max_latency_ratio: Some(1.5),
            max_sync_lag: Some(Duration::from_millis(500)),
            min_consistency: Some(0.999),
        }
    }

    fn healthy(requests: u64, five_xx: u64) -> WindowFigures {
        WindowFigures {
            requests,
            five_xx,
            p99: Some(Duration::from_millis(10)),
            ..Default::default()
        }
    }

    fn figures(lag: Reading<Duration>, consistency: Reading<f64>) -> GateFigures {
        GateFigures {
            window: Duration::from_secs(10),
            legacy: healthy(100, 0),
            target: healthy(100, 0),
            syncs: vec![SyncFigures {
                name: "users".into(),
                lag,
                consistency,
                samples: 100_000,
            }],
            hooks: vec![],
        }
    }

    const BAKE: Duration = Duration::from_secs(2);
    const TICK: Duration = Duration::from_millis(200);

    #[test]
    fn a_step_advances_only_after_every_gate_held_for_the_whole_bake() {
        let ok = Evaluation::default();
        assert_eq!(
            tick(&running(1, 0), &walk(), BAKE, &ok, None, TICK),
            Tick::Bake {
                baked: Duration::from_millis(200)
            }
        );
        assert_eq!(
            tick(&running(1, 1900), &walk(), BAKE, &ok, None, TICK),
            Tick::Transition(Transition::Advance { step: 2 })
        );
        assert_eq!(
            tick(&running(4, 1900), &walk(), BAKE, &ok, None, TICK),
            Tick::Transition(Transition::Promote),
            "the last step bakes, then the rollout is promoted"
        );
    }

    #[test]
    fn a_failing_gate_holds_and_names_itself() {
        let g = Gates {
            max_error_rate: Some(0.01),
            ..Default::default()
        };
        let mut f = figures(Reading::Unknown, Reading::Unknown);
        f.syncs.clear();
        f.target = healthy(100, 5);
        let e = evaluate(&g, None, &f);
        assert_eq!(e.gates.len(), 1);
        assert!(!e.gates[0].pass);
        assert_eq!(e.gates[0].figure, Some(0.05));
        assert!(e.gates[0].reason.contains("0.0500 > 0.01"), "{:?}", e.gates);
        assert_eq!(
            tick(&running(1, 1900), &walk(), BAKE, &e, None, TICK),
            Tick::Hold {
                failing: vec!["max_error_rate".into()]
            }
        );
    }

    #[test]
    fn sync_gates_pass_only_on_fresh_figures_within_their_limits() {
        let g = all_gates();
        let fresh = evaluate(
            &g,
            None,
            &figures(
                Reading::Fresh(Duration::from_millis(100)),
                Reading::Fresh(0.9995),
            ),
        );
        assert!(fresh.failing().is_empty(), "{:?}", fresh.gates);

        let lagging = evaluate(
            &g,
            None,
            &figures(Reading::Fresh(Duration::from_secs(2)), Reading::Fresh(1.0)),
        );
        let failing = lagging.failing();
        assert_eq!(failing.len(), 1);
        assert_eq!(failing[0].name, "max_sync_lag:users");
        assert_eq!(failing[0].figure, Some(2.0));

        let stale = evaluate(
            &g,
            None,
            &figures(
                Reading::Stale {
                    last: Some(Duration::from_millis(10)),
                    age: Duration::from_secs(9),
                },
                Reading::Stale {
                    last: Some(1.0),
                    age: Duration::from_secs(9),
                },
            ),
        );
        let failing = stale.failing();
        assert_eq!(failing.len(), 2, "stale figures never pass");
        assert!(failing.iter().all(|g| g.reason.contains("stale")));

        let unknown = evaluate(&g, None, &figures(Reading::Unknown, Reading::Unknown));
        let failing = unknown.failing();
        assert_eq!(failing.len(), 2);
        assert!(failing[0].reason.contains("not running"));
    }

    #[test]
    fn sync_gates_without_a_pair_hold_and_say_why() {
        let mut f = figures(Reading::Unknown, Reading::Unknown);
        f.syncs.clear();
        let e = evaluate(&all_gates(), None, &f);
        let failing = e.failing();
        assert_eq!(failing.len(), 1);
        assert!(failing[0].reason.contains("sync[].routes"));
    }

    #[test]
    fn consistency_below_the_gate_holds_and_below_the_rollback_limit_rolls_back() {
        let rollback = RollbackSpec {
            max_error_rate: None,
            max_latency_ratio: None,
            window: Duration::from_secs(10),
            min_requests: 20,
            min_consistency: Some(0.99),
        };
        let holds = evaluate(
            &all_gates(),
            Some(&rollback),
            &figures(Reading::Fresh(Duration::ZERO), Reading::Fresh(0.995)),
        );
        assert_eq!(holds.integrity, None);
        assert_eq!(holds.failing()[0].name, "min_consistency:users");

        let breach = evaluate(
            &all_gates(),
            Some(&rollback),
            &figures(Reading::Fresh(Duration::ZERO), Reading::Fresh(0.95)),
        );
        assert!(breach.integrity.is_some());
        assert!(matches!(
            tick(&running(2, 0), &walk(), BAKE, &breach, None, TICK),
            Tick::RollBack { .. }
        ));
        // A stale figure cannot prove the data wrong.
        let stale = evaluate(
            &all_gates(),
            Some(&rollback),
            &figures(
                Reading::Fresh(Duration::ZERO),
                Reading::Stale {
                    last: Some(0.5),
                    age: Duration::from_secs(30),
                },
            ),
        );
        assert_eq!(stale.integrity, None);
    }

    #[test]
    fn webhook_gates_pass_on_2xx_only() {
        let mut f = figures(Reading::Unknown, Reading::Unknown);
        f.syncs.clear();
        f.hooks = vec![
            ("http://a/gate".into(), HookAnswer::Status(204)),
            ("http://b/gate".into(), HookAnswer::Status(500)),
            (
                "http://c/gate".into(),
                HookAnswer::Failed("timed out".into()),
            ),
            ("http://d/gate".into(), HookAnswer::Pending),
        ];
        let e = evaluate(&Gates::default(), None, &f);
        let pass: Vec<bool> = e.gates.iter().map(|g| g.pass).collect();
        assert_eq!(pass, [true, false, false, false]);
    }

    #[test]
    fn a_rolled_back_route_ends_a_running_rollout_and_wins_over_everything() {
        let ok = Evaluation::default();
        let mut paused = running(2, 0);
        paused.phase = Phase::Paused;
        for r in [running(2, 0), paused] {
            assert_eq!(
                tick(&r, &walk(), BAKE, &ok, Some("error_rate: x"), TICK),
                Tick::Transition(Transition::RolledBack {
                    reason: "error_rate: x".into()
                })
            );
        }
        // A rollback after promotion ends the promoted rollout as well; an ended one
        // (aborted, already rolled back) stays as it is.
        let mut promoted = running(4, 0);
        promoted.phase = Phase::Promoted;
        assert_eq!(
            tick(&promoted, &walk(), BAKE, &ok, Some("x"), TICK),
            Tick::Transition(Transition::RolledBack { reason: "x".into() })
        );
        for phase in [Phase::Aborted, Phase::RolledBack, Phase::Idle] {
            let mut ended = running(4, 0);
            ended.phase = phase;
            assert_eq!(
                tick(&ended, &walk(), BAKE, &ok, Some("x"), TICK),
                Tick::Still
            );
        }
    }

    #[test]
    fn a_paused_rollout_does_not_bake() {
        let mut r = running(1, 500);
        r.phase = Phase::Paused;
        assert_eq!(
            tick(&r, &walk(), BAKE, &Evaluation::default(), None, TICK),
            Tick::Still
        );
    }

    #[test]
    fn commands_follow_the_lifecycle() {
        let w = walk();
        let idle = RolloutRecord::default();
        assert_eq!(command(&idle, &w, Command::Start), Ok(Transition::Start));
        assert!(matches!(
            command(&idle, &w, Command::Pause),
            Err(RolloutError::NotAllowed { .. })
        ));
        let r = apply(&idle, &w, &Transition::Start, "ops", "t0");
        assert_eq!((r.phase, r.step, r.revision), (Phase::Progressing, 0, 1));
        assert_eq!(
            routing(&w, &r),
            Routing::Weight(Weight::from_percent(1.0).unwrap())
        );
        assert!(command(&r, &w, Command::Start).is_err(), "already running");
        assert_eq!(
            command(&r, &w, Command::Promote { full: false }),
            Ok(Transition::Advance { step: 1 })
        );
        assert_eq!(
            command(&r, &w, Command::Promote { full: true }),
            Ok(Transition::Promote)
        );
        let paused = apply(&running(2, 700), &w, &Transition::Pause, "ops", "t1");
        assert_eq!(
            paused.baked,
            Duration::from_millis(700),
            "pause keeps the bake"
        );
        assert_eq!(
            command(&paused, &w, Command::Resume),
            Ok(Transition::Resume)
        );
        assert!(command(&paused, &w, Command::Pause).is_err());
        let aborted = apply(&paused, &w, &Transition::Abort, "ops", "t2");
        assert_eq!(routing(&w, &aborted), Routing::Weight(Weight::ZERO));
        assert!(command(&aborted, &w, Command::Abort).is_err());
        assert_eq!(command(&aborted, &w, Command::Start), Ok(Transition::Start));
        let promoted = apply(&running(3, 0), &w, &Transition::Promote, "ops", "t3");
        assert_eq!(routing(&w, &promoted), Routing::Weight(Weight::FULL));
        assert_eq!(promoted.history.last().unwrap().event, "promote");
    }

    #[test]
    fn blue_green_walks_preview_then_switched() {
        let w = Walk::BlueGreen;
        let r = apply(
            &RolloutRecord::default(),
            &w,
            &Transition::Start,
            "ops",
            "t",
        );
        assert_eq!(routing(&w, &r), Routing::Active(Side::Legacy));
        let switched = apply(&r, &w, &Transition::Advance { step: 1 }, "rollout", "t");
        assert_eq!(routing(&w, &switched), Routing::Active(Side::Target));
        let aborted = apply(&switched, &w, &Transition::Abort, "ops", "t");
        assert_eq!(routing(&w, &aborted), Routing::Active(Side::Legacy));
    }
}
