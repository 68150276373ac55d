// CPU kernels for DSA, plain C ABI for ctypes; built on first use by dsalite/kernels/__init__.py, once per target.
//
// Indexer (dsa_select): scoring and top-k fused, one query row at a time; the row's scores live in a small buffer
// (never an [S, Hi, T] block) and the K largest are found by an exact threshold filter plus a selection on the few
// candidates. score[j] = sum_h w[h] * max(q[h] . k[j], 0) over keys j < end (end = the row's last visible key + 1);
// keys k0..k1-1 are further masked by mask[r, j - k0] (0 = hidden). The output row holds the K selected key indices
// in ascending order, then -1 where fewer than K keys are visible; among equal scores the lower index is kept, except
// where the tie sits at the K-th place: that row is ranked the way torch.topk ranks it (`rank_like_torch`).
// Sparse attention over the selected keys in the absorbed MQA form (dsa_sparse_attention, for inference and training)
// and its backward (dsa_sparse_attention_bwd), each reading the selected rows in place. RMSNorm and SwiGLU forward and
// backward (dsa_rms_norm[_bwd], dsa_swiglu[_bwd]): one pass per row where PyTorch's ops each pass over the tensor.
//
// One source, three targets, picked by the compiler's predefined macros (the build passes -march): AVX-512 (32
// registers of 16 floats), AVX2 + FMA (16 registers of 8) and a portable build (4-float vectors, no intrinsics: any
// GCC or Clang target, aarch64 included). What changes per target is the vector width VW and the register blocking:
// how many accumulators each inner loop keeps live is sized to the register file, because a blocking that fits
// AVX-512's 32 registers spills on AVX2's 16 and runs slower than the PyTorch path (measured, dsalite issue 13).
// The results do not depend on the blocking beyond the summation order of the dot products.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// Per target: VW floats per vector and the register blocking, in this order: indexer scoring blocks of SCORE_KEYS keys
// x SCORE_HEADS heads (SCORE_KEYS / VW * SCORE_HEADS accumulators sharing each key load); dot products in blocks of
// DOT_ACC (head, row) pairs, DOT_HEADS heads each, summed by one transpose-reduction; weighted row sums over ROW_VECS
// vectors of columns x ROW_HEADS heads; the backward's outer products OUTER_HEADS heads at a time. Chosen by timing
// the alternatives on each build (bench/kernels.py --sweep); -DDSA_<NAME>=n overrides one. The scoring has a second
// blocking, SCORE_ALT (keys x heads), compiled in beside the default: CPUs of one instruction set differ there, so the
// calibration picks one of the two per CPU model at run time (`dsa_set_score_blocking`).
#if defined(__AVX512F__)  // 32 registers: 16 + 4 live in scoring, 16 + 4 + 4 in the dots
#define DSA_ISA "avx512"
#define DSA_VW 16
#define DSA_DEFAULTS 64, 4, 16, 4, 4, 4, 4
#define DSA_SCORE_ALT 16, 4  // 4 chains: enough where a 512-bit FMA issues once a cycle (Zen 4), 10-15 % faster there
#elif defined(__AVX2__) && defined(__FMA__)  // 16 registers: 12 + 4 in scoring, 8 + 4 + 2 in the dots
#define DSA_ISA "avx2"
#define DSA_VW 8
#define DSA_DEFAULTS 32, 3, 8, 4, 2, 4, 4
#define DSA_SCORE_ALT 64, 1
#else
#define DSA_ISA "portable"
#define DSA_VW 4
#if defined(__aarch64__)  // 32 NEON registers
#define DSA_DEFAULTS 16, 4, 16, 4, 4, 4, 4
#define DSA_SCORE_ALT 32, 2
#else  // 16 SSE registers (the x86-64 baseline, no FMA), or whatever the target lowers the vectors to
#define DSA_DEFAULTS 16, 3, 8, 2, 4, 2, 4
#define DSA_SCORE_ALT 32, 1
#endif
#endif

namespace {

constexpr int DEFAULTS[7] = {DSA_DEFAULTS}, SCORE_ALT[2] = {DSA_SCORE_ALT};
#ifndef DSA_SCORE_KEYS
#define DSA_SCORE_KEYS DEFAULTS[0]
#endif
#ifndef DSA_SCORE_HEADS
#define DSA_SCORE_HEADS DEFAULTS[1]
#endif
#ifndef DSA_SCORE_ALT_KEYS
#define DSA_SCORE_ALT_KEYS SCORE_ALT[0]
#endif
#ifndef DSA_SCORE_ALT_HEADS
#define DSA_SCORE_ALT_HEADS SCORE_ALT[1]
#endif
#ifndef DSA_DOT_ACC
#define DSA_DOT_ACC DEFAULTS[2]
#endif
#ifndef DSA_DOT_HEADS
#define DSA_DOT_HEADS DEFAULTS[3]
#endif
#ifndef DSA_ROW_VECS
#define DSA_ROW_VECS DEFAULTS[4]
#endif
#ifndef DSA_ROW_HEADS
#define DSA_ROW_HEADS DEFAULTS[5]
#endif
#ifndef DSA_OUTER_HEADS
#define DSA_OUTER_HEADS DEFAULTS[6]
#endif

constexpr int VW = DSA_VW;
constexpr int64_t TILE = 64;  // keys per tile of the key layout (`indexer.tile_keys`): [D, 64] contiguous
constexpr int SCORE_KEYS = DSA_SCORE_KEYS, SCORE_HEADS = DSA_SCORE_HEADS, DOT_ACC = DSA_DOT_ACC;
constexpr int SCORE_ALT_KEYS = DSA_SCORE_ALT_KEYS, SCORE_ALT_HEADS = DSA_SCORE_ALT_HEADS;
constexpr int DOT_HEADS = DSA_DOT_HEADS;
constexpr int ROW_VECS = DSA_ROW_VECS, ROW_HEADS = DSA_ROW_HEADS, OUTER_HEADS = DSA_OUTER_HEADS;
static_assert(DOT_HEADS >= 1 && DOT_HEADS <= DOT_ACC && ROW_VECS >= 1 && SCORE_HEADS >= 1 && ROW_HEADS >= 1 && OUTER_HEADS >= 1, "blocking");
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));

inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf splat(float x) { return vf{} + x; }

// the sum of a's lanes as a tree (a left-to-right sum would chain VW dependent adds)
inline float hsum(vf a) {
    float t[VW];
    std::memcpy(t, &a, sizeof a);
    for (int w = VW / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) t[i] += t[i + w];
    return t[0];
}

// e^x lane by lane, within about 1 ulp of expf: x = n·ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by its degree-7
// Taylor polynomial (truncation error < 1e-8), times 2^n through the exponent bits. Below -87.3 (where expf goes
// subnormal, and for -inf) the result is 0.
inline vf vexp(vf x) {
    const vf lo = splat(-87.3f);
    const auto under = x < lo;
    x = under ? lo : x;
    x = x > 88.7f ? splat(88.7f) : x;
    const vf shift = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
    const vf n = (x * 1.44269504f + shift) - shift;
    const vf r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    vf p = splat(1.f / 5040);
    p = p * r + (1.f / 720);
    p = p * r + (1.f / 120);
    p = p * r + (1.f / 24);
    p = p * r + (1.f / 6);
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    const vf y = p * scale;
    return under ? vf{} : y;
}

// Calls f(std::integral_constant<int, n>) for the runtime n in 1..MAX: a kernel templated on its head count runs the
// last, smaller head group with all its accumulators in registers too.
template <int MAX, typename F>
inline void dispatch(int n, F&& f) {
    if constexpr (MAX >= 1) {
        if (n == MAX)
            f(std::integral_constant<int, MAX>{});
        else
            dispatch<MAX - 1>(n, f);
    }
}

// The heads 0..H-1 in groups of at most G, sizes as equal as possible (H = 4, G = 3: 2 + 2, not 3 + 1, so no group
// is left with too few accumulation chains to hide the FMA latency): f(h0, nh) for each.
template <typename F>
inline void head_groups(int H, int G, F&& f) {
    const int groups = (H + G - 1) / G;
    for (int g = 0; g < groups; ++g) {
        const int h0 = H * g / groups, h1 = H * (g + 1) / groups;
        f(h0, h1 - h0);
    }
}

// ---- transpose-reduction: N vectors -> lane sums ----

// Lane l of fold<W>(x, y): lanes are groups of W, the first W/2 of each group take x's pairwise sums (lane j + lane
// j + W/2 of that group), the last W/2 take y's. Folding pairs with W = 2, 4, ..., VW turns VW vectors into one whose
// lane i is the sum of vector i: VW - 1 shuffle-adds instead of VW horizontal sums.
constexpr int fold_lane(int W, int l, bool hi) {
    const int g = l / W * W, j = l % W;
    return j < W / 2 ? g + j + (hi ? W / 2 : 0) : VW + g + j - W / 2 + (hi ? W / 2 : 0);
}

template <int W, int... L>
inline vf fold_impl(vf x, vf y, std::integer_sequence<int, L...>) {
#if defined(__clang__) || __GNUC__ >= 12
    return __builtin_shufflevector(x, y, fold_lane(W, L, false)...) +
           __builtin_shufflevector(x, y, fold_lane(W, L, true)...);
#else
    return __builtin_shuffle(x, y, vi{fold_lane(W, L, false)...}) + __builtin_shuffle(x, y, vi{fold_lane(W, L, true)...});
#endif
}

template <int W>
inline vf fold(vf x, vf y) {
    return fold_impl<W>(x, y, std::make_integer_sequence<int, VW>{});
}

// a[0, N) folded pairwise with widths W, 2W, ..., VW: N / (VW / W * 2) vectors remain at the front
template <int W, int N>
inline void fold_all(vf* a) {
    for (int i = 0; i < N / 2; ++i) a[i] = fold<W>(a[2 * i], a[2 * i + 1]);
    if constexpr (W < VW) fold_all<2 * W, N / 2>(a);
}

// out[i] = the sum of a[i]'s lanes for i < P, P = N rounded up to VW (a[N, P) are zeroed here)
template <int N>
inline void lane_sums(vf* a, float* out) {
    constexpr int P = (N + VW - 1) / VW * VW;
    for (int i = N; i < P; ++i) a[i] = vf{};
    if constexpr (VW > 1) fold_all<2, P>(a);
    std::memcpy(out, a, P * sizeof(float));
}

// ---- indexer scoring ----

