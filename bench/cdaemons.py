"""Tiny C helpers compiled at bench time (gcc) into a temporary directory.

They keep the daemon and the client out of the measurement: the same small
program runs under every launcher, and the load generator is not Python.

* ``echo3``: accept-mode daemon with the connection at fd 3 (LISTEN_FDS=1):
  copies fd 3 to fd 3 until EOF. Checks LISTEN_PID == getpid() when LISTEN_FDS is set.
* ``first``: Accept=no daemon: polls the LISTEN_FDS listening sockets, accepts one
  connection, writes one byte, exits.
* ``connbench``: load generator: T threads, each opening one new TCP connection
  per request (connect, send, shut down writing, read the echo to EOF), for a
  bounded time and count; prints ``ok errors elapsed_seconds``.
* ``pxbackend``: the proxy group's backend: binds IPV4:PORT itself (knows nothing of
  LISTEN_FDS), a thread per connection; the first byte picks echo (``e``) or a
  source of N zero bytes (``s`` and N as 8 bytes, little-endian).
* ``pxclient``: the proxy group's load generator: ``rr`` (T kept connections, each
  sending SIZE bytes and reading them back, again and again), ``conn`` (a new
  connection per request of SIZE bytes, the reply read, closed; no half-close, which
  systemd-socket-proxyd does not pass on) or ``bulk`` (T connections each reading a
  SIZE-byte stream); prints ``count errors elapsed_seconds`` (count: requests, or bytes).
"""
from __future__ import annotations

import os
import shutil
import subprocess

ECHO3 = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    const char *pid = getenv("LISTEN_PID"), *n = getenv("LISTEN_FDS");
    if (n && (!pid || atoi(pid) != (int)getpid())) return 3;   /* wrong LISTEN_PID: protocol broken */
    char buf[4096];
    for (;;) {
        ssize_t r = read(3, buf, sizeof buf);
        if (r <= 0) return r < 0;
        for (ssize_t off = 0; off < r;) {
            ssize_t w = write(3, buf + off, r - off);
            if (w <= 0) return 1;
            off += w;
        }
    }
}
"""

FIRST = r"""
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    const char *pid = getenv("LISTEN_PID"), *n = getenv("LISTEN_FDS");
    if (!n || !pid || atoi(pid) != (int)getpid()) return 3;
    int nfds = atoi(n);
    if (nfds < 1) return 3;
    struct pollfd *p = calloc(nfds, sizeof *p);
    for (int i = 0; i < nfds; i++) { p[i].fd = 3 + i; p[i].events = POLLIN; }
    if (poll(p, nfds, 30000) <= 0) return 4;
    for (int i = 0; i < nfds; i++) {
        if (p[i].revents & POLLIN) {
            int c = accept(p[i].fd, NULL, NULL);
            if (c < 0) return 5;
            if (write(c, "x", 1) != 1) return 6;
            close(c);
            return 0;
        }
    }
    return 7;
}
"""

CONNBENCH = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in addr;
static double deadline;
static long max_total;
static long total_ok, total_err;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int one(void) {
    static const char msg[] = "ping\n";
    char buf[64];
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return 0;
    struct timeval tv = {5, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int ok = 0;
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) == 0 && write(s, msg, 5) == 5 && shutdown(s, SHUT_WR) == 0) {
        size_t got = 0;
        for (;;) {
            ssize_t r = read(s, buf + got, sizeof buf - got);
            if (r <= 0) { ok = r == 0 && got == 5 && memcmp(buf, msg, 5) == 0; break; }
            got += r;
            if (got >= sizeof buf) break;
        }
    }
    close(s);
    return ok;
}

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        int stop = total_ok + total_err >= max_total;
        pthread_mutex_unlock(&lock);
        if (stop || now() >= deadline) break;
        int ok = one();
        pthread_mutex_lock(&lock);
        if (ok) total_ok++; else total_err++;
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: connbench IPV4 PORT THREADS SECONDS MAXCONN\n"); return 2; }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) return 2;
    int threads = atoi(argv[3]);
    max_total = atol(argv[5]);
    double start = now();
    deadline = start + atof(argv[4]);
    pthread_t t[64];
    if (threads < 1 || threads > 64) return 2;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("%ld %ld %.6f\n", total_ok, total_err, now() - start);
    return 0;
}
"""

PXBACKEND = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char zeros[1 << 18];

static int readn(int s, void *b, size_t n) {
    for (size_t got = 0; got < n;) {
        ssize_t r = read(s, (char *)b + got, n - got);
        if (r <= 0) return -1;
        got += r;
    }
    return 0;
}

