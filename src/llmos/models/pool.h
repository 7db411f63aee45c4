/* A persistent pool of worker threads for the kernels' parallel loops (a
 * processor-sharing dispatcher: the calling thread and its workers take turns
 * at one queue of chunks).
 *
 * Workers are created once, at the first parallel call. Between jobs a worker
 * spins for POOL_SPIN_NS on a generation counter, then sleeps on a condition
 * variable, so a decode step's hundred-odd products pay no thread start and an
 * idle engine burns no CPU. A job's items are cut into small chunks that every
 * participant claims one at a time, the caller included: a worker that the OS
 * has not scheduled (a busy machine) simply claims nothing, and the caller only
 * ever waits for chunks already in progress elsewhere (a few microseconds each),
 * never for a worker to wake up. This replaces a fork and join per call, where
 * one descheduled thread stalled every product of a step. When a worker is
 * descheduled in the middle of a chunk anyway, the caller notices the stall and
 * runs the next POOL_SOLO_JOBS jobs alone before sharing again.
 *
 * Guarantees: every item of a job runs exactly once, before pool_for returns;
 * which thread runs it does not change what it computes. One job runs at a
 * time; a call made while another thread's job runs (or with one thread, or
 * with too little work to share) runs all its items on the caller. After a
 * fork() the child starts its own workers at its first parallel call.
 */
#ifndef LLMOS_POOL_H
#define LLMOS_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define POOL_PAUSE() _mm_pause()
#else
#define POOL_PAUSE() ((void)0)
#endif
#ifndef POOL_YIELD
#define POOL_YIELD() sched_yield()
#endif

typedef void (*pool_task)(void *arg, int64_t begin, int64_t end);

#define POOL_MAX_THREADS 64
#ifndef POOL_SPIN_NS
#define POOL_SPIN_NS 50000 /* a worker's wait for the next job before it sleeps */
#endif
#define POOL_MIN_WORK 40000    /* jobs cheaper than this (in the caller's cost units) run alone */
#define POOL_CHUNK_WORK 20000  /* work per chunk: a few microseconds */
#define POOL_STALL_NS 200000   /* a wait this long for another thread's chunk: it was descheduled */
#define POOL_SOLO_JOBS 256    /* after a stall, this many jobs (two decode steps) run on the caller alone */

static struct {
    pthread_mutex_t job_lock;   /* held by the caller whose job is running */
    pthread_mutex_t sleep_lock; /* with `wake`: sleeping workers */
    pthread_cond_t wake;
    atomic_uint gen;            /* the current job's number; workers watch it */
    atomic_int sleepers;
    atomic_uint_fast64_t next;  /* (job number << 32) | next unclaimed chunk */
    atomic_llong done;          /* chunks of the current job finished */
    _Atomic(pool_task) fn;
    _Atomic(void *) arg;
    atomic_llong n, chunk, nchunks;
    atomic_int threads;         /* wanted, the caller included */
    int started;                /* workers created (guarded by job_lock) */
    int solo_left;              /* jobs still to run alone after a stall (guarded by job_lock) */
    unsigned last_gen;          /* guarded by job_lock */
} pool = {.job_lock = PTHREAD_MUTEX_INITIALIZER, .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

static int64_t pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim and run chunks of job g until none is left (or job g is over). */
static void pool_run_chunks(unsigned g) {
    const pool_task fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
    void *arg = atomic_load_explicit(&pool.arg, memory_order_relaxed);
    const int64_t n = atomic_load_explicit(&pool.n, memory_order_relaxed);
    const int64_t chunk = atomic_load_explicit(&pool.chunk, memory_order_relaxed);
    const int64_t nchunks = atomic_load_explicit(&pool.nchunks, memory_order_relaxed);
    for (;;) {
        uint_fast64_t v = atomic_load_explicit(&pool.next, memory_order_acquire);
        do { /* the job number in the claim discards fields read while the next job was set */
            if ((unsigned)(v >> 32) != g || (int64_t)(v & 0xffffffffu) >= nchunks) return;
        } while (!atomic_compare_exchange_weak_explicit(&pool.next, &v, v + 1, memory_order_acq_rel,
                                                        memory_order_acquire));
        const int64_t begin = (int64_t)(v & 0xffffffffu) * chunk;
        fn(arg, begin, begin + chunk < n ? begin + chunk : n);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static unsigned pool_wait_job(unsigned seen) {
    const int64_t t0 = pool_now_ns();
    for (int i = 1;; i++) {
        const unsigned g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (g != seen) return g;
        POOL_PAUSE();
        if (!(i & 15)) { /* a busy machine's other threads get this core (a quiet one returns at once) */
            if (pool_now_ns() - t0 > POOL_SPIN_NS) break;
            POOL_YIELD();
        }
    }
    unsigned g;
    pthread_mutex_lock(&pool.sleep_lock);
    atomic_fetch_add(&pool.sleepers, 1);
    while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.sleep_lock);
    return g;
}

static void *pool_worker(void *index) {
    const int me = (int)(intptr_t)index; /* worker me is thread me + 1: the caller is thread 0 */
    unsigned seen = atomic_load(&pool.gen);
    for (;;) {
        seen = pool_wait_job(seen);
        if (me + 1 < atomic_load_explicit(&pool.threads, memory_order_relaxed)) pool_run_chunks(seen);
    }
    return NULL;
}

static void pool_after_fork_in_child(void) {
    /* The child has none of the parent's workers; a job in flight cannot be (one caller forks). */
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.job_lock, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
}

static void pool_register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_after_fork_in_child); }