// add sum_h w[h] * max(q[h] . k[j], 0) over the NH heads starting at q, w to s (the SK keys of the block starting at
// `keys`, rows TILE floats apart). Each key's dot product runs over d in order, and the heads are added in order,
// whatever the blocking: every blocking gives the same scores, bit for bit.
template <int SK, int NH>
inline void score_heads(const float* q, const float* w, const float* keys, int D, vf (&s)[SK / VW]) {
    constexpr int NV = SK / VW;
    vf a[NH][NV] = {};
    for (int d = 0; d < D; ++d) {
        vf kv[NV];
        for (int i = 0; i < NV; ++i) kv[i] = load(keys + d * TILE + VW * i);
        for (int h = 0; h < NH; ++h) {
            const float qh = q[h * D + d];
            for (int i = 0; i < NV; ++i) a[h][i] += qh * kv[i];
        }
    }
    const vf zero = {};
    for (int h = 0; h < NH; ++h)
        for (int i = 0; i < NV; ++i) s[i] += w[h] * (a[h][i] > zero ? a[h][i] : zero);
}

template <int SK, int SH>
void score_row_blocked(const float* q, const float* w, const float* kt, int H, int D, int64_t end, float* out) {
    static_assert(TILE % SK == 0 && SK % VW == 0 && SH >= 1, "a scoring block is whole vectors within one tile");
    for (int64_t j0 = 0; j0 < end; j0 += SK) {
        vf s[SK / VW] = {};
        const float* keys = kt + (j0 / TILE) * TILE * D + j0 % TILE;
        head_groups(H, SH, [&](int h0, int nh) {
            dispatch<SH>(nh, [&](auto nh_c) {
                score_heads<SK, decltype(nh_c)::value>(q + h0 * D, w + h0, keys, D, s);
            });
        });
        for (int i = 0; i < SK / VW; ++i) store(out + j0 + VW * i, s[i]);
    }
}

// Which scoring blocking runs: 0 the target's default (SCORE_KEYS x SCORE_HEADS), 1 its alternative
// (SCORE_ALT_KEYS x SCORE_ALT_HEADS). Which is faster depends on the CPU, not only on its instruction set (AVX-512 on
// 256-bit units, as AMD Zen 4, prefers fewer accumulation chains), so the calibration times both and sets this once
// (`dsa_set_score_blocking`) before any kernel runs.
int score_blocking = 0;

// scores of one query row against keys [0, end), written to out[0, round_up(end, 64)); kt holds the keys tile by
// tile, [ceil(T / TILE), D, TILE] (one tile is one contiguous block: no cache-set conflicts between its rows)
void score_row(const float* q, const float* w, const float* kt, int H, int D, int64_t end, float* out) {
    if (score_blocking)
        score_row_blocked<SCORE_ALT_KEYS, SCORE_ALT_HEADS>(q, w, kt, H, D, end, out);
    else
        score_row_blocked<SCORE_KEYS, SCORE_HEADS>(q, w, kt, H, D, end, out);
}

// ---- top-k selection ----

// The k-th largest (k >= 1) of x[0, n), destroying x; spare holds n floats. Quickselect whose partition is written
// without branches (each value is stored to both sides, the counters advance by the comparison), so unlike
// std::nth_element it pays no branch mispredictions.
float kth_largest(float* x, int64_t n, int64_t k, float* spare) {
    while (n > 32) {
        float a = x[0], b = x[n / 2], c = x[n - 1];  // median of three as the pivot
        const float p = std::max(std::min(a, b), std::min(std::max(a, b), c));
        int64_t hi = 0, lo = 0;
        for (int64_t i = 0; i < n; ++i) {
            const float v = x[i];
            spare[hi] = v;
            hi += v > p;
            x[lo] = v;  // lo <= i: compacting in place
            lo += v < p;
        }
        if (k <= hi) {
            std::swap(x, spare);
            n = hi;
        } else if (k <= n - lo) {
            return p;
        } else {
            k -= n - lo;
            n = lo;
        }
    }
    std::nth_element(x, x + (k - 1), x + n, std::greater<float>());
    return x[k - 1];
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// For each 8-bit mask, the lanes of its set bits in order, 4 bits each: the permutation that packs them to the front
struct PackTable {
    uint32_t v[256];
    constexpr PackTable() : v() {
        for (int m = 0; m < 256; ++m) {
            uint32_t p = 0;
            int c = 0;
            for (int l = 0; l < 8; ++l)
                if (m >> l & 1) p |= uint32_t(l) << (4 * c++);
            v[m] = p;
        }
    }
};
constexpr PackTable PACK;
#endif

// Entries of v[0, n) that are >= tau and finite: their values to val and indices to idx, in index order; the count.
// val and idx have room for n + 16 entries (the vector paths store whole vectors past the count).
int64_t gather_at_least(const float* v, int64_t n, float tau, float* val, int32_t* idx) {
    int64_t c = 0, j = 0;
#if defined(__AVX512F__)
    // compress in registers, then a plain store: the memory form of vcompressps is microcoded on AMD Zen 4
    const __m512 t = _mm512_set1_ps(tau), ninf = _mm512_set1_ps(NEG_INF);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= n; j += 16) {
        const __m512 x = _mm512_loadu_ps(v + j);
        const __mmask16 m = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, ninf, _CMP_GT_OQ);
        _mm512_storeu_ps(val + c, _mm512_maskz_compress_ps(m, x));
        _mm512_storeu_si512(idx + c, _mm512_maskz_compress_epi32(m, iota));
        c += __builtin_popcount(m);
        iota = _mm512_add_epi32(iota, step);
    }
