import KVM
