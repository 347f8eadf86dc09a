"""The benchmarks under bench/ run end to end at a tiny size and write complete result files.
Their numbers are measured by the real commands in bench/RESULTS.md; here only that they run and
report what they claim to report (no speed is asserted)."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env


def run_bench(script: str, output, *extra: str) -> dict:
    command = [sys.executable, f"bench/{script}", "--output", str(output), *extra]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(output.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_throughput_against_hf_trainer(tmp_path, tiny_encoder):
    result = run_bench("throughput_vs_hf.py", tmp_path / "out.json", "--smoke")
    for side in ("ours", "hf_trainer"):
        assert result[side]["steps"] == result["timed_steps"] == 4
        assert positive(result[side]["tokens"]) and positive(result[side]["seconds"])
    # the same sentences, one pass: the real tokens of the timed steps are of the same size
    assert 0.5 < result["ours"]["tokens"] / result["hf_trainer"]["tokens"] < 2
    assert result["speedup"] == pytest.approx(result["ours"]["tokens_per_s"] / result["hf_trainer"]["tokens_per_s"])


def test_stage2_costs(tmp_path, tiny_encoder):
    result = run_bench("stage2_costs.py", tmp_path / "out.json", "--smoke")
    for part in ("stage1", "stage2_same_sentences", "stage2_trggold"):
        assert result[part]["steps"] == 4 and positive(result[part]["step_seconds"])
    assert positive(result["step_ratio"]) and positive(result["loader_over_consumption"])
    assert len(result["loader"]["languages"]) == 7  # en + the six sample targets


def test_zero_memory(tmp_path, tiny_encoder):
    result = run_bench("zero_memory.py", tmp_path / "out.json", "--smoke")
    assert set(result["stages"]) == {"zero0", "zero2", "zero3"}
    for stage in result["stages"].values():
        assert [rank["rank"] for rank in stage["ranks"]] == [0, 1]
        assert all(positive(rank["live_tensor_bytes"]) for rank in stage["ranks"])
    zero0, zero3 = (result["stages"][name]["ranks"][0] for name in ("zero0", "zero3"))
    # ZeRO-3 holds half of the parameters on each of 2 ranks (measured, not configured)
    assert zero3["parameter_bytes"] < 0.6 * zero0["parameter_bytes"]


def test_padding_efficiency(tmp_path, tiny_encoder):
    result = run_bench("padding.py", tmp_path / "out.json", "--smoke")
    stage1, stage2 = result["stage1_english_epoch"], result["stage2_stream"]
    assert stage1["bucketed"]["real_tokens"] == stage1["random"]["real_tokens"] == stage1["packed"]["real_tokens"]
    # random micro batches packed waste far less than random ones padded (bucketing is for padded rows)
    assert stage1["packed"]["efficiency"] > 0.9 > 0.5 > stage1["random"]["efficiency"]
    assert stage1["bucketed"]["efficiency"] > stage1["random"]["efficiency"]
    assert stage2["packed"]["efficiency"] > 0.9 > 0.5 > stage2["unpooled"]["efficiency"]
    assert all(0 < part["efficiency"] <= 1 for part in (*stage1.values(), stage2["pooled"], stage2["packed"]))


def test_profile_stage1(tmp_path, tiny_encoder):
    result = run_bench("profile_stage1.py", tmp_path / "out.json", "--smoke")
    frozen, trainable = result["runs"][1], result["runs"][0]
    assert frozen["trainable_parameters"] < trainable["trainable_parameters"]
    for run in result["runs"]:
        assert sum(run["phase_share"].values()) == pytest.approx(1.0)
        assert run["top_ops_one_step"] and positive(run["seconds_per_step"])


def test_stream_memory(tmp_path, tiny_encoder):
    result = run_bench("stream_memory.py", tmp_path / "out.json", "--sentences", "3000", "--files", "2")
    assert result["sentences"] == 3000 and len(result["trace"]) == 10
    assert positive(result["sentences_per_s"]) and positive(result["end_over_first_tenth"])


def test_packing_check_passes_and_fails_on_an_injected_mismatch(tmp_path, tiny_encoder):
    """bench/packing_check.py asserts its tolerances (exit 0 when packed == unpacked within fp32
    tolerance); with a real packing bug planted in the packed path (attention crossing windows) it
    exits 1, and bench/gpu_check.sh stops there: no throughput step runs after a failed check."""
    data = REPO / "data" / "panx-sample" / "en" / "train.tsv"
    result = run_bench("packing_check.py", tmp_path / "check.json", "--data", str(data), "--sentences", "48")
    assert result["passed"] and result["failures"] == []
    assert result["train_mode_fp32"]["parameters_compared"] > 40  # every parameter of the tiny model
    assert result["max_abs_difference"]["float32_sdpa"]["seq_logits"] <= 1e-4

    encoders = tmp_path / "enc"
    encoders.mkdir()
    (encoders / "mini").symlink_to(tiny_encoder)  # the DRY run's encoder, already built
    work = tmp_path / "work"
    env = child_env(DRY="1", ONLY="check,b128", OUT=str(tmp_path / "out"), WORK=str(work), ENC_DIR=str(encoders),
                    DUALNER_PACKING_CHECK_INJECT="attention")
    run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-3000:]
    assert "STOP: check failed" in log and "=== b128" not in log
    steps = [line.split("\t")[0] for line in (work / "status.tsv").read_text().splitlines()]
    assert steps == ["encoder", "check"]
    check = json.loads((work / "steps" / "check.json").read_text())
    assert check["inject"] == "attention" and not check["passed"]
    assert any("gradient of" in failure for failure in check["failures"])


def test_gradient_path_counts_fewer_dispatches(tmp_path, tiny_encoder):
    """The backend's direct gradient path at ZeRO-0, world size 1, against DeepSpeed's, counted by the
    profile block in the launcher: no all-reduce, fewer copies and dispatches, the same losses."""
    result = run_bench("gradient_path.py", tmp_path / "out.json", "--smoke")
    deepspeed, direct = result["summary"]["deepspeed"], result["summary"]["direct"]
    assert direct["aten_dispatches_per_step"] < deepspeed["aten_dispatches_per_step"] - 100
    watched = {run["path"]: run["watched_calls_per_step"] for run in result["runs"]}
    assert watched["deepspeed"]["c10d::allreduce_"] > 0 and watched["direct"]["c10d::allreduce_"] == 0
    assert watched["direct"]["aten::_foreach_norm"] == 1 and watched["deepspeed"]["aten::_foreach_norm"] == 0
    assert result["max_loss_difference"] < 1e-5


def test_cpu_precision(tmp_path):
    result = run_bench("cpu_precision.py", tmp_path / "out.json", "--repeats", "1", "--tokens", "64")
    assert set(result["median_seconds"]) == {"fp32", "bf16", "autocast-bf16"}
    assert all(positive(value) for value in result["median_seconds"].values())
    assert result["ratio_to_fp32"]["fp32"] == 1.0 and isinstance(result["cpu_has_bf16"], bool) and result["cpu"]


def test_compressed_resume(tmp_path):
    result = run_bench("compressed_resume.py", tmp_path / "out.json", "--megabytes", "3", "--repeats", "1")
    files = result["files"]
    assert files["bgzip (64 KiB members)"]["splittable"] and files["bgzip (64 KiB members)"]["blocks"] > 40
    assert not files["gzip, one member"]["splittable"]
    for entry in files.values():
        for what in ("first_record", "first_pool"):
            assert positive(entry[what]["at_0_s"]) and positive(entry[what]["at_90_s"])
