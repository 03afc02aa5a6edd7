/*
 * activator._relay: the proxy's data path in C, in a thread of its own.
 *
 * The same relay as activator/proxy.py's Relay class (which is what runs when this
 * extension is not built): each connection is a client socket and a backend socket,
 * each direction splices through a pipe of its own (a buffer where splice cannot be
 * used), reads its source only when its pipe is empty and writes what it read at once,
 * passes a FIN on as shutdown(SHUT_WR), and ends both sockets on an error (a reset is
 * passed on as a reset).  Measured on the proxy benchmark (docs/proxy.md), the Python relay
 * costs 1.3 to 2 times the CPU time of this one per request and falls short of
 * systemd-socket-proxyd by up to 28 %; here a request on a kept connection costs one
 * epoll_wait and two splices per direction, and no Python at all.
 *
 * new(pipe_size) -> handle   a relay (epoll set, two eventfds), not running yet
 * run(handle)                the loop; releases the GIL; returns after stop()
 * stop(handle)               ask run() to return (from another thread)
 * add(handle, cfd, bfd, id, notify)
 *                            relay between a client socket and a connected non-blocking
 *                            backend socket; both are the relay's from then on (closed on
 *                            an error, which ends the connection as any other end). The
 *                            client socket is made non-blocking, with TCP_NODELAY for TCP.
 *                            With notify, its end makes fileno() readable.
 * fileno(handle) -> int      an eventfd, readable when a connection added with notify ended
 * ended(handle, ack) -> [(id, errno), ...]
 *                            the connections ended since the last call (errno 0: cleanly);
 *                            ack: also reset the eventfd (the caller was woken by it)
 * close(handle)              after run() returned: close every connection left
 *
 * add() runs in the caller's thread: it passes on what the client has sent already (most
 * often the whole request, so that the loop's thread is not woken for it) and registers both
 * sockets, holding the connection's own mutex, which the loop takes to handle an event of
 * that connection; from then on the connection is the loop's. A second mutex guards what
 * both threads touch: the list of connections, the list of ended ones and the pool of empty
 * pipes (creating a pipe and sizing it costs four system calls, closing it two more). The
 * loop never takes the GIL.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define CAPSULE "activator._relay"
#define ROUNDS 4          /* reads per event and direction: a busy connection yields to the others */
#define MAX_EVENTS 256
#define BUFFER_SIZE 65536 /* the copy fallback's buffer, per direction */
#define POOL_MAX 64       /* empty pipes kept for the next connections (two descriptors each) */
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

typedef struct flow {
    int src, dst;         /* the connection's sockets, not owned here */
    int pipe_r, pipe_w;   /* -1 in copy mode */
    char *buf;            /* copy mode */
    size_t cap, pending, start;
    unsigned char eof, shut;
} flow;

typedef struct conn {
    long long id;
    int cfd, bfd;
    uint32_t cmask, bmask; /* what each socket is registered for (0: not registered) */
    flow up, down;         /* client -> backend, backend -> client */
    int notify;            /* its end wakes Python */
    int dead;              /* ended in this batch: its later events in the batch are stale */
    int registered_once;   /* a socket of it has been in the epoll set */
    pthread_mutex_t lock;  /* held by add() while it registers, by the loop while it handles an event */
    struct conn *prev, *next;
} conn;

typedef struct ended_item {
    long long id;
    int err;
} ended_item;

typedef struct relay {
    int ep, wake, done;   /* epoll set; eventfd that wakes the loop (stop); eventfd for Python */
    size_t pipe_size;
    pthread_mutex_t lock; /* guards all, zombies, ended and pool */
    conn *all;            /* every connection */
    conn *zombies;        /* ended in add() once registered: the loop frees them */
    ended_item *ended;
    size_t n_ended, cap_ended;
    int pool[POOL_MAX][3]; /* read end, write end, capacity */
    size_t n_pool;
    volatile int stopping;
    int running;
} relay;

/* ------------------------------------------------------------------ pipes */
static int pipe_get(relay *r, int p[2], size_t *cap) {
    int size = 0;
    pthread_mutex_lock(&r->lock);
    if (r->n_pool > 0) {
        r->n_pool--;
        p[0] = r->pool[r->n_pool][0];
        p[1] = r->pool[r->n_pool][1];
        size = r->pool[r->n_pool][2];
    }
    pthread_mutex_unlock(&r->lock);
    if (!size) {
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
            return -1;
        size = fcntl(p[1], F_SETPIPE_SZ, (int)r->pipe_size);
        if (size < 0)  /* over the user's pipe quota: the default size works too, in more steps */
            size = fcntl(p[1], F_GETPIPE_SZ);
        if (size <= 0)
            size = 65536;
    }
    *cap = (size_t)size;
    return 0;
}

