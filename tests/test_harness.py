"""lm-evaluation-harness adapter (`fusion_llm.harness.FusedLM`), the local fusion_continuation task and
scripts/lm_harness.py, on float32 stand-ins (offline, CPU): an untrained head scores exactly like its anchor's
own HF model, continuation scores are causal, rolling scores are score_fused's, generate_until is generate
cut at the stop strings, simple_evaluate runs end to end, bad input is one line and exit 2."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PAIRS = [
    ("The cat sat on the", " mat, and then it slept."),
    ("Hello world, ", "1234 cats!"),  # trailing space: it moves onto the continuation
    ("def f(x):\n    ", "return x  # done"),
    ("", "An empty context: the continuation follows BOS."),
    ("Shall I compare thee", " to a summer's day? 中文 😀"),
]


def _instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def backbones(standin_paths):
    """Mistral anchor (SentencePiece), Llama-3 (byte-level BPE) and Phi-3 sources, float32, unquantized:
    position-wise comparisons can then be exact."""
    from fusion_llm.modeling import FusionModel

    return FusionModel.load_backbones(_config(standin_paths))


def _config(paths):
    from fusion_llm.config import FusionConfig

    backbones = [{"name": n, "model": paths[f], "tap_layers": [2, -1], "compute_dtype": "float32",
                  "quantization": "none", "anchor": n == "mistral"}
                 for n, f in (("mistral", "mistral"), ("llama", "llama3"), ("phi", "phi3"))]
    return FusionConfig(backbones=backbones, shared_width=32, head={"kind": "lm"}, fusion={"method": "attention"})


@pytest.fixture(scope="module")
def untrained(standin_paths, backbones):
    from fusion_llm.modeling import FusionModel

    torch.manual_seed(0)
    return FusionModel(_config(standin_paths), backbones)


@pytest.fixture(scope="module")
def trained(standin_paths, backbones):
    """A head with random (non-zero) weights: the sources' features move the logits."""
    from fusion_llm.modeling import FusionModel

    torch.manual_seed(1)
    model = FusionModel(_config(standin_paths), backbones)
    with torch.no_grad():
        model.head.residual.out.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def anchor_hf(standin_paths):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(standin_paths["mistral"], dtype=torch.float32)
    return model.eval()


