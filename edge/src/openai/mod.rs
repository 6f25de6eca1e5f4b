//! OpenAI's chat completions on the wire: the request as OpenAI's API takes it, with the
//! validation that turns a bad one into a 400 naming the field at fault, and the response
//! objects (completions, chunks, usage) exactly as OpenAI's SDKs expect them. Function calling,
//! response formats and sampling parameters are read and checked in [`params`].

pub mod params;

use axum::http::{header, HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_schemas::{ChatMessage, ResponseFormat, ToolCall, ToolCallDelta, ToolDefinition};

use crate::error::ApiError;

/// A chat completion request as OpenAI's API takes it. Parameters Sluice carries but does not
/// read itself (sampling parameters such as `top_p`, `stop` or `seed`) are checked by
/// [`params::options`] and passed to the model; a parameter Sluice cannot honour, or does not
/// know, is refused with a 400 naming it, never dropped.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    /// Functions the model may call.
    #[serde(default)]
    pub tools: Option<Vec<params::ToolIn>>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub response_format: Option<Value>,
    /// A workflow run's inputs (`model: "workflow/<name>"` only), e.g. `{"order_id": "A-1001"}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub inputs: Option<serde_json::Map<String, Value>>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One input message.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    /// The functions an assistant message called.
    #[serde(default)]
    pub tool_calls: Option<Vec<params::ToolCallIn>>,
    /// The call a tool message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A content part; only text parts are supported.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// What a chat request asks of the model, checked: the conversation, the tools it may call,
/// the form of the reply and further sampling parameters.
#[derive(Debug, Default)]
pub struct Prompt {
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolDefinition>,
    /// `none`, `auto`, `required` or `function`, and the function for the last.
    pub tool_choice: Option<(String, Option<String>)>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    /// Sampling parameters for the model, as a JSON object's text.
    pub options_json: Option<String>,
    /// Whether the session's memory is kept (see [`crate::memory`]).
    pub memory: bool,
    /// A workflow run's inputs, as a JSON object's text.
    pub workflow_inputs_json: Option<String>,
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// What the model name of a workflow run starts with.
pub const WORKFLOW_PREFIX: &str = "workflow/";

/// The header that runs a workflow whatever the body's `model` says.
pub const WORKFLOW_HEADER: &str = "x-sluice-workflow";

/// Checks what only a workflow run takes, or does not take, once the model is known: `inputs`
/// only with a workflow, `tools` never with one.
pub fn check_workflow_fields(model: &str, prompt: &Prompt) -> Result<(), ApiError> {
    let workflow = model.starts_with(WORKFLOW_PREFIX);
    if prompt.workflow_inputs_json.is_some() && !workflow {
        return Err(ApiError::invalid(
            "`inputs` is for workflow runs (`model: \"workflow/<name>\"` or the X-Sluice-Workflow header).",
        )
        .with_param("inputs"));
    }
    if workflow && !prompt.tools.is_empty() {
        return Err(ApiError::invalid(
            "A workflow run calls its own tools: `tools` cannot be sent with a workflow.",
        )
        .with_param("tools"));
    }
    Ok(())
}

/// Parses and validates a request body into a [`CompletionRequest`] and the [`Prompt`] it
/// carries.
pub fn parse(body: &[u8]) -> Result<(CompletionRequest, Prompt), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::invalid("The request body must be a JSON object."));
    };
    // Before the typed read, so a parameter Sluice cannot honour is named as such.
    let options_json = params::options(fields)?;
    let request: CompletionRequest = serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let error = ApiError::invalid(format!("Invalid request: {}", e.inner()));
        if path == "." {
            error
        } else {
            error.with_param(path)
        }
    })?;
    if request.model.trim().is_empty() {
        return Err(ApiError::invalid("`model` must not be empty.").with_param("model"));
    }
    if request.messages.is_empty() {
        return Err(
            ApiError::invalid("`messages` must hold at least one message.").with_param("messages"),
        );
    }
    if let Some(n) = request.n {
        if n != 1 {
            return Err(ApiError::invalid("Only n=1 is supported.").with_param("n"));
        }
    }
    if let Some(t) = request.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid("`temperature` must be between 0 and 2.")
                .with_param("temperature"));
        }
    }
    if request.max_tokens == Some(0) || request.max_completion_tokens == Some(0) {
        return Err(ApiError::invalid("`max_tokens` must be at least 1.").with_param("max_tokens"));
    }
    let tools = params::tools(request.tools.as_deref())?;
    let tool_choice = params::tool_choice(request.tool_choice.as_ref(), &tools)?;
    if request.parallel_tool_calls.is_some() && tools.is_empty() {
        return Err(ApiError::invalid(
            "`parallel_tool_calls` is only allowed when `tools` are specified.",
        )
        .with_param("parallel_tool_calls"));
    }
    let response_format = params::response_format(request.response_format.as_ref())?;
    let workflow_inputs_json = request
        .inputs
        .as_ref()
        .map(|inputs| Value::Object(inputs.clone()).to_string());
    let messages = messages(&request.messages)?;
    let prompt = Prompt {
        messages,
        tools,
        tool_choice,
        parallel_tool_calls: request.parallel_tool_calls,
        response_format,
        options_json,
        memory: false,
        workflow_inputs_json,
    };
    Ok((request, prompt))
}

