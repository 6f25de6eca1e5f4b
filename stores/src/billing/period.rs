//! Billing periods: calendar months in UTC.

use std::fmt;

use chrono::{Datelike, NaiveDate};

use crate::{Error, Result};

/// A calendar month (UTC), the period an invoice bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    first_day: NaiveDate,
}

impl Period {
    /// The month `YYYY-MM` (or a date in it, `YYYY-MM-DD`).
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = || Error::Invalid(format!("{text:?} is not a month (YYYY-MM)"));
        let mut parts = text.trim().splitn(3, '-');
        let year: i32 = parts
            .next()
            .and_then(|y| y.parse().ok())
            .ok_or_else(invalid)?;
        let month: u32 = parts
            .next()
            .and_then(|m| m.parse().ok())
            .ok_or_else(invalid)?;
        if !(1970..=9999).contains(&year) {
            return Err(invalid());
        }
        NaiveDate::from_ymd_opt(year, month, 1)
            .map(|first_day| Self { first_day })
            .ok_or_else(invalid)
    }

    /// The month containing `at_ms` (Unix milliseconds).
    pub fn containing(at_ms: i64) -> Self {
        let date = chrono::DateTime::from_timestamp_millis(at_ms)
            .map(|t| t.date_naive())
            .unwrap_or_default();
        Self {
            first_day: date.with_day(1).unwrap_or(date),
        }
    }

    /// Its first moment (Unix milliseconds).
    pub fn start_ms(self) -> i64 {
        self.first_day
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .unwrap_or(0)
    }

    /// The first moment after it.
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }

    /// The month after.
    pub fn next(self) -> Self {
        Self {
            first_day: self
                .first_day
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(self.first_day),
        }
    }

    /// The month before.
    pub fn previous(self) -> Self {
        Self {
            first_day: self
                .first_day
                .checked_sub_months(chrono::Months::new(1))
                .unwrap_or(self.first_day),
        }
    }

    /// As PostgreSQL's `date` text: `YYYY-MM-01`.
    pub fn date_text(self) -> String {
        self.first_day.format("%Y-%m-%d").to_string()
    }

    /// As ClickHouse's `toYYYYMM` has it (the facts' partition key).
    pub fn yyyymm(self) -> u32 {
        u32::try_from(self.first_day.year()).unwrap_or(0) * 100 + self.first_day.month()
    }
}

/// A range of whole UTC days, `[from, to)` in Unix milliseconds, from days written `YYYY-MM-DD`
/// (`to` is the day after the last): by default from the first of the month containing `now_ms`
/// to the end of its day. Refused when a day does not parse or the range is empty.
pub fn day_range(from: Option<&str>, to: Option<&str>, now_ms: i64) -> Result<(i64, i64)> {
    let day = |text: Option<&str>, default: i64| match text {
        None => Ok(default),
        Some(text) => NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp_millis())
            .ok_or_else(|| Error::Invalid(format!("{text:?} is not a day (YYYY-MM-DD)"))),
    };
    const DAY_MS: i64 = 86_400_000;
    let from = day(from, Period::containing(now_ms).start_ms())?;
    let to = day(to, now_ms.div_euclid(DAY_MS).saturating_add(1) * DAY_MS)?;
    if from >= to {
        return Err(Error::Invalid(
            "the first day must come before the end of the range".into(),
        ));
    }
    Ok((from, to))
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.first_day.format("%Y-%m"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_parse_print_and_bound_in_utc() {
        let p = Period::parse("2026-12").unwrap();
        assert_eq!(p.to_string(), "2026-12");
        assert_eq!(p.date_text(), "2026-12-01");
        assert_eq!(p.start_ms(), 1_796_083_200_000);
        assert_eq!(p.next().to_string(), "2027-01");
        assert_eq!(p.previous().to_string(), "2026-11");
        assert_eq!(Period::containing(p.end_ms() - 1), p);
        assert_eq!(Period::containing(p.end_ms()), p.next());
        assert_eq!(Period::parse("2026-12-01").unwrap(), p);
        for bad in ["2026", "2026-13", "x-01", "", "1969-12"] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
        let now = p.start_ms() + 3 * 86_400_000 + 5;
        assert_eq!(
            day_range(None, None, now).unwrap(),
            (p.start_ms(), p.start_ms() + 4 * 86_400_000)
        );
        assert_eq!(
            day_range(Some("2026-12-02"), Some("2026-12-03"), now).unwrap(),
            (p.start_ms() + 86_400_000, p.start_ms() + 2 * 86_400_000)
        );
        assert!(day_range(Some("2026-12-03"), Some("2026-12-03"), now).is_err());
        assert!(day_range(Some("12/03/2026"), None, now).is_err());
    }
}
