"""Source predictions carried onto the anchor's vocabulary (`fusion_llm.vocab_bridge`): token bytes of the four
real tokenizers, the bridge against a brute-force computation of its definition, and what a certain source says."""

import json
import random

import pytest
import torch

from fusion_llm.vocab_bridge import VocabBridge, anchor_twins, less_next, token_bytes

from conftest import NEEDS_TOKENIZERS

pytestmark = NEEDS_TOKENIZERS
TEXT = "Shakespeare wrote: 'To be, or not to be'\n    def f(x):  return x**2  # 中文 😀 café\t done"


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    from fusion_llm.paths import FAMILIES, tokenizer_dir

    return {f: AutoTokenizer.from_pretrained(tokenizer_dir(f)) for f in FAMILIES}


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma2", "phi3"])
def test_token_bytes_spell_the_text(tokenizers, family):
    tokenizer = tokenizers[family]
    table = token_bytes(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    spelled = b"".join(table[i] for i in ids)
    # SentencePiece tokenizers add a dummy space before the first word
    assert spelled in (TEXT.encode(), b" " + TEXT.encode()), spelled[:40]
    assert all(table[i] is None for i in tokenizer.all_special_ids)


def anchor_cut(anchor, ab, b):
    """A tokenizer's first token of its own tokenization of ``b`` after a line break, if its tokens spell ``b``
    (``ab``: its token bytes)."""
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    ids = anchor.encode("\n" + text, add_special_tokens=False)
    pieces = [ab[i] or b"" for i in ids]
    for n in range(1, len(pieces)):  # the tokens before n spell the line break (and a dummy space)
        if b"".join(pieces[:n]).strip(b" ") == b"\n" and b"".join(pieces[n:]) == b:
            return ids[n]
    return None


def reference(bridge, source, anchor, source_lp, anchor_lp, v):
    """log p(v) of the module docstring, computed by brute force over the vocabularies."""
    sb = token_bytes(source) + [None] * (bridge.source_size - len(source))
    ab = token_bytes(anchor) + [None] * (bridge.anchor_size - len(anchor))
    hidden = anchor_twins(anchor, ab)  # never emitted for their bytes (another token with the same bytes is)
    ab = [None if w in hidden else c for w, c in enumerate(ab)]

    def source_first(w):  # the source's first token for anchor token w's bytes
        cut = anchor_cut(source, sb, ab[w])
        if cut is None:
            spelled = [x for x, c in enumerate(sb) if c and ab[w].startswith(c)]
            cut = max(spelled, key=lambda x: (len(sb[x]), -x)) if spelled else None
        return cut

    top = source_lp.topk(bridge.top_k + 1)
    probs = top.values.double().exp()
    probs = probs[:-1] - probs[-1]  # each of the top-k less the next one down
    p_anchor = anchor_lp.double().exp()
    rest = 1.0 - float(probs.sum())
    total = 0.0
    for u, p in zip(top.indices[:-1].tolist(), probs.tolist()):
        b = sb[u]
        spelled = [w for w, c in enumerate(ab) if c and b and b.startswith(c)]
        if not spelled:
            rest += p
            continue
        first = anchor_cut(anchor, ab, b)
        if first is None:  # the anchor's own tokens do not spell u: the longest; the lowest id among equal bytes
            first = max(spelled, key=lambda w: (len(ab[w]), -w))
        extended = [w for w, c in enumerate(ab) if c and c.startswith(b)] if ab[first] == b else []
        extended = [w for w in extended if w == first or source_first(w) == u]  # the source would start w with u
        if 1 < len(extended) <= bridge.max_extensions:
            total += p * p_anchor[v] / sum(p_anchor[w] for w in extended) if v in extended else 0.0
        elif v == first:
            total += p
    return float(torch.log(total + max(rest, bridge.min_rest) * p_anchor[v]))


def test_bridge_matches_its_definition(tokenizers):
    source, anchor = tokenizers["phi3"], tokenizers["mistral"]
    bridge = VocabBridge(source, anchor, top_k=64, max_extensions=256)
    torch.manual_seed(0)
    source_lp = (3 * torch.randn(2, bridge.source_size)).log_softmax(-1)
    anchor_lp = (3 * torch.randn(2, bridge.anchor_size)).log_softmax(-1)
    got = bridge.log_probs(source_lp, anchor_lp)
    assert got.shape == (2, bridge.anchor_size) and torch.isfinite(got).all()
    assert got.exp().sum(-1).sub(1).abs().max() < 0.05  # a distribution (up to the rest floor and special tokens)
    rng = random.Random(0)
    words = [anchor.convert_tokens_to_ids(t) for t in ("▁the", "▁theory", "s", "▁")]
    picks = words + rng.sample(range(300, bridge.anchor_size - 800), 6)
    for row in (0, 1):  # each row's mass lands in its own row
        for v in picks:
            assert got[row, v].item() == pytest.approx(
                reference(bridge, source, anchor, source_lp[row], anchor_lp[row], v), abs=1e-4), \
                (row, anchor.convert_ids_to_tokens(v))
    special = anchor.bos_token_id
    assert got[0, special] == anchor_lp[0, special]  # no bytes: the anchor's own


@pytest.mark.parametrize("k", [64, 4096])
def test_the_sorted_and_the_dense_sums_agree(tokenizers, k):
    """`sparse_correction` sums the mass landing on one anchor token by sorting the entries' keys or in a dense
    scratch a few rows at a time (the default for a wide top-k): the same keys, the same values."""
    source, anchor = tokenizers["llama3"], tokenizers["mistral"]
    bridge = VocabBridge(source, anchor)
    torch.manual_seed(1)
    source_lp = (3 * torch.randn(5, bridge.source_size)).log_softmax(-1)
    anchor_logits = 3 * torch.randn(5, bridge.anchor_size)
    top, ids = less_next(*source_lp.topk(k + 1, -1), k)
    lse = torch.logsumexp(anchor_logits, -1)
    sorted_keys, sorted_values = bridge.sparse_correction(top, ids, anchor_logits, lse, dense=False)
    dense_keys, dense_values = bridge.sparse_correction(top, ids, anchor_logits, lse, dense=True, rows=2)
    assert sorted_keys.numel() > 5 * k // 2
    assert torch.equal(sorted_keys, dense_keys)
    torch.testing.assert_close(sorted_values, dense_values, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mistral_bridges():
    """Bridges onto Mistral, built once per module (a 262k-token source takes ~10 s)."""
    return {}


@pytest.mark.parametrize("family", ["llama3", "gemma2"])
@pytest.mark.parametrize("word, cut", [(" theory", "▁theory"), (" bishop", "▁b"), (",", ","), (" rebels", "▁reb"),
                                       (" the", "▁the")])
def test_a_certain_source_puts_its_mass_where_the_anchor_would_cut(tokenizers, mistral_bridges, family, word, cut):
    """Where Mistral's own tokenizer cuts: " bishop" starts with "▁b" ("▁bis" is the longest token it starts with,
    but BPE does not emit it there), "," is token 29493, not its byte-fallback twin "<0x2C>" (same bytes), and a
    source sure of " the" says the word is not " them" or " there" (it spells those as one token itself)."""
    source, anchor = tokenizers[family], tokenizers["mistral"]
    assert anchor("a" + word, add_special_tokens=False)["input_ids"][1] == anchor.convert_tokens_to_ids(cut)
    if family not in mistral_bridges:
        mistral_bridges[family] = VocabBridge(source, anchor)
    bridge = mistral_bridges[family]
    (u,) = source(word, add_special_tokens=False)["input_ids"][-1:]
    assert source.convert_ids_to_tokens(u).replace("Ġ", "▁").lstrip("▁") == word.strip()
    source_lp = torch.full((1, bridge.source_size), -50.0)
    source_lp[0, u] = 0.0
    anchor_lp = torch.full((1, bridge.anchor_size), -float(torch.log(torch.tensor(bridge.anchor_size))))
    mapped = bridge.log_probs(source_lp.log_softmax(-1), anchor_lp).exp()[0]
    # "," may still merge with a line end the source does not spell ("\r"): shared by the anchor's (flat) belief
    assert mapped[anchor.convert_tokens_to_ids(cut)] > (0.45 if word == "," else 0.9), cut
    for other in ("▁cat", "<0x2C>", "▁bis", "▁them", "▁there"):  # " cat" disagrees; the anchor never emits the rest
        assert mapped[anchor.convert_tokens_to_ids(other)] < 1e-6, other


def test_near_ties_at_the_edge_of_the_top_k_do_not_move_the_bridged_distribution(tokenizers):
    """Rounding that swaps the k-th and (k+1)-th source tokens (a batch vs its rows run alone) moves almost no
    mass: each kept token counts less the next one's probability, so the edge carries none. A hard top-k moves
    the edge token's whole probability."""
    source, anchor = tokenizers["phi3"], tokenizers["mistral"]
    bridge = VocabBridge(source, anchor, top_k=4)  # few kept tokens: the edge one carries real mass
    torch.manual_seed(0)
    logits = 3 * torch.randn(1, bridge.source_size)
    anchor_lp = (3 * torch.randn(1, bridge.anchor_size)).log_softmax(-1)
    order = logits[0].argsort(descending=True)
    kth, next_ = order[bridge.top_k - 1], order[bridge.top_k]
    logits[0, next_] = logits[0, kth] - 1e-6  # a near tie at the edge
    swapped = logits.clone()
    swapped[0, next_], swapped[0, kth] = logits[0, kth], logits[0, next_]  # the other one is now inside

    def moved(a, b):  # total variation distance of two bridged distributions
        return float((a.double().exp() - b.double().exp()).abs().sum() / 2)

    soft = moved(bridge.log_probs(logits.log_softmax(-1), anchor_lp), bridge.log_probs(swapped.log_softmax(-1), anchor_lp))
    edge = float(logits.log_softmax(-1)[0, kth].exp())
    assert soft < 1e-6 < 0.01 < edge
    hard = [anchor_lp + bridge.correction(*lp.topk(bridge.top_k), anchor_lp)
            for lp in (logits.log_softmax(-1), swapped.log_softmax(-1))]
    assert moved(hard[0].log_softmax(-1), hard[1].log_softmax(-1)) > edge / 4


def test_fast_logsumexp_equals_torchs_on_wide_logits():
    """The clamped `logsumexp` gives torch's value on logits spanning hundreds of nats, where most terms fall
    below float32's normal range, on rows with some or only ``-inf``, and at a single finite logit."""
    from fusion_llm.output_loss import logsumexp

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50_000, generator=gen) * 60
    x[1, 10:] = float("-inf")
    x[2] = float("-inf")
    x[3, 1:] = float("-inf")
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, -1))
    assert logsumexp(x)[2] == float("-inf") and logsumexp(x)[3] == x[3, 0]
    torch.testing.assert_close(logsumexp(x.T, dim=0), torch.logsumexp(x, -1))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_top_log_probs_equal_the_full_logits_path(softcap):
    """`top_log_probs` through a plain output layer goes a chunk of rows at a time with its own backward; a wrapped
    layer takes the plain path over the full logits: the same top-k, log-probabilities, entropy and gradients."""
    import types

    from fusion_llm.vocab_bridge import top_log_probs

    class Wrapped(torch.nn.Linear):  # not exactly nn.Linear: the plain path
        pass

    torch.manual_seed(0)
    n, h, v, k = 150, 16, 500, 7  # 150 rows: three chunks, the last one short
    plain, wrapped = torch.nn.Linear(h, v), Wrapped(h, v)
    wrapped.load_state_dict(plain.state_dict())
    norm = torch.nn.LayerNorm(h)
    x = torch.randn(n, h, requires_grad=True)
    out = {}
    for name, head in (("chunked", plain), ("full", wrapped)):
        backbone = types.SimpleNamespace(lm_head=head, final_norm=norm, logit_softcap=softcap)
        backbone.lm_logits = lambda hid, b=backbone: (lambda z: torch.tanh(z / softcap) * softcap if softcap else z)(
            b.lm_head(b.final_norm(hid)))
        top, ids, entropy = top_log_probs(backbone, x, k)
        weights = torch.linspace(0.5, 1.5, k)
        (top.clamp_min(-30) * weights).sum().add(entropy.sum()).backward()
        out[name] = (top, ids, entropy, x.grad.clone())
        x.grad = None
    for a, b in zip(out["chunked"], out["full"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # scoring: no gradient work, the same values
        top, _, _ = top_log_probs(types.SimpleNamespace(lm_head=plain, final_norm=norm, logit_softcap=softcap), x, k)
    torch.testing.assert_close(top, out["full"][0], rtol=1e-4, atol=1e-5)


def test_bridge_tables_kept_on_disk_are_read_back_and_a_damaged_file_is_rebuilt(tokenizers, tmp_path, monkeypatch):
    """`bridge_for` keeps a pair's tokenizer tables in ``$FUSION_LLM_CACHE/bridges``: a second process reads them
    and builds the same bridge; a damaged file is computed again and rewritten whole."""
    from types import SimpleNamespace

    from fusion_llm import vocab_bridge

    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(vocab_bridge, "_BRIDGES", {})

    def member(family, fingerprint):
        tok = tokenizers[family]
        return SimpleNamespace(tokenizer=tok, fingerprint={"tokenizer": fingerprint},
                               lm_head=SimpleNamespace(weight=torch.empty(len(tok), 0)))

    source, anchor = member("phi3", "p" * 16), member("mistral", "m" * 16)
    built = vocab_bridge.bridge_for(source, anchor)
    (stored,) = (tmp_path / "bridges").iterdir()
    monkeypatch.setattr(vocab_bridge, "_BRIDGES", {})  # a new process
    monkeypatch.setattr(vocab_bridge, "anchor_first_tokens", None)  # it must not tokenize again
    read = vocab_bridge.bridge_for(source, anchor)
    assert torch.equal(read.first_anchor, built.first_anchor)
    assert torch.equal(read.extension_ids, built.extension_ids)
    monkeypatch.undo()
    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(vocab_bridge, "_BRIDGES", {})
    stored.write_text(stored.read_text()[:1000])  # cut short
    again = vocab_bridge.bridge_for(source, anchor)
    assert torch.equal(again.first_anchor, built.first_anchor)
    assert json.loads(stored.read_text()) == built.tables
