//! Switches between two CUDA implementations of one op, both correct (host emulation and
//! `tests/cuda.rs` compare both paths with the CPU op), so that their speed can be compared in
//! one build: the environment variable (`1` on, `0` off) lets `scripts/gpu-verify.sh
//! ab-switches` time both paths, and [`PathSwitch::set`] lets a benchmark or test run both in
//! one process. A new path starts off; once a GPU run shows it faster it becomes the default. They exist in every build (so a program can set them unconditionally) but change
//! nothing without the `cuda` feature: the CPU kernels have one path each.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// One choice of kernel path: its default, the environment variable that overrides it (read
/// once per process), and a program's override of both.
#[derive(Debug)]
pub struct PathSwitch {
    env: &'static str,
    default: bool,
    /// 0: the environment decides; 1: off; 2: on.
    choice: AtomicU8,
    from_env: OnceLock<bool>,
}

impl PathSwitch {
    const fn new(env: &'static str, default: bool) -> Self {
        Self {
            env,
            default,
            choice: AtomicU8::new(0),
            from_env: OnceLock::new(),
        }
    }

    /// The environment variable that chooses the path: `1` on, `0` off; unset or anything
    /// else, the default.
    pub fn env_var(&self) -> &'static str {
        self.env
    }

    /// Whether the path is on when neither the environment nor the program chooses.
    pub fn default_on(&self) -> bool {
        self.default
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

    /// Runs `f` with the path set to `on` for this process, then hands the choice back to the
    /// environment (also when `f` panics): how a benchmark or test runs both paths.
    pub fn with<R>(&self, on: bool, f: impl FnOnce() -> R) -> R {
        struct Restore<'a>(&'a PathSwitch);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.set(None);
            }
        }
        self.set(Some(on));
        let _restore = Restore(self);
        f()
    }

    /// Whether the path is on now.
    pub fn enabled(&self) -> bool {
        match self.choice.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => *self.from_env.get_or_init(|| {
                match std::env::var(self.env).as_deref().map(str::trim) {
                    Ok("1") => true,
                    Ok("0") => false,
                    _ => self.default,
                }
            }),
        }
    }
}

/// The fused S2 activation kernels (`kernels/s2fused.cu`) in place of the batched GEMMs,
/// wherever they apply (separable grid, odd `2·mmax + 1 ≤ 13`): on by default since session
/// 19 (on an H100 1.4–3.2× faster than the GEMM path per op, eqV2-S's training step 1.10×);
/// `MATSCALE_S2_FUSED=0` runs the GEMMs.
pub static FUSED_S2_ACTIVATION: PathSwitch = PathSwitch::new("MATSCALE_S2_FUSED", true);

/// The edge Wigner-D in two passes (one thread per edge for the angle tables, then one thread
/// per entry) in place of one thread block per edge: off, `MATSCALE_WIGNER_TWO_PASS=1` turns
/// it on. Timed on an H100 in session 19 it was no faster (3 % faster to 15 % slower per op,
/// the same training step).
pub static WIGNER_TWO_PASS: PathSwitch = PathSwitch::new("MATSCALE_WIGNER_TWO_PASS", false);

/// EquiformerV2's `layer_norm_sh` as one CUDA op (`kernels/norm.cu` `ln_sh_*`) in place of
/// the composed candle ops: on by default since session 19 (eqV2-S's training step 1.05× on an
/// H100); `MATSCALE_LN_SH_CUDA=0` composes it.
pub static LAYER_NORM_SH: PathSwitch = PathSwitch::new("MATSCALE_LN_SH_CUDA", true);

/// Every switch, for programs that report which paths they ran.
pub static ALL: [&PathSwitch; 3] = [&FUSED_S2_ACTIVATION, &WIGNER_TWO_PASS, &LAYER_NORM_SH];

#[cfg(test)]
mod tests {
    use super::*;

    /// `scripts/gpu-verify.sh ab-switches` times every switch: its list must name each one
    /// with its default.
    #[test]
    fn the_gpu_ab_script_lists_every_switch() {
        let script = include_str!("../../../scripts/gpu-verify.sh");
        let line = script
            .lines()
            .find_map(|l| l.strip_prefix("SWITCHES=\""))
            .expect("a SWITCHES=\"...\" line in scripts/gpu-verify.sh");
        let listed: Vec<String> = line
            .trim_end_matches('"')
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let ours: Vec<String> = ALL
            .iter()
            .map(|s| format!("{}:{}", s.env_var(), u8::from(s.default_on())))
            .collect();
        assert_eq!(listed, ours);
    }

    #[test]
    fn an_override_wins_over_the_environment_and_none_returns_to_it() {
        for default in [false, true] {
            let s = PathSwitch::new("MATSCALE_TEST_SWITCH_NEVER_SET", default);
            assert_eq!(
                s.enabled(),
                default,
                "the default when the variable is unset"
            );
            s.set(Some(!default));
            assert_eq!(s.enabled(), !default);
            s.set(Some(default));
            assert_eq!(s.enabled(), default);
            s.set(None);
            assert_eq!(s.enabled(), default);
            assert_eq!(s.with(!default, || s.enabled()), !default);
            assert_eq!(s.enabled(), default, "`with` hands the choice back");
            assert_eq!(s.env_var(), "MATSCALE_TEST_SWITCH_NEVER_SET");
            assert_eq!(s.default_on(), default);
        }
    }

    #[test]
    fn the_variable_turns_a_path_on_and_off_whatever_its_default() {
        // A variable that is not set anywhere else; set before the switch first reads it.
        std::env::set_var("MATSCALE_TEST_SWITCH_OFF", "0");
        std::env::set_var("MATSCALE_TEST_SWITCH_ON", " 1 ");
        assert!(!PathSwitch::new("MATSCALE_TEST_SWITCH_OFF", true).enabled());
        assert!(PathSwitch::new("MATSCALE_TEST_SWITCH_ON", false).enabled());
    }
}
