/* Fused CPU kernels for the weight-activation paths (see native.py, which compiles and loads this file).
 *
 * Each kernel is one pass over its rows doing what several PyTorch element-wise ops do one after another,
 * with the same float32 operations in the same order, so the results are bit-identical to the torch code
 * they replace (tests/test_native_kernels.py checks it): no -ffast-math, IEEE division, round half to even
 * (nearbyintf in the default rounding mode = torch.round), bf16 rounded to nearest even as c10 does.
 *
 * dtype codes: 0 = float32, 1 = bfloat16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0; /* NaN, as c10::BFloat16 */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load(const void *x, int dtype, int64_t i) {
    return dtype == 1 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* Per-row quantization of x [M, K] (row stride ldx elements) to int8 codes q [M, K], fp32 scale [M] and,
 * when asym, fp32-valued zero point zp [M] (as int32). Same arithmetic as grid.quantize_per_token(_affine):
 *   sym:  amax = max|row| * clip;  scale = amax > 0 ? amax / qmax : 1;  q = clamp(round(x / scale))
 *   asym: lo = min(min(row), 0) * clip;  hi = max(max(row), 0) * clip;  rng = hi - lo
 *         scale = rng > 0 ? rng / (qmax - qmin) : 1;  zp = clamp(qmin - round(lo / scale))
 *         q = clamp(round(x / scale) + zp)
 * If deq is not NULL the row is written back dequantized instead of as codes (fake quantization, K/V):
 * deq [M, K] in dtype, (q - zp) * scale. */
/* One row of dllmq_quant_rows; `dtype` is a constant at each (inlined) call, so each dtype gets its own
 * straight-line, vectorizable loops. */
static inline __attribute__((always_inline)) void quant_row(const void *x, const int dtype, int64_t k, int asym,
                                                            float clip, int qmin, int qmax, int8_t *qr,
                                                            float *scale_out, int32_t *zp_out, void *deqr) {
    /* min / max over 16 independent lanes (element-wise, so it vectorizes: a plain float min-reduction does
     * not without -fno-signed-zeros), then across lanes; min and max are exact, so the order is free. */
    float lo16[16] = {0}, hi16[16] = {0};
    int64_t i = 0;
#if defined(__AVX512F__)
    /* the same per-lane selects (GCC leaves the loop below scalar): MINPS(v, lo) is `v < lo ? v : lo` for every
     * input, NaN and signed zeros included (it returns the second operand unless v < lo), likewise MAXPS */
    {
        __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
        for (; i + 16 <= k; i += 16) {
            __m512 v = dtype == 1 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                        _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i))), 16))
                                  : _mm512_loadu_ps((const float *)x + i);
            vlo = _mm512_min_ps(v, vlo);
            vhi = _mm512_max_ps(v, vhi);
        }
        _mm512_storeu_ps(lo16, vlo);
        _mm512_storeu_ps(hi16, vhi);
    }
#endif
    for (; i + 16 <= k; i += 16)
        for (int j = 0; j < 16; j++) {
            float v = load(x, dtype, i + j);
            lo16[j] = v < lo16[j] ? v : lo16[j];
            hi16[j] = v > hi16[j] ? v : hi16[j];
        }
    float lo = 0.0f, hi = 0.0f, scale, zp = 0.0f;
    for (int j = 0; j < 16; j++) {
        lo = lo16[j] < lo ? lo16[j] : lo;
        hi = hi16[j] > hi ? hi16[j] : hi;
    }
    for (; i < k; i++) {
        float v = load(x, dtype, i);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    const float fqmin = (float)qmin, fqmax = (float)qmax;
    if (asym) {
        lo = lo * clip;
        hi = hi * clip;
        float rng = hi - lo;
        scale = rng > 0.0f ? rng / (float)(qmax - qmin) : 1.0f;
        zp = fqmin - nearbyintf(lo / scale);
        zp = zp < fqmin ? fqmin : (zp > fqmax ? fqmax : zp);
        *zp_out = (int32_t)zp;
    } else {
        float amax = (-lo > hi ? -lo : hi) * clip;
        scale = amax > 0.0f ? amax / fqmax : 1.0f;
    }
    *scale_out = scale;
    if (deqr == NULL) {
        for (int64_t i = 0; i < k; i++) {
            float c = nearbyintf(load(x, dtype, i) / scale) + zp;
            c = c < fqmin ? fqmin : (c > fqmax ? fqmax : c);
            qr[i] = (int8_t)c;
        }
    } else {
        for (int64_t i = 0; i < k; i++) {
            float c = nearbyintf(load(x, dtype, i) / scale) + zp;
            c = c < fqmin ? fqmin : (c > fqmax ? fqmax : c);
            float v = (c - zp) * scale;
            if (dtype == 1)
                ((uint16_t *)deqr)[i] = f32_to_bf16(v);
            else
                ((float *)deqr)[i] = v;
        }
    }
}

/* Per-row quantization of x [M, K] (row stride ldx elements) to int8 codes q [M, K], fp32 scale [M] and,
 * when asym, the zero point zp [M] (int32). Same arithmetic as grid.quantize_per_token(_affine):
 *   sym:  amax = max|row| * clip;  scale = amax > 0 ? amax / qmax : 1;  q = clamp(round(x / scale))
 *   asym: lo = min(min(row), 0) * clip;  hi = max(max(row), 0) * clip;  rng = hi - lo
 *         scale = rng > 0 ? rng / (qmax - qmin) : 1;  zp = clamp(qmin - round(lo / scale))
 *         q = clamp(round(x / scale) + zp)
 * If deq is not NULL the rows are written dequantized instead of as codes (fake quantization, K/V):
 * deq [M, K] in x's dtype, (q - zp) * scale, as grid.dequantize_per_token. */
void dllmq_quant_rows(const void *x, int dtype, int64_t m, int64_t k, int64_t ldx, int asym, float clip, int qmin,
                      int qmax, int8_t *q, float *scale_out, int32_t *zp_out, void *deq, int nthreads) {
    const int64_t es = dtype == 1 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        const char *xr = (const char *)x + r * ldx * es;
        int8_t *qr = q ? q + r * k : NULL;
        void *dr = deq ? (char *)deq + r * k * es : NULL;
        int32_t *zr = asym ? zp_out + r : NULL;
        if (dtype == 1)
            quant_row(xr, 1, k, asym, clip, qmin, qmax, qr, scale_out + r, zr, dr);
        else
            quant_row(xr, 0, k, asym, clip, qmin, qmax, qr, scale_out + r, zr, dr);
    }
}

