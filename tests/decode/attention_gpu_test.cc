// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The CUDA decode-attention kernel against the float64 reference (fp16 and
// bf16; token-major, layer-major and paged layouts; GQA groups 1, 4, 8;
// head dims 64, 128, 256), with device outputs poisoned (NaN) before every
// run; the CUDA fill kernel against the CPU fill; and the decode loop end
// to end on vattn's CUDA backend and on the paged baseline. Skips, with the
// reason, without the CUDA kernels or a device.
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_attention.h"
#include "cuda_attention.h"
#include "decode_loop.h"
#include "decode_test_util.h"
#include "gtest/gtest.h"
#include "kv_fill.h"
#include "thread_pool.h"
#include "vattn/vattn.h"

namespace vdecode {
namespace {

using testing::HostKv;
using testing::KvCase;
using testing::Layout;

// Empty when the kernels can run here, else why not.
std::string WhyNoGpu() {
  if (!cuda::Built()) return "built without the CUDA kernels (no nvcc)";
  int n = 0;
  const std::string e = cuda::DeviceCount(&n);
  if (!e.empty()) return "no CUDA device: " + e;
  if (n == 0) return "no CUDA device";
  return {};
}

#define SKIP_WITHOUT_GPU()                                  \
  do {                                                      \
    const std::string why = WhyNoGpu();                     \
    if (!why.empty()) GTEST_SKIP() << why;                  \
  } while (false)

// A device allocation freed on scope exit.
struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(std::size_t bytes) {
    EXPECT_EQ(cuda::Malloc(&p, bytes == 0 ? 16 : bytes), "");
  }
  ~DeviceBuffer() { cuda::Free(p); }
  template <typename T>
  T* as() const { return static_cast<T*>(p); }
};

class CudaAttentionTest
    : public ::testing::TestWithParam<std::tuple<DType, Layout, int, int>> {};

TEST_P(CudaAttentionTest, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  const auto [dtype, layout, group, head_dim] = GetParam();
  KvCase c;
  c.dtype = dtype;
  c.layout = layout;
  c.kv_heads = 2;
  c.q_heads = 2 * group;
  c.head_dim = head_dim;
  c.lengths = {1, 3, 16, 17, 100, 1000, 4099, 31};
  c.q_scale = 3.0f;
  c.seed = static_cast<std::uint32_t>(group * 1000 + head_dim);
  HostKv kv(c);
  void* stream = nullptr;
  ASSERT_EQ(cuda::StreamCreate(&stream), "");
  DeviceBuffer buf(kv.buffer().size());
  DeviceBuffer table(kv.table().size() * sizeof(std::int32_t));
  DeviceBuffer rows(kv.rows().size() * sizeof(std::int32_t));
  DeviceBuffer lengths(kv.lengths().size() * sizeof(std::int32_t));
  DeviceBuffer q(kv.q().size() * sizeof(float));
  DeviceBuffer out(kv.out().size() * sizeof(float));
  ASSERT_EQ(cuda::CopyToDevice(buf.p, kv.buffer().data(), kv.buffer().size(), stream), "");
  if (!kv.table().empty()) {
    ASSERT_EQ(cuda::CopyToDevice(table.p, kv.table().data(),
                                 kv.table().size() * sizeof(std::int32_t), stream), "");
  }
  ASSERT_EQ(cuda::CopyToDevice(rows.p, kv.rows().data(), kv.rows().size() * 4, stream), "");
  ASSERT_EQ(cuda::CopyToDevice(lengths.p, kv.lengths().data(), kv.lengths().size() * 4, stream), "");
  ASSERT_EQ(cuda::CopyToDevice(q.p, kv.q().data(), kv.q().size() * sizeof(float), stream), "");
  ASSERT_EQ(cuda::Memset(out.p, 0xff, kv.out().size() * sizeof(float), stream), "");  // NaN
  const DecodeArgs dev = kv.ArgsAt(buf.p, table.as<std::int32_t>(), rows.as<std::int32_t>(),
                                   lengths.as<std::int32_t>(), q.as<float>(), out.as<float>());
  ASSERT_EQ(cuda::DecodeAttention(dev, stream), "");
  std::vector<float>& got = kv.out();
  ASSERT_EQ(cuda::CopyToHost(got.data(), out.p, got.size() * sizeof(float), stream), "");
  const DecodeArgs host = kv.HostArgs();
  const std::size_t per = static_cast<std::size_t>(c.q_heads * head_dim);
  for (int i = 0; i < host.num_requests; ++i) {
    std::vector<double> ref;
    ReferenceDecodeAttention(host, i, &ref);
    EXPECT_LE(RelativeError(got.data() + i * per, ref.data(), per), testing::ToleranceFor(dtype))
        << "request " << i << " (length " << c.lengths[static_cast<std::size_t>(i)] << ")";
  }
  cuda::StreamDestroy(stream);
}

INSTANTIATE_TEST_SUITE_P(
    Kernels, CudaAttentionTest,
    ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16),
                       ::testing::Values(Layout::kTokenMajor, Layout::kLayerMajor, Layout::kPaged),
                       ::testing::Values(1, 4, 8), ::testing::Values(64, 128, 256)),
    [](const auto& tp) {
      return std::string(DTypeName(std::get<0>(tp.param))) + "_" +
             testing::LayoutName(std::get<1>(tp.param)) + "_group" +
             std::to_string(std::get<2>(tp.param)) + "_dim" +
             std::to_string(std::get<3>(tp.param));
    });

