// z = x · Sᵀ for a ±1 matrix S stored as packed bits (onebit.quant.packing: row-major, 8 signs per
// byte, least significant bit first, bit 1 = +1, bit 0 = −1, the last byte of a row zero-padded).
//
// Decode (few tokens): no multiplications and no unpacking. With P the set bits of a row,
//     Σ_j x_j s_j = 2 Σ_{j∈P} x_j − Σ_j x_j,
// and 16 bits of the row are used directly as an AVX-512 lane mask: acc += x[j:j+16] where the bit
// is set (one masked add per 16 weights). Eight rows share each load of x; threads split the rows.
// The weights are read once, as one sequential stream per row: 1 bit per weight. For one token
// (the decode step) AVX-512 CPUs use a table kernel instead (gemv_rows_lut: one lookup and one
// add per 4 weights of 16 rows), which needs half the vector ops of the masked adds.
//
// Prefill (many tokens): the arithmetic is M·out·in multiply-adds either way, so it is done by the
// BLAS GEMM on ±1 tiles unpacked from the bits into a small buffer: fp32 (exact to fp32 rounding),
// bf16 (sign_matmul_bf16: bf16 activations and results) or int8 against int8 activations
// (sign_matmul_int8: int32 results, exact for the integers given).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "packed.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ONEBIT_X86 1
#define ONEBIT_TARGET(isa) __attribute__((target(isa)))
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define ONEBIT_AVX512 1  // the whole build may use AVX-512 (unpacking tiles for prefill)
#endif

#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2
#endif

namespace onebit {
namespace {

// The decode kernel's instruction set, chosen at run time: the best this CPU has (AVX-512 with
// byte/word ops, else AVX2 with FMA, else portable C++), lowered by ONEBIT_KERNEL_ISA
// (avx512 | avx2 | scalar) or the op kernel_isa (tests and benchmarks force each path).
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Lut = 3 };

int64_t cpu_isa() {
#if ONEBIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512Lut;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kScalar;
}

int64_t env_isa(int64_t best) {
  const char* e = std::getenv("ONEBIT_KERNEL_ISA");
  if (e == nullptr) return best;
  const std::string v(e);
  const int64_t want = v == "scalar" ? kScalar
                       : v == "avx2"   ? kAvx2
                       : v == "avx512" ? kAvx512
                                       : kAvx512Lut;
  return std::min(want, best);
}

std::atomic<int64_t>& isa_state() {
  static std::atomic<int64_t> isa{env_isa(cpu_isa())};
  return isa;
}

// Bits [j, j+n) of a row (n ≤ 16, j a multiple of 8) as a 16-bit mask; reads only bytes it owns.
inline uint16_t bits16(const uint8_t* row, int64_t j, int64_t n) {
  uint16_t m = 0;
  std::memcpy(&m, row + j / 8, static_cast<size_t>((n + 7) / 8));
  return n >= 16 ? m : static_cast<uint16_t>(m & ((1u << n) - 1u));
}

// The decode kernels: z[m, r] for rows [r0, r1) and all M tokens. x (M, in) fp32,
// xsum[m] = Σ_j x[m, j]; each returns 2 Σ_{j∈P} x_j − Σ_j x_j per row.
void gemv_rows_scalar(const float* x, const float* xsum, const uint8_t* P, float* z, int64_t M,
                      int64_t in, int64_t nb, int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = P + r * nb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      float acc = 0;
      for (int64_t j = 0; j < in; ++j)
        if ((p[j >> 3] >> (j & 7)) & 1) acc += xm[j];
      z[m * out + r] = 2.0f * acc - xsum[m];
    }
  }
}

#if ONEBIT_X86
// A block of R rows is R·nb contiguous bytes read as R short interleaved streams, which the
// hardware prefetcher does not follow: fetch the block PREFETCH_BLOCKS ahead by hand (p: the block
// of row r; nothing past row r1).
inline void prefetch_ahead(const uint8_t* p, int64_t r, int64_t r1, int R, int64_t nb) {
  constexpr int64_t kAhead = PREFETCH_BLOCKS;
  if (r + (kAhead + 1) * R > r1) return;
  const uint8_t* ahead = p + kAhead * R * nb;
  for (int64_t o = 0; o < R * nb; o += 64)
    _mm_prefetch(reinterpret_cast<const char*>(ahead + o), _MM_HINT_T0);
}

