//! Logging setup: text for people at a terminal, JSON lines for log pipelines.
//!
//! The JSON format is our own rather than tracing-subscriber's so that every field is a
//! JSON value (numbers stay numbers, a declared field that got no value is `null`, never
//! `"None"`), and so the Rust module an event comes from is `module`: in switchyard's
//! vocabulary `target` is the side a route migrates to, and a log line may carry it.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as `info` or
/// `switchyard=debug`; `RUST_LOG` wins when set so an operator can override a unit file.
pub fn init(format: Option<LogFormat>, level: &str) {
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore the error it returns.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
    };
}

/// One JSON object per event: `timestamp` (RFC 3339, UTC), `level`, `module`, `message`,
/// then the event's own fields by name.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let line = json_line(event, std::time::SystemTime::now());
        writeln!(writer, "{line}")
    }
}

fn json_line(event: &Event<'_>, now: std::time::SystemTime) -> Value {
    let meta = event.metadata();
    let mut fields = JsonFields(Map::new());
    fields.0.insert(
        "timestamp".into(),
        humantime::format_rfc3339_micros(now).to_string().into(),
    );
    fields
        .0
        .insert("level".into(), meta.level().as_str().into());
    fields.0.insert("module".into(), meta.target().into());
    // Every field the call site declares is present; one that recorded nothing (an
    // `Option` that was `None`) stays null.
    for field in meta.fields() {
        fields.0.insert(field.name().into(), Value::Null);
    }
    event.record(&mut fields);
    Value::Object(fields.0)
}

struct JsonFields(Map<String, Value>);

impl JsonFields {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().into(), value);
    }
}

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // NaN and infinities are not JSON numbers.
        let value = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.put(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.put(field, text.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_are_json_values_and_target_is_ours() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLines)
            .finish();
        let absent: Option<&str> = None;
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                https_addr = absent.map(tracing::field::display),
                routes = 3u64,
                ratio = 0.25,
                ready = true,
                target = "users-v2",
                request_id = "abc",
                "switchyard is serving"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["https_addr"], Value::Null, "{line}");
        assert_eq!(line["routes"], 3, "{line}");
        assert_eq!(line["ratio"], 0.25, "{line}");
        assert_eq!(line["ready"], true, "{line}");
        assert_eq!(line["target"], "users-v2", "{line}");
        assert_eq!(line["request_id"], "abc", "{line}");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "switchyard is serving");
        assert_eq!(line["module"], module_path!());
        assert!(
            humantime::parse_rfc3339(line["timestamp"].as_str().unwrap()).is_ok(),
            "{line}"
        );
        assert!(!text.contains("None"));
    }
}
