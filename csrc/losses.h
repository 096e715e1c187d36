// The readout loss and its error, and small reductions, shared by the PC and TP engines.
// The readout is narrow (C classes), so these are plain row loops.
#pragma once

#include "pcfast.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pcfast {

// f += bias; err = −∂ℓ/∂f (MSE: y − f; CE: onehot(y) − softmax(f)).
template <typename T>
inline void output_error(int64_t rows, int64_t classes, T* f, const T* bias, const at::Tensor& target, Loss loss, T* err) {
  for (int64_t r = 0; r < rows; ++r) {
    T* fr = f + r * classes;
    T* er = err + r * classes;
    if (bias) {
      for (int64_t j = 0; j < classes; ++j) fr[j] += bias[j];
    }
    if (loss == Loss::mse) {
      const T* y = target.const_data_ptr<T>() + r * classes;
      for (int64_t j = 0; j < classes; ++j) er[j] = y[j] - fr[j];
    } else {
      T top = fr[0];
      for (int64_t j = 1; j < classes; ++j) top = std::max(top, fr[j]);
      T total = 0;
      for (int64_t j = 0; j < classes; ++j) {
        er[j] = std::exp(fr[j] - top);
        total += er[j];
      }
      for (int64_t j = 0; j < classes; ++j) er[j] = -(er[j] / total);
      er[target.const_data_ptr<int64_t>()[r]] += T(1);
    }
  }
}

// ℓ(f, y) summed over the batch; for MSE from err = y − f.
template <typename T>
inline double loss_sum(int64_t rows, int64_t classes, const T* f, const T* err, const at::Tensor& target, Loss loss) {
  double total = 0.0;
  if (loss == Loss::mse) {
    for (int64_t i = 0; i < rows * classes; ++i) total += 0.5 * static_cast<double>(err[i]) * err[i];
    return total;
  }
  const int64_t* labels = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const T* fr = f + r * classes;
    double top = fr[0];
    for (int64_t j = 1; j < classes; ++j) top = std::max(top, static_cast<double>(fr[j]));
    double sum = 0.0;
    for (int64_t j = 0; j < classes; ++j) sum += std::exp(static_cast<double>(fr[j]) - top);
    total += top + std::log(sum) - static_cast<double>(fr[labels[r]]);
  }
  return total;
}

template <typename T>
inline double sum_squares(const at::Tensor& t) {
  const T* p = t.const_data_ptr<T>();
  const int64_t n = t.numel();
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  return acc;
}

// scale · Σ_rows e, per column.
template <typename T>
inline at::Tensor column_sums(const at::Tensor& e, double scale) {
  const int64_t rows = e.size(0), cols = e.size(1);
  std::vector<double> acc(cols, 0.0);
  const T* p = e.const_data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * cols;
    for (int64_t j = 0; j < cols; ++j) acc[j] += row[j];
  }
  at::Tensor out = at::empty({cols}, e.options());
  T* o = out.mutable_data_ptr<T>();
  for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<T>(acc[j] * scale);
  return out;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace pcfast
