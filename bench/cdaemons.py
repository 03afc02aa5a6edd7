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

SOURCES = {"echo3": (ECHO3, []), "first": (FIRST, []), "connbench": (CONNBENCH, ["-pthread"])}


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
