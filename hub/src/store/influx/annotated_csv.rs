//! InfluxDB's annotated CSV answer to a Flux query, read with the `csv` crate: tables
//! separated by empty lines, each with optional annotation rows (`#datatype`, `#group`,
//! `#default`), a header row, then data rows whose first column is empty; RFC 3339 times
//! read with `humantime`.

use std::time::UNIX_EPOCH;

use super::InfluxError;

/// One data row of a Flux answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct FluxRow {
    /// The `yield` name (`agg`, `count`, or `_result`).
    pub(super) result: String,
    pub(super) time_ms: u64,
    pub(super) value: f64,
    pub(super) metric: String,
}

/// Parses InfluxDB's CSV answer. Columns are found by name; an empty cell takes the
/// column's `#default` (that is how the `result` name is sent). An `error` table is an
/// error.
///
/// # Errors
/// [`InfluxError::Query`] for an `error` table (InfluxDB's message) and for an answer that
/// is not CSV or lacks `_time` or `_value`.
pub(super) fn parse_flux_csv(text: &str) -> Result<Vec<FluxRow>, InfluxError> {
    let bad = |why: String| InfluxError::Query(format!("unexpected answer from InfluxDB: {why}"));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut rows = Vec::new();
    let mut header: Option<csv::StringRecord> = None;
    let mut defaults = csv::StringRecord::new();
    let mut record = csv::StringRecord::new();
    loop {
        let start = reader.position().byte();
        if !reader
            .read_record(&mut record)
            .map_err(|e| bad(format!("not CSV: {e}")))?
        {
            break;
        }
        let after_empty_line = follows_empty_line(text.as_bytes(), start);
        let blank = record.iter().all(str::is_empty);
        if after_empty_line || blank {
            // A table boundary: annotations and a header follow.
            header = None;
            defaults.clear();
            if blank {
                continue;
            }
        }
        if record.get(0).is_some_and(|c| c.starts_with('#')) {
            if header.is_some() {
                header = None;
                defaults.clear();
            }
            if record.get(0) == Some("#default") {
                defaults = record.clone();
            }
            continue;
        }
        let Some(columns) = &header else {
            header = Some(record.clone());
            continue;
        };
        let cell = |name: &str| -> Option<&str> {
            let i = columns.iter().position(|c| c == name)?;
            match record.get(i) {
                Some("") | None => defaults.get(i),
                some => some,
            }
        };
        if columns.get(1) == Some("error") {
            let message = cell("error").unwrap_or("unknown error");
            let reference = cell("reference").filter(|r| !r.is_empty());
            return Err(InfluxError::Query(match reference {
                Some(r) => format!("{message} (reference {r})"),
                None => message.to_string(),
            }));
        }
        let time = cell("_time").ok_or_else(|| bad("no _time column".into()))?;
        let time_ms =
            time_ms(time).ok_or_else(|| bad(format!("`{time}` is not an RFC 3339 UTC time")))?;
        let value = cell("_value").ok_or_else(|| bad("no _value column".into()))?;
        let value: f64 = value
            .parse()
            .map_err(|_| bad(format!("`{value}` is not a number")))?;
        rows.push(FluxRow {
            result: cell("result").unwrap_or("_result").to_string(),
            time_ms,
            value,
            metric: cell("metric").unwrap_or("").to_string(),
        });
    }
    Ok(rows)
}

/// Whether the record the reader went on to read from byte `start` comes after an empty
/// line. The `csv` crate skips empty lines, but in Flux's CSV they separate tables, so the
/// text where the read started is looked at: past the `\n` of the previous record's
/// `\r\n` (which the reader leaves for the next read), another line end means an empty
/// line.
fn follows_empty_line(text: &[u8], start: u64) -> bool {
    let Ok(start) = usize::try_from(start) else {
        return false;
    };
    let mut rest = text.get(start..).unwrap_or_default();
    if start > 0 && text.get(start - 1) == Some(&b'\r') {
        rest = rest.strip_prefix(b"\n").unwrap_or(rest);
    }
    matches!(rest.first(), Some(b'\r' | b'\n'))
}

