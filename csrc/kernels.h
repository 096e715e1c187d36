// The elementwise math of the engine: activations, their slopes, and the fused epilogues that sit
// between GEMMs. Written as plain loops over rows of contiguous blocks so the compiler vectorises
// them; tanh and sigmoid use a branch-free exp (Cody–Waite reduction + polynomial) instead of libm,
// which does not vectorise. Accuracy: float ≲ 2 ulp, double ≲ 2 ulp against std::tanh.
//
// No include guard on purpose: kernels.cpp includes this file once per instruction set, each time
// inside its own namespace (PCFAST_ISA) under a different `#pragma GCC target`.

namespace PCFAST_ISA {

template <typename To, typename From>
inline To bit_cast_(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_ size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// e^y for y <= 0. Arguments below the normal range are clamped (e^-87 ≈ 1.6e-38 for float,
// e^-708 ≈ 3e-308 for double); callers only use it where that absolute error is invisible.
inline float exp_nonpos(float y) {
  y = y > -87.0f ? y : -87.0f;
  const float magic = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  const float n = (y * 1.44269504088896341f + magic) - magic;
  float r = y - n * 0.693359375f;   // ln 2 split in two (Cody–Waite): the first part is exact in n·C1
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t exponent = static_cast<int32_t>(n) + 127;
  return p * bit_cast_<float>(exponent << 23);
}

inline double exp_nonpos(double y) {
  y = y > -708.0 ? y : -708.0;
  const double magic = 6755399441055744.0;  // 1.5 · 2^52
  const double n = (y * 1.4426950408889634074 + magic) - magic;
  double r = y - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  // Taylor series to degree 13: the remainder is < 5e-18 on |r| <= ln2/2.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t exponent = static_cast<int64_t>(n) + 1023;
  return p * bit_cast_<double>(exponent << 52);
}

// tanh: an odd rational (Cephes) below 0.625, (1 − e^{−2|x|}) / (1 + e^{−2|x|}) above; one division.
inline float tanh_(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * x + x;
  const float e = exp_nonpos(-2.0f * ax);
  const float large = std::copysign((1.0f - e) / (1.0f + e), x);
  const float r = ax < 0.625f ? small : large;
  return x != x ? x : r;
}

inline double tanh_(double x) {
  const double ax = std::fabs(x);
  const double z = x * x;
  const double p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3;
  const double q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3;
  const double e = exp_nonpos(-2.0 * ax);
  const bool is_small = ax < 0.625;
  const double ratio = (is_small ? x * z * p : 1.0 - e) / (is_small ? q : 1.0 + e);
  const double r = is_small ? x + ratio : std::copysign(ratio, x);
  return x != x ? x : r;
}

template <typename T>
inline T sigmoid_(T x) {
  const T e = exp_nonpos(-std::fabs(x));
  const T r = (x >= T(0) ? T(1) : e) / (T(1) + e);
  return x != x ? x : r;
}

template <typename T>
inline T relu_(T x) {
  return x < T(0) ? T(0) : x;  // NaN passes through, as torch.relu
}

// GELU, exact (erf) form, as nn.GELU(); libm erf/exp, so these loops stay scalar.
template <typename T>
inline T gelu_(T x) {
  return x * T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
}

template <typename T>
inline void gelu_and_slope(T x, T& value, T& slope) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
  value = x * cdf;
  slope = cdf + x * std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
}

template <typename T>
inline T gelu_slope(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
  return cdf + x * std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
}

template <Act A, typename T>
inline T phi(T x) {
  if constexpr (A == Act::tanh) return tanh_(x);
  if constexpr (A == Act::relu) return relu_(x);
  if constexpr (A == Act::sigmoid) return sigmoid_(x);
  if constexpr (A == Act::gelu) return gelu_(x);
  return x;
}

// φ'(u) from v = φ(u) (tanh, sigmoid, relu, identity) or from u itself (gelu).
template <Act A, typename T>
inline T slope_of(T v, T u) {
  if constexpr (A == Act::tanh) return T(1) - v * v;
  if constexpr (A == Act::sigmoid) return v * (T(1) - v);
  if constexpr (A == Act::relu) return v > T(0) ? T(1) : T(0);
  if constexpr (A == Act::gelu) return gelu_slope(u);
  (void)v;
  (void)u;
  return T(1);
}

template <typename F>
inline void with_act(Act act, const F& f) {
  switch (act) {
    case Act::tanh: f(std::integral_constant<Act, Act::tanh>{}); break;
    case Act::relu: f(std::integral_constant<Act, Act::relu>{}); break;
    case Act::sigmoid: f(std::integral_constant<Act, Act::sigmoid>{}); break;
    case Act::gelu: f(std::integral_constant<Act, Act::gelu>{}); break;
    default: f(std::integral_constant<Act, Act::identity>{}); break;
  }
}

// Calls body(sub) with sub(j) = base[j] + bias[j], base[j], bias[j] or 0, so each variant is its
// own vectorised loop.
template <typename T, typename F>
inline void with_offset(const T* base, const T* bias, const F& body) {
  if (base && bias) {
    body([=](int64_t j) { return base[j] + bias[j]; });
  } else if (base) {
    body([=](int64_t j) { return base[j]; });
  } else if (bias) {
    body([=](int64_t j) { return bias[j]; });
  } else {
    body([](int64_t) { return T(0); });
  }
}

// ---------------------------------------------------------------------------------------------
// PC: z ← z + step, step = (td · φ'(z)) · coef − κ ε, with ε and the new error as UpdateMode says.

template <typename T, Act A, UpdateMode M, bool Squares>
double pc_update_rows(const UpdateArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t n = a.cols;
  const T coef = a.coef, kappa = a.kappa;
  double total = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict z = a.z + r * n;
    const T* __restrict td = a.td + r * n;
    T* __restrict err = a.err + r * n;
    T* __restrict post = a.post + r * n;
    T* __restrict slope = A == Act::gelu ? a.slope + r * n : nullptr;
    const T* base = a.base ? a.base + r * n : nullptr;
    with_offset<T>(base, a.bias, [&](auto offset) {
      // Updates element j and returns its step.
      const auto element = [&](int64_t j) {
        const T zj = z[j];
        const T e = M == UpdateMode::sequential ? zj - offset(j) : err[j];
        const T s = A == Act::gelu ? slope[j] : slope_of<A>(post[j], zj);
        const T step = td[j] * s * coef - kappa * e;
        const T zn = zj + step;
        z[j] = zn;
        if constexpr (M == UpdateMode::jacobi) {
          err[j] = zn - offset(j);
        } else {
          err[j] = e + step;
        }
        if constexpr (M != UpdateMode::fpa) {
          if constexpr (A == Act::gelu) {
            gelu_and_slope(zn, post[j], slope[j]);
          } else {
            post[j] = phi<A>(zn);
          }
        }
        return step;
      };
      if constexpr (!Squares && A == Act::gelu) {
        for (int64_t j = 0; j < n; ++j) element(j);
      } else if constexpr (!Squares) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) element(j);
      } else if constexpr (A == Act::gelu) {
        double acc = 0.0;  // gelu calls libm (scalar): no simd loop
        for (int64_t j = 0; j < n; ++j) {
          const double step = static_cast<double>(element(j));
          acc += step * step;
        }
        total += acc;
      } else {
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const double step = static_cast<double>(element(j));
          acc += step * step;
        }
        total += acc;
      }
    });
  }
  return total;
}

