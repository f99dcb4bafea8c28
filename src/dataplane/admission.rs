//! What a request must look like before it is routed: one authority, one normal path, and
//! no protocol the proxy cannot carry. Pure: no I/O, and the same answer for the same head.
//!
//! The rule is that every request means one thing: the authority the proxy routes on is
//! the one the backend receives, and the path it matches on is the one it forwards. What
//! cannot be made unambiguous is refused here, before routing, and is the client's error.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Uri, Version};

/// What to do with `%2F` and `%5C` (an encoded `/` or `\`) in a path, after Envoy's
/// `path_with_escaped_slashes_action`: a backend that decodes them would see other
/// segments than the proxy routed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// 400 `escaped_slash` (the default).
    #[default]
    Reject,
    /// Forwarded as they are (`%2F`, `%5C`, hex upper-cased); they never split a segment.
    Keep,
}

/// Why a request is refused before routing; the status and a stable code for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
}

const fn refuse(status: u16, code: &'static str, message: &'static str) -> Refusal {
    Refusal {
        status,
        code,
        message,
    }
}

const MISSING_HOST: Refusal = refuse(
    400,
    "missing_host",
    "an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)",
);
const DUPLICATE_HOST: Refusal = refuse(
    400,
    "duplicate_host",
    "the request carries more than one Host header (RFC 9112 §3.2)",
);
const INVALID_HOST: Refusal = refuse(
    400,
    "invalid_host",
    "the request's Host or authority is not a valid host[:port]",
);
const AUTHORITY_MISMATCH: Refusal = refuse(
    400,
    "authority_mismatch",
    "the request's :authority and Host name different hosts (RFC 9113 §8.3.1)",
);
const ESCAPED_SLASH: Refusal = refuse(
    400,
    "escaped_slash",
    "the path holds an encoded `/` or `\\`, which backends read differently",
);
const BAD_PATH: Refusal = refuse(
    400,
    "invalid_path",
    "the path holds an invalid percent-escape or a backslash",
);
const ASTERISK_FORM: Refusal = refuse(
    400,
    "asterisk_form",
    "a `*` request target is not forwarded",
);
const CONNECT: Refusal = refuse(
    405,
    "connect_not_allowed",
    "CONNECT is not forwarded: switchyard is not a tunnel",
);
const UNKNOWN_CODING: Refusal = refuse(
    501,
    "unsupported_transfer_coding",
    "only `Transfer-Encoding: chunked` is understood (RFC 9112 §6.1)",
);

/// A request that may be routed: the facts to route on and what to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Lower-case host name without port or trailing dot; `None` only for an HTTP/1.0
    /// request without Host.
    pub host: Option<String>,
    /// The authority routed on, sent to the backend as `Host`.
    pub authority: Option<HeaderValue>,
    /// The normalised path when it differs from the received one.
    pub path: Option<String>,
}

/// Admits or refuses one request head. `uri` is as hyper parsed it: origin-form for most
/// HTTP/1 requests, absolute-form with an authority for proxies' requests and HTTP/2.
pub fn admit(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    escaped_slashes: EscapedSlashes,
) -> Result<Admitted, Refusal> {
    if method == Method::CONNECT {
        return Err(CONNECT);
    }
    if uri.path() == "*" {
        return Err(ASTERISK_FORM);
    }
    transfer_coding(headers)?;
    let authority = authority(uri, version, headers)?;
    let host = match &authority {
        Some(a) => Some(host_name(a.as_bytes()).ok_or(INVALID_HOST)?),
        None => None,
    };
    let path = match normalize_path(uri.path(), escaped_slashes)? {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(p),
    };
    Ok(Admitted {
        host,
        authority,
        path,
    })
}

/// Any coding but a lone `chunked` would be dropped with the hop-by-hop headers while the
/// body stays coded (RFC 9112 §6.1: a server answers 501 to codings it does not know).
fn transfer_coding(headers: &HeaderMap) -> Result<(), Refusal> {
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let ok = value
            .as_bytes()
            .split(|&b| b == b',')
            .all(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if !ok {
            return Err(UNKNOWN_CODING);
        }
    }
    Ok(())
}

/// The one authority of the request: the target's (absolute-form, HTTP/2 `:authority`),
/// which RFC 9112 §3.2.2 puts before Host, else the single Host header.
fn authority(
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(DUPLICATE_HOST);
    }
    if let Some(target) = uri.authority() {
        if target.as_str().contains('@') {
            return Err(INVALID_HOST);
        }
        if version == Version::HTTP_2
            && let Some(h) = host
            && !same_authority(h.as_bytes(), target.as_str().as_bytes())
        {
            return Err(AUTHORITY_MISMATCH);
        }
        // HTTP/1.1 still requires a Host line even with an absolute target (§3.2).
        if version == Version::HTTP_11 && host.is_none() {
            return Err(MISSING_HOST);
        }
        return HeaderValue::from_str(target.as_str())
            .map(Some)
            .map_err(|_| INVALID_HOST);
    }
    match host {
        Some(h) => Ok(Some(h.clone())),
        None if version == Version::HTTP_10 || version == Version::HTTP_09 => Ok(None),
        None => Err(MISSING_HOST),
    }
}

