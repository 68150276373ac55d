// Fused lightning-indexer scoring and top-k selection for CPU: one query row at a time, the row's scores live in a
// small buffer (never an [S, Hi, T] block), and the K largest are found by an exact threshold filter plus a
// selection on the few candidates. Built on first use by dsalite/kernels/__init__.py; plain C ABI for ctypes.
//
// score[j] = sum_h w[h] * max(q[h] . k[j], 0) over keys j < end (end = the row's last visible key + 1);
// keys k0..k1-1 are further masked by mask[r, j - k0] (0 = hidden). The output row holds the K selected key indices
// in ascending order (ties at the boundary go to the lower index), then -1 where fewer than K keys are visible.
#include <algorithm>
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

inline v16 load(const float* p) {
    v16 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

// add sum_h w[h] * max(q[h] . k[j], 0) over the NH heads starting at q, w to s (keys j0..j0+63)
template <int NH>
inline void heads(const float* q, const float* w, const float* tile, int D, v16 (&s)[4]) {
    v16 a[NH][4] = {};
    for (int d = 0; d < D; ++d) {
        const float* kr = tile + d * TILE;
        const v16 k0 = load(kr), k1 = load(kr + 16), k2 = load(kr + 32), k3 = load(kr + 48);
        for (int h = 0; h < NH; ++h) {
            const float qv = q[h * D + d];
            a[h][0] += qv * k0;
            a[h][1] += qv * k1;
            a[h][2] += qv * k2;
            a[h][3] += qv * k3;
        }
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
// Returns whether the K-th largest value is tied with an entry left out (which of them is kept is then a convention).
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

}  // namespace

extern "C" {

// Rows r0..r1-1 of each of B sequences. Per sequence: q [R, H, D], w [R, H] (the score scale folded in), the keys as
// tiles [ceil(k1 / 64), D, 64] (zero-padded, kt_bstride floats apart), mask [R, mask_ld] uint8 for keys k0..k1-1 (null:
// every key < k1 is seen; mask_bstride 0 shares one mask), idx [R, ldo] int64 receives K = min(topk, k1) indices per row
// then -1, tied [R] = 1 where the K-th largest score ties with a key left out. Returns the number of tied rows.
int64_t dsa_select(const float* q, const float* w, const float* kt, int64_t kt_bstride, int B, int64_t R, int H,
                   int D, int64_t k0, int64_t k1, const uint8_t* mask, int64_t mask_bstride, int64_t mask_ld,
                   int64_t K, int64_t* idx, int64_t ldo, uint8_t* tied, int64_t r0, int64_t r1) {
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
                    if (buf[j] > NEG_INF) out[o++] = j;
                std::fill(out + o, out + ldo, -1);
                tied[row] = 0;
            } else {
                tied[row] = select_row(buf.data(), end, K, work.data(), cand.data(), out);
                std::fill(out + K, out + ldo, -1);
            }
            n_tied += tied[row];
        }
    }
    return n_tied;
}

// One row's scores over keys [0, k1), -inf where hidden (arguments as for dsa_select, for a single row).
void dsa_score_row(const float* q, const float* w, const float* kt, int H, int D, int64_t k0, int64_t k1,
                   const uint8_t* mr, float* sc) {
    std::vector<float> buf(static_cast<size_t>((k1 + TILE - 1) / TILE * TILE));
    int64_t visible;
    const int64_t end = masked_scores(q, w, kt, H, D, k0, k1, mr, buf.data(), &visible);
    std::copy(buf.begin(), buf.begin() + end, sc);
    std::fill(sc + end, sc + k1, NEG_INF);
}

}  // extern "C"
