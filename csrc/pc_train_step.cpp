// One predictive-coding train step in one call: forward initialisation, the whole T-step relaxation
// (jacobi or sequential, with or without the fixed-prediction assumption) and the local weight
// gradients. Same math and step order as pcfast/ops/torch_pc.py; the spec is pcfast/reference/pc.py.
//
// Per step and hidden layer there is one GEMM for the top-down term ε_{l+1} W_{l+1} and (without
// FPA) one for the prediction; layer 1's prediction x W_1ᵀ + b_1 is constant and computed once.
// Everything else is one fused pass per layer (kernels.h): the latent update, the new error, and
// φ(z) (with φ'(z) for gelu) for the next GEMM. Jacobi writes ε_l = z_l − b_l in that pass and the
// prediction GEMM subtracts φ(z_{l-1}) W_lᵀ in place (beta = 1), so no pass is spent on the error.
// φ'(z) is read back from φ(z) (tanh: 1 − φ², sigmoid: φ(1 − φ), relu: φ > 0), so only gelu keeps a
// slope buffer. All buffers are allocated once per call.
//
// Inference control (DESIGN §3), each only when asked: the update pass also sums ‖Δz_l‖² (for
// adaptive stopping and the trace's gradient norms), the loop ends after the step that meets the
// stopping test, and F's terms are evaluated for the trace rows and before the last step. Without
// FPA a sequential sweep leaves the errors above each layer stale; they are refreshed before such an
// evaluation, and the next sweep then reuses the refreshed predictions instead of recomputing them.
#include "checks.h"
#include "gemm.h"
#include "losses.h"
#include "pcfast.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace pcfast {
namespace {

template <typename T>
PCStepOutputs run(const Network& net, const at::Tensor& x, const at::Tensor& target, Loss loss,
              const std::vector<double>& gammas, int64_t steps, double kappa, bool sequential, bool fpa,
              bool return_trajectory, std::optional<double> tol, bool return_trace, bool check_divergence) {
  const Kernels<T>& K = kernels<T>();
  const int64_t depth = net.depth(), hidden = depth - 1, batch = x.size(0);
  const std::vector<int64_t>& d = net.widths;  // layer l (0-based) maps d[l] → d[l+1]
  const auto& W = net.weights;
  const auto opts = x.options();
  const auto bias = [&](int64_t l) { return ptr_or_null<T>(net.biases[l]); };

  std::vector<at::Tensor> z(hidden), post(hidden), slope(hidden), td(hidden), err(depth), pred(depth);
  for (int64_t k = 0; k < hidden; ++k) {
    z[k] = at::empty({batch, d[k + 1]}, opts);
    post[k] = at::empty({batch, d[k + 1]}, opts);
    td[k] = at::empty({batch, d[k + 1]}, opts);
    if (net.acts[k] == Act::gelu) slope[k] = at::empty({batch, d[k + 1]}, opts);
  }
  for (int64_t l = 0; l < depth; ++l) err[l] = at::empty({batch, d[l + 1]}, opts);
  // pred[0]: layer 1's constant prediction; pred[l], 0 < l < L: scratch for the sequential sweep.
  if (hidden > 0) pred[0] = at::empty({batch, d[1]}, opts);
  if (sequential && !fpa) {
    for (int64_t l = 1; l < hidden; ++l) pred[l] = at::empty({batch, d[l + 1]}, opts);
  }
  at::Tensor f = at::empty({batch, d[depth]}, opts);
  const auto input = [&](int64_t l) -> const at::Tensor& { return l == 0 ? x : post[l - 1]; };
  const auto data = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; };

  auto refresh_output = [&] {
    gemm_abt(f, input(hidden), W[hidden], 1.0, 0.0);
    output_error<T>(batch, d[depth], data(f), bias(hidden), target, loss, data(err[hidden]));
  };

