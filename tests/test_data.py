"""Tests for the synthetic tasks, the stdlib corpus and the tokenizer (dllmq.data)."""

from __future__ import annotations

import collections
import itertools
import json
import re
import subprocess
import sys
import textwrap

import pytest

from dllmq.data import corpus, synthetic as S
from dllmq.data import tokenizer as T

SEED = 0
N_STREAM = 20_000


@pytest.fixture(scope="module")
def stream_sample() -> list[dict]:
    return list(itertools.islice(S.training_stream(SEED), N_STREAM))


@pytest.fixture(scope="module")
def training_text(stream_sample) -> str:
    return "\n\x00\n".join(S.item_text(it) for it in stream_sample)


# ---------------------------------------------------------------- determinism


def test_same_seed_same_items():
    assert S.math_examples("test", 50, 3) == S.math_examples("test", 50, 3)
    assert S.math_examples("train", 50, 3) == S.math_examples("train", 50, 3)
    assert S.code_examples("test", 30, 3) == S.code_examples("test", 30, 3)
    assert S.mc_examples("test", 60, 3) == S.mc_examples("test", 60, 3)
    assert S.world_facts(3) == S.world_facts(3)
    a = list(itertools.islice(S.training_stream(3), 300))
    b = list(itertools.islice(S.training_stream(3), 300))
    assert a == b


def test_different_seed_differs():
    assert S.math_examples("test", 20, 1) != S.math_examples("test", 20, 2)
    assert S.code_examples("test", 20, 1) != S.code_examples("test", 20, 2)
    assert S.world_facts(1) != S.world_facts(2)


def test_world_size():
    w = S.build_world(SEED)
    names = [n for kind in w.entities.values() for n in kind]
    assert 150 <= len(names) <= 300
    assert len(set(names)) == len(names)
    assert len(S.world_facts(SEED)) == len(w.facts) >= 200


# ---------------------------------------------------------------- disjointness


def test_split_assignment_is_by_key():
    # generated items land in the requested split only
    rng = __import__("random").Random(0)
    for _ in range(500):
        key, _item = S._math_candidate(rng)
        assert S.split_of("math", key) in ("train", "test")
    # the split rule is seed independent and stable
    assert S.split_of("math", ("add_more", 5, 7)) == S.split_of("math", ("add_more", 5, 7))
    frac = sum(S.split_of("math", ("x", i)) == "test" for i in range(5000)) / 5000
    assert 0.07 < frac < 0.13


def test_math_train_test_disjoint(training_text):
    test = S.math_examples("test", 150, SEED)
    train_q = {it["question"] for it in S.math_examples("train", 3000, SEED)}
    assert len({it["question"] for it in test}) == 150
    for it in test:
        assert it["question"] not in train_q
        assert it["question"] not in training_text


def test_code_train_test_disjoint(training_text):
    test = S.code_examples("test", 80, SEED)
    train_p = {it["prompt"] for it in S.code_examples("train", 1500, SEED)}
    assert len({it["prompt"] for it in test}) == 80
    for it in test:
        assert it["prompt"] not in train_p
        assert it["prompt"] not in training_text


def test_mc_questions_held_out(training_text):
    test = S.mc_examples("test", 200, SEED)
    assert len({it["question"] for it in test}) == 200
    train_tpls = {t for v in S._TRAIN_QUESTIONS.values() for t, _ in v}
    test_tpls = {t for v in S._TEST_QUESTIONS.values() for t, _ in v}
    assert not train_tpls & test_tpls
    train_q = {it["question"] for it in S.mc_examples("train", 300, SEED)}
    for it in test:
        assert it["question"] not in train_q
        assert it["question"] not in training_text
    # ...while the facts themselves are taught in training text
    facts = S.world_facts(SEED)
    taught = sum(f in training_text for f in facts)
    assert taught > 0.5 * len(facts)


# ---------------------------------------------------------------- math


_STEP = re.compile(r"^(\d+(?: [-+*/] \d+)+) = (\d+)$")


