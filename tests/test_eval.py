"""Evaluation: metrics on hand-computed cases, prompt building per mode, tiny end-to-end runs, the CLI."""

from __future__ import annotations

import json
from math import comb

import pytest
import torch

from lloco_index.cli import SAMPLES, main
from lloco_index.data import QAExample, read_qa
from lloco_index.eval import (DevSetConfig, compare_reports, evaluate_qa, make_dev_set, markdown_table, plot_niah,
                              run_niah)
from lloco_index.eval.contexts import PromptBuilder
from lloco_index.eval.metrics import (choice_correct, contains_answer, exact_match, gold_choice, needle_score,
                                      normalize_answer, predicted_choice, token_f1)
from lloco_index.eval.niah import DEFAULT_NEEDLE, Haystack, load_haystack
from lloco_index.generation import GenerationConfig
from lloco_index.prompts import question_text

MUSEUM = (SAMPLES / "lighthouse_museum.txt").read_text()
GEN = GenerationConfig(max_new_tokens=4)
EXAMPLES = [
    QAExample("cat", [MUSEUM[:700], "The museum cat is called Biscuit."], "What is the museum cat called?", ["Biscuit"]),
    QAExample("pick", [MUSEUM[:400]], "Which animal lives in the museum?", ["cat"], choices=["dog", "cat", "owl"]),
    QAExample("none", ["Nothing to see here."], "Who founded the museum?", ["Miriam Okafor"]),
]


# -- metrics ---------------------------------------------------------------------------------------
def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Cat, sat!\n") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("the Biscuit.", ["biscuit"]) == 1.0
    assert exact_match("Biscuit the cat", ["biscuit"]) == 0.0
    assert exact_match("Oslo", ["Rome", "oslo"]) == 1.0


def test_token_f1_hand_computed():
    # pred "cat sat on mat" (4 tokens) vs gold "cat on mat" (3): 3 common, P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(6 / 7)
    # pred "1 2 2" vs gold "2 2 3": common {2: 2} -> P = R = 2/3
    assert token_f1("1 2 2", ["2 2 3"]) == pytest.approx(2 / 3)
    assert token_f1("blue", ["red", "blue sky"]) == pytest.approx(2 / 3)  # best of the golds: P 1, R 1/2
    assert token_f1("", ["x"]) == 0.0 and token_f1("the", ["a"]) == 1.0  # both normalise to nothing


def test_contains_answer_whole_words():
    assert contains_answer("I think it was Miriam Okafor, in 1901.", ["miriam okafor"]) == 1.0
    assert contains_answer("Okaforville", ["Okafor"]) == 0.0
    assert contains_answer("anything", [""]) == 0.0


def test_multiple_choice():
    choices = ["Rome", "Paris", "Oslo"]
    for pred, idx in [("B", 1), ("(b)", 1), ("C. Oslo", 2), ("A) Rome", 0), ("It is Paris.", 1),
                      ("A town near Oslo", 2), ("D", None), ("Rome or Paris", None), ("", None)]:
        assert predicted_choice(pred, choices) == idx, pred
    assert gold_choice(choices, ["paris"]) == 1 and gold_choice(choices, ["c"]) == 2
    assert choice_correct("B", choices, ["Paris"]) == 1.0 and choice_correct("Oslo", choices, ["Paris"]) == 0.0
    with pytest.raises(ValueError, match="none of the answers"):
        gold_choice(choices, ["Berlin"])
    assert question_text(" Capital? ", choices) == (
        "Capital?\nA. Rome\nB. Paris\nC. Oslo\nAnswer with the letter of the correct option.")
    assert question_text("Capital?") == "Capital?"


def test_needle_score():
    expect = ["sandwich", "Dolores Park"]
    assert needle_score("Eat a Sandwich in dolores park.", expect) == 10
    assert needle_score("Eat a sandwich.", expect) == 5
    assert needle_score("Visit the bridge.", expect) == 1


