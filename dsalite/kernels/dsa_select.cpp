// CPU kernels for DSA, plain C ABI for ctypes; built on first use by dsalite/kernels/__init__.py.
//
// Indexer (dsa_select): scoring and top-k fused, one query row at a time; the row's scores live in a small buffer
// (never an [S, Hi, T] block) and the K largest are found by an exact threshold filter plus a selection on the few
// candidates. score[j] = sum_h w[h] * max(q[h] . k[j], 0) over keys j < end (end = the row's last visible key + 1);
// keys k0..k1-1 are further masked by mask[r, j - k0] (0 = hidden). The output row holds the K selected key indices
// in ascending order, then -1 where fewer than K keys are visible; among equal scores the lower index is kept, except
// where the tie sits at the K-th place: that row is ranked the way torch.topk ranks it (`rank_like_torch`).
// Sparse attention over the selected keys in the absorbed MQA form (dsa_sparse_attention, for inference and training)
// and its backward (dsa_sparse_attention_bwd), each reading the selected rows in place.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 64;  // keys scored together: four 16-float vectors
constexpr int HG = 4;          // heads accumulated together: 16 vector accumulators share each key load
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16 load(const float* p) {
    v16 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

// the sum of a's lanes as a tree (a left-to-right sum would chain 16 dependent adds)
inline float hsum(v16 a) {
    v8 lo, hi;
    __builtin_memcpy(&lo, &a, sizeof lo);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof lo, sizeof hi);
    const v8 s8 = lo + hi;
    v4 l4, h4;
    __builtin_memcpy(&l4, &s8, sizeof l4);
    __builtin_memcpy(&h4, reinterpret_cast<const char*>(&s8) + sizeof l4, sizeof h4);
    const v4 s4 = l4 + h4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// e^x lane by lane, within about 1 ulp of expf: x = n·ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by its degree-7
// Taylor polynomial (truncation error < 1e-8), times 2^n through the exponent bits. Below -87.3 (where expf goes
// subnormal, and for -inf) the result is 0.
inline v16 vexp(v16 x) {
    const v16 lo = v16{} - 87.3f;
    const auto under = x < lo;
    x = under ? lo : x;
    x = x > 88.7f ? v16{} + 88.7f : x;
    const v16 shift = v16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    const v16 n = (x * 1.44269504f + shift) - shift;
    const v16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    v16 p = v16{} + (1.f / 5040);
    p = p * r + (1.f / 720);
    p = p * r + (1.f / 120);
    p = p * r + (1.f / 24);
    p = p * r + (1.f / 6);
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16 scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    const v16 y = p * scale;
    return under ? v16{} : y;
}

// out[h * ld] = q[h] . ka and out[h * ld + 1] = q[h] . kb for the NH heads starting at q (rows D apart): the
// accumulation chains of all heads and both keys interleave, and each query vector is loaded once for two keys
template <int NH>
inline void dots(const float* q, const float* ka, const float* kb, int D, int nv, float* out, int64_t ld) {
    v16 a[NH] = {}, b[NH] = {};
    for (int i = 0; i < nv; ++i) {
        const v16 kva = load(ka + 16 * i), kvb = load(kb + 16 * i);
        for (int h = 0; h < NH; ++h) {
            const v16 qv = load(q + h * D + 16 * i);
            a[h] += qv * kva;
            b[h] += qv * kvb;
        }
    }
    for (int h = 0; h < NH; ++h) {
        float da = hsum(a[h]), db = hsum(b[h]);
        for (int d = 16 * nv; d < D; ++d) {
            da += q[h * D + d] * ka[d];
            db += q[h * D + d] * kb[d];
        }
        out[h * ld] = da;
        out[h * ld + 1] = db;
    }
}

// One step of a transpose-reduction: lanes are groups of w, the first w/2 of each group take x's pairwise sums
// (lane j + lane j + w/2 of that group), the last w/2 take y's. Four steps (w = 2, 4, 8, 16) turn 16 vectors into
// one whose lane i is the sum of vector i: 15 such steps instead of 16 horizontal sums.
template <int W>
inline v16 fold(v16 x, v16 y) {
    v16i lo, hi;
    for (int l = 0; l < 16; ++l) {
        const int g = l / W * W, j = l % W;
        lo[l] = j < W / 2 ? g + j : 16 + g + j - W / 2;
        hi[l] = j < W / 2 ? g + j + W / 2 : 16 + g + j;
    }
    return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// out[4 * i + j] = q[i] . r[j] for four query vectors (D apart) and four rows: 16 accumulation chains, then one
// transpose-reduction instead of 16 horizontal sums (with 16-wide rows of 5 vectors, the sums cost as much as the dots)
inline void dots4x4(const float* q, const float* const r[4], int D, int nv, float out[16]) {
    v16 a[16] = {};
    for (int v = 0; v < nv; ++v) {
        v16 kv[4];
        for (int j = 0; j < 4; ++j) kv[j] = load(r[j] + 16 * v);
        for (int i = 0; i < 4; ++i) {
            const v16 qv = load(q + i * D + 16 * v);
            for (int j = 0; j < 4; ++j) a[4 * i + j] += qv * kv[j];
        }
    }
    v16 b[8], c[4], e[2];
    for (int i = 0; i < 8; ++i) b[i] = fold<2>(a[2 * i], a[2 * i + 1]);
    for (int i = 0; i < 4; ++i) c[i] = fold<4>(b[2 * i], b[2 * i + 1]);
    for (int i = 0; i < 2; ++i) e[i] = fold<8>(c[2 * i], c[2 * i + 1]);
    const v16 sum = fold<16>(e[0], e[1]);
    __builtin_memcpy(out, &sum, sizeof sum);
    for (int d = 16 * nv; d < D; ++d)
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) out[4 * i + j] += q[i * D + d] * r[j][d];
}

// lg[0, n) <- its softmax, with an extra logit `sink` (-inf: none) joining the denominator; lg has room for n rounded
// up to 16. A row of -inf only (no key, no sink) becomes zeros: it attends to nothing.
inline void softmax_row(float* lg, int64_t n, float sink) {
    const int64_t np = (n + 15) / 16 * 16;
    std::fill(lg + n, lg + np, NEG_INF);
    float mx = sink;
    for (int64_t k = 0; k < n; ++k) mx = std::max(mx, lg[k]);
    if (mx == NEG_INF) {
        std::fill(lg, lg + n, 0.f);
        return;
    }
    v16 sum = {};
    for (int64_t k = 0; k < np; k += 16) {
        const v16 e = vexp(load(lg + k) - mx);
        __builtin_memcpy(lg + k, &e, sizeof e);
        sum += e;
    }
    const float inv = 1.f / (hsum(sum) + (sink == NEG_INF ? 0.f : vexp(v16{} + (sink - mx))[0]));
    for (int64_t k = 0; k < n; ++k) lg[k] *= inv;
}

// 64 consecutive floats as four vectors
inline void load64(const float* p, v16 (&k)[4]) {
    for (int i = 0; i < 4; ++i) k[i] = load(p + 16 * i);
}

// acc += s * k, four vectors
inline void add_scaled(v16 (&acc)[4], float s, const v16 (&k)[4]) {
    for (int i = 0; i < 4; ++i) acc[i] += s * k[i];
}

// out[h * Dv + d] = sum_k p[h * ld + k] * rows[k][d] for the NH heads starting at p, d < Dv: 64 columns at a time
// (then 16, then single ones) with the heads' sums in registers across all n rows
template <int NH>
inline void weighted_rows(const float* const* rows, int64_t n, const float* p, int64_t ld, int Dv, float* out) {
    int d0 = 0;
    for (; d0 + 64 <= Dv; d0 += 64) {
        v16 acc[NH][4] = {};
        for (int64_t k = 0; k < n; ++k) {
            v16 kv[4];
            load64(rows[k] + d0, kv);
            for (int h = 0; h < NH; ++h) add_scaled(acc[h], p[h * ld + k], kv);
        }
        for (int h = 0; h < NH; ++h)
            for (int i = 0; i < 4; ++i) __builtin_memcpy(out + h * Dv + d0 + 16 * i, &acc[h][i], sizeof(v16));
    }
    for (; d0 + 16 <= Dv; d0 += 16) {
        v16 acc[NH] = {};
        for (int64_t k = 0; k < n; ++k) {
            const v16 kv = load(rows[k] + d0);
            for (int h = 0; h < NH; ++h) acc[h] += p[h * ld + k] * kv;
        }
        for (int h = 0; h < NH; ++h) __builtin_memcpy(out + h * Dv + d0, &acc[h], sizeof(v16));
    }
    for (int h = 0; h < NH; ++h)
        for (int d = d0; d < Dv; ++d) {
            float a = 0.f;
            for (int64_t k = 0; k < n; ++k) a += p[h * ld + k] * rows[k][d];
            out[h * Dv + d] = a;
        }
}

// add sum_h w[h] * max(q[h] . k[j], 0) over the NH heads starting at q, w to s (keys j0..j0+63)
template <int NH>
inline void heads(const float* q, const float* w, const float* tile, int D, v16 (&s)[4]) {
    v16 a[NH][4] = {};
    for (int d = 0; d < D; ++d) {
        v16 kv[4];
        load64(tile + d * TILE, kv);
        for (int h = 0; h < NH; ++h) add_scaled(a[h], q[h * D + d], kv);
    }
    const v16 zero = {};
    for (int h = 0; h < NH; ++h)
        for (int i = 0; i < 4; ++i) s[i] += w[h] * (a[h][i] > zero ? a[h][i] : zero);
}

// scores of one query row against keys [0, end), written to out[0, round_up(end, TILE)); kt holds the keys tile by
// tile, [ceil(T / TILE), D, TILE] (one tile is one contiguous block: no cache-set conflicts between its rows)
void score_row(const float* q, const float* w, const float* kt, int H, int D, int64_t end, float* out) {
    for (int64_t j0 = 0; j0 < end; j0 += TILE) {
        v16 s[4] = {};
        const float* tile = kt + j0 * D;
        int h = 0;
        for (; h + HG <= H; h += HG) heads<HG>(q + h * D, w + h, tile, D, s);
        for (; h < H; ++h) heads<1>(q + h * D, w + h, tile, D, s);
        for (int i = 0; i < 4; ++i) __builtin_memcpy(out + j0 + 16 * i, &s[i], sizeof s[i]);
    }
}

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

// Entries of v[0, n) that are >= tau and finite: their values to val and indices to idx, in index order; the count.
int64_t gather_at_least(const float* v, int64_t n, float tau, float* val, int32_t* idx) {
    int64_t c = 0, j = 0;
#ifdef __AVX512F__
    const __m512 t = _mm512_set1_ps(tau), ninf = _mm512_set1_ps(NEG_INF);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= n; j += 16) {
        const __m512 x = _mm512_loadu_ps(v + j);
        const __mmask16 m = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, ninf, _CMP_GT_OQ);
        _mm512_mask_compressstoreu_ps(val + c, m, x);
        _mm512_mask_compressstoreu_epi32(idx + c, m, iota);
        c += __builtin_popcount(m);
        iota = _mm512_add_epi32(iota, step);
    }
