// Selective scan on CPU: a loop over time, vectorised over blocks of W channels, parallel over
// (batch, channel block).
//
// Compiled on first use by openlm_mamba/ops/cpp.py (torch.utils.cpp_extension), registered as
// torch ops `openlm_mamba_cpu::scan_fwd` / `scan_bwd`. Layouts (one dtype: float32 or float64),
// time-major so that W neighbouring channels are one vector:
//   u, delta, z      (batch, L, dim)      any batch / time strides, unit channel stride (the
//                                         model passes views of its projections, not copies);
//                                         delta raw: bias and softplus are applied here
//   At               (N, dim)             A transposed, contiguous
//   Bt, Ct           (batch, G, L, N)     any strides but a unit last one
//   D, bias (dim,), x0 (batch, N, dim)    optional, contiguous
// Outputs: out (batch, L, dim), last (batch, N, dim), ck (batch, nc, N, dim): the state entering
// each chunk of K steps. The backward recomputes one chunk's states at a time from ck and runs the
// adjoint recurrence backwards in time.

#include <torch/library.h>

#include <vector>

#include "common.h"

namespace {

using olm::load_lanes;
using olm::opt_ptr;
using olm::parallel_dynamic;
using olm::store_lanes;
using olm::vexp;
using olm::sigmoid_lanes;
using olm::softplus_lanes;

constexpr int64_t W = 16;       // channels per vector block
constexpr int64_t kAhead = 8;  // time steps to prefetch ahead

struct Dims {
  int64_t batch, L, dim, N, G, dpg, nblk;  // nblk: channel blocks per group
};

inline Dims dims_of(const at::Tensor& u, const at::Tensor& At, const at::Tensor& Bt) {
  Dims s;
  s.batch = u.size(0);
  s.L = u.size(1);
  s.dim = u.size(2);
  s.N = At.size(0);
  s.G = Bt.size(1);
  s.dpg = s.dim / s.G;
  s.nblk = (s.dpg + W - 1) / W;
  return s;
}

// A (batch, L, dim) tensor with a unit channel stride.
template <typename T>
struct TimeMajor {
  const T* p;
  int64_t sb, st;
  const T* row(int64_t b, int64_t t) const { return p + b * sb + t * st; }
};

template <typename T>
TimeMajor<T> time_major(const at::Tensor& x) {
  return {x.data_ptr<T>(), x.stride(0), x.stride(1)};
}

template <typename T>
std::optional<TimeMajor<T>> time_major(const std::optional<at::Tensor>& x) {
  if (!x) return std::nullopt;
  return time_major<T>(*x);
}

// B or C, (batch, G, L, N) with a unit last stride.
template <typename T>
struct StateMajor {
  const T* p;
  int64_t sb, sg, st;
  const T* row(int64_t b, int64_t g, int64_t t) const { return p + b * sb + g * sg + t * st; }
};

template <typename T>
StateMajor<T> state_major(const at::Tensor& x) {
  return {x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2)};
}

// max |v[i]| over n values (NaN ignored: a NaN step propagates through the plain exp anyway).
template <typename T>
OLM_INLINE T max_abs(const T* __restrict__ v, int64_t n) {
  T m = T(0);
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(v[i]));
  return m;
}

// Load one time step of a channel block: dt = softplus(delta + bias) (or delta + bias), raw =
// delta + bias, u and dt * u; lanes >= wn are zero. bb: the block's bias (zeros without one).
template <typename T>
inline void load_step(const T* __restrict__ dr, const T* __restrict__ ur, const T* __restrict__ bb, bool sp,
                      int64_t wn, T* __restrict__ dt, T* __restrict__ uv, T* __restrict__ du, T* __restrict__ raw) {
  load_lanes<W>(dr, wn, raw);
  load_lanes<W>(ur, wn, uv);
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) raw[w] += bb[w];
  if (sp) {
    softplus_lanes<W>(raw, dt);
    if (wn < W)
      for (int64_t w = wn; w < W; ++w) dt[w] = T(0);
  } else {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) dt[w] = raw[w];
  }
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) du[w] = dt[w] * uv[w];
}

