//! Workflow definitions: the YAML schema of `workflows/*.yaml` (documented in
//! `workflows/README.md`), read and checked whole at load time. Every mistake — invalid YAML, an
//! unknown field or step kind, a tool that does not exist, an argument of the wrong type, a
//! reference to an input or step that is not there, a step nothing leads to — is reported with
//! its file, line, column and field, all of them at once; a definition that loads cannot fail
//! for any of these reasons mid-run.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use marked_yaml::{
    types::{MarkedMappingNode, MarkedScalarNode},
    LoadError, Node, Span,
};
use serde_json::Value;

use crate::tools::builtin;

/// One thing wrong with a definition, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The field at fault, e.g. `steps[2].arguments.order_id`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.field, self.message
        )
    }
}

/// The type of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    String,
    Integer,
    Number,
    Boolean,
    Object,
    Array,
}

impl ValueType {
    const NAMES: &'static [&'static str] =
        &["string", "integer", "number", "boolean", "object", "array"];

    /// The type's name, as a definition writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::Boolean => "boolean",
            Self::Object => "object",
            Self::Array => "array",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "string" => Self::String,
            "integer" => Self::Integer,
            "number" => Self::Number,
            "boolean" => Self::Boolean,
            "object" => Self::Object,
            "array" => Self::Array,
            _ => return None,
        })
    }
}

/// An input a run starts with.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub name: String,
    pub kind: ValueType,
    pub required: bool,
    pub description: Option<String>,
}

/// A loaded, checked workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    pub version: u32,
    pub description: String,
    /// Intents the router may map to this workflow.
    pub intents: Vec<String>,
    pub inputs: Vec<Input>,
    /// Tenant tools (beyond the built-in ones) the steps call.
    pub tools: Vec<String>,
    pub steps: Vec<Step>,
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    /// Where to go after it (the next step in the file when unset; the run ends after the last).
    pub next: Option<String>,
    /// Where to go when it fails (a tool's refusal or exhaustion); unset: the run fails, and a
    /// saga's completed steps are compensated in reverse order.
    pub on_error: Option<String>,
    /// The line it starts on.
    pub line: usize,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// Call a tool; `compensate` undoes it if a later step fails (a saga).
    Tool {
        tool: String,
        arguments: BTreeMap<String, Value>,
        compensate: Option<Compensation>,
    },
    /// Call a model (a catalogue model or `auto`) with a prompt; its answer is `text`, or with
    /// `json: true` a JSON object at `json`.
    Model {
        model: String,
        system: Option<String>,
        prompt: String,
        json: bool,
        /// The JSON Schema the answer must follow (implies `json`): the model is asked for it
        /// (OpenAI's `json_schema` response format).
        schema: Option<Value>,
    },
    /// Go to the first case whose condition holds (the last case has none).
    Branch { cases: Vec<Case> },
    /// Run these steps at once; the run goes on when all have ended.
    Parallel { steps: Vec<String> },
    /// Wait for an external event; after `timeout_s` go to `on_timeout`.
    Wait {
        event: String,
        timeout_s: u64,
        on_timeout: String,
    },
    /// Hand the conversation to a human: a ticket in `queue` with a summary.
    Handoff {
        queue: String,
        priority: String,
        summary: String,
    },
    /// End the run, replying with `reply`.
    End { reply: Option<String> },
}

/// A saga step's undo.
#[derive(Debug, Clone, PartialEq)]
pub struct Compensation {
    pub tool: String,
    pub arguments: BTreeMap<String, Value>,
}

/// A branch case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub condition: Option<Condition>,
    pub next: String,
}

/// A branch condition: a reference, alone (it holds when the value is true, a non-empty string,
/// a non-zero number, a non-empty list or object) or compared with a literal.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub reference: String,
    pub test: Test,
}

/// How a condition tests its reference.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Truthy,
    Equals(Value),
    NotEquals(Value),
}

/// The longest a `wait` step may wait: 90 days.
pub const MAX_WAIT_S: u64 = 90 * 24 * 3600;

const STEP_KINDS: &[&str] = &[
    "tool", "model", "branch", "parallel", "wait", "handoff", "end",
];

/// Reads and checks the definition in `text`, from the file named `file` (for the errors).
pub fn load(file: &str, text: &str) -> Result<Workflow, Vec<DefinitionError>> {
    let mut reader = Reader {
        file: file.to_owned(),
        errors: Vec::new(),
        step_refs: Vec::new(),
    };
    let too = |message: String| {
        Err(vec![DefinitionError {
            file: file.to_owned(),
            line: 1,
            column: 1,
            field: "(file)".into(),
            message,
        }])
    };
    if text.len() > MAX_DEFINITION_BYTES {
        return too(format!("larger than {MAX_DEFINITION_BYTES} bytes"));
    }
    if nesting(text) > MAX_NESTING {
        return too(format!("nested more than {MAX_NESTING} levels deep"));
    }
    // Keys appear once, and only plain (unquoted) scalars read as numbers or booleans.
    let options = marked_yaml::LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(root) => root,
        Err(e) => {
            let (line, column) = load_error_place(&e);
            return Err(vec![DefinitionError {
                file: file.to_owned(),
                line,
                column,
                field: "(file)".into(),
                message: format!("invalid YAML: {}", load_error_text(&e)),
            }]);
        }
    };
    let workflow = reader.workflow(&root, file);
    match workflow {
        Some(workflow) if reader.errors.is_empty() => Ok(workflow),
        _ => {
            reader
                .errors
                .sort_by_key(|e| (e.line, e.column, e.field.clone()));
            Err(reader.errors)
        }
    }
}

fn load_error_place(e: &LoadError) -> (usize, usize) {
    let marker = match e {
        LoadError::TopLevelMustBeMapping(m)
        | LoadError::TopLevelMustBeSequence(m)
        | LoadError::UnexpectedAnchor(m)
        | LoadError::MappingKeyMustBeScalar(m)
        | LoadError::UnexpectedTag(m)
        | LoadError::ScanError(m, _) => Some(*m),
        LoadError::DuplicateKey(inner) => inner.key.span().start().copied(),
    };
    marker.map_or((1, 1), |m| (m.line(), m.column()))
}

