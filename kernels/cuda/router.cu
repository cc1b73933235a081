// MoE routers, one thread per token, exactly as kernels::cpu::router::route:
// kind 0 = V3 sigmoid + bias (noaux_tc, groups by the sum of their top two, other groups -inf),
// kind 1 = V2 softmax greedy, kind 2 = V2 softmax group-limited (groups by max, others 0).
// Top-k ties go to the lower index; ids come out ascending. At most ROUTER_MAX_EXPERTS experts.
#define ROUTER_MAX_EXPERTS 512
#define ROUTER_MAX_GROUPS 64

// Index of the largest value not yet taken; ties to the lower index.
__device__ __forceinline__ int router_argmax(const float* v, const bool* taken, int n) {
    int best = -1;
    for (int i = 0; i < n; ++i)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

extern "C" __global__ void route_tokens(const float* logits, const float* bias, int tokens, int e, int kind, int top_k,
                                        int n_group, int topk_group, int norm_topk, float scaling, u32* ids,
                                        float* weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* lg = logits + (size_t)t * e;
    float scores[ROUTER_MAX_EXPERTS], choice[ROUTER_MAX_EXPERTS];
    bool taken[ROUTER_MAX_EXPERTS];
    if (kind == 0) {
        for (int i = 0; i < e; ++i) scores[i] = 1.0f / (1.0f + expf(-lg[i]));
    } else {
        float m = -EM_INFINITY, sum = 0.0f;
        for (int i = 0; i < e; ++i) m = fmaxf(m, lg[i]);
        for (int i = 0; i < e; ++i) { scores[i] = expf(lg[i] - m); sum += scores[i]; }
        float inv = 1.0f / sum;
        for (int i = 0; i < e; ++i) scores[i] *= inv;
    }
    for (int i = 0; i < e; ++i) choice[i] = (kind == 0 && bias) ? scores[i] + bias[i] : scores[i];
    if (kind != 1 && n_group > 1) {
        int per = e / n_group;
        float gscore[ROUTER_MAX_GROUPS];
        bool gtaken[ROUTER_MAX_GROUPS];
        for (int g = 0; g < n_group; ++g) {
            const float* v = choice + g * per;
            if (kind == 0) {
                // Sum of the group's two best (one if the group has one expert).
                for (int i = 0; i < per; ++i) taken[i] = false;
                int a = router_argmax(v, taken, per);
                float s = v[a];
                if (per > 1) { taken[a] = true; s += v[router_argmax(v, taken, per)]; }
                gscore[g] = s;
            } else {
                float m = -EM_INFINITY;
                for (int i = 0; i < per; ++i) m = fmaxf(m, v[i]);
                gscore[g] = m;
            }
            gtaken[g] = false;
        }
        for (int j = 0; j < topk_group; ++j) {
            int best = -1;
            for (int g = 0; g < n_group; ++g)
                if (!gtaken[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            gtaken[best] = true;
        }
        float masked = kind == 0 ? -EM_INFINITY : 0.0f;
        for (int g = 0; g < n_group; ++g)
            if (!gtaken[g])
                for (int i = 0; i < per; ++i) choice[g * per + i] = masked;
    }
    for (int i = 0; i < e; ++i) taken[i] = false;
    for (int j = 0; j < top_k; ++j) taken[router_argmax(choice, taken, e)] = true;
    u32* out_ids = ids + (size_t)t * top_k;
    float* out_w = weights + (size_t)t * top_k;
    int slot = 0;
    float sum = 0.0f;
    for (int i = 0; i < e; ++i) {
        if (!taken[i]) continue;
        out_ids[slot] = (u32)i;
        out_w[slot] = kind == 0 ? scores[i] : choice[i];
        sum += out_w[slot];
        ++slot;
    }
    float norm = (norm_topk && kind == 0) ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (int j = 0; j < top_k; ++j) out_w[j] = out_w[j] * norm * scaling;
}
