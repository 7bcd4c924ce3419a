// The Swift runtime locates itself through /proc at start-up; as PID 1 in a fresh
// guest /proc is not mounted yet and the runtime crashes before main. This
// constructor runs before the runtime initialises and mounts /proc when we are PID 1.
#define _GNU_SOURCE
#include "cinit.h"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <signal.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

int cinit_early_proc_mount_errno = 0;

__attribute__((constructor(101)))
static void cinit_mount_proc_early(void) {
    if (getpid() != 1) return;
    mkdir("/proc", 0555);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0 && errno != EBUSY)
        cinit_early_proc_mount_errno = errno;
}

int cinit_proc_mount_errno(void) { return cinit_early_proc_mount_errno; }

uint64_t cinit_boottime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int cinit_ensure_stdio(void) {
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0) continue;
        int f = open("/dev/console", O_RDWR | O_NOCTTY);
        if (f < 0) f = open("/dev/null", O_RDWR);
        if (f < 0) return -errno;
        if (f != fd) {
            if (dup2(f, fd) < 0) { int e = errno; close(f); return -e; }
            close(f);
        }
    }
    return 0;
}

int cinit_mount(const char *source, const char *target, const char *fstype,
                unsigned long flags, const char *data) {
    if (mkdir(target, 0755) < 0 && errno != EEXIST) return -errno;
    if (mount(source, target, fstype, flags, data) < 0) return -errno;
    return 0;
}

unsigned long cinit_ms_nosuid(void) { return MS_NOSUID; }
unsigned long cinit_ms_nodev(void) { return MS_NODEV; }
unsigned long cinit_ms_noexec(void) { return MS_NOEXEC; }

int cinit_loopback_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
    int rc = 0;
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) rc = -errno;
    else {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) rc = -errno;
    }
    close(s);
    return rc;
}

int cinit_boot_marker(uint16_t port, uint8_t value) {
    if (ioperm(port, 1, 1) < 0) return -errno;
    outb(value, port);
    return 0;
}

int cinit_sigchld_fd(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    if (sigaction(SIGPIPE, &sa, NULL) < 0) return -errno;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    // SIG_SETMASK, not SIG_BLOCK: a mask inherited from whoever started us (e.g. a
    // test runner thread) must not keep SIGTERM and friends blocked.
    if (sigprocmask(SIG_SETMASK, &set, NULL) < 0) return -errno;
    int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

void cinit_drain_signalfd(int fd) {
    struct signalfd_siginfo info[8];
    while (read(fd, info, sizeof info) > 0) {}
}

int cinit_vsock_listen(uint32_t port, int backlog) {
    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_port = port;
    addr.svm_cid = VMADDR_CID_ANY;
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, backlog) < 0) {
        int e = errno; close(s); return -e;
    }
    return s;
}

int64_t cinit_vsock_local_cid(void) {
    int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    unsigned int cid = 0;
    int rc = ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid);
    int e = errno;
    close(fd);
    return rc < 0 ? -(int64_t)e : (int64_t)cid;
}

static int fill_unix(struct sockaddr_un *addr, const char *path) {
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr->sun_path) return -ENAMETOOLONG;
    strcpy(addr->sun_path, path);
    return 0;
}

int cinit_unix_listen(const char *path, int backlog) {
    struct sockaddr_un addr;
    int rc = fill_unix(&addr, path);
    if (rc < 0) return rc;
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, backlog) < 0) {
        int e = errno; close(s); return -e;
    }
    return s;
}

int cinit_unix_connect(const char *path) {
    struct sockaddr_un addr;
    int rc = fill_unix(&addr, path);
    if (rc < 0) return rc;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    while (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (errno == EINTR) continue;
        int e = errno; close(s); return -e;
    }
    return s;
}

int cinit_accept(int listen_fd) {
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0) return fd;
        if (errno != EINTR) return -errno;
    }
}

int cinit_set_child_subreaper(void) {
    return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0 ? -errno : 0;
}

int cinit_end_vm(void) {
    sync();
    if (reboot(RB_AUTOBOOT) < 0) return -errno;
    return 0;
}

// ---- spawn -------------------------------------------------------------------