@pytest.mark.parametrize("split", ["train", "test"])
def test_math_answers_correct(split):
    items = S.math_examples(split, 400, SEED)
    steps = collections.Counter(it["steps"] for it in items)
    assert steps[1] and steps[2] and steps[3]
    assert steps[3] < steps[2]
    assert len({it["template"] for it in items}) >= 15
    for it in items:
        lines = it["solution"].split("\n")
        assert lines[-1] == f"#### {it['answer']}", it
        assert isinstance(it["answer"], int) and it["answer"] >= 0
        known = {int(v) for v in re.findall(r"\d+", it["question"])} | {2, 7}
        last = None
        assert 1 <= len(lines) - 1 <= 3
        for line in lines[:-1]:
            m = _STEP.match(line)
            assert m, line
            value = eval(m.group(1), {"__builtins__": {}})  # digits and + - * / only
            assert value == int(m.group(2)), line
            assert value >= 0
            for operand in re.findall(r"\d+", m.group(1)):
                assert int(operand) in known, (line, it["question"])
            known.add(int(m.group(2)))
            last = int(m.group(2))
        assert last == it["answer"]
        assert len(it["question"]) + len(it["solution"]) < 400


# ---------------------------------------------------------------- code


def _run_code_items(items, timeout=60) -> dict:
    script = textwrap.dedent(
        """
        import json, sys
        items = json.loads(sys.stdin.read())
        res = {"ok": 0, "bad": [], "wrong_detected": 0}
        for it in items:
            env = {}
            try:
                exec(it["prompt"] + it["canonical_solution"], env)
                exec(it["test"], env)
                env["check"](env[it["entry_point"]])
                res["ok"] += 1
            except Exception as e:
                res["bad"].append([it["task_id"], repr(e)])
            env = {}
            exec(it["prompt"] + "    return None\\n", env)
            exec(it["test"], env)
            try:
                env["check"](env[it["entry_point"]])
            except AssertionError:
                res["wrong_detected"] += 1
        print(json.dumps(res))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(items),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_canonical_code_passes_tests():
    items = S.code_examples("test", 80, SEED) + S.code_examples("train", 300, SEED)
    res = _run_code_items(items)
    assert res["bad"] == []
    assert res["ok"] == len(items)
    assert res["wrong_detected"] == len(items)  # tests reject a trivial wrong body


def test_code_item_shape():
    items = S.code_examples("test", 80, SEED)
    assert len({it["template"] for it in items}) >= 20
    assert len({it["entry_point"] for it in items}) >= 30
    for it in items:
        assert set(it) >= {"task_id", "prompt", "canonical_solution", "entry_point", "test"}
        assert it["prompt"].startswith(f"def {it['entry_point']}(")
        assert it["prompt"].endswith('"""\n')
        assert it["canonical_solution"].startswith("    ")
        assert it["test"].startswith("def check(candidate):\n")
        assert it["test"].count("assert candidate(") >= 3
        assert len(it["canonical_solution"]) <= 200


# ---------------------------------------------------------------- knowledge


def test_mc_labels_point_at_true_fact():
    world = S.build_world(SEED)
    facts = set(world.facts)
    for split in ("test", "train"):
        for it in S.mc_examples(split, 200, SEED):
            ch = it["choices"]
            assert len(ch) == 4 and len(set(ch)) == 4
            assert 0 <= it["label"] < 4
            assert it["context"] == f"Question: {it['question']}\nAnswer:"
            assert it["continuations"] == [" " + c for c in ch]
            q = it["question"]

            def mentioned(name):
                return re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", q, re.I)

            consistent = [
                i for i, c in enumerate(ch)
                if any(r == it["relation"] and ((o == c and mentioned(s)) or (s == c and mentioned(o)))
                       for r, s, o in facts)
            ]
            assert consistent == [it["label"]], it


def test_training_stream_mixture(stream_sample):
    # MIXTURE is a share of tokens (measured by the default length proxy)
    length = collections.Counter()
    for it in stream_sample:
        length[it["source"]] += S.approx_tokens(S.item_text(it))
    total = sum(length.values())
    for src, w in S.MIXTURE.items():
        assert abs(length[src] / total - w) < 0.02, (src, length[src] / total)
    assert abs(sum(S.MIXTURE.values()) - 1.0) < 1e-9
    for it in stream_sample[:2000]:
        if "text" in it:
            assert isinstance(it["text"], str) and it["text"]
        else:
            assert it["prompt"] and it["response"]
            if it["source"] == "code_chat":
                # HumanEval completion format: the response is the body only
                assert it["response"].startswith("    ") and not it["response"].lstrip().startswith("def ")
        if it["source"] == "arith_text":
            for line in it["text"].splitlines():
                lhs, rhs = line.split(" = ")
                a, op, b = lhs.split()
                assert S._op(int(a), op, int(b))[1] == int(rhs)


def test_write_task_files(tmp_path):
    paths = S.write_task_files(tmp_path, seed=SEED, n_math=20, n_code=10, n_mc=30)
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert [p.name for p in paths.values()] == ["tiny-math.jsonl", "tiny-code.jsonl", "tiny-mc.jsonl"]
    assert len(rows["tiny-math"]) == 20 and len(rows["tiny-code"]) == 10 and len(rows["tiny-mc"]) == 30
    assert rows["tiny-math"][0]["question"] == S.math_examples("test", 20, SEED)[0]["question"]
    assert {"question", "choices", "label"} <= set(rows["tiny-mc"][0])


# ---------------------------------------------------------------- corpus


def test_stdlib_corpus():
    files = corpus.stdlib_files()
    assert len(files) > 100
    root = corpus.stdlib_dir()
    for f in files:
        parts = f.relative_to(root).parts
        assert not set(parts[:-1]) & {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    assert [f.relative_to(root).as_posix() for f in files] == sorted(
        f.relative_to(root).as_posix() for f in files)
    docs = corpus.stdlib_documents(max_chars_per_doc=800, seed=1)
    assert len(docs) > 1000
    assert all(len(d) <= 801 for d in docs)
    assert docs == corpus.stdlib_documents(max_chars_per_doc=800, seed=1)
    cal = corpus.calibration_texts(16, seed=2)
    assert len(cal) == 16 and cal == corpus.calibration_texts(16, seed=2)
    assert len(set(cal)) == 16


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, stream_sample):
    out = tmp_path_factory.mktemp("tok")
    texts = ["user\n\nassistant\n\n"] + [S.item_text(it) for it in stream_sample[:3000]]
    ids = T.train_tokenizer(texts, out, vocab_size=1024)
    return out, ids, texts


def test_tokenizer_special_ids_and_reload(tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out, ids, _ = tok_dir
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert ids == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "mask_token_id": 2,
                   "start_header_id": 3, "end_header_id": 4, "eot_id": 5}
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        tk = cls.from_pretrained(str(out))
        assert T.special_token_ids(tk) == ids
        assert tk.bos_token == "<|startoftext|>" and tk.eos_token == "<|endoftext|>"
        assert tk.pad_token == "<|endoftext|>" and tk.mask_token == "<|mdm_mask|>"
        assert tk.bos_token_id == 0 and tk.mask_token_id == 2 and tk.pad_token_id == 1
        assert len(tk) == 1024
        # no bos/eos added when encoding
        enc = tk("hello 123")["input_ids"]
        assert ids["bos_token_id"] not in enc and ids["eos_token_id"] not in enc
        # special tokens in text map to their single ids
        assert tk("a<|mdm_mask|>b<|eot_id|>")["input_ids"].count(2) == 1
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False


def test_tokenizer_chat_template(tok_dir):
    out, ids, _ = tok_dir
    tk = T.load_tokenizer(out)
    s = tk.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert s == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tk.chat_template == T.LLADA_CHAT_TEMPLATE
    assert T.LLADA_CHAT_TEMPLATE == (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
        " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    )
    two = tk.apply_chat_template([{"role": "system", "content": " a "}, {"role": "user", "content": "b\n"}],
                                 tokenize=False)
    assert two == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\na<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nb<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    enc = tk(s)["input_ids"]
    assert enc[:2] == [ids["bos_token_id"], ids["start_header_id"]]
    assert enc.count(ids["eot_id"]) == 1


def test_tokenizer_round_trip_and_digits(tok_dir):
    out, _, texts = tok_dir
    tk = T.load_tokenizer(out)
    samples = [
        "def f(x):\n    return x , 1\n\n\n\tif x :\n        pass  \n",
        "x = {'a': [1, 2]}  # comment é ü 中文 \r\n\ttab\n",
        "   leading spaces\n\n\n",
    ]
    samples += [it["prompt"] + it["canonical_solution"] + "\n" + it["test"]
                for it in S.code_examples("test", 20, SEED)]
    samples += corpus.stdlib_documents(seed=0)[:50]
    for s in samples:
        assert tk.decode(tk(s)["input_ids"]) == s
    toks = tk.convert_ids_to_tokens(tk("123 + 4567 = 4690")["input_ids"])
    assert all(len(t.lstrip("Ġ")) <= 1 for t in toks if any(c.isdigit() for c in t))
    digit_toks = [t for t in toks if any(c.isdigit() for c in t)]
    assert digit_toks == list("1234567") + list("4690")


def test_tokenizer_training_deterministic(tmp_path, tok_dir):
    _, _, texts = tok_dir
    T.train_tokenizer(texts[:800], tmp_path / "a", vocab_size=600)
    T.train_tokenizer(texts[:800], tmp_path / "b", vocab_size=600)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def _value_from_columns(work: str, op: str) -> int:
    """Rebuild the result from the written columns alone (what a model copying them would get)."""
    cols = work.split(",")
    if op == "/":  # long division: quotient digits, most significant first
        return int("".join(c.split("=")[1].split("r")[0] for c in cols))
    sums = [int(c.split("=")[1]) for c in cols]
    digits = [s % 10 for s in sums]  # least significant first
    top = sums[-1] // 10 if op in "+*" else 0
    return int((str(top) if top else "") + "".join(map(str, reversed(digits))))


@pytest.mark.parametrize("op", ["+", "-", "*", "/"])
def test_column_format_is_correct_arithmetic(op):
    import random

    rng = random.Random(op)
    for _ in range(500):
        if op == "+":
            a, b = rng.randint(0, 999), rng.randint(0, 999)
        elif op == "-":
            a = rng.randint(0, 999)
            b = rng.randint(0, a)
        elif op == "*":
            a, b = rng.randint(2, 9), rng.randint(0, 999)
        else:
            b = rng.randint(2, 9)
            a = b * rng.randint(1, 120)
        expr, v = S._op(a, op, b)
        line = S.format_step(expr, v, "columns")
        head, _, result = line.rpartition(">")
        assert int(result) == v and head.startswith(expr + ": ")
        assert _value_from_columns(head[len(expr) + 2:], op) == v, line
    # no column form: stays plain; the plain format is the historical one
    assert S.format_step("12 * 30", 360, "columns") == "12 * 30 = 360"
    assert S.format_step("53 - 49", 4) == "53 - 49 = 4"


def test_math_format_changes_training_solutions_not_test_files():
    import itertools

    cols = [it for it in itertools.islice(S.training_stream(SEED, math_format="columns"), 400)
            if it["source"] == "math_chat"]
    assert cols and all(it["response"].splitlines()[-1].startswith("#### ") for it in cols)
    assert sum(">" in it["response"] for it in cols) > 0.8 * len(cols)
    plain = [it for it in itertools.islice(S.training_stream(SEED), 400) if it["source"] == "math_chat"]
    assert not any(">" in it["response"] for it in plain)
    assert all(">" not in ex["solution"] for ex in S.math_examples("test", 50, SEED))


@pytest.mark.parametrize("fmt", ["plain", "columns"])
def test_arith_chat_items_pose_the_operands_and_answer_them(fmt):
    """arith_chat (off in the default mix): the prompt is the bare expression, the response its worked equation,
    whose result is the true value."""
    import itertools

    items = list(itertools.islice(S.training_stream(SEED, mixture={"arith_chat": 1.0}, math_format=fmt), 200))
    assert {it["source"] for it in items} == {"arith_chat"}
    for it in items:
        expr, resp = it["prompt"], it["response"]
        a, op, b = expr.split(" ")
        result = int(resp.rpartition(">")[2] if ">" in resp else resp.rpartition(" = ")[2])
        true = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
        assert resp.startswith(expr) and result == true, it
    assert S.MIXTURE["arith_chat"] == 0.0
    assert not any(it["source"] == "arith_chat" for it in itertools.islice(S.training_stream(SEED), 300))
