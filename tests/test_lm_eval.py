"""An exported model under lm-evaluation-harness, on a task made from a local text (no hub access).

The tiny llama is compressed (svd, every linear at rank 8 in layer 1), exported, and evaluated by lm-eval's own
Hugging Face model type with `trust_remote_code`; its word perplexity must equal the one computed here from the
reloaded model's log-probabilities of the same documents.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from engine.cli import app
from engine.compression.session import CompressionSession
from engine.errors import RankScopeError
from engine.export import export_compressed
from engine.models.loading import load_model
from engine.texts.lm_eval_task import documents, write_task
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.tiny_models import TRAINING_TEXT


def test_documents_join_paragraphs_up_to_the_word_count():
    text = "a b c\n\nd e\n\nf g h i j k l\n\n\nm"
    assert documents(text, 5, 10) == ["a b c\n\nd e", "f g h i j", "k l\n\nm"]
    assert documents(text, 5, 2) == ["a b c\n\nd e", "f g h i j"]
    with pytest.raises(RankScopeError, match="at least one"):
        documents(text, 0, 3)
    with pytest.raises(RankScopeError, match="Task names"):
        write_task(text, __import__("pathlib").Path("/tmp"), "bad name")


@pytest.fixture(scope="module")
def export_dir(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    text = root / "text.txt"
    text.write_text(TRAINING_TEXT * 20)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSCOPE_CACHE", str(root / "cache"))
        from engine.store import open_store

        store = open_store()
        texts = TextSettings(str(text), Windowing(32, 8), 4, str(text), Windowing(32, 2))
        session = CompressionSession.open(store, load_model(str(tiny_model_dirs["llama"]), store), "svd", texts)
        plan = session.plan({s.path: 8 for s in session.shapes.linears if s.layer == 1})
        export_compressed(session, plan, root / "export", timing_runs=1, max_new_tokens=4)
        store.close()
    return root / "export"


def _expected_word_perplexity(export_dir, docs: list[str]) -> float:
    """exp(-Σ log p / Σ words), each document scored after the tokenizer's BOS as lm-eval's rolling windows do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total, words = 0.0, 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([[prefix, *ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs).logits[0, :-1].double(), -1)
        total += float(logprobs.gather(1, inputs[0, 1:, None]).sum())
        words += len(doc.split())
    return math.exp(-total / words)


def test_an_export_runs_under_lm_eval_on_a_local_task(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    source = tmp_path / "source.txt"
    source.write_text(TRAINING_TEXT)
    result = CliRunner().invoke(app, ["lm-eval-task", "--text", str(source), "--out", str(tmp_path / "task"),
                                      "--name", "tiny_text", "--words", "30", "--documents", "3", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["task"] == "tiny_text" and "--include_path" in written["command"]
    docs = [json.loads(line)["text"] for line in (tmp_path / "task" / "tiny_text.jsonl").read_text().splitlines()]
    assert len(docs) == 3

    out = simple_evaluate(model="hf", model_args=f"pretrained={export_dir},trust_remote_code=True",
                          tasks=["tiny_text"], task_manager=TaskManager(include_path=str(tmp_path / "task")),
                          device="cpu", batch_size=1)
    scores = out["results"]["tiny_text"]
    assert scores["word_perplexity,none"] == pytest.approx(_expected_word_perplexity(export_dir, docs), rel=1e-4)
    assert scores["bits_per_byte,none"] > 0
