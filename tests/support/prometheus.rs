//! A real Prometheus server (Debian's `prometheus` package) on an ephemeral loopback port,
//! scraping switchyard's admin listener, and queries through its HTTP API.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the binaries are: on PATH, or `PROMETHEUS` / `PROMTOOL` when set.
pub fn binary(name: &str) -> Option<PathBuf> {
    let var = name.to_ascii_uppercase();
    if let Some(path) = std::env::var_os(&var) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// Like `binary`, and says why the test is skipped when it is missing.
pub fn binary_or_skip(name: &str) -> Option<PathBuf> {
    let found = binary(name);
    if found.is_none() {
        eprintln!(
            "SKIPPED: no `{name}` on PATH (Debian package `prometheus`; .ci/run installs it)"
        );
    }
    found
}

/// Runs `promtool check metrics` on an exposition; `Ok` when it reports nothing.
pub fn check_metrics(promtool: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && report.trim().is_empty() {
        Ok(())
    } else {
        Err(report)
    }
}

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts a server scraping `target` (an admin listener) every `interval`.
    pub fn start(binary: &std::path::Path, target: SocketAddr, interval: Duration) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let every = format!("{}ms", interval.as_millis());
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: {every}, evaluation_interval: {every} }}\n\
scrape_configs:\n  - job_name: switchyard\n    static_configs: [ {{ targets: [\"{target}\"] }} ]\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start prometheus");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        // The web component logs the address it bound once it listens.
        let addr = loop {
            let line = lines
                .next()
                .expect("prometheus exited before listening")
                .unwrap();
            if line.contains("msg=\"Listening on\"")
                && let Some(addr) = line.split("address=").nth(1)
            {
                break addr.trim().parse().expect("an address");
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Waits until the server answers queries (its storage opens after it listens).
    pub async fn ready(&self) {
        let url = format!("http://{}/-/ready", self.addr);
        super::eventually(Duration::from_secs(30), "prometheus ready", || async {
            super::get(&url, &[]).await.0 == 200
        })
        .await;
    }

    /// An instant query; the `data.result` array.
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(promql)
        );
        let (status, _, body) = super::get(&url, &[]).await;
        assert_eq!(status, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that yields one sample, or `None` when it yields nothing.
    pub async fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await;
        let sample = result.first()?;
        sample["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
