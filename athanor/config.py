"""One typed config tree for a whole run, loaded from YAML, overridden by dotted keys, hashed for skip-if-done.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key fails on load with an error that names
the field (for example `train.max_stpes: Extra inputs are not permitted`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    """`name` binds the MLflow run and the checkpoints; a config file that leaves it out gets the file's stem, so no
    two configs share a run (or the demo's folder, which a stage's stale-output cleanup would empty) by default."""

    name: str = "athanor"
    workdir: str | None = None  # every stage's output lives under here (default runs/<name>): a local/NFS path, or
    seed: int = 1234            # an s3:// or gs:// URI

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name.strip() or "/" in name:
            raise ValueError(f"{name!r} is not a run name: it must be non-empty, without '/'")
        return name

    @model_validator(mode="after")
    def _workdir(self) -> "RunConfig":
        if self.workdir is None:
            self.workdir = f"runs/{self.name}"
        return self


class DataConfig(_Section):
    """Raw inputs. Relative paths are resolved against the current directory."""

    html_dirs: list[str] = Field(default_factory=list)  # folders of *.html / *.htm files (local or s3://)
    warc_files: list[str] = Field(default_factory=list)  # WARC files or globs (.warc / .warc.gz)
    jsonl_files: list[str] = Field(default_factory=list)  # JSON Lines files or globs, one document per line (.gz ok)
    parquet_files: list[str] = Field(default_factory=list)  # Parquet files or globs, one document per row
    text_files: list[str] = Field(default_factory=list)  # UTF-8 text files or globs, one document per file
    text_field: str = "text"  # JSONL/Parquet field holding the document's text
    id_field: str = "id"  # JSONL/Parquet field holding the record's own id, when there is one
    url_field: str = "url"  # JSONL/Parquet field holding the document's URL, when there is one
    max_docs_per_source: int | None = None  # cap for quick runs; None reads everything
    max_record_bytes: int = Field(10 * 2**20, ge=1)  # bigger records are dropped as `too_large`, never read whole
    # S3-compatible endpoint (MinIO, moto) for s3:// inputs; None: $AWS_ENDPOINT_URL, else AWS itself.
    # Credentials come from the AWS_* environment variables only.
    s3_endpoint_override: str | None = None


class ExtractConfig(_Section):
    # athanor: resiliparse after a boilerplate pass (pipelines/boilerplate.py); resiliparse: its main_content alone;
    # trafilatura: as DataTrove runs it, slower. Quality and speed of each: bench/bench_extract.py
    extractor: Literal["athanor", "resiliparse", "trafilatura"] = "athanor"
    main_content: bool = True  # drop navigation, footers and other boilerplate
    min_chars: int = 1  # texts shorter than this after extraction are dropped as `empty_text`
    # A budget per page (pipelines/budget.py, sandbox.py). Work, checked in linear time before extraction, far above
    # every real page sampled (data/html/news, data/pydoc: depth 63, 48,862 elements, tags of 8,877 characters,
    # 144 scripts): deeper nesting `too_deep`, more elements `too_many_nodes`, a longer tag `attribute_too_long`,
    # more <script>s `too_many_scripts`. A longer text (extracted, or read as text) is `text_too_long`: it bounds the
    # filters' work, linear in the text (Gopher's repetition signals: seconds per million characters), and is more
    # than Gopher's 100,000-word limit keeps of real text (6 characters a word with its space: 600,000).
    max_depth: int = Field(1024, ge=16)
    max_nodes: int = Field(100_000, ge=1)
    max_attribute_chars: int = Field(1_000_000, ge=1)
    max_scripts: int = Field(1000, ge=0)
    max_text_chars: int = Field(1_000_000, ge=1)
    # Time: a page whose extraction takes more CPU seconds than this per started MiB (or ten times that in wall
    # time) is killed with the process extracting it (sandbox.py) and dropped as `extract_timeout`, so output can
    # depend on the machine's speed for pages near it; the slowest real page sampled takes 0.47 s for its 2.4 MiB,
    # every other under 0.13 s (DataTrove 0.10.1: 1 s a page, wall time). None: extract in the worker, unbounded.
    timeout_s: float | None = Field(1.0, gt=0, le=3600)


class LangIdConfig(_Section):
    model_path: str = "data/models/lid.176.ftz"
    languages: list[str] = Field(default_factory=lambda: ["en"])
    min_score: float = Field(0.65, ge=0.0, le=1.0)
    # A language's own minimum top score, e.g. {de: 0.8}; languages not listed use min_score.
    min_score_per_language: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=dict)


class HeuristicsConfig(_Section):
    """Gopher quality and repetition rules (Rae et al. 2021, appendix A and table A1); defaults are the paper's."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' per word, and ellipses per word
    max_bullet_line_fraction: float = 0.9  # lines starting with a bullet
    max_ellipsis_line_fraction: float = 0.3  # lines ending with an ellipsis
    min_alpha_word_fraction: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # distinct stop words present
    stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    max_duplicate_paragraph_char_fraction: float = 0.2
    # n -> max share of characters in the most frequent word n-gram
    max_top_ngram_char_fraction: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    # n -> max share of characters in word n-grams that occur more than once
    max_duplicate_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


