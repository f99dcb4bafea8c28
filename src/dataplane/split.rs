//! Split decisions: which side (legacy or target) a request goes to, given a route's split,
//! the request's facts and its sticky bucket.
//!
//! Everything here is pure: no I/O, no clock, no allocation. Randomness enters only through
//! the `Bucket` the caller passes in, so the same inputs always give the same side.

use std::fmt;
use std::net::IpAddr;

use http::HeaderMap;
use http::header::{COOKIE, HeaderName};
use ipnet::IpNet;
use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

/// Number of sticky buckets. Part of the stickiness contract: changing it moves users.
pub const BUCKETS: u16 = 10_000;

/// The two places a route can send a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Legacy,
    Target,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Legacy => "legacy",
            Side::Target => "target",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Legacy => Side::Target,
            Side::Target => Side::Legacy,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A target share with two decimals, kept as basis points (0..=10,000) so that the
/// comparison with a bucket is exact integer arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Weight(u16);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightError {
    #[error("weight {0} is out of range: it must be between 0 and 100")]
    OutOfRange(f64),
    #[error("weight {0} has more than two decimals (use e.g. 12.5 or 0.25)")]
    TooPrecise(f64),
}

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(BUCKETS);

    pub fn from_percent(percent: f64) -> Result<Weight, WeightError> {
        if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
            return Err(WeightError::OutOfRange(percent));
        }
        let scaled = percent * 100.0;
        let rounded = scaled.round();
        // Floating point turns 12.34 into 1233.9999…; anything further away than that
        // had a third decimal the operator meant, and silently rounding it would lie.
        if (scaled - rounded).abs() > 1e-6 {
            return Err(WeightError::TooPrecise(percent));
        }
        Ok(Weight(rounded as u16))
    }

    pub fn from_basis_points(bp: u16) -> Option<Weight> {
        (bp <= BUCKETS).then_some(Weight(bp))
    }

    pub fn basis_points(self) -> u16 {
        self.0
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }

    /// The one comparison that makes ramps monotonic: a bucket is on target exactly when it
    /// lies below the weight, so raising the weight only adds buckets and lowering it only
    /// removes the highest ones.
    pub fn admits(self, bucket: Bucket) -> bool {
        bucket.0 < self.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.percent())
    }
}

/// One of the 10,000 sticky buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bucket(u16);

impl Bucket {
    /// `xxh3_64(name ++ ":" ++ key) mod 10000`, seed 0. Documented in the README: it is the
    /// stickiness contract across processes, machines and versions.
    pub fn of(name: &str, key: &[u8]) -> Bucket {
        let len = name.len() + 1 + key.len();
        // The one-shot hash over a stack copy is several times cheaper than the streaming
        // state, which is large; both give the same value.
        let hash = if len <= 256 {
            let mut buf = [0u8; 256];
            buf[..name.len()].copy_from_slice(name.as_bytes());
            buf[name.len()] = b':';
            buf[name.len() + 1..len].copy_from_slice(key);
            xxh3_64(&buf[..len])
        } else {
            let mut hasher = Xxh3Default::new();
            hasher.update(name.as_bytes());
            hasher.update(b":");
            hasher.update(key);
            hasher.digest()
        };
        Bucket((hash % u64::from(BUCKETS)) as u16)
    }

    /// A bucket from any 64 random bits, for requests without a sticky key.
    pub fn from_random(bits: u64) -> Bucket {
        Bucket((bits % u64::from(BUCKETS)) as u16)
    }

    pub fn new(value: u16) -> Option<Bucket> {
        (value < BUCKETS).then_some(Bucket(value))
    }

    pub fn value(self) -> u16 {
        self.0
    }
}

/// Where the sticky key of a request is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    Cookie(String),
    Header(HeaderName),
    ClientIp,
    /// A random id the proxy mints and hands back in this cookie.
    Generated {
        cookie: String,
    },
}

pub const DEFAULT_GENERATED_COOKIE: &str = "switchyard_id";

/// What a request offers for a sticky key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMaterial<'a> {
    Bytes(&'a [u8]),
    Ip(IpAddr),
    Missing,
}

