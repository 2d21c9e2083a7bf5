/* vhostpy compiled fast path: declarations shared by _fastpath.c and the cffi cdef.
 *
 * This header is parsed by cffi's cdef (see _native_build.py), so it holds only plain C
 * declarations: no preprocessor conditionals, no includes, no inline code.
 *
 * Contract: every function trusts only the structures Python built (region table, ring
 * pointers checked by Virtqueue against the region table); everything read from guest memory
 * (indices, descriptors, headers) is checked before use. Nothing here allocates Python
 * objects or keeps pointers across calls except inside the structures passed in.
 */

/* One guest RAM region as C sees it: [gpa, gpa+size) at host address `host`. */
struct vp_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

/* The region table of one GuestMemory, sorted by gpa; rebuilt when its generation changes. */
struct vp_mem {
    uint32_t n;
    uint32_t hint;           /* the region the last lookup found (a guess: always checked) */
    struct vp_region *r;
};

/* One split ring's device-side state; the Python Virtqueue (cffi variant) reads and writes
 * these fields directly, so both languages see one copy of the state. */
struct vp_vq {
    struct vp_mem *mem;
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t size;
    uint32_t last_avail_idx;
    uint32_t used_idx;
    uint32_t event_idx;
    uint32_t notify;
    uint32_t signal_valid;
    uint32_t unsignalled;
    uint32_t broken;         /* set with `error` when the ring turned out hostile */
    uint32_t seg_overflow;   /* vp_pop stopped because the segment array was full */
    uint64_t calls;          /* decisions that wanted an interrupt (whoever raised it) */
    uint64_t popped;         /* chains vp_pop handed out, less those vp_unpop gave back */
    char error[320];
    /* Inflight I/O tracking (vhost-user INFLIGHT_SHMFD; inflight.py has the layout): this
     * queue's QueueRegionSplit, or NULL when off. vp_pop marks each chain it takes (counter,
     * then flag); vp_add_used links the batch (next, last_batch_head) before used->idx
     * moves and clears the flags and sets used_idx after. */
    uint8_t *inflight;
    uint64_t inflight_counter;   /* the next chain's counter */
    /* Heads a previous back-end took and never completed (resubmit[pos .. n), oldest
     * first): vp_pop returns them before anything from the avail ring. */
    const uint16_t *resubmit;
    uint32_t resubmit_n;
    uint32_t resubmit_pos;
    /* The migration dirty log (SET_LOG_BASE; dirtylog.py has the layout), or NULL when off:
     * vp_add_used sets the bits of every writable buffer of the chains it completes and,
     * with log_used, of the used ring at log_used_gpa. Bits are set atomically. */
    uint8_t *log;
    uint64_t log_len;            /* bytes of bitmap */
    uint64_t log_used_gpa;
    uint32_t log_used;
    uint64_t log_outside;        /* marks that reached past the log's end */
    uint64_t log_marked;         /* pages marked (a page marked twice counts twice) */
    /* A packed ring (VIRTIO_F_RING_PACKED; _fastpath_packed.h) when `packed` is set: `desc`
     * is then the descriptor ring, `avail` the driver event area and `used` the device
     * event area; the indices are in [0, size), each with its wrap counter. */
    uint32_t packed;
    uint32_t avail_wrap;
    uint32_t used_wrap;
    uint32_t in_flight_slots;    /* ring slots of the buffer ids in flight */
    uint32_t used_advance;       /* slots the used index moved since the last signal decision */
    uint64_t desc_gpa;           /* the descriptor ring's guest address (dirty log) */
    struct vp_pid *pid;          /* `size` records, one per buffer id */
    uint32_t pinf_free_head;     /* packed inflight tracking (_fastpath_packed.h) */
    uint32_t inflight_lost;
    /* Packed: the resubmitted chains' descriptors as the region recorded them (16 bytes
     * each, ring format); entry k of `resubmit` has resubmit_first[k] .. [k + 1]. */
    const uint8_t *resubmit_descs;
    const uint32_t *resubmit_first;
    /* VIRTIO_F_IN_ORDER negotiated: a packed ring then publishes a batch that completes
     * every chain in flight, in the order they were taken, with nothing written, as one used
     * descriptor (the last chain's id; virtio 1.2 2.8.21). */
    uint32_t in_order;
};

