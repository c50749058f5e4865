"""EleutherAI's lm-evaluation-harness on athanor models: the `athanor` model for lm_eval, and lm_eval's own CLI.

    athanor lm-eval --model athanor --model_args checkpoint=runs/demo --tasks athanor_cloze,athanor_choice \\
        --include_path configs/lm_eval --batch_size 16

or, in Python, after `import athanor.cluster.lm_eval_adapter` (importing it is what registers the model):

    lm_eval.simple_evaluate(model="athanor", model_args="checkpoint=runs/demo", tasks=[...], task_manager=...)

model_args: `checkpoint` (an athanor checkpoint, a run folder, or an HF Llama folder: whatever
`cluster.inference.load_for_inference` reads), `max_length` (tokens of input per window; default the context the
model was trained on), `stride` (rolling log-likelihood; default max_length: every token scored once, disjoint
windows, as lm_eval's `hf` model does), `actors` (0: score in this process; N: through a Ray Data pool of N
`WindowScorer` actors, on a local Ray started here when none is), `actor_cpus`, `max_gen_toks` (256), `seed`
(sampling seeds: seed + request number). `--batch_size` is windows (or prompts) per forward pass.

Every log-likelihood comes from `model/scoring.py` (`sliding_windows`, `score_windows`), the code `athanor eval` and
the Ray Data `WindowScorer` run; generation is `model/generate.py`'s `generate_batch`, as `athanor generate`.

Tokenization follows lm_eval's `hf` model with a Llama tokenizer (what `athanor export` writes): every string is
BOS + SentencePiece ids; a (context, continuation) pair is encoded whole and split after the context's tokens, with
the context's trailing spaces moved to the continuation (lm_eval's `TemplateLM._encode_pair`); the last
max_length + 1 tokens make the window. A rolling document is BOS + its ids, cut by `sliding_windows`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

import lm_eval.models  # noqa: F401  - the built-in models first: lm_eval's get_model only imports them when
# the registry is empty, so registering `athanor` alone would hide `hf`, `vllm`, ...

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "num_beams", "length_penalty", "early_stopping", "seed"}


def _int_or_none(value) -> int | None:
    return None if value in (None, "", "None", "none") else int(value)


def _batch_size(value, max_batch_size) -> int:
    if value in (None, "", "auto") or str(value).startswith("auto"):  # "auto:N" too: no search, a fixed default
        return int(max_batch_size or DEFAULT_BATCH_SIZE)
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return size


def _device(device: str | None) -> str | None:
    """lm_eval's --device (its CLI defaults to cuda): kept when usable, else None (CUDA when present, else CPU)."""
    import torch

    if device in (None, "", "auto"):
        return None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: running on CPU", device)
        return None
    return str(device)


