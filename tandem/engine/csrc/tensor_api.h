// The tensor API the kernel sources use: ATen's Tensor, its parallel_for and the few factory functions they call.
//
// Why not <torch/extension.h>: it pulls in the whole C++ frontend (autograd, nn, optim) and pybind11, and g++ spent
// ~31 s of a kernel file's compile parsing it, against ~2-3 s for these headers; six files paid that on every first
// start. Only the two binding files (ops/csrc/bind_fused.cpp, attention/csrc/bind_attention.cpp) include pybind11.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
