// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "vattn/arbiter_telemetry.h"

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace vattn {
namespace {

// Length of the valid UTF-8 sequence at s[i] (1 to 4), or 0 when the bytes
// there are not one (overlong forms, surrogates and values above U+10FFFF
// included).
std::size_t Utf8Length(const std::string& s, std::size_t i) {
  const auto b = [&](std::size_t k) {
    return static_cast<unsigned char>(s[i + k]);
  };
  const unsigned char c = b(0);
  if (c < 0x80) return 1;
  std::size_t n = 0;
  std::uint32_t cp = 0;
  if ((c & 0xE0) == 0xC0) {
    n = 2, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4, cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    if ((b(k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(k) & 0x3F);
  }
  static constexpr std::uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;
  }
  return n;
}

void AppendJsonString(const std::string& s, std::string* out) {
  out->push_back('"');
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(c));
      ++i;
    } else if (c < 0x20) {
      absl::StrAppendFormat(out, "\\u%04x", c);
      ++i;
    } else if (c < 0x80) {
      out->push_back(static_cast<char>(c));
      ++i;
    } else if (const std::size_t n = Utf8Length(s, i); n > 0) {
      out->append(s, i, n);
      i += n;
    } else {
      out->append("\\ufffd");
      ++i;
    }
  }
  out->push_back('"');
}

void AppendField(const char* name, std::int64_t value, std::string* out) {
  absl::StrAppend(out, ", \"", name, "\": ", value);
}

}  // namespace

std::string ArbiterStatsJson(const ArbiterStats& stats) {
  std::string out = absl::StrCat("{\"version\": ", kArbiterTelemetryVersion);
  AppendField("budget_bytes", stats.budget_bytes, &out);
  AppendField("physical_bytes", stats.physical_bytes, &out);
  AppendField("peak_physical_bytes", stats.peak_physical_bytes, &out);
  AppendField("floors_bytes", stats.floors_bytes, &out);
  AppendField("cross_reclaims", stats.cross_reclaims, &out);
  AppendField("cross_reclaimed_bytes", stats.cross_reclaimed_bytes, &out);
  AppendField("refused_charges", stats.refused_charges, &out);
  AppendField("trimmed_bytes", stats.trimmed_bytes, &out);
  out.append(", \"caches\": [");
  for (std::size_t i = 0; i < stats.caches.size(); ++i) {
    const ArbiterCacheStats& c = stats.caches[i];
    if (i > 0) out.append(", ");
    absl::StrAppend(&out, "{\"id\": ", c.id, ", \"name\": ");
    AppendJsonString(c.name, &out);
    AppendField("physical_bytes", c.physical_bytes, &out);
    AppendField("reclaimable_bytes", c.reclaimable_bytes, &out);
    AppendField("pooled_bytes", c.pooled_bytes, &out);
    AppendField("active_bytes", c.active_bytes, &out);
    AppendField("floor_bytes", c.floor_bytes, &out);
    AppendField("cap_bytes", c.cap_bytes, &out);
    AppendField("peak_physical_bytes", c.peak_physical_bytes, &out);
    AppendField("reclaimed_from_bytes", c.reclaimed_from_bytes, &out);
    AppendField("reclaimed_for_bytes", c.reclaimed_for_bytes, &out);
    AppendField("trimmed_bytes", c.trimmed_bytes, &out);
    out.push_back('}');
  }
  out.append("]}");
  return out;
}

std::string TelemetryJson(const MemoryArbiter& arbiter) {
  return ArbiterStatsJson(arbiter.Stats());
}

}  // namespace vattn