// A as the state steps below want it (Ae): A itself, or A * log2(e) for the AVX-512 exp.
template <typename T>
OLM_INLINE T exp_arg_scale() {
  return T(1);
}

// One time step of a channel block's N states: x[n] = exp(dt A[n]) x[n] + du B[n], y += C[n] x[n].
// Ae = A * exp_arg_scale<T>() (the generic path takes A itself).
template <typename T>
OLM_INLINE void fwd_states(int64_t N, const T* __restrict__ dt, const T* __restrict__ du, const T* __restrict__ Ae,
                           const T* __restrict__ Bv, const T* __restrict__ Cv, T* __restrict__ x, T* __restrict__ y) {
  for (int64_t n = 0; n < N; ++n) {
    const T Bn = Bv[n], Cn = Cv[n];
    T* __restrict__ xn = x + n * W;
    const T* __restrict__ An = Ae + n * W;
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      const T v = vexp(dt[w] * An[w]) * xn[w] + du[w] * Bn;
      xn[w] = v;
      y[w] += Cn * v;
    }
  }
}

// The same step keeping the states before (xp) and after (xn) it and the decays e[n] = exp(dt A[n]).
// `wide`: some |dt A| may reach kWideExp (only the AVX-512 exp needs telling; vexp and std::exp cope).
template <typename T>
OLM_INLINE void bwd_states(int64_t N, const T* __restrict__ dt, const T* __restrict__ du, const T* __restrict__ Ae,
                           const T* __restrict__ Bv, const T* __restrict__ xp, T* __restrict__ xn, T* __restrict__ e,
                           bool /*wide*/) {
  for (int64_t n = 0; n < N; ++n) {
    const T Bn = Bv[n];
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      const T ev = vexp(dt[w] * Ae[n * W + w]);
      e[n * W + w] = ev;
      xn[n * W + w] = ev * xp[n * W + w] + du[w] * Bn;
    }
  }
}

// The state recurrence over one chunk of len steps: y[i] = sum_n C[i][n] x[n] after step i (y
// (len, W), overwritten); x (N, W) carried in and out. Bv, Cv: step 0's rows of B and C, bst and
// cst their time strides. dtc, duc: the steps' dt and dt * u (len, W). `wide`: as for bwd_states.
template <typename T>
OLM_INLINE void fwd_chunk(int64_t len, int64_t N, const T* __restrict__ dtc, const T* __restrict__ duc,
                          const T* __restrict__ Ae, const T* Bv, const T* Cv, int64_t bst, int64_t cst, T* __restrict__ x,
                          T* __restrict__ y, bool /*wide*/) {
  for (int64_t i = 0; i < len; ++i) {
    for (int64_t w = 0; w < W; ++w) y[i * W + w] = T(0);
    fwd_states<T>(N, dtc + i * W, duc + i * W, Ae, Bv + i * bst, Cv + i * cst, x, y + i * W);
  }
}

#ifdef OLM_AVX512
static_assert(W == 16, "one AVX-512 float vector per channel block");

template <>
OLM_INLINE float exp_arg_scale<float>() {
  return olm::kLog2e;
}

template <>
OLM_INLINE void bwd_states<float>(int64_t N, const float* __restrict__ dt, const float* __restrict__ du,
                                  const float* __restrict__ Ae, const float* __restrict__ Bv,
                                  const float* __restrict__ xp, float* __restrict__ xn, float* __restrict__ e,
                                  bool wide) {
  const __m512 dtv = _mm512_loadu_ps(dt), duv = _mm512_loadu_ps(du);
  for (int64_t n = 0; n < N; ++n) {
    const __m512 av = _mm512_loadu_ps(Ae + n * W);
    const __m512 ev = wide ? olm::vexp2_wide(dtv, av) : olm::vexp2(dtv, av);
    _mm512_storeu_ps(e + n * W, ev);
    _mm512_storeu_ps(xn + n * W,
                    _mm512_fmadd_ps(ev, _mm512_loadu_ps(xp + n * W), _mm512_mul_ps(duv, _mm512_set1_ps(Bv[n]))));
  }
}