#elif defined(__AVX2__)
    // AVX2 has no compress: the mask's packing permutation comes from a table
    const __m256 t = _mm256_set1_ps(tau), ninf = _mm256_set1_ps(NEG_INF);
    const __m256i step = _mm256_set1_epi32(8), shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
                  low3 = _mm256_set1_epi32(7);
    __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; j + 8 <= n; j += 8) {
        const __m256 x = _mm256_loadu_ps(v + j);
        const int m = _mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(x, t, _CMP_GE_OQ), _mm256_cmp_ps(x, ninf, _CMP_GT_OQ)));
        const __m256i perm =
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(PACK.v[m])), shifts), low3);
        _mm256_storeu_ps(val + c, _mm256_permutevar8x32_ps(x, perm));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + c), _mm256_permutevar8x32_epi32(iota, perm));
        c += __builtin_popcount(m);
        iota = _mm256_add_epi32(iota, step);
    }
#endif
    for (; j < n; ++j) {  // branch-free: every entry is written, the count advances by the test
        val[c] = v[j];
        idx[c] = static_cast<int32_t>(j);
        c += (v[j] >= tau) & (v[j] > NEG_INF);
    }
    return c;
}

// The K largest of v[0, n) (K < number of finite entries), their indices ascending into out; work holds 3n + 16
// floats, cand n + 16. Returns whether the K-th largest value is tied with an entry left out (which of them is kept is
// then a convention), or the row holds NaN scores; out is then incomplete and the caller re-ranks the row.
bool select_row(const float* v, int64_t n, int64_t K, float* work, int32_t* cand, int64_t* out) {
    // exact lower bound tau: with G = 2K strided groups, K group maxima are >= the K-th largest group maximum, so the
    // row's K-th largest entry is >= tau and every selected entry passes the filter
    float tau = NEG_INF;
    const int64_t G = 2 * K, m = n / G;
    float* val = work;
    float* scratch = work + n + 16;
    if (m >= 2) {
        std::copy(v, v + G, scratch);
        for (int64_t i = 1; i < m; ++i) {
            const float* row = v + i * G;
            for (int64_t g = 0; g < G; ++g) scratch[g] = std::max(scratch[g], row[g]);
        }
        tau = kth_largest(scratch, G, K, scratch + G);
    }
    const int64_t c = gather_at_least(v, n, tau, val, cand);  // candidates in index order
    if (c < K) return true;  // only with NaN scores (no comparison holds): leave the row to torch's ranking
    std::copy(val, val + c, scratch);
    const float t = kth_largest(scratch, c, K, scratch + c);  // the K-th largest value
    int64_t above = 0;
    for (int64_t i = 0; i < c; ++i) above += val[i] > t;
    int64_t ties = K - above, o = 0;  // entries equal to t still to keep
    for (int64_t i = 0; i < c; ++i) {
        const float x = val[i];
        if (x > t || (x == t && ties-- > 0)) out[o++] = cand[i];  // every equal entry counts ties down once
    }
    return ties < 0;  // an equal entry was left out
}

// The K keys torch.topk's CPU kernel returns for the row v[0, n) (hidden keys -inf), ascending into out: it ranks
// (value, index) pairs in index order by value, largest first, with std::nth_element at position K-1, or with
// std::partial_sort when K * 64 <= n. Used where the K-th score is tied, so the choice among equal scores is the one
// HF's ranking makes (on the same scores).
void rank_like_torch(const float* v, int64_t n, int64_t K, int64_t* out) {
    std::vector<std::pair<float, int64_t>> q(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) q[j] = {v[j], j};
    auto larger = [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) {
        return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
    };
    if (K * 64 <= n)
        std::partial_sort(q.begin(), q.begin() + K, q.end(), larger);
    else
        std::nth_element(q.begin(), q.begin() + (K - 1), q.end(), larger);
    int64_t o = 0;
    for (int64_t i = 0; i < K; ++i)
        if (q[i].first != NEG_INF) out[o++] = q[i].second;
    std::sort(out, out + o);
    std::fill(out + o, out + K, -1);
}

// The visible keys' scores of one row into sc[0, end) (hidden ones -inf); returns end, the last visible key + 1.
int64_t masked_scores(const float* q, const float* w, const float* kt, int H, int D, int64_t k0, int64_t k1,
                      const uint8_t* mr, float* sc, int64_t* visible) {
    int64_t end = k1;
    if (mr) {
        while (end > k0 && !mr[end - 1 - k0]) --end;  // trailing hidden keys are not scored
    }
    score_row(q, w, kt, H, D, end, sc);
    *visible = end;
    if (mr) {
        for (int64_t j = k0; j < end; ++j)
            if (!mr[j - k0]) {
                sc[j] = NEG_INF;
                --*visible;
            }
    }
    return end;
}

// ---- sparse attention ----

// The selected key rows of one query row (in `base`, rows ld apart), in slot order, empty slots skipped; returns how
// many. Used for the key table and, in the backward, for its gradient.
template <typename T>
inline int64_t selected(const int64_t* ir, int64_t K, T* base, int64_t ld, T** rows) {
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k)
        if (ir[k] >= 0) rows[n++] = base + ir[k] * ld;
    return n;
}

