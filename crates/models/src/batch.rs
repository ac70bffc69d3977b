//! A [`GraphBatch`] moved onto a candle device, and the geometry a model reads from it.
//!
//! [`BatchTensors`] holds the index and label tensors of a batch; [`Geometry`] holds the
//! quantities that depend on the atomic positions and the cell (edge vectors, distances,
//! fractional coordinates). Under [`ForceMode::Conservative`](crate::ForceMode) the geometry
//! is rebuilt from positions and a strain that carry gradients, so every model that reads its
//! inputs from [`Geometry`] gets forces and stress by automatic differentiation for free.

use candle_core::{DType, Device, Tensor, D};
use matscale_equivariant::segment::{RowIndex, Segments};
use matscale_structures::batch::GraphBatch;

use crate::error::{ModelError, Result};

/// The sizes of a batch that FLOP counts depend on.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BatchShape {
    /// Structures `B`.
    pub n_structures: usize,
    /// Atoms `N` over all structures.
    pub n_nodes: usize,
    /// Directed edges `E` over all structures.
    pub n_edges: usize,
    /// `Σ_s n_s²` (pairs inside each structure: the cost of full self-attention).
    pub sum_sq_nodes: usize,
    /// The largest structure (the padded width of per-structure models).
    pub max_nodes: usize,
}

impl BatchShape {
    /// The shape of `batch`.
    pub fn of(batch: &GraphBatch) -> Self {
        let atoms = batch.atoms_per_structure();
        Self {
            n_structures: batch.n_structures(),
            n_nodes: batch.n_nodes(),
            n_edges: batch.n_edges(),
            sum_sq_nodes: atoms.iter().map(|n| n * n).sum(),
            max_nodes: atoms.iter().copied().max().unwrap_or(0),
        }
    }

    /// One structure of `atoms` atoms with `edges_per_atom` neighbours each (for quoting
    /// "FLOPs per structure" of a typical structure).
    pub fn single(atoms: usize, edges_per_atom: usize) -> Self {
        Self {
            n_structures: 1,
            n_nodes: atoms,
            n_edges: atoms * edges_per_atom,
            sum_sq_nodes: atoms * atoms,
            max_nodes: atoms,
        }
    }
}

/// The tensors of one batch on one device. Layouts use `N` nodes, `E` edges, `B` structures;
/// index tensors are `u32`, floating tensors have the batch's dtype.
#[derive(Debug, Clone)]
pub struct BatchTensors {
    /// Atomic numbers `[N]`, u32.
    pub numbers: Tensor,
    /// Cartesian positions, Å, `[N, 3]`.
    pub positions: Tensor,
    /// Cells (rows are lattice vectors), Å, `[B, 3, 3]`.
    pub cells: Tensor,
    /// Structure of each node `[N]`, u32.
    pub node_structure: Tensor,
    /// Source node (neighbour `j`) of each edge `[E]`, u32.
    pub edge_src: Tensor,
    /// Target node (centre `i`) of each edge `[E]`, u32; non-decreasing.
    pub edge_dst: Tensor,
    /// Structure of each edge `[E]`, u32.
    pub edge_structure: Tensor,
    /// Integer lattice shifts of each edge as floats `[E, 3]`.
    pub edge_shifts: Tensor,
    /// Cell volumes, Å^3, `[B]` (0 for a structure without a cell).
    pub volumes: Tensor,
    /// Atoms per structure as floats `[B]`.
    pub n_atoms: Tensor,
    /// Host copy of the atomic numbers `[N]`.
    pub numbers_host: Vec<u8>,
    /// Host node offsets per structure `[B + 1]`.
    pub node_ptr: Vec<usize>,
    /// Host edge offsets per structure `[B + 1]`.
    pub edge_ptr: Vec<usize>,
    /// Host offsets of the incoming edges of each node `[N + 1]`.
    pub dst_ptr: Vec<usize>,
    /// Host volumes `[B]`.
    pub volumes_host: Vec<f64>,
    /// Host periodicity per structure.
    pub pbc: Vec<[bool; 3]>,
    /// The sizes FLOP counts depend on.
    pub shape: BatchShape,
    /// Host groupings of the index tensors, for sums over them ([`BatchTensors::sum_over`]).
    pub groups: BatchGroups,
}

