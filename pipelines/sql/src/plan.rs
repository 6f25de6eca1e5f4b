//! A pipeline's query planned once per lane and run in three parts, so a window keeps the
//! state of its aggregates rather than its records.
//!
//! DataFusion plans an aggregation as a partial stage (rows → accumulator state per group) and
//! a final stage (states → values). A window folds each batch of its records into partial
//! states as they come ([`WindowQuery::fold`]), merges the states when they pile up
//! ([`WindowQuery::compact`], DataFusion's partial-reduce stage), and when it closes runs the
//! final stage and the rest of the query over them ([`WindowQuery::finish`]). A window's
//! memory then follows its groups, not its records: `count`, `sum`, `min`, `max`, `avg` and
//! the approximate percentiles keep a few values per group; `count(DISTINCT ...)` still keeps
//! the distinct values it has seen.
//!
//! A query DataFusion does not plan as one partial/final pair (an aggregation over an
//! aggregation, say) keeps its rows instead, as Arrow batches, and runs whole at close.
//!
//! The tables the plans read are feeds: the operator puts the batches in before it runs a
//! plan, so the plans are built once and run for every batch without planning again.

use std::sync::{Arc, Mutex, PoisonError};

use datafusion::{
    arrow::{
        array::{Int64Array, RecordBatch, StringArray},
        compute::concat_batches,
        datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef},
    },
    catalog::streaming::StreamingTable,
    common::tree_node::{Transformed, TreeNode, TreeNodeRecursion},
    error::DataFusionError,
    execution::{SessionStateBuilder, TaskContext},
    physical_plan::{
        aggregates::{AggregateExec, AggregateMode},
        collect,
        execution_plan::reset_plan_states,
        memory::MemoryStream,
        streaming::{PartitionStream, StreamingTableExec},
        EmptyRecordBatchStream, ExecutionPlan, SendableRecordBatchStream,
    },
    prelude::{SessionConfig, SessionContext},
};
use sluice_stores::ModelSpec;

use crate::{Error, Pipeline, Result};

/// The name of the catalogue's table in a query.
pub const MODELS_TABLE: &str = "models";

/// A table whose batches are set before each run of a plan that reads it.
#[derive(Debug, Clone)]
struct Feed {
    schema: SchemaRef,
    batches: Arc<Mutex<Vec<RecordBatch>>>,
}

impl Feed {
    fn new(schema: SchemaRef) -> Self {
        Self {
            schema,
            batches: Arc::default(),
        }
    }

    fn set(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().unwrap_or_else(PoisonError::into_inner) = batches;
    }

    fn table(&self) -> Result<Arc<StreamingTable>, DataFusionError> {
        Ok(Arc::new(StreamingTable::try_new(
            self.schema.clone(),
            vec![Arc::new(self.clone())],
        )?))
    }

    fn exec(&self) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        Ok(Arc::new(StreamingTableExec::try_new(
            self.schema.clone(),
            vec![Arc::new(self.clone())],
            None,
            Vec::new(),
            false,
            None,
        )?))
    }
}

impl PartitionStream for Feed {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self
            .batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match MemoryStream::try_new(batches, self.schema.clone(), None) {
            Ok(stream) => Box::pin(stream),
            Err(_) => Box::pin(EmptyRecordBatchStream::new(self.schema.clone())),
        }
    }
}

/// How the query runs over a window.
enum Stages {
    /// Records fold into partial states; closing runs the final stage over them.
    Incremental {
        partial: Arc<dyn ExecutionPlan>,
        reduce: Arc<dyn ExecutionPlan>,
        finish: Arc<dyn ExecutionPlan>,
    },
    /// The window keeps its rows; closing runs the whole query over them.
    Whole { plan: Arc<dyn ExecutionPlan> },
}

/// A pipeline's query, planned for one lane.
pub struct WindowQuery {
    rows: Feed,
    models: Feed,
    states: Feed,
    stages: Stages,
    task: Arc<TaskContext>,
    pipeline: String,
    /// The columns the query returns.
    pub columns: Vec<String>,
}