# -- prompts per mode ------------------------------------------------------------------------------
def test_modes_share_chunks_and_layout(tiny_lloco):
    q, docs = "What is the museum cat called?", [MUSEUM[:700], "The museum cat is called Biscuit."]
    rag = PromptBuilder(tiny_lloco, "rag", top_k=2).build([(q, docs)])[0]
    comp = PromptBuilder(tiny_lloco, "lloco", top_k=2).build([(q, docs)])[0]
    whole = PromptBuilder(tiny_lloco, "lloco").build([(q, docs)])[0]
    none = PromptBuilder(tiny_lloco, "none").build([(q, docs)])[0]
    n_chunks = sum(len(tiny_lloco.chunk(d)) for d in docs)
    assert rag.chunks == comp.chunks and len(rag.chunks) == 2 and rag.chunks == sorted(rag.chunks)
    texts = texts_all = [c.text for d in docs for c in tiny_lloco.chunk(d)]
    assert any("cat" in texts[i] for i in rag.chunks)  # BM25 finds the chunk that names the cat
    assert whole.chunks == list(range(n_chunks)) and whole.source_tokens == whole.document_tokens
    vec = [p for p in comp.pieces if isinstance(p, torch.Tensor)]
    assert [v.shape[0] for v in vec] == [4, 4] and not any(isinstance(p, torch.Tensor) for p in rag.pieces)
    assert comp.source_tokens == rag.source_tokens > 0 and none.source_tokens == 0
    # one layout: putting the chunk texts where the vectors are gives the rag prompt exactly
    texts = iter([c.text for d in docs for c in tiny_lloco.chunk(d)][i] for i in comp.chunks)
    assert "".join(p if isinstance(p, str) else next(texts) for p in comp.pieces) == "".join(rag.pieces)
    expanded = PromptBuilder(tiny_lloco, "lloco", expand=1).build([(q, docs)])[0]
    last = expanded.chunks[-1]  # the re-expanded chunk goes after the vectors, as LLoCO.answer puts it
    assert "cat" in texts_all[last] and sorted(expanded.chunks) == whole.chunks
    assert [p for p in expanded.pieces if isinstance(p, str) and texts_all[last] in p]


def test_lloco_top_k_mode_is_what_answer_top_k_does(tiny_lloco):
    """docs/quality.md reports `lloco eval qa --mode lloco --top-k K` as `LLoCO.answer(..., top_k=K)`: same chunks,
    same prompt, same answer."""
    q, docs = "What is the museum cat called?", [MUSEUM[:700], "The museum cat is called Biscuit."]
    cfg = GenerationConfig(max_new_tokens=4)
    built = PromptBuilder(tiny_lloco, "lloco", top_k=2).build([(q, docs)])[0]
    answer = tiny_lloco.answer(q, docs, config=cfg, top_k=2)
    keys = tiny_lloco.compress_texts([c.text for d in docs for c in tiny_lloco.chunk(d)])
    assert [keys[i] for i in built.chunks] == answer.chunks
    assert built.positions == answer.prompt_tokens
    assert tiny_lloco.generator.generate([built.pieces], cfg, tiny_lloco.adapter)[0].text.strip() == answer.answer


def test_full_mode_truncates_the_middle_or_refuses(tiny_lloco):
    long_doc = " ".join(f"Sentence {i} is here." for i in range(400))  # far beyond the 1024-position window
    cut = PromptBuilder(tiny_lloco, "full", max_new_tokens=8).build([("Which sentence?", [long_doc])])[0]
    assert cut.truncated and cut.fits and cut.positions + 8 <= tiny_lloco.backbone.context_window
    text = next(p for p in cut.pieces if isinstance(p, str) and "Sentence 0 " in p)
    assert "Sentence 399 is here." in text and "Sentence 200 " not in text
    assert cut.source_tokens < cut.document_tokens
    kept = PromptBuilder(tiny_lloco, "full", truncate=False).build([("Which sentence?", [long_doc])])[0]
    assert not kept.fits and not kept.truncated and kept.positions > tiny_lloco.backbone.context_window
    with pytest.raises(ValueError, match="--top-k applies to the lloco and rag modes"):
        PromptBuilder(tiny_lloco, "full", top_k=3)


