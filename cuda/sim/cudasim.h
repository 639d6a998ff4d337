// cudasim.h - run CUDA C++ kernels on the CPU (tests only; no GPU on dev/CI machines).
//
// The loader (python/sparsekit/_cudasim.py) compiles a kernel's .cu source with g++ -std=c++20 after
// this header, so the very same source that NVRTC compiles for a GPU is executed here.
//
// Model
//   * Every CUDA thread is a fiber with its own small stack (CUDASIM_STACK_SIZE, power of two).
//     Fibers of one block are scheduled cooperatively on one OS worker thread; they only switch at
//     __syncthreads, warp collectives, __nanosleep and exit, so shared memory needs no locks.
//   * Blocks are spread over a few OS worker threads (pthreads); global memory atomics are real atomics.
//   * The order in which runnable fibers resume after every scheduling point is forward, reverse or
//     a seeded random permutation: a kernel missing a barrier produces different results.
//   * A barrier that can never complete (threads exited or wait elsewhere) aborts the launch with an
//     error message instead of hanging.
//   * The current fiber is found from the stack pointer (stacks are aligned to their size), so
//     threadIdx & co. need no thread-local lookups.
#pragma once

#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <float.h>
#include <cmath>
#include <atomic>
#include <tuple>
#include <utility>
#include <type_traits>
#include <source_location>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
// x86-64 uses a hand-written stack switch; elsewhere (or with -DCUDASIM_USE_UCONTEXT) glibc's ucontext.
#if defined(__x86_64__) && !defined(CUDASIM_USE_UCONTEXT)
#define CUDASIM_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#define CUDASIM 1
#define SPARSEKIT_CUDASIM 1

// Race-check builds (-DCUDASIM_RACE_CHECK -fsanitize=thread, process started with libtsan preloaded):
// every CUDA thread is also a ThreadSanitizer fiber, switched with the no-sync flag so that switching
// orders nothing, and the real orderings are declared: kernel start (fiber creation) and end,
// __syncthreads per block and barrier generation, warp collectives per group, atomics as atomics.
// The runtime itself is never instrumented (CUDASIM_RT): only the kernels' memory accesses are checked.
#define CUDASIM_RT __attribute__((no_sanitize("thread")))
#if defined(CUDASIM_RACE_CHECK)
#include <sanitizer/tsan_interface.h>
#define CUDASIM_TSAN(...) __VA_ARGS__
#else
#define CUDASIM_TSAN(...)
#endif

// ---------------------------------------------------------------------------------------------
// 1. Qualifiers and attributes (no-ops on the CPU). __shared__ is one copy per OS worker thread,
//    which runs one block at a time: exactly "one copy per running block".
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __shared__ static thread_local
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))  // as CUDA: a GNU attribute, allowed after __shared__
#define __launch_bounds__(...)
#define __grid_constant__
#ifndef __restrict__
#define __restrict__ __restrict
#endif

#ifndef CUDASIM_STACK_SIZE
#define CUDASIM_STACK_SIZE 65536  // bytes per fiber; power of two
#endif
static_assert((CUDASIM_STACK_SIZE & (CUDASIM_STACK_SIZE - 1)) == 0, "CUDASIM_STACK_SIZE: power of two");

// ---------------------------------------------------------------------------------------------
// 2. Vector types and dim3
// ---------------------------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
#define CUDASIM_VEC(T, N2, N4, A2, A4)                                                          \
  struct alignas(A2) N2 { T x, y; };                                                            \
  struct alignas(A4) N4 { T x, y, z, w; };                                                      \
  inline N2 make_##N2(T x, T y) { return N2{x, y}; }                                            \
  inline N4 make_##N4(T x, T y, T z, T w) { return N4{x, y, z, w}; }
CUDASIM_VEC(float, float2, float4, 8, 16)
CUDASIM_VEC(int, int2, int4, 8, 16)
CUDASIM_VEC(unsigned int, uint2, uint4, 8, 16)
CUDASIM_VEC(double, double2, double4, 16, 32)
CUDASIM_VEC(long long, longlong2, longlong4, 16, 32)
CUDASIM_VEC(unsigned long long, ulonglong2, ulonglong4, 16, 32)
CUDASIM_VEC(short, short2, short4, 4, 8)
CUDASIM_VEC(unsigned short, ushort2, ushort4, 4, 8)
#undef CUDASIM_VEC
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
struct float3 { float x, y, z; };
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }

// ---------------------------------------------------------------------------------------------
// 3. Runtime structures
// ---------------------------------------------------------------------------------------------
namespace cudasim {

enum FiberState : int { RUNNABLE = 0, BAR_WAIT = 1, WARP_WAIT = 2, DONE = 3, DEAD = 4 };
enum WarpOp : int { W_SYNC, W_SHFL, W_UP, W_DOWN, W_XOR, W_BALLOT, W_ALL, W_RADD, W_RMIN, W_RMAX,
                    W_RAND, W_ROR, W_RXOR, W_MATCH_ANY, W_MATCH_ALL, W_MMA };
inline const char* warp_op_name(int op) {
  static const char* n[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                            "__shfl_xor_sync", "__ballot_sync/__any_sync", "__all_sync", "__reduce_add_sync",
                            "__reduce_min_sync", "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync",
                            "__reduce_xor_sync", "__match_any_sync", "__match_all_sync", "wmma::mma_sync"};
  return (op >= 0 && op <= W_MMA) ? n[op] : "?";
}

struct Site { const char* file = ""; unsigned line = 0, col = 0; };
inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.col == b.col && (a.file == b.file || strcmp(a.file, b.file) == 0);
}

struct Launch;
struct Block;

struct Warp {
  uint64_t in[32], out[32];
  int32_t arg[32], width[32];
  uint32_t mask[32];
  int32_t op[32];
  uint32_t waiting;  // lanes blocked in a warp collective
  uint32_t live;     // lanes that exist in the block and have not exited
};

// One lane's part of a wmma::mma_sync: its 8 elements of A, B, C (as float) and the 8 of D it gets.
struct MmaLane { float a[8], b[8], c[8], d[8]; };

// Lives at the bottom of each fiber's stack slot.
struct Fiber {
  uint3 tid;
  uint3 bid;
  dim3 bdim, gdim;
  Block* block;
  Warp* warp;
  void* sp;  // saved stack pointer (x86-64) while switched out
  int state;
  int lin, lane;
  Site site;  // where it waits (diagnostics)
  void* tsan;  // its ThreadSanitizer fiber (race-check builds)
#if !defined(CUDASIM_ASM_SWITCH)
  ucontext_t uc;
#endif
};

#if defined(CUDASIM_RACE_CHECK)
// Happens-before bookkeeping of one block. Fresh on the heap per block, so no sync object outlives it.
inline thread_local volatile char tls_probe;
struct RaceSync {
  char bar[2];               // __syncthreads: released/acquired by barrier generation parity
  char lane[1024][4];        // a thread's release at a warp collective, by its collective count mod 4
  uint32_t count[1024];      // collectives a thread has entered
  uint32_t entered[1024];    // its count at the collective it waits in
  uint32_t group[1024];      // lanes of the group that released it
  uint8_t snap[1024][32];    // those lanes' counts (mod 4) when the group completed
};
#else
struct RaceSync;
#endif

struct Block {
  Launch* L;
  Fiber** fibers;
  Warp* warps;
  int n, live, arrived, pred_count, bar_result;
  Site bar_site;
  unsigned char* dyn;
  void* sched_sp;
#if !defined(CUDASIM_ASM_SWITCH)
  ucontext_t sched_uc;
#endif
  bool error;
  uint3 bid;
  unsigned bar_gen;  // completed __syncthreads
  RaceSync* rs;      // race-check builds
  void* sched_tsan;  // the scheduler's ThreadSanitizer context (race-check builds)
};

