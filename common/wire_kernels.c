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
 * The loops are written for the compiler to vectorise (byte interleaves and max reductions);
 * `restrict`: the planes and the words never overlap. */
#include <stdint.h>

void shuffle_2(const uint8_t *restrict raw, uint8_t *restrict out, int64_t m) {
    uint8_t *restrict p1 = out + m;
    for (int64_t i = 0; i < m; i++) {
        out[i] = raw[2 * i];
        p1[i] = raw[2 * i + 1];
    }
}

void shuffle_4(const uint8_t *restrict raw, uint8_t *restrict out, int64_t m) {
    uint8_t *restrict p1 = out + m, *restrict p2 = out + 2 * m, *restrict p3 = out + 3 * m;
    for (int64_t i = 0; i < m; i++) {
        out[i] = raw[4 * i];
        p1[i] = raw[4 * i + 1];
        p2[i] = raw[4 * i + 2];
        p3[i] = raw[4 * i + 3];
    }
}

static int top_verdict(int8_t smax, uint8_t umax, int limit) {
    return smax < limit && umax < (0x80 | limit);
}

int unshuffle_2(const uint8_t *restrict planes, uint8_t *restrict out, int64_t m, int limit) {
    const uint8_t *restrict p0 = planes, *restrict p1 = planes + m;
    int8_t smax = INT8_MIN;
    uint8_t umax = 0;
    for (int64_t i = 0; i < m; i++) {
        const uint8_t top = p1[i];
        out[2 * i] = p0[i];
        out[2 * i + 1] = top;
        smax = (int8_t)top > smax ? (int8_t)top : smax;
        umax = top > umax ? top : umax;
    }
    return top_verdict(smax, umax, limit);
}

int unshuffle_4(const uint8_t *restrict planes, uint8_t *restrict out, int64_t m, int limit) {
    const uint8_t *restrict p0 = planes, *restrict p1 = planes + m;
    const uint8_t *restrict p2 = planes + 2 * m, *restrict p3 = planes + 3 * m;
    int8_t smax = INT8_MIN;
    uint8_t umax = 0;
    for (int64_t i = 0; i < m; i++) {
        const uint8_t top = p3[i];
        out[4 * i] = p0[i];
        out[4 * i + 1] = p1[i];
        out[4 * i + 2] = p2[i];
        out[4 * i + 3] = top;
        smax = (int8_t)top > smax ? (int8_t)top : smax;
        umax = top > umax ? top : umax;
    }
    return top_verdict(smax, umax, limit);
}