impl StickyKey {
    pub fn extract<'a>(&self, req: &RequestFacts<'a>) -> KeyMaterial<'a> {
        let found = match self {
            StickyKey::Cookie(name) | StickyKey::Generated { cookie: name } => {
                cookie_value(req.headers, name)
            }
            StickyKey::Header(name) => req.headers.get(name).map(|v| v.as_bytes()),
            StickyKey::ClientIp => return KeyMaterial::Ip(req.client_ip),
        };
        match found {
            Some(bytes) if !bytes.is_empty() => KeyMaterial::Bytes(bytes),
            _ => KeyMaterial::Missing,
        }
    }
}

impl KeyMaterial<'_> {
    pub fn bucket(self, name: &str) -> Option<Bucket> {
        match self {
            KeyMaterial::Bytes(bytes) => Some(Bucket::of(name, bytes)),
            // The textual form is what a person would put in a test or a runbook, so the
            // bucket of an address can be computed by hand from the README's formula.
            KeyMaterial::Ip(ip) => {
                let mut buf = [0u8; 39];
                let text = write_ip(ip, &mut buf);
                Some(Bucket::of(name, text))
            }
            KeyMaterial::Missing => None,
        }
    }
}

fn write_ip(ip: IpAddr, buf: &mut [u8; 39]) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 39 bytes hold the longest textual IPv6 address, so the write cannot fail.
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    &buf[..len]
}

/// The parts of a request that matching and splitting look at, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a http::Method,
    /// Lower-case host without port, from `Host` or the URI authority.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub client_ip: IpAddr,
}

/// How a header, cookie or query value must look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    AnyOf(Vec<String>),
    Present,
}

impl ValueMatch {
    fn holds(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (_, None) => false,
            (ValueMatch::Present, Some(_)) => true,
            (ValueMatch::Exact(want), Some(v)) => want.as_bytes() == v,
            (ValueMatch::AnyOf(wants), Some(v)) => wants.iter().any(|w| w.as_bytes() == v),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Header(HeaderName, ValueMatch),
    Cookie(String, ValueMatch),
    Query(String, ValueMatch),
    ClientIp(Vec<IpNet>),
}

impl Condition {
    pub fn holds(&self, req: &RequestFacts<'_>) -> bool {
        match self {
            Condition::Header(name, want) => header_matches(req.headers, name, want),
            Condition::Cookie(name, want) => want.holds(cookie_value(req.headers, name)),
            Condition::Query(name, want) => query_holds(req.query, name, want),
            Condition::ClientIp(nets) => nets.iter().any(|net| net.contains(&req.client_ip)),
        }
    }
}

/// A header may repeat; any of its values may satisfy the match.
pub fn header_matches(headers: &HeaderMap, name: &HeaderName, want: &ValueMatch) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| want.holds(Some(v.as_bytes())))
}

/// A rule holds when all of its conditions hold; a list of rules holds when any rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub conditions: Vec<Condition>,
}

impl Rule {
    pub fn holds(&self, req: &RequestFacts<'_>) -> bool {
        self.conditions.iter().all(|c| c.holds(req))
    }
}

pub fn any_rule(rules: &[Rule], req: &RequestFacts<'_>) -> bool {
    rules.iter().any(|r| r.holds(req))
}

/// A feature flag: rules that force it on, then a share of everyone else.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    pub name: String,
    pub rules: Vec<Rule>,
    pub weight: Weight,
    pub sticky: Option<StickyKey>,
}

impl Flag {
    pub fn enabled_for(&self, req: &RequestFacts<'_>, bucket: Bucket) -> bool {
        any_rule(&self.rules, req) || self.weight.admits(bucket)
    }
}

/// Index of a flag in the snapshot's flag list, resolved at validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlagId(pub u32);

#[derive(Debug, Clone, PartialEq)]
pub enum Split {
    Percentage { weight: Weight },
    Canary { rules: Vec<Rule>, weight: Weight },
    BlueGreen { active: Side, preview: Option<Rule> },
    FeatureFlag { flag: FlagId },
}