  // Forward initialisation: z_l = u_l, ε_l = 0 for l < L, ε_L = −∂ℓ/∂f_0.
  for (int64_t k = 0; k < hidden; ++k) {
    at::Tensor& pre = k == 0 ? pred[0] : z[k];
    gemm_abt(pre, input(k), W[k], 1.0, 0.0);
    T *p = data(pre), *zk = k == 0 ? data(z[0]) : nullptr, *pk = data(post[k]), *sk = data(slope[k]);
    T* ek = data(err[k]);
    const T* bk = bias(k);
    const Act act = net.acts[k];
    for_rows(batch, d[k + 1], [&](int64_t r0, int64_t r1) { K.hidden_forward(d[k + 1], p, bk, zk, pk, sk, ek, act, r0, r1); });
  }
  refresh_output();
  const double loss0 = loss_sum<T>(batch, d[depth], data(f), data(err[hidden]), target, loss);

  std::vector<at::Tensor> trajectory;
  const auto record = [&](int64_t t) {
    for (int64_t k = 0; k < hidden; ++k) {
      std::memcpy(trajectory[k].mutable_data_ptr<T>() + t * z[k].numel(), z[k].const_data_ptr<T>(),
                  sizeof(T) * z[k].numel());
    }
  };
  if (return_trajectory) {
    for (int64_t k = 0; k < hidden; ++k) trajectory.push_back(at::empty({steps + 1, batch, d[k + 1]}, opts));
    record(0);
  }

  // ‖Δz_l‖² of each hidden layer in the last step: wanted by adaptive stopping and the trace.
  const bool squares = tol.has_value() || return_trace;
  std::vector<double> sq(hidden, 0.0);

  // z_l ← z_l − (κ/γ_l)(γ_l ε_l − γ_{l+1} φ'(z_l) ⊙ (ε_{l+1} W_{l+1})).
  const auto update = [&](int64_t k, UpdateMode mode, const T* base, const T* offset_bias) {
    UpdateArgs<T> a{d[k + 1],
                    data(z[k]),
                    data(td[k]),
                    data(err[k]),
                    data(post[k]),
                    data(slope[k]),
                    base,
                    offset_bias,
                    static_cast<T>(kappa * gammas[k + 1] / gammas[k]),
                    static_cast<T>(kappa),
                    net.acts[k],
                    mode,
                    squares};
    if (squares) {
      sq[k] = sum_rows(batch, d[k + 1], [&](int64_t r0, int64_t r1) { return K.pc_update(a, r0, r1); });
    } else {
      for_rows(batch, d[k + 1], [&](int64_t r0, int64_t r1) { K.pc_update(a, r0, r1); });
    }
  };

  // Sequential without FPA: `stale` after a sweep (the errors above each updated layer and the
  // output are behind the latents), `refreshed` after refresh() until the next sweep (pred[k] and f
  // are those of the current activities, which the sweep would recompute bit for bit).
  bool stale = false, refreshed = false;
  const auto refresh = [&] {
    if (!stale) return;
    for (int64_t k = 0; k < hidden; ++k) {
      if (k > 0) gemm_abt(pred[k], post[k - 1], W[k], 1.0, 0.0);
      T *ek = data(err[k]), *zk = data(z[k]), *pk = data(pred[k]);
      const T* bk = k == 0 ? nullptr : bias(k);
      for_rows(batch, d[k + 1], [&](int64_t r0, int64_t r1) { K.residual(d[k + 1], ek, zk, pk, bk, r0, r1); });
    }
    refresh_output();
    stale = false;
    refreshed = true;
  };
  // F's term of each layer at the current state (γ_l/2 ‖ε_l‖², γ_L Σ ℓ); under FPA f still holds
  // f_0 and ε_L its error, the reference's frozen prediction.
  const auto energy_terms = [&](double* out) {
    refresh();
    for (int64_t k = 0; k < hidden; ++k) out[k] = 0.5 * gammas[k] * sum_squares<T>(err[k]);
    out[hidden] = gammas[hidden] * loss_sum<T>(batch, d[depth], data(f), data(err[hidden]), target, loss);
  };
  const auto energy_now = [&] {
    std::vector<double> terms(depth);
    energy_terms(terms.data());
    double total = 0.0;
    for (double term : terms) total += term;
    return total;
  };

