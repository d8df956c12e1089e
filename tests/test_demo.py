"""The default serve config (`make serve`) and the committed demo adapters: valid, loadable, mergeable."""

from pathlib import Path

import yaml

from knots_serve.adapters import check_compatible, load_adapter
from knots_serve.demo_tasks import TASKS
from knots_serve.serving.merges.names import parse_model
from knots_serve.serving.server.config import ServeConfig
from knots_serve.serving.state.experiments import check_experiment

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_serves_every_demo_task_and_its_merges_parse():
    cfg = ServeConfig.model_validate(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))
    assert str(cfg.model) == "builtin:smollm2-135m-instruct"
    assert set(cfg.tasks) == set(TASKS)
    adapters = [load_adapter(ROOT / "configs" / p, n) for n, p in cfg.tasks.items()]
    check_compatible(adapters)
    for a in adapters:  # rank 16 on q/k/v/o of all 30 layers, as the paper's setting
        assert len(a.modules) == 120 and {m.rank for m in a.modules.values()} == {16}
    for model in cfg.merges.values():
        assert set(parse_model(model, cfg.default_method).tasks) <= set(cfg.tasks)
    for name, exp in cfg.experiments.items():
        check_experiment(name, exp, lambda m: None)
