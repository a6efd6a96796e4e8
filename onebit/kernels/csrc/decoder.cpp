// One decode step of a LLaMA-family decoder (LLaMA, Mistral, Qwen2, SmolLM) as one C++ call:
// embedding row, then per block RMSNorm → q, k, v → RoPE → attention over a static KV cache →
// o → residual → RMSNorm → gate, up → SiLU(gate) ⊙ up → down → residual; final RMSNorm and the
// output layer. No Python and no ATen op between the layers: the packed layers run
// packed_forward (packed.cpp) on fp32 buffers, the full-precision ones (kept layers, lm_head) a
// GEMV that reads fp32, fp16 or bf16 weights as stored and accumulates in fp32.
//
// Arithmetic: fp32 throughout (the weights of fp16/bf16 models are widened as they are read), so
// against the model's own forward in fp32 it agrees to fp32 rounding (other summation orders).
// Batch 1; the cache holds max_len positions; torch.classes.onebit.Decoder (onebit/decoder.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "packed.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ONEBIT_X86 1
#define ONEBIT_TARGET(isa) __attribute__((target(isa)))
#endif

namespace onebit {
namespace {

// ---- y[r] = W[r] · x for rows [r0, r1) of a full-precision W (rows, in) of type T -------------

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

template <typename T>
void dense_rows_scalar(const T* W, const float* x, float* y, int64_t in, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* w = W + r * in;
    float acc = 0;
    for (int64_t j = 0; j < in; ++j) acc += widen(w[j]) * x[j];
    y[r] = acc;
  }
}

#if ONEBIT_X86
ONEBIT_TARGET("avx512f")
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ONEBIT_TARGET("avx512f")
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
ONEBIT_TARGET("avx512f")
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

ONEBIT_TARGET("avx2,fma,f16c")
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
ONEBIT_TARGET("avx2,fma,f16c")
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
ONEBIT_TARGET("avx2,fma,f16c")
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// Rows [a, b) fetched by hand, kAheadRows ahead of the one being read.
#ifndef DENSE_AHEAD
#define DENSE_AHEAD 8
#endif
constexpr int64_t kAheadRows = DENSE_AHEAD;
template <typename T>
inline void prefetch_rows(const T* W, int64_t a, int64_t b, int64_t in) {
  if (a >= b) return;
  const char* p = reinterpret_cast<const char*>(W + a * in);
  const int64_t bytes = (b - a) * in * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// One row at a time (one sequential stream per thread), four independent accumulators.
template <typename T>
ONEBIT_TARGET("avx512f") void dense_rows_avx512(const T* W, const float* x, float* y, int64_t in,
                                                int64_t r0, int64_t r1) {
  const int64_t full = in / 64 * 64, part = in / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    if ((r - r0) % 8 == 0) prefetch_rows(W, r + kAheadRows, std::min(r + kAheadRows + 8, r1), in);
    const T* w = W + r * in;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j < full; j += 64) {
      a0 = _mm512_fmadd_ps(load16(w + j), _mm512_loadu_ps(x + j), a0);
      a1 = _mm512_fmadd_ps(load16(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
      a2 = _mm512_fmadd_ps(load16(w + j + 32), _mm512_loadu_ps(x + j + 32), a2);
      a3 = _mm512_fmadd_ps(load16(w + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    for (; j < part; j += 16) a0 = _mm512_fmadd_ps(load16(w + j), _mm512_loadu_ps(x + j), a0);
    float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; j < in; ++j) t += widen(w[j]) * x[j];
    y[r] = t;
  }
}

template <typename T>
ONEBIT_TARGET("avx2,fma,f16c") void dense_rows_avx2(const T* W, const float* x, float* y,
                                                    int64_t in, int64_t r0, int64_t r1) {
  const int64_t full = in / 32 * 32, part = in / 8 * 8;
  for (int64_t r = r0; r < r1; ++r) {
    if ((r - r0) % 8 == 0) prefetch_rows(W, r + kAheadRows, std::min(r + kAheadRows + 8, r1), in);
    const T* w = W + r * in;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j < full; j += 32) {
      a0 = _mm256_fmadd_ps(load8(w + j), _mm256_loadu_ps(x + j), a0);
      a1 = _mm256_fmadd_ps(load8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
      a2 = _mm256_fmadd_ps(load8(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
      a3 = _mm256_fmadd_ps(load8(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    for (; j < part; j += 8) a0 = _mm256_fmadd_ps(load8(w + j), _mm256_loadu_ps(x + j), a0);
    float t = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < in; ++j) t += widen(w[j]) * x[j];
    y[r] = t;
  }
}
#endif

template <typename T>
void dense_rows(const T* W, const float* x, float* y, int64_t in, int64_t r0, int64_t r1) {
#if ONEBIT_X86
  switch (current_isa()) {
    case kAvx512:
    case kAvx512Lut:
      return dense_rows_avx512(W, x, y, in, r0, r1);
    case kAvx2:
    case kAvx2Lut:
      return dense_rows_avx2(W, x, y, in, r0, r1);
    default:
      break;
  }
#endif
  dense_rows_scalar(W, x, y, in, r0, r1);
}

// y = W x (+ b) for one token, rows split across threads.
void dense_gemv(const at::Tensor& W, const float* b, const float* x, float* y) {
  const int64_t rows = W.size(0), in = W.size(1);
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(in, 1)) / 4 * 4;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    switch (W.scalar_type()) {
      case at::kHalf:
        return dense_rows(W.const_data_ptr<c10::Half>(), x, y, in, r0, r1);
      case at::kBFloat16:
        return dense_rows(W.const_data_ptr<c10::BFloat16>(), x, y, in, r0, r1);
      default:
        return dense_rows(W.const_data_ptr<float>(), x, y, in, r0, r1);
    }
  });
  if (b != nullptr)
    for (int64_t r = 0; r < rows; ++r) y[r] += b[r];
}

// A row of an embedding table of any float dtype, widened to fp32.
void embedding_row(const at::Tensor& E, int64_t row, float* dst) {
  const int64_t n = E.size(1);
  switch (E.scalar_type()) {
    case at::kHalf: {
      const c10::Half* p = E.const_data_ptr<c10::Half>() + row * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j]);
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = E.const_data_ptr<c10::BFloat16>() + row * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j]);
      break;
    }
    default:
      std::memcpy(dst, E.const_data_ptr<float>() + row * n, static_cast<size_t>(n) * sizeof(float));
  }
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor opt_f32(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? as_f32(*t) : at::Tensor();
}

const float* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// One head's attention for the newest token: s[t] = scale q·K[t] for t < len, softmax, o = Σ p_t V[t]
// (K, V rows of hd floats). Portable, and AVX-512 with q and o in registers for hd = 16 NC.
void softmax_inplace(float* s, int64_t len) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < len; ++t) mx = std::max(mx, s[t]);
  double total = 0;
  for (int64_t t = 0; t < len; ++t) {
    s[t] = std::exp(s[t] - mx);
    total += s[t];
  }
  const float inv = static_cast<float>(1.0 / total);
  for (int64_t t = 0; t < len; ++t) s[t] *= inv;
}

