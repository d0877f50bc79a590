// SilverTorch fused CPU IVF scan: probed clusters -> per-query top-k, in one pass.
//
// Contract (see silvertorch/index/scan_cpu_ext.py for the Python side):
//   vectors (S, d) int8 | f32 | bf16 | f16, scales (S,) f32, cluster_offsets (C+1,) int64 (multiples
//   of 64), live_words (S/64,) int64, q (B, d) int8 (int8 storage) or f32 (float storage),
//   qscale (B,) f32, probes (B, P) int64 (-1 = no probe), pair_words (B, P, Wc) int64 or empty,
//   k (B,) int64 >= 1, kmax = max(k).
//   -> scores (B, kmax) f32 sorted descending, slots (B, kmax) int64, padded with -inf / -1.
//
// Score of slot s for query b: float((double(acc) * double(qscale[b])) * double(scales[s])), the
// order of operations of scan_reference (acc = exact int32 dot for int8, f32 dot for float storage),
// so int8 scores are bitwise equal to the reference.
//
// Work (cluster-major): every valid (query, probe) pair is grouped by cluster, so each probed
// cluster is read from memory once for all the queries that probe it and scored tile by tile
// (L1-sized groups of 64-slot words) against each of them. Phase 0 scans every query's nearest
// cluster (probe rank 0) to set good thresholds early, phase 1 the remaining ranks. Units (one
// cluster of one phase) are pulled dynamically from an atomic counter by num_threads workers: torch's
// OpenMP pool via at::parallel_for when built with -fopenmp (the extension's libgomp.so.1 resolves to
// the copy torch already loaded, so torch.set_num_threads applies and no second pool spins),
// std::threads otherwise. A query's top-k is guarded by a spin lock (contention is rare).
// Within a pair, 64-slot words whose (live & eligible) bits are all zero are skipped at once; the
// remaining 16-slot blocks are scored together (AVX-512 VNNI for int8, AVX-512F FMA for f32 / bf16 /
// fp16 widened in registers; portable loops when the compiler targets neither) and compared with
// the query's running threshold by one vector compare.
//
// Top-k: per query a buffer of 64-bit keys (~order(score) << 32 | slot: ascending key = descending
// score, then ascending slot), capacity 2k+64, compacted with nth_element to the best k whenever it
// fills; the k-th best key is the threshold. Keys are unique, so the result is deterministic
// (independent of thread count and order) with ties broken by the smaller slot. O(candidates) for
// any k plus one final sort of k keys, so there is no separate large-k selection; only when the
// per-query buffers of the whole batch would exceed `arena_budget` bytes (default 512 MB; huge B * k) does the kernel switch to
// query-major order with one buffer per worker (queries ordered by nearest cluster for locality).
// Slots are held as uint32 (S < 2**32 per index shard).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <limits>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define ST_AVX512 1
#if defined(__AVX512VNNI__)
#define ST_VNNI 1
#endif
#endif