/// Two authorities name the same host and port (case and a trailing dot aside).
fn same_authority(a: &[u8], b: &[u8]) -> bool {
    match (split_authority(a), split_authority(b)) {
        (Some((ha, pa)), Some((hb, pb))) => {
            trim_dot(ha).eq_ignore_ascii_case(trim_dot(hb)) && pa == pb
        }
        _ => false,
    }
}

fn trim_dot(name: &[u8]) -> &[u8] {
    name.strip_suffix(b".").unwrap_or(name)
}

/// `host[:port]` split, checked: a reg-name or IPv4 of RFC 3986 characters, or an IPv6
/// literal in brackets; a port of 1 to 5 digits. No userinfo.
fn split_authority(value: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (host, port) = if value.first() == Some(&b'[') {
        let end = value.iter().position(|&b| b == b']')?;
        let (host, rest) = value.split_at(end + 1);
        let inner = &host[1..host.len() - 1];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        {
            return None;
        }
        match rest {
            [] => (host, None),
            [b':', port @ ..] => (host, Some(port)),
            _ => return None,
        }
    } else {
        let (host, port) = match value.iter().rposition(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        };
        let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~".contains(b);
        if host.is_empty() || !host.iter().all(reg_name) || host.starts_with(b".") {
            return None;
        }
        (host, port)
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit))
    {
        return None;
    }
    Some((host, port))
}

