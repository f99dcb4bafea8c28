//! Change capture objects per engine: the change table, the triggers that fill it, and the
//! bookkeeping tables (state rows with lease and checkpoint, conflict log). Triggers record
//! only the key of a changed row; the worker reads the row's current state when it applies,
//! so the order in which concurrent transactions commit cannot reorder data.

use sqlx::AssertSqlSafe;
use sqlx::Executor;

use super::SyncError;
use super::engine::Engine;
use super::plan::{Direction, Plan, Side, ident_safe};

/// The DDL of one side, in execution order.
pub struct SideDdl {
    pub label: &'static str,
    pub url: String,
    pub statements: Vec<String>,
}

fn key_cols(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("k{i}")).collect()
}

fn state_tables(e: Engine) -> Vec<String> {
    let big = "BIGINT NOT NULL DEFAULT 0";
    let (id, tail) = match e {
        Engine::Postgres => ("id BIGSERIAL PRIMARY KEY", ""),
        Engine::MySql => ("id BIGINT AUTO_INCREMENT PRIMARY KEY", " ENGINE=InnoDB"),
        Engine::Sqlite => ("id INTEGER PRIMARY KEY AUTOINCREMENT", ""),
    };
    let mut v = vec![
        format!(
            "CREATE TABLE IF NOT EXISTS switchyard_sync_state (name VARCHAR(200) PRIMARY KEY, \
             holder VARCHAR(200), lease_until {big}, phase VARCHAR(32) NOT NULL, backfill_after TEXT, \
             backfill_copied {big}, backfill_total {big}, consumed TEXT, applied {big}, conflicts {big}, \
             updated_at {big}){tail}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS switchyard_sync_conflicts ({id}, sync VARCHAR(200) NOT NULL, \
             row_key TEXT NOT NULL, winner VARCHAR(16) NOT NULL, rule VARCHAR(64) NOT NULL, \
             source_row TEXT, target_row TEXT, at_micros {big}){tail}"
        ),
    ];
    if e == Engine::Sqlite {
        v.push("CREATE TABLE IF NOT EXISTS switchyard_session (applying INTEGER NOT NULL)".into());
        v.push(
            "INSERT INTO switchyard_session (applying) SELECT 0 \
             WHERE NOT EXISTS (SELECT 1 FROM switchyard_session)"
                .into(),
        );
    }
    v
}

fn insert_state_row(e: Engine, name: &str, phase: &str) -> String {
    let name = name.replace('\'', "''");
    match e {
        Engine::Postgres => format!(
            "INSERT INTO switchyard_sync_state (name, phase) VALUES ('{name}', '{phase}') ON CONFLICT (name) DO NOTHING"
        ),
        Engine::MySql => format!(
            "INSERT IGNORE INTO switchyard_sync_state (name, phase) VALUES ('{name}', '{phase}')"
        ),
        Engine::Sqlite => format!(
            "INSERT OR IGNORE INTO switchyard_sync_state (name, phase) VALUES ('{name}', '{phase}')"
        ),
    }
}

fn change_table(plan: &Plan, side: &Side) -> Vec<String> {
    let e = side.engine();
    let t = plan.change_table();
    let ks = key_cols(plan.key_len);
    let kt = e.key_text_type();
    let kdefs = ks
        .iter()
        .map(|k| format!("{k} {kt}"))
        .collect::<Vec<_>>()
        .join(", ");
    let klist = ks.join(", ");
    match e {
        Engine::Postgres => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (seq BIGSERIAL PRIMARY KEY, {kdefs}, changed_at BIGINT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {t}_k ON {t} ({klist})"),
            // Drained after every batch: vacuumed by row count, not by share, so a table that
            // once held a large backlog does not stay bloated (and sequentially scanned).
            format!(
                "ALTER TABLE {t} SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_insert_threshold = 5000)"
            ),
        ],
        Engine::MySql => vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (seq BIGINT AUTO_INCREMENT PRIMARY KEY, {kdefs}, \
             changed_at BIGINT NOT NULL, KEY {t}_k ({klist})) ENGINE=InnoDB"
        )],
        // AUTOINCREMENT: a consumed sequence number must never be handed out again.
        Engine::Sqlite => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (seq INTEGER PRIMARY KEY AUTOINCREMENT, {kdefs}, changed_at INTEGER NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {t}_k ON {t} ({klist})"),
        ],
    }
}

fn trigger_names(plan: &Plan) -> [String; 3] {
    let base = format!("switchyard_{}", ident_safe(&plan.name));
    [
        format!("{base}_ins"),
        format!("{base}_upd"),
        format!("{base}_del"),
    ]
}