void attend_head(const float* q, const float* K, const float* V, float* s, float* o, int64_t len,
                 int64_t hd, float scale) {
  for (int64_t t = 0; t < len; ++t) {
    float d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t i = 0; i < hd; ++i) d += q[i] * K[t * hd + i];
    s[t] = d * scale;
  }
  softmax_inplace(s, len);
  std::fill(o, o + hd, 0.0f);
  for (int64_t t = 0; t < len; ++t)
    for (int64_t i = 0; i < hd; ++i) o[i] += s[t] * V[t * hd + i];
}

#if ONEBIT_X86
template <int NC>
ONEBIT_TARGET("avx512f") void attend_head_avx512(const float* q, const float* K, const float* V,
                                                 float* s, float* o, int64_t len, float scale) {
  constexpr int64_t hd = 16 * NC;
  __m512 qv[NC], acc[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int64_t t = 0; t < len; ++t) {
    __m512 d = _mm512_mul_ps(qv[0], _mm512_loadu_ps(K + t * hd));
    for (int c = 1; c < NC; ++c) d = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(K + t * hd + 16 * c), d);
    s[t] = _mm512_reduce_add_ps(d) * scale;
  }
  softmax_inplace(s, len);
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const __m512 p = _mm512_set1_ps(s[t]);
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(V + t * hd + 16 * c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
}
#endif

void attend(const float* q, const float* K, const float* V, float* s, float* o, int64_t len,
            int64_t hd, float scale) {
#if ONEBIT_X86
  if (current_isa() >= kAvx512) {
    switch (hd) {
      case 64:
        return attend_head_avx512<4>(q, K, V, s, o, len, scale);
      case 128:
        return attend_head_avx512<8>(q, K, V, s, o, len, scale);
      default:
        break;
    }
  }
#endif
  attend_head(q, K, V, s, o, len, hd, scale);
}

