//! Training and validation data in memory: structures with their neighbour lists computed once,
//! seeded epoch orders, batching and rotation augmentation.

use candle_core::{DType, Device};
use matscale_models::BatchTensors;
use matscale_structures::batch::{GraphBatch, GraphOptions};
use matscale_structures::neighbors::NeighborList;
use matscale_structures::Structure;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{Result, TrainError};
use crate::loss::Labels;

/// Structures with cached neighbour lists.
#[derive(Debug, Clone)]
pub struct Dataset {
    structures: Vec<Structure>,
    lists: Vec<NeighborList>,
    graph: GraphOptions,
}

impl Dataset {
    /// Computes the neighbour lists of `structures` (in parallel) under `graph`. `name` labels
    /// errors (e.g. the file the structures came from).
    pub fn new(structures: Vec<Structure>, graph: GraphOptions, name: &str) -> Result<Self> {
        if structures.is_empty() {
            return Err(TrainError::Data(format!("{name}: no structures")));
        }
        let lists = structures
            .par_iter()
            .enumerate()
            .map(|(k, s)| {
                graph.neighbor_list(s).map_err(|e| {
                    TrainError::Data(format!("{name}: structure {k}: neighbour list: {e}"))
                })
            })
            // All results first: the error reported is the first failing structure in order.
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            structures,
            lists,
            graph,
        })
    }

    /// Number of structures.
    pub fn len(&self) -> usize {
        self.structures.len()
    }

    /// True when empty (never, for a constructed data set).
    pub fn is_empty(&self) -> bool {
        self.structures.is_empty()
    }

    /// The structures.
    pub fn structures(&self) -> &[Structure] {
        &self.structures
    }

    /// The graph options the lists were built with.
    pub fn graph(&self) -> &GraphOptions {
        &self.graph
    }

    /// The batch of structures `indices`.
    pub fn batch(&self, indices: &[usize]) -> Result<GraphBatch> {
        let structures: Vec<&Structure> = indices.iter().map(|&i| &self.structures[i]).collect();
        let lists: Vec<NeighborList> = indices.iter().map(|&i| self.lists[i].clone()).collect();
        Ok(GraphBatch::from_neighbor_lists(&structures, &lists)?)
    }

    /// Consecutive batches of `batch_size` over `order`.
    pub fn batches<'a>(
        &'a self,
        order: &'a [usize],
        batch_size: usize,
    ) -> impl Iterator<Item = &'a [usize]> + 'a {
        order.chunks(batch_size.max(1))
    }
}

/// The order of the training set in `epoch`: a Fisher–Yates shuffle seeded by `(seed, epoch)`,
/// so a resumed run replays the same order without saved generator state.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0000_0000_0000);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    order
}

fn rotate_rows(values: &mut [f64], r: &[[f64; 3]; 3]) {
    for v in values.chunks_exact_mut(3) {
        let x = [v[0], v[1], v[2]];
        for i in 0..3 {
            v[i] = r[i][0] * x[0] + r[i][1] * x[1] + r[i][2] * x[2];
        }
    }
}

/// Rotates every structure of `batch` by its own random rotation: positions, cell, edge
/// vectors, forces and stress (`R σ Rᵀ`). The study rotated positions, forces and stress but
/// not the cell, which breaks periodic images; matscale rotates the cell too.
pub fn augment_rotations(batch: &mut GraphBatch, rng: &mut ChaCha8Rng) {
    for s in 0..batch.n_structures() {
        let r = matscale_structures::structure::random_rotation(rng);
        let (n0, n1) = (batch.node_ptr[s], batch.node_ptr[s + 1]);
        let (e0, e1) = (batch.edge_ptr[s], batch.edge_ptr[s + 1]);
        rotate_rows(&mut batch.positions[3 * n0..3 * n1], &r);
        rotate_rows(&mut batch.forces[3 * n0..3 * n1], &r);
        rotate_rows(&mut batch.edge_vectors[3 * e0..3 * e1], &r);
        rotate_rows(&mut batch.cells[9 * s..9 * s + 9], &r);
        let m = &mut batch.stress[9 * s..9 * s + 9];
        let mut out = [0.0; 9];
        for i in 0..3 {
            for j in 0..3 {
                for k in 0..3 {
                    for l in 0..3 {
                        out[3 * i + j] += r[i][k] * m[3 * k + l] * r[j][l];
                    }
                }
            }
        }
        m.copy_from_slice(&out);
    }
}

/// A batch moved to the device with its labels.
#[derive(Debug, Clone)]
pub struct DeviceBatch {
    /// The host batch.
    pub host: GraphBatch,
    /// Model inputs.
    pub tensors: BatchTensors,
    /// Labels.
    pub labels: Labels,
}

impl DeviceBatch {
    /// Moves `batch` to `device` in `dtype`.
    pub fn new(batch: GraphBatch, dtype: DType, device: &Device) -> Result<Self> {
        let tensors = BatchTensors::new(&batch, dtype, device)?;
        let labels = Labels::new(&batch, dtype, device)?;
        Ok(Self {
            host: batch,
            tensors,
            labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_and_differ_between_epochs() {
        let a = epoch_order(50, 3, 0);
        let b = epoch_order(50, 3, 1);
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(50, 3, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
}