# -- QA end to end ---------------------------------------------------------------------------------
def test_evaluate_qa_all_modes(tiny_lloco):
    reports = {m: evaluate_qa(tiny_lloco, EXAMPLES, mode=m, config=GEN, batch_size=2)
               for m in ("lloco", "full", "rag", "none")}
    for mode, r in reports.items():
        preds = r["predictions"]
        assert [p["id"] for p in preds] == ["cat", "pick", "none"] and r["mode"] == mode
        assert all(isinstance(p["prediction"], str) and p["fits"] for p in preds)
        m = r["metrics"]
        assert (m["examples"], m["open"], m["multiple_choice"]) == (3, 2, 1)
        assert m["f1"] == pytest.approx((token_f1(preds[0]["prediction"], ["Biscuit"]) +
                                         token_f1(preds[2]["prediction"], ["Miriam Okafor"])) / 2, abs=1e-4)
        assert m["accuracy"] == choice_correct(preds[1]["prediction"], ["dog", "cat", "owl"], ["cat"])
    pos = {m: r["metrics"]["mean_prompt_positions"] for m, r in reports.items()}
    assert pos["none"] < pos["lloco"] < pos["full"]  # 32 tokens -> 4 vectors
    for mode, r in reports.items():  # what the context adds to the bare question's prompt
        assert [p["context_positions"] for p in r["predictions"]] == [
            p["prompt_positions"] - q["prompt_positions"] for p, q in zip(r["predictions"], reports["none"]["predictions"])]
    assert reports["none"]["metrics"]["mean_context_positions"] == 0
    assert reports["none"]["metrics"]["mean_source_tokens"] == 0
    assert reports["lloco"]["metrics"]["mean_source_tokens"] == reports["full"]["metrics"]["mean_source_tokens"]
    again = evaluate_qa(tiny_lloco, EXAMPLES, mode="lloco", config=GEN, batch_size=3)
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in reports["lloco"]["predictions"]]


def test_evaluate_qa_scores_multiple_choice_by_likelihood(tiny_lloco):
    """``likelihood``: the bare question, one score per option, the best option as the prediction; open
    questions are generated exactly as before."""
    gen = evaluate_qa(tiny_lloco, EXAMPLES, mode="full", config=GEN)
    lik = evaluate_qa(tiny_lloco, EXAMPLES, mode="full", config=GEN, choice_scoring="likelihood")
    assert lik["choice_scoring"] == "likelihood" and gen["choice_scoring"] == "generate"
    g, p = gen["predictions"], lik["predictions"]
    assert [r["prediction"] for r in (g[0], g[2])] == [r["prediction"] for r in (p[0], p[2])]
    scores = p[1]["choice_scores"]
    assert len(scores) == 3 and p[1]["prediction"] == ["dog", "cat", "owl"][scores.index(max(scores))]
    assert p[1]["correct"] == float(p[1]["prediction"] == "cat") == lik["metrics"]["accuracy"]
    assert p[1]["prompt_positions"] < g[1]["prompt_positions"]  # no lettered options in the question
    table = markdown_table([gen, lik], ["gen", "lik"])
    acc = f"{100 * lik['metrics']['accuracy']:.1f}"
    assert f"| {acc} (likelihood) |" in table and "(likelihood)" not in table.split("| lik |")[0]
    with pytest.raises(ValueError, match="choice_scoring must be one of generate, likelihood"):
        evaluate_qa(tiny_lloco, EXAMPLES, mode="none", choice_scoring="letters")


def test_summary_of_records_from_before_context_positions(tiny_lloco):
    """A run resumed from a partial file of an older version mixes records with and without context positions:
    the mean is unknown (None), not a mean over some of them, and nothing fails."""
    from lloco_index.eval.qa import summarize

    records = evaluate_qa(tiny_lloco, EXAMPLES, mode="lloco", config=GEN, batch_size=3)["predictions"]
    old = [{k: v for k, v in r.items() if k != "context_positions"} if i == 0 else r for i, r in enumerate(records)]
    assert summarize(old)["mean_context_positions"] is None
    assert summarize(records)["mean_context_positions"] > 0


