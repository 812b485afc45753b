// cuemu.cpp — scheduler, fibers, worker pool, runtime API, tensor-core collectives and cp.async of the CUDA CPU
// emulation (see cuemu.h).
#include "cuemu.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ThreadSanitizer: every carrier is a TSan fiber, and switches synchronize (flag 0), so the fibers of a block
// never race with each other in TSan's eyes (the scheduler orders them); what TSan reports are races between
// blocks running on different workers, e.g. two blocks writing the same global element without atomics.
#if defined(__SANITIZE_THREAD__)
#define CUEMU_TSAN 1
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__) || defined(CUEMU_USE_UCONTEXT)
#define CUEMU_UCONTEXT 1
#include <ucontext.h>
#endif

namespace cuemu {
namespace detail {
namespace {

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

std::string coords(uint3 v) { return format("(%u,%u,%u)", v.x, v.y, v.z); }
std::string coords(dim3 v) { return format("(%u,%u,%u)", v.x, v.y, v.z); }

constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kDefaultDynamicLimit = 48 * 1024;
constexpr size_t kMaxSharedPerBlock = 227 * 1024;

// ---------------------------------------------------------------------------------------------------------
// Context switch. x86-64: save the callee-saved registers, MXCSR and the x87 control word on the current
// stack, store the stack pointer, load the other one, restore. No syscall (glibc swapcontext saves the
// signal mask with one and is ~10x slower).
#if !defined(CUEMU_UCONTEXT)
extern "C" void cuemu_switch_context(void** save_sp, void* new_sp);
extern "C" void cuemu_fiber_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl cuemu_switch_context
  .hidden cuemu_switch_context
  .type cuemu_switch_context,@function
cuemu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch_context,.-cuemu_switch_context

  .p2align 4
  .globl cuemu_fiber_trampoline
  .hidden cuemu_fiber_trampoline
  .type cuemu_fiber_trampoline,@function
cuemu_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size cuemu_fiber_trampoline,.-cuemu_fiber_trampoline
)");

struct Context {
  void* sp = nullptr;
};
// First switch into the fiber "returns" into the trampoline, which calls entry(arg) on an aligned stack.
void make_context(Context& c, char* stack_lo, size_t size, void (*entry)(void*), void* arg) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack_lo + size) & ~uintptr_t(15);
  (void)stack_lo;
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);
  uint16_t fcw;
  uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(fcw));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  sp[0] = fcw;
  sp[1] = mxcsr;
  sp[2] = 0;                                       // r15
  sp[3] = 0;                                       // r14
  sp[4] = reinterpret_cast<uint64_t>(entry);       // r13
  sp[5] = reinterpret_cast<uint64_t>(arg);         // r12
  sp[6] = 0;                                       // rbx
  sp[7] = 0;                                       // rbp = 0 ends frame-pointer backtraces
  sp[8] = reinterpret_cast<uint64_t>(&cuemu_fiber_trampoline);
  c.sp = sp;
}
inline void jump(Context& from, Context& to) { cuemu_switch_context(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void (*g_uc_entry)(void*);
void uc_trampoline(unsigned hi, unsigned lo, unsigned ehi, unsigned elo) {
  auto entry = reinterpret_cast<void (*)(void*)>((static_cast<uintptr_t>(ehi) << 32) | elo);
  entry(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
void make_context(Context& c, char* stack_lo, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  const uintptr_t a = reinterpret_cast<uintptr_t>(arg), e = reinterpret_cast<uintptr_t>(entry);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&uc_trampoline), 4, static_cast<unsigned>(a >> 32),
              static_cast<unsigned>(a), static_cast<unsigned>(e >> 32), static_cast<unsigned>(e));
}
inline void jump(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------------------------------
// Stacks: mmap'ed, with a PROT_NONE guard page below, so an overflow faults instead of corrupting memory.
size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t stack_bytes() {
  static const size_t s = [] {
#ifdef CUEMU_ASAN
    size_t kb = 256;  // ASan frames are several times larger
#else
    size_t kb = 64;
#endif
    if (const char* e = std::getenv("CONVNET_EMU_STACK_KB")) {
      long v = std::atol(e);
      if (v >= 16) kb = static_cast<size_t>(v);
    }
    const size_t p = page_size();
    return (kb * 1024 + p - 1) / p * p;
  }();
  return s;
}

struct Stack {
  char* base = nullptr;  // start of the mapping (guard page)
  char* lo = nullptr;    // usable stack [lo, lo + size)
  size_t size = 0;
};

// SIGSEGV handler that turns a fault in the guard page of the running fiber's stack into a readable message.
std::atomic<bool> g_handler_installed{false};
struct sigaction g_prev_segv;
bool describe_overflow(uintptr_t addr, char* buf, size_t n);  // after Worker, below

void segv_handler(int sig, siginfo_t* info, void* uctx) {
  char msg[512];
  if (describe_overflow(reinterpret_cast<uintptr_t>(info->si_addr), msg, sizeof msg)) {
    ssize_t r = write(2, msg, strlen(msg));
    (void)r;
  }
  // Hand over to whoever handled SIGSEGV before (Python's faulthandler, ASan, or the default action).
  sigaction(sig, &g_prev_segv, nullptr);
  (void)uctx;
}

void install_segv_handler() {
  if (g_handler_installed.exchange(true)) return;
  struct sigaction sa {};
  sa.sa_sigaction = &segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_prev_segv);
}

// An alternate signal stack for the current OS thread (the handler cannot run on an exhausted fiber stack).
void ensure_altstack() {
  thread_local bool done = false;
  if (done) return;
  done = true;
  stack_t cur{};
  if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return;  // someone installed one
  static thread_local std::unique_ptr<char[]> mem(new char[64 * 1024]);
  stack_t st{};
  st.ss_sp = mem.get();
  st.ss_size = 64 * 1024;
  sigaltstack(&st, nullptr);
}

Stack new_stack() {
  const size_t p = page_size(), sz = stack_bytes();
  void* m = mmap(nullptr, sz + p, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw EmulatorError("cuemu: cannot allocate a fiber stack (mmap failed)");
  if (mprotect(m, p, PROT_NONE) != 0) throw EmulatorError("cuemu: mprotect of a stack guard page failed");
  Stack s;
  s.base = static_cast<char*>(m);
  s.lo = s.base + p;
  s.size = sz;
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Fibers, blocks, workers
enum class FState : uint8_t { Runnable, Barrier, Warp, Done };

struct Fiber;

// A cp.async in flight: its data (read from global memory when issued) reaches dst at the wait that completes
// its group.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
  uint32_t bytes;
  uint32_t group;  // number of the cp.async-group it belongs to (the thread's commit count when issued)
};

// A carrier is a stack plus a context that runs CUDA threads. A thread that finishes hands its carrier
// straight to the next thread of the round if that one has not started yet (no context switch), so
// barrier-free kernels cost one switch per block rather than two per thread. A thread that blocks keeps its
// carrier until it finishes. Carriers persist across blocks and launches.
struct Carrier {
  Context ctx;
  char* stack_lo = nullptr;
  size_t stack_size = 0;  // usable bytes below the (colored) top
  Fiber* fiber = nullptr;
  bool fresh = true;  // context must be (re)made before the next resume
#ifdef CUEMU_ASAN
  void* fake_stack = nullptr;
#endif
#ifdef CUEMU_TSAN
  void* tsan_fiber = nullptr;
#endif
};

// One CUDA thread of the running block.
struct Fiber {
  Carrier* carrier = nullptr;
  uint3 tid{0, 0, 0};
  uint32_t linear = 0;
  FState state = FState::Done;
  bool started = false;
  const char* file = nullptr;  // where it waits (barrier or warp collective)
  int line = 0;
  WarpOp op = WarpOp::Sync;  // the warp collective it waits at (for error messages)
  uint32_t mask = 0;
  int reduce_pred = 0;
  std::vector<AsyncCopy> async_copies;  // issued, not yet completed by a wait
  uint32_t async_groups = 0;            // cp.async-groups committed so far
};

// Deposits of the lanes of one warp, kept compact so an arriving lane checks the waiting ones cheaply.
struct WarpState {
  uint32_t waiting = 0;  // lanes blocked in a collective
  uint32_t mask[32];
  WarpOp op[32];
  int32_t param[32];
  int32_t width[32];
  uint64_t value[32];
  uint64_t result[32];
};

// Watchdog: a fiber is never preempted, so a thread spinning on a value that another thread of its block
// (or a block that is not running) must write hangs the launch. Each worker publishes its progress here; a
// watchdog thread prints what is stuck after set_watchdog_seconds (default 120 s, env CONVNET_EMU_WATCHDOG_S).
struct WatchSlot {
  std::atomic<uint64_t> progress{0};
  std::atomic<uint64_t> block{0};   // x | y << 32 | z << 48
  std::atomic<uint32_t> thread{0};  // x | y << 10 | z << 20
  std::atomic<bool> busy{false};
};
constexpr int kMaxWorkers = 256;
WatchSlot g_watch[kMaxWorkers];
std::atomic<double> g_watchdog_seconds{-1};  // < 0: not yet read from the environment

inline void watch_progress(WatchSlot* slot, uint3 tid) {
  if (!slot) return;
  slot->progress.store(slot->progress.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  slot->thread.store(tid.x | tid.y << 10 | tid.z << 20, std::memory_order_relaxed);
}

struct SharedAlloc {
  const void* key;
  void* ptr;
  size_t bytes;
  size_t align;
};

struct alignas(64) Worker {  // aligned: workers of different OS threads share no cache line
  std::vector<std::unique_ptr<Carrier>> carriers;
  std::vector<Carrier*> free_carriers;
  std::thread::id owner;  // OS thread that last ran this worker (worker 0 runs on the launching thread)
  WatchSlot* watch = nullptr;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<uint32_t> order;
  size_t pos = 0;  // position of the scheduler in `order` (carriers advance it when they chain)
  Context sched;
  Fiber* current = nullptr;
  // the running block
  const LaunchSpec* spec = nullptr;
  uint3 bidx{0, 0, 0};
  uint32_t nthreads = 0;
  std::vector<SharedAlloc> shared;
  size_t static_shared = 0;
  size_t shared_limit = kDefaultDynamicLimit;  // static + dynamic limit for this launch
  void* dyn = nullptr;
  size_t dyn_bytes = 0;
  bool failed = false;
  std::string error;
  uint64_t rng = 0;
  int reduce_count = 0;
  int reduce_live = 0;
  // counters
  uint64_t blocks_run = 0, threads_run = 0, switches = 0, barrier_rounds = 0;
#ifdef CUEMU_ASAN
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
#ifdef CUEMU_TSAN
  void* tsan_sched = nullptr;
#endif
};

thread_local Worker* tl_worker = nullptr;

bool describe_overflow(uintptr_t addr, char* buf, size_t n) {
  const Worker* w = tl_worker;  // already initialized on this thread: safe to read in the handler
  if (!w || !w->current || !w->current->carrier) return false;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(w->current->carrier->stack_lo);
  if (addr >= lo || addr + page_size() < lo) return false;
  const uint3 t = w->current->tid, b = w->bidx;
  snprintf(buf, n,
           "\ncuemu: stack overflow in emulated CUDA thread (%u,%u,%u) of block (%u,%u,%u): its %zu KB fiber stack "
           "is exhausted. Reduce the kernel's local arrays or raise CONVNET_EMU_STACK_KB.\n",
           t.x, t.y, t.z, b.x, b.y, b.z, stack_bytes() / 1024);
  return true;
}

inline Fiber* current_fiber(const char* what, const char* file, int line) {
  Worker* w = tl_worker;
  if (!w || !w->current)
    throw EmulatorError(format("cuemu: %s called outside an emulated kernel at %s:%d", what, file, line));
  return w->current;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Idx: return "__shfl_sync";
    case WarpOp::Up: return "__shfl_up_sync";
    case WarpOp::Down: return "__shfl_down_sync";
    case WarpOp::Xor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::MatchAny: return "__match_any_sync";
    case WarpOp::MatchAll: return "__match_all_sync";
    case WarpOp::ReduceAddU: return "__reduce_add_sync";
    case WarpOp::ReduceMinU:
    case WarpOp::ReduceMinI: return "__reduce_min_sync";
    case WarpOp::ReduceMaxU:
    case WarpOp::ReduceMaxI: return "__reduce_max_sync";
    case WarpOp::ReduceAnd: return "__reduce_and_sync";
    case WarpOp::ReduceOr: return "__reduce_or_sync";
    case WarpOp::ReduceXor: return "__reduce_xor_sync";
    case WarpOp::MmaTf32: return "mma.sync.m16n8k8.tf32";
    case WarpOp::MmaBf16: return "mma.sync.m16n8k16.bf16";
    case WarpOp::Ldmatrix: return "ldmatrix";
  }
  return "?";
}

// "0-15,17,20-31"
std::string lane_list(uint32_t m) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!(m >> i & 1)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1)) ++j;
    if (!s.empty()) s += ",";
    s += (i == j) ? format("%d", i) : format("%d-%d", i, j);
    i = j + 1;
  }
  return s;
}

