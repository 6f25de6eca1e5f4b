//! Exact money. Prices are integers in micro-units of the currency; amounts are computed
//! exactly in pico-units (10⁻¹² of the currency: a token count times a price per million
//! tokens in micro-units), and rounded once per invoice line to the currency's minor unit,
//! half away from zero. Nothing here is a float.

use std::fmt;

use crate::{Error, Result};

/// Pico-units in one micro-unit.
const PICO_PER_MICRO: i128 = 1_000_000;

/// An exact amount, in pico-units of the currency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Exact(pub i128);

impl Exact {
    /// `tokens` at `micros_per_mtok` micro-units per million tokens.
    pub fn tokens(tokens: u64, micros_per_mtok: i64) -> Self {
        // A token costs micros × 10⁻⁶ currency units ÷ 10⁶ tokens = micros pico-units.
        Self(i128::from(tokens) * i128::from(micros_per_mtok))
    }

    /// A whole amount of micro-units.
    pub fn micros(micros: i64) -> Self {
        Self(i128::from(micros) * PICO_PER_MICRO)
    }

    /// Rounded to `currency`'s minor unit, half away from zero: the one rounding an invoice
    /// line gets.
    pub fn round(self, currency: Currency) -> Minor {
        let step = 10i128.pow(12 - currency.exponent);
        let half = step / 2;
        let rounded = if self.0 >= 0 {
            (self.0 + half) / step
        } else {
            -((-self.0 + half) / step)
        };
        Minor(i64::try_from(rounded).unwrap_or(if rounded > 0 { i64::MAX } else { i64::MIN }))
    }

    /// In whole micro-units, rounded up (a budget counts what may have been spent, never
    /// less); nothing below zero.
    pub fn micros_up(self) -> u64 {
        let pico = self.0.max(0);
        let micros = (pico + PICO_PER_MICRO - 1) / PICO_PER_MICRO;
        u64::try_from(micros).unwrap_or(u64::MAX)
    }

    /// As a decimal string of currency units with every digit (for `numeric` columns and
    /// audits): `0.000000123400`.
    pub fn decimal(self) -> String {
        decimal(self.0, 12)
    }

    /// Parses what [`decimal`](Self::decimal) wrote (or any decimal with at most 12 places).
    pub fn parse(text: &str) -> Result<Self> {
        Ok(Self(parse_decimal(text, 12)?))
    }
}

impl std::ops::Add for Exact {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }
}

impl std::ops::Sub for Exact {
    type Output = Self;
    fn sub(self, other: Self) -> Self {
        Self(self.0 - other.0)
    }
}

impl std::iter::Sum for Exact {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self(0), |a, b| a + b)
    }
}

/// An amount in a currency's minor unit (cents), as billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Minor(pub i64);

impl Minor {
    /// As a decimal string in currency units: `12.30`, `-0.05`, `1200` (no minor unit).
    pub fn decimal(self, currency: Currency) -> String {
        decimal(i128::from(self.0), currency.exponent)
    }

    /// The same amount, exactly.
    pub fn exact(self, currency: Currency) -> Exact {
        Exact(i128::from(self.0) * 10i128.pow(12 - currency.exponent))
    }
}

impl std::ops::Add for Minor {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

impl std::ops::Sub for Minor {
    type Output = Self;
    fn sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl std::iter::Sum for Minor {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self(0), |a, b| a + b)
    }
}

/// An ISO 4217 currency and the digits of its minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency {
    code: [u8; 3],
    exponent: u32,
}

impl Currency {
    /// The currency with ISO code `code` (three capital letters).
    pub fn new(code: &str) -> Result<Self> {
        let bytes: [u8; 3] = code
            .as_bytes()
            .try_into()
            .ok()
            .filter(|b: &[u8; 3]| b.iter().all(u8::is_ascii_uppercase))
            .ok_or_else(|| {
                Error::Invalid(format!("{code:?} is not a currency code (such as USD)"))
            })?;
        // ISO 4217 minor units: none for these, three for these, two for the rest.
        let exponent = match code {
            "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF"
            | "UGX" | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
            _ => 2,
        };
        Ok(Self {
            code: bytes,
            exponent,
        })
    }

    /// The ISO code.
    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).unwrap_or("XXX")
    }
}