/* The int8 GEMM's epilogue for per-channel weights, as int8_linear computes it in torch:
 *   acc' = acc - sum_k(xq[m, :]) * wzp[n]           (int32, only with wzp: 8-bit asymmetric weights)
 *              - xz[m] * wsum[n]                     (int32, only with xz: asymmetric activations)
 *   y = ((float)acc' * xs[m]) * ws[n] (+ bias[n])   -> out [M, N] in out_dtype
 * int32 arithmetic wraps as torch's does, so the order of the two corrections does not matter. bias is in
 * bias_dtype (or NULL). */
#define ROW_BLOCK 16 /* rows per block when acc is transposed: one cache line of int32 per column */

static inline void store_out(void *out, int out_dtype, int64_t i, float y) {
    if (out_dtype == 1)
        ((uint16_t *)out)[i] = f32_to_bf16(y);
    else
        ((float *)out)[i] = y;
}

static inline uint32_t code_sum(const int8_t *xq, int64_t from, int64_t len) {
    uint32_t s = 0;
    for (int64_t i = 0; i < len; i++) s += (uint32_t)(int32_t)xq[from + i];
    return s;
}

/* With `transposed`, acc is [N, M] (the product computed as W @ X^T, which oneDNN runs 1.3-3.5x faster than
 * X @ W^T on CPUs without AMX at 8-256 rows); the arithmetic per element is the same. */
void dllmq_int8_epilogue(const int32_t *acc, int64_t m, int64_t n, const int8_t *xq, int64_t k, const int32_t *wzp,
                         const int32_t *xz, const int32_t *wsum, const float *xs, const float *ws, const void *bias,
                         int bias_dtype, void *out, int out_dtype, int transposed, int nthreads) {
    if (transposed) {
        /* 16 x 16 tiles: computed along the rows (contiguous in acc), transposed in L1, stored along the columns */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t rb = 0; rb < m; rb += ROW_BLOCK) {
            const int64_t re = rb + ROW_BLOCK < m ? rb + ROW_BLOCK : m, nr = re - rb;
            uint32_t xsum[ROW_BLOCK], z[ROW_BLOCK];
            float s[ROW_BLOCK], tile[ROW_BLOCK][ROW_BLOCK];
            for (int64_t r = 0; r < nr; r++) {
                xsum[r] = wzp ? code_sum(xq, (rb + r) * k, k) : 0u;
                z[r] = xz ? (uint32_t)xz[rb + r] : 0u;
                s[r] = xs[rb + r];
            }
            for (int64_t jb = 0; jb < n; jb += ROW_BLOCK) {
                const int64_t nj = n - jb < ROW_BLOCK ? n - jb : ROW_BLOCK;
                for (int64_t j = 0; j < nj; j++) {
                    const int32_t *a = acc + (jb + j) * m + rb;
                    const uint32_t wz = wzp ? (uint32_t)wzp[jb + j] : 0u, sum = xz ? (uint32_t)wsum[jb + j] : 0u;
                    const float w = ws[jb + j];
                    for (int64_t r = 0; r < nr; r++) {
                        const uint32_t v = (uint32_t)a[r] - xsum[r] * wz - z[r] * sum;
                        tile[r][j] = ((float)(int32_t)v * s[r]) * w;
                    }
                }
                for (int64_t r = 0; r < nr; r++)
                    for (int64_t j = 0; j < nj; j++) {
                        float y = tile[r][j];
                        if (bias) y = y + load(bias, bias_dtype, jb + j);
                        store_out(out, out_dtype, (rb + r) * n + jb + j, y);
                    }
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        const int32_t *a = acc + r * n;
        const float s = xs[r];
        const uint32_t z = xz ? (uint32_t)xz[r] : 0u;
        const uint32_t xsum = wzp ? code_sum(xq, r * k, k) : 0u;
        for (int64_t j = 0; j < n; j++) {
            uint32_t v = (uint32_t)a[j];
            if (wzp) v -= xsum * (uint32_t)wzp[j];
            if (xz) v -= z * (uint32_t)wsum[j];
            float y = ((float)(int32_t)v * s) * ws[j];
            if (bias) y = y + load(bias, bias_dtype, j);
            store_out(out, out_dtype, r * n + j, y);
        }
    }
}

/* The epilogue of a group-wise int8 GEMM (`kernels.int8_linear`, weights [G, N, K/G]) for the groups g0 <= g < g1,
 * whose int32 products acc [g1 - g0, M, N] hold. Per output, in the torch code's order:
 *   acc_g' = acc_g - sum_{k in g}(xq[m, k]) * wzp[n, g] - xz[m] * wsum[g, n]     (int32, wrapping)
 *   y = 0;  y = fma((float)acc_g', ws_t[g, n], y)  for g = 0..G-1;  y = y * xs[m] (+ bias[n])  -> out in out_dtype
 * torch's addcmul_ rounds once (its vector kernel is a fused multiply-add), hence fmaf here; elsewhere ISO C
 * contracts nothing, so every other product and sum rounds as torch's separate ops do.
 * Chunks of groups carry y in `partial` (fp32 [M, N]): read unless g0 == 0, written unless g1 == groups, when the
 * result goes to out instead. That bounds the products' buffer (G x the output's size in one piece).
 * Columns go in tiles so the fp32 partial sums stay in L1 while the accumulators stream past. */
#define GROUP_TILE 256
void dllmq_int8_group_epilogue(const int32_t *acc, int64_t groups, int64_t g0, int64_t g1, int64_t m, int64_t n,
                               const int8_t *xq, int64_t k, const int32_t *wzp, const int32_t *xz,
                               const int32_t *wsum, const float *xs, const float *ws_t, const void *bias,
                               int bias_dtype, float *partial, void *out, int out_dtype, int nthreads) {
    const int64_t gs = groups ? k / groups : 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        const float s = xs[r];
        const uint32_t z = xz ? (uint32_t)xz[r] : 0u;
        float y[GROUP_TILE];
        for (int64_t j0 = 0; j0 < n; j0 += GROUP_TILE) {
            const int64_t nj = n - j0 < GROUP_TILE ? n - j0 : GROUP_TILE;
            for (int64_t j = 0; j < nj; j++) y[j] = g0 == 0 ? 0.0f : partial[r * n + j0 + j];
            for (int64_t g = g0; g < g1; g++) {
                const int32_t *a = acc + ((g - g0) * m + r) * n + j0;
                const float *w = ws_t + g * n + j0;
                if (!wzp && !xz) {
                    for (int64_t j = 0; j < nj; j++) y[j] = fmaf((float)a[j], w[j], y[j]);
                    continue;
                }
                const uint32_t xsum = wzp ? code_sum(xq, r * k + g * gs, gs) : 0u;
                for (int64_t j = 0; j < nj; j++) {
                    uint32_t v = (uint32_t)a[j];
                    if (wzp) v -= xsum * (uint32_t)wzp[(j0 + j) * groups + g];
                    if (xz) v -= z * (uint32_t)wsum[g * n + j0 + j];
                    y[j] = fmaf((float)(int32_t)v, w[j], y[j]);
                }
            }
            if (g1 < groups) {
                for (int64_t j = 0; j < nj; j++) partial[r * n + j0 + j] = y[j];
                continue;
            }
            for (int64_t j = 0; j < nj; j++) {
                float f = y[j] * s;
                if (bias) f = f + load(bias, bias_dtype, j0 + j);
                store_out(out, out_dtype, r * n + j0 + j, f);
            }
        }
    }
}