#endif
    for (; j < n; ++j) {
        val[c] = v[j];
        idx[c] = static_cast<int32_t>(j);
        c += (v[j] >= tau) & (v[j] > NEG_INF);
    }
    return c;
}

// The K largest of v[0, n) (K < number of finite entries), their indices ascending into out; work holds 3n floats.
// Returns whether the K-th largest value is tied with an entry left out (which of them is kept is then a convention),
// or the row holds NaN scores; out is then incomplete and the caller re-ranks the row.
bool select_row(const float* v, int64_t n, int64_t K, float* work, int32_t* cand, int64_t* out) {
    // exact lower bound tau: with G = 2K strided groups, K group maxima are >= the K-th largest group maximum, so the
    // row's K-th largest entry is >= tau and every selected entry passes the filter
    float tau = NEG_INF;
    const int64_t G = 2 * K, m = n / G;
    float* val = work;
    float* scratch = work + n;
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

// The selected key rows of one query row (in `base`, rows ld apart), in slot order, empty slots skipped; returns how
// many. Used for the key table and, in the backward, for its gradient.
template <typename T>
inline int64_t selected(const int64_t* ir, int64_t K, T* base, int64_t ld, T** rows) {
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k)
        if (ir[k] >= 0) rows[n++] = base + ir[k] * ld;
    return n;
}

