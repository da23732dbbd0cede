//! The SQL engine: a high-cardinality `GROUP BY` run by DataFusion with its
//! memory drawn from the Query budget through the governor's
//! [`GovernorPool`], spilling to disk when the governor refuses (through
//! the library's uncached spill files), and the
//! reference answer computed without DataFusion to check it against.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use datafusion::{
    arrow::{
        array::{Int64Array, RecordBatch},
        datatypes::{DataType, Field, Schema},
    },
    datasource::MemTable,
    execution::{
        disk_manager::{DiskManagerBuilder, DiskManagerMode},
        memory_pool::MemoryPool,
        runtime_env::RuntimeEnvBuilder,
    },
    physical_plan::{ExecutionPlan, execute_stream, metrics::MetricsSet},
    prelude::{SessionConfig, SessionContext},
};
use nodedb_governor::{
    EngineId, MemoryGovernor, datafusion_pool::GovernorPool, datafusion_spill::UncachedSpillFiles,
};

/// The input: `rows` rows of (k, v), with `keys` distinct keys.
#[derive(Clone, Copy, Debug)]
pub struct GroupByData {
    pub rows: usize,
    pub keys: u64,
    pub seed: u64,
}

/// One output row: key, SUM(v), COUNT(*).
pub type Group = (i64, i64, i64);

impl GroupByData {
    /// Deterministic pseudo-random keys and values (splitmix64), in batches.
    pub fn batches(&self, batch_rows: usize) -> Result<(Arc<Schema>, Vec<RecordBatch>)> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let mut state = self.seed;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut batches = Vec::new();
        let mut left = self.rows;
        while left > 0 {
            let n = left.min(batch_rows);
            let mut k = Vec::with_capacity(n);
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                k.push((next() % self.keys) as i64);
                v.push((next() % 1000) as i64);
            }
            batches.push(RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(k)), Arc::new(Int64Array::from(v))],
            )?);
            left -= n;
        }
        Ok((schema, batches))
    }
}

/// Calls `f` with each group of the answer, computed without DataFusion
/// by sorting the rows by key (faster than hashing millions of groups, and
/// nothing but the rows is held), in key order.
fn reference_groups(batches: &[RecordBatch], mut f: impl FnMut(Group)) {
    let mut rows: Vec<(i64, i64)> = Vec::new();
    for b in batches {
        let k = b.column(0).as_any().downcast_ref::<Int64Array>();
        let v = b.column(1).as_any().downcast_ref::<Int64Array>();
        if let (Some(k), Some(v)) = (k, v) {
            rows.extend(k.values().iter().copied().zip(v.values().iter().copied()));
        }
    }
    rows.sort_unstable_by_key(|r| r.0);
    for run in rows.chunk_by(|a, b| a.0 == b.0) {
        f((run[0].0, run.iter().map(|r| r.1).sum(), run.len() as i64));
    }
}

/// The answer computed without DataFusion, sorted by key.
pub fn reference(batches: &[RecordBatch]) -> Vec<Group> {
    let mut out = Vec::new();
    reference_groups(batches, |g| out.push(g));
    out
}

/// An order-independent digest of a set of groups: a database streams a
/// result to its client rather than holding it, and so does the
/// validation workload, which checks the stream against the reference's
/// digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupsDigest {
    pub groups: u64,
    pub hash: u64,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl GroupsDigest {
    pub fn add(&mut self, (k, s, c): Group) {
        self.groups += 1;
        let h = mix(k as u64 ^ mix(s as u64 ^ mix(c as u64)));
        self.hash = self.hash.wrapping_add(h);
    }
}

/// The reference's digest (the groups are not kept).
pub fn reference_digest(batches: &[RecordBatch]) -> GroupsDigest {
    let mut d = GroupsDigest::default();
    reference_groups(batches, |g| d.add(g));
    d
}

/// Where DataFusion may spill: a directory, or nowhere.
#[derive(Clone, Debug)]
pub enum Spill {
    To(PathBuf),
    Disabled,
}

/// What a GROUP BY returned and how much it spilled.
#[derive(Debug)]
pub struct GroupByOutcome {
    /// The groups, sorted by key.
    pub groups: Vec<Group>,
    /// Spill files written and bytes spilled, summed over the plan.
    pub spill_count: usize,
    pub spilled_bytes: usize,
}

