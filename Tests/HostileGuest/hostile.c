// hostile: a guest-side program that attacks the VMM from inside a real guest.
//
// Built static on the host by the tests (`cc -static -O2`), copied into a sandbox and run
// as root there. Each mode prints one line per case, `case: observed`, which the host
// test compares with what the VMM must do (Tests/IntegrationTests/HostileGuestTests).
//
//   hostile blk          unbinds the guest's virtio-blk driver and drives the device
//                        itself through /dev/mem: valid requests first (proving the raw
//                        driver works), then chains that loop, point outside RAM, lie
//                        about indices and sizes, nest indirect tables, overflow lengths,
//                        race the device, and register garbage.
//   hostile vsock-flood  thousands of connection attempts to host ports nobody listens on
//   hostile vsock-reset  unbinds the vsock driver while the host waits for this command
//   hostile agent-MODE   writes lying agent frames on the agent's own host connection
//                        (taken from PID 1 with pidfd_getfd): garbage, huge, unknown,
//                        stall, flood
//
// Guest-physical addresses of this process's buffers come from /proc/self/pagemap;
// the device's registers are mapped from /dev/mem once the driver let go of them
// (the guest kernel has CONFIG_DEVMEM with STRICT_DEVMEM and IO_STRICT_DEVMEM).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "hostile: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

// MARK: finding and unbinding a virtio-mmio device

// The platform device name ("virtio-mmio.N") of the first virtio device with `id`.
static int find_virtio(uint32_t id, char *platform, size_t cap) {
    for (int n = 0; n < 16; n++) {
        char path[128], buf[64];
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/virtio%d/device", n);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k <= 0) continue;
        buf[k] = 0;
        if (strtoul(buf, NULL, 0) != id) continue;
        char link[512];
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/virtio%d", n);
        ssize_t l = readlink(path, link, sizeof link - 1);
        if (l <= 0) continue;
        link[l] = 0;
        char *end = strrchr(link, '/');  // .../virtio-mmio.N/virtioM
        if (!end) continue;
        *end = 0;
        char *start = strrchr(link, '/');
        if (!start) continue;
        snprintf(platform, cap, "%s", start + 1);
        return 0;
    }
    return -1;
}

// The MMIO base of `platform` from /proc/iomem ("d0000000-d0000fff : virtio-mmio.0").
static uint64_t iomem_base(const char *platform) {
    FILE *f = fopen("/proc/iomem", "r");
    if (!f) die("/proc/iomem: %s", strerror(errno));
    char line[256];
    uint64_t base = 0;
    while (fgets(line, sizeof line, f)) {
        char *colon = strstr(line, " : ");
        if (!colon) continue;
        char *name = colon + 3;
        name[strcspn(name, "\n")] = 0;
        if (strcmp(name, platform) == 0) { base = strtoull(line + strspn(line, " "), NULL, 16); break; }
    }
    fclose(f);
    if (!base) die("no /proc/iomem entry for %s", platform);
    return base;
}

static void unbind(const char *platform) {
    if (write_file("/sys/bus/platform/drivers/virtio-mmio/unbind", platform) != 0)
        die("unbinding %s: %s", platform, strerror(errno));
}

// Once the disk is gone, a page of PID 1 (the agent) that is not in memory cannot be
// read back: the agent would die of SIGBUS the first time it runs code it has not run
// yet (reporting this command's exit, say). Reading its executable puts every page in
// the page cache first.
static void keep_init_in_memory(void) {
    int fd = open("/proc/1/exe", O_RDONLY);
    if (fd < 0) die("/proc/1/exe: %s", strerror(errno));
    static char buf[1 << 16];
    while (read(fd, buf, sizeof buf) > 0) {}
    close(fd);
}

static volatile uint32_t *map_registers(uint64_t base) {
    if (access("/dev/mem", F_OK) != 0 && mknod("/dev/mem", S_IFCHR | 0600, makedev(1, 1)) != 0)
        die("mknod /dev/mem: %s", strerror(errno));
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0) die("/dev/mem: %s", strerror(errno));
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)base);
    if (p == MAP_FAILED) die("mapping the registers at 0x%llx: %s", (unsigned long long)base, strerror(errno));
    close(fd);
    return p;
}

