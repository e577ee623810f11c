// CUDA kernels for sparse SAE latents (idx/vals [B, K], -1 padding). No torch headers: the launchers take
// raw device pointers, sizes and a stream; sae_core/kernels/build.py compiles this file with nvcc and loads
// it with ctypes. Inputs are fp32 or bf16 (dtype code 0 / 1), accumulation is always fp32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "sparse_index.cuh"

namespace {

constexpr int kThreads = 128;  // threads per block in the row kernels
constexpr int kCols = 4;       // columns of D each thread accumulates in registers
constexpr int kTile = 128;     // (idx, val) pairs staged in shared memory per pass

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// out[b] = sum_j vals[b, j] * table[idx[b, j]] (+ bias). Block (b, column chunk); threads over D, so each
// table row is read coalesced; the row's (idx, val) pairs are staged once in shared memory.
template <typename T>
__global__ void gather_sum_kernel(const int64_t* __restrict__ idx, const T* __restrict__ vals,
                                  const T* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out,
                                  int64_t K, int64_t F, int64_t D) {
    __shared__ int64_t s_idx[kTile];
    __shared__ float s_val[kTile];
    const int64_t b = blockIdx.x;
    const int64_t d_base = static_cast<int64_t>(blockIdx.y) * kThreads * kCols + threadIdx.x;
    float acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = 0.0f;
    for (int64_t j0 = 0; j0 < K; j0 += kTile) {
        const int64_t n = K - j0 < kTile ? K - j0 : kTile;
        __syncthreads();  // the previous tile is fully consumed
        for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
            const int64_t f = idx[b * K + j0 + t];
            const bool ok = sae::valid_index(f, F);
            s_idx[t] = ok ? f : -1;
            s_val[t] = ok ? to_f(vals[b * K + j0 + t]) : 0.0f;
        }
        __syncthreads();
        for (int64_t t = 0; t < n; ++t) {
            const int64_t f = s_idx[t];
            if (f < 0) continue;  // uniform across the block
            const T* row = table + f * D;
            const float v = s_val[t];
#pragma unroll
            for (int c = 0; c < kCols; ++c) {
                const int64_t d = d_base + c * kThreads;
                if (d < D) acc[c] += v * to_f(row[d]);
            }
        }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
        const int64_t d = d_base + c * kThreads;
        if (d < D) out[b * D + d] = from_f<T>(acc[c] + (bias != nullptr ? to_f(bias[d]) : 0.0f));
    }
}

// out[e] = dot(src[e / K], table[idx[e]]) for flat entries e: one warp per entry, lanes over D, shuffle-reduced.
template <typename T>
__global__ void row_dots_kernel(const int64_t* __restrict__ idx, const T* __restrict__ src,
                                const T* __restrict__ table, T* __restrict__ out, int64_t BK, int64_t K,
                                int64_t F, int64_t D) {
    const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (e >= BK) return;  // blockDim is a multiple of 32, so whole warps leave together
    const int64_t f = idx[e];
    float acc = 0.0f;
    if (sae::valid_index(f, F)) {
        const T* s = src + sae::entry_row(e, K) * D;
        const T* r = table + f * D;
        for (int64_t d = lane; d < D; d += 32) acc += to_f(s[d]) * to_f(r[d]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) out[e] = from_f<T>(acc);
}

// out[f] = sum over the CSR entries e of latent f of vals[perm[e]] * src[perm[e] / K]. One block per latent
// row (and column chunk) reduces it in registers: no atomics, deterministic, every row written. Element d of
// latent f goes to out[f * row_stride + d * col_stride]: (D, 1) writes [F, D], (1, F) the transpose [D, F].
template <typename T>
__global__ void scatter_rows_kernel(const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                                    const T* __restrict__ vals, const T* __restrict__ src, T* __restrict__ out,
                                    int64_t K, int64_t D, int64_t row_stride, int64_t col_stride) {
    const int64_t f = blockIdx.x;
    const int64_t d_base = static_cast<int64_t>(blockIdx.y) * kThreads * kCols + threadIdx.x;
    float acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = 0.0f;
    const sae::Range r = sae::csr_range(offsets, f);
    for (int64_t e = r.begin; e < r.end; ++e) {
        const int64_t flat = perm[e];  // same address in every thread: a broadcast
        const float v = to_f(vals[flat]);
        const T* s = src + sae::entry_row(flat, K) * D;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
            const int64_t d = d_base + c * kThreads;
            if (d < D) acc[c] += v * to_f(s[d]);
        }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
        const int64_t d = d_base + c * kThreads;
        if (d < D) out[f * row_stride + d * col_stride] = from_f<T>(acc[c]);
    }
}