ONEBIT_TARGET("avx512f,avx512bw")
void gemv_rows_avx512(const float* x, const float* xsum, const uint8_t* P, float* z, int64_t M,
                      int64_t in, int64_t nb, int64_t out, int64_t r0, int64_t r1) {
  const int64_t full = in / 16 * 16, rem = in - full;
  constexpr int R = 8;  // rows per pass over x: R independent accumulators share each x load
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const uint8_t* p = P + r * nb;
    prefetch_ahead(p, r, r1, R, nb);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      __m512 acc[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t j = 0; j < full; j += 16) {
        const __m512 v = _mm512_loadu_ps(xm + j);
        for (int i = 0; i < R; ++i) {
          uint16_t k;
          std::memcpy(&k, p + i * nb + j / 8, 2);
          acc[i] = _mm512_mask_add_ps(acc[i], k, acc[i], v);
        }
      }
      if (rem) {
        const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rem) - 1u), xm + full);
        for (int i = 0; i < R; ++i)
          acc[i] = _mm512_mask_add_ps(acc[i], bits16(p + i * nb, full, rem), acc[i], v);
      }
      float* zm = z + m * out + r;
      for (int i = 0; i < R; ++i) zm[i] = 2.0f * _mm512_reduce_add_ps(acc[i]) - xsum[m];
    }
  }
  for (; r < r1; ++r) {
    const uint8_t* p = P + r * nb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      __m512 a = _mm512_setzero_ps();
      for (int64_t j = 0; j < full; j += 16) {
        uint16_t k;
        std::memcpy(&k, p + j / 8, 2);
        a = _mm512_mask_add_ps(a, k, a, _mm512_loadu_ps(xm + j));
      }
      if (rem)
        a = _mm512_mask_add_ps(
            a, bits16(p, full, rem), a,
            _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rem) - 1u), xm + full));
      z[m * out + r] = 2.0f * _mm512_reduce_add_ps(a) - xsum[m];
    }
  }
}

// AVX2: a byte of signs becomes 8 floats of ±1 through a 256-entry table (8 KB, in L1), and one
// FMA (its table operand loaded in the same instruction) adds x·s for 8 weights of a row; R rows
// share each load of x, as above. The products are exact (x·±1), so this sums the same terms as
// the masked adds, in another order.
struct Sign8Table {
  alignas(32) float lanes[256][8];
  Sign8Table() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) lanes[b][i] = ((b >> i) & 1) ? 1.0f : -1.0f;
  }
};
const Sign8Table kSign8;

// Σ_j x_j s_j over the last in % 8 weights of a row (a partial byte).
inline float tail_dot(const float* xm, const uint8_t* p, int64_t full, int64_t in) {
  float t = 0;
  for (int64_t j = full; j < in; ++j) t += ((p[j >> 3] >> (j & 7)) & 1) ? xm[j] : -xm[j];
  return t;
}

ONEBIT_TARGET("avx2,fma")
void gemv_rows_avx2(const float* x, const float* xsum, const uint8_t* P, float* z, int64_t M,
                    int64_t in, int64_t nb, int64_t out, int64_t r0, int64_t r1) {
  (void)xsum;  // the FMA sums x·s directly
  const int64_t full = in / 8 * 8;
  constexpr int R = 8;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const uint8_t* p = P + r * nb;
    prefetch_ahead(p, r, r1, R, nb);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      __m256 acc[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t j = 0; j < full; j += 8) {
        const __m256 v = _mm256_loadu_ps(xm + j);
        for (int i = 0; i < R; ++i)
          acc[i] = _mm256_fmadd_ps(v, _mm256_load_ps(kSign8.lanes[p[i * nb + j / 8]]), acc[i]);
      }
      float* zm = z + m * out + r;
      for (int i = 0; i < R; ++i) zm[i] = hsum256(acc[i]) + tail_dot(xm, p + i * nb, full, in);
    }
  }
  for (; r < r1; ++r) {
    const uint8_t* p = P + r * nb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      __m256 a = _mm256_setzero_ps();
      for (int64_t j = 0; j < full; j += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + j), _mm256_load_ps(kSign8.lanes[p[j / 8]]), a);
      z[m * out + r] = hsum256(a) + tail_dot(xm, p, full, in);
    }
  }
}

