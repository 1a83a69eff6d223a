// nativeq_rpc_server: a TVM RPC server for the device, without Python.
//
// Built for aarch64 against the device's libtvm_runtime.so and libtvm_ffi.so (the same build as
// nativeq_runner), so a Raspberry Pi needs no Python or TVM wheel to be measured by
// `nativeq tune --rpc HOST:PORT`; on an x86 machine it runs under qemu-aarch64 as a stand-in Pi.
//
//   nativeq_rpc_server --port PORT [--host 0.0.0.0] [--key KEY] [--work-dir DIR]
//
// It speaks the handshake of TVM's Python server (tvm/rpc/server.py) for direct connections
// (no tracker): magic, "client:KEY" -> success code, "server:KEY". Each session is served by
// a forked child in its own directory under the work dir (uploaded kernels land there), with
// the runtime's own RPC loop (`rpc.ServerLoop`); a crashing kernel ends only its session.
// Exit codes: 0 never (serves until killed), 2 usage or socket error.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace ffi = tvm::ffi;

namespace {

constexpr int32_t kRpcMagic = 0xFF271;  // tvm/rpc/base.py RPC_MAGIC
constexpr int32_t kCodeSuccess = kRpcMagic + 0;
constexpr int32_t kCodeMismatch = kRpcMagic + 2;

bool RecvAll(int fd, void* data, size_t size) {
  auto* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = recv(fd, p, size, 0);
    if (n <= 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool SendAll(int fd, const void* data, size_t size) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = send(fd, p, size, 0);
    if (n <= 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool SendInt(int fd, int32_t value) { return SendAll(fd, &value, sizeof(value)); }  // little endian, as the client

// The server side of the Python client's handshake; true if the client asked for our key.
bool Handshake(int fd, const std::string& key) {
  int32_t magic = 0, length = 0;
  if (!RecvAll(fd, &magic, 4) || magic != kRpcMagic) return false;
  if (!RecvAll(fd, &length, 4) || length < 0 || length > 4096) return false;
  std::string client(static_cast<size_t>(length), '\0');
  if (!RecvAll(fd, client.data(), client.size())) return false;
  std::string header = client.substr(0, client.find(' '));  // "client:KEY [-timeout=...]"
  if (header != "client:" + key) {
    SendInt(fd, kCodeMismatch);
    std::fprintf(stderr, "nativeq_rpc_server: refused a client with key %s\n", header.c_str());
    return false;
  }
  std::string server = "server:" + key;
  return SendInt(fd, kCodeSuccess) && SendInt(fd, static_cast<int32_t>(server.size())) &&
         SendAll(fd, server.data(), server.size());
}

[[noreturn]] void Serve(int fd, const std::string& session_dir) {
  mkdir(session_dir.c_str(), 0755);
  if (chdir(session_dir.c_str()) != 0) std::_Exit(2);
  // NOTE: the runtime's upload/download/remove server functions resolve file names through this
  // global, and the client's load_module calls the second one; TVM's Python server registers both.
  ffi::Function::SetGlobal(
      "tvm.rpc.server.workpath",
      ffi::Function::FromTyped([session_dir](std::string path) { return session_dir + "/" + path; }), true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module",
                           ffi::Function::FromTyped([session_dir](std::string path) {
                             return ffi::Module::LoadFromFile(session_dir + "/" + path);
                           }),
                           true);
  ffi::Function::GetGlobalRequired("rpc.ServerLoop")(fd);
  close(fd);
  std::_Exit(0);
}

int Usage() {
  std::fprintf(stderr, "usage: nativeq_rpc_server --port PORT [--host ADDR] [--key KEY] [--work-dir DIR]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string host = "0.0.0.0", key, work_dir = "/tmp/nativeq_rpc_server";
  int port = -1;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) return Usage();
    if (arg == "--port") port = std::atoi(argv[++i]);
    else if (arg == "--host") host = argv[++i];
    else if (arg == "--key") key = argv[++i];
    else if (arg == "--work-dir") work_dir = argv[++i];
    else return Usage();
  }
  if (port <= 0 || port > 65535) return Usage();
  mkdir(work_dir.c_str(), 0755);

  int listener = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1 ||
      bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listener, 8) != 0) {
    std::fprintf(stderr, "nativeq_rpc_server: cannot listen on %s:%d: %s\n", host.c_str(), port, std::strerror(errno));
    return 2;
  }
  std::printf("nativeq_rpc_server listening on %s:%d\n", host.c_str(), port);
  std::fflush(stdout);

  for (int session = 0;; ++session) {
    int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) continue;
    if (!Handshake(fd, key)) {
      close(fd);
      continue;
    }
    pid_t child = fork();
    if (child == 0) {
      close(listener);
      Serve(fd, work_dir + "/session" + std::to_string(session));
    }
    close(fd);
    int status = 0;
    if (child > 0) waitpid(child, &status, 0);  // one session at a time, as TVM's server
  }
}