struct Launch {
  void (*entry)(void*);
  void* ctx;
  dim3 grid, block;
  size_t smem;
  int schedule;  // 0 forward, 1 reverse, 2 random
  uint64_t seed;
  std::atomic<long long> next{0};
  std::atomic<int> failed{0};
  std::atomic<int> err_claimed{0};
  char err[2048];
  char end_sync;  // every thread releases here when it exits; the host acquires after the launch
  void** dead_fibers = nullptr;  // race check: finished blocks' TSan fibers, kept so reports can name them
  long long n_dead = 0, cap_dead = 0;
};

// ---------------------------------------------------------------------------------------------
// 4. Context switch. x86-64: hand-written; saves callee-saved registers, MXCSR and the x87 control
//    word on the old stack, stores rsp, loads the new one. Elsewhere: ucontext (slower, portable).
// ---------------------------------------------------------------------------------------------
#if defined(CUDASIM_ASM_SWITCH)
extern "C" void cudasim_switch(void** save_sp, void* new_sp) __attribute__((visibility("hidden")));
extern "C" void cudasim_trampoline() __attribute__((visibility("hidden")));
extern "C" void cudasim_fiber_main(Fiber* f) __attribute__((visibility("hidden"), used));
asm(R"(
    .text
    .globl cudasim_switch
    .hidden cudasim_switch
    .type cudasim_switch,@function
cudasim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cudasim_switch,.-cudasim_switch

    .globl cudasim_trampoline
    .hidden cudasim_trampoline
    .type cudasim_trampoline,@function
cudasim_trampoline:
    movq %r12, %rdi
    call cudasim_fiber_main@PLT
    ud2
    .size cudasim_trampoline,.-cudasim_trampoline
)");

// Prepare a fresh stack so that the first switch "returns" into the trampoline with r12 = f.
CUDASIM_RT inline void* init_stack(char* top, Fiber* f) {
  uintptr_t t = (uintptr_t)top & ~(uintptr_t)15;
  uint64_t* ret = (uint64_t*)(t - 24);  // ret slot == 8 mod 16 -> aligned call in the trampoline
  uint64_t* sp = ret - 7;
  uint32_t csr[2] = {0x1F80u, 0x037Fu};  // default MXCSR, x87 control word
  memcpy(&sp[0], csr, 8);
  sp[1] = sp[2] = sp[3] = 0;      // r15 r14 r13
  sp[4] = (uint64_t)(uintptr_t)f; // r12
  sp[5] = sp[6] = 0;              // rbx rbp
  ret[0] = (uint64_t)(uintptr_t)&cudasim_trampoline;
  return sp;
}
CUDASIM_RT inline void to_fiber(Block* b, Fiber* f) {
  CUDASIM_TSAN(__tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync));
  cudasim_switch(&b->sched_sp, f->sp);
}
CUDASIM_RT inline void to_scheduler(Fiber* f) {
  CUDASIM_TSAN(__tsan_switch_to_fiber(f->block->sched_tsan, __tsan_switch_to_fiber_no_sync));
  cudasim_switch(&f->sp, f->block->sched_sp);
}
inline uintptr_t stack_pointer() { uintptr_t p; asm volatile("movq %%rsp, %0" : "=r"(p)); return p; }
#else
extern "C" void cudasim_fiber_main(Fiber* f) __attribute__((visibility("hidden")));
inline void uc_entry(unsigned hi, unsigned lo) {
  cudasim_fiber_main((Fiber*)(((uintptr_t)hi << 32) | (uintptr_t)lo));
}
inline void init_uc(Fiber* f, char* stack_lo, size_t size) {
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = stack_lo;
  f->uc.uc_stack.ss_size = size;
  f->uc.uc_link = nullptr;
  uintptr_t p = (uintptr_t)f;
  makecontext(&f->uc, (void (*)())uc_entry, 2, (unsigned)(p >> 32), (unsigned)(p & 0xffffffffu));
}
CUDASIM_RT inline void to_fiber(Block* b, Fiber* f) {
  CUDASIM_TSAN(__tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync));
  swapcontext(&b->sched_uc, &f->uc);
}
CUDASIM_RT inline void to_scheduler(Fiber* f) {
  CUDASIM_TSAN(__tsan_switch_to_fiber(f->block->sched_tsan, __tsan_switch_to_fiber_no_sync));
  swapcontext(&f->uc, &f->block->sched_uc);
}
inline uintptr_t stack_pointer() { volatile char c = 0; return (uintptr_t)&c; }
#endif

// Fiber header bytes at the top of each slot; the stack grows down from just below it.
constexpr size_t kHeader = (sizeof(Fiber) + 63) / 64 * 64;
// The fiber running now: its header sits at the top of its size-aligned stack slot.
__attribute__((always_inline)) inline Fiber* self() {
  return (Fiber*)((stack_pointer() & ~(uintptr_t)(CUDASIM_STACK_SIZE - 1)) + CUDASIM_STACK_SIZE - kHeader);
}

// ---------------------------------------------------------------------------------------------
// 5. Errors: recorded once per launch; the fiber that fails never runs again.
// ---------------------------------------------------------------------------------------------
CUDASIM_RT inline void set_error(Launch* L, const char* msg) {
  if (L->err_claimed.exchange(1) == 0) {
    snprintf(L->err, sizeof L->err, "%s", msg);
  }
  L->failed.store(1);
}
CUDASIM_RT [[noreturn]] inline void abort_block(const char* msg) {
  Fiber* f = self();
  Block* b = f->block;
  char buf[1800];
  snprintf(buf, sizeof buf, "cudasim: block (%u,%u,%u) thread (%u,%u,%u): %s", b->bid.x, b->bid.y, b->bid.z,
           f->tid.x, f->tid.y, f->tid.z, msg);
  set_error(b->L, buf);
  b->error = true;
  f->state = DEAD;
  to_scheduler(f);
  __builtin_unreachable();
}

// ---------------------------------------------------------------------------------------------
// 6. Block barrier (__syncthreads and friends)
// ---------------------------------------------------------------------------------------------
CUDASIM_RT inline void yield_now(Fiber* f) { to_scheduler(f); }

CUDASIM_RT inline int block_barrier(int pred, Site s) {
  Fiber* f = self();
  Block* b = f->block;
  if (b->arrived == 0) {
    b->bar_site = s;
    b->pred_count = 0;
  } else if (!same_site(s, b->bar_site)) {
    char m[1024];
    snprintf(m, sizeof m, "divergent __syncthreads: this thread is at %s:%u, other threads wait at %s:%u", s.file,
             s.line, b->bar_site.file, b->bar_site.line);
    abort_block(m);
  }
  const unsigned gen = b->bar_gen;
  CUDASIM_TSAN(__tsan_release(&b->rs->bar[gen & 1]));
  b->arrived++;
  b->pred_count += pred != 0;
  f->site = s;
  if (b->arrived == b->n) {  // last one in: release everybody (they resume in schedule order)
    b->bar_result = b->pred_count;
    b->arrived = 0;
    b->bar_gen++;
    for (int i = 0; i < b->n; i++)
      if (b->fibers[i]->state == BAR_WAIT) b->fibers[i]->state = RUNNABLE;
    f->state = RUNNABLE;
  } else {
    f->state = BAR_WAIT;
    if (b->arrived == b->live && b->live < b->n) {
      char m[1024];
      snprintf(m, sizeof m,
               "__syncthreads at %s:%u can never complete: %d threads wait there, %d of the block's %d threads "
               "have already exited",
               s.file, s.line, b->arrived, b->n - b->live, b->n);
      abort_block(m);
    }
  }
  yield_now(f);
  // Everybody released before anybody acquires; a thread can be a generation ahead, never two.
  CUDASIM_TSAN(__tsan_acquire(&b->rs->bar[gen & 1]));
  return b->bar_result;
}

