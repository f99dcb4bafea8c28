//! Runtime overrides: what operators changed through the admin API, and the pure function
//! that lays them over the file's config to give the config in force.
//!
//! Overrides win over the file until an operator resets them, so a reload of the file never
//! silently undoes a weight someone set by hand.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::Config;
use crate::dataplane::split::{Side, Split, Weight};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RollbackMark {
    pub at: String,
    pub by: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOverride {
    pub weight: Option<Weight>,
    pub active: Option<Side>,
    pub rollback: Option<RollbackMark>,
}

impl RouteOverride {
    pub fn is_empty(&self) -> bool {
        self == &RouteOverride::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagOverride {
    pub percentage: Option<Weight>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub routes: BTreeMap<String, RouteOverride>,
    pub flags: BTreeMap<String, FlagOverride>,
    /// Rollout records; they change routing only through the route overrides they come with.
    pub rollouts: BTreeMap<String, super::rollout::RolloutRecord>,
}

/// The file's config with every override that still names something in it applied.
/// Overrides for routes or flags the file no longer has are kept in the store but ignored,
/// so removing a route from the file and adding it back restores the operator's setting.
pub fn apply(config: &Config, overrides: &Overrides) -> Config {
    let mut effective = config.clone();
    for route in &mut effective.routes {
        let Some(o) = overrides.routes.get(&*route.name) else {
            continue;
        };
        match &mut route.split {
            Split::Percentage { weight } | Split::Canary { weight, .. } => {
                if let Some(w) = o.weight {
                    *weight = w;
                }
            }
            Split::BlueGreen { active, .. } => {
                if let Some(side) = o.active {
                    *active = side;
                }
            }
            Split::FeatureFlag { .. } => {}
        }
        route.rolled_back = o.rollback.is_some();
    }
    for flag in &mut effective.flags {
        if let Some(p) = overrides.flags.get(&flag.name).and_then(|o| o.percentage) {
            flag.weight = p;
        }
    }
    effective
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const YAML: &str = "listen: { http: 127.0.0.1:0 }\nbackends:\n  a: { endpoints: [\"http://127.0.0.1:1\"] }\n  b: { endpoints: [\"http://127.0.0.1:2\"] }\ndefault_backend: a\nflags:\n  f: { percentage: 10 }\nroutes:\n  - { name: p, match: { path_prefix: /p }, legacy: a, target: b, split: { percentage: { weight: 10 } } }\n  - { name: g, match: { path_prefix: /g }, legacy: a, target: b, split: { blue_green: { active: legacy } } }\n";

    #[test]
    fn overrides_win_over_the_file_and_rollback_marks_the_route() {
        let config = crate::config::parse(YAML, Path::new("t.yaml")).unwrap();
        let mut o = Overrides::default();
        o.routes.insert(
            "p".into(),
            RouteOverride {
                weight: Some(Weight::from_percent(55.5).unwrap()),
                ..Default::default()
            },
        );
        o.routes.insert(
            "g".into(),
            RouteOverride {
                active: Some(Side::Target),
                rollback: Some(RollbackMark {
                    at: "now".into(),
                    by: "ops".into(),
                    reason: "manual".into(),
                }),
                ..Default::default()
            },
        );
        o.flags.insert(
            "f".into(),
            FlagOverride {
                percentage: Some(Weight::FULL),
            },
        );
        o.routes.insert("gone".into(), RouteOverride::default());
        let e = apply(&config, &o);
        assert_eq!(
            e.routes[0].split,
            Split::Percentage {
                weight: Weight::from_percent(55.5).unwrap()
            }
        );
        assert!(!e.routes[0].rolled_back);
        assert!(matches!(
            e.routes[1].split,
            Split::BlueGreen {
                active: Side::Target,
                ..
            }
        ));
        assert!(e.routes[1].rolled_back);
        assert_eq!(e.flags[0].weight, Weight::FULL);
        // The file's config itself is untouched.
        assert_eq!(
            config.routes[0].split,
            Split::Percentage {
                weight: Weight::from_percent(10.0).unwrap()
            }
        );
    }
}
