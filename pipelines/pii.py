"""PII masking: e-mail and IP addresses in `text` become placeholders (a rewrite, never a drop).

Patterns follow DataTrove's PIIFormatter; IP candidates are checked with `ipaddress`, so version strings and
times ("1.2.3", "12:30:45") are left alone and, by default, only public addresses are masked (a private or
loopback address identifies no one). Signals: `pii_emails`, `pii_ips` (masked spans per document).
"""

from __future__ import annotations

import ipaddress
import re

import pyarrow as pa

from athanor.config import PiiConfig
from athanor.pipelines.stats import mark

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
)
IPV4 = r"(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
IPV6 = r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|" + IPV4 + r")?"
IP = re.compile(rf"(?<![\w.:])(?:{IPV4}|{IPV6})(?![\w.:])")
DROP_REASONS: tuple[str, ...] = ()  # masking never drops


def _is_ip(candidate: str, public_only: bool) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return address.is_global or not public_only


def mask_pii(text: str, cfg: PiiConfig) -> tuple[str, int, int]:
    """(masked text, e-mails masked, IPs masked). E-mails go first: an address may hold an IP literal."""
    text, emails = EMAIL.subn(cfg.email_placeholder, text)
    ips = 0

    def replace_ip(match: re.Match) -> str:
        nonlocal ips
        if not _is_ip(match.group(0), cfg.public_ips_only):
            return match.group(0)
        ips += 1
        return cfg.ip_placeholder

    return IP.sub(replace_ip, text), emails, ips


def pii_batch(batch: pa.Table, cfg: PiiConfig) -> pa.Table:
    """Ray Data UDF: masks `text`, adds `pii_emails` and `pii_ips`; every row is kept."""
    results = [mask_pii(t or "", cfg) for t in batch["text"].to_pylist()]
    out = batch.set_column(batch.schema.get_field_index("text"), "text",
                           pa.array([t for t, _, _ in results], type=pa.string()))
    out = out.append_column("pii_emails", pa.array([e for _, e, _ in results], type=pa.int64()))
    out = out.append_column("pii_ips", pa.array([i for _, _, i in results], type=pa.int64()))
    return mark(out, [None] * out.num_rows)
