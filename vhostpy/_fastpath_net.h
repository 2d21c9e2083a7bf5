/* vhostpy compiled fast path, virtio-net polling loop (_fastpath_net.c).
 *
 * Parsed by cffi's cdef after _fastpath.h (plain C declarations only). One call of
 * vp_net_tx_poll serves several bursts of a transmit ring and hands each burst to a built-in
 * consumer that needs no Python: count only, the learning switch when the port is alone on it
 * (learn, flood to no one), or reflect into the port's receive ring. It is built from the
 * public burst functions of _fastpath.c, in the order net_cffi.NetFastPath calls them one
 * burst at a time, so counters, drop reasons, used entries and signals are the same.
 */

/* What vp_net_tx_poll does with the frames of each burst. */
enum { VP_TX_SINK = 0, VP_TX_CLASSIFY = 1, VP_TX_REFLECT = 2 };

/* Why vp_net_tx_poll returned. */
enum { VP_POLL_EMPTY = 0, VP_POLL_BUDGET = 1, VP_POLL_STALLED = 2, VP_POLL_BROKEN = 3 };

struct vp_net_poll {
    /* the transmit ring */
    uint32_t mode;
    uint32_t hdr_len;
    uint32_t csum;            /* VIRTIO_NET_F_CSUM negotiated: read and check each header */
    uint32_t burst;           /* chains per burst (at most 256; reflecting: at most out->max) */
    uint32_t max_bursts;
    uint64_t spin_ns;         /* an empty ring is re-checked for this long before the call
                                 returns VP_POLL_EMPTY (0: at once; only while the ring is
                                 polled, its kicks off) */
    int32_t call_fd;          /* its call eventfd, -1 for none */
    uint32_t signal;          /* 1: vp_signal after each burst (a call is configured) */
    /* VP_TX_CLASSIFY */
    struct vp_switch *sw;
    int32_t src;
    double now;
    double horizon;
    /* VP_TX_REFLECT: the receive ring of the same port */
    struct vp_vq *rxq;
    int32_t rx_call_fd;
    uint32_t rx_signal;
    int32_t mrg;
    uint32_t max_len;
    struct vp_net_stats *rx_st;
    struct vp_net_stats *backlog;
    /* results */
    uint32_t bursts;          /* bursts served by this call (VP_POLL_STALLED: `out` holds
                                 the reflected frames that did not fit, as sent) */
};

/* A VP_POLL_* reason, or VP_ERR_HDR_LEN (nothing done) when p->hdr_len is not 10 or 12. */
int vp_net_tx_poll(struct vp_vq *q, struct vp_net_stats *st, struct vp_frames *out,
                   struct vp_net_poll *p);

/* ------------------------------------------------------------- frames toward the guest */

/* Why vp_net_rx_offer returned. */
enum { VP_OFFER_DONE = 0,      /* `count` frames taken */
       VP_OFFER_EMPTY = 1,     /* the ring had no buffers for the next frame (and, when
                                  waiting, got none it could use for `idle_ns`) */
       VP_OFFER_TIME = 2,      /* `budget_ns` elapsed */
       VP_OFFER_CAPTURE = 3,   /* `cap` has no room for another chunk: write it, call again */
       VP_OFFER_BROKEN = 4 };  /* the ring turned out hostile (its error says why) */

/* A negative return of vp_net_rx_offer besides VP_ERR_HDR_LEN: arguments it cannot use
 * (no frames, a chunk of 0 or above VP_OFFER_MAX_CHUNK, a position outside the frames). */
enum { VP_ERR_OFFER_ARGS = -16 };

/* The most frames one vp_net_rx_place call of vp_net_rx_offer places (the length of the
 * cyclic index table beyond the frames). */
#define VP_OFFER_MAX_CHUNK 256

struct vp_net_offer {
    /* the frames, offered cyclically: frame idx[pos + k] of `src` is the k-th placed; idx
     * holds nsrc + chunk entries with idx[j] = j % nsrc */
    const struct vp_frames *src;
    const uint32_t *idx;
    uint32_t nsrc;
    uint32_t pos;             /* in: the first frame (< nsrc); out: the next one */
    uint64_t count;           /* frames to take at most */
    uint32_t chunk;           /* frames per placement (each publishes its used entries) */
    uint32_t hdr_len;
    int32_t mrg;
    uint32_t max_len;         /* longer frames are refused (counted in `backlog`) */
    uint32_t signal;          /* 1: vp_signal after each chunk that placed frames */
    int32_t call_fd;
    /* 0: one pass, no waiting. Otherwise keep placing while the driver posts buffers
     * until `budget_ns` elapsed in all, or the ring stayed without usable buffers for
     * `idle_ns`; kicks are off meanwhile (back on at the end if they were on). */
    uint64_t budget_ns;
    uint64_t idle_ns;
    struct vp_net_stats *st;  /* placed frames, and drops for lack of room */
    struct vp_net_stats *backlog;   /* refused frames (runts, above max_len) */
    struct vp_frames *cap;    /* capture records (NULL: none), timestamped per chunk */
    /* results */
    uint64_t taken;           /* frames taken: placed, or dropped and counted */
    uint32_t chunks;          /* placements made */
    uint32_t stuck;           /* the last placement stopped while the ring had buffers
                                 (too few for a merged frame, or a frame only Python can
                                 place) */
};

/* Place frames of o->src into the receive ring `q` in chunks of vp_net_rx_place, signalling
 * after each as configured: see struct vp_net_offer. A VP_OFFER_* reason, VP_ERR_HDR_LEN or
 * VP_ERR_OFFER_ARGS (nothing done). Works on split and packed rings (only the ring entry
 * points of _fastpath.h are used). */
int vp_net_rx_offer(struct vp_vq *q, struct vp_net_offer *o);

/* Read up to `max` frames from non-blocking fd `fd` (a tap) into `out`, each after a free
 * 16-byte pcap record slot, each at most `max_len` bytes (a longer one is cut by read(2)
 * and counted in *truncated, then dropped). Stops at EAGAIN, at end of file, when `out` has
 * no room for another frame of `max_len`, or on an error: returns the frames read, or
 * -errno when the first read failed with anything but EAGAIN/EINTR (nothing read). */
int vp_net_read_frames(int fd, struct vp_frames *out, uint32_t max, uint32_t max_len,
                       uint64_t *truncated);
