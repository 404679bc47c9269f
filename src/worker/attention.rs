//! Cross-attention maps reduced to what the overlay shows: per step and per resolution, the
//! probabilities averaged over heads and layers, for the caption's tokens only.
//!
//! This is plain data (no tensors): it crosses the thread boundary to the app, which picks a
//! token, a step, a view and a resolution filter from it without touching a model.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};

use crate::engine::control::RecordedMap;

/// Head- and layer-averaged cross-attention at one spatial resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionGrid {
    /// Rows of the latent grid at this resolution.
    pub height: usize,
    /// Columns of the latent grid at this resolution.
    pub width: usize,
    /// How many UNet layers were averaged.
    pub layers: usize,
    /// Token columns kept per position.
    pub tokens: usize,
    /// The reference pass: `(height·width, tokens)`, row-major, probabilities in `[0, 1]`.
    pub reference: Vec<f32>,
    /// The edited pass, same layout, when it was recorded.
    pub edited: Option<Vec<f32>>,
}

impl AttentionGrid {
    /// The `(height·width)` map of token `token` from `values` (`reference` or `edited`).
    pub fn token_map(&self, values: &[f32], token: usize) -> Vec<f32> {
        let token = token.min(self.tokens.saturating_sub(1));
        (0..self.height * self.width)
            .map(|p| values[p * self.tokens + token])
            .collect()
    }
}

/// One timestep's reduced maps, largest resolution first.
#[derive(Debug, Clone, PartialEq)]
pub struct StepAttention {
    /// The step, from 0.
    pub index: usize,
    /// Steps in all.
    pub total: usize,
    /// The DDIM timestep.
    pub timestep: usize,
    /// One grid per resolution the UNet attends at, largest first.
    pub grids: Vec<AttentionGrid>,
}

/// Averages `(rows, h·w, 77)` maps over their `heads` rows (the first batch item's) and over the
/// layers of each resolution, keeping the first `tokens` key positions.
fn average_by_resolution(
    maps: &BTreeMap<String, RecordedMap>,
    tokens: usize,
) -> Result<BTreeMap<(usize, usize), (usize, Tensor)>> {
    let mut sums: BTreeMap<(usize, usize), (usize, Tensor)> = BTreeMap::new();
    for map in maps.values() {
        let keys = map.probs.dim(2)?;
        let per_head = map
            .probs
            .narrow(0, 0, map.heads)?
            .narrow(2, 0, tokens.min(keys))?
            .to_dtype(DType::F32)?
            .mean(0)?;
        let entry = sums.remove(&map.spatial);
        let summed = match entry {
            Some((n, sum)) => (n + 1, (sum + per_head)?),
            None => (1, per_head),
        };
        sums.insert(map.spatial, summed);
    }
    Ok(sums)
}

/// Reduces one step's reference maps (and optionally the edited pass's) for the overlay.
///
/// `reference` and `edited` are `(rows, h·w, 77)` by layer; only the first batch item of each
/// is used (for a shared reference, the one item; for the edited pass, the conditional half).
pub fn reduce_step(
    index: usize,
    total: usize,
    timestep: usize,
    reference: &BTreeMap<String, RecordedMap>,
    edited: Option<&BTreeMap<String, RecordedMap>>,
    tokens: usize,
) -> Result<StepAttention> {
    let reference = average_by_resolution(reference, tokens)?;
    let edited = edited
        .map(|maps| average_by_resolution(maps, tokens))
        .transpose()?;
    let mut grids = Vec::with_capacity(reference.len());
    for (&(height, width), (layers, sum)) in reference.iter().rev() {
        let flatten = |n: usize, t: &Tensor| -> Result<Vec<f32>> {
            (t / n as f64)?.flatten_all()?.to_vec1::<f32>()
        };
        let kept = sum.dim(1)?;
        let edited = match &edited {
            Some(e) => match e.get(&(height, width)) {
                Some((n, sum)) => Some(flatten(*n, sum)?),
                None => None,
            },
            None => None,
        };
        grids.push(AttentionGrid {
            height,
            width,
            layers: *layers,
            tokens: kept,
            reference: flatten(*layers, sum)?,
            edited,
        });
    }
    // Largest first: BTreeMap order is ascending by (h, w).
    grids.sort_by_key(|g| std::cmp::Reverse(g.height * g.width));
    Ok(StepAttention {
        index,
        total,
        timestep,
        grids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn map(spatial: (usize, usize), heads: usize, value: f32) -> RecordedMap {
        let n = spatial.0 * spatial.1;
        let probs = Tensor::full(value, (heads, n, 77), &Device::Cpu).unwrap();
        RecordedMap {
            spatial,
            heads,
            probs,
        }
    }

    #[test]
    fn layers_of_one_resolution_are_averaged_and_sorted_largest_first() {
        let mut maps = BTreeMap::new();
        maps.insert("down.0.attn2.0".to_string(), map((4, 4), 2, 0.2));
        maps.insert("up.3.attn2.0".to_string(), map((4, 4), 2, 0.4));
        maps.insert("mid.attn2.0".to_string(), map((2, 2), 2, 0.1));
        let step = reduce_step(3, 10, 500, &maps, None, 5).unwrap();
        assert_eq!(step.grids.len(), 2);
        let big = &step.grids[0];
        assert_eq!(
            (big.height, big.width, big.layers, big.tokens),
            (4, 4, 2, 5)
        );
        assert_eq!(big.reference.len(), 16 * 5);
        assert!(big.reference.iter().all(|v| (v - 0.3).abs() < 1e-6));
        assert!(big.edited.is_none());
        assert_eq!(step.grids[1].height, 2);
    }

    #[test]
    fn token_map_picks_one_column() {
        let grid = AttentionGrid {
            height: 1,
            width: 2,
            layers: 1,
            tokens: 3,
            reference: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            edited: None,
        };
        assert_eq!(grid.token_map(&grid.reference, 1), vec![1.0, 4.0]);
        assert_eq!(grid.token_map(&grid.reference, 9), vec![2.0, 5.0]);
    }
}