// NG states of a channel block through all len steps of a chunk, states and their A held in
// registers (the recurrence never goes through memory); y[i] += (or = when `first`) their
// contribution to step i's output.
template <int NG, bool Wide>
OLM_INLINE void fwd_group(int64_t len, const float* __restrict__ dtc, const float* __restrict__ duc,
                          const float* __restrict__ Ae, const float* Bv, const float* Cv, int64_t bst, int64_t cst,
                          float* __restrict__ x, float* __restrict__ y, bool first) {
  __m512 xs[NG], as[NG];
  for (int n = 0; n < NG; ++n) {
    xs[n] = _mm512_loadu_ps(x + n * W);
    as[n] = _mm512_loadu_ps(Ae + n * W);
  }
  for (int64_t i = 0; i < len; ++i) {
    const __m512 dtv = _mm512_loadu_ps(dtc + i * W), duv = _mm512_loadu_ps(duc + i * W);
    const float* Bi = Bv + i * bst;
    const float* Ci = Cv + i * cst;
    __m512 ya = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + i * W), yb = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int n = 0; n < NG; ++n) {  // two accumulators: a shorter dependency chain
      const __m512 ev = Wide ? olm::vexp2_wide(dtv, as[n]) : olm::vexp2(dtv, as[n]);
      xs[n] = _mm512_fmadd_ps(ev, xs[n], _mm512_mul_ps(duv, _mm512_set1_ps(Bi[n])));
      if (n & 1)
        yb = _mm512_fmadd_ps(xs[n], _mm512_set1_ps(Ci[n]), yb);
      else
        ya = _mm512_fmadd_ps(xs[n], _mm512_set1_ps(Ci[n]), ya);
    }
    _mm512_storeu_ps(y + i * W, _mm512_add_ps(ya, yb));
  }
  for (int n = 0; n < NG; ++n) _mm512_storeu_ps(x + n * W, xs[n]);
}

// The chunk in groups of 8 states (16 vector registers for the states and their A), then 1 at a time.
template <>
OLM_INLINE void fwd_chunk<float>(int64_t len, int64_t N, const float* __restrict__ dtc,
                                 const float* __restrict__ duc, const float* __restrict__ Ae, const float* Bv,
                                 const float* Cv, int64_t bst, int64_t cst, float* __restrict__ x,
                                 float* __restrict__ y, bool wide) {
  int64_t n = 0;
  if (wide) {  // rare (only for |dt A| near float's range): the checked exp, without the register-group variant
    for (; n < N; ++n) fwd_group<1, true>(len, dtc, duc, Ae + n * W, Bv + n, Cv + n, bst, cst, x + n * W, y, n == 0);
  }
  for (; n + 8 <= N; n += 8)
    fwd_group<8, false>(len, dtc, duc, Ae + n * W, Bv + n, Cv + n, bst, cst, x + n * W, y, n == 0);
  for (; n < N; ++n) fwd_group<1, false>(len, dtc, duc, Ae + n * W, Bv + n, Cv + n, bst, cst, x + n * W, y, n == 0);
  if (N == 0)
    for (int64_t i = 0; i < len * W; ++i) y[i] = 0.0f;
}
#endif