struct child_report { int stage; int err; };

// Child side: never returns. Only async-signal-safe calls.
__attribute__((noreturn))
static void child_fail(int report_fd, int stage, int err) {
    struct child_report r = { stage, err };
    ssize_t n;
    do { n = write(report_fd, &r, sizeof r); } while (n < 0 && errno == EINTR);
    _exit(127);
}

static const char *env_path(char *const *envp, const char *fallback) {
    for (char *const *e = envp; e && *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) return *e + 5;
    return fallback ? fallback : "/bin";
}

// Like execvpe, but PATH comes from the new environment, and no /bin/sh fallback.
static int exec_search(char *const *argv, char *const *envp, const char *default_path) {
    const char *file = argv[0];
    if (file[0] == '\0') return ENOENT;
    if (strchr(file, '/')) { execve(file, argv, envp); return errno; }
    size_t flen = strlen(file);
    const char *p = env_path(envp, default_path);
    int saw_eacces = 0;
    char buf[4096 + 256];
    for (;;) {
        const char *colon = strchr(p, ':');
        size_t dlen = colon ? (size_t)(colon - p) : strlen(p);
        if (dlen + 1 + flen + 1 <= sizeof buf) {
            size_t n = 0;
            if (dlen == 0) buf[n++] = '.';
            else { memcpy(buf, p, dlen); n = dlen; }
            buf[n++] = '/';
            memcpy(buf + n, file, flen + 1);
            execve(buf, argv, envp);
            switch (errno) {
            case EACCES: saw_eacces = 1; break;
            case ENOENT: case ENOTDIR: case ESTALE: case ENODEV: case ETIMEDOUT: break;
            default: return errno;
            }
        }
        if (!colon) break;
        p = colon + 1;
    }
    return saw_eacces ? EACCES : ENOENT;
}

static void close_pair(int p[2]) {
    if (p[0] >= 0) close(p[0]);
    if (p[1] >= 0) close(p[1]);
    p[0] = p[1] = -1;
}

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
    return 0;
}

