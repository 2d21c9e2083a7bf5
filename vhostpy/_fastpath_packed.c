/* vhostpy compiled fast path: the device side of a PACKED ring (VIRTIO_F_RING_PACKED,
 * virtio 1.1+ section 2.8), the compiled sibling of virtqueue_packed.PackedVirtqueue.
 *
 * _fastpath.c's ring entry points (vp_pop, vp_add_used, vp_unpop, vp_has_available and the
 * notification calls) hand a ring with `packed` set to the functions here, so every compiled
 * device path (blk, net) serves packed rings without knowing. Every check of
 * PackedVirtqueue._walk is repeated with the same messages: a hostile ring fails the same
 * way under both implementations.
 *
 * Layout (struct vp_vq of a packed ring): `desc` is the descriptor ring of `size` 16-byte
 * descriptors {le64 addr, le32 len, le16 id, le16 flags}, `avail` the driver event
 * suppression area, `used` the device event suppression area, each {le16 off_wrap,
 * le16 flags}. `last_avail_idx`/`used_idx` are in [0, size), with `avail_wrap`/`used_wrap`.
 *
 * Memory ordering: a descriptor's flags are what the driver writes last, so they are read
 * first, then an acquire fence, then the rest. Used descriptors go out as a batch: every id
 * and len, every element's flags but the first, a release fence, then the first element's
 * flags (the driver polls that one). Stores that must precede a load of the driver's area
 * (asking for kicks, publishing used descriptors) are followed by a full fence.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "_fastpath.h"
#include "_fastpath_packed.h"
#include "_fastpath_mem.h"

#define PDESC_F_NEXT 1u
#define PDESC_F_WRITE 2u
#define PDESC_F_INDIRECT 4u
#define PDESC_F_AVAIL (1u << 7)
#define PDESC_F_USED (1u << 15)
#define EVENT_ENABLE 0u
#define EVENT_DISABLE 1u
#define EVENT_DESC 2u
#define PMAX_QUEUE_SIZE 32768u
#define PID_NOWHERE 0xFFFFu      /* vp_pid.at of a chain recovered from the region */

typedef unsigned long long ull;

static inline uint32_t min32(uint32_t a, uint32_t b) { return a < b ? a : b; }

static inline uint16_t pld16(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED);
}

static inline void pst16(uint8_t *p, uint16_t v) {
    __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELAXED);
}

static inline uint16_t desc_flags(const struct vp_vq *q, uint32_t i) {
    return pld16(q->desc + 16 * (uint64_t)i + 14);
}

static inline int is_avail(uint16_t flags, uint32_t wrap) {
    return !!(flags & PDESC_F_AVAIL) == !!wrap && !!(flags & PDESC_F_USED) != !!wrap;
}

/* ---------------------------------------------------------------- per-id records */

_Static_assert(sizeof(struct vp_pid) == 64, "a buffer id's record is one cache line");

struct vp_pid *vp_pids_new(uint32_t n) {
    size_t bytes = sizeof(struct vp_pid) * (n ? n : 1);
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes)) return NULL;   /* one record per cache line */
    memset(p, 0, bytes);
    return p;
}

/* Back to "not in flight" (what precord fills in is left: it is rewritten when the id is
 * taken again). Per completed chain, so only the fields that say so are stored. */
static inline void pid_clear(struct vp_pid *p) {
    if (p->more) {
        free(p->more);
        p->more = NULL;
    }
    p->slots = 0;
    p->taken = 0;
    p->nw = 0;
    p->ind_len = 0;
}

void vp_pids_free(struct vp_pid *pids, uint32_t n) {
    if (!pids) return;
    for (uint32_t i = 0; i < n; i++) free(pids[i].more);
    free(pids);
}

void vp_packed_forget(struct vp_vq *q) {
    if (q->pid)
        for (uint32_t i = 0; i < q->size; i++) pid_clear(&q->pid[i]);
    q->in_flight_slots = 0;
    q->used_advance = 0;
}

/* ---------------------------------------------------------------- walking a chain */

struct pwalk {
    uint32_t nseg, nw, slots;
    uint64_t rl, wl;
    uint16_t id;
    uint64_t ind_addr;       /* the indirect table, when the chain is one */
    uint32_t ind_len;
};

static void perr(char *err, size_t el, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
#include <stdarg.h>
static void perr(char *err, size_t el, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, el, fmt, ap);
    va_end(ap);
}

