//! The one value normalisation shared by the sync worker, the sampler and the full check:
//! every value is read as canonical text produced in SQL by the engine that stores it, so two
//! engines agree on a value exactly when their canonical texts are equal byte for byte.
//!
//! Canonical forms (documented in README "Sync"):
//! - booleans `0`/`1`; integers in decimal digits;
//! - decimals at a fixed scale: the larger of the two columns' declared scales;
//! - floats: as the engine prints them when copying (lossless), at 6 decimal places when
//!   comparing, because engines print the same double differently;
//! - timestamps `YYYY-MM-DD HH:MM:SS.ffffff` in UTC (a timestamp without zone is taken as
//!   UTC), dates `YYYY-MM-DD`;
//! - text as stored (compared as UTF-8 bytes, never through a collation); bytes as lower hex;
//! - NULL stays NULL, distinct from ''.

use super::engine::Engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    /// Declared scale, when the type declares one.
    Decimal(Option<u32>),
    Float,
    Timestamp,
    TimestampTz,
    Date,
    Text,
    Bytes,
}

/// Why a value is read: copying must not lose anything, comparing must not see differences
/// that are only in how an engine prints a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Copy,
    Compare,
}

fn scale_of(decl: &str) -> Option<u32> {
    let inner = decl.split_once('(')?.1.split_once(')')?.0;
    let (_, s) = inner.split_once(',')?;
    s.trim().parse().ok()
}

impl Kind {
    /// Classifies a declared column type.
    pub fn of_declared(engine: Engine, decl: &str) -> Kind {
        let d = decl.to_ascii_lowercase();
        let d = d.trim();
        match engine {
            Engine::Postgres => match d {
                "boolean" => Kind::Bool,
                "smallint" | "integer" | "bigint" => Kind::Int,
                "real" | "double precision" => Kind::Float,
                "date" => Kind::Date,
                "bytea" => Kind::Bytes,
                _ if d.starts_with("numeric") => Kind::Decimal(scale_of(d)),
                _ if d.starts_with("timestamp") && d.contains("with time zone") => {
                    if d.contains("without") {
                        Kind::Timestamp
                    } else {
                        Kind::TimestampTz
                    }
                }
                _ if d.starts_with("timestamp") => Kind::Timestamp,
                _ => Kind::Text,
            },
            Engine::MySql => {
                let base = d.split(['(', ' ']).next().unwrap_or_default();
                match base {
                    "tinyint" if d.starts_with("tinyint(1)") => Kind::Bool,
                    "bool" | "boolean" => Kind::Bool,
                    "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => {
                        Kind::Int
                    }
                    "decimal" | "numeric" => Kind::Decimal(scale_of(d).or(Some(0))),
                    "float" | "double" | "real" => Kind::Float,
                    "datetime" => Kind::Timestamp,
                    "timestamp" => Kind::TimestampTz,
                    "date" => Kind::Date,
                    "blob" | "tinyblob" | "mediumblob" | "longblob" | "binary" | "varbinary" => {
                        Kind::Bytes
                    }
                    _ => Kind::Text,
                }
            }
            // SQLite's affinity rules, refined by the names people write for dates and money.
            Engine::Sqlite => {
                if d.contains("bool") {
                    Kind::Bool
                } else if d.contains("int") {
                    Kind::Int
                } else if d.contains("timestamp") || d.contains("datetime") {
                    Kind::Timestamp
                } else if d == "date" {
                    Kind::Date
                } else if d.contains("char") || d.contains("clob") || d.contains("text") {
                    Kind::Text
                } else if d.contains("blob") {
                    Kind::Bytes
                } else if d.contains("real") || d.contains("floa") || d.contains("doub") {
                    Kind::Float
                } else if d.contains("dec") || d.contains("numeric") {
                    Kind::Decimal(scale_of(d))
                } else {
                    Kind::Text
                }
            }
        }
    }

    /// The kind both sides of a mapped column are compared as, or `None` when values of
    /// `source` cannot be stored in `target` without changing meaning.
    pub fn pair(source: Kind, target: Kind) -> Option<Kind> {
        use Kind::*;
        Some(match (source, target) {
            (a, b) if a == b => a,
            (Decimal(a), Decimal(b)) => Decimal(a.max(b)),
            (Bool, Int) | (Int, Bool) => Bool,
            (Int, Decimal(s)) | (Decimal(s), Int) => Decimal(s),
            (Int | Decimal(_), Float) | (Float, Decimal(_)) => Float,
            (Timestamp, TimestampTz) | (TimestampTz, Timestamp) => TimestampTz,
            (Bytes, _) | (_, Bytes) => return None,
            // Text holds anything written in canonical form; the richer side decides.
            (a, Text) => a,
            (Text, _) => return None,
            _ => return None,
        })
    }

    pub fn name(self) -> String {
        match self {
            Kind::Bool => "boolean".into(),
            Kind::Int => "integer".into(),
            Kind::Decimal(Some(s)) => format!("decimal(scale {s})"),
            Kind::Decimal(None) => "decimal".into(),
            Kind::Float => "float".into(),
            Kind::Timestamp => "timestamp".into(),
            Kind::TimestampTz => "timestamp with time zone".into(),
            Kind::Date => "date".into(),
            Kind::Text => "text".into(),
            Kind::Bytes => "bytes".into(),
        }
    }
}

