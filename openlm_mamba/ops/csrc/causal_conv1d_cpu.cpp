// Depthwise causal conv1d (+ bias, optional SiLU) on CPU, time-major, vectorised over blocks of V
// channels; the forward is parallel over (batch, runs of time steps), the backward over (batch,
// channel block). Registered as `openlm_mamba_cpu::conv_fwd` /
// `conv_bwd`; compiled with the scan by openlm_mamba/ops/cpp.py. Layouts (float32 or float64):
//   x           (batch, L, dim)        any batch / time strides, unit channel stride
//   weight      (dim, KW), KW <= 4     contiguous; bias (dim,) optional
//   init        (batch, dim, KW - 1)   the KW - 1 inputs before x, optional (zeros), contiguous
// out[t] = act(bias + sum_k weight[:, k] * x[t - (KW - 1) + k]), out (batch, L, dim) contiguous.

#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using olm::load_lanes;
using olm::opt_ptr;
using olm::parallel_dynamic;
using olm::store_lanes;
using olm::sigmoid_lanes;

constexpr int64_t V = 16;    // channels per vector block
constexpr int64_t MAXW = 4;    // widest kernel
constexpr int64_t kAhead = 8;  // time steps to prefetch ahead

struct Shape {
  int64_t batch, L, dim, KW, nblk, sb, st;
};

Shape shape_of(const at::Tensor& x, const at::Tensor& weight) {
  // one channel: its stride is never used (torch calls a (batch, L, 1) tensor contiguous whatever that stride)
  TORCH_CHECK(x.dim() == 3 && (x.stride(2) == 1 || x.size(2) == 1),
              "conv: x must be (batch, L, dim) with a unit channel stride");
  TORCH_CHECK(weight.is_contiguous() && weight.size(1) >= 1 && weight.size(1) <= MAXW,
              "conv: weight must be contiguous (dim, width <= 4)");
  return {x.size(0), x.size(1), x.size(2), weight.size(1), (x.size(2) + V - 1) / V, x.stride(0), x.stride(1)};
}

// The block's inputs at time t (t < 0: from init, zeros without it); lanes >= wn are zero.
template <typename T>
inline void load_input(const T* xp, const T* initp, const Shape& s, int64_t b, int64_t d0, int64_t wn, int64_t t,
                       T* __restrict__ dst) {
  if (t >= 0) {
    load_lanes<V>(xp + b * s.sb + t * s.st + d0, wn, dst);
    return;
  }
  const int64_t j = t + s.KW - 1;  // position in init
  for (int64_t w = 0; w < V; ++w)
    dst[w] = (initp && w < wn) ? initp[(b * s.dim + d0 + w) * (s.KW - 1) + j] : T(0);
}

template <typename T>
void load_weights(const T* wp, const T* bp, const Shape& s, int64_t d0, int64_t wn, T (*wk)[V], T* bv) {
  for (int64_t k = 0; k < s.KW; ++k)
    for (int64_t w = 0; w < V; ++w) wk[k][w] = w < wn ? wp[(d0 + w) * s.KW + k] : T(0);
  load_lanes<V>(bp ? bp + d0 : nullptr, wn, bv);
}

// The forward walks rows: a task is a run of kRows time steps of one sequence, and each row is
// computed across all channels from the KW - 1 rows before it (still in L1), so input and output
// are read and written contiguously. Rows before t = 0 come from init (zeros without it).
constexpr int64_t kRows = 32;

// One output row across all channels: out[d] = act(bv[d] + sum_k wt[k][d] * rows[k][d]); wt
// (KW, dimp) and bv (dimp) are zero-padded to whole vector blocks.
template <typename T, int64_t KW>
OLM_INLINE void conv_row(const T* const* rows, const T* __restrict__ wt, const T* __restrict__ bv, int64_t dimp,
                         int64_t dim, bool silu, T* __restrict__ orow) {
#ifdef OLM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t d0 = 0; d0 < dim; d0 += V) {
      const __mmask16 m = dim - d0 >= V ? __mmask16(0xffff) : __mmask16((1u << (dim - d0)) - 1);
      __m512 a = _mm512_loadu_ps(bv + d0);
      for (int64_t k = 0; k < KW; ++k)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(wt + k * dimp + d0), _mm512_maskz_loadu_ps(m, rows[k] + d0), a);
      if (silu) a = _mm512_mul_ps(a, olm::vsigmoid16(a));
      _mm512_mask_storeu_ps(orow + d0, m, a);
    }
    return;
  }
