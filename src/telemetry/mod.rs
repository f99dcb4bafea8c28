//! Telemetry: the metrics registry and logging setup. Owns metric names and labels; it
//! decides nothing about traffic.

pub mod logging;
pub mod metrics;

pub use metrics::Metrics;
