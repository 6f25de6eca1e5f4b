//! A workflow run's state, and what a definition's text means against it: `${…}` references,
//! branch conditions, the step that comes next.
//!
//! The state is what every event on `sluice.workflow-events` carries after it (a snapshot), so
//! it holds everything a step can refer to: the caller's message, the inputs, every answer so
//! far, and the saga steps to undo if a later step fails.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::definition::{Condition, Step, StepKind, Test, Workflow};

/// The largest state a run may carry (as JSON): every event holds it, and an event must fit a
/// broker's default record size (1 MB) with room to spare. A step whose answer would take the
/// state past it fails.
pub const MAX_STATE_BYTES: usize = 512 * 1024;

/// Where a run's reply goes and who asked for it: what the request that started it said.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Caller {
    pub session_id: String,
    pub key_id: Option<String>,
    pub user_id: Option<String>,
    /// Whether the reply streams (SSE) or comes whole.
    pub stream: bool,
    pub reply_topic: String,
    pub reply_partition: i32,
    /// When the edge accepted the request: every usage event of the run is dated then.
    pub received_at_ms: i64,
    /// The catalogue models the caller may use (its key or plan), if it is limited.
    pub allowed_models: Option<Vec<String>>,
}

/// A run's state after an event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub run_id: String,
    pub tenant_id: String,
    pub workflow: String,
    pub version: i32,
    pub caller: Caller,
    /// The caller's last user message.
    pub message: String,
    pub inputs: Map<String, Value>,
    /// Each step's answer, by step id.
    pub answers: BTreeMap<String, Value>,
    /// The steps with a `compensate` the run has completed, in order: undone in reverse when a
    /// later step fails.
    pub to_undo: Vec<String>,
    /// The text of the latest model step: the reply of an `end` without one.
    pub last_text: Option<String>,
    /// Tokens of the run's model calls so far (the reply reports them).
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// A step that failed while saga steps were done: they are undone next.
    pub failure: Option<Failure>,
    /// What the run told its caller when it ended (or why it failed).
    pub reply: Option<String>,
}

/// A failed step whose saga is being undone, and where the run goes after.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub step: String,
    pub error: String,
    /// The failed step's `on_error`; none: the run fails once undone.
    pub then: Option<String>,
}

impl RunState {
    /// The value `reference` (without `${` `}`) names, or `None` when it names nothing: a
    /// path into an answer that is not there reads as nothing, as JSON's `null` does.
    pub fn resolve(&self, reference: &str) -> Option<Value> {
        let mut parts = reference.trim().split('.');
        let root = match (parts.next()?, parts.next()) {
            ("message", None) | ("inputs", Some("message")) => {
                return Some(Value::String(self.message.clone()))
            }
            ("run", Some("id")) => return Some(Value::String(self.run_id.clone())),
            ("tenant", Some("id")) => return Some(Value::String(self.tenant_id.clone())),
            ("inputs", Some(name)) => self.inputs.get(name)?,
            ("steps", Some(id)) => self.answers.get(id)?,
            _ => return None,
        };
        let mut value = root;
        for part in parts {
            value = match value {
                Value::Object(fields) => fields.get(part)?,
                Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(value.clone())
    }

    /// `text` with every `${…}` replaced: a text that is one reference alone is that value
    /// (keeping its type: an object stays an object); otherwise each reference is written into
    /// the text (strings as they are, nothing as an empty string, other values as JSON).
    pub fn render(&self, text: &str) -> Value {
        let trimmed = text.trim();
        if let Some(reference) = trimmed
            .strip_prefix("${")
            .and_then(|r| r.strip_suffix('}'))
            .filter(|r| !r.contains("${") && !r.contains('}'))
        {
            return self.resolve(reference).unwrap_or(Value::Null);
        }
        Value::String(self.render_text(text))
    }

    /// `text` with every `${…}` written into it, as text.
    pub fn render_text(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                return out;
            };
            match self.resolve(&after[..end]) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => out.push_str(&s),
                Some(other) => out.push_str(&other.to_string()),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// A tool step's arguments, rendered: every string in them, however deep.
    pub fn arguments(&self, arguments: &BTreeMap<String, Value>) -> Value {
        Value::Object(
            arguments
                .iter()
                .map(|(name, value)| (name.clone(), self.render_value(value)))
                .collect(),
        )
    }

    fn render_value(&self, value: &Value) -> Value {
        match value {
            Value::String(text) if text.contains("${") => self.render(text),
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.render_value(v)).collect())
            }
            Value::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), self.render_value(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Whether `condition` holds.
    pub fn holds(&self, condition: &Condition) -> bool {
        let value = self.resolve(&condition.reference).unwrap_or(Value::Null);
        match &condition.test {
            Test::Truthy => truthy(&value),
            Test::Equals(literal) => same(&value, literal),
            Test::NotEquals(literal) => !same(&value, literal),
        }
    }
}

/// True, a non-empty text, a non-zero number, a non-empty list or object.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(fields) => !fields.is_empty(),
    }
}