inline void carrier_to_scheduler(Worker& w, Carrier& c) {
#ifdef CUEMU_TSAN
  __tsan_switch_to_fiber(w.tsan_sched, 0);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(&c.fake_stack, w.sched_bottom, w.sched_size);
#endif
  jump(c.ctx, w.sched);
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(c.fake_stack, nullptr, nullptr);
#endif
}

inline void carrier_to_carrier(Carrier& from, Carrier& to) {
#ifdef CUEMU_TSAN
  __tsan_switch_to_fiber(to.tsan_fiber, 0);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(&from.fake_stack, to.stack_lo, to.stack_size);
#endif
  jump(from.ctx, to.ctx);
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

void carrier_main(void* arg);

Carrier* take_carrier(Worker& w) {
  if (w.free_carriers.empty()) {
    install_segv_handler();
    const Stack s = new_stack();
    auto c = std::make_unique<Carrier>();
    // Color the stack tops (64-byte steps within a page) so that the hot top frames of many carriers do
    // not all map to the same cache sets.
    const size_t color = (w.carriers.size() % 64) * 64;
    c->stack_lo = s.lo;
    c->stack_size = s.size - color;
#ifdef CUEMU_TSAN
    c->tsan_fiber = __tsan_create_fiber(0);
#endif
    w.free_carriers.push_back(c.get());
    w.carriers.push_back(std::move(c));
  }
  Carrier* c = w.free_carriers.back();
  w.free_carriers.pop_back();
  return c;
}

// Gives f a carrier (and a fresh context if needed) and makes it the current thread. Returns its carrier.
inline Carrier& prepare(Worker& w, Fiber& f) {
  if (!f.started) {
    Carrier* c = take_carrier(w);
    c->fiber = &f;
    f.carrier = c;
    f.started = true;
  }
  Carrier& c = *f.carrier;
  if (c.fresh) {
#ifdef CUEMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(c.stack_lo, c.stack_size);  // frames of an abandoned thread may be left
    c.fake_stack = nullptr;
#endif
    make_context(c.ctx, c.stack_lo, c.stack_size, &carrier_main, &c);
    c.fresh = false;
  }
  w.current = &f;
  threadIdx = f.tid;
  ++w.switches;
  watch_progress(w.watch, f.tid);
  return c;
}

// Scheduler side: run f (and whatever its carrier switches to) until control comes back.
inline void resume(Worker& w, Fiber& f) {
  Carrier& c = prepare(w, f);
#ifdef CUEMU_TSAN
  w.tsan_sched = __tsan_get_current_fiber();
  __tsan_switch_to_fiber(c.tsan_fiber, 0);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(&w.sched_fake, c.stack_lo, c.stack_size);
#endif
  jump(w.sched, c.ctx);
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
  w.current = nullptr;
}

// The next runnable entry of this round's order (w.pos moves to it), or null at the end of the round.
inline Fiber* next_runnable(Worker& w) {
  if (w.failed) return nullptr;
  for (size_t p = w.pos + 1; p < w.order.size(); ++p) {
    Fiber& g = w.fibers[w.order[p]];
    if (g.state == FState::Runnable) {
      w.pos = p;
      return &g;
    }
  }
  w.pos = w.order.size() - 1;
  return nullptr;
}

// A thread blocked (barrier, warp collective): switch straight to the next runnable thread of the round, or
// back to the scheduler when the round is over. One switch per resume instead of two.
inline void block_current(Worker& w, Fiber& f) {
  Carrier& from = *f.carrier;
  if (Fiber* next = next_runnable(w))
    carrier_to_carrier(from, prepare(w, *next));
  else
    carrier_to_scheduler(w, from);
}

void record_fiber_error(Worker& w, const Fiber& f, const std::string& what) {
  if (w.failed) return;
  w.failed = true;
  const std::string msg = what.rfind("cuemu: ", 0) == 0 ? what.substr(7) : what;
  w.error = format("cuemu: kernel error in block %s, thread %s: ", coords(w.bidx).c_str(), coords(f.tid).c_str()) +
            msg;
}

// Every carrier runs this loop (entered via the trampoline). Errors are caught on the carrier's own stack:
// nothing unwinds across a context switch.
void carrier_main(void* arg) {
  Carrier* c = static_cast<Carrier*>(arg);
  Worker* w = tl_worker;  // a carrier never changes OS thread (see work())
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  for (;;) {
    Fiber* f = c->fiber;
    try {
      w->spec->invoke(w->spec->kernel, w->spec->args);
    } catch (const std::exception& e) {
      record_fiber_error(*w, *f, e.what());
    } catch (...) {
      record_fiber_error(*w, *f, "unknown C++ exception");
    }
    f->state = FState::Done;
    f->carrier = nullptr;
    Fiber* next = next_runnable(*w);
    if (next && !next->started) {  // chain: run it on this carrier, no switch
      c->fiber = next;
      next->carrier = c;
      next->started = true;
      w->current = next;
      threadIdx = next->tid;
      watch_progress(w->watch, next->tid);
      continue;
    }
    c->fiber = nullptr;
    w->free_carriers.push_back(c);
    // Resumed later with a new thread in c->fiber.
    if (next)
      carrier_to_carrier(*c, prepare(*w, *next));
    else
      carrier_to_scheduler(*w, *c);
  }
}

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Global settings. The initial schedule comes from CONVNET_EMU_SCHEDULE ("forward", "reverse", "random" or
// "random:SEED"), so a whole test run can be repeated under another order without code changes.
std::atomic<int> g_order{static_cast<int>(Schedule::Forward)};
std::atomic<uint64_t> g_seed{0};
const bool g_schedule_from_env = [] {
  const char* e = std::getenv("CONVNET_EMU_SCHEDULE");
  if (!e || !*e) return false;
  const std::string v = e;
  const std::string name = v.substr(0, v.find(':'));
  uint64_t seed = 0;
  if (v.find(':') != std::string::npos) seed = std::strtoull(v.c_str() + v.find(':') + 1, nullptr, 0);
  Schedule s;
  if (name == "forward") s = Schedule::Forward;
  else if (name == "reverse") s = Schedule::Reverse;
  else if (name == "random") s = Schedule::Random;
  else {
    std::fprintf(stderr, "cuemu: ignoring CONVNET_EMU_SCHEDULE=%s (expected forward, reverse, random or random:SEED)\n", e);
    return false;
  }
  g_order.store(static_cast<int>(s));
  g_seed.store(seed);
  return true;
}();
std::mutex g_attr_mu;
std::unordered_map<AnyFn, int> g_max_dyn;
thread_local cudaError_t tl_last_error = cudaSuccess;

std::string describe_wait(const Fiber& g) {
  switch (g.state) {
    case FState::Done: return "exited";
    case FState::Runnable: return "running";
    case FState::Barrier: return format("at __syncthreads %s:%d", g.file, g.line);
    case FState::Warp:
      return format("waiting at %s %s:%d with mask 0x%08x", op_name(g.op), g.file, g.line, g.mask);
  }
  return "?";
}

// No fiber can run. Release a barrier if every live thread waits at the same one; otherwise throw an error
// describing the deadlock. Returns false when the block is finished.
bool resolve_stuck(Worker& w) {
  const uint32_t n = w.nthreads;
  uint32_t done = 0, barrier = 0, warp = 0;
  for (uint32_t i = 0; i < n; ++i) {
    switch (w.fibers[i].state) {
      case FState::Done: ++done; break;
      case FState::Barrier: ++barrier; break;
      case FState::Warp: ++warp; break;
      case FState::Runnable: break;
    }
  }
  if (done == n) return false;
  const std::string where = format("block %s", coords(w.bidx).c_str());
  if (warp > 0) {
    for (uint32_t i = 0; i < n; ++i) {
      const Fiber& f = w.fibers[i];
      if (f.state != FState::Warp) continue;
      const uint32_t base = i & ~31u;
      uint32_t arrived = 0;
      for (uint32_t l = 0; l < 32 && base + l < n; ++l) {
        const Fiber& g = w.fibers[base + l];
        if (g.state == FState::Warp && g.mask == f.mask && g.op == f.op) arrived |= 1u << l;
      }
      std::string msg = format("%s: warp collective deadlock in warp %u: lanes %s wait at %s %s:%d with mask 0x%08x;",
                               where.c_str(), base / 32, lane_list(arrived).c_str(), op_name(f.op), f.file, f.line,
                               f.mask);
      // Group the missing lanes by what they are doing.
      uint32_t missing = f.mask & ~arrived;
      std::vector<std::pair<std::string, uint32_t>> groups;
      for (uint32_t l = 0; l < 32; ++l) {
        if (!(missing >> l & 1)) continue;
        std::string d = describe_wait(w.fibers[base + l]);
        bool found = false;
        for (auto& g : groups)
          if (g.first == d) { g.second |= 1u << l; found = true; }
        if (!found) groups.emplace_back(d, 1u << l);
      }
      for (size_t k = 0; k < groups.size(); ++k)
        msg += format("%s missing lanes %s %s", k ? "," : "", lane_list(groups[k].second).c_str(),
                      groups[k].first.c_str());
      throw EmulatorError(msg);
    }
  }
  // Everyone alive waits at a __syncthreads.
  const Fiber* first = nullptr;
  bool same = true;
  for (uint32_t i = 0; i < n; ++i) {
    const Fiber& f = w.fibers[i];
    if (f.state != FState::Barrier) continue;
    if (!first) first = &f;
    else if (f.line != first->line || (f.file != first->file && std::strcmp(f.file, first->file) != 0))
      same = false;
  }
  if (!same) {
    std::vector<std::pair<const Fiber*, uint32_t>> sites;
    for (uint32_t i = 0; i < n; ++i) {
      const Fiber& f = w.fibers[i];
      if (f.state != FState::Barrier) continue;
      bool found = false;
      for (auto& s : sites)
        if (s.first->line == f.line && std::strcmp(s.first->file, f.file) == 0) { ++s.second; found = true; }
      if (!found) sites.emplace_back(&f, 1);
    }
    std::string msg = where + ": divergent __syncthreads:";
    for (size_t k = 0; k < sites.size(); ++k)
      msg += format("%s %u threads at %s:%d", k ? "," : "", sites[k].second, sites[k].first->file,
                    sites[k].first->line);
    if (done) msg += format(", %u threads exited", done);
    throw EmulatorError(msg);
  }
  if (done) {
    const Fiber* ex = nullptr;
    for (uint32_t i = 0; i < n && !ex; ++i)
      if (w.fibers[i].state == FState::Done) ex = &w.fibers[i];
    throw EmulatorError(format("thread %s of block %s exited while %u threads wait at __syncthreads at %s:%d%s",
                               coords(ex->tid).c_str(), coords(w.bidx).c_str(), barrier, first->file, first->line,
                               done > 1 ? format(" (%u threads exited)", done).c_str() : ""));
  }
  int count = 0;
  for (uint32_t i = 0; i < n; ++i) {
    count += w.fibers[i].reduce_pred;
    w.fibers[i].state = FState::Runnable;
  }
  w.reduce_count = count;
  w.reduce_live = static_cast<int>(n);
  ++w.barrier_rounds;
  return true;
}

void free_block_memory(Worker& w) {
  for (auto& s : w.shared) ::operator delete(s.ptr, std::align_val_t(s.align));
  w.shared.clear();
  if (w.dyn) ::operator delete(w.dyn, std::align_val_t(16));
  w.dyn = nullptr;
}

void ensure_fibers(Worker& w, uint32_t n) {
  if (w.fibers.size() < n) w.fibers.resize(n);
  if (w.warps.size() < (n + 31) / 32) w.warps.resize((n + 31) / 32);
  for (uint32_t i = 0; i < (n + 31) / 32; ++i) w.warps[i].waiting = 0;
  if (w.order.capacity() < n) w.order.reserve(n);
}

// Runs one block to completion or to its first error (then w.failed and w.error are set).
void run_block(Worker& w, uint64_t linear_block, Schedule order, uint64_t seed) {
  const LaunchSpec& spec = *w.spec;
  const uint64_t gx = spec.grid.x, gy = spec.grid.y;
  w.bidx = uint3{static_cast<unsigned>(linear_block % gx), static_cast<unsigned>((linear_block / gx) % gy),
                 static_cast<unsigned>(linear_block / (gx * gy))};
  blockIdx = w.bidx;
  if (w.watch)
    w.watch->block.store(w.bidx.x | uint64_t(w.bidx.y) << 32 | uint64_t(w.bidx.z) << 48, std::memory_order_relaxed);
  blockDim = spec.block;
  gridDim = spec.grid;
  const uint32_t bx = spec.block.x, by = spec.block.y;
  const uint32_t n = bx * by * spec.block.z;
  w.nthreads = n;
  ensure_fibers(w, n);
  w.static_shared = 0;
  w.dyn_bytes = spec.dyn_shmem;
  w.dyn = ::operator new(spec.dyn_shmem, std::align_val_t(16));
  std::memset(w.dyn, 0xFF, spec.dyn_shmem);
  w.rng = seed ^ ((linear_block + 1) * 0xD1B54A32D192ED03ull);
  w.reduce_count = w.reduce_live = 0;
  ++w.blocks_run;
  uint3 tid{0, 0, 0};
  for (uint32_t i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.tid = tid;
    if (++tid.x == bx) {
      tid.x = 0;
      if (++tid.y == by) tid.y = 0, ++tid.z;
    }
    f.linear = i;
    f.state = FState::Runnable;
    f.started = false;
    f.carrier = nullptr;
    f.reduce_pred = 0;
    f.async_copies.clear();  // copies a thread of the previous block left pending die with its shared memory
    f.async_groups = 0;
  }
  try {
    for (;;) {
      w.order.clear();
      for (uint32_t i = 0; i < n; ++i)
        if (w.fibers[i].state == FState::Runnable) w.order.push_back(i);
      if (w.order.empty()) {
        if (!resolve_stuck(w)) break;
        continue;
      }
      if (order == Schedule::Reverse) {
        std::reverse(w.order.begin(), w.order.end());
      } else if (order == Schedule::Random) {
        for (size_t i = w.order.size() - 1; i > 0; --i) {
          const size_t j = static_cast<size_t>((splitmix(w.rng) >> 32) * (i + 1) >> 32);
          std::swap(w.order[i], w.order[j]);
        }
      }
      for (w.pos = 0; w.pos < w.order.size(); ++w.pos) {
        Fiber& f = w.fibers[w.order[w.pos]];
        if (f.state != FState::Runnable) continue;
        resume(w, f);
        if (w.failed) break;
      }
      if (w.failed) break;
    }
  } catch (const std::exception& e) {
    if (!w.failed) {
      w.failed = true;
      w.error = std::string("cuemu: ") + e.what();
    }
  }
  for (uint32_t i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    w.threads_run += f.started;
    if (f.carrier) {  // abandoned mid-kernel after an error: its stack holds dead frames, start it afresh
      f.carrier->fiber = nullptr;
      f.carrier->fresh = true;
      w.free_carriers.push_back(f.carrier);
      f.carrier = nullptr;
    }
  }
  free_block_memory(w);
}

// ---------------------------------------------------------------------------------------------------------
// Worker pool. The launching thread is worker 0; helpers are persistent threads woken per launch.
struct Job {
  const LaunchSpec* spec = nullptr;
  uint64_t total = 0;
  Schedule order = Schedule::Forward;
  uint64_t seed = 0;
  size_t shared_limit = 0;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  uint64_t err_block = UINT64_MAX;
  std::string err;
};

void work(Worker& w, Job& job) {
  ensure_altstack();
  // A suspended carrier may hold thread-local addresses of the OS thread it ran on: when worker 0 moves to
  // another launching thread, restart all its carriers (they are all idle between blocks).
  if (w.owner != std::this_thread::get_id()) {
    w.owner = std::this_thread::get_id();
    for (auto& c : w.carriers) c->fresh = true;
  }
#ifdef CUEMU_ASAN
  {  // the scheduler runs on this OS thread's own stack; carriers switch back to it
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &addr, &size);
      pthread_attr_destroy(&attr);
    }
    w.sched_bottom = addr;
    w.sched_size = size;
  }
#endif
  tl_worker = &w;
  w.spec = job.spec;
  w.shared_limit = job.shared_limit;
  if (w.watch) w.watch->busy.store(true, std::memory_order_relaxed);
  while (!job.stop.load(std::memory_order_relaxed)) {
    const uint64_t b = job.next.fetch_add(1, std::memory_order_relaxed);
    if (b >= job.total) break;
    w.failed = false;
    run_block(w, b, job.order, job.seed);
    if (w.failed) {
      std::lock_guard<std::mutex> lk(job.mu);
      if (b < job.err_block) {  // report the lowest failing block: deterministic across worker counts
        job.err_block = b;
        job.err = w.error;
      }
      job.stop.store(true, std::memory_order_relaxed);
    }
  }
  w.current = nullptr;
  tl_worker = nullptr;
  if (w.watch) w.watch->busy.store(false, std::memory_order_relaxed);
}

