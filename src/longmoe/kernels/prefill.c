// Element-wise passes of prefill (many rows): each replaces several PyTorch ops, and the temporaries between them,
// with one pass over the rows, parallel over rows. Portable C: built with -O3 -march=native, so the compiler picks
// the machine's vector width (AVX2, AVX-512, NEON); -ffp-contract=off keeps PyTorch's rounding (no fused
// multiply-adds). Rounding points are PyTorch's: every bf16 result is rounded once from its fp32 value.
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) {  // round to nearest, ties to even; NaN stays NaN (as PyTorch)
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)r;
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// exp(x) = 2^n exp(r), |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial (rel. error ~2e-7); branch-free, so
// the loops that call it vectorise.
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + (r + 1.0f);
    int32_t e = (int32_t)n + 127;
    uint32_t bits = (uint32_t)e << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

// RMSNorm (longmoe.model.transformer.RMSNorm): y = bf16(x * rsqrt(mean(x^2) + eps)), then bf16(weight * y).
// x, out [M, C] bf16 (row strides ldx, C); weight [C] bf16 or NULL.
void rmsnorm_rows(const uint16_t* x, long M, int C, long ldx, const uint16_t* weight, float eps, uint16_t* out) {
    #pragma omp parallel for schedule(static) if (M > 4)
    for (long m = 0; m < M; m++) {
        const uint16_t* xr = x + m * ldx;
        uint16_t* o = out + m * C;
        float acc[16] = {0};
        int c = 0;
        for (; c + 16 <= C; c += 16)
            for (int j = 0; j < 16; j++) {
                float v = from_bf16(xr[c + j]);
                acc[j] += v * v;
            }
        float ss = 0.0f;
        for (int j = 0; j < 16; j++) ss += acc[j];
        for (; c < C; c++) ss += from_bf16(xr[c]) * from_bf16(xr[c]);
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        if (weight)
            for (c = 0; c < C; c++) o[c] = to_bf16(from_bf16(weight[c]) * from_bf16(to_bf16(from_bf16(xr[c]) * r)));
        else
            for (c = 0; c < C; c++) o[c] = to_bf16(from_bf16(xr[c]) * r);
    }
}

// RoPE (longmoe.model.rope.apply_rope) of bf16 x [BT, H, D] (token stride ldt, heads contiguous) by fp32 cos/sin
// [BT, D/2] -> out [BT, H, D] contiguous. Pairs are (i, i + D/2), or (2i, 2i + 1) when interleaved.
void rope_rows(const uint16_t* x, long BT, int H, int D, long ldt, const float* cos, const float* sin,
               int interleaved, uint16_t* out) {
    int half = D / 2;
    #pragma omp parallel for schedule(static) if (BT > 4)
    for (long t = 0; t < BT; t++) {
        const float* ct = cos + t * half;
        const float* st = sin + t * half;
        for (int h = 0; h < H; h++) {
            const uint16_t* xr = x + t * ldt + (long)h * D;
            uint16_t* o = out + (t * H + h) * D;
            if (interleaved) {
                for (int i = 0; i < half; i++) {
                    float x1 = from_bf16(xr[2 * i]), x2 = from_bf16(xr[2 * i + 1]);
                    o[2 * i] = to_bf16(x1 * ct[i] - x2 * st[i]);
                    o[2 * i + 1] = to_bf16(x2 * ct[i] + x1 * st[i]);
                }
            } else {
                for (int i = 0; i < half; i++) {
                    float x1 = from_bf16(xr[i]), x2 = from_bf16(xr[i + half]);
                    o[i] = to_bf16(x1 * ct[i] - x2 * st[i]);
                    o[i + half] = to_bf16(x2 * ct[i] + x1 * st[i]);
                }
            }
        }
    }
}

// SwiGLU's middle: out = bf16(bf16(silu(gate)) * up) for gate, up [M, I] bf16 (row stride ld; e.g. the two halves of
// a [M, 2I] gate | up projection) -> out [M, I] bf16, with silu(g) = g / (1 + exp(-g)) in fp32 as PyTorch's.
void silu_mul_rows(const uint16_t* gate, const uint16_t* up, long ld, long M, int I, uint16_t* out) {
    #pragma omp parallel for schedule(static) if (M > 4)
    for (long m = 0; m < M; m++) {
        const uint16_t* g = gate + m * ld;
        const uint16_t* u = up + m * ld;
        uint16_t* o = out + m * I;
        for (int i = 0; i < I; i++) {
            float gv = from_bf16(g[i]);
            float s = from_bf16(to_bf16(gv / (1.0f + exp_poly(-gv))));
            o[i] = to_bf16(s * from_bf16(u[i]));
        }
    }
}

// MoE combine (MoE._dispatch's last two lines): token n's K expert outputs y[pos[n, k]] ([M, C] bf16, sorted by
// expert), each first weighted as bf16(y * w[n, k]) unless w is NULL, are summed in fp32 in increasing pos and
// rounded once into out[n] ([N, C] bf16): what index_add_ into zeros does on CPU (it accumulates bf16 in fp32).
#define COMBINE_TILE 256
void moe_combine_rows(const uint16_t* y, long N, int K, int C, const int64_t* pos, const float* w, uint16_t* out) {
    #pragma omp parallel for schedule(static) if (N > 4)
    for (long n = 0; n < N; n++) {
        int64_t p[16];
        float wk[16];
        int kk = K < 16 ? K : 16;
        for (int k = 0; k < kk; k++) {  // insertion sort of the K slots by position
            int64_t pk = pos[n * K + k];
            float wv = w ? w[n * K + k] : 1.0f;
            int j = k;
            for (; j > 0 && p[j - 1] > pk; j--) {
                p[j] = p[j - 1];
                wk[j] = wk[j - 1];
            }
            p[j] = pk;
            wk[j] = wv;
        }
        uint16_t* o = out + n * C;
        for (int c0 = 0; c0 < C; c0 += COMBINE_TILE) {
            int cn = C - c0 < COMBINE_TILE ? C - c0 : COMBINE_TILE;
            float acc[COMBINE_TILE];
            for (int c = 0; c < cn; c++) acc[c] = 0.0f;
            for (int k = 0; k < kk; k++) {
                const uint16_t* yk = y + p[k] * C + c0;
                float wv = wk[k];
                if (w)
                    for (int c = 0; c < cn; c++) acc[c] += from_bf16(to_bf16(from_bf16(yk[c]) * wv));
                else
                    for (int c = 0; c < cn; c++) acc[c] += from_bf16(yk[c]);
            }
            for (int c = 0; c < cn; c++) o[c0 + c] = to_bf16(acc[c]);
        }
    }
}
