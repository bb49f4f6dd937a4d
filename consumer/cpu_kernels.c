/* CPU kernels of the SAE step that torch's ops cannot do in one pass; compiled on first use
 * by cpu_kernels.py (plain C, no torch headers: a compile takes well under a second).
 *
 * topk_rows_f32: the k largest values of each row of a [batch, n] float32 matrix, plus an
 * optional bias per column, sorted descending, ties by column ascending. Adding the bias here
 * spares the encoder matmul a pass over its output. Per row, while the row sits in L1/L2:
 *   1. the maxima of m strided column sets {c, c + m, c + 2m, ...} (one vectorised pass);
 *   2. t = the k-th largest of those maxima: at least k elements are >= t, so nothing below
 *      t is in the top k;
 *   3. the elements >= t (about 1.4k on random rows; packed 16 at a time without a branch,
 *      by AVX-512 compress, where the CPU has it) become 64-bit keys whose unsigned order is
 *      the rank; a key's place among few is the count of keys above it (branch-free), among
 *      many a quickselect plus an insertion sort of the k winners orders them.
 * PREFETCH: step 3 reads the row from L2 and asks for the next row's lines into L2 as it
 * goes (a prefetch past the matrix's end is harmless), so the memory stream of a matrix
 * larger than the caches overlaps the ranking instead of waiting for it: 0.83× the time at
 * 4096 × 16384 with the next row left to the hardware (BENCHMARKS.md).
 * A row holding a NaN is flagged instead (torch ranks NaN first; the caller asks torch).
 *
 * decoder_adam_f32: the whole update of the decoder W [n, d] (unit-norm rows) from its
 * gradient G, one row at a time while the row's four vectors sit in L1: the gradient's
 * component along the row removed, Adam (torch's formula, moments M and V), the row
 * renormalised. torch needs five passes over [n, d] tensors for the same (the projection's
 * dot products and subtraction, its fused Adam, the norms and the division). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* unsigned order = value ascending (as float order, -0.0 just below +0.0), then column
 * descending: the larger key ranks first. Columns must be < 2^32. */
static inline uint64_t key_of(float v, int64_t col) {
    uint32_t u;
    memcpy(&u, &v, 4);
    u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;
    return ((uint64_t)u << 32) | (uint32_t)(0xFFFFFFFFu - (uint32_t)col);
}

static inline float value_of(uint64_t key) {
    uint32_t u = (uint32_t)(key >> 32);
    float v;
    u ^= (u >> 31) ? 0x80000000u : 0xFFFFFFFFu;
    memcpy(&v, &u, 4);
    return v;
}

static inline void swap_keys(uint64_t *a, uint64_t *b) {
    uint64_t t = *a;
    *a = *b;
    *b = t;
}

/* Reorders c[0..m) so that its k largest keys (all distinct) come first, in any order. */
static void select_largest(uint64_t *c, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1;
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2; /* median of three, moved to hi as the pivot */
        if (c[mid] < c[lo]) swap_keys(&c[mid], &c[lo]);
        if (c[hi] < c[lo]) swap_keys(&c[hi], &c[lo]);
        if (c[mid] < c[hi]) swap_keys(&c[mid], &c[hi]);
        uint64_t pivot = c[hi];
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++)
            if (c[i] > pivot) swap_keys(&c[i], &c[store++]);
        swap_keys(&c[store], &c[hi]);
        if (store == k - 1 || store == k) return;
        if (store < k) lo = store + 1;
        else hi = store - 1;
    }
}

static int cmp_descending(const void *a, const void *b) {
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x < y) - (x > y);
}

static void sort_descending(uint64_t *c, int64_t k) {
    if (k > 32) { /* insertion sort is quadratic: fine for a TopK's k, not for any k */
        qsort(c, (size_t)k, sizeof(uint64_t), cmp_descending);
        return;
    }
    for (int64_t i = 1; i < k; i++) {
        uint64_t x = c[i];
        int64_t j = i - 1;
        while (j >= 0 && c[j] < x) {
            c[j + 1] = c[j];
            j--;
        }
        c[j + 1] = x;
    }
}

/* Below this many keys, ranking each key by counting the keys above it (a branch-free,
 * vectorised O(m²) pass) beats quickselect, whose branches the CPU cannot predict. */
#define RANK_MAX 256

static inline int64_t rank_of(const uint64_t *keys, int64_t m, uint64_t x) {
    int64_t r = 0;
    for (int64_t j = 0; j < m; j++) r += keys[j] > x;
    return r;
}

