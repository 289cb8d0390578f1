// CPU emulation of the CUDA execution model, for running the CUDA kernels of csrc/cuda/ without a GPU.
//
// tests/cuda_emulation/build.py copies csrc/cuda/* into a build directory with a few mechanical rewrites
// (`k<<<cfg>>>(args)` -> `emu::launch<&k>(emu::LaunchConfig(cfg), args)`, `__shared__` declarations ->
// emulator buffers, pointer reinterpret_casts -> alignment-checked casts, `__launch_bounds__(B)` -> a
// per-thread check), includes this header first, and compiles everything with the host compiler. The kernel
// bodies, the launchers' grid / block / vector-width choices and the torch bindings run unmodified
// otherwise.
//
// WHAT IS EMULATED
//   * Threads and blocks. Blocks run one after another; the threads of a block are fibers (ucontext, one
//     stack each, all on the calling OS thread) scheduled cooperatively: every runnable thread runs until it
//     reaches __syncthreads() or exits; when all threads wait at the barrier it opens. threadIdx,
//     blockIdx, blockDim and gridDim behave as in CUDA. Scheduling is deterministic; the order in which the
//     threads of a block run between two barriers is forward (0, 1, ...), reverse, or alternating per block
//     (set_schedule), so a missing barrier shows up as a read of poisoned or stale shared memory in at
//     least one order, and deterministic kernels must give bitwise identical results in every order.
//   * __syncthreads() semantics, including misuse: a barrier that some threads of the block never reach
//     (they exited, e.g. an early `return` before a __syncthreads) is reported as a launch error, not a hang.
//   * Shared memory. Dynamic (`extern __shared__`) and static (`__shared__ T a[...]`) shared memory are
//     per-launch buffers, poisoned with 0xFF bytes (NaN for float and double) at the start of every block,
//     so reading a slot no thread of this block wrote gives NaN (as does reading past the requested size).
//     Every byte around the buffers (4 KiB before, everything up to 48 KiB + 4 KiB after) is checked after
//     each block: a write outside the buffers is reported (under ASan, at the faulting access).
//   * Launch configuration checks, reported through cudaGetLastError() exactly where CUDA reports them:
//     block dims (x, y <= 1024, z <= 64, x*y*z <= 1024, all >= 1), grid dims (x < 2^31, y, z <= 65535, all
//     >= 1), dynamic + static shared memory <= 48 KiB (the default limit without cudaFuncSetAttribute),
//     threads per block <= the kernel's __launch_bounds__ maximum.
//   * Misaligned accesses through reinterpret_cast'ed pointers (vector loads/stores: CUDA faults with
//     "misaligned address"): checked against alignof of the target type, reported as
//     cudaErrorMisalignedAddress by the cudaGetLastError() after the launch. (On a GPU such execution
//     errors surface asynchronously and kill the context; here they are reported at once.) A fault ends the
//     kernel: the faulting thread stops at once and no further thread or block runs.
//   * The runtime calls the sources make: cudaGetLastError, cudaPeekAtLastError, cudaGetErrorString,
//     cudaGetErrorName, cudaGetDevice and cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount), with a
//     settable SM count (set_sm_count: each distinct SM count is a distinct emulated device, so per-device
//     caches in the launcher stay correct). Streams are accepted and ignored (launches are synchronous).
//   * Device arithmetic is the host's: __half / __nv_bfloat16 intrinsics come from the CUDA headers' host
//     implementations (round-to-nearest-even, as on the GPU); the build disables FMA contraction, so results
//     match the C++ CPU twin (same formulas from csrc/common/bn_math.h) bitwise. nvcc contracts a*b+c into
//     FMAs on the GPU, so GPU results may differ from these in the last bit.
//
// WHAT IS NOT EMULATED (a kernel relying on these compiles but is not faithfully checked, or fails to build)
//   * Warps: no lockstep execution, no warp-level primitives (__shfl*_sync, __ballot_sync, __syncwarp,
//     warpSize, cooperative groups). They are undeclared in host compilation, and build.py rejects sources
//     that use them with a clear message; extend this file before using them in the kernels.
//   * Atomics, __threadfence, memory fences, clocks, inline PTX (rejected by build.py likewise).
//   * The memory model and data races: threads of a block run one at a time between barriers, so races are
//     not detected beyond barrier semantics (plus the schedule-order variation above). Global-memory races
//     between blocks are invisible (blocks run sequentially). Out-of-bounds global accesses are not detected
//     unless the extension is built with ASan (FUSED_RESNET_EMU_ASAN=1, see build.py); without it an
//     out-of-bounds write may silently corrupt the process (typically a crash rather than a test failure).
//   * Resources: registers, occupancy and __launch_bounds__' minimum-blocks-per-SM argument, the real
//     per-device shared-memory opt-in limits, performance, concurrency between streams.
//   * Kernel faults are not sticky (the next launch runs normally).
//
// Single-threaded: launches are serialised by a mutex; kernels must not launch kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FR_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FR_EMU_ASAN 1
#endif
#endif
#ifdef FR_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The CUDA qualifiers: no-ops on the host. __shared__ must never survive the source rewrite (an unconverted
// __shared__ variable would silently become per-thread), so it expands to an undeclared name.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __constant__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ fr_emu_error_unconverted_shared_declaration_see_build_py
#define __constant__ fr_emu_error_constant_memory_is_not_emulated
#define __align__(n) alignas(n)

