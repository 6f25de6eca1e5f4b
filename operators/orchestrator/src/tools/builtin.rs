//! The built-in tools: lookups and writes of a tenant's customers, orders and tickets, and
//! searches of its knowledge, in PostgreSQL, each call in the tenant's own transaction under
//! row-level security.
//!
//! | tool | arguments | answers |
//! |---|---|---|
//! | `lookup_customer` | `customer_id` or `email` | `{"found": true, "customer": {…}}` or `{"found": false}` |
//! | `lookup_order` | `order_id` | `{"found": true, "order": {…}}` or `{"found": false}` |
//! | `list_orders` | `customer_id`, `limit` (1–50, 10) | `{"orders": […]}`, newest first |
//! | `update_order_status` | `order_id`, `status` | `{"found": true, "order": {…}}` or `{"found": false}` |
//! | `create_ticket` | `subject`, `body`, `priority` (low, normal, high, urgent), `customer_id` | `{"ticket": {…}}` |
//! | `search_knowledge` | `query`, `limit` (1–10, 3) | `{"found": bool, "passages": [{"document_id", "title", "chunk", "heading", "text", "score"}…], "citations": "[1] Title, Heading (document_id) …"}`, best first |
//!
//! The writes (`update_order_status`, `create_ticket`) happen once per idempotency key: the
//! key is claimed in `tool_writes` in the write's own transaction, and a call with a key
//! already used answers what the first call answered.

use serde_json::{json, Value};
use sluice_schemas::ToolDefinition;
use sluice_stores::postgres::{business, knowledge, tenant_transaction};
use sqlx::{types::Uuid, PgPool};

use super::resilience::Failure;

/// The built-in tools' names.
pub const NAMES: &[&str] = &[
    "lookup_customer",
    "lookup_order",
    "list_orders",
    "update_order_status",
    "create_ticket",
    "search_knowledge",
];

