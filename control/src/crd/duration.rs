//! Durations as the CRD spells them: `90s`, `10m`, `1h30m`, `7d`. The schema checks the shape
//! with [`PATTERN`]; [`parse`] turns a checked string into a [`Duration`].

use std::time::Duration;

/// The OpenAPI pattern every duration field carries, so the API server refuses `10 minutes`
/// before bkpool ever sees it.
pub const PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// A duration string that does not match [`PATTERN`] or overflows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like 90s, 10m, 1h30m or 7d")]
pub struct BadDuration(pub String);

/// Parses `10m`, `1h30m`, `250ms`, `7d`.
pub fn parse(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(text.to_owned());
    let (mut total, mut rest) = (Duration::ZERO, text);
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = unit(rest).ok_or_else(bad)?;
        rest = &rest[len..];
        let part = unit.checked_mul(u32::try_from(value).map_err(|_| bad())?);
        total = total.checked_add(part.ok_or_else(bad)?).ok_or_else(bad)?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse`] reads it (largest units first).
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

fn unit(rest: &str) -> Option<(Duration, usize)> {
    // "ms" before "m", or "10ms" would read as ten minutes and a stray "s".
    let units = [
        ("ms", Duration::from_millis(1)),
        ("s", Duration::from_secs(1)),
        ("m", Duration::from_secs(60)),
        ("h", Duration::from_secs(3_600)),
        ("d", Duration::from_secs(86_400)),
    ];
    units
        .into_iter()
        .find(|(name, _)| rest.starts_with(name))
        .map(|(name, size)| (size, name.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_unit_and_sums_parts() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
    }

    #[test]
    fn refuses_anything_else_with_the_text() {
        for bad in [
            "",
            "10",
            "m",
            "10 m",
            "1.5h",
            "-1s",
            "10y",
            "9999999999h",
            "5m3",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let err = parse("1x").unwrap_err().to_string();
        assert_eq!(err, "\"1x\" is not a duration like 90s, 10m, 1h30m or 7d");
    }

    #[test]
    fn format_round_trips() {
        for text in ["90s", "1h30m", "7d", "250ms", "1d1h1m1s"] {
            let d = parse(text).unwrap();
            assert_eq!(parse(&format(d)), Ok(d));
        }
        assert_eq!(format(Duration::from_secs(5_400)), "1h30m");
    }
}
