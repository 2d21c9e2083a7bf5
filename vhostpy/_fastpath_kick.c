/* vhostpy compiled fast path: a ring's kick served in C, without Python (see _fastpath_kick.h).
 *
 * A kick C serves to the end is what blk_cffi.BlkFastPath.drain does for it (the same
 * vp_blk_drain call, not polling), plus the runner's bookkeeping for a kick that published
 * at most `max_served` chains: the count. Anything else -- a request C hands to Python, a
 * failed request to log, an interrupt Python must raise, a bigger segment array, a ring that
 * broke, a kick that published more (the runner may start polling or coalescing) -- stops
 * the ring's C service (`armed` = 0) and is handed back with the state to finish from.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>
#include "_fastpath.h"
#include "_fastpath_kick.h"

#define KICK_EVENTS 16

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void hand_back(struct vp_kick *k, int rc, uint32_t served) {
    k->armed = 0;
    k->handback = 1;
    k->rc = rc;
    k->served = served;
}

/* One readable kick fd: 1 when the ring was handed back. */
static int serve_kick(struct vp_kick *k) {
    uint64_t count;
    ssize_t got;
    do got = read(k->kick_fd, &count, sizeof count); while (got < 0 && errno == EINTR);
    if (got != (ssize_t)sizeof count) return 0;         /* nothing there (EAGAIN): spurious */
    if (k->handback) return 1;                          /* Python has not finished the last one */
    if (!k->armed) {
        hand_back(k, -1, 0);
        return 1;
    }
    uint64_t before = k->bu->served, calls = k->q->calls;
    k->waiting = vp_available(k->q);
    k->bu->count = k->bu->pos = 0;
    int rc = vp_blk_drain(k->blk, k->q, k->bu, k->bu->max_chains, 0, k->call_fd);
    uint32_t served = (uint32_t)(k->bu->served - before);
    k->signals = (uint32_t)(k->q->calls - calls);
    if (rc != VP_BLK_DONE || served > k->max_served || k->q->broken) {
        hand_back(k, rc, served);
        return 1;
    }
    k->kicks++;
    k->chains += served;
    return 0;
}

int vp_kick_wait(int epfd, struct vp_kick **rings, uint32_t n, int timeout_ms) {
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    struct epoll_event ev[KICK_EVENTS];
    for (;;) {
        int wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            wait = left > 0 ? (int)left : 0;
        }
        int m = epoll_wait(epfd, ev, KICK_EVENTS, wait);
        if (m < 0) return errno == EINTR ? 0 : -errno;
        if (m == 0) return 0;
        int other = 0, back = 0;
        for (int i = 0; i < m; i++) {
            int fd = ev[i].data.fd;
            uint32_t j = 0;
            while (j < n && rings[j]->kick_fd != fd) j++;
            if (j == n) other = 1;
            else back += serve_kick(rings[j]);
        }
        if (other || back) return back;
    }
}
