//! The state store: runtime overrides and the audit log, in SQLite (default) or Postgres
//! (shared between replicas), through sqlx's `Any` driver so both run the same migrations
//! and the same queries.
//!
//! Every change is one transaction: the override, its audit record and the version bump
//! commit together or not at all. The data plane never reaches this module.

use std::time::{Duration, SystemTime};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::overrides::{FlagOverride, Overrides, RollbackMark, RouteOverride};
use super::rollout::{HistoryEntry, Phase, RolloutRecord};
use crate::dataplane::split::{Side, Weight};

/// The channel replicas sharing a Postgres store are notified on.
pub const NOTIFY_CHANNEL: &str = "switchyard_state";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {url}: {source}")]
    Unavailable { url: String, source: sqlx::Error },
    #[error("state store {url}: migration failed: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("state store holds an unreadable value in {table}.{column}: {value}")]
    Corrupt {
        table: &'static str,
        column: &'static str,
        value: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct StateStore {
    pool: AnyPool,
    url: String,
    engine: Engine,
}

/// One audit record, as written and as read back.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// The route or flag view before the change (without ETag and live figures).
    #[schema(value_type = Option<Object>)]
    pub before: Option<serde_json::Value>,
    /// The view after it; absent for a refusal.
    #[schema(value_type = Option<Object>)]
    pub after: Option<serde_json::Value>,
    pub outcome: String,
    pub detail: Option<String>,
}