/* out[m, t] = x[m, perm[t]] for 2-byte elements (bf16 / fp16), rows of length k: a column permutation,
 * which PyTorch's advanced indexing runs 10-30x slower than a row copy. */
void dllmq_gather_cols16(const uint16_t *x, int64_t m, int64_t k, const int64_t *perm, uint16_t *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *xr = x + r * k;
        uint16_t *o = out + r * k;
        for (int64_t t = 0; t < k; t++) o[t] = xr[perm[t]];
    }
}

/* The same for 4-byte elements (float32 activations). */
void dllmq_gather_cols32(const uint32_t *x, int64_t m, int64_t k, const int64_t *perm, uint32_t *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        const uint32_t *xr = x + r * k;
        uint32_t *o = out + r * k;
        for (int64_t t = 0; t < k; t++) o[t] = xr[perm[t]];
    }
}

/* Weight dequantization for the dense paths (`grid.dequantize`): w[n, k] = ((float)q - (float)zp[n, g]) *
 * scale[n, g] with g = k / group_len, written in out_dtype. q comes packed as the checkpoint stores it
 * (`checkpoint.packing.pack_rows`): `bits` of 2 or 4 are 32/bits unsigned values per int32 word, least
 * significant first, offset by 2^(bits-1) (words_per_row words per row); bits 8 is a plain int8 [N, K].
 * PyTorch needs 8-10 passes with int64 temporaries for this (unpack, subtract, scale, cast). With AVX-512 each
 * 16 values are unpacked by variable shifts in one register; the bf16 rounding is c10's (integer round to nearest
 * even, no flush of subnormals, which VCVTNEPS2BF16 would do). */
static inline float code_at(const void *packed, int bits, int64_t row, int64_t k, int64_t words_per_row, int64_t i) {
    if (bits == 8) return (float)((const int8_t *)packed)[row * k + i];
    const int per_word = 32 / bits;
    const uint32_t w = ((const uint32_t *)packed)[row * words_per_row + i / per_word];
    return (float)((int32_t)((w >> ((i % per_word) * bits)) & ((1u << bits) - 1u)) - (1 << (bits - 1)));
}

#if defined(__AVX512F__)
static inline void store16(void *out, int out_dtype, int64_t i, __m512 v) {
    if (out_dtype == 1) {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
        _mm512_storeu_ps((float *)out + i, v);
    }
}

/* 16 codes starting at value i (i % 16 == 0 for 2/4 bits) as floats. */
static inline __m512 codes16(const void *packed, int bits, int64_t row, int64_t k, int64_t words_per_row, int64_t i) {
    __m512i q;
    if (bits == 8) {
        q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)packed + row * k + i)));
    } else {
        const uint32_t *w = (const uint32_t *)packed + row * words_per_row + i * bits / 32;
        __m512i v, sh;
        if (bits == 4) {  /* two words: values 0-7 from w[0], 8-15 from w[1] */
            v = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32((int)w[0]), _mm512_set1_epi32((int)w[1]));
            sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
        } else { /* 2 bits: one word holds all 16 */
            v = _mm512_set1_epi32((int)w[0]);
            sh = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        }
        q = _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32((1 << bits) - 1));
        q = _mm512_sub_epi32(q, _mm512_set1_epi32(1 << (bits - 1)));
    }
    return _mm512_cvtepi32_ps(q);
}
#elif defined(__AVX2__)
static inline void store8(void *out, int out_dtype, int64_t i, __m256 v) {
    if (out_dtype == 1) {
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
        u = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08); /* 8 x uint16 in the low 128 bits */
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(u));
    } else {
        _mm256_storeu_ps((float *)out + i, v);
    }
}

/* 8 codes starting at value i (i % 8 == 0 for 2/4 bits) as floats. */
static inline __m256 codes8(const void *packed, int bits, int64_t row, int64_t k, int64_t words_per_row, int64_t i) {
    __m256i q;
    if (bits == 8) {
        q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)packed + row * k + i)));
    } else {
        const uint32_t w = ((const uint32_t *)packed)[row * words_per_row + i * bits / 32];
        const __m256i sh = bits == 4 ? _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0)
                                     : _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0);
        const int half = bits == 2 ? (int)((i % 16) / 8) * 16 : 0; /* 2 bits: 16 values per word */
        q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(w >> half)), sh),
                             _mm256_set1_epi32((1 << bits) - 1));
        q = _mm256_sub_epi32(q, _mm256_set1_epi32(1 << (bits - 1)));
    }
    return _mm256_cvtepi32_ps(q);
}
#endif

void dllmq_dequant_rows(const void *packed, int bits, int64_t n, int64_t k, int64_t words_per_row, const float *scale,
                        const int32_t *zp, int64_t groups, int64_t group_len, void *out, int out_dtype, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < n; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const float s = scale[r * groups + g];
            const float z = zp ? (float)zp[r * groups + g] : 0.0f;
            const int64_t k0 = g * group_len, k1 = k0 + group_len;
            int64_t i = k0;
#if defined(__AVX512F__)
            if (k0 % 16 == 0) {
                const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
                for (; i + 16 <= k1; i += 16) {
                    __m512 q = codes16(packed, bits, r, k, words_per_row, i);
                    if (zp) q = _mm512_sub_ps(q, vz);
                    store16(out, out_dtype, r * k + i, _mm512_mul_ps(q, vs));
                }
            }
#elif defined(__AVX2__)
            if (k0 % 8 == 0) {
                const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
                for (; i + 8 <= k1; i += 8) {
                    __m256 q = codes8(packed, bits, r, k, words_per_row, i);
                    if (zp) q = _mm256_sub_ps(q, vz);
                    store8(out, out_dtype, r * k + i, _mm256_mul_ps(q, vs));
                }
            }
#endif
            for (; i < k1; i++) {
                const float q = code_at(packed, bits, r, k, words_per_row, i);
                store_out(out, out_dtype, r * k + i, (zp ? q - z : q) * s);
            }
        }
    }
}

