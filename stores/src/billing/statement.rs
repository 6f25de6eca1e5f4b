//! What a tenant owes, computed: the lines of one period's invoice from the usage facts and the
//! price book, and the adjustments for usage of earlier periods that arrived after their
//! invoices were made. Pure: the facts, the book and what was billed before go in, lines come
//! out; [`super::invoices`] reads the stores and writes the result.
//!
//! The rule for every period `Q` an invoice covers is one subtraction: the lines `Q`'s invoice
//! would have now, with every fact known, minus the lines already billed for `Q` on any
//! invoice. For the invoice's own period nothing was billed before; for an earlier, closed
//! period the difference is the late usage, billed as adjustment lines. Whatever the order in
//! which runs happen, each token is billed once.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    money::{Currency, Exact, Minor},
    period::Period,
    prices::{model_item, PriceBook, PriceVersion},
};

/// What an invoice line bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// The plan's monthly base fee.
    BaseFee,
    /// A model's tokens at one price version.
    Usage,
    /// Tool calls at one price version.
    ToolCalls,
    /// Workflow runs at one price version.
    WorkflowRuns,
    /// The usage the plan's base fee includes (a credit, at most the usage billed).
    IncludedUsage,
}

impl LineKind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BaseFee => "base_fee",
            Self::Usage => "usage",
            Self::ToolCalls => "tool_calls",
            Self::WorkflowRuns => "workflow_runs",
            Self::IncludedUsage => "included_usage",
        }
    }

    /// As stored, read back.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::BaseFee,
            Self::Usage,
            Self::ToolCalls,
            Self::WorkflowRuns,
            Self::IncludedUsage,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// Quantities a line bills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Quantities {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
}

impl Quantities {
    fn plus(self, o: Self) -> Self {
        Self {
            requests: self.requests + o.requests,
            input_tokens: self.input_tokens + o.input_tokens,
            output_tokens: self.output_tokens + o.output_tokens,
            cached_input_tokens: self.cached_input_tokens + o.cached_input_tokens,
        }
    }

    fn minus(self, o: Self) -> Self {
        Self {
            requests: self.requests - o.requests,
            input_tokens: self.input_tokens - o.input_tokens,
            output_tokens: self.output_tokens - o.output_tokens,
            cached_input_tokens: self.cached_input_tokens - o.cached_input_tokens,
        }
    }

    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// One line of an invoice (or of a preview).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub kind: LineKind,
    /// The period whose usage or fee it bills.
    pub for_period: Period,
    /// A correction of an earlier period's invoice.
    pub adjustment: bool,
    pub description: String,
    /// The model (`model:<name>`), tool, workflow or plan (`plan:<name>`).
    pub item: Option<String>,
    pub price_version_id: Option<i64>,
    pub quantities: Quantities,
    /// Before rounding.
    pub exact: Exact,
    /// As billed: `exact` rounded once.
    pub amount: Minor,
}

impl Line {
    /// What the line is keyed by when lines of one period are compared.
    fn key(&self) -> (LineKind, Option<String>, Option<i64>) {
        (self.kind, self.item.clone(), self.price_version_id)
    }

    /// The model a usage line bills (a tool's `tool:<name>` or a workflow's `workflow:<name>`
    /// as usage facts name them).
    pub fn model(&self) -> Option<&str> {
        let item = self.item.as_deref()?;
        item.strip_prefix("model:").or_else(|| {
            (item.starts_with("tool:") || item.starts_with("workflow:")).then_some(item)
        })
    }
}

/// A model's usage in one period at one price version (`None`: no version in force).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PricedUsage {
    pub model: String,
    pub version: Option<i64>,
    pub quantities: Quantities,
}

/// The plan a period's invoice bills: its name and the version of its fees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFees {
    pub name: String,
    pub version: Option<PriceVersion>,
}

