//! The per-request decision: route match, sticky bucket, split. Reads one snapshot and
//! the request's facts; the only impurity is the random bucket of a keyless request and the
//! id minted for a `generated` key.

use http::HeaderValue;
use rand::RngExt;

use super::route::BackendId;
use super::split::{Bucket, KeyMaterial, RequestFacts, Side, Split, StickyKey, decide};
use crate::snapshot::RoutingSnapshot;

/// Where a request goes, decided from one snapshot.
pub struct Decision {
    /// Index into the snapshot's routes; `None` for the default backend.
    pub route: Option<usize>,
    pub backend: BackendId,
    pub side: Side,
    /// `Set-Cookie` for a freshly minted `generated` sticky key.
    pub set_cookie: Option<HeaderValue>,
    /// The bucket the split decided by (random for a request without a sticky key);
    /// `None` without a route or while it is rolled back.
    pub bucket: Option<Bucket>,
}

impl Decision {
    pub fn make(snapshot: &RoutingSnapshot, facts: &RequestFacts<'_>) -> Decision {
        let Some(id) = snapshot.find_route(facts) else {
            return Decision {
                route: None,
                backend: snapshot.default_backend,
                side: Side::Legacy,
                set_cookie: None,
                bucket: None,
            };
        };
        let route = snapshot.route(id);
        if route.rolled_back {
            return Decision {
                route: Some(id.0 as usize),
                backend: route.legacy,
                side: Side::Legacy,
                set_cookie: None,
                bucket: None,
            };
        }
        // A feature flag keeps its own users: its name and (when set) its key decide the
        // bucket, so one flag gives a user the same answer on every route that uses it.
        let (name, sticky): (&str, Option<&StickyKey>) = match &route.split {
            Split::FeatureFlag { flag } => {
                let flag = &snapshot.flags[flag.0 as usize];
                (&flag.name, flag.sticky.as_ref().or(route.sticky.as_ref()))
            }
            _ => (&route.name, route.sticky.as_ref()),
        };
        let (bucket, set_cookie) = sticky_bucket(name, sticky, facts);
        let side = decide(&route.split, &snapshot.flags, facts, bucket);
        Decision {
            route: Some(id.0 as usize),
            backend: match side {
                Side::Legacy => route.legacy,
                Side::Target => route.target,
            },
            side,
            set_cookie,
            bucket: Some(bucket),
        }
    }
}

fn sticky_bucket(
    name: &str,
    sticky: Option<&StickyKey>,
    facts: &RequestFacts<'_>,
) -> (Bucket, Option<HeaderValue>) {
    let Some(key) = sticky else {
        return (random_bucket(), None);
    };
    let material = key.extract(facts);
    if let Some(bucket) = material.bucket(name) {
        return (bucket, None);
    }
    match (key, material) {
        (StickyKey::Generated { cookie }, KeyMaterial::Missing) => {
            let id = format!("{:032x}", rand::rng().random::<u128>());
            let bucket = Bucket::of(name, id.as_bytes());
            let value = format!("{cookie}={id}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax");
            (bucket, HeaderValue::from_str(&value).ok())
        }
        _ => (random_bucket(), None),
    }
}

fn random_bucket() -> Bucket {
    Bucket::from_random(rand::rng().random())
}