// MARK: memory with known guest-physical addresses

enum { PAGES = 16 };
static uint8_t *page[PAGES];
static uint64_t pa[PAGES];

static void setup_memory(void) {
    uint8_t *m = mmap(NULL, PAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
    if (m == MAP_FAILED) die("mmap: %s", strerror(errno));
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0) die("pagemap: %s", strerror(errno));
    for (int i = 0; i < PAGES; i++) {
        page[i] = m + i * 4096;
        memset(page[i], 0, 4096);
        uint64_t e = 0;
        if (pread(fd, &e, 8, (off_t)(((uintptr_t)page[i] / 4096) * 8)) != 8) die("pagemap read: %s", strerror(errno));
        if (!(e >> 63) || (e & ((1ULL << 55) - 1)) == 0) die("page %d has no physical address (not root?)", i);
        pa[i] = (e & ((1ULL << 55) - 1)) * 4096;
    }
    close(fd);
}

// MARK: a minimal virtio-mmio driver

enum {
    R_MAGIC = 0x000, R_VERSION = 0x004, R_DEVICE = 0x008, R_DEV_FEAT = 0x010, R_DEV_FEAT_SEL = 0x014,
    R_DRV_FEAT = 0x020, R_DRV_FEAT_SEL = 0x024, R_QSEL = 0x030, R_QMAX = 0x034, R_QNUM = 0x038,
    R_QREADY = 0x044, R_NOTIFY = 0x050, R_ISR = 0x060, R_IACK = 0x064, R_STATUS = 0x070,
    R_DESC_LO = 0x080, R_DESC_HI = 0x084, R_AVAIL_LO = 0x090, R_AVAIL_HI = 0x094,
    R_USED_LO = 0x0a0, R_USED_HI = 0x0a4, R_CONFIG = 0x100,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_NEEDS_RESET = 0x40 };
enum { F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4 };
#define FEATURE_VERSION_1 (1ULL << 32)
#define FEATURE_INDIRECT (1ULL << 28)

static volatile uint32_t *regs;
static uint16_t qsize, avail_idx, used_seen;

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; } __attribute__((packed));
// Page roles: 0 descriptor table, 1 available ring, 2 used ring, 3 request header + status,
// 4..7 data, 8..9 indirect tables, the rest spare.
#define DESC ((volatile struct desc *)page[0])
#define AVAIL ((volatile uint16_t *)page[1])
#define USED ((volatile uint16_t *)page[2])
#define HDR page[3]
#define STATUS_OFF 64

static uint32_t rd(unsigned off) { return regs[off / 4]; }
static void wr(unsigned off, uint32_t v) { regs[off / 4] = v; __sync_synchronize(); }

static uint64_t device_features(void) {
    wr(R_DEV_FEAT_SEL, 0);
    uint64_t f = rd(R_DEV_FEAT);
    wr(R_DEV_FEAT_SEL, 1);
    return f | (uint64_t)rd(R_DEV_FEAT) << 32;
}

static void reset_device(void) {
    wr(R_STATUS, 0);
    for (int i = 0; i < 1000 && rd(R_STATUS) != 0; i++) usleep(1000);
    for (int i = 0; i < 10; i++) memset(page[i], 0, 4096);
    avail_idx = used_seen = 0;
}

