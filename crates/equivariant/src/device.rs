//! Choosing the compute device: `auto`, `cpu` or `cuda`, with one clear fallback message.
//!
//! Every op of this crate has a CPU implementation; CUDA accelerates it when the workspace is
//! built with the `cuda` feature and a GPU is present. [`select_device`] never panics: when
//! CUDA is asked for (or `auto`) but unavailable — a binary built without the feature, no
//! driver (the stub `libcuda.so` of `cargo xtask cuda-env` answers `CUDA_ERROR_NO_DEVICE`),
//! no GPU, or a busy one — it prints one line to stderr saying why and returns the CPU.
//!
//! ```
//! use matscale_equivariant::device::{select_device, DeviceRequest};
//!
//! let request: DeviceRequest = "cpu".parse().unwrap();
//! let selected = select_device(request);
//! assert!(selected.device.is_cpu());
//! assert!(selected.fallback.is_none());
//! ```

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// Which device a command should run on (the `--device` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA device 0 when available, else the CPU (with a message).
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0; falls back to the CPU with a message when unavailable.
    Cuda,
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            other => Err(format!("unknown device {other:?}: use auto, cpu or cuda")),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// The outcome of [`select_device`].
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    /// The device to use.
    pub device: Device,
    /// Why CUDA was not used although it was requested (`auto` or `cuda`); `None` when the
    /// request was met.
    pub fallback: Option<String>,
}

impl SelectedDevice {
    /// `"cpu"` or `"cuda:0"`, for logs and result files.
    pub fn label(&self) -> &'static str {
        if self.device.is_cuda() {
            "cuda:0"
        } else {
            "cpu"
        }
    }
}

/// Opens CUDA device 0, turning errors and panics of the driver layer into a message.
fn open_cuda() -> Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("this binary was built without the `cuda` feature".into());
    }
    // A missing driver library can make the loader panic instead of returning an error: catch
    // it with a silent hook so that the user sees one line, not a backtrace.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| Device::new_cuda(0));
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(device)) => {
            keep_freed_memory(&device);
            Ok(device)
        }
        // The first line only: candle appends a backtrace when RUST_BACKTRACE is set.
        Ok(Err(e)) => Err(format!(
            "CUDA device 0 is unavailable ({})",
            e.to_string().lines().next().unwrap_or_default().trim()
        )),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the CUDA driver could not be loaded ({what})"))
        }
    }
}

/// Keeps freed device memory cached for reuse ([`crate::cuda::cache_freed_memory`]); a failure
/// only costs speed, so it is reported and the device used as it is.
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &Device) {
    if let Device::Cuda(dev) = device {
        if let Err(e) = crate::cuda::cache_freed_memory(dev) {
            eprintln!("matscale: could not keep freed CUDA memory cached ({e}); continuing");
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_memory(_device: &Device) {}

/// Resolves `request` to a device without printing anything.
pub fn resolve_device(request: DeviceRequest) -> SelectedDevice {
    match request {
        DeviceRequest::Cpu => SelectedDevice {
            device: Device::Cpu,
            fallback: None,
        },
        DeviceRequest::Auto | DeviceRequest::Cuda => match open_cuda() {
            Ok(device) => SelectedDevice {
                device,
                fallback: None,
            },
            Err(reason) => SelectedDevice {
                device: Device::Cpu,
                fallback: Some(reason),
            },
        },
    }
}

/// Resolves `request` and, if CUDA was requested explicitly but is unavailable, prints one
/// line to stderr (`matscale: --device cuda: … ; running on the CPU`). For `auto` the
/// fallback is printed only when the binary was built with the `cuda` feature (a CPU build
/// asked for `auto` is simply a CPU run).
pub fn select_device(request: DeviceRequest) -> SelectedDevice {
    let selected = resolve_device(request);
    if let Some(reason) = &selected.fallback {
        if request == DeviceRequest::Cuda || cfg!(feature = "cuda") {
            eprintln!("matscale: --device {request}: {reason}; running on the CPU");
        }
    }
    selected
}

/// Peak bytes in use on `device` since [`reset_peak_device_bytes`]: the default memory pool's
/// high watermark on a GPU (`cuda::peak_pool_bytes` in a `cuda` build); `None` on the CPU, in a
/// build without the `cuda` feature, or if the driver cannot say. Synchronise first.
pub fn peak_device_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return crate::cuda::peak_pool_bytes(dev).ok();
    }
    let _ = device;
    None
}

/// Starts a new [`peak_device_bytes`] measurement from the bytes in use now (a no-op on the
/// CPU and without the `cuda` feature). Returns whether a GPU measurement was reset.
pub fn reset_peak_device_bytes(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return crate::cuda::reset_peak_pool_bytes(dev).is_ok();
    }
    let _ = device;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU has no device memory pool: no peak, nothing reset.
    #[test]
    fn cpu_has_no_device_peak() {
        assert!(!reset_peak_device_bytes(&Device::Cpu));
        assert_eq!(peak_device_bytes(&Device::Cpu), None);
    }

    #[test]
    fn requests_parse_and_print() {
        for (text, request) in [
            ("auto", DeviceRequest::Auto),
            ("CPU", DeviceRequest::Cpu),
            ("cuda", DeviceRequest::Cuda),
            ("gpu", DeviceRequest::Cuda),
        ] {
            assert_eq!(text.parse::<DeviceRequest>(), Ok(request));
        }
        assert_eq!(DeviceRequest::Cuda.to_string(), "cuda");
        let err = "tpu".parse::<DeviceRequest>().unwrap_err();
        assert!(err.contains("auto, cpu or cuda"), "{err}");
    }

    #[test]
    fn cuda_request_never_panics_and_explains_a_fallback() {
        let selected = resolve_device(DeviceRequest::Cuda);
        if selected.device.is_cpu() {
            let reason = selected
                .fallback
                .expect("a CPU answer to a CUDA request says why");
            assert!(!reason.is_empty());
            if !cfg!(feature = "cuda") {
                assert!(reason.contains("without the `cuda` feature"), "{reason}");
            }
        } else {
            assert!(selected.fallback.is_none());
            assert_eq!(selected.label(), "cuda:0");
        }
        let cpu = resolve_device(DeviceRequest::Cpu);
        assert!(cpu.device.is_cpu() && cpu.fallback.is_none());
        assert_eq!(cpu.label(), "cpu");
    }
}