double watchdog_seconds() {
  double s = g_watchdog_seconds.load();
  if (s < 0) {
    s = 120;
    if (const char* e = std::getenv("CONVNET_EMU_WATCHDOG_S")) s = std::max(0.0, std::atof(e));
    double expected = -1;
    g_watchdog_seconds.compare_exchange_strong(expected, s);
    s = g_watchdog_seconds.load();
  }
  return s;
}

// Runs for the life of the process (detached; it only touches the static watch slots).
void watchdog_loop() {
  uint64_t last[kMaxWorkers] = {};
  double stalled[kMaxWorkers] = {};
  bool reported[kMaxWorkers] = {};
  const double tick = 0.25;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double limit = watchdog_seconds();
    for (int i = 0; i < kMaxWorkers; ++i) {
      WatchSlot& s = g_watch[i];
      const uint64_t p = s.progress.load(std::memory_order_relaxed);
      if (!s.busy.load(std::memory_order_relaxed) || p != last[i]) {
        last[i] = p;
        stalled[i] = 0;
        reported[i] = false;
        continue;
      }
      stalled[i] += tick;
      if (limit > 0 && stalled[i] >= limit && !reported[i]) {
        reported[i] = true;
        const uint64_t b = s.block.load(std::memory_order_relaxed);
        const uint32_t t = s.thread.load(std::memory_order_relaxed);
        std::fprintf(stderr,
                     "cuemu watchdog: no progress for %.0f s in block (%u,%u,%u), thread (%u,%u,%u) running. The "
                     "emulator switches threads only at __syncthreads and warp collectives, so a thread spinning on "
                     "a value that another thread of its block (or a block not yet running) must write never "
                     "finishes.\n",
                     stalled[i], unsigned(b & 0xffffffffu), unsigned((b >> 32) & 0xffff), unsigned(b >> 48),
                     t & 1023u, (t >> 10) & 1023u, t >> 20);
        std::fflush(stderr);
      }
    }
  }
}

