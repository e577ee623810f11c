// Per-element index logic shared by the CUDA kernels (sparse_cuda.cu) and their CPU twin
// (sparse_cpu.cpp), so both agree on padding, CSR ranges and which batch row an entry belongs to.
//
// Layout: idx/vals are [B, K] row-major; idx == -1 pads rows with fewer than K non-zeros.
// The transposed (CSR) view sorts the B*K flat entries by latent: entries perm[offsets[f]..offsets[f+1])
// are the flat positions whose index is f.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define SAE_HD __host__ __device__ __forceinline__
#else
#define SAE_HD inline
#endif

namespace sae {

// Only indices in [0, n_rows) address a row; -1 (padding) and anything out of range contribute nothing.
SAE_HD bool valid_index(int64_t i, int64_t n_rows) { return i >= 0 && i < n_rows; }

// Flat entry e = b * K + j belongs to batch row b.
SAE_HD int64_t entry_row(int64_t flat, int64_t k) { return flat / k; }

struct Range {
    int64_t begin;
    int64_t end;
};

// The sorted entries that hit latent f.
SAE_HD Range csr_range(const int64_t* offsets, int64_t f) { return Range{offsets[f], offsets[f + 1]}; }

// Split n items into `parts` near-equal chunks; chunk p is [begin, end).
SAE_HD Range chunk(int64_t n, int64_t parts, int64_t p) {
    int64_t base = n / parts, extra = n % parts;
    int64_t begin = p * base + (p < extra ? p : extra);
    return Range{begin, begin + base + (p < extra ? 1 : 0)};
}

}  // namespace sae
