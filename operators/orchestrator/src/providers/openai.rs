//! Any OpenAI-compatible upstream: `POST {base_url}/chat/completions` with `stream: true` and
//! `stream_options.include_usage`, read as server-sent events.
//!
//! Token counts are the upstream's own (`usage` in the last chunk). An upstream that reports no
//! usage is billed by Sluice's token counter over the text it sent, and the log says so.

use std::time::Duration;

use bytes::Bytes;
use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use sluice_schemas::ToolCallDelta;

use super::{EventStream, ModelCall, ProviderError, ProviderEvent};

/// Settings for calls to OpenAI-compatible upstreams.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Seconds to wait for the connection.
    pub connect_timeout_secs: u64,
    /// Seconds a whole call may take, streaming included.
    pub request_timeout_secs: u64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            connect_timeout_secs: 10,
            request_timeout_secs: 300,
        }
    }
}

/// A client for OpenAI-compatible upstreams.
#[derive(Clone)]
pub struct OpenAiProvider {
    http: reqwest::Client,
}

impl OpenAiProvider {
    /// Builds the HTTP client (Nagle off, timeouts from `config`).
    pub fn new(config: &OpenAiConfig) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
            .timeout(Duration::from_secs(config.request_timeout_secs))
            .build()
            .map_err(|e| ProviderError::upstream(format!("cannot build HTTP client: {e}")))?;
        Ok(Self { http })
    }

    /// Starts a streaming completion.
    pub async fn complete(&self, call: &ModelCall) -> Result<EventStream, ProviderError> {
        let base = call
            .base_url
            .as_deref()
            .ok_or_else(|| ProviderError::upstream("model has no base_url in the catalogue"))?;
        let url = format!("{}/chat/completions", base.trim_end_matches('/'));
        let body = request_body(call);
        let mut request = self.http.post(&url).json(&body);
        if let Some(key) = &call.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ProviderError::upstream(format!("{url}: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(match status.as_u16() {
                400 | 404 | 413 | 422 => ProviderError {
                    status: status.as_u16(),
                    code: "upstream_rejected".into(),
                    message: format!("upstream refused the request: {message}"),
                },
                429 => ProviderError {
                    status: 429,
                    code: "upstream_rate_limited".into(),
                    message: format!("upstream is rate limiting: {message}"),
                },
                other => ProviderError::upstream(format!("upstream answered {other}: {message}")),
            });
        }
        let mut decoder = SseDecoder::default();
        let mut finish_reason: Option<String> = None;
        let mut usage: Option<ChunkUsage> = None;
        let mut finished = false;
        let bytes = response.bytes_stream();
        let events = bytes
            .map(move |chunk: Result<Bytes, reqwest::Error>| {
                let chunk =
                    chunk.map_err(|e| ProviderError::upstream(format!("stream broke: {e}")))?;
                let mut out = Vec::new();
                for data in decoder.push(&chunk) {
                    if finished {
                        continue;
                    }
                    if data == "[DONE]" {
                        finished = true;
                        out.push(ProviderEvent::Done {
                            finish_reason: finish_reason.clone().unwrap_or_else(|| "stop".into()),
                            input_tokens: usage.as_ref().map(|u| u.prompt_tokens),
                            output_tokens: usage.as_ref().map(|u| u.completion_tokens),
                            cached_input_tokens: usage
                                .as_ref()
                                .and_then(|u| u.prompt_tokens_details.as_ref())
                                .and_then(|d| d.cached_tokens),
                        });
                        continue;
                    }
                    let chunk: StreamChunk = serde_json::from_str(&data).map_err(|e| {
                        ProviderError::upstream(format!("upstream sent invalid JSON: {e}"))
                    })?;
                    if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
                        return Err(ProviderError::upstream(format!(
                            "upstream error mid-stream: {error}"
                        )));
                    }
                    if let Some(u) = chunk.usage {
                        usage = Some(u);
                    }
                    if let Some(choice) = chunk.choices.into_iter().flatten().next() {
                        let delta = choice.delta.unwrap_or_default();
                        if let Some(text) = delta.content {
                            if !text.is_empty() {
                                out.push(ProviderEvent::Delta(text));
                            }
                        }
                        for piece in delta.tool_calls.into_iter().flatten() {
                            if !(0..=ToolCallDelta::MAX_INDEX).contains(&piece.index) {
                                return Err(ProviderError::upstream(format!(
                                    "upstream sent a tool call with index {}",
                                    piece.index
                                )));
                            }
                            let function = piece.function.unwrap_or_default();
                            out.push(ProviderEvent::ToolCall(ToolCallDelta {
                                index: piece.index,
                                id: piece.id,
                                name: function.name,
                                arguments: function.arguments.unwrap_or_default(),
                            }));
                        }
                        if let Some(reason) = choice.finish_reason {
                            finish_reason = Some(reason);
                        }
                    }
                }
                Ok(out)
            })
            .flat_map(
                |batch: Result<Vec<ProviderEvent>, ProviderError>| match batch {
                    Ok(events) => stream::iter(events.into_iter().map(Ok).collect::<Vec<_>>()),
                    Err(e) => stream::iter(vec![Err(e)]),
                },
            );
        Ok(events.boxed())
    }
}

