//! The training run's hyper-parameters and their checkpoint form.

use std::collections::HashMap;

use crate::coupling::Coupling;
use crate::error::{Error, Result};
use crate::flow_matching::TimestepSampler;
use crate::train::optim::{lr_at, AdamWParams, LrSchedule};

/// Everything that decides a training run; the same config and seed give the same weights.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Total optimiser steps (at least 1).
    pub steps: usize,
    /// Samples per step (at least 1).
    pub batch_size: usize,
    /// Peak learning rate (> 0).
    pub lr: f64,
    /// AdamW's betas, eps and weight decay.
    pub adamw: AdamWParams,
    /// Clip the global L2 norm of the gradients to this value; `None` turns clipping off.
    pub max_grad_norm: Option<f64>,
    /// Steps of linear warm-up at the start.
    pub warmup_steps: usize,
    /// The learning rate after the warm-up.
    pub schedule: LrSchedule,
    /// EMA decay, in [0, 1).
    pub ema_decay: f64,
    /// Ramp the EMA decay up as `min(decay, (1 + n) / (10 + n))` (see [`super::Ema`]).
    pub ema_warmup: bool,
    /// How the times `t` are drawn.
    pub timestep_sampler: TimestepSampler,
    /// Probability of replacing a label by the null class (classifier-free guidance), in [0, 1].
    pub cond_drop_rate: f64,
    /// Seed of the initial weights and of every step's random draws.
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only at the end), when a path is set.
    pub checkpoint_every: usize,
    /// How each batch pairs noise with data (independent, or minibatch optimal transport).
    pub coupling: Coupling,
}

impl Default for TrainConfig {
    /// 1000 steps of batch 256 at lr 1e-3, AdamW (0.9, 0.999, 1e-8, no weight decay),
    /// clipping at 1.0, no warm-up, constant lr, EMA 0.999 with warm-up, the Beta timestep
    /// sampler, a 0.1 label drop rate, seed 0, a checkpoint every 1000 steps, independent
    /// coupling.
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch_size: 256,
            lr: 1e-3,
            adamw: AdamWParams::default(),
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
            schedule: LrSchedule::Constant,
            ema_decay: 0.999,
            ema_warmup: true,
            timestep_sampler: TimestepSampler::default(),
            cond_drop_rate: 0.1,
            seed: 0,
            checkpoint_every: 1000,
            coupling: Coupling::Independent,
        }
    }
}

