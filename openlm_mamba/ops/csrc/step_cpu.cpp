// One decoding step on CPU: the conv window update and the selective state update, each one call
// instead of a dozen small torch ops, and `model_step`, a whole float32 Mamba stack's step in one
// call. Registered as `openlm_mamba_cpu::conv_step` / `state_step` / `model_step`; compiled with the
// other kernels by openlm_mamba/ops/cpp.py. float32 / float64, contiguous.
//   conv_step:  conv_state (batch, dim, KW) holds the last KW inputs, newest last; shifted in place
//               to take x (batch, dim); returns act(bias + sum_k w[:, k] * window[:, k]).
//   state_step: state (batch, dim, N) <- exp(dt A) state + dt x B, in place; returns
//               (<C, state> + D x) * silu(z); dt = softplus(dt + dt_bias) when asked.
//               B, C (batch, G, N); x, dt, z (batch, dim); A (dim, N); D, dt_bias (dim,).
//   model_step: see model_step() below.

#include <torch/library.h>

#include <vector>

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

// conv_step on raw pointers: x and out rows (batch) xs / dim apart, channels contiguous.
template <typename T>
void conv_step_core(int64_t batch, int64_t dim, int64_t KW, T* sp, const T* xp, int64_t xs, const T* wp,
                    const T* bp, bool silu, T* op) {
  for_rows(batch * dim, batch * dim * KW, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / dim, d = r % dim;
      const T xv = xp[b * xs + d];
      T* s = sp + r * KW;
      const T* w = wp + d * KW;
      T a = bp ? bp[d] : T(0);
      for (int64_t k = 0; k + 1 < KW; ++k) {
        s[k] = s[k + 1];
        a += w[k] * s[k];
      }
      s[KW - 1] = xv;
      a += w[KW - 1] * xv;
      op[r] = silu ? a * vsigmoid(a) : a;
    }
  });
}

// Row strides of state_step's per-sequence inputs (channels / states contiguous within a row).
struct StepStrides {
  int64_t x, dt, z, B, C, Bg, Cg;  // Bg, Cg: between groups
};

template <typename T>
void state_step_core(int64_t batch, int64_t dim, int64_t N, int64_t G, T* stp, const T* xp, const T* dtp,
                     const T* Ap, const T* Bp, const T* Cp, const T* Dp, const T* zp, const T* bp, bool sp,
                     const StepStrides& st, T* op) {
  const int64_t dpg = dim / G;
  for_rows(batch * dim, batch * dim * N, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / dim, d = r % dim, g = d / dpg;
      T delta = dtp[b * st.dt + d] + (bp ? bp[d] : T(0));
      if (sp) delta = vsoftplus(delta);
      const T xv = xp[b * st.x + d], dx = delta * xv;
      T* __restrict__ s = stp + r * N;
      const T* __restrict__ a = Ap + d * N;
      const T* __restrict__ Bv = Bp + b * st.B + g * st.Bg;
      const T* __restrict__ Cv = Cp + b * st.C + g * st.Cg;
      T y = 0;
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) {
        const T v = vexp(delta * a[n]) * s[n] + dx * Bv[n];
        s[n] = v;
        y += v * Cv[n];
      }
      if (Dp) y += xv * Dp[d];
      if (zp) {
        const T zv = zp[b * st.z + d];
        y *= zv * vsigmoid(zv);
      }
      op[r] = y;
    }
  });
}

at::Tensor conv_step(at::Tensor conv_state, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, bool silu) {
  TORCH_CHECK(conv_state.is_contiguous() && x.is_contiguous() && weight.is_contiguous(),
              "conv_step: contiguous inputs expected");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_step", [&] {
    conv_step_core<scalar_t>(conv_state.size(0), conv_state.size(1), conv_state.size(2),
                             conv_state.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.size(1),
                             weight.data_ptr<scalar_t>(), opt_ptr<scalar_t>(bias), silu, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor state_step(at::Tensor state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                      const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool softplus) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&state, &x, &dt, &A, &B, &C})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == state.scalar_type(),
                "state_step: contiguous inputs of the state's dtype expected");
  auto out = at::empty_like(x);
  const int64_t dim = state.size(1), N = state.size(2), G = B.size(1);
  const StepStrides st{dim, dim, dim, G * N, G * N, N, N};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "state_step", [&] {
    state_step_core<scalar_t>(state.size(0), dim, N, G, state.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                              dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
                              C.data_ptr<scalar_t>(), opt_ptr<scalar_t>(D), opt_ptr<scalar_t>(z),
                              opt_ptr<scalar_t>(dt_bias), softplus, st, out.data_ptr<scalar_t>());
  });
  return out;
}

// r (+)= x row-wise (first layer: r = x), out = norm(r) * w: a row at a time (see olm::add_rms_row).
void add_rms(const float* x, float* r, bool first, const float* w, double eps, int64_t batch, int64_t H,
             float* out) {
  for (int64_t b = 0; b < batch; ++b)
    olm::add_rms_row<float>(x + b * H, first ? nullptr : r + b * H, r + b * H, w, nullptr, eps, H, out + b * H);
}

