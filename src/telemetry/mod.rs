//! Telemetry: the metrics registry and logging setup. Owns metric names and labels; it
//! decides nothing about traffic.

pub mod access_log;
pub mod feeds;
pub mod logging;
pub mod metrics;
pub mod process;

pub use feeds::Feeds;
pub use metrics::Metrics;
