/* vhostpy SIGBUS guard: survive a front-end that truncates guest RAM under a live mapping.
 *
 * A memfd shrunk with ftruncate after we mapped it makes every later access to the pages past
 * its new end raise SIGBUS (BUS_ADRERR), which would kill the process (and every front-end it
 * serves). The handler installed here looks the faulting address up in a table of the guest
 * mappings memory.py registered; inside one, it maps a private anonymous zero page over the
 * faulting page, records the fault and returns: the interrupted access is re-executed and
 * completes (a read sees zeros, a write lands on the throw-away page). GuestMemory.faulted()
 * reads the record, and the ring runner stops trusting that memory.
 *
 * Async-signal safety: the handler only uses atomics on a static table, mmap, sigaction and
 * raise (all system calls) and restores errno. Nothing allocates; no lock is taken.
 *
 * The table is a fixed array of slots, each guarded by a sequence counter (a seqlock): a
 * writer (register/unregister, any thread) claims a slot by moving its counter from even to
 * odd with a compare-and-swap, writes, and publishes the next even value with a release
 * store. The handler reads a slot's range between two reads of the counter and trusts it only
 * if both are the same even value. Fault records are updated by the handler with atomics and
 * read by Python (vp_guard_fault) on any thread.
 *
 * Flags: SA_SIGINFO for the fault address; SA_ONSTACK so that a thread with an alternate
 * signal stack (faulthandler gives the main thread one) runs the handler there — we do not
 * need one ourselves, a bus error on a data access is not a stack overflow and the handler
 * uses a few hundred bytes of whatever stack it gets. No SA_NODEFER: SIGBUS stays blocked
 * while the handler runs, so a fault inside it (a bug) kills the process instead of recursing,
 * and a signal re-raised for the previous handler is delivered only after we return.
 *
 * A SIGBUS we do not absorb (outside every range, not BUS_ADRERR, sent by kill, or a zero page
 * that cannot be mapped) is handed back: the previous disposition is reinstalled and, for a
 * fault, the access re-executes and faults again into it; a sent signal is raised again. So
 * the process dies exactly as it would have without us (faulthandler prints its traceback).
 */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "_guard.h"

#define GUARD_SLOTS 4096u   /* vhost-user allows 509 regions per front-end; room for many */

struct guard_slot {
    uint64_t seq;        /* even: stable; odd: a writer owns the slot */
    uint64_t start;      /* [start, end): host addresses, meaningful while `active` */
    uint64_t end;
    uint32_t active;
    int32_t code;        /* the record: written by the handler, read by vp_guard_fault */
    uint64_t addr;
    uint64_t order;
    uint64_t count;
};

static struct guard_slot slots[GUARD_SLOTS];
static uint32_t high_water;          /* slots[high_water..] have never been used */
static uint64_t fault_order;         /* last sequence number handed to a first fault */
static uint64_t page_size;
static struct sigaction previous;    /* the disposition before ours, to hand faults back to */
static int install_state;            /* 0 never, 1 being installed, 2 installed, 3 failed */
static int install_errno;

#define LOAD(p, order) __atomic_load_n((p), __ATOMIC_##order)
#define STORE(p, v, order) __atomic_store_n((p), (v), __ATOMIC_##order)

/* ---------------------------------------------------------------- the handler */

/* The slot whose registered range holds `addr` (its range copied out), or -1. */
static int find_slot(uint64_t addr, uint64_t *start, uint64_t *end) {
    uint32_t n = LOAD(&high_water, ACQUIRE);
    for (uint32_t i = 0; i < n; i++) {
        struct guard_slot *s = &slots[i];
        for (int attempt = 0; attempt < 64; attempt++) {
            uint64_t s1 = LOAD(&s->seq, ACQUIRE);
            if (s1 & 1)
                continue;  /* a writer is in the middle: look again */
            uint32_t active = LOAD(&s->active, RELAXED);
            uint64_t lo = LOAD(&s->start, RELAXED), hi = LOAD(&s->end, RELAXED);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (LOAD(&s->seq, RELAXED) != s1)
                continue;
            if (active && lo <= addr && addr < hi) {
                *start = lo;
                *end = hi;
                return (int)i;
            }
            break;
        }
    }
    return -1;
}

/* Map zeros over the page holding `addr`, staying inside [start, end). The page is the
 * system page, or a huge page when the mapping is hugetlbfs (the kernel refuses to split a
 * huge page mapping at a smaller boundary). 0 on success. */
static int patch(uint64_t addr, uint64_t start, uint64_t end) {
    const uint64_t sizes[3] = {page_size, 2ull << 20, 1ull << 30};
    for (int k = 0; k < 3; k++) {
        uint64_t len = sizes[k];
        uint64_t at = addr & ~(len - 1);
        if (at < start || at + len > end)
            break;
        void *p = mmap((void *)(uintptr_t)at, len, PROT_READ | PROT_WRITE,
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED)
            return 0;
        if (errno != EINVAL)
            break;
    }
    return -1;
}

static void record(int i, uint64_t addr, int code) {
    struct guard_slot *s = &slots[i];
    uint64_t none = 0;
    __atomic_fetch_add(&s->count, 1, __ATOMIC_RELAXED);
    if (__atomic_compare_exchange_n(&s->addr, &none, addr, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_RELAXED)) {
        STORE(&s->code, code, RELAXED);
        STORE(&s->order, __atomic_add_fetch(&fault_order, 1, __ATOMIC_RELAXED), RELEASE);
    }
}

