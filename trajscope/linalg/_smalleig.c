/* Eigenvalues of many small real symmetric float32 matrices, vectorised across matrices.
 *
 * LAPACK solves one matrix at a time; below n ~ 150 its ssytrd + ssterf are latency-bound
 * (~60 us for n = 64 on a current x86 core). Here 16 matrices are interleaved (element (r, c)
 * of matrix t at A[(r n + c) 16 + t]) so every arithmetic step is one SIMD operation over the
 * 16 matrices, with no branches that differ between them:
 *
 *   1. scale each matrix by a power of two so that max |K_rc| lies in [1/2, 1) (exact);
 *   2. Householder reduction to tridiagonal T = Q^T K Q (lower triangle, as LAPACK's ssytd2);
 *   3. every eigenvalue of T by bisection on Sturm counts (as LAPACK's sstebz, with its pivmin
 *      safeguard), all eigenvalues of all 16 matrices advancing together.
 *
 * Both steps are backward stable: the results are the exact eigenvalues of K + E with
 * ||E|| = O(n eps ||K||), the same guarantee as LAPACK's. Bisection stops at an absolute
 * width of 2 eps ||T||, where ||T|| is T's Gershgorin bound. Non-finite input is the
 * caller's business: that matrix's values are then meaningless (never a crash or a hang, and
 * the other matrices of its block are unaffected).
 *
 * Python: _smalleig.eigvalsh(src, dst, batch, n) with src a C-contiguous float32 buffer of
 * batch * n * n (symmetric matrices; the lower triangle is read) and dst a writable float32
 * buffer of batch * n, filled with each matrix's eigenvalues in ascending order. The GIL is
 * released while it runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define L 16 /* matrices per SIMD block */
#define LANES for (int t = 0; t < L; t++)
#define MAXF(a, b) ((a) > (b) ? (a) : (b)) /* not fmaxf: that is a libm call, not vectorised */
#define MINF(a, b) ((a) < (b) ? (a) : (b))
typedef float vec[L];

#if defined(_MSC_VER)
#define RESTRICT __restrict
#define INLINE static __forceinline
#else
#define RESTRICT __restrict__
#define INLINE static inline __attribute__((always_inline))
#endif

/* One compiled clone per x86-64 level, picked at load time (glibc ifunc; "arch=" clones need
   GCC 12). Elsewhere one baseline build, still ~1.5x LAPACK. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__GLIBC__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Scratch: per thread, grown on demand and kept while the thread lives (POSIX), since a fresh
   block per call would be mmap'ed and page-faulted each time, which costs as much as solving
   16 matrices of order 64. Blocks over KEEP_FLOATS (n > ~250) are allocated per call: they are
   rare and their solve dwarfs the allocation. Elsewhere one block per call. */