#endif
  alignas(64) T xin[MAXW][V], acc[V], sg[V];
  for (int64_t d0 = 0; d0 < dim; d0 += V) {
    const int64_t wn = std::min(V, dim - d0);
    for (int64_t k = 0; k < KW; ++k) load_lanes<V>(rows[k] + d0, wn, xin[k]);
#pragma omp simd
    for (int64_t w = 0; w < V; ++w) {
      T a = bv[d0 + w];
      for (int64_t k = 0; k < KW; ++k) a += wt[k * dimp + d0 + w] * xin[k][w];
      acc[w] = a;
    }
    if (silu) {
      sigmoid_lanes<V>(acc, sg);
#pragma omp simd
      for (int64_t w = 0; w < V; ++w) acc[w] *= sg[w];
    }
    store_lanes<V>(acc, wn, orow + d0);
  }
}

template <typename T, int64_t KW>
void fwd_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& init, bool silu, at::Tensor& out) {
  const Shape s = shape_of(x, weight);
  const int64_t dim = s.dim, dimp = s.nblk * V, nrun = (s.L + kRows - 1) / kRows;
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const T* bp = opt_ptr<T>(bias);
  const T* ip = opt_ptr<T>(init);
  T* op = out.data_ptr<T>();
  // weight transposed (KW, dimp) and bias (dimp), zero-padded to whole vector blocks
  std::vector<T> wt_buf(KW * dimp + dimp, T(0));
  T* wt = wt_buf.data();
  T* bv = wt + KW * dimp;
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t k = 0; k < KW; ++k) wt[k * dimp + d] = wp[d * KW + k];
    bv[d] = bp ? bp[d] : T(0);
  }
  parallel_dynamic(s.batch * nrun, [&](int64_t begin, int64_t end) {
    olm::Scratch<T> pre_buf(std::max<int64_t>(KW - 1, 1) * dimp);  // rows -(KW-1)..-1 of this sequence
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nrun, t0 = (task % nrun) * kRows, t1 = std::min(s.L, t0 + kRows);
      const T* rows[MAXW];
      if (t0 < KW - 1) {
        T* pre = pre_buf.data();
        for (int64_t j = 0; j < KW - 1; ++j)
          for (int64_t d = 0; d < dimp; ++d)
            pre[j * dimp + d] = (ip && d < dim) ? ip[(b * dim + d) * (KW - 1) + j] : T(0);
      }
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t k = 0; k < KW; ++k) {
          const int64_t tk = t - (KW - 1) + k;
          rows[k] = tk >= 0 ? xp + b * s.sb + tk * s.st : pre_buf.data() + (tk + KW - 1) * dimp;
        }
        conv_row<T, KW>(rows, wt, bv, dimp, dim, silu, op + (b * s.L + t) * dim);
      }
    }
  });
}

