/* vhostpy compiled fast path: the virtio-net polling loop (see _fastpath_net.h).
 *
 * Only public functions of _fastpath.c are used, in the order the per-burst Python path
 * calls them (tx burst, tx signal, then the consumer, then the rx signal), so a ring served
 * here ends in the same state, with the same counters, as one served a burst at a time.
 * Reflecting uses vp_net_reflect_burst, which leaves the same state as those two calls with
 * one copy of each frame instead of two.
 * The loop stops at the first empty burst (or, with `spin_ns`, once the ring stayed empty that
 * long: a loop whose frames come straight back then stays here instead of paying a return
 * to Python per round trip), after `max_bursts`, when the receive ring cannot
 * take a whole reflected burst (what did not fit is left in `out` for Python's backlog), or
 * when a ring turned out hostile.
 */
#include <stdint.h>
#include <stddef.h>
#include <time.h>
#include "_fastpath.h"
#include "_fastpath_net.h"

static uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

int vp_net_tx_poll(struct vp_vq *q, struct vp_net_stats *st, struct vp_frames *out,
                   struct vp_net_poll *p) {
    p->bursts = 0;
    if (p->hdr_len != 10 && p->hdr_len != 12) return VP_ERR_HDR_LEN;
    int keep = p->mode != VP_TX_SINK;
    uint32_t burst = p->burst;
    if (keep && burst > out->max) burst = out->max;
    uint64_t empty_since = 0;
    while (p->bursts < p->max_bursts) {
        int n, stalled = 0;
        if (p->mode == VP_TX_REFLECT) {
            n = vp_net_reflect_burst(q, p->rxq, p->hdr_len, p->csum, p->mrg, p->max_len, burst,
                                     st, p->rx_st, p->backlog, out, &stalled);
        } else {
            if (keep) out->n = 0, out->used = 0;
            n = vp_net_tx_burst(q, p->hdr_len, p->csum, burst, st, keep ? out : NULL);
        }
        if (n < 0) return n;   /* not reached: hdr_len was checked above */
        if (n == 0) {
            if (q->broken) return VP_POLL_BROKEN;
            if (!p->spin_ns) return VP_POLL_EMPTY;
            uint64_t now = monotonic_ns();
            if (!empty_since) empty_since = now;
            else if (now - empty_since >= p->spin_ns) return VP_POLL_EMPTY;
            cpu_relax();
            continue;
        }
        empty_since = 0;
        /* a burst cut short by a hostile chain is still completed, then the loop ends */
        p->bursts++;
        if (p->signal) vp_signal(q, p->call_fd);
        if (p->mode == VP_TX_REFLECT) {
            if (p->rx_signal) vp_signal(p->rxq, p->rx_call_fd);
            if (stalled) return VP_POLL_STALLED;   /* `out` holds what waits */
        } else if (p->mode == VP_TX_CLASSIFY && out->n) {
            vp_switch_classify(p->sw, out, p->src, p->now, p->horizon, p->dest);
        }
        if (q->broken) return VP_POLL_BROKEN;
    }
    return VP_POLL_BUDGET;
}