// out[i * ld + k + j] = x[i] . rows[k + j] for the NH vectors x (D apart) and the rows k .. k + NR - 1 (fewer at the
// end: a short last block repeats a row), NR = DOT_ACC / NH: NH * NR accumulation chains, then one
// transpose-reduction instead of NH * NR horizontal sums (with rows of a few vectors the sums cost as much as the dots)
template <int NH>
inline void dots_block(const float* x, const float* const* rows, int64_t k, int64_t n, int D, float* out,
                       int64_t ld) {
    constexpr int NR = DOT_ACC / NH > 0 ? DOT_ACC / NH : 1;
    const float* r[NR];
    for (int j = 0; j < NR; ++j) r[j] = rows[std::min<int64_t>(k + j, n - 1)];
    constexpr int P = (NH * NR + VW - 1) / VW * VW;
    vf a[P] = {};
    const int nv = D / VW;
    for (int v = 0; v < nv; ++v) {
        vf rv[NR];
        for (int j = 0; j < NR; ++j) rv[j] = load(r[j] + VW * v);
        for (int i = 0; i < NH; ++i) {
            const vf xv = load(x + i * D + VW * v);
            for (int j = 0; j < NR; ++j) a[NR * i + j] += xv * rv[j];
        }
    }
    float d[P];
    lane_sums<NH * NR>(a, d);
    for (int e = VW * nv; e < D; ++e)
        for (int i = 0; i < NH; ++i)
            for (int j = 0; j < NR; ++j) d[NR * i + j] += x[i * D + e] * r[j][e];
    for (int i = 0; i < NH; ++i)
        for (int j = 0; j < NR && k + j < n; ++j) out[i * ld + k + j] = d[NR * i + j];
}

// out[h * ld + k] = x[h] . rows[k] for H vectors x (D apart) and n rows, in head groups of at most DOT_HEADS
// (DOT_ACC / DOT_HEADS rows per block) or fewer heads with more rows each
inline void all_dots(const float* x, int H, int D, const float* const* rows, int64_t n, float* out, int64_t ld) {
    constexpr int G = DOT_HEADS;
    head_groups(H, G, [&](int h0, int nh) {
        dispatch<G>(nh, [&](auto nh_c) {
            constexpr int NH = decltype(nh_c)::value;
            constexpr int NR = DOT_ACC / NH > 0 ? DOT_ACC / NH : 1;
            for (int64_t k = 0; k < n; k += NR) dots_block<NH>(x + h0 * D, rows, k, n, D, out + h0 * ld, ld);
        });
    });
}

// lg[0, n) <- its softmax, with an extra logit `sink` (-inf: none) joining the denominator; lg has room for n rounded
// up to VW. A row of -inf only (no key, no sink) becomes zeros: it attends to nothing.
inline void softmax_row(float* lg, int64_t n, float sink) {
    const int64_t np = (n + VW - 1) / VW * VW;
    std::fill(lg + n, lg + np, NEG_INF);
    float mx = sink;
    for (int64_t k = 0; k < n; ++k) mx = std::max(mx, lg[k]);
    if (mx == NEG_INF) {
        std::fill(lg, lg + n, 0.f);
        return;
    }
    vf sum = {};
    for (int64_t k = 0; k < np; k += VW) {
        const vf e = vexp(load(lg + k) - mx);
        store(lg + k, e);
        sum += e;
    }
    const float inv = 1.f / (hsum(sum) + (sink == NEG_INF ? 0.f : vexp(splat(sink - mx))[0]));
    for (int64_t k = 0; k < n; ++k) lg[k] *= inv;
}

// out[h * Dv + d] = sum_k p[h * ld + k] * rows[k][d] for the NH heads starting at p, d < Dv: NV vectors of columns at a
// time (then single vectors, then single columns) with the heads' sums in registers across all n rows
template <int NH, int NV>
inline void weighted_rows(const float* const* rows, int64_t n, const float* p, int64_t ld, int Dv, float* out,
                          int& d0) {
    for (; d0 + NV * VW <= Dv; d0 += NV * VW) {
        vf acc[NH][NV] = {};
        for (int64_t k = 0; k < n; ++k) {
            vf kv[NV];
            for (int i = 0; i < NV; ++i) kv[i] = load(rows[k] + d0 + VW * i);
            for (int h = 0; h < NH; ++h) {
                const float ph = p[h * ld + k];
                for (int i = 0; i < NV; ++i) acc[h][i] += ph * kv[i];
            }
        }
        for (int h = 0; h < NH; ++h)
            for (int i = 0; i < NV; ++i) store(out + h * Dv + d0 + VW * i, acc[h][i]);
    }
}

template <int NH>
inline void weighted_rows_all(const float* const* rows, int64_t n, const float* p, int64_t ld, int Dv, float* out) {
    int d0 = 0;
    weighted_rows<NH, ROW_VECS>(rows, n, p, ld, Dv, out, d0);
    weighted_rows<NH, 1>(rows, n, p, ld, Dv, out, d0);
    for (int h = 0; h < NH; ++h)
        for (int d = d0; d < Dv; ++d) {
            float a = 0.f;
            for (int64_t k = 0; k < n; ++k) a += p[h * ld + k] * rows[k][d];
            out[h * Dv + d] = a;
        }
}

