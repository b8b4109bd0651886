// GELU for training on the CPU, as one operator `torch.ops.progvae.gelu` with its own derivative.
//
// torch's GELU saves its input and, in the backward pass, evaluates erf and exp again to get
// GELU'(x). Here the forward pass writes GELU(x) and GELU'(x) together: erf is computed by
// Abramowitz & Stegun 7.1.26 (the formula torch's vectorised erf uses, absolute error below
// 1.5e-7), whose exp(-x^2 / 2) is also the Gaussian density in GELU'(x), so the derivative
// costs a few multiply-adds more, and the backward pass is one multiplication. The values
// equal torch's to float rounding; progvae/models/activations.py compiles this file on first
// use and falls back to torch's GELU where it cannot.
//
// GELU(x) = x Phi(x),  GELU'(x) = Phi(x) + x phi(x),
// Phi(x) = (1 + erf(x / sqrt 2)) / 2,  phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// exp(x) for -80 <= x <= 0: x = n ln 2 + r with |r| <= ln(2) / 2, exp(r) by its Taylor series
// to r^7 / 7! (relative error below 1e-8 there), 2^n written into the exponent bits. ln 2 is
// split in two so n ln 2 is subtracted without rounding.
inline float exp_of_nonpositive(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof two_to_n);
  return p * two_to_n;
}

// Branch-free, so the compiler vectorises the loop (with -fno-trapping-math).
void gelu_and_derivative(const float* __restrict x, float* __restrict value,
                         float* __restrict derivative, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float a = std::fabs(v) * 0.70710678118654752f;  // |x| / sqrt 2
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    const float series = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                         + t * (-1.453152027f + t * 1.061405429f))));
    // exp(-a^2) = exp(-x^2 / 2). Beyond a^2 = 80 it is below 2e-35 and taken as 0, so no
    // intermediate is ever subnormal (and erf(a) rounds to 1 long before that).
    const float square = a * a;
    const float gaussian = square < 80.0f ? exp_of_nonpositive(-square) : 0.0f;
    const float erf_of_a = 1.0f - series * gaussian;
    const float cdf = 0.5f + 0.5f * (v < 0.0f ? -erf_of_a : erf_of_a);
    value[i] = v * cdf;
    derivative[i] = cdf + v * (0.39894228040143268f * gaussian);  // 1 / sqrt(2 pi)
  }
}

// Saves GELU'(x) instead of x. Only first derivatives: the saved derivative carries no graph,
// so a second derivative through this function would be wrong (progvae takes none).
struct Gelu : public torch::autograd::Function<Gelu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input) {
    TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat,
                "progvae::gelu takes float32 CPU tensors");
    const at::Tensor x = input.is_non_overlapping_and_dense() ? input : input.contiguous();
    // Same strides as x (channels_last stays channels_last), so one flat loop covers all.
    at::Tensor value = at::empty_like(x);
    at::Tensor derivative = at::empty_like(x);
    const float* x_data = x.data_ptr<float>();
    float* value_data = value.data_ptr<float>();
    float* derivative_data = derivative.data_ptr<float>();
    at::parallel_for(0, x.numel(), 32768, [&](int64_t begin, int64_t end) {
      gelu_and_derivative(x_data + begin, value_data + begin, derivative_data + begin,
                          end - begin);
    });
    ctx->save_for_backward({derivative});
    return value;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {grads[0].mul(ctx->get_saved_variables()[0])};
  }
};

at::Tensor gelu(const at::Tensor& x) { return Gelu::apply(x); }

}  // namespace

TORCH_LIBRARY(progvae, m) { m.def("gelu(Tensor x) -> Tensor", &gelu); }
