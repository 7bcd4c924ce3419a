// C shim for libseccomp and libcap (the jailed VMM builds on these).
#ifndef CJAIL_H
#define CJAIL_H
#include <stdint.h>
#include <stddef.h>

/// libseccomp's runtime version, packed as major*10000 + minor*100 + micro.
int cjail_seccomp_version(void);
/// 1 if the calling process has `cap` (e.g. 21 = CAP_SYS_ADMIN) in its effective set, 0 if not, -errno on error.
int cjail_has_effective_cap(int cap);
/// Drops every capability from the effective, permitted and inheritable sets. 0 or -errno.
int cjail_drop_all_caps(void);


/// Builds the jail's file system and enters it (call in a new mount namespace, with
/// CAP_SYS_ADMIN there): mounts a small tmpfs on `root`, bind-mounts each of `binds`
/// (absolute paths, copied before the tmpfs covers anything) at the same path inside it
/// (read-only unless `writable[i]`; always nosuid, nodev, noexec), pivots into it,
/// detaches the old root and makes the new root read-only. 0, or -errno with `err` saying
/// which step failed.
int cjail_enter_root(const char *root, const char *const *binds, const int *writable, int count,
                     char *err, size_t errlen);
/// Empties the bounding, ambient, effective, permitted and inheritable capability sets,
/// locks the securebits, and sets PR_SET_NO_NEW_PRIVS. 0, 1 when the bounding set and
/// securebits could not be changed (no CAP_SETPCAP: nothing to drop there), or -errno
/// (with `err`).
int cjail_drop_privileges(char *err, size_t errlen);
/// Loads a seccomp filter on every thread of the process (TSYNC): the system calls named
/// in `allowed`, ioctl only with the requests in `ioctls`, clone only for threads, clone3
/// answering ENOSYS, tgkill only to `tgid`, mmap/mprotect never with PROT_EXEC, prctl only
/// PR_SET_NAME/PR_GET_NAME. Anything else raises SIGSYS when `trapping` (a handler then
/// writes a `failed` event naming the call to `reportFD` and to fd 2, and exits with
/// 128+SIGSYS), or kills the process at once when not. 0 or -errno (with `err`).
int cjail_apply_seccomp(const char *const *allowed, int count, const unsigned long *ioctls, int ioctlCount,
                        int tgid, int reportFD, int trapping, char *err, size_t errlen);
#endif
