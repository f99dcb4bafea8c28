//! YAML syntax errors in plain words: a tab in the indentation, a key indented too far or not
//! far enough, each at the position where it is written and naming the key it would belong to.
//!
//! The YAML scanner's own messages ("mapping values are not allowed in this context", "did not
//! find expected key") describe its state, not the mistake, and point after it. This module
//! looks at the lines around the scanner's position to say what was most likely meant; when no
//! rule fits, the scanner's message is kept.

use super::position::Position;

/// A better message and position for a syntax error the scanner reported at `at` with
/// `message`, or `None` to keep the scanner's.
pub(super) fn explain(text: &str, at: Position, message: &str) -> Option<(Position, String)> {
    let lines: Vec<&str> = text.lines().collect();
    if let Some(found) = tab_indentation(&lines, at) {
        return Some(found);
    }
    let line = lines.get(at.line.checked_sub(1)?)?;
    let key = key_of(line)?;
    let indent = indent_of(line);
    let pos = Position {
        line: at.line,
        col: indent + 1,
    };
    let above = enclosing(&lines, at.line - 1);
    if message.contains("mapping values are not allowed")
        || message.contains("did not find expected key")
    {
        // `key: value` followed by a line indented further: the scanner reads the second line
        // as a continuation of the first value (or finds no key after a flow value), then
        // trips over its colon.
        let prev = above.first()?;
        if indent > prev.indent && prev.has_value {
            let mut m = format!(
                "`{key}` is indented more than `{}` on line {}, which already has a value, so it \
                 cannot hold `{key}`",
                prev.key, prev.line
            );
            m.push_str(&format!(
                "; indent `{key}` to column {} to make it a sibling of `{}`",
                prev.indent + 1,
                prev.key
            ));
            if let Some(parent) = above.iter().find(|l| l.indent < prev.indent) {
                m.push_str(&format!(" (a key of `{}`)", parent.key));
            } else {
                m.push_str(" (a top-level key)");
            }
            return Some((pos, m));
        }
    }
    if message.contains("did not find expected key")
        || message.contains("did not find expected '-' indicator")
    {
        // A key whose indentation matches no open mapping: name the levels it falls between.
        let deeper = above.iter().find(|l| l.indent > indent);
        let shallower = above.iter().find(|l| l.indent < indent);
        if let Some(deeper) = deeper {
            let owner_of = |level: usize| {
                above
                    .iter()
                    .find(|l| l.indent < level)
                    .map_or("a top-level key".to_string(), |l| {
                        format!("a key of `{}`", l.key)
                    })
            };
            let mut m = format!(
                "`{key}` at column {} lines up with no key above it: indent it to column {} to \
                 make it {} like `{}` on line {}",
                indent + 1,
                deeper.indent + 1,
                owner_of(deeper.indent),
                deeper.key,
                deeper.line,
            );
            if let Some(shallower) = shallower {
                m.push_str(&format!(
                    ", or to column {} to make it {} like `{}`",
                    shallower.indent + 1,
                    owner_of(shallower.indent),
                    shallower.key
                ));
            }
            return Some((pos, m));
        }
    }
    None
}

/// YAML forbids tabs for indentation (YAML 1.2 §6.1); the scanner says "found character that
/// cannot start any token" and, inside a block, points elsewhere.
fn tab_indentation(lines: &[&str], at: Position) -> Option<(Position, String)> {
    // The tab is on the reported line or, when the scanner first saw a problem later, above it.
    let first = at.line.saturating_sub(1).min(lines.len());
    for (i, line) in lines.iter().enumerate().take(first + 1).rev() {
        let leading = &line[..line.len() - line.trim_start_matches([' ', '\t']).len()];
        if let Some(col) = leading.find('\t') {
            return Some((
                Position {
                    line: i + 1,
                    col: col + 1,
                },
                "a tab in the indentation: tabs are not allowed for indentation in YAML; \
                 indent with spaces"
                    .to_string(),
            ));
        }
        if i + 1 < at.line && !line.trim().is_empty() {
            break;
        }
    }
    None
}

/// A block-mapping line above the error: its key, where it starts and whether a value follows.
struct KeyLine<'a> {
    line: usize,
    indent: usize,
    key: &'a str,
    has_value: bool,
}

/// The block keys above `before` (0-based exclusive), nearest first, each less indented than
/// the one after it: the chain of mappings the next line could belong to, plus the nearest key.
fn enclosing<'a>(lines: &[&'a str], before: usize) -> Vec<KeyLine<'a>> {
    let mut out: Vec<KeyLine<'a>> = Vec::new();
    for i in (0..before.min(lines.len())).rev() {
        let line = lines[i];
        let Some(key) = key_of(line) else { continue };
        let indent = indent_of(line);
        if out.last().is_some_and(|l| indent >= l.indent) {
            continue;
        }
        let after = line[indent..].trim_start_matches("- ");
        let value = after[after.find(':').map_or(after.len(), |c| c + 1)..].trim();
        out.push(KeyLine {
            line: i + 1,
            indent,
            key,
            has_value: !value.is_empty() && !value.starts_with('#'),
        });
        if indent == 0 {
            break;
        }
    }
    out
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The key of a `key: …` line (after an optional `- `); none for comments, flow collections
/// and plain scalars.
fn key_of(line: &str) -> Option<&str> {
    let body = line.trim_start_matches(' ').trim_start_matches("- ");
    if body.starts_with('#') || body.starts_with(['{', '[', '"', '\'']) {
        return None;
    }
    let colon = body
        .find(": ")
        .or_else(|| body.strip_suffix(':').map(str::len))?;
    let key = body[..colon].trim();
    (!key.is_empty() && !key.contains(' ')).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize, col: usize) -> Position {
        Position { line, col }
    }

    #[test]
    fn tab_in_indentation() {
        let (pos, m) = explain("listen:\n\thttp: 1\n", at(2, 1), "found character").unwrap();
        assert_eq!(pos, at(2, 1));
        assert!(m.contains("tabs are not allowed for indentation"), "{m}");
        let (pos, _) = explain("a:\n  b: 1\n  \tc: 2\n", at(3, 3), "x").unwrap();
        assert_eq!(pos, at(3, 3));
    }

    #[test]
    fn key_indented_too_far() {
        let text = "listen:\n  http: 127.0.0.1:1\n    admin: 2\nbackends: {}\n";
        let (pos, m) = explain(
            text,
            at(3, 10),
            "mapping values are not allowed in this context",
        )
        .unwrap();
        assert_eq!(pos, at(3, 5));
        assert!(
            m.contains("`admin` is indented more than `http` on line 2"),
            "{m}"
        );
        assert!(
            m.contains("column 3") && m.contains("a key of `listen`"),
            "{m}"
        );
    }

    #[test]
    fn key_indented_too_little() {
        let text = "listen:\n  http: 127.0.0.1:1\n admin: 2\n";
        let (pos, m) = explain(text, at(3, 2), "did not find expected key").unwrap();
        assert_eq!(pos, at(3, 2));
        assert!(
            m.contains("`admin` at column 2 lines up with no key above it"),
            "{m}"
        );
        assert!(m.contains("column 3 to make it a key of `listen`"), "{m}");
        assert!(
            m.contains("column 1 to make it a top-level key like `listen`"),
            "{m}"
        );
    }

    #[test]
    fn other_errors_keep_the_scanners_words() {
        assert!(explain("a: [1, 2\n", at(2, 1), "did not find expected ',' or ']'").is_none());
    }
}