/// The conversation, checked: known roles, text content, tool calls only on assistant messages,
/// and every tool message answering a call made before it.
fn messages(input: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(input.len());
    for (i, m) in input.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(format!(
                "Invalid role {:?}; expected one of {}.",
                m.role,
                ROLES.join(", ")
            ))
            .with_param(format!("messages[{i}].role")));
        }
        let tool_calls = match &m.tool_calls {
            Some(_) if m.role != "assistant" => {
                return Err(
                    ApiError::invalid("Only assistant messages can carry `tool_calls`.")
                        .with_param(format!("messages[{i}].tool_calls")),
                );
            }
            Some(calls) => params::tool_calls(calls, i)?,
            None => Vec::new(),
        };
        let content = match &m.content {
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid("Only text content parts are supported.")
                                .with_param(format!("messages[{i}].content[{j}]")))
                        }
                    }
                }
                text
            }
            // An assistant message that only called tools has no content.
            None if !tool_calls.is_empty() => String::new(),
            None => {
                return Err(ApiError::invalid("Each message needs `content`.")
                    .with_param(format!("messages[{i}].content")))
            }
        };
        let tool_call_id = match (m.role.as_str(), &m.tool_call_id) {
            // That it answers an earlier call is checked once a session's memory is in
            // ([`check_tool_answers`]).
            ("tool", Some(id)) => Some(id.clone()),
            ("tool", None) => {
                return Err(ApiError::invalid(
                    "A tool message needs the `tool_call_id` it answers.",
                )
                .with_param(format!("messages[{i}].tool_call_id")))
            }
            (_, Some(_)) => {
                return Err(
                    ApiError::invalid("Only tool messages can carry `tool_call_id`.")
                        .with_param(format!("messages[{i}].tool_call_id")),
                )
            }
            (_, None) => None,
        };
        messages.push(ChatMessage {
            role: m.role.clone(),
            content,
            name: m.name.clone(),
            tool_calls,
            tool_call_id,
        });
    }
    Ok(messages)
}

/// Checks that every tool message answers a call an earlier assistant message made (OpenAI's
/// rule). `remembered` messages from a session's memory follow the leading system and developer
/// ones; a message at fault is named by its place in the caller's own list.
pub fn check_tool_answers(messages: &[ChatMessage], remembered: usize) -> Result<(), ApiError> {
    let leading = messages
        .iter()
        .take_while(|m| matches!(m.role.as_str(), "system" | "developer"))
        .count();
    for (i, message) in messages.iter().enumerate() {
        let Some(id) = message
            .tool_call_id
            .as_ref()
            .filter(|_| message.role == "tool")
        else {
            continue;
        };
        let answered = messages[..i]
            .iter()
            .any(|earlier| earlier.tool_calls.iter().any(|c| &c.id == id));
        if !answered {
            let own = if i >= leading + remembered {
                i - remembered
            } else {
                i
            };
            return Err(ApiError::invalid(format!(
                "A tool message must answer a call of an earlier assistant message; no call has \
                 the id {id:?}."
            ))
            .with_param(format!("messages[{own}].tool_call_id")));
        }
    }
    Ok(())
}

/// Checks the `Content-Type` is JSON (415 otherwise).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type must be application/json, not {content_type:?}."),
        ))
    }
}

