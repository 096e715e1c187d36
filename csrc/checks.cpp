// Input validation shared by the ops (see checks.h).
#include "checks.h"

#include <sstream>

namespace pcfast {

std::string dtype_name(at::ScalarType dtype) { return "torch." + std::string(c10::getDtypeNames(dtype).first); }

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream out;
  out << "shape (";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << (t.dim() == 1 ? ",)" : ")") << ", dtype " << dtype_name(t.scalar_type()) << ", device " << t.device();
  if (t.layout() != at::kStrided) out << ", layout " << t.layout();
  return out.str();
}

Act parse_act(const std::string& name, const std::string& argument) {
  if (name == "tanh") return Act::tanh;
  if (name == "relu") return Act::relu;
  if (name == "sigmoid") return Act::sigmoid;
  if (name == "gelu") return Act::gelu;
  if (name == "identity") return Act::identity;
  TORCH_CHECK_VALUE(false, argument, ": expected one of 'gelu', 'identity', 'relu', 'sigmoid', 'tanh', got '", name,
                    "'");
}

Loss parse_loss(const std::string& name) {
  if (name == "mse") return Loss::mse;
  if (name == "ce") return Loss::ce;
  TORCH_CHECK_VALUE(false, "loss: expected 'mse' or 'ce', got '", name, "'");
}

namespace {

// The values of `t` in contiguous memory: lazy conjugate/negative bits applied (the kernels read raw
// memory, which does not carry them), then any strides, offset or expansion laid out densely.
at::Tensor dense(const at::Tensor& t) { return t.resolve_conj().resolve_neg().contiguous(); }

// Defined, strided, on the CPU: what every tensor argument must be before its dtype and shape.
void check_cpu_strided(const at::Tensor& t, const std::string& argument) {
  TORCH_CHECK_VALUE(t.defined(), argument, ": expected a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, argument, ": expected a dense (strided) tensor, got ", describe(t));
  TORCH_CHECK_VALUE(t.device().is_cpu(), argument,
                    ": the cpp backend runs on the CPU; expected a CPU tensor, got ", describe(t),
                    " (use backend='torch' or 'triton' for other devices)");
}

std::string shape_string(std::initializer_list<int64_t> shape) {
  std::ostringstream out;
  out << "(";
  bool first = true;
  for (int64_t s : shape) {
    out << (first ? "" : ", ") << s;
    first = false;
  }
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

}  // namespace

Network check_network(at::TensorList weights, const OptTensorList& biases, const std::vector<std::string>& activations) {
  const int64_t depth = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(depth >= 1, "weights: expected at least one layer, got none");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == depth, "biases: expected ", depth,
                    " entries (None for no bias), got ", biases.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(activations.size()) == depth - 1, "activations: expected ", depth - 1,
                    " (one per hidden layer), got ", activations.size());
  Network net;
  check_cpu_strided(weights[0], "weights[0]");
  net.dtype = weights[0].scalar_type();
  TORCH_CHECK_TYPE(net.dtype == at::kFloat || net.dtype == at::kDouble,
                   "weights[0]: expected dtype float32 or float64, got ", describe(weights[0]));
  for (int64_t l = 0; l < depth; ++l) {
    const std::string name = "weights[" + std::to_string(l) + "]";
    const at::Tensor& w = weights[l];
    check_cpu_strided(w, name);
    TORCH_CHECK_TYPE(w.scalar_type() == net.dtype, name, ": expected dtype ", dtype_name(net.dtype),
                     " (that of weights[0]), got ", describe(w));
    TORCH_CHECK_VALUE(w.dim() == 2, name, ": expected a 2-D (out, in) matrix, got ", describe(w));
    TORCH_CHECK_VALUE(w.size(0) >= 1 && w.size(1) >= 1, name, ": expected non-empty dimensions, got ", describe(w));
    if (l == 0) {
      net.widths.push_back(w.size(1));
    } else {
      TORCH_CHECK_VALUE(w.size(1) == net.widths.back(), name, ": expected ", net.widths.back(),
                        " input features to match weights[", l - 1, "], got ", describe(w));
    }
    net.widths.push_back(w.size(0));
    net.weights.push_back(dense(w));
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value() && b->defined()) {
      const std::string bname = "biases[" + std::to_string(l) + "]";
      check_cpu_strided(*b, bname);
      TORCH_CHECK_TYPE(b->scalar_type() == net.dtype, bname, ": expected dtype ", dtype_name(net.dtype), ", got ", describe(*b));
      TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == w.size(0), bname, ": expected shape (", w.size(0),
                        ",), got ", describe(*b));
      net.biases.emplace_back(dense(*b));
    } else {
      net.biases.emplace_back(std::nullopt);
    }
  }
  for (int64_t l = 0; l + 1 < depth; ++l) {
    net.acts.push_back(parse_act(activations[l], "activations[" + std::to_string(l) + "]"));
  }
  return net;
}