// out[h * ld + k] = x[h] . rows[k] for H vectors x (D apart) and n rows: four heads by four rows at a time (`dots4x4`;
// a short last group repeats a row), leftover heads two rows at a time
inline void all_dots(const float* x, int H, int D, const float* const* rows, int64_t n, float* out, int64_t ld) {
    const int nv = D / 16;
    int h = 0;
    for (; h + 4 <= H; h += 4)  // four heads by four rows, summed by one transpose-reduction
        for (int64_t k = 0; k < n; k += 4) {
            const float* r4[4];
            for (int j = 0; j < 4; ++j) r4[j] = rows[std::min(k + j, n - 1)];  // a short last group repeats a row
            float d[16];
            dots4x4(x + h * D, r4, D, nv, d);
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4 && k + j < n; ++j) out[(h + i) * ld + k + j] = d[4 * i + j];
        }
    for (; h < H; ++h)
        for (int64_t k = 0; k < n; k += 2)
            dots<1>(x + h * D, rows[k], rows[std::min(k + 1, n - 1)], D, nv, out + h * ld + k, ld);
}

// out[h] = sum_k w[h * ld + k] * rows[k][0, Dv) for all H heads
inline void all_weighted_rows(const float* const* rows, int64_t n, const float* w, int64_t ld, int H, int Dv,
                              float* out) {
    int h = 0;
    for (; h + HG <= H; h += HG) weighted_rows<HG>(rows, n, w + h * ld, ld, Dv, out + h * Dv);
    for (; h < H; ++h) weighted_rows<1>(rows, n, w + h * ld, ld, Dv, out + h * Dv);
}