/// What a change writes besides its audit record.
#[derive(Debug, Clone)]
pub enum StateWrite {
    Route {
        name: String,
        value: RouteOverride,
    },
    Flag {
        name: String,
        value: FlagOverride,
    },
    /// A rollout transition: the route's override and its rollout record together.
    Rollout {
        name: String,
        value: RouteOverride,
        rollout: RolloutRecord,
    },
    /// A refusal changes nothing but the audit log.
    Nothing,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl StateStore {
    /// Connects and runs migrations. SQLite files are created when missing.
    pub async fn connect(url: &str) -> Result<StateStore, StoreError> {
        sqlx::any::install_default_drivers();
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else {
            Engine::Postgres
        };
        let connect_url = match engine {
            Engine::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let unavailable = |source| StoreError::Unavailable {
            url: redact(url),
            source,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            // Writes fail fast (503) instead of hanging while the store is down.
            .acquire_timeout(Duration::from_secs(2))
            .connect(&connect_url)
            .await
            .map_err(unavailable)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                url: redact(url),
                source,
            })?;
        Ok(StateStore {
            pool,
            url: url.to_string(),
            engine,
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unavailable(&self, source: sqlx::Error) -> StoreError {
        StoreError::Unavailable {
            url: redact(&self.url),
            source,
        }
    }

    /// The version bumped by every change; cheap enough to poll once a second.
    pub async fn version(&self) -> Result<i64, StoreError> {
        sqlx::query("SELECT version FROM state_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map(|row| row.get::<i64, _>(0))
            .map_err(|e| self.unavailable(e))
    }

    pub async fn load(&self) -> Result<Overrides, StoreError> {
        let mut overrides = Overrides::default();
        let rows = sqlx::query(
            "SELECT route, weight_bp, active, rolled_back, rollback_at, rollback_by, rollback_reason FROM route_overrides",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.unavailable(e))?;
        for row in rows {
            let (name, value) = route_row(&row)?;
            overrides.routes.insert(name, value);
        }
        let rows = sqlx::query("SELECT flag, percentage_bp FROM flag_overrides")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.unavailable(e))?;
        for row in rows {
            let name: String = row.get(0);
            let percentage = weight_column(row.get(1), "flag_overrides", "percentage_bp")?;
            overrides.flags.insert(name, FlagOverride { percentage });
        }
        overrides.rollouts = self.rollouts().await?;
        Ok(overrides)
    }

    /// Every route's rollout record, as last saved.
    pub async fn rollouts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, RolloutRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT route, state, step, baked_ms, revision, reason, history FROM rollouts",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.unavailable(e))?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (name, record) = rollout_row(&row)?;
            out.insert(name, record);
        }
        Ok(out)
    }

    /// Saves how long the current step has baked, unless a transition (of this or another
    /// replica) has replaced the record since. Not a change of routing: no audit, no version
    /// bump, so replicas do not re-read the state once a second.
    pub async fn save_bake(
        &self,
        route: &str,
        revision: u64,
        baked: Duration,
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE rollouts SET baked_ms = $1 WHERE route = $2 AND revision = $3")
                .bind(i64::try_from(baked.as_millis()).unwrap_or(i64::MAX))
                .bind(route)
                .bind(i64::try_from(revision).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await
                .map_err(|e| self.unavailable(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes or renews the rollout lease for `holder` until `now_ms + ttl`. True while this
    /// holder leads. One conditional UPDATE, so two replicas cannot both win it.
    pub async fn lease(
        &self,
        holder: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let until = now_ms + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let done = sqlx::query(
            "UPDATE rollout_lease SET holder = $1, expires_ms = $2 WHERE id = 1 AND (holder = $1 OR expires_ms < $3)",
        )
        .bind(holder)
        .bind(until)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| self.unavailable(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up at shutdown so another replica leads at once.
    pub async fn release_lease(&self, holder: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE rollout_lease SET expires_ms = 0 WHERE id = 1 AND holder = $1")
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Writes the state change and its audit record in one transaction.
    pub async fn commit(&self, write: &StateWrite, audit: &AuditEntry) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.unavailable(e))?;
        let now = &audit.at;
        match write {
            StateWrite::Route { name, value } if value.is_empty() => {
                sqlx::query("DELETE FROM route_overrides WHERE route = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await
            }
            StateWrite::Route { name, value } => {
                write_route(&mut tx, name, value, now, &audit.actor).await
            }
            StateWrite::Rollout {
                name,
                value,
                rollout,
            } => {
                let route = if value.is_empty() {
                    sqlx::query("DELETE FROM route_overrides WHERE route = $1")
                        .bind(name)
                        .execute(&mut *tx)
                        .await
                } else {
                    write_route(&mut tx, name, value, now, &audit.actor).await
                };
                match route {
                    Ok(_) => write_rollout(&mut tx, name, rollout, now).await,
                    Err(e) => Err(e),
                }
            }
            StateWrite::Flag { name, value } if value.percentage.is_none() => {
                sqlx::query("DELETE FROM flag_overrides WHERE flag = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await
            }
            StateWrite::Flag { name, value } => {
                sqlx::query(
                    "INSERT INTO flag_overrides (flag, percentage_bp, updated_at, updated_by) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (flag) DO UPDATE SET percentage_bp = $2, updated_at = $3, updated_by = $4",
                )
                .bind(name)
                .bind(value.percentage.map(|w| i64::from(w.basis_points())))
                .bind(now)
                .bind(&audit.actor)
                .execute(&mut *tx)
                .await
            }
            StateWrite::Nothing => Ok(Default::default()),
        }
        .map_err(|e| self.unavailable(e))?;

        // Ids are assigned inside the transaction; two Postgres replicas racing for the same
        // id make one commit fail, and the caller reports that as a conflict to retry.
        let id: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) + 1 FROM audit")
            .fetch_one(&mut *tx)
            .await
            .map(|row| row.get(0))
            .map_err(|e| self.unavailable(e))?;
        sqlx::query(
            "INSERT INTO audit (id, at, actor, action, target, before_state, after_state, outcome, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(&audit.at)
        .bind(&audit.actor)
        .bind(&audit.action)
        .bind(&audit.target)
        .bind(audit.before.as_ref().map(|v| v.to_string()))
        .bind(audit.after.as_ref().map(|v| v.to_string()))
        .bind(&audit.outcome)
        .bind(audit.detail.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(|e| self.unavailable(e))?;
        if !matches!(write, StateWrite::Nothing) {
            sqlx::query("UPDATE state_version SET version = version + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await
                .map_err(|e| self.unavailable(e))?;
            if self.engine == Engine::Postgres {
                // Delivered on commit, to every replica listening.
                sqlx::query("SELECT pg_notify($1, '')")
                    .bind(NOTIFY_CHANNEL)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.unavailable(e))?;
            }
        }
        tx.commit().await.map_err(|e| self.unavailable(e))?;
        Ok(id)
    }

    pub async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, before_state, after_state, outcome, detail FROM audit ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.unavailable(e))?;
        Ok(rows
            .iter()
            .map(|row| {
                let json = |i: usize| {
                    row.get::<Option<String>, _>(i)
                        .and_then(|s| serde_json::from_str(&s).ok())
                };
                AuditEntry {
                    id: row.get(0),
                    at: row.get(1),
                    actor: row.get(2),
                    action: row.get(3),
                    target: row.get(4),
                    before: json(5),
                    after: json(6),
                    outcome: row.get(7),
                    detail: row.get(8),
                }
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn write_route(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    name: &str,
    value: &RouteOverride,
    now: &str,
    actor: &str,
) -> Result<sqlx::any::AnyQueryResult, sqlx::Error> {
    let rb = value.rollback.as_ref();
    sqlx::query(
        "INSERT INTO route_overrides (route, weight_bp, active, rolled_back, rollback_at, rollback_by, rollback_reason, updated_at, updated_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (route) DO UPDATE SET weight_bp = $2, active = $3, rolled_back = $4, rollback_at = $5, \
         rollback_by = $6, rollback_reason = $7, updated_at = $8, updated_by = $9",
    )
    .bind(name)
    .bind(value.weight.map(|w| i64::from(w.basis_points())))
    .bind(value.active.map(|s| s.as_str()))
    .bind(i64::from(rb.is_some()))
    .bind(rb.map(|r| r.at.as_str()))
    .bind(rb.map(|r| r.by.as_str()))
    .bind(rb.map(|r| r.reason.as_str()))
    .bind(now)
    .bind(actor)
    .execute(&mut **tx)
    .await
}

async fn write_rollout(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    name: &str,
    r: &RolloutRecord,
    now: &str,
) -> Result<sqlx::any::AnyQueryResult, sqlx::Error> {
    let history = serde_json::to_string(&r.history).unwrap_or_else(|_| "[]".to_string());
    sqlx::query(
        "INSERT INTO rollouts (route, state, step, baked_ms, revision, reason, history, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (route) DO UPDATE SET state = $2, step = $3, baked_ms = $4, revision = $5, \
         reason = $6, history = $7, updated_at = $8",
    )
    .bind(name)
    .bind(r.phase.as_str())
    .bind(i64::try_from(r.step).unwrap_or(i64::MAX))
    .bind(i64::try_from(r.baked.as_millis()).unwrap_or(i64::MAX))
    .bind(i64::try_from(r.revision).unwrap_or(i64::MAX))
    .bind(r.reason.as_deref())
    .bind(history)
    .bind(now)
    .execute(&mut **tx)
    .await
}

fn rollout_row(row: &AnyRow) -> Result<(String, RolloutRecord), StoreError> {
    let name: String = row.get(0);
    let state: String = row.get(1);
    let phase = Phase::parse(&state).map_err(|_| StoreError::Corrupt {
        table: "rollouts",
        column: "state",
        value: state.clone(),
    })?;
    let history: String = row.get(6);
    let history: Vec<HistoryEntry> =
        serde_json::from_str(&history).map_err(|_| StoreError::Corrupt {
            table: "rollouts",
            column: "history",
            value: history.chars().take(80).collect(),
        })?;
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok((
        name,
        RolloutRecord {
            phase,
            step: usize::try_from(count(row.get(2))).unwrap_or(0),
            baked: Duration::from_millis(count(row.get(3))),
            revision: count(row.get(4)),
            reason: row.get(5),
            history,
        },
    ))
}

fn route_row(row: &AnyRow) -> Result<(String, RouteOverride), StoreError> {
    let name: String = row.get(0);
    let weight = weight_column(row.get(1), "route_overrides", "weight_bp")?;
    let active = match row.get::<Option<String>, _>(2).as_deref() {
        None => None,
        Some("legacy") => Some(Side::Legacy),
        Some("target") => Some(Side::Target),
        Some(other) => {
            return Err(StoreError::Corrupt {
                table: "route_overrides",
                column: "active",
                value: other.to_string(),
            });
        }
    };
    let rollback = (row.get::<i64, _>(3) != 0).then(|| RollbackMark {
        at: row.get::<Option<String>, _>(4).unwrap_or_default(),
        by: row.get::<Option<String>, _>(5).unwrap_or_default(),
        reason: row.get::<Option<String>, _>(6).unwrap_or_default(),
    });
    Ok((
        name,
        RouteOverride {
            weight,
            active,
            rollback,
        },
    ))
}

fn weight_column(
    value: Option<i64>,
    table: &'static str,
    column: &'static str,
) -> Result<Option<Weight>, StoreError> {
    value
        .map(|bp| {
            u16::try_from(bp)
                .ok()
                .and_then(Weight::from_basis_points)
                .ok_or(StoreError::Corrupt {
                    table,
                    column,
                    value: bp.to_string(),
                })
        })
        .transpose()
}

/// A URL fit for logs and error bodies: the password, if any, replaced.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[tokio::test]
    async fn sqlite_round_trip_of_overrides_and_audit() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let store = StateStore::connect(&url).await.unwrap();
        assert_eq!(store.version().await.unwrap(), 0);
        let value = RouteOverride {
            weight: Some(Weight::from_percent(12.5).unwrap()),
            active: Some(Side::Target),
            rollback: Some(RollbackMark {
                at: "t".into(),
                by: "ops".into(),
                reason: "r".into(),
            }),
        };
        let audit = AuditEntry {
            id: 0,
            at: now_rfc3339(),
            actor: "ops".into(),
            action: "set_weight".into(),
            target: "users".into(),
            before: Some(serde_json::json!({"weight": 10.0})),
            after: Some(serde_json::json!({"weight": 12.5})),
            outcome: "applied".into(),
            detail: None,
        };
        let id = store
            .commit(
                &StateWrite::Route {
                    name: "users".into(),
                    value: value.clone(),
                },
                &audit,
            )
            .await
            .unwrap();
        assert_eq!(id, 1);
        assert_eq!(store.version().await.unwrap(), 1);
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.routes["users"], value);
        let log = store.audit(10).await.unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].after, audit.after);
        // Reconnecting (a restart) sees the same state; migrations are not rerun.
        store.close().await;
        let again = StateStore::connect(&url).await.unwrap();
        assert_eq!(again.load().await.unwrap().routes["users"], value);
        // Clearing an override deletes its row.
        again
            .commit(
                &StateWrite::Route {
                    name: "users".into(),
                    value: RouteOverride::default(),
                },
                &audit,
            )
            .await
            .unwrap();
        assert!(again.load().await.unwrap().routes.is_empty());
    }
}
