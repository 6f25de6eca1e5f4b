//! Conversation memory at the edge: a request that asks for it (`X-Sluice-Memory: on`, with a
//! session) gets its session's latest turns put before its own messages, so a caller can send
//! only the new turn. The turns are recorded by the orchestrator, once per request, when it has
//! answered one.
//!
//! **The rule.** The session's turns are taken newest first, whole, while they number at most
//! `edge.memory.max_turns` and their messages come to at most `edge.memory.max_tokens` tokens;
//! the first turn that does not fit, and every older one, is left out. They go after the
//! request's leading system and developer messages and before the rest of it, oldest first.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_schemas::{tokens, ChatMessage};
use sluice_stores::postgres::{memory, tenant_transaction};
use sqlx::{types::Uuid, PgPool};

use crate::{auth::Caller, error::ApiError, EdgeState};

/// Memory settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Most turns put before a request.
    pub max_turns: u32,
    /// Most tokens (Sluice's counter) of remembered messages put before a request.
    pub max_tokens: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_turns: 20,
            max_tokens: 4000,
        }
    }
}

/// The header that asks for memory.
pub const HEADER: &str = "x-sluice-memory";

/// Whether `value` (of [`HEADER`]) turns memory on.
pub fn requested(value: Option<&str>) -> Result<bool, ApiError> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("off" | "false" | "0") => Ok(false),
        Some("on" | "true" | "1") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "X-Sluice-Memory must be on or off, not {other:?}."
        ))),
    }
}

fn leads(message: &ChatMessage) -> bool {
    matches!(message.role.as_str(), "system" | "developer")
}

/// `messages` with the remembered `turns` (newest first) put in by the rule above, and how many
/// messages were put in. Tool calls stay whole: an oldest turn that opens with tools' results
/// (their calls left out) is left out too, and calls the newest turn made that the new messages
/// do not answer are left out of it, so a remembered message never makes a request invalid.
pub fn with_history(
    messages: Vec<ChatMessage>,
    turns: Vec<Vec<ChatMessage>>,
    config: &MemoryConfig,
) -> (Vec<ChatMessage>, i32) {
    let mut picked: Vec<Vec<ChatMessage>> = Vec::new();
    let mut spent = 0;
    for turn in turns.into_iter().take(config.max_turns as usize) {
        let cost = tokens::count_prompt(&turn, &[]);
        if spent + cost > config.max_tokens {
            break;
        }
        spent += cost;
        picked.push(turn);
    }
    while picked
        .last()
        .and_then(|oldest| oldest.first())
        .is_some_and(|m| m.role == "tool")
    {
        picked.pop();
    }
    let leading = messages.iter().take_while(|m| leads(m)).count();
    let answers: Vec<&str> = messages[leading..]
        .iter()
        .take_while(|m| m.role == "tool")
        .filter_map(|m| m.tool_call_id.as_deref())
        .collect();
    if let Some(newest) = picked.first_mut() {
        let open = newest.last().is_some_and(|last| {
            last.tool_calls
                .iter()
                .any(|call| !answers.contains(&call.id.as_str()))
        });
        if open {
            if let Some(mut last) = newest.pop() {
                last.tool_calls.clear();
                if !last.content.is_empty() {
                    newest.push(last);
                }
            }
        }
    }

    let mut out = Vec::with_capacity(messages.len() + picked.iter().map(Vec::len).sum::<usize>());
    let mut messages = messages.into_iter();
    out.extend(messages.by_ref().take(leading));
    let mut remembered = 0usize;
    for turn in picked.into_iter().rev() {
        remembered += turn.len();
        out.extend(turn);
    }
    out.extend(messages);
    (out, i32::try_from(remembered).unwrap_or(i32::MAX))
}

/// Checks a session id memory can keep (not empty, at most 200 characters).
pub fn check_session(session: &str) -> Result<(), ApiError> {
    let chars = session.chars().count();
    if chars == 0 || chars > memory::MAX_SESSION_CHARS {
        return Err(ApiError::invalid(format!(
            "A session id for conversation memory has 1 to {} characters.",
            memory::MAX_SESSION_CHARS
        )));
    }
    Ok(())
}

/// `DELETE /v1/sessions/{session}/memory`: forgets the caller's session (its key's or user's).
#[utoipa::path(delete, path = "/v1/sessions/{session}/memory", tag = "openai", security(("bearer" = [])),
    params(("session" = String, Path, description = "The session id (`X-Session-Id`)")),
    responses((status = 200, description = "`{\"object\": \"session.memory.deleted\", \"session\": …, \"deleted_turns\": n}`", body = Object), (status = 400, description = "Invalid session id", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 503, description = "PostgreSQL is unavailable (with Retry-After)", body = crate::api_doc::ErrorBody)))]