// grows[k][0, D) += sum_h a[h * lda + k] * x[h] and grows[k][0, Dv) += sum_h b[h * ldb + k] * y[h], for the n rows:
// x [H, D] and y [H, Dv] held in registers 16 channels and NH heads at a time, each row read and written once per
// 16 channels and head group
template <int NH>
inline void add_outer_heads(float* const* grows, int64_t n, const float* a, int64_t lda, const float* b, int64_t ldb,
                            const float* x, const float* y, int D, int Dv) {
    int c = 0;
    for (; c + 16 <= D; c += 16) {
        v16 xv[NH], yv[NH];
        const bool with_y = c + 16 <= Dv;
        for (int h = 0; h < NH; ++h) {
            xv[h] = load(x + h * D + c);
            yv[h] = with_y ? load(y + h * Dv + c) : v16{};
        }
        for (int64_t k = 0; k < n; ++k) {
            v16 g = load(grows[k] + c);
            for (int h = 0; h < NH; ++h) g += a[h * lda + k] * xv[h] + b[h * ldb + k] * yv[h];
            __builtin_memcpy(grows[k] + c, &g, sizeof g);
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
    int h = 0;
    for (; h + HG <= H; h += HG)
        add_outer_heads<HG>(grows, n, a + h * lda, lda, b + h * ldb, ldb, x + h * D, y + h * Dv, D, Dv);
    for (; h < H; ++h) add_outer_heads<1>(grows, n, a + h * lda, lda, b + h * ldb, ldb, x + h * D, y + h * Dv, D, Dv);
}

}  // namespace

extern "C" {

// Rows r0..r1-1 of each of B sequences. Per sequence: q [R, H, D], w [R, H] (the score scale folded in), the keys as
// tiles [ceil(k1 / 64), D, 64] (zero-padded, kt_bstride floats apart), mask [R, mask_ld] uint8 for keys k0..k1-1 (null:
// every key < k1 is seen; mask_bstride 0 shares one mask), idx [R, ldo] int64 receives K = min(topk, k1) indices per row
// (ascending) then -1. A row whose K-th largest score ties with a key left out holds the keys torch.topk would pick
// (`rank_like_torch`); returns the number of such rows.
int64_t dsa_select(const float* q, const float* w, const float* kt, int64_t kt_bstride, int B, int64_t R, int H,
                   int D, int64_t k0, int64_t k1, const uint8_t* mask, int64_t mask_bstride, int64_t mask_ld,
                   int64_t K, int64_t* idx, int64_t ldo, int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>((k1 + TILE - 1) / TILE * TILE)), work(3 * static_cast<size_t>(k1));
    std::vector<int32_t> cand(static_cast<size_t>(k1));
    int64_t n_tied = 0;
    for (int b = 0; b < B; ++b) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t row = b * R + r;
            const uint8_t* mr = mask ? mask + b * mask_bstride + r * mask_ld : nullptr;
            int64_t visible;
            const int64_t end = masked_scores(q + row * H * D, w + row * H, kt + b * kt_bstride, H, D, k0, k1, mr,
                                              buf.data(), &visible);
            int64_t* out = idx + row * ldo;
            if (visible <= K) {
                int64_t o = 0;
                for (int64_t j = 0; j < end; ++j)
                    if (buf[j] != NEG_INF) out[o++] = j;  // NaN counts as visible, as in torch.topk
                std::fill(out + o, out + ldo, -1);
            } else {
                if (select_row(buf.data(), end, K, work.data(), cand.data(), out)) {
                    // re-rank the whole row (hidden tail included, as torch.topk sees it)
                    std::fill(buf.begin() + end, buf.begin() + k1, NEG_INF);
                    rank_like_torch(buf.data(), k1, K, out);
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
    const int64_t Kp = (K + 15) / 16 * 16;  // logits rows padded to whole vectors
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
    const int64_t Kp = (K + 15) / 16 * 16;
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

}  // extern "C"