/* The k-th largest of m distinct keys (quickselect, for many, reorders them). */
static uint64_t kth_largest(uint64_t *keys, int64_t m, int64_t k) {
    if (m <= RANK_MAX) {
        uint64_t kth = 0;
        for (int64_t c = 0; c < m; c++) kth = rank_of(keys, m, keys[c]) == k - 1 ? keys[c] : kth;
        return kth;
    }
    select_largest(keys, m, k);
    uint64_t kth = keys[0];
    for (int64_t c = 1; c < k; c++) kth = keys[c] < kth ? keys[c] : kth;
    return kth;
}

#define TILE 16 /* rows per tile of gathered columns: one cache line of floats */

/* One row of p + b (b: a bias per column, or NULL for none), added as torch adds it (one
 * float add per element) but never written back: 0, or 1 if it holds a NaN.
 * mx has m floats, keys n + m slots, cand 2n + 32 floats (used by the AVX-512 path). */
static int row_topk(const float *p, const float *b, int64_t n, int64_t k, int64_t m, float *mx,
                    uint64_t *keys, float *cand, float *values, int64_t *indices) {
    int64_t i, c;
    for (c = 0; c < m; c++) mx[c] = -INFINITY;
    if (b == NULL) { /* a NaN never enters a maximum */
        for (i = 0; i + m <= n; i += m)
            for (c = 0; c < m; c++) mx[c] = p[i + c] > mx[c] ? p[i + c] : mx[c];
        for (c = 0; i + c < n; c++) mx[c] = p[i + c] > mx[c] ? p[i + c] : mx[c];
    } else {
        for (i = 0; i + m <= n; i += m)
            for (c = 0; c < m; c++) {
                const float v = p[i + c] + b[i + c];
                mx[c] = v > mx[c] ? v : mx[c];
            }
        for (c = 0; i + c < n; c++) {
            const float v = p[i + c] + b[i + c];
            mx[c] = v > mx[c] ? v : mx[c];
        }
    }
    for (c = 0; c < m; c++) keys[c] = key_of(mx[c], c); /* distinct keys */
    const float t = value_of(kth_largest(keys, m, k));
    int64_t found = 0;
    i = 0;
#if defined(__AVX512F__)
    { /* 16 at a time, branch-free: the candidates' values and columns packed to the front */
        float *cv = cand;
        int32_t *cc = (int32_t *)(cand + n + 16);
        const __m512 tv = _mm512_set1_ps(t);
        __m512i col = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i sixteen = _mm512_set1_epi32(16);
        for (; i + 16 <= n; i += 16) {
            _mm_prefetch((const char *)(p + n + i), _MM_HINT_T1); /* see PREFETCH at the top */
            __m512 v = _mm512_loadu_ps(p + i);
            if (b != NULL) v = _mm512_add_ps(v, _mm512_loadu_ps(b + i));
            const __mmask16 mask = _mm512_cmp_ps_mask(v, tv, _CMP_NLT_UQ); /* >= t, or NaN */
            _mm512_storeu_ps(cv + found, _mm512_maskz_compress_ps(mask, v));
            _mm512_storeu_si512((void *)(cc + found), _mm512_maskz_compress_epi32(mask, col));
            found += __builtin_popcount((unsigned)mask);
            col = _mm512_add_epi32(col, sixteen);
        }
        for (int64_t j = 0; j < found; j++) {
            if (cv[j] != cv[j]) return 1;
            keys[j] = key_of(cv[j], cc[j]);
        }
    }
#elif defined(__AVX2__)
    const __m256 tv = _mm256_set1_ps(t);
    for (; i + 8 <= n; i += 8) { /* 8 at a time: mostly no candidate among them */
        _mm_prefetch((const char *)(p + n + i), _MM_HINT_T1); /* see PREFETCH at the top */
        __m256 v = _mm256_loadu_ps(p + i);
        if (b != NULL) v = _mm256_add_ps(v, _mm256_loadu_ps(b + i));
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, tv, _CMP_NLT_UQ));
        while (mask) {
            const int64_t col = i + __builtin_ctz(mask);
            const float x = b != NULL ? p[col] + b[col] : p[col];
            mask &= mask - 1;
            if (x != x) return 1;
            keys[found++] = key_of(x, col);
        }
    }