/// `usage` in OpenAI's shape.
pub fn usage_json(input: i64, output: i64) -> Value {
    json!({ "prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output })
}

/// A `chat.completion.chunk` object.
pub fn chunk_json(
    id: &str,
    created: i64,
    model: &str,
    delta: Value,
    finish_reason: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{ "index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish_reason }],
    })
}

/// A whole (not streamed) `chat.completion` object. With tool calls, `content` is null when
/// the model wrote no text.
pub fn completion_json(
    id: &str,
    created: i64,
    model: &str,
    (content, tool_calls): (&str, &[ToolCall]),
    finish_reason: &str,
    (input, output): (i64, i64),
) -> Value {
    let mut message = json!({ "role": "assistant", "content": content, "refusal": Value::Null });
    if !tool_calls.is_empty() {
        if content.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = tool_calls
            .iter()
            .map(|c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }))
            .collect();
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": Value::Null,
            "finish_reason": finish_reason,
        }],
        "usage": usage_json(input, output),
    })
}

/// A reply's tool-call pieces as OpenAI's streamed `delta.tool_calls`: a call's first piece
/// with its id, type and name, every piece with its arguments' next part.
pub fn tool_call_deltas_json(pieces: &[ToolCallDelta]) -> Value {
    pieces
        .iter()
        .map(|piece| {
            let mut function = json!({ "arguments": piece.arguments });
            let mut out = json!({ "index": piece.index });
            if let Some(name) = &piece.name {
                function["name"] = json!(name);
            }
            if let Some(id) = &piece.id {
                out["id"] = json!(id);
                out["type"] = json!("function");
            }
            out["function"] = function;
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::ToolCallAssembler;

    #[test]
    fn parses_openai_requests_and_rejects_bad_ones() {
        let (req, prompt) = parse(br#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"seed":1}"#).unwrap();
        assert_eq!(req.model, "auto");
        assert_eq!(prompt.messages[0].content, "hi");
        assert_eq!(prompt.options_json.as_deref(), Some(r#"{"seed":1}"#));
        let (_, prompt) = parse(br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(prompt.messages[0].content, "ab");
        assert_eq!(prompt.options_json, None);

        for (body, param) in [
            (&br#"{"model":"m""#[..], None),
            (br#"[1,2]"#, None),
            (br#"{"messages":[]}"#, None),
            (br#"{"model":"m","messages":[]}"#, Some("messages")),
            (
                br#"{"model":5,"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":9}"#,
                Some("temperature"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                Some("max_tokens"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                Some("stream"),
            ),
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(
                err.status,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(body)
            );
            if let Some(param) = param {
                assert_eq!(
                    err.param.as_deref(),
                    Some(param),
                    "{}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    /// Parses `extra` fields added to a valid request; the 400's `param` if it fails.
    fn refused(extra: Value) -> Option<String> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        match parse(body.to_string().as_bytes()) {
            Ok(_) => None,
            Err(e) => {
                assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
                Some(e.param.unwrap_or_default())
            }
        }
    }

    fn weather_tool() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn tools_tool_choice_and_response_format_are_carried_not_dropped() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "weather?"}],
            "tools": weather_tool(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}},
            "top_p": 0.5, "stop": ["\n"], "user": "u-1", "max_completion_tokens": 9});
        let (_, prompt) = parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(prompt.tools.len(), 1);
        assert_eq!(prompt.tools[0].name, "get_weather");
        assert_eq!(prompt.tools[0].description.as_deref(), Some("Weather now"));
        let parameters: Value =
            serde_json::from_str(prompt.tools[0].parameters_json.as_deref().unwrap()).unwrap();
        assert_eq!(parameters["required"], json!(["city"]));
        assert_eq!(
            prompt.tool_choice,
            Some(("function".into(), Some("get_weather".into())))
        );
        assert_eq!(prompt.parallel_tool_calls, Some(false));
        let format = prompt.response_format.unwrap();
        assert_eq!(format.kind, "json_schema");
        let spec: Value =
            serde_json::from_str(format.json_schema_json.as_deref().unwrap()).unwrap();
        assert_eq!(spec["name"], "w");
        let options: Value = serde_json::from_str(prompt.options_json.as_deref().unwrap()).unwrap();
        assert_eq!(
            options,
            json!({"top_p": 0.5, "stop": ["\n"], "user": "u-1", "max_completion_tokens": 9})
        );
    }

    #[test]
    fn a_conversation_with_tool_calls_and_their_results_parses() {
        let body = json!({"model": "m", "tools": weather_tool(), "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\":21}"},
        ]});
        let (_, prompt) = parse(body.to_string().as_bytes()).unwrap();
        let called = &prompt.messages[1];
        assert_eq!(called.content, "");
        assert_eq!(called.tool_calls[0].id, "call_1");
        assert_eq!(called.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(prompt.messages[2].tool_call_id.as_deref(), Some("call_1"));
    }

    #[test]
    fn what_sluice_cannot_honour_or_does_not_know_is_refused_by_name() {
        let cases = [
            (
                json!({"tools": [{"type": "code_interpreter"}]}),
                "tools[0].type",
            ),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": [1]}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]}),
                "tools[1].function.name",
            ),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"parallel_tool_calls": true}), "parallel_tool_calls"),
            (
                json!({"tools": weather_tool(), "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": weather_tool(), "tool_choice": {"type": "function", "function": {"name": "other"}}}),
                "tool_choice",
            ),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
                "response_format.json_schema.name",
            ),
            (json!({"top_p": 2}), "top_p"),
            (json!({"seed": "x"}), "seed"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"functions": []}), "functions"),
            (json!({"audio": {"voice": "alloy"}}), "audio"),
            (json!({"store": true}), "store"),
            (json!({"no_such_parameter": 1}), "no_such_parameter"),
        ];
        for (extra, param) in cases {
            assert_eq!(refused(extra.clone()).as_deref(), Some(param), "{extra}");
        }
        // Off values ask for nothing.
        for extra in [
            json!({"logprobs": false, "store": false, "modalities": ["text"], "service_tier": "auto"}),
            json!({"tool_choice": null, "top_p": null}),
            json!({"tools": weather_tool(), "tool_choice": "none", "parallel_tool_calls": true}),
        ] {
            assert_eq!(refused(extra.clone()), None, "{extra}");
        }
    }

    #[test]
    fn tool_messages_must_answer_an_earlier_call() {
        let call = json!({"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        for (messages, param) in [
            (
                json!([{"role": "tool", "content": "r"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{"role": "tool", "tool_call_id": "c9", "content": "r"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([call, {"role": "tool", "tool_call_id": "c2", "content": "r"}]),
                "messages[1].tool_call_id",
            ),
            (
                json!([{"role": "user", "content": "x", "tool_call_id": "c1"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{"role": "user", "content": "x", "tool_calls": []}]),
                "messages[0].tool_calls",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"id": "", "function": {"name": "f", "arguments": ""}}]}]),
                "messages[0].tool_calls[0].id",
            ),
        ] {
            let body = json!({"model": "m", "messages": messages});
            let e = parse(body.to_string().as_bytes())
                .and_then(|(_, prompt)| check_tool_answers(&prompt.messages, 0))
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        let body = json!({"model": "m", "messages": [call, {"role": "tool", "tool_call_id": "c1", "content": "r"}]});
        let (_, prompt) = parse(body.to_string().as_bytes()).unwrap();
        assert!(check_tool_answers(&prompt.messages, 0).is_ok());
        // Answering a call from the session's memory: the call is in the remembered messages.
        let mut remembered = vec![
            ChatMessage::text("system", "s"),
            ChatMessage::text("assistant", ""),
        ];
        remembered[1].tool_calls.push(ToolCall {
            id: "c7".into(),
            name: "f".into(),
            arguments: "{}".into(),
        });
        let mut answer = ChatMessage::text("tool", "r");
        answer.tool_call_id = Some("c7".into());
        remembered.push(answer.clone());
        assert!(check_tool_answers(&remembered, 1).is_ok());
        answer.tool_call_id = Some("c8".into());
        remembered.push(answer);
        let e = check_tool_answers(&remembered, 1).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[2].tool_call_id"),
            "the caller's own place"
        );
    }

    #[test]
    fn tool_calls_come_back_in_openais_shapes() {
        let piece = |index, id: Option<&str>, arguments: &str| ToolCallDelta {
            index,
            id: id.map(str::to_owned),
            name: id.map(|_| "get_weather".to_owned()),
            arguments: arguments.to_owned(),
        };
        let pieces = [
            piece(0, Some("call_a"), ""),
            piece(0, None, "{\"city\":"),
            piece(1, Some("call_b"), "{}"),
            piece(0, None, "\"Paris\"}"),
        ];
        let streamed = tool_call_deltas_json(&pieces);
        assert_eq!(
            streamed[0],
            json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}})
        );
        assert_eq!(
            streamed[1],
            json!({"index": 0, "function": {"arguments": "{\"city\":"}})
        );
        let mut whole = ToolCallAssembler::default();
        whole.push(&pieces);
        let calls = whole.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(calls[1].id, "call_b");
        let body = completion_json("r", 1, "sim-small", ("", calls), "tool_calls", (3, 4));
        let message = &body["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(message["tool_calls"][1]["type"], "function");
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn content_type_must_be_json() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            require_json(&headers).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(require_json(&headers).is_err());
        headers.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(require_json(&headers).is_ok());
    }
}
