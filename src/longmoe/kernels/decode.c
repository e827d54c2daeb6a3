// Bandwidth-bound CPU kernels for decoding (few query rows): bf16 weights/KV streamed once, fp32 accumulation;
// and the training loss's softmax over the vocabulary (xent_bf16, at the end).
// Built on first use by longmoe/kernels/__init__.py with the system C compiler; AVX-512 BF16 required.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <math.h>

#include "prefill.c"  // to_bf16 / from_bf16 and the row kernels (RMSNorm, RoPE) the fused decode layer reuses

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

// ---------------------------------------------------------------------------------------------------------------------
// Flash attention for prefill (many query rows), with AVX-512 BF16 dot products for both products.
//   q [H, Tq, D], k [Hkv, S, D], v [Hkv, S, Dv]: bf16, any head / token strides (elements contiguous);
//   query i sits at key index i + q_offset and sees keys j <= i + q_offset (and j > i + q_offset - window when
//   window > 0); out [H, Tq, Dv] bf16 (any head / token strides), lse [H, Tq] fp32 (natural log, of scaled scores).
//   D % 32 == 0, Dv % 64 == 0. A query that sees no key gets out = 0 and lse = -inf (so partial results over spans
//   of keys merge through their lse).
// K and V are first packed per kv head into the pair-interleaved layouts vdpbf16ps wants (keys in lanes for Q.K^T,
// value columns in lanes for P.V), then threads take (head, block of FA_BQ queries) items and stream key blocks of
// FA_BK with an online softmax: scores and probabilities are fp32, probabilities are rounded to bf16 for P.V (as
// PyTorch's CPU flash kernel does for bf16), outputs accumulate in fp32.
#define FA_BQ 64
#define FA_BK 64

static void pack_k(const uint16_t* k, int S, int D, long st, int Spad, uint16_t* kp) {
    // kp[(j / 16)][d / 2][j % 16][d % 2]: for key vector jb and dim pair d2, 16 keys x 2 dims are 64 contiguous bytes
    for (int j = 0; j < Spad; j++)
        for (int d = 0; d < D; d++)
            kp[((long)(j / 16) * (D / 2) + d / 2) * 32 + (j % 16) * 2 + d % 2] = j < S ? k[(long)j * st + d] : 0;
}

static void pack_v(const uint16_t* v, int S, int Dv, long st, int Spad, uint16_t* vp) {
    // vp[j / 2][d][j % 2]: for key pair j2, the 2 x Dv values interleaved by key
    for (int j = 0; j < Spad; j++)
        for (int d = 0; d < Dv; d++) vp[((long)(j / 2) * Dv + d) * 2 + j % 2] = j < S ? v[(long)j * st + d] : 0;
}

static inline __m512 bcast_pair(const uint16_t* p) {  // two adjacent bf16 in every 32-bit lane
    int32_t x;
    memcpy(&x, p, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi32(x));
}

