// C support for sandbox-init, the guest's PID 1.
#ifndef CINIT_H
#define CINIT_H
/// Set by the constructor: 0 if /proc was mounted (or we are not PID 1), else errno.
extern int cinit_early_proc_mount_errno;
#endif
