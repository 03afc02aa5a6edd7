/*
 * activator._fastspawn: start a daemon the way glibc's posix_spawn does
 * (clone(CLONE_VM) on a private stack), with one addition that posix_spawn
 * cannot do: the child writes its own pid into LISTEN_PID= (and WATCHDOG_PID=)
 * before it calls execve, so the daemon's LISTEN_PID is exact.
 *
 * spawn(...) -> pid   waits until the child has exec'd (CLONE_VFORK) and raises
 *                     OSError(errno, strerror, step) when it could not.
 * start(...) -> pid   the same child, but returns as soon as it exists: the
 *                     kernel loads the program on another core while the caller
 *                     goes on (accepts the next connection).  How an exec failed
 *                     is asked for once the child is reaped: reaped(pid).
 *
 * Everything the child reads is copied, before the clone, into one block of
 * our own (a "record"): argv, envp, the descriptor moves, credentials.  The
 * child shares our memory, so it must write nothing of ours but its record.
 * Without CLONE_VFORK it runs *while* we run, on our thread's TLS, so it makes
 * no call into the C library at all: every step is a raw system call (inline
 * assembly, which never touches errno), and the compiler is kept from adding
 * calls of its own (CHILD_CODE: no stack protector; volatile stores where a
 * loop could become a memcpy).  Signals are blocked across the clone, so no
 * handler of ours can run in the child before it has reset them.
 *
 * Where the kernel has clone3 (Linux >= 5.5) the clone asks for
 * CLONE_CLEAR_SIGHAND: the kernel resets the child's handlers, and the child
 * only resets the 15 signals that may be ignored instead of reading all 64
 * dispositions (a system call costs about 0.3 us on the development machine, so
 * this was 20 us per start).  Where clone3 is refused (older kernels, Docker's
 * seccomp profile) glibc's clone() is used and the child reads them.
 *
 * When is a record free again?  The clone passes CLONE_CHILD_CLEARTID with the
 * record's `tid` word: the kernel zeroes that word when the child lets go of
 * our memory, which happens exactly when its exec has replaced the memory, or
 * when it exits (the same point at which vfork lets the parent run again).
 * Records are scanned for a zero word whenever start() or reaped() runs; no
 * timer, no pipe, no system call.  A child that failed leaves errno and the
 * step in its record before it exits; that pair is kept until reaped(pid)
 * claims it (bounded: the oldest are dropped beyond FAILURES_MAX).
 *
 * Credentials are changed with raw system calls, not the glibc wrappers: in a
 * multithreaded process glibc's setuid()/setgid()/setgroups() broadcast the
 * change to every thread of the process ("setxid" signals), and a CLONE_VM
 * child still sees the parent's thread list, so the wrappers would act on the
 * parent's threads.  The kernel calls change only the calling task, which is
 * the whole (single-threaded) child.
 *
 * The GIL is held throughout: it guards the record lists and the stack pool.
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
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

#if defined(__has_attribute)
#if __has_attribute(no_stack_protector)
#define CHILD_CODE __attribute__((no_stack_protector, noinline))
#endif
#endif
#ifndef CHILD_CODE
#define CHILD_CODE __attribute__((noinline))
#endif

/* ---- system calls ----
 * On x86_64 the child's system calls are made directly (inline assembly, which never touches
 * errno) and start() does not wait for the exec.  Elsewhere the C library is used: it writes
 * errno, which is harmless only while the parent thread is suspended, so start() waits there as
 * spawn() does (ASYNC is False).  (aarch64 would need the same two pieces of assembly.) */
#if defined(__x86_64__)
#define FS_ASYNC 1
static inline long
sys6(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#else
#define FS_ASYNC 0
static long
sys6(long n, long a, long b, long c, long d, long e, long f)
{
    long r = syscall(n, a, b, c, d, e, f);
    return r == -1 ? -errno : r;
}
#endif
#define sys0(n) sys6((n), 0, 0, 0, 0, 0, 0)
#define sys1(n, a) sys6((n), (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) sys6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) sys6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

/* Signals 1..64, as a bit set: the ones to reset even when ignored. */
#define SIG_LAST 64
typedef uint64_t sigbits_t;
#define SIG_BIT(sig) ((sigbits_t)1 << ((sig) - 1))

/* Signal dispositions and masks, in the child and around the clone. */
#if FS_ASYNC
/* The kernel's own sigaction and 64-signal set, as x86_64's rt_sigaction takes them. */
struct ksigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};
typedef uint64_t mask_t;

static void
block_all(mask_t *old)
{
    mask_t all = ~(mask_t)0;  /* the C library's internal signals too */
    (void)sys4(SYS_rt_sigprocmask, SIG_SETMASK, &all, old, sizeof(mask_t));
}

static void
restore_mask(const mask_t *old)
{
    (void)sys4(SYS_rt_sigprocmask, SIG_SETMASK, old, NULL, sizeof(mask_t));
}

