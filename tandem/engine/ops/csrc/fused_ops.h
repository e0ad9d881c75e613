// The fused-ops extension's kernels (fused_cpu.cpp, linear_cpu.cpp), as the binding file and the decoder stack
// call them.
#pragma once

#include <cstdint>
#include <optional>

#include "tensor_api.h"

// fused_cpu.cpp
at::Tensor rms_norm(at::Tensor x, std::optional<at::Tensor> residual, at::Tensor weight, double eps);
void rope_(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin);
at::Tensor silu_mul(at::Tensor x);
at::Tensor argmax_rows(at::Tensor x);

// linear_cpu.cpp
at::Tensor pack_linear_weight(at::Tensor weight);
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, int64_t n, std::optional<at::Tensor> bias);
