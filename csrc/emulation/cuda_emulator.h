// A CPU emulator of the small part of CUDA that csrc/*.cu uses, so their kernels can run
// against the reference on a machine without a GPU (AIA_NATIVE_CUDA_EMULATION=1, see
// aia_kernels/native/__init__.py). It is a test tool, not a backend: slow, single-threaded.
//
// What it runs: a launch runs every CUDA thread of the grid, one after the other, on the
// calling OS thread. A thread is a fiber (ucontext) while it may wait at a barrier:
//   __syncthreads()  a fiber waits until every thread of its block waits;
//   grid.sync()      (cooperative launch only) until every thread of the grid waits.
// Blocks run one at a time between grid-wide barriers, so `__shared__` is a function-local
// `static`: right as long as shared memory is not live across grid.sync() (true of our
// kernels: every use ends with a __syncthreads) and no two blocks of one plain launch
// overlap (they never do here).
// Speed: the first block of a plain launch runs as fibers; if none of its threads reached
// a barrier, the other blocks run as plain calls (a barrier reached there is an error).
//
// What it checks: indexing, arithmetic, barrier counts (every thread of a block must reach
// each barrier; a thread that exits while others wait is an error, as it is undefined on a
// GPU), and, with AIA_CUDA_EMULATION_ORDER=reverse|shuffle[:seed], that results do not
// depend on the order threads run between barriers (a race there shows as a difference).
// What it cannot check: races inside one barrier interval that every order hides, the
// memory model, warp-level behaviour, register/shared-memory limits, launch limits, speed.
//
// Device limits it reports: cooperative launch supported, AIA_CUDA_EMULATION_SMS
// multiprocessors (default 2; read once per process by the code that caches it),
// 2 co-resident blocks of any kernel per multiprocessor.
#pragma once
#include <ATen/ATen.h>  // before the macros below, which no torch header must see
#include <c10/util/Exception.h>
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrCooperativeLaunch = 95 };

