// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The summary table and the SVG picture of elastic.h's runs. The SVG is
// written by hand (no dependency): one panel per run, time on x, GiB on y.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "elastic.h"

namespace vdecode {
namespace {

constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
constexpr int kColorCount = 4;

std::string XmlEscape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '&': o += "&amp;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

double Gib(std::int64_t b) { return static_cast<double>(b) / (1 << 30); }
double Mib(std::int64_t b) { return static_cast<double>(b) / (1 << 20); }

// A "nice" tick step (1, 2 or 5 times a power of ten) for about `want` ticks.
double NiceStep(double range, int want) {
  if (!(range > 0)) return 1;
  const double raw = range / want;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * p >= raw) return m * p;
  }
  return 10 * p;
}

}  // namespace

std::string ElasticSvg(const std::vector<ElasticResult>& runs) {
  constexpr double kWidth = 1000, kPanel = 280, kLeft = 70, kRight = 230,
                   kTop = 40, kBottom = 40;
  const double plot_w = kWidth - kLeft - kRight;
  const double plot_h = kPanel - kTop - kBottom;
  std::ostringstream o;
  o << absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
      "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"12\">\n",
      kWidth, kPanel * static_cast<double>(runs.size()), kWidth,
      kPanel * static_cast<double>(runs.size()));
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (std::size_t p = 0; p < runs.size(); ++p) {
    const ElasticResult& run = runs[p];
    const double y0 = kPanel * static_cast<double>(p);
    const double t_end =
        run.timeline.empty() ? 1 : std::max(1.0, run.timeline.back().t_ms / 1e3);
    std::int64_t y_max_bytes = run.budget_bytes;
    for (const ElasticSample& s : run.timeline) {
      for (std::int64_t b : s.physical_bytes) y_max_bytes = std::max(y_max_bytes, b);
    }
    const double y_max = std::max(Gib(y_max_bytes) * 1.05, 1e-3);
    auto X = [&](double t_s) { return kLeft + plot_w * t_s / t_end; };
    auto Y = [&](double gib) { return y0 + kTop + plot_h * (1 - gib / y_max); };
    const std::size_t n = run.models.size();

    // Bursts, shaded by the model they go to.
    if (run.burst_s > 0 && n > 0) {
      for (int w = 0; w * run.burst_s < t_end; ++w) {
        const double a = w * run.burst_s;
        const double b = std::min(t_end, a + run.burst_s);
        o << absl::StrFormat(
            "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\" "
            "fill-opacity=\"0.08\"/>\n",
            X(a), y0 + kTop, X(b) - X(a), plot_h,
            kColors[static_cast<std::size_t>(w) % n % kColorCount]);
      }
    }
    // Axes and grid.
    o << absl::StrFormat(
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
        "stroke=\"#444\"/>\n",
        kLeft, y0 + kTop, plot_w, plot_h);
    const double xs = NiceStep(t_end, 10);
    for (double t = 0; t <= t_end + 1e-9; t += xs) {
      o << absl::StrFormat(
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n",
          X(t), y0 + kTop, X(t), y0 + kTop + plot_h, X(t), y0 + kTop + plot_h + 15, t);
    }
    const double ys = NiceStep(y_max, 5);
    for (double g = 0; g <= y_max + 1e-9; g += ys) {
      o << absl::StrFormat(
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
          kLeft, Y(g), kLeft + plot_w, Y(g), kLeft - 5, Y(g) + 4, g);
    }
    o << absl::StrFormat(
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">time (s, modelled)</text>\n",
        kLeft + plot_w / 2, y0 + kPanel - 8);
    o << absl::StrFormat(
        "<text x=\"16\" y=\"%.1f\" transform=\"rotate(-90 16 %.1f)\" "
        "text-anchor=\"middle\">physical GiB</text>\n",
        y0 + kTop + plot_h / 2, y0 + kTop + plot_h / 2);
    // Budget and, for the static split, each model's share.
    o << absl::StrFormat(
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\" "
        "stroke-dasharray=\"6 3\"/>\n",
        kLeft, Y(Gib(run.budget_bytes)), kLeft + plot_w, Y(Gib(run.budget_bytes)));
    if (run.mode == MemoryMode::kStaticSplit && n > 0) {
      const double share = Gib(run.budget_bytes) / static_cast<double>(n);
      o << absl::StrFormat(
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#888\" "
          "stroke-dasharray=\"2 3\"/>\n",
          kLeft, Y(share), kLeft + plot_w, Y(share));
    }
    // One line per cache, at most ~1 point per pixel (the largest value of
    // each pixel column, so a peak is never lost).
    const std::size_t stride =
        std::max<std::size_t>(1, run.timeline.size() / static_cast<std::size_t>(plot_w));
    std::int64_t total_peak = 0;
    for (const ElasticSample& s : run.timeline) {
      std::int64_t sum = 0;
      for (std::int64_t b : s.physical_bytes) sum += b;
      total_peak = std::max(total_peak, sum);
    }
    for (std::size_t m = 0; m < n; ++m) {
      o << absl::StrFormat("<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"",
                           kColors[m % kColorCount]);
      for (std::size_t i = 0; i < run.timeline.size(); i += stride) {
        std::int64_t b = 0;
        for (std::size_t j = i; j < std::min(run.timeline.size(), i + stride); ++j) {
          b = std::max(b, run.timeline[j].physical_bytes[m]);
        }
        o << absl::StrFormat("%.1f,%.1f ", X(run.timeline[i].t_ms / 1e3), Y(Gib(b)));
      }
      o << "\"/>\n";
    }
    // Title and legend.
    o << absl::StrFormat(
        "<text x=\"%.1f\" y=\"%.1f\" font-size=\"14\" font-weight=\"bold\">%s: %d "
        "requests served, %d with TTFT &lt;= %.0f ms</text>\n",
        kLeft, y0 + 24, XmlEscape(MemoryModeName(run.mode)), run.Completed(),
        run.CompletedInBound(), run.ttft_bound_ms);
    const double lx = kLeft + plot_w + 15;
    double ly = y0 + kTop + 10;
    for (std::size_t m = 0; m < n; ++m) {
      const ElasticModelResult& r = run.models[m];
      o << absl::StrFormat(
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
          "stroke-width=\"3\"/><text x=\"%.1f\" y=\"%.1f\">%s</text>\n"
          "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">%d served, TTFT p99 %.1f s</text>\n",
          lx, ly, lx + 20, ly, kColors[m % kColorCount], lx + 25, ly + 4, XmlEscape(r.name),
          lx + 25, ly + 18, r.completed, r.ttft_p99_ms / 1e3);
      ly += 40;
    }
    o << absl::StrFormat(
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\" "
        "stroke-dasharray=\"6 3\"/><text x=\"%.1f\" y=\"%.1f\">budget %.1f GiB</text>\n",
        lx, ly, lx + 20, ly, lx + 25, ly + 4, Gib(run.budget_bytes));
    ly += 20;
    if (run.mode == MemoryMode::kStaticSplit) {
      o << absl::StrFormat(
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#888\" "
          "stroke-dasharray=\"2 3\"/><text x=\"%.1f\" y=\"%.1f\">each model's share</text>\n",
          lx, ly, lx + 20, ly, lx + 25, ly + 4);
      ly += 20;
    }
    o << absl::StrFormat(
        "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">sum of caches' peak %.2f GiB</text>\n"
        "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">shading: whose burst</text>\n",
        lx, ly + 4, Gib(total_peak), lx, ly + 20);
  }
  o << "</svg>\n";
  return o.str();
}