// ---------------------------------------------------------------------------------------------
// 7. Warp collectives: every lane posts its value and waits; when all non-exited lanes named in
//    the mask have arrived, results for the whole group are computed at once.
// ---------------------------------------------------------------------------------------------
CUDASIM_RT inline void warp_compute(Warp* w, uint32_t m, int op) {
  if (op == W_MMA) {  // in[l] = &MmaLane of lane l; the whole warp or nothing
    MmaLane* ln[32];
    for (int l = 0; l < 32; l++) ln[l] = (MmaLane*)(uintptr_t)w->in[l];
    for (int l = 0; l < 32; l++) w->out[l] = m != 0xffffffffu;  // error flag: some lane exited
    if (m != 0xffffffffu) return;
    float A[256], B[256], C[256];
    for (int l = 0; l < 32; l++)
      for (int e = 0; e < 8; e++) {
        A[e * 32 + l] = ln[l]->a[e];
        B[e * 32 + l] = ln[l]->b[e];
        C[e * 32 + l] = ln[l]->c[e];
      }
    for (int l = 0; l < 32; l++)
      for (int e = 0; e < 8; e++) {
        const int i = (e * 32 + l) / 16, j = (e * 32 + l) % 16;
        float acc = C[i * 16 + j];  // fp32 accumulation, k in order (a GPU's order is unspecified)
        for (int k = 0; k < 16; k++) acc = fmaf(A[i * 16 + k], B[k * 16 + j], acc);
        ln[l]->d[e] = acc;
      }
    return;
  }
  uint32_t ballot = 0;
  for (uint32_t r = m; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    if (w->in[l]) ballot |= 1u << l;
  }
  uint64_t acc = 0;
  bool is_signed = w->arg[__builtin_ctz(m)] != 0;
  if (op >= W_RADD && op <= W_RXOR) {
    bool first = true;
    for (uint32_t r = m; r; r &= r - 1) {
      uint64_t v = w->in[__builtin_ctz(r)];
      if (first) { acc = v; first = false; continue; }
      switch (op) {
        case W_RADD: acc = (uint32_t)(acc + v); break;
        case W_RMIN: acc = is_signed ? ((int32_t)v < (int32_t)acc ? v : acc) : ((uint32_t)v < (uint32_t)acc ? v : acc); break;
        case W_RMAX: acc = is_signed ? ((int32_t)v > (int32_t)acc ? v : acc) : ((uint32_t)v > (uint32_t)acc ? v : acc); break;
        case W_RAND: acc &= v; break;
        case W_ROR: acc |= v; break;
        case W_RXOR: acc ^= v; break;
      }
    }
  }
  bool all_eq = true;
  for (uint32_t r = m; r; r &= r - 1)
    if (w->in[__builtin_ctz(r)] != w->in[__builtin_ctz(m)]) all_eq = false;
  for (uint32_t r = m; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    int width = w->width[l], seg = l & ~(width - 1), src = l;
    switch (op) {
      case W_SHFL: src = seg + (w->arg[l] & (width - 1)); break;
      case W_UP: src = l - w->arg[l]; if (src < seg) src = l; break;
      case W_DOWN: src = l + w->arg[l]; if (src >= seg + width) src = l; break;
      case W_XOR: src = l ^ w->arg[l]; if (src >= seg + width) src = l; break;
      default: break;
    }
    switch (op) {
      case W_SHFL: case W_UP: case W_DOWN: case W_XOR:
        w->out[l] = (src >= 0 && src < 32 && ((m >> src) & 1)) ? w->in[src] : w->in[l];  // inactive source: own value
        break;
      case W_BALLOT: w->out[l] = ballot; break;
      case W_ALL: w->out[l] = ballot == m; break;
      case W_MATCH_ANY: {
        uint32_t eq = 0;
        for (uint32_t q = m; q; q &= q - 1)
          if (w->in[__builtin_ctz(q)] == w->in[l]) eq |= 1u << __builtin_ctz(q);
        w->out[l] = eq;
        break;
      }
      case W_MATCH_ALL: w->out[l] = all_eq ? m : 0; break;
      case W_SYNC: w->out[l] = 0; break;
      default: w->out[l] = acc; break;
    }
  }
}

// Release the group `lane` waits in if it is complete. Returns false on a usage error (message in buf).
CUDASIM_RT inline bool warp_try_release(Block* b, Warp* w, int lane, char* buf, size_t bufsz) {
  uint32_t m = w->mask[lane] & w->live;
  if ((w->waiting & m) != m) return true;
  for (uint32_t r = m; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    if ((w->mask[l] & w->live) != m || w->op[l] != w->op[lane]) {
      snprintf(buf, bufsz, "warp lanes disagree: lane %d called %s with mask 0x%08x, lane %d called %s with mask 0x%08x",
               lane, warp_op_name(w->op[lane]), w->mask[lane], l, warp_op_name(w->op[l]), w->mask[l]);
      return false;
    }
  }
  warp_compute(w, m, w->op[lane]);
  w->waiting &= ~m;
  int base = (int)(w - b->warps) * 32;
#if defined(CUDASIM_RACE_CHECK)
  for (uint32_t r = m; r; r &= r - 1) {
    int l = base + __builtin_ctz(r);
    b->rs->group[l] = m;
    for (uint32_t q = m; q; q &= q - 1) b->rs->snap[l][__builtin_ctz(q)] = (uint8_t)(b->rs->entered[base + __builtin_ctz(q)] & 3);
  }
#endif
  for (uint32_t r = m; r; r &= r - 1) b->fibers[base + __builtin_ctz(r)]->state = RUNNABLE;
  return true;
}

CUDASIM_RT inline uint64_t warp_op(uint32_t mask, int op, uint64_t v, int arg, int width, Site s) {
  Fiber* f = self();
  Warp* w = f->warp;
  int lane = f->lane;
  if (!((mask >> lane) & 1u)) {
    char m[256];
    snprintf(m, sizeof m, "%s at %s:%u: mask 0x%08x does not contain the calling lane %d", warp_op_name(op), s.file,
             s.line, mask, lane);
    abort_block(m);
  }
  if (width <= 0 || width > 32 || (width & (width - 1))) abort_block("shuffle width must be a power of two in [1, 32]");
  w->in[lane] = v;
  w->arg[lane] = arg;
  w->width[lane] = width;
  w->mask[lane] = mask;
  w->op[lane] = op;
  w->waiting |= 1u << lane;
  f->state = WARP_WAIT;
  f->site = s;
#if defined(CUDASIM_RACE_CHECK)
  // Release under this thread's collective count; on resuming, acquire what each lane of the group
  // released at this very collective (a lane completes at most one more before we resume: 4 slots do).
  // mma_sync exchanges registers, not memory: it orders nothing (a GPU gives it no fence either).
  RaceSync* rs = f->block->rs;
  if (op != W_MMA) {
    const uint32_t c = rs->count[f->lin]++;
    rs->entered[f->lin] = c;
    __tsan_release(&rs->lane[f->lin][c & 3]);
  }
#endif
  char buf[512];
  if (!warp_try_release(f->block, w, lane, buf, sizeof buf)) abort_block(buf);
  yield_now(f);
#if defined(CUDASIM_RACE_CHECK)
  const int base = f->lin - lane;
  for (uint32_t r = op == W_MMA ? 0u : rs->group[f->lin]; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    __tsan_acquire(&rs->lane[base + l][rs->snap[f->lin][l]]);
  }
#endif
  return w->out[lane];
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

// ---------------------------------------------------------------------------------------------
// 8. Fiber entry/exit and the per-block scheduler
// ---------------------------------------------------------------------------------------------
CUDASIM_RT inline void fiber_exit(Fiber* f) {
  Block* b = f->block;
  Warp* w = f->warp;
  CUDASIM_TSAN(__tsan_release(&b->L->end_sync));
  f->state = DONE;
  b->live--;
  w->live &= ~(1u << f->lane);
  char buf[512];
  // Exited lanes no longer count in warp masks: a group may be complete now.
  for (uint32_t r = w->waiting; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    if (!((w->waiting >> l) & 1u)) continue;
    if (!warp_try_release(b, w, l, buf, sizeof buf)) {
      set_error(b->L, buf);
      b->error = true;
      break;
    }
  }
  if (!b->error && b->arrived > 0 && b->arrived == b->live) {
    snprintf(buf, sizeof buf,
             "cudasim: block (%u,%u,%u): __syncthreads at %s:%u can never complete: %d threads wait there, %d of the "
             "block's %d threads have exited",
             b->bid.x, b->bid.y, b->bid.z, b->bar_site.file, b->bar_site.line, b->arrived, b->n - b->live, b->n);
    set_error(b->L, buf);
    b->error = true;
  }
  to_scheduler(f);
  __builtin_unreachable();
}

}  // namespace cudasim