// Resets and sets the device up with one queue of `size` at the given ring addresses.
// Returns the status register after DRIVER_OK.
static uint32_t setup_queue_at(uint16_t size, uint64_t features, uint64_t desc, uint64_t avail, uint64_t used) {
    reset_device();
    wr(R_STATUS, S_ACK);
    wr(R_STATUS, S_ACK | S_DRIVER);
    uint64_t want = features & device_features();
    wr(R_DRV_FEAT_SEL, 0); wr(R_DRV_FEAT, (uint32_t)want);
    wr(R_DRV_FEAT_SEL, 1); wr(R_DRV_FEAT, (uint32_t)(want >> 32));
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(rd(R_STATUS) & S_FEATURES_OK)) return rd(R_STATUS);
    wr(R_QSEL, 0);
    wr(R_QNUM, size);
    wr(R_DESC_LO, (uint32_t)desc); wr(R_DESC_HI, (uint32_t)(desc >> 32));
    wr(R_AVAIL_LO, (uint32_t)avail); wr(R_AVAIL_HI, (uint32_t)(avail >> 32));
    wr(R_USED_LO, (uint32_t)used); wr(R_USED_HI, (uint32_t)(used >> 32));
    wr(R_QREADY, 1);
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    qsize = size;
    return rd(R_STATUS);
}

static uint32_t setup_queue(uint16_t size) {
    return setup_queue_at(size, FEATURE_VERSION_1 | FEATURE_INDIRECT, pa[0], pa[1], pa[2]);
}

static void set_desc(int i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    DESC[i].addr = addr; DESC[i].len = len; DESC[i].flags = flags; DESC[i].next = next;
}

// Publishes `head` in the available ring (or, with `raw_idx`, sets avail.idx to it).
static void publish(uint16_t head) {
    AVAIL[2 + avail_idx % qsize] = head;
    __sync_synchronize();
    AVAIL[1] = ++avail_idx;
    __sync_synchronize();
    wr(R_NOTIFY, 0);
}

// What the device did with the requests published so far: "used" (a used entry for each),
// "needs-reset" or "no-response" after `ms`.
static const char *await(int ms) {
    uint64_t end = now_ms() + ms;
    while (now_ms() < end) {
        __sync_synchronize();
        if (USED[1] == avail_idx) { used_seen = avail_idx; return "used"; }
        if (rd(R_STATUS) & S_NEEDS_RESET) return "needs-reset";
        usleep(200);
    }
    if (rd(R_STATUS) & S_NEEDS_RESET) return "needs-reset";
    return "no-response";
}

// A block request: header (type, sector) at HDR, `len` data bytes at `data` (device-writable
// for reads), status byte at HDR+STATUS_OFF. Returns the outcome: "ok", "ioerr", "unsupp",
// "status N", or what `await` saw.
static const char *blk_request(uint32_t type, uint64_t sector, uint64_t data, uint32_t len, int data_writable) {
    memset(HDR, 0, 128);
    memcpy(HDR, &type, 4);
    memcpy(HDR + 8, &sector, 8);
    HDR[STATUS_OFF] = 0xff;
    int head = (avail_idx * 3) % qsize;  // a fresh triple of descriptors per request
    if (head + 3 > qsize) head = 0;
    set_desc(head, pa[3], 16, F_NEXT, head + 1);
    if (len > 0) {
        set_desc(head + 1, data, len, F_NEXT | (data_writable ? F_WRITE : 0), head + 2);
        set_desc(head + 2, pa[3] + STATUS_OFF, 1, F_WRITE, 0);
    } else {
        set_desc(head + 1, pa[3] + STATUS_OFF, 1, F_WRITE, 0);
    }
    publish(head);
    const char *r = await(3000);
    if (strcmp(r, "used") != 0) return r;
    static char buf[32];
    switch (HDR[STATUS_OFF]) {
    case 0: return "ok";
    case 1: return "ioerr";
    case 2: return "unsupp";
    default: snprintf(buf, sizeof buf, "status %u", HDR[STATUS_OFF]); return buf;
    }
}

// Reads sector 2 (bytes 1024...1535: the ext4 superblock) and checks its magic.
static const char *valid_read(void) {
    memset(page[4], 0, 4096);
    const char *r = blk_request(0, 2, pa[4], 512, 1);
    if (strcmp(r, "ok") != 0) return r;
    return page[4][56] == 0x53 && page[4][57] == 0xef ? "ok" : "ok, but not the ext4 superblock";
}

static void report(const char *name, const char *observed) {
    printf("%s: %s\n", name, observed);
    fflush(stdout);
}

