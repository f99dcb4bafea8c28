//! The one value normalisation shared by the sync worker, the sampler and the full check:
//! every value is read as canonical text produced in SQL by the engine that stores it, so two
//! engines agree on a value exactly when their canonical texts are equal byte for byte.
//!
//! Canonical forms (documented in README "Sync"):
//! - booleans `0`/`1`; integers in decimal digits;
//! - decimals: copied at a fixed scale (the larger of the two columns' declared scales),
//!   compared by exact value with trailing fractional zeros removed (`1.50` and `1.5` are
//!   equal, `1.5` and `1.51` are not);
//! - floats: copied as the engine prints them (shortest round-trip text), compared by exact
//!   IEEE-754 value, written `[-]MpE` with the integer significand `M` and the binary exponent
//!   `E` (`x = M × 2^E`), computed in SQL by the same arithmetic on every engine, because
//!   engines print the same double differently. A float4 column is widened to float8, which is
//!   exact, so two float4 columns compare as float4; `0` and `-0` are equal;
//! - timestamps `YYYY-MM-DD HH:MM:SS.ffffff` in UTC (a timestamp without zone is taken as
//!   UTC), dates `YYYY-MM-DD`;
//! - text as stored (compared as UTF-8 bytes, never through a collation); bytes as lower hex;
//! - NULL stays NULL, distinct from ''.
//!
//! A whole row is encoded for hashing by `encode_row` (and `encode_row_sql`, which computes the
//! same bytes in SQL): each value as its byte length in decimal, `:`, and its bytes; NULL as
//! `N`. A reader can split the encoding back into the values it came from (the length says
//! where each value ends, and a length starts with a digit, never `N`), so two different rows
//! never share an encoding, whatever bytes their values hold.

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
    // Compared numbers are recomputed from the text, which casts back exactly.
    let numeric = matches!(pair, Float | Decimal(_)) && purpose == Purpose::Compare;
    if own == Text && pair != Text && engine != Engine::Sqlite && !numeric {
        return match engine {
            Engine::Postgres => format!("({col})::text"),
            _ => format!("CAST({col} AS CHAR)"),
        };
    }
    match engine {
        Engine::Postgres => match pair {
            Bool => format!("(({col})::int)::text"),
            Int => format!("({col})::text"),
            Decimal(_) if purpose == Purpose::Compare => {
                format!("trim_scale(({col})::numeric)::text")
            }
            Decimal(Some(s)) => format!("round(({col})::numeric, {s})::text"),
            Decimal(None) => format!("(({col})::numeric)::text"),
            Float => match purpose {
                Purpose::Copy => format!("(({col})::float8)::text"),
                Purpose::Compare => float_bits_sql(engine, &format!("(({col})::float8)")),
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
            Decimal(_) if purpose == Purpose::Compare => {
                let s = format!("CAST({col} AS CHAR)");
                format!(
                    "CASE WHEN LOCATE('.', {s}) > 0 THEN TRIM(TRAILING '.' FROM TRIM(TRAILING '0' FROM {s})) ELSE {s} END"
                )
            }
            Decimal(Some(s)) => format!("CAST(CAST({col} AS DECIMAL(65,{s})) AS CHAR)"),
            Decimal(None) => format!("CAST({col} AS CHAR)"),
            Float => match purpose {
                // Widened first: MariaDB prints a FLOAT with 6 significant digits.
                Purpose::Copy => format!("CAST(CAST({col} AS DOUBLE) AS CHAR)"),
                Purpose::Compare => float_bits_sql(engine, &format!("CAST({col} AS DOUBLE)")),
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
                // `%!.17g`: 17 significant digits name one double exactly (SQLite's own
                // text conversion keeps 15). Only SQLite pairs with SQLite, so one spelling of
                // a value serves both purposes.
                Float => guarded(format!("printf('%!.17g', {col})")),
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

/// SQL giving the exact value of the float8 expression `x` as `[-]MpE` (`x = M × 2^E`, `M` an
/// integer in [2^52, 2^53) for normal numbers), by the same arithmetic on PostgreSQL and
/// MariaDB: the exponent estimated by a logarithm, then corrected by one step either way so the
/// significand lands in its binade; division by a power of two is exact. Subnormals keep the
/// smallest exponent. PostgreSQL's NaN and infinities are written as PostgreSQL prints them.
pub fn float_bits_sql(engine: Engine, x: &str) -> String {
    let a = format!("ABS({x})");
    let e0 = format!("FLOOR(LN({a}) / LN(2))");
    let m0 = format!("({a} / POWER(2, {e0} - 52))");
    let e = format!(
        "GREATEST(CASE WHEN {m0} >= 9007199254740992 THEN {e0} + 1 WHEN {m0} < 4503599627370496 THEN {e0} - 1 ELSE {e0} END, -1022)"
    );
    let m = format!("({a} / POWER(2, {e} - 52))");
    match engine {
        Engine::Postgres => format!(
            "CASE WHEN {x} IS NULL THEN NULL WHEN {x} = 0 THEN '0' \
             WHEN {x} IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8) THEN ({x})::text \
             ELSE (CASE WHEN {x} < 0 THEN '-' ELSE '' END) || ({m})::bigint::text || 'p' || (({e}) - 52)::bigint::text END"
        ),
        _ => format!(
            "CASE WHEN {x} IS NULL THEN NULL WHEN {x} = 0 THEN '0' \
             ELSE CONCAT(CASE WHEN {x} < 0 THEN '-' ELSE '' END, CAST({m} AS SIGNED), 'p', CAST(({e}) - 52 AS SIGNED)) END"
        ),
    }
}

/// The canonical text of a double as `float_bits_sql` computes it in SQL.
pub fn float_bits(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1u64 << 52) - 1);
    let (m, e) = if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    };
    format!("{}{m}p{e}", if x < 0.0 { "-" } else { "" })
}

/// The injective byte encoding of a row's canonical values (see the module docs).
pub fn encode_row(values: &[Option<String>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        values
            .iter()
            .map(|v| v.as_ref().map_or(1, |s| s.len() + 4))
            .sum(),
    );
    for v in values {
        match v {
            Some(s) => {
                out.extend_from_slice(s.len().to_string().as_bytes());
                out.push(b':');
                out.extend_from_slice(s.as_bytes());
            }
            None => out.push(b'N'),
        }
    }
    out
}

/// SQL computing `encode_row` of the canonical expressions `exprs` on `engine` (PostgreSQL
/// and MariaDB; SQLite rows are encoded in Rust).
pub fn encode_row_sql(engine: Engine, exprs: &[String]) -> String {
    match engine {
        Engine::Postgres => exprs
            .iter()
            .map(|x| format!("coalesce(octet_length({x})::text || ':' || {x}, 'N')"))
            .collect::<Vec<_>>()
            .join(" || "),
        _ => format!(
            "CONCAT({})",
            exprs
                .iter()
                .map(|x| format!("COALESCE(CONCAT(LENGTH({x}), ':', {x}), 'N')"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Splits an encoding back into values: the inverse of `encode_row`, which is what makes the
/// encoding injective.
pub fn decode_row(mut bytes: &[u8]) -> Option<Vec<Option<String>>> {
    let mut out = Vec::new();
    while let Some(&first) = bytes.first() {
        if first == b'N' {
            out.push(None);
            bytes = &bytes[1..];
            continue;
        }
        let colon = bytes.iter().position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
        let rest = &bytes[colon + 1..];
        let value = rest.get(..len)?;
        out.push(Some(String::from_utf8(value.to_vec()).ok()?));
        bytes = &rest[len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_encoding_tells_apart_what_separators_would_join() {
        // The full-check case: ('x' || chr(31), 'y') against ('x', chr(31) || 'y').
        let a = vec![
            Some("1".to_string()),
            Some("x\u{1f}".into()),
            Some("y".into()),
        ];
        let b = vec![
            Some("1".to_string()),
            Some("x".into()),
            Some("\u{1f}y".into()),
        ];
        assert_ne!(encode_row(&a), encode_row(&b));
        let cases: Vec<Vec<Option<String>>> = vec![
            vec![None, Some(String::new())],
            vec![Some(String::new()), None],
            vec![Some("N".into()), None],
            vec![None, Some("N".into())],
            vec![Some("1:a".into())],
            vec![Some("1".into()), Some("a".into())],
            vec![Some("\u{1e}".into())],
            vec![None],
            vec![Some("é:".into()), Some("".into())],
            a,
            b,
        ];
        for (i, x) in cases.iter().enumerate() {
            assert_eq!(
                decode_row(&encode_row(x)).as_ref(),
                Some(x),
                "round trip of {x:?}"
            );
            for y in &cases[i + 1..] {
                if x != y {
                    assert_ne!(encode_row(x), encode_row(y), "{x:?} vs {y:?}");
                }
            }
        }
    }

    #[test]
    fn float_bits_are_exact_values() {
        assert_eq!(float_bits(1.0), "4503599627370496p-52");
        assert_eq!(float_bits(-0.0), "0");
        assert_eq!(float_bits(0.5), "4503599627370496p-53");
        let x = 1_700_000_000.123456_f64;
        let next = f64::from_bits(x.to_bits() + 1);
        assert_ne!(float_bits(x), float_bits(next));
        // Independent reading: M × 2^E is the value itself.
        let text = float_bits(x);
        let (m, e) = text.split_once('p').unwrap();
        let (m, e): (f64, i32) = (m.parse().unwrap(), e.parse().unwrap());
        assert_eq!(m * 2f64.powi(e), x);
        assert_eq!(float_bits(f64::from_bits(1)), "1p-1074");
    }

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
