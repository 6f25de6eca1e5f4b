//! Finance's read side: `GET /v1/invoices…` — a tenant's final invoices, the preview of the
//! month to date, one invoice as JSON or CSV, a month's invoices as one CSV (a platform admin
//! gets every tenant's) and the usage per key, model and day. Tenant admins see their own
//! tenant's, through row-level security; invoices are computed and written by `sluice invoices
//! run`, never here.

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, Path, Query, State},
    http::{header, request::Parts, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_stores::{
    billing::{csv, invoices, period::day_range, Invoice, Period},
    postgres::tenant_transaction,
};
use utoipa::IntoParams;

use crate::{
    control::{store_error, TenantAdmin},
    error::ApiError,
    platform::PlatformAdmin,
    EdgeState,
};

/// Who reads invoices: a tenant's admin (or a platform admin naming the tenant in
/// `x-sluice-tenant`), or a platform admin reading every tenant's.
pub enum InvoiceReader {
    Tenant(TenantAdmin),
    Platform,
}

impl FromRequestParts<Arc<EdgeState>> for InvoiceReader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<EdgeState>,
    ) -> Result<Self, Self::Rejection> {
        if !parts.headers.contains_key("x-sluice-tenant")
            && PlatformAdmin::from_request_parts(parts, state)
                .await
                .is_ok()
        {
            return Ok(Self::Platform);
        }
        Ok(Self::Tenant(
            TenantAdmin::from_request_parts(parts, state).await?,
        ))
    }
}

/// How to answer: JSON (the default for invoices) or CSV.
#[derive(Debug, Deserialize, IntoParams)]
pub struct Format {
    /// `json` or `csv`.
    format: Option<String>,
}

impl Format {
    fn csv(&self, default_csv: bool) -> Result<bool, ApiError> {
        match self.format.as_deref() {
            None => Ok(default_csv),
            Some("csv") => Ok(true),
            Some("json") => Ok(false),
            Some(_) => {
                Err(ApiError::invalid("format must be `json` or `csv`.").with_param("format"))
            }
        }
    }
}

fn csv_response(name: &str, body: String) -> Response {
    // The file name comes from the issuer's prefix: only plain characters reach the header.
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.csv\""),
            ),
        ],
        body,
    )
        .into_response()
}

fn unavailable(e: sluice_stores::Error) -> ApiError {
    match e {
        e @ (sluice_stores::Error::Invalid(_) | sluice_stores::Error::NotFound(_)) => {
            store_error("reading invoices", e)
        }
        e => {
            tracing::warn!(error = %e, "reading invoices failed");
            ApiError::unavailable("Invoices are unavailable right now; retry shortly.")
                .retry_after(5)
        }
    }
}

fn period_param(text: Option<&str>) -> Result<Option<Period>, ApiError> {
    text.map(|p| {
        Period::parse(p)
            .map_err(|_| ApiError::invalid("period must be a month, YYYY-MM.").with_param("period"))
    })
    .transpose()
}

/// Query of `GET /v1/invoices` and `GET /v1/invoices/export`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PeriodQuery {
    /// A month, `YYYY-MM`.
    period: Option<String>,
    /// `json` or `csv` (the export's default is `csv`).
    format: Option<String>,
}

/// `GET /v1/invoices`: the tenant's final invoices, newest first.
#[utoipa::path(get, path = "/v1/invoices", tag = "billing", security(("bearer" = [])), params(PeriodQuery),
    responses((status = 200, description = "The tenant's final invoices with their lines; amounts are decimal strings in `currency`", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    query: Result<Query<PeriodQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let period = period_param(query.period.as_deref())?;
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(unavailable)?;
    let found = invoices::list(&mut tx, period).await.map_err(unavailable)?;
    let data: Vec<Value> = found.iter().map(Invoice::to_json).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `GET /v1/invoices/preview`: the month to date, as it would be invoiced now (with
/// adjustments for late usage of closed months).
#[utoipa::path(get, path = "/v1/invoices/preview", tag = "billing", security(("bearer" = [])), params(Format),
    responses((status = 200, description = "The preview: `currency`, `total` and `lines` (each with `model`, `input_tokens`, `output_tokens`, `amount`)", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 503, description = "A store is unavailable (with Retry-After)", body = crate::api_doc::ErrorBody)))]
pub async fn preview(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    query: Result<Query<Format>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(format) = query?;
    let csv_wanted = format.csv(false)?;
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(unavailable)?;
    let invoice = invoices::preview(
        &mut tx,
        &state.clickhouse,
        admin.tenant,
        sluice_pipelines::now_ms(),
    )
    .await
    .map_err(unavailable)?;
    Ok(if csv_wanted {
        csv_response(
            &format!("preview-{}", invoice.period),
            csv::invoice_lines(&[invoice]),
        )
    } else {
        Json(invoice.to_json()).into_response()
    })
}

/// `GET /v1/invoices/{invoice}`: one final invoice, by id or number.
#[utoipa::path(get, path = "/v1/invoices/{invoice}", tag = "billing", security(("bearer" = [])),
    params(("invoice" = String, Path, description = "The invoice's id or number"), Format),
    responses((status = 200, description = "The invoice (JSON, or CSV with `format=csv`)", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "No such invoice of this tenant", body = crate::api_doc::ErrorBody)))]
