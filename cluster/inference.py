"""Batch inference on Ray Data: an actor pool with one model per actor, fed batches of token windows or prompts.

This is the one inference path of the project. `athanor eval` scores windows with `WindowScorer`, `athanor generate`
continues prompts with `TextGenerator`, and the lm-eval adapter, DPO's reference log-probs and the perplexity of a
quantized model run the same classes (in a Ray Data pool, or in-process through `InferenceModel`). An actor loads
its model once in `__init__`, on the GPU Ray gives it when the pool asks for one, else on CPU with `cpus` threads.

A model is an athanor checkpoint (or a run folder: its newest checkpoint) or a Hugging Face Llama folder such as
`athanor export` writes; either way it comes with its SentencePiece tokenizer.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from athanor.config import ModelConfig
from athanor.model.scoring import score_windows
from athanor.model.transformer import Transformer
from athanor.pipelines.tokenizer import Tokenizer


@dataclass
class InferenceModel:
    """A model ready to score and generate, with the tokenizer its ids belong to."""

    model: Transformer
    config: ModelConfig
    tokenizer: Tokenizer
    source: Path  # the checkpoint or HF folder it came from
    context: int  # tokens per window: the sequence length it was trained on, when known
    step: int | None = None  # the training step of an athanor checkpoint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class ModelSource:
    """Where a model's weights and tokenizer are, and what it was trained for, read without loading the weights."""

    directory: Path  # the checkpoint folder (fetched into the node-local cache from s3:// or gs://) or HF folder
    hf: bool
    context: int  # the sequence length it was trained on (the training shards' seq_len), else its max_seq_len
    step: int | None  # the training step of an athanor checkpoint

    @property
    def tokenizer_path(self) -> Path:
        from athanor.cluster.checkpoint import TOKENIZER_FILE

        path = self.directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} has no {TOKENIZER_FILE} (a SentencePiece model) beside the "
                                    "weights; athanor's scoring and generation need it")
        return path

    def model_config(self) -> ModelConfig:
        """The architecture, read from config.json or trainer_state.json without loading weights."""
        from athanor.cluster.checkpoint import read_trainer_state
        from athanor.model.hf_import import HF_CONFIG, model_config_from_hf

        if self.hf:
            return model_config_from_hf(json.loads((self.directory / HF_CONFIG).read_text()))
        return ModelConfig.model_validate(read_trainer_state(self.directory)["model_config"])


def load_weights(source: ModelSource) -> tuple[Transformer, ModelConfig]:
    """The plain Transformer of a checkpoint or HF folder, on CPU (a LoRA fine-tune's adapters merged)."""
    from athanor.cluster.checkpoint import load_model
    from athanor.model.hf_import import load_hf_folder

    return load_hf_folder(source.directory) if source.hf else load_model(source.directory)[:2]