/// Equality as a reader expects: numbers by value (`1` equals `1.0`), the rest exactly.
fn same(value: &Value, literal: &Value) -> bool {
    match (value, literal) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => value == literal,
    }
}

impl Workflow {
    /// The step `id`, with its place in the file.
    pub fn step(&self, id: &str) -> Option<(usize, &Step)> {
        self.steps.iter().enumerate().find(|(_, s)| s.id == id)
    }

    /// Where the run goes after step `index` answers: its `next`, else the step below it; `None`
    /// after the last step (the run ends).
    pub fn after(&self, index: usize) -> Option<String> {
        let step = self.steps.get(index)?;
        step.next
            .clone()
            .or_else(|| self.steps.get(index + 1).map(|s| s.id.clone()))
    }

    /// The steps a `parallel` step runs (they run only through it).
    pub fn runs_in_parallel(&self, id: &str) -> bool {
        self.steps.iter().any(|s| match &s.kind {
            StepKind::Parallel { steps } => steps.iter().any(|m| m == id),
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> RunState {
        let mut state = RunState {
            run_id: "run-1".into(),
            tenant_id: "t-1".into(),
            message: "where is A-1?".into(),
            ..RunState::default()
        };
        state.inputs.insert("order_id".into(), json!("A-1"));
        state.inputs.insert("count".into(), json!(3));
        state.answers.insert(
            "lookup".into(),
            json!({"found": true, "order": {"status": "shipped", "items": [{"sku": "x"}]}}),
        );
        state
    }

    #[test]
    fn a_reference_alone_keeps_its_type_and_inside_text_is_written_in() {
        let s = state();
        assert_eq!(s.render("${inputs.count}"), json!(3));
        assert_eq!(
            s.render(" ${steps.lookup.order} "),
            json!({"status": "shipped", "items": [{"sku": "x"}]})
        );
        assert_eq!(s.render("${steps.lookup.order.items.0.sku}"), json!("x"));
        assert_eq!(
            s.render("Order ${inputs.order_id} is ${steps.lookup.order.status} (${inputs.count})"),
            json!("Order A-1 is shipped (3)")
        );
        assert_eq!(s.render("${steps.lookup.order.missing}"), Value::Null);
        assert_eq!(s.render("[${steps.nothing.here}]"), json!("[]"));
        assert_eq!(
            s.render("${message} / ${run.id} / ${tenant.id}"),
            json!("where is A-1? / run-1 / t-1")
        );
        assert_eq!(
            s.render("unclosed ${inputs.order_id"),
            json!("unclosed ${inputs.order_id")
        );
    }

    #[test]
    fn arguments_render_however_deep() {
        let s = state();
        let arguments = BTreeMap::from([
            ("order_id".to_owned(), json!("${inputs.order_id}")),
            (
                "nested".to_owned(),
                json!({"list": ["${inputs.count}", "n=${inputs.count}"]}),
            ),
            ("plain".to_owned(), json!(true)),
        ]);
        assert_eq!(
            s.arguments(&arguments),
            json!({"order_id": "A-1", "nested": {"list": [3, "n=3"]}, "plain": true})
        );
    }

    #[test]
    fn conditions_test_truth_and_equality() {
        let s = state();
        let c = |reference: &str, test: Test| Condition {
            reference: reference.into(),
            test,
        };
        assert!(s.holds(&c("steps.lookup.found", Test::Truthy)));
        assert!(!s.holds(&c("steps.lookup.missing", Test::Truthy)));
        assert!(s.holds(&c(
            "steps.lookup.order.status",
            Test::Equals(json!("shipped"))
        )));
        assert!(s.holds(&c("inputs.count", Test::Equals(json!(3.0)))));
        assert!(s.holds(&c(
            "steps.lookup.order.status",
            Test::NotEquals(json!("paid"))
        )));
        assert!(s.holds(&c("steps.lookup.missing", Test::Equals(Value::Null))));
    }
}
