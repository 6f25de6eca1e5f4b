//! Reconciliation: the same month's usage as four sources say it — the usage topic (what the
//! orchestrators emitted), the facts in ClickHouse (what the metering sink stored), the
//! per-minute rollup (what the SQL stage aggregated) and the invoices (what was billed) — and
//! every place they disagree. Pure: the caller reads the sources.

use std::collections::{BTreeMap, BTreeSet};

/// Requests and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl Counts {
    /// Adds one more fact's worth.
    pub fn add(&mut self, requests: i64, input_tokens: i64, output_tokens: i64) {
        self.requests += requests;
        self.input_tokens += input_tokens;
        self.output_tokens += output_tokens;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, {} input + {} output tokens",
            self.requests, self.input_tokens, self.output_tokens
        )
    }
}

/// Per (tenant, model).
pub type ByModel = BTreeMap<(String, String), Counts>;

/// What each source says about the month.
#[derive(Debug, Default)]
pub struct Sources {
    /// The usage topic, each event id once.
    pub topic: ByModel,
    /// The facts.
    pub facts: ByModel,
    /// The per-minute rollup, per tenant (`None`: not compared).
    pub rollup: Option<BTreeMap<String, Counts>>,
    /// The usage lines invoices billed for the month (adjustments on later invoices included).
    pub invoiced: ByModel,
    /// Tenants with an invoice for the month.
    pub invoiced_tenants: BTreeSet<String>,
    /// Whether an invoice run closed the month (then every tenant with facts must be invoiced).
    pub closed: bool,
}

/// Every disagreement, one line each; none when the sources agree.
pub fn differences(s: &Sources) -> Vec<String> {
    let mut out = Vec::new();
    let none = Counts::default();
    let keys: BTreeSet<&(String, String)> = s.topic.keys().chain(s.facts.keys()).collect();
    for key in keys {
        let (topic, facts) = (
            s.topic.get(key).unwrap_or(&none),
            s.facts.get(key).unwrap_or(&none),
        );
        if topic != facts {
            out.push(format!(
                "topic/facts tenant={} model={}: the topic has {topic}, the facts {facts}",
                key.0, key.1
            ));
        }
    }
    if let Some(rollup) = &s.rollup {
        let mut facts_by_tenant: BTreeMap<&str, Counts> = BTreeMap::new();
        for ((tenant, _), c) in &s.facts {
            facts_by_tenant.entry(tenant).or_default().add(
                c.requests,
                c.input_tokens,
                c.output_tokens,
            );
        }
        let tenants: BTreeSet<&str> = facts_by_tenant
            .keys()
            .copied()
            .chain(rollup.keys().map(String::as_str))
            .collect();
        for tenant in tenants {
            let (facts, rolled) = (
                facts_by_tenant.get(tenant).unwrap_or(&none),
                rollup.get(tenant).unwrap_or(&none),
            );
            if facts != rolled {
                out.push(format!(
                    "facts/rollup tenant={tenant}: the facts have {facts}, tenant_usage_1m {rolled}"
                ));
            }
        }
    }
    let keys: BTreeSet<&(String, String)> = s.facts.keys().chain(s.invoiced.keys()).collect();
    for key in keys {
        let billed_month = s.closed || s.invoiced_tenants.contains(&key.0);
        if !billed_month {
            continue;
        }
        let (facts, invoiced) = (
            s.facts.get(key).unwrap_or(&none),
            s.invoiced.get(key).unwrap_or(&none),
        );
        if facts != invoiced {
            let late = facts.requests > invoiced.requests
                && facts.input_tokens >= invoiced.input_tokens
                && facts.output_tokens >= invoiced.output_tokens;
            out.push(format!(
                "facts/invoices tenant={} model={}: the facts have {facts}, the invoices {invoiced}{}",
                key.0,
                key.1,
                if late {
                    " (usage recorded after the invoice: the next invoice adjusts it)"
                } else {
                    ""
                }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(requests: i64, input: i64, output: i64) -> Counts {
        Counts {
            requests,
            input_tokens: input,
            output_tokens: output,
        }
    }

    fn key(t: &str, m: &str) -> (String, String) {
        (t.into(), m.into())
    }

    #[test]
    fn agreeing_sources_have_no_differences_and_each_disagreement_is_named() {
        let mut s = Sources {
            topic: [(key("a", "m"), c(2, 10, 4)), (key("a", "n"), c(1, 1, 1))].into(),
            facts: [(key("a", "m"), c(2, 10, 4)), (key("a", "n"), c(1, 1, 1))].into(),
            rollup: Some([("a".to_owned(), c(3, 11, 5))].into()),
            invoiced: [(key("a", "m"), c(2, 10, 4)), (key("a", "n"), c(1, 1, 1))].into(),
            invoiced_tenants: ["a".to_owned()].into(),
            closed: true,
        };
        assert!(differences(&s).is_empty(), "{:?}", differences(&s));
        // One fact that never was on the topic shows against every other source.
        s.facts.insert(key("b", "m"), c(1, 5, 5));
        let found = differences(&s);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("topic/facts tenant=b model=m"));
        assert!(found[1].starts_with("facts/rollup tenant=b"));
        assert!(
            found[2].contains("the next invoice adjusts it"),
            "{found:?}"
        );
        // A month not closed and a tenant not invoiced: nothing is expected of the invoices.
        s.closed = false;
        assert_eq!(differences(&s).len(), 2);
        s.rollup = None;
        assert_eq!(differences(&s).len(), 1);
    }
}
