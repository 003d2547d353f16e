//! Durations and sizes as people write them, on the command line and in `/diagnose?window=`.
use std::time::Duration;

/// `10` (seconds), `1.5`, `30s`, `5m`, `1h 30m`. Negative, not finite or past what a
/// `Duration` holds (about 584 billion years) is an error, never a panic.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return if secs.is_finite() && secs >= 0.0 {
            Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too long a duration"))
        } else {
            Err(format!("{s:?} is not a duration"))
        };
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

/// A size in bytes: `1048576`, `512K`, `100M`, `1G` (K, M and G are 1024, 1024² and 1024³;
/// `KiB`, `MiB` and `GiB` are the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1048576, 512K, 100M, 1G)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => {
            return Err(format!(
                "{s:?} is not a size (e.g. 1048576, 512K, 100M, 1G)"
            ));
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large a size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn hostile_durations_are_errors() {
        for junk in [
            "1e300",
            "-5m",
            "NaN",
            "inf",
            "-0.5",
            "99999999999999999999999999h",
            "18446744073709551616",
            "1e20",
            "5m; DROP",
            "\u{0}",
            "",
        ] {
            assert!(parse_duration(junk).is_err(), "{junk:?}");
        }
        // The longest a Duration holds is still a duration.
        assert!(parse_duration("1e19").is_ok());
        assert!(parse_duration("100y").is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for junk in ["", "M", "1.5M", "-1", "10MB", "1T", "99999999999999999999G"] {
            assert!(parse_size(junk).is_err(), "{junk:?}");
        }
    }
}
