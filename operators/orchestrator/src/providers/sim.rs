//! The simulator: a model that answers instantly or at a configured pace, with text that
//! depends only on the model name and the conversation (the same request always gets the same
//! reply), and token counts taken with Sluice's token counter from the text it really sends.
//!
//! It stands in for a real model in the demo, the tests and the benchmarks. It is never a
//! fallback: a request reaches it only if the catalogue routes to a model with provider `sim`.

use std::time::Duration;

use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_schemas::{tokens, ToolCallDelta};

use super::{EventStream, ModelCall, ProviderEvent};

/// Simulator settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Milliseconds before the first token.
    pub first_token_ms: u64,
    /// Tokens streamed per second after the first; 0 streams as fast as possible.
    pub tokens_per_second: f64,
    /// Length of a reply when the request sets no `max_tokens` (tokens).
    pub reply_tokens: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            first_token_ms: 20,
            tokens_per_second: 400.0,
            reply_tokens: 24,
        }
    }
}

impl SimConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.tokens_per_second >= 0.0 && self.tokens_per_second.is_finite()) {
            problems
                .push("orchestrator.sim.tokens_per_second must be a finite number >= 0".to_owned());
        }
        if self.reply_tokens == 0 {
            problems.push("orchestrator.sim.reply_tokens must be at least 1".to_owned());
        }
        problems
    }
}

const WORDS: &[&str] = &[
    "stream",
    "record",
    "tenant",
    "model",
    "token",
    "partition",
    "offset",
    "schema",
    "broker",
    "usage",
    "invoice",
    "latency",
    "window",
    "router",
    "reply",
    "batch",
    "queue",
    "signal",
    "river",
    "sluice",
    "gate",
    "flow",
    "channel",
    "current",
];

/// The conversation's digest: what makes the simulator's reply depend on the model and every
/// message.
fn digest(call: &ModelCall) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(call.upstream_model.as_bytes());
    for m in &call.messages {
        hasher.update(m.role.as_bytes());
        hasher.update([0]);
        hasher.update(m.content.as_bytes());
        hasher.update([0]);
        for c in &m.tool_calls {
            hasher.update(c.id.as_bytes());
            hasher.update([0]);
            hasher.update(c.arguments.as_bytes());
            hasher.update([0]);
        }
    }
    hasher.finalize().into()
}

/// The sentence the simulator writes: `words` words from its vocabulary, then a full stop, as
/// pieces of one token each.
fn sentence(digest: &[u8; 32], words: usize) -> Vec<String> {
    let mut pieces = Vec::with_capacity(words + 1);
    for i in 0..words {
        let word = WORDS[(digest[i % digest.len()] as usize + i) % WORDS.len()];
        pieces.push(if i == 0 {
            capitalise(word)
        } else {
            format!(" {word}")
        });
    }
    pieces.push(".".to_owned());
    pieces
}

/// The reply the simulator gives to `call`: its pieces (each exactly one token) and whether it
/// was cut by `max_tokens`. Text by default; with `response_format` `json_object`, the object
/// `{"reply": <the text>}`; with `json_schema`, an instance of the schema (see [`instance`]).
pub fn reply_pieces(call: &ModelCall, config: &SimConfig) -> (Vec<String>, bool) {
    let digest = digest(call);
    // `reply_tokens` tokens of text in all: words, then a closing '.'.
    let words = usize::try_from(config.reply_tokens)
        .unwrap_or(24)
        .saturating_sub(1)
        .max(1);
    let text = sentence(&digest, words);
    let mut pieces = match &call.response_format {
        Some(format) if format.kind == "json_object" => {
            split_tokens(&serde_json::json!({ "reply": text.concat() }).to_string())
        }
        Some(format) if format.kind == "json_schema" => {
            let schema = format
                .json_schema_json
                .as_deref()
                .and_then(|spec| serde_json::from_str::<Value>(spec).ok())
                .map(|spec| spec["schema"].clone())
                .unwrap_or(Value::Null);
            split_tokens(&instance(&schema, &text.concat()).to_string())
        }
        _ => text,
    };
    let limit = call
        .max_tokens
        .and_then(|m| usize::try_from(m).ok())
        .unwrap_or(usize::MAX);
    let truncated = pieces.len() > limit;
    pieces.truncate(limit);
    (pieces, truncated)
}

