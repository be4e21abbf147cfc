// The Metal-on-CPU runner: executes a dispatch of a compiled shader kernel with Metal's execution model.
//
// Each threadgroup runs on one OS thread, its threads as fibers (boost.context), each fiber running until it
// blocks at a threadgroup barrier or a SIMD-group operation. When every thread of the group is blocked or
// finished, SIMD-group operations are resolved (lanes of one SIMD-group that reached the same call site take
// part; the others are inactive), then barriers (all remaining threads must wait at the same barrier).
//
// The checker (the instrumented build: -fsanitize-coverage=func,trace-loads,trace-stores on the shader code
// only) sees every load and store of the kernels: it counts the bytes moved from and to each device buffer,
// reports accesses outside a bound buffer, and keeps a shadow of threadgroup memory (last writer, readers,
// barrier epoch, initialised) to report races between barriers and reads of uninitialised memory.
#include <dlfcn.h>
#include <sys/mman.h>

#include <boost/context/detail/fcontext.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "tmf_emu/emu_encoder.h"
#include "tmf_emu/runtime_api.h"

namespace bctx = boost::context::detail;

namespace tmf_emu {
namespace {

constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;
constexpr size_t kThreadgroupMemoryLimit = 32 * 1024;
constexpr size_t kThreadgroupArena = 256 * 1024;  // room to keep running (and report) past the limit
constexpr size_t kFiberStack = 128 * 1024;
constexpr size_t kDeviceGuard = 4096;  // accesses this close outside every bound buffer are out of bounds
constexpr size_t kMaxErrors = 64;

struct KernelEntry {
  KernelInvoker invoker;
  const Binding* bindings;
  size_t count;
  std::string file;
  int line;
};

std::map<std::string, KernelEntry>& registry() {
  static auto* r = new std::map<std::string, KernelEntry>();  // never destroyed: safe at exit
  return *r;
}

enum class Wait { none, barrier, simd };

struct Thread {
  uint32_t tid[3];
  uint32_t index;  // thread_index_in_threadgroup
  bctx::fcontext_t ctx = nullptr;
  bool started = false, done = false;
  Wait wait = Wait::none;
  const char* file = nullptr;
  int line = 0;
  SimdResolver resolver = nullptr;
  SimdOp op = SimdOp::none;
  LaneIO io;
};

struct Shadow {
  int16_t writer = -1, reader = -1;  // reader -2: several readers
  uint32_t write_epoch = 0, read_epoch = 0;
  bool init = false;
};

struct Run {
  // dispatch
  const KernelEntry* kernel = nullptr;
  const EmuEncoder* enc = nullptr;
  uint32_t groups[3], threads[3], group[3];
  uint32_t nthreads = 0;
  // threadgroup
  std::vector<Thread> th;
  Thread* current = nullptr;
  bctx::fcontext_t scheduler = nullptr;
  unsigned char* arena = nullptr;
  size_t arena_used = 0;
  std::unordered_map<uint64_t, size_t> locals;
  std::vector<size_t> tg_args;  // arena offsets of [[threadgroup(n)]] arguments
  Shadow* shadow = nullptr;  // one granule per 2 bytes of the arena
  uint32_t epoch = 1;
  bool aborted = false;
  bool tg_over_limit_reported = false;
  // report
  DispatchReport* report = nullptr;
  char* stacks = nullptr;
  // buffers as the kernel sees them: the tensors themselves, or (checking) private copies with guard zones
  std::map<int, BoundBuffer> view;
};

Run* g_run = nullptr;         // the dispatch in progress (one at a time: dispatches are serialised)
// How much of the threadgroup arena (bytes) the previous threadgroups may have written, so each threadgroup
// re-poisons and resets the shadow of that much rather than the whole arena. A 4 KiB margin covers the
// out-of-bounds stores the checker reports (they still land in the arena).
constexpr size_t kArenaDirtyMargin = 4096;
size_t g_arena_dirty = kThreadgroupArena;
size_t g_shadow_dirty = kThreadgroupArena;
std::mutex g_dispatch_mutex;  // serialises dispatches from several Python threads
bool g_checking = false;      // set while an instrumented kernel runs

void add_error(const char* kind, const char* file, int line, uintptr_t pc, const std::string& message) {
  DispatchReport* r = g_run->report;
  for (auto& e : r->errors)
    if (e.kind == kind && e.line == line && e.pc == pc && e.file == (file ? file : "")) {
      ++e.count;
      return;
    }
  if (r->errors.size() >= kMaxErrors) return;
  r->errors.push_back(ErrorRecord{kind, file ? file : "", line, pc, message, 1});
}

void yield_to_scheduler() {
  Run* r = g_run;
  bctx::transfer_t t = bctx::jump_fcontext(r->scheduler, nullptr);
  r->scheduler = t.fctx;
}

void fiber_main(bctx::transfer_t t) {
  Run* r = g_run;
  r->scheduler = t.fctx;
  Thread* self = r->current;
  r->kernel->invoker(r->kernel->bindings);
  self->done = true;
  bctx::jump_fcontext(r->scheduler, nullptr);
  std::abort();  // unreachable: a finished fiber is never resumed
}

void resume(Thread& t) {
  Run* r = g_run;
  r->current = &t;
  if (!t.started) {
    t.started = true;
    char* stack_top = r->stacks + (size_t(t.index) + 1) * kFiberStack;
    t.ctx = bctx::make_fcontext(stack_top, kFiberStack, &fiber_main);
  }
  bctx::transfer_t back = bctx::jump_fcontext(t.ctx, nullptr);
  t.ctx = back.fctx;
  r->current = nullptr;
}

std::string site(const char* file, int line) { return std::string(file ? file : "?") + ":" + std::to_string(line); }

// Resolves SIMD-group operations; returns true if any lane was released.
bool resolve_simd_ops(Run& r) {
  bool any = false;
  uint32_t nsimd = (r.nthreads + kSimdWidth - 1) / kSimdWidth;
  for (uint32_t s = 0; s < nsimd; ++s) {
    Thread* lead = nullptr;
    uint32_t base = s * kSimdWidth;
    uint32_t lanes = std::min<uint32_t>(kSimdWidth, r.nthreads - base);
    for (uint32_t l = 0; l < lanes; ++l)
      if (r.th[base + l].wait == Wait::simd) {
        lead = &r.th[base + l];
        break;
      }
    if (!lead) continue;
    uint32_t active = 0;
    LaneIO io[kSimdWidth];
    for (uint32_t l = 0; l < lanes; ++l) {
      Thread& t = r.th[base + l];
      if (t.wait == Wait::simd && t.line == lead->line && t.file == lead->file) {
        if (t.op != lead->op) {
          add_error("simd-mismatch", t.file, t.line, 0, "lanes reached one call site with different SIMD ops");
        }
        active |= 1u << l;
        io[l] = t.io;
      }
    }
    uint32_t bad = lead->resolver ? lead->resolver(lead->op, io, active) : 0;
    if (bad && g_checking)
      add_error("simd-inactive-lane", lead->file, lead->line, 0,
                "a SIMD shuffle/broadcast read a lane that is not active (undefined on Apple GPUs)");
    for (uint32_t l = 0; l < lanes; ++l)
      if (active >> l & 1u) {
        Thread& t = r.th[base + l];
        std::memcpy(t.io.out, io[l].out, kMaxSimdValueBytes);
        t.wait = Wait::none;
      }
    any = true;
  }
  return any;
}

// Releases a barrier when every unfinished thread waits at the same one; reports misuse otherwise.
bool resolve_barrier(Run& r) {
  Thread* first = nullptr;
  uint32_t waiting = 0, finished = 0;
  for (auto& t : r.th) {
    if (t.done) {
      ++finished;
      continue;
    }
    if (t.wait != Wait::barrier) continue;
    ++waiting;
    if (!first) first = &t;
    else if (t.line != first->line || t.file != first->file) {
      add_error("divergent-barrier", t.file, t.line, 0,
                "threads of one threadgroup wait at different barriers (" + site(first->file, first->line) +
                    " and " + site(t.file, t.line) + "): a barrier inside divergent control flow");
      r.aborted = true;
      return false;
    }
  }
  if (!first) return false;
  if (finished) {
    add_error("barrier-not-reached", first->file, first->line, 0,
              std::to_string(finished) + " thread(s) of the threadgroup exited without reaching this barrier "
              "(a hang or undefined behaviour on the GPU)");
    r.aborted = true;
    return false;
  }
  for (auto& t : r.th) t.wait = Wait::none;
  ++r.epoch;
  return true;
}

void run_threadgroup(Run& r) {
  r.th.assign(r.nthreads, Thread{});
  uint32_t i = 0;
  for (uint32_t z = 0; z < r.threads[2]; ++z)
    for (uint32_t y = 0; y < r.threads[1]; ++y)
      for (uint32_t x = 0; x < r.threads[0]; ++x, ++i) {
        r.th[i].tid[0] = x, r.th[i].tid[1] = y, r.th[i].tid[2] = z;
        r.th[i].index = i;
      }
  r.arena_used = 0;
  r.locals.clear();
  r.epoch = 1;
  // [[threadgroup(n)]] arguments, sized by the host's setThreadgroupMemoryLength.
  r.tg_args.assign(r.enc->threadgroup_memory.size(), 0);
  for (auto& [index, bytes] : r.enc->threadgroup_memory) {
    if (size_t(index) >= r.tg_args.size()) r.tg_args.resize(index + 1);
    r.tg_args[index] = r.arena_used;
    r.arena_used += (bytes + 15) & ~size_t(15);
  }
  std::memset(r.arena, 0xFF, g_arena_dirty);  // poison: uninitialised reads show up as NaN
  if (g_checking) {
    std::fill(r.shadow, r.shadow + (g_shadow_dirty + 1) / 2, Shadow{});
    g_shadow_dirty = 0;
  }

  for (;;) {
    for (auto& t : r.th)
      if (!t.done && t.wait == Wait::none) resume(t);
    bool all_done = true;
    for (auto& t : r.th) all_done = all_done && t.done;
    if (all_done) return;
    if (resolve_simd_ops(r)) continue;
    if (resolve_barrier(r)) continue;
    // Nothing can proceed: a barrier error (reported by resolve_barrier) or a deadlock.
    if (!r.aborted) add_error("deadlock", nullptr, 0, 0, "threads blocked with no way to proceed");
    r.aborted = true;
    return;
  }
}

Thread& current_thread() {
  if (!g_run || !g_run->current) {
    std::fprintf(stderr, "tmf_emu: a Metal builtin was called outside a kernel dispatch\n");
    std::abort();
  }
  return *g_run->current;
}

// ---- memory checker ---------------------------------------------------------------------------------
struct BufferRange {
  uintptr_t lo, hi;  // the bound range [buffer start + offset, buffer end)
  int index;
  bool counted;  // device buffers count towards traffic; setBytes arguments do not
};
std::vector<BufferRange> g_ranges;

uintptr_t module_offset(void* pc) {
  Dl_info info;
  if (dladdr(pc, &info) && info.dli_fbase) return uintptr_t(pc) - uintptr_t(info.dli_fbase);
  return uintptr_t(pc);
}

void on_access(uintptr_t addr, size_t size, bool store, void* pc) {
  if (!g_checking || !g_run || !g_run->current) return;
  Run& r = *g_run;
  uintptr_t arena = uintptr_t(r.arena);
  if (addr >= arena && addr < arena + kThreadgroupArena) {
    size_t off = addr - arena;
    if (off + size > r.arena_used) {
      add_error("threadgroup-out-of-bounds", nullptr, 0, module_offset(pc),
                "threadgroup memory access past the allocated threadgroup storage");
      return;
    }
    int16_t me = int16_t(r.current->index);
    for (size_t g = off / 2; g < (off + size + 1) / 2; ++g) {
      Shadow& s = r.shadow[g];
      if (store) {
        if (s.write_epoch == r.epoch && s.writer != me)
          add_error("threadgroup-race", nullptr, 0, module_offset(pc),
                    "write-write race on threadgroup memory between barriers (threads " +
                        std::to_string(s.writer) + " and " + std::to_string(me) + ")");
        else if (s.read_epoch == r.epoch && s.reader != -1 && s.reader != me)
          add_error("threadgroup-race", nullptr, 0, module_offset(pc),
                    "read-write race on threadgroup memory between barriers: written by thread " +
                        std::to_string(me) + " after another thread read it");
        s.writer = me, s.write_epoch = r.epoch, s.init = true;
      } else {
        if (!s.init) {
          add_error("uninitialised-read", nullptr, 0, module_offset(pc),
                    "read of threadgroup memory that no thread has written");
          s.init = true;  // report once per location
        } else if (s.write_epoch == r.epoch && s.writer != me) {
          add_error("threadgroup-race", nullptr, 0, module_offset(pc),
                    "read-after-write race on threadgroup memory without a barrier between (written by thread " +
                        std::to_string(s.writer) + ", read by thread " + std::to_string(me) + ")");
        }
        if (s.read_epoch != r.epoch) s.reader = me, s.read_epoch = r.epoch;
        else if (s.reader != me) s.reader = -2;
      }
    }
    return;
  }
  uintptr_t stacks = uintptr_t(r.stacks);
  if (addr >= stacks && addr < stacks + kFiberStack * kMaxThreadsPerThreadgroup) return;  // thread-private
  for (const auto& b : g_ranges) {
    if (addr >= b.lo && addr + size <= b.hi) {
      if (b.counted) {
        auto& t = r.report->traffic[b.index];
        (store ? t.bytes_written : t.bytes_read) += size;
      }
      return;
    }
  }
  // Not inside any bound buffer: an access just before or after one is out of bounds.
  for (const auto& b : g_ranges) {
    if (addr + size > b.lo - std::min<uintptr_t>(b.lo, kDeviceGuard) && addr < b.hi + kDeviceGuard) {
      add_error("device-out-of-bounds", nullptr, 0, module_offset(pc),
                std::string(store ? "store " : "load ") + std::to_string(size) + " bytes at offset " +
                    std::to_string(int64_t(addr - b.lo)) + " of buffer(" + std::to_string(b.index) + "), which holds " +
                    std::to_string(b.hi - b.lo) + " bytes from its bind offset");
      return;
    }
  }
}

}  // namespace

// ---- the interface used by compiled shaders -----------------------------------------------------------
void simd_rendezvous(SimdResolver resolver, SimdOp op, const void* in, void* out, size_t size, uint32_t arg,
                     const char* file, int line) {
  Thread& t = current_thread();
  std::memcpy(t.io.in, in, size);
  t.io.arg = arg;
  t.resolver = resolver;
  t.op = op;
  t.file = file, t.line = line;
  t.wait = Wait::simd;
  yield_to_scheduler();
  std::memcpy(out, t.io.out, size);
}

void barrier(const char* file, int line) {
  Thread& t = current_thread();
  t.file = file, t.line = line;
  t.wait = Wait::barrier;
  yield_to_scheduler();
}

void* threadgroup_local(uint64_t site, size_t bytes, const char* file, int line) {
  Run& r = *g_run;
  auto it = r.locals.find(site);
  if (it == r.locals.end()) {
    size_t off = r.arena_used;
    r.arena_used += (bytes + 15) & ~size_t(15);
    if (r.arena_used > kThreadgroupArena) {
      std::fprintf(stderr, "tmf_emu: threadgroup memory exceeds the runner's arena\n");
      std::abort();
    }
    it = r.locals.emplace(site, off).first;
  }
  if (r.arena_used > kThreadgroupMemoryLimit && !r.tg_over_limit_reported) {
    r.tg_over_limit_reported = true;
    add_error("threadgroup-memory-limit", file, line, 0,
              "threadgroup memory " + std::to_string(r.arena_used) + " bytes exceeds Apple GPUs' 32 KiB");
  }
  return r.arena + it->second;
}

void* buffer_address(int index, size_t min_bytes) {
  const auto& view = g_run->view;
  auto it = view.find(index);
  if (it == view.end()) {
    std::fprintf(stderr, "tmf_emu: kernel reads buffer(%d), which the host did not bind\n", index);
    std::abort();
  }
  if (min_bytes && it->second.size() < min_bytes) {
    std::fprintf(stderr, "tmf_emu: buffer(%d) holds %zu bytes, the kernel's argument needs %zu\n", index,
                 it->second.size(), min_bytes);
    std::abort();
  }
  return it->second.address();
}

void* threadgroup_argument(int index) {
  Run& r = *g_run;
  if (index < 0 || size_t(index) >= r.tg_args.size() || !r.enc->threadgroup_memory.count(index)) {
    std::fprintf(stderr, "tmf_emu: kernel uses threadgroup(%d), which the host did not size\n", index);
    std::abort();
  }
  return r.arena + r.tg_args[index];
}

void thread_attribute(Role role, uint32_t out[3]) {
  Run& r = *g_run;
  Thread& t = current_thread();
  out[0] = out[1] = out[2] = 0;
  switch (role) {
    case Role::thread_position_in_grid:
      for (int i = 0; i < 3; ++i) out[i] = r.group[i] * r.threads[i] + t.tid[i];
      break;
    case Role::thread_position_in_threadgroup: std::memcpy(out, t.tid, sizeof(t.tid)); break;
    case Role::threadgroup_position_in_grid: std::memcpy(out, r.group, sizeof(r.group)); break;
    case Role::threads_per_threadgroup: std::memcpy(out, r.threads, sizeof(r.threads)); break;
    case Role::threadgroups_per_grid: std::memcpy(out, r.groups, sizeof(r.groups)); break;
    case Role::threads_per_grid:
      for (int i = 0; i < 3; ++i) out[i] = r.groups[i] * r.threads[i];
      break;
    case Role::thread_index_in_threadgroup: out[0] = t.index; break;
    case Role::thread_index_in_simdgroup: out[0] = t.index % kSimdWidth; break;
    case Role::simdgroup_index_in_threadgroup: out[0] = t.index / kSimdWidth; break;
    case Role::simdgroups_per_threadgroup: out[0] = (r.nthreads + kSimdWidth - 1) / kSimdWidth; break;
    case Role::threads_per_simdgroup: out[0] = kSimdWidth; break;
    default: break;
  }
}

KernelRegistrar::KernelRegistrar(const char* host_name, KernelInvoker invoker, const Binding* bindings,
                                 size_t count, size_t arity, const char* file, int line) {
  if (count != arity) {
    std::fprintf(stderr, "tmf_emu: %s has %zu parameters but %zu bindings were parsed\n", host_name, arity, count);
    std::abort();
  }
  registry()[host_name] = KernelEntry{invoker, bindings, count, file, line};
}

// ---- the encoder's dispatch ----------------------------------------------------------------------------
bool kernel_exists(const std::string& name) { return registry().count(name) != 0; }

std::vector<std::string> kernel_names() {
  std::vector<std::string> names;
  for (auto& [n, e] : registry()) names.push_back(n);
  return names;
}

void run_dispatch(const EmuEncoder& enc, const Size3& groups, const Size3& threads, DispatchReport& report) {
  std::lock_guard<std::mutex> lock(g_dispatch_mutex);
  auto it = registry().find(enc.kernel);
  if (it == registry().end()) throw std::runtime_error("tmf_emu: no kernel named " + enc.kernel);
  Run r;
  r.kernel = &it->second;
  r.enc = &enc;
  r.report = &report;
  uint32_t g[3] = {groups.x, groups.y, groups.z}, t[3] = {threads.x, threads.y, threads.z};
  std::memcpy(r.groups, g, sizeof(g));
  std::memcpy(r.threads, t, sizeof(t));
  r.nthreads = t[0] * t[1] * t[2];
  report.kernel = enc.kernel;
  report.groups = groups, report.threads = threads;
  if (r.nthreads == 0 || g[0] * g[1] * g[2] == 0) return;
  g_run = &r;
  if (r.nthreads > kMaxThreadsPerThreadgroup) {
    add_error("threads-per-threadgroup", nullptr, 0, 0,
              std::to_string(r.nthreads) + " threads per threadgroup exceed the limit of 1024");
    g_run = nullptr;
    return;
  }
  static unsigned char* arena = new unsigned char[kThreadgroupArena];
  static char* stacks = [] {
    void* p = mmap(nullptr, kFiberStack * kMaxThreadsPerThreadgroup, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) std::abort();
    return static_cast<char*>(p);
  }();
  static Shadow* shadow = new Shadow[kThreadgroupArena / 2];
  r.arena = arena;
  r.stacks = stacks;
  r.shadow = shadow;
  // In checking mode every buffer is copied into a private allocation between guard zones, so an access
  // past its end cannot land in a neighbouring tensor (which would look like a legal access); buffers the
  // kernel wrote are copied back afterwards.
  std::vector<std::vector<unsigned char>> copies;
  g_ranges.clear();
  for (auto& [index, buf] : enc.buffers) {
    BoundBuffer b = buf;
    if (enc.checking) {
      copies.emplace_back(2 * kDeviceGuard + b.size(), 0xFF);
      std::memcpy(copies.back().data() + kDeviceGuard, b.address(), b.size());
      b = BoundBuffer{copies.back().data() + kDeviceGuard, b.size(), 0, b.argument_bytes};
    }
    r.view[index] = b;
    g_ranges.push_back({uintptr_t(b.address()), uintptr_t(b.base) + b.nbytes, index, !b.argument_bytes});
    if (!b.argument_bytes) report.traffic[index];  // a row for every bound buffer, even if untouched
  }
  g_checking = enc.checking;
  for (uint32_t z = 0; z < g[2] && !r.aborted; ++z)
    for (uint32_t y = 0; y < g[1] && !r.aborted; ++y)
      for (uint32_t x = 0; x < g[0] && !r.aborted; ++x) {
        r.group[0] = x, r.group[1] = y, r.group[2] = z;
        run_threadgroup(r);
        const size_t written = std::min(kThreadgroupArena, r.arena_used + kArenaDirtyMargin);
        g_arena_dirty = written;
        if (g_checking) g_shadow_dirty = written;
      }
  report.threadgroup_memory = std::max(report.threadgroup_memory, r.arena_used);
  if (enc.checking)
    for (auto& [index, buf] : enc.buffers)
      if (!buf.argument_bytes && report.traffic[index].bytes_written)
        std::memcpy(buf.address(), r.view[index].address(), buf.size());
  g_checking = false;
  g_ranges.clear();
  g_run = nullptr;
}

}  // namespace tmf_emu

