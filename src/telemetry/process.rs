//! The standard `process_*` metrics (CPU seconds, resident memory, open and maximum file
//! descriptors, start time), read from `/proc/self` at each scrape. Names and units follow
//! the Prometheus client libraries' process collector, so existing dashboards work.
//! Elsewhere than Linux the collector exports nothing.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self` says about this process, in base units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    /// `None` where `/proc` is missing or unreadable.
    pub fn read() -> Option<ProcessFigures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields = stat_fields(&stat)?;
        // SAFETY: sysconf only reads a constant of the running system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        // proc(5): fields counted from 1; `fields` starts at field 3 (state).
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let cpu_ticks = field(14)? + field(15)?;
        let start_ticks = field(22)?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Some(ProcessFigures {
            cpu_seconds: cpu_ticks as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds,
            max_fds: max_fds(),
            start_time_seconds: boot_time().map(|boot| boot + start_ticks as f64 / ticks),
        })
    }
}

/// The fields after the command name, which is in parentheses and may itself hold spaces
/// and parentheses: everything after the last `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_ascii_whitespace().collect())
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Seconds since the epoch at which the system booted (`btime` in `/proc/stat`).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessFigures::read() else {
            return Ok(());
        };
        ConstCounter::new(p.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent in seconds",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
        ConstGauge::new(p.resident_bytes as i64).encode(encoder.encode_descriptor(
            "process_resident_memory",
            "Resident memory size in bytes",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(p.virtual_bytes as i64).encode(encoder.encode_descriptor(
            "process_virtual_memory",
            "Virtual memory size in bytes",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(p.open_fds as i64).encode(encoder.encode_descriptor(
            "process_open_fds",
            "Number of open file descriptors",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(max) = p.max_fds {
            ConstGauge::new(max as i64).encode(encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some(start) = p.start_time_seconds {
            ConstGauge::new(start).encode(encoder.encode_descriptor(
                "process_start_time",
                "Start time of the process since the Unix epoch in seconds",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_with_parentheses_do_not_shift_fields() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 555 1000 25";
        let fields = stat_fields(stat).unwrap();
        assert_eq!(fields[0], "S");
        assert_eq!(fields[14 - 3], "7");
        assert_eq!(fields[22 - 3], "555");
    }

    #[test]
    fn figures_agree_with_what_the_process_did() {
        let before = ProcessFigures::read().expect("/proc is mounted");
        let files: Vec<std::fs::File> = (0..16)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        // Burn some CPU so the counter moves by a measurable amount.
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = ProcessFigures::read().unwrap();
        assert!(
            after.open_fds >= before.open_fds + 16,
            "{before:?} → {after:?}"
        );
        assert!(
            after.cpu_seconds - before.cpu_seconds >= 0.1,
            "{before:?} → {after:?}"
        );
        assert!(after.resident_bytes > 1 << 20);
        drop(files);
    }
}
