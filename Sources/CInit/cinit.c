// The Swift runtime locates itself through /proc at start-up; as PID 1 in a fresh
// guest /proc is not mounted yet and the runtime crashes before main. This
// constructor runs before the runtime initialises and mounts /proc when we are PID 1.
#include "cinit.h"
#include <errno.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

int cinit_early_proc_mount_errno = 0;

__attribute__((constructor(101)))
static void cinit_mount_proc_early(void) {
    if (getpid() != 1) return;
    mkdir("/proc", 0555);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0 && errno != EBUSY)
        cinit_early_proc_mount_errno = errno;
}
