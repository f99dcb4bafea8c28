//! The data plane: accepting client connections, deciding where each request goes, and
//! forwarding it. It reads routing only from the published snapshot and never touches a
//! database or the state store.

pub mod admission;
pub mod client_body;
pub mod decision;
pub mod head_guard;
pub mod listener;
pub mod proxy;
pub mod rescue;
pub mod route;
pub mod split;
pub mod tls;
pub mod upstream;
