//! Every unknown key of a config file in one run, each with the keys accepted there and the
//! nearest of them, so a file with three typos takes one `check`, not three.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key. This module deserializes the
//! parsed YAML tree with the path of each error recorded (`serde_path_to_error`), removes the
//! unknown key from the tree and tries again, until the rest of the file deserializes or fails
//! for another reason (which the ordinary parse then reports with its position).

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml::Value;

/// One unknown key: where it is (`routes[0].colour`, the path format of `PositionIndex`) and the
/// message to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UnknownKey {
    pub path: String,
    pub message: String,
}

/// A file with more typos than this is probably not a switchyard config at all.
const MAX_REPORTED: usize = 50;

/// Finds the unknown keys of `tree` as a `T` would see them. Empty when there are none; the
/// tree is only read.
pub(super) fn unknown_keys<T: DeserializeOwned>(tree: &Value) -> Vec<UnknownKey> {
    // A valid file (every reload) is read in place; the tree is copied only once a key
    // has to be taken out of it.
    let mut pruned: Option<Value> = None;
    let mut found = Vec::new();
    while found.len() < MAX_REPORTED {
        let current = pruned.as_ref().unwrap_or(tree);
        let Err(e) = serde_path_to_error::deserialize::<_, T>(current) else {
            break;
        };
        let inner = e.inner().to_string();
        let Some(key) = unknown_field(&inner) else {
            break;
        };
        let segments: Vec<&Segment> = e.path().iter().collect();
        // The path ends with the unknown key itself; its parent is where it must be removed.
        let parent = match segments.last() {
            Some(Segment::Map { key: last }) if *last == key => &segments[..segments.len() - 1],
            _ => &segments[..],
        };
        if !remove(pruned.get_or_insert_with(|| tree.clone()), parent, &key) {
            break;
        }
        let parent_path = display(parent);
        let accepted = accepted_fields(&inner);
        found.push(UnknownKey {
            path: if parent_path.is_empty() {
                key.clone()
            } else {
                format!("{parent_path}.{key}")
            },
            message: message(&parent_path, &key, &accepted),
        });
    }
    found
}

fn message(parent: &str, key: &str, accepted: &[String]) -> String {
    let place = if parent.is_empty() {
        "at the top level".to_string()
    } else {
        format!("under `{parent}`")
    };
    let mut m = if parent.is_empty() {
        format!("unknown field `{key}` {place}")
    } else {
        format!("{parent}: unknown field `{key}`")
    };
    if let Some(near) = nearest(key, accepted) {
        m.push_str(&format!("; did you mean `{near}`?"));
    }
    if accepted.is_empty() {
        m.push_str(&format!("; no keys are accepted {place}"));
    } else {
        m.push_str(&format!(
            " (accepted {place}: {})",
            accepted
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    m
}

/// The accepted key closest to a typo, when it is close enough to be the one meant: a small
/// edit distance for its length, or the same letters in another case or with `-` for `_`.
fn nearest<'a>(key: &str, accepted: &'a [String]) -> Option<&'a str> {
    let folded = key.to_ascii_lowercase().replace('-', "_");
    accepted
        .iter()
        .map(|a| {
            let distance = if *a == folded {
                0
            } else {
                strsim::damerau_levenshtein(&folded, a)
            };
            (distance, a.as_str())
        })
        .filter(|(d, a)| *d <= (a.len().max(key.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

/// `unknown field `x`, expected …` → `x`.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

/// The names serde lists after "expected" (`expected `a` or `b``, `expected one of `a`, `b``);
/// empty for "there are no fields".
fn accepted_fields(message: &str) -> Vec<String> {
    let Some(expected) = message.split(", expected ").nth(1) else {
        return Vec::new();
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn display(segments: &[&Segment]) -> String {
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// Removes `key` from the mapping at `path`; false when the path does not lead to it (the
/// error then came from somewhere this walk cannot follow, and the loop stops).
fn remove(tree: &mut Value, path: &[&Segment], key: &str) -> bool {
    let mut node = tree;
    for s in path {
        node = match (s, node) {
            (Segment::Seq { index }, Value::Sequence(items)) => match items.get_mut(*index) {
                Some(n) => n,
                None => return false,
            },
            (Segment::Map { key }, Value::Mapping(map)) => {
                match map.get_mut(Value::String(key.clone())) {
                    Some(n) => n,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match node {
        Value::Mapping(map) => map.remove(Value::String(key.to_string())).is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawConfig;

    fn keys(text: &str) -> Vec<UnknownKey> {
        unknown_keys::<RawConfig>(&serde_yaml::from_str(text).unwrap())
    }

    #[test]
    fn every_unknown_key_in_one_pass_with_the_nearest_accepted_one() {
        let found = keys(
            "listen: { http: 127.0.0.1:1, htps: x }\nadmin: { listen: 127.0.0.1:2, tokn: x }\n\
             backends:\n  a: { endpoints: [http://127.0.0.1:3], helth: {} }\n\
             default_backend: a\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    \
             legacy: a\n    target: a\n    colour: red\n    split: { percentage: { weight: 1 } }\nroutse: []\n",
        );
        let mut paths: Vec<&str> = found.iter().map(|k| k.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "admin.tokn",
                "backends.a.helth",
                "listen.htps",
                "routes[0].colour",
                "routse"
            ]
        );
        assert_eq!(found.len(), 5, "{found:#?}");
        let by_path = |p: &str| &found.iter().find(|k| k.path == p).unwrap().message;
        assert!(by_path("listen.htps").contains("did you mean `https`?"));
        assert!(by_path("listen.htps").contains("accepted under `listen`: `http`, `https`"));
        assert!(by_path("admin.tokn").contains("`tokens_file`"));
        assert!(by_path("backends.a.helth").contains("did you mean `health`?"));
        assert!(by_path("routse").contains("did you mean `routes`?"));
        assert!(!by_path("routes[0].colour").contains("did you mean"));
    }

    #[test]
    fn nearest_only_when_close() {
        let accepted: Vec<String> = ["path_prefix", "host", "methods", "headers"]
            .map(String::from)
            .to_vec();
        assert_eq!(nearest("path-prefix", &accepted), Some("path_prefix"));
        assert_eq!(nearest("Host", &accepted), Some("host"));
        assert_eq!(nearest("metods", &accepted), Some("methods"));
        assert_eq!(nearest("weight", &accepted), None);
    }

    #[test]
    fn a_valid_tree_has_none() {
        assert!(
            keys("backends: { a: { endpoints: [http://127.0.0.1:3] } }\ndefault_backend: a\n")
                .is_empty()
        );
    }
}