template <typename T>
void fwd_kernel(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt,
                const at::Tensor& Ct, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                const std::optional<at::Tensor>& bias_t, bool sp, const std::optional<at::Tensor>& x0, int64_t K,
                at::Tensor& out, at::Tensor& last, at::Tensor* ck) {
  const Dims s = dims_of(u, At, Bt);
  const int64_t L = s.L, dim = s.dim, N = s.N, G = s.G, nc = (L + K - 1) / K;
  const auto uu = time_major<T>(u), dd = time_major<T>(delta);
  const auto zz = time_major<T>(z);
  const auto BB = state_major<T>(Bt), CC = state_major<T>(Ct);
  const T* Ap = At.data_ptr<T>();
  const T* Dp = opt_ptr<T>(D);
  const T* bp = opt_ptr<T>(bias_t);
  const T* x0p = opt_ptr<T>(x0);
  T* op = out.data_ptr<T>();
  T* lp = last.data_ptr<T>();
  T* ckp = ck ? ck->data_ptr<T>() : nullptr;  // none: inference, no backward
  // Each chunk of K steps runs in three passes: the per-step inputs (dt, u, dt * u; independent
  // across steps, so they pipeline), the state recurrence, then the output (D skip, SiLU(z) gate).
  parallel_dynamic(s.batch * G * s.nblk, [&](int64_t begin, int64_t end) {
    olm::Scratch<T> xbuf(N * W), Abuf(N * W), stepbuf(4 * K * W);
    T* __restrict__ x = xbuf.data();
    T* __restrict__ Ae = Abuf.data();
    T* __restrict__ dtc = stepbuf.data();
    T* __restrict__ uc = dtc + K * W;
    T* __restrict__ duc = uc + K * W;
    T* __restrict__ yc = duc + K * W;
    alignas(64) T raw[W], Dv[W], bb[W], zv[W], sg[W], yv[W];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (G * s.nblk), g = (task / s.nblk) % G, k = task % s.nblk;
      const int64_t d0 = g * s.dpg + k * W, wn = std::min(W, g * s.dpg + s.dpg - d0);
      for (int64_t n = 0; n < N; ++n) {
        load_lanes<W>(Ap + n * dim + d0, wn, Ae + n * W);
        load_lanes<W>(x0p ? x0p + (b * N + n) * dim + d0 : nullptr, wn, x + n * W);
      }
      for (int64_t i = 0; i < N * W; ++i) Ae[i] *= exp_arg_scale<T>();
      const T amax = max_abs(Ae, N * W);
      load_lanes<W>(Dp ? Dp + d0 : nullptr, wn, Dv);
      load_lanes<W>(bp ? bp + d0 : nullptr, wn, bb);
      for (int64_t t0 = 0; t0 < L; t0 += K) {
        const int64_t len = std::min(K, L - t0);
        if (ckp) {
          T* c = ckp + ((b * nc + t0 / K) * N) * dim + d0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t w = 0; w < wn; ++w) c[n * dim + w] = x[n * W + w];
        }
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = t0 + i;
          if (t + kAhead < L) {  // rows are a page apart: the hardware prefetcher will not fetch them
            olm::prefetch(dd.row(b, t + kAhead) + d0, W);
            olm::prefetch(uu.row(b, t + kAhead) + d0, W);
          }
          load_step<T>(dd.row(b, t) + d0, uu.row(b, t) + d0, bb, sp, wn, dtc + i * W, uc + i * W, duc + i * W, raw);
        }
        const bool wide = max_abs(dtc, len * W) * amax >= T(olm::kWideExp);
        fwd_chunk<T>(len, N, dtc, duc, Ae, BB.row(b, g, t0), CC.row(b, g, t0), BB.st, CC.st, x, yc, wide);
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = t0 + i;
          if (t + kAhead < L) {
            if (zz) olm::prefetch(zz->row(b, t + kAhead) + d0, W);
            olm::prefetch(op + (b * L + t + kAhead) * dim + d0, W, true);
          }
          const T* __restrict__ y = yc + i * W;
          const T* __restrict__ ui = uc + i * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) yv[w] = y[w] + Dv[w] * ui[w];
          if (zz) {
            load_lanes<W>(zz->row(b, t) + d0, wn, zv);
            sigmoid_lanes<W>(zv, sg);
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) yv[w] *= zv[w] * sg[w];
          }
          store_lanes<W>(yv, wn, op + (b * L + t) * dim + d0);
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t w = 0; w < wn; ++w) lp[(b * N + n) * dim + d0 + w] = x[n * W + w];
    }
  });
}

