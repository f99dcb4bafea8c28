//! Database errors in words: why a connection to a sync side or the state store failed, said
//! once, without the driver's repeated chain or the server's source-file line numbers.

/// What went wrong with a connection, for a person: "database `shop` does not exist",
/// "connection refused by 127.0.0.1:5499 (is the server running there?)".
///
/// PostgreSQL's SQLSTATEs are from its manual, appendix A; MySQL's error numbers from the
/// MariaDB server error reference.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => {
            let message = db.message();
            match db.code().as_deref() {
                Some("3D000") | Some("1049") => format!("{message} (create it, or fix the URL)"),
                Some("28000") if message.contains("role") => {
                    format!("{message} (create the role, or fix the user in the URL)")
                }
                Some("28P01") | Some("28000") | Some("1045") => {
                    format!("authentication failed: {message}")
                }
                _ => message.to_string(),
            }
        }
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is the server running at that host and port?)".to_string()
            }
            std::io::ErrorKind::TimedOut => "the server did not answer in time".to_string(),
            _ => io.to_string(),
        },
        sqlx::Error::PoolTimedOut => {
            "no connection could be opened in time (the server is unreachable or overloaded)"
                .to_string()
        }
        sqlx::Error::Configuration(c) => format!("the URL is not usable: {c}"),
        sqlx::Error::Tls(t) => format!("TLS failed: {t}"),
        other => other.to_string(),
    }
}

/// The cause of a failed pool connect: a pool only says it timed out, so one direct connection
/// is tried for the real reason (refused, unknown database, wrong password).
pub async fn connect_failure(url: &str, e: sqlx::Error) -> String {
    use sqlx::Connection;
    if !matches!(e, sqlx::Error::PoolTimedOut) {
        return describe(&e);
    }
    match tokio::time::timeout(
        std::time::Duration::from_secs(3),
        sqlx::AnyConnection::connect(url),
    )
    .await
    {
        Ok(Err(direct)) => describe(&direct),
        _ => describe(&e),
    }
}
