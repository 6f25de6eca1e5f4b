//! Finance exports as CSV that spreadsheets open as they should: RFC 4180 quoting, a header
//! row, amounts as plain decimals with a point (no currency sign, no thousands separator), a
//! UTF-8 byte-order mark (so names outside ASCII survive), and text that would start a formula
//! (`=`, `+`, `-`, `@`) prefixed with `'`.

use super::invoices::{Invoice, UsageDay};
use super::money::Currency;

const BOM: &str = "\u{feff}";

/// The invoices' lines, one row each, for one invoice or a whole period. An invoice's total
/// is the sum of its `amount` column.
pub fn invoice_lines(invoices: &[Invoice]) -> String {
    let mut out = String::from(BOM);
    row(
        &mut out,
        &[
            "invoice_number",
            "status",
            "tenant_id",
            "tenant",
            "period",
            "currency",
            "position",
            "kind",
            "for_period",
            "adjustment",
            "description",
            "model",
            "price_version_id",
            "requests",
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "amount",
        ],
    );
    for invoice in invoices {
        let c = invoice.currency;
        let status = if invoice.id.is_some() {
            "final"
        } else {
            "preview"
        };
        for (i, l) in invoice.lines.iter().enumerate() {
            row(
                &mut out,
                &[
                    invoice.number.as_deref().unwrap_or(""),
                    status,
                    &invoice.tenant_id.to_string(),
                    &invoice.tenant_name,
                    &invoice.period.to_string(),
                    c.code(),
                    &(i + 1).to_string(),
                    l.kind.as_str(),
                    &l.for_period.to_string(),
                    if l.adjustment { "true" } else { "false" },
                    &l.description,
                    l.model().unwrap_or(""),
                    &l.price_version_id
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    &l.quantities.requests.to_string(),
                    &l.quantities.input_tokens.to_string(),
                    &l.quantities.output_tokens.to_string(),
                    &l.quantities.cached_input_tokens.to_string(),
                    &l.amount.decimal(c),
                ],
            );
        }
    }
    out
}

/// Usage per day, key (or user) and model, priced.
pub fn usage_days(currency: Currency, days: &[UsageDay]) -> String {
    let mut out = String::from(BOM);
    row(
        &mut out,
        &[
            "day",
            "key_id",
            "model",
            "requests",
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "amount",
            "currency",
        ],
    );
    for d in days {
        row(
            &mut out,
            &[
                &d.day,
                &d.key_id,
                &d.model,
                &d.quantities.requests.to_string(),
                &d.quantities.input_tokens.to_string(),
                &d.quantities.output_tokens.to_string(),
                &d.quantities.cached_input_tokens.to_string(),
                &d.amount.decimal(currency),
                currency.code(),
            ],
        );
    }
    out
}

fn row(out: &mut String, fields: &[&str]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&field_text(field));
    }
    out.push_str("\r\n");
}

/// One field, quoted when it must be. Numbers (a leading `-` then digits and a point) stay
/// numbers; other text starting like a formula is defused.
fn field_text(field: &str) -> String {
    let numeric = {
        let digits = field.strip_prefix('-').unwrap_or(field);
        !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
    };
    let defused = if !numeric && field.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{field}")
    } else {
        field.to_owned()
    };
    if defused.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_and_formulas_defused_but_numbers_stay_numbers() {
        assert_eq!(field_text("plain"), "plain");
        assert_eq!(field_text("a, b"), "\"a, b\"");
        assert_eq!(field_text("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field_text("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(field_text("-0.05"), "-0.05");
        assert_eq!(field_text("-x"), "'-x");
        assert_eq!(field_text("\t=1"), "'\t=1");
        assert_eq!(field_text("two\nlines"), "\"two\nlines\"");
        let mut out = String::new();
        row(&mut out, &["a", "b,c"]);
        assert_eq!(out, "a,\"b,c\"\r\n");
    }
}