/* What the dot-product kernels below were compiled with, as bits: 1 = AVX512-BF16 (dllmq_duquant_rows),
 * 2 = AVX512-VNNI (dllmq_int8_vnni_linear, any int8 weight codes), 4 = AVX2 only (dllmq_int8_vnni_linear emulating
 * VPDPBUSD, exact for weight codes |w| <= 64 only), 8 = AVX2 + FMA (dllmq_w32_dot_linear), 16 = AVX2
 * (dllmq_int8_mm). Without one, that kernel returns 0 and the caller falls back. */
int dllmq_features(void) {
    int f = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    f |= 1;
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    f |= 2;
#elif defined(__AVX2__)
    f |= 4;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    f |= 8;
#endif
#if defined(__AVX2__)
    f |= 16;
#endif
    return f;
}

#define TILE_ROWS 4 /* rows per register tile of the dot-product kernels below */

/* The rotations as VDPBF16PS reads them: out[i][p][c][2] = (r[i][2p][c], r[i][2p + 1][c]) for r [nb, b, b]. */
void dllmq_pack_bf16_pairs(const uint16_t *r, int64_t nb, int64_t b, uint16_t *out) {
    for (int64_t i = 0; i < nb; i++)
        for (int64_t p = 0; p < b / 2; p++)
            for (int64_t c = 0; c < b; c++) {
                out[((i * (b / 2) + p) * b + c) * 2] = r[(i * b + 2 * p) * b + c];
                out[((i * (b / 2) + p) * b + c) * 2 + 1] = r[(i * b + 2 * p + 1) * b + c];
            }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
/* out[r, c0 : c0 + 16 nv] = in[r, :b] @ R[:, c0 : c0 + 16 nv] for the TILE_ROWS rows (row stride ld), R packed
 * in pairs; nv <= 4 column vectors, 4 x 4 accumulators in registers. With pp (a permutation's b entries for this
 * block) the rows are read permuted, in[r, pp[j]] for input j, and `in` is the start of the whole row: DuQuant's
 * permutation costs two scalar loads per pair here instead of a pass of its own (13 % of the transform). */
static inline __attribute__((always_inline)) void rot_cols(const uint16_t *in, int64_t ld, const int64_t *pp,
                                                           const uint16_t *rp, int64_t b, int64_t c0, const int nv,
                                                           uint16_t *out) {
    __m512 acc[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < b / 2; p++) {
        const uint16_t *w = rp + (p * b + c0) * 2;
        __m512bh wv[4];
        for (int v = 0; v < nv; v++) wv[v] = (__m512bh)_mm512_loadu_si512(w + 32 * v);
        for (int r = 0; r < TILE_ROWS; r++) {
            int32_t pair;
            if (pp == NULL)
                memcpy(&pair, in + r * ld + 2 * p, 4);
            else
                pair = (int32_t)((uint32_t)in[r * ld + pp[2 * p]] | ((uint32_t)in[r * ld + pp[2 * p + 1]] << 16));
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < nv; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, wv[v]);
        }
    }
    for (int r = 0; r < TILE_ROWS; r++)
        for (int v = 0; v < nv; v++) store16(out, 1, r * ld + c0 + 16 * v, acc[r][v]);
}

/* Block i of a tile's rows (row stride ld): out[:, i b : (i + 1) b] = in[:, i b : (i + 1) b] @ R_i (rp: R_i packed),
 * or with perm, (in P)[:, i b : (i + 1) b] @ R_i for the permutation P of a whole row (in P)[:, j] = in[:, perm[j]]. */
static void rotate_block(const uint16_t *in, int64_t ld, const int64_t *perm, const uint16_t *rp, int64_t i, int64_t b,
                         uint16_t *out) {
    const uint16_t *src = perm == NULL ? in + i * b : in;
    const int64_t *pp = perm == NULL ? NULL : perm + i * b;
    int64_t c0 = 0;
    if (pp == NULL) { /* two copies of the loops, so that each inlined rot_cols knows whether it permutes */
        for (; c0 + 64 <= b; c0 += 64) rot_cols(src, ld, NULL, rp, b, c0, 4, out + i * b);
        for (; c0 < b; c0 += 16) rot_cols(src, ld, NULL, rp, b, c0, 1, out + i * b);
    } else {
        for (; c0 + 64 <= b; c0 += 64) rot_cols(src, ld, pp, rp, b, c0, 4, out + i * b);
        for (; c0 < b; c0 += 16) rot_cols(src, ld, pp, rp, b, c0, 1, out + i * b);
    }
}
#endif

/* DuQuant's online transform (duquant.DuQuantTransform.apply) on bf16 rows: y = ((x / s) R1) P R2 with R1, R2
 * block-diagonal [nb, b, b], each product rounded to bf16 as torch's bf16 bmm returns it, optionally followed by
 * the per-token quantization of y (quant_row, the same function dllmq_quant_rows runs: codes bit-identical to
 * quantizing the returned y). PyTorch runs this as ~10 ops (divide, 2 transposing copies per bmm, gather) of
 * which the copies and dispatch cost as much as the products at the bundled model's width; here one pass
 * keeps each chunk of rows in cache from x to codes. The products use VDPBF16PS (fp32 accumulation of
 * bf16 pairs in k order); they matched oneDNN's bf16 bmm bit for bit on an AVX512-BF16 CPU, and differ from
 * other GEMMs (AMX tiles) only in summation order.
 *
 * x [M, K] bf16 (row stride ldx), s [K] bf16 or NULL, r1p / r2p packed pairs, perm [K], block size b (K = nb b,
 * b % 16 == 0). Writes y [M, K] bf16 when not NULL and, when q is not NULL, the codes q [M, K], scale [M] and (asym)
 * zp [M] of quant_row. Returns 0 without the CPU extension or memory (the caller falls back), 1 when done.
 * Each thread takes chunks of up to CHUNK_ROWS rows and runs every stage over its chunk block by block, so a
 * rotation block (32 KiB at b = 128) is read once per chunk and stays in cache across the chunk's tiles: at
 * LLaDA-8B's MLP width the rotations are 3 MiB each, which 4-row tiles would stream from memory 64 times per
 * 256-row call. */
