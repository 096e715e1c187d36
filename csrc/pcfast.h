// Shared declarations of the pcfast C++ CPU engine (pcfast._C).
//
// The engine runs a whole PC train step (relaxation + local gradients) or a TP/DTP train step in one
// call. GEMMs go to ATen's BLAS; the elementwise work between them is a handful of fused,
// vectorised loops (kernels.h) compiled for several instruction sets and picked at run time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace pcfast {

// A double accumulated by the engine as a 0-d tensor of ``opts``' dtype. Out-of-range values become
// ±inf, as a float cast would, instead of the error at::scalar_tensor raises: a diverging step must
// reach the optimizer's DivergenceError check, not fail inside the engine.
inline at::Tensor scalar_result(double value, const at::TensorOptions& opts) {
  return at::scalar_tensor(value, opts.dtype(at::kDouble)).to(opts.dtype());
}

// Activation φ by name: the same set, with the same definitions, as pcfast/activations.py.
enum class Act : int { identity = 0, tanh = 1, relu = 2, sigmoid = 3, gelu = 4 };

// The loss ℓ of the readout: MSE ½‖y − f‖² against float targets, CE against int64 labels.
enum class Loss : int { mse = 0, ce = 1 };

// How pc_update forms ε and what it writes back (see kernels.h).
enum class UpdateMode : int {
  jacobi = 0,      // ε read from err; writes z, φ(z), and err = z_new − base − bias (GEMM finishes it)
  fpa = 1,         // ε read from err; writes z and err = ε + step (predictions frozen)
  sequential = 2,  // ε = z − base − bias; writes z, φ(z), and err = ε + step
};

// Arguments of the fused latent update of one hidden layer, over rows [r0, r1) of a (rows, cols)
// row-major block. step = (td · φ'(z)) · coef − kappa · ε;  z ← z + step. With `squares` the pass
// also returns Σ step² over its rows (‖Δz‖², for adaptive stopping and the trace); else 0.
template <typename T>
struct UpdateArgs {
  int64_t cols;
  T* z;             // latents z_l (in/out)
  const T* td;      // top-down term ε_{l+1} W_{l+1}
  T* err;           // ε_l (in for jacobi/fpa, out for all)
  T* post;          // φ(z_l): read for φ'(z_l) (all but gelu), rewritten unless fpa
  T* slope;         // φ'(z_l), only for gelu (read, rewritten unless fpa); else null
  const T* base;    // (rows, cols) prediction subtracted from z, or null
  const T* bias;    // (cols,) subtracted from z, or null
  T coef;           // κ γ_{l+1} / γ_l
  T kappa;          // κ
  Act act;
  UpdateMode mode;
  bool squares;     // return Σ step²
};

// The kernel table of one instruction set (see kernels.cpp). Row ranges are [r0, r1).
template <typename T>
struct Kernels {
  // Returns Σ step² over the rows when a.squares, else 0.
  double (*pc_update)(const UpdateArgs<T>& a, int64_t r0, int64_t r1);
  // pre += bias; z = pre (if z); post = φ(pre); slope = φ'(pre) (if slope); err = 0 (if err).
  void (*hidden_forward)(int64_t cols, T* pre, const T* bias, T* z, T* post, T* slope, T* err, Act act,
                         int64_t r0, int64_t r1);
  // err = z − base − bias (base, bias nullable).
  void (*residual)(int64_t cols, T* err, const T* z, const T* base, const T* bias, int64_t r0, int64_t r1);
  // out = ψ(pre + bias), or with pre2: out = (ψ(pre + bias) − ψ(pre2 + bias)) + add.
  void (*feedback_map)(int64_t cols, const T* pre, const T* pre2, const T* bias, const T* add, T* out, Act act,
                       int64_t r0, int64_t r1);
  // diff = target − h; delta = diff · φ'(u) (φ' from h or u; identity when act is null-like);
  // returns Σ diff².
  double (*tp_delta)(int64_t cols, const T* target, const T* h, const T* u, T* delta, Act act, bool readout,
                     int64_t r0, int64_t r1);
  // p = pre + bias; r = ψ(p) − h_in; delta = r · ψ'(p); returns Σ r².
  double (*feedback_residual)(int64_t cols, const T* pre, const T* bias, const T* h_in, T* delta, Act act,
                              int64_t r0, int64_t r1);
  // value = φ(u), slope = φ'(u) over n elements (for tests of the activation math).
  void (*activate)(int64_t n, const T* u, T* value, T* slope, Act act);
};

// Kernels for the best instruction set this CPU supports (chosen once).
template <typename T>
const Kernels<T>& kernels();

// Name of the instruction set the kernels use ("avx512", "avx2" or "baseline"): the best the CPU
// supports, or a lower one named by the environment variable PCFAST_CPP_ISA.
const char* kernel_isa();

// Switch the kernels to instruction set `name` (capped at what the CPU supports), for tests and
// benchmarks. Not meant to race with running ops.
void set_kernel_isa(const std::string& name);

// Rows per parallel chunk for a (rows, cols) elementwise pass.
int64_t row_grain(int64_t cols);

// Run fn(r0, r1) over [0, rows), in parallel (ATen's thread pool) when the block is large enough.
template <typename F>
inline void for_rows(int64_t rows, int64_t cols, const F& fn) {
  const int64_t grain = row_grain(cols);
  if (rows <= grain) {
    fn(int64_t{0}, rows);
  } else {
    at::parallel_for(0, rows, grain, fn);
  }
}

