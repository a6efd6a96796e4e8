// z = x · Sᵀ for a ±1 matrix S stored as bits in tiles (onebit.quant.packing.tile_signs): bit 1 =
// +1, bit 0 = −1; tile (t, w) is 64 bytes holding, for rows 16t..16t+15, the 32 bits of columns
// 32w..32w+31 of each row as one little-endian dword (least significant bit first). Rows past
// `out` and columns past `in` are clear bits, and every kernel reads x zero-padded to whole words,
// so the padding adds nothing. A matrix is read as one sequential stream, a cache line per
// 16 rows × 32 columns.
//
// Decode (few tokens): no multiplications and no unpacking. With P the set bits of a row,
//     Σ_j x_j s_j = 2 Σ_{j∈P} x_j − Σ_j x_j,
// and 16 bits of a row are used directly as an AVX-512 lane mask: acc += x[j:j+16] where the bit
// is set (one masked add per 16 weights); the 16 rows of a tile share each load of x; threads
// split the tiles. For one token (the decode step) AVX-512 CPUs use a table kernel instead
// (gemv_rows_lut: one lookup and one add per 4 weights of 16 rows, four tiles sharing each table).
//
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

namespace onebit {
namespace {

// The decode kernel's instruction set, chosen at run time: the best this CPU has (AVX-512 with
// byte/word ops, else AVX2 with FMA, else portable C++), lowered by ONEBIT_KERNEL_ISA
// (avx512 | avx2 | scalar) or the op kernel_isa (tests and benchmarks force each path).

int64_t cpu_isa() {
#if ONEBIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512Lut;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return kAvx2Lut;
#endif
  return kScalar;
}

int64_t env_isa(int64_t best) {
  const char* e = std::getenv("ONEBIT_KERNEL_ISA");
  if (e == nullptr) return best;
  const std::string v(e);
  const int64_t want = v == "scalar"     ? kScalar
                       : v == "avx2"     ? kAvx2
                       : v == "avx2_lut" ? kAvx2Lut
                       : v == "avx512"   ? kAvx512
                                         : kAvx512Lut;
  return std::min(want, best);
}

std::atomic<int64_t>& isa_state() {
  static std::atomic<int64_t> isa{env_isa(cpu_isa())};
  return isa;
}

// Row r's dword of columns [32w, 32w + 32).
inline uint32_t word_bits(const uint8_t* Q, int64_t words, int64_t r, int64_t w) {
  uint32_t k;
  std::memcpy(&k, Q + (((r >> 4) * words + w) << 6) + ((r & 15) << 2), 4);
  return k;
}

// The decode kernels: z[m, r] for rows [r0, r1) and all M tokens, r0 a multiple of 16. x (M,
// 32 * words) fp32, zero past `in`; xsum[m] = Σ_j x[m, j]; each returns 2 Σ_{j∈P} x_j − Σ_j x_j
// (or sums x·s directly) per row.
void gemv_rows_scalar(const float* x, const float* xsum, const uint8_t* Q, float* z, int64_t M,
                      int64_t words, int64_t out, int64_t r0, int64_t r1) {
  const int64_t xs = 32 * words;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * xs;
      float acc = 0;
      for (int64_t w = 0; w < words; ++w) {
        const uint32_t k = word_bits(Q, words, r, w);
        for (int b = 0; b < 32; ++b)
          if ((k >> b) & 1u) acc += xm[32 * w + b];
      }
      z[m * out + r] = 2.0f * acc - xsum[m];
    }
  }
}

#if ONEBIT_X86
// Bytes ahead of the line in use that the kernels below prefetch. The matrix is one sequential
// stream, but a kernel that takes long over each line leaves the hardware prefetcher behind.
#ifndef ONEBIT_PREFETCH_BYTES
#define ONEBIT_PREFETCH_BYTES 1024
#endif
constexpr int64_t kAhead = ONEBIT_PREFETCH_BYTES;

