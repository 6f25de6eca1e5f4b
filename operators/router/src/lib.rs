//! The router: for each chat request on `sluice.requests`, choose a concrete model from the
//! catalogue and write the request with its [`RoutingDecision`] to `sluice.routed`.
//!
//! # The rule (v0)
//! - An explicit model must exist in the catalogue and be enabled (else 404 `model_not_found`)
//!   and its context window must hold the prompt plus `max_tokens` (else 400
//!   `context_length_exceeded`).
//! - `auto` picks the cheapest enabled model (input + output price per million tokens) whose
//!   context window holds the prompt plus `max_tokens` (or [`RouterConfig::assumed_output_tokens`]
//!   when the caller set none). Ties go to the name that sorts first, so the rule is
//!   deterministic.
//! - Either way, only among the models the request's `allowed_models` names, when it names
//!   any (the caller's key and plan), and the models not switched off for the tenant by the
//!   feature flag `model.<name>` (an operator's kill switch for one model, globally or for one
//!   tenant, followed live): another is `model_not_found`, as if it did not exist.
//!
//! - `workflow/<name>` runs that workflow: the decision names the provider `workflow` and the
//!   orchestrator starts the run (each model step is routed by this same rule as it runs);
//!   `workflow/auto` leaves the choice to the tenant's registry: the workflow of the intent
//!   `support` (`sluice_stores::postgres::workflows::AUTO_INTENT`), which triages the message.
//!
//! A request the router refuses gets an ERROR reply chunk on its reply address, so the caller
//! hears why at once; nothing goes to `sluice.routed`.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_pipelines::{now_ms, Emitter, ProcessError, RecordContext, RecordOperator, Topics};
use sluice_schemas::{ChatRequest, ReplyChunk, RoutedRequest, RoutingDecision};
use sluice_stores::{
    postgres::flags::{self, Flags},
    ModelCatalog, ModelSpec,
};
use uuid::Uuid;

/// The model name that asks the router to choose.
pub const AUTO: &str = sluice_stores::AUTO_MODEL;

/// What the model name of a workflow run starts with (`workflow/<name>`).
pub const WORKFLOW_PREFIX: &str = "workflow/";

/// The provider a decision to run a workflow names: the orchestrator starts the run.
pub const WORKFLOW_PROVIDER: &str = "workflow";

/// Router settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Completion tokens assumed for `auto` when the request sets no `max_tokens`.
    pub assumed_output_tokens: i32,
    /// Seconds between model-catalogue refreshes.
    pub catalog_refresh_secs: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            assumed_output_tokens: 512,
            catalog_refresh_secs: 10,
        }
    }
}

impl RouterConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.assumed_output_tokens < 1 {
            problems.push("router.assumed_output_tokens must be at least 1".to_owned());
        }
        if self.catalog_refresh_secs < 1 {
            problems.push("router.catalog_refresh_secs must be at least 1".to_owned());
        }
        problems
    }
}

