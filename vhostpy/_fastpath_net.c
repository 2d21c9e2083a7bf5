/* vhostpy compiled fast path: the virtio-net polling loop (see _fastpath_net.h).
 *
 * Only public functions of _fastpath.c are used, in the order the per-burst Python path
 * calls them (tx burst, tx signal, then the consumer, then the rx signal), so a ring served
 * here ends in the same state, with the same counters, as one served a burst at a time.
 * Reflecting uses vp_net_reflect_burst, which leaves the same state as those two calls with
 * one copy of each frame instead of two; switching for a port alone on its switch uses
 * vp_net_tx_switch_burst, which learns from each frame where it lies and copies none.
 * The loop stops at the first empty burst (or, with `spin_ns`, once the ring stayed empty that
 * long: a loop whose frames come straight back then stays here instead of paying a return
 * to Python per round trip), after `max_bursts`, when the receive ring cannot
 * take a whole reflected burst (what did not fit is left in `out` for Python's backlog), or
 * when a ring turned out hostile.
 *
 * The other direction: vp_net_rx_offer places frames (a generator's template, offered
 * cyclically) into a receive ring chunk after chunk with vp_net_rx_place, signalling after
 * each chunk, and may keep doing so while the driver posts buffers (NetPort.offer's `wait`);
 * vp_net_read_frames reads a burst of frames from a tap's fd into a frames buffer.
 */
#include <stdint.h>
#include <stddef.h>
#include <time.h>
#include <errno.h>
#include <unistd.h>
#include <string.h>
#include "_fastpath.h"
#include "_fastpath_net.h"
#include "_fastpath_nethdr.h"

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

/* Looks at an empty ring's next descriptor between two empty bursts, and the most pauses
 * between two looks. */
enum { WAIT_LOOKS = 32, WAIT_PAUSES_MAX = 16 };

/* Wait a little for the driver's next chain, looking at its descriptor alone (not a whole
 * empty burst per look), the looks spaced out more and more (1, 2, 4 ... pauses, then
 * WAIT_PAUSES_MAX: ~250 ns here). Each look while the driver writes that descriptor's cache
 * line takes the line away from it: looking every pause slowed DPDK's txonly front-end by a
 * tenth in lean runs on this VM (packed, 64 B) against the spaced looks; the first looks stay
 * quick, for a lone frame's latency. */
static void wait_available(const struct vp_vq *q) {
    uint32_t pauses = 1;
    for (int look = 0; look < WAIT_LOOKS && !vp_has_available(q); look++) {
        for (uint32_t i = 0; i < pauses; i++) cpu_relax();
        if (pauses < WAIT_PAUSES_MAX) pauses *= 2;
    }
}

int vp_net_tx_poll(struct vp_vq *q, struct vp_net_stats *st, struct vp_frames *out,
                   struct vp_net_poll *p) {
    p->bursts = 0;
    if (p->hdr_len != 10 && p->hdr_len != 12) return VP_ERR_HDR_LEN;
    uint32_t burst = p->burst;
    if (p->mode == VP_TX_REFLECT && burst > out->max) burst = out->max;
    uint64_t empty_since = 0;
    while (p->bursts < p->max_bursts) {
        int n, stalled = 0;
        if (p->mode == VP_TX_REFLECT) {
            n = vp_net_reflect_burst(q, p->rxq, p->hdr_len, p->csum, p->mrg, p->max_len, burst,
                                     st, p->rx_st, p->backlog, out, &stalled);
        } else if (p->mode == VP_TX_CLASSIFY) {
            n = vp_net_tx_switch_burst(q, p->hdr_len, p->csum, burst, st, p->sw, p->src,
                                       p->now, p->horizon);
        } else {
            n = vp_net_tx_burst(q, p->hdr_len, p->csum, burst, st, NULL);
        }
        if (n < 0) return n;   /* not reached: hdr_len was checked above */
        if (n == 0) {
            if (q->broken) return VP_POLL_BROKEN;
            if (!p->spin_ns) return VP_POLL_EMPTY;
            uint64_t now = monotonic_ns();
            if (!empty_since) empty_since = now;
            else if (now - empty_since >= p->spin_ns) return VP_POLL_EMPTY;
            wait_available(q);
            continue;
        }
        empty_since = 0;
        /* a burst cut short by a hostile chain is still completed, then the loop ends */
        p->bursts++;
        if (p->signal) vp_signal(q, p->call_fd);
        if (p->mode == VP_TX_REFLECT) {
            if (p->rx_signal) vp_signal(p->rxq, p->rx_call_fd);
            if (stalled) return VP_POLL_STALLED;   /* `out` holds what waits */
        }
        if (q->broken) return VP_POLL_BROKEN;
    }
    return VP_POLL_BUDGET;
}

