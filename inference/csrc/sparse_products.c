/* Matrix products with a mostly-zero factor, for the binary units of an RBM.
 *
 * A product a @ w where most entries of a are 0 (binarized MNIST: 13% ones)
 * needs only the rows of w that a's nonzeros pick: nnz(a) * h multiply-adds
 * instead of rows(a) * d * h. The work is then limited by reading those
 * rows, not by arithmetic, so both products read w (or p) in column blocks
 * of BLOCK_FLOATS floats, one block at a time, and accumulate each output
 * block in registers over the nonzeros that contribute to it: the block of
 * the dense factor being read stays in cache across output rows.
 *
 * Zeros of a are skipped; any other value is a coefficient, so the products
 * are exact for any sparse a, binary or not. Each output row is computed by
 * one thread in a fixed order, so results do not depend on the number of
 * threads. Threads come from OpenMP, the runtime torch's own operations use
 * (the process shares one libgomp), and follow torch.set_num_threads. */
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads/stores */
#define BLOCK_FLOATS 64

/* dst[0:8 NV] = beta init[0:8 NV] + sum_q coef[q] src[q][offset:offset + 8 NV], in registers */
#define ACCUMULATE(NV)                                                                      \
  static inline void acc_##NV(float* dst, const float* init, float beta, const float** src, \
                              const float* coef, long nq, long offset) {                   \
    v8 acc[NV];                                                                             \
    for (int j = 0; j < NV; j++) acc[j] = beta * *(const v8u*)(init + 8 * j);               \
    for (long q = 0; q < nq; q++) {                                                         \
      const float* s = src[q] + offset;                                                     \
      float c = coef[q];                                                                    \
      for (int j = 0; j < NV; j++) acc[j] += c * *(const v8u*)(s + 8 * j);                  \
    }                                                                                       \
    for (int j = 0; j < NV; j++) *(v8u*)(dst + 8 * j) = acc[j];                             \
  }
ACCUMULATE(1)
ACCUMULATE(2)
ACCUMULATE(3)
ACCUMULATE(4)
ACCUMULATE(5)
ACCUMULATE(6)
ACCUMULATE(7)
ACCUMULATE(8)

/* dst[0:width] = beta init[0:width] + sum_q coef[q] src[q][offset:offset + width], width <= 64 */
static void accumulate(float* dst, const float* init, float beta, const float** src,
                       const float* coef, long nq, long offset, long width) {
  long vectors = width / 8;
  switch (vectors) {
    case 8: acc_8(dst, init, beta, src, coef, nq, offset); break;
    case 7: acc_7(dst, init, beta, src, coef, nq, offset); break;
    case 6: acc_6(dst, init, beta, src, coef, nq, offset); break;
    case 5: acc_5(dst, init, beta, src, coef, nq, offset); break;
    case 4: acc_4(dst, init, beta, src, coef, nq, offset); break;
    case 3: acc_3(dst, init, beta, src, coef, nq, offset); break;
    case 2: acc_2(dst, init, beta, src, coef, nq, offset); break;
    case 1: acc_1(dst, init, beta, src, coef, nq, offset); break;
  }
  for (long k = 8 * vectors; k < width; k++) {
    float a = beta * init[k];
    for (long q = 0; q < nq; q++) a += coef[q] * src[q][offset + k];
    dst[k] = a;
  }
}

static void thread_range(long total, long* begin, long* end) {
  int threads = 1, t = 0;
#ifdef _OPENMP
  threads = omp_get_num_threads();
  t = omp_get_thread_num();
#endif
  *begin = total * t / threads;
  *end = total * (t + 1) / threads;
}

/* The accumulation of one thread's rows [r0, r1) of dst (row length h), block by block;
 * row r's nonzeros are src/coef[start[r - r0] : start[r - r0 + 1]]. */
static void accumulate_rows(float* dst, const float* init, long init_stride, float beta,
                            const float** src, const float* coef, const long* start, long r0,
                            long r1, long h) {
  for (long h0 = 0; h0 < h; h0 += BLOCK_FLOATS) {
    long width = h - h0 < BLOCK_FLOATS ? h - h0 : BLOCK_FLOATS;
    for (long r = r0; r < r1; r++) {
      long s = start[r - r0];
      accumulate(dst + r * h + h0, init + r * init_stride + h0, beta, src + s, coef + s,
                 start[r - r0 + 1] - s, h0, width);
    }
  }
}

