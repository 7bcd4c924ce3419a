// C shim for io_uring. liburing's header cannot be imported into Swift (it clashes
// with Glibc's fd_set), so it is included only in curing.c and the ring is opaque.
#ifndef CURING_H
#define CURING_H
#include <stdint.h>
#include <stddef.h>

typedef struct curing_ring curing_ring;

/// Creates a ring with `entries` submission slots. Returns NULL and sets *err to -errno on failure.
curing_ring *curing_create(unsigned entries, int *err);
void curing_destroy(curing_ring *ring);
/// The ring's file descriptor (for epoll / eventfd registration).
int curing_fd(curing_ring *ring);
/// Registers an eventfd that is signalled on every completion. Returns 0 or -errno.
int curing_register_eventfd(curing_ring *ring, int efd);

/// Queue a read/write/fsync. Returns 0, or -EBUSY when the submission queue is full.
int curing_prep_read(curing_ring *ring, int fd, void *buf, unsigned len, uint64_t offset, uint64_t user_data);
int curing_prep_write(curing_ring *ring, int fd, const void *buf, unsigned len, uint64_t offset, uint64_t user_data);
int curing_prep_fsync(curing_ring *ring, int fd, uint64_t user_data);
/// Submits queued entries. Returns the number submitted or -errno.
int curing_submit(curing_ring *ring);
/// Submits and waits for at least `wait_nr` completions. Returns submitted count or -errno.
int curing_submit_and_wait(curing_ring *ring, unsigned wait_nr);

/// Pops up to `max` completions without blocking. Returns how many were written.
int curing_reap(curing_ring *ring, uint64_t *user_data, int32_t *results, int max);
/// Blocks until one completion is available and pops it. Returns 0 or -errno.
int curing_wait_one(curing_ring *ring, uint64_t *user_data, int32_t *result);

/// 1 if io_uring can be set up here (probe ring), else -errno.
int curing_probe(void);

#endif
