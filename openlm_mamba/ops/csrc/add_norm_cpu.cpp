// Residual add + RMSNorm on CPU in one pass over each row (torch: an add, then rms_norm). Registered as
// `openlm_mamba_cpu::add_norm_fwd` / `add_norm_bwd`; compiled with the other kernels by
// openlm_mamba/ops/cpp.py. x float32 or float64; add_norm_fwd converts the others to x's dtype (as
// the reference does), add_norm_bwd wants them in r's dtype.
//   x, residual (..., H)  any leading shape / strides (copied only when the last dim is strided)
//   weight, bias (H,)     bias optional; contiguous for add_norm_bwd
// add_norm_fwd: r = x + residual, out = r * rsqrt(mean(r^2) + eps) * weight + bias, both (..., H)
//   contiguous. The sum of squares is accumulated in double. residual_out is r, or an empty tensor
//   without a residual (r is x itself: the caller keeps x). residual_in_fp32 changes nothing here:
//   for float32 / float64 inputs r is in x's dtype either way.
// add_norm_bwd: from gout = d out and gres = d r (optional), returns [d r, d weight, d bias (when
//   has_bias, else an empty tensor)]; d r is the gradient of x and of the residual alike.

#include <torch/library.h>

#include "common.h"

namespace {

using olm::inv_rms;
using olm::opt_ptr;

constexpr int64_t kGrain = 1 << 14;  // elements per thread at least: a few rows (a decoding step) stay serial

// t as (rows, H) with a unit stride along H (a view when possible).
at::Tensor rows_of(const at::Tensor& t, int64_t H) {
  at::Tensor r = t.reshape({-1, H});
  return (r.stride(1) == 1 || H == 1) ? r : r.contiguous();
}

int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(H, 1)); }

template <typename T>
void fwd_kernel(const at::Tensor& x, const at::Tensor* res, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, double eps, at::Tensor& out, at::Tensor& rout) {
  const int64_t rows = x.size(0), H = x.size(1), sx = x.stride(0);
  const int64_t sr = res ? res->stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  const T* rp = res ? res->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  const T* bp = opt_ptr<T>(bias);
  T* op = out.data_ptr<T>();
  T* rop = res ? rout.data_ptr<T>() : nullptr;
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      olm::add_rms_row<T>(xp + i * sx, rp ? rp + i * sr : nullptr, rop ? rop + i * H : nullptr, wp, bp, eps, H,
                          op + i * H);
  });
}

// Rows are split into at most one chunk per thread; each chunk sums its d weight / d bias in double
// into its own row of `part` (nchunks, 2, H), added up at the end (deterministic for a thread count).
template <typename T>
void bwd_kernel(const at::Tensor& gout, const at::Tensor* gres, const at::Tensor& r, const at::Tensor& weight,
                bool has_bias, double eps, at::Tensor& dr, at::Tensor& dw, at::Tensor& db) {
  const int64_t rows = r.size(0), H = r.size(1), sg = gout.stride(0), sr = r.stride(0);
  const int64_t sgr = gres ? gres->stride(0) : 0;
  const T* gp = gout.data_ptr<T>();
  const T* grp = gres ? gres->data_ptr<T>() : nullptr;
  const T* rp = r.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* dp = dr.data_ptr<T>();
  const int64_t grain = grain_rows(H);
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
  const int64_t per = (rows + nchunks - 1) / nchunks;
  std::vector<double> part(nchunks * 2 * H, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* __restrict__ pw = part.data() + c * 2 * H;
      double* __restrict__ pb = pw + H;
      for (int64_t i = c * per; i < std::min(rows, (c + 1) * per); ++i) {
        const T* __restrict__ g = gp + i * sg;
        const T* __restrict__ rr = rp + i * sr;
        T* __restrict__ d = dp + i * H;
        double ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t h = 0; h < H; ++h) ss += double(rr[h]) * double(rr[h]);
        const T rstd = inv_rms<T>(ss, H, eps);
        double dot = 0;  // sum_h (g w)_h n_h, n = r * rstd
#pragma omp simd reduction(+ : dot)
        for (int64_t h = 0; h < H; ++h) {
          const T n = rr[h] * rstd;
          dot += double(g[h] * wp[h]) * double(n);
          pw[h] += double(g[h]) * double(n);
          pb[h] += double(g[h]);
        }
        const T mean = T(dot / double(H));
        const T* __restrict__ gr = grp ? grp + i * sgr : nullptr;
        if (gr) {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) d[h] = rstd * (g[h] * wp[h] - rr[h] * rstd * mean) + gr[h];
        } else {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) d[h] = rstd * (g[h] * wp[h] - rr[h] * rstd * mean);
        }
      }
    }
  });
  T* wo = dw.data_ptr<T>();
  T* bo = has_bias ? db.data_ptr<T>() : nullptr;
  for (int64_t h = 0; h < H; ++h) {
    double sw = 0, sb = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      sw += part[c * 2 * H + h];
      sb += part[c * 2 * H + H + h];
    }
    wo[h] = T(sw);
    if (bo) bo[h] = T(sb);
  }
}

