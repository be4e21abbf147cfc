// The Metal-on-CPU runner: executes a dispatch of a compiled shader kernel with Metal's execution model.
//
// Each threadgroup runs on one OS thread, its threads as fibers (boost.context), each fiber running until it
// blocks at a threadgroup barrier or a SIMD-group operation. When every thread of the group is blocked or
// finished, SIMD-group operations are resolved (lanes of one SIMD-group that reached the same call site take
// part; the others are inactive), then barriers (all remaining threads must wait at the same barrier). The
// SIMD-groups of a threadgroup run in a seeded order that varies per threadgroup and per round
// (TORCH_METAL_FUSED_EMU_SEED), so results that depend on the order show in plain runs too.
//
// The checker (the instrumented build: -fsanitize-coverage=func,trace-loads,trace-stores on the shader code
// only) sees every load and store of the kernels: it counts the bytes moved from and to each device buffer,
// reports accesses outside the memory a kernel may touch, and keeps a shadow of threadgroup memory (last writer,
// readers, barrier epoch, initialised) to report races between barriers and reads of uninitialised memory.
//
// Containment: a kernel bug ends as an error report, never as a crash or a hang of the calling process.
// - Every bound buffer is a private copy inside a PROT_NONE reservation (BufferCopy); the threadgroup arena and
//   each fiber stack have guard pages too. A SIGSEGV/SIGBUS while a dispatch runs is recorded (address ->
//   buffer, pc -> .metal line) and siglongjmps back to the dispatcher, which abandons the threadgroup's fibers
//   (their stacks are reused) and copies nothing back.
// - A watchdog timer (TORCH_METAL_FUSED_EMU_TIMEOUT_S, default 120 s) ends a runaway dispatch the same way.
// - The checker abandons a dispatch before an access far outside every buffer executes.
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <boost/context/detail/fcontext.hpp>
#include <algorithm>
#include <cctype>
#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <unordered_map>
#include <vector>

#include "tmf_emu/emu_encoder.h"
#include "tmf_emu/runtime_api.h"

// timer_create moved into libc in glibc 2.34; on an older one without librt loaded the watchdog is off rather
// than the library failing to load (build.py does not link -lrt).
#pragma weak timer_create
#pragma weak timer_settime
#pragma weak timer_delete

