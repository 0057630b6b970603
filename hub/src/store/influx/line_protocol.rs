//! Batches as InfluxDB line protocol: `<measurement>,device=<id>,metric=<name>
//! value=<float> <ms>`, escaped, with what InfluxDB cannot represent left out.

use super::MAX_TIME_MS;
use crate::store::Batch;

fn escape_into(out: &mut Vec<u8>, s: &str, special: &[u8]) {
    for b in s.bytes() {
        if b == b'\\' || special.contains(&b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Appends the line protocol of a batch; returns the points written and the readings
/// dropped because InfluxDB cannot represent them (a time after [`MAX_TIME_MS`], a value
/// that is not finite, a name with a line break; the hub's validation admits none of the
/// last two, but a bad line would fail the whole request).
pub(super) fn encode_batch(out: &mut Vec<u8>, measurement: &str, batch: &Batch) -> (u32, u64) {
    use std::io::Write as _;
    let mut points = 0;
    let mut dropped = 0;
    let bad_name = |s: &str| s.is_empty() || s.contains(['\n', '\r']);
    for r in &batch.readings {
        if r.ts > MAX_TIME_MS
            || !r.value.is_finite()
            || bad_name(&batch.device)
            || bad_name(&r.metric)
        {
            dropped += 1;
            continue;
        }
        escape_into(out, measurement, b", ");
        out.extend_from_slice(b",device=");
        escape_into(out, &batch.device, b",= ");
        out.extend_from_slice(b",metric=");
        escape_into(out, &r.metric, b",= ");
        // `{:?}` is the shortest text that reads back as the same f64 (`1.0`, `1e21`),
        // which line protocol parses as a float.
        let _ = writeln!(out, " value={:?} {}", r.value, r.ts);
        points += 1;
    }
    (points, dropped)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use schemas::message::truncated;
    use schemas::Reading;

    use super::*;

    #[test]
    fn line_protocol_escapes_names_and_drops_unrepresentable_readings() {
        let b = Batch {
            device: Arc::from("dev 1,a=b\\"),
            seq: 1,
            readings: vec![
                Reading {
                    metric: truncated("temp"),
                    ts: 1000,
                    value: 21.5,
                },
                Reading {
                    metric: truncated("late"),
                    ts: MAX_TIME_MS + 1,
                    value: 1.0,
                },
                Reading {
                    metric: truncated("big"),
                    ts: 5,
                    value: 1e21,
                },
                Reading {
                    metric: truncated("one"),
                    ts: MAX_TIME_MS,
                    value: 1.0,
                },
                Reading {
                    metric: truncated("nan"),
                    ts: 7,
                    value: f64::NAN,
                },
            ],
        };
        let mut out = Vec::new();
        let (points, dropped) = encode_batch(&mut out, "tele metry,x", &b);
        assert_eq!((points, dropped), (3, 2));
        let tags = r"tele\ metry\,x,device=dev\ 1\,a\=b\\";
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            format!(
                "{tags},metric=temp value=21.5 1000\n{tags},metric=big value=1e21 5\n{tags},metric=one value=1.0 {MAX_TIME_MS}\n"
            )
        );
    }
}
