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

/// The most path segments a `path_prefix` may have; `check` refuses more.
pub const MAX_PREFIX_SEGMENTS: usize = 64;

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
        // A deeper prefix hangs at the depth limit, where the full match (which compares
        // the whole prefix) still decides; the trie's depth, and so every walk over it
        // (drop and clone included), stays bounded.
        for segment in prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .take(MAX_PREFIX_SEGMENTS)
        {
            node = node.children.entry(segment.into()).or_default();
        }
        node.routes.push(route);
    }

    fn find(&self, routes: &[Route], req: &RequestFacts<'_>) -> Option<u32> {
        // The nodes on the request's path, root first; a fixed array, so matching neither
        // allocates nor recurses however deep a prefix or a path is. `check` keeps prefixes
        // within `MAX_PREFIX_SEGMENTS`, and the trie is never deeper.
        let mut visited: [Option<&PrefixTrie>; MAX_PREFIX_SEGMENTS + 1] =
            [None; MAX_PREFIX_SEGMENTS + 1];
        visited[0] = Some(self);
        let mut depth = 0;
        let mut node = self;
        // The path starts with `/`; its first piece is empty.
        for segment in req.path.split('/').skip(1) {
            if depth == MAX_PREFIX_SEGMENTS {
                break;
            }
            let Some(child) = node.children.get(segment) else {
                break;
            };
            depth += 1;
            visited[depth] = Some(child);
            node = child;
        }
        // Deeper first. The full check stays: it holds the segment-boundary rule, trailing
        // slashes, hosts, methods and headers.
        visited[..=depth].iter().rev().flatten().find_map(|node| {
            node.routes
                .iter()
                .copied()
                .find(|&i| routes[i as usize].matcher.matches(req))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::split::Weight;

    fn route(name: &str, prefix: &str) -> Route {
        Route {
            name: Arc::from(name),
            matcher: RouteMatcher {
                path_prefix: prefix.to_string(),
                ..RouteMatcher::default()
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

    fn find(table: &RouteTable, routes: &[Route], path: &str) -> Option<u32> {
        let headers = http::HeaderMap::new();
        let facts = RequestFacts {
            method: &Method::GET,
            host: None,
            path,
            query: None,
            headers: &headers,
            client_ip: [127, 0, 0, 1].into(),
        };
        table.find(routes, &facts).map(|r| r.0)
    }

    #[test]
    fn the_deepest_prefix_wins_and_segments_are_whole() {
        let routes = [
            route("root", "/"),
            route("api", "/api"),
            route("users", "/api/users"),
        ];
        let table = RouteTable::build(&routes);
        assert_eq!(find(&table, &routes, "/api/users/7"), Some(2));
        assert_eq!(find(&table, &routes, "/api/usersettings"), Some(1));
        assert_eq!(find(&table, &routes, "/other"), Some(0));
    }

    /// A prefix deeper than `check` allows (built here without it) and a path of 100,000
    /// segments neither recurse nor panic, and each still matches exactly.
    #[test]
    fn deep_prefixes_and_paths_do_not_recurse() {
        let deep = "/a".repeat(12_000);
        let routes = [route("api", "/a"), route("deep", &deep)];
        let table = RouteTable::build(&routes);
        let path = "/a".repeat(100_000);
        assert_eq!(find(&table, &routes, &path), Some(1));
        assert_eq!(find(&table, &routes, &"/a".repeat(11_999)), Some(0));
        let within = "/a".repeat(MAX_PREFIX_SEGMENTS);
        let routes = [route("api", "/a"), route("deep", &within)];
        let table = RouteTable::build(&routes);
        assert_eq!(find(&table, &routes, &path), Some(1));
    }
}