// A chain built by `build` (descriptors from 0, head 0), published, and what came of it.
static const char *malformed(void (*build)(void), uint16_t size) {
    setup_queue(size);
    memset(HDR, 0, 128);
    build();
    publish(0);
    return await(2000);
}

static void b_loop(void) {
    set_desc(0, pa[3], 16, F_NEXT, 1);
    set_desc(1, pa[4], 512, F_NEXT | F_WRITE, 2);
    set_desc(2, pa[3] + STATUS_OFF, 1, F_NEXT | F_WRITE, 0);
}
static void b_self_loop(void) { set_desc(0, pa[3], 16, F_NEXT, 0); }
static void b_next_out_of_range(void) {
    set_desc(0, pa[3], 16, F_NEXT, 1);
    set_desc(1, pa[4], 512, F_NEXT | F_WRITE, 200);
}
// A read whose data buffer is at `addr`.
static void read_into(uint64_t addr, uint32_t len) {
    set_desc(0, pa[3], 16, F_NEXT, 1);
    set_desc(1, addr, len, F_NEXT | F_WRITE, 2);
    set_desc(2, pa[3] + STATUS_OFF, 1, F_WRITE, 0);
}
static void b_outside_ram(void) { read_into(0x4000000000ULL, 512); }
static void b_mmio_hole(void) { read_into(0xd0000000ULL, 512); }
static void b_wraps(void) { read_into(0xfffffffffffff000ULL, 0x2000); }
static void b_readable_after_writable(void) {
    set_desc(0, pa[3], 16, F_NEXT, 1);
    set_desc(1, pa[3] + STATUS_OFF, 1, F_NEXT | F_WRITE, 2);
    set_desc(2, pa[4], 512, 0, 0);
}
static void b_no_status(void) {
    uint32_t type = 1;  // OUT: every buffer device-readable, nowhere to put the status
    memcpy(HDR, &type, 4);
    set_desc(0, pa[3], 16, F_NEXT, 1);
    set_desc(1, pa[4], 512, 0, 0);
}
static void b_indirect_nested(void) {
    volatile struct desc *t = (volatile struct desc *)page[8];
    t[0] = (struct desc){pa[9], 32, F_INDIRECT, 0};
    set_desc(0, pa[8], 16, F_INDIRECT, 0);
}
static void b_indirect_bad_length(void) { set_desc(0, pa[8], 20, F_INDIRECT, 0); }
static void b_indirect_empty(void) { set_desc(0, pa[8], 0, F_INDIRECT, 0); }
static void b_indirect_with_next(void) { set_desc(0, pa[8], 32, F_INDIRECT | F_NEXT, 1); }
static void b_indirect_too_long(void) {
    // 64 chained entries in an indirect table, for a queue of 16.
    volatile struct desc *t = (volatile struct desc *)page[8];
    t[0] = (struct desc){pa[3], 16, F_NEXT, 1};
    for (int i = 1; i < 63; i++) t[i] = (struct desc){pa[4], 512, F_NEXT | F_WRITE, (uint16_t)(i + 1)};
    t[63] = (struct desc){pa[3] + STATUS_OFF, 1, F_WRITE, 0};
    set_desc(0, pa[8], 64 * 16, F_INDIRECT, 0);
}
static void b_indirect_outside_ram(void) { set_desc(0, 0x4000000000ULL, 64, F_INDIRECT, 0); }
static void b_length_overflow(void) {
    // 20 readable buffers of 240 MiB (each inside RAM) add up to more than 2^32 bytes
    // (a queue of 32).
    uint32_t type = 1;
    memcpy(HDR, &type, 4);
    set_desc(0, pa[3], 16, F_NEXT, 1);
    for (int i = 1; i <= 20; i++) set_desc(i, 0x100000, 0x0f000000, F_NEXT, (uint16_t)(i + 1));
    set_desc(21, pa[3] + STATUS_OFF, 1, F_WRITE, 0);
}

static const char *head_out_of_range(void) {
    setup_queue(16);
    AVAIL[2] = 99;
    __sync_synchronize();
    AVAIL[1] = ++avail_idx;
    wr(R_NOTIFY, 0);
    return await(2000);
}