template <typename T>
double pc_update(const UpdateArgs<T>& a, int64_t r0, int64_t r1) {
  double total = 0.0;
  with_act(a.act, [&](auto act) {
    constexpr Act A = decltype(act)::value;
    const auto rows = [&](auto mode, auto squares) {
      total = pc_update_rows<T, A, decltype(mode)::value, decltype(squares)::value>(a, r0, r1);
    };
    const auto with_squares = [&](auto mode) {
      if (a.squares) {
        rows(mode, std::true_type{});
      } else {
        rows(mode, std::false_type{});
      }
    };
    switch (a.mode) {
      case UpdateMode::jacobi: with_squares(std::integral_constant<UpdateMode, UpdateMode::jacobi>{}); break;
      case UpdateMode::fpa: with_squares(std::integral_constant<UpdateMode, UpdateMode::fpa>{}); break;
      case UpdateMode::sequential: with_squares(std::integral_constant<UpdateMode, UpdateMode::sequential>{}); break;
    }
  });
  return total;
}

template <typename T>
void hidden_forward(int64_t n, T* pre, const T* bias, T* z, T* post, T* slope, T* err, Act act, int64_t r0,
                    int64_t r1) {
  with_act(act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    for (int64_t r = r0; r < r1; ++r) {
      T* __restrict p = pre + r * n;
      T* __restrict v = post + r * n;
      if (bias) {
        for (int64_t j = 0; j < n; ++j) p[j] += bias[j];
      }
      if (A == Act::gelu && slope) {
        T* __restrict s = slope + r * n;
        for (int64_t j = 0; j < n; ++j) gelu_and_slope(p[j], v[j], s[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) v[j] = phi<A>(p[j]);
      }
      if (z) std::memcpy(z + r * n, p, sizeof(T) * n);
      if (err) std::memset(err + r * n, 0, sizeof(T) * n);
    }
  });
}