class C4Config(_Section):
    """C4's line cleaning and page rules (Raffel et al. 2020, section 2.2)."""

    enabled: bool = True
    terminal_punctuation: bool = True  # keep only lines ending in . ! ? " '
    min_words_per_line: int = 3
    max_word_length: int = 1000  # lines with a longer word are removed
    remove_citations: bool = True  # [1], [edit], [citation needed]
    remove_javascript_lines: bool = True
    remove_policy_lines: bool = True  # cookie / terms-of-use / privacy-policy lines
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    min_sentences: int = 5  # after line cleaning; 0 disables


class FineWebConfig(_Section):
    """FineWeb's extra rules (Penedo et al. 2024): thresholds are DataTrove's FineWebQualityFilter defaults."""

    enabled: bool = True
    min_line_punctuation_fraction: float = 0.12  # lines ending in terminal punctuation
    max_short_line_fraction: float = 0.67
    short_line_chars: int = 30
    max_duplicate_line_char_fraction: float = 0.01  # characters in repeated lines / all non-newline characters
    max_newlines_per_word: float = 0.3  # list-like pages


class UrlFilterConfig(_Section):
    """DataTrove's URL block list (fetched by scripts/fetch_data.py); rows without a URL pass."""

    enabled: bool = True
    blocklist_dir: str = "data/blocklists"  # domains, urls, banned_words.txt, soft_banned_words.txt
    soft_word_threshold: int = 2  # this many soft-banned words in a URL block it


class PiiConfig(_Section):
    """Masking of e-mail and IP addresses in `text` (not a drop)."""

    enabled: bool = True
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP>"
    public_ips_only: bool = True  # as DataTrove: private, loopback and reserved addresses are not personal


class ToxicityConfig(_Section):
    """C4's bad-words page filter with the LDNOOBW lists (fetched by scripts/fetch_data.py), per document language.

    Off by default: C4 drops every page holding one list word, which over-removes medical, sexual-health and LGBTQ
    text and dialects such as African-American English (Dodge et al. 2021), and FineWeb leaves it out; the URL block
    list already removes adult sites. Turn it on where a list match is a fair proxy for what you want gone.
    """

    enabled: bool = False
    wordlist_dir: str = "data/toxicity/ldnoobw"  # <lang>.json: a JSON list of words and phrases per language
    languages: list[str] | None = None  # languages checked (langid's codes); None: every language with a list
    default_language: str = "en"  # for rows without a `lang`
    # True: a checked language without a list is an error, raised when the stage is built for langid's languages;
    # False: such documents pass unchecked (toxic_words null)
    fail_on_missing_language: bool = True
    keep_fraction: float = Field(0.0, ge=0.0, le=1.0)  # of the pages with a match, the share kept anyway
    seed: int = 0  # of the keep draw, a hash of (seed, doc_id): the same pages are kept on every run
    # words taken out of a language's list: DataTrove's defaults (common ja/zh subwords, each >10% of their pages)
    allowlist: dict[str, list[str]] = Field(
        default_factory=lambda: {"ja": ["sm", "\u30b0\u30ed", "\u5973\u306e\u5b50"], "zh": ["\u6027"]})


class DecontamConfig(_Section):
    """Drop training documents sharing a word n-gram with an evaluation task (GPT-3's 13-gram overlap).

    On by default: the lm-eval tasks of configs/lm_eval are built from real books and news, and any of their text in
    the training data would inflate their scores. The files are the tasks' JSONL docs: `text` (cloze), or `query`
    and `choices` (multiple choice: the query followed by each choice).
    """

    enabled: bool = True
    n: int = Field(13, ge=1)  # words per n-gram, after lowercasing and removing punctuation
    task_files: list[str] = Field(
        default_factory=lambda: ["data/eval/athanor_cloze.jsonl", "data/eval/athanor_choice.jsonl"])

    @model_validator(mode="after")
    def _files(self) -> "DecontamConfig":
        if self.enabled and not self.task_files:
            raise ValueError("decontam is enabled but task_files is empty")
        return self


