//! `switchyard ctl`: a small client for the admin API (v1) — list and inspect routes and flags,
//! move weights, switch blue/green sides, roll back, reset, read the audit log, and drive and
//! wait on rollouts.
//!
//! Every command is one HTTP call. `execute` returns what would be printed so tests can check
//! output without capturing stdout; `run` prints it and turns errors into exit code 1.

use std::fmt::Write as _;
use std::time::Duration;

use http::{Method, StatusCode, Uri, header};
use serde_json::{Value, json};

use crate::control::model;
use crate::control::rollout::Phase;
use crate::outbound::{Outbound, error_chain};

/// A request body of the API's own types (`control::model`), shared with the server.
fn typed<T: serde::Serialize>(body: &T) -> Value {
    serde_json::to_value(body).unwrap_or(Value::Null)
}

/// An operator waiting on a hung admin listener is worse off than one told it timed out.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    // `global`: pipelines put these after the subcommand (`ctl rollout wait users -o json`)
    // as often as before it.
    /// Admin API base URL (http:// or https://)
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_ADMIN_URL",
        default_value = "http://127.0.0.1:9901"
    )]
    pub admin: String,
    /// Bearer token (default: $SWITCHYARD_ADMIN_TOKEN)
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Output format: tables for people, the API's JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// A PEM CA file to trust for an https:// admin URL, besides the system's roots.
    #[arg(long, global = true, env = "SWITCHYARD_ADMIN_CA")]
    pub cacert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns and rounded figures, for people.
    #[value(alias = "text")]
    Table,
    /// The admin API's JSON, full precision, for scripts.
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideArg {
    Legacy,
    Target,
}

