// Rotary embedding (YaRN folded into inv_freq and attention_factor by the host), in place on
// `heads` vectors of 2*half values per token: x[t * token_stride + h * head_stride + i].
// grid (tokens, heads), block (half). Interleaved mode rotates (x[2i], x[2i+1]) and writes
// [rotated evens | rotated odds]; half mode rotates (x[i], x[i + half]).
extern "C" __global__ void rope_f32(float* x, int token_stride, int head_stride, const u32* pos,
                                    const float* inv_freq, float attention_factor, int half, int interleave) {
    int i = threadIdx.x;
    float* v = x + (size_t)blockIdx.x * token_stride + (size_t)blockIdx.y * head_stride;
    float a = 0.0f, b = 0.0f, c = 0.0f, s = 0.0f;
    if (i < half) {
        float angle = inv_freq[i] * (float)pos[blockIdx.x];
        c = cosf(angle) * attention_factor;
        s = sinf(angle) * attention_factor;
        if (interleave) { a = v[2 * i]; b = v[2 * i + 1]; }
        else { a = v[i]; b = v[i + half]; }
    }
    __syncthreads();
    if (i < half) {
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}
