/* vhostpy compiled fast path: kicks served in C (_fastpath_kick.c), parsed by cffi's cdef like
 * _fastpath.h: plain C declarations only.
 *
 * The event loop (loop.EventLoop) waits in vp_kick_wait instead of its selector while rings
 * with a compiled data path are live: an epoll set holds those rings' kick eventfds and the
 * selector's own epoll fd. A kick on such a ring is served right there -- eventfd read,
 * vp_blk_drain, used entries, interrupt -- with no Python at all; the call returns to Python
 * for everything else (a Python fd ready, a timer due, a signal) and whenever a ring needs
 * Python to finish what its kick started (`handback`). */

/* One ring whose kicks C may serve. Python (native_kick.NativeKick) fills it before each
 * wait; C sets `handback` and what Python needs to finish the kick. */
struct vp_kick {
    int32_t kick_fd;
    int32_t call_fd;         /* vp_blk_drain's call_fd: the call eventfd, or -2: no decision */
    uint32_t armed;          /* 1: serve the next kick in C; 0: hand every kick to Python */
    uint32_t handback;       /* set by C: Python must finish this ring's kick */
    int32_t rc;              /* what vp_blk_drain returned then (VP_BLK_*), or -1: not served */
    uint32_t served;         /* chains that handed-back kick published in C */
    uint32_t max_served;     /* a kick publishing more than this is handed back (pacing) */
    uint32_t waiting;        /* chains available when that kick came */
    uint32_t signals;        /* interrupts C decided on while serving it */
    uint32_t pad;
    uint64_t kicks;          /* kicks C served to the end */
    uint64_t chains;         /* chains they published */
    struct vp_blk *blk;
    struct vp_vq *q;
    struct vp_blk_burst *bu;
};

/* Wait on `epfd` for at most `timeout_ms` (-1: no limit), serving kicks of `rings[0 .. n)`
 * (matched by kick_fd) as they come. Returns when an fd that is not a ring's kick is ready,
 * the time is up, a signal interrupted the wait, or a ring handed its kick back: the number
 * of rings with `handback` set, or -errno when epoll_wait failed otherwise. */
int vp_kick_wait(int epfd, struct vp_kick **rings, uint32_t n, int timeout_ms);