constexpr int64_t kPerLayer = 9;  // norm_w, in_w, conv_w, x_w, dt_w, A, D, dt_bias, out_w
constexpr int64_t kBiasesPerLayer = 3;  // in_b, conv_b, out_b

// One decoding step through a float32 Mamba stack with RMSNorm (one B/C group): hidden (batch,
// d_model) -> norm_f(last hidden + residual) (batch, d_model); every layer's conv and SSM states
// are updated in place. `weights` holds kPerLayer tensors per layer (A = -exp(A_log), D and dt_bias
// as float32), `biases` kBiasesPerLayer optional ones. The same ops as MambaMixer.step + step_norm,
// without Python between them; the projections are ATen matmuls.
at::Tensor model_step(const at::Tensor& hidden, at::TensorList conv_states, at::TensorList ssm_states,
                      at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                      const at::Tensor& norm_f, double eps, int64_t dt_rank) {
  const int64_t n_layer = int64_t(ssm_states.size());
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "model_step: hidden must be a contiguous float32 (batch, d_model) tensor");
  TORCH_CHECK(int64_t(conv_states.size()) == n_layer && int64_t(weights.size()) == kPerLayer * n_layer &&
                  int64_t(biases.size()) == kBiasesPerLayer * n_layer,
              "model_step: per-layer argument counts do not match");
  const int64_t batch = hidden.size(0), H = hidden.size(1);
  auto residual = at::empty({batch, H}, hidden.options());
  auto normed = at::empty({batch, H}, hidden.options());
  at::Tensor h = hidden;
  for (int64_t i = 0; i < n_layer; ++i) {
    const at::Tensor* w = weights.data() + i * kPerLayer;
    const auto opt = [&](int64_t j) { return biases.get(i * kBiasesPerLayer + j); };
    const at::Tensor &norm_w = w[0], &in_w = w[1], &conv_w = w[2], &x_w = w[3], &dt_w = w[4], &A = w[5];
    const at::Tensor &D = w[6], &dt_bias = w[7], &out_w = w[8];
    at::Tensor conv_state = conv_states[i], ssm_state = ssm_states[i];
    const int64_t di = A.size(0), N = A.size(1), KW = conv_state.size(2);
    add_rms(h.data_ptr<float>(), residual.data_ptr<float>(), i == 0, norm_w.data_ptr<float>(), eps, batch, H,
            normed.data_ptr<float>());
    const auto in_b = opt(0), conv_b = opt(1), out_b = opt(2);
    const at::Tensor xz = in_b ? at::addmm(*in_b, normed, in_w.t()) : at::mm(normed, in_w.t());  // (batch, 2 di)
    auto xc = at::empty({batch, di}, hidden.options());
    conv_step_core<float>(batch, di, KW, conv_state.data_ptr<float>(), xz.data_ptr<float>(), 2 * di,
                          conv_w.data_ptr<float>(), conv_b ? conv_b->data_ptr<float>() : nullptr, true,
                          xc.data_ptr<float>());
    const at::Tensor x_dbl = at::mm(xc, x_w.t());  // (batch, dt_rank + 2N)
    const at::Tensor dt = at::mm(x_dbl.narrow(1, 0, dt_rank), dt_w.t());  // (batch, di)
    auto y = at::empty({batch, di}, hidden.options());
    const int64_t R = x_dbl.size(1);
    const float* xd = x_dbl.data_ptr<float>();
    const float* xzp = xz.data_ptr<float>();
    state_step_core<float>(batch, di, N, 1, ssm_state.data_ptr<float>(), xc.data_ptr<float>(), dt.data_ptr<float>(),
                           A.data_ptr<float>(), xd + dt_rank, xd + dt_rank + N, D.data_ptr<float>(), xzp + di,
                           dt_bias.data_ptr<float>(), true, StepStrides{di, di, 2 * di, R, R, N, N},
                           y.data_ptr<float>());
    h = out_b ? at::addmm(*out_b, y, out_w.t()) : at::mm(y, out_w.t());
  }
  auto out = at::empty({batch, H}, hidden.options());
  add_rms(h.data_ptr<float>(), residual.data_ptr<float>(), n_layer == 0, norm_f.data_ptr<float>(), eps, batch, H,
          out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openlm_mamba_cpu, m) {
  m.def("conv_step(Tensor(a!) conv_state, Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def(
      "state_step(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? dt_bias, bool softplus) -> Tensor");
  m.def(
      "model_step(Tensor hidden, Tensor(a!)[] conv_states, Tensor(b!)[] ssm_states, Tensor[] weights, "
      "Tensor?[] biases, Tensor norm_f, float eps, int dt_rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(openlm_mamba_cpu, CPU, m) {
  m.impl("conv_step", &conv_step);
  m.impl("state_step", &state_step);
  m.impl("model_step", &model_step);
}