// One token, AVX-512, by table lookup: for each group of 4 columns a table of the 16 sums
// Σ_{i<4} ±x_{4g+i} (entry b: + where bit i of b is set), built once per call; then 16 rows at a
// time, a gather takes 32 columns' bits of each row (one dword per row), and each of its 8
// nibbles picks, per row, its group's sum with one vpermps (which reads only the low 4 bits of
// each index) and one add. That is 2 vector ops per 64 weights, where the masked adds take 2
// (a kmov and the add, on the same port) per 16. Each x·±1 is exact; only the order of the
// fp32 sums differs.
constexpr int64_t kLutRows = 16;

ONEBIT_TARGET("avx512f")
void build_tables(const float* x, int64_t groups, float* T) {
  alignas(64) float sign[4][16];
  for (int i = 0; i < 4; ++i)
    for (int b = 0; b < 16; ++b) sign[i][b] = ((b >> i) & 1) ? 1.0f : -1.0f;
  const __m512 s0 = _mm512_load_ps(sign[0]), s1 = _mm512_load_ps(sign[1]);
  const __m512 s2 = _mm512_load_ps(sign[2]), s3 = _mm512_load_ps(sign[3]);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + 4 * g;
    __m512 t = _mm512_mul_ps(s0, _mm512_set1_ps(xg[0]));
    t = _mm512_fmadd_ps(s1, _mm512_set1_ps(xg[1]), t);
    t = _mm512_fmadd_ps(s2, _mm512_set1_ps(xg[2]), t);
    t = _mm512_fmadd_ps(s3, _mm512_set1_ps(xg[3]), t);
    _mm512_storeu_ps(T + 16 * g, t);
  }
}

ONEBIT_TARGET("avx512f,avx512bw")
void gemv_rows_lut(const float* x, const float* xsum, const float* T, const uint8_t* P, float* z,
                   int64_t in, int64_t nb, int64_t out, int64_t r0, int64_t r1) {
  const int64_t words = in / 32, tail = words * 32;  // full dwords of 32 columns per row
  const __m512i offsets =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(nb)));
  alignas(64) float sums[kLutRows];
  int64_t r = r0;
  for (; r + kLutRows <= r1; r += kLutRows) {
    const uint8_t* base = P + r * nb;
    prefetch_ahead(base, r, r1, kLutRows / 2, 2 * nb);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t w = 0; w < words; ++w) {
      const __m512i t = _mm512_i32gather_epi32(offsets, base + 4 * w, 1);
      const float* Tw = T + w * 8 * 16;
      a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(t, _mm512_loadu_ps(Tw)));
      a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(t, 4), _mm512_loadu_ps(Tw + 16)));
      a2 = _mm512_add_ps(a2, _mm512_permutexvar_ps(_mm512_srli_epi32(t, 8), _mm512_loadu_ps(Tw + 32)));
      a3 = _mm512_add_ps(a3, _mm512_permutexvar_ps(_mm512_srli_epi32(t, 12), _mm512_loadu_ps(Tw + 48)));
      a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_srli_epi32(t, 16), _mm512_loadu_ps(Tw + 64)));
      a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(t, 20), _mm512_loadu_ps(Tw + 80)));
      a2 = _mm512_add_ps(a2, _mm512_permutexvar_ps(_mm512_srli_epi32(t, 24), _mm512_loadu_ps(Tw + 96)));
      a3 = _mm512_add_ps(a3, _mm512_permutexvar_ps(_mm512_srli_epi32(t, 28), _mm512_loadu_ps(Tw + 112)));
    }
    _mm512_store_ps(sums, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (int64_t i = 0; i < kLutRows; ++i) z[r + i] = sums[i] + tail_dot(x, base + i * nb, tail, in);
  }
  if (r < r1) gemv_rows_avx512(x, xsum, P, z, 1, in, nb, out, r, r1);
}
#endif

