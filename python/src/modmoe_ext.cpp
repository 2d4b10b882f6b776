// modmoe._C: the Python binding of the C++ library. The Python API is python/modmoe/.
//
// Thin by design: it turns DLPack tensors (PyTorch, NumPy, CuPy, JAX) into modmoe::TensorView,
// fills the library's structs and calls it. The library checks every argument; this file only
// checks what exists in Python alone (values given beside the tensors that define them, such
// as top_k and intermediate_size; objects that are no tensors; dtypes that DLPack can name but
// modmoe cannot; uint8 bytes that are e4m3 only under an FP8 quant_scheme, or packed e2m1
// pairs under NVFP4) and renames the C++ argument names in error messages to the Python ones.
//
// e4m3 tensors (FP8, docs/fp8.md "Python") arrive as float8_e4m3fn or as uint8 bytes. DLPack
// 1.1 names float8_e4m3fn (kDLFloat8_e4m3fn); frameworks that cannot export it through DLPack
// (PyTorch's DLPack refuses float8; NumPy's ml_dtypes arrays have neither DLPack nor the
// buffer protocol) are read through a uint8 view of the same bytes, labelled e4m3 because
// their dtype says so. A plain uint8 tensor is read as e4m3 only where the call's quant scheme
// is FP8 (given, or held by the weights); elsewhere it is refused with a message that says so.
//
// NVFP4 (docs/nvfp4.md "Python"): packed e2m1 weights are uint8 (two values per byte, low
// nibble first; PyTorch's float4_e2m1fn_x2 is read through a uint8 view), their block scales
// e4m3 (float8_e4m3fn or uint8), the per-expert global scales fp32. They are the NVFP4 tensors
// because of the call's quant scheme ('nvfp4', or inferred from e4m3 block scales or from the
// global scales), never because of their dtype alone.
//
// No framework is linked or imported. PyTorch gets two shortcuts once the caller has imported
// it: its tensors are exported with torch.utils.dlpack.to_dlpack (a C function, several times
// cheaper than Tensor.__dlpack__, which is Python code), and a call with stream=None on CUDA
// tensors runs on PyTorch's current stream.
#include <modmoe/modmoe.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace modmoe::py {
namespace {

// ---------------------------------------------------------------------------------------
// Constants shared with python/modmoe/_api.py (exported as _C.* below)
// ---------------------------------------------------------------------------------------

// Bits of the `flags` argument.
constexpr int kDoFinalize = 1;
constexpr int kWeightOnInput = 2;  // apply_router_weight_on_input
constexpr int kBf16RoutingWeights = 4;
constexpr int kNormTopkProb = 8;
constexpr int kFp8FastAccum = 16;  // ExpertsOptions::fp8_fast_accum (fp8-tensor only)

// The `mode` argument of experts() and fused_moe() (kValidate: experts() only).
constexpr int kRun = 0;
constexpr int kWorkspaceBytes = 1;  // validate, then return the workspace bytes the call needs
constexpr int kValidate = 2;        // validate only: everything but the launch

// DLPack codes (dlpack.h: DLDataTypeCode, DLDeviceType).
constexpr uint8_t kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4;
constexpr uint8_t kDLFloat8_e4m3fn = 10;  // DLPack 1.1
constexpr uint8_t kDLFloat4_e2m1fn = 17;  // DLPack 1.1; PyTorch 2.11 exports float4_e2m1fn_x2 as 2 lanes
constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;

// ---------------------------------------------------------------------------------------
// Error messages in the Python API's names
// ---------------------------------------------------------------------------------------

// C++ argument name -> the name of the Python (FlashInfer-style) argument that carries it.
constexpr std::pair<const char*, const char*> kPythonNames[] = {
    {"'hidden'", "'hidden_states'"},
    {"'hidden_scale'", "'hidden_states_scale'"},
    {"'weights.w13'", "'gemm1_weights'"},
    {"'weights.w2'", "'gemm2_weights'"},
    {"'weights.w13_scale'", "'gemm1_weights_scale'"},
    {"'weights.w2_scale'", "'gemm2_weights_scale'"},
    {"'weights.w13_global_scale'", "'output1_scale_scalar'"},
    {"'weights.w2_global_scale'", "'output2_scale_scalar'"},
    {"'src.w13_global_scale'", "'output1_scale_scalar'"},
    {"'src.w2_global_scale'", "'output2_scale_scalar'"},
    {"'dst.w13_global_scale'", "'out[6]'"},
    {"'dst.w2_global_scale'", "'out[7]'"},
    {"'weights.scheme'", "'quant_scheme'"},
    {"'scheme'", "'quant_scheme'"},
    {"'src.w13_scale'", "'gemm1_weights_scale'"},
    {"'src.w2_scale'", "'gemm2_weights_scale'"},
    {"'dst.w13'", "'out[0]'"},
    {"'dst.w2'", "'out[1]'"},
    {"'dst.w13_bias'", "'out[2]'"},
    {"'dst.w2_bias'", "'out[3]'"},
    {"'dst.w13_scale'", "'out[4]'"},
    {"'dst.w2_scale'", "'out[5]'"},
    {"'weights.w13_bias'", "'gemm1_bias'"},
    {"'weights.w2_bias'", "'gemm2_bias'"},
    {"'src.w13'", "'gemm1_weights'"},
    {"'src.w2'", "'gemm2_weights'"},
    {"'src.w13_bias'", "'gemm1_bias'"},
    {"'src.w2_bias'", "'gemm2_bias'"},
    {"'out'", "'output'"},
    {"'gemm2_out'", "'gemm2_output'"},
    {"'options.activation.alpha_per_expert'", "'gemm1_alpha'"},
    {"'options.activation.beta_per_expert'", "'gemm1_beta'"},
    {"'options.activation.limit_per_expert'", "'gemm1_clamp_limit'"},
    {"'options.activation.kind'", "'activation_type'"},
    {"'options.apply_router_weight_on_input'", "'apply_router_weight_on_input'"},
    {"'options.do_finalize'", "'do_finalize'"},
    {"'options.fp8_fast_accum'", "'fp8_fast_accum'"},
    {"expert_map.num_experts", "num_experts"},
    {"expert_map.local_expert_offset", "local_expert_offset"},
    {"expert_map.num_local_experts", "local_num_experts"},
    {"'logits'", "'routing_logits'"},
    {"'bias'", "'routing_bias'"},
    {"'params.method'", "'routing_method_type'"},
    {"'params.num_experts'", "'num_experts'"},
    {"'params.top_k'", "'top_k'"},
    {"'params.n_group'", "'n_group'"},
    {"'params.topk_group'", "'topk_group'"},
    {"'params.routed_scaling_factor'", "'routed_scaling_factor'"},
    {"'routing.num_experts'", "'num_experts'"},
};

using Renames = std::initializer_list<std::pair<const char*, const char*>>;

template <class Range>
std::string replaced(std::string msg, const Range& renames) {
  for (const auto& [from, to] : renames) {
    const std::string f(from), t(to);
    for (size_t pos = msg.find(f); pos != std::string::npos; pos = msg.find(f, pos + t.size())) {
      msg.replace(pos, f.size(), t);
    }
  }
  return msg;
}

std::string python_names(const std::string& msg, Renames call_names) {
  return replaced(replaced(msg, kPythonNames), call_names);
}

// Runs f; a modmoe::Error leaves with its argument names in the Python API's words:
// kPythonNames, then `call_names` (the names of one call, such as quantize_activations' 'x').
template <class F>
auto renamed_errors(F&& f, Renames call_names = {}) {
  try {
    return f();
  } catch (const Error& e) {
    throw Error(python_names(e.what(), call_names));
  }
}

// ---------------------------------------------------------------------------------------
// PyTorch hooks: looked up once the caller has imported torch
// ---------------------------------------------------------------------------------------

struct TorchHooks {
  PyTypeObject* tensor_type = nullptr;  // torch.Tensor; set last, so it marks the rest ready
  PyObject* to_dlpack = nullptr;        // torch.utils.dlpack.to_dlpack
  PyObject* raw_stream = nullptr;       // torch._C._cuda_getCurrentRawStream(device) -> int
  PyObject* cuda = nullptr;             // torch.cuda, the fallback for the stream
  PyObject* module = nullptr;           // torch, for its dtypes (bits_view)
};
// NOTE: the references are never released: at exit the interpreter may already be gone.
TorchHooks g_torch;

bool torch_loaded() {
  if (g_torch.tensor_type != nullptr) return true;
  PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");  // borrowed
  if (torch == nullptr) return false;
  try {
    nb::handle t(torch);
    nb::object tensor = t.attr("Tensor");
    nb::object to_dlpack = t.attr("utils").attr("dlpack").attr("to_dlpack");
    nb::object c = t.attr("_C");
    nb::object raw = nb::hasattr(c, "_cuda_getCurrentRawStream")
                         ? nb::object(c.attr("_cuda_getCurrentRawStream"))
                         : nb::object();
    g_torch.cuda = nb::object(t.attr("cuda")).release().ptr();
    g_torch.module = t.inc_ref().ptr();
    g_torch.to_dlpack = to_dlpack.release().ptr();
    g_torch.raw_stream = raw.is_valid() ? raw.release().ptr() : nullptr;
    g_torch.tensor_type = reinterpret_cast<PyTypeObject*>(tensor.release().ptr());
  } catch (const nb::python_error&) {
    return false;  // torch is still being imported: look again on the next call
  }
  return true;
}

bool is_torch(nb::handle h) {
  return torch_loaded() && PyObject_TypeCheck(h.ptr(), g_torch.tensor_type);
}

// ---------------------------------------------------------------------------------------
// DLPack -> TensorView
// ---------------------------------------------------------------------------------------

using Array = nb::ndarray<nb::ro>;

bool dtype_of(nb::dlpack::dtype dt, DType& out) {
  // Packed e2m1 pairs: one byte per element, two 4-bit lanes, low nibble first (PyTorch's
  // float4_e2m1fn_x2; older PyTorch refuses the export and comes through kBitsViews).
  if (dt.code == kDLFloat4_e2m1fn && dt.bits == 4 && dt.lanes == 2) {
    out = DType::E2M1x2;
    return true;
  }
  if (dt.lanes != 1) return false;
  switch (dt.code) {
    case kDLInt:
      if (dt.bits == 32) out = DType::I32;
      if (dt.bits == 64) out = DType::I64;
      return dt.bits == 32 || dt.bits == 64;
    case kDLUInt:
      // NOTE: modmoe has no uint16 type, so uint16 tensors are read as bf16 bit patterns:
      // that is how NumPy (no bf16 dtype of its own) and CuPy hand bf16 data over.
      if (dt.bits == 8) out = DType::U8;
      if (dt.bits == 16) out = DType::BF16;
      return dt.bits == 8 || dt.bits == 16;
    case kDLFloat:
      if (dt.bits == 16) out = DType::F16;
      if (dt.bits == 32) out = DType::F32;
      if (dt.bits == 64) out = DType::F64;
      return dt.bits == 16 || dt.bits == 32 || dt.bits == 64;
    case kDLBfloat:
      out = DType::BF16;
      return dt.bits == 16;
    case kDLFloat8_e4m3fn:
      out = DType::E4M3;
      return dt.bits == 8;
  }
  return false;
}

std::string dlpack_dtype_name(nb::dlpack::dtype dt) {
  static const char* const kCodes[] = {"int",    "uint",    "float", "opaque",
                                       "bfloat", "complex", "bool"};
  // DLPack 1.1's 8-, 6- and 4-bit floats, codes 7 to 17: the name says the bits.
  static const char* const kSmallFloats[] = {
      "float8_e3m4",     "float8_e4m3",   "float8_e4m3b11fnuz", "float8_e4m3fn",
      "float8_e4m3fnuz", "float8_e5m2",   "float8_e5m2fnuz",    "float8_e8m0fnu",
      "float6_e2m3fn",   "float6_e3m2fn", "float4_e2m1fn"};
  std::string name;
  if (dt.code < 7) {
    name = kCodes[dt.code] + std::to_string(dt.bits);
  } else if (dt.code <= 17) {
    name = kSmallFloats[dt.code - 7];
  } else {
    name = "dlpack-code-" + std::to_string(dt.code) + "-bits-" + std::to_string(dt.bits);
  }
  if (dt.lanes != 1) name += "x" + std::to_string(dt.lanes);
  return name;
}

constexpr const char* kTakenDtypes =
    "modmoe takes bf16 (or uint16 holding bf16 bits), f16, f32, f64, int32, int64, uint8, "
    "float8_e4m3fn (or uint8 holding e4m3 bits, under an FP8 or NVFP4 quant_scheme), and "
    "packed e2m1 pairs as uint8 or float4_e2m1fn_x2 (under quant_scheme 'nvfp4')";

TensorView view_of(const Array& a, const char* name) {
  TensorView v;
  const int ndim = static_cast<int>(a.ndim());
  MODMOE_CHECK(ndim >= 1 && ndim <= TensorView::kMaxDims, "argument '", name, "' has ", ndim,
               " dimensions: expected 1 to ", TensorView::kMaxDims);
  MODMOE_CHECK(dtype_of(a.dtype(), v.dtype), "argument '", name, "' has dtype ",
               dlpack_dtype_name(a.dtype()), ": ", kTakenDtypes);
  switch (a.device_type()) {
    case kDLCPU:
    case kDLCUDAHost:
      v.device = Device::cpu();
      break;
    case kDLCUDA:
    case kDLCUDAManaged:
      v.device = Device::cuda(a.device_id());
      break;
    default:
      MODMOE_FAIL("argument '", name, "' is on DLPack device type ", a.device_type(),
                  ": expected a CPU or CUDA tensor");
  }
  v.data = const_cast<void*>(a.data());
  v.ndim = ndim;
  for (int d = 0; d < ndim; ++d) {
    v.shape[d] = static_cast<int64_t>(a.shape(d));
    v.strides[d] = a.stride(d);
  }
  return v;
}

// Dtypes that an array's framework cannot export, read through a view of the same bits: NumPy's
// ml_dtypes bfloat16 and float8_e4m3fn (neither DLPack nor the buffer protocol), and PyTorch's
// float8_e4m3fn where its DLPack export refuses float8. `name` is str(array.dtype); `view_as`
// names the dtype of the view, in the array's framework.
struct BitsView {
  const char* name;
  const char* view_as;
  DType dtype;
};
constexpr BitsView kBitsViews[] = {
    {"bfloat16", "uint16", DType::BF16},
    {"float8_e4m3fn", "uint8", DType::E4M3},
    {"torch.float8_e4m3fn", "uint8", DType::E4M3},
    // Packed e2m1 pairs, low nibble first (PyTorch 2.8+): the bytes NVFP4 weights hold.
    {"torch.float4_e2m1fn_x2", "uint8", DType::E2M1x2},
};

// h's DLPack export (PyTorch through to_dlpack; a refusal raises nb::python_error), or false
// where nanobind cannot import it.
bool export_array(nb::handle h, Array& a) {
  if (!is_torch(h)) return nb::try_cast(h, a, false);
  nb::object capsule = nb::steal(PyObject_CallOneArg(g_torch.to_dlpack, h.ptr()));
  if (!capsule.is_valid()) throw nb::python_error();
  return nb::try_cast(capsule, a, false);
}

std::string dtype_str(nb::handle h) {
  const nb::object dtype = h.attr("dtype");
  return nb::str(nb::handle(dtype)).c_str();
}

// The kBitsViews entry of an array's dtype, or nullptr.
const BitsView* bits_entry(const std::string& dtype) {
  for (const BitsView& b : kBitsViews) {
    if (dtype == b.name) return &b;
  }
  return nullptr;
}

// An array that export_array refused (`refusal`: PyTorch's message, or empty): read through
// kBitsViews, else an error that names its dtype.
TensorView bits_view(nb::handle h, const char* name, const std::string& refusal) {
  const std::string dtype = dtype_str(h);
  if (const BitsView* b = bits_entry(dtype)) {
    nb::object as = is_torch(h) ? nb::handle(g_torch.module).attr(b->view_as) : nb::str(b->view_as);
    Array a;
    if (export_array(h.attr("view")(as), a)) {
      TensorView v = view_of(a, name);
      v.dtype = b->dtype;
      return v;
    }
  }
  MODMOE_FAIL("argument '", name, "' has dtype ", dtype,
              refusal.empty() ? "" : " and its DLPack export failed (" + refusal + ")", ": ",
              kTakenDtypes);
}

// A view of `h`, or an undefined view for None. The caller's object owns the memory for the
// duration of the call, so the DLPack export is released before the call returns.
TensorView to_view(nb::handle h, const char* name) {
  if (!h.is_valid() || h.is_none()) return {};
  Array a;
  std::string refusal;
  try {
    if (export_array(h, a)) return view_of(a, name);
  } catch (const nb::python_error& e) {
    refusal = nb::str(e.value()).c_str();
  }
  if (nb::hasattr(h, "dtype") && nb::hasattr(h, "view")) return bits_view(h, name, refusal);
  throw nb::type_error(("argument '" + std::string(name) +
                        "': expected a tensor (PyTorch, NumPy, CuPy, JAX: anything with "
                        "__dlpack__ or the buffer protocol), got " +
                        nb::type_name(h.type()).c_str())
                           .c_str());
}

// e4m3 arguments under an FP8 quant scheme: uint8 bytes are e4m3 codes there.
TensorView e4m3_view(nb::handle h, const char* name) {
  TensorView v = to_view(h, name);
  if (v.dtype == DType::U8) v.dtype = DType::E4M3;
  return v;
}

// Packed NVFP4 tensors (uint8 bytes, float4_e2m1fn_x2) under quant scheme 'nvfp4'.
TensorView e2m1_view(nb::handle h, const char* name) {
  TensorView v = to_view(h, name);
  if (v.dtype == DType::U8) v.dtype = DType::E2M1x2;
  return v;
}

// Where the call is bf16, an e4m3, uint8 or e2m1 tensor is a mix-up that the library's plain
// dtype error would not explain.
void check_not_fp8(const TensorView& v, const char* name) {
  MODMOE_CHECK(!v.defined() || (v.dtype != DType::E4M3 && v.dtype != DType::U8 &&
                                v.dtype != DType::E2M1x2),
               "argument '", name, "' has dtype ", dtype_name(v.dtype),
               " and the weights are bf16: FP8 experts take FP8 weights with their scales ",
               "(gemm1_weights_scale, gemm2_weights_scale, or a modmoe.ExpertWeights holding ",
               "them), NVFP4 experts packed uint8 weights with their e4m3 block scales and fp32 ",
               "global scales (output1_scale_scalar, output2_scale_scalar); uint8 is read as ",
               "e4m3 bits only under an FP8 quant_scheme, as packed e2m1 pairs only under 'nvfp4'");
}

Workspace workspace_of(nb::handle h, const Device& dev) {
  const TensorView v = to_view(h, "workspace");
  if (!v.defined()) return {};
  MODMOE_CHECK(v.is_contiguous(), "argument 'workspace' of shape ", v.shape_string(),
               " is not contiguous: expected one dense buffer");
  MODMOE_CHECK(v.device == dev, "argument 'workspace' is on ", v.device.to_string(), ": expected ",
               dev.to_string(), " like the other tensors");
  return {v.data, v.nbytes()};
}

// An explicit stream (an int handle, or an object with .cuda_stream or .ptr); else, for
// PyTorch CUDA tensors, PyTorch's current stream on their device; else the default stream.
Stream stream_of(nb::handle stream, nb::handle like, const TensorView& v) {
  if (!stream.is_none()) {
    nb::handle s = stream;
    nb::object attr;
    if (!PyLong_Check(s.ptr())) {
      for (const char* name : {"cuda_stream", "ptr"}) {
        if (nb::hasattr(s, name)) {
          attr = s.attr(name);
          break;
        }
      }
      if (!attr.is_valid() || !PyLong_Check(attr.ptr())) {
        throw nb::type_error(("argument 'stream': expected an int (cudaStream_t), a "
                              "torch.cuda.Stream or a cupy Stream, got " +
                              std::string(nb::type_name(s.type()).c_str()))
                                 .c_str());
      }
      s = attr;
    }
    void* p = PyLong_AsVoidPtr(s.ptr());
    if (p == nullptr && PyErr_Occurred()) throw nb::python_error();
    return static_cast<Stream>(p);
  }
  if (!v.device.is_cuda() || !is_torch(like)) return nullptr;
  nb::object s =
      g_torch.raw_stream != nullptr
          ? nb::handle(g_torch.raw_stream)(v.device.index)
          : nb::handle(g_torch.cuda).attr("current_stream")(v.device.index).attr("cuda_stream");
  void* p = PyLong_AsVoidPtr(s.ptr());
  if (p == nullptr && PyErr_Occurred()) throw nb::python_error();
  return static_cast<Stream>(p);
}

// ---------------------------------------------------------------------------------------
// Quant schemes
// ---------------------------------------------------------------------------------------

// The schemes the Python package runs (MXFP8 is not bound).
constexpr QuantScheme kPythonSchemes[] = {QuantScheme::None, QuantScheme::Fp8PerTensor,
                                          QuantScheme::Fp8Block128, QuantScheme::Nvfp4};

bool is_fp8(QuantScheme s) {
  return s == QuantScheme::Fp8PerTensor || s == QuantScheme::Fp8Block128;
}

// quant_scheme as the Python calls take it: a modmoe.QuantScheme (an int), its name
// (quant_scheme_name's "none", "fp8-tensor", "fp8-block", "nvfp4", or "bf16"), or None: "from
// the tensors" (std::nullopt).
std::optional<QuantScheme> scheme_arg(nb::handle h) {
  if (h.is_none()) return std::nullopt;
  const bool is_name = nb::isinstance<nb::str>(h);
  const bool is_int = PyLong_Check(h.ptr()) && !PyBool_Check(h.ptr());
  const std::string name = is_name ? nb::cast<std::string>(h) : std::string();
  const long value = is_int ? PyLong_AsLong(h.ptr()) : -1;
  if (value == -1 && PyErr_Occurred()) PyErr_Clear();
  for (QuantScheme s : kPythonSchemes) {
    if ((is_name && (name == quant_scheme_name(s) || (name == "bf16" && s == QuantScheme::None))) ||
        (is_int && value == static_cast<long>(s))) {
      return s;
    }
  }
  MODMOE_FAIL("argument 'quant_scheme' = ", nb::repr(h).c_str(),
              ": expected 'fp8-block' (QuantScheme.Fp8Block128), 'fp8-tensor' "
              "(QuantScheme.Fp8PerTensor), 'nvfp4' (QuantScheme.Nvfp4), 'bf16' "
              "(QuantScheme.Bf16), or None (from the tensors)");
}

// The scheme of weights: quant_scheme when given; else NVFP4 where the block scales are e4m3
// (FP8 scales are fp32), or the global scales come with weights that are not float8_e4m3fn;
// else FP8 where float8_e4m3fn weights come with scales, per tensor for [E_local] scales and
// 128x128 blocks for 3-D ones; else bf16.
QuantScheme weights_scheme(nb::handle quant_scheme, const TensorView& w13,
                           const TensorView& w13_scale, bool has_global_scale) {
  if (const auto given = scheme_arg(quant_scheme)) return *given;
  if ((has_global_scale && w13.dtype != DType::E4M3) ||
      (w13_scale.defined() && w13_scale.dtype == DType::E4M3) || w13.dtype == DType::E2M1x2) {
    return QuantScheme::Nvfp4;
  }
  if (!w13_scale.defined()) return QuantScheme::None;
  MODMOE_CHECK(w13.dtype == DType::E4M3, "argument 'gemm1_weights' has dtype ",
               dtype_name(w13.dtype), " with gemm1_weights_scale given and no quant_scheme: ",
               "expected float8_e4m3fn; for e4m3 bits held in uint8, pass quant_scheme=",
               "'fp8-block' or 'fp8-tensor'; for NVFP4 (packed e2m1 pairs in uint8), e4m3 block ",
               "scales with output1_scale_scalar and output2_scale_scalar, or ",
               "quant_scheme='nvfp4'");
  if (w13_scale.ndim == 1) return QuantScheme::Fp8PerTensor;
  MODMOE_CHECK(w13_scale.ndim == 3, "argument 'gemm1_weights_scale' has shape ",
               w13_scale.shape_string(), ": expected [E_local] (fp8-tensor, one scale per ",
               "expert) or [E_local, 2I/128, H/128] (fp8-block, one per 128x128 block)");
  return QuantScheme::Fp8Block128;
}

// ---------------------------------------------------------------------------------------
// Expert weights: converted once, kept with the tensors that own them
// ---------------------------------------------------------------------------------------

struct PyExpertWeights {
  ExpertWeights w;
  // The caller's tensors, kept alive for the views.
  nb::object w13, w2, w13_bias, w2_bias, w13_scale, w2_scale, w13_global_scale, w2_global_scale;
};

// NVFP4 weights: uint8 (or float4_e2m1fn_x2) packed e2m1 pairs and e4m3 (or uint8) block
// scales. A weight of another dtype gets a message in the Python words, before the library's
// "expected e2m1x2".
void check_nvfp4_weight(TensorView& v, const char* name) {
  if (v.dtype == DType::U8) v.dtype = DType::E2M1x2;
  MODMOE_CHECK(!v.defined() || v.dtype == DType::E2M1x2, "argument '", name, "' has dtype ",
               dtype_name(v.dtype), " with quant_scheme nvfp4: expected uint8 (or ",
               "float4_e2m1fn_x2) holding two e2m1 values per byte, low nibble first, K/2 bytes ",
               "per row");
}

PyExpertWeights make_weights(nb::handle w13, nb::handle w2, int order, nb::handle w13_bias,
                             nb::handle w2_bias, int interleave_rows, nb::handle quant_scheme,
                             nb::handle w13_scale, nb::handle w2_scale,
                             nb::handle w13_global_scale, nb::handle w2_global_scale) {
  PyExpertWeights p;
  p.w.w13 = to_view(w13, "gemm1_weights");
  p.w.w2 = to_view(w2, "gemm2_weights");
  p.w.w13_scale = to_view(w13_scale, "gemm1_weights_scale");
  p.w.w2_scale = to_view(w2_scale, "gemm2_weights_scale");
  p.w.w13_global_scale = to_view(w13_global_scale, "output1_scale_scalar");
  p.w.w2_global_scale = to_view(w2_global_scale, "output2_scale_scalar");
  const bool has_global = p.w.w13_global_scale.defined() || p.w.w2_global_scale.defined();
  p.w.scheme = weights_scheme(quant_scheme, p.w.w13, p.w.w13_scale, has_global);
  if (p.w.scheme == QuantScheme::Nvfp4) {
    check_nvfp4_weight(p.w.w13, "gemm1_weights");
    check_nvfp4_weight(p.w.w2, "gemm2_weights");
    for (TensorView* v : {&p.w.w13_scale, &p.w.w2_scale}) {
      if (v->dtype == DType::U8) v->dtype = DType::E4M3;
    }
  } else {
    MODMOE_CHECK(!has_global, "argument '",
                 p.w.w13_global_scale.defined() ? "output1_scale_scalar" : "output2_scale_scalar",
                 "' is given and quant_scheme is ", quant_scheme_name(p.w.scheme),
                 ": expected None (the per-expert global scales belong to NVFP4 weights, ",
                 "quant_scheme 'nvfp4')");
  }
  if (is_fp8(p.w.scheme)) {
    for (TensorView* v : {&p.w.w13, &p.w.w2}) {
      if (v->dtype == DType::U8) v->dtype = DType::E4M3;
    }
  } else if (p.w.scheme == QuantScheme::None) {
    MODMOE_CHECK(!p.w.w13_scale.defined() && !p.w.w2_scale.defined(), "argument '",
                 p.w.w13_scale.defined() ? "gemm1_weights_scale" : "gemm2_weights_scale",
                 "' is given and quant_scheme is bf16: expected None (FP8 weights are e4m3 ",
                 "with both scales)");
    check_not_fp8(p.w.w13, "gemm1_weights");
    check_not_fp8(p.w.w2, "gemm2_weights");
  }
  p.w.w13_bias = to_view(w13_bias, "gemm1_bias");
  p.w.w2_bias = to_view(w2_bias, "gemm2_bias");
  p.w.order = static_cast<GateUpOrder>(order);
  p.w.layout = interleave_rows > 0 ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  p.w.interleave_rows = interleave_rows;
  p.w13 = nb::borrow(w13);
  p.w2 = nb::borrow(w2);
  p.w13_bias = nb::borrow(w13_bias);
  p.w2_bias = nb::borrow(w2_bias);
  p.w13_scale = nb::borrow(w13_scale);
  p.w2_scale = nb::borrow(w2_scale);
  p.w13_global_scale = nb::borrow(w13_global_scale);
  p.w2_global_scale = nb::borrow(w2_global_scale);
  return p;
}

// The weights of a call: an ExpertWeights object, or canonical bf16 tensors converted for this
// call (python/modmoe/_api.py wraps FP8 tensors and their scales in an ExpertWeights).
const ExpertWeights& weights_of(nb::handle weights, nb::handle w13, nb::handle w2, int order,
                                ExpertWeights& scratch) {
  if (!weights.is_none()) return nb::cast<PyExpertWeights*>(weights)->w;
  scratch.w13 = to_view(w13, "gemm1_weights");
  scratch.w2 = to_view(w2, "gemm2_weights");
  check_not_fp8(scratch.w13, "gemm1_weights");
  check_not_fp8(scratch.w2, "gemm2_weights");
  scratch.order = static_cast<GateUpOrder>(order);
  return scratch;
}

// NVFP4 weights take bf16 hidden states (W4A16); packed or e4m3 ones are a mix-up.
void check_w4a16_hidden(const TensorView& v) {
  MODMOE_CHECK(!v.defined() || (v.dtype != DType::E4M3 && v.dtype != DType::U8 &&
                                v.dtype != DType::E2M1x2),
               "argument 'hidden_states' has dtype ", dtype_name(v.dtype),
               " with NVFP4 weights (quant scheme nvfp4): expected bf16 (W4A16: only the ",
               "weights are NVFP4; NVFP4 activations, W4A4, are not supported yet)");
}

// hidden_states of an experts call: e4m3 (or uint8 bytes) with FP8 weights, else bf16.
TensorView hidden_of(nb::handle hidden, const ExpertWeights& w) {
  if (is_fp8(w.scheme)) return e4m3_view(hidden, "hidden_states");
  TensorView v = to_view(hidden, "hidden_states");
  if (w.scheme == QuantScheme::Nvfp4) {
    check_w4a16_hidden(v);
  } else {
    check_not_fp8(v, "hidden_states");
  }
  return v;
}

// E_local defaults to the weights' first dimension, E to offset + E_local (a single rank).
ExpertMap map_of(int num_experts, int offset, int num_local, const ExpertWeights& w) {
  if (num_local < 0 && w.w2.ndim >= 1) num_local = static_cast<int>(w.w2.size(0));
  if (num_experts < 0) num_experts = offset + num_local;
  return {num_experts, offset, num_local};
}

void check_intermediate(int64_t intermediate_size, const ExpertWeights& w) {
  if (intermediate_size <= 0 || w.w2.ndim != 3) return;
  if (w.w2.dtype == DType::E2M1x2) {
    MODMOE_CHECK(w.intermediate() == intermediate_size, "argument 'intermediate_size' = ",
                 intermediate_size, ": expected 2 * gemm2_weights.shape[2] = ", w.intermediate(),
                 " (NVFP4 gemm2_weights is [E_local, H, I/2], two values per byte)");
    return;
  }
  MODMOE_CHECK(
      w.w2.size(2) == intermediate_size, "argument 'intermediate_size' = ", intermediate_size,
      ": expected gemm2_weights.shape[2] = ", w.w2.size(2), " (gemm2_weights is [E_local, H, I])");
}

ActivationParams activation_of(int kind, float alpha, float beta, float limit, nb::handle alpha_pe,
                               nb::handle beta_pe, nb::handle limit_pe) {
  ActivationParams p;
  p.kind = static_cast<Activation>(kind);
  p.alpha = alpha;
  p.beta = beta;
  p.limit = limit;
  p.alpha_per_expert = to_view(alpha_pe, "gemm1_alpha");
  p.beta_per_expert = to_view(beta_pe, "gemm1_beta");
  p.limit_per_expert = to_view(limit_pe, "gemm1_clamp_limit");
  return p;
}

// ---------------------------------------------------------------------------------------
// The calls
// ---------------------------------------------------------------------------------------

size_t experts_call(nb::handle hidden, nb::handle hidden_scale, nb::handle topk_ids,
                    nb::handle topk_weights, nb::handle weights, nb::handle w13, nb::handle w2,
                    int order, int num_experts, int local_expert_offset, int local_num_experts,
                    int top_k, int64_t intermediate_size, int act, float alpha, float beta,
                    float limit, nb::handle alpha_pe, nb::handle beta_pe, nb::handle limit_pe,
                    int flags, nb::handle lora, nb::handle expert_num_tokens, nb::handle out,
                    nb::handle gemm2_out, nb::handle expert_weights, nb::handle e2p,
                    nb::handle offsets, nb::handle act_out, nb::handle workspace, nb::handle stream,
                    int mode) {
  return renamed_errors([&]() -> size_t {
    ExpertWeights scratch;
    const ExpertWeights& w = weights_of(weights, w13, w2, order, scratch);
    ExpertsInputs in;
    in.hidden = hidden_of(hidden, w);
    in.hidden_scale = to_view(hidden_scale, "hidden_states_scale");
    in.topk_ids = to_view(topk_ids, "topk_ids");
    in.topk_weights = to_view(topk_weights, "topk_weights");
    in.expert_num_tokens = to_view(expert_num_tokens, "expert_num_tokens");
    in.gemm1_lora_delta = to_view(lora, "gemm1_lora_delta");
    if (top_k > 0 && in.topk_ids.defined()) {
      MODMOE_CHECK(in.topk_ids.ndim == 2 && in.topk_ids.size(1) == top_k,
                   "argument 'top_k' = ", top_k, ": expected the columns of topk_ids ",
                   in.topk_ids.shape_string());
    }
    check_intermediate(intermediate_size, w);
    const ExpertMap map = map_of(num_experts, local_expert_offset, local_num_experts, w);

    ExpertsOptions opt;
    opt.activation = activation_of(act, alpha, beta, limit, alpha_pe, beta_pe, limit_pe);
    opt.do_finalize = (flags & kDoFinalize) != 0;
    opt.apply_router_weight_on_input = (flags & kWeightOnInput) != 0;
    opt.bf16_routing_weights = (flags & kBf16RoutingWeights) != 0;
    opt.fp8_fast_accum = (flags & kFp8FastAccum) != 0;

    ExpertsOutputs outs;
    outs.out = to_view(out, "output");
    outs.gemm2_out = to_view(gemm2_out, "gemm2_output");
    outs.expert_weights = to_view(expert_weights, "expert_weights");
    outs.expanded_idx_to_permuted_idx = to_view(e2p, "expanded_idx_to_permuted_idx");
    outs.expert_first_token_offset = to_view(offsets, "expert_first_token_offset");
    outs.gemm1_activation_output = to_view(act_out, "gemm1_activation_output");

    if (mode == kWorkspaceBytes) {
      return experts_workspace_size(make_experts_desc(in, w, map, opt, outs));
    }
    const Workspace ws = workspace_of(workspace, in.hidden.device);
    const Stream s = stream_of(stream, hidden, in.hidden);
    if (mode == kValidate) {
      make_experts_desc(in, w, map, opt, outs);
      return 0;
    }
    nb::gil_scoped_release release;
    experts(in, w, map, opt, outs, ws, s);
    return 0;
  });
}

size_t fused_moe_call(nb::handle logits, nb::handle bias, nb::handle hidden, nb::handle weights,
                      nb::handle w13, nb::handle w2, int order, int method, int num_experts,
                      int top_k, int n_group, int topk_group, float routed_scaling_factor,
                      int local_expert_offset, int local_num_experts, int64_t intermediate_size,
                      int act, float alpha, float beta, float limit, nb::handle alpha_pe,
                      nb::handle beta_pe, nb::handle limit_pe, int flags, nb::handle out,
                      nb::handle topk_ids, nb::handle topk_weights, nb::handle workspace,
                      nb::handle stream, int mode) {
  return renamed_errors([&]() -> size_t {
    ExpertWeights scratch;
    const ExpertWeights& w = weights_of(weights, w13, w2, order, scratch);
    const TensorView logits_v = to_view(logits, "routing_logits");
    const TensorView hidden_v = to_view(hidden, "hidden_states");
    // e4m3 hidden states come with hidden_states_scale, which _api.py sends through route()
    // and experts() instead.
    if (w.scheme == QuantScheme::Nvfp4) check_w4a16_hidden(hidden_v);
    MODMOE_CHECK(hidden_v.dtype != DType::E4M3 && hidden_v.dtype != DType::U8,
                 "argument 'hidden_states' has dtype ", dtype_name(hidden_v.dtype),
                 " and no hidden_states_scale is given: expected bf16 hidden states (with FP8 ",
                 "weights fused_moe quantizes them with the weights' scheme), or e4m3 ones with ",
                 "their hidden_states_scale");
    check_intermediate(intermediate_size, w);
    if (num_experts < 0) num_experts = logits_v.ndim == 2 ? static_cast<int>(logits_v.size(1)) : 0;
    const ExpertMap map = map_of(num_experts, local_expert_offset, local_num_experts, w);

    RoutingParams routing;
    routing.method = static_cast<RoutingMethod>(method);
    routing.num_experts = num_experts;
    routing.top_k = top_k;
    routing.n_group = n_group;
    routing.topk_group = topk_group;
    routing.routed_scaling_factor = routed_scaling_factor;
    routing.norm_topk_prob = (flags & kNormTopkProb) != 0;

    ExpertsOptions opt;
    opt.activation = activation_of(act, alpha, beta, limit, alpha_pe, beta_pe, limit_pe);
    opt.do_finalize = (flags & kDoFinalize) != 0;
    opt.apply_router_weight_on_input = (flags & kWeightOnInput) != 0;
    opt.bf16_routing_weights = (flags & kBf16RoutingWeights) != 0;
    opt.fp8_fast_accum = (flags & kFp8FastAccum) != 0;

    if (mode == kWorkspaceBytes) {
      MODMOE_CHECK(hidden_v.ndim == 2, "argument 'hidden_states' has shape ",
                   hidden_v.shape_string(), ": expected [T, H]");
      return fused_moe_workspace_size(hidden_v.size(0), w, routing, map, opt);
    }
    const TensorView bias_v = to_view(bias, "routing_bias");
    const TensorView out_v = to_view(out, "output");
    const TensorView ids_v = to_view(topk_ids, "topk_ids");
    const TensorView wts_v = to_view(topk_weights, "topk_weights");
    const Workspace ws = workspace_of(workspace, hidden_v.device);
    const Stream s = stream_of(stream, hidden, hidden_v);
    nb::gil_scoped_release release;
    fused_moe(logits_v, bias_v, hidden_v, w, routing, map, opt, out_v, ws, s, ids_v, wts_v);
    return 0;
  });
}

void route_call(nb::handle logits, nb::handle bias, int method, int top_k, int n_group,
                int topk_group, float routed_scaling_factor, bool norm_topk_prob,
                nb::handle topk_ids, nb::handle topk_weights, nb::handle stream) {
  renamed_errors([&] {
    const TensorView logits_v = to_view(logits, "routing_logits");
    MODMOE_CHECK(logits_v.ndim == 2, "argument 'routing_logits' has shape ",
                 logits_v.shape_string(), ": expected [T, E]");
    RoutingParams params;
    params.method = static_cast<RoutingMethod>(method);
    params.num_experts = static_cast<int>(logits_v.size(1));
    params.top_k = top_k;
    params.n_group = n_group;
    params.topk_group = topk_group;
    params.routed_scaling_factor = routed_scaling_factor;
    params.norm_topk_prob = norm_topk_prob;
    const TensorView bias_v = to_view(bias, "routing_bias");
    const TensorView ids_v = to_view(topk_ids, "topk_ids");
    const TensorView wts_v = to_view(topk_weights, "topk_weights");
    const Stream s = stream_of(stream, logits, logits_v);
    nb::gil_scoped_release release;
    route(logits_v, bias_v, params, ids_v, wts_v, s);
  });
}

// Returns the interleave of the prepared weights (0: canonical, e.g. for non-gated weights).
// dst_*: the destination tensors, out[0] to out[5] in the Python call.
int prepare_weights_call(const PyExpertWeights& src, int interleave_rows, nb::handle dst_w13,
                         nb::handle dst_w2, nb::handle dst_w13_bias, nb::handle dst_w2_bias,
                         nb::handle dst_w13_scale, nb::handle dst_w2_scale,
                         nb::handle dst_w13_global_scale, nb::handle dst_w2_global_scale,
                         nb::handle stream) {
  return renamed_errors([&] {
    const bool nvfp4 = src.w.scheme == QuantScheme::Nvfp4;
    const auto weight_view = nvfp4 ? e2m1_view : is_fp8(src.w.scheme) ? e4m3_view : to_view;
    const auto scale_view = nvfp4 ? e4m3_view : to_view;
    ExpertWeights dst;
    dst.w13 = weight_view(dst_w13, "out[0]");
    dst.w2 = weight_view(dst_w2, "out[1]");
    dst.w13_bias = to_view(dst_w13_bias, "out[2]");
    dst.w2_bias = to_view(dst_w2_bias, "out[3]");
    dst.w13_scale = scale_view(dst_w13_scale, "out[4]");
    dst.w2_scale = scale_view(dst_w2_scale, "out[5]");
    dst.w13_global_scale = to_view(dst_w13_global_scale, "out[6]");
    dst.w2_global_scale = to_view(dst_w2_global_scale, "out[7]");
    PrepareWeightsOptions options;
    options.layout =
        interleave_rows > 0 ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
    options.interleave_rows = interleave_rows;
    const Stream s = stream_of(stream, src.w2, src.w.w2);
    {
      nb::gil_scoped_release release;
      prepare_weights(src.w, dst, options, s);
    }
    return dst.interleave_rows;
  });
}

// The quantizers' binding: `in` (named `in_name`) to e4m3 `q` and fp32 `scale` under
// quant_scheme, by quantize(in, scheme, q, scale, stream) without the GIL. `names`: the call's
// renames of the C++ argument names.
template <class F>
void quantize_call(nb::handle in, const char* in_name, nb::handle quant_scheme, nb::handle q,
                   nb::handle scale, nb::handle stream, Renames names, F&& quantize) {
  renamed_errors(
      [&] {
        const QuantScheme scheme = scheme_arg(quant_scheme).value_or(QuantScheme::None);
        const TensorView in_v = to_view(in, in_name);
        const TensorView q_v = e4m3_view(q, "out");
        const TensorView scale_v = to_view(scale, "scale");
        const Stream s = stream_of(stream, in, in_v);
        nb::gil_scoped_release release;
        quantize(in_v, scheme, q_v, scale_v, s);
      },
      names);
}

void quantize_activations_call(nb::handle x, nb::handle quant_scheme, nb::handle q,
                               nb::handle scale, bool static_scale, nb::handle stream) {
  QuantizeOptions options;
  options.static_scale = static_scale;
  quantize_call(
      x, "hidden_states", quant_scheme, q, scale, stream,
      {{"'x'", "'hidden_states'"}, {"'q'", "'out'"}, {"options.static_scale", "static_scale"}},
      [&](const TensorView& x_v, QuantScheme scheme, const TensorView& q_v,
          const TensorView& scale_v,
          Stream s) { quantize_activations(x_v, scheme, q_v, scale_v, options, s); });
}

void quantize_weights_call(nb::handle w, nb::handle quant_scheme, nb::handle q, nb::handle scale,
                           nb::handle stream) {
  quantize_call(
      w, "weights", quant_scheme, q, scale, stream, {{"'w'", "'weights'"}, {"'q'", "'out'"}},
      [](const TensorView& w_v, QuantScheme scheme, const TensorView& q_v,
         const TensorView& scale_v, Stream s) { quantize_weights(w_v, scheme, q_v, scale_v, s); });
}

// NVFP4: x bf16 [T, H] (or [E_local, max_m, H]) -> q packed [.., H/2] (uint8 bytes), e4m3
// block scales [.., H/16] (float8_e4m3fn or uint8), global_scale fp32 [1].
void quantize_nvfp4_call(nb::handle x, nb::handle q, nb::handle scale, nb::handle global_scale,
                         bool static_global_scale, nb::handle stream) {
  renamed_errors(
      [&] {
        const TensorView x_v = to_view(x, "x");
        const TensorView q_v = e2m1_view(q, "out");
        const TensorView scale_v = e4m3_view(scale, "scale");
        const TensorView global_v = to_view(global_scale, "global_scale");
        Nvfp4QuantizeOptions options;
        options.static_global_scale = static_global_scale;
        const Stream s = stream_of(stream, x, x_v);
        nb::gil_scoped_release release;
        quantize_nvfp4(x_v, q_v, scale_v, global_v, options, s);
      },
      {{"'q'", "'out'"}, {"options.static_global_scale", "static_global_scale"}});
}

void dequantize_nvfp4_call(nb::handle q, nb::handle scale, nb::handle global_scale,
                           nb::handle out, nb::handle stream) {
  renamed_errors([&] {
    const TensorView q_v = e2m1_view(q, "q");
    const TensorView scale_v = e4m3_view(scale, "scale");
    const TensorView global_v = to_view(global_scale, "global_scale");
    const TensorView out_v = to_view(out, "out");
    const Stream s = stream_of(stream, q, q_v);
    nb::gil_scoped_release release;
    dequantize_nvfp4(q_v, scale_v, global_v, out_v, s);
  });
}

size_t experts_workspace_size_call(int64_t num_tokens, int64_t hidden, int64_t intermediate,
                                   int top_k, int num_experts, int local_expert_offset,
                                   int local_num_experts, int act, bool do_finalize, bool batched,
                                   nb::handle quant_scheme) {
  return renamed_errors([&] {
    ExpertsDesc desc;
    desc.scheme = scheme_arg(quant_scheme).value_or(QuantScheme::None);
    desc.format = batched ? InputFormat::Batched : InputFormat::Standard;
    desc.num_tokens = num_tokens;
    desc.hidden = hidden;
    desc.intermediate = intermediate;
    desc.top_k = batched ? 0 : top_k;
    desc.expert_map = {
        num_experts, local_expert_offset,
        local_num_experts < 0 ? num_experts - local_expert_offset : local_num_experts};
    desc.activation = static_cast<Activation>(act);
    desc.do_finalize = do_finalize;
    return experts_workspace_size(desc);
  });
}

size_t fused_moe_workspace_size_call(int64_t num_tokens, int64_t hidden, int64_t intermediate,
                                     int top_k, int num_experts, int local_expert_offset,
                                     int local_num_experts, int act, int method, int n_group,
                                     int topk_group, nb::handle quant_scheme) {
  return renamed_errors([&] {
    const ExpertMap map{
        num_experts, local_expert_offset,
        local_num_experts < 0 ? num_experts - local_expert_offset : local_num_experts};
    // Only the sizes of the weights matter here: a view with a shape and no data.
    ExpertWeights w;
    w.scheme = scheme_arg(quant_scheme).value_or(QuantScheme::None);
    if (w.scheme == QuantScheme::Nvfp4) {  // two values per byte: [E_local, H, I/2]
      MODMOE_CHECK(intermediate % 2 == 0, "argument 'intermediate_size' = ", intermediate,
                   " with quant_scheme nvfp4: expected a multiple of 32");
      w.w2 = make_view(nullptr, DType::E2M1x2, {map.num_local_experts, hidden, intermediate / 2});
    } else {
      w.w2 = make_view(nullptr, is_fp8(w.scheme) ? DType::E4M3 : DType::BF16,
                       {map.num_local_experts, hidden, intermediate});
    }
    RoutingParams routing;
    routing.method = static_cast<RoutingMethod>(method);
    routing.num_experts = num_experts;
    routing.top_k = top_k;
    routing.n_group = n_group;
    routing.topk_group = topk_group;
    ExpertsOptions opt;
    opt.activation.kind = static_cast<Activation>(act);
    return fused_moe_workspace_size(num_tokens, w, routing, map, opt);
  });
}

// ---------------------------------------------------------------------------------------
// AllToAll
// ---------------------------------------------------------------------------------------

nb::dlpack::dtype dlpack_dtype(DType d) {
  switch (d) {
    case DType::F32:
      return {kDLFloat, 32, 1};
    case DType::F64:
      return {kDLFloat, 64, 1};
    case DType::F16:
      return {kDLFloat, 16, 1};
    case DType::BF16:
      return {kDLBfloat, 16, 1};
    case DType::I32:
      return {kDLInt, 32, 1};
    case DType::I64:
      return {kDLInt, 64, 1};
    default:
      return {kDLUInt, 8, 1};
  }
}

// A framework-neutral array over a view that `owner` keeps valid (python/modmoe/_alltoall.py
// hands it to the caller's framework).
nb::ndarray<> array_of(const TensorView& v, nb::handle owner) {
  size_t shape[TensorView::kMaxDims];
  for (int d = 0; d < v.ndim; ++d) shape[d] = static_cast<size_t>(v.shape[d]);
  return nb::ndarray<>(v.data, static_cast<size_t>(v.ndim), shape, owner, v.strides.data(),
                       dlpack_dtype(v.dtype), v.device.is_cuda() ? kDLCUDA : kDLCPU,
                       v.device.index);
}

struct PyAllToAll {
  std::unique_ptr<AllToAll> impl;
  AllToAll& get() {
    MODMOE_CHECK(impl != nullptr, "AllToAll: the object was closed");
    return *impl;
  }
};

void bind_all_to_all(nb::module_& m) {
  nb::class_<PyAllToAll>(m, "AllToAll")
      .def(
          "__init__",
          [](PyAllToAll* self, uintptr_t comm, int backend, int ep_size, int ep_rank,
             int num_experts, int top_k, int max_tokens_per_rank,
             size_t max_payload_bytes_per_token, int64_t hidden, int num_sms, double timeout_s,
             bool combine_pull) {
            AllToAllConfig c;
            c.backend = static_cast<AllToAllBackend>(backend);
            c.ep_size = ep_size;
            c.ep_rank = ep_rank;
            c.num_experts = num_experts;
            c.top_k = top_k;
            c.max_tokens_per_rank = max_tokens_per_rank;
            c.max_payload_bytes_per_token = max_payload_bytes_per_token;
            c.hidden = hidden;
            c.num_sms = num_sms;
            c.timeout_s = timeout_s;
            c.combine_pull = combine_pull;
            new (self) PyAllToAll{create_all_to_all(c, reinterpret_cast<ncclComm*>(comm))};
          },
          "comm"_a, "backend"_a, "ep_size"_a, "ep_rank"_a, "num_experts"_a, "top_k"_a,
          "max_tokens_per_rank"_a, "max_payload_bytes_per_token"_a, "hidden"_a, "num_sms"_a,
          "timeout_s"_a, "combine_pull"_a)
      .def(
          "dispatch",
          [](nb::handle self, nb::handle topk_ids, nb::list payloads, int runtime_max,
             nb::handle stream) {
            AllToAll& a2a = nb::cast<PyAllToAll*>(self)->get();
            const TensorView ids = to_view(topk_ids, "topk_ids");
            std::vector<TensorView> views;
            for (size_t i = 0; i < nb::len(payloads); ++i) {
              const std::string name = "input_payloads[" + std::to_string(i) + "]";
              nb::object item = payloads[i];
              views.push_back(to_view(item, name.c_str()));
            }
            const Stream s = stream_of(stream, topk_ids, ids);
            DispatchResult r;
            {
              nb::gil_scoped_release release;
              r = a2a.dispatch(ids, views, runtime_max, s);
            }
            nb::list out;
            for (const TensorView& p : r.payloads) out.append(array_of(p, self));
            return nb::make_tuple(array_of(r.topk_ids, self), out, array_of(r.recv_counts, self));
          },
          "topk_ids"_a, "payloads"_a, "runtime_max"_a, "stream"_a.none())
      .def("combine_buffer",
           [](nb::handle self, int runtime_max) {
             return array_of(nb::cast<PyAllToAll*>(self)->get().combine_buffer(runtime_max), self);
           })
      .def(
          "combine",
          [](PyAllToAll& self, nb::handle payload, nb::handle out, int runtime_max,
             nb::handle stream) {
            const TensorView p = to_view(payload, "payload");
            const TensorView o = to_view(out, "output");
            const Stream s = stream_of(stream, payload, p);
            nb::gil_scoped_release release;
            self.get().combine(p, o, runtime_max, s);
          },
          "payload"_a, "out"_a, "runtime_max"_a, "stream"_a.none())
      .def("check", [](PyAllToAll& self) { self.get().check(); })
      .def("close", [](PyAllToAll& self) { self.impl.reset(); })
      .def_prop_ro("ep_size", [](PyAllToAll& self) { return self.get().config().ep_size; })
      .def_prop_ro("ep_rank", [](PyAllToAll& self) { return self.get().config().ep_rank; })
      .def_prop_ro("hidden_size", [](PyAllToAll& self) { return self.get().config().hidden; })
      .def_prop_ro("max_tokens_per_rank",
                   [](PyAllToAll& self) { return self.get().config().max_tokens_per_rank; });
}

}  // namespace
}  // namespace modmoe::py

