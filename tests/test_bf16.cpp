// The bf16 conversions of storage_traits<bf16> against Eigen::bfloat16's own (round to nearest even,
// NaN to the signed quiet NaN): every bf16 pattern widened, and a spread of float patterns (every
// 65537th one plus the rounding ties, infinities and NaNs) narrowed. The CPU backend's vector row
// writers (ordinary and streaming stores) against scalar::plain_store, bit for bit, at every
// alignment.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include <mhc/core/dtype.hpp>
#include <mhc/cpu/stream.hpp>
#include <mhc/ops/scalar.hpp>

namespace {

using st = mhc::storage_traits<mhc::bf16>;

std::uint16_t bits(mhc::bf16 v) {
  std::uint16_t h;
  std::memcpy(&h, &v, sizeof h);
  return h;
}

float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

TEST(Bf16, WideningIsExactForEveryPattern) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const std::uint16_t hh = static_cast<std::uint16_t>(h);
    const mhc::bf16 v(Eigen::bfloat16_impl::raw_uint16_to_bfloat16(hh));
    const float a = st::load(v), b = static_cast<float>(v);
    ASSERT_EQ(0, std::memcmp(&a, &b, sizeof a)) << "pattern " << h;
  }
}

TEST(Bf16, NarrowingMatchesEigen) {
  std::vector<std::uint32_t> u = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7F800001u, 0xFFC00000u,
                                  0x7FFFFFFFu, 0x7F7FFFFFu, 0x3F808000u, 0x3F818000u, 0x3F807FFFu, 0x3F808001u,
                                  0x00008000u, 0x00018000u, 0x807F8000u, 0x7F7F8000u};
  for (std::uint64_t i = 0; i < (std::uint64_t(1) << 32); i += 65537) u.push_back(static_cast<std::uint32_t>(i));
  for (std::uint32_t x : u) {
    const float f = from_bits(x);
    ASSERT_EQ(bits(mhc::bf16(f)), bits(st::store(f))) << std::hex << "float bits 0x" << x;
  }
}

template <class T, class Writer>
void writer_matches_plain_store() {
  std::vector<float> src = {0.f, -0.f, 1.f, -1.5f, 3.0e38f, -3.0e38f, 1e-40f, -1e-40f};
  for (std::uint32_t x : {0x7F800000u, 0xFF800000u, 0x7F800001u, 0xFFC00000u, 0x3F808000u, 0x3F818000u,
                          0x3F807FFFu, 0x7F7FFFFFu})
    src.push_back(from_bits(x));
  // At least 16 (the NaN-free variant skips them) + the widest row (291) values: the writers read w of them.
  for (std::uint32_t i = 0; src.size() < 320; ++i) src.push_back(from_bits(i * 2654435761u));
  for (int offset = 0; offset < 17; ++offset)  // every alignment of a 32-byte store
    for (int w : {0, 1, 7, 8, 9, 31, 64, 291}) {
      std::vector<T> got(320, T(7.f)), want(320, T(7.f));
      for (bool with_nan : {false, true}) {
        std::vector<float> in(src.begin() + (with_nan ? 0 : 16), src.end());
        Writer::row(got.data() + offset, in.data(), w);
        mhc::detail::stream_fence();
        mhc::scalar::plain_store::row(want.data() + offset, in.data(), w);
        ASSERT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(T)))
            << "offset " << offset << " width " << w << " nan " << with_nan;
      }
    }
}

TEST(RowWriters, Bf16MatchPlainStore) {
  writer_matches_plain_store<mhc::bf16, mhc::detail::simd_store<false>>();
  writer_matches_plain_store<mhc::bf16, mhc::detail::simd_store<true>>();
}

TEST(RowWriters, FloatMatchPlainStore) {
  writer_matches_plain_store<float, mhc::detail::simd_store<false>>();
  writer_matches_plain_store<float, mhc::detail::simd_store<true>>();
}

TEST(RowWriters, Avx2MatchPlainStore) {
  if (!mhc::cpu_isa_supported(mhc::cpu_isa::avx2)) GTEST_SKIP() << "this processor or build has no AVX2 kernels";
  writer_matches_plain_store<mhc::bf16, mhc::detail::simd_store<false, true>>();
  writer_matches_plain_store<mhc::bf16, mhc::detail::simd_store<true, true>>();
  writer_matches_plain_store<float, mhc::detail::simd_store<false, true>>();
  writer_matches_plain_store<float, mhc::detail::simd_store<true, true>>();
}

}  // namespace