void flash_attn_bf16(const uint16_t* q, int H, int Tq, int D, long q_sh, long q_st, const uint16_t* k,
                     const uint16_t* v, int Hkv, int S, int Dv, long k_sh, long k_st, long v_sh, long v_st,
                     int q_offset, int window, float scale, uint16_t* out, long o_sh, long o_st, float* lse) {
    int Spad = (S + FA_BK - 1) / FA_BK * FA_BK;
    uint16_t* kp = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)Hkv * Spad * D);
    uint16_t* vp = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)Hkv * Spad * Dv);
    int rep = H / Hkv, nqb = (Tq + FA_BQ - 1) / FA_BQ;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int t = 0; t < 2 * Hkv; t++) {
            int h = t / 2;
            if (t % 2 == 0) pack_k(k + h * k_sh, S, D, k_st, Spad, kp + (long)h * Spad * D);
            else pack_v(v + h * v_sh, S, Dv, v_st, Spad, vp + (long)h * Spad * Dv);
        }
        float* sc = (float*)aligned_alloc(64, sizeof(float) * FA_BQ * FA_BK);          // scores of one block
        uint16_t* pb = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * FA_BQ * FA_BK);  // probabilities, bf16
        float* acc = (float*)aligned_alloc(64, sizeof(float) * FA_BQ * Dv);             // outputs, fp32
        float m[FA_BQ], l[FA_BQ];
        // last blocks first: under a causal mask they hold the most keys, so the dynamic schedule ends even
        #pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < H * nqb; item++) {
            int h = item % H, qb = nqb - 1 - item / H, hk = h / rep;
            int i0 = qb * FA_BQ, R = Tq - i0 < FA_BQ ? Tq - i0 : FA_BQ;
            const uint16_t* qh = q + h * q_sh + (long)i0 * q_st;
            const uint16_t* kh = kp + (long)hk * Spad * D;
            const uint16_t* vh = vp + (long)hk * Spad * Dv;
            int hi = i0 + R - 1 + q_offset + 1;  // keys [lo, hi) are visible to some query of the block
            int lo = window > 0 ? i0 + q_offset - window + 1 : 0;
            if (lo < 0) lo = 0;
            if (hi > S) hi = S;
            for (int r = 0; r < R; r++) m[r] = -INFINITY, l[r] = 0.0f;
            memset(acc, 0, sizeof(float) * FA_BQ * Dv);
            for (int j0 = lo / FA_BK * FA_BK; j0 < hi; j0 += FA_BK) {
                // S = Q K^T for rows in groups of 4 x 64 keys: 16 accumulators, keys in lanes
                for (int r0 = 0; r0 < R; r0 += 4) {
                    int rn = R - r0 < 4 ? R - r0 : 4;
                    __m512 a[4][4];
                    for (int i = 0; i < 4; i++)
                        for (int c = 0; c < 4; c++) a[i][c] = _mm512_setzero_ps();
                    const uint16_t* kb = kh + (long)(j0 / 16) * (D / 2) * 32;
                    for (int d2 = 0; d2 < D / 2; d2++) {
                        __m512bh k0 = (__m512bh)_mm512_load_si512(kb + ((long)0 * (D / 2) + d2) * 32);
                        __m512bh k1 = (__m512bh)_mm512_load_si512(kb + ((long)1 * (D / 2) + d2) * 32);
                        __m512bh k2 = (__m512bh)_mm512_load_si512(kb + ((long)2 * (D / 2) + d2) * 32);
                        __m512bh k3 = (__m512bh)_mm512_load_si512(kb + ((long)3 * (D / 2) + d2) * 32);
                        for (int i = 0; i < rn; i++) {
                            __m512bh qv = (__m512bh)bcast_pair(qh + (long)(r0 + i) * q_st + 2 * d2);
                            a[i][0] = _mm512_dpbf16_ps(a[i][0], k0, qv);
                            a[i][1] = _mm512_dpbf16_ps(a[i][1], k1, qv);
                            a[i][2] = _mm512_dpbf16_ps(a[i][2], k2, qv);
                            a[i][3] = _mm512_dpbf16_ps(a[i][3], k3, qv);
                        }
                    }
                    for (int i = 0; i < rn; i++)
                        for (int c = 0; c < 4; c++)
                            _mm512_store_ps(sc + (r0 + i) * FA_BK + 16 * c, _mm512_mul_ps(a[i][c], _mm512_set1_ps(scale)));
                }
                // mask, online softmax, probabilities to bf16
                int edge = j0 + FA_BK > i0 + q_offset + 1 || j0 + FA_BK > S || (window > 0 && j0 <= i0 + R - 1 + q_offset - window);
                for (int r = 0; r < R; r++) {
                    float* s = sc + r * FA_BK;
                    if (edge) {
                        int i = i0 + r, top = i + q_offset, bot = window > 0 ? top - window : -1;
                        for (int c = 0; c < FA_BK; c++) {
                            int j = j0 + c;
                            if (j > top || j <= bot || j >= S) s[c] = -INFINITY;
                        }
                    }
                    __m512 s0 = _mm512_load_ps(s), s1 = _mm512_load_ps(s + 16), s2 = _mm512_load_ps(s + 32),
                           s3 = _mm512_load_ps(s + 48);
                    float bm = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(s0, s1), _mm512_max_ps(s2, s3)));
                    uint16_t* p = pb + r * FA_BK;
                    if (bm == -INFINITY) {  // nothing visible in this block for this row
                        memset(p, 0, sizeof(uint16_t) * FA_BK);
                        continue;
                    }
                    float mn = bm > m[r] ? bm : m[r];
                    if (mn > m[r]) {
                        float corr = expf(m[r] - mn);  // 0 on the first visible block
                        l[r] *= corr;
                        __m512 cv = _mm512_set1_ps(corr);
                        for (int d = 0; d < Dv; d += 16)
                            _mm512_store_ps(acc + r * Dv + d, _mm512_mul_ps(_mm512_load_ps(acc + r * Dv + d), cv));
                        m[r] = mn;
                    }
                    __m512 sh = _mm512_set1_ps(mn);
                    __m512 p0 = exp512(_mm512_sub_ps(s0, sh)), p1 = exp512(_mm512_sub_ps(s1, sh));
                    __m512 p2 = exp512(_mm512_sub_ps(s2, sh)), p3 = exp512(_mm512_sub_ps(s3, sh));
                    __m512 z = _mm512_setzero_ps();  // exp512 clamps at -87: masked keys must weigh exactly 0
                    p0 = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(s0, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), p0);
                    p1 = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(s1, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), p1);
                    p2 = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(s2, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), p2);
                    p3 = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(s3, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), p3);
                    l[r] += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3)));
                    _mm256_store_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(p0));
                    _mm256_store_si256((__m256i*)(p + 16), (__m256i)_mm512_cvtneps_pbh(p1));
                    _mm256_store_si256((__m256i*)(p + 32), (__m256i)_mm512_cvtneps_pbh(p2));
                    _mm256_store_si256((__m256i*)(p + 48), (__m256i)_mm512_cvtneps_pbh(p3));
                }
                // acc += P V for rows in groups of 4 x 64 value columns, key pairs in the dot products
                const uint16_t* vb = vh + (long)(j0 / 2) * Dv * 2;
                for (int r0 = 0; r0 < R; r0 += 4) {
                    int rn = R - r0 < 4 ? R - r0 : 4;
                    for (int d0 = 0; d0 < Dv; d0 += 64) {
                        __m512 a[4][4];
                        for (int i = 0; i < 4; i++)
                            for (int c = 0; c < 4; c++)
                                a[i][c] = i < rn ? _mm512_load_ps(acc + (r0 + i) * Dv + d0 + 16 * c) : _mm512_setzero_ps();
                        for (int j2 = 0; j2 < FA_BK / 2; j2++) {
                            const uint16_t* vr = vb + ((long)j2 * Dv + d0) * 2;
                            __m512bh v0 = (__m512bh)_mm512_load_si512(vr), v1 = (__m512bh)_mm512_load_si512(vr + 32);
                            __m512bh v2 = (__m512bh)_mm512_load_si512(vr + 64), v3 = (__m512bh)_mm512_load_si512(vr + 96);
                            for (int i = 0; i < rn; i++) {
                                __m512bh pv = (__m512bh)bcast_pair(pb + (r0 + i) * FA_BK + 2 * j2);
                                a[i][0] = _mm512_dpbf16_ps(a[i][0], v0, pv);
                                a[i][1] = _mm512_dpbf16_ps(a[i][1], v1, pv);
                                a[i][2] = _mm512_dpbf16_ps(a[i][2], v2, pv);
                                a[i][3] = _mm512_dpbf16_ps(a[i][3], v3, pv);
                            }
                        }
                        for (int i = 0; i < rn; i++)
                            for (int c = 0; c < 4; c++) _mm512_store_ps(acc + (r0 + i) * Dv + d0 + 16 * c, a[i][c]);
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                __m512 inv = _mm512_set1_ps(l[r] > 0.0f ? 1.0f / l[r] : 0.0f);
                uint16_t* o = out + h * o_sh + (long)(i0 + r) * o_st;
                for (int d = 0; d < Dv; d += 16)
                    _mm256_storeu_si256((__m256i*)(o + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc + r * Dv + d), inv)));
                lse[(long)h * Tq + i0 + r] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
            }
        }
        free(sc);
        free(pb);
        free(acc);
    }
    free(kp);
    free(vp);
}

