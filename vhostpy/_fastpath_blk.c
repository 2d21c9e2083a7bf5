/* vhostpy compiled fast path: virtio-blk requests served in C, a burst per call.
 *
 * Contract (the reference is blk.BlockDevice; blk_cffi.BlkFastPath drives this):
 *
 * - Chains are popped with vp_pop (_fastpath.c), so a hostile ring fails exactly as under the
 *   pure-Python Virtqueue; nothing here walks descriptors itself.
 * - IN, OUT, FLUSH and GET_ID are served here: the 16-byte header is gathered and checked
 *   as blk.py checks it (same order, same messages), data moves with preadv / pwritev whose
 *   iovecs point straight into guest memory (no copies), short transfers loop, EINTR
 *   retries, FLUSH is fdatasync. The status byte is the last writable byte.
 * - Everything else (no status byte, DISCARD, WRITE_ZEROES, unknown types) goes back to
 *   Python in ring order (VP_BLK_PYTHON): C stops at that chain, Python serves it with
 *   handle_chain and calls again, C carries on with the rest of the burst.
 * - A request that fails here gets its status byte and counters here; Python only logs the
 *   message (VP_BLK_FAILED), so the log is blk.py's line for line.
 * - Used entries of a burst are published with one used->idx store and one notification
 *   decision (call eventfd written here when Python passed it); a ring that broke while
 *   popping publishes nothing, as Virtqueue.add_used_many on a failed ring does.
 *
 * Guest memory is reached only through the region table (vp_mem_span); segments were
 * checked to be mapped by the walk, and the table cannot change during a call.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include "_fastpath.h"

#define SECTOR 512u
#define HDR_LEN 16u
#define ID_BYTES 20u
#define IOV_BATCH 1024          /* IOV_MAX on Linux; blk.py's _vectored uses the same */

#define T_IN 0u
#define T_OUT 1u
#define T_FLUSH 4u
#define T_GET_ID 8u
#define S_OK 0
#define S_IOERR 1

typedef unsigned long long ull;

enum { SERVED, HAND_BACK, FAILED };

/* A position in the readable (write == 0) or writable (write == 1) bytes of a chain. */
struct cursor {
    const struct vp_seg *s;
    uint32_t n;
    uint32_t k;        /* current segment */
    uint64_t in;       /* offset inside it */
    uint32_t write;
};

static void cur_init(struct cursor *c, const struct vp_seg *s, uint32_t n, uint32_t write) {
    c->s = s;
    c->n = n;
    c->k = 0;
    c->in = 0;
    c->write = write;
}

/* Step over segments of the other direction and finished ones; 0 when none is left. */
static int cur_settle(struct cursor *c) {
    while (c->k < c->n && (c->s[c->k].write != c->write || c->in >= c->s[c->k].len)) {
        c->k++;
        c->in = 0;
    }
    return c->k < c->n;
}

static void cur_skip(struct cursor *c, uint64_t bytes) {
    while (bytes && cur_settle(c)) {
        uint64_t left = c->s[c->k].len - c->in;
        uint64_t take = left < bytes ? left : bytes;
        c->in += take;
        bytes -= take;
    }
}

/* The next host piece of at most `max` bytes at the cursor (advanced past it); 0 at the end,
 * -1 if guest memory is not mapped (cannot happen after the walk: kept as a guard). */
static int cur_piece(struct cursor *c, const struct vp_mem *m, uint64_t max, struct iovec *out) {
    if (!max || !cur_settle(c)) return 0;
    uint64_t room;
    uint8_t *p = vp_mem_span(m, c->s[c->k].addr + c->in, &room);
    if (!p) return -1;
    uint64_t take = c->s[c->k].len - c->in;
    if (room < take) take = room;
    if (max < take) take = max;
    out->iov_base = p;
    out->iov_len = take;
    c->in += take;
    return 1;
}

/* Copy `len` bytes between the chain at the cursor and `buf`; bytes moved. */
static uint64_t cur_copy(struct cursor *c, const struct vp_mem *m, uint8_t *buf, uint64_t len,
                         int to_guest) {
    uint64_t done = 0;
    struct iovec v;
    while (done < len && cur_piece(c, m, len - done, &v) == 1) {
        if (to_guest) memcpy(v.iov_base, buf + done, v.iov_len);
        else memcpy(buf + done, v.iov_base, v.iov_len);
        done += v.iov_len;
    }
    return done;
}