static CHILD_CODE int
child_caught(int sig)
{
    struct ksigaction old;

    if (sys4(SYS_rt_sigaction, sig, NULL, &old, sizeof(uint64_t)) < 0)
        return 0;
    return (old.flags & SA_SIGINFO) || (old.handler != (void *)SIG_IGN && old.handler != (void *)SIG_DFL);
}

static CHILD_CODE void
child_default(int sig)
{
    struct ksigaction dfl;

    dfl.handler = (void *)SIG_DFL;
    dfl.flags = 0;
    dfl.restorer = NULL;
    dfl.mask = 0;
    (void)sys4(SYS_rt_sigaction, sig, &dfl, NULL, sizeof(uint64_t));
}

static CHILD_CODE void
child_unblock_all(void)
{
    uint64_t none = 0;

    (void)sys4(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof(uint64_t));
}
#else
typedef sigset_t mask_t;

static void
block_all(mask_t *old)
{
    sigset_t all;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, old);
}

static void
restore_mask(const mask_t *old)
{
    pthread_sigmask(SIG_SETMASK, old, NULL);
}

static int
child_caught(int sig)
{
    struct sigaction old;

    if (sigaction(sig, NULL, &old) != 0)
        return 0;  /* e.g. the C library's internal signals */
    return (old.sa_flags & SA_SIGINFO) || (old.sa_handler != SIG_IGN && old.sa_handler != SIG_DFL);
}

static void
child_default(int sig)
{
    struct sigaction dfl;

    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    (void)sigaction(sig, &dfl, NULL);
}

static void
child_unblock_all(void)
{
    sigset_t none;

    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
}
#endif

/* clone3 on a private stack.  The child comes back from the system call on the new stack, in
 * the middle of this function, so it is written in assembly: the child branch calls fn(arg)
 * and exits; only the parent returns (the pid, or -errno).  Without it, glibc's clone(). */
#define CLONE_ARGS_SIZE 64  /* CLONE_ARGS_SIZE_VER0: up to and including tls */
struct clone3_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};
#if FS_ASYNC && defined(SYS_clone3)
#define FS_CLONE3 1
static long
raw_clone3(struct clone3_args *cl, int (*fn)(void *), void *arg)
{
    register void *r12 __asm__("r12") = (void *)fn;
    register void *r13 __asm__("r13") = arg;
    long ret;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "xor %%ebp, %%ebp\n\t"   /* the child: the outermost frame */
                     "mov %%r13, %%rdi\n\t"
                     "call *%%r12\n\t"
                     "mov %%eax, %%edi\n\t"
                     "mov %[exit], %%eax\n\t"
                     "syscall\n\t"
                     "hlt\n\t"
                     "1:"
                     : "=a"(ret)
                     : "a"((long)SYS_clone3), "D"(cl), "S"((long)CLONE_ARGS_SIZE), "r"(r12), "r"(r13),
                       [exit] "i"(SYS_exit_group)
                     : "rcx", "r11", "memory");
    return ret;
}
#else
#define FS_CLONE3 0
#endif
#ifndef CLONE_CLEAR_SIGHAND
#define CLONE_CLEAR_SIGHAND 0x100000000ULL
#endif

#define PID_DIGITS 20
#define LISTEN_PID_PREFIX "LISTEN_PID="
#define WATCHDOG_PID_PREFIX "WATCHDOG_PID="

/* The child calls only raw system calls, so it needs little stack; a guard page below it
 * turns an overflow into a crash of the child instead of a write into our memory. */
#define CHILD_STACK_SIZE (64 * 1024)
#define STACK_POOL_MAX 16    /* stacks kept for reuse (mmap, mprotect and page faults saved) */
#define FAILURES_MAX 1024    /* exec failures kept for reaped() */

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
    int do_setsid;         /* 0 keep, 1 setsid(), 2 setpgid(0, 0) */
    const char *cwd;       /* or NULL */
    long uid;              /* -1: keep */
    long gid;              /* -1: keep */
    const gid_t *groups;
    long ngroups;          /* -1: keep */
    int umask_value;       /* -1: keep */
    sigbits_t reset;       /* set to SIG_DFL even when ignored */
    int handlers_cleared;  /* the kernel has reset every handler already (CLONE_CLEAR_SIGHAND) */
    /* written by the child */
    volatile int err;
    volatile int step;
};

/* One child's copy of everything it reads; the arrays and strings follow the struct. */
struct record {
    struct record *next;
    int tid;               /* non-zero until the kernel clears it (CLONE_CHILD_CLEARTID) */
    pid_t pid;
    void *stack;
    struct child_args a;
};

struct failure {
    pid_t pid;
    int err;
    int step;
};

/* Module state, guarded by the GIL. */
static struct record *started;            /* start()ed children not yet known to have exec'd */
static void *stack_pool[STACK_POOL_MAX];
static int stack_pool_n;
static struct failure failures[FAILURES_MAX];  /* a ring: failures_first is the oldest */
static int failures_first, failures_n;
static size_t page_size;

/* ---- the child: raw system calls only, and no write outside its record ---- */

