// gguf_matmul.h alone, without torch, for an instruction set chosen at build time (-march=...): the
// tests build it for each of AVX-512, AVX2 and plain x86-64 that the machine can run and compare
// their outputs, and benchmarks/cpu_kernels.py times the AVX2 path on an AVX-512 machine. Threads
// are OpenMP's, split as at::parallel_for splits them.
#include <omp.h>

#include "gguf_matmul.h"

namespace {

struct OmpParallelFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    const int64_t n = end - begin;
    if (n <= 0) return;
#pragma omp parallel
    {
      const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t chunk = std::max(grain, (n + threads - 1) / threads), first = begin + t * chunk;
      if (first < end) fn(first, std::min(end, first + chunk));
    }
  }
};

}  // namespace

extern "C" {

// As torch.ops.kvserve.gguf_linear (cpu.cpp), on raw pointers; bias may be null.
void kvserve_gguf_matmul(const float* x, const uint8_t* q, const uint16_t* scales, const float* bias, float* y,
                         int64_t rows, int64_t n_out, int64_t k_in, int four) {
  if (four)
    kvserve::gguf::matmul<true>(x, q, scales, bias, y, rows, n_out, k_in, OmpParallelFor{});
  else
    kvserve::gguf::matmul<false>(x, q, scales, bias, y, rows, n_out, k_in, OmpParallelFor{});
}

// The instruction set the build's vectors use: 512, 256 or 128 bits.
int kvserve_gguf_vector_bits() { return kvserve::gguf::kLanes * 32; }
}