// t (hidden,) in x's dtype, contiguous (no copy when it already is); none stays none.
std::optional<at::Tensor> param_like(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t) return std::nullopt;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(-1), "add_norm_fwd: ", name, " must be (hidden,)");
  return t->to(x.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> add_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                                                double eps, bool residual_in_fp32) {
  (void)residual_in_fp32;  // r is in x's dtype for both float32 and float64: see the header
  TORCH_CHECK(x.dim() >= 1, "add_norm_fwd: x must have a hidden dim");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "add_norm_fwd: float32 / float64 x");
  const at::Tensor weight = *param_like("weight", weight_in, x);
  const std::optional<at::Tensor> bias = param_like("bias", bias_in, x);
  const int64_t H = x.size(-1);
  const at::Tensor x2 = rows_of(x, H);
  at::Tensor r2;
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "add_norm_fwd: residual must be like x");
    r2 = rows_of(residual->to(x.scalar_type()), H);
  }
  auto out = at::empty(x.sizes(), x.options());
  auto rout = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto out2 = out.view({-1, H}), rout2 = residual ? rout.view({-1, H}) : rout;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_norm_fwd", [&] {
    fwd_kernel<scalar_t>(x2, residual ? &r2 : nullptr, weight, bias, eps, out2, rout2);
  });
  return {out, rout};
}

std::vector<at::Tensor> add_norm_bwd(const at::Tensor& gout, const std::optional<at::Tensor>& gres,
                                     const at::Tensor& r, const at::Tensor& weight, bool has_bias, double eps) {
  TORCH_CHECK(r.dim() >= 1 && (r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble),
              "add_norm_bwd: float32 / float64 r");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == r.size(-1) && weight.is_contiguous() &&
                  weight.scalar_type() == r.scalar_type(),
              "add_norm_bwd: weight must be contiguous (hidden,) in r's dtype");
  TORCH_CHECK(gout.sizes() == r.sizes() && gout.scalar_type() == r.scalar_type(), "add_norm_bwd: gout must be like r");
  const int64_t H = r.size(-1);
  const at::Tensor g2 = rows_of(gout, H), r2 = rows_of(r, H);
  at::Tensor gr2;
  if (gres) {
    TORCH_CHECK(gres->sizes() == r.sizes() && gres->scalar_type() == r.scalar_type(),
                "add_norm_bwd: gres must be like r");
    gr2 = rows_of(*gres, H);
  }
  auto dr = at::empty(r.sizes(), r.options());
  auto dw = at::empty({H}, r.options());
  auto db = has_bias ? at::empty({H}, r.options()) : at::empty({0}, r.options());
  auto dr2 = dr.view({-1, H});
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "add_norm_bwd", [&] {
    bwd_kernel<scalar_t>(g2, gres ? &gr2 : nullptr, r2, weight, has_bias, eps, dr2, dw, db);
  });
  return {dr, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openlm_mamba_cpu, m) {
  m.def(
      "add_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool residual_in_fp32) -> "
      "(Tensor out, Tensor residual_out)");
  m.def("add_norm_bwd(Tensor gout, Tensor? gres, Tensor r, Tensor weight, bool has_bias, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(openlm_mamba_cpu, CPU, m) {
  m.impl("add_norm_fwd", &add_norm_fwd);
  m.impl("add_norm_bwd", &add_norm_bwd);
}