TEST(CudaAttentionTest, RejectsWhatItCannotRead) {
  SKIP_WITHOUT_GPU();
  KvCase c;
  c.dtype = DType::kF32;
  HostKv kv(c);
  EXPECT_NE(cuda::DecodeAttention(kv.HostArgs(), nullptr), "");  // fp32
  KvCase c2;
  c2.head_dim = 40;
  HostKv kv2(c2);
  EXPECT_NE(cuda::DecodeAttention(kv2.HostArgs(), nullptr), "");  // dim 40
}

TEST(CudaFillTest, WritesWhatTheCpuFillWrites) {
  SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const int layers = 3, kv_heads = 2, dim = 64, rows = 3, max_len = 40;
    const std::int64_t tok = layers * 2 * kv_heads * dim;
    const std::size_t bytes = static_cast<std::size_t>(rows * max_len * tok) * 2;
    std::vector<char> host(bytes, 0);
    DeviceBuffer dbuf(bytes);
    ASSERT_EQ(cuda::Memset(dbuf.p, 0, bytes, nullptr), "");
    std::vector<void*> hp, dp;
    for (int kv = 0; kv < 2; ++kv) {
      for (int l = 0; l < layers; ++l) {
        const std::int64_t off = (l * 2 + kv) * kv_heads * dim * 2;
        hp.push_back(host.data() + off);
        dp.push_back(dbuf.as<char>() + off);
      }
    }
    DeviceBuffer dptrs(dp.size() * sizeof(void*));
    ASSERT_EQ(cuda::CopyToDevice(dptrs.p, dp.data(), dp.size() * sizeof(void*), nullptr), "");
    const std::vector<FillItem> items = {{0, 0, 40, 5}, {2, 7, 1, 6}, {1, 3, 20, 7}};
    DeviceBuffer ditems(items.size() * sizeof(FillItem));
    ASSERT_EQ(cuda::CopyToDevice(ditems.p, items.data(), items.size() * sizeof(FillItem), nullptr), "");
    FillArgs f;
    f.layout.dtype = dtype;
    f.layout.stride_token = tok;
    f.layout.stride_row = tok * max_len;
    f.layout.stride_head = dim;
    f.layers = layers;
    f.kv_heads = kv_heads;
    f.head_dim = dim;
    f.num_items = static_cast<int>(items.size());
    f.max_count = 40;
    f.seed = 11;
    FillArgs hf = f;
    hf.k_layers = hp.data();
    hf.v_layers = hp.data() + layers;
    hf.items = items.data();
    ThreadPool pool(2);
    CpuFillKv(hf, pool);
    f.k_layers = dptrs.as<void*>();
    f.v_layers = dptrs.as<void*>() + layers;
    f.items = ditems.as<FillItem>();
    ASSERT_EQ(cuda::FillKv(f, nullptr), "");
    std::vector<char> back(bytes);
    ASSERT_EQ(cuda::CopyToHost(back.data(), dbuf.p, bytes, nullptr), "");
    EXPECT_EQ(std::memcmp(back.data(), host.data(), bytes), 0) << DTypeName(dtype);
  }
}

// The decode loop on the GPU: vattn's CUDA backend (both layouts) and the
// paged baseline, every step's sample checked against the reference.
TEST(CudaBatchDecodeTest, VattnAndPagedEndToEnd) {
  SKIP_WITHOUT_GPU();
  auto backend = vattn::MakeCudaBackend(0);
  if (!backend.ok()) GTEST_SKIP() << "MakeCudaBackend(0): " << backend.status();
  const std::vector<Request> reqs = RandomRequests(40, 1, 3000, 1, 40, 5);
  for (vattn::Layout layout : {vattn::Layout::kTokenMajor, vattn::Layout::kLayerMajor}) {
    for (Engine e : {Engine::kVattn, Engine::kPaged}) {
      if (e == Engine::kPaged && layout == vattn::Layout::kLayerMajor) continue;
      DecodeConfig c;
      c.shape = *ModelPreset("llama3-8b");
      c.shape.layers = 4;
      c.device = Device::kCuda;
      c.engine = e;
      c.layout = layout;
      c.backend = *backend;
      c.max_slots = 12;
      c.max_tokens = 4096;
      c.check_samples = 25;
      absl::StatusOr<RunResult> r = RunDecode(c, reqs);
      ASSERT_TRUE(r.ok()) << EngineName(e) << " " << vattn::LayoutName(layout) << ": "
                          << r.status();
      EXPECT_EQ(r->checks.size(), 25u);
      EXPECT_LE(r->max_rel_error, r->tolerance);
      EXPECT_GT(r->tokens_per_s, 0);
    }
  }
}

}  // namespace
}  // namespace vdecode
