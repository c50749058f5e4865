"""The working folder of one run: every stage reads and writes here, so any stage can be re-run alone.

    <workdir>/
      curated/<stage>/        kept documents after each curation stage (Parquet)
      curated/dropped/        rejected documents with their drop_reason (Parquet, for audit)
      stats/<stage>.json      documents in, kept, dropped by reason
      quality/                the fastText quality classifier and its held-out report
      tokenizer/              SentencePiece model and vocabulary
      shards/{train,val}/     packed token sequences (Arrow IPC)
      manifest.json           shard list with counts and sha256
      checkpoints/            Ray Train checkpoints
      mlflow.db, mlartifacts/ the local MLflow store when no tracking server is configured (local workdirs only)

The workdir is a local (or shared NFS) folder, or an `s3://` / `gs://` URI on a multi-node cluster: then `root` and
every path below are `storage.Uri`s, which join with `/` like Paths, and all I/O goes through `athanor.storage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from athanor import storage
from athanor.storage import Location


@dataclass(frozen=True)
class RunLayout:
    root: Location

    def __post_init__(self):
        if not isinstance(self.root, (Path, storage.Uri)):  # a plain str: a local path or a URI
            object.__setattr__(self, "root", storage.location(self.root))

    @classmethod
    def from_workdir(cls, workdir: str | Path) -> RunLayout:
        return cls(storage.location(workdir))

    @property
    def remote(self) -> bool:
        return not isinstance(self.root, Path)

    def on_this_node(self) -> RunLayout:
        """This run as training reads it here: the workdir itself when local, else a node-local cache copy of the
        manifest, tokenizer and token shards (sha256-checked against the manifest) for memory-mapping."""
        if not self.remote:
            return self
        from athanor.pipelines.shards import fetch_token_shards

        return RunLayout(fetch_token_shards(self.root))

    def curated(self, stage: str) -> Location:
        return self.root / "curated" / stage

    @property
    def dropped(self) -> Location:
        return self.root / "curated" / "dropped"

    def stats(self, stage: str) -> Location:
        return self.root / "stats" / f"{stage}.json"

    @property
    def stats_dir(self) -> Location:
        return self.root / "stats"

    @property
    def quality_dir(self) -> Location:
        return self.root / "quality"

    @property
    def tokenizer_dir(self) -> Location:
        return self.root / "tokenizer"

    @property
    def tokenizer_model(self) -> Location:
        return self.tokenizer_dir / "tokenizer.model"

    def shards(self, split: str) -> Location:
        return self.root / "shards" / split

    @property
    def manifest(self) -> Location:
        return self.root / "manifest.json"

    @property
    def checkpoints(self) -> Location:
        return self.root / "checkpoints"

    @property
    def mlflow_db(self) -> Location:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Location:
        return self.root / "mlartifacts"

    @property
    def mlflow_run_file(self) -> Location:
        """Holds the MLflow run id bound to this run, so every stage logs into the same run."""
        return self.root / "mlflow_run_id"
