// Bandwidth-bound CPU kernels for decoding (few query rows): bf16 weights/KV streamed once, fp32 accumulation;
// and the training loss's softmax over the vocabulary (xent_bf16, at the end).
// Built on first use by longmoe/kernels/__init__.py with the system C compiler; AVX-512 BF16 required.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <math.h>

static inline __m512 bf16x16_to_f32(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// acc[r * lda + d] += sum_{s0 <= s < s1} p[r * ldp + s - p0] * v[s * ldv + d]  for r < R, d < Dv.  Dv % 64 == 0.
// 4 rows x 64 columns of accumulators stay in registers while the rows of v stream past.
static void accumulate_pv(const float* p, long ldp, int p0, int R, int s0, int s1, const uint16_t* v, long ldv,
                          int Dv, float* acc, long lda) {
    for (int r0 = 0; r0 < R; r0 += 4) {
        int rn = R - r0 < 4 ? R - r0 : 4;
        for (int d = 0; d < Dv; d += 64) {
            __m512 a[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();
            for (int s = s0; s < s1; s++) {
                const uint16_t* vr = v + (long)s * ldv + d;
                __m512 v0 = bf16x16_to_f32(vr), v1 = bf16x16_to_f32(vr + 16);
                __m512 v2 = bf16x16_to_f32(vr + 32), v3 = bf16x16_to_f32(vr + 48);
                for (int i = 0; i < rn; i++) {
                    __m512 pb = _mm512_set1_ps(p[(long)(r0 + i) * ldp + s - p0]);
                    a[i][0] = _mm512_fmadd_ps(pb, v0, a[i][0]);
                    a[i][1] = _mm512_fmadd_ps(pb, v1, a[i][1]);
                    a[i][2] = _mm512_fmadd_ps(pb, v2, a[i][2]);
                    a[i][3] = _mm512_fmadd_ps(pb, v3, a[i][3]);
                }
            }
            for (int i = 0; i < rn; i++)
                for (int j = 0; j < 4; j++) {
                    float* dst = acc + (long)(r0 + i) * lda + d + 16 * j;
                    _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), a[i][j]));
                }
        }
    }
}

// Round to the nearest bf16, ties to even: what PyTorch's float -> bfloat16 conversion does.
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float dot_bf16(const uint16_t* a, const uint16_t* b, int K) {  // K % 32 == 0
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + k), (__m512bh)_mm512_loadu_si512(b + k));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(a + k + 32),
                                (__m512bh)_mm512_loadu_si512(b + k + 32));
    }
    for (; k < K; k += 32)
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + k), (__m512bh)_mm512_loadu_si512(b + k));
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// out[m * ldo + n] = sum_k x[m * K + k] * w[n * ldw + k]  for m < M, n < N.  K % 32 == 0.
// out is fp32, or bf16 (rounded once, from the fp32 sum) when out_bf16 is set.
void gemv_bf16(const uint16_t* x, int M, int K, const uint16_t* w, long ldw, int N, void* out, long ldo,
               int out_bf16) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint16_t* wr = w + (long)n * ldw;
        for (int m = 0; m < M; m++) {
            float y = dot_bf16(wr, x + (long)m * K, K);
            if (out_bf16)
                ((uint16_t*)out)[(long)m * ldo + n] = to_bf16(y);
            else
                ((float*)out)[(long)m * ldo + n] = y;
        }
    }
}

// RMSNorm of bf16 rows x [M, C] -> out [M, C]: bf16(x * rsqrt(mean(x^2) + eps)), then times the bf16 weight
// (rounded again) when there is one; the rounding points of longmoe.model.transformer.RMSNorm.
void rmsnorm_bf16(const uint16_t* x, int M, int C, const uint16_t* weight, float eps, uint16_t* out) {
    for (int m = 0; m < M; m++) {
        const uint16_t* xr = x + (long)m * C;
        float ss = 0.0f;
        for (int c = 0; c < C; c++) ss += from_bf16(xr[c]) * from_bf16(xr[c]);
        float r = 1.0f / sqrtf(ss / C + eps);
        for (int c = 0; c < C; c++) {
            uint16_t y = to_bf16(from_bf16(xr[c]) * r);
            out[(long)m * C + c] = weight ? to_bf16(from_bf16(weight[c]) * from_bf16(y)) : y;
        }
    }
}

// RoPE of bf16 x [BT, H, D] (contiguous) by fp32 cos/sin [BT, D/2] -> out, computed in fp32 and rounded once, with
// the operation order of longmoe.model.rope.apply_rope (built with -ffp-contract=off: no fused multiply-adds).
// Pairs are (i, i + D/2), or (2i, 2i + 1) when interleaved.
void rope_bf16(const uint16_t* x, int BT, int H, int D, const float* cos, const float* sin, int interleaved,
               uint16_t* out) {
    int half = D / 2;
    for (int t = 0; t < BT; t++)
        for (int h = 0; h < H; h++) {
            const uint16_t* xr = x + ((long)t * H + h) * D;
            uint16_t* o = out + ((long)t * H + h) * D;
            for (int i = 0; i < half; i++) {
                int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
                float c = cos[(long)t * half + i], s = sin[(long)t * half + i];
                float x1 = from_bf16(xr[a]), x2 = from_bf16(xr[b]);
                float x1c = x1 * c, x2s = x2 * s, x2c = x2 * c, x1s = x1 * s;
                o[a] = to_bf16(x1c - x2s);
                o[b] = to_bf16(x2c + x1s);
            }
        }
}