/// One `chat.completion.chunk` of a streamed reply: only the fields Sluice reads.
#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ChunkToolCall>>,
}

/// A piece of a streamed tool call.
#[derive(Deserialize)]
struct ChunkToolCall {
    #[serde(default)]
    index: i32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<ChunkFunction>,
}

#[derive(Default, Deserialize)]
struct ChunkFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// The body of `call` as an OpenAI chat completion request, streamed with usage: the
/// conversation with its tool calls, the tools, the tool choice, the response format and the
/// caller's sampling parameters.
pub fn request_body(call: &ModelCall) -> Value {
    let messages: Vec<Value> = call
        .messages
        .iter()
        .map(|m| {
            let mut message = json!({ "role": m.role, "content": m.content });
            if let Some(name) = &m.name {
                message["name"] = json!(name);
            }
            if !m.tool_calls.is_empty() {
                // A message that only called tools has no content.
                if m.content.is_empty() {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .map(|c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }))
                    .collect();
            }
            if let Some(id) = &m.tool_call_id {
                message["tool_call_id"] = json!(id);
            }
            message
        })
        .collect();
    let mut body = json!({
        "model": call.upstream_model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    // A caller that bounded the reply with `max_completion_tokens` has it sent under that name
    // (with the options below): reasoning models refuse `max_tokens`.
    if let Some(max) = call
        .max_tokens
        .filter(|_| !call.options.contains_key("max_completion_tokens"))
    {
        body["max_tokens"] = json!(max);
    }
    if let Some(t) = call.temperature {
        body["temperature"] = json!(t);
    }
    if !call.tools.is_empty() {
        body["tools"] = call
            .tools
            .iter()
            .map(|t| {
                let mut function = json!({ "name": t.name });
                if let Some(description) = &t.description {
                    function["description"] = json!(description);
                }
                if let Some(parameters) = t.parameters_json.as_deref().and_then(parse_json) {
                    function["parameters"] = parameters;
                }
                if let Some(strict) = t.strict {
                    function["strict"] = json!(strict);
                }
                json!({ "type": "function", "function": function })
            })
            .collect();
    }
    match (call.tool_choice.as_deref(), &call.tool_choice_function) {
        (Some("function"), Some(name)) => {
            body["tool_choice"] = json!({ "type": "function", "function": { "name": name } });
        }
        (Some(mode), _) => body["tool_choice"] = json!(mode),
        (None, _) => {}
    }
    if let Some(parallel) = call.parallel_tool_calls {
        body["parallel_tool_calls"] = json!(parallel);
    }
    if let Some(format) = &call.response_format {
        let mut value = json!({ "type": format.kind });
        if let Some(spec) = format.json_schema_json.as_deref().and_then(parse_json) {
            value["json_schema"] = spec;
        }
        body["response_format"] = value;
    }
    // The caller's sampling parameters; never one Sluice sets itself.
    if let Value::Object(fields) = &mut body {
        for (name, value) in &call.options {
            fields.entry(name.clone()).or_insert_with(|| value.clone());
        }
    }
    body
}

fn parse_json(text: &str) -> Option<Value> {
    serde_json::from_str(text).ok()
}

#[derive(Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
    /// OpenAI's `prompt_tokens_details.cached_tokens`: input served from its prompt cache.
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

/// Splits a server-sent-event byte stream into the `data` payloads of its events, in one pass
/// over the bytes whatever the chunking: lines end in LF, CRLF or CR (as the specification
/// allows), a blank line ends an event, comments and fields other than `data` are skipped.
#[derive(Default)]
pub struct SseDecoder {
    /// Bytes of a line not yet complete.
    buffer: Vec<u8>,
    /// The data lines of the event being read, joined by LF.
    data: Option<String>,
}

impl SseDecoder {
    /// Feeds bytes; returns the data of every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(found) = self.buffer[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = start + found;
            let ending = if self.buffer[end] == b'\r' {
                match self.buffer.get(end + 1) {
                    // A CR last in the buffer may be the first half of a CRLF: wait for more.
                    None => break,
                    Some(b'\n') => 2,
                    Some(_) => 1,
                }
            } else {
                1
            };
            let line = &self.buffer[start..end];
            start = end + ending;
            if line.is_empty() {
                // An event whose data is empty is not dispatched, as in the specification.
                events.extend(self.data.take().filter(|data| !data.is_empty()));
                continue;
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(0) => continue, // a comment
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            if field == b"data" {
                let value = String::from_utf8_lossy(value);
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.data = Some(value.into_owned()),
                }
            }
        }
        self.buffer.drain(..start);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut d = SseDecoder::default();
        assert!(d.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            d.push(b":1}\n\ndata: [DONE]\n\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
        assert_eq!(
            d.push(b": comment\n\nevent: x\r\ndata: y\r\n\r\n"),
            vec!["y"]
        );
    }

    #[test]
    fn sse_lines_end_in_lf_crlf_or_cr_whatever_the_chunking() {
        let stream = b"data: a\r\ndata: b\r\n\r\ndata: c\r\rdata:d\n\n: only a comment\n\n";
        let whole = SseDecoder::default().push(stream);
        assert_eq!(whole, vec!["a\nb", "c", "d"]);
        for split in 0..stream.len() {
            let mut d = SseDecoder::default();
            let mut events = d.push(&stream[..split]);
            events.extend(d.push(&stream[split..]));
            assert_eq!(events, whole, "split at byte {split}");
        }
        let mut d = SseDecoder::default();
        let byte_by_byte: Vec<String> = stream.iter().flat_map(|b| d.push(&[*b])).collect();
        assert_eq!(byte_by_byte, whole);
    }

    #[test]
    fn a_chunk_reads_content_finish_reason_usage_and_escapes() {
        let chunk: StreamChunk = serde_json::from_str(
            r#"{"choices":[{"delta":{"content":"say \"hi\""},"finish_reason":"stop"}],
                "usage":{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}},"error":null}"#,
        )
        .expect("a valid chunk");
        assert!(chunk.error.is_none());
        let usage = chunk.usage.expect("usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 2));
        let cached = usage.prompt_tokens_details.and_then(|d| d.cached_tokens);
        assert_eq!(cached, Some(1));
        let choice = chunk
            .choices
            .into_iter()
            .flatten()
            .next()
            .expect("a choice");
        assert_eq!(choice.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            choice.delta.and_then(|d| d.content).as_deref(),
            Some("say \"hi\"")
        );
        for empty in [
            r#"{"choices":[]}"#,
            r#"{"choices":null,"usage":null}"#,
            "{}",
        ] {
            let chunk: StreamChunk = serde_json::from_str(empty).expect("valid");
            assert!(chunk.choices.into_iter().flatten().next().is_none());
            assert!(chunk.usage.is_none());
        }
    }
    #[test]
    fn the_request_body_carries_tools_choice_format_and_options() {
        let mut request = sluice_schemas::ChatRequest {
            messages: vec![sluice_schemas::ChatMessage::text("user", "weather?")],
            tools: vec![sluice_schemas::ToolDefinition {
                name: "get_weather".into(),
                description: Some("Weather now".into()),
                parameters_json: Some(r#"{"type":"object"}"#.into()),
                strict: Some(true),
            }],
            tool_choice: Some("function".into()),
            tool_choice_function: Some("get_weather".into()),
            parallel_tool_calls: Some(false),
            response_format: Some(sluice_schemas::ResponseFormat {
                kind: "json_schema".into(),
                json_schema_json: Some(r#"{"name":"w","schema":{"type":"object"}}"#.into()),
            }),
            // A caller's option never overrides what Sluice sets itself.
            options_json: Some(r#"{"top_p":0.5,"stream":false}"#.into()),
            ..Default::default()
        };
        let mut called = sluice_schemas::ChatMessage::text("assistant", "");
        called.tool_calls.push(sluice_schemas::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{}".into(),
        });
        let mut result = sluice_schemas::ChatMessage::text("tool", "sunny");
        result.tool_call_id = Some("call_1".into());
        request.messages.extend([called, result]);
        let body = request_body(&ModelCall::for_request(&request, "gpt-x"));
        assert_eq!(
            body["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
        assert_eq!(body["parallel_tool_calls"], false);
        assert_eq!(
            body["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}})
        );
        assert_eq!(body["top_p"], 0.5);
        assert_eq!(body["stream"], true);
        let mut reasoning = request.clone();
        reasoning.max_tokens = Some(64);
        reasoning.options_json = Some(r#"{"max_completion_tokens":64}"#.into());
        let body = request_body(&ModelCall::for_request(&reasoning, "o-x"));
        assert_eq!(body["max_completion_tokens"], 64);
        assert!(
            body.get("max_tokens").is_none(),
            "reasoning models refuse it"
        );
        reasoning.options_json = None;
        let body = request_body(&ModelCall::for_request(&reasoning, "gpt-x"));
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["messages"][1]["content"], Value::Null);
        assert_eq!(body["messages"][1]["tool_calls"][0]["id"], "call_1");
        assert_eq!(body["messages"][2]["tool_call_id"], "call_1");
        let plain = request_body(&ModelCall::for_request(
            &sluice_schemas::ChatRequest::default(),
            "m",
        ));
        for absent in [
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
        ] {
            assert!(plain.get(absent).is_none(), "{absent}");
        }
    }

    #[test]
    fn a_chunk_reads_tool_call_pieces() {
        let chunk: StreamChunk = serde_json::from_str(
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"f","arguments":""}}]},"finish_reason":null}]}"#,
        )
        .expect("a valid chunk");
        let delta = chunk
            .choices
            .into_iter()
            .flatten()
            .next()
            .and_then(|c| c.delta)
            .unwrap();
        let piece = delta.tool_calls.into_iter().flatten().next().unwrap();
        assert_eq!((piece.index, piece.id.as_deref()), (1, Some("call_b")));
        assert_eq!(piece.function.and_then(|f| f.name).as_deref(), Some("f"));
    }
    /// Serves one streamed reply made of `events` (SSE data lines) on loopback; its base URL.
    async fn one_reply_upstream(events: &'static [&'static str]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 65536];
            let _ = socket.read(&mut request).await;
            let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
        base
    }

    #[tokio::test]
    async fn an_upstream_tool_call_index_out_of_range_fails_the_call() {
        use futures::StreamExt;
        let base = one_reply_upstream(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":2147483647,"function":{"arguments":"{}"}}]}}]}"#,
            "[DONE]",
        ])
        .await;
        let mut call = ModelCall::for_request(&sluice_schemas::ChatRequest::default(), "m");
        call.base_url = Some(base);
        let provider = OpenAiProvider::new(&OpenAiConfig::default()).unwrap();
        let events: Vec<_> = provider.complete(&call).await.unwrap().collect().await;
        // The stream ends in the upstream's error, whatever arrived with it.
        assert!(
            matches!(events.last(), Some(Err(e)) if e.status == 502 && e.message.contains("index 2147483647")),
            "{events:?}"
        );
    }
}
