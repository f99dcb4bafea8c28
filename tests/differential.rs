//! The differential test of the data side: random tables (many column types, single and
//! composite keys, a unique column) and random workloads (inserts, updates, deletes, key
//! changes, swaps of unique values, multi-statement transactions) on PostgreSQL→PostgreSQL,
//! MariaDB→PostgreSQL, PostgreSQL→MariaDB and SQLite→SQLite. After the worker settles, the
//! tables must be equal by the test's own reading (each engine's own casts, normalised here),
//! and the full check must say consistent; then one cell changed on either side must be found
//! by the full check (exactly that key) and by the sampler.
//!
//! Cases per engine pair: `SWITCHYARD_DIFF_CASES` (default 2, for CI); a longer run is
//! `SWITCHYARD_DIFF_CASES=200 cargo test --test differential`. Failing seeds are kept in
//! `tests/differential.proptest-regressions` and replayed first.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use support::db::{Kind, TestDb};
use support::{Switchyard, admin_call, eventually, write_config};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Int,
    Big,
    Num,
    F8,
    F4,
    Text,
    Varchar,
    Bool,
    Date,
    Ts,
    Tstz,
    Json,
    Uuid,
    Bytes,
}

const ALL_TYPES: [Ty; 14] = [
    Ty::Int,
    Ty::Big,
    Ty::Num,
    Ty::F8,
    Ty::F4,
    Ty::Text,
    Ty::Varchar,
    Ty::Bool,
    Ty::Date,
    Ty::Ts,
    Ty::Tstz,
    Ty::Json,
    Ty::Uuid,
    Ty::Bytes,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyShape {
    Int,
    Text,
    IntText,
}

#[derive(Debug, Clone)]
struct Schema {
    key: KeyShape,
    cols: Vec<Ty>,
    /// Index into `cols` of a UNIQUE column.
    unique: Option<usize>,
}

#[derive(Debug, Clone)]
enum Op {
    Insert,
    Update { col: usize },
    Delete,
    ChangeKey,
    SwapUnique,
}

#[derive(Debug, Clone)]
struct Case {
    schema: Schema,
    initial: usize,
    txns: Vec<Vec<Op>>,
    seed: u64,
    change_target: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Val {
    I(i64),
    /// Thousandths.
    Num(i64),
    F8(f64),
    F4(f32),
    S(String),
    B(bool),
    /// Microseconds since the epoch.
    Tstz(i64),
    Bytes(Vec<u8>),
}

type Key = (i64, String);

#[derive(Debug, Clone)]
struct Row {
    key: Key,
    vals: Vec<Option<Val>>,
}

fn schema_strategy(types: Vec<Ty>) -> impl Strategy<Value = Schema> {
    (
        prop_oneof![
            Just(KeyShape::Int),
            Just(KeyShape::Text),
            Just(KeyShape::IntText)
        ],
        proptest::collection::vec(proptest::sample::select(types), 1..6),
        any::<Option<prop::sample::Index>>(),
    )
        .prop_map(|(key, cols, u)| {
            let candidates: Vec<usize> = (0..cols.len())
                .filter(|i| matches!(cols[*i], Ty::Int | Ty::Big | Ty::Varchar))
                .collect();
            let unique = u.and_then(|ix| {
                (!candidates.is_empty()).then(|| candidates[ix.index(candidates.len())])
            });
            Schema { key, cols, unique }
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Insert),
        4 => (0usize..6).prop_map(|col| Op::Update { col }),
        2 => Just(Op::Delete),
        2 => Just(Op::ChangeKey),
        2 => Just(Op::SwapUnique),
    ]
}

fn case_strategy(types: Vec<Ty>) -> impl Strategy<Value = Case> {
    (
        schema_strategy(types),
        0usize..12,
        proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..5), 0..10),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(schema, initial, txns, seed, change_target)| Case {
            schema,
            initial,
            txns,
            seed,
            change_target,
        })
}

// ---- Values ------------------------------------------------------------------------------------

