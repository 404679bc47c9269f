//! Trainable parameters with seeded initial values, so that a training run repeats exactly.
//!
//! candle's CPU generator cannot be seeded, so `VarMap`'s own initialisation differs every run.
//! [`SeededParams`] is a `VarBuilder` backend that draws new variables from our seeded generator
//! and keeps them in a `VarMap`, whose variables the optimiser then trains.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::engine::rng::Rng;

/// A `VarBuilder` backend of seeded, trainable variables.
pub struct SeededParams {
    vars: VarMap,
    rng: Mutex<Rng>,
}

impl SeededParams {
    /// A builder whose new variables come from `seed` and land in `vars`.
    pub fn builder(vars: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
        let backend = SeededParams {
            vars: vars.clone(),
            rng: Mutex::new(Rng::new(seed)),
        };
        VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
    }
}

impl SimpleBackend for SeededParams {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut vars = self
            .vars
            .data()
            .lock()
            .expect("the variable map is not poisoned");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("`{name}` has shape {:?}, not {shape:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let tensor = match init {
            Init::Const(value) => (Tensor::ones(shape, dtype, device)? * value)?,
            Init::Randn { mean, stdev } => {
                let mut rng = self.rng.lock().expect("the generator is not poisoned");
                ((rng.randn(shape, dtype, device)? * stdev)? + mean)?
            }
            other => {
                candle_core::bail!("SeededParams draws only constants and normals, not {other:?}")
            }
        };
        let var = Var::from_tensor(&tensor)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        let vars = self
            .vars
            .data()
            .lock()
            .expect("the variable map is not poisoned");
        match vars.get(name) {
            Some(var) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("no variable `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let vars = self
            .vars
            .data()
            .lock()
            .expect("the variable map is not poisoned");
        vars.contains_key(name)
    }
}

/// The variables of `vars`, sorted by name (a stable order for files and optimisers).
pub fn sorted(vars: &VarMap) -> Vec<(String, Var)> {
    let data = vars
        .data()
        .lock()
        .expect("the variable map is not poisoned");
    let mut all: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}