pub async fn show(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(invoice): Path<String>,
    query: Result<Query<Format>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(format) = query?;
    let csv_wanted = format.csv(false)?;
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(unavailable)?;
    let found = invoices::get(&mut tx, &invoice)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such invoice."))?;
    Ok(if csv_wanted {
        let name = found.number.clone().unwrap_or_default();
        csv_response(&name, csv::invoice_lines(&[found]))
    } else {
        Json(found.to_json()).into_response()
    })
}

/// `GET /v1/invoices/export?period=YYYY-MM`: a month's invoices as one CSV — the tenant's, or
/// every tenant's for a platform admin.
#[utoipa::path(get, path = "/v1/invoices/export", tag = "billing", security(("bearer" = [])), params(PeriodQuery),
    responses((status = 200, description = "One CSV row per invoice line (`format=json` for JSON)", body = String), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn export(
    State(state): State<Arc<EdgeState>>,
    reader: InvoiceReader,
    query: Result<Query<PeriodQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let csv_wanted = Format {
        format: query.format.clone(),
    }
    .csv(true)?;
    let period = period_param(query.period.as_deref())?
        .ok_or_else(|| ApiError::invalid("Name the month: period=YYYY-MM.").with_param("period"))?;
    let found = match reader {
        InvoiceReader::Tenant(admin) => {
            let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
                .await
                .map_err(unavailable)?;
            invoices::list(&mut tx, Some(period)).await
        }
        InvoiceReader::Platform => {
            let mut conn = state
                .app_pool
                .acquire()
                .await
                .map_err(|e| unavailable(e.into()))?;
            invoices::all_of_period(&mut conn, period).await
        }
    }
    .map_err(unavailable)?;
    Ok(if csv_wanted {
        csv_response(&format!("invoices-{period}"), csv::invoice_lines(&found))
    } else {
        let data: Vec<Value> = found.iter().map(Invoice::to_json).collect();
        Json(json!({ "object": "list", "data": data })).into_response()
    })
}

/// Query of `GET /v1/invoices/usage`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct UsageQuery {
    /// First day, `YYYY-MM-DD` (UTC); default the first of this month.
    start: Option<String>,
    /// The day after the last; default tomorrow.
    end: Option<String>,
    /// `csv` (default) or `json`.
    format: Option<String>,
}

/// `GET /v1/invoices/usage`: the tenant's usage per day, key (or user) and model, priced at
/// the prices in force when it happened.
#[utoipa::path(get, path = "/v1/invoices/usage", tag = "billing", security(("bearer" = [])), params(UsageQuery),
    responses((status = 200, description = "One row per day, key and model", body = String), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn usage(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let csv_wanted = Format {
        format: query.format.clone(),
    }
    .csv(true)?;
    let (start, end) = day_range(
        query.start.as_deref(),
        query.end.as_deref(),
        sluice_pipelines::now_ms(),
    )
    .map_err(|e| ApiError::invalid(e.to_string()).with_param("start"))?;
    if end - start > 400 * 86_400_000 {
        return Err(ApiError::invalid("A usage export spans at most 400 days.").with_param("start"));
    }
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(unavailable)?;
    let (currency, days) =
        invoices::usage_by_key_model_day(&mut tx, &state.clickhouse, admin.tenant, start, end)
            .await
            .map_err(unavailable)?;
    Ok(if csv_wanted {
        csv_response("usage", csv::usage_days(currency, &days))
    } else {
        let data: Vec<Value> = days
            .iter()
            .map(|d| {
                json!({
                    "day": d.day, "key_id": d.key_id, "model": d.model,
                    "requests": d.quantities.requests, "input_tokens": d.quantities.input_tokens,
                    "output_tokens": d.quantities.output_tokens,
                    "cached_input_tokens": d.quantities.cached_input_tokens,
                    "amount": d.amount.decimal(currency),
                })
            })
            .collect();
        Json(json!({ "object": "list", "currency": currency.code(), "data": data })).into_response()
    })
}
