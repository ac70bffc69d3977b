//! Graph batches: several structures concatenated into one disjoint graph for training.
//!
//! A [`GraphBatch`] holds plain vectors with documented layouts, so that a model crate turns
//! each into a tensor without copying (this crate never depends on a tensor library). All
//! 3-vectors and 3x3 matrices are stored flat, row-major: `positions[3 * v + c]`,
//! `cells[9 * s + 3 * row + col]`.
//!
//! # Edge convention
//!
//! Edge `e` carries a message from the **source** node `edge_src[e]` (the neighbour `j`) to the
//! **target** node `edge_dst[e]` (the centre `i`), as in PyTorch Geometric and fairchem, where
//! `edge_index[0]` is the source and `edge_index[1]` the target. Its vector points from the
//! target to the source image:
//!
//! ```text
//! edge_vectors[e] = positions[edge_src[e]] − positions[edge_dst[e]] + edge_shifts[e] · cell[s]
//! ```
//!
//! with `s` the structure of both nodes, i.e. ASE's `D` for the pair `(i, j, S)`. A model that
//! needs forces and stress by automatic differentiation recomputes the vectors from positions,
//! integer shifts and the (strained) cell with this formula.
//!
//! Edges are sorted by target node (globally), then source node, then shift, so the incoming
//! edges of node `v` are the contiguous range `dst_ptr[v]..dst_ptr[v + 1]` (convenient for
//! segment softmax and aggregation).
//!
//! ```
//! use matscale_structures::batch::{GraphBatch, GraphOptions};
//! use matscale_structures::Structure;
//!
//! let a = 3.61;
//! let cell = [[0.0, a / 2.0, a / 2.0], [a / 2.0, 0.0, a / 2.0], [a / 2.0, a / 2.0, 0.0]];
//! let cu = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap();
//! let batch = GraphBatch::new(&[&cu, &cu], &GraphOptions::new(6.0)).unwrap();
//! assert_eq!(batch.n_nodes(), 2);
//! assert_eq!(batch.n_edges(), 2 * 78);
//! assert_eq!(batch.edge_ptr, vec![0, 78, 156]);
//! ```

use std::borrow::Borrow;

use rayon::prelude::*;

use crate::neighbors::{neighbor_list, NeighborError, NeighborList};
use crate::Structure;

/// How to build the graphs of a batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GraphOptions {
    /// Radial cutoff, Å (strict: pairs at exactly the cutoff are not edges).
    pub cutoff: f64,
    /// Keep at most this many incoming edges per node: the nearest, ties broken by
    /// `(distance, source, shift)`. `None` keeps every pair within the cutoff.
    #[serde(default)]
    pub max_neighbors: Option<usize>,
    /// With `max_neighbors`: also keep neighbours within this distance (Å) of the last kept one,
    /// so that a shell of equidistant neighbours is never cut. `None` cuts strictly.
    #[serde(default)]
    pub degeneracy_tolerance: Option<f64>,
}

impl GraphOptions {
    /// Every pair within `cutoff` (Å), no neighbour limit.
    pub fn new(cutoff: f64) -> Self {
        Self {
            cutoff,
            max_neighbors: None,
            degeneracy_tolerance: None,
        }
    }

    /// Sets `max_neighbors` (strict cut, deterministic tie-break).
    pub fn with_max_neighbors(mut self, max_neighbors: usize) -> Self {
        self.max_neighbors = Some(max_neighbors);
        self
    }

    /// The neighbour list of one structure under these options.
    pub fn neighbor_list(&self, structure: &Structure) -> Result<NeighborList, NeighborError> {
        let list = neighbor_list(structure, self.cutoff)?;
        Ok(match (self.max_neighbors, self.degeneracy_tolerance) {
            (None, _) => list,
            (Some(k), None) => list.nearest(k),
            (Some(k), Some(tol)) => list.nearest_with_tolerance(k, tol),
        })
    }
}