template <typename T>
void bwd_kernel(const at::Tensor& gout, const std::optional<at::Tensor>& glast, const at::Tensor& u,
                const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt, const at::Tensor& Ct,
                const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                const std::optional<at::Tensor>& bias_t, bool sp, const at::Tensor& ck, int64_t K, int64_t P,
                at::Tensor& du, at::Tensor& ddelta, at::Tensor& dA_b, at::Tensor& dB_p, at::Tensor& dC_p,
                at::Tensor& dD_b, at::Tensor& dbias_b, at::Tensor& dz, at::Tensor& dx0) {
  const Dims s = dims_of(u, At, Bt);
  const int64_t L = s.L, dim = s.dim, N = s.N, G = s.G, nc = ck.size(1);
  const int64_t per = (s.nblk + P - 1) / P;  // channel blocks per task
  const T* gp = gout.data_ptr<T>();
  const T* glp = opt_ptr<T>(glast);
  const auto uu = time_major<T>(u), dd = time_major<T>(delta);
  const auto zz = time_major<T>(z);
  const auto BB = state_major<T>(Bt), CC = state_major<T>(Ct);
  const T* Ap = At.data_ptr<T>();
  const T* Dp = opt_ptr<T>(D);
  const T* bp = opt_ptr<T>(bias_t);
  const T* ckp = ck.data_ptr<T>();
  T* dup = du.data_ptr<T>();
  T* ddp = ddelta.data_ptr<T>();
  T* dAp = dA_b.data_ptr<T>();
  T* dBp = dB_p.data_ptr<T>();
  T* dCp = dC_p.data_ptr<T>();
  T* dDp = dD_b.data_ptr<T>();
  T* dbp = dbias_b.data_ptr<T>();
  T* dzp = zz ? dz.data_ptr<T>() : nullptr;
  T* dx0p = dx0.data_ptr<T>();
  // A task owns `per` channel blocks of one (batch, group) and walks the chunks backwards, running
  // every block through each chunk: dB and dC, sums over channels, then collect lane-wise across
  // the task's blocks and need one horizontal sum per (step, state) per chunk, not one per block.
  parallel_dynamic(s.batch * G * P, [&](int64_t begin, int64_t end) {
    const int64_t NW = N * W;
    olm::Scratch<T> xs_buf((K + 1) * NW), e_buf(K * NW), acc_buf(2 * K * NW), blk_buf(per * (4 * NW + 4 * W));
    olm::Scratch<T> dt_buf(K * W), u_buf(K * W), du_buf(K * W), raw_buf(K * W);
    T* __restrict__ xs = xs_buf.data();
    T* __restrict__ e = e_buf.data();
    T* __restrict__ dBl = acc_buf.data();  // (K, N, W) lane-wise dB and dC of the chunk
    T* __restrict__ dCl = dBl + K * NW;
    T* __restrict__ dtc = dt_buf.data();
    T* __restrict__ uc = u_buf.data();
    T* __restrict__ duc = du_buf.data();
    T* __restrict__ rawc = raw_buf.data();
    alignas(64) T dy[W], duv[W], ddt[W], y[W], zv[W], gv[W], dzv[W], sgv[W];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (G * P), g = (task / P) % G, p = task % P;
      const int64_t k0 = p * per, nk = std::max<int64_t>(0, std::min(s.nblk, k0 + per) - k0);
      T* dBg = dBp + task * L * N;  // (batch, G, P, L, N)
      T* dCg = dCp + task * L * N;
      // per block: h, dA accumulator, A, A for exp (N x W each); D, bias, dD and dbias accumulators (W each)
      auto blk = [&](int64_t j) { return blk_buf.data() + j * (4 * NW + 4 * W); };
      std::vector<T> amax(std::max<int64_t>(nk, 1));  // per block: max |A| (exp-scaled), for bwd_states' `wide`
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t d0 = g * s.dpg + (k0 + j) * W, wn = std::min(W, g * s.dpg + s.dpg - d0);
        T* h = blk(j);
        T* dAacc = h + NW;
        T* Ab = h + 2 * NW;
        T* Ae = h + 3 * NW;
        T* Dv = h + 4 * NW;
        for (int64_t n = 0; n < N; ++n) {
          load_lanes<W>(Ap + n * dim + d0, wn, Ab + n * W);
          load_lanes<W>(glp ? glp + (b * N + n) * dim + d0 : nullptr, wn, h + n * W);
        }
        for (int64_t i = 0; i < NW; ++i) {
          dAacc[i] = T(0);
          Ae[i] = Ab[i] * exp_arg_scale<T>();
        }
        amax[j] = max_abs(Ae, NW);
        load_lanes<W>(Dp ? Dp + d0 : nullptr, wn, Dv);
        load_lanes<W>(bp ? bp + d0 : nullptr, wn, Dv + W);
        for (int64_t w = 0; w < 2 * W; ++w) Dv[2 * W + w] = T(0);
      }
      for (int64_t c = nc - 1; c >= 0; --c) {
        const int64_t t0 = c * K, len = std::min(K, L - t0);
        std::fill(dBl, dBl + 2 * K * NW, T(0));
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t d0 = g * s.dpg + (k0 + j) * W, wn = std::min(W, g * s.dpg + s.dpg - d0);
          T* __restrict__ h = blk(j);
          T* __restrict__ dAacc = h + NW;
          const T* __restrict__ Ab = h + 2 * NW;
          const T* __restrict__ Ae = h + 3 * NW;
          T* __restrict__ Dv = h + 4 * NW;
          const T* __restrict__ bb = Dv + W;
          T* __restrict__ dDacc = Dv + 2 * W;
          T* __restrict__ dbacc = Dv + 3 * W;
          const T* start = ckp + ((b * nc + c) * N) * dim + d0;
          for (int64_t n = 0; n < N; ++n) load_lanes<W>(start + n * dim, wn, xs + n * W);
          for (int64_t i = 0; i < len; ++i) {  // recompute the chunk's states
            const int64_t t = t0 + i;
            T* dti = dtc + i * W;
            T* dui = duc + i * W;
            if (t + kAhead < L) {
              olm::prefetch(dd.row(b, t + kAhead) + d0, W);
              olm::prefetch(uu.row(b, t + kAhead) + d0, W);
            }
            load_step<T>(dd.row(b, t) + d0, uu.row(b, t) + d0, bb, sp, wn, dti, uc + i * W, dui, rawc + i * W);
            const bool wide = max_abs(dti, W) * amax[j] >= T(olm::kWideExp);
            bwd_states<T>(N, dti, dui, Ae, BB.row(b, g, t), xs + i * NW, xs + (i + 1) * NW, e + i * NW, wide);
          }
          for (int64_t i = len - 1; i >= 0; --i) {  // adjoint recurrence, backwards in time
            const int64_t t = t0 + i, orow = (b * L + t) * dim + d0;
            const T* dti = dtc + i * W;
            const T* ui = uc + i * W;
            const T* dui = duc + i * W;
            const T* __restrict__ Bv = BB.row(b, g, t);
            const T* __restrict__ Cv = CC.row(b, g, t);
            if (t >= kAhead) {
              olm::prefetch(gp + orow - kAhead * dim, W);
              if (zz) olm::prefetch(zz->row(b, t - kAhead) + d0, W);
            }
            load_lanes<W>(gp + orow, wn, gv);
            if (zz) {
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) y[w] = Dv[w] * ui[w];
              for (int64_t n = 0; n < N; ++n) {
                const T Cn = Cv[n];
                const T* __restrict__ xc = xs + (i + 1) * NW + n * W;
#pragma omp simd
                for (int64_t w = 0; w < W; ++w) y[w] += Cn * xc[w];
              }
              load_lanes<W>(zz->row(b, t) + d0, wn, zv);
              sigmoid_lanes<W>(zv, sgv);
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) {
                const T zt = zv[w], sg = sgv[w], gt = gv[w];
                dy[w] = gt * zt * sg;
                dzv[w] = gt * y[w] * sg * (T(1) + zt * (T(1) - sg));
              }
              store_lanes<W>(dzv, wn, dzp + orow);
            } else {
              for (int64_t w = 0; w < W; ++w) dy[w] = gv[w];
            }
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) {
              dDacc[w] += dy[w] * ui[w];
              duv[w] = dy[w] * Dv[w];
              ddt[w] = 0;
            }
            for (int64_t n = 0; n < N; ++n) {
              const T Bn = Bv[n], Cn = Cv[n];
              const T* __restrict__ xc = xs + (i + 1) * NW + n * W;
              const T* __restrict__ xp = xs + i * NW + n * W;
              const T* __restrict__ en = e + i * NW + n * W;
              const T* __restrict__ An = Ab + n * W;
              T* __restrict__ hn = h + n * W;
              T* __restrict__ dAn = dAacc + n * W;
              T* __restrict__ dBn = dBl + i * NW + n * W;
              T* __restrict__ dCn = dCl + i * NW + n * W;
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) {
                const T hv = hn[w] + dy[w] * Cn;
                dCn[w] += dy[w] * xc[w];
                dBn[w] += hv * dui[w];
                duv[w] += dti[w] * hv * Bn;
                const T ex = en[w] * xp[w];
                ddt[w] += hv * (An[w] * ex + Bn * ui[w]);
                dAn[w] += hv * dti[w] * ex;
                hn[w] = en[w] * hv;
              }
            }
            const T* rawi = rawc + i * W;
            if (sp) {
              sigmoid_lanes<W>(rawi, sgv);  // softplus'
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) ddt[w] *= sgv[w];
            }
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) dbacc[w] += ddt[w];
            store_lanes<W>(ddt, wn, ddp + orow);
            store_lanes<W>(duv, wn, dup + orow);
          }
        }
        for (int64_t i = 0; i < len; ++i)  // one horizontal sum per (step, state) for all the task's blocks
          for (int64_t n = 0; n < N; ++n) {
            T sB = 0, sC = 0;
            const T* __restrict__ dBn = dBl + i * NW + n * W;
            const T* __restrict__ dCn = dCl + i * NW + n * W;
#pragma omp simd reduction(+ : sB, sC)
            for (int64_t w = 0; w < W; ++w) {
              sB += dBn[w];
              sC += dCn[w];
            }
            dBg[(t0 + i) * N + n] = sB;
            dCg[(t0 + i) * N + n] = sC;
          }
      }
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t d0 = g * s.dpg + (k0 + j) * W, wn = std::min(W, g * s.dpg + s.dpg - d0);
        const T* h = blk(j);
        const T* dAacc = h + NW;
        const T* dDacc = h + 4 * NW + 2 * W;
        const T* dbacc = h + 4 * NW + 3 * W;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t w = 0; w < wn; ++w) {
            dx0p[(b * N + n) * dim + d0 + w] = h[n * W + w];
            dAp[(b * N + n) * dim + d0 + w] = dAacc[n * W + w];
          }
        for (int64_t w = 0; w < wn; ++w) {
          dDp[b * dim + d0 + w] = dDacc[w];
          dbp[b * dim + d0 + w] = dbacc[w];
        }
      }
    }
  });
}