static CHILD_CODE void
child_reset_signals(const struct child_args *a)
{
    int sig;

    /* A handler installed by the parent (Python's C-level handler) must not run here, where it
     * would write the parent's memory; exec would reset it anyway.  The listed signals are reset
     * even when ignored, because an ignored disposition survives exec.  After CLONE_CLEAR_SIGHAND
     * only those are left: 64 reads of the dispositions cost about 20 us. */
    for (sig = 1; sig <= SIG_LAST && sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if ((a->reset & SIG_BIT(sig)) || (!a->handlers_cleared && child_caught(sig)))
            child_default(sig);
    }
    child_unblock_all();
}

/* The decimal pid into each slot; volatile stores, so the compiler cannot turn it into a memcpy. */
static CHILD_CODE void
child_write_pid(const struct child_args *a)
{
    unsigned long pid = (unsigned long)sys0(SYS_getpid);  /* the kernel's: never a cached value */
    char tmp[PID_DIGITS];
    int n = 0, k, slot;

    do {
        tmp[n++] = (char)('0' + (int)(pid % 10));
        pid /= 10;
    } while (pid != 0 && n < PID_DIGITS);
    for (slot = 0; slot < 2; slot++) {
        volatile char *out = a->pid_digits[slot];
        if (out == NULL)
            continue;
        for (k = 0; k < n; k++)
            out[k] = tmp[n - 1 - k];
        out[n] = '\0';
    }
}

/* Runs in the child, on its own stack, sharing memory with the parent. */
static CHILD_CODE int
child_main(void *arg)
{
    struct child_args *a = (struct child_args *)arg;
    long r = 0;
    int i;

    child_reset_signals(a);

    /* 1: a session of its own (setsid); 2: only a process group of its own (setpgid), which
     * keeps the child in our session and so in our scheduler autogroup. */
    if (a->do_setsid) {
        a->step = STEP_SETSID;
        r = a->do_setsid == 2 ? sys2(SYS_setpgid, 0, 0) : sys0(SYS_setsid);
        if (r < 0)
            goto fail;
    }

    /* Two steps, so that a source already sitting on a target number is never
     * clobbered: everything up above all sources and targets, then down.  dup3 (aarch64 has
     * no dup2) never sees equal numbers here, and leaves the target without close-on-exec. */
    a->step = STEP_DESCRIPTORS;
    for (i = 0; i < a->nfds; i++) {
        if ((r = sys3(SYS_dup3, a->src[i], a->top + i, 0)) < 0)
            goto fail;
    }
    for (i = 0; i < a->nfds; i++) {
        if ((r = sys3(SYS_dup3, a->top + i, a->dst[i], 0)) < 0)
            goto fail;
    }
    for (i = 0; i < a->nfds; i++)
        (void)sys1(SYS_close, a->top + i);

    if (a->umask_value >= 0) {
        a->step = STEP_UMASK;
        (void)sys1(SYS_umask, a->umask_value);
    }
    if (a->cwd != NULL) {
        a->step = STEP_CHDIR;
        if ((r = sys1(SYS_chdir, a->cwd)) < 0)
            goto fail;
    }
    if (a->ngroups >= 0) {
        a->step = STEP_SETGROUPS;
        if ((r = sys2(FS_SYS_SETGROUPS, a->ngroups, a->groups)) < 0)
            goto fail;
    }
    if (a->gid >= 0) {
        a->step = STEP_SETGID;
        if ((r = sys1(FS_SYS_SETGID, a->gid)) < 0)
            goto fail;
    }
    if (a->uid >= 0) {
        a->step = STEP_SETUID;
        if ((r = sys1(FS_SYS_SETUID, a->uid)) < 0)
            goto fail;
    }
    if (a->pid_digits[0] != NULL || a->pid_digits[1] != NULL)
        child_write_pid(a);

    a->step = STEP_EXEC;
    r = sys3(SYS_execve, a->path, a->argv, a->envp);

fail:
    a->err = r < 0 && r > -4096 ? (int)-r : EIO;
    /* The parent reads err once the kernel has cleared the tid word (an acquire load there). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (;;)
        (void)sys1(SYS_exit_group, 127);
    return 127;  /* not reached */
}

/* ---- stacks ---- */