const ALPHABET: [char; 19] = [
    'a', 'b', 'Z', ' ', '\t', '\n', '\u{1}', '\u{1f}', '\u{1e}', 'é', '東', '🚀', '\'', '\\', '"',
    ',', ':', 'N', '0',
];

fn gen_text(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
        .collect()
}

fn gen_f64(rng: &mut StdRng) -> f64 {
    const PICKS: [f64; 7] = [
        0.1,
        1_700_000_000.123456,
        -0.0,
        1e20,
        -2.5,
        0.30000000000000004,
        1e-300,
    ];
    if rng.random_bool(0.5) {
        return PICKS[rng.random_range(0..PICKS.len())];
    }
    loop {
        let x = f64::from_bits(rng.random());
        if x.is_normal() {
            return x;
        }
    }
}

fn gen_f32(rng: &mut StdRng) -> f32 {
    if rng.random_bool(0.3) {
        return [0.1_f32, 16_777_216.0, -3.4e38, 1e-30][rng.random_range(0..4)];
    }
    loop {
        let x = f32::from_bits(rng.random());
        if x.is_normal() {
            return x;
        }
    }
}

fn gen_val(ty: Ty, rng: &mut StdRng, nullable: bool) -> Option<Val> {
    if nullable && rng.random_bool(0.12) {
        return None;
    }
    let day = |rng: &mut StdRng| {
        let days = rng.random_range(1..24_800i64);
        let d = chrono_like_date(days);
        format!("{:04}-{:02}-{:02}", d.0, d.1, d.2)
    };
    Some(match ty {
        Ty::Int => Val::I(rng.random_range(-1000..1000)),
        Ty::Big => Val::I(if rng.random_bool(0.5) {
            rng.random()
        } else {
            rng.random_range(-50..50)
        }),
        Ty::Num => Val::Num(rng.random_range(-9_999_999_999i64..=9_999_999_999)),
        Ty::F8 => Val::F8(gen_f64(rng)),
        Ty::F4 => Val::F4(gen_f32(rng)),
        Ty::Text => Val::S(gen_text(rng, 8)),
        Ty::Varchar => Val::S(gen_text(rng, 6)),
        Ty::Bool => Val::B(rng.random()),
        Ty::Date => Val::S(day(rng)),
        Ty::Ts => Val::S(format!(
            "{} {:02}:{:02}:{:02}.{:06}",
            day(rng),
            rng.random_range(0..24),
            rng.random_range(0..60),
            rng.random_range(0..60),
            rng.random_range(0..1_000_000)
        )),
        Ty::Tstz => Val::Tstz(rng.random_range(1_000_000i64..2_100_000_000_000_000)),
        Ty::Json => Val::S(match rng.random_range(0..4) {
            0 => format!("{{\"k\": {}}}", rng.random_range(-99..99)),
            1 => format!("[{}, {}]", rng.random_range(0..9), rng.random_range(0..9)),
            2 => format!(
                "{{\"a\": \"x{}\", \"b\": [true, null]}}",
                rng.random_range(0..9)
            ),
            _ => "\"text\"".into(),
        }),
        Ty::Uuid => {
            // RFC 9562 version 4 (MariaDB's UUID type checks the variant).
            let mut b: [u8; 16] = rng.random();
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Val::S(format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            ))
        }
        Ty::Bytes => Val::Bytes((0..rng.random_range(0..6)).map(|_| rng.random()).collect()),
    })
}

