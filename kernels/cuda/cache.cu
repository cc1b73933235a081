// The paged latent cache: [num_blocks * block_size, width] f32 rows; a row's slot is
// block_table[pos / block_size] * block_size + pos % block_size, computed by the host.

// cache[slots[r]] = src[r * src_stride ..][..width]. grid (rows).
extern "C" __global__ void scatter_rows_f32(float* cache, const u32* slots, const float* src, int src_stride, int width) {
    float* dst = cache + (size_t)slots[blockIdx.x] * width;
    const float* s = src + (size_t)blockIdx.x * src_stride;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = s[i];
}

// out[r] = cache[slots[r]]: one sequence's rows made contiguous for export. grid (rows).
extern "C" __global__ void gather_rows_f32(const float* cache, const u32* slots, float* out, int width) {
    const float* s = cache + (size_t)slots[blockIdx.x] * width;
    float* o = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = s[i];
}
