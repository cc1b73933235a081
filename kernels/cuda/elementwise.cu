// Small elementwise and data-movement kernels of the forward pass.

// act[r, j] = silu(gu[r, j]) * gu[r, inter + j], written as bf16 (the next GEMM's input).
extern "C" __global__ void silu_mul_bf16(const float* gu, bf16_t* act, int rows, int inter) {
    size_t n = (size_t)rows * inter;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        size_t r = idx / inter, j = idx - r * inter;
        float g = gu[r * 2 * inter + j], u = gu[r * 2 * inter + inter + j];
        act[idx] = f32_to_bf16(g / (1.0f + expf(-g)) * u);
    }
}

extern "C" __global__ void f32_to_bf16_n(const float* x, bf16_t* out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void add_f32(float* x, const float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// out[t, :] = table[ids[t], :] widened to f32. grid (tokens).
extern "C" __global__ void embed_bf16(const bf16_t* table, const u32* ids, float* out, int hidden) {
    const bf16_t* row = table + (size_t)ids[blockIdx.x] * hidden;
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = bf16_to_f32(row[i]);
}

// out[r, :] = bf16(x[src[r], :]): tokens gathered in expert order. grid (rows).
extern "C" __global__ void gather_rows_bf16(const float* x, const u32* src, bf16_t* out, int hidden) {
    const float* row = x + (size_t)src[blockIdx.x] * hidden;
    bf16_t* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = f32_to_bf16(row[i]);
}

// out[t, :] = sum over s < k of weights[t, s] * expert_out[rows[t, s], :], in s order (the
// ascending-expert order the CPU engine sums in: deterministic, no atomics). grid (tokens).
extern "C" __global__ void moe_combine_f32(const float* expert_out, const u32* rows, const float* weights, int k,
                                           float* out, int hidden) {
    const u32* r = rows + (size_t)blockIdx.x * k;
    const float* w = weights + (size_t)blockIdx.x * k;
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < k; ++s) acc += expert_out[(size_t)r[s] * hidden + i] * w[s];
        o[i] = acc;
    }
}