extern "C" __attribute__((visibility("hidden"), used)) CUDASIM_RT inline void cudasim_fiber_main(cudasim::Fiber* f) {
  f->block->L->entry(f->block->L->ctx);
  cudasim::fiber_exit(f);
}

namespace cudasim {

// A worker's fiber slots: 1024 slots of CUDASIM_STACK_SIZE, aligned to the size, each
// [guard page | stack (grows down) | Fiber header]. Pooled per loaded module and reused; pages are
// only committed when touched, so a small kernel costs about one page per thread.
struct Arena {
  char* raw;
  size_t total;
  char* base;
  unsigned char* dyn;
  size_t dyn_size;
  Fiber* fibers[1024];
  Warp warps[32];
  uint32_t order[1024];
  Arena* next_free;
};
inline pthread_mutex_t g_arena_mu = PTHREAD_MUTEX_INITIALIZER;
inline Arena* g_free_arenas = nullptr;

// Race-check builds never pool: each block gets fresh mappings and a fresh dynamic shared buffer, so
// that TSan (which resets its history of memory on mmap/munmap and malloc/free) sees nothing of the
// previous block's threads there.
#if defined(CUDASIM_RACE_CHECK)
constexpr bool kPoolArenas = false;
#else
constexpr bool kPoolArenas = true;
#endif

CUDASIM_RT inline Arena* arena_acquire() {
  Arena* a = nullptr;
  if (kPoolArenas) {
    pthread_mutex_lock(&g_arena_mu);
    a = g_free_arenas;
    if (a) g_free_arenas = a->next_free;
    pthread_mutex_unlock(&g_arena_mu);
    if (a) return a;
  }
  a = new Arena();
  const size_t S = CUDASIM_STACK_SIZE, page = (size_t)sysconf(_SC_PAGESIZE);
  size_t total = S * 1024 + S;
  char* raw = (char*)mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) { delete a; return nullptr; }
  a->raw = raw;
  a->total = total;
  a->base = (char*)(((uintptr_t)raw + S - 1) & ~(uintptr_t)(S - 1));
  for (int i = 0; i < 1024; i++) {
    char* slot = a->base + (size_t)i * S;
    mprotect(slot, page, PROT_NONE);  // guard: an overflowing stack faults instead of corrupting its neighbour
    a->fibers[i] = (Fiber*)(slot + S - kHeader);
  }
  a->dyn = nullptr;
  a->dyn_size = 0;
  return a;
}
CUDASIM_RT inline void arena_release(Arena* a) {
  if (!kPoolArenas) {
    munmap(a->raw, a->total);
    free(a->dyn);
    delete a;
    return;
  }
  pthread_mutex_lock(&g_arena_mu);
  a->next_free = g_free_arenas;
  g_free_arenas = a;
  pthread_mutex_unlock(&g_arena_mu);
}

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

CUDASIM_RT inline void diagnose_deadlock(Block* b) {
  char m[1800];
  int bar = 0, warpw = 0, done = 0;
  Site bs, ws;
  int wop = -1;
  uint32_t wmask = 0;
  for (int i = 0; i < b->n; i++) {
    Fiber* f = b->fibers[i];
    if (f->state == BAR_WAIT) { bar++; bs = f->site; }
    else if (f->state == WARP_WAIT) {
      if (warpw++ == 0) { ws = f->site; wop = f->warp->op[f->lane]; wmask = f->warp->mask[f->lane]; }
    } else if (f->state == DONE) done++;
  }
  int n = snprintf(m, sizeof m, "cudasim: deadlock in block (%u,%u,%u) of %d threads: %d exited", b->bid.x, b->bid.y,
                   b->bid.z, b->n, done);
  if (bar) n += snprintf(m + n, sizeof m - n, ", %d wait at __syncthreads (%s:%u)", bar, bs.file, bs.line);
  if (warpw)
    snprintf(m + n, sizeof m - n, ", %d wait in warp collectives (e.g. %s mask 0x%08x at %s:%u)", warpw,
             warp_op_name(wop), wmask, ws.file, ws.line);
  set_error(b->L, m);
  b->error = true;
}

