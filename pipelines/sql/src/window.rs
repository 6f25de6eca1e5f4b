//! Event-time windows in SQL: `GROUP BY tumble(interval '1 minute'), ...` or
//! `GROUP BY hop(interval '10 seconds', interval '1 minute'), ...`.
//!
//! The window call is rewritten to the `window_start, window_end` columns (ms since the epoch)
//! that the operator adds to every row, a row of a hopping window being copied into each window
//! it falls in; the rest of the query is plain DataFusion SQL.

use std::time::Duration;

use crate::{Error, Result};

/// How rows are grouped in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Back-to-back windows of `size`.
    Tumbling { size_ms: i64 },
    /// Windows of `size` starting every `slide` (overlapping when `slide < size`).
    Hopping { slide_ms: i64, size_ms: i64 },
}

impl Window {
    /// Width of each window.
    pub fn size_ms(&self) -> i64 {
        match self {
            Window::Tumbling { size_ms } | Window::Hopping { size_ms, .. } => *size_ms,
        }
    }

    /// The start of every window `at` falls in, earliest first.
    pub fn starts(&self, at: i64) -> Vec<i64> {
        match *self {
            Window::Tumbling { size_ms } => vec![at.div_euclid(size_ms) * size_ms],
            Window::Hopping { slide_ms, size_ms } => {
                let last = at.div_euclid(slide_ms) * slide_ms;
                let mut starts = Vec::new();
                let mut start = last;
                while start > at.saturating_sub(size_ms) {
                    starts.push(start);
                    start = start.saturating_sub(slide_ms);
                    if start == i64::MIN {
                        break;
                    }
                }
                starts.reverse();
                starts
            }
        }
    }
}

/// A query with its window call found and replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowedQuery {
    pub window: Window,
    /// The query as DataFusion runs it, grouping by `window_start, window_end`.
    pub sql: String,
}

/// Finds the one `tumble(...)` or `hop(...)` call in `sql` and rewrites it.
pub fn parse(sql: &str) -> Result<WindowedQuery> {
    let lower = sql.to_ascii_lowercase();
    let mut found = None;
    for name in ["tumble", "hop"] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(name).map(|i| i + from) {
            from = at + name.len();
            let before = lower[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let rest = lower[from..].trim_start();
            if !rest.starts_with('(') {
                continue;
            }
            if found.is_some() {
                return Err(Error::Window("a query may group by one window only".into()));
            }
            let open = from + (lower[from..].len() - rest.len());
            let close = matching_paren(&lower, open)
                .ok_or_else(|| Error::Window(format!("unclosed parenthesis after {name}")))?;
            found = Some((name, at, open, close));
        }
    }
    let (name, at, open, close) = found.ok_or_else(|| {
        Error::Window("the query must group by a window: tumble(interval '1 minute') or hop(interval '10 seconds', interval '1 minute')".into())
    })?;
    let args: Vec<i64> = split_top_level(&sql[open + 1..close])
        .iter()
        .map(|arg| parse_interval(arg))
        .collect::<Result<_, _>>()?;
    let window = match (name, args.as_slice()) {
        ("tumble", [size_ms]) => Window::Tumbling { size_ms: *size_ms },
        ("hop", [slide_ms, size_ms]) if slide_ms <= size_ms => Window::Hopping {
            slide_ms: *slide_ms,
            size_ms: *size_ms,
        },
        ("hop", [_, _]) => {
            return Err(Error::Window("hop(slide, size) needs slide <= size".into()))
        }
        _ => {
            return Err(Error::Window(format!(
                "{name}(...) takes {} interval(s)",
                if name == "hop" { 2 } else { 1 }
            )))
        }
    };
    let sql = format!(
        "{}window_start, window_end{}",
        &sql[..at],
        &sql[close + 1..]
    );
    Ok(WindowedQuery { window, sql })
}

fn matching_paren(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut quoted = false;
    for (i, c) in text[open..].char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

fn split_top_level(args: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    for (i, c) in args.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(&args[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&args[start..]);
    parts
}

/// `interval '1 minute'`, `interval '10 seconds'`, `interval '500 milliseconds'`, ... in ms.
pub fn parse_interval(text: &str) -> Result<i64> {
    let text = text.trim();
    let lower = text.to_ascii_lowercase();
    let body = lower
        .strip_prefix("interval")
        .map(str::trim)
        .and_then(|b| b.strip_prefix('\''))
        .and_then(|b| b.strip_suffix('\''))
        .ok_or_else(|| Error::Window(format!("expected interval '<n> <unit>', got {text}")))?;
    parse_duration(body)
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .filter(|ms| *ms > 0)
        .ok_or_else(|| Error::Window(format!("cannot read interval {text}")))
}

/// `1 minute`, `10s`, `500 ms`, `2 hours`: a positive duration.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim().to_ascii_lowercase();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let count: u64 = text[..split].parse().ok()?;
    let unit = text[split..].trim();
    let ms_per = match unit {
        "ms" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "second" | "seconds" => 1_000,
        "m" | "min" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        _ => return None,
    };
    Some(Duration::from_millis(count.checked_mul(ms_per)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tumble_is_rewritten_to_window_columns() {
        let q = parse(
            "SELECT window_start, tenant_id, count(*) AS records FROM usage \
             GROUP BY TUMBLE(INTERVAL '1 minute'), tenant_id",
        )
        .unwrap();
        assert_eq!(q.window, Window::Tumbling { size_ms: 60_000 });
        assert_eq!(
            q.sql,
            "SELECT window_start, tenant_id, count(*) AS records FROM usage \
             GROUP BY window_start, window_end, tenant_id"
        );
    }

    #[test]
    fn hop_takes_slide_then_size() {
        let q = parse("SELECT 1 FROM t GROUP BY hop(interval '10 seconds', interval '1 minute')")
            .unwrap();
        assert_eq!(
            q.window,
            Window::Hopping {
                slide_ms: 10_000,
                size_ms: 60_000
            }
        );
    }

    #[test]
    fn queries_without_one_valid_window_are_refused() {
        assert!(parse("SELECT count(*) FROM usage").is_err());
        assert!(parse("SELECT 1 FROM t GROUP BY tumble(interval 'soon')").is_err());
        assert!(
            parse("SELECT 1 FROM t GROUP BY hop(interval '1 minute', interval '1 second')")
                .is_err()
        );
        assert!(parse("SELECT 1 FROM t GROUP BY tumble(interval '1 minute'), hop(interval '1 second', interval '1 minute')").is_err());
        // A column merely named like a window function is left alone.
        assert!(parse("SELECT hop_count FROM t GROUP BY tumble(interval '1 minute')").is_ok());
    }

    #[test]
    fn rows_fall_in_every_window_that_covers_them() {
        let tumble = Window::Tumbling { size_ms: 60_000 };
        assert_eq!(tumble.starts(125_000), vec![120_000]);
        assert_eq!(tumble.starts(-1), vec![-60_000]);
        let hop = Window::Hopping {
            slide_ms: 20_000,
            size_ms: 60_000,
        };
        assert_eq!(hop.starts(125_000), vec![80_000, 100_000, 120_000]);
        assert_eq!(hop.starts(120_000), vec![80_000, 100_000, 120_000]);
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("1 minute"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250 ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2 fortnights"), None);
    }
}