class Pool {
 public:
  std::mutex launch_mu;  // one launch at a time (Python may call from several threads without the GIL)

  int size() {
    if (workers_.empty()) resize(0);
    return static_cast<int>(workers_.size());
  }
  // Requires launch_mu.
  void resize(int n) {
    if (n <= 0) {
      n = static_cast<int>(std::thread::hardware_concurrency());
      if (const char* e = std::getenv("CONVNET_EMU_THREADS")) n = std::atoi(e);
      if (n <= 0) n = 1;
    }
    n = std::min(n, kMaxWorkers);
    if (!workers_.empty() && static_cast<int>(workers_.size()) == n) return;
    stop_helpers();
    workers_.clear();
    for (int i = 0; i < n; ++i) {
      workers_.push_back(std::make_unique<Worker>());
      workers_.back()->watch = &g_watch[i];
    }
    quit_ = false;
    // New helpers must not take the previous generation for a new job.
    for (int i = 1; i < n; ++i) threads_.emplace_back([this, i, g = generation_] { helper_loop(i, g); });
  }
  // Requires launch_mu.
  void run(Job& job) {
    size();
    if (!watchdog_started_) {
      watchdog_started_ = true;
      std::thread(&watchdog_loop).detach();
    }
    const int helpers = static_cast<int>(std::min<uint64_t>(workers_.size(), job.total)) - 1;
    if (helpers > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &job;
      wanted_ = helpers;
      active_ = helpers;
      ++generation_;
      cv_work_.notify_all();
    }
    work(*workers_[0], job);
    if (helpers > 0) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_done_.wait(lk, [&] { return active_ == 0; });
      job_ = nullptr;
    }
  }
  LaunchStats collect() {
    LaunchStats s;
    for (auto& w : workers_) {
      s.blocks_run += w->blocks_run;
      s.threads_run += w->threads_run;
      s.switches += w->switches;
      s.barrier_rounds += w->barrier_rounds;
      w->blocks_run = w->threads_run = w->switches = w->barrier_rounds = 0;
    }
    return s;
  }

 private:
  void helper_loop(int i, uint64_t seen) {
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_work_.wait(lk, [&] { return quit_ || (generation_ != seen && i <= wanted_); });
        if (quit_) return;
        seen = generation_;
        job = job_;
      }
      work(*workers_[i], *job);
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) cv_done_.notify_all();
    }
  }
  void stop_helpers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
      cv_work_.notify_all();
    }
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  uint64_t generation_ = 0;
  int wanted_ = 0;
  int active_ = 0;
  bool quit_ = false;
  bool watchdog_started_ = false;
  Job* job_ = nullptr;
};

