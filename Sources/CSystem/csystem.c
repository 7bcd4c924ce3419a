#define _GNU_SOURCE
#include <spawn.h>
#include <fcntl.h>
#include <errno.h>
#include <unistd.h>
#include "csystem.h"
#include <sys/syscall.h>
#include <unistd.h>
int csystem_tgkill(int tgid, int tid, int sig) { return (int)syscall(SYS_tgkill, tgid, tid, sig); }
int csystem_gettid(void) { return (int)syscall(SYS_gettid); }
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
int csystem_pidfd_open(int pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
#include <pthread.h>
void csystem_set_thread_name(const char *name) {
    char buf[16];
    int i = 0;
    for (; name[i] && i < 15; i++) buf[i] = name[i];
    buf[i] = 0;
    pthread_setname_np(pthread_self(), buf);
}
int csystem_set_parent_death_signal(int sig) { return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0); }

// Copies every source above every target (close-on-exec), so that no dup2 in the child
// can overwrite a source another mapping still needs (sources and targets may overlap).
// Returns 0 with `temps` and the highest target, or an errno value (nothing left open).
static int copy_sources_above_targets(const int *sources, const int *targets, int count, int temps[16], int *highest) {
    if (count < 0 || count > 16) return EINVAL;
    *highest = -1;
    for (int i = 0; i < count; i++) if (targets[i] > *highest) *highest = targets[i];
    for (int i = 0; i < count; i++) {
        temps[i] = fcntl(sources[i], F_DUPFD_CLOEXEC, *highest + 1 > 64 ? *highest + 1 : 64);
        if (temps[i] < 0) { int rc = errno; for (int j = 0; j < i; j++) close(temps[j]); return rc; }
    }
    return 0;
}

int csystem_spawn(const char *path, char *const argv[], char *const envp[],
                  const int *sources, const int *targets, int count, int *pid) {
    int temps[16], highest;
    int rc = copy_sources_above_targets(sources, targets, count, temps, &highest);
    if (rc) return rc;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    for (int i = 0; i < count && rc == 0; i++) rc = posix_spawn_file_actions_adddup2(&fa, temps[i], targets[i]);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, highest + 1);
    pid_t child = 0;
    if (rc == 0) rc = posix_spawn(&child, path, &fa, NULL, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    for (int i = 0; i < count; i++) close(temps[i]);
    if (rc == 0) *pid = child;
    return rc;
}

// ---- Spawning into new namespaces (the VMM's jail starts here) ----
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>

struct isolated_child {
    const char *path;
    char *const *argv;
    char *const *envp;
    const int *temps;
    const int *targets;
    int count;
    int highest;
    int user_ns;
    unsigned uid, gid;
    sigset_t mask;
    volatile int error;  // errno of the step that failed in the child; written before _exit
};

static int write_proc_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return errno;
    size_t n = strlen(text);
    ssize_t w = write(fd, text, n);
    int e = w == (ssize_t)n ? 0 : (w < 0 ? errno : EIO);
    close(fd);
    return e;
}

// Runs in the child, on its own stack, sharing the parent's memory until execve (the
// parent is suspended: CLONE_VFORK). Only async-signal-safe calls: no malloc, no locks.
static int isolated_child_main(void *arg) {
    struct isolated_child *c = arg;
    // Handlers of the parent must not run in the child: reset every caught signal.
    for (int s = 1; s < NSIG; s++) {
        struct sigaction sa;
        if (sigaction(s, NULL, &sa) == 0 && sa.sa_handler != SIG_DFL && sa.sa_handler != SIG_IGN) {
            sa.sa_handler = SIG_DFL;
            sa.sa_flags = 0;
            sigemptyset(&sa.sa_mask);
            sigaction(s, &sa, NULL);
        }
    }
    if (c->user_ns) {
        // Map this user to root inside the new user namespace (so the VMM may build its
        // mount namespace); nothing else of the host's users is mapped.
        char line[64];
        int e = write_proc_file("/proc/self/setgroups", "deny");
        if (!e) { snprintf(line, sizeof line, "0 %u 1\n", c->uid); e = write_proc_file("/proc/self/uid_map", line); }
        if (!e) { snprintf(line, sizeof line, "0 %u 1\n", c->gid); e = write_proc_file("/proc/self/gid_map", line); }
        if (e) { c->error = e; _exit(127); }
    }
    for (int i = 0; i < c->count; i++) {
        if (dup2(c->temps[i], c->targets[i]) < 0) { c->error = errno; _exit(127); }
    }
    // Nothing else of the parent's descriptors reaches the child.
    syscall(SYS_close_range, (unsigned)(c->highest + 1), ~0U, 0);
    sigprocmask(SIG_SETMASK, &c->mask, NULL);
    execve(c->path, c->argv, c->envp);
    c->error = errno;
    _exit(127);
}