dim3 row_grid(int64_t rows, int64_t D) {
    return dim3(static_cast<unsigned>(rows), static_cast<unsigned>((D + kThreads * kCols - 1) / (kThreads * kCols)));
}

}  // namespace

extern "C" {

// dtype: 0 = fp32, 1 = bf16 (all floating inputs and the output share it). Returns a cudaError_t code.
int sae_cuda_gather_sum(int dtype, const int64_t* idx, const void* vals, const void* table, const void* bias,
                        void* out, int64_t B, int64_t K, int64_t F, int64_t D, cudaStream_t stream) {
    if (B == 0 || D == 0) return 0;
    if (dtype == 0)
        gather_sum_kernel<float><<<row_grid(B, D), kThreads, 0, stream>>>(
            idx, static_cast<const float*>(vals), static_cast<const float*>(table),
            static_cast<const float*>(bias), static_cast<float*>(out), K, F, D);
    else
        gather_sum_kernel<__nv_bfloat16><<<row_grid(B, D), kThreads, 0, stream>>>(
            idx, static_cast<const __nv_bfloat16*>(vals), static_cast<const __nv_bfloat16*>(table),
            static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), K, F, D);
    return static_cast<int>(cudaGetLastError());
}

int sae_cuda_row_dots(int dtype, const int64_t* idx, const void* src, const void* table, void* out, int64_t B,
                      int64_t K, int64_t F, int64_t D, cudaStream_t stream) {
    const int64_t BK = B * K;
    if (BK == 0) return 0;
    const unsigned blocks = static_cast<unsigned>((BK * 32 + 255) / 256);
    if (dtype == 0)
        row_dots_kernel<float><<<blocks, 256, 0, stream>>>(idx, static_cast<const float*>(src),
                                                          static_cast<const float*>(table),
                                                          static_cast<float*>(out), BK, K, F, D);
    else
        row_dots_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(
            idx, static_cast<const __nv_bfloat16*>(src), static_cast<const __nv_bfloat16*>(table),
            static_cast<__nv_bfloat16*>(out), BK, K, F, D);
    return static_cast<int>(cudaGetLastError());
}

// transposed == 0: out [F, D]; transposed == 1: out [D, F] (an encoder weight gradient in W_enc's layout).
int sae_cuda_scatter_rows(int dtype, const int64_t* perm, const int64_t* offsets, const void* vals,
                          const void* src, void* out, int64_t F, int64_t K, int64_t D, int transposed,
                          cudaStream_t stream) {
    if (F == 0 || D == 0) return 0;
    const int64_t row_stride = transposed ? 1 : D, col_stride = transposed ? F : 1;
    if (dtype == 0)
        scatter_rows_kernel<float><<<row_grid(F, D), kThreads, 0, stream>>>(
            perm, offsets, static_cast<const float*>(vals), static_cast<const float*>(src),
            static_cast<float*>(out), K, D, row_stride, col_stride);
    else
        scatter_rows_kernel<__nv_bfloat16><<<row_grid(F, D), kThreads, 0, stream>>>(
            perm, offsets, static_cast<const __nv_bfloat16*>(vals), static_cast<const __nv_bfloat16*>(src),
            static_cast<__nv_bfloat16*>(out), K, D, row_stride, col_stride);
    return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