/* preadv / pwritev of `length` bytes at `offset` between the file and the chain from the
 * cursor on, IOV_BATCH pieces per call, until done, EOF or an error (*err = errno). */
static uint64_t transfer(const struct vp_blk *b, const struct vp_mem *m, struct cursor *c,
                         uint64_t length, uint64_t offset, int writing, int *err) {
    struct iovec iov[IOV_BATCH];
    uint64_t done = 0;
    *err = 0;
    while (done < length) {
        struct cursor probe = *c;
        uint64_t want = length - done;
        int cnt = 0;
        while (cnt < IOV_BATCH && want) {
            int rc = cur_piece(&probe, m, want, &iov[cnt]);
            if (rc < 0) {
                *err = EFAULT;
                return done;
            }
            if (rc == 0) break;
            want -= iov[cnt].iov_len;
            cnt++;
        }
        if (!cnt) break;
        ssize_t n;
        do {
            n = writing ? pwritev(b->fd, iov, cnt, (off_t)(offset + done))
                        : preadv(b->fd, iov, cnt, (off_t)(offset + done));
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            *err = errno;
            return done;
        }
        if (n == 0) break;
        done += (uint64_t)n;
        cur_skip(c, (uint64_t)n);
    }
    return done;
}

/* blk.py's _check_range: 0 if [sector, sector + length) is whole sectors inside the disk. */
static int check_range(const struct vp_blk *b, const char *what, uint64_t sector, uint64_t length,
                       char *err, size_t el) {
    if (length % SECTOR) {
        snprintf(err, el, "%s of %llu bytes is not a multiple of %u", what, (ull)length, SECTOR);
        return -1;
    }
    if (sector > b->capacity || length / SECTOR > b->capacity - sector) {
        snprintf(err, el, "%s of %llu bytes at sector %llu is beyond capacity %llu", what,
                 (ull)length, (ull)sector, (ull)b->capacity);
        return -1;
    }
    return 0;
}

static int io_failed(int e, uint64_t at, char *err, size_t el) {
    snprintf(err, el, "I/O error at byte %llu: %s", (ull)at, strerror(e));
    return -1;
}

/* IN and OUT: the data of one request between the file at `sector` and guest memory.
 *
 * out == 0 (VIRTIO_BLK_T_IN): preadv into the writable bytes before the status byte, which
 *   are then *written (the used length without the status byte).
 * out == 1 (VIRTIO_BLK_T_OUT): pwritev from the readable bytes after the 16-byte header;
 *   refused on a read-only device. *written is left alone (0).
 *
 * The checks and their order are blk.py's: read-only (OUT), then _check_range, then the
 * transfer (an errno, then a short transfer). Returns 0 with the direction's counters
 * (reads / writes and their bytes) bumped, or -1 with blk.py's message in `err` and those
 * counters untouched (serve_chain counts the error). */
static int serve_data(struct vp_blk *b, const struct vp_mem *m, const struct vp_chain *ch,
                      const struct vp_seg *s, int out, uint64_t sector, uint64_t *written,
                      char *err, size_t el) {
    const char *what = out ? "write" : "read";
    uint64_t length = out ? ch->readable_len - HDR_LEN : ch->writable_len - 1;
    struct cursor c;
    int e;
    if (out && b->read_only) {
        snprintf(err, el, "write at sector %llu to a read-only device", (ull)sector);
        return -1;
    }
    if (check_range(b, what, sector, length, err, el)) return -1;
    /* IN fills the writable segments from their first byte; OUT reads the readable ones
     * from just past the header. */
    cur_init(&c, s, ch->nseg, out ? 0 : 1);
    if (out) cur_skip(&c, HDR_LEN);
    uint64_t done = transfer(b, m, &c, length, sector * SECTOR, out, &e);
    if (e) return io_failed(e, sector * SECTOR + done, err, el);
    if (done != length) {
        snprintf(err, el, "short %s: %llu of %llu bytes at sector %llu", what, (ull)done,
                 (ull)length, (ull)sector);
        return -1;
    }
    if (out) {
        b->writes++;
        b->bytes_written += length;
    } else {
        b->reads++;
        b->bytes_read += length;
        *written = length;
    }
    return 0;
}

