"""scripts/score.py: a saved LM head scored on a user's files, beside its anchor alone; bad input is one line."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _script():
    spec = importlib.util.spec_from_file_location("score_script", ROOT / "scripts" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved_lm_head(standin_paths, tmp_path_factory):
    """An untrained LM head over two stand-ins (Mistral anchor, Llama-3 source), saved."""
    from fusion_llm import FusionConfig, FusionModel

    backbones = [{"name": "mistral", "model": standin_paths["mistral"], "tap_layers": [2], "anchor": True,
                  "compute_dtype": "float32"},
                 {"name": "llama", "model": standin_paths["llama3"], "tap_layers": [2], "compute_dtype": "float32"}]
    model = FusionModel.from_config(FusionConfig(backbones=backbones, shared_width=32, head={"kind": "lm"}))
    path = tmp_path_factory.mktemp("score") / "head"
    model.save_pretrained(path)
    return path


def test_an_untrained_head_scores_like_its_anchor(saved_lm_head, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": t}) + "\n" for t in ("def f(x):\n    return x", "", "A tale.")))
    assert _script().main([str(saved_lm_head), str(text), str(rows), "--text-column", "body"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert table[str(rows)][0] == "2"  # the empty row is left out
    for cells in table.values():
        fused, anchor = map(float, cells[-2:])
        assert fused == pytest.approx(anchor, abs=2e-4) and 1.0 < fused < 30.0  # the residual starts at zero


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("column", "no column 'text'"),
    ("suffix", "give a .txt, .json or .jsonl file"),
    ("empty", "no text to score"),
    ("head", "no saved fusion head"),
])
def test_bad_input_is_one_line_and_exit_2(saved_lm_head, tmp_path, capsys, case, message):
    head, path = str(saved_lm_head), tmp_path / "x.jsonl"
    path.write_text(json.dumps({"body" if case == "column" else "text": "Some text."}) + "\n")
    if case == "missing":
        path = tmp_path / "absent.txt"
    elif case == "suffix":
        path = path.rename(tmp_path / "x.csv")
    elif case == "empty":
        path = tmp_path / "empty.txt"
        path.write_text("  \n")
    elif case == "head":
        head = str(tmp_path)
    assert _script().main([head, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("score: error:") and message in err and "\n" not in err