class DedupConfig(_Section):
    exact: bool = True
    minhash: bool = True
    ngram: int = Field(5, ge=1)  # word n-gram shingles
    num_bands: int = Field(14, ge=1)
    rows_per_band: int = Field(8, ge=1)
    seed: int = 1  # datasketch's default seed, so signatures match datasketch.MinHash(num_perm, seed)
    shuffle_partitions: int = Field(4, ge=1)  # partitions of the dedup groupbys (hash, LSH-bucket, doc_id join)
    # Exact Jaccard of the two shingle sets a candidate pair must reach to count as duplicates; None trusts LSH.
    jaccard_threshold: float | None = Field(None, ge=0.0, le=1.0)
    max_component_rounds: int = Field(64, ge=1)  # large-star/small-star rounds before giving up (O(log n) needed)
    # Inputs of at most this many documents are deduplicated in one Ray task (exact: one hash table; near: signatures,
    # LSH buckets, Jaccard check and component rounds in one process) instead of Ray Data groupbys, whose fixed cost
    # (shuffles, several component rounds) dominates small inputs. Same output bytes and stats either way; 0 always
    # uses the groupbys. The task holds these documents' text and signatures: at 100 k real documents (118 MB of
    # text) it takes ~11 s and ~0.5 GB on one busy core, where the groupbys on 2 CPUs already take ~29x the single
    # task's time at 30 k (bench/bench_dedup.py); the bound keeps one task's memory and run time modest.
    single_task_max_docs: int = Field(100_000, ge=0)

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band


class QualityConfig(_Section):
    """fastText supervised classifier: `high` files are the positive class, `low` files the negative."""

    enabled: bool = True
    high: list[str] = Field(default_factory=list)
    low: list[str] = Field(default_factory=list)
    threshold: float = Field(0.5, ge=0.0, le=1.0)  # keep documents whose P(high) >= threshold
    epochs: int = 10
    lr: float = 0.5
    word_ngrams: int = 2
    dim: int = 50
    # Hash buckets for word n-grams. fastText's default (2 M) makes a 400 MB model at dim 50, which every scoring
    # node loads and a URI workdir ships; a few thousand labelled paragraphs fill a fraction of 200 k.
    bucket: int = Field(200_000, ge=1)
    min_chars: int = 40  # training examples are paragraphs at least this long
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)


class CurateConfig(_Section):
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    heuristics: HeuristicsConfig = Field(default_factory=HeuristicsConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    url_filter: UrlFilterConfig = Field(default_factory=UrlFilterConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    toxicity: ToxicityConfig = Field(default_factory=ToxicityConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    write_dropped: bool = True  # keep rejected documents (with their reason) under curated/dropped/ for audit
    # A stage's output is split into ceil(documents in / docs_per_shard) doc_id ranges, each committed atomically;
    # a resumed run redoes only the ranges without a completion marker.
    docs_per_shard: int = Field(50_000, ge=1)
    # Ray Data shuffle behind the dedup groupbys and the final sort, set on curation's own datasets only;
    # the sort-based pull shuffle starts in well under a second where "shuffle_v2" takes seconds on small inputs.
    shuffle_strategy: Literal["sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle", "shuffle_v2"] = (
        "sort_shuffle_pull_based"
    )


class TokenizeConfig(_Section):
    vocab_size: int = Field(4096, ge=64)
    model_type: Literal["bpe", "unigram"] = "bpe"
    sample_docs: int = Field(20_000, ge=1)  # documents drawn for tokenizer training
    character_coverage: float = 0.9995
    seq_len: int = Field(256, ge=8)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # split by document hash
    shard_sequences: int = Field(4096, ge=1)  # sequences per Arrow shard
    encode_actors: int = Field(2, ge=1)  # Ray Data actor pool size for encoding (each loads the tokenizer once)


# Named model shapes (see athanor/model/presets.py); their vocabularies are the published models', for reference.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=256),
    "350m": dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, multiple_of=256),
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
               rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    "7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
               max_seq_len=4096, tie_embeddings=False),
}


