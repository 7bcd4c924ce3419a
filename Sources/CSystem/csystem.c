#define _GNU_SOURCE
#include "csystem.h"
#include <sys/syscall.h>
#include <unistd.h>
int csystem_tgkill(int tgid, int tid, int sig) { return (int)syscall(SYS_tgkill, tgid, tid, sig); }
int csystem_gettid(void) { return (int)syscall(SYS_gettid); }
