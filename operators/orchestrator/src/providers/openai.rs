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
        let mut body = json!({
            "model": call.upstream_model,
            "messages": call.messages.iter().map(|m| {
                let mut msg = json!({ "role": m.role, "content": m.content });
                if let Some(name) = &m.name { msg["name"] = json!(name); }
                msg
            }).collect::<Vec<_>>(),
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        if let Some(max) = call.max_tokens {
            body["max_tokens"] = json!(max);
        }
        if let Some(t) = call.temperature {
            body["temperature"] = json!(t);
        }
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
        let mut usage: Option<(i64, i64)> = None;
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
                            input_tokens: usage.map(|u| u.0),
                            output_tokens: usage.map(|u| u.1),
                        });
                        continue;
                    }
                    let value: Value = serde_json::from_str(&data).map_err(|e| {
                        ProviderError::upstream(format!("upstream sent invalid JSON: {e}"))
                    })?;
                    if let Some(error) = value.get("error") {
                        return Err(ProviderError::upstream(format!(
                            "upstream error mid-stream: {error}"
                        )));
                    }
                    if let Some(u) = value.get("usage").filter(|u| !u.is_null()) {
                        usage = Some((
                            u["prompt_tokens"].as_i64().unwrap_or(0),
                            u["completion_tokens"].as_i64().unwrap_or(0),
                        ));
                    }
                    if let Some(choice) = value["choices"].get(0) {
                        if let Some(text) = choice["delta"]["content"].as_str() {
                            if !text.is_empty() {
                                out.push(ProviderEvent::Delta(text.to_owned()));
                            }
                        }
                        if let Some(reason) = choice["finish_reason"].as_str() {
                            finish_reason = Some(reason.to_owned());
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

/// Splits a server-sent-event byte stream into the `data` payloads of its events.
#[derive(Default)]
pub struct SseDecoder {
    buffer: Vec<u8>,
}

impl SseDecoder {
    /// Feeds bytes; returns the data of every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = find_event_end(&self.buffer) {
            let (raw, sep) = end;
            let event: Vec<u8> = self.buffer.drain(..raw + sep).collect();
            let text = String::from_utf8_lossy(&event[..raw]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// Position of the blank line ending the first event, and the separator's length.
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
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
}