void gemv_rows(const float* x, const float* xsum, const uint8_t* P, float* z, int64_t M, int64_t in,
               int64_t nb, int64_t out, int64_t r0, int64_t r1) {
#if ONEBIT_X86
  switch (isa_state().load(std::memory_order_relaxed)) {
    case kAvx512:
    case kAvx512Lut:  // the table kernel is for one token (decode() chooses it); masks here
      return gemv_rows_avx512(x, xsum, P, z, M, in, nb, out, r0, r1);
    case kAvx2:
      return gemv_rows_avx2(x, xsum, P, z, M, in, nb, out, r0, r1);
    default:
      break;
  }
#endif
  gemv_rows_scalar(x, xsum, P, z, M, in, nb, out, r0, r1);
}

// The decode kernel's instruction set: 0 scalar, 1 AVX2, 2 AVX-512. force >= 0 selects it, capped
// at what this CPU has; returns the one in use.
int64_t kernel_isa(int64_t force) {
  if (force >= 0) isa_state().store(std::min(force, cpu_isa()));
  return isa_state().load();
}

// Rows [r0, r1) of S unpacked into `dst` (row stride `ld` ≥ in; columns in..ld are zero) as T
// with +1 for a set bit and −1 for a clear one.
template <typename T>
void unpack_rows(const uint8_t* P, int64_t nb, int64_t in, int64_t r0, int64_t r1, T* dst,
                 int64_t ld) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = P + r * nb;
    T* d = dst + (r - r0) * ld;
    int64_t j = 0;
#if ONEBIT_AVX512
    if constexpr (std::is_same_v<T, float>) {
      const __m512 pos = _mm512_set1_ps(1.0f), neg = _mm512_set1_ps(-1.0f);
      for (; j + 16 <= in; j += 16) {
        uint16_t k;
        std::memcpy(&k, p + j / 8, 2);
        _mm512_storeu_ps(d + j, _mm512_mask_blend_ps(k, neg, pos));
      }
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512i pos = _mm512_set1_epi16(0x3F80), neg = _mm512_set1_epi16(
                                                        static_cast<int16_t>(0xBF80));  // ±1.0
      for (; j + 32 <= in; j += 32) {
        uint32_t k;
        std::memcpy(&k, p + j / 8, 4);
        _mm512_storeu_si512(d + j, _mm512_mask_blend_epi16(k, neg, pos));
      }
    } else {
      const __m512i pos = _mm512_set1_epi8(1), neg = _mm512_set1_epi8(-1);
      for (; j + 64 <= in; j += 64) {
        uint64_t k;
        std::memcpy(&k, p + j / 8, 8);
        _mm512_storeu_si512(d + j, _mm512_mask_blend_epi8(k, neg, pos));
      }
    }
#endif
    for (; j < in; ++j) d[j] = ((p[j >> 3] >> (j & 7)) & 1) ? T(1) : T(-1);
    for (; j < ld; ++j) d[j] = T(0);
  }
}

}  // namespace

int64_t current_isa() { return isa_state().load(std::memory_order_relaxed); }

bool use_lut() { return current_isa() == kAvx512Lut; }

// z = x Sᵀ (M, out) for a few tokens x (M, in) fp32: each token's Σ_j x_j (in double), then the
// decode kernel over blocks of 8 rows split across threads.
void decode(const float* x, const uint8_t* P, float* z, int64_t M, int64_t in, int64_t nb,
            int64_t out) {
  std::vector<float> xsum(M);
  for (int64_t m = 0; m < M; ++m) {
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < in; ++j) s += x[m * in + j];
    xsum[m] = static_cast<float>(s);
  }
#if ONEBIT_X86
  if (M == 1 && in >= 32 && out >= kLutRows && use_lut()) {  // tables for the full dwords
    thread_local std::vector<float> T;  // reused: no allocation (and page faults) per call
    T.resize(std::max(T.size(), static_cast<size_t>(in / 32 * 8 * 16)));
    float* tables = T.data();  // the worker threads see this thread's buffer through it
    build_tables(x, in / 32 * 8, tables);
    at::parallel_for(0, (out + 15) / 16, 4, [&](int64_t b0, int64_t b1) {
      gemv_rows_lut(x, xsum.data(), tables, P, z, in, nb, out, b0 * 16,
                    std::min(out, b1 * 16));
    });
    return;
  }
#endif
  at::parallel_for(0, (out + 7) / 8, 8, [&](int64_t b0, int64_t b1) {
    gemv_rows(x, xsum.data(), P, z, M, in, nb, out, b0 * 8, std::min(out, b1 * 8));
  });
}

