"""Stage 2 through the real launchers on 2 gloo ranks: stop and resume gives the same samples and
losses as the uninterrupted run; ZeRO-3 with the on-the-fly teacher completes; the ZeRO-3 teacher
refresh copies the student exactly."""

import json
import re
from collections import defaultdict

import pytest

from tests.conftest import REPO, launch

STAGE2 = ["train.max_steps=8", "train.eval_every=4", "train.save_every=2", "train.log_every=1",
          "train.keep_last=10", "data.max_eval_sentences=40", "stage2.sample_log=true",
          "stage2.bucket_pool=32", "eval.head=seq", "train.lr=3.0e-3"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tiny_encoder):
    """A tiny stage-1 model that has learned a little (dev F1 above zero with the BIO head)."""
    run = tmp_path_factory.mktemp("stage1") / "run"
    launch("launchers/stage1.py", ["--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={run}",
                                   "train.lr=3.0e-3", "train.max_steps=40", "train.eval_every=20",
                                   "data.max_train_sentences=3000", "train.global_batch_size=32",
                                   "train.micro_batch_size=32", "eval.head=seq",
                                   # ZeRO-0: stage 2 then reads a plain (non-partitioned) checkpoint
                                   f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"])
    return run


def stage2(run_dir, init_from, ds_config, *extra, expect=0):
    return launch("launchers/stage2.py", ["--config", str(REPO / "configs" / "tiny_stage2.yaml"),
                                          f"run.output_dir={run_dir}", f"stage2.init_from={init_from}",
                                          f"engine.config={REPO / ds_config}", *STAGE2, *extra],
                  nproc=2, expect=expect)


def read_log(run_dir):
    return {e["step"]: e for e in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


def samples_by_step(run_dir, rank):
    steps = defaultdict(list)
    for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "job_starts_after_step" in entry:
            continue
        # the labeled source is streamed from the run folder: compare runs without their folder
        steps[entry["step"]] += [sample.replace(str(run_dir), "RUN") for sample in entry["samples"]]
    return dict(steps)


def src_ids_by_sample(path, run_dir=None):
    """{sample id (file@byte): src_id} of a JSONL file (the run folder written as RUN, as in logs)."""
    ids, position = {}, 0
    for line in path.read_bytes().splitlines(keepends=True):
        name = str(path).replace(run_dir, "RUN") if run_dir else str(path)
        if line.strip():
            ids[f"{name}@{position}"] = str(json.loads(line).get("src_id"))
        position += len(line)
    return ids


def test_stop_and_resume_repeats_the_uninterrupted_run(stage1_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stage2(straight, stage1_run, "ds_configs/zero2_fp32.json")
    first = stage2(resumed, stage1_run, "ds_configs/zero2_fp32.json", "run.max_steps_per_job=3", expect=75)
    assert "stopping after 3 steps" in first.stdout + first.stderr
    stage2(resumed, stage1_run, "ds_configs/zero2_fp32.json")

    for rank in (0, 1):
        assert samples_by_step(resumed, rank) == samples_by_step(straight, rank)
    consumed = [samples_by_step(straight, rank) for rank in (0, 1)]
    rank0 = {s for step in consumed[0].values() for s in step}
    rank1 = {s for step in consumed[1].values() for s in step}
    assert rank0 and rank1 and not rank0 & rank1  # ranks read disjoint sentences
    assert any("/de/" in s for s in rank0 | rank1) and any("source_labeled" in s for s in rank0 | rank1)

    expected, actual = read_log(straight), read_log(resumed)
    assert sorted(expected) == sorted(actual) == list(range(1, 9))
    for step in range(1, 9):
        for name in ("loss/total", "loss/gold_seq", "loss/pseudo_start", "loss/mse"):
            assert actual[step][name] == pytest.approx(expected[step][name], abs=1e-6), (step, name)
    assert 0.0 <= expected[8]["teacher/agreement"] <= 1.0
    assert expected[8]["teacher/refreshes"] == actual[8]["teacher/refreshes"]
    best = json.loads((straight / "results.json").read_text())
    assert best["best_score"] == pytest.approx(json.loads((resumed / "results.json").read_text())["best_score"])


def test_zero3_with_teacher_completes(stage1_run, tmp_path):
    run = tmp_path / "zero3"
    result = stage2(run, stage1_run, "ds_configs/zero3_fp32.json", "train.max_steps=6",
                    "train.eval_every=3")
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and "dev" in results
    history = read_log(run)
    assert all(0.0 <= history[s]["teacher/agreement"] <= 1.0 for s in history)
    assert "ZeRO stage 3" in result.stdout + result.stderr


def test_zero3_teacher_refresh_copies_the_student(tiny_encoder):
    output = launch("tests/teacher_refresh_check.py", ["deepspeed"], nproc=2)
    assert output.stdout.count("teacher equals student after refresh") == 2


@pytest.mark.parametrize("variant", [
    ["stage2.teaching=self_kl"],
    ["stage2.mse_weight=0", "stage2.target_weight=0"],
    ["stage2.mse=parallel", "stage2.confidence_threshold=0.6", "stage2.target_weight=0.5"],
    ["data.train_fraction=0.5", "data.loader_workers=2"],
], ids=["self-kl", "no-mse-no-trg", "trgtrans-parallel", "source-fraction"])
def test_variants_run_from_config_alone(stage1_run, tmp_path, variant):
    translations = tmp_path / "fr.jsonl"
    # stand-in "translations": the first English training sentences reversed, tied by src_id
    from dualner.data.conll import read_conll
    english = read_conll(REPO / "data" / "panx-sample" / "en" / "train.tsv", "en", max_sentences=200)
    translations.write_text("".join(json.dumps({"tokens": s.words[::-1], "lang": "fr", "src_id": str(i)})
                                    + "\n" for i, s in enumerate(english)))
    run, init_from = tmp_path / "run", stage1_run
    if "data.train_fraction=0.5" in variant:
        # stage 2 splits the labeled source as its stage-1 run did, so that run saw the same half
        init_from = tmp_path / "stage1_half"
        launch("launchers/stage1.py", ["--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={init_from}",
                                       "data.train_fraction=0.5", "train.max_steps=2", "train.eval_every=2",
                                       "data.max_eval_sentences=8", "eval.head=seq",
                                       f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"])
    launch("launchers/stage2.py", ["--config", str(REPO / "configs" / "tiny_stage2.yaml"),
                                   f"run.output_dir={run}", f"stage2.init_from={init_from}",
                                   "train.max_steps=3", "train.eval_every=3", "train.log_every=1",
                                   "data.max_eval_sentences=20", f"stage2.translations.fr={translations}",
                                   "stage2.sample_log=true",
                                   *variant])
    log = read_log(run)
    assert sorted(log) == [1, 2, 3] and all(map(lambda e: e["loss/total"] > 0, log.values()))
    if "stage2.mse_weight=0" in variant:
        assert all(e.get("loss/mse", 0) == 0 for e in log.values())  # a term of weight 0 is not computed
    if "stage2.mse=parallel" in variant:
        # a translation and its English source travel as one unit: they meet in a micro batch
        src_id = src_ids_by_sample(translations) | src_ids_by_sample(run / "stage2_data" / "source_labeled.jsonl",
                                                                      str(run))
        together = [src_id[sample] for step in samples_by_step(run, 0).values()
                    for sample in step if "fr.jsonl" in sample]
        sources = {src_id[sample] for step in samples_by_step(run, 0).values()
                   for sample in step if "source_labeled" in sample}
        assert together and set(together) <= sources
    if "data.train_fraction=0.5" in variant:
        remainder = (run / "stage2_data" / "source_remainder.jsonl").read_text().splitlines()
        labeled = (run / "stage2_data" / "source_labeled.jsonl").read_text().splitlines()
        assert abs(len(remainder) - len(labeled)) <= 1 and '"tags"' not in remainder[0]


def test_a_bad_record_deep_in_a_corpus_stops_with_a_checkpoint_then_is_skipped(stage1_run, tmp_path):
    """data.max_bad_records=0: the run checkpoints and stops naming the key, file, line and byte of the
    first bad record; rerun with the limit still below the checkpoint's count, it stops before
    training, naming them; with a limit of 2 it resumes after the skipped records and counts them."""
    target = tmp_path / "de.jsonl"
    lines = [json.dumps({"tokens": ["Satz", str(i), "in", "Berlin"]}) + "\n" for i in range(30)]
    lines[11] = '{"tokens": ["kaputt", \n'
    lines[12] = '{"tokens": ["auch kaputt"\n'
    target.write_text("".join(lines))
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny_stage2.yaml"), f"run.output_dir={run}",
            f"stage2.init_from={stage1_run}", f"stage2.target={{de: {target}}}", "stage2.mix=equal",
            "stage2.bucket_pool=8", "train.max_steps=8", "train.eval_every=100", "train.log_every=1",
            "data.max_eval_sentences=8", "eval.head=seq"]
    failed = launch("launchers/stage2.py", args, expect=2)
    message = failed.stderr
    byte = sum(len(line) for line in lines[:11])
    assert f"the first on this rank: stage2.target.de: {target}:12 (byte {byte})" in message
    assert "data.max_bad_records=0" in message
    stopped_at = re.search(r"checkpoint (\S+step-(\d+)):", message)
    assert stopped_at and (run / "checkpoints" / f"step-{stopped_at.group(2)}" / "COMPLETE").is_file()
    assert int(stopped_at.group(2)) < 8
    again = launch("launchers/stage2.py", args, expect=2).stderr  # the limit still 0: stops before a step
    assert "the checkpoint counts" in again and f"{target}:12 (byte {byte})" in again
    assert max(read_log(run)) == int(stopped_at.group(2))  # nothing trained
    launch("launchers/stage2.py", [*args, "data.max_bad_records=2"])
    log = read_log(run)
    assert max(log) == 8 and log[8]["data/bad_records"] == 2.0


def test_the_sample_log_shows_the_configured_mix_with_a_single_piece_compressed_target(stage1_run, tmp_path):
    """2 ranks x 2 loader workers, the target one .gz file (one piece, shared by stride): the trained
    records are the configured 1:3 of labeled source and target (the per-reader mix made it 0.24 / 0.76
    the other way round)."""
    import gzip

    from dualner.data.conll import read_conll
    german = read_conll(REPO / "data" / "panx-sample" / "de" / "train.tsv", "de", max_sentences=400)
    target = tmp_path / "de.txt.gz"
    with gzip.open(target, "wt") as handle:
        handle.writelines(" ".join(sentence.words) + "\n" for sentence in german)
    run = tmp_path / "run"
    launch("launchers/stage2.py", ["--config", str(REPO / "configs" / "tiny_stage2.yaml"), f"run.output_dir={run}",
                                   f"stage2.init_from={stage1_run}", f"stage2.target={{de: {target}}}",
                                   "stage2.mix=equal", "stage2.source_weight=1", "stage2.target_weight=3",
                                   "stage2.bucket_pool=16", "data.loader_workers=2", "stage2.sample_log=true",
                                   "train.max_steps=10", "train.eval_every=100", "data.max_eval_sentences=8",
                                   f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"], nproc=2)
    records = {"source": 0, "target": 0}
    for rank in (0, 1):
        for step in samples_by_step(run, rank).values():
            for sample in step:
                if "+" not in sample.rsplit("@", 1)[1]:  # a record's first window
                    records["source" if "source_labeled" in sample else "target"] += 1
    share = records["target"] / sum(records.values())
    assert sum(records.values()) >= 100 and abs(share - 0.75) < 0.06, records
    read = [entry["data/read_seconds/target/de"] for entry in read_log(run).values()]
    assert all(seconds >= 0 for seconds in read) and sum(read) > 0  # what each stream cost the readers
