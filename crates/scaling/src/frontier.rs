//! The empirical compute-optimal frontier.

use serde::{Deserialize, Serialize};

use crate::table::Run;

/// A run on the lower envelope of loss over compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontierPoint {
    /// Model family.
    pub model: String,
    /// Training compute C (FLOP).
    pub flops: f64,
    /// Best validation loss.
    pub loss: f64,
    /// Parameter count N.
    pub params: f64,
    /// Training-set size D.
    pub train_structures: f64,
    /// Source line of the run.
    pub line: u64,
}

/// Lower envelope of loss over C across all runs: the runs that reach a
/// lower loss than every run with less (or equal) compute, sorted by C.
/// At equal C only the lowest loss can be on the envelope.
pub fn lower_envelope(runs: &[Run]) -> Vec<FrontierPoint> {
    let mut order: Vec<&Run> = runs.iter().collect();
    order.sort_by(|a, b| {
        a.flops
            .total_cmp(&b.flops)
            .then(a.val_loss.total_cmp(&b.val_loss))
    });
    let mut out: Vec<FrontierPoint> = Vec::new();
    let mut best = f64::INFINITY;
    for r in order {
        if r.val_loss < best {
            best = r.val_loss;
            out.push(FrontierPoint {
                model: r.model.clone(),
                flops: r.flops,
                loss: r.val_loss,
                params: r.params,
                train_structures: r.train_structures,
                line: r.line,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_keeps_only_improvements() {
        let runs: Vec<Run> = [
            (1.0, 5.0),
            (2.0, 6.0),
            (2.0, 4.0),
            (3.0, 4.5),
            (4.0, 3.0),
            (4.0, 3.5),
        ]
        .iter()
        .map(|&(c, l)| Run::new("m", 1.0, 1.0, c, l))
        .collect();
        let env = lower_envelope(&runs);
        let got: Vec<(f64, f64)> = env.iter().map(|p| (p.flops, p.loss)).collect();
        assert_eq!(got, vec![(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]);
    }
}
