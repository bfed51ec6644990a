//! The deterministic baseline: the same velocity network trained by plain MSE regression.
//!
//! What a user tries first is to regress the future directly from the condition. To compare
//! like with like, the baseline is the *same* network and the *same* [`Trainer`](crate::train::Trainer) (AdamW,
//! warm-up and cosine learning rate, gradient clipping, EMA), with one change: the loss.
//! [`regression_loss`] wraps the trainer's loss function so that the network is evaluated
//! at the fixed input `x = 0`, `t = 0` and its output is fitted to the data sample `x1`
//! itself (rebuilt from the flow-matching pair as `x1 = x_t + (1 - t) (x1 - x0)`, exact for
//! the straight path `x_t = t x1 + (1 - t) x0`). [`predict`] evaluates it the same way. Under
//! MSE the best such predictor is the conditional mean `E[x1 | c]`, which averages the
//! modes of a multimodal future away. Train it with the condition dropout off
//! (`cond_drop_rate = 0`): a regression has no use for an unconditional output.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::step::StepFn;
use crate::train::LossFn;

/// Turns a flow-matching loss function into the regression loss described in the module
/// docs: `inner(model, 0, 0, cond, x1)`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use flow_matching::regression::{predict, regression_loss};
/// use flow_matching::train::{default_loss_and_grads, TrainConfig, Trainer};
/// use flow_matching::{VelocityMlp, VelocityMlpConfig, XDims};
///
/// let mut model = VelocityMlpConfig::new(XDims::new(2).unwrap());
/// (model.hidden, model.depth) = (16, 1);
/// let config = TrainConfig { steps: 300, batch_size: 16, lr: 1e-2, cond_drop_rate: 0.0,
///                            ema_decay: 0.9, ..TrainConfig::default() };
/// let mut trainer = Trainer::new(model, config, &Device::Cpu).unwrap()
///     .with_loss_fn(regression_loss(Box::new(default_loss_and_grads::<VelocityMlp>)));
/// // Every sample is (1, -2): the regression learns exactly that.
/// let target = Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap();
/// let out = trainer.train(|_, b| Ok((target.repeat((b, 1))?, None::<Vec<u32>>))).unwrap();
/// let mut net = out.model;
/// let y = predict(&mut net, 1, &[2], DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
/// assert!((y[0][0] - 1.0).abs() < 0.05 && (y[0][1] + 2.0).abs() < 0.05, "{y:?}");
/// ```
pub fn regression_loss<M: 'static>(mut inner: LossFn<M>) -> LossFn<M> {
    Box::new(
        move |model: &M, noisy_x: &Tensor, t: &Tensor, cond, target: &Tensor| {
            let b = noisy_x.dim(0)?;
            if t.elem_count() != b {
                return Err(Error::Shape {
                    what: "timesteps".into(),
                    expected: format!("{b} elements, one per sample"),
                    got: t.dims().to_vec(),
                });
            }
            // t as [B, 1, ..., 1] so it broadcasts over each sample.
            let mut shape = vec![1usize; noisy_x.rank()];
            shape[0] = b;
            let one_minus_t = t
                .to_dtype(noisy_x.dtype())?
                .reshape(shape.as_slice())?
                .affine(-1.0, 1.0)?;
            let x1 = (noisy_x + target.broadcast_mul(&one_minus_t)?)?;
            let zeros = noisy_x.zeros_like()?;
            let t0 = t.zeros_like()?;
            inner(model, &zeros, &t0, cond, &x1)
        },
    )
}

/// The baseline's prediction for `batch` rows: `f(x = 0, t = 0)` through any step function
/// (bind the condition first, as for sampling), shaped `[batch, *x_dims]`.
pub fn predict(
    f: &mut dyn StepFn,
    batch: usize,
    x_dims: &[usize],
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    if batch == 0 {
        return Err(Error::ZeroBatch);
    }
    let mut shape = vec![batch];
    shape.extend_from_slice(x_dims);
    let x = Tensor::zeros(shape.as_slice(), dtype, device)?;
    let t = Tensor::zeros(batch, dtype, device)?;
    f.step(&x, &t)
}