// The layer's steps after x Sᵀ, on y (M, out) in place: ⊙ h, the LayerNorm, γ, bias, W_K x.
static void finish(const PackedView& L, const float* x, int64_t M, float* y) {
  const int64_t in = L.in, out = L.out;
  for (int64_t m = 0; m < M; ++m) {
    float* ym = y + m * out;
    for (int64_t r = 0; r < out; ++r) ym[r] *= L.h[r];
    if (L.output_norm) {  // LayerNorm without parameters, biased variance, in fp32
      double mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
      for (int64_t r = 0; r < out; ++r) mean += ym[r];
      mean /= static_cast<double>(out);
#pragma omp simd reduction(+ : var)
      for (int64_t r = 0; r < out; ++r) var += (ym[r] - mean) * (ym[r] - mean);
      var /= static_cast<double>(out);
      const float mu = static_cast<float>(mean);
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + L.eps));
      for (int64_t r = 0; r < out; ++r) ym[r] = (ym[r] - mu) * rstd;
    }
    if (L.gain != nullptr)
      for (int64_t r = 0; r < out; ++r) ym[r] *= L.gain[r];
    if (L.bias != nullptr)
      for (int64_t r = 0; r < out; ++r) ym[r] += L.bias[r];
  }
  if (L.outliers > 0) {
    std::vector<float> extra(static_cast<size_t>(out));
    for (int64_t m = 0; m < M; ++m) {  // W_K x accumulated apart, then added (as add_skips does)
      std::fill(extra.begin(), extra.end(), 0.0f);
      for (int64_t k = 0; k < L.outliers; ++k) {
        const int64_t f = L.outlier_index[k];
        extra[f / in] += x[m * in + f % in] * L.outlier_value[k];
      }
      for (int64_t r = 0; r < out; ++r) y[m * out + r] += extra[r];
    }
  }
}

void packed_forward(const PackedView& L, const float* x, int64_t M, float* u, float* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < L.in; ++j) u[m * L.in + j] = x[m * L.in + j] * L.g[j];
  decode(u, L.signs, y, M, L.in, L.nb, L.out);
  finish(L, x, M, y);
}

namespace {

void check_args(const at::Tensor& x, const at::Tensor& packed, int64_t in, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a 2-D CPU tensor");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.device().is_cpu(),
              op, ": packed must be a 2-D uint8 CPU tensor");
  TORCH_CHECK(x.size(1) == in, op, ": x has ", x.size(1), " features, expected ", in);
  TORCH_CHECK(packed.size(1) == (in + 7) / 8, op, ": packed has ", packed.size(1),
              " bytes per row, ", in, " signs need ", (in + 7) / 8);
}

constexpr int64_t kTileRows = 256;  // rows of S unpacked per GEMM call (4 MB of fp32 at in=4096)

// z = x Sᵀ, fp32. gemv_max: up to this many tokens, the bit-mask kernel; above, unpacked tiles
// through the BLAS GEMM.
at::Tensor sign_matmul(const at::Tensor& x_, const at::Tensor& packed_, int64_t in,
                       int64_t gemv_max) {
  check_args(x_, packed_, in, "sign_matmul");
  TORCH_CHECK(x_.scalar_type() == at::kFloat, "sign_matmul: x must be float32");
  const at::Tensor x = x_.contiguous(), packed = packed_.contiguous();
  const int64_t M = x.size(0), out = packed.size(0), nb = packed.size(1);
  const float* xp = x.const_data_ptr<float>();
  const uint8_t* P = packed.const_data_ptr<uint8_t>();
  if (M <= gemv_max) {
    at::Tensor z = at::empty({M, out}, x.options());
    decode(xp, P, z.mutable_data_ptr<float>(), M, in, nb, out);
    return z;
  }
  at::Tensor zt = at::empty({out, M}, x.options());  // zᵀ: each tile fills contiguous rows
  at::Tensor tile = at::empty({std::min(kTileRows, out), in}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t r0 = 0; r0 < out; r0 += kTileRows) {
    const int64_t n = std::min(kTileRows, out - r0);
    float* tp = tile.mutable_data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
      unpack_rows<float>(P, nb, in, r0 + a, r0 + b, tp + a * in, in);
    });
    at::Tensor dst = zt.narrow(0, r0, n);
    at::mm_out(dst, tile.narrow(0, 0, n), xt);
  }
  return zt.t().contiguous();
}