fn triggers(plan: &Plan, side: &Side) -> Vec<String> {
    let e = side.engine();
    let t = plan.change_table();
    let ks = key_cols(plan.key_len).join(", ");
    let now = e.now_micros_sql();
    let new = plan.key_exprs(side, "NEW.").join(", ");
    let old = plan.key_exprs(side, "OLD.").join(", ");
    let table = side.qtable();
    let insert = |vals: &str| format!("INSERT INTO {t} ({ks}, changed_at) VALUES ({vals}, {now})");
    let key_names: Vec<String> = side.cols[..plan.key_len]
        .iter()
        .map(|c| side.db.q(&c.name))
        .collect();
    let [ins, upd, del] = trigger_names(plan);
    match e {
        Engine::Postgres => {
            let func = format!("switchyard_{}_capture", ident_safe(&plan.name));
            let new_row = key_names
                .iter()
                .map(|k| format!("NEW.{k}"))
                .collect::<Vec<_>>()
                .join(", ");
            let old_row = key_names
                .iter()
                .map(|k| format!("OLD.{k}"))
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                format!(
                    "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $fn$\n\
                     BEGIN\n\
                     \x20 IF current_setting('switchyard.applying', true) = 'on' THEN RETURN NULL; END IF;\n\
                     \x20 IF TG_OP <> 'INSERT' THEN {}; END IF;\n\
                     \x20 IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND ROW({new_row}) IS DISTINCT FROM ROW({old_row})) THEN {}; END IF;\n\
                     \x20 RETURN NULL;\n\
                     END $fn$",
                    insert(&old),
                    insert(&new)
                ),
                format!("DROP TRIGGER IF EXISTS {func} ON {table}"),
                format!(
                    "CREATE TRIGGER {func} AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {func}()"
                ),
            ]
        }
        Engine::MySql => {
            let same = key_names
                .iter()
                .map(|k| format!("NEW.{k} <=> OLD.{k}"))
                .collect::<Vec<_>>()
                .join(" AND ");
            let guard = "IF @switchyard_applying IS NULL THEN";
            vec![
                format!("DROP TRIGGER IF EXISTS {ins}"),
                format!(
                    "CREATE TRIGGER {ins} AFTER INSERT ON {table} FOR EACH ROW BEGIN {guard} {}; END IF; END",
                    insert(&new)
                ),
                format!("DROP TRIGGER IF EXISTS {upd}"),
                format!(
                    "CREATE TRIGGER {upd} AFTER UPDATE ON {table} FOR EACH ROW BEGIN {guard} {}; \
                     IF NOT ({same}) THEN {}; END IF; END IF; END",
                    insert(&old),
                    insert(&new)
                ),
                format!("DROP TRIGGER IF EXISTS {del}"),
                format!(
                    "CREATE TRIGGER {del} AFTER DELETE ON {table} FOR EACH ROW BEGIN {guard} {}; END IF; END",
                    insert(&old)
                ),
            ]
        }
        Engine::Sqlite => {
            let same = key_names
                .iter()
                .map(|k| format!("NEW.{k} IS OLD.{k}"))
                .collect::<Vec<_>>()
                .join(" AND ");
            // Writers are serialised in SQLite, so a flag row set inside the applier's
            // transaction is seen only by the applier's own trigger runs.
            let when = "WHEN COALESCE((SELECT applying FROM switchyard_session LIMIT 1), 0) = 0";
            vec![
                format!("DROP TRIGGER IF EXISTS {ins}"),
                format!(
                    "CREATE TRIGGER {ins} AFTER INSERT ON {table} {when} BEGIN {}; END",
                    insert(&new)
                ),
                format!("DROP TRIGGER IF EXISTS {upd}"),
                format!(
                    "CREATE TRIGGER {upd} AFTER UPDATE ON {table} {when} BEGIN {}; \
                     INSERT INTO {t} ({ks}, changed_at) SELECT {new}, {now} WHERE NOT ({same}); END",
                    insert(&old)
                ),
                format!("DROP TRIGGER IF EXISTS {del}"),
                format!(
                    "CREATE TRIGGER {del} AFTER DELETE ON {table} {when} BEGIN {}; END",
                    insert(&old)
                ),
            ]
        }
    }
}