namespace {

// Candidate key: ascending key = descending score, then ascending slot. Keys of one query are unique
// (slots are), so "the k smallest keys" is a deterministic top-k whatever the processing order.
inline uint32_t ord_bits(float s) {
  uint32_t u;
  std::memcpy(&u, &s, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // order-preserving float -> uint32
}
inline uint64_t make_key(float s, uint32_t slot) { return ((uint64_t)(~ord_bits(s)) << 32) | slot; }
inline float key_score(uint64_t key) {
  uint32_t o = ~(uint32_t)(key >> 32);
  uint32_t u = (o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// Running top-k of one query: a key buffer compacted (nth_element) to the best k when `cap` is
// reached; the k-th best key so far is the threshold a new candidate must beat.
struct TopK {
  uint64_t* keys = nullptr;  // cap + 16 entries
  int64_t k = 1, n = 0, cap = 0;
  float thr_s = -std::numeric_limits<float>::infinity();  // score of thr_key (prefilter, >=)
  uint64_t thr_key = UINT64_MAX;

  static int64_t capacity(int64_t k, int64_t max_cands) {
    return std::max<int64_t>(std::min<int64_t>(2 * k + 64, max_cands + 1), k + 1);
  }
  void reset(uint64_t* buf, int64_t k_, int64_t cap_) {
    keys = buf;
    k = k_;
    cap = cap_;
    n = 0;
    thr_s = -std::numeric_limits<float>::infinity();
    thr_key = UINT64_MAX;
  }
  void compact() {
    std::nth_element(keys, keys + (k - 1), keys + n);
    n = k;
    thr_key = keys[k - 1];
    thr_s = key_score(thr_key);
  }
  inline void push(uint64_t key) {
    if (key >= thr_key) return;
    keys[n] = key;
    if (++n >= cap) compact();
  }
  // Best min(k, n) sorted, written to out rows padded to kmax.
  void finish(float* os, int64_t* oi, int64_t kmax) {
    if (n > k) compact();
    std::sort(keys, keys + n);
    for (int64_t i = 0; i < n; ++i) {
      os[i] = key_score(keys[i]);
      oi[i] = (int64_t)(uint32_t)keys[i];
    }
    for (int64_t i = n; i < kmax; ++i) {
      os[i] = -std::numeric_limits<float>::infinity();
      oi[i] = -1;
    }
  }
};

enum class Kind { I8, F32, BF16, F16 };

struct Ctx {
  const void* vec;
  const float* scales;
  const int64_t* off;
  const int64_t* live;
  const void* q;  // int8 (B, d) or f32 (B, d)
  const float* qscale;
  const int64_t* probes;
  const int64_t* pw;  // (B, P, Wc) or nullptr
  const int64_t* k;
  float* out_s;
  int64_t* out_i;
  int64_t B, P, Wc, C, d, kmax;
};

// ------------------------------------------------------------------ per-query prepared query
struct QView {
  const int8_t* q8;  // nch * 64 bytes, zero padded (int8 storage)
  const float* qf;   // nch * 16 floats, zero padded (float storage)
  int32_t corr;      // 128 * sum(q) (VNNI offset trick)
  int nch;
};

#ifdef ST_AVX512
// Sum each of 16 vectors: lane i of the result = horizontal sum of a[i].
template <bool FLOAT>
inline __m512i reduce16(__m512i* a) {
  auto add = [](__m512i x, __m512i y) {
    if constexpr (FLOAT)
      return _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(y)));
    else
      return _mm512_add_epi32(x, y);
  };
  __m512i s[8];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0 a1 a0 a1] partials
    s[j] = add(_mm512_unpacklo_epi32(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_epi32(a[2 * j], a[2 * j + 1]));
  __m512i u[4];
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: [a0 a1 a2 a3] partials
    u[j] = add(_mm512_unpacklo_epi64(s[2 * j], s[2 * j + 1]), _mm512_unpackhi_epi64(s[2 * j], s[2 * j + 1]));
  __m512i x01 = add(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
  __m512i x23 = add(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
  return add(_mm512_shuffle_i32x4(x01, x23, 0x88), _mm512_shuffle_i32x4(x01, x23, 0xDD));
}
#endif

// 16 consecutive rows starting at `rows` -> 16 accumulations (int32 for int8, f32 otherwise).
template <Kind K, int NCH>
struct Dot16;

template <int NCH>
struct Dot16<Kind::I8, NCH> {
  static inline void run(const int8_t* rows, int64_t d, const QView& qp, int32_t* acc) {
#if defined(ST_AVX512) && defined(ST_VNNI)
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i a[16];
    if constexpr (NCH > 0) {  // d == 64 * NCH: compile-time stride, query chunks in registers
      constexpr int64_t D = 64 * NCH;
      __m512i qv[NCH];
      for (int c = 0; c < NCH; ++c) qv[c] = _mm512_loadu_si512((const void*)(qp.q8 + 64 * c));
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        __m512i s = _mm512_setzero_si512();
        for (int c = 0; c < NCH; ++c)
          s = _mm512_dpbusd_epi32(s, _mm512_xor_si512(_mm512_loadu_si512(rows + i * D + 64 * c), flip), qv[c]);
        a[i] = s;
      }
      _mm512_storeu_si512(acc, _mm512_sub_epi32(reduce16<false>(a), _mm512_set1_epi32(qp.corr)));
      return;
    }
    const int nch = qp.nch;
    const int tail = (int)(d - 64 * (nch - 1));
    const __mmask64 tm = tail >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << tail) - 1);
    for (int i = 0; i < 16; ++i) {
      const int8_t* r = rows + i * d;
      __m512i s = _mm512_setzero_si512();
      for (int c = 0; c < nch; ++c) {
        __m512i qv = _mm512_loadu_si512((const void*)(qp.q8 + 64 * c));
        __m512i x = (c == nch - 1) ? _mm512_maskz_loadu_epi8(tm, r + 64 * c) : _mm512_loadu_si512(r + 64 * c);
        s = _mm512_dpbusd_epi32(s, _mm512_xor_si512(x, flip), qv);  // (x + 128) * q
      }
      a[i] = s;
    }
    __m512i t = _mm512_sub_epi32(reduce16<false>(a), _mm512_set1_epi32(qp.corr));
    _mm512_storeu_si512(acc, t);
#else
    const int8_t* q = qp.q8;
    for (int i = 0; i < 16; ++i) {
      const int8_t* r = rows + i * d;
      int32_t s = 0;
      for (int64_t j = 0; j < d; ++j) s += (int32_t)r[j] * (int32_t)q[j];
      acc[i] = s;
    }
#endif
  }
};

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

template <Kind K>
struct FloatT;
template <> struct FloatT<Kind::F32> { using T = float; };
template <> struct FloatT<Kind::BF16> { using T = c10::BFloat16; };
template <> struct FloatT<Kind::F16> { using T = c10::Half; };

#ifdef ST_AVX512
template <Kind K>
inline __m512 load16f(const void* p, __mmask16 m) {
  if constexpr (K == Kind::F32) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (K == Kind::BF16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}
#endif

template <Kind K, int NCH>
struct DotF16 {
  using T = typename FloatT<K>::T;
  static inline void run(const T* rows, int64_t d, const QView& qp, float* acc) {
#ifdef ST_AVX512
    __m512i a[16];
    if constexpr (NCH > 0) {  // d == 16 * NCH
      constexpr int64_t D = 16 * NCH;
      __m512 qv[NCH];
      for (int c = 0; c < NCH; ++c) qv[c] = _mm512_loadu_ps(qp.qf + 16 * c);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        __m512 s = _mm512_setzero_ps();
        for (int c = 0; c < NCH; ++c) s = _mm512_fmadd_ps(load16f<K>(rows + i * D + 16 * c, (__mmask16)0xFFFF), qv[c], s);
        a[i] = _mm512_castps_si512(s);
      }
      _mm512_storeu_ps(acc, _mm512_castsi512_ps(reduce16<true>(a)));
      return;
    }
    const int nch = qp.nch;
    const int tail = (int)(d - 16 * (nch - 1));
    const __mmask16 tm = tail >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << tail) - 1);
    for (int i = 0; i < 16; ++i) {
      const T* r = rows + i * d;
      __m512 s = _mm512_setzero_ps();
      for (int c = 0; c < nch; ++c) {
        __m512 qv = _mm512_loadu_ps(qp.qf + 16 * c);
        __m512 x = load16f<K>(r + 16 * c, c == nch - 1 ? tm : (__mmask16)0xFFFF);
        s = _mm512_fmadd_ps(x, qv, s);
      }
      a[i] = _mm512_castps_si512(s);
    }
    _mm512_storeu_ps(acc, _mm512_castsi512_ps(reduce16<true>(a)));
#else
    const float* q = qp.qf;
    for (int i = 0; i < 16; ++i) {
      const T* r = rows + i * d;
      float s = 0.f;
      for (int64_t j = 0; j < d; ++j) s += to_f(r[j]) * q[j];
      acc[i] = s;
    }
#endif
  }
};

