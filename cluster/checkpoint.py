"""The checkpoint format: one folder that is enough to resume training, generate text or export the model.

    .metadata, __<rank>_0.distcp   model and optimizer, saved by `torch.distributed.checkpoint` (DCP): every rank
                                   writes its own shards, so loading reshards to any world size and parallel layout
    trainer_state.json             step, loader state, world size and model config (plain JSON, world-size free)
    rng/rank_<r>.pt                each rank's torch RNG state (tensors only)
    tokenizer.model                the SentencePiece model the token ids belong to

Nothing is unpickled blindly on load. DCP reads tensors by offset and its small non-tensor items with
`torch.load(weights_only=True)`, but it reads `.metadata` with plain `pickle.load`; `SafeFileSystemReader` replaces that
with an unpickler that admits only DCP's own metadata classes. JSON is JSON, and the RNG files load with
`weights_only=True`. A tampered checkpoint fails to load instead of running code.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from athanor import storage
from athanor.config import ModelConfig

TRAINER_STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.model"
DCP_METADATA = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Admits what DCP's metadata is made of (its dataclasses, torch sizes, dtypes, layouts, paths) and nothing else."""

    MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        allowed = (module in self.MODULES or (module, name) in self.NAMES
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not DCP metadata; "
                                         "refusing to load it (the checkpoint may have been tampered with)")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
                    rank: int, tokenizer_model: Path | None) -> None:
    """Collective: every rank writes its shards of model and optimizer; rank 0 adds the JSON state and tokenizer."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    dcp.save({"model": _trained_only(model, model_sd), "optim": optim_sd}, checkpoint_id=str(directory))
    rng = directory / "rng"
    rng.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng / f"rank_{rank}.pt")
    if rank == 0:
        (directory / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, directory / TOKENIZER_FILE)


def save_model(directory: str | Path, model: torch.nn.Module, model_config: ModelConfig, tokenizer_model: str | Path,
               step: int = 0, seq_len: int | None = None) -> Path:
    """A weights-only checkpoint from one process (no optimizer, no loader): what `load_model`, `athanor eval`,
    `generate` and `export` read. For models made outside training (tests, conversions, post-processing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming the intent is to save in a single
        warnings.filterwarnings("ignore", message=".*single process")  # process": it is
        dcp.save({"model": _trained_only(model, model.state_dict())}, checkpoint_id=str(directory))
    state = {"step": step, "seq_len": seq_len, "model_config": model_config.model_dump(mode="json")}
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.copyfile(tokenizer_model, directory / TOKENIZER_FILE)
    return directory


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int) -> dict:
    """Collective: restore model and optimizer in place, resharded to this run's layout; returns the trainer state."""
    directory = Path(directory)
    options = _options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": _trained_only(model, model_sd), "optim": optim_sd}
    _dcp_load(state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    rng_file = directory / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():  # a rank that did not exist before the resize keeps its fresh seed
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return read_trainer_state(directory)


def _options(model: torch.nn.Module) -> StateDictOptions:
    """A model with frozen parameters (LoRA) checkpoints only what trains: its base comes from `finetune.base`; a
    tied head is saved once, so loading it is not strict about the head either."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not (frozen or _tied(model)))


def _trained_only(model: torch.nn.Module, model_sd: dict) -> dict:
    """What a checkpoint holds of the model: the adapters alone for a LoRA model (ignore_frozen_params keeps a tied
    head, since torch finds frozen parameters by name and the tied duplicate has none of its own), and a tied head
    once, as the embedding it is (its copy was a tenth of a small model's checkpoint, a gigabyte at 1B)."""
    from athanor.model.lora import is_lora_key, lora_modules

    if lora_modules(model):
        return {k: v for k, v in model_sd.items() if is_lora_key(k)}
    if _tied(model):
        return {k: v for k, v in model_sd.items() if k != "output.weight"}
    return model_sd


def _tied(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP
    return getattr(getattr(inner, "cfg", None), "tie_embeddings", False)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why, per rank."""


def _dcp_load(state: dict, directory: Path) -> None:
    """dcp.load with the safe reader; unreadable or refused metadata and DCP's CheckpointException (a BaseException)
    become a CheckpointError with one line per cause."""
    try:  # checked up front: DCP would log each failed attempt with a traceback before giving up
        SafeFileSystemReader(directory).read_metadata()
    except Exception as e:  # noqa: BLE001 - whatever a corrupt pickle raises, the answer is the same
        raise CheckpointError(f"cannot load checkpoint {directory}: unreadable DCP metadata: {e}") from e
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(directory))
    except CheckpointException as e:
        reasons = "; ".join(f"rank {r}: {err[0] if isinstance(err, tuple) else err!r}" for r, err in e.failures.items())
        raise CheckpointError(f"cannot load checkpoint {directory}: {reasons}") from e


def read_trainer_state(directory: str | Path) -> dict:
    return json.loads((Path(directory) / TRAINER_STATE_FILE).read_text())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_checkpoint(path: Path) -> bool:
    return (path / TRAINER_STATE_FILE).is_file() and (path / DCP_METADATA).is_file()


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint (highest step) under a run's workdir or storage folder.
    Under an s3:// or gs:// URI the newest is chosen in place and fetched into the node-local cache."""
    if storage.is_uri(path):
        return find_checkpoint(_fetch_newest(storage.location(path)))
    p = Path(path)
    if is_checkpoint(p):
        return p
    found = [f.parent for f in p.glob(f"**/checkpoint_*/{TRAINER_STATE_FILE}") if is_checkpoint(f.parent)]
    if not found:
        raise FileNotFoundError(f"no checkpoint ({TRAINER_STATE_FILE} + DCP {DCP_METADATA}) found in or under {p}")
    return max(found, key=lambda d: (read_trainer_state(d)["step"], d.name))


def newest_trainer_state(folder: storage.Location) -> dict | None:
    """The trainer state of the newest complete checkpoint under `folder` (local or a URI), read without fetching
    its weights; None when there is none."""
    newest = _newest(folder)
    return newest[1] if newest else None


def _newest(root: storage.Location) -> tuple[storage.Location, dict] | None:
    """(trainer-state file, state) of the newest complete checkpoint (by step) in or under `root`, or None."""
    if not storage.exists(root):
        return None
    states = [(f, storage.read_json(f)) for f in storage.glob(root, TRAINER_STATE_FILE, recursive=True)
              if (f.parent == root or f.parent.name.startswith("checkpoint_"))
              and storage.is_file(f.parent / DCP_METADATA)]
    return max(states, key=lambda fs: (fs[1]["step"], fs[0].parent.name), default=None)


def resume_problem(state: dict, manifest: dict) -> str | None:
    """Why a run cannot resume from a checkpoint with trainer `state` on the data of `manifest`, or None.

    Checked by the driver before training starts: a restart cannot fix these, so with `train.max_failures` at -1 the
    worker group would fail and restart for ever (the loader refuses other shards, DCP other shapes)."""
    saved = (state.get("loader") or {}).get("fingerprint")
    now = manifest["splits"]["train"]["fingerprint"]
    if saved and saved != now:
        return (f"it trained on train shards {saved[:16]}..., the manifest now names {now[:16]}... (re-tokenized or "
                "re-curated): resuming would silently change the data order")
    if state.get("seq_len") not in (None, manifest["seq_len"]):
        return f"it trained on sequences of {state['seq_len']} tokens, the shards now hold {manifest['seq_len']}"
    return None


def _fetch_newest(root: storage.Uri) -> Path:
    """The newest checkpoint under a URI (by step), fetched into the node-local cache."""
    newest = _newest(root)
    if newest is None:
        raise FileNotFoundError(f"no checkpoint ({TRAINER_STATE_FILE} + DCP {DCP_METADATA}) found in or under {root}")
    return storage.fetch_tree(newest[0].parent)


def load_model(path: str | Path, device: str = "cpu", merge: bool = True):
    """(model in eval mode, its ModelConfig, the checkpoint folder) from a checkpoint or a run folder.

    One process, no process group: DCP reads every shard and assembles whole tensors. A LoRA fine-tune's checkpoint
    is its adapters: they are loaded onto its base model and, with `merge`, folded into the weights (a plain
    Transformer); without, the model keeps its LoRALinear modules (for exporting the adapter).
    """
    from athanor.model.transformer import Transformer

    directory = find_checkpoint(path)
    trainer_state = read_trainer_state(directory)
    mcfg = ModelConfig.model_validate(trainer_state["model_config"])
    model = Transformer(mcfg)
    lora = (trainer_state.get("finetune") or {}).get("method") == "lora"
    if lora:  # the checkpoint holds the adapters; the base weights come from where fine-tuning started
        from athanor.cluster.inference import base_state_dict
        from athanor.model.lora import apply_lora, lora_state_dict, merge_lora

        ft = trainer_state["finetune"]
        model.load_state_dict(base_state_dict(ft["base"]))
        apply_lora(model, ft["rank"], ft["alpha"], ft["dropout"], tuple(ft["target_modules"]), ft["rslora"])
    state = {"model": lora_state_dict(model) if lora else _trained_only(model, model.state_dict())}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        _dcp_load(state, directory)
    model.load_state_dict(state["model"], strict=False)
    missing = set(model.state_dict()) - set(state["model"])  # a tied head is the embedding; LoRA's base is loaded
    if not lora and missing - {"output.weight"}:
        raise CheckpointError(f"cannot load checkpoint {directory}: no values for {sorted(missing)[:5]}")
    if lora and merge:
        merge_lora(model)
    return model.to(device).eval(), mcfg, directory
