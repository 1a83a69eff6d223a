// nativeq_runner: run a nativeq artifact (an exported Relax VM library) on .npy inputs.
//
// Built for the device (aarch64, linked against the device's libtvm_runtime.so and
// libtvm_ffi.so); used on the Raspberry Pi itself and, on an x86 machine, under qemu-aarch64
// by `nativeq verify`. Needs nothing else: no Python, no TVM compiler.
//
//   nativeq_runner LIB.so OUT_DIR [--require asimd,asimddp] [--entry main] [--repeat N] [--maps FILE] IN0.npy ...
//
// Inputs are passed in the manifest's input order; outputs are written as OUT_DIR/out0.npy,
// out1.npy, ... (a tuple result is flattened in order). With --repeat N the entry is called N
// times and the mean wall time is printed as `time_ms <value>`. With --maps FILE the process's
// memory map (/proc/self/maps, which qemu-user emulates with guest addresses) is copied to FILE
// at the end, so that instruction addresses can be told apart by library (and LIB.so's by symbol).
// Exit codes: 0 ok, 2 usage or input error, 3 this CPU lacks a required feature, 4 TVM error.

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__aarch64__)
#include <sys/auxv.h>
#endif

namespace ffi = tvm::ffi;

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------- CPU features
// Names as /proc/cpuinfo spells them; bits from linux/arch/arm64/include/uapi/asm/hwcap.h.
struct HwcapBit {
  const char* name;
  int word;  // 1: AT_HWCAP, 2: AT_HWCAP2
  int bit;
  const char* friendly;
};
const HwcapBit kArmFeatures[] = {
    {"fp", 1, 0, "floating point (fp)"},   {"asimd", 1, 1, "NEON (asimd)"},
    {"asimdhp", 1, 10, "fp16 NEON (asimdhp)"}, {"asimdrdm", 1, 12, "asimdrdm"},
    {"asimddp", 1, 20, "dotprod (asimddp)"}, {"sve", 1, 22, "SVE (sve)"},
    {"asimdfhm", 1, 23, "asimdfhm"},       {"sve2", 2, 1, "SVE2 (sve2)"},
    {"i8mm", 2, 13, "int8 matrix multiply (i8mm)"}, {"bf16", 2, 14, "bf16"},
};

// Returns the required features this CPU lacks, as friendly names.
std::vector<std::string> MissingFeatures(const std::vector<std::string>& required) {
  std::vector<std::string> missing;
#if defined(__aarch64__)
  unsigned long words[3] = {0, getauxval(AT_HWCAP), getauxval(AT_HWCAP2)};
  for (const std::string& name : required) {
    bool known = false;
    for (const HwcapBit& f : kArmFeatures) {
      if (name != f.name) continue;
      known = true;
      if (!((words[f.word] >> f.bit) & 1UL)) missing.push_back(f.friendly);
    }
    if (!known) throw UsageError("unknown aarch64 cpu feature '" + name + "' in --require");
  }
#else
  // Built for the host: the Python side checks x86 flags before calling us.
  (void)required;
#endif
  return missing;
}

// ---------------------------------------------------------------- tensors and .npy files
// Host tensors for the inputs, 64-byte aligned as TVM's own CPU allocator does.
struct AlignedCPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t nbytes = (ffi::GetDataSize(*tensor) + 63) / 64 * 64;
    tensor->data = std::aligned_alloc(64, nbytes == 0 ? 64 : nbytes);
    if (tensor->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct NpyType {
  const char* descr;  // without the byte-order character
  DLDataType dtype;
};
const NpyType kNpyTypes[] = {
    {"f4", {kDLFloat, 32, 1}}, {"f8", {kDLFloat, 64, 1}}, {"f2", {kDLFloat, 16, 1}},
    {"i1", {kDLInt, 8, 1}},    {"i2", {kDLInt, 16, 1}},   {"i4", {kDLInt, 32, 1}},
    {"i8", {kDLInt, 64, 1}},   {"u1", {kDLUInt, 8, 1}},   {"u2", {kDLUInt, 16, 1}},
    {"u4", {kDLUInt, 32, 1}},  {"u8", {kDLUInt, 64, 1}},  {"b1", {kDLBool, 8, 1}},
};

std::string HeaderValue(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw UsageError("npy header lacks '" + key + "'");
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  size_t end = header[at] == '(' ? header.find(')', at) + 1
                                 : header.find_first_of(",}", header[at] == '\'' ? header.find('\'', at + 1) : at);
  return header.substr(at, end - at);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot open input " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw UsageError(path + " is not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len16 = 0;
    in.read(reinterpret_cast<char*>(&len16), 2);
    header_len = len16;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  std::string descr = HeaderValue(header, "descr");  // e.g. '<f4' or '|i1'
  if (descr.size() < 4 || descr[1] == '>') throw UsageError(path + ": unsupported dtype " + descr);
  std::string code = descr.substr(2, descr.size() - 3);
  const NpyType* type = nullptr;
  for (const NpyType& t : kNpyTypes) {
    if (code == t.descr) type = &t;
  }
  if (type == nullptr) throw UsageError(path + ": unsupported dtype " + descr);
  if (HeaderValue(header, "fortran_order") != "False") throw UsageError(path + ": Fortran-ordered arrays are not supported");
  std::string shape_text = HeaderValue(header, "shape");  // e.g. (1, 80, 200) or (3,) or ()
  std::vector<int64_t> shape;
  std::stringstream dims(shape_text.substr(1, shape_text.size() - 2));
  for (std::string dim; std::getline(dims, dim, ',');) {
    if (dim.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(dim));
  }
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  size_t nbytes = static_cast<size_t>(numel) * (type->dtype.bits / 8);
  std::vector<char> data(nbytes);
  in.read(data.data(), static_cast<std::streamsize>(nbytes));
  if (!in) throw UsageError(path + " is truncated");
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                                type->dtype, DLDevice{kDLCPU, 0});
  std::memcpy(tensor.data_ptr(), data.data(), nbytes);
  return tensor;
}