@register_model("athanor")
class AthanorLM(TemplateLM):
    """An athanor checkpoint, run folder or HF Llama folder as an lm_eval model (loglikelihood, rolling
    loglikelihood, generate_until)."""

    backend = "causal"

    def __init__(self, checkpoint: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, max_length: int | None = None, stride: int | None = None,
                 actors: int = 0, actor_cpus: int = 1, device: str | None = None, max_gen_toks: int = 256,
                 seed: int = 1234, **unused: Any):
        super().__init__()
        from athanor.cluster.inference import describe, load_for_inference
        from athanor.pipelines.tokenizer import Tokenizer

        if not checkpoint:
            raise ValueError("the athanor model needs model_args checkpoint=PATH (an athanor checkpoint, a run "
                             "folder, or a Hugging Face Llama folder)")
        if unused:
            log.warning("athanor lm_eval model: ignoring unknown model_args %s", sorted(unused))
        self.checkpoint = str(checkpoint)
        self.source = describe(self.checkpoint)
        self.tokenizer = Tokenizer(self.source.tokenizer_path, num_threads=1)
        self.actors = int(actors or 0)
        self.actor_cpus = int(actor_cpus)
        self._device = _device(device)
        self._batch_size = _batch_size(batch_size, max_batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._inference = None
        if self.actors < 0:
            raise ValueError(f"actors must be >= 0, got {actors}")
        if self.actors == 0:  # in-process: load now, so a bad checkpoint fails before any task is built
            self._inference = load_for_inference(self.source.directory, self._device)
        self._max_length = _int_or_none(max_length) or self.source.context
        self._stride = _int_or_none(stride) or self._max_length
        limit = self.model_max_seq_len
        if self._max_length > limit:
            raise ValueError(f"max_length {self._max_length} exceeds the model's max_seq_len of {limit}")
        if not 1 <= self._stride <= self._max_length:
            raise ValueError(f"need 1 <= stride ({self._stride}) <= max_length ({self._max_length})")

    # --- what lm_eval asks of a model -------------------------------------------------------------------------

    @property
    def inference(self):
        """The InferenceModel (loaded on first use when scoring goes through Ray actors)."""
        if self._inference is None:
            from athanor.cluster.inference import load_for_inference

            self._inference = load_for_inference(self.source.directory, self._device)
        return self._inference

    @property
    def model_max_seq_len(self) -> int:
        """The longest input the model takes (its RoPE tables), read without loading it when scoring runs on actors."""
        if self._inference is not None:
            return self._inference.config.max_seq_len
        if self.source.hf:
            return self.source.context  # max_position_embeddings
        from athanor.cluster.checkpoint import read_trainer_state

        return int(read_trainer_state(self.source.directory)["model_config"].get("max_seq_len", 2048))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def stride(self) -> int:
        return self._stride

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._inference.device if self._inference is not None else "ray"

    @property
    def tokenizer_name(self) -> str:
        return f"athanor-sentencepiece-{self.tokenizer.sha256[:16]}"

    def get_model_info(self) -> dict:
        return {"athanor_checkpoint": str(self.source.directory), "athanor_step": self.source.step,
                "athanor_hf_folder": self.source.hf, "athanor_max_length": self.max_length,
                "athanor_stride": self.stride, "athanor_actors": self.actors,
                "athanor_tokenizer_sha256": self.tokenizer.sha256}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """SentencePiece ids of `string`, after BOS unless add_special_tokens is False (a Llama tokenizer's default)."""
        ids = self.tokenizer.encode([string])[0]
        return ids if add_special_tokens is False else [self.tokenizer.bos_id, *ids]

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    # --- scoring: model/scoring.py, in process or through the Ray Data pool ------------------------------------

    def score(self, windows: list[list[int]], n_scored: list[int], disable_tqdm: bool = True):
        """WindowScore-like (logprob, greedy) pairs of each window's last n_scored targets, in input order."""
        if not windows:
            return []
        if self.actors:
            return self._score_with_actors(windows, n_scored)
        from athanor.model.scoring import score_windows

        # Longest first (an out-of-memory shows at once), in blocks so the progress bar moves; score_windows sorts
        # inside a block by length, so each forward pads little.
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
        block = self.batch_size * 16
        out: list[tuple[float, bool] | None] = [None] * len(windows)
        model, pad = self.inference.model, self.tokenizer.pad_id
        with tqdm(total=len(windows), desc="athanor: scoring windows", disable=disable_tqdm) as bar:
            for start in range(0, len(order), block):
                idx = order[start : start + block]
                scores = score_windows(model, [windows[i] for i in idx], [n_scored[i] for i in idx], pad,
                                       self.batch_size)
                for i, s in zip(idx, scores):
                    out[i] = (s.logprob, s.greedy)
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    def _score_with_actors(self, windows: list[list[int]], n_scored: list[int]) -> list[tuple[float, bool]]:
        import ray

        from athanor.cluster.inference import WindowScorer, map_with_model

        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        rows = [{"row": i, "tokens": w, "n_scored": n} for i, (w, n) in enumerate(zip(windows, n_scored))]
        # device=cpu keeps the actors off GPUs; cuda asks one each; unset: GPUs when the cluster has them.
        use_gpu = None if self._device is None else self._device.startswith("cuda")
        ds = map_with_model(ray.data.from_items(rows), WindowScorer, self.checkpoint, actors=self.actors,
                            batch_rows=self.batch_size * 4, cpus=self.actor_cpus, use_gpu=use_gpu,
                            batch_size=self.batch_size)
        out: list[tuple[float, bool] | None] = [None] * len(windows)
        for r in ds.take_all():
            out[int(r["row"])] = (float(r["logprob"]), bool(r["greedy"]))
        missing = sum(o is None for o in out)
        if missing:
            raise RuntimeError(f"the Ray Data scoring pool returned no score for {missing} of {len(out)} windows")
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) -> (sum log p(continuation), is_greedy).

        The window is the last max_length + 1 tokens of context + continuation (left truncation, as lm_eval's hf
        model); a continuation longer than the window is scored as far as the window reaches."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        windows, n_scored, slots, cut = [], [], [], 0
        for k, (_, context_enc, continuation_enc) in enumerate(requests):
            if not continuation_enc:
                results[k] = (0.0, True)
                continue
            window = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            n = min(len(continuation_enc), len(window) - 1)
            cut += n < len(continuation_enc)
            windows.append(window)
            n_scored.append(n)
            slots.append(k)
        if cut:
            log.warning("%d of %d continuations are longer than max_length %d tokens: only their last %d tokens "
                        "are scored", cut, len(requests), self.max_length, self.max_length)
        for k, s in zip(slots, self.score(windows, n_scored, disable_tqdm)):
            results[k] = s
        for (pair, _, _), res in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, res)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document: BOS + its ids in `sliding_windows(ids, max_length, stride)`, every
        token scored once (lm_eval turns it into word/byte perplexity and bits per byte)."""
        from athanor.model.scoring import sliding_windows

        windows, n_scored, owner = [], [], []
        for k, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            for window, n in (sliding_windows(ids, self.max_length, self.stride) if len(ids) > 1 else []):
                windows.append(window)
                n_scored.append(n)
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self.score(windows, n_scored, disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation: model/generate.py ----------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        kw = dict(gen_kwargs or {})
        unknown = sorted(set(kw) - _GEN_KEYS)
        if unknown:
            log.warning("athanor generate_until: ignoring gen_kwargs %s", unknown)
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        do_sample = bool(kw.get("do_sample", False))
        temperature = float(kw.get("temperature", 1.0 if do_sample else 0.0))
        if not do_sample:  # lm_eval's convention: greedy unless do_sample, whatever the temperature says
            temperature = 0.0
        return {
            "until": until,
            "max_gen_toks": int(kw.get("max_gen_toks", self.max_gen_toks)),
            "temperature": temperature,
            "top_k": _int_or_none(kw.get("top_k")) if do_sample else None,
            "top_p": float(kw["top_p"]) if do_sample and kw.get("top_p") is not None else None,
            "repetition_penalty": float(kw.get("repetition_penalty", 1.0)),
            "num_beams": int(kw.get("num_beams", 1)),
            "length_penalty": float(kw.get("length_penalty", 1.0)),
            "early_stopping": kw.get("early_stopping", False),
            "seed": int(kw.get("seed", self.seed)),
        }

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (BOS + its ids, left-truncated so that it and max_gen_toks fit the window) with
        `generate_batch`, until EOS, max_gen_toks or a stop string of `until`; the text is cut before the stop."""
        from athanor.model.generate import generate_batch, truncate_at_stop

        tok = self.tokenizer
        model = self.inference.model
        limit = min(self.max_length, self.inference.config.max_seq_len)
        groups: dict[str, list[int]] = {}
        settings: dict[str, dict] = {}
        for k, req in enumerate(requests):
            s = self._generation_settings(req.args[1])
            key = json.dumps(s, sort_keys=True, default=str)
            groups.setdefault(key, []).append(k)
            settings[key] = s
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="athanor: generating", disable=disable_tqdm) as bar:
            for key, members in groups.items():
                s = settings[key]
                max_new = min(s["max_gen_toks"], limit - 1)
                prompts = {k: self.tok_encode(requests[k].args[0])[-(limit - max_new):] for k in members}
                members = sorted(members, key=lambda k: -len(prompts[k]))  # similar lengths share a batch
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    news = generate_batch(
                        model, [prompts[k] for k in batch], max_new, temperature=s["temperature"], top_k=s["top_k"],
                        top_p=s["top_p"], repetition_penalty=s["repetition_penalty"], num_beams=s["num_beams"],
                        length_penalty=s["length_penalty"], early_stopping=s["early_stopping"], eos_id=tok.eos_id,
                        pad_id=tok.pad_id, seeds=[s["seed"] + k for k in batch], stop=s["until"] or None,
                        decode=tok.decode,
                    )
                    for k, new in zip(batch, news):
                        text = tok.decode_continuation(prompts[k], [t for t in new if t != tok.eos_id])
                        out[k] = truncate_at_stop(text, s["until"]) if s["until"] else text
                        self.cache_hook.add_partial("generate_until", requests[k].args, out[k])
                    bar.update(len(batch))
        return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """lm_eval's own command line (`lm-eval run|ls|validate ...`, or the legacy form without a subcommand) with the
    `athanor` model registered: `athanor lm-eval --model athanor --model_args checkpoint=... --tasks ...`."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    include = default_include_path()
    if include.is_dir() and any(a == "--tasks" or a.startswith("--tasks=") for a in argv) \
            and not any(a.startswith("--include_path") for a in argv):
        argv += ["--include_path", str(include)]  # the athanor_* tasks, from any working directory
    setup_logging()
    saved = sys.argv
    sys.argv = ["athanor lm-eval", *argv]  # HarnessCLI reads sys.argv (it inserts `run` for the legacy form)
    try:
        cli = HarnessCLI()
        cli._parser.prog = "athanor lm-eval"
        args = cli.parse_args()
        cli.execute(args)
    finally:
        sys.argv = saved
    return 0


def default_include_path() -> Path:
    """configs/lm_eval of this source tree: the athanor_cloze and athanor_choice task YAMLs."""
    return Path(__file__).resolve().parents[1] / "configs" / "lm_eval"


if __name__ == "__main__":
    sys.exit(main())