static void *conn(void *arg) {
    int s = (int)(intptr_t)arg, one = 1;
    char mode;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (readn(s, &mode, 1) == 0 && mode == 'e') {
        static __thread char buf[65536];
        for (;;) {
            ssize_t r = read(s, buf, sizeof buf);
            if (r <= 0) break;
            for (ssize_t off = 0; off < r;) {
                ssize_t w = write(s, buf + off, r - off);
                if (w <= 0) goto out;
                off += w;
            }
        }
    } else if (mode == 's') {
        uint64_t n;
        if (readn(s, &n, 8) == 0)
            while (n) {
                ssize_t w = write(s, zeros, n < sizeof zeros ? n : sizeof zeros);
                if (w <= 0) break;
                n -= w;
            }
    }
out:
    close(s);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: pxbackend IPV4 PORT\n"); return 2; }
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) { perror("pxbackend: bind"); return 1; }
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 256 * 1024);
    for (;;) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        pthread_t t;
        if (pthread_create(&t, &at, conn, (void *)(intptr_t)c)) close(c);
    }
}
"""

PXCLIENT = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in addr;
static double deadline;
static long size;
static const char *mode;
static long total_ok, total_err;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int dial(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (s < 0) return -1;
    struct timeval tv = {10, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr)) { close(s); return -1; }
    return s;
}

static int writen(int s, const char *b, size_t n) {
    while (n) { ssize_t w = write(s, b, n); if (w <= 0) return -1; b += w; n -= w; }
    return 0;
}

static int readn(int s, char *b, size_t n) {
    while (n) { ssize_t r = read(s, b, n); if (r <= 0) return -1; b += r; n -= r; }
    return 0;
}

static void add(long ok, long err) {
    pthread_mutex_lock(&lock);
    total_ok += ok;
    total_err += err;
    pthread_mutex_unlock(&lock);
}

static void *worker(void *arg) {
    (void)arg;
    char *msg = malloc(size + 1), *back = malloc(size + 1);
    memset(msg, 'x', size + 1);
    msg[0] = 'e';
    if (!strcmp(mode, "rr")) {
        int s = dial();
        long ok = 0;
        if (s < 0 || writen(s, "e", 1)) { add(0, 1); if (s >= 0) close(s); return NULL; }
        while (now() < deadline) {
            if (writen(s, msg + 1, size) || readn(s, back, size)) { add(ok, 1); close(s); return NULL; }
            ok++;
        }
        close(s);
        add(ok, 0);
    } else if (!strcmp(mode, "conn")) {
        while (now() < deadline) {
            int s = dial(), good = s >= 0 && !writen(s, msg, size + 1) && !readn(s, back, size);
            if (s >= 0) close(s);
            add(good, !good);
        }
    } else {
        static char buf[1 << 18];
        int s = dial();
        char req[9];
        uint64_t n = size;
        req[0] = 's';
        memcpy(req + 1, &n, 8);
        if (s < 0 || writen(s, req, 9)) { add(0, 1); if (s >= 0) close(s); return NULL; }
        long got = 0;
        for (;;) { ssize_t r = read(s, buf, sizeof buf); if (r <= 0) break; got += r; }
        close(s);
        add(got, got != size);
    }
    free(msg);
    free(back);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 7) { fprintf(stderr, "usage: pxclient IPV4 PORT rr|conn|bulk THREADS SECONDS SIZE\n"); return 2; }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) return 2;
    mode = argv[3];
    int threads = atoi(argv[4]);
    size = atol(argv[6]);
    if (threads < 1 || threads > 256 || size < 1) return 2;
    double start = now();
    deadline = start + atof(argv[5]);
    pthread_t t[256];
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("%ld %ld %.6f\n", total_ok, total_err, now() - start);
    return 0;
}
"""

SOURCES = {"echo3": (ECHO3, []), "first": (FIRST, []), "connbench": (CONNBENCH, ["-pthread"]),
           "pxbackend": (PXBACKEND, ["-pthread"]), "pxclient": (PXCLIENT, ["-pthread"])}


class BuildError(Exception):
    pass


def build(directory: str) -> dict[str, str]:
    """Compile every helper into ``directory``; returns name -> path."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BuildError("no C compiler (gcc) found: install gcc")
    paths = {}
    for name, (source, flags) in SOURCES.items():
        src = os.path.join(directory, name + ".c")
        out = os.path.join(directory, name)
        with open(src, "w") as f:
            f.write(source)
        proc = subprocess.run([cc, "-O2", "-o", out, src, *flags], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise BuildError(f"cannot compile {name}: {proc.stderr.strip()}")
        paths[name] = out
    return paths