ONEBIT_TARGET("avx512f,avx512bw")
void gemv_rows_avx512(const float* x, const float* xsum, const uint8_t* Q, float* z, int64_t M,
                      int64_t words, int64_t out, int64_t r0, int64_t r1) {
  const int64_t xs = 32 * words;
  constexpr int R = 16;  // a tile's rows: 16 accumulators share each load of x
  alignas(64) float sums[R];
  for (int64_t r = r0; r < r1; r += R) {
    const uint8_t* tile = Q + (r >> 4) * words * 64;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * xs;
      __m512 acc[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t w = 0; w < words; ++w) {
        const __m512 v0 = _mm512_loadu_ps(xm + 32 * w), v1 = _mm512_loadu_ps(xm + 32 * w + 16);
        const uint8_t* t = tile + 64 * w;
        _mm_prefetch(reinterpret_cast<const char*>(t + kAhead), _MM_HINT_T0);
        for (int i = 0; i < R; ++i) {
          uint32_t k;
          std::memcpy(&k, t + 4 * i, 4);
          acc[i] = _mm512_mask_add_ps(acc[i], static_cast<__mmask16>(k), acc[i], v0);
          acc[i] = _mm512_mask_add_ps(acc[i], static_cast<__mmask16>(k >> 16), acc[i], v1);
        }
      }
      for (int i = 0; i < R; ++i) sums[i] = 2.0f * _mm512_reduce_add_ps(acc[i]) - xsum[m];
      std::memcpy(z + m * out + r, sums, sizeof(float) * std::min<int64_t>(R, r1 - r));
    }
  }
}

// AVX2: a byte of signs becomes 8 floats of ±1 through a 256-entry table (8 KB, in L1), and one
// FMA (its table operand loaded in the same instruction) adds x·s for 8 weights of a row; 8 rows
// (half a tile) share each load of x. The products are exact (x·±1), so this sums the same terms
// as the masked adds, in another order.
struct Sign8Table {
  alignas(32) float lanes[256][8];
  Sign8Table() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) lanes[b][i] = ((b >> i) & 1) ? 1.0f : -1.0f;
  }
};
const Sign8Table kSign8;

ONEBIT_TARGET("avx2,fma")
void gemv_rows_avx2(const float* x, const float* xsum, const uint8_t* Q, float* z, int64_t M,
                    int64_t words, int64_t out, int64_t r0, int64_t r1) {
  (void)xsum;  // the FMA sums x·s directly
  const int64_t xs = 32 * words;
  constexpr int R = 8;
  for (int64_t r = r0; r < r1; r += R) {
    const uint8_t* half = Q + (r >> 4) * words * 64 + (r & 15) * 4;  // rows r..r+7 of a tile
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * xs;
      __m256 acc[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t w = 0; w < words; ++w) {
        const uint8_t* t = half + 64 * w;
        _mm_prefetch(reinterpret_cast<const char*>(t + kAhead), _MM_HINT_T0);
        for (int b = 0; b < 4; ++b) {
          const __m256 v = _mm256_loadu_ps(xm + 32 * w + 8 * b);
          for (int i = 0; i < R; ++i)
            acc[i] = _mm256_fmadd_ps(v, _mm256_load_ps(kSign8.lanes[t[4 * i + b]]), acc[i]);
        }
      }
      const int64_t n = std::min<int64_t>(R, r1 - r);
      for (int i = 0; i < n; ++i) z[m * out + r + i] = hsum256(acc[i]);
    }
  }
}

// One token, AVX-512, by table lookup: for each group of 4 columns a table of the 16 sums
// Σ_{i<4} ±x_{4g+i} (entry b: + where bit i of b is set), built once per call; then, a tile at a
// time, one load takes 32 columns' bits of its 16 rows, and each of the 8 nibbles of a row picks
// its group's sum with one vpermps (which reads only the low 4 bits of each index) and one add.
// Four tiles share each table load. That is about 2 vector ops per 64 weights, where the masked
// adds take 2 (a kmov and the add, on the same port) per 16. Each x·±1 is exact; only the order
// of the fp32 sums differs.
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

// z[r, r + 16) from the sums of a tile's 16 rows (fewer past `out`).
ONEBIT_TARGET("avx512f")
inline void store_rows(float* z, int64_t r, int64_t out, __m512 v) {
  if (r + 16 <= out)
    _mm512_storeu_ps(z + r, v);
  else
    _mm512_mask_storeu_ps(z + r, static_cast<__mmask16>((1u << (out - r)) - 1u), v);
}