impl WindowQuery {
    /// Plans `pipeline`'s query over its source's columns and the catalogue; a query that does
    /// not plan, or does not return `window_start` and `records`, is refused.
    pub async fn plan(pipeline: &Pipeline) -> Result<Self> {
        let failed = |source| pipeline.query_error(source);
        let rows = Feed::new(pipeline.columns.schema());
        let models = Feed::new(models_schema());
        let context = session().map_err(failed)?;
        context
            .register_table(&pipeline.source, rows.table().map_err(failed)?)
            .map_err(failed)?;
        context
            .register_table(MODELS_TABLE, models.table().map_err(failed)?)
            .map_err(failed)?;
        let frame = context.sql(&pipeline.query.sql).await.map_err(failed)?;
        let columns: Vec<String> = frame
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        for required in ["window_start", "records"] {
            if !columns.iter().any(|n| n == required) {
                return Err(Error::Definition {
                    pipeline: pipeline.name.clone(),
                    problem: format!("the query must select {required} (window rows are keyed by window_start and versioned by records = count(*))"),
                });
            }
        }
        let plan = frame.create_physical_plan().await.map_err(failed)?;
        let staged = match split(&plan).map_err(failed)? {
            Some(split) => {
                let states = split.states.clone();
                let stages = split.stages(&plan).map_err(failed)?;
                // The source read again above the aggregation (a subquery over it, say) would
                // find no rows there: such a query runs whole.
                match &stages {
                    Stages::Incremental { finish, .. } if !reads(finish, &rows.schema) => {
                        Some((states, stages))
                    }
                    _ => None,
                }
            }
            None => None,
        };
        // Run whole, what a window keeps is its rows: the final run reads them from the rows
        // feed, so the two are one feed.
        let (states, stages) = staged.unwrap_or_else(|| (rows.clone(), Stages::Whole { plan }));
        Ok(Self {
            rows,
            models,
            states,
            stages,
            task: context.task_ctx(),
            pipeline: pipeline.name.clone(),
            columns,
        })
    }

    /// Whether windows keep partial states rather than rows.
    pub fn is_incremental(&self) -> bool {
        matches!(self.stages, Stages::Incremental { .. })
    }

    /// Folds `rows` (records of one window, as a batch of the source's columns) into what the
    /// window keeps: partial states, or the rows themselves.
    pub async fn fold(&self, rows: RecordBatch, models: &[ModelSpec]) -> Result<Vec<RecordBatch>> {
        let Stages::Incremental { partial, .. } = &self.stages else {
            return Ok(vec![rows]);
        };
        self.rows.set(vec![rows]);
        let result = self.run(partial, models).await;
        self.rows.set(Vec::new());
        result
    }

    /// Merges what a window keeps into one batch (states of the same groups become one).
    pub async fn compact(&self, kept: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        let Stages::Incremental { reduce, .. } = &self.stages else {
            return Ok(vec![concat_batches(&self.states.schema, &kept)?]);
        };
        self.states.set(kept);
        let result = self.run(reduce, &[]).await;
        self.states.set(Vec::new());
        Ok(vec![concat_batches(&self.states.schema, &result?)?])
    }

    /// The query's result over what the windows keep (`kept`, from [`WindowQuery::fold`]).
    pub async fn finish(
        &self,
        kept: Vec<RecordBatch>,
        models: &[ModelSpec],
    ) -> Result<Vec<RecordBatch>> {
        let plan = match &self.stages {
            Stages::Incremental { finish, .. } => finish,
            Stages::Whole { plan } => plan,
        };
        self.states.set(kept);
        let result = self.run(plan, models).await;
        self.states.set(Vec::new());
        result
    }

    async fn run(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        models: &[ModelSpec],
    ) -> Result<Vec<RecordBatch>> {
        self.models.set(vec![models_batch(models)?]);
        // A plan keeps what it collected (a join's build side) unless reset.
        let result = match reset_plan_states(plan.clone()) {
            Ok(plan) => collect(plan, self.task.clone()).await,
            Err(error) => Err(error),
        };
        self.models.set(Vec::new());
        result.map_err(|source| Error::Query {
            pipeline: self.pipeline.clone(),
            source,
        })
    }
}

