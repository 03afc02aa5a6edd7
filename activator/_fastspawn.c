/*
 * activator._fastspawn: start a daemon the way glibc's posix_spawn does
 * (clone(CLONE_VM|CLONE_VFORK) on a private stack), with one addition that
 * posix_spawn cannot do: the child writes its own pid into LISTEN_PID= before
 * it calls execve, so the daemon's LISTEN_PID is exact.
 *
 * spawn(path, argv, envp, fd_map, listen_pid_index, setsid, cwd, uid, gid,
 *       groups, umask, reset_signals) -> pid
 *
 * Everything the child needs is converted to C arrays before the clone; the
 * child calls no Python API and allocates nothing.  It shares memory with the
 * (suspended) parent, so a failure is reported by storing errno and a step
 * code in a struct on the parent's stack, after which the child _exit(127)s
 * and the parent raises OSError(errno, strerror, step).
 *
 * Credentials are changed with raw system calls, not the glibc wrappers: in a
 * multithreaded process glibc's setuid()/setgid()/setgroups() broadcast the
 * change to every thread of the process ("setxid" signals), and a CLONE_VM
 * child still sees the parent's thread list, so the wrappers would act on the
 * parent's threads.  The kernel calls change only the calling task, which is
 * the whole (single-threaded) child.
 *
 * The GIL is held throughout: the child runs no Python code, and holding it
 * keeps every object whose buffer the child reads alive and unchanged.
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>

#ifndef __linux__
#error "activator._fastspawn is Linux-only"
#endif

/* 32-bit x86 and ARM have 16-bit-id legacy calls; use the 32-bit ones there. */
#ifdef SYS_setgroups32
#define FS_SYS_SETGROUPS SYS_setgroups32
#else
#define FS_SYS_SETGROUPS SYS_setgroups
#endif
#ifdef SYS_setgid32
#define FS_SYS_SETGID SYS_setgid32
#else
#define FS_SYS_SETGID SYS_setgid
#endif
#ifdef SYS_setuid32
#define FS_SYS_SETUID SYS_setuid32
#else
#define FS_SYS_SETUID SYS_setuid
#endif

#ifndef MAP_STACK
#define MAP_STACK 0
#endif

#define LISTEN_PID_PREFIX "LISTEN_PID="
#define LISTEN_PID_DIGITS 20
#define WATCHDOG_PID_PREFIX "WATCHDOG_PID="

/* The child needs little stack, but its first call to each libc function goes
 * through the dynamic linker's lazy binding, which saves the full vector
 * register state on the stack; pages are only touched when used. */
#define CHILD_STACK_SIZE (256 * 1024)

enum step {
    STEP_NONE = 0,
    STEP_EXEC,
    STEP_SETSID,
    STEP_DESCRIPTORS,
    STEP_CHDIR,
    STEP_SETGROUPS,
    STEP_SETGID,
    STEP_SETUID,
    STEP_UMASK,
};

static const char *const step_names[] = {
    [STEP_NONE] = "exec",  /* not used: an error always has a step */
    [STEP_EXEC] = "exec",
    [STEP_SETSID] = "setsid",
    [STEP_DESCRIPTORS] = "descriptors",
    [STEP_CHDIR] = "chdir",
    [STEP_SETGROUPS] = "setgroups",
    [STEP_SETGID] = "setgid",
    [STEP_SETUID] = "setuid",
    [STEP_UMASK] = "umask",
};

struct child_args {
    /* read by the child */
    const char *path;
    char *const *argv;
    char *const *envp;
    char *pid_digits[2];   /* where the child writes its pid (LISTEN_PID=, WATCHDOG_PID=), or NULL */
    const int *src;
    const int *dst;
    int nfds;
    int top;               /* first free number above every source and target */
    int do_setsid;
    const char *cwd;       /* or NULL */
    long long uid;         /* -1: keep */
    long long gid;         /* -1: keep */
    const gid_t *groups;
    long ngroups;          /* -1: keep */
    int umask_value;       /* -1: keep */
    sigset_t reset;        /* set to SIG_DFL even when ignored */
    /* written by the child, read by the parent after the clone returns */
    volatile int err;
    volatile int step;
};

