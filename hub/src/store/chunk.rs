//! The embedded store's row format for readings: one row (a chunk) holds readings of one
//! device within one hour, as JSON text `[[series,ts,value],...]`, so that the store writes
//! one B-tree entry per device and chunk instead of one per reading. A group commit
//! appends one chunk per device to the reading log; folding the log merges a device's
//! chunks of many commits into one. The `readings` view unpacks chunks with SQLite's own
//! `json_each`, so plain SQL (and the `sqlite3` shell) still sees one row per reading.

use std::fmt::Write;

/// The span of time one chunk may cover: a chunk's readings all fall in the same
/// `ts / CHUNK_SPAN_MS` window, so a query for `[from, until)` needs only the chunks whose
/// first reading is at or after the start of `from`'s window.
pub const CHUNK_SPAN_MS: i64 = 3_600_000;

/// Most readings one chunk holds; a commit starts another chunk of the same series when one
/// is full, so that rewriting a chunk (pruning) stays a bounded piece of work.
pub const CHUNK_MAX_READINGS: usize = 1024;

/// The window a timestamp belongs to (see [`CHUNK_SPAN_MS`]).
pub fn window_of(ts: i64) -> i64 {
    ts.div_euclid(CHUNK_SPAN_MS)
}

/// The first timestamp of the window `ts` falls in: the lowest `ts_first` a chunk holding
/// readings at or after `ts` can have.
pub fn window_start(ts: i64) -> i64 {
    window_of(ts).saturating_mul(CHUNK_SPAN_MS)
}

/// One reading in a chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// The series (`series.id`: the device and the metric).
    pub series: i64,
    /// Milliseconds since the epoch.
    pub ts: i64,
    /// The value (finite).
    pub value: f64,
}

/// A chunk being built: readings in the order they were stored (the order breaks ties
/// between equal timestamps in favour of the later one), with their time bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkBuilder {
    points: String,
    /// Readings added.
    pub len: usize,
    /// The earliest timestamp added.
    pub ts_first: i64,
    /// The latest timestamp added.
    pub ts_last: i64,
}

impl ChunkBuilder {
    /// A chunk with room for about `readings` readings before it reallocates.
    pub fn with_capacity(readings: usize) -> ChunkBuilder {
        let mut points = String::with_capacity(2 + readings.min(CHUNK_MAX_READINGS) * 32);
        points.push('[');
        ChunkBuilder {
            points,
            len: 0,
            ts_first: i64::MAX,
            ts_last: i64::MIN,
        }
    }

    /// Appends one reading. Values must be finite (the wire format refuses the others).
    pub fn push(&mut self, point: Point) {
        if self.len > 0 {
            self.points.push(',');
        }
        // `{:?}` prints the shortest text that reads back as the same f64, with an
        // exponent for large and small magnitudes: valid JSON for every finite value.
        let Point { series, ts, value } = point;
        let _ = write!(self.points, "[{series},{ts},{value:?}]");
        self.len += 1;
        self.ts_first = self.ts_first.min(ts);
        self.ts_last = self.ts_last.max(ts);
    }

    /// Appends the readings of a finished chunk's text (`[[series,ts,value],...]`, as
    /// [`ChunkBuilder::finish`] wrote it) that holds `len` readings between `ts_first` and
    /// `ts_last`, without reading them one by one. Returns `false`, and appends nothing,
    /// when the text is not a JSON array.
    pub fn append_finished(&mut self, text: &str, len: usize, ts_first: i64, ts_last: i64) -> bool {
        let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
            return false;
        };
        if inner.is_empty() {
            return true;
        }
        if self.len > 0 {
            self.points.push(',');
        }
        self.points.push_str(inner);
        self.len += len;
        self.ts_first = self.ts_first.min(ts_first);
        self.ts_last = self.ts_last.max(ts_last);
        true
    }

    /// Whether it holds [`CHUNK_MAX_READINGS`].
    pub fn is_full(&self) -> bool {
        self.len >= CHUNK_MAX_READINGS
    }

    /// The JSON text of the chunk.
    pub fn finish(mut self) -> String {
        self.points.push(']');
        self.points
    }
}

/// A chunk's text could not be read back (it was not written by [`ChunkBuilder`]).
#[derive(Debug, thiserror::Error)]
#[error("a readings chunk is damaged near byte {at}: expected {expected}")]
pub struct ChunkError {
    at: usize,
    expected: &'static str,
}

