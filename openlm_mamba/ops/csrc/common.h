// Shared helpers of the C++ CPU kernels: dynamic parallel loop, vectorisable float math.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define OLM_AVX512 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define OLM_INLINE inline __attribute__((always_inline))
#else
#define OLM_INLINE inline
#endif

namespace olm {

// Run fn(task, task + 1) for every task in [0, n) on torch's threads, handing tasks out one at a
// time: a thread the OS deschedules (busy shared machine) then holds up one task, not half the work.
template <typename F>
void parallel_dynamic(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t, t + 1);
  });
}

// A per-thread scratch buffer of n elements, 64-byte aligned (whole-vector loads never split a cache line).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : buf_(n + 64 / sizeof(T)) {}
  T* data() {
    const auto p = reinterpret_cast<std::uintptr_t>(buf_.data());
    return reinterpret_cast<T*>((p + 63) & ~std::uintptr_t(63));
  }

 private:
  std::vector<T> buf_;
};

// Ask for the cache lines of n elements at p (for writing when `write`).
template <typename T>
OLM_INLINE void prefetch(const T* p, int64_t n, bool write = false) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < int64_t(n * sizeof(T)); i += 64) {
    if (write)
      __builtin_prefetch(c + i, 1);
    else
      __builtin_prefetch(c + i, 0);
  }
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// Copy a row of V lanes (only the first wn are real) into a vector buffer, zeros past wn (all
// zeros for a null src: an absent optional input), and back.
template <int64_t V, typename T>
OLM_INLINE void load_lanes(const T* __restrict__ src, int64_t wn, T* __restrict__ dst) {
  if (src == nullptr) {
    for (int64_t w = 0; w < V; ++w) dst[w] = T(0);
  } else if (wn == V) {
#pragma omp simd
    for (int64_t w = 0; w < V; ++w) dst[w] = src[w];
  } else {
    for (int64_t w = 0; w < V; ++w) dst[w] = w < wn ? src[w] : T(0);
  }
}

template <int64_t V, typename T>
OLM_INLINE void store_lanes(const T* __restrict__ src, int64_t wn, T* __restrict__ dst) {
  if (wn == V) {
#pragma omp simd
    for (int64_t w = 0; w < V; ++w) dst[w] = src[w];
  } else {
    for (int64_t w = 0; w < wn; ++w) dst[w] = src[w];
  }
}

// exp that the compiler vectorises inside `omp simd` loops (glibc has no vector expf, so std::exp
// on float would be one scalar call per lane): Cody-Waite reduction and the Cephes polynomial,
// within 2 ulp on [-87, 88]. Past that range it gives what std::exp rounds to: inf above 88.72, 0
// below -87 (denormals flushed), via the clamped argument's result within 2x in between; NaN
// propagates. float64 uses std::exp, which libmvec does vectorise.
OLM_INLINE float vexp(float x0) {
  const float x = x0 < -87.0f ? -87.0f : (x0 > 88.0f ? 88.0f : x0);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(k, -0.693359375f, x);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  const float e = p * __builtin_bit_cast(float, bits);
  return x0 > 88.7228391f ? std::numeric_limits<float>::infinity() : (x0 < -87.0f ? 0.0f : e);
}
OLM_INLINE double vexp(double x) { return std::exp(x); }

// softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|); log1p(s) for s in (0, 1] as
// 2 atanh(s / (2 + s)) by its series (|error| < 2e-7).
OLM_INLINE float vsoftplus(float v) {
  const float s = vexp(-std::fabs(v));
  const float r = s / (2.0f + s), r2 = r * r;
  float p = 1.0f / 13;
  p = std::fma(p, r2, 1.0f / 11);
  p = std::fma(p, r2, 1.0f / 9);
  p = std::fma(p, r2, 1.0f / 7);
  p = std::fma(p, r2, 1.0f / 5);
  p = std::fma(p, r2, 1.0f / 3);
  p = std::fma(p, r2, 1.0f);
  return (v > 0.0f ? v : 0.0f) + 2.0f * r * p;
}
OLM_INLINE double vsoftplus(double v) { return v > 20.0 ? v : std::log1p(std::exp(v)); }

template <typename T>
OLM_INLINE T vsigmoid(T v) {
  return T(1) / (T(1) + vexp(-v));
}