/* Runs in the child, on its own stack, sharing memory with the suspended parent. */
static int
child_main(void *arg)
{
    struct child_args *a = (struct child_args *)arg;
    struct sigaction dfl, old;
    sigset_t empty;
    int sig, i;

    /* Signal handlers: a handler installed by the parent (Python's C-level
     * handler) must not run here, where it would write the parent's memory;
     * exec would reset it anyway.  The listed signals are reset even when
     * ignored, because an ignored disposition survives exec. */
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    for (sig = 1; sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (sigismember(&a->reset, sig) == 1) {
            (void)sigaction(sig, &dfl, NULL);
            continue;
        }
        if (sigaction(sig, NULL, &old) != 0)
            continue;  /* e.g. the C library's internal signals */
        if ((old.sa_flags & SA_SIGINFO) || (old.sa_handler != SIG_IGN && old.sa_handler != SIG_DFL))
            (void)sigaction(sig, &dfl, NULL);
    }
    sigemptyset(&empty);
    (void)sigprocmask(SIG_SETMASK, &empty, NULL);

    /* 1: a session of its own (setsid); 2: only a process group of its own (setpgid), which
     * keeps the child in our session and so in our scheduler autogroup. */
    if (a->do_setsid) {
        a->step = STEP_SETSID;
        if ((a->do_setsid == 2 ? setpgid(0, 0) : setsid()) == -1)
            goto fail;
    }

    /* Two steps, so that a source already sitting on a target number is never
     * clobbered: everything up above all sources and targets, then down. */
    a->step = STEP_DESCRIPTORS;
    for (i = 0; i < a->nfds; i++) {
        if (dup2(a->src[i], a->top + i) == -1)
            goto fail;
    }
    for (i = 0; i < a->nfds; i++) {
        /* dup2 leaves the target without close-on-exec */
        if (dup2(a->top + i, a->dst[i]) == -1)
            goto fail;
    }
    for (i = 0; i < a->nfds; i++)
        (void)close(a->top + i);

    if (a->umask_value >= 0) {
        a->step = STEP_UMASK;
        (void)umask((mode_t)a->umask_value);
    }
    if (a->cwd != NULL) {
        a->step = STEP_CHDIR;
        if (chdir(a->cwd) == -1)
            goto fail;
    }
    if (a->ngroups >= 0) {
        a->step = STEP_SETGROUPS;
        if (syscall(FS_SYS_SETGROUPS, (size_t)a->ngroups, a->groups) == -1)
            goto fail;
    }
    if (a->gid >= 0) {
        a->step = STEP_SETGID;
        if (syscall(FS_SYS_SETGID, (gid_t)a->gid) == -1)
            goto fail;
    }
    if (a->uid >= 0) {
        a->step = STEP_SETUID;
        if (syscall(FS_SYS_SETUID, (uid_t)a->uid) == -1)
            goto fail;
    }

    if (a->pid_digits[0] != NULL || a->pid_digits[1] != NULL) {
        /* getpid() through the kernel: never a cached value of the parent. */
        unsigned long long pid = (unsigned long long)syscall(SYS_getpid);
        char tmp[LISTEN_PID_DIGITS];
        int n = 0, k, slot;
        do {
            tmp[n++] = (char)('0' + (int)(pid % 10));
            pid /= 10;
        } while (pid != 0 && n < LISTEN_PID_DIGITS);
        for (slot = 0; slot < 2; slot++) {
            if (a->pid_digits[slot] == NULL)
                continue;
            for (k = 0; k < n; k++)
                a->pid_digits[slot][k] = tmp[n - 1 - k];
            a->pid_digits[slot][n] = '\0';
        }
    }

    a->step = STEP_EXEC;
    execve(a->path, a->argv, a->envp);

fail:
    a->err = errno ? errno : EIO;
    _exit(127);
    return 127;  /* not reached */
}

