// RMSNorm: out = w * x / sqrt(mean(x^2) + eps), statistics in f32. One block per row; rows
// are `dim` wide inside a larger stride (the c_kv part of a latent row, say); out may alias x.
extern "C" __global__ void rms_norm_f32(const float* x, int x_stride, const float* w, float* out, int out_stride,
                                        int dim, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * x_stride;
    float* orow = out + (size_t)blockIdx.x * out_stride;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = w[i] * (xr[i] * inv);
}
