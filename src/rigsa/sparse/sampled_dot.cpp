// The value gradient of the sparse engine in one pass over row-major grad_out and x:
//
//     out[k] = sum_t g[t, r_k] * x[t, c_k],   (r_k, c_k) = divmod(indices[k], in)
//
// Tokens go in tiles of TILE. Each tile's needed rows of g and columns of x are transposed into
// small token-contiguous buffers (they stay in cache), then every index takes a dot product of
// length TILE. torch's route (a transposing copy of all of g and x to memory, then
// sparse.sampled_addmm) moves about 3x the bytes. Threads split the tiles; each keeps its own sums.
#include <torch/extension.h>

#include <algorithm>
#include <thread>
#include <vector>

namespace {

constexpr int64_t TILE = 32;  // tokens per tile (measured: 32 beat 64 and 128 here)
constexpr int64_t BLOCK = 8;  // tokens read together while transposing

template <typename G, typename X>
void run_tiles(const G* g, const X* x, int64_t O, int64_t I, int64_t T, const int64_t* urows, int64_t nr,
               const int64_t* ucols, int64_t nc, const int32_t* lrow, const int32_t* lcol, int64_t m,
               int64_t tile_begin, int64_t tile_end, float* acc) {
  std::vector<float> gt(nr * TILE), xt(nc * TILE);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * TILE, n = std::min(TILE, T - t0);
    if (n < TILE) {
      std::fill(gt.begin(), gt.end(), 0.f);
      std::fill(xt.begin(), xt.end(), 0.f);
    }
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
      const int64_t nj = std::min(BLOCK, n - j0);
      for (int64_t r = 0; r < nr; ++r) {
        float* d = gt.data() + r * TILE + j0;
        const G* s = g + (t0 + j0) * O + urows[r];
        for (int64_t j = 0; j < nj; ++j) d[j] = static_cast<float>(s[j * O]);
      }
      for (int64_t c = 0; c < nc; ++c) {
        float* d = xt.data() + c * TILE + j0;
        const X* s = x + (t0 + j0) * I + ucols[c];
        for (int64_t j = 0; j < nj; ++j) d[j] = static_cast<float>(s[j * I]);
      }
    }
    for (int64_t k = 0; k < m; ++k) {
      const float* a = gt.data() + lrow[k] * TILE;
      const float* b = xt.data() + lcol[k] * TILE;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < TILE; ++j) s += a[j] * b[j];
      acc[k] += s;
    }
  }
}

template <typename G, typename X>
torch::Tensor dispatch(const torch::Tensor& g, const torch::Tensor& x, const std::vector<int32_t>& lrow,
                       const std::vector<int32_t>& lcol, const std::vector<int64_t>& urows,
                       const std::vector<int64_t>& ucols, int64_t threads) {
  const int64_t T = g.size(0), O = g.size(1), I = x.size(1), m = static_cast<int64_t>(lrow.size());
  const int64_t tiles = (T + TILE - 1) / TILE;
  threads = std::max<int64_t>(1, std::min(threads, tiles));
  auto partial = torch::zeros({threads, m}, g.options().dtype(torch::kFloat32));
  const G* gp = reinterpret_cast<const G*>(g.data_ptr());
  const X* xp = reinterpret_cast<const X*>(x.data_ptr());
  const int64_t *ur = urows.data(), *uc = ucols.data();
  float* pp = partial.data_ptr<float>();
  const int64_t nr = static_cast<int64_t>(urows.size()), nc = static_cast<int64_t>(ucols.size());
  auto work = [&](int64_t w) {
    run_tiles<G, X>(gp, xp, O, I, T, ur, nr, uc, nc, lrow.data(), lcol.data(), m, tiles * w / threads,
                    tiles * (w + 1) / threads, pp + w * m);
  };
  {
    pybind11::gil_scoped_release release;
    std::vector<std::thread> pool;
    for (int64_t w = 1; w < threads; ++w) pool.emplace_back(work, w);
    work(0);
    for (auto& t : pool) t.join();
  }
  return threads == 1 ? partial[0] : partial.sum(0);
}

// Each index's row and column, as positions among the rows and columns in use (which are listed).
template <typename Index>
void positions(const torch::Tensor& indices, int64_t O, int64_t I, std::vector<int32_t>& lrow,
               std::vector<int32_t>& lcol, std::vector<int64_t>& urows, std::vector<int64_t>& ucols) {
  const Index* idx = indices.data_ptr<Index>();
  std::vector<int32_t> row_pos(O, -1), col_pos(I, -1);
  for (size_t k = 0; k < lrow.size(); ++k) {
    const int64_t flat = static_cast<int64_t>(idx[k]), r = flat / I, c = flat % I;
    TORCH_CHECK(flat >= 0 && r < O, "sampled_dot: index ", flat, " outside the [", O, " x ", I, "] weight");
    if (row_pos[r] < 0) { row_pos[r] = static_cast<int32_t>(urows.size()); urows.push_back(r); }
    if (col_pos[c] < 0) { col_pos[c] = static_cast<int32_t>(ucols.size()); ucols.push_back(c); }
    lrow[k] = row_pos[r];
    lcol[k] = col_pos[c];
  }
}

}  // namespace

// g: [T, out] and x: [T, in], contiguous, float32 or bfloat16; indices: the m flat positions into the
// [out, in] weight (int32 or int64). Returns the m sums in float32. Extra memory, all freed on return:
// O(threads * (m + TILE * (out + in))).
torch::Tensor sampled_dot(torch::Tensor g, torch::Tensor x, torch::Tensor indices, int64_t threads) {
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0), "sampled_dot: g [T, out] and x [T, in]");
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && indices.is_contiguous(), "sampled_dot: contiguous inputs");
  TORCH_CHECK(g.device().is_cpu() && x.device().is_cpu() && indices.device().is_cpu(), "sampled_dot: CPU only");
  const bool g16 = g.scalar_type() == torch::kBFloat16, x16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((g16 || g.scalar_type() == torch::kFloat32) && (x16 || x.scalar_type() == torch::kFloat32),
              "sampled_dot: float32 or bfloat16 only");
  const int64_t m = indices.numel(), O = g.size(1), I = x.size(1);
  std::vector<int32_t> lrow(m), lcol(m);
  std::vector<int64_t> urows, ucols;
  if (indices.scalar_type() == torch::kInt32) positions<int32_t>(indices, O, I, lrow, lcol, urows, ucols);
  else if (indices.scalar_type() == torch::kInt64) positions<int64_t>(indices, O, I, lrow, lcol, urows, ucols);
  else TORCH_CHECK(false, "sampled_dot: int32 or int64 indices");
  if (g16 && x16) return dispatch<at::BFloat16, at::BFloat16>(g, x, lrow, lcol, urows, ucols, threads);
  if (g16) return dispatch<at::BFloat16, float>(g, x, lrow, lcol, urows, ucols, threads);
  if (x16) return dispatch<float, at::BFloat16>(g, x, lrow, lcol, urows, ucols, threads);
  return dispatch<float, float>(g, x, lrow, lcol, urows, ucols, threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sampled_dot", &sampled_dot); }