fn load_error_text(e: &LoadError) -> String {
    // The loader's own text starts with its marker, which the error's place already gives.
    let text = e.to_string();
    match text.split_once(": ") {
        Some((place, rest)) if place.contains(':') && !rest.is_empty() => rest.to_owned(),
        _ => text,
    }
}

/// Walks the YAML tree, collecting every error.
struct Reader {
    file: String,
    errors: Vec<DefinitionError>,
    /// References to steps, checked once the steps are known: that the step named has run.
    step_refs: Vec<StepRef>,
}

/// A `${steps.<id>…}` in a step's text, and where.
struct StepRef {
    /// The step holding it.
    from: usize,
    /// Whether it may name `from` itself (a compensation uses its step's answer).
    own: bool,
    id: String,
    reference: String,
    span: Span,
    field: String,
}

/// The largest definition read (bytes), and the deepest nesting.
const MAX_DEFINITION_BYTES: usize = 1 << 20;
const MAX_NESTING: usize = 64;

/// How deep `text` nests, roughly (indentation, list dashes and brackets): enough to refuse a
/// file that would make the YAML parser recurse without bound.
fn nesting(text: &str) -> usize {
    let mut deepest = 0;
    let mut brackets = 0usize;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let dashes = line.trim_start().matches("- ").count();
        deepest = deepest.max(indent / 2 + dashes);
    }
    for c in text.chars() {
        match c {
            '[' | '{' => {
                brackets += 1;
                deepest = deepest.max(brackets);
            }
            ']' | '}' => brackets = brackets.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Where a node starts.
fn place(span: &Span) -> (usize, usize) {
    span.start().map_or((1, 1), |m| (m.line(), m.column()))
}

impl Reader {
    fn error(&mut self, span: &Span, field: &str, message: impl Into<String>) {
        let (line, column) = place(span);
        self.errors.push(DefinitionError {
            file: self.file.clone(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// `node` as a mapping whose keys are all among `allowed`.
    fn mapping<'n>(
        &mut self,
        node: &'n Node,
        field: &str,
        allowed: &[&str],
    ) -> Option<&'n MarkedMappingNode> {
        let Some(map) = node.as_mapping() else {
            self.error(node.span(), field, "expected a mapping");
            return None;
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                self.error(
                    key.span(),
                    &join(field, key.as_str()),
                    format!("unknown field; expected one of {}", allowed.join(", ")),
                );
            }
        }
        Some(map)
    }

    /// The scalar at `key` of `map` as text (`None` and an error if required and missing).
    fn text<'n>(
        &mut self,
        map: &'n MarkedMappingNode,
        key: &str,
        field: &str,
        required: bool,
    ) -> Option<&'n MarkedScalarNode> {
        let field = join(field, key);
        match map.get_node(key) {
            None if required => {
                self.error(map.span(), &field, "missing");
                None
            }
            None => None,
            Some(node) => match node.as_scalar() {
                Some(scalar) => Some(scalar),
                None => {
                    self.error(node.span(), &field, "expected a single value");
                    None
                }
            },
        }
    }

    fn name(&mut self, scalar: &MarkedScalarNode, field: &str) -> Option<String> {
        let text = scalar.as_str();
        let ok = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Some(text.to_owned())
        } else {
            self.error(
                scalar.span(),
                field,
                format!("{text:?} must be 1 to 64 of a-z, 0-9 and _"),
            );
            None
        }
    }

    fn workflow(&mut self, root: &Node, file: &str) -> Option<Workflow> {
        let map = self.mapping(
            root,
            "",
            &[
                "name",
                "version",
                "description",
                "intents",
                "inputs",
                "tools",
                "steps",
            ],
        )?;
        let name = self
            .text(map, "name", "", true)
            .and_then(|n| self.name(n, "name").map(|name| (name, *n.span())));
        if let Some((name, span)) = &name {
            let stem = std::path::Path::new(file)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("");
            if stem != name {
                self.error(
                    span,
                    "name",
                    format!("{name:?} must be the file's name ({stem:?})"),
                );
            }
        }
        let version = self.text(map, "version", "", true).and_then(|v| {
            let parsed = v.as_u32().filter(|n| *n >= 1 && i32::try_from(*n).is_ok());
            if parsed.is_none() {
                self.error(
                    v.span(),
                    "version",
                    "must be a whole number from 1 to 2147483647",
                );
            }
            parsed
        });
        let description = self
            .text(map, "description", "", true)
            .map(|d| d.as_str().to_owned());
        let intents = self.names(map, "intents");
        let tools = self.names(map, "tools");
        for (tool, span) in &tools {
            if builtin::NAMES.contains(&tool.as_str()) {
                self.error(
                    span,
                    "tools",
                    format!("{tool:?} is a built-in tool; list only tenant tools here"),
                );
            }
        }
        let inputs = self.inputs(map);
        let known_tools: BTreeSet<String> = builtin::NAMES
            .iter()
            .map(|n| (*n).to_owned())
            .chain(tools.iter().map(|(n, _)| n.clone()))
            .collect();
        let steps = self.steps(map, &inputs, &known_tools);
        Some(Workflow {
            name: name?.0,
            version: version?,
            description: description?,
            intents: intents.into_iter().map(|(n, _)| n).collect(),
            inputs,
            tools: tools.into_iter().map(|(n, _)| n).collect(),
            steps: steps?,
        })
    }

    /// A list of names at `key`.
    fn names(&mut self, map: &MarkedMappingNode, key: &str) -> Vec<(String, Span)> {
        let Some(node) = map.get_node(key) else {
            return Vec::new();
        };
        let Some(list) = node.as_sequence() else {
            self.error(node.span(), key, "expected a list of names");
            return Vec::new();
        };
        let mut names = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let field = format!("{key}[{i}]");
            match item.as_scalar() {
                Some(scalar) => {
                    if let Some(name) = self.name(scalar, &field) {
                        names.push((name, *scalar.span()));
                    }
                }
                None => self.error(item.span(), &field, "expected a name"),
            }
        }
        names
    }

    fn inputs(&mut self, map: &MarkedMappingNode) -> Vec<Input> {
        let Some(node) = map.get_node("inputs") else {
            return Vec::new();
        };
        let Some(inputs) = node.as_mapping() else {
            self.error(node.span(), "inputs", "expected a mapping of input names");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in inputs.iter() {
            let field = format!("inputs.{}", key.as_str());
            let Some(name) = self.name(key, &field) else {
                continue;
            };
            if name == "message" {
                self.error(
                    key.span(),
                    &field,
                    "`message` is always an input (the caller's message)",
                );
                continue;
            }
            let Some(spec) = self.mapping(value, &field, &["type", "required", "description"])
            else {
                continue;
            };
            let kind = self.text(spec, "type", &field, true).and_then(|t| {
                let kind = ValueType::parse(t.as_str());
                if kind.is_none() {
                    self.error(
                        t.span(),
                        &join(&field, "type"),
                        format!("expected one of {}", ValueType::NAMES.join(", ")),
                    );
                }
                kind
            });
            let required = match self.text(spec, "required", &field, false) {
                None => true,
                Some(r) => r.as_bool().unwrap_or_else(|| {
                    self.error(
                        r.span(),
                        &join(&field, "required"),
                        "expected true or false",
                    );
                    true
                }),
            };
            let description = self
                .text(spec, "description", &field, false)
                .map(|d| d.as_str().to_owned());
            if let Some(kind) = kind {
                out.push(Input {
                    name,
                    kind,
                    required,
                    description,
                });
            }
        }
        out
    }

    fn steps(
        &mut self,
        map: &MarkedMappingNode,
        inputs: &[Input],
        tools: &BTreeSet<String>,
    ) -> Option<Vec<Step>> {
        let Some(node) = map.get_node("steps") else {
            self.error(map.span(), "steps", "missing");
            return None;
        };
        let Some(list) = node.as_sequence().filter(|l| !l.is_empty()) else {
            self.error(node.span(), "steps", "expected a list of at least one step");
            return None;
        };
        // Ids first, so references can be checked against every step.
        let mut ids: Vec<Option<String>> = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let field = format!("steps[{i}]");
            let id = item
                .as_mapping()
                .and_then(|m| self.text(m, "id", &field, true))
                .and_then(|id| {
                    let name = self.name(id, &join(&field, "id"))?;
                    if ids.iter().flatten().any(|seen| seen == &name) {
                        self.error(id.span(), &join(&field, "id"), "another step has this id");
                        return None;
                    }
                    Some(name)
                });
            ids.push(id);
        }
        let scope = Scope {
            inputs,
            ids: &ids,
            list,
        };
        let mut steps = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            steps.push(self.step(item, i, &scope, tools));
        }
        let steps: Option<Vec<Step>> = steps.into_iter().collect();
        let steps = steps?;
        for step in &steps {
            let StepKind::Parallel { steps: members } = &step.kind else {
                continue;
            };
            for (i, member) in steps.iter().enumerate() {
                if members.contains(&member.id)
                    && (member.next.is_some() || member.on_error.is_some())
                {
                    if let Some(node) = list.get(i) {
                        self.error(node.span(), &format!("steps[{i}]"), format!("{:?} runs in parallel step {:?}: it returns there, so it has no `next` or `on_error`", member.id, step.id));
                    }
                }
            }
        }
        self.flow(&steps, list);
        Some(steps)
    }

    fn step(
        &mut self,
        node: &Node,
        i: usize,
        scope: &Scope,
        tools: &BTreeSet<String>,
    ) -> Option<Step> {
        let field = format!("steps[{i}]");
        let mut allowed = vec!["id", "next", "on_error"];
        allowed.extend_from_slice(STEP_KINDS);
        allowed.extend_from_slice(&[
            "arguments",
            "compensate",
            "system",
            "prompt",
            "json",
            "schema",
            "on_timeout",
        ]);
        let map = self.mapping(node, &field, &allowed)?;
        let kinds: Vec<&str> = STEP_KINDS
            .iter()
            .copied()
            .filter(|k| map.get_node(k).is_some())
            .collect();
        let kind = match kinds.as_slice() {
            [kind] => *kind,
            [] => {
                self.error(
                    map.span(),
                    &field,
                    format!("a step needs one of {}", STEP_KINDS.join(", ")),
                );
                return None;
            }
            [_, ..] => {
                self.error(
                    map.span(),
                    &field,
                    format!("a step is one kind, not {}", kinds.join(" and ")),
                );
                return None;
            }
        };
        // Fields that belong to another kind of step.
        let own: &[&str] = match kind {
            "tool" => &["arguments", "compensate"],
            "model" => &["system", "prompt", "json", "schema"],
            "wait" => &["on_timeout"],
            _ => &[],
        };
        for key in [
            "arguments",
            "compensate",
            "system",
            "prompt",
            "json",
            "schema",
            "on_timeout",
        ] {
            if let Some(found) = map.get_node(key) {
                if !own.contains(&key) {
                    self.error(
                        found.span(),
                        &join(&field, key),
                        format!("not a field of a {kind} step"),
                    );
                }
            }
        }
        let kind_node = map.get_node(kind)?;
        let here = i;
        let target = |reader: &mut Reader, key: &str| -> Option<String> {
            let scalar = reader.text(map, key, &field, false)?;
            reader.target(scalar, &join(&field, key), scope)
        };
        let next = target(self, "next");
        let on_error = target(self, "on_error");
        let kind = match kind {
            "tool" => {
                let tool = self.tool_name(kind_node, &join(&field, "tool"), tools)?;
                let arguments = self.arguments(
                    map.get_node("arguments"),
                    &tool,
                    &join(&field, "arguments"),
                    scope,
                    (here, false),
                    map.span(),
                );
                let compensate = match map.get_node("compensate") {
                    None => None,
                    Some(node) => {
                        let cfield = join(&field, "compensate");
                        let c = self.mapping(node, &cfield, &["tool", "arguments"])?;
                        let tool_node = c.get_node("tool").or_else(|| {
                            self.error(c.span(), &join(&cfield, "tool"), "missing");
                            None
                        })?;
                        let undo = self.tool_name(tool_node, &join(&cfield, "tool"), tools)?;
                        // The undo may use what the step itself answered.
                        let arguments = self.arguments(
                            c.get_node("arguments"),
                            &undo,
                            &join(&cfield, "arguments"),
                            scope,
                            (here, true),
                            c.span(),
                        );
                        Some(Compensation {
                            tool: undo,
                            arguments,
                        })
                    }
                };
                StepKind::Tool {
                    tool,
                    arguments,
                    compensate,
                }
            }
            "model" => {
                let model = match kind_node.as_scalar() {
                    Some(m) if !m.as_str().is_empty() => m.as_str().to_owned(),
                    _ => {
                        self.error(
                            kind_node.span(),
                            &join(&field, "model"),
                            "expected a model name or auto",
                        );
                        return None;
                    }
                };
                let prompt = self.text(map, "prompt", &field, true)?;
                self.template(prompt, &join(&field, "prompt"), scope, (here, false));
                let system = self.text(map, "system", &field, false);
                if let Some(system) = system {
                    self.template(system, &join(&field, "system"), scope, (here, false));
                }
                let json = self.text(map, "json", &field, false).map(|j| {
                    j.as_bool().unwrap_or_else(|| {
                        self.error(j.span(), &join(&field, "json"), "expected true or false");
                        false
                    })
                });
                let schema = match map.get_node("schema") {
                    None => None,
                    Some(node) => {
                        let sfield = join(&field, "schema");
                        let schema = self.literal(node, &sfield, scope, (here, false));
                        let is_object_schema = schema.as_ref().is_some_and(|s| {
                            s.get("type") == Some(&Value::String("object".into()))
                        });
                        if !is_object_schema {
                            self.error(
                                node.span(),
                                &sfield,
                                "expected a JSON Schema of an object (`type: object`)",
                            );
                        }
                        if json == Some(false) {
                            self.error(
                                node.span(),
                                &sfield,
                                "a schema asks for a JSON answer: drop `json: false`",
                            );
                        }
                        schema
                    }
                };
                StepKind::Model {
                    model,
                    system: system.map(|s| s.as_str().to_owned()),
                    prompt: prompt.as_str().to_owned(),
                    json: json.unwrap_or(false) || schema.is_some(),
                    schema,
                }
            }
            "branch" => {
                let bfield = join(&field, "branch");
                let Some(list) = kind_node.as_sequence().filter(|l| !l.is_empty()) else {
                    self.error(kind_node.span(), &bfield, "expected a list of cases");
                    return None;
                };
                let mut cases = Vec::new();
                for (c, case) in list.iter().enumerate() {
                    let cfield = format!("{bfield}[{c}]");
                    let case_map = self.mapping(case, &cfield, &["if", "next"])?;
                    let condition = self.text(case_map, "if", &cfield, false).and_then(|cond| {
                        self.condition(cond, &join(&cfield, "if"), scope, (here, false))
                    });
                    let last = c + 1 == list.len();
                    if case_map.get_node("if").is_none() && !last {
                        self.error(
                            case_map.span(),
                            &cfield,
                            "only the last case may have no `if`",
                        );
                    }
                    if last && case_map.get_node("if").is_some() {
                        self.error(case_map.span(), &cfield, "the last case has no `if`: it is where the run goes when no other case holds");
                    }
                    let to = self.text(case_map, "next", &cfield, true)?;
                    let to = self.target(to, &join(&cfield, "next"), scope)?;
                    cases.push(Case {
                        condition,
                        next: to,
                    });
                }
                self.refuse_next(map, &field, "a branch goes where its cases say");
                StepKind::Branch { cases }
            }
            "parallel" => {
                let pfield = join(&field, "parallel");
                let Some(list) = kind_node.as_sequence().filter(|l| l.len() >= 2) else {
                    self.error(
                        kind_node.span(),
                        &pfield,
                        "expected a list of at least two step ids",
                    );
                    return None;
                };
                let mut members = Vec::new();
                for (m, member) in list.iter().enumerate() {
                    let mfield = format!("{pfield}[{m}]");
                    let Some(scalar) = member.as_scalar() else {
                        self.error(member.span(), &mfield, "expected a step id");
                        continue;
                    };
                    if let Some(id) = self.target(scalar, &mfield, scope) {
                        let member_kind = scope.kind_of(&id);
                        if !matches!(member_kind, Some("tool" | "model")) {
                            self.error(
                                scalar.span(),
                                &mfield,
                                "a parallel step runs tool and model steps only",
                            );
                        }
                        members.push(id);
                    }
                }
                if map.get_node("next").is_none() {
                    self.error(
                        map.span(),
                        &join(&field, "next"),
                        "a parallel step names where the run goes once all its steps have ended",
                    );
                }
                StepKind::Parallel { steps: members }
            }
            "wait" => {
                let wfield = join(&field, "wait");
                let w = self.mapping(kind_node, &wfield, &["event", "timeout_s"])?;
                let event = self
                    .text(w, "event", &wfield, true)
                    .and_then(|e| self.name(e, &join(&wfield, "event")));
                let timeout_s = self.text(w, "timeout_s", &wfield, true).and_then(|t| {
                    let n = t.as_u64().filter(|n| (1..=MAX_WAIT_S).contains(n));
                    if n.is_none() {
                        self.error(
                            t.span(),
                            &join(&wfield, "timeout_s"),
                            format!("must be a whole number of seconds from 1 to {MAX_WAIT_S} (90 days)"),
                        );
                    }
                    n
                });
                let on_timeout = self
                    .text(map, "on_timeout", &field, true)
                    .and_then(|t| self.target(t, &join(&field, "on_timeout"), scope));
                StepKind::Wait {
                    event: event?,
                    timeout_s: timeout_s?,
                    on_timeout: on_timeout?,
                }
            }
            "handoff" => {
                let hfield = join(&field, "handoff");
                let h = self.mapping(kind_node, &hfield, &["queue", "priority", "summary"])?;
                let queue = self
                    .text(h, "queue", &hfield, true)
                    .and_then(|q| self.name(q, &join(&hfield, "queue")));
                let priority = self.text(h, "priority", &hfield, true).and_then(|p| {
                    if business_priority(p.as_str()) {
                        Some(p.as_str().to_owned())
                    } else {
                        self.error(
                            p.span(),
                            &join(&hfield, "priority"),
                            "expected low, normal, high or urgent",
                        );
                        None
                    }
                });
                let summary = self.text(h, "summary", &hfield, true);
                if let Some(summary) = summary {
                    self.template(summary, &join(&hfield, "summary"), scope, (here, false));
                }
                StepKind::Handoff {
                    queue: queue?,
                    priority: priority?,
                    summary: summary?.as_str().to_owned(),
                }
            }
            _ => {
                let efield = join(&field, "end");
                let reply = match kind_node {
                    // `end: {}` or `end: {reply: …}`
                    Node::Mapping(_) => {
                        let e = self.mapping(kind_node, &efield, &["reply"])?;
                        let reply = self.text(e, "reply", &efield, false);
                        if let Some(reply) = reply {
                            self.template(reply, &join(&efield, "reply"), scope, (here, false));
                        }
                        reply.map(|r| r.as_str().to_owned())
                    }
                    _ => {
                        self.error(
                            kind_node.span(),
                            &efield,
                            "expected a mapping (`{}` or `{reply: …}`)",
                        );
                        return None;
                    }
                };
                self.refuse_next(map, &field, "an end step ends the run");
                StepKind::End { reply }
            }
        };
        let id = scope.ids.get(i).cloned().flatten()?;
        let line = place(map.span()).0;
        Some(Step {
            id,
            kind,
            next,
            on_error,
            line,
        })
    }

    /// Refuses a `next` on a step whose kind decides where the run goes.
    fn refuse_next(&mut self, map: &MarkedMappingNode, field: &str, why: &str) {
        if map.get_node("next").is_some() {
            self.error(map.span(), &join(field, "next"), why);
        }
    }

    /// A tool name that exists.
    fn tool_name(&mut self, node: &Node, field: &str, tools: &BTreeSet<String>) -> Option<String> {
        let Some(scalar) = node.as_scalar() else {
            self.error(node.span(), field, "expected a tool name");
            return None;
        };
        let name = scalar.as_str();
        if tools.contains(name) {
            Some(name.to_owned())
        } else {
            self.error(
                scalar.span(),
                field,
                format!(
                    "no tool named {name:?}: the built-in tools are {}; a tenant's own must be listed under `tools`",
                    builtin::NAMES.join(", ")
                ),
            );
            None
        }
    }

    /// A step id that exists.
    fn target(&mut self, scalar: &MarkedScalarNode, field: &str, scope: &Scope) -> Option<String> {
        let id = scalar.as_str();
        if scope.ids.iter().flatten().any(|known| known == id) {
            Some(id.to_owned())
        } else {
            self.error(scalar.span(), field, format!("no step has the id {id:?}"));
            None
        }
    }

    /// A tool's arguments: for a built-in tool, each one it takes, of its type, with every one
    /// it needs; values may refer to inputs and to steps above step `before`.
    fn arguments(
        &mut self,
        node: Option<&Node>,
        tool: &str,
        field: &str,
        scope: &Scope,
        at: Origin,
        owner: &Span,
    ) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let schema = builtin::definitions()
            .into_iter()
            .find(|d| d.name == tool)
            .and_then(|d| d.parameters_json)
            .and_then(|text| serde_json::from_str::<Value>(&text).ok());
        let map = match node {
            None => None,
            Some(node) => match node.as_mapping() {
                Some(map) => Some(map),
                None => {
                    self.error(node.span(), field, "expected a mapping of argument names");
                    return out;
                }
            },
        };
        if let (Some(schema), Some(map_node)) = (&schema, map) {
            for required in schema["required"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap_or_default();
                if map_node.get_node(required).is_none() {
                    self.error(
                        map_node.span(),
                        &join(field, required),
                        format!("{tool} needs this argument"),
                    );
                }
            }
        } else if let (Some(schema), None) = (&schema, map) {
            if schema["required"].as_array().is_some_and(|r| !r.is_empty()) {
                self.error(owner, field, format!("{tool} needs arguments"));
            }
        }
        let Some(map) = map else {
            return out;
        };
        for (key, value) in map.iter() {
            let afield = join(field, key.as_str());
            let property = schema.as_ref().map(|s| &s["properties"][key.as_str()]);
            if let Some(property) = property {
                if property.is_null() {
                    self.error(
                        key.span(),
                        &afield,
                        format!("{tool} takes no such argument"),
                    );
                    continue;
                }
            }
            let json = self.literal(value, &afield, scope, at);
            if let (Some(property), Some(json)) = (property, &json) {
                // A value that is one reference has the type of what it names, where known.
                let named = json.as_str().and_then(|text| scope.type_of(text));
                let problem = match named {
                    Some(kind) if !type_fits(property, kind) => Some(format!(
                        "type mismatch: {} is {}, the argument takes {}",
                        json.as_str().unwrap_or_default(),
                        article(kind),
                        describe(property)
                    )),
                    Some(_) => None,
                    None if !fits(property, json) => {
                        Some(format!("expected {}", describe(property)))
                    }
                    None => None,
                };
                if let Some(problem) = problem {
                    self.error(value.span(), &afield, problem);
                }
            }
            if let Some(json) = json {
                out.insert(key.as_str().to_owned(), json);
            }
        }
        out
    }

    /// A YAML value as JSON; strings holding `${…}` references are checked (and left as text).
    fn literal(&mut self, node: &Node, field: &str, scope: &Scope, at: Origin) -> Option<Value> {
        match node {
            Node::Scalar(scalar) => {
                if scalar.as_str().contains("${") {
                    self.template(scalar, field, scope, at);
                    return Some(Value::String(scalar.as_str().to_owned()));
                }
                Some(scalar_json(scalar))
            }
            Node::Sequence(list) => Some(Value::Array(
                list.iter()
                    .enumerate()
                    .filter_map(|(i, item)| self.literal(item, &format!("{field}[{i}]"), scope, at))
                    .collect(),
            )),
            Node::Mapping(map) => Some(Value::Object(
                map.iter()
                    .filter_map(|(k, v)| {
                        let value = self.literal(v, &join(field, k.as_str()), scope, at)?;
                        Some((k.as_str().to_owned(), value))
                    })
                    .collect(),
            )),
        }
    }

    /// Checks every `${…}` in a text: each refers to an input or to a step above step `before`.
    fn template(&mut self, scalar: &MarkedScalarNode, field: &str, scope: &Scope, at: Origin) {
        let mut rest = scalar.as_str();
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.error(scalar.span(), field, "a `${` is not closed with `}`");
                return;
            };
            let reference = after[..end].trim();
            self.reference(reference, scalar.span(), field, scope, at);
            rest = &after[end + 1..];
        }
    }

    /// A branch condition: `${ref}`, `${ref} == literal` or `${ref} != literal`.
    fn condition(
        &mut self,
        scalar: &MarkedScalarNode,
        field: &str,
        scope: &Scope,
        at: Origin,
    ) -> Option<Condition> {
        let text = scalar.as_str().trim();
        let parsed = parse_condition(text);
        let Some((reference, test)) = parsed else {
            self.error(
                scalar.span(),
                field,
                "expected `${reference}`, `${reference} == value` or `${reference} != value` (value: a quoted string, a number, true, false or null)",
            );
            return None;
        };
        if !self.reference(&reference, scalar.span(), field, scope, at) {
            return None;
        }
        Some(Condition { reference, test })
    }

    /// Checks a reference's form; one to a step is kept to check, once every step is known,
    /// that the step named has run. Whether its form is right.
    fn reference(
        &mut self,
        reference: &str,
        span: &Span,
        field: &str,
        scope: &Scope,
        (from, own): Origin,
    ) -> bool {
        match scope.check(reference) {
            Err(message) => {
                self.error(span, field, message);
                false
            }
            Ok(None) => true,
            Ok(Some(id)) => {
                self.step_refs.push(StepRef {
                    from,
                    own,
                    id,
                    reference: reference.to_owned(),
                    span: *span,
                    field: field.to_owned(),
                });
                true
            }
        }
    }

    /// Checks how the run moves: every step reachable from the first, no loops, a parallel
    /// step's steps distinct and reached only through it, no `on_error` where nothing can fail,
    /// and every `${steps.<id>…}` naming a step that has answered on every way to it.
    fn flow(&mut self, steps: &[Step], list: &[Node]) {
        let n = steps.len();
        let field = |i: usize| format!("steps[{i}]");
        let span = |i: usize| {
            list.get(i)
                .map(|node| *node.span())
                .unwrap_or_else(Span::new_blank)
        };
        for (i, step) in steps.iter().enumerate() {
            if step.on_error.is_some()
                && matches!(step.kind, StepKind::End { .. } | StepKind::Branch { .. })
            {
                self.error(
                    &span(i),
                    &join(&field(i), "on_error"),
                    "this kind of step cannot fail",
                );
            }
            if let StepKind::Parallel { steps: run } = &step.kind {
                let distinct: BTreeSet<&String> = run.iter().collect();
                if distinct.len() != run.len() {
                    self.error(&span(i), &join(&field(i), "parallel"), "names a step twice");
                }
            }
        }
        let edges = edges(steps);
        // A parallel step's steps are reached through it alone.
        let owner: BTreeMap<usize, usize> = steps
            .iter()
            .enumerate()
            .flat_map(|(p, s)| match &s.kind {
                StepKind::Parallel { steps: run } => run
                    .iter()
                    .filter_map(|m| steps.iter().position(|t| &t.id == m))
                    .map(|m| (m, p))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        for &(from, to, _) in &edges {
            if owner.get(&to).is_some_and(|p| *p != from) {
                self.error(
                    &span(to),
                    &field(to),
                    format!(
                        "{:?} runs in a parallel step, so only that step may lead to it (step {:?} does)",
                        steps[to].id, steps[from].id
                    ),
                );
            }
        }
        // Reachable, without loops (a depth-first walk from the first step).
        let mut state = vec![0u8; n]; // 0 unseen, 1 on the path, 2 done
        let mut stack = vec![(0usize, 0usize)];
        let mut looped = false;
        if n > 0 {
            state[0] = 1;
        }
        while let Some(&mut (at, ref mut next)) = stack.last_mut() {
            let out: Vec<usize> = edges.iter().filter(|e| e.0 == at).map(|e| e.1).collect();
            if let Some(&to) = out.get(*next) {
                *next += 1;
                match state[to] {
                    0 => {
                        state[to] = 1;
                        stack.push((to, 0));
                    }
                    1 if !looped => {
                        looped = true;
                        self.error(
                            &span(at),
                            &field(at),
                            format!(
                                "the run would loop back from {:?} to {:?}: workflows do not loop",
                                steps[at].id, steps[to].id
                            ),
                        );
                    }
                    _ => {}
                }
            } else {
                state[at] = 2;
                stack.pop();
            }
        }
        for (i, seen) in state.iter().enumerate() {
            if *seen == 0 {
                self.error(
                    &span(i),
                    &field(i),
                    format!("no step leads to {:?}", steps[i].id),
                );
            }
        }
        if looped {
            return;
        }
        // The steps that have answered on every way to each step (a fixed point: each step's
        // set is what all the ways into it have in common).
        let all: BTreeSet<usize> = (0..n).collect();
        let mut before: Vec<BTreeSet<usize>> = vec![all.clone(); n];
        if n > 0 {
            before[0] = BTreeSet::new();
        }
        loop {
            let mut changed = false;
            for to in 1..n {
                let mut common: Option<BTreeSet<usize>> = None;
                for &(from, _, answered) in edges.iter().filter(|e| e.1 == to && state[e.0] == 2) {
                    let mut carried = before[from].clone();
                    if answered {
                        carried.insert(from);
                        // A parallel step's way on carries what its steps answered.
                        if let StepKind::Parallel { steps: run } = &steps[from].kind {
                            carried.extend(
                                run.iter()
                                    .filter_map(|m| steps.iter().position(|t| &t.id == m)),
                            );
                        }
                    }
                    common = Some(match common {
                        None => carried,
                        Some(c) => c.intersection(&carried).copied().collect(),
                    });
                }
                let common = common.unwrap_or_else(|| all.clone());
                if common != before[to] {
                    before[to] = common;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let refs = std::mem::take(&mut self.step_refs);
        for r in refs {
            let Some(target) = steps.iter().position(|s| s.id == r.id) else {
                continue;
            };
            let has_run = before.get(r.from).is_some_and(|b| b.contains(&target))
                || (r.own && target == r.from);
            if !has_run {
                self.error(
                    &r.span,
                    &r.field,
                    format!(
                        "`${{{}}}`: step {:?} has not answered on every way to here",
                        r.reference, r.id
                    ),
                );
            }
        }
    }
}

/// What references may name.
struct Scope<'a> {
    inputs: &'a [Input],
    ids: &'a [Option<String>],
    list: &'a [Node],
}

impl Scope<'_> {
    /// The kind of the step `id` (its kind key).
    fn kind_of(&self, id: &str) -> Option<&'static str> {
        let i = self
            .ids
            .iter()
            .position(|known| known.as_deref() == Some(id))?;
        let map = self.list.get(i)?.as_mapping()?;
        STEP_KINDS
            .iter()
            .copied()
            .find(|k| map.get_node(k).is_some())
    }

    /// Checks a reference's form: `message`, `inputs.<name>`, `run.id`, `tenant.id`, or
    /// `steps.<id>[.<field>…]` naming a step that answers something (a model step's `text`, or
    /// its `json` with `json: true`). The step's id, for a step reference.
    fn check(&self, reference: &str) -> Result<Option<String>, String> {
        let mut parts = reference.split('.');
        match (parts.next(), parts.next()) {
            (Some("message"), None) | (Some("run"), Some("id")) | (Some("tenant"), Some("id")) => {
                Ok(None)
            }
            (Some("inputs"), Some(name)) => {
                if name == "message" || self.inputs.iter().any(|i| i.name == name) {
                    Ok(None)
                } else {
                    Err(format!("`${{{reference}}}`: no input named {name:?}"))
                }
            }
            (Some("steps"), Some(id)) => {
                if !self.ids.iter().any(|known| known.as_deref() == Some(id)) {
                    return Err(format!("`${{{reference}}}`: no step has the id {id:?}"));
                }
                match self.kind_of(id) {
                    Some("tool" | "wait" | "handoff") => Ok(Some(id.to_owned())),
                    Some("model") => match parts.next() {
                        Some("text") => Ok(Some(id.to_owned())),
                        Some("json") if self.model_answers_json(id) => Ok(Some(id.to_owned())),
                        Some("json") => Err(format!(
                            "`${{{reference}}}`: step {id:?} answers `json` only with `json: true` or a `schema`"
                        )),
                        _ => Err(format!(
                            "`${{{reference}}}`: a model step answers `text` (or `json` with json: true)"
                        )),
                    },
                    _ => Err(format!("`${{{reference}}}`: step {id:?} answers nothing")),
                }
            }
            _ => Err(format!(
                "`${{{reference}}}`: a reference names `message`, `inputs.<name>`, `steps.<id>…`, `run.id` or `tenant.id`"
            )),
        }
    }

    /// The type of the value `text` names when `text` is exactly one reference whose type is
    /// known: `${message}`, `${run.id}` and `${tenant.id}` are strings, `${inputs.<name>}` has its
    /// declared type, and a model step's `${steps.<id>.text}` is a string.
    fn type_of(&self, text: &str) -> Option<ValueType> {
        let reference = text.trim().strip_prefix("${")?.strip_suffix('}')?.trim();
        if reference.contains("${") {
            return None;
        }
        let mut parts = reference.split('.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("message"), None, _) | (Some("run" | "tenant"), Some("id"), None) => {
                Some(ValueType::String)
            }
            (Some("inputs"), Some("message"), None) => Some(ValueType::String),
            (Some("inputs"), Some(name), None) => {
                self.inputs.iter().find(|i| i.name == name).map(|i| i.kind)
            }
            (Some("steps"), Some(id), Some("text")) if self.kind_of(id) == Some("model") => {
                parts.next().is_none().then_some(ValueType::String)
            }
            _ => None,
        }
    }

    /// Whether model step `id` says `json: true`.
    fn model_answers_json(&self, id: &str) -> bool {
        let Some(i) = self
            .ids
            .iter()
            .position(|known| known.as_deref() == Some(id))
        else {
            return false;
        };
        let step = self.list.get(i).and_then(Node::as_mapping);
        step.is_some_and(|m| m.get_node("schema").is_some())
            || step
                .and_then(|m| m.get_scalar("json"))
                .and_then(MarkedScalarNode::as_bool)
                .unwrap_or(false)
    }
}