/* Called with job_lock held. */
static void pool_start_workers(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, pool_register_fork_handler);
    while (pool.started + 1 < threads) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, pool_worker, (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer workers: the caller does their share */
        pool.started++;
    }
}

/* The number of threads that share a job, the caller included (1 to POOL_MAX_THREADS). */
static void pool_set_threads(int threads) {
    atomic_store(&pool.threads, threads < 1 ? 1 : threads > POOL_MAX_THREADS ? POOL_MAX_THREADS : threads);
}

/* fn(arg, begin, end) over [0, n) in chunks; cost is one item's work (e.g. its multiply-adds). */
static void pool_for(int64_t n, int64_t cost, pool_task fn, void *arg) {
    if (n <= 0) return;
    const int threads = atomic_load_explicit(&pool.threads, memory_order_relaxed);
    if (threads <= 1 || n < 2 || n * cost < POOL_MIN_WORK || pthread_mutex_trylock(&pool.job_lock)) {
        fn(arg, 0, n);
        return;
    }
    if (pool.solo_left > 0) {
        pool.solo_left--;
        pthread_mutex_unlock(&pool.job_lock);
        fn(arg, 0, n);
        return;
    }
    if (pool.started + 1 < threads) pool_start_workers(threads);
    int64_t chunk = cost > 0 ? (POOL_CHUNK_WORK + cost - 1) / cost : n;
    const int64_t most = (n + 4 * threads - 1) / (4 * threads); /* at least ~4 chunks a thread */
    chunk = chunk < 1 ? 1 : chunk > most ? most : chunk;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.arg, arg, memory_order_relaxed);
    atomic_store_explicit(&pool.n, n, memory_order_relaxed);
    atomic_store_explicit(&pool.chunk, chunk, memory_order_relaxed);
    atomic_store_explicit(&pool.nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    const unsigned g = ++pool.last_gen;
    atomic_store_explicit(&pool.next, (uint_fast64_t)g << 32, memory_order_release);
    atomic_store(&pool.gen, g); /* sequentially consistent: pairs with a sleeper's count */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    pool_run_chunks(g);
    /* Only chunks another thread has claimed and is running remain. A thread that the OS
     * descheduled in one (a busy machine) stalls this job: then the next POOL_SOLO_JOBS run
     * on the caller alone, so a loaded machine costs one stall now and then, not one a job. */
    int64_t waited_since = 0;
    for (int i = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks; i++) {
        POOL_PAUSE();
        if (!(i & 255)) {
            const int64_t now = pool_now_ns();
            if (!waited_since) waited_since = now;
            else if (now - waited_since > POOL_STALL_NS) pool.solo_left = POOL_SOLO_JOBS;
            sched_yield();
        }
    }
    pthread_mutex_unlock(&pool.job_lock);
}

#endif
