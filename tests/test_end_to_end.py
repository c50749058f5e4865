"""`athanor run` on the smoke config, as a user runs it: a fresh process with its own embedded Ray."""

import hashlib
import json

import pytest

from cli_runner import run_cli

from athanor.cluster import tracking


def mlflow_chart_order(keys) -> list[str]:
    """The charts of MLflow 3's run page (Model metrics) in page order: one section per key path before its last
    "/", sections in code-point order, keys without one last, a section's charts sorted by key (read from its UI
    bundle; scripts/mlflow_screenshot.py checks the drawn page in Chromium)."""
    def section(k: str) -> tuple[int, str]:
        return (0, k.rsplit("/", 1)[0]) if "/" in k else (1, "")

    return sorted(keys, key=lambda k: (section(k), k))


@pytest.mark.slow
def test_run_prints_mlflow_run_and_ui_command(smoke_run):
    workdir, out = smoke_run
    run_id = (workdir / "mlflow_run_id").read_text().strip()
    assert f"MLflow run id: {run_id}" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir}/mlflow.db" in out


@pytest.mark.slow
def test_every_curation_stage_conserves_documents(smoke_run):
    workdir, _ = smoke_run
    summary = json.loads((workdir / "stats" / "curation.json").read_text())
    assert len(summary["stages"]) >= 6
    for stage in summary["stages"]:
        assert stage["in"] == stage["kept"] + sum(stage["dropped"].values()), stage
    for prev, nxt in zip(summary["stages"], summary["stages"][1:]):
        assert nxt["in"] == prev["kept"], (prev["stage"], nxt["stage"])
    assert summary["stages"][-1]["kept"] > 20


@pytest.mark.slow
def test_shards_match_manifest_counts_and_checksums(smoke_run):
    from athanor.pipelines.shards import TokenShards

    workdir, _ = smoke_run
    manifest = json.loads((workdir / "manifest.json").read_text())
    for split in ("train", "val"):
        info = manifest["splits"][split]
        shards = TokenShards(workdir, split, verify=True)
        assert len(shards) == info["sequences"] == sum(s["sequences"] for s in info["shards"])
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for s in info["shards"]:
            assert hashlib.sha256((workdir / s["path"]).read_bytes()).hexdigest() == s["sha256"]
        if len(shards):
            seq = shards[len(shards) - 1]
            assert seq.shape == (manifest["seq_len"] + 1,)
            assert int(seq.max()) < manifest["vocab_size"]
    assert manifest["splits"]["train"]["sequences"] > 0


@pytest.mark.slow
def test_mlflow_run_has_per_step_metrics_and_falling_loss(smoke_run):
    from mlflow.tracking import MlflowClient

    workdir, _ = smoke_run
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("athanor-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    max_steps = int(run.data.params["train.max_steps"])
    for name in ("train/loss", "train/lr", "trainer/grad_norm", "trainer/tokens_per_s"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, max_steps + 1)), name
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < first - 1.0, (first, last)
    model_metrics = [k for k in run.data.metrics if not k.startswith("system/")]  # system/: a tab of its own
    assert any(k.startswith("system/") for k in run.data.metrics)  # rank 0's monitor, started off the step's path
    assert not [k for k in model_metrics if not k.startswith(("train/", "trainer/", "val/"))]
    assert mlflow_chart_order(model_metrics)[:3] == ["train/loss", "train/lr", "train/val_loss"]
    counts = tracking.curation_table(run.info.run_id, client).set_index(["stage", "status", "reason"])["documents"]
    funnel = json.loads((workdir / "stats" / "curation.json").read_text())
    assert counts["read", "in", ""] == funnel["in"] and counts["quality", "kept", ""] == funnel["kept"] > 0
    note = run.data.tags["mlflow.note.content"]  # the run's description says what it did
    assert f"{funnel['in']:,} documents in, {funnel['kept']:,} kept" in note, note
    assert f"Training** (pretrain): {max_steps} steps" in note, note
    # periodic evaluation: validation loss and bits per byte, and the extra named set of configs/smoke.yaml
    evals = {name: client.get_metric_history(run.info.run_id, name)
             for name in ("train/val_loss", "val/bits_per_byte", "val/books/loss", "val/books/bits_per_byte")}
    for name, history in evals.items():
        assert sorted(m.step for m in history) == [100, 200, 300], name
    val_bpb = sorted(evals["val/bits_per_byte"], key=lambda m: m.step)
    assert 0.5 < val_bpb[-1].value < val_bpb[0].value  # learning shows in bits per byte too
    books = evals["val/books/bits_per_byte"][-1].value  # the scored targets' bytes, not the whole book's
    assert 1.0 < books < 8.0, books
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "tokenizer", "data", "model", "curation"} <= artifacts and "checkpoint" not in artifacts
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}  # the weights, not the DCP checkpoint
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.model"} <= model
    manifest = json.loads((workdir / "manifest.json").read_text())
    inputs = run.inputs.dataset_inputs
    assert [d.dataset.digest for d in inputs] == [manifest["fingerprint"][:36]]  # lineage: the shards trained on
    assert run.data.tags["checkpoint.final"].startswith(str(workdir / "checkpoints"))


@pytest.mark.slow
def test_rerun_of_a_finished_stage_skips_and_keeps_one_mlflow_run(smoke_run):
    workdir, _ = smoke_run
    before = (workdir / "manifest.json").read_bytes()
    proc = run_cli("tokenize", "configs/smoke.yaml", "--set", f"run.workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage seconds: tokenize=0.0" in proc.stdout
    assert (workdir / "manifest.json").read_bytes() == before
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("athanor-smoke")
    assert len(client.search_runs([exp.experiment_id])) == 1


@pytest.mark.slow
def test_generate_and_export_from_the_trained_checkpoint(smoke_run, tmp_path):
    import torch

    from athanor.cluster.checkpoint import find_checkpoint, load_model

    workdir, _ = smoke_run
    proc = run_cli("generate", "--checkpoint", str(workdir), "--prompt", "The government said", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The government said") and len(proc.stdout.strip()) > len("The government said")

    out = tmp_path / "hf"
    proc = run_cli("export", "--checkpoint", str(workdir), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ours, _, directory = load_model(workdir)
    assert directory == find_checkpoint(workdir)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, ours(tokens), atol=1e-4)
