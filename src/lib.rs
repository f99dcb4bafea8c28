//! switchyard: a traffic router for strangler-fig migrations.
//!
//! The module tree is the architecture: `dataplane` forwards requests from one published
//! `snapshot`; `config` reads and validates the file; `control` serves the admin listener;
//! `telemetry` owns metrics and logs; `lifecycle` gives every task the same start/stop shape.

pub mod config;
pub mod consistency;
pub mod control;
pub mod ctl;
pub mod dataplane;
pub mod dberror;
pub mod demo;
pub mod health;
pub mod lifecycle;
pub mod outbound;
pub mod serve;
pub mod snapshot;
pub mod sync;
pub mod telemetry;