def _anchor_scores(hf, tokenizer, text, first, windows=None):
    """Per-token log-probs of tokens ``first ..`` of ``text`` under the anchor's own HF model (with windows:
    ``(start, end, n)`` token ranges as `plan_windows` gives)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    windows = windows or [(0, len(ids), len(ids) - first)]
    out, greedy = [], []
    with torch.no_grad():
        for s, e, n in windows:
            logits = hf(input_ids=torch.tensor([ids[s:e]])).logits[0].float()
            scores = torch.log_softmax(logits[e - s - n - 1:e - s - 1], -1)
            target = torch.tensor(ids[e - n:e])
            out += scores.gather(-1, target[:, None])[:, 0].tolist()
            greedy += (scores.argmax(-1) == target).tolist()
    return out, greedy


def test_untrained_head_scores_continuations_like_the_anchors_own_model(untrained, anchor_hf):
    from fusion_llm.harness import FusedLM

    lm = FusedLM(untrained, batch_size=3)
    got = lm.loglikelihood([_instance("loglikelihood", p) for p in PAIRS])
    tok = untrained.anchor.tokenizer
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        moved = context.rstrip()  # the harness's convention: trailing whitespace belongs to the continuation
        first = len(tok(moved)["input_ids"]) if moved else 1
        expected, argmax = _anchor_scores(anchor_hf, tok, context + continuation, first)
        assert len(expected) > 0
        assert logprob == pytest.approx(sum(expected), abs=1e-4) and greedy == all(argmax)
    # the trailing space of "Hello world, " is scored as part of the continuation, as HFLM does
    assert lm._pair("Hello world, ", "1234")[3] == len(tok("Hello world,")["input_ids"])


def test_loglikelihood_equals_the_harness_own_hflm_on_the_anchor(untrained, standin_paths):
    """lm_eval's HFLM over the anchor's checkpoint (BOS added, as training adds it) gives the same answers."""
    from lm_eval.models.huggingface import HFLM

    from fusion_llm.harness import FusedLM

    reference = HFLM(pretrained=standin_paths["mistral"], dtype="float32", add_bos_token=True, batch_size=2,
                     device="cpu")
    requests = [_instance("loglikelihood", p) for p in PAIRS]
    for (ours, greedy), (theirs, their_greedy) in zip(FusedLM(untrained).loglikelihood(requests),
                                                      reference.loglikelihood(requests)):
        assert ours == pytest.approx(theirs, abs=1e-4) and greedy == their_greedy


def test_windows_longer_than_the_anchor_match_the_anchor_on_the_same_windows(untrained, anchor_hf):
    from fusion_llm.harness import FusedLM, plan_windows

    lm = FusedLM(untrained, batch_size=4, max_length=9)
    text = "Rolling windows: every token after BOS is predicted exactly once, with as much context as fits."
    ids = untrained.anchor.tokenizer(text)["input_ids"]
    windows = plan_windows(len(ids), 1, 9)
    assert len(windows) >= 3 and sum(n for *_, n in windows) == len(ids) - 1
    assert all(e - s <= 9 for s, e, _ in windows) and windows[-1][1] - windows[-1][0] == 9
    (rolling,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    expected, _ = _anchor_scores(anchor_hf, untrained.anchor.tokenizer, text, 1, windows)
    assert rolling == pytest.approx(sum(expected), abs=1e-4)
    # a continuation longer than a window is scored whole, in windows too
    context, continuation = text[:20], text[20:]
    (logprob, _), = lm.loglikelihood([_instance("loglikelihood", (context, continuation))])
    first = len(untrained.anchor.tokenizer(context)["input_ids"])
    expected, _ = _anchor_scores(anchor_hf, untrained.anchor.tokenizer, text, first,
                                 plan_windows(len(ids), first, 9))
    assert logprob == pytest.approx(sum(expected), abs=1e-4)


def test_continuation_scores_are_causal(trained, untrained):
    """The continuation's tokens score the same whatever text follows them."""
    from fusion_llm.harness import FusedLM

    lm = FusedLM(trained, batch_size=4)
    cases = [("The cat sat on the", " mat.", " Then it slept by the fire, dreaming of fish."),
             ("def f(x):", "\n    return x", " + 1  # one more, after the end"),
             ("Shall I compare thee ", "to a summer's", " day? Thou art more lovely.")]
    short = [lm._pair(c, k) for c, k, _ in cases]
    long = [lm._pair(c, k + more) for c, k, more in cases]
    scores_short = lm.token_logprobs(short)
    scores_long = lm.token_logprobs(long)
    for (_, ids_s, _, first), (_, ids_l, _, _), (lp_s, _), (lp_l, _) in zip(short, long, scores_short, scores_long):
        k = len(ids_s) - first
        assert ids_l[: len(ids_s)] == ids_s and k > 0
        assert lp_l[:k] == pytest.approx(lp_s, abs=1e-4)
    pairs = lm.loglikelihood([_instance("loglikelihood", (c, k)) for c, k, _ in cases])
    assert [p[0] for p in pairs] == pytest.approx([sum(lp) for lp, _ in scores_short], abs=1e-5)
    # the trained head is not the anchor: the sources' features do move the scores
    plain = FusedLM(untrained).loglikelihood([_instance("loglikelihood", (c, k)) for c, k, _ in cases])
    assert max(abs(a[0] - b[0]) for a, b in zip(pairs, plain)) > 1e-2


