"""The benchmark scripts a GPU session runs still run end to end (CPU smoke: interpreter / tiny models), and write
the rows their results files promise. The timings themselves mean nothing here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import bench_grounded_attention
import bench_step


def run_kernel_bench(out_dir: Path, *args: str) -> tuple[int, list[dict]]:
    """bench_grounded_attention --smoke with extra arguments: (exit status, the CSV rows it wrote)."""
    status = bench_grounded_attention.main(["--smoke", "--out-dir", str(out_dir), *args])
    with open(out_dir / "grounded_attention.csv") as f:
        return status, list(csv.DictReader(f))


def test_kernel_benchmark_smoke_writes_every_provider_and_mode(tmp_path):
    status, rows = run_kernel_bench(tmp_path)
    assert status == 0
    combos = {(r["layer"], r["provider"], r["mode"]) for r in rows}
    layers = {s.layer for s in bench_grounded_attention.SMOKE_SHAPES}
    assert combos == {
        (layer, p, m)
        for layer in layers
        for p in bench_grounded_attention.PROVIDERS
        for m in bench_grounded_attention.MODES
    }
    assert all(float(r["ms_median"]) > 0 and r["timer"] == "eager" for r in rows)
    (summary,) = tmp_path.glob("grounded_attention_summary_*.md")
    assert "SMOKE RUN" in summary.read_text()
    assert list(tmp_path.glob("grounded_attention_*.png"))


def test_step_benchmark_smoke_rows(tmp_path):
    out = tmp_path / "step_time.jsonl"
    bench_step.main(
        ["--tiny", "--resolution", "64", "--batch", "1", "--steps", "1", "--warmup", "0", "--out", str(out)]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_provider = {r["provider"]: r for r in rows}
    assert set(by_provider) == {"ldm_sdpa", "tokencompose_reference"}  # fused is GPU-only
    assert by_provider["ldm_sdpa"]["grounded_layers"] == 0
    assert by_provider["tokencompose_reference"]["grounded_layers"] > 0
    assert by_provider["ldm_sdpa"]["ratio_vs_ldm_sdpa"] == 1.0
    assert all(r["ms_median"] > 0 and r["model"] == "tiny" for r in rows)


def test_kernel_benchmark_block_size_variants(tmp_path):
    """fused[key=value,...] providers time KernelConfig variants next to the default blocks (GPU tuning runs)."""
    status, rows = run_kernel_bench(
        tmp_path, "--providers", "fused,fused[block_m_bwd=16,num_warps=4]", "--modes", "full"
    )
    assert status == 0
    assert {r["provider"] for r in rows} == {"fused", "fused[block_m_bwd=16,num_warps=4]"}
    (summary,) = tmp_path.glob("grounded_attention_summary_*.md")
    assert "| fused (default) | fused[block_m_bwd=16,num_warps=4] |" in summary.read_text()


def test_kernel_benchmark_keeps_going_past_a_failing_provider(tmp_path, capsys):
    """A provider that fails (here an invalid block size) is reported and the exit status is 1, but the other
    providers are still measured and written: one bad variant must not cost a GPU session its other numbers."""
    status, rows = run_kernel_bench(tmp_path, "--providers", "sdpa,fused[block_d=8]", "--modes", "full")
    assert status == 1
    assert {r["provider"] for r in rows} == {"sdpa"} and len(rows) == len(bench_grounded_attention.SMOKE_SHAPES)
    err = capsys.readouterr().err
    assert "FAILED" in err and "block_d must be a power of two" in err