/// Ms since the epoch of an RFC 3339 UTC time as InfluxDB writes it (`...:20Z`,
/// `...:20.5Z`: trailing zeros of the fraction removed); `None` for anything else.
pub(super) fn time_ms(s: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(s).ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(result: &str, time_ms: u64, value: f64, metric: &str) -> FluxRow {
        FluxRow {
            result: result.into(),
            time_ms,
            value,
            metric: metric.into(),
        }
    }

    #[test]
    fn tables_annotations_defaults_and_quoting() {
        // Two tables without annotations, separated by an empty line (LF line ends), then
        // one with annotations whose `#default` names the result (CRLF), and quoted cells.
        let text = concat!(
            ",result,table,_time,_value,metric\n",
            ",r1,0,1970-01-01T00:00:01Z,1.5,\"a,b\"\n",
            "\n",
            ",result,_time,_value,metric\n",
            ",r2,1970-01-01T00:00:02.25Z,2,\"say \"\"hi\"\"\"\n",
            "\r\n",
            "#datatype,string,long,dateTime:RFC3339,double,string\r\n",
            "#group,false,false,false,false,true\r\n",
            "#default,agg,,,,\r\n",
            ",result,table,_time,_value,metric\r\n",
            ",,0,1970-01-01T00:00:03Z,-1e3,m\r\n",
            "#datatype,string,long,dateTime:RFC3339,double,string\r\n",
            "#default,count,,,,\r\n",
            ",result,table,_time,_value,metric\r\n",
            ",,0,1970-01-01T00:00:04Z,7,m\r\n",
            ",\r\n",
        );
        assert_eq!(
            parse_flux_csv(text).expect("parse"),
            vec![
                row("r1", 1000, 1.5, "a,b"),
                row("r2", 2250, 2.0, "say \"hi\""),
                row("agg", 3000, -1000.0, "m"),
                row("count", 4000, 7.0, "m"),
            ]
        );
        // Without annotations, with CRLF, columns in another order in the second table.
        let text = concat!(
            ",result,_time,_value\r\n",
            ",a,1970-01-01T00:00:01Z,1\r\n",
            "\r\n",
            ",result,_value,_time\r\n",
            ",b,2,1970-01-01T00:00:02Z\r\n",
        );
        assert_eq!(
            parse_flux_csv(text).expect("parse"),
            vec![row("a", 1000, 1.0, ""), row("b", 2000, 2.0, "")]
        );
        assert_eq!(parse_flux_csv("").expect("empty"), vec![]);
        assert_eq!(parse_flux_csv("\r\n\r\n").expect("empty lines"), vec![]);
    }

    #[test]
    fn malformed_answers_are_errors_that_say_why() {
        for (text, says) in [
            (",result,_value\n,,1\n", "no _time column"),
            (
                ",result,_time\n,,1970-01-01T00:00:00Z\n",
                "no _value column",
            ),
            (
                ",_time,_value\n,yesterday,1\n",
                "`yesterday` is not an RFC 3339",
            ),
            (
                ",_time,_value\n,1970-01-01T00:00:00Z,many\n",
                "`many` is not a number",
            ),
        ] {
            let err = parse_flux_csv(text).expect_err(text).to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(time_ms("1970-01-01T00:00:00.123456789Z"), Some(123));
        assert_eq!(time_ms("2026-11-25T08:00:07.5Z"), Some(1_795_593_607_500));
        assert_eq!(
            time_ms("2026-11-25T08:00:07.5+00:00"),
            Some(1_795_593_607_500)
        );
        assert_eq!(
            time_ms("2262-04-11T23:47:16.854Z"),
            Some(super::super::MAX_TIME_MS)
        );
        for bad in [
            "",
            "garbage",
            "2026-13-01T00:00:00Z",
            "2026-11-25T08:00:00",
            "2026-11-25T08:00:00Zjunk",
            // InfluxDB answers in UTC; an offset is not what it sends.
            "2026-11-25T09:00:07.5+01:00",
        ] {
            assert_eq!(time_ms(bad), None, "{bad}");
        }
    }
}