/* ---- argument conversion (parent, GIL held) ---- */

/* A NULL-terminated char* array pointing into the bytes items of `tuple`. */
static char **
bytes_array(PyObject *tuple, const char *what)
{
    Py_ssize_t n = PyTuple_Size(tuple), i;
    char **out;

    if (n < 0)
        return NULL;
    out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PyTuple_GetItem(tuple, i);
        char *s;
        Py_ssize_t len;
        if (item == NULL)
            goto error;
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s items must be bytes", what);
            goto error;
        }
        if (PyBytes_AsStringAndSize(item, &s, &len) < 0)
            goto error;
        if ((Py_ssize_t)strlen(s) != len) {
            PyErr_Format(PyExc_ValueError, "embedded null byte in %s", what);
            goto error;
        }
        out[i] = s;
    }
    out[n] = NULL;
    return out;
error:
    PyMem_Free(out);
    return NULL;
}

static int
long_in_range(PyObject *obj, long long lo, long long hi, long long *out, const char *what)
{
    long long v;

    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", what);
        return -1;
    }
    v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s out of range", what);
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *
raise_step(int err, const char *step)
{
    errno = err;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, step);
}

/* envp[index] must be exactly prefix ("NAME="): it is replaced by a buffer with room for the
 * child's pid, which the child writes before exec. index < 0: nothing to do. */
static int
pid_slot(PyObject *envp_t, char **envp, int index, const char *prefix, char **buf, char **digits)
{
    size_t len = strlen(prefix);

    if (index < 0)
        return 0;
    if (index >= PyTuple_Size(envp_t)) {
        PyErr_Format(PyExc_IndexError, "index of %s out of range", prefix);
        return -1;
    }
    if (strcmp(envp[index], prefix) != 0) {
        PyErr_Format(PyExc_ValueError, "envp[%d] must be b'%s'", index, prefix);
        return -1;
    }
    *buf = PyMem_Malloc(len + LISTEN_PID_DIGITS + 1);
    if (*buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*buf, prefix, len + 1);
    envp[index] = *buf;
    *digits = *buf + len;
    return 0;
}

