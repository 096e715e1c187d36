// TP/DTP targets and local gradients, and the feedback reconstruction gradients, in one call each.
// Same math as pcfast/ops/torch_tp.py; the spec is pcfast/reference/tp.py.
//
// DTP keeps each layer's target and activity stacked in one (2B, d) block, [ĥ_l; h_l], so the two
// feedback maps g_l(ĥ_l) and g_l(h_l) are one GEMM sharing Q_l, and the difference
// ĥ_{l-1} = h_{l-1} + g_l(ĥ_l) − g_l(h_l) is its epilogue. The returned targets are the first halves of
// those blocks and the activities copies of the second halves, so no two outputs share memory.
#include "checks.h"
#include "gemm.h"
#include "losses.h"
#include "pcfast.h"

namespace pcfast {
namespace {

// Hidden pre-activations u_l (bias added) and activities h_l = φ(u_l) into the given buffers, for
// layers [0, layers).
template <typename T>
void hidden_layers(const Network& net, const at::Tensor& x, int64_t layers, std::vector<at::Tensor>& u,
                   std::vector<at::Tensor>& h) {
  const Kernels<T>& K = kernels<T>();
  const int64_t batch = x.size(0);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t n = net.widths[l + 1];
    gemm_abt(u[l], l == 0 ? x : h[l - 1], net.weights[l], 1.0, 0.0);
    T* pre = u[l].mutable_data_ptr<T>();
    T* out = h[l].mutable_data_ptr<T>();
    const T* b = ptr_or_null<T>(net.biases[l]);
    const Act act = net.acts[l];
    for_rows(batch, n, [&](int64_t r0, int64_t r1) {
      K.hidden_forward(n, pre, b, nullptr, out, nullptr, nullptr, act, r0, r1);
    });
  }
}

template <typename T>
TPStepOutputs run_tp(const Network& net, const std::vector<at::Tensor>& qs, const std::vector<std::optional<at::Tensor>>& cs,
                 const std::vector<Act>& psis, const at::Tensor& x, const at::Tensor& target, Loss loss, double beta,
                 bool difference) {
  const Kernels<T>& K = kernels<T>();
  const int64_t depth = net.depth(), last = depth - 1, batch = x.size(0);
  const std::vector<int64_t>& d = net.widths;
  const auto opts = x.options();

  // targets[l] = ĥ_l and activities[l] = h_l (f for the readout); stacked for DTP where a feedback
  // map reads them (l >= 1).
  std::vector<at::Tensor> targets(depth), activities(depth), stacked(depth), u(last);
  for (int64_t l = 0; l < depth; ++l) {
    if (difference && l >= 1) {
      stacked[l] = at::empty({2 * batch, d[l + 1]}, opts);
      targets[l] = stacked[l].narrow(0, 0, batch);
      activities[l] = stacked[l].narrow(0, batch, batch);
    } else {
      targets[l] = at::empty({batch, d[l + 1]}, opts);
      activities[l] = at::empty({batch, d[l + 1]}, opts);
    }
  }
  for (int64_t l = 0; l < last; ++l) u[l] = at::empty({batch, d[l + 1]}, opts);
  hidden_layers<T>(net, x, last, u, activities);
  const auto input = [&](int64_t l) -> const at::Tensor& { return l == 0 ? x : activities[l - 1]; };

  // Readout and its target ĥ_L = f + β (−∂ℓ/∂f).
  at::Tensor& f = activities[last];
  gemm_abt(f, input(last), net.weights[last], 1.0, 0.0);
  T* fp = f.mutable_data_ptr<T>();
  T* top = targets[last].mutable_data_ptr<T>();
  output_error<T>(batch, d[depth], fp, ptr_or_null<T>(net.biases[last]), target, loss, top);
  const double loss_total = loss_sum<T>(batch, d[depth], fp, top, target, loss);
  const T beta_t = static_cast<T>(beta);
  for (int64_t i = 0; i < batch * d[depth]; ++i) top[i] = top[i] * beta_t + fp[i];

  for (int64_t l = last; l >= 1; --l) {
    const int64_t n = d[l];  // g_l maps layer l (width d[l+1]) back to layer l-1 (width d[l])
    const T* c = ptr_or_null<T>(cs[l - 1]);
    const Act psi = psis[l - 1];
    T* out = targets[l - 1].mutable_data_ptr<T>();
    if (difference) {
      at::Tensor mapped = at::empty({2 * batch, n}, opts);
      gemm_abt(mapped, stacked[l], qs[l - 1], 1.0, 0.0);
      const T* hat = mapped.const_data_ptr<T>();
      const T* plain = hat + batch * n;
      const T* h = activities[l - 1].const_data_ptr<T>();
      for_rows(batch, n, [&](int64_t r0, int64_t r1) { K.feedback_map(n, hat, plain, c, h, out, psi, r0, r1); });
    } else {
      at::Tensor mapped = at::empty({batch, n}, opts);
      gemm_abt(mapped, targets[l], qs[l - 1], 1.0, 0.0);
      const T* pre = mapped.const_data_ptr<T>();
      for_rows(batch, n, [&](int64_t r0, int64_t r1) { K.feedback_map(n, pre, nullptr, c, nullptr, out, psi, r0, r1); });
    }
  }

  // δ_l = φ'(u_l) ⊙ (ĥ_l − h_l) (no φ' on the readout); ∂/∂W_l = −δ_lᵀ h_{l-1} / B.
  const double scale = -1.0 / static_cast<double>(batch);
  std::vector<at::Tensor> weight_grads;
  std::vector<std::optional<at::Tensor>> bias_grads;
  double local = 0.0;
  for (int64_t l = 0; l < depth; ++l) {
    const int64_t n = d[l + 1];
    at::Tensor delta = at::empty({batch, n}, opts);
    const T* t = targets[l].const_data_ptr<T>();
    const T* h = activities[l].const_data_ptr<T>();
    const T* pre = l < last ? u[l].const_data_ptr<T>() : h;
    T* dp = delta.mutable_data_ptr<T>();
    const Act act = l < last ? net.acts[l] : Act::identity;
    const bool readout = l == last;
    // Serial: the sum of squares is reduced in one fixed order.
    local += 0.5 * K.tp_delta(n, t, h, pre, dp, act, readout, 0, batch) / static_cast<double>(batch);
    at::Tensor g = at::empty({n, d[l]}, opts);
    gemm_atb(g, delta, input(l), scale);
    weight_grads.push_back(g);
    if (net.biases[l].has_value()) {
      bias_grads.emplace_back(column_sums<T>(delta, scale));
    } else {
      bias_grads.emplace_back(std::nullopt);
    }
  }
  // The two halves of a DTP block are separate outputs, which must not alias each other.
  for (int64_t l = 1; difference && l < depth; ++l) activities[l] = activities[l].clone();
  TPStepOutputs out;
  out.targets = std::move(targets);
  out.activities = std::move(activities);
  out.weight_grads = std::move(weight_grads);
  out.bias_grads = std::move(bias_grads);
  out.loss = scalar_result(loss_total / static_cast<double>(batch), opts);
  out.local_loss = scalar_result(local, opts);
  return out;
}

template <typename T>
FeedbackOutputs run_feedback(const Network& net, const std::vector<at::Tensor>& qs,
                             const std::vector<std::optional<at::Tensor>>& cs, const std::vector<Act>& psis,
                             const at::Tensor& x, const std::vector<at::Tensor>& noise) {
  const Kernels<T>& K = kernels<T>();
  const int64_t depth = net.depth(), last = depth - 1, batch = x.size(0);
  const std::vector<int64_t>& d = net.widths;
  const auto opts = x.options();
  std::vector<at::Tensor> u(last), h(last);
  for (int64_t l = 0; l < last; ++l) {
    u[l] = at::empty({batch, d[l + 1]}, opts);
    h[l] = at::empty({batch, d[l + 1]}, opts);
  }
  hidden_layers<T>(net, x, last, u, h);

  const double inv_batch = 1.0 / static_cast<double>(batch);
  std::vector<at::Tensor> weight_grads;
  std::vector<std::optional<at::Tensor>> bias_grads;
  double total = 0.0;
  for (int64_t l = 1; l < depth; ++l) {
    const int64_t n_in = d[l], n_out = d[l + 1];
    // Reconstruct h_in = h_{l-1} + ξ through layer l and back: g_l(f_l(h_in)).
    const at::Tensor h_in = noise[l - 1].defined() ? at::add(h[l - 1], noise[l - 1]) : h[l - 1];
    at::Tensor h_out = at::empty({batch, n_out}, opts);
    at::Tensor pre_out = at::empty({batch, n_out}, opts);
    gemm_abt(pre_out, h_in, net.weights[l], 1.0, 0.0);
    {
      T* pre = pre_out.mutable_data_ptr<T>();
      T* out = h_out.mutable_data_ptr<T>();
      const T* b = ptr_or_null<T>(net.biases[l]);
      const Act act = l < last ? net.acts[l] : Act::identity;
      for_rows(batch, n_out, [&](int64_t r0, int64_t r1) {
        K.hidden_forward(n_out, pre, b, nullptr, out, nullptr, nullptr, act, r0, r1);
      });
    }
    at::Tensor mapped = at::empty({batch, n_in}, opts);
    gemm_abt(mapped, h_out, qs[l - 1], 1.0, 0.0);
    at::Tensor delta = at::empty({batch, n_in}, opts);
    total += 0.5 * inv_batch *
             K.feedback_residual(n_in, mapped.const_data_ptr<T>(), ptr_or_null<T>(cs[l - 1]), h_in.const_data_ptr<T>(),
                                 delta.mutable_data_ptr<T>(), psis[l - 1], 0, batch);
    at::Tensor g = at::empty({n_in, n_out}, opts);
    gemm_atb(g, delta, h_out, inv_batch);
    weight_grads.push_back(g);
    if (cs[l - 1].has_value()) {
      bias_grads.emplace_back(column_sums<T>(delta, inv_batch));
    } else {
      bias_grads.emplace_back(std::nullopt);
    }
  }
  FeedbackOutputs out;
  out.weight_grads = std::move(weight_grads);
  out.bias_grads = std::move(bias_grads);
  out.loss = scalar_result(total, opts);
  return out;
}

}  // namespace