  at::Tensor trace_energy, trace_grad_norm;
  std::vector<double> row(depth);
  const auto record_energy = [&](int64_t t) {
    energy_terms(row.data());
    T* out = trace_energy.mutable_data_ptr<T>() + t * depth;
    for (int64_t l = 0; l < depth; ++l) out[l] = static_cast<T>(row[l]);
  };
  if (return_trace) {
    trace_energy = at::full({steps + 1, depth}, std::numeric_limits<double>::quiet_NaN(), opts);
    trace_grad_norm = at::full({steps, hidden}, std::numeric_limits<double>::quiet_NaN(), opts);
    record_energy(0);
  }

  int64_t taken = steps;
  double largest = 0.0, energy_prev = 0.0;
  for (int64_t t = 0; t < steps; ++t) {
    if (check_divergence && t == steps - 1) energy_prev = energy_now();
    if (hidden == 0) {
      // Nothing to relax: the step changes nothing (and adaptive stopping stops after it).
    } else if (!sequential) {
      for (int64_t k = 0; k < hidden; ++k) gemm_ab(td[k], err[k + 1], W[k + 1]);
      for (int64_t k = 0; k < hidden; ++k) {
        if (fpa) {
          update(k, UpdateMode::fpa, nullptr, nullptr);  // predictions frozen: ε_l moves with z_l
        } else {
          // Writes ε_l = z_l − b_l (layer 1: z_1 − its constant prediction) for the GEMM below.
          update(k, UpdateMode::jacobi, k == 0 ? data(pred[0]) : nullptr, k == 0 ? nullptr : bias(k));
        }
      }
      if (!fpa) {
        for (int64_t k = 1; k < hidden; ++k) gemm_abt(err[k], post[k - 1], W[k], -1.0, 1.0);
        refresh_output();
      }
    } else {
      if (!fpa && !refreshed) refresh_output();  // φ(z_{L-1}) is fresh: the update pass wrote it
      for (int64_t k = hidden - 1; k >= 0; --k) {
        const T* base = nullptr;
        if (!fpa) {
          if (k > 0 && !refreshed) gemm_abt(pred[k], post[k - 1], W[k], 1.0, 0.0);
          base = data(pred[k]);
        }
        gemm_ab(td[k], err[k + 1], W[k + 1]);
        // Layer k's prediction does not depend on z_k, so ε_k moves with z_k; the next layer down
        // reads this fresh ε_k in its top-down term.
        update(k, fpa ? UpdateMode::fpa : UpdateMode::sequential, base, fpa || k == 0 ? nullptr : bias(k));
      }
      stale = !fpa;
      refreshed = false;
    }
    if (return_trajectory) record(t + 1);
    if (return_trace) {
      // ‖∂F/∂z_l‖ = ‖Δz_l‖ γ_l / κ.
      T* out = trace_grad_norm.mutable_data_ptr<T>() + t * hidden;
      for (int64_t k = 0; k < hidden; ++k) out[k] = static_cast<T>(std::sqrt(sq[k]) * gammas[k] / kappa);
      record_energy(t + 1);
    }
    if (tol.has_value()) {
      // Stop after the first step with ‖Δz_t‖ ≤ tol · max_{u≤t} ‖Δz_u‖ (a NaN size never stops).
      double total = 0.0;
      for (double s2 : sq) total += s2;
      const double size = std::sqrt(total);
      largest = std::max(largest, size);
      if (size <= *tol * largest) {
        taken = t + 1;
        break;
      }
    }
  }
  if (return_trajectory) {
    for (int64_t t = taken + 1; t <= steps; ++t) record(t);  // the final state, after a stop
  }
  refresh();  // a sweep leaves the errors above each layer stale

  // Weight gradients at the final state: −γ_l ε_lᵀ a_{l-1} / B (a: x, φ(z_1), …; FPA keeps φ(u)).
  std::vector<at::Tensor> weight_grads;
  std::vector<std::optional<at::Tensor>> bias_grads;
  for (int64_t l = 0; l < depth; ++l) {
    const double scale = -gammas[l] / static_cast<double>(batch);
    at::Tensor g = at::empty({d[l + 1], d[l]}, opts);
    gemm_atb(g, err[l], input(l), scale);
    weight_grads.push_back(g);
    if (net.biases[l].has_value()) {
      bias_grads.emplace_back(column_sums<T>(err[l], scale));
    } else {
      bias_grads.emplace_back(std::nullopt);
    }
  }