// Never destroyed: helper threads may still wait on it while the process exits. A forked child has none of
// the parent's helper threads (and maybe a locked mutex): it starts over with a new pool, leaking the old one.
Pool* g_pool = nullptr;
Pool& pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_pool = new Pool;
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool; });
  });
  return *g_pool;
}
LaunchStats g_last_stats;

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Entry points used by the header
void run_launch(const LaunchSpec& spec) {
  // Errors are thrown, not left in cudaGetLastError(): a later, unrelated CUDA_CHECK(cudaGetLastError()) must
  // not fail because an earlier test provoked an emulator error on purpose.
  auto fail = [](cudaError_t code, const std::string& msg) {
    (void)code;
    throw EmulatorError("cuemu: invalid launch configuration: " + msg);
  };
  if (tl_worker && tl_worker->current)
    throw EmulatorError("cuemu: kernel launch from inside a kernel (dynamic parallelism) is not supported");
  const dim3 g = spec.grid, b = spec.block;
  if (!g.x || !g.y || !g.z) fail(cudaErrorInvalidConfiguration, "grid " + coords(g) + " has a zero dimension");
  if (!b.x || !b.y || !b.z) fail(cudaErrorInvalidConfiguration, "block " + coords(b) + " has a zero dimension");
  if (b.x > 1024 || b.y > 1024 || b.z > 64)
    fail(cudaErrorInvalidConfiguration, "block " + coords(b) + " exceeds the per-dimension limits (1024,1024,64)");
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads > 1024)
    fail(cudaErrorInvalidConfiguration,
         "block " + coords(b) + format(" has %llu threads (at most 1024)", (unsigned long long)threads));
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    fail(cudaErrorInvalidConfiguration, "grid " + coords(g) + " exceeds the limits (2147483647,65535,65535)");
  size_t dyn_limit = kDefaultDynamicLimit;
  bool raised = false;
  {
    std::lock_guard<std::mutex> lk(g_attr_mu);
    auto it = g_max_dyn.find(spec.kernel);
    if (it != g_max_dyn.end()) {
      dyn_limit = static_cast<size_t>(it->second);
      raised = true;
    }
  }
  if (spec.dyn_shmem > kMaxSharedPerBlock)
    fail(cudaErrorInvalidValue, format("%zu bytes of dynamic shared memory (at most %zu per block)", spec.dyn_shmem,
                                       kMaxSharedPerBlock));
  if (spec.dyn_shmem > dyn_limit)
    fail(cudaErrorInvalidValue,
         format("%zu bytes of dynamic shared memory exceed this kernel's limit of %zu; raise it with "
                "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)",
                spec.dyn_shmem, dyn_limit));

  Pool& p = pool();
  std::lock_guard<std::mutex> lk(p.launch_mu);
  Job job;
  job.spec = &spec;
  job.total = uint64_t(g.x) * g.y * g.z;
  job.order = static_cast<Schedule>(g_order.load());
  job.seed = g_seed.load();
  job.shared_limit = raised ? kMaxSharedPerBlock : kStaticSharedLimit;
  p.run(job);
  g_last_stats = p.collect();
  if (job.err_block != UINT64_MAX) throw EmulatorError(job.err);
}

