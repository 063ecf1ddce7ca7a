"""support/lm_eval_model.py: our policies as lm-eval models. A zero head with α0 = α̃ is pi1, so it
must give what lm-eval's own HFLM gives on the same Hugging Face model (values, greedy flags, task
accuracy); a nonzero head must not; generate_until is sample.generate's greedy decoding, cut at `until`."""

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import model as M
import sample
from support import lm_eval_model as L
from tests.conftest import tiny_llama, write_jsonl

QUESTIONS = [("What is 1 + 1?", ["two", "seven", "a cat"], 0), ("Which is a colour?", ["table", "blue"], 1),
             ("What do bees make?", ["honey", "bricks", "rain", "music"], 0),
             ("Which animal barks?", ["a fish", "a dog", "a stone"], 1),
             ("Where is Paris?", ["in France", "on the Moon", "under the sea"], 0)]
REQUESTS = [("Question: What is 1 + 1?\nAnswer:", " two"), ("Question: What is 1 + 1?\nAnswer:", " seven apples"),
            ("", "An empty context."), ("The quick brown fox " * 6, "jumps over the lazy dog."),
            ("Trailing space ", "moves to the continuation")]


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_llama(tokenizer)


def customised(base, alpha0=1.0, alpha_tilde=1.0, zero=True):
    head = M.QHead(M.head_config_for(base, 32, 1, 2))
    if not zero:
        torch.manual_seed(1)
        torch.nn.init.normal_(head.up.weight, std=0.5)
    return L.CustomisedPolicy(M.QAdapter(base, head.eval(), alpha0=alpha0, alpha_tilde=alpha_tilde), alpha0, alpha_tilde)


def instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def hflm(base, tokenizer, **kwargs):
    return HFLM(pretrained=base, tokenizer=tokenizer, batch_size=3, device="cpu", **kwargs)


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_a_zero_head_gives_hflm_loglikelihoods(base, tokenizer, alpha):
    """pi~ ∝ pi1·exp(0/a) = pi1: the same sums and greedy flags as HFLM, also with contexts cut
    from the left (max_length 16), an empty context, and rolling windows."""
    for max_length in (None, 16):
        ours = L.PolicyLM(customised(base, alpha, alpha), tokenizer, batch_size=2, max_length=max_length)
        theirs = hflm(base, tokenizer, max_length=max_length)
        reqs = instances("loglikelihood", REQUESTS)
        for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(reqs), theirs.loglikelihood(reqs)):
            assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
        texts = instances("loglikelihood_rolling", [("A text scored whole, " * 4,), ("Short.",)])
        assert ours.loglikelihood_rolling(texts) == pytest.approx(theirs.loglikelihood_rolling(texts), abs=1e-4)


def test_a_greedy_continuation_is_flagged(base, tokenizer):
    context = tokenizer("Question: hello?\nAnswer:")["input_ids"]
    greedy = list(context)
    for _ in range(3):  # the frozen model's own greedy tokens
        greedy.append(int(base(torch.tensor([greedy])).logits[0, -1].argmax()))
    other = greedy[len(context):-1] + [(greedy[-1] + 1) % len(tokenizer)]
    lm = L.PolicyLM(L.CausalLMPolicy(base), tokenizer)
    (logp, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, context, greedy[len(context):]),
                                                                   (None, context, other)])
    assert is_greedy and not not_greedy and logp < 0