// out[h] = sum_k w[h * ld + k] * rows[k][0, Dv) for all H heads
inline void all_weighted_rows(const float* const* rows, int64_t n, const float* w, int64_t ld, int H, int Dv,
                              float* out) {
    head_groups(H, ROW_HEADS, [&](int h0, int nh) {
        dispatch<ROW_HEADS>(nh, [&](auto nh_c) { weighted_rows_all<decltype(nh_c)::value>(rows, n, w + h0 * ld, ld, Dv, out + h0 * Dv); });
    });
}

// grows[k][0, D) += sum_h a[h * lda + k] * x[h] and grows[k][0, Dv) += sum_h b[h * ldb + k] * y[h], for the n rows:
// x [H, D] and y [H, Dv] held in registers one vector of channels and NH heads at a time, each row read and written
// once per vector of channels and head group
template <int NH>
inline void add_outer_heads(float* const* grows, int64_t n, const float* a, int64_t lda, const float* b, int64_t ldb,
                            const float* x, const float* y, int D, int Dv) {
    int c = 0;
    for (; c + VW <= D; c += VW) {
        vf xv[NH], yv[NH];
        const bool with_y = c + VW <= Dv;
        for (int h = 0; h < NH; ++h) {
            xv[h] = load(x + h * D + c);
            yv[h] = with_y ? load(y + h * Dv + c) : vf{};
        }
        for (int64_t k = 0; k < n; ++k) {
            vf g = load(grows[k] + c);
            for (int h = 0; h < NH; ++h) g += a[h * lda + k] * xv[h] + b[h * ldb + k] * yv[h];
            store(grows[k] + c, g);
        }
        if (!with_y && c < Dv)  // a block that straddles the end of the value channels
            for (int64_t k = 0; k < n; ++k)
                for (int h = 0; h < NH; ++h)
                    for (int d = c; d < Dv; ++d) grows[k][d] += b[h * ldb + k] * y[h * Dv + d];
    }
    for (int64_t k = 0; k < n; ++k)
        for (int h = 0; h < NH; ++h)
            for (int d = c; d < D; ++d)
                grows[k][d] += a[h * lda + k] * x[h * D + d] + (d < Dv ? b[h * ldb + k] * y[h * Dv + d] : 0.f);
}

inline void add_outer(float* const* grows, int64_t n, const float* a, int64_t lda, const float* b, int64_t ldb,
                      const float* x, const float* y, int H, int D, int Dv) {
    head_groups(H, OUTER_HEADS, [&](int h0, int nh) {
        dispatch<OUTER_HEADS>(nh, [&](auto nh_c) {
            add_outer_heads<decltype(nh_c)::value>(grows, n, a + h0 * lda, lda, b + h0 * ldb, ldb, x + h0 * D, y + h0 * Dv, D, Dv);
        });
    });
}

// Element-wise chains that PyTorch runs as several passes over memory (each op of the forward and of autograd's
// backward reads and writes the whole tensor): one pass per row here, the row in cache. Columns past the last whole
// vector run through the same vector code on a padded copy, so every column gets the same arithmetic.

// f over the n columns of a row in vectors: f(offset, valid columns) with offset + VW <= n for all but the last call
template <typename F>
inline void by_vectors(int64_t n, F&& f) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) f(i, VW);
    if (i < n) f(i, n - i);
}

// load / store of up to VW floats (a partial vector is zero-padded)
inline vf load_part(const float* p, int64_t m) {
    if (m == VW) return load(p);
    float t[VW] = {};
    std::memcpy(t, p, sizeof(float) * m);
    return load(t);
}

inline void store_part(float* p, vf v, int64_t m) {
    if (m == VW) return store(p, v);
    float t[VW];
    store(t, v);
    std::memcpy(p, t, sizeof(float) * m);
}

// the sum of x^2 over a row, four chains
inline float sum_squares(const float* x, int64_t n) {
    vf a[4] = {};
    int64_t i = 0;
    for (; i + 4 * VW <= n; i += 4 * VW)
        for (int c = 0; c < 4; ++c) {
            const vf v = load(x + i + c * VW);
            a[c] += v * v;
        }
    by_vectors(n - i, [&](int64_t o, int64_t m) {
        const vf v = load_part(x + i + o, m);
        a[0] += v * v;
    });
    return hsum((a[0] + a[1]) + (a[2] + a[3]));
}

// dsa_rms_norm_bwd on rows r0..r1-1, dy * xh added into dw
void rms_norm_bwd_rows(const float* x, int64_t ldx, const float* w, int64_t D, const float* rstd, const float* dy,
                       float* dx, float* dw, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *xr = x + r * ldx, *dyr = dy + r * D;
        const float rs = rstd[r];
        vf acc = {};
        by_vectors(D, [&](int64_t o, int64_t m) {
            acc += (load_part(dyr + o, m) * load_part(w + o, m)) * (load_part(xr + o, m) * rs);
        });
        const float c = hsum(acc) / static_cast<float>(D);
        float* dxr = dx + r * D;
        by_vectors(D, [&](int64_t o, int64_t m) {
            const vf dyv = load_part(dyr + o, m), xh = load_part(xr + o, m) * rs;
            store_part(dxr + o, rs * (dyv * load_part(w + o, m) - xh * c), m);
            store_part(dw + o, load_part(dw + o, m) + dyv * xh, m);
        });
    }
}

}  // namespace

