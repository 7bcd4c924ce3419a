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