/* Which descriptor a message names (formatted only when there is a message to write). */
enum { AT_SLOT, AT_COPY, AT_INDIRECT };
struct pwhere {
    int kind;                /* AT_SLOT: "descriptor i", AT_COPY: "descriptor i of n",
                                AT_INDIRECT: "indirect descriptor i" */
    uint32_t i, n;
    char text[48];
};

static const char *where_text(struct pwhere *at) {
    if (at->kind == AT_SLOT) snprintf(at->text, sizeof at->text, "descriptor %u", at->i);
    else if (at->kind == AT_COPY)
        snprintf(at->text, sizeof at->text, "descriptor %u of %u", at->i, at->n);
    else snprintf(at->text, sizeof at->text, "indirect descriptor %u", at->i);
    return at->text;
}

/* Check one buffer (`at` names it) and store it; 0, -1 broken, -2 segs full. */
static int pbuffer(struct vp_vq *q, struct pwhere *at, uint64_t addr, uint32_t len, uint16_t flags,
                   struct vp_seg *segs, uint32_t max_segs, struct pwalk *w, char *err, size_t el) {
    char sub[200];
    if (len && addr > UINT64_MAX - (len - 1)) {
        perr(err, el, "%s addr 0x%llx + len 0x%x overflows 64 bits", where_text(at), (ull)addr,
             len);
        return -1;
    }
    if (flags & PDESC_F_WRITE) {
        w->wl += len;
        w->nw++;
    } else if (w->nw) {
        perr(err, el, "device-readable %s (addr 0x%llx len 0x%x) after a device-writable one",
             where_text(at), (ull)addr, len);
        return -1;
    } else {
        w->rl += len;
    }
    if (w->rl + w->wl > 0xFFFFFFFFull) {
        perr(err, el, "chain length 0x%llx overflows 32 bits at %s", (ull)(w->rl + w->wl),
             where_text(at));
        return -1;
    }
    if (len && vp_mem_check(q->mem, addr, len, sub, sizeof sub)) {
        perr(err, el, "%s buffer: %s", where_text(at), sub);
        return -1;
    }
    if (w->nseg >= max_segs) return -2;
    segs[w->nseg].addr = addr;
    segs[w->nseg].len = len;
    segs[w->nseg].write = (flags & PDESC_F_WRITE) ? 1 : 0;
    w->nseg++;
    return 0;
}

/* Every entry of the indirect table at addr (NEXT means nothing there). With segs NULL only
 * the writable buffers are marked in the dirty log (a completed chain). */
static int pindirect(struct vp_vq *q, uint64_t addr, uint32_t len, struct vp_seg *segs,
                     uint32_t max_segs, struct pwalk *w, char *err, size_t el) {
    char sub[200];
    struct pwhere at = {AT_INDIRECT, 0, 0, ""};
    if (len == 0 || len % 16 || len > 16 * PMAX_QUEUE_SIZE) {
        perr(err, el, "indirect table at 0x%llx has bad length 0x%x", (ull)addr, len);
        return -1;
    }
    if (addr > UINT64_MAX - (len - 1)) {
        perr(err, el, "indirect table addr 0x%llx + len 0x%x overflows 64 bits", (ull)addr, len);
        return -1;
    }
    if (vp_mem_check(q->mem, addr, len, sub, sizeof sub)) {
        perr(err, el, "indirect table: %s", sub);
        return -1;
    }
    const uint8_t *table = vp_mem_ptr(q->mem, addr, len);
    uint8_t *copy = NULL;
    if (!table) {        /* spans regions: walk a copy, which also pins what we walk */
        copy = malloc(len);
        uint64_t done = 0;
        while (copy && done < len) {
            uint64_t room;
            uint8_t *p = vp_mem_span(q->mem, addr + done, &room);
            if (!p) break;
            uint64_t take = room < len - done ? room : len - done;
            memcpy(copy + done, p, take);
            done += take;
        }
        if (!copy || done < len) {
            free(copy);
            perr(err, el, "indirect table at 0x%llx: cannot copy", (ull)addr);
            return -1;
        }
        table = copy;
    }
    int rc = 0;
    for (uint32_t k = 0; k < len / 16; k++) {
        uint8_t d[16];
        memcpy(d, table + 16 * (uint64_t)k, 16);
        uint64_t baddr; uint32_t blen; uint16_t flags;
        memcpy(&baddr, d, 8); memcpy(&blen, d + 8, 4); memcpy(&flags, d + 14, 2);
        if (!segs) {
            if (flags & PDESC_F_WRITE) vp_log_mark(q, baddr, blen);
            continue;
        }
        if (flags & PDESC_F_INDIRECT) {
            perr(err, el, "nested indirect descriptor %u at addr 0x%llx", k, (ull)baddr);
            rc = -1;
            break;
        }
        at.i = k;
        rc = pbuffer(q, &at, baddr, blen, flags, segs, max_segs, w, err, el);
        if (rc) break;
    }
    free(copy);
    return rc;
}