extern "C" {

// Which target this library was built for and its blocking, e.g.
// "avx512 vw=16 score=64x4|16x4 dot=4x4 rows=4x4 outer=4" (the scoring default, then its alternative).
const char* dsa_build_info() {
    static char info[128];
    std::snprintf(info, sizeof info, "%s vw=%d score=%dx%d|%dx%d dot=%dx%d rows=%dx%d outer=%d", DSA_ISA, VW,
                  SCORE_KEYS, SCORE_HEADS, SCORE_ALT_KEYS, SCORE_ALT_HEADS, DOT_HEADS, DOT_ACC / DOT_HEADS, ROW_VECS,
                  ROW_HEADS, OUTER_HEADS);
    return info;
}

// Run the scoring default (0) or its alternative (1) from now on, in every thread; returns the previous choice. Set
// it before kernels run, not while they do.
int dsa_set_score_blocking(int alt) {
    const int before = score_blocking;
    score_blocking = alt ? 1 : 0;
    return before;
}

// Rows r0..r1-1 of each of B sequences. Per sequence: q [R, H, D], w [R, H] (the score scale folded in), the keys as
// tiles [ceil(k1 / 64), D, 64] (zero-padded, kt_bstride floats apart), mask [R, mask_ld] uint8 for keys k0..k1-1 (null:
// every key < k1 is seen; mask_bstride 0 shares one mask), idx [R, ldo] int64 receives K = min(topk, k1) indices per row
// (ascending) then -1. A row whose K-th largest score ties with a key left out holds the keys torch.topk would pick
// (`rank_like_torch`); returns the number of such rows.
int64_t dsa_select(const float* q, const float* w, const float* kt, int64_t kt_bstride, int B, int64_t R, int H,
                   int D, int64_t k0, int64_t k1, const uint8_t* mask, int64_t mask_bstride, int64_t mask_ld,
                   int64_t K, int64_t* idx, int64_t ldo, int64_t r0, int64_t r1) {
    // scratch left uninitialised (every entry read is written first): zero-filling it cost more than a short row's
    // selection
    const std::unique_ptr<float[]> buf(new float[(k1 + TILE - 1) / TILE * TILE]), work(new float[3 * k1 + 32]);
    const std::unique_ptr<int32_t[]> cand(new int32_t[k1 + 16]);
    int64_t n_tied = 0;
    for (int b = 0; b < B; ++b) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t row = b * R + r;
            const uint8_t* mr = mask ? mask + b * mask_bstride + r * mask_ld : nullptr;
            int64_t visible;
            const int64_t end = masked_scores(q + row * H * D, w + row * H, kt + b * kt_bstride, H, D, k0, k1, mr,
                                              buf.get(), &visible);
            int64_t* out = idx + row * ldo;
            if (visible <= K) {
                int64_t o = 0;
                for (int64_t j = 0; j < end; ++j)
                    if (buf[j] != NEG_INF) out[o++] = j;  // NaN counts as visible, as in torch.topk
                std::fill(out + o, out + ldo, -1);
            } else {
                if (select_row(buf.get(), end, K, work.get(), cand.get(), out)) {
                    // re-rank the whole row (hidden tail included, as torch.topk sees it)
                    std::fill(buf.get() + end, buf.get() + k1, NEG_INF);
                    rank_like_torch(buf.get(), k1, K, out);
                    ++n_tied;
                }
                std::fill(out + K, out + ldo, -1);
            }
        }
    }
    return n_tied;
}

// Attention of query rows r0..r1-1 over their selected keys (the absorbed MLA / MQA form: one key row per token shared
// by all heads, values = its first Dv channels). q [rows, H, D] (softmax scale folded in); table rows ld floats apart,
// sequence b's token t at row b * per_b + t; idx [rows, K] int64 key positions, -1 = none; S rows per sequence;
// sinks [H] (a logit joining each head's softmax denominator) or null; out [rows, H, Dv]; probs [rows, H, K] or null:
// receives the softmax over the row's selected keys (empty slots skipped, zeros after), for the backward. A row with
// no key at all gets zeros.
void dsa_sparse_attention(const float* q, const float* table, int64_t ld, int64_t per_b, const int64_t* idx,
                          int64_t S, int64_t K, int H, int D, int Dv, const float* sinks, float* out, float* probs,
                          int64_t r0, int64_t r1) {
    const int64_t Kp = (K + VW - 1) / VW * VW;  // logits rows padded to whole vectors
    std::vector<float> logits(static_cast<size_t>(H) * Kp);
    std::vector<const float*> rows(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = selected(idx + r * K, K, table + (r / S) * per_b * ld, ld, rows.data());
        all_dots(q + r * H * D, H, D, rows.data(), n, logits.data(), Kp);
        // softmax numerators in place, then every selected row is read once for all heads
        for (int h = 0; h < H; ++h) {
            float* ph = logits.data() + h * Kp;
            softmax_row(ph, n, sinks ? sinks[h] : NEG_INF);
            if (probs) {
                std::copy(ph, ph + n, probs + (r * H + h) * K);
                std::fill(probs + (r * H + h) * K + n, probs + (r * H + h + 1) * K, 0.f);
            }
        }
        all_weighted_rows(rows.data(), n, logits.data(), Kp, H, Dv, out + r * H * Dv);
    }
}