static const char *avail_jump(void) {
    setup_queue(16);
    avail_idx = 1000;
    AVAIL[1] = avail_idx;
    __sync_synchronize();
    wr(R_NOTIFY, 0);
    return await(2000);
}

// Ring layouts the device must refuse at DRIVER_OK.
static const char *bad_layout(uint16_t size, uint64_t desc, uint64_t avail, uint64_t used) {
    uint32_t s = setup_queue_at(size, FEATURE_VERSION_1, desc, avail, used);
    for (int i = 0; i < 200 && !(s & S_NEEDS_RESET); i++) { usleep(1000); s = rd(R_STATUS); }
    return s & S_NEEDS_RESET ? "needs-reset" : "accepted";
}

// After a case: reset, set up again and read the superblock; the device must work.
static const char *recovers(void) {
    setup_queue(16);
    return valid_read();
}

static void case_recovering(const char *name, const char *observed) {
    char line[160];
    const char *after = recovers();
    snprintf(line, sizeof line, "%s, then %s", observed, after);
    report(name, line);
}

struct race { volatile int stop; };
static void *flipper(void *arg) {
    struct race *r = arg;
    // Rewrites the descriptors the device is walking: a loop, a wild address, a huge length.
    for (unsigned n = 0; !r->stop; n++) {
        for (int h = 0; h + 3 <= 15; h += 3) {
            switch (n % 4) {
            case 0: DESC[h + 1].next = (uint16_t)h; break;
            case 1: DESC[h + 1].addr = 0x4000000000ULL; break;
            case 2: DESC[h + 1].len = 0xffffffffu; break;
            default: DESC[h + 1].next = (uint16_t)(h + 2); DESC[h + 1].addr = pa[4]; DESC[h + 1].len = 512; break;
            }
        }
        __sync_synchronize();
    }
    return NULL;
}

