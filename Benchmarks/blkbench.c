// blkbench: block I/O inside a guest, the same program under both VMMs.
//   blkbench FILE SIZE_MIB SECONDS
// With O_DIRECT (no guest page cache): sequential write and read in 1 MiB blocks,
// then 4 KiB random reads and random writes, each for SECONDS. Prints one line per
// test: "<name> <value> <unit>".
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: blkbench FILE SIZE_MIB SECONDS\n"); return 2; }
    const char *path = argv[1];
    size_t size = (size_t)atol(argv[2]) << 20;
    double secs = atof(argv[3]);
    int fd = open(path, O_RDWR | O_CREAT | O_DIRECT, 0644);
    if (fd < 0) { perror("open"); return 1; }
    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20)) return 1;
    memset(buf, 0x5a, 1 << 20);
    double t = now();
    for (size_t off = 0; off < size; off += 1 << 20)
        if (pwrite(fd, buf, 1 << 20, off) != 1 << 20) { perror("pwrite"); return 1; }
    fdatasync(fd);
    printf("seq-write %.1f MiB/s\n", (size >> 20) / (now() - t));
    t = now();
    for (size_t off = 0; off < size; off += 1 << 20)
        if (pread(fd, buf, 1 << 20, off) != 1 << 20) { perror("pread"); return 1; }
    printf("seq-read %.1f MiB/s\n", (size >> 20) / (now() - t));
    size_t blocks = size / 4096;
    long n = 0;
    t = now();
    while (now() - t < secs) {
        for (int i = 0; i < 64; i++, n++)
            if (pread(fd, buf, 4096, (next() % blocks) * 4096) != 4096) { perror("pread4k"); return 1; }
    }
    printf("rand-read-4k %.0f IOPS\n", n / (now() - t));
    n = 0;
    t = now();
    while (now() - t < secs) {
        for (int i = 0; i < 64; i++, n++)
            if (pwrite(fd, buf, 4096, (next() % blocks) * 4096) != 4096) { perror("pwrite4k"); return 1; }
    }
    fdatasync(fd);
    printf("rand-write-4k %.0f IOPS\n", n / (now() - t));
    close(fd);
    unlink(path);
    return 0;
}
