/* vhostpy compiled fast path: split-ring walking (packed rings: _fastpath_packed.c, reached
 * through the same entry points), used ring, notifications, and the built-in virtio-net
 * endpoints, one call per burst.
 *
 * Every check of virtqueue.Virtqueue._walk is repeated here with the same messages, so a
 * hostile ring fails the same way under both implementations. Guest memory is reached only
 * through the region table (`struct vp_mem`) that memory.GuestMemory builds; nothing is read
 * or written outside a region. Ring fields the driver polls are written with single 16-bit
 * stores after a release fence; avail->idx is read before the entries it publishes with an
 * acquire fence after it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include "_fastpath.h"
#include "_fastpath_packed.h"
#include "_fastpath_mem.h"
#include "_fastpath_nethdr.h"

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u
#define MAX_QUEUE_SIZE 32768u
#define MAX_FRAME 65536u
#define ETH_HLEN 14u

enum { DROP_EMPTY, DROP_SHORT_HEADER, DROP_HEADER_ONLY, DROP_OVERSIZE, DROP_RUNT, DROP_GSO,
       DROP_BAD_CSUM, DROP_RX_TOO_SMALL, DROP_WHOLE_RING, DROP_MTU };

typedef unsigned long long ull;

/* A step of the transmit burst loop, always inlined into it (gcc -O2 outlines a step once
 * the loop is inlined into several entries, and keeps indirect calls indirect). */
#define BURST_STEP static inline __attribute__((always_inline))

static inline uint16_t ld16(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED);
}

