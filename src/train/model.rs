//! What the trainer needs from a velocity model: its weights by key, a forward pass under a
//! condition, a loss-and-gradient function, and its file format (for checkpoints and resume).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::diffusion::XDims;
use crate::error::Result;
use crate::model::{Condition, VelocityMlp, VelocityMlpConfig};

/// A velocity model the [`super::Trainer`] can train: [`VelocityMlp`] and
/// [`crate::model::WaypointTransformer`] implement it.
pub trait TrainableModel: Clone + Sized + 'static {
    /// The hyper-parameters (the file's metadata).
    type Config: Clone + std::fmt::Debug + PartialEq;

    /// A freshly initialised model whose trainable weights are `Var`s in `varmap` under the
    /// file's keys, drawn from `seed`.
    fn init(config: Self::Config, varmap: &VarMap, device: &Device, seed: u64) -> Result<Self>;

    /// Builds a model from tensors under the file's keys, checking every shape.
    fn from_tensors(
        config: Self::Config,
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self>;

    /// Reads a model file: the config and every tensor (extra keys included).
    fn read_file(path: &Path, device: &Device) -> Result<(Self::Config, HashMap<String, Tensor>)>;

    /// The hyper-parameters.
    fn config(&self) -> &Self::Config;

    /// The sample shape.
    fn x_dims(&self) -> &XDims;

    /// Classes of a label-conditional model (0: none).
    fn num_classes(&self) -> usize;

    /// The shape of a continuous condition's row (`None`: none).
    fn cond_dims(&self) -> Option<&XDims>;

    /// The device of the weights.
    fn device(&self) -> &Device;

    /// Every tensor under its file key (fixed ones included).
    fn tensors(&self) -> Vec<(String, Tensor)>;

    /// Whether `key` holds a fixed tensor (frequencies, normalisation), not a trainable weight.
    fn is_fixed(key: &str) -> bool;

    /// A copy detached from any autograd graph.
    fn detach(&self) -> Self;

    /// The velocity `[B, *x_dims]` under a condition (`None`: the null condition).
    fn forward_cond(&self, x: &Tensor, t: &Tensor, cond: Option<&Condition>) -> Result<Tensor>;

    /// The MSE loss against `target` and the gradient of every trainable weight by key. The
    /// default runs candle's autograd through [`Self::forward_cond`]
    /// ([`super::autograd_loss_and_grads`]).
    fn loss_and_grads(
        &self,
        noisy_x: &Tensor,
        t: &Tensor,
        cond: Option<&Condition>,
        target: &Tensor,
    ) -> Result<(f32, Vec<(String, Tensor)>)> {
        super::autograd_loss_and_grads(self, noisy_x, t, cond, target)
    }

    /// Writes the model with extra tensors and extra metadata (temporary name, then rename).
    fn save_with_metadata(
        &self,
        path: &Path,
        extra: &[(String, Tensor)],
        extra_meta: &HashMap<String, String>,
    ) -> Result<()>;
}

/// A model config that names its model, so `Trainer::new(config, ..)` knows what to build.
pub trait ModelConfig: Clone {
    /// The model this config builds.
    type Model: TrainableModel<Config = Self>;
}

impl ModelConfig for VelocityMlpConfig {
    type Model = VelocityMlp;
}

impl TrainableModel for VelocityMlp {
    type Config = VelocityMlpConfig;

    fn init(config: Self::Config, varmap: &VarMap, device: &Device, seed: u64) -> Result<Self> {
        VelocityMlp::init(config, varmap, device, seed)
    }

    fn from_tensors(
        config: Self::Config,
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self> {
        VelocityMlp::from_tensors(config, tensors, path)
    }

    fn read_file(path: &Path, device: &Device) -> Result<(Self::Config, HashMap<String, Tensor>)> {
        crate::model::read_file(path, device)
    }

    fn config(&self) -> &Self::Config {
        VelocityMlp::config(self)
    }

    fn x_dims(&self) -> &XDims {
        &VelocityMlp::config(self).x_dims
    }

    fn num_classes(&self) -> usize {
        VelocityMlp::config(self).num_classes
    }

    fn cond_dims(&self) -> Option<&XDims> {
        VelocityMlp::config(self).cond_dims.as_ref()
    }

    fn device(&self) -> &Device {
        VelocityMlp::device(self)
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        VelocityMlp::tensors(self)
    }

    fn is_fixed(key: &str) -> bool {
        VelocityMlpConfig::is_fixed(key)
    }

    fn detach(&self) -> Self {
        VelocityMlp::detach(self)
    }

    fn forward_cond(&self, x: &Tensor, t: &Tensor, cond: Option<&Condition>) -> Result<Tensor> {
        VelocityMlp::forward_cond(self, x, t, cond)
    }

    // The fused CPU kernel on the CPU; candle's autograd elsewhere, where tensors stay put.
    fn loss_and_grads(
        &self,
        noisy_x: &Tensor,
        t: &Tensor,
        cond: Option<&Condition>,
        target: &Tensor,
    ) -> Result<(f32, Vec<(String, Tensor)>)> {
        if VelocityMlp::device(self).is_cpu() {
            crate::model::loss_and_grads_cond(self, noisy_x, t, cond, target)
        } else {
            super::loss_and_grads(self, noisy_x, t, cond, target)
        }
    }

    fn save_with_metadata(
        &self,
        path: &Path,
        extra: &[(String, Tensor)],
        extra_meta: &HashMap<String, String>,
    ) -> Result<()> {
        VelocityMlp::save_with_metadata(self, path, extra, extra_meta)
    }
}