CUDASIM_RT inline void run_block(Launch* L, Arena* a, long long linear) {
  Block blk{};
  Block* b = &blk;
  b->L = L;
  b->bid = uint3{(unsigned)(linear % L->grid.x), (unsigned)((linear / L->grid.x) % L->grid.y),
                 (unsigned)(linear / ((long long)L->grid.x * L->grid.y))};
  const int n = (int)(L->block.x * L->block.y * L->block.z);
  b->n = b->live = n;
  b->fibers = a->fibers;
  b->warps = a->warps;
  b->dyn = a->dyn;
  const int nwarps = (n + 31) / 32;
  for (int w = 0; w < nwarps; w++) {
    a->warps[w].waiting = 0;
    int lanes = n - w * 32 < 32 ? n - w * 32 : 32;
    a->warps[w].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  }
  for (int i = 0; i < n; i++) {
    Fiber* f = a->fibers[i];
    f->tid = uint3{(unsigned)(i % L->block.x), (unsigned)((i / L->block.x) % L->block.y),
                   (unsigned)(i / (L->block.x * L->block.y))};
    f->bid = b->bid;
    f->bdim = L->block;
    f->gdim = L->grid;
    f->block = b;
    f->warp = &a->warps[i / 32];
    f->lin = i;
    f->lane = i % 32;
    f->state = RUNNABLE;
#if defined(CUDASIM_ASM_SWITCH)
    f->sp = init_stack((char*)f, f);
#else
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char* slot = (char*)f + kHeader - CUDASIM_STACK_SIZE;
    init_uc(f, slot + page, CUDASIM_STACK_SIZE - page - kHeader);
#endif
  }
#if defined(CUDASIM_RACE_CHECK)
  // This block's memory has no history: fresh stacks and dynamic shared memory (kPoolArenas), and
  // static __shared__ lives in the TLS of a fresh OS thread (run_launch), which TSan resets.
  b->rs = new RaceSync();
  b->sched_tsan = __tsan_get_current_fiber();
  // The module's thread-local block (static __shared__) is allocated and zeroed on first touch: let
  // the scheduler touch it, so that the kernel's first access does not race with that zeroing.
  tls_probe = 1;
  for (int i = 0; i < n; i++) {
    Fiber* f = a->fibers[i];
    f->tsan = __tsan_create_fiber(0);  // ordered after everything the host did before the launch
    char name[96];
    snprintf(name, sizeof name, "block (%u,%u,%u) thread (%u,%u,%u)", b->bid.x, b->bid.y, b->bid.z, f->tid.x, f->tid.y,
             f->tid.z);
    __tsan_set_fiber_name(f->tsan, name);
  }
#endif
  uint64_t rng = L->seed * 0x2545F4914F6CDD1Dull + (uint64_t)linear * 0x9E3779B97F4A7C15ull + 1;
  uint32_t* order = a->order;
  for (int i = 0; i < n; i++) order[i] = L->schedule == 1 ? (uint32_t)(n - 1 - i) : (uint32_t)i;
  while (b->live > 0 && !b->error) {
    if (L->schedule == 2)
      for (int i = n - 1; i > 0; i--) {
        int j = (int)(splitmix(rng) % (uint64_t)(i + 1));
        uint32_t t = order[i]; order[i] = order[j]; order[j] = t;
      }
    bool ran = false;
    for (int k = 0; k < n && !b->error; k++) {
      Fiber* f = a->fibers[order[k]];
      if (f->state == RUNNABLE) {
        ran = true;
        to_fiber(b, f);
      }
    }
    if (!ran && !b->error && b->live > 0) diagnose_deadlock(b);
  }
#if defined(CUDASIM_RACE_CHECK)
  // Keep the fibers until the launch ends (a report needs the other thread's name and stack), within
  // a bound on how many live TSan threads a launch may hold.
  if (L->n_dead + n > L->cap_dead) {
    long long cap = L->cap_dead ? L->cap_dead * 2 : 4096;
    while (cap < L->n_dead + n) cap *= 2;
    L->dead_fibers = (void**)realloc(L->dead_fibers, (size_t)cap * sizeof(void*));
    L->cap_dead = cap;
  }
  for (int i = 0; i < n; i++) L->dead_fibers[L->n_dead++] = a->fibers[i]->tsan;
  if (L->n_dead > 3072) {  // TSan (gcc 12) holds at most 8128 threads
    for (long long i = 0; i < L->n_dead; i++) __tsan_destroy_fiber(L->dead_fibers[i]);
    L->n_dead = 0;
  }
  delete b->rs;
#endif
}

CUDASIM_RT inline Arena* arena_for(Launch* L) {
  Arena* a = arena_acquire();
  if (!a) { set_error(L, "cudasim: cannot allocate fiber stacks (mmap failed)"); return nullptr; }
  if (a->dyn_size < L->smem || !a->dyn) {
    free(a->dyn);
    a->dyn_size = L->smem < 16 ? 16 : L->smem;
    a->dyn = (unsigned char*)aligned_alloc(128, (a->dyn_size + 127) / 128 * 128);
  }
  return a;
}

CUDASIM_RT inline void* worker_main(void* p) {
  Launch* L = (Launch*)p;
  Arena* a = arena_for(L);
  if (!a) return nullptr;
  const long long nblocks = (long long)L->grid.x * L->grid.y * L->grid.z;
  for (;;) {
    if (L->failed.load(std::memory_order_relaxed)) break;
    long long i = L->next.fetch_add(1);
    if (i >= nblocks) break;
    run_block(L, a, i);
  }
  arena_release(a);
  return nullptr;
}

struct OneBlock { Launch* L; long long i; };
CUDASIM_RT inline void* one_block_main(void* p) {
  OneBlock* o = (OneBlock*)p;
  Arena* a = arena_for(o->L);
  if (a) { run_block(o->L, a, o->i); arena_release(a); }
  return nullptr;
}

// cfg: gx gy gz bx by bz shared_mem schedule seed threads
CUDASIM_RT inline int run_launch(void (*entry)(void*), void* ctx, const long long* cfg, char* err, int errlen) {
  Launch L;
  L.entry = entry;
  L.ctx = ctx;
  L.grid = dim3((unsigned)cfg[0], (unsigned)cfg[1], (unsigned)cfg[2]);
  L.block = dim3((unsigned)cfg[3], (unsigned)cfg[4], (unsigned)cfg[5]);
  L.smem = (size_t)cfg[6];
  L.schedule = (int)cfg[7];
  L.seed = (uint64_t)cfg[8];
  L.err[0] = 0;
  long long nblocks = (long long)L.grid.x * L.grid.y * L.grid.z;
  long long nthreads = cfg[9] > 0 ? cfg[9] : 1;
  if (nthreads > nblocks) nthreads = nblocks;
  if (nthreads > 64) nthreads = 64;
#if defined(CUDASIM_RACE_CHECK)
  // One fresh OS thread per block, one after another. The host's create/join orders only the
  // schedulers (which never acquire from the kernel's threads), so blocks stay unordered for TSan.
  (void)nthreads;
  for (long long i = 0; i < nblocks && !L.failed.load(); i++) {
    OneBlock o{&L, i};
    pthread_t t;
    if (pthread_create(&t, nullptr, one_block_main, &o) != 0) { set_error(&L, "cudasim: cannot start a block thread"); break; }
    pthread_join(t, nullptr);
  }
  __tsan_acquire(&L.end_sync);
  for (long long i = 0; i < L.n_dead; i++) __tsan_destroy_fiber(L.dead_fibers[i]);
  free(L.dead_fibers);
#else
  pthread_t tids[64];
  int started = 0;
  for (long long t = 1; t < nthreads; t++)
    if (pthread_create(&tids[started], nullptr, worker_main, &L) == 0) started++;
  worker_main(&L);
  for (int t = 0; t < started; t++) pthread_join(tids[t], nullptr);
#endif
  if (L.failed.load()) {
    if (err && errlen > 0) snprintf(err, (size_t)errlen, "%s", L.err);
    return 1;
  }
  return 0;
}

template <class T>
inline std::remove_cv_t<T> read_arg(void* p) {
  std::remove_cv_t<T> v;
  memcpy((void*)&v, p, sizeof v);
  return v;
}

template <class... A, size_t... I>
inline int launch_impl(void (*k)(A...), void** args, const long long* cfg, char* err, int errlen,
                       std::index_sequence<I...>) {
  using Tup = std::tuple<std::remove_cv_t<A>...>;
  Tup tup{read_arg<A>(args[I])...};
  struct Ctx { void (*k)(A...); Tup* t; } c{k, &tup};
  auto entry = [](void* p) {
    Ctx* x = (Ctx*)p;
    x->k(std::get<I>(*x->t)...);
  };
  return run_launch(+entry, &c, cfg, err, errlen);
}
template <class... A>
inline int launch(void (*k)(A...), void** args, const long long* cfg, char* err, int errlen) {
  return launch_impl(k, args, cfg, err, errlen, std::index_sequence_for<A...>{});
}

}  // namespace cudasim

// ---------------------------------------------------------------------------------------------
// 9. Built-in variables and synchronisation
// ---------------------------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::cudasim::self()->tid))
#define blockIdx (static_cast<const uint3&>(::cudasim::self()->bid))
#define blockDim (static_cast<const dim3&>(::cudasim::self()->bdim))
#define gridDim (static_cast<const dim3&>(::cudasim::self()->gdim))
constexpr int warpSize = 32;

#define CUDASIM_SITE ::std::source_location loc = ::std::source_location::current()
#define CUDASIM_S ::cudasim::Site{loc.file_name(), (unsigned)loc.line(), (unsigned)loc.column()}