int csystem_spawn_isolated(const char *path, char *const argv[], char *const envp[],
                           const int *sources, const int *targets, int count,
                           int namespaces, int *pid) {
    int temps[16], highest;
    int rc = copy_sources_above_targets(sources, targets, count, temps, &highest);
    if (rc) return rc;
    const size_t stackSize = 256 * 1024;
    void *stack = mmap(NULL, stackSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) { rc = errno; for (int i = 0; i < count; i++) close(temps[i]); return rc; }
    struct isolated_child c = {
        .path = path, .argv = argv, .envp = envp, .temps = temps, .targets = targets, .count = count,
        .highest = highest, .user_ns = (namespaces & CLONE_NEWUSER) != 0,
        .uid = (unsigned)geteuid(), .gid = (unsigned)getegid(), .error = 0,
    };
    // No signal may reach the child before it has reset the handlers it shares with us.
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &c.mask);
    int flags = CLONE_VM | CLONE_VFORK | SIGCHLD | (namespaces & (CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWUSER));
    int child = clone(isolated_child_main, (char *)stack + stackSize, flags, &c);
    int cloneErr = errno;
    pthread_sigmask(SIG_SETMASK, &c.mask, NULL);
    munmap(stack, stackSize);
    for (int i = 0; i < count; i++) close(temps[i]);
    if (child < 0) return cloneErr;
    if (c.error) {
        int status;
        while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
        return c.error;
    }
    *pid = child;
    return 0;
}

#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <string.h>

static int unix_address(const char *path, struct sockaddr_un *a) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof a->sun_path) return -ENAMETOOLONG;
    memcpy(a->sun_path, path, n);
    return 0;
}

int csystem_unix_connect(const char *path) {
    struct sockaddr_un a;
    int rc = unix_address(path, &a);
    if (rc) return rc;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    while (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        if (errno == EINTR) continue;
        int e = errno;
        close(s);
        return -e;
    }
    return s;
}

int csystem_unix_listen(const char *path, int backlog) {
    struct sockaddr_un a;
    int rc = unix_address(path, &a);
    if (rc) return rc;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    // The socket file is made by bind with the umask applied: only this user may connect.
    mode_t old = umask(0177);
    int b = bind(s, (struct sockaddr *)&a, sizeof a);
    int e = errno;
    umask(old);
    if (b < 0 || listen(s, backlog) < 0) {
        if (b == 0) e = errno;
        close(s);
        return -e;
    }
    return s;
}

int csystem_unix_accept(int listener) {
    for (;;) {
        int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0) return c;
        if (errno != EINTR) return -errno;
    }
}

long csystem_send_with_fds(int sock, const void *buf, unsigned long len, const int *fds, int count) {
    if (count < 0 || count > 8) return -EINVAL;
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char bytes[CMSG_SPACE(8 * sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (count > 0) {
        memset(&control, 0, sizeof control);
        m.msg_control = control.bytes;
        m.msg_controllen = CMSG_SPACE(count * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(count * sizeof(int));
        memcpy(CMSG_DATA(c), fds, count * sizeof(int));
    }
    for (;;) {
        ssize_t n = sendmsg(sock, &m, MSG_NOSIGNAL);
        if (n >= 0) return n;
        if (errno != EINTR) return -errno;
    }
}

long csystem_recv_with_fds(int sock, void *buf, unsigned long len, int *fds, int max, int *count) {
    *count = 0;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union { char bytes[CMSG_SPACE(8 * sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes };
    ssize_t n;
    do { n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    int truncated = (m.msg_flags & MSG_CTRUNC) != 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int got[64];
        if (k > 64) k = 64;
        memcpy(got, CMSG_DATA(c), k * sizeof(int));
        for (int i = 0; i < k; i++) {
            if (!truncated && *count < max) fds[(*count)++] = got[i];
            else close(got[i]);
        }
    }
    if (truncated) {
        for (int i = 0; i < *count; i++) close(fds[i]);
        *count = 0;
        return -EMSGSIZE;
    }
    return n;
}

long csystem_peer_uid(int sock) {
    struct ucred cred;
    socklen_t n = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &n) < 0) return -errno;
    return (long)cred.uid;
}

#include <sys/random.h>
int csystem_fill_random(void *buf, unsigned long len) {
    unsigned long done = 0;
    while (done < len) {
        ssize_t n = getrandom((char *)buf + done, len - done, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        done += (unsigned long)n;
    }
    return 0;
}