// Σ over [0, rows) of fn(r0, r1) -> double, in parallel when the block is large enough (the chunks
// and the order of their sum depend only on rows, cols and the thread count).
template <typename F>
inline double sum_rows(int64_t rows, int64_t cols, const F& fn) {
  const int64_t grain = row_grain(cols);
  if (rows <= grain) return fn(int64_t{0}, rows);
  return at::parallel_reduce(
      0, rows, grain, 0.0, [&](int64_t r0, int64_t r1, double identity) { return identity + fn(r0, r1); },
      [](double a, double b) { return a + b; });
}

// ---------------------------------------------------------------------------------------------
// Ops (registered in pcfast.cpp).

using OptTensorList = c10::List<std::optional<at::Tensor>>;
using Tensors = std::vector<at::Tensor>;
using OptTensors = std::vector<std::optional<at::Tensor>>;

// Each op's results by name, with the fields in the order of the returns of its schema (pcfast.cpp);
// as_tuple() is what the op hands the dispatcher. Python reads the tuple back by the schema's names.
struct PCStepOutputs {
  Tensors latents;          // z_1 … z_{L-1} after the relaxation
  Tensors errors;           // ε_1 … ε_L at the final state
  Tensors weight_grads;     // ∂F/∂W_l, batch mean
  OptTensors bias_grads;    // ∂F/∂b_l, batch mean; none where the layer has no bias
  at::Tensor energy;        // F at the final state, summed over the batch (0-dim)
  at::Tensor loss;          // feedforward loss ℓ(f_0, y), mean over the batch (0-dim)
  Tensors trajectory;       // per hidden layer, (T+1, B, d_l) latents after steps 0 … T; empty if not asked
  at::Tensor steps;         // inference steps taken (0-dim int64): T unless inference_tol stopped earlier
  at::Tensor trace_energy;  // (T+1, L) F's term of each layer after t steps, NaN after a stop; (0,) if not asked
  at::Tensor trace_grad_norm;  // (T, L−1) ‖∂F/∂z_l‖ used by step t, NaN after a stop; (0,) if not asked
  at::Tensor energy_prev;   // F before the last step if all T ran, else F at the final state (0-dim); (0,) if not asked
  using Tuple = std::tuple<Tensors, Tensors, Tensors, OptTensors, at::Tensor, at::Tensor, Tensors, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;
  Tuple as_tuple() && {
    return {std::move(latents),    std::move(errors), std::move(weight_grads), std::move(bias_grads),
            std::move(energy),     std::move(loss),   std::move(trajectory),   std::move(steps),
            std::move(trace_energy), std::move(trace_grad_norm), std::move(energy_prev)};
  }
};

struct TPStepOutputs {
  Tensors targets;          // ĥ_1 … ĥ_L
  Tensors activities;       // h_1 … h_{L-1}, f
  Tensors weight_grads;
  OptTensors bias_grads;
  at::Tensor loss;          // feedforward loss, mean over the batch (0-dim)
  at::Tensor local_loss;    // Σ_l ½‖ĥ_l − h_l‖², mean over the batch (0-dim)
  using Tuple = std::tuple<Tensors, Tensors, Tensors, OptTensors, at::Tensor, at::Tensor>;
  Tuple as_tuple() && {
    return {std::move(targets), std::move(activities), std::move(weight_grads), std::move(bias_grads),
            std::move(loss), std::move(local_loss)};
  }
};

struct FeedbackOutputs {
  Tensors weight_grads;     // ∂/∂Q_l, l = 2 … L
  OptTensors bias_grads;    // ∂/∂c_l
  at::Tensor loss;          // reconstruction loss, mean over the batch (0-dim)
  using Tuple = std::tuple<Tensors, OptTensors, at::Tensor>;
  Tuple as_tuple() && { return {std::move(weight_grads), std::move(bias_grads), std::move(loss)}; }
};

PCStepOutputs::Tuple pc_train_step(at::TensorList weights, const OptTensorList& biases,
                                   std::vector<std::string> activations, const at::Tensor& x, const at::Tensor& target,
                                   std::vector<double> precisions, int64_t inference_steps, double inference_lr,
                                   std::string schedule, bool fpa, std::string loss, bool return_trajectory,
                                   std::optional<double> inference_tol, bool return_trace, bool check_divergence);

TPStepOutputs::Tuple tp_train_step(at::TensorList weights, const OptTensorList& biases,
                                   std::vector<std::string> activations, at::TensorList feedback_weights,
                                   const OptTensorList& feedback_biases, std::vector<std::string> feedback_activations,
                                   const at::Tensor& x, const at::Tensor& target, double beta, std::string loss,
                                   bool difference);

// (φ(u), φ'(u)) through the engine's kernels, for tests.
std::tuple<at::Tensor, at::Tensor> activation(const at::Tensor& u, std::string activation);

FeedbackOutputs::Tuple feedback_grads(at::TensorList weights, const OptTensorList& biases,
                                      std::vector<std::string> activations, at::TensorList feedback_weights,
                                      const OptTensorList& feedback_biases,
                                      std::vector<std::string> feedback_activations, const at::Tensor& x,
                                      const OptTensorList& noise);

}  // namespace pcfast