#define CHUNK_ROWS 64
int dllmq_duquant_rows(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *s, const uint16_t *r1p,
                       const int64_t *perm, const uint16_t *r2p, int64_t b, uint16_t *y, int asym, float clip,
                       int qmin, int qmax, int8_t *q, float *scale_out, int32_t *zp_out, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    const int64_t nb = k / b;
    /* chunk: the rows per thread (so 2 threads split 96 rows 48 / 48), in whole tiles, at most CHUNK_ROWS */
    int64_t cr = (m + nthreads - 1) / nthreads;
    cr = (cr + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    cr = cr > CHUNK_ROWS ? CHUNK_ROWS : (cr < TILE_ROWS ? TILE_ROWS : cr);
    const int64_t chunks = (m + cr - 1) / cr;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        uint16_t *buf = (uint16_t *)malloc(sizeof(uint16_t) * cr * k * 2);
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        uint16_t *t0 = buf, *t1 = buf + cr * k;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            if (buf == NULL) continue;
            const int64_t r0 = c * cr, nr = m - r0 < cr ? m - r0 : cr;
            const int64_t tiles = (nr + TILE_ROWS - 1) / TILE_ROWS, padded = tiles * TILE_ROWS;
            for (int64_t r = 0; r < padded; r++) { /* x / s, rounded to bf16 as torch's bf16 division; zero padding */
                uint16_t *d = t0 + r * k;
                if (r >= nr) {
                    memset(d, 0, sizeof(uint16_t) * k);
                } else {
                    const uint16_t *xr = x + (r0 + r) * ldx;
                    if (s == NULL)
                        memcpy(d, xr, sizeof(uint16_t) * k);
                    else
                        for (int64_t j = 0; j < k; j++) d[j] = f32_to_bf16(bf16_to_f32(xr[j]) / bf16_to_f32(s[j]));
                }
            }
            for (int64_t i = 0; i < nb; i++) /* t1 = t0 R1, block by block over all tiles */
                for (int64_t t = 0; t < tiles; t++)
                    rotate_block(t0 + t * TILE_ROWS * k, k, NULL, r1p + i * b * b, i, b, t1 + t * TILE_ROWS * k);
            for (int64_t i = 0; i < nb; i++) /* t0 = (t1 P) R2, the permutation read inside the products */
                for (int64_t t = 0; t < tiles; t++)
                    rotate_block(t1 + t * TILE_ROWS * k, k, perm, r2p + i * b * b, i, b, t0 + t * TILE_ROWS * k);
            for (int64_t r = 0; r < nr; r++) {
                const uint16_t *yr = t0 + r * k;
                if (y != NULL) memcpy(y + (r0 + r) * k, yr, sizeof(uint16_t) * k);
                if (q != NULL)
                    quant_row(yr, 1, k, asym, clip, qmin, qmax, q + (r0 + r) * k, scale_out + r0 + r,
                              asym ? zp_out + r0 + r : NULL, NULL);
            }
        }
        free(buf);
    }
    return failed ? 0 : 1;
#else
    (void)x; (void)m; (void)k; (void)ldx; (void)s; (void)r1p; (void)perm; (void)r2p; (void)b; (void)y; (void)asym;
    (void)clip; (void)qmin; (void)qmax; (void)q; (void)scale_out; (void)zp_out; (void)nthreads;
    return 0;
#endif
}

/* The whole integer GEMM of a W8A8 / W4A8 / W4A4 layer (`kernels.int8_linear`) with its epilogue, in one pass:
 * per-token activation codes xq [M, K] (int8) times weight codes (int8, zero points folded in) laid out by
 * dllmq_pack_vnni, int32 accumulation with VPDPBUSD, then the corrections, scales, bias and cast of
 * dllmq_int8_epilogue (per channel, groups == 1) or dllmq_int8_group_epilogue (groups > 1: each group's int32 sum is
 * scaled into the fp32 result as soon as the group ends, so no [G, M, N] product buffer exists). Same integers
 * (exact) and the same float operations in the same order as those epilogues: bit-identical outputs.
 * VPDPBUSD multiplies unsigned by signed bytes, so the codes go in offset by 128 and the accumulator loses
 * 128 * (the group's weight code sum): with the activation zero point, acc - (128 + xz) * wsum, in wrapping int32
 * like the epilogues. At the bundled model's width PyTorch's path for the same layer is ~8 ops and two native calls
 * with a fresh tensor each, which cost as much as the GEMM itself. */

/* w [N, K] int8 -> out[((jv * (K / 4) + kk) * 16 + c) * 4 + t] = w[16 jv + c, 4 kk + t]: 16 columns x 4 inputs per
 * 64-byte vector, the operand layout of VPDPBUSD (N % 16 == 0, K % 4 == 0). */
void dllmq_pack_vnni(const int8_t *w, int64_t n, int64_t k, int8_t *out) {
    const int64_t kq = k / 4;
    for (int64_t jv = 0; jv < n / 16; jv++)
        for (int64_t kk = 0; kk < kq; kk++)
            for (int c = 0; c < 16; c++)
                memcpy(out + ((jv * kq + kk) * 16 + c) * 4, w + (jv * 16 + c) * k + kk * 4, 4);
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
/* acc[r, 16 v + c] = sum over inputs 4 kk0 .. 4 kk1 of xu[r, .] w[16 (jv0 + v) + c, .] for TILE_ROWS rows, nv <= 4
 * column vectors (acc rows of 64 int32). */
static inline __attribute__((always_inline)) void vnni_cols(const uint8_t *xu, int64_t k, const int8_t *wp,
                                                            int64_t jv0, const int nv, int64_t kk0, int64_t kk1,
                                                            int32_t *acc) {
    const int64_t kq = k / 4;
    __m512i a[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; r++)
        for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_si512();
    for (int64_t kk = kk0; kk < kk1; kk++) {
        __m512i wv[4];
        for (int v = 0; v < nv; v++) wv[v] = _mm512_loadu_si512(wp + ((jv0 + v) * kq + kk) * 64);
        for (int r = 0; r < TILE_ROWS; r++) {
            int32_t quad;
            memcpy(&quad, xu + r * k + 4 * kk, 4);
            const __m512i bx = _mm512_set1_epi32(quad);
            for (int v = 0; v < nv; v++) a[r][v] = _mm512_dpbusd_epi32(a[r][v], bx, wv[v]);
        }
    }
    for (int r = 0; r < TILE_ROWS; r++)
        for (int v = 0; v < nv; v++) _mm512_storeu_si512(acc + r * 64 + 16 * v, a[r][v]);
}
#elif defined(__AVX2__)
#define DLLMQ_INT8_DOT 1
/* The same sums on CPUs with AVX2 and no VNNI (where PyTorch's `_int_mm` runs a reference loop, 20x slower than the
 * fp32 GEMM): VPDPBUSD emulated by VPMADDUBSW (pairs of u8 x s8 products summed to saturating int16) and VPMADDWD
 * against ones (pairs of those summed to int32). No pair saturates while |w| <= 64 (2 * 255 * 64 < 32768), which
 * the caller guarantees (weights of <= 6 bits with their zero points folded in): then the sums are exact and equal
 * VPDPBUSD's. One 16-column vector (two 8-column halves) per call keeps TILE_ROWS x 2 accumulators in registers. */
static inline __attribute__((always_inline)) void vnni_cols(const uint8_t *xu, int64_t k, const int8_t *wp,
                                                            int64_t jv0, const int nv, int64_t kk0, int64_t kk1,
                                                            int32_t *acc) {
    const int64_t kq = k / 4;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int v = 0; v < nv; v++) {
        __m256i a[TILE_ROWS][2];
        for (int r = 0; r < TILE_ROWS; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
        const int8_t *wv = wp + (jv0 + v) * kq * 64;
        for (int64_t kk = kk0; kk < kk1; kk++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wv + kk * 64));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wv + kk * 64 + 32));
            for (int r = 0; r < TILE_ROWS; r++) {
                int32_t quad;
                memcpy(&quad, xu + r * k + 4 * kk, 4);
                const __m256i bx = _mm256_set1_epi32(quad);
                a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(bx, w0), ones));
                a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(bx, w1), ones));
            }
        }
        for (int r = 0; r < TILE_ROWS; r++) {
            _mm256_storeu_si256((__m256i *)(acc + r * 64 + 16 * v), a[r][0]);
            _mm256_storeu_si256((__m256i *)(acc + r * 64 + 16 * v + 8), a[r][1]);
        }
    }
}
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define DLLMQ_INT8_DOT 1
#endif