inline void __syncthreads(CUDASIM_SITE) { ::cudasim::block_barrier(1, CUDASIM_S); }
inline int __syncthreads_count(int p, CUDASIM_SITE) { return ::cudasim::block_barrier(p, CUDASIM_S); }
inline int __syncthreads_and(int p, CUDASIM_SITE) {
  return ::cudasim::block_barrier(p, CUDASIM_S) == ::cudasim::self()->block->n;
}
inline int __syncthreads_or(int p, CUDASIM_SITE) { return ::cudasim::block_barrier(p, CUDASIM_S) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu, CUDASIM_SITE) {
  ::cudasim::warp_op(mask, ::cudasim::W_SYNC, 0, 0, 32, CUDASIM_S);
}
// Approximation: the non-exited lanes of the warp (the CPU cannot see which lanes are converged).
inline unsigned __activemask() { return ::cudasim::self()->warp->live; }
inline unsigned __lanemask_lt() { return (1u << ::cudasim::self()->lane) - 1; }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, CUDASIM_SITE) {
  return ::cudasim::from_bits<T>(::cudasim::warp_op(mask, ::cudasim::W_SHFL, ::cudasim::to_bits(v), src, width, CUDASIM_S));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = warpSize, CUDASIM_SITE) {
  return ::cudasim::from_bits<T>(::cudasim::warp_op(mask, ::cudasim::W_UP, ::cudasim::to_bits(v), (int)d, width, CUDASIM_S));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = warpSize, CUDASIM_SITE) {
  return ::cudasim::from_bits<T>(::cudasim::warp_op(mask, ::cudasim::W_DOWN, ::cudasim::to_bits(v), (int)d, width, CUDASIM_S));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = warpSize, CUDASIM_SITE) {
  return ::cudasim::from_bits<T>(::cudasim::warp_op(mask, ::cudasim::W_XOR, ::cudasim::to_bits(v), lm, width, CUDASIM_S));
}
inline unsigned __ballot_sync(unsigned mask, int p, CUDASIM_SITE) {
  return (unsigned)::cudasim::warp_op(mask, ::cudasim::W_BALLOT, p != 0, 0, 32, CUDASIM_S);
}
inline int __any_sync(unsigned mask, int p, CUDASIM_SITE) {
  return ::cudasim::warp_op(mask, ::cudasim::W_BALLOT, p != 0, 0, 32, CUDASIM_S) != 0;
}
inline int __all_sync(unsigned mask, int p, CUDASIM_SITE) {
  return (int)::cudasim::warp_op(mask, ::cudasim::W_ALL, p != 0, 0, 32, CUDASIM_S);
}
inline int __uni_sync(unsigned mask, int p, CUDASIM_SITE) {
  unsigned b = (unsigned)::cudasim::warp_op(mask, ::cudasim::W_BALLOT, p != 0, 0, 32, CUDASIM_S);
  return b == 0 || b == (mask & ::cudasim::self()->warp->live);
}
#define CUDASIM_REDUCE(name, OP, T, SIGNED)                                                              \
  inline T name(unsigned mask, T v, CUDASIM_SITE) {                                                      \
    return (T)(uint32_t)::cudasim::warp_op(mask, ::cudasim::OP, (uint32_t)v, SIGNED, 32, CUDASIM_S);     \
  }