#endif
    for (; i < n; i++) {
        const float v = b != NULL ? p[i] + b[i] : p[i];
        if (!(v < t)) { /* v >= t, or NaN */
            if (v != v) return 1;
            keys[found++] = key_of(v, i);
        }
    }
    const uint64_t *top = keys;
    if (found <= RANK_MAX) { /* each candidate's rank among them is its place */
        uint64_t *out = keys + found; /* keys has n + m slots; found <= n, k <= m */
        for (c = 0; c < found; c++) {
            const int64_t r = rank_of(keys, found, keys[c]);
            if (r < k) out[r] = keys[c];
        }
        top = out;
    } else {
        select_largest(keys, found, k);
        sort_descending(keys, k);
    }
    for (c = 0; c < k; c++) {
        indices[c] = (int64_t)(0xFFFFFFFFu - (uint32_t)top[c]);
        values[c] = value_of(top[c]);
    }
    return 0;
}

/* The top k of each row of p [batch, n] + b [n] (b may be NULL): values/indices [batch, k],
 * bad [batch] (1: the row was not ranked here, because it holds a NaN). Needs
 * 1 <= k <= m <= n < 2^32. Rows are split over `threads` OpenMP threads: the same runtime
 * and pool as torch's own CPU ops (torch ships libgomp.so.1, which the loader shares), so
 * its workers, still spinning after the encoder matmul, take the rows at once instead of
 * competing with threads of ours. Returns the number of bad rows.
 * With n_cols > 0, also out[r·rs + j·cs] = p[r, cols[j]] + b[cols[j]] for every row (NaN
 * rows too), each 0 <= cols[j] < n: AuxK's columns of the dead latents, gathered while the
 * row is in cache, where a gather of its own reads one cache line of the matrix per value. */
int64_t topk_rows_f32(const float *p, const float *b, int64_t batch, int64_t n, int64_t k,
                      int64_t m, float *values, int64_t *indices, uint8_t *bad, int threads,
                      const int64_t *cols, int64_t n_cols, float *out, int64_t rs,
                      int64_t cs) {
    int64_t flagged = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(+ : flagged)
    {
        int64_t lo = 0, hi = batch; /* this thread's rows: one contiguous block */
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
        lo = batch * tid / nt;
        hi = batch * (tid + 1) / nt;
#endif
        float *mx = malloc(sizeof(float) * m);
        uint64_t *keys = malloc(sizeof(uint64_t) * (n + m));
        float *cand = malloc(sizeof(float) * (2 * n + 32));
        /* Gathered columns go out through a tile of TILE rows when a row's values are far
         * apart (column-major out): then each column's TILE values are one cache line,
         * written whole, where writing each row's values at once strides by the batch, a
         * power of two, so that every value of a row falls in the same few cache sets. */
        float *tile = cs != 1 && n_cols > 0 ? malloc(sizeof(float) * TILE * n_cols) : NULL;
        for (int64_t r = lo; r < hi; r++) {
            const float *row = p + r * n;
            bad[r] = (mx == NULL || keys == NULL || cand == NULL)
                         ? 1
                         : row_topk(row, b, n, k, m, mx, keys, cand, values + r * k,
                                    indices + r * k);
            flagged += bad[r];
            if (n_cols == 0) continue;
            float *o = tile != NULL ? tile + ((r - lo) % TILE) * n_cols : out + r * rs;
            const int64_t step = tile != NULL ? 1 : cs;
            if (b == NULL)
                for (int64_t j = 0; j < n_cols; j++) o[j * step] = row[cols[j]];
            else
                for (int64_t j = 0; j < n_cols; j++) o[j * step] = row[cols[j]] + b[cols[j]];
            if (tile != NULL && ((r - lo) % TILE == TILE - 1 || r == hi - 1)) {
                const int64_t first = r - (r - lo) % TILE, count = r - first + 1;
                for (int64_t j = 0; j < n_cols; j++)
                    for (int64_t i = 0; i < count; i++)
                        out[(first + i) * rs + j * cs] = tile[i * n_cols + j];
            }
        }
        free(mx);
        free(keys);
        free(cand);
        free(tile);
    }
    return flagged;
}

/* One row: g = G − (G·w) w; M += (g − M)(1 − β1); V = V β2 + g² (1 − β2);
 * w −= step_size · M / (√V / bc2_sqrt + eps); w /= max(‖w‖, 1e-12). G is not written. */