/* xq [M, K] codes, xs [M] fp32 scales, xz [M] int32 zero points or NULL (symmetric), wp packed [N, K] codes, wsum
 * [groups, N] int32 code sums per group, ws [groups, N] fp32 scales (per channel: [N]), bias [N] or NULL; out [M, N]
 * in out_dtype. Returns 0 without the CPU extension or memory (the caller falls back), 1 when done. */
int dllmq_int8_vnni_linear(const int8_t *xq, int64_t m, int64_t k, const float *xs, const int32_t *xz,
                           const int8_t *wp, int64_t n, int64_t groups, const int32_t *wsum, const float *ws,
                           const void *bias, int bias_dtype, void *out, int out_dtype, int nthreads) {
#if defined(DLLMQ_INT8_DOT)
    const int64_t tiles = (m + TILE_ROWS - 1) / TILE_ROWS, nvec = n / 16, blocks = (nvec + 3) / 4;
    const int64_t gq = k / groups / 4; /* VPDPBUSD steps per group */
    uint8_t *xu = (uint8_t *)malloc((size_t)(tiles * TILE_ROWS * k));
    if (xu == NULL) return 0;
    /* codes + 128 as unsigned bytes; padding rows hold code 0 (their outputs are not stored) */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < tiles * TILE_ROWS; r++)
        for (int64_t i = 0; i < k; i++) xu[r * k + i] = r < m ? (uint8_t)((uint8_t)xq[r * k + i] ^ 0x80u) : 0x80u;
    /* column blocks outer: a block's weights (64 columns x K bytes) stay in cache while the row tiles pass */
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t jb = 0; jb < blocks; jb++)
        for (int64_t t = 0; t < tiles; t++) {
            int32_t acc[TILE_ROWS * 64];
            float y[TILE_ROWS * 64];
            const int64_t jv0 = jb * 4, j0 = jv0 * 16, r0 = t * TILE_ROWS;
            const int nv = nvec - jv0 < 4 ? (int)(nvec - jv0) : 4, cols = 16 * nv;
            const int nr = m - r0 < TILE_ROWS ? (int)(m - r0) : TILE_ROWS;
            const uint8_t *xt = xu + r0 * k;
            for (int64_t g = 0; g < groups; g++) {
                if (nv == 4)
                    vnni_cols(xt, k, wp, jv0, 4, g * gq, (g + 1) * gq, acc);
                else
                    for (int v = 0; v < nv; v++) vnni_cols(xt, k, wp, jv0 + v, 1, g * gq, (g + 1) * gq, acc + 16 * v);
                for (int r = 0; r < nr; r++) {
                    const uint32_t z = 128u + (xz ? (uint32_t)xz[r0 + r] : 0u);
                    const int32_t *ws_g = wsum + g * n + j0;
                    const float *sc = ws + g * n + j0;
                    int32_t *a = acc + r * 64;
                    float *yr = y + r * 64;
                    for (int c = 0; c < cols; c++) a[c] = (int32_t)((uint32_t)a[c] - z * (uint32_t)ws_g[c]);
                    if (groups == 1) {
                        const float s = xs[r0 + r];
                        for (int c = 0; c < cols; c++) yr[c] = ((float)a[c] * s) * sc[c];
                    } else if (g == 0) {
                        for (int c = 0; c < cols; c++) yr[c] = fmaf((float)a[c], sc[c], 0.0f);
                    } else {
                        for (int c = 0; c < cols; c++) yr[c] = fmaf((float)a[c], sc[c], yr[c]);
                    }
                }
            }
            for (int r = 0; r < nr; r++) {
                const float s = xs[r0 + r];
                const float *yr = y + r * 64;
                for (int c = 0; c < cols; c++) {
                    float f = groups == 1 ? yr[c] : yr[c] * s;
                    if (bias) f = f + load(bias, bias_dtype, j0 + c);
                    store_out(out, out_dtype, (r0 + r) * n + j0 + c, f);
                }
            }
        }
    free(xu);
    return 1;
#else
    (void)xq; (void)m; (void)k; (void)xs; (void)xz; (void)wp; (void)n; (void)groups; (void)wsum; (void)ws; (void)bias;
    (void)bias_dtype; (void)out; (void)out_dtype; (void)nthreads;
    return 0;
#endif
}

/* A weight-only layer (W2/W4/W8 A16) without a dense copy: y [M, N] = x [M, K] (bf16) @ W^T (+ bias), W dequantized
 * from the stored codes (dllmq_dequant_rows: bf16, as the dense path's copy) one block of DOT_COLS columns at a
 * time into a per-thread buffer that stays in cache, then multiplied with VDPBF16PS: weight pairs broadcast, the
 * activations as 16-row vectors of pairs (xp[p][r] = (x[r][2p], x[r][2p + 1]), packed once per call), fp32 sums
 * carried across chunks of DOT_KC pairs, rounded once to out_dtype (+ bias in fp32). The per-call dense path writes
 * the whole bf16 weight to memory and reads it back; here each block is reused from cache by every row. The sums
 * are those of a bf16 GEMM in another order: not bit-identical to oneDNN's (relative ~1e-5). K even, bits 2/4/8. */
