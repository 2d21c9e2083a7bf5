/* vhostpy compiled fast path: the virtio-net header of a frame placed whole into one receive
 * buffer, shared by _fastpath.c (reflect) and _fastpath_net.c (offer).
 *
 * Private to the C files (cffi never parses it). The header is all zero (no checksum, no
 * GSO) but num_buffers, 1, when the header has that field (hdr_len 12: VERSION_1 or
 * MRG_RXBUF); it is copied from a constant (one move, no memset call and store).
 */
#ifndef VHOSTPY_FASTPATH_NETHDR_H
#define VHOSTPY_FASTPATH_NETHDR_H

#include <stdint.h>
#include <string.h>

static inline void vp_put_rx_header(uint8_t *dst, uint32_t hdr_len) {
    static const uint8_t hdr12[12] = {[10] = 1}, hdr10[10] = {0};
    memcpy(dst, hdr_len >= 12 ? hdr12 : hdr10, hdr_len >= 12 ? 12 : 10);
}

#endif
