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

// a @ w.t() (+ bias).
at::Tensor proj(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  return b ? at::addmm(*b, a, w.t()) : at::mm(a, w.t());
}

constexpr int64_t kPerLayer = 9;  // norm_w, in_w, conv_w, x_w, dt_w, A, D, dt_bias, out_w
constexpr int64_t kBiasesPerLayer = 3;  // in_b, conv_b, out_b

// Layer i's tensors in model_step's / model_prefill's argument lists.
struct Layer {
  const at::Tensor &norm_w, &in_w, &conv_w, &x_w, &dt_w, &A, &D, &dt_bias, &out_w;
  const std::optional<at::Tensor> in_b, conv_b, out_b;
  Layer(at::TensorList w, const c10::List<std::optional<at::Tensor>>& b, int64_t i)
      : norm_w(w[i * kPerLayer]),
        in_w(w[i * kPerLayer + 1]),
        conv_w(w[i * kPerLayer + 2]),
        x_w(w[i * kPerLayer + 3]),
        dt_w(w[i * kPerLayer + 4]),
        A(w[i * kPerLayer + 5]),
        D(w[i * kPerLayer + 6]),
        dt_bias(w[i * kPerLayer + 7]),
        out_w(w[i * kPerLayer + 8]),
        in_b(b.get(i * kBiasesPerLayer)),
        conv_b(b.get(i * kBiasesPerLayer + 1)),
        out_b(b.get(i * kBiasesPerLayer + 2)) {}
};

void check_counts(const char* op, at::TensorList conv_states, at::TensorList ssm_states, at::TensorList weights,
                  const c10::List<std::optional<at::Tensor>>& biases) {
  const int64_t n = int64_t(ssm_states.size());
  TORCH_CHECK(int64_t(conv_states.size()) == n && int64_t(weights.size()) == kPerLayer * n &&
                  int64_t(biases.size()) == kBiasesPerLayer * n,
              op, ": per-layer argument counts do not match");
}

// One decoding step through a float32 Mamba stack with RMSNorm (one B/C group): hidden (batch,
// d_model) -> norm_f(last hidden + residual) (batch, d_model); every layer's conv and SSM states
// are updated in place. `weights` holds kPerLayer tensors per layer (A = -exp(A_log), D and dt_bias
// as float32), `biases` kBiasesPerLayer optional ones. The same ops as MambaMixer.step + step_norm,
// without Python between them; the projections are ATen matmuls.
at::Tensor model_step(const at::Tensor& hidden, at::TensorList conv_states, at::TensorList ssm_states,
                      at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                      const at::Tensor& norm_f, double eps, int64_t dt_rank) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // float32 throughout
  const int64_t n_layer = int64_t(ssm_states.size());
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "model_step: hidden must be a contiguous float32 (batch, d_model) tensor");
  check_counts("model_step", conv_states, ssm_states, weights, biases);
  const int64_t batch = hidden.size(0), H = hidden.size(1);
  auto residual = at::empty({batch, H}, hidden.options());
  auto normed = at::empty({batch, H}, hidden.options());
  at::Tensor h = hidden;
  for (int64_t i = 0; i < n_layer; ++i) {
    const Layer l(weights, biases, i);
    at::Tensor conv_state = conv_states[i], ssm_state = ssm_states[i];
    const int64_t di = l.A.size(0), N = l.A.size(1), KW = conv_state.size(2);
    add_rms(h.data_ptr<float>(), residual.data_ptr<float>(), i == 0, l.norm_w.data_ptr<float>(), eps, batch, H,
            normed.data_ptr<float>());
    const at::Tensor xz = proj(normed, l.in_w, l.in_b);  // (batch, 2 di)
    auto xc = at::empty({batch, di}, hidden.options());
    conv_step_core<float>(batch, di, KW, conv_state.data_ptr<float>(), xz.data_ptr<float>(), 2 * di,
                          l.conv_w.data_ptr<float>(), l.conv_b ? l.conv_b->data_ptr<float>() : nullptr, true,
                          xc.data_ptr<float>());
    const at::Tensor x_dbl = at::mm(xc, l.x_w.t());  // (batch, dt_rank + 2N)
    const at::Tensor dt = at::mm(x_dbl.narrow(1, 0, dt_rank), l.dt_w.t());  // (batch, di)
    auto y = at::empty({batch, di}, hidden.options());
    const int64_t R = x_dbl.size(1);
    const float* xd = x_dbl.data_ptr<float>();
    const float* xzp = xz.data_ptr<float>();
    state_step_core<float>(batch, di, N, 1, ssm_state.data_ptr<float>(), xc.data_ptr<float>(), dt.data_ptr<float>(),
                           l.A.data_ptr<float>(), xd + dt_rank, xd + dt_rank + N, l.D.data_ptr<float>(), xzp + di,
                           l.dt_bias.data_ptr<float>(), true, StepStrides{di, di, 2 * di, R, R, N, N},
                           y.data_ptr<float>());
    h = proj(y, l.out_w, l.out_b);
  }
  auto out = at::empty({batch, H}, hidden.options());
  add_rms(h.data_ptr<float>(), residual.data_ptr<float>(), n_layer == 0, norm_f.data_ptr<float>(), eps, batch, H,
          out.data_ptr<float>());
  return out;
}