static void decoder_adam_row(float *restrict w, const float *restrict G, float *restrict M,
                             float *restrict V, int64_t d, float beta1, float beta2,
                             float step_size, float bc2_sqrt, float eps) {
    float dot = 0.0f, sq = 0.0f;
    const float c1 = 1.0f - beta1, c2 = 1.0f - beta2;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; i++) dot += G[i] * w[i];
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < d; i++) {
        float g = G[i] - dot * w[i];
        float m = M[i] + (g - M[i]) * c1;
        float v = V[i] * beta2 + g * g * c2;
        float x = w[i] - step_size * m / (sqrtf(v) / bc2_sqrt + eps);
        M[i] = m;
        V[i] = v;
        w[i] = x;
        sq += x * x;
    }
    float norm = sqrtf(sq);
    if (norm < 1e-12f) norm = 1e-12f;
#pragma omp simd
    for (int64_t i = 0; i < d; i++) w[i] /= norm;
}

/* decoder_adam_row over the n rows of contiguous [n, d] tensors, on `threads` OpenMP
 * threads (torch's pool, as topk_rows_f32). step_size = lr / (1 − β1^t) and
 * bc2_sqrt = √(1 − β2^t) for Adam's step count t after this update, as torch computes them. */
void decoder_adam_f32(float *w, const float *G, float *M, float *V, int64_t n, int64_t d,
                      float beta1, float beta2, float step_size, float bc2_sqrt, float eps,
                      int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        decoder_adam_row(w + r * d, G + r * d, M + r * d, V + r * d, d, beta1, beta2,
                         step_size, bc2_sqrt, eps);
}

/* The step's loss statistics in one pass over the rows of the normalised input xn and its
 * reconstruction xh [n, d]: the residual e = xn − xh (written, float32, for AuxK), and in
 * float64 Σ_b e_b (esum [d]), Σ‖e‖² (sums[0]), Σ_b xn_b (xsum [d]), Σ‖xn‖² (sums[1]). torch
 * needs seven passes for these (the subtraction, two float64 copies, four reductions).
 * Each thread sums its rows into partial sums of its own, added in thread order. Returns 0,
 * or -1 (nothing written) when the partial sums cannot be allocated. */
int loss_stats_f32(const float *xn, const float *xh, float *e, int64_t n, int64_t d,
                   double *esum, double *xsum, double *sums, int threads) {
    if (threads < 1) threads = 1;
    const size_t stride = (size_t)(2 * d + 2); /* per thread: Σ e [d], Σ xn [d], Σ‖e‖², Σ‖xn‖² */
    double *part = calloc((size_t)threads * stride, sizeof(double));
    if (part == NULL) return -1;
#pragma omp parallel num_threads(threads)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        double *pe = part + (size_t)tid * stride, *px = pe + d, *ps = px + d;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float *restrict a = xn + r * d, *restrict b = xh + r * d;
            float *restrict out = e + r * d;
            double se = 0.0, sx = 0.0;
#pragma omp simd reduction(+ : se, sx)
            for (int64_t i = 0; i < d; i++) {
                const float v = a[i] - b[i];
                out[i] = v;
                pe[i] += (double)v;
                px[i] += (double)a[i];
                se += (double)v * (double)v;
                sx += (double)a[i] * (double)a[i];
            }
            ps[0] += se;
            ps[1] += sx;
        }
    }
    memset(esum, 0, sizeof(double) * d);
    memset(xsum, 0, sizeof(double) * d);
    sums[0] = sums[1] = 0.0;
    for (int t = 0; t < threads; t++) {
        const double *pe = part + (size_t)t * stride;
        for (int64_t i = 0; i < d; i++) {
            esum[i] += pe[i];
            xsum[i] += pe[d + i];
        }
        sums[0] += pe[2 * d];
        sums[1] += pe[2 * d + 1];
    }
    free(part);
    return 0;
}

/* layer_norm_f32: each row of x [n, d] (d >= 2) centred and divided by its unbiased
 * standard deviation plus eps, into y [n, d], with the row's mean mu [n] and standard
 * deviation sd [n] (without eps, for mapping back): `SparseAutoencoder.normalize`, which
 * with torch's ops takes five passes over [n, d] (the mean, the centring, the squares' sum,
 * the division), here three over a row while it sits in L1. The sums in float64, so rows
 * whose squares overflow float32 still get a finite deviation. */
void layer_norm_f32(const float *x, float *y, float *mu, float *sd, int64_t n, int64_t d,
                    float eps, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *restrict a = x + r * d;
        float *restrict out = y + r * d;
        double s = 0.0, q = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < d; i++) s += (double)a[i];
        const float m = (float)(s / (double)d);