impl Split {
    pub fn kind(&self) -> &'static str {
        match self {
            Split::Percentage { .. } => "percentage",
            Split::Canary { .. } => "canary",
            Split::BlueGreen { .. } => "blue_green",
            Split::FeatureFlag { .. } => "feature_flag",
        }
    }

    /// The share of keyless traffic that goes to target, for the `route_weight` gauge.
    pub fn effective_weight(&self, flags: &[Flag]) -> Weight {
        match self {
            Split::Percentage { weight } | Split::Canary { weight, .. } => *weight,
            Split::BlueGreen { active, .. } => match active {
                Side::Legacy => Weight::ZERO,
                Side::Target => Weight::FULL,
            },
            Split::FeatureFlag { flag } => flags
                .get(flag.0 as usize)
                .map_or(Weight::ZERO, |f| f.weight),
        }
    }
}

/// The split decision. `bucket` is the sticky bucket of whichever key applies (the route's,
/// or the flag's for a feature-flag split), or a random one when the request has none.
pub fn decide(split: &Split, flags: &[Flag], req: &RequestFacts<'_>, bucket: Bucket) -> Side {
    let to_target = match split {
        Split::Percentage { weight } => weight.admits(bucket),
        Split::Canary { rules, weight } => any_rule(rules, req) || weight.admits(bucket),
        Split::BlueGreen { active, preview } => {
            return match preview {
                Some(rule) if rule.holds(req) => active.other(),
                _ => *active,
            };
        }
        // Validation resolves every flag id, so a missing flag only happens if a snapshot
        // was built by hand; legacy is the safe answer then.
        Split::FeatureFlag { flag } => flags
            .get(flag.0 as usize)
            .is_some_and(|f| f.enabled_for(req, bucket)),
    };
    if to_target {
        Side::Target
    } else {
        Side::Legacy
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, without allocating.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get_all(COOKIE).iter().find_map(|header| {
        header.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = memchr::memchr(b'=', pair)?;
            (&pair[..eq] == name.as_bytes()).then(|| {
                let value = pair[eq + 1..].trim_ascii();
                value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value)
            })
        })
    })
}

/// Whether a query parameter named `name` has a value that `want` accepts, both compared
/// decoded (`%40` is `@`, `+` is a space: WHATWG `application/x-www-form-urlencoded`), so a
/// rule written `ops@example.test` holds for `?user=ops%40example.test`. No allocation.
pub fn query_holds(query: Option<&str>, name: &str, want: &ValueMatch) -> bool {
    let Some(query) = query else { return false };
    query.split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !decoded(key.as_bytes()).eq(name.bytes()) {
            return false;
        }
        match want {
            ValueMatch::Present => true,
            ValueMatch::Exact(w) => decoded(value.as_bytes()).eq(w.bytes()),
            ValueMatch::AnyOf(ws) => ws.iter().any(|w| decoded(value.as_bytes()).eq(w.bytes())),
        }
    })
}