static inline void st16(uint8_t *p, uint16_t v) {
    __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------- guest memory */

static const struct vp_region *find_region(const struct vp_mem *m, uint64_t gpa) {
    /* Most lookups land in the region the previous one found (a guest's buffers sit in its
     * RAM region): try it first. `hint` is only a guess, checked here, so sharing the table
     * between threads is harmless. */
    uint32_t n = m->n, h = __atomic_load_n(&m->hint, __ATOMIC_RELAXED);
    if (h < n && gpa - m->r[h].gpa < m->r[h].size) return &m->r[h];
    uint32_t lo = 0, hi = n;
    while (lo < hi) {                       /* first region with gpa < r.gpa */
        uint32_t mid = (lo + hi) / 2;
        if (m->r[mid].gpa <= gpa) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return NULL;
    const struct vp_region *r = &m->r[lo - 1];
    if (gpa - r->gpa >= r->size) return NULL;
    __atomic_store_n(&((struct vp_mem *)m)->hint, lo - 1, __ATOMIC_RELAXED);
    return r;
}

int vp_mem_check(const struct vp_mem *m, uint64_t gpa, uint64_t len, char *err, size_t errlen) {
    while (len) {
        const struct vp_region *r = find_region(m, gpa);
        if (!r) {
            if (err) snprintf(err, errlen, "guest range gpa=0x%llx length=0x%llx is not mapped",
                              (ull)gpa, (ull)len);
            return -1;
        }
        uint64_t room = r->size - (gpa - r->gpa);
        uint64_t take = room < len ? room : len;
        len -= take;
        gpa += take;
    }
    return 0;
}

uint8_t *vp_mem_ptr(const struct vp_mem *m, uint64_t gpa, uint64_t len) {
    const struct vp_region *r = find_region(m, gpa);
    if (!r || len > r->size - (gpa - r->gpa)) return NULL;
    return r->host + (gpa - r->gpa);
}

uint8_t *vp_mem_span(const struct vp_mem *m, uint64_t gpa, uint64_t *room) {
    const struct vp_region *r = find_region(m, gpa);
    if (!r) {
        *room = 0;
        return NULL;
    }
    *room = r->size - (gpa - r->gpa);
    return r->host + (gpa - r->gpa);
}

/* Copy between guest memory (possibly across adjacent regions) and a host buffer. */
static int mem_copy(const struct vp_mem *m, uint64_t gpa, uint8_t *host, uint64_t len, int to_guest) {
    while (len) {
        const struct vp_region *r = find_region(m, gpa);
        if (!r) return -1;
        uint64_t off = gpa - r->gpa, room = r->size - off, take = room < len ? room : len;
        if (to_guest) memcpy(r->host + off, host, take); else memcpy(host, r->host + off, take);
        host += take;
        gpa += take;
        len -= take;
    }
    return 0;
}

/* ---------------------------------------------------------------- chains */

static void fail(struct vp_vq *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static void fail(struct vp_vq *q, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->error, sizeof q->error, fmt, ap);
    va_end(ap);
    q->broken = 1;
}

int vp_pending(struct vp_vq *q) {
    uint16_t avail_idx = ld16(q->avail + 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint32_t pending = (uint16_t)(avail_idx - q->last_avail_idx);
    if (pending > q->size) {
        fail(q, "avail idx %u is %u ahead of last_avail_idx %u (size %u)", avail_idx, pending,
             q->last_avail_idx, q->size);
        return -1;
    }
    return (int)pending;
}

int vp_has_available(const struct vp_vq *q) {
    if (q->packed) return q->resubmit_pos < q->resubmit_n || vp_packed_has_available(q);
    return q->resubmit_pos < q->resubmit_n || ld16(q->avail + 2) != (uint16_t)q->last_avail_idx;
}

uint32_t vp_available(const struct vp_vq *q) {
    uint32_t left = q->resubmit_n - q->resubmit_pos;
    if (q->packed) return left + vp_packed_available(q);
    uint32_t pending = (uint16_t)(ld16(q->avail + 2) - q->last_avail_idx);
    return left + (pending <= q->size ? pending : 0);
}

void vp_prefetch_avail(const struct vp_vq *q, uint32_t n) {
    if (q->packed) {
        vp_packed_prefetch_avail(q, n);
        return;
    }
    if (n > q->size) n = q->size;
    for (uint32_t k = 0; k < n; k += 32)   /* 32 avail entries a line; the descriptors they */
        vp_prefetch(q->avail + 4 + 2 * ((q->last_avail_idx + k) % q->size));   /* name vary */
}

/* Walk one chain into segs; 0 ok, -1 broken (reason in err), -2 segs full. With segs NULL
 * nothing is stored: the chain's writable buffers are marked in q's dirty log instead. */
static int walk(struct vp_vq *q, uint32_t head, struct vp_seg *segs, uint32_t max_segs,
                struct vp_chain *out, char *err, size_t el) {
    uint32_t size = q->size;
    if (head >= size) {
        snprintf(err, el, "head index %u >= size %u", head, size);
        return -1;
    }
    const uint8_t *table = q->desc;
    uint8_t *copy = NULL;
    uint64_t table_len = size;
    int64_t budget = size;
    int indirect = 0, rc = 0;
    uint32_t i = head, nseg = 0, nwrite = 0;
    uint64_t rl = 0, wl = 0;
    char sub[200];
    for (;;) {
        if (i >= table_len) {
            snprintf(err, el, "next index %u >= %s length %llu", i,
                     indirect ? "indirect table" : "descriptor table", (ull)table_len);
            rc = -1; break;
        }
        if (--budget < 0) {
            if (indirect) snprintf(err, el, "descriptor loop: chain longer than indirect table of %llu", (ull)table_len);
            else snprintf(err, el, "descriptor loop: chain longer than size %u", size);
            rc = -1; break;
        }
        uint8_t d[16];
        memcpy(d, table + 16 * (uint64_t)i, 16);   /* read each descriptor once */
        uint64_t addr; uint32_t len; uint16_t flags, next;
        memcpy(&addr, d, 8); memcpy(&len, d + 8, 4); memcpy(&flags, d + 12, 2); memcpy(&next, d + 14, 2);
        if (len && addr > UINT64_MAX - (len - 1)) {
            snprintf(err, el, "descriptor %u addr 0x%llx + len 0x%x overflows 64 bits", i, (ull)addr, len);
            rc = -1; break;
        }
        if (flags & DESC_F_INDIRECT) {
            if (indirect) { snprintf(err, el, "nested indirect descriptor %u at addr 0x%llx", i, (ull)addr); rc = -1; break; }
            if (flags & DESC_F_NEXT) { snprintf(err, el, "descriptor %u has both INDIRECT and NEXT (flags 0x%x)", i, flags); rc = -1; break; }
            if (len == 0 || len % 16 || len > 16 * MAX_QUEUE_SIZE) {
                snprintf(err, el, "indirect table at 0x%llx has bad length 0x%x", (ull)addr, len);
                rc = -1; break;
            }
            if (vp_mem_check(q->mem, addr, len, sub, sizeof sub)) {
                snprintf(err, el, "indirect table: %s", sub);
                rc = -1; break;
            }
            const uint8_t *p = vp_mem_ptr(q->mem, addr, len);
            if (!p) {   /* spans regions: walk a copy, which also pins what we walk */
                copy = malloc(len);
                if (!copy || mem_copy(q->mem, addr, copy, len, 0)) {
                    snprintf(err, el, "indirect table at 0x%llx: cannot copy", (ull)addr);
                    rc = -1; break;
                }
                p = copy;
            }
            table = p;
            table_len = len / 16;
            budget = (int64_t)table_len;
            indirect = 1;
            i = 0;
            continue;
        }
        if (flags & DESC_F_WRITE) {
            wl += len;
            nwrite++;
        } else if (nwrite) {
            snprintf(err, el, "device-readable descriptor %u (addr 0x%llx len 0x%x) after a device-writable one",
                     i, (ull)addr, len);
            rc = -1; break;
        } else {
            rl += len;
        }
        if (rl + wl > 0xFFFFFFFFull) {
            snprintf(err, el, "chain length 0x%llx overflows 32 bits at descriptor %u", (ull)(rl + wl), i);
            rc = -1; break;
        }
        if (len && vp_mem_check(q->mem, addr, len, sub, sizeof sub)) {
            snprintf(err, el, "descriptor %u buffer: %s", i, sub);
            rc = -1; break;
        }
        if (!segs) {
            if (flags & DESC_F_WRITE) vp_log_mark(q, addr, len);
            nseg++;
            if (!(flags & DESC_F_NEXT)) break;
            i = next;
            continue;
        }
        if (nseg >= max_segs) { rc = -2; break; }
        segs[nseg].addr = addr;
        segs[nseg].len = len;
        segs[nseg].write = (flags & DESC_F_WRITE) ? 1 : 0;
        nseg++;
        if (!(flags & DESC_F_NEXT)) break;
        i = next;
    }
    free(copy);
    if (rc == 0) {
        out->head = head;
        out->nseg = nseg;
        out->readable_len = (uint32_t)rl;
        out->writable_len = (uint32_t)wl;
    }
    return rc;
}

/* ---------------------------------------------------------------- inflight tracking, dirty log */

/* Offsets in a QueueRegionSplit (inflight.py): header, then 16-byte DescStateSplit each. */
enum { INF_LAST_BATCH = 12, INF_USED_IDX = 14, INF_HDR = 16, INF_STATE = 16, INF_NEXT = 6,
       INF_COUNTER = 8 };

static inline uint8_t *inf_state(const struct vp_vq *q, uint32_t head) {
    return q->inflight + INF_HDR + INF_STATE * (uint64_t)head;
}

/* The compiler must not sink a region store past a later one: a back-end killed between
 * two stores leaves exactly the first in the shared region. */
#define REGION_ORDER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

static void inflight_popped(struct vp_vq *q, uint32_t head) {
    uint8_t *st = inf_state(q, head);
    uint64_t counter = q->inflight_counter++;
    memcpy(st + INF_COUNTER, &counter, 8);
    REGION_ORDER();
    st[0] = 1;
}

void vp_log_mark(struct vp_vq *q, uint64_t gpa, uint64_t len) {
    if (!q->log || !len) return;
    uint64_t first = gpa >> 12, last = (gpa + (len - 1)) >> 12, pages = q->log_len * 8;
    if (gpa + (len - 1) < gpa) last = UINT64_MAX >> 12;
    if (last >= pages) {
        q->log_outside++;
        if (first >= pages) return;
        last = pages - 1;
    }
    for (uint64_t pg = first; pg <= last; pg++)
        __atomic_fetch_or(q->log + (pg >> 3), (uint8_t)(1u << (pg & 7)), __ATOMIC_RELAXED);
    q->log_marked += last - first + 1;
}

void vp_unpop(struct vp_vq *q, uint32_t head, uint32_t resubmitted) {
    if (q->popped) q->popped--;
    if (q->packed) {
        vp_packed_unpop(q, head, resubmitted);
        return;
    }
    if (resubmitted && q->resubmit_pos) {
        q->resubmit_pos--;
        return;
    }
    q->last_avail_idx = (q->last_avail_idx - 1) & 0xFFFF;
    if (q->inflight && head < q->size) inf_state(q, head)[0] = 0;
}

/* ---------------------------------------------------------------- popping */

static int pop_split(struct vp_vq *q, uint32_t limit, struct vp_chain *chains,
                     struct vp_seg *segs, uint32_t max_segs);

int vp_pop(struct vp_vq *q, uint32_t limit, struct vp_chain *chains, struct vp_seg *segs,
           uint32_t max_segs) {
    q->seg_overflow = 0;
    if (q->broken || !limit) return 0;
    int n = q->packed ? vp_packed_pop(q, limit, chains, segs, max_segs)
                      : pop_split(q, limit, chains, segs, max_segs);
    q->popped += (uint64_t)n;
    return n;
}

/* The common chain, one direct descriptor at `head`, taken inline: 1 with its buffer in
 * *seg and *out filled, when every check of walk() passes at first sight (its buffer in the
 * hinted region); 0, nothing stored, sends it through walk(), which checks it again and
 * words the error. */
static inline int take_single(const struct vp_vq *q, uint32_t head, struct vp_seg *seg,
                              struct vp_chain *out) {
    if (head >= q->size) return 0;
    const uint8_t *d = q->desc + 16 * (uint64_t)head;
    uint64_t addr; uint32_t len; uint16_t flags;
    memcpy(&addr, d, 8); memcpy(&len, d + 8, 4); memcpy(&flags, d + 12, 2);
    if ((flags & (DESC_F_NEXT | DESC_F_INDIRECT)) || (len && !vp_mem_hinted(q->mem, addr, len)))
        return 0;
    uint32_t write = (flags & DESC_F_WRITE) ? 1 : 0;
    struct vp_seg one = {addr, len, write};
    *seg = one;
    out->head = head;
    out->nseg = 1;
    out->readable_len = write ? 0 : len;
    out->writable_len = write ? len : 0;
    return 1;
}

static int pop_split(struct vp_vq *q, uint32_t limit, struct vp_chain *chains,
                     struct vp_seg *segs, uint32_t max_segs) {
    uint32_t used_segs = 0, count = 0;
    char err[256];
    while (count < limit && q->resubmit_pos < q->resubmit_n) {
        uint32_t head = q->resubmit[q->resubmit_pos];
        int rc = walk(q, head, segs + used_segs, max_segs - used_segs, &chains[count], err, sizeof err);
        if (rc == -2) { q->seg_overflow = 1; return (int)count; }
        if (rc) {
            fail(q, "resubmitted chain at head %u: %s", head, err);
            return (int)count;
        }
        chains[count].first = used_segs;
        chains[count].resubmitted = 1;
        used_segs += chains[count].nseg;
        q->resubmit_pos++;
        count++;
    }
    if (count == limit) return (int)count;
    int pending = vp_pending(q);
    if (pending <= 0) return (int)count;
    uint32_t n = count + ((uint32_t)pending < limit - count ? (uint32_t)pending : limit - count);
    uint32_t mask = q->size - 1, popped = 0;
    for (; count < n; count++) {
        uint32_t slot = q->last_avail_idx & mask;
        uint32_t head = ld16(q->avail + 4 + 2 * slot);
        int rc = used_segs < max_segs && take_single(q, head, segs + used_segs, &chains[count])
                 ? 0 : walk(q, head, segs + used_segs, max_segs - used_segs, &chains[count], err,
                            sizeof err);
        if (rc == -2) { q->seg_overflow = 1; break; }
        if (rc) {
            fail(q, "chain at avail slot %u (avail idx %u): %s", slot, q->last_avail_idx, err);
            break;
        }
        chains[count].first = used_segs;
        chains[count].resubmitted = 0;
        used_segs += chains[count].nseg;
        if (q->inflight) inflight_popped(q, head);
        q->last_avail_idx = (q->last_avail_idx + 1) & 0xFFFF;
        popped++;
    }
    if (popped && q->event_idx && q->notify)
        st16(q->used + 4 + 8 * q->size, (uint16_t)q->last_avail_idx);
    return (int)count;
}

/* ---------------------------------------------------------------- used ring, notifications */

void vp_add_used(struct vp_vq *q, const uint32_t *items, uint32_t n) {
    if (q->packed) {
        vp_packed_add_used(q, items, n);
        return;
    }
    uint32_t mask = q->size - 1, idx = q->used_idx;
    uint8_t *inf = q->inflight;
    if (inf) {              /* the batch's list first: it says what the idx store covers */
        uint16_t last = ld16(inf + INF_LAST_BATCH);
        for (uint32_t k = 0; k < n; k++) {
            uint32_t head = items[2 * k];
            if (head >= q->size) continue;
            st16(inf_state(q, head) + INF_NEXT, last);
            last = (uint16_t)head;
        }
        st16(inf + INF_LAST_BATCH, last);
        REGION_ORDER();
    }
    for (uint32_t k = 0; k < n; k++) {
        uint8_t *e = q->used + 4 + 8 * (idx & mask);
        memcpy(e, &items[2 * k], 8);
        idx = (idx + 1) & 0xFFFF;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);   /* elements before used->idx */
    st16(q->used + 2, (uint16_t)idx);
    q->used_idx = idx;
    q->unsignalled += n;
    if (inf) {
        REGION_ORDER();
        for (uint32_t k = 0; k < n; k++)
            if (items[2 * k] < q->size) inf_state(q, items[2 * k])[0] = 0;
        REGION_ORDER();
        st16(inf + INF_USED_IDX, (uint16_t)idx);
    }
    if (q->log) {           /* after the writes: the front-end may collect the bits at once */
        char err[64];
        struct vp_chain ch;
        for (uint32_t k = 0; k < n; k++) walk(q, items[2 * k], NULL, 0, &ch, err, sizeof err);
        if (q->log_used) vp_log_mark(q, q->log_used_gpa, 6 + 8 * (uint64_t)q->size);
    }
}

int vp_needs_notification(const struct vp_vq *q) {
    if (!q->unsignalled) return 0;
    if (q->packed) return vp_packed_needs_notification(q);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* used->idx store before the driver's field load */
    if (q->event_idx) {
        if (!q->signal_valid || q->unsignalled >= 0x10000) return 1;
        uint16_t event = ld16(q->avail + 4 + 2 * q->size);
        uint16_t new_ = (uint16_t)q->used_idx, old = (uint16_t)(q->used_idx - q->unsignalled);
        return (uint16_t)(new_ - event - 1) < (uint16_t)(new_ - old);
    }
    return !(ld16(q->avail) & 1);
}

int vp_signal(struct vp_vq *q, int call_fd) {
    int need = vp_needs_notification(q);
    if (q->unsignalled) {
        q->unsignalled = 0;
        q->signal_valid = 1;
        q->used_advance = 0;
    }
    if (need) {
        q->calls++;
        if (call_fd >= 0) {
            uint64_t one = 1;
            ssize_t rc;
            do rc = write(call_fd, &one, sizeof one); while (rc < 0 && errno == EINTR);
        }
    }
    return need;
}

void vp_disable_notifications(struct vp_vq *q) {
    q->notify = 0;
    if (q->packed) {
        vp_packed_disable_notifications(q);
        return;
    }
    if (q->event_idx) {
        st16(q->used + 4 + 8 * q->size, (uint16_t)(q->last_avail_idx - 1));
    } else {
        st16(q->used, ld16(q->used) | 1);
    }
}

int vp_enable_notifications(struct vp_vq *q, int after_available) {
    q->notify = 1;
    if (q->packed) return vp_packed_enable_notifications(q, after_available);
    uint16_t from = (uint16_t)q->last_avail_idx;
    if (after_available) from = ld16(q->avail + 2);
    if (q->event_idx) st16(q->used + 4 + 8 * q->size, from);
    else st16(q->used, ld16(q->used) & ~1u);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* our store before re-reading avail->idx */
    return ld16(q->avail + 2) != from;
}

/* ---------------------------------------------------------------- virtio-net */

/* Gather `len` readable bytes of a chain from offset `skip` into dst. */
static int gather(const struct vp_mem *m, const struct vp_seg *s, uint32_t nseg, uint64_t skip,
                  uint8_t *dst, uint64_t len) {
    for (uint32_t k = 0; k < nseg && len; k++) {
        if (s[k].write) break;
        uint64_t l = s[k].len;
        if (skip >= l) { skip -= l; continue; }
        uint64_t take = l - skip < len ? l - skip : len;
        const uint8_t *whole = vp_mem_hinted(m, s[k].addr + skip, take);
        if (whole) memcpy(dst, whole, take);   /* the common case: in the hinted region */
        else if (mem_copy(m, s[k].addr + skip, dst, take, 0)) return -1;
        dst += take;
        len -= take;
        skip = 0;
    }
    return len ? -1 : 0;
}

/* The `n` bytes after a transmit chain's `hdr_len`-byte header when its first buffer holds
 * them all (readable, in the hinted region): where they are, without a copy; else NULL (the
 * caller goes through gather or spans_of). The common frame: header and frame in one
 * buffer. */
static inline const uint8_t *after_header(const struct vp_mem *m, const struct vp_seg *s,
                                          uint32_t hdr_len, uint64_t n) {
    return !s->write && s->len >= hdr_len + n ? vp_mem_hinted(m, s->addr + hdr_len, n) : NULL;
}

/* Bytes in host memory, one piece of what is written into receive buffers. */
struct span {
    const uint8_t *p;
    uint64_t n;
};

#define MAX_SPANS 16

/* The readable bytes [skip, skip + len) of a chain as host spans (split where a region ends):
 * how many, or -1 when that takes more than `max` spans or leaves guest memory. */
static int spans_of(const struct vp_mem *m, const struct vp_seg *s, uint32_t nseg, uint64_t skip,
                    uint64_t len, struct span *sp, int max) {
    int n = 0;
    for (uint32_t k = 0; k < nseg && len; k++) {
        if (s[k].write) break;
        uint64_t l = s[k].len;
        if (skip >= l) { skip -= l; continue; }
        uint64_t gpa = s[k].addr + skip, left = l - skip < len ? l - skip : len;
        skip = 0;
        const uint8_t *whole = vp_mem_hinted(m, gpa, left);
        if (whole && n < max) {            /* the common case: one piece, one region */
            sp[n].p = whole;
            sp[n].n = left;
            n++;
            len -= left;
            continue;
        }
        while (left) {
            uint64_t room;
            const uint8_t *p = vp_mem_span(m, gpa, &room);
            if (!p || n >= max) return -1;
            uint64_t take = room < left ? room : left;
            sp[n].p = p;
            sp[n].n = take;
            n++;
            gpa += take;
            left -= take;
            len -= take;
        }
    }
    return len ? -1 : n;
}

static uint16_t checksum(const uint8_t *p, uint64_t n) {
    uint64_t sum = 0;
    for (; n >= 2; p += 2, n -= 2) sum += (uint32_t)p[0] << 8 | p[1];
    if (n) sum += (uint32_t)p[0] << 8;
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    uint16_t c = (uint16_t)~sum;
    return c ? c : 0xFFFF;
}

#define SEGS_LOCAL 2048
/* The longest virtio-net header: C keeps headers in 12-byte buffers (and 12 bytes of MACs
 * after one in 24-byte prefixes), so every entry taking `hdr_len` checks it first. */
#define NET_HDR_MAX 12u

static inline int hdr_len_ok(uint32_t hdr_len) {
    return hdr_len == 10 || hdr_len == NET_HDR_MAX;
}

/* Where the partial checksum a NEEDS_CSUM header asks for starts, and its field's offset. */
static inline void csum_fields(const uint8_t h[12], uint16_t *start, uint16_t *off) {
    memcpy(start, h + 6, 2);
    memcpy(off, h + 8, 2);
}

/* Check one transmit chain as net.NetDevice does: a drop reason, or -1 with the frame's
 * length in *flen. With `csum` (VIRTIO_NET_F_CSUM negotiated) its virtio-net header is read
 * into h and checked; without, the driver must send flags 0 and no GSO (virtio 1.2
 * 5.1.6.2.1), so the header is left unread (the cache line the driver just wrote is not
 * pulled over) and h is all zero. */
BURST_STEP int tx_check(const struct vp_mem *m, const struct vp_chain *ch,
                        const struct vp_seg *s, uint32_t hdr_len, int csum, uint8_t h[12],
                        uint32_t *flen) {
    uint64_t total = ch->readable_len;
    memset(h, 0, 12);
    if (total == 0) return DROP_EMPTY;
    if (total < hdr_len) return DROP_SHORT_HEADER;
    if (total == hdr_len) return DROP_HEADER_ONLY;
    if (total - hdr_len > MAX_FRAME) return DROP_OVERSIZE;
    if (total - hdr_len < ETH_HLEN) return DROP_RUNT;
    *flen = (uint32_t)(total - hdr_len);
    if (!csum) return -1;
    const uint8_t *hp = after_header(m, s, 0, hdr_len);
    if (hp && hdr_len == NET_HDR_MAX) memcpy(h, hp, NET_HDR_MAX);   /* constant sizes: moves */
    else if (hp) memcpy(h, hp, 10);
    else if (gather(m, s, ch->nseg, 0, h, hdr_len)) return DROP_SHORT_HEADER;
    uint16_t cs_start, cs_off;
    csum_fields(h, &cs_start, &cs_off);
    if (h[1] != 0) return DROP_GSO;
    if ((h[0] & 1) && (uint32_t)cs_start + cs_off + 2 > *flen) return DROP_BAD_CSUM;
    return -1;
}

/* Append the frame of a checked chain to `out`, its partial checksum completed when the
 * header asks for one: a drop reason, or -1. */
static int tx_keep(const struct vp_mem *m, const struct vp_seg *s, uint32_t nseg, uint32_t hdr_len,
                   const uint8_t h[12], uint32_t flen, struct vp_frames *out) {
    if (out->n >= out->max || out->used + 16 + flen > out->cap) return DROP_OVERSIZE;
    uint8_t *dst = out->buf + out->used + 16;
    if (gather(m, s, nseg, hdr_len, dst, flen)) return DROP_SHORT_HEADER;
    if (h[0] & 1) {
        uint16_t cs_start, cs_off;
        csum_fields(h, &cs_start, &cs_off);
        uint32_t field = (uint32_t)cs_start + cs_off;
        uint16_t c16 = checksum(dst + cs_start, flen - cs_start);
        dst[field] = (uint8_t)(c16 >> 8);
        dst[field + 1] = (uint8_t)c16;
    }
    out->off[out->n] = out->used + 16;
    out->len[out->n] = flen;
    out->n++;
    out->used += 16 + flen;
    return -1;
}

static void tx_count(struct vp_net_stats *st, int reason, uint32_t flen, const uint8_t h[12]) {
    if (reason >= 0) {
        st->drops[reason]++;
        st->dropped++;
    } else {
        st->frames++;
        st->bytes += flen;
        if (h[0] & 1) st->checksums++;
    }
}

/* Pop up to `limit` chains for the transmit functions; *segs is replaced by a heap array
 * (to free) when one chain has more descriptors than the local array holds. */
static int tx_pop(struct vp_vq *q, uint32_t limit, struct vp_chain *chains, struct vp_seg **segs) {
    if (limit > 256) limit = 256;
    int n = vp_pop(q, limit, chains, *segs, SEGS_LOCAL);
    if (n == 0 && q->seg_overflow) {    /* one chain longer than SEGS_LOCAL descriptors */
        uint32_t big = q->size + MAX_QUEUE_SIZE + 1;
        struct vp_seg *heap = malloc(sizeof *heap * big);
        if (!heap) return 0;
        *segs = heap;
        n = vp_pop(q, 1, chains, heap, big);
    }
    return n;
}

/* What a transmit burst does with each accepted frame (its chain checked, header in h):
 * a drop reason, or -1 once the frame is taken. */
typedef int (*tx_take_fn)(void *ctx, const struct vp_mem *m, const struct vp_seg *s,
                          uint32_t nseg, uint32_t hdr_len, const uint8_t h[12], uint32_t flen);
/* Called once a burst's `n` chains are popped, before the first is taken. */
typedef void (*tx_begin_fn)(void *ctx, uint32_t n);

/* Start loading the first bytes of each popped frame: its header and, with `data`, its first
 * frame bytes (a reflected frame's MACs). The driver wrote them on another CPU: in perf of
 * the back-end in the packed loop against DPDK's virtio-user, the first read of each frame
 * was its largest stall; misses started together overlap instead of queueing. */
BURST_STEP void prefetch_frames(const struct vp_mem *m, const struct vp_chain *chains, int n,
                                const struct vp_seg *segs, uint32_t hdr_len, int data) {
    for (int c = 0; c < n; c++) {
        const struct vp_seg *s = segs + chains[c].first;
        const uint8_t *p = vp_mem_hinted(m, s->addr, 1);
        if (!p) continue;
        vp_prefetch(p);
        if (!data) continue;
        if (s->len > hdr_len) {
            vp_prefetch(p + hdr_len + (s->len - hdr_len > 12 ? 11 : s->len - hdr_len - 1));
        } else if (chains[c].nseg > 1 && (p = vp_mem_hinted(m, s[1].addr, 1))) {
            vp_prefetch(p);
        }
    }
}

/* Pop up to `limit` transmit chains, check each, hand the accepted frames to `take` (if
 * any), count them all in `st` and publish their used entries. Returns the chains popped.
 * Inlined into each consumer's entry, so `begin` and `take` are known there and become
 * direct, inlinable calls instead of an indirect call per frame. */
BURST_STEP int
tx_serve(struct vp_vq *q, uint32_t hdr_len, int csum, uint32_t limit, struct vp_net_stats *st,
         tx_begin_fn begin, tx_take_fn take, void *ctx) {
    struct vp_chain chains[256];
    struct vp_seg segs_local[SEGS_LOCAL];
    struct vp_seg *segs = segs_local;
    uint32_t items[512];
    int n = tx_pop(q, limit, chains, &segs);
    if (n > 0) prefetch_frames(q->mem, chains, n, segs, hdr_len, take != NULL);
    if (n > 0 && begin) begin(ctx, (uint32_t)n);
    for (int c = 0; c < n; c++) {
        const struct vp_chain *ch = &chains[c];
        const struct vp_seg *s = segs + ch->first;
        items[2 * c] = ch->head;
        items[2 * c + 1] = 0;
        uint8_t h[12];
        uint32_t flen = 0;
        int reason = tx_check(q->mem, ch, s, hdr_len, csum, h, &flen);
        if (reason < 0 && take) reason = take(ctx, q->mem, s, ch->nseg, hdr_len, h, flen);
        tx_count(st, reason, flen, h);
    }
    if (n > 0) vp_add_used(q, items, (uint32_t)n);
    if (segs != segs_local) free(segs);
    return n;
}

static int take_keep(void *out, const struct vp_mem *m, const struct vp_seg *s, uint32_t nseg,
                     uint32_t hdr_len, const uint8_t h[12], uint32_t flen) {
    return tx_keep(m, s, nseg, hdr_len, h, flen, out);
}

int vp_net_tx_burst(struct vp_vq *q, uint32_t hdr_len, int csum, uint32_t limit,
                    struct vp_net_stats *st, struct vp_frames *out) {
    if (!hdr_len_ok(hdr_len)) return VP_ERR_HDR_LEN;
    return tx_serve(q, hdr_len, csum, limit, st, NULL, out ? take_keep : NULL, out);
}

/* Scatter the spans into the writable segments of chains; returns the bytes written into
 * each chain in `written`. */
static void scatter(const struct vp_mem *m, const struct vp_chain *chains, uint32_t nchains,
                    const struct vp_seg *segs, const struct span *sp, uint32_t nsp,
                    uint32_t *written) {
    uint32_t i = 0;
    const uint8_t *src = nsp ? sp[0].p : NULL;
    uint64_t left = nsp ? sp[0].n : 0;
    for (uint32_t c = 0; c < nchains; c++) {
        uint32_t done = 0;
        const struct vp_seg *s = segs + chains[c].first;
        for (uint32_t k = 0; k < chains[c].nseg && i < nsp; k++) {
            if (!s[k].write) continue;
            uint64_t room = s[k].len, gpa = s[k].addr;
            while (room && i < nsp) {
                if (!left) {
                    if (++i < nsp) src = sp[i].p, left = sp[i].n;
                    continue;
                }
                uint64_t span_room;
                uint8_t *dst = vp_mem_span(m, gpa, &span_room);
                if (!dst) break;   /* not reached: walk() checked every buffer is mapped */
                uint64_t take = left < room ? left : room;
                if (take > span_room) take = span_room;
                memmove(dst, src, take);   /* a hostile driver may overlap them */
                src += take; left -= take; gpa += take; room -= take; done += (uint32_t)take;
            }
        }
        written[c] = done;
    }
}

static void record(struct vp_frames *cap, const uint8_t *pre, uint32_t pn, const uint8_t *rest,
                   uint32_t rn, uint32_t sec, uint32_t usec) {
    uint32_t len = pn + rn;
    if (!cap || cap->n >= cap->max || cap->used + 16 + len > cap->cap) return;
    uint8_t *p = cap->buf + cap->used;
    uint32_t h[4] = {sec, usec, len, len};
    memcpy(p, h, 16);
    memcpy(p + 16, pre, pn);
    memcpy(p + 16 + pn, rest, rn);
    cap->off[cap->n] = cap->used + 16;
    cap->len[cap->n] = len;
    cap->n++;
    cap->used += 16 + len;
}

/* What rx_take found in the receive ring for one frame. */
enum { RX_OK, RX_WAIT, RX_SMALL, RX_WHOLE_RING, RX_OVERFLOW, RX_BROKEN };
enum { RX_CHAINS = 64 };

/* Give back chains[0 .. n) (popped in that order), newest first. */
static void unpop(struct vp_vq *q, const struct vp_chain *chains, uint32_t n) {
    while (n--) vp_unpop(q, chains[n].head, chains[n].resubmitted);
}

/* Take receive buffers for `need` bytes into chains/segs (more than one only with mrg):
 * RX_OK with their number in *nc. Otherwise none stays taken, except on RX_BROKEN:
 * RX_WAIT: too few buffers for now; RX_SMALL: (no mrg) the next buffer is too small for the
 * frame; RX_WHOLE_RING: all of the ring is too small; RX_OVERFLOW: more buffers than our
 * arrays hold (Python places such a frame). */
static int rx_take(struct vp_vq *q, int mrg, uint64_t need, struct vp_chain *chains,
                   struct vp_seg *segs, uint32_t *nc_out) {
    uint64_t room = 0;
    uint32_t nc = 0, used_segs = 0;
    int overflow = 0;
    while (room < need && nc < q->size) {
        if (nc >= RX_CHAINS) { overflow = 1; break; }
        if (vp_pop(q, 1, &chains[nc], segs + used_segs, SEGS_LOCAL - used_segs) != 1) {
            if (q->seg_overflow) overflow = 1;
            break;
        }
        chains[nc].first = used_segs;
        used_segs += chains[nc].nseg;
        room += chains[nc].writable_len;
        nc++;
        if (!mrg) break;
    }
    if (q->broken) return RX_BROKEN;
    if (overflow) {
        unpop(q, chains, nc);
        return RX_OVERFLOW;
    }
    if (room < need) {
        if (!mrg && nc) {
            unpop(q, chains, 1);
            return RX_SMALL;
        }
        unpop(q, chains, nc);
        return nc >= q->size ? RX_WHOLE_RING : RX_WAIT;
    }
    *nc_out = nc;
    return RX_OK;
}

/* Count a frame rx_take found no buffer for (RX_SMALL or RX_WHOLE_RING): dropped. */
static void rx_dropped(struct vp_net_stats *st, int got) {
    st->drops[got == RX_SMALL ? DROP_RX_TOO_SMALL : DROP_WHOLE_RING]++;
    st->dropped++;
}

/* Write one frame into the buffers rx_take took: the spans (the first starts with the
 * virtio-net header, whose num_buffers is set here in `hdr`), then queue their used entries
 * in items (published when 256 are waiting) and count the frame. */
static void rx_put(struct vp_vq *q, uint32_t hdr_len, int mrg, const struct vp_chain *chains,
                   uint32_t nc, const struct vp_seg *segs, uint8_t *hdr, const struct span *sp,
                   uint32_t nsp, uint32_t len, uint32_t *items, uint32_t *nitems,
                   struct vp_net_stats *st) {
    uint32_t written[RX_CHAINS];
    uint16_t nb = (uint16_t)(mrg ? nc : 1);
    if (hdr_len >= 12) memcpy(hdr + 10, &nb, 2);
    scatter(q->mem, chains, nc, segs, sp, nsp, written);
    if (*nitems + nc > 256) { vp_add_used(q, items, *nitems); *nitems = 0; }
    for (uint32_t c = 0; c < nc; c++) {
        items[2 * *nitems] = chains[c].head;
        items[2 * *nitems + 1] = written[c];
        (*nitems)++;
    }
    st->frames++;
    st->bytes += len;
    if (nc > 1) st->merged++;
}

/* Write a frame's first 12 bytes, `macs` (destination, source), at `dst`, the two swapped
 * with `swap`. Both are loaded before anything is stored (the driver may overlap its buffers
 * with ours), six bytes each: a 12-byte copy read back six bytes in cannot be
 * store-forwarded from the two stores that wrote it, and waits for every older store, the
 * ring's and the frames', to reach the cache (a stall perf showed in the packed loop). */
static inline void put_macs(uint8_t *dst, const uint8_t *macs, int swap) {
    uint8_t d[6], s[6];
    memcpy(d, macs, 6);
    memcpy(s, macs + 6, 6);
    memcpy(dst, swap ? s : d, 6);
    memcpy(dst + 6, swap ? d : s, 6);
}

/* The virtio-net header (all zero but num_buffers, set by rx_put) then a frame's MACs,
 * swapped when asked: the first span of every frame placed into a receive ring. */
static uint32_t rx_prefix(uint8_t pre[2 * NET_HDR_MAX], uint32_t hdr_len, const uint8_t macs[12],
                          int swap) {
    memset(pre, 0, 2 * NET_HDR_MAX);
    put_macs(pre + hdr_len, macs, swap);
    return hdr_len + 12;
}

int vp_net_rx_place(struct vp_vq *q, uint32_t hdr_len, int mrg, uint32_t max_len,
                    const struct vp_frames *src, const uint32_t *idx, uint32_t n, int swap,
                    struct vp_net_stats *st, struct vp_net_stats *backlog,
                    struct vp_frames *cap, uint32_t ts_sec, uint32_t ts_usec) {
    if (!hdr_len_ok(hdr_len)) return VP_ERR_HDR_LEN;
    struct vp_chain chains[RX_CHAINS];
    struct vp_seg segs[SEGS_LOCAL];
    uint32_t items[2 * 256], nitems = 0;
    uint32_t k;
    for (k = 0; k < n; k++) {
        if (q->broken) break;
        uint32_t f = idx ? idx[k] : k;
        uint32_t len = src->len[f];
        const uint8_t *data = src->buf + src->off[f];
        if (len < ETH_HLEN) { backlog->drops[DROP_RUNT]++; backlog->dropped++; continue; }
        if (len > max_len) { backlog->drops[DROP_MTU]++; backlog->dropped++; continue; }
        uint8_t pre[2 * NET_HDR_MAX];
        struct span sp[2] = {{pre, rx_prefix(pre, hdr_len, data, swap)}, {data + 12, len - 12}};
        uint32_t nc = 0;
        int got = rx_take(q, mrg, (uint64_t)hdr_len + len, chains, segs, &nc);
        if (got == RX_SMALL || got == RX_WHOLE_RING) {
            record(cap, pre + hdr_len, 12, data + 12, len - 12, ts_sec, ts_usec);
            rx_dropped(st, got);
            continue;
        }
        if (got != RX_OK) break;   /* wait for buffers, a broken ring, or one for Python */
        record(cap, pre + hdr_len, 12, data + 12, len - 12, ts_sec, ts_usec);
        rx_put(q, hdr_len, mrg, chains, nc, segs, pre, sp, 2, len, items, &nitems, st);
    }
    if (nitems) vp_add_used(q, items, nitems);
    return (int)k;
}

/* Receive chains a reflected burst pops at a time, one per frame (the common case), and
 * how many frames it places before it publishes their used entries: four packed
 * descriptors fill a cache line, and a driver polling its ring starts on them while the
 * next are being copied (a burst published whole makes it wait for all of it). Against
 * DPDK's virtio-user on packed rings, 8 and 4 gave the loop 0.95 of DPDK's back-end by
 * medians, 4 and 4 0.90, 4 and 1 0.78, 16 and 4 0.60, 8 and 8 0.46, the whole burst 0.54
 * (5 runs each, the same session). */
enum { REFLECT_GROUP = 8, REFLECT_PUBLISH = 4, REFLECT_GROUP_SEGS = 4 * REFLECT_GROUP };

/* vp_net_reflect_burst's receive side, per burst. While frames are plain copies into one
 * buffer each, they go into receive chains popped a group at a time (`batch`, used from
 * `bpos` in order; `left`: the burst's chains not seen yet, so the last group pops no
 * more than are needed); the first frame that is not gives the rest of the group back,
 * newest first, and it and every later frame go through the general path (rx_take per
 * frame), which finds the ring as if the group had never been popped. */
struct reflect {
    struct vp_vq *rq;
    int mrg;
    uint32_t max_len;
    struct vp_net_stats *rx_st, *backlog;
    struct vp_frames *out;
    int stalled;
    uint32_t nritems;
    uint32_t ritems[2 * 256];
    int grouping;            /* frames still go through groups */
    uint32_t left, nbatch, bpos;
    struct vp_chain batch[REFLECT_GROUP];
    struct vp_seg bsegs[REFLECT_GROUP_SEGS];
    struct vp_chain rchains[RX_CHAINS];
    struct vp_seg rsegs[SEGS_LOCAL];
};

static void reflect_begin(void *ctx, uint32_t n) {
    struct reflect *r = ctx;
    vp_prefetch_avail(r->rq, n);
    r->grouping = 1;
    r->left = n;
    r->nbatch = r->bpos = 0;
}

/* Give back the group's chains not used yet, newest first; no more groups this burst. */
static void reflect_end_batch(struct reflect *r) {
    for (uint32_t j = r->nbatch; j-- > r->bpos;)
        vp_unpop(r->rq, r->batch[j].head, r->batch[j].resubmitted);
    r->nbatch = r->bpos = 0;
    r->grouping = 0;
}

/* Start owning the lines a reflected frame (header and up to 116 bytes) is written to in
 * each chain's first buffer: the driver's CPU wrote them last. */
static void prefetch_buffers(const struct vp_mem *m, const struct vp_chain *chains, uint32_t n,
                             const struct vp_seg *segs) {
    for (uint32_t c = 0; c < n; c++) {
        const struct vp_seg *s = segs + chains[c].first;
        uint32_t len = s->len < 128 ? s->len : 128;
        uint8_t *p = len ? vp_mem_hinted(m, s->addr, len) : NULL;
        if (!p) continue;
        vp_prefetch_write(p);
        vp_prefetch_write(p + len - 1);
        if (len > 64) vp_prefetch_write(p + 64);
    }
}

/* Reflect one frame into the group's next chain (popping a group when the last is used
 * up) when that is a plain copy: its bytes (after the header) in host spans whose first
 * holds both MACs, no checksum to complete, and a chain of one writable buffer in the
 * hinted region with room for header and frame. 1 when placed, 0 when the general path
 * must take it. */
static int reflect_plain(struct reflect *r, const struct vp_mem *m, const struct vp_seg *s,
                         uint32_t nseg, uint32_t hdr_len, const uint8_t h[12], uint32_t flen) {
    if ((h[0] & 1) || flen > r->max_len) return 0;
    if (r->bpos >= r->nbatch) {
        uint32_t want = r->left + 1 < REFLECT_GROUP ? r->left + 1 : REFLECT_GROUP;
        int got = vp_pop(r->rq, want, r->batch, r->bsegs, REFLECT_GROUP_SEGS);
        r->nbatch = got > 0 ? (uint32_t)got : 0;
        r->bpos = 0;
        if (!r->nbatch) return 0;
        prefetch_buffers(r->rq->mem, r->batch, r->nbatch, r->bsegs);
    }
    const struct vp_chain *c = &r->batch[r->bpos];
    const struct vp_seg *rs = r->bsegs + c->first;
    uint64_t need = (uint64_t)hdr_len + flen;
    if (c->nseg != 1 || !rs->write || rs->len < need) return 0;
    uint8_t *dst = vp_mem_hinted(r->rq->mem, rs->addr, need);
    if (!dst) return 0;
    struct span sp[MAX_SPANS];
    int nsp;
    const uint8_t *whole = after_header(m, s, hdr_len, flen);
    if (whole) {
        sp[0].p = whole;
        sp[0].n = flen;
        nsp = 1;
    } else {
        nsp = spans_of(m, s, nseg, hdr_len, flen, sp, MAX_SPANS);
    }
    if (nsp < 1 || sp[0].n < 12) return 0;
    vp_put_rx_header(dst, hdr_len);
    put_macs(dst + hdr_len, sp[0].p, 1);
    uint8_t *to = dst + hdr_len + 12;
    for (int i = 0; i < nsp; i++) {
        const uint8_t *from = sp[i].p + (i ? 0 : 12);
        uint64_t len = sp[i].n - (i ? 0 : 12);
        memmove(to, from, len);
        to += len;
    }
    r->ritems[2 * r->nritems] = c->head;
    r->ritems[2 * r->nritems + 1] = (uint32_t)need;
    r->nritems++;
    r->rx_st->frames++;
    r->rx_st->bytes += flen;
    r->bpos++;
    if (r->nritems >= REFLECT_PUBLISH) {
        vp_add_used(r->rq, r->ritems, r->nritems);
        r->nritems = 0;
    }
    return 1;
}

static int take_reflect(void *ctx, const struct vp_mem *m, const struct vp_seg *s,
                        uint32_t nseg, uint32_t hdr_len, const uint8_t h[12], uint32_t flen) {
    struct reflect *r = ctx;
    struct vp_frames *out = r->out;
    if (r->left) r->left--;
    if (r->grouping) {
        /* (chains popped before a hostile one are still the driver's good buffers) */
        if (!r->stalled && reflect_plain(r, m, s, nseg, hdr_len, h, flen))
            return -1;
        reflect_end_batch(r);
    }
    if (r->stalled || r->rq->broken) {   /* the rest waits in Python's backlog */
        r->stalled = 1;
        return tx_keep(m, s, nseg, hdr_len, h, flen, out);
    }
    if (flen > r->max_len) {   /* as vp_net_rx_place refuses it */
        r->backlog->drops[DROP_MTU]++;
        r->backlog->dropped++;
        return -1;
    }
    /* Straight from the transmit buffers when that is a plain copy; through `out` when a
     * checksum is to be filled in or the frame is in many pieces. */
    uint8_t macs[12], pre[2 * NET_HDR_MAX];
    struct span sp[1 + MAX_SPANS];
    int nsp = -1, reason = -1;
    uint32_t kept = out->n;
    if (!(h[0] & 1)) nsp = spans_of(m, s, nseg, hdr_len + 12, flen - 12, sp + 1, MAX_SPANS);
    if (nsp < 0) {
        reason = tx_keep(m, s, nseg, hdr_len, h, flen, out);
        if (reason >= 0) return reason;
        const uint8_t *data = out->buf + out->off[kept];
        memcpy(macs, data, 12);
        sp[1].p = data + 12;
        sp[1].n = flen - 12;
        nsp = 1;
    } else if (gather(m, s, nseg, hdr_len, macs, 12)) {
        return DROP_SHORT_HEADER;
    }
    sp[0].p = pre;
    sp[0].n = rx_prefix(pre, hdr_len, macs, 1);
    uint32_t nc = 0;
    int got = rx_take(r->rq, r->mrg, (uint64_t)hdr_len + flen, r->rchains, r->rsegs, &nc);
    if (got == RX_OK) {
        rx_put(r->rq, hdr_len, r->mrg, r->rchains, nc, r->rsegs, pre, sp, (uint32_t)nsp + 1,
               flen, r->ritems, &r->nritems, r->rx_st);
    } else if (got == RX_SMALL || got == RX_WHOLE_RING) {
        rx_dropped(r->rx_st, got);
    } else {   /* no room yet, a broken ring, or a frame only Python places: it waits */
        r->stalled = 1;
        if (out->n == kept) reason = tx_keep(m, s, nseg, hdr_len, h, flen, out);
        kept = out->n;
    }
    out->n = kept;   /* a copy made only to be placed is not kept */
    out->used = kept ? out->off[kept - 1] + out->len[kept - 1] : 0;
    return reason;
}

int vp_net_reflect_burst(struct vp_vq *q, struct vp_vq *rq, uint32_t hdr_len, int csum,
                         int mrg, uint32_t max_len, uint32_t limit, struct vp_net_stats *st,
                         struct vp_net_stats *rx_st, struct vp_net_stats *backlog,
                         struct vp_frames *out, int *stalled) {
    *stalled = 0;
    if (!hdr_len_ok(hdr_len)) return VP_ERR_HDR_LEN;
    struct reflect r;
    r.rq = rq;
    r.mrg = mrg;
    r.max_len = max_len;
    r.rx_st = rx_st;
    r.backlog = backlog;
    r.out = out;
    r.stalled = 0;
    r.nritems = 0;
    r.grouping = 0;
    r.left = r.nbatch = r.bpos = 0;
    out->n = 0;
    out->used = 0;
    int n = tx_serve(q, hdr_len, csum, limit, st, reflect_begin, take_reflect, &r);
    reflect_end_batch(&r);   /* chains left over by dropped frames */
    if (r.nritems) vp_add_used(rq, r.ritems, r.nritems);
    *stalled = r.stalled;
    return n;
}

void vp_frames_from_flat(struct vp_frames *f, uint8_t *data, const uint32_t *lens, uint32_t n) {
    uint64_t pos = 0;
    f->buf = data;
    for (uint32_t i = 0; i < n && i < f->max; i++) {
        f->off[i] = pos;
        f->len[i] = lens[i];
        pos += lens[i];
    }
    f->n = n < f->max ? n : f->max;
    f->used = pos;
}

int vp_pcap_headers(struct vp_frames *f, uint32_t ts_sec, uint32_t ts_usec) {
    /* Check every slot before writing any: frames laid end to end (vp_frames_from_flat)
     * have none, and writing there would hit the buffer's front or the previous frame. */
    uint64_t end = 0;
    for (uint32_t i = 0; i < f->n; i++) {
        if (f->off[i] < end + 16) return VP_ERR_NO_SLOT;
        end = f->off[i] + f->len[i];
    }
    for (uint32_t i = 0; i < f->n; i++) {
        uint32_t h[4] = {ts_sec, ts_usec, f->len[i], f->len[i]};
        memcpy(f->buf + f->off[i] - 16, h, 16);
    }
    return (int)f->n;
}

/* ---------------------------------------------------------------- switch */

static inline uint32_t slot_of(const struct vp_switch *sw, uint64_t mac) {
    return (uint32_t)((mac * 0x9E3779B97F4A7C15ull) >> 32) & (sw->cap - 1);
}

static struct vp_fdb_entry *fdb_find(const struct vp_switch *sw, uint64_t mac) {
    for (uint32_t i = slot_of(sw, mac);; i = (i + 1) & (sw->cap - 1)) {
        struct vp_fdb_entry *e = &sw->t[i];
        if (e->mac == mac) return e;
        if (e->mac == 0) return NULL;
    }
}

static void fdb_put(struct vp_switch *sw, uint64_t mac, int32_t port, double seen) {
    uint32_t i = slot_of(sw, mac);
    while (sw->t[i].mac && sw->t[i].mac != mac) i = (i + 1) & (sw->cap - 1);
    if (!sw->t[i].mac) sw->count++;
    sw->t[i].mac = mac;
    sw->t[i].port = port;
    sw->t[i].seen = seen;
}

int vp_switch_init(struct vp_switch *sw, uint32_t max_entries) {
    /* Above the limit the doubling below would pass 2**31 and wrap a 32-bit `cap` to 0. */
    if (max_entries > VP_SWITCH_MAX_ENTRIES) return VP_ERR_TOO_LARGE;
    uint32_t cap = 16;
    while (cap < 2 * (uint64_t)max_entries + 2) cap *= 2;
    sw->t = calloc(cap, sizeof *sw->t);
    if (!sw->t) return VP_ERR_NOMEM;
    sw->cap = cap;
    sw->count = 0;
    sw->max_entries = max_entries;
    return 0;
}

void vp_switch_free(struct vp_switch *sw) {
    free(sw->t);
    sw->t = NULL;
    sw->cap = sw->count = 0;
}

int32_t vp_switch_lookup(const struct vp_switch *sw, uint64_t mac, double horizon) {
    const struct vp_fdb_entry *e = mac ? fdb_find(sw, mac) : NULL;
    return e && e->seen >= horizon ? e->port : -1;
}

void vp_switch_prune(struct vp_switch *sw, int32_t port, double horizon) {
    uint32_t n = 0;
    struct vp_fdb_entry *keep = malloc(sizeof *keep * (sw->count + 1));
    if (!keep) return;
    for (uint32_t i = 0; i < sw->cap; i++) {
        struct vp_fdb_entry *e = &sw->t[i];
        if (e->mac && e->seen >= horizon && (port < 0 || e->port != port)) keep[n++] = *e;
    }
    memset(sw->t, 0, sizeof *sw->t * sw->cap);
    sw->count = 0;
    for (uint32_t i = 0; i < n; i++) fdb_put(sw, keep[i].mac, keep[i].port, keep[i].seen);
    free(keep);
}

uint32_t vp_switch_dump(const struct vp_switch *sw, uint64_t *macs, int32_t *ports, double *seen,
                        uint32_t max) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < sw->cap && n < max; i++) {
        if (!sw->t[i].mac) continue;
        macs[n] = sw->t[i].mac;
        ports[n] = sw->t[i].port;
        seen[n] = sw->t[i].seen;
        n++;
    }
    return n;
}

/* The MAC at p as a 48-bit number, first byte most significant: a 4-byte and a 2-byte
 * load, each byte-swapped (gcc compiled the byte-by-byte form to six byte loads). */
static inline uint64_t mac48(const uint8_t *p) {
    uint32_t hi;
    uint16_t lo;
    memcpy(&hi, p, 4);
    memcpy(&lo, p + 4, 2);
    return (uint64_t)__builtin_bswap32(hi) << 16 | __builtin_bswap16(lo);
}

/* One classification pass (a burst): the switch, the source port and the times, the
 * counts so far, and what it remembers between frames. A burst mostly repeats one source
 * and a few destinations: the last source learnt (its entry already says src, now) and the
 * last destination looked up (`dmac_known`: `dest_last` is its entry, or NULL when the
 * table has none) are remembered. Entries never move while frames are classified (fdb_put
 * only fills empty slots), so a remembered entry is read afresh, never stale; learning a
 * new source forgets the destination looked up, which may be that source. */
struct classify {
    struct vp_switch *sw;
    int32_t src;
    double now, horizon;
    uint64_t fwd, flood, filt, drop;
    uint64_t learnt, dmac_last;
    int dmac_known;
    struct vp_fdb_entry *dest_last;
};

static void classify_start(struct classify *c, struct vp_switch *sw, int32_t src, double now,
                           double horizon) {
    /* member by member: a memset of the struct compiled to `rep stos`, slow to start and
     * paid on every burst, empty ones included */
    *c = (struct classify){.sw = sw, .src = src, .now = now, .horizon = horizon};
}

/* Learn the source of the frame whose first 12 bytes (destination, source MACs) are at p,
 * count it, and return where it goes: a port, -1 flood, -2 dropped (a multicast or zero
 * source), -3 filtered (its destination is on the port it came from). */
BURST_STEP int32_t classify_one(struct classify *c, const uint8_t *p) {
    struct vp_switch *sw = c->sw;
    uint64_t smac = mac48(p + 6);
    if ((p[6] & 1) || smac == 0) { c->drop++; return -2; }
    if (smac != c->learnt) {
        struct vp_fdb_entry *e = fdb_find(sw, smac);
        if (!e && sw->count >= sw->max_entries) {
            /* table full: forward, do not learn */
        } else {
            if (!e) c->dmac_known = 0;
            if (!e || e->port != c->src || e->seen != c->now) fdb_put(sw, smac, c->src, c->now);
            c->learnt = smac;
        }
    }
    if (!(p[0] & 1)) {
        uint64_t dmac = mac48(p);
        struct vp_fdb_entry *e = c->dest_last;
        if (dmac != c->dmac_last || !c->dmac_known) {
            e = dmac ? fdb_find(sw, dmac) : NULL;
            c->dmac_last = dmac;
            c->dest_last = e;
            c->dmac_known = 1;
        }
        if (e && e->seen >= c->horizon) {
            if (e->port == c->src) { c->filt++; return -3; }
            c->fwd++;
            return e->port;
        }
    }
    c->flood++;
    return -1;
}

static void classify_end(struct classify *c) {
    c->sw->forwarded += c->fwd;
    c->sw->flooded += c->flood;
    c->sw->filtered += c->filt;
    c->sw->dropped += c->drop;
}

int vp_switch_classify(struct vp_switch *sw, const struct vp_frames *f, int32_t src,
                       double now, double horizon, int32_t *dest) {
    struct classify c;
    classify_start(&c, sw, src, now, horizon);
    for (uint32_t i = 0; i < f->n; i++) {
        if (f->len[i] < ETH_HLEN) { c.drop++; dest[i] = -2; continue; }
        dest[i] = classify_one(&c, f->buf + f->off[i]);
    }
    classify_end(&c);
    return 0;
}

static int take_classify(void *ctx, const struct vp_mem *m, const struct vp_seg *s,
                         uint32_t nseg, uint32_t hdr_len, const uint8_t h[12], uint32_t flen) {
    (void)h;
    (void)flen;   /* tx_check let only frames of ETH_HLEN bytes or more through */
    const uint8_t *p = after_header(m, s, hdr_len, 12);
    uint8_t macs[12];
    if (!p) {
        if (gather(m, s, nseg, hdr_len, macs, 12)) return DROP_SHORT_HEADER;
        p = macs;
    }
    classify_one(ctx, p);
    return -1;
}

int vp_net_tx_switch_burst(struct vp_vq *q, uint32_t hdr_len, int csum, uint32_t limit,
                           struct vp_net_stats *st, struct vp_switch *sw, int32_t src,
                           double now, double horizon) {
    if (!hdr_len_ok(hdr_len)) return VP_ERR_HDR_LEN;
    struct classify c;
    classify_start(&c, sw, src, now, horizon);
    int n = tx_serve(q, hdr_len, csum, limit, st, NULL, take_classify, &c);
    classify_end(&c);
    return n;
}

uint32_t vp_switch_select(const int32_t *dest, uint32_t n, int32_t port, uint32_t *idx) {
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if (dest[i] == port || dest[i] == -1) idx[k++] = i;
    return k;
}