// The runtime's code gets a section of its own, so a pc can be told apart from the shader code linked into the
// same library (the watchdog abandons a dispatch only where the kernel itself runs: that is the line it reports).
#pragma clang section text = "tmf_runtime_text"
extern "C" char __start_tmf_runtime_text[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_tmf_runtime_text[] __attribute__((weak, visibility("hidden")));

namespace bctx = boost::context::detail;

namespace tmf_emu {
namespace {

constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;
constexpr size_t kThreadgroupMemoryLimit = 32 * 1024;
constexpr size_t kThreadgroupArena = 256 * 1024;  // room to keep running (and report) past the limit
constexpr size_t kFiberStack = 128 * 1024;        // the lowest page of each is a guard page
// Checked runs: poisoned, accessible slack on each side of a buffer copy. An access there is reported and the
// kernel keeps running (more findings per run); one beyond it is reported and the dispatch abandoned.
constexpr size_t kDeviceGuard = 4096;
// PROT_NONE address space on each side of every buffer copy and of the threadgroup arena: a stray access this
// far away faults instead of landing in other memory. Address space only: nothing is committed.
constexpr size_t kGuardZone = size_t(64) << 20;
constexpr size_t kMaxErrors = 64;
constexpr unsigned char kPoison = 0xFF;  // NaN as float, half and bfloat
constexpr double kDefaultTimeoutS = 120;
// After the deadline the watchdog ticks again this often, until a tick lands where the dispatch can be
// abandoned safely (not inside the runtime's own allocations) and, in plain runs, in the kernel's own code.
constexpr long kWatchdogRetryNs = 20 * 1000 * 1000;
constexpr size_t kAltStackBytes = 64 * 1024;

// The order of SIMD-groups (see simd_group_order). Seed 1 when TORCH_METAL_FUSED_EMU_SEED is unset: a fixed
// permutation, different for each threadgroup and each round, rather than index order. A sequential emulation
// in index order always runs SIMD-group 0 before 1 before 2..., which silently "fixes" the commonest race in
// reductions (later SIMD-groups reading what earlier ones wrote without a barrier); any fixed non-trivial order
// exposes it in plain runs, and a fixed one keeps every run reproducible (the same failure in CI and locally).
// Seed 0 is index order (the schedule before seeds existed: to tell a schedule-dependent failure from another);
// other seeds explore other orders.
constexpr uint64_t kDefaultScheduleSeed = 1;

size_t page_size() {
  static const size_t bytes = size_t(sysconf(_SC_PAGESIZE));
  return bytes;
}
size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }
std::string hex(uintptr_t v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%#lx", static_cast<unsigned long>(v));
  return text;
}

struct KernelEntry {
  KernelInvoker invoker;
  const Binding* bindings;
  const ParamInfo* params;
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
  int barrier_flags = 0;  // the mem_flags of the barrier the thread waits at
  LaneIO io;
  // While the thread is in runtime code it called (a checker callback, a barrier, a SIMD-group operation): the
  // return address into the kernel, which a watchdog tick or fault landing there reports as the location.
  uintptr_t call_site_pc = 0;
  // The return address of the thread's latest SIMD-group operation, barrier or (checked runs) device or
  // threadgroup memory access: where a checked run's watchdog report points (the pc of a tick in instrumented
  // code often has no line).
  uintptr_t last_site_pc = 0;
};

// Checked runs: the last writer and reader of each 2-byte granule of threadgroup memory. Threadgroup memory is
// ordered between threads by a threadgroup_barrier with mem_flags::mem_threadgroup (Run::epoch), and between the
// lanes of one SIMD-group also by a simdgroup_barrier with mem_threadgroup (Run::simd_tg_epoch): the SIMD-group epoch
// of each access is kept so that such an exchange is not reported. read_simd: the SIMD-group of every reader of the
// current epoch (-1: none, -2: readers of several SIMD-groups).
struct Shadow {
  int16_t writer = -1, reader = -1;  // reader -2: several readers
  int16_t read_simd = -1;
  uint32_t write_epoch = 0, read_epoch = 0;
  uint32_t write_simd_epoch = 0, read_simd_epoch = 0;
  bool init = false;
};

// Checked runs: the last writer and reader of each 2-byte granule of a bound buffer within the dispatch
// (threadgroups as 1 + their linear index, 0: none), so that conflicting accesses to device memory are races: two
// threads of one threadgroup between the same barriers, or two threadgroups at all (nothing orders threadgroups
// within a dispatch). The shadow belongs to the buffer's private copy, which one storage bound twice shares (the
// cross-entropy gradient written over its logits), so an in-place race shows whatever the schedule.
// Device memory is ordered between the threads of a threadgroup only by a barrier with mem_flags::mem_device (a
// mem_threadgroup barrier orders threadgroup memory alone), so the epochs here are the threadgroup's device epochs
// (Run::device_epoch), and between the lanes of one SIMD-group also by a simdgroup_barrier with mem_device
// (Run::simd_device_epoch; as for Shadow). Granules of 2 bytes: 1-byte device elements written by neighbouring
// threads would be reported as a race (no shader of ours writes any).
struct DeviceShadow {
  int16_t writer = -1, reader = -1;  // reader -2: several readers of one threadgroup between barriers
  int16_t read_simd = -1;
  uint32_t write_group = 0, read_group = 0;  // read_group kSeveralGroups: read by several threadgroups
  uint32_t write_epoch = 0, read_epoch = 0;
  uint32_t write_simd_epoch = 0, read_simd_epoch = 0;
};
constexpr uint32_t kSeveralGroups = UINT32_MAX;
constexpr int kMemDevice = 1;       // mem_flags::mem_device (tmf_emu/metal_prelude.h)
constexpr int kMemThreadgroup = 2;  // mem_flags::mem_threadgroup

// Whether an earlier access by thread `other` (with its SIMD-group's epoch `then`) is ordered before thread `me`'s
// now by a simdgroup_barrier: both threads in one SIMD-group, whose epoch has advanced since.
bool simd_ordered(int16_t other, uint32_t then, int16_t me, const std::vector<uint32_t>& simd_epochs) {
  return other >= 0 && other / kSimdWidth == me / kSimdWidth && simd_epochs[size_t(me / kSimdWidth)] != then;
}

// Whether the readers recorded in a shadow are ordered before `me`: read_simd is the SIMD-group of every one of them
// (record_read keeps it for one reader as for several), and read_simd_epoch that group's epoch at the latest read.
template <class S>
bool readers_ordered(const S& s, int16_t me, const std::vector<uint32_t>& simd_epochs) {
  return s.read_simd == me / kSimdWidth && simd_epochs[size_t(me / kSimdWidth)] != s.read_simd_epoch;
}

// Records a read by `me` in the current epoch (`same_epoch`: the shadow's readers are of this epoch).
template <class S>
void record_read(S& s, int16_t me, bool same_epoch, const std::vector<uint32_t>& simd_epochs) {
  const int16_t simd = int16_t(me / kSimdWidth);
  if (!same_epoch) s.reader = me, s.read_simd = simd;
  else if (s.reader != me) s.reader = -2, s.read_simd = s.read_simd == simd ? simd : int16_t(-2);
  s.read_simd_epoch = simd_epochs[size_t(simd)];
}

// An anonymous mapping released with the object.
struct Mapping {
  unsigned char* base = nullptr;
  size_t bytes = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept : base(o.base), bytes(o.bytes) { o.base = nullptr, o.bytes = 0; }
  Mapping& operator=(Mapping&& o) noexcept {
    std::swap(base, o.base);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Mapping() {
    if (base) munmap(base, bytes);
  }
};

// `bytes` accessible bytes (page-rounded) between two kGuardZone PROT_NONE reservations; returns them.
unsigned char* map_guarded(Mapping& m, size_t bytes) {
  m.bytes = 2 * kGuardZone + bytes;
  void* p = mmap(nullptr, m.bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("tmf_emu: cannot reserve address space for a buffer copy");
  m.base = static_cast<unsigned char*>(p);
  unsigned char* rw = m.base + kGuardZone;
  if (bytes && mprotect(rw, bytes, PROT_READ | PROT_WRITE) != 0)
    throw std::runtime_error("tmf_emu: cannot map a buffer copy");
  return rw;
}

size_t accessible_bytes(const Mapping& m) { return m.bytes - 2 * kGuardZone; }

// Buffer mappings of finished dispatches, kept for the next ones: mapping, protecting and faulting in fresh
// pages would cost more than small kernels themselves, and the same shapes recur. Bounded, small ones only
// (their pages stay resident). Used under the dispatch mutex.
class MappingPool {
 public:
  // A mapping with at least `bytes` accessible (not more than about twice: the excess is poisoned per use).
  unsigned char* take(Mapping& m, size_t bytes) {
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const size_t have = accessible_bytes(free_[i]);
      if (have >= bytes && have <= 2 * bytes + kSlop &&
          (best == free_.size() || have < accessible_bytes(free_[best])))
        best = i;
    }
    if (best == free_.size()) return map_guarded(m, bytes);
    pooled_bytes_ -= accessible_bytes(free_[best]);
    m = std::move(free_[best]);
    free_.erase(free_.begin() + long(best));
    return m.base + kGuardZone;
  }
  void give(Mapping&& m) {
    const size_t bytes = m.base ? accessible_bytes(m) : 0;
    if (!bytes || bytes > kMaxPooledMapping) return;  // released by the caller's destructor
    free_.push_back(std::move(m));
    pooled_bytes_ += bytes;
    while (free_.size() > kMaxEntries || pooled_bytes_ > kMaxPooledBytes) {  // the oldest go first
      pooled_bytes_ -= accessible_bytes(free_.front());
      free_.erase(free_.begin());
    }
  }

 private:
  static constexpr size_t kSlop = 64 * 1024;
  static constexpr size_t kMaxEntries = 32;
  static constexpr size_t kMaxPooledMapping = size_t(4) << 20;
  static constexpr size_t kMaxPooledBytes = size_t(32) << 20;
  std::vector<Mapping> free_;
  size_t pooled_bytes_ = 0;
};
MappingPool g_mapping_pool;

// A bound buffer as the kernel sees it: a private copy inside a PROT_NONE reservation.
//   plain:   [guard][poison][data][< alignment bytes of poison][guard]
//   checked: [guard][>= 4 KiB poison][data][>= 4 KiB poison][guard]
// In plain runs the data ends at the guard page whenever its length is a multiple of the alignment the kernel's
// parameter type requires (always, for our kernels' element-typed buffers), so a load or store one element
// past the end faults. Stores into the poisoned bytes (before the start, or into the tail of a length that is
// not a multiple of the alignment) are found afterwards by checking the poison.
struct BufferCopy {
  int index = 0;
  BoundBuffer host;  // the caller's buffer
  bool writable = false;  // bound to a kernel parameter that is not const-qualified
  Mapping mapping;
  unsigned char* rw = nullptr;  // the accessible pages
  size_t rw_bytes = 0;
  unsigned char* data = nullptr;
  size_t size = 0;
  std::vector<int> aliases;  // the other binding indices of the same storage (same address and size): this copy
  int store_row = 0;  // the binding whose traffic row counts the copy's stores: its first writable one (else index)
  std::vector<DeviceShadow> shadow;  // checked runs: one granule per 2 bytes of data

  bool reserves(uintptr_t a) const {
    return a >= uintptr_t(mapping.base) && a - uintptr_t(mapping.base) < mapping.bytes;
  }
};

void place_copy(BufferCopy& c, size_t alignment, bool checking) {
  const size_t slack = checking ? kDeviceGuard : 0;
  c.size = c.host.size();
  // + alignment in checked runs: aligning the start down must not eat into the slack before it.
  c.rw_bytes = round_up(round_up(c.size, alignment) + (slack ? 2 * slack + alignment : 0), page_size());
  c.rw = g_mapping_pool.take(c.mapping, c.rw_bytes);
  c.rw_bytes = accessible_bytes(c.mapping);
  const uintptr_t end = uintptr_t(c.rw) + c.rw_bytes - slack;
  c.data = reinterpret_cast<unsigned char*>((end - c.size) / alignment * alignment);
  std::memset(c.rw, kPoison, size_t(c.data - c.rw));
  if (c.size) std::memcpy(c.data, c.host.address(), c.size);
  std::memset(c.data + c.size, kPoison, size_t(c.rw + c.rw_bytes - (c.data + c.size)));
}

struct Run {
  // dispatch
  const KernelEntry* kernel = nullptr;
  const EmuEncoder* enc = nullptr;
  uint32_t groups[3], threads[3], group[3];
  uint32_t nthreads = 0;
  uint64_t seed = kDefaultScheduleSeed;
  double timeout_s = kDefaultTimeoutS;
  // threadgroup
  std::vector<Thread> th;
  Thread* current = nullptr;
  bctx::fcontext_t scheduler = nullptr;
  unsigned char* arena = nullptr;
  size_t arena_used = 0;
  std::unordered_map<uint64_t, size_t> locals;
  std::vector<size_t> tg_args;  // arena offsets of [[threadgroup(n)]] arguments
  Shadow* shadow = nullptr;  // one granule per 2 bytes of the arena
  uint32_t epoch = 1;         // advanced by barriers with mem_flags::mem_threadgroup (Shadow)
  uint32_t device_epoch = 1;  // advanced by barriers with mem_flags::mem_device (DeviceShadow)
  // Per SIMD-group: advanced by simdgroup_barrier with mem_threadgroup, with mem_device.
  std::vector<uint32_t> simd_tg_epoch, simd_device_epoch;
  uint32_t round = 0;  // scheduling rounds of this threadgroup
  std::vector<uint32_t> simd_order;
  bool aborted = false;
  bool tg_over_limit_reported = false;
  // report
  DispatchReport* report = nullptr;
  char* stacks = nullptr;
  // the buffers as the kernel sees them (private copies) and the copies themselves
  std::map<int, BoundBuffer> view;
  std::vector<BufferCopy> copies;
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

// ---- abandoning a dispatch ------------------------------------------------------------------------
// The dispatcher sigsetjmps before running the threadgroups; a fault, the watchdog or a fatal finding
// siglongjmps back to it from the fiber (or the scheduler) that was running.
enum Escape : int { kEscapeFault = 1, kEscapeWatchdog, kEscapeFinding };
sigjmp_buf g_escape;
volatile sig_atomic_t g_escape_armed = 0;  // the threadgroups of a dispatch are running
// > 0 while the runtime allocates (add_error, threadgroup_local): abandoning there could leave the allocator's
// lock held, so the watchdog waits for its next tick.
volatile sig_atomic_t g_runtime_busy = 0;
volatile sig_atomic_t g_timeout_pending = 0;  // the watchdog fired at a point it could not escape from
// Ticks that landed outside the shader code (in the runtime, libm, ...); after kMaxWatchdogMisses the dispatch
// is abandoned wherever it is, and the report falls back to the kernel's last call into the runtime. A kernel that
// spins through SIMD-group operations spends most of its time in the runtime: 25 ticks (0.5 s) once all missed in
// CI (test_watchdog_ends_an_endless_dispatch[spin_in_simd_ops-plain] reported no line), so up to 4 s of ticks.
// A tick in the kernel's own code can still land on an instruction without a line (planted_bugs.metal:0, in CI
// again): the report then carries the thread's latest SIMD-group operation or barrier too (report_escape).
volatile sig_atomic_t g_watchdog_misses = 0;
constexpr int kMaxWatchdogMisses = 200;
// The thread running the dispatch (signal handlers see other threads' signals too). Not a thread_local: a
// dlopen'ed library's TLS may be allocated on first use, which a signal handler must not do.
volatile sig_atomic_t g_dispatching = 0;
pthread_t g_dispatch_thread;
bool on_dispatch_thread() { return g_dispatching && pthread_equal(pthread_self(), g_dispatch_thread); }

struct FaultRecord {
  int signo = 0, code = 0;
  uintptr_t addr = 0, pc = 0, sp = 0;
  int write = -1;  // 1 store, 0 load, -1 unknown
};
FaultRecord g_fault;  // written by the signal handlers, read after the escape

struct BusyScope {
  BusyScope() { ++g_runtime_busy; }
  ~BusyScope() { --g_runtime_busy; }
};

[[noreturn]] void escape(Escape why) {
  g_escape_armed = 0;
  siglongjmp(g_escape, why);
}

void add_error(const char* kind, const char* file, int line, uintptr_t pc, const std::string& message,
               int buffer = -1) {
  BusyScope busy;
  DispatchReport* r = g_run->report;
  for (auto& e : r->errors)
    if (e.kind == kind && e.line == line && e.pc == pc && e.file == (file ? file : "")) {
      ++e.count;
      return;
    }
  if (r->errors.size() >= kMaxErrors) return;
  r->errors.push_back(ErrorRecord{kind, file ? file : "", line, pc, message, 1, buffer});
}

// A finding that ends the dispatch (a kernel the runner cannot keep running); the caller then escapes (from a
// frame without objects to destroy).
void record_fatal(const char* kind, const char* file, int line, const std::string& message) {
  if (!g_run || !g_escape_armed) {  // not inside a dispatch: nothing to return to
    std::fprintf(stderr, "tmf_emu: %s\n", message.c_str());
    std::abort();
  }
  add_error(kind, file, line, 0, message);
  g_run->report->aborted = kind;
}

// ---- the shader library's own image: its constant data are legitimate loads ----------------------------
struct ImageRange {
  uintptr_t lo, hi;
};
std::vector<ImageRange> g_image;
uintptr_t g_image_base = 0;
ImageRange g_text{0, 0};  // the .text section: the shader code and the runtime's helpers (not the PLT)

// The .text section of the library at `path` loaded at `base` (read from the file: sections are not mapped).
ImageRange text_section(const char* path, uintptr_t base) {
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {0, 0};
  ImageRange text{0, 0};
  Elf64_Ehdr eh;
  std::vector<Elf64_Shdr> sh;
  std::vector<char> names;
  if (pread(fd, &eh, sizeof(eh), 0) == ssize_t(sizeof(eh)) && eh.e_shentsize == sizeof(Elf64_Shdr) &&
      eh.e_shstrndx < eh.e_shnum) {
    sh.resize(eh.e_shnum);
    const ssize_t bytes = ssize_t(sh.size() * sizeof(Elf64_Shdr));
    if (pread(fd, sh.data(), size_t(bytes), off_t(eh.e_shoff)) == bytes) {
      names.resize(sh[eh.e_shstrndx].sh_size + 1, '\0');
      if (pread(fd, names.data(), names.size() - 1, off_t(sh[eh.e_shstrndx].sh_offset)) > 0)
        for (const auto& h : sh)
          if (h.sh_name < names.size() && std::strcmp(names.data() + h.sh_name, ".text") == 0)
            text = {base + h.sh_addr, base + h.sh_addr + h.sh_size};
    }
  }
  close(fd);
  return text;
}

int collect_image(dl_phdr_info* info, size_t, void* self) {
  uintptr_t lo = ~uintptr_t(0), hi = 0;
  std::vector<ImageRange> ranges;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t a = info->dlpi_addr + ph.p_vaddr;
    ranges.push_back({a, a + ph.p_memsz});
    lo = std::min(lo, a), hi = std::max(hi, a + ph.p_memsz);
  }
  if (uintptr_t(self) < lo || uintptr_t(self) >= hi) return 0;
  g_image = std::move(ranges);
  g_image_base = info->dlpi_addr;
  g_text = text_section(info->dlpi_name, info->dlpi_addr);
  if (g_text.lo == g_text.hi) g_text = {lo, hi};  // unreadable: the whole image
  return 1;
}

void find_image() {
  static std::once_flag once;
  std::call_once(once, [] { dl_iterate_phdr(collect_image, reinterpret_cast<void*>(&find_image)); });
}

bool in_image(uintptr_t a) {
  for (const auto& r : g_image)
    if (a >= r.lo && a < r.hi) return true;
  return false;
}

bool in_shader_code(uintptr_t pc) {
  return pc >= g_text.lo && pc < g_text.hi &&
         !(pc >= uintptr_t(__start_tmf_runtime_text) && pc < uintptr_t(__stop_tmf_runtime_text));
}

// A pc as the report carries it: an offset in this library, which the Python side symbolizes to .metal file:line
// (it steps one byte back, as for the return addresses the checker reports).
uintptr_t report_pc(uintptr_t pc, bool is_return_address) {
  if (!pc || !in_image(pc)) return 0;
  return pc - g_image_base + (is_return_address ? 0 : 1);
}

uintptr_t module_offset(void* pc) { return report_pc(uintptr_t(pc), true); }

// ---- the fibers -------------------------------------------------------------------------------------
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

std::string thread_name(const Run& r, const Thread& t) {
  return "thread " + std::to_string(t.index) + " of threadgroup (" + std::to_string(r.group[0]) + "," +
         std::to_string(r.group[1]) + "," + std::to_string(r.group[2]) + ")";
}

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
    if (is_simdgroup_matrix_op(lead->op) && active != ~0u) {
      // The 32 lanes of a SIMD-group execute a simdgroup_matrix operation together (each holds part of the
      // matrices); a lane missing (divergence, a partial SIMD-group) leaves its elements undefined on the GPU.
      add_error("simdgroup-matrix-divergence", lead->file, lead->line, 0,
                "a simdgroup_matrix operation reached by " + std::to_string(__builtin_popcount(active)) +
                    " of the SIMD-group's 32 lanes; all 32 must execute it together");
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
    if (lead->op == SimdOp::none) {  // simdgroup_barrier: its mem_flags order the SIMD-group's memory accesses
      if (lead->io.arg & kMemThreadgroup) ++r.simd_tg_epoch[s];
      if (lead->io.arg & kMemDevice) ++r.simd_device_epoch[s];
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
      r.report->aborted = "divergent-barrier";
      return false;
    }
  }
  if (!first) return false;
  if (finished) {
    add_error("barrier-not-reached", first->file, first->line, 0,
              std::to_string(finished) + " thread(s) of the threadgroup exited without reaching this barrier "
              "(a hang or undefined behaviour on the GPU)");
    r.aborted = true;
    r.report->aborted = "barrier-not-reached";
    return false;
  }
  for (auto& t : r.th) t.wait = Wait::none;
  if (first->barrier_flags & kMemThreadgroup) ++r.epoch;
  if (first->barrier_flags & kMemDevice) ++r.device_epoch;
  return true;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The order in which the SIMD-groups of the threadgroup run in this round (every runnable thread runs until it
// blocks; lanes of one SIMD-group stay in lane order, as they run together on the GPU). A function of the seed,
// the threadgroup's position and the round only, so a run is reproducible. See kDefaultScheduleSeed.
void simd_group_order(Run& r) {
  const uint32_t nsimd = (r.nthreads + kSimdWidth - 1) / kSimdWidth;
  r.simd_order.resize(nsimd);
  std::iota(r.simd_order.begin(), r.simd_order.end(), 0u);
  if (r.seed == 0 || nsimd < 2) return;
  uint64_t state = r.seed;
  for (uint64_t v : {uint64_t(r.group[0]), uint64_t(r.group[1]), uint64_t(r.group[2]), uint64_t(r.round)})
    state = splitmix64(state) ^ v;
  for (uint32_t i = nsimd - 1; i > 0; --i) std::swap(r.simd_order[i], r.simd_order[splitmix64(state) % (i + 1)]);
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
  r.device_epoch = 1;
  r.simd_tg_epoch.assign((r.nthreads + kSimdWidth - 1) / kSimdWidth, 1);
  r.simd_device_epoch.assign(r.simd_tg_epoch.size(), 1);
  // [[threadgroup(n)]] arguments, sized by the host's setThreadgroupMemoryLength.
  r.tg_args.assign(r.enc->threadgroup_memory.size(), 0);
  for (auto& [index, bytes] : r.enc->threadgroup_memory) {
    if (size_t(index) >= r.tg_args.size()) r.tg_args.resize(index + 1);
    r.tg_args[index] = r.arena_used;
    r.arena_used += (bytes + 15) & ~size_t(15);
  }
  std::memset(r.arena, kPoison, g_arena_dirty);  // poison: uninitialised reads show up as NaN
  if (g_checking) {
    std::fill(r.shadow, r.shadow + (g_shadow_dirty + 1) / 2, Shadow{});
    g_shadow_dirty = 0;
  }

  for (r.round = 0;; ++r.round) {
    simd_group_order(r);
    for (uint32_t s : r.simd_order) {
      const uint32_t end = std::min(r.nthreads, (s + 1) * kSimdWidth);
      for (uint32_t t = s * kSimdWidth; t < end; ++t)
        if (!r.th[t].done && r.th[t].wait == Wait::none) resume(r.th[t]);
      if (g_timeout_pending) escape(kEscapeWatchdog);
    }
    bool all_done = true;
    for (auto& t : r.th) all_done = all_done && t.done;
    if (all_done) return;
    if (resolve_simd_ops(r)) continue;
    if (resolve_barrier(r)) continue;
    // Nothing can proceed: a barrier error (reported by resolve_barrier) or a deadlock.
    if (!r.aborted) {
      add_error("deadlock", nullptr, 0, 0, "threads blocked with no way to proceed");
      r.report->aborted = "deadlock";
    }
    r.aborted = true;
    return;
  }
}

void run_threadgroups(Run& r) {
  for (uint32_t z = 0; z < r.groups[2] && !r.aborted; ++z)
    for (uint32_t y = 0; y < r.groups[1] && !r.aborted; ++y)
      for (uint32_t x = 0; x < r.groups[0] && !r.aborted; ++x) {
        r.group[0] = x, r.group[1] = y, r.group[2] = z;
        run_threadgroup(r);
        const size_t written = std::min(kThreadgroupArena, r.arena_used + kArenaDirtyMargin);
        g_arena_dirty = written;
        if (g_checking) g_shadow_dirty = written;
      }
}

Thread& current_thread() {
  if (!g_run || !g_run->current) {
    std::fprintf(stderr, "tmf_emu: a Metal builtin was called outside a kernel dispatch\n");
    std::abort();
  }
  return *g_run->current;
}

// Marks runtime code entered from a kernel (see Thread::call_site_pc).
class KernelCall {
 public:
  explicit KernelCall(void* return_address) : t_(g_run ? g_run->current : nullptr) {
    if (t_) t_->call_site_pc = uintptr_t(return_address);
  }
  ~KernelCall() {
    if (t_) t_->call_site_pc = 0;
  }
  KernelCall(const KernelCall&) = delete;
  KernelCall& operator=(const KernelCall&) = delete;

 private:
  Thread* t_;
};

// ---- what an address is ---------------------------------------------------------------------------
struct Place {
  const char* kind;
  int buffer = -1;
  std::string what;  // e.g. "byte offset 256 of buffer(0), which holds 256 bytes from its bind offset (past its end)"
};

Place place_of(const Run& r, uintptr_t addr) {
  for (const auto& c : r.copies)
    if (c.reserves(addr)) {
      const int64_t off = int64_t(addr - uintptr_t(c.data));
      return {"device-out-of-bounds", c.index,
              "byte offset " + std::to_string(off) + " of buffer(" + std::to_string(c.index) + "), which holds " +
                  std::to_string(c.size) + " bytes from its bind offset" +
                  (off < 0 ? " (before its start)" : " (past its end)")};
    }
  const uintptr_t arena = uintptr_t(r.arena);
  if (addr + kGuardZone >= arena && addr < arena + kThreadgroupArena + kGuardZone)
    return {"threadgroup-out-of-bounds", -1,
            "byte offset " + std::to_string(int64_t(addr - arena)) + " of threadgroup memory (" +
                std::to_string(r.arena_used) + " bytes allocated)"};
  const uintptr_t stacks = uintptr_t(r.stacks);
  if (addr >= stacks && addr < stacks + kFiberStack * kMaxThreadsPerThreadgroup) {
    const size_t owner = (addr - stacks) / kFiberStack;
    if ((addr - stacks) % kFiberStack < page_size())
      return {"stack-overflow", -1,
              "the guard page below thread " + std::to_string(owner) + "'s stack: its private memory (locals, " +
                  "private arrays, calls) exceeded " + std::to_string((kFiberStack - page_size()) / 1024) + " KiB"};
    return {"wild-access", -1, "the private memory (stack) of thread " + std::to_string(owner)};
  }
  return {"wild-access", -1,
          "address " + hex(addr) + ", outside every bound buffer, threadgroup memory and thread-private memory"};
}

// ---- memory checker ---------------------------------------------------------------------------------
struct BufferRange {
  uintptr_t lo, hi;  // the bound range [buffer start + offset, buffer end)
  int index;
  Traffic* traffic;  // the report's row; null for setBytes arguments, which do not count as traffic
  DeviceShadow* shadow = nullptr;  // checked runs: the private copy's shadow (granule 0 at lo)
  Traffic* store_traffic = nullptr;  // the row that counts stores: the storage's first writable binding's
  std::string names;  // "buffer(n)", or every binding of a storage bound twice: "buffer(0)/buffer(4)"
};
std::vector<BufferRange> g_ranges;

// Reports an access the kernel may not make. Returns whether to abandon the dispatch: yes unless it lands in
// a checked run's accessible slack next to a buffer (then the kernel keeps running, to report more in one run).
bool report_bad_access(Run& r, uintptr_t addr, size_t size, bool store, void* pc) {
  const std::string access = std::string(store ? "store " : "load ") + std::to_string(size) + " bytes at ";
  for (const auto& b : g_ranges) {
    if (addr + size > b.lo - std::min<uintptr_t>(b.lo, kDeviceGuard) && addr < b.hi + kDeviceGuard) {
      add_error("device-out-of-bounds", nullptr, 0, module_offset(pc),
                access + "offset " + std::to_string(int64_t(addr - b.lo)) + " of buffer(" +
                    std::to_string(b.index) + "), which holds " + std::to_string(b.hi - b.lo) +
                    " bytes from its bind offset",
                b.index);
      return false;
    }
  }
  const Place place = place_of(r, addr);
  add_error(place.kind, nullptr, 0, module_offset(pc),
            access + place.what + " (" + thread_name(r, *r.current) + "); the dispatch was abandoned before it",
            place.buffer);
  r.report->aborted = place.kind;
  return true;
}

// A conflicting access to device memory (see DeviceShadow): reported once per site. `b` is the first binding of
// the storage; `names` every binding of it (a storage bound twice), for the message.
void check_device_race(Run& r, const BufferRange& b, uintptr_t addr, size_t size, bool store, void* pc) {
  const int16_t me = int16_t(r.current->index);
  const uint32_t group = 1 + r.group[0] + r.groups[0] * (r.group[1] + r.groups[1] * r.group[2]);
  const uint32_t epoch = r.device_epoch;
  auto race = [&](const std::string& what) {
    BusyScope busy;  // the message allocates: a watchdog tick must not escape from inside the allocator
    add_error("device-race", nullptr, 0, module_offset(pc),
              what + " at " + b.names + " offset " + std::to_string(addr - b.lo) + " (" +
                  thread_name(r, *r.current) + ")",
              b.index);
  };
  const auto& simd_epochs = r.simd_device_epoch;
  for (size_t g = (addr - b.lo) / 2; g < (addr - b.lo + size + 1) / 2; ++g) {
    DeviceShadow& s = b.shadow[g];
    const bool other_writer = s.write_group != 0 && (s.write_group != group || s.writer != me);
    const bool written_here = s.write_group == group && s.write_epoch == epoch &&
                              !simd_ordered(s.writer, s.write_simd_epoch, me, simd_epochs);
    if (store) {
      if (other_writer && (s.write_group != group || written_here))
        race(s.write_group != group ? "write-write race on device memory between threadgroups"
                                    : "write-write race on device memory with no mem_device barrier between "
                                      "(thread " + std::to_string(s.writer) + " wrote it too)");
      else if (s.read_group != 0 && s.read_group != group)
        race("device memory written after another threadgroup of the dispatch read it");
      else if (s.read_group == group && s.read_epoch == epoch && s.reader != -1 && s.reader != me &&
               !readers_ordered(s, me, simd_epochs))
        race("device memory written after another thread read it, with no mem_device barrier between");
      s.writer = me, s.write_group = group, s.write_epoch = epoch;
      s.write_simd_epoch = simd_epochs[size_t(me / kSimdWidth)];
    } else {
      if (other_writer && (s.write_group != group || written_here))
        race(s.write_group != group ? "device memory read after another threadgroup of the dispatch wrote it"
                                    : "device memory read after thread " + std::to_string(s.writer) +
                                          " wrote it, with no mem_device barrier between");
      if (s.read_group == kSeveralGroups) {
      } else if (s.read_group != 0 && s.read_group != group) {
        s.read_group = kSeveralGroups;  // a later write by any threadgroup races one of the readers
      } else {
        record_read(s, me, s.read_group == group && s.read_epoch == epoch, simd_epochs);
        s.read_group = group, s.read_epoch = epoch;
      }
    }
  }
}

void on_access(uintptr_t addr, size_t size, bool store, void* pc) {
  if (!g_checking || !g_run || !g_run->current) return;
  Run& r = *g_run;
  KernelCall call(pc);
  uintptr_t arena = uintptr_t(r.arena);
  if (addr >= arena && addr < arena + kThreadgroupArena) {
    r.current->last_site_pc = uintptr_t(pc);
    size_t off = addr - arena;
    if (off + size > r.arena_used) {
      add_error("threadgroup-out-of-bounds", nullptr, 0, module_offset(pc),
                "threadgroup memory access past the allocated threadgroup storage");
      return;
    }
    int16_t me = int16_t(r.current->index);
    const auto& simd_epochs = r.simd_tg_epoch;
    for (size_t g = off / 2; g < (off + size + 1) / 2; ++g) {
      Shadow& s = r.shadow[g];
      const bool written_here =
          s.write_epoch == r.epoch && s.writer != me && !simd_ordered(s.writer, s.write_simd_epoch, me, simd_epochs);
      if (store) {
        if (written_here)
          add_error("threadgroup-race", nullptr, 0, module_offset(pc),
                    "write-write race on threadgroup memory between barriers (threads " +
                        std::to_string(s.writer) + " and " + std::to_string(me) + ")");
        else if (s.read_epoch == r.epoch && s.reader != -1 && s.reader != me && !readers_ordered(s, me, simd_epochs))
          add_error("threadgroup-race", nullptr, 0, module_offset(pc),
                    "read-write race on threadgroup memory between barriers: written by thread " +
                        std::to_string(me) + " after another thread read it");
        s.writer = me, s.write_epoch = r.epoch, s.init = true;
        s.write_simd_epoch = simd_epochs[size_t(me / kSimdWidth)];
      } else {
        if (!s.init) {
          add_error("uninitialised-read", nullptr, 0, module_offset(pc),
                    "read of threadgroup memory that no thread has written");
          s.init = true;  // report once per location
        } else if (written_here) {
          add_error("threadgroup-race", nullptr, 0, module_offset(pc),
                    "read-after-write race on threadgroup memory without a barrier between (written by thread " +
                        std::to_string(s.writer) + ", read by thread " + std::to_string(me) + ")");
        }
        record_read(s, me, s.read_epoch == r.epoch, simd_epochs);
        s.read_epoch = r.epoch;
      }
    }
    return;
  }
  // The thread's own private memory (its fiber stack, above the guard page).
  const uintptr_t stack = uintptr_t(r.stacks) + size_t(r.current->index) * kFiberStack;
  if (addr >= stack + page_size() && addr + size <= stack + kFiberStack) return;
  r.current->last_site_pc = uintptr_t(pc);
  for (const auto& b : g_ranges) {
    if (addr >= b.lo && addr + size <= b.hi) {
      // A storage bound twice has one range per binding: loads count on the first, stores on the first writable.
      if (Traffic* row = store ? b.store_traffic : b.traffic) (store ? row->bytes_written : row->bytes_read) += size;
      if (b.shadow) check_device_race(r, b, addr, size, store, pc);
      return;
    }
  }
  // The library's constant data (program-scope constants, the binding tables the invoker reads): loads only.
  if (!store && in_image(addr)) return;
  if (report_bad_access(r, addr, size, store, pc)) escape(kEscapeFinding);
}

// ---- signals: faults and the watchdog -------------------------------------------------------------
void save_context(void* ucontext, FaultRecord& f) {
  const auto* uc = static_cast<const ucontext_t*>(ucontext);
#if defined(__x86_64__)
  f.pc = uintptr_t(uc->uc_mcontext.gregs[REG_RIP]);
  f.sp = uintptr_t(uc->uc_mcontext.gregs[REG_RSP]);
  f.write = f.signo == SIGSEGV && f.code > 0 ? int((uc->uc_mcontext.gregs[REG_ERR] >> 1) & 1) : -1;
#elif defined(__aarch64__)
  f.pc = uintptr_t(uc->uc_mcontext.pc);
  f.sp = uintptr_t(uc->uc_mcontext.sp);
#else
  (void)uc;
#endif
}

struct sigaction g_previous_segv, g_previous_bus;

void on_fault(int sig, siginfo_t* info, void* ucontext) {
  if (!(on_dispatch_thread() && g_escape_armed)) {
    // Not a kernel's fault: give it to the previous handler (the faulting instruction runs again under it).
    sigaction(sig, sig == SIGBUS ? &g_previous_bus : &g_previous_segv, nullptr);
    if (info->si_code <= 0) raise(sig);  // sent by kill(), not raised by an instruction
    return;
  }
  g_fault = FaultRecord{};
  g_fault.signo = sig, g_fault.code = info->si_code, g_fault.addr = uintptr_t(info->si_addr);
  save_context(ucontext, g_fault);
  escape(kEscapeFault);
}

// When this library's running dispatch times out (CLOCK_MONOTONIC nanoseconds; 0: no dispatch armed the timer).
volatile int64_t g_watchdog_deadline_ns = 0;

int64_t monotonic_ns() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);  // async-signal-safe
  return int64_t(now.tv_sec) * 1000000000 + now.tv_nsec;
}

void on_watchdog(int, siginfo_t*, void* ucontext) {
  if (!(on_dispatch_thread() && g_escape_armed)) return;  // a late tick of a finished dispatch
  // Every harness library shares the signal (see watchdog_signal): a late tick of another library's finished dispatch
  // can land here, before this dispatch's own deadline.
  if (!g_watchdog_deadline_ns || monotonic_ns() < g_watchdog_deadline_ns) return;
  if (g_runtime_busy || !g_run || !g_run->current) {
    g_timeout_pending = 1;  // the scheduler or the runtime's allocations: escape at the next safe point
    return;
  }
  FaultRecord here;
  save_context(ucontext, here);
  if (!g_checking && !in_shader_code(here.pc) && g_watchdog_misses < kMaxWatchdogMisses) {
    ++g_watchdog_misses;  // the next tick will likely land in the kernel's own code
    return;
  }
  g_fault = here;
  escape(kEscapeWatchdog);
}

// The real-time signal of the watchdog, shared by every harness library of the process (a process loads many: plain
// and checked builds of the shaders, of each source the compile_shader stand-in compiles, of the tests' planted
// copies; real-time signals are too few for one each). Each dispatch installs its own library's handler on it
// (install_watchdog_handler), and a handler acts on a tick only while its own dispatch is past its deadline, so ticks
// never cross libraries. Never restored to the default action, which would end the process on a late tick: a harness
// library stays loaded for the life of the process.
int watchdog_signal() {
  static const int sig = [] {
    const int shared = SIGRTMAX - 4;
    struct sigaction current;
    if (sigaction(shared, nullptr, &current) != 0) return 0;
    // Free, or a harness library's (SA_SIGINFO): anything else belongs to someone else; then no watchdog.
    return (current.sa_flags & SA_SIGINFO) || current.sa_handler == SIG_DFL ? shared : 0;
  }();
  return sig;
}

bool install_watchdog_handler(int sig) {
  struct sigaction sa {};
  sa.sa_sigaction = on_watchdog;
  sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  return sigaction(sig, &sa, nullptr) == 0;
}

// The two settings below take plain non-negative numbers only (no sign, space, inf/nan or hex float), as
// torch_metal_fused/_config.py's parsers, which check them at `import torch_metal_fused`.
double timeout_seconds() {
  const char* text = std::getenv("TORCH_METAL_FUSED_EMU_TIMEOUT_S");
  if (!text || !*text) return kDefaultTimeoutS;
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  const bool plain = (std::isdigit(static_cast<unsigned char>(*text)) || *text == '.') &&
                     std::strspn(text, "0123456789.eE+-") == std::strlen(text);
  if (*end || !plain) throw std::invalid_argument(std::string("TORCH_METAL_FUSED_EMU_TIMEOUT_S=") + text +
                                                  " is not a number of seconds (0: no watchdog)");
  return v;
}

uint64_t schedule_seed() {
  const char* text = std::getenv("TORCH_METAL_FUSED_EMU_SEED");
  if (!text || !*text) return kDefaultScheduleSeed;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text, &end, 0);
  if (*end || !std::isdigit(static_cast<unsigned char>(*text))) {
    throw std::invalid_argument(std::string("TORCH_METAL_FUSED_EMU_SEED=") + text + " is not an integer");
  }
  return v;
}

// The watchdog timer, signalling the thread that dispatches (dispatches are serialised; kept between them).
struct WatchdogTimer {
  timer_t timer{};
  pid_t tid = 0;  // the thread it signals (0: none yet)
} g_watchdog;

bool watchdog_timer() {
  const int sig = watchdog_signal();
  if (!sig || !timer_create || !install_watchdog_handler(sig)) return false;
  const pid_t tid = pid_t(syscall(SYS_gettid));
  if (g_watchdog.tid == tid) return true;
  if (g_watchdog.tid) timer_delete(g_watchdog.timer);
  g_watchdog.tid = 0;
  sigevent ev{};
  ev.sigev_notify = SIGEV_THREAD_ID;
  ev.sigev_signo = sig;
  ev._sigev_un._tid = tid;
  if (timer_create(CLOCK_MONOTONIC, &ev, &g_watchdog.timer) != 0) return false;
  g_watchdog.tid = tid;
  return true;
}

// For the duration of a dispatch: the fault handlers, an alternate signal stack (a fiber that overflowed its
// stack cannot run a handler on it) and the watchdog timer.
class DispatchGuard {
 public:
  explicit DispatchGuard(double timeout_s) {
    static thread_local std::unique_ptr<char[]> alt_stack(new char[kAltStackBytes]);
    stack_t ss{};
    ss.ss_sp = alt_stack.get();
    ss.ss_size = kAltStackBytes;
    alt_stack_set_ = sigaltstack(&ss, &previous_stack_) == 0;
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    install(SIGSEGV, sa, g_previous_segv);
    install(SIGBUS, sa, g_previous_bus);
    if (timeout_s > 0 && watchdog_timer()) {
      itimerspec when{};
      when.it_value.tv_sec = time_t(timeout_s);
      when.it_value.tv_nsec = long((timeout_s - double(time_t(timeout_s))) * 1e9);
      if (when.it_value.tv_sec == 0 && when.it_value.tv_nsec == 0) when.it_value.tv_nsec = 1;
      when.it_interval.tv_nsec = kWatchdogRetryNs;
      g_watchdog_deadline_ns = monotonic_ns() + int64_t(timeout_s * 1e9);
      timer_armed_ = timer_settime(g_watchdog.timer, 0, &when, nullptr) == 0;
    }
    g_timeout_pending = 0;
    g_watchdog_misses = 0;
    g_fault = FaultRecord{};  // an escape from the scheduler has no pc of its own
    g_dispatch_thread = pthread_self();
    g_dispatching = 1;
  }
  ~DispatchGuard() {
    g_dispatching = 0;
    if (timer_armed_) {
      const itimerspec off{};
      timer_settime(g_watchdog.timer, 0, &off, nullptr);
    }
    g_watchdog_deadline_ns = 0;
    g_timeout_pending = 0;
    restore(SIGSEGV, g_previous_segv);
    restore(SIGBUS, g_previous_bus);
    if (alt_stack_set_) sigaltstack(&previous_stack_, nullptr);
  }
  DispatchGuard(const DispatchGuard&) = delete;
  DispatchGuard& operator=(const DispatchGuard&) = delete;

 private:
  static bool ours(const struct sigaction& sa) { return (sa.sa_flags & SA_SIGINFO) && sa.sa_sigaction == on_fault; }
  void install(int sig, const struct sigaction& sa, struct sigaction& previous) {
    struct sigaction old;
    sigaction(sig, &sa, &old);
    // Left installed by an interleaved dispatch of the other harness library: keep the real previous one.
    if (!ours(old)) previous = old;
  }
  static void restore(int sig, const struct sigaction& previous) { sigaction(sig, &previous, nullptr); }

  stack_t previous_stack_{};
  bool alt_stack_set_ = false;
  bool timer_armed_ = false;
};

// Records why the dispatch was abandoned (after the escape, in normal context).
void report_escape(Run& r, int why) {
  r.aborted = true;
  const Thread* t = r.current;
  const std::string who = t ? " (" + thread_name(r, *t) + ")" : "";
  if (why == kEscapeFinding) return;  // recorded before the escape
  uintptr_t pc = 0;
  std::string where;
  // Where the thread was: the faulting or interrupted instruction. Checked runs report the thread's latest
  // site instead (Thread::last_site_pc): instrumented code between callbacks often carries no line.
  const bool by_site = why == kEscapeWatchdog && g_checking && t && t->last_site_pc;
  if (by_site) pc = report_pc(t->last_site_pc, true);
  else if (in_shader_code(g_fault.pc)) pc = report_pc(g_fault.pc, false);
  else if (t && t->call_site_pc) pc = report_pc(t->call_site_pc, true);  // in runtime code the kernel called
  if (!pc && g_fault.pc && !in_image(g_fault.pc)) {
    // Outside the shader code (a libc or libm function the kernel called): the return address on top of the
    // fiber's stack is usually the call in the kernel.
    const uintptr_t stack_lo = t ? uintptr_t(r.stacks) + size_t(t->index) * kFiberStack + page_size() : 0;
    if (t && g_fault.sp >= stack_lo && g_fault.sp + sizeof(uintptr_t) <= stack_lo + kFiberStack - page_size())
      pc = report_pc(*reinterpret_cast<const uintptr_t*>(g_fault.sp), true);
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(g_fault.pc), &info) && info.dli_fname)
      where = std::string(", in ") + info.dli_fname;
  }
  if (why == kEscapeFault) {
    const char* access = g_fault.write == 1 ? "store to " : g_fault.write == 0 ? "load from " : "access to ";
    Place place = place_of(r, g_fault.addr);
    std::string what = std::string(access) + place.what;
    if (g_fault.signo == SIGSEGV && g_fault.code == SI_KERNEL) {
      // A general-protection fault: no address (a non-canonical pointer, or a misaligned vector access).
      place = Place{"wild-access", -1, ""};
      what = "an invalid address (a pointer far outside the address space, or a misaligned vector access)";
    } else if (g_fault.signo == SIGBUS) {
      what = "bus error at " + hex(g_fault.addr) + " (" + place.what + ")";
    }
    add_error(place.kind, nullptr, 0, pc, what + who + where + "; the dispatch was abandoned", place.buffer);
    r.report->aborted = place.kind;
  } else {
    const double limit = r.timeout_s;
    const char* file = nullptr;
    int line = 0;
    if (!pc) {  // escaped from the scheduler: point at where the threads are waiting
      for (const auto& th : r.th)
        if (!th.done && th.file) {
          file = th.file, line = th.line;
          break;
        }
    } else if (t && t->file) {
      // Beside the pc, the thread's latest SIMD-group operation or barrier: the report falls back to it where the
      // pc has no line (compiler-generated code, which a tick in a loop of SIMD-group operations can land in).
      file = t->file, line = t->line;
    }
    char seconds[32];
    std::snprintf(seconds, sizeof(seconds), "%g", limit);
    add_error("watchdog-timeout", file, line, pc,
              std::string("the dispatch ran longer than ") + seconds +
                  " s (TORCH_METAL_FUSED_EMU_TIMEOUT_S): an endless loop, or threads waiting for something that "
                  "never happens; abandoned here" + who + where);
    r.report->aborted = "watchdog-timeout";
  }
}

