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
}

/// The routes in matching order, with an index from exact host to candidates.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Candidates for a host that has exact-host routes, in specificity order.
    by_host: HashMap<String, Box<[u32]>>,
    /// Candidates for any other host (wildcard-host and host-less routes).
    others: Box<[u32]>,
}

impl RouteTable {
    pub fn build(routes: &[Route]) -> RouteTable {
        let mut order: Vec<u32> = (0..routes.len() as u32).collect();
        // Stable, so equally specific routes keep the order they were written in.
        order.sort_by_key(|&i| std::cmp::Reverse(routes[i as usize].matcher.specificity()));

        let others: Box<[u32]> = order
            .iter()
            .copied()
            .filter(|&i| !matches!(routes[i as usize].matcher.host, Some(HostMatch::Exact(_))))
            .collect();
        let mut by_host: HashMap<String, Vec<u32>> = HashMap::new();
        for &i in &order {
            if let Some(HostMatch::Exact(host)) = &routes[i as usize].matcher.host {
                by_host.entry(host.clone()).or_default().push(i);
            }
        }
        let by_host = by_host
            .into_iter()
            .map(|(host, mut exact)| {
                // Exact-host routes outrank everything else, so they simply go first.
                exact.extend(others.iter().copied());
                (host, exact.into_boxed_slice())
            })
            .collect();
        RouteTable { by_host, others }
    }

    /// The most specific route that matches, or `None` for the default backend.
    pub fn find(&self, routes: &[Route], req: &RequestFacts<'_>) -> Option<RouteId> {
        let candidates = req
            .host
            .and_then(|h| self.by_host.get(h))
            .unwrap_or(&self.others);
        candidates
            .iter()
            .copied()
            .find(|&i| routes[i as usize].matcher.matches(req))
            .map(RouteId)
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
    fn methods_restrict_a_route() {
        let routes = vec![
            route("writes", None, "/api", &[Method::POST, Method::PUT]),
            route("all", None, "/api", &[]),
        ];
        assert_eq!(find(&routes, &Method::POST, None, "/api"), Some("writes"));
        assert_eq!(find(&routes, &Method::GET, None, "/api"), Some("all"));
    }
}