impl TrainConfig {
    /// Checks every value; the error names the value and what is allowed.
    ///
    /// ```
    /// use flow_matching::train::TrainConfig;
    /// let bad = TrainConfig { steps: 0, ..TrainConfig::default() };
    /// assert_eq!(bad.validate().unwrap_err().to_string(), "invalid steps 0: at least 1");
    /// ```
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::invalid("steps", 0, "at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch size", 0, "at least 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid(
                "learning rate",
                self.lr,
                "a finite number > 0",
            ));
        }
        self.adamw.validate()?;
        if let Some(n) = self.max_grad_norm {
            if !(n > 0.0 && n.is_finite()) {
                return Err(Error::invalid(
                    "max gradient norm",
                    n,
                    "a finite number > 0 (or no clipping)",
                ));
            }
        }
        if let LrSchedule::Cosine { min_lr } = self.schedule {
            if !(min_lr >= 0.0 && min_lr <= self.lr) {
                return Err(Error::invalid(
                    "cosine floor min_lr",
                    min_lr,
                    format!("a number in [0, lr = {}]", self.lr),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(Error::invalid(
                "EMA decay",
                self.ema_decay,
                "a number in [0, 1)",
            ));
        }
        if !(0.0..=1.0).contains(&self.cond_drop_rate) {
            return Err(Error::invalid(
                "condition drop rate",
                self.cond_drop_rate,
                "a probability in [0, 1]",
            ));
        }
        if let TimestepSampler::LogitNormal { mean, std } = self.timestep_sampler {
            if !(std > 0.0 && std.is_finite() && mean.is_finite()) {
                return Err(Error::invalid(
                    "logit-normal timestep sampler",
                    format!("mean {mean}, std {std}"),
                    "a finite mean and a finite std > 0",
                ));
            }
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        lr_at(step, self.steps, self.lr, self.warmup_steps, self.schedule)
    }

    /// The config as checkpoint metadata entries (`train.*`, all strings; floats in Rust's
    /// shortest round-trip form, so reading them back is exact).
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let sampler = match self.timestep_sampler {
            TimestepSampler::Uniform => "uniform".to_string(),
            TimestepSampler::Beta => "beta".to_string(),
            TimestepSampler::LogitNormal { mean, std } => format!("logit-normal:{mean},{std}"),
        };
        let entries = [
            ("steps", self.steps.to_string()),
            ("batch_size", self.batch_size.to_string()),
            ("lr", self.lr.to_string()),
            ("beta1", self.adamw.beta1.to_string()),
            ("beta2", self.adamw.beta2.to_string()),
            ("eps", self.adamw.eps.to_string()),
            ("weight_decay", self.adamw.weight_decay.to_string()),
            (
                "max_grad_norm",
                self.max_grad_norm
                    .map_or("none".to_string(), |n| n.to_string()),
            ),
            ("warmup_steps", self.warmup_steps.to_string()),
            ("schedule", self.schedule.to_string()),
            ("ema_decay", self.ema_decay.to_string()),
            ("ema_warmup", self.ema_warmup.to_string()),
            ("timestep_sampler", sampler),
            ("cond_drop_rate", self.cond_drop_rate.to_string()),
            ("seed", self.seed.to_string()),
            ("checkpoint_every", self.checkpoint_every.to_string()),
            ("coupling", self.coupling.to_string()),
        ];
        entries
            .into_iter()
            .map(|(k, v)| (format!("train.{k}"), v))
            .collect()
    }

    /// Reads the config back from checkpoint metadata; a missing or malformed entry is an
    /// error naming it (except `train.coupling`, absent from older checkpoints: independent).
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Self> {
        fn get<'a>(meta: &'a HashMap<String, String>, key: &str) -> Result<&'a str> {
            meta.get(&format!("train.{key}"))
                .map(String::as_str)
                .ok_or_else(|| {
                    Error::Training(format!(
                        "checkpoint metadata has no \"train.{key}\" entry (not a training checkpoint?)"
                    ))
                })
        }
        fn num<T: std::str::FromStr>(meta: &HashMap<String, String>, key: &str) -> Result<T> {
            let v = get(meta, key)?;
            v.parse().map_err(|_| {
                Error::Training(format!(
                    "checkpoint metadata \"train.{key}\" is {:?}, not a valid number",
                    crate::limits::excerpt(v)
                ))
            })
        }
        let max_grad_norm = match get(meta, "max_grad_norm")? {
            "none" => None,
            _ => Some(num(meta, "max_grad_norm")?),
        };
        let ema_warmup = match get(meta, "ema_warmup")? {
            "true" => true,
            "false" => false,
            other => {
                return Err(Error::Training(format!(
                    "checkpoint metadata \"train.ema_warmup\" is {:?}, expected true or false",
                    crate::limits::excerpt(other)
                )))
            }
        };
        let config = TrainConfig {
            steps: num(meta, "steps")?,
            batch_size: num(meta, "batch_size")?,
            lr: num(meta, "lr")?,
            adamw: AdamWParams {
                beta1: num(meta, "beta1")?,
                beta2: num(meta, "beta2")?,
                eps: num(meta, "eps")?,
                weight_decay: num(meta, "weight_decay")?,
            },
            max_grad_norm,
            warmup_steps: num(meta, "warmup_steps")?,
            schedule: get(meta, "schedule")?.parse()?,
            ema_decay: num(meta, "ema_decay")?,
            ema_warmup,
            timestep_sampler: get(meta, "timestep_sampler")?.parse()?,
            cond_drop_rate: num(meta, "cond_drop_rate")?,
            seed: num(meta, "seed")?,
            checkpoint_every: num(meta, "checkpoint_every")?,
            coupling: match meta.get("train.coupling") {
                Some(c) => c.parse()?,
                None => Coupling::Independent,
            },
        };
        config.validate()?;
        Ok(config)
    }
}