impl Default for Currency {
    /// US dollars, the billing currency until one is set.
    fn default() -> Self {
        Self {
            code: *b"USD",
            exponent: 2,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A price typed by a person (`0.15`, `12`, `1.000001`) as micro-units: at most six decimal
/// places, never negative.
pub fn parse_micros(text: &str) -> Result<i64> {
    let value = parse_decimal(text, 6)?;
    if value < 0 {
        return Err(Error::Invalid(format!(
            "{text:?}: a price is never negative"
        )));
    }
    i64::try_from(value).map_err(|_| Error::Invalid(format!("{text:?} is too large")))
}

/// Micro-units as a decimal string with no trailing zeros beyond two places: `0.15`, `2.50`,
/// `0.000001`.
pub fn micros_text(micros: i64) -> String {
    let full = decimal(i128::from(micros), 6);
    let trimmed = full.trim_end_matches('0');
    let (whole, fraction) = trimmed.split_once('.').unwrap_or((trimmed, ""));
    format!("{whole}.{fraction:0<2}")
}

fn decimal(value: i128, places: u32) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let magnitude = value.unsigned_abs();
    if places == 0 {
        return format!("{sign}{magnitude}");
    }
    let scale = 10u128.pow(places);
    format!(
        "{sign}{}.{:0width$}",
        magnitude / scale,
        magnitude % scale,
        width = places as usize
    )
}

fn parse_decimal(text: &str, places: u32) -> Result<i128> {
    let invalid = || Error::Invalid(format!("{text:?} is not a decimal number"));
    let trimmed = text.trim();
    let (negative, digits) = match trimmed.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !fraction.chars().all(|c| c.is_ascii_digit())
    {
        return Err(invalid());
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > places as usize {
        return Err(Error::Invalid(format!(
            "{text:?} has more than {places} decimal places"
        )));
    }
    let whole: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| invalid())?
    };
    let fraction_value: i128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<i128>().map_err(|_| invalid())?
            * 10i128.pow(places - fraction.len() as u32)
    };
    let value = whole
        .checked_mul(10i128.pow(places))
        .and_then(|w| w.checked_add(fraction_value))
        .ok_or_else(invalid)?;
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_amounts_are_exact_and_round_once_half_away_from_zero() {
        let usd = Currency::new("USD").unwrap();
        // 1,234,567 tokens at $0.15 per million: $0.18518505.
        let exact = Exact::tokens(1_234_567, 150_000);
        assert_eq!(exact.decimal(), "0.185185050000");
        assert_eq!(exact.round(usd), Minor(19));
        assert_eq!(Exact::parse("0.005").unwrap().round(usd), Minor(1));
        assert_eq!(Exact::parse("0.004999999999").unwrap().round(usd), Minor(0));
        assert_eq!(Exact::parse("-0.005").unwrap().round(usd), Minor(-1));
        assert_eq!(Minor(-5).decimal(usd), "-0.05");
        assert_eq!(Minor(1230).decimal(usd), "12.30");
        let yen = Currency::new("JPY").unwrap();
        assert_eq!(Exact::micros(4_500_000).round(yen), Minor(5));
        assert_eq!(Minor(5).decimal(yen), "5");
        assert_eq!(Minor(1230).exact(usd), Exact::parse("12.3").unwrap());
    }

    #[test]
    fn summing_then_pricing_equals_pricing_then_summing() {
        let parts = [1u64, 999_999, 7, 123_456_789];
        let each: Exact = parts.iter().map(|t| Exact::tokens(*t, 2_500_000)).sum();
        assert_eq!(each, Exact::tokens(parts.iter().sum(), 2_500_000));
    }

    #[test]
    fn prices_parse_exactly_or_are_refused() {
        assert_eq!(parse_micros("0.15").unwrap(), 150_000);
        assert_eq!(parse_micros("12").unwrap(), 12_000_000);
        assert_eq!(parse_micros(".5").unwrap(), 500_000);
        assert_eq!(parse_micros("1.0000010").unwrap(), 1_000_001);
        for bad in ["", "-1", "1.0000001", "abc", "1e3", "1.2.3", "."] {
            assert!(parse_micros(bad).is_err(), "{bad}");
        }
        assert_eq!(micros_text(150_000), "0.15");
        assert_eq!(micros_text(2_500_000), "2.50");
        assert_eq!(micros_text(1), "0.000001");
        assert!(Currency::new("usd").is_err());
        assert_eq!(Minor(1234).decimal(Currency::new("KWD").unwrap()), "1.234");
    }
}