static void mode_blk(void) {
    char platform[64];
    if (find_virtio(2, platform, sizeof platform) != 0) die("no virtio-blk device in /sys/bus/virtio");
    uint64_t base = iomem_base(platform);
    setup_memory();
    keep_init_in_memory();
    sync();
    unbind(platform);
    regs = map_registers(base);
    if (rd(R_MAGIC) != 0x74726976 || rd(R_DEVICE) != 2) die("0x%llx is not a virtio-blk device", (unsigned long long)base);
    printf("device: virtio-blk version %u, queue max %u\n", rd(R_VERSION), (wr(R_QSEL, 0), rd(R_QMAX)));

    // The raw driver works: a read, a write and a flush succeed.
    setup_queue(16);
    report("valid read", valid_read());
    memcpy(page[5], page[4], 512);
    report("valid write", blk_request(1, 2, pa[5], 512, 0));
    report("valid flush", blk_request(4, 0, 0, 0, 0));

    // Requests the device refuses one by one and keeps working.
    setup_queue(16);
    uint64_t capacity = (uint64_t)rd(R_CONFIG) | (uint64_t)rd(R_CONFIG + 4) << 32;
    report("read past the end", blk_request(0, capacity, pa[4], 512, 1));
    report("read at sector 2^64-1", blk_request(0, ~0ULL, pa[4], 512, 1));
    report("unknown request type", blk_request(99, 0, pa[4], 512, 1));
    report("data not a multiple of 512", blk_request(0, 0, pa[4], 100, 1));
    report("a 64 MiB write", blk_request(1, 0, 0x100000, 64u << 20, 0));
    report("a read into a read-only buffer", blk_request(0, 0, pa[4], 512, 0));
    report("still working", valid_read());

    // Chains that break the virtqueue rules: DEVICE_NEEDS_RESET, no used entry; a reset
    // brings the device back.
    struct { const char *name; void (*build)(void); uint16_t size; } chains[] = {
        {"descriptor loop", b_loop},
        {"descriptor pointing at itself", b_self_loop},
        {"next out of range", b_next_out_of_range},
        {"buffer outside guest RAM", b_outside_ram},
        {"buffer in the MMIO hole", b_mmio_hole},
        {"buffer address wrapping 2^64", b_wraps},
        {"readable after writable", b_readable_after_writable},
        {"no status byte", b_no_status},
        {"nested indirect table", b_indirect_nested},
        {"indirect table of 20 bytes", b_indirect_bad_length},
        {"empty indirect table", b_indirect_empty},
        {"indirect with next", b_indirect_with_next},
        {"indirect chain longer than the queue", b_indirect_too_long},
        {"indirect table outside guest RAM", b_indirect_outside_ram},
        {"chain longer than 4 GiB", b_length_overflow, 32},
    };
    for (size_t i = 0; i < sizeof chains / sizeof chains[0]; i++) case_recovering(chains[i].name, malformed(chains[i].build, chains[i].size ? chains[i].size : 16));
    case_recovering("head index out of range", head_out_of_range());
    case_recovering("available index jumping by 1000", avail_jump());

    // Queue layouts refused at DRIVER_OK.
    case_recovering("queue size 3", bad_layout(3, pa[0], pa[1], pa[2]));
    case_recovering("queue size 0", bad_layout(0, pa[0], pa[1], pa[2]));
    case_recovering("queue size 512", bad_layout(512, pa[0], pa[1], pa[2]));
    case_recovering("descriptor table misaligned", bad_layout(16, pa[0] + 8, pa[1], pa[2]));
    case_recovering("used ring misaligned", bad_layout(16, pa[0], pa[1], pa[2] + 2));
    case_recovering("descriptor table outside guest RAM", bad_layout(16, 0x4000000000ULL, pa[1], pa[2]));
    case_recovering("used ring in the MMIO hole", bad_layout(16, pa[0], pa[1], 0xd0000000ULL));

    // Negotiation the device must refuse.
    reset_device();
    wr(R_STATUS, S_ACK); wr(R_STATUS, S_ACK | S_DRIVER);
    wr(R_DRV_FEAT_SEL, 1); wr(R_DRV_FEAT, 1u | (1u << 8));  // VERSION_1 plus bit 40, never offered
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    case_recovering("a feature never offered", rd(R_STATUS) & S_FEATURES_OK ? "accepted" : "FEATURES_OK refused");
    reset_device();
    wr(R_STATUS, S_ACK); wr(R_STATUS, S_ACK | S_DRIVER);
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    case_recovering("no VERSION_1", rd(R_STATUS) & S_FEATURES_OK ? "accepted" : "FEATURES_OK refused");
    reset_device();
    wr(R_STATUS, S_ACK); wr(R_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
    case_recovering("DRIVER_OK before FEATURES_OK", rd(R_STATUS) & S_DRIVER_OK ? "accepted" : "ignored");

    // Doorbells: a storm with nothing new, and doorbells for queues that do not exist.
    setup_queue(16);
    uint64_t t0 = now_ms();
    for (int i = 0; i < 10000; i++) wr(R_NOTIFY, 0);
    for (int i = 0; i < 1000; i++) wr(R_NOTIFY, 1 + i % 64);
    uint64_t storm = now_ms() - t0;
    char line[96];
    snprintf(line, sizeof line, "%s", valid_read());
    report("11,000 doorbells, then a read", line);
    fprintf(stderr, "hostile: the doorbell storm took %llu ms\n", (unsigned long long)storm);

    // Register garbage: every register offset written with junk, in every access size;
    // the config space and past it too.
    setup_queue(16);
    volatile uint8_t *bytes = (volatile uint8_t *)regs;
    volatile uint16_t *halves = (volatile uint16_t *)regs;
    for (unsigned off = 0; off < 0x1000; off += 4) {
        if (off == R_STATUS) continue;
        bytes[off + 1] = 0xa5;
        halves[off / 2] = 0x5aa5;
        regs[off / 4] = 0xdeadbeef;
        (void)regs[off / 4];
    }
    wr(R_STATUS, 0xff);  // every status bit at once
    case_recovering("junk in every register", rd(R_STATUS) & S_NEEDS_RESET ? "needs-reset" : "survived");

    // Junk in the queue registers while the driver sets the queue up.
    reset_device();
    wr(R_STATUS, S_ACK); wr(R_STATUS, S_ACK | S_DRIVER);
    wr(R_DRV_FEAT_SEL, 1); wr(R_DRV_FEAT, 1);
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    wr(R_QSEL, 0);
    for (unsigned off = R_QNUM; off <= R_USED_HI; off += 4) if (off != R_NOTIFY && off != R_STATUS) regs[off / 4] = 0xdeadbeef;
    wr(R_QREADY, 1);
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    usleep(10000);
    case_recovering("junk in the queue registers", rd(R_STATUS) & S_NEEDS_RESET ? "needs-reset" : "survived");

    // A race: another thread rewrites the descriptors while the device walks them.
    setup_queue(16);
    struct race race = {0};
    pthread_t t;
    pthread_create(&t, NULL, flipper, &race);
    int resets = 0, completed = 0, silent = 0;
    for (int i = 0; i < 400; i++) {
        const char *r = blk_request(0, 2, pa[4], 512, 1);
        if (strcmp(r, "needs-reset") == 0) { resets++; setup_queue(16); }
        else if (strcmp(r, "no-response") == 0) { silent++; setup_queue(16); }
        else completed++;
    }
    race.stop = 1;
    pthread_join(t, NULL);
    fprintf(stderr, "hostile: race: %d completed, %d resets, %d silent\n", completed, resets, silent);
    snprintf(line, sizeof line, "%s", silent ? "a request went unanswered" : "every request answered or refused");
    case_recovering("descriptors rewritten while the device walks them", line);

    printf("blk: done\n");
}

// MARK: vsock

static void mode_vsock_flood(void) {
    // Connection attempts to host ports nobody listens on, all at once: each must be
    // answered (refused or reset) promptly; none may hang.
    enum { N = 2000 };
    static struct pollfd fds[N];
    struct rlimit rl = {N + 64, N + 64};
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) die("setrlimit: %s", strerror(errno));
    uint64_t t0 = now_ms();
    int started = 0, refused = 0, timedout = 0, connected = 0, other = 0;
    for (int i = 0; i < N; i++) {
        int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (s < 0) die("socket: %s", strerror(errno));
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = 20000 + i};
        int r = connect(s, (struct sockaddr *)&a, sizeof a);
        if (r == 0) { connected++; close(s); fds[i].fd = -1; continue; }
        if (errno == ECONNREFUSED || errno == ECONNRESET) { refused++; close(s); fds[i].fd = -1; continue; }
        if (errno != EINPROGRESS) { if (other++ == 0) fprintf(stderr, "hostile: connect: %s\n", strerror(errno)); close(s); fds[i].fd = -1; continue; }
        fds[i] = (struct pollfd){.fd = s, .events = POLLOUT};
        started++;
    }
    uint64_t deadline = now_ms() + 10000;
    int pending = started;
    while (pending > 0 && now_ms() < deadline) {
        int r = poll(fds, N, 100);
        if (r <= 0) continue;
        for (int i = 0; i < N; i++) {
            if (fds[i].fd < 0 || fds[i].revents == 0) continue;
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(fds[i].fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err == ECONNREFUSED || err == ECONNRESET) refused++;
            else if (err == 0) connected++;
            else if (other++ == 0) fprintf(stderr, "hostile: connect (late): %s\n", strerror(err));
            close(fds[i].fd);
            fds[i].fd = -1;
            pending--;
        }
    }
    for (int i = 0; i < N; i++) if (fds[i].fd >= 0) { close(fds[i].fd); timedout++; }
    fprintf(stderr, "hostile: %d attempts answered in %llu ms\n", N - timedout, (unsigned long long)(now_ms() - t0));
    printf("connections to host ports nobody listens on: %d refused, %d connected, %d unanswered, %d other\n",
           refused, connected, timedout, other);
    // Connections to CIDs that are not the host: the device must not route them anywhere.
    int answered = 0, unanswered = 0;
    unsigned cids[] = {4, 12345, 0xffffffffu - 1};
    for (size_t i = 0; i < sizeof cids / sizeof cids[0]; i++) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct timeval tv = {.tv_usec = 500000};
        setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cids[i], .svm_port = 1024};
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) answered++; else unanswered++;
        close(s);
    }
    printf("connections to other CIDs: %d connected\n", answered);
    (void)unanswered;
    printf("vsock-flood: done\n");
}

