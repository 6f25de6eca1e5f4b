//! A tenant's business data, as the built-in tools read and change it: customers, their orders,
//! support tickets (`customers`, `orders`, `tickets`), and the record of every tool write by its
//! idempotency key (`tool_writes`). Every function runs on a connection in the tenant's
//! transaction ([`super::tenant_transaction`]), so row-level security shows that tenant's rows
//! only, and names the tenant in its SQL as well, so it holds run as the owner too.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::{Error, Result};

/// Order statuses, in the order an order goes through them (the last three end it).
pub const ORDER_STATUSES: &[&str] = &[
    "pending",
    "reserved",
    "paid",
    "shipped",
    "delivered",
    "cancelled",
    "refunded",
];

/// Ticket priorities, lowest first.
pub const TICKET_PRIORITIES: &[&str] = &["low", "normal", "high", "urgent"];

/// A customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub customer_id: String,
    pub status: String,
    /// `[{"sku", "quantity", "unit_price_minor"}, …]`.
    #[serde(default)]
    pub items: Value,
    #[serde(default)]
    pub total_minor: i64,
    #[serde(default = "usd")]
    pub currency: String,
    #[serde(default)]
    pub tracking: Option<String>,
}

fn usd() -> String {
    "USD".to_owned()
}

/// A support ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: Uuid,
    pub customer_id: Option<String>,
    pub subject: String,
    pub body: String,
    pub priority: String,
    pub status: String,
}

/// Adds a customer, or changes the one with its id.
pub async fn upsert_customer(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    customer: &Customer,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO customers (tenant_id, id, name, email, phone) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (tenant_id, id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, \
         phone = EXCLUDED.phone",
    )
    .bind(tenant_id)
    .bind(&customer.id)
    .bind(&customer.name)
    .bind(&customer.email)
    .bind(&customer.phone)
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds an order, or changes the one with its id.
pub async fn upsert_order(conn: &mut PgConnection, tenant_id: Uuid, order: &Order) -> Result<()> {
    check_status(&order.status)?;
    sqlx::query(
        "INSERT INTO orders (tenant_id, id, customer_id, status, items, total_minor, currency, tracking) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (tenant_id, id) DO UPDATE SET customer_id = EXCLUDED.customer_id, \
         status = EXCLUDED.status, items = EXCLUDED.items, total_minor = EXCLUDED.total_minor, \
         currency = EXCLUDED.currency, tracking = EXCLUDED.tracking, updated_at = now()",
    )
    .bind(tenant_id)
    .bind(&order.id)
    .bind(&order.customer_id)
    .bind(&order.status)
    .bind(&order.items)
    .bind(order.total_minor)
    .bind(&order.currency)
    .bind(&order.tracking)
    .execute(conn)
    .await?;
    Ok(())
}

fn check_status(status: &str) -> Result<()> {
    if ORDER_STATUSES.contains(&status) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "unknown order status {status:?} (known: {})",
            ORDER_STATUSES.join(", ")
        )))
    }
}

/// The customer with `id`, or with `email` (case aside).
pub async fn find_customer(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Option<&str>,
    email: Option<&str>,
) -> Result<Option<Customer>> {
    let row = sqlx::query(
        "SELECT id, name, email, phone FROM customers WHERE tenant_id = $3 \
         AND (($1::text IS NOT NULL AND id = $1) OR ($2::text IS NOT NULL AND lower(email) = lower($2))) \
         ORDER BY id LIMIT 1",
    )
    .bind(id)
    .bind(email)
    .bind(tenant_id)
    .fetch_optional(conn)
    .await?;
    row.map(|row| {
        Ok(Customer {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            email: row.try_get(2)?,
            phone: row.try_get(3)?,
        })
    })
    .transpose()
}

const ORDER_COLUMNS: &str = "id, customer_id, status, items, total_minor, currency, tracking";

fn order_of(row: &sqlx::postgres::PgRow) -> Result<Order> {
    Ok(Order {
        id: row.try_get(0)?,
        customer_id: row.try_get(1)?,
        status: row.try_get(2)?,
        items: row.try_get(3)?,
        total_minor: row.try_get(4)?,
        currency: row.try_get(5)?,
        tracking: row.try_get(6)?,
    })
}

/// The order with `id`.
pub async fn find_order(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: &str,
) -> Result<Option<Order>> {
    let row = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE tenant_id = $2 AND id = $1"
    ))
    .bind(id)
    .bind(tenant_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(order_of).transpose()
}