// Tiles [t0, t1) of one token's z.
ONEBIT_TARGET("avx512f,avx512bw")
void gemv_tiles_lut(const float* T, const uint8_t* Q, float* z, int64_t words, int64_t out,
                    int64_t t0, int64_t t1) {
  const int64_t stride = words * 64;  // bytes per tile row (16 rows × all columns)
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    const uint8_t* q = Q + t * stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    for (int64_t w = 0; w < words; ++w) {
      const __m512i ka = _mm512_loadu_si512(q + 64 * w);
      const __m512i kb = _mm512_loadu_si512(q + stride + 64 * w);
      const __m512i kc = _mm512_loadu_si512(q + 2 * stride + 64 * w);
      const __m512i kd = _mm512_loadu_si512(q + 3 * stride + 64 * w);
      for (int i = 0; i < 4; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(q + i * stride + 64 * w + kAhead), _MM_HINT_T0);
      const float* Tw = T + w * 128;
      for (int n = 0; n < 8; n += 2) {
        const __m512 T0 = _mm512_loadu_ps(Tw + 16 * n), T1 = _mm512_loadu_ps(Tw + 16 * n + 16);
        a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_srli_epi32(ka, 4 * n), T0));
        b0 = _mm512_add_ps(b0, _mm512_permutexvar_ps(_mm512_srli_epi32(kb, 4 * n), T0));
        c0 = _mm512_add_ps(c0, _mm512_permutexvar_ps(_mm512_srli_epi32(kc, 4 * n), T0));
        d0 = _mm512_add_ps(d0, _mm512_permutexvar_ps(_mm512_srli_epi32(kd, 4 * n), T0));
        a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(ka, 4 * n + 4), T1));
        b1 = _mm512_add_ps(b1, _mm512_permutexvar_ps(_mm512_srli_epi32(kb, 4 * n + 4), T1));
        c1 = _mm512_add_ps(c1, _mm512_permutexvar_ps(_mm512_srli_epi32(kc, 4 * n + 4), T1));
        d1 = _mm512_add_ps(d1, _mm512_permutexvar_ps(_mm512_srli_epi32(kd, 4 * n + 4), T1));
      }
    }
    store_rows(z, 16 * t, out, _mm512_add_ps(a0, a1));
    store_rows(z, 16 * t + 16, out, _mm512_add_ps(b0, b1));
    store_rows(z, 16 * t + 32, out, _mm512_add_ps(c0, c1));
    store_rows(z, 16 * t + 48, out, _mm512_add_ps(d0, d1));
  }
  for (; t < t1; ++t) {
    const uint8_t* q = Q + t * stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t w = 0; w < words; ++w) {
      const __m512i k = _mm512_loadu_si512(q + 64 * w);
      const float* Tw = T + w * 128;
      for (int n = 0; n < 8; n += 4) {
        a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_srli_epi32(k, 4 * n),
                                                     _mm512_loadu_ps(Tw + 16 * n)));
        a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(k, 4 * n + 4),
                                                     _mm512_loadu_ps(Tw + 16 * n + 16)));
        a2 = _mm512_add_ps(a2, _mm512_permutexvar_ps(_mm512_srli_epi32(k, 4 * n + 8),
                                                     _mm512_loadu_ps(Tw + 16 * n + 32)));
        a3 = _mm512_add_ps(a3, _mm512_permutexvar_ps(_mm512_srli_epi32(k, 4 * n + 12),
                                                     _mm512_loadu_ps(Tw + 16 * n + 48)));
      }
    }
    store_rows(z, 16 * t, out, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// One token, AVX2, by table lookup (the AVX-512 table kernel's scheme on 8-lane registers): for
// each group of 4 inputs, the 8 sums ±x₀ ±x₁ ±x₂ (entry b: + where bit i of b is set) and −x₃; a
// half tile's 8 rows take one 32-byte load per 32 columns, and each nibble adds its low 3 bits'
// sum (one vpermps, which reads the low 3 bits of each index) and ±x₃ (−x₃ with its sign flipped
// by the nibble's high bit, moved to the sign position). Both halves of a tile share each table
// load. Each x·±1 is exact; only the order of the fp32 sums differs.
ONEBIT_TARGET("avx2,fma")
void build_tables_avx2(const float* x, int64_t groups, float* T) {
  alignas(32) float sign[3][8];
  for (int i = 0; i < 3; ++i)
    for (int b = 0; b < 8; ++b) sign[i][b] = ((b >> i) & 1) ? 1.0f : -1.0f;
  const __m256 s0 = _mm256_load_ps(sign[0]), s1 = _mm256_load_ps(sign[1]);
  const __m256 s2 = _mm256_load_ps(sign[2]);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + 4 * g;
    __m256 t = _mm256_mul_ps(s0, _mm256_set1_ps(xg[0]));
    t = _mm256_fmadd_ps(s1, _mm256_set1_ps(xg[1]), t);
    t = _mm256_fmadd_ps(s2, _mm256_set1_ps(xg[2]), t);
    _mm256_storeu_ps(T + 16 * g, t);
    _mm256_storeu_ps(T + 16 * g + 8, _mm256_set1_ps(-xg[3]));
  }
}