/// SQL producing the canonical text of column expression `col` on `engine`. `own` is the
/// column's own kind, `pair` the kind both sides are compared as.
pub fn canon_sql(engine: Engine, col: &str, own: Kind, pair: Kind, purpose: Purpose) -> String {
    use Kind::*;
    // A text column on a typed engine holds what we wrote into it: canonical already.
    if own == Text && pair != Text && engine != Engine::Sqlite {
        return match engine {
            Engine::Postgres => format!("({col})::text"),
            _ => format!("CAST({col} AS CHAR)"),
        };
    }
    match engine {
        Engine::Postgres => match pair {
            Bool => format!("(({col})::int)::text"),
            Int => format!("({col})::text"),
            Decimal(Some(s)) => format!("round(({col})::numeric, {s})::text"),
            Decimal(None) => format!("(({col})::numeric)::text"),
            Float => match purpose {
                Purpose::Copy => format!("(({col})::float8)::text"),
                Purpose::Compare => format!("round(({col})::numeric, 6)::text"),
            },
            Timestamp | TimestampTz => {
                if own == TimestampTz {
                    format!("to_char(({col}) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
                } else {
                    format!("to_char({col}, 'YYYY-MM-DD HH24:MI:SS.US')")
                }
            }
            Date => format!("to_char({col}, 'YYYY-MM-DD')"),
            Text => format!("({col})::text"),
            Bytes => format!("encode({col}, 'hex')"),
        },
        Engine::MySql => match pair {
            Bool | Int => format!("CAST({col} AS CHAR)"),
            Decimal(Some(s)) => format!("CAST(CAST({col} AS DECIMAL(65,{s})) AS CHAR)"),
            Decimal(None) => format!("CAST({col} AS CHAR)"),
            Float => match purpose {
                Purpose::Copy => format!("CAST({col} AS CHAR)"),
                Purpose::Compare => format!("CAST(CAST({col} AS DECIMAL(65,6)) AS CHAR)"),
            },
            // Sessions run in UTC (see engine::Session), so TIMESTAMP columns read as UTC.
            Timestamp | TimestampTz => format!("DATE_FORMAT({col}, '%Y-%m-%d %H:%i:%s.%f')"),
            Date => format!("DATE_FORMAT({col}, '%Y-%m-%d')"),
            Text => format!("CAST({col} AS CHAR)"),
            Bytes => format!("LOWER(HEX({col}))"),
        },
        Engine::Sqlite => {
            let guarded = |e: String| format!("CASE WHEN {col} IS NULL THEN NULL ELSE {e} END");
            match pair {
                Bool | Int => format!("CAST(CAST({col} AS INTEGER) AS TEXT)"),
                Decimal(Some(s)) => guarded(format!("printf('%.{s}f', {col})")),
                Decimal(None) => format!("CAST({col} AS TEXT)"),
                Float => match purpose {
                    Purpose::Copy => format!("CAST({col} AS TEXT)"),
                    Purpose::Compare => guarded(format!("printf('%.6f', {col})")),
                },
                // SQLite stores timestamps as text in several spellings; one is chosen here.
                Timestamp | TimestampTz => format!(
                    "CASE WHEN {col} IS NULL THEN NULL \
                     WHEN instr({col}, '.') > 0 THEN substr(replace(replace({col}, 'T', ' '), 'Z', '') || '000000', 1, 26) \
                     ELSE substr(replace({col}, 'T', ' '), 1, 19) || '.000000' END"
                ),
                Date => format!("substr({col}, 1, 10)"),
                Text => format!("CAST({col} AS TEXT)"),
                Bytes => format!("lower(hex({col}))"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types() {
        assert_eq!(Kind::of_declared(Engine::MySql, "tinyint(1)"), Kind::Bool);
        assert_eq!(Kind::of_declared(Engine::MySql, "tinyint(4)"), Kind::Int);
        assert_eq!(
            Kind::of_declared(Engine::MySql, "decimal(10,2)"),
            Kind::Decimal(Some(2))
        );
        assert_eq!(
            Kind::of_declared(Engine::MySql, "datetime(6)"),
            Kind::Timestamp
        );
        assert_eq!(
            Kind::of_declared(Engine::Postgres, "timestamp(6) with time zone"),
            Kind::TimestampTz
        );
        assert_eq!(
            Kind::of_declared(Engine::Postgres, "timestamp without time zone"),
            Kind::Timestamp
        );
        assert_eq!(
            Kind::of_declared(Engine::Postgres, "numeric(12,3)"),
            Kind::Decimal(Some(3))
        );
        assert_eq!(
            Kind::of_declared(Engine::Postgres, "character varying(20)"),
            Kind::Text
        );
        assert_eq!(Kind::of_declared(Engine::Sqlite, "BOOLEAN"), Kind::Bool);
        assert_eq!(
            Kind::of_declared(Engine::Sqlite, "DATETIME"),
            Kind::Timestamp
        );
        assert_eq!(Kind::of_declared(Engine::Sqlite, "VARCHAR(3)"), Kind::Text);
    }

    #[test]
    fn pairs() {
        assert_eq!(Kind::pair(Kind::Bool, Kind::Bool), Some(Kind::Bool));
        assert_eq!(Kind::pair(Kind::Int, Kind::Bool), Some(Kind::Bool));
        assert_eq!(
            Kind::pair(Kind::Decimal(Some(2)), Kind::Decimal(Some(4))),
            Some(Kind::Decimal(Some(4)))
        );
        assert_eq!(
            Kind::pair(Kind::Timestamp, Kind::Text),
            Some(Kind::Timestamp)
        );
        assert_eq!(Kind::pair(Kind::Text, Kind::Int), None);
        assert_eq!(Kind::pair(Kind::Bytes, Kind::Text), None);
        assert_eq!(Kind::pair(Kind::Timestamp, Kind::Int), None);
    }
}