void set_func_max_dynamic_shared(AnyFn kernel, int bytes) {
  std::lock_guard<std::mutex> lk(g_attr_mu);
  g_max_dyn[kernel] = bytes;
}

void assert_fail(const char* expr, const char* file, int line, const char* func) {
  throw EmulatorError(format("assertion `%s` failed at %s:%d in %s", expr, file, line, func));
}

void syncthreads(const char* file, int line) {
  Fiber* f = current_fiber("__syncthreads()", file, line);
  Worker& w = *tl_worker;
  f->state = FState::Barrier;
  f->file = file;
  f->line = line;
  block_current(w, *f);
  f->reduce_pred = 0;
}

int syncthreads_reduce(int pred, int op, const char* file, int line) {
  Fiber* f = current_fiber("__syncthreads_count/and/or", file, line);
  Worker& w = *tl_worker;
  f->reduce_pred = pred;
  f->state = FState::Barrier;
  f->file = file;
  f->line = line;
  block_current(w, *f);
  f->reduce_pred = 0;
  if (op == 0) return w.reduce_count;
  if (op == 1) return w.reduce_count == w.reduce_live;
  return w.reduce_count > 0;
}

void* shared_alloc(const void* key, size_t bytes, size_t align, const char* name, const char* file, int line) {
  Fiber* f = current_fiber("SHARED", file, line);
  (void)f;
  Worker& w = *tl_worker;
  for (const auto& s : w.shared)
    if (s.key == key) return s.ptr;
  const size_t total = w.static_shared + bytes;
  if (total > kStaticSharedLimit)
    throw EmulatorError(format("static shared memory exceeds 48 KB per block: SHARED %s (%zu bytes) at %s:%d "
                               "brings the block's total to %zu bytes",
                               name, bytes, file, line, total));
  if (total + w.dyn_bytes > w.shared_limit)
    throw EmulatorError(format("shared memory exceeds %zu bytes per block: SHARED %s (%zu bytes) at %s:%d plus "
                               "%zu bytes of dynamic shared memory",
                               w.shared_limit, name, bytes, file, line, w.dyn_bytes));
  align = std::max<size_t>(align, 16);
  void* p = ::operator new(bytes, std::align_val_t(align));
  std::memset(p, 0xFF, bytes);  // poison: reads of unwritten shared memory give NaN / -1
  w.shared.push_back(SharedAlloc{key, p, bytes, align});
  w.static_shared = total;
  return p;
}

bool in_shared_memory(const void* p, size_t bytes) {
  const Worker* w = tl_worker;
  if (!w || !w->current) return false;
  const auto inside = [p, bytes](const void* base, size_t size) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(base);
    return a >= b && a - b <= size && bytes <= size - (a - b);
  };
  if (w->dyn && inside(w->dyn, w->dyn_bytes)) return true;
  for (const auto& s : w->shared)
    if (inside(s.ptr, s.bytes)) return true;
  return false;
}

void* dynamic_shared(size_t align) {
  current_fiber("DYNAMIC_SHARED", "?", 0);
  if (align > 16) throw EmulatorError("cuemu: DYNAMIC_SHARED of a type aligned to more than 16 bytes");
  return tl_worker->dyn;
}