/// Where a reference is: the step holding it, and whether it may name that step itself.
type Origin = (usize, bool);

/// How the run moves between steps: `(from, to, whether `from` has answered)` — a step's failure
/// (`on_error`) or a wait's timeout moves on without its answer.
fn edges(steps: &[Step]) -> Vec<(usize, usize, bool)> {
    let index: BTreeMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let members: BTreeSet<&str> = steps
        .iter()
        .flat_map(|s| match &s.kind {
            StepKind::Parallel { steps } => steps.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        })
        .collect();
    let to = |id: &str| index.get(id).copied();
    let mut out = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let mut answered: Vec<usize> = Vec::new();
        let mut unanswered: Vec<usize> = Vec::new();
        unanswered.extend(step.on_error.as_deref().and_then(to));
        match &step.kind {
            StepKind::Branch { cases } => answered.extend(cases.iter().filter_map(|c| to(&c.next))),
            StepKind::Parallel { steps: run } => {
                unanswered.extend(run.iter().filter_map(|m| to(m)));
                answered.extend(step.next.as_deref().and_then(to));
            }
            StepKind::Wait { on_timeout, .. } => {
                unanswered.extend(to(on_timeout));
                answered.extend(step.next.as_deref().and_then(to).or(Some(i + 1)));
            }
            StepKind::End { .. } => {}
            _ if members.contains(step.id.as_str()) => {}
            _ => answered.extend(step.next.as_deref().and_then(to).or(Some(i + 1))),
        }
        out.extend(
            answered
                .into_iter()
                .filter(|t| *t < steps.len())
                .map(|t| (i, t, true)),
        );
        out.extend(
            unanswered
                .into_iter()
                .filter(|t| *t < steps.len())
                .map(|t| (i, t, false)),
        );
    }
    out
}

fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_owned()
    } else {
        format!("{field}.{key}")
    }
}

fn business_priority(priority: &str) -> bool {
    sluice_stores::postgres::business::TICKET_PRIORITIES.contains(&priority)
}

/// A plain YAML scalar as JSON: a number, a boolean or null when it reads as one (and was not
/// quoted), else text.
fn scalar_json(scalar: &MarkedScalarNode) -> Value {
    if let Some(b) = scalar.as_bool() {
        return Value::Bool(b);
    }
    if let Some(n) = scalar.as_i64() {
        return Value::from(n);
    }
    if let Some(f) = scalar.as_f64().filter(|f| f.is_finite()) {
        if scalar.may_coerce() && scalar.as_str().chars().any(|c| c.is_ascii_digit()) {
            return Value::from(f);
        }
    }
    if scalar.may_coerce() && matches!(scalar.as_str(), "null" | "~") {
        return Value::Null;
    }
    Value::String(scalar.as_str().to_owned())
}

/// Whether `value` fits the JSON Schema `property` (its `type` or `enum`); a text holding a
/// reference fits anything, as its value is known only when the run gets there.
fn fits(property: &Value, value: &Value) -> bool {
    if value.as_str().is_some_and(|s| s.contains("${")) {
        return true;
    }
    if let Some(choices) = property["enum"].as_array() {
        return choices.contains(value);
    }
    match property["type"].as_str() {
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        _ => true,
    }
}

