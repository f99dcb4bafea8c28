//! A sync pair resolved against the live databases: which columns map to which, how each is
//! compared, and the preflight checks that refuse a pair that cannot work (missing table, no
//! primary key, unknown column, incompatible types, missing privileges).

use crate::config::{Conflict, SyncSpec};

use super::SyncError;
use super::canon::{Kind, Purpose, canon_sql};
use super::engine::{ColumnInfo, Db, Engine, Session, inspect};

/// One side of a pair: its database and table.
#[derive(Clone)]
pub struct Side {
    pub db: Db,
    pub table: String,
    /// Columns in mapped order, key columns first.
    pub cols: Vec<ColumnInfo>,
    /// Unique indexes other than the primary key: (name, column names).
    pub unique: Vec<(String, Vec<String>)>,
}

impl Side {
    pub fn engine(&self) -> Engine {
        self.db.engine
    }

    pub fn qtable(&self) -> String {
        self.db.engine.quote_table(&self.table)
    }
}

#[derive(Clone)]
pub struct Plan {
    pub name: String,
    pub source: Side,
    pub target: Side,
    /// Kind each mapped column is compared and copied as; same order as `Side::cols`.
    pub kinds: Vec<Kind>,
    pub key_len: usize,
    pub bidirectional: bool,
    pub conflict: Conflict,
    /// Index into the mapped columns of the `last_write_wins` column.
    pub lww: Option<usize>,
}

/// Which way data moves in one apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SourceToTarget,
    TargetToSource,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::SourceToTarget => "source_to_target",
            Direction::TargetToSource => "target_to_source",
        }
    }
}

impl Plan {
    /// (from, to) sides of a direction.
    pub fn sides(&self, d: Direction) -> (&Side, &Side) {
        match d {
            Direction::SourceToTarget => (&self.source, &self.target),
            Direction::TargetToSource => (&self.target, &self.source),
        }
    }

    /// Name of the change table on either side.
    pub fn change_table(&self) -> String {
        format!("switchyard_chg_{}", ident_safe(&self.name))
    }

    /// The state row of a direction; it lives in the database the direction writes to, so
    /// the checkpoint commits with the data.
    pub fn state_row(&self, d: Direction) -> String {
        match d {
            Direction::SourceToTarget => self.name.clone(),
            Direction::TargetToSource => format!("{}:reverse", self.name),
        }
    }