CUDASIM_REDUCE(__reduce_add_sync, W_RADD, unsigned, 0)
CUDASIM_REDUCE(__reduce_add_sync, W_RADD, int, 1)
CUDASIM_REDUCE(__reduce_min_sync, W_RMIN, unsigned, 0)
CUDASIM_REDUCE(__reduce_min_sync, W_RMIN, int, 1)
CUDASIM_REDUCE(__reduce_max_sync, W_RMAX, unsigned, 0)
CUDASIM_REDUCE(__reduce_max_sync, W_RMAX, int, 1)
CUDASIM_REDUCE(__reduce_and_sync, W_RAND, unsigned, 0)
CUDASIM_REDUCE(__reduce_or_sync, W_ROR, unsigned, 0)
CUDASIM_REDUCE(__reduce_xor_sync, W_RXOR, unsigned, 0)
#undef CUDASIM_REDUCE
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v, CUDASIM_SITE) {
  return (unsigned)::cudasim::warp_op(mask, ::cudasim::W_MATCH_ANY, ::cudasim::to_bits(v), 0, 32, CUDASIM_S);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T v, int* pred, CUDASIM_SITE) {
  unsigned r = (unsigned)::cudasim::warp_op(mask, ::cudasim::W_MATCH_ALL, ::cudasim::to_bits(v), 0, 32, CUDASIM_S);
  *pred = r != 0;
  return r;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// Lets other threads of the block run, so spin-waits on shared memory make progress.
inline void __nanosleep(unsigned) { ::cudasim::yield_now(::cudasim::self()); }
inline long long clock64() {
  static std::atomic<long long> c{0};
  return c.fetch_add(1, std::memory_order_relaxed);
}
[[noreturn]] inline void __trap() { ::cudasim::abort_block("__trap() called"); }
[[noreturn]] inline void __cudasim_assert_fail(const char* e, const char* file, int line) {
  char m[512];
  snprintf(m, sizeof m, "device-side assertion `%s` failed at %s:%d", e, file, line);
  ::cudasim::abort_block(m);
}
#include <assert.h>
#undef assert
#define assert(e) ((e) ? (void)0 : __cudasim_assert_fail(#e, __FILE__, __LINE__))

// ---------------------------------------------------------------------------------------------
// 10. Loads/stores, bit tricks, integer and float intrinsics
// ---------------------------------------------------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  uint64_t v = ((uint64_t)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned sh) {
  return (unsigned)(((((uint64_t)hi << 32) | lo) << (sh & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
  return (unsigned)((((uint64_t)hi << 32) | lo) >> (sh & 31));
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }

inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline int __float_as_int(float f) { return __builtin_bit_cast(int, f); }
inline float __int_as_float(int i) { return __builtin_bit_cast(float, i); }
inline long long __double_as_longlong(double d) { return __builtin_bit_cast(long long, d); }
inline double __longlong_as_double(long long l) { return __builtin_bit_cast(double, l); }

// min/max: one template instead of CUDA's overload set (avoids ambiguity for mixed types).
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline auto min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return (C)fmin((double)a, (double)b);
  else return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline auto max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return (C)fmax((double)a, (double)b);
  else return (C)a < (C)b ? (C)b : (C)a;
}
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x != x ? 0.f : x)); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __ull2float_rn(unsigned long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline int __double2int_rz(double x) { return (int)x; }

// ---------------------------------------------------------------------------------------------
// 11. Atomics on global or shared memory (std::atomic_ref; CAS loops where no fetch op exists)
// ---------------------------------------------------------------------------------------------
namespace cudasim {
template <class T> using aref = std::atomic_ref<T>;
template <class T, class F>
inline T cas_loop(T* p, F f) {
  aref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {}
  return old;
}
}  // namespace cudasim
#define CUDASIM_ATOMIC_INT(T)                                                                                  \
  inline T atomicAdd(T* p, T v) { return ::cudasim::aref<T>(*p).fetch_add(v, std::memory_order_relaxed); }    \
  inline T atomicSub(T* p, T v) { return ::cudasim::aref<T>(*p).fetch_sub(v, std::memory_order_relaxed); }    \
  inline T atomicOr(T* p, T v) { return ::cudasim::aref<T>(*p).fetch_or(v, std::memory_order_relaxed); }      \
  inline T atomicAnd(T* p, T v) { return ::cudasim::aref<T>(*p).fetch_and(v, std::memory_order_relaxed); }    \
  inline T atomicXor(T* p, T v) { return ::cudasim::aref<T>(*p).fetch_xor(v, std::memory_order_relaxed); }    \
  inline T atomicExch(T* p, T v) { return ::cudasim::aref<T>(*p).exchange(v, std::memory_order_relaxed); }    \
  inline T atomicMax(T* p, T v) { return ::cudasim::cas_loop(p, [v](T o) { return o < v ? v : o; }); }        \
  inline T atomicMin(T* p, T v) { return ::cudasim::cas_loop(p, [v](T o) { return v < o ? v : o; }); }        \
  inline T atomicCAS(T* p, T cmp, T v) {                                                                       \
    ::cudasim::aref<T>(*p).compare_exchange_strong(cmp, v, std::memory_order_relaxed);                         \
    return cmp;                                                                                                \
  }
CUDASIM_ATOMIC_INT(int)
CUDASIM_ATOMIC_INT(unsigned int)
CUDASIM_ATOMIC_INT(unsigned long long)
CUDASIM_ATOMIC_INT(long long)
#undef CUDASIM_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
  ::cudasim::aref<unsigned short>(*p).compare_exchange_strong(cmp, v, std::memory_order_relaxed);
  return cmp;
}
inline float atomicAdd(float* p, float v) { return ::cudasim::cas_loop(p, [v](float o) { return o + v; }); }
inline double atomicAdd(double* p, double v) { return ::cudasim::cas_loop(p, [v](double o) { return o + v; }); }
inline float atomicExch(float* p, float v) { return ::cudasim::aref<float>(*p).exchange(v); }
inline float atomicMax(float* p, float v) { return ::cudasim::cas_loop(p, [v](float o) { return fmaxf(o, v); }); }
inline float atomicMin(float* p, float v) { return ::cudasim::cas_loop(p, [v](float o) { return fminf(o, v); }); }
inline unsigned atomicInc(unsigned* p, unsigned lim) {
  return ::cudasim::cas_loop(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
  return ::cudasim::cas_loop(p, [lim](unsigned o) { return (o == 0 || o > lim) ? lim : o - 1; });
}
#define CUDASIM_SCOPED(name)                                                      \
  template <class... X> inline auto name##_block(X... x) { return name(x...); }   \
  template <class... X> inline auto name##_system(X... x) { return name(x...); }
CUDASIM_SCOPED(atomicAdd) CUDASIM_SCOPED(atomicSub) CUDASIM_SCOPED(atomicMax) CUDASIM_SCOPED(atomicMin)
CUDASIM_SCOPED(atomicOr) CUDASIM_SCOPED(atomicAnd) CUDASIM_SCOPED(atomicXor) CUDASIM_SCOPED(atomicExch)
CUDASIM_SCOPED(atomicCAS)
#undef CUDASIM_SCOPED

// ---------------------------------------------------------------------------------------------
// 12. __half (on _Float16: IEEE binary16, conversions round to nearest even) and __nv_bfloat16
//     (a struct on its uint16 bits; converts implicitly to/from float, arithmetic happens in float).
// ---------------------------------------------------------------------------------------------
typedef _Float16 __half;
typedef _Float16 half;
struct __half2 { __half x, y; };
typedef __half2 half2;
struct __half_raw { unsigned short x; };
inline float __half2float(__half h) { return (float)h; }
inline __half __float2half(float f) { return (__half)f; }
inline __half __float2half_rn(float f) { return (__half)f; }
inline __half __double2half(double d) { return (__half)(float)d; }
inline __half __int2half_rn(int i) { return (__half)(float)i; }
inline int __half2int_rn(__half h) { return (int)nearbyintf((float)h); }
inline int __half2int_rz(__half h) { return (int)(float)h; }
inline unsigned short __half_as_ushort(__half h) { return __builtin_bit_cast(unsigned short, h); }
inline short __half_as_short(__half h) { return __builtin_bit_cast(short, h); }
inline __half __ushort_as_half(unsigned short u) { return __builtin_bit_cast(__half, u); }
inline __half __short_as_half(short u) { return __builtin_bit_cast(__half, u); }
inline __half __hadd(__half a, __half b) { return (__half)((float)a + (float)b); }
inline __half __hsub(__half a, __half b) { return (__half)((float)a - (float)b); }
inline __half __hmul(__half a, __half b) { return (__half)((float)a * (float)b); }
inline __half __hdiv(__half a, __half b) { return (__half)((float)a / (float)b); }
inline __half __hfma(__half a, __half b, __half c) { return (__half)fmaf((float)a, (float)b, (float)c); }
inline __half __hneg(__half a) { return (__half)(-(float)a); }
inline __half __habs(__half a) { return __ushort_as_half(__half_as_ushort(a) & 0x7fff); }
inline __half __hmax(__half a, __half b) { return (__half)fmaxf((float)a, (float)b); }
inline __half __hmin(__half a, __half b) { return (__half)fminf((float)a, (float)b); }
inline bool __hlt(__half a, __half b) { return (float)a < (float)b; }
inline bool __hle(__half a, __half b) { return (float)a <= (float)b; }
inline bool __hgt(__half a, __half b) { return (float)a > (float)b; }
inline bool __hge(__half a, __half b) { return (float)a >= (float)b; }
inline bool __heq(__half a, __half b) { return (float)a == (float)b; }
inline bool __hne(__half a, __half b) { return (float)a != (float)b; }
inline bool __hisnan(__half a) { return (float)a != (float)a; }
inline int __hisinf(__half a) { float f = a; return isinf(f) ? (f > 0 ? 1 : -1) : 0; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __float2half2_rn(float f) { return __half2{(__half)f, (__half)f}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{(__half)a, (__half)b}; }
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }
inline float2 __half22float2(__half2 h) { return float2{(float)h.x, (float)h.y}; }

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {  // round to nearest even; NaN stays a quiet NaN
    unsigned u = __builtin_bit_cast(unsigned, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) __x = (unsigned short)((u >> 16) | 0x40);
    else __x = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
  __nv_bfloat16(double d) : __nv_bfloat16((float)d) {}
  __nv_bfloat16(int i) : __nv_bfloat16((float)i) {}
  operator float() const { return __builtin_bit_cast(float, (unsigned)__x << 16); }
};
typedef __nv_bfloat16 nv_bfloat16;
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __nv_bfloat162 nv_bfloat162;
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
  __nv_bfloat16 r;
  r.__x = (unsigned short)(__builtin_bit_cast(unsigned, f) >> 16);
  return r;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return (short)b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 r; r.__x = u; return r; }
inline __nv_bfloat16 __short_as_bfloat16(short u) { __nv_bfloat16 r; r.__x = (unsigned short)u; return r; }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return (float)a + (float)b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return (float)a * (float)b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return (float)a - (float)b; }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return fmaxf((float)a, (float)b); }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return fminf((float)a, (float)b); }
inline bool __hisnan(__nv_bfloat16 a) { return (a.__x & 0x7fff) > 0x7f80; }