#pragma omp simd reduction(+ : q)
        for (int64_t i = 0; i < d; i++) {
            const double c = (double)(a[i] - m);
            q += c * c;
        }
        const float st = (float)sqrt(q / (double)(d - 1));
        const float den = st + eps;
        for (int64_t i = 0; i < d; i++) out[i] = (a[i] - m) / den;
        mu[r] = m;
        sd[r] = st;
    }
}

/* The CSR pattern [n, batch] of the latent ids idx [batch, k] (row-major, N = batch·k
 * entries), by one counting sort: crow [n + 1], order [N] (flat positions grouped by latent,
 * token order kept within a latent: what a stable argsort of idx gives), cols [N] = order / k.
 * Two passes over idx and a prefix sum, where a comparison sort takes log N passes.
 * Returns 0; -1 (nothing usable written) for an id outside [0, n); -2 out of memory. */
int csr_pattern_i64(const int64_t *idx, int64_t N, int64_t n, int64_t k, int64_t *crow,
                    int64_t *order, int64_t *cols) {
    memset(crow, 0, sizeof(int64_t) * (size_t)(n + 1));
    for (int64_t i = 0; i < N; i++) {
        const int64_t v = idx[i];
        if ((uint64_t)v >= (uint64_t)n) return -1;
        crow[v + 1]++;
    }
    for (int64_t l = 0; l < n; l++) crow[l + 1] += crow[l];
    int64_t *next = malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
    if (next == NULL) return -2;
    memcpy(next, crow, sizeof(int64_t) * (size_t)n);
    for (int64_t i = 0; i < N; i++) {
        const int64_t p = next[idx[i]]++;
        order[p] = i;
        cols[p] = i / k;
    }
    free(next);
    return 0;
}

#if defined(__AVX512F__)
/* One latent's entries e0..e1 with 64 columns of d at a time in registers: the gradient
 * row's four vectors accumulate over the entries before one store, and each entry's dot
 * product keeps a vector of partial sums (dv, m of them), summed once at the end. */
static void csr_latent_avx512(const int64_t *cols, const int64_t *order, int64_t e0,
                              int64_t e1, const float *coef, const float *R, const float *w,
                              int64_t d, float *out, int accumulate, float *gv, __m512 *dv) {
    const int64_t m = e1 - e0;
    int64_t i = 0;
    for (int64_t j = 0; j < m; j++) dv[j] = _mm512_setzero_ps();
    for (; i + 64 <= d; i += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m512 w0 = a0, w1 = a0, w2 = a0, w3 = a0;
        if (out != NULL && accumulate) {
            a0 = _mm512_loadu_ps(out + i);
            a1 = _mm512_loadu_ps(out + i + 16);
            a2 = _mm512_loadu_ps(out + i + 32);
            a3 = _mm512_loadu_ps(out + i + 48);
        }
        if (gv != NULL) {
            w0 = _mm512_loadu_ps(w + i);
            w1 = _mm512_loadu_ps(w + i + 16);
            w2 = _mm512_loadu_ps(w + i + 32);
            w3 = _mm512_loadu_ps(w + i + 48);
        }
        for (int64_t j = 0; j < m; j++) {
            if (j + 2 < m) { /* the row two entries on: its lines of this block */
                const char *next = (const char *)(R + cols[e0 + j + 2] * d + i);
                _mm_prefetch(next, _MM_HINT_T0);
                _mm_prefetch(next + 64, _MM_HINT_T0);
                _mm_prefetch(next + 128, _MM_HINT_T0);
                _mm_prefetch(next + 192, _MM_HINT_T0);
            }
            const float *r = R + cols[e0 + j] * d + i;
            const __m512 r0 = _mm512_loadu_ps(r), r1 = _mm512_loadu_ps(r + 16);
            const __m512 r2 = _mm512_loadu_ps(r + 32), r3 = _mm512_loadu_ps(r + 48);
            if (out != NULL) {
                const __m512 c = _mm512_set1_ps(coef[order[e0 + j]]);
                a0 = _mm512_fmadd_ps(c, r0, a0);
                a1 = _mm512_fmadd_ps(c, r1, a1);
                a2 = _mm512_fmadd_ps(c, r2, a2);
                a3 = _mm512_fmadd_ps(c, r3, a3);
            }
            if (gv != NULL) {
                __m512 t = _mm512_fmadd_ps(r0, w0, dv[j]);
                t = _mm512_fmadd_ps(r1, w1, t);
                t = _mm512_fmadd_ps(r2, w2, t);
                dv[j] = _mm512_fmadd_ps(r3, w3, t);
            }
        }
        if (out != NULL) {
            _mm512_storeu_ps(out + i, a0);
            _mm512_storeu_ps(out + i + 16, a1);
            _mm512_storeu_ps(out + i + 32, a2);
            _mm512_storeu_ps(out + i + 48, a3);
        }
    }
    if (out != NULL && !accumulate)
        for (int64_t t = i; t < d; t++) out[t] = 0.0f;
    for (int64_t j = 0; j < m; j++) { /* the last d % 64 columns, one at a time */
        const float *r = R + cols[e0 + j] * d;
        float dot = 0.0f;
        const float c = out != NULL ? coef[order[e0 + j]] : 0.0f;
        for (int64_t t = i; t < d; t++) {
            if (gv != NULL) dot += r[t] * w[t];
            if (out != NULL) out[t] += c * r[t];
        }
        if (gv != NULL) gv[order[e0 + j]] = _mm512_reduce_add_ps(dv[j]) + dot;
    }
}
#endif

