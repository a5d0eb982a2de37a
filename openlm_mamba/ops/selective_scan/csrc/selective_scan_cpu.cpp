// Selective scan on CPU: a loop over time, vectorised over blocks of W channels, parallel over
// (batch, channel block).
//
// Compiled on first use by openlm_mamba/ops/selective_scan/cpu.py (torch.utils.cpp_extension),
// registered as torch ops `openlm_mamba_cpu::scan_fwd` / `scan_bwd`. Layouts (contiguous, one
// dtype: float32 or float64), time-major so that W neighbouring channels are one vector:
//   u, delta, z      (batch, L, dim)      delta raw: bias and softplus are applied here
//   At               (N, dim)             A transposed
//   Bt, Ct           (batch, G, L, N)
//   D, bias (dim,), x0 (batch, N, dim)    optional
// Outputs: out (batch, L, dim), last (batch, N, dim), ck (batch, nc, N, dim): the state entering
// each chunk of K steps. The backward recomputes one chunk's states at a time from ck and runs the
// adjoint recurrence backwards in time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t W = 16;  // channels per vector block

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

template <typename T>
inline T softplus(T v) {
  return v > T(20) ? v : std::log1p(std::exp(v));
}

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

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// Load the block's delta (after bias + softplus) and u for step t; lanes >= wn are zero.
template <typename T>
inline void load_step(const T* __restrict__ dr, const T* __restrict__ ur, const T* __restrict__ bias, bool sp,
                      int64_t wn, T* __restrict__ dt, T* __restrict__ uv, T* __restrict__ raw) {
  for (int64_t w = 0; w < W; ++w) {
    if (w < wn) {
      T v = dr[w] + (bias ? bias[w] : T(0));
      raw[w] = v;
      dt[w] = sp ? softplus(v) : v;
      uv[w] = ur[w];
    } else {
      raw[w] = dt[w] = uv[w] = T(0);
    }
  }
}