/// (year, month, day) of a day number since 1970-01-01 (civil-from-days, H. Hinnant).
fn chrono_like_date(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn quote(kind: Kind, s: &str) -> String {
    let s = s.replace('\'', "''");
    match kind {
        Kind::My => format!("'{}'", s.replace('\\', "\\\\")),
        _ => format!("'{s}'"),
    }
}

fn literal(kind: Kind, ty: Ty, v: &Option<Val>) -> String {
    let Some(v) = v else {
        return "NULL".into();
    };
    match (v, kind) {
        (Val::I(i), _) => i.to_string(),
        (Val::Num(n), _) => format!(
            "{}{}.{:03}",
            if *n < 0 { "-" } else { "" },
            n.unsigned_abs() / 1000,
            n.unsigned_abs() % 1000
        ),
        (Val::F8(x), Kind::Pg) => format!("CAST('{x:e}' AS double precision)"),
        (Val::F4(x), Kind::Pg) => format!("CAST('{:e}' AS real)", *x as f64),
        (Val::F8(x), _) => format!("{x:e}"),
        (Val::F4(x), _) => format!("{:e}", *x as f64),
        (Val::S(s), Kind::Pg) if ty == Ty::Uuid => format!("CAST('{s}' AS uuid)"),
        (Val::S(s), Kind::Pg) if ty == Ty::Json => format!("CAST({} AS jsonb)", quote(kind, s)),
        (Val::S(s), _) => quote(kind, s),
        (Val::B(b), Kind::Pg) => b.to_string(),
        (Val::B(b), _) => u8::from(*b).to_string(),
        (Val::Tstz(us), Kind::Pg) => {
            format!("(TIMESTAMPTZ '1970-01-01 00:00:00+00' + {us} * INTERVAL '1 microsecond')")
        }
        (Val::Tstz(us), _) => format!("FROM_UNIXTIME({}.{:06})", us / 1_000_000, us % 1_000_000),
        (Val::Bytes(b), _) => {
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            match kind {
                Kind::Pg => format!("decode('{h}', 'hex')"),
                _ => format!("X'{h}'"),
            }
        }
    }
}

fn col_type(kind: Kind, ty: Ty) -> &'static str {
    match kind {
        Kind::Pg => match ty {
            Ty::Int => "integer",
            Ty::Big => "bigint",
            Ty::Num => "numeric(13,3)",
            Ty::F8 => "double precision",
            Ty::F4 => "real",
            Ty::Text => "text",
            Ty::Varchar => "varchar(20)",
            Ty::Bool => "boolean",
            Ty::Date => "date",
            Ty::Ts => "timestamp(6)",
            Ty::Tstz => "timestamptz",
            Ty::Json => "jsonb",
            Ty::Uuid => "uuid",
            Ty::Bytes => "bytea",
        },
        Kind::My => match ty {
            Ty::Int => "int",
            Ty::Big => "bigint",
            Ty::Num => "decimal(13,3)",
            Ty::F8 => "double",
            Ty::F4 => "float",
            Ty::Text => "text CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin",
            Ty::Varchar => "varchar(20) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin",
            Ty::Bool => "tinyint(1)",
            Ty::Date => "date",
            Ty::Ts => "datetime(6)",
            Ty::Tstz => "timestamp(6) NULL",
            Ty::Json => "json",
            Ty::Uuid => "uuid",
            Ty::Bytes => "varbinary(20)",
        },
        Kind::Lite => match ty {
            Ty::Int => "INTEGER",
            Ty::Big => "BIGINT",
            Ty::Num => "DECIMAL(13,3)",
            Ty::F8 => "DOUBLE",
            Ty::F4 => "FLOAT",
            Ty::Text | Ty::Json | Ty::Uuid => "TEXT",
            Ty::Varchar => "VARCHAR(20)",
            Ty::Bool => "BOOLEAN",
            Ty::Date => "DATE",
            Ty::Ts | Ty::Tstz => "DATETIME",
            Ty::Bytes => "BLOB",
        },
    }
}

fn key_cols(shape: KeyShape) -> Vec<&'static str> {
    match shape {
        KeyShape::Int => vec!["k1"],
        KeyShape::Text => vec!["k2"],
        KeyShape::IntText => vec!["k1", "k2"],
    }
}

