//! The one quantile rule every figure uses, the aggregator's histograms and the verdict
//! engine's exact samples alike: nearest rank.

/// The 1-based rank of the `q` quantile (0 < q <= 1) among `n` values: `ceil(q * n)`, within
/// `1..=n`.
pub fn nearest_rank(q: f64, n: u64) -> u64 {
    ((q * n as f64).ceil() as u64).clamp(1, n.max(1))
}

/// The `q` quantile of `sorted` (ascending); `None` when empty.
pub fn of_sorted<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[nearest_rank(q, sorted.len() as u64) as usize - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_of_known_samples() {
        let us: Vec<u64> = (1..=10).map(|i| i * 1000).collect();
        assert_eq!(of_sorted(&us, 0.5), Some(5000));
        assert_eq!(of_sorted(&us, 0.99), Some(10_000));
        assert_eq!(of_sorted(&us, 0.01), Some(1000));
        assert_eq!(of_sorted::<u64>(&[], 0.5), None);
        assert_eq!(nearest_rank(0.9, 100), 90);
    }
}
