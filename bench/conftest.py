"""Benchmark plumbing: every timed case registers under a group, and the session ends with a
table of ratios against the plain-PyTorch baselines measured in the same run."""
import pytest

_RESULTS = {}  # group -> {label: (median seconds, flops)}


@pytest.fixture
def record():
    def _record(benchmark, group, label, flops):
        st = benchmark.stats.stats
        _RESULTS.setdefault(group, {})[label] = (st.median, flops)
        benchmark.extra_info["gflops"] = flops / st.median / 1e9
    return _record


def ratios():
    """{group: {label: (seconds, GFLOP/s, × vs mm, × vs pipeline)}} from this run."""
    out = {}
    for group, rows in _RESULTS.items():
        mm = rows.get("mm", (None,))[0]
        pipe = rows.get("pipeline", (None,))[0]
        out[group] = {lab: (t, f / t / 1e9, mm / t if mm else float("nan"), pipe / t if pipe else float("nan"))
                      for lab, (t, f) in rows.items()}
    return out


def pytest_terminal_summary(terminalreporter):
    table = ratios()
    if not table:
        return
    w = terminalreporter
    w.section("crh_kernels: ratios measured in this run (median times)")
    w.line(f"{'case':28s} {'impl':10s} {'ms':>9s} {'GFLOP/s':>9s} {'x vs mm':>8s} {'x vs pipe':>9s}")
    for group in sorted(table):
        for lab, (t, gf, vs_mm, vs_pipe) in sorted(table[group].items(), key=lambda kv: kv[1][0]):
            w.line(f"{group:28s} {lab:10s} {t * 1e3:9.2f} {gf:9.1f} {vs_mm:8.2f} {vs_pipe:9.2f}")
