//! Bad API input gets a 4xx with OpenAI's JSON error shape, never a 5xx.

use serde_json::{json, Value};

use crate::harness::*;

struct Case {
    what: &'static str,
    path: &'static str,
    method: &'static str,
    key: Option<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_4xx_errors() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let key = Some(tenant.key.clone());
    let json_body = |v: Value| v.to_string().into_bytes();
    let valid =
        json_body(json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}));
    let cases = vec![
        Case {
            what: "no key",
            path: "/v1/chat/completions",
            method: "POST",
            key: None,
            content_type: Some("application/json"),
            body: valid.clone(),
            status: 401,
            code: "invalid_api_key",
        },
        Case {
            what: "wrong key",
            path: "/v1/chat/completions",
            method: "POST",
            key: Some("sk-sluice-0000".into()),
            content_type: Some("application/json"),
            body: valid.clone(),
            status: 401,
            code: "invalid_api_key",
        },
        Case {
            what: "foreign key shape",
            path: "/v1/usage",
            method: "GET",
            key: Some("sk-proj-abc".into()),
            content_type: None,
            body: vec![],
            status: 401,
            code: "invalid_api_key",
        },
        Case {
            what: "invalid JSON",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: b"{\"model\": ".to_vec(),
            status: 400,
            code: "invalid_request_error",
        },
        Case {
            what: "missing messages",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: json_body(json!({"model": "auto"})),
            status: 400,
            code: "invalid_request_error",
        },
        Case {
            what: "wrong type",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: json_body(json!({"model": ["auto"], "messages": []})),
            status: 400,
            code: "invalid_request_error",
        },
        Case {
            what: "empty messages",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: json_body(json!({"model": "auto", "messages": []})),
            status: 400,
            code: "invalid_request_error",
        },
        Case {
            what: "bad role",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: json_body(
                json!({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}),
            ),
            status: 400,
            code: "invalid_request_error",
        },
        Case {
            what: "unknown model",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: json_body(
                json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
            ),
            status: 404,
            code: "model_not_found",
        },
        Case {
            what: "context too long for the model",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: json_body(
                json!({"model": "sim-small", "max_tokens": 9000, "messages": [{"role": "user", "content": "x"}]}),
            ),
            status: 400,
            code: "context_length_exceeded",
        },
        Case {
            what: "oversized body",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("application/json"),
            body: vec![b' '; 2 << 20],
            status: 413,
            code: "request_too_large",
        },
        Case {
            what: "not JSON content type",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: Some("text/plain"),
            body: valid.clone(),
            status: 415,
            code: "unsupported_media_type",
        },
        Case {
            what: "no content type",
            path: "/v1/chat/completions",
            method: "POST",
            key: key.clone(),
            content_type: None,
            body: valid.clone(),
            status: 415,
            code: "unsupported_media_type",
        },
        Case {
            what: "unknown route",
            path: "/v1/nothing-here",
            method: "GET",
            key: key.clone(),
            content_type: None,
            body: vec![],
            status: 404,
            code: "unknown_url",
        },
        Case {
            what: "wrong method",
            path: "/v1/chat/completions",
            method: "GET",
            key: key.clone(),
            content_type: None,
            body: vec![],
            status: 405,
            code: "method_not_allowed",
        },
        Case {
            what: "bad usage range",
            path: "/v1/usage?start_time=10&end_time=5",
            method: "GET",
            key: key.clone(),
            content_type: None,
            body: vec![],
            status: 400,
            code: "invalid_request_error",
        },
        Case {
            what: "non-numeric usage range",
            path: "/v1/usage?start_time=yesterday",
            method: "GET",
            key: key.clone(),
            content_type: None,
            body: vec![],
            status: 400,
            code: "invalid_request_error",
        },
    ];
    let client = http();
    for case in cases {
        let url = format!("{}{}", sluice.url, case.path);
        let mut request = match case.method {
            "POST" => client.post(&url).body(case.body.clone()),
            _ => client.get(&url),
        };
        if let Some(key) = &case.key {
            request = request.bearer_auth(key);
        }
        if let Some(ct) = case.content_type {
            request = request.header("content-type", ct);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.what));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, case.status, "{}: {text}", case.what);
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: not JSON: {text}", case.what));
        assert_eq!(body["error"]["code"], case.code, "{}: {text}", case.what);
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            case.what
        );
        assert!(body["error"]["type"].is_string(), "{}", case.what);
    }

    // After all that, the service is still healthy and answering.
    let (status, _) = chat(&sluice, &tenant.key, json!({"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "still there?"}]})).await;
    assert_eq!(status, 200);
}

#[test]
fn the_catalogue_refuses_models_it_cannot_serve_and_says_why() {
    let prefix = unique("t");
    let refused = |args: &[&str]| {
        let output = sluice(&prefix).args(args).output().unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    // A provider kind outside the closed set, named with the ones there are.
    let error = refused(&["model", "add", "m", "--provider", "anthropic"]);
    assert!(
        error.contains("anthropic") && error.contains("sim, openai"),
        "{error}"
    );
    // Every problem with the model at once, before the catalogue is touched.
    let error = refused(&[
        "model",
        "add",
        "auto",
        "--provider",
        "openai",
        "--context-window",
        "0",
    ]);
    for problem in ["auto", "base URL", "context window"] {
        assert!(error.contains(problem), "{problem}: {error}");
    }
}
