// cudasim.h -- force-included (g++ -include) shim that lets unchanged CUDA
// kernel sources compile as host C++20.  See tests/cudasim/__init__.py for the
// design; this header holds the CUDA vocabulary and the block runner.
#pragma once
#include <math.h>
#include <float.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#define __CUDASIM__ 1
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is native to g++.  __shared__ / extern __shared__ are rewritten
// by the loader before compilation (see _rewrite_shared in __init__.py).

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace cudasim {

// Barrier on mutex+condvar (TSan models it exactly).  A thread that finishes
// calls arrive_and_drop(), so threads that returned early do not block the rest
// (what real GPUs do for exited threads).
class Barrier {
  std::mutex m_;
  std::condition_variable cv_;
  int expected_, count_;
  unsigned long gen_ = 0;
  void arrive_locked() {
    if (--count_ == 0) { ++gen_; count_ = expected_; cv_.notify_all(); }
  }
 public:
  explicit Barrier(int n) : expected_(n), count_(n) {}
  void arrive_and_wait() {
    const char* env = getenv("GPUCNN_CUDASIM_BARRIER_TIMEOUT");
    const long timeout_s = env ? atol(env) : 60;
    std::unique_lock<std::mutex> l(m_);
    unsigned long g = gen_;
    arrive_locked();
    if (!cv_.wait_for(l, std::chrono::seconds(timeout_s), [&] { return gen_ != g; })) {
      ++count_;  // take the arrival back: the thread leaves through arrive_and_drop()
      throw std::runtime_error("deadlock: not every thread reached the barrier within " + std::to_string(timeout_s) +
                               " s (__syncthreads/__syncwarp/shuffle in divergent code?)");
    }
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> l(m_);
    --expected_;
    arrive_locked();
  }
};

struct Warp {
  Barrier bar;
  int size;
  uint64_t slot[32];
  // mma.sync exchange: each lane's A and B registers, its call number and the instruction's name
  unsigned mma_a[32][4], mma_b[32][2];
  long mma_seq[32] = {};             // 0: no call yet (a lane's first call is 1)
  const char* mma_name[32] = {};
  explicit Warp(int n) : bar(n), size(n) {}
};

inline float cudasim_bitcast_f(unsigned u) { float f; memcpy(&f, &u, sizeof f); return f; }

inline thread_local Barrier* tl_block_bar = nullptr;
inline thread_local Warp* tl_warp = nullptr;
inline thread_local int tl_lane = 0;

[[noreturn]] inline void need_threads(const char* what) {
  throw std::logic_error(std::string(what) +
                         " called by a kernel running in serial mode; load or call it with threaded=True");
}

// Static __shared__ arrays become function-local statics that register here on
// first use; every registered region is refilled with 0xFF before each block.
struct SharedRegion { void* p; size_t n; };
inline std::mutex shared_mu;
inline std::vector<SharedRegion> shared_regions;
struct SharedReg {
  SharedReg(void* p, size_t n) {
    memset(p, 0xFF, n);  // the first block already runs; fill before anyone reads
    std::lock_guard<std::mutex> l(shared_mu);
    shared_regions.push_back({p, n});
  }
};

// extern __shared__ arrays all alias this buffer (as on a GPU).  Bytes past the
// launch's shared_mem are NaN-filled, checked after each block and, under ASan,
// poisoned.
constexpr size_t kDynSharedCap = 227 * 1024;
alignas(128) inline unsigned char dyn_shared[kDynSharedCap];

inline void begin_block(size_t shmem) {
  {
    std::lock_guard<std::mutex> l(shared_mu);
    for (auto& r : shared_regions) memset(r.p, 0xFF, r.n);
  }
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(dyn_shared, kDynSharedCap);
#endif
  memset(dyn_shared, 0xFF, kDynSharedCap);
#if defined(__SANITIZE_ADDRESS__)
  ASAN_POISON_MEMORY_REGION(dyn_shared + shmem, kDynSharedCap - shmem);
#endif
}

inline void end_block(size_t shmem) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(dyn_shared, kDynSharedCap);
#endif
  const unsigned char* tail = dyn_shared + shmem;  // all 0xFF <=> tail[0] == 0xFF and tail[i] == tail[i+1]
  if (shmem < kDynSharedCap && (tail[0] != 0xFF || memcmp(tail, tail + 1, kDynSharedCap - shmem - 1) != 0))
    throw std::runtime_error("wrote past the end of dynamic shared memory (shared_mem=" + std::to_string(shmem) +
                             " bytes)");
}

