"""The exported folder loads in transformers (local files only) and gives athanor's logits, tokens and greedy text."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm
import torch

from athanor.config import ModelConfig
from athanor.model.generate import generate
from athanor.model.hf_export import export_hf
from athanor.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

SENTENCE = "Alice was beginning to get very tired of sitting by her sister on the bank, in 1865."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sp_model(data_dir, tmp_path_factory):
    """A SentencePiece BPE trained on Alice in Wonderland with athanor's settings (ids 0-3 PAD UNK BOS EOS)."""
    lines = [line for line in (data_dir / "quality/high/alice29.txt").read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=512, byte_fallback=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, num_threads=1, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def trained_model(sp_path, data_dir, **overrides) -> tuple[Transformer, ModelConfig]:
    """A tiny model trained 60 steps on Alice, so its logits are not near-uniform noise."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    ids = torch.tensor(sp.encode((data_dir / "quality/high/alice29.txt").read_text()), dtype=torch.long)
    fields = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, rope_theta=500000.0)
    cfg = ModelConfig(**{**fields, **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        chunk = torch.stack([ids[s : s + 65] for s in starts])
        loss = model.loss(model(chunk[:, :-1]), chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 5.0  # log(512) = 6.2 at init
    return model.eval(), cfg


def load_hf(out_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    return model.eval(), tokenizer


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_reproduces_logits_and_greedy_tokens(sp_model, data_dir, tmp_path, monkeypatch, tie):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, cfg = trained_model(sp_model, data_dir, tie_embeddings=tie)
    export_hf(model, cfg, sp_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tie
    hf, tokenizer = load_hf(tmp_path)
    assert isinstance(hf, transformers.LlamaForCausalLM)

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = [sp.bos_id(), *sp.encode(SENTENCE)]
    assert tokenizer(SENTENCE)["input_ids"] == ids  # BOS added, same pieces as SentencePiece

    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    hf_greedy = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=sp.pad_id())
    assert hf_greedy[0, len(ids):].tolist() == generate(model, ids, 20, temperature=0)


def test_interleaved_rope_weights_would_not_match(sp_model, data_dir, tmp_path):
    """The parity above is sensitive to the RoPE convention: q/k rows in Meta's interleaved order break it."""
    model, cfg = trained_model(sp_model, data_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    head_dim = cfg.dim // cfg.n_heads
    for key, value in state.items():
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = value.shape[0] // head_dim  # HF half-split -> interleaved pairs, as Meta checkpoints store them
            state[key] = value.view(heads, 2, head_dim // 2, cfg.dim).transpose(1, 2).reshape(value.shape)
    export_hf(state, cfg, sp_model, tmp_path)
    hf, _ = load_hf(tmp_path)
    x = torch.tensor([[2, *spm.SentencePieceProcessor(model_file=str(sp_model)).encode(SENTENCE)]])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() > 1e-2


def test_moe_exports_as_mixtral_with_the_same_logits(sp_model, data_dir, tmp_path):
    model, cfg = trained_model(sp_model, data_dir, moe_num_experts=4, moe_top_k=2)
    export_hf(model, cfg, sp_model, tmp_path)
    hf, _ = load_hf(tmp_path)
    assert isinstance(hf, transformers.MixtralForCausalLM)
    x = torch.tensor([[2, *spm.SentencePieceProcessor(model_file=str(sp_model)).encode(SENTENCE)]])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("moe", [dict(moe_top_k=1), dict(moe_every=2), dict(moe_capacity_factor=1.25)])
def test_moe_that_mixtral_cannot_express_is_refused(sp_model, tmp_path, moe):
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, moe_num_experts=4, **moe)
    with pytest.raises(ValueError, match="cannot export this mixture-of-experts model as Mixtral"):
        export_hf(Transformer(cfg), cfg, sp_model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