// y = rmsnorm(x) ⊙ w, as LlamaRMSNorm computes it in fp32.
void rms_norm(const float* x, const float* w, float* y, int64_t n, double eps) {
  double ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < n; ++j) ss += static_cast<double>(x[j]) * x[j];
  const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
  for (int64_t j = 0; j < n; ++j) y[j] = w[j] * (x[j] * r);
}

}  // namespace

// One linear of a block: packed (its parts kept as fp32 tensors) or full precision.
struct Linear {
  bool packed = false;
  at::Tensor signs, g, h, gain, bias, outlier_index, outlier_value;  // packed
  bool output_norm = true;
  double eps = 1e-5;
  at::Tensor weight;  // full precision (rows, in), any float dtype; bias in `bias` (fp32)
  int64_t in = 0, out = 0;

  PackedView view;  // the packed parts as raw pointers (into the tensors above)

  void make_view() {
    view.signs = signs.const_data_ptr<uint8_t>();
    view.in = in;
    view.out = out;
    view.words = signs.size(1);
    view.g = ptr(g);
    view.h = ptr(h);
    view.gain = ptr(gain);
    view.bias = ptr(bias);
    if (outlier_index.defined()) {
      view.outlier_index = outlier_index.const_data_ptr<int64_t>();
      view.outlier_value = ptr(outlier_value);
      view.outliers = outlier_index.size(0);
    }
    view.output_norm = output_norm;
    view.eps = eps;
  }

  void forward(const float* x, float* u, float* y) const {
    if (!packed) return dense_gemv(weight, ptr(bias), x, y);
    packed_forward(view, x, 1, u, y);
  }
};

struct Block {
  at::Tensor in_norm, post_norm;  // fp32 (hidden,)
  int64_t q, k, v, o, gate, up, down;
  at::Tensor q_norm, k_norm;  // fp32 (head_dim,), per-head RMSNorm of q and k (Qwen3), or none
  double qk_eps = 1e-6;
};

struct Decoder : torch::CustomClassHolder {
  int64_t n_heads, n_kv, head_dim, max_len, hidden = 0;
  double rms_eps, attn_scale, rope_scale;
  at::Tensor inv_freq, embed, final_norm, lm_head, lm_bias, kcache, vcache;
  std::vector<Linear> linears;
  std::vector<Block> blocks;
  std::vector<float> x, xn, q, k, v, att, mid, gt, u, scores, cs, sn;

  Decoder(int64_t n_heads_, int64_t n_kv_, int64_t head_dim_, int64_t max_len_, double rms_eps_,
          double attn_scale_, at::Tensor inv_freq_, double rope_scale_, at::Tensor embed_,
          at::Tensor final_norm_, at::Tensor lm_head_, c10::optional<at::Tensor> lm_bias_)
      : n_heads(n_heads_), n_kv(n_kv_), head_dim(head_dim_), max_len(max_len_),
        rms_eps(rms_eps_), attn_scale(attn_scale_), rope_scale(rope_scale_) {
    TORCH_CHECK(n_heads % n_kv == 0, "Decoder: ", n_heads, " heads over ", n_kv, " KV heads");
    TORCH_CHECK(head_dim % 2 == 0 && inv_freq_.numel() == head_dim / 2,
                "Decoder: RoPE needs head_dim / 2 frequencies");
    inv_freq = as_f32(inv_freq_);
    embed = embed_.contiguous();
    lm_head = lm_head_.contiguous();
    final_norm = as_f32(final_norm_);
    lm_bias = opt_f32(lm_bias_);
    hidden = embed.size(1);
    TORCH_CHECK(lm_head.size(1) == hidden && final_norm.numel() == hidden,
                "Decoder: lm_head / final norm do not match the embedding width ", hidden);
  }

  int64_t add_packed(at::Tensor signs, at::Tensor g, at::Tensor h, c10::optional<at::Tensor> gain,
                     c10::optional<at::Tensor> bias, c10::optional<at::Tensor> outlier_index,
                     c10::optional<at::Tensor> outlier_value, bool output_norm, double eps) {
    Linear L;
    L.packed = true;
    L.signs = signs.contiguous();
    L.g = as_f32(g);
    L.h = as_f32(h);
    L.gain = opt_f32(gain);
    L.bias = opt_f32(bias);
    if (outlier_index.has_value() && outlier_index->defined() && outlier_index->numel() > 0) {
      L.outlier_index = outlier_index->to(at::kLong).contiguous();
      L.outlier_value = as_f32(*outlier_value);
    }
    L.output_norm = output_norm;
    L.eps = eps;
    L.in = L.g.numel();
    L.out = L.h.numel();
    check_tiles(L.signs, L.in, L.out, "Decoder.add_packed");
    L.make_view();
    linears.push_back(std::move(L));
    return static_cast<int64_t>(linears.size()) - 1;
  }