// The first and last byte in [lo, hi) that is not poison (nullptr if none), a word at a time.
std::pair<const unsigned char*, const unsigned char*> unpoisoned(const unsigned char* lo, const unsigned char* hi) {
  constexpr uint64_t kPoisonWord = ~uint64_t(0);
  static_assert(kPoison == 0xFF, "kPoisonWord");
  const unsigned char* first = nullptr;
  const unsigned char* last = nullptr;
  const unsigned char* p = lo;
  while (p < hi) {
    uint64_t w;
    if (size_t(hi - p) >= sizeof(w) && (std::memcpy(&w, p, sizeof(w)), w == kPoisonWord)) {
      p += sizeof(w);
      continue;
    }
    const unsigned char* end = std::min(hi, p + sizeof(w));
    for (; p < end; ++p)
      if (*p != kPoison) {
        if (!first) first = p;
        last = p;
      }
  }
  return {first, last};
}

// After a normal end: plain runs find stores into the poisoned bytes around each copy.
void check_poison(Run& r) {
  for (const auto& c : r.copies) {
    auto [first, last] = unpoisoned(c.rw, c.data);
    auto [first_after, last_after] = unpoisoned(c.data + c.size, c.rw + c.rw_bytes);
    if (!first) first = first_after;
    if (last_after) last = last_after;
    if (!first) continue;
    const int64_t a = int64_t(first - c.data), b = int64_t(last - c.data);
    const char* where = b < 0 ? "before its start" : a >= int64_t(c.size) ? "past its end, before the guard page"
                                                                          : "before its start and past its end";
    add_error("device-out-of-bounds", nullptr, 0, 0,
              "a store changed bytes " + std::to_string(a) + ".." + std::to_string(b) + " of buffer(" +
                  std::to_string(c.index) + "), which holds " + std::to_string(c.size) +
                  " bytes from its bind offset (" + where +
                  "; run under the checker, TORCH_METAL_FUSED_EMU_CHECK=1, for the line)",
              c.index);
  }
}

}  // namespace