void WriteNpy(const std::string& path, const ffi::Tensor& tensor) {
  DLDataType dtype = tensor.dtype();
  const char* code = nullptr;
  for (const NpyType& t : kNpyTypes) {
    if (t.dtype.code == dtype.code && t.dtype.bits == dtype.bits && dtype.lanes == 1) code = t.descr;
  }
  if (code == nullptr) throw std::runtime_error("output dtype is not representable in .npy");
  std::string shape_text = "(";
  int64_t numel = 1;
  for (int64_t d : tensor.shape()) {
    shape_text += std::to_string(d) + ", ";
    numel *= d;
  }
  if (tensor.ndim() > 1) shape_text.resize(shape_text.size() - 2);  // "(2, 3"; a 1-d shape keeps "(3,"
  if (tensor.ndim() == 1) shape_text.resize(shape_text.size() - 1);
  shape_text += ")";
  std::string header = std::string("{'descr': '") + (dtype.bits == 8 ? "|" : "<") + code +
                       "', 'fortran_order': False, 'shape': " + shape_text + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  size_t nbytes = static_cast<size_t>(numel) * (dtype.bits / 8);
  if (tensor.device().device_type != kDLCPU || !tensor.IsContiguous()) {
    throw std::runtime_error("output is not a contiguous CPU tensor");
  }
  const char* data = static_cast<const char*>(tensor.data_ptr()) + tensor.byte_offset();
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    uint16_t len = static_cast<uint16_t>(header.size());
    out.write("\x93NUMPY\x01\x00", 8);
    out.write(reinterpret_cast<const char*>(&len), 2);
    out << header;
    out.write(data, static_cast<std::streamsize>(nbytes));
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp);
}

void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto items = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *items) Flatten(item, out);
  } else {
    throw std::runtime_error("entry returned a value that is neither a tensor nor a tuple: " + value.GetTypeKey());
  }
}

std::vector<std::string> SplitCommas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, ',');) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional, required;
  std::string entry = "main";
  int repeat = 0;
  std::string maps;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      bool has_value = i + 1 < argc;
      if (arg == "--require" && has_value) {
        required = SplitCommas(argv[++i]);
      } else if (arg == "--entry" && has_value) {
        entry = argv[++i];
      } else if (arg == "--repeat" && has_value) {
        repeat = std::stoi(argv[++i]);
      } else if (arg == "--maps" && has_value) {
        maps = argv[++i];
      } else if (arg.rfind("--", 0) == 0) {
        throw UsageError("unknown option " + arg);
      } else {
        positional.push_back(arg);
      }
    }
    if (positional.size() < 2) {
      throw UsageError("usage: nativeq_runner LIB.so OUT_DIR [--require f1,f2] [--entry main] [--repeat N] [--maps FILE] "
                       "IN0.npy ...");
    }
    std::vector<std::string> missing = MissingFeatures(required);
    if (!missing.empty()) {
      std::string names;
      for (const std::string& m : missing) names += (names.empty() ? "" : ", ") + m;
      std::fprintf(stderr, "nativeq_runner: this CPU lacks %s, which %s was compiled for\n", names.c_str(),
                   positional[0].c_str());
      return 3;
    }
    std::vector<ffi::Tensor> inputs;
    for (size_t i = 2; i < positional.size(); ++i) inputs.push_back(ReadNpy(positional[i]));

    ffi::Module lib = ffi::Module::LoadFromFile(positional[0]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, /*pooled allocator*/ 2);
    ffi::Optional<ffi::Function> func = vm->GetFunction(entry);
    if (!func.has_value()) throw UsageError("the artifact has no function '" + entry + "'");

    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    func.value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    if (repeat > 0) {
      auto start = std::chrono::steady_clock::now();
      for (int r = 0; r < repeat; ++r) func.value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
      std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
      std::printf("time_ms %.4f\n", elapsed.count() / repeat);
    }
    std::vector<ffi::Tensor> outputs;
    Flatten(result, &outputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      WriteNpy(positional[1] + "/out" + std::to_string(i) + ".npy", outputs[i]);
    }
    std::printf("outputs %zu\n", outputs.size());
    if (!maps.empty()) {
      std::ifstream in("/proc/self/maps");
      std::ofstream out(maps);
      out << in.rdbuf();
      if (!in || !out) throw std::runtime_error("cannot copy /proc/self/maps to " + maps);
    }
    return 0;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "nativeq_runner: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::string message = e.what();
    std::fprintf(stderr, "nativeq_runner: %s\n", message.substr(0, message.find('\n')).c_str());
    return 4;
  }
}