// ---------------------------------------------------------------------------------------------------------------------
// One decoder layer for one token (decode), in one call: the per-op dispatch of eager PyTorch costs more than the
// layer's arithmetic at this size. For the plain GQA + routed-MoE layer (Mixtral, Qwen3-MoE without q/k norms, ...):
//   h = RMSNorm(x); q, k, v = h Wq, h Wk, h Wv; RoPE(q, k) (rope: 0 none, 1 halves, 2 interleaved); store k, v at
//   `slot` of this layer's cache ([Hkv, slots, D], head stride kv_hs); attend over the runs (first slot, length) of
//   visible keys (the new one included); x += o Wo; h = RMSNorm(x); softmax router, top-k (renormalised when
//   norm_topk, times routed_scale); x += the experts' weighted outputs.
// Every intermediate is rounded to bf16 where the PyTorch path rounds it, through the same kernels (gemv_bf16,
// decode_attn_bf16, moe_decode_bf16), so the result matches it within the last bit of a few values.
void decode_layer_bf16(uint16_t* x, int C, float eps, const uint16_t* ln1, const uint16_t* wq, const uint16_t* wk,
                       const uint16_t* wv, const uint16_t* wo, int H, int Hkv, int D, const float* cos,
                       const float* sin, int rope, uint16_t* kc, uint16_t* vc, long kv_hs, long slot,
                       const long* runs, int n_runs, float scale, const uint16_t* ln2, const uint16_t* wr, int E,
                       int K, int norm_topk, float routed_scale, const uint16_t* gate_up, const uint16_t* down,
                       int I) {
    int rep = H / Hkv;
    uint16_t* h = (uint16_t*)malloc(sizeof(uint16_t) * C);
    uint16_t* q = (uint16_t*)malloc(sizeof(uint16_t) * H * D);
    uint16_t* kv = (uint16_t*)malloc(sizeof(uint16_t) * 2 * Hkv * D);
    uint16_t* o = (uint16_t*)malloc(sizeof(uint16_t) * H * D);
    uint16_t* y = (uint16_t*)malloc(sizeof(uint16_t) * C);
    float* acc = (float*)malloc(sizeof(float) * rep * D * 2);
    float* lse = (float*)malloc(sizeof(float) * rep * 2);
    // attention block
    rmsnorm_rows(x, 1, C, C, ln1, eps, h);
    gemv_bf16(h, 1, C, wq, C, H * D, q, H * D, 1);
    gemv_bf16(h, 1, C, wk, C, Hkv * D, kv, Hkv * D, 1);
    gemv_bf16(h, 1, C, wv, C, Hkv * D, kv + Hkv * D, Hkv * D, 1);
    if (rope) {
        rope_rows(q, 1, H, D, H * D, cos, sin, rope == 2, q);  // in place: each pair is read before it is written
        rope_rows(kv, 1, Hkv, D, Hkv * D, cos, sin, rope == 2, kv);
    }
    for (int g = 0; g < Hkv; g++) {
        memcpy(kc + g * kv_hs + slot * D, kv + (long)g * D, sizeof(uint16_t) * D);
        memcpy(vc + g * kv_hs + slot * D, kv + (long)(Hkv + g) * D, sizeof(uint16_t) * D);
    }
    for (int g = 0; g < Hkv; g++) {
        const uint16_t* qg = q + (long)g * rep * D;  // the query heads that share kv head g
        for (int r = 0; r < n_runs; r++) {
            long first = runs[2 * r], n = runs[2 * r + 1];
            float* a = r == 0 ? acc : acc + rep * D;
            float* l = r == 0 ? lse : lse + rep;
            decode_attn_bf16(qg, rep, D, D, kc + g * kv_hs + first * D, D, vc + g * kv_hs + first * D, D, D, (int)n,
                             scale, a, l);
            for (int i = 0; i < rep * D; i++) a[i] = from_bf16(to_bf16(a[i]));  // each run's output is bf16
            if (r > 0)  // merge into the running result as attention.merge does (new run first), rounded to bf16
                for (int i = 0; i < rep; i++) {
                    float wb = 1.0f / (1.0f + expf(-(lse[i] - l[i])));  // sigmoid(lse_running - lse_new)
                    for (int d = 0; d < D; d++) {
                        float na = a[i * D + d], nb = acc[i * D + d];
                        acc[i * D + d] = from_bf16(to_bf16(na - wb * (na - nb)));
                    }
                    float hi = lse[i] > l[i] ? lse[i] : l[i], lo = lse[i] > l[i] ? l[i] : lse[i];
                    lse[i] = hi + log1pf(expf(lo - hi));
                }
        }
        for (int i = 0; i < rep * D; i++) o[(long)g * rep * D + i] = to_bf16(acc[i]);
    }
    gemv_bf16(o, 1, H * D, wo, H * D, C, y, C, 1);
    for (int c = 0; c < C; c++) x[c] = to_bf16(from_bf16(x[c]) + from_bf16(y[c]));
    // MoE block: router in fp32, top-k, then the experts as in moe_decode_bf16
    rmsnorm_rows(x, 1, C, C, ln2, eps, h);
    float logit[256], score[256];
    float mx = -INFINITY;
    for (int e = 0; e < E; e++) {
        float sacc = 0.0f;
        for (int c = 0; c < C; c++) sacc += from_bf16(h[c]) * from_bf16(wr[(long)e * C + c]);
        logit[e] = sacc;
        mx = sacc > mx ? sacc : mx;
    }
    float tot = 0.0f;
    for (int e = 0; e < E; e++) tot += (score[e] = expf(logit[e] - mx));
    for (int e = 0; e < E; e++) score[e] /= tot;
    int ex[16];
    float w[16], wsum = 0.0f;
    unsigned char taken[256] = {0};
    for (int k = 0; k < K; k++) {  // top-k by score, lowest index first among equals
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
        taken[best] = 1;
        ex[k] = best;
        w[k] = score[best];
    }
    for (int k = 0; k < K; k++) wsum += w[k];
    for (int k = 0; k < K; k++) w[k] = (norm_topk ? w[k] / (wsum + 1e-20f) : w[k]) * routed_scale;
    for (int a = 1; a < K; a++)  // pairs sorted by expert, the order moe_decode_bf16 adds them in
        for (int b = a; b > 0 && ex[b - 1] > ex[b]; b--) {
            int te = ex[b]; ex[b] = ex[b - 1]; ex[b - 1] = te;
            float tw = w[b]; w[b] = w[b - 1]; w[b - 1] = tw;
        }
    int tok[16] = {0};
    memset(y, 0, sizeof(uint16_t) * C);
    moe_decode_bf16(h, C, I, K, tok, ex, w, 0, gate_up, down, y);
    for (int c = 0; c < C; c++) x[c] = to_bf16(from_bf16(x[c]) + from_bf16(y[c]));
    free(h); free(q); free(kv); free(o); free(y); free(acc); free(lse);
}