class ModelConfig(_Section):
    """Llama-style decoder. vocab_size 0 means: take it from the trained tokenizer.

    `preset` (tiny, 125m, 350m, 1b, 7b; see `athanor presets`) supplies the shape, resolved when the config loads
    (so MLflow's params are the shape that trains); fields set explicitly win, and the vocabulary stays the
    tokenizer's unless set.
    """

    preset: Literal["tiny", "125m", "350m", "1b", "7b"] | None = None
    vocab_size: int = 0
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_hidden: int | None = None  # None: 8/3 * dim rounded up to multiple_of
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    attention: Literal["auto", "flash", "sdpa", "math"] = "auto"
    init_std: float = 0.02
    moe_num_experts: int = Field(0, ge=0)  # 0: dense MLPs; >0: mixture-of-experts MLPs in the chosen layers
    moe_top_k: int = Field(2, ge=1)  # experts per token
    moe_every: int = Field(1, ge=1)  # layer i is MoE when (i + 1) % moe_every == 0 (1: all, 2: every second)
    moe_capacity_factor: float | None = Field(None, gt=0)  # None: dropless; else GShard-style token dropping
    moe_aux_loss_coef: float = Field(0.01, ge=0)  # weight of the Switch load-balancing loss added to model.loss

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in MODEL_PRESETS:
            shape = {k: v for k, v in MODEL_PRESETS[data["preset"]].items() if k != "vocab_size"}
            data = {**shape, **data}
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.moe_num_experts and self.moe_top_k > self.moe_num_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) exceeds moe_num_experts ({self.moe_num_experts})")
        return self


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1)  # the most workers; with min_workers set, the group is elastic
    min_workers: int | None = Field(None, ge=1)  # elastic lower bound: training goes on with this many
    max_failures: int = Field(3, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    # Seconds between Ray Train's checks for room to grow an elastic group (ScalingConfig.elastic_resize_monitor_interval_s).
    resize_interval_s: float = Field(60.0, ge=0.0)
    # How often Ray Train's controller polls the workers (Ray's default is 2 s): a finished or dead worker is seen
    # sooner, which ends a run ~3 s earlier and starts recovery sooner. Goes to the controller as an env variable.
    health_check_interval_s: float = Field(0.5, gt=0.0)
    # Parallelism: workers form a (dp, tp) mesh, dp = workers / tp_size. Data parallelism is FSDP2 (fully_shard per
    # block) or DDP; tensor parallelism (tp_size > 1) needs fsdp.
    tp_size: int = Field(1, ge=1)
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    activation_checkpointing: bool = False
    compile: bool = False
    # Forward precision: bf16 trains fp32 weights with bf16 compute (FSDP2 all-gathers bf16 parameters and
    # reduce-scatters gradients in fp32, torchtitan's MixedPrecisionPolicy; DDP and one worker use bf16 autocast),
    # fp32 computes in fp32; auto is bf16 on GPUs and fp32 on CPU. Evaluation runs the same forward.
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    async_checkpoint: bool = True  # upload checkpoints to storage in the background (Ray Train's ASYNC mode)
    global_batch_size: int = Field(16, ge=1)  # sequences per optimizer step, whatever the worker count
    micro_batch_size: int = Field(8, ge=1)  # sequences per worker per forward pass (gradient accumulation fills the rest)
    max_steps: int = Field(200, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = 3e-4
    warmup_steps: int = 20
    # cosine: warmup, then cosine to min_lr at max_steps. wsd (warmup-stable-decay): warmup, lr held, then a linear
    # decay to min_lr over the last decay_fraction of max_steps.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4  # each evaluation scores eval_batches x micro_batch_size windows of every set
    # Extra named sets scored at every evaluation besides the validation shards: name -> .txt/.jsonl/.parquet files;
    # logged as eval/<name>/loss and eval/<name>/bits_per_byte.
    eval_sets: dict[str, list[str]] = Field(default_factory=dict)
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 1234
    log_sample_ids: bool = False  # rank 0 appends each step's global sample ids to train_samples.jsonl (audit, tests)
    peak_tflops: float = 989.0  # per-GPU dense bf16 peak for MFU (H100 SXM); unused on CPU
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) from rank 0

    @model_validator(mode="after")
    def _worker_range(self) -> "TrainConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        for name in ("num_workers", "min_workers"):
            n = getattr(self, name)
            if n is not None and n % self.tp_size:
                raise ValueError(f"{name} ({n}) must be a multiple of tp_size ({self.tp_size})")
        if self.tp_size > 1 and self.min_workers not in (None, self.num_workers):
            raise ValueError("an elastic worker range with tp_size > 1 could land on a worker count that is not a "
                             "multiple of tp_size; set min_workers equal to num_workers (or leave it unset)")
        if self.tp_size > 1 and self.data_parallel != "fsdp":
            raise ValueError("tp_size > 1 needs data_parallel: fsdp (the 2-D mesh composes FSDP2 with TP)")
        return self


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class FinetuneConfig(_Section):
    """`athanor finetune`: supervised fine-tuning of a trained model on instruction data, with LoRA or in full.

    Optimizer and schedule come from the `train` section (lr, max_steps, warmup_steps, batch sizes, ...), and so do
    the worker range, checkpoints and evaluation: fine-tuning runs the training loop, with its own data and loss.
    """

    base: str | None = None  # an athanor checkpoint, a run folder (its newest checkpoint) or an HF Llama folder
    method: Literal["lora", "full"] = "lora"
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(
        default_factory=lambda: list(LORA_TARGETS))
    rslora: bool = False  # scale by alpha / sqrt(rank) (rank-stabilized LoRA) instead of alpha / rank
    train_files: list[str] = Field(default_factory=list)  # JSONL: {prompt, response} or {messages: [...]}
    val_files: list[str] = Field(default_factory=list)  # held-out examples; none: val_fraction of train_files
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seq_len: int = Field(512, ge=8)  # tokens per packed window; longer examples are dropped as too_long
    shard_sequences: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _targets(self) -> "FinetuneConfig":
        if not self.target_modules:
            raise ValueError("target_modules must name at least one of " + ", ".join(LORA_TARGETS))
        return self


class DPOConfig(_Section):
    """`athanor dpo`: Direct Preference Optimization (Rafailov et al. 2023) of `finetune.base` on preference pairs.

    The model side (base, LoRA or full, rank, alpha, targets) comes from the `finetune` section and the optimizer,
    schedule, workers and checkpoints from `train`: DPO runs the training loop with its own data and loss.
    """

    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # sigmoid only: conservative DPO's assumed label noise
    length_normalize: bool = False  # mean instead of summed response log-probs (IPO's convention)
    # precomputed: the reference's log-probs are computed once by Ray Data and stored beside the pairs, so training
    # holds one model; live: the reference runs in every step (the base with LoRA's adapters off, or a frozen copy)
    reference: Literal["precomputed", "live"] = "precomputed"
    train_files: list[str] = Field(default_factory=list)  # JSONL: {prompt, chosen, rejected}
    val_files: list[str] = Field(default_factory=list)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seq_len: int = Field(512, ge=8)  # tokens per example window (prompt + one answer)
    shard_sequences: int = Field(1024, ge=2)

    @model_validator(mode="after")
    def _smoothing(self) -> "DPOConfig":
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid loss, not {self.loss_type}")
        return self


class EvalConfig(_Section):
    """`athanor eval`: log-likelihood of the run's validation shards and of extra inputs, as Ray Data batch inference."""

    inputs: list[str] = Field(default_factory=list)  # text (.txt, one document per file), .jsonl or .parquet files
    val_shards: bool = True  # score the run's packed validation shards too (when the run has them)
    context: int | None = Field(None, ge=1)  # input tokens per window; None: the checkpoint's training seq_len
    stride: int | None = Field(None, ge=1)  # scored-end step of the sliding window; None: the context (no overlap)
    batch_size: int = Field(16, ge=1)  # windows per forward pass
    actors: int = Field(1, ge=1)  # Ray Data actor pool: one model copy per actor
    cpus_per_actor: int = Field(1, ge=1)
    use_gpu: bool | None = None  # None: one GPU per actor when the Ray cluster has GPUs
    max_documents: int | None = Field(None, ge=1)  # per input file, for quick looks
    # None: metrics go to the training run (cfg.run.name); a name: a run of its own, tagged with the training run's id
    run_name: str | None = None


class QuantizeConfig(_Section):
    """`athanor quantize`: weight-only post-training quantization of a checkpoint's block projections (attention and
    MLP Linear layers; embedding and head stay full precision unless include_head), measured by `athanor eval`."""

    method: Literal["int8", "int4", "gptq", "awq"] = "int8"
    bits: Literal[4, 8] | None = None  # None: the method's (int8: 8; int4, gptq, awq: 4)
    group_size: int | None = None  # weights per scale along the input; None: the method's (int8: per channel,
    #                                others 128); -1: per output channel (GPTQ's convention)
    calibration: int = Field(128, ge=1)  # sequences for gptq / awq, sampled from the training shards
    calibration_from: str | None = None  # a run workdir whose train shards calibrate; None: run.workdir
    damp: float = Field(0.01, gt=0, lt=1)  # GPTQ: added to the Hessian's diagonal, times its mean
    act_order: bool = False  # GPTQ: quantize columns by decreasing Hessian diagonal (static groups)
    include_head: bool = False  # quantize the output head too (untied from the embedding when tied)
    output: str | None = None  # None: <workdir>/quantized/<method>-w<bits>-g<group>
    evaluate: bool = True  # score the full-precision and the quantized model on the run's validation shards

    @model_validator(mode="after")
    def _group(self) -> "QuantizeConfig":
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per channel) or at least 1, got {self.group_size}")
        if self.method == "int8" and self.bits == 4:
            raise ValueError("method int8 quantizes to 8 bits; use int4, gptq or awq for 4 bits")
        return self