// The routed experts of a few tokens (decode), in one call. Pair p sends token tok[p] to expert ex[p] with
// weight w[p]; pairs are sorted by expert, then token. x [N, H], gate_up [E, 2I, H] (gate rows first),
// down [E, H, I], out [N, H]: all bf16, out zeroed by the caller. Every intermediate is rounded to bf16 where
// MoE._few_tokens rounds it (after each projection and each elementwise op), and expert outputs are added to
// out in pair order, so the result equals that PyTorch path up to the last bit of exp() inside silu.
void moe_decode_bf16(const uint16_t* x, int H, int I, int P, const int* tok, const int* ex, const float* w,
                     int weight_on_input, const uint16_t* gate_up, const uint16_t* down, uint16_t* out) {
    uint16_t* xin = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)P * H);      // [P, H] expert inputs
    uint16_t* h = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)P * 2 * I);    // [P, 2I] gate | up
    uint16_t* act = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)P * I);      // [P, I] silu(gate) * up
    uint16_t* y = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)P * H);        // [P, H] expert outputs
    for (int p = 0; p < P; p++)
        for (int c = 0; c < H; c++) {
            uint16_t v = x[(long)tok[p] * H + c];
            xin[(long)p * H + c] = weight_on_input ? to_bf16(from_bf16(v) * w[p]) : v;
        }
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (long j = 0; j < (long)P * 2 * I; j++) {
            int p = (int)(j / (2 * I)), n = (int)(j % (2 * I));
            h[j] = to_bf16(dot_bf16(gate_up + ((long)ex[p] * 2 * I + n) * H, xin + (long)p * H, H));
        }
        #pragma omp for schedule(static)
        for (long j = 0; j < (long)P * I; j++) {
            int p = (int)(j / I), i = (int)(j % I);
            float g = from_bf16(h[(long)p * 2 * I + i]);
            float s = from_bf16(to_bf16(g / (1.0f + expf(-g))));
            act[j] = to_bf16(s * from_bf16(h[(long)p * 2 * I + I + i]));
        }
        #pragma omp for schedule(static)
        for (long j = 0; j < (long)P * H; j++) {
            int p = (int)(j / H), n = (int)(j % H);
            uint16_t v = to_bf16(dot_bf16(down + ((long)ex[p] * H + n) * I, act + (long)p * I, I));
            y[j] = weight_on_input ? v : to_bf16(from_bf16(v) * w[p]);
        }
    }
    for (int p = 0; p < P; p++)
        for (int c = 0; c < H; c++) {
            uint16_t* o = out + (long)tok[p] * H + c;
            *o = to_bf16(from_bf16(*o) + from_bf16(y[(long)p * H + c]));
        }
    free(xin);
    free(h);
    free(act);
    free(y);
}

// out[m * D + d] = sum_s p[m * ldp + s] * v[s * ldv + d]  for m < M, d < D.  D % 64 == 0.
// Each thread takes a range of s, in tiles of 256 rows that stay in L2; per-thread sums are added at the end.
#define PV_TILE 256
void pv_bf16(const float* p, int M, int S, long ldp, const uint16_t* v, long ldv, int D, float* out) {
    int threads = omp_get_max_threads();
    float* partial = (float*)calloc((size_t)threads * M * D, sizeof(float));
    #pragma omp parallel
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int s0 = (int)((long)S * t / nt), s1 = (int)((long)S * (t + 1) / nt);
        for (int ts = s0; ts < s1; ts += PV_TILE)
            accumulate_pv(p, ldp, 0, M, ts, ts + PV_TILE < s1 ? ts + PV_TILE : s1, v, ldv, D,
                          partial + (long)t * M * D, D);
    }
    memset(out, 0, sizeof(float) * M * D);
    for (int t = 0; t < threads; t++)
        for (long i = 0; i < (long)M * D; i++) out[i] += partial[(long)t * M * D + i];
    free(partial);
}