// The whole packed layer for a few tokens (decode), in one call:
//     y = γ ⊙ LN(((x ⊙ g) Sᵀ) ⊙ h) + bias + W_K x
// with the same fp32 arithmetic as PackedOneBitLinear's kernel path (x and every vector read in
// fp32, the result cast back to x's dtype), but no Python-level op per step. x (M, in) any float
// dtype; out_gain, bias, outlier_index/outlier_value optional (undefined tensors).
at::Tensor packed_linear_decode(const at::Tensor& x_, const at::Tensor& packed_,
                                const at::Tensor& in_scale_, const at::Tensor& out_scale_,
                                const c10::optional<at::Tensor>& out_gain_,
                                const c10::optional<at::Tensor>& bias_,
                                const c10::optional<at::Tensor>& outlier_index_,
                                const c10::optional<at::Tensor>& outlier_value_, bool output_norm,
                                double eps) {
  const int64_t in = in_scale_.size(0);
  TORCH_CHECK(x_.dim() == 2, "packed_linear_decode: x must be 2-D (tokens, in)");
  check_args(x_, packed_, in, "packed_linear_decode");
  const at::Tensor x = x_.to(at::kFloat).contiguous(), packed = packed_.contiguous();
  const at::Tensor g = in_scale_.to(at::kFloat).contiguous();
  const at::Tensor h = out_scale_.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), out = packed.size(0), nb = packed.size(1);
  TORCH_CHECK(h.size(0) == out, "packed_linear_decode: out_scale has ", h.size(0), " entries, ",
              out, " rows");
  PackedView L;
  L.signs = packed.const_data_ptr<uint8_t>();
  L.in = in;
  L.out = out;
  L.nb = nb;
  L.g = g.const_data_ptr<float>();
  L.h = h.const_data_ptr<float>();
  at::Tensor gain, bias, idx, val;
  if (out_gain_.has_value() && out_gain_->defined()) {
    gain = out_gain_->to(at::kFloat).contiguous();
    L.gain = gain.const_data_ptr<float>();
  }
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->to(at::kFloat).contiguous();
    L.bias = bias.const_data_ptr<float>();
  }
  if (outlier_index_.has_value() && outlier_index_->defined() && outlier_index_->numel() > 0) {
    idx = outlier_index_->to(at::kLong).contiguous();
    val = outlier_value_->to(at::kFloat).contiguous();
    L.outlier_index = idx.const_data_ptr<int64_t>();
    L.outlier_value = val.const_data_ptr<float>();
    L.outliers = idx.size(0);
  }
  L.output_norm = output_norm;
  L.eps = eps;
  at::Tensor u = at::empty({M, in}, x.options());
  at::Tensor y = at::empty({M, out}, x.options());
  packed_forward(L, x.const_data_ptr<float>(), M, u.mutable_data_ptr<float>(),
                 y.mutable_data_ptr<float>());
  return y.to(x_.scalar_type());
}

// z = x Sᵀ for bf16 x (M, in): bf16 (M, out), the BLAS bf16 GEMM on exact ±1 bf16 tiles (fp32
// accumulation inside the GEMM, one rounding of each result to bf16).
at::Tensor sign_matmul_bf16(const at::Tensor& x_, const at::Tensor& packed_, int64_t in) {
  check_args(x_, packed_, in, "sign_matmul_bf16");
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16, "sign_matmul_bf16: x must be bfloat16");
  const at::Tensor x = x_.contiguous(), packed = packed_.contiguous();
  const int64_t M = x.size(0), out = packed.size(0), nb = packed.size(1);
  const uint8_t* P = packed.const_data_ptr<uint8_t>();
  at::Tensor zt = at::empty({out, M}, x.options());
  at::Tensor tile = at::empty({std::min(kTileRows, out), in}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t r0 = 0; r0 < out; r0 += kTileRows) {
    const int64_t n = std::min(kTileRows, out - r0);
    auto* tp = tile.mutable_data_ptr<c10::BFloat16>();
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
      unpack_rows<c10::BFloat16>(P, nb, in, r0 + a, r0 + b, tp + a * in, in);
    });
    at::Tensor dst = zt.narrow(0, r0, n);
    at::mm_out(dst, tile.narrow(0, 0, n), xt);
  }
  return zt.t().contiguous();
}