/// Splits `text` into pieces of exactly one token each, whitespace going with the token after
/// it.
fn split_tokens(text: &str) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word && tokens::count(&current) > 0 {
                pieces.push(std::mem::take(&mut current));
            }
            in_word = true;
        } else {
            in_word = false;
            if !c.is_whitespace() && tokens::count(&current) > 0 {
                pieces.push(std::mem::take(&mut current));
            }
        }
        current.push(c);
    }
    if !current.is_empty() {
        match pieces.last_mut() {
            Some(last) if tokens::count(&current) == 0 => last.push_str(&current),
            _ => pieces.push(current),
        }
    }
    pieces
}

/// A value that fits the JSON Schema `schema`, the same every time, `text` standing in for
/// every free string. See [`Instance::of`].
pub fn instance(schema: &Value, text: &str) -> Value {
    Instance {
        root: schema,
        text,
        left: std::cell::Cell::new(MAX_INSTANCE_VALUES),
    }
    .of(schema, 0)
}

/// Most values one [`instance`] holds: a caller's schema cannot make the simulator build more
/// (references that fan out, large `minItems`); past it, what is left is null.
const MAX_INSTANCE_VALUES: usize = 2_000;
/// The most items an array, and characters a string, of an [`instance`] is given.
const MAX_INSTANCE_ITEMS: usize = 8;
const MAX_INSTANCE_CHARS: usize = 1024;

/// Builds values of a schema whose local references (`#/$defs/…`, `#/definitions/…`) resolve
/// against `root`, within a budget of values.
struct Instance<'a> {
    root: &'a Value,
    text: &'a str,
    left: std::cell::Cell<usize>,
}

impl Instance<'_> {
    /// A value of `schema`: an object with each of its properties (in name order), a `const`,
    /// the first of an `enum`, the first choice of `anyOf`/`oneOf`, every part of `allOf`
    /// merged, the first non-null of a list of types; a string is the text (cut to
    /// `maxLength`, padded to `minLength`) or an example of its `format` (date, date-time, time,
    /// email, uri, uuid); a number is 1 moved inside its bounds; an array holds `minItems` (at
    /// least one, at most `maxItems`) values of its items. A schema it cannot read gives `{}`.
    fn of(&self, schema: &Value, depth: usize) -> Value {
        let left = self.left.get();
        if depth > 16 || left == 0 {
            return Value::Null;
        }
        self.left.set(left - 1);
        if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
            return match self.resolve(target) {
                Some(found) => self.of(found, depth + 1),
                None => Value::Object(serde_json::Map::new()),
            };
        }
        if let Some(value) = schema.get("const") {
            return value.clone();
        }
        if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
            return first.clone();
        }
        for choice in ["anyOf", "oneOf"] {
            if let Some(first) = schema.get(choice).and_then(|c| c.get(0)) {
                return self.of(first, depth + 1);
            }
        }
        if let Some(Value::Array(parts)) = schema.get("allOf") {
            let mut merged = serde_json::Map::new();
            for part in parts {
                match self.of(part, depth + 1) {
                    Value::Object(fields) => merged.extend(fields),
                    other => return other,
                }
            }
            return Value::Object(merged);
        }
        let kind = match schema.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            Some(Value::Array(kinds)) => kinds
                .iter()
                .filter_map(Value::as_str)
                .find(|k| *k != "null")
                .unwrap_or("null"),
            _ => "object",
        };
        let bound = |name: &str| schema.get(name).and_then(Value::as_f64);
        let count = |name: &str| {
            schema
                .get(name)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
        };
        match kind {
            "string" => self.string(schema, count("minLength"), count("maxLength")),
            "integer" | "number" => {
                let integer = kind == "integer";
                let step = if integer { 1.0 } else { 0.5 };
                let mut value: f64 = 1.0;
                if let Some(low) = bound("minimum") {
                    value = value.max(low);
                }
                if let Some(low) = bound("exclusiveMinimum") {
                    value = value.max(low + step);
                }
                if let Some(high) = bound("maximum") {
                    value = value.min(high);
                }
                if let Some(high) = bound("exclusiveMaximum") {
                    value = value.min(high - step);
                }
                if integer {
                    // The whole number nearest inside the bounds.
                    let whole = value.ceil();
                    let whole = match bound("maximum") {
                        Some(high) if whole > high => value.floor(),
                        _ => whole,
                    };
                    serde_json::json!(whole as i64)
                } else {
                    serde_json::json!(value)
                }
            }
            "boolean" => Value::Bool(true),
            "null" => Value::Null,
            "array" => {
                let items = schema.get("items").unwrap_or(&Value::Null);
                let wanted = count("minItems").unwrap_or(1).clamp(1, MAX_INSTANCE_ITEMS);
                let wanted = count("maxItems").map_or(wanted, |most| wanted.min(most));
                Value::Array((0..wanted).map(|_| self.of(items, depth + 1)).collect())
            }
            _ => {
                let mut object = serde_json::Map::new();
                if let Some(Value::Object(properties)) = schema.get("properties") {
                    for (name, property) in properties {
                        object.insert(name.clone(), self.of(property, depth + 1));
                    }
                }
                Value::Object(object)
            }
        }
    }

    fn string(&self, schema: &Value, least: Option<usize>, most: Option<usize>) -> Value {
        let example = match schema.get("format").and_then(Value::as_str) {
            Some("date") => Some("2026-01-01"),
            Some("date-time") => Some("2026-01-01T00:00:00Z"),
            Some("time") => Some("00:00:00Z"),
            Some("email") => Some("someone@example.com"),
            Some("uri") | Some("url") => Some("https://example.com/"),
            Some("uuid") => Some("00000000-0000-4000-8000-000000000000"),
            _ => None,
        };
        let most = most.unwrap_or(usize::MAX).min(MAX_INSTANCE_CHARS);
        let mut text: String = example.unwrap_or(self.text).chars().take(most).collect();
        let short = least
            .unwrap_or(0)
            .min(MAX_INSTANCE_CHARS)
            .saturating_sub(text.chars().count());
        text.push_str(&"x".repeat(short));
        Value::String(text)
    }

    /// What a local reference names, if it is one.
    fn resolve(&self, target: &str) -> Option<&Value> {
        let pointer = target.strip_prefix('#')?;
        self.root.pointer(pointer)
    }
}

