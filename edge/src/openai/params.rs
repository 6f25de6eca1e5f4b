//! The parameters of a chat request beyond the conversation: function calling (`tools`,
//! `tool_choice`, tool calls in messages), `response_format`, and the sampling parameters
//! passed to the model as they came. Each is checked the way OpenAI checks it, so a mistake is a
//! 400 naming the field here, not a confusing failure upstream; a parameter Sluice cannot honour
//! is refused by name, never dropped.

use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_schemas::{ResponseFormat, ToolCall, ToolDefinition};

use crate::error::ApiError;

/// Most tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A tool as OpenAI's API takes it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub function: Option<FunctionIn>,
}

/// A function tool.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct FunctionIn {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// A tool call in an assistant message.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ToolCallIn {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCallIn,
}

fn function_kind() -> String {
    "function".to_owned()
}

/// The function a tool call called.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct FunctionCallIn {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// Parameters the request's own fields cover.
const READ_HERE: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "n",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "inputs",
];

/// Sampling parameters passed to the model as they came (after the checks in [`options`]).
/// `max_completion_tokens` is read here too (it bounds the reply as `max_tokens` does) and goes
/// on under its own name, which reasoning models require.
const PASSED_ON: &[&str] = &[
    "max_completion_tokens",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    "user",
];

/// OpenAI parameters Sluice cannot honour, and why.
const REFUSED: &[(&str, &str)] = &[
    ("audio", "Audio output is not supported."),
    ("modalities", "Only text output is supported."),
    ("prediction", "Predicted outputs are not supported."),
    ("web_search_options", "Web search is not supported."),
    ("logprobs", "Log probabilities are not supported."),
    ("top_logprobs", "Log probabilities are not supported."),
    (
        "functions",
        "`functions` is deprecated; send `tools` instead.",
    ),
    (
        "function_call",
        "`function_call` is deprecated; send `tool_choice` instead.",
    ),
    ("metadata", "Stored completions are not supported."),
    ("store", "Stored completions are not supported."),
    ("service_tier", "Choosing a service tier is not supported."),
];

/// Checks every top-level parameter: returns the sampling parameters to pass on, as a JSON
/// object's text (`None` when there are none), or a 400 naming a parameter Sluice cannot
/// honour or does not know. A parameter set to its off value (`null`, `logprobs: false`,
/// `store: false`, `modalities: ["text"]`, `service_tier: "auto"`) asks for nothing and passes.
pub fn options(fields: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let mut passed = Map::new();
    for (name, value) in fields {
        if value.is_null() {
            continue;
        }
        if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| refused == name) {
            let off = match name.as_str() {
                "logprobs" | "store" => value == &Value::Bool(false),
                "modalities" => value == &serde_json::json!(["text"]),
                "service_tier" => matches!(value.as_str(), Some("auto" | "default")),
                _ => false,
            };
            if off {
                continue;
            }
            return Err(ApiError::invalid(format!("`{name}`: {why}")).with_param(name.as_str()));
        }
        if PASSED_ON.contains(&name.as_str()) {
            check_option(name, value)?;
            passed.insert(name.clone(), value.clone());
        } else if !READ_HERE.contains(&name.as_str()) {
            return Err(ApiError::invalid(format!(
                "Unrecognized request argument supplied: {name}"
            ))
            .with_param(name.as_str()));
        }
    }
    Ok((!passed.is_empty()).then(|| Value::Object(passed).to_string()))
}

/// Checks one sampling parameter's type and range.
fn check_option(name: &str, value: &Value) -> Result<(), ApiError> {
    let number_in = |low: f64, high: f64| value.as_f64().is_some_and(|v| (low..=high).contains(&v));
    let ok = match name {
        "top_p" => number_in(0.0, 1.0),
        "presence_penalty" | "frequency_penalty" => number_in(-2.0, 2.0),
        "seed" => value.is_i64() || value.is_u64(),
        "max_completion_tokens" => value.as_u64().is_some_and(|n| n >= 1),
        "stop" => match value {
            Value::String(_) => true,
            Value::Array(items) => items.len() <= 4 && items.iter().all(Value::is_string),
            _ => false,
        },
        "logit_bias" => value.as_object().is_some_and(|biases| {
            biases
                .values()
                .all(|b| b.as_f64().is_some_and(|b| (-100.0..=100.0).contains(&b)))
        }),
        _ => value.is_string(),
    };
    if ok {
        return Ok(());
    }
    let expected = match name {
        "top_p" => "a number between 0 and 1",
        "presence_penalty" | "frequency_penalty" => "a number between -2 and 2",
        "seed" => "an integer",
        "max_completion_tokens" => "a whole number from 1",
        "stop" => "a string or a list of at most 4 strings",
        "logit_bias" => "an object mapping token ids to numbers between -100 and 100",
        _ => "a string",
    };
    Err(ApiError::invalid(format!("`{name}` must be {expected}.")).with_param(name))
}

/// Whether `name` is a valid function name (OpenAI's rule: 1-64 of a-z, A-Z, 0-9, `_`, `-`).
fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

const NAME_RULE: &str = "1 to 64 letters, digits, underscores or dashes";

