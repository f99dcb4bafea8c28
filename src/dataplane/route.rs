//! Route matching: which configured route, if any, a request belongs to.
//!
//! Pure and allocation-free on the request path. The table is built once per snapshot with
//! the routes pre-sorted by specificity, so the first route that matches is the right one.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;
use http::header::HeaderName;

use super::split::{RequestFacts, Split, StickyKey, ValueMatch, header_matches};

/// Index of a backend in the snapshot's backend list, resolved at validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendId(pub u32);

/// Index of a route in the snapshot's route list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteId(pub u32);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `api.example.com`, compared case-insensitively (stored lower-case).
    Exact(String),
    /// `*.example.com`: any host ending in `.example.com` (stored as the suffix, lower-case).
    Suffix(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(want) => want == host,
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatcher {
    pub host: Option<HostMatch>,
    /// Always starts with `/`; `/` matches every path.
    pub path_prefix: String,
    /// Empty means every method.
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
}

impl RouteMatcher {
    /// Host and path are handled by the table's index; this checks the rest.
    fn matches_rest(&self, req: &RequestFacts<'_>) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method))
            && self
                .headers
                .iter()
                .all(|(name, want)| header_matches(req.headers, name, want))
    }

    fn matches(&self, req: &RequestFacts<'_>) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(want) => req.host.is_some_and(|h| want.matches(h)),
        };
        host_ok && path_has_prefix(req.path, &self.path_prefix) && self.matches_rest(req)
    }

    /// Higher sorts first: exact host over wildcard over none, then the longer prefix, then
    /// the route with more conditions.
    fn specificity(&self) -> (u8, usize, usize) {
        let host = match &self.host {
            Some(HostMatch::Exact(_)) => 2,
            Some(HostMatch::Suffix(_)) => 1,
            None => 0,
        };
        (
            host,
            self.path_prefix.len(),
            usize::from(!self.methods.is_empty()) + self.headers.len(),
        )
    }
}

/// Prefixes match whole path segments: `/api/users` takes `/api/users` and `/api/users/7`
/// but not `/api/usersettings`, so a new route never captures a neighbour by accident.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: Arc<str>,
    pub matcher: RouteMatcher,
    pub legacy: BackendId,
    pub target: BackendId,
    pub split: Split,
    pub sticky: Option<StickyKey>,
    /// Rollback overrides every split: all traffic goes to legacy.
    pub rolled_back: bool,
}

/// Routes indexed for matching: exact-host routes outrank wildcard-host routes, which
/// outrank host-less ones; within each class a trie over path segments yields the deepest
/// prefixes first, so a request visits only the routes on its own path.
/// Hosts and path segments are short strings looked up on every request; foldhash (the
/// hasher hashbrown itself defaults to) is several times cheaper than SipHash there, and is
/// still seeded per process. The tables are built from the config, so a client cannot
/// grow them to exploit collisions.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    by_host: FastMap<String, PrefixTrie>,
    wildcard: PrefixTrie,
    plain: PrefixTrie,
}

impl RouteTable {
    pub fn build(routes: &[Route]) -> RouteTable {
        let mut order: Vec<u32> = (0..routes.len() as u32).collect();
        // Stable, so equally specific routes keep the order they were written in; each trie
        // node then holds its routes in matching order.
        order.sort_by_key(|&i| std::cmp::Reverse(routes[i as usize].matcher.specificity()));
        let mut table = RouteTable::default();
        for i in order {
            let matcher = &routes[i as usize].matcher;
            let trie = match &matcher.host {
                Some(HostMatch::Exact(host)) => table.by_host.entry(host.clone()).or_default(),
                Some(HostMatch::Suffix(_)) => &mut table.wildcard,
                None => &mut table.plain,
            };
            trie.insert(&matcher.path_prefix, i);
        }
        table
    }

    /// The most specific route that matches, or `None` for the default backend.
    pub fn find(&self, routes: &[Route], req: &RequestFacts<'_>) -> Option<RouteId> {
        req.host
            .filter(|_| !self.by_host.is_empty())
            .and_then(|h| self.by_host.get(h))
            .and_then(|trie| trie.find(routes, req))
            .or_else(|| self.wildcard.find(routes, req))
            .or_else(|| self.plain.find(routes, req))
            .map(RouteId)
    }
}

/// A node per path segment of the configured prefixes.
#[derive(Debug, Clone, Default)]
struct PrefixTrie {
    children: FastMap<Box<str>, PrefixTrie>,
    /// Routes whose prefix ends here, in matching order.
    routes: Vec<u32>,
}

impl PrefixTrie {
    fn insert(&mut self, prefix: &str, route: u32) {
        let mut node = self;
        for segment in prefix.split('/').filter(|s| !s.is_empty()) {
            node = node.children.entry(segment.into()).or_default();
        }
        node.routes.push(route);
    }

    fn find(&self, routes: &[Route], req: &RequestFacts<'_>) -> Option<u32> {
        let mut segments = req.path.split('/');
        // The path starts with `/`; its first piece is empty.
        segments.next();
        self.find_from(&mut segments, routes, req)
    }