static PyObject *
fastspawn_spawn(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {
        "path", "argv", "envp", "fd_map", "listen_pid_index", "setsid", "cwd",
        "uid", "gid", "groups", "umask", "reset_signals", "watchdog_pid_index", NULL,
    };
    const char *path;
    Py_ssize_t path_len;
    PyObject *argv_obj, *envp_obj, *fd_map_obj, *cwd_obj, *uid_obj, *gid_obj;
    PyObject *groups_obj, *reset_obj;
    int listen_pid_index, do_setsid, umask_value, watchdog_pid_index = -1;

    PyObject *argv_t = NULL, *envp_t = NULL, *fd_t = NULL, *groups_t = NULL, *reset_t = NULL;
    char **argv = NULL, **envp = NULL;
    char *pid_buf[2] = {NULL, NULL};
    int *fds = NULL;
    gid_t *groups = NULL;
    void *stack = MAP_FAILED;
    PyObject *result = NULL;

    struct child_args a;
    sigset_t all, old_mask;
    Py_ssize_t i, n;
    long long v;
    int top = 2;
    pid_t pid;
    int fork_err;

    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y#OOOiiOOOOiO|i:spawn", kwlist,
                                     &path, &path_len, &argv_obj, &envp_obj, &fd_map_obj,
                                     &listen_pid_index, &do_setsid, &cwd_obj, &uid_obj, &gid_obj,
                                     &groups_obj, &umask_value, &reset_obj, &watchdog_pid_index))
        return NULL;

    memset(&a, 0, sizeof(a));
    if ((Py_ssize_t)strlen(path) != path_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte in path");
        return NULL;
    }
    a.path = path;

    /* argv, envp: tuples own the items for the duration of the call */
    if ((argv_t = PySequence_Tuple(argv_obj)) == NULL)
        goto done;
    if ((argv = bytes_array(argv_t, "argv")) == NULL)
        goto done;
    if ((envp_t = PySequence_Tuple(envp_obj)) == NULL)
        goto done;
    if ((envp = bytes_array(envp_t, "envp")) == NULL)
        goto done;
    a.argv = argv;
    a.envp = envp;

    if (pid_slot(envp_t, envp, listen_pid_index, LISTEN_PID_PREFIX, &pid_buf[0], &a.pid_digits[0]) < 0
        || pid_slot(envp_t, envp, watchdog_pid_index, WATCHDOG_PID_PREFIX, &pid_buf[1], &a.pid_digits[1]) < 0)
        goto done;

    /* fd_map: [(source, target), ...] */
    if ((fd_t = PySequence_Tuple(fd_map_obj)) == NULL)
        goto done;
    n = PyTuple_Size(fd_t);
    if (n > 65536) {
        PyErr_SetString(PyExc_ValueError, "too many descriptors");
        goto done;
    }
    fds = PyMem_Calloc((size_t)n * 2 + 1, sizeof(int));
    if (fds == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GetItem(fd_t, i), *item;
        long long src, dst;
        if (pair == NULL)
            goto done;
        if (!PyTuple_Check(pair) || PyTuple_Size(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "fd_map items must be (source, target) tuples");
            goto done;
        }
        item = PyTuple_GetItem(pair, 0);
        if (item == NULL || long_in_range(item, 0, INT_MAX / 2, &src, "source descriptor") < 0)
            goto done;
        item = PyTuple_GetItem(pair, 1);
        if (item == NULL || long_in_range(item, 0, INT_MAX / 2, &dst, "target descriptor") < 0)
            goto done;
        fds[i] = (int)src;
        fds[n + i] = (int)dst;
        if (src > top)
            top = (int)src;
        if (dst > top)
            top = (int)dst;
    }
    a.src = fds;
    a.dst = fds + n;
    a.nfds = (int)n;
    a.top = top + 1;

    a.do_setsid = do_setsid;

    if (cwd_obj == Py_None) {
        a.cwd = NULL;
    } else if (PyBytes_Check(cwd_obj)) {
        char *s;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(cwd_obj, &s, &len) < 0)
            goto done;
        if ((Py_ssize_t)strlen(s) != len) {
            PyErr_SetString(PyExc_ValueError, "embedded null byte in cwd");
            goto done;
        }
        a.cwd = s;
    } else {
        PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
        goto done;
    }

    /* (uid_t)-1 is "no change" for the kernel too, so the largest valid id is 2**32 - 2 */
    if (long_in_range(uid_obj, -1, (long long)UINT32_MAX - 1, &v, "uid") < 0)
        goto done;
    a.uid = v;
    if (long_in_range(gid_obj, -1, (long long)UINT32_MAX - 1, &v, "gid") < 0)
        goto done;
    a.gid = v;

    a.ngroups = -1;
    if (groups_obj != Py_None) {
        if ((groups_t = PySequence_Tuple(groups_obj)) == NULL)
            goto done;
        n = PyTuple_Size(groups_t);
        if (n > 65536) {
            PyErr_SetString(PyExc_ValueError, "too many groups");
            goto done;
        }
        groups = PyMem_Calloc((size_t)n + 1, sizeof(gid_t));
        if (groups == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (i = 0; i < n; i++) {
            PyObject *item = PyTuple_GetItem(groups_t, i);
            if (item == NULL || long_in_range(item, 0, (long long)UINT32_MAX - 1, &v, "group") < 0)
                goto done;
            groups[i] = (gid_t)v;
        }
        a.groups = groups;
        a.ngroups = (long)n;
    }

    if (umask_value > 0777) {
        PyErr_SetString(PyExc_ValueError, "umask out of range");
        goto done;
    }
    a.umask_value = umask_value < 0 ? -1 : umask_value;

    sigemptyset(&a.reset);
    if ((reset_t = PySequence_Tuple(reset_obj)) == NULL)
        goto done;
    n = PyTuple_Size(reset_t);
    for (i = 0; i < n; i++) {
        PyObject *item = PyTuple_GetItem(reset_t, i);
        if (item == NULL || long_in_range(item, 1, NSIG - 1, &v, "signal number") < 0)
            goto done;
        sigaddset(&a.reset, (int)v);
    }

    a.err = 0;
    a.step = STEP_NONE;

    stack = mmap(NULL, CHILD_STACK_SIZE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE, -1, 0);
    if (stack == MAP_FAILED) {
        raise_step(errno, "fork");
        goto done;
    }

    /* No signal handler may run in the child while it shares our memory:
     * block everything across the clone; the child resets and unblocks. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old_mask);
#if defined(__hppa__)
    pid = clone(child_main, stack, CLONE_VM | CLONE_VFORK | SIGCHLD, &a);
#else
    pid = clone(child_main, (char *)stack + CHILD_STACK_SIZE, CLONE_VM | CLONE_VFORK | SIGCHLD, &a);
#endif
    fork_err = errno;
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);

    if (pid == -1) {
        raise_step(fork_err, "fork");
        goto done;
    }
    if (a.err != 0) {
        int err = a.err, step = a.step, status;
        while (waitpid(pid, &status, 0) == -1 && errno == EINTR)
            ;
        if (step <= STEP_NONE || step > STEP_UMASK)
            step = STEP_EXEC;
        raise_step(err, step_names[step]);
        goto done;
    }
    result = PyLong_FromLong((long)pid);

done:
    if (stack != MAP_FAILED)
        munmap(stack, CHILD_STACK_SIZE);
    PyMem_Free(pid_buf[0]);
    PyMem_Free(pid_buf[1]);
    PyMem_Free(groups);
    PyMem_Free(fds);
    PyMem_Free(envp);
    PyMem_Free(argv);
    Py_XDECREF(reset_t);
    Py_XDECREF(groups_t);
    Py_XDECREF(fd_t);
    Py_XDECREF(envp_t);
    Py_XDECREF(argv_t);
    return result;
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, fd_map, listen_pid_index, setsid, cwd, uid, gid, groups, umask, reset_signals) -> pid\n"
"\n"
"Start path with argv and envp (lists of bytes) in a vfork-style child and return its pid.\n"
"fd_map: [(source, target), ...] descriptors placed at their targets.\n"
"listen_pid_index: index of b'LISTEN_PID=' in envp, completed with the child's own pid; -1 for none.\n"
"watchdog_pid_index (optional): the same for b'WATCHDOG_PID='.\n"
"setsid: 0 keep our session and group, 1 a new session, 2 a new process group only.\n"
"cwd: bytes or None; uid, gid: -1 to keep; groups: list of ints or None; umask: -1 to keep.\n"
"reset_signals: signals set to SIG_DFL in the child even when ignored.\n"
"On failure raises OSError(errno, strerror, step), step being one of fork, setsid, descriptors,\n"
"umask, chdir, setgroups, setgid, setuid, exec.");

/* Here rather than through ctypes, which costs start-up time and memory in an init. */
static PyObject *
fastspawn_set_child_subreaper(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    if (prctl(PR_SET_CHILD_SUBREAPER, 1UL, 0UL, 0UL, 0UL) == -1)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(subreaper_doc,
"set_child_subreaper() -> None\n"
"\n"
"prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants become our children.");

static PyMethodDef fastspawn_methods[] = {
    {"spawn", (PyCFunction)(void (*)(void))fastspawn_spawn, METH_VARARGS | METH_KEYWORDS, spawn_doc},
    {"set_child_subreaper", fastspawn_set_child_subreaper, METH_NOARGS, subreaper_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastspawn_module = {
    PyModuleDef_HEAD_INIT,
    "activator._fastspawn",
    "vfork-style spawning with an exact LISTEN_PID (see activator.spawn).",
    0,
    fastspawn_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__fastspawn(void)
{
    return PyModuleDef_Init(&fastspawn_module);
}