/// Reads a chunk's readings back, in their stored order.
///
/// # Errors
/// The text is not a JSON array of `[integer, integer, number]` triples.
pub fn decode(points: &str) -> Result<Vec<Point>, ChunkError> {
    let bytes = points.as_bytes();
    let mut at = 0usize;
    let expect = |at: &mut usize, byte: u8, expected: &'static str| {
        if bytes.get(*at) == Some(&byte) {
            *at += 1;
            Ok(())
        } else {
            Err(ChunkError { at: *at, expected })
        }
    };
    // The text up to the next `end` byte, parsed.
    fn field<T: std::str::FromStr>(
        points: &str,
        at: &mut usize,
        end: u8,
        expected: &'static str,
    ) -> Result<T, ChunkError> {
        let start = *at;
        let bytes = points.as_bytes();
        while *at < bytes.len() && bytes[*at] != end {
            *at += 1;
        }
        points[start..*at].parse().map_err(|_| ChunkError {
            at: start,
            expected,
        })
    }
    let mut out = Vec::new();
    expect(&mut at, b'[', "'['")?;
    if bytes.get(at) == Some(&b']') && at + 1 == bytes.len() {
        return Ok(out);
    }
    loop {
        expect(&mut at, b'[', "'[' opening a reading")?;
        let series = field(points, &mut at, b',', "an integer series")?;
        expect(&mut at, b',', "','")?;
        let ts = field(points, &mut at, b',', "an integer timestamp")?;
        expect(&mut at, b',', "','")?;
        let value = field(points, &mut at, b']', "a number")?;
        expect(&mut at, b']', "']' closing a reading")?;
        out.push(Point { series, ts, value });
        match bytes.get(at) {
            Some(b',') => at += 1,
            Some(b']') if at + 1 == bytes.len() => return Ok(out),
            _ => {
                return Err(ChunkError {
                    at,
                    expected: "',' or the final ']'",
                })
            }
        }
    }
}

/// Encodes readings as one chunk's text (for rewriting a chunk).
pub fn encode(points: &[Point]) -> String {
    let mut chunk = ChunkBuilder::with_capacity(points.len());
    for &point in points {
        chunk.push(point);
    }
    chunk.finish()
}

/// Doubles from every part of the range (a fixed generator, so a failure repeats).
#[cfg(test)]
pub(crate) fn awkward_values(n: usize) -> Vec<f64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = vec![0.1 + 0.2, -0.0, 5e-324, f64::MAX, 1e300, 21.5];
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = f64::from_bits(x);
        if v.is_finite() {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_back_exactly() {
        let point = |series, ts, value| Point { series, ts, value };
        let points = vec![
            point(1, 1_700_000_000_123, 21.5),
            point(2, -5, -0.0),
            point(3, 0, 1e300),
            point(i64::MAX, i64::MAX, 5e-324),
            point(0, i64::MIN, f64::MAX),
            point(9, 7, 0.1 + 0.2),
        ];
        let text = encode(&points);
        let back = decode(&text).expect("decode");
        assert_eq!(back.len(), points.len());
        for (a, b) in points.iter().zip(&back) {
            assert_eq!((a.series, a.ts), (b.series, b.ts));
            assert_eq!(a.value.to_bits(), b.value.to_bits(), "{text}");
        }
        assert_eq!(decode(&encode(&[])).expect("empty"), vec![]);
    }

    #[test]
    fn finished_chunks_append_as_their_readings_in_order() {
        let point = |series, ts, value| Point { series, ts, value };
        let first = vec![point(1, 10, 1.5), point(2, 5, -0.0)];
        let second = vec![point(1, 20, 5e-324)];
        let mut merged = ChunkBuilder::with_capacity(4);
        assert!(merged.append_finished(&encode(&first), 2, 5, 10));
        assert!(merged.append_finished(&encode(&[]), 0, i64::MAX, i64::MIN));
        assert!(merged.append_finished(&encode(&second), 1, 20, 20));
        assert!(!merged.append_finished("{}", 1, 0, 0));
        assert_eq!((merged.len, merged.ts_first, merged.ts_last), (3, 5, 20));
        let back = decode(&merged.finish()).expect("decode");
        let expected: Vec<Point> = first.into_iter().chain(second).collect();
        assert_eq!(back.len(), expected.len());
        for (a, b) in expected.iter().zip(&back) {
            assert_eq!(
                (a.series, a.ts, a.value.to_bits()),
                (b.series, b.ts, b.value.to_bits())
            );
        }
    }

    #[test]
    fn damaged_chunks_are_refused_with_where() {
        for bad in [
            "",
            "[",
            "[[1,2,3]",
            "[[1,2,x]]",
            "[[1,2,3]]x",
            "[[1,2 3]]",
            "[[1,2]]",
            "{}",
            "[]x",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn windows_are_aligned_to_the_span() {
        assert_eq!(window_start(CHUNK_SPAN_MS + 5), CHUNK_SPAN_MS);
        assert_eq!(window_start(-1), -CHUNK_SPAN_MS);
        assert_eq!(window_of(CHUNK_SPAN_MS - 1), 0);
    }
}
