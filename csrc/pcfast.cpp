// pcfast._C: registers the engine's ops as torch.ops.pcfast.* and gives Python a small module to
// import, which is what loads this library and runs the registration (the pytorch/extension-cpp
// pattern). pcfast/ops/cpp.py wraps the ops in pcfast's signatures, registers their fake (meta)
// kernels for torch.compile, and names their results.
//
// Registration follows the custom-op contract:
// - TORCH_LIBRARY declares each op's schema only. Every op is functional: it mutates none of its
//   inputs and returns freshly allocated tensors that alias no input and no other output. An output
//   computed only on request (pc_train_step's trace and energy_prev) is an empty (0,) tensor when
//   not asked, so every output's shape follows from the arguments, never from the data.
// - TORCH_LIBRARY_IMPL(pcfast, CPU, m) holds the implementations.
// - TORCH_LIBRARY_IMPL(pcfast, Autograd, m) marks the ops not differentiable: the kernel steps below
//   autograd and re-invokes the op, so parameters that require grad may be passed in and nothing is
//   recorded (the outputs are gradients and relaxed states, not functions to differentiate).
// - Sparse and non-CPU tensors reach the same implementations, whose input checks reject them with
//   a message naming the argument (the cpp backend is CPU-only); meta tensors go to the fake kernels.
#include <Python.h>
#include <torch/library.h>

#include <exception>

#include "gemm.h"
#include "pcfast.h"

namespace pcfast {
namespace {

// "avx512/blas": the instruction set of the elementwise kernels and the GEMM path, for benchmarks.
std::string engine_info() { return std::string(kernel_isa()) + "/" + gemm_path(); }

// Not differentiable: run the op's backend kernel with autograd switched off, so its outputs carry no
// graph whether or not the inputs require grad.
void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

// ---------------------------------------------------------------------------------------------
// Engine settings, as plain module functions: they hold no tensors and are not ops to trace.

PyObject* py_engine_info(PyObject* /*self*/, PyObject* /*args*/) {
  return PyUnicode_FromString(engine_info().c_str());
}

// set_engine(isa, gemm): pick the kernels' instruction set and the GEMM path ("" keeps one); returns
// the new engine_info. Bad names raise ValueError.
PyObject* py_set_engine(PyObject* /*self*/, PyObject* args) {
  const char* isa = nullptr;
  const char* gemm = nullptr;
  if (!PyArg_ParseTuple(args, "ss", &isa, &gemm)) return nullptr;
  try {
    if (*isa != '\0') set_kernel_isa(isa);
    if (*gemm != '\0') set_gemm_path(gemm);
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return PyUnicode_FromString(engine_info().c_str());
}

PyMethodDef module_methods[] = {
    {"engine_info", py_engine_info, METH_NOARGS,
     "engine_info() -> str: '<isa>/<gemm>', the kernels' instruction set and the GEMM path."},
    {"set_engine", py_set_engine, METH_VARARGS,
     "set_engine(isa: str, gemm: str) -> str: choose them ('' keeps one); returns engine_info()."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace pcfast

extern "C" {
// import pcfast._C: loading this shared library registers the ops below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "pcfast's C++ CPU engine; the ops live in torch.ops.pcfast",
      -1,
      pcfast::module_methods,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pcfast, m) {
  m.def(
      "pc_train_step(Tensor[] weights, Tensor?[] biases, str[] activations, Tensor x, Tensor target, "
      "float[] precisions, int inference_steps, float inference_lr, str schedule, bool fpa, str loss, "
      "bool return_trajectory, float? inference_tol=None, bool return_trace=False, bool check_divergence=False) "
      "-> (Tensor[] latents, Tensor[] errors, Tensor[] weight_grads, Tensor?[] bias_grads, Tensor energy, "
      "Tensor loss, Tensor[] trajectory, Tensor steps, Tensor trace_energy, Tensor trace_grad_norm, "
      "Tensor energy_prev)");
  m.def(
      "tp_train_step(Tensor[] weights, Tensor?[] biases, str[] activations, Tensor[] feedback_weights, "
      "Tensor?[] feedback_biases, str[] feedback_activations, Tensor x, Tensor target, float beta, str loss, "
      "bool difference) -> (Tensor[] targets, Tensor[] activities, Tensor[] weight_grads, Tensor?[] bias_grads, "
      "Tensor loss, Tensor local_loss)");
  m.def(
      "feedback_grads(Tensor[] weights, Tensor?[] biases, str[] activations, Tensor[] feedback_weights, "
      "Tensor?[] feedback_biases, str[] feedback_activations, Tensor x, Tensor?[] noise) -> "
      "(Tensor[] weight_grads, Tensor?[] bias_grads, Tensor loss)");
  m.def("activation(Tensor u, str activation) -> (Tensor value, Tensor slope)");
}

// The CPU implementations; the other backends' keys get the same functions, whose input checks
// reject what is not a dense CPU tensor with the argument's name (instead of the dispatcher's
// "could not run ... with arguments from the 'SparseCPU' backend").
#define PCFAST_IMPLEMENTATIONS(m)                        \
  m.impl("pc_train_step", &pcfast::pc_train_step);       \
  m.impl("tp_train_step", &pcfast::tp_train_step);       \
  m.impl("feedback_grads", &pcfast::feedback_grads);     \
  m.impl("activation", &pcfast::activation)

TORCH_LIBRARY_IMPL(pcfast, CPU, m) { PCFAST_IMPLEMENTATIONS(m); }
TORCH_LIBRARY_IMPL(pcfast, SparseCPU, m) { PCFAST_IMPLEMENTATIONS(m); }
TORCH_LIBRARY_IMPL(pcfast, SparseCsrCPU, m) { PCFAST_IMPLEMENTATIONS(m); }
TORCH_LIBRARY_IMPL(pcfast, CUDA, m) { PCFAST_IMPLEMENTATIONS(m); }

TORCH_LIBRARY_IMPL(pcfast, Autograd, m) {
  for (const char* name : {"pc_train_step", "tp_train_step", "feedback_grads", "activation"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&pcfast::below_autograd>());
  }
}