// Scores of 16 slots from their accumulations; push those with bit set in `m16` that beat the
// query's threshold (a float prefilter `score >= thr_s`, then the exact key compare).
template <typename A>
inline void score_push(const A* acc, const float* sc, double qs, int64_t slot0, uint32_t m16, TopK& top) {
#ifdef ST_AVX512
  __m512d qd = _mm512_set1_pd(qs);
  __m512d lo, hi;
  if constexpr (std::is_same_v<A, int32_t>) {
    __m512i v = _mm512_loadu_si512(acc);
    lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(v));
    hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1));
  } else {
    __m512 v = _mm512_loadu_ps(acc);
    lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  __m512 s = _mm512_loadu_ps(sc);
  __m512d slo = _mm512_cvtps_pd(_mm512_castps512_ps256(s));
  __m512d shi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  __m256 flo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(lo, qd), slo));
  __m256 fhi = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(hi, qd), shi));
  __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(flo), fhi, 1);
  const __mmask16 m = (__mmask16)(m16 & (uint32_t)_mm512_cmp_ps_mask(f, _mm512_set1_ps(top.thr_s), _CMP_GE_OQ));
  if (!m) return;
  // keys (~ord(score) << 32 | slot); lanes not in m become UINT64_MAX, which never passes
  const __m512i ones = _mm512_set1_epi32(-1);
  const __m512i u = _mm512_castps_si512(f);
  const __m512i ord = _mm512_mask_xor_epi32(_mm512_or_si512(u, _mm512_set1_epi32((int32_t)0x80000000u)),
                                            _mm512_movepi32_mask(u), u, ones);
  const __m512i hi32 = _mm512_mask_mov_epi32(ones, m, _mm512_xor_si512(ord, ones));
  const __m512i ids = _mm512_mask_mov_epi32(
      ones, m, _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)slot0),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)));
  const __m512i thr = _mm512_set1_epi64((long long)top.thr_key);
  const __m512i k0 = _mm512_unpacklo_epi32(ids, hi32), k1 = _mm512_unpackhi_epi32(ids, hi32);
  const __mmask8 m0 = _mm512_cmp_epu64_mask(k0, thr, _MM_CMPINT_LT), m1 = _mm512_cmp_epu64_mask(k1, thr, _MM_CMPINT_LT);
  // register-form compress + full store (the buffer has 16 spare entries)
  _mm512_storeu_si512(top.keys + top.n, _mm512_maskz_compress_epi64(m0, k0));
  top.n += __builtin_popcount((uint32_t)m0);
  _mm512_storeu_si512(top.keys + top.n, _mm512_maskz_compress_epi64(m1, k1));
  top.n += __builtin_popcount((uint32_t)m1);
  if (top.n >= top.cap) top.compact();