class ClusterConfig(_Section):
    address: str | None = None  # None: start an embedded local Ray; "auto" or ray://... joins a cluster
    num_cpus: int | None = None  # for the embedded cluster; None lets Ray count the machine's cores


class MlflowConfig(_Section):
    tracking_uri: str | None = None  # None: sqlite store inside the run's workdir (required for a URI workdir)
    experiment: str = "athanor"


class AthanorConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _lora_dropout_under_tp(self) -> "AthanorConfig":
        if self.finetune.method == "lora" and self.finetune.dropout > 0 and self.train.tp_size > 1:
            raise ValueError("finetune.dropout > 0 with train.tp_size > 1: the ranks of a tensor-parallel group must "
                             "draw the same dropout mask for the replicated LoRA A, which a resized group cannot "
                             "promise; set finetune.dropout to 0")
        return self

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections: a stage whose inputs hash the same can skip itself."""
        dumped = self.model_dump(mode="json")
        payload = {s: dumped[s] for s in sections} if sections else dumped
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Dotted keys to scalar values, as MLflow params want them."""
        return dict(_flatten(self.model_dump(mode="json")))


class ConfigError(ValueError):
    """A config that failed to load; the message names every bad field."""


def _flatten(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`train.max_steps=50` -> ("train.max_steps", 50): the value is read against the field's type (see
    `_parse_value`), as YAML where the key names no field (pydantic then reports it)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.field=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    annotation = _field_annotation(key)
    if annotation is None:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    return key, _parse_value(annotation, raw)