NB_MODULE(_C, m) {
  using namespace modmoe;
  using namespace modmoe::py;
  m.doc() = "modmoe C++ library binding (use the modmoe package, not this module)";

  nb::exception<Error>(m, "Error", PyExc_RuntimeError);

  m.attr("DO_FINALIZE") = kDoFinalize;
  m.attr("WEIGHT_ON_INPUT") = kWeightOnInput;
  m.attr("BF16_ROUTING_WEIGHTS") = kBf16RoutingWeights;
  m.attr("NORM_TOPK_PROB") = kNormTopkProb;
  m.attr("FP8_FAST_ACCUM") = kFp8FastAccum;
  m.attr("RUN") = kRun;
  m.attr("WORKSPACE_BYTES") = kWorkspaceBytes;
  m.attr("VALIDATE") = kValidate;
  m.attr("ACT_SWIGLU") = static_cast<int>(Activation::Swiglu);
  m.attr("ACT_SWIGLU_OAI") = static_cast<int>(Activation::SwigluOai);
  m.attr("ACT_GEGLU") = static_cast<int>(Activation::Geglu);
  m.attr("ACT_RELU2") = static_cast<int>(Activation::Relu2);
  m.attr("GATE_UP") = static_cast<int>(GateUpOrder::GateUp);
  m.attr("UP_GATE") = static_cast<int>(GateUpOrder::UpGate);
  m.attr("SCHEME_NONE") = static_cast<int>(QuantScheme::None);
  m.attr("SCHEME_FP8_TENSOR") = static_cast<int>(QuantScheme::Fp8PerTensor);
  m.attr("SCHEME_FP8_BLOCK") = static_cast<int>(QuantScheme::Fp8Block128);
  m.attr("SCHEME_NVFP4") = static_cast<int>(QuantScheme::Nvfp4);
  m.attr("BACKEND_NVLINK") = static_cast<int>(AllToAllBackend::NvLink);
  m.attr("BACKEND_NCCL") = static_cast<int>(AllToAllBackend::Nccl);
  m.def("version", [] { return std::string(version()); });
  m.def(
      "quant_scheme",
      [](nb::handle h) {
        return renamed_errors([&] {
          const auto s = scheme_arg(h);
          return s ? static_cast<int>(*s) : -1;
        });
      },
      "quant_scheme"_a.none(),
      "quant_scheme as a number (QuantScheme), or -1 for None (from the tensors)");
  m.def("built_with_cuda", &built_with_cuda);
  m.def("compiled_architectures", &compiled_architectures);

  nb::class_<PyExpertWeights>(m, "ExpertWeights")
      .def(
          "__init__",
          [](PyExpertWeights* self, nb::handle w13, nb::handle w2, int order, nb::handle w13_bias,
             nb::handle w2_bias, int interleave_rows, nb::handle quant_scheme, nb::handle w13_scale,
             nb::handle w2_scale, nb::handle w13_global_scale, nb::handle w2_global_scale) {
            new (self) PyExpertWeights(renamed_errors([&] {
              return make_weights(w13, w2, order, w13_bias, w2_bias, interleave_rows, quant_scheme,
                                  w13_scale, w2_scale, w13_global_scale, w2_global_scale);
            }));
          },
          "gemm1_weights"_a, "gemm2_weights"_a, "gate_up_order"_a = 0,
          "gemm1_bias"_a.none() = nb::none(), "gemm2_bias"_a.none() = nb::none(),
          "interleave_rows"_a = 0, nb::kw_only(), "quant_scheme"_a.none() = nb::none(),
          "gemm1_weights_scale"_a.none() = nb::none(), "gemm2_weights_scale"_a.none() = nb::none(),
          "output1_scale_scalar"_a.none() = nb::none(),
          "output2_scale_scalar"_a.none() = nb::none(),
          "Expert weights converted once: gemm1_weights [E_local, 2I, H] (or [E_local, I, H] "
          "for relu2) and gemm2_weights [E_local, H, I], with the gate/up order of gemm1 (0: "
          "gate rows first, vLLM; 1: up rows first, FlashInfer) and the interleave of "
          "prepare_weights (0: canonical). bf16; or FP8: e4m3 (float8_e4m3fn, or uint8 bytes "
          "with quant_scheme given) with fp32 dequantization scales gemm1_weights_scale / "
          "gemm2_weights_scale, [E_local] each for 'fp8-tensor', [E_local, 2I/128, H/128] / "
          "[E_local, H/128, I/128] for 'fp8-block' (quant_scheme None: taken from the scales). "
          "NVFP4 ('nvfp4', W4A16): uint8 packed e2m1 pairs gemm1_weights [E_local, 2I, H/2] and "
          "gemm2_weights [E_local, H, I/2], e4m3 block scales gemm1_weights_scale "
          "[E_local, 2I, H/16] and gemm2_weights_scale [E_local, H, I/16], fp32 global scales "
          "output1_scale_scalar and output2_scale_scalar [E_local] (dequantization multipliers, "
          "ModelOpt's weight_scale_2). Keeps the tensors alive.")
      .def_prop_ro("gemm1_weights", [](PyExpertWeights& p) { return p.w13; })
      .def_prop_ro("gemm2_weights", [](PyExpertWeights& p) { return p.w2; })
      .def_prop_ro("gemm1_bias", [](PyExpertWeights& p) { return p.w13_bias; })
      .def_prop_ro("gemm2_bias", [](PyExpertWeights& p) { return p.w2_bias; })
      .def_prop_ro("gemm1_weights_scale", [](PyExpertWeights& p) { return p.w13_scale; })
      .def_prop_ro("gemm2_weights_scale", [](PyExpertWeights& p) { return p.w2_scale; })
      .def_prop_ro("output1_scale_scalar", [](PyExpertWeights& p) { return p.w13_global_scale; })
      .def_prop_ro("output2_scale_scalar", [](PyExpertWeights& p) { return p.w2_global_scale; })
      .def_prop_ro("quant_scheme", [](PyExpertWeights& p) { return static_cast<int>(p.w.scheme); })
      .def_prop_ro("gate_up_order", [](PyExpertWeights& p) { return static_cast<int>(p.w.order); })
      .def_prop_ro("interleave_rows", [](PyExpertWeights& p) { return p.w.interleave_rows; })
      .def_prop_ro("num_local_experts",
                   [](PyExpertWeights& p) { return p.w.w2.ndim == 3 ? p.w.w2.size(0) : 0; })
      .def_prop_ro("hidden_size",
                   [](PyExpertWeights& p) { return p.w.w2.ndim == 3 ? p.w.w2.size(1) : 0; })
      .def_prop_ro("intermediate_size",
                   [](PyExpertWeights& p) { return p.w.w2.ndim == 3 ? p.w.intermediate() : 0; })
      .def("__repr__", [](PyExpertWeights& p) {
        return "modmoe.ExpertWeights(gemm1 " + p.w.w13.shape_string() + ", gemm2 " +
               p.w.w2.shape_string() + ", " +
               (p.w.order == GateUpOrder::GateUp ? "gate_up" : "up_gate") +
               ", interleave_rows=" + std::to_string(p.w.interleave_rows) +
               ", quant_scheme=" + quant_scheme_name(p.w.scheme) + ")";
      });

  m.def("experts", &experts_call, "hidden"_a.none(), "hidden_scale"_a.none(), "topk_ids"_a.none(),
        "topk_weights"_a.none(), "weights"_a.none(), "w13"_a.none(), "w2"_a.none(), "order"_a,
        "num_experts"_a, "local_expert_offset"_a, "local_num_experts"_a, "top_k"_a,
        "intermediate_size"_a, "act"_a, "alpha"_a, "beta"_a, "limit"_a, "alpha_pe"_a.none(),
        "beta_pe"_a.none(), "limit_pe"_a.none(), "flags"_a, "lora"_a.none(),
        "expert_num_tokens"_a.none(), "out"_a.none(), "gemm2_out"_a.none(),
        "expert_weights"_a.none(), "e2p"_a.none(), "offsets"_a.none(), "act_out"_a.none(),
        "workspace"_a.none(), "stream"_a.none(), "mode"_a);
  m.def("fused_moe", &fused_moe_call, "logits"_a.none(), "bias"_a.none(), "hidden"_a.none(),
        "weights"_a.none(), "w13"_a.none(), "w2"_a.none(), "order"_a, "method"_a, "num_experts"_a,
        "top_k"_a, "n_group"_a, "topk_group"_a, "routed_scaling_factor"_a, "local_expert_offset"_a,
        "local_num_experts"_a, "intermediate_size"_a, "act"_a, "alpha"_a, "beta"_a, "limit"_a,
        "alpha_pe"_a.none(), "beta_pe"_a.none(), "limit_pe"_a.none(), "flags"_a, "out"_a.none(),
        "topk_ids"_a.none(), "topk_weights"_a.none(), "workspace"_a.none(), "stream"_a.none(),
        "mode"_a);
  m.def("route", &route_call, "logits"_a.none(), "bias"_a.none(), "method"_a, "top_k"_a,
        "n_group"_a, "topk_group"_a, "routed_scaling_factor"_a, "norm_topk_prob"_a,
        "topk_ids"_a.none(), "topk_weights"_a.none(), "stream"_a.none());
  m.def("prepare_weights", &prepare_weights_call, "src"_a, "interleave_rows"_a, "dst_w13"_a.none(),
        "dst_w2"_a.none(), "dst_w13_bias"_a.none(), "dst_w2_bias"_a.none(),
        "dst_w13_scale"_a.none(), "dst_w2_scale"_a.none(), "dst_w13_global_scale"_a.none(),
        "dst_w2_global_scale"_a.none(), "stream"_a.none());
  m.def("quantize_nvfp4", &quantize_nvfp4_call, "x"_a.none(), "q"_a.none(), "scale"_a.none(),
        "global_scale"_a.none(), "static_global_scale"_a, "stream"_a.none());
  m.def("dequantize_nvfp4", &dequantize_nvfp4_call, "q"_a.none(), "scale"_a.none(),
        "global_scale"_a.none(), "out"_a.none(), "stream"_a.none());
  m.def("quantize_activations", &quantize_activations_call, "x"_a.none(), "quant_scheme"_a.none(),
        "q"_a.none(), "scale"_a.none(), "static_scale"_a, "stream"_a.none());
  m.def("quantize_weights", &quantize_weights_call, "w"_a.none(), "quant_scheme"_a.none(),
        "q"_a.none(), "scale"_a.none(), "stream"_a.none());
  m.def("experts_workspace_size", &experts_workspace_size_call, "num_tokens"_a, "hidden"_a,
        "intermediate"_a, "top_k"_a, "num_experts"_a, "local_expert_offset"_a,
        "local_num_experts"_a, "act"_a, "do_finalize"_a, "batched"_a, "quant_scheme"_a.none());
  m.def("fused_moe_workspace_size", &fused_moe_workspace_size_call, "num_tokens"_a, "hidden"_a,
        "intermediate"_a, "top_k"_a, "num_experts"_a, "local_expert_offset"_a,
        "local_num_experts"_a, "act"_a, "method"_a, "n_group"_a, "topk_group"_a,
        "quant_scheme"_a.none());
  bind_all_to_all(m);
}