void check_layouts(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt,
                   const at::Tensor& Ct, const std::optional<at::Tensor>& z) {
  for (const at::Tensor* t : {&u, &delta, &Bt, &Ct})
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) == 1, "openlm_mamba_cpu scan: inputs need a unit last stride");
  TORCH_CHECK(!z || z->stride(-1) == 1 || z->size(-1) == 1, "openlm_mamba_cpu scan: z needs a unit last stride");
  TORCH_CHECK(At.is_contiguous(), "openlm_mamba_cpu scan: At must be contiguous");
}

std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At,
                                 const at::Tensor& Bt, const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const std::optional<at::Tensor>& x0, int64_t K) {
  check_layouts(u, delta, At, Bt, Ct, z);
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2), N = At.size(0);
  const int64_t nc = (L + K - 1) / K;
  auto out = at::empty({batch, L, dim}, u.options());
  auto last = at::empty({batch, N, dim}, u.options());
  auto ck = at::empty({batch, nc, N, dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_fwd", [&] {
    fwd_kernel<scalar_t>(u, delta, At, Bt, Ct, D, z, bias, softplus, x0, K, out, last, &ck);
  });
  return {out, last, ck};
}

std::vector<at::Tensor> scan_bwd(const at::Tensor& gout, const std::optional<at::Tensor>& glast, const at::Tensor& u,
                                 const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt,
                                 const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const at::Tensor& ck, int64_t K, int64_t P) {
  check_layouts(u, delta, At, Bt, Ct, z);
  TORCH_CHECK(gout.is_contiguous() && gout.sizes() == u.sizes(), "scan_bwd: gout must be contiguous, like u");
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2), N = At.size(0), G = Bt.size(1);
  auto du = at::empty({batch, L, dim}, u.options());
  auto ddelta = at::empty({batch, L, dim}, u.options());
  auto dA_b = at::empty({batch, N, dim}, u.options());
  auto dB_p = at::empty({batch, G, P, L, N}, u.options());  // every entry is written
  auto dC_p = at::empty({batch, G, P, L, N}, u.options());
  auto dD_b = at::empty({batch, dim}, u.options());
  auto dbias_b = at::empty({batch, dim}, u.options());
  auto dz = z ? at::empty({batch, L, dim}, u.options()) : at::empty({0}, u.options());
  auto dx0 = at::empty({batch, N, dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_bwd", [&] {
    bwd_kernel<scalar_t>(gout, glast, u, delta, At, Bt, Ct, D, z, bias, softplus, ck, K, P, du, ddelta, dA_b, dB_p,
                         dC_p, dD_b, dbias_b, dz, dx0);
  });
  return {du, ddelta, dA_b, dB_p, dC_p, dD_b, dbias_b, dz, dx0};
}

}  // namespace