// ---- the interface used by compiled shaders -----------------------------------------------------------
void simd_rendezvous(SimdResolver resolver, SimdOp op, const void* in, void* out, size_t size, uint32_t arg,
                     const char* file, int line) {
  KernelCall call(__builtin_return_address(0));
  Thread& t = current_thread();
  t.last_site_pc = uintptr_t(__builtin_return_address(0));
  std::memcpy(t.io.in, in, size);
  t.io.arg = arg;
  t.resolver = resolver;
  t.op = op;
  t.file = file, t.line = line;
  t.wait = Wait::simd;
  yield_to_scheduler();
  std::memcpy(out, t.io.out, size);
}

uint32_t simd_lane() { return current_thread().index % kSimdWidth; }

void barrier(const char* file, int line, int mem_flags) {
  KernelCall call(__builtin_return_address(0));
  Thread& t = current_thread();
  t.last_site_pc = uintptr_t(__builtin_return_address(0));
  t.file = file, t.line = line;
  t.barrier_flags = mem_flags;
  t.wait = Wait::barrier;
  yield_to_scheduler();
}

void* threadgroup_local(uint64_t site, size_t bytes, const char* file, int line) {
  KernelCall call(__builtin_return_address(0));
  Run& r = *g_run;
  size_t offset;
  {
    BusyScope busy;
    auto it = r.locals.find(site);
    if (it == r.locals.end()) {
      size_t off = r.arena_used;
      r.arena_used += (bytes + 15) & ~size_t(15);
      it = r.locals.emplace(site, off).first;
    }
    offset = it->second;
  }
  if (r.arena_used > kThreadgroupArena) {
    record_fatal("threadgroup-memory-limit", file, line,
                 "threadgroup memory " + std::to_string(r.arena_used) + " bytes exceeds the runner's arena of " +
                     std::to_string(kThreadgroupArena) + " (and Apple GPUs' 32 KiB)");
    escape(kEscapeFinding);
  }
  if (r.arena_used > kThreadgroupMemoryLimit && !r.tg_over_limit_reported) {
    r.tg_over_limit_reported = true;
    add_error("threadgroup-memory-limit", file, line, 0,
              "threadgroup memory " + std::to_string(r.arena_used) + " bytes exceeds Apple GPUs' 32 KiB");
  }
  return r.arena + offset;
}