#else
  for (int i = 0; i < 16; ++i) {
    if (!((m16 >> i) & 1)) continue;
    float f = (float)(((double)acc[i] * qs) * (double)sc[i]);
    if (f >= top.thr_s) top.push(make_key(f, (uint32_t)(slot0 + i)));
  }
#endif
}

template <Kind K, int NCH>
struct Scanner {
  const Ctx& c;
  const std::vector<int8_t>& q8;
  const std::vector<float>& qf;
  const std::vector<int32_t>& corr;
  int nch, qstride;

  QView view(int64_t b) const {
    QView v;
    v.q8 = K == Kind::I8 ? q8.data() + b * qstride : nullptr;
    v.qf = K == Kind::I8 ? nullptr : qf.data() + b * qstride;
    v.corr = K == Kind::I8 ? corr[b] : 0;
    v.nch = nch;
    return v;
  }

  // Words [w0, w1) of probe r of query b into `top`.
  void scan_pair(int64_t b, int64_t r, int64_t w0, int64_t w1, const QView& qv, TopK& top) const {
    const int64_t cl = c.probes[b * c.P + r];
    const int64_t o = c.off[cl];
    const int64_t* pw = c.pw ? c.pw + (b * c.P + r) * c.Wc : nullptr;
    if (pw) w1 = std::min(w1, c.Wc);
    const int64_t* lw = c.live + (o >> 6);
    const double qs = (double)c.qscale[b];
    const int64_t d = c.d;
    alignas(64) int32_t acc_i[16];
    alignas(64) float acc_f[16];
    for (int64_t w = w0; w < w1; ++w) {
      uint64_t m = (uint64_t)lw[w];
      if (pw) m &= (uint64_t)pw[w];
      if (!m) continue;  // 64 dead / ineligible slots at once
      const int64_t base = o + 64 * w;
      for (int sb = 0; sb < 4; ++sb) {
        const uint32_t m16 = (uint32_t)((m >> (16 * sb)) & 0xFFFFu);
        if (!m16) continue;
        const int64_t s0 = base + 16 * sb;
        if constexpr (K == Kind::I8) {
          Dot16<K, NCH>::run((const int8_t*)c.vec + s0 * d, d, qv, acc_i);
          score_push(acc_i, c.scales + s0, qs, s0, m16, top);
        } else {
          using T = typename FloatT<K>::T;
          DotF16<K, NCH>::run((const T*)c.vec + s0 * d, d, qv, acc_f);
          score_push(acc_f, c.scales + s0, qs, s0, m16, top);
        }
      }
    }
  }
  int64_t words(int64_t b, int64_t r) const {
    const int64_t cl = c.probes[b * c.P + r];
    return (c.off[cl + 1] - c.off[cl]) >> 6;
  }
  bool valid(int64_t b, int64_t r) const {
    const int64_t cl = c.probes[b * c.P + r];
    return cl >= 0 && cl < c.C && c.off[cl + 1] > c.off[cl];
  }
  int64_t total(int64_t b) const {
    int64_t t = 0;
    for (int64_t r = 0; r < c.P; ++r)
      if (valid(b, r)) t += words(b, r) * 64;
    return t;
  }
};

