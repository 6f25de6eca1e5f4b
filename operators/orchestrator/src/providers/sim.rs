//! The simulator: a model that answers instantly or at a configured pace, with text that
//! depends only on the model name and the conversation (the same request always gets the same
//! reply), and token counts taken with Sluice's token counter from the text it really sends.
//!
//! It stands in for a real model in the demo, the tests and the benchmarks. It is never a
//! fallback: a request reaches it only if the catalogue routes to a model with provider `sim`.

use std::time::Duration;

use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_schemas::tokens;

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

/// The reply the simulator gives to `call`: its pieces (each exactly one token) and whether it
/// was cut by `max_tokens`.
pub fn reply_pieces(call: &ModelCall, config: &SimConfig) -> (Vec<String>, bool) {
    let mut hasher = Sha256::new();
    hasher.update(call.upstream_model.as_bytes());
    for m in &call.messages {
        hasher.update(m.role.as_bytes());
        hasher.update([0]);
        hasher.update(m.content.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    // `reply_tokens` tokens in all: words, then a closing '.'.
    let words = usize::try_from(config.reply_tokens)
        .unwrap_or(24)
        .saturating_sub(1)
        .max(1);
    let limit = call
        .max_tokens
        .and_then(|m| usize::try_from(m).ok())
        .unwrap_or(usize::MAX);
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
    let truncated = pieces.len() > limit;
    pieces.truncate(limit);
    (pieces, truncated)
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Streams the simulated reply to `call`.
pub fn complete(call: &ModelCall, config: &SimConfig) -> EventStream {
    let (pieces, truncated) = reply_pieces(call, config);
    let input_tokens = tokens::count_prompt(
        call.messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str())),
    );
    let output_tokens: usize = pieces.iter().map(|p| tokens::count(p)).sum();
    let first = Duration::from_millis(config.first_token_ms);
    let gap = if config.tokens_per_second > 0.0 {
        Duration::from_secs_f64(1.0 / config.tokens_per_second)
    } else {
        Duration::ZERO
    };
    let done = ProviderEvent::Done {
        finish_reason: if truncated { "length" } else { "stop" }.to_owned(),
        input_tokens: i64::try_from(input_tokens).ok(),
        output_tokens: i64::try_from(output_tokens).ok(),
        cached_input_tokens: None,
    };
    let deltas = stream::iter(pieces.into_iter().enumerate()).then(move |(i, piece)| async move {
        let wait = if i == 0 { first } else { gap };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(ProviderEvent::Delta(piece))
    });
    deltas.chain(stream::once(async move { Ok(done) })).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::ChatMessage;

    fn call(content: &str, max_tokens: Option<i32>) -> ModelCall {
        ModelCall {
            upstream_model: "sim-small".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: content.into(),
                name: None,
            }],
            max_tokens,
            temperature: None,
            base_url: None,
            api_key: None,
        }
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
}