fn ddl(kind: Kind, s: &Schema) -> String {
    let text_key = match kind {
        Kind::My => "varchar(50) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin",
        _ => "text",
    };
    let mut parts = Vec::new();
    for k in key_cols(s.key) {
        parts.push(match k {
            "k1" => "k1 integer NOT NULL".to_string(),
            _ => format!("k2 {text_key} NOT NULL"),
        });
    }
    for (i, t) in s.cols.iter().enumerate() {
        let unique = if s.unique == Some(i) { " UNIQUE" } else { "" };
        parts.push(format!("c{i} {}{unique}", col_type(kind, *t)));
    }
    parts.push(format!("PRIMARY KEY ({})", key_cols(s.key).join(", ")));
    format!("CREATE TABLE t ({})", parts.join(", "))
}

/// The test's own reading of a column, as text, with each engine's own functions.
fn read_sql(kind: Kind, ty: Ty, col: &str) -> String {
    match kind {
        Kind::Pg => match ty {
            Ty::F4 => format!("({col})::float8::text"),
            Ty::Bool => format!("({col})::int::text"),
            Ty::Date => format!("to_char({col}, 'YYYY-MM-DD')"),
            Ty::Ts => format!("to_char({col}, 'YYYY-MM-DD HH24:MI:SS.US')"),
            Ty::Tstz => format!("(extract(epoch from {col}) * 1000000)::bigint::text"),
            Ty::Bytes => format!("encode({col}, 'hex')"),
            _ => format!("({col})::text"),
        },
        Kind::My => match ty {
            Ty::F4 => format!("CAST(CAST({col} AS DOUBLE) AS CHAR)"),
            Ty::Date => format!("DATE_FORMAT({col}, '%Y-%m-%d')"),
            Ty::Ts => format!("DATE_FORMAT({col}, '%Y-%m-%d %H:%i:%s.%f')"),
            Ty::Tstz => format!("CAST(CAST(UNIX_TIMESTAMP({col}) * 1000000 AS SIGNED) AS CHAR)"),
            Ty::Bytes => format!("LOWER(HEX({col}))"),
            _ => format!("CAST({col} AS CHAR)"),
        },
        Kind::Lite => match ty {
            Ty::F8 | Ty::F4 => format!("printf('%!.17g', {col})"),
            Ty::Bytes => format!("lower(hex({col}))"),
            _ => format!("CAST({col} AS TEXT)"),
        },
    }
}

/// Text read by `read_sql`, in one spelling for every engine.
fn normalise(ty: Ty, s: &str) -> String {
    match ty {
        Ty::Num => {
            let mut t = s.to_string();
            if t.contains('.') {
                t = t.trim_end_matches('0').trim_end_matches('.').to_string();
            }
            if t == "-0" { "0".into() } else { t }
        }
        Ty::F8 | Ty::F4 => {
            let x: f64 = s.parse().unwrap_or_else(|_| panic!("not a float: {s}"));
            if x == 0.0 {
                "0".into()
            } else {
                format!("{x:e}")
            }
        }
        Ty::Bool => match s {
            "t" | "true" | "1" => "1".into(),
            _ => "0".into(),
        },
        _ => s.to_string(),
    }
}

type Dump = BTreeMap<Vec<String>, Vec<Option<String>>>;

async fn dump(db: &TestDb, s: &Schema) -> Dump {
    let keys = key_cols(s.key);
    let mut exprs: Vec<String> = keys
        .iter()
        .map(|k| match *k {
            "k1" => read_sql(db.kind, Ty::Int, k),
            _ => read_sql(db.kind, Ty::Text, k),
        })
        .collect();
    for (i, t) in s.cols.iter().enumerate() {
        exprs.push(read_sql(db.kind, *t, &format!("c{i}")));
    }
    let rows = db
        .rows(&format!("SELECT {} FROM t", exprs.join(", ")))
        .await;
    rows.into_iter()
        .map(|r| {
            let key: Vec<String> = r[..keys.len()]
                .iter()
                .map(|v| v.clone().unwrap_or_default())
                .collect();
            let vals = r[keys.len()..]
                .iter()
                .zip(&s.cols)
                .map(|(v, t)| v.as_deref().map(|v| normalise(*t, v)))
                .collect();
            (key, vals)
        })
        .collect()
}

// ---- The workload ------------------------------------------------------------------------------

struct Model {
    schema: Schema,
    rows: Vec<Row>,
    rng: StdRng,
}