def test_rolling_loglikelihood_is_minus_score_fused_nll(trained):
    from fusion_llm.harness import FusedLM
    from fusion_llm.scoring import score_fused

    texts = ["Thou art more lovely and more temperate.", "def add(a, b):\n    return a + b\n", "x"]
    rolling = FusedLM(trained, batch_size=2).loglikelihood_rolling(
        [_instance("loglikelihood_rolling", (t,)) for t in texts])
    for text, value in zip(texts, rolling):
        assert value == pytest.approx(-score_fused(trained, [text]).nll, abs=1e-4)


def test_generate_until_is_generate_cut_at_the_stop_strings(trained):
    from fusion_llm.harness import FusedLM

    prompts = ["The quick brown fox", "def add(a, b):\n    return"]
    full = trained.generate(prompts, max_new_tokens=10)
    tok = trained.anchor.tokenizer
    lm = FusedLM(trained, batch_size=2)
    for i, prompt in enumerate(prompts):
        text = full.texts[i]
        assert len(text) > 6
        token = tok.decode([full.new_tokens[i][3]])  # maybe a single-token stop: decoding may stop early
        for until in ([text[4:6]], [token] if token.strip() else ["\x00"], ["\x00never"]):
            cut = text
            for u in until:
                cut = cut.split(u)[0]
            request = _instance("generate_until", (prompt, {"until": until, "max_gen_toks": 10}))
            assert lm.generate_until([request]) == [cut], (prompt, until)
    # batched: the same as generate's own batch, cut
    requests = [_instance("generate_until", (p, {"until": ["\x00"], "max_gen_toks": 10})) for p in prompts]
    assert lm.generate_until(requests) == full.texts


def test_generate_until_decodes_in_full_when_an_early_stop_token_brought_no_stop_string(trained, monkeypatch):
    """An ``until`` string that is one anchor token also stops decoding; should that token's text not hold the
    string, the row is decoded again without it (the result is always generate's text cut at the string)."""
    from fusion_llm.generation import GenerationOutput
    from fusion_llm.harness import FusedLM

    tok = trained.anchor.tokenizer
    until = next(u for u in ("the", ".", "a") if len(tok.encode(u, add_special_tokens=False)) == 1)
    early = tok.encode(until, add_special_tokens=False)[0]
    calls = []

    def fake_generate(prompts, stop_tokens=None, **kwargs):
        calls.append(sorted(stop_tokens))
        if early in stop_tokens:  # stopped on the token, yet its text has no stop string
            return GenerationOutput(None, [[7, early]], ["ab"])
        return GenerationOutput(None, [[7, 8, 9]], [f"ab{until}cd"])

    monkeypatch.setattr(trained, "generate", fake_generate)
    request = _instance("generate_until", ("Prompt", {"until": [until], "max_gen_toks": 5}))
    assert FusedLM(trained).generate_until([request]) == ["ab"]
    assert len(calls) == 2 and early in calls[0] and early not in calls[1]


def test_continuation_task_is_deterministic_from_the_test_split(small_corpora, tmp_path):
    from fusion_llm.data.continuation import CHOICES, TASK, build_continuation_tasks

    a = build_continuation_tasks(n=6, seed=3, out_dir=tmp_path / "a")
    b = build_continuation_tasks(n=6, seed=3, out_dir=tmp_path / "b")
    for domain in ("shakespeare", "code", "prose"):
        rows = [json.loads(x) for x in (a / f"{domain}.jsonl").read_text().splitlines()]
        assert (a / f"{domain}.jsonl").read_text() == (b / f"{domain}.jsonl").read_text()
        assert 0 < len(rows) <= 6
        test_text = (small_corpora / domain / "test.jsonl").read_text()
        for row in rows:
            assert len(set(row["choices"])) == CHOICES and 0 <= row["label"] < CHOICES
            true = row["choices"][row["label"]]
            assert true[0].isspace() and not row["context"][-1].isspace()
            assert json.dumps(row["context"] + true, ensure_ascii=False)[1:-1] in test_text  # held-out text
        assert (a / f"{TASK}_{domain}.yaml").is_file()
    assert (a / f"{TASK}.yaml").is_file()


