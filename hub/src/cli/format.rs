//! Rendering for people: aligned tables, times, durations.

use std::fmt;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Like `println!`, but a closed pipe (`hub devices | head -1`) ends the process quietly
/// with status 0 instead of a panic.
macro_rules! emit {
    ($($arg:tt)*) => {
        $crate::cli::format::emit_line(format_args!($($arg)*))
    };
}

/// Writes one line to stdout; see [`emit!`].
pub fn emit_line(line: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(err) = out.write_fmt(format_args!("{line}\n")) {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// Prints rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        emit!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Text on one line: newlines, tabs and other control characters written as escapes
/// (`\n`, `\t`, `\u{1b}`), so that one event or one table cell is one line.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// ms since the epoch as RFC 3339 with milliseconds, UTC.
pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// How long ago `ms` was, roughly ("3s ago", "2h ago").
pub fn ago(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Microseconds as milliseconds with one decimal.
pub fn rtt(us: Option<u64>) -> String {
    us.map(|us| format!("{:.1}ms", us as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// A value for people: at most 9 decimals, no trailing zeros ("21.5", "3", "22.11" for
/// the mean 22.110000000000003).
pub fn number_rounded(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    if !(1e-9..1e15).contains(&v.abs()) {
        // Very large or very small: the shortest exact form ("1e300").
        return format!("{v}");
    }
    let text = format!("{v:.9}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A value with full precision and without trailing zeros ("21.5", "3", "0.001"), for
/// machines (CSV).
pub fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}