std::string ElasticTable(const std::vector<ElasticResult>& runs) {
  std::ostringstream o;
  constexpr const char* kHead =
      "%-12s %-10s %7s %7s %7s %8s %9s %9s %9s %9s %11s %6s %6s\n";
  o << absl::StrFormat(kHead, "memory", "model", "arrived", "served", "in bnd", "tokens",
                       "TTFT p50", "TTFT p99", "peak phys", "from other", "lost to oth",
                       "preempt", "wait");
  o << absl::StrFormat(kHead, "", "", "", "", "", "", "ms", "ms", "MiB", "MiB", "MiB", "", "");
  o << std::string(122, '-') << "\n";
  for (const ElasticResult& run : runs) {
    std::int64_t lost_total = 0;
    for (const ElasticModelResult& m : run.models) lost_total += m.reclaimed_by_others_bytes;
    for (const ElasticModelResult& m : run.models) {
      // What the others lost went to the models that grew: with two models
      // exactly this one's gain.
      const std::int64_t from_other = lost_total - m.reclaimed_by_others_bytes;
      o << absl::StrFormat(
          "%-12s %-10s %7d %7d %7d %8d %9.0f %9.0f %9.1f %9.1f %11.1f %6d %6d\n",
          MemoryModeName(run.mode), m.name, m.arrived, m.completed, m.completed_in_bound,
          m.generated_tokens, m.ttft_p50_ms, m.ttft_p99_ms, Mib(m.peak_physical_bytes),
          run.models.size() == 2 ? Mib(from_other) : 0.0, Mib(m.reclaimed_by_others_bytes),
          m.preemptions, m.waiting_at_end);
    }
    o << absl::StrFormat(
        "  %s: %d served, %d with TTFT <= %.0f ms; budget %.1f MiB; %d ticks, allocator "
        "%.1f ms in all, %.2f s of real time\n",
        MemoryModeName(run.mode), run.Completed(), run.CompletedInBound(), run.ttft_bound_ms,
        Mib(run.budget_bytes), run.ticks, run.alloc_ms, run.wall_s);
  }
  return o.str();
}

}  // namespace vdecode