/* An empty pipe goes back to the pool (while there is room), any other is closed. */
static void pipe_put(relay *r, int pr, int pw, size_t cap, int empty) {
    if (empty) {
        pthread_mutex_lock(&r->lock);
        int kept = r->n_pool < POOL_MAX;
        if (kept) {
            r->pool[r->n_pool][0] = pr;
            r->pool[r->n_pool][1] = pw;
            r->pool[r->n_pool][2] = (int)cap;
            r->n_pool++;
        }
        pthread_mutex_unlock(&r->lock);
        if (kept)
            return;
    }
    close(pr);
    close(pw);
}

/* ------------------------------------------------------------------ one flow */
static int to_copy_mode(relay *r, flow *f) {
    char *buf = malloc(BUFFER_SIZE);
    if (!buf)
        return ENOMEM;
    if (f->pipe_r >= 0)
        pipe_put(r, f->pipe_r, f->pipe_w, f->cap, !f->pending);
    f->pipe_r = f->pipe_w = -1;
    f->buf = buf;
    f->cap = BUFFER_SIZE;
    return 0;
}

static int flow_init(relay *r, flow *f, int src, int dst) {
    int p[2];
    memset(f, 0, sizeof *f);
    f->src = src;
    f->dst = dst;
    f->pipe_r = f->pipe_w = -1;
    if (pipe_get(r, p, &f->cap) == 0) {
        f->pipe_r = p[0];
        f->pipe_w = p[1];
        return 0;
    }
    return to_copy_mode(r, f);  /* no descriptor for a pipe: copy */
}

static void flow_free(relay *r, flow *f) {
    if (f->pipe_r >= 0)
        pipe_put(r, f->pipe_r, f->pipe_w, f->cap, !f->pending);
    free(f->buf);
    f->pipe_r = f->pipe_w = -1;
    f->buf = NULL;
}

static int readable(const flow *f) { return !f->eof && !f->pending; }

/* Read what src has (nothing is pending): > 0 bytes, 0 EOF, -1 with errno (EAGAIN: nothing). */
static ssize_t fill(relay *r, flow *f) {
    ssize_t n;
    if (f->pipe_r >= 0) {
        n = splice(f->src, NULL, f->pipe_w, NULL, f->cap, SPLICE_FLAGS);
        if (n < 0 && errno == EINVAL) {  /* this socket type cannot splice */
            int err = to_copy_mode(r, f);
            if (err) {
                errno = err;
                return -1;
            }
            return fill(r, f);
        }
    } else {
        n = read(f->src, f->buf, f->cap);
        f->start = 0;
    }
    if (n > 0)
        f->pending = (size_t)n;
    return n;
}

