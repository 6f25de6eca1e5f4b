//! OpenAI's chat completions on the wire: the request as OpenAI's API takes it, with the
//! validation that turns a bad one into a 400 naming the field at fault, and the response
//! objects (completions, chunks, usage) exactly as OpenAI's SDKs expect them.

use axum::http::{header, HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_schemas::ChatMessage;

use crate::error::ApiError;

/// A chat completion request as OpenAI's API takes it (the fields Sluice uses; others are
/// accepted and ignored, as OpenAI's SDKs send some by default).
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

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Parses and validates a request body into a [`CompletionRequest`] and its messages.
pub fn parse(body: &[u8]) -> Result<(CompletionRequest, Vec<ChatMessage>), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("The request body must be a JSON object."));
    }
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
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(format!(
                "Invalid role {:?}; expected one of {}.",
                m.role,
                ROLES.join(", ")
            ))
            .with_param(format!("messages[{i}].role")));
        }
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
            None => {
                return Err(ApiError::invalid("Each message needs `content`.")
                    .with_param(format!("messages[{i}].content")))
            }
        };
        messages.push(ChatMessage {
            role: m.role.clone(),
            content,
            name: m.name.clone(),
        });
    }
    Ok((request, messages))
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

/// A whole (not streamed) `chat.completion` object.
pub fn completion_json(
    id: &str,
    created: i64,
    model: &str,
    content: &str,
    finish_reason: &str,
    (input, output): (i64, i64),
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content, "refusal": Value::Null },
            "logprobs": Value::Null,
            "finish_reason": finish_reason,
        }],
        "usage": usage_json(input, output),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_requests_and_rejects_bad_ones() {
        let (req, messages) = parse(br#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"seed":1}"#).unwrap();
        assert_eq!(req.model, "auto");
        assert_eq!(messages[0].content, "hi");
        let (_, messages) = parse(br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(messages[0].content, "ab");

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