#define DOT_COLS 64
#define DOT_NC 8
#define DOT_KC 256
#if defined(__AVX512BF16__) && defined(__AVX512F__)
static inline __attribute__((always_inline)) void dot_cols(const uint32_t *xp, int64_t mp, int64_t r0, const int rv,
                                                           const uint16_t *wb, int64_t k, int64_t c0, const int nc,
                                                           int64_t p0, int64_t p1, float *part) {
    __m512 acc[DOT_NC][2];
    for (int c = 0; c < nc; c++)
        for (int v = 0; v < rv; v++)
            acc[c][v] = p0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(part + (c * 2 + v) * 16);
    for (int64_t p = p0; p < p1; p++) {
        __m512bh xv[2];
        for (int v = 0; v < rv; v++) xv[v] = (__m512bh)_mm512_loadu_si512(xp + p * mp + r0 + 16 * v);
        for (int c = 0; c < nc; c++) {
            int32_t pair;
            memcpy(&pair, wb + (c0 + c) * k + 2 * p, 4);
            const __m512bh wv = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < rv; v++) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], wv, xv[v]);
        }
    }
    for (int c = 0; c < nc; c++)
        for (int v = 0; v < rv; v++) _mm512_storeu_ps(part + (c * 2 + v) * 16, acc[c][v]);
}
#endif

int dllmq_w16_dot_linear(const uint16_t *x, int64_t m, int64_t k, const void *packed, int bits, int64_t words_per_row,
                         const float *scale, const int32_t *zp, int64_t groups, const void *bias, int bias_dtype,
                         void *out, int out_dtype, int64_t n, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    const int64_t mp = (m + 15) / 16 * 16, kp = k / 2, group_len = k / groups;
    const int64_t blocks = (n + DOT_COLS - 1) / DOT_COLS;
    uint32_t *xp = (uint32_t *)malloc(sizeof(uint32_t) * kp * mp);
    if (xp == NULL) return 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t p0 = 0; p0 < kp; p0 += 64) { /* 64 pairs x all rows at a time: reads along rows, writes in lines */
        const int64_t p1 = p0 + 64 < kp ? p0 + 64 : kp;
        for (int64_t r = 0; r < mp; r++)
            for (int64_t p = p0; p < p1; p++) {
                uint32_t v = 0;
                if (r < m) memcpy(&v, x + r * k + 2 * p, 4);
                xp[p * mp + r] = v;
            }
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        uint16_t *wb = (uint16_t *)malloc(sizeof(uint16_t) * DOT_COLS * k);
        float part[DOT_COLS * 32];
        if (wb == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (wb == NULL) continue;
            const int64_t j0 = b * DOT_COLS, nb = n - j0 < DOT_COLS ? n - j0 : DOT_COLS;
            const void *pk = bits == 8 ? (const void *)((const int8_t *)packed + j0 * k)
                                       : (const void *)((const int32_t *)packed + j0 * words_per_row);
            dllmq_dequant_rows(pk, bits, nb, k, words_per_row, scale + j0 * groups, zp ? zp + j0 * groups : NULL,
                               groups, group_len, wb, 1, 1);
            for (int64_t r0 = 0; r0 < mp; r0 += 32) {
                const int rv = mp - r0 >= 32 ? 2 : 1;
                for (int64_t p0 = 0; p0 < kp; p0 += DOT_KC) {
                    const int64_t p1 = p0 + DOT_KC < kp ? p0 + DOT_KC : kp;
                    for (int64_t c0 = 0; c0 < nb; c0 += DOT_NC) {
                        const int nc = nb - c0 < DOT_NC ? (int)(nb - c0) : DOT_NC;
                        float *pc = part + c0 * 32;
                        if (rv == 2 && nc == DOT_NC)
                            dot_cols(xp, mp, r0, 2, wb, k, c0, DOT_NC, p0, p1, pc);
                        else if (nc == DOT_NC)
                            dot_cols(xp, mp, r0, 1, wb, k, c0, DOT_NC, p0, p1, pc);
                        else
                            dot_cols(xp, mp, r0, rv, wb, k, c0, nc, p0, p1, pc);
                    }
                }
                for (int64_t c = 0; c < nb; c++) {
                    const float *pc = part + (c / DOT_NC) * DOT_NC * 32 + (c % DOT_NC) * 32;
                    const float bv = bias ? load(bias, bias_dtype, j0 + c) : 0.0f;
                    for (int i = 0; i < 16 * rv; i++) {
                        const int64_t r = r0 + i;
                        if (r >= m) break;
                        float y = pc[i];
                        if (bias) y = y + bv;
                        store_out(out, out_dtype, r * n + j0 + c, y);
                    }
                }
            }
        }
        free(wb);
    }
    free(xp);
    return failed ? 0 : 1;
#else
    (void)x; (void)m; (void)k; (void)packed; (void)bits; (void)words_per_row; (void)scale; (void)zp; (void)groups;
    (void)bias; (void)bias_dtype; (void)out; (void)out_dtype; (void)n; (void)nthreads;
    return 0;
#endif
}

/* dllmq_w16_dot_linear for float32 activations on CPUs without AVX512-BF16 (AVX2 + FMA), where the layer would
 * otherwise dequantize its whole weight to float32 per call (4 B/weight written and read back) before the GEMM:
 * W is dequantized to float32 (dllmq_dequant_rows, bit-identical to the dense copy) W32_COLS columns at a time into a
 * per-thread buffer, and multiplied there: weights broadcast, activations as 8-row vectors (xp[k][r] = x[r][k],
 * packed once per call), fp32 FMAs carried across chunks of W32_KC inputs, bias added in fp32. The products of the
 * dense float32 GEMM, summed in another order (not bit-identical to MKL's: relative ~1e-6). Bits 2/4/8. */
#define W32_COLS 16
#define W32_KC 512
#if defined(__AVX2__) && defined(__FMA__)
#define DLLMQ_W32_DOT 1
/* part[(c0 + c) * 24 + 8 v + i] (+)= sum over inputs k0 .. k1 of wb[c0 + c][.] xp[.][r0 + 8 v + i], for NC columns and
 * RV vectors of 8 rows: NC x RV accumulators (8-12, enough to cover the FMA latency) stay in registers. */
#define DOT32(NC, RV)                                                                                                \
    static void dot32_##NC##x##RV(const float *xp, int64_t mp, int64_t r0, const float *wb, int64_t k, int64_t c0,  \
                                  int64_t k0, int64_t k1, float *part) {                                            \
        __m256 acc[NC][RV];                                                                                          \
        for (int c = 0; c < NC; c++)                                                                                 \
            for (int v = 0; v < RV; v++)                                                                             \
                acc[c][v] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(part + (c0 + c) * 24 + 8 * v);          \
        for (int64_t i = k0; i < k1; i++) {                                                                          \
            __m256 xv[RV];                                                                                           \
            for (int v = 0; v < RV; v++) xv[v] = _mm256_loadu_ps(xp + i * mp + r0 + 8 * v);                          \
            for (int c = 0; c < NC; c++) {                                                                           \
                const __m256 wv = _mm256_broadcast_ss(wb + (c0 + c) * k + i);                                        \
                for (int v = 0; v < RV; v++) acc[c][v] = _mm256_fmadd_ps(wv, xv[v], acc[c][v]);                      \
            }                                                                                                        \
        }                                                                                                            \
        for (int c = 0; c < NC; c++)                                                                                 \
            for (int v = 0; v < RV; v++) _mm256_storeu_ps(part + (c0 + c) * 24 + 8 * v, acc[c][v]);                  \
    }
