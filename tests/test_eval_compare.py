"""``python -m tcscale.eval.compare``: the side-by-side table, the paper rows, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tcscale.eval.compare import compare_table, load_results, main
from tcscale.eval.paper_numbers import PAPER_ROWS
from tests.helpers.eval_models import REPO_ROOT

SAMPLER = "pndm, 50 steps, CFG 7.5, 512 px"


def write(path, **over):
    data = {
        "name": "tc-sd14",
        "model": "runs/tc/final",
        "created": "2026-11-30T12:00:00+00:00",
        "metrics": {
            "multigen/coco/MG2": 97.5,
            "multigen/coco/MG2_std": 0.41,
            "multigen/coco/MG3": 75.0,
            "visor/OA": 51.234,
            "grounding/miou": 0.58761,
        },
        "protocol": {  # the paper's protocol for MultiGen and VISOR; grounding is tcscale's own suite
            "multigen/coco": {"suite": "multigen", "precision": "fp32", "samples": 10000, "sampler": SAMPLER},
            "visor": {"suite": "visor", "precision": "fp32", "samples": 101120, "sampler": SAMPLER},
            "grounding": {"suite": "grounding", "precision": "fp32", "samples": 640},
            "fid/coco10k": {"suite": "fid", "precision": "fp32", "samples": 10000, "sampler": SAMPLER},
        },
        "details": {"num_images": 10000},
    }
    data.update(over)
    data = {k: v for k, v in data.items() if v is not None}  # key=None: leave the key out
    path.write_text(json.dumps(data))
    return path


def test_table_side_by_side_with_paper_rows(tmp_path, capsys):
    a = write(tmp_path / "a.json")
    b = write(tmp_path / "b.json", name="sd14", model="CompVis/stable-diffusion-v1-4", metrics={"fid/coco10k": 21.0},
              protocol=None)  # fmt: skip
    assert main([str(a), str(b)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "run",
        "model",
        "multigen/coco/MG2",
        "multigen/coco/MG3",
        "visor/OA",
        "fid/coco10k",
        "grounding/miou",
    ]  # fixed order, _std folded into its metric
    table = [line for line in lines if line.startswith("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]}
    # the grounding suite is not the paper's Table 4 protocol: marked, with the reason under the table
    assert rows["tc-sd14"] == ["tc-sd14", "runs/tc/final", "97.50 ± 0.41", "75.00", "51.23", "—", "0.5876 †1"]
    assert rows["sd14"][2:] == ["—", "—", "—", "21.00 †2", "—"]  # sd14's file records no protocol
    notes = lines[len(table) :]
    assert notes[1].startswith("† not the paper's protocol")
    assert notes[2] == "†1 tc-sd14, grounding/miou: suite grounding (paper: daam_cocogen: DAAM heat maps on " + (
        "COCO-Gen after null-text inversion)"
    )
    assert notes[3] == "†2 sd14, fid/coco10k: no protocol recorded in the results file"
    paper = [k for k in rows if k.startswith("paper:")]
    assert len(paper) == 3 and all(rows[k][1] == "(paper number)" for k in paper)
    sd14 = rows["paper: SD1.4 (TokenCompose Tab. 1, 4; VISOR)"]
    assert sd14[2:] == ["90.72 ± 1.33", "50.74 ± 0.89", "29.86", "20.88", "0.5371"]  # with Table 1's stds
    tc = rows["paper: TokenCompose SD1.4 (TokenCompose Tab. 1, 4)"]
    assert tc[2:] == ["98.08 ± 0.40", "76.16 ± 1.04", "52.15", "20.19", "0.5876"]


def test_every_cell_off_the_papers_protocol_is_marked_with_its_reason(tmp_path):
    fp16 = {"suite": "multigen", "precision": "fp16", "samples": 10000, "sampler": SAMPLER}
    small = {"suite": "multigen", "precision": "fp32", "samples": 500, "sampler": SAMPLER}
    steps = {"suite": "multigen", "precision": "fp32", "samples": 10000, "sampler": "ddim, 20 steps, CFG 7.5, 512 px"}
    metrics = {f"multigen/{s}/MG{k}": 50.0 for s in ("coco", "ade20k") for k in (2, 3)}
    metrics.update({"latency/s_per_image": 3.0, "synthetic/k2/MG2": 10.0})
    runs = [
        write(tmp_path / "a.json", name="half", metrics=metrics,
              protocol={"multigen/coco": fp16, "multigen/ade20k": dict(fp16, precision="fp32"), "latency": {}}),
        write(tmp_path / "b.json", name="few", metrics=metrics,
              protocol={"multigen/coco": small, "multigen/ade20k": steps}),
    ]  # fmt: skip
    table = compare_table([load_results(p) for p in runs])
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:4]}
    marked = {name: [h for h, c in zip(header, row) if "†" in c] for name, row in rows.items()}
    # every MG cell of a non-paper protocol, and latency (another machine), is marked; ade20k of "half" is the
    # paper's protocol; synthetic has no paper number
    assert marked["half"] == [f"multigen/coco/MG{k}" for k in (2, 3)] + ["latency/s_per_image"]
    assert marked["few"] == [f"multigen/{s}/MG{k}" for s in ("coco", "ade20k") for k in (2, 3)] + [
        "latency/s_per_image"
    ]
    assert "†1 half, multigen/coco: precision fp16 (paper: fp32)" in lines
    assert "†2 half, latency/s_per_image: timed on the paper's hardware" in lines
    assert "†3 few, multigen/coco: samples 500 (paper: 10000)" in lines
    assert f"†4 few, multigen/ade20k: sampler ddim, 20 steps, CFG 7.5, 512 px (paper: {SAMPLER})" in lines
    assert "†" not in compare_table([load_results(p) for p in runs], paper=False)  # no paper value beside it


def test_table4_is_comparable_only_from_the_daam_cocogen_suite(tmp_path):
    daam = {"suite": "daam_cocogen", "precision": "fp32", "samples": 4, "steps": 50, "guidance": 7.5}
    run = write(tmp_path / "a.json", metrics={"daam_cocogen/miou": 0.55, "grounding/miou": 0.6},
                protocol={"daam_cocogen": daam, "grounding": {"suite": "grounding", "precision": "fp32"}})  # fmt: skip
    lines = compare_table([load_results(run)]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {line.split("|")[1].strip(): dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[2:] if line.startswith("|")}  # fmt: skip
    assert rows["tc-sd14"]["daam_cocogen/miou"] == "0.5500"  # Table 4's protocol: no mark
    assert rows["tc-sd14"]["grounding/miou"] == "0.6000 †1"
    paper_sd14 = rows["paper: SD1.4 (TokenCompose Tab. 1, 4; VISOR)"]
    assert paper_sd14["daam_cocogen/miou"] == paper_sd14["grounding/miou"] == "0.5371"


def test_paper_numbers_are_the_design_numbers():
    sd, tc = (
        PAPER_ROWS["paper: SD1.4 (TokenCompose Tab. 1, 4; VISOR)"],
        PAPER_ROWS["paper: TokenCompose SD1.4 (TokenCompose Tab. 1, 4)"],
    )
    assert [sd[f"multigen/ade20k/MG{k}"] for k in range(2, 6)] == [89.81, 53.96, 16.52, 1.89]
    assert [tc[f"multigen/ade20k/MG{k}"] for k in range(2, 6)] == [97.75, 76.93, 33.92, 6.21]
    assert [tc[f"multigen/coco/MG{k}"] for k in range(2, 6)] == [98.08, 76.16, 28.81, 3.28]
    assert PAPER_ROWS["paper: SD1.4 LDM-only finetune (TokenCompose Tab. 4)"]["daam_cocogen/miou"] == 0.5412
    # Table 1's standard deviations over rounds, and FID (F)
    assert [sd[f"multigen/coco/MG{k}_std"] for k in range(2, 6)] == [1.33, 0.89, 0.45, 0.21]
    assert [tc[f"multigen/ade20k/MG{k}_std"] for k in range(2, 6)] == [0.34, 1.09, 1.47, 0.62]
    assert (sd["fid/flickr30k1k"], tc["fid/flickr30k1k"]) == (71.46, 71.13)


def test_no_paper_rows_and_unrelated_metrics(tmp_path):
    res = [load_results(write(tmp_path / "a.json", metrics={"synthetic/full_content": 99.5}))]
    table = compare_table(res)
    assert "paper:" not in table  # no paper row shares a column with this run
    assert "synthetic/full_content" in table.splitlines()[0]
    assert "paper:" not in compare_table([load_results(write(tmp_path / "b.json"))], paper=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        (json.dumps({"name": "x", "model": "m", "created": "2026-11-30"}), "missing 'metrics'"),
        (json.dumps({"name": "x", "model": "m", "created": "yesterday", "metrics": {}}), "not an ISO-8601 date"),
        (json.dumps({"name": "x", "model": "m", "created": "2026-11-30", "metrics": {"visor/OA": "high"}}), "visor/OA"),
        (json.dumps({"name": "", "model": "m", "created": "2026-11-30", "metrics": {}}), "'name' must be"),
    ],
)
def test_bad_results_file_is_one_error_line_and_exit_2(tmp_path, capsys, content, message):
    good = write(tmp_path / "good.json")
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main([str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.json" in err[0] and message in err[0]


def test_module_entry_point(tmp_path):
    a = write(tmp_path / "a.json")
    ok = subprocess.run([sys.executable, "-m", "tcscale.eval.compare", str(a)], cwd=REPO_ROOT, capture_output=True)
    assert ok.returncode == 0 and b"| tc-sd14 |" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tcscale.eval.compare", str(a), str(tmp_path / "missing.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == f"error: {tmp_path / 'missing.json'}: no such file"
