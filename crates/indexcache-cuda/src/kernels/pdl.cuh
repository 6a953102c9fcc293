// Prepended to every kernel source (kernels.rs).
//
// Programmatic dependent launch (dev.rs `launch`): a kernel waits for the kernel before it in the
// stream to complete and its writes to be visible (a no-op when launched without the attribute),
// then lets the next kernel start launching. Kernels call `PDL_ENTRY()` before touching memory, or
// `pdl_wait()` after loads of data no kernel writes (weights): results are those of plain stream
// order; what overlaps is the next kernel's launch and such loads.
__device__ __forceinline__ void pdl_wait() {
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::);
}
#define PDL_ENTRY() pdl_wait()
