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
    uint32_t burst;           /* chains per burst (at most 256, at most out->max) */
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
    int32_t *dest;            /* room for `burst` entries */
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