namespace emu {

// ---------------------------------------------------------------------------------------------------------
// Limits (those of every current NVIDIA GPU).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimXY = 1024;
constexpr unsigned kMaxBlockDimZ = 64;
constexpr unsigned long long kMaxGridDimX = 2147483647ull;
constexpr unsigned kMaxGridDimYZ = 65535;
constexpr size_t kSharedMemPerBlock = 48 * 1024;  // default limit (no cudaFuncSetAttribute opt-in)
constexpr size_t kSmemGuardBytes = 4096;          // poisoned zones around shared buffers, checked per block
constexpr int kMaxDevices = 64;
#ifdef FR_EMU_ASAN
constexpr size_t kFiberStackBytes = 1 << 20;
#else
constexpr size_t kFiberStackBytes = 256 << 10;
#endif

enum class Schedule { kForward, kReverse, kAlternate };

struct LaunchRecord {
  std::string kernel;  // e.g. "fused_resnet::cuda_bn::bn_act_kernel<float, float, 4>"
  dim3 grid, block;
  size_t smem;
  cudaError_t error;    // cudaSuccess, or what the cudaGetLastError() after the launch returns
  std::string message;  // details of the error
};

// ---------------------------------------------------------------------------------------------------------
// Global state. `inline` variables: one instance shared by every translation unit of the extension.

struct Fiber {
  enum class State : unsigned char { kRunnable, kAtBarrier, kExited };
  ucontext_t ctx;
  char* stack = nullptr;  // usable stack (a PROT_NONE guard page lies below it)
  uint3 thread_idx;
  State state = State::kExited;
#ifdef FR_EMU_ASAN
  void* asan_fake_stack = nullptr;
#endif
};

struct SharedAlloc {
  const void* tag;  // identifies one static __shared__ declaration
  size_t offset, bytes;
};

struct State {
  std::mutex launch_mutex;
  // Devices: distinct SM counts; the current device's index is what cudaGetDevice returns.
  std::vector<int> device_sms{4};
  int current_device = 0;
  Schedule schedule = Schedule::kAlternate;
  unsigned long long blocks_run = 0;  // drives the alternating schedule
  // Errors.
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  std::vector<LaunchRecord> log;
  // The launch being executed.
  cudaError_t fault = cudaSuccess;  // first execution fault of the current launch
  std::string fault_message;
  size_t dyn_smem_bytes = 0;
  // Dynamic shared memory: guard | 48 KiB | guard. The bytes past the requested size are guard too.
  std::vector<unsigned char> dyn_smem_storage =
      std::vector<unsigned char>(kSmemGuardBytes + kSharedMemPerBlock + kSmemGuardBytes + 256);
  // Static __shared__ arena: guard | array | guard | array | guard ... (every gap is checked).
  std::vector<unsigned char> static_smem_storage =
      std::vector<unsigned char>(kSharedMemPerBlock + 17 * kSmemGuardBytes);
  std::vector<SharedAlloc> static_allocs;
  size_t static_smem_used = 0;     // bytes of the arena in use (incl. guards)
  size_t static_smem_payload = 0;  // bytes requested by the kernel (counted against the 48 KiB)
  // Fibers and scheduler.
  std::vector<Fiber*> fibers;
  ucontext_t scheduler_ctx;
#ifdef FR_EMU_ASAN
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
  void (*invoke)(void*) = nullptr;  // runs the kernel for the current thread
  void* invoke_arg = nullptr;
};

inline State& state() {
  static State* s = new State();  // never destroyed: no teardown ordering issues at exit
  return *s;
}

// Read by the kernels through the threadIdx / blockIdx / blockDim / gridDim macros.
inline Fiber* g_current = nullptr;
inline uint3 g_block_idx{0, 0, 0};
inline dim3 g_block_dim, g_grid_dim;
// Dynamic shared memory of the running launch (the rewritten `extern __shared__` arrays refer to it).
inline unsigned char* g_dyn_smem = nullptr;

// ---------------------------------------------------------------------------------------------------------
// Faults during a launch: the first one is kept and returned by the cudaGetLastError() after the launch.
// Like a GPU fault, it ends the kernel: a fault raised by a thread (a fiber) terminates that thread at once,
// and the scheduler then abandons the block and the remaining blocks.

void kill_current_thread();

inline void fault(cudaError_t err, const std::string& message) {
  State& s = state();
  if (s.fault == cudaSuccess) {
    s.fault = err;
    s.fault_message = message;
  }
  if (g_current != nullptr) kill_current_thread();
}

inline std::string thread_str() {
  char buf[96];
  const uint3 t = g_current ? g_current->thread_idx : uint3{0, 0, 0};
  std::snprintf(buf, sizeof buf, "block (%u, %u, %u), thread (%u, %u, %u)", g_block_idx.x, g_block_idx.y,
                g_block_idx.z, t.x, t.y, t.z);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------
// Alignment-checked pointer casts (the rewrite of reinterpret_cast<P>(e) for pointer types P).

template <typename P, typename Q>
inline P checked_cast(Q* p) {
  using T = std::remove_cv_t<std::remove_pointer_t<P>>;
  constexpr size_t align = alignof(std::conditional_t<std::is_void_v<T>, char, T>);
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%p", static_cast<const void*>(p));
    fault(cudaErrorMisalignedAddress, std::string("misaligned address: ") + buf + " cast to a pointer to a " +
                                          std::to_string(align) + "-byte aligned type at " + thread_str());
  }
  return reinterpret_cast<P>(p);
}

// `*reinterpret_cast<T*>(p)` used as a value or assigned to: checks alignment, then moves the bytes with
// memcpy, so that a misaligned access is reported instead of crashing the host (aligned SSE moves).
template <typename T>
struct AlignedRef {
  using V = std::remove_cv_t<T>;
  T* p;
  operator V() const {
    V v;
    std::memcpy(&v, static_cast<const void*>(p), sizeof(V));
    return v;
  }
  const AlignedRef& operator=(const V& v) const {
    static_assert(!std::is_const_v<T>, "store through a pointer to const");
    std::memcpy(static_cast<void*>(p), &v, sizeof(V));
    return *this;
  }
};

template <typename T, typename Q>
inline AlignedRef<T> aligned_ref(Q* p) {
  return AlignedRef<T>{checked_cast<T*>(p)};
}

// ---------------------------------------------------------------------------------------------------------
// Shared memory.

inline void asan_poison(const void* p, size_t n, bool on) {
#ifdef FR_EMU_ASAN
  if (on) __asan_poison_memory_region(p, n);
  else __asan_unpoison_memory_region(p, n);
#else
  (void)p, (void)n, (void)on;
#endif
}

inline void poison(void* p, size_t n) { std::memset(p, 0xFF, n); }

// Whether p[0, n) still holds the poison pattern (nobody wrote there).
inline bool intact(const unsigned char* p, size_t n) {
  static const std::vector<unsigned char> ff(kSmemGuardBytes, 0xFF);
  for (size_t i = 0; i < n; i += kSmemGuardBytes)
    if (std::memcmp(p + i, ff.data(), n - i < kSmemGuardBytes ? n - i : kSmemGuardBytes) != 0) return false;
  return true;
}

// A static `__shared__ T name[...]` declaration: one buffer per launch in the arena, allocated when a thread
// of the first block reaches the declaration (the whole arena is poisoned at the start of every block).
template <typename T>
inline T* static_shared(const void* tag) {
  State& s = state();
  for (const SharedAlloc& a : s.static_allocs)
    if (a.tag == tag) return reinterpret_cast<T*>(s.static_smem_storage.data() + a.offset);
  constexpr size_t align = alignof(T) < 16 ? 16 : alignof(T);
  const size_t start = s.static_smem_used == 0 ? kSmemGuardBytes : s.static_smem_used;  // leading guard
  const size_t offset = (start + align - 1) / align * align;
  const size_t end = offset + sizeof(T) + kSmemGuardBytes;
  if (end > s.static_smem_storage.size() ||
      s.static_smem_payload + sizeof(T) + s.dyn_smem_bytes > kSharedMemPerBlock) {
    fault(cudaErrorLaunchOutOfResources,
          "too much shared memory: static " + std::to_string(s.static_smem_payload + sizeof(T)) + " + dynamic " +
              std::to_string(s.dyn_smem_bytes) + " bytes > " + std::to_string(kSharedMemPerBlock));
    // fault() ends a kernel thread; outside one (not the case for rewritten sources), keep going on a scratch
    // buffer: the launch reports the error anyway.
    static thread_local std::vector<unsigned char> scratch;
    scratch.assign(sizeof(T) + align, 0xFF);
    return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(scratch.data() + align - 1) / align * align);
  }
  asan_poison(s.static_smem_storage.data() + offset, sizeof(T), false);
  s.static_allocs.push_back({tag, offset, sizeof(T)});
  s.static_smem_used = end;
  s.static_smem_payload += sizeof(T);
  return reinterpret_cast<T*>(s.static_smem_storage.data() + offset);
}

