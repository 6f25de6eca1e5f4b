//! Users and their sessions, and a tenant's administration over the API: registration, login,
//! refresh-token rotation and reuse, logout; keys and members managed by a tenant admin and by
//! nobody else; every action in the audit log; another tenant's admin sees and touches nothing.

use serde_json::{json, Value};

use crate::harness::*;

/// POSTs JSON with an optional bearer token: status and body.
async fn post(url: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = http().post(url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The status `/v1/auth/refresh` answers for `token`.
async fn refresh_status(sluice: &Sluice, token: &str) -> u16 {
    post(
        &sluice.v1("/auth/refresh"),
        None,
        json!({ "refresh_token": token }),
    )
    .await
    .0
}

/// A freshly registered tenant: its admin's email, password and session.
struct Registered {
    email: String,
    password: String,
    session: Value,
}

impl Registered {
    fn access(&self) -> &str {
        self.session["access_token"].as_str().unwrap()
    }
    fn tenant(&self) -> &str {
        self.session["tenant_id"].as_str().unwrap()
    }
}

async fn register(sluice: &Sluice) -> Registered {
    let (email, session) = register_tenant_admin(sluice).await;
    assert_eq!(session["role"], "tenant_admin");
    Registered {
        email,
        password: ADMIN_PASSWORD.to_owned(),
        session,
    }
}

#[tokio::test]
async fn a_user_registers_logs_in_refreshes_and_logs_out() {
    let sluice = Sluice::start();
    let admin = register(&sluice).await;
    // The access token works on every route, as a key does.
    let (status, body) = chat(
        &sluice,
        admin.access(),
        json!({"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, me) = get_json(&sluice.v1("/me"), admin.access()).await;
    assert_eq!((status, me["id"].as_str()), (200, Some(admin.tenant())));

    // Wrong password, unknown email: the same 401.
    for (email, password) in [
        (admin.email.as_str(), "not the password"),
        ("nobody@example.com", admin.password.as_str()),
    ] {
        let (status, body) = post(
            &sluice.v1("/auth/login"),
            None,
            json!({ "email": email, "password": password }),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["type"], "authentication_error");
    }
    let (status, login) = post(
        &sluice.v1("/auth/login"),
        None,
        json!({ "email": admin.email.to_uppercase(), "password": admin.password }),
    )
    .await;
    assert_eq!(status, 200, "emails are not case-sensitive: {login}");

    // Refresh rotates: the new pair works, the old refresh token is spent, and using it again
    // ends the whole session (someone else has a copy).
    let first = login["refresh_token"].as_str().unwrap().to_owned();
    let (status, rotated) = post(
        &sluice.v1("/auth/refresh"),
        None,
        json!({ "refresh_token": first }),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let second = rotated["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    let (status, _) = get_json(&sluice.v1("/me"), rotated["access_token"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(refresh_status(&sluice, &first).await, 401, "spent");
    assert_eq!(
        refresh_status(&sluice, &second).await,
        401,
        "a reused token ends its whole session"
    );

    // Logout ends the registration's session.
    let refresh = admin.session["refresh_token"].as_str().unwrap();
    let (status, _) = post(
        &sluice.v1("/auth/logout"),
        None,
        json!({ "refresh_token": refresh }),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(refresh_status(&sluice, refresh).await, 401);

    // Bad input: 400 in OpenAI's shape, naming the field.
    let (status, body) = post(
        &sluice.v1("/auth/register"),
        None,
        json!({ "tenant": "x", "email": "no-at", "password": "short" }),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&sluice.v1("/auth/login"), None, json!({ "email": 3 })).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("email")),
        "{body}"
    );
    let (status, body) = post(
        &sluice.v1("/auth/register"),
        None,
        json!({ "tenant": unique("org-"), "email": admin.email, "password": admin.password }),
    )
    .await;
    assert_eq!(status, 400, "the email is taken: {body}");
}

#[tokio::test]
async fn a_tenant_admin_manages_keys_and_members_and_the_audit_log_records_it() {
    let sluice = Sluice::start();
    let admin = register(&sluice).await;
    let token = admin.access().to_owned();

    let (status, created) = post(&sluice.v1("/keys"), Some(&token), json!({ "name": "ci" })).await;
    assert_eq!(status, 201, "{created}");
    let key = created["api_key"].as_str().unwrap().to_owned();
    let (status, _) = get_json(&sluice.v1("/me"), &key).await;
    assert_eq!(status, 200, "the new key works");
    let (status, listed) = get_json(&sluice.v1("/keys"), &token).await;
    assert_eq!(status, 200);
    let text = listed.to_string();
    assert!(text.contains(created["prefix"].as_str().unwrap()));
    assert!(!text.contains(&key[16..]), "never the secret");

    let id = created["id"].as_str().unwrap();
    let (status, rotated) = post(
        &sluice.v1(&format!("/keys/{id}/rotate")),
        Some(&token),
        json!({ "grace_secs": 0 }),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let new_key = rotated["api_key"].as_str().unwrap().to_owned();
    eventually(5, "the rotated key to stop", || async {
        (get_json(&sluice.v1("/me"), &key).await.0 == 401).then_some(())
    })
    .await;
    assert_eq!(get_json(&sluice.v1("/me"), &new_key).await.0, 200);
    let new_id = rotated["id"].as_str().unwrap();
    let (status, _) = post(
        &sluice.v1(&format!("/keys/{new_id}/revoke")),
        Some(&token),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    eventually(5, "the revoked key to stop", || async {
        (get_json(&sluice.v1("/me"), &new_key).await.0 == 401).then_some(())
    })
    .await;

    // A member uses the API but cannot administer; nor can an API key.
    let member_email = format!("{}@example.com", unique("member-"));
    let (status, member) = post(
        &sluice.v1("/members"),
        Some(&token),
        json!({ "email": member_email, "password": "member password 1" }),
    )
    .await;
    assert_eq!(
        (status, member["role"].as_str()),
        (201, Some("member")),
        "{member}"
    );
    let (status, session) = post(
        &sluice.v1("/auth/login"),
        None,
        json!({ "email": member_email, "password": "member password 1" }),
    )
    .await;
    assert_eq!(status, 200);
    let member_token = session["access_token"].as_str().unwrap();
    let (status, _) = get_json(&sluice.v1("/usage"), member_token).await;
    assert_eq!(status, 200);
    let (status, body) = post(&sluice.v1("/keys"), Some(member_token), json!({})).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (403, Some("permission_error"))
    );
    let (_, another) = post(&sluice.v1("/keys"), Some(&token), json!({})).await;
    let (status, _) = get_json(&sluice.v1("/keys"), another["api_key"].as_str().unwrap()).await;
    assert_eq!(status, 403, "API keys cannot manage keys");
    let (status, members) = get_json(&sluice.v1("/members"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(members["data"].as_array().unwrap().len(), 2, "{members}");

    // Everything above is in the audit log: who, what, to what, from where.
    let (status, log) = get_json(&sluice.v1("/audit"), &token).await;
    assert_eq!(status, 200);
    let actions: Vec<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.create",
            "member.add",
            "key.revoke",
            "key.rotate",
            "key.create",
            "tenant.register"
        ],
        "newest first: {log}"
    );
    let entry = &log["data"][2];
    assert_eq!(entry["actor"], format!("user:{}", admin.email));
    assert_eq!(entry["source"], "127.0.0.1");
    assert!(new_key.starts_with(entry["target"].as_str().unwrap()));
    let (status, _) = get_json(&sluice.v1("/audit"), member_token).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn another_tenants_admin_sees_and_touches_nothing_of_the_first() {
    let sluice = Sluice::start();
    let alice = register(&sluice).await;
    let bob = register(&sluice).await;
    let (_, alices_key) = post(
        &sluice.v1("/keys"),
        Some(alice.access()),
        json!({ "name": "a" }),
    )
    .await;
    let alices_key_id = alices_key["id"].as_str().unwrap();
    let alices_origin = format!("https://{}.example", unique("alice-"));
    let response = http()
        .put(sluice.v1("/tenant/origins"))
        .bearer_auth(alice.access())
        .json(&json!({ "origins": [alices_origin] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);

    for path in ["/keys", "/members", "/audit", "/tenant/origins"] {
        let (status, body) = get_json(&sluice.v1(path), bob.access()).await;
        assert_eq!(status, 200);
        let text = body.to_string();
        assert!(
            !text.contains(alices_key_id)
                && !text.contains(&alice.email)
                && !text.contains(&alices_origin),
            "{path}: {text}"
        );
    }
    for action in ["revoke", "rotate"] {
        let (status, body) = post(
            &sluice.v1(&format!("/keys/{alices_key_id}/{action}")),
            Some(bob.access()),
            json!({}),
        )
        .await;
        assert_eq!(status, 404, "{action}: {body}");
    }
    assert_eq!(
        get_json(&sluice.v1("/me"), alices_key["api_key"].as_str().unwrap())
            .await
            .0,
        200
    );

    // A platform admin (made by an operator) administers any tenant, naming it.
    let session = platform_admin_session(&sluice).await;
    let token = session["access_token"].as_str().unwrap();
    let response = http()
        .get(sluice.v1("/keys"))
        .bearer_auth(token)
        .header("x-sluice-tenant", alice.tenant())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.text().await.unwrap().contains(alices_key_id));
    let (status, _) = get_json(&sluice.v1("/keys"), token).await;
    assert_eq!(status, 400, "a platform admin names the tenant");
    let (status, _) = get_json(&sluice.v1("/me"), token).await;
    assert_eq!(
        status, 403,
        "a platform admin's session is no tenant's caller"
    );
}

#[tokio::test]
async fn the_audit_log_is_append_only_for_every_role() {
    let prefix = unique("t");
    let tenant = create_tenant(&prefix);
    let out = run_cli(&prefix, &["audit", "--tenant", &tenant.name, "--json"]);
    let entry: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(entry["action"], "tenant.create");
    assert!(entry["actor"].as_str().unwrap().starts_with("cli:"));
    for url in [app_database_url(), admin_database_url()] {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT set_config('sluice.tenant_id', $1, true)")
            .bind(&tenant.id)
            .execute(&mut *tx)
            .await
            .unwrap();
        let changed =
            sqlx::query("UPDATE audit_log SET actor = 'someone else' WHERE tenant_id::text = $1")
                .bind(&tenant.id)
                .execute(&mut *tx)
                .await;
        assert!(changed.is_err(), "{url} could change the audit log");
    }
}

#[tokio::test]
async fn the_openapi_document_names_exactly_what_is_served() {
    let sluice = Sluice::start();
    let doc: Value = http()
        .get(format!("{}/openapi.json", sluice.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 14, "{paths:?}");
    for (path, operations) in paths {
        let url = format!(
            "{}{}",
            sluice.url,
            path.replace("{id}", &uuid::Uuid::new_v4().to_string())
        );
        for method in operations.as_object().unwrap().keys() {
            let request = match method.as_str() {
                "get" => http().get(&url),
                "post" => http().post(&url).json(&json!({})),
                "put" => http().put(&url).json(&json!({})),
                "patch" => http().patch(&url).json(&json!({})),
                "delete" => http().delete(&url).json(&json!({})),
                other => panic!("{other} {path}"),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert!(
                status != 405 && body["error"]["code"] != "unknown_url",
                "{method} {path} is documented but not served: {status} {body}"
            );
        }
    }
}

#[tokio::test]
async fn a_tenant_exports_everything_it_owns_and_deletes_itself() {
    let sluice = Sluice::start();
    let admin = register(&sluice).await;
    let other = register(&sluice).await;
    let (_, key) = post(
        &sluice.v1("/keys"),
        Some(admin.access()),
        json!({ "name": "export" }),
    )
    .await;
    let key = key["api_key"].as_str().unwrap().to_owned();
    let (status, _) = chat(&sluice, &key, json!({"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "export me"}]})).await;
    assert_eq!(status, 200);
    eventually(30, "the usage facts", || async {
        let (_, usage) = get_json(&sluice.v1("/usage"), &key).await;
        (usage["totals"]["requests"] == 1).then_some(())
    })
    .await;

    let (status, export) = get_json(&sluice.v1("/tenant/export"), admin.access()).await;
    assert_eq!(status, 200, "{export}");
    assert_eq!(export["tenant"]["id"], admin.tenant());
    assert_eq!(export["usage_events"].as_array().unwrap().len(), 1);
    assert_eq!(export["users"][0]["email"], admin.email.as_str());
    assert_eq!(export["api_keys"].as_array().unwrap().len(), 1);
    assert!(!export["audit_log"].as_array().unwrap().is_empty());
    for business in [
        "customers",
        "orders",
        "tickets",
        "conversation_turns",
        "documents",
        "tools",
        "workflow_runs",
    ] {
        assert!(export[business].is_array(), "{business} in the export");
    }
    let text = export.to_string();
    assert!(
        !text.contains(&key[16..]) && !text.contains("argon2"),
        "no secrets in an export"
    );
    let (_, theirs) = get_json(&sluice.v1("/tenant/export"), other.access()).await;
    let theirs = theirs.to_string();
    assert!(!theirs.contains(admin.tenant()) && !theirs.contains(&admin.email));
    assert_eq!(
        get_json(&sluice.v1("/tenant/export"), &key).await.0,
        403,
        "keys cannot export"
    );

    // Deletion needs the tenant's name; then its keys, tokens and sessions stop at once.
    let delete = |confirm: String| {
        let (url, token) = (sluice.v1("/tenant"), admin.access().to_owned());
        async move {
            let response = http()
                .delete(url)
                .bearer_auth(token)
                .json(&json!({ "confirm": confirm }))
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }
    };
    assert_eq!(delete("not the name".into()).await, 400);
    let name = export["tenant"]["name"].as_str().unwrap().to_owned();
    // Operators get the same document from the CLI.
    let by_cli: Value = serde_json::from_str(&sluice.cli(&["tenant", "export", &name])).unwrap();
    assert_eq!(by_cli["usage_events"], export["usage_events"]);
    assert_eq!(by_cli["tenant"], export["tenant"]);
    assert_eq!(delete(name.clone()).await, 200);
    eventually(5, "the deleted tenant's key and token to stop", || async {
        let key_refused = get_json(&sluice.v1("/me"), &key).await.0 == 401;
        let token_refused = get_json(&sluice.v1("/usage"), admin.access()).await.0 == 401;
        (key_refused && token_refused).then_some(())
    })
    .await;
    let refresh = admin.session["refresh_token"].as_str().unwrap();
    assert_eq!(refresh_status(&sluice, refresh).await, 401);
    assert_eq!(
        get_json(&sluice.v1("/me"), other.access()).await.0,
        200,
        "the other tenant is untouched"
    );

    // The purge removes its rows; the audit log and the usage facts stay.
    let out = run_cli(
        &sluice.prefix,
        &["tenant", "purge", "--older-than-days", "0"],
    );
    assert!(out.contains(&name), "{out}");
    let owner = sqlx::PgPool::connect(&admin_database_url()).await.unwrap();
    let (tenants, audit): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tenants WHERE id::text = $1), (SELECT count(*) FROM audit_log WHERE tenant_id::text = $1)",
    )
    .bind(admin.tenant())
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(tenants, 0);
    assert!(audit >= 3, "register, key, export, delete: {audit}");
    let facts: u64 = clickhouse()
        .query("SELECT count() FROM usage_events FINAL WHERE tenant_id = ?")
        .bind(admin.tenant())
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(facts, 1, "usage facts are kept for invoicing");
}

#[tokio::test]
async fn a_feature_flag_turns_chat_off_for_one_tenant_without_a_restart() {
    let sluice = Sluice::start();
    let (a, b) = (create_tenant(&sluice.prefix), create_tenant(&sluice.prefix));
    let ask = || json!({"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "flag"}]});
    assert_eq!(chat(&sluice, &a.key, ask()).await.0, 200);
    run_cli(
        &sluice.prefix,
        &["flag", "set", "chat", "off", "--tenant", &a.name],
    );
    let listed = run_cli(&sluice.prefix, &["flag", "list", "--json"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&a.name) && l.contains("\"enabled\":false")),
        "{listed}"
    );
    let body = eventually(5, "chat off for the tenant", || async {
        let (status, body) = chat(&sluice, &a.key, ask()).await;
        (status == 403).then_some(body)
    })
    .await;
    assert_eq!(body["error"]["code"], "feature_disabled", "{body}");
    assert_eq!(
        chat(&sluice, &b.key, ask()).await.0,
        200,
        "another tenant is untouched"
    );
    run_cli(
        &sluice.prefix,
        &["flag", "unset", "chat", "--tenant", &a.name],
    );
    eventually(5, "chat on again", || async {
        (chat(&sluice, &a.key, ask()).await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn self_registered_tenants_land_on_the_configured_plan() {
    let prefix = unique("t");
    let plan = unique("plan-");
    run_cli(
        &prefix,
        &["plan", "create", &plan, "--requests-per-minute", "30"],
    );
    let sluice = Sluice::start_with(
        &prefix,
        vec![("SLUICE_EDGE__REGISTRATION_PLAN".into(), plan.clone())],
    );
    let admin = register(&sluice).await;
    let (status, me) = get_json(&sluice.v1("/me"), admin.access()).await;
    assert_eq!(status, 200);
    assert_eq!(me["plan"]["name"], plan.as_str(), "{me}");
    assert_eq!(me["plan"]["limits"]["requests_per_minute"], 30);
}

/// GET `url` with `key` and an `Origin`: status, and the `Access-Control-Allow-Origin` sent.
async fn from_origin(url: &str, key: &str, origin: &str) -> (u16, Option<String>) {
    let response = http()
        .get(url)
        .bearer_auth(key)
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    let allowed = response
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), allowed)
}

/// A preflight for `POST url` from `origin`: status and `Access-Control-Allow-Origin`.
async fn preflight(url: &str, origin: &str) -> (u16, Option<String>) {
    let response = http()
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    let allowed = response
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), allowed)
}

#[tokio::test]
async fn browsers_reach_the_api_only_from_their_tenants_origins() {
    let sluice = Sluice::start();
    let admin = register(&sluice).await;
    let token = admin.access().to_owned();
    let other = create_tenant(&sluice.prefix);
    let app = "https://app.example.com";
    let chat = sluice.v1("/chat/completions");

    // Preflights are answered from every tenant's lists at once (they carry no credentials),
    // and other tests' tenants share this database: an origin no tenant lists is unique.
    let unlisted = format!("https://{}.example", unique("nobody-"));
    assert_eq!(preflight(&chat, &unlisted).await.0, 403);
    let put = |origins: Value| {
        let (url, token) = (sluice.v1("/tenant/origins"), token.clone());
        async move {
            let response = http()
                .put(url)
                .bearer_auth(token)
                .json(&json!({ "origins": origins }))
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, body) = put(json!(["https://App.Example.com/", "http://localhost:5173"])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["origins"],
        json!(["http://localhost:5173", app]),
        "normalized"
    );
    let (status, body) = put(json!(["app.example.com"])).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        get_json(&sluice.v1("/tenant/origins"), &token).await.1["origins"],
        json!(["http://localhost:5173", app])
    );
    // A key of this tenant's, and the other tenant's.
    let (_, created) = post(&sluice.v1("/keys"), Some(&token), json!({ "name": "web" })).await;
    let key = created["api_key"].as_str().unwrap().to_owned();

    let (status, allowed) = eventually(10, "every edge to follow the new list", || async {
        let answer = preflight(&chat, app).await;
        (answer.0 == 204).then_some(answer)
    })
    .await;
    assert_eq!((status, allowed.as_deref()), (204, Some(app)));

    let me = sluice.v1("/me");
    assert_eq!(
        from_origin(&me, &key, app).await,
        (200, Some(app.to_owned()))
    );
    let (status, _) = from_origin(&me, &other.key, app).await;
    assert_eq!(status, 403, "another tenant's key from this tenant's app");
    assert_eq!(from_origin(&me, &key, "https://evil.example").await.0, 403);
    assert_eq!(
        get_json(&me, &other.key).await.0,
        200,
        "no Origin: not a browser, not affected"
    );

    // WebSockets: browsers always send Origin.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws = |key: String, origin: &'static str| {
        let url = format!(
            "ws://{}/v1/chat/stream",
            sluice.url.trim_start_matches("http://")
        );
        async move {
            let mut request = url.into_client_request().unwrap();
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
            tokio_tungstenite::connect_async(request)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    assert!(ws(key.clone(), "https://app.example.com").await.is_ok());
    let refused = ws(other.key.clone(), "https://app.example.com")
        .await
        .unwrap_err();
    assert!(refused.contains("403"), "{refused}");

    // Operators: `sluice tenant origins` (a `*`, which would open every preflight for every
    // test sharing this database, is left to the unit tests).
    sluice.cli(&["tenant", "origins", &other.name, "--set", &unlisted]);
    assert_eq!(
        sluice.cli(&["tenant", "origins", &other.name]).trim(),
        unlisted
    );
    eventually(10, "the other tenant's origin to apply", || async {
        (from_origin(&me, &other.key, &unlisted).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(
        from_origin(&me, &key, &unlisted).await.0,
        403,
        "still not this tenant's"
    );
    sluice.cli(&["tenant", "origins", &other.name, "--clear"]);
    eventually(10, "the cleared list to apply", || async {
        (from_origin(&me, &other.key, &unlisted).await.0 == 403).then_some(())
    })
    .await;
    let (_, audit) = get_json(&sluice.v1("/audit"), &token).await;
    assert!(audit.to_string().contains("tenant.origins"), "{audit}");
}

/// Sends `method` to `url` with `token` and a JSON body: status and body.
async fn call(method: reqwest::Method, url: &str, token: &str, body: Value) -> (u16, Value) {
    let response = http()
        .request(method, url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_platform_admin_manages_plans_and_tenants_over_the_api() {
    use reqwest::Method;
    let sluice = Sluice::start();
    let session = platform_admin_session(&sluice).await;
    let token = session["access_token"].as_str().unwrap().to_owned();
    let plan = unique("plan-");
    let plans = sluice.v1("/admin/plans");

    let (status, created) = call(
        Method::POST,
        &plans,
        &token,
        json!({"name": plan, "requests_per_minute": 2, "monthly_tokens": 100000}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["requests_per_minute"], 2);
    assert_eq!(created["tokens_per_minute"], Value::Null);
    let (status, again) = call(Method::POST, &plans, &token, json!({"name": plan})).await;
    assert_eq!(status, 400, "a taken name: {again}");
    let (status, bad) = call(
        Method::POST,
        &plans,
        &token,
        json!({"name": plan, "requests_per_minute": -1}),
    )
    .await;
    assert_eq!(
        (status, bad["error"]["param"].as_str()),
        (400, Some("requests_per_minute"))
    );

    // A tenant on the plan: its key is held to it at once.
    let tenants = sluice.v1("/admin/tenants");
    let name = unique("org-");
    let (status, tenant) = call(
        Method::POST,
        &tenants,
        &token,
        json!({"name": name, "plan": plan}),
    )
    .await;
    assert_eq!(status, 201, "{tenant}");
    let key = tenant["api_key"].as_str().unwrap().to_owned();
    let tenant_id = tenant["tenant_id"].as_str().unwrap().to_owned();
    let body = json!({"model": "sim-small", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(chat(&sluice, &key, body.clone()).await.0, 200);
    assert_eq!(chat(&sluice, &key, body.clone()).await.0, 200);
    assert_eq!(
        chat(&sluice, &key, body.clone()).await.0,
        429,
        "2 requests a minute"
    );
    let (_, listed) = get_json(&tenants, &token).await;
    let row = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap();
    assert_eq!(row["plan"], plan.as_str());
    assert_eq!(row["status"], "active");

    // PATCH changes what it names; null removes a limit.
    let (status, changed) = call(
        Method::PATCH,
        &format!("{plans}/{plan}"),
        &token,
        json!({"requests_per_minute": null, "tokens_per_minute": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["requests_per_minute"], Value::Null);
    assert_eq!(changed["tokens_per_minute"], 5000);
    assert_eq!(changed["monthly_tokens"], 100000, "left as it was");
    assert_eq!(changed["tenants"], 1);
    eventually(10, "the lifted limit to apply", || async {
        (chat(&sluice, &key, body.clone()).await.0 == 200).then_some(())
    })
    .await;

    // A plan with tenants on it cannot go; moved to another, it can.
    let (status, _) = call(
        Method::DELETE,
        &format!("{plans}/{plan}"),
        &token,
        json!({}),
    )
    .await;
    assert_eq!(status, 400);
    let other = unique("plan-");
    assert_eq!(
        call(Method::POST, &plans, &token, json!({"name": other}))
            .await
            .0,
        201
    );
    let (status, moved) = call(
        Method::PUT,
        &format!("{tenants}/{tenant_id}/plan"),
        &token,
        json!({"plan": other}),
    )
    .await;
    assert_eq!(status, 200, "{moved}");
    let plan_url = format!("{plans}/{plan}");
    let delete_plan = || call(Method::DELETE, &plan_url, &token, json!({}));
    assert_eq!(delete_plan().await.0, 200);
    assert_eq!(delete_plan().await.0, 404, "deleted once");
    let (status, _) = call(
        Method::PUT,
        &format!("{tenants}/{}/plan", uuid::Uuid::new_v4()),
        &token,
        json!({"plan": other}),
    )
    .await;
    assert_eq!(status, 404, "no such tenant");
    sluice.cli(&["tenant", "delete", &name]);
    let (status, _) = call(
        Method::PUT,
        &format!("{tenants}/{tenant_id}/plan"),
        &token,
        json!({"plan": other}),
    )
    .await;
    assert_eq!(status, 404, "a deleted tenant takes no plan");

    // Nobody else gets in: a tenant admin, a member's key, no credentials.
    let tenant_admin = register(&sluice).await;
    for credential in [tenant_admin.access(), key.as_str()] {
        assert_eq!(get_json(&plans, credential).await.0, 403);
        assert_eq!(
            call(
                Method::POST,
                &tenants,
                credential,
                json!({"name": unique("x-")})
            )
            .await
            .0,
            403
        );
    }
    assert_eq!(
        http().get(&plans).send().await.unwrap().status().as_u16(),
        401
    );

    // Every change is in the audit log: the plans' with no tenant, the tenant's under it.
    let audit = sluice.cli(&["audit"]);
    for action in ["plan.create", "plan.update", "plan.delete"] {
        assert!(audit.contains(action), "{action} in {audit}");
    }
    let audit = sluice.cli(&["audit", "--tenant", &name]);
    assert!(
        audit.contains("tenant.create") && audit.contains("tenant.plan"),
        "{audit}"
    );

    // A platform admin disabled while its token is still valid is out at once.
    let pool = sqlx::PgPool::connect(&admin_database_url()).await.unwrap();
    sqlx::query("UPDATE users SET disabled_at = now() WHERE id = $1::uuid")
        .bind(session["user_id"].as_str().unwrap())
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(get_json(&plans, &token).await.0, 401);
    let response = http()
        .get(sluice.v1("/keys"))
        .bearer_auth(&token)
        .header("x-sluice-tenant", tenant_admin.tenant())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        401,
        "nor does it administer a tenant by naming it"
    );
}

#[tokio::test]
async fn an_address_that_keeps_guessing_passwords_is_slowed_down() {
    // Three attempts a minute, counted under this test's own Redis keys.
    let sluice = Sluice::start_with(
        &unique("t"),
        vec![
            (
                "SLUICE_EDGE__LIMITS__LOGIN_ATTEMPTS_PER_MINUTE".to_owned(),
                "3".to_owned(),
            ),
            ("SLUICE_REDIS__KEY_PREFIX".to_owned(), unique("login-")),
        ],
    );
    let admin = register(&sluice).await; // the first attempt
    let login = |password: &'static str| {
        let (url, email) = (sluice.v1("/auth/login"), admin.email.clone());
        async move {
            let response = http()
                .post(url)
                .json(&json!({ "email": email, "password": password }))
                .send()
                .await
                .unwrap();
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (response.status().as_u16(), retry)
        }
    };
    assert_eq!(login("wrong guess one").await.0, 401);
    assert_eq!(login("wrong guess two").await.0, 401);
    let (status, retry) = login("wrong guess three").await;
    assert_eq!(
        status, 429,
        "the fourth attempt from this address in a minute"
    );
    let retry = retry.expect("Retry-After");
    assert!(
        (1..=20).contains(&retry),
        "one attempt refills every 20 s: {retry}"
    );
    assert_eq!(
        login("a long enough password").await.0,
        429,
        "the right password waits too"
    );
}

#[tokio::test]
async fn an_operator_switches_a_model_off_for_one_tenant_and_the_router_follows() {
    let sluice = Sluice::start();
    let (a, b) = (create_tenant(&sluice.prefix), create_tenant(&sluice.prefix));
    let ask = |model: &str| json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "switch"}]});
    let (status, body) = chat(&sluice, &a.key, ask("auto")).await;
    assert_eq!(
        (status, body["model"].as_str()),
        (200, Some("sim-small")),
        "the cheapest"
    );
    run_cli(
        &sluice.prefix,
        &["flag", "set", "model.sim-small", "off", "--tenant", &a.name],
    );
    let refused = eventually(
        10,
        "the router to stop serving sim-small to the tenant",
        || async {
            let (status, body) = chat(&sluice, &a.key, ask("sim-small")).await;
            (status == 404).then_some(body)
        },
    )
    .await;
    assert_eq!(refused["error"]["code"], "model_not_found", "{refused}");
    let (status, body) = chat(&sluice, &a.key, ask("auto")).await;
    assert_eq!(
        (status, body["model"].as_str()),
        (200, Some("sim-large")),
        "auto passes over it"
    );
    assert_eq!(
        chat(&sluice, &b.key, ask("sim-small")).await.0,
        200,
        "another tenant is untouched"
    );
    run_cli(
        &sluice.prefix,
        &["flag", "unset", "model.sim-small", "--tenant", &a.name],
    );
    eventually(10, "sim-small back for the tenant", || async {
        (chat(&sluice, &a.key, ask("sim-small")).await.0 == 200).then_some(())
    })
    .await;
}