/* Check and store the chain made of the `nd` descriptors table[k] (16 bytes each, ring
 * format; k < nd, index `wrap` goes back to 0), named after ring slots from `start`
 * (`resub` 0) or as "descriptor k of nd" (a resubmitted chain's copies). 0, -1, -2. */
static int pbuild(struct vp_vq *q, const uint8_t *table, uint32_t wrap, uint32_t start,
                  uint32_t nd, int resub, struct vp_seg *segs, uint32_t max_segs,
                  struct pwalk *w, char *err, size_t el) {
    struct pwhere at = {resub ? AT_COPY : AT_SLOT, 0, nd, ""};
    memset(w, 0, sizeof *w);
    w->slots = nd;
    for (uint32_t k = 0; k < nd; k++) {
        uint32_t i = (start + k) % wrap;
        uint8_t d[16];
        memcpy(d, table + 16 * (uint64_t)i, 16);
        uint64_t addr; uint32_t len; uint16_t id, flags;
        memcpy(&addr, d, 8); memcpy(&len, d + 8, 4); memcpy(&id, d + 12, 2); memcpy(&flags, d + 14, 2);
        at.i = resub ? k : i;
        w->id = id;
        if (flags & PDESC_F_INDIRECT) {
            if (flags & PDESC_F_NEXT) {
                perr(err, el, "%s has both INDIRECT and NEXT (flags 0x%x)", where_text(&at),
                     flags);
                return -1;
            }
            if (k) {
                perr(err, el, "indirect %s after %u direct ones", where_text(&at), k);
                return -1;
            }
            int rc = pindirect(q, addr, len, segs, max_segs, w, err, el);
            if (rc) return rc;
            w->ind_addr = addr;
            w->ind_len = len;
            break;
        }
        int rc = pbuffer(q, &at, addr, len, flags, segs, max_segs, w, err, el);
        if (rc) return rc;
    }
    return 0;
}

/* Walk the chain whose first descriptor is at ring slot `start`: its slots first (flags
 * only, within the free descriptors), then every descriptor; 0, -1 broken, -2 segs full. */
static int pwalk_chain(struct vp_vq *q, uint32_t start, struct vp_seg *segs, uint32_t max_segs,
                       struct pwalk *w, char *err, size_t el) {
    uint32_t size = q->size, budget = size - q->in_flight_slots, i = start, nd = 0;
    for (;;) {
        if (nd >= budget) {
            if (q->in_flight_slots)
                perr(err, el, "chain longer than the %u free descriptors (%u in flight, size %u)",
                     budget, q->in_flight_slots, size);
            else
                perr(err, el, "descriptor loop: chain longer than size %u", size);
            return -1;
        }
        uint16_t flags = desc_flags(q, i);
        nd++;
        if ((flags & PDESC_F_INDIRECT) || !(flags & PDESC_F_NEXT)) break;
        i = i + 1 < size ? i + 1 : 0;
    }
    int rc = pbuild(q, q->desc, size, start, nd, 0, segs, max_segs, w, err, el);
    if (rc) return rc;
    if (w->id >= size) {
        perr(err, el, "buffer id %u >= size %u", w->id, size);
        return -1;
    }
    if (q->pid[w->id].slots) {
        perr(err, el, "buffer id %u reused while in flight", w->id);
        return -1;
    }
    return 0;
}

/* Remember what completing id needs: its slot count, where its chain starts (`at`,
 * PID_NOWHERE for a recovered one) and its writable buffers. */
