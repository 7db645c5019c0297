"""Published LLoCO checkpoints, rebuilt tiny and random in their exact on-disk layouts.

Layout assumptions (from the AutoCompressors/LLoCO sources and the hub file listings, Nov 2026):
- princeton-nlp/AutoCompressor-Llama-2-7b-6k: config.json with the keys below (architectures
  LlamaAutoCompressorModel, summary_length 50, ...), weights in pytorch_model-0000k-of-00002.bin
  + pytorch_model.bin.index.json, and the summary table as a top-level ``embed_summary.weight``
  (``LlamaAutoCompressorModel`` subclasses LlamaForCausalLM and sets ``self.embed_summary``).
- xiuyul/Lloco-7b-*: PEFT adapter_config.json as below, adapter_model.safetensors with PEFT names
  ``base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lloco_index.checkpoints import SUMMARY_KEY, convert_checkpoint, is_autocompressor, read_summary_embeddings
from lloco_index.compressor import ContextCompressor
from lloco_index.pipeline import LLoCO
from lloco_index.presets import PRESETS, get_preset, quality_question

from conftest import build_tiny_llama

K = 5  # summary_length of the tiny AutoCompressor
DOC = " ".join(f"Room {i} of the lighthouse holds {i * 7} lenses and a brass bell." for i in range(12))
ADAPTER_CONFIG = {  # xiuyul/Lloco-7b-*/adapter_config.json, key for key
    "auto_mapping": None, "base_model_name_or_path": "princeton-nlp/AutoCompressor-Llama-2-7b-6k", "bias": "none",
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
    "layers_to_transform": None, "lora_alpha": 16, "lora_dropout": 0.05, "modules_to_save": None,
    "peft_type": "LORA", "r": 8, "revision": None, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "task_type": "CAUSAL_LM"}


def build_pickled_autocompressor(path: Path) -> dict[str, torch.Tensor]:
    """The hub layout of AutoCompressor-Llama-2-7b-6k at toy size; returns the saved state dict."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tiny_llama(path)  # for the tokenizer files
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (path / f).unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = {"_name_or_path": "princeton-nlp/AutoCompressor-Llama-2-7b-6k", "accumulate_summary": True,
           "architectures": ["LlamaAutoCompressorModel"], "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
           "intermediate_size": 128, "max_position_embeddings": 4096, "model_type": "llama",
           "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "pretraining_tp": 1,
           "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
           "segment_gradient_checkpointing": True, "summary_length": K, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True,
           "vocab_size": len(tok)}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(1)
    known = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
    state = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(LlamaConfig(**known)).state_dict().items()}
    state[SUMMARY_KEY] = torch.randn(K, 64).to(torch.bfloat16)  # trained table: not the EOS init
    shards = [{k: v for k, v in state.items() if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"}]
    shards.append({k: v for k, v in state.items() if k not in shards[0]})
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state


def build_lloco_adapter(path: Path, layers: int = 2, hidden: int = 64) -> dict[str, torch.Tensor]:
    """A Lloco-7b-* adapter folder at toy size, with non-zero lora_B so it changes the output."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=2))
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            stem = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{stem}.lora_A.weight"] = (torch.randn(8, hidden, generator=g) * 0.2).to(torch.bfloat16)
            tensors[f"{stem}.lora_B.weight"] = (torch.randn(hidden, 8, generator=g) * 0.2).to(torch.bfloat16)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    state = build_pickled_autocompressor(root / "ac-bin")
    convert_checkpoint(root / "ac-bin", root / "AutoCompressor-Llama-2-7b-6k")
    adapter = build_lloco_adapter(root / "Lloco-7b-quality")
    return {"root": root, "state": state, "adapter": adapter, "model": root / "AutoCompressor-Llama-2-7b-6k"}


@pytest.fixture(scope="module")
def lloco(checkpoints):
    return LLoCO.from_pretrained(str(checkpoints["model"]), adapter=str(checkpoints["root"] / "Lloco-7b-quality"),
                                 device="cpu", prompt_preset="qasper")


def reference_model(path: Path):
    """The same checkpoint loaded by plain transformers, outside lloco-index."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def summary_table(path: Path) -> torch.Tensor:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    with safe_open(str(path / index["weight_map"][SUMMARY_KEY]), "pt") as f:
        return f.get_tensor(SUMMARY_KEY).float()


def test_pickled_checkpoint_is_refused_with_the_fix(checkpoints):
    from lloco_index.backbone import Backbone

    with pytest.raises(ValueError, match=r"no safetensors weights \(pytorch_model-00001-of-00002.bin, .*"
                                         r"lloco convert-checkpoint"):
        Backbone.from_pretrained(str(checkpoints["root"] / "ac-bin"), device="cpu")


def test_convert_checkpoint_keeps_every_tensor_and_file(checkpoints):
    out = checkpoints["model"]
    names = sorted(p.name for p in out.iterdir())
    assert "model-00001-of-00002.safetensors" in names and "model-00002-of-00002.safetensors" in names
    assert not [n for n in names if n.endswith(".bin")] and "tokenizer.json" in names and "config.json" in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(checkpoints["state"])
    for key, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as f:
            assert torch.equal(f.get_tensor(key), checkpoints["state"][key])
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(checkpoints["root"] / "ac-bin", out)


def test_cli_converts_an_adapter_folder(tmp_path, capsys):
    from lloco_index.cli import main

    src = tmp_path / "adapter-bin"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    weights = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64)}
    torch.save(weights, src / "adapter_model.bin")
    torch.save({"not": "weights"}, src / "training_args.bin")  # skipped, never unpickled
    assert main(["convert-checkpoint", str(src), str(tmp_path / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["adapter_model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert main(["convert-checkpoint", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_autocompressor_is_detected_and_mapped(checkpoints, lloco, tiny_model_dir):
    assert is_autocompressor(checkpoints["model"]) and not is_autocompressor(tiny_model_dir)
    cfg = lloco.compressor.config
    assert (cfg.segment_tokens, cfg.summary_tokens, cfg.hidden_size) == (1536, K, 64)
    assert lloco.compressor.encoder_adapter is None  # the AutoCompressor LoRA is merged in the weights
    torch.testing.assert_close(lloco.compressor.summary.detach(), summary_table(checkpoints["model"]))
    assert lloco.backbone.adapters == ["Lloco-7b-quality"] and lloco.adapter == "Lloco-7b-quality"
    assert not lloco.backbone.model.get_base_model().config.tie_word_embeddings


def test_opt_autocompressors_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "summary_length": 50,
                                                      "architectures": ["AutoCompressorModel"]}))
    with pytest.raises(ValueError, match="only LLaMA AutoCompressors"):
        read_summary_embeddings(tmp_path)


def test_compression_matches_reference(checkpoints, lloco):
    """Reference: LLoCO's encoder call on one segment = final normed hidden states at the summary slots."""
    ref_model, table = reference_model(checkpoints["model"]), summary_table(checkpoints["model"])
    ids = lloco.backbone.tokenizer(DOC, add_special_tokens=False)["input_ids"]  # no BOS, as LLoCO
    x = torch.cat([ref_model.get_input_embeddings()(torch.tensor(ids)), table])
    with torch.no_grad():
        ref = ref_model(inputs_embeds=x[None], output_hidden_states=True).hidden_states[-1][0, -K:]
    with lloco.backbone.lock, torch.no_grad():
        torch.testing.assert_close(lloco.compressor.encode_segments([ids])[0], ref, atol=1e-5, rtol=1e-5)
    stored = lloco.compressor.compress(DOC)
    assert stored.dtype == torch.bfloat16 and stored.shape == (K, 64)
    torch.testing.assert_close(stored.float(), ref, atol=2e-2, rtol=1e-2)


def test_accumulate_matches_autocompressor_recurrence(checkpoints, lloco):
    """Reference: AutoCompressorMixin.forward with accumulate_summary, segment by segment, batch of 1."""
    comp = ContextCompressor.from_autocompressor(lloco.backbone, checkpoints["model"], segment_tokens=16)
    comp.config.store_dtype = "float32"
    ref_model, table = reference_model(checkpoints["model"]), summary_table(checkpoints["model"])
    tok = lloco.backbone.tokenizer
    docs = [DOC[:300], DOC[:90], DOC]  # several segments each, a short last one, different counts
    got = comp.compress(docs, batch_size=2, accumulate=True)
    for doc, vecs in zip(docs, got):
        ids = torch.tensor(tok(doc, add_special_tokens=False)["input_ids"])
        softprompt = torch.zeros(0, 64)
        for seg in torch.split(ids, 16):
            x = torch.cat([softprompt, ref_model.get_input_embeddings()(seg), table])
            with torch.no_grad():
                h = ref_model(inputs_embeds=x[None], output_hidden_states=True).hidden_states[-1][0]
            softprompt = torch.cat([softprompt, h[-K:]])
        torch.testing.assert_close(vecs, softprompt, atol=1e-4, rtol=1e-4)
    independent = comp.compress(DOC)
    torch.testing.assert_close(got[2][:K], independent[:K], atol=1e-4, rtol=1e-4)  # segment 0 sees nothing before
    assert not torch.allclose(got[2][K:], independent[K:], atol=1e-3)


def test_adapter_decoding_matches_merged_reference(checkpoints, lloco):
    """Reference: W + (alpha / r) * B @ A merged by hand, greedy decoding from [vectors, preset text]."""
    question = "Which room holds 21 lenses?"
    ans = lloco.answer(question, [DOC])
    vectors = lloco.vectors(ans.chunks)
    prompt = get_preset("qasper").text(question)
    assert prompt.startswith("You are just given an scientific article from above.") and prompt.endswith("\nAnswer:")
    tok = lloco.backbone.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ans.prompt_tokens == sum(v.shape[0] for v in vectors) + len(prompt_ids)  # no chat template, no BOS
    ref_model = reference_model(checkpoints["model"])
    x = torch.cat([*[v.float() for v in vectors], ref_model.get_input_embeddings()(torch.tensor(prompt_ids))])
    with torch.no_grad():
        unmerged = ref_model(inputs_embeds=x[None]).logits[0, -1]
    modules = dict(ref_model.named_modules())
    for key, a in checkpoints["adapter"].items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = checkpoints["adapter"][key.replace("lora_A", "lora_B")]
            modules[name].weight.data += 16 / 8 * b.float() @ a.float()
    out: list[int] = []
    with torch.no_grad():
        assert not torch.allclose(ref_model(inputs_embeds=x[None]).logits[0, -1], unmerged, atol=1e-2)
        for _ in range(64):
            nxt = int(ref_model(inputs_embeds=x[None]).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            x = torch.cat([x, ref_model.get_input_embeddings()(torch.tensor([nxt]))])
    assert out and ans.answer == tok.decode(out, skip_special_tokens=True).strip()


def test_accumulate_answer_uses_whole_document(checkpoints, lloco):
    ans = lloco.answer("Which room holds 21 lenses?", [DOC], accumulate=True)
    n_tokens = len(lloco.backbone.tokenizer(DOC, add_special_tokens=False)["input_ids"])
    assert ans.context_vectors == K * -(-n_tokens // 1536) and ans.source_tokens == n_tokens and ans.chunks == []


def _fake_hub_cache(cache: Path, repo: str, src: Path) -> None:
    """What `hf download` leaves in HF_HUB_CACHE: refs/main -> snapshots/<commit>/files."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(src, folder / "snapshots" / commit)


def test_hub_ids_load_from_the_cache(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    root = checkpoints["root"]
    _fake_hub_cache(tmp_path, "princeton-nlp/AutoCompressor-Llama-2-7b-6k", checkpoints["model"])
    _fake_hub_cache(tmp_path, "xiuyul/Lloco-7b-quality", root / "Lloco-7b-quality")
    _fake_hub_cache(tmp_path, "someone/pickled-only", root / "ac-bin")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    hubbed = LLoCO.from_pretrained("princeton-nlp/AutoCompressor-Llama-2-7b-6k", adapter="xiuyul/Lloco-7b-quality",
                                   device="cpu", prompt_preset=None)
    assert hubbed.adapter == "Lloco-7b-quality" and hubbed.compressor.config.summary_tokens == K
    with pytest.raises(ValueError, match="hub repo has no safetensors weights; download it with `hf download"):
        LLoCO.from_pretrained("someone/pickled-only", device="cpu")
    with pytest.raises(FileNotFoundError, match="no such local folder, and no usable copy"):
        LLoCO.from_pretrained("nobody/nothing", device="cpu")


def test_presets_layout_and_errors():
    q = quality_question("Where is the capital of France?", ["Berlin", "Paris", "London", "Tokyo"])
    quality = get_preset("quality")
    # LLoCO's one-shot example is itself a QuALITY prompt: ours must format it identically
    example = q + quality.suffix + "B. Paris"
    assert example in quality.prefix
    vec = torch.zeros(3, 8)
    pieces = quality.pieces([vec, vec], q)
    assert pieces[0] is vec and pieces[1] is vec and pieces[2] == quality.text(q)
    with pytest.raises(ValueError, match="quality_question"):
        quality.text("Where is the capital of France?")
    with pytest.raises(ValueError, match="unknown prompt preset 'squad'; choose one of quality, qasper"):
        get_preset("squad")
    assert {p.adapter for p in PRESETS.values()} == {f"xiuyul/Lloco-7b-{n}" for n in
                                                     ("quality", "qasper", "qmsum", "nqa", "hqa")}
    assert all(p.suffix.endswith(("Answer:", "Answer:\n")) for p in PRESETS.values())
