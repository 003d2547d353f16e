//! Medians and ranges of repeated measurements.
use serde_json::{Value, json};

/// Median, minimum and maximum of a set of rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` for no values (a tool that produced no number).
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        })
    }

    pub fn to_json(self) -> Value {
        json!({ "median": self.median, "min": self.min, "max": self.max, "rounds": self.n })
    }

    /// `median (min-max)` with `decimals` places.
    pub fn show(self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// `Spread::to_json`, or null.
pub fn json_of(spread: Option<Spread>) -> Value {
    spread.map_or(Value::Null, Spread::to_json)
}

/// `Spread::show`, or "-".
pub fn show(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(|| "-".to_owned(), |s| s.show(decimals))
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Each program's ns per hit and hits per `unit` (e.g. `hits_per_conn`), as spreads over the
/// rounds' `(ns per hit, hits per unit)` figures by program name.
pub fn programs_json<'a>(
    rounds: impl Iterator<Item = &'a std::collections::BTreeMap<String, (f64, f64)>> + Clone,
    hits_per: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let names: std::collections::BTreeSet<&String> =
        rounds.clone().flat_map(|r| r.keys()).collect();
    names
        .into_iter()
        .map(|name| {
            let of = |f: &dyn Fn(&(f64, f64)) -> f64| {
                Spread::of(
                    &rounds
                        .clone()
                        .filter_map(|r| r.get(name).map(f))
                        .collect::<Vec<_>>(),
                )
            };
            let mut entry = serde_json::Map::new();
            entry.insert("ns_per_hit".into(), json_of(of(&|p| p.0)));
            entry.insert(hits_per.into(), json_of(of(&|p| p.1)));
            (name.clone(), serde_json::Value::Object(entry))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
    }
}
