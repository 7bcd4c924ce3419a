#define _GNU_SOURCE
#include "csystem.h"
#include <sys/syscall.h>
#include <unistd.h>
int csystem_tgkill(int tgid, int tid, int sig) { return (int)syscall(SYS_tgkill, tgid, tid, sig); }
int csystem_gettid(void) { return (int)syscall(SYS_gettid); }
#include <pthread.h>
void csystem_set_thread_name(const char *name) {
    char buf[16];
    int i = 0;
    for (; name[i] && i < 15; i++) buf[i] = name[i];
    buf[i] = 0;
    pthread_setname_np(pthread_self(), buf);
}
int csystem_set_parent_death_signal(int sig) { return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0); }
