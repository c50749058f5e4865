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
      mlflow.db, mlartifacts/ the local MLflow store when no tracking server is configured
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def from_workdir(cls, workdir: str | Path) -> "RunLayout":
        return cls(Path(workdir).expanduser().resolve())

    def curated(self, stage: str) -> Path:
        return self.root / "curated" / stage

    @property
    def dropped(self) -> Path:
        return self.root / "curated" / "dropped"

    def stats(self, stage: str) -> Path:
        return self.root / "stats" / f"{stage}.json"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def quality_dir(self) -> Path:
        return self.root / "quality"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_model(self) -> Path:
        return self.tokenizer_dir / "tokenizer.model"

    def shards(self, split: str) -> Path:
        return self.root / "shards" / split

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def mlflow_run_file(self) -> Path:
        """Holds the MLflow run id bound to this run, so every stage logs into the same run."""
        return self.root / "mlflow_run_id"