static void *
stack_get(void)
{
    void *base;

    if (stack_pool_n > 0)
        return stack_pool[--stack_pool_n];
    base = mmap(NULL, CHILD_STACK_SIZE + page_size, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
#if defined(__hppa__)
    /* the stack grows up: the guard page is the last one */
    if (mprotect((char *)base + CHILD_STACK_SIZE, page_size, PROT_NONE) != 0) {
#else
    if (mprotect(base, page_size, PROT_NONE) != 0) {
#endif
        munmap(base, CHILD_STACK_SIZE + page_size);
        return NULL;
    }
    return base;
}

static void
stack_put(void *base)
{
    if (base == NULL)
        return;
    if (stack_pool_n < STACK_POOL_MAX)
        stack_pool[stack_pool_n++] = base;
    else
        munmap(base, CHILD_STACK_SIZE + page_size);
}

static void *
stack_top(void *base)
{
#if defined(__hppa__)
    return base;
#else
    return (char *)base + page_size + CHILD_STACK_SIZE;
#endif
}

static void
record_free(struct record *r)
{
    stack_put(r->stack);
    free(r);
}

/* ---- failures kept for reaped() ---- */

static void
failure_add(pid_t pid, int err, int step)
{
    int slot;

    if (failures_n == FAILURES_MAX) {  /* nobody asked for the oldest one */
        failures_first = (failures_first + 1) % FAILURES_MAX;
        failures_n--;
    }
    slot = (failures_first + failures_n) % FAILURES_MAX;
    failures[slot].pid = pid;
    failures[slot].err = err;
    failures[slot].step = step;
    failures_n++;
}

/* Remove pid's failure; 1 and *out when there was one. */
static int
failure_take(pid_t pid, struct failure *out)
{
    int i, j;

    for (i = 0; i < failures_n; i++) {
        struct failure *f = &failures[(failures_first + i) % FAILURES_MAX];
        if (f->pid != pid)
            continue;
        *out = *f;
        for (j = i; j + 1 < failures_n; j++)  /* close the gap, keeping the order */
            failures[(failures_first + j) % FAILURES_MAX] = failures[(failures_first + j + 1) % FAILURES_MAX];
        failures_n--;
        return 1;
    }
    return 0;
}

/* ---- records of started children ---- */

/* The child no longer uses our memory: its exec replaced it, or it exited. */
static int
record_released(const struct record *r)
{
    return __atomic_load_n(&r->tid, __ATOMIC_ACQUIRE) == 0;
}

/* Unlink *link's record, keep its failure (if any) and free it. */
static void
record_retire(struct record **link)
{
    struct record *r = *link;

    *link = r->next;
    if (r->a.err != 0)
        failure_add(r->pid, r->a.err, r->a.step);
    record_free(r);
}

/* Free every record whose child has let go of our memory. */
static void
reclaim(void)
{
    struct record **link = &started;

    while (*link != NULL) {
        if (record_released(*link))
            record_retire(link);
        else
            link = &(*link)->next;
    }
}

/* Free the records of pid.  reused: a new child has just got this number, so the process the
 * records were for is gone.  Otherwise the caller says it has reaped pid; the record is freed
 * only when that is provably so (tid cleared, or pid no longer a live child of ours): a child
 * still running in our memory would otherwise write into freed memory. */
static void
forget(pid_t pid, int reused)
{
    struct record **link = &started;

    while (*link != NULL) {
        struct record *r = *link;
        if (r->pid == pid) {
            siginfo_t info;
            int gone = reused || record_released(r);
            if (!gone) {
                /* killed by a core-dumping signal: older kernels leave the word alone then */
                memset(&info, 0, sizeof(info));
                gone = waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) == -1 || info.si_pid == pid;
            }
            if (gone) {
                record_retire(link);
                continue;
            }
        }
        link = &r->next;
    }
}

static void
after_fork_in_child(void)
{
    /* A forked copy of us is not the parent of those children: drop (leak) their records there. */
    started = NULL;
    failures_n = 0;
}

/* ---- argument conversion (parent, GIL held) ---- */

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

/* A bytes item without NUL; its length in *len. */
static const char *
bytes_item(PyObject *item, const char *what, Py_ssize_t *len)
{
    char *s;

    if (!PyBytes_Check(item)) {
        PyErr_Format(PyExc_TypeError, "%s items must be bytes", what);
        return NULL;
    }
    if (PyBytes_AsStringAndSize(item, &s, len) < 0)
        return NULL;
    if ((Py_ssize_t)strlen(s) != *len) {
        PyErr_Format(PyExc_ValueError, "embedded null byte in %s", what);
        return NULL;
    }
    return s;
}

/* The checked Python arguments, before they are copied into a record. */
struct request {
    PyObject *argv_t, *envp_t, *fd_t, *groups_t, *reset_t;  /* owned tuples */
    const char *path;
    Py_ssize_t path_len;
    const char *cwd;
    Py_ssize_t cwd_len;
    int pid_index[2];      /* envp indexes of LISTEN_PID=, WATCHDOG_PID=, or -1 */
    int do_setsid;
    long uid, gid;
    int umask_value;
    sigbits_t reset;
    Py_ssize_t strings;    /* bytes of every string with its NUL, plus room for the pids */
};

static void
request_clear(struct request *q)
{
    Py_XDECREF(q->argv_t);
    Py_XDECREF(q->envp_t);
    Py_XDECREF(q->fd_t);
    Py_XDECREF(q->groups_t);
    Py_XDECREF(q->reset_t);
}

/* Check a tuple of bytes; adds their lengths to q->strings. */
static int
check_strings(struct request *q, PyObject *tuple, const char *what)
{
    Py_ssize_t i, n = PyTuple_Size(tuple), len;

    for (i = 0; i < n; i++) {
        if (bytes_item(PyTuple_GetItem(tuple, i), what, &len) == NULL)
            return -1;
        q->strings += len + 1;
    }
    return 0;
}

/* envp[index] must be exactly prefix ("NAME="); room for the pid is added. index < 0: none. */
static int
check_pid_slot(struct request *q, int index, const char *prefix)
{
    Py_ssize_t len;
    const char *s;

    if (index < 0)
        return 0;
    if (index >= PyTuple_Size(q->envp_t)) {
        PyErr_Format(PyExc_IndexError, "index of %s out of range", prefix);
        return -1;
    }
    s = bytes_item(PyTuple_GetItem(q->envp_t, index), "envp", &len);
    if (s == NULL)
        return -1;
    if (strcmp(s, prefix) != 0) {
        PyErr_Format(PyExc_ValueError, "envp[%d] must be b'%s'", index, prefix);
        return -1;
    }
    q->strings += PID_DIGITS;
    return 0;
}

/* obj as a tuple of at most 65536 items (stored in *out, owned by the request), or NULL. */
static PyObject *
bounded_tuple(PyObject *obj, PyObject **out, const char *what)
{
    if ((*out = PySequence_Tuple(obj)) == NULL)
        return NULL;
    if (PyTuple_Size(*out) > 65536) {
        PyErr_Format(PyExc_ValueError, "too many %s", what);
        return NULL;
    }
    return *out;
}

static int
check_fd_map(struct request *q, PyObject *fd_map_obj)
{
    Py_ssize_t i;
    long long v;

    if (bounded_tuple(fd_map_obj, &q->fd_t, "descriptors") == NULL)
        return -1;
    for (i = 0; i < PyTuple_Size(q->fd_t); i++) {
        PyObject *pair = PyTuple_GetItem(q->fd_t, i);
        if (!PyTuple_Check(pair) || PyTuple_Size(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "fd_map items must be (source, target) tuples");
            return -1;
        }
        if (long_in_range(PyTuple_GetItem(pair, 0), 0, INT_MAX / 2, &v, "source descriptor") < 0
            || long_in_range(PyTuple_GetItem(pair, 1), 0, INT_MAX / 2, &v, "target descriptor") < 0)
            return -1;
    }
    return 0;
}

/* Every item of tuple an int in [lo, hi]; with bits, each sets its bit (signal numbers). */
static int
check_ints(PyObject *tuple, long long lo, long long hi, const char *what, sigbits_t *bits)
{
    Py_ssize_t i;
    long long v;

    for (i = 0; i < PyTuple_Size(tuple); i++) {
        if (long_in_range(PyTuple_GetItem(tuple, i), lo, hi, &v, what) < 0)
            return -1;
        if (bits != NULL)
            *bits |= SIG_BIT(v);
    }
    return 0;
}

static int
check_groups(struct request *q, PyObject *groups_obj)
{
    if (groups_obj == Py_None)
        return 0;
    if (bounded_tuple(groups_obj, &q->groups_t, "groups") == NULL)
        return -1;
    return check_ints(q->groups_t, 0, (long long)UINT32_MAX - 1, "group", NULL);
}

static int
check_reset(struct request *q, PyObject *reset_obj)
{
    if (bounded_tuple(reset_obj, &q->reset_t, "signals") == NULL)
        return -1;
    return check_ints(q->reset_t, 1, SIG_LAST, "signal number", &q->reset);
}

static int
request_parse(struct request *q, PyObject *args, PyObject *kwargs, const char *format)
{
    static char *kwlist[] = {
        "path", "argv", "envp", "fd_map", "listen_pid_index", "setsid", "cwd",
        "uid", "gid", "groups", "umask", "reset_signals", "watchdog_pid_index", NULL,
    };
    PyObject *argv_obj, *envp_obj, *fd_map_obj, *cwd_obj, *uid_obj, *gid_obj, *groups_obj, *reset_obj;
    long long v;

    memset(q, 0, sizeof(*q));
    q->pid_index[1] = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, kwlist,
                                     &q->path, &q->path_len, &argv_obj, &envp_obj, &fd_map_obj,
                                     &q->pid_index[0], &q->do_setsid, &cwd_obj, &uid_obj, &gid_obj,
                                     &groups_obj, &q->umask_value, &reset_obj, &q->pid_index[1]))
        return -1;
    if ((Py_ssize_t)strlen(q->path) != q->path_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte in path");
        return -1;
    }
    q->strings = q->path_len + 1 + 2 * (PID_DIGITS + 1);
    if ((q->argv_t = PySequence_Tuple(argv_obj)) == NULL || check_strings(q, q->argv_t, "argv") < 0)
        return -1;
    if ((q->envp_t = PySequence_Tuple(envp_obj)) == NULL || check_strings(q, q->envp_t, "envp") < 0)
        return -1;
    if (check_pid_slot(q, q->pid_index[0], LISTEN_PID_PREFIX) < 0
        || check_pid_slot(q, q->pid_index[1], WATCHDOG_PID_PREFIX) < 0)
        return -1;
    if (check_fd_map(q, fd_map_obj) < 0)
        return -1;
    if (cwd_obj != Py_None) {
        if (!PyBytes_Check(cwd_obj)) {
            PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
            return -1;
        }
        if ((q->cwd = bytes_item(cwd_obj, "cwd", &q->cwd_len)) == NULL)
            return -1;
        q->strings += q->cwd_len + 1;
    }
    /* (uid_t)-1 is "no change" for the kernel too, so the largest valid id is 2**32 - 2 */
    if (long_in_range(uid_obj, -1, (long long)UINT32_MAX - 1, &v, "uid") < 0)
        return -1;
    q->uid = (long)v;
    if (long_in_range(gid_obj, -1, (long long)UINT32_MAX - 1, &v, "gid") < 0)
        return -1;
    q->gid = (long)v;
    if (check_groups(q, groups_obj) < 0)
        return -1;
    if (q->umask_value > 0777) {
        PyErr_SetString(PyExc_ValueError, "umask out of range");
        return -1;
    }
    if (q->umask_value < 0)
        q->umask_value = -1;
    return check_reset(q, reset_obj);
}

