/* The byte regrouping of the lz4-shuffle codec in one pass each way; compiled on first use by
 * common/wire.py through common/native.py (plain C, no headers beyond libc).
 *
 * shuffle_N: the bytes of m little-endian N-byte words -> N planes of m bytes, byte j of
 * word i at j*m + i. numpy needs a shift and a narrowing copy per plane for the same.
 *
 * unshuffle_N: the inverse, and on the way the top plane's verdict on finiteness: 1 when its
 * bytes prove every value finite (no byte with all the exponent bits it holds set: the
 * signed maximum below `limit` and the unsigned one below 0x80 | limit), else 0 ("look
 * closer": common/wire.py then checks the words exactly). numpy needs a widening multiply,
 * an add and two max reductions for the same.
 *
 * shuffle_N_crc, unshuffle_N_crc: the same, and on the way the zlib crc32 of the words they
 * read or write, a block at a time while the block is in L1 (see crc32_update).
 *
 * The loops are written for the compiler to vectorise (byte interleaves and max reductions);
 * `restrict`: the planes and the words never overlap. */
#include <stdint.h>

/* Elements i0 .. i0 + n of the public functions below: `raw`/`out` at element i0, each plane
 * pointer at its own element i0. */
static inline void shuffle2_range(const uint8_t *restrict raw, uint8_t *restrict p0,
                                  uint8_t *restrict p1, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        p0[i] = raw[2 * i];
        p1[i] = raw[2 * i + 1];
    }
}

static inline void shuffle4_range(const uint8_t *restrict raw, uint8_t *restrict p0,
                                  uint8_t *restrict p1, uint8_t *restrict p2,
                                  uint8_t *restrict p3, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        p0[i] = raw[4 * i];
        p1[i] = raw[4 * i + 1];
        p2[i] = raw[4 * i + 2];
        p3[i] = raw[4 * i + 3];
    }
}

/* Returns the top plane's maxima as (signed max + 128) << 8 | unsigned max. */
static inline int unshuffle2_range(const uint8_t *restrict p0, const uint8_t *restrict p1,
                                   uint8_t *restrict out, int64_t n) {
    int8_t smax = INT8_MIN;
    uint8_t umax = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t top = p1[i];
        out[2 * i] = p0[i];
        out[2 * i + 1] = top;
        smax = (int8_t)top > smax ? (int8_t)top : smax;
        umax = top > umax ? top : umax;
    }
    return (smax + 128) << 8 | umax;
}

static inline int unshuffle4_range(const uint8_t *restrict p0, const uint8_t *restrict p1,
                                   const uint8_t *restrict p2, const uint8_t *restrict p3,
                                   uint8_t *restrict out, int64_t n) {
    int8_t smax = INT8_MIN;
    uint8_t umax = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t top = p3[i];
        out[4 * i] = p0[i];
        out[4 * i + 1] = p1[i];
        out[4 * i + 2] = p2[i];
        out[4 * i + 3] = top;
        smax = (int8_t)top > smax ? (int8_t)top : smax;
        umax = top > umax ? top : umax;
    }
    return (smax + 128) << 8 | umax;
}

/* 1 when the maxima (as the _range functions return them, merged) prove every value finite:
 * no top byte holds all the exponent bits it carries (`limit`). */
static int top_verdict(int maxima, int limit) {
    const int smax = (maxima >> 8) - 128, umax = maxima & 0xFF;
    return smax < limit && umax < (0x80 | limit);
}

static int merge_maxima(int a, int b) {
    const int s = (a >> 8) > (b >> 8) ? (a >> 8) : (b >> 8);
    const int u = (a & 0xFF) > (b & 0xFF) ? (a & 0xFF) : (b & 0xFF);
    return s << 8 | u;
}

#define NO_MAXIMA 0 /* signed max -128, unsigned max 0 */

void shuffle_2(const uint8_t *restrict raw, uint8_t *restrict out, int64_t m) {
    shuffle2_range(raw, out, out + m, m);
}

