use super::definition::{StepKind, Test};
use super::*;

#[test]
fn every_shipped_workflow_loads() {
    for (file, text) in SHIPPED {
        let workflow = load(file, text).unwrap_or_else(|errors| {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("{file}:\n{}", errors.join("\n"))
        });
        assert!(file.ends_with(&format!("/{}.yaml", workflow.name)));
        assert!(!workflow.steps.is_empty());
    }
}

#[test]
fn a_definition_reads_into_its_steps() {
    let (file, text) = SHIPPED
        .iter()
        .find(|(f, _)| f.ends_with("create_order.yaml"))
        .unwrap();
    let workflow = load(file, text).unwrap();
    assert_eq!(workflow.version, 1);
    assert_eq!(workflow.inputs.len(), 2);
    let reserve = workflow.steps.iter().find(|s| s.id == "reserve").unwrap();
    let StepKind::Tool {
        tool, compensate, ..
    } = &reserve.kind
    else {
        panic!("a tool step")
    };
    assert_eq!(tool, "reserve_stock");
    assert_eq!(compensate.as_ref().unwrap().tool, "release_stock");
    assert_eq!(reserve.on_error.as_deref(), Some("cancel"));
    let confirm = workflow.steps.iter().find(|s| s.id == "confirm").unwrap();
    let StepKind::Tool { arguments, .. } = &confirm.kind else {
        panic!("a tool step")
    };
    assert_eq!(arguments["status"], "paid");

    let (file, text) = SHIPPED
        .iter()
        .find(|(f, _)| f.ends_with("customer_support.yaml"))
        .unwrap();
    let support = load(file, text).unwrap();
    let StepKind::Branch { cases } = &support.steps[1].kind else {
        panic!("a branch")
    };
    assert_eq!(
        cases[0].condition.as_ref().unwrap().reference,
        "steps.triage.json.intent"
    );
    assert_eq!(
        cases[0].condition.as_ref().unwrap().test,
        Test::Equals(serde_json::json!("order"))
    );
    assert!(cases[3].condition.is_none());
}

/// The errors loading `yaml` as `workflows/w.yaml`, as `line:field: message`.
fn errors(yaml: &str) -> Vec<String> {
    match load("workflows/w.yaml", yaml) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| {
                assert_eq!(e.file, "workflows/w.yaml");
                format!("{}:{}: {}", e.line, e.field, e.message)
            })
            .collect(),
    }
}

fn assert_error(yaml: &str, line: usize, field: &str, says: &str) {
    let found = errors(yaml);
    assert!(
        found
            .iter()
            .any(|e| e.starts_with(&format!("{line}:{field}: ")) && e.contains(says)),
        "expected {line}:{field}: …{says}… in {found:#?}"
    );
}

const HEAD: &str = "name: w\nversion: 1\ndescription: d\n";

