//! The Flux text of a telemetry query: raw points, or epoch-aligned windows with the
//! aggregate and the per-window count as two results.

use std::time::{Duration, UNIX_EPOCH};

use super::MAX_TIME_MS;
use crate::store::query::{Aggregate, Query};

/// A Flux string literal: backslash, double quote and the interpolation opener `${`
/// are escaped.
fn flux_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Flux time literal for ms since the epoch (`2026-11-25T08:00:00.000Z`).
fn flux_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The Flux for a query, or `None` when the range is empty once clamped to what InfluxDB
/// can hold. Raw points keep `_time`, `_value` and `metric`, sorted by time then metric,
/// with one row more than the limit to tell whether it cut the result. Windows use
/// `aggregateWindow` (epoch-aligned, like [`Query::window`]) twice, yielding the aggregate
/// as `agg` and the per-window count as `count`; `timeSrc: "_start"` puts each window's
/// start in `_time` (the first window's start is clipped to the range start by Flux and
/// is aligned again when parsed).
pub(super) fn flux_query(bucket: &str, measurement: &str, q: &Query) -> Option<String> {
    let until = q.until.min(MAX_TIME_MS + 1);
    if q.from >= until {
        return None;
    }
    let mut filter = format!(
        "r._measurement == {} and r._field == \"value\" and r.device == {}",
        flux_str(measurement),
        flux_str(&q.device)
    );
    if let Some(metric) = &q.metric {
        filter.push_str(&format!(" and r.metric == {}", flux_str(metric)));
    }
    let source = format!(
        "from(bucket: {})\n  |> range(start: {}, stop: {})\n  |> filter(fn: (r) => {filter})",
        flux_str(bucket),
        flux_time(q.from),
        flux_time(until)
    );
    let n = q.limit.saturating_add(1);
    let shape = format!(
        "\n  |> keep(columns: [\"_time\", \"_value\", \"metric\"])\n  |> group()\n  |> sort(columns: [\"_time\", \"metric\"])\n  |> limit(n: {n})"
    );
    let Some((every, agg)) = q.window else {
        return Some(format!("{source}{shape}\n"));
    };
    let every = every.max(1);
    let window = |f: &str| {
        format!("\n  |> aggregateWindow(every: {every}ms, fn: {f}, createEmpty: false, timeSrc: \"_start\")")
    };
    let f = match agg {
        Aggregate::Mean => "mean",
        Aggregate::Min => "min",
        Aggregate::Max => "max",
        Aggregate::Sum => "sum",
        Aggregate::Last => "last",
        Aggregate::Count => {
            return Some(format!(
                "{source}{}{shape}\n  |> yield(name: \"count\")\n",
                window("count")
            ))
        }
    };
    Some(format!(
        "data = {source}\n\ndata{}{shape}\n  |> yield(name: \"agg\")\n\ndata{}{shape}\n  |> yield(name: \"count\")\n",
        window(f),
        window("count")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_literals() {
        assert_eq!(flux_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(flux_time(1_795_593_607_500), "2026-11-25T08:00:07.500Z");
        assert_eq!(flux_time(MAX_TIME_MS), "2262-04-11T23:47:16.854Z");
        for t in [
            0,
            1,
            999,
            1_000,
            86_399_999,
            1_795_593_607_500,
            951_782_400_000,
            MAX_TIME_MS,
        ] {
            let back = humantime::parse_rfc3339(&flux_time(t)).expect("time");
            let back = back.duration_since(UNIX_EPOCH).expect("after 1970");
            assert_eq!(back.as_millis(), u128::from(t), "{}", flux_time(t));
        }
        assert_eq!(flux_str(r#"a"b\c${x}$y"#), r#""a\"b\\c\${x}$y""#);
    }
}