std::atomic<int> g_last_workers{0};  // workers that took part in the last parallel_dynamic (diagnostics)

// Run `work(task)` for task in [0, ntasks) on up to nthreads workers pulling from a shared counter.
template <class F>
void parallel_dynamic(int64_t ntasks, int nthreads, const F& work) {
  std::atomic<int64_t> next{0};
  std::exception_ptr err;
  std::mutex err_mu;
  std::atomic<int> workers{0};
  auto worker = [&]() {
    workers.fetch_add(1, std::memory_order_relaxed);
    try {
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= ntasks) break;
        work(i);
      }
    } catch (...) {
      std::lock_guard<std::mutex> g(err_mu);
      if (!err) err = std::current_exception();
      next.store(ntasks);
    }
  };
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, ntasks));
  if (nt == 1) {
    worker();
  } else {
#ifdef _OPENMP
    // torch's own OpenMP pool (the extension resolves libgomp.so.1 to the copy torch loaded)
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) worker();
    });
#else
    std::vector<std::thread> ts;
    for (int t = 1; t < nt; ++t) ts.emplace_back(worker);
    worker();
    for (auto& t : ts) t.join();
#endif
  }
  g_last_workers.store(workers.load());
  if (err) std::rethrow_exception(err);
}

struct SpinLock {
  std::atomic<uint8_t> f{0};
  void lock() {
    for (int spins = 0; f.exchange(1, std::memory_order_acquire); ++spins) {
      if (spins > 64) std::this_thread::yield();
    }
  }
  void unlock() { f.store(0, std::memory_order_release); }
};