#[test]
fn mistakes_are_refused_with_their_line_and_field() {
    // Line numbers count HEAD's three lines.
    assert_error("name: w\nversion: [1\n", 3, "(file)", "invalid YAML");
    assert_error(
        &format!("{HEAD}colour: blue\nsteps:\n  - id: a\n    end: {{}}\n"),
        4,
        "colour",
        "unknown field",
    );
    assert_error(
        "name: other\nversion: 1\ndescription: d\nsteps:\n  - id: a\n    end: {}\n",
        1,
        "name",
        "file's name",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    teleport: x\n"),
        6,
        "steps[0].teleport",
        "unknown field",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    tool: launch_rocket\n"),
        6,
        "steps[0].tool",
        "no tool named \"launch_rocket\"",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    tool: list_orders\n    arguments:\n      customer_id: c\n      limit: many\n"),
        9,
        "steps[0].arguments.limit",
        "expected an integer",
    );
    assert_error(
        &format!(
            "{HEAD}steps:\n  - id: a\n    tool: lookup_order\n    arguments:\n      order: A-1\n"
        ),
        8,
        "steps[0].arguments.order_id",
        "needs this argument",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    tool: update_order_status\n    arguments:\n      order_id: A\n      status: lost\n"),
        9,
        "steps[0].arguments.status",
        "one of",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    model: auto\n    prompt: Hi ${{inputs.nobody}}\n"),
        7,
        "steps[0].prompt",
        "no input named \"nobody\"",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    model: auto\n    prompt: ${{steps.b.text}}\n  - id: b\n    model: auto\n    prompt: x\n"),
        7,
        "steps[0].prompt",
        "has not answered on every way to here",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    model: auto\n    prompt: x\n    next: nowhere\n"),
        8,
        "steps[0].next",
        "no step has the id \"nowhere\"",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    end: {{}}\n  - id: b\n    end: {{}}\n"),
        7,
        "steps[1]",
        "no step leads to \"b\"",
    );
    assert_error(
        &format!(
            "{HEAD}steps:\n  - id: a\n    model: auto\n    tool: lookup_order\n    prompt: x\n"
        ),
        5,
        "steps[0]",
        "one kind",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    wait: {{event: paid, timeout_s: soon}}\n    on_timeout: a\n"),
        6,
        "steps[0].wait.timeout_s",
        "whole number",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    model: auto\n    prompt: x\n  - id: b\n    branch:\n      - if: ${{steps.a.text}} ~ 3\n        next: a\n      - next: a\n"),
        10,
        "steps[1].branch[0].if",
        "expected `${reference}`",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    model: auto\n    prompt: x\n    arguments: {{}}\n"),
        8,
        "steps[0].arguments",
        "not a field of a model step",
    );
    assert_error(
        &format!("{HEAD}inputs:\n  n:\n    type: float\nsteps:\n  - id: a\n    end: {{}}\n"),
        6,
        "inputs.n.type",
        "expected one of string",
    );
}

#[test]
fn every_mistake_is_reported_at_once() {
    let found = errors(&format!(
        "{HEAD}steps:\n  - id: a\n    tool: nope\n  - id: a\n    model: auto\n"
    ));
    assert!(found.len() >= 3, "{found:#?}");
}

#[test]
fn the_run_s_ways_are_checked() {
    // A step a branch may skip has not answered on every way.
    assert_error(
        &format!("{HEAD}steps:\n  - id: pick\n    branch:\n      - if: ${{message}} == \"x\"\n        next: look\n      - next: say\n  - id: look\n    tool: lookup_order\n    arguments: {{order_id: A}}\n  - id: say\n    end:\n      reply: ${{steps.look.order}}\n"),
        15,
        "steps[2].end.reply",
        "has not answered on every way",
    );
    // A failed step's answer is not there on its on_error way.
    assert_error(
        &format!("{HEAD}steps:\n  - id: look\n    tool: lookup_order\n    arguments: {{order_id: A}}\n    on_error: sorry\n  - id: done\n    end: {{}}\n  - id: sorry\n    end:\n      reply: ${{steps.look.found}}\n"),
        13,
        "steps[2].end.reply",
        "has not answered",
    );
    // No loops.
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    model: auto\n    prompt: x\n  - id: b\n    model: auto\n    prompt: y\n    next: a\n"),
        8,
        "steps[1]",
        "workflows do not loop",
    );
    // A parallel step's steps are reached only through it, and named once.
    assert_error(
        &format!("{HEAD}steps:\n  - id: p\n    parallel: [a, a]\n    next: d\n  - id: a\n    model: auto\n    prompt: x\n  - id: d\n    end: {{}}\n"),
        5,
        "steps[0].parallel",
        "names a step twice",
    );
    assert_error(
        &format!("{HEAD}steps:\n  - id: s\n    branch:\n      - if: ${{message}} == \"1\"\n        next: p\n      - next: x\n  - id: p\n    parallel: [a, b]\n    next: d\n  - id: x\n    model: auto\n    prompt: x\n  - id: a\n    model: auto\n    prompt: x\n  - id: b\n    model: auto\n    prompt: y\n  - id: d\n    end: {{}}\n"),
        16,
        "steps[3]",
        "only that step may lead to it (step \"x\" does)",
    );
    // Nothing to fail, nowhere to go on failure.
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    end: {{}}\n    on_error: a\n"),
        5,
        "steps[0].on_error",
        "cannot fail",
    );
    // `json` only from a model step that answers JSON.
    assert_error(
        &format!("{HEAD}steps:\n  - id: m\n    model: auto\n    prompt: x\n  - id: e\n    end:\n      reply: ${{steps.m.json.a}}\n"),
        10,
        "steps[1].end.reply",
        "only with `json: true`",
    );
}