int cinit_spawn(const struct cinit_spawn_request *req, struct cinit_spawn_result *out) {
    out->pid = -1; out->stdin_fd = out->stdout_fd = out->stderr_fd = -1; out->stage = CINIT_STAGE_NONE;
    if (!req->argv || !req->argv[0]) return -EINVAL;
    int in[2] = {-1, -1}, o[2] = {-1, -1}, e[2] = {-1, -1}, rep[2] = {-1, -1};
    int rc = 0;
    const int pty = req->stdin_mode == CINIT_STDIN_PTY;
    int master = -1;
    char slave[64] = {0};
    if (pty) {
        // The master stays here; the child opens the slave after setsid, which makes it
        // its controlling terminal.
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 || ptsname_r(master, slave, sizeof slave) != 0) {
            rc = -errno;
            if (rc == 0) rc = -EIO;
            goto fail;
        }
    }
    if ((req->stdin_mode == CINIT_STDIN_PIPE && pipe2(in, O_CLOEXEC) < 0) ||
        (!pty && (pipe2(o, O_CLOEXEC) < 0 || pipe2(e, O_CLOEXEC) < 0)) || pipe2(rep, O_CLOEXEC) < 0) {
        rc = -errno;
        goto fail;
    }
    // vfork: the child borrows this process's memory until it execs, instead of copying
    // the agent's page tables (a fork of PID 1 cost about 4 ms on a PVM host, more than
    // the command). So the child only makes system calls: raw ones where libc would touch
    // process-wide state (glibc's setuid signals every thread of the process it thinks
    // it is in; its sigaction checks internal signals), and writes nothing the parent
    // reads except through the report pipe. It gets its own descriptor table and signal
    // handlers (no CLONE_FILES, no CLONE_SIGHAND), and execve resets handled signals.
    pid_t pid = vfork();
    if (pid < 0) { rc = -errno; goto fail; }
    if (pid == 0) {
        // Child.
        syscall(SYS_setsid);
        // SIGPIPE (ignored by the agent) and SIGCHLD back to default: an ignored signal
        // stays ignored across execve. Kernel layout: handler, flags, restorer, mask.
        struct { void *handler; unsigned long flags; void *restorer; unsigned long mask; } dfl = { SIG_DFL, 0, 0, 0 };
        syscall(SYS_rt_sigaction, SIGPIPE, &dfl, NULL, 8);
        syscall(SYS_rt_sigaction, SIGCHLD, &dfl, NULL, 8);
        unsigned long none = 0;
        syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8);

        // Move the report pipe above 2 so the dup2s below cannot clobber it.
        int report = rep[1];
        if (report <= 2) {
            report = fcntl(report, F_DUPFD_CLOEXEC, 3);
            if (report < 0) _exit(127);
        }
        int in_fd = -1;
        if (pty) {
            int s = open(slave, O_RDWR | O_CLOEXEC);
            if (s < 0) child_fail(report, CINIT_STAGE_STDIO, errno);
            if (ioctl(s, TIOCSCTTY, 0) < 0) child_fail(report, CINIT_STAGE_STDIO, errno);
            in_fd = s;
        } else if (req->stdin_mode == CINIT_STDIN_PIPE) in_fd = in[0];
        else if (req->stdin_mode == CINIT_STDIN_NULL) {
            in_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (in_fd < 0) child_fail(report, CINIT_STAGE_STDIO, errno);
        }
        // Keep sources off 0..2 before dup2 so one dup2 cannot close another's source.
        int src[3] = { in_fd, pty ? in_fd : o[1], pty ? in_fd : e[1] };
        for (int i = 0; i < 3; i++) {
            if (src[i] >= 0 && src[i] <= 2) {
                src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 3);
                if (src[i] < 0) child_fail(report, CINIT_STAGE_STDIO, errno);
            }
        }
        for (int i = 0; i < 3; i++) {
            if (src[i] < 0) { close(i); continue; }
            if (dup2(src[i], i) < 0) child_fail(report, CINIT_STAGE_STDIO, errno);
        }
        const char *wd = (req->workdir && req->workdir[0]) ? req->workdir : "/";
        if (chdir(wd) < 0) child_fail(report, CINIT_STAGE_CHDIR, errno);
        if (req->change_ids) {
            if (syscall(SYS_setgroups, 0, NULL) < 0) child_fail(report, CINIT_STAGE_SETGROUPS, errno);
            if (syscall(SYS_setgid, req->gid) < 0) child_fail(report, CINIT_STAGE_SETGID, errno);
            if (syscall(SYS_setuid, req->uid) < 0) child_fail(report, CINIT_STAGE_SETUID, errno);
        }
        child_fail(report, CINIT_STAGE_EXEC, exec_search(req->argv, req->envp, req->default_path));
    }
    // Parent.
    close(rep[1]); rep[1] = -1;
    if (in[0] >= 0) { close(in[0]); in[0] = -1; }
    if (o[1] >= 0) { close(o[1]); o[1] = -1; }
    if (e[1] >= 0) { close(e[1]); e[1] = -1; }
    struct child_report r = { 0, 0 };
    ssize_t n;
    do { n = read(rep[0], &r, sizeof r); } while (n < 0 && errno == EINTR);
    close(rep[0]); rep[0] = -1;
    if (n == (ssize_t)sizeof r) {
        // The child could not exec and has exited; reap it here so its status never
        // reaches the general reaper.
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        close_pair(in); close_pair(o); close_pair(e);
        if (master >= 0) close(master);
        out->stage = r.stage;
        return r.err > 0 ? r.err : EIO;
    }
    out->pid = pid;
    if (pty) {
        out->stdout_fd = master;
        out->stdin_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
        if (out->stdin_fd >= 0) set_nonblock(out->stdin_fd);
        set_nonblock(master);  // the dup shares the file status flags
        return 0;
    }
    out->stdin_fd = in[1];
    out->stdout_fd = o[0];
    out->stderr_fd = e[0];
    if (in[1] >= 0) set_nonblock(in[1]);
    set_nonblock(o[0]);
    set_nonblock(e[0]);
    return 0;
fail:
    close_pair(in); close_pair(o); close_pair(e); close_pair(rep);
    if (master >= 0) close(master);
    return rc;
}

