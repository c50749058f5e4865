"""Language identification with fastText lid.176: signal columns `lang`, `lang_score`.

A class UDF so each Ray actor loads the model once, not once per batch. Drops: `lang_not_allowed` (top language is
not in `languages`), `lang_low_score` (allowed language, but below its `min_score_per_language` entry, or
`min_score` when it has none: lid.176 is less sure of some languages than others at the same text quality).
"""

from __future__ import annotations

from pathlib import Path

import fasttext
import numpy as np
import pyarrow as pa

from athanor.config import LangIdConfig
from athanor.pipelines.stats import mark

LABEL_PREFIX = "__label__"
DROP_REASONS = ("lang_not_allowed", "lang_low_score")


def one_line(text: str) -> str:
    """fastText predicts on one line; a newline would end the input early (and raises)."""
    return " ".join(text.split())


class LanguageIdentifier:
    def __init__(self, cfg: LangIdConfig):
        path = Path(cfg.model_path)
        if not path.is_file():
            raise FileNotFoundError(f"curate.langid.model_path: no fastText model at {path}")
        self.model = fasttext.load_model(str(path))
        self.languages = set(cfg.languages)
        self.min_score = cfg.min_score
        self.min_score_per_language = cfg.min_score_per_language

    def too_unsure(self, lang: str, score: float) -> bool:
        return score < self.min_score_per_language.get(lang, self.min_score)

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        labels, scores = self.model.predict([one_line(t) for t in texts], k=1)
        langs = [lab[0].removeprefix(LABEL_PREFIX) if lab else "unknown" for lab in labels]
        return langs, np.array([s[0] if len(s) else 0.0 for s in scores], dtype=np.float64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        langs, scores = self.predict(batch["text"].to_pylist())
        reasons = [
            "lang_not_allowed" if lang not in self.languages else "lang_low_score" if self.too_unsure(lang, score)
            else None
            for lang, score in zip(langs, scores)
        ]
        out = batch.append_column("lang", pa.array(langs, type=pa.string()))
        out = out.append_column("lang_score", pa.array(scores, type=pa.float64()))
        return mark(out, reasons)