/// The built-in tools as a model sees them: name, description and the JSON Schema of their
/// arguments.
pub fn definitions() -> Vec<ToolDefinition> {
    let tool = |name: &str, description: &str, parameters: Value| ToolDefinition {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        parameters_json: Some(parameters.to_string()),
        strict: None,
    };
    let text = json!({"type": "string", "minLength": 1});
    vec![
        tool(
            "lookup_customer",
            "Find a customer by id or by email address.",
            json!({"type": "object", "properties": {"customer_id": text, "email": text}, "additionalProperties": false}),
        ),
        tool(
            "lookup_order",
            "Find an order by id: its status, items, total and tracking.",
            json!({"type": "object", "properties": {"order_id": text}, "required": ["order_id"], "additionalProperties": false}),
        ),
        tool(
            "list_orders",
            "A customer's latest orders, newest first.",
            json!({"type": "object", "properties": {"customer_id": text, "limit": {"type": "integer", "minimum": 1, "maximum": 50}}, "required": ["customer_id"], "additionalProperties": false}),
        ),
        tool(
            "update_order_status",
            "Change an order's status.",
            json!({"type": "object", "properties": {"order_id": text, "status": {"enum": business::ORDER_STATUSES}}, "required": ["order_id", "status"], "additionalProperties": false}),
        ),
        tool(
            "search_knowledge",
            "Search the organisation's own documents (help articles, policies, manuals) for passages that answer a question.",
            json!({"type": "object", "properties": {"query": text, "limit": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["query"], "additionalProperties": false}),
        ),
        tool(
            "create_ticket",
            "Open a support ticket for a human to handle.",
            json!({"type": "object", "properties": {"subject": text, "body": {"type": "string"}, "priority": {"enum": business::TICKET_PRIORITIES}, "customer_id": text}, "required": ["subject", "body", "priority"], "additionalProperties": false}),
        ),
    ]
}

/// The built-in tools on the control plane's database (the runtime role).
#[derive(Clone)]
pub struct BuiltinTools {
    app: PgPool,
}

impl BuiltinTools {
    pub fn new(app: PgPool) -> Self {
        Self { app }
    }

    /// Makes one attempt at calling `tool` for `tenant` with `arguments`; a write happens once
    /// per `idempotency_key`.
    pub async fn call(
        &self,
        tenant: Uuid,
        tool: &str,
        arguments: &Value,
        idempotency_key: &str,
    ) -> Result<Value, Failure> {
        let args = Arguments(arguments);
        let mut tx = tenant_transaction(&self.app, tenant)
            .await
            .map_err(store_failure)?;
        let write = matches!(tool, "update_order_status" | "create_ticket");
        if write {
            let earlier = business::claim_write(&mut tx, tenant, idempotency_key, tool)
                .await
                .map_err(store_failure)?;
            if let Some(answer) = earlier {
                tx.commit().await.map_err(|e| store_failure(e.into()))?;
                return Ok(answer);
            }
        }
        let answer = match tool {
            "lookup_customer" => {
                let (id, email) = (args.text("customer_id")?, args.text("email")?);
                if id.is_none() && email.is_none() {
                    return Err(Failure::Permanent(
                        "lookup_customer needs customer_id or email".into(),
                    ));
                }
                let found = business::find_customer(&mut tx, tenant, id, email)
                    .await
                    .map_err(store_failure)?;
                found_or_not("customer", found)
            }
            "lookup_order" => {
                let id = args.required("order_id")?;
                let found = business::find_order(&mut tx, tenant, id)
                    .await
                    .map_err(store_failure)?;
                found_or_not("order", found)
            }
            "list_orders" => {
                let customer = args.required("customer_id")?;
                let limit = match arguments.get("limit") {
                    None | Some(Value::Null) => 10,
                    Some(limit) => {
                        limit
                            .as_i64()
                            .filter(|n| (1..=50).contains(n))
                            .ok_or_else(|| {
                                Failure::Permanent("limit must be an integer from 1 to 50".into())
                            })?
                    }
                };
                let orders = business::customer_orders(&mut tx, tenant, customer, limit)
                    .await
                    .map_err(store_failure)?;
                json!({ "orders": orders })
            }
            "update_order_status" => {
                let (id, status) = (args.required("order_id")?, args.required("status")?);
                let found = business::set_order_status(&mut tx, tenant, id, status)
                    .await
                    .map_err(store_failure)?;
                found_or_not("order", found)
            }
            "search_knowledge" => {
                let query = args.required("query")?;
                let limit = match arguments.get("limit") {
                    None | Some(Value::Null) => 3,
                    Some(limit) => {
                        limit
                            .as_i64()
                            .filter(|n| (1..=10).contains(n))
                            .ok_or_else(|| {
                                Failure::Permanent("limit must be an integer from 1 to 10".into())
                            })?
                    }
                };
                let passages = knowledge::search(&mut tx, tenant, query, limit)
                    .await
                    .map_err(store_failure)?;
                let citations: Vec<String> = passages
                    .iter()
                    .enumerate()
                    .map(|(i, p)| match &p.heading {
                        Some(heading) => {
                            format!("[{}] {}, {heading} ({})", i + 1, p.title, p.document_id)
                        }
                        None => format!("[{}] {} ({})", i + 1, p.title, p.document_id),
                    })
                    .collect();
                json!({
                    "found": !passages.is_empty(),
                    "passages": passages,
                    "citations": citations.join("\n"),
                })
            }
            "create_ticket" => {
                let ticket = business::open_ticket(
                    &mut tx,
                    tenant,
                    args.text("customer_id")?,
                    args.required("subject")?,
                    args.text("body")?.unwrap_or_default(),
                    args.required("priority")?,
                )
                .await
                .map_err(store_failure)?;
                json!({ "ticket": ticket })
            }
            other => {
                return Err(Failure::Permanent(format!(
                    "no built-in tool is named {other:?} (known: {})",
                    NAMES.join(", ")
                )))
            }
        };
        if write {
            business::finish_write(&mut tx, tenant, idempotency_key, &answer)
                .await
                .map_err(store_failure)?;
        }
        tx.commit().await.map_err(|e| store_failure(e.into()))?;
        Ok(answer)
    }
}

fn found_or_not<T: serde::Serialize>(what: &str, found: Option<T>) -> Value {
    let mut answer = json!({ "found": found.is_some() });
    if let Some(value) = found {
        answer[what] = json!(value);
    }
    answer
}

/// A store failure, judged: unreachable or a lost race is worth retrying; anything else is not.
fn store_failure(e: sluice_stores::Error) -> Failure {
    if e.is_retriable() {
        Failure::Retriable(e.to_string())
    } else {
        Failure::Permanent(e.to_string())
    }
}

/// A call's arguments, read with the checks a model's arguments need.
struct Arguments<'a>(&'a Value);

impl<'a> Arguments<'a> {
    /// The string argument `name`, if given.
    fn text(&self, name: &str) -> Result<Option<&'a str>, Failure> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.as_str())),
            Some(_) => Err(Failure::Permanent(format!("{name} must be a string"))),
        }
    }

    /// The string argument `name`, which must be given and not empty.
    fn required(&self, name: &str) -> Result<&'a str, Failure> {
        self.text(name)?
            .filter(|text| !text.is_empty())
            .ok_or_else(|| Failure::Permanent(format!("{name} is required")))
    }
}