// Message for an exception escaping one kernel thread (threadIdx is thread_local).
inline std::string describe(std::exception_ptr ep) {
  std::string what = "unknown C++ exception";
  try { std::rethrow_exception(ep); } catch (const std::exception& e) { what = e.what(); } catch (...) {}
  return "thread (" + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," +
         std::to_string(threadIdx.z) + "): " + what;
}

inline void set_thread(const dim3& g, const dim3& b, const uint3& bi, unsigned t) {
  gridDim = g; blockDim = b; blockIdx = bi;
  threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
}

template <class F>
void run_block_threaded(const dim3& g, const dim3& b, const uint3& bi, F& body) {
  const unsigned n = b.x * b.y * b.z;
  Barrier bar(n);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w * 32 < n; ++w) warps.emplace_back(new Warp(std::min(32u, n - 32 * w)));
  std::mutex emu;
  std::string err;
  std::vector<std::thread> ts;
  ts.reserve(n);
  unsigned started = 0;
  try {
    for (; started < n; ++started)
      ts.emplace_back([&, t = started] {
        set_thread(g, b, bi, t);
        tl_block_bar = &bar; tl_warp = warps[t / 32].get(); tl_lane = int(t % 32);
        try { body(); } catch (...) {
          std::lock_guard<std::mutex> l(emu); if (err.empty()) err = describe(std::current_exception());
        }
        tl_warp->bar.arrive_and_drop(); bar.arrive_and_drop();
        tl_block_bar = nullptr; tl_warp = nullptr;
      });
  } catch (const std::exception& e) {  // could not start all threads: release the others
    err = std::string("could not start block threads: ") + e.what();
    for (unsigned t = started; t < n; ++t) { warps[t / 32]->bar.arrive_and_drop(); bar.arrive_and_drop(); }
  }
  for (auto& t : ts) t.join();
  if (!err.empty()) throw std::runtime_error(err);
}

template <class F>
int launch(const unsigned* gd, const unsigned* bd, size_t shmem, int threaded, char* err, size_t errlen,
           F&& body) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const dim3 g(gd[0], gd[1], gd[2]), b(bd[0], bd[1], bd[2]);
  try {
    if (shmem > kDynSharedCap) throw std::runtime_error("shared_mem larger than 227 KiB");
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y)
        for (unsigned x = 0; x < g.x; ++x) {
          const uint3 bi{x, y, z};
          blockIdx = bi;
          begin_block(shmem);
          if (threaded) {
            run_block_threaded(g, b, bi, body);
          } else {
            for (unsigned t = 0; t < b.x * b.y * b.z; ++t) {
              set_thread(g, b, bi, t);
              try { body(); } catch (...) { throw std::runtime_error(describe(std::current_exception())); }
            }
          }
          end_block(shmem);
        }
  } catch (const std::exception& e) {
    snprintf(err, errlen, "block (%u,%u,%u): %s", blockIdx.x, blockIdx.y, blockIdx.z, e.what());
    return 1;
  }
  return 0;
}

template <class T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of types wider than 8 bytes");
  Warp* w = tl_warp;
  if (!w) need_threads("a warp shuffle");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  w->slot[tl_lane] = bits;
  w->bar.arrive_and_wait();
  bits = w->slot[(src >= 0 && src < w->size) ? src : tl_lane];
  w->bar.arrive_and_wait();
  memcpy(&v, &bits, sizeof(T));
  return v;
}