TPStepOutputs::Tuple tp_train_step(at::TensorList weights, const OptTensorList& biases,
                                   std::vector<std::string> activations, at::TensorList feedback_weights,
                                   const OptTensorList& feedback_biases, std::vector<std::string> feedback_activations,
                                   const at::Tensor& x, const at::Tensor& target, double beta, std::string loss,
                                   bool difference) {
  const Network net = check_network(weights, biases, activations);
  std::vector<at::Tensor> qs;
  std::vector<std::optional<at::Tensor>> cs;
  std::vector<Act> psis;
  check_feedback(feedback_weights, feedback_biases, feedback_activations, net, qs, cs, psis);
  const Loss loss_kind = parse_loss(loss);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0, "beta: expected a finite number >= 0, got ", beta);
  const at::Tensor xc = check_input(x, net);
  const at::Tensor yc = check_target(target, loss_kind, net, xc.size(0));
  if (net.dtype == at::kFloat) return run_tp<float>(net, qs, cs, psis, xc, yc, loss_kind, beta, difference).as_tuple();
  return run_tp<double>(net, qs, cs, psis, xc, yc, loss_kind, beta, difference).as_tuple();
}

FeedbackOutputs::Tuple feedback_grads(at::TensorList weights, const OptTensorList& biases,
                                      std::vector<std::string> activations, at::TensorList feedback_weights,
                                      const OptTensorList& feedback_biases,
                                      std::vector<std::string> feedback_activations, const at::Tensor& x,
                                      const OptTensorList& noise) {
  const Network net = check_network(weights, biases, activations);
  std::vector<at::Tensor> qs;
  std::vector<std::optional<at::Tensor>> cs;
  std::vector<Act> psis;
  check_feedback(feedback_weights, feedback_biases, feedback_activations, net, qs, cs, psis);
  const at::Tensor xc = check_input(x, net);
  const int64_t maps = net.depth() - 1;
  // An empty list means no noise; otherwise one entry (None or (B, d_{l-1})) per feedback map.
  TORCH_CHECK_VALUE(noise.size() == 0 || static_cast<int64_t>(noise.size()) == maps, "noise: expected ", maps,
                    " entries (or none), got ", noise.size());
  std::vector<at::Tensor> xi(maps);
  for (int64_t k = 0; k < static_cast<int64_t>(noise.size()); ++k) {
    const std::optional<at::Tensor> e = noise.get(k);
    if (e.has_value() && e->defined()) {
      xi[k] = check_float(*e, "noise[" + std::to_string(k) + "]", net, {xc.size(0), net.widths[k + 1]});
    }
  }
  if (net.dtype == at::kFloat) return run_feedback<float>(net, qs, cs, psis, xc, xi).as_tuple();
  return run_feedback<double>(net, qs, cs, psis, xc, xi).as_tuple();
}

}  // namespace pcfast