def test_a_nonzero_head_changes_the_values(base, tokenizer):
    reqs = instances("loglikelihood", REQUESTS[:2])
    frozen = [v for v, _ in L.PolicyLM(L.CausalLMPolicy(base), tokenizer).loglikelihood(reqs)]
    policy = customised(base, zero=False)
    head = [v for v, _ in L.PolicyLM(policy, tokenizer).loglikelihood(reqs)]
    assert all(abs(a - b) > 1e-2 for a, b in zip(frozen, head))
    # and they are log pi~ of the plain path, computed here directly from QAdapter.forward
    ids = tokenizer(REQUESTS[0][0] + REQUESTS[0][1])["input_ids"]
    n = len(tokenizer(REQUESTS[0][0])["input_ids"])
    with torch.no_grad():
        q_r, logp1, *_ = policy.adapter(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    logp = torch.log_softmax(q_r + logp1, dim=-1)[0]  # (T, V), α0 = α̃ = 1
    assert head[0] == pytest.approx(float(sum(logp[t - 1, ids[t]] for t in range(n, len(ids)))), abs=1e-4)


def test_requests_with_the_same_input_share_one_forward_pass(base, tokenizer):
    """MMLU's lettered choices: one context, four one-token continuations. With share_inputs they
    are scored from one row of the batch, and every value and greedy flag equals the plain path's
    (share_inputs=False), also for two-token continuations that share their first token."""
    letters = [("Question: Which is a colour?\nAnswer:", f" {c}") for c in "ABCD"]
    shared_first = [("Question: Where is Paris?\nAnswer:", " in France"), ("Question: Where is Paris?\nAnswer:", " in Spain")]
    reqs = instances("loglikelihood", letters + shared_first + REQUESTS)
    rows, outputs = {True: 0, False: 0}, {}  # rows forwarded, answers, per setting of share_inputs
    for share in (True, False):
        policy = customised(base, zero=False)
        forward = policy.logp

        def counting(ids, mask, states, share=share, forward=forward):
            rows[share] += ids.shape[0]
            return forward(ids, mask, states)

        policy.logp = counting
        outputs[share] = L.PolicyLM(policy, tokenizer, batch_size=3, share_inputs=share).loglikelihood(reqs)
    assert rows[False] == len(reqs)
    assert [len(tokenizer(c)["input_ids"]) for _, c in shared_first] == [2, 2]  # " in" + one token each
    assert rows[True] == len(reqs) - 3 - 1  # the four letters share one row, the two Paris answers another
    for (a, greedy_a), (b, greedy_b) in zip(outputs[True], outputs[False]):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    assert len({round(v, 4) for v, _ in outputs[True][:4]}) == 4  # four letters, four values


def test_generate_until_is_sample_generate_and_stops_at_until(base, tokenizer):
    policy = customised(base, zero=False)
    conversations = [[{"role": "user", "content": "Tell me about cats."}], [{"role": "user", "content": "Hi"}]]
    expected = sample.generate(policy.adapter, tokenizer, conversations, max_new_tokens=12)
    contexts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    lm = L.PolicyLM(policy, tokenizer, batch_size=2)
    got = lm.generate_until(instances("generate_until", [(c, {"until": [], "max_gen_toks": 12}) for c in contexts]))
    assert [g.strip() for g in got] == [text for text, _ in expected]
    # stop at a string that the greedy answer contains: the text before it, and no more tokens than needed
    answer = got[0]
    stop = answer.strip()[len(answer.strip()) // 2:][:2]
    steps = []
    step = policy.step
    policy.step = lambda *a: steps.append(1) or step(*a)
    cut = lm.generate_until(instances("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 12})]))[0]
    assert cut == answer[:answer.index(stop)]
    if answer.index(stop) + len(stop) <= len(answer) // 2:  # found in the first half: decoding stopped there
        assert len(steps) < 12
    # the frozen model's decoding is sample.generate's frozen_only
    frozen = sample.generate(policy.adapter, tokenizer, conversations[:1], max_new_tokens=6, frozen_only=True)
    got = L.PolicyLM(L.CausalLMPolicy(base), tokenizer).generate_until(
        instances("generate_until", [(contexts[0], {"until": [], "max_gen_toks": 6})]))
    assert got[0].strip() == frozen[0][0]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A 5-question ARC-style JSONL and a task yaml pointing at it, lm-eval's arc_easy format."""
    d = tmp_path_factory.mktemp("lm-eval-task")
    rows = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD"[:len(c)])},
             "answerKey": "ABCD"[a]} for i, (q, c, a) in enumerate(QUESTIONS)]
    data = write_jsonl(d / "tiny_arc.jsonl", rows)
    cfg = (L.TASKS_DIR / "arc_easy_local.yaml").read_text().replace("task: arc_easy_local", "task: tiny_arc")
    cfg = cfg.replace("validation: arc_easy_validation.jsonl", f"validation: {data}")
    (d / "tiny_arc.yaml").write_text(cfg)
    return d


def accuracy(lm, task_dir):
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_arc"], log_samples=False, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return {k: v for k, v in out["results"]["tiny_arc"].items() if k in ("acc,none", "acc_norm,none")}, out


def test_task_accuracy_equals_hflm(base, tokenizer, tiny_task):
    ours, out = accuracy(L.PolicyLM(customised(base), tokenizer), tiny_task)
    theirs, _ = accuracy(hflm(base, tokenizer), tiny_task)
    assert ours == theirs and set(ours) == {"acc,none", "acc_norm,none"}
    assert out["n-samples"]["tiny_arc"]["effective"] == 5


def test_our_task_files_point_at_the_data(monkeypatch, tmp_path):
    assert {"arc_easy_local", "mmlu_local", "mmlu_continuation_local"} <= set(L.local_task_names())
    monkeypatch.delenv(L.DATA_ENV, raising=False)
    with pytest.raises(SystemExit, match=r"task arc_easy_local reads arc_easy_validation.jsonl from a local folder: "
                                         r"give --retention-data DIR or set \$QADAPTER_RETENTION_DATA"):
        L.task_specs(["arc_easy_local"])  # no folder named: no guess
    assert L.data_file("arc_easy_validation.jsonl", str(tmp_path)) == str(tmp_path / "arc_easy_validation.jsonl")
    write_jsonl(tmp_path / "arc_easy_validation.jsonl", [{"id": "x"}])
    monkeypatch.setenv(L.DATA_ENV, str(tmp_path))
    (spec,) = L.task_specs(["arc_easy_local"])
    assert spec["dataset_kwargs"]["data_files"] == {"validation": str(tmp_path / "arc_easy_validation.jsonl")}
    assert spec["doc_to_text"] == "Question: {{question}}\nAnswer:"  # lm-eval's arc_easy prompt
    (spec, name) = L.task_specs(["mmlu_local", "arc_easy"], files={"mmlu_local": str(tmp_path / "arc_easy_validation.jsonl")})
    assert spec["dataset_kwargs"]["data_files"]["validation"] == str(tmp_path / "arc_easy_validation.jsonl")
    assert name == "arc_easy"  # lm-eval's own task: its name, loaded from the hub by lm-eval
    with pytest.raises(SystemExit, match="task mmlu_local: no data file .*mmlu_validation.jsonl"):
        L.task_specs(["mmlu_local"])


def test_our_tasks_read_the_local_files_with_lm_evals_prompts(tmp_path, monkeypatch):
    """The local MMLU in lm-eval's mmlu format: description by subject, lettered choices, target index."""
    write_jsonl(tmp_path / "mmlu_validation.jsonl", [{"question": " Water boils at ", "subject": "high_school_physics",
                                                     "choices": ["100 C", "10 C", "0 C", "1000 C"], "answer": 0}])
    monkeypatch.setenv(L.DATA_ENV, str(tmp_path))
    tasks = L.task_manager(["mmlu_local"]).load(L.task_specs(["mmlu_local", "mmlu_continuation_local"]))["tasks"]
    letters, text = tasks["mmlu_local"], tasks["mmlu_continuation_local"]
    doc = letters.eval_docs[0]
    assert letters.fewshot_context(doc, 0) == ("The following are multiple choice questions (with answers) about high "
                                               "school physics.\n\nWater boils at\nA. 100 C\nB. 10 C\nC. 0 C\nD. 1000 C\nAnswer:")
    assert letters.doc_to_choice(doc) == ["A", "B", "C", "D"] and letters.doc_to_target(doc) == 0
    assert text.fewshot_context(doc, 0).endswith("physics.\n\nQuestion: Water boils at\nAnswer:")
    assert text.doc_to_choice(doc) == ["100 C", "10 C", "0 C", "1000 C"]


def test_a_lora_policy_and_its_frozen_model(base, tokenizer, tiny_path):
    """The base with its LoRA adapter is the policy; setting=disable_adapter scores pi1 through the same model."""
    import baselines
    from support import loading
    lora_base, _ = loading.load_base(tiny_path)
    peft_model = baselines.lora_model(lora_base, baselines.parse_args(["--method", "dpo", "--base-model", tiny_path])).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    reqs = instances("loglikelihood", REQUESTS[:2])
    on = L.PolicyLM(L.CausalLMPolicy(peft_model.get_base_model()), tokenizer).loglikelihood(reqs)
    off = L.PolicyLM(L.CausalLMPolicy(peft_model.get_base_model(), peft_model.disable_adapter), tokenizer).loglikelihood(reqs)
    frozen = hflm(loading.load_base(tiny_path)[0], tokenizer).loglikelihood(reqs)
    assert [a for a, _ in off] == pytest.approx([a for a, _ in frozen], abs=1e-4)
    assert all(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(on, off))


def test_an_alpha0_sweep_scores_every_policy_in_one_forward_pass(base, tokenizer):
    """Sweep: three decode-time α0 of one head share their log-likelihood passes. Each policy's
    answers equal its own CustomisedPolicy's (the plain way), the first PolicyLM forwards the rows
    once for all three, and the other two read what it kept, forwarding nothing."""
    alphas = {"a": (0.5, 0.5), "b": (1.0, 1.0), "c": (2.0, 3.0)}
    adapter = customised(base, zero=False).adapter
    policies = {name: L.CustomisedPolicy(adapter, *a) for name, a in alphas.items()}
    reqs = instances("loglikelihood", REQUESTS)
    plain = {name: L.PolicyLM(p, tokenizer, batch_size=2).loglikelihood(reqs) for name, p in policies.items()}
    sweep = L.Sweep(policies)
    calls, forward = [], adapter.forward
    adapter.forward = lambda *args, **kw: calls.append(1) or forward(*args, **kw)
    try:
        shared = {name: L.PolicyLM(p, tokenizer, batch_size=2, sweep=(sweep, name)).loglikelihood(reqs)
                  for name, p in policies.items()}
    finally:
        del adapter.forward
    assert len(calls) == 3  # 5 requests in batches of 2, once, for all three policies
    for name in alphas:
        for (a, greedy_a), (b, greedy_b) in zip(shared[name], plain[name]):
            assert a == pytest.approx(b, abs=1e-6) and greedy_a == greedy_b
    assert len({round(shared[name][0][0], 4) for name in alphas}) == 3  # three policies, three values
    with pytest.raises(ValueError, match="not this policy's name in the sweep"):
        L.PolicyLM(policies["a"], tokenizer, sweep=(sweep, "b"))
    with pytest.raises(ValueError, match="share one adapter"):
        L.Sweep({"a": policies["a"], "other": customised(base, zero=False)})