// ---- mma.sync (kernels/mma.cuh) ---------------------------------------------
// The warp-level tensor-core instructions, by the PTX ISA's fragment layouts
// (g = lane >> 2, t = lane & 3; see kernels/mma.cuh): every lane deposits its A
// and B registers, the warp meets, every lane rebuilds A (16 x K) and B (K x 8)
// from all 32 lanes and computes its own four D elements as fmaf over k in
// increasing order.  A .tf32 register's low 13 bits are ignored (truncated), as
// the tensor core does; 16-bit elements are exact in float.  All 32 lanes must
// make the same call (same instruction, same call number): a lane that exited
// or diverged is reported, not waited for.
inline thread_local long tl_mma_calls = 0;

inline float half_bits_to_float(unsigned h, bool bf16) {
  h &= 0xffffu;
  if (bf16) return cudasim_bitcast_f(h << 16);
  const unsigned sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return cudasim_bitcast_f(sign | 0x7f800000u | (m << 13));
  if (e == 0) return (sign ? -1.0f : 1.0f) * ldexpf(float(m), -24);
  return cudasim_bitcast_f(sign | ((e + 112u) << 23) | (m << 13));
}

enum class MmaType { tf32, bf16, f16 };

inline void mma_sync(const char* name, MmaType type, float* d, const unsigned* a, const unsigned* b) {
  Warp* w = tl_warp;
  if (!w) need_threads(name);
  if (w->size != 32)
    throw std::logic_error(std::string(name) + " needs a full warp of 32 threads; this warp has " +
                           std::to_string(w->size));
  const int lane = tl_lane;
  const long seq = ++tl_mma_calls;
  memcpy(w->mma_a[lane], a, sizeof w->mma_a[lane]);
  memcpy(w->mma_b[lane], b, sizeof w->mma_b[lane]);
  w->mma_seq[lane] = seq;
  w->mma_name[lane] = name;
  w->bar.arrive_and_wait();
  std::string err;
  for (int l = 0; l < 32 && err.empty(); ++l)
    if (w->mma_seq[l] != seq || w->mma_name[l] != name)
      err = std::string(name) + ": lane " + std::to_string(l) + " did not make this call (call " +
            std::to_string(seq) + " of lane " + std::to_string(lane) + "): .aligned needs the whole warp converged";
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      if (type == MmaType::tf32) {
        A[g + 8 * (i & 1)][t + 4 * (i >= 2)] = cudasim_bitcast_f(w->mma_a[l][i] & ~0x1fffu);
      } else {
        for (int h = 0; h < 2; ++h)
          A[g + 8 * (i & 1)][2 * t + 8 * (i >= 2) + h] = half_bits_to_float(w->mma_a[l][i] >> (16 * h), type == MmaType::bf16);
      }
    }
    for (int i = 0; i < 2; ++i) {
      if (type == MmaType::tf32) {
        B[t + 4 * i][g] = cudasim_bitcast_f(w->mma_b[l][i] & ~0x1fffu);
      } else {
        for (int h = 0; h < 2; ++h)
          B[2 * t + 8 * i + h][g] = half_bits_to_float(w->mma_b[l][i] >> (16 * h), type == MmaType::bf16);
      }
    }
  }
  w->bar.arrive_and_wait();  // every lane has read the registers: the next call may overwrite them
  if (!err.empty()) throw std::logic_error(err);
  const int g = lane >> 2, t = lane & 3, k_end = type == MmaType::tf32 ? 8 : 16;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i >= 2), c = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < k_end; ++k) acc = fmaf(A[r][k], B[k][c], acc);
    d[i] = acc;
  }
}