template <typename T>
void fwd_kernel(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt,
                const at::Tensor& Ct, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                const std::optional<at::Tensor>& bias_t, bool sp, const std::optional<at::Tensor>& x0, int64_t K,
                at::Tensor& out, at::Tensor& last, at::Tensor& ck) {
  const Dims s = dims_of(u, At, Bt);
  const int64_t L = s.L, dim = s.dim, N = s.N, G = s.G, nc = ck.size(1);
  const T* up = u.data_ptr<T>();
  const T* dp = delta.data_ptr<T>();
  const T* Ap = At.data_ptr<T>();
  const T* Bp = Bt.data_ptr<T>();
  const T* Cp = Ct.data_ptr<T>();
  const T* Dp = opt_ptr<T>(D);
  const T* zp = opt_ptr<T>(z);
  const T* bp = opt_ptr<T>(bias_t);
  const T* x0p = opt_ptr<T>(x0);
  T* op = out.data_ptr<T>();
  T* lp = last.data_ptr<T>();
  T* ckp = ck.data_ptr<T>();
  parallel_dynamic(s.batch * G * s.nblk, [&](int64_t begin, int64_t end) {
    std::vector<T> xbuf(N * W), Abuf(N * W);
    T* __restrict__ x = xbuf.data();
    T* __restrict__ Ab = Abuf.data();
    alignas(64) T dt[W], uv[W], raw[W], y[W], Dv[W], zv[W];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (G * s.nblk), g = (task / s.nblk) % G, k = task % s.nblk;
      const int64_t d0 = g * s.dpg + k * W, wn = std::min(W, g * s.dpg + s.dpg - d0);
      const T* Bg = Bp + (b * G + g) * L * N;
      const T* Cg = Cp + (b * G + g) * L * N;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t w = 0; w < W; ++w) {
          Ab[n * W + w] = w < wn ? Ap[n * dim + d0 + w] : T(0);
          x[n * W + w] = (w < wn && x0p) ? x0p[(b * N + n) * dim + d0 + w] : T(0);
        }
      for (int64_t w = 0; w < W; ++w) Dv[w] = (w < wn && Dp) ? Dp[d0 + w] : T(0);
      for (int64_t t = 0; t < L; ++t) {
        if (t % K == 0) {
          T* c = ckp + ((b * nc + t / K) * N) * dim + d0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t w = 0; w < wn; ++w) c[n * dim + w] = x[n * W + w];
        }
        const int64_t row = (b * L + t) * dim + d0;
        load_step<T>(dp + row, up + row, bp ? bp + d0 : nullptr, sp, wn, dt, uv, raw);
        const T* Bv = Bg + t * N;
        const T* Cv = Cg + t * N;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) y[w] = Dv[w] * uv[w];
        for (int64_t n = 0; n < N; ++n) {
          const T Bn = Bv[n], Cn = Cv[n];
          T* __restrict__ xn = x + n * W;
          const T* __restrict__ An = Ab + n * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            const T v = std::exp(dt[w] * An[w]) * xn[w] + dt[w] * uv[w] * Bn;
            xn[w] = v;
            y[w] += Cn * v;
          }
        }
        T* orow = op + row;
        if (zp) {
          const T* zr = zp + row;
          for (int64_t w = 0; w < W; ++w) zv[w] = w < wn ? zr[w] : T(0);
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) y[w] *= zv[w] / (T(1) + std::exp(-zv[w]));
        }
        for (int64_t w = 0; w < wn; ++w) orow[w] = y[w];
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
  const T* up = u.data_ptr<T>();
  const T* dp = delta.data_ptr<T>();
  const T* Ap = At.data_ptr<T>();
  const T* Bp = Bt.data_ptr<T>();
  const T* Cp = Ct.data_ptr<T>();
  const T* Dp = opt_ptr<T>(D);
  const T* zp = opt_ptr<T>(z);
  const T* bp = opt_ptr<T>(bias_t);
  const T* ckp = ck.data_ptr<T>();
  T* dup = du.data_ptr<T>();
  T* ddp = ddelta.data_ptr<T>();
  T* dAp = dA_b.data_ptr<T>();
  T* dBp = dB_p.data_ptr<T>();
  T* dCp = dC_p.data_ptr<T>();
  T* dDp = dD_b.data_ptr<T>();
  T* dbp = dbias_b.data_ptr<T>();
  T* dzp = zp ? dz.data_ptr<T>() : nullptr;
  T* dx0p = dx0.data_ptr<T>();
  parallel_dynamic(s.batch * G * P, [&](int64_t begin, int64_t end) {
    std::vector<T> xs_buf((K + 1) * N * W), e_buf(K * N * W), h_buf(N * W), dA_buf(N * W), A_buf(N * W);
    std::vector<T> dt_buf(K * W), u_buf(K * W), raw_buf(K * W);
    T* __restrict__ xs = xs_buf.data();
    T* __restrict__ e = e_buf.data();
    T* __restrict__ h = h_buf.data();
    T* __restrict__ dAacc = dA_buf.data();
    T* __restrict__ Ab = A_buf.data();
    T* __restrict__ dtc = dt_buf.data();
    T* __restrict__ uc = u_buf.data();
    T* __restrict__ rawc = raw_buf.data();
    alignas(64) T dy[W], duv[W], ddt[W], dDacc[W], dbacc[W], Dv[W], y[W], zv[W], gv[W], dzv[W];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (G * P), g = (task / P) % G, p = task % P;
      const T* Bg = Bp + (b * G + g) * L * N;
      const T* Cg = Cp + (b * G + g) * L * N;
      T* dBg = dBp + task * L * N;  // (batch, G, P, L, N)
      T* dCg = dCp + task * L * N;
      for (int64_t k = p * per; k < std::min(s.nblk, (p + 1) * per); ++k) {
        const int64_t d0 = g * s.dpg + k * W, wn = std::min(W, g * s.dpg + s.dpg - d0);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t w = 0; w < W; ++w) {
            Ab[n * W + w] = w < wn ? Ap[n * dim + d0 + w] : T(0);
            h[n * W + w] = (w < wn && glp) ? glp[(b * N + n) * dim + d0 + w] : T(0);
            dAacc[n * W + w] = 0;
          }
        for (int64_t w = 0; w < W; ++w) {
          Dv[w] = (w < wn && Dp) ? Dp[d0 + w] : T(0);
          dDacc[w] = dbacc[w] = 0;
        }
        for (int64_t c = nc - 1; c >= 0; --c) {
          const int64_t t0 = c * K, len = std::min(K, L - t0);
          const T* start = ckp + ((b * nc + c) * N) * dim + d0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t w = 0; w < W; ++w) xs[n * W + w] = w < wn ? start[n * dim + w] : T(0);
          for (int64_t i = 0; i < len; ++i) {  // recompute the chunk's states
            const int64_t t = t0 + i, row = (b * L + t) * dim + d0;
            T* dti = dtc + i * W;
            T* ui = uc + i * W;
            load_step<T>(dp + row, up + row, bp ? bp + d0 : nullptr, sp, wn, dti, ui, rawc + i * W);
            const T* Bv = Bg + t * N;
            for (int64_t n = 0; n < N; ++n) {
              const T Bn = Bv[n];
              const T* __restrict__ xp = xs + (i * N + n) * W;
              T* __restrict__ xn = xs + ((i + 1) * N + n) * W;
              T* __restrict__ en = e + (i * N + n) * W;
              const T* __restrict__ An = Ab + n * W;
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) {
                const T ev = std::exp(dti[w] * An[w]);
                en[w] = ev;
                xn[w] = ev * xp[w] + dti[w] * ui[w] * Bn;
              }
            }
          }
          for (int64_t i = len - 1; i >= 0; --i) {  // adjoint recurrence, backwards in time
            const int64_t t = t0 + i, row = (b * L + t) * dim + d0;
            const T* dti = dtc + i * W;
            const T* ui = uc + i * W;
            const T* Bv = Bg + t * N;
            const T* Cv = Cg + t * N;
            const T* gr = gp + row;
            if (zp) {
              const T* zr = zp + row;
              for (int64_t w = 0; w < W; ++w) y[w] = Dv[w] * ui[w];
              for (int64_t n = 0; n < N; ++n) {
                const T Cn = Cv[n];
                const T* __restrict__ xc = xs + ((i + 1) * N + n) * W;
#pragma omp simd
                for (int64_t w = 0; w < W; ++w) y[w] += Cn * xc[w];
              }
              for (int64_t w = 0; w < W; ++w) {
                zv[w] = w < wn ? zr[w] : T(0);
                gv[w] = w < wn ? gr[w] : T(0);
              }
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) {
                const T zt = zv[w], sg = T(1) / (T(1) + std::exp(-zt)), gt = gv[w];
                dy[w] = gt * zt * sg;
                dzv[w] = gt * y[w] * sg * (T(1) + zt * (T(1) - sg));
              }
              for (int64_t w = 0; w < wn; ++w) dzp[row + w] = dzv[w];
            } else {
              for (int64_t w = 0; w < W; ++w) dy[w] = w < wn ? gr[w] : T(0);
            }
            for (int64_t w = 0; w < W; ++w) {
              dDacc[w] += dy[w] * ui[w];
              duv[w] = dy[w] * Dv[w];
              ddt[w] = 0;
            }
            T* dBv = dBg + t * N;
            T* dCv = dCg + t * N;
            for (int64_t n = 0; n < N; ++n) {
              const T Bn = Bv[n], Cn = Cv[n];
              const T* __restrict__ xc = xs + ((i + 1) * N + n) * W;
              const T* __restrict__ xp = xs + (i * N + n) * W;
              const T* __restrict__ en = e + (i * N + n) * W;
              const T* __restrict__ An = Ab + n * W;
              T* __restrict__ hn = h + n * W;
              T* __restrict__ dAn = dAacc + n * W;
              T sC = 0, sB = 0;
#pragma omp simd reduction(+ : sC, sB)
              for (int64_t w = 0; w < W; ++w) {
                const T hv = hn[w] + dy[w] * Cn;
                sC += dy[w] * xc[w];
                sB += hv * dti[w] * ui[w];
                duv[w] += dti[w] * hv * Bn;
                const T ex = en[w] * xp[w];
                ddt[w] += hv * (An[w] * ex + Bn * ui[w]);
                dAn[w] += hv * dti[w] * ex;
                hn[w] = en[w] * hv;
              }
              dCv[n] += sC;
              dBv[n] += sB;
            }
            const T* rawi = rawc + i * W;
            if (sp) {
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) ddt[w] *= T(1) / (T(1) + std::exp(-rawi[w]));  // softplus'
            }
            for (int64_t w = 0; w < W; ++w) dbacc[w] += ddt[w];
            for (int64_t w = 0; w < wn; ++w) {
              ddp[row + w] = ddt[w];
              dup[row + w] = duv[w];
            }
          }
        }
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