static int precord(struct vp_vq *q, const struct pwalk *w, const struct vp_seg *segs,
                   uint32_t at) {
    struct vp_pid *p = &q->pid[w->id];
    p->at = (uint16_t)at;
    if (p->more) {
        free(p->more);
        p->more = NULL;
    }
    p->slots = (uint16_t)w->slots;
    p->taken = 1;
    p->nw = 0;
    p->ind_addr = w->ind_addr;
    p->ind_len = w->ind_len;
    if (w->ind_len) return 0;           /* the table stays put until the id is used */
    struct vp_seg *dst = p->w;
    if (w->nw > VP_PID_INLINE) {
        p->more = malloc(sizeof(struct vp_seg) * w->nw);
        if (!p->more) return -1;
        dst = p->more;
    }
    for (uint32_t k = 0; k < w->nseg; k++)
        if (segs[k].write) dst[p->nw++] = segs[k];
    return 0;
}

static inline void padvance(uint32_t size, uint32_t *idx, uint32_t *wrap, uint32_t slots) {
    *idx += slots;
    if (*idx >= size) {
        *idx -= size;
        *wrap = !*wrap;
    }
}

/* ---------------------------------------------------------------- inflight tracking */

/* QueueRegionPacked and DescStatePacked offsets (inflight.py's PACKED_HEADER / _STATE). */
enum { PI_FREE_HEAD = 12, PI_OLD_FREE_HEAD = 14, PI_USED_IDX = 16, PI_OLD_USED = 18,
       PI_USED_WRAP = 20, PI_HDR = 32, PI_STATE = 32, PS_NEXT = 2, PS_LAST = 4, PS_NUM = 6,
       PS_COUNTER = 8, PS_COPY = 16 };

/* Each region field is one store, and the compiler keeps them in program order: a
 * back-end killed between two stores leaves exactly the first in the shared region. */
#define PORDER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

static inline uint8_t *pstate(const struct vp_vq *q, uint32_t entry) {
    return q->inflight + PI_HDR + PI_STATE * (uint64_t)entry;
}

static void pput8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); PORDER(); }
static void pput16(uint8_t *p, uint16_t v) { pst16(p, v); PORDER(); }
static void pput32(uint8_t *p, uint32_t v) {
    __atomic_store_n((uint32_t *)(void *)p, v, __ATOMIC_RELAXED);
    PORDER();
}
static void pput64(uint8_t *p, uint64_t v) {
    __atomic_store_n((uint64_t *)(void *)p, v, __ATOMIC_RELAXED);
    PORDER();
}

static void inflight_lost(struct vp_vq *q, uint32_t entry) {
    q->inflight = NULL;
    q->inflight_lost = entry + 1;
}

/* A chain of `slots` ring descriptors from slot `start` was taken (buffer id `id`): record
 * it in the region (PackedInflight.popped, store for store). */
static void pinf_popped(struct vp_vq *q, uint32_t start, uint32_t slots, uint32_t id) {
    uint32_t n = q->size, head = q->pinf_free_head, free_ = head, last_entry = head;
    if (head >= n) {
        inflight_lost(q, head);
        return;
    }
    uint8_t *h = pstate(q, head);
    pput16(h + PS_NUM, 0);
    pput64(h + PS_COUNTER, q->inflight_counter++);
    pput8(h, 1);
    for (uint32_t k = 0; k < slots; k++) {
        if (free_ >= n) {
            inflight_lost(q, free_);
            return;
        }
        if (k == slots - 1) pput16(h + PS_LAST, (uint16_t)free_);
        pput16(h + PS_NUM, (uint16_t)(k + 1));
        uint8_t *e = pstate(q, free_);
        const uint8_t *d = q->desc + 16 * (uint64_t)((start + k) % n);
        uint64_t addr; uint32_t len; uint16_t did, flags;
        memcpy(&addr, d, 8); memcpy(&len, d + 8, 4); memcpy(&did, d + 12, 2); memcpy(&flags, d + 14, 2);
        memcpy(e + PS_COPY, &did, 2);
        memcpy(e + PS_COPY + 2, &flags, 2);
        memcpy(e + PS_COPY + 4, &len, 4);
        memcpy(e + PS_COPY + 8, &addr, 8);
        PORDER();
        last_entry = free_;
        free_ = pld16(e + PS_NEXT);
        pput16(q->inflight + PI_FREE_HEAD, (uint16_t)free_);
    }
    pput16(q->inflight + PI_OLD_FREE_HEAD, (uint16_t)free_);    /* the commit */
    q->pinf_free_head = free_;
    q->pid[id].inf_head = (uint16_t)head;
    q->pid[id].inf_last = (uint16_t)last_entry;
}

