// FP8 (e4m3fn) block dequantization of DeepSeek-V3 checkpoints: weight [rows, cols] bytes,
// scale_inv [ceil(rows/br), ceil(cols/bc)] f32 (multiplied, despite the name) -> bf16.

__device__ __forceinline__ float e4m3_to_f32(u8 b) {
    float sign = (b & 0x80) ? -1.0f : 1.0f;
    int exp = (b >> 3) & 0x0f, man = b & 0x07;
    if (exp == 0x0f && man == 0x07) return __int_as_float(0x7fc00000);
    if (exp == 0) return sign * ((float)man / 8.0f) * 0.015625f;  // 2^-6
    return sign * (1.0f + (float)man / 8.0f) * ldexpf(1.0f, exp - 7);
}

extern "C" __global__ void dequant_fp8_bf16(const u8* w, const float* scale_inv, int rows, int cols, int br, int bc,
                                            bf16_t* out) {
    int scale_cols = (cols + bc - 1) / bc;
    size_t n = (size_t)rows * cols;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(idx / cols), c = (int)(idx - (size_t)r * cols);
        out[idx] = f32_to_bf16(e4m3_to_f32(w[idx]) * scale_inv[(r / br) * scale_cols + c / bc]);
    }
}