// ---------------------------------------------------------------------------------------------
// 13. Kernel signature descriptors: the loader checks Python arguments against the parameter types
//     the compiler deduced from the kernel's function pointer. One line per parameter:
//     "<kind> <code> <const> <size> <C type name>", kind s=scalar p=pointer x=other by value.
// ---------------------------------------------------------------------------------------------
namespace cudasim {
template <class T> struct tcode { static constexpr const char* c = nullptr; static constexpr const char* n = nullptr; };
#define CUDASIM_TC(T, C, N) template <> struct tcode<T> { static constexpr const char* c = C; static constexpr const char* n = N; };
CUDASIM_TC(bool, "b", "bool")
CUDASIM_TC(char, std::is_signed_v<char> ? "i8" : "u8", "char")
CUDASIM_TC(signed char, "i8", "signed char")
CUDASIM_TC(unsigned char, "u8", "unsigned char")
CUDASIM_TC(short, "i16", "short")
CUDASIM_TC(unsigned short, "u16", "unsigned short")
CUDASIM_TC(int, "i32", "int")
CUDASIM_TC(unsigned int, "u32", "unsigned int")
CUDASIM_TC(long, "i64", "long")
CUDASIM_TC(unsigned long, "u64", "unsigned long")
CUDASIM_TC(long long, "i64", "long long")
CUDASIM_TC(unsigned long long, "u64", "unsigned long long")
CUDASIM_TC(float, "f32", "float")
CUDASIM_TC(double, "f64", "double")
CUDASIM_TC(_Float16, "f16", "__half")
CUDASIM_TC(__nv_bfloat16, "bf16", "__nv_bfloat16")
CUDASIM_TC(void, "void", "void")
CUDASIM_TC(float2, "f32x2", "float2")
CUDASIM_TC(float4, "f32x4", "float4")
CUDASIM_TC(int2, "i32x2", "int2")
CUDASIM_TC(int4, "i32x4", "int4")
CUDASIM_TC(uint2, "u32x2", "uint2")
CUDASIM_TC(uint4, "u32x4", "uint4")
CUDASIM_TC(double2, "f64x2", "double2")
CUDASIM_TC(__half2, "f16x2", "__half2")
CUDASIM_TC(__nv_bfloat162, "bf16x2", "__nv_bfloat162")
#undef CUDASIM_TC

template <class T>
constexpr const char* pretty() {
  return __PRETTY_FUNCTION__;  // "... [with T = <name>]"
}
template <class T>
inline int type_name(char* out, size_t n) {
  const char* p = pretty<T>();
  const char* s = strstr(p, "T = ");
  if (!s) return snprintf(out, n, "?");
  s += 4;
  const char* e = s;
  int depth = 0;
  while (*e && !(depth == 0 && (*e == ';' || *e == ']'))) {
    if (*e == '<' || *e == '(' || *e == '[') depth++;
    if (*e == '>' || *e == ')') depth--;
    e++;
  }
  return snprintf(out, n, "%.*s", (int)(e - s), s);
}

template <class P>
inline void describe_param(char*& o, char* end) {
  using T = std::remove_cv_t<P>;
  char nm[256];
  if constexpr (std::is_pointer_v<T>) {
    using E = std::remove_pointer_t<T>;
    using B = std::remove_cv_t<E>;
    using U = std::conditional_t<std::is_enum_v<B>, std::underlying_type<B>, std::type_identity<B>>::type;
    const char* c = tcode<U>::c;
    bool cst = std::is_const_v<E>;
    if (tcode<U>::n) snprintf(nm, sizeof nm, "%s%s*", cst ? "const " : "", tcode<U>::n);
    else type_name<T>(nm, sizeof nm);
    size_t sz = 0;
    if constexpr (!std::is_void_v<B>) sz = sizeof(B);
    o += snprintf(o, end - o, "p %s %d %zu %s\n", c ? c : "x", cst ? 1 : 0, sz, nm);
  } else {
    using U = std::conditional_t<std::is_enum_v<T>, std::underlying_type<T>, std::type_identity<T>>::type;
    const char* c = tcode<U>::c;
    bool scalar = c && (std::is_arithmetic_v<U> || std::is_same_v<U, __nv_bfloat16>);
    if (tcode<U>::n) snprintf(nm, sizeof nm, "%s", tcode<U>::n);
    else type_name<T>(nm, sizeof nm);
    o += snprintf(o, end - o, "%s %s 0 %zu %s\n", scalar ? "s" : "x", c ? c : "x", sizeof(T), nm);
  }
}

template <class... A>
inline const char* signature(void (*)(A...)) {
  static char buf[8192];
  static std::atomic<int> done{0};
  if (!done.load()) {
    char* o = buf;
    char* end = buf + sizeof buf;
    (describe_param<A>(o, end), ...);
    *o = 0;
    done.store(1);
  }
  return buf;
}
}  // namespace cudasim

#define CUDASIM_DYN_SMEM(T) (reinterpret_cast<T*>(::cudasim::self()->block->dyn))

// ---------------------------------------------------------------------------------------------
// 14. wmma (nvcuda::wmma), 16x16x16 tiles: a fragment is spread over the warp as on a GPU, each lane
//     holding 8 elements (element e of lane l is tile entry e*32 + l, row-major; a GPU's map is
//     unspecified, so only elementwise loops over x[0..num_elements) are portable). Loads and stores
//     touch only the lane's own entries and order nothing, so shared memory written by other lanes
//     needs a __syncwarp/__syncthreads first, as on a GPU, and the race check sees it when missing.
//     mma_sync is a warp collective (all 32 lanes); fp32 accumulation in k order. Checked like the
//     GPU's: 256-bit aligned pointers, ldm a multiple of 16 bytes.
// ---------------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cudasim wmma: only 16x16x16 tiles");
  static constexpr int num_elements = 8;
  T x[num_elements];
};
namespace detail {
template <class P>
inline void check(const P* p, unsigned ldm, const char* what) {
  if (((uintptr_t)p & 31) || ((size_t)ldm * sizeof(P)) % 16)
    ::cudasim::abort_block(what);
}
inline int row(int e) { return (e * 32 + (int)::cudasim::self()->lane) / 16; }
inline int col(int e) { return (e * 32 + (int)::cudasim::self()->lane) % 16; }
inline size_t at(int e, unsigned ldm, bool row_major) {
  return row_major ? (size_t)row(e) * ldm + col(e) : (size_t)col(e) * ldm + row(e);
}
}  // namespace detail
template <class U, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<U, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; i++) f.x[i] = (T)v;
}
template <class U, int M, int N, int K, class T, class L, class P>
inline void load_matrix_sync(fragment<U, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_void_v<L>, "load_matrix_sync without a layout needs a matrix_a/matrix_b fragment");
  detail::check(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
  for (int e = 0; e < 8; e++) f.x[e] = p[detail::at(e, ldm, std::is_same_v<L, row_major>)];
}
template <int M, int N, int K, class T, class P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const P* p, unsigned ldm, layout_t l) {
  detail::check(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
  for (int e = 0; e < 8; e++) f.x[e] = (T)p[detail::at(e, ldm, l == mem_row_major)];
}
template <int M, int N, int K, class T, class P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t l) {
  detail::check(p, ldm, "wmma::store_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
  for (int e = 0; e < 8; e++) p[detail::at(e, ldm, l == mem_row_major)] = (P)f.x[e];
}
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC, class TD>
inline void mma_sync(fragment<accumulator, M, N, K, TD, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c,
                     CUDASIM_SITE) {
  ::cudasim::MmaLane ln;
  for (int e = 0; e < 8; e++) {
    ln.a[e] = (float)a.x[e];
    ln.b[e] = (float)b.x[e];
    ln.c[e] = (float)c.x[e];
  }
  if (::cudasim::warp_op(0xffffffffu, ::cudasim::W_MMA, (uint64_t)(uintptr_t)&ln, 0, 32, CUDASIM_S))
    ::cudasim::abort_block("wmma::mma_sync: every lane of the warp must take part (some lanes exited)");
  for (int e = 0; e < 8; e++) d.x[e] = (TD)ln.d[e];
}
}  // namespace wmma
}  // namespace nvcuda
