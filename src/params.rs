//! Query parameters of the scenarios: `ms` (a duration) and `n` (a count).
//!
//! Parsed by hand rather than with `Query<T>` so every rejection can say
//! exactly what was wrong (missing, not a number, negative, over the cap) and
//! what is allowed, in the app's own JSON error shape. The caps come from
//! `[limits]`: user-given durations are always bounded, so no request can
//! hold a worker for longer than `limits.max_ms`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::AppError;
use crate::state::AppState;

/// The raw `key=value` pairs of a request's query string.
#[derive(Debug, Default)]
pub(crate) struct Params {
    pairs: Vec<(String, String)>,
    max_ms: u64,
    max_fanout: u64,
}

impl FromRequestParts<AppState> for Params {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let query = parts.uri.query().unwrap_or("");
        let pairs = form_urlencoded_pairs(query);
        Ok(Params {
            pairs,
            max_ms: state.limits.max_ms,
            max_fanout: state.limits.max_fanout,
        })
    }
}

impl Params {
    /// Rejects any parameter not in `allowed`: a typo like `?msec=200` should
    /// be an error, not a silently ignored setting.
    pub(crate) fn only(&self, allowed: &[&str]) -> Result<(), AppError> {
        for (key, _) in &self.pairs {
            if !allowed.contains(&key.as_str()) {
                let takes = if allowed.is_empty() {
                    "this route takes no parameters".to_owned()
                } else {
                    format!("this route takes {}", allowed.join(" and "))
                };
                return Err(AppError::BadParameter {
                    parameter: key.clone(),
                    allowed: allowed.join(", "),
                    problem: format!("unknown parameter `{key}`; {takes}"),
                });
            }
        }
        Ok(())
    }

    /// `ms`: a duration in milliseconds, `0..=limits.max_ms`.
    pub(crate) fn ms(&self) -> Result<u64, AppError> {
        self.integer("ms", 0, self.max_ms, "a duration in milliseconds")
    }

    /// `n`: a count, `1..=limits.max_fanout`.
    pub(crate) fn n(&self) -> Result<u64, AppError> {
        self.integer("n", 1, self.max_fanout, "a count")
    }

    fn integer(&self, name: &str, min: u64, max: u64, what: &str) -> Result<u64, AppError> {
        let allowed = format!("{min}..={max}");
        let bad = |problem: String| AppError::BadParameter {
            parameter: name.to_owned(),
            allowed: allowed.clone(),
            problem,
        };
        let raw = self
            .pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.trim())
            .ok_or_else(|| bad(format!("missing parameter `{name}`: {what} in {allowed}")))?;
        if raw.starts_with('-') && raw[1..].chars().all(|c| c.is_ascii_digit()) && raw.len() > 1 {
            return Err(bad(format!(
                "`{name}` must not be negative (got {raw}); allowed {allowed}"
            )));
        }
        let value: u64 = raw.parse().map_err(|_| {
            bad(format!(
                "`{name}` must be a whole number (got {raw:?}); allowed {allowed}"
            ))
        })?;
        if !(min..=max).contains(&value) {
            return Err(bad(format!(
                "`{name}` = {value} is out of range; allowed {allowed}"
            )));
        }
        Ok(value)
    }
}

/// Splits `a=1&b=2` into pairs, percent-decoding keys and values.
fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Params {
        Params {
            pairs: form_urlencoded_pairs(query),
            max_ms: 10_000,
            max_fanout: 64,
        }
    }

    fn problem(result: Result<u64, AppError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn parses_in_range_values() {
        assert_eq!(params("ms=200").ms().unwrap(), 200);
        assert_eq!(params("ms=0").ms().unwrap(), 0);
        assert_eq!(params("n=8&ms=10").n().unwrap(), 8);
    }

    #[test]
    fn names_each_kind_of_bad_value() {
        assert!(problem(params("").ms()).contains("missing"));
        assert!(problem(params("ms=abc").ms()).contains("whole number"));
        assert!(problem(params("ms=-5").ms()).contains("negative"));
        assert!(problem(params("ms=10001").ms()).contains("out of range"));
        assert!(problem(params("n=0").n()).contains("out of range"));
        assert!(problem(params("ms=1.5").ms()).contains("whole number"));
    }

    #[test]
    fn rejects_unknown_parameters() {
        let err = params("msec=200").only(&["ms"]).unwrap_err().to_string();
        assert!(err.contains("msec"), "{err}");
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