// add_rms over `rows` rows of width H, on torch's threads.
void add_rms_rows(const float* x, float* r, bool first, const float* w, double eps, int64_t rows, int64_t H,
                  float* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    add_rms(x + r0 * H, r + r0 * H, first, w, eps, r1 - r0, H, out + r0 * H);
  });
}

// out = a @ w.t() (+ bias), into out.
void proj_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  if (b)
    at::addmm_out(out, *b, a, w.t());
  else
    at::mm_out(out, a, w.t());
}

// Entries [start, start + n) of an optional bias.
std::optional<at::Tensor> part(const std::optional<at::Tensor>& b, int64_t start, int64_t n) {
  return b ? std::optional(b->narrow(0, start, n)) : std::nullopt;
}

// Carves consecutive (rows, width) matrices out of a flat float32 buffer.
struct Carver {
  at::Tensor buf;
  int64_t off = 0;
  at::Tensor take(int64_t rows, int64_t width) {
    at::Tensor t = buf.narrow(0, off, rows * width).view({rows, width});
    off += rows * width;
    return t;
  }
};

// Zero the rows (b, t) of x (batch, L, width; any strides, unit last) where mask (batch, L) is 0.
void zero_padding(const at::Tensor& x, const float* mask) {
  const int64_t batch = x.size(0), L = x.size(1), width = x.size(2);
  float* p = x.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < L; ++t)
      if (mask[b * L + t] == 0.0f) std::fill_n(p + b * x.stride(0) + t * x.stride(1), width, 0.0f);
}