// exp(x) for 16 floats: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (rel. error ~2e-7), times 2^n.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// Attention of a few query rows over a bf16 KV cache, for one (batch row, kv head) group of R query rows:
//   q [R, D] bf16 (row stride ldq), k [S, D] bf16 (row stride ldk), v [S, Dv] bf16 (row stride ldv)
//   out [R, Dv] fp32, lse [R] fp32.  Only the first `valid` keys count.  D % 32 == 0, Dv % 64 == 0, R <= 64.
// Each thread takes a slice of the keys (scores -> max -> exp/sum -> weighted values), then slices are merged
// through their max and sum, as in flash-decoding.
void decode_attn_bf16(const uint16_t* q, int R, int D, long ldq, const uint16_t* k, long ldk, const uint16_t* v,
                      long ldv, int Dv, int valid, float scale, float* out, float* lse) {
    int threads = omp_get_max_threads();
    float* part_acc = (float*)calloc((size_t)threads * R * Dv, sizeof(float));
    float* part_m = (float*)malloc(sizeof(float) * threads * R);
    float* part_l = (float*)calloc((size_t)threads * R, sizeof(float));
    #pragma omp parallel
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int s0 = (int)((long)valid * t / nt), s1 = (int)((long)valid * (t + 1) / nt), n = s1 - s0;
        float* sc = (float*)malloc(sizeof(float) * (n > 0 ? n : 1) * R);  // scores, then probabilities
        for (int r = 0; r < R; r++) {
            const uint16_t* qr = q + (long)r * ldq;
            float mx = -INFINITY;
            for (int s = 0; s < n; s++) {
                const uint16_t* kr = k + (long)(s0 + s) * ldk;
                __m512 acc = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 32)
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kr + d), (__m512bh)_mm512_loadu_si512(qr + d));
                float x = _mm512_reduce_add_ps(acc) * scale;
                sc[(long)r * n + s] = x;
                mx = x > mx ? x : mx;
            }
            float* pr = sc + (long)r * n;
            __m512 sum = _mm512_setzero_ps();
            int s = 0;
            for (; s + 16 <= n; s += 16) {
                __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(pr + s), _mm512_set1_ps(mx)));
                _mm512_storeu_ps(pr + s, e);
                sum = _mm512_add_ps(sum, e);
            }
            float l = _mm512_reduce_add_ps(sum);
            for (; s < n; s++) { pr[s] = expf(pr[s] - mx); l += pr[s]; }
            part_m[t * R + r] = mx;
            part_l[t * R + r] = l;
        }
        accumulate_pv(sc, n, s0, R, s0, s1, v, ldv, Dv, part_acc + (long)t * R * Dv, Dv);
        free(sc);
    }
    for (int r = 0; r < R; r++) {
        float mx = -INFINITY, l = 0.0f;
        for (int t = 0; t < threads; t++)
            if (part_l[t * R + r] > 0 && part_m[t * R + r] > mx) mx = part_m[t * R + r];
        for (int d = 0; d < Dv; d++) out[(long)r * Dv + d] = 0.0f;
        for (int t = 0; t < threads; t++) {
            if (part_l[t * R + r] <= 0) continue;
            float w = expf(part_m[t * R + r] - mx);
            l += w * part_l[t * R + r];
            const float* a = part_acc + ((long)t * R + r) * Dv;
            for (int d = 0; d < Dv; d++) out[(long)r * Dv + d] += w * a[d];
        }
        for (int d = 0; d < Dv; d++) out[(long)r * Dv + d] /= l;
        lse[r] = mx + logf(l);
    }
    free(part_acc);
    free(part_m);
    free(part_l);
}

// Cross-entropy of bf16 logit rows [M, V] (row stride ld) against targets, in fp32:
//   loss[m] = logsumexp(row) - row[target[m]]
// and, when grad is set, the row is overwritten with the logit gradient softmax(row) - onehot(target), in bf16.
// A row (64 KB at V = 32000) stays in L2 across the three passes: max, sum of exp, gradient.
void xent_bf16(uint16_t* logits, int M, int V, long ld, const int64_t* target, int grad, float* loss) {
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        uint16_t* row = logits + (long)m * ld;
        int V16 = V & ~15;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int v = 0; v < V16; v += 16) mx = _mm512_max_ps(mx, bf16x16_to_f32(row + v));
        float hi = _mm512_reduce_max_ps(mx);
        for (int v = V16; v < V; v++) hi = fmaxf(hi, from_bf16(row[v]));
        __m512 shift = _mm512_set1_ps(hi), sum = _mm512_setzero_ps();
        for (int v = 0; v < V16; v += 16) sum = _mm512_add_ps(sum, exp512(_mm512_sub_ps(bf16x16_to_f32(row + v), shift)));
        float s = _mm512_reduce_add_ps(sum);
        for (int v = V16; v < V; v++) s += expf(from_bf16(row[v]) - hi);
        float lse = hi + logf(s);
        long t = target[m];
        float picked = from_bf16(row[t]);
        loss[m] = lse - picked;
        if (!grad) continue;
        __m512 l = _mm512_set1_ps(lse);
        for (int v = 0; v < V16; v += 16) {
            __m512 p = exp512(_mm512_sub_ps(bf16x16_to_f32(row + v), l));
            _mm256_storeu_si256((__m256i*)(row + v), (__m256i)_mm512_cvtneps_pbh(p));
        }
        for (int v = V16; v < V; v++) row[v] = to_bf16(expf(from_bf16(row[v]) - lse));
        row[t] = to_bf16(expf(picked - lse) - 1.0f);
    }
}