// `__shared__ T name[d1][d2]...;` as a reference to the launch's buffer (build.py emits this expansion).
#define FR_EMU_STATIC_SHARED(T, name, dims)   \
  static const char fr_emu_tag_##name = 0;    \
  T(&name) dims = *::emu::static_shared<T dims>(&fr_emu_tag_##name)

// ---------------------------------------------------------------------------------------------------------
// Fibers.

inline void asan_start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#ifdef FR_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

inline void asan_finish_switch(void* fake_stack, const void** bottom_old, size_t* size_old) {
#ifdef FR_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, bottom_old, size_old);
#else
  (void)fake_stack, (void)bottom_old, (void)size_old;
#endif
}

// Fiber side: back to the scheduler (exiting: the fiber is never resumed).
inline void yield_to_scheduler(bool exiting) {
  State& s = state();
  Fiber* f = g_current;
#ifdef FR_EMU_ASAN
  asan_start_switch(exiting ? nullptr : &f->asan_fake_stack, s.main_stack_bottom, s.main_stack_size);
#else
  (void)exiting;
#endif
  swapcontext(&f->ctx, &s.scheduler_ctx);
#ifdef FR_EMU_ASAN
  asan_finish_switch(f->asan_fake_stack, &s.main_stack_bottom, &s.main_stack_size);
#endif
}

inline void fiber_main() {
  State& s = state();
#ifdef FR_EMU_ASAN
  asan_finish_switch(nullptr, &s.main_stack_bottom, &s.main_stack_size);
#endif
  s.invoke(s.invoke_arg);
  g_current->state = Fiber::State::kExited;
  yield_to_scheduler(true);
  std::abort();  // an exited fiber is never resumed
}

inline Fiber* new_fiber() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mem = mmap(nullptr, kFiberStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (mem == MAP_FAILED) {
    std::fprintf(stderr, "emu: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(mem, page, PROT_NONE);  // stack overflow -> SIGSEGV instead of silent corruption
  Fiber* f = new Fiber();
  f->stack = static_cast<char*>(mem) + page;
  getcontext(&f->ctx);
  return f;
}

// Ends the current thread now (after a fault): it is never resumed; the scheduler abandons the block.
inline void kill_current_thread() {
  g_current->state = Fiber::State::kExited;
  yield_to_scheduler(true);
  std::abort();
}

// __syncthreads(): wait until every thread of the block has arrived.
inline void syncthreads() {
  g_current->state = Fiber::State::kAtBarrier;
  yield_to_scheduler(false);
}

// Runs one block: all nt threads from the start of the kernel to their exit.
inline void run_block(unsigned nt, const dim3& block, bool reverse) {
  State& s = state();
  while (s.fibers.size() < nt) s.fibers.push_back(new_fiber());
  for (unsigned t = 0; t < nt; ++t) {
    Fiber* f = s.fibers[t];
    f->thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f->state = Fiber::State::kRunnable;
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = kFiberStackBytes;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, fiber_main, 0);
  }
  for (unsigned barrier = 0;; ++barrier) {
    for (unsigned k = 0; k < nt; ++k) {
      Fiber* f = s.fibers[reverse ? nt - 1 - k : k];
      if (f->state != Fiber::State::kRunnable) continue;
      g_current = f;
      void* fake = nullptr;
      asan_start_switch(&fake, f->stack, kFiberStackBytes);
      swapcontext(&s.scheduler_ctx, &f->ctx);
      asan_finish_switch(fake, nullptr, nullptr);
      if (s.fault != cudaSuccess) {  // a thread faulted: the kernel ends here
        g_current = nullptr;
        return;
      }
    }
    g_current = nullptr;
    unsigned waiting = 0, exited = 0;
    for (unsigned t = 0; t < nt; ++t) (s.fibers[t]->state == Fiber::State::kAtBarrier ? waiting : exited) += 1;
    if (waiting == 0) return;
    if (exited != 0) {
      // CUDA: undefined behaviour (hang or corruption). The waiting fibers are abandoned mid-kernel (their
      // stacks are reused by the next block; kernels hold no resources).
      fault(cudaErrorIllegalInstruction,
            "__syncthreads() #" + std::to_string(barrier + 1) + " of block (" + std::to_string(g_block_idx.x) +
                ", " + std::to_string(g_block_idx.y) + ", " + std::to_string(g_block_idx.z) + ") reached by " +
                std::to_string(waiting) + " threads while " + std::to_string(exited) +
                " threads of the block had exited (divergent barrier)");
      return;
    }
    for (unsigned t = 0; t < nt; ++t) s.fibers[t]->state = Fiber::State::kRunnable;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launches.

// `k<<<grid, block[, smem[, stream]]>>>(args)` becomes `emu::launch<&k>(emu::LaunchConfig(grid, block, ...),
// args)`.
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t sm = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(sm), stream(st) {}
};

// Rewrite of `__launch_bounds__(max_threads[, min_blocks])` (build.py): the first statement of the kernel.
inline void check_launch_bounds(long long max_threads) {
  const long long n = static_cast<long long>(g_block_dim.x) * g_block_dim.y * g_block_dim.z;
  if (n > max_threads)
    fault(cudaErrorInvalidConfiguration, "blockDim has " + std::to_string(n) +
                                             " threads, more than the kernel's __launch_bounds__ maximum " +
                                             std::to_string(max_threads));
}

// "fused_resnet::cuda_bn::bn_act_kernel<float, float, 4>" from a __PRETTY_FUNCTION__ of launch<K>.
inline std::string kernel_name_from_signature(const char* sig) {
  std::string s(sig);
  size_t pos = s.find("K = ");
  if (pos == std::string::npos) return s;
  pos += 4;
  if (pos < s.size() && s[pos] == '&') ++pos;
  int depth = 0;
  size_t end = pos;
  for (; end < s.size(); ++end) {
    const char c = s[end];
    if (c == '<' || c == '(' || c == '[') ++depth;
    if (c == '>' || c == ')' || c == ']') {
      if (depth == 0) break;
      --depth;
    }
    if ((c == ';' || c == ',') && depth == 0) break;
  }
  return s.substr(pos, end - pos);
}

inline std::string dim3_str(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

inline std::string check_config(const LaunchConfig& c, cudaError_t* err) {
  const dim3 g = c.grid, b = c.block;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > kMaxBlockDimXY || b.y > kMaxBlockDimXY || b.z > kMaxBlockDimZ ||
      threads > kMaxThreadsPerBlock) {
    *err = cudaErrorInvalidConfiguration;
    return "invalid block " + dim3_str(b);
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > kMaxGridDimX || g.y > kMaxGridDimYZ || g.z > kMaxGridDimYZ) {
    *err = cudaErrorInvalidConfiguration;
    return "invalid grid " + dim3_str(g);
  }
  if (c.smem > kSharedMemPerBlock) {
    *err = cudaErrorInvalidValue;
    return "dynamic shared memory " + std::to_string(c.smem) + " bytes > " + std::to_string(kSharedMemPerBlock);
  }
  *err = cudaSuccess;
  return "";
}

template <auto K, typename Tuple>
void invoke_kernel(void* params) {
  std::apply(K, *static_cast<Tuple*>(params));  // by value: every thread gets its own copy of the arguments
}

template <typename... P>
std::tuple<P...> param_tuple_of(void (*)(P...));

template <auto K, typename... Args>
void launch(const LaunchConfig& cfg, Args&&... args) {
  using Params = decltype(param_tuple_of(K));
  static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  LaunchRecord rec{name, cfg.grid, cfg.block, cfg.smem, cudaSuccess, ""};
  cudaError_t err;
  rec.message = check_config(cfg, &err);
  if (err == cudaSuccess) {
    Params params(std::forward<Args>(args)...);  // converted to the kernel's parameter types, as CUDA does
    s.fault = cudaSuccess;
    s.fault_message.clear();
    s.dyn_smem_bytes = cfg.smem;
    unsigned char* const dyn_zone = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<uintptr_t>(s.dyn_smem_storage.data()) + 255) / 256 * 256);
    const size_t dyn_zone_bytes = kSmemGuardBytes + kSharedMemPerBlock + kSmemGuardBytes;
    g_dyn_smem = dyn_zone + kSmemGuardBytes;
    unsigned char* const arena = s.static_smem_storage.data();
    const size_t arena_bytes = s.static_smem_storage.size();
    s.static_allocs.clear();
    s.static_smem_used = 0;
    s.static_smem_payload = 0;
    s.invoke = &invoke_kernel<K, Params>;
    s.invoke_arg = &params;
    g_block_dim = cfg.block;
    g_grid_dim = cfg.grid;
    const unsigned nt = cfg.block.x * cfg.block.y * cfg.block.z;
    for (unsigned bz = 0; bz < cfg.grid.z && s.fault == cudaSuccess; ++bz)
      for (unsigned by = 0; by < cfg.grid.y && s.fault == cudaSuccess; ++by)
        for (unsigned bx = 0; bx < cfg.grid.x && s.fault == cudaSuccess; ++bx) {
          g_block_idx = uint3{bx, by, bz};
          // Poison all shared memory; under ASan, also make everything but the live arrays unaddressable.
          asan_poison(dyn_zone, dyn_zone_bytes, false);
          asan_poison(arena, arena_bytes, false);
          poison(dyn_zone, dyn_zone_bytes);
          poison(arena, arena_bytes);
          asan_poison(dyn_zone, kSmemGuardBytes, true);
          asan_poison(g_dyn_smem + cfg.smem, dyn_zone_bytes - kSmemGuardBytes - cfg.smem, true);
          asan_poison(arena, arena_bytes, true);
          for (const SharedAlloc& a : s.static_allocs) asan_poison(arena + a.offset, a.bytes, false);
          const bool reverse = s.schedule == Schedule::kReverse ||
                               (s.schedule == Schedule::kAlternate && (s.blocks_run & 1) != 0);
          ++s.blocks_run;
          run_block(nt, cfg.block, reverse);
          asan_poison(dyn_zone, dyn_zone_bytes, false);
          asan_poison(arena, arena_bytes, false);
          if (!intact(dyn_zone, kSmemGuardBytes) ||
              !intact(g_dyn_smem + cfg.smem, dyn_zone_bytes - kSmemGuardBytes - cfg.smem))
            fault(cudaErrorIllegalAddress, "write outside the " + std::to_string(cfg.smem) +
                                               " bytes of dynamic shared memory in block " +
                                               dim3_str(dim3(bx, by, bz)));
          size_t gap = 0;  // every byte of the arena outside the static arrays must be untouched
          for (const SharedAlloc& a : s.static_allocs) {
            if (!intact(arena + gap, a.offset - gap))
              fault(cudaErrorIllegalAddress, "write outside a static __shared__ array (" + std::to_string(a.bytes) +
                                                 " bytes) in block " + dim3_str(dim3(bx, by, bz)));
            gap = a.offset + a.bytes;
          }
          if (!intact(arena + gap, arena_bytes - gap))
            fault(cudaErrorIllegalAddress,
                  "write past the last static __shared__ array in block " + dim3_str(dim3(bx, by, bz)));
        }
    g_dyn_smem = nullptr;
    err = s.fault;
    rec.message = s.fault_message;
  }
  rec.error = err;
  if (err != cudaSuccess) {
    s.last_error = err;
    s.last_message = name + ": " + rec.message;
  }
  if (s.log.size() < 1000000) s.log.push_back(std::move(rec));
}

}  // namespace emu