/* The common chain, one direct descriptor whose buffer lies in the hinted region and whose
 * id is free, popped in a tight loop: up to `n` of them into chains/segs (chain k's segment
 * at segs[k], `first` counted from `first0`), stopping at the first descriptor that is not
 * available or not that simple, which the general path (pwalk_chain) then takes, checks
 * again and words the error for. Leaves what pwalk_chain + precord would; returns how many. */
static uint32_t pop_singles(struct vp_vq *q, uint32_t n, struct vp_chain *chains,
                            struct vp_seg *segs, uint32_t first0) {
    uint32_t size = q->size, idx = q->last_avail_idx, wrap = q->avail_wrap, k = 0;
    uint32_t room = size - q->in_flight_slots;
    const struct vp_mem *m = q->mem;
    uint32_t h = __atomic_load_n(&m->hint, __ATOMIC_RELAXED);
    if (n > room) n = room;
    if (h >= m->n) return 0;
    const uint64_t base = m->r[h].gpa, span = m->r[h].size;
    /* available in this lap, and neither NEXT nor INDIRECT */
    const uint16_t mask = PDESC_F_AVAIL | PDESC_F_USED | PDESC_F_NEXT | PDESC_F_INDIRECT;
    uint16_t want = wrap ? PDESC_F_AVAIL : PDESC_F_USED;
    for (; k < n; k++) {
        const uint8_t *d = q->desc + 16 * (uint64_t)idx;
        uint16_t flags = pld16(d + 14);
        if ((flags & mask) != want) break;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);   /* flags before the rest */
        uint64_t addr; uint32_t len; uint16_t id;
        memcpy(&addr, d, 8); memcpy(&len, d + 8, 4); memcpy(&id, d + 12, 2);
        if (id >= size) break;
        struct vp_pid *p = &q->pid[id];
        if (p->slots || p->more || (len && !vp_region_holds(base, span, addr, len))) break;
        uint32_t write = (flags & PDESC_F_WRITE) ? 1 : 0;
        struct vp_seg one = {addr, len, write};
        struct vp_chain ch = {id, first0 + k, 1, write ? 0 : len, write ? len : 0, 0};
        segs[k] = one;
        chains[k] = ch;
        p->slots = 1;
        p->taken = 1;
        p->at = (uint16_t)idx;
        p->nw = (uint16_t)write;
        p->ind_addr = 0;
        p->ind_len = 0;
        if (write) p->w[0] = one;
        if (q->inflight) pinf_popped(q, idx, 1, id);
        if (++idx == size) {
            idx = 0;
            wrap = !wrap;
            want = wrap ? PDESC_F_AVAIL : PDESC_F_USED;
        }
    }
    q->last_avail_idx = idx;
    q->avail_wrap = wrap;
    q->in_flight_slots += k;
    return k;
}

/* ---------------------------------------------------------------- the ring entry points */

int vp_packed_has_available(const struct vp_vq *q) {
    return is_avail(desc_flags(q, q->last_avail_idx), q->avail_wrap);
}

uint32_t vp_packed_available(const struct vp_vq *q) {
    uint32_t idx = q->last_avail_idx, wrap = q->avail_wrap, chains = 0;
    for (uint32_t k = q->in_flight_slots; k < q->size; k++) {
        uint16_t flags = desc_flags(q, idx);
        if (!is_avail(flags, wrap)) break;
        if (!(flags & PDESC_F_NEXT)) chains++;
        padvance(q->size, &idx, &wrap, 1);
    }
    return chains;
}

void vp_packed_prefetch_avail(const struct vp_vq *q, uint32_t n) {
    if (n > q->size) n = q->size;
    uint32_t idx = q->last_avail_idx, wrap = q->avail_wrap;
    for (uint32_t k = 0; k < n; k += 4) {   /* four descriptors a line */
        vp_prefetch(q->desc + 16 * (uint64_t)idx);
        padvance(q->size, &idx, &wrap, 4);
    }
}

static void fill_chain(struct vp_chain *ch, const struct pwalk *w, uint32_t first, uint32_t resub) {
    ch->head = w->id;
    ch->first = first;
    ch->nseg = w->nseg;
    ch->readable_len = (uint32_t)w->rl;
    ch->writable_len = (uint32_t)w->wl;
    ch->resubmitted = resub;
}