/* A buffer of a popped chain (guest-physical address, length, device-writable?). */
struct vp_seg {
    uint64_t addr;
    uint32_t len;
    uint32_t write;
};

/* A popped chain: its head and its segments segs[first .. first+nseg). */
struct vp_chain {
    uint32_t head;
    uint32_t first;
    uint32_t nseg;
    uint32_t readable_len;
    uint32_t writable_len;
    uint32_t resubmitted;    /* taken from the resubmit list, not the avail ring */
};

/* Frames in one flat buffer; each frame's bytes at buf[off[i] .. off[i]+len[i]), in
 * ascending order. Frames the net functions keep (transmit bursts, capture buffers) are
 * each preceded by a 16-byte slot where a pcap record header may be written; frames laid
 * end to end by vp_frames_from_flat have no such slot (vp_pcap_headers refuses them). */
struct vp_frames {
    uint8_t *buf;
    uint64_t cap;
    uint64_t used;
    uint32_t n;
    uint32_t max;
    uint64_t *off;
    uint32_t *len;
};

/* Counters of one net queue (drop reasons in the order of net.DROP_REASONS). */
struct vp_net_stats {
    uint64_t frames;
    uint64_t bytes;
    uint64_t drops[10];
    uint64_t dropped;   /* sum of drops[] since the counters were last collected */
    uint64_t checksums; /* accepted frames with a partial checksum (NEEDS_CSUM) to complete */
    uint64_t merged;    /* frames spread over more than one receive buffer (MRG_RXBUF) */
};

/* The learning switch's forwarding database (open addressing, MAC 0 = empty). */
struct vp_fdb_entry {
    uint64_t mac;
    int32_t port;
    double seen;
};

struct vp_switch {
    uint32_t cap;            /* power of two, at least 2 * max_entries */
    uint32_t count;
    uint32_t max_entries;
    struct vp_fdb_entry *t;
    uint64_t forwarded;
    uint64_t flooded;
    uint64_t filtered;
    uint64_t dropped;
};

/* Negative returns of the functions below (a caller's mistake: nothing was done). */
enum {
    VP_ERR_NOMEM = -1,          /* out of memory */
    VP_ERR_TOO_LARGE = -2,      /* vp_switch_init: max_entries above VP_SWITCH_MAX_ENTRIES */
    VP_ERR_HDR_LEN = -3,        /* a virtio-net header length other than 10 or 12 */
    VP_ERR_NO_SLOT = -4         /* vp_pcap_headers: a frame has no record slot before it */
};

/* The largest forwarding database vp_switch_init builds (its table, twice as many slots
 * rounded up to a power of two, must fit 32-bit indices). */
#define VP_SWITCH_MAX_ENTRIES 1073741823

/* ---------------------------------------------------------------- memory and rings */
int vp_mem_check(const struct vp_mem *m, uint64_t gpa, uint64_t len, char *err, size_t errlen);
uint8_t *vp_mem_ptr(const struct vp_mem *m, uint64_t gpa, uint64_t len);
/* Host address of guest byte `gpa` and in *room how many bytes from there lie in its region
 * (NULL and 0 when unmapped); for callers that split a guest range into host pieces. */
uint8_t *vp_mem_span(const struct vp_mem *m, uint64_t gpa, uint64_t *room);

int vp_pending(struct vp_vq *q);
int vp_has_available(const struct vp_vq *q);
/* Chains available and not popped yet (resubmitted ones included), as Virtqueue.available
 * counts them: a split avail idx the ring cannot hold counts none (vp_pop reports it). */