#define threadIdx (::emu::g_current->thread_idx)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define __syncthreads() ::emu::syncthreads()

// =========================================================================================================
// Runtime: the CUDA runtime API functions the sources call, the Python module of the extension (launch log,
// SM count, schedule) and self-tests of the emulator's own checks. Compiled in exactly one translation unit
// (build.py's emulator_runtime.cpp defines FR_EMU_RUNTIME).
#ifdef FR_EMU_RUNTIME
#include <Python.h>

namespace emu {

inline const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorIllegalInstruction: return "cudaErrorIllegalInstruction";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError(other)";
  }
}

}  // namespace emu

extern "C" {

cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return emu::state().last_error; }

cudaError_t CUDARTAPI cudaGetLastError(void) {
  emu::State& s = emu::state();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

const char* CUDARTAPI cudaGetErrorName(cudaError_t e) { return emu::error_name(e); }

// The message of the most recent error (more useful than the generic CUDA text in test failures).
const char* CUDARTAPI cudaGetErrorString(cudaError_t e) {
  static thread_local std::string msg;
  msg = std::string(emu::error_name(e)) + " (emulated";
  const std::string& last = emu::state().last_message;
  if (e != cudaSuccess && !last.empty()) msg += ": " + last;
  msg += ")";
  return msg.c_str();
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = emu::state().current_device;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  emu::State& s = emu::state();
  if (device < 0 || device >= static_cast<int>(s.device_sms.size())) {
    s.last_error = cudaErrorInvalidDevice;
    s.last_message = "cudaDeviceGetAttribute: no emulated device " + std::to_string(device);
    return cudaErrorInvalidDevice;
  }
  if (attr != cudaDevAttrMultiProcessorCount) {
    // Fail loudly: the launcher's next cudaGetLastError() reports it.
    s.last_error = cudaErrorNotSupported;
    s.last_message = "cudaDeviceGetAttribute: attribute " + std::to_string(static_cast<int>(attr)) +
                     " is not emulated (add it to tests/cuda_emulation/emulator.h)";
    return cudaErrorNotSupported;
  }
  *value = s.device_sms[device];
  return cudaSuccess;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------
// Self-test kernels: deliberately broken (and one correct) kernels checking that the emulator detects what
// it claims to. Written as the rewritten sources look.
namespace emu_selftest {

__global__ void tree_sum_kernel(float* out) {
  FR_EMU_STATIC_SHARED(float, buf, [256]);
  const unsigned t = threadIdx.x;
  buf[t] = static_cast<float>(t);
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// Missing __syncthreads between writing and reading a neighbour's slot.
__global__ void missing_barrier_kernel(float* out) {
  float* s = ::emu::checked_cast<float*>(::emu::g_dyn_smem);
  const unsigned t = threadIdx.x;
  s[t] = 1.0f;
  out[t] = s[(t + 1) % blockDim.x];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

struct alignas(16) Vec4 {
  float v[4];
};

__global__ void misaligned_kernel(const float* in, float* out) {
  const Vec4 r = ::emu::aligned_ref<const Vec4>(in + 1);  // in + 1 is 4-byte aligned only
  out[threadIdx.x] = r.v[0];
}

__global__ void smem_overflow_kernel(int n) {
  float* s = ::emu::checked_cast<float*>(::emu::g_dyn_smem);
  s[threadIdx.x + n] = 0.0f;
}

__global__ void bounded_kernel(float* out) {
  ::emu::check_launch_bounds(256);
  out[0] = 0.0f;
}

__global__ void noop_kernel() {}

}  // namespace emu_selftest

namespace emu {

struct SelftestResult {
  cudaError_t error;
  std::string message;
  std::vector<double> values;
};

inline SelftestResult run_selftest(const std::string& name) {
  using namespace emu_selftest;
  cudaGetLastError();
  std::vector<float> out(1024, -1.0f), in(64, 1.0f);
  SelftestResult r{cudaSuccess, "", {}};
  bool known = true;
  if (name == "tree_sum") {
    launch<&tree_sum_kernel>(LaunchConfig(dim3(3), dim3(256)), out.data());
    r.values.assign(out.begin(), out.begin() + 3);
  } else if (name == "missing_barrier") {
    launch<&missing_barrier_kernel>(LaunchConfig(dim3(1), dim3(256), 256 * sizeof(float)), out.data());
    double poisoned = 0;
    for (int i = 0; i < 256; ++i) poisoned += out[i] != out[i];  // NaN: read before written
    r.values.push_back(poisoned);
  } else if (name == "divergent_barrier") {
    launch<&divergent_barrier_kernel>(LaunchConfig(dim3(1), dim3(64)), out.data());
  } else if (name == "misaligned") {
    launch<&misaligned_kernel>(LaunchConfig(dim3(1), dim3(32)), in.data(), out.data());
  } else if (name == "smem_overflow") {
    launch<&smem_overflow_kernel>(LaunchConfig(dim3(1), dim3(32), 64 * sizeof(float)), 64);
  } else if (name == "launch_bounds") {
    launch<&bounded_kernel>(LaunchConfig(dim3(1), dim3(512)), out.data());
  } else if (name == "grid_y") {
    launch<&noop_kernel>(LaunchConfig(dim3(1, 65536), dim3(32)));
  } else if (name == "block_size") {
    launch<&noop_kernel>(LaunchConfig(dim3(1), dim3(32, 33)));
  } else if (name == "smem_size") {
    launch<&noop_kernel>(LaunchConfig(dim3(1), dim3(32), 48 * 1024 + 4));
  } else if (name == "empty_grid") {
    launch<&noop_kernel>(LaunchConfig(dim3(0), dim3(32)));
  } else {
    known = false;
  }
  if (!known) {
    r.error = cudaErrorInvalidValue;
    r.message = "unknown self-test " + name;
    return r;
  }
  r.error = cudaGetLastError();
  if (r.error != cudaSuccess) r.message = state().last_message;
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// Python module.

inline PyObject* py_set_sm_count(PyObject*, PyObject* args) {
  int n;
  if (!PyArg_ParseTuple(args, "i", &n)) return nullptr;
  if (n < 1) {
    PyErr_SetString(PyExc_ValueError, "sm count must be >= 1");
    return nullptr;
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  const int previous = s.device_sms[s.current_device];
  int dev = -1;
  for (size_t i = 0; i < s.device_sms.size(); ++i)
    if (s.device_sms[i] == n) dev = static_cast<int>(i);
  if (dev < 0) {
    if (static_cast<int>(s.device_sms.size()) >= kMaxDevices) {
      PyErr_SetString(PyExc_RuntimeError, "too many distinct emulated SM counts");
      return nullptr;
    }
    s.device_sms.push_back(n);
    dev = static_cast<int>(s.device_sms.size()) - 1;
  }
  s.current_device = dev;
  return PyLong_FromLong(previous);
}

inline PyObject* py_set_schedule(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  static const char* names[] = {"forward", "reverse", "alternate"};
  const char* previous = names[static_cast<int>(s.schedule)];
  const std::string n(name);
  if (n == "forward") s.schedule = Schedule::kForward;
  else if (n == "reverse") s.schedule = Schedule::kReverse;
  else if (n == "alternate") s.schedule = Schedule::kAlternate;
  else {
    PyErr_SetString(PyExc_ValueError, "schedule must be 'forward', 'reverse' or 'alternate'");
    return nullptr;
  }
  return PyUnicode_FromString(previous);
}

// [(kernel, (gx, gy, gz), (bx, by, bz), smem, error name or None, message)], and clears the log.
inline PyObject* py_take_launch_log(PyObject*, PyObject*) {
  State& s = state();
  std::vector<LaunchRecord> log;
  {
    std::lock_guard<std::mutex> lock(s.launch_mutex);
    log.swap(s.log);
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(log.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < log.size(); ++i) {
    const LaunchRecord& r = log[i];
    PyObject* err = r.error == cudaSuccess ? (Py_INCREF(Py_None), Py_None) : PyUnicode_FromString(error_name(r.error));
    PyObject* item = Py_BuildValue("(s(III)(III)nNs)", r.kernel.c_str(), r.grid.x, r.grid.y, r.grid.z, r.block.x,
                                   r.block.y, r.block.z, static_cast<Py_ssize_t>(r.smem), err, r.message.c_str());
    if (!item) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

// selftest(name) -> (error name, message, [values])
inline PyObject* py_selftest(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  const SelftestResult r = run_selftest(name);
  PyObject* values = PyList_New(static_cast<Py_ssize_t>(r.values.size()));
  for (size_t i = 0; i < r.values.size(); ++i)
    PyList_SET_ITEM(values, static_cast<Py_ssize_t>(i), PyFloat_FromDouble(r.values[i]));
  return Py_BuildValue("(ssN)", error_name(r.error), r.message.c_str(), values);
}

inline PyMethodDef py_methods[] = {
    {"set_sm_count", py_set_sm_count, METH_VARARGS,
     "set_sm_count(n) -> previous: the multiprocessor count the launchers see (each count is its own device)"},
    {"set_schedule", py_set_schedule, METH_VARARGS,
     "set_schedule('forward' | 'reverse' | 'alternate') -> previous: thread order within a block"},
    {"take_launch_log", py_take_launch_log, METH_NOARGS,
     "take_launch_log() -> [(kernel, grid, block, smem, error, message)] since the last call"},
    {"selftest", py_selftest, METH_VARARGS, "selftest(name) -> (error name, message, values)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace emu

#define FR_EMU_CAT2(a, b) a##b
#define FR_EMU_CAT(a, b) FR_EMU_CAT2(a, b)
#define FR_EMU_STR2(a) #a
#define FR_EMU_STR(a) FR_EMU_STR2(a)

extern "C" PyObject* FR_EMU_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, FR_EMU_STR(TORCH_EXTENSION_NAME),
                            "CPU emulation of fused_resnet's CUDA kernels (tests/cuda_emulation)", -1,
                            emu::py_methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}

#endif  // FR_EMU_RUNTIME