/* Serve one request: 0 and *written (bytes before the status byte), or -1 and a message. */
static int serve_request(struct vp_blk *b, const struct vp_mem *m, const struct vp_chain *ch,
                         const struct vp_seg *s, uint32_t type, uint64_t sector,
                         uint64_t *written, char *err, size_t el) {
    uint64_t data_in = ch->writable_len - 1;
    struct cursor c;
    *written = 0;
    if (type == T_IN || type == T_OUT)
        return serve_data(b, m, ch, s, type == T_OUT, sector, written, err, el);
    if (type == T_FLUSH) {
        if (!b->read_only) {
            int rc;
            do rc = fdatasync(b->fd); while (rc < 0 && errno == EINTR);
            if (rc < 0) {
                snprintf(err, el, "fdatasync: %s", strerror(errno));
                return -1;
            }
        }
        b->flushes++;
        return 0;
    }
    /* T_GET_ID: the serial, zero-padded to 20 bytes, cut to the buffer. */
    cur_init(&c, s, ch->nseg, 1);
    *written = cur_copy(&c, m, b->id, data_in < ID_BYTES ? data_in : ID_BYTES, 1);
    return 0;
}

/* One chain: SERVED or FAILED with items[1] set (status byte written), or HAND_BACK. */
static int serve_chain(struct vp_blk *b, const struct vp_mem *m, const struct vp_chain *ch,
                       const struct vp_seg *s, uint32_t *item, char *err, size_t el) {
    if (ch->writable_len < 1) return HAND_BACK;   /* dropped with its own log line */
    uint32_t type = 0xFFFFFFFFu;
    uint64_t sector = 0, written = 0;
    int rc;
    if (ch->readable_len < HDR_LEN) {
        snprintf(err, el, "header of %u bytes (need 16)", ch->readable_len);
        rc = -1;
    } else {
        uint8_t hdr[HDR_LEN];
        struct cursor c;
        cur_init(&c, s, ch->nseg, 0);
        if (cur_copy(&c, m, hdr, HDR_LEN, 0) != HDR_LEN) return HAND_BACK;
        memcpy(&type, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
        if (type != T_IN && type != T_OUT && type != T_FLUSH && type != T_GET_ID)
            return HAND_BACK;
        rc = serve_request(b, m, ch, s, type, sector, &written, err, el);
    }
    uint8_t status = rc ? S_IOERR : S_OK;
    if (rc) {
        b->errors++;
        written = 0;
    }
    struct cursor c;
    cur_init(&c, s, ch->nseg, 1);
    cur_skip(&c, ch->writable_len - 1);
    cur_copy(&c, m, &status, 1, 1);
    item[1] = (uint32_t)(written + 1);
    return rc ? FAILED : SERVED;
}

int vp_blk_drain(struct vp_blk *b, struct vp_vq *q, struct vp_blk_burst *bu, uint32_t limit,
                 int polling, int call_fd) {
    if (limit > bu->max_chains) limit = bu->max_chains;
    for (;;) {
        while (bu->pos < bu->count) {
            uint32_t k = bu->pos;
            const struct vp_chain *ch = &bu->chains[k];
            uint32_t *item = &bu->items[2 * k];
            item[0] = ch->head;
            int rc = serve_chain(b, q->mem, ch, bu->segs + ch->first, item, bu->error,
                                 sizeof bu->error);
            if (rc == HAND_BACK) return VP_BLK_PYTHON;
            bu->pos = k + 1;
            if (rc == FAILED) return VP_BLK_FAILED;
        }
        if (bu->count) {          /* the burst is served: publish it */
            uint32_t n = bu->count;
            bu->count = bu->pos = 0;
            if (q->broken) return VP_BLK_DONE;
            vp_add_used(q, bu->items, n);
            bu->served += n;
            if (call_fd != -2 && vp_signal(q, call_fd) && call_fd == -1) return VP_BLK_CALL;
            continue;
        }
        if (q->broken) return VP_BLK_DONE;
        vp_disable_notifications(q);
        int n = vp_pop(q, limit, bu->chains, bu->segs, bu->max_segs);
        if (n == 0) {
            if (q->seg_overflow) return VP_BLK_SEGS;
            if (q->broken || polling || !vp_enable_notifications(q, 0)) return VP_BLK_DONE;
            continue;
        }
        bu->count = (uint32_t)n;
        bu->pos = 0;
    }
}