#[test]
fn keys_appear_once_and_quoted_values_stay_text() {
    assert_error(
        &format!("{HEAD}steps:\n  - id: a\n    end: {{}}\n    end: {{}}\n"),
        7,
        "(file)",
        "Duplicate key",
    );
    // A quoted number is text: an order id.
    let quoted = format!("{HEAD}steps:\n  - id: a\n    tool: lookup_order\n    arguments:\n      order_id: \"1001\"\n");
    assert!(errors(&quoted).is_empty(), "{:#?}", errors(&quoted));
    let plain = format!(
        "{HEAD}steps:\n  - id: a\n    tool: lookup_order\n    arguments:\n      order_id: 1001\n"
    );
    assert_error(
        &plain,
        8,
        "steps[0].arguments.order_id",
        "expected a string",
    );
    let deep = format!("{HEAD}steps:\n{}", "  ".repeat(100) + "- x\n");
    assert_error(&deep, 1, "(file)", "nested more than");
}

#[test]
fn a_reference_of_the_wrong_type_is_a_type_mismatch() {
    let yaml = format!(
        "{HEAD}inputs:\n  count:\n    type: integer\n  who:\n    type: string\nsteps:\n  - id: a\n    tool: list_orders\n    arguments:\n      customer_id: ${{inputs.count}}\n      limit: ${{inputs.who}}\n"
    );
    assert_error(
        &yaml,
        13,
        "steps[0].arguments.customer_id",
        "type mismatch: ${inputs.count} is an integer, the argument takes a string",
    );
    assert_error(&yaml, 14, "steps[0].arguments.limit", "type mismatch");
    // Of the right types, or of a type known only at run time, it loads.
    let fine = format!(
        "{HEAD}inputs:\n  count:\n    type: integer\nsteps:\n  - id: a\n    tool: list_orders\n    arguments:\n      customer_id: ${{message}}\n      limit: ${{inputs.count}}\n  - id: b\n    tool: update_order_status\n    arguments:\n      order_id: ${{steps.a.orders}}\n      status: ${{run.id}}\n"
    );
    assert!(errors(&fine).is_empty(), "{:#?}", errors(&fine));
}

#[test]
fn a_model_step_may_name_the_schema_of_its_answer() {
    let with = |schema: &str| {
        format!(
            "{HEAD}steps:\n  - id: m\n    model: auto\n    prompt: hi\n{schema}  - id: e\n    end:\n      reply: ${{steps.m.json.intent}}\n"
        )
    };
    let ok = load(
        "workflows/w.yaml",
        &with(
            "    schema:\n      type: object\n      properties:\n        intent: {enum: [a, b]}\n",
        ),
    )
    .unwrap();
    let StepKind::Model { json, schema, .. } = &ok.steps[0].kind else {
        panic!("a model step")
    };
    assert!(*json, "a schema implies a JSON answer");
    assert_eq!(
        schema.as_ref().unwrap()["properties"]["intent"]["enum"],
        serde_json::json!(["a", "b"])
    );
    assert_error(
        &with("    schema: {type: string}\n"),
        8,
        "steps[0].schema",
        "JSON Schema of an object",
    );
    assert_error(
        &with("    json: false\n    schema: {type: object}\n"),
        9,
        "steps[0].schema",
        "drop `json: false`",
    );
    // Without a schema or `json: true`, `json` is not there to refer to.
    assert_error(
        &with(""),
        10,
        "steps[1].end.reply",
        "answers `json` only with `json: true` or a `schema`",
    );
}
