//! The two demo services: a legacy "users" API on `legacy.db` and its replacement on `v2.db`,
//! the same code on different SQLite files. Each answers with `x-served-by` and counts what it
//! served; the replacement has a fault switch the demo flips. They know nothing of switchyard.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::net::TcpListener;

use super::DemoError;
use crate::lifecycle::Shutdown;

/// The table both services own, the same on both sides (the sync pair's key is `id`).
/// `updated_at` is fixed-width RFC 3339 text with microseconds, so it sorts as it reads and
/// `last_write_wins` can compare it.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, updated_at TEXT NOT NULL)";

/// Opens (creating) a SQLite file in WAL mode, so the app and the sync worker do not block
/// each other's readers.
pub async fn open(url: &str) -> Result<SqlitePool, DemoError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| DemoError::Db(format!("{url}: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .map_err(|e| DemoError::Db(format!("{url}: {e}")))
}

/// Creates the table on both files and gives the monolith its users; the replacement starts
/// empty and gets them from the sync worker's backfill.
pub async fn prepare(legacy: &SqlitePool, v2: &SqlitePool, users: i64) -> Result<(), DemoError> {
    for pool in [legacy, v2] {
        sqlx::query(SCHEMA)
            .execute(pool)
            .await
            .map_err(|e| DemoError::Db(format!("creating the users table: {e}")))?;
    }
    let now = timestamp();
    let mut tx = legacy
        .begin()
        .await
        .map_err(|e| DemoError::Db(e.to_string()))?;
    for id in 1..=users {
        sqlx::query(
            "INSERT OR REPLACE INTO users (id, name, email, updated_at) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(format!("user {id}"))
        .bind(format!("user{id}@example.com"))
        .bind(&now)
        .execute(&mut *tx)
        .await
        .map_err(|e| DemoError::Db(format!("seeding users: {e}")))?;
    }
    tx.commit().await.map_err(|e| DemoError::Db(e.to_string()))
}

pub fn timestamp() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// One running service.
pub struct App {
    pub addr: SocketAddr,
    /// On: every `/api/users` request answers 500 without touching the database.
    pub fault: Arc<AtomicBool>,
    pub served: Arc<AtomicU64>,
}

#[derive(Clone)]
struct AppState {
    name: &'static str,
    db: SqlitePool,
    fault: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
}

#[derive(Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub updated_at: String,
}

#[derive(Deserialize)]
struct UserWrite {
    name: String,
    email: String,
}

pub fn start(
    name: &'static str,
    listener: TcpListener,
    db: SqlitePool,
    mut shutdown: Shutdown,
) -> Result<App, DemoError> {
    let addr = listener
        .local_addr()
        .map_err(|e| DemoError::Io(format!("{name} app address"), e))?;
    let state = AppState {
        name,
        db,
        fault: Arc::new(AtomicBool::new(false)),
        served: Arc::new(AtomicU64::new(0)),
    };
    let app = App {
        addr,
        fault: state.fault.clone(),
        served: state.served.clone(),
    };
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/api/users/{id}",
            get(read_user).put(write_user).post(write_user),
        )
        .with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
    });
    Ok(app)
}

fn tagged(name: &'static str, mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("x-served-by", HeaderValue::from_static(name));
    response
}

fn failure(name: &'static str, status: StatusCode, message: String) -> Response {
    tagged(
        name,
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response(),
    )
}

async fn read_user(State(s): State<AppState>, Path(id): Path<i64>) -> Response {
    s.served.fetch_add(1, Ordering::Relaxed);
    if s.fault.load(Ordering::Relaxed) {
        return failure(
            s.name,
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected fault".into(),
        );
    }
    let row = sqlx::query("SELECT id, name, email, updated_at FROM users WHERE id = ?")
        .bind(id)
        .fetch_optional(&s.db)
        .await;
    match row {
        Ok(Some(r)) => tagged(
            s.name,
            axum::Json(User {
                id: r.get(0),
                name: r.get(1),
                email: r.get(2),
                updated_at: r.get(3),
            })
            .into_response(),
        ),
        Ok(None) => failure(s.name, StatusCode::NOT_FOUND, format!("no user {id}")),
        Err(e) => failure(s.name, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn write_user(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> Response {
    s.served.fetch_add(1, Ordering::Relaxed);
    if s.fault.load(Ordering::Relaxed) {
        return failure(
            s.name,
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected fault".into(),
        );
    }
    let w: UserWrite = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return failure(s.name, StatusCode::BAD_REQUEST, e.to_string()),
    };
    let user = User {
        id,
        name: w.name,
        email: w.email,
        updated_at: timestamp(),
    };
    let result = sqlx::query(
        "INSERT INTO users (id, name, email, updated_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, updated_at = excluded.updated_at",
    )
    .bind(user.id)
    .bind(&user.name)
    .bind(&user.email)
    .bind(&user.updated_at)
    .execute(&s.db)
    .await;
    match result {
        Ok(_) => tagged(s.name, axum::Json(user).into_response()),
        Err(e) => failure(s.name, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
