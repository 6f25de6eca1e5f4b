//! Sluice's token counter: the unit every usage record, quota and invoice is measured in for
//! models without a tokenizer of their own (the simulator), and the prompt estimate the router
//! (and admission at the edge) decides with. [`ChatRequest::prompt_tokens`](crate::ChatRequest)
//! applies it to a request.
//!
//! A token is a run of letters or digits, or a single other non-space character. Upstream
//! providers that report their own counts (OpenAI-compatible APIs do) are billed by those.

use crate::{ChatMessage, ToolDefinition};

/// Counts tokens in `text`.
pub fn count(text: &str) -> usize {
    let mut tokens = 0;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word {
                tokens += 1;
                in_word = true;
            }
        } else {
            in_word = false;
            if !c.is_whitespace() {
                tokens += 1;
            }
        }
    }
    tokens
}

/// Tokens a chat prompt costs: each message's content plus 4 for its role and framing; each
/// tool call an assistant message made, 4 plus its function's name and arguments; each tool
/// offered, 4 plus its name, description and parameter schema.
pub fn count_prompt(messages: &[ChatMessage], tools: &[ToolDefinition]) -> usize {
    let messages: usize = messages
        .iter()
        .map(|m| {
            let calls: usize = m
                .tool_calls
                .iter()
                .map(|c| 4 + count(&c.name) + count(&c.arguments))
                .sum();
            4 + count(&m.content) + calls
        })
        .sum();
    let tools: usize = tools
        .iter()
        .map(|t| {
            4 + count(&t.name)
                + t.description.as_deref().map_or(0, count)
                + t.parameters_json.as_deref().map_or(0, count)
        })
        .sum();
    messages + tools
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_and_punctuation() {
        assert_eq!(count(""), 0);
        assert_eq!(count("Hello, world!"), 4);
        assert_eq!(count("  two   words "), 2);
        assert_eq!(count("naïve café 42"), 3);
        assert_eq!(
            count_prompt(&[ChatMessage::text("user", "hi there")], &[]),
            6
        );
        let mut called = ChatMessage::text("assistant", "");
        called.tool_calls.push(crate::ToolCall {
            id: "call_1".into(),
            name: "lookup".into(),
            arguments: r#"{"q":"x"}"#.into(),
        });
        let tool = ToolDefinition {
            name: "lookup".into(),
            description: Some("Find it".into()),
            parameters_json: Some(r#"{"type":"object"}"#.into()),
            strict: None,
        };
        // 4 + (4 + 1 + 9); 4 + 1 + 2 + 9
        assert_eq!(count_prompt(&[called], &[tool]), 18 + 16);
    }
}
