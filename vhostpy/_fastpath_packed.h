/* vhostpy compiled fast path: the packed ring's declarations (_fastpath_packed.c), parsed by
 * cffi's cdef like _fastpath.h: plain C declarations only.
 *
 * A packed ring is a `struct vp_vq` with `packed` set; _fastpath.c's ring entry points
 * (vp_pop, vp_add_used, vp_unpop, vp_has_available, vp_needs_notification, vp_signal,
 * vp_disable_notifications, vp_enable_notifications) dispatch to the functions below, so
 * callers use those and never these directly (Python calls only the record functions). */

/* Writable buffers a buffer id keeps in place (more are kept in a malloc'd array). */
#define VP_PID_INLINE 2

/* A packed ring's buffer id: what completing it needs (and, with inflight tracking, where
 * its chain is in the region), one 64-byte cache line. `slots` is how many ring slots its
 * chain used (0: the id is not in flight); its device-writable buffers are kept for the
 * dirty log (used descriptors overwrite the ring): `nw` of them in `w` (or in `more` when
 * there are more than VP_PID_INLINE), or, for an indirect chain, the table to walk again
 * (`ind_len` nonzero; the driver leaves it alone until the id is used). Ring sizes are at
 * most 32768, so slot counts and region entries fit 16 bits. */
struct vp_pid {
    uint16_t slots;
    uint16_t taken;          /* 1 once vp_pop handed it out (a recovered id waits with 0) */
    uint16_t nw;
    uint16_t inf_head;       /* its chain's first and last entries in the inflight region */
    uint16_t inf_last;
    uint16_t at;             /* the ring slot its chain starts at (0xFFFF: recovered) */
    uint32_t ind_len;
    uint64_t ind_addr;
    struct vp_seg *more;
    struct vp_seg w[2];
};

/* `n` zeroed records (NULL when out of memory), freed with vp_pids_free (which also frees
 * what the records hold). */
struct vp_pid *vp_pids_new(uint32_t n);
void vp_pids_free(struct vp_pid *pids, uint32_t n);
/* Forget every id in flight (SET_VRING_BASE, reset): records cleared, counts zeroed. */
void vp_packed_forget(struct vp_vq *q);

int vp_packed_has_available(const struct vp_vq *q);
uint32_t vp_packed_available(const struct vp_vq *q);
void vp_packed_prefetch_avail(const struct vp_vq *q, uint32_t n);
int vp_packed_pop(struct vp_vq *q, uint32_t limit, struct vp_chain *chains, struct vp_seg *segs,
                  uint32_t max_segs);
void vp_packed_unpop(struct vp_vq *q, uint32_t id, uint32_t resubmitted);
void vp_packed_add_used(struct vp_vq *q, const uint32_t *items, uint32_t n);
int vp_packed_needs_notification(const struct vp_vq *q);
void vp_packed_disable_notifications(struct vp_vq *q);
int vp_packed_enable_notifications(struct vp_vq *q, int after_available);

/* Inflight tracking of a packed ring (INFLIGHT_SHMFD, inflight.PackedInflight has the layout
 * and the store order, which C follows store for store): `inflight` then points at the
 * queue's QueueRegionPacked, `inflight_counter` is the next chain's counter and
 * `pinf_free_head` the region's free head as this instance keeps it (Python mirrors them
 * after attaching or recovering). A region whose free list turns out to leave the queue was
 * written by someone else: tracking stops (`inflight` NULL, `inflight_lost` set). */