// Integer z = x Sᵀ for int8 x (M, in): int32 (M, out), through torch._int_mm on int8 ±1 tiles
// (K padded with zeros to a multiple of 8). Needs M > 16 (a _int_mm constraint).
at::Tensor sign_matmul_int8(const at::Tensor& x_, const at::Tensor& packed_, int64_t in) {
  check_args(x_, packed_, in, "sign_matmul_int8");
  TORCH_CHECK(x_.scalar_type() == at::kChar, "sign_matmul_int8: x must be int8");
  const at::Tensor packed = packed_.contiguous();
  const int64_t M = x_.size(0), out = packed.size(0), nb = packed.size(1);
  TORCH_CHECK(M > 16, "sign_matmul_int8: needs more than 16 tokens, got ", M);
  const int64_t K = (in + 7) / 8 * 8;
  at::Tensor x = x_;
  if (K != in) {
    x = at::zeros({M, K}, x_.options());
    x.narrow(1, 0, in).copy_(x_);
  } else {
    x = x_.contiguous();
  }
  const uint8_t* P = packed.const_data_ptr<uint8_t>();
  const int64_t tile_rows = kTileRows;  // a multiple of 8
  at::Tensor zt = at::empty({out, M}, x.options().dtype(at::kInt));
  at::Tensor tile = at::empty({std::min(tile_rows, (out + 7) / 8 * 8), K}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t r0 = 0; r0 < out; r0 += tile_rows) {
    const int64_t n = std::min(tile_rows, out - r0);
    const int64_t n8 = (n + 7) / 8 * 8;  // _int_mm wants N % 8 == 0: pad with zero rows
    int8_t* tp = tile.mutable_data_ptr<int8_t>();
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
      unpack_rows<int8_t>(P, nb, in, r0 + a, r0 + b, tp + a * K, K);
    });
    if (n8 != n) std::memset(tp + n * K, 0, static_cast<size_t>((n8 - n) * K));
    at::Tensor prod = at::_int_mm(tile.narrow(0, 0, n8), xt);  // (n8, M)
    zt.narrow(0, r0, n).copy_(prod.narrow(0, 0, n));
  }
  return zt.t().contiguous();
}

// S unpacked to fp32 ±1 (out, in): for tests and the reference path.
at::Tensor unpack_signs_f32(const at::Tensor& packed_, int64_t in) {
  TORCH_CHECK(packed_.dim() == 2 && packed_.scalar_type() == at::kByte,
              "unpack_signs_f32: packed must be 2-D uint8");
  TORCH_CHECK(packed_.size(1) == (in + 7) / 8, "unpack_signs_f32: wrong bytes per row");
  const at::Tensor packed = packed_.contiguous();
  const int64_t out = packed.size(0), nb = packed.size(1);
  at::Tensor s = at::empty({out, in}, packed.options().dtype(at::kFloat));
  const uint8_t* P = packed.const_data_ptr<uint8_t>();
  float* sp = s.mutable_data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t a, int64_t b) {
    unpack_rows<float>(P, nb, in, a, b, sp + a * in, in);
  });
  return s;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(onebit, m) {
  m.def("sign_matmul(Tensor x, Tensor packed, int in_features, int gemv_max) -> Tensor");
  m.def("sign_matmul_bf16(Tensor x, Tensor packed, int in_features) -> Tensor");
  m.def("sign_matmul_int8(Tensor x, Tensor packed, int in_features) -> Tensor");
  m.def("unpack_signs_f32(Tensor packed, int in_features) -> Tensor");
  m.def("kernel_isa(int force) -> int", &kernel_isa);
  m.def(
      "packed_linear_decode(Tensor x, Tensor packed, Tensor in_scale, Tensor out_scale, "
      "Tensor? out_gain, Tensor? bias, Tensor? outlier_index, Tensor? outlier_value, "
      "bool output_norm, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(onebit, CPU, m) {
  m.impl("sign_matmul", &sign_matmul);
  m.impl("sign_matmul_bf16", &sign_matmul_bf16);
  m.impl("sign_matmul_int8", &sign_matmul_int8);
  m.impl("unpack_signs_f32", &unpack_signs_f32);
  m.impl("packed_linear_decode", &packed_linear_decode);
}

}  // namespace onebit