#define KEEP_FLOATS ((size_t)1 << 20)
#if defined(_WIN32)
static float *get_scratch(size_t len) { return (float *)malloc(sizeof(float) * len); }
static void put_scratch(float *p, size_t len) { (void)len; free(p); }
#else
#include <pthread.h>
typedef struct { float *p; size_t len; } scratch_t;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void free_scratch(void *s) {
    free(((scratch_t *)s)->p);
    free(s);
}
static void make_scratch_key(void) { (void)pthread_key_create(&scratch_key, free_scratch); }
static float *get_scratch(size_t len) {
    if (len > KEEP_FLOATS) return (float *)malloc(sizeof(float) * len);
    (void)pthread_once(&scratch_once, make_scratch_key);
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (!s) {
        s = (scratch_t *)calloc(1, sizeof(scratch_t));
        if (!s) return NULL;
        if (pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (len > s->len) {
        float *p = (float *)realloc(s->p, sizeof(float) * len);
        if (!p) return NULL;
        s->p = p;
        s->len = len;
    }
    return s->p;
}
static void put_scratch(float *p, size_t len) {
    if (len > KEEP_FLOATS) free(p);
}
#endif

#define AT(A, n, r, c) ((A) + ((size_t)(r) * (n) + (c)) * L)

/* Householder reduction of the interleaved lower triangles in A (destroyed) to tridiagonal:
 * diagonal d[i], off-diagonal e[i] between i and i + 1. v, w: n * L scratch. */
INLINE void tridiagonalize(float *RESTRICT A, int n, float *RESTRICT d, float *RESTRICT e,
                           float *RESTRICT v, float *RESTRICT w) {
    for (int i = 0; i < n - 2; i++) {
        const int m = n - i - 1; /* order of the trailing block A22 = A[i+1:, i+1:] */
        vec alpha, s, tau;
        const float *aii = AT(A, n, i, i), *x0 = AT(A, n, i + 1, i);
#pragma omp simd
        LANES { d[i * L + t] = aii[t]; alpha[t] = x0[t]; s[t] = 0.f; }
        for (int j = 1; j < m; j++) {
            const float *x = AT(A, n, i + 1 + j, i);
#pragma omp simd
            LANES s[t] += x[t] * x[t];
        }
        /* reflector H = I - tau v v^T with v[0] = 1 maps x = A[i+1:, i] to beta e_1;
           where x[1:] = 0 already, tau = 0 (H = I) */
        vec scal;
#pragma omp simd
        LANES {
            const float nrm = sqrtf(alpha[t] * alpha[t] + s[t]);
            const float beta = alpha[t] >= 0.f ? -nrm : nrm;
            /* ||x[1:]|| < 2^-51 max|K|: treat it as 0 (a backward error far below eps ||K||);
               a smaller sum of squares loses precision to underflow */
            const int nz = s[t] >= FLT_MIN / FLT_EPSILON;
            tau[t] = nz ? (beta - alpha[t]) / (nz ? beta : 1.f) : 0.f;
            scal[t] = nz ? 1.f / (nz ? alpha[t] - beta : 1.f) : 0.f;
            e[i * L + t] = nz ? beta : alpha[t];
            v[t] = 1.f;
        }
        for (int j = 1; j < m; j++) {
            const float *x = AT(A, n, i + 1 + j, i);
#pragma omp simd
            LANES v[j * L + t] = x[t] * scal[t];
        }
        /* w = tau A22 v (symmetric product from the lower triangle) */
        float *A22 = AT(A, n, i + 1, i + 1);
        memset(w, 0, sizeof(float) * (size_t)m * L);
        for (int r = 0; r < m; r++) {
            const float *ar = A22 + (size_t)r * n * L, *vr = v + r * L;
            float *wr = w + r * L;
            vec acc;
#pragma omp simd
            LANES acc[t] = ar[r * L + t] * vr[t];
            for (int c = 0; c < r; c++) {
                const float *a = ar + c * L, *vc = v + c * L;
                float *wc = w + c * L;
#pragma omp simd
                LANES { acc[t] += a[t] * vc[t]; wc[t] += a[t] * vr[t]; }
            }
#pragma omp simd
            LANES wr[t] += acc[t];
        }
        /* w <- w - (tau/2)(w^T v) v, then A22 <- A22 - v w^T - w v^T */
        vec h;
#pragma omp simd
        LANES h[t] = 0.f;
        for (int r = 0; r < m; r++) {
#pragma omp simd
            LANES { w[r * L + t] *= tau[t]; h[t] += w[r * L + t] * v[r * L + t]; }
        }
#pragma omp simd
        LANES h[t] *= 0.5f * tau[t];
        for (int r = 0; r < m; r++) {
#pragma omp simd
            LANES w[r * L + t] -= h[t] * v[r * L + t];
        }
        for (int r = 0; r < m; r++) {
            float *ar = A22 + (size_t)r * n * L;
            const float *vr = v + r * L, *wr = w + r * L;
            for (int c = 0; c <= r; c++) {
                float *a = ar + c * L;
                const float *vc = v + c * L, *wc = w + c * L;
#pragma omp simd
                LANES a[t] -= vr[t] * wc[t] + wr[t] * vc[t];
            }
        }
    }
    if (n >= 2) {
        const float *a = AT(A, n, n - 2, n - 2), *b = AT(A, n, n - 1, n - 2);
#pragma omp simd
        LANES { d[(n - 2) * L + t] = a[t]; e[(n - 2) * L + t] = b[t]; }
    }
    const float *a = AT(A, n, n - 1, n - 1);
#pragma omp simd
    LANES d[(n - 1) * L + t] = a[t];
}

/* All eigenvalues of the tridiagonals (d, e) by bisection: the eigenvalue of index l lies where
 * the Sturm count (the number of negative pivots of T - x I, i.e. of eigenvalues below x)
 * passes l. ev, lo, hi, x, q, cnt: n * L scratch; e2: n * L. */
INLINE void bisect(const float *RESTRICT d, const float *RESTRICT e, int n, float *RESTRICT ev,
                   float *RESTRICT e2, float *RESTRICT lo, float *RESTRICT hi, float *RESTRICT x,
                   float *RESTRICT q, float *RESTRICT cnt) {
    vec gl, gu, pivmin, tol;
#pragma omp simd
    LANES { gl[t] = INFINITY; gu[t] = -INFINITY; pivmin[t] = 1.f; }
    for (int j = 0; j < n; j++) {
#pragma omp simd
        LANES {
            const float r = (j > 0 ? fabsf(e[(j - 1) * L + t]) : 0.f)
                          + (j < n - 1 ? fabsf(e[j * L + t]) : 0.f);
            gl[t] = MINF(gl[t], d[j * L + t] - r);
            gu[t] = MAXF(gu[t], d[j * L + t] + r);
            if (j < n - 1) {
                const float sq = e[j * L + t] * e[j * L + t];
                e2[j * L + t] = sq;
                pivmin[t] = MAXF(pivmin[t], sq);
            }
        }
    }
    int its = 1; /* halvings until every interval is under its tolerance */
    LANES {
        const float tn = MAXF(fabsf(gl[t]), fabsf(gu[t]));
        pivmin[t] *= FLT_MIN;                       /* LAPACK's pivot safeguard */
        tol[t] = 2.f * FLT_EPSILON * tn + 2.f * pivmin[t];
        gl[t] -= tol[t];
        gu[t] += tol[t];
        const float width = gu[t] - gl[t];
        while (its < 64 && ldexpf(width, -its) > tol[t]) its++;
    }
    for (int l = 0; l < n; l++) {
#pragma omp simd
        LANES { lo[l * L + t] = gl[t]; hi[l * L + t] = gu[t]; }
    }
    for (int it = 0; it < its; it++) {
        for (int l = 0; l < n; l++) {
            float *xl = x + l * L, *ql = q + l * L, *cl = cnt + l * L;
            const float *lol = lo + l * L, *hil = hi + l * L;
#pragma omp simd
            LANES {
                const float xm = 0.5f * (lol[t] + hil[t]);
                float u = d[t] - xm;
                u = fabsf(u) < pivmin[t] ? -pivmin[t] : u;
                xl[t] = xm; ql[t] = u; cl[t] = u < 0.f ? 1.f : 0.f;
            }
        }
        for (int j = 1; j < n; j++) { /* every (l, matrix) pair is an independent recurrence */
            const float *dj = d + j * L, *ej = e2 + (j - 1) * L;
            for (int l = 0; l < n; l++) {
                const float *xl = x + l * L;
                float *ql = q + l * L, *cl = cnt + l * L;
#pragma omp simd
                LANES {
                    float u = (dj[t] - xl[t]) - ej[t] / ql[t];
                    u = fabsf(u) < pivmin[t] ? -pivmin[t] : u;
                    ql[t] = u; cl[t] += u < 0.f ? 1.f : 0.f;
                }
            }
        }
        for (int l = 0; l < n; l++) {
            const float *xl = x + l * L, *cl = cnt + l * L;
            float *lol = lo + l * L, *hil = hi + l * L;
            const float lf = (float)l;
#pragma omp simd
            LANES { if (cl[t] > lf) hil[t] = xl[t]; else lol[t] = xl[t]; }
        }
    }
    for (int l = 0; l < n; l++) { /* midpoints, made non-decreasing (moves them < tol) */
#pragma omp simd
        LANES {
            const float m = 0.5f * (lo[l * L + t] + hi[l * L + t]);
            ev[l * L + t] = l > 0 ? MAXF(m, ev[(l - 1) * L + t]) : m;
        }
    }
}

CLONES static int eigvalsh_batch(const float *K, Py_ssize_t nb, int n, float *out) {
    const size_t nn = (size_t)n * n;
    if (nb == 0) return 0;
    const size_t len = L * (nn + 11 * (size_t)n);
    float *A = get_scratch(len);
    if (!A) return -1;
    float *d = A + nn * L, *e = d + n * L, *v = e + n * L, *w = v + n * L, *e2 = w + n * L,
          *ev = e2 + n * L, *lo = ev + n * L, *hi = lo + n * L, *x = hi + n * L, *q = x + n * L,
          *cnt = q + n * L;
    for (Py_ssize_t b0 = 0; b0 < nb; b0 += L) {
        const int nl = nb - b0 < L ? (int)(nb - b0) : L;
        int ex[L], zero[L];
        for (int t = 0; t < L; t++) { /* interleave, scaled by 2^-ex so that max |K| < 1 */
            float *a = A + t;
            ex[t] = 0;
            zero[t] = 1;
            if (t >= nl) {
                for (int r = 0; r < n; r++)
                    for (int c = 0; c <= r; c++) a[((size_t)r * n + c) * L] = 0.f;
                continue;
            }
            const float *Kb = K + (size_t)(b0 + t) * nn;
            float mx = 0.f;
            for (int r = 0; r < n; r++) {
                const float *row = Kb + (size_t)r * n;
#pragma omp simd reduction(max : mx)
                for (int c = 0; c <= r; c++) mx = MAXF(mx, fabsf(row[c]));
            }
            zero[t] = !(mx > 0.f);
            if (!zero[t]) frexpf(mx, &ex[t]);
            /* 2^-ex in two exact steps: for subnormal max|K|, 2^-ex alone overflows */
            const float sc1 = ldexpf(1.f, -ex[t] / 2), sc2 = ldexpf(1.f, -ex[t] - (-ex[t] / 2));
            for (int r = 0; r < n; r++)
                for (int c = 0; c <= r; c++)
                    a[((size_t)r * n + c) * L] = Kb[(size_t)r * n + c] * sc1 * sc2;
        }
        tridiagonalize(A, n, d, e, v, w);
        bisect(d, e, n, ev, e2, lo, hi, x, q, cnt);
        for (int t = 0; t < nl; t++) {
            float *o = out + (size_t)(b0 + t) * n;
            for (int l = 0; l < n; l++) o[l] = zero[t] ? 0.f : ldexpf(ev[l * L + t], ex[t]);
        }
    }
    put_scratch(A, len);
    return 0;
}

static int float32_buffer(PyObject *obj, Py_buffer *view, int writable) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) != 0)
        return -1;
    if (view->itemsize != 4 || !view->format || (strcmp(view->format, "f") && strcmp(view->format, "<f")
                                                 && strcmp(view->format, "=f"))) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "eigvalsh: buffers must hold float32");
        return -1;
    }
    return 0;
}