def base_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights fine-tuning starts from: a checkpoint, run folder or HF folder (not a quantized one)."""
    from athanor.model.hf_import import HF_CONFIG

    source = describe(path)
    if source.hf and "quantization_config" in json.loads((source.directory / HF_CONFIG).read_text()):
        raise ValueError(f"{path} is a quantized model: fine-tune the full-precision checkpoint it was made from")
    return load_weights(source)[0].state_dict()


def describe(path: str | Path) -> ModelSource:
    """An HF Llama folder, an athanor checkpoint, or a run folder (its newest checkpoint)."""
    from athanor.cluster.checkpoint import find_checkpoint, read_trainer_state
    from athanor.model.hf_import import HF_CONFIG, is_hf_folder

    if not str(path).startswith(("s3://", "gs://")) and is_hf_folder(path):
        from athanor.model.quant_export import quantization_metadata

        hf = json.loads((Path(path) / HF_CONFIG).read_text())
        quantized = quantization_metadata(path) or {}  # `athanor quantize` output: its source's context and step
        context = quantized.get("seq_len") or int(hf.get("max_position_embeddings", 2048))
        return ModelSource(Path(path), True, context, quantized.get("step"))
    directory = find_checkpoint(path)
    state = read_trainer_state(directory)
    max_len = state["model_config"].get("max_seq_len", 2048)
    return ModelSource(directory, False, min(state.get("seq_len") or max_len, max_len), state["step"])


def load_for_inference(path: str | Path, device: str | None = None, bf16_weights: bool = True) -> InferenceModel:
    """An athanor checkpoint / run folder, or an HF Llama folder, on `device` (default: CUDA when present, with
    bf16 weights unless `bf16_weights` is False: fp32 weights for a caller that runs under autocast as training
    does)."""
    source = describe(path)
    model, cfg = load_weights(source)
    tokenizer = Tokenizer(source.tokenizer_path, num_threads=1)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if device.startswith("cuda") and bf16_weights:
        model = model.to(torch.bfloat16)
    return InferenceModel(model.eval(), cfg, tokenizer, source.directory, source.context, source.step)


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """train.mixed_precision for a device: bf16 or fp32 as set; auto is bf16 on a GPU, fp32 on CPU."""
    bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def training_precision(device: torch.device, mixed_precision: str = "auto", fsdp: bool = False):
    """The training loop's forward precision. Train steps and evaluation both run their forward under it (so `loss`
    and `val_loss` are one computation) and the backward outside it (PyTorch's AMP recipe). In bf16: autocast over
    fp32 weights, or nothing for an FSDP2 model (`fsdp`), whose MixedPrecisionPolicy already all-gathers bf16
    parameters (cluster/parallelize.py); in fp32: nothing."""
    if compute_dtype(mixed_precision, device) == torch.float32 or fsdp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class WindowScorer:
    """Ray Data actor: adds `logprob` (sum over the scored targets, nats), `greedy` and `n_counted` (the targets
    summed) to each window row.

    Rows carry `tokens` (the window) and `n_scored`, and optionally `target_mask` (0/1 per target: a fine-tuning or
    preference example's answer). A row with n_scored 0 (an input that failed upstream) passes through with
    logprob 0, so its error reaches the output instead of vanishing.
    """

    def __init__(self, checkpoint: str, batch_size: int = 16, cpus: int = 1, as_training: bool = False):
        torch.set_num_threads(max(1, cpus))
        # as_training: the training loop's precision (fp32 weights, bf16 autocast on a GPU), for numbers that must
        # equal the loop's own, as DPO's reference log-probs must at the first step; else bf16 weights on a GPU.
        self.m = load_for_inference(checkpoint, bf16_weights=not as_training)
        self.precision = training_precision(self.m.device) if as_training else nullcontext()
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_scored = np.asarray(batch["n_scored"], dtype=np.int64)
        live = np.flatnonzero(n_scored > 0)
        logprob = np.zeros(len(n_scored))
        greedy = np.zeros(len(n_scored), dtype=bool)
        counted = n_scored.copy()
        if len(live):
            masks = ([np.asarray(batch["target_mask"][i]).tolist() for i in live] if "target_mask" in batch
                     else None)
            with self.precision:
                scores = score_windows(self.m.model, [np.asarray(batch["tokens"][i]).tolist() for i in live],
                                       n_scored[live].tolist(), self.m.tokenizer.pad_id, self.batch_size, masks)
            logprob[live] = [s.logprob for s in scores]
            greedy[live] = [s.greedy for s in scores]
            counted[live] = [s.n_scored for s in scores]
        out = {k: v for k, v in batch.items() if k not in ("tokens", "target_mask")}
        return {**out, "logprob": logprob, "greedy": greedy, "n_counted": counted}


GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64, "temperature": 0.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0,
    "num_beams": 1, "length_penalty": 1.0, "early_stopping": False, "stop": None, "seed": 0,
}


class TextGenerator:
    """Ray Data actor: continues the `prompt` of each row; writes `completion`, `tokens_generated`, `finish_reason`.

    Settings come from the command line (`defaults`) and may be overridden per row by a column of the same name
    (a JSONL prompt file may give each prompt its own max_new_tokens, seed or stop strings). Rows of one batch that
    share settings are generated together: different lengths, one KV-cache batch, EOS ending each row on its own.
    """

    def __init__(self, checkpoint: str, defaults: dict[str, Any] | None = None, cpus: int | None = 1):
        if cpus:  # None: keep torch's own thread count (the one-prompt CLI runs in the user's process)
            torch.set_num_threads(cpus)
        self.m = load_for_inference(checkpoint)
        self.defaults = {**GENERATION_DEFAULTS, **(defaults or {})}

    def settings(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        """This row's settings: its own column values where set, the defaults elsewhere."""
        s = dict(self.defaults)
        for k in s:
            v = batch[k][i] if k in batch else None
            if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
                continue
            s[k] = json.loads(v) if k == "stop" else v.item() if hasattr(v, "item") else v
        if isinstance(s["stop"], str):
            s["stop"] = [s["stop"]]
        return s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from athanor.model.generate import generate_batch, truncate_at_stop

        n = len(batch["prompt"])
        # An error column that is None in every row of the dataset reaches the batch as NaN floats, not None.
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]] if "error" in batch else [None] * n
        completion: list[str | None] = [None] * n
        generated = np.zeros(n, dtype=np.int64)
        finish: list[str | None] = [None] * n
        tok = self.m.tokenizer
        groups: dict[str, list[tuple[int, dict]]] = {}
        for i in range(n):
            if errors[i]:
                continue
            s = self.settings(batch, i)
            key = json.dumps({k: v for k, v in s.items() if k != "seed"}, sort_keys=True, default=str)
            groups.setdefault(key, []).append((i, s))
        for members in groups.values():
            idx = [i for i, _ in members]
            s = members[0][1]
            prompts = [[tok.bos_id] + tok.encode([str(batch["prompt"][i])])[0] for i in idx]
            limit = self.m.config.max_seq_len
            ok = [j for j, p in enumerate(prompts) if len(p) + int(s["max_new_tokens"]) <= limit]
            for j in set(range(len(idx))) - set(ok):
                errors[idx[j]] = (f"prompt_too_long: {len(prompts[j])} prompt tokens + max_new_tokens "
                                  f"{int(s['max_new_tokens'])} exceed the model's context of {limit}")
            if not ok:
                continue
            try:
                outs = generate_batch(
                    self.m.model, [prompts[j] for j in ok], int(s["max_new_tokens"]),
                    temperature=float(s["temperature"]), top_k=None if s["top_k"] is None else int(s["top_k"]),
                    top_p=None if s["top_p"] is None else float(s["top_p"]),
                    repetition_penalty=float(s["repetition_penalty"]), num_beams=int(s["num_beams"]),
                    length_penalty=float(s["length_penalty"]), early_stopping=bool(s["early_stopping"]),
                    eos_id=tok.eos_id, pad_id=tok.pad_id, seeds=[int(members[j][1]["seed"]) for j in ok],
                    stop=s["stop"], decode=tok.decode,
                )
            except ValueError as err:  # settings generate_batch refuses (e.g. beams with sampling): these rows only
                for j in ok:
                    errors[idx[j]] = f"bad_settings: {err}"
                continue
            for j, new in zip(ok, outs):
                i = idx[j]
                text = tok.decode_continuation(prompts[j], [t for t in new if t != tok.eos_id])
                cut = truncate_at_stop(text, s["stop"]) if s["stop"] else text
                completion[i] = cut
                generated[i] = len(new)
                finish[i] = ("eos" if new and new[-1] == tok.eos_id else "stop" if cut != text
                             else "length")
        return {**batch, "completion": np.array(completion, dtype=object), "tokens_generated": generated,
                "finish_reason": np.array(finish, dtype=object), "error": np.array(errors, dtype=object)}


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def map_with_model(ds, actor_cls, checkpoint: str, *, actors: int, batch_rows: int, cpus: int = 1,
                   use_gpu: bool | None = None, **kwargs):
    """`ds` through a pool of `actors` copies of `actor_cls`, each holding the model (one GPU each when asked or,
    with use_gpu None, when the cluster has GPUs), `batch_rows` rows per call."""
    from ray.data import ActorPoolStrategy

    gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    return ds.map_batches(
        actor_cls, fn_constructor_kwargs={"checkpoint": str(checkpoint), "cpus": cpus, **kwargs},
        compute=ActorPoolStrategy(size=actors), batch_size=batch_rows, batch_format="numpy", num_cpus=cpus,
        num_gpus=1 if gpu else 0,
    )
