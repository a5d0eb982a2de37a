// One decoding step on CPU: the conv window update and the selective state update, each one call
// instead of a dozen small torch ops. Registered as `openlm_mamba_cpu::conv_step` / `state_step`;
// compiled with the other kernels by openlm_mamba/ops/cpp.py. float32 / float64, contiguous.
//   conv_step:  conv_state (batch, dim, KW) holds the last KW inputs, newest last; shifted in place
//               to take x (batch, dim); returns act(bias + sum_k w[:, k] * window[:, k]).
//   state_step: state (batch, dim, N) <- exp(dt A) state + dt x B, in place; returns
//               (<C, state> + D x) * silu(z); dt = softplus(dt + dt_bias) when asked.
//               B, C (batch, G, N); x, dt, z (batch, dim); A (dim, N); D, dt_bias (dim,).

#include <torch/library.h>

#include "common.h"

namespace {

using olm::opt_ptr;
using olm::vexp;
using olm::vsigmoid;
using olm::vsoftplus;

constexpr int64_t kSerial = 1 << 16;  // below this many state elements, one thread is faster

template <typename F>
void for_rows(int64_t rows, int64_t work, const F& fn) {
  if (work < kSerial) {
    fn(0, rows);
  } else {
    at::parallel_for(0, rows, std::max<int64_t>(1, rows * kSerial / work / 4), fn);
  }
}

template <typename T>
void conv_step_kernel(at::Tensor& st, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, bool silu, at::Tensor& out) {
  const int64_t batch = st.size(0), dim = st.size(1), KW = st.size(2);
  T* sp = st.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const T* bp = opt_ptr<T>(bias);
  T* op = out.data_ptr<T>();
  for_rows(batch * dim, batch * dim * KW, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t d = r % dim;
      T* s = sp + r * KW;
      const T* w = wp + d * KW;
      T a = bp ? bp[d] : T(0);
      for (int64_t k = 0; k + 1 < KW; ++k) {
        s[k] = s[k + 1];
        a += w[k] * s[k];
      }
      s[KW - 1] = xp[r];
      a += w[KW - 1] * xp[r];
      op[r] = silu ? a * vsigmoid(a) : a;
    }
  });
}

template <typename T>
void state_step_kernel(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool sp,
                       at::Tensor& out) {
  const int64_t batch = state.size(0), dim = state.size(1), N = state.size(2), G = B.size(1), dpg = dim / G;
  T* stp = state.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* dtp = dt.data_ptr<T>();
  const T* Ap = A.data_ptr<T>();
  const T* Bp = B.data_ptr<T>();
  const T* Cp = C.data_ptr<T>();
  const T* Dp = opt_ptr<T>(D);
  const T* zp = opt_ptr<T>(z);
  const T* bp = opt_ptr<T>(dt_bias);
  T* op = out.data_ptr<T>();
  for_rows(batch * dim, batch * dim * N, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / dim, d = r % dim, g = d / dpg;
      T delta = dtp[r] + (bp ? bp[d] : T(0));
      if (sp) delta = vsoftplus(delta);
      const T xv = xp[r], dx = delta * xv;
      T* __restrict__ s = stp + r * N;
      const T* __restrict__ a = Ap + d * N;
      const T* __restrict__ Bv = Bp + (b * G + g) * N;
      const T* __restrict__ Cv = Cp + (b * G + g) * N;
      T y = 0;
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) {
        const T v = vexp(delta * a[n]) * s[n] + dx * Bv[n];
        s[n] = v;
        y += v * Cv[n];
      }
      if (Dp) y += xv * Dp[d];
      if (zp) y *= zp[r] * vsigmoid(zp[r]);
      op[r] = y;
    }
  });
}

at::Tensor conv_step(at::Tensor conv_state, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, bool silu) {
  TORCH_CHECK(conv_state.is_contiguous() && x.is_contiguous() && weight.is_contiguous(),
              "conv_step: contiguous inputs expected");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_step",
                             [&] { conv_step_kernel<scalar_t>(conv_state, x, weight, bias, silu, out); });
  return out;
}

at::Tensor state_step(at::Tensor state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                      const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool softplus) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&state, &x, &dt, &A, &B, &C})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == state.scalar_type(),
                "state_step: contiguous inputs of the state's dtype expected");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "state_step", [&] {
    state_step_kernel<scalar_t>(state, x, dt, A, B, C, D, z, dt_bias, softplus, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openlm_mamba_cpu, m) {
  m.def("conv_step(Tensor(a!) conv_state, Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def(
      "state_step(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? dt_bias, bool softplus) -> Tensor");
}

TORCH_LIBRARY_IMPL(openlm_mamba_cpu, CPU, m) {
  m.impl("conv_step", &conv_step);
  m.impl("state_step", &state_step);
}