// Prefill through a float32 Mamba stack with RMSNorm, from and into the cache: hidden (batch, L,
// d_model) embeddings -> norm_f(last hidden + residual), (batch, d_model) at the last position when
// `last_only` (the last layer then runs its gate and output projection for that position alone),
// else (batch, L, d_model). The arguments after the states are model_step's; `fresh`: the cache
// holds no tokens yet. The same ops as ResidualBlock / MambaMixer.forward_cached, without Python
// between them: ATen matmuls and the conv / scan forward kernels. Every activation lives in
// `workspace` (flat float32, grown here when too small): a caller that keeps it skips the page
// faults of fresh allocations on every call. `mask` (batch, L) float32, 0 at padding: those
// positions' conv and SSM inputs are zeroed, as MambaMixer does with a mask.
at::Tensor model_prefill(const at::Tensor& hidden, at::TensorList conv_states, at::TensorList ssm_states,
                         at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                         const at::Tensor& norm_f, double eps, int64_t dt_rank, bool fresh, bool last_only,
                         at::Tensor workspace, const std::optional<at::Tensor>& mask) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // float32 throughout
  const int64_t n_layer = int64_t(ssm_states.size());
  TORCH_CHECK(hidden.dim() == 3 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous() && hidden.size(1) > 0,
              "model_prefill: hidden must be a contiguous float32 (batch, L > 0, d_model) tensor");
  check_counts("model_prefill", conv_states, ssm_states, weights, biases);
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.dim() == 1 && workspace.is_contiguous(),
              "model_prefill: workspace must be a flat contiguous float32 tensor");
  const int64_t batch = hidden.size(0), L = hidden.size(1), H = hidden.size(2), rows = batch * L;
  TORCH_CHECK(!mask || (mask->scalar_type() == at::kFloat && mask->is_contiguous() && mask->dim() == 2 &&
                        mask->size(0) == batch && mask->size(1) == L),
              "model_prefill: mask must be a contiguous float32 (batch, L) tensor");
  const float* mp = mask ? mask->data_ptr<float>() : nullptr;
  const int64_t di = n_layer ? weights[5].size(0) : 0, N = n_layer ? weights[5].size(1) : 0;
  const int64_t R = dt_rank + 2 * N;
  const int64_t need = rows * (3 * H + 5 * di + R);
  if (workspace.numel() < need) workspace.resize_({need});
  Carver ws{workspace};
  at::Tensor residual = ws.take(rows, H), normed = ws.take(rows, H), hbuf = ws.take(rows, H);
  at::Tensor xz = ws.take(rows, 2 * di), xc = ws.take(rows, di), x_dbl = ws.take(rows, R);
  at::Tensor delta = ws.take(rows, di), y = ws.take(rows, di);
  const at::TensorOptions opts = hidden.options();
  at::Tensor h = hidden.view({rows, H});
  for (int64_t i = 0; i < n_layer; ++i) {
    const Layer l(weights, biases, i);
    at::Tensor conv_state = conv_states[i], ssm_state = ssm_states[i];
    const int64_t KW = conv_state.size(2), keep = KW - 1;
    const bool tail = last_only && i == n_layer - 1;  // gate and output projection at the last position only
    add_rms_rows(h.data_ptr<float>(), residual.data_ptr<float>(), i == 0, l.norm_w.data_ptr<float>(), eps, rows, H,
                 normed.data_ptr<float>());
    at::Tensor x, z;  // (batch, L, di) time-major views
    if (tail) {  // x only: the first half of xz's space as a contiguous (rows, di)
      at::Tensor xo = xz.view({-1}).narrow(0, 0, rows * di).view({rows, di});
      proj_into(xo, normed, l.in_w.narrow(0, 0, di), part(l.in_b, 0, di));
      x = xo.view({batch, L, di});
    } else {
      proj_into(xz, normed, l.in_w, l.in_b);
      x = xz.view({batch, L, 2 * di}).narrow(2, 0, di);
      z = xz.view({batch, L, 2 * di}).narrow(2, di, di);
    }
    std::optional<at::Tensor> init;
    if (!fresh && keep > 0) init = conv_state.narrow(2, 1, keep).contiguous();
    at::Tensor u = xc.view({batch, L, di});
    if (mp) zero_padding(x, mp);
    olm::conv_fwd_into(x, l.conv_w, l.conv_b, init, true, u);
    if (mp) zero_padding(u, mp);
    if (keep > 0) {  // the last `keep` conv inputs, oldest first
      const at::Tensor xt = x.transpose(1, 2);
      if (L >= keep) {
        conv_state.narrow(2, 1, keep).copy_(xt.narrow(2, L - keep, keep));
      } else {
        const at::Tensor before = init ? *init : at::zeros({batch, di, keep}, opts);
        conv_state.narrow(2, 1, keep).copy_(at::cat({before.narrow(2, L, keep - L), xt}, 2));
      }
    }
    at::mm_out(x_dbl, xc, l.x_w.t());
    at::mm_out(delta, x_dbl.narrow(1, 0, dt_rank), l.dt_w.t());
    const at::Tensor xd = x_dbl.view({batch, 1, L, R});
    std::optional<at::Tensor> x0;
    if (!fresh) x0 = ssm_state.transpose(1, 2).contiguous();
    at::Tensor out = y.view({batch, L, di}), last = at::empty({batch, N, di}, opts);
    const auto gate = tail ? std::nullopt : std::optional(z);
    olm::scan_fwd_into(u, delta.view({batch, L, di}), l.A.t().contiguous(), xd.narrow(3, dt_rank, N),
                       xd.narrow(3, dt_rank + N, N), l.D, gate, l.dt_bias, true, x0, out, last);
    ssm_state.copy_(last.transpose(1, 2));
    if (tail) {
      const at::Tensor nl = normed.view({batch, L, H}).select(1, L - 1);  // (batch, H)
      const at::Tensor zl = proj(nl, l.in_w.narrow(0, di, di), part(l.in_b, di, di));
      h = proj(out.select(1, L - 1) * at::silu(zl), l.out_w, l.out_b);
    } else {
      proj_into(hbuf, y, l.out_w, l.out_b);
      h = hbuf;
    }
  }
  if (last_only) {
    const at::Tensor r = residual.view({batch, L, H}).select(1, L - 1).contiguous();
    const at::Tensor hl = n_layer == 0 ? h.view({batch, L, H}).select(1, L - 1).contiguous() : h;
    auto out = at::empty({batch, H}, opts);
    add_rms(hl.data_ptr<float>(), r.data_ptr<float>(), n_layer == 0, norm_f.data_ptr<float>(), eps, batch, H,
            out.data_ptr<float>());
    return out;
  }
  auto out = at::empty({batch, L, H}, opts);
  add_rms_rows(h.data_ptr<float>(), residual.data_ptr<float>(), n_layer == 0, norm_f.data_ptr<float>(), eps, rows, H,
               out.data_ptr<float>());
  return out;
}

