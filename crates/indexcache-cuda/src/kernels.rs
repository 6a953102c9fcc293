//! The CUDA C sources, compiled at run time by NVRTC ([`crate::dev::compile`]).
//!
//! `pdl.cuh` (programmatic dependent launch: every kernel's wait for the kernel before it) is
//! prepended to every source; the shared headers to the modules that use them: `common.cuh`
//! (element types, bf16 <-> f32), `norm.cuh` (reductions, the row RMSNorm: elementwise and
//! moe_decode), `route.cuh` (one token's MoE routing: moe and moe_decode), `combine.cuh` (the
//! sparse-MLA split combine: mla and moe_decode).

use crate::dev::Source;

pub const INDEXER: Source =
    Source { name: "indexer", code: concat!(include_str!("kernels/pdl.cuh"), include_str!("kernels/indexer.cu")) };
pub const TOPK: Source =
    Source { name: "topk", code: concat!(include_str!("kernels/pdl.cuh"), include_str!("kernels/topk.cu")) };
pub const MLA: Source = Source {
    name: "mla",
    code: concat!(include_str!("kernels/pdl.cuh"), include_str!("kernels/combine.cuh"), include_str!("kernels/mla.cu")),
};
pub const ELEMENTWISE: Source = Source {
    name: "elementwise",
    code: concat!(
        include_str!("kernels/pdl.cuh"),
        include_str!("kernels/common.cuh"),
        include_str!("kernels/norm.cuh"),
        include_str!("kernels/elementwise.cu")
    ),
};
pub const MOE: Source = Source {
    name: "moe",
    code: concat!(
        include_str!("kernels/pdl.cuh"),
        include_str!("kernels/common.cuh"),
        include_str!("kernels/route.cuh"),
        include_str!("kernels/moe.cu")
    ),
};
pub const FP8: Source =
    Source { name: "fp8", code: concat!(include_str!("kernels/pdl.cuh"), include_str!("kernels/fp8.cu")) };
pub const MOE_DECODE: Source = Source {
    name: "moe_decode",
    code: concat!(
        include_str!("kernels/pdl.cuh"),
        include_str!("kernels/common.cuh"),
        include_str!("kernels/norm.cuh"),
        include_str!("kernels/route.cuh"),
        include_str!("kernels/combine.cuh"),
        include_str!("kernels/moe_decode.cu")
    ),
};
pub const GQA: Source = Source {
    name: "gqa",
    code: concat!(include_str!("kernels/pdl.cuh"), include_str!("kernels/common.cuh"), include_str!("kernels/gqa.cu")),
};

/// Every kernel source (the compile test in CI walks this list).
pub fn all() -> Vec<&'static Source> {
    vec![&INDEXER, &TOPK, &MLA, &ELEMENTWISE, &MOE, &FP8, &MOE_DECODE, &GQA]
}
