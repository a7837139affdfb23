//! Which burn device the worker computes on.
//!
//! The backend is a build-time choice (cargo features `flex`, `wgpu`, `cuda`, `tch`, `tch-cuda`,
//! `ndarray`), so the device is
//! picked here with `cfg` and nowhere else: the rest of the worker only ever sees a runtime
//! [`Device`]. The most capable compiled-in backend wins, because a build that bothered to
//! include a GPU backend means to use it.
//!
//! `BURN_DEVICE` is not read here. burn honours it only inside `Device::default()`, which panics
//! on an unknown or not-compiled-in name; a typo in an environment variable must not crash a
//! worker, and the feature already says which backend was meant.

use burn::tensor::Device;

/// The device models are built on and run on (training adds autodiff on top of it).
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    // burn 0.22 deprecates burn-tch for its CubeCL backends, whose `cuda` and `cpu` download
    // an LLVM bundle at build time; LibTorch from the PyPI wheel is the CUDA path that builds
    // offline (README, GPU backends).
    #[cfg(all(feature = "tch-cuda", not(feature = "cuda")))]
    #[allow(deprecated)]
    {
        Device::libtorch_cuda(0)
    }
    #[cfg(all(feature = "wgpu", not(any(feature = "cuda", feature = "tch-cuda"))))]
    {
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
    }
    #[cfg(all(
        feature = "tch",
        not(any(feature = "cuda", feature = "tch-cuda", feature = "wgpu"))
    ))]
    #[allow(deprecated)]
    {
        Device::libtorch()
    }
    #[cfg(all(
        feature = "ndarray",
        not(any(feature = "cuda", feature = "tch", feature = "wgpu"))
    ))]
    #[allow(deprecated)]
    {
        Device::ndarray()
    }
    #[cfg(not(any(
        feature = "cuda",
        feature = "tch",
        feature = "wgpu",
        feature = "ndarray"
    )))]
    {
        Device::flex()
    }
}

/// A short name of the backend [`device`] returns, for logs and metrics labels.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "tch-cuda") {
        "tch-cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "tch") {
        "tch"
    } else if cfg!(feature = "ndarray") {
        "ndarray"
    } else {
        "flex"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_matches_the_device() {
        // Default builds run on flex; a GPU build must not claim to be on the CPU.
        let device = device();
        if backend_name() == "flex" {
            assert_eq!(device, Device::flex());
        } else {
            assert_ne!(device, Device::flex());
        }
    }
}