/// Why a request cannot be routed: the HTTP status and OpenAI error code the caller gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// Chooses a model for `request` from `models` (cheapest first), among those `usable` accepts.
/// Pure: no I/O.
pub fn decide(
    request: &ChatRequest,
    models: &[ModelSpec],
    usable: impl Fn(&ModelSpec) -> bool,
    config: &RouterConfig,
    now_ms: i64,
) -> Result<RoutingDecision, Refusal> {
    let prompt = request.prompt_tokens();
    let output = i64::from(request.max_tokens.unwrap_or(config.assumed_output_tokens));
    let needed = prompt.saturating_add(output);
    let decision = |model: &ModelSpec, reason: String| RoutingDecision {
        model: model.name.clone(),
        provider: model.provider.as_str().to_owned(),
        upstream_model: model.upstream_model.clone(),
        base_url: model.base_url.clone(),
        api_key_env: model.api_key_env.clone(),
        reason,
        decided_at_ms: now_ms,
    };
    let allowed = |m: &&ModelSpec| {
        request
            .allowed_models
            .as_ref()
            .is_none_or(|names| names.contains(&m.name))
            && usable(m)
    };
    if let Some(name) = request.model.strip_prefix(WORKFLOW_PREFIX) {
        // The edge found the workflow in the tenant's registry; its models are chosen step by
        // step as the run goes.
        let allowed = request
            .allowed_models
            .as_ref()
            .is_none_or(|names| names.contains(&request.model));
        if !allowed || name.is_empty() {
            return Err(Refusal {
                status: 404,
                code: "model_not_found",
                message: format!(
                    "The model `{}` does not exist or you do not have access to it.",
                    request.model
                ),
            });
        }
        return Ok(RoutingDecision {
            model: request.model.clone(),
            provider: WORKFLOW_PROVIDER.to_owned(),
            upstream_model: name.to_owned(),
            base_url: None,
            api_key_env: None,
            reason: "workflow requested explicitly".to_owned(),
            decided_at_ms: now_ms,
        });
    }
    if request.model == AUTO {
        return models
            .iter()
            .filter(allowed)
            .find(|m| i64::from(m.context_window) >= needed)
            .map(|m| {
                decision(
                    m,
                    format!(
                        "auto: cheapest model whose context window ({}) holds the prompt (~{prompt} tokens) plus {output} output tokens",
                        m.context_window
                    ),
                )
            })
            .ok_or_else(|| Refusal {
                status: 400,
                code: "context_length_exceeded",
                message: format!(
                    "No model can hold a prompt of ~{prompt} tokens plus {output} output tokens."
                ),
            });
    }
    let model = models
        .iter()
        .filter(allowed)
        .find(|m| m.name == request.model)
        .ok_or_else(|| Refusal {
            status: 404,
            code: "model_not_found",
            message: format!(
                "The model `{}` does not exist or you do not have access to it.",
                request.model
            ),
        })?;
    if i64::from(model.context_window) < needed {
        return Err(Refusal {
            status: 400,
            code: "context_length_exceeded",
            message: format!(
                "This model's maximum context length is {} tokens; the request needs ~{needed} ({prompt} in the prompt, {output} for the completion).",
                model.context_window
            ),
        });
    }
    Ok(decision(model, "requested explicitly".to_owned()))
}

/// The router as a stream operator.
pub struct Router {
    catalog: Arc<ModelCatalog>,
    flags: Arc<Flags>,
    config: RouterConfig,
    topics: Topics,
}

impl Router {
    /// A router reading models from `catalog`, honouring `flags`' `model.<name>` switches, and
    /// writing to `topics.routed`.
    pub fn new(
        catalog: Arc<ModelCatalog>,
        flags: Arc<Flags>,
        config: RouterConfig,
        topics: Topics,
    ) -> Self {
        Self {
            catalog,
            flags,
            config,
            topics,
        }
    }
}

#[async_trait]
impl RecordOperator for Router {
    type Input = ChatRequest;

