#define _GNU_SOURCE
#include "cjail.h"
#include <seccomp.h>
#include <sys/capability.h>
#include <errno.h>

int cjail_seccomp_version(void) {
    const struct scmp_version *v = seccomp_version();
    if (!v) return -ENOSYS;
    return (int)(v->major * 10000 + v->minor * 100 + v->micro);
}

int cjail_has_effective_cap(int cap) {
    cap_t caps = cap_get_proc();
    if (!caps) return -errno;
    cap_flag_value_t value = CAP_CLEAR;
    int rc = cap_get_flag(caps, (cap_value_t)cap, CAP_EFFECTIVE, &value);
    cap_free(caps);
    if (rc < 0) return -errno;
    return value == CAP_SET ? 1 : 0;
}

int cjail_drop_all_caps(void) {
    cap_t caps = cap_init();
    if (!caps) return -errno;
    int rc = cap_set_proc(caps);
    int e = errno;
    cap_free(caps);
    return rc < 0 ? -e : 0;
}

// ---- The jail: a root of its own, no privileges, a syscall allow-list ----
#include <sched.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/capability.h>
#include <linux/securebits.h>

#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif

static int fail(char *err, size_t errlen, const char *what, const char *path, int e) {
    if (err && errlen) snprintf(err, errlen, "%s%s%s: %s", what, path ? " " : "", path ? path : "", strerror(e));
    return -e;
}

// mkdir -p of `path` (absolute) under the current directory's tree rooted at `root`.
static int make_dirs(const char *root, const char *path) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s%s", root, path) >= (int)sizeof buf) return ENAMETOOLONG;
    for (char *p = buf + strlen(root) + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST) return errno;
        *p = '/';
    }
    if (mkdir(buf, 0755) < 0 && errno != EEXIST) return errno;
    return 0;
}

int cjail_enter_root(const char *root, const char *const *binds, const int *writable, int count,
                     char *err, size_t errlen) {
    if (count < 0 || count > 8) return fail(err, errlen, "too many bind mounts", NULL, EINVAL);
    // Nothing done in this mount namespace may reach the host's.
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) return fail(err, errlen, "make / private", NULL, errno);
    // Detached copies of what the jail keeps, taken before anything is mounted over them.
    int trees[8];
    for (int i = 0; i < count; i++) {
        trees[i] = (int)syscall(SYS_open_tree, AT_FDCWD, binds[i], OPEN_TREE_CLONE | O_CLOEXEC);
        if (trees[i] < 0) {
            int e = errno;
            for (int j = 0; j < i; j++) close(trees[j]);
            return fail(err, errlen, "open_tree", binds[i], e);
        }
    }
    int rc = 0;
    if (mount("sandbox-jail", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755") < 0) {
        rc = fail(err, errlen, "mount a tmpfs on", root, errno);
    }
    for (int i = 0; i < count && rc == 0; i++) {
        char target[4096];
        int e = make_dirs(root, binds[i]);
        if (e) { rc = fail(err, errlen, "mkdir in the jail", binds[i], e); break; }
        snprintf(target, sizeof target, "%s%s", root, binds[i]);
        if (syscall(SYS_move_mount, trees[i], "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0) {
            rc = fail(err, errlen, "move_mount", binds[i], errno);
            break;
        }
        unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC | (writable[i] ? 0 : MS_RDONLY);
        if (mount(NULL, target, NULL, flags, NULL) < 0) { rc = fail(err, errlen, "remount", binds[i], errno); break; }
    }
    for (int i = 0; i < count; i++) close(trees[i]);
    if (rc) return rc;
    // pivot_root(".", "."): the tmpfs becomes / and the old root sits on top of it, from
    // where it is detached; nothing of the host's tree stays reachable by path.
    if (chdir(root) < 0) return fail(err, errlen, "chdir", root, errno);
    if (syscall(SYS_pivot_root, ".", ".") < 0) return fail(err, errlen, "pivot_root", root, errno);
    if (umount2(".", MNT_DETACH) < 0) return fail(err, errlen, "detach the old root", NULL, errno);
    if (chdir("/") < 0) return fail(err, errlen, "chdir", "/", errno);
    if (mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) {
        return fail(err, errlen, "remount the jail's root read-only", NULL, errno);
    }
    return 0;
}

int cjail_drop_privileges(char *err, size_t errlen) {
    // No capability can come back: empty bounding and ambient sets, no root magic on
    // exec (there is none to come, but the bits are cheap), then the sets themselves.
    // Without CAP_SETPCAP (a user the host gave no namespaces) the bounding set and the
    // securebits cannot change: such a process has no capability to lose anyway, and
    // no_new_privs keeps it so. Returns 1 then.
    int bounded = cjail_has_effective_cap(CAP_SETPCAP) == 1;
    for (int cap = 0; bounded && cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) return fail(err, errlen, "PR_CAPBSET_DROP", NULL, errno);
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL) return fail(err, errlen, "PR_CAP_AMBIENT_CLEAR_ALL", NULL, errno);
    if (bounded && prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED
              | SECBIT_KEEP_CAPS_LOCKED, 0, 0, 0) < 0) return fail(err, errlen, "PR_SET_SECUREBITS", NULL, errno);
    int rc = cjail_drop_all_caps();
    if (rc < 0) return fail(err, errlen, "cap_set_proc (drop all)", NULL, -rc);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return fail(err, errlen, "PR_SET_NO_NEW_PRIVS", NULL, errno);
    return bounded ? 0 : 1;
}