/* The nonzeros an output row accumulates: the source rows they pick and their coefficients;
 * row r's are src/coef[start[r] : start[r + 1]] (r counted from the thread's first row). */
typedef struct {
  const float** src;
  float* coef;
  long* start;
} Nonzeros;

static int nonzeros_alloc(Nonzeros* nz, long entries, long rows) {
  nz->src = malloc(sizeof(*nz->src) * (entries + 1));
  nz->coef = malloc(sizeof(*nz->coef) * (entries + 1));
  nz->start = malloc(sizeof(*nz->start) * (rows + 1));
  return nz->src && nz->coef && nz->start;
}

static void nonzeros_free(Nonzeros* nz) {
  free(nz->src);
  free(nz->coef);
  free(nz->start);
}

/* Appends alpha a[r, i] and the source row p + r ldp for the rows r < n with a[r, i] != 0,
 * a (n x d) row-major, writing every entry and advancing past the nonzeros (no branches). */
static long append_nonzeros(Nonzeros* nz, long k, const float* a, long stride, long n,
                            const float* p, long ldp, float alpha) {
  for (long r = 0; r < n; r++) {
    float x = a[r * stride];
    nz->src[k] = p + r * ldp;
    nz->coef[k] = alpha * x;
    k += x != 0.0f;
  }
  return k;
}

/* out (n x h) = bias (h) + a (n x d) @ w (d x h), all row-major and contiguous.
 * Returns 0 when out of memory (out is then incomplete), 1 otherwise. */
int sparse_times_dense(const float* a, long n, long d, const float* w, long h, const float* bias,
                       float* out) {
  int failed = 0;
#pragma omp parallel shared(failed)
  {
    long r0, r1;
    thread_range(n, &r0, &r1);
    Nonzeros nz;
    if (!nonzeros_alloc(&nz, (r1 - r0) * d, r1 - r0)) {
#pragma omp atomic write
      failed = 1;
    } else {
      long k = 0;
      for (long r = r0; r < r1; r++) { /* row r's nonzeros pick rows of w */
        nz.start[r - r0] = k;
        k = append_nonzeros(&nz, k, a + r * d, 1, d, w, h, 1.0f);
      }
      nz.start[r1 - r0] = k;
      accumulate_rows(out, bias, 0, 1.0f, nz.src, nz.coef, nz.start, r0, r1, h);
    }
    nonzeros_free(&nz);
  }
  return !failed;
}

/* w (d x h) = beta w + alpha1 a1.T @ p1 + alpha2 a2.T @ p2 with a1 (n1 x d), p1 (n1 x h),
 * a2 (n2 x d), p2 (n2 x h), all row-major and contiguous: the two phases of a contrastive
 * update in one pass over w. Returns 0 when out of memory (w is then unchanged), 1 otherwise. */
int sparse_outer_add(float* w, long d, long h, float beta, const float* a1, const float* p1,
                     float alpha1, long n1, const float* a2, const float* p2, float alpha2,
                     long n2) {
  int failed = 0;
#pragma omp parallel shared(failed)
  {
    long i0, i1;
    thread_range(d, &i0, &i1);
    Nonzeros nz;
    if (!nonzeros_alloc(&nz, (i1 - i0) * (n1 + n2), i1 - i0)) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier /* no thread writes w unless every thread has its memory */
    int stop;
#pragma omp atomic read
    stop = failed;
    if (!stop) {
      long k = 0;
      for (long i = i0; i < i1; i++) { /* column i's nonzeros, down both factors, pick rows of p */
        nz.start[i - i0] = k;
        k = append_nonzeros(&nz, k, a1 + i, d, n1, p1, h, alpha1);
        k = append_nonzeros(&nz, k, a2 + i, d, n2, p2, h, alpha2);
      }
      nz.start[i1 - i0] = k;
      accumulate_rows(w, w, h, beta, nz.src, nz.coef, nz.start, i0, i1, h);
    }
    nonzeros_free(&nz);
  }
  return !failed;
}