/// Sums a metric over every operator of an executed plan.
fn plan_sum(plan: &Arc<dyn ExecutionPlan>, f: &impl Fn(&MetricsSet) -> Option<usize>) -> usize {
    plan.metrics().as_ref().and_then(f).unwrap_or(0)
        + plan
            .children()
            .into_iter()
            .map(|c| plan_sum(c, f))
            .sum::<usize>()
}

/// `SELECT k, SUM(v), COUNT(*) FROM t GROUP BY k` over `batches`, with
/// DataFusion's memory drawn from `engine`'s budget through the governor's
/// pool (or from the pool given).
pub struct GroupBy<'g> {
    pub governor: &'g MemoryGovernor,
    pub engine: EngineId,
    pub schema: Arc<Schema>,
    pub batches: Vec<RecordBatch>,
    /// DataFusion's target partitions (the input is split as many ways).
    pub partitions: usize,
    pub spill: Spill,
    /// DataFusion's pool instead of the governor's (the static baseline:
    /// `FairSpillPool` at the engine's budget); None: [`GovernorPool`].
    pub pool: Option<Arc<dyn MemoryPool>>,
}

impl GroupBy<'_> {
    /// The session and the physical plan.
    async fn plan(self) -> Result<(SessionContext, Arc<dyn ExecutionPlan>)> {
        let pool: Arc<dyn MemoryPool> = match self.pool {
            Some(pool) => pool,
            None => Arc::new(GovernorPool::new(self.governor, self.engine)?),
        };
        // Spill files through the library's factory: written and read
        // back without staying in the page cache.
        let disk = match self.spill {
            Spill::To(dir) => DiskManagerBuilder::default()
                .with_temp_file_factory(Arc::new(UncachedSpillFiles::new(&dir)?)),
            Spill::Disabled => DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        };
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool)
            .with_disk_manager_builder(disk)
            .build_arc()?;
        let config = SessionConfig::new()
            .with_target_partitions(self.partitions)
            .with_batch_size(8192);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        // One partition of input per target partition.
        let per = self.batches.len().div_ceil(self.partitions.max(1)).max(1);
        let parts: Vec<Vec<RecordBatch>> = self.batches.chunks(per).map(<[_]>::to_vec).collect();
        ctx.register_table("t", Arc::new(MemTable::try_new(self.schema, parts)?))?;
        let plan = ctx
            .sql("SELECT k, SUM(v) AS s, COUNT(*) AS c FROM t GROUP BY k")
            .await?
            .create_physical_plan()
            .await?;
        Ok((ctx, plan))
    }

    /// Runs the query, its result streamed (each batch dropped once read)
    /// into `sink` a group at a time; returns the spill files written and
    /// the bytes spilled, summed over the plan.
    pub async fn run_into(self, mut sink: impl FnMut(Group)) -> Result<(usize, usize)> {
        use futures::StreamExt;
        let (ctx, plan) = self.plan().await?;
        let mut stream = execute_stream(plan.clone(), ctx.task_ctx())?;
        while let Some(b) = stream.next().await {
            rows(&b?, &mut sink)?;
        }
        Ok((
            plan_sum(&plan, &MetricsSet::spill_count),
            plan_sum(&plan, &MetricsSet::spilled_bytes),
        ))
    }

    /// Runs the query; its groups, sorted by key.
    pub async fn run(self) -> Result<GroupByOutcome> {
        let mut groups = Vec::new();
        let (spill_count, spilled_bytes) = self.run_into(|g| groups.push(g)).await?;
        groups.sort_unstable();
        Ok(GroupByOutcome {
            groups,
            spill_count,
            spilled_bytes,
        })
    }
}

/// Calls `f` with each row of a result batch.
fn rows(b: &RecordBatch, mut f: impl FnMut(Group)) -> Result<()> {
    let col = |i: usize| {
        b.column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .with_context(|| format!("column {i} of the result is not Int64"))
    };
    let (k, s, c) = (col(0)?, col(1)?, col(2)?);
    for i in 0..b.num_rows() {
        f((k.value(i), s.value(i), c.value(i)));
    }
    Ok(())
}