/* ---- building a record (everything checked: nothing here can fail but the allocation) ---- */

struct arena {
    char *pos;
};

static char *
arena_string(struct arena *ar, const char *s, size_t len, size_t room)
{
    char *out = ar->pos;

    memcpy(out, s, len);
    out[len] = '\0';
    ar->pos += len + 1 + room;
    return out;
}

static char **
copy_strings(struct arena *ar, char **array, PyObject *tuple)
{
    Py_ssize_t i, n = PyTuple_Size(tuple), len;
    char *s;

    for (i = 0; i < n; i++) {
        PyBytes_AsStringAndSize(PyTuple_GetItem(tuple, i), &s, &len);
        array[i] = arena_string(ar, s, (size_t)len, 0);
    }
    array[n] = NULL;
    return array;
}

static void
copy_fd_map(struct child_args *a, int *fds, PyObject *fd_t)
{
    Py_ssize_t i, n = PyTuple_Size(fd_t);
    int top = 2;

    for (i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GetItem(fd_t, i);
        int src = (int)PyLong_AsLong(PyTuple_GetItem(pair, 0));
        int dst = (int)PyLong_AsLong(PyTuple_GetItem(pair, 1));
        fds[i] = src;
        fds[n + i] = dst;
        if (src > top)
            top = src;
        if (dst > top)
            top = dst;
    }
    a->src = fds;
    a->dst = fds + n;
    a->nfds = (int)n;
    a->top = top + 1;
}