ONEBIT_TARGET("avx2,fma")
void gemv_tiles_lut_avx2(const float* T, const uint8_t* Q, float* z, int64_t words, int64_t out,
                         int64_t t0, int64_t t1) {
  alignas(32) float sums[16];
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* q = Q + t * words * 64;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t w = 0; w < words; ++w) {
      const __m256i ka = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * w));
      const __m256i kb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * w + 32));
      _mm_prefetch(reinterpret_cast<const char*>(q + 64 * w + kAhead), _MM_HINT_T0);
      const float* Tw = T + w * 128;
      for (int n = 0; n < 8; ++n) {
        const __m256 lo = _mm256_loadu_ps(Tw + 16 * n);
        const __m256i x3 = _mm256_castps_si256(_mm256_loadu_ps(Tw + 16 * n + 8));
        const __m256i ha = _mm256_and_si256(_mm256_slli_epi32(ka, 28 - 4 * n), sign);
        const __m256i hb = _mm256_and_si256(_mm256_slli_epi32(kb, 28 - 4 * n), sign);
        a0 = _mm256_add_ps(a0, _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(ka, 4 * n)));
        b0 = _mm256_add_ps(b0, _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(kb, 4 * n)));
        a1 = _mm256_add_ps(a1, _mm256_castsi256_ps(_mm256_xor_si256(x3, ha)));
        b1 = _mm256_add_ps(b1, _mm256_castsi256_ps(_mm256_xor_si256(x3, hb)));
      }
    }
    _mm256_store_ps(sums, _mm256_add_ps(a0, a1));
    _mm256_store_ps(sums + 8, _mm256_add_ps(b0, b1));
    const int64_t r = 16 * t, n = std::min<int64_t>(16, out - r);
    std::memcpy(z + r, sums, sizeof(float) * n);
  }
}
#endif

void gemv_rows(const float* x, const float* xsum, const uint8_t* Q, float* z, int64_t M,
               int64_t words, int64_t out, int64_t r0, int64_t r1) {
#if ONEBIT_X86
  switch (isa_state().load(std::memory_order_relaxed)) {
    case kAvx512:
    case kAvx512Lut:  // the table kernel is for one token (decode() chooses it); masks here
      return gemv_rows_avx512(x, xsum, Q, z, M, words, out, r0, r1);
    case kAvx2:
    case kAvx2Lut:
      return gemv_rows_avx2(x, xsum, Q, z, M, words, out, r0, r1);
    default:
      break;
  }
#endif
  gemv_rows_scalar(x, xsum, Q, z, M, words, out, r0, r1);
}

// The decode kernel's instruction set (Isa). force >= 0 selects it, capped at what this CPU has;
// returns the one in use.
int64_t kernel_isa(int64_t force) {
  if (force >= 0) isa_state().store(std::min(force, cpu_isa()));
  return isa_state().load();
}

// Rows [r0, r1) of S unpacked into `dst` (row stride `ld` ≥ in; columns in..ld are zero) as T
// with +1 for a set bit and −1 for a clear one.
template <typename T>
void unpack_rows(const uint8_t* Q, int64_t words, int64_t in, int64_t r0, int64_t r1, T* dst,
                 int64_t ld) {
  for (int64_t r = r0; r < r1; ++r) {
    T* d = dst + (r - r0) * ld;
    int64_t j = 0;
#if ONEBIT_AVX512
    if constexpr (std::is_same_v<T, float>) {
      const __m512 pos = _mm512_set1_ps(1.0f), neg = _mm512_set1_ps(-1.0f);
      for (; j + 32 <= in; j += 32) {
        const uint32_t k = word_bits(Q, words, r, j / 32);
        _mm512_storeu_ps(d + j, _mm512_mask_blend_ps(static_cast<__mmask16>(k), neg, pos));
        _mm512_storeu_ps(d + j + 16, _mm512_mask_blend_ps(static_cast<__mmask16>(k >> 16), neg, pos));
      }
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512i pos = _mm512_set1_epi16(0x3F80), neg = _mm512_set1_epi16(
                                                        static_cast<int16_t>(0xBF80));  // ±1.0
      for (; j + 32 <= in; j += 32)
        _mm512_storeu_si512(d + j, _mm512_mask_blend_epi16(word_bits(Q, words, r, j / 32), neg, pos));
    } else {
      const __m512i pos = _mm512_set1_epi8(1), neg = _mm512_set1_epi8(-1);
      for (; j + 64 <= in; j += 64) {
        const uint64_t k = word_bits(Q, words, r, j / 32) |
                           (static_cast<uint64_t>(word_bits(Q, words, r, j / 32 + 1)) << 32);
        _mm512_storeu_si512(d + j, _mm512_mask_blend_epi8(k, neg, pos));
      }
    }
#endif
    for (; j < in; ++j) d[j] = ((word_bits(Q, words, r, j >> 5) >> (j & 31)) & 1u) ? T(1) : T(-1);
    for (; j < ld; ++j) d[j] = T(0);
  }
}

}  // namespace

