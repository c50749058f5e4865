"""DPO on the training loop: reference log-probs computed once by Ray Data equal the loop's own scoring and are not
recomputed, and `athanor dpo` with LoRA on the smoke model starts at ln 2 (policy = reference), logs TRL's metrics
every step and moves the policy away from its reference. (That the held-out reward accuracy rises is not shown:
the smoke model, trained on 64-token windows of news, does not learn to tell an answer from another question's in
this many steps.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cli_runner import ROOT
from test_hf_export import sp_model, trained_model  # noqa: F401 - sp_model is a fixture
from training_runs import finish, start_train

from athanor.cluster.checkpoint import save_model
from athanor.config import load_config

DPO_CONFIG = "configs/dpo-smoke.yaml"
DPO = load_config(ROOT / DPO_CONFIG)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_reference_logps_equal_in_process_scoring_and_are_committed_once(sp_model, data_dir, pairs, tmp_path,  # noqa: F811
                                                                         ray_local):
    from athanor.cluster.reference import compute_reference_logps, reference_dir
    from athanor.model.scoring import score_windows
    from athanor.pipelines.preferences import pack_pairs
    from athanor.pipelines.shards import TokenShards

    model, cfg = trained_model(sp_model, data_dir, max_seq_len=1024)
    base = save_model(tmp_path / "base" / "checkpoint_00000060", model, cfg, sp_model, step=60, seq_len=64)
    config = load_config(None, [f"dpo.train_files=[{pairs[0]}]", f"dpo.val_files=[{pairs[1]}]", "dpo.seq_len=1023",
                                f"run.workdir={tmp_path / 'run'}"])
    root = tmp_path / "run" / "dpo"
    manifest = pack_pairs(config, root, sp_model)
    found = compute_reference_logps(root, str(base), batch_size=4)
    logps, counts = found["val"]
    assert logps.shape == (manifest["pairs"]["val"], 2) and (logps < 0).all()
    rows = TokenShards(root, "val")
    windows, masks = [], []
    for r in range(len(rows)):
        mask = rows.loss_mask(r)
        end = int(np.flatnonzero(mask).max()) + 1
        windows.append(rows[r][:end].astype(np.int64).tolist())
        masks.append(mask[1:end].astype(int).tolist())
    scores = score_windows(model, windows, [len(w) - 1 for w in windows], batch_size=3, target_masks=masks)
    np.testing.assert_allclose(logps.reshape(-1), [s.logprob for s in scores], rtol=1e-5)
    assert counts.reshape(-1).tolist() == [s.n_scored for s in scores]
    parts = sorted(reference_dir(root, "train").glob("part-*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    again = compute_reference_logps(root, str(base), batch_size=4)  # committed: nothing recomputed
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    np.testing.assert_array_equal(again["train"][0], found["train"][0])


@pytest.mark.slow
def test_dpo_with_lora_starts_at_ln2_and_moves_the_policy(smoke_run, pairs, tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "run"
    out = finish(start_train(work, f"finetune.base={smoke_run[0]}", config=DPO_CONFIG, command="dpo"))
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name(DPO.mlflow.experiment).experiment_id])

    def history(name):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]

    loss = history("loss")
    assert len(loss) == DPO.train.max_steps
    assert loss[0] == pytest.approx(math.log(2), abs=1e-3), out[-2000:]  # the stored reference is the policy
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert len(history(name)) == DPO.train.max_steps, name
    chosen = history("rewards/chosen")
    assert abs(chosen[0]) < 1e-3 and max(abs(c) for c in chosen[-5:]) > 1e-2  # the adapters move the policy
    assert history("val_reward_accuracy")[0] == 0.5  # step 0: every held-out pair a tie
    assert run.data.metrics["curate.dpo_data.kept"] > 100
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in artifacts
    assert torch.isfinite(torch.tensor(history("val_dpo_loss"))).all()
