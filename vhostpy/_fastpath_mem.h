/* vhostpy compiled fast path: the inline guest-memory lookup of the per-descriptor paths.
 *
 * Private to the C files (cffi never parses it): _fastpath.h declares the structures.
 * vp_mem_check, vp_mem_ptr and vp_mem_span search the region table; the paths that look up
 * every descriptor and every frame first try the region the table's last search found
 * (`hint`, where a guest's buffers nearly always are) inline, and search only when that
 * misses.
 */
#ifndef VHOSTPY_FASTPATH_MEM_H
#define VHOSTPY_FASTPATH_MEM_H

/* Whether guest range [gpa, gpa + len) lies in the region of `size` bytes at guest `base`.
 * A range that passes cannot wrap: it ends inside the region. */
static inline int vp_region_holds(uint64_t base, uint64_t size, uint64_t gpa, uint64_t len) {
    uint64_t off = gpa - base;
    return off < size && len <= size - off;
}

/* The host address of guest range [gpa, gpa + len) when all of it lies in the hinted
 * region, else NULL (it may still be mapped: ask vp_mem_check / vp_mem_ptr). */
static inline uint8_t *vp_mem_hinted(const struct vp_mem *m, uint64_t gpa, uint64_t len) {
    uint32_t h = __atomic_load_n(&m->hint, __ATOMIC_RELAXED);
    if (h >= m->n) return NULL;
    const struct vp_region *r = &m->r[h];
    if (!vp_region_holds(r->gpa, r->size, gpa, len)) return NULL;
    return r->host + (gpa - r->gpa);
}

/* Start loading the cache line holding `p`: for reading, or owned for writing (the store
 * that follows then needs no second trip to the CPU that wrote it last). A hint only: it
 * never faults and changes no memory. */
static inline void vp_prefetch(const void *p) {
    __builtin_prefetch(p, 0, 3);
}

static inline void vp_prefetch_write(const void *p) {
#if defined(__x86_64__)
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

#endif
