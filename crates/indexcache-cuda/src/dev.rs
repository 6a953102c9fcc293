//! The device context shared by every CUDA op: one context and stream, an NVRTC module cache,
//! counted allocations (current and peak bytes) and checked launches.
//!
//! Kernels are CUDA C sources in `src/kernels/`, compiled at run time by NVRTC for `compute_90a`
//! (the driver JIT-compiles the PTX once per process) and cached per module name. They include no
//! CUDA headers, so NVRTC alone (no toolkit) compiles them: bf16 is handled as `unsigned short`
//! bit patterns and tensor-core instructions as inline PTX.

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
};
use indexcache_ops::{OpError, OpResult};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The virtual architecture every kernel is compiled for (Hopper, with `wgmma`/`setmaxnreg`).
pub const ARCH: &str = "compute_90a";

/// Current and peak bytes allocated through [`Dev::alloc`].
#[derive(Debug, Default)]
pub struct MemCounter {
    current: AtomicU64,
    peak: AtomicU64,
}

impl MemCounter {
    fn add(&self, n: u64) {
        let now = self.current.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, n: u64) {
        self.current.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
    pub fn reset_peak(&self) {
        self.peak.store(self.current(), Ordering::Relaxed);
    }
}

/// A device allocation of `bytes` bytes, freed when dropped: stream-ordered from the device's
/// memory pool, or — while a graph is being recorded — a piece of that recording's arena.
#[derive(Debug)]
pub struct DevBuf {
    ptr: u64,
    len: usize,
    owner: Owner,
    counter: Arc<MemCounter>,
}

#[derive(Debug)]
enum Owner {
    Pool(#[allow(dead_code)] CudaSlice<u8>), // freed (stream-ordered) when dropped
    Arena(Arc<CaptureArena>),
}

impl DevBuf {
    pub fn bytes(&self) -> usize {
        self.len
    }
    /// The raw device address, for kernel arguments.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Pool(_) => self.counter.sub(self.len as u64),
            Owner::Arena(a) => a.release(self.ptr - a.base.ptr, self.len),
        }
    }
}

/// The memory of one graph recording. Allocations made while the stream is captured are carved
/// from this one buffer (allocated before the recording) instead of the stream-ordered pool, so
/// the graph holds kernels only — no memory nodes between them — and the graph owns the arena
/// (see [`Dev::end_capture`]). Reuse follows the recorded order: a piece freed by an earlier op
/// is handed to a later one, which the graph runs after it on the same stream.
#[derive(Debug)]
pub struct CaptureArena {
    base: DevBuf,
    free: Mutex<FreeList>,
}

/// Alignment of arena pieces (as the pool's: enough for every vector load).
const ARENA_ALIGN: usize = 256;

/// First-fit free list over `[0, len)`: pieces `(offset, len)` sorted by offset, neighbours merged,
/// every length a multiple of [`ARENA_ALIGN`].
#[derive(Debug)]
struct FreeList(Vec<(usize, usize)>);

impl FreeList {
    fn new(len: usize) -> Self {
        Self(vec![(0, len / ARENA_ALIGN * ARENA_ALIGN)])
    }

    fn take(&mut self, bytes: usize) -> Option<usize> {
        let want = bytes.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        let i = self.0.iter().position(|&(_, len)| len >= want)?;
        let (off, len) = self.0[i];
        if len == want {
            self.0.remove(i);
        } else {
            self.0[i] = (off + want, len - want);
        }
        Some(off)
    }

    fn release(&mut self, off: usize, bytes: usize) {
        let len = bytes.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        let f = &mut self.0;
        let i = f.partition_point(|&(o, _)| o < off);
        f.insert(i, (off, len));
        if i + 1 < f.len() && f[i].0 + f[i].1 == f[i + 1].0 {
            f[i].1 += f[i + 1].1;
            f.remove(i + 1);
        }
        if i > 0 && f[i - 1].0 + f[i - 1].1 == f[i].0 {
            f[i - 1].1 += f[i].1;
            f.remove(i);
        }
    }
}

impl CaptureArena {
    fn take(&self, bytes: usize) -> Option<u64> {
        self.free.lock().expect("arena").take(bytes).map(|off| self.base.ptr + off as u64)
    }

