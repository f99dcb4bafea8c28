//! Health: passive outcome windows from live traffic, active probes of endpoints, and the
//! rollback decisions made from both. It decides; the only way its decisions reach the
//! data plane is the control plane's publish path.

pub mod monitor;
pub mod probe;
pub mod window;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use window::{MAX_WINDOW, Outcome, OutcomeWindow, RouteHealth, WindowFigures};

/// Whether active probes consider an endpoint fit for traffic. Up until probed otherwise.
#[derive(Debug)]
pub struct EndpointHealth {
    up: AtomicBool,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        EndpointHealth {
            up: AtomicBool::new(true),
        }
    }
}

impl EndpointHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed) != up
    }
}

/// Health state keyed by name, so it survives every snapshot rebuild: windows by route,
/// probe results by backend and endpoint.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    routes: Mutex<HashMap<Arc<str>, Arc<RouteHealth>>>,
    endpoints: Mutex<HashMap<(String, String), Arc<EndpointHealth>>>,
}

impl HealthRegistry {
    pub fn route(&self, name: &Arc<str>) -> Arc<RouteHealth> {
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.clone())
            .or_default()
            .clone()
    }

    pub fn endpoint(&self, backend: &str, endpoint: &str) -> Arc<EndpointHealth> {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((backend.to_string(), endpoint.to_string()))
            .or_default()
            .clone()
    }
}