void* buffer_address(int index, size_t min_bytes) {
  KernelCall call(__builtin_return_address(0));
  const auto& view = g_run->view;
  auto it = view.find(index);
  if (it == view.end()) {
    record_fatal("unbound-buffer", nullptr, 0,
                 "kernel " + g_run->enc->kernel + " reads buffer(" + std::to_string(index) +
                     "), which the host did not bind");
    escape(kEscapeFinding);
  }
  if (min_bytes && it->second.size() < min_bytes) {
    record_fatal("unbound-buffer", nullptr, 0,
                 "buffer(" + std::to_string(index) + ") holds " + std::to_string(it->second.size()) +
                     " bytes, the kernel's argument needs " + std::to_string(min_bytes));
    escape(kEscapeFinding);
  }
  return it->second.address();
}

void* threadgroup_argument(int index) {
  Run& r = *g_run;
  if (index < 0 || size_t(index) >= r.tg_args.size() || !r.enc->threadgroup_memory.count(index)) {
    record_fatal("unbound-threadgroup-memory", nullptr, 0,
                 "kernel uses threadgroup(" + std::to_string(index) + "), which the host did not size");
    escape(kEscapeFinding);
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
                                 size_t count, size_t arity, const ParamInfo* params, const char* file, int line) {
  if (count != arity) {
    std::fprintf(stderr, "tmf_emu: %s has %zu parameters but %zu bindings were parsed\n", host_name, arity, count);
    std::abort();
  }
  registry()[host_name] = KernelEntry{invoker, bindings, params, count, file, line};
}

// ---- the encoder's dispatch ----------------------------------------------------------------------------
bool kernel_exists(const std::string& name) { return registry().count(name) != 0; }

std::vector<std::string> kernel_names() {
  std::vector<std::string> names;
  for (auto& [n, e] : registry()) names.push_back(n);
  return names;
}

namespace {

// The threadgroup arena, between guard zones.
unsigned char* threadgroup_arena() {
  static unsigned char* arena = [] {
    static Mapping mapping;  // never released
    return map_guarded(mapping, kThreadgroupArena);
  }();
  return arena;
}

// The fiber stacks, each with a guard page at its low end (stacks grow down).
char* fiber_stacks() {
  static char* stacks = [] {
    void* p = mmap(nullptr, kFiberStack * kMaxThreadsPerThreadgroup, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) std::abort();
    char* base = static_cast<char*>(p);
    for (size_t i = 0; i < kMaxThreadsPerThreadgroup; ++i) mprotect(base + i * kFiberStack, page_size(), PROT_NONE);
    return base;
  }();
  return stacks;
}

// The alignment the kernel's parameter bound at `index` requires (16, Metal's largest, if none is).
size_t buffer_alignment(const KernelEntry& k, int index, bool* writable) {
  size_t alignment = 0;
  *writable = false;
  for (size_t i = 0; i < k.count; ++i)
    if (k.bindings[i].role == Role::buffer && k.bindings[i].index == index && k.params[i].alignment) {
      alignment = std::max<size_t>(alignment, k.params[i].alignment);
      *writable = *writable || k.params[i].writable;
    }
  return alignment ? alignment : 16;
}

}  // namespace

void run_dispatch(const EmuEncoder& enc, const Size3& groups, const Size3& threads, DispatchReport& report) {
  std::lock_guard<std::mutex> lock(g_dispatch_mutex);
  auto it = registry().find(enc.kernel);
  if (it == registry().end()) throw std::runtime_error("tmf_emu: no kernel named " + enc.kernel);
  Run r;
  r.timeout_s = timeout_seconds();
  r.kernel = &it->second;
  r.enc = &enc;
  r.report = &report;
  r.seed = schedule_seed();
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
    report.aborted = "threads-per-threadgroup";
    g_run = nullptr;
    return;
  }
  static Shadow* shadow = new Shadow[kThreadgroupArena / 2];
  find_image();
  r.arena = threadgroup_arena();
  r.stacks = fiber_stacks();
  r.shadow = shadow;
  // Every buffer is copied into a private allocation between guard zones (BufferCopy): an access past its end
  // faults (plain runs) or is reported (checked runs) instead of landing in a neighbouring tensor, which would
  // look like a legal access. Changed buffers are copied back after a dispatch that ran to its end.
  g_ranges.clear();
  r.copies.reserve(enc.buffers.size());
  try {
    // One storage bound twice (the same address and size, e.g. a gradient written over its input) shares one copy,
    // as on the GPU: a kernel that reads what it overwrites in place sees its own writes. The copy is placed at the
    // largest alignment any of its bindings' parameter types needs.
    struct Binding {
      int index;
      size_t alignment;
      bool writable;
      size_t copy;
    };
    std::vector<Binding> bindings;
    for (auto& [index, buf] : enc.buffers) {
      Binding bd{index, 0, false, 0};
      bd.alignment = buffer_alignment(*r.kernel, index, &bd.writable);
      size_t same = r.copies.size();
      if (!buf.argument_bytes && buf.size())
        for (size_t i = 0; i < r.copies.size(); ++i)
          if (!r.copies[i].host.argument_bytes && r.copies[i].host.address() == buf.address() &&
              r.copies[i].host.size() == buf.size())
            same = i;
      if (same == r.copies.size()) {
        r.copies.emplace_back();
        r.copies.back().index = r.copies.back().store_row = index, r.copies.back().host = buf;
      } else {
        r.copies[same].aliases.push_back(index);
      }
      bd.copy = same;
      BufferCopy& c = r.copies[same];
      if (bd.writable && !c.writable) c.store_row = index;
      c.writable = c.writable || bd.writable;
      bindings.push_back(bd);
    }
    for (size_t i = 0; i < r.copies.size(); ++i) {
      BufferCopy& c = r.copies[i];
      size_t alignment = 1;
      for (const Binding& bd : bindings)
        if (bd.copy == i) alignment = std::max(alignment, bd.alignment);
      place_copy(c, alignment, enc.checking);
      // Checked runs: a shadow for the storages the kernel may write (nothing races on memory no one writes).
      if (enc.checking && !c.host.argument_bytes && c.writable) c.shadow.assign((c.size + 1) / 2, DeviceShadow{});
    }
    for (const Binding& bd : bindings) {
      BufferCopy& c = r.copies[bd.copy];
      const BoundBuffer b{c.data, c.size, 0, c.host.argument_bytes};
      r.view[bd.index] = b;
      // A row for every bound buffer, even if untouched (std::map: the pointer stays valid).
      Traffic* traffic = b.argument_bytes ? nullptr : &report.traffic[bd.index];
      std::string names = "buffer(" + std::to_string(c.index) + ")";
      for (int alias : c.aliases) names += "/buffer(" + std::to_string(alias) + ")";
      Traffic* store_traffic = b.argument_bytes ? nullptr : &report.traffic[c.store_row];
      g_ranges.push_back({uintptr_t(c.data), uintptr_t(c.data) + c.size, bd.index, traffic,
                          c.shadow.empty() ? nullptr : c.shadow.data(), store_traffic, names});
    }
  } catch (...) {
    g_ranges.clear();
    g_run = nullptr;
    throw;
  }
  g_checking = enc.checking;
  {
    DispatchGuard guard(r.timeout_s);
    const int escaped = sigsetjmp(g_escape, 1);
    if (escaped == 0) {
      g_escape_armed = 1;
      run_threadgroups(r);
      g_escape_armed = 0;
    } else {
      // The threadgroup's fibers are abandoned where they stood; its arena and shadow are reset in full next time.
      report_escape(r, escaped);
      g_arena_dirty = g_shadow_dirty = kThreadgroupArena;
    }
  }
  r.current = nullptr;
  report.threadgroup_memory = std::max(report.threadgroup_memory, r.arena_used);
  if (!enc.checking && report.aborted.empty()) check_poison(r);
  if (report.aborted.empty()) {
    // Checked runs know what was written (every store to a copy counts on its store_row). Plain runs copy back every
    // writable copy, but compare first where its storage overlaps another copy's (a storage bound twice at the same
    // address and size shares one copy; a partial overlap, e.g. a view bound beside its base, keeps two), all before
    // any is copied back: the storage must not get the stale copy of the binding the kernel did not write.
    auto overlaps_another = [&](const BufferCopy& c) {
      const uintptr_t lo = uintptr_t(c.host.address()), hi = lo + c.size;
      for (const auto& o : r.copies)
        if (&o != &c && !o.host.argument_bytes && uintptr_t(o.host.address()) < hi &&
            lo < uintptr_t(o.host.address()) + o.size)
          return true;
      return false;
    };
    std::vector<char> changed(r.copies.size(), 0);
    for (size_t i = 0; i < r.copies.size(); ++i) {
      const BufferCopy& c = r.copies[i];
      if (c.host.argument_bytes || !c.size) continue;
      if (enc.checking) changed[i] = report.traffic[c.store_row].bytes_written != 0;
      else if (c.writable)
        changed[i] = !overlaps_another(c) || std::memcmp(c.host.address(), c.data, c.size) != 0;
    }
    for (size_t i = 0; i < r.copies.size(); ++i)
      if (changed[i]) std::memcpy(r.copies[i].host.address(), r.copies[i].data, r.copies[i].size);
  }
  g_checking = false;
  g_ranges.clear();
  g_run = nullptr;
  for (auto& c : r.copies) g_mapping_pool.give(std::move(c.mapping));
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