// Gradients, sweeping backwards in time with a window of the next KW - 1 pre-activation gradients.
template <typename T, int64_t KW>
void bwd_kernel(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& init, bool silu,
                at::Tensor& dx, at::Tensor& dw_b, at::Tensor& dbias_b, at::Tensor& dinit) {
  const Shape s = shape_of(x, weight);
  const T* gp = gout.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const T* bp = opt_ptr<T>(bias);
  const T* ip = opt_ptr<T>(init);
  T* dxp = dx.data_ptr<T>();
  T* dwp = dw_b.data_ptr<T>();
  T* dbp = dbias_b.data_ptr<T>();
  T* dip = dinit.data_ptr<T>();
  parallel_dynamic(s.batch * s.nblk, [&](int64_t begin, int64_t end) {
    alignas(64) T wk[MAXW][V], xin[MAXW][V], gnext[MAXW][V], dwacc[MAXW][V], bv[V], gpre[V], dbacc[V], acc[V];
    alignas(64) T pre[V], sg[V];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.nblk, d0 = (task % s.nblk) * V, wn = std::min(V, s.dim - d0);
      load_weights(wp, bp, s, d0, wn, wk, bv);
      for (int64_t k = 0; k < MAXW; ++k)
        for (int64_t w = 0; w < V; ++w) gnext[k][w] = dwacc[k][w] = T(0);
      for (int64_t w = 0; w < V; ++w) dbacc[w] = T(0);
      for (int64_t t = s.L - 1; t >= 0; --t) {
        if (t >= kAhead + KW) {
          olm::prefetch(xp + b * s.sb + (t - kAhead - KW + 1) * s.st + d0, V);
          olm::prefetch(gp + (b * s.L + t - kAhead) * s.dim + d0, V);
        }
        for (int64_t k = 0; k < KW; ++k) load_input(xp, ip, s, b, d0, wn, t - (KW - 1) + k, xin[k]);
        load_lanes<V>(gp + (b * s.L + t) * s.dim + d0, wn, gpre);
        if (silu) {
#pragma omp simd
          for (int64_t w = 0; w < V; ++w) {
            T a = bv[w];
            for (int64_t k = 0; k < KW; ++k) a += wk[k][w] * xin[k][w];
            pre[w] = a;
          }
          sigmoid_lanes<V>(pre, sg);
#pragma omp simd
          for (int64_t w = 0; w < V; ++w) gpre[w] *= sg[w] * (T(1) + pre[w] * (T(1) - sg[w]));
        }
#pragma omp simd
        for (int64_t w = 0; w < V; ++w) {
          dbacc[w] += gpre[w];
          T d = wk[KW - 1][w] * gpre[w];  // dx[t] = sum_k wk[k] * g'[t + KW - 1 - k]
          for (int64_t j = 0; j + 1 < KW; ++j) d += wk[KW - 2 - j][w] * gnext[j][w];
          acc[w] = d;
          for (int64_t k = 0; k < KW; ++k) dwacc[k][w] += gpre[w] * xin[k][w];
          for (int64_t j = KW - 2; j > 0; --j) gnext[j][w] = gnext[j - 1][w];
          if (KW > 1) gnext[0][w] = gpre[w];
        }
        store_lanes<V>(acc, wn, dxp + (b * s.L + t) * s.dim + d0);
      }
      // gnext[j] = g'[j]: the initial inputs at positions p = -(KW-1)..-1 feed outputs p + KW-1-k >= 0
      for (int64_t p = -(s.KW - 1); p < 0; ++p) {
        for (int64_t w = 0; w < wn; ++w) {
          T d = 0;
          for (int64_t k = 0; k < s.KW; ++k) {
            const int64_t q = p + s.KW - 1 - k;
            if (q >= 0 && q < std::min<int64_t>(s.L, s.KW - 1)) d += wk[k][w] * gnext[q][w];
          }
          dip[(b * s.dim + d0 + w) * (s.KW - 1) + p + s.KW - 1] = d;
        }
      }
      for (int64_t w = 0; w < wn; ++w) {
        for (int64_t k = 0; k < s.KW; ++k) dwp[(b * s.dim + d0 + w) * s.KW + k] = dwacc[k][w];
        dbp[b * s.dim + d0 + w] = dbacc[w];
      }
    }
  });
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& init, bool silu) {
  auto out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  olm::conv_fwd_into(x, weight, bias, init, silu, out);
  return out;
}

std::vector<at::Tensor> conv_bwd(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& init,
                                 bool silu) {
  TORCH_CHECK(gout.is_contiguous() && gout.sizes() == x.sizes(), "conv_bwd: gout must be contiguous, like x");
  const int64_t batch = x.size(0), dim = x.size(2), KW = weight.size(1);
  auto dx = at::empty({batch, x.size(1), dim}, x.options());
  auto dw_b = at::empty({batch, dim, KW}, x.options());
  auto dbias_b = at::empty({batch, dim}, x.options());
  auto dinit = at::empty({batch, dim, KW - 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_bwd", [&] {
    switch (KW) {
      case 1: bwd_kernel<scalar_t, 1>(gout, x, weight, bias, init, silu, dx, dw_b, dbias_b, dinit); break;
      case 2: bwd_kernel<scalar_t, 2>(gout, x, weight, bias, init, silu, dx, dw_b, dbias_b, dinit); break;
      case 3: bwd_kernel<scalar_t, 3>(gout, x, weight, bias, init, silu, dx, dw_b, dbias_b, dinit); break;
      default: bwd_kernel<scalar_t, 4>(gout, x, weight, bias, init, silu, dx, dw_b, dbias_b, dinit);
    }
  });
  return {dx, dw_b, dbias_b, dinit};
}

}  // namespace

void olm::conv_fwd_into(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& init, bool silu, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_fwd", [&] {
    switch (weight.size(1)) {
      case 1: fwd_kernel<scalar_t, 1>(x, weight, bias, init, silu, out); break;
      case 2: fwd_kernel<scalar_t, 2>(x, weight, bias, init, silu, out); break;
      case 3: fwd_kernel<scalar_t, 3>(x, weight, bias, init, silu, out); break;
      default: fwd_kernel<scalar_t, 4>(x, weight, bias, init, silu, out);
    }
  });
}

TORCH_LIBRARY_FRAGMENT(openlm_mamba_cpu, m) {
  m.def("conv_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? init, bool silu) -> Tensor");
  m.def("conv_bwd(Tensor gout, Tensor x, Tensor weight, Tensor? bias, Tensor? init, bool silu) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(openlm_mamba_cpu, CPU, m) {
  m.impl("conv_fwd", &conv_fwd);
  m.impl("conv_bwd", &conv_bwd);
}
