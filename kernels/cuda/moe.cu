// Routed experts for small batches without leaving the GPU: each (token, slot) pair p
// multiplies its expert's weight, picked on the device from the router's ids, with its input
// row. Weights of one layer's experts are stacked: w[e] is [n, k] bf16 (Linear layout).
//   out[p, j] = sum_c w[ids[p]][j][c] * x[p / x_div][c]      (f32 accumulation)
// x_div = top_k for the gate/up projection (input = the token's row), 1 for the down
// projection (input = the pair's own activation row). Memory-bound: one warp per output
// row, 16-byte loads when rows are 8-element aligned. grid (ceil(n / warps), pairs).

struct __attribute__((aligned(16))) bf16x8 { u32 v[4]; };

__device__ __forceinline__ float dot_bf16x8(bf16x8 a, bf16x8 b) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        s += __uint_as_float(a.v[i] << 16) * __uint_as_float(b.v[i] << 16);
        s += __uint_as_float(a.v[i] & 0xffff0000u) * __uint_as_float(b.v[i] & 0xffff0000u);
    }
    return s;
}

extern "C" __global__ void moe_gemv_bf16(const bf16_t* w, const u32* ids, const bf16_t* x, int x_div, float* out,
                                         int n, int k) {
    const int p = blockIdx.y, lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    const bf16_t* wr = w + ((size_t)ids[p] * n + j) * k;
    const bf16_t* xr = x + (size_t)(p / x_div) * k;
    float acc = 0.0f;
    if ((k & 7) == 0) {
        const bf16x8* w8 = (const bf16x8*)wr;
        const bf16x8* x8 = (const bf16x8*)xr;
        for (int c = lane; c < (k >> 3); c += 32) acc += dot_bf16x8(w8[c], x8[c]);
    } else {
        for (int c = lane; c < k; c += 32) acc += bf16_to_f32(wr[c]) * bf16_to_f32(xr[c]);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[(size_t)p * n + j] = acc;
}