static void mode_vsock_reset(void) {
    char platform[64];
    if (find_virtio(19, platform, sizeof platform) != 0) die("no virtio-vsock device in /sys/bus/virtio");
    unbind(platform);
    // The host has lost its agent connection; nobody reads what happens next.
    sleep(600);
}

// MARK: lying agent frames

static int agent_socket(void) {
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    if (pidfd < 0) die("pidfd_open(1): %s", strerror(errno));
    for (int fd = 0; fd < 256; fd++) {
        int s = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
        if (s < 0) continue;
        struct sockaddr_vm peer;
        socklen_t l = sizeof peer;
        if (getpeername(s, (struct sockaddr *)&peer, &l) == 0 && peer.svm_family == AF_VSOCK && peer.svm_cid == VMADDR_CID_HOST)
            return s;
        close(s);
    }
    die("PID 1 holds no vsock connection to the host");
    return -1;
}

static void put_all(int s, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t k = write(s, b, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) die("write: %s", strerror(errno));
        b += k;
        n -= (size_t)k;
    }
}

static void header(uint8_t h[16], uint8_t type, uint32_t id, uint32_t length) {
    memset(h, 0, 16);
    h[0] = 'S'; h[1] = 'A'; h[2] = 1;
    h[4] = type;
    memcpy(h + 8, &id, 4);
    memcpy(h + 12, &length, 4);
}

