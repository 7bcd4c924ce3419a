// C shim for libseccomp and libcap (the jailed VMM builds on these).
#ifndef CJAIL_H
#define CJAIL_H
#include <stdint.h>

/// libseccomp's runtime version, packed as major*10000 + minor*100 + micro.
int cjail_seccomp_version(void);
/// 1 if the calling process has `cap` (e.g. 21 = CAP_SYS_ADMIN) in its effective set, 0 if not, -errno on error.
int cjail_has_effective_cap(int cap);
/// Drops every capability from the effective, permitted and inheritable sets. 0 or -errno.
int cjail_drop_all_caps(void);

#endif
