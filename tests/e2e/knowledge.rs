//! A tenant's knowledge: documents uploaded through the API are cut into chunks, put on
//! `documents`, indexed by the knowledge stage and searched with the tenant's own walls; the
//! FAQ workflow answers from them with citations, and says so when nothing matches.

use serde_json::{json, Value};

use crate::harness::{chat, create_tenant, eventually, get_json, http, Sluice};

/// Stores document `id` for the caller with `key` and waits until it is indexed.
pub async fn store_document(sluice: &Sluice, key: &str, id: &str, body: Value) -> Value {
    let response = http()
        .put(sluice.v1(&format!("/documents/{id}")))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let chunks = accepted["chunks"].clone();
    let title = body["title"].clone();
    eventually(30, "the document indexed", || {
        let (url, key, id, title, chunks) = (
            sluice.v1("/documents"),
            key.to_owned(),
            id.to_owned(),
            title.clone(),
            chunks.clone(),
        );
        async move {
            let (status, listed) = get_json(&url, &key).await;
            (status == 200
                && listed["data"].as_array()?.iter().any(|d| {
                    d["id"] == id.as_str() && d["title"] == title && d["chunks"] == chunks
                }))
            .then_some(())
        }
    })
    .await;
    accepted
}

async fn search(sluice: &Sluice, key: &str, q: &str) -> Vec<Value> {
    let url = format!("{}?q={}", sluice.v1("/documents/search"), urlencode(q));
    let (status, found) = get_json(&url, key).await;
    assert_eq!(status, 200, "{found}");
    found["data"].as_array().unwrap().clone()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn documents_are_indexed_searched_within_their_tenant_replaced_and_deleted() {
    let sluice = Sluice::start();
    let alice = create_tenant(&sluice.prefix);
    let bob = create_tenant(&sluice.prefix);
    let accepted = store_document(
        &sluice,
        &alice.key,
        "returns",
        json!({"title": "Returns policy", "format": "html",
               "content": "<h1>Returns</h1><p>Unused items may be returned within 30 days &amp; refunded.</p><h2>Damaged goods</h2><p>Send a photo of the damage.</p>"}),
    )
    .await;
    assert_eq!(accepted["chunks"], 2, "{accepted}");
    store_document(
        &sluice,
        &alice.key,
        "descaling",
        json!({"title": "Descaling", "content": "Boil water with citric acid, then rinse."}),
    )
    .await;

    let found = search(
        &sluice,
        &alice.key,
        "Can I return an item that arrived damaged?",
    )
    .await;
    assert_eq!(found[0]["document_id"], "returns", "{found:?}");
    assert_eq!(found[0]["heading"], "Damaged goods");
    assert_eq!(found[0]["text"], "Send a photo of the damage.");
    assert!(found.iter().all(|p| p["document_id"] != "descaling"));
    // Another tenant finds none of it, and cannot replace or see it.
    assert!(search(&sluice, &bob.key, "returned damaged refund")
        .await
        .is_empty());
    let (status, listed) = get_json(&sluice.v1("/documents"), &bob.key).await;
    assert_eq!((status, listed["data"].as_array().unwrap().len()), (200, 0));

    // A new version replaces the old one's chunks.
    store_document(
        &sluice,
        &alice.key,
        "returns",
        json!({"title": "Returns policy (2027)", "content": "Returns are accepted within 14 days."}),
    )
    .await;
    assert!(search(&sluice, &alice.key, "damage photo").await.is_empty());
    let found = search(&sluice, &alice.key, "returns").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["title"], "Returns policy (2027)");

    // Deleted, it is gone.
    let response = http()
        .delete(sluice.v1("/documents/returns"))
        .bearer_auth(&alice.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    eventually(30, "the document deleted", || {
        let (url, key) = (sluice.v1("/documents"), alice.key.clone());
        async move {
            let (_, listed) = get_json(&url, &key).await;
            (listed["data"].as_array()?.len() == 1).then_some(())
        }
    })
    .await;
    assert!(search(&sluice, &alice.key, "returns accepted")
        .await
        .is_empty());

    // Bad uploads are 400s naming the field.
    for (id, body, param) in [
        ("a/b", json!({"title": "t", "content": "c"}), "id"),
        ("ok", json!({"title": "", "content": "c"}), "title"),
        (
            "ok",
            json!({"title": "t", "content": "c", "format": "pdf"}),
            "format",
        ),
    ] {
        let response = http()
            .put(format!("{}/{}", sluice.v1("/documents"), urlencode(id)))
            .bearer_auth(&alice.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let error: Value = response.json().await.unwrap();
        assert_eq!(
            (status, error["error"]["param"].as_str()),
            (400, Some(param)),
            "{error}"
        );
    }
}

#[tokio::test]
async fn the_faq_workflow_answers_from_the_tenants_documents_with_citations_or_says_it_cannot() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let other = create_tenant(&sluice.prefix);
    store_document(
        &sluice,
        &tenant.key,
        "descaling",
        json!({"title": "Descaling your kettle", "format": "markdown",
               "content": "# Descaling\n\nFill the kettle with water and citric acid, boil it, and rinse twice."}),
    )
    .await;
    let ask = |key: String, question: &str| {
        let body =
            json!({"model": "workflow/faq", "messages": [{"role": "user", "content": question}]});
        let sluice = &sluice;
        async move { chat(sluice, &key, body).await }
    };
    let (status, body) = ask(tenant.key.clone(), "How do I descale the kettle?").await;
    assert_eq!(status, 200, "{body}");
    let reply = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        reply.ends_with("Sources:\n[1] Descaling your kettle, Descaling (descaling)"),
        "{reply}"
    );
    // Nothing matches: it says so. Another tenant's documents are not its own.
    for (key, question) in [
        (tenant.key.clone(), "What are your opening hours?"),
        (other.key.clone(), "How do I descale the kettle?"),
    ] {
        let (status, body) = ask(key, question).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "I could not find that in our help articles. Would you like me to pass your question to a colleague?"
        );
    }
}