/// Whether a value of type `kind` fits the JSON Schema `property` (an `enum` takes strings).
fn type_fits(property: &Value, kind: ValueType) -> bool {
    let wanted = match property["type"].as_str() {
        Some(wanted) => wanted,
        None if property["enum"].is_array() => {
            return property["enum"]
                .as_array()
                .is_some_and(|choices| choices.iter().any(|c| value_of_type(c, kind)))
        }
        None => return true,
    };
    matches!(
        (wanted, kind),
        ("string", ValueType::String)
            | ("integer", ValueType::Integer)
            | ("number", ValueType::Integer | ValueType::Number)
            | ("boolean", ValueType::Boolean)
            | ("object", ValueType::Object)
            | ("array", ValueType::Array)
    )
}

pub(crate) fn value_of_type(value: &Value, kind: ValueType) -> bool {
    match kind {
        ValueType::String => value.is_string(),
        ValueType::Integer => value.is_i64() || value.is_u64(),
        ValueType::Number => value.is_number(),
        ValueType::Boolean => value.is_boolean(),
        ValueType::Object => value.is_object(),
        ValueType::Array => value.is_array(),
    }
}

fn article(kind: ValueType) -> String {
    let name = ValueType::NAMES
        .iter()
        .copied()
        .find(|n| ValueType::parse(n) == Some(kind))
        .unwrap_or("value");
    match kind {
        ValueType::Integer | ValueType::Object | ValueType::Array => format!("an {name}"),
        _ => format!("a {name}"),
    }
}