template <typename T>
void residual(int64_t n, T* err, const T* z, const T* base, const T* bias, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict e = err + r * n;
    const T* __restrict zr = z + r * n;
    with_offset<T>(base ? base + r * n : nullptr, bias, [&](auto offset) {
      for (int64_t j = 0; j < n; ++j) e[j] = zr[j] - offset(j);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// TP / DTP.

template <typename T>
void feedback_map(int64_t n, const T* pre, const T* pre2, const T* bias, const T* add, T* out, Act act, int64_t r0,
                  int64_t r1) {
  with_act(act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict p = pre + r * n;
      T* __restrict o = out + r * n;
      with_offset<T>(nullptr, bias, [&](auto offset) {
        if (pre2) {
          const T* __restrict p2 = pre2 + r * n;
          const T* __restrict h = add + r * n;
          for (int64_t j = 0; j < n; ++j) o[j] = (phi<A>(p[j] + offset(j)) - phi<A>(p2[j] + offset(j))) + h[j];
        } else {
          for (int64_t j = 0; j < n; ++j) o[j] = phi<A>(p[j] + offset(j));
        }
      });
    }
  });
}

template <typename T>
double tp_delta(int64_t n, const T* target, const T* h, const T* u, T* delta, Act act, bool readout, int64_t r0,
                int64_t r1) {
  double total = 0.0;
  with_act(readout ? Act::identity : act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict t = target + r * n;
      const T* __restrict hr = h + r * n;
      const T* __restrict ur = u + r * n;
      T* __restrict d = delta + r * n;
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) {
        const T diff = t[j] - hr[j];
        acc += static_cast<double>(diff) * static_cast<double>(diff);
        d[j] = diff * slope_of<A>(hr[j], ur[j]);
      }
      total += acc;
    }
  });
  return total;
}

template <typename T>
double feedback_residual(int64_t n, const T* pre, const T* bias, const T* h_in, T* delta, Act act, int64_t r0,
                         int64_t r1) {
  double total = 0.0;
  with_act(act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict p = pre + r * n;
      const T* __restrict h = h_in + r * n;
      T* __restrict d = delta + r * n;
      double acc = 0.0;
      with_offset<T>(nullptr, bias, [&](auto offset) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T u = p[j] + offset(j);
          const T v = phi<A>(u);
          const T res = v - h[j];
          acc += static_cast<double>(res) * static_cast<double>(res);
          d[j] = res * slope_of<A>(v, u);
        }
      });
      total += acc;
    }
  });
  return total;
}

template <typename T>
void activate(int64_t n, const T* u, T* value, T* slope, Act act) {
  with_act(act, [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    for (int64_t i = 0; i < n; ++i) {
      const T v = phi<A>(u[i]);
      value[i] = v;
      slope[i] = slope_of<A>(v, u[i]);
    }
  });
}

template <typename T>
Kernels<T> table() {
  Kernels<T> k;
  k.pc_update = &pc_update<T>;
  k.hidden_forward = &hidden_forward<T>;
  k.residual = &residual<T>;
  k.feedback_map = &feedback_map<T>;
  k.tp_delta = &tp_delta<T>;
  k.feedback_residual = &feedback_residual<T>;
  k.activate = &activate<T>;
  return k;
}

}  // namespace PCFAST_ISA
