//! Switches between two CUDA implementations of one op, for kernels that are correct (host
//! emulation and `tests/cuda.rs` compare both paths with the CPU op) but whose speed has not
//! yet been measured against the path they would replace. Each switch is off by default; its
//! environment variable (`1` turns it on) lets `scripts/gpu-verify.sh ab-switches` time both
//! paths of one build, and [`PathSwitch::set`] lets a benchmark or test run both in one
//! process. They exist in every build (so a program can set them unconditionally) but change
//! nothing without the `cuda` feature: the CPU kernels have one path each.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// One off-by-default choice of kernel path, read from the environment once per process
/// unless a program overrides it.
#[derive(Debug)]
pub struct PathSwitch {
    env: &'static str,
    /// 0: the environment decides; 1: off; 2: on.
    choice: AtomicU8,
    from_env: OnceLock<bool>,
}

impl PathSwitch {
    const fn new(env: &'static str) -> Self {
        Self {
            env,
            choice: AtomicU8::new(0),
            from_env: OnceLock::new(),
        }
    }

    /// The environment variable that turns the path on (`1`; anything else, or unset: off).
    pub fn env_var(&self) -> &'static str {
        self.env
    }

    /// Overrides the environment for this process: `Some(true)` on, `Some(false)` off, `None`
    /// back to what the environment variable says.
    pub fn set(&self, choice: Option<bool>) {
        let v = match choice {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.choice.store(v, Ordering::Relaxed);
    }

    /// Whether the path is on now.
    pub fn enabled(&self) -> bool {
        match self.choice.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => *self
                .from_env
                .get_or_init(|| std::env::var(self.env).is_ok_and(|v| v.trim() == "1")),
        }
    }
}

/// The fused S2 activation kernels (`kernels/s2fused.cu`) in place of the batched GEMMs,
/// wherever they apply (separable grid, odd `2·mmax + 1 ≤ 13`): `MATSCALE_S2_FUSED`.
pub static FUSED_S2_ACTIVATION: PathSwitch = PathSwitch::new("MATSCALE_S2_FUSED");

/// The edge Wigner-D in two passes (one thread per edge for the angle tables, then one thread
/// per entry) in place of one thread block per edge: `MATSCALE_WIGNER_TWO_PASS`.
pub static WIGNER_TWO_PASS: PathSwitch = PathSwitch::new("MATSCALE_WIGNER_TWO_PASS");

/// EquiformerV2's `layer_norm_sh` as one CUDA op (`kernels/norm.cu` `ln_sh_*`) in place of
/// the composed candle ops: `MATSCALE_LN_SH_CUDA`.
pub static LAYER_NORM_SH: PathSwitch = PathSwitch::new("MATSCALE_LN_SH_CUDA");

/// Every switch, for programs that report which paths they ran.
pub static ALL: [&PathSwitch; 3] = [&FUSED_S2_ACTIVATION, &WIGNER_TWO_PASS, &LAYER_NORM_SH];

#[cfg(test)]
mod tests {
    use super::*;

    /// `scripts/gpu-verify.sh ab-switches` times every switch: its list must name each one.
    #[test]
    fn the_gpu_ab_script_lists_every_switch() {
        let script = include_str!("../../../scripts/gpu-verify.sh");
        let line = script
            .lines()
            .find_map(|l| l.strip_prefix("SWITCHES=\""))
            .expect("a SWITCHES=\"...\" line in scripts/gpu-verify.sh");
        let listed: Vec<&str> = line.trim_end_matches('"').split_whitespace().collect();
        let ours: Vec<&str> = ALL.iter().map(|s| s.env_var()).collect();
        assert_eq!(listed, ours);
    }

    #[test]
    fn an_override_wins_over_the_environment_and_none_returns_to_it() {
        static S: PathSwitch = PathSwitch::new("MATSCALE_TEST_SWITCH_NEVER_SET");
        assert!(!S.enabled(), "off when the variable is unset");
        S.set(Some(true));
        assert!(S.enabled());
        S.set(Some(false));
        assert!(!S.enabled());
        S.set(None);
        assert!(!S.enabled());
        assert_eq!(S.env_var(), "MATSCALE_TEST_SWITCH_NEVER_SET");
    }
}