  // F at the final state.
  const double energy = energy_now();

  PCStepOutputs out;
  out.latents = std::move(z);
  out.errors = std::move(err);
  out.weight_grads = std::move(weight_grads);
  out.bias_grads = std::move(bias_grads);
  out.energy = scalar_result(energy, opts);
  out.loss = scalar_result(loss0 / static_cast<double>(batch), opts);
  out.trajectory = std::move(trajectory);
  out.steps = at::scalar_tensor(taken, opts.dtype(at::kLong));
  out.trace_energy = return_trace ? std::move(trace_energy) : at::empty({0}, opts);
  out.trace_grad_norm = return_trace ? std::move(trace_grad_norm) : at::empty({0}, opts);
  // F before the last step when all T steps ran, else (stopped early, or T = 0) F at the final state.
  out.energy_prev = check_divergence ? scalar_result(taken == steps && steps > 0 ? energy_prev : energy, opts)
                                     : at::empty({0}, opts);
  return out;
}

}  // namespace

PCStepOutputs::Tuple pc_train_step(at::TensorList weights, const OptTensorList& biases,
                                   std::vector<std::string> activations, const at::Tensor& x, const at::Tensor& target,
                                   std::vector<double> precisions, int64_t inference_steps, double inference_lr,
                                   std::string schedule, bool fpa, std::string loss, bool return_trajectory,
                                   std::optional<double> inference_tol, bool return_trace, bool check_divergence) {
  const Network net = check_network(weights, biases, activations);
  const Loss loss_kind = parse_loss(loss);
  TORCH_CHECK_VALUE(schedule == "jacobi" || schedule == "sequential",
                    "schedule: expected 'jacobi' or 'sequential', got '", schedule, "'");
  TORCH_CHECK_VALUE(inference_steps >= 0, "inference_steps: expected an int >= 0, got ", inference_steps);
  TORCH_CHECK_VALUE(std::isfinite(inference_lr) && inference_lr > 0,
                    "inference_lr: expected a finite number > 0, got ", inference_lr);
  TORCH_CHECK_VALUE(static_cast<int64_t>(precisions.size()) == net.depth(), "precisions: expected ", net.depth(),
                    " values (γ_1 … γ_L), got ", precisions.size());
  for (size_t l = 0; l < precisions.size(); ++l) {
    TORCH_CHECK_VALUE(std::isfinite(precisions[l]) && precisions[l] > 0, "precisions[", l,
                      "]: expected a finite positive number, got ", precisions[l]);
  }
  if (inference_tol.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*inference_tol) && *inference_tol >= 0 && *inference_tol < 1,
                      "inference_tol: expected None or a number in [0, 1), got ", *inference_tol);
  }
  const at::Tensor xc = check_input(x, net);
  const at::Tensor yc = check_target(target, loss_kind, net, xc.size(0));
  if (return_trace) {
    TORCH_CHECK_VALUE(inference_steps < (int64_t{1} << 40) / net.depth(),
                      "inference_steps: a trace of ", inference_steps, " steps would not fit in memory");
  }
  if (return_trajectory) {
    int64_t per_step = 0;
    for (int64_t l = 1; l < net.depth(); ++l) per_step += xc.size(0) * net.widths[l];
    TORCH_CHECK_VALUE(inference_steps < (int64_t{1} << 40) / std::max<int64_t>(per_step, 1),
                      "inference_steps: a trajectory of ", inference_steps, " steps would not fit in memory");
  }
  const bool sequential = schedule == "sequential";
  if (net.dtype == at::kFloat) {
    return run<float>(net, xc, yc, loss_kind, precisions, inference_steps, inference_lr, sequential, fpa,
                      return_trajectory, inference_tol, return_trace, check_divergence)
        .as_tuple();
  }
  return run<double>(net, xc, yc, loss_kind, precisions, inference_steps, inference_lr, sequential, fpa,
                     return_trajectory, inference_tol, return_trace, check_divergence)
      .as_tuple();
}

}  // namespace pcfast