int vp_packed_pop(struct vp_vq *q, uint32_t limit, struct vp_chain *chains, struct vp_seg *segs,
                  uint32_t max_segs) {
    uint32_t count = 0, used_segs = 0;
    char err[256];
    /* The resubmit list first: chains a previous back-end took, from the region's copies
     * (their slots were counted in flight when they were recovered). */
    while (count < limit && q->resubmit_pos < q->resubmit_n && q->resubmit_descs) {
        uint32_t id = q->resubmit[q->resubmit_pos];
        uint32_t first = q->resubmit_first[q->resubmit_pos];
        uint32_t nd = q->resubmit_first[q->resubmit_pos + 1] - first;
        struct pwalk w;
        int rc = pbuild(q, q->resubmit_descs + 16 * (uint64_t)first, nd ? nd : 1, 0, nd, 1,
                        segs + used_segs, max_segs - used_segs, &w, err, sizeof err);
        if (rc == -2) { q->seg_overflow = 1; return (int)count; }
        w.id = (uint16_t)id;
        if (rc == 0 && (id >= q->size || precord(q, &w, segs + used_segs, PID_NOWHERE))) {
            snprintf(err, sizeof err, "cannot record buffer id %u", id);
            rc = -1;
        }
        if (rc) {
            snprintf(q->error, sizeof q->error, "resubmitted chain of buffer id %u: %s", id, err);
            q->broken = 1;
            return (int)count;
        }
        fill_chain(&chains[count], &w, used_segs, 1);
        used_segs += w.nseg;
        q->resubmit_pos++;
        count++;
    }
    while (count < limit) {
        uint32_t got = pop_singles(q, min32(limit - count, max_segs - used_segs),
                                   chains + count, segs + used_segs, used_segs);
        count += got;
        used_segs += got;
        if (count >= limit) break;
        uint32_t idx = q->last_avail_idx, wrap = q->avail_wrap;
        if (!is_avail(desc_flags(q, idx), wrap)) break;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);   /* flags before the rest of the chain */
        struct pwalk w;
        int rc = pwalk_chain(q, idx, segs + used_segs, max_segs - used_segs, &w, err, sizeof err);
        if (rc == -2) { q->seg_overflow = 1; break; }
        if (rc == 0 && precord(q, &w, segs + used_segs, idx)) {
            snprintf(err, sizeof err, "out of memory recording buffer id %u", w.id);
            rc = -1;
        }
        if (rc) {
            snprintf(q->error, sizeof q->error, "chain at descriptor %u (wrap %u): %s", idx,
                     wrap, err);
            q->broken = 1;
            break;
        }
        if (q->inflight) pinf_popped(q, idx, w.slots, w.id);
        fill_chain(&chains[count], &w, used_segs, 0);
        used_segs += w.nseg;
        q->in_flight_slots += w.slots;
        padvance(q->size, &q->last_avail_idx, &q->avail_wrap, w.slots);
        count++;
    }
    if (count && q->event_idx && q->notify)    /* a kick when the next one becomes available */
        pst16(q->used, (uint16_t)(q->last_avail_idx | q->avail_wrap << 15));
    return (int)count;
}

void vp_packed_unpop(struct vp_vq *q, uint32_t id, uint32_t resubmitted) {
    if (id >= q->size || !q->pid[id].slots) return;
    struct vp_pid *p = &q->pid[id];
    if (resubmitted) {            /* back to the resubmit list: still reserved, region as is */
        if (q->resubmit_pos) q->resubmit_pos--;
        free(p->more);
        p->more = NULL;
        p->taken = 0;
        return;
    }
    if (q->inflight) {            /* PackedInflight.given_back */
        pput16(pstate(q, p->inf_last) + PS_NEXT, (uint16_t)q->pinf_free_head);
        q->pinf_free_head = p->inf_head;
        pput16(q->inflight + PI_FREE_HEAD, (uint16_t)p->inf_head);
        pput16(q->inflight + PI_OLD_FREE_HEAD, (uint16_t)p->inf_head);   /* the commit */
        pput8(pstate(q, p->inf_head), 0);
    }
    uint32_t slots = p->slots;
    pid_clear(p);
    q->in_flight_slots -= slots;
    if (q->last_avail_idx < slots) {
        q->last_avail_idx += q->size - slots;
        q->avail_wrap = !q->avail_wrap;
    } else {
        q->last_avail_idx -= slots;
    }
}