// |dt A| from which the scan's AVX-512 steps take vexp2_wide: well below the ~6e26 where vexp2 goes wrong.
constexpr float kWideExp = 1e25f;

#ifdef OLM_AVX512
// log2(e) in float: exp(x) = 2^(x * kLog2e).
constexpr float kLog2e = 1.44269502162933349609375f;

// 2^(a b) for 16 floats with AVX-512: m = a b + 1.5 * 2^18 rounds a b to the nearest multiple k of
// 1/32, whose 32 k sits in m's low mantissa bits (no round or convert instruction); f = a b - k
// exactly (one fma), then 2^floor(k) (scalef, which floors its exponent itself) * T[32 k mod 32] (a
// 32-entry table of 2^(i/32), one permute indexed by m's low bits) * 2^f (a quadratic, |f| <= 1/64).
// Relative error < 4e-7 for finite results (e^x with b = kLog2e and |x| <= 88; an a b prepared
// elsewhere adds its own rounding). |a b| >= 2^17 leaves k inexact, but 2^k then over- or underflows
// anyway, so results stay right up to |a b| ~ 6e26 (|x| ~ 4e26 for e^x): inf above, 0 below. Beyond
// that, and for an infinite a b, f overflows the quadratic and the result is wrong (inf or NaN, whatever
// the sign): callers that can see such arguments use vexp2_wide (the scan, for the steps where
// max |dt| x max |A| reaches kWideExp) or clamp first (vexp16).
OLM_INLINE __m512 vexp2(__m512 a, __m512 b) {
  const __m512 t0 = _mm512_setr_ps(1.0f, 1.02189715f, 1.04427378f, 1.0671404f, 1.09050773f, 1.11438674f, 1.13878863f,
                                   1.16372486f, 1.18920712f, 1.21524736f, 1.24185781f, 1.26905096f, 1.29683955f,
                                   1.32523664f, 1.35425555f, 1.38390988f);
  const __m512 t1 = _mm512_setr_ps(1.41421356f, 1.44518081f, 1.47682615f, 1.50916443f, 1.54221083f, 1.57598085f,
                                   1.61049033f, 1.64575548f, 1.68179283f, 1.7186193f, 1.75625216f, 1.79470908f,
                                   1.83400809f, 1.87416763f, 1.91520656f, 1.95714412f);
  const __m512 magic = _mm512_set1_ps(393216.0f);  // 1.5 * 2^18: ulp 1/32, 32 k's bits in the low mantissa
  const __m512 m = _mm512_fmadd_ps(a, b, magic);
  const __m512 k = _mm512_sub_ps(m, magic);
  const __m512 f = _mm512_fmsub_ps(a, b, k);
  const __m512 tv = _mm512_permutex2var_ps(t0, _mm512_castps_si512(m), t1);  // uses index bits 0-4 only
  // 2^f ~ 1 + f (ln 2 + f (ln 2)^2 / 2): the coefficients in float
  const __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.24022650718688965f), f, _mm512_set1_ps(0.69314718246459961f));
  const __m512 p = _mm512_fmadd_ps(q, _mm512_mul_ps(f, tv), tv);
  return _mm512_scalef_ps(p, k);  // scalef: * 2^floor(k)
}

// vexp2 for any a b: where |a b| > 2^17, where vexp2 may go wrong, 2^(a b) is 0 or inf and is set so (NaN
// stays NaN). Costs 5 more instructions: the scan uses it only for the steps that need it (kWideExp).
OLM_INLINE __m512 vexp2_wide(__m512 a, __m512 b) {
  const __m512 ab = _mm512_mul_ps(a, b);
  const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(ab), _mm512_set1_ps(131072.0f), _CMP_GT_OQ);
  const __mmask16 neg = _mm512_cmp_ps_mask(ab, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 limit = _mm512_mask_blend_ps(neg, _mm512_set1_ps(INFINITY), _mm512_setzero_ps());
  return _mm512_mask_blend_ps(big, vexp2(a, b), limit);
}

// e^x for 16 floats, x clamped to [-87, 88] (so e^-inf = 1.6e-38, not NaN). The constant goes first
// in min / max, which return their second operand when either is NaN: a NaN x stays NaN.
OLM_INLINE __m512 vexp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  return vexp2(x, _mm512_set1_ps(kLog2e));
}

