//! Analytic FLOP counts.
//!
//! The study matscale follows measured FLOPs with PyTorch's `FlopCounterMode`, which counts
//! matrix products only and misses the gathers, scatters and elementwise work that dominate
//! graph networks. matscale counts every operation of a model's forward pass analytically,
//! from the batch shape, with these rules (one FLOP = one floating-point add or multiply):
//!
//! | operation | forward | backward |
//! |---|---|---|
//! | matmul `[m, k] · [k, n]` | `2·m·k·n` | `4·m·k·n` (gradients of both operands) |
//! | gather (`index_select`) of `r` rows of width `w` | `r·w` (one read-write per element) | `r·w` (the scatter-add of the gradient) |
//! | scatter / segment sum of `r` rows of width `w` | `r·w` | `r·w` (the gather of the gradient) |
//! | elementwise over `n` elements, `c` FLOPs each | `n·c` | `2·n·c` (derivative and chain product) |
//!
//! Elementwise costs per element: add, mul, ReLU, copy-like ops 1; a LayerNorm 8; SiLU,
//! softplus, GELU, exponential, sigmoid, cosine 4 (a transcendental counted as 4, following
//! the convention of counting a polynomial evaluation); a softmax 5. Parameter updates of the
//! optimiser are not counted (they do not grow with the data).
//!
//! Totals per training step of one batch:
//! * direct force mode: forward + backward;
//! * conservative force mode: a prediction is forward + backward (the input gradient gives
//!   forces and stress), and a training step differentiates that again, counted as
//!   3 × (forward + backward).
//!
//! A model implements [`Model::count_flops`](crate::Model::count_flops) by replaying its
//! forward pass on a [`FlopCounter`].

use serde::{Deserialize, Serialize};

/// FLOPs split by kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct FlopBreakdown {
    /// Matrix products.
    pub matmul: f64,
    /// Gathers, scatters and segment sums.
    pub gather_scatter: f64,
    /// Elementwise work (activations, norms, adds).
    pub elementwise: f64,
}

impl FlopBreakdown {
    /// The sum of all kinds.
    pub fn total(&self) -> f64 {
        self.matmul + self.gather_scatter + self.elementwise
    }

    /// Every entry multiplied by `factor`.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            matmul: self.matmul * factor,
            gather_scatter: self.gather_scatter * factor,
            elementwise: self.elementwise * factor,
        }
    }
}

impl std::ops::Add for FlopBreakdown {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        Self {
            matmul: self.matmul + rhs.matmul,
            gather_scatter: self.gather_scatter + rhs.gather_scatter,
            elementwise: self.elementwise + rhs.elementwise,
        }
    }
}

/// Accumulates the forward and backward FLOPs of a pass (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FlopCounter {
    forward: FlopBreakdown,
    backward: FlopBreakdown,
}

impl FlopCounter {
    /// An empty counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// A matmul `[m, k] · [k, n]`.
    pub fn matmul(&mut self, m: usize, k: usize, n: usize) {
        let f = 2.0 * m as f64 * k as f64 * n as f64;
        self.forward.matmul += f;
        self.backward.matmul += 2.0 * f;
    }

    /// A linear layer on `rows` inputs (matmul plus bias add when `bias`).
    pub fn linear(&mut self, rows: usize, d_in: usize, d_out: usize, bias: bool) {
        self.matmul(rows, d_in, d_out);
        if bias {
            self.elementwise(rows * d_out, 1.0);
        }
    }

    /// A gather of `rows` rows of width `width`.
    pub fn gather(&mut self, rows: usize, width: usize) {
        let f = rows as f64 * width as f64;
        self.forward.gather_scatter += f;
        self.backward.gather_scatter += f;
    }

    /// A scatter-add / segment sum of `rows` rows of width `width`.
    pub fn scatter(&mut self, rows: usize, width: usize) {
        self.gather(rows, width);
    }

    /// Elementwise work on `n` elements at `flops_per_element` each.
    pub fn elementwise(&mut self, n: usize, flops_per_element: f64) {
        let f = n as f64 * flops_per_element;
        self.forward.elementwise += f;
        self.backward.elementwise += 2.0 * f;
    }

    /// The forward FLOPs.
    pub fn forward(&self) -> FlopBreakdown {
        self.forward
    }

    /// The backward FLOPs.
    pub fn backward(&self) -> FlopBreakdown {
        self.backward
    }
}

/// Cost of one transcendental function per element (see the [module docs](self)).
pub const TRANSCENDENTAL: f64 = 4.0;
/// Cost of a LayerNorm per element.
pub const LAYER_NORM: f64 = 8.0;
/// Cost of a softmax per element.
pub const SOFTMAX: f64 = 5.0;

/// The FLOPs of a model on one batch shape, in every mode a run needs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Flops {
    /// One forward pass producing the model's raw outputs (no input gradient).
    pub forward: FlopBreakdown,
    /// The backward pass of that forward.
    pub backward: FlopBreakdown,
    /// True when forces and stress come from the gradient of the energy.
    pub conservative: bool,
    /// Structures in the batch the counts are for.
    pub n_structures: usize,
}

impl Flops {
    /// FLOPs of one prediction (energy, forces, stress) of the batch.
    pub fn prediction(&self) -> f64 {
        if self.conservative {
            self.forward.total() + self.backward.total()
        } else {
            self.forward.total()
        }
    }

    /// FLOPs of one training step (prediction plus the gradient of the loss) of the batch.
    pub fn training_step(&self) -> f64 {
        let once = self.forward.total() + self.backward.total();
        if self.conservative {
            3.0 * once
        } else {
            once
        }
    }

    /// Training FLOPs per structure (the number the scaling fits use).
    pub fn training_per_structure(&self) -> f64 {
        self.training_step() / self.n_structures.max(1) as f64
    }

    /// Prediction FLOPs per structure.
    pub fn prediction_per_structure(&self) -> f64 {
        self.prediction() / self.n_structures.max(1) as f64
    }
}
