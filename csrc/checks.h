// Input validation shared by the ops. Every failure raises a Python exception through TORCH_CHECK:
// ValueError for bad shapes, sizes and values, TypeError for bad dtypes, RuntimeError otherwise.
// Messages name the argument, what was expected and what was given.
#pragma once

#include "pcfast.h"

#include <string>
#include <vector>

namespace pcfast {

// An MLP's parameters, checked and made contiguous. widths = (d_0, d_1, …, d_L).
struct Network {
  std::vector<at::Tensor> weights;
  std::vector<std::optional<at::Tensor>> biases;
  std::vector<Act> acts;  // one per hidden layer
  std::vector<int64_t> widths;
  at::ScalarType dtype;
  int64_t depth() const { return static_cast<int64_t>(weights.size()); }
};

std::string describe(const at::Tensor& t);
std::string dtype_name(at::ScalarType dtype);  // "torch.float32"

Act parse_act(const std::string& name, const std::string& argument);
Loss parse_loss(const std::string& name);

// weights: ≥ 1 float32/float64 CPU matrices chaining (out, in); biases: one per layer, None or (out,);
// activations: one valid name per hidden layer.
Network check_network(at::TensorList weights, const OptTensorList& biases, const std::vector<std::string>& activations);

// A floating CPU tensor of the network's dtype with exactly `shape`, made contiguous.
at::Tensor check_float(const at::Tensor& t, const std::string& argument, const Network& net,
                       std::initializer_list<int64_t> shape);

// x: (batch >= 1, d_0).
at::Tensor check_input(const at::Tensor& x, const Network& net);

// MSE: float (batch, C) of the network's dtype; CE: int64 labels (batch,) in [0, C).
at::Tensor check_target(const at::Tensor& target, Loss loss, const Network& net, int64_t batch);

// Feedback maps for layers 2 … L: Q_l of shape (d_{l-1}, d_l), c_l None or (d_{l-1},), ψ_l names.
void check_feedback(at::TensorList feedback_weights, const OptTensorList& feedback_biases,
                    const std::vector<std::string>& feedback_activations, const Network& net,
                    std::vector<at::Tensor>& qs, std::vector<std::optional<at::Tensor>>& cs, std::vector<Act>& psis);

}  // namespace pcfast
