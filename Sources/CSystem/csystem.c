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

int csystem_spawn(const char *path, char *const argv[], char *const envp[],
                  const int *sources, const int *targets, int count, int *pid) {
    if (count < 0 || count > 16) return EINVAL;
    // Copy every source above every target first, so that no dup2 below can overwrite
    // a source another mapping still needs (sources and targets may overlap).
    int temps[16];
    int highest = -1, rc = 0;
    for (int i = 0; i < count; i++) if (targets[i] > highest) highest = targets[i];
    for (int i = 0; i < count; i++) {
        temps[i] = fcntl(sources[i], F_DUPFD_CLOEXEC, highest + 1 > 64 ? highest + 1 : 64);
        if (temps[i] < 0) { rc = errno; for (int j = 0; j < i; j++) close(temps[j]); return rc; }
    }
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