/* The sparse products of a TopK step's backward over one CSR pattern [n, batch] (crow,
 * cols = token of each entry, order = the entry's flat position in the [batch, k] ids), for
 * coefficients coef [batch·k], dense rows R [batch, d] and weights W [n, d]:
 *   grad[l] (+)= Σ_{entries e of latent l} coef[order[e]] · R[cols[e]]   (if grad != NULL;
 *                 added to what grad holds if accumulate, else written)
 *   gv[order[e]] = R[cols[e]] · W[l]                                       (if gv != NULL)
 * One walk over the pattern does both, each token row read once per entry, where torch
 * needs a sparse × dense product and a sampled dense × dense product, and a gather and a
 * scatter by `order`. Latents are split over `threads` OpenMP threads; each writes only its
 * own rows of grad and, order being a permutation, its own entries of gv. Returns 0, or -1
 * (nothing written) when the threads' scratch cannot be allocated. */
int csr_backward_f32(const int64_t *crow, const int64_t *cols, const int64_t *order,
                     const float *coef, const float *R, const float *W, int64_t n, int64_t d,
                     float *grad, int accumulate, float *gv, int threads) {
    if (threads < 1) threads = 1;
    int64_t widest = 0; /* the most entries of one latent: the scratch each thread needs */
    for (int64_t l = 0; l < n; l++)
        widest = crow[l + 1] - crow[l] > widest ? crow[l + 1] - crow[l] : widest;
#if defined(__AVX512F__)
    /* every thread's scratch before anything is written: a failure leaves grad untouched */
    const size_t per_thread = (size_t)(widest > 0 ? widest : 1);
    __m512 *scratch = aligned_alloc(64, 64 * per_thread * (size_t)threads);
    if (scratch == NULL) return -1;
#endif
#pragma omp parallel num_threads(threads)
    {
#if defined(__AVX512F__)
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        __m512 *dv = scratch + per_thread * (size_t)tid;
#pragma omp for schedule(dynamic, 64)
        for (int64_t l = 0; l < n; l++)
            csr_latent_avx512(cols, order, crow[l], crow[l + 1], coef, R,
                              W == NULL ? NULL : W + l * d, d,
                              grad == NULL ? NULL : grad + l * d, accumulate, gv, dv);
#else
#pragma omp for schedule(dynamic, 64)
        for (int64_t l = 0; l < n; l++) {
            float *restrict out = grad == NULL ? NULL : grad + l * d;
            const float *restrict w = W == NULL ? NULL : W + l * d;
            if (out != NULL && !accumulate) memset(out, 0, sizeof(float) * (size_t)d);
            for (int64_t e = crow[l]; e < crow[l + 1]; e++) {
                const int64_t pos = order[e];
                const float *restrict r = R + cols[e] * d;
                if (gv != NULL) {
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < d; i++) dot += r[i] * w[i];
                    gv[pos] = dot;
                }
                if (out != NULL) {
                    const float c = coef[pos];
#pragma omp simd
                    for (int64_t i = 0; i < d; i++) out[i] += c * r[i];
                }
            }
        }
#endif
    }
#if defined(__AVX512F__)
    free(scratch);
#endif
    return 0;
}