    fn release(&self, off: u64, bytes: usize) {
        self.free.lock().expect("arena").release(off as usize, bytes);
    }

    pub fn bytes(&self) -> usize {
        self.base.len
    }
}

/// Kernel source files, by module name.
pub struct Source {
    pub name: &'static str,
    pub code: &'static str,
}

pub struct Dev {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub sm_count: u32,
    pub device_name: String,
    pub total_memory: u64,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    mem: Arc<MemCounter>,
    /// The stream is being captured into a graph: host reads and synchronisation are refused.
    capturing: std::sync::atomic::AtomicBool,
    /// The arena allocations come from while capturing.
    arena: Mutex<Option<Arc<CaptureArena>>>,
    /// Launch kernels with programmatic dependent launch (`INDEXCACHE_PDL=0`: plain launches).
    pdl: bool,
}

/// The arguments of one kernel launch, each by reference (read when the launch is enqueued).
pub struct Args<'a> {
    f: &'a CudaFunction,
    params: Vec<*mut std::ffi::c_void>,
    _values: std::marker::PhantomData<&'a ()>,
}

impl<'a> Args<'a> {
    pub fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.params.push(v as *const T as *mut std::ffi::c_void);
        self
    }
}

fn driver_err(op: &'static str, shapes: impl Into<String>, e: impl std::fmt::Debug) -> OpError {
    OpError::new(op, shapes, format!("{e:?}"))
}

/// Is a CUDA driver library loadable on this machine? (Never panics, never touches a GPU.)
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library under its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Is NVRTC loadable (needed to compile kernels)?
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compile one kernel source to PTX for [`ARCH`]. Needs only libnvrtc (no GPU): CI runs this.
pub fn compile(src: &Source) -> Result<cudarc::nvrtc::Ptx, String> {
    if !nvrtc_present() {
        return Err("libnvrtc not found (set LD_LIBRARY_PATH to a CUDA 13 lib/ directory)".into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(ARCH),
        options: vec!["--std=c++17".into(), "-default-device".into()],
        name: Some(format!("{}.cu", src.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src.code, opts).map_err(|e| format!("{}.cu: {e}", src.name))
}

/// Stream-ordered allocations come from the device's default memory pool, which by default hands
/// unused memory back to the driver at every synchronisation; a prefill that frees and re-takes a
/// multi-GiB indexer workspace per layer would then re-map it each time. Keep freed memory in the
/// pool instead (the caching-allocator behaviour of PyTorch and vLLM); it is reused by later
/// allocations and returned when the process exits.
fn keep_pool_memory(ctx: &CudaContext) -> OpResult<()> {
    use cudarc::driver::sys;
    ctx.bind_to_thread().map_err(|e| driver_err("cuda init", "bind context", e))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls on a valid device; `pool` and `threshold` outlive them.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| driver_err("cuda init", "default memory pool", e))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| driver_err("cuda init", "memory pool release threshold", e))?;
    }
    Ok(())
}

/// GPU 0, or `None` with a "skipped: no GPU (why)" line on stderr — for tests and benchmarks that
/// run wherever a GPU is present and skip themselves elsewhere.
pub fn gpu_or_skip() -> Option<Dev> {
    match Dev::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no GPU ({e})");
            None
        }
    }
}