    /// Deeper first; recursion depth is bounded by the deepest configured prefix, not by
    /// the request's path.
    fn find_from<'p>(
        &self,
        segments: &mut std::str::Split<'p, char>,
        routes: &[Route],
        req: &RequestFacts<'_>,
    ) -> Option<u32> {
        if !self.children.is_empty()
            && let Some(segment) = segments.next()
            && let Some(child) = self.children.get(segment)
            && let Some(found) = child.find_from(segments, routes, req)
        {
            return Some(found);
        }
        // The full check stays: it holds the segment-boundary rule, trailing slashes,
        // hosts, methods and headers.
        self.routes
            .iter()
            .copied()
            .find(|&i| routes[i as usize].matcher.matches(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::split::Weight;
    use http::HeaderMap;

    fn route(name: &str, host: Option<HostMatch>, prefix: &str, methods: &[Method]) -> Route {
        Route {
            name: name.into(),
            matcher: RouteMatcher {
                host,
                path_prefix: prefix.into(),
                methods: methods.to_vec(),
                headers: vec![],
            },
            legacy: BackendId(0),
            target: BackendId(1),
            split: Split::Percentage {
                weight: Weight::ZERO,
            },
            sticky: None,
            rolled_back: false,
        }
    }

    fn find<'a>(
        routes: &'a [Route],
        method: &Method,
        host: Option<&str>,
        path: &str,
    ) -> Option<&'a str> {
        let table = RouteTable::build(routes);
        let headers = HeaderMap::new();
        let req = RequestFacts {
            method,
            host,
            path,
            query: None,
            headers: &headers,
            client_ip: "127.0.0.1".parse().unwrap(),
        };
        table
            .find(routes, &req)
            .map(|id| &*routes[id.0 as usize].name)
    }

    #[test]
    fn prefix_matches_whole_segments() {
        assert!(path_has_prefix("/api/users", "/api/users"));
        assert!(path_has_prefix("/api/users/7", "/api/users"));
        assert!(!path_has_prefix("/api/usersettings", "/api/users"));
        assert!(path_has_prefix("/api/users/", "/api/users/"));
        assert!(path_has_prefix("/anything", "/"));
    }

    #[test]
    fn longest_prefix_wins_regardless_of_order() {
        let routes = vec![
            route("api", None, "/api", &[]),
            route("users", None, "/api/users", &[]),
        ];
        assert_eq!(
            find(&routes, &Method::GET, None, "/api/users/1"),
            Some("users")
        );
        assert_eq!(
            find(&routes, &Method::GET, None, "/api/orders"),
            Some("api")
        );
        assert_eq!(find(&routes, &Method::GET, None, "/other"), None);
    }

    #[test]
    fn host_outranks_path() {
        let routes = vec![
            route("deep", None, "/api/users/admin", &[]),
            route(
                "wild",
                Some(HostMatch::Suffix(".example.com".into())),
                "/api",
                &[],
            ),
            route(
                "exact",
                Some(HostMatch::Exact("shop.example.com".into())),
                "/",
                &[],
            ),
        ];
        assert_eq!(
            find(
                &routes,
                &Method::GET,
                Some("shop.example.com"),
                "/api/users/admin"
            ),
            Some("exact")
        );
        assert_eq!(
            find(
                &routes,
                &Method::GET,
                Some("a.example.com"),
                "/api/users/admin"
            ),
            Some("wild")
        );
        assert_eq!(
            find(
                &routes,
                &Method::GET,
                Some("example.com"),
                "/api/users/admin"
            ),
            Some("deep")
        );
        assert_eq!(
            find(&routes, &Method::GET, None, "/api/users/admin"),
            Some("deep")
        );
    }

    #[test]
    fn trailing_slash_and_root_prefixes() {
        let routes = vec![
            route("root", None, "/", &[]),
            route("slash", None, "/api/users/", &[]),
            route("bare", None, "/api", &[]),
        ];
        assert_eq!(
            find(&routes, &Method::GET, None, "/api/users/1"),
            Some("slash")
        );
        assert_eq!(
            find(&routes, &Method::GET, None, "/api/users"),
            Some("bare")
        );
        assert_eq!(find(&routes, &Method::GET, None, "/apix"), Some("root"));
        assert_eq!(
            find(&routes, &Method::GET, None, "/api//users/1"),
            Some("bare")
        );
        assert_eq!(find(&routes, &Method::GET, None, "/"), Some("root"));
    }

    #[test]
    fn a_deep_request_path_does_not_recurse_past_the_trie() {
        let routes = vec![route("api", None, "/api", &[])];
        let deep = format!("/api{}", "/x".repeat(100_000));
        assert_eq!(find(&routes, &Method::GET, None, &deep), Some("api"));
    }

    #[test]
    fn methods_restrict_a_route() {
        let routes = vec![
            route("writes", None, "/api", &[Method::POST, Method::PUT]),
            route("all", None, "/api", &[]),
        ];
        assert_eq!(find(&routes, &Method::POST, None, "/api"), Some("writes"));
        assert_eq!(find(&routes, &Method::GET, None, "/api"), Some("all"));
    }
}
