/* vhostpy SIGBUS guard over guest memory: declarations shared by _guard.c and the cffi cdef.
 *
 * Parsed by cffi's cdef (see _native_build.py): plain C declarations only.
 *
 * Contract: memory.GuestMemory registers the host range [start, end) of every guest mapping
 * it creates from a front-end's fd right after mmap and unregisters it right before munmap.
 * A bus error (BUS_ADRERR: the page is past the end of the file, a truncated memfd) at an
 * address inside a registered range is absorbed: the handler maps a private anonymous zero
 * page over the faulting page, records the fault against that range and returns, so the
 * access completes (reads see zeros, writes are thrown away). Every other SIGBUS goes to the
 * handler that was installed before ours, so real crashes still crash. All functions may be
 * called from any thread; the fault records are read and written with atomics only.
 */

/* The first absorbed fault in one registered range, and how many pages were patched since. */
struct vp_guard_fault {
    uint64_t addr;   /* host address of the first fault; 0: none yet */
    uint64_t order;  /* process-wide sequence number of that fault (orders faults across ranges) */
    uint64_t count;  /* pages patched with zeros in this range */
    int32_t code;    /* si_code of the first fault */
};

/* Install the handler once per process (later calls only report). 0, or -1 with errno set. */
int vp_guard_install(void);

/* 1 while the process's SIGBUS disposition is our handler, 0 when another one replaced it
 * (faulthandler.enable() after the first mapping) or a foreign fault handed it back. */
int vp_guard_active(void);

/* Register [start, end) (host addresses, page aligned). A handle >= 0, or -1 if the table
 * is full or the range is empty. */
int64_t vp_guard_register(uint64_t start, uint64_t end);

/* Forget a range and its fault record (before the range is unmapped). 0, or -1 for a
 * handle that is not registered (already unregistered: harmless). */
int vp_guard_unregister(int64_t handle);

/* Copy the fault record of `handle` into *out. 1 if that range has faulted, 0 if not,
 * -1 for a handle that is not registered. */
int vp_guard_fault(int64_t handle, struct vp_guard_fault *out);

/* How many first faults were recorded process-wide so far: a caller that found no fault when
 * this had some value need not look again until it changes. */
uint64_t vp_guard_fault_order(void);

/* How many ranges are registered now (for tests: nothing leaks). */
uint32_t vp_guard_registered(void);