/// A session planning on one partition that keeps aggregations in two stages (so the partial
/// one can run alone), `count(DISTINCT ...)` as an aggregate of its own, and no filters that
/// one run of a plan derives for the next (the plans run again over new batches).
fn session() -> Result<SessionContext, DataFusionError> {
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .set_bool("datafusion.optimizer.enable_dynamic_filter_pushdown", false);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .build();
    let physical = state
        .physical_optimizers()
        .iter()
        .filter(|rule| rule.name() != "CombinePartialFinalAggregate")
        .cloned()
        .collect();
    let state = SessionStateBuilder::new_from_existing(state)
        .with_physical_optimizer_rules(physical)
        .build();
    let context = SessionContext::new_with_state(state);
    context.remove_optimizer_rule("single_distinct_aggregation_to_group_by");
    Ok(context)
}

/// The plan's one aggregation, as its partial and final stages.
struct Split {
    partial: Arc<dyn ExecutionPlan>,
    final_stage: Arc<dyn ExecutionPlan>,
    states: Feed,
}

/// The partial and final stages of `plan`'s aggregation, if it has exactly one, planned in two.
fn split(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<Split>, DataFusionError> {
    let mut aggregates = Vec::new();
    plan.apply(|node| {
        if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
            aggregates.push((node.clone(), *aggregate.mode()));
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let [(final_stage, AggregateMode::Final | AggregateMode::FinalPartitioned), (partial, AggregateMode::Partial)] =
        aggregates.as_slice()
    else {
        return Ok(None);
    };
    let mut below = false;
    final_stage.apply(|node| {
        below |= same(node, partial);
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(below.then(|| Split {
        partial: partial.clone(),
        final_stage: final_stage.clone(),
        states: Feed::new(partial.schema()),
    }))
}

impl Split {
    fn stages(self, plan: &Arc<dyn ExecutionPlan>) -> Result<Stages, DataFusionError> {
        let final_stage = self
            .final_stage
            .downcast_ref::<AggregateExec>()
            .ok_or_else(|| DataFusionError::Internal("the final stage is an aggregate".into()))?;
        let reduce: Arc<dyn ExecutionPlan> = Arc::new(AggregateExec::try_new(
            AggregateMode::PartialReduce,
            final_stage.group_expr().clone(),
            final_stage.aggr_expr().to_vec(),
            final_stage.filter_expr().to_vec(),
            self.states.exec()?,
            final_stage.input_schema(),
        )?);
        if reduce.schema().fields() != self.partial.schema().fields() {
            return Err(DataFusionError::Internal(
                "partial-reduce states differ from partial states".into(),
            ));
        }
        let states = self.states.exec()?;
        let finish = plan
            .clone()
            .transform_up(|node| {
                Ok(match same(&node, &self.partial) {
                    true => Transformed::yes(states.clone()),
                    false => Transformed::no(node),
                })
            })?
            .data;
        Ok(Stages::Incremental {
            partial: self.partial,
            reduce,
            finish,
        })
    }
}

/// Whether `plan` scans a feed of `schema`.
fn reads(plan: &Arc<dyn ExecutionPlan>, schema: &SchemaRef) -> bool {
    let mut found = false;
    let walked = plan.apply(|node| {
        if let Some(scan) = node.downcast_ref::<StreamingTableExec>() {
            found |= scan.partition_schema() == schema;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found || walked.is_err()
}

fn same(a: &Arc<dyn ExecutionPlan>, b: &Arc<dyn ExecutionPlan>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

fn models_schema() -> SchemaRef {
    Arc::new(ArrowSchema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("provider", DataType::Utf8, false),
        Field::new("input_price_micros", DataType::Int64, false),
        Field::new("output_price_micros", DataType::Int64, false),
    ]))
}

/// The catalogue's models (name, provider, input_price_micros, output_price_micros; prices per
/// million tokens) as the `models` table.
fn models_batch(models: &[ModelSpec]) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        models_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                models.iter().map(|m| m.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                models.iter().map(|m| m.provider.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                models.iter().map(|m| m.input_price_micros),
            )),
            Arc::new(Int64Array::from_iter_values(
                models.iter().map(|m| m.output_price_micros),
            )),
        ],
    )?)
}
