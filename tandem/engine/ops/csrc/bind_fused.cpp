// The fused-ops extension's Python bindings: the one file of it that includes pybind11 (see tensor_api.h for why).
#include <torch/csrc/utils/pybind.h>

#include <pybind11/stl.h>

#include <string>

#include "decoder_cpu.h"
#include "fused_ops.h"

// The kernels touch no Python object: other threads (the HTTP server beside the engine) run while they do.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm (optionally after adding into a residual, in place)",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_", &rope_, "rotate-half RoPE on q and k, in place",
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "silu(gate) * up",
        py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, "each row's argmax, as torch.argmax picks it",
        py::call_guard<py::gil_scoped_release>());
  m.def("pack_linear_weight", &pack_linear_weight, "a bf16 weight [N, K] in packed_linear's blocks",
        py::call_guard<py::gil_scoped_release>());
  m.def("packed_linear",
        [](at::Tensor x, at::Tensor packed, int64_t n, std::optional<at::Tensor> bias) {
          return packed_linear(std::move(x), std::move(packed), n, std::move(bias));
        }, "x W^T (+ b) with W packed by pack_linear_weight",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_amx_available", &linear_amx_available, "whether this CPU gives the products AMX tiles");
  m.def("linear_amx", &linear_amx, "whether products of 4 or more rows run on AMX tiles");
  m.def("set_linear_amx", &set_linear_amx, "switch the AMX products (benchmarks and tests)");
  m.def("pack_gated_weight", &pack_gated_weight,
        "a bf16 gate/up weight [2I, K] in packed_linear_silu_mul's blocks (32 gate and 32 up columns each)",
        py::call_guard<py::gil_scoped_release>());
  m.def("packed_linear_silu_mul",
        [](at::Tensor x, at::Tensor packed, int64_t inter) {
          return packed_linear_silu_mul(std::move(x), std::move(packed), inter);
        }, "silu(x G^T) * (x U^T) with [G; U] packed by pack_gated_weight",
        py::call_guard<py::gil_scoped_release>());
  // `attention` is the capsule of the paged-attention extension's decode_attention_kernels().
  py::class_<DecoderStack>(m, "DecoderStack", py::module_local())
      .def(py::init([](std::vector<std::vector<std::optional<at::Tensor>>> layers, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t hidden, int64_t intermediate, double eps,
                       double scale, py::capsule attention) {
        TORCH_CHECK(std::string(attention.name()) == kDecodeAttentionKernelsCapsule,
                    "DecoderStack: attention must be the paged-attention extension's decode_attention_kernels()");
        return DecoderStack(std::move(layers), num_heads, num_kv_heads, head_dim, hidden, intermediate, eps, scale,
                            *attention.get_pointer<DecodeAttentionKernels>());
      }))
      .def("forward", &DecoderStack::forward, "every layer of a decode-only step (h updated in place)",
           py::call_guard<py::gil_scoped_release>())
      .def_property("kv_prefetch", &DecoderStack::kv_prefetch, &DecoderStack::set_kv_prefetch,
                    "whether each layer's MLP prefetches the next layer's KV rows");
}
