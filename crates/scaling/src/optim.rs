//! Glue between our objectives and argmin's L-BFGS.
//!
//! Every objective computes its value and analytic gradient in one pass
//! ([`Smooth::eval`]). argmin asks for the cost and the gradient separately,
//! usually at the same point, so the adaptor caches the last evaluation. It
//! also remembers the best finite point seen, so that a run that ends in a
//! line-search failure (common once the objective is flat to rounding) still
//! returns its best iterate instead of nothing.

use std::cell::RefCell;

use argmin::core::{CostFunction, Executor, Gradient};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;

/// A smooth objective with an analytic gradient.
pub(crate) trait Smooth {
    /// Returns f(x) and writes ∇f(x) into `grad` (same length as `x`).
    fn eval(&self, x: &[f64], grad: &mut [f64]) -> f64;
}

/// Settings of one L-BFGS run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LbfgsSettings {
    /// Stop when ‖∇f‖₂ falls below this.
    pub tol_grad: f64,
    /// Stop when |Δf| between iterations falls below this.
    pub tol_cost: f64,
    /// Iteration cap.
    pub max_iters: u64,
    /// History length.
    pub memory: usize,
}

impl Default for LbfgsSettings {
    fn default() -> Self {
        LbfgsSettings {
            tol_grad: 1e-10,
            tol_cost: 1e-16,
            max_iters: 1000,
            memory: 10,
        }
    }
}

/// Result of one L-BFGS run: the best point evaluated.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    /// Best point.
    pub x: Vec<f64>,
    /// f at `x`.
    pub cost: f64,
    /// ‖∇f(x)‖₂.
    pub grad_norm: f64,
}

type Evaluation = Option<(Vec<f64>, f64, Vec<f64>)>;

/// The adaptor handed to argmin. The cache and the best point live outside
/// it (borrowed), because argmin does not hand the problem back when a line
/// search fails inside L-BFGS.
struct Cached<'a, S: Smooth> {
    inner: &'a S,
    last: &'a RefCell<Evaluation>,
    best: &'a RefCell<Evaluation>,
}

impl<S: Smooth> Cached<'_, S> {
    fn evaluate(&self, x: &[f64]) -> (f64, Vec<f64>) {
        if let Some((lx, lf, lg)) = self.last.borrow().as_ref() {
            if lx.as_slice() == x {
                return (*lf, lg.clone());
            }
        }
        let mut g = vec![0.0; x.len()];
        let f = self.inner.eval(x, &mut g);
        let finite = f.is_finite() && g.iter().all(|v| v.is_finite());
        if finite {
            let mut best = self.best.borrow_mut();
            if best.as_ref().is_none_or(|(_, bf, _)| f < *bf) {
                *best = Some((x.to_vec(), f, g.clone()));
            }
        }
        *self.last.borrow_mut() = Some((x.to_vec(), f, g.clone()));
        (f, g)
    }
}

impl<S: Smooth> CostFunction for Cached<'_, S> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, x: &Self::Param) -> Result<f64, argmin::core::Error> {
        let (f, _) = self.evaluate(x);
        // argmin's line search copes with +inf (it backtracks) but not NaN.
        Ok(if f.is_nan() { f64::INFINITY } else { f })
    }
}

impl<S: Smooth> Gradient for Cached<'_, S> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, x: &Self::Param) -> Result<Vec<f64>, argmin::core::Error> {
        let (_, g) = self.evaluate(x);
        Ok(g.into_iter()
            .map(|v| if v.is_finite() { v } else { 0.0 })
            .collect())
    }
}

/// Minimises `f` from `x0` with argmin's L-BFGS (Moré–Thuente line search).
/// Returns `None` only when no finite point was ever evaluated.
pub(crate) fn lbfgs<S: Smooth>(f: &S, x0: &[f64], settings: LbfgsSettings) -> Option<Outcome> {
    let last = RefCell::new(None);
    let best = RefCell::new(None);
    let problem = Cached {
        inner: f,
        last: &last,
        best: &best,
    };
    let solver = LBFGS::new(MoreThuenteLineSearch::new(), settings.memory)
        .with_tolerance_grad(settings.tol_grad)
        .expect("tol_grad is positive by construction")
        .with_tolerance_cost(settings.tol_cost)
        .expect("tol_cost is non-negative by construction");
    let run = Executor::new(problem, solver)
        .configure(|s| s.param(x0.to_vec()).max_iters(settings.max_iters))
        .timer(false)
        .run();
    // Whatever argmin reports (convergence, iteration cap, a line search
    // that cannot improve, an error), the answer is the best point seen; the
    // callers judge it by its objective and gradient norm.
    drop(run);
    let best = best.into_inner()?;
    let grad_norm = best.2.iter().map(|g| g * g).sum::<f64>().sqrt();
    Some(Outcome {
        x: best.0,
        cost: best.1,
        grad_norm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rosenbrock;
    impl Smooth for Rosenbrock {
        fn eval(&self, x: &[f64], g: &mut [f64]) -> f64 {
            let (a, b) = (x[0], x[1]);
            g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
            g[1] = 200.0 * (b - a * a);
            (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2)
        }
    }

    #[test]
    fn lbfgs_solves_rosenbrock() {
        let out = lbfgs(&Rosenbrock, &[-1.2, 1.0], LbfgsSettings::default()).unwrap();
        assert!(
            (out.x[0] - 1.0).abs() < 1e-8 && (out.x[1] - 1.0).abs() < 1e-8,
            "{out:?}"
        );
    }
}
