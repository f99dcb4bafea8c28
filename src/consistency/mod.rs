//! How far the two sides of a sync pair agree: the continuous sampler (figures over a window,
//! gates read its lower confidence bound) and the full check (checksum bisection pushed into
//! SQL). Both read values through the one normalisation in `sync::canon` (purpose Compare), so
//! they agree with each other and with what the worker writes. Read-only, except `--repair`,
//! which re-queues keys through the sync worker's own capture table.

pub mod check;
pub mod sampler;

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::lifecycle::Shutdown;
use crate::sync::SyncError;
use crate::telemetry::{Feeds, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum ConsistencyError {
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("{what}: {source}")]
    Query { what: String, source: sqlx::Error },
}

pub(crate) fn query_err(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> ConsistencyError {
    let what = what.into();
    move |source| ConsistencyError::Query { what, source }
}

/// Wilson score interval, lower end at 95%: a ratio measured on few samples is not trusted
/// as much as the same ratio on many.
pub fn wilson_lower(matched: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let z = 1.96_f64;
    let n = n as f64;
    let p = matched as f64 / n;
    let denom = 1.0 + z * z / n;
    let centre = p + z * z / (2.0 * n);
    let spread = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt();
    ((centre - spread) / denom).clamp(0.0, 1.0)
}

/// Whether `samples` are enough for a low lower bound to mean low agreement: the Wilson lower
/// bound of a perfect sample reaches `limit` only from about z²·limit/(1−limit) samples
/// (3,838 for 0.999); fewer samples always give a lower bound below the limit.
pub fn enough_to_judge(samples: u64, limit: f64) -> bool {
    if limit >= 1.0 {
        return samples > 0;
    }
    let z2 = 1.96_f64 * 1.96;
    samples as f64 >= (z2 * limit / (1.0 - limit)).ceil()
}

/// The 60-bit checksum of one row's canonical values: the first 60 bits of SHA-256 over the
/// row's injective encoding (`sync::canon::encode_row`). SQL computes the same per engine.
pub fn row_hash(values: &[Option<String>]) -> i64 {
    let d = Sha256::digest(crate::sync::canon::encode_row(values));
    (u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]) >> 4) as i64
}

/// Starts one sampler per `consistency:` entry.
pub fn start_all(
    config: &Config,
    feeds: &Feeds,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    config
        .consistency
        .iter()
        .filter_map(|c| {
            let spec = config.sync.iter().find(|s| s.name == c.sync)?.clone();
            Some(
                sampler::Sampler::new(spec, c.clone(), feeds.clone(), metrics.clone())
                    .start(shutdown.clone()),
            )
        })
        .collect()
}

/// `switchyard consistency check`: one full comparison; prints the report (text or JSON) and
/// returns whether the pair is equal. `repair` re-queues every differing key through the sync
/// worker, which must be running to apply them.
pub async fn check_command(
    config: &Config,
    sync: &str,
    repair: bool,
    json: bool,
) -> Result<bool, ConsistencyError> {
    let spec = crate::sync::find(config, sync)?;
    let plan = crate::sync::plan::resolve(spec, crate::sync::engine::Session::Reader).await?;
    let mut report = check::check(&plan).await?;
    if repair && !report.equal {
        let mut keys: Vec<Vec<String>> = report.missing_in_target.clone();
        keys.extend(report.extra_in_target.iter().cloned());
        keys.extend(report.different.iter().map(|d| d.key.clone()));
        report.requeued = Some(crate::sync::apply::requeue(&plan, &keys).await?);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!(
            "sync `{}`: {} ({} rows compared in {:.2}s)",
            report.sync,
            if report.equal {
                "consistent"
            } else {
                "NOT consistent"
            },
            report.rows_compared,
            report.seconds
        );
        for k in &report.missing_in_target {
            println!("  missing in target: {}", k.join(", "));
        }
        for k in &report.extra_in_target {
            println!("  extra in target:   {}", k.join(", "));
        }
        for d in &report.different {
            println!(
                "  different:         {} ({})",
                d.key.join(", "),
                d.columns.join(", ")
            );
        }
        if let Some(n) = report.requeued {
            println!("  re-queued {n} keys through the sync worker");
        }
    }
    Ok(report.equal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_bound_grows_with_samples() {
        assert_eq!(wilson_lower(0, 0), 0.0);
        let few = wilson_lower(10, 10);
        let many = wilson_lower(10_000, 10_000);
        assert!(few < 0.75, "{few}");
        assert!(many > 0.999, "{many}");
        assert!(wilson_lower(990, 1000) < 0.99);
    }

    #[test]
    fn judging_needs_enough_samples() {
        assert!(!enough_to_judge(100, 0.999));
        assert!(enough_to_judge(3838, 0.999));
        assert!(enough_to_judge(381, 0.99));
        // Just enough: a perfect sample of that size passes the limit.
        let n = (1.96_f64 * 1.96 * 0.99 / 0.01).ceil() as u64;
        assert!(wilson_lower(n, n) >= 0.99 - 1e-3);
    }

    #[test]
    fn row_hash_is_stable_and_null_is_not_empty() {
        let a = row_hash(&[Some("1".into()), Some("x".into())]);
        assert_eq!(a, row_hash(&[Some("1".into()), Some("x".into())]));
        assert_ne!(
            row_hash(&[Some("1".into()), None]),
            row_hash(&[Some("1".into()), Some(String::new())])
        );
        // sha256("1:11:x") = 568ae206bb8f84df…, computed independently (sha256sum).
        assert_eq!(format!("{a:015x}"), "568ae206bb8f84d");
    }
}