uint32_t vp_available(const struct vp_vq *q);
/* Start loading the ring lines the next `n` chains are read from (a hint for a burst about
 * to pop them: the driver wrote them on another CPU, and loads started together overlap). */
void vp_prefetch_avail(const struct vp_vq *q, uint32_t n);
int vp_pop(struct vp_vq *q, uint32_t limit, struct vp_chain *chains, struct vp_seg *segs,
           uint32_t max_segs);
void vp_add_used(struct vp_vq *q, const uint32_t *items, uint32_t n);
/* Give back the most recently popped chain (`head`, `resubmitted` as vp_pop said) unused:
 * the next vp_pop returns it again. Chains are given back newest first. */
void vp_unpop(struct vp_vq *q, uint32_t head, uint32_t resubmitted);
/* Mark guest-physical [gpa, gpa+len) dirty in q's log (nothing when the log is off). */
void vp_log_mark(struct vp_vq *q, uint64_t gpa, uint64_t len);
int vp_needs_notification(const struct vp_vq *q);
int vp_signal(struct vp_vq *q, int call_fd);
void vp_disable_notifications(struct vp_vq *q);
/* Ask for kicks again: for any entry past last_avail_idx, or with `after_available` only for
 * entries past those available now (a device leaving them unused until more come). Returns
 * whether such entries are there already (the caller must look again). */
int vp_enable_notifications(struct vp_vq *q, int after_available);

/* ---------------------------------------------------------------- virtio-net */
/* Every function here that takes a virtio-net header length `hdr_len` accepts only 10
 * (legacy without MRG_RXBUF) or 12 (VERSION_1 or MRG_RXBUF), the lengths virtio defines
 * and the buffers C keeps headers in are sized for; any other value returns VP_ERR_HDR_LEN
 * before a ring, a counter or a buffer is touched. */
/* Pop up to `limit` transmit chains, check each as net.NetDevice does (its virtio-net header
 * too when `csum`: VIRTIO_NET_F_CSUM negotiated; otherwise it is left unread), count them in
 * `st`, copy accepted frames into `out` (unless NULL) and publish the used entries. */
int vp_net_tx_burst(struct vp_vq *q, uint32_t hdr_len, int csum, uint32_t limit,
                    struct vp_net_stats *st, struct vp_frames *out);
/* Place frames of `src` (those at idx[0 .. n), or the first n when idx is NULL) into the
 * receive ring `q`, MACs swapped with `swap`, each recorded into `cap` (unless NULL) with
 * the given timestamp; runts and frames above `max_len` are counted in `backlog` and not
 * placed. Returns how many frames were taken (placed, or dropped and counted); it stops at
 * the first frame the ring has no buffers for yet. Used entries are published, not signalled. */
int vp_net_rx_place(struct vp_vq *q, uint32_t hdr_len, int mrg, uint32_t max_len,
                    const struct vp_frames *src, const uint32_t *idx, uint32_t n, int swap,
                    struct vp_net_stats *st, struct vp_net_stats *backlog,
                    struct vp_frames *cap, uint32_t ts_sec, uint32_t ts_usec);
/* Reflect a burst of transmit chains into the receive ring `rq` of the same port, each
 * accepted frame copied once, straight from its transmit buffers into receive buffers with
 * its MACs swapped: what vp_net_tx_burst then vp_net_rx_place(swap=1) leave behind (used
 * entries, counters, drop reasons), without the copy in between. Once `rq` has no room (or
 * turns out hostile, or a frame needs more buffers than C takes at once) that frame and
 * every accepted one after it are copied into `out` as sent (MACs not swapped) for the
 * caller's backlog, and *stalled is set. Returns the chains popped. */
int vp_net_reflect_burst(struct vp_vq *q, struct vp_vq *rq, uint32_t hdr_len, int csum,
                         int mrg, uint32_t max_len, uint32_t limit, struct vp_net_stats *st,
                         struct vp_net_stats *rx_st, struct vp_net_stats *backlog,
                         struct vp_frames *out, int *stalled);
