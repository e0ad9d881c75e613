// The paged-attention extension's Python bindings: the one file of it that includes pybind11 (see tensor_api.h).
#include <torch/csrc/utils/pybind.h>

#include "attention_ops.h"
#include "decode_kernels.h"

// The kernels touch no Python object: other threads (the HTTP server beside the engine) run while they do.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over block-major KV rows (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_amx", &attention_amx, "whether bf16 prefill chunks are attended on AMX tiles");
  m.def("set_attention_amx", &set_attention_amx, "switch the AMX prefill attention (tests and benchmarks)");
  m.def("store_kv", &store_kv, "a step's new K/V head vectors into their cache rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("bf16_prefill_available", &bf16_prefill_available, "whether this build has the bf16 prefill kernels",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention_dense", &prefill_attention_dense, "causal attention of chunks to themselves (bf16)",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention_dense_into", &prefill_attention_dense_into,
        "prefill_attention_dense into the chunks' rows of `out`; q, k, v, out may be strided token rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention_paged", &prefill_attention_paged, "a chunk's attention over its cached blocks (bf16)",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention_kernels", [] {
    static const DecodeAttentionKernels kernels{&store_kv, &paged_attention};
    return py::capsule(&kernels, kDecodeAttentionKernelsCapsule);
  }, "store_kv and paged_attention as function pointers, for the ops extension's decoder stack");
}
