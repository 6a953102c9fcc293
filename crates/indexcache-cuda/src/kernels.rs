//! The CUDA C sources, compiled at run time by NVRTC ([`crate::dev::compile`]).

use crate::dev::Source;

pub const INDEXER: Source = Source { name: "indexer", code: include_str!("kernels/indexer.cu") };
pub const TOPK: Source = Source { name: "topk", code: include_str!("kernels/topk.cu") };
pub const MLA: Source = Source { name: "mla", code: include_str!("kernels/mla.cu") };
/// `common.cuh` (element types, bf16 <-> f32) is prepended to the sources that share it.
pub const ELEMENTWISE: Source = Source {
    name: "elementwise",
    code: concat!(include_str!("kernels/common.cuh"), include_str!("kernels/elementwise.cu")),
};
pub const MOE: Source =
    Source { name: "moe", code: concat!(include_str!("kernels/common.cuh"), include_str!("kernels/moe.cu")) };
pub const FP8: Source = Source { name: "fp8", code: include_str!("kernels/fp8.cu") };
pub const MOE_DECODE: Source = Source {
    name: "moe_decode",
    code: concat!(include_str!("kernels/common.cuh"), include_str!("kernels/moe_decode.cu")),
};

pub const GQA: Source =
    Source { name: "gqa", code: concat!(include_str!("kernels/common.cuh"), include_str!("kernels/gqa.cu")) };

/// Every kernel source (the compile test in CI walks this list).
pub fn all() -> Vec<&'static Source> {
    vec![&INDEXER, &TOPK, &MLA, &ELEMENTWISE, &MOE, &FP8, &MOE_DECODE, &GQA]
}
