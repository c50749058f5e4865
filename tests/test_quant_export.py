"""A quantized export is a compressed-tensors HF folder: transformers computes athanor's logits from it, and athanor
reloads the very same integers."""

from __future__ import annotations

import copy
import json

import pytest
import sentencepiece as spm
import torch
from test_hf_export import SENTENCE, sp_model, trained_model  # noqa: F401 (sp_model is a fixture)

from athanor.model.hf_export import export_hf
from athanor.model.hf_import import load_hf_folder
from athanor.model.quant_export import quantization_metadata, save_quantized
from athanor.model.quantize import QuantizedLinear, QuantSpec, quantize_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name -> QuantSpec.for_method arguments (int4's default groups of 128 do not divide dim 64), include_head
VARIANTS = {
    "int8": (dict(method="int8"), False),  # symmetric, per channel
    "int4": (dict(method="int4", group_size=32), False),  # asymmetric groups
    "int8-asym-g32": (dict(method="int8", group_size=32, symmetric=False), False),
    "int4-sym-head": (dict(method="int4", group_size=32, symmetric=True), True),  # the head quantized, untied
}
METHODS = list(VARIANTS)


@pytest.fixture(scope="module")
def trained(sp_model, data_dir):  # noqa: F811
    return trained_model(sp_model, data_dir)


class Exports(dict):
    """variant -> (athanor's quantized model, its folder), made on first use; "fp" -> the float export's folder."""

    def __init__(self, model, cfg, sp_path, tmp_path_factory):
        super().__init__(fp=export_hf(model, cfg, sp_path, tmp_path_factory.mktemp("fp")))
        self.model, self.sp_path, self.tmp = model, sp_path, tmp_path_factory

    def __missing__(self, variant):
        spec, head = VARIANTS[variant]
        quantized = copy.deepcopy(self.model)
        quantize_model(quantized, QuantSpec.for_method(**spec), include_head=head)
        meta = {"method": spec["method"], "source": "alice-60-steps", "step": 60, "seq_len": 64, "calibration": None}
        self[variant] = quantized, save_quantized(quantized, self.sp_path, self.tmp.mktemp(variant), meta)
        return self[variant]


@pytest.fixture(scope="module")
def exported(trained, sp_model, tmp_path_factory):  # noqa: F811
    return Exports(*trained, sp_model, tmp_path_factory)


def sentence_ids(sp_path) -> torch.Tensor:
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    return torch.tensor([[sp.bos_id(), *sp.encode(SENTENCE)]])


def quantized_linears(model) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("method", METHODS)
def test_config_is_compressed_tensors_pack_quantized(exported, method):
    model, folder = exported[method]
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    linears = quantized_linears(model)
    lin = linears["layers.0.attention.wq"]
    group = qconfig["config_groups"]["group_0"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert group["targets"] == ["Linear"] and qconfig["ignore"] == ([] if "output" in linears else ["lm_head"])
    weights = group["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (lin.bits, "int", lin.symmetric)
    per_channel = lin.group_size == lin.in_features
    assert weights["strategy"] == ("channel" if per_channel else "group")
    assert weights["group_size"] == (None if per_channel else lin.group_size)
    assert quantization_metadata(folder)["method"] == VARIANTS[method][0]["method"]
    assert quantization_metadata(exported["fp"]) is None


@pytest.mark.parametrize("method", METHODS)
def test_stored_tensors_follow_compressed_tensors(exported, method):
    """Its own decompressor turns each module's stored tensors into athanor's dequantized weight, bit for bit."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model, folder = exported[method]
    stored = load_file(str(folder / "model.safetensors"))
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qconfig).config_groups["group_0"]
    names = PackedQuantizationCompressor.compression_param_names(scheme)
    lin = quantized_linears(model)["layers.1.feed_forward.w2"]
    local = {n: stored[f"model.layers.1.mlp.down_proj.{n}"] for n in names}
    assert local["weight_packed"].dtype == torch.int32
    dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert torch.equal(dense, lin.dequantized_weight(torch.float32))
    assert not any(k.endswith("down_proj.weight") for k in stored)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("method", METHODS)
def test_transformers_reproduces_quantized_logits(exported, sp_model, monkeypatch, method):  # noqa: F811
    """Dequantized on CPU by transformers' compressed-tensors integration, the folder computes athanor's logits.

    Asymmetric (int4) folders need `dequantize=True`: on its default path compressed-tensors 0.20.0 lays out its
    modules on the meta device without packing the zero point, so the packed checkpoint tensor does not fit.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, folder = exported[method]
    symmetric = next(iter(quantized_linears(model).values())).symmetric
    kwargs = {} if symmetric else {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs).eval()
    x = sentence_ids(sp_model)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_athanor_reloads_the_same_integers(exported, sp_model, method):  # noqa: F811
    model, folder = exported[method]
    loaded, cfg = load_hf_folder(folder)  # dispatches on quantization_config
    ours, theirs = quantized_linears(model), quantized_linears(loaded)
    assert ours.keys() == theirs.keys() and len(ours) == 7 * cfg.n_layers + VARIANTS[method][1]
    assert cfg.tie_embeddings == model.cfg.tie_embeddings
    for name, a in ours.items():
        b = theirs[name]
        assert (a.bits, a.group_size, a.symmetric, a.in_features, a.out_features) == \
               (b.bits, b.group_size, b.symmetric, b.in_features, b.out_features)
        for buf in ("qweight", "scale", "zero"):
            x, y = getattr(a, buf), getattr(b, buf)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), f"{name}.{buf}"
    x = sentence_ids(sp_model)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("method", METHODS)
def test_quantized_folder_is_smaller(exported, method):
    size = [folder.joinpath("model.safetensors").stat().st_size for folder in (exported[method][1], exported["fp"])]
    assert size[0] < 0.6 * size[1]


@pytest.mark.parametrize("quant", [{"quant_method": "gptq", "bits": 4}, "int-quantized"])
def test_other_quantization_configs_are_refused(exported, tmp_path, quant):
    import shutil

    folder = shutil.copytree(exported["int8"][1], tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    if isinstance(quant, dict):
        config["quantization_config"], why = quant, "gptq"
    else:
        qconfig = config["quantization_config"]
        qconfig["format"] = qconfig["config_groups"]["group_0"]["format"] = quant
        why = quant
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=why):
        load_hf_folder(folder)