impl Dev {
    /// Open GPU `ordinal`. Fails cleanly (no panic) where no driver or GPU exists.
    pub fn open(ordinal: usize) -> OpResult<Self> {
        if !driver_present() {
            return Err(OpError::new("cuda init", "", "no CUDA driver (libcuda.so) on this machine"));
        }
        let n = CudaContext::device_count().map_err(|e| driver_err("cuda init", "", e))?;
        if ordinal as i32 >= n {
            return Err(OpError::new("cuda init", format!("device {ordinal}"), format!("{n} CUDA device(s) present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("cuda init", format!("device {ordinal}"), e))?;
        // One stream: ordering is program order, no per-buffer events needed.
        // SAFETY: every buffer is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default stream: only a created stream can be
        // captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(|e| driver_err("cuda init", "stream", e))?;
        keep_pool_memory(&ctx)?;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_err("cuda init", "", e))? as u32;
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let total_memory = ctx.total_mem().map_err(|e| driver_err("cuda init", "", e))? as u64;
        Ok(Self {
            ctx,
            stream,
            sm_count,
            device_name,
            total_memory,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            mem: Arc::new(MemCounter::default()),
            capturing: std::sync::atomic::AtomicBool::new(false),
            arena: Mutex::new(None),
            pdl: std::env::var("INDEXCACHE_PDL").map_or(true, |v| v != "0"),
        })
    }

    pub fn mem(&self) -> &MemCounter {
        &self.mem
    }

    /// `bytes` of uninitialised device memory (from the recording's arena while capturing). Out of
    /// memory names the op and what was asked.
    pub fn alloc(&self, op: &'static str, bytes: usize) -> OpResult<DevBuf> {
        let bytes = bytes.max(1);
        if self.capturing() {
            let arena = self.arena.lock().expect("arena").clone();
            if let Some(a) = arena {
                let ptr = a.take(bytes).ok_or_else(|| {
                    OpError::new(
                        op,
                        format!("{bytes} bytes"),
                        format!("the graph recording's arena ({:.0} MiB) is full", a.bytes() as f64 / MIB),
                    )
                })?;
                return Ok(DevBuf { ptr, len: bytes, owner: Owner::Arena(a), counter: self.mem.clone() });
            }
        }
        // SAFETY: the memory is written before it is read by every op that allocates it.
        let slice = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            OpError::new(
                op,
                format!("{bytes} bytes"),
                format!(
                    "device allocation failed ({e:?}); {:.2} GiB free of {:.2} GiB, {:.2} GiB held by this engine",
                    free as f64 / GIB,
                    total as f64 / GIB,
                    self.mem.current() as f64 / GIB
                ),
            )
        })?;
        self.mem.add(bytes as u64);
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        Ok(DevBuf { ptr, len: bytes, owner: Owner::Pool(slice), counter: self.mem.clone() })
    }

    pub fn alloc_zeroed(&self, op: &'static str, bytes: usize) -> OpResult<DevBuf> {
        let b = self.alloc(op, bytes)?;
        self.ctx.bind_to_thread().map_err(|e| driver_err(op, "bind context", e))?;
        // SAFETY: `b` is a live allocation of `b.bytes()` bytes, used on this stream only.
        unsafe { cudarc::driver::result::memset_d8_async(b.ptr(), 0, b.bytes(), self.stream.cu_stream()) }
            .map_err(|e| driver_err(op, format!("{bytes} bytes"), e))?;
        Ok(b)
    }

    /// Copy host values to a new device buffer.
    pub fn upload<T: Copy>(&self, op: &'static str, data: &[T]) -> OpResult<DevBuf> {
        let mut b = self.alloc(op, std::mem::size_of_val(data))?;
        self.write(op, &mut b, data)?;
        Ok(b)
    }

    /// Overwrite the start of `buf` with host values (stream-ordered; `buf` keeps its address).
    pub fn write<T: Copy>(&self, op: &'static str, buf: &mut DevBuf, data: &[T]) -> OpResult<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes > buf.bytes() {
            return Err(OpError::new(op, format!("{bytes} bytes"), format!("buffer holds {} bytes", buf.bytes())));
        }
        // SAFETY: plain-old-data reinterpretation of an initialised slice.
        let raw = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes) };
        if bytes > 0 {
            self.ctx.bind_to_thread().map_err(|e| driver_err(op, "bind context", e))?;
            // SAFETY: `buf` holds at least `bytes` bytes; a copy from pageable host memory has
            // read `raw` before the call returns.
            unsafe { cudarc::driver::result::memcpy_htod_async(buf.ptr(), raw, self.stream.cu_stream()) }
                .map_err(|e| driver_err(op, format!("{bytes} bytes to device"), e))?;
        }
        Ok(())
    }

    /// Start capturing this device's stream into a graph (relaxed mode: host-side queries such as
    /// free memory stay legal; nothing may synchronise or read back until [`Self::end_capture`]).
    /// Allocations until then come from an arena of `arena_bytes` allocated here.
    pub fn begin_capture(&self, arena_bytes: usize) -> OpResult<()> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        let base = self.alloc("graph capture", arena_bytes)?;
        let free = Mutex::new(FreeList::new(base.bytes()));
        *self.arena.lock().expect("arena") = Some(Arc::new(CaptureArena { base, free }));
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| driver_err("graph capture", "begin", e))?;
        self.capturing.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Is the stream being captured?
    pub fn capturing(&self) -> bool {
        self.capturing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// End the capture and instantiate the graph; the arena its kernels use comes with it (keep
    /// it as long as the graph).
    pub fn end_capture(&self) -> OpResult<(cudarc::driver::CudaGraph, Arc<CaptureArena>)> {
        use cudarc::driver::sys::CUgraphInstantiate_flags;
        self.capturing.store(false, std::sync::atomic::Ordering::Relaxed);
        let arena = self.arena.lock().expect("arena").take();
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| driver_err("graph capture", "end", e))?
            .ok_or_else(|| OpError::new("graph capture", "end", "the capture recorded nothing"))?;
        let arena = arena.ok_or_else(|| OpError::new("graph capture", "end", "no capture arena"))?;
        Ok((graph, arena))
    }

    /// Copy `n` values of type `T` from the start of `buf` to the host (synchronises).
    pub fn download<T: Copy + Default>(&self, op: &'static str, buf: &DevBuf, n: usize) -> OpResult<Vec<T>> {
        let bytes = n * std::mem::size_of::<T>();
        if bytes > buf.bytes() {
            return Err(OpError::new(op, format!("{n} values"), format!("buffer holds {} bytes", buf.bytes())));
        }
        if self.capturing() {
            return Err(OpError::new(op, format!("{n} values"), "cannot read back while a graph is being recorded"));
        }
        let mut out = vec![T::default(); n];
        // SAFETY: `out` is initialised and exactly `bytes` long.
        let raw = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, bytes) };
        if bytes > 0 {
            self.ctx.bind_to_thread().map_err(|e| driver_err(op, "bind context", e))?;
            // SAFETY: `buf` holds at least `bytes` bytes; `raw` outlives the copy (synchronised below).
            unsafe { cudarc::driver::result::memcpy_dtoh_async(raw, buf.ptr(), self.stream.cu_stream()) }
                .map_err(|e| driver_err(op, format!("{bytes} bytes to host"), e))?;
        }
        self.sync(op)?;
        Ok(out)
    }

    /// Device-to-device copy of `bytes` bytes between raw addresses (async).
    pub fn copy_raw(&self, op: &'static str, dst: u64, src: u64, bytes: usize) -> OpResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| driver_err(op, "bind context", e))?;
        // SAFETY: callers pass addresses of live buffers with at least `bytes` bytes.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_err(op, format!("{bytes} bytes device to device"), e))
    }

    pub fn sync(&self, op: &'static str) -> OpResult<()> {
        if self.capturing() {
            return Err(OpError::new(
                op,
                "synchronize",
                "the stream is being recorded into a graph; ops that read results back cannot be recorded",
            ));
        }
        self.stream.synchronize().map_err(|e| driver_err(op, "synchronize", e))
    }

    /// The function `func` of kernel source `src`, compiling and loading the module on first use.
    pub fn function(&self, src: &Source, func: &'static str) -> OpResult<CudaFunction> {
        if let Some(f) = self.functions.lock().expect("function cache").get(&(src.name, func)) {
            return Ok(f.clone());
        }
        let module = {
            let mut mods = self.modules.lock().expect("module cache");
            match mods.get(src.name) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile(src).map_err(|e| OpError::new("nvrtc", src.name, e))?;
                    let m = self.ctx.load_module(ptx).map_err(|e| driver_err("load module", src.name, e))?;
                    mods.insert(src.name, m.clone());
                    m
                }
            }
        };
        let f =
            module.load_function(func).map_err(|e| driver_err("load function", format!("{}::{func}", src.name), e))?;
        self.functions.lock().expect("function cache").insert((src.name, func), f.clone());
        Ok(f)
    }

    /// Allow `func` more than 48 KiB of dynamic shared memory.
    pub fn set_max_smem(&self, f: &CudaFunction, bytes: u32) -> OpResult<()> {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| driver_err("set smem", format!("{bytes} bytes"), e))
    }

    pub fn builder<'a>(&'a self, f: &'a CudaFunction) -> Args<'a> {
        Args { f, params: Vec::new(), _values: std::marker::PhantomData }
    }

    /// Launch a kernel and check the launch; `op`/`shapes` name it in errors. With PDL on, the
    /// launch is a programmatic dependent launch: the kernel may start while the one before it
    /// finishes; every kernel waits for its predecessor at entry (`PDL_ENTRY`), so only the
    /// launch overlaps.
    pub fn launch(
        &self,
        args: Args<'_>,
        cfg: LaunchConfig,
        op: &'static str,
        shapes: impl FnOnce() -> String,
    ) -> OpResult<()> {
        self.launch_ex(args, cfg, None, op, shapes)
    }

    /// [`Dev::launch`] of a grid in thread-block clusters of `cluster` CTAs (each grid dimension a
    /// multiple of the cluster's; at most 8 CTAs, the portable size): the CTAs of a cluster run at
    /// the same time and may read each other's shared memory.
    pub fn launch_cluster(
        &self,
        args: Args<'_>,
        cfg: LaunchConfig,
        cluster: (u32, u32, u32),
        op: &'static str,
        shapes: impl FnOnce() -> String,
    ) -> OpResult<()> {
        self.launch_ex(args, cfg, Some(cluster), op, shapes)
    }

    fn launch_ex(
        &self,
        mut args: Args<'_>,
        cfg: LaunchConfig,
        cluster: Option<(u32, u32, u32)>,
        op: &'static str,
        shapes: impl FnOnce() -> String,
    ) -> OpResult<()> {
        use cudarc::driver::sys;
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 || cfg.grid_dim.2 == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| driver_err(op, "bind context", e))?;
        let mut attrs: Vec<sys::CUlaunchAttribute> = Vec::with_capacity(2);
        if self.pdl {
            // SAFETY: a plain-old-data union; the field written is the one the attribute id names.
            let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
            value.programmaticStreamSerializationAllowed = 1;
            attrs.push(sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value,
            });
        }
        if let Some((x, y, z)) = cluster {
            let fits = x >= 1 && y >= 1 && z >= 1 && x * y * z <= 8;
            let divides = cfg.grid_dim.0.is_multiple_of(x)
                && cfg.grid_dim.1.is_multiple_of(y)
                && cfg.grid_dim.2.is_multiple_of(z);
            if !fits || !divides {
                return Err(OpError::new(
                    op,
                    shapes(),
                    format!("cluster {x}×{y}×{z} does not tile the grid {:?}", cfg.grid_dim),
                ));
            }
            // SAFETY: as above.
            let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
            value.clusterDim.x = x;
            value.clusterDim.y = y;
            value.clusterDim.z = z;
            attrs.push(sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
                pad: [0; 4],
                value,
            });
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if attrs.is_empty() { std::ptr::null_mut() } else { attrs.as_mut_ptr() },
            numAttrs: attrs.len() as u32,
        };
        // SAFETY: each op passes arguments matching its kernel's signature; they and `attrs`
        // outlive this call, which copies them.
        unsafe { sys::cuLaunchKernelEx(&config, args.f.cu_function(), args.params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| driver_err(op, shapes(), e))
    }
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// `ceil(a / b)` as u32, for grid sizes.
pub fn blocks(a: usize, b: usize) -> u32 {
    a.div_ceil(b) as u32
}

#[cfg(test)]
mod tests {
    use super::{ARENA_ALIGN, FreeList};

    #[test]
    fn free_list_reuses_and_merges() {
        let a = ARENA_ALIGN;
        let mut f = FreeList::new(4 * a + 17);
        assert_eq!(f.0, vec![(0, 4 * a)]);
        let x = f.take(1).unwrap();
        let y = f.take(a + 1).unwrap();
        let z = f.take(a).unwrap();
        assert_eq!((x, y, z), (0, a, 3 * a));
        assert_eq!(f.take(a + 1), None, "only one piece left");
        f.release(y, a + 1);
        assert_eq!(f.take(2 * a), Some(a), "a freed piece is reused");
        f.release(x, 1);
        f.release(a, 2 * a);
        f.release(z, a);
        assert_eq!(f.0, vec![(0, 4 * a)], "everything merged back");
    }
}