/// The batch's index tensors as [`RowIndex`]es: each holds the very tensor of its
/// `BatchTensors` field together with its host CSR grouping (shared by clones).
#[derive(Debug, Clone)]
pub struct BatchGroups {
    /// Edges grouped by target node (`edge_dst`, sorted).
    pub edges_by_target: RowIndex,
    /// Edges grouped by source node (`edge_src`, unsorted).
    pub edges_by_source: RowIndex,
    /// Edges grouped by structure (`edge_structure`, sorted).
    pub edges_by_structure: RowIndex,
    /// Nodes grouped by structure (`node_structure`, sorted).
    pub nodes_by_structure: RowIndex,
}

/// Which index a sum over rows follows (see [`BatchTensors::sum_over`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// `[E, ...]` → `[N, ...]` by `edge_dst`.
    EdgesByTarget,
    /// `[E, ...]` → `[N, ...]` by `edge_src`.
    EdgesBySource,
    /// `[E, ...]` → `[B, ...]` by `edge_structure`.
    EdgesByStructure,
    /// `[N, ...]` → `[B, ...]` by `node_structure`.
    NodesByStructure,
}

impl BatchTensors {
    /// Moves `batch` onto `device` with floating tensors in `dtype`.
    pub fn new(batch: &GraphBatch, dtype: DType, device: &Device) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(ModelError::Batch(format!(
                "floating dtype expected, got {dtype:?}"
            )));
        }
        let (b, n, e) = (batch.n_structures(), batch.n_nodes(), batch.n_edges());
        let float = |v: &[f64], shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, shape, device)?.to_dtype(dtype)?)
        };
        let index = |v: Vec<u32>| -> Result<Tensor> {
            let len = v.len();
            Ok(Tensor::from_vec(v, len, device)?)
        };
        // The index tensors are the groupings' own (one upload each): the host groupings are
        // built first, from the same arrays.
        let rows =
            |segments: Segments| Ok::<_, ModelError>(RowIndex::from_segments(segments, device)?);
        let groups = BatchGroups {
            edges_by_target: rows(Segments::from_offsets(&batch.dst_ptr)?)?,
            edges_by_source: rows(Segments::from_indices(&batch.edge_src, n)?)?,
            edges_by_structure: rows(Segments::from_offsets(&batch.edge_ptr)?)?,
            nodes_by_structure: rows(Segments::from_offsets(&batch.node_ptr)?)?,
        };
        let shifts: Vec<f64> = batch.edge_shifts.iter().map(|&s| s as f64).collect();
        let atoms: Vec<f64> = batch
            .atoms_per_structure()
            .iter()
            .map(|&a| a as f64)
            .collect();
        Ok(Self {
            numbers: index(batch.numbers.iter().map(|&z| z as u32).collect())?,
            positions: float(&batch.positions, &[n, 3])?,
            cells: float(&batch.cells, &[b, 3, 3])?,
            node_structure: groups.nodes_by_structure.tensor().clone(),
            edge_src: groups.edges_by_source.tensor().clone(),
            edge_dst: groups.edges_by_target.tensor().clone(),
            edge_structure: groups.edges_by_structure.tensor().clone(),
            edge_shifts: float(&shifts, &[e, 3])?,
            volumes: float(&batch.volumes, &[b])?,
            n_atoms: float(&atoms, &[b])?,
            numbers_host: batch.numbers.clone(),
            node_ptr: batch.node_ptr.clone(),
            edge_ptr: batch.edge_ptr.clone(),
            dst_ptr: batch.dst_ptr.clone(),
            volumes_host: batch.volumes.clone(),
            pbc: batch.pbc.clone(),
            shape: BatchShape::of(batch),
            groups,
        })
    }

    /// The grouping of `grouping` and its index tensor.
    fn grouping(&self, grouping: Grouping) -> (&Segments, &Tensor) {
        let rows = self.row_index(grouping);
        (rows.segments(), rows.tensor())
    }

    /// Sums the rows of `values` (`[E, ...]` or `[N, ...]`) that share an index of
    /// `grouping`: `[N, ...]` or `[B, ...]`, zeros for empty groups; differentiable.
    ///
    /// [`Segments::scatter_sum`]: f32 and f64 run as a [`Segments::sum`] (a deterministic CSR
    /// sum whose backward is a gather), other dtypes as candle's `index_add`. On a GPU this matters: candle's CUDA
    /// `index_add` gives each thread one column and walks every row in it (milliseconds for
    /// a force or stress head's 3 or 9 columns).
    ///
    /// # Errors
    /// A first dimension other than the grouping's items.
    pub fn sum_over(&self, grouping: Grouping, values: &Tensor) -> Result<Tensor> {
        let (segments, index) = self.grouping(grouping);
        Ok(segments.scatter_sum(values, index)?)
    }

    /// The rows of `values` (`[N, ...]` or `[B, ...]`) for every item of `grouping`
    /// (`[E, ...]` or `[N, ...]`): `values.index_select(index, 0)`, differentiable, whose
    /// backward for f32 and f64 is a [`Segments::sum`] (see [`Self::sum_over`]).
    ///
    /// # Errors
    /// A first dimension other than the grouping's segments.
    pub fn gather_by(&self, grouping: Grouping, values: &Tensor) -> Result<Tensor> {
        let (segments, index) = self.grouping(grouping);
        if matches!(values.dtype(), DType::F32 | DType::F64) {
            return Ok(segments.gather(values)?);
        }
        Ok(values.index_select(index, 0)?)
    }

    /// The index tensor of `grouping` (`edge_dst`, `edge_src`, `edge_structure` or
    /// `node_structure`, the same tensor) with its host grouping, as a [`RowIndex`]: gathers
    /// through it copy nothing back from a GPU (see [`RowIndex`]).
    pub fn row_index(&self, grouping: Grouping) -> &RowIndex {
        let g = &self.groups;
        match grouping {
            Grouping::EdgesByTarget => &g.edges_by_target,
            Grouping::EdgesBySource => &g.edges_by_source,
            Grouping::EdgesByStructure => &g.edges_by_structure,
            Grouping::NodesByStructure => &g.nodes_by_structure,
        }
    }

    /// A host index (`values` below `rows`) as a [`RowIndex`] on the batch's device, e.g.
    /// rows of an embedding table: on a GPU an upload, never a copy back.
    ///
    /// # Errors
    /// A value is not below `rows` (named with its position), or the upload fails.
    pub fn host_row_index<I>(&self, values: &[I], rows: usize) -> Result<RowIndex>
    where
        I: Copy + TryInto<u32> + std::fmt::Debug,
    {
        Ok(RowIndex::from_segments(
            Segments::from_indices(values, rows)?,
            self.device(),
        )?)
    }

    /// Number of structures `B`.
    pub fn n_structures(&self) -> usize {
        self.shape.n_structures
    }

    /// Number of nodes `N`.
    pub fn n_nodes(&self) -> usize {
        self.shape.n_nodes
    }

    /// Number of edges `E`.
    pub fn n_edges(&self) -> usize {
        self.shape.n_edges
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        self.positions.device()
    }

    /// The floating dtype of the batch.
    pub fn dtype(&self) -> DType {
        self.positions.dtype()
    }

    /// The batch with its floating tensors cast to `dtype` (index tensors shared).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut out = self.clone();
        out.positions = self.positions.to_dtype(dtype)?;
        out.cells = self.cells.to_dtype(dtype)?;
        out.edge_shifts = self.edge_shifts.to_dtype(dtype)?;
        out.volumes = self.volumes.to_dtype(dtype)?;
        out.n_atoms = self.n_atoms.to_dtype(dtype)?;
        Ok(out)
    }

    /// Checks that every atomic number is below `max` (the size of a model's embedding).
    pub fn check_elements(&self, max: usize) -> Result<()> {
        for s in 0..self.n_structures() {
            for &z in &self.numbers_host[self.node_ptr[s]..self.node_ptr[s + 1]] {
                if z as usize >= max {
                    return Err(ModelError::UnknownElement {
                        structure: s,
                        number: z,
                        max,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Positions, cells and everything derived from them: what a model may read of the geometry.
/// Built by [`Geometry::new`] from tensors that may carry gradients (positions and strain in
/// conservative mode), so derivatives flow from any of these fields back to the atoms.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// Cartesian positions, Å, `[N, 3]`.
    pub positions: Tensor,
    /// Cells, Å, `[B, 3, 3]`.
    pub cells: Tensor,
    /// Edge vectors `r_src − r_dst + shift·cell`, Å, `[E, 3]`.
    pub edge_vectors: Tensor,
    /// Edge lengths, Å, `[E]`.
    pub edge_lengths: Tensor,
}

impl Geometry {
    /// The geometry of `batch` at `positions` `[N, 3]` and `cells` `[B, 3, 3]`.
    pub fn new(batch: &BatchTensors, positions: &Tensor, cells: &Tensor) -> Result<Self> {
        let e = batch.n_edges();
        let src = positions.index_select(&batch.edge_src, 0)?;
        let dst = positions.index_select(&batch.edge_dst, 0)?;
        let edge_cells = cells.index_select(&batch.edge_structure, 0)?; // [E, 3, 3]
        let image = batch
            .edge_shifts
            .reshape((e, 1, 3))?
            .matmul(&edge_cells)?
            .reshape((e, 3))?;
        let edge_vectors = ((src - dst)? + image)?;
        let edge_lengths = edge_vectors.sqr()?.sum(D::Minus1)?.sqrt()?;
        Ok(Self {
            positions: positions.clone(),
            cells: cells.clone(),
            edge_vectors,
            edge_lengths,
        })
    }

    /// The unstrained geometry of `batch`.
    pub fn of(batch: &BatchTensors) -> Result<Self> {
        Self::new(batch, &batch.positions, &batch.cells)
    }

    /// Fractional coordinates `r · cell⁻¹` `[N, 3]` (0 for structures without a cell, whose
    /// volume is 0). Differentiable; invariant under strain, as fractional coordinates are.
    pub fn fractional(&self, batch: &BatchTensors) -> Result<Tensor> {
        let b = batch.n_structures();
        let dtype = self.cells.dtype();
        // A structure without a cell gets the identity so that the inverse exists; its
        // fractional coordinates are then masked to zero.
        let has_cell: Vec<f64> = batch
            .volumes_host
            .iter()
            .map(|&v| if v > 0.0 { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(has_cell.clone(), b, batch.device())?.to_dtype(dtype)?;
        let eye = Tensor::eye(3, dtype, batch.device())?;
        let fill = (1.0 - &mask)?.reshape((b, 1, 1))?.broadcast_mul(&eye)?;
        let cells = (self.cells.broadcast_mul(&mask.reshape((b, 1, 1))?)? + fill)?;
        let inverse = inverse3(&cells)?;
        let node_inverse = inverse.index_select(&batch.node_structure, 0)?; // [N, 3, 3]
        let n = batch.n_nodes();
        let frac = self
            .positions
            .reshape((n, 1, 3))?
            .matmul(&node_inverse)?
            .reshape((n, 3))?;
        let node_mask = mask.index_select(&batch.node_structure, 0)?;
        Ok(frac.broadcast_mul(&node_mask.reshape((n, 1))?)?)
    }
}

/// Differentiable inverse of a batch of 3×3 matrices `[B, 3, 3]` by the adjugate.
pub(crate) fn inverse3(m: &Tensor) -> Result<Tensor> {
    let b = m.dim(0)?;
    let el = |i: usize, j: usize| -> Result<Tensor> {
        Ok(m.narrow(1, i, 1)?.narrow(2, j, 1)?.reshape(b)?)
    };
    let a: Vec<Vec<Tensor>> = (0..3)
        .map(|i| (0..3).map(|j| el(i, j)).collect::<Result<Vec<_>>>())
        .collect::<Result<_>>()?;
    let cof = |r0: usize, r1: usize, c0: usize, c1: usize| -> Result<Tensor> {
        Ok(((&a[r0][c0] * &a[r1][c1])? - (&a[r0][c1] * &a[r1][c0])?)?)
    };
    // adj[i][j] = cofactor[j][i]
    let c00 = cof(1, 2, 1, 2)?;
    let c01 = cof(1, 2, 2, 0)?;
    let c02 = cof(1, 2, 0, 1)?;
    let c10 = cof(2, 0, 1, 2)?;
    let c11 = cof(2, 0, 2, 0)?;
    let c12 = cof(2, 0, 0, 1)?;
    let c20 = cof(0, 1, 1, 2)?;
    let c21 = cof(0, 1, 2, 0)?;
    let c22 = cof(0, 1, 0, 1)?;
    let det = (((&a[0][0] * &c00)? + (&a[0][1] * &c01)?)? + (&a[0][2] * &c02)?)?;
    let adj = Tensor::stack(&[&c00, &c10, &c20, &c01, &c11, &c21, &c02, &c12, &c22], 1)?;
    Ok(adj
        .broadcast_div(&det.reshape((b, 1))?)?
        .reshape((b, 3, 3))?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use matscale_structures::batch::{GraphBatch, GraphOptions};
    use matscale_structures::generate::AlloyGenerator;

    use super::{BatchTensors, Grouping};

    fn batch() -> GraphBatch {
        let generator = AlloyGenerator {
            seed: 5,
            ..AlloyGenerator::default()
        }
        .check()
        .expect("valid generator");
        let structures = generator.generate(0..3);
        let options = GraphOptions {
            cutoff: 4.0,
            max_neighbors: None,
            degeneracy_tolerance: None,
        };
        GraphBatch::new(&structures, &options).expect("batch")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// `row_index` holds each grouping's index tensor exactly; `host_row_index` gathers the
    /// rows of a host index and names an out-of-range entry.
    #[test]
    fn row_indices_equal_the_batch_indices() {
        let b = batch();
        let t = BatchTensors::new(&b, DType::F32, &Device::Cpu).expect("tensors");
        for (grouping, index) in [
            (Grouping::EdgesByTarget, &t.edge_dst),
            (Grouping::EdgesBySource, &t.edge_src),
            (Grouping::EdgesByStructure, &t.edge_structure),
            (Grouping::NodesByStructure, &t.node_structure),
        ] {
            let r = t.row_index(grouping);
            assert_eq!(
                r.tensor().to_vec1::<u32>().unwrap(),
                index.to_vec1::<u32>().unwrap(),
                "{grouping:?}"
            );
        }
        let table = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        let rows = t.host_row_index(&[5u8, 0, 5, 2], 6).expect("host index");
        let got: Vec<Vec<f32>> = rows.gather(&table).unwrap().to_vec2().unwrap();
        assert_eq!(got, [[10.0, 11.0], [0.0, 1.0], [10.0, 11.0], [4.0, 5.0]]);
        let err = t.host_row_index(&[1u32, 6], 6).unwrap_err().to_string();
        assert!(err.contains("entry 1 is 6"), "{err}");
    }

    /// `sum_over` / `gather_by` equal candle's `index_add` / `index_select` on every grouping,
    /// values and gradients, in f64 and f32 (segment ops) and bf16 (candle's ops).
    #[test]
    fn sums_and_gathers_match_index_add_and_index_select() {
        let b = batch();
        assert!(b.n_edges() > 100, "{} edges", b.n_edges());
        let t = BatchTensors::new(&b, DType::F32, &Device::Cpu).expect("tensors");
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let tol = if dtype == DType::BF16 { 1e-1 } else { 1e-5 };
            for (grouping, index, rows, segments) in [
                (
                    Grouping::EdgesByTarget,
                    &t.edge_dst,
                    t.n_edges(),
                    t.n_nodes(),
                ),
                (
                    Grouping::EdgesBySource,
                    &t.edge_src,
                    t.n_edges(),
                    t.n_nodes(),
                ),
                (
                    Grouping::EdgesByStructure,
                    &t.edge_structure,
                    t.n_edges(),
                    t.n_structures(),
                ),
                (
                    Grouping::NodesByStructure,
                    &t.node_structure,
                    t.n_nodes(),
                    t.n_structures(),
                ),
            ] {
                let values = Tensor::randn(0f32, 1.0, (rows, 2, 3), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let v = Var::from_tensor(&values).unwrap();
                let ours = t.sum_over(grouping, v.as_tensor()).unwrap();
                let theirs = Tensor::zeros((segments, 2, 3), dtype, &Device::Cpu)
                    .unwrap()
                    .index_add(index, v.as_tensor(), 0)
                    .unwrap();
                assert_eq!(ours.dims(), theirs.dims());
                let d = max_diff(&ours, &theirs);
                assert!(d <= tol, "{grouping:?} {dtype:?} sum: {d}");
                // Gradient of Σ w·sum = w gathered back to the rows.
                let w = Tensor::randn(0f32, 1.0, (segments, 2, 3), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let g = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let got = g.get(v.as_tensor()).expect("gradient");
                let want = w.index_select(index, 0).unwrap();
                let d = max_diff(got, &want);
                assert!(d <= tol, "{grouping:?} {dtype:?} sum gradient: {d}");

                let table = Var::from_tensor(&w).unwrap();
                let gathered = t.gather_by(grouping, table.as_tensor()).unwrap();
                let d = max_diff(&gathered, &w.index_select(index, 0).unwrap());
                assert_eq!(d, 0.0, "{grouping:?} {dtype:?} gather");
                let g = (gathered * &values)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let got = g.get(table.as_tensor()).expect("gradient");
                let want = Tensor::zeros((segments, 2, 3), dtype, &Device::Cpu)
                    .unwrap()
                    .index_add(index, &values, 0)
                    .unwrap();
                let d = max_diff(got, &want);
                assert!(d <= tol, "{grouping:?} {dtype:?} gather gradient: {d}");
            }
            // A wrong row count is an error, not a panic.
            let bad = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
            assert!(t.sum_over(Grouping::EdgesByTarget, &bad).is_err());
        }
    }
}