pub async fn forget(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
    Path(session): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_session(&session)?;
    let owner = memory::owner(caller.key_id().as_deref(), caller.user_id().as_deref());
    let unavailable = |e: sluice_stores::Error| {
        ApiError::unavailable(format!(
            "Sluice cannot change the session's memory right now: {e}"
        ))
    };
    let tenant = caller.tenant.0;
    let mut tx = tenant_transaction(&state.app_pool, tenant)
        .await
        .map_err(unavailable)?;
    let deleted = memory::forget(&mut tx, tenant, &owner, &session)
        .await
        .map_err(unavailable)?;
    tx.commit()
        .await
        .map_err(|e| unavailable(sluice_stores::Error::from(e)))?;
    Ok(Json(json!({
        "object": "session.memory.deleted",
        "session": session,
        "deleted_turns": deleted,
    })))
}

/// The latest turns of `caller`'s `session` (newest first), up to the first one that does not
/// read (older ones are left out with it, so no gap opens in the history).
pub async fn latest_turns(
    app: &PgPool,
    tenant: Uuid,
    caller: &str,
    session: &str,
    config: &MemoryConfig,
) -> Result<Vec<Vec<ChatMessage>>, ApiError> {
    let unavailable = |e: sluice_stores::Error| {
        ApiError::unavailable(format!(
            "Sluice cannot read the session's memory right now: {e}"
        ))
    };
    let mut tx = tenant_transaction(app, tenant).await.map_err(unavailable)?;
    let rows = memory::latest_turns(
        &mut tx,
        tenant,
        caller,
        session,
        i64::from(config.max_turns),
    )
    .await
    .map_err(unavailable)?;
    tx.rollback()
        .await
        .map_err(|e| unavailable(sluice_stores::Error::from(e)))?;
    let mut turns = Vec::with_capacity(rows.len());
    for row in rows {
        match serde_json::from_value::<Vec<ChatMessage>>(row) {
            Ok(turn) => turns.push(turn),
            Err(e) => {
                tracing::warn!(%tenant, session, error = %e, "a remembered turn does not read; it and older ones left out");
                break;
            }
        }
    }
    Ok(turns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(user: &str, assistant: &str) -> Vec<ChatMessage> {
        vec![
            ChatMessage::text("user", user),
            ChatMessage::text("assistant", assistant),
        ]
    }

    #[test]
    fn history_goes_after_the_leading_instructions_oldest_first_within_its_bounds() {
        let new = vec![
            ChatMessage::text("system", "Be brief."),
            ChatMessage::text("user", "And now?"),
        ];
        // Newest first, as read.
        let turns = vec![turn("second", "two"), turn("first", "one")];
        let config = MemoryConfig::default();
        let (messages, remembered) = with_history(new.clone(), turns.clone(), &config);
        let texts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(
            texts,
            ["Be brief.", "first", "one", "second", "two", "And now?"]
        );
        assert_eq!(remembered, 4);

        let one_turn = MemoryConfig {
            max_turns: 1,
            ..config.clone()
        };
        let (messages, remembered) = with_history(new.clone(), turns.clone(), &one_turn);
        assert_eq!(remembered, 2);
        assert_eq!(messages[1].content, "second");

        // Each turn costs 2 × (4 + 1) = 10 tokens: 15 hold only the newest.
        let few_tokens = MemoryConfig {
            max_tokens: 15,
            ..config
        };
        let (_, remembered) = with_history(new.clone(), turns, &few_tokens);
        assert_eq!(remembered, 2);
        let (messages, remembered) = with_history(new.clone(), Vec::new(), &few_tokens);
        assert_eq!((messages, remembered), (new, 0));
    }

    #[test]
    fn tool_calls_stay_whole() {
        let mut call = ChatMessage::text("assistant", "");
        call.tool_calls.push(sluice_schemas::ToolCall {
            id: "c1".into(),
            name: "f".into(),
            arguments: "{}".into(),
        });
        let mut result = ChatMessage::text("tool", "r");
        result.tool_call_id = Some("c1".into());
        // Newest first: the call, then (older) a turn that opens with an earlier call's result.
        let turns = vec![
            vec![ChatMessage::text("user", "look it up"), call.clone()],
            vec![result.clone(), ChatMessage::text("assistant", "done")],
        ];
        let config = MemoryConfig::default();
        // The new turn answers the call: it stays; the turn opening with a result is left out.
        let (messages, remembered) = with_history(vec![result.clone()], turns.clone(), &config);
        assert_eq!(remembered, 2);
        assert_eq!(messages[1].tool_calls.len(), 1);
        // The new turn does not answer it: the unanswered call is left out.
        let (messages, remembered) = with_history(
            vec![ChatMessage::text("user", "never mind")],
            turns,
            &config,
        );
        assert_eq!(remembered, 1);
        assert_eq!(messages[0].content, "look it up");
        assert!(check_session("").is_err());
        assert!(check_session(&"s".repeat(201)).is_err());
        assert!(check_session("ada-1").is_ok());
    }

    #[test]
    fn the_header_is_on_or_off() {
        assert!(!requested(None).unwrap());
        assert!(requested(Some("on")).unwrap());
        assert!(requested(Some(" TRUE ")).unwrap());
        assert!(!requested(Some("off")).unwrap());
        assert!(requested(Some("maybe")).is_err());
    }
}