// ---- sanitizer-coverage callbacks (called only from the instrumented shader code) ------------------------
#define TMF_TRACE(n)                                                                     \
  extern "C" void __sanitizer_cov_load##n(void* addr) {                                 \
    tmf_emu::on_access(uintptr_t(addr), n, false, __builtin_return_address(0));         \
  }                                                                                      \
  extern "C" void __sanitizer_cov_store##n(void* addr) {                                \
    tmf_emu::on_access(uintptr_t(addr), n, true, __builtin_return_address(0));          \
  }
TMF_TRACE(1)
TMF_TRACE(2)
TMF_TRACE(4)
TMF_TRACE(8)
TMF_TRACE(16)
extern "C" void __sanitizer_cov_trace_pc_guard_init(uint32_t*, uint32_t*) {}
extern "C" void __sanitizer_cov_trace_pc_guard(uint32_t*) {}
// clang 19 may emit calls to __truncsfbf2 for float -> bfloat, which Debian 12's libgcc lacks.
extern "C" __attribute__((weak)) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t h;
  if ((u & 0x7fffffff) > 0x7f800000) h = uint16_t((u >> 16) | 0x40);  // quiet NaN
  else h = uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);          // round to nearest even
  __bf16 b;
  std::memcpy(&b, &h, 2);
  return b;
}