int64_t current_isa() { return isa_state().load(std::memory_order_relaxed); }


// z = x Sᵀ (M, out) for a few tokens x (M, in) fp32: each token's Σ_j x_j (in double), x
// zero-padded to whole words where `in` is not a multiple of 32, then the decode kernel over
// tiles split across threads.
void decode(const float* x, const uint8_t* Q, float* z, int64_t M, int64_t in, int64_t words,
            int64_t out) {
  std::vector<float> xsum(M);
  for (int64_t m = 0; m < M; ++m) {
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < in; ++j) s += x[m * in + j];
    xsum[m] = static_cast<float>(s);
  }
  const int64_t xs = 32 * words;
  thread_local std::vector<float> padded;  // reused: no allocation (and page faults) per call
  if (xs != in) {
    padded.assign(static_cast<size_t>(M * xs), 0.0f);
    for (int64_t m = 0; m < M; ++m) std::memcpy(&padded[m * xs], x + m * in, sizeof(float) * in);
    x = padded.data();  // the worker threads read this thread's buffer through the pointer
  }
  const int64_t tiles = (out + 15) / 16;
#if ONEBIT_X86
  const int64_t isa = current_isa();
  if (M == 1 && (isa == kAvx512Lut || isa == kAvx2Lut)) {
    thread_local std::vector<float> T;
    T.resize(std::max(T.size(), static_cast<size_t>(words * 128)));
    float* tables = T.data();
    if (isa == kAvx512Lut) {
      build_tables(x, words * 8, tables);
      at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
        gemv_tiles_lut(tables, Q, z, words, out, t0, t1);
      });
    } else {
      build_tables_avx2(x, words * 8, tables);
      at::parallel_for(0, tiles, 2, [&](int64_t t0, int64_t t1) {
        gemv_tiles_lut_avx2(tables, Q, z, words, out, t0, t1);
      });
    }
    return;
  }
#endif
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    gemv_rows(x, xsum.data(), Q, z, M, words, out, t0 * 16, std::min(out, t1 * 16));
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

void check_tiles(const at::Tensor& t, int64_t in, int64_t out, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kByte && t.device().is_cpu() &&
                  t.size(0) == (out + 15) / 16 && t.size(1) == (in + 31) / 32 && t.size(2) == 16 &&
                  t.size(3) == 4,
              what, ": the signs must be tiled uint8 CPU bits (onebit.quant.packing.tile_signs) of "
              "shape (", (out + 15) / 16, ", ", (in + 31) / 32, ", 16, 4) for ", out, " x ", in,
              ", got ", t.sizes());
}

void packed_forward(const PackedView& L, const float* x, int64_t M, float* u, float* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < L.in; ++j) u[m * L.in + j] = x[m * L.in + j] * L.g[j];
  decode(u, L.signs, y, M, L.in, L.words, L.out);
  finish(L, x, M, y);
}