/// Why a batch could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// The neighbour list of one structure failed.
    #[error("structure {structure} of the batch: {source}")]
    Neighbors {
        /// Index of the structure in the batch.
        structure: usize,
        /// The neighbour-list error.
        #[source]
        source: NeighborError,
    },
    /// Precomputed neighbour lists do not fit the structures.
    #[error(
        "structure {structure} of the batch has {atoms} atoms but its neighbour list was built \
         for {list_atoms}"
    )]
    ListMismatch {
        /// Index of the structure in the batch.
        structure: usize,
        /// Atoms in the structure.
        atoms: usize,
        /// Atoms the list was built for.
        list_atoms: usize,
    },
    /// The structures and the neighbour lists differ in number.
    #[error("{structures} structures but {lists} neighbour lists")]
    CountMismatch {
        /// Number of structures.
        structures: usize,
        /// Number of lists.
        lists: usize,
    },
    /// The batch has more nodes or edges than u32 indices address.
    #[error("the batch is too large for 32-bit node indices ({0} nodes)")]
    TooLarge(usize),
}

/// Several structures as one disjoint graph, with labels. See the [module docs](self) for the
/// edge convention. Each field documents its layout with `N` nodes, `E` edges and `B`
/// structures; multi-dimensional layouts are flat and row-major.
///
/// The fields are public so that a model crate can move each vector into a tensor; a batch made
/// by [`GraphBatch::new`] satisfies every invariant documented here, and code that edits the
/// fields must keep them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GraphBatch {
    /// Atomic numbers, `[N]` (node features).
    pub numbers: Vec<u8>,
    /// Cartesian positions, Å, `[N, 3]`.
    pub positions: Vec<f64>,
    /// Structure index of each node, `[N]` (PyG's `batch`).
    pub node_structure: Vec<u32>,
    /// Node offsets per structure, `[B + 1]`: structure `s` owns nodes
    /// `node_ptr[s]..node_ptr[s + 1]`.
    pub node_ptr: Vec<usize>,
    /// Source node (neighbour `j`, global index) of each edge, `[E]`.
    pub edge_src: Vec<u32>,
    /// Target node (centre `i`, global index) of each edge, `[E]`; non-decreasing.
    pub edge_dst: Vec<u32>,
    /// Integer lattice shifts of each edge, `[E, 3]`.
    pub edge_shifts: Vec<i32>,
    /// Edge vectors `pos[src] − pos[dst] + shift·cell`, Å, `[E, 3]`.
    pub edge_vectors: Vec<f64>,
    /// Edge lengths, Å, `[E]`.
    pub edge_distances: Vec<f64>,
    /// Edge offsets per structure, `[B + 1]`.
    pub edge_ptr: Vec<usize>,
    /// Incoming-edge offsets per node, `[N + 1]`: edges into node `v` are
    /// `dst_ptr[v]..dst_ptr[v + 1]`.
    pub dst_ptr: Vec<usize>,
    /// Cells, rows are lattice vectors, Å, `[B, 3, 3]`.
    pub cells: Vec<f64>,
    /// Periodicity per structure and axis, `[B, 3]`.
    pub pbc: Vec<[bool; 3]>,
    /// Cell volumes |det(cell)|, Å^3, `[B]` (0 for a molecule without a cell).
    pub volumes: Vec<f64>,
    /// Total energies, eV, `[B]`; 0 where `has_energy` is false.
    pub energy: Vec<f64>,
    /// Which structures have an energy label, `[B]`.
    pub has_energy: Vec<bool>,
    /// Forces, eV/Å, `[N, 3]`; 0 for nodes of structures without forces.
    pub forces: Vec<f64>,
    /// Which structures have force labels, `[B]`.
    pub has_forces: Vec<bool>,
    /// Stress, eV/Å^3, ASE sign (compressed cell negative), `[B, 3, 3]`; 0 where absent.
    pub stress: Vec<f64>,
    /// Which structures have a stress label, `[B]`.
    pub has_stress: Vec<bool>,
}

