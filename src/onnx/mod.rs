//! ONNX velocity networks (feature `onnx`): a network exported from PyTorch as a step function.
//!
//! [`OnnxStep`] loads a `.onnx` file at run time with the pure-Rust `tract` runtime and answers
//! the [`StepFn`] protocol, so it works with every solver, time schedule, `encode` and guidance.
//! Conventions of the file:
//! - an input named `x`, `[B, *x_dims]`; `x_dims` are read from its declared shape (a symbolic
//!   dimension other than the batch needs [`OnnxStep::with_x_dims`]);
//! - an input named `t`, declared `[B]` or `[B, 1, ..., 1]` (the seed's broadcast shape), or a
//!   scalar / `[1]` when every row shares the time;
//! - any further input is a condition, given with [`OnnxStep::with_condition`]; its first
//!   dimension is the batch when it is the batch symbol (one row per sample, or one row for all);
//! - the first output is the velocity, shaped like `x`.
//!
//! The batch dimension should be symbolic in the file (`dynamic_axes={"x": {0: "batch"}, ...}`
//! in `torch.onnx.export`); a file exported with a fixed batch runs at that batch only. For each
//! batch size actually used, the symbolic graph is specialised to that size and optimised once
//! (a plan fixed to one batch runs about twice as fast as the symbolic one), and the plan's run
//! state is reused across solver steps. tract splits the rows over the pool's threads when
//! each thread gets at least a million multiply-adds (tract's cost model of the graph), with a
//! plan per part; smaller work runs on one thread.
//!
//! With the feature `ort`, [`Runtime::Ort`] runs the same file through ONNX Runtime instead
//! (the `ort` crate, the shared library loaded at run time from a path the user gives), with the
//! same conventions, checks and errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use tract_onnx::prelude as tp;
use tract_onnx::prelude::IntoRunnable;

use crate::convention::TimeConvention;
use crate::error::{Error, Result};
use crate::guidance::check_weight;
use crate::step::{FastVelocity, StepFn};
use crate::XDims;

mod check;
mod fold;
mod load;
mod options;
#[cfg(feature = "ort")]
mod ort_engine;

pub use options::{OrtOptions, Runtime};

/// A declared dimension of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic size, with the name the file gives it (`batch`, `N`, ...).
    Symbol(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

/// One input of the model as the file declares it.
#[derive(Debug, Clone)]
pub struct InputInfo {
    /// The input's name.
    pub name: String,
    /// Its declared shape.
    pub shape: Vec<Dim>,
    /// Its element type, as tract names it (`F32`, `I64`, ...).
    pub dtype: String,
    /// Whether its first dimension is the batch (symbolic, or the fixed batch of the file).
    pub batched: bool,
}

impl InputInfo {
    /// The declared shape as text, e.g. `[batch, 16, 32]`.
    pub fn shape_text(&self) -> String {
        let parts: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", parts.join(", "))
    }
}

/// The engine that runs the graph.
enum Engine {
    Tract(tp::TypedModel),
    #[cfg(feature = "ort")]
    Ort(ort_engine::OrtEngine),
}

/// A plan's runner: tract's optimised plan states (one per thread's rows), or ONNX Runtime's
/// condition values.
enum Runner {
    Tract(Vec<Shard>),
    #[cfg(feature = "ort")]
    Ort(Vec<ort::value::DynValue>),
}

/// The ways a model takes the flow time.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TimeLayout {
    /// `[B]` or `[B, 1, ..., 1]`: one time per row, rank given.
    PerRow(usize),
    /// A scalar or `[1]`-like shape of this rank: one time for every row.
    Shared(usize),
}

/// A declared input's dimensions and element type.
struct Fact {
    dims: Vec<tp::TDim>,
    datum: tp::DatumType,
}

/// A condition input of the model.
#[derive(Debug, Clone)]
struct CondSlot {
    /// Index among the model's inputs.
    input: usize,
    info: InputInfo,
    dims: Vec<tp::TDim>,
    datum: tp::DatumType,
    /// Whether the first dimension is the batch.
    batched: bool,
}

/// A condition's value: `rows` rows (1 = broadcast to every sample) in the declared type.
#[derive(Debug, Clone)]
struct CondValue {
    value: tp::Tensor,
    rows: usize,
}

/// One thread's rows of a tract plan: the run state of a plan specialised to their count, with
/// their rows of the conditions folded in as constants, or (live conditions) fed as inputs.
struct Shard {
    rows: std::ops::Range<usize>,
    state: Box<tp::TypedSimpleState>,
    /// Live conditions: this shard's rows of each condition input, in the file's order (empty
    /// when the conditions are constants of the plan).
    conds: Vec<tp::TValue>,
}

/// Multiply-adds per thread below which tract's rows are not split over threads: a million is
/// tens of microseconds of work against a hand-off of a few; the bench's waypoint transformer
/// has about 19 million per row, a 2-D toy MLP about 0.1 million.
const MIN_FMA_PER_THREAD: u64 = 1 << 20;

/// One optimised plan for one batch size, with its reusable run state and the condition
/// inputs already expanded to that batch.
struct Plan {
    runner: Runner,
    /// Live conditions only: the values changed since the runner's were made (same shapes).
    stale: bool,
}