namespace aia {
namespace emulation {

// The running CUDA thread's indices (threadIdx & co. read these).
struct Indices {
  uint3 thread{0, 0, 0}, block{0, 0, 0};
  dim3 block_dim, grid_dim;
};
inline Indices& indices() {
  static thread_local Indices current;
  return current;
}

inline int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::atoi(s) : fallback;
}

// AIA_CUDA_EMULATION_ORDER: forward (default), reverse, shuffle or shuffle:<seed>.
inline std::vector<unsigned> run_order(unsigned n, uint64_t salt) {
  std::vector<unsigned> order(n);
  std::iota(order.begin(), order.end(), 0u);
  const char* s = std::getenv("AIA_CUDA_EMULATION_ORDER");
  const std::string mode = s == nullptr ? "" : s;
  if (mode.empty() || mode == "forward") return order;
  if (mode == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (mode.rfind("shuffle", 0) == 0) {
    const uint64_t seed = mode.size() > 8 ? std::strtoull(mode.c_str() + 8, nullptr, 10) : 0;
    std::mt19937_64 rng(seed * 1000003u + salt);
    std::shuffle(order.begin(), order.end(), rng);
  } else {
    TORCH_CHECK(false, "AIA_CUDA_EMULATION_ORDER must be forward, reverse, shuffle or shuffle:<seed>, got '", mode,
                "'");
  }
  return order;
}

class Launch {
 public:
  Launch(dim3 grid, dim3 block, bool cooperative, std::function<void()> body)
      : grid_(grid), block_(block), cooperative_(cooperative), body_(std::move(body)) {
    TORCH_CHECK(grid.y == 1 && grid.z == 1 && block.y == 1 && block.z == 1,
                "cuda emulator: only 1-D grids and blocks are emulated");
    TORCH_CHECK(grid.x >= 1 && block.x >= 1 && block.x <= 1024, "cuda emulator: invalid launch configuration <<<",
                grid.x, ", ", block.x, ">>>");
  }

  void run() {
    Launch* const outer = active();
    TORCH_CHECK(outer == nullptr, "cuda emulator: a kernel launched a kernel");
    active() = this;
    try {
      cooperative_ ? run_cooperative() : run_blocks();
    } catch (...) {
      active() = nullptr;
      release_fibers();
      throw;
    }
    active() = nullptr;
    release_fibers();
  }

  // __syncthreads() / grid.sync() of the running thread.
  static void wait(bool grid) {
    Launch* l = active();
    TORCH_CHECK(l != nullptr, "cuda emulator: a barrier outside a kernel");
    TORCH_CHECK(!grid || l->cooperative_, "cuda emulator: grid.sync() in a launch that is not cooperative");
    Fiber* f = l->running_;
    TORCH_CHECK(f != nullptr, "cuda emulator: block ", indices().block.x,
                " reached a barrier, but the first block run of the same launch did not (the emulator "
                "needs the blocks of a launch to synchronise alike)");
    f->wait = grid ? kGrid : kBlock;
    l->barriers_hit_ = true;
    swapcontext(&f->context, &l->scheduler_);
  }

 private:
  enum Wait { kNone, kBlock, kGrid };
  struct Fiber {
    ucontext_t context;
    void* stack = nullptr;
    unsigned block = 0, thread = 0;
    Wait wait = kNone;
    bool done = false;
  };
  static constexpr uint64_t kCanary = 0x5eed5eed5eed5eedull;  // the lowest word of every fiber stack
  static constexpr size_t kStackBytes = size_t(64) << 10;  // deepest use: a copy of the persistent kernel's Args (< 4 KB)

  static Launch*& active() {
    static thread_local Launch* launch = nullptr;
    return launch;
  }
  // Fiber stacks are reused across launches (mapped once, never unmapped; touched pages only).
  static std::vector<void*>& stack_pool() {
    static thread_local std::vector<void*> pool;
    return pool;
  }

  void set_indices(unsigned block, unsigned thread) {
    Indices& ix = indices();
    ix.thread = uint3{thread, 0, 0};
    ix.block = uint3{block, 0, 0};
    ix.block_dim = block_;
    ix.grid_dim = grid_;
  }

  static void fiber_main() {
    Launch* l = active();
    Fiber* f = l->running_;
    try {
      l->body_();
    } catch (...) {
      if (!l->error_) l->error_ = std::current_exception();
    }
    f->done = true;
    // returning resumes uc_link: the scheduler
  }

  void make_fibers(unsigned first_block, unsigned n_blocks) {
    fibers_.resize(size_t(n_blocks) * block_.x);
    for (unsigned b = 0; b < n_blocks; ++b) {
      for (unsigned t = 0; t < block_.x; ++t) {
        Fiber& f = fibers_[size_t(b) * block_.x + t];
        f.block = first_block + b;
        f.thread = t;
        if (stack_pool().empty()) {
          // No guard page: a large grid has more fibers than a process may have mappings
          // (vm.max_map_count), and adjacent plain mappings merge. A canary instead.
          void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
          TORCH_CHECK(p != MAP_FAILED, "cuda emulator: cannot map a fiber stack");
          stack_pool().push_back(p);
        }
        f.stack = stack_pool().back();
        stack_pool().pop_back();
        *static_cast<uint64_t*>(f.stack) = kCanary;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = &scheduler_;
        makecontext(&f.context, &Launch::fiber_main, 0);
      }
    }
  }

  void release_fibers() {
    bool overflow = false;
    for (Fiber& f : fibers_) {
      if (f.stack == nullptr) continue;
      overflow |= *static_cast<const uint64_t*>(f.stack) != kCanary;
      stack_pool().push_back(f.stack);
    }
    fibers_.clear();
    TORCH_CHECK(!overflow, "cuda emulator: a CUDA thread overflowed its ", kStackBytes / 1024,
                " KB fiber stack (raise kStackBytes in cuda_emulator.h)");
  }

  void rethrow() {
    if (error_) std::rethrow_exception(error_);
  }

  // Runs the fibers of local block `b` until each is done or waits at a grid barrier.
  void run_block_fibers(unsigned b) {
    Fiber* const first = &fibers_[size_t(b) * block_.x];
    const std::vector<unsigned> order = run_order(block_.x, first->block);
    for (;;) {
      for (unsigned t : order) {
        Fiber& f = first[t];
        if (f.done || f.wait != kNone) continue;
        set_indices(f.block, f.thread);
        running_ = &f;
        swapcontext(&scheduler_, &f.context);
        running_ = nullptr;
        rethrow();
      }
      unsigned done = 0, at_block = 0, at_grid = 0;
      for (unsigned t = 0; t < block_.x; ++t) {
        done += first[t].done;
        at_block += first[t].wait == kBlock;
        at_grid += first[t].wait == kGrid;
      }
      if (done == block_.x) return;
      TORCH_CHECK(done == 0, "cuda emulator: in block ", first->block, ", ", done, " threads exited while ",
                  block_.x - done, " wait at a barrier (undefined on a GPU)");
      TORCH_CHECK(at_block == 0 || at_grid == 0, "cuda emulator: in block ", first->block, ", ", at_block,
                  " threads wait at __syncthreads() and ", at_grid, " at grid.sync()");
      if (at_grid == block_.x) return;
      for (unsigned t = 0; t < block_.x; ++t) first[t].wait = kNone;  // everyone reached __syncthreads()
    }
  }

  void run_blocks() {
    const std::vector<unsigned> order = run_order(grid_.x, 0x9e3779b9u);
    bool fibers = true;
    for (unsigned b : order) {
      if (fibers) {
        make_fibers(b, 1);
        run_block_fibers(0);
        release_fibers();
        fibers = barriers_hit_;  // no barrier in this block: the others run as plain calls
        continue;
      }
      for (unsigned t : run_order(block_.x, b)) {
        set_indices(b, t);
        body_();
      }
    }
  }

  void run_cooperative() {
    make_fibers(0, grid_.x);
    const std::vector<unsigned> order = run_order(grid_.x, 0x9e3779b9u);
    for (;;) {
      for (unsigned b : order) run_block_fibers(b);
      size_t done = 0;
      for (const Fiber& f : fibers_) done += f.done;
      if (done == fibers_.size()) return;
      TORCH_CHECK(done == 0, "cuda emulator: ", done, " threads exited while ", fibers_.size() - done,
                  " wait at grid.sync() (undefined on a GPU)");
      for (Fiber& f : fibers_) f.wait = kNone;  // everyone reached grid.sync()
    }
  }

  dim3 grid_, block_;
  bool cooperative_;
  std::function<void()> body_;
  std::vector<Fiber> fibers_;
  ucontext_t scheduler_;
  Fiber* running_ = nullptr;
  bool barriers_hit_ = false;
  std::exception_ptr error_;
};

// kernel<<<grid, block, 0, stream>>>(args...) is written AIA_LAUNCH(grid, block, stream, kernel)(args...).
template <typename... Params>
auto launcher(dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return [=](Params... args) { Launch(grid, block, false, [&] { kernel(args...); }).run(); };
}

template <typename... Params, size_t... I>
void call_with(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Params>>*>(args[I])...);
}

}  // namespace emulation
}  // namespace aia