/// The lines period `period`'s invoice has with `usage` (every fact known of that period) and
/// `plan`: the base fee, a line per model and price version, and the included usage credit.
pub fn period_lines(
    book: &PriceBook,
    period: Period,
    plan: Option<&PlanFees>,
    usage: &[PricedUsage],
) -> Vec<Line> {
    let currency = book.currency;
    let mut lines = Vec::new();
    let fees = plan.and_then(|p| p.version.as_ref().map(|v| (p, v)));
    if let Some((plan, version)) = fees.filter(|(_, v)| v.per_unit > 0) {
        let exact = Exact::micros(version.per_unit);
        lines.push(Line {
            kind: LineKind::BaseFee,
            for_period: period,
            adjustment: false,
            description: format!("Plan {} for {period}", plan.name),
            item: Some(version.item.clone()),
            price_version_id: Some(version.id),
            quantities: Quantities::default(),
            exact,
            amount: exact.round(currency),
        });
    }
    let mut usage: Vec<&PricedUsage> = usage.iter().collect();
    usage.sort_by_key(|u| {
        let from = u
            .version
            .and_then(|id| book.version(id))
            .map(|v| v.valid_from_ms);
        (u.model.clone(), from)
    });
    let mut usage_total = Minor(0);
    for u in usage {
        let version = u.version.and_then(|id| book.version(id));
        let q = u.quantities;
        let exact = version
            .map(|v| {
                v.usage_cost(
                    non_negative(q.requests),
                    non_negative(q.input_tokens),
                    non_negative(q.output_tokens),
                    non_negative(q.cached_input_tokens),
                )
            })
            .unwrap_or_default();
        let amount = exact.round(currency);
        usage_total = usage_total + amount;
        let counted = if u.model.starts_with("tool:") {
            format!("{} calls", q.requests)
        } else if u.model.starts_with("workflow:") {
            format!("{} runs", q.requests)
        } else {
            format!(
                "{} input + {} output tokens",
                q.input_tokens, q.output_tokens
            )
        };
        let priced = match version {
            Some(v) => counted + &price_note(v, currency),
            None => format!("{counted} (no price in force: not charged)"),
        };
        lines.push(Line {
            kind: LineKind::Usage,
            for_period: period,
            adjustment: false,
            description: format!("{}: {priced}", u.model),
            item: Some(model_item(&u.model)),
            price_version_id: u.version,
            quantities: q,
            exact,
            amount,
        });
    }
    if let Some((plan, version)) = fees.filter(|(_, v)| v.included > 0) {
        let included = Exact::micros(version.included).round(currency);
        let credit = Minor(usage_total.0.clamp(0, included.0));
        if credit.0 > 0 {
            lines.push(Line {
                kind: LineKind::IncludedUsage,
                for_period: period,
                adjustment: false,
                description: format!(
                    "Usage included in plan {} (up to {} {currency})",
                    plan.name,
                    included.decimal(currency)
                ),
                item: Some(version.item.clone()),
                price_version_id: Some(version.id),
                quantities: Quantities::default(),
                exact: Minor(-credit.0).exact(currency),
                amount: Minor(-credit.0),
            });
        }
    }
    lines
}

fn price_note(v: &PriceVersion, currency: Currency) -> String {
    if v.item.starts_with("tool:") || v.item.starts_with("workflow:") {
        return format!(
            " at {} {currency} each (price version {})",
            super::money::micros_text(v.per_unit),
            v.id
        );
    }
    format!(
        " at {}/{} {currency} per million (price version {})",
        super::money::micros_text(v.input_per_mtok),
        super::money::micros_text(v.output_per_mtok),
        v.id
    )
}

fn non_negative(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// `expected` minus `billed` (lines of period `for_period` already on invoices), as lines of an
/// invoice for `invoice_period`: unchanged lines vanish, the rest carry the difference.
pub fn difference(
    expected: Vec<Line>,
    billed: &[Line],
    for_period: Period,
    invoice_period: Period,
) -> Vec<Line> {
    type Key = (LineKind, Option<String>, Option<i64>);
    let mut totals: BTreeMap<Key, (Line, Quantities, Exact, Minor)> = BTreeMap::new();
    for line in expected {
        let entry = totals
            .entry(line.key())
            .or_insert_with(|| (line.clone(), Quantities::default(), Exact(0), Minor(0)));
        entry.1 = entry.1.plus(line.quantities);
        entry.2 = entry.2 + line.exact;
        entry.3 = entry.3 + line.amount;
    }
    for line in billed.iter().filter(|l| l.for_period == for_period) {
        let entry = totals
            .entry(line.key())
            .or_insert_with(|| (line.clone(), Quantities::default(), Exact(0), Minor(0)));
        entry.1 = entry.1.minus(line.quantities);
        entry.2 = entry.2 - line.exact;
        entry.3 = entry.3 - line.amount;
    }
    let adjustment = for_period != invoice_period;
    let mut out: Vec<Line> = totals
        .into_values()
        .filter(|(_, q, exact, amount)| !q.is_zero() || exact.0 != 0 || amount.0 != 0)
        .map(|(template, quantities, exact, amount)| {
            let description = if adjustment {
                format!(
                    "Adjustment for {for_period} (usage recorded after its invoice): {}",
                    template.description
                )
            } else {
                template.description
            };
            Line {
                kind: template.kind,
                for_period,
                adjustment,
                description,
                item: template.item,
                price_version_id: template.price_version_id,
                quantities,
                exact,
                amount,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.kind, &a.item, a.price_version_id).cmp(&(b.kind, &b.item, b.price_version_id))
    });
    out
}

/// Totals of a set of lines, for people: what the lines add to, the usage at list price in
/// the invoice's own period, what the plan included of it, and the usage beyond (overage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub total: Minor,
    pub usage: Minor,
    pub included: Minor,
    pub overage: Minor,
}

