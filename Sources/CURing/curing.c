#include "curing.h"
#include <liburing.h>
#include <errno.h>
#include <stdlib.h>

struct curing_ring { struct io_uring ring; };

curing_ring *curing_create(unsigned entries, int *err) {
    curing_ring *r = calloc(1, sizeof(*r));
    if (!r) { if (err) *err = -ENOMEM; return NULL; }
    int rc = io_uring_queue_init(entries, &r->ring, 0);
    if (rc < 0) { if (err) *err = rc; free(r); return NULL; }
    if (err) *err = 0;
    return r;
}

void curing_destroy(curing_ring *ring) {
    if (!ring) return;
    io_uring_queue_exit(&ring->ring);
    free(ring);
}

int curing_fd(curing_ring *ring) { return ring->ring.ring_fd; }

int curing_register_eventfd(curing_ring *ring, int efd) { return io_uring_register_eventfd(&ring->ring, efd); }

int curing_prep_read(curing_ring *ring, int fd, void *buf, unsigned len, uint64_t offset, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_read(sqe, fd, buf, len, offset);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int curing_prep_write(curing_ring *ring, int fd, const void *buf, unsigned len, uint64_t offset, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_write(sqe, fd, buf, len, offset);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int curing_prep_fsync(curing_ring *ring, int fd, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int curing_submit(curing_ring *ring) { return io_uring_submit(&ring->ring); }

int curing_submit_and_wait(curing_ring *ring, unsigned wait_nr) { return io_uring_submit_and_wait(&ring->ring, wait_nr); }

int curing_reap(curing_ring *ring, uint64_t *user_data, int32_t *results, int max) {
    int n = 0;
    struct io_uring_cqe *cqe;
    while (n < max && io_uring_peek_cqe(&ring->ring, &cqe) == 0 && cqe) {
        user_data[n] = io_uring_cqe_get_data64(cqe);
        results[n] = cqe->res;
        io_uring_cqe_seen(&ring->ring, cqe);
        n++;
    }
    return n;
}

int curing_wait_one(curing_ring *ring, uint64_t *user_data, int32_t *result) {
    struct io_uring_cqe *cqe = NULL;
    int rc;
    do { rc = io_uring_wait_cqe(&ring->ring, &cqe); } while (rc == -EINTR);
    if (rc < 0) return rc;
    *user_data = io_uring_cqe_get_data64(cqe);
    *result = cqe->res;
    io_uring_cqe_seen(&ring->ring, cqe);
    return 0;
}

int curing_probe(void) {
    struct io_uring ring;
    int rc = io_uring_queue_init(2, &ring, 0);
    if (rc < 0) return rc;
    io_uring_queue_exit(&ring);
    return 1;
}