/* The pid slots: envp[index] re-pointed at a copy of prefix with room for the digits. */
static void
copy_pid_slots(struct arena *ar, struct child_args *a, char **envp, const int *index)
{
    static const char *const prefixes[2] = {LISTEN_PID_PREFIX, WATCHDOG_PID_PREFIX};
    int slot;

    for (slot = 0; slot < 2; slot++) {
        size_t len = strlen(prefixes[slot]);
        a->pid_digits[slot] = NULL;
        if (index[slot] < 0)
            continue;
        envp[index[slot]] = arena_string(ar, prefixes[slot], len, PID_DIGITS);
        a->pid_digits[slot] = envp[index[slot]] + len;
    }
}

static struct record *
record_build(const struct request *q)
{
    Py_ssize_t argc = PyTuple_Size(q->argv_t), envc = PyTuple_Size(q->envp_t);
    Py_ssize_t nfds = PyTuple_Size(q->fd_t);
    Py_ssize_t ngroups = q->groups_t != NULL ? PyTuple_Size(q->groups_t) : 0, i;
    size_t size = sizeof(struct record) + sizeof(char *) * (size_t)(argc + 1 + envc + 1)
                  + sizeof(int) * (size_t)(2 * nfds) + sizeof(gid_t) * (size_t)ngroups + (size_t)q->strings;
    struct record *r = malloc(size);
    struct child_args *a;
    struct arena ar;
    char **argv, **envp;
    int *fds;
    gid_t *groups;

    if (r == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memset(r, 0, sizeof(*r));
    a = &r->a;
    argv = (char **)(r + 1);
    envp = argv + argc + 1;
    fds = (int *)(envp + envc + 1);
    groups = (gid_t *)(fds + 2 * nfds);
    ar.pos = (char *)(groups + ngroups);

    a->path = arena_string(&ar, q->path, (size_t)q->path_len, 0);
    a->argv = copy_strings(&ar, argv, q->argv_t);
    a->envp = copy_strings(&ar, envp, q->envp_t);
    copy_pid_slots(&ar, a, envp, q->pid_index);
    copy_fd_map(a, fds, q->fd_t);
    a->cwd = q->cwd != NULL ? arena_string(&ar, q->cwd, (size_t)q->cwd_len, 0) : NULL;
    a->ngroups = -1;
    if (q->groups_t != NULL) {
        for (i = 0; i < ngroups; i++)
            groups[i] = (gid_t)PyLong_AsLongLong(PyTuple_GetItem(q->groups_t, i));
        a->groups = groups;
        a->ngroups = (long)ngroups;
    }
    a->do_setsid = q->do_setsid;
    a->uid = q->uid;
    a->gid = q->gid;
    a->umask_value = q->umask_value;
    a->reset = q->reset;
    return r;
}

/* ---- the clone ---- */

static PyObject *
raise_step(int err, int step)
{
    if (step <= STEP_NONE || step > STEP_UMASK)
        step = STEP_EXEC;
    errno = err;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, step_names[step]);
}