static inline int completes(const struct vp_vq *q, uint32_t id) {
    return id < q->size && q->pid[id].slots && q->pid[id].taken;
}

/* Write id's used descriptor at (*idx, *wrap): its flags at once, or, for a batch's first
 * (*first still NULL), kept in *first / *first_flags for the caller to store last; move
 * past its chain and return the chain's slots. */
static inline uint32_t pput_used(struct vp_vq *q, uint32_t id, uint32_t len, uint32_t *idx,
                                 uint32_t *wrap, uint8_t **first, uint16_t *first_flags) {
    uint8_t *e = q->desc + 16 * (uint64_t)*idx;
    uint16_t id16 = (uint16_t)id, flags = *wrap ? (uint16_t)(PDESC_F_AVAIL | PDESC_F_USED) : 0;
    memcpy(e + 8, &len, 4);
    memcpy(e + 12, &id16, 2);
    if (!*first) {
        *first = e;
        *first_flags = flags;
    } else {
        pst16(e + 14, flags);
    }
    uint32_t slots = q->pid[id].slots;
    padvance(q->size, idx, wrap, slots);
    return slots;
}

/* Under VIRTIO_F_IN_ORDER: the slots of the batch when it completes every chain in flight,
 * in the order they were taken (each starts where the previous ended, the first at the used
 * index), with nothing written into any; else 0. */
static uint32_t pin_order_batch(const struct vp_vq *q, const uint32_t *items, uint32_t n) {
    if (!q->in_order || n < 2) return 0;
    uint32_t at = q->used_idx, slots = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t id = items[2 * k];
        if (items[2 * k + 1] || !completes(q, id) || q->pid[id].at != at) return 0;
        slots += q->pid[id].slots;
        at += q->pid[id].slots;
        if (at >= q->size) at -= q->size;
    }
    return slots == q->in_flight_slots ? slots : 0;
}

/* vp_packed_add_used without inflight tracking or a dirty log: one pass, each id forgotten
 * as its used descriptor is written (so an id given twice is used once); an in-order batch
 * (pin_order_batch) as one used descriptor. */
static void padd_used_plain(struct vp_vq *q, const uint32_t *items, uint32_t n) {
    uint32_t idx = q->used_idx, wrap = q->used_wrap, advanced = 0, done = 0;
    uint32_t batch = pin_order_batch(q, items, n);
    uint8_t *first = NULL;
    uint16_t first_flags = 0;
    if (batch) {        /* the last id's descriptor at the first chain's slot, for all */
        uint32_t at = idx, at_wrap = wrap;
        pput_used(q, items[2 * (n - 1)], 0, &at, &at_wrap, &first, &first_flags);
        padvance(q->size, &idx, &wrap, batch);
        for (uint32_t k = 0; k < n; k++) pid_clear(&q->pid[items[2 * k]]);
        advanced = batch;
        done = n;
    } else {
        for (uint32_t k = 0; k < n; k++) {
            uint32_t id = items[2 * k];
            if (!completes(q, id)) continue;        /* not handed out: callers check */
            advanced += pput_used(q, id, items[2 * k + 1], &idx, &wrap, &first, &first_flags);
            pid_clear(&q->pid[id]);
            done++;
        }
    }
    if (!first) return;
    __atomic_thread_fence(__ATOMIC_RELEASE);   /* the batch before the flags the driver polls */
    pst16(first + 14, first_flags);
    q->used_idx = idx;
    q->used_wrap = wrap;
    q->unsignalled += done;
    q->used_advance += advanced;
    q->in_flight_slots -= advanced;
}