/// The tools offered, checked: functions only, valid and distinct names, an object schema.
pub fn tools(input: Option<&[ToolIn]>) -> Result<Vec<ToolDefinition>, ApiError> {
    let Some(input) = input else {
        return Ok(Vec::new());
    };
    if input.len() > MAX_TOOLS {
        return Err(ApiError::invalid(format!(
            "At most {MAX_TOOLS} tools may be offered, not {}.",
            input.len()
        ))
        .with_param("tools"));
    }
    let mut tools: Vec<ToolDefinition> = Vec::with_capacity(input.len());
    for (i, tool) in input.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(format!(
                "Only tools of type `function` are supported, not {:?}.",
                tool.kind
            ))
            .with_param(format!("tools[{i}].type")));
        }
        let Some(function) = &tool.function else {
            return Err(ApiError::invalid("A function tool needs its `function`.")
                .with_param(format!("tools[{i}].function")));
        };
        if !valid_function_name(&function.name) {
            return Err(ApiError::invalid(format!(
                "Invalid function name {:?}: {NAME_RULE}.",
                function.name
            ))
            .with_param(format!("tools[{i}].function.name")));
        }
        if tools.iter().any(|t| t.name == function.name) {
            return Err(ApiError::invalid(format!(
                "Two tools are named {:?}; function names must be distinct.",
                function.name
            ))
            .with_param(format!("tools[{i}].function.name")));
        }
        let parameters_json = match &function.parameters {
            None | Some(Value::Null) => None,
            Some(schema @ Value::Object(_)) => Some(schema.to_string()),
            Some(_) => {
                return Err(
                    ApiError::invalid("`parameters` must be a JSON Schema object.")
                        .with_param(format!("tools[{i}].function.parameters")),
                )
            }
        };
        tools.push(ToolDefinition {
            name: function.name.clone(),
            description: function.description.clone(),
            parameters_json,
            strict: function.strict,
        });
    }
    Ok(tools)
}

/// `tool_choice`, checked against the tools offered: the mode, and the function for `function`.
pub fn tool_choice(
    input: Option<&Value>,
    tools: &[ToolDefinition],
) -> Result<Option<(String, Option<String>)>, ApiError> {
    let Some(input) = input.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let invalid = |message: String| Err(ApiError::invalid(message).with_param("tool_choice"));
    if tools.is_empty() {
        return invalid("`tool_choice` is only allowed when `tools` are specified.".into());
    }
    match input {
        Value::String(mode) if matches!(mode.as_str(), "none" | "auto" | "required") => {
            Ok(Some((mode.clone(), None)))
        }
        Value::Object(choice) if choice.get("type").and_then(Value::as_str) == Some("function") => {
            let Some(name) = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            else {
                return invalid("A `function` tool choice needs `function.name`.".into());
            };
            if !tools.iter().any(|t| t.name == name) {
                return invalid(format!(
                    "`tool_choice` names {name:?}, which is not among `tools`."
                ));
            }
            Ok(Some(("function".into(), Some(name.to_owned()))))
        }
        other => invalid(format!(
            "`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \
             \"function\": {{\"name\": ...}}}}, not {other}."
        )),
    }
}

/// The tool calls of assistant message `i`, checked.
pub fn tool_calls(input: &[ToolCallIn], i: usize) -> Result<Vec<ToolCall>, ApiError> {
    let mut calls: Vec<ToolCall> = Vec::with_capacity(input.len());
    for (j, call) in input.iter().enumerate() {
        let param = |field: &str| format!("messages[{i}].tool_calls[{j}].{field}");
        if call.kind != "function" {
            return Err(ApiError::invalid(format!(
                "Only tool calls of type `function` are supported, not {:?}.",
                call.kind
            ))
            .with_param(param("type")));
        }
        if call.id.is_empty() || calls.iter().any(|c| c.id == call.id) {
            return Err(
                ApiError::invalid("Each tool call needs an `id` of its own.")
                    .with_param(param("id")),
            );
        }
        if !valid_function_name(&call.function.name) {
            return Err(ApiError::invalid(format!(
                "Invalid function name {:?}: {NAME_RULE}.",
                call.function.name
            ))
            .with_param(param("function.name")));
        }
        calls.push(ToolCall {
            id: call.id.clone(),
            name: call.function.name.clone(),
            arguments: call.function.arguments.clone(),
        });
    }
    Ok(calls)
}

/// `response_format`, checked: `text`, `json_object`, or `json_schema` with a named schema.
pub fn response_format(input: Option<&Value>) -> Result<Option<ResponseFormat>, ApiError> {
    let Some(input) = input.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let invalid = |message: &str, param: &str| Err(ApiError::invalid(message).with_param(param));
    let kind = input.get("type").and_then(Value::as_str);
    match kind {
        Some("text") | Some("json_object") => Ok(Some(ResponseFormat {
            kind: kind.unwrap_or_default().to_owned(),
            json_schema_json: None,
        })),
        Some("json_schema") => {
            let Some(spec) = input.get("json_schema").filter(|s| s.is_object()) else {
                return invalid(
                    "A `json_schema` response format needs its `json_schema` object.",
                    "response_format.json_schema",
                );
            };
            let name = spec.get("name").and_then(Value::as_str).unwrap_or("");
            if !valid_function_name(name) {
                return invalid(
                    "`json_schema.name` must be 1 to 64 letters, digits, underscores or dashes.",
                    "response_format.json_schema.name",
                );
            }
            if spec
                .get("schema")
                .is_some_and(|s| !s.is_object() && !s.is_null())
            {
                return invalid(
                    "`json_schema.schema` must be a JSON Schema object.",
                    "response_format.json_schema.schema",
                );
            }
            if spec
                .get("strict")
                .is_some_and(|s| !s.is_boolean() && !s.is_null())
            {
                return invalid(
                    "`json_schema.strict` must be true or false.",
                    "response_format.json_schema.strict",
                );
            }
            Ok(Some(ResponseFormat {
                kind: "json_schema".into(),
                json_schema_json: Some(spec.to_string()),
            }))
        }
        _ => invalid(
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\".",
            "response_format.type",
        ),
    }
}