def test_simple_evaluate_runs_on_the_local_task(untrained, small_corpora, tmp_path):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from fusion_llm.data.continuation import build_continuation_tasks
    from fusion_llm.harness import FusedLM

    assert get_model("fusion_llm") is FusedLM  # model="fusion_llm", model_args="head=PATH" reaches it
    folder = build_continuation_tasks(n=8, seed=0, out_dir=tmp_path / "task")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    results = lm_eval.simple_evaluate(model=FusedLM(untrained, batch_size=8), tasks=["fusion_continuation"],
                                      limit=3, task_manager=manager, log_samples=False)
    table = results["results"]
    for name in ("fusion_continuation_shakespeare", "fusion_continuation_code", "fusion_continuation_prose"):
        assert 0.0 <= table[name]["acc,none"] <= 1.0 and 0.0 <= table[name]["acc_norm,none"] <= 1.0
    assert 0.0 <= results["groups"]["fusion_continuation"]["acc,none"] <= 1.0


def test_continuation_accuracy_of_a_member_alone_equals_hflm_on_its_model_with_fresh_lora(backbones, small_corpora,
                                                                                        standin_paths, tmp_path):
    """The two paths the LM tracks score the task through: FusedLM over a member alone (zero residual) and lm_eval's
    HFLM over a peft model (LoRA at init changes nothing) give the same accuracy, per domain and overall."""
    from lm_eval.models.huggingface import HFLM
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fusion_llm.harness import FusedLM, alone_model, continuation_accuracy

    anchor = backbones["mistral"]
    ours = continuation_accuracy(FusedLM(alone_model(anchor)), n=6, folder=tmp_path / "task")
    model = AutoModelForCausalLM.from_pretrained(standin_paths["mistral"], dtype=torch.float32).eval()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    theirs = continuation_accuracy(HFLM(pretrained=peft_model, tokenizer=anchor.tokenizer, add_bos_token=True,
                                        batch_size=4, device="cpu"), n=6, folder=tmp_path / "task")
    assert ours["items"] == theirs["items"] and 0 < sum(ours["items"].values()) <= 18
    for metric in ("acc", "acc_norm"):
        assert ours[metric] == pytest.approx(theirs[metric])
        total = sum(ours[metric][d] * n for d, n in ours["items"].items()) / sum(ours["items"].values())
        assert ours[metric]["all"] == pytest.approx(total)


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "lm_harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case, message", [("missing", "no saved fusion head"),
                                           ("task", "unknown task 'fusion_continuation_poetry'")])
def test_evaluate_script_bad_input_is_one_line_and_exit_2(untrained, small_corpora, tmp_path, monkeypatch, capsys,
                                                          case, message):
    from fusion_llm.data import continuation

    monkeypatch.setattr(continuation, "task_dir", lambda: tmp_path / "task")
    head = tmp_path / "absent"
    if case == "task":
        untrained.save_pretrained(head)
        capsys.readouterr()  # the progress bar of save_pretrained
    tasks = "fusion_continuation_poetry" if case == "task" else "fusion_continuation"
    assert _script().main(["--head", str(head), "--tasks", tasks]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm_harness: error:") and message in err and "\n" not in err


def test_evaluate_script_anchor_only_prints_the_table(untrained, small_corpora, tmp_path, monkeypatch, capsys):
    from fusion_llm.data import continuation

    monkeypatch.setattr(continuation, "task_dir", lambda: tmp_path / "task")
    untrained.save_pretrained(tmp_path / "head")
    out = tmp_path / "results.json"
    assert _script().main(["--head", str(tmp_path / "head"), "--tasks", "fusion_continuation_code", "--limit", "2",
                           "--anchor-only", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "anchor alone" in printed and "fusion_continuation_code" in printed and "acc" in printed
    assert 0.0 <= json.loads(out.read_text())["results"]["fusion_continuation_code"]["acc,none"] <= 1.0
