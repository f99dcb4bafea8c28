//! Admin authentication: bearer tokens from `SWITCHYARD_ADMIN_TOKEN` and a tokens file
//! (name → SHA-256 of the token), so the audit log can say who made a change.
//!
//! Only hashes are kept in memory, and a presented token is compared with every entry in
//! constant time, so neither the token nor which entry matched leaks through timing.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The name the environment token is audited under.
pub const ENV_TOKEN_NAME: &str = "env";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokens file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<(String, [u8; 32])>,
}

pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    pub fn load(env_token: Option<&str>, file: Option<&Path>) -> Result<Tokens, AuthError> {
        let mut entries = Vec::new();
        if let Some(token) = env_token.filter(|t| !t.is_empty()) {
            entries.push((ENV_TOKEN_NAME.to_string(), sha256(token)));
        }
        if let Some(path) = file {
            let text = crate::config::files::read_bounded_text(
                path,
                crate::config::files::MAX_SMALL_FILE_BYTES,
            )
            .map_err(|source| AuthError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let parsed = crate::config::files::parse_tokens(&text).map_err(|message| {
                AuthError::Invalid {
                    path: path.to_path_buf(),
                    message,
                }
            })?;
            entries.extend(parsed);
        }
        Ok(Tokens { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the token presented, if it is one of ours.
    pub fn authenticate(&self, presented: &str) -> Option<&str> {
        let hash = sha256(presented);
        let mut found = None;
        // No early exit: every entry is compared whatever matches.
        for (name, expected) in &self.entries {
            if bool::from(expected.ct_eq(&hash)) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file_tokens_authenticate_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(
            &path,
            format!("ci: sha256:{}\n", hex::encode(sha256("ci-secret"))),
        )
        .unwrap();
        let tokens = Tokens::load(Some("root-secret"), Some(&path)).unwrap();
        assert_eq!(tokens.authenticate("root-secret"), Some("env"));
        assert_eq!(tokens.authenticate("ci-secret"), Some("ci"));
        assert_eq!(tokens.authenticate("ci-secre"), None);
        assert_eq!(tokens.authenticate(""), None);
    }

    #[test]
    fn a_malformed_tokens_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, "ci: plaintext\n").unwrap();
        assert!(matches!(
            Tokens::load(None, Some(&path)),
            Err(AuthError::Invalid { .. })
        ));
    }
}
