//! `--mix "/coop/sleep?ms=50:90,/block/sleep?ms=200:10"`: weighted routes,
//! and the order requests take them in.
//!
//! The order is *deterministic* (smooth weighted round-robin, as nginx
//! balances upstreams): with weights 90 and 10, every run of 100 requests
//! holds exactly 90 and 10, spread out (9 coop, 1 block, …) rather than
//! drawn at random. Two runs of the same mix then send the same traffic, and
//! a 2-second experiment run is not at the mercy of a random number
//! generator that happened to bunch the blocking requests together.

use std::fmt;

use hyper::http::uri::PathAndQuery;

/// The largest sum of weights: the cycle of routes is built once, one slot
/// per unit of weight.
pub(crate) const MAX_TOTAL_WEIGHT: u32 = 100_000;

/// One route of the mix: a path with its query, and its weight.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Route {
    pub path: String,
    pub weight: u32,
}

/// The routes and the order in which requests take them.
#[derive(Debug, Clone)]
pub(crate) struct Mix {
    routes: Vec<Route>,
    /// Index into `routes` for request `i % cycle.len()`.
    cycle: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MixError(String);

impl fmt::Display for MixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MixError {}

impl Mix {
    /// A mix of one route, taken by every request.
    pub(crate) fn single(path: &str) -> Result<Mix, MixError> {
        Mix::new(vec![Route {
            path: check_path(path)?,
            weight: 1,
        }])
    }

    /// Parses `PATH[:WEIGHT],PATH[:WEIGHT],…`. The weight, a positive
    /// integer, follows the *last* colon and defaults to 1.
    pub(crate) fn parse(text: &str) -> Result<Mix, MixError> {
        let mut routes = Vec::new();
        for entry in text.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(MixError(format!(
                    "--mix {text:?}: an empty entry (two commas, or a trailing comma)"
                )));
            }
            let (path, weight) = match entry.rsplit_once(':') {
                Some((path, weight)) if !weight.contains('/') => {
                    let weight: u32 = weight.trim().parse().map_err(|_| {
                        MixError(format!(
                            "--mix entry {entry:?}: the weight {weight:?} is not a positive integer"
                        ))
                    })?;
                    (path.trim(), weight)
                }
                _ => (entry, 1),
            };
            if weight == 0 {
                return Err(MixError(format!(
                    "--mix entry {entry:?}: a weight of 0 would never be sent; leave the route out"
                )));
            }
            routes.push(Route {
                path: check_path(path)?,
                weight,
            });
        }
        Mix::new(routes)
    }

    fn new(routes: Vec<Route>) -> Result<Mix, MixError> {
        let total: u64 = routes.iter().map(|r| u64::from(r.weight)).sum();
        if total > u64::from(MAX_TOTAL_WEIGHT) {
            return Err(MixError(format!(
                "--mix weights add up to {total}; at most {MAX_TOTAL_WEIGHT} (they are ratios: 90 and 10 is 9 and 1)"
            )));
        }
        // Smooth weighted round-robin: each step every route gains its
        // weight, the richest is taken and pays the total back.
        let mut credit: Vec<i64> = vec![0; routes.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (c, r) in credit.iter_mut().zip(&routes) {
                *c += i64::from(r.weight);
            }
            let (best, _) = credit
                .iter()
                .enumerate()
                .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
                .expect("a mix has at least one route");
            credit[best] -= total as i64;
            cycle.push(best);
        }
        Ok(Mix { routes, cycle })
    }

    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The index (into [`Mix::routes`]) of the route request `n` takes.
    pub(crate) fn pick(&self, n: u64) -> usize {
        self.cycle[(n % self.cycle.len() as u64) as usize]
    }
}

/// A path must start with `/` and be a valid HTTP path and query.
fn check_path(path: &str) -> Result<String, MixError> {
    if !path.starts_with('/') {
        return Err(MixError(format!(
            "route {path:?} must start with '/' (a path on --url's server, e.g. /coop/sleep?ms=50)"
        )));
    }
    path.parse::<PathAndQuery>()
        .map_err(|e| MixError(format!("route {path:?} is not a valid path: {e}")))?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_split_every_cycle_exactly_and_spread_out() {
        let mix = Mix::parse("/coop/sleep?ms=50:90,/block/sleep?ms=200:10").unwrap();
        assert_eq!(mix.routes()[0].path, "/coop/sleep?ms=50");
        assert_eq!(mix.routes()[1].weight, 10);
        let picks: Vec<usize> = (0..100).map(|n| mix.pick(n)).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 10);
        // Spread: never two blocking requests in a row.
        assert!(picks.windows(2).all(|w| w != [1, 1]), "{picks:?}");
        // The cycle repeats.
        assert_eq!(mix.pick(7), mix.pick(107));
    }

    #[test]
    fn a_missing_weight_is_one_and_spaces_are_trimmed() {
        let mix = Mix::parse(" /healthz , /coop/sleep?ms=5:3").unwrap();
        assert_eq!(
            mix.routes(),
            &[
                Route {
                    path: "/healthz".into(),
                    weight: 1
                },
                Route {
                    path: "/coop/sleep?ms=5".into(),
                    weight: 3
                }
            ]
        );
    }

    #[test]
    fn bad_mixes_say_what_is_wrong() {
        let err = |text: &str| Mix::parse(text).unwrap_err().to_string();
        assert!(err("/a:0").contains("weight of 0"), "{}", err("/a:0"));
        assert!(err("/a:-3").contains("not a positive integer"));
        assert!(err("/a:ten").contains("not a positive integer"));
        assert!(err("/a:1,,/b:1").contains("empty entry"));
        assert!(err("healthz:1").contains("must start with '/'"));
        assert!(err("/a:60000,/b:60000").contains("add up to 120000"));
        assert!(err("/a b:1").contains("not a valid path"));
    }
}
