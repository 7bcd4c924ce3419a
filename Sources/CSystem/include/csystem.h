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
#endif