/// Everything `sync install` runs, per side.
pub fn install_ddl(plan: &Plan) -> Vec<SideDdl> {
    let mut source = state_tables(plan.source.engine());
    source.extend(change_table(plan, &plan.source));
    source.extend(triggers(plan, &plan.source));
    let mut target = state_tables(plan.target.engine());
    target.push(insert_state_row(
        plan.target.engine(),
        &plan.state_row(Direction::SourceToTarget),
        "backfill",
    ));
    if plan.bidirectional {
        target.extend(change_table(plan, &plan.target));
        target.extend(triggers(plan, &plan.target));
        source.push(insert_state_row(
            plan.source.engine(),
            &plan.state_row(Direction::TargetToSource),
            "stream",
        ));
    }
    vec![
        SideDdl {
            label: "source",
            url: super::engine::redact(&plan.source.db.url),
            statements: source,
        },
        SideDdl {
            label: "target",
            url: super::engine::redact(&plan.target.db.url),
            statements: target,
        },
    ]
}

/// Everything `sync uninstall` runs: triggers, capture function and change tables go, the
/// pair's state rows go; the conflict log stays for the record.
pub fn uninstall_ddl(plan: &Plan) -> Vec<SideDdl> {
    let side = |s: &Side, label: &'static str| {
        let e = s.engine();
        let mut v = Vec::new();
        let [ins, upd, del] = trigger_names(plan);
        match e {
            Engine::Postgres => {
                let func = format!("switchyard_{}_capture", ident_safe(&plan.name));
                v.push(format!("DROP TRIGGER IF EXISTS {func} ON {}", s.qtable()));
                v.push(format!("DROP FUNCTION IF EXISTS {func}()"));
            }
            _ => {
                for t in [ins, upd, del] {
                    v.push(format!("DROP TRIGGER IF EXISTS {t}"));
                }
            }
        }
        v.push(format!("DROP TABLE IF EXISTS {}", plan.change_table()));
        let names = [
            plan.state_row(Direction::SourceToTarget),
            plan.state_row(Direction::TargetToSource),
        ]
        .map(|n| format!("'{}'", n.replace('\'', "''")))
        .join(", ");
        v.push(format!(
            "DELETE FROM switchyard_sync_state WHERE name IN ({names})"
        ));
        SideDdl {
            label,
            url: super::engine::redact(&s.db.url),
            statements: v,
        }
    };
    vec![side(&plan.source, "source"), side(&plan.target, "target")]
}

/// Runs DDL side by side. Statements are idempotent, so a run that failed halfway can be
/// repeated.
pub async fn execute(plan: &Plan, ddl: &[SideDdl]) -> Result<(), SyncError> {
    for side in ddl {
        let db = if side.label == "source" {
            &plan.source.db
        } else {
            &plan.target.db
        };
        for stmt in &side.statements {
            if stmt.starts_with("DELETE FROM switchyard_sync_state") && !has_state_table(db).await {
                continue;
            }
            db.pool
                .execute(sqlx::raw_sql(AssertSqlSafe(stmt.as_str())))
                .await
                .map_err(|e| SyncError::Query {
                    what: format!("running on the {} ({}): {stmt}", side.label, side.url),
                    source: e,
                })?;
        }
    }
    Ok(())
}

async fn has_state_table(db: &super::engine::Db) -> bool {
    sqlx::query("SELECT 1 FROM switchyard_sync_state WHERE 1 = 0")
        .fetch_optional(&db.pool)
        .await
        .is_ok()
}

/// Whether `install` has run for this pair: the state row exists where each direction
/// writes, and the change tables exist where changes are captured.
pub async fn installed(plan: &Plan) -> bool {
    let state_ok = |db: &super::engine::Db, row: String| {
        let db = db.clone();
        async move {
            let sql = format!(
                "SELECT 1 FROM switchyard_sync_state WHERE name = {}",
                db.engine.param(1)
            );
            matches!(
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(row)
                    .fetch_optional(&db.pool)
                    .await,
                Ok(Some(_))
            )
        }
    };
    let chg_ok = |db: &super::engine::Db| {
        let db = db.clone();
        let t = plan.change_table();
        async move {
            sqlx::query(AssertSqlSafe(format!("SELECT 1 FROM {t} WHERE 1 = 0")))
                .fetch_optional(&db.pool)
                .await
                .is_ok()
        }
    };
    if !state_ok(&plan.target.db, plan.state_row(Direction::SourceToTarget)).await
        || !chg_ok(&plan.source.db).await
    {
        return false;
    }
    if plan.bidirectional
        && (!state_ok(&plan.source.db, plan.state_row(Direction::TargetToSource)).await
            || !chg_ok(&plan.target.db).await)
    {
        return false;
    }
    true
}