// Syscall names for the SIGSYS report, resolved before the filter is loaded (the
// handler may not allocate).
#define CJAIL_NAMES 512
static char *syscall_names[CJAIL_NAMES];
static int report_fd = -1;

static size_t put(char *buf, size_t at, size_t cap, const char *s) {
    while (*s && at + 1 < cap) buf[at++] = *s++;
    return at;
}
static size_t put_num(char *buf, size_t at, size_t cap, long v) {
    char tmp[24];
    int n = 0;
    if (v < 0) { at = put(buf, at, cap, "-"); v = -v; }
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v && n < 23);
    while (n && at + 1 < cap) buf[at++] = tmp[--n];
    return at;
}

static void sigsys_handler(int sig, siginfo_t *info, void *ctx) {
    (void)sig; (void)ctx;
    int nr = info->si_syscall;
    const char *name = (nr >= 0 && nr < CJAIL_NAMES && syscall_names[nr]) ? syscall_names[nr] : "unknown";
    char msg[512];
    size_t n = 0;
    n = put(msg, n, sizeof msg, "the VMM made a system call its seccomp filter does not allow: ");
    n = put(msg, n, sizeof msg, name);
    n = put(msg, n, sizeof msg, " (number ");
    n = put_num(msg, n, sizeof msg, nr);
    n = put(msg, n, sizeof msg, "); the jail killed it");
    char line[700];
    size_t m = 0;
    m = put(line, m, sizeof line, "{\"kind\":\"failed\",\"error\":{\"code\":\"jail\",\"message\":\"");
    for (size_t i = 0; i < n && m + 2 < sizeof line; i++) line[m++] = msg[i];
    m = put(line, m, sizeof line, "\"}}\n");
    if (report_fd >= 0) { ssize_t w = write(report_fd, line, m); (void)w; }
    char err[600];
    size_t k = put(err, 0, sizeof err, "sandbox-vmm: ");
    for (size_t i = 0; i < n && k + 2 < sizeof err; i++) err[k++] = msg[i];
    err[k++] = '\n';
    { ssize_t w = write(2, err, k); (void)w; }
    syscall(SYS_exit_group, 128 + SIGSYS);
}

int cjail_apply_seccomp(const char *const *allowed, int count, const unsigned long *ioctls, int ioctlCount,
                        int tgid, int reportFD, int trapping, char *err, size_t errlen) {
    for (int nr = 0; nr < CJAIL_NAMES; nr++) {
        if (!syscall_names[nr]) syscall_names[nr] = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);
    }
    report_fd = reportFD;
    if (trapping) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = sigsys_handler;
        sa.sa_flags = SA_SIGINFO;
        sigfillset(&sa.sa_mask);
        if (sigaction(SIGSYS, &sa, NULL) < 0) return fail(err, errlen, "sigaction(SIGSYS)", NULL, errno);
    }
    scmp_filter_ctx ctx = seccomp_init(trapping ? SCMP_ACT_TRAP : SCMP_ACT_KILL_PROCESS);
    if (!ctx) return fail(err, errlen, "seccomp_init", NULL, ENOMEM);
    int rc = 0;
    #define RULE(action, nr, ...) do { if (rc == 0) { rc = seccomp_rule_add(ctx, action, nr, __VA_ARGS__); \
        if (rc < 0) { fail(err, errlen, "seccomp_rule_add", seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr), -rc); } } } while (0)
    for (int i = 0; i < count && rc == 0; i++) {
        int nr = seccomp_syscall_resolve_name(allowed[i]);
        if (nr == __NR_SCMP_ERROR) { rc = fail(err, errlen, "unknown system call in the allow-list:", allowed[i], EINVAL); break; }
        RULE(SCMP_ACT_ALLOW, nr, 0);
    }
    // ioctl: only the requests listed (those of a running KVM VM).
    for (int i = 0; i < ioctlCount && rc == 0; i++) {
        RULE(SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A1(SCMP_CMP_EQ, (scmp_datum_t)ioctls[i]));
    }
    // Threads, never processes: clone only with CLONE_THREAD; clone3 (whose flags a
    // filter cannot read) answers ENOSYS, and the C library falls back to clone.
    RULE(SCMP_ACT_ALLOW, SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD));
    RULE(SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
    // Signals only to this process's own threads (vCPU kicks).
    RULE(SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1, SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)tgid));
    // No executable memory beyond what is mapped now.
    RULE(SCMP_ACT_ALLOW, SCMP_SYS(mmap), 1, SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
    RULE(SCMP_ACT_ALLOW, SCMP_SYS(mprotect), 1, SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
    // prctl: naming threads, and the queries the runtime makes.
    RULE(SCMP_ACT_ALLOW, SCMP_SYS(prctl), 1, SCMP_A0(SCMP_CMP_EQ, PR_SET_NAME));
    RULE(SCMP_ACT_ALLOW, SCMP_SYS(prctl), 1, SCMP_A0(SCMP_CMP_EQ, PR_GET_NAME));
    #undef RULE
    if (rc == 0) {
        rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
        if (rc < 0) fail(err, errlen, "seccomp_attr_set(TSYNC)", NULL, -rc);
    }
    if (rc == 0) {
        rc = seccomp_load(ctx);
        if (rc < 0) fail(err, errlen, "seccomp_load", NULL, -rc);
    }
    seccomp_release(ctx);
    return rc < 0 ? rc : 0;
}