void shuffle_4(const uint8_t *restrict raw, uint8_t *restrict out, int64_t m) {
    shuffle4_range(raw, out, out + m, out + 2 * m, out + 3 * m, m);
}

int unshuffle_2(const uint8_t *restrict planes, uint8_t *restrict out, int64_t m, int limit) {
    return top_verdict(unshuffle2_range(planes, planes + m, out, m), limit);
}

int unshuffle_4(const uint8_t *restrict planes, uint8_t *restrict out, int64_t m, int limit) {
    return top_verdict(
        unshuffle4_range(planes, planes + m, planes + 2 * m, planes + 3 * m, out, m), limit);
}

/* crc32 as zlib computes it (the reflected polynomial 0xEDB88320, pre- and post-inverted),
 * folded four 16-byte lanes at a time with carry-less multiplies where the compiler targets
 * PCLMULQDQ (the constants are x^(512±32) and x^(128±32) mod P, bit-reflected, as in Intel's
 * "Fast CRC Computation Using PCLMULQDQ" and Linux's crc32-pclmul): about 4.5 times zlib's
 * speed here, and computed on the bytes while they are in L1, right after regrouping wrote
 * or read them. A folded 128-bit remainder is finished bit by bit: its crc with a zero
 * initial value is the crc of everything folded into it. Without PCLMULQDQ `fast_crc32`
 * says 0 and common/wire.py keeps zlib.crc32; the _crc entry points still compute the right
 * value (bit by bit, slowly) for the tests. */
static uint32_t crc_bits(uint32_t crc, const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int b = 0; b < 8; b++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc;
}

#if defined(__PCLMUL__) && defined(__SSE2__)
#include <immintrin.h>
#define FAST_CRC32 1
typedef struct {
    __m128i x[4];
} fold_state;

static inline __m128i fold16(__m128i x, __m128i k, __m128i next) {
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00),
                                       _mm_clmulepi64_si128(x, k, 0x11)),
                         next);
}

/* The first 64 bytes, with the running (inverted) crc xored into the first four. */
static void fold_start(fold_state *s, const uint8_t *p, uint32_t crc) {
    for (int j = 0; j < 4; j++) s->x[j] = _mm_loadu_si128((const __m128i *)(p + 16 * j));
    s->x[0] = _mm_xor_si128(s->x[0], _mm_cvtsi32_si128((int)crc));
}

/* n more bytes, a multiple of 64. */
static void fold_more(fold_state *s, const uint8_t *p, int64_t n) {
    const __m128i k = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL); /* x^(512+32), x^(512-32) */
    __m128i x0 = s->x[0], x1 = s->x[1], x2 = s->x[2], x3 = s->x[3];
    for (int64_t i = 0; i < n; i += 64) {
        x0 = fold16(x0, k, _mm_loadu_si128((const __m128i *)(p + i)));
        x1 = fold16(x1, k, _mm_loadu_si128((const __m128i *)(p + i + 16)));
        x2 = fold16(x2, k, _mm_loadu_si128((const __m128i *)(p + i + 32)));
        x3 = fold16(x3, k, _mm_loadu_si128((const __m128i *)(p + i + 48)));
    }
    s->x[0] = x0, s->x[1] = x1, s->x[2] = x2, s->x[3] = x3;
}

/* The (inverted) crc of everything folded so far. */
static uint32_t fold_finish(const fold_state *s) {
    const __m128i k = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL); /* x^(128+32), x^(128-32) */
    __m128i x = fold16(fold16(fold16(s->x[0], k, s->x[1]), k, s->x[2]), k, s->x[3]);
    uint8_t rest[16];
    _mm_storeu_si128((__m128i *)rest, x);
    return crc_bits(0, rest, 16);
}
#endif

int fast_crc32(void) {
#ifdef FAST_CRC32
    return 1;
#else
    return 0;
#endif
}

/* Folds bytes as a caller produces them, block by block, in order. */
typedef struct {
    uint32_t crc; /* inverted running crc: the value before folding started */
    int64_t done; /* bytes folded so far */
#ifdef FAST_CRC32
    fold_state s;
#endif
} crc_stream;

