/* rwverify: write and verify a block device with O_DIRECT from several processes at once,
 * for guest tests that disturb the back-end meanwhile (killed, restarted, migrated).
 *
 *   rwverify DEVICE BLOCKS SECONDS WORKERS TAG
 *
 * Worker w owns the 4 KiB blocks 1..BLOCKS-1 with b % WORKERS == w. For SECONDS it picks
 * one of them at random, writes it (a header naming block, worker and sequence number, then
 * bytes derived from them) and reads it back; at the end it reads every block it wrote once
 * more and checks each holds its last write. Every failed or short I/O counts as an error,
 * every read that differs from what was written last as a mismatch. When all workers are
 * done, block 0 gets "LAST-WRITE TAG <writes>" (the test finds it on the host's image).
 * Prints one summary line "rwverify TAG writes=N reads=N errors=N mismatches=N" and exits
 * 0 only when both counts are zero. Built static on the host; runs under busybox. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

struct tally { uint64_t writes, reads, errors, mismatches; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void pattern(uint8_t *buf, uint64_t block, uint64_t worker, uint64_t seq) {
    uint64_t x = block * 0x9E3779B97F4A7C15ull ^ seq * 0xC2B2AE3D27D4EB4Full ^ worker;
    memset(buf, 0, BLOCK);
    snprintf((char *)buf, 64, "rwverify block=%llu worker=%llu seq=%llu",
             (unsigned long long)block, (unsigned long long)worker, (unsigned long long)seq);
    for (int i = 64; i < BLOCK; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
}

static int io(int fd, uint8_t *buf, uint64_t block, int write, struct tally *t) {
    ssize_t n = write ? pwrite(fd, buf, BLOCK, (off_t)(block * BLOCK))
                      : pread(fd, buf, BLOCK, (off_t)(block * BLOCK));
    if (write) t->writes++; else t->reads++;
    if (n != BLOCK) {
        t->errors++;
        printf("rwverify: %s of block %llu: %s\n", write ? "write" : "read",
               (unsigned long long)block, n < 0 ? strerror(errno) : "short");
        return -1;
    }
    return 0;
}

static void check(int fd, uint8_t *got, uint8_t *want, uint64_t block, struct tally *t) {
    if (io(fd, got, block, 0, t) == 0 && memcmp(got, want, BLOCK)) {
        t->mismatches++;
        printf("rwverify: block %llu holds \"%.60s\", expected \"%.60s\"\n",
               (unsigned long long)block, (char *)got, (char *)want);
    }
}

static void worker(const char *dev, uint64_t blocks, double seconds, uint64_t w, uint64_t n,
                   struct tally *t) {
    int fd = open(dev, O_RDWR | O_DIRECT);
    uint8_t *buf, *got;
    uint64_t *last = calloc(blocks, sizeof *last), seq = 0, rnd = 88172645463325252ull ^ w;
    if (fd < 0 || posix_memalign((void **)&buf, BLOCK, BLOCK) ||
        posix_memalign((void **)&got, BLOCK, BLOCK) || !last) {
        printf("rwverify: worker %llu cannot start: %s\n", (unsigned long long)w,
               strerror(errno));
        t->errors++;
        return;
    }
    uint64_t owned = (blocks - 1 - w + n - 1) / n;   /* blocks b >= 1, b % n == w */
    if (w == 0) owned = (blocks - 1) / n;
    double end = now() + seconds;
    while (owned && now() < end) {
        rnd ^= rnd << 13; rnd ^= rnd >> 7; rnd ^= rnd << 17;
        uint64_t block = (w ? w : n) + n * (rnd % owned);
        if (block >= blocks) continue;
        pattern(buf, block, w, ++seq);
        if (io(fd, buf, block, 1, t) == 0) last[block] = seq;
        check(fd, got, buf, block, t);
    }
    for (uint64_t block = 1; block < blocks; block++) {
        if (!last[block]) continue;
        pattern(buf, block, w, last[block]);
        check(fd, got, buf, block, t);
    }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: rwverify DEVICE BLOCKS SECONDS WORKERS TAG\n");
        return 2;
    }
    const char *dev = argv[1], *tag = argv[5];
    uint64_t blocks = strtoull(argv[2], NULL, 0), n = strtoull(argv[4], NULL, 0);
    double seconds = atof(argv[3]);
    if (blocks < 2 || n < 1 || n > 64) {
        fprintf(stderr, "rwverify: bad BLOCKS or WORKERS\n");
        return 2;
    }
    struct tally *t = mmap(NULL, n * sizeof *t, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (t == MAP_FAILED) return 2;
    memset(t, 0, n * sizeof *t);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (uint64_t w = 0; w < n; w++) {
        if (fork() == 0) {
            worker(dev, blocks, seconds, w, n, &t[w]);
            fflush(stdout);
            _exit(0);
        }
    }
    while (wait(NULL) > 0) {}
    struct tally sum = {0, 0, 0, 0};
    for (uint64_t w = 0; w < n; w++) {
        sum.writes += t[w].writes; sum.reads += t[w].reads;
        sum.errors += t[w].errors; sum.mismatches += t[w].mismatches;
    }
    int fd = open(dev, O_RDWR | O_DIRECT);
    uint8_t *buf;
    if (fd < 0 || posix_memalign((void **)&buf, BLOCK, BLOCK)) {
        sum.errors++;
    } else {
        memset(buf, 0, BLOCK);
        snprintf((char *)buf, BLOCK, "LAST-WRITE %s %llu", tag, (unsigned long long)sum.writes);
        if (pwrite(fd, buf, BLOCK, 0) != BLOCK || fsync(fd)) sum.errors++;
        close(fd);
    }
    printf("rwverify %s writes=%llu reads=%llu errors=%llu mismatches=%llu\n", tag,
           (unsigned long long)sum.writes, (unsigned long long)sum.reads,
           (unsigned long long)sum.errors, (unsigned long long)sum.mismatches);
    return sum.errors || sum.mismatches ? 1 : 0;
}