impl SideArg {
    fn as_str(self) -> &'static str {
        match self {
            SideArg::Legacy => "legacy",
            SideArg::Target => "target",
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// List routes with the weight or side in force (`*`: runtime override).
    Routes,
    /// Show one route: file, runtime and in-force values, rollback state and ETag.
    Route {
        /// The route's `name` in the config.
        name: String,
    },
    /// Set the target weight (0..100) of a percentage or canary route; clears a rollback.
    Weight {
        /// The route's `name` in the config.
        name: String,
        /// Negative values are passed on, so the API's own 422 explains the range.
        #[arg(allow_negative_numbers = true)]
        percent: f64,
        /// Refuse (412) unless the route still has this ETag.
        #[arg(long)]
        if_match: Option<String>,
    },
    /// Switch a blue/green route to one side.
    Switch {
        /// The route's `name` in the config.
        name: String,
        /// The side that gets all of the route's traffic.
        side: SideArg,
        /// Refuse (412) unless the route still has this ETag.
        #[arg(long)]
        if_match: Option<String>,
    },
    /// Send all of a route's traffic to legacy until a weight is set or the route is reset.
    Rollback {
        /// The route's `name` in the config.
        name: String,
        /// Why, for the audit log and the route's state (e.g. an incident number).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Drop every runtime override of a route, back to the config file's values.
    Reset {
        /// The route's `name` in the config.
        name: String,
    },
    /// List feature flags.
    Flags,
    /// Show a flag, or set its percentage with --percentage.
    Flag {
        /// The flag's name in the config's `flags`.
        name: String,
        /// New rollout percentage (0..100); absent: show the flag.
        #[arg(long)]
        percentage: Option<f64>,
    },
    /// Show the newest audit entries.
    Audit {
        /// How many entries, newest first.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Sync pairs: phase, lag, throughput, conflicts (figures rounded; full in JSON).
    Sync,
    /// Sampled consistency per pair: ratio, lower bound, samples (full figures in JSON).
    Consistency,
    /// Drive a route's rollout, show it, or wait for it to end.
    Rollout {
        #[command(subcommand)]
        action: RolloutCmd,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum RolloutCmd {
    /// Start at the first step (also after a promotion, rollback or abort).
    Start {
        /// The route's `name` in the config.
        route: String,
    },
    /// Hold the current step; its bake time so far is kept.
    Pause {
        /// The route's `name` in the config.
        route: String,
    },
    /// Continue a paused rollout.
    Resume {
        /// The route's `name` in the config.
        route: String,
    },
    /// Go to the next step now; `--full`: straight to 100%.
    Promote {
        /// The route's `name` in the config.
        route: String,
        /// Skip the remaining steps: straight to 100%.
        #[arg(long)]
        full: bool,
    },
    /// Send everything to legacy and end the rollout.
    Abort {
        /// The route's `name` in the config.
        route: String,
    },
    /// State, step, weight, every gate with its figure, bake time left, history.
    Status {
        /// The route's `name` in the config.
        route: String,
    },
    /// Print a line per change until the rollout ends. Exit 0 promoted, 2 paused, 3 rolled
    /// back or aborted, 4 timeout, 1 any other error.
    Wait {
        /// The route's `name` in the config.
        route: String,
        /// Give up after this long, e.g. `90s`, `15m`.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// Exit codes of `ctl rollout wait` (contract §6).
pub const WAIT_PROMOTED: i32 = 0;
pub const WAIT_ERROR: i32 = 1;
pub const WAIT_PAUSED: i32 = 2;
pub const WAIT_ROLLED_BACK: i32 = 3;
pub const WAIT_TIMEOUT: i32 = 4;
/// How often `wait` reads the rollout: a change is printed within this.
const WAIT_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("admin URL `{url}` is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("`{0}` is not a valid name: use letters, digits, `-`, `_` and `.`")]
    BadName(String),
    #[error("{0}")]
    BadArgument(String),
    #[error("cannot reach {url}: {reason}")]
    Network { url: String, reason: String },
    #[error("no answer from {url} within {}s", CALL_TIMEOUT.as_secs())]
    Timeout { url: String },
    /// An error the API reported; `code` and `message` come from its JSON error body.
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("response from {url} is not the expected JSON: {reason}")]
    BadJson { url: String, reason: String },
}

impl CtlError {
    /// The `<code>` of `switchyard ctl: <code>: <message>`: the API's own code when it sent
    /// one, so scripts can match on the same words the API documents.
    pub fn code(&self) -> &str {
        match self {
            CtlError::BadUrl { .. } => "bad_url",
            CtlError::BadName(_) => "bad_name",
            CtlError::BadArgument(_) => "bad_argument",
            CtlError::Network { .. } => "unreachable",
            CtlError::Timeout { .. } => "timeout",
            CtlError::Api { code, .. } => code,
            CtlError::BadJson { .. } => "bad_response",
        }
    }

    /// What follows the code on stderr: for API errors the API's `message` alone.
    pub fn message(&self) -> String {
        match self {
            CtlError::Api { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// Runs one command, printing to stdout. Returns the process exit code: 0 success, 1 any error
/// (the error message — the API's `message` when there is one — printed to stderr as
/// `switchyard ctl: <code>: <message>`).
pub async fn run(args: CtlArgs) -> i32 {
    if let CtlCommand::Rollout {
        action: RolloutCmd::Wait { route, timeout },
    } = &args.command
    {
        let mut out = std::io::stdout();
        return match wait(&args, route, *timeout, &mut out).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("switchyard ctl: {}: {}", e.code(), e.message());
                WAIT_ERROR
            }
        };
    }
    match execute(&args).await {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            eprintln!("switchyard ctl: {}: {}", e.code(), e.message());
            1
        }
    }
}

/// Runs one command and returns its stdout text (ending in a newline).
pub async fn execute(args: &CtlArgs) -> Result<String, CtlError> {
    let api = AdminClient::new(args)?;
    let reply = match &args.command {
        CtlCommand::Routes => api.call(Method::GET, "/v1/routes", None, None).await?,
        CtlCommand::Route { name } => {
            let path = format!("/v1/routes/{}", segment(name)?);
            api.call(Method::GET, &path, None, None).await?
        }
        CtlCommand::Weight {
            name,
            percent,
            if_match,
        } => {
            let path = format!("/v1/routes/{}/weight", segment(name)?);
            let body = typed(&model::WeightBody {
                weight: finite("weight", *percent)?,
            });
            api.call(Method::PUT, &path, Some(body), if_match.as_deref())
                .await?
        }
        CtlCommand::Switch {
            name,
            side,
            if_match,
        } => {
            let path = format!("/v1/routes/{}/switch", segment(name)?);
            let body = typed(&model::SwitchBody {
                active: side.as_str().to_string(),
            });
            api.call(Method::POST, &path, Some(body), if_match.as_deref())
                .await?
        }
        CtlCommand::Rollback { name, reason } => {
            let path = format!("/v1/routes/{}/rollback", segment(name)?);
            // `{}` rather than no body: a JSON extractor on the server accepts it either way.
            let body = match reason {
                Some(r) => typed(&model::RollbackBody {
                    reason: Some(r.clone()),
                }),
                None => typed(&model::RollbackBody::default()),
            };
            api.call(Method::POST, &path, Some(body), None).await?
        }
        CtlCommand::Reset { name } => {
            let path = format!("/v1/routes/{}/reset", segment(name)?);
            api.call(Method::POST, &path, None, None).await?
        }
        CtlCommand::Flags => api.call(Method::GET, "/v1/flags", None, None).await?,
        CtlCommand::Flag { name, percentage } => {
            let path = format!("/v1/flags/{}", segment(name)?);
            match percentage {
                None => api.call(Method::GET, &path, None, None).await?,
                Some(p) => {
                    let body = typed(&model::FlagBody {
                        percentage: finite("percentage", *p)?,
                    });
                    api.call(Method::PUT, &path, Some(body), None).await?
                }
            }
        }
        CtlCommand::Audit { limit } => {
            let path = format!("/v1/audit?limit={limit}");
            api.call(Method::GET, &path, None, None).await?
        }
        CtlCommand::Sync => api.call(Method::GET, "/v1/sync", None, None).await?,
        CtlCommand::Consistency => api.call(Method::GET, "/v1/consistency", None, None).await?,
        CtlCommand::Rollout { action } => {
            let (verb, route, body) = match action {
                RolloutCmd::Start { route } => ("start", route, None),
                RolloutCmd::Pause { route } => ("pause", route, None),
                RolloutCmd::Resume { route } => ("resume", route, None),
                RolloutCmd::Promote { route, full } => (
                    "promote",
                    route,
                    Some(typed(&model::PromoteBody { full: *full })),
                ),
                RolloutCmd::Abort { route } => ("abort", route, None),
                RolloutCmd::Status { route } | RolloutCmd::Wait { route, .. } => ("", route, None),
            };
            let base = format!("/v1/rollouts/{}", segment(route)?);
            if verb.is_empty() {
                api.call(Method::GET, &base, None, None).await?
            } else {
                let body = body.unwrap_or_else(|| typed(&model::EmptyBody {}));
                api.call(Method::POST, &format!("{base}/{verb}"), Some(body), None)
                    .await?
            }
        }
    };

    if args.output == Output::Json {
        // `to_string_pretty` cannot fail on a `Value`, but an error here is still not a panic.
        let text = serde_json::to_string_pretty(&reply.body).map_err(|e| CtlError::BadJson {
            url: reply.url.clone(),
            reason: e.to_string(),
        })?;
        return Ok(text + "\n");
    }
    let etag = reply.etag.as_deref();
    Ok(match &args.command {
        CtlCommand::Routes => render_routes(&reply.body),
        CtlCommand::Route { .. }
        | CtlCommand::Weight { .. }
        | CtlCommand::Switch { .. }
        | CtlCommand::Rollback { .. }
        | CtlCommand::Reset { .. } => render_route(&reply.body, etag),
        CtlCommand::Flags => render_flags(&reply.body),
        CtlCommand::Flag { .. } => render_flag(&reply.body, etag),
        CtlCommand::Audit { .. } => render_audit(&reply.body),
        CtlCommand::Sync => render_sync(&reply.body),
        CtlCommand::Consistency => render_consistency(&reply.body),
        CtlCommand::Rollout { .. } => render_rollout(&reply.body),
    })
}

/// `rollout wait`: polls the rollout, writes one line per change (state, step or the set of
/// failing gates) to `out`, and returns the exit code for how it ended.
pub async fn wait(
    args: &CtlArgs,
    route: &str,
    timeout: Duration,
    out: &mut dyn std::io::Write,
) -> Result<i32, CtlError> {
    let api = AdminClient::new(args)?;
    let path = format!("/v1/rollouts/{}", segment(route)?);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<String> = None;
    loop {
        let reply = api.call(Method::GET, &path, None, None).await?;
        let rollout: model::RolloutView =
            serde_json::from_value(reply.body.clone()).map_err(|e| CtlError::BadJson {
                url: reply.url.clone(),
                reason: e.to_string(),
            })?;
        let view = reply.body;
        let failing: Vec<&str> = rollout
            .gates
            .iter()
            .filter(|g| !g.pass)
            .map(|g| g.name.as_str())
            .collect();
        let key = format!("{} {} {:?}", rollout.state, rollout.step, failing);
        if last.as_ref() != Some(&key) {
            let line = match args.output {
                Output::Json => progress_json(&view).to_string(),
                Output::Table => progress_line(&view),
            };
            // A closed stdout (`| head`) must not turn a promotion into an error.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            last = Some(key);
        }
        match rollout.state {
            Phase::Promoted => return Ok(WAIT_PROMOTED),
            Phase::Paused => return Ok(WAIT_PAUSED),
            Phase::RolledBack | Phase::Aborted => return Ok(WAIT_ROLLED_BACK),
            Phase::Idle => {
                return Err(CtlError::BadArgument(format!(
                    "route `{route}` has no rollout running; start one with `switchyard ctl rollout start {route}`"
                )));
            }
            Phase::Progressing => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let _ = writeln!(
                out,
                "timed out after {} waiting for the rollout of `{route}`",
                humantime::format_duration(timeout)
            );
            return Ok(WAIT_TIMEOUT);
        }
        tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
    }
}

/// One JSON line of `rollout wait --output json`.
fn progress_json(view: &Value) -> Value {
    json!({
        "route": view["route"],
        "state": view["state"],
        "step": view["step"],
        "weight": view["weight"],
        "bake_left_s": view["bake_left_s"],
        "reason": view["reason"],
        "gates": view["gates"],
    })
}

/// One human line of `rollout wait`.
fn progress_line(view: &Value) -> String {
    let steps = view["steps"].as_array().map_or(0, Vec::len);
    let mut line = format!(
        "{} {} step {}/{} weight {}",
        text(view.get("route")),
        text(view.get("state")),
        view["step"].as_u64().unwrap_or(0),
        steps,
        percent(view.get("weight")),
    );
    if view["state"] == "progressing" {
        let _ = write!(
            line,
            " bake left {:.1}s",
            view["bake_left_s"].as_f64().unwrap_or(0.0)
        );
    }
    let failing: Vec<String> = items(view, "gates")
        .iter()
        .filter(|g| g["pass"] == false)
        .map(|g| format!("{} ({})", text(g.get("name")), text(g.get("reason"))))
        .collect();
    if !failing.is_empty() {
        let _ = write!(line, " holding on: {}", failing.join("; "));
    }
    if let Some(reason) = view["reason"].as_str() {
        let _ = write!(line, " reason: {reason}");
    }
    line
}

/// `rollout status` and every rollout command: one `key: value` line per fact.
pub fn render_rollout(view: &Value) -> String {
    let steps: Vec<String> = items(view, "steps")
        .iter()
        .map(|s| percent(Some(s)))
        .collect();
    let mut kv: Vec<(String, String)> = vec![
        ("route".into(), text(view.get("route"))),
        ("state".into(), text(view.get("state"))),
        (
            "step".into(),
            format!(
                "{} of {} [{}]",
                view["step"].as_u64().unwrap_or(0),
                steps.len(),
                steps.join(" → ")
            ),
        ),
        ("weight".into(), percent(view.get("weight"))),
        (
            "bake".into(),
            format!(
                "{:.1}s of {:.1}s baked, {:.1}s left",
                view["baked_s"].as_f64().unwrap_or(0.0),
                view["bake_s"].as_f64().unwrap_or(0.0),
                view["bake_left_s"].as_f64().unwrap_or(0.0)
            ),
        ),
    ];
    if let Some(reason) = view.get("reason").filter(|v| !v.is_null()) {
        kv.push(("reason".into(), text(Some(reason))));
    }
    for g in items(view, "gates") {
        kv.push((
            format!("gate.{}", text(g.get("name"))),
            format!(
                "{} {} ({})",
                if g["pass"] == true { "pass" } else { "HOLD" },
                text(g.get("figure")),
                text(g.get("reason"))
            ),
        ));
    }
    for h in items(view, "history") {
        kv.push((
            "history".into(),
            format!(
                "{} {} by {} → {} step {} weight {}",
                text(h.get("at")),
                text(h.get("event")),
                text(h.get("by")),
                text(h.get("state")),
                h["step"].as_u64().unwrap_or(0),
                percent(h.get("weight"))
            ),
        ));
    }
    key_values(&kv)
}

/// Route and flag names are `[A-Za-z0-9._-]`, so checking the name is all the percent-encoding
/// needed — except `.` and `..`, which URL normalisation anywhere on the way would eat.
fn segment(name: &str) -> Result<&str, CtlError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        return Err(CtlError::BadName(name.to_owned()));
    }
    Ok(match name {
        "." => "%2E",
        ".." => "%2E%2E",
        other => other,
    })
}

/// serde_json writes NaN and infinities as `null`, which the server would report as a
/// confusing type error; say what is wrong here instead.
fn finite(what: &str, v: f64) -> Result<f64, CtlError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(CtlError::BadArgument(format!(
            "{what} must be a number between 0 and 100, not `{v}`"
        )))
    }
}

struct AdminClient {
    /// Scheme, `host:port` and any path prefix the admin API is mounted under, without a
    /// trailing `/`.
    base: String,
    auth: Option<String>,
    http: Outbound,
}

struct Reply {
    url: String,
    etag: Option<String>,
    body: Value,
}

impl AdminClient {
    fn new(args: &CtlArgs) -> Result<Self, CtlError> {
        let admin = args.admin.as_str();
        let bad = |reason: &str| CtlError::BadUrl {
            url: admin.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = admin
            .parse()
            .map_err(|e: http::uri::InvalidUri| CtlError::BadUrl {
                url: admin.to_owned(),
                reason: e.to_string(),
            })?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s,
            Some(_) => return Err(bad("only http:// and https:// are supported")),
            None => return Err(bad("write it as http://HOST:PORT or https://HOST:PORT")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if uri.query().is_some() {
            return Err(bad("a query string has no place in the base URL"));
        }
        let prefix = uri.path().trim_end_matches('/');
        let http = Outbound::new(args.cacert.as_deref(), CALL_TIMEOUT)
            .map_err(|e| CtlError::BadArgument(e.to_string()))?;
        Ok(AdminClient {
            base: format!("{scheme}://{authority}{prefix}"),
            auth: args.token.as_deref().map(|t| format!("Bearer {t}")),
            http,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Result<Reply, CtlError> {
        let url = format!("{}{path}", self.base);
        let network = |e: reqwest::Error| {
            if e.is_timeout() {
                CtlError::Timeout { url: url.clone() }
            } else {
                CtlError::Network {
                    url: url.clone(),
                    reason: error_chain(&e),
                }
            }
        };
        let mut req = self
            .http
            .client()
            .request(method, &url)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("switchyard-ctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth);
        }
        if let Some(tag) = if_match {
            req = req.header(header::IF_MATCH, quote_etag(tag));
        }
        if let Some(v) = &body {
            req = req.json(v);
        }
        // Fails only on a header value the user typed (token, If-Match) that HTTP cannot carry.
        let req = req.build().map_err(|e| {
            CtlError::BadArgument(format!("cannot build the request: {}", error_chain(&e)))
        })?;
        let resp = self.http.client().execute(req).await.map_err(network)?;
        let status = resp.status();
        let etag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.bytes().await.map_err(network)?;

        if !status.is_success() {
            return Err(api_error(status, &bytes, self.auth.is_none()));
        }
        let body = serde_json::from_slice(&bytes).map_err(|e| CtlError::BadJson {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        Ok(Reply { url, etag, body })
    }
}

/// ETags are quoted on the wire; people copy them with or without the quotes.
fn quote_etag(tag: &str) -> String {
    let tag = tag.trim();
    if tag.starts_with('"') || tag.starts_with("W/\"") || tag == "*" {
        tag.to_owned()
    } else {
        format!("\"{tag}\"")
    }
}

/// Reads `{"error": {"code", "message"}}`; anything else (a proxy's HTML page, say) still
/// becomes a readable error rather than a JSON parse failure.
fn api_error(status: StatusCode, body: &[u8], no_token: bool) -> CtlError {
    let parsed: Option<(String, String)> =
        serde_json::from_slice::<Value>(body).ok().and_then(|v| {
            let err = v.get("error")?;
            let code = err.get("code")?.as_str()?.to_owned();
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Some((code, message))
        });
    let (code, mut message) = parsed.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text: String = text.trim().chars().take(200).collect();
        let reason = status.canonical_reason().unwrap_or("unexpected status");
        let message = if text.is_empty() {
            reason.to_owned()
        } else {
            format!("{reason}: {text}")
        };
        (format!("http_{}", status.as_u16()), message)
    });
    if message.is_empty() {
        message = status
            .canonical_reason()
            .unwrap_or("unexpected status")
            .to_owned();
    }
    if status == StatusCode::UNAUTHORIZED && no_token {
        message.push_str(" (no token given: use --token or SWITCHYARD_ADMIN_TOKEN)");
    }
    CtlError::Api {
        status: status.as_u16(),
        code,
        message,
    }
}

// ---- rendering: all of it returns Strings so tests can check it without stdout ----

/// `routes`: NAME SPLIT WEIGHT ACTIVE STATE.
pub fn render_routes(body: &Value) -> String {
    let mut rows = vec![row(&["NAME", "SPLIT", "WEIGHT", "ACTIVE", "STATE"])];
    let mut overridden = false;
    for r in items(body, "routes") {
        let (weight, w_over) = in_force(r.get("weight"), percent);
        let (active, a_over) = in_force(r.get("active"), text);
        overridden |= w_over || a_over;
        rows.push(vec![
            text(r.get("name")),
            text(r.get("split")),
            weight,
            active,
            text(r.get("state")),
        ]);
    }
    let mut out = table(&rows);
    if overridden {
        out.push_str("* runtime override in force\n");
    }
    out
}

/// `route NAME` and every route-changing command: one `key: value` line per fact.
pub fn render_route(route: &Value, etag: Option<&str>) -> String {
    let mut kv: Vec<(String, String)> = vec![
        ("name".into(), text(route.get("name"))),
        ("split".into(), text(route.get("split"))),
        ("legacy".into(), text(route.get("legacy"))),
        ("target".into(), text(route.get("target"))),
    ];
    layered(&mut kv, "weight", route.get("weight"), percent);
    layered(&mut kv, "active", route.get("active"), text);
    if let Some(flag) = route.get("flag").filter(|v| !v.is_null()) {
        kv.push(("flag".into(), text(Some(flag))));
    }
    kv.push(("state".into(), text(route.get("state"))));
    if let Some(rb) = route.get("rollback").filter(|v| !v.is_null()) {
        kv.push(("rollback.at".into(), text(rb.get("at"))));
        kv.push(("rollback.by".into(), text(rb.get("by"))));
        kv.push(("rollback.reason".into(), text(rb.get("reason"))));
    }
    kv.push(("sticky".into(), text(route.get("sticky"))));
    if let Some(health) = route.get("health").filter(|v| v.is_object()) {
        for side in ["legacy", "target"] {
            let f = &health[side];
            let p99 = f["p99_ms"]
                .as_f64()
                .map_or("-".to_string(), |ms| format!("{ms:.1} ms"));
            kv.push((
                format!("health.{side}"),
                format!(
                    "{} requests, {:.1}% errors, p99 {p99} (last {}s)",
                    f["requests"].as_u64().unwrap_or(0),
                    f["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
                    health["window_s"].as_u64().unwrap_or(0)
                ),
            ));
        }
    }
    kv.push(("etag".into(), etag_of(route, etag)));
    key_values(&kv)
}

/// `flags`: NAME PERCENTAGE RULES STICKY.
pub fn render_flags(body: &Value) -> String {
    let mut rows = vec![row(&["NAME", "PERCENTAGE", "RULES", "STICKY"])];
    let mut overridden = false;
    for f in items(body, "flags") {
        let (pct, over) = in_force(f.get("percentage"), percent);
        overridden |= over;
        rows.push(vec![
            text(f.get("name")),
            pct,
            text(f.get("rules")),
            text(f.get("sticky")),
        ]);
    }
    let mut out = table(&rows);
    if overridden {
        out.push_str("* runtime override in force\n");
    }
    out
}

/// `flag NAME` with or without `--percentage`.
pub fn render_flag(flag: &Value, etag: Option<&str>) -> String {
    let mut kv: Vec<(String, String)> = vec![("name".into(), text(flag.get("name")))];
    layered(&mut kv, "percentage", flag.get("percentage"), percent);
    kv.push(("rules".into(), text(flag.get("rules"))));
    kv.push(("sticky".into(), text(flag.get("sticky"))));
    kv.push(("etag".into(), etag_of(flag, etag)));
    key_values(&kv)
}

/// `audit`: AT ACTOR ACTION TARGET OUTCOME CHANGE, newest first as the API sends them.
/// CHANGE says what moved (`weight 25% → 100%`), or for a refusal why it was refused.
pub fn render_audit(body: &Value) -> String {
    let mut rows = vec![row(&[
        "AT", "ACTOR", "ACTION", "TARGET", "OUTCOME", "CHANGE",
    ])];
    for e in items(body, "entries") {
        let change = if e["outcome"] == "refused" {
            text(e.get("detail"))
        } else {
            what_changed(&e["before"], &e["after"])
        };
        rows.push(vec![
            text(e.get("at")),
            text(e.get("actor")),
            text(e.get("action")),
            text(e.get("target")),
            text(e.get("outcome")),
            change,
        ]);
    }
    table(&rows)
}

/// A column of a report table: its header and how one report fills its cell.
type Column = (&'static str, fn(&Value) -> String);

/// A table of the reports under `key`, one column per (header, cell) pair.
fn render_reports(body: &Value, key: &str, columns: &[Column]) -> String {
    let mut rows = vec![columns.iter().map(|(h, _)| (*h).to_owned()).collect()];
    for p in items(body, key) {
        rows.push(columns.iter().map(|(_, cell)| cell(p)).collect());
    }
    table(&rows)
}

/// `sync`: NAME PHASE LAG_P95 CHANGES/S APPLIED CONFLICTS AGE ERROR, rounded for people.
pub fn render_sync(body: &Value) -> String {
    render_reports(
        body,
        "sync",
        &[
            ("NAME", |p| text(p.get("name"))),
            ("PHASE", |p| text(p.get("phase"))),
            ("LAG_P95", |p| rounded(p.get("lag_p95_seconds"), 3, "s")),
            ("CHANGES/S", |p| rounded(p.get("changes_per_second"), 1, "")),
            ("APPLIED", |p| text(p.get("changes_applied"))),
            ("CONFLICTS", |p| text(p.get("conflicts"))),
            ("AGE", aged),
            ("ERROR", |p| text(p.get("last_error"))),
        ],
    )
}

/// `consistency`: NAME RATIO LOWER_BOUND SAMPLED MISMATCHED AGE ERROR, rounded for people.
pub fn render_consistency(body: &Value) -> String {
    render_reports(
        body,
        "consistency",
        &[
            ("NAME", |p| text(p.get("name"))),
            ("RATIO", |p| rounded(p.get("ratio"), 4, "")),
            ("LOWER_BOUND", |p| rounded(p.get("lower_bound"), 4, "")),
            ("SAMPLED", |p| text(p.get("sampled"))),
            ("MISMATCHED", |p| text(p.get("mismatched"))),
            ("AGE", aged),
            ("ERROR", |p| text(p.get("last_error"))),
        ],
    )
}

/// A figure with `places` decimals and a unit; `-` when absent.
fn rounded(v: Option<&Value>, places: usize, unit: &str) -> String {
    v.and_then(Value::as_f64)
        .map_or_else(|| "-".to_owned(), |f| format!("{f:.places$}{unit}"))
}

/// How old a report is, with `(stale)` when its job stopped reporting.
fn aged(p: &Value) -> String {
    let age = rounded(p.get("age_seconds"), 1, "s");
    if p["stale"] == true {
        format!("{age} (stale)")
    } else {
        age
    }
}

/// The facts of a route or flag view that differ between two audit views, as
/// `weight 25% → 100%; state active → rolled_back`; `-` when none did.
fn what_changed(before: &Value, after: &Value) -> String {
    /// A fact's name, where it sits in a view, and how a person reads it.
    type Fact = (
        &'static str,
        &'static [&'static str],
        fn(Option<&Value>) -> String,
    );
    let facts: [Fact; 6] = [
        ("weight", &["weight", "in_force"], percent),
        ("active", &["active", "in_force"], text),
        ("percentage", &["percentage", "in_force"], percent),
        ("state", &["state"], text),
        ("rollout", &["rollout", "state"], text),
        ("step", &["rollout", "step"], text),
    ];
    let at = |v: &Value, path: &[&str]| {
        path.iter()
            .try_fold(v, |v, k| v.get(*k))
            .filter(|v| !v.is_null())
            .cloned()
    };
    let changes: Vec<String> = facts
        .iter()
        .filter_map(|(name, path, show)| {
            let (b, a) = (at(before, path), at(after, path));
            (b != a && (b.is_some() || a.is_some()))
                .then(|| format!("{name} {} → {}", show(b.as_ref()), show(a.as_ref())))
        })
        .collect();
    if changes.is_empty() {
        "-".to_owned()
    } else {
        changes.join("; ")
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// The array under `key`; a body that lacks it renders as an empty table rather than failing,
/// since `--output json` is there for anyone who needs the raw answer.
fn items<'a>(body: &'a Value, key: &str) -> &'a [Value] {
    body.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// A scalar for a table cell: strings unquoted, absent or null as `-`.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Percentages have two decimals at most; `25` reads better than `25.00`.
fn percent(v: Option<&Value>) -> String {
    match v.and_then(Value::as_f64) {
        Some(f) => {
            let s = format!("{f:.2}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            format!("{s}%")
        }
        None => text(v),
    }
}

/// The in-force value of a `{in_force, file, runtime, source}` object, and whether a runtime
/// override is what put it there (shown as a trailing `*`).
fn in_force(layers: Option<&Value>, fmt: fn(Option<&Value>) -> String) -> (String, bool) {
    match layers.filter(|v| !v.is_null()) {
        None => ("-".to_owned(), false),
        Some(l) => {
            let over = l.get("source").and_then(Value::as_str) == Some("runtime");
            let mut s = fmt(l.get("in_force"));
            if over {
                s.push('*');
            }
            (s, over)
        }
    }
}

/// `key.in_force`, `key.source`, `key.file`, `key.runtime` lines; nothing when the route has no
/// such layer (a blue/green route has no weight).
fn layered(
    kv: &mut Vec<(String, String)>,
    key: &str,
    layers: Option<&Value>,
    fmt: fn(Option<&Value>) -> String,
) {
    let Some(l) = layers.filter(|v| !v.is_null()) else {
        return;
    };
    kv.push((format!("{key}.in_force"), fmt(l.get("in_force"))));
    kv.push((format!("{key}.source"), text(l.get("source"))));
    kv.push((format!("{key}.file"), fmt(l.get("file"))));
    let runtime = match l.get("runtime") {
        None | Some(Value::Null) => "none".to_owned(),
        r => fmt(r),
    };
    kv.push((format!("{key}.runtime"), runtime));
}

/// The header is authoritative; the body's copy covers replies without one.
fn etag_of(view: &Value, header: Option<&str>) -> String {
    match header {
        Some(h) => h.to_owned(),
        None => text(view.get("etag")),
    }
}

fn key_values(kv: &[(String, String)]) -> String {
    let width = kv.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in kv {
        let _ = writeln!(out, "{:<width$} {v}", format!("{k}:"));
    }
    out
}

/// Left-aligned columns two spaces apart; the last column is not padded so lines carry no
/// trailing blanks.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::HeaderMap;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, put};
    use tokio::net::TcpListener;

    fn route_view() -> Value {
        json!({
            "name": "users", "legacy": "monolith", "target": "users-v2",
            "split": "percentage",
            "weight": {"in_force": 25.0, "file": 10.0, "runtime": 25.0, "source": "runtime"},
            "active": null, "flag": null, "state": "active", "rollback": null,
            "sticky": "cookie:session_id", "etag": "\"9f2c\""
        })
    }

    fn routes_body() -> Value {
        json!({"routes": [
            route_view(),
            {
                "name": "billing", "legacy": "monolith", "target": "billing-v2",
                "split": "blue_green", "weight": null,
                "active": {"in_force": "legacy", "file": "legacy", "runtime": null, "source": "file"},
                "flag": null, "state": "rolled_back",
                "rollback": {"at": "2026-11-22T05:00:00Z", "by": "ops", "reason": "manual"},
                "sticky": null, "etag": "\"aa\""
            }
        ]})
    }

    fn unauthorized() -> Response {
        (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                json!({"error": {"code": "unauthorized", "message": "missing or bad token"}}),
            ),
        )
            .into_response()
    }

    /// Imitates a few answers of the admin API; checks the token like the real one does.
    async fn fake_server() -> String {
        async fn routes(h: HeaderMap) -> Response {
            if h.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer s3cret") {
                return unauthorized();
            }
            axum::Json(routes_body()).into_response()
        }
        async fn route(h: HeaderMap) -> Response {
            if h.get("authorization").is_none() {
                return unauthorized();
            }
            ([(header::ETAG, "\"9f2c\"")], axum::Json(route_view())).into_response()
        }
        async fn weight(h: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
            if h.get("if-match").and_then(|v| v.to_str().ok()) == Some("\"stale\"") {
                return (
                    StatusCode::PRECONDITION_FAILED,
                    axum::Json(json!({"error": {"code": "precondition_failed", "message": "route changed since ETag \"stale\""}})),
                )
                    .into_response();
            }
            let mut v = route_view();
            v["weight"]["in_force"] = body["weight"].clone();
            v["weight"]["runtime"] = body["weight"].clone();
            ([(header::ETAG, "\"new\"")], axum::Json(v)).into_response()
        }
        async fn not_json() -> Response {
            (StatusCode::OK, "hello").into_response()
        }
        let app = Router::new()
            .route("/v1/routes", get(routes))
            .route("/v1/routes/users", get(route))
            .route("/v1/routes/users/weight", put(weight))
            .route("/v1/flags", get(not_json));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }

    fn args(admin: &str, token: Option<&str>, output: Output, command: CtlCommand) -> CtlArgs {
        CtlArgs {
            admin: admin.to_owned(),
            token: token.map(str::to_owned),
            output,
            cacert: None,
            command,
        }
    }

    #[tokio::test]
    async fn routes_table_and_json_against_fake_server() {
        let base = fake_server().await;
        let a = args(&base, Some("s3cret"), Output::Table, CtlCommand::Routes);
        let out = execute(&a).await.expect("routes");
        assert_eq!(out, render_routes(&routes_body()));
        assert!(out.contains("users"), "{out}");
        assert_eq!(run(a).await, 0);

        let a = args(&base, Some("s3cret"), Output::Json, CtlCommand::Routes);
        let out = execute(&a).await.expect("routes json");
        let back: Value = serde_json::from_str(&out).expect("valid json");
        assert_eq!(back, routes_body());
        assert!(out.contains("\n  "), "pretty-printed: {out}");
    }

    #[tokio::test]
    async fn route_shows_header_etag_and_weight_sends_body() {
        let base = fake_server().await;
        let a = args(
            &base,
            Some("t"),
            Output::Table,
            CtlCommand::Route {
                name: "users".into(),
            },
        );
        let out = execute(&a).await.expect("route");
        assert!(out.contains("etag:"), "{out}");
        assert!(out.contains("\"9f2c\""), "{out}");

        let a = args(
            &base,
            Some("t"),
            Output::Table,
            CtlCommand::Weight {
                name: "users".into(),
                percent: 42.5,
                if_match: Some("9f2c".into()),
            },
        );
        let out = execute(&a).await.expect("weight");
        assert!(out.contains("weight.in_force: 42.5%"), "{out}");
        assert!(out.contains("\"new\""), "{out}");
    }

    #[tokio::test]
    async fn api_errors_carry_code_and_message() {
        let base = fake_server().await;
        let a = args(&base, Some("wrong"), Output::Table, CtlCommand::Routes);
        match execute(&a).await {
            Err(e @ CtlError::Api { status: 401, .. }) => {
                assert_eq!(e.code(), "unauthorized");
                assert_eq!(e.message(), "missing or bad token");
            }
            other => panic!("expected 401, got {other:?}"),
        }
        assert_eq!(run(a).await, 1);

        // Without a token the message says where one comes from.
        let a = args(&base, None, Output::Table, CtlCommand::Routes);
        let e = execute(&a).await.expect_err("401");
        assert!(e.message().contains("SWITCHYARD_ADMIN_TOKEN"), "{e}");

        let a = args(
            &base,
            Some("t"),
            Output::Table,
            CtlCommand::Weight {
                name: "users".into(),
                percent: 5.0,
                if_match: Some("stale".into()),
            },
        );
        let e = execute(&a).await.expect_err("412");
        assert_eq!(e.code(), "precondition_failed");

        // A route the fake does not know: axum's plain 404 has no JSON error body.
        let a = args(
            &base,
            Some("t"),
            Output::Table,
            CtlCommand::Reset {
                name: "nope".into(),
            },
        );
        let e = execute(&a).await.expect_err("404");
        assert_eq!(e.code(), "http_404");

        let a = args(&base, Some("t"), Output::Table, CtlCommand::Flags);
        let e = execute(&a).await.expect_err("not json");
        assert_eq!(e.code(), "bad_response");
    }

    #[tokio::test]
    async fn connection_refused_exits_1() {
        // Bind then drop: the port is very likely closed for the moment the test needs.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let a = args(
            &format!("http://{addr}"),
            Some("t"),
            Output::Table,
            CtlCommand::Routes,
        );
        let e = execute(&a).await.expect_err("refused");
        assert_eq!(e.code(), "unreachable");
        assert!(e.message().to_lowercase().contains("refused"), "{e}");
        assert_eq!(run(a).await, 1);
    }

    #[tokio::test]
    async fn bad_urls_and_names_fail_before_sending() {
        for (url, code) in [
            ("127.0.0.1:9901", "bad_url"),
            ("ftp://x", "bad_url"),
            ("http://", "bad_url"),
        ] {
            let a = args(url, None, Output::Table, CtlCommand::Routes);
            let e = execute(&a).await.expect_err(url);
            assert_eq!(e.code(), code, "{url}: {e}");
        }
        let a = args(
            "http://127.0.0.1:1",
            None,
            Output::Table,
            CtlCommand::Route { name: "a/b".into() },
        );
        assert_eq!(execute(&a).await.expect_err("name").code(), "bad_name");
        let a = args(
            "http://127.0.0.1:1",
            None,
            Output::Table,
            CtlCommand::Weight {
                name: "users".into(),
                percent: f64::NAN,
                if_match: None,
            },
        );
        assert_eq!(execute(&a).await.expect_err("nan").code(), "bad_argument");
    }

    #[test]
    fn routes_table_layout() {
        let out = render_routes(&routes_body());
        let expected = "\
NAME     SPLIT       WEIGHT  ACTIVE  STATE
users    percentage  25%*    -       active
billing  blue_green  -       legacy  rolled_back
* runtime override in force
";
        assert_eq!(out, expected);
    }

    #[test]
    fn route_key_values() {
        let out = render_route(&routes_body()["routes"][1], None);
        let expected = "\
name:            billing
split:           blue_green
legacy:          monolith
target:          billing-v2
active.in_force: legacy
active.source:   file
active.file:     legacy
active.runtime:  none
state:           rolled_back
rollback.at:     2026-11-22T05:00:00Z
rollback.by:     ops
rollback.reason: manual
sticky:          -
etag:            \"aa\"
";
        assert_eq!(out, expected);
    }

    #[test]
    fn flags_and_flag() {
        let flag = json!({"name": "new-search",
            "percentage": {"in_force": 30.0, "file": 10.0, "runtime": 30.0, "source": "runtime"},
            "rules": 1, "sticky": "header:x-user-id", "etag": "\"ff\""});
        let out = render_flags(&json!({"flags": [flag.clone()]}));
        assert_eq!(
            out,
            "NAME        PERCENTAGE  RULES  STICKY\nnew-search  30%*        1      header:x-user-id\n* runtime override in force\n"
        );
        let out = render_flag(&flag, Some("\"hdr\""));
        assert!(out.contains("percentage.file:     10%\n"), "{out}");
        assert!(out.contains("etag:                \"hdr\"\n"), "{out}");
    }

    #[test]
    fn sync_and_consistency_tables_round_for_people() {
        let sync = json!({"sync": [{
            "name": "users", "phase": "stream", "lag_p95_seconds": 0.123456,
            "changes_per_second": 41.666, "changes_applied": 9000, "conflicts": 2,
            "age_seconds": 0.25, "stale": false, "last_error": null
        }]});
        assert_eq!(
            render_sync(&sync),
            "NAME   PHASE   LAG_P95  CHANGES/S  APPLIED  CONFLICTS  AGE   ERROR\n\
             users  stream  0.123s   41.7       9000     2          0.2s  -\n"
        );
        let consistency = json!({"consistency": [{
            "name": "users", "ratio": 0.999876, "lower_bound": 0.99951, "sampled": 12000,
            "mismatched": 1, "age_seconds": 12.0, "stale": true, "last_error": "refused"
        }]});
        assert_eq!(
            render_consistency(&consistency),
            "NAME   RATIO   LOWER_BOUND  SAMPLED  MISMATCHED  AGE            ERROR\n\
             users  0.9999  0.9995       12000    1           12.0s (stale)  refused\n"
        );
    }

    #[test]
    fn audit_table() {
        let body = json!({"entries": [{
            "id": 7, "at": "2026-11-22T05:00:00Z", "actor": "ops", "action": "set_weight",
            "target": "users",
            "before": {"weight": {"in_force": 25.0}, "state": "active"},
            "after": {"weight": {"in_force": 100.0}, "state": "active"},
            "outcome": "applied", "detail": null
        }, {
            "id": 6, "at": "2026-11-22T04:00:00Z", "actor": "ci", "action": "reset",
            "target": "billing", "before": null, "after": null, "outcome": "refused",
            "detail": "route `billing` does not exist"
        }, {
            "id": 5, "at": "2026-11-22T03:00:00Z", "actor": "health", "action": "rollback",
            "target": "users",
            "before": {"weight": {"in_force": 25.5}, "state": "active", "rollout": {"state": "progressing", "step": 2}},
            "after": {"weight": {"in_force": 0.0}, "state": "rolled_back", "rollout": {"state": "rolled_back", "step": 2}},
            "outcome": "applied", "detail": "error_rate"
        }]});
        let out = render_audit(&body);
        let expected = "\
AT                    ACTOR   ACTION      TARGET   OUTCOME  CHANGE
2026-11-22T05:00:00Z  ops     set_weight  users    applied  weight 25% → 100%
2026-11-22T04:00:00Z  ci      reset       billing  refused  route `billing` does not exist
2026-11-22T03:00:00Z  health  rollback    users    applied  weight 25.5% → 0%; state active → rolled_back; rollout progressing → rolled_back
";
        assert_eq!(out, expected);
        assert_eq!(
            render_audit(&json!({})),
            "AT  ACTOR  ACTION  TARGET  OUTCOME  CHANGE\n"
        );
    }

    /// The shape `main.rs` flattens: subcommand names and flags as operators type them.
    #[test]
    fn parses_like_the_cli() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            ctl: CtlArgs,
        }
        let cli = Cli::try_parse_from([
            "ctl",
            "--admin",
            "http://h:1",
            "--token",
            "t",
            "--output",
            "json",
            "weight",
            "users",
            "12.5",
            "--if-match",
            "abc",
        ])
        .expect("parse");
        assert_eq!(cli.ctl.output, Output::Json);
        assert!(matches!(
            cli.ctl.command,
            CtlCommand::Weight { ref name, percent, ref if_match }
                if name == "users" && percent == 12.5 && if_match.as_deref() == Some("abc")
        ));
        let cli = Cli::try_parse_from(["ctl", "switch", "billing", "target"]).expect("switch");
        assert!(matches!(
            cli.ctl.command,
            CtlCommand::Switch {
                side: SideArg::Target,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["ctl", "audit"]).expect("audit");
        assert!(matches!(cli.ctl.command, CtlCommand::Audit { limit: 20 }));
        assert!(Cli::try_parse_from(["ctl", "switch", "billing", "blue"]).is_err());
    }

    #[test]
    fn small_helpers() {
        assert_eq!(percent(Some(&json!(33.333))), "33.33%");
        assert_eq!(percent(Some(&json!(0))), "0%");
        assert_eq!(percent(Some(&json!(100.0))), "100%");
        assert_eq!(quote_etag("abc"), "\"abc\"");
        assert_eq!(quote_etag("\"abc\""), "\"abc\"");
        assert_eq!(segment("..").expect("dots"), "%2E%2E");
        assert!(segment("").is_err());
        assert!(segment("a b").is_err());
    }
}
