//! Sluice's token counter: the unit every usage record, quota and invoice is measured in for
//! models without a tokenizer of their own (the simulator), and the prompt estimate the router
//! (and admission at the edge) decides with. [`ChatRequest::prompt_tokens`](crate::ChatRequest)
//! applies it to a request.
//!
//! A token is a run of letters or digits, or a single other non-space character. Upstream
//! providers that report their own counts (OpenAI-compatible APIs do) are billed by those.

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

/// Tokens a chat prompt costs: each message's content plus 4 for its role and framing.
pub fn count_prompt<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    messages
        .into_iter()
        .map(|(_role, content)| 4 + count(content))
        .sum()
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
        assert_eq!(count_prompt([("user", "hi there")]), 6);
    }
}