/* Describe `n` frames (at most f->max) laid end to end in `data` (no record slots). */
void vp_frames_from_flat(struct vp_frames *f, uint8_t *data, const uint32_t *lens, uint32_t n);
/* Write a pcap record header into the slot before each frame of `f`: how many, or
 * VP_ERR_NO_SLOT (nothing written) when a frame's 16 bytes before it are not free (it
 * starts less than 16 bytes after the buffer's start or the previous frame's end). */
int vp_pcap_headers(struct vp_frames *f, uint32_t ts_sec, uint32_t ts_usec);

/* ---------------------------------------------------------------- switch */
/* 0, VP_ERR_TOO_LARGE for max_entries above VP_SWITCH_MAX_ENTRIES, or VP_ERR_NOMEM. */
int vp_switch_init(struct vp_switch *sw, uint32_t max_entries);
void vp_switch_free(struct vp_switch *sw);
int32_t vp_switch_lookup(const struct vp_switch *sw, uint64_t mac, double horizon);
void vp_switch_prune(struct vp_switch *sw, int32_t port, double horizon);
uint32_t vp_switch_dump(const struct vp_switch *sw, uint64_t *macs, int32_t *ports,
                        double *seen, uint32_t max);
int vp_switch_classify(struct vp_switch *sw, const struct vp_frames *f, int32_t src,
                       double now, double horizon, int32_t *dest);
/* A transmit burst of a port alone on its switch (switch.CffiSwitch.solo): what
 * vp_net_tx_burst then vp_switch_classify leave behind (used entries, counters, drop
 * reasons, what the switch learnt and counted), reading each frame's MACs where the driver
 * put them: nothing is copied, as nothing goes anywhere. The chains popped, or
 * VP_ERR_HDR_LEN. */
int vp_net_tx_switch_burst(struct vp_vq *q, uint32_t hdr_len, int csum, uint32_t limit,
                           struct vp_net_stats *st, struct vp_switch *sw, int32_t src,
                           double now, double horizon);
uint32_t vp_switch_select(const int32_t *dest, uint32_t n, int32_t port, uint32_t *idx);

/* ---------------------------------------------------------------- virtio-blk (_fastpath_blk.c) */

/* One BlockDevice as C sees it, and the request counters C adds to (BlkStats folds them). */
struct vp_blk {
    int32_t fd;
    uint32_t read_only;
    uint64_t capacity;       /* in 512-byte sectors */
    uint8_t id[20];          /* the serial, zero-padded (GET_ID) */
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors;
};

/* A burst of popped chains being served, with room to resume after a hand-back to Python:
 * chains[pos .. count) are still to serve; items[2k], items[2k+1] = head, used length. */
struct vp_blk_burst {
    struct vp_chain *chains;
    struct vp_seg *segs;
    uint32_t *items;
    uint32_t max_chains;
    uint32_t max_segs;
    uint32_t count;
    uint32_t pos;
    uint64_t served;         /* chains whose used entries were published */
    char error[256];         /* why the request at pos - 1 failed (VP_BLK_FAILED) */
};

/* vp_blk_drain's return values: what Python must do before calling it again. */
#define VP_BLK_DONE 0        /* ring empty (or broken): nothing left to do */
#define VP_BLK_PYTHON 1      /* serve chains[pos] with handle_chain, set items[2*pos+1], pos++ */
#define VP_BLK_FAILED 2      /* the request before pos failed: log `error` */
#define VP_BLK_CALL 3        /* the driver wants an interrupt and call_fd was -1: call it */
#define VP_BLK_SEGS 4        /* one chain has more descriptors than segs holds: grow it */

int vp_blk_drain(struct vp_blk *b, struct vp_vq *q, struct vp_blk_burst *bu, uint32_t limit,
                 int polling, int call_fd);