int cinit_set_winsize(int fd, unsigned short rows, unsigned short cols) {
    struct winsize ws = { .ws_row = rows, .ws_col = cols, .ws_xpixel = 0, .ws_ypixel = 0 };
    return ioctl(fd, TIOCSWINSZ, &ws) < 0 ? -errno : 0;
}

// Grows the ext4 file system mounted at `mountpoint` to fill its block device (online,
// EXT4_IOC_RESIZE_FS). The device's size comes from /sys/dev/block/MAJ:MIN/size (512-byte
// sectors), the block size from statfs. Returns the new size in file-system blocks, or
// -errno.
#define CINIT_EXT4_IOC_RESIZE_FS _IOW('f', 16, uint64_t)
int64_t cinit_grow_ext4(const char *mountpoint) {
    struct stat st;
    if (stat(mountpoint, &st) != 0) return -errno;
    char path[64];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/size", major(st.st_dev), minor(st.st_dev));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    char buf[32] = {0};
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int e = errno;
    close(fd);
    if (n <= 0) return n < 0 ? -e : -EIO;
    char *end = NULL;
    unsigned long long sectors = strtoull(buf, &end, 10);
    if (end == buf) return -EIO;
    struct statfs sfs;
    if (statfs(mountpoint, &sfs) != 0) return -errno;
    if (sfs.f_bsize < 1024 || sfs.f_bsize > 65536) return -EINVAL;
    uint64_t blocks = (uint64_t)sectors * 512 / (uint64_t)sfs.f_bsize;
    int dir = open(mountpoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return -errno;
    int rc = ioctl(dir, CINIT_EXT4_IOC_RESIZE_FS, &blocks);
    e = errno;
    close(dir);
    return rc == 0 ? (int64_t)blocks : -e;
}

// Mixes `len` bytes into the kernel's random pool, crediting them as entropy
// (RNDADDENTROPY, needs CAP_SYS_ADMIN), then reseeds the CRNG (RNDRESEEDCRNG), so that
// guests restored from one snapshot stop sharing their random state. Returns 0 or -errno.
int cinit_seed_random(const uint8_t *bytes, int len) {
    if (len <= 0 || len > 4096) return -EINVAL;
    struct rand_pool_info *info = malloc(sizeof(*info) + (size_t)len);
    if (!info) return -ENOMEM;
    info->entropy_count = len * 8;
    info->buf_size = len;
    memcpy(info->buf, bytes, (size_t)len);
    int rc = 0;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) rc = -errno;
    else {
        if (ioctl(fd, RNDADDENTROPY, info) < 0) rc = -errno;
        else if (ioctl(fd, RNDRESEEDCRNG) < 0) rc = -errno;
        close(fd);
    }
    memset(info, 0, sizeof(*info) + (size_t)len);
    free(info);
    // The hardware RNG (virtio-rng) driver and the hwrng core keep bytes read ahead from
    // the device (at most 64 each, SMP_CACHE_BYTES); in a restored VM those are the
    // snapshot's, the same in every sandbox restored from it. One non-blocking read of 128
    // bytes takes what the core holds, then what the driver holds (which makes the driver
    // ask the device for fresh bytes), and stops there (EAGAIN) instead of waiting for
    // them: /dev/hwrng readers then get only bytes the host made for this VM. (A loop of
    // reads would go on taking the fresh bytes as fast as the device answers, each a
    // virtio round trip, and the core sleeps a jiffy between chunks when a reschedule is
    // due: measured at several ms per restore.) No hwrng device is not an error.
    int hw = open("/dev/hwrng", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (hw >= 0) {
        uint8_t drop[128];
        (void)!read(hw, drop, sizeof drop);
        memset(drop, 0, sizeof drop);
        close(hw);
    }
    return rc;
}

// Sets CLOCK_REALTIME to `unix_nanos`. Returns 0 or -errno.
int cinit_set_realtime(uint64_t unix_nanos) {
    struct timespec ts = { .tv_sec = (time_t)(unix_nanos / 1000000000ull), .tv_nsec = (long)(unix_nanos % 1000000000ull) };
    return clock_settime(CLOCK_REALTIME, &ts) == 0 ? 0 : -errno;
}
