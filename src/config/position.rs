//! Source positions for config paths: a side index from `routes[0].name`-style paths to the line and column of keys and values, so semantic validation errors can point into the YAML text.
//!
//! The serde parse that produces the config types has no spans, so this module re-reads the same
//! text with an event parser that has markers and records where each key and value starts.

use std::collections::HashMap;

use saphyr_parser::{Event, Marker, Parser};

/// 1-based line and column, as editors show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

impl Position {
    const START: Position = Position { line: 1, col: 1 };

    fn from_marker(marker: Marker) -> Position {
        // saphyr counts lines from 1 but columns from 0 (in chars, not bytes).
        Position {
            line: marker.line(),
            col: marker.col() + 1,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    key: Option<Position>,
    value: Option<Position>,
}

/// A key written twice in one mapping. serde would keep the last value of a map silently
/// and report a struct's duplicate at the mapping's start, so the index reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    pub path: String,
    pub first: Position,
    pub again: Position,
}

/// Path → position of the key and value found there, for the first YAML document of a text.
#[derive(Debug, Default, Clone)]
pub struct PositionIndex {
    entries: HashMap<String, Entry>,
    duplicates: Vec<DuplicateKey>,
}

/// What the next node inside an open collection will be.
enum Frame {
    /// `path` is `None` inside a non-scalar key, which has no path of its own.
    Mapping {
        path: Option<String>,
        pending_key: Option<Option<String>>,
    },
    Sequence {
        path: Option<String>,
        next_index: usize,
    },
}

/// Where the first collection nested deeper than `max` starts, if one does. Linear in the
/// text and stops at the first such collection, so it is safe to run before anything whose
/// cost grows with depth (the index's paths, serde's recursion).
pub fn too_deep(text: &str, max: usize) -> Option<Position> {
    let mut depth = 0usize;
    for result in Parser::new_from_str(text) {
        let (event, span) = match result {
            Ok(pair) => pair,
            // The scanner has a flow-depth limit of its own (256) and stops there.
            Err(e) if e.info().contains("recursion limit") => {
                return Some(Position::from_marker(*e.marker()));
            }
            // Syntax errors are serde's to report.
            Err(_) => return None,
        };
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > max {
                    return Some(Position::from_marker(span.start));
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::DocumentEnd => return None,
            _ => {}
        }
    }
    None
}

impl PositionIndex {
    /// Never fails: on a YAML syntax error it returns what it indexed so far (the serde parse reports syntax errors itself).
    pub fn build(text: &str) -> PositionIndex {
        let mut index = PositionIndex::default();
        let mut stack: Vec<Frame> = Vec::new();

        for result in Parser::new_from_str(text) {
            let Ok((event, span)) = result else {
                // The parser is not guaranteed to make progress after an error.
                break;
            };
            let start = Position::from_marker(span.start);
            match event {
                Event::DocumentEnd => break,
                Event::Scalar(value, ..) => {
                    index.node(&mut stack, start, Some(value.as_ref()));
                }
                Event::Alias(_) => {
                    // An alias has no scalar text we could use as a key, so as a key it is skipped.
                    index.node(&mut stack, start, None);
                }
                Event::MappingStart(..) => {
                    let path = index.node(&mut stack, start, None);
                    stack.push(Frame::Mapping {
                        path,
                        pending_key: None,
                    });
                }
                Event::SequenceStart(..) => {
                    let path = index.node(&mut stack, start, None);
                    stack.push(Frame::Sequence {
                        path,
                        next_index: 0,
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::StreamStart
                | Event::StreamEnd
                | Event::DocumentStart(_)
                | Event::Nothing => {}
            }
        }
        index
    }

    /// Records a node starting at `start` in whatever role the enclosing collection gives it, and
    /// returns the path its own children hang off (`None` for keys and the root, whose children
    /// are either unaddressable or top-level).
    fn node(
        &mut self,
        stack: &mut [Frame],
        start: Position,
        scalar: Option<&str>,
    ) -> Option<String> {
        match stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Sequence { path, next_index }) => {
                let child = path.as_ref().map(|p| format!("{p}[{next_index}]"));
                *next_index += 1;
                if let Some(child) = &child {
                    self.record_value(child, start);
                }
                child
            }
            Some(Frame::Mapping { path, pending_key }) => match pending_key.take() {
                None => {
                    let child = match (path.as_ref(), scalar) {
                        (Some(parent), Some(key)) => Some(join(parent, key)),
                        _ => None,
                    };
                    if let Some(child) = &child {
                        let entry = self.entries.entry(child.clone()).or_default();
                        // Keys under a repeated key repeat too; the outer repeat says it all.
                        let under_repeat = self.duplicates.iter().any(|d| {
                            child
                                .strip_prefix(d.path.as_str())
                                .is_some_and(|rest| rest.starts_with(['.', '[']))
                        });
                        match entry.key {
                            Some(_) if under_repeat => {}
                            Some(first) => self.duplicates.push(DuplicateKey {
                                path: child.clone(),
                                first,
                                again: start,
                            }),
                            None => entry.key = Some(start),
                        }
                    }
                    *pending_key = Some(child);
                    None
                }
                Some(child) => {
                    if let Some(child) = &child {
                        self.record_value(child, start);
                    }
                    child
                }
            },
        }
    }

    fn record_value(&mut self, path: &str, start: Position) {
        let entry = self.entries.entry(path.to_owned()).or_default();
        entry.value.get_or_insert(start);
    }

    /// Position of the VALUE at this path, e.g. "routes[2].split.percentage.weight", "backends.monolith", "flags.new-users-api.percentage", "routes[0].match.methods[1]".
    /// Keys written more than once in the same mapping, in the order they repeat.
    pub fn duplicate_keys(&self) -> &[DuplicateKey] {
        &self.duplicates
    }

    pub fn value(&self, path: &str) -> Option<Position> {
        self.entries.get(path).and_then(|e| e.value)
    }

    /// Position of the KEY at this path (mapping entries only), e.g. key("backends.monolith") points at `monolith:`.
    pub fn key(&self, path: &str) -> Option<Position> {
        self.entries.get(path).and_then(|e| e.key)
    }

    /// Best effort: the value at path, else its key, else the nearest ancestor that exists, else 1:1. Validation always calls this.
    pub fn locate(&self, path: &str) -> Position {
        let mut current = Some(path);
        while let Some(p) = current {
            if let Some(pos) = self.value(p).or_else(|| self.key(p)) {
                return pos;
            }
            current = parent(p);
        }
        Position::START
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// `a.b[3]` → `a.b` → `a` → none.
fn parent(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    (cut > 0).then(|| &path[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"listen:
  http: 0.0.0.0:8080
backends:
  monolith:
    endpoints: [ "http://127.0.0.1:9001" ]
  users-v2:
    endpoints: [ "http://127.0.0.1:9002" ]
default_backend: monolith
routes:
  - name: users
    match: { path_prefix: /api/users }
    legacy: monolith
    target: users-v2
    split:
      percentage: { weight: 10 }
    sticky: { key: "cookie:session_id" }
  - name: orders
    match:
      path_prefix: /api/orders
      methods: [GET, 'POST']
    target: monolith
flags:
  new-users-api:
    rules: [ { header: { name: x-tenant, in: [acme, globex] } } ]
    percentage: 10
"#;

    fn pos(line: usize, col: usize) -> Option<Position> {
        Some(Position { line, col })
    }

    #[test]
    fn block_values_and_keys() {
        let idx = PositionIndex::build(CONFIG);
        assert_eq!(idx.value("listen.http"), pos(2, 9));
        assert_eq!(idx.key("listen.http"), pos(2, 3));
        assert_eq!(idx.key("backends.monolith"), pos(4, 3));
        // A block mapping value starts at its first key.
        assert_eq!(idx.value("backends.monolith"), pos(5, 5));
        assert_eq!(idx.key("default_backend"), pos(8, 1));
        assert_eq!(idx.value("default_backend"), pos(8, 18));
        assert_eq!(idx.value("routes[0].target"), pos(13, 13));
        assert_eq!(idx.key("flags.new-users-api.percentage"), pos(25, 5));
        assert_eq!(idx.value("flags.new-users-api.percentage"), pos(25, 17));
    }

    #[test]
    fn sequence_items() {
        let idx = PositionIndex::build(CONFIG);
        assert_eq!(idx.value("routes"), pos(10, 3));
        assert_eq!(idx.value("routes[0]"), pos(10, 5));
        assert_eq!(idx.value("routes[0].name"), pos(10, 11));
        assert_eq!(idx.value("routes[1]"), pos(17, 5));
        assert_eq!(idx.value("routes[1].name"), pos(17, 11));
        assert_eq!(idx.value("routes[1].match.path_prefix"), pos(19, 20));
        assert_eq!(idx.value("routes[1].match.methods"), pos(20, 16));
        assert_eq!(idx.value("routes[1].match.methods[0]"), pos(20, 17));
        assert_eq!(idx.value("routes[1].match.methods[1]"), pos(20, 22));
        assert_eq!(idx.key("routes[0]"), None);
        assert_eq!(idx.value("routes[2]"), None);
    }

    #[test]
    fn flow_style() {
        let idx = PositionIndex::build(CONFIG);
        assert_eq!(idx.value("backends.monolith.endpoints"), pos(5, 16));
        // Quoted scalars start at the opening quote.
        assert_eq!(idx.value("backends.monolith.endpoints[0]"), pos(5, 18));
        assert_eq!(idx.value("routes[0].match"), pos(11, 12));
        assert_eq!(idx.key("routes[0].match.path_prefix"), pos(11, 14));
        assert_eq!(idx.value("routes[0].match.path_prefix"), pos(11, 27));
        assert_eq!(idx.value("routes[0].split.percentage"), pos(15, 19));
        assert_eq!(idx.value("routes[0].split.percentage.weight"), pos(15, 29));
        assert_eq!(idx.value("routes[0].sticky.key"), pos(16, 20));
        assert_eq!(idx.value("flags.new-users-api.rules[0]"), pos(24, 14));
        assert_eq!(
            idx.value("flags.new-users-api.rules[0].header.name"),
            pos(24, 32)
        );
        assert_eq!(
            idx.value("flags.new-users-api.rules[0].header.in[1]"),
            pos(24, 53)
        );
    }

    #[test]
    fn locate_falls_back() {
        let idx = PositionIndex::build(CONFIG);
        assert_eq!(
            Some(idx.locate("routes[0].split")),
            idx.value("routes[0].split")
        );
        // Missing field: point at the route that lacks it.
        assert_eq!(Some(idx.locate("routes[1].split.percentage")), pos(17, 5));
        assert_eq!(Some(idx.locate("routes[7].name")), pos(10, 3));
        assert_eq!(Some(idx.locate("backends.nope.endpoints[0]")), pos(4, 3));
        assert_eq!(Some(idx.locate("nonexistent")), pos(1, 1));
        assert_eq!(Some(idx.locate("")), pos(1, 1));
    }

    #[test]
    fn locate_uses_key_when_value_is_unaddressable() {
        let idx = PositionIndex::build("a:\n  ? [x]\n  : 1\n");
        assert_eq!(idx.value("a"), pos(2, 3));
        assert_eq!(idx.locate("a"), Position { line: 2, col: 3 });
        // Complex keys are skipped, so nothing under them is indexed.
        assert_eq!(idx.value("a[0]"), None);
    }

    #[test]
    fn empty_value_points_at_the_key_line() {
        let idx = PositionIndex::build("a:\nb: 1\n");
        assert_eq!(idx.key("a"), pos(1, 1));
        assert_eq!(idx.value("a").map(|p| p.line), Some(1));
        assert_eq!(idx.value("b"), pos(2, 4));
    }

    #[test]
    fn anchors_aliases_and_tags() {
        let text = "base: &b\n  timeout: 5\nuse: *b\nname: !!str x\nlist: &l [1, *b]\n";
        let idx = PositionIndex::build(text);
        // An anchored node starts at its anchor.
        assert_eq!(idx.value("base"), pos(1, 7));
        assert_eq!(idx.value("base.timeout"), pos(2, 12));
        assert_eq!(idx.value("use"), pos(3, 6));
        // Alias targets are not expanded: the alias is the value.
        assert_eq!(idx.value("use.timeout"), None);
        assert_eq!(idx.value("name"), pos(4, 7));
        assert_eq!(idx.value("list"), pos(5, 7));
        assert_eq!(idx.value("list[1]"), pos(5, 14));
    }

    #[test]
    fn quoted_keys_and_non_ascii_columns() {
        let text = "\"quoted key\": 'v'\nnamé: ü\nx: { \"a.b\": 1 }\n";
        let idx = PositionIndex::build(text);
        assert_eq!(idx.key("quoted key"), pos(1, 1));
        assert_eq!(idx.value("quoted key"), pos(1, 15));
        // Columns count characters, not bytes.
        assert_eq!(idx.value("namé"), pos(2, 7));
        assert_eq!(idx.value("x.a.b"), pos(3, 13));
    }

    #[test]
    fn only_the_first_document() {
        let text = "---\na: 1\n---\na: 2\nb: 3\n";
        let idx = PositionIndex::build(text);
        assert_eq!(idx.value("a"), pos(2, 4));
        assert_eq!(idx.value("b"), None);
    }

    #[test]
    fn crlf_line_endings() {
        let idx = PositionIndex::build("a: 1\r\nb:\r\n  c: 2\r\n");
        assert_eq!(idx.value("b.c"), pos(3, 6));
    }

    #[test]
    fn broken_yaml_keeps_what_came_before() {
        let text = "listen:\n  http: :8080\nroutes:\n  - name: a\n    match: { path_prefix: /x\n";
        let idx = PositionIndex::build(text);
        assert_eq!(idx.value("listen.http"), pos(2, 9));
        assert_eq!(idx.value("routes[0].name"), pos(4, 11));
        assert_eq!(idx.locate("routes[0].match.path_prefix").line, 5);

        for bad in [
            "a: [1, 2",
            "a: b: c",
            "\t- x",
            "a:\n- b\n c: d",
            "}{",
            "&",
            "*",
            "a: *",
            "%YAML 9\n",
            "\"abc",
        ] {
            let _ = PositionIndex::build(bad);
        }
    }

    #[test]
    fn every_prefix_of_the_config_builds() {
        for (cut, _) in CONFIG.char_indices() {
            let idx = PositionIndex::build(&CONFIG[..cut]);
            let _ = idx.locate("routes[0].split.percentage.weight");
        }
    }

    #[test]
    fn empty_input() {
        let idx = PositionIndex::build("");
        assert_eq!(idx.locate("anything"), Position { line: 1, col: 1 });
    }
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    #[test]
    fn a_nesting_bomb_is_found_at_its_depth_limit() {
        let bomb = format!("x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let found = too_deep(&bomb, 64);
        assert!(found.is_some_and(|p| p.line == 1));
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        let block = (0..100).fold(String::new(), |text, depth| {
            text + &" ".repeat(depth) + "k:\n"
        });
        assert_eq!(too_deep(&block, 64), Some(Position { line: 65, col: 65 }));
        assert_eq!(too_deep("a: [[1], {b: [2]}]\n", 64), None);
    }
}
