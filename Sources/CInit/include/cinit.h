// C support for sandbox-init, the guest's PID 1. Everything that must run between
// fork and exec, and every struct or macro that does not import well into Swift,
// lives here. Functions return 0 (or a file descriptor) on success and -errno on
// failure unless documented otherwise.
#ifndef CINIT_H
#define CINIT_H
#include <stdint.h>
#include <sys/types.h>

/// Set by the constructor: 0 if /proc was mounted (or we are not PID 1), else errno.
extern int cinit_early_proc_mount_errno;
/// Reads cinit_early_proc_mount_errno (a function, so Swift sees no shared mutable state).
int cinit_proc_mount_errno(void);

/// I/O port the VMM timestamps for boot-time measurement.

/// CLOCK_BOOTTIME in nanoseconds.
uint64_t cinit_boottime_ns(void);

/// Makes fds 0, 1 and 2 valid: any closed one is opened on /dev/console, or
/// /dev/null if the console cannot be opened. Returns 0 or -errno.
int cinit_ensure_stdio(void);

/// mkdir -p style single mkdir (EEXIST is success) followed by mount(2).
int cinit_mount(const char *source, const char *target, const char *fstype,
                unsigned long flags, const char *data);

/// MS_NOSUID | MS_NODEV | MS_NOEXEC etc. for Swift (the macros are enums in C).
unsigned long cinit_ms_nosuid(void);
unsigned long cinit_ms_nodev(void);
unsigned long cinit_ms_noexec(void);

/// Sets IFF_UP on the loopback interface "lo". Returns 0 or -errno.
int cinit_loopback_up(void);

/// ioperm + outb of `value` to I/O port `port` (the boot-timer port, GuestABI in
/// Swift). Returns 0 or -errno (ioperm failed).
int cinit_boot_marker(uint16_t port, uint8_t value);

/// Sets the signal mask to exactly {SIGCHLD}, ignores SIGPIPE, and returns a non-blocking, close-on-exec
/// signalfd that becomes readable when a child changes state, or -errno.
int cinit_sigchld_fd(void);

/// Reads (and discards) every pending siginfo from the signalfd.
void cinit_drain_signalfd(int fd);

/// Close-on-exec listening AF_VSOCK stream socket on VMADDR_CID_ANY:port, or -errno.
int cinit_vsock_listen(uint32_t port, int backlog);

/// The guest's own vsock CID from IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock:
/// a value > 2 means a guest transport (virtio-vsock) is present; 1 (loopback only)
/// or 0xFFFFFFFF (no transport) mean no host can ever connect. Returns -errno if
/// /dev/vsock cannot be opened or the ioctl fails.
int64_t cinit_vsock_local_cid(void);

/// Close-on-exec listening AF_UNIX stream socket at `path` (a stale socket file is
/// removed first), or -errno. -ENAMETOOLONG if the path does not fit sun_path.
int cinit_unix_listen(const char *path, int backlog);

/// Close-on-exec connected AF_UNIX stream socket, or -errno.
int cinit_unix_connect(const char *path);

/// accept4(SOCK_CLOEXEC), retrying EINTR. Returns the fd or -errno.
int cinit_accept(int listen_fd);

/// prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to us, as
/// they would be to PID 1. Used off-VM so --listen-unix reaps like PID 1 does.
int cinit_set_child_subreaper(void);

/// Ends the VM: sync(2), then reboot(RB_AUTOBOOT). The guest runs with `reboot=t`,
/// so the kernel resets through a triple fault, which the VMM sees as
/// KVM_EXIT_SHUTDOWN (QEMU with -no-reboot exits). RB_POWER_OFF is not used: on a
/// microvm without ACPI the kernel has no power-off method and only halts
/// ("Power off not available: System halted instead"), leaving the VMM waiting.
/// Returns only on failure, with -errno.
int cinit_end_vm(void);

/// Grows the ext4 file system mounted at `mountpoint` online to the size of its block
/// device. Returns the new size in file-system blocks, or -errno.
int64_t cinit_grow_ext4(const char *mountpoint);

/// Credits `len` bytes to the kernel's random pool and reseeds it. 0 or -errno.
int cinit_seed_random(const uint8_t *bytes, int len);
/// Sets the wall clock (ns since 1970). 0 or -errno.
int cinit_set_realtime(uint64_t unix_nanos);

/// Standard input of a spawned command.
/// CINIT_STDIN_PTY: stdin, stdout and stderr are one new pseudo-terminal, the child's
/// controlling terminal; the parent gets its master as stdin_fd (a dup, for writing)
/// and stdout_fd (for reading), and no stderr_fd.
enum cinit_stdin_mode { CINIT_STDIN_NULL = 0, CINIT_STDIN_PIPE = 1, CINIT_STDIN_CLOSED = 2, CINIT_STDIN_PTY = 3 };

/// Failing step reported by a child that could not exec.
enum cinit_spawn_stage {
    CINIT_STAGE_NONE = 0, CINIT_STAGE_STDIO = 1, CINIT_STAGE_CHDIR = 2, CINIT_STAGE_SETGROUPS = 3,
    CINIT_STAGE_SETGID = 4, CINIT_STAGE_SETUID = 5, CINIT_STAGE_EXEC = 6
};

/// What to run. argv and envp are NULL-terminated; argv[0] without '/' is searched in
/// PATH taken from envp, else in default_path (GuestABI.defaultPath in Swift).
struct cinit_spawn_request {
    char *const *argv;
    char *const *envp;
    const char *default_path;
    const char *workdir;      // NULL or "" = "/"
    uint32_t uid, gid;
    int change_ids;           // non-zero: setgroups(0), setgid(gid), setuid(uid)
    int stdin_mode;           // enum cinit_stdin_mode
};

/// Result of cinit_spawn. Parent-side pipe ends are close-on-exec and non-blocking;
/// unused ones are -1.
struct cinit_spawn_result {
    pid_t pid;                // also the process group id (the child calls setsid)
    int stdin_fd, stdout_fd, stderr_fd;
    int stage;                // enum cinit_spawn_stage when the return value is > 0
};

/// fork + exec with pipes. In the child: setsid, default signal mask and
/// dispositions, stdio, chdir, ids, exec; only async-signal-safe calls.
/// Returns 0 on success; a positive errno if the child could not exec (the child has
/// been reaped, `stage` says which step failed); -errno if pipe/fork failed.
int cinit_spawn(const struct cinit_spawn_request *req, struct cinit_spawn_result *out);

/// Sets a pseudo-terminal's window size (TIOCSWINSZ; its foreground process group gets
/// SIGWINCH). 0 or -errno.
int cinit_set_winsize(int fd, unsigned short rows, unsigned short cols);
#endif
