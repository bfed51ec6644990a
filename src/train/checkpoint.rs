//! Training checkpoints: a velocity-mlp file whose spec keys hold the EMA weights (so any
//! reader gets the EMA model), plus `raw.*` weights, `optim.m.*` / `optim.v.*` moments, the
//! loss history `train.losses` and `train.*` metadata (step count and config).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::{sorted_vars, AdamW, Ema, TrainConfig, TrainableModel, Trainer};
use crate::error::{Error, Result};
use crate::model::{first_non_finite, VelocityMlp};

/// Metadata key of the number of steps taken.
const STEP_KEY: &str = "train.step";
/// Tensor key of the loss history `[steps taken]`.
const LOSSES_KEY: &str = "train.losses";

impl<M: TrainableModel> Trainer<M> {
    /// Writes a checkpoint atomically: the EMA model under the spec's keys, the rest under
    /// `raw.`, `optim.m.`, `optim.v.` and `train.` keys.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut extra = Vec::with_capacity(3 * self.vars.len() + 1);
        for (i, (k, v)) in self.vars.iter().enumerate() {
            extra.push((format!("raw.{k}"), v.as_tensor().detach()));
            extra.push((format!("optim.m.{k}"), self.optim.m[i].clone()));
            extra.push((format!("optim.v.{k}"), self.optim.v[i].clone()));
        }
        if !self.losses.is_empty() {
            let n = self.losses.len();
            extra.push((
                LOSSES_KEY.to_string(),
                Tensor::from_vec(self.losses.clone(), n, &Device::Cpu)?,
            ));
        }
        if let Some(reason) = diverged(&self.losses) {
            return Err(Error::Training(format!(
                "{reason}; checkpoint {} not written (an existing file is left as it was); lower the learning rate?",
                path.as_ref().display()
            )));
        }
        let mut meta = self.config.to_metadata();
        meta.insert(STEP_KEY.to_string(), self.step.to_string());
        // save_with_metadata refuses NaN or infinite weights, EMA and moments alike.
        self.ema_model()?
            .save_with_metadata(path.as_ref(), &extra, &meta)
    }

    /// Continues a run of any model kind from a checkpoint written by
    /// [`Trainer::save_checkpoint`] (see [`Trainer::resume`] for the velocity-mlp).
    ///
    /// ```no_run
    /// use flow_matching::train::Trainer;
    /// use flow_matching::VelocityMlp;
    /// let t = Trainer::<VelocityMlp>::resume_model("run.safetensors", &candle_core::Device::Cpu)?;
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn resume_model(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::limits::read_input(path)?;
        let bad = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        drop(bytes);
        let (model_config, mut tensors) = M::read_file(path, device)?;
        let mut all: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(key) = first_non_finite(&all)? {
            return Err(Error::NonFiniteWeights {
                what: format!("checkpoint {}", path.display()),
                key,
                action: "cannot resume from it (the run it came from had diverged)".into(),
            });
        }
        drop(all);
        let step: usize = meta
            .get(STEP_KEY)
            .ok_or_else(|| {
                bad(format!(
                    "metadata has no {STEP_KEY:?} entry (not a training checkpoint?)"
                ))
            })?
            .parse()
            .map_err(|_| bad(format!("metadata {STEP_KEY:?} is not a step count")))?;
        let config = TrainConfig::from_metadata(&meta).map_err(|e| bad(e.to_string()))?;

        // The EMA model checks the spec keys' shapes; the others must match them.
        let ema_model = M::from_tensors(model_config.clone(), &tensors, path)?;
        let mut take = |key: String, like: &Tensor| -> Result<Tensor> {
            let t = tensors.remove(&key).ok_or_else(|| {
                bad(format!(
                    "missing tensor {key:?} (expected shape {:?}; a plain model file holds no training state)",
                    like.dims()
                ))
            })?;
            if t.dims() != like.dims() {
                return Err(Error::ModelTensorShape {
                    path: path.to_path_buf(),
                    key,
                    expected: like.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        let varmap = VarMap::new();
        let mut model_tensors = HashMap::new();
        let (mut m, mut v, mut shadow) = (Vec::new(), Vec::new(), Vec::new());
        let spec: Vec<(String, Tensor)> = ema_model.tensors();
        {
            let mut data = varmap.data().lock().map_err(|_| {
                crate::Error::Training("the variable map's lock is poisoned".into())
            })?;
            for (k, ema) in &spec {
                if M::is_fixed(k) {
                    model_tensors.insert(k.clone(), ema.clone());
                    continue;
                }
                let var = Var::from_tensor(&take(format!("raw.{k}"), ema)?)?;
                model_tensors.insert(k.clone(), var.as_tensor().clone());
                data.insert(k.clone(), var);
            }
        }
        let vars = sorted_vars(&varmap)?;
        for (k, _) in &vars {
            let ema = spec
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| bad(format!("missing tensor {k:?}")))?;
            m.push(take(format!("optim.m.{k}"), &ema)?);
            v.push(take(format!("optim.v.{k}"), &ema)?);
            shadow.push(ema);
        }
        let losses = match tensors.remove(LOSSES_KEY) {
            Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        if losses.len() != step {
            return Err(bad(format!(
                "{LOSSES_KEY:?} holds {} losses but the checkpoint is at step {step}",
                losses.len()
            )));
        }
        let model = M::from_tensors(model_config, &model_tensors, path)?;
        let optim = AdamW {
            params: config.adamw,
            m,
            v,
            step: step as u64,
        };
        let ema = Ema {
            decay: config.ema_decay,
            warmup: config.ema_warmup,
            shadow,
        };
        Self::assemble(config, varmap, vars, model, optim, ema, step, losses)
    }
}

impl Trainer<VelocityMlp> {
    /// Continues a velocity-mlp run from a checkpoint written by [`Trainer::save_checkpoint`];
    /// training it to the end gives bit for bit the weights and losses of the uninterrupted run.
    ///
    /// ```no_run
    /// use flow_matching::train::Trainer;
    /// let mut trainer = Trainer::resume("run.safetensors", &candle_core::Device::Cpu)?;
    /// # Ok::<(), flow_matching::Error>(())
    /// ```
    pub fn resume(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::resume_model(path, device)
    }
}

/// Why a run's losses say it diverged, if they do: a non-finite loss, or the mean of the
/// last 50 losses over 100 times the mean of the first 50 (a flow-matching loss starts near
/// the data's variance plus the noise's and falls; a learning rate far too high sends it to
/// 1e6 and beyond within a few steps).
pub(crate) fn diverged(losses: &[f32]) -> Option<String> {
    if let Some(i) = losses.iter().position(|l| !l.is_finite()) {
        return Some(format!("loss is {} at step {}", losses[i], i + 1));
    }
    let window = 50.min(losses.len() / 2);
    if window == 0 {
        return None;
    }
    let mean = |s: &[f32]| s.iter().map(|&l| l as f64).sum::<f64>() / s.len() as f64;
    let (first, last) = (
        mean(&losses[..window]),
        mean(&losses[losses.len() - window..]),
    );
    (last > 100.0 * first).then(|| {
        format!(
            "training diverged: the mean loss of the last {window} steps is {last:.3e}, over 100 times the first {window} steps' {first:.3e}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::diverged;

    #[test]
    fn divergence_rule() {
        assert!(diverged(&[]).is_none());
        assert!(diverged(&[2.0, 1.5, 1.2, 1.1]).is_none());
        assert!(diverged(&[2.0, f32::NAN]).unwrap().contains("step 2"));
        let mut l = vec![2.0; 60];
        l.extend(vec![1e6; 60]);
        assert!(diverged(&l).unwrap().contains("diverged"));
    }
}
