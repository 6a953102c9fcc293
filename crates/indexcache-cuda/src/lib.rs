//! The NVIDIA backend of the engine (`--device cuda`).
//!
//! Built with cudarc's dynamic loading: the binary links no CUDA library and runs on machines
//! without one; [`dev::Dev::open`] fails with a clear error there, and nothing touches CUDA until
//! it is called.

pub mod dev;
