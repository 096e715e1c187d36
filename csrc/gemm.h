// The three GEMM shapes of the engine, on contiguous row-major CPU tensors, into preallocated outputs.
//
// Each goes straight to the BLAS that libtorch_cpu links (sgemm_/dgemm_, found at load time through
// weak symbols) when that BLAS is exported and the sizes fit its 32-bit integers, which saves the
// dispatcher's few microseconds per call — the whole cost of a GEMM at the small shapes PC runs many
// times per step. Otherwise, or with PCFAST_CPP_GEMM=aten in the environment, they call ATen
// (at::addmm_out / at::mm_out), which reaches the same BLAS.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace pcfast {

// C = beta·C + alpha·A·Wᵀ  (A: m×k, W: n×k, C: m×n). beta = 0 ignores C's old contents.
void gemm_abt(at::Tensor& C, const at::Tensor& A, const at::Tensor& W, double alpha, double beta);

// C = A·W  (A: m×k, W: k×n, C: m×n).
void gemm_ab(at::Tensor& C, const at::Tensor& A, const at::Tensor& W);

// G = alpha·Eᵀ·A  (E: k×m, A: k×n, G: m×n).
void gemm_atb(at::Tensor& G, const at::Tensor& E, const at::Tensor& A, double alpha);

// "blas" when the direct BLAS path is in use, else "aten".
const char* gemm_path();

// Choose the GEMM path: "blas" (when available) or "aten", for tests and benchmarks.
void set_gemm_path(const std::string& name);

}  // namespace pcfast