    async fn process(
        &self,
        request: ChatRequest,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let models = self.catalog.snapshot();
        let flags = self.flags.get();
        let tenant = Uuid::parse_str(&request.tenant_id).ok();
        // Names are built only when some model is switched off somewhere.
        let switches = flags.has_model_switches();
        let usable =
            |m: &ModelSpec| !switches || flags.enabled(&flags::model_flag(&m.name), tenant, true);
        match decide(&request, &models, usable, &self.config, now_ms()) {
            Ok(decision) => {
                // The decision and its reason are on `sluice.routed`; a log line each is for
                // debugging.
                tracing::debug!(
                    request_id = %request.request_id, trace_id = %ctx.trace.trace_id_hex(),
                    model = %decision.model, reason = %decision.reason, "routed"
                );
                let key = request.session_id.clone();
                let routed = RoutedRequest { request, decision };
                out.emit(&self.topics.routed, None, key.as_bytes(), &routed)
                    .await
            }
            Err(refusal) => {
                tracing::info!(request_id = %request.request_id, code = refusal.code, "refused");
                let chunk = ReplyChunk::error(
                    &request,
                    &request.model,
                    0,
                    refusal.status,
                    refusal.code,
                    refusal.message,
                );
                out.emit(
                    &request.reply_to.topic,
                    Some(request.reply_to.partition),
                    request.request_id.as_bytes(),
                    &chunk,
                )
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{ChatMessage, ReplyAddress};
    use sluice_stores::ProviderKind;

    fn model(name: &str, context: i32, price: i64) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            provider: ProviderKind::Sim,
            upstream_model: name.into(),
            base_url: None,
            api_key_env: None,
            context_window: context,
            input_price_micros: price,
            output_price_micros: price,
            created_at: 0,
        }
    }

    fn request(model: &str, words: usize, max_tokens: Option<i32>) -> ChatRequest {
        ChatRequest {
            request_id: "r".into(),
            tenant_id: "t".into(),
            session_id: "s".into(),
            model: model.into(),
            messages: vec![ChatMessage::text("user", vec!["word"; words].join(" "))],
            max_tokens,
            temperature: None,
            stream: false,
            reply_to: ReplyAddress {
                topic: "replies".into(),
                partition: 0,
            },
            received_at_ms: 0,
            allowed_models: None,
            key_id: None,
            user_id: None,
            ..Default::default()
        }
    }

    fn catalogue() -> Vec<ModelSpec> {
        vec![model("small", 100, 1), model("large", 1000, 10)]
    }

    #[test]
    fn auto_picks_the_cheapest_model_that_fits() {
        let config = RouterConfig::default();
        let d = decide(
            &request(AUTO, 10, Some(20)),
            &catalogue(),
            |_| true,
            &config,
            5,
        )
        .unwrap();
        assert_eq!(d.model, "small");
        assert_eq!(d.decided_at_ms, 5);
        assert!(d.reason.starts_with("auto"));
        let d = decide(
            &request(AUTO, 200, Some(20)),
            &catalogue(),
            |_| true,
            &config,
            0,
        )
        .unwrap();
        assert_eq!(d.model, "large");
        // With no max_tokens, the assumed 512 output tokens rule out the small model.
        let d = decide(&request(AUTO, 10, None), &catalogue(), |_| true, &config, 0).unwrap();
        assert_eq!(d.model, "large");
    }

    #[test]
    fn refuses_what_cannot_be_served() {
        let config = RouterConfig::default();
        let r = decide(
            &request(AUTO, 5000, Some(1)),
            &catalogue(),
            |_| true,
            &config,
            0,
        )
        .unwrap_err();
        assert_eq!((r.status, r.code), (400, "context_length_exceeded"));
        let r = decide(
            &request("nope", 1, Some(1)),
            &catalogue(),
            |_| true,
            &config,
            0,
        )
        .unwrap_err();
        assert_eq!((r.status, r.code), (404, "model_not_found"));
        let r = decide(
            &request("small", 90, Some(50)),
            &catalogue(),
            |_| true,
            &config,
            0,
        )
        .unwrap_err();
        assert_eq!(r.code, "context_length_exceeded");
        assert!(decide(&request(AUTO, 1, Some(1)), &[], |_| true, &config, 0).is_err());
    }

    #[test]
    fn a_plans_allowed_models_bound_auto_and_explicit_choices() {
        let config = RouterConfig::default();
        let mut only_large = request(AUTO, 10, Some(20));
        only_large.allowed_models = Some(vec!["large".into()]);
        let d = decide(&only_large, &catalogue(), |_| true, &config, 0).unwrap();
        assert_eq!(
            d.model, "large",
            "auto chooses among the allowed models only"
        );
        let mut small_named = request("small", 10, Some(20));
        small_named.allowed_models = Some(vec!["large".into()]);
        let r = decide(&small_named, &catalogue(), |_| true, &config, 0).unwrap_err();
        assert_eq!((r.status, r.code), (404, "model_not_found"));
    }

    #[test]
    fn a_model_switched_off_is_neither_chosen_nor_served() {
        let config = RouterConfig::default();
        let off = |m: &ModelSpec| m.name != "small";
        let d = decide(&request(AUTO, 10, Some(20)), &catalogue(), off, &config, 0).unwrap();
        assert_eq!(d.model, "large", "auto passes over it");
        let r = decide(
            &request("small", 10, Some(20)),
            &catalogue(),
            off,
            &config,
            0,
        )
        .unwrap_err();
        assert_eq!((r.status, r.code), (404, "model_not_found"));
    }

    #[test]
    fn explicit_models_are_honoured() {
        let d = decide(
            &request("large", 1, Some(1)),
            &catalogue(),
            |_| true,
            &RouterConfig::default(),
            0,
        )
        .unwrap();
        assert_eq!(d.model, "large");
        assert_eq!(d.reason, "requested explicitly");
    }

    #[test]
    fn config_parses_and_validates() {
        let c: RouterConfig = toml::from_str("assumed_output_tokens = 0").unwrap();
        assert_eq!(c.validate().len(), 1);
        assert!(toml::from_str::<RouterConfig>("unknown = 1").is_err());
    }
}