impl GraphBatch {
    /// Builds the batch of `structures` (in order), computing their neighbour lists in parallel.
    pub fn new<S: Borrow<Structure> + Sync>(
        structures: &[S],
        options: &GraphOptions,
    ) -> Result<Self, BatchError> {
        // Collect every result before looking for errors, so that the error reported is the
        // first failing structure in batch order, not whichever thread failed first.
        let lists = structures
            .par_iter()
            .enumerate()
            .map(|(structure, s)| {
                options
                    .neighbor_list(s.borrow())
                    .map_err(|source| BatchError::Neighbors { structure, source })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_neighbor_lists(structures, &lists)
    }

    /// Builds the batch from neighbour lists computed earlier (e.g. cached across epochs with
    /// [`GraphOptions::neighbor_list`]); `lists[k]` belongs to `structures[k]`.
    pub fn from_neighbor_lists<S: Borrow<Structure>>(
        structures: &[S],
        lists: &[NeighborList],
    ) -> Result<Self, BatchError> {
        if structures.len() != lists.len() {
            return Err(BatchError::CountMismatch {
                structures: structures.len(),
                lists: lists.len(),
            });
        }
        let n_nodes: usize = structures.iter().map(|s| s.borrow().len()).sum();
        let n_edges: usize = lists.iter().map(NeighborList::len).sum();
        if u32::try_from(n_nodes).is_err() || u32::try_from(structures.len()).is_err() {
            return Err(BatchError::TooLarge(n_nodes));
        }
        let b = structures.len();
        let mut batch = GraphBatch {
            numbers: Vec::with_capacity(n_nodes),
            positions: Vec::with_capacity(3 * n_nodes),
            node_structure: Vec::with_capacity(n_nodes),
            node_ptr: Vec::with_capacity(b + 1),
            edge_src: Vec::with_capacity(n_edges),
            edge_dst: Vec::with_capacity(n_edges),
            edge_shifts: Vec::with_capacity(3 * n_edges),
            edge_vectors: Vec::with_capacity(3 * n_edges),
            edge_distances: Vec::with_capacity(n_edges),
            edge_ptr: Vec::with_capacity(b + 1),
            dst_ptr: Vec::with_capacity(n_nodes + 1),
            cells: Vec::with_capacity(9 * b),
            pbc: Vec::with_capacity(b),
            volumes: Vec::with_capacity(b),
            energy: Vec::with_capacity(b),
            has_energy: Vec::with_capacity(b),
            forces: Vec::with_capacity(3 * n_nodes),
            has_forces: Vec::with_capacity(b),
            stress: Vec::with_capacity(9 * b),
            has_stress: Vec::with_capacity(b),
        };
        batch.node_ptr.push(0);
        batch.edge_ptr.push(0);
        batch.dst_ptr.push(0);
        for (k, (s, list)) in structures.iter().zip(lists).enumerate() {
            let s = s.borrow();
            if list.n_atoms() != s.len() {
                return Err(BatchError::ListMismatch {
                    structure: k,
                    atoms: s.len(),
                    list_atoms: list.n_atoms(),
                });
            }
            let base = batch.numbers.len();
            let edge_base = batch.edge_src.len();
            batch.numbers.extend_from_slice(s.numbers());
            batch.positions.extend(s.positions().iter().flatten());
            batch
                .node_structure
                .extend(std::iter::repeat_n(k as u32, s.len()));
            batch
                .edge_src
                .extend(list.second().iter().map(|&j| (base + j as usize) as u32));
            batch
                .edge_dst
                .extend(list.first().iter().map(|&i| (base + i as usize) as u32));
            batch.edge_shifts.extend(list.shifts().iter().flatten());
            batch.edge_vectors.extend(list.vectors().iter().flatten());
            batch.edge_distances.extend_from_slice(list.distances());
            batch
                .dst_ptr
                .extend(list.offsets()[1..].iter().map(|&o| edge_base + o));
            batch.node_ptr.push(batch.numbers.len());
            batch.edge_ptr.push(batch.edge_src.len());
            batch.cells.extend(s.cell().iter().flatten());
            batch.pbc.push(s.pbc());
            batch.volumes.push(s.volume());
            batch.energy.push(s.energy().unwrap_or(0.0));
            batch.has_energy.push(s.energy().is_some());
            match s.forces() {
                Some(f) => batch.forces.extend(f.iter().flatten()),
                None => batch.forces.extend(std::iter::repeat_n(0.0, 3 * s.len())),
            }
            batch.has_forces.push(s.forces().is_some());
            match s.stress() {
                Some(m) => batch.stress.extend(m.iter().flatten()),
                None => batch.stress.extend([0.0; 9]),
            }
            batch.has_stress.push(s.stress().is_some());
        }
        Ok(batch)
    }

    /// Number of structures.
    pub fn n_structures(&self) -> usize {
        self.node_ptr.len().saturating_sub(1)
    }

    /// Number of nodes (atoms) over all structures.
    pub fn n_nodes(&self) -> usize {
        self.numbers.len()
    }

    /// Number of edges over all structures.
    pub fn n_edges(&self) -> usize {
        self.edge_src.len()
    }

    /// Number of atoms of each structure, `[B]`.
    pub fn atoms_per_structure(&self) -> Vec<usize> {
        self.node_ptr.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Recomputes edge vectors from positions, shifts and cells with the documented formula
    /// (what a model does under automatic differentiation), `[E, 3]`.
    pub fn recompute_edge_vectors(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(3 * self.n_edges());
        for e in 0..self.n_edges() {
            let (src, dst) = (self.edge_src[e] as usize, self.edge_dst[e] as usize);
            let s = self.node_structure[dst] as usize;
            let cell = &self.cells[9 * s..9 * s + 9];
            let shift = &self.edge_shifts[3 * e..3 * e + 3];
            for c in 0..3 {
                let image = shift[0] as f64 * cell[c]
                    + shift[1] as f64 * cell[3 + c]
                    + shift[2] as f64 * cell[6 + c];
                out.push((self.positions[3 * src + c] - self.positions[3 * dst + c]) + image);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fcc_cu() -> Structure {
        let a = 3.61;
        let cell = [
            [0.0, a / 2.0, a / 2.0],
            [a / 2.0, 0.0, a / 2.0],
            [a / 2.0, a / 2.0, 0.0],
        ];
        let mut s = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap();
        s.set_energy(-3.5).unwrap();
        s.set_forces(vec![[0.1, -0.2, 0.3]]).unwrap();
        s
    }

    fn rattled_pair() -> Structure {
        let cell = [[4.0, 0.0, 0.0], [1.0, 4.5, 0.0], [0.5, -0.3, 5.0]];
        let mut s = Structure::from_symbols(
            &["Al", "Ni", "Pt"],
            vec![[0.1, 0.2, 0.3], [2.1, 2.4, 0.2], [1.5, -0.7, 3.9]],
            cell,
            [true, false, true],
        )
        .unwrap();
        s.set_stress([[0.1, 0.2, 0.3], [0.2, 0.4, 0.5], [0.3, 0.5, 0.6]])
            .unwrap();
        s
    }

    #[test]
    fn offsets_indices_and_labels() {
        let structures = vec![fcc_cu(), rattled_pair(), fcc_cu()];
        let opts = GraphOptions::new(4.0);
        let batch = GraphBatch::new(&structures, &opts).unwrap();
        let lists: Vec<_> = structures
            .iter()
            .map(|s| opts.neighbor_list(s).unwrap())
            .collect();
        assert_eq!(batch.n_structures(), 3);
        assert_eq!(batch.node_ptr, vec![0, 1, 4, 5]);
        assert_eq!(batch.atoms_per_structure(), vec![1, 3, 1]);
        assert_eq!(batch.node_structure, vec![0, 1, 1, 1, 2]);
        assert_eq!(
            batch.edge_ptr,
            vec![
                0,
                lists[0].len(),
                lists[0].len() + lists[1].len(),
                lists[0].len() + lists[1].len() + lists[2].len()
            ]
        );
        assert_eq!(batch.dst_ptr.len(), batch.n_nodes() + 1);
        assert_eq!(*batch.dst_ptr.last().unwrap(), batch.n_edges());
        for v in 0..batch.n_nodes() {
            for e in batch.dst_ptr[v]..batch.dst_ptr[v + 1] {
                assert_eq!(batch.edge_dst[e] as usize, v);
            }
        }
        // Edges stay inside their structure, and source/target follow the j/i convention.
        for s in 0..3 {
            let nodes = batch.node_ptr[s]..batch.node_ptr[s + 1];
            let list = &lists[s];
            for (p, e) in (batch.edge_ptr[s]..batch.edge_ptr[s + 1]).enumerate() {
                assert!(nodes.contains(&(batch.edge_src[e] as usize)));
                assert_eq!(
                    batch.edge_src[e] as usize - nodes.start,
                    list.second()[p] as usize
                );
                assert_eq!(
                    batch.edge_dst[e] as usize - nodes.start,
                    list.first()[p] as usize
                );
            }
        }
        // Stored vectors equal those recomputed from positions + shifts·cell, and distances.
        let recomputed = batch.recompute_edge_vectors();
        for e in 0..batch.n_edges() {
            let v = &batch.edge_vectors[3 * e..3 * e + 3];
            let r = &recomputed[3 * e..3 * e + 3];
            for c in 0..3 {
                assert!((v[c] - r[c]).abs() < 1e-12);
            }
            let d = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            assert!((d - batch.edge_distances[e]).abs() < 1e-12);
        }
        assert_eq!(batch.has_energy, vec![true, false, true]);
        assert_eq!(batch.energy, vec![-3.5, 0.0, -3.5]);
        assert_eq!(batch.has_forces, vec![true, false, true]);
        assert_eq!(&batch.forces[..3], &[0.1, -0.2, 0.3]);
        assert!(batch.forces[3..12].iter().all(|&f| f == 0.0));
        assert_eq!(batch.has_stress, vec![false, true, false]);
        assert_eq!(batch.stress[9 + 5], 0.5);
        assert_eq!(batch.cells[9 + 3], 1.0);
        assert!((batch.volumes[1] - 90.0).abs() < 1e-12);
        assert_eq!(batch.pbc[1], [true, false, true]);
        // Non-periodic axis: no shift along it.
        for e in batch.edge_ptr[1]..batch.edge_ptr[2] {
            assert_eq!(batch.edge_shifts[3 * e + 1], 0);
        }
    }

    #[test]
    fn max_neighbors_is_deterministic() {
        let structures = [fcc_cu(), rattled_pair()];
        let opts = GraphOptions::new(7.0).with_max_neighbors(20);
        let a = GraphBatch::new(&structures, &opts).unwrap();
        let refs: Vec<&Structure> = structures.iter().collect();
        let b = GraphBatch::new(&refs, &opts).unwrap();
        assert_eq!(a, b);
        for v in 0..a.n_nodes() {
            assert_eq!(a.dst_ptr[v + 1] - a.dst_ptr[v], 20);
        }
        // fcc Cu keeps its 12 first (2.55 Å) and 6 second (3.61 Å) neighbours and 2 of the 24
        // third-shell (4.42 Å) ones; with a degeneracy tolerance the whole third shell stays.
        let d = &a.edge_distances[a.edge_ptr[0]..a.edge_ptr[1]];
        assert_eq!(d.iter().filter(|&&x| x < 3.0).count(), 12);
        assert_eq!(d.iter().filter(|&&x| (x - 3.61).abs() < 1e-9).count(), 6);
        assert_eq!(d.iter().filter(|&&x| x > 4.0).count(), 2);
        let whole = GraphOptions {
            degeneracy_tolerance: Some(1e-6),
            ..opts
        };
        let c = GraphBatch::new(&structures[..1], &whole).unwrap();
        assert_eq!(c.n_edges(), 12 + 6 + 24);
    }

    #[test]
    fn errors_name_the_structure() {
        let structures = [fcc_cu(), rattled_pair()];
        let err = GraphBatch::new(&structures, &GraphOptions::new(-1.0)).unwrap_err();
        assert!(
            matches!(err, BatchError::Neighbors { structure: 0, .. }),
            "{err}"
        );
        let list = GraphOptions::new(3.0)
            .neighbor_list(&structures[0])
            .unwrap();
        let err = GraphBatch::from_neighbor_lists(&structures, &[list.clone(), list.clone()])
            .unwrap_err();
        assert!(matches!(
            err,
            BatchError::ListMismatch {
                structure: 1,
                atoms: 3,
                list_atoms: 1
            }
        ));
        let err = GraphBatch::from_neighbor_lists(&structures, &[list]).unwrap_err();
        assert!(matches!(err, BatchError::CountMismatch { .. }));
        let empty = GraphBatch::new::<Structure>(&[], &GraphOptions::new(3.0)).unwrap();
        assert_eq!(
            (empty.n_structures(), empty.n_nodes(), empty.n_edges()),
            (0, 0, 0)
        );
    }
}