/* ------------------------------------------------------------- frames toward the guest */


#define ETH_HLEN 14u

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Whether `cap` takes `n` more records of up to `max_len` bytes (record() in _fastpath.c
 * skips a record that does not fit: never let it). */
static int cap_room(const struct vp_frames *cap, uint32_t n, uint32_t max_len) {
    return cap->max - cap->n >= n && cap->cap - cap->used >= (uint64_t)n * (16u + max_len);
}

/* A capture record of `len` frame bytes (room checked by the caller with cap_room), the
 * same bytes _fastpath.c's record() writes. */
static void cap_record(struct vp_frames *cap, const uint8_t *data, uint32_t len, uint32_t sec,
                       uint32_t usec) {
    uint8_t *p = cap->buf + cap->used;
    uint32_t h[4] = {sec, usec, len, len};
    memcpy(p, h, 16);
    memcpy(p + 16, data, len);
    cap->off[cap->n] = cap->used + 16;
    cap->len[cap->n] = len;
    cap->n++;
    cap->used += 16 + (uint64_t)len;
}

enum { OFFER_SEGS = 4 * VP_OFFER_MAX_CHUNK };

/* The common case of a chunk, in one pass: pop up to n receive chains at once (one read of
 * the avail index) and write frame idx[k] into chain k when it fits in that chain's one
 * writable buffer, contiguous in one region (what Linux and DPDK post); publish them with one
 * used index update. Stops at the first frame that needs more (several buffers, a refusal,
 * a drop): the chains popped for it and after it are given back, newest first, so
 * vp_net_rx_place finds the ring as if nothing had been popped past it. Returns the frames
 * placed; *dry: the ring had fewer than n chains (it ran dry, nothing is left to try). */
static uint32_t place_simple(struct vp_vq *q, struct vp_net_offer *o, const uint32_t *idx,
                             uint32_t n, uint32_t sec, uint32_t usec, int *dry) {
    struct vp_chain chains[VP_OFFER_MAX_CHUNK];
    struct vp_seg segs[OFFER_SEGS];
    uint32_t items[2 * VP_OFFER_MAX_CHUNK];
    const struct vp_frames *src = o->src;
    uint32_t hdr_len = o->hdr_len, k = 0;
    int got = vp_pop(q, n, chains, segs, OFFER_SEGS);
    *dry = 0;
    if (got <= 0) {
        *dry = !q->seg_overflow;
        return 0;
    }
    for (; k < (uint32_t)got; k++) {
        uint32_t f = idx[k], len = src->len[f];
        if (len < ETH_HLEN || len > o->max_len) break;
        const struct vp_chain *c = &chains[k];
        const struct vp_seg *sg = segs + c->first;
        uint64_t need = (uint64_t)hdr_len + len, room = 0;
        if (c->nseg != 1 || !sg->write || sg->len < need) break;
        uint8_t *dst = vp_mem_span(q->mem, sg->addr, &room);
        if (!dst || room < need) break;
        vp_put_rx_header(dst, hdr_len);
        memcpy(dst + hdr_len, src->buf + src->off[f], len);
        if (o->cap) cap_record(o->cap, src->buf + src->off[f], len, sec, usec);
        items[2 * k] = c->head;
        items[2 * k + 1] = (uint32_t)need;
        o->st->frames++;
        o->st->bytes += len;
    }
    for (uint32_t j = (uint32_t)got; j-- > k;) vp_unpop(q, chains[j].head, chains[j].resubmitted);
    if (k) vp_add_used(q, items, k);
    *dry = k == (uint32_t)got && (uint32_t)got < n && !q->seg_overflow;
    return k;
}