// ---- the CUDA names the sources use ----

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::aia::emulation::indices().thread)
#define blockIdx (::aia::emulation::indices().block)
#define blockDim (::aia::emulation::indices().block_dim)
#define gridDim (::aia::emulation::indices().grid_dim)
#define AIA_LAUNCH(grid, block, stream, ...) ::aia::emulation::launcher(grid, block, __VA_ARGS__)

inline void __syncthreads() { ::aia::emulation::Launch::wait(false); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = ::aia::emulation::env_int("AIA_CUDA_EMULATION_SMS", 2); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int /*threads*/, size_t /*shared*/) {
  *blocks = 2;
  return cudaSuccess;
}

template <typename... Params>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(Params...), dim3 grid, dim3 block, void** args,
                                        size_t /*shared*/, cudaStream_t) {
  ::aia::emulation::Launch(grid, block, true, [&] {
    ::aia::emulation::call_with(kernel, args, std::index_sequence_for<Params...>{});
  }).run();
  return cudaSuccess;
}

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::aia::emulation::Launch::wait(true); }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
struct CUDAGuard {  // the emulated device is the calling thread
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t aia_emulated_status = (expr);                                   \
    TORCH_CHECK(aia_emulated_status == cudaSuccess, "cuda emulator: ", #expr, " failed"); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
