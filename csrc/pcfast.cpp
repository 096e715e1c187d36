// pcfast._C: registers the engine's ops as torch.ops.pcfast.* (TORCH_LIBRARY schemas) and gives
// Python an (empty) module to import, which is what loads this library and runs the registration
// (the pytorch/extension-cpp pattern). pcfast/ops/cpp.py wraps the ops in pcfast's signatures.
//
// The ops are catch-all (CompositeImplicitAutograd) kernels that step below autograd themselves:
// they take nn.Parameters directly, record no graph, and return plain tensors.
#include <Python.h>
#include <torch/library.h>

#include "gemm.h"
#include "pcfast.h"

extern "C" {
// import pcfast._C: an empty module; loading this shared library registers the ops below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "pcfast's C++ CPU engine; the ops live in torch.ops.pcfast",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace pcfast {

// "avx512/blas": the instruction set of the elementwise kernels and the GEMM path, for benchmarks.
std::string engine_info() { return std::string(kernel_isa()) + "/" + gemm_path(); }

// Pick the kernels' instruction set and the GEMM path ("" keeps one); returns the new engine_info.
// For tests and benchmarks; the defaults are the fastest available.
std::string set_engine(std::string isa, std::string gemm) {
  if (!isa.empty()) set_kernel_isa(isa);
  if (!gemm.empty()) set_gemm_path(gemm);
  return engine_info();
}

}  // namespace pcfast

TORCH_LIBRARY(pcfast, m) {
  m.def(
      "pc_train_step(Tensor[] weights, Tensor?[] biases, str[] activations, Tensor x, Tensor target, "
      "float[] precisions, int inference_steps, float inference_lr, str schedule, bool fpa, str loss, "
      "bool return_trajectory) -> (Tensor[] latents, Tensor[] errors, Tensor[] weight_grads, "
      "Tensor?[] bias_grads, Tensor energy, Tensor loss, Tensor[] trajectory)",
      &pcfast::pc_train_step);
  m.def(
      "tp_train_step(Tensor[] weights, Tensor?[] biases, str[] activations, Tensor[] feedback_weights, "
      "Tensor?[] feedback_biases, str[] feedback_activations, Tensor x, Tensor target, float beta, str loss, "
      "bool difference) -> (Tensor[] targets, Tensor[] activities, Tensor[] weight_grads, Tensor?[] bias_grads, "
      "Tensor loss, Tensor local_loss)",
      &pcfast::tp_train_step);
  m.def(
      "feedback_grads(Tensor[] weights, Tensor?[] biases, str[] activations, Tensor[] feedback_weights, "
      "Tensor?[] feedback_biases, str[] feedback_activations, Tensor x, Tensor?[] noise) -> "
      "(Tensor[] weight_grads, Tensor?[] bias_grads, Tensor loss)",
      &pcfast::feedback_grads);
  m.def("activation(Tensor u, str activation) -> (Tensor value, Tensor slope)", &pcfast::activation);
  m.def("engine_info() -> str", &pcfast::engine_info);
  m.def("set_engine(str isa, str gemm) -> str", &pcfast::set_engine);
}
