//! The control plane: the admin listener and, as it grows, the state store, audit log and
//! rollout controller. It changes routing only through `snapshot::Publisher`.

pub mod admin;
pub mod api;
pub mod auth;
pub mod jobs;
pub mod model;
pub mod overrides;
pub mod plane;
pub mod rollout;
pub mod store;
pub mod ui;
pub mod webhook;