/// The name routes match on: lower case, no port, no trailing dot (`shop.example.test.`
/// is the same name as `shop.example.test`, RFC 1034 §3.1).
fn host_name(authority: &[u8]) -> Option<String> {
    let (host, _) = split_authority(authority)?;
    let name = trim_dot(host);
    if name.is_empty() {
        return None;
    }
    // ASCII by construction.
    Some(String::from_utf8_lossy(name).to_ascii_lowercase())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path as Envoy's `normalize_path` and `merge_slashes` make it: percent-escapes of
/// unreserved characters decoded and the others upper-cased (RFC 3986 §6.2.2.1–2), dot
/// segments removed (§5.2.4), runs of `/` merged. Borrowed when already normal. Iterative:
/// its cost is linear in the path, whatever its depth.
pub fn normalize_path(
    path: &str,
    escaped_slashes: EscapedSlashes,
) -> Result<Cow<'_, str>, Refusal> {
    let bytes = path.as_bytes();
    if bytes.contains(&b'\\') {
        return Err(BAD_PATH);
    }
    let dot_segment = |i: usize| {
        bytes[i] == b'/'
            && matches!(
                &bytes[i + 1..],
                [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
            )
    };
    let normal = bytes.first() == Some(&b'/')
        && !bytes.contains(&b'%')
        && !bytes.windows(2).any(|w| w == b"//")
        && !(0..bytes.len()).any(dot_segment);
    if normal {
        return Ok(Cow::Borrowed(path));
    }

    // Pass 1: escapes. Bytes, copied as they are: the input is UTF-8 and only ASCII is
    // added, so the result is too.
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len() + 1);
    if bytes.first() != Some(&b'/') {
        decoded.push(b'/');
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            decoded.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(BAD_PATH);
        };
        let value = hi * 16 + lo;
        if is_unreserved(value) {
            decoded.push(value);
        } else {
            if (value == b'/' || value == b'\\') && escaped_slashes == EscapedSlashes::Reject {
                return Err(ESCAPED_SLASH);
            }
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            decoded.extend_from_slice(&[b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]]);
        }
        i += 3;
    }

    // Pass 2: segments, with a stack of output lengths to pop `..` without recursion.
    let mut out: Vec<u8> = Vec::with_capacity(decoded.len());
    let mut starts: Vec<usize> = Vec::new();
    let mut trailing = false;
    for segment in decoded.split(|&b| b == b'/').skip(1) {
        trailing = false;
        match segment {
            b"" | b"." => trailing = true,
            b".." => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
                trailing = true;
            }
            s => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(s);
            }
        }
    }
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    if out == bytes {
        return Ok(Cow::Borrowed(path));
    }
    String::from_utf8(out).map(Cow::Owned).map_err(|_| BAD_PATH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, &'static str> {
        normalize_path(p, EscapedSlashes::Reject)
            .map(Cow::into_owned)
            .map_err(|r| r.code)
    }

    #[test]
    fn paths_are_normalised_like_envoy_does() {
        assert_eq!(norm("/api/users/7").unwrap(), "/api/users/7");
        assert_eq!(norm("/api/./users/7").unwrap(), "/api/users/7");
        assert_eq!(norm("/api//users/7").unwrap(), "/api/users/7");
        assert_eq!(norm("/api/x/../users/7").unwrap(), "/api/users/7");
        assert_eq!(norm("/../../api/users").unwrap(), "/api/users");
        assert_eq!(norm("/api/users/").unwrap(), "/api/users/");
        assert_eq!(norm("/api/users/.").unwrap(), "/api/users/");
        assert_eq!(norm("/api/users/..").unwrap(), "/api/");
        assert_eq!(norm("/%61pi/%7eusers").unwrap(), "/api/~users");
        assert_eq!(norm("/api/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(norm("/a%3fb%c3%a9").unwrap(), "/a%3Fb%C3%A9");
        assert_eq!(norm("//").unwrap(), "/");
        assert_eq!(norm("/").unwrap(), "/");
        assert_eq!(norm("/..").unwrap(), "/");
        assert_eq!(norm("/a/.../b").unwrap(), "/a/.../b");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(norm("/api%2fusers"), Err("escaped_slash"));
        assert_eq!(norm("/api%5Cusers"), Err("escaped_slash"));
        assert_eq!(norm("/api\\users"), Err("invalid_path"));
        assert_eq!(norm("/api%zz"), Err("invalid_path"));
        assert_eq!(norm("/api%2"), Err("invalid_path"));
        assert_eq!(
            normalize_path("/api%2fusers", EscapedSlashes::Keep).unwrap(),
            "/api%2Fusers"
        );
    }

    fn head(uri: &str, version: Version, hosts: &[&str]) -> Result<Admitted, &'static str> {
        let mut headers = HeaderMap::new();
        for h in hosts {
            headers.append(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        admit(
            &Method::GET,
            &uri.parse().unwrap(),
            version,
            &headers,
            EscapedSlashes::Reject,
        )
        .map_err(|r| r.code)
    }

    #[test]
    fn one_authority_per_request() {
        let a = head("/x", Version::HTTP_11, &["Shop.Example.Test.:8080"]).unwrap();
        assert_eq!(a.host.as_deref(), Some("shop.example.test"));
        assert_eq!(a.authority.unwrap(), "Shop.Example.Test.:8080");
        // Absolute form: the target's authority is routed on and forwarded.
        let a = head("http://shop.example.test/x", Version::HTTP_11, &["a"]).unwrap();
        assert_eq!(a.host.as_deref(), Some("shop.example.test"));
        assert_eq!(a.authority.unwrap(), "shop.example.test");
        assert_eq!(head("/x", Version::HTTP_11, &[]), Err("missing_host"));
        assert_eq!(
            head("/x", Version::HTTP_11, &["a", "b"]),
            Err("duplicate_host")
        );
        assert_eq!(head("/x", Version::HTTP_11, &["a b"]), Err("invalid_host"));
        assert_eq!(head("/x", Version::HTTP_11, &["u@a"]), Err("invalid_host"));
        assert_eq!(
            head("/x", Version::HTTP_11, &["a:99x"]),
            Err("invalid_host")
        );
        assert_eq!(head("/x", Version::HTTP_11, &[""]), Err("invalid_host"));
        assert_eq!(
            head("/x", Version::HTTP_11, &["[::1]:80"])
                .unwrap()
                .host
                .as_deref(),
            Some("[::1]")
        );
        assert_eq!(head("/x", Version::HTTP_10, &[]).unwrap().host, None);
        // HTTP/2: :authority and host must agree.
        assert_eq!(
            head("https://a.test/x", Version::HTTP_2, &["b.test"]),
            Err("authority_mismatch")
        );
        assert!(head("https://a.test/x", Version::HTTP_2, &["A.test."]).is_ok());
        assert!(head("https://a.test/x", Version::HTTP_2, &[]).is_ok());
    }

    #[test]
    fn protocols_the_proxy_cannot_carry_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("a"));
        let uri: Uri = "/x".parse().unwrap();
        let code = |m: &Method, h: &HeaderMap| {
            admit(m, &uri, Version::HTTP_11, h, EscapedSlashes::Reject).map_err(|r| r.status)
        };
        assert_eq!(code(&Method::CONNECT, &headers), Err(405));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        assert_eq!(code(&Method::POST, &headers), Err(501));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("Chunked"),
        );
        assert!(code(&Method::POST, &headers).is_ok());
        let star: Uri = "*".parse().unwrap();
        let refused = admit(
            &Method::GET,
            &star,
            Version::HTTP_11,
            &headers,
            EscapedSlashes::Reject,
        );
        assert_eq!(refused.unwrap_err().code, "asterisk_form");
    }
}
