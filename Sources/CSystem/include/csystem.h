// Linux headers the Glibc module does not export to Swift.
#ifndef CSYSTEM_H
#define CSYSTEM_H
#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stdint.h>

/// Sends `sig` to a specific thread of this process (pthread_kill on the tid).
int csystem_tgkill(int tgid, int tid, int sig);
/// The calling thread's kernel id.
int csystem_gettid(void);

/// pidfd_open(2): a descriptor that polls readable when process `pid` exits; -1 with
/// errno (ENOSYS before Linux 5.3).
int csystem_pidfd_open(int pid);
/// prctl(PR_SET_PDEATHSIG, sig): the kernel sends `sig` to this process when its parent exits.
int csystem_set_parent_death_signal(int sig);
/// Names a thread (at most 15 characters are kept).
void csystem_set_thread_name(const char *name);
/// posix_spawn of `path` where the child gets exactly the descriptors in `targets`
/// (target[i] is a copy of source[i]; any numbers may overlap) and every other
/// descriptor closed. Returns 0 and the child's pid, or an errno value.
int csystem_spawn(const char *path, char *const argv[], char *const envp[],
                  const int *sources, const int *targets, int count, int *pid);
/// Like `csystem_spawn`, but the child starts in the new namespaces `namespaces` asks for
/// (a mask of CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS and
/// CLONE_NEWUSER; with CLONE_NEWUSER this user is mapped to root inside, nothing else).
/// Returns 0 and the child's pid (as this process sees it), or an errno value (EPERM or
/// EINVAL when the host does not allow a namespace).
int csystem_spawn_isolated(const char *path, char *const argv[], char *const envp[],
                           const int *sources, const int *targets, int count,
                           int namespaces, int *pid);
/// clone(2) namespace flags, for Swift (the macros do not import).
enum {
    CSYSTEM_NEWNS = 0x00020000, CSYSTEM_NEWUTS = 0x04000000, CSYSTEM_NEWIPC = 0x08000000,
    CSYSTEM_NEWUSER = 0x10000000, CSYSTEM_NEWPID = 0x20000000, CSYSTEM_NEWNET = 0x40000000,
};
/// Fills `len` bytes at `buf` from the kernel's random source (getrandom(2), retrying
/// EINTR and short reads). 0, or -errno.
int csystem_fill_random(void *buf, unsigned long len);
/// A connected AF_UNIX stream socket to `path` (close-on-exec); -errno on failure
/// (-ENAMETOOLONG when the path does not fit a sockaddr_un).
int csystem_unix_connect(const char *path);
/// A listening AF_UNIX stream socket bound at `path` (close-on-exec, mode 0600 through a
/// umask while binding); -errno on failure (-EADDRINUSE when something is bound there).
int csystem_unix_listen(const char *path, int backlog);
/// accept4 with SOCK_CLOEXEC, retrying EINTR: a connection, or -errno.
int csystem_unix_accept(int listener);
/// poll(2)'s POLLRDHUP (the peer shut its end), which Glibc's module does not export.
enum { CSYSTEM_POLLRDHUP = 0x2000 };
/// sendmsg of `len` bytes with `count` descriptors attached (SCM_RIGHTS, at most 8);
/// bytes sent, or -errno. MSG_NOSIGNAL: a closed peer is EPIPE, not a signal.
long csystem_send_with_fds(int sock, const void *buf, unsigned long len, const int *fds, int count);
/// recvmsg into `buf` (at most `len` bytes); descriptors that came with it (SCM_RIGHTS,
/// close-on-exec) go to `fds` (at most `max`, at most 8), their number to `*count`; any
/// beyond `max` are closed. Bytes read (0 at end of stream), or -errno; a message whose
/// control data was truncated is -EMSGSIZE (its descriptors are closed).
long csystem_recv_with_fds(int sock, void *buf, unsigned long len, int *fds, int max, int *count);
/// The uid of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED),
/// or -errno.
long csystem_peer_uid(int sock);
#endif