// 1 / d for AVX-512: the 14-bit estimate and one Newton step (relative error ~1e-8; vdivps is slow).
OLM_INLINE __m512 vrcp16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}
#endif

// Elementwise functions over V lanes (V a multiple of 16), with AVX-512 versions for float.
template <int64_t V, typename T>
OLM_INLINE void sigmoid_lanes(const T* __restrict__ in, T* __restrict__ out) {
#pragma omp simd
  for (int64_t w = 0; w < V; ++w) out[w] = vsigmoid(in[w]);
}

template <int64_t V, typename T>
OLM_INLINE void softplus_lanes(const T* __restrict__ in, T* __restrict__ out) {
#pragma omp simd
  for (int64_t w = 0; w < V; ++w) out[w] = vsoftplus(in[w]);
}

#ifdef OLM_AVX512
OLM_INLINE __m512 vsigmoid16(__m512 v) {
  return vrcp16(_mm512_add_ps(vexp16(_mm512_sub_ps(_mm512_setzero_ps(), v)), _mm512_set1_ps(1.0f)));
}

template <>
OLM_INLINE void sigmoid_lanes<16, float>(const float* __restrict__ in, float* __restrict__ out) {
  _mm512_storeu_ps(out, vsigmoid16(_mm512_loadu_ps(in)));
}

template <>
OLM_INLINE void softplus_lanes<16, float>(const float* __restrict__ in, float* __restrict__ out) {
  const __m512 v = _mm512_loadu_ps(in);
  const __m512 s = vexp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));  // e^-|v| in (0, 1]
  const __m512 r = _mm512_mul_ps(s, vrcp16(_mm512_add_ps(s, _mm512_set1_ps(2.0f))));
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 p = _mm512_set1_ps(1.0f / 13);
  p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.0f / 11));
  p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.0f / 9));
  p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.0f / 7));
  p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.0f / 5));
  p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.0f / 3));
  p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.0f));
  const __m512 lg = _mm512_mul_ps(_mm512_add_ps(r, r), p);  // log1p(s)
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_max_ps(_mm512_setzero_ps(), v), lg));
}
#endif

// 1 / sqrt(mean of squares + eps) from a row's sum of squares.
template <typename T>
OLM_INLINE T inv_rms(double sumsq, int64_t H, double eps) {
  return T(1.0 / std::sqrt(sumsq / double(H) + eps));
}

// Residual add + RMSNorm of one row of H: r = x (+ res), stored to rout when given (res may alias
// rout: an in-place residual stream), out = r * rsqrt(mean(r^2) + eps) * w (+ b); the sum of
// squares in double. Without rout, res must be null and r is x itself.
template <typename T>
OLM_INLINE void add_rms_row(const T* x, const T* res, T* rout, const T* __restrict__ w, const T* __restrict__ b,
                            double eps, int64_t H, T* __restrict__ out) {
  double ss = 0;
  const T* src = x;
  if (rout) {
    if (res) {
#pragma omp simd reduction(+ : ss)
      for (int64_t h = 0; h < H; ++h) {
        const T v = x[h] + res[h];
        rout[h] = v;
        ss += double(v) * double(v);
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t h = 0; h < H; ++h) {
        rout[h] = x[h];
        ss += double(x[h]) * double(x[h]);
      }
    }
    src = rout;
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t h = 0; h < H; ++h) ss += double(x[h]) * double(x[h]);
  }
  const T rstd = inv_rms<T>(ss, H, eps);
  if (b) {
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) out[h] = src[h] * rstd * w[h] + b[h];
  } else {
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) out[h] = src[h] * rstd * w[h];
  }
}

// Forward kernels for callers in other translation units (the fused prefill), writing into
// caller-provided contiguous outputs; the layouts of conv_fwd / scan_fwd. The scan here keeps no
// chunk states (inference).
void conv_fwd_into(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& init, bool silu, at::Tensor& out);
void scan_fwd_into(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt,
                   const at::Tensor& Ct, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                   const std::optional<at::Tensor>& bias, bool softplus, const std::optional<at::Tensor>& x0,
                   at::Tensor& out, at::Tensor& last);

}  // namespace olm