at::Tensor check_float(const at::Tensor& t, const std::string& argument, const Network& net,
                       std::initializer_list<int64_t> shape) {
  check_cpu_strided(t, argument);
  TORCH_CHECK_TYPE(t.scalar_type() == net.dtype, argument, ": expected dtype ", dtype_name(net.dtype), " (the model's), got ",
                   describe(t));
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  if (ok) {
    int64_t d = 0;
    for (int64_t s : shape) ok = ok && t.size(d++) == s;
  }
  TORCH_CHECK_VALUE(ok, argument, ": expected shape ", shape_string(shape), ", got ", describe(t));
  return dense(t);
}

at::Tensor check_input(const at::Tensor& x, const Network& net) {
  check_cpu_strided(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) >= 1 && x.size(1) == net.widths[0], "x: expected shape (batch >= 1, ",
                    net.widths[0], "), got ", describe(x));
  TORCH_CHECK_TYPE(x.scalar_type() == net.dtype, "x: expected dtype ", dtype_name(net.dtype), " (the model's), got ", describe(x));
  return dense(x);
}

at::Tensor check_target(const at::Tensor& target, Loss loss, const Network& net, int64_t batch) {
  const int64_t classes = net.widths.back();
  check_cpu_strided(target, "target");
  if (loss == Loss::mse) {
    TORCH_CHECK_TYPE(target.is_floating_point(), "target: loss='mse' expects float targets of shape (", batch, ", ",
                     classes, "), got ", describe(target));
    return check_float(target, "target", net, {batch, classes});
  }
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target: loss='ce' expects int64 class labels of shape (",
                   batch, ",), got ", describe(target));
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == batch, "target: expected class labels of shape (", batch,
                    ",), got ", describe(target));
  at::Tensor labels = dense(target);
  const int64_t* data = labels.const_data_ptr<int64_t>();
  int64_t lo = data[0], hi = data[0];
  for (int64_t i = 1; i < batch; ++i) {
    lo = std::min(lo, data[i]);
    hi = std::max(hi, data[i]);
  }
  TORCH_CHECK_VALUE(lo >= 0 && hi < classes, "target: class labels must lie in [0, ", classes - 1,
                    "], got values in [", lo, ", ", hi, "]");
  return labels;
}

void check_feedback(at::TensorList feedback_weights, const OptTensorList& feedback_biases,
                    const std::vector<std::string>& feedback_activations, const Network& net,
                    std::vector<at::Tensor>& qs, std::vector<std::optional<at::Tensor>>& cs,
                    std::vector<Act>& psis) {
  const int64_t maps = net.depth() - 1;
  TORCH_CHECK_VALUE(static_cast<int64_t>(feedback_weights.size()) == maps &&
                        static_cast<int64_t>(feedback_biases.size()) == maps,
                    "feedback_weights/feedback_biases: expected ", maps, " entries (layers 2 … L), got ",
                    feedback_weights.size(), " and ", feedback_biases.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(feedback_activations.size()) == maps, "feedback_activations: expected ",
                    maps, " names, got ", feedback_activations.size());
  for (int64_t k = 0; k < maps; ++k) {
    const std::string idx = "[" + std::to_string(k) + "]";
    // Q_{k+2} maps layer k+2 (width d_{k+2}) back to layer k+1 (width d_{k+1}).
    qs.push_back(check_float(feedback_weights[k], "feedback_weights" + idx, net,
                             {net.widths[k + 1], net.widths[k + 2]}));
    const std::optional<at::Tensor> c = feedback_biases.get(k);
    if (c.has_value() && c->defined()) {
      cs.emplace_back(check_float(*c, "feedback_biases" + idx, net, {net.widths[k + 1]}));
    } else {
      cs.emplace_back(std::nullopt);
    }
    psis.push_back(parse_act(feedback_activations[k], "feedback_activations" + idx));
  }
}

}  // namespace pcfast
