//! What the demo shows: a live block redrawn in place on a terminal, plain progress lines
//! otherwise (one a second, and one per event), and the final summary table. It formats only;
//! the figures come from `mod.rs`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// One moment of the run, as the live view shows it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub elapsed: Duration,
    pub state: String,
    pub step: usize,
    pub steps: usize,
    pub weight: f64,
    /// What happens next, in words: `bake left 4.2 s`, `fault in 12.0 s`.
    pub next: String,
    pub legacy_rps: f64,
    pub target_rps: f64,
    pub error_rate: f64,
    pub p99: Option<Duration>,
    pub sync_lag: Option<f64>,
    /// `(lower confidence bound, sampled)` when the sampler reports the pair: the figure the
    /// `min_consistency` gate reads.
    pub consistency: Option<(f64, u64)>,
    /// Gates that do not hold, with their reasons.
    pub holding: Vec<String>,
}

pub struct View {
    tty: bool,
    drawn: usize,
    last_line: Option<Instant>,
    last_key: String,
}

pub fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "–".into(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0),
    )
}

pub fn consistency_text(c: Option<(f64, u64)>) -> String {
    c.map_or_else(
        || "–".into(),
        |(lower, sampled)| format!("≥ {lower:.4} ({sampled} sampled)"),
    )
}

impl View {
    pub fn new() -> View {
        View {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            last_line: None,
            last_key: String::new(),
        }
    }

    fn clear(&mut self, out: &mut impl Write) {
        if self.drawn > 0 {
            // Up over the block, then erase to the end of the screen.
            let _ = write!(out, "\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    /// A line that stays: printed above the live block.
    pub fn event(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        self.clear(&mut out);
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    pub fn status(&mut self, s: &Status) {
        let holding = if s.holding.is_empty() {
            "–".to_string()
        } else {
            s.holding.join("; ")
        };
        let lag = s
            .sync_lag
            .map_or_else(|| "–".into(), |l| format!("{:.0} ms", l * 1000.0));
        let mut out = std::io::stdout().lock();
        if self.tty {
            self.clear(&mut out);
            let lines = [
                format!(
                    "  users  {}  step {}/{}  weight {}%  {}   [{:.0}s]",
                    s.state,
                    s.step.min(s.steps),
                    s.steps,
                    s.weight,
                    s.next,
                    s.elapsed.as_secs_f64()
                ),
                format!(
                    "  req/s  legacy {:>6.0}   target {:>6.0}   errors {:.2}%   p99 {}",
                    s.legacy_rps,
                    s.target_rps,
                    s.error_rate * 100.0,
                    ms(s.p99)
                ),
                format!(
                    "  sync lag {lag}   consistency {}",
                    consistency_text(s.consistency)
                ),
                format!("  holding: {holding}"),
            ];
            for l in &lines {
                let _ = writeln!(out, "{l}");
            }
            self.drawn = lines.len();
        } else {
            let key = format!("{}:{}", s.state, s.step);
            let due = self
                .last_line
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if !due && key == self.last_key {
                return;
            }
            self.last_key = key;
            self.last_line = Some(Instant::now());
            let _ = writeln!(
                out,
                "[{:5.1}s] {} step {}/{} weight {}% {} | req/s legacy {:.0} target {:.0} | errors {:.2}% p99 {} | sync lag {lag} | consistency {} | holding: {holding}",
                s.elapsed.as_secs_f64(),
                s.state,
                s.step.min(s.steps),
                s.steps,
                s.weight,
                s.next,
                s.legacy_rps,
                s.target_rps,
                s.error_rate * 100.0,
                ms(s.p99),
                consistency_text(s.consistency),
            );
        }
        let _ = out.flush();
    }

    /// Removes the live block before the summary.
    pub fn finish(&mut self) {
        let mut out = std::io::stdout().lock();
        self.clear(&mut out);
        let _ = out.flush();
    }
}

impl Default for View {
    fn default() -> View {
        View::new()
    }
}

/// One row of the summary table.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub seconds: f64,
    pub legacy: u64,
    pub target: u64,
    pub errors: u64,
    pub p99: Option<Duration>,
    pub lag_p95: Option<f64>,
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "  {:<18} {:>7} {:>9} {:>9} {:>7} {:>10} {:>13}\n",
        "phase", "time", "legacy", "target", "errors", "p99", "sync lag p95"
    );
    for r in rows {
        out.push_str(&format!(
            "  {:<18} {:>6.1}s {:>9} {:>9} {:>7} {:>10} {:>13}\n",
            r.label,
            r.seconds,
            r.legacy,
            r.target,
            r.errors,
            ms(r.p99),
            r.lag_p95
                .map_or_else(|| "–".into(), |l| format!("{:.0} ms", l * 1000.0)),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_phase() {
        let t = table(&[Row {
            label: "5%".into(),
            seconds: 2.5,
            legacy: 300,
            target: 15,
            errors: 0,
            p99: Some(Duration::from_millis(3)),
            lag_p95: None,
        }]);
        assert_eq!(t.lines().count(), 2);
        assert!(t.contains("3.0 ms"), "{t}");
    }
}