int vp_net_rx_offer(struct vp_vq *q, struct vp_net_offer *o) {
    o->taken = 0;
    o->chunks = 0;
    o->stuck = 0;
    if (o->hdr_len != 10 && o->hdr_len != 12) return VP_ERR_HDR_LEN;
    if (!o->nsrc || !o->chunk || o->chunk > VP_OFFER_MAX_CHUNK || o->pos >= o->nsrc ||
        o->nsrc > o->src->n)
        return VP_ERR_OFFER_ARGS;
    int waiting = o->budget_ns != 0;
    int rearm = waiting && q->notify;
    /* While we keep up with the driver it need not kick us for each refill (a syscall on
     * its side, a wake-up on ours): as DPDK's back-end, which never asks for rx kicks. */
    if (rearm) vp_disable_notifications(q);
    uint64_t start = waiting ? monotonic_ns() : 0, idle_since = 0;
    int reason;
    for (;;) {
        if (o->taken >= o->count) { reason = VP_OFFER_DONE; break; }
        if (q->broken) { reason = VP_OFFER_BROKEN; break; }
        uint32_t n = o->chunk;
        if (o->count - o->taken < n) n = (uint32_t)(o->count - o->taken);
        uint32_t sec = 0, usec = 0;
        if (o->cap) {
            if (!cap_room(o->cap, n, o->max_len)) { reason = VP_OFFER_CAPTURE; break; }
            uint64_t us = (realtime_ns() + 500) / 1000;   /* as pcap.PcapWriter rounds */
            sec = (uint32_t)(us / 1000000u);
            usec = (uint32_t)(us % 1000000u);
        }
        int dry = 0;
        int k = (int)place_simple(q, o, o->idx + o->pos, n, sec, usec, &dry);
        if ((uint32_t)k < n && !dry && !q->broken) {   /* the general path for the rest */
            int more = vp_net_rx_place(q, o->hdr_len, o->mrg, o->max_len, o->src,
                                       o->idx + o->pos + k, n - (uint32_t)k, 0, o->st,
                                       o->backlog, o->cap, sec, usec);
            if (more < 0) { reason = more; break; }   /* not reached: hdr_len was checked */
            k += more;
        }
        o->chunks++;
        o->taken += (uint32_t)k;
        o->pos = (uint32_t)((o->pos + (uint32_t)k) % o->nsrc);
        if (k && o->signal) vp_signal(q, o->call_fd);
        if ((uint32_t)k == n) {
            idle_since = 0;
            if (waiting && monotonic_ns() - start >= o->budget_ns) {
                reason = o->taken >= o->count ? VP_OFFER_DONE : VP_OFFER_TIME;
                break;
            }
            continue;
        }
        if (q->broken) { reason = VP_OFFER_BROKEN; break; }
        /* the next frame found no buffers it can use */
        if (!waiting) {
            o->stuck = (uint32_t)vp_has_available(q);
            reason = VP_OFFER_EMPTY;
            break;
        }
        uint64_t now = monotonic_ns();
        if (now - start >= o->budget_ns) {
            o->stuck = (uint32_t)vp_has_available(q);
            reason = VP_OFFER_TIME;
            break;
        }
        if (k) idle_since = now;
        else if (!idle_since) idle_since = now;
        else if (now - idle_since >= o->idle_ns) {
            o->stuck = (uint32_t)vp_has_available(q);
            reason = VP_OFFER_EMPTY;
            break;
        }
        /* Wait for the driver's next buffers without hammering the line it writes. */
        for (int spin = 0; spin < 64 && !vp_has_available(q); spin++) cpu_relax();
    }
    if (rearm && !q->broken) vp_enable_notifications(q, 0);
    return reason;
}

int vp_net_read_frames(int fd, struct vp_frames *out, uint32_t max, uint32_t max_len,
                       uint64_t *truncated) {
    uint32_t got = 0;
    if (max > out->max) max = out->max;
    out->n = 0;
    out->used = 0;
    while (got < max) {
        uint64_t at = out->used + 16;
        /* one byte more than max_len: a longer frame shows as a read of max_len + 1 */
        if (at + (uint64_t)max_len + 1 > out->cap) break;
        ssize_t n = read(fd, out->buf + at, (size_t)max_len + 1);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK || got) break;
            return -errno;
        }
        if (n == 0) break;
        if ((uint64_t)n > max_len) {
            (*truncated)++;
            continue;
        }
        out->off[got] = at;
        out->len[got] = (uint32_t)n;
        out->used = at + (uint64_t)n;
        got++;
        out->n = got;
    }
    return (int)got;
}
