//! Config reload: SIGHUP or a change of the file → validate → publish, or refuse and keep
//! the last good snapshot serving.
//!
//! The watcher observes the file's directory, not the file: editors replace files by
//! rename and Kubernetes swaps a ConfigMap through a symlink, and both would end a watch
//! on the file itself. Unchanged content is not republished.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::Config;
use crate::control::plane::ControlPlane;
use crate::lifecycle::Shutdown;
use crate::snapshot::Publisher;
use crate::telemetry::metrics::ReloadResult;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Signal,
    FileChange,
}

pub struct ConfigReloader {
    path: PathBuf,
    publisher: Arc<Publisher>,
    control: Arc<ControlPlane>,
    current: Config,
    last_text: Option<String>,
}

/// Editors write a file in several steps; events this close together are one change.
const SETTLE: Duration = Duration::from_millis(100);

impl ConfigReloader {
    pub fn new(
        path: &Path,
        publisher: Arc<Publisher>,
        control: Arc<ControlPlane>,
        current: Config,
    ) -> ConfigReloader {
        ConfigReloader {
            path: path.to_path_buf(),
            last_text: super::read_config(path).ok(),
            publisher,
            control,
            current,
        }
    }

    /// Starts watching; the returned task ends when `shutdown` fires. Errors only if the
    /// watch or the signal handler cannot be set up.
    pub fn start(
        mut self,
        mut shutdown: Shutdown,
    ) -> Result<tokio::task::JoinHandle<()>, ReloadError> {
        let mut hangups = signal(SignalKind::hangup()).map_err(ReloadError::Signal)?;
        let (tx, mut changes) = mpsc::unbounded_channel();
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.send(());
                }
            })
            .map_err(|source| ReloadError::Watch {
                path: dir.clone(),
                source,
            })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| ReloadError::Watch {
                path: dir.clone(),
                source,
            })?;

        Ok(tokio::spawn(async move {
            // Moved in so the watch lives exactly as long as the task.
            let _watcher = watcher;
            loop {
                let cause = tokio::select! {
                    _ = hangups.recv() => Cause::Signal,
                    Some(()) = changes.recv() => Cause::FileChange,
                    _ = shutdown.wait() => return,
                };
                if cause == Cause::FileChange {
                    tokio::time::sleep(SETTLE).await;
                    while changes.try_recv().is_ok() {}
                }
                self.reload(cause).await;
            }
        }))
    }

    async fn reload(&mut self, cause: Cause) {
        let text = match super::read_config(&self.path) {
            Ok(text) => text,
            Err(e) => {
                // A file briefly missing during an editor's rename is not a failed reload.
                if cause == Cause::Signal {
                    tracing::error!(path = %self.path.display(), error = %e, "config reload refused: cannot read the file; the previous config keeps serving");
                    self.publisher.metrics().reload(ReloadResult::Failure);
                }
                return;
            }
        };
        if cause == Cause::FileChange && self.last_text.as_deref() == Some(text.as_str()) {
            return;
        }
        self.last_text = Some(text.clone());
        // Validation is CPU work proportional to the file; it runs beside the request
        // runtime's workers, never on one of them.
        let path = self.path.clone();
        let parsed = tokio::task::spawn_blocking(move || super::parse(&text, &path))
            .await
            .unwrap_or_else(|e| {
                Err(vec![super::Diagnostic {
                    file: self.path.clone(),
                    position: super::Position { line: 1, col: 1 },
                    message: format!("validation did not finish: {e}"),
                }])
            });
        match parsed {
            Ok(next) => {
                for (what, changed) in [
                    ("listen.http", next.listen != self.current.listen),
                    // Certificate files are re-read by the TLS reloader; their paths are not.
                    ("listen.https", next.https != self.current.https),
                    ("limits", next.limits != self.current.limits),
                    (
                        "timeouts.header_read",
                        next.timeouts.header_read != self.current.timeouts.header_read,
                    ),
                    (
                        "timeouts.keepalive",
                        next.timeouts.keepalive != self.current.timeouts.keepalive,
                    ),
                    (
                        "admin.listen",
                        next.admin_listen != self.current.admin_listen,
                    ),
                    (
                        "timeouts.connect",
                        next.timeouts.connect != self.current.timeouts.connect,
                    ),
                    (
                        "timeouts.idle",
                        next.timeouts.idle != self.current.timeouts.idle,
                    ),
                ] {
                    if changed {
                        tracing::warn!(
                            setting = what,
                            "this setting changed but takes effect only after a restart"
                        );
                    }
                }
                // Through the control plane, so runtime overrides stay on top of the new file.
                let version = self.control.set_config(next.clone()).await;
                self.publisher.metrics().reload(ReloadResult::Success);
                tracing::info!(
                    version,
                    ?cause,
                    routes = next.routes.len(),
                    "config reloaded"
                );
                self.current = next;
            }
            Err(problems) => {
                self.publisher.metrics().reload(ReloadResult::Failure);
                for p in &problems {
                    tracing::error!(problem = %p, "config reload refused");
                }
                tracing::error!(
                    problems = problems.len(),
                    "config reload refused; the previous config keeps serving"
                );
            }
        }
    }
}