DOT32(8, 1)
DOT32(4, 2)
DOT32(4, 3)
#endif

int dllmq_w32_dot_linear(const float *x, int64_t m, int64_t k, const void *packed, int bits, int64_t words_per_row,
                         const float *scale, const int32_t *zp, int64_t groups, const void *bias, int bias_dtype,
                         float *out, int64_t n, int nthreads) {
#if defined(DLLMQ_W32_DOT)
    const int64_t mp = (m + 7) / 8 * 8, group_len = k / groups; /* rows padded to whole 8-row vectors */
    const int64_t blocks = (n + W32_COLS - 1) / W32_COLS;
    float *xp = (float *)malloc(sizeof(float) * k * mp);
    if (xp == NULL) return 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t i0 = 0; i0 < k; i0 += 64) { /* 64 inputs x all rows at a time: reads along rows, writes in lines */
        const int64_t i1 = i0 + 64 < k ? i0 + 64 : k;
        for (int64_t r = 0; r < mp; r++)
            for (int64_t i = i0; i < i1; i++) xp[i * mp + r] = r < m ? x[r * k + i] : 0.0f;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        float *wb = (float *)malloc(sizeof(float) * W32_COLS * k);
        float part[W32_COLS * 24];
        if (wb == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (wb == NULL) continue;
            const int64_t j0 = b * W32_COLS, nb = n - j0 < W32_COLS ? n - j0 : W32_COLS;
            const void *pk = bits == 8 ? (const void *)((const int8_t *)packed + j0 * k)
                                       : (const void *)((const int32_t *)packed + j0 * words_per_row);
            dllmq_dequant_rows(pk, bits, nb, k, words_per_row, scale + j0 * groups, zp ? zp + j0 * groups : NULL,
                               groups, group_len, wb, 0, 1);
            if (nb < W32_COLS) memset(wb + nb * k, 0, sizeof(float) * (W32_COLS - nb) * k); /* zero columns */
            for (int64_t r0 = 0; r0 < mp; r0 += 24) {
                const int rv = mp - r0 >= 24 ? 3 : (int)((mp - r0) / 8);
                for (int64_t k0 = 0; k0 < k; k0 += W32_KC) {
                    const int64_t k1 = k0 + W32_KC < k ? k0 + W32_KC : k;
                    for (int64_t c0 = 0; c0 < W32_COLS; c0 += rv == 1 ? 8 : 4) {
                        if (rv == 1)
                            dot32_8x1(xp, mp, r0, wb, k, c0, k0, k1, part);
                        else if (rv == 2)
                            dot32_4x2(xp, mp, r0, wb, k, c0, k0, k1, part);
                        else
                            dot32_4x3(xp, mp, r0, wb, k, c0, k0, k1, part);
                    }
                }
                for (int64_t c = 0; c < nb; c++) {
                    const float *pc = part + c * 24;
                    const float bv = bias ? load(bias, bias_dtype, j0 + c) : 0.0f;
                    for (int i = 0; i < 8 * rv; i++) {
                        const int64_t r = r0 + i;
                        if (r >= m) break;
                        out[r * n + j0 + c] = bias ? pc[i] + bv : pc[i];
                    }
                }
            }
        }
        free(wb);
    }
    free(xp);
    return failed ? 0 : 1;
#else
    (void)x; (void)m; (void)k; (void)packed; (void)bits; (void)words_per_row; (void)scale; (void)zp; (void)groups;
    (void)bias; (void)bias_dtype; (void)out; (void)n; (void)nthreads;
    return 0;
#endif
}

/* out[M, N] (row stride ldo) = x[M, K] (int8, row stride ldx) @ w[N, K]^T (int8, row stride ldw), int32: PyTorch's
 * `_int_mm` for CPUs with AVX2 and no VNNI, where PyTorch runs a reference loop (20x the float32 GEMM at LLaDA-8B
 * shapes). The rows of x are widened to int16 once per call, each 16 weights of a row once per 4-row tile
 * (VPMOVSXBW), and VPMADDWD sums pairs of int16 products into int32 lanes: exact for any int8 values, so the result
 * equals `_int_mm`'s. Tiles of 4 rows x 2 columns keep 8 accumulators in registers; blocks of I8MM_COLS weight rows
 * stay in cache while the row tiles pass. K % 16 == 0. */
#define I8MM_COLS 32
#if defined(__AVX2__)
#define DLLMQ_INT8_MM 1
static inline int32_t hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
#endif

int dllmq_int8_mm(const int8_t *x, int64_t m, int64_t k, int64_t ldx, const int8_t *w, int64_t n, int64_t ldw,
                  int32_t *out, int64_t ldo, int nthreads) {
#if defined(DLLMQ_INT8_MM)
    if (k % 16) return 0;
    const int64_t mp = (m + 3) / 4 * 4, blocks = (n + I8MM_COLS - 1) / I8MM_COLS;
    int16_t *xw = (int16_t *)malloc(sizeof(int16_t) * mp * k);
    if (xw == NULL) return 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < mp; r++)
        for (int64_t i = 0; i < k; i++) xw[r * k + i] = r < m ? (int16_t)x[r * ldx + i] : 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t r0 = 0; r0 < mp; r0 += 4) {
            const int64_t j1 = (b + 1) * I8MM_COLS < n ? (b + 1) * I8MM_COLS : n;
            for (int64_t j = b * I8MM_COLS; j < j1; j += 2) {
                const int nc = j + 1 < j1 ? 2 : 1;
                const int8_t *w0 = w + j * ldw, *w1 = w + (j + nc - 1) * ldw;
                __m256i acc[4][2];
                for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
                for (int64_t i = 0; i < k; i += 16) {
                    const __m256i wa = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w0 + i)));
                    const __m256i wb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w1 + i)));
                    for (int r = 0; r < 4; r++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xw + (r0 + r) * k + i));
                        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xv, wa));
                        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xv, wb));
                    }
                }
                for (int r = 0; r < 4 && r0 + r < m; r++) {
                    out[(r0 + r) * ldo + j] = hsum8(acc[r][0]);
                    if (nc == 2) out[(r0 + r) * ldo + j + 1] = hsum8(acc[r][1]);
                }
            }
        }
    free(xw);
    return 1;
#else
    (void)x; (void)m; (void)k; (void)ldx; (void)w; (void)n; (void)ldw; (void)out; (void)ldo; (void)nthreads;
    return 0;
#endif
}
