// C shim for the KVM API. The only place <linux/kvm.h> is included.
// ioctl request numbers are macros, which do not import into Swift, so they are
// exported as constants; variadic ioctl(2) is wrapped in functions returning -errno.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <stdint.h>
#include <stddef.h>

// System ioctls.
extern const unsigned long CKVM_GET_API_VERSION;
extern const unsigned long CKVM_CREATE_VM;
extern const unsigned long CKVM_CHECK_EXTENSION;
extern const unsigned long CKVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long CKVM_GET_SUPPORTED_CPUID;
// VM ioctls.
extern const unsigned long CKVM_CREATE_VCPU;
extern const unsigned long CKVM_SET_USER_MEMORY_REGION;
extern const unsigned long CKVM_SET_TSS_ADDR;
extern const unsigned long CKVM_SET_IDENTITY_MAP_ADDR;
extern const unsigned long CKVM_CREATE_IRQCHIP;
extern const unsigned long CKVM_CREATE_PIT2;
extern const unsigned long CKVM_IRQ_LINE;
extern const unsigned long CKVM_IRQFD;
extern const unsigned long CKVM_IOEVENTFD;
// vCPU ioctls.
extern const unsigned long CKVM_RUN;
extern const unsigned long CKVM_GET_REGS;
extern const unsigned long CKVM_SET_REGS;
extern const unsigned long CKVM_GET_SREGS;
extern const unsigned long CKVM_SET_SREGS;
extern const unsigned long CKVM_SET_FPU;
extern const unsigned long CKVM_SET_LAPIC;
extern const unsigned long CKVM_GET_LAPIC;
extern const unsigned long CKVM_SET_MP_STATE;
// State save and restore (snapshots).
extern const unsigned long CKVM_GET_MSR_INDEX_LIST;
extern const unsigned long CKVM_GET_XSAVE;
extern const unsigned long CKVM_GET_XSAVE2;
extern const unsigned long CKVM_SET_XSAVE;
extern const unsigned long CKVM_GET_XCRS;
extern const unsigned long CKVM_SET_XCRS;
extern const unsigned long CKVM_GET_VCPU_EVENTS;
extern const unsigned long CKVM_SET_VCPU_EVENTS;
extern const unsigned long CKVM_GET_MP_STATE;
extern const unsigned long CKVM_GET_DEBUGREGS;
extern const unsigned long CKVM_SET_DEBUGREGS;
extern const unsigned long CKVM_GET_IRQCHIP;
extern const unsigned long CKVM_SET_IRQCHIP;
extern const unsigned long CKVM_GET_PIT2;
extern const unsigned long CKVM_SET_PIT2;
extern const unsigned long CKVM_GET_CLOCK;
extern const unsigned long CKVM_SET_CLOCK;
extern const unsigned long CKVM_KVMCLOCK_CTRL;
extern const unsigned long CKVM_GET_MSRS;
extern const int CKVM_CAP_XSAVE2;

/// KVM_GET_MSR_INDEX_LIST into `indices` (room for `capacity`). Returns the count or
/// -errno (-E2BIG when `capacity` is too small).
int ckvm_get_msr_index_list(int kvm_fd, uint32_t *indices, int capacity);

/// ioctl(fd, request, arg); returns the result or -errno.
int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg);
/// ioctl(fd, request, value); returns the result or -errno.
int ckvm_ioctl_val(int fd, unsigned long request, unsigned long value);

/// KVM_GET_SUPPORTED_CPUID into a caller buffer of `capacity` entries.
/// Returns the entry count or -errno (-E2BIG if the buffer is too small).
int ckvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int capacity);
/// KVM_SET_CPUID2 with `count` entries. Returns 0 or -errno.
int ckvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int count);
/// KVM_SET_MSRS with `count` entries. Returns the number set or -errno.
int ckvm_set_msrs(int vcpu_fd, const struct kvm_msr_entry *entries, int count);
/// KVM_GET_MSRS; indices in, data out. Returns the number read or -errno.
int ckvm_get_msrs(int vcpu_fd, struct kvm_msr_entry *entries, int count);

// Accessors for struct kvm_run's anonymous union (kept in C so that Swift never
// computes offsets into the shared run page itself).
static inline uint32_t ckvm_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }
static inline uint8_t ckvm_run_io_direction(const struct kvm_run *run) { return run->io.direction; }
static inline uint8_t ckvm_run_io_size(const struct kvm_run *run) { return run->io.size; }
static inline uint16_t ckvm_run_io_port(const struct kvm_run *run) { return run->io.port; }
static inline uint32_t ckvm_run_io_count(const struct kvm_run *run) { return run->io.count; }
static inline uint64_t ckvm_run_io_data_offset(const struct kvm_run *run) { return run->io.data_offset; }
static inline uint64_t ckvm_run_mmio_phys_addr(const struct kvm_run *run) { return run->mmio.phys_addr; }
static inline uint8_t *ckvm_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }
static inline uint32_t ckvm_run_mmio_len(const struct kvm_run *run) { return run->mmio.len; }
static inline uint8_t ckvm_run_mmio_is_write(const struct kvm_run *run) { return run->mmio.is_write; }
static inline uint32_t ckvm_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }
static inline uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *run) { return run->fail_entry.hardware_entry_failure_reason; }
static inline uint32_t ckvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
static inline void ckvm_run_set_immediate_exit(struct kvm_run *run, uint8_t v) { __atomic_store_n(&run->immediate_exit, v, __ATOMIC_SEQ_CST); }

#endif
