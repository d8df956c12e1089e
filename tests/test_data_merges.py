"""Task statistics measured from a real model (stats_run.py, `knots-serve stats`) and the data-aware merges
served per request by a real server: the statistics against PEFT's own adapted model, the CLI's files read by
the server process, and every served merge equal to the one `knots-serve merge` writes from the same files."""

import subprocess

import pytest
import torch
from conftest import ADMIN_KEY
from server_process import CLI
from test_serving import PROMPTS, complete, http

from knots_serve.adapters import load_adapter
from knots_serve.stats import TaskStats
from knots_serve.stats_run import load_model, measure
from knots_serve.task_data import Example

DATA = {  # the tiny tokenizer's words; the answers of two tasks differ
    "alpha": [("the cat sat on the", "mat"), ("one two", "three"), ("red blue red", "blue"), ("hello", "world")],
    "beta": [("yes no yes", "no"), ("the dog", "sat"), ("two one", "one two three"), ("blue", "red")],
}


def examples(task):
    return [Example(({"role": "user", "content": p},), a, f"{task}:{i}") for i, (p, a) in enumerate(DATA[task])]


def test_grams_are_the_mean_inputs_of_peft_s_adapted_model(tiny_base, tiny_adapters):
    """stats_run adds the LoRA into the weights; PEFT runs it beside them: the same inputs reach each adapted
    module. Padded batches count no padding; q and v read one input and share one Gram; the weights come back."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = load_model(tiny_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = load_adapter(tiny_adapters["beta"], "beta")
    got = measure(model, tok, adapter, examples("beta"), batch=3)  # 3 + 1: one padded batch
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapters["beta"]).eval()
    sums, tokens = {}, 0

    def hook(name):
        def add(_, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return add

    prefix = "base_model.model."
    for name, mod in peft.named_modules():
        if name.removeprefix(prefix) in adapter.modules:
            mod.register_forward_pre_hook(hook(name.removeprefix(prefix)))
    with torch.no_grad():
        for ex in examples("beta"):  # one at a time: no padding at all
            chat = [*ex.messages, {"role": "assistant", "content": ex.answer}]
            ids = tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
            peft(input_ids=torch.tensor([ids]))
            tokens += len(ids)
    assert got.tokens == tokens and got.examples == 4 and got.adapter == adapter.digest
    assert set(got.grams) == set(adapter.modules) == set(sums)
    for m, g in got.grams.items():
        want = sums[m] / tokens
        assert torch.linalg.norm(g.dense.double() - want) < 1e-5 * torch.linalg.norm(want), m
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert got.grams[q] is got.grams[v] and got.grams[q] is not got.grams["model.layers.0.mlp.gate_proj"]


def stats_cli(config, data, *extra):
    return subprocess.run(
        [CLI, "stats", "--config", str(config), "--data", str(data), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def cli_merge(server, tiny_adapters, names, method, extra, stats: dict, suffix=""):
    out = server.root / f"disk-{method}-{'-'.join(names)}{suffix}"
    r = subprocess.run(
        [
            CLI,
            "merge",
            *(f"--adapter={n}={tiny_adapters[n]}" for n in names),
            *(f"--stats={n}={stats[n]}" for n in names if n in stats),
            "--method",
            method,
            *extra,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    status, _ = http(
        server, "POST", "/v1/load_lora_adapter", {"lora_name": out.name, "lora_path": str(out)}, key=ADMIN_KEY
    )
    assert status == 200
    return out.name


def test_served_regmean_after_knots_serve_stats(server, tiny_adapters, tmp_path):
    c = server.client()
    # before any statistics: a 400 that names the tasks and the command that measures them
    for model in ("tasks:alpha+beta@regmean", "tasks:alpha+beta@core-regmean"):
        status, body = http(server, "POST", "/v1/completions", {"model": model, "prompt": "the", "max_tokens": 2})
        assert status == 400 and "alpha, beta" in body["error"]["message"], body
        assert "knots-serve stats" in body["error"]["message"]

    data = tmp_path / "data"
    data.mkdir()
    for task, rows in DATA.items():
        (data / f"{task}.jsonl").write_text("".join(f'{{"prompt": "{p}", "answer": "{a}"}}\n' for p, a in rows))
    r = stats_cli(server.root / "config.yaml", data, "--max-examples", "3")
    assert r.returncode == 0, r.stderr
    assert "no data for gamma" in r.stdout and "per task at Llama-3-8B shapes" in r.stdout
    files = {t: next((server.root / "state" / "stats").glob(f"{t}.*.safetensors")) for t in DATA}
    assert TaskStats.load(files["alpha"]).examples == 3

    # the server process reads the files the CLI wrote: the pool view shows them, the merges use them
    _, doc = http(server, "GET", "/admin/tasks", key=ADMIN_KEY)
    shown = {t["name"]: t["stats"] for t in doc["tasks"]}
    assert shown["alpha"]["examples"] == 3 and shown["alpha"]["tokens"] > 0 and shown["gamma"] is None
    cases = [
        ("tasks:alpha+beta@regmean", ["alpha", "beta"], "regmean", []),
        ("tasks:alpha+beta@core-regmean?reduce=0.5", ["alpha", "beta"], "core-regmean", ["--reduce", "0.5"]),
        ("tasks:beta+gamma@wudi?alpha=0.7", ["beta", "gamma"], "wudi", ["--alpha", "0.7"]),
    ]
    for model, names, method, extra in cases:
        disk = cli_merge(server, tiny_adapters, names, method, extra, files if "regmean" in method else {})
        for p in PROMPTS:
            assert complete(c, model, p) == complete(c, disk, p), model
    chat = c.chat.completions.create(
        model="tasks:alpha+beta@regmean", messages=[{"role": "user", "content": "the cat"}], max_tokens=3
    )
    assert chat.choices[0].message.content is not None

    # statistics measured again (all 4 examples: another data digest): the cached merge is composed again
    def cached_from(model):
        merges = http(server, "GET", "/admin/merges", key=ADMIN_KEY)[1]["merges"]
        return next(r["stats"] for r in merges if r["model"] == model)

    model = "tasks:alpha+beta@regmean"
    old = cached_from(model)
    assert [s.split("@")[0] for s in old] == [files["alpha"].name, files["beta"].name]
    assert stats_cli(server.root / "config.yaml", data).returncode == 0
    new = {
        t: max((server.root / "state" / "stats").glob(f"{t}.*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
        for t in DATA
    }
    assert TaskStats.load(new["alpha"]).examples == 4 and new["alpha"] != files["alpha"]
    disk = cli_merge(server, tiny_adapters, ["alpha", "beta"], "regmean", [], new, "-again")
    for p in PROMPTS:
        assert complete(c, model, p) == complete(c, disk, p)
    assert [s.split("@")[0] for s in cached_from(model)] == [new["alpha"].name, new["beta"].name]
    # a task without statistics is never merged some other way
    status, body = http(server, "POST", "/v1/completions", {"model": "tasks:alpha+gamma@core-regmean", "prompt": "x"})
    assert status == 400 and "gamma" in body["error"]["message"] and "alpha" not in body["error"]["message"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sketch-rank", "-1"], "--sketch-rank"),
        (["--dtype", "int8"], "--dtype"),
    ],
)
def test_stats_cli_refuses_bad_options_with_one_error_line(server, tmp_path, args, message):
    (tmp_path / "alpha.jsonl").write_text('{"prompt": "the", "answer": "cat"}\n')
    r = stats_cli(server.root / "config.yaml", tmp_path, *args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_task_registered_with_its_statistics(server, tiny_base, tiny_adapters):
    """POST /admin/tasks {"stats": FILE}: checked against the adapter before the pool changes, kept in the stats
    dir, shown by GET /admin/tasks; a file measured with another adapter is a 400 and changes nothing."""
    import shutil

    extra = server.root / "extra"
    shutil.copytree(tiny_adapters["alpha"], extra / "epsilon")
    model, tok = load_model(tiny_base)
    ok = measure(model, tok, load_adapter(extra / "epsilon", "epsilon"), examples("alpha")[:2])
    ok.save(extra / "epsilon.safetensors")
    measure(model, tok, load_adapter(tiny_adapters["gamma"], "epsilon"), examples("alpha")[:2]).save(
        extra / "bad.safetensors"
    )
    task = {"name": "epsilon", "path": str(extra / "epsilon")}
    for stats, message in (
        (extra / "bad.safetensors", "another adapter"),
        (tiny_base / "config.json", "outside the configured adapter_dirs"),
    ):
        status, body = http(server, "POST", "/admin/tasks", task | {"stats": str(stats)}, key=ADMIN_KEY)
        assert status == 400 and message in body["error"]["message"], body
    assert "epsilon" not in {t["name"] for t in http(server, "GET", "/admin/tasks", key=ADMIN_KEY)[1]["tasks"]}
    # a task already registered: refused before its statistics are copied
    before = sorted((server.root / "state" / "stats").glob("alpha.*"))
    # (epsilon's files are alpha's adapter: these statistics would be alpha's)
    alpha = measure(model, tok, load_adapter(extra / "epsilon", "alpha"), examples("alpha")[1:])
    alpha.save(extra / "alpha.safetensors")
    taken = {"name": "alpha", "path": str(extra / "epsilon"), "stats": str(extra / "alpha.safetensors")}
    assert http(server, "POST", "/admin/tasks", taken, key=ADMIN_KEY)[0] == 409
    assert sorted((server.root / "state" / "stats").glob("alpha.*")) == before
    status, body = http(
        server, "POST", "/admin/tasks", task | {"stats": str(extra / "epsilon.safetensors")}, key=ADMIN_KEY
    )
    try:
        assert status == 201 and body["stats"]["examples"] == 2 and body["stats"]["tokens"] == ok.tokens, body
        status, body = http(server, "POST", "/v1/completions", {"model": "tasks:epsilon+gamma@regmean", "prompt": "x"})
        assert status == 400 and "task(s) gamma " in body["error"]["message"], body  # epsilon has its statistics
    finally:
        assert http(server, "DELETE", "/admin/tasks/epsilon", key=ADMIN_KEY)[0] == 200


def test_layerwise_regmean_is_regmean_on_layer_0_and_sees_merged_inputs_above(tiny_base, tiny_adapters, tmp_path):
    """RegMean++: nothing is merged below layer 0, so its merge is RegMean's; layer 1's Grams come from the
    merged layer 0, so it differs. The weights come back; the CLI writes the same merge."""
    from knots_serve.compose import MergeSpec, adapter_factors, merge_factors
    from knots_serve.stats_run import layerwise_regmean

    model, tok = load_model(tiny_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = {n: load_adapter(tiny_adapters[n], n) for n in DATA}
    data = {t: examples(t) for t in DATA}
    spec = MergeSpec(tuple(DATA), "regmean", {"reduce": 0.8})
    got = layerwise_regmean(model, tok, adapters, data, spec)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    stats = {t: measure(model, tok, adapters[t], data[t]) for t in DATA}
    plain = merge_factors(adapter_factors(adapters, spec.tasks), spec, stats=stats)
    assert set(got) == set(plain)

    def rel(m):
        a, b = (x[m][0].double() @ x[m][1].double() for x in (got, plain))
        return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))

    assert max(rel(m) for m in got if ".layers.0." in m) < 1e-5
    assert min(rel(m) for m in got if ".layers.1." in m and "q_proj" in m) > 1e-4

    for task, rows in DATA.items():
        (tmp_path / f"{task}.jsonl").write_text("".join(f'{{"prompt": "{p}", "answer": "{a}"}}\n' for p, a in rows))
    out = tmp_path / "merged"
    r = subprocess.run(
        [CLI, "merge", *(f"--adapter={n}={tiny_adapters[n]}" for n in DATA), "--method", "regmean", "--reduce", "0.8"]
        + ["--layerwise", str(tmp_path), "--base", str(tiny_base), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    written = load_adapter(out, "m")
    for m, (B, A) in got.items():
        delta = written.modules[m].delta(torch.float64)
        assert torch.linalg.norm(delta - B.double() @ A.double()) < 1e-5 * torch.linalg.norm(delta), m
