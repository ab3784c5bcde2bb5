"""scripts/kbit_sweep.py: rows of a tiny sweep (RTN and GPTQ), Pareto front, resume, CLI errors."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxcomp.errors import JaxcompError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "kbit_sweep.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("kbit_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kbit_sweep"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ks = _load_script()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model

    loaded = load_model(tiny_llama_dir)
    rng = np.random.default_rng(0)
    vocab = loaded.config.vocab_size
    eval_windows = rng.integers(0, vocab, size=(4, 32)).astype(np.int32)
    calib_windows = rng.integers(0, vocab, size=(4, 32)).astype(np.int32)
    return build_model(loaded.config), loaded.params, eval_windows, calib_windows


def _kernels(params):
    """(K, N) of every kernel inside a decoder block."""
    import jax

    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", str(k)) for k in path]
        if keys[0].startswith("layers_") and keys[-1] == "kernel":
            out.append(leaf.shape)
    return out


def _expected_bytes(shapes, bits, block, zero_point):
    """Packed codes (ceil(K/8) * bits bytes per column), bf16 scales, uint8 zero points."""
    total = 0
    for k, n in shapes:
        groups = -(-k // block)
        total += -(-k // 8) * bits * n + groups * n * (2 + (1 if zero_point else 0))
    return total


def test_grid_rows_rtn_and_gptq(tiny, tmp_path):
    from jaxcomp.core import tree_size

    model, params, ev, cal = tiny
    grid = ks.make_grid(["rtn", "gptq"], [3, 4], ["int", "float"], [32])
    assert len(grid) == 8
    csv_path = str(tmp_path / "results.csv")
    seen = []
    rows = ks.run_sweep(model, params, ev, cal, grid, csv_path, batch_size=2, on_row=seen.append)
    assert rows == seen and len(rows) == 8
    assert [(r["method"], r["dtype"], r["bits"]) for r in rows] == [
        (c.method, c.dtype, c.bits) for c in grid]
    on_disk = ks.read_rows(csv_path)
    assert [r["format"] for r in on_disk] == [r["format"] for r in rows]
    assert [r["format"] for r in rows[:4]] == ["int3-asym-g32", "int4-asym-g32", "fp3e2-g32",
                                               "fp4e2-g32"]
    shapes = _kernels(params)
    assert len(shapes) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    weights = sum(k * n for k, n in shapes)
    n0, b0 = tree_size(params)
    float_bytes = b0 - 4 * weights
    for r, disk in zip(rows, on_disk, strict=True):
        assert r["status"] == "ok" and disk["status"] == "ok", r
        assert 1.0 < r["ppl"] < 1000 and disk["ppl"] == pytest.approx(r["ppl"], rel=1e-12)
        qbytes = _expected_bytes(shapes, r["bits"], 32, zero_point=r["dtype"] == "int")
        assert r["quant_weights"] == weights and r["quant_bytes"] == qbytes
        assert r["quant_bits_per_weight"] == pytest.approx(8 * qbytes / weights)
        assert r["model_params"] == n0
        assert r["model_bytes"] == float_bytes + qbytes
        assert r["model_bits_per_param"] == pytest.approx(8 * (float_bytes + qbytes) / n0)
        assert r["wall_s"] >= r["quantize_s"] > 0 and r["eval_s"] > 0
    # 4-bit int: 4 code bits + (16 + 8) / 32 bits of scale and zero point per weight
    assert rows[1]["quant_bits_per_weight"] == pytest.approx(4.75)
    # same format, same storage for RTN and GPTQ; GPTQ chose other codes
    for rtn, gptq in zip(rows[:4], rows[4:], strict=True):
        assert rtn["quant_bytes"] == gptq["quant_bytes"]
        assert rtn["ppl"] != gptq["ppl"]


def test_int8_rtn_matches_float_baseline(tiny, tmp_path):
    from jaxcomp.eval import perplexity

    model, params, ev, _ = tiny
    base = perplexity(model, params, ev, 2, progress=False).ppl
    (row,) = ks.run_sweep(model, params, ev, None, ks.make_grid(["rtn"], [8], ["int"], [32]),
                          str(tmp_path / "r.csv"), batch_size=2)
    assert row["ppl"] == pytest.approx(base, rel=2e-3)


def test_diverged_and_failed_configurations_are_rows(tiny, tmp_path):
    model, params, ev, _ = tiny
    nan_embed = {**params, "embed_tokens": {"embedding": np.full_like(
        params["embed_tokens"]["embedding"], np.nan)}}
    grid = ks.make_grid(["rtn"], [4], ["nf"], ["channel"])
    (row,) = ks.run_sweep(model, nan_embed, ev, None, grid, str(tmp_path / "a.csv"))
    assert row["status"] == "diverged" and math.isnan(row["ppl"])
    assert row["quant_bits_per_weight"] > 4  # sizes are still measured
    bad = {**params, "layers_1": {**params["layers_1"], "mlp": {
        **params["layers_1"]["mlp"], "up_proj": {"kernel": np.full_like(
            params["layers_1"]["mlp"]["up_proj"]["kernel"], np.nan)}}}}
    (row,) = ks.run_sweep(model, bad, ev, None, grid, str(tmp_path / "b.csv"))
    assert row["status"] == "error" and "layers_1/mlp/up_proj/kernel" in row["note"]
    summary = ks.summarize(ks.read_rows(str(tmp_path / "b.csv")))
    assert summary["errors"] == {"rtn/nf4/channel": row["note"]} and summary["pareto"] == []


def test_resume_skips_rows_already_written(tiny, tmp_path):
    model, params, ev, _ = tiny
    csv_path = str(tmp_path / "results.csv")
    first = ks.make_grid(["rtn"], [4], ["int"], [32, "channel"])
    ks.run_sweep(model, params, ev, None, first, csv_path)
    before = ks.read_rows(csv_path)
    with pytest.raises(JaxcompError, match="--resume"):
        ks.run_sweep(model, params, ev, None, first, csv_path)
    assert ks.read_rows(csv_path) == before  # untouched
    with open(csv_path, "a") as f:
        f.write("rtn,nf,4,32,nf4-g32,ok,12.")  # a row cut off mid-write
    more = ks.make_grid(["rtn"], [4], ["int", "nf"], [32, "channel"])
    new = ks.run_sweep(model, params, ev, None, more, csv_path, resume=True)
    assert [(r["dtype"], r["block"]) for r in new] == [("nf", "32"), ("nf", "channel")]
    after = ks.read_rows(csv_path)
    assert after[:2] == before  # old rows kept as they were (times included)
    assert len(after) == 4
    with open(csv_path, newline="") as f:
        assert len(list(csv.reader(f))) == 5  # header + 4, no duplicate, no partial row
    assert ks.run_sweep(model, params, ev, None, more, csv_path, resume=True) == []


def test_pareto_front_on_hand_made_points():
    pts = [(4.0, 10.0),    # 0: on the front
           (3.0, 12.0),    # 1: dominated by 3 (same bits, lower ppl)
           (4.5, 11.0),    # 2: more bits, worse than 0
           (3.0, 11.5),    # 3: on the front
           (2.0, math.nan),  # 4: diverged
           (2.5, math.inf),  # 5: diverged
           (2.0, 40.0),    # 6: on the front (cheapest finite point)
           (6.0, 9.0),     # 7: on the front
           (6.0, 9.0),     # 8: tie with 7: first one only
           (8.0, 9.0)]     # 9: not better than 7
    assert ks.pareto_front(pts) == [6, 3, 0, 7]
    assert ks.pareto_front([]) == []
    # the front is the running minimum over increasing bits
    rng = np.random.default_rng(0)
    rand = [(float(x), float(y)) for x, y in rng.uniform(1, 10, size=(200, 2))]
    front = ks.pareto_front(rand)
    for x, y in rand:
        best = min(rand[i][1] for i in front if rand[i][0] <= x)
        assert best <= y


def _row(method, dtype, bits, block, bpw, ppl, status="ok"):
    return {"method": method, "dtype": dtype, "bits": bits, "block": str(block),
            "format": f"{dtype}{bits}", "status": status, "ppl": ppl,
            "quant_bits_per_weight": bpw, "model_bits_per_param": bpw + 10, "note": ""}


def test_summary_front_and_budget_bins():
    rows = [_row("rtn", "int", 3, 128, 3.19, 30.0), _row("gptq", "int", 3, 128, 3.19, 20.0),
            _row("rtn", "nf", 3, 64, 3.25, 25.0), _row("rtn", "int", 4, 32, 4.75, 12.0),
            _row("gptq", "float", 4, 64, 4.25, 13.0), _row("rtn", "int", 2, 32, 2.75, math.nan,
                                                           "diverged")]
    s = ks.summarize(rows, {"model": "m"})
    assert [p["config"] for p in s["pareto"]] == ["gptq/int3/g128", "gptq/float4/g64",
                                                  "rtn/int4/g32"]
    assert s["diverged"] == ["rtn/int2/g32"] and s["ok"] == 5 and s["settings"] == {"model": "m"}
    bins = {tuple(b["quant_bits_per_weight"]): (b["best"]["config"], b["configs"])
            for b in s["best_per_bin"]}
    assert bins == {(3.0, 4.0): ("gptq/int3/g128", 3), (4.0, 5.0): ("rtn/int4/g32", 2)}
    json.dumps(s)  # JSON-ready


def test_parse_arguments():
    args = ks.parse_args(["--bits", "2-4,8", "--blocks", "64,per-channel", "--dtypes", "nf"])
    assert args.bits == [2, 3, 4, 8] and args.blocks == [64, "channel"] and args.dtypes == ["nf"]
    default = ks.parse_args([])
    assert len(ks.make_grid(default.methods, default.bits, default.dtypes, default.blocks)) == 210
    assert ks.SweepConfig("gptq", "float", 8, "channel").format().name == "fp8e4-channel"


@pytest.mark.parametrize("argv, needle", [
    (["--dtypes", "int,foo"], "unknown dtype 'foo'"),
    (["--dtypes", "flaot"], "did you mean 'float'"),
    (["--methods", "awq"], "unknown method 'awq'"),
    (["--bits", "9"], "9 is out of range"),
    (["--bits", "1-3"], "1 is out of range"),
    (["--bits", "four"], "not an integer"),
    (["--bits", "4,4"], "repeated"),
    (["--blocks", "0"], "block size must be >= 1"),
    (["--blocks", "row"], "neither a block size nor 'channel'"),
    (["--eval-tokens", "100"], "shorter than one window"),
    (["--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--plot-only"], "nothing to plot"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "sweep"
    assert ks.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_existing_sweep_needs_resume_and_same_settings(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "results.csv").write_text(",".join(ks.COLUMNS) + "\n")
    assert ks.main(["--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    (out / "sweep.json").write_text(json.dumps(
        {**{k: getattr(ks.parse_args([]), k) for k in ks.META_KEYS}, "eval_tokens": 4096}))
    assert ks.main(["--out", str(out), "--resume"]) == 2
    assert "eval_tokens is 16384 but the sweep" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["results.csv", "sweep.json"]


def test_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--bits", "2-9", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kbit_sweep: error: --bits: 9 is out of range (2..8)"
    assert not (tmp_path / "x").exists()


def test_cli_end_to_end_tiny(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    common = ["--model", tiny_llama_dir, "--corpus", f"text:{tiny_text_file}", "--methods",
              "rtn", "--dtypes", "int", "--blocks", "32", "--eval-tokens", "64", "--seq-len",
              "16", "--batch-size", "2", "--out", str(out), "--no-progress"]
    assert ks.main([*common, "--bits", "4"]) == 0
    assert sorted(os.listdir(out)) == ["kbit_sweep.png", "results.csv", "summary.json",
                                       "sweep.json"]
    meta = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert meta["eval_windows"] == 4 and meta["baseline_ppl"] > 1
    assert ks.main([*common, "--bits", "4,8", "--resume"]) == 0
    rows = ks.read_rows(str(out / "results.csv"))
    assert [r["bits"] for r in rows] == [4, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["configs"] == 2 and summary["settings"]["baseline_ppl"] == meta[
        "baseline_ppl"]
    assert {p["config"] for p in summary["pareto"]} <= {"rtn/int4/g32", "rtn/int8/g32"}
    assert summary["pareto"][0]["config"] == "rtn/int4/g32"  # the cheapest point is on it
    (out / "kbit_sweep.png").unlink()
    capsys.readouterr()
    assert ks.main(["--plot-only", "--out", str(out)]) == 0
    assert (out / "kbit_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files left