std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At,
                                 const at::Tensor& Bt, const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const std::optional<at::Tensor>& x0, int64_t K) {
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2), N = At.size(0);
  const int64_t nc = (L + K - 1) / K;
  auto out = at::empty({batch, L, dim}, u.options());
  auto last = at::empty({batch, N, dim}, u.options());
  auto ck = at::empty({batch, nc, N, dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_fwd", [&] {
    fwd_kernel<scalar_t>(u, delta, At, Bt, Ct, D, z, bias, softplus, x0, K, out, last, ck);
  });
  return {out, last, ck};
}

std::vector<at::Tensor> scan_bwd(const at::Tensor& gout, const std::optional<at::Tensor>& glast, const at::Tensor& u,
                                 const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bt,
                                 const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const at::Tensor& ck, int64_t K, int64_t P) {
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2), N = At.size(0), G = Bt.size(1);
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(u);
  auto dA_b = at::empty({batch, N, dim}, u.options());
  auto dB_p = at::zeros({batch, G, P, L, N}, u.options());
  auto dC_p = at::zeros({batch, G, P, L, N}, u.options());
  auto dD_b = at::empty({batch, dim}, u.options());
  auto dbias_b = at::empty({batch, dim}, u.options());
  auto dz = z ? at::empty_like(u) : at::empty({0}, u.options());
  auto dx0 = at::empty({batch, N, dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_bwd", [&] {
    bwd_kernel<scalar_t>(gout, glast, u, delta, At, Bt, Ct, D, z, bias, softplus, ck, K, P, du, ddelta, dA_b, dB_p,
                         dC_p, dD_b, dbias_b, dz, dx0);
  });
  return {du, ddelta, dA_b, dB_p, dC_p, dD_b, dbias_b, dz, dx0};
}

}  // namespace

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