/// The tool calls the simulator makes for `call`, if it makes any: `(id, name, arguments)`.
///
/// With tools offered and `tool_choice` not `none`, a conversation whose last message is not a
/// tool's result gets a tool call instead of text: of the function `tool_choice` names;
/// otherwise of the first tool (in the order offered) whose name appears in the last user
/// message (case aside, `_` and `-` read as spaces too) — of every such tool when
/// `parallel_tool_calls` is true — and when none does, of the first tool. Arguments are an
/// [`instance`] of the tool's parameter schema, with the last user message as every free
/// string. After a tool's result, it writes text.
pub fn tool_calls(call: &ModelCall) -> Vec<(String, String, String)> {
    if call.tools.is_empty() || call.tool_choice.as_deref() == Some("none") {
        return Vec::new();
    }
    if call.messages.last().is_some_and(|m| m.role == "tool") {
        return Vec::new();
    }
    let said = call
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.trim().to_owned())
        .unwrap_or_default();
    let lowered = said.to_lowercase();
    let chosen: Vec<_> = match (call.tool_choice.as_deref(), &call.tool_choice_function) {
        (Some("function"), Some(name)) => call.tools.iter().filter(|t| &t.name == name).collect(),
        _ => {
            let mentioned = |name: &str| {
                let name = name.to_lowercase();
                lowered.contains(&name) || lowered.contains(&name.replace(['_', '-'], " "))
            };
            let mut named: Vec<_> = call.tools.iter().filter(|t| mentioned(&t.name)).collect();
            if named.is_empty() {
                named.extend(call.tools.first());
            }
            if call.parallel_tool_calls != Some(true) {
                named.truncate(1);
            }
            named
        }
    };
    let digest = digest(call);
    chosen
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            let mut id = Sha256::new();
            id.update(digest);
            id.update(i.to_le_bytes());
            let id = format!("call_{}", &hex::encode(id.finalize())[..24]);
            let schema = tool
                .parameters_json
                .as_deref()
                .and_then(|text| serde_json::from_str::<Value>(text).ok())
                .unwrap_or_else(|| serde_json::json!({ "type": "object" }));
            let arguments = instance(&schema, &said).to_string();
            (id, tool.name.clone(), arguments)
        })
        .collect()
}

