"""evaluate.py: the evaluation math on tiny models, the benchmarks through lm-eval under each kind of
policy, and a tiny end-to-end run over a Q-Adapter and a LoRA checkpoint."""
import json

import pytest
import torch

import baselines
import data
import evaluate as E
import model as M
from tests.conftest import SHARED_DATA, separable_pairs, tiny_llama, write_jsonl
from support import loading

ARC_ROWS = [{"id": "q1", "question": "What is 1 + 1?", "choices": {"text": ["two", "seven", "a cat"], "label": ["A", "B", "C"]},
             "answerKey": "A"},
            {"id": "q2", "question": "Which is a colour?", "choices": {"text": ["table", "blue"], "label": ["1", "2"]},
             "answerKey": "2"}]
MMLU_ROWS = [{"question": "Water boils at sea level at", "subject": "physics",
              "choices": ["100 C", "10 C", "0 C", "1000 C"], "answer": 0}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-data")
    return {"arc": write_jsonl(d / "arc.jsonl", ARC_ROWS), "mmlu": write_jsonl(d / "mmlu.jsonl", MMLU_ROWS),
            "pairs": write_jsonl(d / "pairs.jsonl", separable_pairs(6, 200)),
            "train": write_jsonl(d / "train.jsonl", separable_pairs(16))}


def q_adapter(tokenizer, alpha0=1.0, alpha_tilde=1.0, zero=True, seed=0):
    base = tiny_llama(tokenizer, seed)
    head = M.QHead(M.head_config_for(base, 32, 1, 2))
    if not zero:
        torch.manual_seed(seed + 1)
        torch.nn.init.normal_(head.up.weight, std=0.5)
    config = {"alpha0": alpha0, "alpha_tilde": alpha_tilde, "gamma": 1.0}
    return M.QAdapter(base, head.eval()), config


def arc_and_mmlu(files):
    """The older flags' local tasks on the tiny files: 2 ARC-Easy questions, 1 MMLU question."""
    return E.Benchmarks(["arc_easy_local", "mmlu_local"], {"arc_easy_local": files["arc"], "mmlu_local": files["mmlu"]},
                        None, 0, None, None)


def test_questions_are_evenly_spaced():
    assert E.evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert E.evenly_spaced(list(range(4)), 0) == [0, 1, 2, 3]  # 0: all


def test_a_known_answer_is_scored_right(tmp_path):
    """The embedded SmolLM2 picks the obvious answer, by both acc and acc_norm, through lm-eval."""
    base, tok = loading.load_base(loading.EMBEDDED)
    rows = [{"id": "sky", "question": "What colour is the sky on a clear day?",
             "choices": {"text": ["green", "blue", "loud", "seventeen"], "label": list("ABCD")}, "answerKey": "B"},
            {"id": "dog", "question": "How many legs does a dog have?",
             "choices": {"text": ["four", "nine", "purple", "none"], "label": list("ABCD")}, "answerKey": "A"}]
    arc = write_jsonl(tmp_path / "known.jsonl", rows)
    benchmarks = E.Benchmarks(["arc_easy_local"], {"arc_easy_local": arc}, None, 0, None, None)
    r = benchmarks.score(E.FrozenPolicy(base), tok, {"frozen"}, 8)["frozen"]
    assert r["arc_easy_local/acc"] == 1.0 and r["arc_easy_local/acc_norm"] == 1.0 and r["arc_easy_local/n"] == 2


def test_policy_identical_to_the_frozen_model_has_kl_0_and_the_same_scores(tokenizer, files):
    """A zero head with α0 = α̃ (and α0 = α̃ = 3 in a decode-time sweep: pi~ ∝ pi1·exp(0/3)) is pi1."""
    adapter, config = q_adapter(tokenizer)
    policy = E.QAdapterPolicy(adapter, config, [(1.0, 1.0), (3.0, 3.0)], "qa")
    mc = arc_and_mmlu(files).score(policy, tokenizer, {"qa α0=1", "qa α0=3", "frozen"}, 3)
    for name in ("qa α0=1", "qa α0=3"):
        assert mc[name] == mc["frozen"]
    assert mc["frozen"]["arc_easy_local/n"] == 2 and mc["frozen"]["mmlu_local/n"] == 1
    pairs = E.held_out_pairs(files["pairs"], {}, 0)
    kl = E.kl_to_frozen(policy, tokenizer, pairs, 64, 4)
    assert kl["qa α0=1"]["kl"] == pytest.approx(0.0, abs=1e-6) and kl["qa α0=3"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert kl["frozen"]["kl_tokens"] == kl["qa α0=1"]["kl_tokens"] > 0
    # the return of a zero head: R(y_w) − R(y_l) = α̃·Δlog pi~ − α0·Δlog pi1 = 0, no preference at all
    pw = E.pairwise(policy, tokenizer, pairs, 64, 4)
    assert pw["qa α0=1"]["margin"] == pytest.approx(0.0, abs=1e-5)
    assert pw["qa α0=1"]["likelihood_accuracy"] == pw["frozen"]["likelihood_accuracy"]


def test_an_alpha0_sweep_shares_its_benchmark_passes_and_keeps_each_policys_numbers(tokenizer, files):
    """Benchmarks.score over two decode-time α0 of one checkpoint: one Sweep, so the adapter runs
    as often as for one α0 scored alone, and each α0's scores are the ones it gets alone."""
    adapter, config = q_adapter(tokenizer, zero=False)
    policy = E.QAdapterPolicy(adapter, config, [(0.5, 0.5), (2.0, 3.0)], "qa")
    calls, forward = [], adapter.forward
    adapter.forward = lambda *args, **kw: calls.append(1) or forward(*args, **kw)
    try:
        benchmarks = arc_and_mmlu(files)
        together = benchmarks.score(policy, tokenizer, {"qa α0=0.5", "qa α0=2"}, 3)
        forwards_together = len(calls)
        alone = {name: benchmarks.score(policy, tokenizer, {name}, 3)[name] for name in ("qa α0=0.5", "qa α0=2")}
    finally:
        del adapter.forward
    assert forwards_together == (len(calls) - forwards_together) / 2 > 0
    assert together == alone


def test_a_nonzero_head_has_positive_kl_and_its_own_return(tokenizer, files):
    adapter, config = q_adapter(tokenizer, zero=False)
    policy = E.QAdapterPolicy(adapter, config, [(1.0, 1.0)], "qa")
    pairs = E.held_out_pairs(files["pairs"], {}, 0)
    assert E.kl_to_frozen(policy, tokenizer, pairs, 64, 4)["qa"]["kl"] > 1e-3
    # the pairwise margin is R(y_w) − R(y_l), computed here from the residual_q functions directly
    from data import collate, tokenize_pair
    from residual_q import derived_reward, gather_actions, response_return, soft_value
    pairs = [data.Pair(p.prompt, "Yes, I like that. " * i + "Yes.", p.rejected, p.where) for i, p in enumerate(pairs)]
    examples = [tokenize_pair(tokenizer, p, 40) for p in pairs]
    assert any(e["chosen_ids"][-1] != tokenizer.eos_token_id for e in examples)  # longer answers lose their end to the cutoff
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        q_r, logp1, *_ = adapter(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"]
    r = response_return(derived_reward(gather_actions(q_r, labels), soft_value(q_r, logp1, 1.0, 1.0), labels, 1.0),
                        labels)
    margins = r[:len(pairs)] - r[len(pairs):]
    pw = E.pairwise(policy, tokenizer, pairs, 40, 5)["qa"]
    assert pw["margin"] == pytest.approx(float(margins.mean()), abs=1e-4)
    assert pw["pairwise_accuracy"] == pytest.approx(float((margins > 0).float().mean()))


def test_lora_policy_at_init_is_the_frozen_model(tokenizer, tiny_path, files):
    base, _ = loading.load_base(tiny_path)
    args = baselines.parse_args(["--method", "dpo", "--base-model", tiny_path])
    peft_model = baselines.lora_model(base, args).eval()
    policy = E.LoraPolicy(peft_model, {"method": "dpo", "dpo_beta": 0.1}, "dpo")
    pairs = E.held_out_pairs(files["pairs"], {}, 0)
    kl = E.kl_to_frozen(policy, tokenizer, pairs, 64, 4)
    assert kl["dpo"]["kl"] == pytest.approx(0.0, abs=1e-6)
    mc = arc_and_mmlu(files).score(policy, tokenizer, {"dpo", "frozen"}, 4)
    assert mc["dpo"] == mc["frozen"] and "arc_easy_local/acc" in mc["dpo"]
    assert E.pairwise(policy, tokenizer, pairs, 64, 4)["dpo"]["margin"] == pytest.approx(0.0, abs=1e-5)


def test_a_lora_scale_sweep_runs_from_the_frozen_model_to_the_trained_one(tokenizer, tiny_path, files):
    """--lora-scale: s = 0 scores as the frozen model, s = 1 as the unscaled policy, and the KL grows with s."""
    from tests.test_baselines import lora_with_random_update
    pairs = E.held_out_pairs(files["pairs"], {}, 0)
    peft_model = lora_with_random_update(tiny_path)
    config = {"method": "dpo", "dpo_beta": 0.1}
    swept = E.LoraPolicy(peft_model, config, "dpo", scales=[0.0, 0.5, 1.0])
    assert swept.names == ["dpo s=0", "dpo s=0.5", "dpo s=1"]
    kl, pw = E.kl_to_frozen(swept, tokenizer, pairs, 64, 4), E.pairwise(swept, tokenizer, pairs, 64, 4)
    plain = E.LoraPolicy(peft_model, config, "dpo")
    kl_plain, pw_plain = E.kl_to_frozen(plain, tokenizer, pairs, 64, 4), E.pairwise(plain, tokenizer, pairs, 64, 4)
    assert kl["dpo s=0"]["kl"] == pytest.approx(0.0, abs=1e-6) and pw["dpo s=0"]["margin"] == pytest.approx(0, abs=1e-5)
    assert pw["dpo s=0"]["likelihood_accuracy"] == pw["frozen"]["likelihood_accuracy"]
    assert kl["dpo s=1"]["kl"] == pytest.approx(kl_plain["dpo"]["kl"], rel=1e-5)
    assert pw["dpo s=1"]["margin"] == pytest.approx(pw_plain["dpo"]["margin"], rel=1e-5)
    assert 0 < kl["dpo s=0.5"]["kl"] < kl["dpo s=1"]["kl"]
    mc = arc_and_mmlu(files).score(swept, tokenizer, {"dpo s=0", "frozen"}, 4)
    assert mc["dpo s=0"]["arc_easy_local/acc"] == mc["frozen"]["arc_easy_local/acc"]
    answers = swept.generate(tokenizer, [p.prompt for p in pairs[:2]], 3, 2)
    assert answers["dpo s=0"] == E.frozen_generate(swept, tokenizer, [p.prompt for p in pairs[:2]], 3, 2)


def test_end_to_end_over_both_kinds_of_checkpoint(tokenizer, tiny_path, files, tmp_path):
    tiny_q_adapter_run(tokenizer, tiny_path, files, tmp_path / "qa")
    write_jsonl(tmp_path / "qa" / "metrics.jsonl", [{"step": 1, "pairs_per_s": 4.0}, {"step": 2, "pairs_per_s": 2.0}])
    baselines.main(["--method", "sft", "--base-model", tiny_path, "--data", files["train"], "--test-data",
                    files["pairs"], "--out-dir", str(tmp_path / "sft"), "--cutoff", "64", "--samples", "0",
                    "--max-steps", "1", "--device", "cpu", "--lr", "1e-2"])
    out = tmp_path / "res" / "eval"
    results = E.main(["--checkpoint", str(tmp_path / "qa"), "--checkpoint", str(tmp_path / "sft"),
                      "--alpha0", "1", "4", "--arc-easy", files["arc"], "--mmlu", files["mmlu"],
                      "--kl-data", files["pairs"], "--adherence", "--prompts", files["pairs"], "--limit", "3",
                      "--max-new-tokens", "3", "--out", str(out), "--plot", "--device", "cpu"])
    assert list(results) == ["frozen", "qa α0=1", "qa α0=4", "sft"]
    assert results["frozen"]["kl"] == 0.0 and results["frozen"]["kind"] == "frozen"
    assert results["qa α0=1"]["kl"] > results["qa α0=4"]["kl"] > 0  # a larger α0 keeps closer to pi1
    assert results["qa α0=1"]["s_per_pair"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    pairs = E.held_out_pairs(files["pairs"], {}, 3)  # the length yardstick, counted by hand
    lengths = [(len(tokenizer(p.chosen)["input_ids"]), len(tokenizer(p.rejected)["input_ids"])) for p in pairs]
    assert results["frozen"]["longer_wins_accuracy"] == pytest.approx(
        sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in lengths) / 3)
    assert "longer_wins_accuracy" not in results["sft"]
    for name, r in results.items():
        for key in ("pairwise_accuracy", "margin", "likelihood_accuracy", "arc_easy_local/acc", "arc_easy_local/acc_norm",
                    "arc_easy_local/acc_stderr", "mmlu_local/acc", "kl", "adherence", "degenerate"):
            assert key in r, (name, key)
        assert r["pairs"] == 3 and r["arc_easy_local/n"] == 2 and r["mmlu_local/n"] == 1 and len(r["answers"]) == 3
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"]["sft"]["kind"] == "sft" and saved["settings"]["limit"] == 3
    table = out.with_suffix(".md").read_text()
    assert table.splitlines()[0].startswith("| policy | pairwise acc") and "| qa α0=4 |" in table
    assert "| arc_easy_local acc | arc_easy_local acc_norm | mmlu_local acc |" in table and " ± " in table
    assert out.with_suffix(".png").stat().st_size > 1000
    out.with_suffix(".png").unlink()
    E.main(["--replot", "--out", str(out)])  # the picture again, from the JSON alone
    assert out.with_suffix(".png").stat().st_size > 1000


def tiny_q_adapter_run(tokenizer, tiny_path, files, run_dir):
    """A Q-Adapter checkpoint with a nonzero head, saved as train.py saves it."""
    adapter, _ = q_adapter(tokenizer, zero=False)
    (run_dir / "checkpoint").mkdir(parents=True)
    loading.save_adapter(run_dir / "checkpoint", adapter.head, {"base_model": tiny_path, "alpha0": 1.0, "alpha_tilde": 1.0,
                                                               "gamma": 1.0, "cutoff": 64, "data": files["train"],
                                                               "test_data": files["pairs"]})
    return str(run_dir)


def test_task_names_from_the_flags(files, tmp_path):
    args = E.parse_args(["--checkpoint", "x", "--tasks", "arc_easy_local, mmlu", "--arc-easy", files["arc"],
                         "--mmlu", "cais/mmlu"])
    assert args.task_names == ["arc_easy_local", "mmlu"] and args.task_files == {"arc_easy_local": files["arc"]}
    assert E.parse_args(["--checkpoint", "x", "--mmlu", ""]).task_names == []
    with pytest.raises(SystemExit, match="error: --mmlu nowhere.jsonl: no such file"):
        E.parse_args(["--checkpoint", "x", "--mmlu", "nowhere.jsonl"])


def test_a_local_task_file_with_a_bad_row_is_named_before_anything_loads(tmp_path):
    mmlu = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0},
                                                 {"question": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(SystemExit, match=r"error: --mmlu mmlu.jsonl:2: not an MMLU row \(needs question"):
        E.parse_args(["--checkpoint", "x", "--mmlu", mmlu])
    arc = write_jsonl(tmp_path / "arc.jsonl", [{**ARC_ROWS[0], "answerKey": "Z"}])
    with pytest.raises(SystemExit, match=r"error: --arc-easy arc.jsonl:1: not an ARC row"):
        E.parse_args(["--checkpoint", "x", "--arc-easy", arc])
    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps(ARC_ROWS[0]) + "\n\n{\"question\": \n")
    with pytest.raises(SystemExit, match=r"^error: --arc-easy arc.jsonl:3: invalid JSON \("):
        E.parse_args(["--checkpoint", "x", "--arc-easy", str(bad)])  # read here: lm-eval would name no line


@pytest.mark.skipif(not (SHARED_DATA / "retention" / "arc_easy_validation.jsonl").is_file(),
                    reason="../shared/data/retention/arc_easy_validation.jsonl (the local ARC-Easy) is not on this machine")
def test_tasks_end_to_end_on_the_local_arc_easy(tokenizer, tiny_path, files, tmp_path, monkeypatch):
    """evaluate.py --tasks arc_easy_local --limit 5: lm-eval scores 5 evenly spaced questions of the
    570 under the frozen model and pi~."""
    monkeypatch.setenv("QADAPTER_RETENTION_DATA", str(SHARED_DATA / "retention"))
    run = tiny_q_adapter_run(tokenizer, tiny_path, files, tmp_path / "qa")
    results = E.main(["--checkpoint", run, "--tasks", "arc_easy_local", "--limit", "5", "--kl-data", "",
                      "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert list(results) == ["frozen", "qa"]
    for r in results.values():
        assert r["arc_easy_local/n"] == 5 and 0 <= r["arc_easy_local/acc"] <= 1 and "arc_easy_local/acc_norm_stderr" in r
    assert "arc_easy_local acc" in (tmp_path / "eval.md").read_text()


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert E.plot_tradeoff({"frozen": {"kind": "frozen", "kl": 0.0, "adherence": 0.1}}, tmp_path / "x.png", "adherence") is None
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_the_legend_names_a_run_scored_only_in_the_kl_panel(monkeypatch, tmp_path):
    import matplotlib.figure
    labels, real_legend = [], matplotlib.figure.Figure.legend

    def legend(fig, handles, names, **kwargs):
        labels.extend(names)
        return real_legend(fig, handles, names, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", legend)
    results = {"frozen": {"kind": "frozen", "run": None, "adherence": 0.2, "arc_easy_local/acc": 0.5, "kl": 0.0},
               "dpo-a": {"kind": "dpo", "run": "runs/a", "adherence": 0.3, "arc_easy_local/acc": 0.5, "kl": 0.01},
               "dpo-b": {"kind": "dpo", "run": "runs/b", "adherence": 0.35, "kl": 0.02}}  # no ARC-Easy: KL panel only
    assert E.plot_tradeoff(results, tmp_path / "x.png", "adherence") == tmp_path / "x.png"
    assert labels == ["frozen", "dpo-a", "dpo-b"]


def test_bad_arguments_fail_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: give at least one --checkpoint"):
        E.parse_args([])
    with pytest.raises(SystemExit, match="error: --alpha0"):
        E.parse_args(["--checkpoint", "x", "--alpha0", "0"])
    with pytest.raises(SystemExit, match="not a train.py or baselines.py output"):
        E.policy_to_evaluate(tmp_path, None, "cpu", torch.float32)


@pytest.mark.skipif(not (SHARED_DATA / "retention").is_dir(), reason="../shared/data/retention is not on this machine")
def test_the_shared_retention_files_read_whole():
    """lm-eval reads every question of the local ARC-Easy and MMLU, each with its answer among its choices."""
    from support import lm_eval_model
    names = ["arc_easy_local", "mmlu_local"]
    specs = lm_eval_model.task_specs(names, data_dir=SHARED_DATA / "retention")
    tasks = lm_eval_model.task_manager(names).load(specs)["tasks"]
    assert {name: len(task.eval_docs) for name, task in tasks.items()} == {"arc_easy_local": 570, "mmlu_local": 1531}
    for task in tasks.values():
        assert all(0 <= task.doc_to_target(doc) < len(task.doc_to_choice(doc)) for doc in task.eval_docs)


def test_judge_scorer_answers_the_held_out_queries_and_scores_style_and_loops(tokenizer, tiny_path, tmp_path,
                                                                              monkeypatch):
    """--scorer judge: the prompts are the checkpoint's held-out queries (each once), the judge is
    fitted on its training queries, and a looping answer counts as degenerate."""
    from tests.test_judge import TOPICS, formal, pirate, tiny_pairs
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in tiny_pairs(TOPICS)]
    dsp = write_jsonl(tmp_path / "dsp.jsonl", rows)
    config = {"data": dsp, "test_fraction": 0.25, "split_seed": 0, "seed": 5}
    args = E.parse_args(["--checkpoint", "x", "--adherence", "--scorer", "judge"])
    prompts, score = E.adherence_prompts_and_scorer(args, config)
    held_out = E.distinct_prompts(data.split_by_prompt(data.load_pairs(dsp), 0.25, 0)[1])
    assert prompts == held_out and len(prompts) == 4  # 4 of 16 queries, each once though each is in 2 pairs
    training = E.parse_args(["--checkpoint", "x", "--adherence", "--scorer", "judge", "--queries", "training"])
    train_prompts, _ = E.adherence_prompts_and_scorer(training, config)
    assert train_prompts == E.distinct_prompts(data.split_by_prompt(data.load_pairs(dsp), 0.25, 0)[0])
    assert len(train_prompts) == 12 and not set(map(str, train_prompts)) & set(map(str, held_out))
    loop = "the sea the sea the sea " * 6
    result = score([formal("sand"), pirate("sand"), loop], [True, True, False])
    assert result["adherence"] == pytest.approx(1 / 3) and result["degenerate"] == pytest.approx(1 / 3)
    assert result["n"] == 3 and 0 < result["mean_prob"] < 1

    run = tmp_path / "qa"
    adapter, _ = q_adapter(tokenizer, zero=False)
    (run / "checkpoint").mkdir(parents=True)
    loading.save_adapter(run / "checkpoint", adapter.head, {"base_model": tiny_path, "alpha0": 1.0, "alpha_tilde": 1.0,
                                                            "gamma": 1.0, "cutoff": 64, **config})
    results = E.main(["--checkpoint", str(run), "--adherence", "--scorer", "judge", "--gen-limit", "2",
                      "--limit", "2", "--kl-data", "", "--max-new-tokens", "3", "--out", str(tmp_path / "eval"),
                      "--device", "cpu"])
    for name in ("frozen", "qa"):
        assert [a["prompt"] for a in results[name]["answers"]] == [p[-1]["content"] for p in held_out[:2]]
        assert {"adherence", "mean_prob", "degenerate"} <= set(results[name])
    assert "style prob" in (tmp_path / "eval.md").read_text()



def test_scorer_none_answers_the_held_out_prompts_and_counts_loops_only(tokenizer, tiny_path, files, tmp_path):
    """--scorer none (a preference no scorer can judge, e.g. harmlessness): the answers to the
    checkpoint's held-out prompts and the share that loop, no adherence column."""
    run = tiny_q_adapter_run(tokenizer, tiny_path, files, tmp_path / "qa")
    results = E.main(["--checkpoint", run, "--adherence", "--scorer", "none", "--gen-limit", "2", "--limit", "2",
                      "--kl-data", "", "--max-new-tokens", "3", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    held_out = E.distinct_prompts(E.held_out_pairs(files["pairs"], {}, 0))[:2]
    for name in ("frozen", "qa"):
        assert [a["prompt"] for a in results[name]["answers"]] == [p[-1]["content"] for p in held_out]
        assert "degenerate" in results[name] and "adherence" not in results[name]
    with pytest.raises(SystemExit, match="--queries training is for picking a dial by a score"):
        E.parse_args(["--checkpoint", "x", "--adherence", "--scorer", "none", "--queries", "training"])


def test_combine_groups_seeds_into_mean_and_std(tmp_path):
    def out(seed, adherence, kl):
        rows = {"frozen": {"kind": "frozen", "run": None, "adherence": 0.1, "kl": 0.0, "arc_easy_local/acc": 0.5,
                           "arc_easy_local/acc_stderr": 0.05, "arc_easy_local/n": 10},
                f"qa-s{seed}" + (" α0=0.1" if seed == 0 else ""): {"kind": "q-adapter", "run": f"runs/qa-s{seed}", "alpha0": 0.1, "alpha_tilde": 0.1,
                                       "adherence": adherence, "kl": kl, "arc_easy_local/acc": 0.5, "n": 32},
                f"dpo-s{seed}": {"kind": "dpo", "run": f"runs/dpo-s{seed}", "adherence": adherence / 2, "kl": 2 * kl},
                f"dpo-s{seed} s=0.5": {"kind": "dpo", "run": f"runs/dpo-s{seed}", "lora_scale": 0.5, "kl": kl}}
        if seed == 0:  # a --lora-scale sweep's s = 1 is the trained policy: one group with the other seeds' plain row
            rows[f"dpo-s{seed} s=1"] = {**rows.pop(f"dpo-s{seed}"), "lora_scale": 1.0}
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"settings": {"seed": seed}, "results": rows}))
        return str(path)
    files = [out(0, 0.4, 0.1), out(1, 0.6, 0.3), out(2, 0.8, 0.2)]
    combined = E.combine(files)
    assert list(combined) == ["frozen", "qa α0=0.1", "dpo s=0.5", "dpo"]
    assert combined["dpo s=0.5"]["kl"] == pytest.approx(0.2) and combined["dpo s=0.5"]["lora_scale"] == 0.5
    assert combined["dpo s=0.5"]["run"] == combined["dpo"]["run"] == "dpo"  # one line in the plot
    qa = combined["qa α0=0.1"]
    assert qa["adherence"] == pytest.approx(0.6) and qa["adherence_std"] == pytest.approx(0.2)
    assert qa["kl"] == pytest.approx(0.2) and qa["kl_std"] == pytest.approx(0.1)
    assert qa["seeds"] == 3 and qa["alpha0"] == 0.1 and qa["kind"] == "q-adapter" and "n" not in qa
    assert qa["run"] == "qa"  # without its α0: every α0 of one run is one line in the plot
    assert combined["frozen"]["adherence_std"] == 0.0 and "arc_easy_local/acc_stderr" not in combined["frozen"]
    assert combined["dpo"]["adherence"] == pytest.approx(0.3)
    result = E.main(["--combine", *files, "--out", str(tmp_path / "all"), "--plot"])
    assert result == combined
    table = (tmp_path / "all.md").read_text()
    assert "| qa α0=0.1 |" in table and "0.600 ± 0.200" in table
    settings = json.loads((tmp_path / "all.json").read_text())["settings"]  # where the numbers came from
    assert settings["combine"] == files and settings["sources"][files[1]] == {"seed": 1} and settings["adherence"]
    assert (tmp_path / "all.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="not an evaluate.py output"):
        E.combine([str(tmp_path / "missing.json")])


def test_a_missing_evaluation_package_is_one_line_error(monkeypatch):
    real = E.importlib.util.find_spec
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(SystemExit, match="--scorer judge needs sklearn, which is not installed: pip install -r "
                                         "requirements-eval.txt"):
        E.parse_args(["--checkpoint", "x", "--adherence", "--scorer", "judge"])
    E.parse_args(["--checkpoint", "x", "--adherence"])  # the demo's scorer needs nothing more