static void mode_agent(const char *how) {
    int s = agent_socket();
    uint8_t h[16];
    if (strcmp(how, "garbage") == 0) {
        put_all(s, "GARBAGE GARBAGE!", 16);
    } else if (strcmp(how, "huge") == 0) {
        header(h, 0x20, 1, 0xfffffff0u);  // Output, 4 GiB claimed
        put_all(s, h, 16);
    } else if (strcmp(how, "unknown") == 0) {
        header(h, 0x7f, 1, 0);
        put_all(s, h, 16);
    } else if (strcmp(how, "stall") == 0) {
        header(h, 0x20, 1, 1000);  // promises 1000 bytes, sends 10, never more
        put_all(s, h, 16);
        put_all(s, "\1\0\0\0\0\0\0\0\0\0", 10);
    } else if (strcmp(how, "flood") == 0) {
        // 64 MiB of well-formed stdout frames the command never wrote, then exit 0:
        // the host keeps only its output limit of it.
        enum { CHUNK = 256 * 1024 };
        static uint8_t frame[16 + 10 + CHUNK];
        memset(frame + 26, 'A', CHUNK);
        for (uint64_t seq = 0; seq < 256; seq++) {
            header(frame, 0x20, 0, 10 + CHUNK);
            frame[16] = 1;
            memcpy(frame + 17, &seq, 8);
            frame[25] = 0;
            put_all(s, frame, sizeof frame);
        }
        return;
    } else {
        die("unknown agent mode %s", how);
    }
    sleep(600);
}

int main(int argc, char **argv) {
    if (argc < 2) die("usage: hostile blk|vsock-flood|vsock-reset|agent-{garbage,huge,unknown,stall,flood}");
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0) die("mlockall: %s", strerror(errno));
    const char *mode = argv[1];
    if (strcmp(mode, "blk") == 0) mode_blk();
    else if (strcmp(mode, "vsock-flood") == 0) mode_vsock_flood();
    else if (strcmp(mode, "vsock-reset") == 0) mode_vsock_reset();
    else if (strncmp(mode, "agent-", 6) == 0) mode_agent(mode + 6);
    else die("unknown mode %s", mode);
    return 0;
}