void vp_packed_add_used(struct vp_vq *q, const uint32_t *items, uint32_t n) {
    if (!q->inflight && !q->log) {
        padd_used_plain(q, items, n);
        return;
    }
    uint32_t idx = q->used_idx, wrap = q->used_wrap, start = idx, advanced = 0, done = 0;
    uint8_t *first = NULL;
    uint16_t first_flags = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t id = items[2 * k];
        if (!completes(q, id)) continue;        /* not handed out: callers check */
        advanced += pput_used(q, id, items[2 * k + 1], &idx, &wrap, &first, &first_flags);
        done++;
    }
    if (!first) return;
    uint8_t *inf = q->inflight;
    if (inf) {                  /* PackedInflight.completing: link the batch, move used */
        uint32_t free_ = q->pinf_free_head;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t id = items[2 * k];
            if (!completes(q, id)) continue;
            pput16(pstate(q, q->pid[id].inf_last) + PS_NEXT, (uint16_t)free_);
            free_ = q->pid[id].inf_head;
            pput16(inf + PI_FREE_HEAD, (uint16_t)free_);
        }
        q->pinf_free_head = free_;
        pput16(inf + PI_USED_IDX, (uint16_t)idx);
        pput8(inf + PI_USED_WRAP, (uint8_t)wrap);
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);   /* the batch before the flags the driver polls */
    pst16(first + 14, first_flags);
    if (inf) {                  /* PackedInflight.completed: clear, then commit */
        PORDER();
        for (uint32_t k = 0; k < n; k++) {
            uint32_t id = items[2 * k];
            if (completes(q, id)) pput8(pstate(q, q->pid[id].inf_head), 0);
        }
        pput16(inf + PI_OLD_FREE_HEAD, (uint16_t)q->pinf_free_head);
        pput32(inf + PI_OLD_USED, idx | wrap << 16 | wrap << 24);
    }
    q->used_idx = idx;
    q->used_wrap = wrap;
    q->unsignalled += done;
    q->used_advance += advanced;
    q->in_flight_slots -= advanced;
    for (uint32_t k = 0; k < n; k++) {      /* after the writes: the log, then forget the ids */
        uint32_t id = items[2 * k];
        if (!completes(q, id)) continue;
        struct vp_pid *p = &q->pid[id];
        if (q->log) {
            if (p->ind_len) {
                struct pwalk w;
                char err[64];
                memset(&w, 0, sizeof w);
                pindirect(q, p->ind_addr, p->ind_len, NULL, 0, &w, err, sizeof err);
            } else {
                const struct vp_seg *s = p->more ? p->more : p->w;
                for (uint32_t j = 0; j < p->nw; j++) vp_log_mark(q, s[j].addr, s[j].len);
            }
        }
        pid_clear(p);
    }
    if (q->log && q->log_used) {
        uint64_t end = (uint64_t)start + advanced;
        uint64_t first_part = end < q->size ? end : q->size;
        vp_log_mark(q, q->desc_gpa + 16 * (uint64_t)start, 16 * (first_part - start));
        if (end > q->size) vp_log_mark(q, q->desc_gpa, 16 * (end - q->size));
    }
}

/* Whether the used index that moved `advanced` slots, ending at (new_, new_wrap), passed
 * the driver's off_wrap (virtqueue_packed.packed_need_event has the reasoning). */
static int need_event(uint16_t off_wrap, uint32_t new_, uint32_t new_wrap, uint32_t advanced,
                      uint32_t size) {
    uint64_t lap = 2 * (uint64_t)size;
    if (advanced >= lap) return 1;
    uint64_t event = (off_wrap & 0x7FFFu) + ((off_wrap & 0x8000u) ? 0 : size);
    uint64_t end = new_ + (new_wrap ? 0 : size);
    uint64_t old = (end + lap - advanced) % lap;
    return (event + lap - old) % lap < advanced;
}

int vp_packed_needs_notification(const struct vp_vq *q) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* used flags stored before the driver's area */
    uint16_t flags = pld16(q->avail + 2) & 3u;
    if (flags == EVENT_DISABLE) return 0;
    if (flags != EVENT_DESC || !q->event_idx) return 1;
    if (!q->signal_valid) return 1;
    return need_event(pld16(q->avail), q->used_idx, q->used_wrap, q->used_advance, q->size);
}

void vp_packed_disable_notifications(struct vp_vq *q) {
    pst16(q->used + 2, EVENT_DISABLE);
}

int vp_packed_enable_notifications(struct vp_vq *q, int after_available) {
    uint32_t idx = q->last_avail_idx, wrap = q->avail_wrap;
    if (after_available) {
        for (uint32_t k = q->in_flight_slots; k < q->size; k++) {
            if (!is_avail(desc_flags(q, idx), wrap)) break;
            padvance(q->size, &idx, &wrap, 1);
        }
    }
    if (q->event_idx) {
        pst16(q->used, (uint16_t)(idx | wrap << 15));   /* before the flags that point at it */
        pst16(q->used + 2, EVENT_DESC);
    } else {
        pst16(q->used + 2, EVENT_ENABLE);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* our store before re-reading the ring */
    return is_avail(desc_flags(q, idx), wrap);
}