/* Fold buf[done .. upto): whole 64-byte groups only, unless `last`. */
static void crc_feed(crc_stream *c, const uint8_t *buf, int64_t upto, int last) {
#ifdef FAST_CRC32
    int64_t n = (upto - c->done) & ~(int64_t)63;
    if (n > 0 && c->done == 0) {
        fold_start(&c->s, buf, c->crc);
        fold_more(&c->s, buf + 64, n - 64);
        c->done = n;
    } else if (n > 0) {
        fold_more(&c->s, buf + c->done, n);
        c->done += n;
    }
#endif
    if (!last) return;
#ifdef FAST_CRC32
    if (c->done > 0) c->crc = fold_finish(&c->s);
#endif
    c->crc = crc_bits(c->crc, buf + c->done, upto - c->done);
    c->done = upto;
}

/* zlib.crc32(buf, crc). */
uint32_t crc32_update(uint32_t crc, const uint8_t *buf, int64_t n) {
    crc_stream c = {.crc = ~crc, .done = 0};
    crc_feed(&c, buf, n, 1);
    return ~c.crc;
}

/* Elements per block of the _crc variants: 16 or 32 KiB of words, folded while in L1. */
#define CRC_BLOCK 8192

/* shuffle_N, and *crc updated as zlib.crc32(raw, *crc) would (N = size, 2 or 4). */
static void shuffle_crc(const uint8_t *restrict raw, uint8_t *restrict out, int64_t m,
                        int size, uint32_t *crc) {
    crc_stream c = {.crc = ~*crc, .done = 0};
    for (int64_t i0 = 0; i0 < m; i0 += CRC_BLOCK) {
        const int64_t n = m - i0 < CRC_BLOCK ? m - i0 : CRC_BLOCK;
        if (size == 2)
            shuffle2_range(raw + 2 * i0, out + i0, out + m + i0, n);
        else
            shuffle4_range(raw + 4 * i0, out + i0, out + m + i0, out + 2 * m + i0,
                           out + 3 * m + i0, n);
        crc_feed(&c, raw, size * (i0 + n), 0);
    }
    crc_feed(&c, raw, size * m, 1);
    *crc = ~c.crc;
}

/* unshuffle_N, and *crc updated as zlib.crc32(out, *crc) would (N = size, 2 or 4). */
static int unshuffle_crc(const uint8_t *restrict planes, uint8_t *restrict out, int64_t m,
                         int size, int limit, uint32_t *crc) {
    crc_stream c = {.crc = ~*crc, .done = 0};
    int maxima = NO_MAXIMA;
    for (int64_t i0 = 0; i0 < m; i0 += CRC_BLOCK) {
        const int64_t n = m - i0 < CRC_BLOCK ? m - i0 : CRC_BLOCK;
        const int block =
            size == 2 ? unshuffle2_range(planes + i0, planes + m + i0, out + 2 * i0, n)
                      : unshuffle4_range(planes + i0, planes + m + i0, planes + 2 * m + i0,
                                         planes + 3 * m + i0, out + 4 * i0, n);
        maxima = merge_maxima(maxima, block);
        crc_feed(&c, out, size * (i0 + n), 0);
    }
    crc_feed(&c, out, size * m, 1);
    *crc = ~c.crc;
    return top_verdict(maxima, limit);
}

void shuffle_2_crc(const uint8_t *raw, uint8_t *out, int64_t m, uint32_t *crc) {
    shuffle_crc(raw, out, m, 2, crc);
}

void shuffle_4_crc(const uint8_t *raw, uint8_t *out, int64_t m, uint32_t *crc) {
    shuffle_crc(raw, out, m, 4, crc);
}

int unshuffle_2_crc(const uint8_t *planes, uint8_t *out, int64_t m, int limit, uint32_t *crc) {
    return unshuffle_crc(planes, out, m, 2, limit, crc);
}

int unshuffle_4_crc(const uint8_t *planes, uint8_t *out, int64_t m, int limit, uint32_t *crc) {
    return unshuffle_crc(planes, out, m, 4, limit, crc);
}