namespace {

void check_args(const at::Tensor& x, const at::Tensor& packed, int64_t in, int64_t out,
                const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a 2-D CPU tensor");
  TORCH_CHECK(x.size(1) == in, op, ": x has ", x.size(1), " features, expected ", in);
  check_tiles(packed, in, out, op);
}

constexpr int64_t kTileRows = 256;  // rows of S unpacked per GEMM call (4 MB of fp32 at in=4096)

// z = x Sᵀ, fp32. gemv_max: up to this many tokens, the bit-mask kernel; above, unpacked tiles
// through the BLAS GEMM.
at::Tensor sign_matmul(const at::Tensor& x_, const at::Tensor& packed_, int64_t in, int64_t out,
                       int64_t gemv_max) {
  check_args(x_, packed_, in, out, "sign_matmul");
  TORCH_CHECK(x_.scalar_type() == at::kFloat, "sign_matmul: x must be float32");
  const at::Tensor x = x_.contiguous(), packed = packed_.contiguous();
  const int64_t M = x.size(0), words = packed.size(1);
  const float* xp = x.const_data_ptr<float>();
  const uint8_t* P = packed.const_data_ptr<uint8_t>();
  if (M <= gemv_max) {
    at::Tensor z = at::empty({M, out}, x.options());
    decode(xp, P, z.mutable_data_ptr<float>(), M, in, words, out);
    return z;
  }
  at::Tensor zt = at::empty({out, M}, x.options());  // zᵀ: each tile fills contiguous rows
  at::Tensor tile = at::empty({std::min(kTileRows, out), in}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t r0 = 0; r0 < out; r0 += kTileRows) {
    const int64_t n = std::min(kTileRows, out - r0);
    float* tp = tile.mutable_data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
      unpack_rows<float>(P, words, in, r0 + a, r0 + b, tp + a * in, in);
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
  const int64_t in = in_scale_.size(0), out = out_scale_.size(0);
  TORCH_CHECK(x_.dim() == 2, "packed_linear_decode: x must be 2-D (tokens, in)");
  check_args(x_, packed_, in, out, "packed_linear_decode");
  const at::Tensor x = x_.to(at::kFloat).contiguous(), packed = packed_.contiguous();
  const at::Tensor g = in_scale_.to(at::kFloat).contiguous();
  const at::Tensor h = out_scale_.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  PackedView L;
  L.signs = packed.const_data_ptr<uint8_t>();
  L.in = in;
  L.out = out;
  L.words = packed.size(1);
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
at::Tensor sign_matmul_bf16(const at::Tensor& x_, const at::Tensor& packed_, int64_t in,
                            int64_t out) {
  check_args(x_, packed_, in, out, "sign_matmul_bf16");
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16, "sign_matmul_bf16: x must be bfloat16");
  const at::Tensor x = x_.contiguous(), packed = packed_.contiguous();
  const int64_t M = x.size(0), words = packed.size(1);
  const uint8_t* P = packed.const_data_ptr<uint8_t>();
  at::Tensor zt = at::empty({out, M}, x.options());
  at::Tensor tile = at::empty({std::min(kTileRows, out), in}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t r0 = 0; r0 < out; r0 += kTileRows) {
    const int64_t n = std::min(kTileRows, out - r0);
    auto* tp = tile.mutable_data_ptr<c10::BFloat16>();
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
      unpack_rows<c10::BFloat16>(P, words, in, r0 + a, r0 + b, tp + a * in, in);
    });
    at::Tensor dst = zt.narrow(0, r0, n);
    at::mm_out(dst, tile.narrow(0, 0, n), xt);
  }
  return zt.t().contiguous();
}

// Integer z = x Sᵀ for int8 x (M, in): int32 (M, out), through torch._int_mm on int8 ±1 tiles
// (K padded with zeros to a multiple of 8). Needs M > 16 (a _int_mm constraint).
at::Tensor sign_matmul_int8(const at::Tensor& x_, const at::Tensor& packed_, int64_t in,
                            int64_t out) {
  check_args(x_, packed_, in, out, "sign_matmul_int8");
  TORCH_CHECK(x_.scalar_type() == at::kChar, "sign_matmul_int8: x must be int8");
  const at::Tensor packed = packed_.contiguous();
  const int64_t M = x_.size(0), words = packed.size(1);
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
      unpack_rows<int8_t>(P, words, in, r0 + a, r0 + b, tp + a * K, K);
    });
    if (n8 != n) std::memset(tp + n * K, 0, static_cast<size_t>((n8 - n) * K));
    at::Tensor prod = at::_int_mm(tile.narrow(0, 0, n8), xt);  // (n8, M)
    zt.narrow(0, r0, n).copy_(prod.narrow(0, 0, n));
  }
  return zt.t().contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(onebit, m) {
  m.def(
      "sign_matmul(Tensor x, Tensor packed, int in_features, int out_features, int gemv_max) "
      "-> Tensor");
  m.def("sign_matmul_bf16(Tensor x, Tensor packed, int in_features, int out_features) -> Tensor");
  m.def("sign_matmul_int8(Tensor x, Tensor packed, int in_features, int out_features) -> Tensor");
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
  m.impl("packed_linear_decode", &packed_linear_decode);
}

}  // namespace onebit
