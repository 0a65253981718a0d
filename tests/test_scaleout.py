"""Scale-out (fast): multi-node launch settings, the work-pool deployments of prefect.yaml, the worker image, the
isolated workspaces and the fan-out grid. The real processes are in test_workers.py and test_stages.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from milora.pipeline.config import LAUNCH_KEYS, ConfigError, TrainConfig, load_config
from milora.stages.distributed import torchrun_args

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- multi-node training


def test_multi_node_settings_are_validated():
    cfg = load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 1,
                                             "train.rdzv_endpoint": "node0.cluster:29400"})
    assert (cfg.train.nnodes, cfg.train.node_rank, cfg.train.rdzv_backend) == (2, 1, "c10d")
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.nnodes = 2 needs train\.rdzv_endpoint"):
        load_config(REPO / "params.yaml", {"train.nnodes": 2})
    with pytest.raises(ConfigError, match=r"train\.node_rank = 2 must be below train\.nnodes = 2"):
        load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 2, "train.rdzv_endpoint": "h:1"})
    with pytest.raises(ConfigError, match=r"train\.rdzv_endpoint = 'node0' is not host:port"):
        load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.rdzv_endpoint": "node0"})
    with pytest.raises(ConfigError, match=r"train\.rdzv_backend = 'etcd' is not allowed"):
        load_config(REPO / "params.yaml", {"train.rdzv_backend": "etcd"})


def test_torchrun_arguments_for_one_node_and_for_several():
    one = load_config(REPO / "params.yaml", {"train.processes": 4})
    assert torchrun_args(one, "train") == ["--standalone", "--nproc_per_node", "4"]
    two = load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 1,
                                             "train.rdzv_endpoint": "10.0.0.1:29400"})
    assert torchrun_args(two, "svd") == ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                         "--rdzv_endpoint", "10.0.0.1:29400", "--rdzv_id", "milora-svd"]
    static = load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 1, "train.rdzv_backend":
                                                "static", "train.rdzv_endpoint": "10.0.0.1:29400"})
    assert torchrun_args(static, "train")[-2:] == ["--node_rank", "1"]


def test_the_train_stage_tracks_every_train_param_but_where_it_is_launched():
    """DVC re-runs `train` when a training param changes, not when a node's rank or the rendezvous address does."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    tracked = {p.removeprefix("train.") for p in stages["train"]["params"]}
    assert tracked == set(TrainConfig.model_fields) - set(LAUNCH_KEYS)
    assert set(LAUNCH_KEYS) <= set(TrainConfig.model_fields)