/// An ONNX velocity network as a step function (see the module documentation).
pub struct OnnxStep {
    path: PathBuf,
    engine: Engine,
    inputs: Vec<InputInfo>,
    x_input: usize,
    x_datum: tp::DatumType,
    x_dims: XDims,
    /// Symbols of `x`'s non-batch dimensions and the sizes they take.
    x_symbols: HashMap<tp::Symbol, usize>,
    /// The symbols that stand for the batch (the first dimension of `x`, `t` and conditions).
    batch_symbols: Vec<tp::Symbol>,
    /// `Some(n)` when the file fixes the batch to `n`.
    fixed_batch: Option<usize>,
    t_input: usize,
    t_layout: TimeLayout,
    t_datum: tp::DatumType,
    conds: Vec<CondSlot>,
    values: HashMap<String, CondValue>,
    nulls: HashMap<String, CondValue>,
    weight: f64,
    /// Plans by (batch of the call, whether it evaluates the null conditions only).
    plans: HashMap<(usize, Half), Plan>,
    /// Whether the plans take the conditions as inputs (kept across new values of the same
    /// shapes) instead of folding them in as constants (rebuilt for every new value).
    live: bool,
    /// tract plans optimised so far, every rebuild counted.
    optimised: usize,
    /// The time convention the network was trained with.
    convention: TimeConvention,
    /// Scratch: the model's own times under [`TimeConvention::NoiseAt1`].
    t_model: Vec<f32>,
    /// Scratch buffers for guided calls.
    x2: Vec<f32>,
    t2: Vec<f32>,
}

impl std::fmt::Debug for OnnxStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxStep")
            .field("path", &self.path)
            .field("runtime", &self.runtime_name())
            .field("inputs", &self.inputs)
            .field("x_dims", &self.x_dims)
            .field("fixed_batch", &self.fixed_batch)
            .field("weight", &self.weight)
            .field("plans", &self.plans.len())
            .field("live", &self.live)
            .field("convention", &self.convention)
            .finish()
    }
}

/// Which condition values a plan's calls use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Half {
    /// The conditions only (`B` rows).
    Cond,
    /// The null conditions only (`B` rows, guidance weight 0).
    Null,
    /// The conditions then the null conditions (`2B` rows, guided).
    Both,
}