fn describe(property: &Value) -> String {
    if let Some(choices) = property["enum"].as_array() {
        let choices: Vec<String> = choices.iter().map(Value::to_string).collect();
        return format!("one of {}", choices.join(", "));
    }
    match property["type"].as_str() {
        Some(kind @ ("integer" | "object" | "array")) => format!("an {kind}"),
        Some(kind) => format!("a {kind}"),
        None => "a value".to_owned(),
    }
}

/// `${ref}`, `${ref} == literal` or `${ref} != literal`.
fn parse_condition(text: &str) -> Option<(String, Test)> {
    let rest = text.strip_prefix("${")?;
    let end = rest.find('}')?;
    let reference = rest[..end].trim().to_owned();
    if reference.is_empty() {
        return None;
    }
    let tail = rest[end + 1..].trim();
    if tail.is_empty() {
        return Some((reference, Test::Truthy));
    }
    let (op, literal) = if let Some(l) = tail.strip_prefix("==") {
        ("==", l.trim())
    } else if let Some(l) = tail.strip_prefix("!=") {
        ("!=", l.trim())
    } else {
        return None;
    };
    let value = if let Some(inner) = literal
        .strip_prefix('\'')
        .and_then(|l| l.strip_suffix('\''))
    {
        Value::String(inner.to_owned())
    } else {
        match serde_json::from_str::<Value>(literal) {
            Ok(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null)) => v,
            _ => return None,
        }
    };
    Some((
        reference,
        if op == "==" {
            Test::Equals(value)
        } else {
            Test::NotEquals(value)
        },
    ))
}
