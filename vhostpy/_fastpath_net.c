/* vhostpy compiled fast path: the virtio-net polling loop (see _fastpath_net.h).
 *
 * Only public functions of _fastpath.c are used, in the order the per-burst Python path
 * calls them (tx burst, tx signal, then the consumer, then the rx signal), so a ring served
 * here ends in the same state, with the same counters, as one served a burst at a time.
 * The loop stops at the first empty burst, after `max_bursts`, when the receive ring cannot
 * take a whole reflected burst (the rest is left in `out` for Python's backlog), or when a
 * ring turned out hostile.
 */
#include <stdint.h>
#include <stddef.h>
#include "_fastpath.h"
#include "_fastpath_net.h"

int vp_net_tx_poll(struct vp_vq *q, struct vp_net_stats *st, struct vp_frames *out,
                   struct vp_net_poll *p) {
    int keep = p->mode != VP_TX_SINK;
    uint32_t burst = p->burst;
    if (keep && burst > out->max) burst = out->max;
    p->bursts = 0;
    p->placed = 0;
    while (p->bursts < p->max_bursts) {
        if (keep) out->n = 0, out->used = 0;
        int n = vp_net_tx_burst(q, p->hdr_len, burst, st, keep ? out : NULL, -1);
        if (n == 0) return q->broken ? VP_POLL_BROKEN : VP_POLL_EMPTY;
        /* a burst cut short by a hostile chain is still completed, then the loop ends */
        p->bursts++;
        if (p->signal) vp_signal(q, p->call_fd);
        if (keep && out->n) {
            if (p->mode == VP_TX_CLASSIFY) {
                vp_switch_classify(p->sw, out, p->src, p->now, p->horizon, p->dest);
            } else {   /* VP_TX_REFLECT */
                int done = vp_net_rx_place(p->rxq, p->hdr_len, p->mrg, p->max_len, out, NULL,
                                           out->n, 1, p->rx_st, p->backlog, NULL, 0, 0, -1);
                if (p->rx_signal) vp_signal(p->rxq, p->rx_call_fd);
                if ((uint32_t)done < out->n) {   /* no room (or a hostile receive ring) */
                    p->placed = (uint32_t)done;
                    return VP_POLL_STALLED;
                }
            }
        }
        if (q->broken) return VP_POLL_BROKEN;
    }
    return VP_POLL_BUDGET;
}