fn onnx_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Onnx {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A tract error as one line: its context chain joined by `: `.
fn tract_msg(e: &tp::TractError) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn dim_of(d: &tp::TDim) -> Dim {
    match d.as_i64() {
        Some(n) => Dim::Fixed(n.max(0) as usize),
        None => Dim::Symbol(d.to_string()),
    }
}

fn dtype_name(d: tp::DatumType) -> String {
    format!("{d:?}")
}

impl OnnxStep {
    /// The shape of one sample, from the declared `x` shape or the explicit `x_dims`.
    pub fn x_dims(&self) -> &XDims {
        &self.x_dims
    }

    /// The runtime executing the network: `"tract"` or `"ort"`.
    pub fn runtime_name(&self) -> &'static str {
        match self.engine {
            Engine::Tract(_) => "tract",
            #[cfg(feature = "ort")]
            Engine::Ort(_) => "ort",
        }
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every input as the file declares it.
    pub fn inputs(&self) -> &[InputInfo] {
        &self.inputs
    }

    /// The condition inputs (every input but `x` and `t`), in the file's order.
    pub fn condition_inputs(&self) -> Vec<&InputInfo> {
        self.conds.iter().map(|c| &c.info).collect()
    }

    /// `Some(n)` when the file was exported with the batch fixed to `n`.
    pub fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch
    }

    /// The guidance weight (1.0 unless [`Self::with_guidance`] set one).
    pub fn guidance_weight(&self) -> f64 {
        self.weight
    }

    /// Number of plans held now (one per batch size and guidance half used).
    pub fn plans_built(&self) -> usize {
        self.plans.len()
    }

    /// Number of times tract optimised a plan since loading, every rebuild for a new condition
    /// value included (each costs about as much as a few network calls).
    pub fn plans_optimised(&self) -> usize {
        self.optimised
    }

    /// Whether the conditions are fed to the plans as inputs (see [`Self::with_live_conditions`]).
    pub fn live_conditions(&self) -> bool {
        self.live
    }

    /// Feeds the conditions to tract's plans as inputs instead of folding them into each plan as
    /// constants. A constant condition lets the optimiser compute what depends on it alone once
    /// (a context encoder), but each new value then costs a new plan; a live one costs nothing
    /// when a value of the same shapes replaces it (a control loop's new context every call).
    /// The step switches to live conditions by itself the first time a condition is replaced
    /// by a value of the same shape, so this is needed only to skip that one extra plan.
    ///
    /// ```
    /// use candle_core::Device;
    /// use flow_matching::onnx::OnnxStep;
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
    ///
    /// let ctx = flow_matching::io::read_npy("tests/data/onnx/traj_ctx.npy", &Device::Cpu)?;
    /// let mut v = OnnxStep::load("tests/data/onnx/traj.onnx")?.with_live_conditions(true);
    /// let fm = FlowMatching::new(v.x_dims())?.with_steps(2)?;
    /// for tick in 0..3 {
    ///     v.set_condition("ctx", &(&ctx * (1.0 + tick as f64))?)?; // a new context per tick
    ///     fm.sample(4, &mut v, &Device::Cpu, &SampleOptions::seeded(tick))?;
    /// }
    /// assert_eq!(v.plans_optimised(), 1);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn with_live_conditions(mut self, live: bool) -> Self {
        if self.live != live {
            self.live = live;
            self.plans.clear();
        }
        self
    }

    /// The time convention the network was trained with: from the file's metadata
    /// (`time_convention`: `noise_at_0` or `noise_at_1`), else noise at 0, the crate's.
    pub fn time_convention(&self) -> TimeConvention {
        self.convention
    }

    /// Sets the time convention the network was trained with (overriding the file's metadata).
    /// Under [`TimeConvention::NoiseAt1`] (openpi, LeRobot) the network is evaluated at
    /// `1 - t` and its velocity negated, so every solver and schedule runs it as trained.
    pub fn with_time_convention(mut self, convention: TimeConvention) -> Self {
        self.convention = convention;
        self
    }

    /// The threads the plan for `batch` rows runs on (`None` before that batch is first
    /// sampled): tract splits the rows when each thread gets at least a million multiply-adds;
    /// ONNX Runtime is counted as one (its own intra-op threads aside).
    pub fn plan_threads(&self, batch: usize) -> Option<usize> {
        self.plans
            .iter()
            .find(|((b, _), _)| *b == batch)
            .map(|(_, plan)| match &plan.runner {
                Runner::Tract(shards) => shards.len(),
                #[cfg(feature = "ort")]
                Runner::Ort(_) => 1,
            })
    }

    /// The condition input called `name`; an error listing the model's condition inputs when it
    /// has none of that name.
    pub fn condition_input(&self, name: &str) -> Result<&InputInfo> {
        self.slot(name).map(|s| &s.info)
    }

    fn slot(&self, name: &str) -> Result<&CondSlot> {
        self.conds
            .iter()
            .find(|c| c.info.name == name)
            .ok_or_else(|| {
                let known: Vec<String> = self
                    .conds
                    .iter()
                    .map(|c| format!("{} {}", c.info.name, c.info.shape_text()))
                    .collect();
                Error::OnnxUnknownInput {
                    name: name.to_string(),
                    known: if known.is_empty() {
                        "none (the model takes only x and t)".into()
                    } else {
                        known.join(", ")
                    },
                }
            })
    }

    /// Converts a condition to the declared type after checking its shape against the declared
    /// one (the batch dimension may hold 1 row or any number).
    fn cond_value(&self, name: &str, value: &Tensor, what: &str) -> Result<CondValue> {
        let slot = self.slot(name)?;
        let dims = value.dims();
        let mut ok = dims.len() == slot.dims.len();
        if ok {
            for (i, (d, &g)) in slot.dims.iter().zip(dims).enumerate() {
                if i == 0 && slot.batched {
                    // The batch itself is checked when sampling (check_batch), against the
                    // file's fixed batch too.
                    ok &= g >= 1;
                } else if let Some(n) = d.as_i64() {
                    ok &= n as usize == g;
                } else if let Some(&n) = d
                    .symbols()
                    .iter()
                    .next()
                    .and_then(|s| self.x_symbols.get(s))
                {
                    ok &= n == g;
                }
            }
        }
        if !ok {
            let mut expected = slot.info.shape_text();
            if slot.batched {
                expected.push_str(" with 1 row or one row per sample as the first dimension");
            }
            return Err(Error::Shape {
                what: format!("{what} for the model's input {name:?}"),
                expected,
                got: dims.to_vec(),
            });
        }
        let value = to_tract(value, slot.datum).map_err(|reason| Error::Shape {
            what: format!("{what} for the model's input {name:?}"),
            expected: format!("element type {:?}: {reason}", slot.datum),
            got: dims.to_vec(),
        })?;
        let rows = if slot.batched { dims[0] } else { 1 };
        Ok(CondValue { value, rows })
    }

    /// Sets the condition input `name` (its first dimension: one row per sample, or one row
    /// for every sample); replaces an earlier value.
    ///
    /// ```
    /// use flow_matching::onnx::OnnxStep;
    /// use flow_matching::{Diffusion, FlowMatching, SampleOptions};
    ///
    /// let ctx = flow_matching::io::read_npy("tests/data/onnx/traj_ctx.npy", &candle_core::Device::Cpu)?;
    /// let mut v = OnnxStep::load("tests/data/onnx/traj.onnx")?.with_condition("ctx", &ctx)?;
    /// let fm = FlowMatching::new(v.x_dims())?;
    /// let s = fm.sample(4, &mut v, &candle_core::Device::Cpu, &SampleOptions::seeded(0))?;
    /// assert_eq!(s.x.dims(), &[4, 64, 2]);
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn with_condition(mut self, name: &str, value: &Tensor) -> Result<Self> {
        self.set_condition(name, value)?;
        Ok(self)
    }

    /// Sets the condition input `name` in place (see [`Self::with_condition`]).
    ///
    /// A value of the same shape as the one it replaces keeps the plans: the conditions become
    /// inputs of the plans from then on (see [`Self::with_live_conditions`]).
    pub fn set_condition(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let v = self.cond_value(name, value, "condition")?;
        let same_shape = self
            .values
            .get(name)
            .is_some_and(|old| old.value.shape() == v.value.shape());
        self.values.insert(name.to_string(), v);
        if same_shape && self.live {
            for plan in self.plans.values_mut() {
                plan.stale = true;
            }
        } else {
            // A new shape needs new plans; the first replacement of the same shape switches to
            // live conditions so that later ones cost no plan.
            self.live |= same_shape;
            self.plans.clear();
        }
        Ok(())
    }

    /// Classifier-free guidance with weight `weight`: `v_null + w (v_cond - v_null)`, both from
    /// one call of `2B` rows. `nulls` give the unconditional value of some condition inputs
    /// (the others are the same in both halves). `w = 1` evaluates the conditions only, `w = 0`
    /// the null ones only, each at `B` rows.
    pub fn with_guidance(mut self, weight: f64, nulls: &[(&str, &Tensor)]) -> Result<Self> {
        self.weight = check_weight(weight)?;
        self.nulls.clear();
        for (name, value) in nulls {
            let v = self.cond_value(name, value, "null condition")?;
            self.nulls.insert(name.to_string(), v);
        }
        if self.nulls.is_empty() {
            return Err(Error::invalid(
                "guidance",
                "no null condition",
                "the unconditional value of at least one condition input",
            ));
        }
        self.plans.clear();
        Ok(self)
    }

    /// The condition inputs that still need a value, with their declared shapes.
    pub fn missing_conditions(&self) -> Vec<&InputInfo> {
        self.conds
            .iter()
            .filter(|c| !self.values.contains_key(&c.info.name))
            .map(|c| &c.info)
            .collect()
    }

    /// Checks that every condition input has a value whose rows fit `batch` samples, and that a
    /// fixed-batch file can run at `batch`; sampling would fail with the same error later.
    pub fn check_batch(&self, batch: usize) -> Result<()> {
        if let Some(info) = self.missing_conditions().first() {
            return Err(Error::OnnxMissingInput {
                name: info.name.clone(),
                shape: info.shape_text(),
            });
        }
        let plan_batch = match self.half() {
            Half::Both => 2 * batch,
            _ => batch,
        };
        if let Some(f) = self.fixed_batch {
            if plan_batch != f {
                return Err(Error::OnnxFixedBatch {
                    path: self.path.clone(),
                    fixed: f,
                    asked: plan_batch,
                });
            }
        }
        for (kind, map) in [("condition", &self.values), ("null condition", &self.nulls)] {
            for (name, v) in map {
                if v.rows != 1 && v.rows != batch {
                    let slot = self.slot(name)?;
                    if slot.batched {
                        return Err(Error::Shape {
                            what: format!("{kind} for the model's input {name:?}"),
                            expected: format!("1 row or {batch} rows (one per sample)"),
                            got: v.value.shape().to_vec(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn half(&self) -> Half {
        if self.nulls.is_empty() || self.weight == 1.0 {
            Half::Cond
        } else if self.weight == 0.0 {
            Half::Null
        } else {
            Half::Both
        }
    }

    /// The condition values for a plan of `batch` rows evaluating `half`, in the file's order,
    /// each expanded to the plan's rows when batched.
    fn plan_conds(&self, batch: usize, half: Half) -> Result<Vec<tp::TValue>> {
        let mut conds = Vec::with_capacity(self.conds.len());
        for slot in &self.conds {
            let name = &slot.info.name;
            let cond = &self.values[name];
            let null = self.nulls.get(name).unwrap_or(cond);
            let v = match (slot.batched, half) {
                (false, _) => cond.value.clone(),
                (true, Half::Cond) => expand(&cond.value, batch)?,
                (true, Half::Null) => expand(&null.value, batch)?,
                (true, Half::Both) => {
                    let a = expand(&cond.value, batch)?;
                    let b = expand(&null.value, batch)?;
                    tp::Tensor::stack_tensors(0, &[a, b])
                        .map_err(|e| onnx_err(&self.path, tract_msg(&e)))?
                }
            };
            conds.push(tp::IntoTValue::into_tvalue(v));
        }
        Ok(conds)
    }

    /// Builds (once) the plan for `batch` rows of the current conditions; with live conditions,
    /// refreshes the values a kept plan is fed after they changed.
    fn plan(&mut self, batch: usize, half: Half) -> Result<&mut Plan> {
        let plan_batch = if half == Half::Both { 2 * batch } else { batch };
        if self.plans.get(&(batch, half)).is_some_and(|p| p.stale) {
            let conds = self.plan_conds(batch, half)?;
            #[cfg(feature = "ort")]
            let fresh: Option<Vec<ort::value::DynValue>> = match &self.engine {
                Engine::Tract(_) => None,
                Engine::Ort(_) => Some(
                    conds
                        .iter()
                        .map(|v| ort_engine::to_ort(&self.path, v))
                        .collect::<Result<Vec<_>>>()?,
                ),
            };
            let mut shard_conds = Vec::new();
            if let Some(Plan {
                runner: Runner::Tract(shards),
                ..
            }) = self.plans.get(&(batch, half))
            {
                for shard in shards {
                    shard_conds.push(self.shard_conds(&conds, shard.rows.clone(), plan_batch)?);
                }
            }
            let plan = self
                .plans
                .get_mut(&(batch, half))
                .ok_or_else(|| onnx_err(&self.path, "plan cache"))?;
            match &mut plan.runner {
                Runner::Tract(shards) => {
                    for (shard, c) in shards.iter_mut().zip(shard_conds) {
                        shard.conds = c;
                    }
                }
                #[cfg(feature = "ort")]
                Runner::Ort(values) => {
                    if let Some(v) = fresh {
                        *values = v;
                    }
                }
            }
            plan.stale = false;
        }
        if !self.plans.contains_key(&(batch, half)) {
            self.check_batch(batch)?;
            let conds = self.plan_conds(batch, half)?;
            let runner = match &self.engine {
                Engine::Tract(model) => {
                    let shards = self.tract_shards(model, plan_batch, &conds)?;
                    self.optimised += 1;
                    Runner::Tract(shards)
                }
                #[cfg(feature = "ort")]
                Engine::Ort(_) => Runner::Ort(
                    conds
                        .iter()
                        .map(|v| ort_engine::to_ort(&self.path, v))
                        .collect::<Result<_>>()?,
                ),
            };
            self.plans.insert(
                (batch, half),
                Plan {
                    runner,
                    stale: false,
                },
            );
        }
        self.plans
            .get_mut(&(batch, half))
            .ok_or_else(|| onnx_err(&self.path, "plan cache"))
    }

    /// The model with its batch symbols set to `batch` and the other symbols to the sizes of
    /// `x` and of the conditions' values.
    fn specialised(
        &self,
        model: &tp::TypedModel,
        batch: usize,
        conds: &[tp::TValue],
    ) -> tp::TractResult<tp::TypedModel> {
        let mut subs: HashMap<tp::Symbol, tp::TDim> = HashMap::new();
        for s in &self.batch_symbols {
            subs.insert(s.clone(), tp::TDim::Val(batch as i64));
        }
        for (s, &n) in &self.x_symbols {
            subs.insert(s.clone(), tp::TDim::Val(n as i64));
        }
        // Other symbols of a condition (a variable number of context tokens) take the value's
        // size.
        for (slot, v) in self.conds.iter().zip(conds) {
            for (d, &n) in slot.dims.iter().zip(v.shape()) {
                if let tp::TDim::Sym(s) = d {
                    subs.entry(s.clone()).or_insert(tp::TDim::Val(n as i64));
                }
            }
        }
        model.set_symbols(&subs)
    }

    /// [`Self::specialised`] with every condition input replaced by its value as a constant, so
    /// that optimisation computes what depends on the conditions alone (a context encoder,
    /// cross-attention keys and values) once per plan instead of once per step. The plan's
    /// inputs are then `x` and `t`, in the file's order.
    fn specialised_const(
        &self,
        model: &tp::TypedModel,
        batch: usize,
        conds: &[tp::TValue],
    ) -> tp::TractResult<tp::TypedModel> {
        use tract_onnx::tract_core::ops::konst::Const;
        let mut m = self.specialised(model, batch, conds)?;
        let inputs = m.input_outlets()?.to_vec();
        for (slot, v) in self.conds.iter().zip(conds) {
            let outlet = inputs[slot.input];
            let value = std::sync::Arc::new((**v).clone());
            m.node_mut(outlet.node).op = Box::new(Const::new(value.clone())?);
            m.set_outlet_fact(outlet, tp::TypedFact::try_from(value)?)?;
        }
        let keep: Vec<tp::OutletId> = [self.x_input, self.t_input]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|i| inputs[i])
            .collect();
        m.set_input_outlets(&keep)?;
        Ok(m)
    }

    /// The multiply-adds of one row, from tract's cost model of the graph at batch 1 (`None`
    /// when the graph cannot be specialised or an op's cost is symbolic).
    fn fma_per_row(&self, model: &tp::TypedModel, conds: &[tp::TValue]) -> Option<u64> {
        check::guarded(&self.path, "costing the graph", || {
            Ok(self.fma_per_row_unguarded(model, conds))
        })
        .ok()
        .flatten()
    }

    fn fma_per_row_unguarded(&self, model: &tp::TypedModel, conds: &[tp::TValue]) -> Option<u64> {
        let m = self.specialised(model, 1, conds).ok()?;
        let mut total = 0u64;
        for node in m.nodes() {
            let facts = m.node_input_facts(node.id).ok()?;
            for (cost, n) in node.op.cost(&facts).ok()? {
                if matches!(cost, tract_onnx::tract_core::ops::Cost::FMA(_)) {
                    total = total.saturating_add(u64::try_from(n.to_i64().ok()?).ok()?);
                }
            }
        }
        Some(total)
    }

    /// The rows `rows` of each condition of a plan of `plan_batch` rows (a batched condition
    /// is sliced when the plan is split over threads; the others are shared).
    fn shard_conds(
        &self,
        conds: &[tp::TValue],
        rows: std::ops::Range<usize>,
        plan_batch: usize,
    ) -> Result<Vec<tp::TValue>> {
        let n = rows.len();
        let mut part = Vec::with_capacity(conds.len());
        for (slot, v) in self.conds.iter().zip(conds) {
            part.push(
                if slot.batched && n != plan_batch && v.shape()[0] == plan_batch {
                    let t = v.slice(0, rows.start, rows.end).map_err(|e| {
                        onnx_err(
                            &self.path,
                            format!("cannot plan batch {n}: {}", tract_msg(&e)),
                        )
                    })?;
                    tp::IntoTValue::into_tvalue(t)
                } else {
                    v.clone()
                },
            );
        }
        Ok(part)
    }

    /// tract's plans for `plan_batch` rows: the rows split over the pool's threads when each
    /// gets at least [`MIN_FMA_PER_THREAD`] multiply-adds (never for a fixed-batch file), one
    /// plan per part, specialised to its rows and their conditions.
    fn tract_shards(
        &self,
        model: &tp::TypedModel,
        plan_batch: usize,
        conds: &[tp::TValue],
    ) -> Result<Vec<Shard>> {
        let threads = crate::kernel::available_threads().min(plan_batch);
        let parts = match (self.fixed_batch, threads) {
            (None, 2..) => self.fma_per_row(model, conds).map_or(1, |f| {
                let by_cost = f.saturating_mul(plan_batch as u64) / MIN_FMA_PER_THREAD;
                (by_cost.min(threads as u64) as usize).max(1)
            }),
            _ => 1,
        };
        let per = plan_batch.div_ceil(parts);
        let fail = |n: usize, e: tp::TractError| {
            onnx_err(
                &self.path,
                format!("cannot plan batch {n}: {}", tract_msg(&e)),
            )
        };
        let mut specialised = Vec::with_capacity(parts);
        for start in (0..plan_batch).step_by(per) {
            let rows = start..(start + per).min(plan_batch);
            let n = rows.len();
            let part_conds = self.shard_conds(conds, rows.clone(), plan_batch)?;
            let m = check::guarded(&self.path, "specialising the graph", || {
                if self.live {
                    self.specialised(model, n, &part_conds)
                } else {
                    self.specialised_const(model, n, &part_conds)
                }
                .map_err(|e| fail(n, e))
            })?;
            specialised.push((rows, m, part_conds));
        }
        // The parts run at once: their peaks together must fit, checked before tract's
        // optimiser evaluates (and so allocates) anything at this batch.
        let mut total = 0u64;
        let mut at = String::new();
        for (_, m, _) in &specialised {
            let (peak, node) = check::peak_bytes(m, None).map_err(|e| fail(plan_batch, e))?;
            total = total.saturating_add(peak);
            at = node;
        }
        crate::limits::check_memory(
            &format!(
                "ONNX model {}: a plan for batch {plan_batch}: the tensors its shapes imply (peak at node {:?})",
                self.path.display(),
                crate::describe::excerpt(&at)
            ),
            Some(total),
        )?;
        let mut shards = Vec::with_capacity(parts);
        for (rows, m, part_conds) in specialised {
            let n = rows.len();
            let state = check::guarded(&self.path, "optimising the graph", || {
                m.into_optimized()
                    .and_then(|m| m.into_runnable())
                    .and_then(|p| p.spawn())
                    .map_err(|e| fail(n, e))
            })?;
            shards.push(Shard {
                rows,
                state: Box::new(state),
                conds: if self.live { part_conds } else { Vec::new() },
            });
        }
        Ok(shards)
    }

    /// Runs the network on `rows` rows of `x` (flat f32) at times `t` (one per row, or one).
    fn run_rows(
        &mut self,
        x: &[f32],
        t: &[f32],
        rows: usize,
        batch: usize,
        half: Half,
        out: &mut [f32],
    ) -> Result<()> {
        let x_shape = self.x_dims.batched(rows);
        let full: Vec<f32>;
        let (t_shape, t_vals) = match self.t_layout {
            TimeLayout::PerRow(rank) => {
                let mut shape = vec![1usize; rank];
                shape[0] = rows;
                let vals = if t.len() == rows {
                    t
                } else {
                    full = vec![t[0]; rows];
                    &full
                };
                (shape, vals)
            }
            TimeLayout::Shared(rank) => {
                if t.iter().any(|&v| v != t[0]) {
                    return Err(onnx_err(
                        &self.path,
                        "input t is declared as one time for every row, but the rows' times differ",
                    ));
                }
                (vec![1usize; rank], &t[..1])
            }
        };
        self.plan(batch, half)?;
        let cond_inputs: Vec<usize> = self.conds.iter().map(|c| c.input).collect();
        let OnnxStep {
            path,
            engine,
            plans,
            x_input,
            t_input,
            x_datum,
            t_datum,
            t_layout,
            ..
        } = self;
        let plan = plans
            .get_mut(&(batch, half))
            .ok_or_else(|| onnx_err(path, "plan cache"))?;
        match (&mut plan.runner, engine) {
            (Runner::Tract(shards), _) => {
                let d = x.len() / rows;
                let run = |shard: &mut Shard, out: &mut [f32]| -> Result<()> {
                    let n = shard.rows.len();
                    let xs = &x[shard.rows.start * d..shard.rows.end * d];
                    let ts = if t_vals.len() == rows && n != rows {
                        &t_vals[shard.rows.clone()]
                    } else {
                        t_vals
                    };
                    let mut x_shape = x_shape.clone();
                    x_shape[0] = n;
                    let mut t_shape = t_shape.clone();
                    if matches!(t_layout, TimeLayout::PerRow(_)) {
                        t_shape[0] = n;
                    }
                    let feeds = (*x_input, *x_datum, xs, &x_shape[..]);
                    run_tract(
                        path,
                        shard,
                        feeds,
                        (*t_input, *t_datum, ts, &t_shape[..]),
                        &cond_inputs,
                        out,
                    )
                };
                if let [shard] = shards.as_mut_slice() {
                    return run(shard, out);
                }
                use rayon::prelude::*;
                let per = shards[0].rows.len() * d;
                shards
                    .par_iter_mut()
                    .zip(out.par_chunks_mut(per))
                    .map(|(shard, out)| run(shard, out))
                    .collect::<Result<Vec<()>>>()?;
                Ok(())
            }
            #[cfg(feature = "ort")]
            (Runner::Ort(values), Engine::Ort(session)) => {
                let feeds: Vec<(usize, &ort::value::DynValue)> =
                    cond_inputs.into_iter().zip(values.iter()).collect();
                check::guarded(path, "running the network", || {
                    session.run(
                        path,
                        (*x_input, &x_shape, x, *x_datum),
                        (*t_input, &t_shape, t_vals, *t_datum),
                        &feeds,
                        out,
                    )
                })
            }
            #[cfg(feature = "ort")]
            _ => Err(onnx_err(path, "plan and engine disagree")),
        }
    }

    /// The (guided) velocity of `x` `[B, D]` flat at times `t` (B values, or one) into `out`, in
    /// the crate's convention (noise at t = 0) whatever the network's.
    pub fn velocity(&mut self, x: &[f32], t: &[f32], out: &mut [f32]) -> Result<()> {
        let d = self.x_dims.numel();
        let batch = x.len() / d;
        if batch == 0 || x.len() != batch * d || out.len() != x.len() {
            return Err(Error::Shape {
                what: "state for the ONNX network".into(),
                expected: format!("[B, {}] flattened", self.x_dims),
                got: vec![x.len()],
            });
        }
        if t.len() != 1 && t.len() != batch {
            return Err(Error::Shape {
                what: "times for the ONNX network".into(),
                expected: format!("1 or {batch} values"),
                got: vec![t.len()],
            });
        }
        if self.convention == TimeConvention::NoiseAt1 {
            let mut tm = std::mem::take(&mut self.t_model);
            tm.clear();
            tm.extend(t.iter().map(|&s| TimeConvention::NoiseAt1.model_time(s)));
            let r = self.velocity_model_time(x, &tm, out);
            self.t_model = tm;
            r?;
            for v in out.iter_mut() {
                *v = -*v;
            }
            return Ok(());
        }
        self.velocity_model_time(x, t, out)
    }

    /// [`Self::velocity`] at the network's own times, the time convention aside.
    fn velocity_model_time(&mut self, x: &[f32], t: &[f32], out: &mut [f32]) -> Result<()> {
        let batch = x.len() / self.x_dims.numel();
        let half = self.half();
        if half != Half::Both {
            return self.run_rows(x, t, batch, batch, half, out);
        }
        let mut x2 = std::mem::take(&mut self.x2);
        let mut t2 = std::mem::take(&mut self.t2);
        x2.clear();
        x2.extend_from_slice(x);
        x2.extend_from_slice(x);
        t2.clear();
        t2.extend_from_slice(t);
        if t.len() == batch {
            t2.extend_from_slice(t);
        }
        let mut v2 = vec![0.0f32; 2 * x.len()];
        let r = self.run_rows(&x2, &t2, 2 * batch, batch, half, &mut v2);
        self.x2 = x2;
        self.t2 = t2;
        r?;
        let w = self.weight as f32;
        let (vc, vu) = v2.split_at(x.len());
        for ((o, &c), &u) in out.iter_mut().zip(vc).zip(vu) {
            *o = u + w * (c - u);
        }
        Ok(())
    }
}

/// Runs one shard's rows: `x` and `t` (input index in the file, declared type, values, shape),
/// with the shard's live conditions at the inputs `cond_inputs` (none when they are constants of
/// the plan), the velocity into `out`.
fn run_tract(
    path: &Path,
    shard: &mut Shard,
    x: (usize, tp::DatumType, &[f32], &[usize]),
    t: (usize, tp::DatumType, &[f32], &[usize]),
    cond_inputs: &[usize],
    out: &mut [f32],
) -> Result<()> {
    let err = |e: tp::TractError| onnx_err(path, tract_msg(&e));
    let x_t = tp::IntoTValue::into_tvalue(make_float(x.3, x.2, x.1).map_err(err)?);
    let t_t = tp::IntoTValue::into_tvalue(make_float(t.3, t.2, t.1).map_err(err)?);
    // The plan's inputs in the file's order: x, t and the live conditions.
    let mut feeds: Vec<(usize, tp::TValue)> = vec![(x.0, x_t), (t.0, t_t)];
    feeds.extend(cond_inputs.iter().copied().zip(shard.conds.iter().cloned()));
    feeds.sort_by_key(|(i, _)| *i);
    let feeds: tp::TVec<tp::TValue> = feeds.into_iter().map(|(_, v)| v).collect();
    let outputs = check::guarded(path, "running the network", || {
        shard.state.run(feeds).map_err(|e| {
            onnx_err(
                path,
                format!("running the network failed: {}", tract_msg(&e)),
            )
        })
    })?;
    let v = outputs
        .first()
        .ok_or_else(|| onnx_err(path, "the network returned no output"))?;
    if v.shape() != x.3 {
        return Err(Error::StepShape {
            expected: x.3.to_vec(),
            got: v.shape().to_vec(),
        });
    }
    let v = v.cast_to::<f32>().map_err(err)?;
    let view = v.to_plain_array_view::<f32>().map_err(err)?;
    for (o, &a) in out.iter_mut().zip(view.iter()) {
        *o = a;
    }
    Ok(())
}

/// Repeats a one-row tensor to `batch` rows; a tensor of `batch` rows is returned as is.
fn expand(t: &tp::Tensor, batch: usize) -> Result<tp::Tensor> {
    let rows = t.shape().first().copied().unwrap_or(1);
    if rows == batch {
        return Ok(t.clone());
    }
    let parts: Vec<tp::Tensor> = (0..batch).map(|_| t.clone()).collect();
    tp::Tensor::stack_tensors(0, &parts).map_err(|e| Error::Shape {
        what: format!("condition ({})", tract_msg(&e)),
        expected: format!("1 or {batch} rows"),
        got: t.shape().to_vec(),
    })
}

/// A float tensor of the declared type from f32 values.
fn make_float(shape: &[usize], v: &[f32], datum: tp::DatumType) -> tp::TractResult<tp::Tensor> {
    if datum == tp::DatumType::F64 {
        let w: Vec<f64> = v.iter().map(|&a| a as f64).collect();
        tp::Tensor::from_shape(shape, &w)
    } else {
        tp::Tensor::from_shape(shape, v)
    }
}

/// A candle tensor as a tract tensor of the declared element type.
fn to_tract(t: &Tensor, datum: tp::DatumType) -> std::result::Result<tp::Tensor, String> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all().map_err(|e| e.to_string())?;
    let cast = |dt: DType| flat.to_dtype(dt).map_err(|e| e.to_string());
    let r = match datum {
        tp::DatumType::F32 => {
            tp::Tensor::from_shape(&shape, &cast(DType::F32)?.to_vec1::<f32>().map_err(s)?)
        }
        tp::DatumType::F64 => {
            tp::Tensor::from_shape(&shape, &cast(DType::F64)?.to_vec1::<f64>().map_err(s)?)
        }
        tp::DatumType::I64 => {
            let v = integers(&flat)?;
            tp::Tensor::from_shape(&shape, &v)
        }
        tp::DatumType::I32 => {
            let v: Vec<i32> = integers(&flat)?.into_iter().map(|a| a as i32).collect();
            tp::Tensor::from_shape(&shape, &v)
        }
        tp::DatumType::Bool => {
            let v: Vec<bool> = integers(&flat)?.into_iter().map(|a| a != 0).collect();
            tp::Tensor::from_shape(&shape, &v)
        }
        other => return Err(format!("inputs of type {other:?} are not supported")),
    };
    r.map_err(|e| tract_msg(&e))
}

fn s(e: candle_core::Error) -> String {
    e.to_string()
}

/// Integer values of a flat tensor; refuses fractional values (a float file for an integer input).
fn integers(flat: &Tensor) -> std::result::Result<Vec<i64>, String> {
    let v = flat
        .to_dtype(DType::F64)
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(s)?;
    v.iter()
        .map(|&a| {
            if a.fract() == 0.0 && a.is_finite() {
                Ok(a as i64)
            } else {
                Err(format!("the value {a} is not an integer"))
            }
        })
        .collect()
}

impl StepFn for OnnxStep {
    fn step(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let xv = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let tv = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = vec![0.0f32; xv.len()];
        self.velocity(&xv, &tv, &mut out)?;
        Ok(Tensor::from_vec(out, x.dims(), x.device())?.to_dtype(x.dtype())?)
    }

    fn step_at(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let xv = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = vec![0.0f32; xv.len()];
        self.velocity(&xv, &[t as f32], &mut out)?;
        Ok(Tensor::from_vec(out, x.dims(), x.device())?.to_dtype(x.dtype())?)
    }

    fn fast_velocity(&mut self) -> Option<Box<dyn FastVelocity + '_>> {
        Some(Box::new(Fast(self)))
    }
}

/// The slice-level form used by the Euler fast path.
struct Fast<'a>(&'a mut OnnxStep);

impl FastVelocity for Fast<'_> {
    fn velocity(&mut self, x: &[f32], t: f32, out: &mut [f32]) -> Result<()> {
        self.0.velocity(x, &[t], out)
    }
}