inline void mma_sync_m16n8k8_tf32(float* d, const unsigned* a, const unsigned* b) {
  mma_sync("mma.sync.m16n8k8.tf32", MmaType::tf32, d, a, b);
}
inline void mma_sync_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b) {
  mma_sync("mma.sync.m16n8k16.bf16", MmaType::bf16, d, a, b);
}
inline void mma_sync_m16n8k16_f16(float* d, const unsigned* a, const unsigned* b) {
  mma_sync("mma.sync.m16n8k16.f16", MmaType::f16, d, a, b);
}

}  // namespace cudasim

// ---- synchronisation ---------------------------------------------------------
inline void __syncthreads() {
  if (!cudasim::tl_block_bar) cudasim::need_threads("__syncthreads()");
  cudasim::tl_block_bar->arrive_and_wait();
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  if (!cudasim::tl_warp) cudasim::need_threads("__syncwarp()");
  cudasim::tl_warp->bar.arrive_and_wait();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T> T __shfl_sync(unsigned, T v, int src, int width = 32) {
  int lane = cudasim::tl_lane;
  return cudasim::shfl(v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  int lane = cudasim::tl_lane;
  return cudasim::shfl(v, (lane & (width - 1)) + int(d) < width ? lane + int(d) : lane);
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  int lane = cudasim::tl_lane;
  return cudasim::shfl(v, (lane & (width - 1)) >= int(d) ? lane - int(d) : lane);
}
template <class T> T __shfl_xor_sync(unsigned, T v, int m, int width = 32) {
  int lane = cudasim::tl_lane, src = lane ^ m;
  return cudasim::shfl(v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}

// ---- atomics (std::atomic_ref: real atomics, visible to TSan) ---------------
#define CUDASIM_ATOMIC_RMW(T)                                                              \
  inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }             \
  inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }             \
  inline T atomicCAS(T* p, T cmp, T v) {                                                    \
    std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v);                                 \
    return cmp;                                                                             \
  }
CUDASIM_ATOMIC_RMW(int)
CUDASIM_ATOMIC_RMW(unsigned)
CUDASIM_ATOMIC_RMW(unsigned long long)
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v); }
inline int atomicSub(int* p, int v) { return std::atomic_ref<int>(*p).fetch_sub(v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_sub(v); }
template <class T, class Better> T cudasim_atomic_update(T* p, T v, Better better) {
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (better(v, old) && !r.compare_exchange_weak(old, v)) {}
  return old;
}
inline int atomicMax(int* p, int v) { return cudasim_atomic_update(p, v, [](int a, int b) { return a > b; }); }
inline int atomicMin(int* p, int v) { return cudasim_atomic_update(p, v, [](int a, int b) { return a < b; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  return cudasim_atomic_update(p, v, [](unsigned a, unsigned b) { return a > b; });
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
  return cudasim_atomic_update(p, v, [](unsigned a, unsigned b) { return a < b; });
}

// ---- loads, math, bit casts ------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
#define CUDASIM_MINMAX(T)                                \
  inline T min(T a, T b) { return b < a ? b : a; }       \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDASIM_MINMAX(int)
CUDASIM_MINMAX(unsigned)
CUDASIM_MINMAX(long long)
CUDASIM_MINMAX(unsigned long long)
CUDASIM_MINMAX(float)
CUDASIM_MINMAX(double)
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.0f), 1.0f); }
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline float __int2float_rn(int x) { return float(x); }
template <class To, class From> inline To cudasim_bitcast(From f) { To t; memcpy(&t, &f, sizeof t); return t; }
inline int __float_as_int(float x) { return cudasim_bitcast<int>(x); }
inline unsigned __float_as_uint(float x) { return cudasim_bitcast<unsigned>(x); }
inline float __int_as_float(int x) { return cudasim_bitcast<float>(x); }
inline float __uint_as_float(unsigned x) { return cudasim_bitcast<float>(x); }
inline long long __double_as_longlong(double x) { return cudasim_bitcast<long long>(x); }
inline double __longlong_as_double(long long x) { return cudasim_bitcast<double>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