def test_evaluate_qa_resumes_after_interruption(tiny_lloco, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    gen, calls = tiny_lloco.generator, []
    real = gen.generate

    def flaky(prompts, *a, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(prompts, *a, **kw)

    monkeypatch.setattr(gen, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate_qa(tiny_lloco, EXAMPLES, mode="rag", config=GEN, batch_size=1, out=out)
    partial = tmp_path / "r.json.partial.jsonl"
    assert not out.exists() and len(partial.read_text().splitlines()) == 2  # settings + the first example
    with pytest.raises(ValueError, match="other settings"):
        evaluate_qa(tiny_lloco, EXAMPLES, mode="none", config=GEN, batch_size=1, out=out)
    report = evaluate_qa(tiny_lloco, EXAMPLES, mode="rag", config=GEN, batch_size=1, out=out)
    assert calls == [1, 1, 1, 1]  # two more, not three
    assert not partial.exists() and json.loads(out.read_text())["predictions"] == report["predictions"]
    fresh = evaluate_qa(tiny_lloco, EXAMPLES, mode="rag", config=GEN, batch_size=1)
    assert [p["prediction"] for p in fresh["predictions"]] == [p["prediction"] for p in report["predictions"]]


def test_evaluate_qa_rejects_bad_input(tiny_lloco):
    with pytest.raises(ValueError, match="ids must be unique: cat"):
        evaluate_qa(tiny_lloco, [EXAMPLES[0], EXAMPLES[0]], mode="none")
    bad = QAExample("x", ["d"], "q?", ["Berlin"], choices=["Rome", "Paris"])
    with pytest.raises(ValueError, match="example 'x': none of the answers"):
        evaluate_qa(tiny_lloco, [bad], mode="none")
    with pytest.raises(ValueError, match="unknown mode 'vectors'"):
        evaluate_qa(tiny_lloco, EXAMPLES, mode="vectors")


# -- needle in a haystack --------------------------------------------------------------------------
def test_needle_goes_in_at_sentence_boundaries(tiny_lloco):
    hay = Haystack(load_haystack([SAMPLES], seed=1), tiny_lloco.backbone.tokenizer)
    tok = tiny_lloco.backbone.tokenizer
    for depth in (0, 30, 60, 100):
        text = hay.build(600, depth, DEFAULT_NEEDLE)
        assert abs(len(tok(text, add_special_tokens=False)["input_ids"]) - 600) <= 2
        at = text.index(DEFAULT_NEEDLE)
        if depth == 100:  # appended, as in the published test
            assert text.endswith(" " + DEFAULT_NEEDLE)
        else:
            assert at == 0 or text[:at].rstrip()[-1] in ".!?\"')" and text[at - 1].isspace()
    middle = hay.build(600, 60, DEFAULT_NEEDLE)
    assert 0.3 < middle.index(DEFAULT_NEEDLE) / len(middle) < 0.7
    with pytest.raises(ValueError, match="haystack has only"):
        hay.build(10 ** 6, 50, DEFAULT_NEEDLE)
    assert load_haystack([SAMPLES], seed=1) == load_haystack([SAMPLES], seed=1)


def test_run_niah_reports_does_not_fit(tiny_lloco, tmp_path):
    corpus = load_haystack([SAMPLES])
    report = run_niah(tiny_lloco, corpus, lengths=[200, 1100], depths=[0, 100], config=GEN, out=tmp_path / "n.json")
    cells = {c["id"]: c for c in report["cells"]}
    assert len(cells) == 8 and report["window"] == 1024
    assert not cells["full/1100/0"]["fits"] and cells["full/1100/0"]["answer"] is None  # never truncated
    assert cells["full/1100/0"]["score"] is None and cells["full/200/0"]["fits"]
    assert all(cells[f"lloco/{n}/{d}"]["fits"] for n in (200, 1100) for d in (0, 100))
    assert cells["lloco/1100/0"]["prompt_positions"] < 300  # ~35 chunks x 4 vectors + the template
    assert report["summary"]["full"]["fit"] == 2 and report["summary"]["lloco"]["fit"] == 4
    assert all(c["score"] in (1, 5, 10) for c in cells.values() if c["fits"])
    plot_niah(report, tmp_path / "n.png")
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="custom needle needs"):
        run_niah(tiny_lloco, corpus, needle="The code is 7.", lengths=[200], depths=[50])


# -- tables and the dev set ------------------------------------------------------------------------
def test_markdown_table(tiny_lloco, tmp_path):
    qa = evaluate_qa(tiny_lloco, EXAMPLES, mode="none", config=GEN)
    qa["command"] = "lloco eval qa dev.jsonl --mode none"
    niah = run_niah(tiny_lloco, load_haystack([SAMPLES]), lengths=[200], depths=[50], modes=["none"], config=GEN)
    lines = markdown_table([qa, niah], ["baseline", "needle"]).splitlines()
    assert lines[0].startswith("| report | mode | top-k | adapter | examples | EM | F1")
    row = lines[2].split(" | ")
    assert row[0] == "| baseline" and row[1] == "none" and row[4] == "3"
    assert any(line.startswith("| needle | none | - | base | 200-200 | 1 | 1 | 1 |") for line in lines)
    assert lines[-1] == "- baseline: `lloco eval qa dev.jsonl --mode none`"


def _qa_report(open_right: list[int], mc_right: list[int]) -> dict:
    preds = [{"id": f"o{i}", "exact_match": float(r), "contains": float(r)} for i, r in enumerate(open_right)]
    preds += [{"id": f"m{i}", "choices": ["x", "y"], "exact_match": 0.0, "correct": float(r)}
              for i, r in enumerate(mc_right)]
    return {"kind": "qa", "dataset_sha256": "d", "predictions": preds}


def test_compare_reports_pairs_questions_and_runs_a_sign_test(tmp_path):
    a = _qa_report([1] * 10 + [0] * 10 + [1] * 5, [1, 0, 1])
    b = _qa_report([1] * 10 + [1] * 10 + [0] * 5, [1, 1, 0])
    res = compare_reports(a, b)
    assert res["open"] == {"questions": 25, "right_a": 15, "right_b": 20, "only_a": 5, "only_b": 10,
                           "p": round(2 * sum(comb(15, i) for i in range(6)) / 2 ** 15, 4)}  # P(split <= 5:10)
    assert res["multiple_choice"] == {"questions": 3, "right_a": 2, "right_b": 2, "only_a": 1, "only_b": 1, "p": 1.0}
    assert compare_reports(a, a)["open"]["p"] == 1.0  # nothing differs: no evidence either way
    with pytest.raises(ValueError, match="different questions"):
        compare_reports(a, _qa_report([1] * 24, [1, 0, 1]))
    with pytest.raises(ValueError, match="QA reports"):
        compare_reports(a, {"kind": "niah"})
    for name, r in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    assert main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0


def test_compare_pools_dev_sets_and_can_score_contained_answers(tmp_path, capsys):
    """Several dev sets pool into one sign test (question ids repeat across sets: each set is its own), and open
    answers can count as right when they contain the gold answer, as the dev tables in docs/ do."""
    a = _qa_report([1] * 10 + [0] * 10 + [1] * 5, [1, 0, 1])
    b = _qa_report([1] * 10 + [1] * 10 + [0] * 5, [1, 1, 0])
    pooled = compare_reports([a, a], [b, b])
    assert pooled["open"] == {"questions": 50, "right_a": 30, "right_b": 40, "only_a": 10, "only_b": 20,
                              "p": round(2 * sum(comb(30, i) for i in range(11)) / 2 ** 30, 4)}
    lenient = {**b, "predictions": [{**p, "exact_match": 0.0} for p in b["predictions"]]}  # contained, not exact
    assert compare_reports(a, lenient)["open"]["right_b"] == 0
    assert compare_reports(a, lenient, "contains")["open"] == compare_reports(a, b)["open"]
    with pytest.raises(ValueError, match="report i of A with report i of B"):
        compare_reports([a, a], [b])
    with pytest.raises(ValueError, match="reports 2 of A and B answer different questions"):
        compare_reports([a, a], [b, _qa_report([1] * 24, [1, 0, 1])])
    with pytest.raises(ValueError, match="exact_match or contains"):
        compare_reports(a, b, "f1")
    for name, r in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    two = f"{tmp_path / 'a.json'},{tmp_path / 'a.json'}", f"{tmp_path / 'b.json'},{tmp_path / 'b.json'}"
    assert main(["eval", "compare", *two, "--metric", "contains", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["open"]["questions"] == 50


@pytest.fixture()
def prose_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    para = "The stream module provides an API for working with data that flows through a program in pieces."
    body = "\n\n".join(f"{para} Paragraph {i} adds one more sentence of context." for i in range(60))
    (src / "a.md").write_text(f"# Title\n\n```js\nconst x = 1; // this code is not prose at all, right.\n```\n\n{body}")
    return src


def test_dev_set_is_seeded_and_well_formed(prose_dir):
    cfg = DevSetConfig(examples=12, documents=3, doc_words=120, multi_hop=0.5, multiple_choice=0.5, seed=3)
    dev = make_dev_set([prose_dir], cfg)
    assert [e.to_json() for e in dev] == [e.to_json() for e in make_dev_set([prose_dir], cfg)]
    assert [e.to_json() for e in dev] != [e.to_json() for e in make_dev_set([prose_dir], DevSetConfig(seed=4, **{
        k: getattr(cfg, k) for k in ("examples", "documents", "doc_words", "multi_hop", "multiple_choice")}))]
    assert any("multihop" in e.id for e in dev) and any(e.choices for e in dev)
    for e in dev:
        text = "\n".join(e.documents)
        assert len(e.documents) == 3 and "const x" not in text and "# Title" not in text
        assert e.answers[0] in text and e.answers[0] not in e.question
        if e.choices:
            assert len(set(e.choices)) == 4 and e.answers[0] in e.choices
        if "multihop" in e.id:  # the two facts of the chain sit in two different documents
            person = e.question.split(" that ")[-1].split(" works")[0] if "employer" in e.id else \
                e.question.split("trained ")[1].split(" as an")[0]
            first = [i for i, d in enumerate(e.documents) if person in d]
            second = [i for i, d in enumerate(e.documents) if e.answers[0] in d]
            assert len(first) == 1 and len(second) == 1 and first != second
    with pytest.raises(ValueError, match="too little prose"):
        make_dev_set([prose_dir], DevSetConfig(doc_words=10 ** 5))


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_make_dev_eval_and_table(tiny_model_dir, prose_dir, tmp_path, capsys):
    dev, rep = tmp_path / "dev.jsonl", tmp_path / "none.json"
    assert main(["eval", "make-dev", "--source", str(prose_dir), "--out", str(dev), "--examples", "3",
                 "--doc-words", "60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["examples"] == 3 and len(read_qa(dev)) == 3
    assert main(["eval", "qa", str(dev), "--model", str(tiny_model_dir), "--mode", "none", "--max-new-tokens", "3",
                 "--dtype", "bfloat16", "--out", str(rep), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["metrics"]["examples"] == 3 and "predictions" not in summary
    report = json.loads(rep.read_text())
    assert report["command"].startswith("lloco eval qa ") and report["dtype"] == "bfloat16"
    assert main(["eval", "table", str(rep), "--out", str(tmp_path / "t.md")]) == 0
    assert "| none | none | - | base | 3 |" in (tmp_path / "t.md").read_text()
    assert main(["eval", "qa", str(dev), "--model", str(tiny_model_dir), "--mode", "full", "--top-k", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "lloco eval: error: --top-k applies to the lloco and rag modes, not full"


def test_cli_niah_writes_report_and_heatmap(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "niah" / "n.json"
    assert main(["eval", "niah", "--haystack", str(SAMPLES), "--lengths", "150", "300", "--depths", "0", "100",
                 "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lloco: accuracy ") and "over 4 of 4 cells that fit the 1024-position window" in lines[0]
    report = json.loads(out.read_text())
    assert report["haystack"] == [str(SAMPLES)] and report["seed"] == 0 and len(report["cells"]) == 8
    assert (tmp_path / "niah" / "n.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "niah", "--haystack", str(SAMPLES), "--needle", "The code is 7.",
                 "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("lloco eval: error: a custom needle needs")


def test_default_model_window_is_8k_and_full_mode_does_not_fit_beyond(default_lloco):
    report = run_niah(default_lloco, load_haystack([SAMPLES]) * 20, lengths=[600, 9000], depths=[50], modes=["full"],
                      config=GenerationConfig(max_new_tokens=16))
    fit, too_long = report["cells"]
    assert report["window"] == 8192 and fit["fits"] and isinstance(fit["answer"], str)
    assert not too_long["fits"] and too_long["answer"] is None and too_long["prompt_positions"] > 8192