static void hand_back(int sig, const siginfo_t *info) {
    sigaction(SIGBUS, &previous, NULL);
    if (info == NULL || info->si_code <= 0)
        raise(sig);  /* sent, not a fault: deliver it again, to the previous handler */
    /* A fault: returning re-executes the access, which faults into the previous handler. */
}

static void guard_handler(int sig, siginfo_t *info, void *ucontext) {
    int saved_errno = errno;
    (void)ucontext;
    if (info != NULL && info->si_code == BUS_ADRERR) {
        uint64_t addr = (uint64_t)(uintptr_t)info->si_addr, start, end;
        int i = find_slot(addr, &start, &end);
        if (i >= 0 && patch(addr, start, end) == 0) {
            record(i, addr, info->si_code);
            errno = saved_errno;
            return;
        }
    }
    hand_back(sig, info);
    errno = saved_errno;
}

/* ---------------------------------------------------------------- called from Python */

int vp_guard_install(void) {
    int expected = 0;
    if (__atomic_compare_exchange_n(&install_state, &expected, 1, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE)) {
        struct sigaction sa;
        long pg = sysconf(_SC_PAGESIZE);
        page_size = pg > 0 ? (uint64_t)pg : 4096;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = guard_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        /* Read the previous disposition before ours can run, so a fault handed back right
         * after the install finds it filled in. */
        if (sigaction(SIGBUS, NULL, &previous) != 0 || sigaction(SIGBUS, &sa, NULL) != 0) {
            install_errno = errno;
            STORE(&install_state, 3, RELEASE);
            return -1;
        }
        STORE(&install_state, 2, RELEASE);
        return 0;
    }
    while ((expected = LOAD(&install_state, ACQUIRE)) == 1)
        sched_yield();  /* another thread is installing: a few system calls away */
    if (expected == 3) {
        errno = install_errno;
        return -1;
    }
    return 0;
}

int vp_guard_active(void) {
    struct sigaction now;
    if (LOAD(&install_state, ACQUIRE) != 2 || sigaction(SIGBUS, NULL, &now) != 0)
        return 0;
    return (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == guard_handler;
}

int64_t vp_guard_register(uint64_t start, uint64_t end) {
    if (end <= start)
        return -1;
    for (uint32_t i = 0; i < GUARD_SLOTS; i++) {
        struct guard_slot *s = &slots[i];
        uint64_t seq = LOAD(&s->seq, ACQUIRE);
        if ((seq & 1) || LOAD(&s->active, RELAXED))
            continue;
        if (!__atomic_compare_exchange_n(&s->seq, &seq, seq + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED))
            continue;  /* another thread took it first */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        if (LOAD(&s->active, RELAXED)) {  /* registered between our two looks */
            STORE(&s->seq, seq + 2, RELEASE);
            continue;
        }
        STORE(&s->start, start, RELAXED);
        STORE(&s->end, end, RELAXED);
        STORE(&s->addr, 0, RELAXED);
        STORE(&s->order, 0, RELAXED);
        STORE(&s->count, 0, RELAXED);
        STORE(&s->code, 0, RELAXED);
        STORE(&s->active, 1, RELAXED);
        uint32_t hw = LOAD(&high_water, RELAXED);
        while (hw < i + 1 && !__atomic_compare_exchange_n(&high_water, &hw, i + 1, 0,
                                                          __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            ;
        STORE(&s->seq, seq + 2, RELEASE);
        return (int64_t)(((seq + 2) << 12) | i);
    }
    return -1;
}

/* The slot of a handle and the counter value it was registered under; NULL if malformed. */
static struct guard_slot *slot_of(int64_t handle, uint64_t *seq) {
    if (handle < 0)
        return NULL;
    uint64_t i = (uint64_t)handle & (GUARD_SLOTS - 1);
    *seq = (uint64_t)handle >> 12;
    return &slots[i];
}

int vp_guard_unregister(int64_t handle) {
    uint64_t seq;
    struct guard_slot *s = slot_of(handle, &seq);
    if (s == NULL || !__atomic_compare_exchange_n(&s->seq, &seq, seq + 1, 0, __ATOMIC_ACQ_REL,
                                                  __ATOMIC_RELAXED))
        return -1;  /* not registered under this handle (any more) */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    STORE(&s->active, 0, RELAXED);
    STORE(&s->start, 0, RELAXED);
    STORE(&s->end, 0, RELAXED);
    STORE(&s->seq, seq + 2, RELEASE);
    return 0;
}

int vp_guard_fault(int64_t handle, struct vp_guard_fault *out) {
    uint64_t seq;
    struct guard_slot *s = slot_of(handle, &seq);
    if (s == NULL || LOAD(&s->seq, ACQUIRE) != seq)
        return -1;
    out->order = LOAD(&s->order, ACQUIRE);
    out->addr = LOAD(&s->addr, ACQUIRE);
    out->code = LOAD(&s->code, RELAXED);
    out->count = LOAD(&s->count, RELAXED);
    if (LOAD(&s->seq, ACQUIRE) != seq)
        return -1;  /* unregistered while we read */
    return out->addr != 0;
}

uint64_t vp_guard_fault_order(void) {
    return LOAD(&fault_order, ACQUIRE);
}

uint32_t vp_guard_registered(void) {
    uint32_t n = 0, hw = LOAD(&high_water, ACQUIRE);
    for (uint32_t i = 0; i < hw; i++)
        n += LOAD(&slots[i].active, RELAXED) != 0;
    return n;
}