/// A customer's latest `limit` orders, newest first.
pub async fn customer_orders(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    customer_id: &str,
    limit: i64,
) -> Result<Vec<Order>> {
    let rows = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE tenant_id = $3 AND customer_id = $1 \
         ORDER BY created_at DESC, id LIMIT $2"
    ))
    .bind(customer_id)
    .bind(limit)
    .bind(tenant_id)
    .fetch_all(conn)
    .await?;
    rows.iter().map(order_of).collect()
}

/// Sets an order's status; `None` if there is no such order.
pub async fn set_order_status(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: &str,
    status: &str,
) -> Result<Option<Order>> {
    check_status(status)?;
    let row = sqlx::query(&format!(
        "UPDATE orders SET status = $2, updated_at = now() WHERE tenant_id = $3 AND id = $1 \
         RETURNING {ORDER_COLUMNS}"
    ))
    .bind(id)
    .bind(status)
    .bind(tenant_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(order_of).transpose()
}

/// Opens a ticket.
pub async fn open_ticket(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    customer_id: Option<&str>,
    subject: &str,
    body: &str,
    priority: &str,
) -> Result<Ticket> {
    if !TICKET_PRIORITIES.contains(&priority) {
        return Err(Error::Invalid(format!(
            "unknown ticket priority {priority:?} (known: {})",
            TICKET_PRIORITIES.join(", ")
        )));
    }
    let row = sqlx::query(
        "INSERT INTO tickets (tenant_id, customer_id, subject, body, priority) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id, status",
    )
    .bind(tenant_id)
    .bind(customer_id)
    .bind(subject)
    .bind(body)
    .bind(priority)
    .fetch_one(conn)
    .await?;
    Ok(Ticket {
        id: row.try_get(0)?,
        customer_id: customer_id.map(str::to_owned),
        subject: subject.to_owned(),
        body: body.to_owned(),
        priority: priority.to_owned(),
        status: row.try_get(1)?,
    })
}

/// The tenant's tickets, newest first (at most `limit`).
pub async fn tickets(conn: &mut PgConnection, tenant_id: Uuid, limit: i64) -> Result<Vec<Ticket>> {
    let rows = sqlx::query(
        "SELECT id, customer_id, subject, body, priority, status FROM tickets \
         WHERE tenant_id = $2 ORDER BY created_at DESC, id LIMIT $1",
    )
    .bind(limit)
    .bind(tenant_id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Ticket {
                id: row.try_get(0)?,
                customer_id: row.try_get(1)?,
                subject: row.try_get(2)?,
                body: row.try_get(3)?,
                priority: row.try_get(4)?,
                status: row.try_get(5)?,
            })
        })
        .collect()
}

/// Claims `key` for a write by `tool`: `None` if this is the key's first write (make it, then
/// [`finish_write`] in the same transaction), or what the write with this key returned before.
/// A second writer with the same key waits here until the first one's transaction ends.
pub async fn claim_write(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    key: &str,
    tool: &str,
) -> Result<Option<Value>> {
    let claimed = sqlx::query(
        "INSERT INTO tool_writes (tenant_id, idempotency_key, tool, result) VALUES ($1, $2, $3, 'null') \
         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
    )
    .bind(tenant_id)
    .bind(key)
    .bind(tool)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if claimed == 1 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT tool, result FROM tool_writes WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(tenant_id)
    .bind(key)
    .fetch_one(conn)
    .await?;
    let earlier: String = row.try_get(0)?;
    if earlier != tool {
        return Err(Error::Invalid(format!(
            "the idempotency key {key:?} was used by the tool {earlier:?}"
        )));
    }
    Ok(Some(row.try_get(1)?))
}

/// Records what the write that claimed `key` returned.
pub async fn finish_write(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    key: &str,
    result: &Value,
) -> Result<()> {
    sqlx::query("UPDATE tool_writes SET result = $3 WHERE tenant_id = $1 AND idempotency_key = $2")
        .bind(tenant_id)
        .bind(key)
        .bind(result)
        .execute(conn)
        .await?;
    Ok(())
}

/// Everything for the tenant's export: its customers, orders and tickets (filtered by tenant
/// as well, so that it holds run as the owner, whom row-level security does not bind).
pub async fn export(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Value> {
    let customers = sqlx::query(
        "SELECT id, name, email, phone FROM customers WHERE tenant_id = $1 ORDER BY id",
    )
    .bind(tenant_id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        Ok(Customer {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            email: row.try_get(2)?,
            phone: row.try_get(3)?,
        })
    })
    .collect::<Result<Vec<_>>>()?;
    let orders = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE tenant_id = $1 ORDER BY id"
    ))
    .bind(tenant_id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(order_of)
    .collect::<Result<Vec<_>>>()?;
    let tickets = tickets(conn, tenant_id, i64::MAX).await?;
    Ok(serde_json::json!({ "customers": customers, "orders": orders, "tickets": tickets }))
}