static int clone3_usable = FS_CLONE3;  /* cleared when the kernel (or seccomp) refuses it */

static pid_t
clone_child(struct record *r, int wait)
{
#if FS_CLONE3
    if (clone3_usable) {
        struct clone3_args cl;
        long pid;

        memset(&cl, 0, sizeof(cl));
        cl.flags = CLONE_VM | CLONE_CLEAR_SIGHAND | (wait ? CLONE_VFORK : CLONE_CHILD_CLEARTID);
        cl.child_tid = (uint64_t)(uintptr_t)&r->tid;
        cl.exit_signal = SIGCHLD;
        cl.stack = (uint64_t)(uintptr_t)((char *)r->stack + page_size);
        cl.stack_size = CHILD_STACK_SIZE;
        r->a.handlers_cleared = 1;
        pid = raw_clone3(&cl, child_main, &r->a);
        if (pid >= 0)
            return (pid_t)pid;
        if (pid != -ENOSYS && pid != -EINVAL && pid != -EPERM && pid != -E2BIG) {
            errno = (int)-pid;
            return -1;
        }
        clone3_usable = 0;  /* before Linux 5.5, or filtered: the C library's clone from now on */
    }
#endif
    r->a.handlers_cleared = 0;
    return clone(child_main, stack_top(r->stack), CLONE_VM | SIGCHLD | (wait ? CLONE_VFORK : CLONE_CHILD_CLEARTID),
                 &r->a, NULL, NULL, &r->tid);
}

/* Clone the child on r's stack; its pid, or -1 with errno.  wait: CLONE_VFORK. */
static pid_t
record_clone(struct record *r, int wait)
{
    mask_t old;
    pid_t pid;
    int err;

    if ((r->stack = stack_get()) == NULL)
        return -1;
    r->tid = 1;
    /* No signal handler may run in the child while it shares our memory: block everything
     * (the C library's internal signals too) across the clone; the child resets and unblocks. */
    block_all(&old);
    pid = clone_child(r, wait);
    err = errno;
    restore_mask(&old);
    errno = err;
    return pid;
}

/* The clone failed: nothing was started. */
static PyObject *
clone_failed(struct record *r)
{
    int err = errno ? errno : EAGAIN;

    record_free(r);
    errno = err;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "fork");
}

/* After a clone that waited for the exec: the pid, or how the child failed (it is reaped). */
static PyObject *
waited(struct record *r, pid_t pid)
{
    int err = r->a.err, step = r->a.step, status;

    record_free(r);
    if (err == 0)
        return PyLong_FromLong((long)pid);
    while (waitpid(pid, &status, 0) == -1 && errno == EINTR)
        ;
    return raise_step(err, step);
}

/* spawn(): wait for the exec; raise how it failed. */
static PyObject *
run_waiting(struct record *r)
{
    pid_t pid = record_clone(r, 1);

    return pid == -1 ? clone_failed(r) : waited(r, pid);
}

/* start(): the record stays until the child has let go of it. */
static PyObject *
run_started(struct record *r)
{
    struct failure stale;
    pid_t pid;

    reclaim();
    pid = record_clone(r, !FS_ASYNC);
    if (pid == -1)
        return clone_failed(r);
    if (!FS_ASYNC)  /* the exec is already over */
        return waited(r, pid);
    /* Whatever is still kept for an earlier process with this number: that one is long gone. */
    forget(pid, 1);
    (void)failure_take(pid, &stale);
    r->pid = pid;
    r->next = started;
    started = r;
    return PyLong_FromLong((long)pid);
}

static PyObject *
call(PyObject *args, PyObject *kwargs, const char *format, PyObject *(*run)(struct record *))
{
    struct request q;
    struct record *r;
    PyObject *result = NULL;

    if (request_parse(&q, args, kwargs, format) == 0 && (r = record_build(&q)) != NULL)
        result = run(r);
    request_clear(&q);
    return result;
}

static PyObject *
fastspawn_spawn(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    return call(args, kwargs, "y#OOOiiOOOOiO|i:spawn", run_waiting);
}

static PyObject *
fastspawn_start(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    return call(args, kwargs, "y#OOOiiOOOOiO|i:start", run_started);
}

static PyObject *
fastspawn_reaped(PyObject *module, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    struct failure f;

    (void)module;
    if (pid == -1 && PyErr_Occurred())
        return NULL;
    if (pid <= 0 || pid > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "pid out of range");
        return NULL;
    }
    reclaim();
    forget((pid_t)pid, 0);
    if (!failure_take((pid_t)pid, &f))
        Py_RETURN_NONE;
    if (f.step <= STEP_NONE || f.step > STEP_UMASK)
        f.step = STEP_EXEC;
    return Py_BuildValue("(is)", f.err, step_names[f.step]);
}