def _field_annotation(dotted: str) -> Any:
    """The type of the field a dotted key names, or None when it names none (or a free-form dict's entry)."""
    model: Any = AthanorConfig
    annotation = None
    for part in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation
    return annotation


def _parse_value(annotation: Any, raw: str) -> Any:
    """An override's text as its field's type: a `str` field takes the text as it is (`run.name=2024`, `yes`); a
    number accepts any float spelling (`run.seed=1e3`); a list takes YAML's `[a, b]` or a bare `a,b`; `null` is None
    where the field allows it; anything else is read as YAML. pydantic validates the result."""
    text = raw.strip()
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = get_origin(annotation) in (Union, UnionType) and len(args) < len(get_args(annotation))
    if optional and text in ("null", "~", "None"):
        return None
    base = args[0] if optional and len(args) == 1 else annotation
    if base is str:
        return raw
    if base in (int, float):
        try:
            value = float(text)
        except ValueError:
            return text  # pydantic names the field
        return int(value) if base is int and value.is_integer() else value
    if get_origin(base) is list:
        if text.startswith("["):
            return yaml.safe_load(text)
        item = get_args(base)[0] if get_args(base) else Any
        return [_parse_value(item, part) for part in text.split(",")] if text else []
    if get_origin(base) is Literal and all(isinstance(a, str) for a in get_args(base)):
        return text
    return yaml.safe_load(text) if text else ""


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "<root>"
        lines.append(f"  {where}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AthanorConfig:
    """Read YAML (or defaults when path is None), apply `a.b=c` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded
        run = tree.get("run")
        if run is None or isinstance(run, dict) and "name" not in run:  # see RunConfig: the file's own run
            tree["run"] = {**(run or {}), "name": p.stem}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return AthanorConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