  int64_t add_dense(at::Tensor weight, c10::optional<at::Tensor> bias) {
    Linear L;
    L.weight = weight.contiguous();
    TORCH_CHECK(L.weight.dim() == 2, "Decoder.add_dense: weight must be 2-D");
    const auto t = L.weight.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                "Decoder.add_dense: weight must be float32, float16 or bfloat16");
    L.bias = opt_f32(bias);
    L.out = L.weight.size(0);
    L.in = L.weight.size(1);
    linears.push_back(std::move(L));
    return static_cast<int64_t>(linears.size()) - 1;
  }

  void add_block(at::Tensor in_norm, at::Tensor post_norm, int64_t q_, int64_t k_, int64_t v_,
                 int64_t o_, int64_t gate_, int64_t up_, int64_t down_,
                 c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm,
                 double qk_eps) {
    const int64_t n = static_cast<int64_t>(linears.size());
    for (int64_t i : {q_, k_, v_, o_, gate_, up_, down_})
      TORCH_CHECK(i >= 0 && i < n, "Decoder.add_block: no linear ", i);
    const int64_t qd = n_heads * head_dim, kd = n_kv * head_dim;
    TORCH_CHECK(linears[q_].out == qd && linears[k_].out == kd && linears[v_].out == kd &&
                    linears[o_].in == qd && linears[q_].in == hidden && linears[o_].out == hidden,
                "Decoder.add_block: attention shapes do not match the heads");
    TORCH_CHECK(linears[gate_].out == linears[up_].out && linears[down_].in == linears[up_].out &&
                    linears[down_].out == hidden,
                "Decoder.add_block: MLP shapes do not match");
    Block B{as_f32(in_norm), as_f32(post_norm), q_, k_, v_, o_, gate_, up_, down_};
    B.q_norm = opt_f32(q_norm);
    B.k_norm = opt_f32(k_norm);
    B.qk_eps = qk_eps;
    TORCH_CHECK(B.q_norm.defined() == B.k_norm.defined() &&
                    (!B.q_norm.defined() ||
                     (B.q_norm.numel() == head_dim && B.k_norm.numel() == head_dim)),
                "Decoder.add_block: q_norm and k_norm must both be (head_dim,) or both absent");
    blocks.push_back(std::move(B));
  }

  void allocate() {
    if (kcache.defined()) return;
    const int64_t L = static_cast<int64_t>(blocks.size());
    kcache = at::zeros({L, n_kv, max_len, head_dim}, at::kFloat);
    vcache = at::zeros({L, n_kv, max_len, head_dim}, at::kFloat);
    int64_t widest = hidden;
    for (const Linear& l : linears) widest = std::max({widest, l.in, l.out});
    x.resize(hidden);
    xn.resize(hidden);
    q.resize(n_heads * head_dim);
    k.resize(n_kv * head_dim);
    v.resize(n_kv * head_dim);
    att.resize(n_heads * head_dim);
    mid.resize(widest);
    gt.resize(widest);
    u.resize(widest);
    scores.resize(static_cast<size_t>(n_heads) * max_len);
    cs.resize(head_dim / 2);
    sn.resize(head_dim / 2);
  }

  // The cache of block `layer` for positions [0, len): k, v (n_kv, len, head_dim), post-RoPE.
  void set_cache(int64_t layer, at::Tensor k_, at::Tensor v_) {
    allocate();
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(blocks.size()), "no block ", layer);
    TORCH_CHECK(k_.dim() == 3 && k_.size(0) == n_kv && k_.size(2) == head_dim &&
                    k_.sizes() == v_.sizes() && k_.size(1) <= max_len,
                "Decoder.set_cache: k, v must be (", n_kv, ", len <= ", max_len, ", ", head_dim,
                ")");
    const int64_t len = k_.size(1);
    kcache.select(0, layer).narrow(1, 0, len).copy_(k_);
    vcache.select(0, layer).narrow(1, 0, len).copy_(v_);
  }

  void rope(float* vec, int64_t heads) const {
    const int64_t half = head_dim / 2;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* a = vec + hh * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = a[i], x2 = a[i + half];
        a[i] = x1 * cs[i] - x2 * sn[i];
        a[i + half] = x2 * cs[i] + x1 * sn[i];
      }
    }
  }

  void attention(int64_t layer, int64_t pos) {
    const int64_t rep = n_heads / n_kv, len = pos + 1, hd = head_dim;
    const float* K = kcache.const_data_ptr<float>() + layer * n_kv * max_len * hd;
    const float* V = vcache.const_data_ptr<float>() + layer * n_kv * max_len * hd;
    const float scale = static_cast<float>(attn_scale);
    const int64_t grain = len * hd >= 16384 ? 1 : n_heads;  // threads only for long caches
    at::parallel_for(0, n_heads, grain, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h)
        attend(q.data() + h * hd, K + (h / rep) * max_len * hd, V + (h / rep) * max_len * hd,
               scores.data() + h * max_len, att.data() + h * hd, len, hd, scale);
    });
  }

  // The logits (vocab,) fp32 for `token` at position `pos`; positions [0, pos) must be cached.
  at::Tensor step(int64_t token, int64_t pos) {
    allocate();
    TORCH_CHECK(pos >= 0 && pos < max_len, "Decoder.step: position ", pos, " is outside the cache of ",
                max_len);
    TORCH_CHECK(token >= 0 && token < embed.size(0), "Decoder.step: token ", token,
                " is outside the vocabulary");
    embedding_row(embed, token, x.data());
    const float* fr = inv_freq.const_data_ptr<float>();
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float f = static_cast<float>(pos) * fr[i];
      cs[i] = static_cast<float>(std::cos(f) * rope_scale);
      sn[i] = static_cast<float>(std::sin(f) * rope_scale);
    }
    const int64_t hd = head_dim;
    for (size_t l = 0; l < blocks.size(); ++l) {
      const Block& B = blocks[l];
      rms_norm(x.data(), B.in_norm.const_data_ptr<float>(), xn.data(), hidden, rms_eps);
      linears[B.q].forward(xn.data(), u.data(), q.data());
      linears[B.k].forward(xn.data(), u.data(), k.data());
      linears[B.v].forward(xn.data(), u.data(), v.data());
      if (B.q_norm.defined()) {  // Qwen3: RMSNorm of each head of q and k, before RoPE
        for (int64_t h = 0; h < n_heads; ++h)
          rms_norm(q.data() + h * hd, B.q_norm.const_data_ptr<float>(), q.data() + h * hd, hd,
                   B.qk_eps);
        for (int64_t h = 0; h < n_kv; ++h)
          rms_norm(k.data() + h * hd, B.k_norm.const_data_ptr<float>(), k.data() + h * hd, hd,
                   B.qk_eps);
      }
      rope(q.data(), n_heads);
      rope(k.data(), n_kv);
      float* Kc = kcache.mutable_data_ptr<float>() + static_cast<int64_t>(l) * n_kv * max_len * hd;
      float* Vc = vcache.mutable_data_ptr<float>() + static_cast<int64_t>(l) * n_kv * max_len * hd;
      for (int64_t h = 0; h < n_kv; ++h) {
        std::memcpy(Kc + (h * max_len + pos) * hd, k.data() + h * hd, hd * sizeof(float));
        std::memcpy(Vc + (h * max_len + pos) * hd, v.data() + h * hd, hd * sizeof(float));
      }
      attention(static_cast<int64_t>(l), pos);
      linears[B.o].forward(att.data(), u.data(), mid.data());
      for (int64_t j = 0; j < hidden; ++j) x[j] += mid[j];
      rms_norm(x.data(), B.post_norm.const_data_ptr<float>(), xn.data(), hidden, rms_eps);
      linears[B.gate].forward(xn.data(), u.data(), gt.data());
      linears[B.up].forward(xn.data(), u.data(), mid.data());
      for (int64_t j = 0; j < linears[B.gate].out; ++j) mid[j] *= gt[j] / (1.0f + std::exp(-gt[j]));
      linears[B.down].forward(mid.data(), u.data(), gt.data());
      for (int64_t j = 0; j < hidden; ++j) x[j] += gt[j];
    }
    rms_norm(x.data(), final_norm.const_data_ptr<float>(), xn.data(), hidden, rms_eps);
    at::Tensor logits = at::empty({lm_head.size(0)}, at::kFloat);
    dense_gemv(lm_head, ptr(lm_bias), xn.data(), logits.mutable_data_ptr<float>());
    return logits;
  }
};

TORCH_LIBRARY_FRAGMENT(onebit, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, double, at::Tensor, double,
                       at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>>())
      .def("add_packed", &Decoder::add_packed)
      .def("add_dense", &Decoder::add_dense)
      .def("add_block", &Decoder::add_block)
      .def("set_cache", &Decoder::set_cache)
      .def("step", &Decoder::step);
}

}  // namespace onebit