void olm::scan_fwd_into(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt,
                        const at::Tensor& Ct, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& bias, bool softplus, const std::optional<at::Tensor>& x0,
                        at::Tensor& out, at::Tensor& last) {
  check_layouts(u, delta, At, Bt, Ct, z);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_fwd_into", [&] {
    // K: steps per pass, as the Python side's CHUNK; without chunk states it only sets the buffers' size
    fwd_kernel<scalar_t>(u, delta, At, Bt, Ct, D, z, bias, softplus, x0, 64, out, last, nullptr);
  });
}

TORCH_LIBRARY(openlm_mamba_cpu, m) {
  m.def(
      "scan_fwd(Tensor u, Tensor delta, Tensor At, Tensor Bt, Tensor Ct, Tensor? D, Tensor? z, Tensor? bias, "
      "bool softplus, Tensor? x0, int K) -> Tensor[]");
  m.def(
      "scan_bwd(Tensor gout, Tensor? glast, Tensor u, Tensor delta, Tensor At, Tensor Bt, Tensor Ct, Tensor? D, "
      "Tensor? z, Tensor? bias, bool softplus, Tensor ck, int K, int P) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(openlm_mamba_cpu, CPU, m) {
  m.impl("scan_fwd", &scan_fwd);
  m.impl("scan_bwd", &scan_bwd);
}