template <Kind K, int NCH>
void run_all(const Ctx& c, int nthreads, int64_t arena_budget) {
  const int64_t B = c.B, P = c.P, d = c.d;
  const int width = K == Kind::I8 ? 64 : 16;
  const int nch = (int)std::max<int64_t>(1, (d + width - 1) / width);
  const int qstride = nch * width;
  std::vector<int8_t> q8;
  std::vector<float> qf;
  std::vector<int32_t> corr;
  if constexpr (K == Kind::I8) {
    q8.assign((size_t)B * qstride + 64, 0);
    corr.assign(B, 0);
    const int8_t* q = (const int8_t*)c.q;
    for (int64_t b = 0; b < B; ++b) {
      int32_t sum = 0;
      for (int64_t j = 0; j < d; ++j) {
        q8[b * qstride + j] = q[b * d + j];
        sum += q[b * d + j];
      }
      corr[b] = 128 * sum;
    }
  } else {
    qf.assign((size_t)B * qstride + 16, 0.f);
    const float* q = (const float*)c.q;
    for (int64_t b = 0; b < B; ++b) std::copy(q + b * d, q + (b + 1) * d, qf.begin() + b * qstride);
  }
  Scanner<K, NCH> sc{c, q8, qf, corr, nch, qstride};

  std::vector<int64_t> caps(B), arena_off(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    caps[b] = TopK::capacity(c.k[b], sc.total(b));
    arena_off[b + 1] = arena_off[b] + caps[b] + 16;
  }
  const bool cluster_major = arena_off[B] * 8 <= arena_budget;

  if (!cluster_major) {
    // Query-major (very large k): one top-k buffer per worker, queries by nearest probed cluster.
    std::vector<int64_t> order(B);
    std::iota(order.begin(), order.end(), 0);
    if (P > 0) std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b2) { return c.probes[a * P] < c.probes[b2 * P]; });
    const int64_t blk = 4, nblk = (B + blk - 1) / blk;
    parallel_dynamic(nblk, nthreads, [&](int64_t i) {
      thread_local std::vector<uint64_t> buf;
      TopK top;
      for (int64_t j = i * blk; j < std::min(B, (i + 1) * blk); ++j) {
        const int64_t b = order[j];
        if ((int64_t)buf.size() < caps[b] + 16) buf.resize(caps[b] + 16);
        top.reset(buf.data(), c.k[b], caps[b]);
        const QView qv = sc.view(b);
        for (int64_t r = 0; r < P; ++r)
          if (sc.valid(b, r)) sc.scan_pair(b, r, 0, sc.words(b, r), qv, top);
        top.finish(c.out_s + b * c.kmax, c.out_i + b * c.kmax, c.kmax);
      }
    });
    return;
  }

  // Cluster-major: every (query, probe) pair grouped by cluster, so a cluster is read from memory
  // once for all the queries that probe it. Phase 0 = every query's nearest cluster (rank 0), which
  // sets good thresholds; phase 1 = the other ranks. Units (one cluster of one phase) are pulled
  // dynamically; a query's top-k is guarded by a spin lock (two workers rarely hold the same query).
  std::vector<uint64_t> arena((size_t)arena_off[B]);
  std::vector<TopK> tops(B);
  for (int64_t b = 0; b < B; ++b) tops[b].reset(arena.data() + arena_off[b], c.k[b], caps[b]);
  const int64_t C = c.C;
  std::vector<int64_t> cnt(2 * C + 1, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < P; ++r)
      if (sc.valid(b, r)) ++cnt[(r > 0) * C + c.probes[b * P + r] + 1];
  for (int64_t i = 0; i < 2 * C; ++i) cnt[i + 1] += cnt[i];
  std::vector<int64_t> pairs(cnt[2 * C]);
  {
    std::vector<int64_t> pos(cnt.begin(), cnt.end() - 1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = 0; r < P; ++r)
        if (sc.valid(b, r)) pairs[pos[(r > 0) * C + c.probes[b * P + r]]++] = b * P + r;
  }
  std::vector<int64_t> units;
  for (int64_t u = 0; u < 2 * C; ++u)
    if (cnt[u + 1] > cnt[u]) units.push_back(u);
  std::unique_ptr<SpinLock[]> locks(new SpinLock[B]);
  const bool locking = nthreads > 1;
  const int64_t row_bytes = d * (K == Kind::I8 ? 1 : (K == Kind::F32 ? 4 : 2));
  const int64_t tile = std::max<int64_t>(1, 16384 / (64 * row_bytes));  // words per L1-sized tile
  parallel_dynamic((int64_t)units.size(), nthreads, [&](int64_t ui) {
    const int64_t u = units[ui];
    const int64_t p0 = cnt[u], p1 = cnt[u + 1];
    const int64_t cl = u % C;
    const int64_t nw = (c.off[cl + 1] - c.off[cl]) >> 6;
    for (int64_t w0 = 0; w0 < nw; w0 += tile) {
      const int64_t w1 = std::min(nw, w0 + tile);
      for (int64_t j = p0; j < p1; ++j) {
        const int64_t b = pairs[j] / P, r = pairs[j] % P;
        if (locking) locks[b].lock();
        sc.scan_pair(b, r, w0, w1, sc.view(b), tops[b]);
        if (locking) locks[b].unlock();
      }
    }
  });
  const int64_t blk = 16, nblk = (B + blk - 1) / blk;
  parallel_dynamic(nblk, nthreads, [&](int64_t i) {
    for (int64_t b = i * blk; b < std::min(B, (i + 1) * blk); ++b)
      tops[b].finish(c.out_s + b * c.kmax, c.out_i + b * c.kmax, c.kmax);
  });
}