/// The [`Totals`] of `lines`.
pub fn totals(lines: &[Line]) -> Totals {
    let own = |kind: LineKind| -> Minor {
        lines
            .iter()
            .filter(|l| l.kind == kind && !l.adjustment)
            .map(|l| l.amount)
            .sum()
    };
    let usage = own(LineKind::Usage) + own(LineKind::ToolCalls) + own(LineKind::WorkflowRuns);
    let included = Minor(-own(LineKind::IncludedUsage).0);
    Totals {
        total: lines.iter().map(|l| l.amount).sum(),
        usage,
        included,
        overage: usage - included,
    }
}

/// The first moment of a slice of usage the facts query returns for a range starting at
/// `from_ms`: facts of month `yyyymm` after `segment` of the `price_changes` (ascending, inside
/// the range). Every fact of the slice lies between it and the next change or the month's end,
/// so one price applies to all of them.
pub fn slice_start(
    price_changes: &[i64],
    from_ms: i64,
    yyyymm: u32,
    segment: u32,
) -> Option<(Period, i64)> {
    let month = Period::parse(&format!("{}-{:02}", yyyymm / 100, yyyymm % 100)).ok()?;
    let after_change = match usize::try_from(segment).ok()? {
        0 => i64::MIN,
        k => *price_changes.get(k - 1)?,
    };
    Some((month, after_change.max(month.start_ms()).max(from_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::new("USD").unwrap()
    }

    fn v(id: i64, item: &str, input: i64, output: i64, from: i64) -> PriceVersion {
        PriceVersion {
            id,
            item: item.into(),
            input_per_mtok: input,
            output_per_mtok: output,
            cached_input_per_mtok: 0,
            per_unit: 0,
            included: 0,
            valid_from_ms: from,
            created_at_ms: 0,
        }
    }

    fn usage(model: &str, version: Option<i64>, input: i64, output: i64) -> PricedUsage {
        PricedUsage {
            model: model.into(),
            version,
            quantities: Quantities {
                requests: 1,
                input_tokens: input,
                output_tokens: output,
                cached_input_tokens: 0,
            },
        }
    }

    fn book_with_plan() -> (PriceBook, PlanFees) {
        let mut plan = v(9, "plan:pro", 0, 0, 0);
        plan.per_unit = 20_000_000; // $20 a month
        plan.included = 5_000_000; // $5 of usage included
        let book = PriceBook::new(
            usd(),
            vec![
                v(1, "model:a", 1_000_000, 2_000_000, 0),
                v(2, "model:a", 3_000_000, 6_000_000, 1_000),
                plan.clone(),
            ],
        );
        let fees = PlanFees {
            name: "pro".into(),
            version: Some(plan),
        };
        (book, fees)
    }

    #[test]
    fn tool_calls_and_workflow_runs_are_billed_per_unit() {
        let mut tool = v(3, "tool:lookup_order", 0, 0, 0);
        tool.per_unit = 2_500; // $0.0025 a call
        let mut run = v(4, "workflow:track_order", 0, 0, 0);
        run.per_unit = 10_000; // $0.01 a run
        let book = PriceBook::new(usd(), vec![tool, run]);
        let p = Period::parse("2026-11").unwrap();
        let mut calls = usage("tool:lookup_order", Some(3), 0, 0);
        calls.quantities.requests = 400;
        let mut runs = usage("workflow:track_order", Some(4), 0, 0);
        runs.quantities.requests = 3;
        let lines = period_lines(&book, p, None, &[calls, runs]);
        let got: Vec<(&str, i64, Option<&str>)> = lines
            .iter()
            .map(|l| (l.description.as_str(), l.amount.0, l.model()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "tool:lookup_order: 400 calls at 0.0025 USD each (price version 3)",
                    100,
                    Some("tool:lookup_order")
                ),
                (
                    "workflow:track_order: 3 runs at 0.01 USD each (price version 4)",
                    3,
                    Some("workflow:track_order")
                ),
            ]
        );
        assert_eq!(model_item("tool:lookup_order"), "tool:lookup_order");
        assert_eq!(model_item("sim-small"), "model:sim-small");
    }

    #[test]
    fn a_period_bills_the_fee_each_model_and_price_and_the_included_credit() {
        let (book, plan) = book_with_plan();
        let p = Period::parse("2026-11").unwrap();
        let lines = period_lines(
            &book,
            p,
            Some(&plan),
            &[
                usage("a", Some(1), 1_000_000, 1_000_000),
                usage("a", Some(2), 500_000, 0),
                usage("b", None, 7, 7),
            ],
        );
        let amounts: Vec<(LineKind, i64)> = lines.iter().map(|l| (l.kind, l.amount.0)).collect();
        assert_eq!(
            amounts,
            [
                (LineKind::BaseFee, 2000),
                (LineKind::Usage, 300),
                (LineKind::Usage, 150),
                (LineKind::Usage, 0),
                (LineKind::IncludedUsage, -450),
            ]
        );
        let t = totals(&lines);
        assert_eq!(
            (t.total, t.usage, t.included, t.overage),
            (Minor(2000), Minor(450), Minor(450), Minor(0))
        );
        assert!(lines[3].description.contains("not charged"));
    }

    #[test]
    fn late_usage_of_a_closed_period_becomes_adjustments_and_nothing_twice() {
        let (book, plan) = book_with_plan();
        let (nov, dec) = (
            Period::parse("2026-11").unwrap(),
            Period::parse("2026-12").unwrap(),
        );
        let first = period_lines(
            &book,
            nov,
            Some(&plan),
            &[usage("a", Some(2), 2_000_000, 0)],
        );
        // $6 of usage, $5 included.
        assert_eq!(totals(&first).total, Minor(2100));
        let later = [
            usage("a", Some(2), 2_000_000, 0),
            usage("a", Some(2), 1_000_000, 0),
        ];
        let later: Vec<PricedUsage> = vec![PricedUsage {
            quantities: later[0].quantities.plus(later[1].quantities),
            ..later[0].clone()
        }];
        let expected = period_lines(&book, nov, Some(&plan), &later);
        let adjust = difference(expected.clone(), &first, nov, dec);
        assert_eq!(adjust.len(), 1, "{adjust:?}");
        assert!(adjust[0].adjustment);
        assert_eq!(adjust[0].amount, Minor(300));
        assert_eq!(adjust[0].quantities.input_tokens, 1_000_000);
        // Billed once: with the adjustment counted, nothing is left to bill.
        let billed: Vec<Line> = first.iter().cloned().chain(adjust).collect();
        assert!(difference(expected, &billed, nov, dec).is_empty());
    }

    #[test]
    fn a_credit_grows_when_late_usage_falls_inside_the_included_amount() {
        let (book, plan) = book_with_plan();
        let (nov, dec) = (
            Period::parse("2026-11").unwrap(),
            Period::parse("2026-12").unwrap(),
        );
        let first = period_lines(
            &book,
            nov,
            Some(&plan),
            &[usage("a", Some(1), 1_000_000, 0)],
        );
        let expected = period_lines(
            &book,
            nov,
            Some(&plan),
            &[usage("a", Some(1), 2_000_000, 0)],
        );
        let adjust = difference(expected, &first, nov, dec);
        let amounts: Vec<(LineKind, i64)> = adjust.iter().map(|l| (l.kind, l.amount.0)).collect();
        assert_eq!(
            amounts,
            [(LineKind::Usage, 100), (LineKind::IncludedUsage, -100)]
        );
    }

    #[test]
    fn slices_start_at_their_month_or_the_price_change_before_them() {
        let feb = Period::parse("1970-02").unwrap();
        let changes = [1_000, feb.start_ms() + 5];
        assert_eq!(
            slice_start(&changes, 0, 197001, 0),
            Some((Period::parse("1970-01").unwrap(), 0))
        );
        assert_eq!(
            slice_start(&changes, 0, 197001, 1),
            Some((Period::parse("1970-01").unwrap(), 1_000))
        );
        assert_eq!(
            slice_start(&changes, 0, 197002, 1),
            Some((feb, feb.start_ms()))
        );
        assert_eq!(
            slice_start(&changes, 0, 197002, 2),
            Some((feb, feb.start_ms() + 5))
        );
        assert_eq!(slice_start(&changes, 0, 197002, 3), None);
        assert_eq!(slice_start(&changes, 0, 197013, 0), None);
        // A range starting inside a month: its first slice starts with the range.
        let mid = feb.start_ms() + 2;
        assert_eq!(slice_start(&changes, mid, 197002, 1), Some((feb, mid)));
        assert_eq!(
            LineKind::parse("included_usage"),
            Some(LineKind::IncludedUsage)
        );
    }
}