// out (B, N) = x (B, K) @ weight (N, K)^T, float32, for the few rows of a decoding step's LM head: weight is
// streamed once, each row of it (in L1) dotted with every x row. MKL's sgemv for this layout (K short, N a
// vocabulary) ran at a quarter of the memory bandwidth on an AMD EPYC host (7.8 ms for a 50k x 256 head that
// takes 1.7 ms to read), and batch 2 took twice that.
at::Tensor head_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "head_rows: x (B, K) and weight (N, K) expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "head_rows: float32 only");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t B = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto out = at::empty({B, N}, xc.options());
  const float* __restrict__ xp = xc.data_ptr<float>();
  const float* __restrict__ wp = wc.data_ptr<float>();
  float* __restrict__ op = out.data_ptr<float>();
  at::parallel_for(0, N, 512, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* __restrict__ w = wp + n * K;
      for (int64_t b = 0; b < B; ++b) {
        const float* __restrict__ xb = xp + b * K;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += w[k] * xb[k];
        op[b * N + n] = acc;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openlm_mamba_cpu, m) {
  m.def("head_rows(Tensor x, Tensor weight) -> Tensor");
  m.def("conv_step(Tensor(a!) conv_state, Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def(
      "state_step(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? dt_bias, bool softplus) -> Tensor");
  m.def(
      "model_step(Tensor hidden, Tensor(a!)[] conv_states, Tensor(b!)[] ssm_states, Tensor[] weights, "
      "Tensor?[] biases, Tensor norm_f, float eps, int dt_rank) -> Tensor");
  m.def(
      "model_prefill(Tensor hidden, Tensor(a!)[] conv_states, Tensor(b!)[] ssm_states, Tensor[] weights, "
      "Tensor?[] biases, Tensor norm_f, float eps, int dt_rank, bool fresh, bool last_only, Tensor(c!) workspace, "
      "Tensor? mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(openlm_mamba_cpu, CPU, m) {
  m.impl("head_rows", &head_rows);
  m.impl("conv_step", &conv_step);
  m.impl("state_step", &state_step);
  m.impl("model_step", &model_step);
  m.impl("model_prefill", &model_prefill);
}
