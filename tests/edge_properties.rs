//! The fuzz targets of `fuzz/` run here as bounded property tests on stable Rust, over
//! arbitrary inputs and over inputs built from the pieces that matter (HTTP tokens, YAML
//! punctuation, path segments), so `cargo test` exercises the same code libFuzzer does.

use proptest::prelude::*;
use switchyard::dataplane::admission::{EscapedSlashes, normalize_path};
use switchyard::fuzzing;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text made of config keys, YAML punctuation and values, in any order.
fn yamlish() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "listen:",
        "backends:",
        "routes:",
        "default_backend:",
        "timeouts:",
        " keepalive:",
        " a:",
        "\n",
        "\n  ",
        "\n    ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        " ",
        "\"",
        "'",
        "&a ",
        "*a",
        "!!str ",
        "300000000000y",
        "1s",
        "99999",
        "http://127.0.0.1:",
        "/api/./x",
        "${X}",
        "#",
        "%",
        "\t",
        "~",
        "-1",
        "1e400",
        "endpoints:",
        "path_prefix:",
    ]);
    prop::collection::vec(pieces, 0..200).prop_map(|v| v.concat())
}

/// Streams of request-ish bytes: methods, headers that decide framing, chunk sizes, CRLFs
/// and `0xFF` read boundaries.
fn http_stream() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop::sample::select(vec![
        &b"GET / HTTP/1.1\r\n"[..],
        b"POST /a HTTP/1.1\r\n",
        b"Host: a\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: 1, 1\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"\r\n",
        b"\n",
        b"abc",
        b"3\r\n",
        b"0\r\n\r\n",
        b"zz\r\n",
        b"\xff",
        b" ",
        b":",
        b"X-Long: ",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ]);
    prop::collection::vec(pieces, 0..60).prop_map(|v| v.concat())
}

/// Request facts in the `route_and_split` layout: method, target, address, headers.
fn request_facts() -> impl Strategy<Value = Vec<u8>> {
    let segment = prop::sample::select(vec![
        "api",
        "users",
        ".",
        "..",
        "",
        "%2e",
        "%2F",
        "%41",
        "%zz",
        "a",
        "b",
        "c",
        "flag",
        "bg",
        "7",
        "x?user=ops%40example.test",
        "?",
        "#",
    ]);
    let path = prop::collection::vec(segment, 0..12).prop_map(|s| format!("/{}", s.join("/")));
    let host = prop::sample::select(vec![
        "shop.example.test",
        "SHOP.example.test.",
        "a.example.test",
        "x",
        "",
        "a b",
        "[::1]:8",
        "h:99999",
        "u@h",
    ]);
    let method = prop::sample::select(vec!["GET", "POST", "CONNECT", "DELETE", "BREW"]);
    let header = prop::sample::select(vec![
        ("x-canary", "1"),
        ("cookie", "beta=a; sid=9"),
        ("x-user", "u1"),
        ("x-preview", "1"),
        ("transfer-encoding", "gzip"),
        ("cookie", "beta=b"),
    ]);
    (
        method,
        path,
        any::<u8>(),
        host,
        prop::collection::vec(header, 0..4),
    )
        .prop_map(|(method, path, ip, host, headers)| {
            let ip = [ip];
            let mut fields: Vec<&[u8]> = vec![method.as_bytes(), path.as_bytes(), &ip];
            fields.extend([&b"host"[..], host.as_bytes()]);
            for (name, value) in &headers {
                fields.extend([name.as_bytes(), value.as_bytes()]);
            }
            fields.join(&0xFF)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_loader_never_panics_on_bytes(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzzing::config_loader(&data);
    }

    #[test]
    fn config_loader_never_panics_on_yamlish_text(text in yamlish()) {
        fuzzing::config_loader(text.as_bytes());
    }

    #[test]
    fn head_guard_verdicts_do_not_depend_on_reads(data in http_stream()) {
        fuzzing::head_guard(&data);
    }

    #[test]
    fn head_guard_never_panics_on_bytes(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzzing::head_guard(&data);
    }

    #[test]
    fn route_and_split_hold_for_any_request(data in request_facts()) {
        fuzzing::route_and_split(&data);
    }

    #[test]
    fn route_and_split_never_panic_on_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::route_and_split(&data);
    }

    /// Normalising twice changes nothing, and what comes out has no dot segment, no empty
    /// segment and no escape of an unreserved character.
    #[test]
    fn normalised_paths_are_normal(path in "(/(\\.|\\.\\.|%2[eE]|%41|[a-c]{0,2}|%2[fF]))*/?") {
        if let Ok(once) = normalize_path(&path, EscapedSlashes::Keep) {
            prop_assert_eq!(normalize_path(&once, EscapedSlashes::Keep).unwrap(), once.clone());
            prop_assert!(once.starts_with('/'));
            prop_assert!(!once.contains("//"));
            prop_assert!(once.split('/').all(|s| s != "." && s != ".."));
            prop_assert!(!once.contains("%41") && !once.contains("%2e") && !once.contains("%2E"));
        }
    }
}