/// A query component's bytes, percent-escapes and `+` decoded; an invalid escape stays as
/// written.
fn decoded(raw: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16)).map(|d| d as u8);
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *raw.get(i)?;
        i += 1;
        Some(match b {
            b'+' => b' ',
            b'%' => match (hex(raw.get(i)), hex(raw.get(i + 1))) {
                (Some(hi), Some(lo)) => {
                    i += 2;
                    hi * 16 + lo
                }
                _ => b'%',
            },
            b => b,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Method};

    fn facts<'a>(headers: &'a HeaderMap, query: Option<&'a str>, ip: &str) -> RequestFacts<'a> {
        RequestFacts {
            method: &Method::GET,
            host: None,
            path: "/",
            query,
            headers,
            client_ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn weight_parses_two_decimals_and_rejects_more() {
        assert_eq!(Weight::from_percent(12.34).unwrap().basis_points(), 1234);
        assert_eq!(Weight::from_percent(0.01).unwrap().basis_points(), 1);
        assert_eq!(Weight::from_percent(100.0).unwrap(), Weight::FULL);
        assert!(matches!(
            Weight::from_percent(12.345),
            Err(WeightError::TooPrecise(_))
        ));
        assert!(matches!(
            Weight::from_percent(100.01),
            Err(WeightError::OutOfRange(_))
        ));
        assert!(matches!(
            Weight::from_percent(-1.0),
            Err(WeightError::OutOfRange(_))
        ));
        assert!(Weight::from_percent(f64::NAN).is_err());
    }

    #[test]
    fn bucket_is_the_documented_formula() {
        let expected = xxhash_rust::xxh3::xxh3_64(b"users:alice") % 10_000;
        assert_eq!(u64::from(Bucket::of("users", b"alice").value()), expected);
    }

    #[test]
    fn bucket_values_pinned_across_versions() {
        // Computed with Python's `xxhash` (the reference C implementation):
        // xxhash.xxh3_64_intdigest(b"users:alice") % 10000. If these change, every sticky
        // user in production moves side.
        assert_eq!(Bucket::of("users", b"alice").value(), 1422);
        assert_eq!(Bucket::of("users", b"bob").value(), 493);
        assert_eq!(Bucket::of("users", b"carol").value(), 6950);
        // Past the stack buffer the streaming hasher takes over; the value must not change.
        let long_key = vec![b'k'; 1000];
        let expected = xxh3_64(&[b"users:".as_slice(), &long_key].concat()) % 10_000;
        assert_eq!(u64::from(Bucket::of("users", &long_key).value()), expected);
    }

    #[test]
    fn ramp_is_monotonic_for_every_bucket() {
        for b in 0..BUCKETS {
            let bucket = Bucket::new(b).unwrap();
            let mut was_target = false;
            for bp in 0..=BUCKETS {
                let now = Weight::from_basis_points(bp).unwrap().admits(bucket);
                assert!(
                    !was_target || now,
                    "bucket {b} left target when weight rose to {bp}"
                );
                was_target = now;
            }
        }
    }

    #[test]
    fn lowering_moves_only_the_highest_buckets() {
        let high = Weight::from_percent(50.0).unwrap();
        let low = Weight::from_percent(20.0).unwrap();
        for b in 0..BUCKETS {
            let bucket = Bucket::new(b).unwrap();
            let moved = high.admits(bucket) && !low.admits(bucket);
            assert_eq!(moved, (2000..5000).contains(&b));
        }
    }

    #[test]
    fn buckets_spread_evenly() {
        let mut hits = 0u32;
        let weight = Weight::from_percent(20.0).unwrap();
        for i in 0..100_000u32 {
            if weight.admits(Bucket::of("users", i.to_string().as_bytes())) {
                hits += 1;
            }
        }
        let share = f64::from(hits) / 100_000.0;
        assert!((share - 0.20).abs() < 0.01, "share {share}");
    }

    #[test]
    fn query_names_and_values_are_compared_decoded() {
        let want = ValueMatch::Exact("ops@example.test".into());
        assert!(query_holds(Some("user=ops%40example.test"), "user", &want));
        assert!(query_holds(Some("us%65r=ops@example.test"), "user", &want));
        assert!(!query_holds(Some("user=ops%41example.test"), "user", &want));
        let spaced = ValueMatch::AnyOf(vec!["a b".into()]);
        assert!(query_holds(Some("x=1&q=a+b"), "q", &spaced));
        assert!(query_holds(Some("q=a%20b"), "q", &spaced));
        assert!(query_holds(Some("flag"), "flag", &ValueMatch::Present));
        assert!(!query_holds(
            Some("q=%zz"),
            "q",
            &ValueMatch::Exact("%".into())
        ));
        assert!(query_holds(
            Some("q=%zz"),
            "q",
            &ValueMatch::Exact("%zz".into())
        ));
        assert!(!query_holds(None, "q", &ValueMatch::Present));
    }

    #[test]
    fn cookie_and_query_values_are_found() {
        let mut headers = HeaderMap::new();
        headers.append(
            COOKIE,
            HeaderValue::from_static("a=1; session_id=abc ; b=\"q\""),
        );
        headers.append(COOKIE, HeaderValue::from_static("late=2"));
        assert_eq!(cookie_value(&headers, "session_id"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(&headers, "b"), Some(&b"q"[..]));
        assert_eq!(cookie_value(&headers, "late"), Some(&b"2"[..]));
        assert_eq!(cookie_value(&headers, "session"), None);
        assert_eq!(
            cookie_value(&headers, "id"),
            None,
            "a suffix of another name is not the name"
        );
        let mut tricky = HeaderMap::new();
        tricky.append(COOKIE, HeaderValue::from_static("xid=1; id=2"));
        assert_eq!(cookie_value(&tricky, "id"), Some(&b"2"[..]));
        tricky.insert(COOKIE, HeaderValue::from_static("a=id=3; id=4"));
        assert_eq!(
            cookie_value(&tricky, "id"),
            Some(&b"4"[..]),
            "a name inside a value is not the name"
        );
        let on = ValueMatch::Exact("on".into());
        assert!(query_holds(Some("x=1&beta=on&flag"), "beta", &on));
        assert!(query_holds(
            Some("x=1&flag"),
            "flag",
            &ValueMatch::Exact(String::new())
        ));
    }

    #[test]
    fn canary_rules_override_weight() {
        let split = Split::Canary {
            rules: vec![Rule {
                conditions: vec![Condition::Header(
                    HeaderName::from_static("x-canary"),
                    ValueMatch::Exact("1".into()),
                )],
            }],
            weight: Weight::ZERO,
        };
        let mut headers = HeaderMap::new();
        let b = Bucket::new(0).unwrap();
        assert_eq!(
            decide(&split, &[], &facts(&headers, None, "10.0.0.1"), b),
            Side::Legacy
        );
        headers.insert("x-canary", HeaderValue::from_static("1"));
        assert_eq!(
            decide(&split, &[], &facts(&headers, None, "10.0.0.1"), b),
            Side::Target
        );
    }

    #[test]
    fn client_ip_rule_matches_cidr() {
        let cond = Condition::ClientIp(vec![
            "10.1.0.0/16".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        let headers = HeaderMap::new();
        assert!(cond.holds(&facts(&headers, None, "10.1.2.3")));
        assert!(cond.holds(&facts(&headers, None, "::1")));
        assert!(!cond.holds(&facts(&headers, None, "10.2.0.1")));
    }

    #[test]
    fn blue_green_preview_reaches_the_inactive_side() {
        let split = Split::BlueGreen {
            active: Side::Legacy,
            preview: Some(Rule {
                conditions: vec![Condition::Query("preview".into(), ValueMatch::Present)],
            }),
        };
        let headers = HeaderMap::new();
        let b = Bucket::new(0).unwrap();
        assert_eq!(
            decide(&split, &[], &facts(&headers, None, "1.1.1.1"), b),
            Side::Legacy
        );
        assert_eq!(
            decide(
                &split,
                &[],
                &facts(&headers, Some("preview=1"), "1.1.1.1"),
                b
            ),
            Side::Target
        );
    }

    #[test]
    fn feature_flag_uses_rules_then_percentage() {
        let flags = vec![Flag {
            name: "new-api".into(),
            rules: vec![Rule {
                conditions: vec![Condition::Header(
                    HeaderName::from_static("x-tenant"),
                    ValueMatch::AnyOf(vec!["acme".into(), "globex".into()]),
                )],
            }],
            weight: Weight::from_percent(10.0).unwrap(),
            sticky: None,
        }];
        let split = Split::FeatureFlag { flag: FlagId(0) };
        let mut headers = HeaderMap::new();
        let low = Bucket::new(5).unwrap();
        let high = Bucket::new(9_000).unwrap();
        assert_eq!(
            decide(&split, &flags, &facts(&headers, None, "1.1.1.1"), low),
            Side::Target
        );
        assert_eq!(
            decide(&split, &flags, &facts(&headers, None, "1.1.1.1"), high),
            Side::Legacy
        );
        headers.insert("x-tenant", HeaderValue::from_static("globex"));
        assert_eq!(
            decide(&split, &flags, &facts(&headers, None, "1.1.1.1"), high),
            Side::Target
        );
    }

    #[test]
    fn client_ip_key_hashes_the_textual_address() {
        let headers = HeaderMap::new();
        let req = facts(&headers, None, "192.0.2.7");
        let bucket = StickyKey::ClientIp.extract(&req).bucket("users").unwrap();
        assert_eq!(bucket, Bucket::of("users", b"192.0.2.7"));
    }
}
