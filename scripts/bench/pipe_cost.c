/* What a write(2) to a pipe costs inside a TVM guest, next to /dev/null and
 * the pieces around it (docs/performance.md, "Where a pipe write's cost goes").
 * Run it in a guest:  tvm run --time-limit 120s scripts/bench/pipe_cost.c -- 200000 3
 * argv[1]: writes per case; argv[2]: rounds (the cases alternate within each
 * round, and each case keeps its best round, so host load mostly cancels).
 * "self-drain/K": no reader thread; the writer empties its own pipe every K
 * writes (the drain's time is in the total and shown apart). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long N = 200000;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static char line[4096];
static char sink[1 << 20];

/* drain: the writer empties its own pipe every `every` writes (no reader thread). */
static double run_fd(int wfd, int rfd, size_t len, long every, double *drain_s) {
    memset(line, '7', len); line[len - 1] = '\n';
    double d = 0, t0 = now();
    for (long i = 0; i < N; i++) {
        if (write(wfd, line, len) < 0 && wfd >= 0) { perror("write"); exit(1); }
        if (rfd >= 0 && (i + 1) % every == 0) {
            double a = now();
            long left = every * (long)len;
            while (left > 0) { ssize_t n = read(rfd, sink, sizeof sink); if (n <= 0) break; left -= n; }
            d += now() - a;
        }
    }
    double t = now() - t0;
    if (rfd >= 0) { int n; ioctl(rfd, FIONREAD, &n); while (n > 0) { ssize_t r = read(rfd, sink, sizeof sink); if (r <= 0) break; n -= r; } }
    if (drain_s) *drain_s = d;
    return t;
}

static int reader_fd; static volatile int reader_stop; static long reader_wakeups; static long reader_sleep_us;
static void *reader(void *arg) {
    (void)arg;
    for (;;) {
        ssize_t n = read(reader_fd, sink, sizeof sink);
        if (n <= 0) return NULL;
        reader_wakeups++;
        if (reader_sleep_us) usleep(reader_sleep_us);
        int left; /* drain what came meanwhile */
        while (ioctl(reader_fd, FIONREAD, &left) == 0 && left > 0) { if (read(reader_fd, sink, sizeof sink) <= 0) return NULL; }
    }
}

static double run_reader(long sleep_us, long pipesz, long *wakeups) {
    int p[2]; if (pipe(p)) exit(1);
    if (pipesz) fcntl(p[1], F_SETPIPE_SZ, pipesz);
    reader_fd = p[0]; reader_wakeups = 0; reader_sleep_us = sleep_us;
    pthread_t th; pthread_create(&th, NULL, reader, NULL);
    usleep(20000);
    double t = run_fd(p[1], -1, 7, 1, NULL);
    close(p[1]); pthread_join(th, NULL); close(p[0]);
    *wakeups = reader_wakeups;
    return t;
}

int main(int argc, char **argv) {
    if (argc > 1) N = atol(argv[1]);
    int rounds = argc > 2 ? atoi(argv[2]) : 3;
    int null = open("/dev/null", O_WRONLY);
    int p64[2], p1m[2], sp[2];
    if (pipe(p64) || pipe(p1m) || socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) return 1;
    long got = fcntl(p1m[1], F_SETPIPE_SZ, 1 << 20);
    int sz = 1 << 20; setsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz); setsockopt(sp[1], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    printf("N=%ld writes per case, pipe 1M size=%ld\n", N, got);
    const char *names[] = {"getppid (syscall floor)", "write(-1) EBADF", "write /dev/null 7B", "write pipe 0B (64K)",
        "write pipe 7B 64K, self-drain/4096", "write pipe 7B 1M, self-drain/4096", "write pipe 7B 1M, self-drain/65536",
        "write pipe 1B 1M, self-drain/4096", "write pipe 64B 1M, self-drain/4096", "write pipe 512B 1M, self-drain/1024",
        "write /dev/null 512B", "unix stream 7B, self-drain/64", "pipe 1M + reader thread, 5 ms sleep", "pipe 1M + reader thread, no sleep"};
    enum { K = 14 };
    double best[K], drainbest[K]; long wk[K];
    for (int k = 0; k < K; k++) { best[k] = 1e9; drainbest[k] = 0; wk[k] = 0; }
    for (int r = 0; r < rounds; r++) {
        for (int k = 0; k < K; k++) {
            double t = 0, d = 0;
            switch (k) {
            case 0: { double t0 = now(); for (long i = 0; i < N; i++) syscall(SYS_getppid); t = now() - t0; break; }
            case 1: t = run_fd(-1, -1, 7, 1, NULL); break;
            case 2: t = run_fd(null, -1, 7, 1, NULL); break;
            case 3: { double t0 = now(); for (long i = 0; i < N; i++) write(p64[1], line, 0); t = now() - t0; break; }
            case 4: t = run_fd(p64[1], p64[0], 7, 4096, &d); break;
            case 5: t = run_fd(p1m[1], p1m[0], 7, 4096, &d); break;
            case 6: t = run_fd(p1m[1], p1m[0], 7, 65536, &d); break;
            case 7: t = run_fd(p1m[1], p1m[0], 1, 4096, &d); break;
            case 8: t = run_fd(p1m[1], p1m[0], 64, 4096, &d); break;
            case 9: t = run_fd(p1m[1], p1m[0], 512, 1024, &d); break;
            case 10: t = run_fd(null, -1, 512, 1, NULL); break;
            case 11: t = run_fd(sp[0], sp[1], 7, 64, &d); break;
            case 12: t = run_reader(5000, 1 << 20, &wk[k]); break;
            case 13: t = run_reader(0, 1 << 20, &wk[k]); break;
            }
            if (t < best[k]) { best[k] = t; drainbest[k] = d; }
        }
    }
    double base = best[2];
    printf("%-40s %10s %12s %10s %12s\n", "case (best of rounds)", "ns/write", "writes/s", "x null7B", "drain ns/w");
    for (int k = 0; k < K; k++)
        printf("%-40s %10.0f %12.0f %10.2f %12.0f\n", names[k], best[k] / N * 1e9, N / best[k], best[k] / base,
               drainbest[k] / N * 1e9);
    printf("reader wakeups: sleep5ms=%ld nosleep=%ld\n", wk[12], wk[13]);
    return 0;
}