// Gradients of dsa_sparse_attention without sinks, rows r0..r1-1, from dout [rows, H, Dv] and the forward's probs:
// dq [rows, H, D] is written, the key rows' gradients are added into dtable (rows dld floats apart, same numbering
// as table). Per row: dp = dout . v over the selection, ds = p * (dp - sum(p * dp)), dq = sum ds * k, and each
// selected key row gets sum over heads of ds * q (all D channels) plus p * dout (its first Dv, the value part).
void dsa_sparse_attention_bwd(const float* q, const float* table, int64_t ld, int64_t per_b, const int64_t* idx,
                              int64_t S, int64_t K, int H, int D, int Dv, const float* probs, const float* dout,
                              float* dq, float* dtable, int64_t dld, int64_t r0, int64_t r1) {
    const int64_t Kp = (K + VW - 1) / VW * VW;
    std::vector<float> ds(static_cast<size_t>(H) * Kp);
    std::vector<const float*> rows(static_cast<size_t>(K));
    std::vector<float*> grows(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = selected(idx + r * K, K, table + (r / S) * per_b * ld, ld, rows.data());
        selected(idx + r * K, K, dtable + (r / S) * per_b * dld, dld, grows.data());
        const float* go = dout + r * H * Dv;
        all_dots(go, H, Dv, rows.data(), n, ds.data(), Kp);  // dp
        for (int h = 0; h < H; ++h) {
            const float* ph = probs + (r * H + h) * K;
            float* dh = ds.data() + h * Kp;
            float pdp = 0.f;
            for (int64_t k = 0; k < n; ++k) pdp += ph[k] * dh[k];
            for (int64_t k = 0; k < n; ++k) dh[k] = ph[k] * (dh[k] - pdp);
        }
        all_weighted_rows(rows.data(), n, ds.data(), Kp, H, D, dq + r * H * D);
        add_outer(grows.data(), n, ds.data(), Kp, probs + r * H * K, K, q + r * H * D, go, H, D, Dv);
    }
}

// RMSNorm of rows r0..r1-1 (HF DeepseekV3RMSNorm in fp32): x rows ldx floats apart, D channels; rstd[r] = 1 / sqrt(
// mean(x^2) + eps) is kept for the backward and y = w * (x * rstd), multiplied in that order, as PyTorch does.
void dsa_rms_norm(const float* x, int64_t ldx, const float* w, int64_t D, float eps, float* y, int64_t ldy,
                  float* rstd, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * ldx;
        const float rs = 1.f / std::sqrt(sum_squares(xr, D) / static_cast<float>(D) + eps);
        rstd[r] = rs;
        float* yr = y + r * ldy;
        by_vectors(D, [&](int64_t o, int64_t m) {
            store_part(yr + o, load_part(w + o, m) * (load_part(xr + o, m) * rs), m);
        });
    }
}

// Gradients of dsa_rms_norm, rows r0..r1-1: with xh = x * rstd and g = dy * w, dx = rstd * (g - xh * mean(g * xh))
// (dx rows D floats apart); dy * xh summed over the rows is added into dw [D] (one buffer per thread part), in blocks
// of DW_BLOCK rows first: a running fp32 sum over thousands of rows loses digits that a sum of block sums keeps.
void dsa_rms_norm_bwd(const float* x, int64_t ldx, const float* w, int64_t D, const float* rstd, const float* dy,
                      float* dx, float* dw, int64_t r0, int64_t r1) {
    constexpr int64_t DW_BLOCK = 32;
    std::vector<float> block(static_cast<size_t>(D));
    for (int64_t b0 = r0; b0 < r1; b0 += DW_BLOCK) {
        std::fill(block.begin(), block.end(), 0.f);
        rms_norm_bwd_rows(x, ldx, w, D, rstd, dy, dx, block.data(), b0, std::min(r1, b0 + DW_BLOCK));
        for (int64_t c = 0; c < D; ++c) dw[c] += block[c];
    }
}

// SwiGLU of rows r0..r1-1: out = silu(gate) * up over I columns; gate and up rows ld floats apart (the fused
// [rows, 2I] gate_up: up = gate + I), out rows I apart. silu(g) = g / (1 + e^-g), as PyTorch computes it.
void dsa_swiglu(const float* gate, const float* up, int64_t ld, int64_t I, float* out, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *g = gate + r * ld, *u = up + r * ld;
        float* o = out + r * I;
        by_vectors(I, [&](int64_t c, int64_t m) {
            const vf gv = load_part(g + c, m);
            store_part(o + c, gv / (1.f + vexp(-gv)) * load_part(u + c, m), m);
        });
    }
}

// Gradients of dsa_swiglu, rows r0..r1-1, from dout (rows I apart): with s = sigmoid(gate), dgate = dout * up * s *
// (1 + gate * (1 - s)) and dup = dout * silu(gate), written with the inputs' layout (rows ld apart).
void dsa_swiglu_bwd(const float* gate, const float* up, int64_t ld, int64_t I, const float* dout, float* dgate,
                    float* dup, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *g = gate + r * ld, *u = up + r * ld, *d = dout + r * I;
        float *dg = dgate + r * ld, *du = dup + r * ld;
        by_vectors(I, [&](int64_t c, int64_t m) {
            const vf gv = load_part(g + c, m), dv = load_part(d + c, m), e1 = 1.f + vexp(-gv), s = 1.f / e1;
            store_part(dg + c, dv * load_part(u + c, m) * (s * (1.f + gv * (1.f - s))), m);
            store_part(du + c, dv * (gv / e1), m);
        });
    }
}

}  // extern "C"
