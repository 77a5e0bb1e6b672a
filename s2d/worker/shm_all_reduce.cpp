// The shared-memory all-reduce of tensor-parallel ranks on one CPU node (s2d/worker/parallel.py),
// as torch ops, so that a compiled step (an AOTInductor package) calls it without Python.
//
// s2d::shm_attach maps the group's file: one flag per rank (its own 64-byte line), then two
// buffers of `size` rows of `cap` floats. s2d::shm_all_reduce copies x (as fp32) into this rank's
// row of the buffer for the next round, raises its flag to the round's number, spins until every
// flag has reached it, and sums the rows in rank order, so every rank gets the same bits. The two
// buffers alternate by round: a rank can only be one round ahead, since it waits for every flag.
// A tensor past `cap` goes in several rounds.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>

namespace {

struct Group {
  int64_t* flags = nullptr;  // [size * 8]: rank r's round at flags[8 r]
  float* bufs = nullptr;     // [2, size, cap]
  int64_t rank = 0, size = 1, cap = 0;
  double timeout_s = 60.0;
};
Group group;  // a rank process is in one group

constexpr int64_t kSpin = 20000;  // busy polls before each poll also yields the core

void attach(const std::string& path, int64_t rank, int64_t size, int64_t cap, double timeout_s) {
  const size_t bytes = 64 * size + 2 * size * cap * sizeof(float);
  int fd = open(path.c_str(), O_RDWR | O_CREAT, 0600);
  TORCH_CHECK(fd >= 0, "tensor-parallel shared memory: cannot open ", path);
  struct stat st;
  fstat(fd, &st);
  if (static_cast<size_t>(st.st_size) < bytes) {
    TORCH_CHECK(ftruncate(fd, bytes) == 0, "tensor-parallel shared memory: cannot size ", path);
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  TORCH_CHECK(p != MAP_FAILED, "tensor-parallel shared memory: cannot map ", path);
  group = Group{static_cast<int64_t*>(p), reinterpret_cast<float*>(static_cast<char*>(p) + 64 * size), rank, size, cap,
                timeout_s};
}

void wait_for(int64_t r, int64_t round) {
  const int64_t* flag = group.flags + 8 * r;
  int64_t polls = 0;
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < round) {
    if (++polls < kSpin) continue;
    sched_yield();
    if (polls == kSpin) {
      deadline = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                         std::chrono::duration<double>(group.timeout_s));
    } else if ((polls & 1023) == 0 && std::chrono::steady_clock::now() > deadline) {
      TORCH_CHECK(false, "tensor-parallel all-reduce: rank ", r, " did not answer in ", group.timeout_s, " s");
    }
  }
}

at::Tensor all_reduce(const at::Tensor& x) {
  TORCH_CHECK(group.flags != nullptr, "tensor-parallel all-reduce before shm_attach");
  const at::Tensor in = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = in.numel(), size = group.size, cap = group.cap;
  int64_t* own = group.flags + 8 * group.rank;
  for (int64_t lo = 0; lo < n; lo += cap) {
    const int64_t m = std::min(cap, n - lo);
    const int64_t round = __atomic_load_n(own, __ATOMIC_RELAXED) + 1;
    float* rows = group.bufs + (round & 1) * size * cap;
    std::memcpy(rows + group.rank * cap, src + lo, m * sizeof(float));
    __atomic_store_n(own, round, __ATOMIC_RELEASE);
    for (int64_t r = 0; r < size; ++r) wait_for(r, round);
    for (int64_t i = 0; i < m; ++i) {
      float s = 0.f;
      for (int64_t r = 0; r < size; ++r) s += rows[r * cap + i];
      dst[lo + i] = s;
    }
  }
  return out.to(x.scalar_type()).view(x.sizes());
}

}  // namespace

TORCH_LIBRARY(s2d_shm, m) {
  m.def("attach(str path, int rank, int size, int cap, float timeout_s) -> ()", &attach);
  m.def("all_reduce(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(s2d_shm, CPU, m) {
  m.impl("all_reduce", &all_reduce);
}
