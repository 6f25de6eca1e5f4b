//! The OpenAPI document of the edge's API, generated from the handlers' own annotations and
//! types, served at `GET /openapi.json`.

use serde::Serialize;
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi, ToSchema,
};

/// OpenAI's error shape, which every error of the API takes.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The error itself.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `rate_limit_error`
    /// or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code: `model_not_found`, `rate_limit_exceeded`, `insufficient_quota`, ...
    pub code: Option<String>,
}

/// `Authorization: Bearer` with an API key or a user's access token.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`sk-sluice-…`) or a user's access token (a JWT from `/v1/auth/login`).",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "Multi-tenant AI as a service: OpenAI-compatible chat completions, usage, users, keys and the audit log. Errors take OpenAI's shape (`ErrorBody`).",
    ),
    paths(
        crate::chat::completions,
        crate::ws::upgrade,
        crate::usage::models,
        crate::usage::usage,
        crate::usage::me,
        crate::memory::forget,
        crate::documents::put,
        crate::documents::delete,
        crate::documents::list,
        crate::documents::search,
        crate::runs::show,
        crate::runs::signal,
        crate::control::register,
        crate::control::login,
        crate::control::refresh,
        crate::control::logout,
        crate::control::list_keys,
        crate::control::create_key,
        crate::control::revoke_key,
        crate::control::rotate_key,
        crate::control::list_members,
        crate::control::add_member,
        crate::control::audit_log,
        crate::control::export_tenant,
        crate::control::delete_tenant,
        crate::control::list_origins,
        crate::control::set_origins,
        crate::platform::list_plans,
        crate::platform::create_plan,
        crate::platform::update_plan,
        crate::platform::delete_plan,
        crate::platform::list_tenants,
        crate::platform::create_tenant,
        crate::platform::set_tenant_plan,
        crate::analytics::models,
        crate::budgets::list,
        crate::budgets::set_tenant,
        crate::budgets::set_key,
        crate::budgets::remove_tenant,
        crate::budgets::remove_key,
        crate::webhooks::list,
        crate::webhooks::create,
        crate::webhooks::update,
        crate::webhooks::remove,
        crate::webhooks::rotate_secret,
        crate::webhooks::deliveries,
        crate::invoices::list,
        crate::invoices::preview,
        crate::invoices::show,
        crate::invoices::export,
        crate::invoices::usage,
    ),
    modifiers(&Bearer),
    tags(
        (name = "openai", description = "OpenAI's API, as its SDKs call it"),
        (name = "usage", description = "The caller's usage and account"),
        (name = "auth", description = "Users' sessions"),
        (name = "admin", description = "A tenant's keys, members, origins and audit log, for its admins"),
        (name = "platform", description = "Plans and tenants, for platform admins"),
        (name = "billing", description = "Invoices, their preview and finance's exports, and spend budgets, for a tenant's admins (a platform admin's period export covers every tenant)"),
        (name = "webhooks", description = "A tenant's webhook endpoints and their delivery log, for its admins"),
        (name = "workflows", description = "Workflow runs: their status, and the external events they wait for"),
        (name = "knowledge", description = "A tenant's documents, searched by its workflows (the built-in tool search_knowledge)"),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_covers_every_api_route() {
        let doc = ApiDoc::openapi();
        let json = serde_json::to_value(&doc).unwrap();
        assert!(json["openapi"].as_str().unwrap().starts_with("3."));
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        for route in crate::API_ROUTES {
            assert!(
                paths.iter().any(|p| p.as_str() == *route),
                "{route} is served but not documented"
            );
        }
        assert_eq!(paths.len(), crate::API_ROUTES.len(), "{paths:?}");
        let schemas = &json["components"]["schemas"];
        for schema in [
            "CompletionRequest",
            "ErrorBody",
            "Session",
            "KeyInfo",
            "Entry",
        ] {
            assert!(schemas.get(schema).is_some(), "{schema} missing");
        }
    }
}