/// Pieces of at most this many characters carry a tool call's arguments.
const ARGUMENT_PIECE_CHARS: usize = 16;

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Streams the simulated reply to `call`.
pub fn complete(call: &ModelCall, config: &SimConfig) -> EventStream {
    let input_tokens = tokens::count_prompt(&call.messages, &call.tools);
    let first = Duration::from_millis(config.first_token_ms);
    let gap = if config.tokens_per_second > 0.0 {
        Duration::from_secs_f64(1.0 / config.tokens_per_second)
    } else {
        Duration::ZERO
    };
    let calls = tool_calls(call);
    let (events, output_tokens, finish_reason) = if calls.is_empty() {
        let (pieces, truncated) = reply_pieces(call, config);
        let output_tokens: usize = pieces.iter().map(|p| tokens::count(p)).sum();
        let events: Vec<ProviderEvent> = pieces.into_iter().map(ProviderEvent::Delta).collect();
        (
            events,
            output_tokens,
            if truncated { "length" } else { "stop" },
        )
    } else {
        let mut events = Vec::new();
        let mut output_tokens = 0;
        for (index, (id, name, arguments)) in calls.into_iter().enumerate() {
            let index = i32::try_from(index).unwrap_or(i32::MAX);
            output_tokens += tokens::count(&name) + tokens::count(&arguments);
            events.push(ProviderEvent::ToolCall(ToolCallDelta {
                index,
                id: Some(id),
                name: Some(name),
                arguments: String::new(),
            }));
            let chars: Vec<char> = arguments.chars().collect();
            for piece in chars.chunks(ARGUMENT_PIECE_CHARS) {
                events.push(ProviderEvent::ToolCall(ToolCallDelta {
                    index,
                    id: None,
                    name: None,
                    arguments: piece.iter().collect(),
                }));
            }
        }
        (events, output_tokens, "tool_calls")
    };
    let done = ProviderEvent::Done {
        finish_reason: finish_reason.to_owned(),
        input_tokens: i64::try_from(input_tokens).ok(),
        output_tokens: i64::try_from(output_tokens).ok(),
        cached_input_tokens: None,
    };
    let deltas = stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
        let wait = if i == 0 { first } else { gap };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(event)
    });
    deltas.chain(stream::once(async move { Ok(done) })).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::ChatMessage;

    fn call(content: &str, max_tokens: Option<i32>) -> ModelCall {
        let request = sluice_schemas::ChatRequest {
            messages: vec![ChatMessage::text("user", content)],
            max_tokens,
            ..Default::default()
        };
        ModelCall::for_request(&request, "sim-small")
    }

    #[tokio::test]
    async fn replies_are_deterministic_and_counted_honestly() {
        let config = SimConfig {
            first_token_ms: 0,
            tokens_per_second: 0.0,
            reply_tokens: 12,
        };
        let events: Vec<_> = complete(&call("hello there", None), &config)
            .collect()
            .await;
        let again: Vec<_> = complete(&call("hello there", None), &config)
            .collect()
            .await;
        assert_eq!(format!("{events:?}"), format!("{again:?}"));
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                Ok(ProviderEvent::Delta(d)) => Some(d.clone()),
                _ => None,
            })
            .collect();
        match events.last() {
            Some(Ok(ProviderEvent::Done {
                finish_reason,
                input_tokens,
                output_tokens,
                ..
            })) => {
                assert_eq!(finish_reason, "stop");
                assert_eq!(*input_tokens, Some(6));
                assert_eq!(*output_tokens, Some(tokens::count(&text) as i64));
            }
            other => panic!("unexpected end {other:?}"),
        }
        let other: Vec<_> = complete(&call("something else", None), &config)
            .collect()
            .await;
        assert_ne!(format!("{events:?}"), format!("{other:?}"));
    }

    #[test]
    fn max_tokens_cuts_the_reply() {
        let config = SimConfig::default();
        let (pieces, truncated) = reply_pieces(&call("hi", Some(3)), &config);
        assert_eq!(pieces.len(), 3);
        assert!(truncated);
        let (pieces, truncated) = reply_pieces(&call("hi", Some(1000)), &config);
        assert!(!truncated);
        assert_eq!(
            pieces.iter().map(|p| tokens::count(p)).sum::<usize>(),
            pieces.len()
        );
    }
    fn with_tools(content: &str) -> ModelCall {
        let mut call = call(content, None);
        for (name, parameters) in [
            (
                "lookup_order",
                r#"{"type":"object","properties":{"order_id":{"type":"string"},"verbose":{"type":"boolean"},"limit":{"type":"integer","minimum":5}},"required":["order_id"]}"#,
            ),
            (
                "get_weather",
                r#"{"type":"object","properties":{"unit":{"enum":["celsius","fahrenheit"]}}}"#,
            ),
        ] {
            call.tools.push(sluice_schemas::ToolDefinition {
                name: name.into(),
                description: None,
                parameters_json: Some(parameters.into()),
                strict: None,
            });
        }
        call
    }

    async fn events(call: &ModelCall) -> Vec<ProviderEvent> {
        let config = SimConfig {
            first_token_ms: 0,
            tokens_per_second: 0.0,
            reply_tokens: 8,
        };
        complete(call, &config)
            .map(|e| e.expect("the simulator does not fail"))
            .collect()
            .await
    }

    #[tokio::test]
    async fn with_tools_it_calls_them_deterministically_in_pieces() {
        let call = with_tools("Can you get weather for Paris?");
        let calls = tool_calls(&call);
        assert_eq!(calls, tool_calls(&call), "the same every time");
        let names: Vec<&str> = calls.iter().map(|(_, name, _)| name.as_str()).collect();
        assert_eq!(names, ["get_weather"], "only the tool the message names");
        let arguments: Value = serde_json::from_str(&calls[0].2).unwrap();
        assert_eq!(arguments, serde_json::json!({"unit": "celsius"}));

        let mut call = with_tools("lookup order A-1 and get weather");
        assert_eq!(
            tool_calls(&call).len(),
            1,
            "one call unless parallel calls are asked for"
        );
        call.parallel_tool_calls = Some(true);
        let calls = tool_calls(&call);
        assert_eq!(calls.len(), 2, "every tool named, in the order offered");
        assert_ne!(calls[0].0, calls[1].0, "ids of their own");
        let arguments: Value = serde_json::from_str(&calls[0].2).unwrap();
        assert_eq!(
            arguments,
            serde_json::json!({"limit": 5, "order_id": "lookup order A-1 and get weather", "verbose": true})
        );
        let events = events(&call).await;
        let mut whole: Vec<(String, String, String)> = Vec::new();
        for event in &events[..events.len() - 1] {
            let ProviderEvent::ToolCall(piece) = event else {
                panic!("only tool calls: {event:?}")
            };
            let index = usize::try_from(piece.index).unwrap();
            if whole.len() <= index {
                whole.push(Default::default());
            }
            if let (Some(id), Some(name)) = (&piece.id, &piece.name) {
                whole[index].0.clone_from(id);
                whole[index].1.clone_from(name);
            }
            whole[index].2.push_str(&piece.arguments);
        }
        assert_eq!(whole, calls, "the pieces join into the calls");
        assert!(events.len() > 4, "arguments arrive in several pieces");
        let ProviderEvent::Done {
            finish_reason,
            output_tokens,
            input_tokens,
            ..
        } = events.last().unwrap()
        else {
            panic!("done last")
        };
        assert_eq!(finish_reason, "tool_calls");
        let billed: usize = calls
            .iter()
            .map(|(_, name, arguments)| tokens::count(name) + tokens::count(arguments))
            .sum();
        assert_eq!(*output_tokens, Some(billed as i64));
        assert_eq!(
            *input_tokens,
            Some(tokens::count_prompt(&call.messages, &call.tools) as i64),
            "the tools offered are part of the prompt"
        );

        let mut one = call.clone();
        one.parallel_tool_calls = Some(false);
        assert_eq!(tool_calls(&one).len(), 1);
        assert_eq!(tool_calls(&one)[0], calls[0]);
        let mut unnamed = with_tools("hello");
        assert_eq!(
            tool_calls(&unnamed)[0].1,
            "lookup_order",
            "none named: the first"
        );
        unnamed.tool_choice = Some("function".into());
        unnamed.tool_choice_function = Some("get_weather".into());
        assert_eq!(tool_calls(&unnamed)[0].1, "get_weather");
        unnamed.tool_choice = Some("none".into());
        assert!(tool_calls(&unnamed).is_empty());
    }

    #[tokio::test]
    async fn after_a_tools_result_it_answers_in_text() {
        let mut call = with_tools("lookup order A-1");
        let (id, name, arguments) = tool_calls(&call).remove(0);
        let mut called = ChatMessage::text("assistant", "");
        called.tool_calls.push(sluice_schemas::ToolCall {
            id: id.clone(),
            name,
            arguments,
        });
        let mut result = ChatMessage::text("tool", r#"{"status":"shipped"}"#);
        result.tool_call_id = Some(id);
        call.messages.extend([called, result]);
        assert!(tool_calls(&call).is_empty());
        let events = events(&call).await;
        assert!(matches!(events[0], ProviderEvent::Delta(_)));
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done { finish_reason, .. }) if finish_reason == "stop"
        ));
    }

    #[test]
    fn json_modes_reply_with_json_one_token_a_piece() {
        let config = SimConfig::default();
        let mut json_mode = call("answer in json", None);
        json_mode.response_format = Some(sluice_schemas::ResponseFormat {
            kind: "json_object".into(),
            json_schema_json: None,
        });
        let (pieces, truncated) = reply_pieces(&json_mode, &config);
        assert!(!truncated);
        let reply: Value = serde_json::from_str(&pieces.concat()).unwrap();
        assert!(reply["reply"].as_str().is_some_and(|r| r.ends_with('.')));
        assert!(pieces.iter().all(|p| tokens::count(p) == 1), "{pieces:?}");

        let mut schema = json_mode.clone();
        schema.response_format = Some(sluice_schemas::ResponseFormat {
            kind: "json_schema".into(),
            json_schema_json: Some(
                r#"{"name":"answer","schema":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"array","items":{"type":"number"}},"ok":{"type":["null","boolean"]}}}}"#.into(),
            ),
        });
        let (pieces, _) = reply_pieces(&schema, &config);
        let reply: Value = serde_json::from_str(&pieces.concat()).unwrap();
        assert!(reply["city"].is_string());
        assert_eq!(reply["days"], serde_json::json!([1.0]));
        assert_eq!(reply["ok"], true);
        assert!(pieces.iter().all(|p| tokens::count(p) == 1), "{pieces:?}");

        let (cut, truncated) = reply_pieces(&call("x", Some(2)), &config);
        assert!(truncated && cut.len() == 2);
    }

    #[test]
    fn split_tokens_keeps_the_text_and_gives_one_token_a_piece() {
        for text in [r#"{"a b": [1, 2.5], "c": "x y."}"#, "  lead", "trail  ", ""] {
            let pieces = split_tokens(text);
            assert_eq!(pieces.concat(), text);
            assert!(pieces.iter().all(|p| tokens::count(p) == 1) || text.trim().is_empty());
        }
    }
    #[test]
    fn instances_keep_to_their_schema() {
        let schema: Value = serde_json::from_str(
            r##"{"type":"object","$defs":{"when":{"type":"string","format":"date"}},
                "properties":{"day":{"$ref":"#/$defs/when"},"code":{"type":"string","maxLength":3},
                "pin":{"type":"string","minLength":6},"qty":{"type":"integer","exclusiveMinimum":4,"maximum":9},
                "ratio":{"type":"number","maximum":0.25},"tags":{"type":"array","items":{"type":"string"},"minItems":2},
                "both":{"allOf":[{"properties":{"a":{"const":1}}},{"properties":{"b":{"type":"boolean"}}}]}}}"##,
        )
        .unwrap();
        assert_eq!(
            instance(&schema, "hello"),
            serde_json::json!({"both": {"a": 1, "b": true}, "code": "hel", "day": "2026-01-01",
                "pin": "hellox", "qty": 5, "ratio": 0.25, "tags": ["hello", "hello"]})
        );
    }
    #[test]
    fn a_schema_cannot_make_the_simulator_build_without_bound() {
        let fan_out: Value = serde_json::from_str(
            r##"{"type":"object","properties":{"a":{"$ref":"#"},"b":{"$ref":"#"},"c":{"$ref":"#"},
                "d":{"$ref":"#"},"e":{"$ref":"#"},"f":{"$ref":"#"},"g":{"$ref":"#"},"h":{"$ref":"#"}}}"##,
        )
        .unwrap();
        let built = instance(&fan_out, "x").to_string();
        assert!(built.len() < 100_000, "{} bytes", built.len());
        let huge: Value = serde_json::json!({"type": "array", "minItems": 1_000_000_000u64,
            "items": {"type": "string", "minLength": 1_000_000_000u64}});
        let built = instance(&huge, "x");
        assert_eq!(built.as_array().unwrap().len(), MAX_INSTANCE_ITEMS);
        assert_eq!(built[0].as_str().unwrap().len(), MAX_INSTANCE_CHARS);
        let below_one = serde_json::json!({"type": "integer", "maximum": 0.5});
        assert_eq!(instance(&below_one, "x"), serde_json::json!(0));
        let short_date = serde_json::json!({"type": "string", "format": "date", "maxLength": 4});
        assert_eq!(instance(&short_date, "x"), serde_json::json!("2026"));
    }
}
