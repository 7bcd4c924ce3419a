#include "ckvm.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
const unsigned long CKVM_IRQ_LINE = KVM_IRQ_LINE;
const unsigned long CKVM_IRQFD = KVM_IRQFD;
const unsigned long CKVM_IOEVENTFD = KVM_IOEVENTFD;
const unsigned long CKVM_RUN = KVM_RUN;
const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
// State save and restore (snapshots).
const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
const unsigned long CKVM_GET_XSAVE2 = KVM_GET_XSAVE2;
const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
const unsigned long CKVM_GET_PIT2 = KVM_GET_PIT2;
const unsigned long CKVM_SET_PIT2 = KVM_SET_PIT2;
const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
const unsigned long CKVM_KVMCLOCK_CTRL = KVM_KVMCLOCK_CTRL;
const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
const int CKVM_CAP_XSAVE2 = KVM_CAP_XSAVE2;

int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg) {
    int r;
    do { r = ioctl(fd, request, arg); } while (r < 0 && errno == EINTR && request != KVM_RUN);
    return r < 0 ? -errno : r;
}

int ckvm_ioctl_val(int fd, unsigned long request, unsigned long value) {
    int r;
    do { r = ioctl(fd, request, value); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

int ckvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int capacity) {
    if (capacity <= 0) return -EINVAL;
    size_t size = sizeof(struct kvm_cpuid2) + (size_t)capacity * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, size);
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)capacity;
    int r = ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c);
    if (r < 0) { r = -errno; free(c); return r; }
    int n = (int)c->nent;
    if (n > capacity) n = capacity;
    memcpy(entries, c->entries, (size_t)n * sizeof(struct kvm_cpuid_entry2));
    free(c);
    return n;
}

int ckvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int count) {
    if (count < 0) return -EINVAL;
    size_t size = sizeof(struct kvm_cpuid2) + (size_t)count * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, size);
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)count;
    memcpy(c->entries, entries, (size_t)count * sizeof(struct kvm_cpuid_entry2));
    int r = ioctl(vcpu_fd, KVM_SET_CPUID2, c);
    r = r < 0 ? -errno : r;
    free(c);
    return r;
}

static int msr_io(int vcpu_fd, unsigned long req, const struct kvm_msr_entry *entries, struct kvm_msr_entry *out, int count) {
    if (count < 0) return -EINVAL;
    size_t size = sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry);
    struct kvm_msrs *m = calloc(1, size);
    if (!m) return -ENOMEM;
    m->nmsrs = (uint32_t)count;
    memcpy(m->entries, entries, (size_t)count * sizeof(struct kvm_msr_entry));
    int r = ioctl(vcpu_fd, req, m);
    if (r >= 0 && out) memcpy(out, m->entries, (size_t)count * sizeof(struct kvm_msr_entry));
    r = r < 0 ? -errno : r;
    free(m);
    return r;
}

int ckvm_set_msrs(int vcpu_fd, const struct kvm_msr_entry *entries, int count) {
    return msr_io(vcpu_fd, KVM_SET_MSRS, entries, NULL, count);
}

int ckvm_get_msrs(int vcpu_fd, struct kvm_msr_entry *entries, int count) {
    return msr_io(vcpu_fd, KVM_GET_MSRS, entries, entries, count);
}

int ckvm_get_msr_index_list(int kvm_fd, uint32_t *indices, int capacity) {
    struct kvm_msr_list *list = calloc(1, sizeof(*list) + sizeof(uint32_t) * (size_t)capacity);
    if (!list) return -ENOMEM;
    list->nmsrs = (uint32_t)capacity;
    int r = ckvm_ioctl_ptr(kvm_fd, KVM_GET_MSR_INDEX_LIST, list);
    if (r >= 0) {
        r = (int)list->nmsrs;
        memcpy(indices, list->indices, sizeof(uint32_t) * (size_t)r);
    }
    free(list);
    return r;
}