    /// Canonical text of every mapped column of `side`, in mapped order.
    pub fn select_list(&self, side: &Side, purpose: Purpose, prefix: &str) -> String {
        side.cols
            .iter()
            .zip(&self.kinds)
            .map(|(c, k)| {
                canon_sql(
                    side.engine(),
                    &format!("{prefix}{}", side.db.q(&c.name)),
                    c.kind,
                    *k,
                    purpose,
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Canonical text of the key columns of `side`, read from `prefix` (`NEW.`, `OLD.` or a
    /// table alias).
    pub fn key_exprs(&self, side: &Side, prefix: &str) -> Vec<String> {
        side.cols[..self.key_len]
            .iter()
            .zip(&self.kinds)
            .map(|(c, k)| {
                canon_sql(
                    side.engine(),
                    &format!("{prefix}{}", side.db.q(&c.name)),
                    c.kind,
                    *k,
                    Purpose::Copy,
                )
            })
            .collect()
    }
}

pub fn ident_safe(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Connects to both sides and checks everything the pair needs, reporting every problem at
/// once.
pub async fn resolve(spec: &SyncSpec, session: Session) -> Result<Plan, SyncError> {
    let source_db = Db::connect(&spec.source.url, session).await?;
    let target_db = Db::connect(&spec.target.url, session).await?;
    resolve_with(spec, source_db, target_db).await
}

pub async fn resolve_with(
    spec: &SyncSpec,
    source_db: Db,
    target_db: Db,
) -> Result<Plan, SyncError> {
    let mut problems = Vec::new();
    let s_info = inspect(&source_db, &spec.source.table).await?;
    let t_info = inspect(&target_db, &spec.target.table).await?;
    let (Some(s_info), Some(t_info)) = (&s_info, &t_info) else {
        if s_info.is_none() {
            problems.push(format!(
                "source table `{}` does not exist in {}",
                spec.source.table,
                super::engine::redact(&spec.source.url)
            ));
        }
        if t_info.is_none() {
            problems.push(format!(
                "target table `{}` does not exist in {}",
                spec.target.table,
                super::engine::redact(&spec.target.url)
            ));
        }
        return Err(SyncError::Preflight {
            sync: spec.name.clone(),
            problems,
        });
    };
    for (side, info, end) in [
        ("source", s_info, &spec.source),
        ("target", t_info, &spec.target),
    ] {
        if info.primary_key.is_empty() {
            problems.push(format!(
                "{side} table `{}` has no primary key; the sync needs one to find rows",
                end.table
            ));
        } else if info.primary_key != end.key {
            problems.push(format!(
                "{side} key [{}] is not the primary key of `{}` ([{}])",
                end.key.join(", "),
                end.table,
                info.primary_key.join(", ")
            ));
        }
        if !info.missing_privileges.is_empty() {
            problems.push(format!(
                "the {side} user lacks {} on `{}`",
                info.missing_privileges.join(", "),
                end.table
            ));
        }
    }
    if spec.source.key.len() != spec.target.key.len() {
        problems.push(format!(
            "source key has {} columns but target key has {}",
            spec.source.key.len(),
            spec.target.key.len()
        ));
    }
    // Key columns first (positionally), then explicit mappings, then same-named columns.
    let mut pairs: Vec<(String, String)> = spec
        .source
        .key
        .iter()
        .cloned()
        .zip(spec.target.key.iter().cloned())
        .collect();
    for (s, t) in &spec.columns {
        if s_info.column(s).is_none() {
            problems.push(format!(
                "mapped column `{s}` does not exist in source table `{}`",
                spec.source.table
            ));
        }
        if t_info.column(t).is_none() {
            problems.push(format!(
                "mapped column `{t}` does not exist in target table `{}`",
                spec.target.table
            ));
        }
        if !pairs.iter().any(|(a, _)| a == s) {
            pairs.push((s.clone(), t.clone()));
        }
    }
    for c in &s_info.columns {
        if pairs.iter().any(|(a, _)| a == &c.name) || spec.columns.iter().any(|(a, _)| a == &c.name)
        {
            continue;
        }
        if t_info.column(&c.name).is_some() {
            pairs.push((c.name.clone(), c.name.clone()));
        }
    }
    let mut s_cols = Vec::new();
    let mut t_cols = Vec::new();
    let mut kinds = Vec::new();
    for (s, t) in &pairs {
        let (Some(sc), Some(tc)) = (s_info.column(s), t_info.column(t)) else {
            continue;
        };
        match Kind::pair(sc.kind, tc.kind) {
            Some(k) => kinds.push(k),
            None => {
                problems.push(format!(
                    "column `{s}` is {} ({}) on the source but `{t}` is {} ({}) on the target: values cannot be copied",
                    sc.kind.name(),
                    sc.decl,
                    tc.kind.name(),
                    tc.decl
                ));
                kinds.push(Kind::Text);
            }
        }
        s_cols.push(sc.clone());
        t_cols.push(tc.clone());
    }
    if !spec.accept_looser_collation {
        problems.extend(looser_collations(spec, &s_cols, &t_cols, t_info));
    }
    let lww = match &spec.conflict {
        Conflict::LastWriteWins { column } => {
            let pos = s_cols.iter().position(|c| &c.name == column);
            if pos.is_none() {
                problems.push(format!(
                    "last_write_wins column `{column}` is not a mapped column of `{}`",
                    spec.source.table
                ));
            }
            pos
        }
        _ => None,
    };
    if !problems.is_empty() {
        return Err(SyncError::Preflight {
            sync: spec.name.clone(),
            problems,
        });
    }
    Ok(Plan {
        name: spec.name.clone(),
        source: Side {
            db: source_db,
            table: spec.source.table.clone(),
            cols: s_cols,
            unique: s_info.unique.clone(),
        },
        target: Side {
            db: target_db,
            table: spec.target.table.clone(),
            cols: t_cols,
            unique: t_info.unique.clone(),
        },
        kinds,
        key_len: spec.source.key.len(),
        bidirectional: spec.bidirectional,
        conflict: spec.conflict.clone(),
        lww,
    })
}

/// Key and unique columns that compare more loosely on the target than on the source: there,
/// two source rows (`a` and `A`, or `a` and `a `) would be one row, and copying would merge them.
fn looser_collations(
    spec: &SyncSpec,
    s_cols: &[ColumnInfo],
    t_cols: &[ColumnInfo],
    t_info: &super::engine::TableInfo,
) -> Vec<String> {
    let mut guarded: Vec<(&str, String)> = spec
        .target
        .key
        .iter()
        .map(|k| (k.as_str(), "the key".to_string()))
        .collect();
    for (index, cols) in &t_info.unique {
        for c in cols {
            guarded.push((c.as_str(), format!("unique index `{index}`")));
        }
    }
    let mut problems = Vec::new();
    for (col, why) in guarded {
        let Some(i) = t_cols.iter().position(|c| c.name == col) else {
            continue;
        };
        let (s, t) = (&s_cols[i], &t_cols[i]);
        if t.collation > s.collation {
            problems.push(format!(
                "target column `{}` ({why}) compares with {} but source column `{}` compares {}: \
                 rows the source keeps apart would merge on the target; use an exact collation on the \
                 target (MariaDB `utf8mb4_nopad_bin`, or a binary type) or set `accept_looser_collation: true`",
                t.name,
                t.collation.describe(),
                s.name,
                match &s.collation {
                    super::engine::Collation::Exact => "byte for byte".to_string(),
                    c => format!("with {}", c.describe()),
                },
            ));
        }
    }
    problems
}