static PyObject *
fastspawn_pending(PyObject *module, PyObject *unused)
{
    struct record *r;
    long n = 0;

    (void)module;
    (void)unused;
    reclaim();
    for (r = started; r != NULL; r = r->next)
        n++;
    return Py_BuildValue("(ll)", n, (long)failures_n);
}

/* For the tests: the path taken where clone3 is refused (Linux < 5.5, or seccomp as in Docker). */
static PyObject *
fastspawn_set_clone3(PyObject *module, PyObject *arg)
{
    int want = PyObject_IsTrue(arg), old = clone3_usable;

    (void)module;
    if (want < 0)
        return NULL;
    clone3_usable = want && FS_CLONE3;
    return PyBool_FromLong(old);
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, fd_map, listen_pid_index, setsid, cwd, uid, gid, groups, umask, reset_signals\n"
"      [, watchdog_pid_index]) -> pid\n"
"\n"
"Start path with argv and envp (sequences of bytes) in a vfork-style child and return its pid\n"
"once it has exec'd.\n"
"fd_map: [(source, target), ...] descriptors placed at their targets.\n"
"listen_pid_index: index of b'LISTEN_PID=' in envp, completed with the child's own pid; -1 for none.\n"
"watchdog_pid_index (optional): the same for b'WATCHDOG_PID='.\n"
"setsid: 0 keep our session and group, 1 a new session, 2 a new process group only.\n"
"cwd: bytes or None; uid, gid: -1 to keep; groups: list of ints or None; umask: -1 to keep.\n"
"reset_signals: signals set to SIG_DFL in the child even when ignored.\n"
"On failure raises OSError(errno, strerror, step), step being one of fork, setsid, descriptors,\n"
"umask, chdir, setgroups, setgid, setuid, exec.");

PyDoc_STRVAR(start_doc,
"start(<the arguments of spawn>) -> pid\n"
"\n"
"Like spawn(), but returns as soon as the child exists, while it execs (where ASYNC is True).\n"
"The caller's descriptors may be closed at once (the child has its own table). OSError at once\n"
"only for arguments and fork failures; how a started child failed to exec is returned by\n"
"reaped(pid) once the caller has reaped it (it exits with status 127).");

PyDoc_STRVAR(reaped_doc,
"reaped(pid) -> None | (errno, step)\n"
"\n"
"The caller has reaped pid (a child of start()): forget it, and return how its start failed, if it did.");

PyDoc_STRVAR(pending_doc,
"pending() -> (records, failures)\n"
"\n"
"Children of start() still holding a copy of their arguments (not yet exec'd, or not yet noticed),\n"
"and exec failures not yet claimed by reaped().");

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

/* After start-up: the heap that parsing and binding freed goes back to the system (an init's idle
   resident memory). Here rather than through ctypes, which would cost more than it gives back. */
static PyObject *
fastspawn_trim(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
#ifdef __GLIBC__
    return PyBool_FromLong(malloc_trim(0));
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(trim_doc,
"trim() -> bool\n"
"\n"
"malloc_trim(0) where the C library is glibc: True when memory was given back.");

static PyMethodDef fastspawn_methods[] = {
    {"spawn", (PyCFunction)(void (*)(void))fastspawn_spawn, METH_VARARGS | METH_KEYWORDS, spawn_doc},
    {"start", (PyCFunction)(void (*)(void))fastspawn_start, METH_VARARGS | METH_KEYWORDS, start_doc},
    {"reaped", fastspawn_reaped, METH_O, reaped_doc},
    {"pending", fastspawn_pending, METH_NOARGS, pending_doc},
    {"set_child_subreaper", fastspawn_set_child_subreaper, METH_NOARGS, subreaper_doc},
    {"trim", fastspawn_trim, METH_NOARGS, trim_doc},
    {"_set_clone3", fastspawn_set_clone3, METH_O,
     "_set_clone3(flag) -> previous: use clone3 (CLONE_CLEAR_SIGHAND) where the kernel has it (tests only)."},
    {NULL, NULL, 0, NULL},
};

static int
fastspawn_exec(PyObject *module)
{
    static int once;

    if (!once) {
        long ps = sysconf(_SC_PAGESIZE);
        page_size = ps > 0 ? (size_t)ps : 4096;
        if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return -1;
        }
        once = 1;
    }
    return PyModule_AddIntConstant(module, "ASYNC", FS_ASYNC);
}

static PyModuleDef_Slot fastspawn_slots[] = {
    {Py_mod_exec, fastspawn_exec},
    {0, NULL},
};

static struct PyModuleDef fastspawn_module = {
    PyModuleDef_HEAD_INIT,
    "activator._fastspawn",
    "vfork-style spawning with an exact LISTEN_PID (see activator.spawn).",
    0,
    fastspawn_methods,
    fastspawn_slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__fastspawn(void)
{
    return PyModuleDef_Init(&fastspawn_module);
}