template <Kind K>
void dispatch_d(const Ctx& c, int nthreads, int64_t ab) {
  // NCH > 0: d is exactly NCH chunks (64 int8 or 16 floats each); 0: any d, masked tails
  if (c.d == 64) return run_all<K, K == Kind::I8 ? 1 : 4>(c, nthreads, ab);
  if (c.d == 128) return run_all<K, K == Kind::I8 ? 2 : 8>(c, nthreads, ab);
  if (K != Kind::I8 && c.d == 32) return run_all<K, 2>(c, nthreads, ab);
  return run_all<K, 0>(c, nthreads, ab);
}

}  // namespace

std::vector<torch::Tensor> ivf_scan_topk(torch::Tensor vectors, torch::Tensor scales, torch::Tensor cluster_offsets,
                                         torch::Tensor live_words, torch::Tensor q, torch::Tensor qscale,
                                         torch::Tensor probes, torch::Tensor pair_words, torch::Tensor k,
                                         int64_t num_threads, int64_t arena_budget) {
  TORCH_CHECK(vectors.dim() == 2 && vectors.is_contiguous() && vectors.device().is_cpu(),
              "vectors must be a contiguous (S, d) CPU tensor");
  const int64_t S = vectors.size(0), d = vectors.size(1);
  const int64_t B = q.size(0);
  TORCH_CHECK(d >= 1, "d must be >= 1");
  TORCH_CHECK(S % 64 == 0, "number of slots must be a multiple of 64, got ", S);
  TORCH_CHECK(S <= (int64_t)UINT32_MAX, "at most 2**32 - 1 slots per index shard, got ", S);
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.numel() == S && scales.is_contiguous(),
              "scales must be (S,) f32");
  TORCH_CHECK(cluster_offsets.dtype() == torch::kInt64 && cluster_offsets.dim() == 1 && cluster_offsets.is_contiguous(),
              "cluster_offsets must be (C+1,) int64");
  TORCH_CHECK(live_words.dtype() == torch::kInt64 && live_words.numel() == S / 64 && live_words.is_contiguous(),
              "live_words must be (S/64,) int64");
  TORCH_CHECK(q.dim() == 2 && q.size(1) == d && q.is_contiguous(), "q must be contiguous (B, d)");
  TORCH_CHECK(qscale.dtype() == torch::kFloat32 && qscale.numel() == B && qscale.is_contiguous(), "qscale must be (B,) f32");
  TORCH_CHECK(probes.dtype() == torch::kInt64 && probes.dim() == 2 && probes.size(0) == B && probes.is_contiguous(),
              "probes must be (B, P) int64");
  TORCH_CHECK(k.dtype() == torch::kInt64 && k.numel() == B && k.is_contiguous(), "k must be (B,) int64");
  const int64_t C = cluster_offsets.numel() - 1;
  const int64_t P = probes.size(1);
  const int64_t* off = cluster_offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i <= C; ++i)
    TORCH_CHECK(off[i] % 64 == 0 && off[i] >= 0 && off[i] <= S && (i == 0 || off[i] >= off[i - 1]),
                "cluster_offsets must be non-decreasing multiples of 64 within [0, S]");
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t kmax = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(kp[b] >= 1, "every k must be >= 1");
    kmax = std::max(kmax, kp[b]);
  }
  bool has_pw = pair_words.numel() > 0;
  int64_t Wc = 0;
  if (has_pw) {
    TORCH_CHECK(pair_words.dtype() == torch::kInt64 && pair_words.dim() == 3 && pair_words.size(0) == B &&
                    pair_words.size(1) == P && pair_words.is_contiguous(),
                "pair_words must be contiguous (B, P, Wc) int64");
    Wc = pair_words.size(2);
  }
  Kind kind;
  if (vectors.dtype() == torch::kInt8) {
    kind = Kind::I8;
    TORCH_CHECK(q.dtype() == torch::kInt8, "int8 storage needs int8 queries");
  } else {
    TORCH_CHECK(q.dtype() == torch::kFloat32, "float storage needs f32 queries");
    if (vectors.dtype() == torch::kFloat32) kind = Kind::F32;
    else if (vectors.dtype() == torch::kBFloat16) kind = Kind::BF16;
    else if (vectors.dtype() == torch::kFloat16) kind = Kind::F16;
    else TORCH_CHECK(false, "unsupported storage dtype ", vectors.dtype());
  }
  auto out_s = torch::empty({B, kmax}, torch::kFloat32);
  auto out_i = torch::empty({B, kmax}, torch::kInt64);
  if (B == 0) return {out_s, out_i};

  Ctx c;
  c.vec = vectors.data_ptr();
  c.scales = scales.data_ptr<float>();
  c.off = off;
  c.live = live_words.data_ptr<int64_t>();
  c.q = q.data_ptr();
  c.qscale = qscale.data_ptr<float>();
  c.probes = probes.data_ptr<int64_t>();
  c.pw = has_pw ? pair_words.data_ptr<int64_t>() : nullptr;
  c.k = kp;
  c.out_s = out_s.data_ptr<float>();
  c.out_i = out_i.data_ptr<int64_t>();
  c.B = B;
  c.P = P;
  c.Wc = Wc;
  c.C = C;
  c.d = d;
  c.kmax = kmax;

  const int nthreads = (int)std::max<int64_t>(1, num_threads);
  switch (kind) {
    case Kind::I8: dispatch_d<Kind::I8>(c, nthreads, arena_budget); break;
    case Kind::F32: dispatch_d<Kind::F32>(c, nthreads, arena_budget); break;
    case Kind::BF16: dispatch_d<Kind::BF16>(c, nthreads, arena_budget); break;
    case Kind::F16: dispatch_d<Kind::F16>(c, nthreads, arena_budget); break;
  }
  return {out_s, out_i};
}

std::string simd_level() {
#if defined(ST_VNNI)
  return "avx512-vnni";
#elif defined(ST_AVX512)
  return "avx512 (int8 portable)";
#else
  return "portable";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ivf_scan_topk", &ivf_scan_topk, "Fused IVF scan + per-query top-k (CPU)",
        py::call_guard<py::gil_scoped_release>());  // plain C++ on raw buffers: other Python threads run
  m.def("simd_level", &simd_level, "Which SIMD path was compiled");
  m.def("last_workers", []() { return g_last_workers.load(); }, "Workers used by the last parallel step");
}