/* Write what is pending: 0 when all of it went, EAGAIN when dst is full, else an errno. */
static int drain(flow *f) {
    while (f->pending) {
        ssize_t n;
        if (f->pipe_r >= 0) {
            n = splice(f->pipe_r, NULL, f->dst, NULL, f->pending, SPLICE_FLAGS);
        } else {
            n = send(f->dst, f->buf + f->start, f->pending, MSG_NOSIGNAL);
            if (n > 0)
                f->start += (size_t)n;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        f->pending -= (size_t)n;
    }
    return 0;
}

/* src's FIN, once everything before it is written: passed on, except when the other direction
   is done already: then the connection ends, and close() sends the FIN (one call fewer). */
static int pass_eof(flow *f, const flow *other) {
    if (f->pending || f->shut)
        return 0;
    f->shut = 1;
    if (other->shut)
        return 0;
    return shutdown(f->dst, SHUT_WR) < 0 ? errno : 0;
}

static int pump(relay *r, flow *f, const flow *other) {
    for (int i = 0; i < ROUNDS; i++) {
        ssize_t n = fill(r, f);
        if (n < 0)
            return (errno == EAGAIN || errno == EINTR) ? 0 : errno;
        if (n == 0) {
            f->eof = 1;
            return pass_eof(f, other);
        }
        int err = drain(f);
        if (err)
            return err == EAGAIN ? 0 : err;
        if ((size_t)n < f->cap)
            return 0;  /* the sender had no more for now */
    }
    return 0;
}

static int flush(relay *r, flow *f, const flow *other) {
    int err = drain(f);
    if (err)
        return err == EAGAIN ? 0 : err;
    return f->eof ? pass_eof(f, other) : pump(r, f, other);  /* it has most likely sent more meanwhile */
}

/* ------------------------------------------------------------ one connection */
static int watch(relay *r, int fd, uint64_t tag, uint32_t mask, uint32_t old) {
    struct epoll_event ev = {.events = mask, .data.u64 = tag};
    if (mask == old)
        return 0;
    int op = !mask ? EPOLL_CTL_DEL : !old ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    return epoll_ctl(r->ep, op, fd, &ev) < 0 ? errno : 0;
}

/* Watch each socket for what its flows wait for: reading when empty, writing when full. */
static int update(relay *r, conn *c) {
    uint32_t cmask = (readable(&c->up) ? EPOLLIN : 0) | (c->down.pending ? EPOLLOUT : 0);
    uint32_t bmask = (readable(&c->down) ? EPOLLIN : 0) | (c->up.pending ? EPOLLOUT : 0);
    c->registered_once |= cmask || bmask;
    int err = watch(r, c->cfd, (uint64_t)(uintptr_t)c, cmask, c->cmask);
    if (err)
        return err;
    c->cmask = cmask;
    err = watch(r, c->bfd, (uint64_t)(uintptr_t)c | 1, bmask, c->bmask);
    if (err)
        return err;
    c->bmask = bmask;
    return 0;
}

static void set_reset(int fd) {
    struct linger lg = {1, 0};
    int domain = 0;
    socklen_t len = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && (domain == AF_INET || domain == AF_INET6))
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

/* Close everything of the connection; with record, queue its end for Python. */
static void finish(relay *r, conn *c, int err, int record) {
    if (err == ECONNRESET || err == EPIPE) {
        set_reset(c->cfd);
        set_reset(c->bfd);
    }
    /* Unregistered before the close: a child between fork and exec may hold a copy of the
       descriptor, which would keep it in the set with a pointer to freed memory. */
    if (c->cmask)
        epoll_ctl(r->ep, EPOLL_CTL_DEL, c->cfd, NULL);
    if (c->bmask)
        epoll_ctl(r->ep, EPOLL_CTL_DEL, c->bfd, NULL);
    flow_free(r, &c->up);
    flow_free(r, &c->down);
    close(c->cfd);
    close(c->bfd);
    pthread_mutex_lock(&r->lock);
    if (c->prev)
        c->prev->next = c->next;
    else
        r->all = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (record) {
        if (r->n_ended == r->cap_ended) {
            size_t cap = r->cap_ended ? r->cap_ended * 2 : 64;
            ended_item *grown = realloc(r->ended, cap * sizeof *grown);
            if (grown) {
                r->ended = grown;
                r->cap_ended = cap;
            }
        }
        if (r->n_ended < r->cap_ended) {
            r->ended[r->n_ended].id = c->id;
            r->ended[r->n_ended].err = err;
            r->n_ended++;
        }  /* else: out of memory, the connection is closed all the same; Python misses its end */
    }
    pthread_mutex_unlock(&r->lock);
    c->dead = 1;  /* the caller frees it (the loop: after the batch, which may hold more events for it) */
}

static void free_conn(conn *c) {
    pthread_mutex_destroy(&c->lock);
    free(c);
}

static void on_event(relay *r, conn *c, int backend_side, uint32_t events) {
    flow *reading = backend_side ? &c->down : &c->up;  /* reads from the socket that has the event */
    flow *writing = backend_side ? &c->up : &c->down;  /* writes to it */
    int err = 0;
    if ((events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && writing->pending)
        err = flush(r, writing, reading);
    if (!err && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && readable(reading))
        err = pump(r, reading, writing);
    if (!err && c->up.shut && c->down.shut) {
        finish(r, c, 0, 1);
        return;
    }
    if (!err)
        err = update(r, c);
    if (err)
        finish(r, c, err, 1);
}

static void wake_python(relay *r) {
    uint64_t one = 1;
    if (write(r->done, &one, sizeof one) < 0) { /* EAGAIN: the counter is full, Python is told already */ }
}

/* ------------------------------------------------------------ Python API */
static relay *get(PyObject *capsule) {
    relay *r = PyCapsule_GetPointer(capsule, CAPSULE);
    if (r && r->ep < 0) {
        PyErr_SetString(PyExc_ValueError, "relay is closed");
        return NULL;
    }
    return r;
}

static void close_all(relay *r) {
    for (;;) {
        pthread_mutex_lock(&r->lock);
        conn *c = r->all;
        pthread_mutex_unlock(&r->lock);
        if (!c)
            break;
        finish(r, c, 0, 0);
        free_conn(c);
    }
    while (r->zombies) {
        conn *c = r->zombies;
        r->zombies = c->next;
        free_conn(c);
    }
    while (r->n_pool) {
        r->n_pool--;
        close(r->pool[r->n_pool][0]);
        close(r->pool[r->n_pool][1]);
    }
    close(r->ep);
    close(r->wake);
    close(r->done);
    r->ep = r->wake = r->done = -1;
}

static void destroy(PyObject *capsule) {
    relay *r = PyCapsule_GetPointer(capsule, CAPSULE);
    if (!r || r->running)
        return;  /* a running loop keeps its memory: the process is ending anyway */
    if (r->ep >= 0)
        close_all(r);
    pthread_mutex_destroy(&r->lock);
    free(r->ended);
    free(r);
}

static PyObject *relay_new(PyObject *self, PyObject *args) {
    long long pipe_size;
    if (!PyArg_ParseTuple(args, "L", &pipe_size))
        return NULL;
    relay *r = calloc(1, sizeof *r);
    if (!r)
        return PyErr_NoMemory();
    r->pipe_size = pipe_size > 0 ? (size_t)pipe_size : 65536;
    r->ep = epoll_create1(EPOLL_CLOEXEC);
    r->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->done = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};
    if (r->ep < 0 || r->wake < 0 || r->done < 0 || epoll_ctl(r->ep, EPOLL_CTL_ADD, r->wake, &ev) < 0) {
        int err = errno;
        if (r->ep >= 0) close(r->ep);
        if (r->wake >= 0) close(r->wake);
        if (r->done >= 0) close(r->done);
        free(r);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_mutex_init(&r->lock, NULL);
    PyObject *capsule = PyCapsule_New(r, CAPSULE, destroy);
    if (!capsule) {
        close_all(r);
        pthread_mutex_destroy(&r->lock);
        free(r);
    }
    return capsule;
}

static PyObject *relay_run(PyObject *self, PyObject *capsule) {
    relay *r = get(capsule);
    if (!r)
        return NULL;
    struct epoll_event events[MAX_EVENTS];
    int failure = 0;
    sigset_t all;
    sigfillset(&all);
    r->running = 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_sigmask(SIG_BLOCK, &all, NULL);  /* signals are the main thread's (the engine's loop) */
    while (!r->stopping) {
        int n = epoll_wait(r->ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            failure = errno;
            break;
        }
        conn *graveyard = NULL;  /* ended in this batch */
        int tell = 0;
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (!tag) {  /* stop() */
                uint64_t count;
                if (read(r->wake, &count, sizeof count) < 0) { /* EAGAIN: already read */ }
                continue;
            }
            conn *c = (conn *)(uintptr_t)(tag & ~(uint64_t)1);
            pthread_mutex_lock(&c->lock);
            int was_dead = c->dead;  /* it ended earlier in this batch, or in add() */
            if (!was_dead)
                on_event(r, c, (int)(tag & 1), events[i].events);
            pthread_mutex_unlock(&c->lock);
            if (!was_dead && c->dead) {
                tell |= c->notify;
                c->next = graveyard;  /* finish() unlinked it: next is free for this list */
                graveyard = c;
            }
        }
        while (graveyard) {
            conn *c = graveyard;
            graveyard = c->next;
            free_conn(c);
        }
        pthread_mutex_lock(&r->lock);
        conn *zombies = r->zombies;  /* no event of this batch is left to refer to them */
        r->zombies = NULL;
        pthread_mutex_unlock(&r->lock);
        while (zombies) {
            conn *c = zombies;
            zombies = c->next;
            free_conn(c);
        }
        if (tell)
            wake_python(r);
    }
    if (failure)  /* wake Python, which finds the thread gone */
        wake_python(r);
    Py_END_ALLOW_THREADS
    r->running = 0;
    if (failure) {
        errno = failure;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *relay_stop(PyObject *self, PyObject *capsule) {
    relay *r = get(capsule);
    if (!r)
        return NULL;
    uint64_t one = 1;
    r->stopping = 1;
    if (write(r->wake, &one, sizeof one) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *relay_add(PyObject *self, PyObject *args) {
    PyObject *capsule;
    int cfd, bfd, notify;
    long long id;
    if (!PyArg_ParseTuple(args, "OiiLp", &capsule, &cfd, &bfd, &id, &notify))
        return NULL;
    relay *r = get(capsule);
    if (!r)
        return NULL;
    int on = 1, domain = 0, err = 0;
    socklen_t len = sizeof domain;
    if (ioctl(cfd, FIONBIO, &on) < 0)
        err = errno;
    else if (getsockopt(cfd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && (domain == AF_INET || domain == AF_INET6))
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);  /* small writes go on as they come */
    conn *c = err ? NULL : calloc(1, sizeof *c);
    if (!err && !c)
        err = ENOMEM;
    if (c) {
        c->id = id;
        c->cfd = cfd;
        c->bfd = bfd;
        c->notify = notify;
        err = flow_init(r, &c->up, cfd, bfd);
        if (!err)
            err = flow_init(r, &c->down, bfd, cfd);
    }
    if (err) {
        if (c) {
            flow_free(r, &c->up);
            flow_free(r, &c->down);
            free(c);
        }
        close(cfd);  /* they were given to us */
        close(bfd);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_lock(&c->lock);  /* the loop may see an event as soon as one socket is registered */
    pthread_mutex_lock(&r->lock);
    c->next = r->all;
    if (r->all)
        r->all->prev = c;
    r->all = c;
    pthread_mutex_unlock(&r->lock);
    /* The client has most likely sent its request already: pass it on now rather than after a
       wake-up of the loop's thread. This also registers both sockets. */
    on_event(r, c, 0, EPOLLIN);
    int ended = c->dead, registered = c->registered_once;
    pthread_mutex_unlock(&c->lock);
    if (ended) {
        if (registered) {  /* the loop may hold an event for it: it frees it after its batch */
            pthread_mutex_lock(&r->lock);
            c->next = r->zombies;
            r->zombies = c;
            pthread_mutex_unlock(&r->lock);
        } else {
            free_conn(c);
        }
        if (notify)
            wake_python(r);
    }
    Py_RETURN_NONE;
}

static PyObject *relay_fileno(PyObject *self, PyObject *capsule) {
    relay *r = get(capsule);
    return r ? PyLong_FromLong(r->done) : NULL;
}

static PyObject *relay_ended(PyObject *self, PyObject *args) {
    PyObject *capsule;
    int ack;
    if (!PyArg_ParseTuple(args, "Op", &capsule, &ack))
        return NULL;
    relay *r = get(capsule);
    if (!r)
        return NULL;
    if (ack) {
        uint64_t count;
        if (read(r->done, &count, sizeof count) < 0) { /* EAGAIN: read already */ }
    }
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->n_ended; i++) {
        PyObject *item = Py_BuildValue("(Li)", r->ended[i].id, r->ended[i].err);
        if (!item || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            list = NULL;
            break;
        }
        Py_DECREF(item);
    }
    if (list)
        r->n_ended = 0;
    pthread_mutex_unlock(&r->lock);
    return list;
}

static PyObject *relay_close(PyObject *self, PyObject *capsule) {
    relay *r = PyCapsule_GetPointer(capsule, CAPSULE);
    if (!r)
        return NULL;
    if (r->running) {
        PyErr_SetString(PyExc_RuntimeError, "the relay is still running: stop() it and wait for run() to return");
        return NULL;
    }
    if (r->ep >= 0)
        close_all(r);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"new", relay_new, METH_VARARGS, "new(pipe_size) -> handle"},
    {"run", relay_run, METH_O, "run(handle): relay until stop(); releases the GIL"},
    {"stop", relay_stop, METH_O, "stop(handle): make run() return"},
    {"add", relay_add, METH_VARARGS,
     "add(handle, cfd, bfd, id, notify): relay between a client and a connected backend socket (now ours)"},
    {"fileno", relay_fileno, METH_O, "fileno(handle) -> eventfd readable when a notify connection has ended"},
    {"ended", relay_ended, METH_VARARGS, "ended(handle, ack) -> [(id, errno)] since the last call"},
    {"close", relay_close, METH_O, "close(handle): close every connection left (after run() returned)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_relay",
    .m_doc = "The proxy's data path (see activator/proxy.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__relay(void) { return PyModule_Create(&module); }