uint64_t warp_collective(WarpOp op, uint32_t mask, uint64_t value, int param, int width, const char* file,
                         int line) {
  Fiber* f = current_fiber(op_name(op), file, line);
  Worker& w = *tl_worker;
  const uint32_t lane = f->linear & 31u, base = f->linear & ~31u;
  const uint32_t nlanes = std::min<uint32_t>(32, w.nthreads - base);
  const uint32_t exists = nlanes == 32 ? 0xffffffffu : ((1u << nlanes) - 1);
  if (!(mask >> lane & 1))
    throw EmulatorError(format("%s at %s:%d: mask 0x%08x does not include the calling lane %u", op_name(op), file,
                               line, mask, lane));
  if (mask & ~exists)
    throw EmulatorError(format("%s at %s:%d: mask 0x%08x names lanes %s, which do not exist (warp %u of this "
                               "block has %u threads)",
                               op_name(op), file, line, mask, lane_list(mask & ~exists).c_str(), base / 32, nlanes));
  if ((op == WarpOp::Idx || op == WarpOp::Up || op == WarpOp::Down || op == WarpOp::Xor) &&
      (width < 1 || width > 32 || (width & (width - 1))))
    throw EmulatorError(format("%s at %s:%d: width %d is not a power of two in [1, 32]", op_name(op), file, line,
                               width));
  f->op = op;
  f->mask = mask;
  f->file = file;
  f->line = line;
  WarpState& ws = w.warps[base / 32];
  Fiber* lanes = &w.fibers[base];
  uint32_t arrived = 1u << lane;
  for (uint32_t rest = ws.waiting; rest; rest &= rest - 1) {
    const uint32_t l = static_cast<uint32_t>(__builtin_ctz(rest));
    if (!(ws.mask[l] & mask)) continue;  // a disjoint group of the same warp: fine
    if (ws.mask[l] != mask || ws.op[l] != op)
      throw EmulatorError(format("mismatched warp collectives in warp %u: lane %u at %s %s:%d with mask 0x%08x, "
                                 "lane %u at %s %s:%d with mask 0x%08x",
                                 base / 32, l, op_name(ws.op[l]), lanes[l].file, lanes[l].line, ws.mask[l], lane,
                                 op_name(op), file, line, mask));
    arrived |= 1u << l;
  }
  ws.mask[lane] = mask;
  ws.op[lane] = op;
  ws.value[lane] = value;
  ws.param[lane] = param;
  ws.width[lane] = width;
  if (arrived != mask) {
    ws.waiting |= 1u << lane;
    f->state = FState::Warp;
    block_current(w, *f);
    return ws.result[lane];
  }
  // Last lane of the group: compute every lane's result at once, then release the others.
  switch (op) {
    case WarpOp::Sync: break;
    case WarpOp::Idx:
    case WarpOp::Up:
    case WarpOp::Down:
    case WarpOp::Xor:
      for (uint32_t l = 0; l < 32; ++l) {
        if (!(mask >> l & 1)) continue;
        // PTX shfl.sync semantics: segment [minLane, maxLane]; out-of-segment sources read the own value.
        const int64_t segmask = (32 - ws.width[l]) & 31;
        const int64_t cval = op == WarpOp::Up ? 0 : 31;
        const int64_t maxl = (int64_t(l) & segmask) | (cval & ~segmask), minl = int64_t(l) & segmask;
        const int64_t b = static_cast<uint32_t>(ws.param[l]);
        int64_t j;
        bool ok;
        if (op == WarpOp::Up) {
          j = int64_t(l) - b;
          ok = j >= maxl;
        } else if (op == WarpOp::Down) {
          j = int64_t(l) + b;
          ok = j <= maxl;
        } else if (op == WarpOp::Xor) {
          j = int64_t(l) ^ b;
          ok = j <= maxl;
        } else {
          j = minl | (b & 31 & ~segmask);
          ok = j <= maxl;
        }
        if (!ok) j = l;
        if (!(mask >> j & 1))
          throw EmulatorError(format("%s at %s:%d: lane %u reads lane %lld, which is not in mask 0x%08x (undefined "
                                     "on the GPU)",
                                     op_name(op), lanes[l].file, lanes[l].line, l, static_cast<long long>(j), mask));
        ws.result[l] = ws.value[j];
      }
      break;
    case WarpOp::Ballot:
    case WarpOp::Any:
    case WarpOp::All: {
      uint32_t bal = 0;
      for (uint32_t l = 0; l < 32; ++l)
        if ((mask >> l & 1) && ws.value[l]) bal |= 1u << l;
      const uint64_t r = op == WarpOp::Ballot ? bal : op == WarpOp::Any ? (bal != 0) : (bal == mask);
      for (uint32_t l = 0; l < 32; ++l) ws.result[l] = r;
      break;
    }
    case WarpOp::MmaTf32:
    case WarpOp::MmaBf16:
    case WarpOp::Ldmatrix: {
      void* payload[32];
      for (uint32_t l = 0; l < 32; ++l) {
        payload[l] = reinterpret_cast<void*>(static_cast<uintptr_t>(ws.value[l]));
        ws.result[l] = 0;
      }
      if (op != WarpOp::Ldmatrix) {
        mma_sync(op, payload);
        break;
      }
      for (uint32_t l = 0; l < 32; ++l)
        if (ws.param[l] != param)
          throw EmulatorError(format("ldmatrix with different qualifiers in one warp (undefined on the GPU): lane %u "
                                     ".x%d%s at %s:%d, lane %u .x%d%s at %s:%d",
                                     lane, param & 7, param & 8 ? ".trans" : "", file, line, l, ws.param[l] & 7,
                                     ws.param[l] & 8 ? ".trans" : "", lanes[l].file, lanes[l].line));
      ldmatrix_sync(param & 7, (param & 8) != 0, payload, file, line);
      break;
    }
    case WarpOp::MatchAny:
      for (uint32_t l = 0; l < 32; ++l) {
        if (!(mask >> l & 1)) continue;
        uint32_t m = 0;
        for (uint32_t k = 0; k < 32; ++k)
          if ((mask >> k & 1) && ws.value[k] == ws.value[l]) m |= 1u << k;
        ws.result[l] = m;
      }
      break;
    case WarpOp::MatchAll: {
      bool all = true;
      for (uint32_t l = 0; l < 32; ++l)
        if ((mask >> l & 1) && ws.value[l] != value) all = false;
      for (uint32_t l = 0; l < 32; ++l) ws.result[l] = all ? (uint64_t(1) << 32 | mask) : 0;
      break;
    }
    default: {
      uint32_t acc = static_cast<uint32_t>(value);
      for (uint32_t l = 0; l < 32; ++l) {
        if (!(mask >> l & 1) || l == lane) continue;
        const uint32_t v = static_cast<uint32_t>(ws.value[l]);
        switch (op) {
          case WarpOp::ReduceAddU: acc += v; break;
          case WarpOp::ReduceMinU: acc = std::min(acc, v); break;
          case WarpOp::ReduceMaxU: acc = std::max(acc, v); break;
          case WarpOp::ReduceMinI:
            acc = static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
            break;
          case WarpOp::ReduceMaxI:
            acc = static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
            break;
          case WarpOp::ReduceAnd: acc &= v; break;
          case WarpOp::ReduceOr: acc |= v; break;
          case WarpOp::ReduceXor: acc ^= v; break;
          default: break;
        }
      }
      for (uint32_t l = 0; l < 32; ++l) ws.result[l] = acc;
      break;
    }
  }
  ws.waiting &= ~mask;
  for (uint32_t rest = mask & ~(1u << lane); rest; rest &= rest - 1)
    lanes[__builtin_ctz(rest)].state = FState::Runnable;
  return ws.result[lane];
}

// Kernel code that (re)included <assert.h> after cuemu.h uses glibc's assert, which calls this noexcept,
// noreturn function: it cannot throw, so inside a kernel it records the error and leaves the thread's carrier
// suspended for good (the block is abandoned and the carrier restarted). Hidden, so it only binds the
// emulator's own module; outside a kernel it behaves like glibc's.
extern "C" __attribute__((visibility("hidden"), noreturn)) void __assert_fail(const char* assertion, const char* file,
                                                                              unsigned int line,
                                                                              const char* function) noexcept {
  Worker* w = tl_worker;
  if (w && w->current) {
    Fiber& f = *w->current;
    try {
      record_fiber_error(*w, f, format("assertion `%s` failed at %s:%u in %s", assertion, file, line, function));
    } catch (...) {
    }
    for (;;) carrier_to_scheduler(*w, *f.carrier);
  }
  std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, assertion);
  std::abort();
}

unsigned activemask() {
  Fiber* f = current_fiber("__activemask", "?", 0);
  Worker& w = *tl_worker;
  const uint32_t base = f->linear & ~31u;
  const uint32_t nlanes = std::min<uint32_t>(32, w.nthreads - base);
  unsigned m = 0;
  for (uint32_t l = 0; l < nlanes; ++l)
    if (w.fibers[base + l].state != FState::Done) m |= 1u << l;
  return m;
}

}  // namespace detail

// ---- tensor cores: what the last lane of an mma / ldmatrix collective computes for the whole warp ----------
// Fragment ownership is the PTX ISA's ("Matrix Fragments for mma.m16n8k8", .tf32; "Matrix Fragments for
// mma.m16n8k16 with floating point type", .bf16), with groupID = lane >> 2 and threadID_in_group = lane % 4.
// These tables are the emulator's own; kernels carry theirs (csrc/kernels/mma_fragments.cuh), and
// tests/test_tensor_core_intrinsics.py checks both against tables written out by hand from the ISA.
namespace detail {
namespace {

struct RowCol {
  int row, col;
};

// m16n8k8 .tf32 A (16x8), one element per register: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4).
RowCol tf32_a(int lane, int i) { return {(lane >> 2) + 8 * (i & 1), (lane & 3) + 4 * (i >> 1)}; }
// m16n8k8 .tf32 B (8x8): b0 (t, g), b1 (t+4, g).
RowCol tf32_b(int lane, int i) { return {(lane & 3) + 4 * i, lane >> 2}; }
// m16n8k16 .bf16 A (16x16), element i = 0..7 (register i / 2, low half first): rows g for i in {0,1,4,5}, else
// g+8; columns 2t + (i & 1), plus 8 for i >= 4.
RowCol bf16_a(int lane, int i) {
  return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
}
// m16n8k16 .bf16 B (16x8), element i = 0..3: rows 2t + (i & 1), plus 8 for i >= 2; column g.
RowCol bf16_b(int lane, int i) { return {2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2}; }
// C and D of both shapes (16x8 f32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
RowCol accumulator(int lane, int i) { return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)}; }

// A .tf32 operand as the tensor core reads it: the low 13 bits are not looked at.
float tf32_operand(uint32_t bits) { return std::bit_cast<float>(bits & 0xffffe000u); }
float bf16_half(uint32_t reg, int half) { return bf16_to_float(static_cast<uint16_t>(reg >> (16 * half))); }

}  // namespace