impl Model {
    fn fresh_key(&mut self) -> Key {
        loop {
            let k = (self.rng.random_range(-500..500), gen_text(&mut self.rng, 4));
            let k = match self.schema.key {
                KeyShape::Int => (k.0, String::new()),
                KeyShape::Text => (0, k.1),
                KeyShape::IntText => k,
            };
            if !self.rows.iter().any(|r| r.key == k) {
                return k;
            }
        }
    }

    /// A value for column `i` that no other row holds when the column is unique.
    fn fresh_val(&mut self, i: usize, except: Option<usize>) -> Option<Val> {
        let ty = self.schema.cols[i];
        for _ in 0..50 {
            let v = gen_val(ty, &mut self.rng, true);
            let taken = self.schema.unique == Some(i)
                && v.is_some()
                && self
                    .rows
                    .iter()
                    .enumerate()
                    .any(|(j, r)| Some(j) != except && r.vals[i] == v);
            if !taken {
                return v;
            }
        }
        None
    }

    fn new_row(&mut self) -> Row {
        let key = self.fresh_key();
        let vals = (0..self.schema.cols.len())
            .map(|i| self.fresh_val(i, None))
            .collect();
        Row { key, vals }
    }

    fn pick(&mut self) -> Option<usize> {
        (!self.rows.is_empty()).then(|| self.rng.random_range(0..self.rows.len()))
    }
}

