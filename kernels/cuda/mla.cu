// MLA attention in the absorbed form over the paged latent cache, for decode and prefill:
// every query token (a decoding sequence's newest token, or each token of a prompt, causal)
// attends to the first ctx_lens[i] rows of its sequence. Scores are
// (q_lat . c_kv + q_pe . k_pe) * scale; the output o_lat = softmax . c_kv stays in latent space
// (the host up-projects it with W_UV).
//
// grid (tokens, ceil(heads / warps), splits); block (warps * 32): one head per warp. The block
// walks its part of the context in tiles of MLA_TILE rows: each tile is read from the cache
// once into shared memory for all of the block's heads, then every warp folds it into its
// online softmax. Lane l keeps elements l, l + 32, ... of the head's query and output in
// registers. With splits > 1 (few query tokens, long contexts: batch-1 decode) the context is
// cut into `splits` parts on as many blocks, each writing its unnormalised output and its
// (max, sum) to part_acc / part_ml, and mla_combine_f32 merges them.
#define MLA_TILE 16
#define MLA_RANK_PER_LANE 16  // kv_lora_rank <= 512
#define MLA_PE_PER_LANE 2     // qk_rope_head_dim <= 64

extern "C" __global__ void mla_attend_f32(const float* cache, const u32* tables, const u32* table_offsets,
                                          const u32* ctx_lens, const float* q_lat, const float* q_pe,
                                          int pe_token_stride, int pe_head_stride, float* out, int heads, int rank,
                                          int dr, int block_size, float scale, int splits, float* part_acc,
                                          float* part_ml) {
    extern __shared__ float tile[];
    const int i = blockIdx.x, lane = threadIdx.x & 31;
    const int h = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool active = h < heads;
    const int width = rank + dr;
    const u32* table = tables + table_offsets[i];
    const int n_ctx = (int)ctx_lens[i];
    const int chunk = (n_ctx + splits - 1) / splits;
    const int begin = min(n_ctx, (int)blockIdx.z * chunk), end = min(n_ctx, begin + chunk);

    float q[MLA_RANK_PER_LANE], qp[MLA_PE_PER_LANE], acc[MLA_RANK_PER_LANE];
#pragma unroll
    for (int j = 0; j < MLA_RANK_PER_LANE; ++j) {
        int c = lane + 32 * j;
        q[j] = (active && c < rank) ? q_lat[((size_t)i * heads + h) * rank + c] : 0.0f;
        acc[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < MLA_PE_PER_LANE; ++j) {
        int c = lane + 32 * j;
        qp[j] = (active && c < dr) ? q_pe[(size_t)i * pe_token_stride + (size_t)h * pe_head_stride + c] : 0.0f;
    }
    float m = -EM_INFINITY, l = 0.0f;
    for (int t0 = begin; t0 < end; t0 += MLA_TILE) {
        const int nt = min(MLA_TILE, end - t0);
        for (int idx = threadIdx.x; idx < nt * width; idx += blockDim.x) {
            int t = idx / width, c = idx - t * width, p = t0 + t;
            size_t row = (size_t)table[p / block_size] * block_size + p % block_size;
            tile[idx] = cache[row * width + c];
        }
        __syncthreads();
        if (active) {
            for (int t = 0; t < nt; ++t) {
                const float* r = tile + t * width;
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < MLA_RANK_PER_LANE; ++j) {
                    int c = lane + 32 * j;
                    if (c < rank) s += q[j] * r[c];
                }
#pragma unroll
                for (int j = 0; j < MLA_PE_PER_LANE; ++j) {
                    int c = lane + 32 * j;
                    if (c < dr) s += qp[j] * r[rank + c];
                }
                s = warp_sum(s) * scale;
                float m_new = fmaxf(m, s);
                float corr = expf(m - m_new), p = expf(s - m_new);
                l = l * corr + p;
#pragma unroll
                for (int j = 0; j < MLA_RANK_PER_LANE; ++j) {
                    int c = lane + 32 * j;
                    acc[j] = acc[j] * corr + (c < rank ? p * r[c] : 0.0f);
                }
                m = m_new;
            }
        }
        __syncthreads();
    }
    if (!active) return;
    if (splits > 1) {
        const size_t part = ((size_t)i * heads + h) * splits + blockIdx.z;
#pragma unroll
        for (int j = 0; j < MLA_RANK_PER_LANE; ++j) {
            int c = lane + 32 * j;
            if (c < rank) part_acc[part * rank + c] = acc[j];
        }
        if (lane == 0) { part_ml[2 * part] = m; part_ml[2 * part + 1] = l; }
        return;
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int j = 0; j < MLA_RANK_PER_LANE; ++j) {
        int c = lane + 32 * j;
        if (c < rank) out[((size_t)i * heads + h) * rank + c] = acc[j] * inv;
    }
}

// Merges the parts of a split context: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M),
// M the largest m_s (an empty part has m = -inf, l = 0 and weighs nothing). grid (tokens * heads).
extern "C" __global__ void mla_combine_f32(const float* part_acc, const float* part_ml, int splits, int rank,
                                           float* out) {
    const size_t row = blockIdx.x;
    const float* ml = part_ml + row * splits * 2;
    float big = -EM_INFINITY;
    for (int s = 0; s < splits; ++s) big = fmaxf(big, ml[2 * s]);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s)
        if (ml[2 * s + 1] > 0.0f) total += ml[2 * s + 1] * expf(ml[2 * s] - big);
    float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int c = threadIdx.x; c < rank; c += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < splits; ++s)
            if (ml[2 * s + 1] > 0.0f) o += part_acc[(row * splits + s) * rank + c] * expf(ml[2 * s] - big);
        out[row * rank + c] = o * inv;
    }
}