void mma_sync(WarpOp op, void* const lanes[32]) {
  const bool tf32 = op == WarpOp::MmaTf32;
  const int k_dim = tf32 ? 8 : 16;
  float a[16][16], b[16][8], c[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaLane& p = *static_cast<const MmaLane*>(lanes[l]);
    if (tf32) {
      for (int i = 0; i < 4; ++i) a[tf32_a(l, i).row][tf32_a(l, i).col] = tf32_operand(p.a[i]);
      for (int i = 0; i < 2; ++i) b[tf32_b(l, i).row][tf32_b(l, i).col] = tf32_operand(p.b[i]);
    } else {
      for (int i = 0; i < 8; ++i) a[bf16_a(l, i).row][bf16_a(l, i).col] = bf16_half(p.a[i / 2], i & 1);
      for (int i = 0; i < 4; ++i) b[bf16_b(l, i).row][bf16_b(l, i).col] = bf16_half(p.b[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) c[accumulator(l, i).row][accumulator(l, i).col] = p.c[i];
  }
  // The products of TF32 or BF16 values are exact in float64, and so is nearly every sum of 8 or 16 of them: the
  // result is (all but always) the exact sum rounded once, whatever order the hardware uses.
  float d[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double acc = c[m][n];
      for (int k = 0; k < k_dim; ++k) acc += double(a[m][k]) * double(b[k][n]);
      d[m][n] = static_cast<float>(acc);
    }
  for (int l = 0; l < 32; ++l) {
    MmaLane& p = *static_cast<MmaLane*>(lanes[l]);
    for (int i = 0; i < 4; ++i) p.d[i] = d[accumulator(l, i).row][accumulator(l, i).col];
  }
}

void ldmatrix_sync(int count, bool trans, void* const lanes[32], const char* file, int line) {
  if (count != 1 && count != 2 && count != 4)
    throw EmulatorError(format("ldmatrix at %s:%d: .x%d is not .x1, .x2 or .x4", file, line, count));
  for (int l = 0; l < 8 * count; ++l) {
    const void* row = static_cast<const LdmatrixLane*>(lanes[l])->row;
    if (reinterpret_cast<uintptr_t>(row) % 16)
      throw EmulatorError(format("ldmatrix at %s:%d: lane %d's row address %p is not 16-byte aligned", file, line,
                                  l, row));
    if (!in_shared_memory(row, 16))
      throw EmulatorError(format("ldmatrix at %s:%d: lane %d's row address %p is not in this block's shared memory",
                                  file, line, l, row));
  }
  // element(i, r, col): 16-bit element `col` of row r of matrix i (rows are the addresses of lanes 8i .. 8i+7).
  const auto element = [lanes](int i, int r, int col) {
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(static_cast<const LdmatrixLane*>(lanes[8 * i + r])->row) + 2 * col, 2);
    return static_cast<uint32_t>(v);
  };
  for (int l = 0; l < 32; ++l) {
    LdmatrixLane& p = *static_cast<LdmatrixLane*>(lanes[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < count; ++i)
      p.r[i] = trans ? element(i, 2 * t, g) | element(i, 2 * t + 1, g) << 16
                     : element(i, g, 2 * t) | element(i, g, 2 * t + 1) << 16;
  }
}

}  // namespace detail

// ---- cp.async --------------------------------------------------------------------------------------------
void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cache_global, const char* file, int line) {
  detail::Fiber* f = detail::current_fiber("cp.async", file, line);
  const char* name = cache_global ? "cp.async.cg" : "cp.async.ca";
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    throw EmulatorError(detail::format("%s at %s:%d: cp-size %d is not 4, 8 or 16", name, file, line, cp_size));
  if (cache_global && cp_size != 16)
    throw EmulatorError(detail::format("%s at %s:%d: .cg copies 16 bytes, not %d", name, file, line, cp_size));
  if (src_size < 0 || src_size > cp_size)
    throw EmulatorError(
        detail::format("%s at %s:%d: src-size %d is outside [0, %d]", name, file, line, src_size, cp_size));
  if (reinterpret_cast<uintptr_t>(dst) % cp_size || reinterpret_cast<uintptr_t>(src) % cp_size)
    throw EmulatorError(detail::format("%s at %s:%d: source %p and destination %p must be aligned to %d bytes", name,
                                       file, line, src, dst, cp_size));
  if (!detail::in_shared_memory(dst, cp_size))
    throw EmulatorError(detail::format("%s at %s:%d: the destination %p is not in this block's shared memory", name,
                                       file, line, dst));
  if (detail::in_shared_memory(src, 1))
    throw EmulatorError(detail::format("%s at %s:%d: the source %p is shared memory, not global memory", name, file,
                                       line, src));
  detail::AsyncCopy c{static_cast<unsigned char*>(dst), {}, static_cast<uint32_t>(cp_size), f->async_groups};
  std::memcpy(c.data, src, static_cast<size_t>(src_size));  // zero-filled beyond src_size by {}
  std::memset(dst, 0xFF, static_cast<size_t>(cp_size));     // poison until the group is waited for
  f->async_copies.push_back(c);
}

void cp_async_commit_group(const char* file, int line) {
  ++detail::current_fiber("cp.async.commit_group", file, line)->async_groups;
}

void cp_async_wait_group(int n, const char* file, int line) {
  detail::Fiber* f = detail::current_fiber("cp.async.wait_group", file, line);
  if (n < 0) throw EmulatorError(detail::format("cp.async.wait_group at %s:%d: N = %d < 0", file, line, n));
  // Groups 0 .. async_groups-1 are committed; all but the n newest complete now.
  const uint32_t complete_below = f->async_groups > uint32_t(n) ? f->async_groups - uint32_t(n) : 0;
  auto& copies = f->async_copies;
  size_t kept = 0;
  for (size_t i = 0; i < copies.size(); ++i) {
    if (copies[i].group < complete_below)
      std::memcpy(copies[i].dst, copies[i].data, copies[i].bytes);
    else
      copies[kept++] = copies[i];
  }
  copies.resize(kept);
}

void set_schedule(Schedule s, uint64_t seed) {
  detail::g_order.store(static_cast<int>(s));
  detail::g_seed.store(seed);
}
ScheduleSetting schedule() {
  return ScheduleSetting{static_cast<Schedule>(detail::g_order.load()), detail::g_seed.load()};
}
const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::Forward: return "forward";
    case Schedule::Reverse: return "reverse";
    case Schedule::Random: return "random";
  }
  return "?";
}
void set_num_workers(int n) {
  if (n < 0) throw EmulatorError("cuemu: set_num_workers needs n >= 1 (or 0 for the default)");
  auto& p = detail::pool();
  std::lock_guard<std::mutex> lk(p.launch_mu);
  p.resize(n);
}
int num_workers() {
  auto& p = detail::pool();
  std::lock_guard<std::mutex> lk(p.launch_mu);
  return p.size();
}
void set_watchdog_seconds(double seconds) { detail::g_watchdog_seconds.store(std::max(0.0, seconds)); }

LaunchStats last_launch_stats() {
  auto& p = detail::pool();
  std::lock_guard<std::mutex> lk(p.launch_mu);
  return detail::g_last_stats;
}

}  // namespace cuemu

long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------------------------------------
// Runtime API
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() {
  cudaError_t e = cuemu::detail::tl_last_error;
  cuemu::detail::tl_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cuemu::detail::tl_last_error; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches are synchronous
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = cuemu::num_workers(); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) { return cudaMemsetAsync(p, value, bytes, nullptr); }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}