fn key_where(kind: Kind, s: &Schema, k: &Key) -> String {
    key_cols(s.key)
        .iter()
        .map(|c| match *c {
            "k1" => format!("k1 = {}", k.0),
            _ => format!("k2 = {}", quote(kind, &k.1)),
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn insert_sql(kind: Kind, s: &Schema, r: &Row) -> String {
    let mut cols: Vec<String> = key_cols(s.key).iter().map(|c| c.to_string()).collect();
    let mut vals: Vec<String> = key_cols(s.key)
        .iter()
        .map(|c| match *c {
            "k1" => r.key.0.to_string(),
            _ => quote(kind, &r.key.1),
        })
        .collect();
    for (i, t) in s.cols.iter().enumerate() {
        cols.push(format!("c{i}"));
        vals.push(literal(kind, *t, &r.vals[i]));
    }
    format!(
        "INSERT INTO t ({}) VALUES ({})",
        cols.join(", "),
        vals.join(", ")
    )
}

/// The statements of one transaction, applied to the model as they are generated.
fn statements(kind: Kind, m: &mut Model, ops: &[Op]) -> Vec<String> {
    let s = m.schema.clone();
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Insert => {
                let r = m.new_row();
                out.push(insert_sql(kind, &s, &r));
                m.rows.push(r);
            }
            Op::Update { col } => {
                let Some(j) = m.pick() else { continue };
                let i = col % s.cols.len();
                let v = m.fresh_val(i, Some(j));
                out.push(format!(
                    "UPDATE t SET c{i} = {} WHERE {}",
                    literal(kind, s.cols[i], &v),
                    key_where(kind, &s, &m.rows[j].key)
                ));
                m.rows[j].vals[i] = v;
            }
            Op::Delete => {
                let Some(j) = m.pick() else { continue };
                let r = m.rows.remove(j);
                out.push(format!(
                    "DELETE FROM t WHERE {}",
                    key_where(kind, &s, &r.key)
                ));
            }
            Op::ChangeKey => {
                let Some(j) = m.pick() else { continue };
                let k = m.fresh_key();
                let set = key_cols(s.key)
                    .iter()
                    .map(|c| match *c {
                        "k1" => format!("k1 = {}", k.0),
                        _ => format!("k2 = {}", quote(kind, &k.1)),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                out.push(format!(
                    "UPDATE t SET {set} WHERE {}",
                    key_where(kind, &s, &m.rows[j].key)
                ));
                m.rows[j].key = k;
            }
            Op::SwapUnique => {
                // Through a free value, as an application must with an immediate constraint.
                let (Some(u), true) = (s.unique, m.rows.len() >= 2) else {
                    continue;
                };
                let a = m.rng.random_range(0..m.rows.len());
                let b = (a + 1 + m.rng.random_range(0..m.rows.len() - 1)) % m.rows.len();
                let free = m.fresh_val(u, None);
                let (va, vb) = (m.rows[a].vals[u].clone(), m.rows[b].vals[u].clone());
                let ty = s.cols[u];
                let (ka, kb) = (m.rows[a].key.clone(), m.rows[b].key.clone());
                out.push(format!(
                    "UPDATE t SET c{u} = {} WHERE {}",
                    literal(kind, ty, &free),
                    key_where(kind, &s, &ka)
                ));
                out.push(format!(
                    "UPDATE t SET c{u} = {} WHERE {}",
                    literal(kind, ty, &va),
                    key_where(kind, &s, &kb)
                ));
                out.push(format!(
                    "UPDATE t SET c{u} = {} WHERE {}",
                    literal(kind, ty, &vb),
                    key_where(kind, &s, &ka)
                ));
                m.rows[a].vals[u] = vb;
                m.rows[b].vals[u] = va;
            }
        }
    }
    out
}

async fn run_txn(db: &TestDb, stmts: &[String]) {
    let mut tx = db.pool.begin().await.unwrap();
    for s in stmts {
        sqlx::query(sqlx::AssertSqlSafe(s.clone()))
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    tx.commit().await.unwrap();
}

/// Changes a cell on the source without the capture triggers seeing it (as the applier does).
async fn run_uncaptured(db: &TestDb, stmt: &str) {
    let mut tx = db.pool.begin().await.unwrap();
    let (before, after) = match db.kind {
        Kind::Pg => ("SET LOCAL switchyard.applying = 'on'", None),
        Kind::My => (
            "SET @switchyard_applying = 1",
            Some("SET @switchyard_applying = NULL"),
        ),
        Kind::Lite => (
            "UPDATE switchyard_session SET applying = 1",
            Some("UPDATE switchyard_session SET applying = 0"),
        ),
    };
    for s in std::iter::once(before)
        .chain(std::iter::once(stmt))
        .chain(after)
    {
        sqlx::query(sqlx::AssertSqlSafe(s.to_string()))
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    tx.commit().await.unwrap();
}

// ---- One case ----------------------------------------------------------------------------------

fn check(path: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "consistency",
            "check",
            "--sync",
            "t",
            "--output",
            "json",
            "--config",
        ])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "check printed no report: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
    )
}

/// The key as the check and the sampler print it: canonical text per key column.
fn key_text(s: &Schema, k: &Key) -> Vec<String> {
    key_cols(s.key)
        .iter()
        .map(|c| match *c {
            "k1" => k.0.to_string(),
            _ => k.1.clone(),
        })
        .collect()
}

async fn run_case(src_kind: Kind, dst_kind: Kind, case: Case) {
    let src = TestDb::new(src_kind).await;
    let dst = TestDb::new(dst_kind).await;
    src.exec(&ddl(src_kind, &case.schema)).await;
    dst.exec(&ddl(dst_kind, &case.schema)).await;
    let mut m = Model {
        schema: case.schema.clone(),
        rows: Vec::new(),
        rng: StdRng::seed_from_u64(case.seed),
    };
    let initial: Vec<Op> = (0..case.initial).map(|_| Op::Insert).collect();
    if !initial.is_empty() {
        let stmts = statements(src_kind, &mut m, &initial);
        run_txn(&src, &stmts).await;
    }
    let keys = key_cols(case.schema.key).join(", ");
    let yaml = format!(
        "backends:\n  m: {{ endpoints: [\"http://127.0.0.1:9\"] }}\ndefault_backend: m\nsync:\n  - name: t\n    source: {{ url: \"{}\", table: t, key: [{keys}] }}\n    target: {{ url: \"{}\", table: t, key: [{keys}] }}\nconsistency:\n  - {{ sync: t, sample_rate: 400/s, window: 5m }}\n",
        src.url(),
        dst.url()
    );
    let (_dir, path) = write_config(&yaml);
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["sync", "install", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy = Switchyard::start_file(&path);
    for ops in &case.txns {
        let stmts = statements(src_kind, &mut m, ops);
        if !stmts.is_empty() {
            run_txn(&src, &stmts).await;
        }
    }
    // Settled: equal by the test's own reading.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (a, b) = (
            dump(&src, &case.schema).await,
            dump(&dst, &case.schema).await,
        );
        if a == b {
            assert_eq!(
                a.len(),
                m.rows.len(),
                "the source holds what the test wrote"
            );
            break;
        }
        if std::time::Instant::now() > deadline {
            let (_, body) = admin_call(&proxy, "GET", "/v1/sync", "").await;
            panic!("tables differ after 30s:\nsource {a:?}\ntarget {b:?}\nsync {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, report) = check(&path);
    assert_eq!(code, 0, "the full check on equal tables: {report}");
    assert_eq!(report["rows_compared"], m.rows.len() as u64, "{report}");
    if m.rows.is_empty() {
        return;
    }
    // One cell changed on one side: a value becomes NULL, or NULL becomes a value.
    let j = m.rng.random_range(0..m.rows.len());
    let i = m.rng.random_range(0..case.schema.cols.len());
    let new = match &m.rows[j].vals[i] {
        Some(_) => None,
        None => {
            let mut v = None;
            while v.is_none() {
                v = m.fresh_val(i, Some(j));
            }
            v
        }
    };
    let side = if case.change_target { &dst } else { &src };
    let stmt = format!(
        "UPDATE t SET c{i} = {} WHERE {}",
        literal(side.kind, case.schema.cols[i], &new),
        key_where(side.kind, &case.schema, &m.rows[j].key)
    );
    if case.change_target {
        dst.exec(&stmt).await;
    } else {
        run_uncaptured(&src, &stmt).await;
    }
    let want = key_text(&case.schema, &m.rows[j].key);
    let (code, report) = check(&path);
    assert_eq!(code, 3, "{stmt}: {report}");
    let listed: Vec<Vec<String>> = report["different"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["key"].clone()).unwrap())
        .collect();
    assert_eq!(listed, vec![want.clone()], "{stmt}: {report}");
    assert!(
        report["missing_in_target"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert!(
        report["extra_in_target"].as_array().unwrap().is_empty(),
        "{report}"
    );
    eventually(
        Duration::from_secs(30),
        "the sampler finds the changed key",
        || async {
            let (_, body) = admin_call(&proxy, "GET", "/v1/consistency", "").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["consistency"][0]["mismatches"]
                .as_array()
                .is_some_and(|ms| {
                    ms.iter().any(|x| {
                        serde_json::from_value::<Vec<String>>(x["key"].clone())
                            .ok()
                            .as_ref()
                            == Some(&want)
                    })
                })
        },
    )
    .await;
}

fn cases() -> u32 {
    std::env::var("SWITCHYARD_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn run_pair(src: Kind, dst: Kind, types: Vec<Ty>) {
    let config = Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        max_shrink_iters: 32,
        source_file: Some(file!()),
        ..Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = runner.run(&case_strategy(types), |case| {
        rt.block_on(run_case(src, dst, case));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn differential_pg_to_pg() {
    run_pair(Kind::Pg, Kind::Pg, ALL_TYPES.to_vec());
}

#[test]
fn differential_mariadb_to_pg() {
    run_pair(Kind::My, Kind::Pg, ALL_TYPES.to_vec());
}

#[test]
fn differential_pg_to_mariadb() {
    run_pair(Kind::Pg, Kind::My, ALL_TYPES.to_vec());
}

#[test]
fn differential_sqlite_to_sqlite() {
    // SQLite has no zoned timestamp type: its DATETIME is the plain timestamp.
    let types = ALL_TYPES
        .iter()
        .copied()
        .filter(|t| *t != Ty::Tstz)
        .collect();
    run_pair(Kind::Lite, Kind::Lite, types);
}