static PyObject *py_eigvalsh(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_buffer src, dst;
    Py_ssize_t nb;
    int n, rc;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOni", &src_obj, &dst_obj, &nb, &n)) return NULL;
    if (nb < 0 || n < 1 || (size_t)n > 16384 || (size_t)nb > (size_t)PY_SSIZE_T_MAX / (sizeof(float) * (size_t)n * n)) {
        PyErr_SetString(PyExc_ValueError, "eigvalsh: batch or n out of range");
        return NULL;
    }
    if (float32_buffer(src_obj, &src, 0) != 0) return NULL;
    if (float32_buffer(dst_obj, &dst, 1) != 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if ((size_t)src.len != sizeof(float) * (size_t)nb * n * n || (size_t)dst.len != sizeof(float) * (size_t)nb * n) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "eigvalsh: buffer sizes do not match batch and n");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = eigvalsh_batch((const float *)src.buf, nb, n, (float *)dst.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"eigvalsh", py_eigvalsh, METH_VARARGS,
     "eigvalsh(src, dst, batch, n): ascending eigenvalues of batch symmetric n x n float32 "
     "matrices (C-contiguous buffer src) into the float32 buffer dst (batch x n)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_smalleig",
                                    "Batched eigenvalues of small symmetric float32 matrices.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__smalleig(void) { return PyModule_Create(&module); }
